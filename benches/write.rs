//! The YCSB-shaped workload of issue 7 under criterion: every group holds fieldlog and its
//! baselines (raw redb one insert per field write, raw redb state + log row, SQLite through
//! rusqlite with WAL and synchronous=FULL, automerge for load/update/merge), so ratios come
//! from one run. Engines and workload: `benches/workload/mod.rs`.
//!
//! `cargo bench` preloads 2,000 objects per engine; `FIELDLOG_BENCH_FULL=1 cargo bench`
//! preloads the 100,000. `cargo bench -- --test` (CI) runs each bench once.
//! The whole workload at full size, as one table: `cargo run --release --example bench`.

mod workload;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use rand::RngExt;

use workload::{
    concurrent, load_all, recovery, rows, updates, Am, Dist, Engine, Fieldlog, FieldlogPair, Keys,
    RawRedb, Sizes, Sqlite, SyncRig, Upd,
};

/// Objects per load iteration and writes per batched transaction.
const BATCH: u32 = 1_000;
/// Durable single-field updates per thread per iteration of the concurrent group.
const PER_THREAD: u32 = 16;
const THREADS: usize = 8;
/// Whole-object reads per iteration.
const READS: u32 = 1_000;

fn sizes() -> Sizes {
    if std::env::var_os("FIELDLOG_BENCH_FULL").is_some() {
        Sizes::full()
    } else {
        Sizes::bench()
    }
}

fn configure(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sampling_mode(SamplingMode::Flat);
}

fn all(c: &mut Criterion) {
    let sizes = sizes();
    let n = sizes.objects;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = workload::rng(7);

    let fieldlog = Fieldlog::open(dir.path());
    let raw = RawRedb::open(dir.path(), false);
    let raw_log = RawRedb::open(dir.path(), true);
    let sqlite = Sqlite::open(dir.path());
    let am = Am::new();
    let engines: [&dyn Engine; 5] = [&fieldlog, &raw, &raw_log, &sqlite, &am];
    for e in engines {
        load_all(e, n, BATCH, &mut rng);
    }
    let durable: [&dyn Engine; 4] = [&fieldlog, &raw, &raw_log, &sqlite];

    // load: 1,000 new objects per durable transaction.
    {
        let mut g = c.benchmark_group("load");
        configure(&mut g);
        g.throughput(Throughput::Elements(u64::from(BATCH)));
        for e in engines {
            let mut next = n;
            let mut rng = workload::rng(1);
            g.bench_function(e.id(), |b| {
                b.iter_batched(
                    || {
                        let r = rows(next..next + BATCH, &mut rng);
                        next += BATCH;
                        r
                    },
                    |r| e.load(&r),
                    BatchSize::PerIteration,
                )
            });
        }
        g.finish();
    }

    // update: 1,000 single-field updates per durable transaction.
    for (group, dist) in [
        ("update_batch_uniform", Dist::Uniform),
        ("update_batch_zipfian", Dist::Zipfian),
    ] {
        let keys = Keys::new(n, dist);
        let mut g = c.benchmark_group(group);
        configure(&mut g);
        g.throughput(Throughput::Elements(u64::from(BATCH)));
        for e in engines {
            let mut rng = workload::rng(2);
            g.bench_function(e.id(), |b| {
                b.iter_batched(
                    || updates(&keys, BATCH, &mut rng),
                    |u| e.update_batch(&u),
                    BatchSize::PerIteration,
                )
            });
        }
        g.finish();
    }

    // One durable commit per single-field update.
    {
        let keys = Keys::new(n, Dist::Uniform);
        let mut g = c.benchmark_group("update_durable_single");
        configure(&mut g);
        g.throughput(Throughput::Elements(1));
        for e in durable {
            let mut rng = workload::rng(3);
            g.bench_function(e.id(), |b| {
                b.iter_batched(
                    || updates(&keys, 1, &mut rng),
                    |u| e.update_one(&u[0]),
                    BatchSize::SmallInput,
                )
            });
        }
        g.finish();
    }

    // 8 threads, each committing durable single-field updates.
    {
        let keys = Keys::new(n, Dist::Uniform);
        let mut g = c.benchmark_group("concurrent_8_writers_durable");
        configure(&mut g);
        g.throughput(Throughput::Elements(THREADS as u64 * u64::from(PER_THREAD)));
        for e in durable {
            let mut rng = workload::rng(4);
            g.bench_function(e.id(), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let work: Vec<Vec<Upd>> = (0..THREADS)
                            .map(|_| updates(&keys, PER_THREAD, &mut rng))
                            .collect();
                        total += concurrent(e, &work);
                    }
                    total
                })
            });
        }
        g.finish();
    }

    // merge: another replica's 1,000 field writes (one of its transactions) applied durably.
    {
        let keys = Keys::new(n, Dist::Uniform);
        let mut g = c.benchmark_group("merge");
        configure(&mut g);
        g.throughput(Throughput::Elements(u64::from(BATCH)));
        let pair = FieldlogPair::new(dir.path(), n, BATCH, &mut workload::rng(9));
        let mut rng = workload::rng(5);
        g.bench_function("fieldlog", |b| {
            b.iter_batched(
                || {
                    pair.write(&updates(&keys, BATCH, &mut rng), BATCH);
                    pair.produce_changesets(1).pop().expect("a changeset")
                },
                |cs| black_box(pair.b.import(&cs).expect("import")),
                BatchSize::PerIteration,
            )
        });
        // Blind: the same values written without any stamp comparison.
        for e in [&raw as &dyn Engine, &raw_log, &sqlite] {
            let mut rng = workload::rng(5);
            g.bench_function(format!("{}_blind", e.id()), |b| {
                b.iter_batched(
                    || updates(&keys, BATCH, &mut rng),
                    |u| e.update_batch(&u),
                    BatchSize::PerIteration,
                )
            });
        }
        let am_b = am.fork();
        let mut rng = workload::rng(5);
        g.bench_function("automerge", |b| {
            b.iter_batched(
                || {
                    am.update_batch(&updates(&keys, BATCH, &mut rng));
                    am.changes_for(&am_b)
                },
                |changes| am_b.apply(changes),
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }

    // read: random whole objects.
    {
        let mut g = c.benchmark_group("read");
        configure(&mut g);
        g.throughput(Throughput::Elements(u64::from(READS)));
        for e in [&fieldlog as &dyn Engine, &raw, &sqlite] {
            let mut rng = workload::rng(6);
            g.bench_function(e.id(), |b| {
                b.iter_batched(
                    || {
                        (0..READS)
                            .map(|_| rng.random_range(0..n))
                            .collect::<Vec<_>>()
                    },
                    |objs| {
                        for o in objs {
                            black_box(e.read(o));
                        }
                    },
                    BatchSize::PerIteration,
                )
            });
        }
        g.finish();
    }
    drop((fieldlog, raw, raw_log, sqlite, am));

    // sync: client a commits 1,000 field changes, client b has them (loopback TCP).
    {
        let mut g = c.benchmark_group("sync_end_to_end");
        configure(&mut g);
        g.throughput(Throughput::Elements(u64::from(BATCH)));
        let mut rig = SyncRig::new(dir.path(), n, BATCH);
        g.bench_function("fieldlog_tcp_loopback", |b| {
            b.iter_custom(|iters| (0..iters).map(|_| rig.round(BATCH)).sum())
        });
        assert!(rig.converged(), "sync rig diverged");
        g.finish();
    }

    // recovery: a client reset replaying unsynced field writes (whole reset timed).
    {
        let unsynced = sizes.recovery[0];
        let mut g = c.benchmark_group("reset_recovery");
        configure(&mut g);
        g.throughput(Throughput::Elements(u64::from(unsynced)));
        g.bench_function(format!("fieldlog_{unsynced}_unsynced"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| {
                        let d = tempfile::tempdir().expect("tempdir");
                        recovery(d.path(), n, unsynced).1
                    })
                    .sum()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, all);
criterion_main!(benches);
