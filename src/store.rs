//! The store: objects, the Updates log and metadata in one redb database.
//!
//! A log append, its state update, the digest, and the clock high-water mark commit in one
//! redb transaction, so a crash leaves either all of a transaction or none of it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};

use redb::{
    AccessGuard, Database, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::{Kept, Shared, ShrinkOptional};
use crate::changeset::Changeset;
use crate::clock::{Hlc, ReplicaId, Stamp, SystemTimeSource, TimeSource, MAX_DRIFT_MS_DEFAULT};
use crate::crdt;
use crate::digest::{exists_term, field_term, Digest, DigestSum};
use crate::error::{Error, NameKind, Result};
use crate::log::{FieldWrite, LogEntry, LogPos, Op, Write};
use crate::merge::{ObjectState, Outcome};
use crate::reset::{
    Discarded, ObjectSnapshot, ResetMarker, ResetMode, ResetPhase, ResetReport, Superseded,
    UnsyncedWrite,
};
use crate::row;
use crate::schema::Schema;
use crate::serde_object::{from_fields, to_fields};
use crate::snapshot::{Snapshot, Snapshots};
use crate::value::{validate_name, Pk, Value};
use crate::wal::{self, Redo};

mod served;
mod storage_error;
pub(crate) mod sync_tables;

/// (collection id, encoded pk) → postcard `ObjectState<u32>`.
const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
/// log position → postcard `LogEntry<u32>`.
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Where `compact` rebuilds the two big tables before they take the old ones' names.
const OBJECTS_REPACK: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects_repack");
const LOG_REPACK: TableDefinition<u64, &[u8]> = TableDefinition::new("log_repack");
/// name id → name (collections and fields share one id space).
const NAMES: TableDefinition<u32, &str> = TableDefinition::new("names");
/// Small named values; see the `meta` keys below.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const META_FORMAT: &str = "format";
const META_REPLICA: &str = "replica_id";
const META_HLC: &str = "hlc";
const META_DIGEST: &str = "digest";
const META_LOG_NEXT: &str = "log_next";
const META_LAST_SYNC: &str = "last_sync";
const META_SCHEMA_PREFIX: &str = "schema/";
const META_COUNT_PREFIX: &str = "count/";
const META_RESET: &str = "reset";
const META_WAL_SEQ: &str = "wal_seq";
/// What every commit moves (see [`Head`]); before format 5, the four rows above.
const META_HEAD: &str = "head";
/// During a reset: the server's state being downloaded, in the `objects` format.
const STAGING: TableDefinition<&[u8], &[u8]> = TableDefinition::new("reset_staging");
/// During a reset: digest and counts of the staged state.
const STAGING_META: TableDefinition<&str, &[u8]> = TableDefinition::new("reset_staging_meta");
/// After a reset's swap: the state it replaced, until it is dropped in a transaction of its
/// own (or, after a crash, on open). redb reads every page of a table to free it, which
/// would otherwise be a large part of the swap.
const REPLACED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("reset_replaced");
/// The write-ahead file grows by this much at a time.
const WAL_GROWTH: u64 = 1 << 20;

/// 2: the digest sums per-field terms. 3: commits may sit in the write-ahead file (a build
/// that reads 2 would not replay them). 4: its records may hold patches (a build that reads
/// 3 would take one for a torn record and lose it). 5: the log position, clock, record
/// number and digest are one `head` row (a build that reads 4 would read stale rows). 6: a
/// record's log entry may carry its local updates' patches (a build that reads 5 would
/// take such a record for a torn one and lose it). 7: records may hold other modules' rows
/// (`Aux`). 8: those rows may have `(u64, u64)` keys, and the server's own writes, refusals
/// and conflict records are recorded (a build that reads 7 would take such a record for a
/// torn one).
const FORMAT_VERSION: u64 = 8;
/// Older formats this build opens (and upgrades).
const FORMAT_UPGRADES: [u64; 6] = [2, 3, 4, 5, 6, 7];

/// The meta row every commit writes: the next log position, the clock's high-water mark,
/// the number of the last write-ahead record in the database, and the state digest. One
/// row, so a one-update commit inserts one meta row, not four.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Head {
    log_next: LogPos,
    hlc: u64,
    wal_seq: u64,
    digest: Digest,
}

impl Head {
    const BYTES: usize = 24 + 32;

    fn encode(&self) -> [u8; Head::BYTES] {
        let mut out = [0u8; Head::BYTES];
        out[..8].copy_from_slice(&self.log_next.to_le_bytes());
        out[8..16].copy_from_slice(&self.hlc.to_le_bytes());
        out[16..24].copy_from_slice(&self.wal_seq.to_le_bytes());
        out[24..].copy_from_slice(&self.digest.0);
        out
    }

    fn decode(b: &[u8]) -> Result<Head> {
        if b.len() != Head::BYTES {
            return Err(corrupt(format!("meta head of {} bytes", b.len())));
        }
        Ok(Head {
            log_next: u64_of(&b[..8], META_HEAD)?,
            hlc: u64_of(&b[8..16], META_HEAD)?,
            wal_seq: u64_of(&b[16..24], META_HEAD)?,
            digest: digest_of(&b[24..], META_HEAD)?,
        })
    }

    /// The head row, or in a store from before format 5 the four rows it replaced.
    fn read(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Head> {
        if let Some(v) = meta.get(META_HEAD)? {
            return Head::decode(v.value());
        }
        Ok(Head {
            log_next: meta_u64(meta, META_LOG_NEXT, 1)?,
            hlc: meta_u64(meta, META_HLC, 0)?,
            wal_seq: meta_u64(meta, META_WAL_SEQ, 0)?,
            digest: meta_digest(meta, META_DIGEST)?,
        })
    }
}

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

/// How a store is opened.
#[derive(Clone, Debug)]
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

/// What importing a changeset did, counted in field writes (an insert or delete counts one
/// more for the object's existence).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Writes that won and changed the state.
    pub applied: u64,
    /// Writes already held, or older than what we hold.
    pub stale: u64,
}

/// Collection and field names and their ids. Ids are local to one store.
#[derive(Debug, Default)]
struct Interner {
    by_name: HashMap<String, u32>,
    by_id: Vec<String>,
}

/// What only the single writer touches. The fields run ahead of the database while a
/// batch is open (its members' transactions are in it, not yet committed); readers are
/// shown [`Visible`], as of the last redb commit.
#[derive(Debug)]
struct Writer {
    hlc: Hlc,
    digest: DigestSum,
    log_next: LogPos,
    last_sync: LogPos,
    counts: HashMap<u32, u64>,
    /// The last write-ahead record's number (see `wal.rs`).
    wal_seq: u64,
    /// Where the next write-ahead record goes: 0 after a checkpoint.
    wal_at: u64,
    /// The write-ahead file's length (grown ahead of the records, in steps).
    wal_len: u64,
}

impl Writer {
    /// Moves the writer's state past a transaction it has put into redb's transaction.
    fn apply(&mut self, digest: DigestSum, counts: Vec<(u32, u64)>, seq: Option<LogPos>) {
        self.digest = digest;
        self.counts.extend(counts);
        if let Some(seq) = seq {
            self.log_next = seq + 1;
        }
    }

    /// What readers will be shown once redb has committed what the writer has done.
    fn visible(&self) -> Visible {
        Visible {
            digest: self.digest,
            hlc: self.hlc.high_water(),
            log_next: self.log_next,
            counts: self.counts.clone(),
        }
    }
}

/// The writer's state as of the last redb commit.
#[derive(Clone, Debug, Default)]
struct Visible {
    digest: DigestSum,
    hlc: u64,
    log_next: LogPos,
    counts: HashMap<u32, u64>,
}

/// Group commit on a store with a write-ahead file: a recorded transaction (its record
/// appended) leaves its redb transaction open instead of committing it, and the next
/// transaction joins it, so small transactions share one redb commit as well as one fsync.
/// A member's commit returns once its record is durable (or written, if deferred), not
/// when the batch commits: the record is what survives a crash, and the batch is only
/// what makes the writes visible to readers. So the batch is committed when a reader needs
/// it ([`Store::settle`]), when it is full, when a member's record is large, and before any
/// other use of redb's write transaction.
struct Batch {
    txn: OpenTxn,
    members: Members,
}

/// The store's own tables, open in a write transaction.
struct Tables<'t> {
    objects: redb::Table<'t, &'static [u8], &'static [u8]>,
    log: redb::Table<'t, u64, &'static [u8]>,
    meta: redb::Table<'t, &'static str, &'static [u8]>,
}

self_cell::self_cell!(
    /// A write transaction with the store's tables open, for as long as it lasts: a batch's
    /// members write through the same tables. Opening a table flushes the roots of those
    /// closed before it, checksumming every page they dirtied, so opening and closing them
    /// per member was ~22 % of a one-update durable commit's instructions.
    struct OpenTxn {
        owner: redb::WriteTransaction,
        #[covariant]
        dependent: Tables,
    }
);

impl OpenTxn {
    /// Opens the tables in `txn`, made to commit without fsync (a recorded commit's record
    /// is what makes it durable; an unrecorded one chooses again after [`OpenTxn::close`]).
    fn open(mut txn: redb::WriteTransaction) -> Result<OpenTxn> {
        txn.set_durability(redb::Durability::None)?;
        OpenTxn::try_new(txn, |txn| {
            Ok::<_, Error>(Tables {
                objects: txn.open_table(OBJECTS)?,
                log: txn.open_table(LOG)?,
                meta: txn.open_table(META)?,
            })
        })
    }

    /// Closes the tables, for the transaction to commit.
    fn close(self) -> redb::WriteTransaction {
        self.into_owner()
    }
}

/// How many are in a batch, and what its commit will show.
struct Members {
    count: usize,
    /// The bytes of the members' records.
    bytes: usize,
    /// What readers are shown once it commits.
    visible: Visible,
    /// The `head` meta row its commit writes: the last recorded member's (each member's
    /// record holds its own for a replay, so the row goes into redb once a batch).
    head: Option<Vec<u8>>,
}

/// A batch a joiner has taken: whatever ends its commit before the batch is put back or
/// committed (an error, a panic) abandons it, since its transaction holds the members'
/// writes and readers wait for it to come back.
struct JoinedBatch<'s> {
    store: &'s Store,
    taken: bool,
}

impl Drop for JoinedBatch<'_> {
    fn drop(&mut self) {
        if self.taken {
            self.store
                .abandon_batch(&"a commit that joined the batch ended before putting it back");
        }
    }
}

/// A batch is committed once it has this many members.
const BATCH_MEMBERS_MAX: usize = 64;
/// A batch is committed once its members' records pass this many bytes, or a 128th of
/// redb's cache if that is less. Larger batches copy each hot leaf once for many
/// transactions (redb copies a page on its first write in a commit); but a batch's dirty
/// pages must fit redb's write buffer (half its cache) or they are written out and read
/// back (a uniform update's ~135 record bytes dirty a 4 KiB leaf: 1 MiB of records, up to
/// ~40 MiB of pages), and a reader that arrives while a member is being put into the batch
/// waits for that member and the batch's commit.
const BATCH_BYTES_MAX: usize = 1 << 20;

/// The writer lock, taken to commit (through [`Store::begin`] or [`Store::lock_writer`]:
/// taking it lets go of the kept read snapshot, so that the snapshot does not hold back the
/// pages the commit frees). Released with a full batch open, it commits the batch;
/// released, it moves the read epoch, so that `get` never serves a snapshot from before a
/// commit that has returned.
struct WriterGuard<'s> {
    guard: MutexGuard<'s, Writer>,
    store: &'s Store,
}

impl std::ops::Deref for WriterGuard<'_> {
    type Target = Writer;
    fn deref(&self) -> &Writer {
        &self.guard
    }
}

impl std::ops::DerefMut for WriterGuard<'_> {
    fn deref_mut(&mut self) -> &mut Writer {
        &mut self.guard
    }
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        let store = self.store;
        // A failure poisons the store; the members' records put them back when it recovers.
        let _ = store.close_batch_if(|b| b.members.count >= BATCH_MEMBERS_MAX);
        // Before the mutex itself is released (the field drops after this): the next
        // writer cannot commit before the epoch has moved past this one's commit.
        store.snapshots.writer_released();
    }
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

/// Commits are numbered in redb order, write-ahead records by their sequence number; a
/// durable commit makes every earlier one durable, a sync of the write-ahead file every
/// record appended before it.
#[derive(Debug, Default)]
struct GroupCommit {
    /// Commits made so far.
    committed: u64,
    /// Every commit (with a write-ahead file: every record) up to this one is on stable
    /// storage.
    durable: u64,
    /// A leader is making a durable commit.
    flushing: bool,
    /// Why the last flush failed (its waiters and later ones fail too: the store is
    /// poisoned).
    failed: Option<String>,
}

impl GroupCommit {
    /// As a store is opened: every record so far is in the database, durably (without a
    /// write-ahead file, `durable` counts commits).
    fn after_load(with_wal: bool, wal_seq: u64) -> GroupCommit {
        GroupCommit {
            durable: if with_wal { wal_seq } else { 0 },
            ..GroupCommit::default()
        }
    }
}

/// What opening a store reads from its database (after replaying its write-ahead file).
struct Loaded {
    replica: ReplicaId,
    writer: Writer,
    visible: Visible,
    interner: Interner,
    schemas: HashMap<String, Arc<Schema>>,
    wal_seq: u64,
}

/// A poisoned store's schedule of recoveries.
#[derive(Debug, Default)]
struct Recovery {
    /// The earliest time of the next attempt (ms of [`Options::time`]); `None` while the
    /// store is not poisoned.
    due_ms: Option<u64>,
    /// The wait after the next failed attempt.
    backoff: std::time::Duration,
    /// Attempts that failed since the store was poisoned.
    failed: u32,
    /// Why the store was poisoned.
    cause: String,
}

/// The database, for as long as a transaction begun on it lives (see [`Store::db`]).
pub(crate) struct DbGuard<'s>(std::sync::RwLockReadGuard<'s, Option<Database>>);

impl std::ops::Deref for DbGuard<'_> {
    type Target = Database;
    fn deref(&self) -> &Database {
        match self.0.as_ref() {
            Some(db) => db,
            // `Store::db` hands out a guard only over a database.
            None => unreachable!("a database guard without a database"),
        }
    }
}

/// A read transaction for modules that keep their own tables in the store's database; the
/// database stays open under it (a recovery waits for it to end).
pub(crate) struct ReadTxn<'s> {
    // Declared first: dropped before the guard.
    txn: redb::ReadTransaction,
    _db: DbGuard<'s>,
}

impl std::ops::Deref for ReadTxn<'_> {
    type Target = redb::ReadTransaction;
    fn deref(&self) -> &redb::ReadTransaction {
        &self.txn
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The lock if it is free now (a recovery never waits: see [`Store::recover`]).
fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// The write lock if it is free now.
fn try_write<T>(m: &RwLock<T>) -> Option<std::sync::RwLockWriteGuard<'_, T>> {
    match m.try_write() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Creates an empty redb database at `path` so that a crash never leaves a half-created
/// file there (redb writes its magic number in a second sync; a file cut off before it is
/// refused forever): built under a temporary name, synced, then linked into place — a link
/// never replaces a file another process created meanwhile.
fn create_atomically(path: &Path) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(
        ".creating-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let tmp = std::path::PathBuf::from(tmp);
    let r = (|| {
        drop(Database::builder().create(&tmp)?);
        std::fs::File::open(&tmp)?.sync_all()?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            // A file system without hard links: a rename, unless the path appeared meanwhile.
            Err(_) if !path.exists() => std::fs::rename(&tmp, path)?,
            Err(_) => {}
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    r
}

/// Rebuilds table `from` into `into` in key order (sequential inserts fill leaves) and gives
/// it `from`'s name, in `txn`.
fn repack<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::WriteTransaction,
    from: TableDefinition<K, V>,
    into: TableDefinition<K, V>,
) -> Result<()> {
    {
        let old = txn.open_table(from)?;
        let mut new = txn.open_table(into)?;
        for row in old.iter()? {
            let (k, v) = row?;
            new.insert(k.value(), v.value())?;
        }
    }
    txn.delete_table(from)?;
    txn.rename_table(into, from)?;
    Ok(())
}

/// Inserts rows whose keys are not in `table`, sorted ascending. A run of them between two
/// existing keys that is larger than a page goes in through a cursor, which redb packs into
/// full leaves; inserted one by one, each full leaf splits in half. Objects created in key
/// order but between existing keys (`user10000`..`user10999` after `user1000`) left their
/// leaves half empty, 1.4 × the pages of a packed table. Smaller runs go in one by one: a
/// cursor's run costs ~2.5 × an insert for a single row.
fn insert_fresh(table: &mut redb::Table<&[u8], &[u8]>, rows: &[(Vec<u8>, Vec<u8>)]) -> Result<()> {
    const PACKED_RUN_BYTES: usize = 8 << 10;
    let bytes = |rows: &[(Vec<u8>, Vec<u8>)]| -> usize {
        rows.iter().map(|(k, v)| k.len() + v.len()).sum()
    };
    let mut left = bytes(rows);
    let mut rest = rows;
    while !rest.is_empty() {
        let (run, packed) = if left < PACKED_RUN_BYTES {
            // Too little left to fill a page: no need to find where the run ends.
            (rest, false)
        } else {
            let next = match table.range(rest[0].0.as_slice()..)?.next() {
                Some(row) => Some(row?.0.value().to_vec()),
                None => None,
            };
            match rest
                .iter()
                .position(|(k, _)| next.as_ref().is_some_and(|n| k >= n))
                .unwrap_or(rest.len())
            {
                // The key is there after all (nothing inserts it before its commit): replace it.
                0 => (&rest[..1], false),
                n => (&rest[..n], bytes(&rest[..n]) >= PACKED_RUN_BYTES),
            }
        };
        if packed {
            let mut cursor =
                table.lower_bound_mut(std::ops::Bound::Included(run[0].0.as_slice()))?;
            for (k, v) in run {
                cursor
                    .insert_before(k.as_slice(), v.as_slice())
                    .map_err(redb::Error::from)?;
            }
            cursor.close()?;
        } else {
            for (k, v) in run {
                table.insert(k.as_slice(), v.as_slice())?;
            }
        }
        left -= bytes(run);
        rest = &rest[run.len()..];
    }
    Ok(())
}

/// The write-ahead file beside the store file at `path`.
pub(crate) fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push("-wal");
    p.into()
}

/// An `objects` row read from a snapshot, and the snapshot. redb's guard keeps the row's
/// page but not its read transaction: were the snapshot's last handle dropped first, a
/// commit could reclaim the page while the row is read (redb's debug builds assert on it).
struct Row<'s> {
    // Declared first, so dropped before the snapshot, and the snapshot before the database.
    guard: AccessGuard<'static, &'static [u8]>,
    _snapshot: Arc<Snapshot>,
    _db: DbGuard<'s>,
}

impl Row<'_> {
    fn value(&self) -> &[u8] {
        self.guard.value()
    }
}

fn corrupt(what: impl Into<String>) -> Error {
    Error::Corrupt { what: what.into() }
}

fn u64_of(bytes: &[u8], what: &str) -> Result<u64> {
    let b: [u8; 8] = bytes
        .try_into()
        .map_err(|_| corrupt(format!("meta {what}: {} bytes", bytes.len())))?;
    Ok(u64::from_le_bytes(b))
}

/// Moves `sum` from a field's old term (if it had a value) to its new one: the field `name`
/// of object `pk` in collection `coll`.
fn replace_term(
    sum: &mut DigestSum,
    (coll, pk, name): (&str, &Pk, &str),
    old: Option<&(Stamp, Value)>,
    (stamp, value): (Stamp, &Value),
) {
    if let Some((s, v)) = old {
        sum.sub(&field_term(coll, pk, name, *s, v));
    }
    sum.add(&field_term(coll, pk, name, stamp, value));
}

fn digest_of(bytes: &[u8], what: &str) -> Result<Digest> {
    bytes
        .try_into()
        .map(Digest)
        .map_err(|_| corrupt(format!("meta {what}: {} bytes", bytes.len())))
}

/// A meta row's number, or `default` if the row is absent.
fn meta_u64(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
    default: u64,
) -> Result<u64> {
    match meta.get(key)? {
        Some(v) => u64_of(v.value(), key),
        None => Ok(default),
    }
}

/// A meta row's digest, or the empty one if the row is absent.
fn meta_digest(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Digest> {
    match meta.get(key)? {
        Some(v) => digest_of(v.value(), key),
        None => Ok(Digest::default()),
    }
}

fn object_key(coll: u32, pk: &Pk) -> Vec<u8> {
    let mut k = Vec::with_capacity(24);
    k.extend_from_slice(&coll.to_be_bytes());
    pk.encode_into(&mut k);
    k
}

/// Replays a write-ahead patch: `fields` merged onto the object's row at `stamp`.
fn patch_row(
    objects: &mut redb::Table<&[u8], &[u8]>,
    key: &[u8],
    stamp: Stamp,
    fields: impl IntoIterator<Item = (u32, Value)>,
) -> Result<()> {
    let row = objects.get(key)?.map(|r| decode_state(r.value()));
    let mut state = match row {
        Some(state) => state?,
        None => return Err(corrupt("write-ahead patch of a missing object")),
    };
    state.apply_fields(fields.into_iter().map(|(f, v)| (f, stamp, v)).collect());
    objects.insert(key, encode_state(&state)?.as_slice())?;
    Ok(())
}

fn decode_state(bytes: &[u8]) -> Result<ObjectState<u32>> {
    crate::row::decode(bytes)
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    encode_into(v, Vec::new())
}

/// [`encode`] into `buf` (sized beforehand, where the caller knows about how large).
fn encode_into<T: Serialize>(v: &T, buf: Vec<u8>) -> Result<Vec<u8>> {
    postcard::to_extend(v, buf).map_err(|e| corrupt(format!("encode: {e}")))
}

/// An object row (see `row.rs`).
fn encode_state(state: &ObjectState<u32>) -> Result<Vec<u8>> {
    Ok(crate::row::encode(state))
}

/// The names a transaction interns, numbered after the committed ones, found by name in
/// one lookup (a transaction writing an object of N new fields looks each one up: searched
/// in a list, that was N² comparisons).
#[derive(Debug, Default)]
struct NewNames {
    by_pos: Vec<String>,
    /// Name → position in `by_pos`.
    by_name: HashMap<String, usize>,
}

impl NewNames {
    fn len(&self) -> usize {
        self.by_pos.len()
    }

    fn is_empty(&self) -> bool {
        self.by_pos.is_empty()
    }

    fn push(&mut self, name: &str) {
        self.by_name.insert(name.to_owned(), self.by_pos.len());
        self.by_pos.push(name.to_owned());
    }

    /// Forgets every name after the first `len`.
    fn truncate(&mut self, len: usize) {
        for name in self.by_pos.drain(len.min(self.by_pos.len())..) {
            self.by_name.remove(&name);
        }
    }
}

/// Resolves ids to names: committed ones, then those a transaction is adding.
struct NameView<'a> {
    base: &'a Interner,
    new: Option<&'a NewNames>,
}

impl NameView<'_> {
    fn name(&self, id: u32) -> Result<&str> {
        let i = id as usize;
        let base = self.base.by_id.len();
        self.base
            .by_id
            .get(i)
            .or_else(|| self.new?.by_pos.get(i.wrapping_sub(base)))
            .map(String::as_str)
            .ok_or_else(|| corrupt(format!("unknown name id {id}")))
    }

    fn id(&self, name: &str) -> Option<u32> {
        if let Some(&id) = self.base.by_name.get(name) {
            return Some(id);
        }
        let pos = *self.new?.by_name.get(name)?;
        Some((self.base.by_id.len() + pos) as u32)
    }

    /// Adds (`add`) or subtracts every digest term of a live object.
    fn all_terms(
        &self,
        coll: &str,
        pk: &Pk,
        state: &ObjectState<u32>,
        sum: &mut DigestSum,
        add: bool,
    ) -> Result<()> {
        let Some((stamp, true)) = state.exists else {
            return Ok(());
        };
        let mut apply = |d: Digest| if add { sum.add(&d) } else { sum.sub(&d) };
        apply(exists_term(coll, pk, stamp));
        for (f, s, v) in &state.fields {
            apply(field_term(coll, pk, self.name(*f)?, *s, v));
        }
        Ok(())
    }

    /// Moves `sum` from the object's `before` state to `after`, hashing only what changed,
    /// and returns the change in live objects (-1, 0, 1).
    fn digest_delta(
        &self,
        coll: &str,
        pk: &Pk,
        before: Option<&ObjectState<u32>>,
        after: &ObjectState<u32>,
        sum: &mut DigestSum,
    ) -> Result<i64> {
        let was = before.is_some_and(ObjectState::is_live);
        let is = after.is_live();
        let same_existence = before.map(|b| b.exists) == Some(after.exists);
        match (before, was && is && same_existence) {
            (Some(b), true) => {
                // Same incarnation: only fields whose stamp moved change terms.
                let (mut i, mut j) = (0, 0);
                let (old, new) = (&b.fields, &after.fields);
                while i < old.len() || j < new.len() {
                    let order = match (old.get(i), new.get(j)) {
                        (Some(o), Some(n)) => o.0.cmp(&n.0),
                        (Some(_), None) => std::cmp::Ordering::Less,
                        _ => std::cmp::Ordering::Greater,
                    };
                    match order {
                        std::cmp::Ordering::Less => {
                            let (f, s, v) = &old[i];
                            sum.sub(&field_term(coll, pk, self.name(*f)?, *s, v));
                            i += 1;
                        }
                        std::cmp::Ordering::Greater => {
                            let (f, s, v) = &new[j];
                            sum.add(&field_term(coll, pk, self.name(*f)?, *s, v));
                            j += 1;
                        }
                        std::cmp::Ordering::Equal => {
                            let ((f, os, ov), (_, ns, nv)) = (&old[i], &new[j]);
                            if os != ns {
                                let name = self.name(*f)?;
                                sum.sub(&field_term(coll, pk, name, *os, ov));
                                sum.add(&field_term(coll, pk, name, *ns, nv));
                            }
                            i += 1;
                            j += 1;
                        }
                    }
                }
            }
            _ => {
                if let Some(b) = before {
                    self.all_terms(coll, pk, b, sum, false)?;
                }
                self.all_terms(coll, pk, after, sum, true)?;
            }
        }
        Ok(i64::from(is) - i64::from(was))
    }

    fn live_fields(&self, state: &ObjectState<u32>) -> Result<BTreeMap<String, Value>> {
        state
            .fields
            .iter()
            .map(|(f, _, v)| Ok((self.name(*f)?.to_owned(), v.clone())))
            .collect()
    }

    /// [`NameView::live_fields`] of a state read only to be returned: values move out.
    fn owned_live_fields(&self, state: ObjectState<u32>) -> Result<BTreeMap<String, Value>> {
        state
            .fields
            .into_iter()
            .map(|(f, _, v)| Ok((self.name(f)?.to_owned(), v)))
            .collect()
    }
}

impl Store {
    /// Opens the store at `path`, creating it if it does not exist.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        Store::open_with(path, Options::default())
    }

    /// Opens the store at `path` with options. Its write-ahead file is `<path>-wal`
    /// (unless [`Options::checkpoint_bytes`] is 0): keep it with the store file.
    pub fn open_with(path: impl AsRef<Path>, options: Options) -> Result<Store> {
        let path = path.as_ref();
        if !path.exists() {
            create_atomically(path)?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let backend = Kept::new(redb::backends::FileBackend::new(file)?);
        // The database's lock keeps a second process out of both files: taken before the
        // write-ahead file is touched.
        let db = Store::database(&backend, &options)?;
        let wal: Option<Box<dyn StorageBackend>> = if options.checkpoint_bytes > 0 {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(wal_path(path))?;
            Some(Box::new(redb::backends::FileBackend::new(file)?))
        } else {
            None
        };
        let mut store = Store::init(db, backend, wal, options)?;
        store.path = Some(path.to_owned());
        Ok(store)
    }

    /// A store in memory, gone when dropped (for tests and scratch work).
    pub fn open_in_memory() -> Result<Store> {
        Store::open_backend(redb::backends::InMemoryBackend::new(), Options::default())
    }

    /// Opens a store over any redb storage backend, without a write-ahead file: every
    /// durable commit is a redb commit.
    pub fn open_backend(backend: impl StorageBackend, options: Options) -> Result<Store> {
        let backend = Kept::new(backend);
        Store::init(Store::database(&backend, &options)?, backend, None, options)
    }

    /// Opens a store over a redb storage backend for the database and another for its
    /// write-ahead file (crash and I/O-fault tests use this with simulated disks).
    pub fn open_backend_with_wal(
        backend: impl StorageBackend,
        wal: impl StorageBackend,
        options: Options,
    ) -> Result<Store> {
        let wal: Option<Box<dyn StorageBackend>> =
            (options.checkpoint_bytes > 0).then(|| Box::new(wal) as Box<dyn StorageBackend>);
        let backend = Kept::new(backend);
        Store::init(Store::database(&backend, &options)?, backend, wal, options)
    }

    /// Puts back the commits the write-ahead file holds beyond the database's last one
    /// (see `wal.rs`), in one durable redb commit.
    fn replay_wal(db: &Database, wal: &dyn StorageBackend) -> Result<()> {
        let (replica, after) = {
            let rtx = db.begin_read()?;
            let meta = match rtx.open_table(META) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let Some(replica) = meta.get(META_REPLICA)? else {
                // A new database: nothing was ever recorded for it.
                return Ok(());
            };
            // Before replaying anything: a newer build's records may not read as this one's.
            if let Some(v) = meta.get(META_FORMAT)? {
                let found = u64_of(v.value(), META_FORMAT)?;
                if found != FORMAT_VERSION && !FORMAT_UPGRADES.contains(&found) {
                    return Err(corrupt(format!(
                        "format version {found}; this build reads {FORMAT_VERSION}"
                    )));
                }
            }
            let replica = u64_of(replica.value(), META_REPLICA)?;
            let after = Head::read(&meta)?.wal_seq;
            (replica, after)
        };
        let len = usize::try_from(wal.len()?).map_err(|_| corrupt("write-ahead file size"))?;
        let mut bytes = vec![0u8; len];
        wal.read(0, &mut bytes)?;
        let records = wal::replayable(&bytes, replica, after);
        if records.is_empty() {
            return Ok(());
        }
        let txn = db.begin_write()?;
        {
            let mut objects = txn.open_table(OBJECTS)?;
            let mut log = txn.open_table(LOG)?;
            let mut names = txn.open_table(NAMES)?;
            let mut meta = txn.open_table(META)?;
            for row in records.into_iter().flat_map(|r| r.rows) {
                match row {
                    Redo::Object(k, Some(v)) => {
                        objects.insert(k.as_slice(), v.as_slice())?;
                    }
                    Redo::Object(k, None) => {
                        objects.remove(k.as_slice())?;
                    }
                    Redo::Log(seq, entry) => {
                        log.insert(seq, entry.as_slice())?;
                    }
                    Redo::Name(id, name) => {
                        names.insert(id, name.as_str())?;
                    }
                    Redo::Meta(k, v) => {
                        meta.insert(k.as_str(), v.as_slice())?;
                    }
                    Redo::Patch(k, stamp, fields) => {
                        patch_row(&mut objects, &k, stamp, fields)?;
                    }
                    Redo::LogPatches(seq, entry, at) => {
                        log.insert(seq, entry.as_slice())?;
                        let entry: LogEntry<u32> = postcard::from_bytes(&entry)
                            .map_err(|e| corrupt(format!("write-ahead log entry: {e}")))?;
                        for i in at {
                            let w = entry.writes.get(i as usize);
                            let Some(Write {
                                collection,
                                pk,
                                op: Op::Update { fields },
                            }) = w
                            else {
                                return Err(corrupt("write-ahead patch of no update"));
                            };
                            let fields = fields.iter().map(|f| (f.field, f.value.clone()));
                            patch_row(
                                &mut objects,
                                &object_key(*collection, pk),
                                entry.stamp,
                                fields,
                            )?;
                        }
                    }
                    Redo::Aux(aux) => wal::Aux::apply_all(std::slice::from_ref(&aux), &txn)?,
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Replays the write-ahead file into the database and reads the store's state from it:
    /// what opening a store does, and what a recovery does again.
    fn load(db: &Database, wal: Option<&dyn StorageBackend>, options: &Options) -> Result<Loaded> {
        let wal_len = match wal {
            Some(wal) => {
                Store::replay_wal(db, wal)?;
                // Empty the file: what lies past the replayed records (a record torn by a
                // crash, then any written after it whose bytes reached the disk) carries
                // numbers the next records take again, and such a record that the next
                // records happen to end just before would be replayed after them.
                if wal.len()? > 0 {
                    wal.set_len(0)?;
                    wal.sync_data()?;
                }
                0
            }
            None => 0,
        };
        let txn = db.begin_write()?;
        let loaded = {
            let mut meta = txn.open_table(META)?;
            txn.open_table(OBJECTS)?;
            txn.open_table(LOG)?;
            // A reset's replaced state left by a crash right after its swap.
            txn.delete_table(REPLACED)?;
            let names = txn.open_table(NAMES)?;

            let format = meta.get(META_FORMAT)?.map(|v| v.value().to_vec());
            match format {
                Some(v) => {
                    let found = u64_of(&v, META_FORMAT)?;
                    if FORMAT_UPGRADES.contains(&found) {
                        meta.insert(META_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())?;
                    } else if found != FORMAT_VERSION {
                        return Err(corrupt(format!(
                            "format version {found}; this build reads {FORMAT_VERSION}"
                        )));
                    }
                }
                None => {
                    meta.insert(META_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())?;
                }
            }
            let replica = meta.get(META_REPLICA)?.map(|v| v.value().to_vec());
            let replica = match replica {
                Some(v) => ReplicaId(u64_of(&v, META_REPLICA)?),
                None => {
                    let id = rand::random::<u64>().max(1);
                    meta.insert(META_REPLICA, id.to_le_bytes().as_slice())?;
                    ReplicaId(id)
                }
            };
            let last_sync = meta_u64(&meta, META_LAST_SYNC, 0)?;
            let head = Head::read(&meta)?;
            // From format 5 on, one row; the four it replaced go (a store upgraded here).
            meta.insert(META_HEAD, head.encode().as_slice())?;
            for old in [META_LOG_NEXT, META_HLC, META_WAL_SEQ, META_DIGEST] {
                meta.remove(old)?;
            }
            let Head {
                log_next,
                hlc,
                wal_seq,
                digest,
            } = head;

            let mut interner = Interner::default();
            for (i, row) in names.iter()?.enumerate() {
                let (id, name) = row?;
                if id.value() as usize != i {
                    return Err(corrupt(format!("name ids not dense at {}", id.value())));
                }
                let name = name.value().to_owned();
                interner.by_name.insert(name.clone(), id.value());
                interner.by_id.push(name);
            }

            let mut schemas = HashMap::new();
            let mut counts = HashMap::new();
            for row in meta.iter()? {
                let (k, v) = row?;
                if let Some(coll) = k.value().strip_prefix(META_SCHEMA_PREFIX) {
                    let s: Schema = postcard::from_bytes(v.value())
                        .map_err(|e| corrupt(format!("schema of {coll}: {e}")))?;
                    schemas.insert(coll.to_owned(), Arc::new(s));
                } else if let Some(id) = k.value().strip_prefix(META_COUNT_PREFIX) {
                    let id: u32 = id.parse().map_err(|_| corrupt("count key"))?;
                    counts.insert(id, u64_of(v.value(), "count")?);
                }
            }
            let writer = Writer {
                hlc: Hlc::new(hlc, options.max_drift_ms),
                digest: DigestSum::from_digest(digest),
                log_next,
                last_sync,
                counts,
                wal_seq,
                wal_at: 0,
                wal_len,
            };
            let visible = writer.visible();
            Loaded {
                replica,
                writer,
                visible,
                interner,
                schemas,
                wal_seq,
            }
        };
        txn.commit()?;
        Ok(loaded)
    }

    /// A database over `backend` (redb repairs it if it was not closed cleanly).
    fn database(backend: &Arc<Kept>, options: &Options) -> Result<Database> {
        Ok(Database::builder()
            .set_cache_size(options.cache_bytes)
            .create_with_backend(ShrinkOptional(Shared(Arc::clone(backend))))?)
    }

    fn init(
        db: Database,
        backend: Arc<Kept>,
        wal: Option<Box<dyn StorageBackend>>,
        options: Options,
    ) -> Result<Store> {
        let Loaded {
            replica,
            writer,
            visible,
            interner,
            schemas,
            wal_seq,
        } = Store::load(&db, wal.as_deref(), &options)?;
        Ok(Store {
            snapshots: Snapshots::default(),
            db: RwLock::new(Some(db)),
            backend,
            wal_tail: Mutex::new(wal::Tail::new(wal_seq)),
            wal_write: Mutex::new(false),
            group: Mutex::new(GroupCommit::after_load(wal.is_some(), wal_seq)),
            wal,
            path: None,
            replica,
            options,
            names: RwLock::new(interner),
            schemas: RwLock::new(schemas),
            writer: Mutex::new(writer),
            batch: Mutex::new(None),
            batch_back: Condvar::new(),
            unsettled: AtomicBool::new(false),
            visible: Mutex::new(visible),
            poisoned: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            recovery: Mutex::new(Recovery::default()),
            recovering: Mutex::new(()),
            group_done: Condvar::new(),
            waiting: AtomicUsize::new(0),
            served: AtomicUsize::new(0),
        })
    }

    /// How far a flush begun now reaches: the last record appended with a write-ahead
    /// file, else the last commit.
    fn flush_target(&self, g: &GroupCommit) -> u64 {
        if self.wal.is_some() {
            lock(&self.wal_tail).seq()
        } else {
            g.committed
        }
    }

    /// Blocks until commit number `seq` (with a write-ahead file: record number `seq`) of
    /// `generation` is on stable storage. One waiter at a time leads: it syncs the
    /// write-ahead file (or makes an empty durable commit, which makes every earlier commit
    /// durable), and wakes everyone it covered. A failed flush fails every waiter it would
    /// have covered, and a recovery since the commit every waiter (numbers start again).
    fn wait_durable(&self, seq: u64, generation: u64) -> Result<()> {
        let mut g = lock(&self.group);
        loop {
            if self.generation.load(Ordering::SeqCst) != generation {
                return Err(Error::Poisoned);
            }
            if g.durable >= seq {
                return Ok(());
            }
            if g.failed.is_some() {
                // The flush that would have covered this commit failed: not durable.
                return Err(Error::Poisoned);
            }
            if !g.flushing {
                break;
            }
            g = self
                .group_done
                .wait(g)
                .unwrap_or_else(PoisonError::into_inner);
        }
        g.flushing = true;
        drop(g);
        let r = (|| {
            if let Some(wal) = &self.wal {
                // One write and one sync cover every record appended so far, while others
                // keep appending.
                let target = self.write_tail(wal.as_ref(), generation)?;
                wal.sync_data().map_err(redb::Error::from)?;
                return Ok(target);
            }
            let _w = self.lock_writer()?;
            let target = self.flush_target(&lock(&self.group));
            let txn = self.db()?.begin_write()?;
            txn.commit()?;
            Ok::<_, Error>(target)
        })();
        let mut g = lock(&self.group);
        g.flushing = false;
        let out = match r {
            Ok(target) => {
                g.durable = g.durable.max(target);
                Ok(())
            }
            Err(e) => {
                self.poison(&e);
                g.failed = Some(e.to_string());
                Err(e)
            }
        };
        self.group_done.notify_all();
        out
    }

    /// Writes the records appended so far to the write-ahead file (without syncing it);
    /// returns the last one's number. A failed write poisons the store (a record missing
    /// from the file would end the replay there, losing every later one), and every later
    /// call fails: the batch holding the unwritten records must never commit. So does a
    /// call for a record of an earlier `generation`: a recovery dropped the tail it was in.
    fn write_tail(&self, wal: &dyn StorageBackend, generation: u64) -> Result<u64> {
        let mut failed = lock(&self.wal_write);
        if *failed || self.generation.load(Ordering::SeqCst) != generation {
            return Err(Error::Poisoned);
        }
        let (at, bytes, seq) = lock(&self.wal_tail).take();
        if !bytes.is_empty() {
            if let Err(e) = wal.write(at, &bytes) {
                *failed = true;
                let e = Error::from(redb::Error::from(e));
                self.poison(&e);
                return Err(e);
            }
        }
        Ok(seq)
    }

    /// Restarts the write-ahead file after a durable redb commit, which made every record
    /// so far durable in the database: the unwritten ones are dropped, and the next record
    /// goes at the file's start.
    fn restart_wal(&self, writer: &mut Writer) {
        let _w = lock(&self.wal_write);
        lock(&self.wal_tail).discard();
        writer.wal_at = 0;
    }

    /// When a batch's members' records are enough to commit it ([`BATCH_BYTES_MAX`]).
    fn batch_bytes_max(&self) -> usize {
        (self.options.cache_bytes / 128).min(BATCH_BYTES_MAX)
    }

    /// Commits the open batch, if any (without fsync: its members' records are in the
    /// write-ahead file). A failure poisons the store; the members' records put their
    /// writes back when it recovers (or is reopened).
    fn close_batch(&self) -> Result<()> {
        self.close_batch_if(|_| true)
    }

    /// [`Store::close_batch`], if the open batch is one `which` picks.
    fn close_batch_if(&self, which: impl FnOnce(&Batch) -> bool) -> Result<()> {
        let mut slot = lock(&self.batch);
        if !slot.as_ref().is_some_and(which) {
            return Ok(());
        }
        let Some(Batch { mut txn, members }) = slot.take() else {
            return Ok(());
        };
        // Nothing is visible before its record is in the file: a commit whose record could
        // not be written leaves no trace (the syncs usually wrote them already).
        if let Some(wal) = &self.wal {
            let generation = self.generation.load(Ordering::SeqCst);
            if let Err(e) = self.write_tail(wal.as_ref(), generation) {
                self.abandon_batch(&e);
                return Err(e);
            }
        }
        let committed = (|| {
            if let Some(head) = &members.head {
                txn.with_dependent_mut(|_, t| t.meta.insert(META_HEAD, head.as_slice()))?;
            }
            txn.close().commit()?;
            Ok::<_, Error>(())
        })();
        if let Err(e) = committed {
            self.abandon_batch(&e);
            return Err(e);
        }
        lock(&self.group).committed += 1;
        *lock(&self.visible) = members.visible;
        // A reader may close it without the writer lock: its commit must move the epoch too.
        self.snapshots.writer_released();
        self.settled(&slot);
        Ok(())
    }

    /// The batch has committed: readers need not commit one. Called with the batch lock
    /// held, so that a joiner puts the next batch back only after this.
    fn settled(&self, _batch: &MutexGuard<'_, Option<Batch>>) {
        self.unsettled.store(false, Ordering::SeqCst);
        self.batch_back.notify_all();
    }

    /// A batch that will not commit (its transaction is dropped): the store is poisoned,
    /// since the writer's state (ahead of the database) cannot be trusted, and readers are
    /// refused, since commits that returned are missing from the database until the
    /// records put them back (a recovery, or a reopen).
    fn abandon_batch(&self, why: &dyn std::fmt::Display) {
        self.poison(why);
        self.batch_back.notify_all();
    }

    /// Puts a joined batch back, open, for the next writer or a reader.
    fn put_back_batch(&self, batch: Batch) {
        *lock(&self.batch) = Some(batch);
        self.unsettled.store(true, Ordering::SeqCst);
        self.batch_back.notify_all();
    }

    /// Makes every commit that has returned visible to readers: an open batch is committed
    /// first (waiting while a joiner has it). Every read starts here; it costs an atomic
    /// load when no batch is open.
    fn settle(&self) -> Result<()> {
        if self.poisoned.load(Ordering::SeqCst) {
            self.try_recover();
        }
        if !self.unsettled.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut slot = lock(&self.batch);
        loop {
            if !self.unsettled.load(Ordering::SeqCst) {
                return Ok(());
            }
            if self.poisoned.load(Ordering::SeqCst) {
                return Err(Error::Poisoned);
            }
            if slot.is_none() {
                slot = self
                    .batch_back
                    .wait(slot)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            drop(slot);
            // A joiner may take it first: then this waits for it again.
            self.close_batch()?;
            slot = lock(&self.batch);
        }
    }

    /// Names a transaction interned, before it commits: a reader must never find an id it
    /// cannot map (a commit that then fails poisons the store), and the next member of a
    /// batch must find them.
    fn add_names(&self, new_names: Vec<String>) {
        if new_names.is_empty() {
            return;
        }
        let mut names = self.names.write().unwrap_or_else(PoisonError::into_inner);
        for n in new_names {
            let id = names.by_id.len() as u32;
            names.by_name.insert(n.clone(), id);
            names.by_id.push(n);
        }
    }

    /// The writer lock for work outside a write transaction; an open batch (which holds
    /// redb's one write transaction) is committed first.
    fn lock_writer(&self) -> Result<WriterGuard<'_>> {
        let w = WriterGuard {
            guard: lock(&self.writer),
            store: self,
        };
        self.snapshots.writer_locked();
        let r = self.close_batch();
        self.finish(r)?;
        Ok(w)
    }

    /// A durable redb commit: every commit so far is in the database file, and the
    /// write-ahead file starts again from its beginning (emptied if `truncate`, else
    /// overwritten in place). The caller holds the writer.
    fn checkpoint_with(&self, writer: &mut Writer, truncate: bool) -> Result<()> {
        let txn = self.db()?.begin_write()?;
        txn.commit()?;
        {
            let mut g = lock(&self.group);
            g.durable = self.flush_target(&g);
        }
        self.restart_wal(writer);
        if let (Some(wal), true) = (&self.wal, truncate) {
            let _w = lock(&self.wal_write);
            wal.set_len(0).map_err(redb::Error::from)?;
            wal.sync_data().map_err(redb::Error::from)?;
            writer.wal_len = 0;
        }
        Ok(())
    }

    /// Writes every commit into the database file and empties the write-ahead file (as
    /// `close` does; the store also does it by itself when the file reaches
    /// [`Options::checkpoint_bytes`], without emptying it).
    pub fn checkpoint(&self) -> Result<()> {
        self.check_poisoned()?;
        let mut w = self.lock_writer()?;
        let r = self.checkpoint_with(&mut w, true);
        drop(w);
        self.finish(r)
    }

    /// Rewrites the store file as small as it can be (SQLite's `VACUUM`): every commit
    /// checkpointed, the objects and log tables rebuilt in key order (redb's own compaction
    /// moves pages but does not refill half-empty ones), free space given back to the file
    /// system. Takes time in proportion to the store; needs it to itself (no sync client
    /// or other handle), which `&mut` makes sure of.
    pub fn compact(&mut self) -> Result<()> {
        self.check_poisoned()?;
        // redb compacts only with no read transaction live: not even the kept snapshot.
        self.snapshots.writer_locked();
        let r = (|| {
            // No transaction can be live: `&mut self`.
            let db = self
                .db
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .as_mut()
                .ok_or(Error::Poisoned)?;
            let txn = db.begin_write()?;
            repack(&txn, OBJECTS, OBJECTS_REPACK)?;
            repack(&txn, LOG, LOG_REPACK)?;
            txn.commit()?;
            while db.compact().map_err(redb::Error::from)? {}
            let mut w = self.lock_writer()?;
            self.checkpoint_with(&mut w, true)
        })();
        self.finish(r)
    }

    /// Closes the store, first making every commit durable (those made with
    /// `Durability::Deferred` too) and reporting if that fails. Dropping a store closes it
    /// as well, but cannot report a failure: with deferred commits, close explicitly.
    pub fn close(self) -> Result<()> {
        self.check_poisoned()?;
        let mut w = self.lock_writer()?;
        let r = self.checkpoint_with(&mut w, true);
        drop(w);
        self.finish(r)?;
        // redb's close records its allocator state; a failure there costs the next open a
        // repair, and is reported rather than dropped.
        let Store {
            snapshots,
            db,
            backend,
            ..
        } = self;
        drop(snapshots);
        if let Some(db) = db.into_inner().unwrap_or_else(PoisonError::into_inner) {
            db.close().map_err(redb::Error::from)?;
        }
        backend.close().map_err(redb::Error::from)?;
        Ok(())
    }

    /// Never issue log positions up to `pos` again, and count them acknowledged: the server
    /// holds entries at those positions that this store lost (deferred commits lost in a
    /// crash after they were uploaded).
    pub(crate) fn skip_log_to(&self, pos: LogPos) -> Result<()> {
        self.check_poisoned()?;
        let mut w = self.lock_writer()?;
        let next = w.log_next.max(pos + 1);
        let last_sync = w.last_sync.max(pos);
        let txn = self.db()?.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let head = Head {
                log_next: next,
                ..Head::read(&meta)?
            };
            meta.insert(META_HEAD, head.encode().as_slice())?;
            meta.insert(META_LAST_SYNC, last_sync.to_le_bytes().as_slice())?;
        }
        self.finish(txn.commit().map_err(Error::from))?;
        w.log_next = next;
        w.last_sync = last_sync;
        *lock(&self.visible) = w.visible();
        Ok(())
    }

    /// How many times the store has recovered from a storage failure (see
    /// [`Options::recover_after`]) since it was opened.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

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

    fn names(&self) -> std::sync::RwLockReadGuard<'_, Interner> {
        self.names.read().unwrap_or_else(PoisonError::into_inner)
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

    /// Poisons the store after a storage failure (the first one is logged, and schedules a
    /// recovery: see [`Options::recover_after`]).
    fn poison(&self, why: &dyn std::fmt::Display) {
        if self.poisoned.swap(true, Ordering::SeqCst) {
            return;
        }
        let now = self.options.time.now_ms();
        let after = self.options.recover_after;
        let mut r = lock(&self.recovery);
        *r = Recovery {
            due_ms: after.map(|d| now.saturating_add(millis(d))),
            backoff: after.unwrap_or_default(),
            failed: 0,
            cause: why.to_string(),
        };
        tracing::error!(
            replica = %self.replica,
            path = ?self.path,
            error = %why,
            recover_in_ms = after.map(millis),
            "storage failure: the store refuses writes until it recovers"
        );
    }

    /// Tries to recover a poisoned store, if an attempt is due (see
    /// [`Options::recover_after`]). Returns whether the store is no longer poisoned.
    fn try_recover(&self) -> bool {
        if !self.poisoned.load(Ordering::SeqCst) {
            return true;
        }
        let now = self.options.time.now_ms();
        if lock(&self.recovery).due_ms.is_none_or(|due| now < due) {
            return false;
        }
        let Ok(_one) = self.recovering.try_lock() else {
            return false;
        };
        if !self.poisoned.load(Ordering::SeqCst) {
            return true;
        }
        match self.recover() {
            // Busy: a later call tries again.
            Ok(false) => false,
            Ok(true) => {
                let r = std::mem::take(&mut *lock(&self.recovery));
                tracing::info!(
                    replica = %self.replica,
                    path = ?self.path,
                    failed_attempts = r.failed,
                    cause = %r.cause,
                    "the store recovered from a storage failure (database reopened, write-ahead file replayed)"
                );
                true
            }
            Err(e) => {
                let mut r = lock(&self.recovery);
                r.failed += 1;
                let wait = r.backoff;
                r.due_ms = Some(now.saturating_add(millis(wait)));
                r.backoff = (wait * 2).min(RECOVERY_BACKOFF_MAX);
                tracing::warn!(
                    replica = %self.replica,
                    path = ?self.path,
                    attempt = r.failed,
                    retry_in_ms = millis(wait),
                    error = %e,
                    "the store could not recover from a storage failure yet"
                );
                false
            }
        }
    }

    /// Opens the database again, over the same storage, as opening the store does (the
    /// write-ahead file replayed: nothing acknowledged is lost), and puts the store's state
    /// in memory back from it. Every lock is taken without waiting, and a database still in
    /// use by a reader is never let go of: `Ok(false)` if one is busy. An error leaves the
    /// store poisoned (without a database until the next attempt).
    fn recover(&self) -> Result<bool> {
        let (Some(mut writer), Some(mut batch), Some(mut group)) = (
            try_lock(&self.writer),
            try_lock(&self.batch),
            try_lock(&self.group),
        ) else {
            return Ok(false);
        };
        let (Some(mut failed), Some(mut tail), Some(mut visible)) = (
            try_lock(&self.wal_write),
            try_lock(&self.wal_tail),
            try_lock(&self.visible),
        ) else {
            return Ok(false);
        };
        let (Some(mut names), Some(mut schemas)) =
            (try_write(&self.names), try_write(&self.schemas))
        else {
            return Ok(false);
        };
        if group.flushing {
            return Ok(false);
        }
        let Some(mut db) = try_write(&self.db) else {
            return Ok(false);
        };
        // No reader holds the database: nothing reads the failed batch or a kept snapshot.
        // The batch's commits that returned are in the write-ahead file.
        drop(batch.take());
        self.unsettled.store(false, Ordering::SeqCst);
        self.snapshots.writer_locked();
        // redb closes it, writing nothing after an I/O failure.
        drop(db.take());
        let fresh = Store::database(&self.backend, &self.options)?;
        let loaded = Store::load(&fresh, self.wal.as_deref(), &self.options)?;
        if loaded.replica != self.replica {
            return Err(corrupt(format!(
                "reopened as replica {}, not {}",
                loaded.replica, self.replica
            )));
        }
        *db = Some(fresh);
        *writer = loaded.writer;
        *visible = loaded.visible;
        *names = loaded.interner;
        *schemas = loaded.schemas;
        *tail = wal::Tail::new(loaded.wal_seq);
        *failed = false;
        *group = GroupCommit::after_load(self.wal.is_some(), loaded.wal_seq);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.poisoned.store(false, Ordering::SeqCst);
        self.snapshots.writer_released();
        drop((
            db, writer, batch, group, failed, tail, visible, names, schemas,
        ));
        // Waiters of the generation before learn that it is gone.
        self.group_done.notify_all();
        self.batch_back.notify_all();
        Ok(true)
    }

    /// Refuses a poisoned store's writes, unless its recovery is due and succeeds now.
    fn check_poisoned(&self) -> Result<()> {
        if self.poisoned.load(Ordering::SeqCst) && !self.try_recover() {
            Err(Error::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Poisons the store if a write failed in storage: after a failed fsync nothing on disk
    /// can be trusted until the database is opened again.
    fn finish<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e @ Error::Storage(_)) = &r {
            self.poison(e);
        }
        r
    }

    /// The database, for a transaction: hold the guard for as long as the transaction (see
    /// the `db` field). `Poisoned` while a recovery has not opened it again.
    pub(crate) fn db(&self) -> Result<DbGuard<'_>> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        if db.is_none() {
            return Err(Error::Poisoned);
        }
        Ok(DbGuard(db))
    }

    /// The `objects` table as of now: the kept snapshot, or a new one (see `snapshot.rs`).
    fn snapshot(&self) -> Result<Arc<Snapshot>> {
        self.settle()?;
        self.snapshots
            .current(|| Ok(self.db()?.begin_read()?.open_table(OBJECTS)?))
    }

    /// An object's row as of now, with its collection's id.
    fn read_row(&self, coll: &str, pk: &Pk) -> Result<Option<(Row<'_>, u32)>> {
        let Some(cid) = self.names().by_name.get(coll).copied() else {
            return Ok(None);
        };
        // Settled (and recovered, if it is due) before the database is held.
        self.settle()?;
        let db = self.db()?;
        let snapshot = self.snapshot()?;
        let guard = snapshot.objects.get(object_key(cid, pk).as_slice())?;
        Ok(guard.map(|guard| {
            (
                Row {
                    guard,
                    _snapshot: snapshot,
                    _db: db,
                },
                cid,
            )
        }))
    }

    fn read_state(&self, coll: &str, pk: &Pk) -> Result<Option<(ObjectState<u32>, u32)>> {
        let Some((row, cid)) = self.read_row(coll, pk)? else {
            return Ok(None);
        };
        Ok(Some((decode_state(row.value())?, cid)))
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

    /// Starts a write transaction. Only one runs at a time; others wait.
    pub fn begin(&self) -> Result<WriteTx<'_>> {
        self.check_poisoned()?;
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let guard = lock(&self.writer);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.snapshots.writer_locked();
        Ok(WriteTx {
            store: self,
            writer: WriterGuard { guard, store: self },
            txn: None,
            pending: BTreeMap::new(),
            objects: None,
            new_names: NewNames::default(),
            durability: self.options.durability,
            raw_used: false,
            collection_checked: None,
            log_hook: None,
            aux: Vec::new(),
        })
    }

    /// Runs `f` in a write transaction and commits it if `f` returns `Ok`.
    pub fn write<R>(
        &self,
        f: impl FnOnce(&mut WriteTx<'_>) -> Result<R>,
    ) -> Result<(R, Committed)> {
        let mut tx = self.begin()?;
        let r = f(&mut tx)?;
        let c = tx.commit()?;
        Ok((r, c))
    }

    /// Log entries after position `after`, at most `limit` of them.
    pub fn log_after(&self, after: LogPos, limit: usize) -> Result<Vec<LogEntry>> {
        self.log_within(after, limit, usize::MAX)
    }

    /// Log entries after position `after`, at most `limit` of them, and no more once those
    /// read reach `bytes` stored bytes (at least one: an upload batch; the entries it cannot
    /// take are not decoded, which made uploading a large backlog quadratic).
    pub(crate) fn log_within(
        &self,
        after: LogPos,
        limit: usize,
        bytes: usize,
    ) -> Result<Vec<LogEntry>> {
        self.read_log(after.saturating_add(1).., limit, bytes, |view, e| {
            e.map_names(|id| view.name(id).map(str::to_owned))
        })
    }

    /// The log entries in `range`, at most `limit` of them and no more once those read
    /// reach `bytes` stored bytes (at least one), each decoded and passed through `f` with
    /// the store's names.
    fn read_log<T>(
        &self,
        range: impl std::ops::RangeBounds<LogPos>,
        limit: usize,
        bytes: usize,
        mut f: impl FnMut(&NameView<'_>, LogEntry<u32>) -> Result<T>,
    ) -> Result<Vec<T>> {
        self.settle()?;
        let db = self.db()?;
        let rtx = db.begin_read()?;
        let table = rtx.open_table(LOG)?;
        let names = self.names();
        let view = NameView {
            base: &names,
            new: None,
        };
        let mut out = Vec::new();
        let mut read = 0usize;
        for row in table.range(range)?.take(limit) {
            if read >= bytes && !out.is_empty() {
                break;
            }
            let (_, v) = row?;
            read = read.saturating_add(v.value().len());
            let e: LogEntry<u32> =
                postcard::from_bytes(v.value()).map_err(|e| corrupt(format!("log entry: {e}")))?;
            out.push(f(&view, e)?);
        }
        Ok(out)
    }

    /// The position of the newest log entry (0 if none was ever written).
    pub fn log_head(&self) -> LogPos {
        let _ = self.settle();
        lock(&self.visible).log_next - 1
    }

    /// The highest log position the server has acknowledged.
    pub fn last_sync(&self) -> LogPos {
        lock(&self.writer).last_sync
    }

    /// Entries not yet acknowledged by the server (after [`Store::last_sync`]).
    pub fn unsynced(&self, limit: usize) -> Result<Vec<LogEntry>> {
        self.log_after(self.last_sync(), limit)
    }

    /// Records that the server has acknowledged everything up to `pos` (never moves back),
    /// and removes the entries acknowledged longer ago than
    /// [`Options::keep_acknowledged_for`].
    ///
    /// Not synced to disk by itself: the next durable redb commit (a checkpoint, a prune,
    /// closing) takes it along. A crash before then forgets the acknowledgement, which costs
    /// an upload the server skips (it keeps each client's position and says it on
    /// connecting) and refusals it sends again (kept once), never a write.
    pub fn mark_synced(&self, pos: LogPos) -> Result<()> {
        self.check_poisoned()?;
        let mut w = self.lock_writer()?;
        if pos <= w.last_sync {
            return Ok(());
        }
        let pos = pos.min(w.log_next - 1);
        let mut txn = self.db()?.begin_write()?;
        // Nor is it in the write-ahead file: no record depends on this row (records put
        // `meta` rows whole) or on the entries it prunes (a record carries its own entry,
        // numbered after them), so a replay over a store that lost it is the same replay.
        // Durable, each acknowledgement of a syncing client wrote every page dirtied since
        // the last checkpoint and synced twice.
        txn.set_durability(redb::Durability::None)?;
        txn.open_table(META)?
            .insert(META_LAST_SYNC, pos.to_le_bytes().as_slice())?;
        // Entries acknowledged long enough ago go in the same commit: a crash that forgets
        // it brings them back with the position, and nothing after the position is removed.
        if let Some(keep) = self.options.keep_acknowledged_for {
            let mut log = txn.open_table(LOG)?;
            let upto = self.acknowledged_before(&log, pos, keep)?;
            if upto > 0 {
                log.retain_in(..=upto, |_, _| false)?;
            }
        }
        self.finish(txn.commit().map_err(Error::from))?;
        w.last_sync = pos;
        Ok(())
    }

    /// The last log position up to `pos` whose entry, and every one before it, is older
    /// than `keep` (local stamps rise with the position); 0 if none.
    fn acknowledged_before(
        &self,
        log: &impl ReadableTable<u64, &'static [u8]>,
        pos: LogPos,
        keep: std::time::Duration,
    ) -> Result<LogPos> {
        if keep.is_zero() {
            return Ok(pos);
        }
        let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
        let Some(cutoff) = self.options.time.now_ms().checked_sub(keep_ms) else {
            return Ok(0);
        };
        let mut upto = 0;
        for item in log.range(..=pos)? {
            let (seq, bytes) = item?;
            // An entry starts with its position and stamp: only they are decoded.
            let ((_, stamp), _) = postcard::take_from_bytes::<(LogPos, Stamp)>(bytes.value())
                .map_err(|e| corrupt(format!("log entry {}: {e}", seq.value())))?;
            if stamp.physical_ms() > cutoff {
                break;
            }
            upto = seq.value();
        }
        Ok(upto)
    }

    /// Removes log entries up to `upto`, but never one the server has not acknowledged.
    /// Returns how many were removed.
    pub fn prune_log(&self, upto: LogPos) -> Result<u64> {
        self.check_poisoned()?;
        let w = self.lock_writer()?;
        let upto = upto.min(w.last_sync);
        let txn = self.db()?.begin_write()?;
        let mut removed = 0;
        {
            let mut log = txn.open_table(LOG)?;
            log.retain_in(..=upto, |_, _| {
                removed += 1;
                false
            })?;
        }
        self.finish(txn.commit().map_err(Error::from))?;
        Ok(removed)
    }

    /// This store's own log entries after `after`, as a changeset.
    pub fn export(&self, after: LogPos, limit: usize) -> Result<Changeset> {
        Ok(Changeset {
            origin: self.replica,
            entries: self.log_after(after, limit)?,
        })
    }

    /// Decodes, validates and imports a changeset's bytes (see [`Store::import`]).
    pub fn import_bytes(&self, bytes: &[u8]) -> Result<ImportReport> {
        let cs = Changeset::decode(bytes, self.options.value_bytes_max)?;
        self.import(&cs)
    }

    /// Merges another replica's changes, field by field, by stamp. All or nothing: a change
    /// that is invalid, breaks a schema, or carries a stamp too far in the future refuses the
    /// whole changeset and leaves the store untouched. Imported writes do not enter this
    /// store's Updates log (it records local writes).
    pub fn import(&self, cs: &Changeset) -> Result<ImportReport> {
        self.import_with(cs, |_, _| Ok(())).map(|(r, ())| r)
    }

    /// Imports a changeset and runs `extra` inside the same redb transaction, so sync
    /// bookkeeping (history, cursors) commits atomically with the state it describes.
    pub(crate) fn import_with<R>(
        &self,
        cs: &Changeset,
        extra: impl FnOnce(&mut WriteTx<'_>, &ImportReport) -> Result<R>,
    ) -> Result<(ImportReport, R)> {
        cs.validate(self.options.value_bytes_max)?;
        let mut tx = self.begin()?;
        let now = self.options.time.now_ms();
        for e in &cs.entries {
            tx.writer
                .hlc
                .check(e.stamp, now)
                .map_err(|d| Error::ClockDrift {
                    stamp: d.stamp,
                    now_ms: d.now_ms,
                    max_drift_ms: self.options.max_drift_ms,
                })?;
            for w in &e.writes {
                check_remote_schema(self, w)?;
            }
        }
        let mut report = ImportReport::default();
        let mut max_time = 0;
        for e in &cs.entries {
            max_time = max_time.max(e.stamp.time);
            for w in &e.writes {
                tx.merge_remote(w, e.stamp, &mut report)?;
            }
        }
        tx.writer.hlc.observe(max_time);
        let r = extra(&mut tx, &report)?;
        tx.commit()?;
        Ok((report, r))
    }

    /// A read snapshot, for modules that keep their own tables in this database.
    pub(crate) fn read_txn(&self) -> Result<ReadTxn<'_>> {
        self.settle()?;
        let db = self.db()?;
        Ok(ReadTxn {
            txn: db.begin_read()?,
            _db: db,
        })
    }
}

/// Fields as the application passes them, names checked.
fn user_fields<K: Into<String>, V: Into<Value>>(
    fields: impl IntoIterator<Item = (K, V)>,
) -> Result<Vec<(String, Value)>> {
    let fields: Vec<(String, Value)> = fields
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    user_names(&fields)?;
    Ok(fields)
}

/// Application code names its own fields; `__` names belong to the engine.
fn user_names(fields: &[(String, Value)]) -> Result<()> {
    fields
        .iter()
        .try_for_each(|(name, _)| validate_name(NameKind::Field, name))
}

impl Store {
    /// Checks one incoming write against this store's schema.
    pub(crate) fn check_write_schema(&self, w: &Write) -> Result<()> {
        check_remote_schema(self, w)
    }
}

fn check_remote_schema(store: &Store, w: &Write) -> Result<()> {
    let Some(schema) = store.schema_of(&w.collection) else {
        return Ok(());
    };
    match &w.op {
        Op::Insert { fields } => {
            for (f, v) in fields {
                schema.check_value(&w.pk, f, v)?;
            }
            schema.check_complete(&w.pk, |name| {
                fields.iter().find(|(f, _)| f == name).map(|(_, v)| v)
            })
        }
        Op::Update { fields } => fields
            .iter()
            .try_for_each(|fw| schema.check_value(&w.pk, &fw.field, &fw.value)),
        Op::Delete { .. } => Ok(()),
    }
}

/// The net effect of a transaction's calls on one object so far.
#[derive(Debug)]
enum NetOp {
    Insert(BTreeMap<String, Value>),
    Update(BTreeMap<String, Value>),
    Delete,
}

/// An object's row as a transaction read it. Decoded only where a path needs the whole
/// state: a local update of a live object patches the bytes instead (`row::Parsed`).
#[derive(Debug)]
struct Before {
    row: Vec<u8>,
    state: std::cell::OnceCell<ObjectState<u32>>,
}

impl Before {
    fn new(row: Vec<u8>) -> Before {
        Before {
            row,
            state: std::cell::OnceCell::new(),
        }
    }

    fn state(&self) -> Result<&ObjectState<u32>> {
        if let Some(s) = self.state.get() {
            return Ok(s);
        }
        let s = decode_state(&self.row)?;
        Ok(self.state.get_or_init(|| s))
    }

    fn into_state(self) -> Result<ObjectState<u32>> {
        match self.state.into_inner() {
            Some(s) => Ok(s),
            None => decode_state(&self.row),
        }
    }

    fn is_live(&self) -> Result<bool> {
        match self.state.get() {
            Some(s) => Ok(s.is_live()),
            None => row::is_live(&self.row),
        }
    }
}

/// Fields (by name id) and their values, all written at one stamp: a write-ahead patch.
type StampedFields = (Stamp, Vec<(u32, Value)>);

/// A pending object's remote writes, taken out as `(field, stamp, value)`, by field.
fn take_remote(remote: &mut BTreeMap<u32, (Stamp, Value)>) -> Vec<(u32, Stamp, Value)> {
    std::mem::take(remote)
        .into_iter()
        .map(|(f, (s, v))| (f, s, v))
        .collect()
}

impl Pending {
    /// The state after what was merged so far (taken out of `after`, or copied from the
    /// row as read), to merge more into.
    fn take_state(&mut self) -> Result<ObjectState<u32>> {
        Ok(match (self.after.take(), &self.before) {
            (Some(after), _) => after,
            (None, Some(before)) => before.state()?.clone(),
            (None, None) => ObjectState::default(),
        })
    }

    /// Moves the unapplied remote writes into `after`, for paths that need the whole state.
    fn settle(&mut self) -> Result<()> {
        if self.remote.is_empty() {
            return Ok(());
        }
        let mut state = self.take_state()?;
        state.apply_fields(take_remote(&mut self.remote));
        self.after = Some(state);
        Ok(())
    }
}

#[derive(Debug)]
struct Pending {
    coll: u32,
    pk: Pk,
    before: Option<Before>,
    /// Local calls in this transaction, applied at commit with its stamp.
    op: Option<NetOp>,
    /// The state after merging remote writes in this transaction (local calls apply on top).
    after: Option<ObjectState<u32>>,
    /// Remote field writes that won against a live row, not yet applied: field → `(stamp,
    /// value)`. Kept apart so commit can patch the row's bytes; only while `op` and `after`
    /// are `None` ([`Pending::settle`] folds them in).
    remote: BTreeMap<u32, (Stamp, Value)>,
    /// Remove the row instead of writing it (the object left this client's view).
    purge: bool,
}

/// A write transaction. Calls that fail leave the transaction as it was; nothing reaches the
/// store until [`WriteTx::commit`]; dropping it rolls back.
pub struct WriteTx<'s> {
    store: &'s Store,
    writer: WriterGuard<'s>,
    /// Begun by [`WriteTx::raw`], or at commit (which may join an open batch's instead).
    /// Whatever writes through it outside `prepare` must set `raw_used`: the write-ahead
    /// record holds only what `prepare` writes, so such a commit must be a durable redb one.
    txn: Option<redb::WriteTransaction>,
    pending: BTreeMap<Vec<u8>, Pending>,
    /// The `objects` table as of the transaction's start, for reads.
    objects: Option<redb::ReadOnlyTable<&'static [u8], &'static [u8]>>,
    new_names: NewNames,
    durability: Durability,
    /// Another module wrote its own tables through [`WriteTx::raw`]; commit even if no
    /// object changed.
    raw_used: bool,
    /// The last collection name checked (`intern`): one per write would be the check again.
    collection_checked: Option<u32>,
    /// Runs inside the commit with the transaction's log entry and returns rows to put with
    /// it (the server records its own writes into its history in the same transaction).
    log_hook: Option<LogHook<'s>>,
    /// Rows of other modules' tables, put at commit and recorded with the rest.
    aux: Vec<wal::Aux>,
}

/// See [`WriteTx::on_log_entry`].
type LogHook<'s> = Box<dyn FnOnce(&LogEntry) -> Result<Vec<wal::Aux>> + 's>;

impl std::fmt::Debug for WriteTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTx")
            .field("objects", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<'s> WriteTx<'s> {
    /// Puts a row into a table another module keeps in this database, at commit. Unlike
    /// [`WriteTx::raw`], the row goes into the write-ahead record, so the commit can be a
    /// record (an append and a sync) rather than a durable redb commit.
    pub(crate) fn put_aux(&mut self, row: wal::Aux) {
        self.aux.push(row);
    }

    /// The underlying redb transaction, for tables other modules keep in this database.
    pub(crate) fn raw(&mut self) -> Result<&redb::WriteTransaction> {
        self.raw_used = true;
        if self.txn.is_none() {
            // A transaction of its own: the batch's members must not depend on whether this
            // one commits. Objects read from the batch are in `pending`; later reads see it
            // committed.
            let r = self.store.close_batch();
            self.store.finish(r)?;
            self.objects = None;
            self.txn = Some(self.store.db()?.begin_write()?);
        }
        match &self.txn {
            Some(txn) => Ok(txn),
            None => Err(corrupt("no write transaction")),
        }
    }

    /// The transaction [`WriteTx::raw`] began.
    fn txn_ref(&self) -> Result<&redb::WriteTransaction> {
        self.txn
            .as_ref()
            .ok_or_else(|| corrupt("no write transaction"))
    }

    /// Runs `hook` inside the commit with this transaction's log entry, if it makes one; the
    /// rows it returns are put (and recorded) like [`WriteTx::put_aux`]'s.
    pub(crate) fn on_log_entry(
        &mut self,
        hook: impl FnOnce(&LogEntry) -> Result<Vec<wal::Aux>> + 's,
    ) {
        self.log_hook = Some(Box::new(hook));
    }

    /// Chooses this commit's durability.
    pub fn set_durability(&mut self, d: Durability) {
        self.durability = d;
    }

    fn intern(&mut self, kind: NameKind, name: &str) -> Result<u32> {
        let names = self.store.names();
        let view = NameView {
            base: &names,
            new: Some(&self.new_names),
        };
        // A name already interned was checked when it was, as a field's or a collection's
        // (they share the table, and a field's may not do for a collection: those are
        // checked once per transaction).
        let checked = |name| match kind {
            NameKind::Field => crdt::validate_field_name(name),
            NameKind::Collection => validate_name(kind, name),
        };
        if let Some(id) = view.id(name) {
            if kind == NameKind::Collection && self.collection_checked != Some(id) {
                checked(name)?;
                self.collection_checked = Some(id);
            }
            return Ok(id);
        }
        checked(name)?;
        let id = u32::try_from(names.by_id.len() + self.new_names.len())
            .map_err(|_| corrupt("name table full"))?;
        drop(names);
        self.new_names.push(name);
        Ok(id)
    }

    /// Loads the object into `pending` (once), with any remote writes merged into `after`,
    /// and returns its key.
    fn load(&mut self, coll: &str, pk: &Pk) -> Result<Vec<u8>> {
        let key = self.load_unsettled(coll, pk)?;
        if let Some(p) = self.pending.get_mut(&key) {
            p.settle()?;
        }
        Ok(key)
    }

    /// [`WriteTx::load`] leaving remote writes in `Pending::remote`.
    fn load_unsettled(&mut self, coll: &str, pk: &Pk) -> Result<Vec<u8>> {
        pk.validate()?;
        let cid = self.intern(NameKind::Collection, coll)?;
        let key = object_key(cid, pk);
        if !self.pending.contains_key(&key) {
            // Reads go through a read-only table opened once per transaction: opening the
            // write table per object cost more than the lookup. It sees what `txn` sees:
            // objects are written only at commit, and no other commit runs meanwhile.
            let batch = lock(&self.store.batch);
            let in_batch = match &*batch {
                // The batch's members wrote into its transaction, not yet committed. (If a
                // member commits it meanwhile, `objects` was never opened: the next read
                // opens it and sees the batch committed.)
                Some(b) => Some(b.txn.with_dependent(|_, t| {
                    Ok::<_, Error>(
                        t.objects
                            .get(key.as_slice())?
                            .map(|r| Before::new(r.value().to_vec())),
                    )
                })?),
                None => None,
            };
            drop(batch);
            let before = match in_batch {
                Some(before) => before,
                None => {
                    if self.objects.is_none() {
                        self.objects = Some(self.store.db()?.begin_read()?.open_table(OBJECTS)?);
                    }
                    match &self.objects {
                        Some(table) => table
                            .get(key.as_slice())?
                            .map(|r| Before::new(r.value().to_vec())),
                        None => None,
                    }
                }
            };
            self.pending.insert(
                key.clone(),
                Pending {
                    coll: cid,
                    pk: pk.clone(),
                    before,
                    op: None,
                    after: None,
                    remote: BTreeMap::new(),
                    purge: false,
                },
            );
        }
        Ok(key)
    }

    /// Whether the object is live as this transaction sees it (without building it).
    fn live(&self, key: &[u8]) -> Result<bool> {
        let Some(p) = self.pending.get(key) else {
            return Ok(false);
        };
        match &p.op {
            Some(NetOp::Insert(_)) => Ok(true),
            Some(NetOp::Delete) => Ok(false),
            None | Some(NetOp::Update(_)) => match (&p.after, &p.before) {
                (Some(after), _) => Ok(after.is_live()),
                (None, Some(before)) => before.is_live(),
                (None, None) => Ok(false),
            },
        }
    }

    /// The object as this transaction sees it: `None` if it is not live.
    fn view(&self, key: &[u8]) -> Result<Option<BTreeMap<String, Value>>> {
        let Some(p) = self.pending.get(key) else {
            return Ok(None);
        };
        let names = self.store.names();
        let view = NameView {
            base: &names,
            new: Some(&self.new_names),
        };
        let state = match (&p.after, &p.before) {
            (Some(after), _) => Some(after),
            (None, Some(before)) => Some(before.state()?),
            (None, None) => None,
        };
        let base = match state {
            Some(s) if s.is_live() => Some(view.live_fields(s)?),
            _ => None,
        };
        Ok(match &p.op {
            None => base,
            Some(NetOp::Insert(f)) => Some(f.clone()),
            Some(NetOp::Update(f)) => base.map(|mut b| {
                b.extend(f.iter().map(|(k, v)| (k.clone(), v.clone())));
                b
            }),
            Some(NetOp::Delete) => None,
        })
    }

    fn check_fields(
        &mut self,
        coll: &str,
        pk: &Pk,
        fields: Vec<(String, Value)>,
    ) -> Result<BTreeMap<String, Value>> {
        let schema = self.store.schema_of(coll);
        let max = self.store.options.value_bytes_max;
        let mut out = BTreeMap::new();
        for (name, value) in fields {
            self.intern(NameKind::Field, &name)?;
            if value.size_bytes() > max {
                return Err(Error::ValueTooLarge {
                    collection: coll.to_owned(),
                    pk: pk.clone(),
                    field: name,
                    size: value.size_bytes(),
                    max,
                });
            }
            if let Some(s) = &schema {
                s.check_value(pk, &name, &value)?;
            }
            out.insert(name, value);
        }
        Ok(out)
    }

    fn not_found(coll: &str, pk: &Pk) -> Error {
        Error::NotFound {
            collection: coll.to_owned(),
            pk: pk.clone(),
        }
    }

    /// Creates an object. Fails if it is live already.
    pub fn insert<K, V>(
        &mut self,
        collection: &str,
        pk: impl Into<Pk>,
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> Result<()>
    where
        K: Into<String>,
        V: Into<Value>,
    {
        let fields = user_fields(fields)?;
        self.insert_fields(collection, pk.into(), fields)
    }

    fn insert_fields(&mut self, coll: &str, pk: Pk, fields: Vec<(String, Value)>) -> Result<()> {
        let mark = self.new_names.len();
        let r = self.insert_inner(coll, &pk, fields);
        self.rollback_on_err(r, mark)
    }

    fn insert_inner(&mut self, coll: &str, pk: &Pk, fields: Vec<(String, Value)>) -> Result<()> {
        let key = self.load(coll, pk)?;
        if self.live(&key)? {
            return Err(Error::AlreadyExists {
                collection: coll.to_owned(),
                pk: pk.clone(),
            });
        }
        let fields = self.check_fields(coll, pk, fields)?;
        if let Some(s) = self.store.schema_of(coll) {
            s.check_complete(pk, |name| fields.get(name))?;
        }
        if let Some(p) = self.pending.get_mut(&key) {
            p.op = Some(NetOp::Insert(fields));
        }
        Ok(())
    }

    /// Sets fields of a live object. Fails if it is not live.
    pub fn update<K, V>(
        &mut self,
        collection: &str,
        pk: impl Into<Pk>,
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> Result<()>
    where
        K: Into<String>,
        V: Into<Value>,
    {
        let pk = pk.into();
        let fields = user_fields(fields)?;
        let mark = self.new_names.len();
        let r = self.update_inner(collection, &pk, fields);
        self.rollback_on_err(r, mark)
    }

    /// Adds `delta` to a counter field of a live object. Concurrent increments on other
    /// replicas add up; the field reads as the sum.
    pub fn increment(
        &mut self,
        collection: &str,
        pk: impl Into<Pk>,
        field: &str,
        delta: i64,
    ) -> Result<()> {
        let pk = pk.into();
        validate_name(NameKind::Field, field)?;
        let part = crdt::sub_field(crdt::Kind::Counter, field, self.store.replica);
        let mark = self.new_names.len();
        let r = (|| {
            let key = self.load(collection, &pk)?;
            let Some(current) = self.view(&key)? else {
                return Err(Self::not_found(collection, &pk));
            };
            let mine = match current.get(&part) {
                Some(Value::Int(n)) => *n,
                _ => 0,
            };
            let total = mine.checked_add(delta).ok_or_else(|| Error::Conversion {
                reason: format!("counter {collection}[{pk}].{field} would overflow"),
            })?;
            self.update_inner(collection, &pk, vec![(part.clone(), Value::Int(total))])
        })();
        self.rollback_on_err(r, mark)
    }

    /// Edits a text field of a live object: deletes `delete` characters at `pos` and
    /// inserts `insert` there. Concurrent edits from other replicas merge character by
    /// character; the field reads as the merged text.
    pub fn edit_text(
        &mut self,
        collection: &str,
        pk: impl Into<Pk>,
        field: &str,
        pos: usize,
        delete: usize,
        insert: &str,
    ) -> Result<()> {
        let pk = pk.into();
        validate_name(NameKind::Field, field)?;
        let part = crdt::sub_field(crdt::Kind::Text, field, self.store.replica);
        let mark = self.new_names.len();
        let r = (|| {
            let key = self.load(collection, &pk)?;
            let Some(current) = self.view(&key)? else {
                return Err(Self::not_found(collection, &pk));
            };
            let parts = current
                .iter()
                .filter_map(|(name, v)| match (crdt::parse_sub(name), v) {
                    (Some((crdt::Kind::Text, parent, _)), Value::Bytes(b)) if parent == field => {
                        Some(b.as_slice())
                    }
                    _ => None,
                });
            let mine = crdt::splice(parts, self.store.replica, pos, delete, insert)?;
            self.update_inner(collection, &pk, vec![(part.clone(), Value::Bytes(mine))])
        })();
        self.rollback_on_err(r, mark)
    }

    fn update_inner(&mut self, coll: &str, pk: &Pk, fields: Vec<(String, Value)>) -> Result<()> {
        let key = self.load(coll, pk)?;
        if !self.live(&key)? {
            return Err(Self::not_found(coll, pk));
        }
        let fields = self.check_fields(coll, pk, fields)?;
        if fields.is_empty() {
            return Ok(());
        }
        if let Some(p) = self.pending.get_mut(&key) {
            match &mut p.op {
                Some(NetOp::Insert(f)) | Some(NetOp::Update(f)) => f.extend(fields),
                _ => p.op = Some(NetOp::Update(fields)),
            }
        }
        Ok(())
    }

    /// Sets one field of a live object.
    pub fn set(
        &mut self,
        collection: &str,
        pk: impl Into<Pk>,
        field: &str,
        value: impl Into<Value>,
    ) -> Result<()> {
        self.update(collection, pk, [(field, value.into())])
    }

    /// Deletes a live object. Fails if it is not live.
    pub fn delete(&mut self, collection: &str, pk: impl Into<Pk>) -> Result<()> {
        let pk = pk.into();
        let mark = self.new_names.len();
        let r = (|| {
            let key = self.load(collection, &pk)?;
            if !self.live(&key)? {
                return Err(Self::not_found(collection, &pk));
            }
            if let Some(p) = self.pending.get_mut(&key) {
                p.op = Some(NetOp::Delete);
            }
            Ok(())
        })();
        self.rollback_on_err(r, mark)
    }

    /// Writes a `#[derive(Serialize)]` value as an object: inserts it if it is not live,
    /// otherwise writes only the fields whose values differ from the stored ones. Returns
    /// the number of field writes this made.
    pub fn put<T: Serialize + ?Sized>(
        &mut self,
        collection: &str,
        pk: impl Into<Pk>,
        value: &T,
    ) -> Result<usize> {
        let pk = pk.into();
        let fields = to_fields(value)?;
        user_names(&fields)?;
        let mark = self.new_names.len();
        let key = match self.load(collection, &pk) {
            Ok(k) => k,
            Err(e) => return self.rollback_on_err(Err(e), mark),
        };
        match self.view(&key)? {
            None => {
                let n = fields.len();
                self.insert_fields(collection, pk, fields).map(|()| n)
            }
            Some(current) => {
                // Counters and texts change only through increment and edit_text.
                let merged: std::collections::HashSet<String> = current
                    .keys()
                    .filter_map(|k| crdt::parse_sub(k).map(|(_, parent, _)| parent.to_owned()))
                    .collect();
                let changed: Vec<_> = fields
                    .into_iter()
                    .filter(|(k, v)| !merged.contains(k) && current.get(k) != Some(v))
                    .collect();
                let n = changed.len();
                let r = self.update_inner(collection, &pk, changed).map(|()| n);
                self.rollback_on_err(r, mark)
            }
        }
    }

    /// Writes the object again exactly as this transaction sees it, stamped by this
    /// transaction: a live object is re-inserted (clearing every field written before),
    /// a missing or deleted one is deleted. Older writes to it lose to this on every
    /// replica: how the server reverts a write it refused.
    pub(crate) fn reassert(&mut self, collection: &str, pk: &Pk) -> Result<()> {
        let key = self.load(collection, pk)?;
        let current = self.view(&key)?;
        if let Some(p) = self.pending.get_mut(&key) {
            p.op = Some(match current {
                Some(fields) => NetOp::Insert(fields),
                None => NetOp::Delete,
            });
        }
        Ok(())
    }

    /// Reads an object as this transaction sees it (including its own writes).
    pub fn get(&mut self, collection: &str, pk: impl Into<Pk>) -> Result<Option<Object>> {
        let pk = pk.into();
        let mark = self.new_names.len();
        let key = match self.load(collection, &pk) {
            Ok(k) => k,
            Err(e) => return self.rollback_on_err(Err(e), mark),
        };
        match self.view(&key)? {
            Some(fields) => Ok(Some(Object {
                pk,
                fields: crdt::fold(fields)?,
            })),
            None => Ok(None),
        }
    }

    /// Names a failed call interned are forgotten, so the call leaves no trace.
    fn rollback_on_err<T>(&mut self, r: Result<T>, mark: usize) -> Result<T> {
        if r.is_err() {
            self.new_names.truncate(mark);
            let names_len = self.store.names().by_id.len() + mark;
            self.pending.retain(|_, p| {
                p.op.is_some()
                    || p.after.is_some()
                    || !p.remote.is_empty()
                    || (p.coll as usize) < names_len
            });
        }
        r
    }

    /// Merges one remote write into the transaction.
    fn merge_remote(&mut self, w: &Write, stamp: Stamp, report: &mut ImportReport) -> Result<()> {
        let key = self.load_unsettled(&w.collection, &w.pk)?;
        let mut field_ids = Vec::new();
        match &w.op {
            Op::Insert { fields } => {
                for (f, _) in fields {
                    field_ids.push(self.intern(NameKind::Field, f)?);
                }
            }
            Op::Update { fields } => {
                for fw in fields {
                    field_ids.push(self.intern(NameKind::Field, &fw.field)?);
                }
            }
            Op::Delete { .. } => {}
        }
        let Some(p) = self.pending.get_mut(&key) else {
            return Ok(());
        };
        // An update of a live row with nothing else pending (the common case): keep the
        // winning writes apart, judged against the row's stamps without decoding it, so
        // commit patches the row's bytes.
        if let (Op::Update { fields }, None, None, Some(before)) =
            (&w.op, &p.op, &p.after, &p.before)
        {
            if let Some(parsed) = row::parse(&before.row)?.filter(row::Parsed::is_live) {
                let floor = parsed.floor();
                for (fw, &id) in fields.iter().zip(&field_ids) {
                    let current = match p.remote.get(&id) {
                        Some((s, _)) => Some(*s),
                        None => parsed.field_stamp(id),
                    };
                    if stamp < floor || current.is_some_and(|c| c >= stamp) {
                        report.stale += 1;
                        continue;
                    }
                    p.remote.insert(id, (stamp, fw.value.clone()));
                    report.applied += 1;
                }
                return Ok(());
            }
        }
        p.settle()?;
        let mut state = p.take_state()?;
        let mut count = |o: Outcome| match o {
            Outcome::Applied => report.applied += 1,
            Outcome::Stale => report.stale += 1,
        };
        let values: Vec<&Value> = match &w.op {
            Op::Insert { fields } => {
                count(state.apply_exists(stamp, true));
                fields.iter().map(|(_, v)| v).collect()
            }
            Op::Update { fields } => fields.iter().map(|fw| &fw.value).collect(),
            Op::Delete { .. } => {
                count(state.apply_exists(stamp, false));
                Vec::new()
            }
        };
        let writes = field_ids
            .into_iter()
            .zip(values)
            .map(|(id, v)| (id, stamp, v.clone()))
            .collect();
        state.apply_fields(writes).into_iter().for_each(count);
        p.after = Some(state);
        Ok(())
    }

    /// Commits: one stamp for every write, state and log entry in one redb transaction.
    /// In-memory state (clock, digest, counts, names) moves only once redb has committed.
    pub fn commit(mut self) -> Result<Committed> {
        self.check_served_commit()?;
        let store = self.store;
        let r = (move || {
            // Join the open batch (its transaction holds the members' writes), or start.
            let mut joined = None;
            let open = lock(&store.batch).take();
            let mut txn = match (self.txn.take(), open) {
                (Some(txn), None) => OpenTxn::open(txn)?,
                (None, Some(b)) => {
                    joined = Some(b.members);
                    b.txn
                }
                (None, None) => OpenTxn::open(store.db()?.begin_write()?)?,
                (Some(txn), Some(b)) => {
                    // `raw` commits any open batch before it begins its own transaction.
                    store.abandon_batch(&"two write transactions");
                    drop((txn, b.txn));
                    return Err(corrupt("two write transactions"));
                }
            };
            // What fails from here until this transaction is in the batch fails the batch
            // (its transaction is dropped; its members' records are replayed by the recovery).
            let mut taken = JoinedBatch {
                store,
                taken: joined.is_some(),
            };
            let prepared = match txn.with_dependent_mut(|txn, tables| self.prepare(txn, tables)) {
                Ok(prepared) => prepared,
                // Refused before anything was written: the batch goes on as it was.
                Err(e @ Error::TooManyFields { .. }) => {
                    if let Some(members) = joined {
                        taken.taken = false;
                        store.put_back_batch(Batch { txn, members });
                    }
                    return Err(e);
                }
                Err(e) => return Err(e),
            };
            let Some(mut p) = prepared else {
                // Nothing written: the batch goes on as it was.
                if let Some(members) = joined {
                    taken.taken = false;
                    store.put_back_batch(Batch { txn, members });
                }
                return Ok(Committed {
                    seq: None,
                    stamp: None,
                });
            };
            let WriteTx {
                mut writer,
                new_names,
                durability,
                ..
            } = self;
            if let (Some(wal), Some(record)) = (&store.wal, p.record.take()) {
                // Recorded: appended to the write-ahead file, then committed to redb without
                // fsync — by itself, or in one redb commit with the writers waiting behind it.
                let at = writer.wal_at;
                let appended = (|| {
                    let end = at + record.len() as u64;
                    if end > writer.wal_len {
                        // Backends may refuse writes past the end; grow in steps, not per record.
                        let len = end.next_multiple_of(WAL_GROWTH);
                        wal.set_len(len).map_err(redb::Error::from)?;
                        writer.wal_len = len;
                    }
                    Ok::<_, Error>(end)
                })();
                // On failure nothing of this transaction is in the file.
                let end = appended?;
                writer.wal_at = end;
                writer.wal_seq += 1;
                let record_len = record.len();
                lock(&store.wal_tail).push(at, record, writer.wal_seq);
                store.add_names(new_names.by_pos);
                writer.apply(p.digest, p.counts, p.committed.seq);
                let mut members = joined.unwrap_or_else(|| Members {
                    count: 0,
                    bytes: 0,
                    visible: Visible::default(),
                    head: None,
                });
                members.count += 1;
                members.bytes += record_len;
                let full = members.bytes > store.batch_bytes_max();
                members.head = p.head.take();
                members.visible = writer.visible();
                let seq = writer.wal_seq;
                let generation = store.generation.load(Ordering::SeqCst);
                taken.taken = false;
                store.put_back_batch(Batch { txn, members });
                if full || writer.wal_at >= store.options.checkpoint_bytes {
                    store.close_batch()?;
                    if writer.wal_at >= store.options.checkpoint_bytes {
                        store.checkpoint_with(&mut writer, false)?;
                    }
                }
                // Released with the batch full, the lock commits it (`WriterGuard`).
                drop(writer);
                // The sync covers this record as soon as it is appended, while the writers
                // behind this one fill the batch. A deferred commit writes its record (a
                // process that dies keeps it; a machine that does may not). Either way the
                // batch stays open: the next reader commits it.
                if durability == Durability::Immediate {
                    store.wait_durable(seq, generation)?;
                } else {
                    store.write_tail(wal.as_ref(), generation)?;
                }
                return Ok(p.committed);
            }
            let mode = match &store.wal {
                // Nothing may sit in redb unrecorded while commits go to the write-ahead
                // file: a commit that cannot be recorded is durable by itself (and makes the
                // batch it joined durable with it).
                Some(_) => Mode::Direct,
                // With other writers waiting (or a flush under way), a durable commit joins
                // a group: commit without fsync now, then wait for one fsync for all.
                None if durability == Durability::Deferred => Mode::Deferred,
                None if store.waiting.load(Ordering::SeqCst) > 0 || lock(&store.group).flushing => {
                    Mode::Grouped
                }
                None => Mode::Direct,
            };
            let mut txn = txn.close();
            txn.set_durability(if matches!(mode, Mode::Direct) {
                redb::Durability::Immediate
            } else {
                redb::Durability::None
            })?;
            store.add_names(new_names.by_pos);
            if let Err(e) = txn.commit() {
                // Its names are in memory: nothing more may commit before a recovery.
                let e = Error::from(e);
                store.poison(&e);
                return Err(e);
            }
            let generation = store.generation.load(Ordering::SeqCst);
            let number = {
                let mut g = lock(&store.group);
                g.committed += 1;
                if matches!(mode, Mode::Direct) {
                    g.durable = store.flush_target(&g);
                }
                g.committed
            };
            if matches!(mode, Mode::Direct) {
                store.restart_wal(&mut writer);
            }
            writer.apply(p.digest, p.counts, p.committed.seq);
            *lock(&store.visible) = writer.visible();
            if joined.is_some() {
                // The batch committed with this transaction.
                taken.taken = false;
                store.settled(&lock(&store.batch));
            }
            drop(writer);
            if matches!(mode, Mode::Grouped) {
                store.wait_durable(number, generation)?;
            }
            Ok(p.committed)
        })();
        store.finish(r)
    }

    fn prepare(
        &mut self,
        txn: &redb::WriteTransaction,
        tables: &mut Tables<'_>,
    ) -> Result<Option<Prepared>> {
        let has_local = self.pending.values().any(|p| p.op.is_some());
        let has_remote = self
            .pending
            .values()
            .any(|p| p.after.is_some() || !p.remote.is_empty());
        if !has_local && !has_remote && !self.raw_used && self.aux.is_empty() {
            return Ok(None);
        }
        let now = self.store.options.time.now_ms();
        let stamp = Stamp {
            time: if has_local {
                self.writer.hlc.tick(now)
            } else {
                self.writer.hlc.high_water()
            },
            replica: self.store.replica,
        };
        // Rows for the write-ahead file; other modules' tables written through `raw` are not
        // recorded, so a transaction that wrote them commits to redb durably instead.
        let mut redo = (self.store.wal.is_some() && !self.raw_used).then(Vec::new);
        // A record pays when it is small beside the redb pages the transaction dirties: a
        // 1,000-update batch is ~135 KB of log entry against ~4 MB of pages (1.3 × faster
        // as a record, when it was ~250 KB), but 1,000 inserts are ~2 MB of whole rows,
        // about the pages they fill, and faster as a durable redb commit (written once, not
        // twice). So whole rows may take 1/64 of the file, and a record a quarter of it.
        let cb = self.store.options.checkpoint_bytes;
        let record_max = (cb / 4).min(wal::RECORD_BYTES_MAX / 4);
        let rows_max = (cb / 64).max(4096).min(record_max);
        let mut record_bytes = 0u64;
        let mut row_bytes = 0u64;
        let names = self.store.names();
        let view = NameView {
            base: &names,
            new: Some(&self.new_names),
        };
        let mut writes: Vec<Write<u32>> = Vec::new();
        // The writes the record replays as patches from the log entry (`Redo::LogPatches`).
        let mut log_patches: Vec<u32> = Vec::new();
        let mut digest = self.writer.digest;
        let mut count_delta: BTreeMap<u32, i64> = BTreeMap::new();
        {
            let objects = &mut tables.objects;
            // New objects' rows, in key order, inserted together once the loop is done.
            let mut fresh: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            // The other objects' rows (`None`: removed), written once the loop is done.
            let mut rows: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
            for (key, p) in &mut self.pending {
                if p.op.is_none() && p.after.is_none() && p.remote.is_empty() {
                    continue;
                }
                let before = p.before.take();
                let absent = before.is_none();
                let coll = view.name(p.coll)?;
                // Field writes to a live object, either all local or all remote (the common
                // cases): patch the row's bytes without decoding its values, and move the
                // digest by the written fields' terms alone.
                let patchable = p.after.is_none()
                    && !p.purge
                    && match &p.op {
                        Some(NetOp::Update(_)) => true,
                        None => !p.remote.is_empty(),
                        _ => false,
                    };
                let parsed = match &before {
                    Some(b) if patchable => row::parse(&b.row)?.filter(row::Parsed::is_live),
                    _ => None,
                };
                // What the write-ahead record holds for the fast path: the fields by stamp,
                // not the row (none for a local update: the log entry has them).
                let mut patch: Option<Vec<StampedFields>> = None;
                let mut op = p.op.take();
                // Fields the row held and holds after: for the cap on fields per object.
                let mut width = (0, 0);
                let fast = match (&parsed, &mut op) {
                    (Some(parsed), None) => {
                        let remote = take_remote(&mut p.remote);
                        let sets: Vec<(u32, Stamp, &Value)> =
                            remote.iter().map(|(f, s, v)| (*f, *s, v)).collect();
                        let patched = parsed.patch(&sets);
                        drop(sets);
                        width = (parsed.field_count(), patched.fields);
                        // The record's patches by stamp, in the order first seen.
                        let mut by_stamp: Vec<StampedFields> = Vec::new();
                        let mut stamp_at: HashMap<Stamp, usize> = HashMap::new();
                        for ((id, s, value), applied) in remote.into_iter().zip(patched.applied) {
                            if !applied {
                                continue;
                            }
                            let old = parsed.field(id)?;
                            let term = (coll, &p.pk, view.name(id)?);
                            replace_term(&mut digest, term, old.as_ref(), (s, &value));
                            if redo.is_some() {
                                let at = *stamp_at.entry(s).or_insert_with(|| {
                                    by_stamp.push((s, Vec::new()));
                                    by_stamp.len() - 1
                                });
                                by_stamp[at].1.push((id, value));
                            }
                        }
                        patch = Some(by_stamp);
                        Some(patched.row)
                    }
                    (Some(parsed), Some(NetOp::Update(fields))) => {
                        let fields = std::mem::take(fields);
                        let mut ids = Vec::with_capacity(fields.len());
                        for name in fields.keys() {
                            ids.push(view.id(name).ok_or_else(|| corrupt("uninterned field"))?);
                        }
                        let sets: Vec<(u32, Stamp, &Value)> = ids
                            .iter()
                            .copied()
                            .zip(fields.values())
                            .map(|(id, v)| (id, stamp, v))
                            .collect();
                        let patched = parsed.patch(&sets);
                        drop(sets);
                        width = (parsed.field_count(), patched.fields);
                        let mut logged = Vec::with_capacity(fields.len());
                        for (((name, value), id), applied) in
                            fields.into_iter().zip(ids).zip(patched.applied)
                        {
                            let old = parsed.field(id)?;
                            if applied {
                                let term = (coll, &p.pk, name.as_str());
                                replace_term(&mut digest, term, old.as_ref(), (stamp, &value));
                            }
                            logged.push(FieldWrite {
                                field: id,
                                value,
                                base: old.map(|(s, _)| s),
                            });
                        }
                        // The record patches this row from the log entry: a write the
                        // row did not take (none can: the stamp is the newest) is not
                        // taken at the replay either.
                        log_patches.push(writes.len() as u32);
                        writes.push(Write {
                            collection: p.coll,
                            pk: p.pk.clone(),
                            op: Op::Update { fields: logged },
                        });
                        patch = Some(Vec::new());
                        Some(patched.row)
                    }
                    _ => None,
                };
                drop(parsed);
                let new_row = match fast {
                    Some(row) => row,
                    None => {
                        let before = before.map(Before::into_state).transpose()?;
                        let mut state = p
                            .after
                            .take()
                            .or_else(|| before.clone())
                            .unwrap_or_default();
                        // Remote writes the fast path did not take (the row did not parse).
                        state.apply_fields(take_remote(&mut p.remote));
                        if let Some(write) = apply_local(&view, &mut state, op, stamp)? {
                            writes.push(Write {
                                collection: p.coll,
                                pk: p.pk.clone(),
                                op: write,
                            });
                        }
                        width = (
                            before.as_ref().map_or(0, |b| b.fields.len()),
                            state.fields.len(),
                        );
                        if before.as_ref() == Some(&state) {
                            continue;
                        }
                        let delta =
                            view.digest_delta(coll, &p.pk, before.as_ref(), &state, &mut digest)?;
                        if delta != 0 {
                            *count_delta.entry(p.coll).or_default() += delta;
                        }
                        encode_state(&state)?
                    }
                };
                if !p.purge {
                    check_width(self.store.options.fields_per_object_max, coll, &p.pk, width)?;
                }
                let row = (!p.purge).then_some(new_row);
                if let Some(r) = &mut redo {
                    match patch {
                        Some(by_stamp) => {
                            for (stamp, fields) in by_stamp {
                                record_bytes += (key.len()
                                    + 24
                                    + fields
                                        .iter()
                                        .map(|(_, v)| 8 + v.size_bytes())
                                        .sum::<usize>())
                                    as u64;
                                r.push(Redo::Patch(key.clone(), stamp, fields));
                            }
                        }
                        None => {
                            let n = (key.len() + row.as_ref().map_or(0, Vec::len)) as u64;
                            record_bytes += n;
                            row_bytes += n;
                            r.push(Redo::Object(key.clone(), row.clone()));
                        }
                    }
                    if record_bytes > record_max || row_bytes > rows_max {
                        redo = None;
                    }
                }
                match row {
                    Some(row) if absent => fresh.push((key.clone(), row)),
                    row => rows.push((key.clone(), row)),
                }
            }
            // Nothing is written before every object has passed its checks: a transaction
            // refused here ([`Error::TooManyFields`]) leaves the batch it joined as it was.
            for (key, row) in &rows {
                match row {
                    Some(row) => objects.insert(key.as_slice(), row.as_slice())?,
                    None => objects.remove(key.as_slice())?,
                };
            }
            insert_fresh(objects, &fresh)?;
        }
        let seq = if writes.is_empty() {
            None
        } else {
            Some(self.writer.log_next)
        };
        if let Some(seq) = seq {
            let entry = LogEntry { seq, stamp, writes };
            let bytes = encode_into(&entry, Vec::with_capacity(entry.size_hint()))?;
            tables.log.insert(seq, bytes.as_slice())?;
            if let Some(r) = &mut redo {
                record_bytes += bytes.len() as u64 + 4 * log_patches.len() as u64;
                r.push(if log_patches.is_empty() {
                    Redo::Log(seq, bytes)
                } else {
                    Redo::LogPatches(seq, bytes, log_patches)
                });
                if record_bytes > record_max {
                    redo = None;
                }
            }
            if let Some(hook) = self.log_hook.take() {
                let named = entry.map_names(|id| view.name(id).map(str::to_owned))?;
                self.aux.extend(hook(&named)?);
            }
        }
        let aux = std::mem::take(&mut self.aux);
        wal::Aux::apply_all(&aux, txn)?;
        if let Some(r) = &mut redo {
            record_bytes += aux.iter().map(wal::Aux::bytes).sum::<u64>();
            r.extend(aux.into_iter().map(Redo::Aux));
            if record_bytes > record_max {
                redo = None;
            }
        }
        if !self.new_names.is_empty() {
            let mut table = txn.open_table(NAMES)?;
            for (i, n) in self.new_names.by_pos.iter().enumerate() {
                let id = (names.by_id.len() + i) as u32;
                table.insert(id, n.as_str())?;
                if let Some(redo) = &mut redo {
                    redo.push(Redo::Name(id, n.clone()));
                }
            }
        }
        drop(names);
        let mut counts = Vec::new();
        for (cid, delta) in &count_delta {
            let n = self.writer.counts.get(cid).copied().unwrap_or(0);
            let n = n.saturating_add_signed(*delta);
            put_meta(
                &mut tables.meta,
                &mut redo,
                &format!("{META_COUNT_PREFIX}{cid}"),
                &n.to_le_bytes(),
            )?;
            counts.push((*cid, n));
        }
        // A record's number goes into the database with its rows; a commit without one
        // leaves the last record's.
        let wal_seq = self.writer.wal_seq + 1;
        let head = Head {
            log_next: seq.map_or(self.writer.log_next, |s| s + 1),
            hlc: self.writer.hlc.high_water(),
            wal_seq: if redo.is_some() {
                wal_seq
            } else {
                self.writer.wal_seq
            },
            digest: digest.digest(),
        };
        let head = head.encode();
        let head = match &mut redo {
            Some(rows) => {
                rows.push(Redo::Meta(META_HEAD.to_owned(), head.to_vec()));
                Some(head.to_vec())
            }
            None => {
                tables.meta.insert(META_HEAD, head.as_slice())?;
                None
            }
        };
        let record = match redo {
            Some(rows) => Some(wal::encode(&wal::Record {
                replica: self.store.replica.0,
                seq: wal_seq,
                rows,
            })?),
            None => None,
        };
        Ok(Some(Prepared {
            committed: Committed {
                seq,
                stamp: has_local.then_some(stamp),
            },
            digest,
            counts,
            record,
            head,
        }))
    }
}

/// Applies a transaction's local call on one object (its net effect) to the object's state
/// at the transaction's stamp, and returns the write its log entry records.
fn apply_local(
    view: &NameView<'_>,
    state: &mut ObjectState<u32>,
    op: Option<NetOp>,
    stamp: Stamp,
) -> Result<Option<Op<u32>>> {
    let id = |name: &str| view.id(name).ok_or_else(|| corrupt("uninterned field"));
    Ok(Some(match op {
        None => return Ok(None),
        Some(NetOp::Insert(fields)) => {
            state.apply_exists(stamp, true);
            let logged = fields
                .into_iter()
                .map(|(name, value)| Ok((id(&name)?, value)))
                .collect::<Result<Vec<_>>>()?;
            let sets = logged.iter().map(|(f, v)| (*f, stamp, v.clone()));
            state.apply_fields(sets.collect());
            Op::Insert { fields: logged }
        }
        Some(NetOp::Update(fields)) => {
            // One write per field: each base is the field's stamp before this transaction.
            let logged = fields
                .into_iter()
                .map(|(name, value)| {
                    let field = id(&name)?;
                    let base = state.field(field).map(|(s, _)| s);
                    Ok(FieldWrite { field, value, base })
                })
                .collect::<Result<Vec<_>>>()?;
            let sets = logged.iter().map(|w| (w.field, stamp, w.value.clone()));
            state.apply_fields(sets.collect());
            Op::Update { fields: logged }
        }
        Some(NetOp::Delete) => {
            let base = state.max_stamp();
            state.apply_exists(stamp, false);
            Op::Delete { base }
        }
    }))
}

/// Refuses a row that would hold more than `max` fields, unless it held as many before
/// (an object from before the limit, or a lower one, stays writable).
fn check_width(max: usize, coll: &str, pk: &Pk, (before, after): (usize, usize)) -> Result<()> {
    if after > max && after > before {
        return Err(Error::TooManyFields {
            collection: coll.to_owned(),
            pk: pk.clone(),
            fields: after,
            max,
        });
    }
    Ok(())
}

/// How a transaction that is not recorded in the write-ahead file reaches the disk.
enum Mode {
    /// A durable redb commit (making every earlier commit durable too).
    Direct,
    /// No write-ahead file: a redb commit without fsync, then one empty durable commit
    /// for the group.
    Grouped,
    /// No write-ahead file: a redb commit without fsync, durable with a later one.
    Deferred,
}

/// Puts a meta row, and records it for the write-ahead file.
fn put_meta(
    meta: &mut redb::Table<&str, &[u8]>,
    redo: &mut Option<Vec<Redo>>,
    key: &str,
    value: &[u8],
) -> Result<()> {
    meta.insert(key, value)?;
    if let Some(redo) = redo {
        redo.push(Redo::Meta(key.to_owned(), value.to_vec()));
    }
    Ok(())
}

/// What a transaction will change in memory once redb has committed it.
struct Prepared {
    committed: Committed,
    digest: DigestSum,
    counts: Vec<(u32, u64)>,
    /// The write-ahead record (numbered `wal_seq + 1`), if the transaction made one.
    record: Option<Vec<u8>>,
    /// With a record: the `head` meta row, for its batch's commit to write.
    head: Option<Vec<u8>>,
}

// ---- client reset: backup, snapshot export, staging and the swap (see `reset.rs`) ----

/// A reset's unsynced writes, read when the reset begins (with the server's schemas, which
/// decide what is kept) and replayed onto each staged chunk as it arrives: the staged state
/// is written once, already replayed, instead of staged and then rewritten at the swap. What
/// no chunk held (objects the server lacks) and what the application wrote while staging
/// runs are replayed at the swap.
pub(crate) struct ReplayPlan {
    /// The unsynced entries, in log order; the swap appends those written since.
    entries: Vec<LogEntry<u32>>,
    /// The last log position read.
    head: LogPos,
    /// Writes not yet replayed, by object key, in log order: (entry, write, slot).
    by_key: HashMap<Vec<u8>, Vec<(usize, usize, usize)>>,
    /// Every field write's decision, in log order.
    decisions: Vec<Option<Replay>>,
    schemas: HashMap<String, Schema>,
    discard: Option<&'static str>,
    /// Why the unsynced log could not be read (recover-or-discard mode goes on without it).
    unreadable: Option<String>,
    /// Time spent replaying so far.
    spent: std::time::Duration,
}

impl std::fmt::Debug for ReplayPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayPlan")
            .field("entries", &self.entries.len())
            .field("head", &self.head)
            .field("objects_left", &self.by_key.len())
            .finish_non_exhaustive()
    }
}

impl ReplayPlan {
    /// Reads the log entries after the plan's up to `head`. A log that cannot be read is
    /// an error, except in recover-or-discard mode, which goes on without it (and the
    /// report says why).
    fn read_up_to(&mut self, store: &Store, head: LogPos, mode: ResetMode) -> Result<()> {
        if self.unreadable.is_some() || head <= self.head {
            return Ok(());
        }
        match (store.unsynced_entries(self.head, head), mode) {
            (Ok(entries), _) => self.extend(entries, head),
            (Err(e), ResetMode::RecoverOrDiscard) => self.unreadable = Some(e.to_string()),
            (Err(e), _) => return Err(e),
        }
        Ok(())
    }

    /// Adds `entries` (read after `head`), giving their writes slots for decisions.
    fn extend(&mut self, entries: Vec<LogEntry<u32>>, head: LogPos) {
        for e in entries {
            let entry = self.entries.len();
            for (write, w) in e.writes.iter().enumerate() {
                let slot = self.decisions.len();
                self.decisions
                    .resize_with(slot + w.op.write_count(), || None);
                self.by_key
                    .entry(object_key(w.collection, &w.pk))
                    .or_default()
                    .push((entry, write, slot));
            }
            self.entries.push(e);
        }
        self.head = self.head.max(head);
    }

    /// Replays the writes to object `key` onto `state` (decisions recorded), if it has any.
    fn replay_object(
        &mut self,
        view: &NameView<'_>,
        key: &[u8],
        coll: &str,
        state: &mut ObjectState<u32>,
    ) -> Result<bool> {
        let Some(writes) = self.by_key.remove(key) else {
            return Ok(false);
        };
        let schema = self.schemas.get(coll);
        for (entry, write, slot) in writes {
            let e = &self.entries[entry];
            let w = &e.writes[write];
            let out = &mut self.decisions[slot..slot + w.op.write_count()];
            replay_write(view, state, e.stamp, w, schema, self.discard, out)?;
        }
        Ok(true)
    }
}

/// What the swap does with one unsynced field write.
enum Replay {
    Recovered,
    Superseded {
        server_value: Option<Value>,
        server_stamp: Stamp,
        reason: String,
    },
    Discarded(String),
}

impl Store {
    /// The store's file, if it has one.
    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// An object's full merged state with field names (default if it was never written).
    pub(crate) fn object_state_named(&self, coll: &str, pk: &Pk) -> Result<ObjectState<String>> {
        let Some((state, _)) = self.read_state(coll, pk)? else {
            return Ok(ObjectState::default());
        };
        let names = self.names();
        let view = NameView {
            base: &names,
            new: None,
        };
        let mut fields = state
            .fields
            .into_iter()
            .map(|(f, s, v)| Ok((view.name(f)?.to_owned(), s, v)))
            .collect::<Result<Vec<_>>>()?;
        // Sorted by name: the merge functions binary-search by field key.
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(ObjectState {
            exists: state.exists,
            floor: state.floor,
            fields,
        })
    }

    /// Merges whole object states from the server and removes objects that left this
    /// client's view (a removal is not a delete: nothing is logged), in one transaction with
    /// `extra`. Returns how many objects changed.
    pub(crate) fn merge_view(
        &self,
        objects: &[ObjectSnapshot],
        removed: &[(String, Pk)],
        extra: impl FnOnce(&mut WriteTx<'_>) -> Result<()>,
    ) -> Result<u64> {
        let mut tx = self.begin()?;
        let now = self.options.time.now_ms();
        let mut changed = 0;
        for o in objects {
            o.pk.validate()?;
            let stamps = o
                .fields
                .iter()
                .map(|(_, s, _)| *s)
                .chain(o.exists.map(|(s, _)| s));
            for s in stamps {
                tx.writer.hlc.check(s, now).map_err(|d| Error::ClockDrift {
                    stamp: d.stamp,
                    now_ms: d.now_ms,
                    max_drift_ms: self.options.max_drift_ms,
                })?;
                tx.writer.hlc.observe(s.time);
            }
            let key = tx.load(&o.collection, &o.pk)?;
            let mut fields = Vec::with_capacity(o.fields.len());
            for (name, stamp, value) in &o.fields {
                crdt::check_sub_value(name, value)
                    .map_err(|reason| Error::BadChangeset { reason })?;
                if value.size_bytes() > self.options.value_bytes_max {
                    return Err(Error::BadChangeset {
                        reason: format!("value of {}[{}].{name} is too large", o.collection, o.pk),
                    });
                }
                fields.push((tx.intern(NameKind::Field, name)?, *stamp, value.clone()));
            }
            fields.sort_by_key(|(f, _, _)| *f);
            let incoming = ObjectState {
                exists: o.exists,
                floor: o.floor,
                fields,
            };
            if let Some(p) = tx.pending.get_mut(&key) {
                let mut state = p.take_state()?;
                if state.merge_state(incoming) {
                    changed += 1;
                }
                p.after = Some(state);
            }
        }
        let mut purge = Vec::new();
        for (coll, pk) in removed {
            let key = tx.load(coll, pk)?;
            if tx
                .pending
                .get(&key)
                .is_some_and(|p| p.before.is_some() || p.after.is_some())
            {
                purge.push(key);
            }
        }
        extra(&mut tx)?;
        // Removed objects leave no state behind: a later download may bring them back whole.
        for key in purge {
            if let Some(p) = tx.pending.get_mut(&key) {
                p.after = Some(ObjectState::default());
                p.purge = true;
                changed += 1;
            }
        }
        tx.raw_used = true;
        tx.commit()?;
        Ok(changed)
    }

    /// An object's full state with names, as the server sends it to filtered clients.
    pub(crate) fn object_snapshot(&self, coll: &str, pk: &Pk) -> Result<ObjectSnapshot> {
        let state = self.object_state_named(coll, pk)?;
        Ok(ObjectSnapshot {
            collection: coll.to_owned(),
            pk: pk.clone(),
            exists: state.exists,
            floor: state.floor,
            fields: state.fields,
        })
    }

    /// The marker of a reset under way.
    pub(crate) fn reset_marker(&self) -> Result<Option<ResetMarker>> {
        self.settle()?;
        let db = self.db()?;
        let rtx = db.begin_read()?;
        let meta = rtx.open_table(META)?;
        let m = meta.get(META_RESET)?;
        m.map(|v| {
            postcard::from_bytes(v.value()).map_err(|e| corrupt(format!("reset marker: {e}")))
        })
        .transpose()
    }

    /// Writes (or, with `None`, removes) the reset marker, durably.
    pub(crate) fn set_reset_marker(&self, marker: Option<&ResetMarker>) -> Result<()> {
        self.check_poisoned()?;
        let _w = self.lock_writer()?;
        let txn = self.db()?.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            match marker {
                Some(m) => {
                    meta.insert(META_RESET, encode(m)?.as_slice())?;
                }
                None => {
                    meta.remove(META_RESET)?;
                }
            }
        }
        self.finish(txn.commit().map_err(Error::from))
    }

    /// Copies the store file to `dest` atomically: with no write in flight and everything
    /// committed made durable first, to a temporary file that is fsynced and renamed.
    pub(crate) fn backup_to(&self, dest: &Path) -> Result<()> {
        let Some(src) = self.path.as_deref() else {
            return Ok(());
        };
        self.check_poisoned()?;
        let mut w = self.lock_writer()?;
        // Every commit (deferred ones, those in the write-ahead file) into the file.
        let r = self.checkpoint_with(&mut w, false);
        self.finish(r)?;
        let mut tmp = dest.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        std::fs::copy(src, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Objects after the key `after`, about `max_bytes` of them, as snapshots (tombstones
    /// included), and the key to continue from. Keys are local and opaque.
    pub(crate) fn snapshot_chunk(
        &self,
        after: Option<&[u8]>,
        max_bytes: usize,
    ) -> Result<(Vec<ObjectSnapshot>, Option<Vec<u8>>)> {
        self.settle()?;
        let db = self.db()?;
        let rtx = db.begin_read()?;
        let table = rtx.open_table(OBJECTS)?;
        let names = self.names();
        let view = NameView {
            base: &names,
            new: None,
        };
        let range = match after {
            Some(k) => {
                table.range::<&[u8]>((std::ops::Bound::Excluded(k), std::ops::Bound::Unbounded))?
            }
            None => table.range::<&[u8]>(..)?,
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        for row in range {
            let (k, v) = row?;
            let key = k.value();
            let cid = u32::from_be_bytes(
                key.get(..4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| corrupt("object key"))?,
            );
            let pk = Pk::decode(&key[4..]).ok_or_else(|| corrupt("object key"))?;
            let state = decode_state(v.value())?;
            bytes += v.value().len() + key.len();
            out.push(ObjectSnapshot {
                collection: view.name(cid)?.to_owned(),
                pk,
                exists: state.exists,
                floor: state.floor,
                fields: state
                    .fields
                    .iter()
                    .map(|(f, s, v)| Ok((view.name(*f)?.to_owned(), *s, v.clone())))
                    .collect::<Result<_>>()?,
            });
            if bytes >= max_bytes {
                return Ok((out, Some(key.to_vec())));
            }
        }
        Ok((out, None))
    }

    /// Stages a chunk of the server's state; the first chunk clears what was staged.
    pub(crate) fn stage_snapshot(
        &self,
        objects: &[ObjectSnapshot],
        first: bool,
        plan: &mut ReplayPlan,
    ) -> Result<()> {
        let mut tx = self.begin()?;
        // Other tables are written: its own transaction, committed durably.
        tx.raw()?;
        if first {
            let txn = tx.raw()?;
            txn.delete_table(STAGING)?;
            txn.delete_table(STAGING_META)?;
        }
        let mut staged = Vec::with_capacity(objects.len());
        for o in objects {
            o.pk.validate()?;
            // The clock advances past every stamp it sees, the server's state included:
            // otherwise the next local write could be stamped below a field it overwrites.
            let stamps = o
                .fields
                .iter()
                .map(|(_, s, _)| *s)
                .chain(o.exists.map(|(s, _)| s));
            for s in stamps.chain(std::iter::once(o.floor)) {
                tx.writer.hlc.observe(s.time);
            }
            let cid = tx.intern(NameKind::Collection, &o.collection)?;
            let mut fields = Vec::with_capacity(o.fields.len());
            for (name, stamp, value) in &o.fields {
                fields.push((tx.intern(NameKind::Field, name)?, *stamp, value.clone()));
            }
            fields.sort_by_key(|(f, _, _)| *f);
            let state = ObjectState {
                exists: o.exists,
                floor: o.floor,
                fields,
            };
            staged.push((cid, o, state));
        }
        let names = self.names();
        let view = NameView {
            base: &names,
            new: Some(&tx.new_names),
        };
        let txn = tx.txn_ref()?;
        let mut table = txn.open_table(STAGING)?;
        let mut meta = txn.open_table(STAGING_META)?;
        let mut sum = staged_digest(&meta)?;
        for (cid, o, mut state) in staged {
            let key = object_key(cid, &o.pk);
            let started = std::time::Instant::now();
            if plan.replay_object(&view, &key, &o.collection, &mut state)? {
                plan.spent += started.elapsed();
            }
            if view.digest_delta(&o.collection, &o.pk, None, &state, &mut sum)? > 0 {
                bump_count(&mut meta, cid, 1)?;
            }
            table.insert(key.as_slice(), encode(&state)?.as_slice())?;
        }
        meta.insert(META_DIGEST, sum.digest().0.as_slice())?;
        drop((table, meta, names));
        tx.raw_used = true;
        tx.commit()?;
        Ok(())
    }

    /// Reads the unsynced writes a reset replays, those after `replay_after` (see
    /// [`ReplayPlan`]); `schemas` are the server's, which decide what is kept.
    pub(crate) fn plan_replay(
        &self,
        mode: ResetMode,
        schemas: &[Schema],
        replay_after: LogPos,
    ) -> Result<ReplayPlan> {
        for s in schemas {
            s.validate()?;
        }
        let head = self.log_head();
        let replay_after = replay_after.min(head);
        let mut plan = ReplayPlan {
            entries: Vec::new(),
            head: replay_after,
            by_key: HashMap::new(),
            decisions: Vec::new(),
            schemas: schemas
                .iter()
                .map(|s| (s.collection.clone(), s.clone()))
                .collect(),
            discard: match mode {
                ResetMode::Manual => {
                    Some("manual reset: the write is in the backup for the application to recover")
                }
                ResetMode::DiscardUnsyncedChanges => {
                    Some("discard mode: unsynced changes are dropped")
                }
                _ => None,
            },
            unreadable: None,
            spent: std::time::Duration::ZERO,
        };
        let started = std::time::Instant::now();
        plan.read_up_to(self, head, mode)?;
        plan.spent += started.elapsed();
        Ok(plan)
    }

    /// The log entries in `(after, upto]`, every name in them checked.
    fn unsynced_entries(&self, after: LogPos, upto: LogPos) -> Result<Vec<LogEntry<u32>>> {
        self.read_log(after + 1..=upto, usize::MAX, usize::MAX, |view, e| {
            // Kept with ids (the replay and the new log entries use them), but every name
            // must resolve, so an unreadable log is found here.
            for w in &e.writes {
                view.name(w.collection)?;
                match &w.op {
                    Op::Insert { fields } => {
                        for (f, _) in fields {
                            view.name(*f)?;
                        }
                    }
                    Op::Update { fields } => {
                        for fw in fields {
                            view.name(fw.field)?;
                        }
                    }
                    Op::Delete { .. } => {}
                }
            }
            Ok(e)
        })
    }

    /// Swaps the staged server state in, replaying what `plan` has left (writes to objects
    /// no chunk held, and entries written since it was made), in one transaction (see
    /// `reset.rs`). `extra` runs in the same transaction.
    pub(crate) fn finish_reset(
        &self,
        marker: &ResetMarker,
        schemas: &[Schema],
        mut plan: ReplayPlan,
        extra: impl FnOnce(&mut WriteTx<'_>) -> Result<()>,
    ) -> Result<(ResetReport, LogPos)> {
        for s in schemas {
            s.validate()?;
        }
        let started = std::time::Instant::now();
        let mut tx = self.begin()?;
        // Other tables are written: its own transaction, committed durably.
        tx.raw()?;
        let head = tx.writer.log_next - 1;
        let mut report = ResetReport {
            reason: Some(marker.reason.clone()),
            mode: marker.mode,
            backup: marker.backup.clone(),
            ..ResetReport::default()
        };
        // What the application wrote while staging ran (redb shows this transaction every
        // commit made before it began).
        plan.read_up_to(self, head, marker.mode)?;
        if let Some(why) = plan.unreadable.take() {
            report.discarded.push(Discarded {
                write: UnsyncedWrite {
                    collection: String::new(),
                    pk: Pk::Int(0),
                    field: None,
                    value: Value::Null,
                    stamp: Stamp::ZERO,
                },
                reason: format!("the unsynced log could not be read: {why}"),
            });
        }

        // What is left, object by object in key order: each staged object is read, decoded,
        // hashed and written once however many writes touch it. One object's writes stay in
        // log order, and objects are independent of each other, so every write is decided
        // exactly as replaying the log in order would.
        let mut left: Vec<Vec<u8>> = plan.by_key.keys().cloned().collect();
        left.sort_unstable();
        let mut counts: HashMap<u32, u64> = HashMap::new();
        let mut sum;
        {
            let names = self.names();
            let view = NameView {
                base: &names,
                new: Some(&tx.new_names),
            };
            let mut staging = tx.txn_ref()?.open_table(STAGING)?;
            let smeta = tx.txn_ref()?.open_table(STAGING_META)?;
            sum = staged_digest(&smeta)?;
            for row in smeta.iter()? {
                let (k, v) = row?;
                if let Some(id) = k.value().strip_prefix(META_COUNT_PREFIX) {
                    let id: u32 = id.parse().map_err(|_| corrupt("staged count key"))?;
                    counts.insert(id, u64_of(v.value(), "staged count")?);
                }
            }
            for key in left {
                let Some(&(entry, write, _)) = plan.by_key.get(&key).and_then(|w| w.first()) else {
                    continue;
                };
                let (cid, pk) = {
                    let w = &plan.entries[entry].writes[write];
                    (w.collection, w.pk.clone())
                };
                let coll = view.name(cid)?;
                let before = staging
                    .get(key.as_slice())?
                    .map(|r| decode_state(r.value()))
                    .transpose()?;
                let mut state = before.clone().unwrap_or_default();
                plan.replay_object(&view, &key, coll, &mut state)?;
                if before.as_ref() == Some(&state) {
                    continue;
                }
                let delta = view.digest_delta(coll, &pk, before.as_ref(), &state, &mut sum)?;
                let c = counts.entry(cid).or_default();
                *c = c.saturating_add_signed(delta);
                staging.insert(key.as_slice(), encode(&state)?.as_slice())?;
            }
        }
        let ReplayPlan {
            entries: unsynced,
            decisions,
            discard,
            spent,
            ..
        } = plan;

        // Back in log order: the report lists every write where the log has it, and the
        // recovered part of each unsynced entry becomes one new entry with its stamp.
        let mut recovered_entries: Vec<(Stamp, Vec<Write<u32>>)> = Vec::new();
        {
            let names = self.names();
            let view = NameView {
                base: &names,
                new: Some(&tx.new_names),
            };
            // When recovering, most unsynced writes usually are: one allocation for them.
            if discard.is_none() {
                report.recovered.reserve(decisions.len());
            }
            let mut decisions = decisions.into_iter();
            for e in unsynced {
                let mut writes = Vec::new();
                for w in e.writes {
                    if let Some(kept) = settle(&view, &mut report, e.stamp, w, &mut decisions)? {
                        writes.push(kept);
                    }
                }
                if !writes.is_empty() {
                    recovered_entries.push((e.stamp, writes));
                }
            }
        }

        // The old state is renamed aside, not deleted: freeing it reads every page, and it
        // is dropped once the swap has committed (the open path drops what a crash left).
        // One can only be here already if that drop failed.
        tx.txn_ref()?.delete_table(REPLACED)?;
        tx.txn_ref()?.rename_table(OBJECTS, REPLACED)?;
        tx.txn_ref()?.rename_table(STAGING, OBJECTS)?;
        tx.txn_ref()?.delete_table(STAGING_META)?;

        // The recovered writes go back into the log with their own stamps; the old unsynced
        // entries are settled.
        let mut next = head + 1;
        let mut encoded = Vec::new();
        for (stamp, writes) in recovered_entries {
            let entry = LogEntry {
                seq: next,
                stamp,
                writes,
            };
            encoded.push((next, encode(&entry)?));
            next += 1;
        }
        {
            let mut log = tx.txn_ref()?.open_table(LOG)?;
            for (seq, bytes) in &encoded {
                log.insert(*seq, bytes.as_slice())?;
            }
            let mut meta = tx.txn_ref()?.open_table(META)?;
            meta.insert(META_LAST_SYNC, head.to_le_bytes().as_slice())?;
            meta.retain_in::<&str, _>(META_COUNT_PREFIX.."count0", |_, _| false)?;
            for (cid, n) in &counts {
                meta.insert(
                    format!("{META_COUNT_PREFIX}{cid}").as_str(),
                    n.to_le_bytes().as_slice(),
                )?;
            }
            for s in schemas {
                let key = format!("{META_SCHEMA_PREFIX}{}", s.collection);
                meta.insert(key.as_str(), encode(s)?.as_slice())?;
            }
            let until = next - 1;
            let m = ResetMarker {
                phase: ResetPhase::Uploading {
                    until,
                    settled: head,
                },
                ..marker.clone()
            };
            meta.insert(META_RESET, encode(&m)?.as_slice())?;
        }
        extra(&mut tx)?;
        // `commit` writes the digest and log position it holds; hand it the swapped-in ones
        // (and take them back if the commit fails).
        let old_digest = std::mem::replace(&mut tx.writer.digest, sum);
        let old_next = std::mem::replace(&mut tx.writer.log_next, next);
        tx.raw_used = true;
        let store = self;
        let mut writer_counts = counts;
        let r = tx.commit();
        let until = next - 1;
        match r {
            Ok(_) => {
                let mut report = report;
                let mut w = lock(&store.writer);
                w.counts = std::mem::take(&mut writer_counts);
                w.log_next = next;
                w.last_sync = head;
                *lock(&store.visible) = w.visible();
                drop(w);
                let mut map = store
                    .schemas
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                for s in schemas {
                    map.insert(s.collection.clone(), Arc::new(s.clone()));
                }
                drop(map);
                report.replay_time = spent + started.elapsed();
                // The swap stands whatever happens here: a failed drop poisons the store,
                // and the open that follows drops the table.
                store.drop_replaced()?;
                Ok((report, until))
            }
            Err(e) => {
                let mut w = lock(&store.writer);
                w.digest = old_digest;
                w.log_next = old_next;
                Err(e)
            }
        }
    }
}

impl Store {
    /// Drops the state a reset's swap replaced, in a durable transaction of its own.
    fn drop_replaced(&self) -> Result<()> {
        self.check_poisoned()?;
        let _w = self.lock_writer()?;
        let txn = self.db()?.begin_write()?;
        txn.delete_table(REPLACED)?;
        self.finish(txn.commit().map_err(Error::from))
    }
}

fn staged_digest(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<DigestSum> {
    Ok(DigestSum::from_digest(meta_digest(meta, META_DIGEST)?))
}

fn bump_count(
    meta: &mut redb::Table<'_, &'static str, &'static [u8]>,
    cid: u32,
    by: u64,
) -> Result<()> {
    let key = format!("{META_COUNT_PREFIX}{cid}");
    let n = meta_u64(&*meta, &key, 0)?;
    meta.insert(key.as_str(), (n + by).to_le_bytes().as_slice())?;
    Ok(())
}

/// Replays one unsynced write onto its object's state, deciding each of its field writes
/// on its own (the existence write first), into `out`.
fn replay_write(
    view: &NameView<'_>,
    state: &mut ObjectState<u32>,
    stamp: Stamp,
    w: &Write<u32>,
    schema: Option<&Schema>,
    discard: Option<&str>,
    out: &mut [Option<Replay>],
) -> Result<()> {
    let mut out = out.iter_mut();
    let mut decide = |r: Replay| {
        if let Some(slot) = out.next() {
            *slot = Some(r);
        }
    };
    match &w.op {
        Op::Insert { fields } => {
            decide(replay_exists(state, stamp, true, discard));
            for (f, v) in fields {
                let field = (*f, view.name(*f)?);
                decide(replay_field(state, stamp, &w.pk, field, v, schema, discard));
            }
        }
        Op::Update { fields } => {
            for fw in fields {
                let field = (fw.field, view.name(fw.field)?);
                decide(replay_field(
                    state, stamp, &w.pk, field, &fw.value, schema, discard,
                ));
            }
        }
        Op::Delete { .. } => decide(replay_exists(state, stamp, false, discard)),
    }
    Ok(())
}

/// Files each field write of an unsynced write in the report by its decision (taken from
/// `decisions` in order), and returns the write's recovered part, which goes back into the
/// log.
fn settle(
    view: &NameView<'_>,
    report: &mut ResetReport,
    stamp: Stamp,
    w: Write<u32>,
    decisions: &mut impl Iterator<Item = Option<Replay>>,
) -> Result<Option<Write<u32>>> {
    let Write { collection, pk, op } = w;
    let coll = view.name(collection)?;
    // Every field write was decided; a missing decision would be a bug here, not lost data.
    let mut next = || {
        decisions
            .next()
            .flatten()
            .ok_or_else(|| corrupt("an unsynced write was not replayed"))
    };
    let mut file = |r: Replay, field: Option<&str>, value: &Value| -> bool {
        let write = UnsyncedWrite {
            collection: coll.to_owned(),
            pk: pk.clone(),
            field: field.map(str::to_owned),
            value: value.clone(),
            stamp,
        };
        let recovered = matches!(r, Replay::Recovered);
        record(report, r, write);
        recovered
    };
    let kept = match op {
        Op::Insert { fields } => {
            let exists_ok = file(next()?, None, &Value::Bool(true));
            let mut kept_fields = Vec::new();
            for (f, v) in fields {
                if file(next()?, Some(view.name(f)?), &v) {
                    kept_fields.push((f, v));
                }
            }
            if exists_ok {
                Some(Op::Insert {
                    fields: kept_fields,
                })
            } else if kept_fields.is_empty() {
                None
            } else {
                Some(Op::Update {
                    fields: kept_fields
                        .into_iter()
                        .map(|(field, value)| FieldWrite {
                            field,
                            value,
                            base: None,
                        })
                        .collect(),
                })
            }
        }
        Op::Update { fields } => {
            let mut kept_fields = Vec::new();
            for fw in fields {
                if file(next()?, Some(view.name(fw.field)?), &fw.value) {
                    kept_fields.push(fw);
                }
            }
            (!kept_fields.is_empty()).then_some(Op::Update {
                fields: kept_fields,
            })
        }
        Op::Delete { base } => {
            file(next()?, None, &Value::Bool(false)).then_some(Op::Delete { base })
        }
    };
    Ok(kept.map(|op| Write { collection, pk, op }))
}

/// Replays an insert (`alive`) or a delete onto the state.
fn replay_exists(
    state: &mut ObjectState<u32>,
    stamp: Stamp,
    alive: bool,
    discard: Option<&str>,
) -> Replay {
    if let Some(why) = discard {
        return Replay::Discarded(why.to_owned());
    }
    match state.exists {
        // Checked before applying: a stale existence write may still raise the floor.
        Some((s, server_alive)) if s >= stamp => Replay::Superseded {
            server_value: Some(Value::Bool(server_alive)),
            server_stamp: s,
            reason: format!(
                "the server {} the object later (by {})",
                if server_alive { "wrote" } else { "deleted" },
                s.replica
            ),
        },
        _ => {
            state.apply_exists(stamp, alive);
            Replay::Recovered
        }
    }
}

/// Replays one field write onto the state.
fn replay_field(
    state: &mut ObjectState<u32>,
    stamp: Stamp,
    pk: &Pk,
    (field, name): (u32, &str),
    value: &Value,
    schema: Option<&Schema>,
    discard: Option<&str>,
) -> Replay {
    if let Some(why) = discard {
        return Replay::Discarded(why.to_owned());
    }
    if let Some(Err(e)) = schema.map(|s| s.check_value(pk, name, value)) {
        return Replay::Discarded(format!("the server's schema refuses it: {e}"));
    }
    // An update of an object deleted on the server is kept like in normal sync: merged
    // (hidden while the object is deleted) and uploaded, where the server's conflict policy
    // for update-vs-delete decides.
    if state.apply_field(field, stamp, value.clone()) == Outcome::Applied {
        return Replay::Recovered;
    }
    // A stale write left the state as it was.
    match state.field(field) {
        Some((s, v)) => Replay::Superseded {
            server_value: Some(v.clone()),
            server_stamp: s,
            reason: format!("the server's value is newer (written by {})", s.replica),
        },
        None => Replay::Superseded {
            server_value: None,
            server_stamp: state.floor,
            reason: format!(
                "the object was deleted or re-created after it (by {})",
                state.floor.replica
            ),
        },
    }
}

/// Files one decided field write in the report.
fn record(report: &mut ResetReport, outcome: Replay, write: UnsyncedWrite) {
    match outcome {
        Replay::Recovered => report.recovered.push(write),
        Replay::Superseded {
            server_value,
            server_stamp,
            reason,
        } => report.superseded.push(Superseded {
            write,
            server_value,
            server_stamp,
            reason,
        }),
        Replay::Discarded(reason) => report.discarded.push(Discarded { write, reason }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;
    use std::sync::mpsc;
    use std::time::Duration;

    fn store(dir: &tempfile::TempDir) -> Store {
        Store::open(dir.path().join("s.redb")).expect("open")
    }

    /// Waits until `n` writers wait for the writer lock.
    fn until_waiting(store: &Store, n: usize) {
        while store.waiting.load(Ordering::SeqCst) < n {
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn n(store: &Store, pk: i64) -> Option<Value> {
        store.get_field("T", pk, "n").expect("get").map(|(v, _)| v)
    }

    const PACK_TEST: TableDefinition<&[u8], &[u8]> = TableDefinition::new("pack_test");

    proptest::proptest! {
        /// Rows inserted in runs land between any neighbours, at either end, and replace
        /// a key that turns out to be there: the table holds exactly the union.
        #[test]
        fn insert_fresh_puts_every_row_between_its_neighbours(
            existing in proptest::collection::btree_set(0u16..600, 0..200),
            fresh in proptest::collection::btree_set(0u16..600, 0..200),
        ) {
            let key = |k: u16| k.to_string().into_bytes();
            let db = Database::builder()
                .create_with_backend(redb::backends::InMemoryBackend::new())
                .expect("db");
            let txn = db.begin_write().expect("txn");
            let mut model = BTreeMap::new();
            {
                let mut t = txn.open_table(PACK_TEST).expect("table");
                for &k in &existing {
                    t.insert(key(k).as_slice(), b"old".as_slice()).expect("insert");
                    model.insert(key(k), b"old".to_vec());
                }
                let rows: Vec<(Vec<u8>, Vec<u8>)> = fresh
                    .iter()
                    .map(|&k| (key(k), vec![k as u8; 1 + usize::from(k) * 37 % 3000]))
                    .collect::<BTreeMap<_, _>>()
                    .into_iter()
                    .collect();
                insert_fresh(&mut t, &rows).expect("insert_fresh");
                model.extend(rows);
                let got: BTreeMap<Vec<u8>, Vec<u8>> = t
                    .iter()
                    .expect("iter")
                    .map(|r| {
                        let (k, v) = r.expect("row");
                        (k.value().to_vec(), v.value().to_vec())
                    })
                    .collect();
                proptest::prop_assert_eq!(got, model);
            }
        }
    }

    /// Objects created in numeric order with string keys (`user10000`.. after `user1000`)
    /// land between existing keys, not after them: their rows still fill their pages.
    #[test]
    fn objects_created_between_existing_keys_fill_their_pages() {
        let store = Store::open_in_memory().expect("open");
        let value = "v".repeat(100);
        let objects = 3_000;
        for chunk in (0..objects).collect::<Vec<_>>().chunks(100) {
            store
                .write(|tx| {
                    for i in chunk {
                        let fields: Vec<(String, Value)> = (0..10)
                            .map(|f| (format!("field{f}"), Value::from(value.as_str())))
                            .collect();
                        tx.insert("T", format!("user{i}").as_str(), fields)?;
                    }
                    Ok(())
                })
                .expect("insert");
        }
        assert_eq!(store.count("T").expect("count"), objects);
        store.checkpoint().expect("checkpoint");
        let txn = store.db().expect("db").begin_write().expect("txn");
        let leaves = txn
            .open_table(OBJECTS)
            .expect("objects")
            .stats()
            .expect("stats")
            .leaf_pages();
        txn.abort().expect("abort");
        // Three ~1.1 KB rows fit a 4 KiB page; splitting full leaves in half left two.
        assert!(
            leaves * 5 <= objects * 2,
            "{leaves} leaves for {objects} objects"
        );
    }

    /// A row read from a snapshot keeps that snapshot's read transaction, even once the
    /// snapshot is no longer the kept one: durable commits that rewrite the row's page
    /// cannot reclaim it meanwhile (redb's debug builds assert if they do).
    #[test]
    fn a_reset_replays_unsynced_writes_onto_each_chunk_as_it_is_staged() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(&dir);
        for pk in 1..=2i64 {
            store
                .write(|tx| tx.insert("T", pk, [("n", 1)]))
                .expect("insert");
        }
        store.write(|tx| tx.set("T", 1, "n", 2)).expect("update");
        // Written after the plan was made (as the app may while chunks arrive).
        let late = |store: &Store| store.write(|tx| tx.set("T", 2, "n", 5)).expect("update");
        let server = |pk: i64, n: i64| ObjectSnapshot {
            collection: "T".into(),
            pk: Pk::Int(pk),
            exists: Some((
                Stamp {
                    time: 1 << 16,
                    replica: ReplicaId(9),
                },
                true,
            )),
            floor: Stamp::ZERO,
            fields: vec![(
                "n".into(),
                Stamp {
                    time: 1 << 16,
                    replica: ReplicaId(9),
                },
                Value::Int(n),
            )],
        };
        let mut plan = store
            .plan_replay(ResetMode::RecoverUnsyncedChanges, &[], 0)
            .expect("plan");
        store
            .stage_snapshot(&[server(1, 0)], true, &mut plan)
            .expect("stage");
        // Object 1's writes are already in its staged row; object 2's wait for its chunk.
        assert_eq!(plan.by_key.len(), 1, "{plan:?}");
        let staged = {
            let rtx = store.db().expect("db").begin_read().expect("read");
            let t = rtx.open_table(STAGING).expect("staging");
            let row = t
                .get(object_key(store.names().by_name["T"], &Pk::Int(1)).as_slice())
                .expect("get")
                .expect("staged");
            decode_state(row.value()).expect("decode")
        };
        assert_eq!(staged.fields[0].2, Value::Int(2));
        late(&store);
        store
            .stage_snapshot(&[server(2, 0)], false, &mut plan)
            .expect("stage");
        assert!(plan.by_key.is_empty(), "{plan:?}");
        let marker = ResetMarker {
            reason: crate::reset::ResetReason::Forced,
            mode: ResetMode::RecoverUnsyncedChanges,
            phase: ResetPhase::Downloading,
            backup: None,
        };
        let (report, _) = store
            .finish_reset(&marker, &[], plan, |_| Ok(()))
            .expect("swap");
        // Both inserts (existence and field), the update made before the plan, and the one
        // made after it.
        assert_eq!(report.recovered.len(), 6, "{report:?}");
        assert!(report.superseded.is_empty() && report.discarded.is_empty());
        assert_eq!(n(&store, 1), Some(Value::from(2)));
        assert_eq!(n(&store, 2), Some(Value::from(5)));
        assert!(store.verify_digest().expect("verify"));
    }

    #[test]
    fn an_upload_batch_reads_entries_up_to_its_bytes_and_at_least_one() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(&dir);
        let big = "x".repeat(1000);
        for i in 0..6i64 {
            store
                .write(|tx| tx.insert("T", i, [("v", big.as_str())]))
                .expect("write");
        }
        let seqs = |es: Vec<LogEntry>| es.iter().map(|e| e.seq).collect::<Vec<_>>();
        // Each entry is stored in a little over 1,000 bytes.
        assert_eq!(
            seqs(store.log_within(0, 256, 2_500).expect("read")),
            [1, 2, 3]
        );
        assert_eq!(seqs(store.log_within(4, 256, 0).expect("read")), [5]);
        assert_eq!(
            seqs(store.log_within(0, 2, usize::MAX).expect("read")),
            [1, 2]
        );
        assert_eq!(store.log_after(0, 256).expect("read").len(), 6);
    }

    #[test]
    fn a_row_being_read_keeps_its_page_from_being_reclaimed() {
        let dir = tempfile::tempdir().expect("dir");
        let store = Store::open_with(
            dir.path().join("s.redb"),
            Options {
                // Every commit a durable redb one, which reclaims freed pages after it.
                checkpoint_bytes: 0,
                ..Options::default()
            },
        )
        .expect("open");
        store
            .write(|tx| tx.insert("T", 1, [("n", "old")]))
            .expect("insert");
        let (row, _) = store
            .read_row("T", &Pk::Int(1))
            .expect("read")
            .expect("row");
        // As when a newer snapshot replaces it and the reader holds the last handle.
        store.snapshots.writer_locked();
        for i in 0..4i64 {
            store
                .write(|tx| tx.set("T", 1, "n", i))
                .expect("a commit that rewrites the row's page");
        }
        let state = decode_state(row.value()).expect("the row as it was read");
        assert_eq!(state.fields.len(), 1);
        assert_eq!(state.fields[0].2, Value::from("old"));
        drop(row);
        assert_eq!(n(&store, 1), Some(Value::from(3)));
    }

    #[test]
    fn writers_waiting_behind_a_commit_share_its_redb_commit() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(&dir);
        let before = lock(&store.group).committed;
        std::thread::scope(|s| {
            let mut first = store.begin().expect("begin");
            first.insert("T", 0, [("n", 0)]).expect("insert");
            for i in 1..8i64 {
                let store = &store;
                s.spawn(move || {
                    store
                        .write(|tx| tx.insert("T", i, [("n", i)]))
                        .expect("commit")
                });
            }
            until_waiting(&store, 7);
            first.commit().expect("commit");
        });
        // Every commit returned with its record synced, none with a redb commit.
        assert_eq!(lock(&store.group).committed - before, 0);
        for i in 0..8i64 {
            assert_eq!(n(&store, i), Some(Value::from(i)));
        }
        // The first read committed the batch: one redb commit for the eight.
        assert_eq!(lock(&store.group).committed - before, 1);
        assert_eq!(store.log_head(), 8);
        assert_eq!(store.count("T").expect("count"), 8);
        assert!(store.verify_digest().expect("verify"));
    }

    #[test]
    fn a_lone_writers_commits_share_a_redb_commit_and_every_read_sees_them() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(&dir);
        store
            .write(|tx| tx.insert("T", 1, [("n", 0)]))
            .expect("insert");
        assert_eq!(n(&store, 1), Some(Value::from(0)));
        let before = lock(&store.group).committed;
        for i in 1..=BATCH_MEMBERS_MAX as i64 + 3 {
            store.write(|tx| tx.set("T", 1, "n", i)).expect("set");
            if i == 2 {
                // From another thread too, with the batch open.
                let seen = std::thread::scope(|s| s.spawn(|| n(&store, 1)).join().expect("read"));
                assert_eq!(seen, Some(Value::from(2)));
                assert_eq!(lock(&store.group).committed - before, 1);
            }
        }
        // After the read's: a batch of 64 committed when it filled up; the last commit
        // waits for a reader.
        assert_eq!(lock(&store.group).committed - before, 2);
        assert_eq!(store.log_head(), BATCH_MEMBERS_MAX as u64 + 4);
        assert_eq!(lock(&store.group).committed - before, 3);
        assert_eq!(
            n(&store, 1),
            Some(Value::from(BATCH_MEMBERS_MAX as i64 + 3))
        );
        assert!(store.verify_digest().expect("verify"));
    }

    #[test]
    fn a_batch_commits_once_its_records_pass_its_bytes_and_a_small_cache_makes_them_fewer() {
        let committed = |store: &Store| lock(&store.group).committed;
        let objects = |store: &Store| {
            for i in 1..=5i64 {
                store
                    .write(|tx| tx.insert("T", i, [("b", 0)]))
                    .expect("insert");
            }
            assert_eq!(store.count("T").expect("count"), 5);
        };
        // ~300 KB a record (an update's value is in it once): the fourth passes 1 MiB.
        let big = |store: &Store, i: i64| {
            store
                .write(|tx| tx.set("T", i, "b", Value::Bytes(vec![i as u8; 300_000])))
                .expect("set")
        };
        let dir = tempfile::tempdir().expect("dir");
        let store = store(&dir);
        objects(&store);
        let before = committed(&store);
        for i in 1..=3 {
            big(&store, i);
        }
        assert_eq!(committed(&store) - before, 0);
        big(&store, 4);
        assert_eq!(committed(&store) - before, 1);
        big(&store, 5);
        assert_eq!(committed(&store) - before, 1);
        let read = store.get_field("T", 5, "b").expect("get").map(|(v, _)| v);
        assert_eq!(read, Some(Value::Bytes(vec![5; 300_000])));
        assert_eq!(committed(&store) - before, 2);
        assert!(store.verify_digest().expect("verify"));

        // A 16 MiB cache: a batch is committed past 128 KiB, here by each member.
        let dir = tempfile::tempdir().expect("dir");
        let options = Options {
            cache_bytes: 16 << 20,
            ..Options::default()
        };
        let store = Store::open_with(dir.path().join("s.redb"), options).expect("open");
        objects(&store);
        let before = committed(&store);
        big(&store, 1);
        big(&store, 2);
        assert_eq!(committed(&store) - before, 2);
        assert!(store.verify_digest().expect("verify"));
    }

    #[test]
    fn a_writer_behind_the_batch_reads_it_and_may_roll_back_alone() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(&dir);
        store
            .write(|tx| tx.insert("T", 1, [("n", 1)]))
            .expect("insert");
        std::thread::scope(|s| {
            let mut a = store.begin().expect("begin");
            a.set("T", 1, "n", 10).expect("set");
            let store = &store;
            let b = s.spawn(move || {
                let mut b = store.begin().expect("begin");
                // A's write, in the open batch: seen, and built on.
                let seen = b
                    .get("T", 1)
                    .expect("get")
                    .and_then(|o| o.get("n").cloned());
                b.set("T", 1, "m", 20).expect("set");
                drop(b);
                seen
            });
            until_waiting(store, 1);
            a.commit().expect("commit");
            assert_eq!(b.join().expect("b"), Some(Value::from(10)));
        });
        assert_eq!(n(&store, 1), Some(Value::from(10)));
        assert_eq!(store.get_field("T", 1, "m").expect("get"), None);
        assert_eq!(store.log_head(), 2);
        assert!(store.verify_digest().expect("verify"));
    }

    #[test]
    fn a_commit_does_not_wait_for_the_writer_behind_it_to_finish() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(&dir);
        let (done, a_returned) = mpsc::channel();
        std::thread::scope(|s| {
            let mut a = store.begin().expect("begin");
            a.insert("T", 1, [("n", 1)]).expect("insert");
            let store = &store;
            let b = s.spawn(move || {
                let mut b = store.begin().expect("begin");
                b.insert("T", 2, [("n", 2)]).expect("insert");
                // B holds the writer lock until A's commit has returned.
                let returned = a_returned.recv_timeout(Duration::from_secs(20)).is_ok();
                b.commit().expect("commit");
                returned
            });
            until_waiting(store, 1);
            a.commit().expect("commit");
            done.send(()).expect("send");
            assert!(b.join().expect("b"), "A's commit waited for B");
        });
        assert_eq!(n(&store, 1), Some(Value::from(1)));
        assert_eq!(n(&store, 2), Some(Value::from(2)));
        assert!(store.verify_digest().expect("verify"));
    }
}
