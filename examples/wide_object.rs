//! The cost of one object with many fields as the number of fields N grows: a local commit
//! inserting it, its upload, a server-side update of every field, a local update of every
//! field, their exchange (every field a conflict on the server), and one single-field
//! update's round trip. Sans-IO (no sockets), files in a temporary directory, release build:
//! `cargo run --release --example wide_object`. `WIDE_OBJECT_FIELDS=10000,20000` picks the
//! sizes (default 10k to 160k, doubling); `WIDE_OBJECT_EXCHANGE=0` skips the local update
//! and the exchange (the last step then also downloads the server's update). A cost linear in N doubles from one row to the
//! next; a quadratic one quadruples.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::pair::SessionPair;
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{Options, Store, Value};

type Error = Box<dyn std::error::Error>;

/// Options that let an object hold every field the run writes.
fn options(fields: usize) -> Options {
    Options::default().fields_per_object_max(fields.max(fieldlog::FIELDS_PER_OBJECT_MAX_DEFAULT))
}

fn timed<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<Duration, Error> {
    let started = Instant::now();
    f()?;
    Ok(started.elapsed())
}

/// One row of the table: the times of each step for an object of `n` fields.
fn run(n: usize, exchange: bool, secret: &Secret, token: &str) -> Result<Vec<Duration>, Error> {
    let dir = tempfile::tempdir()?;
    let server_store = Arc::new(Store::open_with(
        dir.path().join("server.redb"),
        options(n),
    )?);
    let sync = Arc::new(SyncServer::open(
        Arc::clone(&server_store),
        ServerConfig::new(secret.clone()),
    )?);
    let store = Arc::new(Store::open_with(
        dir.path().join("client.redb"),
        options(n),
    )?);
    let mut pair = SessionPair::connect(&sync, &store, ClientConfig::new(token), 0)?;
    // Names in creation order are not in name order ("f10" sorts before "f2").
    let names: Vec<String> = (0..n).map(|i| format!("f{i}")).collect();
    let fields = |v: i64| names.iter().map(move |f| (f.clone(), Value::Int(v)));
    let mut times = Vec::new();
    times.push(timed(|| {
        store.write(|tx| tx.insert("Wide", 1, fields(0)))?;
        Ok(())
    })?);
    times.push(timed(|| Ok(pair.pump()?))?);
    times.push(timed(|| {
        sync.write(|tx| tx.update("Wide", 1, fields(1)))?;
        Ok(())
    })?);
    if exchange {
        times.push(timed(|| {
            store.write(|tx| tx.update("Wide", 1, fields(2)))?;
            Ok(())
        })?);
        times.push(timed(|| Ok(pair.pump()?))?);
    }
    times.push(timed(|| {
        store.write(|tx| tx.set("Wide", 1, "f0", 3))?;
        Ok(pair.pump()?)
    })?);
    if store.last_sync() != store.log_head() {
        return Err("upload did not finish".into());
    }
    let expected = server_store.get("Wide", 1)?.map(|o| o.fields.len());
    if expected != Some(n) || store.digest() != server_store.digest() {
        return Err("client and server differ".into());
    }
    Ok(times)
}

fn main() -> Result<(), Error> {
    let sizes: Vec<usize> = std::env::var("WIDE_OBJECT_FIELDS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 20_000, 40_000, 80_000, 160_000]);
    // The exchange holds every conflict; where that is quadratic, large sizes need it off.
    let exchange = std::env::var("WIDE_OBJECT_EXCHANGE").map_or(true, |v| v != "0");
    let secret = Secret::generate();
    let claims = Claims {
        user_id: "u".into(),
        expires_at_ms: u64::MAX,
        extra: Default::default(),
    };
    let token = token::issue(&secret, &claims)?;
    println!(
        "| fields | local insert | its upload | server updates all | local updates all | \
         exchange (all conflict) | one-field round trip |"
    );
    println!("|---|---|---|---|---|---|---|");
    for n in sizes {
        let mut cells: Vec<String> = run(n, exchange, &secret, &token)?
            .iter()
            .map(|d| format!("{:.3} s", d.as_secs_f64()))
            .collect();
        if !exchange {
            cells.splice(3..3, ["skipped".to_owned(), "skipped".to_owned()]);
        }
        println!("| {n} | {} |", cells.join(" | "));
    }
    Ok(())
}
