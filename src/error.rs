//! Errors. Every variant says what went wrong and where (collection, pk, field).
//!
//! The storage engine's own error types stay inside the store: it turns them into a
//! [`StorageError`] (in `store/storage_error.rs`), so this file and the public API name
//! none of them.

use std::fmt;

use crate::clock::Stamp;
use crate::pk::Pk;

/// Which kind of name failed validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameKind {
    /// A collection name.
    Collection,
    /// A field name.
    Field,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Collection => "collection",
            NameKind::Field => "field",
        })
    }
}

/// Everything that can go wrong in fieldlog.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The storage layer (the database engine or the file system under it) failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// An earlier I/O failure left the store in an unknown state. It refuses writes until it
    /// recovers by itself (see [`crate::Options::recover_after`]) or is reopened; transient.
    #[error(
        "an earlier storage failure poisoned this store; it recovers once storage works again"
    )]
    Poisoned,
    /// The store file holds bytes that do not decode as what they should be.
    #[error("store is corrupt: {what}")]
    Corrupt {
        /// What failed to decode.
        what: String,
    },
    /// A bug: an internal invariant did not hold. Report it.
    #[error("internal error (a bug): {what}")]
    Internal {
        /// What did not hold.
        what: String,
    },
    /// A collection or field name is not allowed.
    #[error("bad {kind} name {name:?}: {reason}")]
    BadName {
        /// Collection or field.
        kind: NameKind,
        /// The name (cut short if very long).
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// A primary key is not allowed.
    #[error("bad primary key {pk}: {reason}")]
    BadPk {
        /// The key.
        pk: Pk,
        /// Why it was refused.
        reason: String,
    },
    /// A value is larger than the store's limit.
    #[error("value of {collection}[{pk}].{field} is {size} bytes; the limit is {max}")]
    ValueTooLarge {
        /// Collection.
        collection: String,
        /// Primary key.
        pk: Pk,
        /// Field.
        field: String,
        /// The value's size in bytes.
        size: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// A commit would leave an object with more fields than the store's limit
    /// ([`crate::Options::fields_per_object_max`]); nothing of it was written.
    #[error("{collection}[{pk}] would hold {fields} fields; the limit is {max}")]
    TooManyFields {
        /// Collection.
        collection: String,
        /// Primary key.
        pk: Pk,
        /// The fields the object would hold.
        fields: usize,
        /// The limit.
        max: usize,
    },
    /// A write does not match the collection's schema.
    #[error("schema: {collection}[{pk}].{field}: expected {expected}, found {found}")]
    Schema {
        /// Collection.
        collection: String,
        /// Primary key.
        pk: Pk,
        /// Field.
        field: String,
        /// What the schema wants ("int", "a declared field", "a value for a required field").
        expected: String,
        /// What the write had.
        found: String,
    },
    /// The object already exists (insert of a live primary key).
    #[error("{collection}[{pk}] already exists")]
    AlreadyExists {
        /// Collection.
        collection: String,
        /// Primary key.
        pk: Pk,
    },
    /// The object does not exist (update or delete of a missing primary key).
    #[error("{collection}[{pk}] does not exist")]
    NotFound {
        /// Collection.
        collection: String,
        /// Primary key.
        pk: Pk,
    },
    /// A remote stamp is too far ahead of local time (a device with a wrong clock).
    #[error("stamp {stamp} is more than {max_drift_ms} ms ahead of local time {now_ms}")]
    ClockDrift {
        /// The stamp.
        stamp: Stamp,
        /// Local physical time.
        now_ms: u64,
        /// The configured bound.
        max_drift_ms: u64,
    },
    /// A changeset failed to decode or validate; nothing of it was applied.
    #[error("bad changeset: {reason}")]
    BadChangeset {
        /// What was wrong, with the entry or byte position where known.
        reason: String,
    },
    /// A Rust value could not be turned into an object, or an object into a Rust value.
    #[error("object conversion: {reason}")]
    Conversion {
        /// What was wrong.
        reason: String,
    },
    /// A query did not parse, check or bind.
    #[error("query: {0}")]
    Query(#[from] crate::rules::query_error::QueryError),
    /// The store is served by a sync server: a change written to it directly would never
    /// reach the clients. Nothing was written.
    #[error("this store is served by a SyncServer: use SyncServer::{through} so that clients receive the change")]
    ServedStore {
        /// The `SyncServer` method to use instead (`write`, `set_schema`).
        through: &'static str,
    },
    /// This build of fieldlog leaves out a feature the operation needs (such as `text`,
    /// for collaborative text fields); nothing was written.
    #[error("{what} needs the `{feature}` feature of fieldlog")]
    NeedsFeature {
        /// What needs it ("a text field").
        what: &'static str,
        /// The Cargo feature.
        feature: &'static str,
    },
    /// A file system operation outside the storage engine failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// What kind of failure a [`StorageError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageErrorKind {
    /// Reading or writing the file failed (or an earlier such failure left the database
    /// unusable until it is reopened).
    Io,
    /// The disk or the user's quota is full.
    Full,
    /// The file holds bytes the storage engine cannot read, or a format it cannot open.
    Corrupt,
    /// Another process holds the database open.
    InUse,
    /// Anything else the storage engine refused.
    Other,
}

impl fmt::Display for StorageErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StorageErrorKind::Io => "io",
            StorageErrorKind::Full => "full",
            StorageErrorKind::Corrupt => "corrupt",
            StorageErrorKind::InUse => "in use",
            StorageErrorKind::Other => "other",
        })
    }
}

/// A failure of the storage layer: its kind and the storage engine's message. The engine's
/// own error is kept as the [`source`](std::error::Error::source).
#[derive(Debug)]
pub struct StorageError {
    kind: StorageErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl StorageError {
    /// A storage error of `kind` caused by `source`, whose text is the message.
    pub(crate) fn new<E>(kind: StorageErrorKind, source: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        StorageError {
            kind,
            message: source.to_string(),
            source: Some(Box::new(source)),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> StorageErrorKind {
        self.kind
    }

    /// The storage engine's description of it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Shorthand for results in fieldlog.
pub type Result<T, E = Error> = std::result::Result<T, E>;
