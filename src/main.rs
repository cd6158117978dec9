//! The `fieldlog` command.

use std::time::Instant;

use clap::{Parser, Subcommand};
use fieldlog::{Store, Value};
use rand::{Rng, SeedableRng};

#[derive(Parser)]
#[command(
    name = "fieldlog",
    version,
    about = "Field-level embedded store with sync"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Two replicas write offline, edit the same objects, then merge and converge.
    Demo {
        /// Objects each replica creates.
        #[arg(long, default_value_t = 2_000)]
        objects: u32,
        /// Random single-field updates each replica makes while offline.
        #[arg(long, default_value_t = 20_000)]
        updates: u32,
        /// Seed for the random writes.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo {
            objects,
            updates,
            seed,
        } => demo(objects, updates, seed),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn demo(objects: u32, updates: u32, seed: u64) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let a = Store::open(dir.path().join("a.redb"))?;
    let b = Store::open(dir.path().join("b.redb"))?;
    println!(
        "replicas {} and {} in {}",
        a.replica_id(),
        b.replica_id(),
        dir.path().display()
    );

    // Shared starting point: A creates the objects, B receives them.
    let t = Instant::now();
    a.write(|tx| {
        for i in 0..objects {
            tx.insert(
                "Item",
                i64::from(i),
                (0..10).map(|f| (format!("field{f}"), Value::from(format!("initial-{i}-{f}")))),
            )?;
        }
        Ok(())
    })?;
    let shared = a.export(0, usize::MAX)?;
    let bytes = shared.encode()?;
    b.import_bytes(&bytes)?;
    println!(
        "A inserted {objects} objects x 10 fields; B imported them ({} KiB changeset) in {:.2?}",
        bytes.len() / 1024,
        t.elapsed()
    );
    let (a_pos, b_pos) = (a.log_head(), b.log_head());

    // Both go offline and update random fields of the same objects, 100 per transaction.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t = Instant::now();
    for (name, store) in [("A", &a), ("B", &b)] {
        let mut left = updates;
        while left > 0 {
            let n = left.min(100);
            left -= n;
            store.write(|tx| {
                for _ in 0..n {
                    let pk = i64::from(rng.random_range(0..objects));
                    let field = format!("field{}", rng.random_range(0..10));
                    tx.set(
                        "Item",
                        pk,
                        &field,
                        format!("{name}-{}", rng.random::<u32>()),
                    )?;
                }
                Ok(())
            })?;
        }
        // And each deletes a few objects the other may still be editing.
        store.write(|tx| {
            for _ in 0..5 {
                let pk = i64::from(rng.random_range(0..objects));
                if tx.get("Item", pk)?.is_some() {
                    tx.delete("Item", pk)?;
                }
            }
            Ok(())
        })?;
    }
    let elapsed = t.elapsed();
    println!(
        "offline: {} field writes on each replica in {:.2?} ({:.0} writes/s, durable)",
        updates,
        elapsed,
        f64::from(updates * 2) / elapsed.as_secs_f64()
    );
    println!("digests before merge: A {} / B {}", a.digest(), b.digest());

    // Back online: exchange the changes made since the shared point.
    let t = Instant::now();
    let from_a = a.export(a_pos, usize::MAX)?.encode()?;
    let from_b = b.export(b_pos, usize::MAX)?.encode()?;
    let into_b = b.import_bytes(&from_a)?;
    let into_a = a.import_bytes(&from_b)?;
    println!(
        "merged in {:.2?}: A applied {} of B's writes ({} stale), B applied {} of A's ({} stale)",
        t.elapsed(),
        into_a.applied,
        into_a.stale,
        into_b.applied,
        into_b.stale
    );
    println!(
        "live objects: A {} / B {}",
        a.count("Item")?,
        b.count("Item")?
    );
    let (da, db) = (a.digest(), b.digest());
    println!("digests after merge: A {da} / B {db}");
    if da != db || a.scan("Item")? != b.scan("Item")? {
        return Err("replicas did not converge".into());
    }
    println!("converged: both replicas hold the same state");
    Ok(())
}
