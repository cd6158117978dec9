//! The sync layer's tables in the store's database, behind typed accessors: the server's
//! history, client records, conflicts, refusals, uploads, graveyard and meta; the client's
//! counters, subscription set and refused writes. The sync layer encodes its own records,
//! except the history's, which the store writes itself as part of a commit (an import's
//! entries under their origin, the commit's own entry under the store's id); this room
//! knows the tables and their keys, and which rows go into a commit's write-ahead record
//! (`put_…`) rather than through a durable redb commit.
//!
//! Tables the sync layer only writes now and then are created by their first write, so a
//! read treats a missing table as an empty one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redb::{Key, ReadOnlyTable, ReadableTable, TableDefinition, TableError, Value};
use serde::{Deserialize, Serialize};

use super::{Store, WriteTx};
use crate::clock::ReplicaId;
use crate::error::{Error, Result};
use crate::log::LogEntry;
use crate::wal::Aux;

/// server version → the sync layer's history record (origin and log entry).
const HISTORY: TableDefinition<u64, &[u8]> = TableDefinition::new("sync_history");
/// client replica id → the sync layer's client record.
const CLIENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("sync_clients");
/// conflict number → the sync layer's conflict record.
const CONFLICTS: TableDefinition<u64, &[u8]> = TableDefinition::new("sync_conflicts");
/// (client replica id, its log position) → the refused writes of that upload: refusals
/// kept until the client shows (by its `last_sync`) that it received them.
const REFUSALS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("sync_refusals");
/// (client replica id, its log position) → the applied entry's server version and its
/// stamp's time (8 bytes each, big-endian): a re-sent entry is skipped only if it is the
/// same transaction. A device never gives two transactions one stamp (its clock moves
/// forward with every commit), and the pieces of one transaction share it, so a piece
/// re-sent alone is recognised too.
const UPLOADS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("sync_uploads");
/// hash of (collection, primary key) → a deleted object's last live fields, kept for
/// collections where a client's update may bring it back whole.
const GRAVEYARD: TableDefinition<u64, &[u8]> = TableDefinition::new("sync_graveyard");
/// The server's counters ([`ServerMeta`]).
const SERVER_META: TableDefinition<&str, u64> = TableDefinition::new("sync_server_meta");
/// The client's counters ([`ClientCounter`]).
const CLIENT_SYNC: TableDefinition<&str, u64> = TableDefinition::new("sync_client");
/// `set` → the client's subscription set.
const SUBSCRIPTIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sync_subscriptions");
const SUBSCRIPTION_SET: &str = "set";
/// number → a write the server refused, kept for the application.
const REJECTED: TableDefinition<u64, &[u8]> = TableDefinition::new("sync_rejected");

/// A counter the sync server keeps.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ServerMeta {
    /// History at or below it was compacted away.
    Horizon,
    /// Raised by every schema change.
    SchemaVersion,
    /// The schema version of the last breaking change.
    BreakingVersion,
}

impl ServerMeta {
    fn key(self) -> &'static str {
        match self {
            ServerMeta::Horizon => "horizon",
            ServerMeta::SchemaVersion => "schema_version",
            ServerMeta::BreakingVersion => "breaking_version",
        }
    }
}

/// A counter the sync client keeps.
#[derive(Clone, Copy, Debug)]
pub(crate) enum ClientCounter {
    /// The server version every download up to is applied here.
    DownloadCursor,
    /// The schema version of the server's schemas adopted here.
    SchemaVersion,
    /// The newest subscription version the server confirmed.
    SubscriptionsAcked,
}

impl ClientCounter {
    fn key(self) -> &'static str {
        match self {
            ClientCounter::DownloadCursor => "download_cursor",
            ClientCounter::SchemaVersion => "schema_version",
            ClientCounter::SubscriptionsAcked => "subscriptions_acked",
        }
    }
}

/// Where the server's numbering stands: the last history version, the horizon, the last
/// conflict number (0: none).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ServerMarks {
    pub history_last: u64,
    pub horizon: u64,
    pub conflict_last: u64,
}

/// Opens a table to read; `None` if no commit has created it yet.
fn open_if_exists<K: Key + 'static, V: Value + 'static>(
    rtx: &redb::ReadTransaction,
    table: TableDefinition<K, V>,
) -> Result<Option<ReadOnlyTable<K, V>>> {
    match rtx.open_table(table) {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads an `UPLOADS` value: (server version, stamp time).
fn parse_upload_row(v: &[u8]) -> Option<(u64, u64)> {
    let version = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let time = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    Some((version, time))
}

/// One accepted transaction in the server's history: who wrote it, and the entry as it
/// was applied.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct HistoryRecord {
    /// The replica that wrote it (a client, or the server itself).
    pub(crate) origin: ReplicaId,
    /// The transaction.
    pub(crate) entry: LogEntry,
}

/// The write-ahead row of the history record of `entry` at the version after `next`
/// (which moves to it).
fn history_aux(next: &AtomicU64, origin: ReplicaId, entry: &LogEntry) -> Result<Aux> {
    let version = next.fetch_add(1, Ordering::SeqCst) + 1;
    let rec = HistoryRecord {
        origin,
        entry: entry.clone(),
    };
    let bytes = postcard::to_allocvec(&rec).map_err(|e| Error::Internal {
        what: format!("encoding a history record: {e}"),
    })?;
    Ok(Aux::u64_bytes(HISTORY, version, bytes))
}

/// Decodes a history record read back with [`Store::sync_history_after`].
pub(crate) fn decode_history(version: u64, bytes: &[u8]) -> Result<HistoryRecord> {
    postcard::from_bytes(bytes).map_err(|e| Error::Corrupt {
        what: format!("history {version}: {e}"),
    })
}

/// The sync server's tables.
impl Store {
    /// Creates the server's tables that every read expects, and returns where its
    /// numbering stands.
    pub(crate) fn open_sync_server_tables(&self) -> Result<ServerMarks> {
        let mut tx = self.begin()?;
        let marks = {
            let txn = tx.raw()?;
            txn.open_table(CLIENTS)?;
            let meta = txn.open_table(SERVER_META)?;
            let history = txn.open_table(HISTORY)?;
            let history_last = history.last()?.map_or(0, |(k, _)| k.value());
            let horizon = meta
                .get(ServerMeta::Horizon.key())?
                .map_or(0, |v| v.value());
            let conflict_last = txn
                .open_table(CONFLICTS)?
                .last()?
                .map_or(0, |(k, _)| k.value());
            ServerMarks {
                history_last,
                horizon,
                conflict_last,
            }
        };
        tx.commit()?;
        Ok(marks)
    }

    /// Where the server's numbering stands, as committed.
    pub(crate) fn sync_server_marks(&self) -> Result<ServerMarks> {
        let rtx = self.read_txn()?;
        let history_last = rtx
            .open_table(HISTORY)?
            .last()?
            .map_or(0, |(k, _)| k.value());
        let horizon = rtx
            .open_table(SERVER_META)?
            .get(ServerMeta::Horizon.key())?
            .map_or(0, |v| v.value());
        let conflict_last = match open_if_exists(&rtx, CONFLICTS)? {
            Some(t) => t.last()?.map_or(0, |(k, _)| k.value()),
            None => 0,
        };
        Ok(ServerMarks {
            history_last,
            horizon,
            conflict_last,
        })
    }

    /// A server counter (0 if never set).
    pub(crate) fn sync_server_meta(&self, which: ServerMeta) -> Result<u64> {
        let rtx = self.read_txn()?;
        let t = rtx.open_table(SERVER_META)?;
        let v = t.get(which.key())?.map(|v| v.value());
        Ok(v.unwrap_or(0))
    }

    /// Raises the server's schema version by one, and makes it the breaking version too
    /// if `breaking`.
    pub(crate) fn bump_sync_schema_version(&self, breaking: bool) -> Result<()> {
        let mut tx = self.begin()?;
        {
            let txn = tx.raw()?;
            let mut meta = txn.open_table(SERVER_META)?;
            let v = meta
                .get(ServerMeta::SchemaVersion.key())?
                .map_or(0, |v| v.value())
                + 1;
            meta.insert(ServerMeta::SchemaVersion.key(), v)?;
            if breaking {
                meta.insert(ServerMeta::BreakingVersion.key(), v)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The stored record of a client, if any.
    pub(crate) fn sync_client_record(&self, client: ReplicaId) -> Result<Option<Vec<u8>>> {
        let rtx = self.read_txn()?;
        let table = rtx.open_table(CLIENTS)?;
        let rec = table.get(client.0)?;
        Ok(rec.map(|r| r.value().to_vec()))
    }

    /// Stores a client's record in a commit of its own.
    pub(crate) fn set_sync_client_record(&self, client: ReplicaId, record: &[u8]) -> Result<()> {
        let mut tx = self.begin()?;
        tx.raw()?.open_table(CLIENTS)?.insert(client.0, record)?;
        tx.commit()?;
        Ok(())
    }

    /// The server version and stamp time `client`'s entry at `seq` was applied with, if
    /// the server knows it.
    pub(crate) fn sync_upload(&self, client: ReplicaId, seq: u64) -> Result<Option<(u64, u64)>> {
        let rtx = self.read_txn()?;
        let Some(table) = open_if_exists(&rtx, UPLOADS)? else {
            return Ok(None);
        };
        let row = table.get((client.0, seq))?;
        match row.map(|v| parse_upload_row(v.value())) {
            None => Ok(None),
            Some(Some(applied)) => Ok(Some(applied)),
            Some(None) => Err(Error::Corrupt {
                what: format!("upload row of {client} at {seq}"),
            }),
        }
    }

    /// History records after version `cursor`, oldest first, to `visit` (version, record)
    /// until it returns `false`.
    pub(crate) fn sync_history_after(
        &self,
        cursor: u64,
        mut visit: impl FnMut(u64, &[u8]) -> Result<bool>,
    ) -> Result<()> {
        let rtx = self.read_txn()?;
        let table = rtx.open_table(HISTORY)?;
        for row in table.range(cursor.saturating_add(1)..)? {
            let (k, v) = row?;
            if !visit(k.value(), v.value())? {
                break;
            }
        }
        Ok(())
    }

    /// Drops history up to `upto` (and raises the horizon to it), with the upload stamps
    /// of the entries it held. Returns how many history records went.
    pub(crate) fn compact_sync_history(&self, upto: u64) -> Result<u64> {
        let mut removed = 0;
        let mut tx = self.begin()?;
        {
            let txn = tx.raw()?;
            let mut meta = txn.open_table(SERVER_META)?;
            let horizon = meta
                .get(ServerMeta::Horizon.key())?
                .map_or(0, |v| v.value());
            if upto > horizon {
                meta.insert(ServerMeta::Horizon.key(), upto)?;
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

    /// Whether any refusals of `client`'s uploads are kept.
    pub(crate) fn has_sync_refusals(&self, client: ReplicaId) -> Result<bool> {
        let rtx = self.read_txn()?;
        let Some(table) = open_if_exists(&rtx, REFUSALS)? else {
            return Ok(false);
        };
        let next = table
            .range((client.0, 0)..=(client.0, u64::MAX))?
            .next()
            .is_some();
        Ok(next)
    }

    /// Forgets `client`'s refusals at or below `last_sync` and gives those above it to
    /// `each`, in one commit (none if `each` fails).
    pub(crate) fn take_sync_refusals(
        &self,
        client: ReplicaId,
        last_sync: u64,
        mut each: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut tx = self.begin()?;
        {
            let mut table = tx.raw()?.open_table(REFUSALS)?;
            table.retain_in((client.0, 0)..=(client.0, last_sync), |_, _| false)?;
            for row in
                table.range((client.0, last_sync.saturating_add(1))..=(client.0, u64::MAX))?
            {
                let (_, v) = row?;
                each(v.value())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Conflict records after number `after`, at most `limit`.
    pub(crate) fn sync_conflicts(&self, after: u64, limit: usize) -> Result<Vec<Vec<u8>>> {
        let rtx = self.read_txn()?;
        let Some(table) = open_if_exists(&rtx, CONFLICTS)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for row in table.range(after.saturating_add(1)..)?.take(limit) {
            let (_, v) = row?;
            out.push(v.value().to_vec());
        }
        Ok(out)
    }

    /// The graveyard's row at `key`, if any.
    pub(crate) fn sync_grave(&self, key: u64) -> Result<Option<Vec<u8>>> {
        let rtx = self.read_txn()?;
        let Some(table) = open_if_exists(&rtx, GRAVEYARD)? else {
            return Ok(None);
        };
        let row = table.get(key)?;
        Ok(row.map(|r| r.value().to_vec()))
    }
}

/// The sync client's tables.
impl Store {
    /// A client counter (0 if never set).
    pub(crate) fn sync_counter(&self, which: ClientCounter) -> Result<u64> {
        let rtx = self.read_txn()?;
        match open_if_exists(&rtx, CLIENT_SYNC)? {
            Some(t) => Ok(t.get(which.key())?.map_or(0, |v| v.value())),
            None => Ok(0),
        }
    }

    /// Sets a client counter in a commit of its own.
    pub(crate) fn set_sync_counter(&self, which: ClientCounter, value: u64) -> Result<()> {
        let mut tx = self.begin()?;
        tx.set_sync_counter(which, value)?;
        tx.commit()?;
        Ok(())
    }

    /// The client's subscription set, if one was ever set.
    pub(crate) fn sync_subscriptions(&self) -> Result<Option<Vec<u8>>> {
        let rtx = self.read_txn()?;
        let Some(table) = open_if_exists(&rtx, SUBSCRIPTIONS)? else {
            return Ok(None);
        };
        let set = table.get(SUBSCRIPTION_SET)?;
        Ok(set.map(|v| v.value().to_vec()))
    }

    /// Stores the client's subscription set in a commit of its own.
    pub(crate) fn set_sync_subscriptions(&self, set: &[u8]) -> Result<()> {
        let mut tx = self.begin()?;
        tx.raw()?
            .open_table(SUBSCRIPTIONS)?
            .insert(SUBSCRIPTION_SET, set)?;
        tx.commit()?;
        Ok(())
    }

    /// The refused writes kept, with their numbers, oldest first.
    pub(crate) fn sync_rejected(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        let rtx = self.read_txn()?;
        let Some(table) = open_if_exists(&rtx, REJECTED)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            out.push((k.value(), v.value().to_vec()));
        }
        Ok(out)
    }

    /// Keeps more refused writes, numbered after the last one, in a commit of its own.
    pub(crate) fn add_sync_rejected(&self, refused: &[Vec<u8>]) -> Result<()> {
        let mut tx = self.begin()?;
        {
            let mut table = tx.raw()?.open_table(REJECTED)?;
            let mut id = table.last()?.map_or(0, |(k, _)| k.value());
            for r in refused {
                id += 1;
                table.insert(id, r.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Forgets refused writes up to number `upto`.
    pub(crate) fn clear_sync_rejected(&self, upto: u64) -> Result<()> {
        let mut tx = self.begin()?;
        tx.raw()?
            .open_table(REJECTED)?
            .retain_in(..=upto, |_, _| false)?;
        tx.commit()?;
        Ok(())
    }
}

/// Rows of the sync tables written with a transaction. `put_…` rows go into the commit's
/// write-ahead record (an append and a sync); `set_…` writes through redb, which makes the
/// commit a durable redb one.
impl<'s> WriteTx<'s> {
    /// Makes this commit a step of the server's history, numbered from `next`: the entries
    /// of the changeset it imports (if any) under their origin, then the commit's own log
    /// entry (if it writes one: reverted refusals, policy decisions, server writes) under
    /// the store's id. The store writes the records itself, in the commit's write-ahead
    /// record; `next` ends at the last version written.
    pub(crate) fn record_in_history(&mut self, next: Arc<AtomicU64>) {
        self.history = Some(next);
    }

    /// The history row of an imported entry (see [`WriteTx::record_in_history`]).
    pub(super) fn put_history_of_import(
        &mut self,
        origin: ReplicaId,
        entry: &LogEntry,
    ) -> Result<()> {
        if let Some(next) = &self.history {
            let row = history_aux(next, origin, entry)?;
            self.put_aux(row);
        }
        Ok(())
    }

    /// The history row of this commit's own log entry, once sealed.
    pub(super) fn history_of_own_entry(&mut self, entry: &LogEntry) -> Result<Option<Aux>> {
        match self.history.take() {
            Some(next) => history_aux(&next, self.store.replica_id(), entry).map(Some),
            None => Ok(None),
        }
    }

    /// The server version and stamp time `client`'s entry at `seq` is applied with.
    pub(crate) fn put_sync_upload(
        &mut self,
        client: ReplicaId,
        seq: u64,
        version: u64,
        stamp_time: u64,
    ) {
        let mut value = Vec::with_capacity(16);
        value.extend_from_slice(&version.to_be_bytes());
        value.extend_from_slice(&stamp_time.to_be_bytes());
        self.put_aux(Aux::u64_pair_bytes(UPLOADS, (client.0, seq), value));
    }

    /// The refusals of `client`'s upload that ends at log position `last`.
    pub(crate) fn put_sync_refusals(&mut self, client: ReplicaId, last: u64, refused: Vec<u8>) {
        self.put_aux(Aux::u64_pair_bytes(REFUSALS, (client.0, last), refused));
    }

    /// A client's record.
    pub(crate) fn put_sync_client_record(&mut self, client: ReplicaId, record: Vec<u8>) {
        self.put_aux(Aux::u64_bytes(CLIENTS, client.0, record));
    }

    /// A conflict record, numbered `id`.
    pub(crate) fn put_sync_conflict(&mut self, id: u64, record: Vec<u8>) {
        self.put_aux(Aux::u64_bytes(CONFLICTS, id, record));
    }

    /// A graveyard row.
    pub(crate) fn put_sync_grave(&mut self, key: u64, grave: Vec<u8>) {
        self.put_aux(Aux::u64_bytes(GRAVEYARD, key, grave));
    }

    /// A client counter.
    pub(crate) fn put_sync_counter(&mut self, which: ClientCounter, value: u64) {
        self.put_aux(Aux::str_u64(CLIENT_SYNC, which.key(), value));
    }

    /// A client counter, written through redb.
    pub(crate) fn set_sync_counter(&mut self, which: ClientCounter, value: u64) -> Result<()> {
        self.raw()?
            .open_table(CLIENT_SYNC)?
            .insert(which.key(), value)?;
        Ok(())
    }
}
