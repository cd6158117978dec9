//! The Updates log: reading it, the last sync, and retention.

use redb::{ReadableDatabase, ReadableTable};

use crate::clock::Stamp;
use crate::error::{Error, Result};
use crate::log::{LogEntry, LogPos};

use super::format::{corrupt, Head, LOG, META, META_HEAD, META_LAST_SYNC};
use super::locks::lock;
use super::names::NameView;
use super::Store;

impl Store {
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
    pub(super) fn read_log<T>(
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
    /// [`Options::keep_acknowledged_for`](crate::Options::keep_acknowledged_for).
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
    pub(super) fn acknowledged_before(
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
}
