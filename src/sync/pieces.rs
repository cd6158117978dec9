//! Splitting a transaction too large for one message into pieces, and joining them back.
//!
//! Pieces of one transaction share its seq and stamp. A piece boundary may fall inside one
//! object's write (an insert or update with many large fields); joining appends the fields
//! of a continued write to the write it continues. Pure logic.

use crate::log::{LogEntry, Op, Write};

const WRITE_OVERHEAD: usize = 48;

fn write_size(w: &Write) -> usize {
    let fields = match &w.op {
        Op::Insert { fields } => fields
            .iter()
            .map(|(n, v)| n.len() + v.size_bytes() + 16)
            .sum(),
        Op::Update { fields } => fields
            .iter()
            .map(|f| f.field.len() + f.value.size_bytes() + 32)
            .sum(),
        Op::Delete { .. } => 16,
    };
    WRITE_OVERHEAD + w.collection.len() + fields
}

/// An upper estimate of an entry's encoded size.
pub(crate) fn entry_size(e: &LogEntry) -> usize {
    32 + e.writes.iter().map(write_size).sum::<usize>()
}

/// Splits `entry` into pieces of about `max_bytes` each (one piece if it fits).
pub(crate) fn split_entry(entry: LogEntry, max_bytes: usize) -> Vec<LogEntry> {
    if entry_size(&entry) <= max_bytes {
        return vec![entry];
    }
    let (seq, stamp) = (entry.seq, entry.stamp);
    let piece = |writes| LogEntry { seq, stamp, writes };
    let mut out = Vec::new();
    let mut cur: Vec<Write> = Vec::new();
    let mut size = 0;
    for w in entry.writes {
        for part in split_write(w, max_bytes) {
            let s = write_size(&part);
            if size + s > max_bytes && !cur.is_empty() {
                out.push(piece(std::mem::take(&mut cur)));
                size = 0;
            }
            size += s;
            cur.push(part);
        }
    }
    if !cur.is_empty() {
        out.push(piece(cur));
    }
    out
}

/// Splits one write's fields into parts that each fit `max_bytes` (a single field always
/// fits one part: values are bounded by the store's value limit, far below a frame).
fn split_write(w: Write, max_bytes: usize) -> Vec<Write> {
    if write_size(&w) <= max_bytes {
        return vec![w];
    }
    let Write { collection, pk, op } = w;
    let mk = |op| Write {
        collection: collection.clone(),
        pk: pk.clone(),
        op,
    };
    let mut out = Vec::new();
    match op {
        Op::Insert { fields } => {
            let mut cur = Vec::new();
            let mut size = 0;
            for (n, v) in fields {
                let s = n.len() + v.size_bytes() + 16;
                if size + s > max_bytes && !cur.is_empty() {
                    out.push(mk(Op::Insert {
                        fields: std::mem::take(&mut cur),
                    }));
                    size = 0;
                }
                size += s;
                cur.push((n, v));
            }
            out.push(mk(Op::Insert { fields: cur }));
        }
        Op::Update { fields } => {
            let mut cur = Vec::new();
            let mut size = 0;
            for f in fields {
                let s = f.field.len() + f.value.size_bytes() + 32;
                if size + s > max_bytes && !cur.is_empty() {
                    out.push(mk(Op::Update {
                        fields: std::mem::take(&mut cur),
                    }));
                    size = 0;
                }
                size += s;
                cur.push(f);
            }
            out.push(mk(Op::Update { fields: cur }));
        }
        op @ Op::Delete { .. } => out.push(mk(op)),
    }
    out
}

/// Appends the next piece of a transaction to the pieces joined so far (for a peer that
/// reassembles a transaction sent in pieces by itself, as a simulation or a proxy does).
pub fn join_piece(joined: &mut LogEntry, next: LogEntry) {
    for w in next.writes {
        if let Some(last) = joined.writes.last_mut() {
            if last.collection == w.collection && last.pk == w.pk {
                match (&mut last.op, w.op) {
                    (Op::Insert { fields: a }, Op::Insert { fields: b }) => {
                        a.extend(b);
                        continue;
                    }
                    (Op::Update { fields: a }, Op::Update { fields: b }) => {
                        a.extend(b);
                        continue;
                    }
                    (_, op) => {
                        joined.writes.push(Write {
                            collection: w.collection,
                            pk: w.pk,
                            op,
                        });
                        continue;
                    }
                }
            }
        }
        joined.writes.push(w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ReplicaId, Stamp};
    use crate::value::{Pk, Value};

    fn big_entry() -> LogEntry {
        let writes = (0..20)
            .map(|i| Write {
                collection: "C".into(),
                pk: Pk::Int(i),
                op: Op::Insert {
                    fields: (0..8)
                        .map(|f| (format!("f{f}"), Value::Bytes(vec![i as u8; 1000])))
                        .collect(),
                },
            })
            .collect();
        LogEntry {
            seq: 7,
            stamp: Stamp {
                time: 1,
                replica: ReplicaId(1),
            },
            writes,
        }
    }

    #[test]
    fn split_then_join_is_identity() {
        for max in [500, 3_000, 10_000, 1 << 20] {
            let e = big_entry();
            let pieces = split_entry(e.clone(), max);
            assert!(pieces.iter().all(|p| p.seq == 7 && !p.writes.is_empty()));
            if max < 100_000 {
                assert!(pieces.len() > 1);
            }
            let mut it = pieces.into_iter();
            let mut joined = it.next().unwrap();
            for p in it {
                join_piece(&mut joined, p);
            }
            assert_eq!(joined, e, "max {max}");
        }
    }
}
