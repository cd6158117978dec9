//! The transport's limits and the client's connection loop against hostile and failing
//! peers, over loopback TCP with a real server (issue 21, items 2-4): every limit of
//! `Limits` is met by a peer that tries to pass it, and the server's own accounting
//! (`ServerHandle::stats`) shows what it held. The client's backoff, waits, token refresh
//! and keepalive are checked by counting connections and events, never by timing: where a
//! wall-clock window is used, it only bounds how many attempts fit in it (a slower machine
//! makes fewer).

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fieldlog::sync::client::{ClientConfig, SyncError};
use fieldlog::sync::frame::{encode_frame, FrameError, FRAME_LEN_MAX_DEFAULT};
use fieldlog::sync::net::read_frame;
use fieldlog::sync::net::{
    ClientHooks, ConnectionState, ServerHandle, ServerStats, SyncClient, TokenFuture, Transport,
    WaitError, UPLOAD_FAILURES_REPORTED,
};
use fieldlog::sync::protocol::{ClientMsg, ErrorCode, ServerMsg};
use fieldlog::sync::server::{Limits, ServerConfig, SyncServer};
use fieldlog::sync::token::{self, Claims, Secret};
use fieldlog::{Changeset, LogEntry, Op, Options, Pk, ReplicaId, Stamp, Store, Value, Write};
use support::{hello, now_ms, token_for};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Guards against a hang only: every wait here ends on an event long before it.
const WAIT: Duration = Duration::from_secs(60);

fn token_until(secret: &Secret, user: &str, expires_at_ms: u64) -> String {
    let claims = Claims {
        user_id: user.into(),
        expires_at_ms,
        extra: Default::default(),
    };
    token::issue(secret, &claims).expect("token")
}

struct Rig {
    secret: Secret,
    sync: Arc<SyncServer>,
    handle: ServerHandle,
    addr: String,
}

impl Rig {
    async fn start(limits: Limits) -> Rig {
        let store = Arc::new(Store::open_in_memory().expect("store"));
        Rig::on(store, limits).await
    }

    async fn on(store: Arc<Store>, limits: Limits) -> Rig {
        let secret = Secret::generate();
        let mut config = ServerConfig::new(secret.clone());
        config.limits = limits;
        let sync = Arc::new(SyncServer::open(store, config).expect("server"));
        let handle = ServerHandle::bind(sync.clone(), "127.0.0.1:0")
            .await
            .expect("bind");
        let addr = handle.local_addr().expect("addr").to_string();
        Rig {
            secret,
            sync,
            handle,
            addr,
        }
    }

    fn stats(&self) -> ServerStats {
        self.handle.stats()
    }

    fn client(&self, store: &Arc<Store>, user: &str, hooks: ClientHooks) -> SyncClient {
        SyncClient::start(
            store.clone(),
            Transport::Tcp(self.addr.clone()),
            ClientConfig::new(token_for(&self.secret, user)),
            hooks,
        )
    }
}

/// Polls `ok` until it holds (panics after [`WAIT`]).
async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    timeout(WAIT, async {
        while !ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("never happened: {what}"));
}

fn frame(msg: &ClientMsg) -> Vec<u8> {
    encode_frame(msg, FRAME_LEN_MAX_DEFAULT).expect("encode")
}

async fn connect(addr: &str) -> TcpStream {
    timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

async fn next(s: &mut TcpStream) -> Result<Option<ServerMsg>, FrameError> {
    timeout(WAIT, read_frame::<ServerMsg, _>(s, FRAME_LEN_MAX_DEFAULT))
        .await
        .expect("the server answers or closes in time")
}

/// The next frame that is not a `Download` (the server pushes those after a handshake).
async fn next_skipping_downloads(s: &mut TcpStream) -> Result<Option<ServerMsg>, FrameError> {
    loop {
        match next(s).await {
            Ok(Some(ServerMsg::Download { .. })) => {}
            other => return other,
        }
    }
}

/// The next frames are `Error { code: want }` (returned: its message) and the end.
async fn expect_error(s: &mut TcpStream, want: ErrorCode) -> String {
    let message = match next_skipping_downloads(s).await {
        Ok(Some(ServerMsg::Error { code, message })) => {
            assert_eq!(code, want, "{message}");
            message
        }
        other => panic!("expected Error {want:?}, got {other:?}"),
    };
    expect_closed(s).await;
    message
}

async fn expect_closed(s: &mut TcpStream) {
    match next_skipping_downloads(s).await {
        Ok(None) => {}
        Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the server to close, got {other:?}"),
    }
}

/// A handshake as `replica`; returns the stream after `Welcome`.
async fn handshake(addr: &str, token: &str, replica: u64) -> TcpStream {
    let mut s = connect(addr).await;
    s.write_all(&frame(&hello(token, ReplicaId(replica))))
        .await
        .expect("send Hello");
    match next(&mut s).await {
        Ok(Some(ServerMsg::Welcome { .. })) => s,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// One piece of transaction 1 of `replica`: an insert of `pk` with a `bytes`-long value.
fn piece(replica: u64, pk: i64, bytes: usize, more: bool) -> ClientMsg {
    ClientMsg::Upload {
        changeset: Changeset {
            origin: ReplicaId(replica),
            entries: vec![LogEntry {
                seq: 1,
                stamp: Stamp {
                    time: now_ms() << 16,
                    replica: ReplicaId(replica),
                },
                writes: vec![Write {
                    collection: "Big".into(),
                    pk: Pk::Int(pk),
                    op: Op::Insert {
                        fields: vec![("blob".into(), Value::Bytes(vec![7; bytes]))],
                    },
                }],
            }],
        },
        more,
    }
}

/// A client's hooks that collect every error it reports.
fn collecting(errors: &Arc<Mutex<Vec<SyncError>>>) -> ClientHooks {
    let errors = errors.clone();
    let mut hooks = ClientHooks::default();
    hooks.on_error = Some(Arc::new(move |e: &SyncError| {
        let copy = match e {
            SyncError::Server { code, message } => SyncError::Server {
                code: *code,
                message: message.clone(),
            },
            SyncError::UploadStuck {
                after,
                failures,
                message,
            } => SyncError::UploadStuck {
                after: *after,
                failures: *failures,
                message: message.clone(),
            },
            other => SyncError::Protocol(other.to_string()),
        };
        errors.lock().expect("errors").push(copy);
    }));
    hooks
}

async fn write_and_sync(store: &Store, client: &SyncClient, pk: i64) {
    store
        .write(|tx| tx.insert("Note", pk, [("text", Value::from(format!("note {pk}")))]))
        .expect("write");
    timeout(WAIT, client.wait_for_upload())
        .await
        .expect("upload in time")
        .expect("upload");
}

// ---------------------------------------------------------------------------------------
// Buffered bytes
// ---------------------------------------------------------------------------------------

/// Sixteen authenticated connections each start a 1 MiB frame and send 768 KiB of it, then
/// stall: 12 MiB offered against a 4 MiB server buffer budget. The server's accounting shows
/// the budget full and connections waiting for it, and never more held than the budget plus
/// each connection's 64 KiB allowance; a well-behaved client meanwhile syncs small writes
/// (they fit its allowance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_frames_stay_within_the_server_buffer_budget() {
    const SLOW: usize = 16;
    let mut limits = Limits::default();
    limits.frame_bytes_max = 1 << 20;
    limits.connection_buffer_bytes_max = 2 << 20;
    limits.server_buffer_bytes_max = 4 << 20;
    let allowance = limits.hello_frame_bytes_max as u64;
    let budget = limits.server_buffer_bytes_max as u64;
    let rig = Rig::start(limits).await;
    let mut slow = Vec::new();
    for i in 0..SLOW {
        let mut s = handshake(
            &rig.addr,
            &token_for(&rig.secret, "mallory"),
            1_000 + i as u64,
        )
        .await;
        slow.push(tokio::spawn(async move {
            let mut header = (1u32 << 20).to_be_bytes().to_vec();
            header.extend_from_slice(&[0; 4]);
            let _ = s.write_all(&header).await;
            let _ = s.write_all(&vec![0u8; 768 << 10]).await;
            // Stalls here, holding the connection open, until the test ends.
            std::future::pending::<()>().await;
            drop(s);
        }));
    }
    until(
        "the server buffer budget is full and a connection waits",
        || {
            let s = rig.stats();
            s.buffer_waits > 0 && s.shared_bytes_buffered + (64 << 10) > budget
        },
    )
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path().join("good.redb")).expect("open"));
    let good = rig.client(&store, "good", ClientHooks::default());
    write_and_sync(&store, &good, 1).await;
    assert_eq!(rig.sync.store().count("Note").expect("count"), 1);

    let s = rig.stats();
    eprintln!("slow frames: {s:?}");
    assert!(s.shared_bytes_buffered_peak <= budget, "{s:?}");
    assert!(
        s.frame_bytes_buffered_peak <= budget + (SLOW as u64 + 1) * allowance,
        "{s:?}"
    );
    for t in slow {
        t.abort();
    }
    good.stop().await;
    rig.handle.shutdown().await;
}

/// An endless transaction in 64 KiB pieces against a 1 MiB `transaction_bytes_max`: the
/// server refuses it with `LimitExceeded` naming the limit, closes the connection, applies
/// nothing, and holds no transaction bytes afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_transaction_in_pieces_is_refused() {
    let mut limits = Limits::default();
    limits.frame_bytes_max = 256 << 10;
    limits.transaction_bytes_max = 1 << 20;
    let rig = Rig::start(limits).await;
    let s = handshake(&rig.addr, &token_for(&rig.secret, "mallory"), 7).await;
    let (mut rd, mut wr) = s.into_split();
    let sender = tokio::spawn(async move {
        let mut sent = 0usize;
        // 12.5 MiB at most: never the end of the transaction.
        for pk in 0..200 {
            if wr
                .write_all(&frame(&piece(7, pk, 64 << 10, true)))
                .await
                .is_err()
            {
                break;
            }
            sent += 1;
        }
        sent
    });
    let message = loop {
        match timeout(
            WAIT,
            read_frame::<ServerMsg, _>(&mut rd, FRAME_LEN_MAX_DEFAULT),
        )
        .await
        .expect("an answer in time")
        {
            Ok(Some(ServerMsg::Download { .. })) => {}
            Ok(Some(ServerMsg::Error {
                code: ErrorCode::LimitExceeded,
                message,
            })) => break message,
            other => panic!("expected LimitExceeded, got {other:?}"),
        }
    };
    assert!(message.contains("transaction_bytes_max"), "{message}");
    let sent = sender.await.expect("sender");
    assert!(sent < 200, "the server read every piece ({sent})");
    assert_eq!(rig.sync.version(), 0, "nothing applied");
    assert_eq!(rig.sync.store().count("Big").expect("count"), 0);
    until("the refused transaction's bytes are released", || {
        rig.stats().transaction_bytes_buffered == 0
    })
    .await;
    let s = rig.stats();
    assert!(
        s.transaction_bytes_buffered_peak <= (1 << 20) + (128 << 10),
        "{s:?}"
    );
    rig.handle.shutdown().await;
}

/// Two connections' unfinished transactions share `server_transaction_bytes_max` (1 MiB):
/// while one holds 640 KiB, another that would pass the budget is refused with `Busy`;
/// once the first transaction ends (and is applied), the budget is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_transactions_share_the_server_budget() {
    let mut limits = Limits::default();
    limits.transaction_bytes_max = 1 << 20;
    limits.server_transaction_bytes_max = 1 << 20;
    let rig = Rig::start(limits).await;
    let mut a = handshake(&rig.addr, &token_for(&rig.secret, "a"), 11).await;
    for pk in 0..10 {
        a.write_all(&frame(&piece(11, pk, 64 << 10, true)))
            .await
            .expect("piece");
    }
    until("A's pieces are held", || {
        rig.stats().transaction_bytes_buffered >= 640 << 10
    })
    .await;
    let mut b = handshake(&rig.addr, &token_for(&rig.secret, "b"), 12).await;
    for pk in 0..10 {
        let _ = b.write_all(&frame(&piece(12, pk, 64 << 10, true))).await;
    }
    let message = expect_error(&mut b, ErrorCode::Busy).await;
    assert!(
        message.contains("server_transaction_bytes_max"),
        "{message}"
    );
    assert_eq!(rig.stats().transactions_refused, 1);

    a.write_all(&frame(&piece(11, 10, 64 << 10, false)))
        .await
        .expect("last piece");
    match next_skipping_downloads(&mut a).await {
        Ok(Some(ServerMsg::UploadAck { seq: 1, .. })) => {}
        other => panic!("expected A's acknowledgement, got {other:?}"),
    }
    assert_eq!(rig.sync.store().count("Big").expect("count"), 11);
    assert_eq!(rig.stats().transaction_bytes_buffered, 0);
    let mut b = handshake(&rig.addr, &token_for(&rig.secret, "b"), 12).await;
    for pk in 0..10 {
        b.write_all(&frame(&piece(12, 100 + pk, 64 << 10, pk < 9)))
            .await
            .expect("piece");
    }
    match next_skipping_downloads(&mut b).await {
        Ok(Some(ServerMsg::UploadAck { seq: 1, .. })) => {}
        other => panic!("expected B's acknowledgement, got {other:?}"),
    }
    assert_eq!(rig.sync.store().count("Big").expect("count"), 21);
    rig.handle.shutdown().await;
}

/// An authenticated connection sends Pings without ever reading the Pongs. The server
/// stops reading it once its replies back up (its inbox is bounded), and closes it when a
/// reply cannot be written within the idle deadline: the flood ends with a write error well
/// before 64 MiB, and the server held nothing beyond the connection's allowance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_that_never_reads_is_bounded() {
    const FLOOD_MAX: usize = 64 << 20;
    let mut limits = Limits::default();
    limits.idle_timeout_ms = 1_000;
    let rig = Rig::start(limits).await;
    let mut s = connect(&rig.addr).await;
    s.write_all(&frame(&hello(
        &token_for(&rig.secret, "mallory"),
        ReplicaId(9),
    )))
    .await
    .expect("Hello");
    let mut batch = Vec::new();
    let mut id = 0;
    while batch.len() < 64 << 10 {
        id += 1;
        batch.extend_from_slice(&frame(&ClientMsg::Ping { id }));
    }
    let mut sent = 0;
    let ended = timeout(WAIT, async {
        while sent < FLOOD_MAX {
            if s.write_all(&batch).await.is_err() {
                return true;
            }
            sent += batch.len();
        }
        false
    })
    .await
    .expect("the flood ends in time");
    let stats = rig.stats();
    eprintln!("ping flood: {} KiB sent; {stats:?}", sent >> 10);
    assert!(
        ended,
        "the server read {sent} bytes of Pings it could not answer"
    );
    assert_eq!(stats.write_timeouts, 1, "{stats:?}");
    assert_eq!(stats.shared_bytes_buffered_peak, 0, "{stats:?}");
    rig.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Connections and deadlines
// ---------------------------------------------------------------------------------------

/// With `connections_max` 8, eight idle connections (no Hello) take every slot: four more
/// are refused at once with `Busy` and closed; the idle ones are closed at the handshake
/// deadline, and a real client then connects and syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_cap_are_refused_and_a_client_still_connects() {
    let mut limits = Limits::default();
    limits.connections_max = 8;
    limits.handshake_timeout_ms = 3_000;
    let rig = Rig::start(limits).await;
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(connect(&rig.addr).await);
    }
    until("eight connections are open", || {
        rig.stats().connections_open == 8
    })
    .await;
    for _ in 0..4 {
        let mut s = connect(&rig.addr).await;
        let message = expect_error(&mut s, ErrorCode::Busy).await;
        assert!(message.contains("connections_max"), "{message}");
    }
    assert_eq!(rig.stats().connections_refused, 4);

    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path().join("good.redb")).expect("open"));
    let good = rig.client(&store, "good", ClientHooks::default());
    write_and_sync(&store, &good, 1).await;
    for s in &mut idle {
        expect_closed(s).await;
    }
    let stats = rig.stats();
    assert_eq!(stats.handshake_timeouts, 8, "{stats:?}");
    assert_eq!(rig.sync.store().count("Note").expect("count"), 1);
    good.stop().await;
    rig.handle.shutdown().await;
}

/// A connection whose first frame is not a Hello gets `UnexpectedMessage` and is closed at
/// once: its slot is free while the peer keeps its end open (with `connections_max` 1, the
/// next connection is served). A frame announced larger than the handshake's 64 KiB limit is
/// refused from its header, before any body arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_first_frame_is_closed_at_once() {
    let mut limits = Limits::default();
    limits.connections_max = 1;
    let rig = Rig::start(limits).await;
    let mut wrong = connect(&rig.addr).await;
    wrong
        .write_all(&frame(&ClientMsg::Ping { id: 1 }))
        .await
        .expect("send");
    expect_error(&mut wrong, ErrorCode::UnexpectedMessage).await;
    until("the refused connection's slot is free", || {
        rig.stats().connections_open == 0
    })
    .await;

    let mut big = connect(&rig.addr).await;
    let mut header = (1u32 << 20).to_be_bytes().to_vec();
    header.extend_from_slice(&[0; 4]);
    big.write_all(&header).await.expect("send");
    let message = expect_error(&mut big, ErrorCode::BadFrame).await;
    assert!(message.contains("65536"), "{message}");
    until("the second refused connection's slot is free", || {
        rig.stats().connections_open == 0
    })
    .await;
    let _ok = handshake(&rig.addr, &token_for(&rig.secret, "good"), 5).await;
    drop(wrong);
    rig.handle.shutdown().await;
}

/// A session that sends nothing after its handshake is closed at the idle deadline; a
/// client idle as long keeps its one connection, its keepalive Pings sparing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_end_and_keepalives_keep_honest_ones() {
    let mut limits = Limits::default();
    limits.idle_timeout_ms = 1_500;
    let rig = Rig::start(limits).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path().join("good.redb")).expect("open"));
    let good = rig.client(&store, "good", {
        let mut hooks = ClientHooks::default();
        hooks.keepalive = Some(Duration::from_millis(100));
        hooks
    });
    write_and_sync(&store, &good, 1).await;
    let mut silent = handshake(&rig.addr, &token_for(&rig.secret, "silent"), 77).await;
    expect_closed(&mut silent).await;
    // The client sent nothing of its own since before the silent session began, so it
    // was idle at least as long; its Pings kept its one connection open.
    write_and_sync(&store, &good, 2).await;
    let stats = rig.stats();
    assert_eq!(stats.idle_timeouts, 1, "{stats:?}");
    assert_eq!(rig.handle.connections(), 2, "the client never reconnected");
    good.stop().await;
    rig.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Token expiry
// ---------------------------------------------------------------------------------------

/// A session ends when its token expires: the server sends `TokenExpired` unasked, and an
/// upload sent after the expiry is not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_ends_the_session() {
    let rig = Rig::start(Limits::default()).await;
    let expires = now_ms() + 1_500;
    let mut s = handshake(&rig.addr, &token_until(&rig.secret, "eve", expires), 21).await;
    let message = match next_skipping_downloads(&mut s).await {
        Ok(Some(ServerMsg::Error {
            code: ErrorCode::TokenExpired,
            message,
        })) => message,
        other => panic!("expected TokenExpired, got {other:?}"),
    };
    assert!(now_ms() >= expires, "ended before the expiry: {message}");
    let _ = s.write_all(&frame(&piece(21, 1, 10, false))).await;
    expect_closed(&mut s).await;
    assert_eq!(rig.sync.version(), 0, "nothing applied after the expiry");
    assert_eq!(rig.stats().tokens_expired, 1);
    rig.handle.shutdown().await;
}

/// A client whose token expires fetches a new one from its token provider and carries on;
/// without a provider, the expiry stops it (a fatal error) and its waits fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_refreshes_an_expired_token_or_stops_without_a_provider() {
    let rig = Rig::start(Limits::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let fetched = Arc::new(AtomicU64::new(0));
    let provider = {
        let (secret, fetched) = (rig.secret.clone(), fetched.clone());
        Arc::new(move || -> TokenFuture {
            fetched.fetch_add(1, Ordering::SeqCst);
            let t = token_until(&secret, "carol", now_ms() + 3_600_000);
            Box::pin(async move { Ok(t) })
        })
    };
    let store = Arc::new(Store::open(dir.path().join("carol.redb")).expect("open"));
    let carol = SyncClient::start(
        store.clone(),
        Transport::Tcp(rig.addr.clone()),
        ClientConfig::new(token_until(&rig.secret, "carol", now_ms() + 1_000)),
        {
            let mut hooks = ClientHooks::default();
            hooks.token_provider = Some(provider);
            hooks
        },
    );
    write_and_sync(&store, &carol, 1).await;
    until("carol fetched a new token", || {
        carol.status().token_refreshes == 1
    })
    .await;
    write_and_sync(&store, &carol, 2).await;
    assert_eq!(fetched.load(Ordering::SeqCst), 1);
    assert_eq!(carol.fatal_error(), None);
    assert_eq!(rig.sync.store().count("Note").expect("count"), 2);

    let store = Arc::new(Store::open(dir.path().join("dave.redb")).expect("open"));
    let dave = SyncClient::start(
        store.clone(),
        Transport::Tcp(rig.addr.clone()),
        ClientConfig::new(token_until(&rig.secret, "dave", now_ms() + 2_000)),
        ClientHooks::default(),
    );
    write_and_sync(&store, &dave, 10).await;
    until("dave stopped", || dave.fatal_error().is_some()).await;
    let fatal = dave.fatal_error().unwrap_or_default();
    assert!(fatal.contains("105"), "{fatal}");
    store
        .write(|tx| tx.insert("Note", 11, [("text", Value::from("late"))]))
        .expect("write");
    match timeout(WAIT, dave.wait_for_upload())
        .await
        .expect("in time")
    {
        Err(WaitError::Fatal(m)) => assert!(m.contains("105"), "{m}"),
        other => panic!("expected a fatal error, got {other:?}"),
    }
    carol.stop().await;
    dave.stop().await;
    rig.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// The client's backoff and waits
// ---------------------------------------------------------------------------------------

/// A redb backend in memory whose writes fail once `fail` is set: the server's store then
/// fails every upload (500 Internal).
#[derive(Debug)]
struct FailingDisk {
    inner: redb::backends::InMemoryBackend,
    fail: Arc<AtomicBool>,
}

impl FailingDisk {
    fn check(&self) -> std::io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            Err(std::io::Error::other("injected disk failure"))
        } else {
            Ok(())
        }
    }
}

impl redb::StorageBackend for FailingDisk {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.inner.write(offset, data)
    }
}

/// Attempts a client may make in [`WINDOW`] with a 20 ms first delay doubling each time
/// (at least half of each step): about 9, never hundreds.
const ATTEMPTS_MAX: u64 = 14;
const WINDOW: Duration = Duration::from_secs(3);

/// A server that answers an upload with 500 (its disk fails): the client reports the stuck
/// upload once after `UPLOAD_FAILURES_REPORTED` failures, with the server's message, in its
/// error callback and its status; and its attempts back off (a handful in three seconds,
/// where a backoff reset by each successful handshake makes hundreds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_answering_500_gets_backed_off_attempts_and_a_report() {
    let fail = Arc::new(AtomicBool::new(false));
    let disk = FailingDisk {
        inner: redb::backends::InMemoryBackend::new(),
        fail: fail.clone(),
    };
    let store = Arc::new(Store::open_backend(disk, Options::default()).expect("store"));
    let rig = Rig::on(store, Limits::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let local = Arc::new(Store::open(dir.path().join("c.redb")).expect("open"));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let client = rig.client(&local, "c", collecting(&errors));
    // The device registers with its first session; then the disk fails.
    timeout(WAIT, client.wait_for_download())
        .await
        .expect("first session in time")
        .expect("first session");
    fail.store(true, Ordering::SeqCst);
    local
        .write(|tx| tx.insert("Note", 1, [("text", Value::from("x"))]))
        .expect("write");
    let upload = tokio::spawn(client.wait_for_upload());
    until("the stuck upload is reported", || {
        client.status().stuck_upload.is_some()
    })
    .await;
    let status = client.status();
    let stuck = status.stuck_upload.clone().expect("stuck");
    assert_eq!(stuck.after, 0);
    assert!(stuck.message.contains("500"), "{status:?}");
    assert!(status.failures >= UPLOAD_FAILURES_REPORTED, "{status:?}");
    {
        let errors = errors.lock().expect("errors");
        let reports: Vec<_> = errors
            .iter()
            .filter(|e| matches!(e, SyncError::UploadStuck { .. }))
            .collect();
        assert_eq!(reports.len(), 1, "{errors:?}");
        assert!(reports[0].to_string().contains("500"), "{}", reports[0]);
        assert!(errors.iter().any(|e| matches!(
            e,
            SyncError::Server {
                code: ErrorCode::Internal,
                ..
            }
        )));
    }
    let before = rig.handle.connections();
    tokio::time::sleep(WINDOW).await;
    let attempts = rig.handle.connections() - before;
    eprintln!(
        "500: {attempts} attempts in {WINDOW:?}; {:?}",
        client.status()
    );
    assert!(
        attempts <= ATTEMPTS_MAX,
        "{attempts} attempts in {WINDOW:?}"
    );
    assert_eq!(local.last_sync(), 0);
    assert!(!upload.is_finished(), "nothing was acknowledged");
    client.stop().await;
    match upload.await.expect("wait task") {
        Err(WaitError::Stopped) => {}
        other => panic!("expected Stopped, got {other:?}"),
    }
    rig.handle.shutdown().await;
}

/// A server that refuses every connection (`connections_max` 0): a client with writes to
/// upload, awaited all the time by several waiters (each giving up and waiting again every
/// 20 ms), makes no more attempts than its backoff allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_does_not_shorten_the_backoff() {
    let rig = Rig::start({
        let mut limits = Limits::default();
        limits.connections_max = 0;
        limits
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let local = Arc::new(Store::open(dir.path().join("c.redb")).expect("open"));
    local
        .write(|tx| tx.insert("Note", 1, [("text", Value::from("x"))]))
        .expect("write");
    let client = Arc::new(rig.client(&local, "c", ClientHooks::default()));
    let done = Arc::new(AtomicBool::new(false));
    let mut waiters = Vec::new();
    for i in 0..4 {
        let (client, done) = (client.clone(), done.clone());
        waiters.push(tokio::spawn(async move {
            let mut waits = 0u64;
            while !done.load(Ordering::SeqCst) {
                let w = Duration::from_millis(20);
                if i % 2 == 0 {
                    let _ = timeout(w, client.wait_for_upload()).await;
                } else {
                    let _ = timeout(w, client.wait_for_download()).await;
                }
                waits += 1;
            }
            waits
        }));
    }
    tokio::time::sleep(WINDOW).await;
    let attempts = rig.handle.connections();
    done.store(true, Ordering::SeqCst);
    let mut waits = 0;
    for w in waiters {
        waits += w.await.expect("waiter");
    }
    eprintln!("waiting: {attempts} attempts, {waits} waits in {WINDOW:?}");
    assert!(waits >= 40, "the waiters waited ({waits})");
    assert!(
        attempts <= ATTEMPTS_MAX,
        "{attempts} attempts in {WINDOW:?}"
    );
    assert!(attempts >= 2, "the client kept trying ({attempts})");
    assert_eq!(rig.stats().connections_refused, attempts);
    rig.handle.shutdown().await;
}

/// Every wait fails once the client is stopped (they were waiting on a server that refuses
/// every connection), and fails with the error when the client stopped on a fatal one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_fail_when_the_client_stops() {
    let rig = Rig::start({
        let mut limits = Limits::default();
        limits.connections_max = 0;
        limits
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let local = Arc::new(Store::open(dir.path().join("c.redb")).expect("open"));
    local
        .write(|tx| tx.insert("Note", 1, [("text", Value::from("x"))]))
        .expect("write");
    let client = rig.client(&local, "c", ClientHooks::default());
    client
        .update_subscriptions(|s| {
            s.push(fieldlog::sync::protocol::Subscription::new(
                "notes",
                "Note",
                "TRUEPREDICATE",
            ))
        })
        .expect("subscribe");
    let waits = [
        tokio::spawn(client.wait_for_upload()),
        tokio::spawn(client.wait_for_download()),
        tokio::spawn(client.wait_for_subscriptions()),
    ];
    until("the client tried", || rig.handle.connections() > 0).await;
    assert!(waits.iter().all(|w| !w.is_finished()));
    client.stop().await;
    for w in waits {
        match timeout(WAIT, w).await.expect("in time").expect("task") {
            Err(WaitError::Stopped) => {}
            other => panic!("expected Stopped, got {other:?}"),
        }
    }

    let rig = Rig::start(Limits::default()).await;
    let store = Arc::new(Store::open(dir.path().join("d.redb")).expect("open"));
    store
        .write(|tx| tx.insert("Note", 1, [("text", Value::from("x"))]))
        .expect("write");
    let bad = SyncClient::start(
        store,
        Transport::Tcp(rig.addr.clone()),
        ClientConfig::new("not a token"),
        ClientHooks::default(),
    );
    match timeout(WAIT, bad.wait_for_upload()).await.expect("in time") {
        Err(WaitError::Fatal(m)) => assert!(m.contains("104"), "{m}"),
        other => panic!("expected a fatal error, got {other:?}"),
    }
    match timeout(WAIT, bad.wait_for_download())
        .await
        .expect("in time")
    {
        Err(WaitError::Fatal(_)) => {}
        other => panic!("expected a fatal error, got {other:?}"),
    }
    bad.stop().await;
    rig.handle.shutdown().await;
}

/// `set_online(false)` can be awaited: once it returns the client is disconnected and the
/// server sees the connection end; back online, writes made offline sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn going_offline_can_be_awaited() {
    let rig = Rig::start(Limits::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path().join("c.redb")).expect("open"));
    let client = rig.client(&store, "c", ClientHooks::default());
    write_and_sync(&store, &client, 1).await;
    assert_eq!(client.state(), ConnectionState::Connected);
    timeout(WAIT, client.set_online(false))
        .await
        .expect("offline in time");
    assert_eq!(client.state(), ConnectionState::Disconnected);
    until("the server saw the connection end", || {
        rig.stats().connections_open == 0
    })
    .await;
    store
        .write(|tx| tx.insert("Note", 2, [("text", Value::from("offline"))]))
        .expect("write");
    let _ = client.set_online(true);
    timeout(WAIT, client.wait_for_upload())
        .await
        .expect("in time")
        .expect("upload");
    assert_eq!(rig.sync.store().count("Note").expect("count"), 2);
    assert_eq!(rig.handle.connections(), 2);
    client.stop().await;
    rig.handle.shutdown().await;
}
