//! A store poisoned by a storage failure recovers by itself once the fault clears
//! (`Options::recover_after`): it opens its database again and replays its write-ahead file,
//! as opening it does, so nothing acknowledged is lost. A sync server on such a store
//! answers uploads with a transient error (500) while its disk fails, and serves clients
//! again, without a restart, once it works. The disks are the simulated ones of the fault
//! tests (`fuzz/src/disk.rs`), behind a switch that makes writes fail (a full disk) or
//! syncs fail.

#[path = "../fuzz/src/disk.rs"]
#[allow(dead_code)]
mod disk;

mod support;

use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use disk::{SimBackend, SimDisk};
use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::net::{ClientHooks, ServerHandle, SyncClient, Transport};
use fieldlog::sync::protocol::{ErrorCode, ServerMsg};
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::Secret;
use fieldlog::{Error, ManualTimeSource, Options, Pk, ReplicaId, Store, Value};
use redb::StorageBackend;
use support::{entry, hello, insert, token_for, upload, Raw};

const WAIT: Duration = Duration::from_secs(60);

/// The disk works.
const WORKS: u8 = 0;
/// Writes and growth fail, as on a full disk (`ENOSPC`), and nothing is written.
const FULL: u8 = 1;
/// Writes land, but every sync fails (`EIO`) and makes nothing durable.
const SYNCS_FAIL: u8 = 2;

/// The switch shared by a store's disks.
#[derive(Debug, Default)]
struct Fault {
    mode: AtomicU8,
    /// Operations failed so far.
    failed: AtomicU64,
}

impl Fault {
    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    fn fail(&self, mode: u8) -> Option<io::Error> {
        if self.mode.load(Ordering::SeqCst) != mode {
            return None;
        }
        self.failed.fetch_add(1, Ordering::SeqCst);
        Some(io::Error::from_raw_os_error(if mode == FULL {
            28
        } else {
            5
        }))
    }
}

/// A simulated disk behind the switch.
#[derive(Debug)]
struct Flaky {
    inner: SimBackend,
    fault: Arc<Fault>,
}

impl StorageBackend for Flaky {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        match self.fault.fail(FULL) {
            Some(e) => Err(e),
            None => self.inner.set_len(len),
        }
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        match self.fault.fail(SYNCS_FAIL) {
            Some(e) => Err(e),
            None => self.inner.sync_data(),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        match self.fault.fail(FULL) {
            Some(e) => Err(e),
            None => self.inner.write(offset, data),
        }
    }
}

/// A database disk and a write-ahead disk behind one switch.
struct Disks {
    db: SimDisk,
    wal: SimDisk,
    fault: Arc<Fault>,
}

impl Disks {
    fn new() -> Disks {
        Disks {
            db: SimDisk::new(),
            wal: SimDisk::new(),
            fault: Arc::new(Fault::default()),
        }
    }

    fn open(&self, options: Options) -> Store {
        let flaky = |d: &SimDisk| Flaky {
            inner: d.backend(),
            fault: Arc::clone(&self.fault),
        };
        Store::open_backend_with_wal(flaky(&self.db), flaky(&self.wal), options).expect("open")
    }

    /// A power cut: each disk keeps what its last sync made durable.
    fn crash(&self) {
        self.db.crash();
        self.wal.crash();
    }
}

fn quick_recovery() -> Options {
    Options::default().recover_after(Some(Duration::from_millis(20)))
}

/// Events the store logs, captured on this thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<(tracing::Level, String)>>>);

struct Message<'a>(&'a mut String);

impl tracing::field::Visit for Message<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        let _ = write!(self.0, "{}={value:?} ", field.name());
    }
}

impl tracing::Subscriber for Captured {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut text = String::new();
        event.record(&mut Message(&mut text));
        let level = *event.metadata().level();
        self.0.lock().expect("events").push((level, text));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Poisoned by a full disk, a store refuses writes (and, once an attempt to recover has
/// failed, reads) while the disk is full; once it has room again and the wait has passed,
/// the next call recovers it, and every commit that returned `Ok` is there — in the
/// recovered store and after a power cut. The failure, the failed attempts and the
/// recovery are logged.
#[test]
fn a_store_recovers_once_its_disk_has_room_and_logs_it() {
    let captured = Captured::default();
    tracing::subscriber::with_default(captured.clone(), || {
        let disks = Disks::new();
        let time = ManualTimeSource::new(1_700_000_000_000);
        let options = Options::default()
            .time(Arc::new(time.clone()))
            .recover_after(Some(Duration::from_secs(1)));
        let store = disks.open(options.clone());
        let mut acked = Vec::new();
        for i in 0..5i64 {
            store
                .write(|tx| tx.insert("A", i, [("n", i)]))
                .expect("write");
            acked.push(i);
        }
        disks.fault.set(FULL);
        let e = store
            .write(|tx| tx.insert("A", 100, [("n", 100)]))
            .expect_err("a full disk");
        assert!(matches!(e, Error::Storage(_)), "{e:?}");
        // Refused, also once the wait has passed while the disk is still full (a failed
        // attempt: the store has no database until the next one).
        for _ in 0..3 {
            time.advance(1_500);
            let e = store
                .write(|tx| tx.insert("A", 101, [("n", 101)]))
                .expect_err("still full");
            assert!(matches!(e, Error::Poisoned), "{e:?}");
        }
        assert!(matches!(store.get("A", 0), Err(Error::Poisoned)));
        disks.fault.set(WORKS);
        // The last failed attempt doubled the wait: not due yet.
        assert!(matches!(
            store.write(|tx| tx.insert("A", 102, [("n", 102)])),
            Err(Error::Poisoned)
        ));
        time.advance(10_000);
        store
            .write(|tx| tx.insert("A", 5, [("n", 5)]))
            .expect("recovered");
        acked.push(5);
        let present: Vec<Pk> = store
            .scan("A")
            .expect("scan")
            .into_iter()
            .map(|o| o.pk)
            .collect();
        let want: Vec<Pk> = acked.iter().map(|&i| Pk::Int(i)).collect();
        assert_eq!(
            present, want,
            "every acknowledged commit, and no refused one"
        );
        assert!(store.verify_digest().expect("verify"));
        drop(store);
        disks.crash();
        let reopened = disks.open(options);
        let present: Vec<Pk> = reopened
            .scan("A")
            .expect("scan")
            .into_iter()
            .map(|o| o.pk)
            .collect();
        assert_eq!(present, want, "after a power cut");
    });
    let events = captured.0.lock().expect("events").clone();
    let has = |level: tracing::Level, text: &str| {
        events.iter().any(|(l, m)| *l == level && m.contains(text))
    };
    assert!(has(tracing::Level::ERROR, "storage failure"), "{events:?}");
    assert!(has(tracing::Level::WARN, "could not recover"), "{events:?}");
    assert!(has(tracing::Level::INFO, "recovered"), "{events:?}");
    assert_eq!(
        events
            .iter()
            .filter(|(l, _)| *l == tracing::Level::ERROR)
            .count(),
        1,
        "the failure is logged once: {events:?}"
    );
}

/// Polls `done` until it holds (a deadline, not a measurement).
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn client(store: &Arc<Store>, addr: &str, token: &str) -> SyncClient {
    SyncClient::start(
        Arc::clone(store),
        Transport::Tcp(addr.to_owned()),
        ClientConfig::new(token.to_owned()),
        ClientHooks::default(),
    )
}

fn has(store: &Store, pk: i64) -> bool {
    store.get("Note", pk).ok().flatten().is_some()
}

/// A new replica's handshake and an upload on a raw connection: the server answers with
/// `Internal` (at the handshake, or at the upload) and closes; it does not panic or hang.
async fn upload_gets_internal_error(addr: &str, token: &str, replica: u64) {
    let device = ReplicaId(replica);
    let mut raw = Raw::connect(addr).await;
    raw.send(&hello(token, device)).await;
    let reply = match raw.next_skipping_downloads().await {
        Some(ServerMsg::Welcome { .. }) => {
            let write = insert("Note", 999, vec![("text", Value::from("raw"))]);
            raw.send(&upload(device, vec![entry(1, device, vec![write])]))
                .await;
            raw.next_skipping_downloads().await
        }
        other => other,
    };
    match reply {
        Some(ServerMsg::Error { code, message }) => {
            assert_eq!(code, ErrorCode::Internal, "{message}");
            assert!(code.is_transient());
        }
        other => panic!("expected a transient error while the disk is full, got {other:?}"),
    }
}

/// A sync server on `disks` that recovers quickly, bound to a free port: its store, the
/// server, its handle, address, and a token for user `u`.
async fn serve(disks: &Disks) -> (Arc<Store>, Arc<SyncServer>, ServerHandle, String, String) {
    let server_store = Arc::new(disks.open(quick_recovery()));
    let secret = Secret::generate();
    let server = Arc::new(
        SyncServer::open(server_store.clone(), ServerConfig::new(secret.clone())).expect("server"),
    );
    let handle = ServerHandle::bind(server.clone(), "127.0.0.1:0")
        .await
        .expect("bind");
    let addr = handle.local_addr().expect("addr").to_string();
    (server_store, server, handle, addr, token_for(&secret, "u"))
}

/// A sync server whose disk fills up: uploads get a transient error (500) and are not
/// acknowledged; once the disk has room, the server serves again without a restart, every
/// write reaches the server and the other client, and every acknowledged one survives a
/// power cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_disk_fills_up_serves_again_once_it_has_room() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disks = Disks::new();
    let (server_store, server, handle, addr, token) = serve(&disks).await;
    let alice = Arc::new(Store::open(dir.path().join("alice.redb")).expect("open"));
    let bob = Arc::new(Store::open(dir.path().join("bob.redb")).expect("open"));
    let (alice_client, bob_client) = (client(&alice, &addr, &token), client(&bob, &addr, &token));
    let note = |store: &Store, pk: i64| {
        store
            .write(|tx| tx.insert("Note", pk, [("text", format!("note {pk}"))]))
            .expect("write");
    };
    for pk in 0..5 {
        note(&alice, pk);
    }
    until("bob has alice's first notes", || has(&bob, 4)).await;
    // Their acknowledgement may still be on its way: take it before the disk fills.
    until("alice's first notes are acknowledged", || {
        alice.last_sync() == alice.log_head()
    })
    .await;

    disks.fault.set(FULL);
    let acknowledged_before = alice.last_sync();
    for pk in 5..10 {
        note(&alice, pk);
    }
    until("an upload hit the full disk", || {
        disks.fault.failed.load(Ordering::SeqCst) > 0
    })
    .await;
    upload_gets_internal_error(&addr, &token, 4242).await;
    assert_eq!(
        alice.last_sync(),
        acknowledged_before,
        "nothing is acknowledged while the disk is full"
    );

    disks.fault.set(WORKS);
    until("alice's writes are acknowledged", || {
        alice.last_sync() == alice.log_head()
    })
    .await;
    until("bob has every note", || (0..10).all(|pk| has(&bob, pk))).await;
    for pk in 0..10 {
        assert!(has(&server_store, pk), "note {pk} on the server");
    }
    assert!(server_store.verify_digest().expect("verify"));
    server
        .write(|tx| tx.insert("Note", 50, [("text", "from the server")]))
        .expect("the server takes writes again");
    until("bob has the server's write", || has(&bob, 50)).await;
    assert_eq!(alice_client.fatal_error(), None);
    assert_eq!(bob_client.fatal_error(), None);

    alice_client.stop().await;
    bob_client.stop().await;
    handle.shutdown().await;
    drop(server);
    drop(server_store);
    disks.crash();
    let reopened = disks.open(Options::default());
    for pk in (0..10).chain([50]) {
        assert!(has(&reopened, pk), "note {pk} after a power cut");
    }
}

/// An upload whose commit reached the write-ahead file but whose sync failed: the client
/// got a 500, and the recovery replays the commit (as a restart would). The server's
/// version then counts it: the next upload does not take its place in the history, and a
/// client that downloads everything afterwards receives both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_replayed_by_the_recovery_reaches_every_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disks = Disks::new();
    let (server_store, _, handle, addr, token) = serve(&disks).await;
    let alice = Arc::new(Store::open(dir.path().join("alice.redb")).expect("open"));
    let bob = Arc::new(Store::open(dir.path().join("bob.redb")).expect("open"));

    disks.fault.set(SYNCS_FAIL);
    let alice_client = client(&alice, &addr, &token);
    alice
        .write(|tx| tx.insert("Note", 1, [("text", "alice")]))
        .expect("write");
    until("alice's upload failed to sync", || {
        disks.fault.failed.load(Ordering::SeqCst) > 0
    })
    .await;
    disks.fault.set(WORKS);
    until("alice's write is acknowledged", || {
        alice.last_sync() == alice.log_head()
    })
    .await;
    alice_client.stop().await;

    let bob_client = client(&bob, &addr, &token);
    bob.write(|tx| tx.insert("Note", 2, [("text", "bob")]))
        .expect("write");
    until("bob's write is acknowledged", || {
        bob.last_sync() == bob.log_head()
    })
    .await;
    until("bob has alice's note", || has(&bob, 1)).await;

    let carol = Arc::new(Store::open(dir.path().join("carol.redb")).expect("open"));
    let carol_client = client(&carol, &addr, &token);
    until("carol has both notes", || has(&carol, 1) && has(&carol, 2)).await;
    assert_eq!(carol.digest(), server_store.digest());
    bob_client.stop().await;
    carol_client.stop().await;
    handle.shutdown().await;
}

/// Writers, readers and a disk that keeps failing and working again, concurrently: no
/// panic, no deadlock, every error typed, and every commit that returned `Ok` is in the
/// store once it has recovered (immediate ones after a power cut too). Commits whose
/// records a recovery dropped (written to the tail, never to the file) must not return
/// `Ok`.
#[test]
fn concurrent_commits_through_failures_and_recoveries_lose_nothing_acknowledged() {
    use fieldlog::Durability;
    const WRITERS: i64 = 4;
    const COMMITS: i64 = 400;
    const ROUNDS: u64 = 6;
    let disks = Disks::new();
    let store = Arc::new(
        disks.open(
            Options::default()
                .recover_after(Some(Duration::from_millis(1)))
                .checkpoint_bytes(64 << 10),
        ),
    );
    // Commits that returned Ok, and that failed, so far; writers still running.
    let oks = Arc::new(AtomicU64::new(0));
    let errs = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicU64::new(WRITERS as u64));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, oks, errs, running) = (
                Arc::clone(&store),
                Arc::clone(&oks),
                Arc::clone(&errs),
                Arc::clone(&running),
            );
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                for i in 0..COMMITS {
                    let pk = w * 10_000 + i;
                    let durability = if i % 2 == 0 {
                        Durability::Immediate
                    } else {
                        Durability::Deferred
                    };
                    let r = (|| {
                        let mut tx = store.begin()?;
                        tx.set_durability(durability);
                        tx.insert("C", pk, [("n", Value::from(pk))])?;
                        if i % 7 == 0 {
                            tx.insert("C", -pk - 1, [("big", "x".repeat(20 << 10))])?;
                        }
                        tx.commit()
                    })();
                    match r {
                        Ok(_) => {
                            oks.fetch_add(1, Ordering::SeqCst);
                            acked.push((pk, durability));
                        }
                        Err(e) => {
                            assert!(
                                matches!(e, Error::Storage(_) | Error::Poisoned),
                                "untyped: {e:?}"
                            );
                            errs.fetch_add(1, Ordering::SeqCst);
                            // Time for the recovery's wait to pass.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
                running.fetch_sub(1, Ordering::SeqCst);
                acked
            })
        })
        .collect();
    let reader = {
        let (store, running) = (Arc::clone(&store), Arc::clone(&running));
        std::thread::spawn(move || {
            while running.load(Ordering::SeqCst) > 0 {
                for r in [store.get("C", 1).map(|_| ()), store.scan("C").map(|_| ())] {
                    if let Err(e) = r {
                        assert!(matches!(e, Error::Storage(_) | Error::Poisoned), "{e:?}");
                    }
                }
            }
        })
    };
    // The disk fails after some commits succeeded, and works again after some failed.
    let wait_for = |counter: &AtomicU64, n: u64| {
        while counter.load(Ordering::SeqCst) < n && running.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
    };
    let mut recoveries = 0;
    for round in 0..ROUNDS {
        wait_for(&oks, (round + 1) * 150);
        disks
            .fault
            .set(if round % 2 == 0 { FULL } else { SYNCS_FAIL });
        let failed_before = errs.load(Ordering::SeqCst);
        wait_for(&errs, failed_before + 10);
        disks.fault.set(WORKS);
        recoveries += u64::from(errs.load(Ordering::SeqCst) > failed_before);
    }
    let acked: Vec<(i64, Durability)> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("a writer panicked"))
        .collect();
    reader.join().expect("the reader panicked");
    // Once recovered (the next write after the wait), every acknowledged commit is there.
    let deadline = Instant::now() + WAIT;
    while store.write(|tx| tx.insert("Z", 1, [("z", 1)])).is_err() {
        assert!(Instant::now() < deadline, "the store recovers");
        std::thread::sleep(Duration::from_millis(5));
    }
    for (pk, durability) in &acked {
        assert!(
            has_c(&store, *pk),
            "acknowledged {durability:?} commit {pk} lost"
        );
    }
    assert!(store.verify_digest().expect("verify"));
    assert!(
        recoveries > 1,
        "the store failed and recovered more than once"
    );
    drop(store);
    disks.crash();
    let reopened = disks.open(Options::default());
    for (pk, durability) in &acked {
        if *durability == Durability::Immediate {
            assert!(
                has_c(&reopened, *pk),
                "immediate commit {pk} lost in a power cut"
            );
        }
    }
    println!(
        "recovery-stress: acked={} of {} failed_commits={} failing_rounds={recoveries} failed_ops={}",
        acked.len(),
        WRITERS * COMMITS,
        errs.load(Ordering::SeqCst),
        disks.fault.failed.load(Ordering::SeqCst)
    );
}

fn has_c(store: &Store, pk: i64) -> bool {
    store.get("C", pk).ok().flatten().is_some()
}
