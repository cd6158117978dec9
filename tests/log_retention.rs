//! `Options::keep_acknowledged_for`: acknowledging a log position removes the entries
//! acknowledged longer ago than the window, and no other (a syncing client over TCP:
//! `sync_tcp.rs`).

use std::sync::Arc;
use std::time::Duration;

use fieldlog::{ManualTimeSource, Options, Store, Value};

const T0_MS: u64 = 1_700_000_000_000;
const MINUTE_MS: u64 = 60_000;

fn options(time: &ManualTimeSource, keep: Option<Duration>) -> Options {
    Options::default()
        .time(Arc::new(time.clone()))
        .keep_acknowledged_for(keep)
}

fn positions(store: &Store) -> Vec<u64> {
    store
        .log_after(0, usize::MAX)
        .expect("log")
        .iter()
        .map(|e| e.seq)
        .collect()
}

fn write(store: &Store, pk: i64) {
    store
        .write(|tx| tx.insert("Item", pk, [("n", Value::from(pk))]))
        .expect("write");
}

#[test]
fn acknowledged_entries_leave_the_log_once_older_than_the_window() {
    let dir = tempfile::tempdir().expect("tempdir");
    let time = ManualTimeSource::new(T0_MS);
    let path = dir.path().join("c.redb");
    let store =
        Store::open_with(&path, options(&time, Some(Duration::from_secs(3600)))).expect("open");
    // The same writes in a store that keeps everything: the objects must not differ.
    let all = Store::open_in_memory().expect("open");
    let both = |pk: i64| {
        write(&store, pk);
        write(&all, pk);
    };
    // An acknowledgement moves the position and may shorten the log; nothing else.
    let ack = |pos: u64| {
        let digest = store.digest();
        store.mark_synced(pos).expect("mark_synced");
        assert_eq!(
            store.digest(),
            digest,
            "mark_synced({pos}) changed the state"
        );
    };
    both(1);
    time.advance(10 * MINUTE_MS);
    both(2);
    time.advance(120 * MINUTE_MS);
    both(3);

    // Entry 2 is old enough but not acknowledged: it stays.
    ack(1);
    assert_eq!(positions(&store), [2, 3]);
    // Entry 3 is acknowledged but written a moment ago: it stays.
    ack(3);
    assert_eq!(positions(&store), [3]);
    assert_eq!(store.last_sync(), 3);
    assert!(store.unsynced(usize::MAX).expect("unsynced").is_empty());

    // Nothing is removed until an acknowledgement moves the position.
    time.advance(120 * MINUTE_MS);
    ack(3);
    assert_eq!(positions(&store), [3]);
    both(4);
    assert_eq!(store.unsynced(usize::MAX).expect("unsynced").len(), 1);
    ack(4);
    assert_eq!(positions(&store), [4]);

    assert_eq!(
        store.scan("Item").expect("scan"),
        all.scan("Item").expect("scan")
    );
    assert!(store.verify_digest().expect("verify_digest"));
    assert_eq!(store.log_head(), 4);
    store.close().expect("close");
    let store =
        Store::open_with(&path, options(&time, Some(Duration::from_secs(3600)))).expect("reopen");
    assert_eq!(positions(&store), [4]);
    assert_eq!((store.last_sync(), store.log_head()), (4, 4));
    assert_eq!(
        store.scan("Item").expect("scan"),
        all.scan("Item").expect("scan")
    );
    // New writes continue the positions.
    write(&store, 5);
    assert_eq!(positions(&store), [4, 5]);
}

#[test]
fn zero_keeps_no_acknowledged_entry_and_none_keeps_every_one() {
    let time = ManualTimeSource::new(T0_MS);
    for (keep, left) in [
        (Some(Duration::ZERO), vec![3]),
        (None, vec![1, 2, 3]),
        (Some(Duration::from_secs(60)), vec![1, 2, 3]),
    ] {
        let store =
            Store::open_backend(redb::backends::InMemoryBackend::new(), options(&time, keep))
                .expect("open");
        for pk in 1..=3 {
            write(&store, pk);
        }
        store.mark_synced(2).expect("mark_synced");
        assert_eq!(positions(&store), left, "keep {keep:?}");
        assert_eq!(store.unsynced(usize::MAX).expect("unsynced").len(), 1);
        // `prune_log` still removes what the application asks for, up to the position.
        store.prune_log(u64::MAX).expect("prune_log");
        assert_eq!(positions(&store), [3], "keep {keep:?}");
    }
}
