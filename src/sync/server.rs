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
    detect, Conflict, ConflictKind, ConflictRecord, Decision, Policies, Policy, Resolution,
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
    /// The store's recovery generation the two counters above were read at: a recovery
    /// replays commits whose callers saw them fail (a sync that failed after the bytes
    /// were written), so the counters are read again from the store after one.
    generation: AtomicU64,
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
        Ok(SyncServer {
            generation: AtomicU64::new(store.generation()),
            store,
            config,
            version: Mutex::new(version),
            last_conflict: AtomicU64::new(last_conflict),
        })
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

    /// The server's store.
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

    /// A session for a new connection.
    pub fn session(self: &Arc<Self>) -> ServerSession {
        ServerSession {
            server: Arc::clone(self),
            state: State::AwaitHello,
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
        let mut fresh: Vec<LogEntry> = entries
            .into_iter()
            .filter(|e| e.seq > record.uploaded)
            .collect();
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
                        format!(
                            "write to \"{}\" in table \"{}\" failed validation: {err}",
                            w.pk, w.collection
                        ),
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
        let detected = self.detect_conflicts(client, user, &fresh)?;
        let cs = Changeset {
            origin: client,
            entries: fresh,
        };
        // Shared with the log hook, which numbers the server's own entry inside the commit.
        let next = Arc::new(AtomicU64::new(*version));
        let mut records = Vec::new();
        let server_replica = self.store.replica_id();
        self.store.import_with(&cs, |tx, _| {
            // History and the client's position go in the upload's write-ahead record.
            for e in &cs.entries {
                tx.put_aux(history_row(&next, client, e)?);
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
                    policy: r.reason.clone(),
                    decision: Decision::Server,
                });
            }
            // Policy decisions become the server's own writes, stamped after the client's.
            for (conflict, prior, write_fields) in &detected {
                let policy = self.config.conflicts.for_conflict(conflict);
                let decision = resolve(tx, policy, conflict, prior, write_fields)?;
                records.push(ConflictRecord {
                    id: 0,
                    conflict: conflict.clone(),
                    policy: format!("{policy:?}"),
                    decision,
                });
            }
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
                let batch: Vec<RefusedWrite> = postcard::from_bytes(v.value())
                    .map_err(|e| corrupt(format!("refusals: {e}")))?;
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
        let live =
            |s: &ObjectState<String>| -> Result<Option<std::collections::BTreeMap<String, Value>>> {
                if !s.is_live() {
                    return Ok(None);
                }
                let fields = s
                    .fields
                    .iter()
                    .map(|(f, _, v)| (f.clone(), v.clone()))
                    .collect();
                crate::crdt::fold(fields).map(Some)
            };
        for e in entries.iter_mut() {
            let mut kept = Vec::with_capacity(e.writes.len());
            for w in std::mem::take(&mut e.writes) {
                let state = overlay.state(&self.store, &w)?;
                let mut after = state.clone();
                apply_write(&mut after, &w, e.stamp);
                let (before_fields, after_fields) = (live(state)?, live(&after)?);
                let (coll, pk) = (&w.collection, &w.pk);
                let empty = std::collections::BTreeMap::new();
                let denial = match (view.rules(), &w.op, &before_fields) {
                    (None, ..) => None,
                    (Some(r), Op::Delete { .. }, Some(b)) => {
                        r.check_delete(coll, view.user(), pk, b).err()
                    }
                    (Some(_), Op::Delete { .. }, None) => None,
                    (Some(r), _, None) => r
                        .check_insert(
                            coll,
                            view.user(),
                            pk,
                            after_fields.as_ref().unwrap_or(&empty),
                        )
                        .err(),
                    (Some(r), _, Some(b)) => r
                        .check_update(
                            coll,
                            view.user(),
                            pk,
                            b,
                            after_fields.as_ref().unwrap_or(&empty),
                        )
                        .err(),
                };
                let reason = if let Some(d) = denial {
                    let why = d.reason();
                    Some(if why.starts_with("denied") {
                        format!("write to \"{pk}\" in table \"{coll}\" was {why}")
                    } else {
                        format!("write to \"{pk}\" in table \"{coll}\" not allowed: {why}")
                    })
                } else {
                    // The object must be in the view: as it will be, or (a delete) as it was.
                    let judged = match w.op {
                        Op::Delete { .. } => before_fields.as_ref(),
                        _ => after_fields.as_ref(),
                    };
                    let in_view = judged.is_none_or(|f| view.subscribed(coll, pk, f));
                    (!in_view).then(|| {
                        format!(
                            "write to \"{pk}\" in table \"{coll}\" not allowed; object is outside of the current query view"
                        )
                    })
                };
                match reason {
                    None => {
                        *state = after;
                        kept.push(w);
                    }
                    Some(reason) => {
                        refused.push(refused_write(&w, e.stamp, reason));
                    }
                }
            }
            e.writes = kept;
        }
        Ok(refused)
    }

    /// Conflicts of an upload's writes with the server's state. Each write is checked
    /// against the state as the upload's earlier writes leave it, so a client never
    /// conflicts with itself. Returns each conflict with the object's state before the
    /// write and the write's fields.
    fn detect_conflicts(
        &self,
        client: ReplicaId,
        user: &str,
        entries: &[LogEntry],
    ) -> Result<Vec<Detected>> {
        let mut overlay = Overlay::default();
        let mut users: std::collections::HashMap<ReplicaId, Option<String>> =
            std::collections::HashMap::new();
        let mut out = Vec::new();
        for e in entries {
            for w in &e.writes {
                let state = overlay.state(&self.store, w)?;
                // Every conflict of one write shares the object's state and the write's
                // fields: an update of N fields, each a conflict, copied both N times.
                let mut shared = None;
                for mut c in detect(w, e.stamp, client, state) {
                    c.client.user = Some(user.to_owned());
                    if let Some(r) = c.server.replica {
                        c.server.user = users
                            .entry(r)
                            .or_insert_with(|| {
                                let u = self.client_record(r).ok().map(|rec| rec.user);
                                u.filter(|u| !u.is_empty())
                            })
                            .clone();
                    }
                    let (prior, fields) = shared.get_or_insert_with(|| {
                        let fields = match &w.op {
                            Op::Insert { fields } => fields.clone(),
                            Op::Update { fields } => fields
                                .iter()
                                .map(|f| (f.field.clone(), f.value.clone()))
                                .collect(),
                            Op::Delete { .. } => Vec::new(),
                        };
                        (Arc::new(state.clone()), Arc::new(fields))
                    });
                    out.push((c, Arc::clone(prior), Arc::clone(fields)));
                }
                apply_write(state, w, e.stamp);
            }
        }
        Ok(out)
    }

    /// Writes on the server, as the server: the transaction enters the history like an
    /// upload, so every client receives it.
    pub fn write<R>(&self, f: impl FnOnce(&mut WriteTx<'_>) -> Result<R>) -> Result<R> {
        let mut version = self.version.lock().unwrap_or_else(PoisonError::into_inner);
        self.current(&mut version)?;
        let next = Arc::new(AtomicU64::new(*version));
        let mut tx = self.store.begin()?;
        let r = f(&mut tx)?;
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
        self.store.set_schema(schema)?;
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

    /// Handles one client message at time `now_ms`.
    pub fn on_message(&mut self, msg: ClientMsg, now_ms: u64) -> Vec<ServerMsg> {
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
                if let Some(p) = partial.take() {
                    match entries.first_mut() {
                        Some(first) if first.seq == p.seq => {
                            let rest = std::mem::replace(first, p);
                            join_piece(first, rest);
                        }
                        _ => {
                            return Ok(self.fail(
                                ErrorCode::UnexpectedMessage,
                                format!("upload did not continue transaction {}", p.seq),
                            ))
                        }
                    }
                }
                if more {
                    *partial = entries.pop();
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
                    done,
                    ..
                },
                ClientMsg::SnapshotAck { settled },
            ) => {
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
        let view = match std::mem::replace(&mut self.state, State::Closed) {
            State::Ready { view, .. } | State::Snapshotting { view, .. } => view,
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
            objects.retain(|o| visible_snapshot(view, o));
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
                let snap = self.server.store.object_snapshot(&w.collection, &w.pk)?;
                if visible_snapshot(view, &snap) {
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

/// A detected conflict, the object's state before the write, and the write's fields (the
/// last two shared by the write's conflicts).
type Detected = (
    Conflict,
    Arc<ObjectState<String>>,
    Arc<Vec<(String, Value)>>,
);

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

/// Carries out a policy's decision on one conflict inside the upload's transaction, after
/// the client's writes were merged by stamp. Only decisions that differ from what the
/// stamps already decided need a write.
fn resolve(
    tx: &mut WriteTx<'_>,
    policy: &Policy,
    c: &Conflict,
    prior: &ObjectState<String>,
    client_fields: &[(String, Value)],
) -> Result<Decision> {
    let (coll, pk) = (c.collection.as_str(), c.pk.clone());
    let live_now = tx.is_live(coll, &pk)?;
    // What the merge by stamp already decided. For update vs delete that is the object's
    // existence: an update never brings a deleted object back.
    let by_stamp = match c.kind {
        ConflictKind::ClientUpdateServerDelete | ConflictKind::ClientDeleteServerUpdate => {
            let deleted_side_won = !live_now;
            match (c.kind, deleted_side_won) {
                (ConflictKind::ClientUpdateServerDelete, true) => Decision::Server,
                (ConflictKind::ClientDeleteServerUpdate, true) => Decision::Client,
                (ConflictKind::ClientUpdateServerDelete, false) => Decision::Client,
                _ => Decision::Server,
            }
        }
        _ if c.stamp_winner_is_client() => Decision::Client,
        _ => Decision::Server,
    };
    let (want, merged) = match policy {
        // The merge rule decided; nothing to write.
        Policy::LastWriterWins => return Ok(by_stamp),
        Policy::ServerWins => (Decision::Server, None),
        Policy::ClientWins => (Decision::Client, None),
        Policy::Custom(handler) => match handler(c) {
            Resolution::KeepServer => (Decision::Server, None),
            Resolution::TakeClient => (Decision::Client, None),
            Resolution::Merged(v) if c.field.is_some() => (Decision::Merged, Some(v)),
            Resolution::Merged(_) => (Decision::Client, None),
        },
    };
    let live_fields = |s: &ObjectState<String>| -> Vec<(String, Value)> {
        s.fields
            .iter()
            .map(|(f, _, v)| (f.clone(), v.clone()))
            .collect()
    };
    if want == by_stamp && merged.is_none() {
        return Ok(want);
    }
    // Re-inserted objects may carry counter and text parts: engine fields.
    match (c.kind, &want) {
        (ConflictKind::ClientUpdateServerUpdate, Decision::Merged) => {
            if let (Some(f), Some(v)) = (&c.field, merged) {
                tx.set(coll, pk, f, v)?;
            }
        }
        (ConflictKind::ClientUpdateServerUpdate, d) if *d != by_stamp => {
            let value = match d {
                Decision::Server => c.server.value.clone(),
                _ => c.client.value.clone(),
            };
            if let (Some(f), Some(v)) = (&c.field, value) {
                if live_now {
                    tx.set(coll, pk, f, v)?;
                }
            }
        }
        (ConflictKind::ClientInsertServerInsert, d) if *d != by_stamp => {
            let fields = match d {
                Decision::Server => live_fields(prior),
                _ => client_fields.to_vec(),
            };
            if live_now {
                tx.delete(coll, pk.clone())?;
            }
            tx.insert_engine(coll, pk, fields)?;
        }
        // Forcing an update of a deleted object makes it an insert of the written fields.
        (ConflictKind::ClientUpdateServerDelete, Decision::Client | Decision::Merged)
            if !live_now =>
        {
            tx.insert_engine(coll, pk, client_fields.to_vec())?;
        }
        (ConflictKind::ClientDeleteServerUpdate, Decision::Server) if !live_now => {
            tx.insert_engine(coll, pk, live_fields(prior))?;
        }
        (ConflictKind::ClientDeleteServerUpdate, Decision::Client | Decision::Merged)
            if live_now =>
        {
            tx.delete(coll, pk)?;
        }
        _ => {}
    }
    Ok(want)
}

/// A refused write as the client is told of it.
fn refused_write(
    w: &crate::log::Write,
    stamp: crate::clock::Stamp,
    reason: String,
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
        reason,
        fields,
        delete,
        stamp,
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

/// Merges one write into a named object state (its fields at once: one by one, a write of
/// N new fields moved the fields after each, N² moves).
fn apply_write(state: &mut ObjectState<String>, w: &crate::log::Write, stamp: crate::clock::Stamp) {
    let writes = match &w.op {
        Op::Insert { fields } => {
            state.apply_exists(stamp, true);
            fields
                .iter()
                .map(|(f, v)| (f.clone(), stamp, v.clone()))
                .collect()
        }
        Op::Update { fields } => fields
            .iter()
            .map(|f| (f.field.clone(), stamp, f.value.clone()))
            .collect(),
        Op::Delete { .. } => {
            state.apply_exists(stamp, false);
            Vec::new()
        }
    };
    state.apply_fields(writes);
}

/// Whether a client with this view may hold the object: live, readable, subscribed.
fn visible_snapshot(view: &View, o: &ObjectSnapshot) -> bool {
    if !matches!(o.exists, Some((_, true))) {
        return false;
    }
    let fields: std::collections::BTreeMap<String, Value> = o
        .fields
        .iter()
        .map(|(f, _, v)| (f.clone(), v.clone()))
        .collect();
    match crate::crdt::fold(fields) {
        Ok(fields) => view.visible(&o.collection, &o.pk, &fields),
        Err(_) => false,
    }
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
    use crate::sync::token::Claims;
    use crate::value::{Pk, Value};

    fn ready_session() -> (Arc<SyncServer>, ServerSession, ReplicaId) {
        let secret = Secret::generate();
        let store = Arc::new(Store::open_in_memory().unwrap());
        let server = Arc::new(SyncServer::open(store, ServerConfig::new(secret.clone())).unwrap());
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
