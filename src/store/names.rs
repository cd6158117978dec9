//! Collection and field names: the interner, the names a transaction adds, and the
//! view that resolves ids to names (and computes digest terms by name).

use std::collections::{BTreeMap, HashMap};
use std::sync::PoisonError;

use crate::crdt;
use crate::digest::{exists_term, field_term, Digest, DigestSum};
use crate::error::{NameKind, Result};
use crate::merge::ObjectState;
use crate::value::{validate_name, Pk, Value};

use super::format::corrupt;
use super::write_tx::WriteTx;
use super::Store;

/// Collection and field names and their ids. Ids are local to one store.
#[derive(Debug, Default)]
pub(super) struct Interner {
    pub(super) by_name: HashMap<String, u32>,
    pub(super) by_id: Vec<String>,
}

/// The names a transaction interns, numbered after the committed ones, found by name in
/// one lookup (a transaction writing an object of N new fields looks each one up: searched
/// in a list, that was N² comparisons).
#[derive(Debug, Default)]
pub(super) struct NewNames {
    pub(super) by_pos: Vec<String>,
    /// Name → position in `by_pos`.
    pub(super) by_name: HashMap<String, usize>,
}

impl NewNames {
    pub(super) fn len(&self) -> usize {
        self.by_pos.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.by_pos.is_empty()
    }

    pub(super) fn push(&mut self, name: &str) {
        self.by_name.insert(name.to_owned(), self.by_pos.len());
        self.by_pos.push(name.to_owned());
    }

    /// Forgets every name after the first `len`.
    pub(super) fn truncate(&mut self, len: usize) {
        for name in self.by_pos.drain(len.min(self.by_pos.len())..) {
            self.by_name.remove(&name);
        }
    }
}

/// Resolves ids to names: committed ones, then those a transaction is adding.
pub(super) struct NameView<'a> {
    pub(super) base: &'a Interner,
    pub(super) new: Option<&'a NewNames>,
}

impl NameView<'_> {
    pub(super) fn name(&self, id: u32) -> Result<&str> {
        let i = id as usize;
        let base = self.base.by_id.len();
        self.base
            .by_id
            .get(i)
            .or_else(|| self.new?.by_pos.get(i.wrapping_sub(base)))
            .map(String::as_str)
            .ok_or_else(|| corrupt(format!("unknown name id {id}")))
    }

    pub(super) fn id(&self, name: &str) -> Option<u32> {
        if let Some(&id) = self.base.by_name.get(name) {
            return Some(id);
        }
        let pos = *self.new?.by_name.get(name)?;
        Some((self.base.by_id.len() + pos) as u32)
    }

    /// Adds (`add`) or subtracts every digest term of a live object.
    pub(super) fn all_terms(
        &self,
        coll: &str,
        pk: &Pk,
        state: &ObjectState<u32>,
        sum: &mut DigestSum,
        add: bool,
    ) -> Result<()> {
        let Some((stamp, true)) = state.exists else {
            return Ok(());
        };
        let mut apply = |d: Digest| if add { sum.add(&d) } else { sum.sub(&d) };
        apply(exists_term(coll, pk, stamp));
        for (f, s, v) in &state.fields {
            apply(field_term(coll, pk, self.name(*f)?, *s, v));
        }
        Ok(())
    }

    /// Moves `sum` from the object's `before` state to `after`, hashing only what changed,
    /// and returns the change in live objects (-1, 0, 1).
    pub(super) fn digest_delta(
        &self,
        coll: &str,
        pk: &Pk,
        before: Option<&ObjectState<u32>>,
        after: &ObjectState<u32>,
        sum: &mut DigestSum,
    ) -> Result<i64> {
        let was = before.is_some_and(ObjectState::is_live);
        let is = after.is_live();
        let same_existence = before.map(|b| b.exists) == Some(after.exists);
        match (before, was && is && same_existence) {
            (Some(b), true) => {
                // Same incarnation: only fields whose stamp moved change terms.
                let (mut i, mut j) = (0, 0);
                let (old, new) = (&b.fields, &after.fields);
                while i < old.len() || j < new.len() {
                    let order = match (old.get(i), new.get(j)) {
                        (Some(o), Some(n)) => o.0.cmp(&n.0),
                        (Some(_), None) => std::cmp::Ordering::Less,
                        _ => std::cmp::Ordering::Greater,
                    };
                    match order {
                        std::cmp::Ordering::Less => {
                            let (f, s, v) = &old[i];
                            sum.sub(&field_term(coll, pk, self.name(*f)?, *s, v));
                            i += 1;
                        }
                        std::cmp::Ordering::Greater => {
                            let (f, s, v) = &new[j];
                            sum.add(&field_term(coll, pk, self.name(*f)?, *s, v));
                            j += 1;
                        }
                        std::cmp::Ordering::Equal => {
                            let ((f, os, ov), (_, ns, nv)) = (&old[i], &new[j]);
                            if os != ns {
                                let name = self.name(*f)?;
                                sum.sub(&field_term(coll, pk, name, *os, ov));
                                sum.add(&field_term(coll, pk, name, *ns, nv));
                            }
                            i += 1;
                            j += 1;
                        }
                    }
                }
            }
            _ => {
                if let Some(b) = before {
                    self.all_terms(coll, pk, b, sum, false)?;
                }
                self.all_terms(coll, pk, after, sum, true)?;
            }
        }
        Ok(i64::from(is) - i64::from(was))
    }

    pub(super) fn live_fields(&self, state: &ObjectState<u32>) -> Result<BTreeMap<String, Value>> {
        state
            .fields
            .iter()
            .map(|(f, _, v)| Ok((self.name(*f)?.to_owned(), v.clone())))
            .collect()
    }

    /// [`NameView::live_fields`] of a state read only to be returned: values move out.
    pub(super) fn owned_live_fields(
        &self,
        state: ObjectState<u32>,
    ) -> Result<BTreeMap<String, Value>> {
        state
            .fields
            .into_iter()
            .map(|(f, _, v)| Ok((self.name(f)?.to_owned(), v)))
            .collect()
    }
}

impl Store {
    /// Names a transaction interned, before it commits: a reader must never find an id it
    /// cannot map (a commit that then fails poisons the store), and the next member of a
    /// batch must find them.
    pub(super) fn add_names(&self, new_names: Vec<String>) {
        if new_names.is_empty() {
            return;
        }
        let mut names = self.names.write().unwrap_or_else(PoisonError::into_inner);
        for n in new_names {
            let id = names.by_id.len() as u32;
            names.by_name.insert(n.clone(), id);
            names.by_id.push(n);
        }
    }

    pub(super) fn names(&self) -> std::sync::RwLockReadGuard<'_, Interner> {
        self.names.read().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<'s> WriteTx<'s> {
    pub(super) fn intern(&mut self, kind: NameKind, name: &str) -> Result<u32> {
        let names = self.store.names();
        let view = NameView {
            base: &names,
            new: Some(&self.new_names),
        };
        // A name already interned was checked when it was, as a field's or a collection's
        // (they share the table, and a field's may not do for a collection: those are
        // checked once per transaction).
        let checked = |name| match kind {
            NameKind::Field => crdt::validate_field_name(name),
            NameKind::Collection => validate_name(kind, name),
        };
        if let Some(id) = view.id(name) {
            if kind == NameKind::Collection && self.collection_checked != Some(id) {
                checked(name)?;
                self.collection_checked = Some(id);
            }
            return Ok(id);
        }
        checked(name)?;
        let id = u32::try_from(names.by_id.len() + self.new_names.len())
            .map_err(|_| corrupt("name table full"))?;
        drop(names);
        self.new_names.push(name);
        Ok(id)
    }
}
