//! Times client reset recovery: a server and a client driven in-process through the sans-IO
//! sessions (no sockets), a forced reset, and the replay of the client's unsynced writes.
//!
//! `cargo run --release --example reset_timing` prints: recovery of 10,000 and 100,000
//! unsynced field writes; 100 unsynced writes in stores of 10,000 and 1,000,000 objects.
//! `RESET_TIMING_SMALL=1` runs a quick version.

use std::sync::Arc;
use std::time::Instant;

use fieldlog::reset::ResetReport;
use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::pair::SessionPair;
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{Durability, Store, Value};

type Error = Box<dyn std::error::Error>;

fn load(store: &Store, objects: u64) -> Result<(), Error> {
    for chunk in (0..objects).collect::<Vec<_>>().chunks(10_000) {
        let mut tx = store.begin()?;
        tx.set_durability(Durability::Deferred);
        for &i in chunk {
            tx.insert(
                "Item",
                i as i64,
                [("n", Value::from(0)), ("label", Value::from("x"))],
            )?;
        }
        tx.commit()?;
    }
    Ok(())
}

/// Returns (report, whole reset time).
fn run(objects: u64, unsynced: u64) -> Result<(ResetReport, std::time::Duration), Error> {
    let dir = tempfile::tempdir()?;
    let secret = Secret::generate();
    let claims = Claims {
        user_id: "u".into(),
        expires_at_ms: u64::MAX,
        extra: Default::default(),
    };
    let token = token::issue(&secret, &claims)?;
    let server_store = Arc::new(Store::open(dir.path().join("server.redb"))?);
    let sync = Arc::new(SyncServer::open(
        Arc::clone(&server_store),
        ServerConfig::new(secret),
    )?);
    let client_store = Arc::new(Store::open(dir.path().join("client.redb"))?);
    load(&client_store, objects)?;
    SessionPair::connect(&sync, &client_store, ClientConfig::new(token.clone()), 0)?;

    // Offline: unsynced single-field updates, 1,000 per transaction.
    let mut done = 0;
    while done < unsynced {
        let n = (unsynced - done).min(1_000);
        let mut tx = client_store.begin()?;
        tx.set_durability(Durability::Deferred);
        for k in 0..n {
            let pk = ((done + k) * 7_919 % objects) as i64;
            tx.set("Item", pk, "n", (done + k) as i64)?;
        }
        tx.commit()?;
        done += n;
    }
    sync.force_reset(client_store.replica_id())?;
    let started = Instant::now();
    let mut pair = SessionPair::connect(&sync, &client_store, ClientConfig::new(token), 0)?;
    let elapsed = started.elapsed();
    let report = pair
        .client
        .take_reset_reports()
        .pop()
        .ok_or("no reset happened")?;
    if client_store.digest() != server_store.digest() {
        return Err("client and server differ after the reset".into());
    }
    Ok((report, elapsed))
}

fn main() -> Result<(), Error> {
    let small = std::env::var_os("RESET_TIMING_SMALL").is_some();
    let scale = |n: u64| if small { n / 100 } else { n };
    println!(
        "| case | recovered | replay + swap | whole reset (download, stage, replay, upload) |"
    );
    println!("|---|---|---|---|");
    for (objects, unsynced) in [
        (scale(100_000), scale(10_000)),
        (scale(100_000), scale(100_000)),
        (scale(10_000), 100),
        (scale(1_000_000), 100),
    ] {
        let (report, whole) = run(objects, unsynced)?;
        println!(
            "| {unsynced} unsynced writes, {objects} objects | {} | {:.1?} | {:.2?} |",
            report.recovered.len(),
            report.replay_time,
            whole
        );
    }
    Ok(())
}
