//! Sync messages. Only `frame` knows how they travel; this module says what they mean.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::changeset::Changeset;
use crate::clock::ReplicaId;
use crate::log::LogPos;
use crate::reset::{ObjectSnapshot, ResetReason};
use crate::schema::Schema;
use crate::value::{Pk, Value};

/// The protocol version this build speaks; a handshake with another is refused.
pub const PROTOCOL_VERSION: u32 = 3;

/// A position in the server's history: it counts every change the server has accepted.
pub type ServerVersion = u64;

/// Error codes carried by [`ServerMsg::Error`]. Numbers are stable on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A frame failed to decode or check (100).
    BadFrame,
    /// A message arrived that the session did not expect in its state (101).
    UnexpectedMessage,
    /// Protocol versions differ (102).
    ProtocolVersion,
    /// Schema versions differ (103).
    SchemaVersion,
    /// The token is missing, malformed or badly signed (104).
    Unauthorized,
    /// The token has expired (105).
    TokenExpired,
    /// An uploaded changeset was refused as bad input (106).
    BadChangeset,
    /// The device (replica id) is registered to another user (107).
    DeviceNotOwned,
    /// A server limit was passed (a transaction larger than the server takes); retrying
    /// the same cannot help (108).
    LimitExceeded,
    /// The server cannot continue this client's history; it must reset (211).
    ClientReset,
    /// The server refused some writes and reverted them (231).
    CompensatingWrite,
    /// The server failed; try again later (500).
    Internal,
    /// The server is at a limit of its own (connections, buffered transactions); try again
    /// later (503).
    Busy,
}

impl ErrorCode {
    /// The numeric code.
    pub fn number(self) -> u16 {
        match self {
            ErrorCode::BadFrame => 100,
            ErrorCode::UnexpectedMessage => 101,
            ErrorCode::ProtocolVersion => 102,
            ErrorCode::SchemaVersion => 103,
            ErrorCode::Unauthorized => 104,
            ErrorCode::TokenExpired => 105,
            ErrorCode::BadChangeset => 106,
            ErrorCode::DeviceNotOwned => 107,
            ErrorCode::LimitExceeded => 108,
            ErrorCode::ClientReset => 211,
            ErrorCode::CompensatingWrite => 231,
            ErrorCode::Internal => 500,
            ErrorCode::Busy => 503,
        }
    }

    /// Whether the client may reconnect and carry on (as opposed to needing a fix).
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorCode::Internal | ErrorCode::BadFrame | ErrorCode::Busy
        )
    }
}

/// A named subscription: a query over one collection, with values for its positional
/// parameters.
///
/// ```
/// use fieldlog::sync::protocol::Subscription;
/// let near = Subscription::new("near", "Trip", "miles <= $0 AND ownerId == $user").arg(25);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Subscription {
    /// The name the application gave it.
    pub name: String,
    /// The collection it selects from.
    pub collection: String,
    /// The query (see `rules::query`); `$0`, `$1`, … are `params`, `$user` is the user's
    /// id.
    pub query: String,
    /// The values of `$0`, `$1`, … in order. Values the query does not use are ignored; a
    /// parameter without a value makes the server refuse the set.
    pub params: Vec<Value>,
}

impl Subscription {
    /// A subscription without parameter values.
    pub fn new(
        name: impl Into<String>,
        collection: impl Into<String>,
        query: impl Into<String>,
    ) -> Self {
        Subscription {
            name: name.into(),
            collection: collection.into(),
            query: query.into(),
            params: Vec::new(),
        }
    }

    /// Adds the value of the next positional parameter (`$0` first).
    pub fn arg(mut self, value: impl Into<Value>) -> Self {
        self.params.push(value.into());
        self
    }
}

/// A client's whole subscription set, versioned: every change raises the version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionSet {
    /// Raised by every change.
    pub version: u64,
    /// The subscriptions.
    pub subscriptions: Vec<Subscription>,
}

/// A write the server refused and reverted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RefusedWrite {
    /// Object type (collection).
    pub collection: String,
    /// Primary key.
    pub pk: Pk,
    /// The error code: [`ErrorCode::CompensatingWrite`] (231).
    pub code: ErrorCode,
    /// Why, in Atlas Device Sync's words: `write to "PK" in table "Item" not allowed`
    /// (refused by the user's role), `write to "PK" in table "Item" not allowed; object is
    /// outside of the current query view` (refused by the subscriptions). The key is written
    /// as Atlas writes it: `7`, `"a2"`, `ObjectID("…")`, `UUID(…)`.
    pub reason: String,
    /// Which check refused it, when the server knows more than `reason` says: `denied by
    /// write filter in role "NAME" (object after the insert)`, `update denied: field
    /// "salary" is not writable in role "NAME"`.
    pub detail: Option<String>,
    /// What the write was: the fields and values it set (empty for a delete).
    pub fields: Vec<(String, Value)>,
    /// Whether it was a delete.
    pub delete: bool,
    /// The write's stamp.
    pub stamp: crate::clock::Stamp,
}

impl fmt::Display for RefusedWrite {
    /// `reason`, then `: detail` when there is one.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)?;
        match &self.detail {
            Some(d) => write!(f, ": {d}"),
            None => Ok(()),
        }
    }
}

/// Client to server.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// The first message on a connection.
    Hello {
        /// [`PROTOCOL_VERSION`].
        protocol: u32,
        /// The client's schema version (0 when it has none).
        schema_version: u64,
        /// The signed token naming the user.
        token: String,
        /// The client's replica id.
        replica: ReplicaId,
        /// The last server version the client has applied.
        download_cursor: ServerVersion,
        /// The highest log position the server has acknowledged to this client.
        last_sync: LogPos,
        /// A reset was under way when the client last stopped; it wants the snapshot again.
        reset_pending: bool,
        /// A reset swapped its snapshot in but has not finished: the log position it
        /// settled (see [`ClientMsg::SnapshotAck`]).
        reset_settled: Option<LogPos>,
        /// The client's subscriptions (`None`: everything the user may read).
        subscriptions: Option<SubscriptionSet>,
        /// The newest subscription version the server confirmed to this client.
        subscriptions_acked: u64,
    },
    /// The client changed its subscriptions.
    Subscribe {
        /// The new set.
        set: SubscriptionSet,
    },
    /// Log entries after the client's last acknowledged position. When `more` is set, the
    /// last entry is a piece of a transaction that continues in the next upload (a
    /// transaction too large for one frame); the server applies it when the last piece
    /// arrives, so other clients see it whole.
    Upload {
        /// The entries (with the client's log positions as `seq`).
        changeset: Changeset,
        /// The last entry continues in the next message.
        more: bool,
    },
    /// The client applied downloads up to `cursor` (lets the server send more).
    DownloadAck {
        /// The client's persisted download cursor.
        cursor: ServerVersion,
    },
    /// The client staged a snapshot chunk (lets the server send more). After the last one
    /// it carries the log position the reset settled: entries up to it were replayed
    /// (recovered ones re-appended after it) and never need uploading.
    SnapshotAck {
        /// Set on the acknowledgement of the last chunk.
        settled: Option<LogPos>,
    },
    /// Asks for the server's current version (answered by [`ServerMsg::Pong`]).
    Ping {
        /// Echoed back.
        id: u64,
    },
}

/// What closes a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotEnd {
    /// The server version the snapshot is at least as new as; downloads continue after it.
    pub cursor: ServerVersion,
    /// The server's schema version.
    pub schema_version: u64,
    /// The server's schemas.
    pub schemas: Vec<Schema>,
    /// The subscription version this snapshot is the view of, if it was a view change.
    pub subscriptions: Option<u64>,
}

/// Server to client.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// The handshake succeeded.
    Welcome {
        /// The server's replica id.
        server: ReplicaId,
        /// The server's newest version.
        server_version: ServerVersion,
        /// The highest log position of this client the server has applied; the client
        /// resumes its upload after it.
        uploaded: LogPos,
        /// The server's schema version.
        schema_version: u64,
        /// The server's schemas, when the client's version is older (an additive change).
        schemas: Vec<Schema>,
    },
    /// The server cannot continue this client's history: a client reset follows, and the
    /// server's state arrives as [`ServerMsg::Snapshot`] chunks.
    ResetRequired {
        /// Why.
        reason: ResetReason,
        /// The highest log position of this client the server has applied.
        uploaded: LogPos,
        /// The server's schemas as of the snapshot (its end carries the same ones): they
        /// decide which unsynced writes the reset keeps, so the client can replay them onto
        /// each chunk as it arrives.
        schemas: Vec<Schema>,
    },
    /// Changes for a client with a filtered view (rules or subscriptions): the current state
    /// of each changed object it may see, and the objects that left its view (removed
    /// locally; not deletes). After applying, the client's cursor is `cursor`.
    ViewDownload {
        /// Objects, whole.
        objects: Vec<ObjectSnapshot>,
        /// Objects that are no longer in the view.
        removed: Vec<(String, Pk)>,
        /// The client's download cursor once this is applied.
        cursor: ServerVersion,
    },
    /// The server refused some of the client's writes and reverted them with writes of
    /// its own (error code 231); the client keeps the refused values for the application.
    CompensatingWrite {
        /// Each refused write.
        refused: Vec<RefusedWrite>,
    },
    /// A subscription set was refused (a query that does not parse or uses a field that
    /// is not queryable); the previous set stays.
    SubscriptionError {
        /// The refused version.
        version: u64,
        /// Why.
        message: String,
    },
    /// A chunk of the server's state during a reset; the last one has `end`.
    Snapshot {
        /// Objects, tombstones included, with every field's stamp.
        objects: Vec<ObjectSnapshot>,
        /// Present on the last chunk.
        end: Option<SnapshotEnd>,
    },
    /// Uploads up to `seq` are applied and durable on the server.
    UploadAck {
        /// The client's log position now applied.
        seq: LogPos,
        /// The server version after applying it.
        server_version: ServerVersion,
    },
    /// Changes from other replicas. Each entry's `seq` is its server version. After
    /// applying it (all pieces, when `more` is set), the client's cursor is `cursor`.
    Download {
        /// The changes.
        changeset: Changeset,
        /// The last entry continues in the next download.
        more: bool,
        /// The client's download cursor once this is applied.
        cursor: ServerVersion,
    },
    /// Answer to [`ClientMsg::Ping`].
    Pong {
        /// The ping's id.
        id: u64,
        /// The server's newest version.
        server_version: ServerVersion,
    },
    /// Something went wrong; the server closes the connection after sending it.
    Error {
        /// What kind of error.
        code: ErrorCode,
        /// A human-readable explanation.
        message: String,
    },
}

impl ClientMsg {
    /// The message's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMsg::Hello { .. } => "Hello",
            ClientMsg::Subscribe { .. } => "Subscribe",
            ClientMsg::Upload { .. } => "Upload",
            ClientMsg::DownloadAck { .. } => "DownloadAck",
            ClientMsg::SnapshotAck { .. } => "SnapshotAck",
            ClientMsg::Ping { .. } => "Ping",
        }
    }
}

impl ServerMsg {
    /// The message's name, for logs and errors (the last chunk of a snapshot is
    /// `SnapshotEnd`).
    pub fn kind(&self) -> &'static str {
        match self {
            ServerMsg::Welcome { .. } => "Welcome",
            ServerMsg::ResetRequired { .. } => "ResetRequired",
            ServerMsg::ViewDownload { .. } => "ViewDownload",
            ServerMsg::CompensatingWrite { .. } => "CompensatingWrite",
            ServerMsg::SubscriptionError { .. } => "SubscriptionError",
            ServerMsg::Snapshot { end: Some(_), .. } => "SnapshotEnd",
            ServerMsg::Snapshot { .. } => "Snapshot",
            ServerMsg::UploadAck { .. } => "UploadAck",
            ServerMsg::Download { .. } => "Download",
            ServerMsg::Pong { .. } => "Pong",
            ServerMsg::Error { .. } => "Error",
        }
    }
}
