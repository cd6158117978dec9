//! Raw protocol connections, driven frame by frame (a hostile or hand-driven client), with
//! tokens and log entries built by hand.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fieldlog::sync::frame::{FrameError, FRAME_LEN_MAX_DEFAULT};
use fieldlog::sync::net::{read_frame, write_frame};
use fieldlog::sync::protocol::{ClientMsg, ErrorCode, ServerMsg, PROTOCOL_VERSION};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{Changeset, LogEntry, Op, Pk, ReplicaId, Stamp, Value, Write};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// How long a test waits for the server before it fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// A token for `user` that does not expire.
pub fn token_for(secret: &Secret, user: &str) -> String {
    let claims = Claims {
        user_id: user.into(),
        expires_at_ms: u64::MAX,
        extra: Default::default(),
    };
    token::issue(secret, &claims).expect("token")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// A first `Hello` of a client with nothing synced.
pub fn hello(token: &str, replica: ReplicaId) -> ClientMsg {
    ClientMsg::Hello {
        protocol: PROTOCOL_VERSION,
        schema_version: 0,
        token: token.to_owned(),
        replica,
        download_cursor: 0,
        last_sync: 0,
        reset_pending: false,
        reset_settled: None,
        subscriptions: None,
        subscriptions_acked: 0,
    }
}

/// A log entry of `replica` at `seq`, stamped now.
pub fn entry(seq: u64, replica: ReplicaId, writes: Vec<Write>) -> LogEntry {
    LogEntry {
        seq,
        stamp: Stamp {
            time: now_ms() << 16,
            replica,
        },
        writes,
    }
}

/// An insert of `fields` into `coll[pk]`.
pub fn insert(coll: &str, pk: i64, fields: Vec<(&str, Value)>) -> Write {
    Write {
        collection: coll.into(),
        pk: Pk::Int(pk),
        op: Op::Insert {
            fields: fields.into_iter().map(|(f, v)| (f.to_owned(), v)).collect(),
        },
    }
}

/// An upload of whole entries.
pub fn upload(replica: ReplicaId, entries: Vec<LogEntry>) -> ClientMsg {
    ClientMsg::Upload {
        changeset: Changeset {
            origin: replica,
            entries,
        },
        more: false,
    }
}

/// A protocol connection driven by hand, frame by frame.
pub struct Raw(TcpStream);

impl Raw {
    /// Connects to `addr`.
    pub async fn connect(addr: &str) -> Raw {
        let s = timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect in time")
            .expect("connect");
        Raw(s)
    }

    /// Sends one message (errors ignored: the server may have closed).
    pub async fn send(&mut self, msg: &ClientMsg) {
        let _ = write_frame(&mut self.0, msg, FRAME_LEN_MAX_DEFAULT).await;
    }

    /// The next message, `None` once the server has closed.
    pub async fn next(&mut self) -> Option<ServerMsg> {
        match timeout(
            WAIT,
            read_frame::<ServerMsg, _>(&mut self.0, FRAME_LEN_MAX_DEFAULT),
        )
        .await
        .expect("the server answers or closes in time")
        {
            Ok(m) => m,
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("bad frame from the server: {e}"),
        }
    }

    /// The next message that is not a download (which the server pushes on its own).
    pub async fn next_skipping_downloads(&mut self) -> Option<ServerMsg> {
        loop {
            match self.next().await {
                Some(ServerMsg::Download { .. } | ServerMsg::ViewDownload { .. }) => {}
                other => return other,
            }
        }
    }

    /// Expects `Error { code: want }` as the next message (downloads skipped), then the
    /// connection closed; returns the error's message.
    pub async fn expect_error(&mut self, want: ErrorCode) -> String {
        let message = match self.next_skipping_downloads().await {
            Some(ServerMsg::Error { code, message }) if code == want => message,
            other => panic!("expected Error {want:?}, got {other:?}"),
        };
        assert_eq!(
            self.next_skipping_downloads().await,
            None,
            "closed after the error"
        );
        message
    }

    /// Handshakes as `replica` with `token`; returns the Welcome's `uploaded`.
    pub async fn handshake(addr: &str, token: &str, replica: ReplicaId) -> (Raw, u64) {
        let mut raw = Raw::connect(addr).await;
        raw.send(&hello(token, replica)).await;
        loop {
            match raw.next().await {
                Some(ServerMsg::Welcome { uploaded, .. }) => return (raw, uploaded),
                Some(ServerMsg::CompensatingWrite { .. }) => {}
                other => panic!("expected Welcome, got {other:?}"),
            }
        }
    }
}
