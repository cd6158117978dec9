//! Group commit (invariant 3 under concurrency): concurrent durable writers share fsyncs,
//! every write that returned `Ok` is in the durable image, and a failed flush fails every
//! caller it would have covered. With a write-ahead file, every read sees every commit that
//! returned, though its redb batch is committed only when a read needs it.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fieldlog::{Options, Store, Value};
use redb::StorageBackend;

/// A file of bytes in memory that also keeps the image as of the last `sync_data`.
#[derive(Debug, Default)]
struct Disk {
    live: Mutex<Vec<u8>>,
    durable: Mutex<Vec<u8>>,
    syncs: AtomicU64,
    fail_syncs: AtomicBool,
}

#[derive(Debug, Clone)]
struct Backend(Arc<Disk>);

impl StorageBackend for Backend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.0.live.lock().unwrap().len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let live = self.0.live.lock().unwrap();
        let start = offset as usize;
        let src = live
            .get(start..start + out.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past end"))?;
        out.copy_from_slice(src);
        Ok(())
    }
    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.0.live.lock().unwrap().resize(len as usize, 0);
        Ok(())
    }
    fn sync_data(&self) -> Result<(), io::Error> {
        if self.0.fail_syncs.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected fsync failure"));
        }
        self.0.syncs.fetch_add(1, Ordering::SeqCst);
        *self.0.durable.lock().unwrap() = self.0.live.lock().unwrap().clone();
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut live = self.0.live.lock().unwrap();
        let end = offset as usize + data.len();
        if live.len() < end {
            live.resize(end, 0);
        }
        live[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
}

/// Opens the durable image as a store of its own.
fn reopen_durable(disk: &Disk) -> Store {
    let image = Arc::new(Disk::default());
    *image.live.lock().unwrap() = disk.durable.lock().unwrap().clone();
    Store::open_backend(Backend(image), Options::default()).unwrap()
}

#[test]
fn concurrent_durable_writers_share_fsyncs_and_lose_nothing() {
    let disk = Arc::new(Disk::default());
    let store =
        Arc::new(Store::open_backend(Backend(Arc::clone(&disk)), Options::default()).unwrap());
    let (threads, each) = (8u64, 40u64);
    let syncs_before = disk.syncs.load(Ordering::SeqCst);
    let acked = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for t in 0..threads {
            let (store, acked) = (Arc::clone(&store), Arc::clone(&acked));
            s.spawn(move || {
                for i in 0..each {
                    let pk = (t * 1000 + i) as i64;
                    store
                        .write(|tx| {
                            // Held a moment, so that the others queue behind it even on a
                            // loaded machine: the grouping is what is tested.
                            std::thread::sleep(std::time::Duration::from_micros(200));
                            tx.insert("W", pk, [("v", Value::from(pk))])
                        })
                        .unwrap();
                    acked.lock().unwrap().push(pk);
                }
            });
        }
    });
    let commits = threads * each;
    let syncs = disk.syncs.load(Ordering::SeqCst) - syncs_before;
    eprintln!("group commit: {commits} durable commits, {syncs} fsyncs");
    assert!(
        syncs < commits,
        "{syncs} fsyncs for {commits} commits: no grouping"
    );
    // Everything acknowledged is in the image as of the last fsync.
    let image = reopen_durable(&disk);
    for pk in acked.lock().unwrap().iter() {
        assert_eq!(
            image.get_field("W", *pk, "v").unwrap().map(|v| v.0),
            Some(Value::from(*pk)),
            "{pk}"
        );
    }
    assert_eq!(image.count("W").unwrap(), commits);
}

#[test]
fn a_failed_flush_fails_its_callers_and_poisons_the_store() {
    let disk = Arc::new(Disk::default());
    let store =
        Arc::new(Store::open_backend(Backend(Arc::clone(&disk)), Options::default()).unwrap());
    store
        .write(|tx| tx.insert("W", 0, [("v", Value::from(0))]))
        .unwrap();
    disk.fail_syncs.store(true, Ordering::SeqCst);
    let results = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for t in 1..=8i64 {
            let (store, results) = (Arc::clone(&store), Arc::clone(&results));
            s.spawn(move || {
                let r = store.write(|tx| tx.insert("W", t, [("v", Value::from(t))]));
                results.lock().unwrap().push((t, r.is_ok()));
            });
        }
    });
    disk.fail_syncs.store(false, Ordering::SeqCst);
    let results = results.lock().unwrap().clone();
    assert!(
        results.iter().all(|(_, ok)| !ok),
        "every caller failed: {results:?}"
    );
    assert!(matches!(
        store.write(|tx| tx.insert("W", 99, [("v", Value::from(1))])),
        Err(fieldlog::Error::Poisoned)
    ));
    // After reopening, only what was durable is there: the first write.
    let image = reopen_durable(&disk);
    assert_eq!(image.count("W").unwrap(), 1);
}

/// With a write-ahead file a commit returns before its redb batch is committed (the next
/// read commits it). Every read, on any thread, sees every commit that returned before it
/// began, while other writers keep joining the batch: a writer reads back what it just
/// wrote, and a reader that learned a commit returned never reads an older value.
#[test]
fn every_read_sees_every_commit_that_returned_while_writers_keep_joining() {
    use std::sync::atomic::AtomicI64;
    const WRITERS: usize = 4;
    const ROUNDS: i64 = 150;
    let dir = tempfile::tempdir().expect("dir");
    let store = Store::open(dir.path().join("s.redb")).expect("open");
    let n = |store: &Store, w: usize| -> i64 {
        match store
            .get("T", w as i64)
            .expect("get")
            .and_then(|o| o.get("n").cloned())
        {
            Some(Value::Int(n)) => n,
            other => panic!("T/{w}: {other:?}"),
        }
    };
    for w in 0..WRITERS {
        store
            .write(|tx| tx.insert("T", w as i64, [("n", 0)]))
            .expect("insert");
    }
    let returned: Vec<AtomicI64> = (0..WRITERS).map(|_| AtomicI64::new(0)).collect();
    let done = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (store, returned) = (&store, &returned);
                s.spawn(move || {
                    for i in 1..=ROUNDS {
                        store
                            .write(|tx| tx.set("T", w as i64, "n", i))
                            .expect("set");
                        returned[w].store(i, Ordering::SeqCst);
                        assert_eq!(n(store, w), i, "writer {w} did not read back its commit");
                    }
                })
            })
            .collect();
        for _ in 0..2 {
            let (store, returned, done, reads) = (&store, &returned, &done, &reads);
            s.spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    for (w, r) in returned.iter().enumerate() {
                        let at_least = r.load(Ordering::SeqCst);
                        let seen = n(store, w);
                        assert!(
                            seen >= at_least,
                            "T/{w}: read {seen} after the commit of {at_least} returned"
                        );
                        reads.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
        // The readers stop even if a writer failed.
        let failed = writers.into_iter().any(|w| w.join().is_err());
        done.store(true, Ordering::SeqCst);
        assert!(!failed, "a writer failed");
    });
    assert!(reads.load(Ordering::SeqCst) > 0);
    for w in 0..WRITERS {
        assert_eq!(n(&store, w), ROUNDS);
    }
    assert!(store.verify_digest().expect("verify"));
}
