//! The server's shared state: its store, history and client records, and applying an
//! upload.
//!
//! The server keeps, in its own store (through `store::sync_tables`): `history` (server
//! version → origin and log entry, as uploaded), `clients` (replica id → highest applied
//! log position and user). An upload is applied with its history records and the client's
//! position in one store transaction, so a repeated, overlapping or replayed upload is
//! applied once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use super::config::{Limits, ServerConfig};
use super::enforce::{not_allowed, refused_write};
use super::resolve::{apply_plan, conflicts_in, errors_occurred, grave_row, revert};
use crate::changeset::Changeset;
use crate::clock::ReplicaId;
use crate::conflict::ConflictRecord;
use crate::error::{Error, Result};
use crate::log::{LogEntry, LogPos};
use crate::reset::ResetReason;
use crate::rules::User;
use crate::schema::Schema;
use crate::store::sync_tables::{decode_history, ServerMeta};
use crate::store::Store;
use crate::store::WriteTx;
use crate::sync::protocol::ServerVersion;
use crate::sync::protocol::{RefusedWrite, SubscriptionSet};
use crate::sync::view::View;

/// Counters of what the server refused, for operators.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    /// Sessions refused because the device belongs to another user.
    pub(super) device_owner: AtomicU64,
    /// Uploads refused as protocol errors (a gap in positions, a different entry at a
    /// known position).
    pub(super) upload_protocol: AtomicU64,
}

/// A snapshot of the server's refusal counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefusalCounts {
    /// Sessions refused because the device (replica id) belongs to another user.
    pub device_owner: u64,
    /// Uploads refused as protocol errors: a position that skips ahead of the last one
    /// applied for the device, or a different entry at a position already applied.
    pub upload_protocol: u64,
}

/// What the server remembers of a client.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct ClientRecord {
    /// The client's highest log position applied here.
    pub(super) uploaded: LogPos,
    /// The user the client last authenticated as.
    pub(super) user: String,
    /// An operator ordered a reset for this client.
    pub(super) force_reset: bool,
}

pub(super) fn corrupt(what: impl Into<String>) -> Error {
    Error::Corrupt { what: what.into() }
}

/// An internal invariant that did not hold (encoding one of our own records, say).
pub(super) fn internal(what: impl Into<String>) -> Error {
    Error::Internal { what: what.into() }
}

/// The server's shared state: its store, history and client records.
pub struct SyncServer {
    pub(super) store: Arc<Store>,
    pub(super) config: ServerConfig,
    /// The newest server version; the lock also orders uploads from concurrent sessions.
    version: Mutex<ServerVersion>,
    /// The last conflict record's number (moved under `version`'s lock, once its upload
    /// has committed).
    pub(super) last_conflict: AtomicU64,
    pub(super) refusals: Refusals,
    /// The store's recovery generation the two counters above were read at: a recovery
    /// replays commits whose callers saw them fail (a sync that failed after the bytes
    /// were written), so the counters are read again from the store after one.
    generation: AtomicU64,
}

impl Drop for SyncServer {
    fn drop(&mut self) {
        self.store.set_served(false);
    }
}

impl std::fmt::Debug for SyncServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncServer")
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

impl SyncServer {
    /// Serves `store`, creating the sync tables on first use.
    pub fn open(store: Arc<Store>, config: ServerConfig) -> Result<SyncServer> {
        let marks = store.open_sync_server_tables()?;
        store.set_served(true);
        Ok(SyncServer {
            generation: AtomicU64::new(store.generation()),
            store,
            config,
            version: Mutex::new(marks.history_last.max(marks.horizon)),
            last_conflict: AtomicU64::new(marks.conflict_last),
            refusals: Refusals::default(),
        })
    }

    /// The limits it was configured with.
    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// The server's version, with the counters read again from the store if it recovered
    /// from a storage failure since they were read. Called with the version's lock held.
    fn current(&self, version: &mut MutexGuard<'_, ServerVersion>) -> Result<()> {
        let generation = self.store.generation();
        if self.generation.load(Ordering::SeqCst) == generation {
            return Ok(());
        }
        let marks = self.store.sync_server_marks()?;
        **version = (**version).max(marks.history_last).max(marks.horizon);
        self.last_conflict
            .fetch_max(marks.conflict_last, Ordering::SeqCst);
        self.generation.store(generation, Ordering::SeqCst);
        Ok(())
    }

    /// The server's store, to read. While the server serves it, the store refuses writes
    /// made around the server ([`Error::ServedStore`]): they would never reach a client.
    /// Write with [`SyncServer::write`] and [`SyncServer::set_schema`].
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The newest server version.
    pub fn version(&self) -> ServerVersion {
        let mut version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        // A store that cannot be read keeps the version known (uploads read it again).
        let _ = self.current(&mut version);
        *version
    }

    /// How many sessions and uploads the server has refused, by reason.
    pub fn refusal_counts(&self) -> RefusalCounts {
        RefusalCounts {
            device_owner: self.refusals.device_owner.load(Ordering::Relaxed),
            upload_protocol: self.refusals.upload_protocol.load(Ordering::Relaxed),
        }
    }

    /// Ties `client` to `user` on its first session, durably, before any state is sent or
    /// accepted; refuses a session of any other user claiming it. Device ids are not
    /// secret (every stamp names its device), so the id alone proves nothing.
    pub(super) fn claim_device(
        &self,
        client: ReplicaId,
        user: &str,
    ) -> Result<std::result::Result<(), String>> {
        let _version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        if client == self.store.replica_id() {
            return Ok(Err(format!(
                "device {client} is the server's own replica id"
            )));
        }
        let mut record = self.client_record(client)?;
        if record.user == user {
            return Ok(Ok(()));
        }
        if !record.user.is_empty() {
            return Ok(Err(format!(
                "device {client} belongs to another user; a device id is registered to the first user that syncs it"
            )));
        }
        record.user = user.to_owned();
        self.put_client_record(client, &record)?;
        Ok(Ok(()))
    }

    /// The stamp time of `client`'s entry at `seq` as applied here, if the server knows it.
    fn applied_stamp(&self, client: ReplicaId, seq: LogPos) -> Result<Option<u64>> {
        let applied = self.store.sync_upload(client, seq)?;
        Ok(applied.map(|(_, time)| time))
    }

    /// The entries of an upload not yet applied. A re-sent entry must be the transaction
    /// applied at its position (the same stamp); fresh entries must continue the
    /// client's positions without a gap. Anything else is a protocol error: acknowledging
    /// it would drop a write (a gap would make the skipped positions look applied).
    fn fresh_entries(
        &self,
        client: ReplicaId,
        uploaded: LogPos,
        entries: Vec<LogEntry>,
    ) -> Result<Vec<LogEntry>> {
        let mut fresh: Vec<LogEntry> = Vec::with_capacity(entries.len());
        for e in entries {
            let refuse = |reason: String| {
                self.refusals
                    .upload_protocol
                    .fetch_add(1, Ordering::Relaxed);
                Err(Error::BadChangeset { reason })
            };
            if e.seq <= uploaded {
                if self
                    .applied_stamp(client, e.seq)?
                    .is_some_and(|t| t != e.stamp.time)
                {
                    return refuse(format!(
                        "entry {} differs from the entry applied at that position",
                        e.seq
                    ));
                }
                continue;
            }
            let expected = fresh.last().map_or(uploaded, |f| f.seq) + 1;
            if e.seq != expected {
                return refuse(format!(
                    "entry {} skips ahead: the next position of this device is {expected}",
                    e.seq
                ));
            }
            fresh.push(e);
        }
        Ok(fresh)
    }

    pub(super) fn client_record(&self, client: ReplicaId) -> Result<ClientRecord> {
        let rec = self.store.sync_client_record(client)?;
        rec.map(|r| postcard::from_bytes(&r).map_err(|e| corrupt(format!("client: {e}"))))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    /// The highest log position of `client` applied here.
    pub fn uploaded(&self, client: ReplicaId) -> Result<LogPos> {
        Ok(self.client_record(client)?.uploaded)
    }

    /// Applies complete entries from `client`, skipping those already applied. Returns the
    /// client's applied position and the server version afterwards.
    pub(super) fn apply_upload(
        &self,
        client: ReplicaId,
        view: &View,
        entries: Vec<LogEntry>,
    ) -> Result<(LogPos, ServerVersion, Vec<RefusedWrite>)> {
        let user = view.user().id.as_str();
        let mut version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        self.current(&mut version)?;
        let mut record = self.client_record(client)?;
        let mut fresh = self.fresh_entries(client, record.uploaded, entries)?;
        let Some(last) = fresh.last().map(|e| e.seq) else {
            return Ok((record.uploaded, *version, Vec::new()));
        };
        let invalid = self.take_invalid(&mut fresh);
        let mut refused = if view.filtered() {
            self.enforce(view, &mut fresh)?
        } else {
            Vec::new()
        };
        let plan = self.plan_conflicts(client, user, &fresh)?;
        let cs = Changeset {
            origin: client,
            entries: fresh,
        };
        // The store numbers the upload's entries, then the server's own entry (reverted
        // refusals, policy decisions), into the history as part of the import.
        let start = *version;
        let next = Arc::new(AtomicU64::new(start));
        let mut records = Vec::new();
        self.store.import_with(&cs, |tx, _| {
            tx.record_in_history(Arc::clone(&next));
            // The entries' stamps and the client's position go in the upload's write-ahead
            // record: entry i is history version start + i + 1.
            for (v, e) in (start + 1..).zip(&cs.entries) {
                tx.put_sync_upload(client, e.seq, v, e.stamp.time);
            }
            if !refused.is_empty() || !invalid.is_empty() {
                let all: Vec<&RefusedWrite> = refused.iter().chain(&invalid).collect();
                let bytes = postcard::to_allocvec(&all).map_err(|e| internal(e.to_string()))?;
                tx.put_sync_refusals(client, last, bytes);
            }
            record.uploaded = last;
            record.user = user.to_owned();
            let bytes = postcard::to_allocvec(&record).map_err(|e| internal(e.to_string()))?;
            tx.put_sync_client_record(client, bytes);
            revert(tx, refused.iter().chain(&invalid))?;
            records.extend(invalid.iter().map(|r| errors_occurred(r, client, user)));
            records.extend(apply_plan(tx, plan)?);
            self.put_conflicts(tx, &mut records)?;
            Ok(())
        })?;
        *version = next.load(Ordering::SeqCst);
        if let Some(r) = records.last() {
            self.last_conflict.store(r.id, Ordering::SeqCst);
        }
        if let Some(observe) = &self.config.on_conflict {
            for r in &records {
                observe(r);
            }
        }
        refused.extend(invalid);
        Ok((last, *version, refused))
    }

    /// Takes the writes that break the server's schema out of the upload and returns them:
    /// each is refused on its own (ErrorsOccurred), not the whole upload, so the client's
    /// other writes go through.
    fn take_invalid(&self, entries: &mut [LogEntry]) -> Vec<RefusedWrite> {
        let mut invalid = Vec::new();
        for e in entries {
            let stamp = e.stamp;
            e.writes.retain(|w| match self.store.check_write_schema(w) {
                Ok(()) => true,
                Err(err) => {
                    invalid.push(refused_write(
                        w,
                        stamp,
                        not_allowed(w),
                        Some(format!("failed validation: {err}")),
                    ));
                    false
                }
            });
        }
        invalid
    }

    /// Refusals of uploads above `last_sync` the client may have missed (a connection cut
    /// between the refusal and the acknowledgement); those at or below it were received
    /// and are forgotten.
    pub(super) fn pending_refusals(
        &self,
        client: ReplicaId,
        last_sync: LogPos,
    ) -> Result<Vec<RefusedWrite>> {
        // Most handshakes have none: look before taking the writer.
        if !self.store.has_sync_refusals(client)? {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        self.store.take_sync_refusals(client, last_sync, |bytes| {
            out.extend(crate::sync::stored::refused_writes(bytes)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// A view for a user and a subscription set.
    pub(crate) fn view(&self, user: User, set: Option<&SubscriptionSet>) -> Result<View, String> {
        View::new(self.config.rules.clone(), user, set, |c| {
            self.store.schema(c)
        })
    }

    /// Writes on the server, as the server: the transaction enters the history like an
    /// upload, so every client receives it.
    pub fn write<R>(&self, f: impl FnOnce(&mut WriteTx<'_>) -> Result<R>) -> Result<R> {
        let mut version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        self.current(&mut version)?;
        let next = Arc::new(AtomicU64::new(*version));
        let mut tx = self.store.begin()?;
        let r = f(&mut tx)?;
        for (collection, pk, fields) in tx.deleted_live()? {
            if self.config.conflicts.may_revive(&collection) {
                let (key, grave) = grave_row(&collection, &pk, &fields)?;
                tx.put_sync_grave(key, grave);
            }
        }
        tx.record_in_history(Arc::clone(&next));
        tx.commit()?;
        *version = next.load(Ordering::SeqCst);
        Ok(r)
    }

    /// Every recorded conflict after number `after`, at most `limit`.
    pub fn conflicts(&self, after: u64, limit: usize) -> Result<Vec<ConflictRecord>> {
        conflicts_in(&self.store, after, limit)
    }

    pub(super) fn meta(&self, which: ServerMeta) -> Result<u64> {
        self.store.sync_server_meta(which)
    }

    /// History at or below this version has been compacted away.
    pub fn horizon(&self) -> Result<ServerVersion> {
        self.meta(ServerMeta::Horizon)
    }

    /// The current schema version (raised by every schema change).
    pub fn schema_version(&self) -> Result<u64> {
        self.meta(ServerMeta::SchemaVersion)
    }

    /// Drops history up to `upto` (at most the current version). Clients whose cursor is
    /// below it must reset; the state keeps every field's stamp and every tombstone, so
    /// their recovery loses nothing. Returns how many records were removed.
    pub fn compact_history(&self, upto: ServerVersion) -> Result<u64> {
        let version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        let upto = upto.min(*version);
        self.store.compact_sync_history(upto)
    }

    /// Orders a reset for a client the next time it connects.
    pub fn force_reset(&self, client: ReplicaId) -> Result<()> {
        let _version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        let mut record = self.client_record(client)?;
        record.force_reset = true;
        self.put_client_record(client, &record)
    }

    fn put_client_record(&self, client: ReplicaId, record: &ClientRecord) -> Result<()> {
        let bytes = postcard::to_allocvec(record).map_err(|e| internal(e.to_string()))?;
        self.store.set_sync_client_record(client, &bytes)
    }

    /// Sets a collection's schema on the server. Raises the schema version; a removed or
    /// retyped field (a breaking change) makes clients on older versions reset, an added
    /// field does not. Returns whether the change was breaking.
    pub fn set_schema(&self, schema: Schema) -> Result<bool> {
        let _version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        let breaking = self.store.schema(&schema.collection).is_some_and(|old| {
            old.fields
                .iter()
                .any(|(name, spec)| schema.fields.get(name).is_none_or(|new| new.ty != spec.ty))
        });
        self.store.put_schema(schema)?;
        self.store.bump_sync_schema_version(breaking)?;
        Ok(breaking)
    }

    /// Why this client must reset, if it must.
    pub(super) fn reset_reason(
        &self,
        record: &ClientRecord,
        schema_version: u64,
        download_cursor: ServerVersion,
        last_sync: LogPos,
        reset_pending: bool,
    ) -> Result<Option<ResetReason>> {
        let version = self.version();
        let horizon = self.meta(ServerMeta::Horizon)?;
        let breaking = self.meta(ServerMeta::BreakingVersion)?;
        let server_schema = self.meta(ServerMeta::SchemaVersion)?;
        Ok(if reset_pending {
            Some(ResetReason::Resumed)
        } else if record.force_reset {
            Some(ResetReason::Forced)
        } else if schema_version < breaking {
            Some(ResetReason::BreakingSchemaChange {
                client: schema_version,
                server: server_schema,
            })
        } else if download_cursor > version {
            Some(ResetReason::ClientAheadOfServer {
                detail: format!(
                    "the client has downloaded up to version {download_cursor}; the server has {version}"
                ),
            })
        } else if last_sync > record.uploaded {
            Some(ResetReason::ClientAheadOfServer {
                detail: format!(
                    "the server acknowledged this client's log up to {last_sync} but holds only {}",
                    record.uploaded
                ),
            })
        } else if download_cursor < horizon {
            Some(ResetReason::BehindHorizon {
                cursor: download_cursor,
                horizon,
            })
        } else {
            None
        })
    }

    /// The client swapped the snapshot in: a forced reset is done, and its log up to
    /// `settled` needs no upload.
    pub(super) fn reset_served(&self, client: ReplicaId, settled: LogPos) -> Result<()> {
        let _version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        let mut record = self.client_record(client)?;
        if record.force_reset || settled > record.uploaded {
            record.force_reset = false;
            record.uploaded = record.uploaded.max(settled);
            self.put_client_record(client, &record)?;
        }
        Ok(())
    }

    /// History after `cursor` that `client` has not got: its own entries are skipped (it
    /// has them). Returns entries (seq = server version) up to about `batch_bytes`, and the
    /// cursor after them.
    pub(super) fn history_after(
        &self,
        cursor: ServerVersion,
        client: ReplicaId,
    ) -> Result<(Vec<LogEntry>, ServerVersion)> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut end = cursor;
        self.store.sync_history_after(cursor, |version, record| {
            end = version;
            let rec = decode_history(end, record)?;
            if rec.origin == client {
                return Ok(true);
            }
            bytes += record.len();
            let mut entry = rec.entry;
            entry.seq = end;
            out.push(entry);
            Ok(bytes < self.config.batch_bytes)
        })?;
        Ok((out, end))
    }
}
