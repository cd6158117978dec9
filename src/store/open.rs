//! Opening a store: creating its file atomically, replaying the write-ahead file,
//! loading the writer's state; and compacting and closing it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition};

use crate::backend::{Kept, Shared, ShrinkOptional};
use crate::clock::{Hlc, ReplicaId, Stamp};
use crate::digest::DigestSum;
use crate::error::{Error, Result};
use crate::log::{LogEntry, Op, Write};
use crate::schema::Schema;
use crate::snapshot::Snapshots;
use crate::value::Value;
use crate::wal::{self, Redo};

use super::commit::{GroupCommit, Visible, Writer};
use super::format::{
    corrupt, decode_state, encode_state, meta_u64, object_key, u64_of, Head, FORMAT_UPGRADES,
    FORMAT_VERSION, LOG, LOG_REPACK, META, META_COUNT_PREFIX, META_DIGEST, META_FORMAT, META_HEAD,
    META_HLC, META_LAST_SYNC, META_LOG_NEXT, META_REPLICA, META_SCHEMA_PREFIX, META_WAL_SEQ, NAMES,
    OBJECTS, OBJECTS_REPACK, REPLACED,
};
use super::names::Interner;
use super::recover::Recovery;
use super::{Options, Store};

/// What opening a store reads from its database (after replaying its write-ahead file).
pub(super) struct Loaded {
    pub(super) replica: ReplicaId,
    pub(super) writer: Writer,
    pub(super) visible: Visible,
    pub(super) interner: Interner,
    pub(super) schemas: HashMap<String, Arc<Schema>>,
    pub(super) wal_seq: u64,
}

/// Creates an empty redb database at `path` so that a crash never leaves a half-created
/// file there (redb writes its magic number in a second sync; a file cut off before it is
/// refused forever): built under a temporary name, synced, then linked into place — a link
/// never replaces a file another process created meanwhile.
pub(super) fn create_atomically(path: &Path) -> Result<()> {
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
pub(super) fn repack<K: redb::Key + 'static, V: redb::Value + 'static>(
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

/// The write-ahead file beside the store file at `path`.
pub(crate) fn wal_path(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push("-wal");
    p.into()
}

/// Replays a write-ahead patch: `fields` merged onto the object's row at `stamp`.
pub(super) fn patch_row(
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
    pub(super) fn replay_wal(db: &Database, wal: &dyn StorageBackend) -> Result<()> {
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
    pub(super) fn load(
        db: &Database,
        wal: Option<&dyn StorageBackend>,
        options: &Options,
    ) -> Result<Loaded> {
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

            upgrade_format(&mut meta)?;
            let replica = replica_of(&mut meta)?;
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

            let interner = read_names(&names)?;
            let (schemas, counts) = read_schemas_and_counts(&meta)?;
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
    pub(super) fn database(backend: &Arc<Kept>, options: &Options) -> Result<Database> {
        Ok(Database::builder()
            .set_cache_size(options.cache_bytes)
            .create_with_backend(ShrinkOptional(Shared(Arc::clone(backend))))?)
    }

    pub(super) fn init(
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
}

/// Upgrades an older format this build opens, or writes the format of a new store.
fn upgrade_format(meta: &mut redb::Table<&str, &[u8]>) -> Result<()> {
    let format = meta.get(META_FORMAT)?.map(|v| v.value().to_vec());
    if let Some(v) = format {
        let found = u64_of(&v, META_FORMAT)?;
        if found == FORMAT_VERSION {
            return Ok(());
        }
        if !FORMAT_UPGRADES.contains(&found) {
            return Err(corrupt(format!(
                "format version {found}; this build reads {FORMAT_VERSION}"
            )));
        }
    }
    meta.insert(META_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())?;
    Ok(())
}

/// The store's replica id, chosen at random the first time.
fn replica_of(meta: &mut redb::Table<&str, &[u8]>) -> Result<ReplicaId> {
    let replica = meta.get(META_REPLICA)?.map(|v| v.value().to_vec());
    Ok(match replica {
        Some(v) => ReplicaId(u64_of(&v, META_REPLICA)?),
        None => {
            let id = rand::random::<u64>().max(1);
            meta.insert(META_REPLICA, id.to_le_bytes().as_slice())?;
            ReplicaId(id)
        }
    })
}

/// The interned names; their ids are dense from 0.
fn read_names(names: &impl ReadableTable<u32, &'static str>) -> Result<Interner> {
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
    Ok(interner)
}

/// Schemas by collection, and live objects by collection id, from the `meta` rows.
type SchemasAndCounts = (HashMap<String, Arc<Schema>>, HashMap<u32, u64>);

/// The schemas and counts the `meta` table holds.
fn read_schemas_and_counts(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<SchemasAndCounts> {
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
    Ok((schemas, counts))
}
