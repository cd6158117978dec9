//! Runs issue 7's whole YCSB-shaped workload once, at full size, and prints the table the
//! README shows: fieldlog's figures, each baseline's, and the ratios, measured in one run.
//!
//! ```sh
//! cargo run --release --example bench              # full size (several minutes)
//! FIELDLOG_BENCH_QUICK=1 cargo run --release --example bench   # about 1/20 of it
//! ```
//!
//! Engines and workload: `benches/workload/mod.rs` (shared with the criterion benches).
//! Progress goes to stderr, the table to stdout.

#[path = "../benches/workload/mod.rs"]
mod workload;

use std::time::{Duration, Instant};

use rand::RngExt;
use workload::{
    concurrent, concurrent_one_at_a_time, load_all, recovery, update_all, updates, Am, Dist,
    Engine, Fieldlog, FieldlogPair, Keys, RawRedb, Sizes, Sqlite, SyncRig, Upd,
};

const RSS_CHILD: &str = "FIELDLOG_BENCH_RSS_CHILD";
const AM_CHILD: &str = "FIELDLOG_BENCH_AUTOMERGE_CHILD";
const MIB: f64 = 1024.0 * 1024.0;

/// Columns: fieldlog, raw redb 1, raw redb 2, SQLite, automerge.
const COLS: usize = 5;

#[derive(Default)]
struct Line {
    workload: String,
    unit: &'static str,
    v: [Option<f64>; COLS],
    target: String,
}

fn rate(n: u32, d: Duration) -> f64 {
    f64::from(n) / d.as_secs_f64()
}

fn step(what: &str) {
    eprintln!("[{:>7.1?}] {what}", started().elapsed());
}

fn started() -> &'static Instant {
    static T: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    T.get_or_init(Instant::now)
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "—".into(),
        Some(x) if unit.ends_with("/s") => {
            if x >= 1e6 {
                format!("{:.2} M", x / 1e6)
            } else if x >= 1e3 {
                format!("{:.1} k", x / 1e3)
            } else {
                format!("{x:.0}")
            }
        }
        Some(x) if unit == "MiB" => format!("{x:.1}"),
        Some(x) if unit == "s" => format!("{x:.3}"),
        Some(x) => format!("{x:.2}"),
    }
}

/// In a child process, so the figure is this engine's alone: load, then the uniform
/// batched updates; prints the peak RSS of the update phase in bytes.
fn rss_child(engine: &str) {
    let s = sizes();
    let dir = tempfile::tempdir().expect("tempdir");
    let e: Box<dyn Engine> = match engine {
        "fieldlog" => Box::new(Fieldlog::open(dir.path())),
        "sqlite" => Box::new(Sqlite::open(dir.path())),
        _ => panic!("unknown engine {engine}"),
    };
    let mut rng = workload::rng(7);
    load_all(e.as_ref(), s.objects, s.batch, &mut rng);
    let load_peak = workload::peak_rss();
    let reset = workload::reset_peak_rss();
    let ups = updates(&Keys::new(s.objects, Dist::Uniform), s.updates, &mut rng);
    update_all(e.as_ref(), &ups, s.batch);
    println!("{} {} {}", workload::peak_rss(), load_peak, reset);
}

/// automerge's workloads (load, both batched updates, merge), run in a child process of
/// its own: its in-memory document of 100 k objects is a heap of small allocations, and
/// kept in the same process it slowed the other engines' reads by about 40 %. Prints the
/// four rates.
fn automerge_child() {
    let s = sizes();
    let n = s.objects;
    let mut rng = workload::rng(7);
    let am = Am::new();
    let load = rate(n, load_all(&am, n, s.batch, &mut rng));
    let mut batched = Vec::new();
    for dist in [Dist::Uniform, Dist::Zipfian] {
        let ups = updates(&Keys::new(n, dist), s.updates, &mut rng);
        batched.push(rate(s.updates, update_all(&am, &ups, s.batch)));
    }
    // The same remote writes the main process merges into fieldlog, applied in as many parts.
    let merge_ups = updates(
        &Keys::new(n, Dist::Uniform),
        s.updates,
        &mut workload::rng(8),
    );
    let am_b = am.fork();
    update_all(&am, &merge_ups, s.batch);
    let mut changes = am.changes_for(&am_b);
    let per_round = changes.len().div_ceil(ROUNDS as usize);
    let mut spent = Duration::ZERO;
    while !changes.is_empty() {
        let mine: Vec<_> = changes.drain(..per_round.min(changes.len())).collect();
        let t = Instant::now();
        am_b.apply(mine);
        spent += t.elapsed();
    }
    println!(
        "{load} {} {} {}",
        batched[0],
        batched[1],
        rate(s.updates, spent)
    );
}

/// Runs [`automerge_child`]: automerge's load, uniform and zipfian update, and merge rates.
fn automerge_rates() -> [Option<f64>; 4] {
    let out = std::process::Command::new(std::env::current_exe().expect("exe"))
        .env(AM_CHILD, "1")
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("automerge child");
    assert!(out.status.success(), "automerge child failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rates = [None; 4];
    for (slot, v) in rates.iter_mut().zip(text.split_whitespace()) {
        *slot = v.parse().ok();
    }
    rates
}

fn rss_of(engine: &str) -> Option<f64> {
    let out = std::process::Command::new(std::env::current_exe().ok()?)
        .env(RSS_CHILD, engine)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let update_peak: f64 = it.next()?.parse().ok()?;
    let load_peak: f64 = it.next()?.parse().ok()?;
    let reset = it.next()? == "true";
    eprintln!(
        "  {engine}: peak RSS {:.1} MiB during updates{}, {:.1} MiB during load",
        update_peak / MIB,
        if reset {
            ""
        } else {
            " (VmHWM not resettable: includes load)"
        },
        load_peak / MIB
    );
    Some(update_peak / MIB)
}

fn sizes() -> Sizes {
    if std::env::var_os("FIELDLOG_BENCH_QUICK").is_some() {
        Sizes::quick()
    } else {
        Sizes::full()
    }
}

/// For a profiler: `FIELDLOG_BENCH_PROFILE=batch|durable|concurrent|merge|read|mixed|recovery|sync`
/// runs only fieldlog's part, with the measured work inside `profiled` (e.g. valgrind's
/// `--collect-atstart=no --toggle-collect='*profiled*'`). `FIELDLOG_BENCH_PROFILE_N` sets
/// the number of writes (default 20,000; durable: 300), `FIELDLOG_BENCH_PROFILE_OBJECTS` the
/// number of objects loaded first (default 10,000). `read` first runs what the full bench
/// runs before its reads (as many uniform, then zipfian, batched updates as
/// `FIELDLOG_BENCH_PROFILE_UPDATES`, default twice the objects each, then the log pruned and
/// checkpointed), since random updates leave the objects table fragmented.
fn profile(what: &str) {
    #[inline(never)]
    fn profiled(f: &mut dyn FnMut()) {
        let t = Instant::now();
        f();
        eprintln!("profiled part: {:.2?}", t.elapsed());
    }
    let env_u32 = |name: &str, default: u32| -> u32 {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let objects = env_u32("FIELDLOG_BENCH_PROFILE_OBJECTS", 10_000);
    let count = env_u32(
        "FIELDLOG_BENCH_PROFILE_N",
        match what {
            "durable" => 300,
            "concurrent" => 4_000,
            _ => 20_000,
        },
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = workload::rng(7);
    let keys = Keys::new(objects, Dist::Uniform);
    let ups = updates(&keys, count, &mut rng);
    let t = Instant::now();
    match what {
        "recovery" => {
            // The whole reset is timed; the replay and swap are `Store::finish_reset`
            // (valgrind: `--toggle-collect='*finish_reset*'`).
            let mut out = None;
            profiled(&mut || out = Some(recovery(dir.path(), objects, count)));
            if let Some((report, whole)) = out {
                eprintln!(
                    "recovery: replay + swap {:.3?}, whole reset {whole:.2?}, {} recovered",
                    report.replay_time,
                    report.recovered.len()
                );
            }
        }
        "sync" => {
            let mut rig = SyncRig::new(dir.path(), objects, 1_000);
            let mut took = Duration::ZERO;
            profiled(&mut || took = rig.round(count));
            assert!(rig.converged(), "sync diverged");
            eprintln!("sync: {:.0} changes/s", rate(count, took));
        }
        "merge" => {
            let pair = FieldlogPair::new(dir.path(), objects, 1_000, &mut rng);
            pair.write(&ups, 1_000);
            let sets = pair.produce_changesets(10);
            profiled(&mut || {
                for cs in &sets {
                    pair.b.import(cs).expect("import");
                }
            });
        }
        _ => {
            let e = Fieldlog::open(dir.path());
            load_all(&e, objects, 1_000, &mut rng);
            if what == "read" {
                let n = env_u32("FIELDLOG_BENCH_PROFILE_UPDATES", 2 * objects);
                for dist in [Dist::Uniform, Dist::Zipfian] {
                    let ups = updates(&Keys::new(objects, dist), n, &mut rng);
                    update_all(&e, &ups, 1_000);
                }
                e.disk_bytes();
                eprintln!("read: set up in {:.2?}", t.elapsed());
            }
            let reads: Vec<u32> = (0..count).map(|_| rng.random_range(0..objects)).collect();
            profiled(&mut || match what {
                "batch" => {
                    update_all(&e, &ups, 1_000);
                }
                "durable" => {
                    update_all(&e, &ups, 1);
                }
                "concurrent" => {
                    let work: Vec<Vec<Upd>> = ups
                        .chunks(ups.len().div_ceil(8))
                        .map(<[Upd]>::to_vec)
                        .collect();
                    let alone = concurrent_one_at_a_time(&e, &work);
                    let together = concurrent(&e, &work);
                    eprintln!(
                        "concurrent: 8 writers {:.0}/s, one at a time {:.0}/s ({:.2} x)",
                        rate(count, together),
                        rate(count, alone),
                        alone.as_secs_f64() / together.as_secs_f64()
                    );
                }
                "read" => {
                    for &o in &reads {
                        std::hint::black_box(e.read(o));
                    }
                }
                "mixed" => mixed(&e, &ups, &reads),
                _ => panic!("FIELDLOG_BENCH_PROFILE: one of the parts `profile` lists"),
            });
        }
    }
    eprintln!("{what}: {count} in {:.2?}", t.elapsed());
}

/// One reader reading random objects, one at a time, while a writer commits the batched
/// updates: how long a read waits behind the writer (it commits the open batch, or waits
/// for a member being put into it).
fn mixed(e: &Fieldlog, ups: &[Upd], reads: &[u32]) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let done = AtomicBool::new(false);
    let (took, mut waits) = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut waits = Vec::new();
            // At least one read, so that the percentiles below have one to take.
            for &o in reads.iter().cycle() {
                let t = Instant::now();
                std::hint::black_box(e.read(o));
                waits.push(t.elapsed());
                if done.load(Ordering::Relaxed) {
                    break;
                }
            }
            waits
        });
        let took = update_all(e, ups, 1_000);
        done.store(true, Ordering::Relaxed);
        (took, reader.join().expect("reader"))
    });
    waits.sort_unstable();
    let at = |q: f64| waits[((waits.len() - 1) as f64 * q) as usize];
    eprintln!(
        "mixed: {:.0} writes/s beside {} reads ({:.0}/s); read p50 {:.1?}, p99 {:.1?}, p99.9 {:.1?}, max {:.1?}",
        rate(ups.len() as u32, took),
        waits.len(),
        waits.len() as f64 / took.as_secs_f64(),
        at(0.5),
        at(0.99),
        at(0.999),
        at(1.0)
    );
}

/// Rounds each workload is cut into; the engines take turns within a round (in a rotating
/// order), so a noisy neighbour on a shared machine hits every engine alike.
const ROUNDS: u32 = 10;

fn part(total: u32, r: u32) -> std::ops::Range<u32> {
    total * r / ROUNDS..total * (r + 1) / ROUNDS
}

/// Runs `f` for every engine present (automerge runs in its own process), `ROUNDS` times,
/// in rotating order; returns `total / time` per engine.
fn rounds(
    engines: &[Option<&dyn Engine>; COLS],
    total: u32,
    what: &str,
    mut prepare: impl FnMut(u32) -> Box<dyn std::any::Any>,
    mut f: impl FnMut(usize, &dyn Engine, &dyn std::any::Any) -> Duration,
) -> [Option<f64>; COLS] {
    step(what);
    let mut spent = [Duration::ZERO; COLS];
    for r in 0..ROUNDS {
        let input = prepare(r);
        for k in 0..COLS {
            let i = (k + r as usize) % COLS;
            if let Some(e) = engines[i] {
                spent[i] += f(i, e, input.as_ref());
            }
        }
    }
    let mut out = [None; COLS];
    for i in 0..COLS {
        if engines[i].is_some() {
            out[i] = Some(rate(total, spent[i]));
        }
    }
    out
}

fn main() {
    if let Ok(engine) = std::env::var(RSS_CHILD) {
        rss_child(&engine);
        return;
    }
    if std::env::var_os(AM_CHILD).is_some() {
        automerge_child();
        return;
    }
    if let Ok(what) = std::env::var("FIELDLOG_BENCH_PROFILE") {
        profile(&what);
        return;
    }
    started();
    let s = sizes();
    let n = s.objects;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut lines: Vec<Line> = Vec::new();

    step("automerge (a child process)");
    let am = automerge_rates();
    let fieldlog = Fieldlog::open(dir.path());
    let raw = RawRedb::open(dir.path(), false);
    let raw_log = RawRedb::open(dir.path(), true);
    let sqlite = Sqlite::open(dir.path());
    let engines: [Option<&dyn Engine>; COLS] = [
        Some(&fieldlog),
        Some(&raw),
        Some(&raw_log),
        Some(&sqlite),
        None,
    ];
    let mut rng = workload::rng(7);
    let batch = s.batch as usize;

    let load = rounds(
        &engines,
        n,
        &format!("load {n} objects"),
        |r| Box::new(workload::rows(part(n, r), &mut rng)),
        |_, e, rows| {
            let rows = rows.downcast_ref::<Vec<workload::Row>>().expect("rows");
            let t = Instant::now();
            for c in rows.chunks(batch) {
                e.load(c);
            }
            t.elapsed()
        },
    );
    let mut batched = Vec::new();
    for dist in [Dist::Uniform, Dist::Zipfian] {
        let keys = Keys::new(n, dist);
        batched.push(rounds(
            &engines,
            s.updates,
            &format!("{} batched updates, {dist:?}", s.updates),
            |r| Box::new(updates(&keys, part(s.updates, r).len() as u32, &mut rng)),
            |_, e, ups| {
                let ups = ups.downcast_ref::<Vec<Upd>>().expect("updates");
                update_all(e, ups, s.batch)
            },
        ));
    }
    step("disk sizes");
    let mut disk = [None; COLS];
    let mut disk_allocated = [None; COLS];
    for ((d, a), e) in disk.iter_mut().zip(&mut disk_allocated).zip(&engines) {
        *d = e.map(|e| e.disk_bytes() as f64 / MIB);
        *a = e.and_then(|e| e.disk_allocated()).map(|b| b as f64 / MIB);
    }
    let keys = Keys::new(n, Dist::Uniform);
    let single = rounds(
        &engines,
        s.durable,
        &format!("{} durable single updates", s.durable),
        |r| Box::new(updates(&keys, part(s.durable, r).len() as u32, &mut rng)),
        |_, e, ups| update_all(e, ups.downcast_ref::<Vec<Upd>>().expect("updates"), 1),
    );
    let mut one_at_a_time = Duration::ZERO;
    let conc = rounds(
        &engines,
        s.threads * s.per_thread,
        &format!("{} threads x {} durable updates", s.threads, s.per_thread),
        |r| {
            let each = part(s.per_thread, r).len() as u32;
            let work: Vec<Vec<Upd>> = (0..s.threads)
                .map(|_| updates(&keys, each, &mut rng))
                .collect();
            Box::new(work)
        },
        |i, e, w| {
            let w = w.downcast_ref::<Vec<Vec<Upd>>>().expect("work");
            if i == 0 {
                // The baseline the target names: the same writers, one commit (and its
                // fsync) at a time.
                one_at_a_time += concurrent_one_at_a_time(e, w);
            }
            concurrent(e, w)
        },
    );
    let one_at_a_time = rate(s.threads * s.per_thread, one_at_a_time);
    let reads = rounds(
        &engines,
        s.reads,
        &format!("{} random reads", s.reads),
        |r| {
            let objs: Vec<u32> = part(s.reads, r).map(|_| rng.random_range(0..n)).collect();
            Box::new(objs)
        },
        |i, e, objs| {
            let objs = objs.downcast_ref::<Vec<u32>>().expect("objects");
            let t = Instant::now();
            let mut bytes = 0;
            for &o in objs {
                bytes += e.read(o);
            }
            let d = t.elapsed();
            assert_eq!(bytes, objs.len() * 1000, "{i}: short reads");
            d
        },
    );

    // merge: fieldlog imports another replica's writes (as sync uploads them, ~1 MiB
    // changesets of 10 transactions); raw redb and SQLite write the same values blind, 10,000
    // per transaction; automerge applies the other document's changes.
    step(&format!(
        "merge setup: {} writes on the other replicas",
        s.updates
    ));
    let pair = FieldlogPair::new(dir.path(), n, s.batch, &mut workload::rng(9));
    let merge_ups = updates(&keys, s.updates, &mut workload::rng(8));
    pair.write(&merge_ups, s.batch);
    let mut sets = pair.produce_changesets(10);
    let sets_per_round = sets.len().div_ceil(ROUNDS as usize);
    let mut applied = 0;
    let merge = rounds(
        &engines,
        s.updates,
        &format!("merge {} remote field writes", s.updates),
        |r| Box::new(r),
        |i, e, r| {
            let r = *r.downcast_ref::<u32>().expect("round") as usize;
            match i {
                0 => {
                    let mine: Vec<_> = sets.drain(..sets_per_round.min(sets.len())).collect();
                    let t = Instant::now();
                    for cs in &mine {
                        applied += pair.b.import(cs).expect("import").applied;
                    }
                    t.elapsed()
                }
                _ => {
                    let ups = &merge_ups[part(s.updates, r as u32).start as usize
                        ..part(s.updates, r as u32).end as usize];
                    update_all(e, ups, 10 * s.batch)
                }
            }
        },
    );
    eprintln!("  fieldlog: {applied} of {} remote writes won", s.updates);
    drop(pair);
    // automerge's column, from its own process.
    let (mut load, mut merge) = (load, merge);
    [load[4], batched[0][4], batched[1][4], merge[4]] = am;

    let rate_line = |w: &str, unit, v, target: &str| Line {
        workload: w.into(),
        unit,
        v,
        target: target.into(),
    };
    lines.push(rate_line(
        &format!("load {n} objects, 1,000/txn"),
        "objects/s",
        load,
        "",
    ));
    lines.push(rate_line(
        &format!("update {} fields, 1,000/txn, uniform", s.updates),
        "writes/s",
        batched[0],
        "≥ 1.0 × SQLite, ≥ 1.0 × raw redb 1",
    ));
    lines.push(rate_line(
        &format!("update {} fields, 1,000/txn, zipfian", s.updates),
        "writes/s",
        batched[1],
        "≥ 1.0 × SQLite, ≥ 1.0 × raw redb 1",
    ));
    lines.push(rate_line(
        &format!("update {}, one durable commit each", s.durable),
        "writes/s",
        single,
        "≥ 1.0 × SQLite",
    ));
    lines.push(rate_line(
        &format!("{} writers × {} durable updates", s.threads, s.per_thread),
        "writes/s",
        conc,
        &format!(
            "≥ 5 × without group commit (now {:.2} ×: {} writes/s one commit at a time)",
            conc[0].unwrap_or(f64::NAN) / one_at_a_time,
            fmt(Some(one_at_a_time), "writes/s")
        ),
    ));
    lines.push(rate_line(
        &format!("merge {} remote field writes", s.updates),
        "writes/s",
        merge,
        "≥ 5 × automerge, ≥ 2 × SQLite (blind)",
    ));
    lines.push(rate_line(
        &format!("read {} random objects", s.reads),
        "objects/s",
        reads,
        "≥ 1.0 × SQLite",
    ));

    // What `Store::compact` (rebuild in key order, then redb's compaction) makes of
    // fieldlog's pruned file.
    drop((raw, raw_log, sqlite, am));
    let path = fieldlog.path.clone();
    drop(fieldlog);
    let mut store = fieldlog::Store::open_with(&path, workload::options()).expect("reopen");
    store.compact().expect("compact");
    drop(store);
    let compacted = std::fs::metadata(&path).map_or(0, |m| m.len()) as f64 / MIB;
    lines.push(Line {
        workload: "disk after load + batched updates (fieldlog: log pruned)".into(),
        unit: "MiB",
        v: disk,
        target: format!(
            "≤ 1.25 × SQLite (fieldlog after Store::compact, at the end: {compacted:.1} MiB)"
        ),
    });
    lines.push(Line {
        workload: "the same, blocks the files take (du: holes not counted)".into(),
        unit: "MiB",
        v: disk_allocated,
        target: String::new(),
    });

    // A syncing client's file: the same load and batched updates in a store that keeps no
    // acknowledged entry, each batch acknowledged as it commits.
    step("the same load and updates, each batch acknowledged (keep_acknowledged_for: 0)");
    let (acked_rate, acked_disk, acked_blocks) = {
        let d = tempfile::tempdir_in(dir.path()).expect("tempdir");
        let e = Fieldlog::open_with(
            d.path(),
            workload::options().keep_acknowledged_for(Some(Duration::ZERO)),
        );
        let mut rng = workload::rng(11);
        for r in 0..ROUNDS {
            for c in workload::rows(part(n, r), &mut rng).chunks(batch) {
                e.load(c);
                e.acknowledge();
            }
        }
        let mut took = Duration::ZERO;
        for dist in [Dist::Uniform, Dist::Zipfian] {
            let ups = updates(&Keys::new(n, dist), s.updates, &mut rng);
            let t = Instant::now();
            for c in ups.chunks(s.batch as usize) {
                e.update_batch(c);
                e.acknowledge();
            }
            took += t.elapsed();
        }
        let len = e.disk_bytes() as f64 / MIB;
        let blocks = e.disk_allocated().map(|b| b as f64 / MIB);
        (rate(2 * s.updates, took), len, blocks)
    };
    lines.push(Line {
        workload: format!(
            "{} batched updates (uniform, zipfian), each batch acknowledged: a syncing client",
            2 * s.updates
        ),
        unit: "updates/s",
        v: [Some(acked_rate), None, None, None, None],
        target: String::new(),
    });
    lines.push(Line {
        workload: "disk after the same, acknowledged as it goes: file (blocks it takes)".into(),
        unit: "MiB",
        v: [Some(acked_disk), None, None, disk[3], None],
        target: format!(
            "≤ 1.25 × SQLite; blocks: {}",
            acked_blocks.map_or("—".into(), |b| format!(
                "{b:.1} MiB ({:.2} × SQLite)",
                disk[3].map_or(0.0, |q| b / q)
            ))
        ),
    });

    step(&format!(
        "sync: {} field changes end to end over loopback TCP",
        s.sync
    ));
    let sync_rate = {
        let mut rig = SyncRig::new(dir.path(), n, s.batch);
        let d = rig.round(s.sync);
        assert!(rig.converged(), "sync diverged");
        rate(s.sync, d)
    };
    lines.push(Line {
        workload: format!("sync {} changes, client → server → client (TCP)", s.sync),
        unit: "changes/s",
        v: [Some(sync_rate), None, None, None, None],
        target: "".into(),
    });
    for &u in &s.recovery {
        step(&format!("recovery: {u} unsynced writes, {n} objects"));
        let d = tempfile::tempdir().expect("tempdir");
        let (report, whole) = recovery(d.path(), n, u);
        lines.push(Line {
            workload: format!(
                "client reset, {u} unsynced writes, {n} objects (replay {:.3} s)",
                report.replay_time.as_secs_f64()
            ),
            unit: "s",
            v: [Some(whole.as_secs_f64()), None, None, None, None],
            target: if u >= 100_000 {
                // The recovery of the unsynced writes is the replay (and the swap that makes
                // it visible); the whole reset also downloads every object and uploads.
                format!(
                    "replay < 1 s: {}",
                    if report.replay_time.as_secs_f64() < 1.0 {
                        "met"
                    } else {
                        "not met"
                    }
                )
            } else {
                String::new()
            },
        });
    }
    step("peak RSS on the update workload (child processes)");
    lines.push(Line {
        workload: format!("peak RSS, {} batched updates", s.updates),
        unit: "MiB",
        v: [rss_of("fieldlog"), None, None, rss_of("sqlite"), None],
        target: "< 200 MiB".into(),
    });
    step("done");

    let names = [
        "fieldlog",
        "raw redb (1 insert/write)",
        "raw redb (state+log)",
        "SQLite",
        "automerge",
    ];
    println!(
        "\nYCSB-shaped: {n} objects × 10 fields × 100 B, keys user0..user{}; durable commits \
         (fsync) unless said; automerge in memory, in a process of its own. Each workload in \
         {ROUNDS} rounds, the other engines taking turns. {} cores.\n",
        n - 1,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    print!("| workload | unit |");
    for name in names {
        print!(" {name} |");
    }
    for name in &names[1..] {
        print!(" fieldlog ÷ {name} |");
    }
    println!(" target |");
    println!("|{}", "---|".repeat(2 + COLS + COLS - 1 + 1));
    for l in &lines {
        print!("| {} | {} |", l.workload, l.unit);
        for v in l.v {
            print!(" {} |", fmt(v, l.unit));
        }
        for v in &l.v[1..] {
            match (l.v[0], v) {
                (Some(a), Some(b)) if *b > 0.0 => print!(" {:.2} |", a / b),
                _ => print!(" — |"),
            }
        }
        println!(" {} |", l.target);
    }
}
