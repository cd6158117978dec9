//! Invariant 4 of DESIGN.md under random histories: 2–3 clients and a server, driven in
//! process (no tokio, no sockets) through random local writes, sync rounds with connections
//! cut at a random message, clients going offline, server compaction, forced resets and
//! client crashes (session, queued messages and store handle dropped, file reopened). After
//! healing, every write any client ever committed is on the server (its value and stamp),
//! beaten there by a higher stamp on the same field or object, or named as superseded or
//! discarded in a reset report; and every replica's digest equals the server's.

mod support;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use fieldlog::reset::{ObjectSnapshot, ResetMode, ResetReport};
use fieldlog::sync::client::{ClientConfig, ClientSession};
use fieldlog::sync::protocol::{ClientMsg, ServerMsg, PROTOCOL_VERSION};
use fieldlog::sync::server::{ServerConfig, ServerSession, SyncServer};
use fieldlog::sync::token::Secret;
use fieldlog::{Error, ManualTimeSource, Options, ReplicaId, Store, TimeSource, Value, WriteTx};
use proptest::prelude::*;
use support::oracle::{fate, written, Fate, Written};
use support::token_for;

const COLL: &str = "Item";
const FIELDS: [&str; 2] = ["a", "b"];
const PKS: i64 = 3;
/// Small, so snapshots and downloads take several messages.
const BATCH_BYTES: usize = 300;
const START_MS: u64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------

struct Conn {
    server: ServerSession,
    client: ClientSession,
    up: VecDeque<ClientMsg>,
    down: VecDeque<ServerMsg>,
}

struct Client {
    path: PathBuf,
    mode: ResetMode,
    time: ManualTimeSource,
    /// How far this client's clock is ahead of the common time.
    skew: u64,
    online: bool,
    store: Option<Arc<Store>>,
    conn: Option<Conn>,
    reports: Vec<ResetReport>,
    errors: Vec<String>,
}

struct World {
    _tmp: tempfile::TempDir,
    token: String,
    now: u64,
    server_time: ManualTimeSource,
    server: Arc<SyncServer>,
    clients: Vec<Client>,
}

fn options(time: &ManualTimeSource) -> Options {
    Options::default().time(Arc::new(time.clone()))
}

impl World {
    fn new(clients: &[(ResetMode, u64)]) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let secret = Secret::generate();
        let token = token_for(&secret, "u");
        let server_time = ManualTimeSource::new(START_MS);
        let store = Store::open_with(tmp.path().join("server.redb"), options(&server_time));
        let mut config = ServerConfig::new(secret);
        config.batch_bytes = BATCH_BYTES;
        let server = Arc::new(SyncServer::open(Arc::new(store.unwrap()), config).unwrap());
        let clients = clients
            .iter()
            .enumerate()
            .map(|(i, &(mode, skew))| {
                let path = tmp.path().join(format!("c{i}.redb"));
                let time = ManualTimeSource::new(START_MS + skew);
                let store = Arc::new(Store::open_with(&path, options(&time)).unwrap());
                Client {
                    path,
                    mode,
                    time,
                    skew,
                    online: true,
                    store: Some(store),
                    conn: None,
                    reports: Vec::new(),
                    errors: Vec::new(),
                }
            })
            .collect();
        World {
            _tmp: tmp,
            token,
            now: START_MS,
            server_time,
            server,
            clients,
        }
    }

    fn tick(&mut self, ms: u64) {
        self.now += ms;
        self.server_time.set(self.now);
        for c in &self.clients {
            c.time.set(self.now + c.skew);
        }
    }

    fn store(&self, i: usize) -> &Arc<Store> {
        self.clients[i].store.as_ref().unwrap()
    }

    fn connect(&mut self, i: usize) {
        if self.clients[i].conn.is_some() {
            return;
        }
        let mut config = ClientConfig::new(self.token.clone());
        config.reset_mode = self.clients[i].mode;
        let mut client = ClientSession::new(Arc::clone(self.store(i)), config);
        let hello = client.hello().unwrap();
        self.clients[i].conn = Some(Conn {
            server: self.server.session(),
            client,
            up: VecDeque::from([hello]),
            down: VecDeque::new(),
        });
    }

    fn disconnect(&mut self, i: usize) {
        let c = &mut self.clients[i];
        if let Some(mut conn) = c.conn.take() {
            c.reports.extend(conn.client.take_reset_reports());
        }
    }

    fn crash(&mut self, i: usize) {
        self.disconnect(i);
        let store = self.clients[i].store.take().unwrap();
        drop(Arc::into_inner(store).expect("the crashed client's store is unshared"));
        let reopened = Store::open_with(&self.clients[i].path, options(&self.clients[i].time));
        self.clients[i].store = Some(Arc::new(reopened.unwrap()));
    }

    fn poll_all(&mut self) {
        for i in 0..self.clients.len() {
            let Some(conn) = self.clients[i].conn.as_mut() else {
                continue;
            };
            let mut failed = None;
            loop {
                match conn.client.poll_upload() {
                    Ok(Some(m)) => conn.up.push_back(m),
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e.to_string());
                        break;
                    }
                }
            }
            loop {
                let out = conn.server.poll_download();
                if out.is_empty() {
                    break;
                }
                conn.down.extend(out);
            }
            if let Some(e) = failed {
                self.clients[i].errors.push(e);
                self.disconnect(i);
            }
        }
    }

    /// Connects every online client and moves messages until nothing moves. The `cut_at`-th
    /// message delivered is lost instead, with its connection.
    fn sync_round(&mut self, cut_at: Option<usize>) {
        for i in 0..self.clients.len() {
            if self.clients[i].online {
                self.connect(i);
            }
        }
        let mut delivered = 0;
        for _ in 0..100_000 {
            self.poll_all();
            let mut moved = false;
            for i in 0..self.clients.len() {
                let now = self.now;
                let c = &mut self.clients[i];
                let Some(conn) = c.conn.as_mut() else {
                    continue;
                };
                let up = !conn.up.is_empty();
                if !up && conn.down.is_empty() {
                    continue;
                }
                moved = true;
                delivered += 1;
                if Some(delivered) == cut_at {
                    self.disconnect(i);
                    continue;
                }
                if up {
                    let m = conn.up.pop_front().unwrap();
                    conn.down.extend(conn.server.on_message(m, now));
                } else {
                    let m = conn.down.pop_front().unwrap();
                    let r = conn.client.on_message(m);
                    c.reports.extend(conn.client.take_reset_reports());
                    match r {
                        Ok(out) => conn.up.extend(out),
                        Err(e) => {
                            c.errors.push(e.to_string());
                            self.disconnect(i);
                        }
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the sessions did not settle");
    }

    /// The server's full state with every stamp and tombstone, as a resetting client gets it
    /// (a snapshot for a made-up replica that never acknowledges the last chunk).
    fn server_snapshot(&self) -> Vec<ObjectSnapshot> {
        let mut s = self.server.session();
        let hello = ClientMsg::Hello {
            protocol: PROTOCOL_VERSION,
            schema_version: 0,
            token: self.token.clone(),
            replica: ReplicaId(0x5ca1_ab1e),
            download_cursor: 0,
            last_sync: 0,
            reset_pending: true,
            reset_settled: None,
            subscriptions: None,
            subscriptions_acked: 0,
        };
        let out = s.on_message(hello, self.server_time.now_ms());
        assert!(
            matches!(out.as_slice(), [ServerMsg::ResetRequired { .. }]),
            "{out:?}"
        );
        let mut objects = Vec::new();
        loop {
            let out = s.poll_download();
            let Some(ServerMsg::Snapshot { objects: o, end }) = out.into_iter().next() else {
                panic!("not a snapshot");
            };
            objects.extend(o);
            if end.is_some() {
                return objects;
            }
            assert!(s
                .on_message(ClientMsg::SnapshotAck { settled: None }, 0)
                .is_empty());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Writes and their fate
// ---------------------------------------------------------------------------------------

/// Runs a transaction; returns its field writes read back from the log, or `None` when it
/// was refused as NotFound or AlreadyExists.
fn write(
    store: &Store,
    f: impl FnOnce(&mut WriteTx<'_>) -> fieldlog::Result<()>,
) -> Option<Vec<Written>> {
    let c = match store.write(f) {
        Ok(((), c)) => c,
        Err(Error::NotFound { .. } | Error::AlreadyExists { .. }) => return None,
        Err(e) => panic!("write: {e}"),
    };
    let seq = c.seq.expect("the transaction wrote something");
    let entry = store.log_after(seq - 1, 1).unwrap().pop().unwrap();
    assert_eq!(entry.seq, seq);
    Some(written(&entry))
}

// ---------------------------------------------------------------------------------------
// The property
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Step {
    Insert {
        c: usize,
        pk: i64,
        f: usize,
    },
    Set {
        c: usize,
        pk: i64,
        f: usize,
    },
    Delete {
        c: usize,
        pk: i64,
    },
    /// A sync round; the `cut`-th message delivered is lost with its connection.
    Sync {
        cut: Option<usize>,
    },
    Offline(usize),
    Online(usize),
    Compact,
    Force(usize),
    Crash(usize),
    Tick(u64),
}

fn step() -> impl Strategy<Value = Step> {
    let c = 0..3usize;
    prop_oneof![
        3 => (c.clone(), 0..PKS, 0..2usize).prop_map(|(c, pk, f)| Step::Insert { c, pk, f }),
        6 => (c.clone(), 0..PKS, 0..2usize).prop_map(|(c, pk, f)| Step::Set { c, pk, f }),
        1 => (c.clone(), 0..PKS).prop_map(|(c, pk)| Step::Delete { c, pk }),
        4 => proptest::option::weighted(0.5, 1..40usize).prop_map(|cut| Step::Sync { cut }),
        2 => c.clone().prop_map(Step::Offline),
        2 => c.clone().prop_map(Step::Online),
        2 => Just(Step::Compact),
        1 => c.clone().prop_map(Step::Force),
        1 => c.prop_map(Step::Crash),
        1 => (1..3_000u64).prop_map(Step::Tick),
    ]
}

fn mode() -> impl Strategy<Value = ResetMode> {
    prop_oneof![
        3 => Just(ResetMode::RecoverUnsyncedChanges),
        2 => Just(ResetMode::RecoverOrDiscard),
        1 => Just(ResetMode::DiscardUnsyncedChanges),
        1 => Just(ResetMode::Manual),
    ]
}

fn run_case(clients: Vec<(ResetMode, u64)>, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let n = clients.len();
    let mut w = World::new(&clients);
    // Every write any client committed, with its client.
    let mut written: Vec<(usize, Written)> = Vec::new();
    let mut value = 0i64;
    for s in steps {
        w.tick(1);
        value += 1;
        let v = Value::from(value);
        match s {
            Step::Insert { c, pk, f } => {
                let c = c % n;
                let store = Arc::clone(w.store(c));
                let r = write(&store, |tx| {
                    tx.insert(COLL, pk, [(FIELDS[f], v), ("n", Value::from(-value))])
                });
                written.extend(r.into_iter().flatten().map(|x| (c, x)));
            }
            Step::Set { c, pk, f } => {
                let c = c % n;
                let store = Arc::clone(w.store(c));
                let r = write(&store, |tx| tx.set(COLL, pk, FIELDS[f], v));
                written.extend(r.into_iter().flatten().map(|x| (c, x)));
            }
            Step::Delete { c, pk } => {
                let c = c % n;
                let store = Arc::clone(w.store(c));
                let r = write(&store, |tx| tx.delete(COLL, pk));
                written.extend(r.into_iter().flatten().map(|x| (c, x)));
            }
            Step::Sync { cut } => w.sync_round(cut),
            Step::Offline(c) => {
                w.clients[c % n].online = false;
                w.disconnect(c % n);
            }
            Step::Online(c) => w.clients[c % n].online = true,
            Step::Compact => {
                w.server.compact_history(w.server.version()).unwrap();
            }
            Step::Force(c) => {
                let id = w.store(c % n).replica_id();
                w.server.force_reset(id).unwrap();
            }
            Step::Crash(c) => w.crash(c % n),
            Step::Tick(ms) => w.tick(ms),
        }
    }

    // Heal: everyone online, sync until quiet.
    for c in &mut w.clients {
        c.online = true;
    }
    for _ in 0..3 {
        w.sync_round(None);
    }
    for (i, c) in w.clients.iter().enumerate() {
        prop_assert!(c.errors.is_empty(), "client {}: {:?}", i, c.errors);
        let store = c.store.as_ref().unwrap();
        prop_assert_eq!(
            store.last_sync(),
            store.log_head(),
            "client {} has unsynced writes",
            i
        );
    }
    let server = w.server.store().digest();
    for i in 0..n {
        prop_assert_eq!(w.store(i).digest(), server, "client {} differs", i);
    }
    let snapshot = w.server_snapshot();
    let reports: Vec<&ResetReport> = w.clients.iter().flat_map(|c| &c.reports).collect();
    for (c, x) in &written {
        let f = fate(&snapshot, &reports, x);
        prop_assert!(f != Fate::Lost, "client {}'s write was lost: {:?}", c, x);
        if f == Fate::Superseded {
            // Reported superseded while nothing newer is on the server: only an update of an
            // object the server deleted (an update does not resurrect it).
            let live = snapshot
                .iter()
                .find(|o| o.pk == x.pk)
                .and_then(|o| o.exists)
                .is_some_and(|(_, alive)| alive);
            prop_assert!(
                x.field.is_some() && !live,
                "superseded, yet newer than the server's state: {:?}",
                x
            );
        }
        if matches!(
            w.clients[*c].mode,
            ResetMode::RecoverUnsyncedChanges | ResetMode::RecoverOrDiscard
        ) {
            prop_assert!(f != Fate::Discarded, "recovering, yet discarded: {:?}", x);
        }
    }
    Ok(())
}

proptest! {
    // 32 cases unless PROPTEST_CASES says otherwise.
    #![proptest_config(if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(32)
    })]

    /// Invariant 4 (and convergence) over random histories with crashes and lost messages.
    #[test]
    fn nothing_unsynced_is_lost(
        clients in proptest::collection::vec((mode(), 0..2_000u64), 2..=3),
        steps in proptest::collection::vec(step(), 10..60),
    ) {
        run_case(clients, steps)?;
    }
}
