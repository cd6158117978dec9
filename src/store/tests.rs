use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use redb::ReadableTableMetadata;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::clock::{ReplicaId, Stamp};
use crate::log::LogEntry;
use crate::reset::{ObjectSnapshot, ResetMarker, ResetMode, ResetPhase};
use crate::value::{Pk, Value};

use super::commit::BATCH_MEMBERS_MAX;
use super::format::{decode_state, object_key, OBJECTS, STAGING};
use super::locks::lock;
use super::prepare::insert_fresh;
use super::{Options, Store};

fn store(dir: &tempfile::TempDir) -> Store {
    Store::open(dir.path().join("s.redb")).expect("open")
}

/// Waits until `n` writers wait for the writer lock.
fn until_waiting(store: &Store, n: usize) {
    while store.waiting.load(Ordering::SeqCst) < n {
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn n(store: &Store, pk: i64) -> Option<Value> {
    store.get_field("T", pk, "n").expect("get").map(|(v, _)| v)
}

const PACK_TEST: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pack_test");

proptest::proptest! {
    /// Rows inserted in runs land between any neighbours, at either end, and replace
    /// a key that turns out to be there: the table holds exactly the union.
    #[test]
    fn insert_fresh_puts_every_row_between_its_neighbours(
        existing in proptest::collection::btree_set(0u16..600, 0..200),
        fresh in proptest::collection::btree_set(0u16..600, 0..200),
    ) {
        let key = |k: u16| k.to_string().into_bytes();
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("db");
        let txn = db.begin_write().expect("txn");
        let mut model = BTreeMap::new();
        {
            let mut t = txn.open_table(PACK_TEST).expect("table");
            for &k in &existing {
                t.insert(key(k).as_slice(), b"old".as_slice()).expect("insert");
                model.insert(key(k), b"old".to_vec());
            }
            let rows: Vec<(Vec<u8>, Vec<u8>)> = fresh
                .iter()
                .map(|&k| (key(k), vec![k as u8; 1 + usize::from(k) * 37 % 3000]))
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect();
            insert_fresh(&mut t, &rows).expect("insert_fresh");
            model.extend(rows);
            let got: BTreeMap<Vec<u8>, Vec<u8>> = t
                .iter()
                .expect("iter")
                .map(|r| {
                    let (k, v) = r.expect("row");
                    (k.value().to_vec(), v.value().to_vec())
                })
                .collect();
            proptest::prop_assert_eq!(got, model);
        }
    }
}

/// Objects created in numeric order with string keys (`user10000`.. after `user1000`)
/// land between existing keys, not after them: their rows still fill their pages.
#[test]
fn objects_created_between_existing_keys_fill_their_pages() {
    let store = Store::open_in_memory().expect("open");
    let value = "v".repeat(100);
    let objects = 3_000;
    for chunk in (0..objects).collect::<Vec<_>>().chunks(100) {
        store
            .write(|tx| {
                for i in chunk {
                    let fields: Vec<(String, Value)> = (0..10)
                        .map(|f| (format!("field{f}"), Value::from(value.as_str())))
                        .collect();
                    tx.insert("T", format!("user{i}").as_str(), fields)?;
                }
                Ok(())
            })
            .expect("insert");
    }
    assert_eq!(store.count("T").expect("count"), objects);
    store.checkpoint().expect("checkpoint");
    let txn = store.db().expect("db").begin_write().expect("txn");
    let leaves = txn
        .open_table(OBJECTS)
        .expect("objects")
        .stats()
        .expect("stats")
        .leaf_pages();
    txn.abort().expect("abort");
    // Three ~1.1 KB rows fit a 4 KiB page; splitting full leaves in half left two.
    assert!(
        leaves * 5 <= objects * 2,
        "{leaves} leaves for {objects} objects"
    );
}

/// A row read from a snapshot keeps that snapshot's read transaction, even once the
/// snapshot is no longer the kept one: durable commits that rewrite the row's page
/// cannot reclaim it meanwhile (redb's debug builds assert if they do).
#[test]
fn a_reset_replays_unsynced_writes_onto_each_chunk_as_it_is_staged() {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(&dir);
    for pk in 1..=2i64 {
        store
            .write(|tx| tx.insert("T", pk, [("n", 1)]))
            .expect("insert");
    }
    store.write(|tx| tx.set("T", 1, "n", 2)).expect("update");
    // Written after the plan was made (as the app may while chunks arrive).
    let late = |store: &Store| store.write(|tx| tx.set("T", 2, "n", 5)).expect("update");
    let server = |pk: i64, n: i64| ObjectSnapshot {
        collection: "T".into(),
        pk: Pk::Int(pk),
        exists: Some((
            Stamp {
                time: 1 << 16,
                replica: ReplicaId(9),
            },
            true,
        )),
        floor: Stamp::ZERO,
        fields: vec![(
            "n".into(),
            Stamp {
                time: 1 << 16,
                replica: ReplicaId(9),
            },
            Value::Int(n),
        )],
    };
    let mut plan = store
        .plan_replay(ResetMode::RecoverUnsyncedChanges, &[], 0)
        .expect("plan");
    store
        .stage_snapshot(&[server(1, 0)], true, &mut plan)
        .expect("stage");
    // Object 1's writes are already in its staged row; object 2's wait for its chunk.
    assert_eq!(plan.by_key.len(), 1, "{plan:?}");
    let staged = {
        let rtx = store.db().expect("db").begin_read().expect("read");
        let t = rtx.open_table(STAGING).expect("staging");
        let row = t
            .get(object_key(store.names().by_name["T"], &Pk::Int(1)).as_slice())
            .expect("get")
            .expect("staged");
        decode_state(row.value()).expect("decode")
    };
    assert_eq!(staged.fields[0].2, Value::Int(2));
    late(&store);
    store
        .stage_snapshot(&[server(2, 0)], false, &mut plan)
        .expect("stage");
    assert!(plan.by_key.is_empty(), "{plan:?}");
    let marker = ResetMarker {
        reason: crate::reset::ResetReason::Forced,
        mode: ResetMode::RecoverUnsyncedChanges,
        phase: ResetPhase::Downloading,
        backup: None,
    };
    let (report, _) = store
        .finish_reset(&marker, &[], plan, |_| Ok(()))
        .expect("swap");
    // Both inserts (existence and field), the update made before the plan, and the one
    // made after it.
    assert_eq!(report.recovered.len(), 6, "{report:?}");
    assert!(report.superseded.is_empty() && report.discarded.is_empty());
    assert_eq!(n(&store, 1), Some(Value::from(2)));
    assert_eq!(n(&store, 2), Some(Value::from(5)));
    assert!(store.verify_digest().expect("verify"));
}

#[test]
fn an_upload_batch_reads_entries_up_to_its_bytes_and_at_least_one() {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(&dir);
    let big = "x".repeat(1000);
    for i in 0..6i64 {
        store
            .write(|tx| tx.insert("T", i, [("v", big.as_str())]))
            .expect("write");
    }
    let seqs = |es: Vec<LogEntry>| es.iter().map(|e| e.seq).collect::<Vec<_>>();
    // Each entry is stored in a little over 1,000 bytes.
    assert_eq!(
        seqs(store.log_within(0, 256, 2_500).expect("read")),
        [1, 2, 3]
    );
    assert_eq!(seqs(store.log_within(4, 256, 0).expect("read")), [5]);
    assert_eq!(
        seqs(store.log_within(0, 2, usize::MAX).expect("read")),
        [1, 2]
    );
    assert_eq!(store.log_after(0, 256).expect("read").len(), 6);
}

#[test]
fn a_row_being_read_keeps_its_page_from_being_reclaimed() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Store::open_with(
        dir.path().join("s.redb"),
        // Every commit a durable redb one, which reclaims freed pages after it.
        Options::default().checkpoint_bytes(0),
    )
    .expect("open");
    store
        .write(|tx| tx.insert("T", 1, [("n", "old")]))
        .expect("insert");
    let (row, _) = store
        .read_row("T", &Pk::Int(1))
        .expect("read")
        .expect("row");
    // As when a newer snapshot replaces it and the reader holds the last handle.
    store.snapshots.writer_locked();
    for i in 0..4i64 {
        store
            .write(|tx| tx.set("T", 1, "n", i))
            .expect("a commit that rewrites the row's page");
    }
    let state = decode_state(row.value()).expect("the row as it was read");
    assert_eq!(state.fields.len(), 1);
    assert_eq!(state.fields[0].2, Value::from("old"));
    drop(row);
    assert_eq!(n(&store, 1), Some(Value::from(3)));
}

#[test]
fn writers_waiting_behind_a_commit_share_its_redb_commit() {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(&dir);
    let before = lock(&store.group).committed;
    std::thread::scope(|s| {
        let mut first = store.begin().expect("begin");
        first.insert("T", 0, [("n", 0)]).expect("insert");
        for i in 1..8i64 {
            let store = &store;
            s.spawn(move || {
                store
                    .write(|tx| tx.insert("T", i, [("n", i)]))
                    .expect("commit")
            });
        }
        until_waiting(&store, 7);
        first.commit().expect("commit");
    });
    // Every commit returned with its record synced, none with a redb commit.
    assert_eq!(lock(&store.group).committed - before, 0);
    for i in 0..8i64 {
        assert_eq!(n(&store, i), Some(Value::from(i)));
    }
    // The first read committed the batch: one redb commit for the eight.
    assert_eq!(lock(&store.group).committed - before, 1);
    assert_eq!(store.log_head(), 8);
    assert_eq!(store.count("T").expect("count"), 8);
    assert!(store.verify_digest().expect("verify"));
}

#[test]
fn a_lone_writers_commits_share_a_redb_commit_and_every_read_sees_them() {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(&dir);
    store
        .write(|tx| tx.insert("T", 1, [("n", 0)]))
        .expect("insert");
    assert_eq!(n(&store, 1), Some(Value::from(0)));
    let before = lock(&store.group).committed;
    for i in 1..=BATCH_MEMBERS_MAX as i64 + 3 {
        store.write(|tx| tx.set("T", 1, "n", i)).expect("set");
        if i == 2 {
            // From another thread too, with the batch open.
            let seen = std::thread::scope(|s| s.spawn(|| n(&store, 1)).join().expect("read"));
            assert_eq!(seen, Some(Value::from(2)));
            assert_eq!(lock(&store.group).committed - before, 1);
        }
    }
    // After the read's: a batch of 64 committed when it filled up; the last commit
    // waits for a reader.
    assert_eq!(lock(&store.group).committed - before, 2);
    assert_eq!(store.log_head(), BATCH_MEMBERS_MAX as u64 + 4);
    assert_eq!(lock(&store.group).committed - before, 3);
    assert_eq!(
        n(&store, 1),
        Some(Value::from(BATCH_MEMBERS_MAX as i64 + 3))
    );
    assert!(store.verify_digest().expect("verify"));
}

#[test]
fn a_batch_commits_once_its_records_pass_its_bytes_and_a_small_cache_makes_them_fewer() {
    let committed = |store: &Store| lock(&store.group).committed;
    let objects = |store: &Store| {
        for i in 1..=5i64 {
            store
                .write(|tx| tx.insert("T", i, [("b", 0)]))
                .expect("insert");
        }
        assert_eq!(store.count("T").expect("count"), 5);
    };
    // ~300 KB a record (an update's value is in it once): the fourth passes 1 MiB.
    let big = |store: &Store, i: i64| {
        store
            .write(|tx| tx.set("T", i, "b", Value::Bytes(vec![i as u8; 300_000])))
            .expect("set")
    };
    let dir = tempfile::tempdir().expect("dir");
    let store = store(&dir);
    objects(&store);
    let before = committed(&store);
    for i in 1..=3 {
        big(&store, i);
    }
    assert_eq!(committed(&store) - before, 0);
    big(&store, 4);
    assert_eq!(committed(&store) - before, 1);
    big(&store, 5);
    assert_eq!(committed(&store) - before, 1);
    let read = store.get_field("T", 5, "b").expect("get").map(|(v, _)| v);
    assert_eq!(read, Some(Value::Bytes(vec![5; 300_000])));
    assert_eq!(committed(&store) - before, 2);
    assert!(store.verify_digest().expect("verify"));

    // A 16 MiB cache: a batch is committed past 128 KiB, here by each member.
    let dir = tempfile::tempdir().expect("dir");
    let options = Options::default().cache_bytes(16 << 20);
    let store = Store::open_with(dir.path().join("s.redb"), options).expect("open");
    objects(&store);
    let before = committed(&store);
    big(&store, 1);
    big(&store, 2);
    assert_eq!(committed(&store) - before, 2);
    assert!(store.verify_digest().expect("verify"));
}

#[test]
fn a_writer_behind_the_batch_reads_it_and_may_roll_back_alone() {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(&dir);
    store
        .write(|tx| tx.insert("T", 1, [("n", 1)]))
        .expect("insert");
    std::thread::scope(|s| {
        let mut a = store.begin().expect("begin");
        a.set("T", 1, "n", 10).expect("set");
        let store = &store;
        let b = s.spawn(move || {
            let mut b = store.begin().expect("begin");
            // A's write, in the open batch: seen, and built on.
            let seen = b
                .get("T", 1)
                .expect("get")
                .and_then(|o| o.get("n").cloned());
            b.set("T", 1, "m", 20).expect("set");
            drop(b);
            seen
        });
        until_waiting(store, 1);
        a.commit().expect("commit");
        assert_eq!(b.join().expect("b"), Some(Value::from(10)));
    });
    assert_eq!(n(&store, 1), Some(Value::from(10)));
    assert_eq!(store.get_field("T", 1, "m").expect("get"), None);
    assert_eq!(store.log_head(), 2);
    assert!(store.verify_digest().expect("verify"));
}

#[test]
fn a_commit_does_not_wait_for_the_writer_behind_it_to_finish() {
    let dir = tempfile::tempdir().expect("dir");
    let store = store(&dir);
    let (done, a_returned) = mpsc::channel();
    std::thread::scope(|s| {
        let mut a = store.begin().expect("begin");
        a.insert("T", 1, [("n", 1)]).expect("insert");
        let store = &store;
        let b = s.spawn(move || {
            let mut b = store.begin().expect("begin");
            b.insert("T", 2, [("n", 2)]).expect("insert");
            // B holds the writer lock until A's commit has returned.
            let returned = a_returned.recv_timeout(Duration::from_secs(20)).is_ok();
            b.commit().expect("commit");
            returned
        });
        until_waiting(store, 1);
        a.commit().expect("commit");
        done.send(()).expect("send");
        assert!(b.join().expect("b"), "A's commit waited for B");
    });
    assert_eq!(n(&store, 1), Some(Value::from(1)));
    assert_eq!(n(&store, 2), Some(Value::from(2)));
    assert!(store.verify_digest().expect("verify"));
}
