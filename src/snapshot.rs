//! The read snapshot `Store::get` shares between calls: one redb read transaction with the
//! `objects` table open, kept while no commit lands.
//!
//! Beginning a redb read transaction and opening a table cost about a tenth of a
//! whole-object read (a lock, a lookup in the table tree, reference counts, and as much
//! again to drop them). Reads between two commits see the same state, so they can share
//! one.
//!
//! Two rules keep this honest:
//! - **Never stale.** Every release of the writer lock moves the epoch (after whatever commit
//!   it covered), and a snapshot is used only while the epoch is the one read *before* the
//!   snapshot was begun. So a read that starts after a commit returned — in any thread that
//!   knows it returned — begins a new snapshot, which sees it.
//! - **Never pinned for long.** redb cannot reuse a page while a read transaction that may
//!   see it is alive, so a kept snapshot would make the file grow under a stream of
//!   commits. Taking the writer lock drops the kept snapshot; at most one, begun before the
//!   current write, can be kept meanwhile (as any reader running alongside it would).
//!
//! A reader holds its `Arc<Snapshot>` until it has finished with what it read: redb's row
//! guards keep their page, not the read transaction (`Row` in `store.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::error::Result;

/// The `objects` table as one read transaction sees it.
pub(crate) type ObjectsTable = redb::ReadOnlyTable<&'static [u8], &'static [u8]>;

/// The kept snapshot and the epoch it belongs to.
#[derive(Default)]
pub(crate) struct Snapshots {
    /// Moves each time the writer lock is released.
    epoch: AtomicU64,
    kept: RwLock<Option<Arc<Snapshot>>>,
}

/// One read transaction's `objects` table, usable while `epoch` is current.
pub(crate) struct Snapshot {
    epoch: u64,
    /// The table (it holds its read transaction open).
    pub(crate) objects: ObjectsTable,
}

impl std::fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshots")
            .field("epoch", &self.epoch.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Snapshots {
    /// A snapshot that sees every commit that returned before this call: the kept one if
    /// no commit landed since it was begun, else a new one from `open` (kept for the next
    /// reads).
    pub(crate) fn current(
        &self,
        open: impl FnOnce() -> Result<ObjectsTable>,
    ) -> Result<Arc<Snapshot>> {
        // Read before beginning a transaction: a snapshot begun after this load sees every
        // commit whose release moved the epoch to this value.
        let epoch = self.epoch.load(Ordering::Acquire);
        if let Some(s) = self
            .kept
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|s| s.epoch == epoch)
        {
            return Ok(Arc::clone(s));
        }
        let fresh = Arc::new(Snapshot {
            epoch,
            objects: open()?,
        });
        let replaced = {
            let mut kept = self.kept.write().unwrap_or_else(PoisonError::into_inner);
            // Another reader may have kept a snapshot of this epoch meanwhile: either will do.
            kept.replace(Arc::clone(&fresh))
        };
        // Dropping a snapshot ends its read transaction (redb takes a lock): outside ours.
        drop(replaced);
        Ok(fresh)
    }

    /// The writer lock was taken: let go of the kept snapshot, so that it does not keep the
    /// coming commits from reusing pages.
    pub(crate) fn writer_locked(&self) {
        let dropped = self
            .kept
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(dropped);
    }

    /// The writer lock is being released, after any commit it covered: snapshots begun
    /// before now are no longer current.
    pub(crate) fn writer_released(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}
