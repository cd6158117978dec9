//! Read transactions: the database guard, the kept read snapshot, and rows read from it.

use std::sync::{Arc, PoisonError};

use redb::{AccessGuard, Database, ReadableDatabase};

use crate::error::{Error, Result};
use crate::merge::ObjectState;
use crate::snapshot::Snapshot;
use crate::value::Pk;

use super::format::{decode_state, object_key, OBJECTS};
use super::Store;

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
    pub(super) txn: redb::ReadTransaction,
    pub(super) _db: DbGuard<'s>,
}

impl std::ops::Deref for ReadTxn<'_> {
    type Target = redb::ReadTransaction;
    fn deref(&self) -> &redb::ReadTransaction {
        &self.txn
    }
}

/// An `objects` row read from a snapshot, and the snapshot. redb's guard keeps the row's
/// page but not its read transaction: were the snapshot's last handle dropped first, a
/// commit could reclaim the page while the row is read (redb's debug builds assert on it).
pub(super) struct Row<'s> {
    // Declared first, so dropped before the snapshot, and the snapshot before the database.
    pub(super) guard: AccessGuard<'static, &'static [u8]>,
    pub(super) _snapshot: Arc<Snapshot>,
    pub(super) _db: DbGuard<'s>,
}

impl Row<'_> {
    pub(super) fn value(&self) -> &[u8] {
        self.guard.value()
    }
}

impl Store {
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
    pub(super) fn snapshot(&self) -> Result<Arc<Snapshot>> {
        self.settle()?;
        self.snapshots
            .current(|| Ok(self.db()?.begin_read()?.open_table(OBJECTS)?))
    }

    /// An object's row as of now, with its collection's id.
    pub(super) fn read_row(&self, coll: &str, pk: &Pk) -> Result<Option<(Row<'_>, u32)>> {
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

    pub(super) fn read_state(
        &self,
        coll: &str,
        pk: &Pk,
    ) -> Result<Option<(ObjectState<u32>, u32)>> {
        let Some((row, cid)) = self.read_row(coll, pk)? else {
            return Ok(None);
        };
        Ok(Some((decode_state(row.value())?, cid)))
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
