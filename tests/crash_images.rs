//! Invariant 3 (durability, atomicity) at every sync point: the store runs on simulated
//! disks (`fuzz/src/disk.rs`, redb `StorageBackend`s) that record every write, `set_len`
//! and `sync_data` — its database file, and its write-ahead file on a second disk
//! (`Store::open_backend_with_wal`, a 16 KiB `checkpoint_bytes`, so the database's durable
//! commits and the write-ahead file's rewrites from offset 0 happen dozens of times). Both
//! disks stamp their operations from one clock, so their histories merge into one order. A
//! workload runs once; then, at each `sync_data` of either file, the power fails: each file
//! is as its own last sync made it, and the pair is opened as a store. For each sync, more
//! images, the other file as its last sync made it:
//! - torn: the syncing file's previous durable image plus only the first half of the writes
//!   the sync was flushing, or only the last of them (the disk reordered the writes; for a
//!   redb commit, the header without the pages it points to);
//! - cut: every write but the last, and only the first half of the last one's bytes (a
//!   write-ahead record cut part-way, a redb header half written);
//! - leaked: the other file's unsynced writes on disk as well (the OS wrote its cache back:
//!   for the database, the pages of commits made without fsync);
//! - returned: for an operation acknowledged durable without any sync during it (none, unless
//!   a bug acknowledges a commit before it is durable), the power fails just after it
//!   returned.
//!
//! The same runs without a write-ahead file (`Store::open_backend`: every durable commit is
//! a redb commit), on half the workload.
//!
//! The workload has three phases:
//! - A: local transactions only (inserts, field writes, deletes, counter increments, a
//!   fifth of them with deferred durability) and `mark_synced`: the log alone must replay
//!   to the state;
//! - B: more writes, `prune_log`, and imports of another replica's changesets;
//! - C: sync with a server through the sans-IO sessions, offline writes, a forced client
//!   reset (snapshot staging, the swap, the upload of recovered writes), more syncing.
//!
//! After every operation the live store's state is recorded as a checkpoint: its objects,
//! log head, last sync, digest and sync metadata (what its next Hello would say). Each image
//! must (its last sync may be behind the checkpoint's, never ahead, and every log entry
//! after it must be there: `mark_synced` is not synced by itself):
//! 1. open;
//! 2. equal one checkpoint, no older than the last operation that returned `Ok` with a
//!    durable commit before that moment (else `committed_lost`), no newer than the
//!    operation in progress; equal to none is a partial transaction (`partial`) — except
//!    inside an operation that commits several times (a sync-session call), where an
//!    intermediate state is allowed if it is self-consistent: counts match the objects, the
//!    persisted digest matches the objects (recomputed by sending them as a reset snapshot
//!    to a fresh store), the log is contiguous; and in every image the persisted digest is
//!    the objects' (`verify_digest`);
//! 3. in phase A, replay: a fresh store importing the image's whole log has its digest;
//! 4. clock: the persisted high-water mark is at or above every stamp in the image and every
//!    stamp acknowledged durable before that sync, and a new write is stamped above it.
//!
//! Prints one line per store kind, `crash-images: images=N committed_lost=0 partial=0`
//! (`files=db+wal` or `files=db`; then the torn, cut, leaked, intermediate and known-bug
//! counts). `FIELDLOG_CRASH_IMAGES_OPS` scales the workload (default 240 operations per
//! phase: about 1,200 images with the write-ahead file and 700 without, in about 30 s in a
//! debug build; 2,400 for a soak run makes ten times as many); `FIELDLOG_CRASH_IMAGES_SEED`
//! changes the seed.

#[path = "../fuzz/src/disk.rs"]
#[allow(dead_code)]
mod disk;

use std::sync::Arc;
use std::time::{Duration, Instant};

use disk::{Clock, DiskOp, Replayer, SimDisk};
use fieldlog::sync::client::{ClientConfig, ClientSession};
use fieldlog::sync::protocol::{ClientMsg, ServerMsg};
use fieldlog::sync::server::{ServerConfig, ServerSession, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{
    Digest, Durability, ManualTimeSource, Object, Options, Pk, Store, TimeSource, Value,
};

const T0_MS: u64 = 1_700_000_000_000;

/// Set to `true` only while a known bug keeps the clock below other replicas' stamps (this
/// test found one: the reset swap did not observe the snapshot's stamps; fixed, see
/// `reset_swap_advances_the_clock`): such images are then counted (`clock_behind_remote`)
/// instead of failed.
const KNOWN_BUG_RESET_CLOCK: bool = false;

/// BUG (fixed for stores on a path, open for custom backends): a power cut while a new store
/// file is being created can leave a file that never opens; this file's stores are on a
/// simulated backend, so while `true` such images are counted (`unopenable_new_file`), not
/// failed. See `a_store_cut_off_while_being_created_opens`.
const KNOWN_BUG_CREATE: bool = true;
const COLLS: [&str; 2] = ["A", "B"];
const FIELDS: [&str; 4] = ["f0", "f1", "f2", "f3"];
const PKS: u64 = 24;

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    fn value(&mut self) -> Value {
        match self.below(6) {
            0 => Value::Null,
            1 => Value::Bool(self.one_in(2)),
            2 => Value::Int(self.next() as i64),
            3 => Value::Float(f64::from_bits(self.next())),
            4 => Value::String("v".repeat(self.below(40) as usize)),
            _ => Value::Bytes(vec![self.next() as u8; self.below(300) as usize]),
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What an image is compared on: everything a user or the sync protocol can observe.
#[derive(Clone, Debug, PartialEq)]
struct Fingerprint {
    objects: Vec<Vec<Object>>,
    head: u64,
    last_sync: u64,
    digest: Digest,
    /// The Hello this store would send: download cursor, reset markers, schema version.
    hello: ClientMsg,
}

impl Fingerprint {
    /// This one with `last_sync` acknowledged (here and in its Hello).
    fn synced_to(&self, last_sync: u64) -> Fingerprint {
        let mut fp = self.clone();
        fp.last_sync = last_sync;
        if let ClientMsg::Hello { last_sync: l, .. } = &mut fp.hello {
            *l = last_sync;
        }
        fp
    }
}

fn hello_of(store: &Arc<Store>) -> ClientMsg {
    let mut h = ClientSession::new(Arc::clone(store), ClientConfig::new("t"))
        .hello()
        .expect("hello");
    if let ClientMsg::Hello { token, .. } = &mut h {
        token.clear();
    }
    h
}

fn fingerprint(store: &Arc<Store>) -> Fingerprint {
    Fingerprint {
        objects: COLLS.iter().map(|c| store.scan(c).expect("scan")).collect(),
        head: store.log_head(),
        last_sync: store.log_head().min(store.last_sync()),
        digest: store.digest(),
        hello: hello_of(store),
    }
}

#[derive(Debug)]
struct Checkpoint {
    fp: Fingerprint,
    /// Syncs completed when the operation began and when it returned.
    before: u64,
    after: u64,
    /// The operation returned `Ok` after a durable commit.
    durable: bool,
    /// The first sync whose image must hold it, if durable: `after`, or the next sync if
    /// none happened during the operation (a commit acknowledged durable without a sync is
    /// a lost write the next image shows).
    acked: u64,
    /// It may commit several times (a sync-session call).
    multi: bool,
    /// The highest stamp time committed up to here.
    max_stamp: u64,
    phase: char,
}

struct Run {
    /// The database file.
    disk: SimDisk,
    /// The write-ahead file, if the store has one.
    wal: Option<SimDisk>,
    time: ManualTimeSource,
    store: Arc<Store>,
    checkpoints: Vec<Checkpoint>,
    rng: Rng,
    max_stamp: u64,
    phase: char,
}

/// The window an acknowledged entry stays in the log: the workload moves the clock past
/// it between phases, so acknowledgements in phases B and C prune (with the position, in
/// a commit without fsync).
const KEEP_ACKNOWLEDGED: Duration = Duration::from_secs(5);

fn options(time: &ManualTimeSource) -> Options {
    Options::default()
        .time(Arc::new(time.clone()))
        .keep_acknowledged_for(Some(KEEP_ACKNOWLEDGED))
}

/// A write-ahead file this small checkpoints every few dozen commits, so the database's
/// durable commits and the file's rewrites from offset 0 happen many times in a run; a
/// quarter of it (4 KiB) is the largest record, so the larger transactions are durable
/// redb commits, and the smaller downloads records (with the cursor as an `Aux` row).
const CHECKPOINT_BYTES: u64 = 16 << 10;

fn wal_options(time: &ManualTimeSource) -> Options {
    options(time).checkpoint_bytes(CHECKPOINT_BYTES)
}

/// Opens a store on disk images: the database's, and the write-ahead file's if it has one.
fn open_images(
    db: Vec<u8>,
    wal: Option<Vec<u8>>,
    time: &ManualTimeSource,
) -> fieldlog::Result<Store> {
    let db = SimDisk::from_image(db);
    match wal {
        Some(wal) => Store::open_backend_with_wal(
            db.backend(),
            SimDisk::from_image(wal).backend(),
            wal_options(time),
        ),
        None => Store::open_backend(db.backend(), options(time)),
    }
}

/// What an operation that returned `Ok` promises.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ack {
    /// It committed with immediate durability: it survives any later crash.
    Durable,
    /// It may have committed nothing; if a sync happened during it, what it committed is
    /// durable.
    IfSynced,
    /// Nothing (a deferred commit).
    No,
}

impl Run {
    /// Syncs of either file so far: sync number k (1-based) in the merged history is the
    /// one after which this reads k.
    fn syncs(&self) -> u64 {
        self.disk.syncs() + self.wal.as_ref().map_or(0, SimDisk::syncs)
    }

    fn checkpoint(&mut self, before: u64, ack: Ack, multi: bool) {
        let after = self.syncs();
        let fp = fingerprint(&self.store);
        self.checkpoints.push(Checkpoint {
            fp,
            before,
            after,
            durable: match ack {
                Ack::Durable => true,
                Ack::IfSynced => after > before,
                Ack::No => false,
            },
            acked: after.max(before + 1),
            multi,
            max_stamp: self.max_stamp,
            phase: self.phase,
        });
    }

    fn local_tx(&mut self) {
        let before = self.syncs();
        let deferred = self.rng.one_in(5);
        let mut tx = self.store.begin().expect("begin");
        if deferred {
            tx.set_durability(Durability::Deferred);
        }
        for _ in 0..1 + self.rng.below(3) {
            let coll = COLLS[self.rng.below(2) as usize];
            let pk = Pk::Int(self.rng.below(PKS) as i64);
            let field = FIELDS[self.rng.below(4) as usize];
            let _ = match self.rng.below(8) {
                0 | 1 => {
                    let n = 1 + self.rng.below(4) as usize;
                    let fields: Vec<(&str, Value)> =
                        FIELDS[..n].iter().map(|f| (*f, self.rng.value())).collect();
                    tx.insert(coll, pk, fields)
                }
                2..=4 => {
                    let v = self.rng.value();
                    tx.set(coll, pk, field, v)
                }
                5 => tx.delete(coll, pk),
                6 => tx.increment(coll, pk, "cnt", self.rng.below(5) as i64 - 2),
                _ => {
                    let v = self.rng.value();
                    tx.update(coll, pk, [(field, v), ("f3", Value::from(1))])
                }
            };
        }
        let c = tx.commit().expect("commit");
        if let Some(s) = c.stamp {
            self.max_stamp = self.max_stamp.max(s.time);
        }
        self.time.advance(self.rng.below(3));
        // A commit that wrote (it has a stamp) with immediate durability is acknowledged
        // durable, whether or not a sync was seen.
        let ack = match (deferred, c.stamp) {
            (true, _) => Ack::No,
            (false, Some(_)) => Ack::Durable,
            (false, None) => Ack::IfSynced,
        };
        self.checkpoint(before, ack, false);
    }

    fn mark_synced(&mut self) {
        let before = self.syncs();
        let pos = self.store.log_head().saturating_sub(self.rng.below(3));
        self.store.mark_synced(pos).expect("mark_synced");
        self.checkpoint(before, Ack::IfSynced, false);
    }

    fn prune(&mut self) {
        let before = self.syncs();
        let upto = self.store.last_sync().saturating_sub(self.rng.below(4));
        self.store.prune_log(upto).expect("prune_log");
        self.checkpoint(before, Ack::IfSynced, false);
    }

    fn import_from(&mut self, peer: &Store) {
        let mut tx = peer.begin().expect("begin");
        let pk = Pk::Int(self.rng.below(PKS) as i64);
        let v = self.rng.value();
        let _ = match tx.get("A", pk.clone()).expect("get") {
            Some(_) => tx.set("A", pk, "f1", v),
            None => tx.insert("A", pk, [("f1", v)]),
        };
        tx.commit().expect("peer commit");
        let head = peer.log_head();
        let after = head.saturating_sub(1 + self.rng.below(3));
        let cs = peer.export(after, usize::MAX).expect("export");
        let before = self.syncs();
        self.store.import(&cs).expect("import");
        self.checkpoint(before, Ack::IfSynced, false);
    }
}

/// Moves messages between a server session and the client until both are quiet; every
/// client call is one checkpoint.
fn pump(run: &mut Run, server: &mut ServerSession, client: &mut ClientSession) {
    let mut to_server: Vec<ClientMsg> = Vec::new();
    let mut to_client: Vec<ServerMsg> = Vec::new();
    for _ in 0..10_000 {
        loop {
            let before = run.syncs();
            let m = client.poll_upload().expect("poll_upload");
            run.checkpoint(before, Ack::IfSynced, true);
            match m {
                Some(m) => to_server.push(m),
                None => break,
            }
        }
        to_client.extend(server.poll_download());
        if to_server.is_empty() && to_client.is_empty() {
            return;
        }
        let now = run.time.now_ms();
        for m in std::mem::take(&mut to_server) {
            to_client.extend(server.on_message(m, now));
        }
        for m in std::mem::take(&mut to_client) {
            let before = run.syncs();
            let replies = client.on_message(m).expect("client on_message");
            run.checkpoint(before, Ack::IfSynced, true);
            to_server.extend(replies);
        }
    }
    panic!("sync did not settle");
}

fn connect(run: &mut Run, sync: &Arc<SyncServer>, token: &str) -> (ServerSession, ClientSession) {
    let mut server = sync.session();
    let mut client = ClientSession::new(Arc::clone(&run.store), ClientConfig::new(token));
    let before = run.syncs();
    let hello = client.hello().expect("hello");
    run.checkpoint(before, Ack::IfSynced, true);
    let now = run.time.now_ms();
    let mut to_client = server.on_message(hello, now);
    while !to_client.is_empty() {
        let mut to_server = Vec::new();
        for m in to_client {
            let before = run.syncs();
            to_server.extend(client.on_message(m).expect("client on_message"));
            run.checkpoint(before, Ack::IfSynced, true);
        }
        to_client = to_server
            .into_iter()
            .flat_map(|m| server.on_message(m, now))
            .collect();
    }
    pump(run, &mut server, &mut client);
    (server, client)
}

/// Runs the workload on recording disks (with a write-ahead file on a second disk if
/// `with_wal`, both stamped by `clock`); returns the run (its checkpoints) and the phase A
/// sync boundary.
fn workload(ops: u64, seed: u64, with_wal: bool, clock: &Clock) -> (Run, u64) {
    let disk = SimDisk::new();
    disk.record_on(clock);
    let wal = with_wal.then(|| {
        let wal = SimDisk::new();
        wal.record_on(clock);
        wal
    });
    let time = ManualTimeSource::new(T0_MS);
    let store = match &wal {
        Some(wal) => {
            Store::open_backend_with_wal(disk.backend(), wal.backend(), wal_options(&time))
        }
        None => Store::open_backend(disk.backend(), options(&time)),
    };
    let store = Arc::new(store.expect("open"));
    let mut run = Run {
        disk,
        wal,
        time,
        store,
        checkpoints: Vec::new(),
        rng: Rng(seed),
        max_stamp: 0,
        phase: 'A',
    };
    run.checkpoint(0, Ack::IfSynced, true);
    // Phase A: local writes and mark_synced; the log replays to the state.
    for i in 0..ops {
        if i % 40 == 39 {
            run.mark_synced();
        } else {
            run.local_tx();
        }
    }
    let phase_a_end = run.syncs();
    // Phase B: pruning and remote writes; phase A's entries are out of the window.
    run.phase = 'B';
    run.time.advance(2 * KEEP_ACKNOWLEDGED.as_millis() as u64);
    let peer = Store::open_backend(redb::backends::InMemoryBackend::new(), options(&run.time))
        .expect("peer");
    for i in 0..ops {
        match i % 10 {
            3 => run.import_from(&peer),
            7 => run.mark_synced(),
            8 => run.prune(),
            _ => run.local_tx(),
        }
    }
    // Phase C: sync, offline writes, a forced reset, more sync; phase B's entries are out
    // of the window.
    run.phase = 'C';
    run.time.advance(2 * KEEP_ACKNOWLEDGED.as_millis() as u64);
    let (sync, token) = server_in_memory(&run.time, |c| c.batch_bytes = 512);
    let rounds = (ops / 40).max(2);
    for round in 0..rounds {
        connect(&mut run, &sync, &token);
        for _ in 0..10 {
            run.local_tx();
        }
        sync.write(|tx| {
            let pk = (round % PKS) as i64;
            match tx.get("A", pk)? {
                Some(_) => tx.set("A", pk, "f0", "server"),
                None => tx.insert("A", pk, [("f0", "server")]),
            }
        })
        .expect("server write");
        if round % 2 == 1 {
            sync.force_reset(run.store.replica_id())
                .expect("force_reset");
        }
        let (_s, mut client) = connect(&mut run, &sync, &token);
        if round % 2 == 1 {
            assert!(
                !client.take_reset_reports().is_empty(),
                "the forced reset did not run"
            );
        }
    }
    (run, phase_a_end)
}

#[derive(Default, Debug)]
struct Tally {
    images: u64,
    torn: u64,
    committed_lost: u64,
    partial: u64,
    intermediate: u64,
    clock: u64,
    /// Images whose objects hold another replica's stamp above the persisted clock.
    clock_behind_remote: u64,
    unopenable_new_file: u64,
    replay: u64,
    /// Images where the file that was not syncing had its unsynced writes on disk too.
    leaked: u64,
    /// Images with the sync's last write cut part-way.
    cut: u64,
    /// Images just after an operation that returned durable without a sync.
    returned: u64,
    failures: Vec<String>,
}

impl Tally {
    fn fail(&mut self, what: String) {
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
    }
}

/// The persisted digest recomputed from the objects: a server on the image sends them, as a
/// reset snapshot, to a fresh store.
fn recomputed_digest(store: &Arc<Store>, time: &ManualTimeSource) -> Digest {
    let (sync, token) = server_on(Arc::clone(store), |_| {});
    let fresh = Arc::new(
        Store::open_backend(redb::backends::InMemoryBackend::new(), options(time)).expect("fresh"),
    );
    sync.force_reset(fresh.replica_id()).expect("force_reset");
    let mut client = ClientSession::new(Arc::clone(&fresh), ClientConfig::new(token));
    let hello = client.hello().expect("hello");
    exchange(&mut sync.session(), &mut client, hello).expect("probe client");
    fresh.digest()
}

fn verify(
    run: &Run,
    image: (Vec<u8>, Option<Vec<u8>>),
    sync_k: u64,
    (acked_k, returned): (u64, Option<usize>),
    phase_a_end: u64,
    tally: &mut Tally,
    label: &str,
) {
    tally.images += 1;
    let cps = &run.checkpoints;
    // Acknowledged durable by this point: the newest durable op finished at or before it
    // (`returned`, if the power fails just after that op returned).
    let lo = cps
        .iter()
        .rposition(|c| c.durable && c.acked <= acked_k)
        .unwrap_or(0)
        .max(returned.unwrap_or(0));
    // In progress: the op during which sync `sync_k` happened (or the last one before it).
    let hi = cps.iter().rposition(|c| c.before < sync_k).unwrap_or(0);
    let in_open = cps[0].after >= sync_k;
    let store = match open_images(image.0, image.1, &run.time) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            if in_open && KNOWN_BUG_CREATE {
                // See `a_store_cut_off_while_being_created_opens`.
                tally.unopenable_new_file += 1;
                return;
            }
            tally.partial += 1;
            tally.fail(format!("{label}: the store does not open: {e}"));
            return;
        }
    };
    let fp = fingerprint(&store);
    // The persisted digest is the objects' (a replayed record puts back rows, digest
    // included, so it would show here).
    if !store.verify_digest().expect("verify_digest") {
        tally.partial += 1;
        tally.fail(format!("{label}: the digest does not match the objects"));
    }
    // `mark_synced` is not synced by itself: an image may hold an older acknowledged
    // position than the state it otherwise equals, never a newer one; and every entry
    // after the position it holds is still in the log, to be uploaded again.
    let same = |c: &Fingerprint| fp.last_sync <= c.last_sync && *c == fp.synced_to(c.last_sync);
    let unsynced = store.unsynced(usize::MAX).expect("unsynced");
    if unsynced.len() as u64 != fp.head - fp.last_sync
        || unsynced.first().is_some_and(|e| e.seq != fp.last_sync + 1)
    {
        tally.partial += 1;
        tally.fail(format!(
            "{label}: the log lacks entries after the acknowledged position {} (head {}, {} entries)",
            fp.last_sync,
            fp.head,
            unsynced.len()
        ));
    }
    let matched = (lo..=hi.max(lo)).find(|&i| same(&cps[i].fp));
    match matched {
        Some(_) => {}
        None if cps[..lo].iter().any(|c| same(&c.fp)) => {
            tally.committed_lost += 1;
            tally.fail(format!(
                "{label}: state of an older checkpoint; acknowledged writes lost (lo {lo}, hi {hi})"
            ));
        }
        None if cps[hi].multi && (sync_k < cps[hi].after || acked_k < sync_k) => {
            // Between two commits of one sync-session call: must be self-consistent.
            tally.intermediate += 1;
            for (i, c) in COLLS.iter().enumerate() {
                if store.count(c).expect("count") != fp.objects[i].len() as u64 {
                    tally.partial += 1;
                    tally.fail(format!("{label}: count of {c} does not match its objects"));
                }
            }
            if recomputed_digest(&store, &run.time) != store.digest() {
                tally.partial += 1;
                tally.fail(format!(
                    "{label}: persisted digest does not match the objects"
                ));
            }
        }
        None => {
            tally.partial += 1;
            tally.fail(format!(
                "{label}: state equals no checkpoint in {lo}..={hi} ({}{})",
                cps[hi].phase,
                if cps[hi].multi { ", sync call" } else { "" }
            ));
        }
    }
    // The log is contiguous up to the head.
    let log = store.log_after(0, usize::MAX).expect("log");
    if let (Some(first), Some(last)) = (log.first(), log.last()) {
        if last.seq != store.log_head() || last.seq - first.seq + 1 != log.len() as u64 {
            tally.partial += 1;
            tally.fail(format!("{label}: log is not contiguous"));
        }
    }
    // Phase A: the log alone replays to the state.
    if sync_k <= phase_a_end && !in_open {
        tally.replay += 1;
        let fresh = Store::open_backend(redb::backends::InMemoryBackend::new(), options(&run.time))
            .expect("fresh");
        fresh
            .import(&store.export(0, usize::MAX).expect("export"))
            .expect("import");
        if fresh.digest() != store.digest() {
            tally.partial += 1;
            tally.fail(format!("{label}: the log does not replay to the state"));
        }
    }
    // Clock: the high-water mark covers every stamp in the image and every acknowledged
    // one, and the next stamp is above it.
    let hw = store.clock_high_water();
    let mut max_seen = cps[lo].max_stamp;
    let mut source = String::from("acknowledged commit");
    for e in &log {
        if e.stamp.time > max_seen {
            max_seen = e.stamp.time;
            source = format!("log entry {}", e.seq);
        }
    }
    // Before phase B every stamp in the image is this store's and in its log; after it,
    // read each field's stamp (imports and resets bring other replicas' stamps).
    let objects = if sync_k > phase_a_end {
        fp.objects.as_slice()
    } else {
        &[]
    };
    for (i, c) in COLLS.iter().enumerate().take(objects.len()) {
        for o in &objects[i] {
            for f in o.fields.keys() {
                if let Some((_, s)) = store.get_field(c, o.pk.clone(), f).expect("get_field") {
                    if s.replica != store.replica_id() && s.time > hw {
                        // Another replica's stamp the clock never observed: see
                        // `reset_swap_advances_the_clock`.
                        tally.clock_behind_remote += 1;
                        if !KNOWN_BUG_RESET_CLOCK {
                            tally.fail(format!(
                                "{label}: {c}[{}].{f} stamped {} above the clock {hw}",
                                o.pk, s.time
                            ));
                        }
                    } else if s.time > max_seen {
                        max_seen = s.time;
                        source = format!("{c}[{}].{f}", o.pk);
                    }
                }
            }
        }
    }
    if hw < max_seen {
        tally.clock += 1;
        tally.fail(format!(
            "{label}: clock high-water {hw} below stamp {max_seen} of {source}"
        ));
    }
    let c = store
        .write(|tx| tx.insert("Probe", 1, [("x", 1)]))
        .expect("a write after reopening")
        .1;
    let s = c.stamp.expect("stamp").time;
    if s <= hw {
        tally.clock += 1;
        tally.fail(format!("{label}: new stamp {s} not above high-water {hw}"));
    }
}

/// Opens the image as of every sync of either file, torn, cut and leaked variants; returns
/// the number of syncs.
fn images(run: &Run, phase_a_end: u64, tally: &mut Tally) -> u64 {
    // The files' histories merged into one order by their stamps: 0 is the database.
    let mut files = vec![run.disk.stamped_history()];
    files.extend(run.wal.as_ref().map(SimDisk::stamped_history));
    let mut events: Vec<(u64, usize, &DiskOp)> = files
        .iter()
        .enumerate()
        .flat_map(|(f, h)| h.iter().map(move |(t, op)| (*t, f, op)))
        .collect();
    events.sort_by_key(|e| e.0);
    let name = ["db", "wal"];
    // Each file's durable image, and its writes since its last sync.
    let mut durable: Vec<Vec<u8>> = vec![Vec::new(); files.len()];
    let mut pending: Vec<Vec<DiskOp>> = vec![Vec::new(); files.len()];
    let pair = |imgs: &[Vec<u8>]| (imgs[0].clone(), imgs.get(1).cloned());
    // Operations acknowledged durable with no sync during them, by the sync before them.
    let mut returned: std::collections::BTreeMap<u64, Vec<usize>> = Default::default();
    for (i, c) in run.checkpoints.iter().enumerate() {
        if c.durable && c.after == c.before {
            returned.entry(c.after).or_default().push(i);
        }
    }
    let mut k = 0;
    for (_, f, op) in events {
        if !matches!(op, DiskOp::Sync) {
            pending[f].push(op.clone());
            continue;
        }
        k += 1;
        let ops = std::mem::take(&mut pending[f]);
        let prev = durable[f].clone();
        durable[f] = Replayer::torn(&prev, &ops, ops.len());
        // The power fails right after this sync: each file as its last sync made it.
        verify(
            run,
            pair(&durable),
            k,
            (k, None),
            phase_a_end,
            tally,
            &format!("sync {k} ({})", name[f]),
        );
        // The power fails just after an operation that returned durable with no sync
        // since this one (none, unless a commit is acknowledged before it is durable).
        for &i in returned.get(&k).into_iter().flatten() {
            tally.returned += 1;
            verify(
                run,
                pair(&durable),
                k,
                (k, Some(i)),
                phase_a_end,
                tally,
                &format!("sync {k} ({}) then op {i} returned", name[f]),
            );
        }
        // Torn: the sync cut short, with half of its writes on disk; and reordered, with
        // only its last write (the header, for a redb commit) on disk. The other file is as
        // its last sync made it.
        let writes = ops.len();
        let with = |img: Vec<u8>, what: &str, tally: &mut Tally| {
            let mut imgs = durable.clone();
            imgs[f] = img;
            verify(
                run,
                pair(&imgs),
                k,
                (k - 1, None),
                phase_a_end,
                tally,
                &format!("sync {k} ({}) {what}", name[f]),
            );
        };
        if writes >= 2 {
            tally.torn += 2;
            with(Replayer::torn(&prev, &ops, writes / 2), "torn", tally);
            with(
                Replayer::torn(&prev, &ops[writes - 1..], 1),
                "reordered",
                tally,
            );
        }
        // Cut: every write but the last, and the first half of the last (a record, for
        // the write-ahead file).
        if let Some(DiskOp::Write(_, data)) = ops.last() {
            if data.len() >= 2 {
                tally.cut += 1;
                with(
                    Replayer::torn_within(&prev, &ops, data.len() / 2),
                    "cut",
                    tally,
                );
            }
        }
        // Leaked: the other file's unsynced writes reached the disk as well (the OS wrote
        // its cache back): for the database, the pages of commits made without fsync.
        for (o, ops_o) in pending.iter().enumerate() {
            if o != f && !ops_o.is_empty() {
                tally.leaked += 1;
                let mut imgs = durable.clone();
                imgs[o] = Replayer::torn(&durable[o], ops_o, ops_o.len());
                verify(
                    run,
                    pair(&imgs),
                    k,
                    (k, None),
                    phase_a_end,
                    tally,
                    &format!("sync {k} ({}) {} leaked", name[f], name[o]),
                );
            }
        }
    }
    k
}

/// Runs the workload (`ops` per phase, from `FIELDLOG_CRASH_IMAGES_OPS`, divided by
/// `share`) and checks every image.
fn crash_images(with_wal: bool, share: u64, min_images: u64) {
    let started = Instant::now();
    let ops = env_u64("FIELDLOG_CRASH_IMAGES_OPS", 240) / share;
    let seed = env_u64("FIELDLOG_CRASH_IMAGES_SEED", 0x1ca9_e5ee_d000);
    let clock = Clock::new();
    let (run, phase_a_end) = workload(ops, seed, with_wal, &clock);
    let ran = started.elapsed();
    let mut tally = Tally::default();
    let syncs = images(&run, phase_a_end, &mut tally);
    // Times the write-ahead file was written again from its start (after a checkpoint).
    let wal_rewrites = run.wal.as_ref().map_or(0, |w| {
        w.stamped_history()
            .iter()
            .filter(|(_, op)| matches!(op, DiskOp::Write(0, _)))
            .count()
    });
    println!(
        "crash-images: images={} committed_lost={} partial={} (files={} torn={} cut={} leaked={} acked_without_sync={} intermediate={} replayed={} clock_errors={} clock_behind_remote={} unopenable_new_file={} syncs={} db_syncs={} wal_rewrites={} checkpoints={} workload={:.1?} total={:.1?})",
        tally.images,
        tally.committed_lost,
        tally.partial,
        if with_wal { "db+wal" } else { "db" },
        tally.torn,
        tally.cut,
        tally.leaked,
        tally.returned,
        tally.intermediate,
        tally.replay,
        tally.clock,
        tally.clock_behind_remote,
        tally.unopenable_new_file,
        syncs,
        run.disk.syncs(),
        wal_rewrites,
        run.checkpoints.len(),
        ran,
        started.elapsed()
    );
    assert!(tally.failures.is_empty(), "failures: {:#?}", tally.failures);
    assert_eq!(tally.committed_lost + tally.partial + tally.clock, 0);
    if ops >= 240 / share {
        assert!(tally.images >= min_images, "only {} images", tally.images);
    }
}

/// The store with a write-ahead file: images at every sync of either file.
#[test]
fn crash_images_every_sync_point() {
    crash_images(true, 1, 1_000);
}

/// The store without one (`Store::open_backend`, `checkpoint_bytes = 0`): every durable
/// commit is a redb commit. Half the workload (what runs here is redb's own commit
/// protocol, which the larger run exercised before the write-ahead file existed).
#[test]
fn crash_images_every_sync_point_without_wal() {
    crash_images(false, 2, 600);
}

/// Regression test (invariant 2 and the merge rule's "the HLC advances past every stamp it
/// sees"; found by `crash_images_every_sync_point`'s clock check): after a client reset the
/// client's clock had not observed the stamps of the server state it swapped in. With the
/// server's clock a minute ahead (within the drift bound), a field the server wrote before
/// the reset outranked every write the client made to it for that minute: the client's
/// later write committed `Ok`, entered its log, and was silently stale. Fixed: staging a
/// snapshot observes every stamp in it.
#[test]
fn reset_swap_advances_the_clock() {
    let client_time = ManualTimeSource::new(T0_MS);
    let server_time = ManualTimeSource::new(T0_MS + 60_000);
    let (sync, token) = server_in_memory(&server_time, |_| {});
    sync.write(|tx| tx.insert("Dog", 1, [("name", "server")]))
        .expect("server write");
    let client = Arc::new(
        Store::open_backend(
            redb::backends::InMemoryBackend::new(),
            options(&client_time),
        )
        .expect("client store"),
    );
    sync.force_reset(client.replica_id()).expect("force_reset");
    let mut server = sync.session();
    let mut session = ClientSession::new(Arc::clone(&client), ClientConfig::new(token));
    let mut to_server = vec![session.hello().expect("hello")];
    for _ in 0..100 {
        let mut to_client = server.poll_download();
        for m in std::mem::take(&mut to_server) {
            to_client.extend(server.on_message(m, T0_MS + 60_000));
        }
        if to_client.is_empty() {
            break;
        }
        for m in to_client {
            to_server.extend(session.on_message(m).expect("client"));
        }
    }
    assert_eq!(session.take_reset_reports().len(), 1, "the reset ran");
    let seen = client
        .get_field("Dog", 1, "name")
        .expect("get")
        .expect("field")
        .1;
    client_time.advance(1);
    client
        .write(|tx| tx.set("Dog", 1, "name", "client"))
        .expect("a local write after the reset");
    assert_eq!(
        client
            .get("Dog", 1)
            .expect("get")
            .expect("live")
            .get("name"),
        Some(&Value::from("client")),
        "a write made after the reset lost to the value it overwrote"
    );
    assert!(
        client.clock_high_water() > seen.time,
        "the clock ({}) is below the stamp of a value it holds ({})",
        client.clock_high_water(),
        seen.time
    );
}

/// A power cut while a new store file is being created (found by this file's images of the
/// store's creation): redb creates a file in two syncs — a header without its magic number,
/// then the magic — and a file cut off between them is refused forever ("Not a redb
/// database: magic number mismatch"). `Store::open` on a path therefore builds a new file
/// under a temporary name and links it into place once whole: whatever the cut leaves is
/// under the temporary name, and the path opens as a new store. (Stores on a custom backend
/// still need their backend to create atomically: `KNOWN_BUG_CREATE`.)
#[test]
fn a_store_cut_off_while_being_created_opens() {
    let disk = SimDisk::new();
    disk.record();
    let time = ManualTimeSource::new(T0_MS);
    drop(Store::open_backend(disk.backend(), options(&time)).expect("create"));
    let history = disk.history();
    let (first, _) = Replayer::new(&history, Vec::new())
        .next_sync()
        .expect("creating syncs");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.redb");
    // What a cut during creation leaves: the half-created file under its temporary name.
    let leftover = dir.path().join("store.redb.creating-1-2");
    std::fs::write(&leftover, &first).expect("write image");
    let store = Store::open(&path).expect("the path opens as a new store");
    store
        .write(|tx| tx.insert("A", 1, [("f0", Value::from(1))]))
        .expect("write");
    store.close().expect("close");
    let store = Store::open(&path).expect("reopen");
    assert_eq!(store.count("A").expect("count"), 1);
    // A normal creation leaves nothing but the store and its write-ahead file.
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["store.redb", "store.redb-wal", "store.redb.creating-1-2"],
        "no temporary file of its own left"
    );
}

/// Regression test (invariants 1 and 3): a write committed with `Durability::Deferred` can
/// be uploaded, and applied by the server, before it is durable on the client. If the
/// client then loses power, it comes back without that log entry while the server's record
/// says its log reaches it. It used to refuse every Welcome from then on ("server claims
/// position beyond this log", transient: reconnecting forever), and its next write would
/// have reused the lost entry's position, which the server skips as applied. Fixed: the
/// client never reuses those positions and rebuilds from the server (a reset).
#[test]
fn deferred_write_uploaded_then_lost_in_a_crash_does_not_wedge_sync() {
    let time = ManualTimeSource::new(T0_MS);
    let (sync, token) = server_in_memory(&time, |_| {});
    let disk = SimDisk::new();
    let store = Arc::new(Store::open_backend(disk.backend(), options(&time)).expect("open"));
    store
        .write(|tx| tx.insert("A", 0, [("f", 0)]))
        .expect("a durable write");
    let mut server = sync.session();
    let mut client = ClientSession::new(Arc::clone(&store), ClientConfig::new(token.clone()));
    let hello = client.hello().expect("hello");
    exchange(&mut server, &mut client, hello).expect("first sync");
    // A deferred write is uploaded and applied; the acknowledgement is not yet processed.
    let mut tx = store.begin().expect("begin");
    tx.set_durability(Durability::Deferred);
    tx.insert("A", 1, [("f", 1)]).expect("insert");
    tx.commit().expect("deferred commit");
    let upload = client.poll_upload().expect("poll").expect("an upload");
    let acks = server.on_message(upload, T0_MS);
    assert!(matches!(acks.first(), Some(ServerMsg::UploadAck { .. })));
    // Power cut on the client.
    disk.crash();
    drop(client);
    drop(store);
    let store = Arc::new(Store::open_backend(disk.backend(), options(&time)).expect("reopen"));
    assert_eq!(
        store.log_head(),
        1,
        "the deferred entry was lost, as documented"
    );
    let mut server = sync.session();
    let mut client = ClientSession::new(Arc::clone(&store), ClientConfig::new(token.clone()));
    let hello = client.hello().expect("hello");
    let mut synced = exchange(&mut server, &mut client, hello);
    if let Err(e) = &synced {
        // The client learns the server holds writes it lost; it ends the session to
        // reconnect and rebuild from the server (as the TCP client does by itself).
        assert!(e.is_transient(), "a fatal error: {e}");
        server = sync.session();
        client = ClientSession::new(Arc::clone(&store), ClientConfig::new(token));
        let hello = client.hello().expect("hello");
        synced = exchange(&mut server, &mut client, hello);
        let reports = client.take_reset_reports();
        assert_eq!(reports.len(), 1, "one rebuild: {reports:?}");
    }
    assert!(
        synced.is_ok(),
        "the client cannot sync after the crash: {synced:?}"
    );
    assert!(
        store.get("A", 1).expect("get").is_some(),
        "the lost write comes back from the server"
    );
    store
        .write(|tx| tx.insert("A", 2, [("f", 2)]))
        .expect("a new write");
    let synced = exchange(&mut server, &mut client, ClientMsg::Ping { id: 1 });
    assert!(synced.is_ok(), "{synced:?}");
    assert_eq!(
        store.digest(),
        sync.store().digest(),
        "client and server differ after the crash"
    );
}

/// A sync server on an in-memory store (configured by `configure`), and a token for user "u".
fn server_in_memory(
    time: &ManualTimeSource,
    configure: impl FnOnce(&mut ServerConfig),
) -> (Arc<SyncServer>, String) {
    let server_store = Arc::new(
        Store::open_backend(redb::backends::InMemoryBackend::new(), options(time))
            .expect("server store"),
    );
    server_on(server_store, configure)
}

/// A sync server on a store with a write-ahead file on simulated disks, and a token.
fn server_on_disks(
    disk: &SimDisk,
    wal: &SimDisk,
    time: &ManualTimeSource,
    configure: impl FnOnce(&mut ServerConfig),
) -> (Arc<SyncServer>, String) {
    let store = Store::open_backend_with_wal(disk.backend(), wal.backend(), options(time))
        .expect("open the server's store");
    server_on(Arc::new(store), configure)
}

/// A sync server on `store`, and a token it accepts.
fn server_on(
    store: Arc<Store>,
    configure: impl FnOnce(&mut ServerConfig),
) -> (Arc<SyncServer>, String) {
    let secret = Secret::from_hex(&"cd".repeat(32)).expect("secret");
    let claims = Claims {
        user_id: "u".into(),
        expires_at_ms: u64::MAX,
        extra: Default::default(),
    };
    let token = token::issue(&secret, &claims).expect("token");
    let mut config = ServerConfig::new(secret);
    configure(&mut config);
    let sync = Arc::new(SyncServer::open(store, config).expect("server"));
    (sync, token)
}

/// An upload is a write-ahead record on the server (its history rows and the client's
/// position go in the record): a server that loses power right after acknowledging it
/// has it after the restart, serves it to another client, and skips it when the client
/// sends it again.
#[test]
fn an_upload_acknowledged_before_a_server_power_cut_is_served_after_it() {
    let time = ManualTimeSource::new(T0_MS);
    let (disk, wal) = (SimDisk::new(), SimDisk::new());
    let open_server = || server_on_disks(&disk, &wal, &time, |_| {});
    let (sync, token) = open_server();
    let writer = Arc::new(
        Store::open_backend(redb::backends::InMemoryBackend::new(), options(&time))
            .expect("writer"),
    );
    for pk in 0..3 {
        writer
            .write(|tx| tx.insert("A", pk, [("f", pk)]))
            .expect("write");
    }
    let mut client = ClientSession::new(Arc::clone(&writer), ClientConfig::new(token.clone()));
    let hello = client.hello().expect("hello");
    exchange(&mut sync.session(), &mut client, hello).expect("sync");
    assert_eq!(writer.last_sync(), 3, "the uploads were acknowledged");

    disk.crash();
    wal.crash();
    drop(sync);
    let (sync, token) = open_server();
    assert_eq!(sync.uploaded(writer.replica_id()).expect("uploaded"), 3);
    assert_eq!(sync.store().count("A").expect("count"), 3);
    let reader = Arc::new(
        Store::open_backend(redb::backends::InMemoryBackend::new(), options(&time))
            .expect("reader"),
    );
    let mut client = ClientSession::new(Arc::clone(&reader), ClientConfig::new(token.clone()));
    let hello = client.hello().expect("hello");
    exchange(&mut sync.session(), &mut client, hello).expect("download");
    assert_eq!(
        reader.scan("A").expect("scan"),
        writer.scan("A").expect("scan")
    );
    assert_eq!(reader.digest(), writer.digest());
    // The writer, back as if its acknowledgements were lost, is told they were applied.
    let version = sync.version();
    let mut client = ClientSession::new(Arc::clone(&writer), ClientConfig::new(token));
    let hello = client.hello().expect("hello");
    exchange(&mut sync.session(), &mut client, hello).expect("sync again");
    assert_eq!(sync.version(), version, "nothing applied twice");
}

/// An upload with a conflict, resolved by the server's policy with a write of its own, is
/// one write-ahead record on the server (the conflict record, the server's history row for
/// its write, the client's position): acknowledged, it survives a power cut. Found needed
/// when those rows stopped being durable redb commits (format 8): with the records' `Aux`
/// rows not replayed, the conflict and the server's write are gone after the restart.
#[test]
fn an_upload_with_a_conflict_acknowledged_before_a_server_power_cut_is_served_after_it() {
    let time = ManualTimeSource::new(T0_MS);
    let (disk, wal) = (SimDisk::new(), SimDisk::new());
    let open_server = || {
        server_on_disks(&disk, &wal, &time, |c| {
            c.conflicts = fieldlog::conflict::Policies::new(fieldlog::conflict::Policy::ServerWins)
        })
    };
    let (sync, token) = open_server();
    let writer = Arc::new(
        Store::open_backend(redb::backends::InMemoryBackend::new(), options(&time))
            .expect("writer"),
    );
    let session = |store: &Arc<Store>| {
        ClientSession::new(Arc::clone(store), ClientConfig::new(token.clone()))
    };
    writer
        .write(|tx| tx.insert("A", 1, [("f", 0)]))
        .expect("insert");
    let mut client = session(&writer);
    let hello = client.hello().expect("hello");
    exchange(&mut sync.session(), &mut client, hello).expect("sync");
    // The server changes the field; the writer, not having seen it, changes it too.
    time.advance(10);
    sync.write(|tx| tx.set("A", 1, "f", 1))
        .expect("server write");
    time.advance(10);
    writer
        .write(|tx| tx.set("A", 1, "f", 2))
        .expect("client write");
    let mut client = session(&writer);
    let hello = client.hello().expect("hello");
    exchange(&mut sync.session(), &mut client, hello).expect("sync");
    assert_eq!(writer.last_sync(), 2, "the upload was acknowledged");
    let conflicts = sync.conflicts(0, 10).expect("conflicts");
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    let version = sync.version();
    let state = sync.store().get("A", 1).expect("get");
    assert_eq!(
        state.as_ref().and_then(|o| o.get("f").cloned()),
        Some(Value::from(1)),
        "the server's value won"
    );

    disk.crash();
    wal.crash();
    drop(sync);
    let (sync, _) = open_server();
    assert_eq!(sync.conflicts(0, 10).expect("conflicts"), conflicts);
    assert_eq!(
        sync.version(),
        version,
        "the server's own write is in its history"
    );
    assert_eq!(sync.store().get("A", 1).expect("get"), state);
    assert_eq!(sync.uploaded(writer.replica_id()).expect("uploaded"), 2);
    // A new client receives the server's value.
    let reader = Arc::new(
        Store::open_backend(redb::backends::InMemoryBackend::new(), options(&time))
            .expect("reader"),
    );
    let mut client = session(&reader);
    let hello = client.hello().expect("hello");
    exchange(&mut sync.session(), &mut client, hello).expect("download");
    assert_eq!(reader.get("A", 1).expect("get"), state);
    assert_eq!(reader.digest(), sync.store().digest());
}

/// Passes messages between a client and a server session, starting with `first`, until
/// neither has anything to send.
fn exchange(
    server: &mut ServerSession,
    client: &mut ClientSession,
    first: ClientMsg,
) -> Result<(), fieldlog::sync::client::SyncError> {
    let mut to_server = vec![first];
    // Until quiet: a reset snapshot takes a round per chunk.
    for _ in 0..10_000 {
        while let Some(m) = client.poll_upload().expect("poll_upload") {
            to_server.push(m);
        }
        let mut to_client = server.poll_download();
        for m in std::mem::take(&mut to_server) {
            to_client.extend(server.on_message(m, T0_MS));
        }
        if to_client.is_empty() {
            return Ok(());
        }
        for m in to_client {
            to_server.extend(client.on_message(m)?);
        }
    }
    Ok(())
}

/// An upload acknowledgement is not synced by itself (`mark_synced`): a power cut right
/// after it forgets it, and the client, back with the same unsynced entry, learns from the
/// server's Welcome that it was applied. The server applies it once; nothing is lost.
#[test]
fn an_acknowledgement_lost_in_a_power_cut_costs_no_write_and_no_duplicate() {
    let time = ManualTimeSource::new(T0_MS);
    let (sync, token) = server_in_memory(&time, |_| {});
    let (disk, wal) = (SimDisk::new(), SimDisk::new());
    let open = || {
        Arc::new(
            Store::open_backend_with_wal(disk.backend(), wal.backend(), options(&time))
                .expect("open"),
        )
    };
    let store = open();
    store
        .write(|tx| tx.insert("A", 0, [("f", 0)]))
        .expect("a durable write");
    let mut server = sync.session();
    let mut client = ClientSession::new(Arc::clone(&store), ClientConfig::new(token.clone()));
    let hello = client.hello().expect("hello");
    exchange(&mut server, &mut client, hello).expect("sync");
    assert_eq!(store.last_sync(), 1);
    // A second write is uploaded and applied, and its acknowledgement is the last thing
    // the client commits before the power goes.
    store
        .write(|tx| tx.insert("A", 1, [("f", 1)]))
        .expect("a durable write");
    let upload = client.poll_upload().expect("poll").expect("an upload");
    let replies = server.on_message(upload, T0_MS);
    let ack = replies
        .into_iter()
        .find(|m| matches!(m, ServerMsg::UploadAck { .. }))
        .expect("an acknowledgement");
    client.on_message(ack).expect("ack");
    assert_eq!(store.last_sync(), 2, "the upload was acknowledged");
    let version = sync.version();
    assert_eq!(sync.uploaded(store.replica_id()).expect("uploaded"), 2);

    disk.crash();
    wal.crash();
    drop(client);
    drop(store);
    let store = open();
    // Nothing made an acknowledgement durable since (the downloads were write-ahead
    // records too): the position is back at 0 or 1, never past what it synced.
    let after = store.last_sync();
    assert!(after < 2, "the acknowledgement was not synced by itself");
    let unsynced: Vec<u64> = store
        .unsynced(10)
        .expect("unsynced")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        unsynced,
        (after + 1..=2).collect::<Vec<_>>(),
        "the writes are still in the log, to upload again"
    );
    let mut server = sync.session();
    let mut client = ClientSession::new(Arc::clone(&store), ClientConfig::new(token));
    let hello = client.hello().expect("hello");
    exchange(&mut server, &mut client, hello).expect("sync after the power cut");
    assert_eq!(store.last_sync(), 2, "the Welcome marks it synced again");
    assert_eq!(sync.version(), version, "the server applied nothing twice");
    assert_eq!(
        sync.store().get("A", 0).expect("get").map(|o| o.fields),
        store.get("A", 0).expect("get").map(|o| o.fields),
    );
    assert_eq!(store.digest(), sync.store().digest());
}

/// The frames (offset, length) at the start of a write-ahead file.
fn wal_frames(wal: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(len) = wal.get(at..at + 4) {
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        if len == 0 || at + 20 + len > wal.len() {
            break;
        }
        out.push((at, 20 + len));
        at += 20 + len;
    }
    out
}

/// Regression test (invariant 3; found while writing the `wal_replay` fuzz target): after
/// a power cut, the replay stops at the first torn record, but the records after it whose
/// bytes reached the disk stayed in the file, with numbers the next commits take again.
/// Records are written from offset 0 after reopening; when the next ones ended exactly
/// where such a leftover record began, and it carried the next number, the following
/// reopen replayed it after them: a deferred commit that was never acknowledged came back
/// without the one before it, and its rows (whole object rows, the digest) overwrote an
/// acknowledged durable commit (`verify_digest` false, the acknowledged field gone).
/// Fixed: opening empties the write-ahead file once its records are in the database.
#[test]
fn a_record_left_past_a_torn_one_is_never_replayed_later() {
    let time = ManualTimeSource::new(T0_MS);
    // The new commit's record must end exactly where the leftover one begins: search the
    // value's length (2 bytes a character: the object row and the log entry hold it) and
    // the new field name's (1 byte a character: only its name row holds it).
    // (The replica id is random and its varint length varies the records': adjust each
    // attempt by what the last one missed by.)
    let mut aligned = 0;
    let (mut name_len, mut pad) = (1usize, 0usize);
    for _attempt in 0..100 {
        {
            let (db, wal) = (SimDisk::new(), SimDisk::new());
            let store =
                Store::open_backend_with_wal(db.backend(), wal.backend(), wal_options(&time))
                    .expect("open");
            store
                .write(|tx| tx.insert("T", 1, [("n", 1)]))
                .expect("write");
            store.close().expect("close");
            let store =
                Store::open_backend_with_wal(db.backend(), wal.backend(), wal_options(&time))
                    .expect("reopen");
            // r0 durable; r1 and r2 deferred, never acknowledged. The power fails with r1
            // torn (not on disk) and r2's bytes on disk (the OS wrote its page back).
            store.write(|tx| tx.set("T", 1, "n", 2)).expect("write");
            for v in [3i64, 4] {
                let mut tx = store.begin().expect("begin");
                tx.set_durability(Durability::Deferred);
                tx.set("T", 1, "n", v).expect("set");
                tx.insert("T", 10 + v, [("n", v)]).expect("insert");
                tx.commit().expect("deferred commit");
            }
            let live = wal.live_image();
            let frames = wal_frames(&live);
            assert_eq!(frames.len(), 3, "three records");
            let (r2, r2_len) = frames[2];
            let mut wal_image = wal.durable_image();
            wal_image[r2..r2 + r2_len].copy_from_slice(&live[r2..r2 + r2_len]);
            let db_image = db.durable_image();
            db.crash();
            wal.crash();
            drop(store);
            let (db, wal) = (
                SimDisk::from_image(db_image),
                SimDisk::from_image(wal_image),
            );
            let store =
                Store::open_backend_with_wal(db.backend(), wal.backend(), wal_options(&time))
                    .expect("open after the power cut");
            // An acknowledged durable commit, then another power cut.
            let name = "s".repeat(name_len);
            store
                .write(|tx| tx.set("T", 1, &name, "x".repeat(pad)))
                .expect("write");
            let new_len = wal_frames(&wal.live_image())[0].1;
            let mut d = r2 as i64 - new_len as i64;
            if d != 0 {
                if d % 2 != 0 {
                    (name_len, d) = if name_len == 1 {
                        (2, d - 1)
                    } else {
                        (1, d + 1)
                    };
                }
                pad = (pad as i64 + d / 2).max(0) as usize;
                continue;
            }
            aligned += 1;
            let digest = store.digest();
            db.crash();
            wal.crash();
            drop(store);
            let store =
                Store::open_backend_with_wal(db.backend(), wal.backend(), wal_options(&time))
                    .expect("open after the second power cut");
            assert!(store.verify_digest().expect("verify"), "digest");
            assert_eq!(
                store.digest(),
                digest,
                "the state is not the acknowledged one"
            );
            let t1 = store.get("T", 1).expect("get").expect("T 1");
            assert_eq!(t1.get(&name), Some(&Value::from("x".repeat(pad))));
            assert_eq!(t1.get("n"), Some(&Value::from(2)));
            assert!(store.get("T", 14).expect("get").is_none(), "r2 came back");
            break;
        }
    }
    assert!(
        aligned > 0,
        "no new record ended where the leftover one begins"
    );
}
