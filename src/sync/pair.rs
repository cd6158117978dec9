//! A server session and a client session joined in one thread, without sockets: each
//! message one side returns is handed straight to the other. For tests, examples and
//! benchmarks that want the protocol without a network, and for embedders that move
//! messages themselves.

use std::sync::Arc;

use crate::store::Store;
use crate::sync::client::{ClientConfig, ClientSession, SyncError};
use crate::sync::protocol::{ClientMsg, ServerMsg};
use crate::sync::server::{ServerSession, SyncServer};

/// A client session connected to a server session in the same thread.
#[derive(Debug)]
pub struct SessionPair {
    /// The server's side of the connection.
    pub server: ServerSession,
    /// The client's side of the connection.
    pub client: ClientSession,
    /// The time the server session is told it is, in milliseconds since the epoch: it
    /// judges token expiry by it.
    pub now_ms: u64,
}

impl SessionPair {
    /// Opens a session of `store` on `server` and runs the handshake (and whatever the
    /// server sends after it) until both sides are quiet. `now_ms` is the time the server
    /// judges the token's expiry by.
    pub fn connect(
        server: &Arc<SyncServer>,
        store: &Arc<Store>,
        config: ClientConfig,
        now_ms: u64,
    ) -> Result<SessionPair, SyncError> {
        let mut pair = SessionPair {
            server: server.session(),
            client: ClientSession::new(Arc::clone(store), config),
            now_ms,
        };
        let hello = pair.client.hello()?;
        pair.exchange(vec![hello], Vec::new())?;
        Ok(pair)
    }

    /// Moves messages between the two sessions until neither has anything to say: the
    /// client's unsynced writes are uploaded and acknowledged, and the server's changes
    /// downloaded. An error the server sends ends it as the client's error.
    pub fn pump(&mut self) -> Result<(), SyncError> {
        self.exchange(Vec::new(), Vec::new())
    }

    fn exchange(
        &mut self,
        mut to_server: Vec<ClientMsg>,
        mut to_client: Vec<ServerMsg>,
    ) -> Result<(), SyncError> {
        loop {
            while let Some(m) = self.client.poll_upload()? {
                to_server.push(m);
            }
            to_client.extend(self.server.poll_download());
            if to_server.is_empty() && to_client.is_empty() {
                return Ok(());
            }
            for m in std::mem::take(&mut to_server) {
                to_client.extend(self.server.on_message(m, self.now_ms));
            }
            for m in std::mem::take(&mut to_client) {
                to_server.extend(self.client.on_message(m)?);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::server::ServerConfig;
    use crate::sync::token::{self, Claims, Secret};
    use crate::value::Value;

    #[test]
    fn a_pair_syncs_both_ways_and_a_bad_token_is_the_clients_error() {
        let secret = Secret::generate();
        let server_store = Arc::new(Store::open_in_memory().unwrap());
        let server =
            Arc::new(SyncServer::open(server_store, ServerConfig::new(secret.clone())).unwrap());
        let claims = Claims {
            user_id: "u".into(),
            expires_at_ms: u64::MAX,
            extra: Default::default(),
        };
        let token = token::issue(&secret, &claims).unwrap();
        let (a, b) = (
            Arc::new(Store::open_in_memory().unwrap()),
            Arc::new(Store::open_in_memory().unwrap()),
        );
        a.write(|tx| tx.insert("Dog", 1, [("name", Value::from("Rex"))]))
            .unwrap();
        let mut pa =
            SessionPair::connect(&server, &a, ClientConfig::new(token.clone()), 0).unwrap();
        let mut pb = SessionPair::connect(&server, &b, ClientConfig::new(token), 0).unwrap();
        pa.pump().unwrap();
        pb.pump().unwrap();
        assert_eq!(a.last_sync(), a.log_head());
        assert_eq!(b.digest(), a.digest());

        let forged = ClientConfig::new("not a token");
        let err = SessionPair::connect(&server, &a, forged, 0).unwrap_err();
        assert!(
            matches!(err, SyncError::Server { .. }),
            "the server's refusal comes back as the client's error: {err}"
        );
    }
}
