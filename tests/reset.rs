//! Client reset over a real server and real clients on loopback TCP (invariant 4: nothing
//! unsynced is lost in a reset; stale never wins).

use std::sync::Arc;
use std::time::Duration;

use fieldlog::reset::{ResetMode, ResetReason, ResetReport};
use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::net::{ClientHooks, ServerHandle, SyncClient, Transport};
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{FieldSpec, FieldType, ManualTimeSource, Options, Schema, Store, Value};

struct Net {
    dir: tempfile::TempDir,
    secret: Secret,
    server: Arc<SyncServer>,
    handle: ServerHandle,
    addr: String,
}

impl Net {
    async fn start() -> Net {
        let dir = tempfile::tempdir().unwrap();
        let secret = Secret::generate();
        let store = Arc::new(Store::open(dir.path().join("server.redb")).unwrap());
        let server = Arc::new(SyncServer::open(store, ServerConfig::new(secret.clone())).unwrap());
        let handle = ServerHandle::bind(server.clone(), "127.0.0.1:0")
            .await
            .unwrap();
        let addr = handle.local_addr().unwrap().to_string();
        Net {
            dir,
            secret,
            server,
            handle,
            addr,
        }
    }

    fn store(&self, name: &str, time: Option<&ManualTimeSource>) -> Arc<Store> {
        let mut options = Options::default();
        if let Some(t) = time {
            options.time = Arc::new(t.clone());
        }
        Arc::new(Store::open_with(self.dir.path().join(format!("{name}.redb")), options).unwrap())
    }

    fn client(&self, store: &Arc<Store>, mode: ResetMode) -> SyncClient {
        let claims = Claims {
            user_id: "u".into(),
            expires_at_ms: u64::MAX,
            extra: Default::default(),
        };
        let mut config = ClientConfig::new(token::issue(&self.secret, &claims).unwrap());
        config.reset_mode = mode;
        SyncClient::start(
            store.clone(),
            Transport::Tcp(self.addr.clone()),
            config,
            ClientHooks::default(),
        )
    }
}

async fn synced(c: &SyncClient) {
    tokio::time::timeout(Duration::from_secs(20), async {
        c.wait_for_upload().await.expect("upload");
        c.wait_for_download().await.expect("download");
    })
    .await
    .expect("sync timed out");
}

async fn next_report(c: &SyncClient) -> ResetReport {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(r) = c.take_reset_reports().pop() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("no reset happened")
}

fn field(store: &Store, pk: i64, f: &str) -> Option<Value> {
    store.get_field("Dog", pk, f).unwrap().map(|(v, _)| v)
}

/// The manual recipe this project replaces, and what it does on the same history: after
/// the reset, copy back every object whose `lastUpdated` is newer than the last sync.
fn last_updated_recovery(
    backup_obj: (&str, i64, u64),
    server_obj: (&str, i64, u64),
    last_sync_ms: u64,
) -> (String, i64) {
    let (name, age, updated) = backup_obj;
    if updated > last_sync_ms {
        (name.to_owned(), age) // the whole object wins, B's name with it
    } else {
        (server_obj.0.to_owned(), server_obj.1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dog_keeps_a_age_and_b_name_after_reset() {
    let net = Net::start().await;
    let (sa, sb) = (net.store("a", None), net.store("b", None));
    let (a, b) = (
        net.client(&sa, ResetMode::RecoverUnsyncedChanges),
        net.client(&sb, ResetMode::RecoverUnsyncedChanges),
    );
    sa.write(|tx| {
        tx.insert(
            "Dog",
            1,
            [("name", Value::from("Rex")), ("age", Value::from(3))],
        )
    })
    .unwrap();
    synced(&a).await;
    synced(&b).await;
    assert_eq!(field(&sb, 1, "name"), Some(Value::from("Rex")));

    // A goes offline and changes the age; B renames and syncs; the server compacts.
    a.set_online(false);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let last_sync_ms = 0; // A's last sync, as the manual recipe would record it
    sa.write(|tx| tx.set("Dog", 1, "age", 4)).unwrap();
    let a_age_stamp = sa.get_field("Dog", 1, "age").unwrap().unwrap().1;
    tokio::time::sleep(Duration::from_millis(5)).await;
    sb.write(|tx| tx.set("Dog", 1, "name", "Max")).unwrap();
    synced(&b).await;
    net.server.compact_history(net.server.version()).unwrap();

    a.set_online(true);
    let report = next_report(&a).await;
    synced(&a).await;
    synced(&b).await;

    assert!(
        matches!(report.reason, Some(ResetReason::BehindHorizon { .. })),
        "{report:?}"
    );
    assert_eq!(report.recovered.len(), 1, "{report:?}");
    assert_eq!(report.recovered[0].field.as_deref(), Some("age"));
    assert!(
        report.superseded.is_empty() && report.discarded.is_empty(),
        "{report:?}"
    );
    let server = net.server.store();
    for s in [&sa, &sb, server] {
        assert_eq!(field(s, 1, "name"), Some(Value::from("Max")));
        assert_eq!(field(s, 1, "age"), Some(Value::from(4)));
        assert_eq!(s.digest(), server.digest());
        assert!(s.verify_digest().unwrap());
    }
    // The backup is gone after success.
    assert!(!report.backup.as_ref().unwrap().exists());

    // The per-object "lastUpdated" recipe on the same history loses B's name.
    let a_updated = a_age_stamp.physical_ms();
    let b_updated = server
        .get_field("Dog", 1, "name")
        .unwrap()
        .unwrap()
        .1
        .physical_ms();
    let (name, age) =
        last_updated_recovery(("Rex", 4, a_updated), ("Max", 3, b_updated), last_sync_ms);
    assert_eq!(
        (name.as_str(), age),
        ("Rex", 4),
        "the manual recipe overwrites B's name"
    );
    assert_ne!(name, "Max");

    a.stop().await;
    b.stop().await;
    net.handle.shutdown().await;
}

/// A writes f=1 at t1 offline; B writes f=2 at t2; A resets. The higher stamp wins on every
/// replica and the loser is reported as superseded with the winner's value and writer.
async fn stale_never_wins(a_first: bool) {
    let net = Net::start().await;
    let (ta, tb) = (
        ManualTimeSource::new(1_000_000),
        ManualTimeSource::new(1_000_000),
    );
    let (sa, sb) = (net.store("a", Some(&ta)), net.store("b", Some(&tb)));
    let (a, b) = (
        net.client(&sa, ResetMode::RecoverUnsyncedChanges),
        net.client(&sb, ResetMode::RecoverUnsyncedChanges),
    );
    sb.write(|tx| tx.insert("Dog", 7, [("f", Value::from(0))]))
        .unwrap();
    synced(&b).await;
    synced(&a).await;
    a.set_online(false);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (t1, t2) = if a_first {
        (2_000_000, 2_001_000)
    } else {
        (2_001_000, 2_000_000)
    };
    ta.set(t1);
    tb.set(t2);
    sa.write(|tx| tx.set("Dog", 7, "f", 1)).unwrap();
    sb.write(|tx| tx.set("Dog", 7, "f", 2)).unwrap();
    synced(&b).await;
    net.server.compact_history(net.server.version()).unwrap();
    a.set_online(true);
    let report = next_report(&a).await;
    synced(&a).await;
    synced(&b).await;
    let want = if a_first { 2 } else { 1 };
    for s in [&sa, &sb, net.server.store()] {
        assert_eq!(
            field(s, 7, "f"),
            Some(Value::from(want)),
            "{report:?} {:?} {:?}",
            a.fatal_error(),
            b.fatal_error()
        );
    }
    if a_first {
        assert!(report.recovered.is_empty(), "{report:?}");
        assert_eq!(report.superseded.len(), 1, "{report:?}");
        let s = &report.superseded[0];
        assert_eq!(s.write.value, Value::from(1));
        assert_eq!(s.server_value, Some(Value::from(2)));
        assert_eq!(s.server_stamp.replica, sb.replica_id());
    } else {
        assert_eq!(report.recovered.len(), 1, "{report:?}");
        assert!(report.superseded.is_empty());
    }
    a.stop().await;
    b.stop().await;
    net.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_never_wins_older_client_write() {
    stale_never_wins(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newer_client_write_wins_after_reset() {
    stale_never_wins(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsynced_insert_delete_and_update_of_deleted_object() {
    let net = Net::start().await;
    let (sa, sb) = (net.store("a", None), net.store("b", None));
    let (a, b) = (
        net.client(&sa, ResetMode::RecoverUnsyncedChanges),
        net.client(&sb, ResetMode::RecoverUnsyncedChanges),
    );
    sb.write(|tx| {
        tx.insert("Dog", 1, [("name", Value::from("one"))])?;
        tx.insert("Dog", 2, [("name", Value::from("two"))])
    })
    .unwrap();
    synced(&b).await;
    synced(&a).await;
    a.set_online(false);
    tokio::time::sleep(Duration::from_millis(50)).await;
    // B deletes 2; A, offline, inserts 3, deletes 1 and renames 2.
    sb.write(|tx| tx.delete("Dog", 2)).unwrap();
    // A's writes are newer than B's delete (in the same millisecond the stamps would tie
    // on time and the replica ids would decide, either way).
    tokio::time::sleep(Duration::from_millis(5)).await;
    sa.write(|tx| {
        tx.insert("Dog", 3, [("name", Value::from("three"))])?;
        tx.delete("Dog", 1)?;
        tx.set("Dog", 2, "name", "renamed")
    })
    .unwrap();
    synced(&b).await;
    net.server.compact_history(net.server.version()).unwrap();
    a.set_online(true);
    let report = next_report(&a).await;
    synced(&a).await;
    synced(&b).await;
    for s in [&sa, &sb, net.server.store()] {
        assert_eq!(
            s.get("Dog", 1).unwrap(),
            None,
            "the unsynced delete survived"
        );
        assert_eq!(
            field(s, 3, "name"),
            Some(Value::from("three")),
            "the insert survived"
        );
        assert_eq!(
            s.get("Dog", 2).unwrap(),
            None,
            "an update does not resurrect"
        );
        assert_eq!(s.digest(), net.server.store().digest());
    }
    // Insert (existence + name), delete and the rename are all replayed and uploaded: the
    // rename of the deleted object then meets the server's update-vs-delete rule (the
    // default keeps it deleted, as the checks above show) and is recorded as a conflict.
    assert_eq!(report.recovered.len(), 4, "{report:?}");
    assert!(report.superseded.is_empty(), "{report:?}");
    let conflicts = net.server.conflicts(0, 10).unwrap();
    assert!(
        conflicts
            .iter()
            .any(|r| r.conflict.kind == fieldlog::conflict::ConflictKind::ClientUpdateServerDelete),
        "{conflicts:?}"
    );
    a.stop().await;
    b.stop().await;
    net.handle.shutdown().await;
}

/// Trigger (b) with a partial recovery: 100 unsynced writes, one to a field the new schema
/// removed: 99 recovered, 1 discarded with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaking_schema_change_recovers_all_but_the_removed_field() {
    let net = Net::start().await;
    let v1 = Schema::new("Dog")
        .field("name", FieldSpec::optional(FieldType::String))
        .field("age", FieldSpec::optional(FieldType::Int))
        .field("color", FieldSpec::optional(FieldType::String));
    assert!(!net.server.set_schema(v1).unwrap());
    let sa = net.store("a", None);
    let a = net.client(&sa, ResetMode::RecoverOrDiscard);
    synced(&a).await;
    assert!(
        sa.schema("Dog").is_some(),
        "the client adopted the server's schema"
    );
    sa.write(|tx| {
        for i in 0..50 {
            tx.insert("Dog", i, [("name", Value::from("n"))])?;
        }
        Ok(())
    })
    .unwrap();
    synced(&a).await;
    a.set_online(false);
    tokio::time::sleep(Duration::from_millis(50)).await;
    sa.write(|tx| {
        for i in 0..99 {
            tx.set(
                "Dog",
                i % 50,
                if i < 50 { "age" } else { "name" },
                if i < 50 {
                    Value::from(i)
                } else {
                    Value::from(format!("x{i}"))
                },
            )?;
        }
        tx.set("Dog", 49, "color", "brown")
    })
    .unwrap();
    let v2 = Schema::new("Dog")
        .field("name", FieldSpec::optional(FieldType::String))
        .field("age", FieldSpec::optional(FieldType::Int));
    assert!(
        net.server.set_schema(v2).unwrap(),
        "removing a field is breaking"
    );
    a.set_online(true);
    let report = next_report(&a).await;
    synced(&a).await;
    assert!(matches!(
        report.reason,
        Some(ResetReason::BreakingSchemaChange { .. })
    ));
    assert_eq!(report.recovered.len(), 99, "{report:?}");
    assert_eq!(report.discarded.len(), 1);
    assert_eq!(report.discarded[0].write.field.as_deref(), Some("color"));
    assert!(
        report.discarded[0].reason.contains("schema"),
        "{}",
        report.discarded[0].reason
    );
    assert_eq!(sa.digest(), net.server.store().digest());
    assert_eq!(field(net.server.store(), 3, "age"), Some(Value::from(3)));
    a.stop().await;
    net.handle.shutdown().await;
}

/// Trigger (d), in every mode: the report says what happened to the one unsynced write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_reset_in_every_mode() {
    for mode in [
        ResetMode::RecoverUnsyncedChanges,
        ResetMode::RecoverOrDiscard,
        ResetMode::DiscardUnsyncedChanges,
        ResetMode::Manual,
    ] {
        let net = Net::start().await;
        let sa = net.store("a", None);
        let a = net.client(&sa, mode);
        sa.write(|tx| tx.insert("Dog", 1, [("age", Value::from(1))]))
            .unwrap();
        synced(&a).await;
        a.set_online(false);
        tokio::time::sleep(Duration::from_millis(50)).await;
        sa.write(|tx| tx.set("Dog", 1, "age", 2)).unwrap();
        net.server.force_reset(sa.replica_id()).unwrap();
        a.set_online(true);
        let report = next_report(&a).await;
        synced(&a).await;
        assert_eq!(report.reason, Some(ResetReason::Forced), "{mode:?}");
        let recovering = matches!(
            mode,
            ResetMode::RecoverUnsyncedChanges | ResetMode::RecoverOrDiscard
        );
        let want = if recovering { 2 } else { 1 };
        assert_eq!(
            field(&sa, 1, "age"),
            Some(Value::from(want)),
            "{mode:?} {report:?} {:?}",
            a.fatal_error()
        );
        assert_eq!(
            field(net.server.store(), 1, "age"),
            Some(Value::from(want)),
            "{mode:?} fatal={:?} log={:?} last_sync={}",
            a.fatal_error(),
            sa.log_after(0, 100).unwrap(),
            sa.last_sync()
        );
        assert_eq!(report.recovered.len(), usize::from(recovering), "{mode:?}");
        assert_eq!(report.discarded.len(), usize::from(!recovering), "{mode:?}");
        let backup = report.backup.clone().unwrap();
        if mode == ResetMode::Manual {
            let b = fieldlog::Backup::open(&backup).unwrap();
            let unsynced = b.unsynced().unwrap();
            assert_eq!(unsynced.len(), 1, "the backup lists the unsynced write");
            b.remove().unwrap();
        } else {
            assert!(!backup.exists(), "{mode:?}: backup removed after success");
        }
        // Only once: the next connection does not reset again.
        a.set_online(false);
        tokio::time::sleep(Duration::from_millis(50)).await;
        a.set_online(true);
        synced(&a).await;
        let again = a.take_reset_reports();
        assert!(again.is_empty(), "{mode:?}: {again:?}");
        a.stop().await;
        net.handle.shutdown().await;
    }
}
