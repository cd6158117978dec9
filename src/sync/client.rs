//! The sync client's logic, free of sockets and timers. It uploads the store's unsynced log
//! entries, persists each acknowledged position, and applies downloads with their cursor
//! in one transaction.

use std::sync::Arc;

use crate::changeset::Changeset;
use crate::error::NameKind;
use crate::error::{Error, Result};
use crate::log::{LogEntry, LogPos};
use crate::reset::{
    backup_path, ObjectSnapshot, ResetMarker, ResetMode, ResetPhase, ResetReason, ResetReport,
};
use crate::rules::parse;
use crate::schema::Schema;
use crate::store::sync_tables::ClientCounter;
use crate::store::{ReplayPlan, Store};
use crate::sync::pieces::{entry_size, join_piece, split_entry};
use crate::sync::protocol::{
    ClientMsg, ErrorCode, ServerMsg, ServerVersion, SnapshotEnd, PROTOCOL_VERSION,
};
use crate::sync::protocol::{RefusedWrite, Subscription, SubscriptionSet};
use crate::value::validate_name;

/// Why a sync session stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The server sent an error and closed the session.
    #[error("server error {} ({code:?}): {message}", code.number())]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The server's message.
        message: String,
    },
    /// The local store failed.
    #[error("store: {0}")]
    Store(#[from] Error),
    /// The server broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The connection failed.
    #[error("connection: {0}")]
    Io(String),
    /// The server refused some writes and reverted them (error code 231). Not fatal: the
    /// client carries on; the refused values stay in [`rejected_writes`].
    #[error("compensating write ({}): {}", refused.first().map_or(231, |r| r.code.number()), refused.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    CompensatingWrite {
        /// The refused writes.
        refused: Vec<RefusedWrite>,
    },
    /// The same upload failed this many times in a row; the client keeps retrying, with
    /// backoff, and reports it once (see `SyncClient::status`).
    #[error("the upload after log position {after} failed {failures} times in a row: {message}")]
    UploadStuck {
        /// The client's acknowledged log position: the upload after it fails.
        after: LogPos,
        /// Failed attempts in a row.
        failures: u32,
        /// The last failure, as the server (or the connection) gave it.
        message: String,
    },
    /// The session's token expired and the application's token provider failed to give a
    /// new one; the client asks again after a backoff.
    #[error("token refresh failed: {0}")]
    TokenRefresh(String),
}

impl SyncError {
    /// Whether reconnecting may help (as opposed to needing a new token, a new build, or
    /// a client reset).
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Server { code, .. } => code.is_transient(),
            // A poisoned store recovers by itself (`Options::recover_after`).
            SyncError::Store(Error::Storage(_) | Error::Poisoned)
            | SyncError::Io(_)
            | SyncError::Protocol(_) => true,
            SyncError::Store(_) => false,
            SyncError::CompensatingWrite { .. }
            | SyncError::UploadStuck { .. }
            | SyncError::TokenRefresh(_) => true,
        }
    }
}

/// Client settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The signed token naming the user.
    pub token: String,
    /// What to do with unsynced writes when the server orders a client reset.
    pub reset_mode: ResetMode,
    /// Target size of one upload message, in bytes.
    pub batch_bytes: usize,
    /// Upload messages in flight before waiting for acknowledgements.
    pub window: usize,
}

impl ClientConfig {
    /// Defaults with this token.
    pub fn new(token: impl Into<String>) -> Self {
        ClientConfig {
            token: token.into(),
            reset_mode: ResetMode::default(),
            batch_bytes: 1 << 20,
            window: 4,
        }
    }
}

/// Records the download cursor inside the transaction that applies what it covers.
fn set_cursor(tx: &mut crate::store::WriteTx<'_>, cursor: ServerVersion) -> Result<()> {
    // In the import's write-ahead record: a download is an append and a sync.
    tx.put_sync_counter(ClientCounter::DownloadCursor, cursor);
    Ok(())
}

/// The persisted download cursor of a client store.
pub(crate) fn download_cursor(store: &Store) -> Result<ServerVersion> {
    store.sync_counter(ClientCounter::DownloadCursor)
}

/// An internal invariant that did not hold (encoding one of our own records).
fn internal(what: impl Into<String>) -> Error {
    Error::Internal { what: what.into() }
}

/// The store's subscription set (`None`: never set; the client sees all it may read).
pub fn subscriptions(store: &Store) -> Result<Option<SubscriptionSet>> {
    let set = store.sync_subscriptions()?;
    set.map(|v| crate::sync::stored::subscription_set(&v))
        .transpose()
}

/// Changes the subscription set in one call (add, remove, replace by name) and persists
/// it; returns its new version. Every query must parse; the server checks the rest
/// (queryable fields) and the client learns the outcome from `wait_for_subscriptions`.
pub fn update_subscriptions(
    store: &Store,
    change: impl FnOnce(&mut Vec<Subscription>),
) -> Result<u64> {
    let mut set = subscriptions(store)?.unwrap_or_default();
    change(&mut set.subscriptions);
    for s in &set.subscriptions {
        validate_name(NameKind::Collection, &s.collection)?;
        parse(&s.query)?;
    }
    set.version += 1;
    let bytes = postcard::to_allocvec(&set).map_err(|e| internal(e.to_string()))?;
    store.set_sync_subscriptions(&bytes)?;
    Ok(set.version)
}

/// The newest subscription version the server confirmed.
pub fn subscriptions_acked(store: &Store) -> Result<u64> {
    store.sync_counter(ClientCounter::SubscriptionsAcked)
}

/// Writes the server refused and reverted, with their numbers, oldest first. They stay
/// until the application clears them, so a refused write is never lost silently.
pub fn rejected_writes(store: &Store) -> Result<Vec<(u64, RefusedWrite)>> {
    let rows = store.sync_rejected()?;
    rows.into_iter()
        .map(|(id, v)| Ok((id, crate::sync::stored::refused_write(&v)?)))
        .collect()
}

fn record_rejected(store: &Store, refused: &[RefusedWrite]) -> Result<()> {
    // The server resends refusals the client may have missed: keep each once.
    let known = rejected_writes(store)?;
    let mut fresh = Vec::new();
    for r in refused {
        if known.iter().any(|(_, k)| k == r) {
            continue;
        }
        fresh.push(postcard::to_allocvec(r).map_err(|e| internal(e.to_string()))?);
    }
    store.add_sync_rejected(&fresh)
}

/// Forgets refused writes up to number `upto`.
pub fn clear_rejected_writes(store: &Store, upto: u64) -> Result<()> {
    store.clear_sync_rejected(upto)
}

/// Adopts the server's schemas (an additive change) with their version.
fn adopt_schemas(store: &Store, version: u64, schemas: Vec<Schema>) -> Result<()> {
    for s in schemas {
        store.set_schema(s)?;
    }
    store.set_sync_counter(ClientCounter::SchemaVersion, version)
}

/// A reset being staged: its marker, the unsynced writes being replayed onto each chunk,
/// and whether the next chunk is the first.
#[derive(Debug)]
struct Resetting {
    marker: ResetMarker,
    plan: ReplayPlan,
    first: bool,
}

/// One connection's client side.
#[derive(Debug)]
pub struct ClientSession {
    store: Arc<Store>,
    config: ClientConfig,
    ready: bool,
    /// The highest log position sent on this connection.
    sent: LogPos,
    /// Upload messages awaiting acknowledgement.
    in_flight: usize,
    /// Pieces of a large upload transaction still to send (next piece last).
    outgoing: Vec<LogEntry>,
    /// Pieces of a download transaction received so far.
    partial: Option<LogEntry>,
    /// The server's version from the newest Welcome or Pong.
    server_version: ServerVersion,
    /// The newest Pong's id.
    pong: u64,
    /// The download cursor as of the last commit that returned (a reader of the database
    /// may see a commit's cursor a moment before the commit returns and the store's
    /// digest and counts move).
    downloaded: ServerVersion,
    /// The reset under way on this connection.
    reset: Option<Resetting>,
    /// Reports of finished resets, for the application.
    reports: Vec<ResetReport>,
    /// The subscription version sent on this connection.
    subscriptions_sent: u64,
    /// Subscription versions the server refused, with why.
    subscription_errors: Vec<(u64, String)>,
    /// Writes the server refused since the last call (also kept in the store).
    refused: Vec<RefusedWrite>,
}

impl ClientSession {
    /// A session for `store`.
    pub fn new(store: Arc<Store>, config: ClientConfig) -> Self {
        ClientSession {
            store,
            config,
            ready: false,
            sent: 0,
            in_flight: 0,
            outgoing: Vec::new(),
            partial: None,
            server_version: 0,
            pong: 0,
            downloaded: 0,
            reset: None,
            reports: Vec::new(),
            subscriptions_sent: 0,
            subscription_errors: Vec::new(),
            refused: Vec::new(),
        }
    }

    /// Subscription versions the server refused since the last call.
    pub fn take_subscription_errors(&mut self) -> Vec<(u64, String)> {
        std::mem::take(&mut self.subscription_errors)
    }

    /// Writes the server refused since the last call.
    pub fn take_refused_writes(&mut self) -> Vec<RefusedWrite> {
        std::mem::take(&mut self.refused)
    }

    /// Reports of resets finished since the last call.
    pub fn take_reset_reports(&mut self) -> Vec<ResetReport> {
        std::mem::take(&mut self.reports)
    }

    /// The first message of a connection.
    pub fn hello(&mut self) -> Result<ClientMsg> {
        let marker = self.store.reset_marker()?.map(|m| m.phase);
        self.downloaded = download_cursor(&self.store)?;
        let subscriptions = subscriptions(&self.store)?;
        self.subscriptions_sent = subscriptions.as_ref().map_or(0, |s| s.version);
        Ok(ClientMsg::Hello {
            subscriptions,
            subscriptions_acked: subscriptions_acked(&self.store)?,
            protocol: PROTOCOL_VERSION,
            schema_version: self.store.sync_counter(ClientCounter::SchemaVersion)?,
            token: self.config.token.clone(),
            replica: self.store.replica_id(),
            download_cursor: self.downloaded,
            last_sync: self.store.last_sync(),
            reset_pending: matches!(marker, Some(ResetPhase::Downloading)),
            reset_settled: match marker {
                Some(ResetPhase::Uploading { settled, .. }) => Some(settled),
                _ => None,
            },
        })
    }

    /// The server version last reported, and the id of the newest answered ping.
    pub fn server_version(&self) -> (ServerVersion, u64) {
        (self.server_version, self.pong)
    }

    /// Every change up to this server version is applied here, by commits that have
    /// returned (durable, and seen by every read of the store).
    pub fn downloaded(&self) -> ServerVersion {
        self.downloaded
    }

    /// Handles one server message; returns the messages to send back.
    pub fn on_message(&mut self, msg: ServerMsg) -> Result<Vec<ClientMsg>, SyncError> {
        match msg {
            ServerMsg::Error { code, message } => Err(SyncError::Server { code, message }),
            ServerMsg::Welcome {
                server_version,
                uploaded,
                schema_version,
                schemas,
                ..
            } => self.on_welcome(server_version, uploaded, schema_version, schemas),
            ServerMsg::UploadAck { seq, .. } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                self.store.mark_synced(seq)?;
                self.finish_reset_if_uploaded(seq)?;
                Ok(Vec::new())
            }
            ServerMsg::ViewDownload {
                objects,
                removed,
                cursor,
            } => self.on_view_download(objects, removed, cursor),
            ServerMsg::CompensatingWrite { refused } => self.on_compensating_write(refused),
            ServerMsg::SubscriptionError { version, message } => {
                self.subscription_errors.push((version, message));
                Ok(Vec::new())
            }
            ServerMsg::ResetRequired {
                reason: ResetReason::SubscriptionsChanged,
                uploaded,
                schemas,
            } => self.on_view_rebuild(uploaded, schemas),
            ServerMsg::ResetRequired {
                reason,
                uploaded,
                schemas,
            } => self.on_reset_required(reason, uploaded, schemas),
            ServerMsg::Snapshot { objects, end } => self.on_snapshot(objects, end),
            ServerMsg::Download {
                changeset,
                more,
                cursor,
            } => self.on_download(changeset, more, cursor),
            ServerMsg::Pong { id, server_version } => {
                self.pong = self.pong.max(id);
                self.server_version = self.server_version.max(server_version);
                Ok(Vec::new())
            }
        }
    }

    /// The handshake's answer: what the server holds of this client's log, and its schemas.
    fn on_welcome(
        &mut self,
        server_version: ServerVersion,
        uploaded: LogPos,
        schema_version: u64,
        schemas: Vec<Schema>,
    ) -> Result<Vec<ClientMsg>, SyncError> {
        if !schemas.is_empty() {
            adopt_schemas(&self.store, schema_version, schemas)?;
        }
        let last_sync = self.store.last_sync();
        if uploaded > self.store.log_head() {
            // Writes the server has were lost here. Their positions are never used
            // again, and the client rebuilds from the server, which holds them.
            let detail = format!(
                "the server holds this client's log up to {uploaded}; the log ends at {}",
                self.store.log_head()
            );
            self.store.skip_log_to(uploaded)?;
            let backup = self.store.path().map(backup_path);
            if let Some(b) = &backup {
                self.store.backup_to(b)?;
            }
            let marker = ResetMarker {
                reason: ResetReason::ServerAheadOfClient {
                    detail: detail.clone(),
                },
                mode: self.config.reset_mode,
                phase: ResetPhase::Downloading,
                backup,
            };
            self.store.set_reset_marker(Some(&marker))?;
            // Reconnecting asks for the snapshot (the marker says a reset is pending).
            return Err(SyncError::Protocol(detail));
        }
        if uploaded > last_sync {
            // The server applied an upload whose acknowledgement was lost.
            self.store.mark_synced(uploaded)?;
        }
        self.sent = uploaded.max(last_sync);
        if uploaded < last_sync {
            // The server lost changes it had acknowledged; resend them if the
            // log still has them.
            let first = self.store.log_after(uploaded, 1)?;
            if first.first().map(|e| e.seq) == Some(uploaded + 1) {
                self.sent = uploaded;
            }
        }
        self.server_version = server_version;
        self.ready = true;
        self.in_flight = 0;
        self.outgoing.clear();
        self.finish_reset_if_uploaded(uploaded)?;
        Ok(Vec::new())
    }

    /// Changes of a filtered view: whole objects, and objects that left the view.
    fn on_view_download(
        &mut self,
        objects: Vec<ObjectSnapshot>,
        mut removed: Vec<(String, crate::value::Pk)>,
        cursor: ServerVersion,
    ) -> Result<Vec<ClientMsg>, SyncError> {
        if !removed.is_empty() {
            // An object with unsynced local writes stays until they are uploaded
            // and judged: removing it now would lose them for good (downloads do
            // not bring a client's own writes back).
            let unsynced: std::collections::HashSet<(String, crate::value::Pk)> = self
                .store
                .unsynced(usize::MAX)?
                .into_iter()
                .flat_map(|e| e.writes.into_iter().map(|w| (w.collection, w.pk)))
                .collect();
            removed.retain(|k| !unsynced.contains(k));
        }
        self.store
            .merge_view(&objects, &removed, |tx| set_cursor(tx, cursor))?;
        self.downloaded = cursor;
        Ok(vec![ClientMsg::DownloadAck { cursor }])
    }

    /// Writes the server refused and reverted: kept (once each) for the application.
    fn on_compensating_write(
        &mut self,
        refused: Vec<RefusedWrite>,
    ) -> Result<Vec<ClientMsg>, SyncError> {
        let known = rejected_writes(&self.store)?;
        let fresh: Vec<RefusedWrite> = refused
            .into_iter()
            .filter(|r| !known.iter().any(|(_, k)| k == r))
            .collect();
        record_rejected(&self.store, &fresh)?;
        self.refused.extend(fresh);
        Ok(Vec::new())
    }

    /// A view rebuild (the subscriptions changed): the reset machinery without a backup or
    /// a report.
    fn on_view_rebuild(
        &mut self,
        uploaded: LogPos,
        schemas: Vec<Schema>,
    ) -> Result<Vec<ClientMsg>, SyncError> {
        if uploaded > self.store.last_sync() && uploaded <= self.store.log_head() {
            self.store.mark_synced(uploaded)?;
        }
        let replay_after = self.store.last_sync().min(uploaded);
        let marker = ResetMarker {
            reason: ResetReason::SubscriptionsChanged,
            mode: ResetMode::RecoverUnsyncedChanges,
            phase: ResetPhase::Downloading,
            backup: None,
        };
        self.store.set_reset_marker(Some(&marker))?;
        self.begin_staging(marker, &schemas, replay_after)
    }

    /// The server ordered a client reset: back the store up, mark the reset, and wait for
    /// the snapshot.
    fn on_reset_required(
        &mut self,
        reason: ResetReason,
        uploaded: LogPos,
        schemas: Vec<Schema>,
    ) -> Result<Vec<ClientMsg>, SyncError> {
        if uploaded > self.store.last_sync() && uploaded <= self.store.log_head() {
            // Applied on the server, acknowledgement lost: not unsynced.
            self.store.mark_synced(uploaded)?;
        }
        // A server that lost acknowledged uploads gets them replayed too.
        let replay_after = self.store.last_sync().min(uploaded);
        let marker = match self.store.reset_marker()? {
            Some(
                m @ ResetMarker {
                    phase: ResetPhase::Downloading,
                    ..
                },
            ) => m,
            previous => {
                // A new reset before the last one finished: its backup is no longer
                // needed, unless the application recovers from it by hand.
                if let Some(ResetMarker {
                    mode,
                    backup: Some(old),
                    ..
                }) = previous
                {
                    if mode != ResetMode::Manual {
                        let _ = std::fs::remove_file(old);
                    }
                }
                let backup = self.store.path().map(backup_path);
                if let Some(b) = &backup {
                    self.store.backup_to(b)?;
                }
                let m = ResetMarker {
                    reason,
                    mode: self.config.reset_mode,
                    phase: ResetPhase::Downloading,
                    backup,
                };
                self.store.set_reset_marker(Some(&m))?;
                m
            }
        };
        self.begin_staging(marker, &schemas, replay_after)
    }

    /// A chunk of a reset's snapshot; the last one swaps the staged state in.
    fn on_snapshot(
        &mut self,
        objects: Vec<ObjectSnapshot>,
        end: Option<SnapshotEnd>,
    ) -> Result<Vec<ClientMsg>, SyncError> {
        let Some(r) = self.reset.as_mut() else {
            return Err(SyncError::Protocol("a snapshot outside a reset".into()));
        };
        self.store.stage_snapshot(&objects, r.first, &mut r.plan)?;
        r.first = false;
        let mut settled = None;
        if let Some(end) = end {
            if let Some(r) = self.reset.take() {
                self.swap_in(&r.marker, r.plan, end)?;
            }
            settled = Some(self.store.last_sync());
        }
        Ok(vec![ClientMsg::SnapshotAck { settled }])
    }

    /// Reads the unsynced writes after `replay_after` to replay onto the server's state
    /// (decided by its `schemas`), and waits for its chunks.
    fn begin_staging(
        &mut self,
        marker: ResetMarker,
        schemas: &[Schema],
        replay_after: LogPos,
    ) -> Result<Vec<ClientMsg>, SyncError> {
        let plan = self.store.plan_replay(marker.mode, schemas, replay_after)?;
        self.reset = Some(Resetting {
            marker,
            plan,
            first: true,
        });
        self.ready = false;
        Ok(Vec::new())
    }

    /// Swaps the staged server state in, replays unsynced writes, and carries on syncing.
    fn swap_in(
        &mut self,
        marker: &ResetMarker,
        plan: ReplayPlan,
        end: SnapshotEnd,
    ) -> Result<(), SyncError> {
        let SnapshotEnd {
            cursor,
            schema_version,
            schemas,
            subscriptions,
        } = end;
        let (report, _until) = self.store.finish_reset(marker, &schemas, plan, |tx| {
            tx.set_sync_counter(ClientCounter::DownloadCursor, cursor)?;
            tx.set_sync_counter(ClientCounter::SchemaVersion, schema_version)?;
            if let Some(v) = subscriptions {
                tx.set_sync_counter(ClientCounter::SubscriptionsAcked, v)?;
            }
            Ok(())
        })?;
        if report.reason != Some(ResetReason::SubscriptionsChanged) {
            self.reports.push(report);
        }
        self.sent = self.store.last_sync();
        self.server_version = self.server_version.max(cursor);
        self.downloaded = cursor;
        self.ready = true;
        self.in_flight = 0;
        self.outgoing.clear();
        // The marker stays until the server shows it holds the settled position (a Welcome
        // or an acknowledgement): the final SnapshotAck may still be lost.
        Ok(())
    }

    /// Ends a reset once its recovered writes are acknowledged: the backup goes (unless the
    /// application recovers by hand), then the marker.
    /// `confirmed`: the position the server just said it holds for this client.
    fn finish_reset_if_uploaded(&mut self, confirmed: LogPos) -> Result<()> {
        let Some(m) = self.store.reset_marker()? else {
            return Ok(());
        };
        let ResetPhase::Uploading { until, settled } = m.phase else {
            return Ok(());
        };
        if self.store.last_sync() < until || confirmed < settled {
            return Ok(());
        }
        if m.mode != ResetMode::Manual {
            if let Some(b) = &m.backup {
                match std::fs::remove_file(b) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.store.set_reset_marker(None)
    }

    fn on_download(
        &mut self,
        changeset: Changeset,
        more: bool,
        cursor: ServerVersion,
    ) -> Result<Vec<ClientMsg>, SyncError> {
        let mut entries = changeset.entries;
        if let Some(p) = self.partial.take() {
            match entries.first_mut() {
                Some(first) if first.seq == p.seq => {
                    let rest = std::mem::replace(first, p);
                    join_piece(first, rest);
                }
                _ => {
                    return Err(SyncError::Protocol(format!(
                        "download did not continue transaction {}",
                        p.seq
                    )))
                }
            }
        }
        if more {
            self.partial = entries.pop();
        }
        let cs = Changeset {
            origin: changeset.origin,
            entries,
        };
        self.store
            .import_with(&cs, |tx, _| set_cursor(tx, cursor))?;
        self.downloaded = cursor;
        Ok(vec![ClientMsg::DownloadAck { cursor }])
    }

    /// The next upload, if there are unsynced entries and the window allows (or a new
    /// subscription set to send).
    pub fn poll_upload(&mut self) -> Result<Option<ClientMsg>, SyncError> {
        if !self.ready {
            return Ok(None);
        }
        if let Some(set) = subscriptions(&self.store)? {
            if set.version > self.subscriptions_sent {
                self.subscriptions_sent = set.version;
                return Ok(Some(ClientMsg::Subscribe { set }));
            }
        }
        if let Some(piece) = self.outgoing.pop() {
            let more = !self.outgoing.is_empty();
            if !more {
                self.in_flight += 1;
            }
            return Ok(Some(self.upload(vec![piece], more)));
        }
        if self.in_flight >= self.config.window || self.sent >= self.store.log_head() {
            return Ok(None);
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        // Stored entries are a little smaller than on the wire: read one batch's worth.
        for e in self
            .store
            .log_within(self.sent, 256, self.config.batch_bytes)?
        {
            let size = entry_size(&e);
            if size > self.config.batch_bytes {
                if batch.is_empty() {
                    self.sent = e.seq;
                    let mut pieces = split_entry(e, self.config.batch_bytes);
                    pieces.reverse();
                    self.outgoing = pieces;
                    return self.poll_upload();
                }
                break;
            }
            if bytes + size > self.config.batch_bytes && !batch.is_empty() {
                break;
            }
            bytes += size;
            self.sent = e.seq;
            batch.push(e);
        }
        if batch.is_empty() {
            return Ok(None);
        }
        self.in_flight += 1;
        Ok(Some(self.upload(batch, false)))
    }

    fn upload(&self, entries: Vec<LogEntry>, more: bool) -> ClientMsg {
        ClientMsg::Upload {
            changeset: Changeset {
                origin: self.store.replica_id(),
                entries,
            },
            more,
        }
    }
}
