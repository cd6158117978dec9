//! fieldlog: an embedded storage engine for offline-first applications.
//!
//! Every change is a field write — (collection, primary key, field, value, stamp) — kept
//! in redb both as current state and in an append-only Updates log. Replicas merge per
//! field by stamp, so two replicas editing different fields of one object never conflict.
//!
//! ```
//! use fieldlog::{Store, Value};
//!
//! let a = Store::open_in_memory()?;
//! let b = Store::open_in_memory()?;
//! a.write(|tx| tx.insert("Dog", 1, [("name", Value::from("Rex")), ("age", Value::from(3))]))?;
//! b.import(&a.export(0, usize::MAX)?)?;
//! a.write(|tx| tx.set("Dog", 1, "age", 4))?;          // a changes the age
//! b.write(|tx| tx.set("Dog", 1, "name", "Max"))?;     // b renames, concurrently
//! a.import(&b.export(0, usize::MAX)?)?;
//! b.import(&a.export(0, usize::MAX)?)?;
//! assert_eq!(a.get("Dog", 1)?.unwrap().get("name"), Some(&Value::from("Max")));
//! assert_eq!(b.get("Dog", 1)?.unwrap().get("age"), Some(&Value::from(4)));
//! assert_eq!(a.digest(), b.digest());
//! # Ok::<(), fieldlog::Error>(())
//! ```
//!
//! Cargo features, all on by default: `sync` (the [`sync`] module: server, client and their
//! tokio transport), `text` (collaborative text fields, over automerge) and `cli` (the
//! `fieldlog` binary). With `default-features = false` the crate is the embedded store
//! alone; a text field there is an [`Error::NeedsFeature`].
//!
//! Boundaries: `merge` touches no redb and no network; redb appears only in `store` (and
//! the write-ahead file, read snapshot and backend beside it); tokio only in the sync
//! transport. A log append, its state update, the digest and the clock high-water mark
//! commit in one redb transaction.
//!
//! Features (all on by default): `sync` (the sync server, client and their tokio
//! transport), `text` (collaborative text fields, automerge), `cli` (the `fieldlog`
//! binary). `default-features = false` gives the embedded store alone.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

// Without `sync`, the hooks these modules keep for the sync server (conflict planning,
// reset steps, the served-store guard) have no caller; the modules marked below allow it.
mod backend;
mod changeset;
mod clock;
#[cfg_attr(not(feature = "sync"), allow(dead_code))]
pub mod conflict;
mod crdt;
mod digest;
mod error;
mod log;
mod merge;
mod pk;
#[cfg_attr(not(feature = "sync"), allow(dead_code))]
pub mod reset;
mod row;
pub mod rules;
mod schema;
mod serde_object;
mod snapshot;
#[cfg_attr(not(feature = "sync"), allow(dead_code))]
mod store;
#[cfg(feature = "sync")]
pub mod sync;
mod value;
#[cfg_attr(not(feature = "sync"), allow(dead_code))]
mod wal;

pub use changeset::{Changeset, ChangesetId};
pub use clock::{ManualTimeSource, ReplicaId, Stamp, SystemTimeSource, TimeSource};
pub use digest::Digest;
pub use error::{Error, NameKind, Result, StorageError, StorageErrorKind};
pub use log::{FieldWrite, LogEntry, LogPos, Op, Write};
pub use schema::{FieldSpec, FieldType, Schema};
pub use store::{
    Backup, Committed, Durability, ImportReport, Object, Options, Store, WriteTx,
    CACHE_BYTES_DEFAULT, FIELDS_PER_OBJECT_MAX_DEFAULT, KEEP_ACKNOWLEDGED_FOR_DEFAULT,
    RECOVERY_BACKOFF_MAX, RECOVER_AFTER_DEFAULT, VALUE_BYTES_MAX_DEFAULT,
};
pub use value::{Pk, Value, NAME_LEN_MAX};

/// The README's examples, compiled and run as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
