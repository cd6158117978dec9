//! The server's shared state: its store, history and client records, and applying an
//! upload.
//!
//! The server keeps, in its own store's redb file: `history` (server version → origin and
//! log entry, as uploaded), `clients` (replica id → highest applied log position and user).
//! An upload is applied with its history records and the client's position in one redb
//! transaction, so a repeated, overlapping or replayed upload is applied once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::config::{Limits, ServerConfig};
use super::enforce::{not_allowed, refused_write};
use super::resolve::{conflicts_in, grave_row};
use crate::changeset::Changeset;
use crate::clock::ReplicaId;
use crate::conflict::{Conflict, ConflictKind, ConflictRecord, Decision, Plan};
use crate::error::{Error, Result};
use crate::log::{LogEntry, LogPos};
use crate::reset::ResetReason;
use crate::rules::User;
use crate::schema::Schema;
use crate::store::Store;
use crate::store::WriteTx;
use crate::sync::protocol::ServerVersion;
use crate::sync::protocol::{RefusedWrite, SubscriptionSet};
use crate::sync::view::View;
use crate::wal::Aux;

/// server version → postcard [`HistoryRecord`].
pub(super) const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("sync_history");
/// client replica id → postcard [`ClientRecord`].
pub(super) const CLIENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("sync_clients");
/// conflict number → postcard [`ConflictRecord`].
pub(super) const CONFLICTS: TableDefinition<u64, &[u8]> = TableDefinition::new("sync_conflicts");
/// (client replica id, its log position) → postcard `Vec<RefusedWrite>`: refusals kept
/// until the client shows (by its `last_sync`) that it received them.
pub(super) const REFUSALS: TableDefinition<(u64, u64), &[u8]> =
    TableDefinition::new("sync_refusals");
/// (client replica id, its log position) → the applied entry's server version and its
/// stamp's time (8 bytes each, big-endian): a re-sent entry is skipped only if it is the
/// same transaction. A device never gives two transactions one stamp (its clock moves
/// forward with every commit), and the pieces of one transaction share it, so a piece
/// re-sent alone is recognised too.
pub(super) const UPLOADS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("sync_uploads");
/// hash of (collection, primary key) → postcard [`Grave`]: a deleted object's last live
/// fields, kept for collections where a client's update may bring it back whole.
pub(super) const GRAVEYARD: TableDefinition<u64, &[u8]> = TableDefinition::new("sync_graveyard");
/// `horizon` (history at or below it was compacted away), `schema_version`,
/// `breaking_version` (the schema version of the last breaking change).
pub(super) const SERVER_META: TableDefinition<&str, u64> = TableDefinition::new("sync_server_meta");
pub(super) const HORIZON: &str = "horizon";
pub(super) const SCHEMA_VERSION: &str = "schema_version";
pub(super) const BREAKING_VERSION: &str = "breaking_version";

/// One accepted transaction in the server's history.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct HistoryRecord {
    pub(super) origin: ReplicaId,
    pub(super) entry: LogEntry,
}

/// The history row for `entry` at the next version after `next` (which moves), as a row
/// of the commit's write-ahead record.
pub(super) fn history_row(next: &AtomicU64, origin: ReplicaId, entry: &LogEntry) -> Result<Aux> {
    let v = next.fetch_add(1, Ordering::SeqCst) + 1;
    let rec = HistoryRecord {
        origin,
        entry: entry.clone(),
    };
    let bytes = postcard::to_allocvec(&rec).map_err(|e| corrupt(e.to_string()))?;
    Ok(Aux::u64_bytes(HISTORY, v, bytes))
}

/// The `UPLOADS` row of an entry applied at `version`.
pub(super) fn upload_row(client: ReplicaId, entry: &LogEntry, version: ServerVersion) -> Aux {
    let mut value = Vec::with_capacity(16);
    value.extend_from_slice(&version.to_be_bytes());
    value.extend_from_slice(&entry.stamp.time.to_be_bytes());
    Aux::u64_pair_bytes(UPLOADS, (client.0, entry.seq), value)
}

/// Reads an `UPLOADS` value: (server version, stamp time).
pub(super) fn parse_upload_row(v: &[u8]) -> Option<(ServerVersion, u64)> {
    let version = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let time = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    Some((version, time))
}

/// Counters of what the server refused, for operators.
#[derive(Debug, Default)]
pub(super) struct Refusals {
    /// Sessions refused because the device belongs to another user.
    pub(super) device_owner: AtomicU64,
    /// Uploads refused as protocol errors (a gap in positions, a different entry at a
    /// known position).
    pub(super) upload_protocol: AtomicU64,
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
pub(super) struct ClientRecord {
    /// The client's highest log position applied here.
    pub(super) uploaded: LogPos,
    /// The user the client last authenticated as.
    pub(super) user: String,
    /// An operator ordered a reset for this client.
    pub(super) force_reset: bool,
}

pub(super) fn corrupt(what: impl Into<String>) -> Error {
    Error::Corrupt { what: what.into() }
}

/// The server's shared state: its store, history and client records.
pub struct SyncServer {
    pub(super) store: Arc<Store>,
    pub(super) config: ServerConfig,
    /// The newest server version; the lock also orders uploads from concurrent sessions.
    pub(super) version: Mutex<ServerVersion>,
    /// The last conflict record's number (moved under `version`'s lock, once its upload
    /// has committed).
    pub(super) last_conflict: AtomicU64,
    pub(super) refusals: Refusals,
    /// The store's recovery generation the two counters above were read at: a recovery
    /// replays commits whose callers saw them fail (a sync that failed after the bytes
    /// were written), so the counters are read again from the store after one.
    pub(super) generation: AtomicU64,
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
    pub(super) fn current(&self, version: &mut MutexGuard<'_, ServerVersion>) -> Result<()> {
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
    pub(super) fn claim_device(
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
    pub(super) fn applied_stamp(&self, client: ReplicaId, seq: LogPos) -> Result<Option<u64>> {
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
    pub(super) fn fresh_entries(
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

    pub(super) fn client_record(&self, client: ReplicaId) -> Result<ClientRecord> {
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
    pub(super) fn apply_upload(
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
    pub(super) fn pending_refusals(
        &self,
        client: ReplicaId,
        last_sync: LogPos,
    ) -> Result<Vec<RefusedWrite>> {
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

    pub(super) fn meta(&self, key: &str) -> Result<u64> {
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

    pub(super) fn put_client_record(&self, client: ReplicaId, record: &ClientRecord) -> Result<()> {
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
    pub(super) fn reset_reason(
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
    pub(super) fn reset_served(&self, client: ReplicaId, settled: LogPos) -> Result<()> {
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
    pub(super) fn history_after(
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
