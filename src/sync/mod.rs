//! Sync: a server that accepts uploads and serves downloads, and a client that keeps a
//! store in step with it. `protocol`, `server`, `client`, `pieces` and `frame` are sans-IO
//! logic; `net` (the transport: tasks, sockets, timers, and frames read from and written to
//! streams) is the only module that knows tokio, and `frame` the only one that knows how
//! messages become bytes.

pub mod client;
pub mod frame;
pub mod net;
pub mod pair;
pub mod pieces;
pub mod protocol;
pub mod server;
pub(crate) mod stored;
pub mod token;
pub(crate) mod view;
