//! The sync server's logic, free of sockets and timers: a [`SyncServer`] owns the server's
//! store and its history; a [`ServerSession`] per connection turns client messages into
//! server messages.
//!
//! Rooms: `config` (settings and limits), `state` (the shared server state and applying an
//! upload), `session` (one connection's state machine), `enforce` (the rules' judgement of
//! uploaded writes), `resolve` (conflict resolution against the server's store).

mod config;
mod enforce;
mod resolve;
mod session;
mod state;
#[cfg(test)]
mod tests;

pub use config::{ConflictObserver, Limits, ServerConfig};
pub use resolve::conflicts_in;
pub use session::ServerSession;
pub use state::{RefusalCounts, SyncServer};
