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
