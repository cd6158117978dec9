//! Sync: a server that accepts uploads and serves downloads, and a client that keeps a
//! store in step with it. `protocol`, `server`, `client` and `pieces` are sans-IO logic;
//! `net` is the only module that knows tokio and sockets, and `frame` the only one that
//! knows how messages become bytes.

pub mod client;
pub mod frame;
pub mod net;
pub mod pair;
pub(crate) mod pieces;
pub mod protocol;
pub mod server;
pub(crate) mod stored;
pub mod token;
pub(crate) mod view;
