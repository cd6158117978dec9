//! The YCSB-shaped workload of issue 7 and its engines, shared by `benches/write.rs`
//! (criterion) and `examples/bench.rs` (the README table).
//!
//! Objects of 10 fields (`field0`..`field9`) holding 100-byte strings, primary keys
//! `user0`..`userN`. Every engine commits durably (fsync) unless said otherwise:
//! - `fieldlog`: this crate, one collection `usertable`;
//! - `raw redb (1 insert/write)`: one redb row per field (`user{i}/field{f}` → value), one
//!   insert per field write, the floor under any store on redb;
//! - `raw redb (state+log)`: the same plus one log row per field write (what a naive
//!   change-log store does);
//! - `SQLite`: rusqlite, one row per object (`pk TEXT PRIMARY KEY`, 10 text columns), WAL,
//!   `synchronous=FULL`, `BEGIN IMMEDIATE` transactions, no change tracking;
//! - `automerge`: one document, a map per object (load, update and merge only; in memory,
//!   nothing reaches the disk, so it is an upper bound).
#![allow(dead_code)]

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use automerge::transaction::Transactable;
use automerge::{Automerge, Change, ObjType, ReadDoc, ROOT};
use fieldlog::reset::ResetReport;
use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::net::{ClientHooks, ServerHandle, SyncClient, Transport};
use fieldlog::sync::pair::SessionPair;
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{Changeset, Durability, Store, Value};
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use redb::{Database, ReadableDatabase, TableDefinition};

pub const COLL: &str = "usertable";
pub const FIELD_NAMES: [&str; 10] = [
    "field0", "field1", "field2", "field3", "field4", "field5", "field6", "field7", "field8",
    "field9",
];
pub const VALUE_LEN: usize = 100;

/// Workload sizes.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Objects loaded.
    pub objects: u32,
    /// Single-field updates in the batched workloads (and the merge).
    pub updates: u32,
    /// Field writes per transaction in the batched workloads.
    pub batch: u32,
    /// Updates committed one per durable transaction.
    pub durable: u32,
    /// Concurrent writer threads and durable updates each.
    pub threads: u32,
    pub per_thread: u32,
    /// Random whole-object reads.
    pub reads: u32,
    /// Field changes end to end through the sync server.
    pub sync: u32,
    /// Unsynced writes recovered by a client reset.
    pub recovery: Vec<u32>,
}

impl Sizes {
    /// The issue's sizes.
    pub fn full() -> Sizes {
        Sizes {
            objects: 100_000,
            updates: 200_000,
            batch: 1_000,
            durable: 2_000,
            threads: 8,
            per_thread: 250,
            reads: 200_000,
            sync: 200_000,
            recovery: vec![10_000, 100_000],
        }
    }

    /// A quick run, about 1/20 of the full one.
    pub fn quick() -> Sizes {
        Sizes {
            objects: 5_000,
            updates: 10_000,
            batch: 1_000,
            durable: 500,
            threads: 8,
            per_thread: 50,
            reads: 10_000,
            sync: 10_000,
            recovery: vec![1_000, 5_000],
        }
    }

    /// What the criterion benches load by default (CI runs them once each).
    pub fn bench() -> Sizes {
        Sizes {
            objects: 2_000,
            updates: 1_000,
            batch: 1_000,
            durable: 1,
            threads: 8,
            per_thread: 4,
            reads: 1_000,
            sync: 1_000,
            recovery: vec![1_000],
        }
    }
}

pub fn pk(i: u32) -> String {
    format!("user{i}")
}

pub fn value(rng: &mut impl Rng) -> String {
    (0..VALUE_LEN)
        .map(|_| rng.random_range(b'a'..=b'z') as char)
        .collect()
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// One single-field update.
#[derive(Clone, Debug)]
pub struct Upd {
    pub obj: u32,
    pub field: usize,
    pub value: String,
}

/// One object to load.
pub type Row = (u32, Vec<String>);

pub fn rows(range: Range<u32>, rng: &mut impl Rng) -> Vec<Row> {
    range
        .map(|i| (i, (0..FIELD_NAMES.len()).map(|_| value(rng)).collect()))
        .collect()
}

/// Which objects the updates hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dist {
    Uniform,
    /// YCSB's scrambled zipfian, theta 0.99.
    Zipfian,
}

/// YCSB's `ScrambledZipfianGenerator` (Gray et al.), hot items spread over the key space.
pub struct Keys {
    n: u64,
    zipf: Option<(f64, f64, f64, f64)>, // alpha, zetan, eta, half_pow_theta
}

const THETA: f64 = 0.99;

impl Keys {
    pub fn new(n: u32, dist: Dist) -> Keys {
        let n = u64::from(n);
        let zipf = (dist == Dist::Zipfian).then(|| {
            let zeta = |n: u64| (1..=n).map(|i| 1.0 / (i as f64).powf(THETA)).sum::<f64>();
            let zetan = zeta(n);
            let zeta2 = zeta(2);
            let alpha = 1.0 / (1.0 - THETA);
            let eta = (1.0 - (2.0 / n as f64).powf(1.0 - THETA)) / (1.0 - zeta2 / zetan);
            (alpha, zetan, eta, 0.5f64.powf(THETA))
        });
        Keys { n, zipf }
    }

    pub fn next(&self, rng: &mut impl Rng) -> u32 {
        let Some((alpha, zetan, eta, half)) = self.zipf else {
            return rng.random_range(0..self.n) as u32;
        };
        let u: f64 = rng.random();
        let uz = u * zetan;
        let rank = if uz < 1.0 {
            0
        } else if uz < 1.0 + half {
            1
        } else {
            ((self.n as f64) * (eta * u - eta + 1.0).powf(alpha)) as u64
        };
        // FNV-1a of the rank, as YCSB scrambles it.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in rank.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % self.n) as u32
    }
}

pub fn updates(keys: &Keys, count: u32, rng: &mut impl Rng) -> Vec<Upd> {
    (0..count)
        .map(|_| Upd {
            obj: keys.next(rng),
            field: rng.random_range(0..FIELD_NAMES.len()),
            value: value(rng),
        })
        .collect()
}

/// A store under test.
pub trait Engine: Send + Sync {
    /// As the table shows it.
    fn name(&self) -> &'static str;
    /// As criterion names it.
    fn id(&self) -> &'static str;
    /// Inserts the objects in one durable transaction.
    fn load(&self, rows: &[Row]);
    /// Applies the updates in one durable transaction.
    fn update_batch(&self, ups: &[Upd]);
    /// One update, one durable transaction.
    fn update_one(&self, up: &Upd) {
        self.update_batch(std::slice::from_ref(up));
    }
    /// Reads a whole object; returns the bytes of its values.
    fn read(&self, obj: u32) -> usize;
    /// A writer for one of several threads (SQLite opens a connection per thread).
    fn thread_writer(&self) -> Box<dyn FnMut(&Upd) + Send + '_> {
        Box::new(move |u| self.update_one(u))
    }
    /// Bytes on disk, after whatever the engine does to settle (checkpoint, log prune).
    fn disk_bytes(&self) -> u64;
    /// The file system blocks its files take (what `du` counts), after `disk_bytes`: less
    /// than their length where a file has holes (redb doubles its file as it grows, and
    /// the new half is a hole until written).
    fn disk_allocated(&self) -> Option<u64> {
        None
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

fn file_blocks(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or(0, |m| m.blocks() * 512)
}

fn wal_of(p: &Path) -> PathBuf {
    let mut wal = p.as_os_str().to_owned();
    wal.push("-wal");
    wal.into()
}

// ---- fieldlog ----

pub struct Fieldlog {
    pub store: Arc<Store>,
    pub path: PathBuf,
}

impl Fieldlog {
    pub fn open(dir: &Path) -> Fieldlog {
        Fieldlog::open_with(dir, options())
    }

    pub fn open_with(dir: &Path, options: fieldlog::Options) -> Fieldlog {
        let path = dir.join("fieldlog.redb");
        Fieldlog {
            store: Arc::new(Store::open_with(&path, options).expect("open fieldlog")),
            path,
        }
    }

    /// What a sync client does when the server acknowledges its upload (here: everything).
    pub fn acknowledge(&self) {
        let head = self.store.log_head();
        self.store.mark_synced(head).expect("mark_synced");
    }
}

/// The store's default options; `FIELDLOG_BENCH_CHECKPOINT_BYTES` changes the write-ahead
/// file's size (0: none), `FIELDLOG_BENCH_CACHE_BYTES` redb's cache, to compare.
pub fn options() -> fieldlog::Options {
    let mut o = fieldlog::Options::default();
    if let Some(n) = std::env::var("FIELDLOG_BENCH_CHECKPOINT_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        o.checkpoint_bytes = n;
    }
    if let Some(n) = std::env::var("FIELDLOG_BENCH_CACHE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        o.cache_bytes = n;
    }
    o
}

pub fn fieldlog_load(store: &Store, rows: &[Row], durability: Durability) {
    let mut tx = store.begin().expect("begin");
    tx.set_durability(durability);
    for (i, vals) in rows {
        tx.insert(
            COLL,
            pk(*i),
            FIELD_NAMES.iter().zip(vals).map(|(f, v)| (*f, v.as_str())),
        )
        .expect("insert");
    }
    tx.commit().expect("commit");
}

pub fn fieldlog_update(store: &Store, ups: &[Upd], durability: Durability) {
    let mut tx = store.begin().expect("begin");
    tx.set_durability(durability);
    for u in ups {
        tx.set(COLL, pk(u.obj), FIELD_NAMES[u.field], u.value.as_str())
            .expect("set");
    }
    tx.commit().expect("commit");
}

impl Engine for Fieldlog {
    fn name(&self) -> &'static str {
        "fieldlog"
    }
    fn id(&self) -> &'static str {
        "fieldlog"
    }
    fn load(&self, rows: &[Row]) {
        fieldlog_load(&self.store, rows, Durability::Immediate);
    }
    fn update_batch(&self, ups: &[Upd]) {
        fieldlog_update(&self.store, ups, Durability::Immediate);
    }
    fn read(&self, obj: u32) -> usize {
        let o = self.store.get(COLL, pk(obj)).expect("get").expect("live");
        o.fields
            .values()
            .map(|v| match v {
                Value::String(s) => s.len(),
                _ => 0,
            })
            .sum()
    }
    /// With the log pruned up to the (pretend) acknowledged position.
    fn disk_bytes(&self) -> u64 {
        let head = self.store.log_head();
        self.store.mark_synced(head).expect("mark_synced");
        self.store.prune_log(head).expect("prune_log");
        self.store.checkpoint().expect("checkpoint");
        file_len(&self.path) + file_len(&wal_of(&self.path))
    }
    fn disk_allocated(&self) -> Option<u64> {
        Some(file_blocks(&self.path) + file_blocks(&wal_of(&self.path)))
    }
}

// ---- raw redb ----

const RAW_STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
const RAW_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");

pub struct RawRedb {
    db: Database,
    path: PathBuf,
    /// Also append one log row per field write.
    log: bool,
    seq: AtomicU64,
}

impl RawRedb {
    pub fn open(dir: &Path, log: bool) -> RawRedb {
        let path = dir.join(if log { "raw_log.redb" } else { "raw.redb" });
        let db = Database::create(&path).expect("open raw redb");
        let txn = db.begin_write().expect("txn");
        txn.open_table(RAW_STATE).expect("state");
        txn.open_table(RAW_LOG).expect("log");
        txn.commit().expect("commit");
        RawRedb {
            db,
            path,
            log,
            seq: AtomicU64::new(1),
        }
    }

    fn write(&self, f: impl FnOnce(&mut dyn FnMut(&str, &str))) {
        let txn = self.db.begin_write().expect("txn");
        {
            let mut state = txn.open_table(RAW_STATE).expect("state");
            let mut log = txn.open_table(RAW_LOG).expect("log");
            let mut entry = Vec::with_capacity(160);
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            f(&mut |key, val| {
                state.insert(key, val.as_bytes()).expect("insert");
                if self.log {
                    entry.clear();
                    entry.extend_from_slice(&stamp.to_le_bytes());
                    entry.push(key.len() as u8);
                    entry.extend_from_slice(key.as_bytes());
                    entry.extend_from_slice(val.as_bytes());
                    let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                    log.insert(seq, entry.as_slice()).expect("log insert");
                }
            });
        }
        txn.commit().expect("commit");
    }
}

impl Engine for RawRedb {
    fn name(&self) -> &'static str {
        if self.log {
            "raw redb (state+log)"
        } else {
            "raw redb (1 insert/write)"
        }
    }
    fn id(&self) -> &'static str {
        if self.log {
            "raw_redb_state_and_log"
        } else {
            "raw_redb_insert_per_write"
        }
    }
    fn load(&self, rows: &[Row]) {
        self.write(|put| {
            for (i, vals) in rows {
                for (f, v) in FIELD_NAMES.iter().zip(vals) {
                    put(&format!("user{i}/{f}"), v);
                }
            }
        });
    }
    fn update_batch(&self, ups: &[Upd]) {
        self.write(|put| {
            for u in ups {
                put(&format!("user{}/{}", u.obj, FIELD_NAMES[u.field]), &u.value);
            }
        });
    }
    fn read(&self, obj: u32) -> usize {
        let rtx = self.db.begin_read().expect("read");
        let t = rtx.open_table(RAW_STATE).expect("state");
        // '0' follows '/': the range is exactly this object's fields.
        let (lo, hi) = (format!("user{obj}/"), format!("user{obj}0"));
        let mut n = 0;
        for row in t.range(lo.as_str()..hi.as_str()).expect("range") {
            n += row.expect("row").1.value().len();
        }
        n
    }
    fn disk_bytes(&self) -> u64 {
        file_len(&self.path)
    }
    fn disk_allocated(&self) -> Option<u64> {
        Some(file_blocks(&self.path))
    }
}

// ---- SQLite ----

pub struct Sqlite {
    conn: Mutex<rusqlite::Connection>,
    path: PathBuf,
}

fn sqlite_conn(path: &Path) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).expect("open sqlite");
    let mode: String = c
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .expect("wal");
    assert_eq!(mode.to_lowercase(), "wal");
    c.execute_batch("PRAGMA synchronous=FULL").expect("sync");
    c.busy_timeout(Duration::from_secs(60)).expect("busy");
    c
}

const SQL_UPDATE: [&str; 10] = [
    "UPDATE usertable SET field0 = ?1 WHERE pk = ?2",
    "UPDATE usertable SET field1 = ?1 WHERE pk = ?2",
    "UPDATE usertable SET field2 = ?1 WHERE pk = ?2",
    "UPDATE usertable SET field3 = ?1 WHERE pk = ?2",
    "UPDATE usertable SET field4 = ?1 WHERE pk = ?2",
    "UPDATE usertable SET field5 = ?1 WHERE pk = ?2",
    "UPDATE usertable SET field6 = ?1 WHERE pk = ?2",
    "UPDATE usertable SET field7 = ?1 WHERE pk = ?2",
    "UPDATE usertable SET field8 = ?1 WHERE pk = ?2",
    "UPDATE usertable SET field9 = ?1 WHERE pk = ?2",
];

fn sqlite_update(c: &mut rusqlite::Connection, ups: &[Upd]) {
    let tx = c
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .expect("begin");
    for u in ups {
        let n = tx
            .prepare_cached(SQL_UPDATE[u.field])
            .expect("prepare")
            .execute(rusqlite::params![u.value, pk(u.obj)])
            .expect("update");
        debug_assert_eq!(n, 1);
    }
    tx.commit().expect("commit");
}

impl Sqlite {
    pub fn open(dir: &Path) -> Sqlite {
        let path = dir.join("sqlite.db");
        let c = sqlite_conn(&path);
        c.execute_batch(
            "CREATE TABLE usertable (pk TEXT PRIMARY KEY, field0 TEXT, field1 TEXT, \
             field2 TEXT, field3 TEXT, field4 TEXT, field5 TEXT, field6 TEXT, field7 TEXT, \
             field8 TEXT, field9 TEXT)",
        )
        .expect("create");
        Sqlite {
            conn: Mutex::new(c),
            path,
        }
    }
}

impl Engine for Sqlite {
    fn name(&self) -> &'static str {
        "SQLite"
    }
    fn id(&self) -> &'static str {
        "sqlite"
    }
    fn load(&self, rows: &[Row]) {
        let mut c = self.conn.lock().expect("lock");
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .expect("begin");
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO usertable VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )
                .expect("prepare");
            for (i, v) in rows {
                st.execute(rusqlite::params![
                    pk(*i),
                    v[0],
                    v[1],
                    v[2],
                    v[3],
                    v[4],
                    v[5],
                    v[6],
                    v[7],
                    v[8],
                    v[9]
                ])
                .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    fn update_batch(&self, ups: &[Upd]) {
        sqlite_update(&mut self.conn.lock().expect("lock"), ups);
    }
    fn read(&self, obj: u32) -> usize {
        let c = self.conn.lock().expect("lock");
        let mut st = c
            .prepare_cached(
                "SELECT field0, field1, field2, field3, field4, field5, field6, field7, \
                 field8, field9 FROM usertable WHERE pk = ?1",
            )
            .expect("prepare");
        st.query_row([pk(obj)], |r| {
            let mut n = 0;
            for i in 0..10 {
                n += r.get_ref(i)?.as_str().map_or(0, str::len);
            }
            Ok(n)
        })
        .expect("read")
    }
    fn thread_writer(&self) -> Box<dyn FnMut(&Upd) + Send + '_> {
        let mut c = sqlite_conn(&self.path);
        Box::new(move |u| sqlite_update(&mut c, std::slice::from_ref(u)))
    }
    fn disk_bytes(&self) -> u64 {
        let c = self.conn.lock().expect("lock");
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
        file_len(&self.path) + file_len(&wal_of(&self.path))
    }
    fn disk_allocated(&self) -> Option<u64> {
        Some(file_blocks(&self.path) + file_blocks(&wal_of(&self.path)))
    }
}

// ---- automerge ----

pub struct Am {
    pub doc: Mutex<Automerge>,
}

impl Am {
    pub fn new() -> Am {
        Am {
            doc: Mutex::new(Automerge::new()),
        }
    }

    /// The changes `self` has that `other` lacks.
    pub fn changes_for(&self, other: &Am) -> Vec<Change> {
        let heads = other.doc.lock().expect("lock").get_heads();
        self.doc.lock().expect("lock").get_changes(&heads)
    }

    pub fn apply(&self, changes: Vec<Change>) {
        self.doc
            .lock()
            .expect("lock")
            .apply_changes(changes)
            .expect("apply");
    }

    pub fn fork(&self) -> Am {
        Am {
            doc: Mutex::new(self.doc.lock().expect("lock").fork()),
        }
    }
}

impl Default for Am {
    fn default() -> Self {
        Am::new()
    }
}

impl Engine for Am {
    fn name(&self) -> &'static str {
        "automerge"
    }
    fn id(&self) -> &'static str {
        "automerge"
    }
    fn load(&self, rows: &[Row]) {
        let mut doc = self.doc.lock().expect("lock");
        let mut tx = doc.transaction();
        for (i, vals) in rows {
            let o = tx.put_object(ROOT, pk(*i), ObjType::Map).expect("obj");
            for (f, v) in FIELD_NAMES.iter().zip(vals) {
                tx.put(&o, *f, v.as_str()).expect("put");
            }
        }
        tx.commit();
    }
    fn update_batch(&self, ups: &[Upd]) {
        let mut doc = self.doc.lock().expect("lock");
        let mut tx = doc.transaction();
        for u in ups {
            let (_, o) = tx.get(ROOT, pk(u.obj)).expect("get").expect("object");
            tx.put(&o, FIELD_NAMES[u.field], u.value.as_str())
                .expect("put");
        }
        tx.commit();
    }
    fn read(&self, obj: u32) -> usize {
        let doc = self.doc.lock().expect("lock");
        let (_, o) = doc.get(ROOT, pk(obj)).expect("get").expect("object");
        FIELD_NAMES
            .iter()
            .filter_map(|f| doc.get(&o, *f).ok().flatten())
            .map(|(v, _)| v.as_str().map_or(0, str::len))
            .sum()
    }
    fn disk_bytes(&self) -> u64 {
        self.doc.lock().expect("lock").save().len() as u64
    }
}

// ---- drivers ----

/// Loads `0..n` in transactions of `batch` objects; returns the time spent committing.
pub fn load_all(e: &dyn Engine, n: u32, batch: u32, rng: &mut impl Rng) -> Duration {
    let mut spent = Duration::ZERO;
    let mut lo = 0;
    while lo < n {
        let hi = (lo + batch).min(n);
        let r = rows(lo..hi, rng);
        let t = Instant::now();
        e.load(&r);
        spent += t.elapsed();
        lo = hi;
    }
    spent
}

/// Runs `ups` in transactions of `batch`; returns the time spent.
pub fn update_all(e: &dyn Engine, ups: &[Upd], batch: u32) -> Duration {
    let t = Instant::now();
    for c in ups.chunks(batch as usize) {
        e.update_batch(c);
    }
    t.elapsed()
}

/// `work.len()` threads, each committing its updates one per durable transaction, all
/// started together; returns the wall time.
pub fn concurrent(e: &dyn Engine, work: &[Vec<Upd>]) -> Duration {
    writers(e, work, None)
}

/// The same writers without group commit: one transaction, and its fsync, at a time.
pub fn concurrent_one_at_a_time(e: &dyn Engine, work: &[Vec<Upd>]) -> Duration {
    writers(e, work, Some(&std::sync::Mutex::new(())))
}

fn writers(
    e: &dyn Engine,
    work: &[Vec<Upd>],
    one_at_a_time: Option<&std::sync::Mutex<()>>,
) -> Duration {
    let start = Barrier::new(work.len() + 1);
    std::thread::scope(|s| {
        let handles: Vec<_> = work
            .iter()
            .map(|ups| {
                let start = &start;
                s.spawn(move || {
                    let mut w = e.thread_writer();
                    start.wait();
                    for u in ups {
                        let _one =
                            one_at_a_time.map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
                        w(u);
                    }
                })
            })
            .collect();
        start.wait();
        let t = Instant::now();
        for h in handles {
            h.join().expect("writer thread");
        }
        t.elapsed()
    })
}

// ---- merge: two fieldlog replicas ----

/// Replica `a` writes; replica `b` (holding the same loaded objects) imports.
pub struct FieldlogPair {
    pub a: Store,
    pub b: Store,
    /// `a`'s log position `b` has everything up to.
    pub sent: AtomicU64,
}

impl FieldlogPair {
    pub fn new(dir: &Path, objects: u32, batch: u32, rng: &mut impl Rng) -> FieldlogPair {
        let a = Store::open_with(dir.join("merge_a.redb"), options()).expect("open a");
        let b = Store::open_with(dir.join("merge_b.redb"), options()).expect("open b");
        let mut lo = 0;
        while lo < objects {
            let hi = (lo + batch).min(objects);
            fieldlog_load(&a, &rows(lo..hi, rng), Durability::Deferred);
            lo = hi;
        }
        let pair = FieldlogPair {
            a,
            b,
            sent: AtomicU64::new(0),
        };
        for cs in pair.produce_changesets(10) {
            pair.b.import(&cs).expect("import load");
        }
        pair
    }

    /// `a` writes `ups` in transactions of `batch` (not durably: only the import is timed).
    pub fn write(&self, ups: &[Upd], batch: u32) {
        for c in ups.chunks(batch as usize) {
            fieldlog_update(&self.a, c, Durability::Deferred);
        }
    }

    /// `a`'s entries `b` lacks, as changesets of `entries` log entries each.
    pub fn produce_changesets(&self, entries: usize) -> Vec<Changeset> {
        let mut out = Vec::new();
        loop {
            let cs = self
                .a
                .export(self.sent.load(Ordering::Relaxed), entries)
                .expect("export");
            let Some(last) = cs.entries.last() else {
                return out;
            };
            self.sent.store(last.seq, Ordering::Relaxed);
            out.push(cs);
        }
    }
}

// ---- sync end to end over loopback TCP ----

pub fn token_for(secret: &Secret, user: &str) -> String {
    let claims = Claims {
        user_id: user.into(),
        expires_at_ms: u64::MAX,
        extra: Default::default(),
    };
    token::issue(secret, &claims).expect("token")
}

/// A server on loopback TCP, a writing client `a` and a reading client `b`, both holding
/// the loaded objects.
pub struct SyncRig {
    pub rt: tokio::runtime::Runtime,
    pub server_store: Arc<Store>,
    pub handle: Option<ServerHandle>,
    pub a: Arc<Store>,
    pub b: Arc<Store>,
    pub ca: Option<SyncClient>,
    pub cb: Option<SyncClient>,
    /// Not durable: only the end-to-end transfer is timed.
    pub rng: StdRng,
    pub objects: u32,
    pub batch: u32,
}

impl SyncRig {
    pub fn new(dir: &Path, objects: u32, batch: u32) -> SyncRig {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let secret = Secret::generate();
        let server_store = Arc::new(Store::open(dir.join("sync_server.redb")).expect("server"));
        let a = Arc::new(Store::open(dir.join("sync_a.redb")).expect("a"));
        let b = Arc::new(Store::open(dir.join("sync_b.redb")).expect("b"));
        let mut rng = rng(11);
        let (handle, ca, cb) = rt.block_on(async {
            let server = Arc::new(
                SyncServer::open(server_store.clone(), ServerConfig::new(secret.clone()))
                    .expect("sync server"),
            );
            let handle = ServerHandle::bind(server, "127.0.0.1:0")
                .await
                .expect("bind");
            let addr = handle.local_addr().expect("addr").to_string();
            let start = |store: &Arc<Store>, user: &str| {
                SyncClient::start(
                    store.clone(),
                    Transport::Tcp(addr.clone()),
                    ClientConfig::new(token_for(&secret, user)),
                    ClientHooks::default(),
                )
            };
            let ca = start(&a, "alice");
            let cb = start(&b, "bob");
            let mut lo = 0;
            while lo < objects {
                let hi = (lo + batch).min(objects);
                fieldlog_load(&a, &rows(lo..hi, &mut rng), Durability::Deferred);
                lo = hi;
            }
            ca.wait_for_upload().await.expect("upload");
            cb.wait_for_download().await.expect("download");
            (handle, ca, cb)
        });
        SyncRig {
            rt,
            server_store,
            handle: Some(handle),
            a,
            b,
            ca: Some(ca),
            cb: Some(cb),
            rng,
            objects,
            batch,
        }
    }

    /// `a` commits `n` single-field updates (durably, `batch` per transaction); returns the
    /// time until `b` has them all (upload acknowledged, then download applied).
    pub fn round(&mut self, n: u32) -> Duration {
        let ups = updates(&Keys::new(self.objects, Dist::Uniform), n, &mut self.rng);
        let (ca, cb) = (
            self.ca.as_ref().expect("client a"),
            self.cb.as_ref().expect("client b"),
        );
        let (a, batch) = (&self.a, self.batch);
        self.rt.block_on(async {
            let t = Instant::now();
            for c in ups.chunks(batch as usize) {
                fieldlog_update(a, c, Durability::Immediate);
            }
            ca.wait_for_upload().await.expect("upload");
            cb.wait_for_download().await.expect("download");
            t.elapsed()
        })
    }

    pub fn converged(&self) -> bool {
        self.a.digest() == self.b.digest() && self.b.digest() == self.server_store.digest()
    }
}

impl Drop for SyncRig {
    fn drop(&mut self) {
        let (ca, cb, handle) = (self.ca.take(), self.cb.take(), self.handle.take());
        self.rt.block_on(async {
            if let Some(c) = ca {
                c.stop().await;
            }
            if let Some(c) = cb {
                c.stop().await;
            }
            if let Some(h) = handle {
                h.shutdown().await;
            }
        });
    }
}

// ---- client reset recovery (sans-IO, as examples/reset_timing.rs) ----

/// A client holding `objects` synced objects makes `unsynced` single-field updates offline
/// (1,000 per transaction), the server forces a reset, and the client reconnects. Returns
/// the report and the time of the whole reset (download, stage, replay, upload).
pub fn recovery(dir: &Path, objects: u32, unsynced: u32) -> (ResetReport, Duration) {
    let secret = Secret::generate();
    let token = token_for(&secret, "u");
    let server_store = Arc::new(Store::open(dir.join("reset_server.redb")).expect("server"));
    let sync = Arc::new(
        SyncServer::open(Arc::clone(&server_store), ServerConfig::new(secret)).expect("sync"),
    );
    let client_store = Arc::new(Store::open(dir.join("reset_client.redb")).expect("client"));
    let mut rng = rng(5);
    let mut lo = 0;
    while lo < objects {
        let hi = (lo + 1_000).min(objects);
        fieldlog_load(&client_store, &rows(lo..hi, &mut rng), Durability::Deferred);
        lo = hi;
    }
    SessionPair::connect(&sync, &client_store, ClientConfig::new(token.clone()), 0)
        .expect("connect");
    let ups = updates(&Keys::new(objects, Dist::Uniform), unsynced, &mut rng);
    for c in ups.chunks(1_000) {
        fieldlog_update(&client_store, c, Durability::Deferred);
    }
    sync.force_reset(client_store.replica_id())
        .expect("force_reset");
    let started = Instant::now();
    let mut pair =
        SessionPair::connect(&sync, &client_store, ClientConfig::new(token), 0).expect("reconnect");
    let elapsed = started.elapsed();
    let report = pair
        .client
        .take_reset_reports()
        .pop()
        .expect("a reset happened");
    assert_eq!(
        client_store.digest(),
        server_store.digest(),
        "client and server differ after the reset"
    );
    (report, elapsed)
}

// ---- process figures ----

/// Peak resident set size of this process, in bytes (VmHWM).
pub fn peak_rss() -> u64 {
    proc_status_kb("VmHWM:") * 1024
}

pub fn rss() -> u64 {
    proc_status_kb("VmRSS:") * 1024
}

fn proc_status_kb(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_owned()))
        })
        .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Resets VmHWM to the current RSS (Linux: `echo 5 > /proc/self/clear_refs`).
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
