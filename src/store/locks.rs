//! Locks that survive a panicking holder (the store's state stays consistent: a panic
//! poisons the store, not its locks).

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The lock if it is free now (a recovery never waits: see [`Store::recover`]).
pub(super) fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// The write lock if it is free now.
pub(super) fn try_write<T>(m: &RwLock<T>) -> Option<std::sync::RwLockWriteGuard<'_, T>> {
    match m.try_write() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}
