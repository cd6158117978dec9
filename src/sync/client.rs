//! The sync client's logic, free of sockets and timers. It uploads the store's unsynced log
//! entries, persists each acknowledged position, and applies downloads with their cursor
//! in one transaction.

use std::sync::Arc;

use redb::TableDefinition;

use crate::changeset::Changeset;
use crate::error::{Error, Result};
use crate::log::{LogEntry, LogPos};
use crate::reset::{backup_path, ResetMarker, ResetMode, ResetPhase, ResetReport};
use crate::schema::Schema;
use crate::store::Store;
use crate::sync::pieces::{entry_size, join_piece, split_entry};
use crate::sync::protocol::{
    ClientMsg, ErrorCode, ServerMsg, ServerVersion, SnapshotEnd, PROTOCOL_VERSION,
};

/// Client bookkeeping kept in the client's own store: `download_cursor`.
const CLIENT_SYNC: TableDefinition<&str, u64> = TableDefinition::new("sync_client");
const DOWNLOAD_CURSOR: &str = "download_cursor";
const SCHEMA_VERSION: &str = "schema_version";

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
}

impl SyncError {
    /// Whether reconnecting may help (as opposed to needing a new token, a new build, or
    /// a client reset).
    pub fn is_transient(&self) -> bool {
        match self {
            SyncError::Server { code, .. } => code.is_transient(),
            SyncError::Store(Error::Storage(_)) | SyncError::Io(_) | SyncError::Protocol(_) => true,
            SyncError::Store(_) => false,
        }
    }
}

/// Client settings.
#[derive(Clone, Debug)]
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

fn client_value(store: &Store, key: &str) -> Result<u64> {
    let rtx = store.read_txn()?;
    match rtx.open_table(CLIENT_SYNC) {
        Ok(t) => Ok(t.get(key)?.map_or(0, |v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// The persisted download cursor of a client store.
pub(crate) fn download_cursor(store: &Store) -> Result<ServerVersion> {
    client_value(store, DOWNLOAD_CURSOR)
}

/// Adopts the server's schemas (an additive change) with their version.
fn adopt_schemas(store: &Store, version: u64, schemas: Vec<Schema>) -> Result<()> {
    for s in schemas {
        store.set_schema(s)?;
    }
    let mut tx = store.begin()?;
    tx.raw()
        .open_table(CLIENT_SYNC)?
        .insert(SCHEMA_VERSION, version)?;
    tx.commit()?;
    Ok(())
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
    /// The reset under way on this connection: its marker and where replay starts.
    reset: Option<(ResetMarker, LogPos, bool)>,
    /// Reports of finished resets, for the application.
    reports: Vec<ResetReport>,
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
            reset: None,
            reports: Vec::new(),
        }
    }

    /// Reports of resets finished since the last call.
    pub fn take_reset_reports(&mut self) -> Vec<ResetReport> {
        std::mem::take(&mut self.reports)
    }

    /// The first message of a connection.
    pub fn hello(&mut self) -> Result<ClientMsg> {
        let marker = self.store.reset_marker()?.map(|m| m.phase);
        Ok(ClientMsg::Hello {
            protocol: PROTOCOL_VERSION,
            schema_version: client_value(&self.store, SCHEMA_VERSION)?,
            token: self.config.token.clone(),
            replica: self.store.replica_id(),
            download_cursor: download_cursor(&self.store)?,
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
            } => {
                if !schemas.is_empty() {
                    adopt_schemas(&self.store, schema_version, schemas)?;
                }
                let last_sync = self.store.last_sync();
                if uploaded > self.store.log_head() {
                    return Err(SyncError::Protocol(format!(
                        "server claims position {uploaded}, beyond this log's {}",
                        self.store.log_head()
                    )));
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
                self.finish_reset_if_uploaded()?;
                Ok(Vec::new())
            }
            ServerMsg::UploadAck { seq, .. } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                self.store.mark_synced(seq)?;
                self.finish_reset_if_uploaded()?;
                Ok(Vec::new())
            }
            ServerMsg::ResetRequired { reason, uploaded } => {
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
                self.reset = Some((marker, replay_after, true));
                self.ready = false;
                Ok(Vec::new())
            }
            ServerMsg::Snapshot { objects, end } => {
                let Some((marker, replay_after, first)) = self.reset.as_mut() else {
                    return Err(SyncError::Protocol("a snapshot outside a reset".into()));
                };
                self.store.stage_snapshot(&objects, *first)?;
                *first = false;
                let mut settled = None;
                if let Some(end) = end {
                    let (marker, replay_after) = (marker.clone(), *replay_after);
                    self.reset = None;
                    self.swap_in(&marker, replay_after, end)?;
                    settled = Some(self.store.last_sync());
                }
                Ok(vec![ClientMsg::SnapshotAck { settled }])
            }
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

    /// Swaps the staged server state in, replays unsynced writes, and carries on syncing.
    fn swap_in(
        &mut self,
        marker: &ResetMarker,
        replay_after: LogPos,
        end: SnapshotEnd,
    ) -> Result<(), SyncError> {
        let SnapshotEnd {
            cursor,
            schema_version,
            schemas,
        } = end;
        let (report, _until) = self
            .store
            .finish_reset(marker, &schemas, replay_after, |tx| {
                let mut t = tx.raw().open_table(CLIENT_SYNC)?;
                t.insert(DOWNLOAD_CURSOR, cursor)?;
                t.insert(SCHEMA_VERSION, schema_version)?;
                Ok(())
            })?;
        self.reports.push(report);
        self.sent = self.store.last_sync();
        self.server_version = self.server_version.max(cursor);
        self.ready = true;
        self.in_flight = 0;
        self.outgoing.clear();
        self.finish_reset_if_uploaded()?;
        Ok(())
    }

    /// Ends a reset once its recovered writes are acknowledged: the backup goes (unless the
    /// application recovers by hand), then the marker.
    fn finish_reset_if_uploaded(&mut self) -> Result<()> {
        let Some(m) = self.store.reset_marker()? else {
            return Ok(());
        };
        let ResetPhase::Uploading { until, .. } = m.phase else {
            return Ok(());
        };
        if self.store.last_sync() < until {
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
        self.store.import_with(&cs, |tx, _| {
            tx.raw()
                .open_table(CLIENT_SYNC)?
                .insert(DOWNLOAD_CURSOR, cursor)?;
            Ok(())
        })?;
        Ok(vec![ClientMsg::DownloadAck { cursor }])
    }

    /// The next upload, if there are unsynced entries and the window allows.
    pub fn poll_upload(&mut self) -> Result<Option<ClientMsg>, SyncError> {
        if !self.ready {
            return Ok(None);
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
        for e in self.store.log_after(self.sent, 256)? {
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
