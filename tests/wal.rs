//! The write-ahead file keeps invariant 3: commits acknowledged durable survive a power cut
//! (both files cut back to what their last sync made durable), whatever sits in the file is
//! put back exactly once, and a file that does not belong to the database is ignored.
//! (`crash_images.rs` cuts at every sync point of both files; this file covers the cases by
//! name.)

#[path = "../fuzz/src/disk.rs"]
#[allow(dead_code)]
mod disk;

use disk::SimDisk;
use std::collections::BTreeMap;

use fieldlog::{Durability, Options, Store, Value};
use redb::ReadableDatabase;

fn options(checkpoint_bytes: u64) -> Options {
    Options::default().checkpoint_bytes(checkpoint_bytes)
}

fn open(db: &SimDisk, wal: &SimDisk, checkpoint_bytes: u64) -> Store {
    Store::open_backend_with_wal(db.backend(), wal.backend(), options(checkpoint_bytes))
        .expect("open")
}

fn crash(store: Store, db: &SimDisk, wal: &SimDisk) {
    db.crash();
    wal.crash();
    drop(store);
}

fn value_of(store: &Store, pk: i64, field: &str) -> Option<Value> {
    store
        .get("T", pk)
        .expect("get")
        .and_then(|o| o.get(field).cloned())
}

#[test]
fn acknowledged_commits_survive_a_power_cut_without_a_checkpoint() {
    let (db, wal) = (SimDisk::new(), SimDisk::new());
    let store = open(&db, &wal, 16 << 20);
    let db_syncs = db.syncs();
    for i in 0..50i64 {
        store
            .write(|tx| tx.insert("T", i, [("n", Value::from(i))]))
            .expect("insert");
    }
    store
        .write(|tx| tx.set("T", 7, "n", "seven"))
        .expect("update");
    store.write(|tx| tx.delete("T", 8)).expect("delete");
    let digest = store.digest();
    let head = store.log_head();
    // The database file was not synced by those commits: only the write-ahead file was.
    assert_eq!(db.syncs(), db_syncs, "no redb commit reached the disk");
    assert!(wal.syncs() >= 52);
    crash(store, &db, &wal);

    let store = open(&db, &wal, 16 << 20);
    assert_eq!(store.count("T").expect("count"), 49);
    assert_eq!(value_of(&store, 7, "n"), Some(Value::from("seven")));
    assert_eq!(value_of(&store, 8, "n"), None);
    assert_eq!(value_of(&store, 49, "n"), Some(Value::from(49)));
    assert_eq!(store.digest(), digest);
    assert!(store.verify_digest().expect("verify"));
    assert_eq!(store.log_head(), head);
    assert_eq!(store.log_after(0, 100).expect("log").len(), 52);

    // Put back once: more writes, another cut, and nothing is applied twice.
    store
        .write(|tx| tx.set("T", 9, "n", "nine"))
        .expect("update");
    crash(store, &db, &wal);
    let store = open(&db, &wal, 16 << 20);
    assert_eq!(store.count("T").expect("count"), 49);
    assert_eq!(value_of(&store, 9, "n"), Some(Value::from("nine")));
    assert_eq!(store.log_after(0, 100).expect("log").len(), 53);
    assert!(store.verify_digest().expect("verify"));
    // New writes continue the log and the clock.
    let (_, c) = store
        .write(|tx| tx.set("T", 10, "n", "ten"))
        .expect("update");
    assert_eq!(c.seq, Some(54));
}

#[test]
fn commits_survive_many_checkpoints_and_a_cut_between_them() {
    let (db, wal) = (SimDisk::new(), SimDisk::new());
    // A tiny file: a checkpoint every few commits, the file rewritten from its start.
    let store = open(&db, &wal, 4096);
    for i in 0..300i64 {
        store
            .write(|tx| {
                if i < 20 {
                    tx.insert("T", i, [("n", Value::from(i)), ("s", Value::from("x"))])
                } else {
                    tx.set("T", i % 20, "n", i)
                }
            })
            .expect("write");
    }
    let digest = store.digest();
    crash(store, &db, &wal);
    let store = open(&db, &wal, 4096);
    assert_eq!(store.digest(), digest);
    assert!(store.verify_digest().expect("verify"));
    for k in 0..20i64 {
        assert_eq!(value_of(&store, k, "n"), Some(Value::from(280 + k)));
    }
    assert_eq!(store.log_after(0, 1000).expect("log").len(), 300);
}

#[test]
fn a_deferred_commit_is_durable_with_the_next_immediate_one_and_lost_alone_otherwise() {
    let (db, wal) = (SimDisk::new(), SimDisk::new());
    let store = open(&db, &wal, 16 << 20);
    let deferred = |store: &Store, pk: i64| {
        let mut tx = store.begin().expect("begin");
        tx.set_durability(Durability::Deferred);
        tx.insert("T", pk, [("n", Value::from(pk))])
            .expect("insert");
        tx.commit().expect("commit");
    };
    deferred(&store, 1);
    store
        .write(|tx| tx.insert("T", 2, [("n", Value::from(2))]))
        .expect("immediate");
    deferred(&store, 3);
    crash(store, &db, &wal);
    let store = open(&db, &wal, 16 << 20);
    assert_eq!(value_of(&store, 1, "n"), Some(Value::from(1)));
    assert_eq!(value_of(&store, 2, "n"), Some(Value::from(2)));
    assert_eq!(value_of(&store, 3, "n"), None, "never synced");
    assert!(store.verify_digest().expect("verify"));
    // Its log position is reused by the next commit: the log stays contiguous.
    let (_, c) = store
        .write(|tx| tx.insert("T", 4, [("n", Value::from(4))]))
        .expect("insert");
    assert_eq!(c.seq, Some(3));
}

#[test]
fn a_large_transaction_commits_to_the_database_and_keeps_order_with_the_file() {
    let (db, wal) = (SimDisk::new(), SimDisk::new());
    let store = open(&db, &wal, 64 << 10);
    store
        .write(|tx| tx.insert("T", 1, [("n", Value::from(1))]))
        .expect("small");
    // 40 KiB: over a quarter of the file, so a durable redb commit.
    store
        .write(|tx| {
            for i in 100..140i64 {
                tx.insert("T", i, [("b", Value::Bytes(vec![i as u8; 1000]))])?;
            }
            Ok(())
        })
        .expect("large");
    store
        .write(|tx| tx.set("T", 1, "n", 2))
        .expect("small again");
    store
        .write(|tx| tx.set("T", 100, "b", "replaced"))
        .expect("small after large");
    let digest = store.digest();
    crash(store, &db, &wal);
    let store = open(&db, &wal, 64 << 10);
    assert_eq!(store.digest(), digest);
    assert_eq!(value_of(&store, 1, "n"), Some(Value::from(2)));
    assert_eq!(value_of(&store, 100, "b"), Some(Value::from("replaced")));
    assert_eq!(store.count("T").expect("count"), 41);
    assert_eq!(store.log_after(0, 10).expect("log").len(), 4);
}

#[test]
fn a_torn_record_is_an_unacknowledged_tail() {
    let (db, wal) = (SimDisk::new(), SimDisk::new());
    let store = open(&db, &wal, 16 << 20);
    store
        .write(|tx| tx.insert("T", 1, [("n", Value::from(1))]))
        .expect("insert");
    let durable = wal.durable_image();
    store.write(|tx| tx.set("T", 1, "n", 2)).expect("update");
    let live = wal.live_image();
    crash(store, &db, &wal);
    // The second record cut 30 bytes in: the database opens with the first only.
    let second = (0..live.len())
        .find(|&i| durable.get(i) != Some(&live[i]))
        .expect("a second record");
    let mut torn = live.clone();
    for b in &mut torn[second + 30..] {
        *b = 0;
    }
    let store = open(&db, &SimDisk::from_image(torn), 16 << 20);
    assert_eq!(value_of(&store, 1, "n"), Some(Value::from(1)));
    assert!(store.verify_digest().expect("verify"));
    assert_eq!(store.log_head(), 1);
}

#[test]
fn a_write_ahead_file_from_another_store_is_not_replayed() {
    let (db, wal) = (SimDisk::new(), SimDisk::new());
    let store = open(&db, &wal, 16 << 20);
    store
        .write(|tx| tx.insert("T", 1, [("n", Value::from(1))]))
        .expect("insert");
    crash(store, &db, &wal);
    // The file stays; the database is replaced by a new one.
    let fresh = SimDisk::new();
    let store = open(&fresh, &wal, 16 << 20);
    assert_eq!(store.count("T").expect("count"), 0);
    assert_eq!(store.log_head(), 0);
    store
        .write(|tx| tx.insert("T", 5, [("n", Value::from(5))]))
        .expect("insert");
    crash(store, &fresh, &wal);
    let store = open(&fresh, &wal, 16 << 20);
    assert_eq!(store.count("T").expect("count"), 1);
    assert_eq!(value_of(&store, 5, "n"), Some(Value::from(5)));
}

#[test]
fn files_on_disk_reopen_with_their_write_ahead_file() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("s.redb");
    {
        let store = Store::open(&path).expect("open");
        for i in 0..10i64 {
            store
                .write(|tx| tx.insert("T", i, [("n", Value::from(i))]))
                .expect("insert");
        }
        // Dropped without close: the commits may be only in the write-ahead file.
    }
    assert!(dir.path().join("s.redb-wal").exists());
    let store = Store::open(&path).expect("reopen");
    assert_eq!(store.count("T").expect("count"), 10);
    assert!(store.verify_digest().expect("verify"));
    store
        .write(|tx| tx.set("T", 3, "n", "three"))
        .expect("update");
    let wal = dir.path().join("s.redb-wal");
    assert!(std::fs::metadata(&wal).expect("wal").len() > 0);
    store.checkpoint().expect("checkpoint");
    assert_eq!(std::fs::metadata(&wal).expect("wal").len(), 0);
    store
        .write(|tx| tx.set("T", 4, "n", "four"))
        .expect("update");
    store.close().expect("close");
    assert_eq!(
        std::fs::metadata(&wal).expect("wal").len(),
        0,
        "close empties it"
    );
    let store = Store::open(&path).expect("reopen after close");
    assert_eq!(store.count("T").expect("count"), 10);
    assert_eq!(value_of(&store, 3, "n"), Some(Value::from("three")));
    assert_eq!(value_of(&store, 4, "n"), Some(Value::from("four")));
}

/// Sets `meta/format` in the database file with redb directly, as another build would.
fn set_format(db: &SimDisk, format: u64) {
    let redb = redb::Database::builder()
        .create_with_backend(db.backend())
        .expect("redb");
    let txn = redb.begin_write().expect("begin");
    {
        let mut meta = txn
            .open_table(redb::TableDefinition::<&str, &[u8]>::new("meta"))
            .expect("meta");
        meta.insert("format", format.to_le_bytes().as_slice())
            .expect("insert");
    }
    txn.commit().expect("commit");
}

#[test]
fn a_newer_format_is_refused_before_its_records_are_replayed() {
    let (db, wal) = (SimDisk::new(), SimDisk::new());
    let store = open(&db, &wal, 16 << 20);
    for i in 0..5i64 {
        store
            .write(|tx| tx.insert("T", i, [("n", Value::from(i)), ("s", Value::from("x"))]))
            .expect("insert");
    }
    // Local updates of live objects: recorded as patches, not rows.
    for i in 0..5i64 {
        store
            .write(|tx| tx.set("T", i, "n", i * 10))
            .expect("update");
    }
    let digest = store.digest();
    crash(store, &db, &wal);
    let wal_bytes = wal.durable_image();

    set_format(&db, 99);
    let err = Store::open_backend_with_wal(db.backend(), wal.backend(), options(16 << 20))
        .expect_err("a newer format");
    assert!(matches!(err, fieldlog::Error::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("format version 99"), "{err}");
    assert_eq!(
        wal.durable_image(),
        wal_bytes,
        "the records are left in place"
    );

    // The build that wrote them replays them.
    set_format(&db, 5);
    let store = open(&db, &wal, 16 << 20);
    assert_eq!(store.digest(), digest);
    assert!(store.verify_digest().expect("verify"));
    for i in 0..5i64 {
        assert_eq!(value_of(&store, i, "n"), Some(Value::from(i * 10)));
        assert_eq!(value_of(&store, i, "s"), Some(Value::from("x")));
    }
}

#[test]
fn concurrent_commits_acknowledged_in_batches_survive_a_power_cut() {
    let (db, wal) = (SimDisk::new(), SimDisk::new());
    let store = open(&db, &wal, 1 << 20);
    for i in 0..8i64 {
        store
            .write(|tx| tx.insert("T", i, [("n", Value::from(0))]))
            .expect("insert");
    }
    let acked = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..8i64 {
            let (store, acked) = (&store, &acked);
            s.spawn(move || {
                for i in 1..=40i64 {
                    // Updates of a live object (patches) and inserts (rows), interleaved.
                    store
                        .write(|tx| {
                            tx.set("T", t, "n", i)?;
                            tx.insert("T", 1000 * (t + 1) + i, [("n", Value::from(i))])
                        })
                        .expect("commit");
                    acked.lock().expect("acked").push((t, i));
                }
            });
        }
    });
    let digest = store.digest();
    crash(store, &db, &wal);
    let store = open(&db, &wal, 1 << 20);
    for (t, i) in acked.lock().expect("acked").iter() {
        assert_eq!(
            value_of(&store, 1000 * (t + 1) + i, "n"),
            Some(Value::from(*i)),
            "acknowledged insert {t}/{i} lost"
        );
    }
    for t in 0..8i64 {
        assert_eq!(value_of(&store, t, "n"), Some(Value::from(40)));
    }
    assert_eq!(store.count("T").expect("count"), 8 + 8 * 40);
    assert_eq!(store.digest(), digest);
    assert!(store.verify_digest().expect("verify"));
    assert_eq!(store.log_after(0, 1000).expect("log").len(), 8 + 8 * 40);
}

#[test]
fn a_large_batch_of_updates_is_recorded_and_a_large_load_is_not() {
    let (db, wal) = (SimDisk::new(), SimDisk::new());
    let store = open(&db, &wal, 16 << 20);
    // 1,000 inserts of ~1 KB objects: ~1 MB of whole rows, over 1/64 of the file — a
    // durable redb commit.
    let syncs = db.syncs();
    store
        .write(|tx| {
            for i in 0..1000i64 {
                tx.insert(
                    "T",
                    i,
                    [("n", Value::from(i)), ("b", Value::Bytes(vec![7; 1000]))],
                )?;
            }
            Ok(())
        })
        .expect("load");
    assert!(db.syncs() > syncs, "the load reached the database file");
    // 1,000 one-field updates of those objects: patches and one log entry (~150 KB) — a
    // record in the write-ahead file, the database file untouched.
    let syncs = db.syncs();
    store
        .write(|tx| {
            for i in 0..1000i64 {
                tx.set("T", i, "n", i + 1)?;
            }
            Ok(())
        })
        .expect("updates");
    assert_eq!(db.syncs(), syncs, "the batch went to the write-ahead file");
    let digest = store.digest();
    crash(store, &db, &wal);
    let store = open(&db, &wal, 16 << 20);
    assert_eq!(store.digest(), digest);
    assert!(store.verify_digest().expect("verify"));
    for i in [0i64, 499, 999] {
        assert_eq!(value_of(&store, i, "n"), Some(Value::from(i + 1)));
    }
}

#[test]
fn a_power_cut_in_the_middle_of_concurrent_batches_loses_nothing_acknowledged() {
    let mut total = 0;
    for (round, cut_after_ms) in [2u64, 5, 9, 14, 20].into_iter().enumerate() {
        let (db, wal) = (SimDisk::new(), SimDisk::new());
        // A small file: checkpoints happen under way as well.
        let store = open(&db, &wal, 64 << 10);
        let acked = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for t in 0..6i64 {
                let (store, acked) = (&store, &acked);
                s.spawn(move || {
                    // Each writer has its own object, then one more object per commit.
                    let mine = 1_000_000 * (t + 1);
                    if store
                        .write(|tx| tx.insert("T", mine, [("n", Value::from(0))]))
                        .is_err()
                    {
                        return;
                    }
                    acked.lock().expect("acked").push((t, 0));
                    for i in 1.. {
                        let r = store.write(|tx| {
                            tx.set("T", mine, "n", i)?;
                            tx.insert("T", mine + i, [("n", Value::from(i))])
                        });
                        if r.is_err() {
                            return; // the disks are gone
                        }
                        acked.lock().expect("acked").push((t, i));
                    }
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(cut_after_ms));
            db.crash();
            wal.crash();
        });
        drop(store);
        let store = open(&db, &wal, 64 << 10);
        let acked = acked.into_inner().expect("acked");
        total += acked.len();
        let mut last = BTreeMap::new();
        for &(t, i) in &acked {
            let mine = 1_000_000 * (t + 1);
            if i > 0 {
                assert_eq!(
                    value_of(&store, mine + i, "n"),
                    Some(Value::from(i)),
                    "round {round}: acknowledged insert {t}/{i} lost"
                );
            }
            last.insert(t, i);
        }
        for (t, i) in last {
            // At least the last acknowledged value (a commit in flight at the cut may be there too).
            let Some(Value::Int(n)) = value_of(&store, 1_000_000 * (t + 1), "n") else {
                panic!("round {round}: writer {t}'s object lost");
            };
            assert!(n >= i, "round {round}: writer {t} at {n}, acknowledged {i}");
        }
        assert!(store.verify_digest().expect("verify"), "round {round}");
        // The log is contiguous and replays to the same state: no partial transaction.
        let log = store.log_after(0, 1_000_000).expect("log");
        for (k, e) in log.iter().enumerate() {
            assert_eq!(e.seq, k as u64 + 1, "round {round}: log gap");
        }
        eprintln!(
            "power cut round {round}: {} acknowledged, {} in the log",
            acked.len(),
            log.len()
        );
    }
    assert!(total > 0, "no round acknowledged anything before its cut");
}

#[test]
fn merged_remote_updates_are_recorded_as_patches_and_survive_a_power_cut() {
    use fieldlog::ManualTimeSource;
    use std::sync::Arc;
    let clock = ManualTimeSource::new(1_700_000_000_000);
    let timed = |checkpoint_bytes| options(checkpoint_bytes).time(Arc::new(clock.clone()));
    let a = Store::open_backend(redb::backends::InMemoryBackend::new(), timed(0)).expect("a");
    let (db, wal) = (SimDisk::new(), SimDisk::new());
    let open_b =
        || Store::open_backend_with_wal(db.backend(), wal.backend(), timed(16 << 20)).expect("b");
    let b = open_b();
    a.write(|tx| {
        for i in 0..3i64 {
            tx.insert("T", i, [("x", Value::from(0)), ("y", Value::from(0))])?;
        }
        Ok(())
    })
    .expect("insert");
    b.import(&a.export(0, usize::MAX).expect("export"))
        .expect("import the inserts");
    let after_inserts = a.log_head();

    // Three transactions on A over the same objects (so several stamps per row, and `x`
    // of object 0 written twice), and one newer local write on B that A's `y` must not beat.
    for t in 0..3i64 {
        clock.advance(5);
        a.write(|tx| {
            tx.set("T", 0, "x", 10 + t)?;
            tx.set("T", t, "z", format!("z{t}"))
        })
        .expect("update a");
    }
    clock.advance(5);
    a.write(|tx| tx.set("T", 1, "y", "from a")).expect("y on a");
    clock.advance(5);
    b.write(|tx| tx.set("T", 1, "y", "from b")).expect("y on b");

    let syncs = db.syncs();
    let report = b
        .import(&a.export(after_inserts, usize::MAX).expect("export"))
        .expect("import the updates");
    assert_eq!((report.applied, report.stale), (6, 1), "{report:?}");
    assert_eq!(db.syncs(), syncs, "the import went to the write-ahead file");
    // The same changeset again changes nothing.
    let digest = b.digest();
    let again = b
        .import(&a.export(after_inserts, usize::MAX).expect("export"))
        .expect("import again");
    assert_eq!((again.applied, again.stale), (0, 7));
    assert_eq!(b.digest(), digest);

    crash(b, &db, &wal);
    let b = open_b();
    assert_eq!(b.digest(), digest);
    assert!(b.verify_digest().expect("verify"));
    let field = |pk: i64, f: &str| b.get("T", pk).expect("get").and_then(|o| o.get(f).cloned());
    assert_eq!(field(0, "x"), Some(Value::from(12)));
    assert_eq!(field(1, "y"), Some(Value::from("from b")));
    for t in 0..3i64 {
        assert_eq!(field(t, "z"), Some(Value::from(format!("z{t}"))));
    }
    assert_eq!(field(2, "x"), Some(Value::from(0)));
}

/// Format 5 keeps the log position, clock, record number and digest in one `head` row; a
/// format-4 store (four rows) opens with them, and is upgraded.
#[test]
fn a_format_4_store_opens_with_its_log_position_clock_and_digest() {
    let (db, wal) = (SimDisk::new(), SimDisk::new());
    let store = open(&db, &wal, 16 << 20);
    for i in 0..3i64 {
        store
            .write(|tx| tx.insert("T", i, [("n", Value::from(i))]))
            .expect("insert");
    }
    let (digest, head) = (store.digest(), store.log_head());
    store.close().expect("close");

    // Rewrite the meta table as format 4 left it.
    let meta_def = redb::TableDefinition::<&str, &[u8]>::new("meta");
    {
        let redb = redb::Database::builder()
            .create_with_backend(db.backend())
            .expect("redb");
        let txn = redb.begin_write().expect("begin");
        {
            let mut meta = txn.open_table(meta_def).expect("meta");
            let row = meta
                .remove("head")
                .expect("remove")
                .map(|r| r.value().to_vec())
                .expect("a head row");
            assert_eq!(row.len(), 56);
            meta.insert("log_next", &row[..8]).expect("insert");
            meta.insert("hlc", &row[8..16]).expect("insert");
            meta.insert("wal_seq", &row[16..24]).expect("insert");
            meta.insert("digest", &row[24..]).expect("insert");
            meta.insert("format", 4u64.to_le_bytes().as_slice())
                .expect("insert");
        }
        txn.commit().expect("commit");
    }

    let store = open(&db, &wal, 16 << 20);
    assert_eq!(store.digest(), digest);
    assert_eq!(store.log_head(), head);
    assert!(store.verify_digest().expect("verify"));
    store
        .write(|tx| tx.set("T", 1, "n", "one"))
        .expect("update");
    assert_eq!(store.log_head(), head + 1);
    let digest = store.digest();
    crash(store, &db, &wal);
    let store = open(&db, &wal, 16 << 20);
    assert_eq!(store.digest(), digest);
    assert_eq!(store.log_head(), head + 1);
    assert_eq!(value_of(&store, 1, "n"), Some(Value::from("one")));
    store.close().expect("close");

    // Upgraded: one row, and the four it replaced are gone.
    let redb = redb::Database::builder()
        .create_with_backend(db.backend())
        .expect("redb");
    let rtx = redb.begin_read().expect("read");
    let meta = rtx.open_table(meta_def).expect("meta");
    assert!(meta.get("head").expect("get").is_some());
    for old in ["log_next", "hlc", "wal_seq", "digest"] {
        assert!(meta.get(old).expect("get").is_none(), "{old} left behind");
    }
    let format = meta.get("format").expect("get").expect("format");
    assert_eq!(format.value(), 8u64.to_le_bytes().as_slice());
}
