//! Client reset: the server cannot continue a client's history, so the client rebuilds its
//! state from the server's and recovers its unsynced field writes.
//!
//! The steps (driven by the sync client, carried out by the store):
//! 1. back up the store file (copy, fsync, rename: atomic) and write a marker;
//! 2. download the server's state (a snapshot of every object, tombstones included, with
//!    every field's stamp) into a staging table, while the app keeps reading and writing
//!    the old state, replaying each unsynced field write onto its object as the object is
//!    staged, by the merge rule — a write newer than the server's stamp for its field is
//!    recovered, an older one is superseded, one the server's schema (sent when the reset
//!    begins) cannot hold is discarded;
//! 3. in one transaction: replay what is left (writes to objects the server lacks, and
//!    what the app wrote while staging ran), swap the staged state in, and append the
//!    recovered writes to the log with their original stamps, so only they are uploaded;
//! 4. once the server acknowledges them, remove the backup and the marker.
//!
//! A crash anywhere resumes from the marker: step 2 restarts (staging is rebuilt), step 3 is
//! one transaction, step 4 waits for the acknowledgement again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::clock::Stamp;
use crate::value::{Pk, Value};

/// Why the server ordered a reset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ResetReason {
    /// The client's download cursor is behind the server's compacted history.
    BehindHorizon {
        /// The client's cursor.
        cursor: u64,
        /// The oldest server version still in history, minus one.
        horizon: u64,
    },
    /// A field was removed or retyped since the client's schema version.
    BreakingSchemaChange {
        /// The client's schema version.
        client: u64,
        /// The server's.
        server: u64,
    },
    /// The server lost changes it had acknowledged or sent (restored from a backup).
    ClientAheadOfServer {
        /// What was found.
        detail: String,
    },
    /// An operator forced it.
    Forced,
    /// The client resumes a reset that a crash interrupted.
    Resumed,
    /// The server holds writes of this client that the client lost (commits made with
    /// `Durability::Deferred`, uploaded, then lost in a crash): it rebuilds from the server.
    ServerAheadOfClient {
        /// What was found.
        detail: String,
    },
    /// The client's subscriptions changed: its view is rebuilt (not reported as a reset).
    SubscriptionsChanged,
}

/// What a client does with its unsynced writes when the server orders a reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ResetMode {
    /// Keep the backup and leave recovery to the application (see [`Backup`](crate::Backup)); the store
    /// takes the server's state.
    Manual,
    /// Take the server's state; unsynced writes are reported as discarded.
    DiscardUnsyncedChanges,
    /// Recover every unsynced write that is newer than the server's value for its field;
    /// report the rest as superseded or discarded, one by one (never all-or-nothing).
    #[default]
    RecoverUnsyncedChanges,
    /// Recover as above; if the unsynced writes cannot be read at all, discard them and
    /// report why.
    RecoverOrDiscard,
}

/// One object's full merged state, as the server sends it during a reset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectSnapshot {
    /// Collection.
    pub collection: String,
    /// Primary key.
    pub pk: Pk,
    /// The existence register.
    pub exists: Option<(Stamp, bool)>,
    /// The floor (see the merge rule).
    pub floor: Stamp,
    /// Every field with its stamp, live or not.
    pub fields: Vec<(String, Stamp, Value)>,
}

/// One unsynced field write, as a reset report names it.
#[derive(Clone, Debug, PartialEq)]
pub struct UnsyncedWrite {
    /// Collection.
    pub collection: String,
    /// Primary key.
    pub pk: Pk,
    /// The field; `None` for the object's existence (an insert or a delete).
    pub field: Option<String>,
    /// The value written; for existence, `Bool(true)` for an insert, `Bool(false)` for a
    /// delete.
    pub value: Value,
    /// When it was written.
    pub stamp: Stamp,
}

/// An unsynced write the server's state had already beaten.
#[derive(Clone, Debug, PartialEq)]
pub struct Superseded {
    /// The write.
    pub write: UnsyncedWrite,
    /// The server's value for that field (`None` if the object or field is gone).
    pub server_value: Option<Value>,
    /// The stamp of the server's write; its replica is who wrote it.
    pub server_stamp: Stamp,
    /// Why it lost, in words.
    pub reason: String,
}

/// An unsynced write that could not be recovered.
#[derive(Clone, Debug, PartialEq)]
pub struct Discarded {
    /// The write.
    pub write: UnsyncedWrite,
    /// Why.
    pub reason: String,
}

/// What a reset did with every unsynced write. Nothing unsynced is missing from it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResetReport {
    /// Why the reset happened (`None` only in a default value).
    pub reason: Option<ResetReason>,
    /// The mode it ran in.
    pub mode: ResetMode,
    /// Writes applied on top of the server's state and uploaded.
    pub recovered: Vec<UnsyncedWrite>,
    /// Writes older than the server's value for the same field.
    pub superseded: Vec<Superseded>,
    /// Writes that could not be applied, with the reason.
    pub discarded: Vec<Discarded>,
    /// Where the backup of the store was kept (removed after success, except in `Manual`).
    pub backup: Option<PathBuf>,
    /// How long the replay took: reading the unsynced writes, replaying them onto the
    /// server's state as its chunks were staged, and the swap transaction (the download
    /// and the staging writes not included).
    pub replay_time: std::time::Duration,
}

/// The reset marker kept in the store's `meta` while a reset runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct ResetMarker {
    pub reason: ResetReason,
    pub mode: ResetMode,
    pub phase: ResetPhase,
    pub backup: Option<PathBuf>,
}

/// Where a reset is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ResetPhase {
    /// Backed up; the server's state is being staged.
    Downloading,
    /// Swapped in; the recovered writes up to `until` await acknowledgement. Entries up to
    /// `settled` were replayed and never need uploading (the client tells the server in
    /// every handshake until the reset ends, in case the final snapshot acknowledgement
    /// was lost).
    Uploading { until: u64, settled: u64 },
}

/// A file for a store's reset backup that does not exist yet: a backup left for the
/// application (Manual mode) is never overwritten.
pub(crate) fn backup_path(store_path: &Path) -> PathBuf {
    let base = store_path.as_os_str().to_owned();
    (0u32..)
        .map(|n| {
            let mut name = base.clone();
            name.push(".reset-backup");
            if n > 0 {
                name.push(format!(".{n}"));
            }
            PathBuf::from(name)
        })
        .find(|p| !p.exists())
        .unwrap_or_else(|| store_path.with_extension("reset-backup"))
}
