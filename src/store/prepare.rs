//! Preparing a transaction for commit: stamping it, applying its objects, sealing its
//! log entry and write-ahead record, and writing the meta rows.

use std::collections::{BTreeMap, HashMap};

use redb::ReadableTable;

use crate::clock::Stamp;
use crate::digest::{field_term, DigestSum};
use crate::error::{Error, Result};
use crate::log::{FieldWrite, LogEntry, Op, Write};
use crate::merge::ObjectState;
use crate::row;
use crate::value::{Pk, Value};
use crate::wal::{self, Redo};

use super::commit::Tables;
use super::format::{
    corrupt, encode_into, encode_state, Head, META_COUNT_PREFIX, META_HEAD, NAMES,
};
use super::names::NameView;
use super::write_tx::{take_remote, Before, NetOp, StampedFields, WriteTx};
use super::Committed;

/// Inserts rows whose keys are not in `table`, sorted ascending. A run of them between two
/// existing keys that is larger than a page goes in through a cursor, which redb packs into
/// full leaves; inserted one by one, each full leaf splits in half. Objects created in key
/// order but between existing keys (`user10000`..`user10999` after `user1000`) left their
/// leaves half empty, 1.4 × the pages of a packed table. Smaller runs go in one by one: a
/// cursor's run costs ~2.5 × an insert for a single row.
pub(super) fn insert_fresh(
    table: &mut redb::Table<&[u8], &[u8]>,
    rows: &[(Vec<u8>, Vec<u8>)],
) -> Result<()> {
    const PACKED_RUN_BYTES: usize = 8 << 10;
    let bytes = |rows: &[(Vec<u8>, Vec<u8>)]| -> usize {
        rows.iter().map(|(k, v)| k.len() + v.len()).sum()
    };
    let mut left = bytes(rows);
    let mut rest = rows;
    while !rest.is_empty() {
        let (run, packed) = if left < PACKED_RUN_BYTES {
            // Too little left to fill a page: no need to find where the run ends.
            (rest, false)
        } else {
            let next = match table.range(rest[0].0.as_slice()..)?.next() {
                Some(row) => Some(row?.0.value().to_vec()),
                None => None,
            };
            match rest
                .iter()
                .position(|(k, _)| next.as_ref().is_some_and(|n| k >= n))
                .unwrap_or(rest.len())
            {
                // The key is there after all (nothing inserts it before its commit): replace it.
                0 => (&rest[..1], false),
                n => (&rest[..n], bytes(&rest[..n]) >= PACKED_RUN_BYTES),
            }
        };
        if packed {
            let mut cursor =
                table.lower_bound_mut(std::ops::Bound::Included(run[0].0.as_slice()))?;
            for (k, v) in run {
                cursor
                    .insert_before(k.as_slice(), v.as_slice())
                    .map_err(redb::Error::from)?;
            }
            cursor.close()?;
        } else {
            for (k, v) in run {
                table.insert(k.as_slice(), v.as_slice())?;
            }
        }
        left -= bytes(run);
        rest = &rest[run.len()..];
    }
    Ok(())
}

/// Moves `sum` from a field's old term (if it had a value) to its new one: the field `name`
/// of object `pk` in collection `coll`.
pub(super) fn replace_term(
    sum: &mut DigestSum,
    (coll, pk, name): (&str, &Pk, &str),
    old: Option<&(Stamp, Value)>,
    (stamp, value): (Stamp, &Value),
) {
    if let Some((s, v)) = old {
        sum.sub(&field_term(coll, pk, name, *s, v));
    }
    sum.add(&field_term(coll, pk, name, stamp, value));
}

impl<'s> WriteTx<'s> {
    pub(super) fn prepare(
        &mut self,
        txn: &redb::WriteTransaction,
        tables: &mut Tables<'_>,
    ) -> Result<Option<Prepared>> {
        let has_local = self.pending.values().any(|p| p.op.is_some());
        let has_remote = self
            .pending
            .values()
            .any(|p| p.after.is_some() || !p.remote.is_empty());
        if !has_local && !has_remote && !self.raw_used && self.aux.is_empty() {
            return Ok(None);
        }
        let now = self.store.options.time.now_ms();
        let stamp = Stamp {
            time: if has_local {
                self.writer.hlc.tick(now)
            } else {
                self.writer.hlc.high_water()
            },
            replica: self.store.replica,
        };
        // Rows for the write-ahead file; other modules' tables written through `raw` are not
        // recorded, so a transaction that wrote them commits to redb durably instead.
        let mut redo = (self.store.wal.is_some() && !self.raw_used).then(Vec::new);
        // A record pays when it is small beside the redb pages the transaction dirties: a
        // 1,000-update batch is ~135 KB of log entry against ~4 MB of pages (1.3 × faster
        // as a record, when it was ~250 KB), but 1,000 inserts are ~2 MB of whole rows,
        // about the pages they fill, and faster as a durable redb commit (written once, not
        // twice). So whole rows may take 1/64 of the file, and a record a quarter of it.
        let cb = self.store.options.checkpoint_bytes;
        let record_max = (cb / 4).min(wal::RECORD_BYTES_MAX / 4);
        let rows_max = (cb / 64).max(4096).min(record_max);
        let mut record_bytes = 0u64;
        let mut row_bytes = 0u64;
        let names = self.store.names();
        let view = NameView {
            base: &names,
            new: Some(&self.new_names),
        };
        let mut writes: Vec<Write<u32>> = Vec::new();
        // The writes the record replays as patches from the log entry (`Redo::LogPatches`).
        let mut log_patches: Vec<u32> = Vec::new();
        let mut digest = self.writer.digest;
        let mut count_delta: BTreeMap<u32, i64> = BTreeMap::new();
        {
            let objects = &mut tables.objects;
            // New objects' rows, in key order, inserted together once the loop is done.
            let mut fresh: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            // The other objects' rows (`None`: removed), written once the loop is done.
            let mut rows: Vec<(Vec<u8>, Option<Vec<u8>>)> = Vec::new();
            for (key, p) in &mut self.pending {
                if p.op.is_none() && p.after.is_none() && p.remote.is_empty() {
                    continue;
                }
                let before = p.before.take();
                let absent = before.is_none();
                let coll = view.name(p.coll)?;
                // Field writes to a live object, either all local or all remote (the common
                // cases): patch the row's bytes without decoding its values, and move the
                // digest by the written fields' terms alone.
                let patchable = p.after.is_none()
                    && !p.purge
                    && match &p.op {
                        Some(NetOp::Update(_)) => true,
                        None => !p.remote.is_empty(),
                        _ => false,
                    };
                let parsed = match &before {
                    Some(b) if patchable => row::parse(&b.row)?.filter(row::Parsed::is_live),
                    _ => None,
                };
                // What the write-ahead record holds for the fast path: the fields by stamp,
                // not the row (none for a local update: the log entry has them).
                let mut patch: Option<Vec<StampedFields>> = None;
                let mut op = p.op.take();
                // Fields the row held and holds after: for the cap on fields per object.
                let mut width = (0, 0);
                let fast = match (&parsed, &mut op) {
                    (Some(parsed), None) => {
                        let remote = take_remote(&mut p.remote);
                        let sets: Vec<(u32, Stamp, &Value)> =
                            remote.iter().map(|(f, s, v)| (*f, *s, v)).collect();
                        let patched = parsed.patch(&sets);
                        drop(sets);
                        width = (parsed.field_count(), patched.fields);
                        // The record's patches by stamp, in the order first seen.
                        let mut by_stamp: Vec<StampedFields> = Vec::new();
                        let mut stamp_at: HashMap<Stamp, usize> = HashMap::new();
                        for ((id, s, value), applied) in remote.into_iter().zip(patched.applied) {
                            if !applied {
                                continue;
                            }
                            let old = parsed.field(id)?;
                            let term = (coll, &p.pk, view.name(id)?);
                            replace_term(&mut digest, term, old.as_ref(), (s, &value));
                            if redo.is_some() {
                                let at = *stamp_at.entry(s).or_insert_with(|| {
                                    by_stamp.push((s, Vec::new()));
                                    by_stamp.len() - 1
                                });
                                by_stamp[at].1.push((id, value));
                            }
                        }
                        patch = Some(by_stamp);
                        Some(patched.row)
                    }
                    (Some(parsed), Some(NetOp::Update(fields))) => {
                        let fields = std::mem::take(fields);
                        let mut ids = Vec::with_capacity(fields.len());
                        for name in fields.keys() {
                            ids.push(view.id(name).ok_or_else(|| corrupt("uninterned field"))?);
                        }
                        let sets: Vec<(u32, Stamp, &Value)> = ids
                            .iter()
                            .copied()
                            .zip(fields.values())
                            .map(|(id, v)| (id, stamp, v))
                            .collect();
                        let patched = parsed.patch(&sets);
                        drop(sets);
                        width = (parsed.field_count(), patched.fields);
                        let mut logged = Vec::with_capacity(fields.len());
                        for (((name, value), id), applied) in
                            fields.into_iter().zip(ids).zip(patched.applied)
                        {
                            let old = parsed.field(id)?;
                            if applied {
                                let term = (coll, &p.pk, name.as_str());
                                replace_term(&mut digest, term, old.as_ref(), (stamp, &value));
                            }
                            logged.push(FieldWrite {
                                field: id,
                                value,
                                base: old.map(|(s, _)| s),
                            });
                        }
                        // The record patches this row from the log entry: a write the
                        // row did not take (none can: the stamp is the newest) is not
                        // taken at the replay either.
                        log_patches.push(writes.len() as u32);
                        writes.push(Write {
                            collection: p.coll,
                            pk: p.pk.clone(),
                            op: Op::Update { fields: logged },
                        });
                        patch = Some(Vec::new());
                        Some(patched.row)
                    }
                    _ => None,
                };
                drop(parsed);
                let new_row = match fast {
                    Some(row) => row,
                    None => {
                        let before = before.map(Before::into_state).transpose()?;
                        let mut state = p
                            .after
                            .take()
                            .or_else(|| before.clone())
                            .unwrap_or_default();
                        // Remote writes the fast path did not take (the row did not parse).
                        state.apply_fields(take_remote(&mut p.remote));
                        if let Some(write) = apply_local(&view, &mut state, op, stamp)? {
                            writes.push(Write {
                                collection: p.coll,
                                pk: p.pk.clone(),
                                op: write,
                            });
                        }
                        width = (
                            before.as_ref().map_or(0, |b| b.fields.len()),
                            state.fields.len(),
                        );
                        if before.as_ref() == Some(&state) {
                            continue;
                        }
                        let delta =
                            view.digest_delta(coll, &p.pk, before.as_ref(), &state, &mut digest)?;
                        if delta != 0 {
                            *count_delta.entry(p.coll).or_default() += delta;
                        }
                        encode_state(&state)?
                    }
                };
                if !p.purge {
                    check_width(self.store.options.fields_per_object_max, coll, &p.pk, width)?;
                }
                let row = (!p.purge).then_some(new_row);
                if let Some(r) = &mut redo {
                    match patch {
                        Some(by_stamp) => {
                            for (stamp, fields) in by_stamp {
                                record_bytes += (key.len()
                                    + 24
                                    + fields
                                        .iter()
                                        .map(|(_, v)| 8 + v.size_bytes())
                                        .sum::<usize>())
                                    as u64;
                                r.push(Redo::Patch(key.clone(), stamp, fields));
                            }
                        }
                        None => {
                            let n = (key.len() + row.as_ref().map_or(0, Vec::len)) as u64;
                            record_bytes += n;
                            row_bytes += n;
                            r.push(Redo::Object(key.clone(), row.clone()));
                        }
                    }
                    if record_bytes > record_max || row_bytes > rows_max {
                        redo = None;
                    }
                }
                match row {
                    Some(row) if absent => fresh.push((key.clone(), row)),
                    row => rows.push((key.clone(), row)),
                }
            }
            // Nothing is written before every object has passed its checks: a transaction
            // refused here ([`Error::TooManyFields`]) leaves the batch it joined as it was.
            for (key, row) in &rows {
                match row {
                    Some(row) => objects.insert(key.as_slice(), row.as_slice())?,
                    None => objects.remove(key.as_slice())?,
                };
            }
            insert_fresh(objects, &fresh)?;
        }
        let seq = if writes.is_empty() {
            None
        } else {
            Some(self.writer.log_next)
        };
        if let Some(seq) = seq {
            let entry = LogEntry { seq, stamp, writes };
            let bytes = encode_into(&entry, Vec::with_capacity(entry.size_hint()))?;
            tables.log.insert(seq, bytes.as_slice())?;
            if let Some(r) = &mut redo {
                record_bytes += bytes.len() as u64 + 4 * log_patches.len() as u64;
                r.push(if log_patches.is_empty() {
                    Redo::Log(seq, bytes)
                } else {
                    Redo::LogPatches(seq, bytes, log_patches)
                });
                if record_bytes > record_max {
                    redo = None;
                }
            }
            if let Some(hook) = self.log_hook.take() {
                let named = entry.map_names(|id| view.name(id).map(str::to_owned))?;
                self.aux.extend(hook(&named)?);
            }
        }
        let aux = std::mem::take(&mut self.aux);
        wal::Aux::apply_all(&aux, txn)?;
        if let Some(r) = &mut redo {
            record_bytes += aux.iter().map(wal::Aux::bytes).sum::<u64>();
            r.extend(aux.into_iter().map(Redo::Aux));
            if record_bytes > record_max {
                redo = None;
            }
        }
        if !self.new_names.is_empty() {
            let mut table = txn.open_table(NAMES)?;
            for (i, n) in self.new_names.by_pos.iter().enumerate() {
                let id = (names.by_id.len() + i) as u32;
                table.insert(id, n.as_str())?;
                if let Some(redo) = &mut redo {
                    redo.push(Redo::Name(id, n.clone()));
                }
            }
        }
        drop(names);
        let mut counts = Vec::new();
        for (cid, delta) in &count_delta {
            let n = self.writer.counts.get(cid).copied().unwrap_or(0);
            let n = n.saturating_add_signed(*delta);
            put_meta(
                &mut tables.meta,
                &mut redo,
                &format!("{META_COUNT_PREFIX}{cid}"),
                &n.to_le_bytes(),
            )?;
            counts.push((*cid, n));
        }
        // A record's number goes into the database with its rows; a commit without one
        // leaves the last record's.
        let wal_seq = self.writer.wal_seq + 1;
        let head = Head {
            log_next: seq.map_or(self.writer.log_next, |s| s + 1),
            hlc: self.writer.hlc.high_water(),
            wal_seq: if redo.is_some() {
                wal_seq
            } else {
                self.writer.wal_seq
            },
            digest: digest.digest(),
        };
        let head = head.encode();
        let head = match &mut redo {
            Some(rows) => {
                rows.push(Redo::Meta(META_HEAD.to_owned(), head.to_vec()));
                Some(head.to_vec())
            }
            None => {
                tables.meta.insert(META_HEAD, head.as_slice())?;
                None
            }
        };
        let record = match redo {
            Some(rows) => Some(wal::encode(&wal::Record {
                replica: self.store.replica.0,
                seq: wal_seq,
                rows,
            })?),
            None => None,
        };
        Ok(Some(Prepared {
            committed: Committed {
                seq,
                stamp: has_local.then_some(stamp),
            },
            digest,
            counts,
            record,
            head,
        }))
    }
}

/// Applies a transaction's local call on one object (its net effect) to the object's state
/// at the transaction's stamp, and returns the write its log entry records.
pub(super) fn apply_local(
    view: &NameView<'_>,
    state: &mut ObjectState<u32>,
    op: Option<NetOp>,
    stamp: Stamp,
) -> Result<Option<Op<u32>>> {
    let id = |name: &str| view.id(name).ok_or_else(|| corrupt("uninterned field"));
    Ok(Some(match op {
        None => return Ok(None),
        Some(NetOp::Insert(fields)) => {
            state.apply_exists(stamp, true);
            let logged = fields
                .into_iter()
                .map(|(name, value)| Ok((id(&name)?, value)))
                .collect::<Result<Vec<_>>>()?;
            let sets = logged.iter().map(|(f, v)| (*f, stamp, v.clone()));
            state.apply_fields(sets.collect());
            Op::Insert { fields: logged }
        }
        Some(NetOp::Update(fields)) => {
            // One write per field: each base is the field's stamp before this transaction.
            let logged = fields
                .into_iter()
                .map(|(name, value)| {
                    let field = id(&name)?;
                    let base = state.field(field).map(|(s, _)| s);
                    Ok(FieldWrite { field, value, base })
                })
                .collect::<Result<Vec<_>>>()?;
            let sets = logged.iter().map(|w| (w.field, stamp, w.value.clone()));
            state.apply_fields(sets.collect());
            Op::Update { fields: logged }
        }
        Some(NetOp::Delete) => {
            let base = state.max_stamp();
            state.apply_exists(stamp, false);
            Op::Delete { base }
        }
    }))
}

/// Refuses a row that would hold more than `max` fields, unless it held as many before
/// (an object from before the limit, or a lower one, stays writable).
pub(super) fn check_width(
    max: usize,
    coll: &str,
    pk: &Pk,
    (before, after): (usize, usize),
) -> Result<()> {
    if after > max && after > before {
        return Err(Error::TooManyFields {
            collection: coll.to_owned(),
            pk: pk.clone(),
            fields: after,
            max,
        });
    }
    Ok(())
}

/// Puts a meta row, and records it for the write-ahead file.
pub(super) fn put_meta(
    meta: &mut redb::Table<&str, &[u8]>,
    redo: &mut Option<Vec<Redo>>,
    key: &str,
    value: &[u8],
) -> Result<()> {
    meta.insert(key, value)?;
    if let Some(redo) = redo {
        redo.push(Redo::Meta(key.to_owned(), value.to_vec()));
    }
    Ok(())
}

/// What a transaction will change in memory once redb has committed it.
pub(super) struct Prepared {
    pub(super) committed: Committed,
    pub(super) digest: DigestSum,
    pub(super) counts: Vec<(u32, u64)>,
    /// The write-ahead record (numbered `wal_seq + 1`), if the transaction made one.
    pub(super) record: Option<Vec<u8>>,
    /// With a record: the `head` meta row, for its batch's commit to write.
    pub(super) head: Option<Vec<u8>>,
}
