//! Sync over loopback TCP: real server, real clients, convergence (invariant 1) and no
//! acknowledged write lost.

mod support;

use std::sync::Arc;
use std::time::Duration;

use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::net::{ClientHooks, ServerHandle, SyncClient, Transport};
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::Secret;
use fieldlog::{Options, Store, Value};
use rand::{RngExt, SeedableRng};
use support::token_for;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_clients_converge_to_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let secret = Secret::generate();
    let server_store = Arc::new(Store::open(dir.path().join("server.redb")).unwrap());
    let server = Arc::new(
        SyncServer::open(server_store.clone(), ServerConfig::new(secret.clone())).unwrap(),
    );
    let handle = ServerHandle::bind(server, "127.0.0.1:0").await.unwrap();
    let addr = handle.local_addr().unwrap().to_string();

    let mut clients = Vec::new();
    for i in 0..5 {
        let store = Arc::new(Store::open(dir.path().join(format!("c{i}.redb"))).unwrap());
        let client = SyncClient::start(
            store.clone(),
            Transport::Tcp(addr.clone()),
            ClientConfig::new(token_for(&secret, &format!("user{i}"))),
            ClientHooks::default(),
        );
        clients.push((store, client));
    }

    // Everyone creates its own objects, then edits random fields of everyone's.
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for (i, (store, _)) in clients.iter().enumerate() {
        store
            .write(|tx| {
                for k in 0..20 {
                    tx.insert(
                        "Item",
                        (i * 100 + k) as i64,
                        [("owner", Value::from(i as i64)), ("n", Value::from(0))],
                    )?;
                }
                Ok(())
            })
            .unwrap();
    }
    for (_, c) in &clients {
        c.wait_for_upload().await.expect("upload");
    }
    for (_, c) in &clients {
        c.wait_for_download().await.expect("download");
    }
    for round in 0..20 {
        for (store, _) in &clients {
            let owner = rng.random_range(0..5usize);
            let pk = (owner * 100 + rng.random_range(0..20usize)) as i64;
            let field = ["n", "color", "size"][rng.random_range(0..3)];
            store
                .write(|tx| tx.set("Item", pk, field, Value::from(round as i64)))
                .unwrap();
        }
        if round % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for (_, c) in &clients {
        tokio::time::timeout(Duration::from_secs(30), c.wait_for_upload())
            .await
            .expect("upload")
            .expect("upload");
    }
    for (_, c) in &clients {
        tokio::time::timeout(Duration::from_secs(30), c.wait_for_download())
            .await
            .expect("download")
            .expect("download");
    }
    let want = server_store.digest();
    assert_eq!(server_store.count("Item").unwrap(), 100);
    for (i, (store, _)) in clients.iter().enumerate() {
        assert_eq!(store.digest(), want, "client {i} diverged");
        assert_eq!(
            store.scan("Item").unwrap(),
            server_store.scan("Item").unwrap()
        );
    }
    for (_, c) in clients {
        c.stop().await;
    }
    handle.shutdown().await;
}

/// A client that keeps no acknowledged entry, over loopback TCP: its log holds only what
/// the server has not acknowledged, and the server and another client have every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_keeps_nothing_acknowledged_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = Secret::generate();
    let server_store = Arc::new(Store::open(dir.path().join("server.redb")).expect("open"));
    let server = Arc::new(
        SyncServer::open(server_store.clone(), ServerConfig::new(secret.clone())).expect("server"),
    );
    let handle = ServerHandle::bind(server, "127.0.0.1:0")
        .await
        .expect("bind");
    let addr = handle.local_addr().expect("addr").to_string();
    let start = |name: &str, keep: Option<Duration>| {
        let options = Options::default().keep_acknowledged_for(keep);
        let store = Arc::new(
            Store::open_with(dir.path().join(format!("{name}.redb")), options).expect("open"),
        );
        let client = SyncClient::start(
            store.clone(),
            Transport::Tcp(addr.clone()),
            ClientConfig::new(token_for(&secret, name)),
            ClientHooks::default(),
        );
        (store, client)
    };
    let (writer, writer_sync) = start("writer", Some(Duration::ZERO));
    let (reader, reader_sync) = start("reader", None);
    let within = Duration::from_secs(30);
    for round in 0..3i64 {
        for k in 0..50i64 {
            writer
                .write(|tx| {
                    let pk = round * 1000 + k;
                    tx.insert(
                        "Item",
                        pk,
                        [("n", Value::from(pk)), ("round", Value::from(round))],
                    )
                })
                .expect("write");
        }
        tokio::time::timeout(within, writer_sync.wait_for_upload())
            .await
            .expect("upload")
            .expect("upload");
        assert_eq!(writer.last_sync(), writer.log_head());
        assert!(
            writer.log_after(0, usize::MAX).expect("log").is_empty(),
            "round {round}: {} acknowledged entries kept",
            writer.log_after(0, usize::MAX).expect("log").len()
        );
    }
    tokio::time::timeout(within, reader_sync.wait_for_download())
        .await
        .expect("download")
        .expect("download");
    assert_eq!(writer.log_head(), 150);
    assert_eq!(server_store.count("Item").expect("count"), 150);
    assert_eq!(
        reader.scan("Item").expect("scan"),
        writer.scan("Item").expect("scan")
    );
    assert_eq!(reader.digest(), writer.digest());
    assert_eq!(server_store.digest(), writer.digest());
    writer_sync.stop().await;
    reader_sync.stop().await;
    handle.shutdown().await;
}
