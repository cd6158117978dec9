//! Sync under faults, over real loopback TCP: a fault-injecting proxy (cuts mid-frame, delays,
//! duplicated frames), a server restarted mid-sync, a client process killed mid-upload, a
//! transaction larger than the frame limit, and a client that writes offline.
//!
//! Every test checks what a user relies on (invariants 1 and 3 of DESIGN.md):
//! - every write whose commit returned `Ok` is on the server once it was acknowledged (its
//!   value with its stamp, or a higher stamp on the same field);
//! - every log entry is applied on the server exactly once: the server's version (one per
//!   accepted log entry) equals the sum of the clients' log heads, and the server's digest
//!   equals that of a fresh store importing each client's whole log once;
//! - every client converges to the server's digest.
//!
//! `FIELDLOG_FAULT_SEED` overrides the seed of the randomised tests.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fieldlog::sync::client::ClientConfig;
use fieldlog::sync::frame::{decode_frame, FRAME_HEADER_LEN, FRAME_LEN_MAX_DEFAULT};
use fieldlog::sync::net::{ClientHooks, ConnectionState, ServerHandle, SyncClient, Transport};
use fieldlog::sync::protocol::ClientMsg;
use fieldlog::sync::server::{ServerConfig, SyncServer};
use fieldlog::sync::token::Secret;
use fieldlog::{Stamp, Store, Value};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use support::token_for;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

/// The collection every workload writes.
const COLL: &str = "Item";
/// Generous bound on any wait for sync to finish on a loaded machine.
const SYNC_TIMEOUT: Duration = Duration::from_secs(120);

fn seed() -> u64 {
    std::env::var("FIELDLOG_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f1e1_d106)
}

/// A server on a store file, bound to a TCP address.
struct Server {
    path: std::path::PathBuf,
    store: Arc<Store>,
    sync: Arc<SyncServer>,
    handle: ServerHandle,
    addr: SocketAddr,
}

impl Server {
    async fn start(path: std::path::PathBuf, config: ServerConfig, addr: &str) -> Server {
        let store = Arc::new(Store::open(&path).expect("open the server store"));
        let sync = Arc::new(SyncServer::open(store.clone(), config).expect("sync server"));
        // Binding the port a moment ago released can take a few tries.
        let deadline = Instant::now() + Duration::from_secs(10);
        let handle = loop {
            match ServerHandle::bind(sync.clone(), addr).await {
                Ok(h) => break h,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("bind {addr}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("bind {addr}: {e}"),
            }
        };
        let addr = handle.local_addr().expect("a TCP server has an address");
        Server {
            path,
            store,
            sync,
            handle,
            addr,
        }
    }
}

fn client_config(secret: &Secret, user: &str, batch_bytes: usize) -> ClientConfig {
    let mut c = ClientConfig::new(token_for(secret, user));
    c.batch_bytes = batch_bytes;
    c
}

fn start_client(store: &Arc<Store>, addr: &str, config: ClientConfig) -> SyncClient {
    SyncClient::start(
        store.clone(),
        Transport::Tcp(addr.to_owned()),
        config,
        ClientHooks::default(),
    )
}

// ---------------------------------------------------------------------------------------
// Workload and checks
// ---------------------------------------------------------------------------------------

/// One field write whose commit returned `Ok`.
#[derive(Clone, Debug, PartialEq)]
struct Written {
    seq: u64,
    pk: i64,
    field: String,
    value: Value,
    stamp: Stamp,
}

/// One object's part of a planned transaction: an insert, or an update of live fields.
struct Planned {
    pk: i64,
    fields: Vec<(String, Value)>,
    insert: bool,
}

/// Random transactions on `Item`: inserts of this writer's own objects (some large enough to
/// travel in pieces) and single-field updates of distinct live objects.
struct Workload {
    rng: StdRng,
    tag: String,
    /// Objects this writer may update: live in its store.
    pool: Vec<i64>,
    next_pk: i64,
}

impl Workload {
    fn new(seed: u64, tag: &str, pool: Vec<i64>, first_pk: i64) -> Workload {
        Workload {
            rng: StdRng::seed_from_u64(seed),
            tag: tag.to_owned(),
            pool,
            next_pk: first_pk,
        }
    }

    fn text(&mut self, pk: i64, len: usize) -> Value {
        let mut s = format!("{}-{pk}-{}-", self.tag, self.rng.random::<u32>());
        while s.len() < len {
            s.push('.');
        }
        Value::String(s)
    }

    /// Commits one transaction and returns its field writes.
    fn step(&mut self, store: &Store) -> Vec<Written> {
        let mut plan: Vec<Planned> = Vec::new();
        if self.pool.len() < 3 || self.rng.random_bool(0.15) {
            // An insert of several objects with a 400-byte field: ~5 KB, more than a
            // 2 KB upload batch, so it is sent in pieces.
            let n = if self.rng.random_bool(0.5) { 1 } else { 10 };
            for _ in 0..n {
                let pk = self.next_pk;
                self.next_pk += 1;
                let fields = vec![
                    ("a".to_owned(), Value::Int(self.rng.random())),
                    ("b".to_owned(), self.text(pk, 400)),
                    ("c".to_owned(), Value::Int(pk)),
                ];
                plan.push(Planned {
                    pk,
                    fields,
                    insert: true,
                });
            }
        } else {
            let n = self.rng.random_range(1..=3usize);
            let mut pks: Vec<i64> = Vec::new();
            while pks.len() < n {
                let pk = self.pool[self.rng.random_range(0..self.pool.len())];
                if !pks.contains(&pk) {
                    pks.push(pk);
                }
            }
            for pk in pks {
                let field = ["a", "b", "c", "d"][self.rng.random_range(0..4)].to_owned();
                let value = if self.rng.random_bool(0.5) {
                    Value::Int(self.rng.random())
                } else {
                    self.text(pk, 24)
                };
                plan.push(Planned {
                    pk,
                    fields: vec![(field, value)],
                    insert: false,
                });
            }
        }
        let (_, c) = store
            .write(|tx| {
                for Planned { pk, fields, insert } in &plan {
                    if *insert {
                        tx.insert(COLL, *pk, fields.iter().cloned())?;
                    } else {
                        tx.update(COLL, *pk, fields.iter().cloned())?;
                    }
                }
                Ok(())
            })
            .expect("a local write");
        let seq = c.seq.expect("a transaction with writes has a log position");
        let stamp = c.stamp.expect("a local transaction has a stamp");
        let mut out = Vec::new();
        for Planned { pk, fields, insert } in plan {
            if insert {
                self.pool.push(pk);
            }
            for (field, value) in fields {
                out.push(Written {
                    seq,
                    pk,
                    field,
                    value,
                    stamp,
                });
            }
        }
        out
    }
}

/// Every write is on `store`: its value with its stamp, or a higher stamp on that field.
fn assert_on(store: &Store, writes: &[Written], what: &str) {
    for w in writes {
        match store.get_field(COLL, w.pk, &w.field).expect("get_field") {
            Some((_, s)) if s > w.stamp => {}
            Some((v, s)) if s == w.stamp && v == w.value => {}
            other => panic!("{what}: {w:?} is missing; found {other:?}"),
        }
    }
}

/// Every client's log reached the server exactly once, and nothing else did.
fn assert_exactly_once(server: &SyncServer, clients: &[&Store]) {
    let total: u64 = clients.iter().map(|s| s.log_head()).sum();
    assert_eq!(
        server.version(),
        total,
        "server history entries vs. client log entries: an upload was applied twice or lost"
    );
    let fresh = Store::open_in_memory().expect("in-memory store");
    for (i, s) in clients.iter().enumerate() {
        assert_eq!(s.last_sync(), s.log_head(), "client {i} not fully synced");
        assert_eq!(
            server.uploaded(s.replica_id()).expect("uploaded"),
            s.log_head(),
            "client {i}: server's applied position"
        );
        fresh
            .import(&s.export(0, usize::MAX).expect("export"))
            .expect("import a client's log");
    }
    assert_eq!(
        fresh.digest(),
        server.store().digest(),
        "the server's state differs from every client log applied once"
    );
}

/// Uploads then downloads on every client; all digests must equal the server's.
async fn converge(server: &Store, clients: &[(&Arc<Store>, &SyncClient)]) {
    for (i, (store, c)) in clients.iter().enumerate() {
        timeout(SYNC_TIMEOUT, c.wait_for_upload())
            .await
            .unwrap_or_else(|_| panic!("client {i}: upload did not finish"))
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(c.fatal_error(), None, "client {i}");
        assert_eq!(store.last_sync(), store.log_head(), "client {i} upload");
    }
    for (i, (_, c)) in clients.iter().enumerate() {
        timeout(SYNC_TIMEOUT, c.wait_for_download())
            .await
            .unwrap_or_else(|_| panic!("client {i}: download did not finish"))
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
    }
    let want = server.digest();
    for (i, (store, c)) in clients.iter().enumerate() {
        assert_eq!(c.fatal_error(), None, "client {i}");
        assert_eq!(store.digest(), want, "client {i} diverged from the server");
    }
}

/// Each client inserts `per_client` objects; returns all their pks once everyone has them.
async fn seed_pool(
    server: &Store,
    clients: &[(&Arc<Store>, &SyncClient)],
    per_client: i64,
) -> Vec<i64> {
    let mut pool = Vec::new();
    for (i, (store, _)) in clients.iter().enumerate() {
        let base = i as i64 * 1_000;
        store
            .write(|tx| {
                for pk in base..base + per_client {
                    tx.insert(COLL, pk, [("a", Value::Int(0)), ("d", Value::from("seed"))])?;
                }
                Ok(())
            })
            .expect("seed");
        pool.extend(base..base + per_client);
    }
    converge(server, clients).await;
    pool
}

// ---------------------------------------------------------------------------------------
// The fault-injecting proxy
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct FaultStats {
    connections: AtomicU64,
    cuts: AtomicU64,
    delays: AtomicU64,
    dup_uploads: AtomicU64,
    dup_acks: AtomicU64,
    dup_pings: AtomicU64,
}

/// A TCP proxy between clients and the server. While faults are on, each new connection is
/// cut after a random number of bytes (0–16 KB) in one random direction, usually
/// mid-frame; every frame is forwarded in random chunks, some delayed; and
/// client→server frames the protocol allows twice (whole uploads, download acks, pings) are
/// sometimes sent twice. Pieces of a pieced upload (`more: true`) are never duplicated:
/// TCP never duplicates, and the protocol has no piece numbers to detect a repeat by.
struct Proxy {
    addr: SocketAddr,
    faults: Arc<AtomicBool>,
    stats: Arc<FaultStats>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: SocketAddr, seed: u64) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let faults = Arc::new(AtomicBool::new(true));
        let stats = Arc::new(FaultStats::default());
        let (f, s) = (faults.clone(), stats.clone());
        let accept = tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            loop {
                let Ok((down, _)) = listener.accept().await else {
                    continue;
                };
                let conn_seed = rng.random();
                tokio::spawn(proxy_connection(
                    down,
                    upstream,
                    conn_seed,
                    f.clone(),
                    s.clone(),
                ));
            }
        });
        Proxy {
            addr,
            faults,
            stats,
            accept,
        }
    }

    /// Stops injecting faults (connections already open carry on cleanly).
    fn heal(&self) {
        self.faults.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn proxy_connection(
    down: TcpStream,
    upstream: SocketAddr,
    seed: u64,
    faults: Arc<AtomicBool>,
    stats: Arc<FaultStats>,
) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let _ = down.set_nodelay(true);
    stats.connections.fetch_add(1, Ordering::Relaxed);
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut cut_up, mut cut_down) = (None, None);
    if faults.load(Ordering::SeqCst) {
        let budget = rng.random_range(0..16_000u64);
        if rng.random_bool(0.5) {
            cut_up = Some(budget);
        } else {
            cut_down = Some(budget);
        }
    }
    let (dr, dw) = down.into_split();
    let (ur, uw) = up.into_split();
    let c2s = pump(
        dr,
        uw,
        true,
        cut_up,
        StdRng::seed_from_u64(rng.random()),
        &faults,
        &stats,
    );
    let s2c = pump(
        ur,
        dw,
        false,
        cut_down,
        StdRng::seed_from_u64(rng.random()),
        &faults,
        &stats,
    );
    // Either direction ending (end of stream, error, or a cut) closes both sockets.
    tokio::select! {
        _ = c2s => {}
        _ = s2c => {}
    }
}

/// The length of the whole frame at the start of `buf`, once all of it is there.
fn whole_frame_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..FRAME_HEADER_LEN)?;
    let body = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let total = FRAME_HEADER_LEN + body;
    (buf.len() >= total).then_some(total)
}

async fn pump(
    mut src: OwnedReadHalf,
    mut dst: OwnedWriteHalf,
    client_to_server: bool,
    cut_after: Option<u64>,
    mut rng: StdRng,
    faults: &AtomicBool,
    stats: &FaultStats,
) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut sent = 0u64;
    loop {
        let n = match src.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(len) = whole_frame_len(&buf) {
            let frame: Vec<u8> = buf.drain(..len).collect();
            let twice = client_to_server
                && faults.load(Ordering::SeqCst)
                && duplicate(&frame, &mut rng, stats);
            for _ in 0..1 + usize::from(twice) {
                let ok = forward(
                    &mut dst, &frame, &mut sent, cut_after, &mut rng, faults, stats,
                )
                .await;
                if !ok {
                    return;
                }
            }
        }
    }
}

/// Whether to send this client→server frame twice (counted in `stats`).
fn duplicate(frame: &[u8], rng: &mut StdRng, stats: &FaultStats) -> bool {
    let Ok(Some((msg, _))) = decode_frame::<ClientMsg>(frame, FRAME_LEN_MAX_DEFAULT) else {
        return false;
    };
    let counter = match msg {
        ClientMsg::Upload { more: false, .. } => &stats.dup_uploads,
        ClientMsg::DownloadAck { .. } => &stats.dup_acks,
        ClientMsg::Ping { .. } => &stats.dup_pings,
        _ => return false,
    };
    let dup = rng.random_bool(0.3);
    if dup {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    dup
}

/// Forwards one frame; returns false if the connection was cut (or failed).
async fn forward(
    dst: &mut OwnedWriteHalf,
    frame: &[u8],
    sent: &mut u64,
    cut_after: Option<u64>,
    rng: &mut StdRng,
    faults: &AtomicBool,
    stats: &FaultStats,
) -> bool {
    let mut rest = frame;
    while !rest.is_empty() {
        let on = faults.load(Ordering::SeqCst);
        let n = if on {
            rng.random_range(1..=rest.len().min(4096))
        } else {
            rest.len()
        };
        if on {
            if let Some(limit) = cut_after {
                if *sent + n as u64 > limit {
                    let keep = (limit - *sent) as usize;
                    let _ = dst.write_all(&rest[..keep]).await;
                    let _ = dst.flush().await;
                    stats.cuts.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
            }
            if rng.random_bool(0.05) {
                stats.delays.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(rng.random_range(1..=15))).await;
            }
        }
        if dst.write_all(&rest[..n]).await.is_err() {
            return false;
        }
        *sent += n as u64;
        rest = &rest[n..];
    }
    true
}

// ---------------------------------------------------------------------------------------
// 1. Faults between clients and server
// ---------------------------------------------------------------------------------------

/// Five clients write random field updates through the fault proxy (cuts mid-frame in both
/// directions, delayed chunks, duplicated uploads / download acks / pings). Uploads and
/// downloads are batched small (2 KB / 4 KB) so multi-object inserts travel in pieces and
/// get cut between pieces too. Then the proxy heals and:
/// - every write acknowledged under faults (commit `Ok`, then `wait_for_upload` finished
///   with `last_sync` past it) was on the server at that point, and every write at all is
///   on the server after healing;
/// - each log entry was applied exactly once (server version = sum of log heads; server
///   digest = fresh store importing each client's log once);
/// - every client has the server's digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_network_converges_with_every_write_applied_once() {
    const CLIENTS: usize = 5;
    const TXS: usize = 200;
    let seed = seed();
    eprintln!("faults: seed={seed}");
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = Secret::generate();
    let mut config = ServerConfig::new(secret.clone());
    config.batch_bytes = 4 << 10;
    let server = Server::start(dir.path().join("server.redb"), config, "127.0.0.1:0").await;
    let proxy = Proxy::start(server.addr, seed).await;
    let proxy_addr = proxy.addr.to_string();

    let mut stores = Vec::new();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let store = Arc::new(Store::open(dir.path().join(format!("c{i}.redb"))).expect("open"));
        let config = client_config(&secret, &format!("user{i}"), 2 << 10);
        clients.push(Arc::new(start_client(&store, &proxy_addr, config)));
        stores.push(store);
    }
    let pairs: Vec<_> = stores.iter().zip(clients.iter().map(|c| &**c)).collect();
    let pool = seed_pool(&server.store, &pairs, 6).await;

    // Writers, all at once, under faults.
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (store, client, pool) = (stores[i].clone(), clients[i].clone(), pool.clone());
        let server_store = server.store.clone();
        let wseed = seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        tasks.push(tokio::spawn(async move {
            let mut w = Workload::new(wseed, &format!("c{i}"), pool, (i as i64 + 1) * 1_000_000);
            let mut writes = Vec::new();
            let mut acked = 0;
            for t in 0..TXS {
                writes.extend(w.step(&store));
                if t % 8 == 7 {
                    let head = store.log_head();
                    let done = timeout(Duration::from_secs(5), client.wait_for_upload()).await;
                    if done.is_ok() && store.last_sync() >= head {
                        // Acknowledged: the server must hold it now, faults or not.
                        assert_on(&server_store, &writes, &format!("client {i} under faults"));
                        acked = writes.len();
                    }
                }
                let pause = w.rng.random_range(0..6);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            (writes, acked)
        }));
    }
    let mut all = Vec::new();
    let mut acked_under_faults = 0;
    for t in tasks {
        let (writes, acked) = timeout(SYNC_TIMEOUT, t)
            .await
            .expect("writers finish")
            .expect("writer task");
        acked_under_faults += acked;
        all.extend(writes);
    }
    let faulty_for = started.elapsed();
    proxy.heal();

    converge(&server.store, &pairs).await;
    assert_on(&server.store, &all, "after healing");
    let refs: Vec<&Store> = stores.iter().map(|s| &**s).collect();
    assert_exactly_once(&server.sync, &refs);
    for s in &stores {
        assert_eq!(
            s.scan(COLL).expect("scan"),
            server.store.scan(COLL).expect("scan")
        );
    }

    let st = &proxy.stats;
    let (cuts, dups) = (
        st.cuts.load(Ordering::Relaxed),
        st.dup_uploads.load(Ordering::Relaxed),
    );
    eprintln!(
        "faults: {} field writes in {} transactions ({} acknowledged under faults), {} objects; \
         {} connections, {cuts} cuts, {} delays, duplicated {dups} uploads, {} acks, {} pings; \
         faulty phase {:.1?}, total {:.1?}",
        all.len(),
        server.sync.version(),
        acked_under_faults,
        server.store.count(COLL).expect("count"),
        st.connections.load(Ordering::Relaxed),
        st.delays.load(Ordering::Relaxed),
        st.dup_acks.load(Ordering::Relaxed),
        st.dup_pings.load(Ordering::Relaxed),
        faulty_for,
        started.elapsed(),
    );
    assert!(cuts > 0, "the proxy cut no connection");
    assert!(dups > 0, "the proxy duplicated no upload");

    for c in clients {
        Arc::try_unwrap(c).expect("writers done").stop().await;
    }
    server.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 2. Server restarted mid-sync
// ---------------------------------------------------------------------------------------

/// What one writer task has done: every committed write, and the highest log position
/// `wait_for_upload` confirmed.
#[derive(Default)]
struct Ledger {
    writes: Vec<Written>,
    acked_seq: u64,
}

impl Ledger {
    fn acked(&self) -> Vec<Written> {
        self.writes
            .iter()
            .filter(|w| w.seq <= self.acked_seq)
            .cloned()
            .collect()
    }
}

/// Four clients write continuously while the server is stopped (`ServerHandle::shutdown`),
/// its `SyncServer` and `Store` dropped, the redb file reopened and the server bound again on
/// the same port — twice. Right after each reopen, before any client can reconnect, every
/// write acknowledged before the stop is checked on the reopened store (nothing
/// acknowledged lost). The clients reconnect on their own (backoff); at the end every write
/// is on the server exactly once and everyone converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_sync_loses_nothing_acknowledged() {
    const CLIENTS: usize = 4;
    let seed = seed() ^ 2;
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = Secret::generate();
    let path = dir.path().join("server.redb");
    let config = ServerConfig::new(secret.clone());
    let mut server = Server::start(path.clone(), config.clone(), "127.0.0.1:0").await;
    let addr = server.addr.to_string();

    let mut stores = Vec::new();
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let store = Arc::new(Store::open(dir.path().join(format!("c{i}.redb"))).expect("open"));
        let config = client_config(&secret, &format!("user{i}"), 2 << 10);
        clients.push(Arc::new(start_client(&store, &addr, config)));
        stores.push(store);
    }
    let pairs: Vec<_> = stores.iter().zip(clients.iter().map(|c| &**c)).collect();
    let pool = seed_pool(&server.store, &pairs, 4).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut ledgers = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (store, client, pool) = (stores[i].clone(), clients[i].clone(), pool.clone());
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        ledgers.push(ledger.clone());
        let stop = stop.clone();
        let wseed = seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        tasks.push(tokio::spawn(async move {
            let mut w = Workload::new(wseed, &format!("c{i}"), pool, (i as i64 + 1) * 1_000_000);
            let mut t = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let writes = w.step(&store);
                ledger.lock().expect("ledger").writes.extend(writes);
                t += 1;
                if t.is_multiple_of(4) {
                    let head = store.log_head();
                    let done = timeout(Duration::from_millis(500), client.wait_for_upload()).await;
                    if done.is_ok() && store.last_sync() >= head {
                        let mut l = ledger.lock().expect("ledger");
                        l.acked_seq = l.acked_seq.max(head);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    let mut checked = 0;
    for restart in 0..2 {
        // Let some uploads land on this server incarnation.
        let v0 = server.sync.version();
        timeout(SYNC_TIMEOUT, async {
            while server.sync.version() < v0 + 60 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("uploads reach the server");

        let Server {
            path,
            store,
            sync,
            handle,
            addr,
        } = server;
        handle.shutdown().await;
        drop(sync);
        drop(store);
        // Everything a client saw acknowledged was acknowledged by the server just stopped.
        let acked: Vec<Written> = ledgers
            .iter()
            .flat_map(|l| l.lock().expect("ledger").acked())
            .collect();
        let reopened = Store::open(&path).unwrap_or_else(|e| {
            panic!("restart {restart}: reopening the server store after shutdown: {e}")
        });
        assert_on(&reopened, &acked, &format!("restart {restart}, reopened"));
        checked += acked.len();
        drop(reopened);
        // Clients keep writing (and retrying) while the port is closed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        server = Server::start(path, config.clone(), &addr.to_string()).await;
        assert_eq!(server.addr, addr, "the server came back on the same port");
    }
    // A little more traffic on the last incarnation, then stop writing.
    let v0 = server.sync.version();
    timeout(SYNC_TIMEOUT, async {
        while server.sync.version() < v0 + 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("clients reconnected by themselves");
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        timeout(SYNC_TIMEOUT, t)
            .await
            .expect("writers stop")
            .expect("writer task");
    }

    converge(&server.store, &pairs).await;
    let all: Vec<Written> = ledgers
        .iter()
        .flat_map(|l| l.lock().expect("ledger").writes.clone())
        .collect();
    assert_on(&server.store, &all, "after the restarts");
    let refs: Vec<&Store> = stores.iter().map(|s| &**s).collect();
    assert_exactly_once(&server.sync, &refs);
    eprintln!(
        "restart: {} field writes in {} transactions; 2 restarts, after which {checked} \
         acknowledged writes (cumulative) were checked on the reopened store; {:.1?}",
        all.len(),
        server.sync.version(),
        started.elapsed()
    );
    for c in clients {
        Arc::try_unwrap(c).expect("writers done").stop().await;
    }
    server.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 3. A client process killed mid-upload
// ---------------------------------------------------------------------------------------

const CHILD_DIR_ENV: &str = "FIELDLOG_SYNCF_CHILD_DIR";
const CHILD_ADDR_ENV: &str = "FIELDLOG_SYNCF_CHILD_ADDR";
const CHILD_TOKEN_ENV: &str = "FIELDLOG_SYNCF_CHILD_TOKEN";
const CHILD_SEED_ENV: &str = "FIELDLOG_SYNCF_CHILD_SEED";
const CHILD_STORE: &str = "child.redb";

fn value_to_word(v: &Value) -> String {
    match v {
        Value::Int(i) => format!("i{i}"),
        Value::String(s) => format!("s{s}"),
        other => panic!("the workload writes ints and strings, not {other:?}"),
    }
}

fn word_to_value(w: &str) -> Value {
    match w.split_at(1) {
        ("i", n) => Value::Int(n.parse().expect("int")),
        ("s", s) => Value::String(s.to_owned()),
        _ => panic!("bad value word {w:?}"),
    }
}

/// The client process of `client_process_killed_mid_upload`: syncs a store with the server
/// and writes forever, printing `W seq pk field stamp value` for each field write whose
/// commit returned `Ok`, and `A seq` when `wait_for_upload` confirmed everything up to `seq`.
/// A no-op without its environment, so running ignored tests by hand is harmless.
#[test]
#[ignore = "the child process of client_process_killed_mid_upload"]
fn sync_child_writer() {
    use std::io::Write as _;
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("child: {k}"));
    let (addr, token) = (env(CHILD_ADDR_ENV), env(CHILD_TOKEN_ENV));
    let seed: u64 = env(CHILD_SEED_ENV).parse().expect("child seed");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("child runtime");
    rt.block_on(async move {
        let store = Arc::new(
            Store::open(std::path::Path::new(&dir).join(CHILD_STORE)).expect("child: open"),
        );
        let pool: Vec<i64> = store
            .scan(COLL)
            .expect("child: scan")
            .into_iter()
            .filter_map(|o| match o.pk {
                fieldlog::Pk::Int(i) => Some(i),
                _ => None,
            })
            .collect();
        let mut config = ClientConfig::new(token);
        config.batch_bytes = 2 << 10;
        let client = start_client(&store, &addr, config);
        // Fresh pks every run: a transaction inserts at most 10 objects.
        let first_pk = 50_000_000 + store.log_head() as i64 * 100;
        let mut w = Workload::new(seed, "child", pool, first_pk);
        let deadline = Instant::now() + Duration::from_secs(60);
        let stdout = std::io::stdout();
        for t in 0u64.. {
            let writes = w.step(&store);
            let mut out = stdout.lock();
            for x in &writes {
                writeln!(
                    out,
                    "W {} {} {} {} {} {}",
                    x.seq,
                    x.pk,
                    x.field,
                    x.stamp.time,
                    x.stamp.replica.0,
                    value_to_word(&x.value)
                )
                .expect("child: stdout");
            }
            out.flush().expect("child: flush");
            drop(out);
            if t % 3 == 2 {
                let head = store.log_head();
                if timeout(Duration::from_millis(300), client.wait_for_upload())
                    .await
                    .is_ok()
                    && store.last_sync() >= head
                {
                    println!("A {head}");
                }
            }
            assert!(Instant::now() < deadline, "child: not killed within 60 s");
        }
    });
}

/// A client *process* (this test binary re-executed as `sync_child_writer`) syncs and
/// writes through real TCP and is SIGKILLed mid-upload, three times, each time restarted on
/// the same store file. After each kill, every write the child saw acknowledged is on the
/// server. After the last, the store is opened in this process with a new `SyncClient`:
/// every committed write (acknowledged or not at the kill) reaches the server exactly once,
/// and the child's store, the server and a second client converge.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_process_killed_mid_upload() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let seed = seed() ^ 3;
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = Secret::generate();
    let mut config = ServerConfig::new(secret.clone());
    config.batch_bytes = 4 << 10;
    let server = Server::start(dir.path().join("server.redb"), config, "127.0.0.1:0").await;
    let addr = server.addr.to_string();

    // A second, in-process client shares objects with the child.
    let other = Arc::new(Store::open(dir.path().join("other.redb")).expect("open"));
    let other_client = start_client(&other, &addr, client_config(&secret, "other", 2 << 10));
    other
        .write(|tx| {
            for pk in 0..5 {
                tx.insert(COLL, pk, [("a", Value::Int(pk))])?;
            }
            Ok(())
        })
        .expect("seed");
    timeout(SYNC_TIMEOUT, other_client.wait_for_upload())
        .await
        .expect("seed upload")
        .expect("seed upload");

    let exe = std::env::current_exe().expect("current_exe");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut written: Vec<Written> = Vec::new();
    let mut unacked_at_kill = 0;
    for cycle in 0..3u64 {
        let mut child = Command::new(&exe)
            .args(["--exact", "sync_child_writer", "--nocapture", "--ignored"])
            .args(["--test-threads", "1"])
            .env(CHILD_DIR_ENV, dir.path())
            .env(CHILD_ADDR_ENV, &addr)
            .env(CHILD_TOKEN_ENV, token_for(&secret, "child"))
            .env(CHILD_SEED_ENV, (seed ^ cycle).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the child");
        let stdout = child.stdout.take().expect("child stdout");
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let reader = {
            let lines = lines.clone();
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(stdout);
                loop {
                    let mut line = String::new();
                    match r.read_line(&mut line) {
                        // A line cut short by the kill says nothing (its value may be torn).
                        Ok(0) | Err(_) => break,
                        Ok(_) if !line.ends_with('\n') => break,
                        Ok(_) => lines
                            .lock()
                            .expect("lines")
                            .push(line.trim_end().to_owned()),
                    }
                }
            })
        };
        // Kill it once it has committed a few transactions, at a random moment after.
        timeout(Duration::from_secs(60), async {
            while lines.lock().expect("lines").len() < 150 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the child writes");
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..250))).await;
        child.kill().expect("SIGKILL the child");
        child.wait().expect("wait for the child");
        reader.join().expect("reader");

        let mut acked_seq = 0;
        let mut cycle_writes = Vec::new();
        for line in lines.lock().expect("lines").iter() {
            // libtest may print "test sync_child_writer ... " before the first line.
            let line = match (line.find("W "), line.find("A ")) {
                (Some(i), _) | (None, Some(i)) => &line[i..],
                _ => continue,
            };
            let parts: Vec<&str> = line.split(' ').collect();
            match parts.as_slice() {
                ["A", seq] => acked_seq = seq.parse().expect("seq"),
                ["W", seq, pk, field, time, replica, value] => cycle_writes.push(Written {
                    seq: seq.parse().expect("seq"),
                    pk: pk.parse().expect("pk"),
                    field: (*field).to_owned(),
                    stamp: Stamp {
                        time: time.parse().expect("time"),
                        replica: fieldlog::ReplicaId(replica.parse().expect("replica")),
                    },
                    value: word_to_value(value),
                }),
                // A line torn by the kill acknowledges nothing.
                _ => {}
            }
        }
        let acked: Vec<Written> = cycle_writes
            .iter()
            .filter(|w| w.seq <= acked_seq)
            .cloned()
            .collect();
        assert_on(
            &server.store,
            &acked,
            &format!("cycle {cycle}, after the kill"),
        );
        unacked_at_kill += cycle_writes.len() - acked.len();
        written.extend(cycle_writes);
    }

    // Restart the client in this process and let it finish the upload.
    let store = Arc::new(Store::open(dir.path().join(CHILD_STORE)).expect("reopen after kill"));
    let client = start_client(&store, &addr, client_config(&secret, "child", 2 << 10));
    converge(&server.store, &[(&store, &client), (&other, &other_client)]).await;
    assert_on(&server.store, &written, "after the restart");
    assert_on(&store, &written, "child store after the restart");
    assert_exactly_once(&server.sync, &[&store, &other]);
    eprintln!(
        "killed client: 3 SIGKILLs, {} field writes committed by the child in {} transactions, \
         {unacked_at_kill} of them unacknowledged at a kill, {:.1?}",
        written.len(),
        store.log_head(),
        started.elapsed()
    );
    client.stop().await;
    other_client.stop().await;
    server.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 4. A transaction far over the frame limit
// ---------------------------------------------------------------------------------------

/// One transaction of `BIG_OBJECTS` objects × 4 KB (about 100 MB, six times the 16 MiB
/// frame limit) syncs from client A through the server to client B with no error reported
/// on either client, and B ends with the server's (and A's) digest.
///
/// Atomicity: the server applies a pieced upload in one redb transaction when its last
/// piece arrives, and a client applies a pieced download in one transaction when its last
/// piece arrives. So a reader polling the object count — of the server while A uploads,
/// and of B while it downloads — sees 0 or all `BIG_OBJECTS` objects, never a part. The
/// test polls both counts from plain threads throughout and asserts exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabyte_transaction_syncs_atomically() {
    const BIG_OBJECTS: i64 = 25_000;
    const VALUE_LEN: usize = 4 << 10;
    const BIG: &str = "Big";
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = Secret::generate();
    let server = Server::start(
        dir.path().join("server.redb"),
        ServerConfig::new(secret.clone()),
        "127.0.0.1:0",
    )
    .await;
    let addr = server.addr.to_string();
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let hooks = |who: &'static str| {
        let errors = errors.clone();
        let mut hooks = ClientHooks::default();
        hooks.on_error = Some(Arc::new(move |e| {
            errors.lock().expect("errors").push(format!("{who}: {e}"));
        }));
        hooks
    };
    let a = Arc::new(Store::open(dir.path().join("a.redb")).expect("open a"));
    let b = Arc::new(Store::open(dir.path().join("b.redb")).expect("open b"));
    let token = |u| token_for(&secret, u);
    let ca = SyncClient::start(
        a.clone(),
        Transport::Tcp(addr.clone()),
        ClientConfig::new(token("a")),
        hooks("a"),
    );
    let cb = SyncClient::start(
        b.clone(),
        Transport::Tcp(addr.clone()),
        ClientConfig::new(token("b")),
        hooks("b"),
    );

    // Readers of the two counts, on threads of their own (a count waits for a running
    // import to commit, which must not stall the runtime).
    let done = Arc::new(AtomicBool::new(false));
    let poll = |store: Arc<Store>| {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut seen = BTreeMap::<u64, u64>::new();
            while !done.load(Ordering::SeqCst) {
                *seen.entry(store.count(BIG).expect("count")).or_default() += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            seen
        })
    };
    let server_poll = poll(server.store.clone());
    let b_poll = poll(b.clone());

    let value = |i: i64| {
        let mut v = vec![0u8; VALUE_LEN];
        v[..8].copy_from_slice(&i.to_le_bytes());
        Value::Bytes(v)
    };
    let (_, c) = a
        .write(|tx| {
            for i in 0..BIG_OBJECTS {
                tx.insert(BIG, i, [("blob", value(i))])?;
            }
            Ok(())
        })
        .expect("the big transaction commits");
    let bytes = a.log_after(0, 1).expect("log")[0]
        .writes
        .iter()
        .map(|w| match &w.op {
            fieldlog::Op::Insert { fields } => fields.iter().map(|(_, v)| v.size_bytes()).sum(),
            _ => 0,
        })
        .sum::<usize>();
    let written_at = started.elapsed();
    // One more small transaction after it, so B must get past the big one.
    a.write(|tx| tx.insert("Small", 1, [("after", Value::Int(1))]))
        .expect("small write");
    converge(&server.store, &[(&a, &ca), (&b, &cb)]).await;
    done.store(true, Ordering::SeqCst);
    let server_seen = server_poll.join().expect("server poller");
    let b_seen = b_poll.join().expect("b poller");

    let n = BIG_OBJECTS as u64;
    assert_eq!(c.seq, Some(1));
    assert!(
        bytes > 6 * (16 << 20),
        "{bytes} bytes is not over the frame limit"
    );
    assert_eq!(b.count(BIG).expect("count"), n);
    assert_eq!(
        b.get(BIG, 12_345)
            .expect("get")
            .expect("object")
            .get("blob"),
        Some(&value(12_345))
    );
    assert_eq!(b.digest(), a.digest());
    assert_eq!(
        errors.lock().expect("errors").as_slice(),
        &[] as &[String],
        "sync errors"
    );
    for (who, seen) in [("server", &server_seen), ("b", &b_seen)] {
        assert!(
            seen.keys().all(|&k| k == 0 || k == n),
            "{who} showed part of the transaction: counts seen {seen:?}"
        );
    }
    assert_exactly_once(&server.sync, &[&a, &b]);
    eprintln!(
        "big: {n} objects, {} MB of values in one transaction (written in {written_at:.1?}); \
         server counts seen {server_seen:?}, B counts seen {b_seen:?}; total {:.1?}",
        bytes >> 20,
        started.elapsed()
    );
    ca.stop().await;
    cb.stop().await;
    server.handle.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 5. Offline writes
// ---------------------------------------------------------------------------------------

/// Client A goes offline and writes 1,000 single-field transactions to 9 fields (3 objects
/// × 3 fields) while client B, online, writes to the same fields. Offline, nothing of A's
/// reaches the server. Back online: all 1,000 entries are applied exactly once, each field
/// on every replica holds the write with the highest stamp, and everyone converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_writes_sync_when_back_online() {
    const OFFLINE_TXS: usize = 1_000;
    const FIELDS: [&str; 3] = ["x", "y", "z"];
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed() ^ 5);
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = Secret::generate();
    let server = Server::start(
        dir.path().join("server.redb"),
        ServerConfig::new(secret.clone()),
        "127.0.0.1:0",
    )
    .await;
    let addr = server.addr.to_string();
    let a = Arc::new(Store::open(dir.path().join("a.redb")).expect("open a"));
    let b = Arc::new(Store::open(dir.path().join("b.redb")).expect("open b"));
    let ca = start_client(&a, &addr, client_config(&secret, "a", 1 << 20));
    let cb = start_client(&b, &addr, client_config(&secret, "b", 1 << 20));

    let mut writes: Vec<Written> = Vec::new();
    let (_, c) = a
        .write(|tx| {
            for pk in 1..=3 {
                tx.insert(COLL, pk, FIELDS.map(|f| (f, Value::Int(0))))?;
            }
            Ok(())
        })
        .expect("insert");
    for pk in 1..=3 {
        for f in FIELDS {
            writes.push(Written {
                seq: c.seq.expect("seq"),
                pk,
                field: f.to_owned(),
                value: Value::Int(0),
                stamp: c.stamp.expect("stamp"),
            });
        }
    }
    converge(&server.store, &[(&a, &ca), (&b, &cb)]).await;

    ca.set_online(false);
    timeout(SYNC_TIMEOUT, async {
        while ca.state() != ConnectionState::Disconnected {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("A goes offline");
    let a_uploaded = server.sync.uploaded(a.replica_id()).expect("uploaded");
    let a_synced = a.last_sync();

    let mut one = |store: &Store, who: &str, i: usize, rng: &mut StdRng| {
        let pk = rng.random_range(1..=3i64);
        let field = FIELDS[rng.random_range(0..3)];
        let value = Value::String(format!("{who}{i}"));
        let (_, c) = store
            .write(|tx| tx.set(COLL, pk, field, value.clone()))
            .expect("write");
        writes.push(Written {
            seq: c.seq.expect("seq"),
            pk,
            field: field.to_owned(),
            value,
            stamp: c.stamp.expect("stamp"),
        });
    };
    for i in 0..OFFLINE_TXS {
        one(&a, "a", i, &mut rng);
        if i % 50 == 0 {
            one(&b, "b", i, &mut rng);
        }
    }
    // B's writes are uploaded while A is offline; none of A's are.
    timeout(SYNC_TIMEOUT, cb.wait_for_upload())
        .await
        .expect("B uploads")
        .expect("B uploads");
    assert_eq!(
        server.sync.uploaded(a.replica_id()).expect("uploaded"),
        a_uploaded
    );
    assert_eq!(a.last_sync(), a_synced);
    assert_eq!(a.log_head() - a_synced, OFFLINE_TXS as u64);
    let version_before = server.sync.version();

    ca.set_online(true);
    converge(&server.store, &[(&a, &ca), (&b, &cb)]).await;
    assert_eq!(
        server.sync.version() - version_before,
        OFFLINE_TXS as u64,
        "each offline transaction applied once"
    );
    assert_exactly_once(&server.sync, &[&a, &b]);
    for pk in 1..=3 {
        for f in FIELDS {
            let newest = writes
                .iter()
                .filter(|w| w.pk == pk && w.field == f)
                .max_by_key(|w| w.stamp)
                .expect("written");
            for (who, store) in [("server", &server.store), ("a", &a), ("b", &b)] {
                assert_eq!(
                    store.get_field(COLL, pk, f).expect("get_field"),
                    Some((newest.value.clone(), newest.stamp)),
                    "{who}: {COLL}[{pk}].{f}"
                );
            }
        }
    }
    eprintln!(
        "offline: {OFFLINE_TXS} offline transactions by A, {} by B meanwhile, {:.1?}",
        b.log_head(),
        started.elapsed()
    );
    ca.stop().await;
    cb.stop().await;
    server.handle.shutdown().await;
}
