//! Measures the server's upload path: field writes applied per second with no rules, with
//! rules enforced, and with a custom conflict handler deciding every conflict; and the cost
//! of a collaborative text edit as its history grows. Sans-IO (no sockets), release build:
//! `cargo run --release --example upload_cost`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldlog::conflict::{Policies, Policy, Resolution};
use fieldlog::rules::Rules;
use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::pair::SessionPair;
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{Durability, Store, Value};

type Error = Box<dyn std::error::Error>;

const RULES: &str = r#"{ "rules": { "Item": [ {
    "name": "own", "apply_when": {},
    "document_filters": { "read": { "ownerId": "%%user.id" }, "write": { "ownerId": "%%user.id" } },
    "read": true, "write": true, "insert": true, "delete": true } ] } }"#;

/// Seconds the server spends applying `writes` single-field updates from one client.
fn run(
    config: ServerConfig,
    token: &str,
    writes: u64,
    conflicting: bool,
) -> Result<Duration, Error> {
    let dir = tempfile::tempdir()?;
    let server_store = Arc::new(Store::open(dir.path().join("server.redb"))?);
    let sync = Arc::new(SyncServer::open(Arc::clone(&server_store), config)?);
    let objects = 1_000i64;
    sync.write(|tx| {
        for i in 0..objects {
            tx.insert(
                "Item",
                i,
                [("ownerId", Value::from("u")), ("n", Value::from(0))],
            )?;
        }
        Ok(())
    })?;
    let store = Arc::new(Store::open(dir.path().join("client.redb"))?);
    let mut pair = SessionPair::connect(&sync, &store, ClientConfig::new(token), 0)?;
    if conflicting {
        // The server changes every object after the client saw it: each upload conflicts.
        sync.write(|tx| {
            for i in 0..objects {
                tx.set("Item", i, "n", -1)?;
            }
            Ok(())
        })?;
    }
    let mut done = 0;
    while done < writes {
        let mut tx = store.begin()?;
        tx.set_durability(Durability::Deferred);
        for k in 0..100 {
            tx.set(
                "Item",
                ((done + k) as i64) % objects,
                "n",
                (done + k) as i64,
            )?;
        }
        tx.commit()?;
        done += 100;
    }
    let started = Instant::now();
    pair.pump()?;
    let elapsed = started.elapsed();
    if store.last_sync() != store.log_head() {
        return Err("upload did not finish".into());
    }
    Ok(elapsed)
}

fn main() -> Result<(), Error> {
    let writes = std::env::var("UPLOAD_COST_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000u64);
    let secret = Secret::generate();
    let claims = Claims {
        user_id: "u".into(),
        expires_at_ms: u64::MAX,
        extra: Default::default(),
    };
    let token = token::issue(&secret, &claims)?;
    let plain = ServerConfig::new(secret.clone());
    let mut ruled = ServerConfig::new(secret.clone());
    ruled.rules = Some(Arc::new(Rules::load(RULES)?));
    let mut handled = ServerConfig::new(secret.clone());
    handled.conflicts = Policies::new(Policy::Custom(Arc::new(|c| {
        match (&c.client.value, &c.server.value) {
            (Some(Value::Int(a)), Some(Value::Int(b))) => {
                Resolution::Merged(Value::Int(a.max(b) + 1))
            }
            _ => Resolution::KeepServer,
        }
    })));
    println!("| upload path ({writes} single-field updates, 100 per transaction) | field writes/s | vs plain |");
    println!("|---|---|---|");
    let base = run(plain.clone(), &token, writes, false)?;
    let rate = |d: Duration| writes as f64 / d.as_secs_f64();
    println!("| no rules, no conflicts | {:.0} | 1.00 |", rate(base));
    for (name, config, conflicting) in [
        (
            "rules enforced (role with read/write filters)",
            ruled,
            false,
        ),
        ("every write a conflict, last writer wins", plain, true),
        (
            "every write a conflict, custom handler merging",
            handled,
            true,
        ),
    ] {
        let d = run(config, &token, writes, conflicting)?;
        println!(
            "| {name} | {:.0} | {:.2} |",
            rate(d),
            base.as_secs_f64() / d.as_secs_f64()
        );
    }

    // Text: the cost of one edit, and of reading, as one replica's edit history grows.
    let store = Store::open_in_memory()?;
    store.write(|tx| tx.insert("Doc", 1, [("title", Value::from("t"))]))?;
    println!("\n| text history (edits) | one edit | one read |");
    println!("|---|---|---|");
    let mut edits = 0;
    for target in [10, 100, 1_000] {
        while edits < target {
            store.write(|tx| tx.edit_text("Doc", 1, "body", 0, 0, "word "))?;
            edits += 1;
        }
        let t = Instant::now();
        store.write(|tx| tx.edit_text("Doc", 1, "body", 0, 0, "x"))?;
        let edit = t.elapsed();
        edits += 1;
        let t = Instant::now();
        let _ = store.get("Doc", 1)?;
        println!("| {target} | {edit:.2?} | {:.2?} |", t.elapsed());
    }
    Ok(())
}
