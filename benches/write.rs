//! Batched field writes: fieldlog next to raw redb doing one insert per field write, in one
//! run so the ratio is meaningful. YCSB-shaped: 10 fields of 100 bytes, single-field updates,
//! 1,000 per durable transaction.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fieldlog::{Store, Value};
use rand::{Rng, SeedableRng};
use redb::{Database, TableDefinition};

const OBJECTS: u32 = 10_000;
const BATCH: u32 = 1_000;
const RAW: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");

fn value(rng: &mut impl Rng) -> String {
    (0..100)
        .map(|_| rng.random_range(b'a'..=b'z') as char)
        .collect()
}

fn batched_updates(c: &mut Criterion) {
    let mut g = c.benchmark_group("update_batch_1000");
    g.throughput(Throughput::Elements(u64::from(BATCH)));
    g.sample_size(20);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);

    let store = Store::open(dir.path().join("fieldlog.redb")).expect("open");
    for chunk in 0..OBJECTS / BATCH {
        store
            .write(|tx| {
                for i in chunk * BATCH..(chunk + 1) * BATCH {
                    let fields: Vec<(String, Value)> = (0..10)
                        .map(|f| (format!("field{f}"), Value::from(value(&mut rng))))
                        .collect();
                    tx.insert("usertable", format!("user{i}"), fields)?;
                }
                Ok(())
            })
            .expect("load");
    }
    g.bench_function("fieldlog", |b| {
        b.iter(|| {
            store
                .write(|tx| {
                    for _ in 0..BATCH {
                        let pk = format!("user{}", rng.random_range(0..OBJECTS));
                        let field = format!("field{}", rng.random_range(0..10));
                        tx.set("usertable", pk, &field, value(&mut rng))?;
                    }
                    Ok(())
                })
                .expect("write")
        })
    });

    let db = Database::create(dir.path().join("raw.redb")).expect("open raw");
    {
        let txn = db.begin_write().expect("txn");
        {
            let mut t = txn.open_table(RAW).expect("table");
            for i in 0..OBJECTS {
                for f in 0..10 {
                    t.insert(
                        format!("user{i}/field{f}").as_str(),
                        value(&mut rng).as_bytes(),
                    )
                    .expect("insert");
                }
            }
        }
        txn.commit().expect("commit");
    }
    g.bench_function("raw_redb_insert_per_write", |b| {
        b.iter(|| {
            let txn = db.begin_write().expect("txn");
            {
                let mut t = txn.open_table(RAW).expect("table");
                for _ in 0..BATCH {
                    let key = format!(
                        "user{}/field{}",
                        rng.random_range(0..OBJECTS),
                        rng.random_range(0..10)
                    );
                    t.insert(key.as_str(), value(&mut rng).as_bytes())
                        .expect("insert");
                }
            }
            txn.commit().expect("commit");
            black_box(())
        })
    });
    g.finish();
}

criterion_group!(benches, batched_updates);
criterion_main!(benches);
