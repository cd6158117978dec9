//! `Store::get` keeps one read snapshot between commits (`src/snapshot.rs`). These guard
//! the two ways that could go wrong: a read after a commit returned must see it, in the
//! committing thread and in any other thread told of it; and the kept snapshot must not
//! hold redb's pages (the file would grow under a stream of commits) or keep `compact`
//! from running.

use std::sync::mpsc;
use std::sync::Arc;

use fieldlog::{Durability, Options, Store, Value};

fn version(store: &Store, pk: i64) -> Option<Value> {
    store
        .get("T", pk)
        .expect("get")
        .and_then(|o| o.get("v").cloned())
}

#[test]
fn a_get_after_a_commit_sees_it_in_this_thread_and_another() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Arc::new(Store::open(dir.path().join("s.redb")).expect("open"));
    store
        .write(|tx| tx.insert("T", 1, [("v", 0i64)]))
        .expect("insert");
    let (tell, told) = mpsc::channel::<i64>();
    let (ack, acked) = mpsc::channel::<()>();
    let reader = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            // Reads without pause between the commits keep a snapshot in use; each read
            // after a commit it was told of must see that commit.
            loop {
                match told.try_recv() {
                    Ok(v) => {
                        assert_eq!(version(&store, 1), Some(Value::Int(v)), "stale read");
                        ack.send(()).expect("ack");
                    }
                    Err(mpsc::TryRecvError::Empty) => {
                        version(&store, 1);
                    }
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
        })
    };
    for v in 1..=300i64 {
        store.write(|tx| tx.set("T", 1, "v", v)).expect("set");
        assert_eq!(version(&store, 1), Some(Value::Int(v)), "own write unseen");
        tell.send(v).expect("tell");
        acked.recv().expect("reader alive");
    }
    drop(tell);
    reader.join().expect("reader");
    // Deletes and inserts too: a deleted object is gone at once, a new one there at once.
    store.write(|tx| tx.delete("T", 1)).expect("delete");
    assert_eq!(store.get("T", 1).expect("get"), None);
    store
        .write(|tx| tx.insert("T", 2, [("v", 7i64)]))
        .expect("insert");
    assert_eq!(version(&store, 2), Some(Value::Int(7)));
}

/// Loads 200 objects, then rewrites them all 50 times; with `read_first` a `get` comes
/// between the load and the rewrites (and none after it, so nothing refreshes the snapshot
/// it leaves).
fn file_after_rewrites(dir: &std::path::Path, name: &str, read_first: bool) -> u64 {
    let path = dir.join(name);
    let opts = Options::default()
        .checkpoint_bytes(0)
        .durability(Durability::Immediate);
    let store = Store::open_with(&path, opts).expect("open");
    let blob = "x".repeat(500);
    store
        .write(|tx| {
            for pk in 0..200i64 {
                tx.insert(
                    "T",
                    pk,
                    [("v", Value::from(0i64)), ("b", blob.as_str().into())],
                )?;
            }
            Ok(())
        })
        .expect("load");
    if read_first {
        assert!(store.get("T", 1).expect("get").is_some());
    }
    for round in 1..=50i64 {
        store
            .write(|tx| {
                for pk in 0..200i64 {
                    tx.set("T", pk, "v", round)?;
                }
                Ok(())
            })
            .expect("rewrite");
    }
    store.close().expect("close");
    std::fs::metadata(&path).expect("metadata").len()
}

#[test]
fn a_kept_snapshot_does_not_make_the_file_grow() {
    let dir = tempfile::tempdir().expect("dir");
    let without = file_after_rewrites(dir.path(), "without.redb", false);
    let with = file_after_rewrites(dir.path(), "with.redb", true);
    // A snapshot pinned across the 50 commits would keep every page they freed: ~50 times
    // the objects' pages.
    assert!(
        with <= without + without / 4,
        "{with} bytes with a read before the commits, {without} without"
    );
}

#[test]
fn compact_runs_after_reads() {
    let dir = tempfile::tempdir().expect("dir");
    let mut store = Store::open(dir.path().join("c.redb")).expect("open");
    store
        .write(|tx| tx.insert("T", 1, [("v", 1i64)]))
        .expect("insert");
    assert_eq!(version(&store, 1), Some(Value::Int(1)));
    store.compact().expect("compact with a snapshot kept");
    assert_eq!(version(&store, 1), Some(Value::Int(1)));
}
