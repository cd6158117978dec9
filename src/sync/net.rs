//! The transport: tokio, TCP and an in-process pipe. The only sync module with sockets,
//! timers and tasks; it moves frames between the sans-IO sessions and the network.
//!
//! Each connection has a reader task that drains the socket into a channel, so a side
//! blocked on writing never stops reading: two peers writing at once cannot deadlock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::clock::{SystemTimeSource, TimeSource};
use crate::reset::ResetReport;
use crate::store::Store;
use crate::sync::client::{
    subscriptions, subscriptions_acked, update_subscriptions, ClientConfig, ClientSession,
    SyncError,
};
use crate::sync::frame::{read_frame, write_frame, FrameError, FRAME_LEN_MAX_DEFAULT};
use crate::sync::protocol::Subscription;
use crate::sync::protocol::{ClientMsg, ServerMsg};
use crate::sync::server::SyncServer;

/// A byte stream a session can run over.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Spawns a task that reads frames into a channel until EOF or an error.
fn spawn_reader<M, R>(mut rd: R) -> mpsc::UnboundedReceiver<Result<M, FrameError>>
where
    M: serde::de::DeserializeOwned + serde::Serialize + Send + 'static,
    R: AsyncRead + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match read_frame::<M, _>(&mut rd, FRAME_LEN_MAX_DEFAULT).await {
                Ok(Some(m)) => {
                    if tx.send(Ok(m)).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    break;
                }
            }
        }
    });
    rx
}

/// A running sync server. Dropping it does not stop it; call [`ServerHandle::shutdown`].
#[derive(Debug)]
pub struct ServerHandle {
    server: Arc<SyncServer>,
    addr: Option<SocketAddr>,
    versions: watch::Sender<u64>,
    stop: watch::Sender<bool>,
    accept: Option<JoinHandle<()>>,
    connections: Arc<AtomicU64>,
    /// Cloned into every connection task; [`ServerHandle::shutdown`] waits until the last
    /// clone is dropped, i.e. every connection has ended and released the server.
    alive: mpsc::Sender<()>,
    alive_rx: mpsc::Receiver<()>,
}

impl ServerHandle {
    /// Serves `server` on `addr` (use port 0 for a free port).
    pub async fn bind(server: Arc<SyncServer>, addr: &str) -> std::io::Result<ServerHandle> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let mut handle = ServerHandle::in_process(server);
        handle.addr = Some(local);
        let (server, versions, stop, conns, alive) = (
            Arc::clone(&handle.server),
            handle.versions.clone(),
            handle.stop.subscribe(),
            Arc::clone(&handle.connections),
            handle.alive.clone(),
        );
        handle.accept = Some(tokio::spawn(accept_loop(
            listener, server, versions, stop, conns, alive,
        )));
        Ok(handle)
    }

    /// A server reachable only through [`ServerHandle::connect_in_process`].
    pub fn in_process(server: Arc<SyncServer>) -> ServerHandle {
        let (versions, _) = watch::channel(server.version());
        let (stop, _) = watch::channel(false);
        let (alive, alive_rx) = mpsc::channel(1);
        ServerHandle {
            server,
            addr: None,
            versions,
            stop,
            accept: None,
            connections: Arc::new(AtomicU64::new(0)),
            alive,
            alive_rx,
        }
    }

    /// The TCP address it listens on, if any.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// The shared server state.
    pub fn server(&self) -> &Arc<SyncServer> {
        &self.server
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// A connection through an in-memory pipe, served like a TCP one.
    pub fn connect_in_process(&self) -> tokio::io::DuplexStream {
        let (a, b) = tokio::io::duplex(1 << 20);
        self.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve_connection(
            Arc::clone(&self.server),
            b,
            self.versions.clone(),
            self.stop.subscribe(),
            self.alive.clone(),
        ));
        a
    }

    /// Stops accepting, closes every connection, and waits until the accept loop and every
    /// connection task have ended, so the server's store is no longer used by this handle
    /// (it can be dropped and its file reopened). Everything acknowledged was committed
    /// durably before its acknowledgement was sent.
    pub async fn shutdown(self) {
        let ServerHandle {
            stop,
            accept,
            alive,
            mut alive_rx,
            ..
        } = self;
        let _ = stop.send(true);
        if let Some(t) = accept {
            let _ = t.await;
        }
        drop(alive);
        // Nothing is ever sent: this returns once every connection's clone is dropped.
        let _ = alive_rx.recv().await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    server: Arc<SyncServer>,
    versions: watch::Sender<u64>,
    mut stop: watch::Receiver<bool>,
    connections: Arc<AtomicU64>,
    alive: mpsc::Sender<()>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(serve_connection(
                        Arc::clone(&server),
                        stream,
                        versions.clone(),
                        stop.clone(),
                        alive.clone(),
                    ));
                }
                Err(e) => {
                    tracing_warn(&format!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
}

fn tracing_warn(msg: &str) {
    eprintln!("fieldlog: {msg}");
}

/// Serves one connection until it ends or the server stops. `_alive` is dropped when it
/// returns, which is what [`ServerHandle::shutdown`] waits for.
async fn serve_connection<S: Stream>(
    server: Arc<SyncServer>,
    stream: S,
    versions: watch::Sender<u64>,
    stop: watch::Receiver<bool>,
    _alive: mpsc::Sender<()>,
) {
    let mut stopped = stop.clone();
    tokio::select! {
        biased;
        () = serve_session(server, stream, versions, stop) => {}
        // A session blocked writing to a peer that does not read is dropped on stop, so
        // shutdown never waits on a client.
        _ = stopped.wait_for(|s| *s) => {}
    }
}

async fn serve_session<S: Stream>(
    server: Arc<SyncServer>,
    stream: S,
    versions: watch::Sender<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut inbox = spawn_reader::<ClientMsg, _>(rd);
    let mut session = server.session();
    let mut version_rx = versions.subscribe();
    let time = SystemTimeSource;
    // Writes made on the server itself (not uploads) do not pass through the version
    // channel; a slow tick picks them up.
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    'conn: loop {
        for m in session.poll_download() {
            if write_frame(&mut wr, &m, FRAME_LEN_MAX_DEFAULT)
                .await
                .is_err()
            {
                break 'conn;
            }
        }
        if session.is_closed() {
            break;
        }
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            m = inbox.recv() => {
                let out = match m {
                    None => break,
                    Some(Ok(msg)) => {
                        let is_upload = matches!(msg, ClientMsg::Upload { .. });
                        let out = session.on_message(msg, time.now_ms());
                        if is_upload {
                            versions.send_replace(server.version());
                        }
                        out
                    }
                    Some(Err(e)) => session.on_bad_frame(&e.to_string()),
                };
                for m in out {
                    if write_frame(&mut wr, &m, FRAME_LEN_MAX_DEFAULT).await.is_err() {
                        break 'conn;
                    }
                }
                if session.is_closed() {
                    break;
                }
            }
            _ = version_rx.changed() => {}
            _ = tick.tick() => {}
        }
    }
    let _ = wr.shutdown().await;
}

/// Where a client connects.
#[derive(Clone, Debug)]
pub enum Transport {
    /// A TCP address, `host:port`.
    Tcp(String),
    /// A server in the same process (tests).
    InProcess(Arc<InProcessServer>),
}

/// A handle through which in-process clients reach a server.
#[derive(Debug)]
pub struct InProcessServer(ServerHandle);

impl InProcessServer {
    /// Wraps a server handle for in-process connections.
    pub fn new(handle: ServerHandle) -> Arc<Self> {
        Arc::new(InProcessServer(handle))
    }
    /// The server handle.
    pub fn handle(&self) -> &ServerHandle {
        &self.0
    }
}

async fn connect(t: &Transport) -> std::io::Result<Box<dyn StreamBox>> {
    match t {
        Transport::Tcp(addr) => {
            let s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Ok(Box::new(s))
        }
        Transport::InProcess(server) => Ok(Box::new(server.0.connect_in_process())),
    }
}

trait StreamBox: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> StreamBox for T {}

/// The client's connection state, reported to the state callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not connected (paused, or waiting to retry).
    Disconnected,
    /// Connecting and handshaking.
    Connecting,
    /// Handshake done; syncing.
    Connected,
}

/// A callback for connection state changes.
pub type StateCallback = Arc<dyn Fn(ConnectionState) + Send + Sync>;
/// A callback for sync errors.
pub type ErrorCallback = Arc<dyn Fn(&SyncError) + Send + Sync>;
/// A callback for finished client resets.
pub type ResetCallback = Arc<dyn Fn(&ResetReport) + Send + Sync>;

struct Shared {
    store: Arc<Store>,
    state: Mutex<ConnectionState>,
    online: AtomicBool,
    stopped: AtomicBool,
    wake: Notify,
    ping_wanted: AtomicU64,
    pong: AtomicU64,
    server_version: AtomicU64,
    /// The session's [`ClientSession::downloaded`].
    downloaded: AtomicU64,
    fatal: Mutex<Option<String>>,
    on_state: Option<StateCallback>,
    on_error: Option<ErrorCallback>,
    on_reset: Option<ResetCallback>,
    reports: Mutex<Vec<ResetReport>>,
    subscription_errors: Mutex<Vec<(u64, String)>>,
}

impl Shared {
    fn set_state(&self, s: ConnectionState) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = s;
        if let Some(cb) = &self.on_state {
            cb(s);
        }
    }
}

/// Options of a [`SyncClient`] beyond the session's.
#[derive(Clone, Default)]
pub struct ClientHooks {
    /// Called on every connection state change.
    pub on_state: Option<StateCallback>,
    /// Called on every error (transient ones too, before the retry).
    pub on_error: Option<ErrorCallback>,
    /// Called when a client reset finishes, with its report.
    pub on_reset: Option<ResetCallback>,
}

/// A client that keeps a store in sync with a server, in the background on tokio.
pub struct SyncClient {
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SyncClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncClient")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl SyncClient {
    /// Starts syncing `store` with the server at `transport`. Must be called inside a
    /// tokio runtime.
    pub fn start(
        store: Arc<Store>,
        transport: Transport,
        config: ClientConfig,
        hooks: ClientHooks,
    ) -> SyncClient {
        let shared = Arc::new(Shared {
            store,
            state: Mutex::new(ConnectionState::Disconnected),
            online: AtomicBool::new(true),
            stopped: AtomicBool::new(false),
            wake: Notify::new(),
            ping_wanted: AtomicU64::new(0),
            pong: AtomicU64::new(0),
            server_version: AtomicU64::new(0),
            downloaded: AtomicU64::new(0),
            fatal: Mutex::new(None),
            on_state: hooks.on_state,
            on_error: hooks.on_error,
            on_reset: hooks.on_reset,
            reports: Mutex::new(Vec::new()),
            subscription_errors: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(run(Arc::clone(&shared), transport, config));
        SyncClient {
            shared,
            task: Some(task),
        }
    }

    /// The current connection state.
    pub fn state(&self) -> ConnectionState {
        *self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The error that stopped the client for good, if one did (a bad token, say).
    pub fn fatal_error(&self) -> Option<String> {
        self.shared
            .fatal
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reports of client resets finished since the last call.
    pub fn take_reset_reports(&self) -> Vec<ResetReport> {
        std::mem::take(
            &mut *self
                .shared
                .reports
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Changes the subscriptions in one call (add, remove, replace) and sends them; returns
    /// the new set's version. Objects entering the view are downloaded, objects leaving it
    /// are removed locally (not deleted).
    pub fn update_subscriptions(
        &self,
        change: impl FnOnce(&mut Vec<Subscription>),
    ) -> crate::error::Result<u64> {
        let v = update_subscriptions(&self.shared.store, change)?;
        self.shared.wake.notify_waiters();
        Ok(v)
    }

    /// Waits until the server has confirmed the current subscription set and the client
    /// holds its view; an error if the server refused the set.
    pub async fn wait_for_subscriptions(&self) -> Result<(), String> {
        let want = match subscriptions(&self.shared.store) {
            Ok(Some(s)) => s.version,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        loop {
            if let Some((_, m)) = self
                .shared
                .subscription_errors
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .find(|(v, _)| *v >= want)
            {
                return Err(m.clone());
            }
            match subscriptions_acked(&self.shared.store) {
                Ok(acked) if acked >= want => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
            if self.is_dead() {
                return Err(self.fatal_error().unwrap_or_else(|| "stopped".into()));
            }
            self.shared.wake.notify_waiters();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Goes offline (closes the connection) or back online. Writes keep working offline.
    pub fn set_online(&self, online: bool) {
        self.shared.online.store(online, Ordering::SeqCst);
        self.shared.wake.notify_waiters();
    }

    /// Waits until every local write committed before the call is acknowledged by the
    /// server.
    pub async fn wait_for_upload(&self) {
        let target = self.shared.store.log_head();
        while self.shared.store.last_sync() < target && !self.is_dead() {
            self.shared.wake.notify_waiters();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until every change the server had accepted when the call was made is applied
    /// locally.
    pub async fn wait_for_download(&self) {
        let id = self.shared.ping_wanted.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.wake.notify_waiters();
        while self.shared.pong.load(Ordering::SeqCst) < id && !self.is_dead() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let target = self.shared.server_version.load(Ordering::SeqCst);
        // Not the cursor in the database: a reader may see it before its commit returns.
        while self.shared.downloaded.load(Ordering::SeqCst) < target && !self.is_dead() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn is_dead(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
            || self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops syncing and waits for the background task to end.
    pub async fn stop(mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.wake.notify_waiters();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for SyncClient {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.wake.notify_waiters();
    }
}

const BACKOFF_MIN_MS: u64 = 20;
const BACKOFF_MAX_MS: u64 = 2_000;

async fn run(shared: Arc<Shared>, transport: Transport, config: ClientConfig) {
    let mut backoff = BACKOFF_MIN_MS;
    while !shared.stopped.load(Ordering::SeqCst) {
        if !shared.online.load(Ordering::SeqCst) {
            shared.set_state(ConnectionState::Disconnected);
            let _ = tokio::time::timeout(Duration::from_millis(50), shared.wake.notified()).await;
            continue;
        }
        shared.set_state(ConnectionState::Connecting);
        let r = match connect(&transport).await {
            Ok(stream) => {
                let r = run_connection(&shared, stream, &config, &mut backoff).await;
                r.err()
            }
            Err(e) => Some(SyncError::Io(e.to_string())),
        };
        shared.set_state(ConnectionState::Disconnected);
        if let Some(e) = r {
            if let Some(cb) = &shared.on_error {
                cb(&e);
            }
            if !e.is_transient() {
                *shared.fatal.lock().unwrap_or_else(PoisonError::into_inner) = Some(e.to_string());
                shared.stopped.store(true, Ordering::SeqCst);
                break;
            }
            let jitter = rand::random::<u64>() % (backoff / 2 + 1);
            let _ = tokio::time::timeout(
                Duration::from_millis(backoff + jitter),
                shared.wake.notified(),
            )
            .await;
            backoff = (backoff * 2).min(BACKOFF_MAX_MS);
        }
    }
}

/// Runs one connection until it fails, the client goes offline, or it is stopped.
async fn run_connection(
    shared: &Arc<Shared>,
    stream: Box<dyn StreamBox>,
    config: &ClientConfig,
    backoff: &mut u64,
) -> Result<(), SyncError> {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut inbox = spawn_reader::<ServerMsg, _>(rd);
    let mut session = ClientSession::new(Arc::clone(&shared.store), config.clone());
    let io = |e: FrameError| SyncError::Io(e.to_string());
    write_frame(&mut wr, &session.hello()?, FRAME_LEN_MAX_DEFAULT)
        .await
        .map_err(io)?;
    let mut pinged = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    loop {
        if shared.stopped.load(Ordering::SeqCst) || !shared.online.load(Ordering::SeqCst) {
            let _ = wr.shutdown().await;
            return Ok(());
        }
        while let Some(m) = session.poll_upload()? {
            write_frame(&mut wr, &m, FRAME_LEN_MAX_DEFAULT)
                .await
                .map_err(io)?;
        }
        let wanted = shared.ping_wanted.load(Ordering::SeqCst);
        if wanted > pinged && session.server_version() != (0, u64::MAX) {
            pinged = wanted;
            write_frame(
                &mut wr,
                &ClientMsg::Ping { id: wanted },
                FRAME_LEN_MAX_DEFAULT,
            )
            .await
            .map_err(io)?;
        }
        tokio::select! {
            m = inbox.recv() => {
                let msg = match m {
                    None => return Err(SyncError::Io("server closed the connection".into())),
                    Some(Err(e)) => return Err(io(e)),
                    Some(Ok(msg)) => msg,
                };
                let welcome = matches!(msg, ServerMsg::Welcome { .. });
                let replies = session.on_message(msg)?;
                let refused = session.take_refused_writes();
                if !refused.is_empty() {
                    if let Some(cb) = &shared.on_error {
                        cb(&SyncError::CompensatingWrite { refused });
                    }
                }
                shared
                    .subscription_errors
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(session.take_subscription_errors());
                for report in session.take_reset_reports() {
                    if let Some(cb) = &shared.on_reset {
                        cb(&report);
                    }
                    shared.reports.lock().unwrap_or_else(PoisonError::into_inner).push(report);
                }
                if welcome {
                    *backoff = BACKOFF_MIN_MS;
                    shared.set_state(ConnectionState::Connected);
                }
                let (version, pong) = session.server_version();
                shared.server_version.fetch_max(version, Ordering::SeqCst);
                shared.pong.fetch_max(pong, Ordering::SeqCst);
                shared.downloaded.store(session.downloaded(), Ordering::SeqCst);
                for r in replies {
                    write_frame(&mut wr, &r, FRAME_LEN_MAX_DEFAULT).await.map_err(io)?;
                }
            }
            _ = tick.tick() => {}
            _ = shared.wake.notified() => {}
        }
    }
}
