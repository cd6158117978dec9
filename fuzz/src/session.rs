//! `server_session`: a sync server fed client messages from the input (invariants 1, 5, 6).
//!
//! A `SyncServer` on an in-memory store, with or without permission rules (users `u` and
//! `other` own their `Item`s; everyone reads `Dog`s), with up to three sessions. Each step
//! sends one message to one session — a handshake (with or without subscriptions), an
//! upload, a subscription change, an acknowledgement, a ping (built from the input with a
//! valid or broken token, stamps and sequence numbers near the real ones), or any
//! `ClientMsg` postcard-decoded from the input — or polls downloads, reports a bad frame,
//! moves time, or acts on the server (a server write, history compaction, a forced reset).
//! What must hold:
//! - no panic; errors come back as `ServerMsg::Error` with a protocol code, never
//!   `Internal` (an in-memory store does not fail), and close the session, which then
//!   answers nothing;
//! - the state digest changes only when the answer includes an `UploadAck` (or the step was
//!   a server write); an acknowledged upload sent again changes nothing; the acknowledged
//!   position is what the server then reports for the client;
//! - the server version never goes down;
//! - no session is ever sent a live object its user may not read (rules evaluated on the
//!   server's state at that moment);
//! - at the end a fresh client syncing with the server holds exactly the objects its user
//!   may read (without rules: it reaches the server's digest).

use std::sync::{Arc, OnceLock};

use fieldlog::rules::{Rules, User};
use fieldlog::sync::client::{ClientConfig, ClientSession};
use fieldlog::sync::protocol::{
    ClientMsg, ErrorCode, ServerMsg, Subscription, SubscriptionSet, PROTOCOL_VERSION,
};
use fieldlog::sync::server::{ServerConfig, ServerSession, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{
    Changeset, FieldWrite, LogEntry, ManualTimeSource, Op, Options, ReplicaId, Store, Value, Write,
};

use super::input::Input;

const T0_MS: u64 = 1_700_000_000_000;
const STEPS_MAX: usize = 48;
const SESSIONS_MAX: usize = 3;
/// Client replicas the input chooses from (the server's own id is added at run time).
const REPLICAS: [u64; 3] = [0x11, 0x22, 0x33];
const COLLS: [&str; 3] = ["Item", "Dog", "bad name"];
const FIELDS: [&str; 5] = ["name", "n", "ownerId", "__c.n.0000000000000011", "_id"];
const USERS: [&str; 2] = ["u", "other"];
const QUERIES: [&str; 8] = [
    "TRUEPREDICATE",
    "n > $0 OR name == $1",
    "n > 1",
    "ownerId == $user",
    "name BEGINSWITH 'a'",
    "NOT (n == null)",
    "n ==",
    "_id < 3",
];
const RULES: &str = r#"{
  "rules": { "Item": [ { "name": "owner", "apply_when": {},
      "document_filters": { "read": { "ownerId": "%%user.id" }, "write": { "ownerId": "%%user.id" } },
      "read": true, "write": true, "insert": true, "delete": true } ] },
  "defaultRoles": [ { "name": "readAll", "apply_when": {},
      "document_filters": { "read": true, "write": false }, "read": true, "write": false } ]
}"#;

fn secret() -> Secret {
    Secret::from_hex(&"ab".repeat(32)).expect("secret")
}

fn token_until(expires_at_ms: u64, user: &str) -> String {
    let claims = Claims {
        user_id: user.into(),
        expires_at_ms,
        extra: Default::default(),
    };
    token::issue(&secret(), &claims).expect("token")
}

/// A real client's Hello, to start from (so the message has every field the protocol has).
fn hello_template() -> &'static ClientMsg {
    static TEMPLATE: OnceLock<ClientMsg> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let store = Arc::new(Store::open_in_memory().expect("store"));
        let mut client = ClientSession::new(store, ClientConfig::new(token_until(u64::MAX, "u")));
        client.hello().expect("hello")
    })
}

struct Conn {
    session: ServerSession,
    replica: ReplicaId,
    version: u64,
    next_seq: u64,
    last_upload: Option<ClientMsg>,
}

struct Harness {
    time: ManualTimeSource,
    server: Arc<SyncServer>,
    rules: Option<Arc<Rules>>,
    conns: Vec<Conn>,
    version: u64,
}

/// Runs the session checks on `data`.
pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let time = ManualTimeSource::new(T0_MS);
    let options = Options::default().time(Arc::new(time.clone()));
    let store = Arc::new(
        Store::open_backend(redb::backends::InMemoryBackend::new(), options).expect("store"),
    );
    let rules = input
        .bool()
        .then(|| Arc::new(Rules::load(RULES).expect("rules")));
    let mut config = ServerConfig::new(secret());
    config.rules = rules.clone();
    config.batch_bytes = 256;
    let server = Arc::new(SyncServer::open(store, config).expect("server"));
    server
        .write(|tx| {
            tx.insert(
                "Item",
                1,
                [
                    ("name", Value::from("seed")),
                    ("n", Value::from(1)),
                    ("ownerId", Value::from("u")),
                ],
            )?;
            tx.insert("Item", 2, [("name", "b"), ("ownerId", "other")])?;
            tx.insert("Dog", "rex", [("name", Value::from("Rex"))])
        })
        .expect("seed write");
    let mut h = Harness {
        time,
        rules,
        version: server.version(),
        server,
        conns: Vec::new(),
    };
    h.connect();
    let mut steps = 0;
    while !input.is_empty() && steps < STEPS_MAX {
        steps += 1;
        h.step(&mut input);
    }
    h.fresh_client_converges();
}

impl Harness {
    fn now(&self) -> u64 {
        use fieldlog::TimeSource;
        self.time.now_ms()
    }

    fn connect(&mut self) {
        if self.conns.len() < SESSIONS_MAX {
            self.conns.push(Conn {
                session: self.server.session(),
                replica: ReplicaId(REPLICAS[self.conns.len()]),
                version: 0,
                next_seq: 1,
                last_upload: None,
            });
        }
    }

    fn step(&mut self, input: &mut Input<'_>) {
        let c = input.below(self.conns.len());
        let kind = input.u8() % 16;
        if super::tracing() {
            eprintln!("step: session {c} kind {kind}");
        }
        match kind {
            0 => self.connect(),
            1 | 2 => {
                let msg = self.hello(c, input);
                self.send(c, msg, false);
            }
            3..=6 => {
                let msg = self.upload(c, input);
                // Only an upload the server took (acknowledged) must be a no-op the second
                // time: one sent during a reset is dropped, to be replayed after it.
                if self.send(c, msg.clone(), false) {
                    self.conns[c].last_upload = Some(msg);
                }
            }
            7 => {
                let cursor = u64::from(input.u8() % 8);
                self.send(c, ClientMsg::DownloadAck { cursor }, false);
            }
            8 => {
                let settled = input.bool().then(|| u64::from(input.u8() % 8));
                self.send(c, ClientMsg::SnapshotAck { settled }, false);
            }
            9 => {
                let id = input.u64();
                self.send(c, ClientMsg::Ping { id }, false);
            }
            10 => {
                let bytes = input.bytes(128);
                if let Ok(msg) = postcard::from_bytes::<ClientMsg>(bytes) {
                    self.send(c, msg, false);
                }
            }
            11 => {
                for _ in 0..8 {
                    let out = self.conns[c].session.poll_download();
                    if out.is_empty() {
                        break;
                    }
                    self.check_out(c, &out);
                }
            }
            12 => {
                let was_closed = self.conns[c].session.is_closed();
                let out = self.conns[c].session.on_bad_frame("fuzz");
                assert!(self.conns[c].session.is_closed());
                if !was_closed {
                    assert!(matches!(
                        out.as_slice(),
                        [ServerMsg::Error {
                            code: ErrorCode::BadFrame,
                            ..
                        }]
                    ));
                }
            }
            13 => {
                if input.bool() {
                    self.time.advance(u64::from(input.u16()) * 16);
                } else {
                    let set = self.subscription_set(c, input);
                    self.send(c, ClientMsg::Subscribe { set }, false);
                }
            }
            14 => self.server_op(input),
            _ => {
                if let Some(msg) = self.conns[c].last_upload.clone() {
                    self.send(c, msg, true);
                }
            }
        }
        let v = self.server.version();
        assert!(
            v >= self.version,
            "server version went back from {} to {v}",
            self.version
        );
        self.version = v;
    }

    fn hello(&mut self, c: usize, input: &mut Input<'_>) -> ClientMsg {
        let now = self.now();
        let mut msg = hello_template().clone();
        let server_replica = self.server.store().replica_id();
        let conn = &mut self.conns[c];
        if let ClientMsg::Hello {
            protocol,
            schema_version,
            token,
            replica,
            download_cursor,
            last_sync,
            reset_pending,
            reset_settled,
            ..
        } = &mut msg
        {
            if input.one_in(16) {
                *protocol = PROTOCOL_VERSION + 1;
            }
            if input.one_in(8) {
                *schema_version = u64::from(input.u8() % 3);
            }
            *token = match input.u8() % 8 {
                0 => token_until(now, "u"),
                1 => input.text(40),
                2 => token_until(u64::MAX, "u").replacen('0', "1", 1),
                3 | 4 => token_until(u64::MAX, USERS[1]),
                _ => token_until(now + 3_600_000, USERS[0]),
            };
            conn.replica = match input.u8() % 8 {
                0 => server_replica,
                1 => ReplicaId(input.u64()),
                _ => ReplicaId(*input.choose(&REPLICAS)),
            };
            *replica = conn.replica;
            *download_cursor = if input.one_in(4) {
                input.u64()
            } else {
                u64::from(input.u8() % 8)
            };
            *last_sync = if input.one_in(4) {
                input.u64()
            } else {
                u64::from(input.u8() % 8)
            };
            *reset_pending = input.one_in(8);
            *reset_settled = input.one_in(8).then(|| u64::from(input.u8() % 8));
            conn.next_seq = (*last_sync).min(1 << 32) + 1;
        }
        if input.bool() {
            let set = self.subscription_set(c, input);
            if let ClientMsg::Hello {
                subscriptions,
                subscriptions_acked,
                ..
            } = &mut msg
            {
                *subscriptions_acked = set.version.saturating_sub(u64::from(input.u8() % 2));
                *subscriptions = Some(set);
            }
        }
        msg
    }

    fn subscription_set(&mut self, c: usize, input: &mut Input<'_>) -> SubscriptionSet {
        let conn = &mut self.conns[c];
        conn.version += 1;
        let version = if input.one_in(8) {
            input.u64()
        } else {
            conn.version
        };
        let subscriptions = (0..input.below(3))
            .map(|i| {
                let collection = *input.choose(&COLLS);
                let query = if input.one_in(8) {
                    input.text(24)
                } else {
                    (*input.choose(&QUERIES)).to_owned()
                };
                let mut s = Subscription::new(format!("s{i}"), collection, query);
                for _ in 0..input.below(3) {
                    s = s.arg(input.value());
                }
                s
            })
            .collect();
        SubscriptionSet {
            version,
            subscriptions,
        }
    }

    fn upload(&mut self, c: usize, input: &mut Input<'_>) -> ClientMsg {
        let now = self.now();
        let conn = &mut self.conns[c];
        let origin = if input.one_in(8) {
            ReplicaId(input.u64())
        } else {
            conn.replica
        };
        let mut entries = Vec::new();
        for _ in 0..1 + input.below(3) {
            let seq = if input.one_in(8) {
                u64::from(input.u8())
            } else {
                conn.next_seq
            };
            conn.next_seq = seq + 1;
            let stamp_replica = if input.one_in(8) {
                ReplicaId(input.u64())
            } else {
                conn.replica
            };
            let stamp = input.stamp_near(now, stamp_replica);
            let writes = (0..input.below(3))
                .map(|_| {
                    let collection = (*input.choose(&COLLS)).to_owned();
                    let pk = input.pk();
                    let op = match input.u8() % 4 {
                        0 => Op::Insert {
                            fields: (0..input.below(3))
                                .map(|_| ((*input.choose(&FIELDS)).to_owned(), input.value()))
                                .collect(),
                        },
                        1 | 2 => Op::Update {
                            fields: (0..1 + input.below(2))
                                .map(|_| FieldWrite {
                                    field: (*input.choose(&FIELDS)).to_owned(),
                                    value: input.value(),
                                    base: if input.bool() {
                                        let r = ReplicaId(input.u64() % 4);
                                        Some(input.stamp_near(now, r))
                                    } else {
                                        None
                                    },
                                })
                                .collect(),
                        },
                        _ => Op::Delete {
                            base: input.bool().then(|| input.stamp_near(now, ReplicaId(0x11))),
                        },
                    };
                    Write { collection, pk, op }
                })
                .collect();
            entries.push(LogEntry { seq, stamp, writes });
        }
        ClientMsg::Upload {
            changeset: Changeset { origin, entries },
            more: input.one_in(8),
        }
    }

    fn server_op(&mut self, input: &mut Input<'_>) {
        match input.u8() % 3 {
            0 => {
                let pk = i64::from(input.u8() % 4);
                let v = input.value();
                let _ = self.server.write(|tx| match tx.get("Item", pk)? {
                    Some(_) => tx.set("Item", pk, "name", v),
                    None => tx.insert("Item", pk, [("name", v)]),
                });
            }
            1 => {
                let upto = u64::from(input.u8() % 8);
                self.server.compact_history(upto).expect("compaction");
            }
            _ => {
                let r = ReplicaId(*input.choose(&REPLICAS));
                self.server.force_reset(r).expect("force_reset");
            }
        }
    }

    /// Sends one message and checks the answer; returns whether it acknowledged an upload.
    fn send(&mut self, c: usize, msg: ClientMsg, repeat: bool) -> bool {
        let now = self.now();
        let store = Arc::clone(self.server.store());
        let before = store.digest();
        let version = self.server.version();
        let was_closed = self.conns[c].session.is_closed();
        let is_upload = matches!(msg, ClientMsg::Upload { .. });
        if super::tracing() {
            eprintln!("to session {c} (closed: {was_closed}): {msg:?}");
        }
        let out = self.conns[c].session.on_message(msg, now);
        if super::tracing() {
            eprintln!("  -> {out:?}; version {}", self.server.version());
        }
        if was_closed {
            assert!(out.is_empty(), "a closed session answered {out:?}");
        }
        self.check_out(c, &out);
        let acked = out.iter().any(|m| matches!(m, ServerMsg::UploadAck { .. }));
        if !acked {
            assert_eq!(
                store.digest(),
                before,
                "the state changed without an accepted upload"
            );
        }
        if repeat && is_upload && !was_closed && !self.conns[c].session.is_closed() {
            // The same upload again: everything in it was applied (or refused) already.
            assert_eq!(
                store.digest(),
                before,
                "a repeated upload changed the state"
            );
            assert_eq!(
                self.server.version(),
                version,
                "a repeated upload got new versions"
            );
        }
        acked
    }

    fn check_out(&mut self, c: usize, out: &[ServerMsg]) {
        let user = self.conns[c].session.user().map(User::new);
        for m in out {
            if let (Some(rules), Some(user)) = (&self.rules, &user) {
                self.no_leak(rules, user, m);
            }
            match m {
                ServerMsg::Error { code, message } => {
                    assert!(
                        *code != ErrorCode::Internal,
                        "the server failed internally: {message}"
                    );
                    assert!(
                        self.conns[c].session.is_closed(),
                        "an error left the session open"
                    );
                }
                ServerMsg::UploadAck { seq, .. } => {
                    let r = self.conns[c].replica;
                    assert_eq!(
                        self.server.uploaded(r).expect("uploaded"),
                        *seq,
                        "the acknowledged position is not the one the server keeps"
                    );
                }
                _ => {}
            }
        }
    }

    /// Every live object in a message is one the user may read, as the server's state is
    /// now.
    fn no_leak(&self, rules: &Rules, user: &User, m: &ServerMsg) {
        let store = self.server.store();
        let objects = match m {
            ServerMsg::Snapshot { objects, .. } | ServerMsg::ViewDownload { objects, .. } => {
                objects
            }
            ServerMsg::Download { changeset, .. } => {
                for e in &changeset.entries {
                    for w in &e.writes {
                        if let Some(o) = store.get(&w.collection, w.pk.clone()).expect("get") {
                            assert!(
                                rules.can_read(&w.collection, user, &o.pk, &o.fields),
                                "user {} was sent a write to {}[{}], which they may not read",
                                user.id,
                                w.collection,
                                w.pk
                            );
                        }
                    }
                }
                return;
            }
            _ => return,
        };
        for o in objects {
            if !matches!(o.exists, Some((_, true))) {
                continue;
            }
            let Some(now) = store.get(&o.collection, o.pk.clone()).expect("get") else {
                continue;
            };
            assert!(
                rules.can_read(&o.collection, user, &o.pk, &now.fields),
                "user {} was sent {}[{}], which they may not read",
                user.id,
                o.collection,
                o.pk
            );
        }
    }

    /// A new client syncs everything and ends with the server's state: with rules, exactly
    /// the objects its user may read; without, the server's digest.
    fn fresh_client_converges(&self) {
        let options = Options::default().time(Arc::new(self.time.clone()));
        let store = Arc::new(
            Store::open_backend(redb::backends::InMemoryBackend::new(), options).expect("store"),
        );
        let mut client = ClientSession::new(
            Arc::clone(&store),
            ClientConfig::new(token_until(u64::MAX, "u")),
        );
        let mut session = self.server.session();
        let now = self.now();
        let mut to_server = vec![client.hello().expect("hello")];
        let mut to_client: Vec<ServerMsg> = Vec::new();
        for _ in 0..10_000 {
            while let Some(m) = client.poll_upload().expect("poll_upload") {
                to_server.push(m);
            }
            to_client.extend(session.poll_download());
            if to_server.is_empty() && to_client.is_empty() {
                let server = self.server.store();
                match &self.rules {
                    None => assert_eq!(
                        store.digest(),
                        server.digest(),
                        "a fresh client did not converge on the server"
                    ),
                    Some(rules) => {
                        let user = User::new("u");
                        for coll in ["Item", "Dog"] {
                            let mut want = server.scan(coll).expect("scan");
                            want.retain(|o| rules.can_read(coll, &user, &o.pk, &o.fields));
                            assert_eq!(
                                store.scan(coll).expect("scan"),
                                want,
                                "a fresh client does not hold exactly the {coll}s it may read"
                            );
                        }
                    }
                }
                return;
            }
            for m in std::mem::take(&mut to_server) {
                to_client.extend(session.on_message(m, now));
            }
            for m in std::mem::take(&mut to_client) {
                match client.on_message(m) {
                    Ok(replies) => to_server.extend(replies),
                    Err(e) => panic!("a fresh client failed: {e}"),
                }
            }
        }
        panic!("a fresh client did not finish syncing in 10,000 rounds");
    }
}
