//! Writes only the sync server makes on the store it serves.

use std::collections::BTreeMap;

use super::{NameView, NetOp, WriteTx};
use crate::conflict::ObjectFields;
use crate::error::{NameKind, Result};
use crate::value::{Pk, Value};

impl WriteTx<'_> {
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
            new: &self.new_names,
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
