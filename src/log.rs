//! The Updates log: one entry per local transaction, holding every field write and delete it
//! made with collection, primary key, field, value, stamp and the base stamp it overwrote.
//!
//! `N` is how names are spelled: interned ids on disk, strings in changesets and the API.

use serde::{Deserialize, Serialize};

use crate::clock::Stamp;
use crate::value::{Pk, Value};

/// Position of an entry in a store's Updates log; the first entry is 1.
pub type LogPos = u64;

/// One committed local transaction. All its writes share its stamp.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogEntry<N = String> {
    /// Position in the origin's log.
    pub seq: LogPos,
    /// The transaction's stamp.
    pub stamp: Stamp,
    /// Its writes, at most one per object, in key order.
    pub writes: Vec<Write<N>>,
}

/// The net effect of one transaction on one object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Write<N = String> {
    /// Collection.
    pub collection: N,
    /// Primary key.
    pub pk: Pk,
    /// What happened to the object.
    pub op: Op<N>,
}

/// What a transaction did to one object.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op<N = String> {
    /// Created the object (or re-created a deleted one) with these fields.
    Insert {
        /// Field values, one per field.
        fields: Vec<(N, Value)>,
    },
    /// Set these fields of a live object.
    Update {
        /// Field writes, one per field.
        fields: Vec<FieldWrite<N>>,
    },
    /// Deleted the object.
    Delete {
        /// The highest stamp in the object the writer saw.
        base: Option<Stamp>,
    },
}

/// One field set by an update.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldWrite<N = String> {
    /// Field.
    pub field: N,
    /// New value.
    pub value: Value,
    /// The stamp of the value the writer overwrote (none if the field was absent).
    pub base: Option<Stamp>,
}

impl<N> Op<N> {
    /// How many field writes (plus one for an insert's or delete's existence write) this is.
    pub fn write_count(&self) -> usize {
        match self {
            Op::Insert { fields } => fields.len() + 1,
            Op::Update { fields } => fields.len(),
            Op::Delete { .. } => 1,
        }
    }
}

impl<N> LogEntry<N> {
    /// About how many bytes its encoding takes, for interned names: the buffer it is
    /// encoded into starts that large instead of doubling from empty (a 1,000-object
    /// insert's entry is ~1.1 MB).
    pub(crate) fn size_hint(&self) -> usize {
        32 + self
            .writes
            .iter()
            .map(|w| {
                let pk = match &w.pk {
                    Pk::Str(s) => s.len() + 2,
                    _ => 17,
                };
                let fields: usize = match &w.op {
                    Op::Insert { fields } => fields.iter().map(|(_, v)| 24 + v.size_bytes()).sum(),
                    Op::Update { fields } => fields.iter().map(|f| 24 + f.value.size_bytes()).sum(),
                    Op::Delete { .. } => 16,
                };
                pk + 8 + fields
            })
            .sum::<usize>()
    }

    /// Respells every name.
    pub(crate) fn map_names<M, E>(
        self,
        mut f: impl FnMut(N) -> Result<M, E>,
    ) -> Result<LogEntry<M>, E> {
        let mut writes = Vec::with_capacity(self.writes.len());
        for w in self.writes {
            let op = match w.op {
                Op::Insert { fields } => Op::Insert {
                    fields: fields
                        .into_iter()
                        .map(|(n, v)| Ok((f(n)?, v)))
                        .collect::<Result<_, E>>()?,
                },
                Op::Update { fields } => Op::Update {
                    fields: fields
                        .into_iter()
                        .map(|fw| {
                            Ok(FieldWrite {
                                field: f(fw.field)?,
                                value: fw.value,
                                base: fw.base,
                            })
                        })
                        .collect::<Result<_, E>>()?,
                },
                Op::Delete { base } => Op::Delete { base },
            };
            writes.push(Write {
                collection: f(w.collection)?,
                pk: w.pk,
                op,
            });
        }
        Ok(LogEntry {
            seq: self.seq,
            stamp: self.stamp,
            writes,
        })
    }
}
