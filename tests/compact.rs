//! `Store::compact` gives space back and changes nothing a user can see: the same objects,
//! log, digest and clock, and the store keeps working (and syncing from where it was).

use fieldlog::{Store, Value};

fn file_len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).expect("metadata").len()
}

#[test]
fn compact_shrinks_the_file_and_keeps_everything() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("c.redb");
    let mut store = Store::open(&path).expect("open");
    let blob = "x".repeat(200);
    for batch in 0..20i64 {
        store
            .write(|tx| {
                for i in 0..100i64 {
                    let pk = batch * 100 + i;
                    tx.insert(
                        "T",
                        pk,
                        [("a", Value::from(pk)), ("b", Value::from(blob.as_str()))],
                    )?;
                }
                Ok(())
            })
            .expect("insert");
    }
    for round in 0..5i64 {
        store
            .write(|tx| {
                for pk in (round..2000).step_by(7) {
                    tx.set("T", pk, "a", round)?;
                }
                Ok(())
            })
            .expect("update");
    }
    store.write(|tx| tx.delete("T", 5)).expect("delete");
    let head = store.log_head();
    store.mark_synced(head - 3).expect("mark");
    store.prune_log(head - 3).expect("prune");

    let objects = store.scan("T").expect("scan");
    let log = store.log_after(0, 1000).expect("log");
    let digest = store.digest();
    store.checkpoint().expect("checkpoint");
    let before = file_len(&path);

    store.compact().expect("compact");
    let after = file_len(&path);
    assert!(after < before / 2, "{before} bytes before, {after} after");
    assert_eq!(store.scan("T").expect("scan"), objects);
    assert_eq!(store.log_after(0, 1000).expect("log"), log);
    assert_eq!(log.len(), 3);
    assert_eq!(store.digest(), digest);
    assert!(store.verify_digest().expect("verify"));
    assert_eq!(store.last_sync(), head - 3);

    // Writes continue the log; a reopen sees everything.
    let (_, c) = store
        .write(|tx| tx.set("T", 1, "a", "after"))
        .expect("write after compact");
    assert_eq!(c.seq, Some(head + 1));
    drop(store);
    let store = Store::open(&path).expect("reopen");
    assert_eq!(store.count("T").expect("count"), 1999);
    assert_eq!(
        store
            .get("T", 1)
            .expect("get")
            .and_then(|o| o.get("a").cloned()),
        Some(Value::from("after"))
    );
    assert!(store.verify_digest().expect("verify"));
}
