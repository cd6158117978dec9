//! [`SyncClient`]: the client's connection loop on tokio, its backoff, token refresh and
//! keepalive, and the waits the application awaits.
//!
//! The loop publishes what it learns (acknowledged uploads, applied downloads, pongs, its
//! end) on a watch channel; waiters only observe it. Nothing a waiter does wakes the loop
//! out of its backoff: only [`SyncClient::set_online`] and stopping do.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::write_frame;
use super::{connect, spawn_reader, StreamBox, Transport};
use crate::log::LogPos;
use crate::reset::ResetReport;
use crate::store::Store;
use crate::sync::client::{
    subscriptions, subscriptions_acked, update_subscriptions, ClientConfig, ClientSession,
    SyncError,
};
use crate::sync::frame::{FrameError, FRAME_LEN_MAX_DEFAULT};
use crate::sync::protocol::{ClientMsg, ErrorCode, ServerMsg, Subscription};

/// The client's connection state, reported to the state callback.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConnectionState {
    /// Not connected (paused, or waiting to retry).
    #[default]
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
/// What a [`TokenProvider`] returns: a new signed token, or why there is none.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;
/// Fetches a new token when the session's token has expired (from the application's
/// login service, say).
pub type TokenProvider = Arc<dyn Fn() -> TokenFuture + Send + Sync>;

/// Time without sending anything after which a connected client sends a `Ping`, so the
/// server's idle deadline (`Limits::idle_timeout_ms`, 60 s by default) spares it.
pub const KEEPALIVE_DEFAULT: Duration = Duration::from_secs(15);

/// Failures in a row of the same upload after which the client reports it (through the
/// error callback, as [`SyncError::UploadStuck`], and in [`SyncStatus::stuck_upload`]).
pub const UPLOAD_FAILURES_REPORTED: u32 = 3;

/// The first retry's delay; each failure without progress doubles it.
const BACKOFF_MIN: Duration = Duration::from_millis(20);
/// The longest delay between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How often a connected client looks for new local writes to upload.
const UPLOAD_POLL: Duration = Duration::from_millis(10);

/// Options of a [`SyncClient`] beyond the session's.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct ClientHooks {
    /// Called on every connection state change.
    pub on_state: Option<StateCallback>,
    /// Called on every error (transient ones too, before the retry).
    pub on_error: Option<ErrorCallback>,
    /// Called when a client reset finishes, with its report.
    pub on_reset: Option<ResetCallback>,
    /// Gives a new token when the server ends a session because its token expired. Without
    /// one, an expired token stops the client (a fatal error).
    pub token_provider: Option<TokenProvider>,
    /// Time without sending after which a connected client sends a `Ping` (default
    /// [`KEEPALIVE_DEFAULT`]); keep it well below the server's idle deadline.
    pub keepalive: Option<Duration>,
}

/// Why a wait of a [`SyncClient`] ended without what it waited for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The client was stopped (or dropped).
    #[error("the sync client is stopped")]
    Stopped,
    /// The client stopped on an error retrying cannot fix (a bad token, say).
    #[error("the sync client stopped: {0}")]
    Fatal(String),
    /// The server refused the subscription set.
    #[error("the server refused subscription set {version}: {message}")]
    SubscriptionRefused {
        /// The refused set's version.
        version: u64,
        /// Why.
        message: String,
    },
    /// The local store failed.
    #[error("store: {0}")]
    Store(String),
}

/// An upload that keeps failing (see [`UPLOAD_FAILURES_REPORTED`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StuckUpload {
    /// The client's acknowledged log position: the upload after it fails.
    pub after: LogPos,
    /// Failed attempts in a row.
    pub failures: u32,
    /// The last failure, with the server's message.
    pub message: String,
}

/// What a [`SyncClient`] is doing, for the application to show.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncStatus {
    /// The connection state.
    pub state: ConnectionState,
    /// Failed attempts since the last progress (an upload acknowledged or a download
    /// applied).
    pub failures: u32,
    /// The latest error since the last progress.
    pub last_error: Option<String>,
    /// The delay before the next attempt, in milliseconds (0 once progress is made).
    pub retry_delay_ms: u64,
    /// Set while the same upload keeps failing.
    pub stuck_upload: Option<StuckUpload>,
    /// Tokens fetched from the token provider.
    pub token_refreshes: u64,
    /// The error that stopped the client for good.
    pub fatal: Option<String>,
}

/// What the connection loop publishes for waiters.
#[derive(Clone, Debug, Default)]
struct Progress {
    /// The store's acknowledged log position.
    last_sync: LogPos,
    /// The newest answered ping.
    pong: u64,
    /// The newest server version the server reported.
    server_version: u64,
    /// The session's applied download position.
    downloaded: u64,
    /// The newest [`SyncClient::set_online`] generation the loop went offline for.
    offline_for: u64,
    /// Set once the loop has ended (or is ending).
    end: Option<WaitError>,
}

struct Shared {
    store: Arc<Store>,
    hooks: ClientHooks,
    online: AtomicBool,
    /// Counts [`SyncClient::set_online`] calls.
    online_gen: AtomicU64,
    stopped: AtomicBool,
    /// The application changed `online` or `stopped`: ends a backoff, an offline pause or
    /// a connection early. Waiters never notify it.
    wake: Notify,
    /// Something to send on the open connection (a ping, a subscription set).
    outbox: Notify,
    ping_wanted: AtomicU64,
    progress: watch::Sender<Progress>,
    status: Mutex<SyncStatus>,
    reports: Mutex<Vec<ResetReport>>,
    subscription_errors: Mutex<Vec<(u64, String)>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    fn status(&self, f: impl FnOnce(&mut SyncStatus)) {
        f(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }

    fn set_state(&self, s: ConnectionState) {
        self.status(|st| st.state = s);
        if let Some(cb) = &self.hooks.on_state {
            cb(s);
        }
    }

    fn on_error(&self, e: &SyncError) {
        if let Some(cb) = &self.hooks.on_error {
            cb(e);
        }
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    fn is_online(&self) -> bool {
        self.online.load(Ordering::SeqCst)
    }

    /// Marks the loop's end for waiters (a fatal error is kept over a later stop).
    fn end(&self, why: WaitError) {
        self.progress.send_modify(|p| {
            p.end.get_or_insert(why);
        });
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.end(WaitError::Stopped);
        self.wake.notify_waiters();
    }

    /// Waits until `done` gives an answer, or the loop ends.
    async fn wait<T>(
        &self,
        mut done: impl FnMut(&Progress) -> Option<Result<T, WaitError>>,
    ) -> Result<T, WaitError> {
        let mut rx = self.progress.subscribe();
        loop {
            let p = rx.borrow_and_update().clone();
            if let Some(r) = done(&p) {
                return r;
            }
            if let Some(e) = p.end {
                return Err(e);
            }
            if rx.changed().await.is_err() {
                return Err(WaitError::Stopped);
            }
        }
    }
}

/// Ends the waits when the loop's task ends, however it ends.
struct EndGuard(Arc<Shared>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.end(WaitError::Stopped);
    }
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

/// What [`SyncClient::set_online`] returns: the change is made at once; awaiting this
/// waits until the client is offline (its connection closed), when going offline.
#[derive(Debug)]
pub struct SetOnline {
    shared: Arc<Shared>,
    online: bool,
    generation: u64,
}

impl IntoFuture for SetOnline {
    type Output = ();
    type IntoFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

    /// Resolves at once when going online; when going offline, once the connection is
    /// closed, the client has stopped, or a later call superseded this one.
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            if self.online {
                return;
            }
            let SetOnline {
                shared, generation, ..
            } = self;
            let _ = shared
                .wait(|p| {
                    let superseded = shared.online_gen.load(Ordering::SeqCst) > generation;
                    (p.offline_for >= generation || superseded).then_some(Ok(()))
                })
                .await;
        })
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
        let (progress, _) = watch::channel(Progress {
            last_sync: store.last_sync(),
            ..Progress::default()
        });
        let shared = Arc::new(Shared {
            store,
            hooks,
            online: AtomicBool::new(true),
            online_gen: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            wake: Notify::new(),
            outbox: Notify::new(),
            ping_wanted: AtomicU64::new(0),
            progress,
            status: Mutex::new(SyncStatus::default()),
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
        self.status().state
    }

    /// What the client is doing: its state, failures since the last progress, the last
    /// error, the next retry's delay, an upload that keeps failing, a fatal error.
    pub fn status(&self) -> SyncStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The error that stopped the client for good, if one did (a bad token, say).
    pub fn fatal_error(&self) -> Option<String> {
        self.status().fatal
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
        self.shared.outbox.notify_one();
        Ok(v)
    }

    /// Waits until the server has confirmed the subscription set current at the call and
    /// the client holds its view. Fails if the server refused the set, or the client is
    /// stopped or has failed for good.
    pub fn wait_for_subscriptions(
        &self,
    ) -> impl Future<Output = Result<(), WaitError>> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        let want = subscriptions(&shared.store).map(|s| s.map(|s| s.version));
        async move {
            let want = match want {
                Ok(Some(v)) => v,
                Ok(None) => return Ok(()),
                Err(e) => return Err(WaitError::Store(e.to_string())),
            };
            shared.wait(|_| subscriptions_settled(&shared, want)).await
        }
    }

    /// Goes offline (closes the connection) or back online. Writes keep working offline.
    /// The change is made at once; awaiting the result waits until the connection is
    /// closed (going offline).
    pub fn set_online(&self, online: bool) -> SetOnline {
        self.shared.online.store(online, Ordering::SeqCst);
        let generation = self.shared.online_gen.fetch_add(1, Ordering::SeqCst) + 1;
        self.shared.wake.notify_waiters();
        SetOnline {
            shared: Arc::clone(&self.shared),
            online,
            generation,
        }
    }

    /// Waits until every local write committed before the call is acknowledged by the
    /// server. Fails if the client is stopped or has failed for good first.
    pub fn wait_for_upload(&self) -> impl Future<Output = Result<(), WaitError>> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        let target = shared.store.log_head();
        async move {
            shared
                .wait(|p| (p.last_sync >= target).then_some(Ok(())))
                .await
        }
    }

    /// Waits until every change the server had accepted when the call was made is applied
    /// locally. Fails if the client is stopped or has failed for good first.
    pub fn wait_for_download(
        &self,
    ) -> impl Future<Output = Result<(), WaitError>> + Send + 'static {
        let shared = Arc::clone(&self.shared);
        let id = shared.ping_wanted.fetch_add(1, Ordering::SeqCst) + 1;
        // Reaches a connected loop only; a loop in its backoff sends the ping on its next
        // connection.
        shared.outbox.notify_one();
        async move {
            let target = shared
                .wait(|p| (p.pong >= id).then_some(Ok(p.server_version)))
                .await?;
            // Not the cursor in the database: a reader may see it before its commit returns.
            shared
                .wait(|p| (p.downloaded >= target).then_some(Ok(())))
                .await
        }
    }

    /// Stops syncing and waits for the background task to end.
    pub async fn stop(mut self) {
        self.shared.stop();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for SyncClient {
    fn drop(&mut self) {
        self.shared.stop();
    }
}

/// The answer to a wait for subscription set `want`, once there is one.
fn subscriptions_settled(shared: &Shared, want: u64) -> Option<Result<(), WaitError>> {
    let errors = shared
        .subscription_errors
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some((version, message)) = errors.iter().find(|(v, _)| *v >= want) {
        return Some(Err(WaitError::SubscriptionRefused {
            version: *version,
            message: message.clone(),
        }));
    }
    match subscriptions_acked(&shared.store) {
        Ok(acked) if acked >= want => Some(Ok(())),
        Ok(_) => None,
        Err(e) => Some(Err(WaitError::Store(e.to_string()))),
    }
}

/// The delay between attempts: doubles with each failure without progress, up to
/// [`BACKOFF_MAX`], with jitter so clients a failure hit together spread out.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The next delay: between half and all of the current step.
    fn next(&mut self) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(BACKOFF_MAX);
        let half = step / 2;
        let jitter_ms = rand::random::<u64>() % (half.as_millis() as u64 + 1);
        half + Duration::from_millis(jitter_ms)
    }
}

/// Failures in a row of the upload after one acknowledged position.
#[derive(Debug, Default)]
struct Stuck {
    after: LogPos,
    failures: u32,
}

/// What one connection achieved.
#[derive(Debug, Default)]
struct Seen {
    /// The handshake succeeded.
    welcomed: bool,
    /// An upload was acknowledged or a download applied.
    progressed: bool,
}

async fn run(shared: Arc<Shared>, transport: Transport, mut config: ClientConfig) {
    let _guard = EndGuard(Arc::clone(&shared));
    let mut backoff = Backoff::default();
    let mut stuck = Stuck::default();
    while !shared.is_stopped() {
        if !shared.is_online() {
            pause_offline(&shared).await;
            continue;
        }
        shared.set_state(ConnectionState::Connecting);
        let mut seen = Seen::default();
        let result = connect_and_run(&shared, &transport, &config, &mut seen).await;
        shared.set_state(ConnectionState::Disconnected);
        if seen.progressed {
            backoff = Backoff::default();
            stuck = Stuck::default();
        }
        let Err(e) = result else { continue };
        if let Err(fatal) = on_failure(&shared, e, &mut config, &mut stuck, seen.welcomed).await {
            tracing::warn!(error = %fatal, "sync client stopped");
            shared.status(|s| s.fatal = Some(fatal.clone()));
            shared.stopped.store(true, Ordering::SeqCst);
            shared.end(WaitError::Fatal(fatal));
            break;
        }
        let delay = backoff.next();
        shared.status(|s| s.retry_delay_ms = delay.as_millis() as u64);
        tracing::debug!(delay_ms = delay.as_millis() as u64, "sync client retries");
        pause(&shared, delay).await;
    }
}

/// Waits `delay`, or less if the application changes `online` or stops the client.
async fn pause(shared: &Shared, delay: Duration) {
    let woken = shared.wake.notified();
    if shared.is_stopped() || !shared.is_online() {
        return;
    }
    tokio::select! {
        () = tokio::time::sleep(delay) => {}
        () = woken => {}
    }
}

/// Offline: tells the waiters of `set_online(false)` the connection is closed, and waits
/// for the application to go online or stop.
async fn pause_offline(shared: &Shared) {
    let woken = shared.wake.notified();
    let generation = shared.online_gen.load(Ordering::SeqCst);
    if shared.is_online() || shared.is_stopped() {
        return;
    }
    shared.set_state(ConnectionState::Disconnected);
    shared
        .progress
        .send_modify(|p| p.offline_for = p.offline_for.max(generation));
    woken.await;
}

/// Reports a failed connection and decides what follows: `Ok` to retry after the backoff,
/// `Err(why)` to stop for good.
async fn on_failure(
    shared: &Shared,
    e: SyncError,
    config: &mut ClientConfig,
    stuck: &mut Stuck,
    welcomed: bool,
) -> Result<(), String> {
    shared.on_error(&e);
    shared.status(|s| {
        s.failures += 1;
        s.last_error = Some(e.to_string());
    });
    if matches!(
        e,
        SyncError::Server {
            code: ErrorCode::TokenExpired,
            ..
        }
    ) {
        let Some(provider) = shared.hooks.token_provider.clone() else {
            return Err(e.to_string());
        };
        match provider().await {
            Ok(token) => {
                tracing::debug!("sync client fetched a new token");
                config.token = token;
                shared.status(|s| s.token_refreshes += 1);
            }
            Err(why) => {
                let e = SyncError::TokenRefresh(why);
                shared.on_error(&e);
                shared.status(|s| s.last_error = Some(e.to_string()));
            }
        }
        return Ok(());
    }
    if !e.is_transient() {
        return Err(e.to_string());
    }
    if welcomed {
        note_upload_failure(shared, &e, stuck);
    }
    Ok(())
}

/// Counts a failure of a connection that had uploads to make; reports the upload once it
/// failed [`UPLOAD_FAILURES_REPORTED`] times in a row.
fn note_upload_failure(shared: &Shared, e: &SyncError, stuck: &mut Stuck) {
    let after = shared.store.last_sync();
    if shared.store.log_head() <= after {
        *stuck = Stuck::default();
        return;
    }
    if stuck.after != after {
        *stuck = Stuck { after, failures: 0 };
    }
    stuck.failures += 1;
    if stuck.failures < UPLOAD_FAILURES_REPORTED {
        return;
    }
    let report = StuckUpload {
        after,
        failures: stuck.failures,
        message: e.to_string(),
    };
    shared.status(|s| s.stuck_upload = Some(report.clone()));
    if stuck.failures == UPLOAD_FAILURES_REPORTED {
        tracing::warn!(after, failures = stuck.failures, error = %e, "an upload keeps failing");
        shared.on_error(&SyncError::UploadStuck {
            after,
            failures: report.failures,
            message: report.message,
        });
    }
}

async fn send<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, m: &ClientMsg) -> Result<(), SyncError> {
    write_frame(w, m, FRAME_LEN_MAX_DEFAULT)
        .await
        .map_err(|e: FrameError| SyncError::Io(e.to_string()))
}

/// Connects and runs one connection until it fails, the client goes offline, or it is
/// stopped. The Hello is made first: local work (a long write holding the store) must not
/// stall an open connection, which the server's handshake deadline would end.
async fn connect_and_run(
    shared: &Arc<Shared>,
    transport: &Transport,
    config: &ClientConfig,
    seen: &mut Seen,
) -> Result<(), SyncError> {
    let mut session = ClientSession::new(Arc::clone(&shared.store), config.clone());
    let hello = super::blocking(|| session.hello())?;
    let stream = connect(transport)
        .await
        .map_err(|e| SyncError::Io(e.to_string()))?;
    run_connection(shared, stream, session, &hello, seen).await
}

/// Runs one connection from its Hello.
async fn run_connection(
    shared: &Arc<Shared>,
    stream: Box<dyn StreamBox>,
    mut session: ClientSession,
    hello: &ClientMsg,
    seen: &mut Seen,
) -> Result<(), SyncError> {
    let (rd, mut wr) = tokio::io::split(stream);
    let (_reader, mut inbox) = spawn_reader::<ServerMsg, _>(rd);
    send(&mut wr, hello).await?;
    let keepalive = shared.hooks.keepalive.unwrap_or(KEEPALIVE_DEFAULT);
    let mut sent_at = Instant::now();
    let mut pinged = 0;
    let mut tick = tokio::time::interval(UPLOAD_POLL);
    loop {
        let woken = shared.wake.notified();
        if shared.is_stopped() || !shared.is_online() {
            let _ = wr.shutdown().await;
            return Ok(());
        }
        while let Some(m) = session.poll_upload()? {
            send(&mut wr, &m).await?;
            sent_at = Instant::now();
        }
        let wanted = shared.ping_wanted.load(Ordering::SeqCst);
        if wanted > pinged || sent_at.elapsed() >= keepalive {
            pinged = pinged.max(wanted);
            send(&mut wr, &ClientMsg::Ping { id: pinged }).await?;
            sent_at = Instant::now();
        }
        tokio::select! {
            m = inbox.recv() => {
                let msg = match m {
                    None => return Err(SyncError::Io("server closed the connection".into())),
                    Some(Err(e)) => return Err(SyncError::Io(e.to_string())),
                    Some(Ok(msg)) => msg,
                };
                for r in on_server_msg(shared, &mut session, msg, seen)? {
                    send(&mut wr, &r).await?;
                    sent_at = Instant::now();
                }
            }
            _ = tick.tick() => {}
            () = shared.outbox.notified() => {}
            () = woken => {}
        }
    }
}

/// Handles one server message: callbacks, status, progress for the waiters; returns the
/// replies.
fn on_server_msg(
    shared: &Shared,
    session: &mut ClientSession,
    msg: ServerMsg,
    seen: &mut Seen,
) -> Result<Vec<ClientMsg>, SyncError> {
    let welcome = matches!(msg, ServerMsg::Welcome { .. });
    let before = (shared.store.last_sync(), session.downloaded());
    // Downloads and snapshots are imported with a commit: keep them off the runtime.
    let replies = if matches!(msg, ServerMsg::Pong { .. }) {
        session.on_message(msg)?
    } else {
        super::blocking(|| session.on_message(msg))?
    };
    let refused = session.take_refused_writes();
    if !refused.is_empty() {
        shared.on_error(&SyncError::CompensatingWrite { refused });
    }
    shared
        .subscription_errors
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .extend(session.take_subscription_errors());
    for report in session.take_reset_reports() {
        if let Some(cb) = &shared.hooks.on_reset {
            cb(&report);
        }
        shared
            .reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(report);
    }
    if welcome {
        seen.welcomed = true;
        shared.set_state(ConnectionState::Connected);
    }
    let (last_sync, downloaded) = (shared.store.last_sync(), session.downloaded());
    if last_sync > before.0 || downloaded > before.1 {
        seen.progressed = true;
        shared.status(|s| {
            s.failures = 0;
            s.last_error = None;
            s.retry_delay_ms = 0;
            s.stuck_upload = None;
        });
    }
    let (version, pong) = session.server_version();
    shared.progress.send_modify(|p| {
        p.last_sync = last_sync;
        p.server_version = p.server_version.max(version);
        p.pong = p.pong.max(pong);
        p.downloaded = downloaded;
    });
    Ok(replies)
}
