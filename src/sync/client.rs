//! The sync client's logic, free of sockets and timers. It uploads the store's unsynced log
//! entries, persists each acknowledged position, and applies downloads with their cursor
//! in one transaction.

use std::sync::Arc;

use redb::TableDefinition;

use crate::changeset::Changeset;
use crate::error::{Error, Result};
use crate::log::{LogEntry, LogPos};
use crate::store::Store;
use crate::sync::pieces::{entry_size, join_piece, split_entry};
use crate::sync::protocol::{ClientMsg, ErrorCode, ServerMsg, ServerVersion, PROTOCOL_VERSION};

/// Client bookkeeping kept in the client's own store: `download_cursor`.
const CLIENT_SYNC: TableDefinition<&str, u64> = TableDefinition::new("sync_client");
const DOWNLOAD_CURSOR: &str = "download_cursor";

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
    /// The schema version announced in the handshake.
    pub schema_version: u64,
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
            schema_version: 0,
            batch_bytes: 1 << 20,
            window: 4,
        }
    }
}

/// The persisted download cursor of a client store.
pub(crate) fn download_cursor(store: &Store) -> Result<ServerVersion> {
    let rtx = store.read_txn()?;
    match rtx.open_table(CLIENT_SYNC) {
        Ok(t) => Ok(t.get(DOWNLOAD_CURSOR)?.map_or(0, |v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
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
        }
    }

    /// The first message of a connection.
    pub fn hello(&mut self) -> Result<ClientMsg> {
        Ok(ClientMsg::Hello {
            protocol: PROTOCOL_VERSION,
            schema_version: self.config.schema_version,
            token: self.config.token.clone(),
            replica: self.store.replica_id(),
            download_cursor: download_cursor(&self.store)?,
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
                ..
            } => {
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
                Ok(Vec::new())
            }
            ServerMsg::UploadAck { seq, .. } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                self.store.mark_synced(seq)?;
                Ok(Vec::new())
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
