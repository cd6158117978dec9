//! Deterministic simulation of sync (issue 8; STYLE.md, "Deterministic simulation"): one
//! server and 1–8 clients in one thread, every store a real redb file, all time fake, every
//! choice drawn from one seed (`StdRng::seed_from_u64`). Guards invariants 1 (convergence),
//! 2 (no stale overwrite: the oracle) and 4 (nothing unsynced lost in a reset) of DESIGN.md,
//! and the sync promises: no acknowledged write lost, no upload applied twice, cursors never
//! move backwards.
//!
//! Each seed draws its own world and fault rates:
//! - message drop 0–30%, modelled as TCP fails: the message and everything after it on its
//!   connection is lost, and the client later dials again with a fresh Hello;
//! - duplication 0–50% of the messages the protocol lets repeat (a whole `Upload`, a
//!   `DownloadAck`, a `Ping`), delivered twice in order;
//! - delay and reordering: a connection stalls for a while, connections deliver in a random
//!   interleaving (order within one connection is kept, as TCP keeps it);
//! - partitions (a client cannot connect for a while), client crashes (session, queued
//!   messages and `Arc<Store>` dropped, file reopened), server restarts (every session, the
//!   `SyncServer` and its store dropped, file reopened), history compaction (clients behind
//!   it reset), operator-forced resets, server-side writes, clock skew and clock jumps
//!   within the drift bound, one reset mode per client.
//!
//! A safety phase of random writes (insert, set, delete, counter increment; one to three per
//! transaction; small key space; `LastWriterWins`) runs under those faults, then a healing
//! phase without faults must converge within `HEAL_ROUNDS_MAX` rounds. Checks:
//! - every replica's digest equals the server's, and the server's visible state (values and
//!   stamps) equals an oracle: the merge rule (existence register, floor, per-field LWW by
//!   stamp, counters summed) folded over every committed write that was not refused
//!   (superseded or discarded in a reset report), read back from every log;
//! - every write a client committed is on the server, beaten there by a higher stamp, or
//!   named superseded or discarded in a reset report; one the server acknowledged (and no
//!   reset settled) is on the server or beaten, and its transaction is in the history;
//! - every reset report names exactly the writes of the log range the reset settled;
//! - the server's history (read back through downloads before each compaction and at the
//!   end) has one record per version, no transaction (replica, stamp) twice, and each record
//!   equals a transaction some log holds: no upload applied twice, none invented;
//! - a client's download cursor never moves backwards except when a reset swaps its state
//!   in, its `last_sync` never moves backwards, and both survive crashes; the server's
//!   version and digest survive restarts.
//!
//! Permissions (invariant 5): the server has a rules file (`RULES`: each object has an
//! `owner`, and a user may read and write only objects it owns); clients are dealt out to
//! `USERS` users, so some share one. Writes normally set `owner` to the writer's user; at
//! rate `forbidden` a client writes an object owned by another user or gives its object
//! away (`ClientAction::Forbidden`). Checks: every server-to-client message and every
//! client's store (after every step) holds no object of another user (a client may hold
//! its own not yet refused write); every write that gives an object away is reported to
//! its client (`take_refused_writes`, and kept in `rejected_writes`) or settled by a reset,
//! and no refused write is on the server or in its history; the oracle leaves refused
//! writes out; each client converges to the server's objects of its user.
//!
//! A hostile client (user `mallory`, a device of its own, a random stream of its own so a
//! seed's honest world is the same with it) attacks at a per-seed rate, each time on a
//! fresh session: it claims the device id of a client that has synced (ids are in every
//! stamp), uploads on its own device at a position past the next one (2, 3, 1,000 or
//! 1,000,000), replays a transaction from an honest client's log, or subscribes to another
//! user's objects. Checks: nothing of another user (object or refused write) reaches it,
//! every attack is refused (no Welcome on a forged device, no acknowledgement of a forged
//! upload), and the server's version and digest do not move.
//!
//! `FIELDLOG_SIM_SEEDS=N` runs seeds 0..N (default 256; `FIELDLOG_SIM_FIRST` moves the
//! start); `FIELDLOG_SIM_SEED=n` replays one seed exactly; `FIELDLOG_SIM_TRACE=1` prints its
//! events; `FIELDLOG_SIM_SCALE=k` makes every seed k times longer (soak). A failure prints
//! `SEED=<n>`. The suite steers around known bugs (`Knobs`); `FIELDLOG_SIM_KNOWN_BUGS=1`
//! stops that, and the `seed_*` regression tests (ignored while the bugs are open) replay
//! the seeds that found them. Last line: `simulation: seeds=N client_ops=M
//! convergence_failures=F max_rounds=R resets=X refused=N leaks=0 hostile_attacks=A
//! hostile_accepted=0`.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use fieldlog::reset::{ObjectSnapshot, ResetMode, ResetReport, UnsyncedWrite};
use fieldlog::rules::Rules;
use fieldlog::sync::client::{self as sync_client, ClientConfig, ClientSession};
use fieldlog::sync::pieces::join_piece;
use fieldlog::sync::protocol::{ClientMsg, ErrorCode, RefusedWrite, ServerMsg};
use fieldlog::sync::server::{ServerConfig, ServerSession, SyncServer};
use fieldlog::sync::token::Secret;
use fieldlog::{
    Error, LogEntry, ManualTimeSource, Op, Options, Pk, ReplicaId, Stamp, Store, Value, WriteTx,
};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{RngExt, SeedableRng};
use support::oracle::{written, Fate, Written};
use support::token_for;

const COLL: &str = "Item";
const FIELDS: [&str; 3] = ["a", "b", "c"];
/// A counter field (per-replica parts `__c.n.<replica>`, summed).
const COUNTER: &str = "n";
const PKS: i64 = 6;
const START_MS: u64 = 1_700_000_000_000;
/// Clocks stay within ±2 minutes of true time: any two differ by less than the default
/// 5-minute drift bound, so no stamp is refused as coming from the future.
const MAX_SKEW_MS: i64 = 120_000;
/// Healing must converge within this many rounds. In a round every client without a
/// connection dials, and every connection delivers at most one message each way.
const HEAL_ROUNDS_MAX: usize = 2_000;
const DEFAULT_SEEDS: u64 = 256;
/// The field naming an object's user.
const OWNER: &str = "owner";
/// Users the clients are dealt out to (client `i` is `user{i % USERS}`).
const USERS: usize = 2;
/// Each user reads and writes only its own objects.
const RULES: &str = r#"{
  "rules": {
    "Item": [
      {
        "name": "own",
        "apply_when": {},
        "document_filters": {
          "read": { "owner": "%%user.id" },
          "write": { "owner": "%%user.id" }
        },
        "read": true, "write": true, "insert": true, "delete": true
      }
    ]
  }
}"#;

fn user_name(k: usize) -> String {
    format!("user{k}")
}

/// The owner of a set of fields, if it is a string.
fn owner_of<'a>(mut fields: impl Iterator<Item = (&'a str, &'a Value)>) -> Option<&'a str> {
    fields
        .find(|(f, _)| *f == OWNER)
        .and_then(|(_, v)| match v {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        })
}

/// What in a server-to-client message belongs to another user than `user`.
fn leaks_in(m: &ServerMsg, user: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut object = |what: &str, pk: &Pk, owner: Option<&str>| {
        if owner.is_some_and(|o| o != user) {
            out.push(format!("{what} carries {pk} of {owner:?} to {user}"));
        }
    };
    match m {
        ServerMsg::Snapshot { objects, .. } | ServerMsg::ViewDownload { objects, .. } => {
            for o in objects {
                let owner = owner_of(o.fields.iter().map(|(f, _, v)| (f.as_str(), v)));
                object(m.kind(), &o.pk, owner);
            }
        }
        ServerMsg::Download { changeset, .. } => {
            for e in &changeset.entries {
                for w in &e.writes {
                    let owner = match &w.op {
                        Op::Insert { fields } => {
                            owner_of(fields.iter().map(|(f, v)| (f.as_str(), v)))
                        }
                        Op::Update { fields } => {
                            owner_of(fields.iter().map(|f| (f.field.as_str(), &f.value)))
                        }
                        Op::Delete { .. } => None,
                    };
                    object("Download", &w.pk, owner);
                }
            }
        }
        _ => {}
    }
    out
}

type R<T = ()> = std::result::Result<T, String>;

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err(format!($($arg)*));
        }
    };
}

// ---------------------------------------------------------------------------------------
// The world a seed draws
// ---------------------------------------------------------------------------------------

/// Per-seed rates. Probabilities are per message (drop, dup) or per safety step.
#[derive(Clone, Debug)]
struct Rates {
    clients: usize,
    steps: usize,
    /// A delivered message is lost and its connection cut.
    drop: f64,
    /// A duplicable client message is delivered twice.
    dup: f64,
    /// A connection stops delivering for 1–40 steps.
    stall: f64,
    /// A client without a connection dials again.
    reconnect: f64,
    /// A client is cut off for 10–150 steps.
    partition: f64,
    crash: f64,
    server_restart: f64,
    compact: f64,
    force_reset: f64,
    /// A client's clock jumps to another skew (backwards too).
    clock_jump: f64,
    /// The server writes as itself (`SyncServer::write`).
    server_write: f64,
    ping: f64,
    /// A client writes.
    write: f64,
    /// A client's write is one its user may not make (`ClientAction::Forbidden`).
    forbidden: f64,
    /// The server's download and snapshot batch size, and the clients' upload batch size:
    /// small ones split transactions into pieces.
    server_batch: usize,
    client_batch: usize,
    client_window: usize,
    /// The workload increments counters / deletes objects.
    counters: bool,
    deletes: bool,
}

/// How a seed runs besides its seed: how long, and switches for known bugs, so the suite
/// keeps exploring everything else while they are open. Regression tests replay their seed
/// with their bug's knob set (`Knobs::ALL` sets them all).
#[derive(Clone, Copy, Debug)]
struct Knobs {
    /// Each seed's safety phase is this many times longer (`FIELDLOG_SIM_SCALE`).
    scale: usize,
    /// Was BUG 1 (fixed: resolution re-inserts through `insert_engine`, and LastWriterWins
    /// writes nothing): an increment newer than another replica's delete makes the server re-insert the
    /// object with the counter's engine sub-field, which `insert` refuses (BadChangeset, and
    /// the client can never upload again). While open, a seed has counters or deletes.
    counters_with_deletes: bool,
    /// Was BUG 2 (fixed: the marker stays until the server confirms the settled position):
    /// a reset that recovers nothing removes its marker at once, so when its final
    /// `SnapshotAck { settled }` is lost the next Hello carries no `reset_settled`, the
    /// server still holds the old position, and the client resets a second time
    /// (ClientAheadOfServer), replaying writes the first reset already settled. While open,
    /// a connection never loses a queued final SnapshotAck.
    final_snapshot_ack_lost: bool,
    /// BUG 4 (open): the server tells a client of its refused writes only in the
    /// `CompensatingWrite` that follows the `UploadAck` on the same connection. When the
    /// connection breaks before it arrives, the upload is applied (the next Welcome says
    /// so) and the refusal is never sent again: the client never learns that its write was
    /// refused (`rejected_writes` lacks it). While open, a connection never loses a queued
    /// CompensatingWrite.
    compensating_write_lost: bool,
    /// BUG 5 (open): a `ViewDownload` that lists an object in `removed` (it left the view:
    /// deleted, or another user's) removes it locally even when the client holds unsynced
    /// writes to it (an insert made after the delete). The upload then makes the object
    /// the user's on the server, but downloads skip the client's own writes, so it never
    /// comes back: the client lacks an object of its user forever (no convergence). While
    /// open, the driver takes such objects out of `removed` (what a fix would do).
    view_removes_unsynced: bool,
}

impl Knobs {
    const ALL: Knobs = Knobs {
        scale: 1,
        counters_with_deletes: true,
        final_snapshot_ack_lost: true,
        compensating_write_lost: true,
        view_removes_unsynced: true,
    };
    /// What the suite runs: everything (bugs 1, 2, 4 and 5 are fixed; the knobs stay so a
    /// future bug can be steered around while it is open).
    const SUITE: Knobs = Knobs::ALL;
}

fn maybe(rng: &mut StdRng, max: f64) -> f64 {
    if rng.random_bool(0.2) {
        0.0
    } else {
        rng.random_range(0.0..max)
    }
}

impl Rates {
    fn draw(rng: &mut StdRng, scale: usize) -> Rates {
        Rates {
            clients: match rng.random_range(0..10) {
                0..=3 => rng.random_range(1..=2),
                4..=7 => rng.random_range(3..=4),
                _ => rng.random_range(5..=8),
            },
            steps: rng.random_range(12..60) * scale,
            drop: maybe(rng, 0.30),
            dup: maybe(rng, 0.50),
            stall: maybe(rng, 0.10),
            reconnect: rng.random_range(0.2..1.0),
            partition: maybe(rng, 0.04),
            crash: maybe(rng, 0.03),
            server_restart: maybe(rng, 0.015),
            compact: maybe(rng, 0.03),
            force_reset: maybe(rng, 0.015),
            clock_jump: maybe(rng, 0.01),
            server_write: maybe(rng, 0.05),
            ping: maybe(rng, 0.05),
            write: rng.random_range(0.15..0.7),
            forbidden: maybe(rng, 0.20),
            server_batch: *[200, 600, 1 << 20, 1 << 20].choose(rng).unwrap(),
            client_batch: *[150, 400, 1 << 20, 1 << 20].choose(rng).unwrap(),
            client_window: rng.random_range(1..=4),
            counters: rng.random_bool(0.7),
            deletes: rng.random_bool(0.8),
        }
    }
}

/// `FIELDLOG_SIM_SCALE` (default 1) multiplies each seed's safety steps (soak runs).
fn scale() -> usize {
    env_u64("FIELDLOG_SIM_SCALE").map_or(1, |s| s.max(1) as usize)
}

fn random_mode(rng: &mut StdRng) -> ResetMode {
    match rng.random_range(0..8) {
        0..=3 => ResetMode::RecoverUnsyncedChanges,
        4..=5 => ResetMode::RecoverOrDiscard,
        6 => ResetMode::DiscardUnsyncedChanges,
        _ => ResetMode::Manual,
    }
}

fn recovering(mode: ResetMode) -> bool {
    matches!(
        mode,
        ResetMode::RecoverUnsyncedChanges | ResetMode::RecoverOrDiscard
    )
}

fn options(time: &ManualTimeSource) -> Options {
    Options::default().time(Arc::new(time.clone()))
}

#[derive(Clone, Debug, Default)]
struct Stats {
    client_ops: u64,
    server_ops: u64,
    delivered: u64,
    drops: u64,
    dups: u64,
    crashes: u64,
    server_restarts: u64,
    compactions: u64,
    forced: u64,
    partitions: u64,
    resets: u64,
    heal_rounds: usize,
    /// Forbidden writes made, writes the server refused, objects of another user seen.
    forbidden: u64,
    refused: u64,
    leaks: u64,
    /// Attacks of the hostile client, and those the server did not refuse.
    hostile: u64,
    hostile_accepted: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.client_ops += o.client_ops;
        self.server_ops += o.server_ops;
        self.delivered += o.delivered;
        self.drops += o.drops;
        self.dups += o.dups;
        self.crashes += o.crashes;
        self.server_restarts += o.server_restarts;
        self.compactions += o.compactions;
        self.forced += o.forced;
        self.partitions += o.partitions;
        self.resets += o.resets;
        self.heal_rounds = self.heal_rounds.max(o.heal_rounds);
        self.forbidden += o.forbidden;
        self.refused += o.refused;
        self.leaks += o.leaks;
        self.hostile += o.hostile;
        self.hostile_accepted += o.hostile_accepted;
    }
}

struct Conn {
    server: ServerSession,
    client: ClientSession,
    up: VecDeque<ClientMsg>,
    down: VecDeque<ServerMsg>,
    /// No delivery on this connection before this step.
    stalled_until: usize,
    /// The last Upload delivered had `more` (the next one continues its transaction).
    upload_continues: bool,
    ping: u64,
}

struct Client {
    path: PathBuf,
    user: String,
    /// Every write the server refused, as the session reported them.
    refused: Vec<RefusedWrite>,
    mode: ResetMode,
    token: String,
    time: ManualTimeSource,
    skew: i64,
    /// Cannot connect before this step.
    partitioned_until: usize,
    store: Option<Arc<Store>>,
    conn: Option<Conn>,
    reports: Vec<ResetReport>,
    errors: Vec<String>,
    /// Last observed download cursor and last sync.
    cursor: u64,
    last_sync: u64,
    /// The highest log position the server said it applied (UploadAck, Welcome,
    /// ResetRequired); positions a reset settled do not count (see `settled`).
    acked: u64,
    /// Log ranges `(lo, hi]` a reset settled, with the index of its report.
    settled: Vec<(u64, u64, usize)>,
    /// Where the reset under way replays from: `min(last_sync, uploaded)` at its
    /// ResetRequired.
    replay_after: Option<u64>,
}

/// What the audit read back of the server's history.
#[derive(Default)]
struct Audit {
    /// History up to this version has been read.
    upto: u64,
    /// Server version → the transaction's stamp and its field writes.
    records: BTreeMap<u64, (Stamp, BTreeSet<Flat>)>,
}

/// One field write: primary key, field (`None`: existence), value (existence: a bool).
type Flat = (Pk, Option<String>, Value);

fn flatten(e: &LogEntry) -> Vec<Flat> {
    written(e)
        .into_iter()
        .map(|w| {
            assert_eq!(w.collection, COLL);
            (w.pk, w.field, w.value)
        })
        .collect()
}

/// The user of the hostile client: no honest client is theirs.
const HOSTILE_USER: &str = "mallory";

/// A signed-in user who attacks: forges device ids, uploads with gaps and far-ahead
/// positions, replays other devices' transactions, and subscribes outside its rules. It
/// draws from a stream of its own, so the honest world of a seed is the same with it.
struct Hostile {
    rng: StdRng,
    /// Attacks per safety step.
    rate: f64,
    device: ReplicaId,
    token: String,
}

impl Hostile {
    fn new(seed: u64, secret: &Secret) -> Hostile {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x6d61_6c6c_6f72_7900);
        Hostile {
            rate: maybe(&mut rng, 0.10),
            rng,
            device: ReplicaId(0x6d61_6c6c_6f72_7901),
            token: token_for(secret, HOSTILE_USER),
        }
    }
}

/// An upload of one insert of the attacker's own object at `seq`.
fn hostile_upload(replica: ReplicaId, seq: u64, now_ms: u64) -> ClientMsg {
    ClientMsg::Upload {
        changeset: fieldlog::Changeset {
            origin: replica,
            entries: vec![LogEntry {
                seq,
                stamp: Stamp {
                    time: now_ms << 16,
                    replica,
                },
                writes: vec![fieldlog::Write {
                    collection: COLL.into(),
                    pk: Pk::Int(0),
                    op: Op::Insert {
                        fields: vec![(OWNER.into(), Value::from(HOSTILE_USER))],
                    },
                }],
            }],
        },
        more: false,
    }
}

/// `None` when the session refused the attacker's upload: a `BadChangeset` error, or no
/// answer to it at all (a session sending a snapshot drops uploads); otherwise what the
/// session did instead.
fn refused_as_bad_changeset(out: &[ServerMsg]) -> Option<String> {
    let acked = out
        .iter()
        .any(|m| matches!(m, ServerMsg::UploadAck { seq, .. } if *seq > 0));
    let refused = out.iter().any(|m| {
        matches!(
            m,
            ServerMsg::Error {
                code: ErrorCode::BadChangeset,
                ..
            }
        )
    });
    let snapshot = out
        .iter()
        .any(|m| matches!(m, ServerMsg::ResetRequired { .. }));
    (acked || !(refused || snapshot)).then(|| format!("expected the upload refused, got {out:?}"))
}

struct Sim {
    seed: u64,
    knobs: Knobs,
    rng: StdRng,
    r: Rates,
    tmp: tempfile::TempDir,
    secret: Secret,
    now: u64,
    step: usize,
    server_time: ManualTimeSource,
    server: Option<Arc<SyncServer>>,
    clients: Vec<Client>,
    faults: bool,
    audit: Audit,
    stats: Stats,
    trace: bool,
    value: i64,
    hostile: Hostile,
}

/// Replica ids, one store file each, made once per process. A seed deals them out to the
/// server and its clients in an order it draws, so a seed replays exactly (ids break stamp
/// ties and name counter parts) without paying for a new redb file per store.
const REPLICA_IDS: usize = 9;

/// The `k`-th template store file's bytes.
fn template(k: usize) -> &'static [u8] {
    static TEMPLATES: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    let templates = TEMPLATES.get_or_init(|| {
        let dir = scratch_dir();
        let time = ManualTimeSource::new(START_MS);
        (0..REPLICA_IDS)
            .map(|k| {
                let path = dir.path().join(format!("replica{k}.redb"));
                // `Store::open` keeps a replica id it finds in `meta`.
                let id = 0x5eed_0000_0000_0000 + (k as u64 + 1) * 0x0001_0203_0405_0607;
                {
                    let db = redb::Database::create(&path).unwrap();
                    let txn = db.begin_write().unwrap();
                    {
                        let meta: redb::TableDefinition<&str, &[u8]> =
                            redb::TableDefinition::new("meta");
                        let mut t = txn.open_table(meta).unwrap();
                        t.insert("replica_id", id.to_le_bytes().as_slice()).unwrap();
                    }
                    txn.commit().unwrap();
                }
                let store = Store::open_with(&path, options(&time)).unwrap();
                assert_eq!(
                    store.replica_id().0,
                    id,
                    "the store did not keep the replica id"
                );
                drop(store);
                std::fs::read(&path).unwrap()
            })
            .collect()
    });
    &templates[k]
}

/// A fresh store at `path` with the `k`-th replica id.
fn create_store(path: &std::path::Path, k: usize, time: &ManualTimeSource) -> Arc<Store> {
    std::fs::write(path, template(k)).unwrap();
    Arc::new(Store::open_with(path, options(time)).unwrap())
}

/// A scratch directory on tmpfs when there is one: every commit is durable (fsync), and the
/// simulation makes hundreds of thousands of them.
fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("fieldlog-sim")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// A local transaction's parts.
#[derive(Clone, Debug)]
enum ClientAction {
    Insert(i64, Vec<(&'static str, Value)>),
    Set(i64, &'static str, Value),
    Delete(i64),
    Increment(i64, i64),
    /// A write the user's rules forbid: an insert of an object owned by another user, or
    /// giving one's object to another user (an `Insert` or a `Set` of `owner`).
    Forbidden(Box<ClientAction>),
}

fn apply(tx: &mut WriteTx<'_>, a: &ClientAction) -> fieldlog::Result<()> {
    match a {
        ClientAction::Insert(pk, fields) => tx.insert(COLL, *pk, fields.iter().cloned()),
        ClientAction::Set(pk, f, v) => tx.set(COLL, *pk, f, v.clone()),
        ClientAction::Delete(pk) => tx.delete(COLL, *pk),
        ClientAction::Increment(pk, d) => tx.increment(COLL, *pk, COUNTER, *d),
        ClientAction::Forbidden(a) => apply(tx, a),
    }
}

impl Sim {
    fn new(seed: u64, knobs: Knobs) -> Sim {
        Sim::build(seed, knobs, |_| {})
    }

    /// A world for a scripted test: `clients` clients in `mode`, no faults, big batches.
    fn scripted(clients: usize, mode: ResetMode) -> Sim {
        let mut sim = Sim::build(0, Knobs::SUITE, |r| {
            r.clients = clients;
            r.server_batch = 1 << 20;
            r.client_batch = 1 << 20;
            r.client_window = 4;
        });
        sim.faults = false;
        let token = token_for(&sim.secret, &user_name(0));
        for c in &mut sim.clients {
            c.mode = mode;
            c.skew = 0;
            // One user, so every client sees every object.
            c.user = user_name(0);
            c.token = token.clone();
        }
        sim.tick(0);
        sim
    }

    fn build(seed: u64, knobs: Knobs, tweak: impl FnOnce(&mut Rates)) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut r = Rates::draw(&mut rng, knobs.scale);
        if !knobs.counters_with_deletes && r.counters && r.deletes {
            // KNOWN BUG 1: never both in one seed.
            r.deletes = false;
        }
        tweak(&mut r);
        let tmp = scratch_dir();
        let secret = Secret::generate();
        let server_time = ManualTimeSource::new(START_MS);
        let mut ids: Vec<usize> = (0..REPLICA_IDS).collect();
        ids.shuffle(&mut rng);
        let mut clients = Vec::new();
        for i in 0..r.clients {
            let skew = if rng.random_bool(0.7) {
                rng.random_range(-MAX_SKEW_MS..=MAX_SKEW_MS)
            } else {
                0
            };
            let time = ManualTimeSource::new(START_MS.wrapping_add_signed(skew));
            let path = tmp.path().join(format!("c{i}.redb"));
            let store = create_store(&path, ids[i + 1], &time);
            clients.push(Client {
                path,
                mode: random_mode(&mut rng),
                user: user_name(i % USERS),
                refused: Vec::new(),
                token: token_for(&secret, &user_name(i % USERS)),
                time,
                skew,
                partitioned_until: 0,
                store: Some(store),
                conn: None,
                reports: Vec::new(),
                errors: Vec::new(),
                cursor: 0,
                last_sync: 0,
                acked: 0,
                settled: Vec::new(),
                replay_after: None,
            });
        }
        create_store(&tmp.path().join("server.redb"), ids[0], &server_time);
        let hostile = Hostile::new(seed, &secret);
        let mut sim = Sim {
            seed,
            knobs,
            rng,
            r,
            tmp,
            secret,
            now: START_MS,
            step: 0,
            server_time,
            server: None,
            clients,
            faults: true,
            audit: Audit::default(),
            stats: Stats::default(),
            trace: std::env::var_os("FIELDLOG_SIM_TRACE").is_some(),
            value: 0,
            hostile,
        };
        sim.open_server();
        sim
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[{} step {}] {}", self.seed, self.step, what());
        }
    }

    fn server_path(&self) -> PathBuf {
        self.tmp.path().join("server.redb")
    }

    fn open_server(&mut self) {
        let store = Store::open_with(self.server_path(), options(&self.server_time)).unwrap();
        let mut config = ServerConfig::new(self.secret.clone());
        config.batch_bytes = self.r.server_batch;
        config.rules = Some(Arc::new(Rules::load(RULES).unwrap()));
        let server = SyncServer::open(Arc::new(store), config).unwrap();
        self.server = Some(Arc::new(server));
    }

    /// The server's store served without rules, for the audit (which must read the whole
    /// history and every tombstone).
    fn unfiltered(&self) -> R<Arc<SyncServer>> {
        let mut config = ServerConfig::new(self.secret.clone());
        config.batch_bytes = self.r.server_batch;
        SyncServer::open(Arc::clone(self.server().store()), config)
            .map(Arc::new)
            .map_err(|e| format!("unfiltered server: {e}"))
    }

    /// No client holds an object of another user, except one its own write gave away that
    /// the server has not refused yet (`strict`: none at all).
    fn check_holdings(&mut self, strict: bool) -> R {
        for i in 0..self.clients.len() {
            let store = self.store(i);
            let user = self.clients[i].user.clone();
            for o in store.scan(COLL).map_err(|e| e.to_string())? {
                let owner = owner_of(o.fields.iter().map(|(f, v)| (f.as_str(), v)));
                let Some(owner) = owner.filter(|o| *o != user) else {
                    continue;
                };
                let stamp = store
                    .get_field(COLL, o.pk.clone(), OWNER)
                    .map_err(|e| e.to_string())?
                    .map(|(_, s)| s);
                let own = stamp.is_some_and(|s| s.replica == store.replica_id());
                if strict || !own {
                    self.stats.leaks += 1;
                    return Err(format!(
                        "client {i} ({user}) holds {} of {owner} (owner written at {stamp:?})",
                        o.pk
                    ));
                }
            }
        }
        Ok(())
    }

    fn server(&self) -> &Arc<SyncServer> {
        self.server.as_ref().unwrap()
    }

    fn store(&self, i: usize) -> Arc<Store> {
        Arc::clone(self.clients[i].store.as_ref().unwrap())
    }

    fn tick(&mut self, ms: u64) {
        self.now += ms;
        self.server_time.set(self.now);
        for c in &self.clients {
            c.time.set(self.now.wrapping_add_signed(c.skew));
        }
    }

    // -- connections ----------------------------------------------------------------------

    fn connect(&mut self, i: usize) -> R {
        let server = Arc::clone(self.server.as_ref().unwrap());
        let c = &mut self.clients[i];
        if c.conn.is_some() || c.partitioned_until > self.step {
            return Ok(());
        }
        let mut config = ClientConfig::new(c.token.clone());
        config.reset_mode = c.mode;
        config.batch_bytes = self.r.client_batch;
        config.window = self.r.client_window;
        let mut client = ClientSession::new(Arc::clone(c.store.as_ref().unwrap()), config);
        let hello = client
            .hello()
            .map_err(|e| format!("client {i}: hello: {e}"))?;
        c.conn = Some(Conn {
            server: server.session(),
            client,
            up: VecDeque::from([hello]),
            down: VecDeque::new(),
            stalled_until: 0,
            upload_continues: false,
            ping: 0,
        });
        self.log(|| format!("client {i} connects"));
        Ok(())
    }

    fn disconnect(&mut self, i: usize) {
        let (knobs, now) = (self.knobs, self.now);
        let c = &mut self.clients[i];
        if let Some(mut conn) = c.conn.take() {
            if !knobs.final_snapshot_ack_lost {
                // KNOWN BUG 2: the connection breaks just after the final SnapshotAck.
                let last = conn
                    .up
                    .iter()
                    .position(|m| matches!(m, ClientMsg::SnapshotAck { settled: Some(_) }));
                if let Some(k) = last {
                    for m in conn.up.drain(..=k) {
                        let _ = conn.server.on_message(m, now);
                    }
                }
            }
            if !knobs.compensating_write_lost {
                // KNOWN BUG 4: queued refusals reach the client before the break.
                for m in conn.down.drain(..) {
                    if matches!(m, ServerMsg::CompensatingWrite { .. }) {
                        let _ = conn.client.on_message(m);
                    }
                }
                c.refused.extend(conn.client.take_refused_writes());
            }
            // Reports are taken after every message; none can be left here.
            let left = conn.client.take_reset_reports();
            c.errors.extend(
                left.iter()
                    .map(|r| format!("a reset report was not taken: {r:?}")),
            );
            let left = conn.client.take_refused_writes();
            c.errors.extend(
                left.iter()
                    .map(|r| format!("a refused write was not taken: {r:?}")),
            );
        }
    }

    fn cut(&mut self, i: usize) {
        self.stats.drops += 1;
        self.log(|| format!("client {i}: connection cut"));
        self.disconnect(i);
    }

    /// Queues what both sessions of client `i`'s connection have to send.
    fn poll(&mut self, i: usize) {
        let c = &mut self.clients[i];
        let Some(conn) = c.conn.as_mut() else {
            return;
        };
        let mut failed = None;
        loop {
            match conn.client.poll_upload() {
                Ok(Some(m)) => conn.up.push_back(m),
                Ok(None) => break,
                Err(e) => {
                    failed = Some(format!("poll_upload: {e}"));
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
            c.errors.push(e);
            self.disconnect(i);
        }
    }

    /// Delivers the next message on client `i`'s connection (`up`: client to server).
    fn deliver(&mut self, i: usize, up: bool) -> R {
        // Draw before borrowing, so the stream of draws does not depend on the branch taken.
        let drop = self.faults && self.rng.random_bool(self.r.drop);
        let dup = self.faults && self.rng.random_bool(self.r.dup);
        if drop {
            self.cut(i);
            return Ok(());
        }
        self.stats.delivered += 1;
        let now = self.now;
        if up {
            let conn = self.clients[i].conn.as_mut().unwrap();
            let m = conn.up.pop_front().unwrap();
            let duplicable = match &m {
                ClientMsg::Upload { more, .. } => {
                    let whole = !*more && !conn.upload_continues;
                    conn.upload_continues = *more;
                    whole
                }
                ClientMsg::DownloadAck { .. } | ClientMsg::Ping { .. } => true,
                _ => false,
            };
            let kind = m.kind();
            let times = if dup && duplicable { 2 } else { 1 };
            for _ in 1..times {
                let out = conn.server.on_message(m.clone(), now);
                conn.down.extend(out);
            }
            let out = conn.server.on_message(m, now);
            conn.down.extend(out);
            if times == 2 {
                self.stats.dups += 1;
            }
            self.log(|| {
                format!(
                    "client {i} -> server: {kind}{}",
                    if times == 2 { " x2" } else { "" }
                )
            });
            return Ok(());
        }
        let store = self.store(i);
        if !self.knobs.view_removes_unsynced {
            // KNOWN BUG 5: objects with unsynced writes are not removed.
            let front = self.clients[i].conn.as_mut().unwrap().down.front_mut();
            if let Some(ServerMsg::ViewDownload { removed, .. }) = front {
                let unsynced = store
                    .log_after(store.last_sync(), usize::MAX)
                    .map_err(|e| e.to_string())?;
                removed.retain(|(_, pk)| {
                    !unsynced
                        .iter()
                        .any(|e| e.writes.iter().any(|w| w.pk == *pk))
                });
            }
        }
        let c = &mut self.clients[i];
        let conn = c.conn.as_mut().unwrap();
        let m = conn.down.pop_front().unwrap();
        let kind = m.kind();
        let claimed = match &m {
            ServerMsg::UploadAck { seq, .. } => Some(*seq),
            ServerMsg::Welcome { uploaded, .. } | ServerMsg::ResetRequired { uploaded, .. } => {
                Some(*uploaded)
            }
            _ => None,
        };
        let trace = if self.trace {
            format!("{m:?}").chars().take(200).collect::<String>()
        } else {
            String::new()
        };
        let leaks = leaks_in(&m, &c.user);
        if !leaks.is_empty() {
            self.stats.leaks += leaks.len() as u64;
            return Err(format!("client {i}: {leaks:?}"));
        }
        let sync_before = store.last_sync();
        let r = conn.client.on_message(m);
        let reports = conn.client.take_reset_reports();
        let refused = conn.client.take_refused_writes();
        c.refused.extend(refused);
        match r {
            Ok(out) => conn.up.extend(out),
            Err(e) => {
                c.errors.push(format!("client {i}: on {kind}: {e}"));
                self.disconnect(i);
            }
        }
        self.log(|| format!("server -> client {i}: {trace}"));
        self.observe(i, kind, claimed, sync_before, reports)
    }

    /// After client `i` handled a `kind` message: cursors, acknowledgements, reset reports.
    fn observe(
        &mut self,
        i: usize,
        kind: &str,
        claimed: Option<u64>,
        sync_before: u64,
        reports: Vec<ResetReport>,
    ) -> R {
        let store = self.store(i);
        let (cursor, last_sync) = cursors(&store, &self.clients[i].token)?;
        let c = &mut self.clients[i];
        ensure!(
            last_sync >= c.last_sync,
            "client {i}: last_sync moved back from {} to {last_sync} on {kind}",
            c.last_sync
        );
        ensure!(
            cursor >= c.cursor || !reports.is_empty(),
            "client {i}: download cursor moved back from {} to {cursor} on {kind} without a reset",
            c.cursor
        );
        ensure!(
            reports.len() <= 1,
            "client {i}: {} reset reports from one message",
            reports.len()
        );
        if let Some(p) = claimed {
            c.acked = c.acked.max(p.min(store.log_head()));
            if kind == "ResetRequired" {
                c.replay_after = Some(last_sync.min(p));
            }
        }
        for report in reports {
            ensure!(
                kind == "SnapshotEnd",
                "client {i}: a reset report on {kind}"
            );
            self.stats.resets += 1;
            let c = &mut self.clients[i];
            let lo = c
                .replay_after
                .take()
                .ok_or_else(|| format!("client {i}: a reset without ResetRequired"))?;
            ensure!(
                lo == sync_before,
                "client {i}: a reset replays from {lo}, below its last sync {sync_before}: the server holds an older position for this client than the client has settled"
            );
            c.settled.push((lo, last_sync, c.reports.len()));
            check_report(i, &store, lo, last_sync, &report)?;
            self.log(|| {
                format!(
                    "client {i}: reset ({:?}) settled ({sync_before}, {last_sync}]: {} recovered, {} superseded, {} discarded",
                    report.reason,
                    report.recovered.len(),
                    report.superseded.len(),
                    report.discarded.len()
                )
            });
            self.log(|| format!("client {i}: {report:?}"));
            self.clients[i].reports.push(report);
        }
        let c = &mut self.clients[i];
        c.cursor = cursor;
        c.last_sync = last_sync;
        Ok(())
    }

    /// One step of the network: each connection (in a random order) delivers up to three
    /// messages unless stalled; clients without a connection may dial.
    fn network_step(&mut self) -> R {
        let mut order: Vec<usize> = (0..self.clients.len()).collect();
        order.shuffle(&mut self.rng);
        for i in order {
            if self.clients[i].conn.is_none() {
                if self.rng.random_bool(self.r.reconnect) {
                    self.connect(i)?;
                }
                continue;
            }
            if self.clients[i].conn.as_ref().unwrap().stalled_until > self.step {
                continue;
            }
            let n = self.rng.random_range(1..=3);
            for _ in 0..n {
                if !self.deliver_one(i)? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Delivers one message on client `i`'s connection, if it has one to deliver.
    fn deliver_one(&mut self, i: usize) -> R<bool> {
        self.poll(i);
        let Some(conn) = self.clients[i].conn.as_ref() else {
            return Ok(false);
        };
        let up = match (conn.up.is_empty(), conn.down.is_empty()) {
            (true, true) => return Ok(false),
            (false, true) => true,
            (true, false) => false,
            (false, false) => self.rng.random_bool(0.5),
        };
        self.deliver(i, up)?;
        Ok(true)
    }

    // -- faults and writes -----------------------------------------------------------------

    fn client_write(&mut self, i: usize) -> R {
        let store = self.store(i);
        let n = if self.rng.random_bool(0.15) {
            self.rng.random_range(2..=3)
        } else {
            1
        };
        let (counters, deletes, forbidden) = (self.r.counters, self.r.deletes, self.r.forbidden);
        let user = self.clients[i].user.clone();
        let rng = &mut self.rng;
        let value = &mut self.value;
        let mut actions = Vec::new();
        let r = store.write(|tx| {
            for _ in 0..n {
                let pk = rng.random_range(0..PKS);
                let live = tx.get(COLL, pk)?.is_some();
                let other = if rng.random_bool(forbidden) {
                    let k = rng.random_range(1..USERS);
                    let me: usize = user["user".len()..].parse().unwrap();
                    Some(Value::from(user_name((me + k) % USERS)))
                } else {
                    None
                };
                let a = if let Some(other) = other {
                    ClientAction::Forbidden(Box::new(if live {
                        ClientAction::Set(pk, OWNER, other)
                    } else {
                        let f = FIELDS[rng.random_range(0..FIELDS.len())];
                        ClientAction::Insert(pk, vec![(OWNER, other), (f, next_value(rng, value))])
                    }))
                } else if !live {
                    let mut fields = vec![(OWNER, Value::from(user.as_str()))];
                    for f in FIELDS {
                        if fields.len() == 1 || rng.random_bool(0.5) {
                            fields.push((f, next_value(rng, value)));
                        }
                    }
                    ClientAction::Insert(pk, fields)
                } else {
                    match rng.random_range(0..10) {
                        0 if deletes => ClientAction::Delete(pk),
                        1..=2 if counters => ClientAction::Increment(pk, rng.random_range(-5..=10)),
                        _ => {
                            let f = FIELDS[rng.random_range(0..FIELDS.len())];
                            ClientAction::Set(pk, f, next_value(rng, value))
                        }
                    }
                };
                apply(tx, &a)?;
                actions.push(a);
            }
            Ok(())
        });
        match r {
            Ok(((), c)) => {
                if c.seq.is_some() {
                    self.stats.client_ops += 1;
                }
                self.stats.forbidden += actions
                    .iter()
                    .filter(|a| matches!(a, ClientAction::Forbidden(_)))
                    .count() as u64;
                self.log(|| format!("client {i} writes {actions:?} -> {c:?}"));
                Ok(())
            }
            Err(e) => Err(format!("client {i}: write {actions:?}: {e}")),
        }
    }

    fn server_write(&mut self) -> R {
        let pk = self.rng.random_range(0..PKS);
        let v = next_value(&mut self.rng, &mut self.value);
        let f = FIELDS[self.rng.random_range(0..FIELDS.len())];
        let del = self.rng.random_bool(0.1) && self.r.deletes;
        let owner = Value::from(user_name(self.rng.random_range(0..USERS)));
        let r = self.server().write(|tx| {
            if tx.get(COLL, pk)?.is_none() {
                tx.insert(COLL, pk, [(f, v), (OWNER, owner)])
            } else if del {
                tx.delete(COLL, pk)
            } else {
                tx.set(COLL, pk, f, v)
            }
        });
        match r {
            Ok(()) => {
                self.stats.server_ops += 1;
                self.log(|| format!("server writes pk {pk}"));
                Ok(())
            }
            Err(Error::NotFound { .. } | Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(format!("server write: {e}")),
        }
    }

    fn crash(&mut self, i: usize) -> R {
        self.stats.crashes += 1;
        self.disconnect(i);
        let c = &mut self.clients[i];
        let store = c.store.take().unwrap();
        let store = Arc::into_inner(store).ok_or("the crashed client's store is shared")?;
        drop(store);
        let reopened = Store::open_with(&c.path, options(&c.time))
            .map_err(|e| format!("client {i}: reopen after a crash: {e}"))?;
        let reopened = Arc::new(reopened);
        let token = c.token.clone();
        c.store = Some(Arc::clone(&reopened));
        let (cursor, last_sync) = cursors(&reopened, &token)?;
        let c = &self.clients[i];
        ensure!(
            (cursor, last_sync) == (c.cursor, c.last_sync),
            "client {i}: a crash moved (cursor, last_sync) from {:?} to {:?}",
            (c.cursor, c.last_sync),
            (cursor, last_sync)
        );
        self.log(|| format!("client {i} crashes and restarts"));
        Ok(())
    }

    fn restart_server(&mut self) -> R {
        self.stats.server_restarts += 1;
        for i in 0..self.clients.len() {
            self.disconnect(i);
        }
        let (version, digest) = (self.server().version(), self.server().store().digest());
        let server =
            Arc::into_inner(self.server.take().unwrap()).ok_or("a session holds the server")?;
        drop(server);
        self.open_server();
        ensure!(
            self.server().version() == version && self.server().store().digest() == digest,
            "the server restarted at version {} (was {version}) or with another digest",
            self.server().version()
        );
        self.log(|| format!("server restarts at version {version}"));
        Ok(())
    }

    fn compact(&mut self) -> R {
        self.audit_history()?;
        let server = Arc::clone(self.server());
        let horizon = server.horizon().map_err(|e| e.to_string())?;
        let version = server.version();
        let upto = self.rng.random_range(horizon..=version);
        server
            .compact_history(upto)
            .map_err(|e| format!("compact: {e}"))?;
        self.stats.compactions += 1;
        self.log(|| format!("server compacts history up to {upto} (version {version})"));
        Ok(())
    }

    fn safety_step(&mut self) -> R {
        self.step += 1;
        let ms = self.rng.random_range(0..40);
        self.tick(ms);
        let n = self.clients.len();
        if self.rng.random_bool(self.r.write) {
            let i = self.rng.random_range(0..n);
            self.client_write(i)?;
        }
        if self.rng.random_bool(self.r.server_write) {
            self.server_write()?;
        }
        if self.rng.random_bool(self.r.partition) {
            let i = self.rng.random_range(0..n);
            self.clients[i].partitioned_until = self.step + self.rng.random_range(10..150);
            self.stats.partitions += 1;
            self.log(|| format!("client {i} partitioned"));
            self.disconnect(i);
        }
        if self.rng.random_bool(self.r.stall) {
            let i = self.rng.random_range(0..n);
            let until = self.step + self.rng.random_range(1..40);
            if let Some(conn) = self.clients[i].conn.as_mut() {
                conn.stalled_until = until;
            }
        }
        if self.rng.random_bool(self.r.ping) {
            let i = self.rng.random_range(0..n);
            if let Some(conn) = self.clients[i].conn.as_mut() {
                conn.ping += 1;
                conn.up.push_back(ClientMsg::Ping { id: conn.ping });
            }
        }
        if self.rng.random_bool(self.r.clock_jump) {
            let i = self.rng.random_range(0..n);
            self.clients[i].skew = self.rng.random_range(-MAX_SKEW_MS..=MAX_SKEW_MS);
            self.tick(0);
        }
        if self.rng.random_bool(self.r.crash) {
            let i = self.rng.random_range(0..n);
            self.crash(i)?;
        }
        if self.rng.random_bool(self.r.server_restart) {
            self.restart_server()?;
        }
        if self.rng.random_bool(self.r.compact) {
            self.compact()?;
        }
        if self.rng.random_bool(self.r.force_reset) {
            let i = self.rng.random_range(0..n);
            let id = self.store(i).replica_id();
            self.server()
                .force_reset(id)
                .map_err(|e| format!("force_reset: {e}"))?;
            self.stats.forced += 1;
            self.log(|| format!("operator forces a reset of client {i}"));
        }
        // Forbidden writes are drawn in `client_write`.
        self.hostile_step()?;
        self.network_step()?;
        self.check_holdings(false)
    }

    // -- the hostile client ------------------------------------------------------------------

    /// At the hostile rate, one attack on a session of its own; the server must refuse it
    /// without changing its state, and nothing of another user may reach the attacker.
    fn hostile_step(&mut self) -> R {
        if !self.hostile.rng.random_bool(self.hostile.rate) {
            return Ok(());
        }
        let server = Arc::clone(self.server());
        let before = (server.version(), server.store().digest());
        let attack = self.hostile.rng.random_range(0..4);
        let accepted = match attack {
            0 => self.hostile_forged_device(&server)?,
            1 => self.hostile_gap(&server)?,
            2 => self.hostile_replay(&server)?,
            _ => self.hostile_subscribe(&server)?,
        };
        self.stats.hostile += 1;
        let after = (server.version(), server.store().digest());
        if let Some(how) = accepted.or_else(|| {
            (after != before).then(|| format!("the server's state moved: {before:?} -> {after:?}"))
        }) {
            self.stats.hostile_accepted += 1;
            return Err(format!("hostile attack {attack} was not refused: {how}"));
        }
        Ok(())
    }

    /// Feeds `msgs` to a fresh session and returns every answer and download it gives,
    /// failing on anything of another user.
    fn hostile_session(
        &mut self,
        server: &Arc<SyncServer>,
        msgs: Vec<ClientMsg>,
    ) -> R<Vec<ServerMsg>> {
        let mut session = server.session();
        let mut out = Vec::new();
        for m in msgs {
            out.extend(session.on_message(m, self.now));
            out.extend(session.poll_download());
        }
        self.check_hostile_received(&out)?;
        Ok(out)
    }

    /// Nothing of another user reached the attacker: no object, no refused write.
    fn check_hostile_received(&mut self, msgs: &[ServerMsg]) -> R {
        for m in msgs {
            let mut leaks = leaks_in(m, HOSTILE_USER);
            if let ServerMsg::CompensatingWrite { refused } = m {
                leaks.push(format!("refused writes reached the attacker: {refused:?}"));
            }
            if !leaks.is_empty() {
                self.stats.leaks += 1;
                return Err(format!("hostile client: {}", leaks.join("; ")));
            }
        }
        Ok(())
    }

    /// The attacker's own Hello (its device, nothing synced).
    fn hostile_hello(&self, replica: ReplicaId) -> ClientMsg {
        support::hello(&self.hostile.token, replica)
    }

    /// Claims the device of a client that has synced (its id is in its stamps).
    fn hostile_forged_device(&mut self, server: &Arc<SyncServer>) -> R<Option<String>> {
        let known: Vec<ReplicaId> = (0..self.clients.len())
            .map(|i| self.store(i).replica_id())
            .filter(|id| server.uploaded(*id).is_ok_and(|u| u > 0))
            .collect();
        let Some(&victim) = known.choose(&mut self.hostile.rng) else {
            return Ok(None);
        };
        let mut hello = self.hostile_hello(victim);
        if let ClientMsg::Hello { last_sync, .. } = &mut hello {
            *last_sync = self.hostile.rng.random_range(0..3);
        }
        let upload = hostile_upload(victim, 1_000_000, self.now);
        let out = self.hostile_session(server, vec![hello, upload])?;
        self.log(|| format!("hostile: claims device {victim}"));
        Ok(match &out[..] {
            [ServerMsg::Error {
                code: ErrorCode::DeviceNotOwned,
                ..
            }] => None,
            other => Some(format!("a forged device got {other:?}")),
        })
    }

    /// Uploads on its own device at a position past the next one.
    fn hostile_gap(&mut self, server: &Arc<SyncServer>) -> R<Option<String>> {
        let gap = *[2u64, 3, 1_000, 1_000_000]
            .choose(&mut self.hostile.rng)
            .unwrap();
        let device = self.hostile.device;
        let msgs = vec![
            self.hostile_hello(device),
            hostile_upload(device, gap, self.now),
        ];
        let out = self.hostile_session(server, msgs)?;
        self.log(|| format!("hostile: uploads at position {gap}"));
        Ok(refused_as_bad_changeset(&out))
    }

    /// Uploads a transaction taken from an honest client's log.
    fn hostile_replay(&mut self, server: &Arc<SyncServer>) -> R<Option<String>> {
        let i = self.hostile.rng.random_range(0..self.clients.len());
        let log = self.store(i).log_after(0, 64).map_err(|e| e.to_string())?;
        let Some(entry) = log.choose(&mut self.hostile.rng).cloned() else {
            return Ok(None);
        };
        let device = self.hostile.device;
        let origin = if self.hostile.rng.random_bool(0.5) {
            device
        } else {
            entry.stamp.replica
        };
        let upload = ClientMsg::Upload {
            changeset: fieldlog::Changeset {
                origin,
                entries: vec![entry],
            },
            more: false,
        };
        let out = self.hostile_session(server, vec![self.hostile_hello(device), upload])?;
        self.log(|| format!("hostile: replays a transaction of client {i}"));
        Ok(refused_as_bad_changeset(&out))
    }

    /// Subscribes to another user's objects and takes every download and snapshot chunk.
    fn hostile_subscribe(&mut self, server: &Arc<SyncServer>) -> R<Option<String>> {
        let victim = user_name(self.hostile.rng.random_range(0..USERS));
        let mut hello = self.hostile_hello(self.hostile.device);
        if let ClientMsg::Hello { subscriptions, .. } = &mut hello {
            *subscriptions = Some(fieldlog::sync::protocol::SubscriptionSet {
                version: 1,
                subscriptions: vec![fieldlog::sync::protocol::Subscription::new(
                    "theirs",
                    COLL,
                    format!("{OWNER} == \"{victim}\""),
                )],
            });
        }
        let mut session = server.session();
        let mut msgs = session.on_message(hello, self.now);
        for _ in 0..256 {
            let out = session.poll_download();
            if out.is_empty() {
                break;
            }
            for m in &out {
                let ack = match m {
                    ServerMsg::Snapshot { end, .. } => ClientMsg::SnapshotAck {
                        settled: end.as_ref().map(|_| 0),
                    },
                    _ => ClientMsg::DownloadAck { cursor: 0 },
                };
                msgs.extend(session.on_message(ack, self.now));
            }
            msgs.extend(out);
        }
        self.check_hostile_received(&msgs)?;
        self.log(|| format!("hostile: subscribes to {victim}'s objects"));
        Ok(None)
    }

    // -- healing and checks ----------------------------------------------------------------

    /// No faults; rounds of (connect everyone, deliver until quiet) until converged.
    /// Returns the rounds it took.
    fn heal(&mut self) -> R<usize> {
        self.faults = false;
        for c in &mut self.clients {
            c.partitioned_until = 0;
            if let Some(conn) = c.conn.as_mut() {
                conn.stalled_until = 0;
            }
        }
        let mut why = String::new();
        for round in 1..=HEAL_ROUNDS_MAX {
            self.step += 1;
            self.tick(5);
            let mut moved = false;
            for i in 0..self.clients.len() {
                self.connect(i)?;
                for up in [true, false] {
                    self.poll(i);
                    let Some(conn) = self.clients[i].conn.as_ref() else {
                        continue;
                    };
                    let queue_empty = if up {
                        conn.up.is_empty()
                    } else {
                        conn.down.is_empty()
                    };
                    if !queue_empty {
                        self.deliver(i, up)?;
                        moved = true;
                    }
                }
            }
            self.no_errors()?;
            self.check_holdings(false)?;
            match self.divergence()? {
                None if self.in_flight() == 0 => return Ok(round),
                None => why = "messages still in flight".into(),
                Some(w) => why = w,
            }
            if !moved {
                return Err(format!(
                    "healing stopped after {round} rounds, nothing left to deliver, yet: {why}"
                ));
            }
        }
        Err(format!(
            "no convergence within {HEAL_ROUNDS_MAX} healing rounds: {why}"
        ))
    }

    /// Delivers (without faults) until nothing moves.
    fn settle(&mut self) -> R {
        for _ in 0..100_000 {
            let mut moved = false;
            for i in 0..self.clients.len() {
                moved |= self.deliver_one(i)?;
            }
            if !moved {
                return Ok(());
            }
        }
        Err("the sessions did not settle".into())
    }

    fn in_flight(&self) -> usize {
        let queued = |c: &Client| c.conn.as_ref().map_or(0, |k| k.up.len() + k.down.len());
        self.clients.iter().map(queued).sum()
    }

    fn no_errors(&self) -> R {
        for (i, c) in self.clients.iter().enumerate() {
            ensure!(
                c.errors.is_empty(),
                "client {i} ({:?}): {:?}",
                c.mode,
                c.errors
            );
        }
        Ok(())
    }

    /// The server's live objects owned by `user`.
    fn server_objects_of(&self, user: &str) -> R<Vec<fieldlog::Object>> {
        let all = self
            .server()
            .store()
            .scan(COLL)
            .map_err(|e| e.to_string())?;
        Ok(all
            .into_iter()
            .filter(|o| owner_of(o.fields.iter().map(|(f, v)| (f.as_str(), v))) == Some(user))
            .collect())
    }

    /// Why the replicas are not converged yet, if they are not.
    fn divergence(&self) -> R<Option<String>> {
        let server = self.server();
        let (version, digest) = (server.version(), server.store().digest());
        for (i, c) in self.clients.iter().enumerate() {
            let store = c.store.as_ref().unwrap();
            let hello = ClientSession::new(Arc::clone(store), ClientConfig::new(c.token.clone()))
                .hello()
                .map_err(|e| e.to_string())?;
            let ClientMsg::Hello {
                download_cursor,
                last_sync,
                reset_pending,
                reset_settled,
                ..
            } = hello
            else {
                unreachable!()
            };
            if last_sync != store.log_head() {
                return Ok(Some(format!(
                    "client {i}: last_sync {last_sync} < log head {}",
                    store.log_head()
                )));
            }
            if reset_pending || reset_settled.is_some() {
                return Ok(Some(format!("client {i}: a reset is unfinished")));
            }
            if download_cursor != version {
                return Ok(Some(format!(
                    "client {i}: cursor {download_cursor}, server version {version}"
                )));
            }
            let _ = digest;
            let mine = store.scan(COLL).map_err(|e| e.to_string())?;
            let theirs = self.server_objects_of(&c.user)?;
            if mine != theirs {
                let diff: Vec<_> = mine
                    .iter()
                    .filter(|o| !theirs.contains(o))
                    .map(|o| format!("client has {o:?}"))
                    .chain(
                        theirs
                            .iter()
                            .filter(|o| !mine.contains(o))
                            .map(|o| format!("server has {o:?}")),
                    )
                    .collect();
                return Ok(Some(format!(
                    "client {i}: its objects differ from the server's objects of {}: {diff:?}",
                    c.user
                )));
            }
        }
        Ok(None)
    }

    /// A Hello of a made-up replica with no log (client 0's, with its own fields changed, so
    /// fields the protocol adds keep a client's values).
    fn observer_hello(&self, cursor: u64, reset: bool) -> R<ClientMsg> {
        let mut hello = ClientSession::new(
            self.store(0),
            ClientConfig::new(self.clients[0].token.clone()),
        )
        .hello()
        .map_err(|e| e.to_string())?;
        let ClientMsg::Hello {
            replica,
            download_cursor,
            last_sync,
            reset_pending,
            reset_settled,
            ..
        } = &mut hello
        else {
            return Err("hello is not a Hello".into());
        };
        *replica = fieldlog::ReplicaId(0x0b5e_7e70);
        *download_cursor = cursor;
        *last_sync = 0;
        *reset_pending = reset;
        *reset_settled = None;
        Ok(hello)
    }

    /// Reads the server's history after `audit.upto` through downloads to a made-up replica
    /// (which has no entries of its own, so it gets every record).
    fn audit_history(&mut self) -> R {
        let server = self.unfiltered()?;
        let version = server.version();
        if self.audit.upto >= version {
            return Ok(());
        }
        let hello = self.observer_hello(self.audit.upto, false)?;
        let mut s = server.session();
        let out = s.on_message(hello, self.now);
        ensure!(
            matches!(out.as_slice(), [ServerMsg::Welcome { .. }]),
            "audit: the observer was not welcomed at {}: {out:?}",
            self.audit.upto
        );
        let mut partial: Option<LogEntry> = None;
        let mut cursor = self.audit.upto;
        while cursor < version {
            let out = s.poll_download();
            ensure!(
                !out.is_empty(),
                "audit: no download at cursor {cursor} < {version}"
            );
            for m in out {
                let ServerMsg::Download {
                    changeset,
                    more,
                    cursor: c,
                } = m
                else {
                    return Err(format!("audit: unexpected {m:?}"));
                };
                let n = changeset.entries.len();
                for (k, e) in changeset.entries.into_iter().enumerate() {
                    match partial.take() {
                        Some(mut joined) if joined.seq == e.seq => {
                            ensure!(
                                joined.stamp == e.stamp,
                                "audit: pieces of {} differ in stamp",
                                e.seq
                            );
                            join_piece(&mut joined, e);
                            partial = Some(joined);
                        }
                        Some(joined) => {
                            return Err(format!(
                                "audit: transaction {} was not continued",
                                joined.seq
                            ))
                        }
                        None => partial = Some(e),
                    }
                    let continues = more && k + 1 == n;
                    if !continues {
                        let e = partial.take().unwrap();
                        let (seq, stamp, acc) = (e.seq, e.stamp, flatten(&e));
                        let set: BTreeSet<Flat> = acc.iter().cloned().collect();
                        ensure!(
                            set.len() == acc.len(),
                            "audit: history {seq} holds one field write twice"
                        );
                        ensure!(
                            seq > self.audit.upto,
                            "audit: history {seq} again, after {}",
                            self.audit.upto
                        );
                        let old = self.audit.records.insert(seq, (stamp, set));
                        ensure!(old.is_none(), "audit: history {seq} downloaded twice");
                    }
                }
                cursor = c;
                let _ = s.on_message(ClientMsg::DownloadAck { cursor: c }, self.now);
            }
        }
        ensure!(
            partial.is_none(),
            "audit: a transaction was left unfinished"
        );
        ensure!(
            cursor == version,
            "audit: the downloads ended at {cursor}, the server is at {version}"
        );
        self.audit.upto = version;
        Ok(())
    }

    /// The server's full state with every stamp and tombstone, as a resetting client gets it
    /// (a made-up replica resuming a reset, which never acknowledges the last chunk).
    fn server_snapshot(&self) -> R<Vec<ObjectSnapshot>> {
        let hello = self.observer_hello(0, true)?;
        let server = self.unfiltered()?;
        let mut s = server.session();
        let out = s.on_message(hello, self.now);
        ensure!(
            matches!(out.as_slice(), [ServerMsg::ResetRequired { .. }]),
            "snapshot: {out:?}"
        );
        let mut objects = Vec::new();
        loop {
            let out = s.poll_download();
            let Some(ServerMsg::Snapshot {
                objects: o, end, ..
            }) = out.into_iter().next()
            else {
                return Err("snapshot: not a snapshot".into());
            };
            objects.extend(o);
            if end.is_some() {
                return Ok(objects);
            }
            let _ = s.on_message(ClientMsg::SnapshotAck { settled: None }, self.now);
        }
    }

    fn check_final(&mut self) -> R {
        self.check_holdings(true)?;
        self.audit_history()?;
        let server = Arc::clone(self.server());
        let version = server.version();

        // Every log entry, by stamp (clients and the server's own writes).
        let mut logs: Vec<Vec<LogEntry>> = Vec::new();
        for c in &self.clients {
            let store = c.store.as_ref().unwrap();
            logs.push(store.log_after(0, usize::MAX).map_err(|e| e.to_string())?);
        }
        let server_log = server
            .store()
            .log_after(0, usize::MAX)
            .map_err(|e| e.to_string())?;
        // Writes the server refused (compensating writes), as field writes of the logs.
        let mut comp: BTreeSet<(Stamp, Pk, Option<String>, Value)> = BTreeSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            let store = c.store.as_ref().unwrap();
            let kept: Vec<RefusedWrite> = sync_client::rejected_writes(store)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|(_, r)| r)
                .collect();
            ensure!(
                kept == c.refused,
                "client {i}: rejected_writes {kept:?} differ from the refused writes reported {:?}",
                c.refused
            );
            for r in &c.refused {
                let w = logs[i]
                    .iter()
                    .filter(|e| e.stamp == r.stamp)
                    .flat_map(|e| &e.writes)
                    .find(|w| w.collection == r.collection && w.pk == r.pk && same_write(w, r))
                    .ok_or_else(|| format!("client {i}: refused write {r:?} is in no log entry"))?;
                let one = LogEntry {
                    seq: 0,
                    stamp: r.stamp,
                    writes: vec![w.clone()],
                };
                comp.extend(
                    flatten(&one)
                        .into_iter()
                        .map(|(p, f, v)| (r.stamp, p, f, v)),
                );
            }
        }
        let mut by_stamp: HashMap<Stamp, Vec<BTreeSet<Flat>>> = HashMap::new();
        for e in logs.iter().flatten() {
            by_stamp.entry(e.stamp).or_default().push(
                flatten(e)
                    .into_iter()
                    .filter(|(p, f, v)| !comp.contains(&(e.stamp, p.clone(), f.clone(), v.clone())))
                    .collect(),
            );
        }
        for e in &server_log {
            by_stamp
                .entry(e.stamp)
                .or_default()
                .push(flatten(e).into_iter().collect());
        }

        // No upload applied twice, none invented, no version without a record.
        ensure!(
            self.audit.records.len() as u64 == version
                && self
                    .audit
                    .records
                    .keys()
                    .all(|&v| (1..=version).contains(&v)),
            "history: {} records for {version} versions",
            self.audit.records.len()
        );
        let mut seen: HashMap<Stamp, u64> = HashMap::new();
        for (v, (stamp, set)) in &self.audit.records {
            if let Some(first) = seen.insert(*stamp, *v) {
                return Err(format!(
                    "history: transaction {stamp} applied twice, at versions {first} and {v}"
                ));
            }
            if let Some((p, f, v)) = set
                .iter()
                .find(|(p, f, v)| comp.contains(&(*stamp, p.clone(), f.clone(), v.clone())))
            {
                return Err(format!(
                    "history {v}: the refused write {p}.{f:?} = {v:?} at {stamp} was applied"
                ));
            }
            let known = by_stamp.get(stamp).is_some_and(|sets| sets.contains(set));
            if let Some(log) = by_stamp
                .get(stamp)
                .and_then(|sets| sets.iter().find(|l| !known && set.is_subset(l)))
            {
                let unreported: Vec<&Flat> = log.difference(set).collect();
                return Err(format!(
                    "history {v}: the server left {unreported:?} of transaction {stamp} out (refused), and the client was never told (no CompensatingWrite names them)"
                ));
            }
            ensure!(
                known,
                "history {v}: transaction {stamp} {set:?} is in no log (logs hold {:?})",
                by_stamp.get(stamp)
            );
        }
        for e in &server_log {
            ensure!(
                seen.contains_key(&e.stamp),
                "the server's own write {} is not in its history",
                e.stamp
            );
        }

        // Writes refused in a reset report (superseded or discarded).
        let mut refused: BTreeSet<(Stamp, Pk, Option<String>, Value)> = BTreeSet::new();
        let key = |w: &UnsyncedWrite| (w.stamp, w.pk.clone(), w.field.clone(), w.value.clone());
        for c in &self.clients {
            for r in &c.reports {
                refused.extend(r.superseded.iter().map(|s| key(&s.write)));
                refused.extend(r.discarded.iter().map(|d| key(&d.write)));
            }
        }
        // Every write giving an object to another user was refused (or settled by a reset,
        // or beaten: a stale write changes nothing, and the server need not refuse it).
        let mut in_report: BTreeSet<(Stamp, Pk, Option<String>, Value)> = BTreeSet::new();
        for c in &self.clients {
            for r in &c.reports {
                in_report.extend(r.recovered.iter().map(key));
            }
        }
        let snapshot = self.server_snapshot()?;
        let reports: Vec<&ResetReport> = self.clients.iter().flat_map(|c| &c.reports).collect();
        for (i, c) in self.clients.iter().enumerate() {
            for e in &logs[i] {
                for (p, f, v) in flatten(e) {
                    let foreign = f.as_deref() == Some(OWNER) && v != Value::from(c.user.as_str());
                    let k = (e.stamp, p, f, v);
                    if !foreign
                        || comp.contains(&k)
                        || refused.contains(&k)
                        || in_report.contains(&k)
                    {
                        continue;
                    }
                    let w = (k.1.clone(), k.2.clone(), k.3.clone());
                    let f = fate(&snapshot, &reports, e.stamp, &w);
                    ensure!(
                        f == Fate::Beaten,
                        "client {i} ({}): the forbidden write {k:?} was not refused ({f:?})",
                        c.user
                    );
                }
            }
        }
        refused.extend(comp.iter().cloned());

        // No acknowledged write lost; every committed write accounted for.
        for (i, c) in self.clients.iter().enumerate() {
            for e in &logs[i] {
                let settled = c
                    .settled
                    .iter()
                    .any(|&(lo, hi, _)| lo < e.seq && e.seq <= hi);
                let acked = e.seq <= c.acked && !settled;
                if acked {
                    ensure!(
                        seen.contains_key(&e.stamp),
                        "client {i}: acknowledged entry {} ({}) is not in the server's history",
                        e.seq,
                        e.stamp
                    );
                }
                for w in flatten(e) {
                    let f = fate(&snapshot, &reports, e.stamp, &w);
                    if comp.contains(&(e.stamp, w.0.clone(), w.1.clone(), w.2.clone())) {
                        ensure!(
                            f != Fate::OnServer,
                            "client {i}: the refused write {w:?} at {} is on the server",
                            e.stamp
                        );
                        continue;
                    }
                    ensure!(
                        f != Fate::Lost,
                        "client {i} ({:?}): write {w:?} of entry {} at {} was lost",
                        c.mode,
                        e.seq,
                        e.stamp
                    );
                    ensure!(
                        !acked || matches!(f, Fate::OnServer | Fate::Beaten),
                        "client {i}: acknowledged write {w:?} of entry {} at {} is {f:?}",
                        e.seq,
                        e.stamp
                    );
                    ensure!(
                        !(recovering(c.mode) && f == Fate::Discarded),
                        "client {i} ({:?}): recovering, yet {w:?} at {} was discarded",
                        c.mode,
                        e.stamp
                    );
                    if f == Fate::Superseded {
                        // Reported superseded while nothing newer is on the server: only an
                        // update of an object the server has deleted (or the client may no
                        // longer see: another user's).
                        let live = snapshot
                            .iter()
                            .find(|o| o.pk == w.0)
                            .filter(|o| {
                                owner_of(o.fields.iter().map(|(f, _, v)| (f.as_str(), v)))
                                    == Some(c.user.as_str())
                            })
                            .and_then(|o| o.exists)
                            .is_some_and(|(_, alive)| alive);
                        ensure!(
                            w.1.is_some() && !live,
                            "client {i}: {w:?} at {} reported superseded, yet newer than the server's state",
                            e.stamp
                        );
                    }
                }
            }
        }
        // The oracle: the merge rule over every write that was not refused.
        let mut writes: HashMap<(Stamp, Pk, Option<String>), Value> = HashMap::new();
        for e in logs.iter().flatten().chain(&server_log) {
            for (pk, field, value) in flatten(e) {
                if refused.contains(&(e.stamp, pk.clone(), field.clone(), value.clone())) {
                    continue;
                }
                if let Some(old) =
                    writes.insert((e.stamp, pk.clone(), field.clone()), value.clone())
                {
                    ensure!(
                        old == value,
                        "two writes of {pk}.{field:?} at {} differ: {old:?} and {value:?}",
                        e.stamp
                    );
                }
            }
        }
        let oracle = fold(&writes);
        let scanned = server.store().scan(COLL).map_err(|e| e.to_string())?;
        let actual: BTreeMap<Pk, BTreeMap<String, Value>> =
            scanned.into_iter().map(|o| (o.pk, o.fields)).collect();
        let expected: BTreeMap<Pk, BTreeMap<String, Value>> = oracle
            .iter()
            .filter(|(_, o)| o.alive)
            .map(|(pk, o)| (pk.clone(), o.visible()))
            .collect();
        if actual != expected {
            let mut diff = Vec::new();
            for pk in actual
                .keys()
                .chain(expected.keys())
                .collect::<BTreeSet<_>>()
            {
                if actual.get(pk) != expected.get(pk) {
                    diff.push(format!(
                        "{pk}: server {:?}, oracle {:?} ({:?})",
                        actual.get(pk),
                        expected.get(pk),
                        oracle.get(pk)
                    ));
                }
            }
            return Err(format!("the server differs from the oracle: {diff:?}"));
        }
        for (pk, o) in &oracle {
            if !o.alive {
                continue;
            }
            for (f, (stamp, v)) in &o.fields {
                if f.starts_with("__") {
                    continue;
                }
                let got = server
                    .store()
                    .get_field(COLL, pk.clone(), f)
                    .map_err(|e| e.to_string())?;
                ensure!(
                    got == Some((v.clone(), *stamp)),
                    "{pk}.{f}: server {got:?}, oracle {:?}",
                    (v, stamp)
                );
            }
        }

        Ok(())
    }
}

/// Whether a refused write is this log write.
fn same_write(w: &fieldlog::Write, r: &RefusedWrite) -> bool {
    match &w.op {
        Op::Insert { fields } => !r.delete && *fields == r.fields,
        Op::Update { fields } => {
            !r.delete
                && fields.len() == r.fields.len()
                && fields
                    .iter()
                    .zip(&r.fields)
                    .all(|(a, (f, v))| a.field == *f && a.value == *v)
        }
        Op::Delete { .. } => r.delete,
    }
}

fn next_value(rng: &mut StdRng, value: &mut i64) -> Value {
    *value += 1;
    match rng.random_range(0..10) {
        0 => Value::from(format!("s{value}")),
        // Large enough to split a transaction into pieces at the small batch sizes.
        1 => Value::from(format!(
            "{value}:{}",
            "x".repeat(rng.random_range(100..400))
        )),
        _ => Value::from(*value),
    }
}

/// A client's download cursor and last sync, as its next Hello would carry them.
fn cursors(store: &Arc<Store>, token: &str) -> R<(u64, u64)> {
    let hello = ClientSession::new(Arc::clone(store), ClientConfig::new(token))
        .hello()
        .map_err(|e| format!("hello: {e}"))?;
    match hello {
        ClientMsg::Hello {
            download_cursor,
            last_sync,
            ..
        } => Ok((download_cursor, last_sync)),
        _ => Err("hello is not a Hello".into()),
    }
}

/// A reset report names every field write of the log range `(lo, hi]` it settled, once, and
/// nothing else.
fn check_report(i: usize, store: &Store, lo: u64, hi: u64, r: &ResetReport) -> R {
    ensure!(hi >= lo, "client {i}: the reset settled ({lo}, {hi}]");
    let entries = store
        .log_after(lo, (hi - lo) as usize)
        .map_err(|e| e.to_string())?;
    let mut want: Vec<(Stamp, Flat)> = Vec::new();
    for e in &entries {
        want.extend(flatten(e).into_iter().map(|w| (e.stamp, w)));
    }
    let named = r
        .recovered
        .iter()
        .chain(r.superseded.iter().map(|s| &s.write))
        .chain(r.discarded.iter().map(|d| &d.write));
    let mut got: Vec<(Stamp, Flat)> = named
        .map(|w| {
            assert_eq!(w.collection, COLL);
            (w.stamp, (w.pk.clone(), w.field.clone(), w.value.clone()))
        })
        .collect();
    want.sort();
    got.sort();
    ensure!(
        want == got,
        "client {i}: the reset report ({:?}) does not name exactly the writes of ({lo}, {hi}]: log {want:?}, report {got:?}",
        r.reason
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The oracle
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct OracleObject {
    alive: bool,
    /// Field → (stamp, value) of its highest write at or above the floor.
    fields: BTreeMap<String, (Stamp, Value)>,
}

impl OracleObject {
    /// The fields as the store shows them: counter parts summed into their counter.
    fn visible(&self) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        let mut counters: BTreeMap<String, i64> = BTreeMap::new();
        for (f, (_, v)) in &self.fields {
            match (f.strip_prefix("__c."), v) {
                (Some(rest), Value::Int(n)) => {
                    let (parent, _replica) = rest.rsplit_once('.').expect("a counter part");
                    let sum = counters.entry(parent.to_owned()).or_default();
                    *sum = sum.wrapping_add(*n);
                }
                _ => {
                    out.insert(f.clone(), v.clone());
                }
            }
        }
        for (f, n) in counters {
            out.insert(f, Value::Int(n));
        }
        out
    }
}

/// The merge rule as DESIGN.md states it, over a set of writes: the existence register is
/// the highest insert or delete, the floor its stamp, and each field the highest write at or
/// above the floor.
fn fold(writes: &HashMap<(Stamp, Pk, Option<String>), Value>) -> BTreeMap<Pk, OracleObject> {
    let mut exists: BTreeMap<Pk, (Stamp, bool)> = BTreeMap::new();
    for ((stamp, pk, field), v) in writes {
        if field.is_none() {
            let alive = *v == Value::Bool(true);
            let e = exists.entry(pk.clone()).or_insert((*stamp, alive));
            if *stamp > e.0 {
                *e = (*stamp, alive);
            }
        }
    }
    let mut out: BTreeMap<Pk, OracleObject> = BTreeMap::new();
    for (pk, (_, alive)) in &exists {
        out.entry(pk.clone()).or_default().alive = *alive;
    }
    for ((stamp, pk, field), v) in writes {
        let Some(f) = field else { continue };
        let floor = exists.get(pk).map_or(Stamp::ZERO, |e| e.0);
        if *stamp < floor {
            continue;
        }
        let o = out.entry(pk.clone()).or_default();
        match o.fields.get(f) {
            Some((s, _)) if s >= stamp => {}
            _ => {
                o.fields.insert(f.clone(), (*stamp, v.clone()));
            }
        }
    }
    out
}

/// Where a write ended up (the shared oracle, on this suite's one collection).
fn fate(snapshot: &[ObjectSnapshot], reports: &[&ResetReport], stamp: Stamp, w: &Flat) -> Fate {
    let (pk, field, value) = w.clone();
    let w = Written {
        collection: COLL.into(),
        pk,
        field,
        value,
        stamp,
    };
    support::oracle::fate(snapshot, reports, &w)
}

// ---------------------------------------------------------------------------------------
// Running seeds
// ---------------------------------------------------------------------------------------

/// Runs one seed's safety and healing phases.
fn healed(seed: u64, knobs: Knobs) -> R<Sim> {
    let mut sim = Sim::new(seed, knobs);
    sim.log(|| {
        let modes: Vec<_> = sim.clients.iter().map(|c| c.mode).collect();
        format!("rates {:?}, modes {modes:?}", sim.r)
    });
    for _ in 0..sim.r.steps {
        sim.safety_step()?;
    }
    sim.stats.heal_rounds = sim.heal()?;
    Ok(sim)
}

/// Runs one seed; returns its figures or why it failed.
fn run_seed(seed: u64, knobs: Knobs) -> R<Stats> {
    let mut sim = healed(seed, knobs)?;
    sim.check_final()?;
    sim.stats.refused = sim.clients.iter().map(|c| c.refused.len() as u64).sum();
    Ok(sim.stats)
}

/// Runs one seed, turning a panic into a failure that names it.
fn run_seed_caught(seed: u64, knobs: Knobs) -> R<Stats> {
    match catch_unwind(AssertUnwindSafe(|| run_seed(seed, knobs))) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            Err(format!("panicked: {msg}"))
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
    )
}

/// Replays one seed and fails with its message (for regression tests).
fn replay(seed: u64, knobs: Knobs) {
    if let Err(e) = run_seed_caught(seed, knobs) {
        panic!("SEED={seed}: {e}");
    }
}

#[test]
fn simulation() {
    let seeds: Vec<u64> = match env_u64("FIELDLOG_SIM_SEED") {
        Some(s) => vec![s],
        None => {
            let first = env_u64("FIELDLOG_SIM_FIRST").unwrap_or(0);
            let n = env_u64("FIELDLOG_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
            (first..first + n).collect()
        }
    };
    // FIELDLOG_SIM_KNOWN_BUGS=1 stops steering around the open bugs (to see them fixed).
    let knobs = Knobs {
        scale: scale(),
        ..if std::env::var_os("FIELDLOG_SIM_KNOWN_BUGS").is_some() {
            Knobs::ALL
        } else {
            Knobs::SUITE
        }
    };
    let started = Instant::now();
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for &seed in &seeds {
        match run_seed_caught(seed, knobs) {
            Ok(s) => total.add(&s),
            Err(e) => {
                let mut how = String::new();
                if knobs.scale != 1 {
                    how += &format!(" FIELDLOG_SIM_SCALE={}", knobs.scale);
                }
                if knobs.final_snapshot_ack_lost
                    && knobs.compensating_write_lost
                    && knobs.view_removes_unsynced
                {
                    how += " FIELDLOG_SIM_KNOWN_BUGS=1";
                }
                eprintln!("SEED={seed}:{how} {e}");
                failures.push(seed);
            }
        }
    }
    println!(
        "simulation: seeds={} client_ops={} convergence_failures={} max_rounds={} resets={} refused={} leaks={} hostile_attacks={} hostile_accepted={}",
        seeds.len(),
        total.client_ops,
        failures.len(),
        total.heal_rounds,
        total.resets,
        total.refused,
        total.leaks,
        total.hostile,
        total.hostile_accepted
    );
    println!(
        "simulation: forbidden={} server_ops={} messages={} drops={} duplicates={} crashes={} server_restarts={} compactions={} forced_resets={} partitions={} seconds={:.1}",
        total.forbidden,
        total.server_ops,
        total.delivered,
        total.drops,
        total.dups,
        total.crashes,
        total.server_restarts,
        total.compactions,
        total.forced,
        total.partitions,
        started.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "failing seeds (replay with FIELDLOG_SIM_SEED=<n>): {failures:?}"
    );
}

/// The checks themselves can fail: an oracle that forgets one write disagrees with the
/// server.
#[test]
fn the_oracle_sees_a_missing_write() {
    let s = |t: u64| Stamp {
        time: t << 16,
        replica: fieldlog::ReplicaId(1),
    };
    let mut writes = HashMap::new();
    writes.insert((s(1), Pk::Int(1), None), Value::Bool(true));
    writes.insert((s(1), Pk::Int(1), Some("a".to_owned())), Value::Int(1));
    writes.insert((s(2), Pk::Int(1), Some("a".to_owned())), Value::Int(2));
    writes.insert(
        (s(3), Pk::Int(1), Some("__c.n.0000000000000001".to_owned())),
        Value::Int(5),
    );
    let o = fold(&writes);
    assert_eq!(
        o[&Pk::Int(1)].visible(),
        BTreeMap::from([
            ("a".to_owned(), Value::Int(2)),
            ("n".to_owned(), Value::Int(5))
        ])
    );
    // A delete above the field write hides it; a re-insert does not bring it back.
    writes.insert((s(4), Pk::Int(1), None), Value::Bool(false));
    writes.insert((s(5), Pk::Int(1), None), Value::Bool(true));
    let o = fold(&writes);
    assert!(o[&Pk::Int(1)].alive);
    assert!(o[&Pk::Int(1)].visible().is_empty());
}

/// Each final check fails when what it guards is broken: a seed that passes is healed, then
/// sabotaged in one way, and `check_final` must name the damage.
#[test]
fn the_checks_can_fail() {
    let sabotaged = |seed: u64, f: &dyn Fn(&mut Sim)| -> R {
        let mut sim = healed(seed, Knobs::SUITE).unwrap();
        f(&mut sim);
        sim.check_final()
    };
    // The first seed where client 0 wrote.
    let seed = (0..)
        .find(|&seed| healed(seed, Knobs::SUITE).unwrap().store(0).log_head() > 0)
        .unwrap();

    // An upload applied twice: client 0's first transaction again, under a new position.
    let e = sabotaged(seed, &|sim| {
        let store = sim.store(0);
        let mut entry = store.log_after(0, 1).unwrap().remove(0);
        entry.seq = store.log_head() + 1;
        let mut session = sim.server().session();
        let hello = ClientSession::new(store, ClientConfig::new(sim.clients[0].token.clone()))
            .hello()
            .unwrap();
        let welcome = session.on_message(hello, sim.now);
        assert!(
            matches!(welcome[..], [ServerMsg::Welcome { .. }]),
            "{welcome:?}"
        );
        let upload = ClientMsg::Upload {
            changeset: fieldlog::Changeset {
                origin: sim.store(0).replica_id(),
                entries: vec![entry],
            },
            more: false,
        };
        let ack = session.on_message(upload, sim.now);
        assert!(matches!(ack[..], [ServerMsg::UploadAck { .. }]), "{ack:?}");
    });
    assert!(
        e.as_ref().is_err_and(|e| e.contains("applied twice")),
        "{e:?}"
    );

    // The server's state changed behind every log's back. A served store refuses writes
    // around its server: this one is written between a server and the next.
    let e = sabotaged(seed, &|sim| {
        for i in 0..sim.clients.len() {
            sim.disconnect(i);
        }
        let server = Arc::into_inner(sim.server.take().unwrap()).expect("a session holds it");
        let store = Arc::clone(server.store());
        drop(server);
        let forger = fieldlog::ReplicaId(0xf0f0);
        let cs = fieldlog::Changeset {
            origin: forger,
            entries: vec![LogEntry {
                seq: 1,
                stamp: Stamp {
                    // Ahead of every skewed clock, within the drift bound.
                    time: (sim.now + 200_000) << 16,
                    replica: forger,
                },
                writes: vec![fieldlog::Write {
                    collection: COLL.into(),
                    pk: Pk::Int(0),
                    op: Op::Insert {
                        fields: vec![("a".into(), Value::from("forged"))],
                    },
                }],
            }],
        };
        store.import(&cs).unwrap();
        drop(store);
        sim.open_server();
    });
    assert!(
        e.as_ref()
            .is_err_and(|e| e.contains("differs from the oracle")),
        "{e:?}"
    );

    // Reset reports forget what they refused: in some seed, a refused write is then lost.
    let forget = |sim: &mut Sim| {
        for c in &mut sim.clients {
            for r in &mut c.reports {
                r.superseded.clear();
                r.discarded.clear();
            }
        }
    };
    let lost = (0..100).find_map(|seed| {
        let e = sabotaged(seed, &forget).err()?;
        e.contains("was lost").then_some(e)
    });
    assert!(
        lost.as_ref().is_some_and(|e| e.contains("was lost")),
        "{lost:?}"
    );
}

/// A crash that loses a client's cursor is noticed, and so is a cursor moving backwards.
#[test]
fn cursor_checks_can_fail() {
    let mut sim = healed(3, Knobs::SUITE).unwrap();
    sim.clients[0].cursor += 1;
    let e = sim.crash(0).expect_err("a changed cursor went unnoticed");
    assert!(e.contains("a crash moved"), "{e}");
    sim.clients[0].cursor += 1;
    let store = sim.store(0);
    let e = sim
        .observe(0, "Download", None, store.last_sync(), Vec::new())
        .expect_err("a cursor moving back went unnoticed");
    assert!(e.contains("moved back"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Regressions: seeds that found bugs, replayed without steering around them. A seed's path
// depends on the library's behaviour (message sizes, counts), so a change elsewhere can move
// it off the bug; the scripted versions below do not drift.
// ---------------------------------------------------------------------------------------

/// BUG 1 (see `Knobs::counters_with_deletes`; invariant 1): a counter increment newer than
/// another replica's delete. Under LastWriterWins the server resolves the
/// ClientUpdateServerDelete conflict by re-inserting the object with the written fields
/// (`resolve` in src/sync/server.rs, via `WriteTx::insert`), and `insert` refuses the
/// counter's engine sub-field `__c.n.<replica>` as a reserved name: the upload fails with
/// BadChangeset, and the client gets the same error on every reconnect, never syncing again.
#[test]
fn seed_8_counter_update_of_a_deleted_object() {
    replay(8, Knobs::SUITE);
}

/// BUG 2 (see `Knobs::final_snapshot_ack_lost`; invariant 4): an operator-forced reset
/// recovers nothing, so the client drops its reset marker as soon as the snapshot is swapped
/// in; the connection is cut before the final `SnapshotAck { settled }` arrives, so the
/// server keeps `force_reset` and the old position, and the next Hello gets a second reset.
#[test]
fn seed_39_lost_final_snapshot_ack_resets_again() {
    replay(39, Knobs::SUITE);
}

/// BUG 2 again, after a compaction reset that discarded two writes: the second reset
/// (ClientAheadOfServer) replays them again from the server's stale position.
#[test]
fn seed_225_lost_final_snapshot_ack_after_compaction() {
    replay(225, Knobs::SUITE);
}

/// BUG 3 (invariant 4): a forced reset replays an update of pk 1 made after another
/// replica deleted it; `finish_reset` reports it superseded ("an update does not bring it
/// back") and never uploads it. Then two offline inserts of pk 1, stamped between the
/// delete and the update, reach the server and bring the object back: by the merge rule
/// the update (above the new floor) is now visible, as it would be had the client synced
/// normally, but the reset dropped it.
#[test]
fn seed_2342_reset_drops_an_update_of_a_deleted_object() {
    replay(
        2342,
        Knobs {
            scale: 2,
            ..Knobs::SUITE
        },
    );
}

/// BUG 4 (see `Knobs::compensating_write_lost`; invariant 5): client 1 (user1) inserts pk 3,
/// which user0 owns on the server; the server refuses and reverts it, acknowledges the
/// upload, and the connection breaks before the `CompensatingWrite` arrives. The next
/// Welcome says the upload was applied, and the refusal is never sent again: the client's
/// `rejected_writes` never names the write.
#[test]
fn seed_0_refusal_lost_with_its_connection() {
    replay(
        0,
        Knobs {
            compensating_write_lost: true,
            ..Knobs::SUITE
        },
    );
}

/// BUG 5 (see `Knobs::view_removes_unsynced`; invariants 1 and 5): client 0 (user0) inserts
/// pk 5 offline; a `ViewDownload` lists pk 5 in `removed` (it is not user0's on the server
/// at that moment) and the client drops it, unsynced insert and all. The insert is then
/// uploaded and accepted, so the server holds pk 5 as user0's, but downloads skip the
/// client's own writes and pk 5 never comes back: healing ends with the client lacking it.
#[test]
fn seed_50_view_removal_drops_an_unsynced_insert() {
    replay(
        50,
        Knobs {
            view_removes_unsynced: true,
            ..Knobs::SUITE
        },
    );
}

/// The permission checks can fail: a message carrying another user's object is named, and
/// so is a client holding one it did not write, and a refusal the client was not told of.
#[test]
fn permission_checks_can_fail() {
    let mut sim = healed(3, Knobs::SUITE).unwrap();
    let other = user_name(1);
    let snap = |owner: &str| fieldlog::reset::ObjectSnapshot {
        collection: COLL.into(),
        pk: Pk::Int(0),
        exists: Some((Stamp::ZERO, true)),
        floor: Stamp::ZERO,
        fields: vec![(OWNER.into(), Stamp::ZERO, Value::from(owner))],
    };
    let m = ServerMsg::ViewDownload {
        objects: vec![snap(&other)],
        removed: Vec::new(),
        cursor: 0,
    };
    assert_eq!(leaks_in(&m, "user0").len(), 1);
    assert!(leaks_in(&m, &other).is_empty());
    let m = ServerMsg::Snapshot {
        objects: vec![snap(&other)],
        end: None,
    };
    assert_eq!(leaks_in(&m, "user0").len(), 1);

    // Another replica's write of another user's object lands in client 0's store.
    let forger = fieldlog::ReplicaId(0xf0f0);
    let cs = fieldlog::Changeset {
        origin: forger,
        entries: vec![LogEntry {
            seq: 1,
            stamp: Stamp {
                time: (sim.now + 200_000) << 16,
                replica: forger,
            },
            writes: vec![fieldlog::Write {
                collection: COLL.into(),
                pk: Pk::Int(99),
                op: Op::Insert {
                    fields: vec![(OWNER.into(), Value::from(user_name(1)))],
                },
            }],
        }],
    };
    assert_eq!(sim.clients[0].user, "user0");
    sim.store(0).import(&cs).unwrap();
    let e = sim.check_holdings(false).unwrap_err();
    assert!(e.contains("holds 99 of user1"), "{e}");

    // A seed with refused writes, where the client forgets one.
    let e = (0..100)
        .find_map(|seed| {
            let mut sim = healed(seed, Knobs::SUITE).unwrap();
            let c = sim.clients.iter_mut().find(|c| !c.refused.is_empty())?;
            c.refused.pop();
            sim.check_final().err()
        })
        .unwrap();
    assert!(e.contains("differ from the refused writes"), "{e}");
}

// The bugs again as short scripts, which do not depend on how the library's changes move a
// seed's random path.

/// Writes one transaction on client `i` (panics if it fails).
fn script_write(sim: &Sim, i: usize, f: impl FnOnce(&mut WriteTx<'_>) -> fieldlog::Result<()>) {
    sim.store(i).write(f).unwrap();
}

/// BUG 1, scripted: B increments a counter of an object A has deleted, later than the delete.
#[test]
fn script_counter_increment_after_a_delete() {
    let mut sim = Sim::scripted(2, ResetMode::RecoverUnsyncedChanges);
    script_write(&sim, 0, |tx| {
        tx.insert(
            COLL,
            0,
            [("a", Value::from(1)), (OWNER, Value::from("user0"))],
        )
    });
    sim.connect(0).unwrap();
    sim.connect(1).unwrap();
    sim.settle().unwrap();
    sim.disconnect(1);
    sim.tick(10);
    script_write(&sim, 0, |tx| tx.delete(COLL, 0));
    sim.settle().unwrap();
    sim.tick(10);
    script_write(&sim, 1, |tx| tx.increment(COLL, 0, COUNTER, 1));
    sim.heal().unwrap();
    sim.check_final().unwrap();
}

/// BUG 2, scripted: a forced reset with nothing to recover; the connection breaks right
/// after the client queues its final SnapshotAck. The next connection must not reset again.
#[test]
fn script_lost_final_snapshot_ack() {
    let mut sim = Sim::scripted(1, ResetMode::RecoverUnsyncedChanges);
    script_write(&sim, 0, |tx| {
        tx.insert(
            COLL,
            0,
            [("a", Value::from(1)), (OWNER, Value::from("user0"))],
        )
    });
    sim.connect(0).unwrap();
    sim.settle().unwrap();
    sim.disconnect(0);
    let id = sim.store(0).replica_id();
    sim.server().force_reset(id).unwrap();
    sim.connect(0).unwrap();
    let final_ack = |sim: &Sim| {
        let up = &sim.clients[0].conn.as_ref().unwrap().up;
        up.iter()
            .any(|m| matches!(m, ClientMsg::SnapshotAck { settled: Some(_) }))
    };
    while !final_ack(&sim) {
        assert!(sim.deliver_one(0).unwrap(), "the reset did not finish");
    }
    sim.disconnect(0); // Knobs::ALL: the queued SnapshotAck is lost
    sim.heal().unwrap();
    assert_eq!(sim.clients[0].reports.len(), 1, "a second reset");
    sim.check_final().unwrap();
}

/// BUG 3, scripted: A, offline, updates pk 1 after B deleted it; C, who saw the delete,
/// re-inserts pk 1 offline, earlier than A's update. A is reset (the update is reported
/// superseded: the object is deleted on the server), then C uploads its insert. By the merge
/// rule A's update, above the insert's floor, is visible; the reset dropped it.
#[test]
fn script_reset_drops_an_update_of_a_deleted_object() {
    let (a, b, c) = (0, 1, 2);
    let mut sim = Sim::scripted(3, ResetMode::RecoverUnsyncedChanges);
    script_write(&sim, b, |tx| {
        tx.insert(
            COLL,
            1,
            [("a", Value::from(1)), (OWNER, Value::from("user0"))],
        )
    });
    for i in [a, b, c] {
        sim.connect(i).unwrap();
    }
    sim.settle().unwrap();
    sim.disconnect(a);
    sim.tick(10);
    script_write(&sim, b, |tx| tx.delete(COLL, 1));
    sim.settle().unwrap();
    sim.disconnect(c);
    sim.tick(10);
    script_write(&sim, c, |tx| {
        tx.insert(
            COLL,
            1,
            [("a", Value::from(2)), (OWNER, Value::from("user0"))],
        )
    });
    sim.tick(10);
    script_write(&sim, a, |tx| tx.set(COLL, 1, "b", 3));
    let id = sim.store(a).replica_id();
    sim.server().force_reset(id).unwrap();
    sim.connect(a).unwrap();
    sim.settle().unwrap();
    assert_eq!(sim.clients[a].reports.len(), 1);
    sim.heal().unwrap();
    sim.check_final().unwrap();
}
