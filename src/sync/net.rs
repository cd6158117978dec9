//! The transport: tokio, TCP and an in-process pipe. The only sync module with sockets,
//! timers and tasks; it moves frames between the sans-IO sessions and the network.
//!
//! Each connection has a reader task that drains the socket into a channel, so a side
//! blocked on writing never stops reading: two peers writing at once cannot deadlock. On the
//! server the channel and the bytes it holds are bounded ([`Limits`]): a peer that sends
//! faster than its session handles is read no further until the session catches up, and a
//! session that cannot write a reply within the idle deadline ends.

mod budget;
mod frame_io;
mod sync_client;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::clock::{SystemTimeSource, TimeSource};
use crate::sync::frame::{encode_frame, FrameError, FRAME_LEN_MAX_DEFAULT};
use crate::sync::protocol::{ClientMsg, ErrorCode, ServerMsg};
use crate::sync::server::{Limits, ServerSession, SyncServer};
use budget::{Budgets, ConnBuffer, PiecesHeld, Ticket};

pub use budget::ServerStats;
pub use frame_io::{read_frame, read_frame_within, write_frame, ReadBudget, Unbounded};
pub use sync_client::{
    ClientHooks, ConnectionState, ErrorCallback, ResetCallback, SetOnline, StateCallback,
    StuckUpload, SyncClient, SyncStatus, TokenFuture, TokenProvider, WaitError, KEEPALIVE_DEFAULT,
    UPLOAD_FAILURES_REPORTED,
};

/// A byte stream a session can run over.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// Messages a server connection's reader may queue ahead of its session (each also holds
/// its bytes in the connection's buffer budget).
const INBOX_MESSAGES: usize = 64;

/// Runs store work that may take long (an upload's commit, a download's import) so that
/// it does not hold up the runtime's other tasks: on a multi-threaded runtime the worker
/// hands its other tasks to another thread first.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A task aborted when this is dropped: a reader never outlives its connection (and never
/// keeps its socket open after the session ended).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Inbox = mpsc::Receiver<Result<(ClientMsg, Ticket), FrameError>>;

/// Spawns the reader of a server connection: frames of at most `frame_max` bytes (the
/// handshake's limit until the session raises it), each reserved in `conn` until handled.
/// After the first frame it waits for the session's verdict on it: nothing more is read
/// from a peer that has not authenticated.
fn spawn_server_reader<R>(
    mut rd: R,
    conn: Arc<ConnBuffer>,
    mut frame_max: watch::Receiver<usize>,
) -> (AbortOnDrop, Inbox)
where
    R: AsyncRead + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::channel(INBOX_MESSAGES);
    let task = tokio::spawn(async move {
        let mut first = true;
        loop {
            let max = *frame_max.borrow_and_update();
            let mut ticket = conn.ticket();
            match read_frame_within::<ClientMsg, _, _>(&mut rd, max, &mut ticket).await {
                Ok(Some(m)) => {
                    if tx.send(Ok((m, ticket))).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    break;
                }
            }
            if std::mem::take(&mut first) && frame_max.changed().await.is_err() {
                break;
            }
        }
    });
    (AbortOnDrop(task), rx)
}

/// Spawns a task that reads frames into a channel until EOF or an error (the client's
/// side: it trusts its server, whose sends are bounded by the protocol's windows).
fn spawn_reader<M, R>(mut rd: R) -> (AbortOnDrop, mpsc::UnboundedReceiver<Result<M, FrameError>>)
where
    M: serde::de::DeserializeOwned + serde::Serialize + Send + 'static,
    R: AsyncRead + Send + Unpin + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
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
    (AbortOnDrop(task), rx)
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
    budgets: Arc<Budgets>,
    /// Cloned into every connection task; [`ServerHandle::shutdown`] waits until the last
    /// clone is dropped, i.e. every connection has ended and released the server.
    alive: mpsc::Sender<()>,
    alive_rx: mpsc::Receiver<()>,
}

/// What every connection of one server shares.
#[derive(Clone)]
struct Ctx {
    server: Arc<SyncServer>,
    versions: watch::Sender<u64>,
    stop: watch::Receiver<bool>,
    budgets: Arc<Budgets>,
    /// Held, never used: see [`ServerHandle::shutdown`].
    _alive: mpsc::Sender<()>,
}

impl ServerHandle {
    /// Serves `server` on `addr` (use port 0 for a free port), within the server's
    /// [`Limits`].
    pub async fn bind(server: Arc<SyncServer>, addr: &str) -> std::io::Result<ServerHandle> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let mut handle = ServerHandle::in_process(server);
        handle.addr = Some(local);
        let ctx = handle.ctx();
        let conns = Arc::clone(&handle.connections);
        handle.accept = Some(tokio::spawn(accept_loop(listener, ctx, conns)));
        Ok(handle)
    }

    /// A server reachable only through [`ServerHandle::connect_in_process`].
    pub fn in_process(server: Arc<SyncServer>) -> ServerHandle {
        let (versions, _) = watch::channel(server.version());
        let (stop, _) = watch::channel(false);
        let (alive, alive_rx) = mpsc::channel(1);
        let budgets = Budgets::new(server.limits().clone());
        ServerHandle {
            server,
            addr: None,
            versions,
            stop,
            accept: None,
            connections: Arc::new(AtomicU64::new(0)),
            budgets,
            alive,
            alive_rx,
        }
    }

    fn ctx(&self) -> Ctx {
        Ctx {
            server: Arc::clone(&self.server),
            versions: self.versions.clone(),
            stop: self.stop.subscribe(),
            budgets: Arc::clone(&self.budgets),
            _alive: self.alive.clone(),
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

    /// Connections accepted so far (those refused at the connection limit included).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// What the transport holds and has refused, by its own accounting.
    pub fn stats(&self) -> ServerStats {
        self.budgets.stats()
    }

    /// A connection through an in-memory pipe, served like a TCP one.
    pub fn connect_in_process(&self) -> tokio::io::DuplexStream {
        let (a, b) = tokio::io::duplex(1 << 20);
        self.connections.fetch_add(1, Ordering::Relaxed);
        let ctx = self.ctx();
        match self.budgets.slot() {
            Some(slot) => {
                tokio::spawn(serve_connection(ctx, b, slot));
            }
            None => {
                tokio::spawn(async move {
                    let mut b = b;
                    let _ = b.write_all(&refusal(&ctx.budgets)).await;
                });
            }
        }
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

/// Pause after a failed accept (out of file descriptors, say): the pending connection
/// stays in the backlog, so retrying at once would fail again at once.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

async fn accept_loop(listener: TcpListener, ctx: Ctx, connections: Arc<AtomicU64>) {
    let mut stop = ctx.stop.clone();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    connections.fetch_add(1, Ordering::Relaxed);
                    match ctx.budgets.slot() {
                        Some(slot) => {
                            let _ = stream.set_nodelay(true);
                            tokio::spawn(serve_connection(ctx.clone(), stream, slot));
                        }
                        None => refuse(stream, peer, &ctx.budgets),
                    }
                }
                Err(e) => {
                    if let Some(n) = ctx.budgets.accept_log.hit() {
                        tracing::warn!(error = %e, failures = n, "accept failed; retrying");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_RETRY) => {}
                        _ = stop.changed() => break,
                    }
                }
            },
            _ = stop.changed() => break,
        }
    }
}

/// The frame sent to a connection refused at the connection limit.
fn refusal(budgets: &Budgets) -> Vec<u8> {
    budgets
        .counters
        .connections_refused
        .fetch_add(1, Ordering::SeqCst);
    let max = budgets.limits.connections_max;
    let msg = ServerMsg::Error {
        code: ErrorCode::Busy,
        message: format!(
            "the server has {max} connections open, its limit (Limits::connections_max); \
             try again later"
        ),
    };
    encode_frame(&msg, FRAME_LEN_MAX_DEFAULT).unwrap_or_default()
}

/// Refuses a connection over the limit: one typed error if the socket takes it at once,
/// then closed. Logged at most once per period, with the count.
fn refuse(stream: TcpStream, peer: SocketAddr, budgets: &Budgets) {
    let frame = refusal(budgets);
    // A new socket's send buffer is empty: the frame fits or the peer does without.
    let _ = stream.try_write(&frame);
    if let Some(n) = budgets.refusal_log.hit() {
        tracing::warn!(
            %peer,
            refused = n,
            connections_max = budgets.limits.connections_max,
            "connection limit reached; refusing connections"
        );
    }
}

/// Serves one connection until it ends or the server stops. The slot and `ctx.alive` are
/// dropped when it returns, which is what [`ServerHandle::shutdown`] waits for.
async fn serve_connection<S: Stream>(ctx: Ctx, stream: S, _slot: OwnedSemaphorePermit) {
    let mut stopped = ctx.stop.clone();
    tokio::select! {
        biased;
        () = serve_session(&ctx, stream) => {}
        // A session blocked writing to a peer that does not read is dropped on stop, so
        // shutdown never waits on a client.
        _ = stopped.wait_for(|s| *s) => {}
    }
}

fn now_ms() -> u64 {
    SystemTimeSource.now_ms()
}

/// Why a session ended early.
#[derive(Debug)]
struct Ended;

/// One server connection's session and what bounds it.
struct Conn<'a, W> {
    ctx: &'a Ctx,
    wr: W,
    session: ServerSession,
    /// Set once the handshake succeeded: the reader may read full-size frames.
    frame_max: watch::Sender<usize>,
    handshook: bool,
    pieces: PiecesHeld,
}

impl<W: AsyncWrite + Unpin> Conn<'_, W> {
    fn limits(&self) -> &Limits {
        &self.ctx.budgets.limits
    }

    /// Writes messages, each within the idle deadline (a peer that does not read cannot
    /// hold the session).
    async fn send(&mut self, out: Vec<ServerMsg>) -> Result<(), Ended> {
        let deadline = Duration::from_millis(self.limits().idle_timeout_ms);
        for m in out {
            if let ServerMsg::Error { code, message } = &m {
                tracing::debug!(code = code.number(), %message, "session error");
                if *code == ErrorCode::TokenExpired && self.handshook {
                    let c = &self.ctx.budgets.counters;
                    c.tokens_expired.fetch_add(1, Ordering::SeqCst);
                }
            }
            match tokio::time::timeout(
                deadline,
                write_frame(&mut self.wr, &m, FRAME_LEN_MAX_DEFAULT),
            )
            .await
            {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Ended),
                Err(_) => {
                    let c = &self.ctx.budgets.counters;
                    c.write_timeouts.fetch_add(1, Ordering::SeqCst);
                    tracing::info!("closing a session whose peer does not read its replies");
                    return Err(Ended);
                }
            }
        }
        if self.session.is_closed() {
            return Err(Ended);
        }
        Ok(())
    }

    /// Handles one message (its bytes are released once handled), then the bounds that
    /// depend on the session's state.
    async fn on_message(&mut self, msg: ClientMsg, ticket: Ticket) -> Result<(), Ended> {
        let is_upload = matches!(msg, ClientMsg::Upload { .. });
        let out = if is_upload {
            blocking(|| self.session.on_message(msg, now_ms()))
        } else {
            self.session.on_message(msg, now_ms())
        };
        drop(ticket);
        if is_upload {
            self.ctx.versions.send_replace(self.ctx.server.version());
        }
        if !self.handshook && self.session.user().is_some() {
            self.handshook = true;
            self.frame_max.send_replace(self.limits().frame_bytes_max);
        }
        if !self.pieces.set(self.session.partial_upload_bytes()) {
            self.ctx
                .budgets
                .counters
                .transactions_refused
                .fetch_add(1, Ordering::SeqCst);
            let max = self.limits().server_transaction_bytes_max;
            if let Some(n) = self.ctx.budgets.busy_log.hit() {
                tracing::warn!(
                    max,
                    refused = n,
                    "unfinished upload transactions at the limit"
                );
            }
            let busy = ServerMsg::Error {
                code: ErrorCode::Busy,
                message: format!(
                    "the server holds {max} bytes of unfinished upload transactions, its \
                     limit (Limits::server_transaction_bytes_max); try again later"
                ),
            };
            let _ = self.send(vec![busy]).await;
            return Err(Ended);
        }
        self.send(out).await
    }
}

/// A deadline noticed this late means the process itself did not run; see
/// [`serve_session`].
const STARVED: Duration = Duration::from_secs(1);

/// The delay until `at_ms` on the wall clock (capped: the timer is re-armed each turn).
fn until_ms(at_ms: u64) -> Duration {
    Duration::from_millis(at_ms.saturating_sub(now_ms()).min(3_600_000))
}

async fn serve_session<S: Stream>(ctx: &Ctx, stream: S) {
    let limits = ctx.budgets.limits.clone();
    let (rd, wr) = tokio::io::split(stream);
    let (frame_max, frame_max_rx) = watch::channel(limits.hello_frame_bytes_max);
    let (_reader, mut inbox) = spawn_server_reader(rd, ConnBuffer::new(&ctx.budgets), frame_max_rx);
    let mut conn = Conn {
        ctx,
        wr,
        session: ctx.server.session(),
        frame_max,
        handshook: false,
        pieces: PiecesHeld::new(&ctx.budgets),
    };
    let mut stop = ctx.stop.clone();
    let mut version_rx = ctx.versions.subscribe();
    let mut deadline = Instant::now() + Duration::from_millis(limits.handshake_timeout_ms);
    // Writes made on the server itself (not uploads) do not pass through the version
    // channel; a slow tick picks them up.
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        let downloads = conn.session.poll_download();
        if conn.send(downloads).await.is_err() {
            break;
        }
        let expires = conn.session.expires_at_ms();
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            () = tokio::time::sleep(until_ms(expires.unwrap_or(0))), if expires.is_some() => {
                let out = conn.session.on_time(now_ms());
                if conn.send(out).await.is_err() {
                    break;
                }
            }
            m = inbox.recv() => {
                deadline = Instant::now() + Duration::from_millis(limits.idle_timeout_ms);
                let r = match m {
                    None => break,
                    Some(Ok((msg, ticket))) => conn.on_message(msg, ticket).await,
                    Some(Err(e)) => {
                        let out = conn.session.on_bad_frame(&e.to_string());
                        conn.send(out).await
                    }
                };
                if r.is_err() {
                    break;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                let late = Instant::now().saturating_duration_since(deadline);
                if late > STARVED {
                    // The process did not run (its runtime was blocked): the peer's bytes
                    // may be waiting unread. Give it a moment of the time it was denied.
                    deadline = Instant::now() + STARVED;
                    continue;
                }
                let c = &ctx.budgets.counters;
                if conn.handshook {
                    c.idle_timeouts.fetch_add(1, Ordering::SeqCst);
                    tracing::debug!("closing an idle session");
                } else {
                    c.handshake_timeouts.fetch_add(1, Ordering::SeqCst);
                    tracing::debug!("closing a connection that sent no Hello in time");
                }
                break;
            }
            _ = version_rx.changed() => {}
            _ = tick.tick(), if conn.handshook => {}
        }
    }
    // The peer may not read: closing must not wait on it.
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.wr.shutdown()).await;
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
