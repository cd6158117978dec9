//! A device id belongs to the user who first syncs it, and a device's upload positions are
//! contiguous and never rewritten: against a live server over loopback TCP, with hostile
//! connections driven frame by frame beside real clients.

mod support;

use std::sync::Arc;

use fieldlog::rules::Rules;
use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::net::{ClientHooks, ServerHandle, SyncClient, Transport};
use fieldlog::sync::protocol::{ErrorCode, ServerMsg};
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::Secret;
use fieldlog::{Store, Value};
use support::{entry, hello, insert, token_for, upload, Raw, WAIT};
use tokio::time::timeout;

/// Each user reads and writes only the items it owns.
const OWN: &str = r#"{ "rules": { "Item": [ { "name": "readOwnWriteOwn",
  "apply_when": {},
  "document_filters": { "read": { "owner": "%%user.id" }, "write": { "owner": "%%user.id" } },
  "read": true, "write": true, "insert": true, "delete": true } ] } }"#;

struct World {
    server: Arc<SyncServer>,
    server_store: Arc<Store>,
    handle: ServerHandle,
    addr: String,
    secret: Secret,
    dir: tempfile::TempDir,
}

async fn world() -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = Secret::generate();
    let server_store = Arc::new(Store::open(dir.path().join("server.redb")).expect("open"));
    let mut config = ServerConfig::new(secret.clone());
    config.rules = Some(Arc::new(Rules::load(OWN).expect("rules")));
    let server = Arc::new(SyncServer::open(server_store.clone(), config).expect("server"));
    let handle = ServerHandle::bind(server.clone(), "127.0.0.1:0")
        .await
        .expect("bind");
    let addr = handle.local_addr().expect("addr").to_string();
    World {
        server,
        server_store,
        handle,
        addr,
        secret,
        dir,
    }
}

impl World {
    /// A real client of `user` on a store of its own, started.
    fn client(&self, user: &str) -> (Arc<Store>, SyncClient) {
        let path = self.dir.path().join(format!("{user}.redb"));
        let store = Arc::new(Store::open(path).expect("open"));
        let client = SyncClient::start(
            store.clone(),
            Transport::Tcp(self.addr.clone()),
            ClientConfig::new(token_for(&self.secret, user)),
            ClientHooks::default(),
        );
        (store, client)
    }

    fn owner(&self, pk: i64) -> Option<Value> {
        let object = self.server_store.get("Item", pk).expect("get");
        object.and_then(|o| o.get("owner").cloned())
    }
}

async fn synced(client: &SyncClient) {
    timeout(WAIT, client.wait_for_upload())
        .await
        .expect("uploads in time")
        .expect("the client runs");
}

fn item(owner: &str) -> [(&'static str, Value); 1] {
    [("owner", Value::from(owner))]
}

/// bob, with his own valid token, claims alice's device: refused with its own code before
/// anything is sent, even alice's pending refusal (a write she gave away, whose
/// acknowledgement she never read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_users_device_is_refused_before_any_state() {
    let w = world().await;
    let (alice, alice_client) = w.client("alice");
    alice
        .write(|tx| tx.insert("Item", 1, item("alice")))
        .expect("write");
    synced(&alice_client).await;
    alice_client.stop().await;
    let device = alice.replica_id();

    // alice (her token, her device) uploads a write the rules refuse and leaves without
    // reading: the server keeps the refusal for her next session.
    let alice_token = token_for(&w.secret, "alice");
    let (mut raw, uploaded) = Raw::handshake(&w.addr, &alice_token, device).await;
    let given_away = insert("Item", 2, vec![("owner", Value::from("carol"))]);
    raw.send(&upload(
        device,
        vec![entry(uploaded + 1, device, vec![given_away])],
    ))
    .await;
    loop {
        match raw.next_skipping_downloads().await {
            Some(ServerMsg::UploadAck { .. }) => break,
            Some(ServerMsg::CompensatingWrite { .. }) => {}
            other => panic!("expected the refusal and its ack, got {other:?}"),
        }
    }
    drop(raw);

    let mut bob = Raw::connect(&w.addr).await;
    bob.send(&hello(&token_for(&w.secret, "bob"), device)).await;
    let message = bob.expect_error(ErrorCode::DeviceNotOwned).await;
    assert!(message.contains("another user"), "{message}");
    assert_eq!(w.server.refusal_counts().device_owner, 1);

    // alice herself is still welcome on her device, and gets her refusal.
    let mut again = Raw::connect(&w.addr).await;
    again.send(&hello(&alice_token, device)).await;
    assert!(matches!(
        again.next().await,
        Some(ServerMsg::CompensatingWrite { .. })
    ));
    w.handle.shutdown().await;
}

/// A device's uploads continue its positions without a gap: an entry far ahead is a
/// protocol error, never acknowledged, and the device's next honest writes all arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_skips_positions_is_refused_and_nothing_honest_is_lost() {
    let w = world().await;
    let (alice, alice_client) = w.client("alice");
    alice
        .write(|tx| tx.insert("Item", 1, item("alice")))
        .expect("write");
    synced(&alice_client).await;
    let device = alice.replica_id();
    let before = w.server.uploaded(device).expect("uploaded");

    for seq in [before + 2, 1_000_000] {
        let token = token_for(&w.secret, "alice");
        let (mut raw, _) = Raw::handshake(&w.addr, &token, device).await;
        let forged = insert("Item", 99, vec![("owner", Value::from("alice"))]);
        raw.send(&upload(device, vec![entry(seq, device, vec![forged])]))
            .await;
        raw.expect_error(ErrorCode::BadChangeset).await;
    }
    assert_eq!(w.server.uploaded(device).expect("uploaded"), before);
    assert_eq!(w.owner(99), None, "the forged entry was not applied");
    assert_eq!(w.server.refusal_counts().upload_protocol, 2);

    // A new device may not start anywhere but at 1 either.
    let carol_device = fieldlog::ReplicaId(4242);
    let token = token_for(&w.secret, "carol");
    let (mut raw, _) = Raw::handshake(&w.addr, &token, carol_device).await;
    let write = insert("Item", 7, vec![("owner", Value::from("carol"))]);
    raw.send(&upload(
        carol_device,
        vec![entry(5, carol_device, vec![write])],
    ))
    .await;
    raw.expect_error(ErrorCode::BadChangeset).await;

    for pk in 10..13 {
        alice
            .write(|tx| tx.insert("Item", pk, item("alice")))
            .expect("write");
    }
    synced(&alice_client).await;
    for pk in 10..13 {
        assert_eq!(w.owner(pk), Some(Value::from("alice")), "Item {pk}");
    }
    assert_eq!(alice_client.fatal_error(), None);
    alice_client.stop().await;
    w.handle.shutdown().await;
}

/// A re-sent entry is skipped only if it is the transaction applied at its position (the
/// same stamp); another one there is a protocol error, not a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_entry_at_an_applied_position_is_refused() {
    let w = world().await;
    let (alice, alice_client) = w.client("alice");
    for pk in 1..4 {
        alice
            .write(|tx| tx.insert("Item", pk, item("alice")))
            .expect("write");
    }
    synced(&alice_client).await;
    alice_client.stop().await;
    let device = alice.replica_id();
    let applied = alice.log_after(1, 1).expect("log").remove(0);
    let token = token_for(&w.secret, "alice");

    let (mut raw, uploaded) = Raw::handshake(&w.addr, &token, device).await;
    raw.send(&upload(device, vec![applied.clone()])).await;
    match raw.next_skipping_downloads().await {
        Some(ServerMsg::UploadAck { seq, .. }) => assert_eq!(seq, uploaded),
        other => panic!("the same entry again is a duplicate, got {other:?}"),
    }

    // Another transaction at that position (a device restored from an old backup writes
    // its next transaction at a position the server already holds).
    let write = insert("Item", 2, vec![("owner", Value::from("mallory"))]);
    let different = entry(applied.seq, device, vec![write]);
    raw.send(&upload(device, vec![different])).await;
    raw.expect_error(ErrorCode::BadChangeset).await;
    assert_eq!(w.owner(2), Some(Value::from("alice")));
    assert_eq!(w.server.refusal_counts().upload_protocol, 1);
    w.handle.shutdown().await;
}
