//! Committing: the single writer's state, batches and group commit, the write-ahead
//! tail, checkpoints, and `WriteTx::commit`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, PoisonError};

use redb::StorageBackend;

use crate::clock::Hlc;
use crate::digest::DigestSum;
use crate::error::{Error, Result};
use crate::log::LogPos;

use super::format::{internal, LOG, META, META_HEAD, OBJECTS, WAL_GROWTH};
use super::locks::lock;
use super::names::NewNames;
use super::prepare::Prepared;
use super::write_tx::WriteTx;
use super::{Committed, Durability, Store};

/// What only the single writer touches. The fields run ahead of the database while a
/// batch is open (its members' transactions are in it, not yet committed); readers are
/// shown [`Visible`], as of the last redb commit.
#[derive(Debug)]
pub(super) struct Writer {
    pub(super) hlc: Hlc,
    pub(super) digest: DigestSum,
    pub(super) log_next: LogPos,
    pub(super) last_sync: LogPos,
    pub(super) counts: HashMap<u32, u64>,
    /// The last write-ahead record's number (see `wal.rs`).
    pub(super) wal_seq: u64,
    /// Where the next write-ahead record goes: 0 after a checkpoint.
    pub(super) wal_at: u64,
    /// The write-ahead file's length (grown ahead of the records, in steps).
    pub(super) wal_len: u64,
}

impl Writer {
    /// Moves the writer's state past a transaction it has put into redb's transaction.
    pub(super) fn apply(
        &mut self,
        digest: DigestSum,
        counts: Vec<(u32, u64)>,
        seq: Option<LogPos>,
    ) {
        self.digest = digest;
        self.counts.extend(counts);
        if let Some(seq) = seq {
            self.log_next = seq + 1;
        }
    }

    /// What readers will be shown once redb has committed what the writer has done.
    pub(super) fn visible(&self) -> Visible {
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
pub(super) struct Visible {
    pub(super) digest: DigestSum,
    pub(super) hlc: u64,
    pub(super) log_next: LogPos,
    pub(super) counts: HashMap<u32, u64>,
}

/// Group commit on a store with a write-ahead file: a recorded transaction (its record
/// appended) leaves its redb transaction open instead of committing it, and the next
/// transaction joins it, so small transactions share one redb commit as well as one fsync.
/// A member's commit returns once its record is durable (or written, if deferred), not
/// when the batch commits: the record is what survives a crash, and the batch is only
/// what makes the writes visible to readers. So the batch is committed when a reader needs
/// it ([`Store::settle`]), when it is full, when a member's record is large, and before any
/// other use of redb's write transaction.
pub(super) struct Batch {
    pub(super) txn: OpenTxn,
    pub(super) members: Members,
}

/// The store's own tables, open in a write transaction.
pub(super) struct Tables<'t> {
    pub(super) objects: redb::Table<'t, &'static [u8], &'static [u8]>,
    pub(super) log: redb::Table<'t, u64, &'static [u8]>,
    pub(super) meta: redb::Table<'t, &'static str, &'static [u8]>,
}

self_cell::self_cell!(
    /// A write transaction with the store's tables open, for as long as it lasts: a batch's
    /// members write through the same tables. Opening a table flushes the roots of those
    /// closed before it, checksumming every page they dirtied, so opening and closing them
    /// per member was ~22 % of a one-update durable commit's instructions.
    pub(super) struct OpenTxn {
        owner: redb::WriteTransaction,
        #[covariant]
        dependent: Tables,
    }
);

impl OpenTxn {
    /// Opens the tables in `txn`, made to commit without fsync (a recorded commit's record
    /// is what makes it durable; an unrecorded one chooses again after [`OpenTxn::close`]).
    pub(super) fn open(mut txn: redb::WriteTransaction) -> Result<OpenTxn> {
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
    pub(super) fn close(self) -> redb::WriteTransaction {
        self.into_owner()
    }
}

/// How many are in a batch, and what its commit will show.
pub(super) struct Members {
    pub(super) count: usize,
    /// The bytes of the members' records.
    pub(super) bytes: usize,
    /// What readers are shown once it commits.
    pub(super) visible: Visible,
    /// The `head` meta row its commit writes: the last recorded member's (each member's
    /// record holds its own for a replay, so the row goes into redb once a batch).
    pub(super) head: Option<Vec<u8>>,
}

/// A batch a joiner has taken: whatever ends its commit before the batch is put back or
/// committed (an error, a panic) abandons it, since its transaction holds the members'
/// writes and readers wait for it to come back.
pub(super) struct JoinedBatch<'s> {
    pub(super) store: &'s Store,
    pub(super) taken: bool,
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
pub(super) const BATCH_MEMBERS_MAX: usize = 64;
/// A batch is committed once its members' records pass this many bytes, or a 128th of
/// redb's cache if that is less. Larger batches copy each hot leaf once for many
/// transactions (redb copies a page on its first write in a commit); but a batch's dirty
/// pages must fit redb's write buffer (half its cache) or they are written out and read
/// back (a uniform update's ~135 record bytes dirty a 4 KiB leaf: 1 MiB of records, up to
/// ~40 MiB of pages), and a reader that arrives while a member is being put into the batch
/// waits for that member and the batch's commit.
pub(super) const BATCH_BYTES_MAX: usize = 1 << 20;

/// The writer lock, taken to commit (through [`Store::begin`] or [`Store::lock_writer`]:
/// taking it lets go of the kept read snapshot, so that the snapshot does not hold back the
/// pages the commit frees). Released with a full batch open, it commits the batch;
/// released, it moves the read epoch, so that `get` never serves a snapshot from before a
/// commit that has returned.
pub(super) struct WriterGuard<'s> {
    pub(super) guard: MutexGuard<'s, Writer>,
    pub(super) store: &'s Store,
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

/// Commits are numbered in redb order, write-ahead records by their sequence number; a
/// durable commit makes every earlier one durable, a sync of the write-ahead file every
/// record appended before it.
#[derive(Debug, Default)]
pub(super) struct GroupCommit {
    /// Commits made so far.
    pub(super) committed: u64,
    /// Every commit (with a write-ahead file: every record) up to this one is on stable
    /// storage.
    pub(super) durable: u64,
    /// A leader is making a durable commit.
    pub(super) flushing: bool,
    /// Why the last flush failed (its waiters and later ones fail too: the store is
    /// poisoned).
    pub(super) failed: Option<String>,
}

impl GroupCommit {
    /// As a store is opened: every record so far is in the database, durably (without a
    /// write-ahead file, `durable` counts commits).
    pub(super) fn after_load(with_wal: bool, wal_seq: u64) -> GroupCommit {
        GroupCommit {
            durable: if with_wal { wal_seq } else { 0 },
            ..GroupCommit::default()
        }
    }
}

impl Store {
    /// How far a flush begun now reaches: the last record appended with a write-ahead
    /// file, else the last commit.
    pub(super) fn flush_target(&self, g: &GroupCommit) -> u64 {
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
    pub(super) fn wait_durable(&self, seq: u64, generation: u64) -> Result<()> {
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
    pub(super) fn write_tail(&self, wal: &dyn StorageBackend, generation: u64) -> Result<u64> {
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
    pub(super) fn restart_wal(&self, writer: &mut Writer) {
        let _w = lock(&self.wal_write);
        lock(&self.wal_tail).discard();
        writer.wal_at = 0;
    }

    /// When a batch's members' records are enough to commit it ([`BATCH_BYTES_MAX`]).
    pub(super) fn batch_bytes_max(&self) -> usize {
        (self.options.cache_bytes / 128).min(BATCH_BYTES_MAX)
    }

    /// Commits the open batch, if any (without fsync: its members' records are in the
    /// write-ahead file). A failure poisons the store; the members' records put their
    /// writes back when it recovers (or is reopened).
    pub(super) fn close_batch(&self) -> Result<()> {
        self.close_batch_if(|_| true)
    }

    /// [`Store::close_batch`], if the open batch is one `which` picks.
    pub(super) fn close_batch_if(&self, which: impl FnOnce(&Batch) -> bool) -> Result<()> {
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
    pub(super) fn settled(&self, _batch: &MutexGuard<'_, Option<Batch>>) {
        self.unsettled.store(false, Ordering::SeqCst);
        self.batch_back.notify_all();
    }

    /// A batch that will not commit (its transaction is dropped): the store is poisoned,
    /// since the writer's state (ahead of the database) cannot be trusted, and readers are
    /// refused, since commits that returned are missing from the database until the
    /// records put them back (a recovery, or a reopen).
    pub(super) fn abandon_batch(&self, why: &dyn std::fmt::Display) {
        self.poison(why);
        self.batch_back.notify_all();
    }

    /// Puts a joined batch back, open, for the next writer or a reader.
    pub(super) fn put_back_batch(&self, batch: Batch) {
        *lock(&self.batch) = Some(batch);
        self.unsettled.store(true, Ordering::SeqCst);
        self.batch_back.notify_all();
    }

    /// Makes every commit that has returned visible to readers: an open batch is committed
    /// first (waiting while a joiner has it). Every read starts here; it costs an atomic
    /// load when no batch is open.
    pub(super) fn settle(&self) -> Result<()> {
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

    /// The writer lock for work outside a write transaction; an open batch (which holds
    /// redb's one write transaction) is committed first.
    pub(super) fn lock_writer(&self) -> Result<WriterGuard<'_>> {
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
    pub(super) fn checkpoint_with(&self, writer: &mut Writer, truncate: bool) -> Result<()> {
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
    /// [`Options::checkpoint_bytes`](crate::Options::checkpoint_bytes), without emptying it).
    pub fn checkpoint(&self) -> Result<()> {
        self.check_poisoned()?;
        let mut w = self.lock_writer()?;
        let r = self.checkpoint_with(&mut w, true);
        drop(w);
        self.finish(r)
    }
}

impl<'s> WriteTx<'s> {
    /// Commits: one stamp for every write, state and log entry in one redb transaction.
    /// In-memory state (clock, digest, counts, names) moves only once redb has committed.
    pub fn commit(self) -> Result<Committed> {
        self.check_served_commit()?;
        let store = self.store;
        let r = self.commit_inner();
        store.finish(r)
    }

    /// Joins the open batch or begins a transaction, prepares this one into it, and
    /// commits it as a recorded or an unrecorded commit.
    fn commit_inner(mut self) -> Result<Committed> {
        let store = self.store;
        let (mut txn, joined) = store.join_batch(self.txn.take())?;
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
        let Some(mut prepared) = prepared else {
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
            writer,
            new_names,
            durability,
            ..
        } = self;
        let record = prepared.record.take();
        let sealed = Sealed {
            txn,
            joined,
            taken,
            writer,
            new_names,
            durability,
            prepared,
        };
        match (&store.wal, record) {
            (Some(wal), Some(record)) => sealed.recorded_commit(wal.as_ref(), record),
            _ => sealed.unrecorded_commit(),
        }
    }
}

/// A prepared transaction on its way to the disk: its redb transaction (the batch's, if it
/// joined one), the writer, and what moves in memory once it is committed.
struct Sealed<'s> {
    txn: OpenTxn,
    /// The batch it joined.
    joined: Option<Members>,
    taken: JoinedBatch<'s>,
    writer: WriterGuard<'s>,
    new_names: NewNames,
    durability: Durability,
    prepared: Prepared,
}

impl Sealed<'_> {
    /// Recorded: appended to the write-ahead file, then committed to redb without fsync —
    /// by itself, or in one redb commit with the writers waiting behind it.
    fn recorded_commit(self, wal: &dyn StorageBackend, record: Vec<u8>) -> Result<Committed> {
        let Sealed {
            txn,
            joined,
            mut taken,
            mut writer,
            new_names,
            durability,
            prepared: mut p,
        } = self;
        let store = taken.store;
        let at = writer.wal_at;
        let end = at + record.len() as u64;
        if end > writer.wal_len {
            // Backends may refuse writes past the end; grow in steps, not per record.
            // On failure nothing of this transaction is in the file.
            let len = end.next_multiple_of(WAL_GROWTH);
            wal.set_len(len).map_err(redb::Error::from)?;
            writer.wal_len = len;
        }
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
        // The sync covers this record as soon as it is appended, while the writers behind
        // this one fill the batch. A deferred commit writes its record (a process that dies
        // keeps it; a machine that does may not). Either way the batch stays open: the
        // next reader commits it.
        if durability == Durability::Immediate {
            store.wait_durable(seq, generation)?;
        } else {
            store.write_tail(wal, generation)?;
        }
        Ok(p.committed)
    }

    /// Not recorded: a redb commit, durable by itself or with a group (see [`Mode`]).
    fn unrecorded_commit(self) -> Result<Committed> {
        let Sealed {
            txn,
            joined,
            mut taken,
            mut writer,
            new_names,
            durability,
            prepared: p,
        } = self;
        let store = taken.store;
        let mode = store.unrecorded_mode(durability);
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
    }
}

impl Store {
    /// The open batch's transaction and members, taken to join it, or a new transaction
    /// (`txn`, if [`WriteTx::raw`] began one).
    fn join_batch(
        &self,
        txn: Option<redb::WriteTransaction>,
    ) -> Result<(OpenTxn, Option<Members>)> {
        let open = lock(&self.batch).take();
        match (txn, open) {
            (Some(txn), None) => Ok((OpenTxn::open(txn)?, None)),
            (None, Some(b)) => Ok((b.txn, Some(b.members))),
            (None, None) => Ok((OpenTxn::open(self.db()?.begin_write()?)?, None)),
            (Some(txn), Some(b)) => {
                // `raw` commits any open batch before it begins its own transaction.
                self.abandon_batch(&"two write transactions");
                drop((txn, b.txn));
                Err(internal("two write transactions"))
            }
        }
    }

    /// How a commit that is not recorded reaches the disk.
    fn unrecorded_mode(&self, durability: Durability) -> Mode {
        match &self.wal {
            // Nothing may sit in redb unrecorded while commits go to the write-ahead file:
            // a commit that cannot be recorded is durable by itself (and makes the batch it
            // joined durable with it).
            Some(_) => Mode::Direct,
            // With other writers waiting (or a flush under way), a durable commit joins a
            // group: commit without fsync now, then wait for one fsync for all.
            None if durability == Durability::Deferred => Mode::Deferred,
            None if self.waiting.load(Ordering::SeqCst) > 0 || lock(&self.group).flushing => {
                Mode::Grouped
            }
            None => Mode::Direct,
        }
    }
}

/// How a transaction that is not recorded in the write-ahead file reaches the disk.
pub(super) enum Mode {
    /// A durable redb commit (making every earlier commit durable too).
    Direct,
    /// No write-ahead file: a redb commit without fsync, then one empty durable commit
    /// for the group.
    Grouped,
    /// No write-ahead file: a redb commit without fsync, durable with a later one.
    Deferred,
}
