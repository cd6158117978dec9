//! The store: objects, the Updates log and metadata in one redb database.
//!
//! A log append, its state update, the digest, and the clock high-water mark commit in one
//! redb transaction, so a crash leaves either all of a transaction or none of it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, StorageBackend};
use serde::de::DeserializeOwned;

use crate::backend::Kept;
use crate::clock::{ReplicaId, Stamp, SystemTimeSource, TimeSource, MAX_DRIFT_MS_DEFAULT};
use crate::crdt;
use crate::digest::{Digest, DigestSum};
use crate::error::{Error, Result};
use crate::log::LogPos;
use crate::schema::Schema;
use crate::serde_object::from_fields;
use crate::snapshot::Snapshots;
use crate::value::{Pk, Value};
use crate::wal;

mod commit;
mod format;
mod import;
mod locks;
mod log;
mod names;
mod open;
mod prepare;
mod read;
mod recover;
mod reset;
mod served;
mod storage_error;
pub(crate) mod sync_tables;
#[cfg(test)]
mod tests;
mod write_tx;

pub use import::ImportReport;
pub use reset::Backup;
#[cfg(feature = "sync")]
pub(crate) use reset::ReplayPlan;
pub use write_tx::WriteTx;

use commit::{Batch, GroupCommit, Visible, Writer};
use format::{corrupt, decode_state, encode, META, META_SCHEMA_PREFIX, OBJECTS};
use locks::lock;
use names::{Interner, NameView};
use recover::Recovery;

/// Default size of redb's page cache: enough for hot pages, small enough to keep a
/// client's memory modest (redb's own default is 1 GiB).
pub const CACHE_BYTES_DEFAULT: usize = 128 << 20;

/// Default size the write-ahead file reaches before a checkpoint (see [`Options::checkpoint_bytes`]).
pub const CHECKPOINT_BYTES_DEFAULT: u64 = 16 << 20;

/// Default time a log entry is kept after the server acknowledged it (see
/// [`Options::keep_acknowledged_for`]).
pub const KEEP_ACKNOWLEDGED_FOR_DEFAULT: std::time::Duration =
    std::time::Duration::from_secs(24 * 60 * 60);

/// Default limit on one value's size.
pub const VALUE_BYTES_MAX_DEFAULT: usize = 4 << 20;

/// Default wait before a poisoned store first tries to recover (see
/// [`Options::recover_after`]).
pub const RECOVER_AFTER_DEFAULT: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest wait between two attempts to recover a poisoned store: each failed attempt
/// doubles the wait, up to this.
pub const RECOVERY_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Default limit on the fields one object holds (see [`Options::fields_per_object_max`]).
pub const FIELDS_PER_OBJECT_MAX_DEFAULT: usize = 20_000;

/// When a commit reaches stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// On disk before `commit` returns (fsync).
    #[default]
    Immediate,
    /// On disk with the next immediate commit; a crash before then loses it (and only it).
    Deferred,
}

/// How a store is opened: `Options::default()` and the setters below, e.g.
/// `Options::default().checkpoint_bytes(0).durability(Durability::Deferred)`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Options {
    /// The largest value a field may hold, in bytes.
    pub value_bytes_max: usize,
    /// The most fields one object may hold, counted as its row stores them: each field
    /// written, plus one per replica for every counter or text field it changed. An object
    /// is one row, rewritten by every write to it, so this bounds the cost of one write. A
    /// commit — local, imported, or an upload on a sync server — that would leave an object
    /// with more fields than this, and more than it held before, is refused with
    /// [`Error::TooManyFields`] and writes nothing. (An object already past the limit may
    /// still be written, as long as it does not grow.)
    pub fields_per_object_max: usize,
    /// How far ahead of local time a remote stamp may be before it is refused.
    pub max_drift_ms: u64,
    /// The durability of commits that do not choose their own.
    pub durability: Durability,
    /// The size of redb's page cache, in bytes (the OS caches the file as well).
    pub cache_bytes: usize,
    /// Where physical time comes from.
    pub time: Arc<dyn TimeSource>,
    /// How many bytes of commits the write-ahead file (`<path>-wal`) takes before a
    /// checkpoint writes them into the database file. Small durable commits cost one
    /// append and one fsync of that file; this bounds the file and the work of reopening
    /// after a crash. 0: no write-ahead file, every durable commit is a redb commit.
    pub checkpoint_bytes: u64,
    /// How long a log entry stays after the server acknowledged it ([`Store::mark_synced`]),
    /// by its stamp's time. While it stays, a server restored from a backup that lacks it
    /// gets it again from this client; after, acknowledging a later position removes it,
    /// so that a syncing store's log does not grow without end. `Some(Duration::ZERO)`
    /// removes every entry as it is acknowledged; `None` keeps them all (the application
    /// removes them with [`Store::prune_log`]).
    pub keep_acknowledged_for: Option<std::time::Duration>,
    /// After a storage failure (a full disk, an I/O error) poisons the store, how long it
    /// waits before it tries to recover: it opens its database again over the same file and
    /// replays the write-ahead file, as opening the store does, and then takes reads and
    /// writes again. Every commit that returned `Ok` survives a recovery as it survives a
    /// restart. A failed attempt doubles the wait, up to [`RECOVERY_BACKOFF_MAX`]. Attempts
    /// are made by calls that find the store poisoned (the store runs no thread of its own),
    /// timed by [`Options::time`]; a call that finds the store busy (another thread in a
    /// read or a commit) leaves the attempt to a later call. The failure is logged
    /// (`tracing::error!`), each failed attempt (`warn!`) and the recovery (`info!`).
    /// `None`: the store stays poisoned until it is opened again.
    pub recover_after: Option<std::time::Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            value_bytes_max: VALUE_BYTES_MAX_DEFAULT,
            fields_per_object_max: FIELDS_PER_OBJECT_MAX_DEFAULT,
            max_drift_ms: MAX_DRIFT_MS_DEFAULT,
            durability: Durability::Immediate,
            cache_bytes: CACHE_BYTES_DEFAULT,
            time: Arc::new(SystemTimeSource),
            checkpoint_bytes: CHECKPOINT_BYTES_DEFAULT,
            keep_acknowledged_for: Some(KEEP_ACKNOWLEDGED_FOR_DEFAULT),
            recover_after: Some(RECOVER_AFTER_DEFAULT),
        }
    }
}

impl Options {
    /// Sets the `value_bytes_max` field.
    pub fn value_bytes_max(mut self, value_bytes_max: usize) -> Options {
        self.value_bytes_max = value_bytes_max;
        self
    }

    /// Sets the `fields_per_object_max` field.
    pub fn fields_per_object_max(mut self, fields_per_object_max: usize) -> Options {
        self.fields_per_object_max = fields_per_object_max;
        self
    }

    /// Sets the `max_drift_ms` field.
    pub fn max_drift_ms(mut self, max_drift_ms: u64) -> Options {
        self.max_drift_ms = max_drift_ms;
        self
    }

    /// Sets the `durability` field.
    pub fn durability(mut self, durability: Durability) -> Options {
        self.durability = durability;
        self
    }

    /// Sets the `cache_bytes` field.
    pub fn cache_bytes(mut self, cache_bytes: usize) -> Options {
        self.cache_bytes = cache_bytes;
        self
    }

    /// Sets the `time` field.
    pub fn time(mut self, time: Arc<dyn TimeSource>) -> Options {
        self.time = time;
        self
    }

    /// Sets the `checkpoint_bytes` field.
    pub fn checkpoint_bytes(mut self, checkpoint_bytes: u64) -> Options {
        self.checkpoint_bytes = checkpoint_bytes;
        self
    }

    /// Sets the `keep_acknowledged_for` field.
    pub fn keep_acknowledged_for(
        mut self,
        keep_acknowledged_for: Option<std::time::Duration>,
    ) -> Options {
        self.keep_acknowledged_for = keep_acknowledged_for;
        self
    }

    /// Sets the `recover_after` field.
    pub fn recover_after(mut self, recover_after: Option<std::time::Duration>) -> Options {
        self.recover_after = recover_after;
        self
    }
}

/// A live object as read from the store.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// Primary key.
    pub pk: Pk,
    /// Field values by name.
    pub fields: BTreeMap<String, Value>,
}

impl Object {
    /// One field's value.
    pub fn get(&self, field: &str) -> Option<&Value> {
        self.fields.get(field)
    }

    /// Deserializes the object into a `#[derive(Deserialize)]` type.
    pub fn to_struct<T: DeserializeOwned>(&self) -> Result<T> {
        from_fields(&self.fields)
    }
}

/// What a commit produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// The transaction's log position; `None` if it wrote nothing.
    pub seq: Option<LogPos>,
    /// The stamp all its writes share; `None` if it wrote nothing.
    pub stamp: Option<Stamp>,
}

/// An embedded fieldlog store: one redb file.
pub struct Store {
    /// The read snapshot `get` keeps between commits (see `snapshot.rs`). Declared before
    /// `db`, so its read transaction ends before the database closes.
    snapshots: Snapshots,
    /// The database; `None` while a recovery has let go of it and not yet opened it again.
    /// Whoever begins a transaction holds the read lock for as long as the transaction
    /// lives ([`Store::db`]), and a recovery replaces it only when it can take the write
    /// lock without waiting: a database is never dropped under a reader.
    db: RwLock<Option<Database>>,
    /// The storage under `db`, kept to open the database again in a recovery. Declared
    /// after `db`, so that it is closed after it.
    backend: Arc<Kept>,
    /// The write-ahead file, if the store has one (see `wal.rs`).
    wal: Option<Box<dyn StorageBackend>>,
    /// Records appended but not yet written (see [`wal::Tail`]); taken by whoever writes.
    wal_tail: Mutex<wal::Tail>,
    /// Held while writing the tail to the file, so that nothing (a batch about to commit,
    /// a failed batch zeroing a record, a checkpoint restarting the file) comes between
    /// taking it and writing it; `true` once a write has failed.
    wal_write: Mutex<bool>,
    /// The file, if the store has one (a reset backs it up).
    path: Option<std::path::PathBuf>,
    replica: ReplicaId,
    options: Options,
    names: RwLock<Interner>,
    schemas: RwLock<HashMap<String, Arc<Schema>>>,
    /// Held by whatever commits: taken with [`Store::lock_writer`], whose release tells the
    /// kept read snapshot that it may be stale (plain `lock` only to read the fields).
    writer: Mutex<Writer>,
    /// The open batch, if any (see [`Batch`]). Taken by the writer that joins it; committed
    /// by whoever closes it.
    batch: Mutex<Option<Batch>>,
    /// Signalled when the batch is put back, committed or abandoned (a reader that needs
    /// it committed waits while a joiner holds it).
    batch_back: Condvar,
    /// A commit has returned whose writes are in a batch not yet committed: readers commit
    /// it first. Cleared only by that batch's commit (with the batch lock held).
    unsettled: AtomicBool,
    /// What readers are shown of the writer's state.
    visible: Mutex<Visible>,
    /// Set after a storage failure in a write; writes are refused until the store recovers
    /// ([`Store::try_recover`]) or is reopened.
    poisoned: AtomicBool,
    /// Moved by each recovery. A commit reads it with its record appended (under the writer
    /// lock), and is durable only if it is unchanged when its record is written or synced:
    /// a recovery drops the records not yet written, and numbers records from the
    /// replayed ones again.
    generation: AtomicU64,
    /// When the next recovery may be tried, and the wait after it.
    recovery: Mutex<Recovery>,
    /// Held by the one recovery under way.
    recovering: Mutex<()>,
    /// Group commit: which commits are durable (see [`Store::wait_durable`]).
    group: Mutex<GroupCommit>,
    group_done: Condvar,
    /// Writers waiting for the writer lock: when there are some, durable commits share
    /// one fsync instead of one each.
    waiting: AtomicUsize,
    /// How many sync servers serve this store (see `served.rs`).
    served: AtomicUsize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// This store's replica id.
    pub fn replica_id(&self) -> ReplicaId {
        self.replica
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The digest of the visible state; equal on replicas that hold the same writes.
    pub fn digest(&self) -> Digest {
        // A poisoned store shows its last committed state.
        let _ = self.settle();
        lock(&self.visible).digest.digest()
    }

    /// Recomputes the digest from every object (a full scan) and says whether it equals the
    /// incrementally kept one: an integrity check.
    pub fn verify_digest(&self) -> Result<bool> {
        self.settle()?;
        let db = self.db()?;
        let rtx = db.begin_read()?;
        let table = rtx.open_table(OBJECTS)?;
        let names = self.names();
        let view = NameView {
            base: &names,
            new: None,
        };
        let mut sum = DigestSum::default();
        for row in table.iter()? {
            let (k, v) = row?;
            let key = k.value();
            let cid = u32::from_be_bytes(
                key.get(..4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| corrupt("object key"))?,
            );
            let pk = Pk::decode(&key[4..]).ok_or_else(|| corrupt("object key"))?;
            view.all_terms(
                view.name(cid)?,
                &pk,
                &decode_state(v.value())?,
                &mut sum,
                true,
            )?;
        }
        Ok(sum.digest() == self.digest())
    }

    /// The highest hybrid time this store has issued or seen (persisted with every commit).
    pub fn clock_high_water(&self) -> u64 {
        let _ = self.settle();
        lock(&self.visible).hlc
    }

    fn schema_of(&self, coll: &str) -> Option<Arc<Schema>> {
        self.schemas
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(coll)
            .cloned()
    }

    /// Every collection's schema.
    pub fn schemas(&self) -> Vec<Schema> {
        let map = self.schemas.read().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<Schema> = map.values().map(|s| (**s).clone()).collect();
        all.sort_by(|a, b| a.collection.cmp(&b.collection));
        all
    }

    /// The schema of a collection, if it has one.
    pub fn schema(&self, collection: &str) -> Option<Schema> {
        self.schema_of(collection).map(|s| (*s).clone())
    }

    /// Sets (or replaces) a collection's schema. Existing objects are not re-checked. A
    /// served store refuses: `SyncServer::set_schema` tells the clients.
    pub fn set_schema(&self, schema: Schema) -> Result<()> {
        self.check_unserved("set_schema")?;
        self.put_schema(schema)
    }

    /// [`Store::set_schema`], for the sync server serving the store.
    pub(crate) fn put_schema(&self, schema: Schema) -> Result<()> {
        schema.validate()?;
        self.check_poisoned()?;
        let _w = self.lock_writer()?;
        let txn = self.db()?.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let key = format!("{META_SCHEMA_PREFIX}{}", schema.collection);
            meta.insert(key.as_str(), encode(&schema)?.as_slice())?;
        }
        self.finish(txn.commit().map_err(Error::from))?;
        self.schemas
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(schema.collection.clone(), Arc::new(schema));
        Ok(())
    }

    /// Reads a live object.
    pub fn get(&self, collection: &str, pk: impl Into<Pk>) -> Result<Option<Object>> {
        let pk = pk.into();
        let Some((row, _)) = self.read_row(collection, &pk)? else {
            return Ok(None);
        };
        // Straight from the row into the object: values move, stamps are not kept.
        let names = self.names();
        let view = NameView {
            base: &names,
            new: None,
        };
        let fields = crate::row::decode_live(row.value(), |id, value| {
            Ok((view.name(id)?.to_owned(), value))
        })?;
        drop(names);
        let Some(fields) = fields else {
            return Ok(None);
        };
        // From a Vec, the map is built in bulk (the Vec is sorted in place, and fields
        // interned in name order are sorted already), not by one search per field.
        Ok(Some(Object {
            fields: crdt::fold(BTreeMap::from_iter(fields))?,
            pk,
        }))
    }

    /// Reads a live object into a `#[derive(Deserialize)]` type.
    pub fn get_as<T: DeserializeOwned>(
        &self,
        collection: &str,
        pk: impl Into<Pk>,
    ) -> Result<Option<T>> {
        self.get(collection, pk)?.map(|o| o.to_struct()).transpose()
    }

    /// Reads one field of a live object, with the stamp of the write that set it.
    pub fn get_field(
        &self,
        collection: &str,
        pk: impl Into<Pk>,
        field: &str,
    ) -> Result<Option<(Value, Stamp)>> {
        let pk = pk.into();
        let Some((state, _)) = self.read_state(collection, &pk)? else {
            return Ok(None);
        };
        if !state.is_live() {
            return Ok(None);
        }
        let names = self.names();
        if let Some(v) = names.by_name.get(field).and_then(|fid| state.field(*fid)) {
            return Ok(Some((v.1.clone(), v.0)));
        }
        // A counter or text: the value its parts make, stamped by the newest part.
        let view = NameView {
            base: &names,
            new: None,
        };
        let mut parts = BTreeMap::new();
        let mut newest = None;
        for (f, stamp, v) in &state.fields {
            let name = view.name(*f)?;
            if crdt::parse_sub(name).is_some_and(|(_, parent, _)| parent == field) {
                parts.insert(name.to_owned(), v.clone());
                newest = newest.max(Some(*stamp));
            }
        }
        let Some(stamp) = newest else {
            return Ok(None);
        };
        Ok(crdt::fold(parts)?.remove(field).map(|v| (v, stamp)))
    }

    /// All live objects of a collection, ordered by primary key.
    pub fn scan(&self, collection: &str) -> Result<Vec<Object>> {
        // Before the names lock: the joiner it may wait for takes that lock to add names.
        self.settle()?;
        let names = self.names();
        let Some(cid) = names.by_name.get(collection).copied() else {
            return Ok(Vec::new());
        };
        let view = NameView {
            base: &names,
            new: None,
        };
        let db = self.db()?;
        let rtx = db.begin_read()?;
        let table = rtx.open_table(OBJECTS)?;
        let lo = cid.to_be_bytes();
        let hi = (u64::from(cid) + 1).to_be_bytes();
        let mut out = Vec::new();
        // The upper bound is the next collection id, as 8 bytes so u32::MAX needs no carry.
        for row in table.range(lo.as_slice()..&hi[4..])? {
            let (k, v) = row?;
            let state = decode_state(v.value())?;
            if !state.is_live() {
                continue;
            }
            let pk = Pk::decode(&k.value()[4..]).ok_or_else(|| corrupt("object key"))?;
            out.push(Object {
                pk,
                fields: crdt::fold(view.owned_live_fields(state)?)?,
            });
        }
        Ok(out)
    }

    /// The live objects of a collection that match a query (see `rules::query`), ordered by
    /// primary key. With a schema, the query may use only queryable fields.
    pub fn query(&self, collection: &str, query: &str) -> Result<Vec<Object>> {
        self.query_with(collection, query, &crate::rules::Params::new())
    }

    /// [`Store::query`] with parameters (`$0`, `$name`).
    pub fn query_with(
        &self,
        collection: &str,
        query: &str,
        params: &crate::rules::Params,
    ) -> Result<Vec<Object>> {
        let q = crate::rules::parse(query)?;
        q.check(self.schema_of(collection).as_deref())?;
        let q = q.bind(params)?;
        let mut all = self.scan(collection)?;
        all.retain(|o| q.matches(&o.pk, &o.fields));
        Ok(all)
    }

    /// The number of live objects in a collection (kept as a counter, no scan).
    pub fn count(&self, collection: &str) -> Result<u64> {
        self.settle()?;
        let Some(cid) = self.names().by_name.get(collection).copied() else {
            return Ok(0);
        };
        Ok(lock(&self.visible).counts.get(&cid).copied().unwrap_or(0))
    }
}
