//! A store served by a sync server, and the writes only the server makes.
//!
//! Clients receive what enters the server's history, and only the server's own
//! transactions record their log entry there (`WriteTx::record_in_history`). A change committed
//! to a served store any other way would stay on the server and never reach a client, so
//! such commits are refused with [`Error::ServedStore`]; reads, and the server's own
//! bookkeeping (tables of its own, no objects), go on as before.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use super::names::NameView;
use super::write_tx::NetOp;
use super::{Store, WriteTx};
use crate::conflict::ObjectFields;
use crate::error::{Error, NameKind, Result};
use crate::value::{Pk, Value};

impl Store {
    /// One more (`true`) or one fewer sync server serves this store.
    pub(crate) fn set_served(&self, on: bool) {
        if on {
            self.served.fetch_add(1, Ordering::SeqCst);
        } else {
            self.served.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Whether a [`SyncServer`](crate::sync::server::SyncServer) serves this store: then it
    /// refuses writes that do not go through the server ([`Error::ServedStore`]).
    pub fn is_served(&self) -> bool {
        self.served.load(Ordering::SeqCst) > 0
    }

    /// Refuses a change made outside the server while a server serves the store.
    pub(super) fn check_unserved(&self, through: &'static str) -> Result<()> {
        if self.is_served() {
            return Err(Error::ServedStore { through });
        }
        Ok(())
    }
}

impl WriteTx<'_> {
    /// Refuses to commit object changes to a served store unless the server records them
    /// into its history (it set a log hook).
    pub(super) fn check_served_commit(&self) -> Result<()> {
        if self.history.is_some() {
            return Ok(());
        }
        let changes_objects = self
            .pending
            .values()
            .any(|p| p.op.is_some() || p.after.is_some() || !p.remote.is_empty() || p.purge);
        if changes_objects {
            self.store.check_unserved("write")?;
        }
        Ok(())
    }

    /// Makes the object read exactly `target` (`None`: deleted) as this transaction sees
    /// it, written by this transaction: fields that change are set (an update, when the
    /// object stays live and keeps every field), otherwise the object is inserted or
    /// deleted. No schema check: the sync server carries out conflict decisions with values
    /// replicas wrote (or a merged value it has checked), whatever the schema says since.
    pub(crate) fn force(
        &mut self,
        collection: &str,
        pk: &Pk,
        target: Option<BTreeMap<String, Value>>,
    ) -> Result<()> {
        let key = self.load(collection, pk)?;
        for name in target.iter().flat_map(BTreeMap::keys) {
            self.intern(NameKind::Field, name)?;
        }
        let current = self.view(&key)?;
        if current == target {
            return Ok(());
        }
        let Some(p) = self.pending.get_mut(&key) else {
            return Ok(());
        };
        let op = p.op.take();
        p.op = Some(match (current, target, op) {
            (_, None, _) => NetOp::Delete,
            (Some(now), Some(want), op)
                if !matches!(op, Some(NetOp::Insert(_)))
                    && now.keys().all(|k| want.contains_key(k)) =>
            {
                let mut set = match op {
                    Some(NetOp::Update(set)) => set,
                    _ => BTreeMap::new(),
                };
                set.extend(want.into_iter().filter(|(k, v)| now.get(k) != Some(v)));
                NetOp::Update(set)
            }
            (_, Some(want), _) => NetOp::Insert(want),
        });
        Ok(())
    }

    /// The objects this transaction deletes that were live before it, with their fields
    /// as they were (raw names: counter and text parts included).
    pub(crate) fn deleted_live(&self) -> Result<Vec<ObjectFields>> {
        let names = self.store.names();
        let view = NameView {
            base: &names,
            new: Some(&self.new_names),
        };
        let mut out = Vec::new();
        for (key, p) in &self.pending {
            if self.live(key)? {
                continue;
            }
            let state = match (&p.after, &p.before) {
                (Some(after), _) => after,
                (None, Some(before)) => before.state()?,
                (None, None) => continue,
            };
            if !state.is_live() {
                continue;
            }
            let fields = view.live_fields(state)?.into_iter().collect();
            out.push((view.name(p.coll)?.to_owned(), p.pk.clone(), fields));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::error::Error;
    use crate::store::Store;
    use crate::sync::server::{ServerConfig, SyncServer};
    use crate::sync::token::Secret;

    #[test]
    fn a_served_store_refuses_writes_around_its_servers_until_the_last_one_goes() {
        let store = Arc::new(Store::open_in_memory().unwrap());
        store.write(|tx| tx.insert("C", 1, [("f", 1)])).unwrap();
        let config = ServerConfig::new(Secret::generate());
        let first = SyncServer::open(Arc::clone(&store), config.clone()).unwrap();
        let second = SyncServer::open(Arc::clone(&store), config).unwrap();
        let refused = |s: &Store| {
            let before = s.digest();
            let r = s.write(|tx| tx.set("C", 1, "f", 2));
            assert!(
                matches!(r, Err(Error::ServedStore { through: "write" })),
                "{r:?}"
            );
            assert_eq!(s.digest(), before);
        };
        refused(&store);
        // A transaction that only reads commits.
        let mut tx = store.begin().unwrap();
        assert!(tx.get("C", 1).unwrap().is_some());
        tx.commit().unwrap();
        // The server's own write goes through.
        first.write(|tx| tx.set("C", 1, "f", 3)).unwrap();
        drop(first);
        refused(&store);
        drop(second);
        assert!(!store.is_served());
        store.write(|tx| tx.set("C", 1, "f", 4)).unwrap();
        let f = store.get("C", 1).unwrap().unwrap().get("f").cloned();
        assert_eq!(f, Some(crate::value::Value::Int(4)));
    }
}
