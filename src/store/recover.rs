//! Poisoning after a storage failure, and recovering from it by opening the database
//! again.

use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::wal;

use super::commit::GroupCommit;
use super::format::corrupt;
use super::locks::{lock, try_lock, try_write};
use super::{Store, RECOVERY_BACKOFF_MAX};

/// A poisoned store's schedule of recoveries.
#[derive(Debug, Default)]
pub(super) struct Recovery {
    /// The earliest time of the next attempt (ms of [`Options::time`]); `None` while the
    /// store is not poisoned.
    pub(super) due_ms: Option<u64>,
    /// The wait after the next failed attempt.
    pub(super) backoff: std::time::Duration,
    /// Attempts that failed since the store was poisoned.
    pub(super) failed: u32,
    /// Why the store was poisoned.
    pub(super) cause: String,
}

pub(super) fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Store {
    /// How many times the store has recovered from a storage failure (see
    /// [`Options::recover_after`]) since it was opened.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Poisons the store after a storage failure (the first one is logged, and schedules a
    /// recovery: see [`Options::recover_after`]).
    pub(super) fn poison(&self, why: &dyn std::fmt::Display) {
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
    pub(super) fn try_recover(&self) -> bool {
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
    pub(super) fn recover(&self) -> Result<bool> {
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
    pub(super) fn check_poisoned(&self) -> Result<()> {
        if self.poisoned.load(Ordering::SeqCst) && !self.try_recover() {
            Err(Error::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Poisons the store if a write failed in storage: after a failed fsync nothing on disk
    /// can be trusted until the database is opened again.
    pub(super) fn finish<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e @ Error::Storage(_)) = &r {
            self.poison(e);
        }
        r
    }
}
