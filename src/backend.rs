//! The storage backend redb writes through: the one given, with one failure made harmless.
//!
//! At the end of a durable commit that freed the top of its file, redb shrinks the file,
//! after the commit is on stable storage; a failure there returns an error from a commit
//! that is already durable, and after a power cut the "failed" write is there (invariant 3:
//! a write that returned an error left no trace; an application that retries an increment
//! applies it twice). Shrinking only gives space back, so here a failed shrink is not an
//! error: the file stays as long as it was, which redb accepts (a file longer than its
//! layout is what a crash between growing it and committing leaves too).

use std::io;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use redb::{BackendError, StorageBackend};

/// A backend whose failed shrinks succeed (see the module docs).
#[derive(Debug)]
pub(crate) struct ShrinkOptional<B>(pub(crate) B);

impl<B: StorageBackend> StorageBackend for ShrinkOptional<B> {
    fn len(&self) -> Result<u64, io::Error> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.0.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        match self.0.set_len(len) {
            // The length is unchanged: a shrink that did not happen loses nothing.
            Err(_) if self.0.len().is_ok_and(|now| len < now) => Ok(()),
            r => r,
        }
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.0.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.0.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        self.0.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.0.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.query_lock_range(start, end)
    }
}

/// A backend kept by the store for as long as it lives, so that a recovery can open the
/// database again over the same storage (see `Store::recover`): redb takes its backend by
/// value and closes it with the database. The store's own close (or drop) closes it.
#[derive(Debug)]
pub(crate) struct Kept {
    inner: Box<dyn StorageBackend>,
    closed: AtomicBool,
}

impl Kept {
    pub(crate) fn new(inner: impl StorageBackend) -> Arc<Kept> {
        Arc::new(Kept {
            inner: Box::new(inner),
            closed: AtomicBool::new(false),
        })
    }

    /// Closes the backend (once; later calls do nothing).
    pub(crate) fn close(&self) -> Result<(), io::Error> {
        if self.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.inner.close()
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        // A close the store could not report (it was dropped, not closed).
        let _ = self.close();
    }
}

/// One database's handle on a [`Kept`] backend: redb's close of the database leaves the
/// backend open (and its locks held) for the next database over it.
#[derive(Debug)]
pub(crate) struct Shared(pub(crate) Arc<Kept>);

impl StorageBackend for Shared {
    fn len(&self) -> Result<u64, io::Error> {
        self.0.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.0.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.0.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.0.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.0.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), io::Error> {
        Ok(())
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.0.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.inner.query_lock_range(start, end)
    }
}
