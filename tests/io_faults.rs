//! Invariants 3 and 6 under I/O errors: the store runs on simulated disks
//! (`fuzz/src/disk.rs`), one of which fails the k-th backend operation (read, write, set_len
//! or sync_data) — once, or from then on — for k = 1, 2, … until a run completes with no
//! fault injected. Three tests, one per faulty disk: a store without a write-ahead file
//! (its database disk), and a store with one (`Store::open_backend_with_wal`, 24 KiB
//! `checkpoint_bytes`) with faults on its database disk, then on its write-ahead disk (the
//! replay's reads on open, the appends, the file's growth, the syncs). The workload opens the
//! store and runs transactions (immediate and deferred, one with a 64 KiB value), `mark_synced`,
//! `prune_log`, an import, reads, a reopen (`Store::close`, then open) and a final
//! `Store::close`.
//!
//! For every k, and both modes:
//! 1. no panic (each run is under `catch_unwind`), and every failure is a typed error
//!    (`Error::Storage`, `Error::Poisoned` or `Error::Io`);
//! 2. after a failed write, set_len or fsync, the store refuses writes with
//!    `Error::Poisoned` until it is reopened, even once the disk works again (no silent
//!    retry of an fsync);
//! 3. reopened with the fault cleared, from the durable image (power lost after the
//!    failure), the state is the reference run's state after the last operation that
//!    returned `Ok` with a durable commit — or, if the failed operation's commit had reached
//!    the disk before the error, the state after it (counted as `errored_but_durable`:
//!    invariant 3 wants a failed write to leave no trace, which an fsync error cannot
//!    promise);
//!    After a `Store::close` that returned `Ok`, deferred commits are durable too. The
//!    store is dropped before that power cut (and redb's close makes its commits made
//!    without fsync durable), so the same is checked with the power cut at the failure
//!    itself, before the drop (or, in a run that completes, before the close): the
//!    commits only the write-ahead file holds must be put back from it
//!    (`errored_but_durable (at_failure=N)`);
//! 4. reopened from the live bytes (the process restarted, the OS kept its cache), the
//!    state is one of the reference states between those two;
//! 5. the reopened store takes writes again.
//!
//! The reference run is the same workload without faults. Each test prints
//! `io-faults: points=N panics=0` with the details (`files=db` or `files=db+wal`, and
//! `faulty=` the disk that fails).

#[path = "../fuzz/src/disk.rs"]
#[allow(dead_code)]
mod disk;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use disk::{FaultPlan, OpKind, SimDisk};
use fieldlog::{Changeset, Durability, Error, ManualTimeSource, Object, Options, Store, Value};

const T0_MS: u64 = 1_700_000_000_000;

/// BUG (fixed for stores on a path, open for custom backends like this file's; see
/// `a_store_cut_off_while_being_created_opens` in tests/crash_images.rs): a fault while the
/// store file is first created can leave bytes redb refuses to open ("magic number
/// mismatch"). While `true`, such images are counted
/// (`unopenable_new_file`), not failed.
const KNOWN_BUG_CREATE: bool = true;
const COLLS: [&str; 2] = ["A", "B"];

/// What the user can observe (the digest is left out: replica ids differ between runs).
#[derive(Clone, Debug, PartialEq)]
struct State {
    objects: Vec<Vec<Object>>,
    head: u64,
    last_sync: u64,
}

impl State {
    /// `st` is this state, or this state with an older acknowledged position
    /// (`mark_synced` is not synced by itself).
    fn holds(&self, st: &State) -> bool {
        st.last_sync <= self.last_sync
            && *self
                == State {
                    last_sync: self.last_sync,
                    ..st.clone()
                }
    }
}

fn state(store: &Store) -> Result<State, Error> {
    let mut objects = Vec::new();
    for c in COLLS {
        objects.push(store.scan(c)?);
    }
    Ok(State {
        objects,
        head: store.log_head(),
        last_sync: store.last_sync(),
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    Tx(u64, Durability),
    /// A transaction with a large value (the file grows).
    Big,
    MarkSynced,
    Prune,
    Import,
    Read,
    Reopen,
}

impl Step {
    fn writes(self) -> bool {
        !matches!(self, Step::Read)
    }

    /// Whether its success makes everything before it durable.
    fn durable(self) -> bool {
        !matches!(self, Step::Tx(_, Durability::Deferred) | Step::Read)
    }
}

const WORKLOAD: [Step; 15] = [
    Step::Tx(0, Durability::Immediate),
    Step::Tx(1, Durability::Immediate),
    Step::Tx(2, Durability::Deferred),
    Step::Read,
    Step::Big,
    Step::Tx(3, Durability::Immediate),
    Step::MarkSynced,
    Step::Import,
    Step::Tx(4, Durability::Deferred),
    Step::Reopen,
    Step::Tx(5, Durability::Immediate),
    Step::Prune,
    Step::Read,
    Step::Tx(6, Durability::Immediate),
    Step::Tx(7, Durability::Deferred),
];

fn options(time: &ManualTimeSource) -> Options {
    Options::default()
        .time(Arc::new(time.clone()))
        // These runs check that a poisoned store stays so until it is reopened; recovery
        // by itself has its own test below.
        .recover_after(None)
}

/// The write-ahead file's size before a checkpoint: small enough that the workload
/// checkpoints (and writes the file again from its start) before `Reopen` does, large
/// enough that its transactions (about 4 KiB each) are records; `Big` is over a quarter of
/// it, so it is a durable redb commit.
const CHECKPOINT_BYTES: u64 = 24 << 10;

/// Which files the store has, on one simulated disk each.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Files {
    /// The database only (`Store::open_backend`).
    Db,
    /// The database and its write-ahead file (`Store::open_backend_with_wal`).
    DbWal,
}

#[derive(Clone, Debug)]
struct Disks {
    db: SimDisk,
    wal: Option<SimDisk>,
}

impl Disks {
    fn new(files: Files) -> Self {
        Disks {
            db: SimDisk::new(),
            wal: (files == Files::DbWal).then(SimDisk::new),
        }
    }

    fn all(&self) -> impl Iterator<Item = &SimDisk> {
        std::iter::once(&self.db).chain(&self.wal)
    }

    fn open(&self, time: &ManualTimeSource) -> Result<Store, Error> {
        match &self.wal {
            Some(wal) => Store::open_backend_with_wal(
                self.db.backend(),
                wal.backend(),
                options(time).checkpoint_bytes(CHECKPOINT_BYTES),
            ),
            None => Store::open_backend(self.db.backend(), options(time)),
        }
    }

    /// The faults injected so far, on every disk.
    fn injected(&self) -> Vec<OpKind> {
        self.all().flat_map(SimDisk::injected).collect()
    }

    /// Disks holding the durable bytes now (what a power cut now leaves).
    fn durable(&self) -> Disks {
        Disks {
            db: SimDisk::from_image(self.db.durable_image()),
            wal: self
                .wal
                .as_ref()
                .map(|w| SimDisk::from_image(w.durable_image())),
        }
    }

    /// Disks holding the live bytes now (what a restarted process reads back).
    fn live(&self) -> Disks {
        Disks {
            db: SimDisk::from_image(self.db.live_image()),
            wal: self
                .wal
                .as_ref()
                .map(|w| SimDisk::from_image(w.live_image())),
        }
    }

    /// Power cut on every disk, and no faults from now on.
    fn crash(&self) {
        for d in self.all() {
            d.crash();
            d.set_fault(None);
        }
    }
}

/// A changeset of another replica to import.
fn remote_changeset() -> Changeset {
    let peer = Store::open_backend(
        redb::backends::InMemoryBackend::new(),
        options(&ManualTimeSource::new(T0_MS)),
    )
    .expect("peer");
    peer.write(|tx| tx.insert("B", 9, [("r", "remote"), ("pad", &*"p".repeat(900))]))
        .expect("peer write");
    peer.write(|tx| tx.insert("A", 0, [("f", "remote")]))
        .expect("peer write");
    peer.export(0, usize::MAX).expect("export")
}

fn run_step(
    store: &mut Option<Store>,
    step: Step,
    disks: &Disks,
    time: &ManualTimeSource,
    remote: &Changeset,
) -> Result<(), Error> {
    let s = store.as_ref().expect("open");
    match step {
        Step::Tx(i, d) => {
            let mut tx = s.begin()?;
            tx.set_durability(d);
            let pk = (i % 3) as i64;
            match tx.get("A", pk)? {
                Some(_) => tx.set("A", pk, "f", i as i64)?,
                None => tx.insert(
                    "A",
                    pk,
                    [
                        ("f", Value::from(i as i64)),
                        ("g", Value::from("x".repeat(2000))),
                    ],
                )?,
            }
            if i % 2 == 1 {
                tx.insert("B", i as i64, [("n", i as i64)])?;
            }
            if i == 5 {
                tx.delete("B", 1)?;
            }
            tx.commit()?;
            time.advance(1);
        }
        Step::Big => {
            let n = s.log_head() as i64;
            s.write(|tx| tx.insert("B", 100 + n, [("big", "b".repeat(64 << 10))]))?;
        }
        Step::MarkSynced => s.mark_synced(s.log_head())?,
        Step::Prune => {
            s.prune_log(2)?;
        }
        Step::Import => {
            s.import(remote)?;
        }
        Step::Read => {
            state(s)?;
            s.get("A", 0)?;
        }
        Step::Reopen => {
            if let Some(s) = store.take() {
                s.close()?;
            }
            *store = Some(disks.open(time)?);
        }
    }
    Ok(())
}

/// The reference states: after opening (index 0) and after each step.
fn reference(remote: &Changeset, steps: &[Step]) -> Vec<State> {
    let disks = Disks::new(Files::Db);
    let time = ManualTimeSource::new(T0_MS);
    let mut store = Some(disks.open(&time).expect("open"));
    let mut out = vec![state(store.as_ref().expect("open")).expect("state")];
    for &step in steps {
        run_step(&mut store, step, &disks, &time, remote).expect("a run without faults");
        out.push(state(store.as_ref().expect("open")).expect("state"));
    }
    out
}

#[derive(Default, Debug)]
struct Tally {
    points: u64,
    panics: u64,
    untyped: u64,
    not_poisoned: u64,
    wrong_state: u64,
    errored_but_durable: u64,
    /// The same, with the power cut at the failure (before the store was dropped).
    errored_but_durable_at_failure: u64,
    unopenable_new_file: u64,
    open_failures: u64,
    by_kind: [u64; 4],
    failures: Vec<String>,
}

impl Tally {
    fn fail(&mut self, msg: String) {
        if self.failures.len() < 20 {
            self.failures.push(msg);
        }
    }
}

fn typed(e: &Error) -> bool {
    matches!(e, Error::Storage(_) | Error::Poisoned | Error::Io(_))
}

/// Where the faults go: the store's files, and which of them fails.
#[derive(Clone, Copy, Debug)]
struct Target {
    files: Files,
    /// The write-ahead file's disk (else the database's).
    wal: bool,
}

/// One run with the fault plan; returns true when the workload completed with no fault.
fn run_one(
    target: Target,
    plan: FaultPlan,
    remote: &Changeset,
    refs: &[State],
    tally: &mut Tally,
) -> bool {
    let label = format!(
        "{:?}{} k={} forever={}",
        target.files,
        if target.wal { " (faults on wal)" } else { "" },
        plan.at,
        plan.forever
    );
    let disks = Disks::new(target.files);
    let time = ManualTimeSource::new(T0_MS);
    let faulty = if target.wal {
        disks.wal.as_ref().expect("a write-ahead file")
    } else {
        &disks.db
    };
    faulty.set_fault(Some(plan));
    // Index into `refs` of the last state made durable by an Ok step, and of the newest Ok
    // step; the failed step, if any.
    let mut durable = 0usize;
    let mut newest = 0usize;
    let mut failed: Option<(usize, Step)> = None;
    // A power cut at the failure (or, in a run that completes, before the close): the
    // disks, and `durable` and `newest` then.
    let mut cut: Option<(Disks, usize, usize)> = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut store = match disks.open(&time) {
            Ok(s) => Some(s),
            Err(e) => {
                if !typed(&e) {
                    tally.untyped += 1;
                    tally.fail(format!("{label}: open failed untyped: {e:?}"));
                }
                return;
            }
        };
        for (i, step) in WORKLOAD.iter().enumerate() {
            match run_step(&mut store, *step, &disks, &time, remote) {
                Ok(()) => {
                    newest = i + 1;
                    if step.durable() {
                        durable = i + 1;
                    }
                }
                Err(e) => {
                    if !typed(&e) {
                        tally.untyped += 1;
                        tally.fail(format!("{label}: step {i} {step:?} failed untyped: {e:?}"));
                    }
                    failed = Some((i + 1, *step));
                    cut = Some((disks.durable(), durable, newest));
                    let injected = disks.injected();
                    let write_fault = injected
                        .iter()
                        .any(|k| matches!(k, OpKind::Write | OpKind::SetLen | OpKind::Sync));
                    if step.writes() && write_fault {
                        if let Some(s) = &store {
                            // The disk works again (in "once" mode); writes are still refused.
                            let again = s.write(|tx| tx.insert("P", 1, [("x", 1)]));
                            if !matches!(again, Err(Error::Poisoned)) {
                                tally.not_poisoned += 1;
                                tally.fail(format!(
                                    "{label}: after {injected:?} failing {step:?}, a write returned {:?}",
                                    again.map(|_| ())
                                ));
                            }
                        }
                    }
                    break;
                }
            }
        }
        if failed.is_none() {
            cut = Some((disks.durable(), durable, newest));
        }
        match (failed, store) {
            // Completed: close, which makes the deferred commits durable or says it failed.
            (None, Some(s)) => match s.close() {
                Ok(()) => durable = newest,
                Err(e) => {
                    if !typed(&e) {
                        tally.untyped += 1;
                        tally.fail(format!("{label}: close failed untyped: {e:?}"));
                    }
                }
            },
            // Dropping a store closes it too; with a fault still active that must not panic.
            (_, s) => drop(s),
        }
    }));
    if result.is_err() {
        tally.panics += 1;
        tally.fail(format!("{label}: panicked"));
    }
    let injected = disks.injected();
    if let Some(kind) = injected.first() {
        tally.by_kind[*kind as usize] += 1;
    }
    // The live bytes (process restart), then the durable images (power cut).
    let live = disks.live();
    disks.crash();
    // The step in doubt: the one that failed, if it writes.
    let doubt = failed.filter(|(_, step)| step.writes()).map(|(j, _)| j);
    // Closing the store (the drop after the last step) may make the deferred steps since
    // the last durable one durable, or fail to: any state in between.
    let mut candidates_durable: Vec<usize> = (durable..=newest).collect();
    candidates_durable.extend(doubt);
    let candidates_live: Vec<usize> = (durable..=doubt.unwrap_or(newest).max(newest)).collect();
    let created = failed.is_some() || newest > 0;
    // At the failure, the store was not closed yet: what it had acknowledged durable, and
    // the failed step if its commit was durable before the error.
    let (cut_disks, candidates_cut) = match cut {
        Some((d, durable, newest)) => {
            let mut c: Vec<usize> = (durable..=newest).collect();
            c.extend(doubt);
            (Some(d), c)
        }
        None => (None, Vec::new()),
    };
    let mut images = vec![
        ("durable image", &disks, &candidates_durable),
        ("live image", &live, &candidates_live),
    ];
    if let Some(d) = &cut_disks {
        images.push(("image at the failure", d, &candidates_cut));
    }
    for (what, d, candidates) in images {
        let reopened = catch_unwind(AssertUnwindSafe(|| {
            d.open(&time).and_then(|s| {
                let st = state(&s)?;
                // Reopened, the store takes writes again.
                s.write(|tx| tx.insert("P", 1, [("x", 1)]))?;
                s.close()?;
                Ok(st)
            })
        }));
        match reopened {
            Err(_) => {
                tally.panics += 1;
                tally.fail(format!("{label}: reopening the {what} panicked"));
            }
            Ok(Err(e)) if !created && KNOWN_BUG_CREATE => {
                // See `a_store_cut_off_while_being_created_opens` in tests/crash_images.rs.
                let _ = e;
                tally.unopenable_new_file += 1;
            }
            Ok(Err(e)) => {
                tally.open_failures += 1;
                tally.fail(format!("{label}: the {what} does not open: {e:?}"));
            }
            Ok(Ok(st)) => match candidates.iter().find(|&&i| refs[i].holds(&st)) {
                Some(&i) => {
                    let is_doubt = Some(i) == doubt
                        && i > newest
                        && refs[i] != refs[newest]
                        && !matches!(failed, Some((_, Step::Reopen)));
                    if what == "durable image" && is_doubt {
                        // The failed step's commit reached the disk before the error.
                        tally.errored_but_durable += 1;
                    }
                    if what == "image at the failure" && is_doubt {
                        tally.errored_but_durable_at_failure += 1;
                    }
                }
                None => {
                    let which = refs.iter().position(|r| *r == st);
                    tally.wrong_state += 1;
                    tally.fail(format!(
                        "{label}: the {what} holds reference state {which:?}, expected one of {candidates:?} (failed step {failed:?}, injected {injected:?})"
                    ));
                }
            },
        }
    }
    injected.is_empty()
}

/// Fails the k-th operation of the target's faulty disk for k = 1, 2, … in both modes, and
/// prints the `io-faults:` line.
fn io_faults(target: Target) {
    let started = Instant::now();
    let remote = remote_changeset();
    let refs = reference(&remote, &WORKLOAD);
    let mut tally = Tally::default();
    let mut ks = [0u64; 2];
    for (m, forever) in [false, true].into_iter().enumerate() {
        for k in 1.. {
            tally.points += 1;
            ks[m] = k;
            if run_one(
                target,
                FaultPlan { at: k, forever },
                &remote,
                &refs,
                &mut tally,
            ) {
                break;
            }
            assert!(k < 1_000_000, "the workload never completes");
        }
    }
    println!(
        "io-faults: points={} panics={} (files={} faulty={} ops: once={} forever={}; untyped={} not_poisoned={} wrong_state={} open_failures={} errored_but_durable={} (at_failure={}) unopenable_new_file={} first_fault read/write/set_len/sync={:?}; {:.1?})",
        tally.points,
        tally.panics,
        match target.files {
            Files::Db => "db",
            Files::DbWal => "db+wal",
        },
        if target.wal { "wal" } else { "db" },
        ks[0],
        ks[1],
        tally.untyped,
        tally.not_poisoned,
        tally.wrong_state,
        tally.open_failures,
        tally.errored_but_durable,
        tally.errored_but_durable_at_failure,
        tally.unopenable_new_file,
        tally.by_kind,
        started.elapsed()
    );
    assert!(tally.failures.is_empty(), "failures: {:#?}", tally.failures);
}

/// A store without a write-ahead file: every operation of its database file.
#[test]
fn io_faults_at_every_operation() {
    io_faults(Target {
        files: Files::Db,
        wal: false,
    });
}

/// A store with a write-ahead file: every operation of its database file.
#[test]
fn io_faults_at_every_database_operation_with_wal() {
    io_faults(Target {
        files: Files::DbWal,
        wal: false,
    });
}

/// A store with a write-ahead file: every operation of the write-ahead file (the reads of
/// the replay on open, the appends, the growth, the syncs).
#[test]
fn io_faults_at_every_wal_operation() {
    io_faults(Target {
        files: Files::DbWal,
        wal: true,
    });
}

/// Regression test (invariant 3: "a write that returned an error left no trace"): a commit
/// returned `Err(Storage)` after its data reached stable storage. Found by
/// `io_faults_at_every_operation` (`errored_but_durable`): redb shrinks the file after a
/// durable commit's fsync when the commit freed its top, a failed `set_len` there failed the
/// commit, and after a power cut the "failed" change was there; for a transaction an
/// application would retry (an increment, say), that applies it twice. Fixed: the store's
/// backend (`src/backend.rs`) treats a failed shrink as done (the file keeps its length).
///
/// This test fails each step of a workload at each of its operations in turn and reports
/// every step whose error left its effect durable. (Which operation redb makes after the
/// fsync depends on the file's layout; this workload, the first steps of an earlier version
/// of `WORKLOAD`, reproduces it: `MarkSynced` fails on a `set_len` at its 8th operation.)
#[test]
fn a_failed_commit_leaves_no_trace() {
    const STEPS: [Step; 6] = [
        Step::Tx(0, Durability::Immediate),
        Step::Tx(1, Durability::Immediate),
        Step::Tx(2, Durability::Deferred),
        Step::Read,
        Step::Tx(3, Durability::Immediate),
        Step::MarkSynced,
    ];
    let remote = remote_changeset();
    let refs = reference(&remote, &STEPS);
    let mut found = Vec::new();
    for (i, step) in STEPS.iter().enumerate() {
        if !step.writes() || *step == Step::Reopen {
            continue;
        }
        for k in 1..10_000 {
            let disks = Disks::new(Files::Db);
            let disk = &disks.db;
            let time = ManualTimeSource::new(T0_MS);
            let mut store = Some(disks.open(&time).expect("open"));
            for s in &STEPS[..i] {
                run_step(&mut store, *s, &disks, &time, &remote).expect("step");
            }
            disk.set_fault(Some(FaultPlan {
                at: k,
                forever: false,
            }));
            let r = run_step(&mut store, *step, &disks, &time, &remote);
            let injected = disk.injected();
            // Not a clean close: the power goes.
            disk.crash();
            drop(store);
            if injected.is_empty() {
                break;
            }
            disk.set_fault(None);
            if r.is_err() {
                let s = Store::open_backend(disk.backend(), options(&time)).expect("reopen");
                let st = state(&s).expect("state");
                if st == refs[i + 1] && refs[i + 1] != refs[i] {
                    found.push(format!("step {i} {step:?}, fault {injected:?} at op {k}"));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "steps that returned an error and are durable after a power cut: {found:#?}"
    );
}

/// A store on `disk` holding `A`/0, committed durably, and `A`/1, committed deferred.
fn a_durable_and_a_deferred_write(disk: &SimDisk, time: &ManualTimeSource) -> Store {
    let store = Store::open_backend(disk.backend(), options(time)).expect("open");
    store
        .write(|tx| tx.insert("A", 0, [("f", 0)]))
        .expect("write");
    let mut tx = store.begin().expect("begin");
    tx.set_durability(Durability::Deferred);
    tx.insert("A", 1, [("f", 1)]).expect("insert");
    tx.commit().expect("a deferred commit");
    store
}

/// Regression test (invariant 3, `Durability::Deferred`: "a crash before then loses it
/// (and only it)"; found by `io_faults_at_every_operation`): with no crash at all, a deferred
/// commit that returned `Ok` was lost when closing the store failed to write, and nothing
/// could report it, closing being `Drop`. Fixed: `Store::close` makes deferred commits
/// durable and returns the error.
#[test]
fn a_failing_close_reports_that_deferred_commits_may_be_lost() {
    let time = ManualTimeSource::new(T0_MS);
    let disk = SimDisk::new();
    let store = a_durable_and_a_deferred_write(&disk, &time);
    // The disk fails while the store closes, then works again; the process goes on.
    disk.set_fault(Some(FaultPlan {
        at: 1,
        forever: true,
    }));
    let closed = store.close();
    disk.set_fault(None);
    let store = Store::open_backend(disk.backend(), options(&time)).expect("reopen");
    assert!(
        closed.is_err() || store.get("A", 1).expect("get").is_some(),
        "a deferred commit that returned Ok vanished with no crash and no error"
    );
    assert!(closed.is_err(), "the failing close is reported");
}

/// Regression test (invariant 3: "a write that returned an error left no trace"; found by
/// `io_faults_at_every_wal_operation`, `errored_but_durable` 34 of 42 fault points): a local
/// commit went to redb first (without fsync, visible at once) and then appended its record
/// to the write-ahead file. When that append failed (a write or set_len error, before
/// anything was synced), the commit returned `Err(Storage)` and poisoned the store — but the
/// transaction was already committed in redb: reads in the same process saw it, and when
/// the store was dropped redb's close made its pending non-durable commit durable, with no
/// power cut at all; an application retrying it (an increment, say) applied it twice.
/// Fixed: the record is appended before the redb commit, and a failed append drops the
/// transaction uncommitted (and the redb batch it joined: the store then refuses reads
/// until reopened, which puts back the commits before it from their records). What is left in `errored_but_durable` is a failed fsync of the file, after
/// which the commit is in doubt (as the module header says).
#[test]
fn a_commit_whose_wal_append_failed_leaves_no_trace() {
    let time = ManualTimeSource::new(T0_MS);
    let disks = Disks::new(Files::DbWal);
    let wal = disks.wal.as_ref().expect("a write-ahead file");
    let store = disks.open(&time).expect("open");
    store
        .write(|tx| tx.insert("A", 0, [("f", 0)]))
        .expect("write");
    // The next write-ahead operation (the append) fails; the disk then works again.
    wal.set_fault(Some(FaultPlan {
        at: 1,
        forever: false,
    }));
    let r = store.write(|tx| tx.set("A", 0, "f", 1));
    assert_eq!(wal.injected(), vec![OpKind::Write]);
    assert!(r.is_err(), "the append failed: the commit must fail");
    let f = |s: &Store| s.get("A", 0).map(|o| o.and_then(|o| o.get("f").cloned()));
    // The first commit returned once its record was synced, its redb batch still open; the
    // second joined that batch, so the failure abandons both: until a reopen, readers are
    // refused (the database lacks the first) rather than shown either.
    let seen = f(&store);
    assert!(
        matches!(&seen, Err(Error::Poisoned)) || seen.as_ref().ok() == Some(&Some(Value::from(0))),
        "read after the error: {seen:?}; a commit that returned an error left a trace"
    );
    // The process ends (no crash): the store is dropped.
    drop(store);
    disks.crash();
    let store = disks.open(&time).expect("reopen");
    assert_eq!(
        f(&store).expect("get"),
        Some(Value::from(0)),
        "read after reopening: the first commit is back, the failed one left no trace"
    );
}

/// Regression test (found reading redb 4.5's `Database::close`): after the checkpoint,
/// closing a store dropped redb's database, which writes its allocator state and shutdown
/// header and ignores a failure (the next open then repairs the file). Every fault while a
/// store closes is now reported (but a failed shrink, see `a_failed_commit_leaves_no_trace`),
/// and nothing acknowledged is lost.
#[test]
fn every_fault_while_closing_is_reported() {
    let time = ManualTimeSource::new(T0_MS);
    let open_and_write = |disk: &SimDisk| a_durable_and_a_deferred_write(disk, &time);
    let disk = SimDisk::new();
    let store = open_and_write(&disk);
    disk.set_fault(None);
    store.close().expect("close");
    let ops = disk.ops();
    assert!(ops > 2, "a close writes and syncs: {ops} operations");
    let mut reported = 0;
    for at in 1..=ops {
        let disk = SimDisk::new();
        let store = open_and_write(&disk);
        disk.set_fault(Some(FaultPlan { at, forever: false }));
        let closed = store.close();
        let injected = disk.injected();
        disk.set_fault(None);
        if !injected.is_empty() {
            // Except a failed shrink of the file (redb's, after its commit is durable): it
            // loses nothing (both writes are checked below), and is not an error.
            assert!(
                closed.is_err() || injected == [OpKind::SetLen],
                "a close that hit a fault ({injected:?} at operation {at} of {ops}) said Ok"
            );
            reported += usize::from(closed.is_err());
        }
        let store = Store::open_backend(disk.backend(), options(&time)).expect("reopen");
        assert!(
            store.get("A", 0).expect("get").is_some(),
            "a durable write lost"
        );
        if closed.is_ok() {
            assert!(
                store.get("A", 1).expect("get").is_some(),
                "a deferred write lost"
            );
        }
    }
    assert!(reported > 0, "no fault was injected");
}

/// What one run of [`recovery_run`] saw.
#[derive(Default, Debug)]
struct Recovered {
    /// Runs in which the store was poisoned and then took writes again without a reopen.
    recovered: u64,
    /// Commits that returned an error and were found applied after all (an fsync that
    /// failed after the bytes reached the disk): allowed, counted.
    errored_but_applied: u64,
    /// Deferred commits of a store without a write-ahead file, acknowledged before the
    /// failure with no durable commit after them, lost in the recovery as in a restart.
    deferred_lost: u64,
}

/// One run of the recovery workload with the `at`-th operation of the faulty disk failing
/// from then on, until the disk is mended after the first failure and three more
/// commits. Returns whether a fault was injected.
fn recovery_run(target: Target, at: u64, seen: &mut Recovered) -> bool {
    let label = format!("{target:?} k={at}");
    let disks = Disks::new(target.files);
    let time = ManualTimeSource::new(T0_MS);
    let after = std::time::Duration::from_secs(1);
    let opened = match &disks.wal {
        Some(wal) => Store::open_backend_with_wal(
            disks.db.backend(),
            wal.backend(),
            options(&time)
                .checkpoint_bytes(CHECKPOINT_BYTES)
                .recover_after(Some(after)),
        ),
        None => Store::open_backend(
            disks.db.backend(),
            options(&time).recover_after(Some(after)),
        ),
    };
    let store = opened.expect("open");
    let faulty = if target.wal {
        disks.wal.as_ref().expect("a write-ahead file")
    } else {
        &disks.db
    };
    faulty.set_fault(Some(FaultPlan { at, forever: true }));
    let (mut acked, mut errored) = (Vec::new(), Vec::new());
    let mut failing_since: Option<usize> = None;
    let mut poisoned = false;
    // Past the workload, the disk is mended and one more commit made (it must succeed).
    for i in 0..19i64 {
        let mend = failing_since.is_some_and(|f| i as usize == (f + 3).min(18));
        if i >= 16 && !mend && failing_since.is_none_or(|f| f + 3 < 16) {
            break;
        }
        if mend {
            // The disk works again; the store recovers on the first call after its wait.
            faulty.set_fault(None);
            time.advance(after.as_millis() as u64);
        }
        let durability = if i % 3 == 2 {
            Durability::Deferred
        } else {
            Durability::Immediate
        };
        let r = (|| {
            let mut tx = store.begin()?;
            tx.set_durability(durability);
            tx.insert(
                "R",
                i,
                [("n", Value::from(i)), ("pad", Value::from("r".repeat(900)))],
            )?;
            if i % 5 == 4 {
                tx.insert("R", 1000 + i, [("big", "b".repeat(32 << 10))])?;
            }
            tx.commit()
        })();
        time.advance(1);
        match r {
            Ok(_) => acked.push((i, durability)),
            Err(e) => {
                assert!(typed(&e), "{label}: commit {i} failed untyped: {e:?}");
                assert!(
                    failing_since.is_none_or(|f| i as usize <= f + 2),
                    "{label}: commit {i} failed after the disk was mended: {e:?}"
                );
                poisoned |= matches!(e, Error::Poisoned);
                failing_since.get_or_insert(i as usize);
                errored.push(i);
            }
        }
    }
    if poisoned {
        seen.recovered += 1;
    }
    // Every acknowledged commit is there; no failed one is, unless its bytes made it.
    let present: Vec<i64> = store
        .scan("R")
        .expect("scan")
        .iter()
        .filter_map(|o| match o.pk {
            fieldlog::Pk::Int(pk) if pk < 1000 => Some(pk),
            _ => None,
        })
        .collect();
    let failed_at = failing_since.map_or(i64::MAX, |f| f as i64);
    for &(i, durability) in &acked {
        if present.contains(&i) {
            continue;
        }
        // Without a write-ahead file, a deferred commit is durable with the next durable
        // one; a recovery, like a restart, loses it if none came before the failure.
        let made_durable = acked
            .iter()
            .any(|&(j, d)| j > i && j < failed_at && d == Durability::Immediate);
        if target.files == Files::Db && durability == Durability::Deferred && !made_durable {
            seen.deferred_lost += 1;
            continue;
        }
        panic!("{label}: acknowledged commit {i} ({durability:?}) lost (present {present:?})");
    }
    for i in &present {
        let acknowledged = acked.iter().any(|(j, _)| j == i);
        assert!(
            acknowledged || errored.contains(i),
            "{label}: {i} never written"
        );
        if errored.contains(i) {
            seen.errored_but_applied += 1;
        }
    }
    assert!(store.verify_digest().expect("verify"), "{label}: digest");
    // Past the last fault point, the workload ran without one: the close must not fail.
    let injected = !disks.injected().is_empty();
    faulty.set_fault(None);
    store.close().expect("close");
    // A power cut now: the durable images hold the same.
    disks.crash();
    let reopened = disks.durable().open(&time).expect("reopen");
    let after_cut: Vec<i64> = reopened
        .scan("R")
        .expect("scan")
        .iter()
        .filter_map(|o| match o.pk {
            fieldlog::Pk::Int(pk) if pk < 1000 => Some(pk),
            _ => None,
        })
        .collect();
    assert_eq!(after_cut, present, "{label}: after a power cut");
    injected
}

/// A store whose disk fails (every operation from the k-th on, for every k of a workload of
/// immediate and deferred commits, some large enough to be redb commits, on the database's
/// disk or the write-ahead file's) and then works again recovers by itself: once
/// `Options::recover_after` has passed, the next call opens the database again and replays
/// the write-ahead file, and every commit after that succeeds. Every commit that returned
/// `Ok` is there after the recovery and after a power cut; no failed commit is, unless its
/// bytes reached the disk before the error.
#[test]
fn a_poisoned_store_recovers_by_itself_and_keeps_every_acknowledged_commit() {
    for target in [
        Target {
            files: Files::Db,
            wal: false,
        },
        Target {
            files: Files::DbWal,
            wal: false,
        },
        Target {
            files: Files::DbWal,
            wal: true,
        },
    ] {
        let mut seen = Recovered::default();
        let mut points = 0;
        for k in 1.. {
            points += 1;
            if !recovery_run(target, k, &mut seen) {
                break;
            }
            assert!(k < 100_000, "the workload never completes");
        }
        println!("recovery: {target:?} points={points} {seen:?}");
        assert!(seen.recovered > 0, "{target:?}: no run was poisoned");
    }
}
