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
        if stamp < self.floor {
            return Outcome::Stale;
        }
        match self.fields.binary_search_by(|(f, _, _)| f.cmp(&field)) {
            Ok(i) if self.fields[i].1 >= stamp => Outcome::Stale,
            Ok(i) => {
                self.fields[i] = (field, stamp, value);
                Outcome::Applied
            }
            Err(i) => {
                self.fields.insert(i, (field, stamp, value));
                Outcome::Applied
            }
        }
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
        for (f, s, v) in other.fields {
            changed |= self.apply_field(f, s, v) == Outcome::Applied;
        }
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

    #[test]
    fn concurrent_update_does_not_resurrect() {
        let mut o = ObjectState::<u32>::default();
        o.apply_exists(st(1, 1), true);
        o.apply_exists(st(3, 1), false);
        o.apply_field(1, st(4, 2), Value::Int(5));
        assert!(!o.is_live());
    }
}
