//! Conflict policies under random histories: two clients and a server, driven in process
//! (no tokio, no sockets). Clients insert, update, delete and re-insert a few keys while
//! offline (so one upload holds several writes of one key), the server changes the same
//! keys meanwhile (`SyncServer::write`), and every policy decides — a default and random
//! per-kind overrides, a custom handler that keeps the server's side, takes the client's
//! or merges. Invariants:
//! - no upload fails and no client errors: every decision is carried out;
//! - every conflict record says what the server holds right after its upload, unless a
//!   later write of the same upload changed that object again;
//! - once everyone is online and quiet, every replica's digest equals the server's.

mod support;

use std::collections::VecDeque;
use std::sync::Arc;

use fieldlog::conflict::{
    Conflict, ConflictKind, ConflictRecord, Decision, Policies, Policy, Resolution,
};
use fieldlog::sync::client::{ClientConfig, ClientSession};
use fieldlog::sync::protocol::{ClientMsg, ServerMsg};
use fieldlog::sync::server::{ServerConfig, ServerSession, SyncServer};
use fieldlog::sync::token::Secret;
use fieldlog::{Error, LogEntry, ManualTimeSource, Op, Options, Pk, Store, Value, WriteTx};
use proptest::prelude::*;
use support::token_for;

const COLL: &str = "Item";
const FIELDS: [&str; 2] = ["a", "b"];
const PKS: i64 = 3;
const START_MS: u64 = 1_700_000_000_000;

// ---------------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------------

/// A custom handler that depends only on the conflict, so the test can ask it again: it
/// keeps the server's side, takes the client's, or merges the two values.
fn handler(c: &Conflict) -> Resolution {
    let show = |v: &Option<Value>| match v {
        Some(Value::String(s)) => s.clone(),
        other => format!("{other:?}"),
    };
    let salt = c.client.stamp.map_or(0, |s| s.time) ^ c.pk.to_string().len() as u64;
    match (salt >> 3) % 3 {
        0 => Resolution::KeepServer,
        1 => Resolution::TakeClient,
        _ => Resolution::Merged(Value::from(format!(
            "{}+{}",
            show(&c.server.value),
            show(&c.client.value)
        ))),
    }
}

#[derive(Clone, Copy, Debug)]
enum P {
    Lww,
    Server,
    Client,
    Custom,
}

impl P {
    fn policy(self) -> Policy {
        match self {
            P::Lww => Policy::LastWriterWins,
            P::Server => Policy::ServerWins,
            P::Client => Policy::ClientWins,
            P::Custom => Policy::Custom(Arc::new(handler)),
        }
    }
}

const KINDS: [ConflictKind; 4] = [
    ConflictKind::ClientInsertServerInsert,
    ConflictKind::ClientUpdateServerUpdate,
    ConflictKind::ClientUpdateServerDelete,
    ConflictKind::ClientDeleteServerUpdate,
];

fn policies(default: P, overrides: &[(usize, P)]) -> Policies {
    let mut p = Policies::new(default.policy());
    for &(kind, policy) in overrides {
        p = p.kind(COLL, KINDS[kind % KINDS.len()], policy.policy());
    }
    p
}

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
    time: ManualTimeSource,
    skew: u64,
    online: bool,
    store: Arc<Store>,
    conn: Option<Conn>,
}

struct World {
    _tmp: tempfile::TempDir,
    token: String,
    now: u64,
    server_time: ManualTimeSource,
    server: Arc<SyncServer>,
    clients: Vec<Client>,
    /// The last conflict record checked.
    checked: u64,
    /// Conflict records checked over the run.
    records: usize,
}

fn options(time: &ManualTimeSource) -> Options {
    Options::default().time(Arc::new(time.clone()))
}

type R<T = ()> = Result<T, TestCaseError>;

impl World {
    fn new(policies: Policies, skews: [u64; 2]) -> World {
        let tmp = tempfile::tempdir().unwrap();
        let secret = Secret::generate();
        let token = token_for(&secret, "u");
        let server_time = ManualTimeSource::new(START_MS);
        let store = Store::open_with(tmp.path().join("server.redb"), options(&server_time));
        let mut config = ServerConfig::new(secret);
        config.conflicts = policies;
        let server = Arc::new(SyncServer::open(Arc::new(store.unwrap()), config).unwrap());
        let clients = skews
            .iter()
            .enumerate()
            .map(|(i, &skew)| {
                let time = ManualTimeSource::new(START_MS + skew);
                let path = tmp.path().join(format!("c{i}.redb"));
                Client {
                    store: Arc::new(Store::open_with(path, options(&time)).unwrap()),
                    time,
                    skew,
                    online: true,
                    conn: None,
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
            checked: 0,
            records: 0,
        }
    }

    fn tick(&mut self, ms: u64) {
        self.now += ms;
        self.server_time.set(self.now);
        for c in &self.clients {
            c.time.set(self.now + c.skew);
        }
    }

    fn connect(&mut self, i: usize) {
        if self.clients[i].conn.is_some() {
            return;
        }
        let store = Arc::clone(&self.clients[i].store);
        let mut client = ClientSession::new(store, ClientConfig::new(self.token.clone()));
        let hello = client.hello().unwrap();
        self.clients[i].conn = Some(Conn {
            server: self.server.session(),
            client,
            up: VecDeque::from([hello]),
            down: VecDeque::new(),
        });
    }

    fn poll(&mut self, i: usize) -> R {
        let Some(conn) = self.clients[i].conn.as_mut() else {
            return Ok(());
        };
        while let Some(m) = conn
            .client
            .poll_upload()
            .map_err(|e| TestCaseError::fail(format!("client {i} poll_upload: {e}")))?
        {
            conn.up.push_back(m);
        }
        conn.down.extend(conn.server.poll_download());
        Ok(())
    }

    /// Connects every online client and moves messages until nothing moves.
    fn sync_round(&mut self) -> R {
        for i in 0..self.clients.len() {
            if self.clients[i].online {
                self.connect(i);
            } else {
                self.clients[i].conn = None;
            }
        }
        for _ in 0..100_000 {
            let mut moved = false;
            for i in 0..self.clients.len() {
                self.poll(i)?;
                let (now, server) = (self.now, Arc::clone(&self.server));
                let Some(conn) = self.clients[i].conn.as_mut() else {
                    continue;
                };
                if let Some(m) = conn.up.pop_front() {
                    moved = true;
                    let upload = match &m {
                        ClientMsg::Upload { changeset, .. } => Some(changeset.entries.clone()),
                        _ => None,
                    };
                    let before = upload.as_ref().map(|_| server_objects(&server));
                    let out = conn.server.on_message(m, now);
                    for msg in &out {
                        if let ServerMsg::Error { code, message, .. } = msg {
                            return Err(TestCaseError::fail(format!(
                                "the server failed client {i}'s message: {code:?} {message}"
                            )));
                        }
                    }
                    conn.down.extend(out);
                    if let (Some(entries), Some(before)) = (upload, before) {
                        self.check_records(&entries, &before)?;
                    }
                } else if let Some(m) = conn.down.pop_front() {
                    moved = true;
                    let out = conn
                        .client
                        .on_message(m)
                        .map_err(|e| TestCaseError::fail(format!("client {i}: {e}")))?;
                    conn.up.extend(out);
                }
            }
            if !moved {
                return Ok(());
            }
        }
        Err(TestCaseError::fail("the sessions did not settle"))
    }

    /// Every conflict record the upload of `entries` made says what the server holds now,
    /// unless a later write of the same upload changed that object again.
    fn check_records(&mut self, entries: &[LogEntry], before: &[(Pk, Vec<(String, Value)>)]) -> R {
        let records = self.server.conflicts(self.checked, usize::MAX).unwrap();
        for r in records {
            self.checked = r.id;
            self.records += 1;
            check_record(&r, entries, before, self.server.store())?;
        }
        Ok(())
    }
}

/// The server's objects with their fields.
fn server_objects(server: &SyncServer) -> Vec<(Pk, Vec<(String, Value)>)> {
    let objects = server.store().scan(COLL).unwrap();
    objects
        .into_iter()
        .map(|o| (o.pk, o.fields.into_iter().collect()))
        .collect()
}

/// The object's fields on the server now (`None`: not live).
fn fields_of(store: &Store, pk: &Pk) -> Option<Vec<(String, Value)>> {
    let o = store.get(COLL, pk.clone()).unwrap()?;
    Some(o.fields.into_iter().collect())
}

fn check_record(
    r: &ConflictRecord,
    entries: &[LogEntry],
    before: &[(Pk, Vec<(String, Value)>)],
    store: &Store,
) -> R {
    let c = &r.conflict;
    let Some(stamp) = c.client.stamp else {
        return Err(TestCaseError::fail(format!("no client stamp: {r:?}")));
    };
    let on_pk = |e: &&LogEntry| e.writes.iter().any(|w| w.pk == c.pk);
    if entries.iter().filter(on_pk).any(|e| e.stamp > stamp) {
        // The client's own later write changed the object again.
        return Ok(());
    }
    let written = entries
        .iter()
        .find(|e| e.stamp == stamp)
        .and_then(|e| e.writes.iter().find(|w| w.pk == c.pk))
        .ok_or_else(|| TestCaseError::fail(format!("no write for {r:?}")))?;
    let first = entries.iter().find(on_pk).map(|e| e.stamp) == Some(stamp);
    let now = fields_of(store, &c.pk);
    let field = |f: &str| {
        now.as_ref()
            .and_then(|o| o.iter().find(|(n, _)| n == f).map(|(_, v)| v.clone()))
    };
    let what = format!("{r:?}, now {now:?}");
    match (c.kind, r.decision) {
        (ConflictKind::ClientUpdateServerUpdate, d) => {
            let f = c.field.as_deref().unwrap_or_default();
            let want = match d {
                Decision::Client => c.client.value.clone(),
                Decision::Server => c.server.value.clone(),
                Decision::Merged => match handler(c) {
                    Resolution::Merged(v) => Some(v),
                    other => return Err(TestCaseError::fail(format!("{other:?}: {what}"))),
                },
            };
            prop_assert_eq!(field(f), want, "{}", what);
        }
        (ConflictKind::ClientInsertServerInsert, Decision::Client)
            if r.policy == "LastWriterWins" =>
        {
            // The client's insert won the object; fields the server wrote after it by stamp
            // stay beside it.
            prop_assert!(now.is_some(), "{}", what);
        }
        (ConflictKind::ClientInsertServerInsert, Decision::Client) => {
            let Op::Insert { fields } = &written.op else {
                return Err(TestCaseError::fail(format!("not an insert: {what}")));
            };
            let mut want = fields.clone();
            want.sort();
            prop_assert_eq!(now, Some(want), "{}", what);
        }
        (ConflictKind::ClientInsertServerInsert, _) => {
            let was = before.iter().find(|(pk, _)| *pk == c.pk).map(|(_, f)| f);
            if first {
                prop_assert_eq!(now.as_ref(), was, "{}", what);
            } else {
                prop_assert!(now.is_some(), "{}", what);
            }
        }
        (ConflictKind::ClientUpdateServerDelete, Decision::Client) => {
            let Op::Update { fields } = &written.op else {
                return Err(TestCaseError::fail(format!("not an update: {what}")));
            };
            for fw in fields {
                prop_assert_eq!(field(&fw.field), Some(fw.value.clone()), "{}", what);
            }
        }
        (ConflictKind::ClientUpdateServerDelete, _) => prop_assert!(now.is_none(), "{}", what),
        (ConflictKind::ClientDeleteServerUpdate, Decision::Client) => {
            prop_assert!(now.is_none(), "{}", what)
        }
        (ConflictKind::ClientDeleteServerUpdate, _) => prop_assert!(now.is_some(), "{}", what),
        (ConflictKind::ErrorsOccurred, _) => {
            return Err(TestCaseError::fail(format!("no write is invalid: {what}")))
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Change {
    Insert,
    Update(usize),
    Delete,
    /// A delete, then an insert of the same key, in two transactions.
    Reinsert,
}

#[derive(Clone, Debug)]
enum Step {
    /// A client changes a key (offline, mostly: its writes pile up into one upload).
    Client(usize, i64, Change),
    /// The server changes a key.
    Server(i64, Change),
    /// A client goes offline or comes back.
    Online(usize, bool),
    /// Online clients sync.
    Sync,
    /// Time passes.
    Tick(u64),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        2 => Just(Change::Insert),
        4 => (0..FIELDS.len()).prop_map(Change::Update),
        2 => Just(Change::Delete),
        1 => Just(Change::Reinsert),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (0..2usize, 0..PKS, change()).prop_map(|(c, pk, ch)| Step::Client(c, pk, ch)),
        5 => (0..PKS, change()).prop_map(|(pk, ch)| Step::Server(pk, ch)),
        2 => (0..2usize, any::<bool>()).prop_map(|(c, on)| Step::Online(c, on)),
        2 => Just(Step::Sync),
        3 => (0..4u64).prop_map(Step::Tick),
    ]
}

fn p() -> impl Strategy<Value = P> {
    prop_oneof![
        Just(P::Lww),
        Just(P::Server),
        Just(P::Client),
        Just(P::Custom)
    ]
}

/// One transaction's calls.
type TxFn<'a> = dyn Fn(&mut WriteTx<'_>) -> fieldlog::Result<()> + 'a;

/// Applies a change in transactions (`write` commits one); a change that does not apply
/// (an update of a missing key, say) is skipped.
fn apply(write: &mut dyn FnMut(&TxFn<'_>) -> R, pk: i64, change: Change, value: &str) -> R {
    let fields = |v: &str| {
        vec![
            ("a", Value::from(format!("{v}.a"))),
            ("b", Value::from(format!("{v}.b"))),
        ]
    };
    match change {
        Change::Insert => write(&|tx| tx.insert(COLL, pk, fields(value))),
        Change::Update(f) => write(&|tx| tx.set(COLL, pk, FIELDS[f], value)),
        Change::Delete => write(&|tx| tx.delete(COLL, pk)),
        Change::Reinsert => {
            write(&|tx| tx.delete(COLL, pk))?;
            write(&|tx| tx.insert(COLL, pk, fields(value)))
        }
    }
}

/// Whether an error is a change that did not apply to the object as it is.
fn skipped(e: &Error) -> bool {
    matches!(e, Error::NotFound { .. } | Error::AlreadyExists { .. })
}

/// Runs a history; returns how many conflict records it checked.
fn run(default: P, overrides: Vec<(usize, P)>, skews: [u64; 2], steps: Vec<Step>) -> R<usize> {
    let mut w = World::new(policies(default, &overrides), skews);
    // Clients start offline: their writes pile up against the server's.
    for c in &mut w.clients {
        c.online = false;
    }
    for (n, step) in steps.into_iter().enumerate() {
        match step {
            Step::Client(i, pk, change) => {
                let store = Arc::clone(&w.clients[i].store);
                let value = format!("c{i}-{n}");
                let mut write = |f: &TxFn<'_>| match store.write(f) {
                    Ok(_) => Ok(()),
                    Err(e) if skipped(&e) => Ok(()),
                    Err(e) => Err(TestCaseError::fail(format!("client {i}: {e}"))),
                };
                apply(&mut write, pk, change, &value)?;
            }
            Step::Server(pk, change) => {
                let value = format!("s-{n}");
                let server = Arc::clone(&w.server);
                let mut write = |f: &TxFn<'_>| match server.write(f) {
                    Ok(()) => Ok(()),
                    Err(e) if skipped(&e) => Ok(()),
                    Err(e) => Err(TestCaseError::fail(format!("server: {e}"))),
                };
                apply(&mut write, pk, change, &value)?;
            }
            Step::Online(i, on) => w.clients[i].online = on,
            Step::Sync => w.sync_round()?,
            Step::Tick(ms) => w.tick(ms),
        }
    }
    // Heal: everyone online until quiet, twice (the second round carries what the first
    // round's decisions wrote).
    for c in &mut w.clients {
        c.online = true;
    }
    w.tick(1);
    w.sync_round()?;
    w.sync_round()?;
    let want = w.server.store().digest();
    for (i, c) in w.clients.iter().enumerate() {
        prop_assert_eq!(c.store.digest(), want, "client {} diverged", i);
    }
    Ok(w.records)
}

proptest! {
    // 64 cases unless PROPTEST_CASES says otherwise.
    #![proptest_config(if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(64)
    })]

    #[test]
    fn every_policy_decides_every_upload_and_replicas_converge(
        default in p(),
        overrides in prop::collection::vec((0..KINDS.len(), p()), 0..3),
        skews in [0..20u64, 0..20u64],
        steps in prop::collection::vec(step(), 8..60),
    ) {
        run(default, overrides, skews, steps)?;
    }
}

/// A fixed history that meets every kind of conflict under every policy, and the runs
/// record conflicts: the property above is not vacuous.
#[test]
fn a_fixed_history_meets_conflicts_under_every_policy() {
    use Change::*;
    let steps = vec![
        Step::Server(0, Insert),
        Step::Server(1, Insert),
        Step::Online(0, true),
        Step::Online(1, true),
        Step::Sync,
        Step::Online(0, false),
        Step::Tick(2),
        Step::Server(0, Update(0)),
        Step::Server(1, Delete),
        Step::Server(2, Insert),
        Step::Tick(2),
        Step::Client(0, 0, Update(0)),
        Step::Client(0, 0, Update(0)),
        Step::Client(0, 1, Update(1)),
        Step::Client(0, 2, Insert),
        Step::Client(0, 0, Delete),
        Step::Client(0, 1, Reinsert),
        Step::Online(0, true),
        Step::Sync,
    ];
    for default in [P::Lww, P::Server, P::Client, P::Custom] {
        let records = run(default, Vec::new(), [5, 0], steps.clone()).unwrap();
        assert!(records >= 3, "{default:?}: {records} conflict records");
    }
}
