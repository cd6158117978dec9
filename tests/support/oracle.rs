//! Where a write ended up: on the server, beaten there by a higher stamp, or named in a
//! reset report as superseded or discarded. Anything else is a lost write.

use std::borrow::Borrow;

use fieldlog::reset::{ObjectSnapshot, ResetReport, UnsyncedWrite};
use fieldlog::{LogEntry, Op, Pk, Stamp, Value};

/// One field write of a transaction; `field: None` is the object's existence (an insert
/// writes `true`, a delete `false`).
#[derive(Clone, Debug, PartialEq)]
pub struct Written {
    pub collection: String,
    pub pk: Pk,
    pub field: Option<String>,
    pub value: Value,
    pub stamp: Stamp,
}

/// The field writes of a log entry, in order.
pub fn written(entry: &LogEntry) -> Vec<Written> {
    let mut out = Vec::new();
    for w in &entry.writes {
        let mut push = |field: Option<String>, value: Value| {
            out.push(Written {
                collection: w.collection.clone(),
                pk: w.pk.clone(),
                field,
                value,
                stamp: entry.stamp,
            })
        };
        match &w.op {
            Op::Insert { fields } => {
                push(None, Value::Bool(true));
                for (f, v) in fields {
                    push(Some(f.clone()), v.clone());
                }
            }
            Op::Update { fields } => {
                for f in fields {
                    push(Some(f.field.clone()), f.value.clone());
                }
            }
            Op::Delete { .. } => push(None, Value::Bool(false)),
        }
    }
    out
}

/// Where a write ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// The server holds it (the field with this value and stamp; the existence register).
    OnServer,
    /// The server holds a higher stamp on the same field or object.
    Beaten,
    /// A reset report lists it as superseded.
    Superseded,
    /// A reset report lists it as discarded.
    Discarded,
    /// Nowhere: on neither the server nor a report.
    Lost,
}

/// Whether a report's write is `w`.
pub fn same_write(u: &UnsyncedWrite, w: &Written) -> bool {
    u.collection == w.collection
        && u.pk == w.pk
        && u.field == w.field
        && u.value == w.value
        && u.stamp == w.stamp
}

/// Where `w` ended up, given the server's state (every field with its stamp, tombstones
/// included) and the reset reports of its client.
pub fn fate<R: Borrow<ResetReport>>(
    snapshot: &[ObjectSnapshot],
    reports: &[R],
    w: &Written,
) -> Fate {
    let stamp = w.stamp;
    if let Some(o) = snapshot
        .iter()
        .find(|o| o.collection == w.collection && o.pk == w.pk)
    {
        match &w.field {
            None => {
                if let Some((s, alive)) = o.exists {
                    if s == stamp && Value::Bool(alive) == w.value {
                        return Fate::OnServer;
                    }
                    if s > stamp {
                        return Fate::Beaten;
                    }
                }
            }
            Some(f) => {
                if let Some((_, s, v)) = o.fields.iter().find(|(n, _, _)| n == f) {
                    if *s == stamp && *v == w.value {
                        return Fate::OnServer;
                    }
                    if *s > stamp {
                        return Fate::Beaten;
                    }
                }
                if o.floor > stamp || o.exists.is_some_and(|(s, _)| s > stamp) {
                    return Fate::Beaten;
                }
            }
        }
    }
    for r in reports {
        let r = r.borrow();
        if r.superseded.iter().any(|s| same_write(&s.write, w)) {
            return Fate::Superseded;
        }
        if r.discarded.iter().any(|d| same_write(&d.write, w)) {
            return Fate::Discarded;
        }
    }
    Fate::Lost
}
