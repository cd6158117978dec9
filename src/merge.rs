//! The merge rule: per-field last-writer-wins by stamp, and object existence as a register.
//!
//! Pure logic, no redb and no network. An object's state is a function of the *set* of
//! writes it has received, so any order and any number of duplicates give the same state:
//!
//! - `exists` is the value of the highest-stamped insert or delete;
//! - `floor` is the highest stamp of any insert or delete: an insert or delete clears every
//!   field written before it, so re-inserting a deleted key never brings back stale fields;
//! - each field holds its highest-stamped write whose stamp is at or above `floor` (a field
//!   written in the same transaction as the insert shares its stamp).

use serde::{Deserialize, Serialize};

use crate::clock::Stamp;
use crate::value::Value;

/// Whether an incoming write changed the state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The write won and is now part of the state.
    Applied,
    /// The state already held this write or a newer one; nothing changed.
    Stale,
}

/// The merged state of one object. `F` is the field key (an interned id in the store).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectState<F> {
    /// The existence register: stamp and whether the object is alive.
    pub exists: Option<(Stamp, bool)>,
    /// Fields written below this stamp have been cleared by an insert or a delete.
    pub floor: Stamp,
    /// Field → (stamp, value), sorted by field key.
    pub fields: Vec<(F, Stamp, Value)>,
}

impl<F> Default for ObjectState<F> {
    fn default() -> Self {
        ObjectState {
            exists: None,
            floor: Stamp::ZERO,
            fields: Vec::new(),
        }
    }
}

impl<F: Ord + Clone> ObjectState<F> {
    /// Whether the object is visible (inserted and not deleted since).
    pub fn is_live(&self) -> bool {
        matches!(self.exists, Some((_, true)))
    }

    /// The field's current stamp and value, if it has one.
    pub fn field(&self, field: F) -> Option<(Stamp, &Value)> {
        self.fields
            .binary_search_by(|(f, _, _)| f.cmp(&field))
            .ok()
            .map(|i| (self.fields[i].1, &self.fields[i].2))
    }

    /// The highest stamp of anything in this object (what a deleting client saw).
    pub fn max_stamp(&self) -> Option<Stamp> {
        let fields = self.fields.iter().map(|(_, s, _)| *s);
        let exists = self.exists.map(|(s, _)| s);
        fields.chain(exists).max()
    }

    /// Merges one field write.
    pub fn apply_field(&mut self, field: F, stamp: Stamp, value: Value) -> Outcome {
        let at = self.fields.binary_search_by(|(f, _, _)| f.cmp(&field));
        let current = at.ok().map(|i| self.fields[i].1);
        if !wins(self.floor, current, stamp) {
            return Outcome::Stale;
        }
        match at {
            Ok(i) => self.fields[i] = (field, stamp, value),
            Err(i) => self.fields.insert(i, (field, stamp, value)),
        }
        Outcome::Applied
    }

    /// Merges field writes, with the same outcomes (in the writes' order) and the same state
    /// as [`ObjectState::apply_field`] on each in turn. Many writes cost one sort of the
    /// writes and one pass over the fields: applied one by one, each new field shifts every
    /// field after it, which made an object of N new fields cost N² moves.
    pub fn apply_fields(&mut self, writes: Vec<(F, Stamp, Value)>) -> Vec<Outcome> {
        /// Below this many writes, one by one is as cheap as the sort.
        const ONE_BY_ONE: usize = 16;
        if writes.len() <= ONE_BY_ONE {
            return writes
                .into_iter()
                .map(|(f, s, v)| self.apply_field(f, s, v))
                .collect();
        }
        let mut outcomes = vec![Outcome::Stale; writes.len()];
        let mut order: Vec<(usize, (F, Stamp, Value))> = writes.into_iter().enumerate().collect();
        // Stable: writes to one field stay in their order, as one by one (where a later
        // write at an equal stamp is stale).
        order.sort_by(|a, b| a.1 .0.cmp(&b.1 .0));
        let floor = self.floor;
        let old = std::mem::take(&mut self.fields);
        let mut fields = Vec::with_capacity(old.len() + order.len());
        let mut old = old.into_iter().peekable();
        let mut order = order.into_iter().peekable();
        while let Some((i, (f, s, v))) = order.next() {
            while old.peek().is_some_and(|(o, _, _)| *o < f) {
                fields.extend(old.next());
            }
            let mut current = old.next_if(|(o, _, _)| *o == f).map(|(_, s, v)| (s, v));
            let mut next = Some((i, s, v));
            while let Some((i, s, v)) = next {
                if wins(floor, current.as_ref().map(|(c, _)| *c), s) {
                    outcomes[i] = Outcome::Applied;
                    current = Some((s, v));
                }
                next = order
                    .next_if(|(_, w)| w.0 == f)
                    .map(|(j, (_, s, v))| (j, s, v));
            }
            fields.extend(current.map(|(s, v)| (f, s, v)));
        }
        fields.extend(old);
        self.fields = fields;
        outcomes
    }

    /// Merges another replica's whole state of the same object (the join of both write
    /// sets: the same result as merging every write behind `other` one by one).
    pub fn merge_state(&mut self, other: ObjectState<F>) -> bool {
        let before = (self.exists, self.floor, self.fields.len());
        let mut changed = false;
        if let Some((s, alive)) = other.exists {
            changed |= self.apply_exists(s, alive) == Outcome::Applied;
        }
        if other.floor > self.floor {
            self.floor = other.floor;
            let floor = self.floor;
            self.fields.retain(|(_, s, _)| *s >= floor);
            changed = true;
        }
        let outcomes = self.apply_fields(other.fields);
        changed |= outcomes.contains(&Outcome::Applied);
        changed || before != (self.exists, self.floor, self.fields.len())
    }

    /// Merges an insert (`alive = true`) or a delete (`alive = false`).
    pub fn apply_exists(&mut self, stamp: Stamp, alive: bool) -> Outcome {
        if stamp > self.floor {
            self.floor = stamp;
            self.fields.retain(|(_, s, _)| *s >= stamp);
        }
        match self.exists {
            Some((s, _)) if s >= stamp => Outcome::Stale,
            _ => {
                self.exists = Some((stamp, alive));
                Outcome::Applied
            }
        }
    }
}

/// The merge rule for one field write, in one place: a write at `incoming` loses if it is
/// older than the object's `floor` (its latest insert or delete) or not newer than the
/// field's `current` stamp (`None`: the field holds no write since the floor).
pub(crate) fn wins(floor: Stamp, current: Option<Stamp>, incoming: Stamp) -> bool {
    incoming >= floor && current.is_none_or(|c| c < incoming)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ReplicaId;

    fn st(t: u64, r: u64) -> Stamp {
        Stamp {
            time: t,
            replica: ReplicaId(r),
        }
    }

    #[test]
    fn higher_stamp_wins_and_ties_break_on_replica() {
        let mut o = ObjectState::<u32>::default();
        assert_eq!(o.apply_field(1, st(5, 1), Value::Int(1)), Outcome::Applied);
        assert_eq!(o.apply_field(1, st(4, 9), Value::Int(2)), Outcome::Stale);
        assert_eq!(o.apply_field(1, st(5, 2), Value::Int(3)), Outcome::Applied);
        assert_eq!(o.apply_field(1, st(5, 2), Value::Int(3)), Outcome::Stale);
        assert_eq!(o.field(1).map(|(_, v)| v.clone()), Some(Value::Int(3)));
    }

    #[test]
    fn reinsert_does_not_bring_back_stale_fields() {
        let mut o = ObjectState::<u32>::default();
        o.apply_exists(st(1, 1), true);
        o.apply_field(1, st(1, 1), Value::Int(1));
        o.apply_field(2, st(2, 1), Value::Int(2));
        o.apply_exists(st(3, 1), false);
        assert!(!o.is_live());
        o.apply_exists(st(4, 1), true);
        o.apply_field(1, st(4, 1), Value::Int(10));
        assert!(o.is_live());
        assert_eq!(o.field(2), None);
        // A late write from before the delete stays out.
        assert_eq!(o.apply_field(2, st(2, 7), Value::Int(9)), Outcome::Stale);
    }

    proptest::proptest! {
        /// Many writes at once leave the state one by one leaves, with the same outcomes:
        /// ties, older writes, writes below the floor and one field written twice included.
        #[test]
        fn writes_at_once_merge_as_one_by_one(
            held in proptest::collection::vec((0u32..64, 0u64..8, proptest::prelude::any::<i64>()), 0..40),
            floor in 0u64..4,
            writes in proptest::collection::vec((0u32..64, 0u64..8, 0u64..3, proptest::prelude::any::<i64>()), 0..60),
        ) {
            let mut one = ObjectState::<u32>::default();
            one.apply_exists(st(floor, 1), true);
            for (f, t, v) in held {
                one.apply_field(f, st(t, 1), Value::Int(v));
            }
            let mut all = one.clone();
            let writes: Vec<(u32, Stamp, Value)> = writes
                .into_iter()
                .map(|(f, t, r, v)| (f, st(t, r), Value::Int(v)))
                .collect();
            let expected: Vec<Outcome> = writes
                .iter()
                .map(|(f, s, v)| one.apply_field(*f, *s, v.clone()))
                .collect();
            proptest::prop_assert_eq!(all.apply_fields(writes), expected);
            proptest::prop_assert_eq!(all, one);
        }
    }

    proptest::proptest! {
        /// `wins` is the rule as DESIGN.md states it: a write older than the floor, or not
        /// newer than the current stamp, loses; stamps order by time, then replica.
        #[test]
        fn wins_is_the_merge_rule(
            floor in (0u64..6, 0u64..3),
            current in proptest::option::of((0u64..6, 0u64..3)),
            incoming in (0u64..6, 0u64..3),
        ) {
            let older_than_floor = incoming < floor;
            let not_newer = current.is_some_and(|c| incoming <= c);
            let stamp = |(t, r): (u64, u64)| st(t, r);
            proptest::prop_assert_eq!(
                wins(stamp(floor), current.map(stamp), stamp(incoming)),
                !(older_than_floor || not_newer)
            );
        }
    }

    #[test]
    fn concurrent_update_does_not_resurrect() {
        let mut o = ObjectState::<u32>::default();
        o.apply_exists(st(1, 1), true);
        o.apply_exists(st(3, 1), false);
        o.apply_field(1, st(4, 2), Value::Int(5));
        assert!(!o.is_live());
    }
}
