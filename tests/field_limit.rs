//! The limit on fields per object (`Options::fields_per_object_max`): a commit that would
//! leave an object with more fields than the limit — a local write, an import, an upload to
//! a sync server — is refused with `Error::TooManyFields` (naming the collection, the key,
//! the count and the limit) and writes nothing; the store goes on working. On a server the
//! upload is refused as `BadChangeset`, not an internal error.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::net::{ClientHooks, ServerHandle, SyncClient, Transport};
use fieldlog::sync::protocol::{ClientMsg, ErrorCode, ServerMsg};
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::Secret;
use fieldlog::{Durability, Error, FieldWrite, Op, Options, Pk, ReplicaId, Store, Value, Write};
use support::{entry, token_for, upload, Raw};

const MAX: usize = 8;
const WAIT: Duration = Duration::from_secs(30);

fn options(max: usize) -> Options {
    Options::default().fields_per_object_max(max)
}

fn fields(n: usize, value: i64) -> Vec<(String, Value)> {
    (0..n)
        .map(|i| (format!("f{i}"), Value::Int(value)))
        .collect()
}

/// The error is `TooManyFields` for `coll[pk]` with `count` fields against `MAX`.
fn assert_too_many(e: Error, coll: &str, pk: i64, count: usize) {
    match &e {
        Error::TooManyFields {
            collection,
            pk: key,
            fields,
            max,
        } => {
            assert_eq!(
                (collection.as_str(), key, *fields, *max),
                (coll, &Pk::Int(pk), count, MAX),
                "{e}"
            );
            let text = e.to_string();
            for part in [coll, &pk.to_string(), &count.to_string(), &MAX.to_string()] {
                assert!(text.contains(part), "{text:?} names {part}");
            }
        }
        other => panic!("expected TooManyFields, got {other:?}"),
    }
}

/// What a user sees of the store: objects of `A`, the log head and the digest.
fn seen(store: &Store) -> (Vec<fieldlog::Object>, u64, fieldlog::Digest) {
    (
        store.scan("A").expect("scan"),
        store.log_head(),
        store.digest(),
    )
}

/// Local inserts and updates past the limit are refused with the typed error and leave
/// the store as it was; writes within the limit (exactly at it included) go through.
#[test]
fn a_local_write_past_the_field_limit_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with(dir.path().join("s.redb"), options(MAX)).expect("open");
    store
        .write(|tx| tx.insert("A", 1, fields(MAX, 1)))
        .expect("an object at the limit");
    let before = seen(&store);

    let e = store
        .write(|tx| {
            tx.insert("A", 2, [("x", 1)])?;
            tx.insert("A", 3, fields(MAX + 1, 1))
        })
        .expect_err("an insert past the limit");
    assert_too_many(e, "A", 3, MAX + 1);
    assert_eq!(seen(&store), before, "nothing of the refused transaction");

    let e = store
        .write(|tx| tx.update("A", 1, [("f0", Value::Int(2)), ("new", Value::Int(2))]))
        .expect_err("an update adding a field past the limit");
    assert_too_many(e, "A", 1, MAX + 1);
    assert_eq!(seen(&store), before);

    // Within the limit: rewriting every field, and new objects.
    store
        .write(|tx| {
            tx.update("A", 1, fields(MAX, 3))?;
            tx.insert("A", 2, fields(MAX, 3))
        })
        .expect("writes within the limit");
    let a1 = store.get("A", 1).expect("get").expect("live");
    assert_eq!(a1.fields.len(), MAX);
    assert!(a1.fields.values().all(|v| *v == Value::Int(3)));
    assert_eq!(store.count("A").expect("count"), 2);
    assert!(store.verify_digest().expect("verify"));
}

/// With a write-ahead file, a refused transaction joins the batch of commits that returned
/// before it (their writes are in redb's open transaction): the refusal must leave that
/// batch as it was — not abandon it, which would poison the store and hide those commits
/// until a reopen.
#[test]
fn a_refused_commit_leaves_the_commits_before_it_intact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.redb");
    let store = Store::open_with(&path, options(MAX)).expect("open");
    for (pk, durability) in [(1, Durability::Immediate), (2, Durability::Deferred)] {
        let mut tx = store.begin().expect("begin");
        tx.set_durability(durability);
        tx.insert("A", pk, fields(3, pk)).expect("insert");
        tx.commit().expect("commit");
    }
    let e = store
        .write(|tx| tx.insert("A", 9, fields(MAX + 5, 9)))
        .expect_err("past the limit");
    assert_too_many(e, "A", 9, MAX + 5);
    store
        .write(|tx| tx.set("A", 1, "f0", 10))
        .expect("the store still takes writes");
    assert_eq!(store.count("A").expect("count"), 2);
    assert_eq!(
        store.get_field("A", 1, "f0").expect("get").map(|(v, _)| v),
        Some(Value::Int(10))
    );
    assert!(store.get("A", 9).expect("get").is_none());
    let before = seen(&store);
    store.close().expect("close");
    let store = Store::open_with(&path, options(MAX)).expect("reopen");
    assert_eq!(seen(&store), before);
}

/// An import (another replica's changeset) that would take an object past the limit is
/// refused whole: none of its other writes is applied either.
#[test]
fn an_import_past_the_field_limit_is_refused_whole() {
    let wide = Store::open_in_memory().expect("open");
    wide.write(|tx| {
        tx.insert("A", 1, fields(2, 1))?;
        tx.insert("A", 2, fields(MAX + 1, 2))
    })
    .expect("the other replica has no such limit");
    let cs = wide.export(0, usize::MAX).expect("export");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_with(dir.path().join("s.redb"), options(MAX)).expect("open");
    let before = seen(&store);
    assert_too_many(store.import(&cs).expect_err("refused"), "A", 2, MAX + 1);
    assert_eq!(seen(&store), before);

    // Updates that grow an object: each within the limit, together past it.
    let narrow = Store::open_in_memory().expect("open");
    narrow
        .write(|tx| tx.insert("A", 1, fields(MAX - 1, 1)))
        .expect("insert");
    store
        .import(&narrow.export(0, usize::MAX).expect("export"))
        .expect("within the limit");
    narrow
        .write(|tx| tx.update("A", 1, [("g1", 1)]))
        .expect("to the limit");
    narrow
        .write(|tx| tx.update("A", 1, [("g2", 1)]))
        .expect("past the limit, which that store does not set");
    let before = seen(&store);
    let e = store
        .import(&narrow.export(1, usize::MAX).expect("export"))
        .expect_err("two updates taking it past the limit");
    assert_too_many(e, "A", 1, MAX + 1);
    assert_eq!(seen(&store), before);
}

/// An object that already holds more fields than the limit (written under a higher one)
/// may still be written, as long as it does not grow; deleting and inserting it again
/// counts the new fields only.
#[test]
fn an_object_past_a_lowered_limit_stays_writable_but_does_not_grow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.redb");
    let store = Store::open_with(&path, options(MAX * 2)).expect("open");
    store
        .write(|tx| tx.insert("A", 1, fields(MAX + 2, 1)))
        .expect("insert under the higher limit");
    store.close().expect("close");
    let store = Store::open_with(&path, options(MAX)).expect("reopen with a lower limit");
    store
        .write(|tx| tx.update("A", 1, fields(MAX + 2, 2)))
        .expect("rewriting its fields does not grow it");
    let e = store
        .write(|tx| tx.set("A", 1, "another", 1))
        .expect_err("growing it");
    assert_too_many(e, "A", 1, MAX + 3);
    store.write(|tx| tx.delete("A", 1)).expect("delete");
    store
        .write(|tx| tx.insert("A", 1, fields(MAX, 3)))
        .expect("a new incarnation within the limit");
    assert_eq!(
        store.get("A", 1).expect("get").expect("live").fields.len(),
        MAX
    );
}

/// An upload of one write to `A[1]` by `replica` at `seq`.
fn upload_one(replica: u64, seq: u64, op: Op) -> ClientMsg {
    let device = ReplicaId(replica);
    let write = Write {
        collection: "A".into(),
        pk: Pk::Int(1),
        op,
    };
    upload(device, vec![entry(seq, device, vec![write])])
}

/// Uploads past the server's limit — an insert of too many fields, an update adding one
/// field too many — are refused as `BadChangeset` naming the object, count and limit, and
/// the connection closes; the server's state is unchanged. A client whose own limit is
/// higher gets the refusal as its fatal error; another client keeps syncing throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_past_the_servers_field_limit_is_refused_as_a_bad_changeset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = Secret::generate();
    let server_store =
        Arc::new(Store::open_with(dir.path().join("server.redb"), options(MAX)).expect("open"));
    let server = Arc::new(
        SyncServer::open(server_store.clone(), ServerConfig::new(secret.clone())).expect("server"),
    );
    server
        .write(|tx| tx.insert("A", 1, fields(MAX, 0)))
        .expect("an object at the limit");
    let handle = ServerHandle::bind(server.clone(), "127.0.0.1:0")
        .await
        .expect("bind");
    let addr = handle.local_addr().expect("addr").to_string();
    let token = token_for(&secret, "u");
    let state = || (server_store.digest(), server.version());
    let before = state();

    let cases = [
        (
            "an insert past the limit",
            Op::Insert {
                fields: fields(MAX + 1, 1),
            },
            MAX + 1,
        ),
        (
            "an update adding a field",
            Op::Update {
                fields: vec![FieldWrite {
                    field: "extra".into(),
                    value: Value::Int(1),
                    base: None,
                }],
            },
            MAX + 1,
        ),
    ];
    for (i, (case, op, count)) in cases.into_iter().enumerate() {
        let replica = 100 + i as u64;
        let (mut s, _) = Raw::handshake(&addr, &token, ReplicaId(replica)).await;
        s.send(&upload_one(replica, 1, op)).await;
        match s.next_skipping_downloads().await {
            Some(ServerMsg::Error { code, message }) => {
                assert_eq!(code, ErrorCode::BadChangeset, "{case}: {message}");
                for part in ["A[1]", &count.to_string(), &MAX.to_string()] {
                    assert!(message.contains(part), "{case}: {message:?} names {part}");
                }
            }
            other => panic!("{case}: expected BadChangeset, got {other:?}"),
        }
        assert_eq!(
            s.next_skipping_downloads().await,
            None,
            "{case}: the server closes"
        );
        assert_eq!(state(), before, "{case}: the server's state is unchanged");
        assert_eq!(
            server.uploaded(ReplicaId(replica)).expect("uploaded"),
            0,
            "{case}: nothing acknowledged"
        );
    }

    // A real client whose store allows wider objects: its upload is refused, fatally.
    let wide = Arc::new(Store::open_with(dir.path().join("wide.redb"), options(64)).expect("open"));
    let wide_client = SyncClient::start(
        wide.clone(),
        Transport::Tcp(addr.clone()),
        ClientConfig::new(token.clone()),
        ClientHooks::default(),
    );
    wide.write(|tx| tx.insert("B", 7, fields(MAX + 3, 1)))
        .expect("write");
    let deadline = Instant::now() + WAIT;
    let fatal = loop {
        if let Some(e) = wide_client.fatal_error() {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "the wide client gets its refusal"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(fatal.contains("B[7]") && fatal.contains("11"), "{fatal}");
    assert_eq!(state(), before);
    wide_client.stop().await;

    // Another client syncs as before.
    let good =
        Arc::new(Store::open_with(dir.path().join("good.redb"), options(MAX)).expect("open"));
    let client = SyncClient::start(
        good.clone(),
        Transport::Tcp(addr.clone()),
        ClientConfig::new(token.clone()),
        ClientHooks::default(),
    );
    good.write(|tx| tx.insert("C", 1, [("n", 1)]))
        .expect("write");
    let deadline = Instant::now() + WAIT;
    while server_store.get("C", 1).expect("get").is_none()
        || good.get("A", 1).expect("get").is_none()
    {
        assert!(Instant::now() < deadline, "the good client syncs");
        assert_eq!(client.fatal_error(), None);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.stop().await;
    handle.shutdown().await;
}
