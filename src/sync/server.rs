//! The sync server's logic, free of sockets and timers: a [`SyncServer`] owns the server's
//! store and its history; a [`ServerSession`] per connection turns client messages into
//! server messages.
//!
//! The server keeps, in its own store's redb file: `history` (server version → origin and
//! log entry, as uploaded), `clients` (replica id → highest applied log position and user).
//! An upload is applied with its history records and the client's position in one redb
//! transaction, so a repeated, overlapping or replayed upload is applied once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::changeset::Changeset;
use crate::clock::ReplicaId;
use crate::conflict::{
    apply_write, Conflict, ConflictKind, ConflictRecord, Decision, Plan, PlanSource, Planner,
    Policies,
};
use crate::error::{Error, Result};
use crate::log::{LogEntry, LogPos, Op};
use crate::merge::ObjectState;
use crate::reset::ObjectSnapshot;
use crate::reset::ResetReason;
use crate::rules::{Rules, User};
use crate::schema::Schema;
use crate::store::Store;
use crate::store::WriteTx;
use crate::sync::pieces::{join_piece, split_entry};
use crate::sync::protocol::{
    ClientMsg, ErrorCode, ServerMsg, ServerVersion, SnapshotEnd, PROTOCOL_VERSION,
};
use crate::sync::protocol::{RefusedWrite, SubscriptionSet};
use crate::sync::token::{self, Secret, TokenError};
use crate::sync::view::View;
use crate::value::Value;
use crate::wal::Aux;

/// Download messages a session sends ahead of the client's acknowledgements.
const DOWNLOAD_WINDOW: usize = 4;

/// server version → postcard [`HistoryRecord`].
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("sync_history");
/// client replica id → postcard [`ClientRecord`].
const CLIENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("sync_clients");
/// conflict number → postcard [`ConflictRecord`].
const CONFLICTS: TableDefinition<u64, &[u8]> = TableDefinition::new("sync_conflicts");
/// (client replica id, its log position) → postcard `Vec<RefusedWrite>`: refusals kept
/// until the client shows (by its `last_sync`) that it received them.
const REFUSALS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("sync_refusals");
/// (client replica id, its log position) → the applied entry's server version and its
/// stamp's time (8 bytes each, big-endian): a re-sent entry is skipped only if it is the
/// same transaction. A device never gives two transactions one stamp (its clock moves
/// forward with every commit), and the pieces of one transaction share it, so a piece
/// re-sent alone is recognised too.
const UPLOADS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("sync_uploads");
/// hash of (collection, primary key) → postcard [`Grave`]: a deleted object's last live
/// fields, kept for collections where a client's update may bring it back whole.
const GRAVEYARD: TableDefinition<u64, &[u8]> = TableDefinition::new("sync_graveyard");
/// `horizon` (history at or below it was compacted away), `schema_version`,
/// `breaking_version` (the schema version of the last breaking change).
const SERVER_META: TableDefinition<&str, u64> = TableDefinition::new("sync_server_meta");
const HORIZON: &str = "horizon";
const SCHEMA_VERSION: &str = "schema_version";
const BREAKING_VERSION: &str = "breaking_version";

/// One accepted transaction in the server's history.
#[derive(Debug, Serialize, Deserialize)]
struct HistoryRecord {
    origin: ReplicaId,
    entry: LogEntry,
}

/// The history row for `entry` at the next version after `next` (which moves), as a row
/// of the commit's write-ahead record.
fn history_row(next: &AtomicU64, origin: ReplicaId, entry: &LogEntry) -> Result<Aux> {
    let v = next.fetch_add(1, Ordering::SeqCst) + 1;
    let rec = HistoryRecord {
        origin,
        entry: entry.clone(),
    };
    let bytes = postcard::to_allocvec(&rec).map_err(|e| corrupt(e.to_string()))?;
    Ok(Aux::u64_bytes(HISTORY, v, bytes))
}

/// The `UPLOADS` row of an entry applied at `version`.
fn upload_row(client: ReplicaId, entry: &LogEntry, version: ServerVersion) -> Aux {
    let mut value = Vec::with_capacity(16);
    value.extend_from_slice(&version.to_be_bytes());
    value.extend_from_slice(&entry.stamp.time.to_be_bytes());
    Aux::u64_pair_bytes(UPLOADS, (client.0, entry.seq), value)
}

/// Reads an `UPLOADS` value: (server version, stamp time).
fn parse_upload_row(v: &[u8]) -> Option<(ServerVersion, u64)> {
    let version = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let time = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    Some((version, time))
}

/// Counters of what the server refused, for operators.
#[derive(Debug, Default)]
struct Refusals {
    /// Sessions refused because the device belongs to another user.
    device_owner: AtomicU64,
    /// Uploads refused as protocol errors (a gap in positions, a different entry at a
    /// known position).
    upload_protocol: AtomicU64,
}

/// A snapshot of the server's refusal counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RefusalCounts {
    /// Sessions refused because the device (replica id) belongs to another user.
    pub device_owner: u64,
    /// Uploads refused as protocol errors: a position that skips ahead of the last one
    /// applied for the device, or a different entry at a position already applied.
    pub upload_protocol: u64,
}

/// What the server remembers of a client.
#[derive(Debug, Default, Serialize, Deserialize)]
struct ClientRecord {
    /// The client's highest log position applied here.
    uploaded: LogPos,
    /// The user the client last authenticated as.
    user: String,
    /// An operator ordered a reset for this client.
    force_reset: bool,
}

/// A callback that sees every conflict the server records.
pub type ConflictObserver = Arc<dyn Fn(&ConflictRecord) + Send + Sync>;

/// Server settings.
#[derive(Clone)]
pub struct ServerConfig {
    /// The key tokens are signed with.
    pub secret: Secret,
    /// Target size of one download or upload message's changes, in bytes.
    pub batch_bytes: usize,
    /// How conflicts are resolved, per collection and kind.
    pub conflicts: Policies,
    /// Called with every conflict after it is recorded.
    pub on_conflict: Option<ConflictObserver>,
    /// Who may read and write what (`None`: every user may read and write everything).
    pub rules: Option<Arc<Rules>>,
    /// Bounds on connections, deadlines and buffered bytes.
    pub limits: Limits,
}

/// Bounds on what peers can make the server hold or wait for: connections, deadlines and
/// buffered bytes. Honest clients stay far below every one of them; a slow, idle or hostile
/// peer meets them and is refused, throttled or disconnected. Worst-case buffer memory is
/// `server_buffer_bytes_max + connections_max × hello_frame_bytes_max +
/// server_transaction_bytes_max`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; one more is refused at accept with a `Busy` error and
    /// closed (default 1,000: below the usual open-file limit of 1,024).
    pub connections_max: usize,
    /// Time from accept until the handshake's `Hello` has arrived, in milliseconds; then
    /// the connection is closed (default 10,000).
    pub handshake_timeout_ms: u64,
    /// Time a session may go without a complete message from its client, and time one
    /// reply may take to be written, in milliseconds; then the connection is closed
    /// (default 60,000). Clients send a `Ping` after 15 s without sending anything.
    pub idle_timeout_ms: u64,
    /// Largest frame body read before the handshake, in bytes (default 64 KiB): an
    /// unauthenticated peer cannot make the server hold more. It is also every
    /// connection's allowance of buffered bytes outside `server_buffer_bytes_max`, so
    /// small messages always flow.
    pub hello_frame_bytes_max: usize,
    /// Largest frame body read after the handshake, in bytes (default 16 MiB).
    pub frame_bytes_max: usize,
    /// Bytes of frames one connection may have read and not yet handled, in bytes
    /// (default 32 MiB, and never below `frame_bytes_max`); past it the server stops
    /// reading that connection until it catches up.
    pub connection_buffer_bytes_max: usize,
    /// Bytes of frames all connections together may have read and not yet handled, beyond
    /// each connection's `hello_frame_bytes_max` allowance (default 256 MiB); past it,
    /// connections wait before reading more.
    pub server_buffer_bytes_max: usize,
    /// Bytes of one upload transaction sent in pieces (as estimated by the sender's
    /// splitter), in bytes (default 256 MiB); a larger one is refused with
    /// `LimitExceeded`.
    pub transaction_bytes_max: usize,
    /// Bytes of unfinished upload transactions all connections together may hold, in bytes
    /// (default 512 MiB); past it, the upload's session ends with `Busy` and its client
    /// retries after a backoff.
    pub server_transaction_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_max: 1_000,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            hello_frame_bytes_max: 64 << 10,
            frame_bytes_max: crate::sync::frame::FRAME_LEN_MAX_DEFAULT,
            connection_buffer_bytes_max: 32 << 20,
            server_buffer_bytes_max: 256 << 20,
            transaction_bytes_max: 256 << 20,
            server_transaction_bytes_max: 512 << 20,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("batch_bytes", &self.batch_bytes)
            .field("conflicts", &self.conflicts)
            .finish_non_exhaustive()
    }
}

impl ServerConfig {
    /// Defaults with this secret.
    pub fn new(secret: Secret) -> Self {
        ServerConfig {
            secret,
            batch_bytes: 1 << 20,
            conflicts: Policies::default(),
            on_conflict: None,
            rules: None,
            limits: Limits::default(),
        }
    }
}

fn corrupt(what: impl Into<String>) -> Error {
    Error::Corrupt { what: what.into() }
}

/// The server's shared state: its store, history and client records.
pub struct SyncServer {
    store: Arc<Store>,
    config: ServerConfig,
    /// The newest server version; the lock also orders uploads from concurrent sessions.
    version: Mutex<ServerVersion>,
    /// The last conflict record's number (moved under `version`'s lock, once its upload
    /// has committed).
    last_conflict: AtomicU64,
    refusals: Refusals,
    /// The store's recovery generation the two counters above were read at: a recovery
    /// replays commits whose callers saw them fail (a sync that failed after the bytes
    /// were written), so the counters are read again from the store after one.
    generation: AtomicU64,
}

impl Drop for SyncServer {
    fn drop(&mut self) {
        self.store.set_served(false);
    }
}

impl std::fmt::Debug for SyncServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncServer")
            .field("version", &self.version())
            .finish_non_exhaustive()
    }
}

impl SyncServer {
    /// Serves `store`, creating the sync tables on first use.
    pub fn open(store: Arc<Store>, config: ServerConfig) -> Result<SyncServer> {
        let mut tx = store.begin()?;
        let (version, last_conflict) = {
            let txn = tx.raw()?;
            txn.open_table(CLIENTS)?;
            txn.open_table(SERVER_META)?;
            let history = txn.open_table(HISTORY)?;
            let last = history.last()?.map(|(k, _)| k.value());
            let horizon = txn
                .open_table(SERVER_META)?
                .get(HORIZON)?
                .map(|v| v.value());
            (
                last.unwrap_or(0).max(horizon.unwrap_or(0)),
                txn.open_table(CONFLICTS)?
                    .last()?
                    .map_or(0, |(k, _)| k.value()),
            )
        };
        tx.commit()?;
        store.set_served(true);
        Ok(SyncServer {
            generation: AtomicU64::new(store.generation()),
            store,
            config,
            version: Mutex::new(version),
            last_conflict: AtomicU64::new(last_conflict),
            refusals: Refusals::default(),
        })
    }

    /// The limits it was configured with.
    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// The server's version, with the counters read again from the store if it recovered
    /// from a storage failure since they were read. Called with the version's lock held.
    fn current(&self, version: &mut MutexGuard<'_, ServerVersion>) -> Result<()> {
        let generation = self.store.generation();
        if self.generation.load(Ordering::SeqCst) == generation {
            return Ok(());
        }
        let rtx = self.store.read_txn()?;
        let last = rtx.open_table(HISTORY)?.last()?.map(|(k, _)| k.value());
        let horizon = rtx
            .open_table(SERVER_META)?
            .get(HORIZON)?
            .map(|v| v.value());
        let conflict = match rtx.open_table(CONFLICTS) {
            Ok(t) => t.last()?.map_or(0, |(k, _)| k.value()),
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(e.into()),
        };
        **version = (**version).max(last.unwrap_or(0)).max(horizon.unwrap_or(0));
        self.last_conflict.fetch_max(conflict, Ordering::SeqCst);
        self.generation.store(generation, Ordering::SeqCst);
        Ok(())
    }

    /// The server's store, to read. While the server serves it, the store refuses writes
    /// made around the server ([`Error::ServedStore`]): they would never reach a client.
    /// Write with [`SyncServer::write`] and [`SyncServer::set_schema`].
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The newest server version.
    pub fn version(&self) -> ServerVersion {
        let mut version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        // A store that cannot be read keeps the version known (uploads read it again).
        let _ = self.current(&mut version);
        *version
    }

    /// How many sessions and uploads the server has refused, by reason.
    pub fn refusal_counts(&self) -> RefusalCounts {
        RefusalCounts {
            device_owner: self.refusals.device_owner.load(Ordering::Relaxed),
            upload_protocol: self.refusals.upload_protocol.load(Ordering::Relaxed),
        }
    }

    /// Ties `client` to `user` on its first session, durably, before any state is sent or
    /// accepted; refuses a session of any other user claiming it. Device ids are not
    /// secret (every stamp names its device), so the id alone proves nothing.
    fn claim_device(
        &self,
        client: ReplicaId,
        user: &str,
    ) -> Result<std::result::Result<(), String>> {
        let _version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        if client == self.store.replica_id() {
            return Ok(Err(format!(
                "device {client} is the server's own replica id"
            )));
        }
        let mut record = self.client_record(client)?;
        if record.user == user {
            return Ok(Ok(()));
        }
        if !record.user.is_empty() {
            return Ok(Err(format!(
                "device {client} belongs to another user; a device id is registered to the first user that syncs it"
            )));
        }
        record.user = user.to_owned();
        self.put_client_record(client, &record)?;
        Ok(Ok(()))
    }

    /// The stamp time of `client`'s entry at `seq` as applied here, if the server knows it.
    fn applied_stamp(&self, client: ReplicaId, seq: LogPos) -> Result<Option<u64>> {
        let rtx = self.store.read_txn()?;
        let table = match rtx.open_table(UPLOADS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let row = table.get((client.0, seq))?;
        match row.map(|v| parse_upload_row(v.value())) {
            None => Ok(None),
            Some(Some((_, time))) => Ok(Some(time)),
            Some(None) => Err(corrupt(format!("upload row of {client} at {seq}"))),
        }
    }

    /// The entries of an upload not yet applied. A re-sent entry must be the transaction
    /// applied at its position (the same stamp); fresh entries must continue the
    /// client's positions without a gap. Anything else is a protocol error: acknowledging
    /// it would drop a write (a gap would make the skipped positions look applied).
    fn fresh_entries(
        &self,
        client: ReplicaId,
        uploaded: LogPos,
        entries: Vec<LogEntry>,
    ) -> Result<Vec<LogEntry>> {
        let mut fresh: Vec<LogEntry> = Vec::with_capacity(entries.len());
        for e in entries {
            let refuse = |reason: String| {
                self.refusals
                    .upload_protocol
                    .fetch_add(1, Ordering::Relaxed);
                Err(Error::BadChangeset { reason })
            };
            if e.seq <= uploaded {
                if self
                    .applied_stamp(client, e.seq)?
                    .is_some_and(|t| t != e.stamp.time)
                {
                    return refuse(format!(
                        "entry {} differs from the entry applied at that position",
                        e.seq
                    ));
                }
                continue;
            }
            let expected = fresh.last().map_or(uploaded, |f| f.seq) + 1;
            if e.seq != expected {
                return refuse(format!(
                    "entry {} skips ahead: the next position of this device is {expected}",
                    e.seq
                ));
            }
            fresh.push(e);
        }
        Ok(fresh)
    }

    /// A session for a new connection.
    pub fn session(self: &Arc<Self>) -> ServerSession {
        ServerSession {
            server: Arc::clone(self),
            state: State::AwaitHello,
            expires_at_ms: u64::MAX,
            partial_bytes: 0,
        }
    }

    fn client_record(&self, client: ReplicaId) -> Result<ClientRecord> {
        let rtx = self.store.read_txn()?;
        let table = rtx.open_table(CLIENTS)?;
        let rec = table.get(client.0)?;
        rec.map(|r| postcard::from_bytes(r.value()).map_err(|e| corrupt(format!("client: {e}"))))
            .transpose()
            .map(Option::unwrap_or_default)
    }

    /// The highest log position of `client` applied here.
    pub fn uploaded(&self, client: ReplicaId) -> Result<LogPos> {
        Ok(self.client_record(client)?.uploaded)
    }

    /// Applies complete entries from `client`, skipping those already applied. Returns the
    /// client's applied position and the server version afterwards.
    fn apply_upload(
        &self,
        client: ReplicaId,
        view: &View,
        entries: Vec<LogEntry>,
    ) -> Result<(LogPos, ServerVersion, Vec<RefusedWrite>)> {
        let user = view.user().id.as_str();
        let mut version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        self.current(&mut version)?;
        let mut record = self.client_record(client)?;
        let mut fresh = self.fresh_entries(client, record.uploaded, entries)?;
        let Some(last) = fresh.last().map(|e| e.seq) else {
            return Ok((record.uploaded, *version, Vec::new()));
        };
        // A write that breaks the server's schema is refused on its own (ErrorsOccurred),
        // not the whole upload: the client's other writes go through.
        let mut invalid = Vec::new();
        for e in &mut fresh {
            let stamp = e.stamp;
            e.writes.retain(|w| match self.store.check_write_schema(w) {
                Ok(()) => true,
                Err(err) => {
                    invalid.push(refused_write(
                        w,
                        stamp,
                        not_allowed(w),
                        Some(format!("failed validation: {err}")),
                    ));
                    false
                }
            });
        }
        let mut refused = if view.filtered() {
            self.enforce(view, &mut fresh)?
        } else {
            Vec::new()
        };
        let plan = self.plan_conflicts(client, user, &fresh)?;
        let cs = Changeset {
            origin: client,
            entries: fresh,
        };
        // Shared with the log hook, which numbers the server's own entry inside the commit.
        let next = Arc::new(AtomicU64::new(*version));
        let mut records = Vec::new();
        let server_replica = self.store.replica_id();
        self.store.import_with(&cs, |tx, _| {
            // History, the entries' stamps and the client's position go in the upload's
            // write-ahead record.
            for e in &cs.entries {
                tx.put_aux(history_row(&next, client, e)?);
                tx.put_aux(upload_row(client, e, next.load(Ordering::SeqCst)));
            }
            if !refused.is_empty() || !invalid.is_empty() {
                let all: Vec<&RefusedWrite> = refused.iter().chain(&invalid).collect();
                let bytes = postcard::to_allocvec(&all).map_err(|e| corrupt(e.to_string()))?;
                tx.put_aux(Aux::u64_pair_bytes(REFUSALS, (client.0, last), bytes));
            }
            record.uploaded = last;
            record.user = user.to_owned();
            let bytes = postcard::to_allocvec(&record).map_err(|e| corrupt(e.to_string()))?;
            tx.put_aux(Aux::u64_bytes(CLIENTS, client.0, bytes));
            // Refused writes are reverted: the server writes the objects as they are, stamped
            // after the client's writes, so every replica drops the refused values.
            let mut reverted = std::collections::HashSet::new();
            for r in &refused {
                if reverted.insert((r.collection.clone(), r.pk.clone())) {
                    tx.reassert(&r.collection, &r.pk)?;
                }
            }
            for r in &invalid {
                if reverted.insert((r.collection.clone(), r.pk.clone())) {
                    tx.reassert(&r.collection, &r.pk)?;
                }
                let field = r.fields.first().map(|(f, _)| f.clone());
                records.push(ConflictRecord {
                    id: 0,
                    conflict: Conflict {
                        kind: ConflictKind::ErrorsOccurred,
                        collection: r.collection.clone(),
                        pk: r.pk.clone(),
                        client: crate::conflict::Side {
                            value: r.fields.first().map(|(_, v)| v.clone()),
                            stamp: Some(r.stamp),
                            replica: Some(client),
                            user: Some(user.to_owned()),
                        },
                        server: crate::conflict::Side {
                            value: None,
                            stamp: None,
                            replica: None,
                            user: None,
                        },
                        field,
                    },
                    policy: r.to_string(),
                    decision: Decision::Server,
                });
            }
            // Policy decisions become the server's own writes, stamped after the client's.
            let Plan {
                decided,
                targets,
                graves,
            } = plan;
            for (collection, pk, target) in targets {
                tx.force(&collection, &pk, target)?;
            }
            for (collection, pk, fields) in &graves {
                tx.put_aux(grave_row(collection, pk, fields)?);
            }
            records.extend(decided.into_iter().map(|d| ConflictRecord {
                id: 0,
                conflict: d.conflict,
                policy: d.policy,
                decision: d.decision,
            }));
            let mut id = self.last_conflict.load(Ordering::SeqCst);
            for r in &mut records {
                id += 1;
                r.id = id;
                let bytes = postcard::to_allocvec(&*r).map_err(|e| corrupt(e.to_string()))?;
                tx.put_aux(Aux::u64_bytes(CONFLICTS, id, bytes));
            }
            // The server's own writes (reverted refusals, policy decisions) enter the history
            // in the same record.
            let next = Arc::clone(&next);
            tx.on_log_entry(move |entry| Ok(vec![history_row(&next, server_replica, entry)?]));
            Ok(())
        })?;
        *version = next.load(Ordering::SeqCst);
        if let Some(r) = records.last() {
            self.last_conflict.store(r.id, Ordering::SeqCst);
        }
        if let Some(observe) = &self.config.on_conflict {
            for r in &records {
                observe(r);
            }
        }
        refused.extend(invalid);
        Ok((last, *version, refused))
    }

    /// Refusals of uploads above `last_sync` the client may have missed (a connection cut
    /// between the refusal and the acknowledgement); those at or below it were received
    /// and are forgotten.
    fn pending_refusals(&self, client: ReplicaId, last_sync: LogPos) -> Result<Vec<RefusedWrite>> {
        // Most handshakes have none: look before taking the writer.
        {
            let rtx = self.store.read_txn()?;
            let table = match rtx.open_table(REFUSALS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            if table
                .range((client.0, 0)..=(client.0, u64::MAX))?
                .next()
                .is_none()
            {
                return Ok(Vec::new());
            }
        }
        let mut tx = self.store.begin()?;
        let mut out = Vec::new();
        {
            let mut table = tx.raw()?.open_table(REFUSALS)?;
            table.retain_in((client.0, 0)..=(client.0, last_sync), |_, _| false)?;
            for row in
                table.range((client.0, last_sync.saturating_add(1))..=(client.0, u64::MAX))?
            {
                let (_, v) = row?;
                let batch = crate::sync::stored::refused_writes(v.value())?;
                out.extend(batch);
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// A view for a user and a subscription set.
    pub(crate) fn view(&self, user: User, set: Option<&SubscriptionSet>) -> Result<View, String> {
        View::new(self.config.rules.clone(), user, set, |c| {
            self.store.schema(c)
        })
    }

    /// Takes the writes the client's roles or subscriptions do not allow out of the upload
    /// and returns them. Each write is judged on the object as the upload's earlier
    /// (allowed) writes leave it.
    fn enforce(&self, view: &View, entries: &mut [LogEntry]) -> Result<Vec<RefusedWrite>> {
        let mut overlay = Overlay::default();
        let mut refused = Vec::new();
        for e in entries.iter_mut() {
            let mut kept = Vec::with_capacity(e.writes.len());
            for w in std::mem::take(&mut e.writes) {
                let state = overlay.state(&self.store, &w)?;
                let mut after = state.clone();
                apply_write(&mut after, &w, e.stamp);
                let (before_fields, after_fields) = (live_fields(state)?, live_fields(&after)?);
                let denial = judge(view, &w, before_fields.as_ref(), after_fields.as_ref());
                match denial {
                    None => {
                        *state = after;
                        kept.push(w);
                    }
                    Some((reason, detail)) => {
                        refused.push(refused_write(&w, e.stamp, reason, detail));
                    }
                }
            }
            e.writes = kept;
        }
        Ok(refused)
    }

    /// Decides the conflicts of an upload's writes with the server's state (see
    /// [`Planner`]): the conflicts with their decisions, and the objects they change.
    fn plan_conflicts(&self, client: ReplicaId, user: &str, entries: &[LogEntry]) -> Result<Plan> {
        let mut planner = Planner::new(&self.config.conflicts, client, user);
        let mut src = StoreSource { server: self };
        for e in entries {
            for w in &e.writes {
                planner.write(&mut src, w, e.stamp)?;
            }
        }
        Ok(planner.finish(&src))
    }

    /// Writes on the server, as the server: the transaction enters the history like an
    /// upload, so every client receives it.
    pub fn write<R>(&self, f: impl FnOnce(&mut WriteTx<'_>) -> Result<R>) -> Result<R> {
        let mut version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        self.current(&mut version)?;
        let next = Arc::new(AtomicU64::new(*version));
        let mut tx = self.store.begin()?;
        let r = f(&mut tx)?;
        for (collection, pk, fields) in tx.deleted_live()? {
            if self.config.conflicts.may_revive(&collection) {
                tx.put_aux(grave_row(&collection, &pk, &fields)?);
            }
        }
        let (hook_next, origin) = (Arc::clone(&next), self.store.replica_id());
        tx.on_log_entry(move |entry| Ok(vec![history_row(&hook_next, origin, entry)?]));
        tx.commit()?;
        *version = next.load(Ordering::SeqCst);
        Ok(r)
    }

    /// Every recorded conflict after number `after`, at most `limit`.
    pub fn conflicts(&self, after: u64, limit: usize) -> Result<Vec<ConflictRecord>> {
        conflicts_in(&self.store, after, limit)
    }

    fn meta(&self, key: &str) -> Result<u64> {
        let rtx = self.store.read_txn()?;
        let t = rtx.open_table(SERVER_META)?;
        let v = t.get(key)?.map(|v| v.value());
        Ok(v.unwrap_or(0))
    }

    /// History at or below this version has been compacted away.
    pub fn horizon(&self) -> Result<ServerVersion> {
        self.meta(HORIZON)
    }

    /// The current schema version (raised by every schema change).
    pub fn schema_version(&self) -> Result<u64> {
        self.meta(SCHEMA_VERSION)
    }

    /// Drops history up to `upto` (at most the current version). Clients whose cursor is
    /// below it must reset; the state keeps every field's stamp and every tombstone, so
    /// their recovery loses nothing. Returns how many records were removed.
    pub fn compact_history(&self, upto: ServerVersion) -> Result<u64> {
        let version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        let upto = upto.min(*version);
        let mut removed = 0;
        let mut tx = self.store.begin()?;
        {
            let txn = tx.raw()?;
            let mut meta = txn.open_table(SERVER_META)?;
            let horizon = meta.get(HORIZON)?.map_or(0, |v| v.value());
            if upto > horizon {
                meta.insert(HORIZON, upto)?;
            }
            txn.open_table(HISTORY)?.retain_in(..=upto, |_, _| {
                removed += 1;
                false
            })?;
            // Stamps of compacted entries go with them: a re-sent entry from before the
            // horizon is skipped unchecked, as it was applied.
            txn.open_table(UPLOADS)?
                .retain(|_, v| parse_upload_row(v).is_none_or(|(version, _)| version > upto))?;
        }
        tx.commit()?;
        Ok(removed)
    }

    /// Orders a reset for a client the next time it connects.
    pub fn force_reset(&self, client: ReplicaId) -> Result<()> {
        let _version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        let mut record = self.client_record(client)?;
        record.force_reset = true;
        self.put_client_record(client, &record)
    }

    fn put_client_record(&self, client: ReplicaId, record: &ClientRecord) -> Result<()> {
        let mut tx = self.store.begin()?;
        let bytes = postcard::to_allocvec(record).map_err(|e| corrupt(e.to_string()))?;
        tx.raw()?
            .open_table(CLIENTS)?
            .insert(client.0, bytes.as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// Sets a collection's schema on the server. Raises the schema version; a removed or
    /// retyped field (a breaking change) makes clients on older versions reset, an added
    /// field does not. Returns whether the change was breaking.
    pub fn set_schema(&self, schema: Schema) -> Result<bool> {
        let _version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        let breaking = self.store.schema(&schema.collection).is_some_and(|old| {
            old.fields
                .iter()
                .any(|(name, spec)| schema.fields.get(name).is_none_or(|new| new.ty != spec.ty))
        });
        self.store.put_schema(schema)?;
        let mut tx = self.store.begin()?;
        {
            let txn = tx.raw()?;
            let mut meta = txn.open_table(SERVER_META)?;
            let v = meta.get(SCHEMA_VERSION)?.map_or(0, |v| v.value()) + 1;
            meta.insert(SCHEMA_VERSION, v)?;
            if breaking {
                meta.insert(BREAKING_VERSION, v)?;
            }
        }
        tx.commit()?;
        Ok(breaking)
    }

    /// Why this client must reset, if it must.
    fn reset_reason(
        &self,
        record: &ClientRecord,
        schema_version: u64,
        download_cursor: ServerVersion,
        last_sync: LogPos,
        reset_pending: bool,
    ) -> Result<Option<ResetReason>> {
        let version = self.version();
        let horizon = self.meta(HORIZON)?;
        let breaking = self.meta(BREAKING_VERSION)?;
        let server_schema = self.meta(SCHEMA_VERSION)?;
        Ok(if reset_pending {
            Some(ResetReason::Resumed)
        } else if record.force_reset {
            Some(ResetReason::Forced)
        } else if schema_version < breaking {
            Some(ResetReason::BreakingSchemaChange {
                client: schema_version,
                server: server_schema,
            })
        } else if download_cursor > version {
            Some(ResetReason::ClientAheadOfServer {
                detail: format!(
                    "the client has downloaded up to version {download_cursor}; the server has {version}"
                ),
            })
        } else if last_sync > record.uploaded {
            Some(ResetReason::ClientAheadOfServer {
                detail: format!(
                    "the server acknowledged this client's log up to {last_sync} but holds only {}",
                    record.uploaded
                ),
            })
        } else if download_cursor < horizon {
            Some(ResetReason::BehindHorizon {
                cursor: download_cursor,
                horizon,
            })
        } else {
            None
        })
    }

    /// The client swapped the snapshot in: a forced reset is done, and its log up to
    /// `settled` needs no upload.
    fn reset_served(&self, client: ReplicaId, settled: LogPos) -> Result<()> {
        let _version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        let mut record = self.client_record(client)?;
        if record.force_reset || settled > record.uploaded {
            record.force_reset = false;
            record.uploaded = record.uploaded.max(settled);
            self.put_client_record(client, &record)?;
        }
        Ok(())
    }

    /// History after `cursor` that `client` has not got: its own entries are skipped (it
    /// has them). Returns entries (seq = server version) up to about `batch_bytes`, and the
    /// cursor after them.
    fn history_after(
        &self,
        cursor: ServerVersion,
        client: ReplicaId,
    ) -> Result<(Vec<LogEntry>, ServerVersion)> {
        let rtx = self.store.read_txn()?;
        let table = rtx.open_table(HISTORY)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut end = cursor;
        for row in table.range(cursor.saturating_add(1)..)? {
            let (k, v) = row?;
            end = k.value();
            let rec: HistoryRecord = postcard::from_bytes(v.value())
                .map_err(|e| corrupt(format!("history {end}: {e}")))?;
            if rec.origin == client {
                continue;
            }
            bytes += v.value().len();
            let mut entry = rec.entry;
            entry.seq = end;
            out.push(entry);
            if bytes >= self.config.batch_bytes {
                break;
            }
        }
        Ok((out, end))
    }
}

#[derive(Debug)]
enum State {
    AwaitHello,
    /// Sending the server's state to a client that must reset.
    Snapshotting {
        client: ReplicaId,
        view: Arc<View>,
        /// Where the next chunk starts (`None`: the beginning).
        next_key: Option<Vec<u8>>,
        /// The server version when the snapshot began.
        cursor: ServerVersion,
        /// The schemas and their version when it began: the client decided with them.
        schemas: Vec<Schema>,
        schema_version: u64,
        /// Chunks sent and not yet acknowledged.
        in_flight: usize,
        /// Acknowledgements still to come for chunks of a snapshot this one replaced (a
        /// subscription change in the middle): they come first and count for nothing.
        stale: usize,
        /// The last chunk was sent.
        done: bool,
    },
    Ready {
        client: ReplicaId,
        view: Arc<View>,
        /// The client's download position as far as this session has sent.
        sent: ServerVersion,
        /// Pieces of an upload transaction still arriving.
        partial: Option<LogEntry>,
        /// Pieces of a download transaction still to send.
        outgoing: Vec<LogEntry>,
        outgoing_cursor: ServerVersion,
        /// Download messages sent and not yet acknowledged.
        in_flight: usize,
    },
    Closed,
}

/// One connection's server side. Feed it messages; send what it returns; after an
/// [`ServerMsg::Error`] it is closed and the connection should be.
#[derive(Debug)]
pub struct ServerSession {
    server: Arc<SyncServer>,
    state: State,
    /// When the handshake's token expires (`u64::MAX` before the handshake): the session
    /// ends then, as new connections with the token are refused.
    expires_at_ms: u64,
    /// Estimated bytes of the unfinished upload transaction (`partial` in
    /// [`State::Ready`]), bounded by [`Limits::transaction_bytes_max`].
    partial_bytes: usize,
}

fn error(code: ErrorCode, message: impl Into<String>) -> ServerMsg {
    ServerMsg::Error {
        code,
        message: message.into(),
    }
}

impl ServerSession {
    /// Whether the session has ended (after an error).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// The authenticated user, once the handshake is done.
    pub fn user(&self) -> Option<&str> {
        match &self.state {
            State::Ready { view, .. } | State::Snapshotting { view, .. } => Some(&view.user().id),
            _ => None,
        }
    }

    /// The authenticated user with the fields from the token.
    fn user_info(&self) -> User {
        match &self.state {
            State::Ready { view, .. } | State::Snapshotting { view, .. } => view.user().clone(),
            _ => User::new(""),
        }
    }

    fn fail(&mut self, code: ErrorCode, message: impl Into<String>) -> Vec<ServerMsg> {
        self.state = State::Closed;
        vec![error(code, message)]
    }

    /// When the session's token expires, once the handshake is done.
    pub fn expires_at_ms(&self) -> Option<u64> {
        (self.expires_at_ms != u64::MAX && !self.is_closed()).then_some(self.expires_at_ms)
    }

    /// Ends the session if its token has expired at `now_ms` (call it when the time from
    /// [`ServerSession::expires_at_ms`] comes); returns the error to send.
    pub fn on_time(&mut self, now_ms: u64) -> Vec<ServerMsg> {
        if self.is_closed() || now_ms < self.expires_at_ms {
            return Vec::new();
        }
        let at = self.expires_at_ms;
        self.fail(
            ErrorCode::TokenExpired,
            format!("the session's token expired at {at} ms (now {now_ms} ms)"),
        )
    }

    /// Estimated bytes of the upload transaction whose pieces are still arriving.
    pub fn partial_upload_bytes(&self) -> usize {
        match &self.state {
            State::Ready {
                partial: Some(_), ..
            } => self.partial_bytes,
            _ => 0,
        }
    }

    /// Handles one client message at time `now_ms`.
    pub fn on_message(&mut self, msg: ClientMsg, now_ms: u64) -> Vec<ServerMsg> {
        let expiry = self.on_time(now_ms);
        if !expiry.is_empty() {
            return expiry;
        }
        match self.handle(msg, now_ms) {
            Ok(out) => out,
            Err(Error::BadChangeset { reason }) => self.fail(ErrorCode::BadChangeset, reason),
            Err(
                e @ (Error::Schema { .. }
                | Error::ClockDrift { .. }
                | Error::BadName { .. }
                | Error::TooManyFields { .. }),
            ) => self.fail(ErrorCode::BadChangeset, e.to_string()),
            Err(e) => self.fail(ErrorCode::Internal, e.to_string()),
        }
    }

    /// A protocol error of the peer (a frame that failed to decode): the session ends.
    pub fn on_bad_frame(&mut self, reason: &str) -> Vec<ServerMsg> {
        self.fail(ErrorCode::BadFrame, reason)
    }

    fn handle(&mut self, msg: ClientMsg, now_ms: u64) -> Result<Vec<ServerMsg>> {
        match (&mut self.state, msg) {
            (State::Closed, _) => Ok(Vec::new()),
            (
                State::AwaitHello,
                ClientMsg::Hello {
                    protocol,
                    schema_version,
                    token,
                    replica,
                    download_cursor,
                    last_sync,
                    reset_pending,
                    reset_settled,
                    subscriptions,
                    subscriptions_acked,
                },
            ) => {
                if protocol != PROTOCOL_VERSION {
                    return Ok(self.fail(
                        ErrorCode::ProtocolVersion,
                        format!("server speaks protocol {PROTOCOL_VERSION}, client {protocol}"),
                    ));
                }
                let claims = match token::verify(&self.server.config.secret, &token, now_ms) {
                    Ok(c) => c,
                    Err(e @ TokenError::Expired { .. }) => {
                        return Ok(self.fail(ErrorCode::TokenExpired, e.to_string()))
                    }
                    Err(e) => return Ok(self.fail(ErrorCode::Unauthorized, e.to_string())),
                };
                if let Err(message) = self.server.claim_device(replica, &claims.user_id)? {
                    self.server
                        .refusals
                        .device_owner
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(self.fail(ErrorCode::DeviceNotOwned, message));
                }
                self.expires_at_ms = claims.expires_at_ms;
                let server_schema = self.server.schema_version()?;
                if schema_version > server_schema {
                    return Ok(self.fail(
                        ErrorCode::SchemaVersion,
                        format!(
                            "client schema version {schema_version} is newer than the server's {server_schema}"
                        ),
                    ));
                }
                if let Some(settled) = reset_settled {
                    // The client finished a reset whose last acknowledgement we never got.
                    self.server.reset_served(replica, settled)?;
                }
                let record = self.server.client_record(replica)?;
                let server_version = self.server.version();
                let user = User {
                    id: claims.user_id,
                    fields: claims.extra,
                };
                let (view, refused_subscriptions) =
                    match self.server.view(user.clone(), subscriptions.as_ref()) {
                        Ok(v) => (v, None),
                        // The set is refused; the client keeps what it has and sees what its
                        // roles allow until it sends a valid set.
                        Err(message) => (
                            self.server
                                .view(user, None)
                                .map_err(|reason| Error::Corrupt { what: reason })?,
                            subscriptions.map(|s| ServerMsg::SubscriptionError {
                                version: s.version,
                                message,
                            }),
                        ),
                    };
                let view = Arc::new(view);
                let mut reason = self.server.reset_reason(
                    &record,
                    schema_version,
                    download_cursor,
                    last_sync,
                    reset_pending,
                )?;
                if reason.is_none()
                    && view.has_subscriptions()
                    && view.version != subscriptions_acked
                {
                    reason = Some(ResetReason::SubscriptionsChanged);
                }
                if let Some(reason) = reason {
                    let schemas = self.server.store.schemas();
                    self.state = State::Snapshotting {
                        client: replica,
                        view,
                        next_key: None,
                        cursor: server_version,
                        schemas: schemas.clone(),
                        schema_version: self.server.schema_version()?,
                        in_flight: 0,
                        stale: 0,
                        done: false,
                    };
                    let missed = self.server.pending_refusals(replica, last_sync)?;
                    let mut out = Vec::new();
                    if !missed.is_empty() {
                        out.push(ServerMsg::CompensatingWrite { refused: missed });
                    }
                    out.push(ServerMsg::ResetRequired {
                        reason,
                        uploaded: record.uploaded,
                        schemas,
                    });
                    out.extend(refused_subscriptions);
                    return Ok(out);
                }
                self.state = State::Ready {
                    client: replica,
                    view,
                    sent: download_cursor.min(server_version),
                    partial: None,
                    outgoing: Vec::new(),
                    outgoing_cursor: 0,
                    in_flight: 0,
                };
                let schemas = if schema_version < server_schema {
                    self.server.store.schemas()
                } else {
                    Vec::new()
                };
                // Refusals the client may have missed come before the Welcome, which lets
                // it count the uploads they belong to as acknowledged.
                let missed = self.server.pending_refusals(replica, last_sync)?;
                let mut out = Vec::new();
                if !missed.is_empty() {
                    out.push(ServerMsg::CompensatingWrite { refused: missed });
                }
                out.push(ServerMsg::Welcome {
                    server: self.server.store.replica_id(),
                    server_version,
                    uploaded: record.uploaded,
                    schema_version: server_schema,
                    schemas,
                });
                out.extend(refused_subscriptions);
                Ok(out)
            }
            (State::AwaitHello, other) => Ok(self.fail(
                ErrorCode::UnexpectedMessage,
                format!("expected Hello, got {}", kind(&other)),
            )),
            (_, ClientMsg::Hello { .. }) => {
                Ok(self.fail(ErrorCode::UnexpectedMessage, "Hello after the handshake"))
            }
            (
                State::Ready {
                    client,
                    view,
                    partial,
                    ..
                },
                ClientMsg::Upload { changeset, more },
            ) => {
                changeset.validate(self.server.store.options().value_bytes_max)?;
                // A client uploads its own writes only: a stamp of another replica would let
                // it forge a tie that replicas could break differently.
                if let Some(e) = changeset
                    .entries
                    .iter()
                    .find(|e| e.stamp.replica != *client)
                {
                    return Err(Error::BadChangeset {
                        reason: format!(
                            "entry {} carries a stamp of replica {}, not of the uploader {}",
                            e.seq, e.stamp.replica, client
                        ),
                    });
                }
                let mut entries = changeset.entries;
                // Pieces are counted as they arrive, before they are joined.
                let first_bytes = entries.first().map_or(0, approx_size);
                let last_bytes = entries.last().map_or(0, approx_size);
                let mut carried = 0;
                if let Some(p) = partial.take() {
                    match entries.first_mut() {
                        Some(first) if first.seq == p.seq => {
                            let rest = std::mem::replace(first, p);
                            join_piece(first, rest);
                            carried = self.partial_bytes;
                        }
                        _ => {
                            return Ok(self.fail(
                                ErrorCode::UnexpectedMessage,
                                format!("upload did not continue transaction {}", p.seq),
                            ))
                        }
                    }
                }
                self.partial_bytes = 0;
                let first_total = carried + first_bytes;
                let max = self.server.config.limits.transaction_bytes_max;
                if first_total > max {
                    let seq = entries.first().map_or(0, |e| e.seq);
                    tracing::warn!(
                        seq,
                        bytes = first_total,
                        max,
                        "upload transaction too large"
                    );
                    return Ok(self.fail(
                        ErrorCode::LimitExceeded,
                        format!(
                            "transaction {seq} is over {first_total} bytes, more than the \
                             server's limit of {max} bytes (Limits::transaction_bytes_max)"
                        ),
                    ));
                }
                if more {
                    let continued = entries.len() == 1;
                    *partial = entries.pop();
                    self.partial_bytes = if continued { first_total } else { last_bytes };
                }
                let (client, view) = (*client, Arc::clone(view));
                if entries.is_empty() {
                    return Ok(Vec::new());
                }
                let (seq, server_version, refused) =
                    self.server.apply_upload(client, &view, entries)?;
                // The refusal goes first: a client that saw the acknowledgement saw it too.
                let mut out = Vec::new();
                if !refused.is_empty() {
                    out.push(ServerMsg::CompensatingWrite { refused });
                }
                out.push(ServerMsg::UploadAck {
                    seq,
                    server_version,
                });
                Ok(out)
            }
            // A new subscription set rebuilds the view (a snapshot in progress starts over,
            // of the new view).
            (
                State::Ready { client, .. } | State::Snapshotting { client, .. },
                ClientMsg::Subscribe { set },
            ) => {
                let client = *client;
                let user = self.user_info();
                match self.server.view(user, Some(&set)) {
                    Err(message) => Ok(vec![ServerMsg::SubscriptionError {
                        version: set.version,
                        message,
                    }]),
                    Ok(view) => {
                        if let State::Ready { view: v, .. } | State::Snapshotting { view: v, .. } =
                            &mut self.state
                        {
                            *v = Arc::new(view);
                        }
                        Ok(self
                            .begin_reset(client, ResetReason::SubscriptionsChanged)?
                            .into_iter()
                            .collect())
                    }
                }
            }
            (
                State::Snapshotting {
                    client,
                    in_flight,
                    stale,
                    done,
                    ..
                },
                ClientMsg::SnapshotAck { settled },
            ) => {
                if *stale > 0 {
                    // Of the replaced snapshot; the new one's last acknowledgement settles.
                    *stale -= 1;
                    return Ok(Vec::new());
                }
                *in_flight = in_flight.saturating_sub(1);
                if *done && *in_flight == 0 {
                    // The client has swapped the snapshot in; what it sends next (its
                    // recovered writes) belongs to a normal session.
                    let client = *client;
                    self.end_snapshot(settled.unwrap_or(0))?;
                    // Confirm the settled position, so the client can end its reset.
                    return Ok(vec![ServerMsg::UploadAck {
                        seq: self.server.uploaded(client)?,
                        server_version: self.server.version(),
                    }]);
                }
                Ok(Vec::new())
            }
            // Sent before the client learnt of the reset: acknowledgements need no answer,
            // and uploads are replayed by the reset, so dropping them loses nothing.
            (
                State::Snapshotting { .. },
                ClientMsg::DownloadAck { .. } | ClientMsg::Upload { .. },
            ) => Ok(Vec::new()),
            (State::Snapshotting { .. }, ClientMsg::Ping { id }) => Ok(vec![ServerMsg::Pong {
                id,
                server_version: self.server.version(),
            }]),
            (State::Ready { in_flight, .. }, ClientMsg::DownloadAck { .. }) => {
                *in_flight = in_flight.saturating_sub(1);
                Ok(Vec::new())
            }
            (State::Ready { .. }, ClientMsg::SnapshotAck { .. }) => {
                Ok(self.fail(ErrorCode::UnexpectedMessage, "SnapshotAck outside a reset"))
            }
            (State::Ready { .. }, ClientMsg::Ping { id }) => Ok(vec![ServerMsg::Pong {
                id,
                server_version: self.server.version(),
            }]),
        }
    }

    /// The next download message, if the client is behind. Call it whenever the server
    /// version moves and after each message sent, until it returns `None`.
    pub fn poll_download(&mut self) -> Vec<ServerMsg> {
        match self.next_download() {
            Ok(m) => m.into_iter().collect(),
            Err(e) => self.fail(ErrorCode::Internal, e.to_string()),
        }
    }

    /// Everything staged and swapped in on the client: carry on as a normal session.
    fn end_snapshot(&mut self, settled: LogPos) -> Result<()> {
        let State::Snapshotting {
            client,
            view,
            cursor,
            ..
        } = &self.state
        else {
            return Ok(());
        };
        let (client, view, cursor) = (*client, Arc::clone(view), *cursor);
        self.server.reset_served(client, settled)?;
        self.state = State::Ready {
            client,
            view,
            sent: cursor,
            partial: None,
            outgoing: Vec::new(),
            outgoing_cursor: 0,
            in_flight: 0,
        };
        Ok(())
    }

    /// Switches a connected session to a reset (or a view rebuild).
    fn begin_reset(&mut self, client: ReplicaId, reason: ResetReason) -> Result<Option<ServerMsg>> {
        let (view, stale) = match std::mem::replace(&mut self.state, State::Closed) {
            State::Ready { view, .. } => (view, 0),
            State::Snapshotting {
                view,
                in_flight,
                stale,
                ..
            } => (view, in_flight + stale),
            other => {
                self.state = other;
                return Ok(None);
            }
        };
        let uploaded = self.server.uploaded(client)?;
        let schemas = self.server.store.schemas();
        self.state = State::Snapshotting {
            client,
            view,
            next_key: None,
            cursor: self.server.version(),
            schemas: schemas.clone(),
            schema_version: self.server.schema_version()?,
            in_flight: 0,
            stale,
            done: false,
        };
        Ok(Some(ServerMsg::ResetRequired {
            reason,
            uploaded,
            schemas,
        }))
    }

    fn next_snapshot(&mut self) -> Result<Option<ServerMsg>> {
        let State::Snapshotting {
            view,
            next_key,
            cursor,
            schemas,
            schema_version,
            in_flight,
            done,
            ..
        } = &mut self.state
        else {
            return Ok(None);
        };
        if *done || *in_flight >= DOWNLOAD_WINDOW {
            return Ok(None);
        }
        let (mut objects, next) = self
            .server
            .store
            .snapshot_chunk(next_key.as_deref(), self.server.config.batch_bytes)?;
        if view.filtered() {
            // Only what this client may see, and no tombstones of what it may not.
            objects.retain_mut(|o| visible_snapshot(view, o));
        }
        *in_flight += 1;
        let end = match next {
            Some(k) => {
                *next_key = Some(k);
                None
            }
            None => {
                *done = true;
                Some(SnapshotEnd {
                    cursor: *cursor,
                    schema_version: *schema_version,
                    schemas: schemas.clone(),
                    subscriptions: view.has_subscriptions().then_some(view.version),
                })
            }
        };
        Ok(Some(ServerMsg::Snapshot { objects, end }))
    }

    /// The changes after the client's position, as whole objects it may see and removals
    /// of objects it no longer may.
    fn next_view_download(&mut self) -> Result<Option<ServerMsg>> {
        let State::Ready {
            client,
            view,
            sent,
            in_flight,
            ..
        } = &mut self.state
        else {
            return Ok(None);
        };
        let (entries, cursor) = self.server.history_after(*sent, *client)?;
        let mut seen = std::collections::HashSet::new();
        let (mut objects, mut removed) = (Vec::new(), Vec::new());
        for e in entries {
            for w in e.writes {
                if !seen.insert((w.collection.clone(), w.pk.clone())) {
                    continue;
                }
                let mut snap = self.server.store.object_snapshot(&w.collection, &w.pk)?;
                if visible_snapshot(view, &mut snap) {
                    objects.push(snap);
                } else {
                    removed.push((w.collection, w.pk));
                }
            }
        }
        *sent = cursor;
        *in_flight += 1;
        Ok(Some(ServerMsg::ViewDownload {
            objects,
            removed,
            cursor,
        }))
    }

    fn next_download(&mut self) -> Result<Option<ServerMsg>> {
        if matches!(self.state, State::Snapshotting { .. }) {
            return self.next_snapshot();
        }
        let batch_bytes = self.server.config.batch_bytes;
        let origin = self.server.store.replica_id();
        let State::Ready {
            client,
            view,
            sent,
            outgoing,
            outgoing_cursor,
            in_flight,
            ..
        } = &mut self.state
        else {
            return Ok(None);
        };
        if *in_flight >= DOWNLOAD_WINDOW {
            return Ok(None);
        }
        // Read once: another session's commit may move it between the checks below, and a
        // filtered client must never take the unfiltered path because of that.
        let version = self.server.version();
        if outgoing.is_empty() && *sent < version {
            let horizon = self.server.horizon()?;
            if *sent < horizon {
                // History this client still needs was compacted while it was connected.
                let (client, cursor) = (*client, *sent);
                return self.begin_reset(client, ResetReason::BehindHorizon { cursor, horizon });
            }
            if view.filtered() {
                return self.next_view_download();
            }
        }
        *in_flight += 1;
        if outgoing.is_empty() {
            if *sent >= version || view.filtered() {
                *in_flight -= 1;
                return Ok(None);
            }
            let (entries, cursor) = self.server.history_after(*sent, *client)?;
            // A transaction too large for one message goes out in pieces.
            let mut pieces = Vec::new();
            for e in entries {
                pieces.extend(split_entry(e, batch_bytes));
            }
            pieces.reverse();
            *outgoing = pieces;
            *outgoing_cursor = cursor;
            if outgoing.is_empty() {
                *sent = cursor;
                return Ok(Some(ServerMsg::Download {
                    changeset: Changeset {
                        origin,
                        entries: Vec::new(),
                    },
                    more: false,
                    cursor,
                }));
            }
        }
        // Pieces of one transaction share a seq; send whole entries up to the batch size,
        // and at most one piece per message so the client can rejoin them in order.
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        while let Some(next) = outgoing.pop() {
            bytes += approx_size(&next);
            let continues = outgoing.last().is_some_and(|n| n.seq == next.seq);
            batch.push(next);
            if continues {
                more = true;
                break;
            }
            if bytes >= batch_bytes {
                break;
            }
        }
        let cursor = if outgoing.is_empty() {
            *outgoing_cursor
        } else {
            // Only complete transactions count towards the cursor.
            batch.last().map_or(*sent, |e| e.seq - u64::from(more))
        };
        *sent = cursor.max(*sent);
        Ok(Some(ServerMsg::Download {
            changeset: Changeset {
                origin,
                entries: batch,
            },
            more,
            cursor,
        }))
    }
}

/// The conflict records kept in a server store (for the `conflicts` command).
pub fn conflicts_in(store: &Store, after: u64, limit: usize) -> Result<Vec<ConflictRecord>> {
    let rtx = store.read_txn()?;
    let table = match rtx.open_table(CONFLICTS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for row in table.range(after.saturating_add(1)..)?.take(limit) {
        let (_, v) = row?;
        out.push(postcard::from_bytes(v.value()).map_err(|e| corrupt(format!("conflict: {e}")))?);
    }
    Ok(out)
}

/// A deleted object's last live fields, as the server keeps them.
#[derive(Debug, Serialize, Deserialize)]
struct Grave {
    collection: String,
    pk: crate::value::Pk,
    fields: Vec<(String, Value)>,
}

/// The graveyard's key for an object: a hash of its collection and primary key. Two objects
/// with the same hash share a row; the row names its object, so the other one finds none.
fn grave_key(collection: &str, pk: &crate::value::Pk) -> Result<u64> {
    let bytes = postcard::to_allocvec(&(collection, pk)).map_err(|e| corrupt(e.to_string()))?;
    let hash = blake3::hash(&bytes);
    let mut key = [0u8; 8];
    key.copy_from_slice(&hash.as_bytes()[..8]);
    Ok(u64::from_le_bytes(key))
}

fn grave_row(collection: &str, pk: &crate::value::Pk, fields: &[(String, Value)]) -> Result<Aux> {
    let grave = Grave {
        collection: collection.to_owned(),
        pk: pk.clone(),
        fields: fields.to_vec(),
    };
    let bytes = postcard::to_allocvec(&grave).map_err(|e| corrupt(e.to_string()))?;
    Ok(Aux::u64_bytes(GRAVEYARD, grave_key(collection, pk)?, bytes))
}

/// The server's store as the conflict planner reads it.
struct StoreSource<'a> {
    server: &'a SyncServer,
}

impl PlanSource for StoreSource<'_> {
    fn state(&mut self, collection: &str, pk: &crate::value::Pk) -> Result<ObjectState<String>> {
        self.server.store.object_state_named(collection, pk)
    }

    fn user(&mut self, replica: ReplicaId) -> Option<String> {
        let user = self.server.client_record(replica).ok().map(|r| r.user);
        user.filter(|u| !u.is_empty())
    }

    fn grave(
        &mut self,
        collection: &str,
        pk: &crate::value::Pk,
    ) -> Result<Option<Vec<(String, Value)>>> {
        let rtx = self.server.store.read_txn()?;
        let table = match rtx.open_table(GRAVEYARD) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let Some(row) = table.get(grave_key(collection, pk)?)? else {
            return Ok(None);
        };
        let grave: Grave =
            postcard::from_bytes(row.value()).map_err(|e| corrupt(format!("grave: {e}")))?;
        Ok((grave.collection == collection && grave.pk == *pk).then_some(grave.fields))
    }

    fn refuses(
        &self,
        collection: &str,
        pk: &crate::value::Pk,
        field: &str,
        value: &Value,
    ) -> Option<String> {
        let max = self.server.store.options().value_bytes_max;
        if value.size_bytes() > max {
            return Some(format!("{} bytes; the limit is {max}", value.size_bytes()));
        }
        let w = crate::log::Write {
            collection: collection.to_owned(),
            pk: pk.clone(),
            op: Op::Update {
                fields: vec![crate::log::FieldWrite {
                    field: field.to_owned(),
                    value: value.clone(),
                    base: None,
                }],
            },
        };
        self.server
            .store
            .check_write_schema(&w)
            .err()
            .map(|e| e.to_string())
    }
}

/// A refused write as the client is told of it.
fn refused_write(
    w: &crate::log::Write,
    stamp: crate::clock::Stamp,
    reason: String,
    detail: Option<String>,
) -> RefusedWrite {
    let (fields, delete) = match &w.op {
        Op::Insert { fields } => (fields.clone(), false),
        Op::Update { fields } => (
            fields
                .iter()
                .map(|f| (f.field.clone(), f.value.clone()))
                .collect(),
            false,
        ),
        Op::Delete { .. } => (Vec::new(), true),
    };
    RefusedWrite {
        collection: w.collection.clone(),
        pk: w.pk.clone(),
        code: ErrorCode::CompensatingWrite,
        reason,
        detail,
        fields,
        delete,
        stamp,
    }
}

/// An object's live fields with their values folded (`None`: it does not exist).
fn live_fields(
    s: &ObjectState<String>,
) -> Result<Option<std::collections::BTreeMap<String, Value>>> {
    if !s.is_live() {
        return Ok(None);
    }
    let fields = s
        .fields
        .iter()
        .map(|(f, _, v)| (f.clone(), v.clone()))
        .collect();
    crate::crdt::fold(fields).map(Some)
}

/// The user-level fields a write sets: a part of a counter or text field counts as the
/// field itself.
fn written_fields(w: &crate::log::Write) -> Vec<&str> {
    let names: Vec<&str> = match &w.op {
        Op::Insert { fields } => fields.iter().map(|(f, _)| f.as_str()).collect(),
        Op::Update { fields } => fields.iter().map(|f| f.field.as_str()).collect(),
        Op::Delete { .. } => Vec::new(),
    };
    let mut out: Vec<&str> = names
        .into_iter()
        .map(|n| crate::crdt::parse_sub(n).map_or(n, |(_, parent, _)| parent))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether the view lets the write through; if not, the reason (Atlas's words) and our
/// detail. `before` and `after` are the object's live fields around the write.
fn judge(
    view: &View,
    w: &crate::log::Write,
    before: Option<&std::collections::BTreeMap<String, Value>>,
    after: Option<&std::collections::BTreeMap<String, Value>>,
) -> Option<(String, Option<String>)> {
    let (coll, pk) = (&w.collection, &w.pk);
    let empty = std::collections::BTreeMap::new();
    let written = written_fields(w);
    let denial = match (view.rules(), &w.op, before) {
        (None, ..) => None,
        (Some(r), Op::Delete { .. }, Some(b)) => r.check_delete(coll, view.user(), pk, b).err(),
        (Some(_), Op::Delete { .. }, None) => None,
        (Some(r), _, None) => r
            .check_insert(coll, view.user(), pk, after.unwrap_or(&empty), &written)
            .err(),
        (Some(r), _, Some(b)) => r
            .check_update(coll, view.user(), pk, b, after.unwrap_or(&empty), &written)
            .err(),
    };
    if let Some(d) = denial {
        return Some((not_allowed(w), Some(d.reason())));
    }
    // The object must be in the view: as it will be, or (a delete) as it was.
    let judged = match w.op {
        Op::Delete { .. } => before,
        _ => after,
    };
    let in_view = judged.is_none_or(|f| view.subscribed(coll, pk, f));
    (!in_view).then(|| {
        (
            format!(
                "{}; object is outside of the current query view",
                not_allowed(w)
            ),
            None,
        )
    })
}

/// Atlas Device Sync's reason for a refused write: `write to "a2" in table "Item" not
/// allowed`.
fn not_allowed(w: &crate::log::Write) -> String {
    format!(
        "write to {} in table \"{}\" not allowed",
        atlas_pk(&w.pk),
        w.collection
    )
}

/// A primary key as Atlas Device Sync writes it in a compensating write's reason: `7`,
/// `"a2"`, `ObjectID("5f…")`, `UUID(0123…-…)`.
fn atlas_pk(pk: &crate::value::Pk) -> String {
    use crate::value::Pk;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    match pk {
        Pk::Int(i) => i.to_string(),
        Pk::Str(s) => format!("\"{s}\""),
        Pk::Id12(b) => format!("ObjectID(\"{}\")", hex(b)),
        Pk::Id16(b) => format!(
            "UUID({}-{}-{}-{}-{})",
            hex(&b[..4]),
            hex(&b[4..6]),
            hex(&b[6..8]),
            hex(&b[8..10]),
            hex(&b[10..])
        ),
    }
}

/// The server's objects as an upload's earlier writes leave them, loaded on first use.
#[derive(Default)]
struct Overlay(std::collections::HashMap<(String, crate::value::Pk), ObjectState<String>>);

impl Overlay {
    fn state(&mut self, store: &Store, w: &crate::log::Write) -> Result<&mut ObjectState<String>> {
        let key = (w.collection.clone(), w.pk.clone());
        Ok(match self.0.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(store.object_state_named(&w.collection, &w.pk)?)
            }
        })
    }
}

/// Whether a client with this view may hold the object (live, readable, subscribed); if
/// so, drops the fields it may not read from it.
fn visible_snapshot(view: &View, o: &mut ObjectSnapshot) -> bool {
    if !matches!(o.exists, Some((_, true))) {
        return false;
    }
    let fields: std::collections::BTreeMap<String, Value> = o
        .fields
        .iter()
        .map(|(f, _, v)| (f.clone(), v.clone()))
        .collect();
    let Ok(fields) = crate::crdt::fold(fields) else {
        return false;
    };
    let Some(readable) = view.readable(&o.collection, &o.pk, &fields) else {
        return false;
    };
    o.fields.retain(|(f, _, _)| readable.field(f));
    true
}

fn kind(m: &ClientMsg) -> &'static str {
    match m {
        ClientMsg::Hello { .. } => "Hello",
        ClientMsg::Upload { .. } => "Upload",
        ClientMsg::DownloadAck { .. } => "DownloadAck",
        ClientMsg::SnapshotAck { .. } => "SnapshotAck",
        ClientMsg::Ping { .. } => "Ping",
        ClientMsg::Subscribe { .. } => "Subscribe",
    }
}

pub(crate) fn approx_size(e: &LogEntry) -> usize {
    crate::sync::pieces::entry_size(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Stamp;
    use crate::log::{Op, Write};
    use crate::sync::protocol::Subscription;
    use crate::sync::token::Claims;
    use crate::value::{Pk, Value};

    fn ready_session() -> (Arc<SyncServer>, ServerSession, ReplicaId) {
        ready_session_with(ServerConfig::new(Secret::generate()))
    }

    fn ready_session_with(config: ServerConfig) -> (Arc<SyncServer>, ServerSession, ReplicaId) {
        let secret = config.secret.clone();
        let store = Arc::new(Store::open_in_memory().unwrap());
        let server = Arc::new(SyncServer::open(store, config).unwrap());
        let claims = Claims {
            user_id: "u".into(),
            expires_at_ms: u64::MAX,
            extra: Default::default(),
        };
        let mut session = server.session();
        let client = ReplicaId(7);
        let out = session.on_message(
            ClientMsg::Hello {
                protocol: PROTOCOL_VERSION,
                schema_version: 0,
                token: token::issue(&secret, &claims).unwrap(),
                replica: client,
                download_cursor: 0,
                last_sync: 0,
                reset_pending: false,
                reset_settled: None,
                subscriptions: None,
                subscriptions_acked: 0,
            },
            0,
        );
        assert!(matches!(out[..], [ServerMsg::Welcome { .. }]), "{out:?}");
        (server, session, client)
    }

    fn upload(seq: u64, replica: ReplicaId) -> ClientMsg {
        ClientMsg::Upload {
            changeset: Changeset {
                origin: replica,
                entries: vec![LogEntry {
                    seq,
                    stamp: Stamp {
                        time: 1 << 16,
                        replica,
                    },
                    writes: vec![Write {
                        collection: "C".into(),
                        pk: Pk::Int(1),
                        op: Op::Insert {
                            fields: vec![("f".into(), Value::Int(seq as i64))],
                        },
                    }],
                }],
            },
            more: false,
        }
    }

    /// A subscription change while a snapshot's chunks are in flight: the client still
    /// acknowledges those chunks, after the server has begun the new snapshot. Counting
    /// them for the new one ended it early, and the new one's own last acknowledgement
    /// then came "outside a reset" (a fatal 101 for the client).
    #[test]
    fn acknowledgements_of_a_replaced_snapshot_do_not_count_for_the_next() {
        // Small chunks, so a snapshot has many.
        let mut config = ServerConfig::new(Secret::generate());
        config.batch_bytes = 256;
        let (server, mut session, _) = ready_session_with(config);
        server
            .write(|tx| {
                for i in 0..40i64 {
                    tx.insert("C", i, [("f", Value::from("x".repeat(64)))])?;
                }
                Ok(())
            })
            .unwrap();
        let subscribe = |version: u64| ClientMsg::Subscribe {
            set: SubscriptionSet {
                version,
                subscriptions: vec![Subscription::new("all", "C", "TRUEPREDICATE")],
            },
        };
        let no_error = |out: &[ServerMsg]| {
            assert!(
                out.iter().all(|m| !matches!(m, ServerMsg::Error { .. })),
                "{out:?}"
            );
        };
        // Sends what the server has to send; returns the acknowledgements the client
        // will make, and whether the last chunk went.
        let drain = |session: &mut ServerSession| {
            let mut acks = Vec::new();
            loop {
                match &session.poll_download()[..] {
                    [ServerMsg::Snapshot { end, .. }] => {
                        acks.push(ClientMsg::SnapshotAck {
                            settled: end.as_ref().map(|_| 0),
                        });
                        if end.is_some() {
                            return (acks, true);
                        }
                    }
                    [] => return (acks, false),
                    other => panic!("{other:?}"),
                }
            }
        };
        let out = session.on_message(subscribe(1), 0);
        assert!(
            matches!(out[..], [ServerMsg::ResetRequired { .. }]),
            "{out:?}"
        );
        let (stale, done) = drain(&mut session);
        assert!(!stale.is_empty() && !done, "a window of the first snapshot");
        // The set changes again; the new snapshot's first window goes out at once.
        let out = session.on_message(subscribe(2), 0);
        assert!(
            matches!(out[..], [ServerMsg::ResetRequired { .. }]),
            "{out:?}"
        );
        let (acks, mut done) = drain(&mut session);
        // Then the client's acknowledgements of the old chunks arrive, then of the new.
        for ack in stale {
            no_error(&session.on_message(ack, 0));
        }
        // As on a connection: after each message the server sends what it may.
        let mut chunks = acks.len();
        let mut acks: std::collections::VecDeque<ClientMsg> = acks.into();
        let mut ended = false;
        while let Some(ack) = acks.pop_front() {
            let last = matches!(ack, ClientMsg::SnapshotAck { settled: Some(_) });
            let out = session.on_message(ack, 0);
            no_error(&out);
            if last {
                assert!(
                    matches!(out[..], [ServerMsg::UploadAck { .. }]),
                    "the last acknowledgement ends the snapshot: {out:?}"
                );
                ended = true;
            } else {
                assert_eq!(out, [], "only the last acknowledgement ends it");
            }
            if !done {
                let (more, last) = drain(&mut session);
                chunks += more.len();
                acks.extend(more);
                done = last;
            }
        }
        assert!(done && ended, "the snapshot ended after {chunks} chunks");
        assert!(chunks > 8, "{chunks} chunks");
        assert!(!session.is_closed());
    }

    /// Atlas's spelling of each key type, from its own compensating-write tests.
    #[test]
    fn keys_are_written_as_atlas_writes_them() {
        let mut id12 = [0u8; 12];
        id12[11] = 0xab;
        let id16: [u8; 16] = [
            0x01, 0x23, 0x45, 0x67, 0x9a, 0xbc, 0x4d, 0xef, 0x90, 0x12, 0x34, 0x56, 0x78, 0x9a,
            0xbc, 0xde,
        ];
        assert_eq!(atlas_pk(&Pk::Int(123456)), "123456");
        assert_eq!(atlas_pk(&Pk::Int(-1)), "-1");
        assert_eq!(atlas_pk(&Pk::Str("short".into())), r#""short""#);
        assert_eq!(
            atlas_pk(&Pk::Id12(id12)),
            r#"ObjectID("0000000000000000000000ab")"#
        );
        assert_eq!(
            atlas_pk(&Pk::Id16(id16)),
            "UUID(01234567-9abc-4def-9012-3456789abcde)"
        );
    }

    #[test]
    fn a_stamp_of_another_replica_is_refused() {
        let (server, mut session, _) = ready_session();
        let out = session.on_message(upload(1, ReplicaId(99)), 0);
        assert!(
            matches!(
                &out[..],
                [ServerMsg::Error {
                    code: ErrorCode::BadChangeset,
                    ..
                }]
            ),
            "{out:?}"
        );
        assert_eq!(server.version(), 0);
        assert!(server.store().get("C", 1).unwrap().is_none());
    }

    #[test]
    fn a_repeated_upload_is_applied_once() {
        let (server, mut session, client) = ready_session();
        for _ in 0..3 {
            let out = session.on_message(upload(1, client), 0);
            assert!(
                matches!(
                    out[..],
                    [ServerMsg::UploadAck {
                        seq: 1,
                        server_version: 1
                    }]
                ),
                "{out:?}"
            );
        }
        assert_eq!(server.version(), 1, "one history record");
    }
}
