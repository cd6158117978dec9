//! The server's settings: the token secret, batch sizes, conflict policies, rules and the
//! limits on what peers can make it hold.

use std::sync::Arc;

use crate::conflict::{ConflictRecord, Policies};
use crate::rules::Rules;
use crate::sync::token::Secret;

/// A callback that sees every conflict the server records.
pub type ConflictObserver = Arc<dyn Fn(&ConflictRecord) + Send + Sync>;

/// Server settings.
#[derive(Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// The key tokens are signed with.
    pub secret: Secret,
    /// Target size of one download or upload message's changes, in bytes.
    pub batch_bytes: usize,
    /// How conflicts are resolved, per collection and kind.
    pub conflicts: Policies,
    /// Called with every conflict after it is recorded.
    pub on_conflict: Option<ConflictObserver>,
    /// Who may read and write what (`None`: every user may read and write everything).
    pub rules: Option<Arc<Rules>>,
    /// Bounds on connections, deadlines and buffered bytes.
    pub limits: Limits,
}

/// Bounds on what peers can make the server hold or wait for: connections, deadlines and
/// buffered bytes. Honest clients stay far below every one of them; a slow, idle or hostile
/// peer meets them and is refused, throttled or disconnected. Worst-case buffer memory is
/// `server_buffer_bytes_max + connections_max × hello_frame_bytes_max +
/// server_transaction_bytes_max`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Connections open at once; one more is refused at accept with a `Busy` error and
    /// closed (default 1,000: below the usual open-file limit of 1,024).
    pub connections_max: usize,
    /// Time from accept until the handshake's `Hello` has arrived, in milliseconds; then
    /// the connection is closed (default 10,000).
    pub handshake_timeout_ms: u64,
    /// Time a session may go without a complete message from its client, and time one
    /// reply may take to be written, in milliseconds; then the connection is closed
    /// (default 60,000). Clients send a `Ping` after 15 s without sending anything.
    pub idle_timeout_ms: u64,
    /// Largest frame body read before the handshake, in bytes (default 64 KiB): an
    /// unauthenticated peer cannot make the server hold more. It is also every
    /// connection's allowance of buffered bytes outside `server_buffer_bytes_max`, so
    /// small messages always flow.
    pub hello_frame_bytes_max: usize,
    /// Largest frame body read after the handshake, in bytes (default 16 MiB).
    pub frame_bytes_max: usize,
    /// Bytes of frames one connection may have read and not yet handled, in bytes
    /// (default 32 MiB, and never below `frame_bytes_max`); past it the server stops
    /// reading that connection until it catches up.
    pub connection_buffer_bytes_max: usize,
    /// Bytes of frames all connections together may have read and not yet handled, beyond
    /// each connection's `hello_frame_bytes_max` allowance (default 256 MiB); past it,
    /// connections wait before reading more.
    pub server_buffer_bytes_max: usize,
    /// Bytes of one upload transaction sent in pieces (as estimated by the sender's
    /// splitter), in bytes (default 256 MiB); a larger one is refused with
    /// `LimitExceeded`.
    pub transaction_bytes_max: usize,
    /// Bytes of unfinished upload transactions all connections together may hold, in bytes
    /// (default 512 MiB); past it, the upload's session ends with `Busy` and its client
    /// retries after a backoff.
    pub server_transaction_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_max: 1_000,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            hello_frame_bytes_max: 64 << 10,
            frame_bytes_max: crate::sync::frame::FRAME_LEN_MAX_DEFAULT,
            connection_buffer_bytes_max: 32 << 20,
            server_buffer_bytes_max: 256 << 20,
            transaction_bytes_max: 256 << 20,
            server_transaction_bytes_max: 512 << 20,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("batch_bytes", &self.batch_bytes)
            .field("conflicts", &self.conflicts)
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    /// Defaults with this secret.
    pub fn new(secret: Secret) -> Self {
        ServerConfig {
            secret,
            batch_bytes: 1 << 20,
            conflicts: Policies::default(),
            on_conflict: None,
            rules: None,
            limits: Limits::default(),
        }
    }
}
