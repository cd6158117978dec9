//! Preparing a transaction for commit: stamping it, applying its objects, sealing its
//! log entry and write-ahead record, and writing the meta rows.

use std::collections::{BTreeMap, HashMap};

use redb::ReadableTable;

use crate::clock::Stamp;
use crate::digest::{field_term, DigestSum};
use crate::error::{Error, Result};
use crate::log::{FieldWrite, LogEntry, LogPos, Op, Write};
use crate::merge::ObjectState;
use crate::row;
use crate::value::{Pk, Value};
use crate::wal::{self, Redo};

use super::commit::Tables;
use super::format::{
    encode_into, encode_state, internal, Head, META_COUNT_PREFIX, META_HEAD, NAMES,
};
use super::names::NameView;
use super::names::NewNames;
use super::write_tx::{take_remote, Before, NetOp, Pending, StampedFields, WriteTx};
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

/// A transaction being prepared: its stamp, what it has changed so far, and the write-ahead
/// record it is building.
struct Draft {
    stamp: Stamp,
    /// Rows for the write-ahead file; `None` once the transaction is to commit to redb
    /// durably instead (other modules' tables written through `raw`, or a record too
    /// large to pay).
    redo: Option<Vec<Redo>>,
    /// The record's bytes so far, and those of whole rows in it.
    record_bytes: u64,
    row_bytes: u64,
    /// A record pays when it is small beside the redb pages the transaction dirties: a
    /// 1,000-update batch's log entry is a small part of the pages it dirties, but 1,000
    /// inserts are whole rows, about the pages they fill, and faster as a durable redb
    /// commit (written once, not twice). So whole rows may take 1/64 of the file, and a
    /// record a quarter of it.
    record_max: u64,
    rows_max: u64,
    /// The log entry's writes.
    writes: Vec<Write<u32>>,
    /// The writes the record replays as patches from the log entry (`Redo::LogPatches`).
    log_patches: Vec<u32>,
    digest: DigestSum,
    count_delta: BTreeMap<u32, i64>,
}

/// The rows a transaction writes to `objects`, written once every object has passed its
/// checks.
#[derive(Default)]
struct Rows {
    /// New objects' rows, inserted together in key order.
    fresh: Vec<(Vec<u8>, Vec<u8>)>,
    /// The other objects' rows (`None`: removed).
    put: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl Rows {
    fn write(&self, objects: &mut redb::Table<&[u8], &[u8]>) -> Result<()> {
        for (key, row) in &self.put {
            match row {
                Some(row) => objects.insert(key.as_slice(), row.as_slice())?,
                None => objects.remove(key.as_slice())?,
            };
        }
        insert_fresh(objects, &self.fresh)
    }
}

/// One object's new row, the fields it held before and holds after (for the cap on fields
/// per object), and, on the fast path, the patches its record holds instead of the row.
type NewRow = (Vec<u8>, (usize, usize), Option<Vec<StampedFields>>);

/// The `head` meta row a batch's commit writes, and the write-ahead record (both `None`
/// when the transaction is not recorded).
type HeadAndRecord = (Option<Vec<u8>>, Option<Vec<u8>>);

impl Draft {
    fn new(stamp: Stamp, recorded: bool, checkpoint_bytes: u64, digest: DigestSum) -> Draft {
        let record_max = (checkpoint_bytes / 4).min(wal::RECORD_BYTES_MAX / 4);
        Draft {
            stamp,
            redo: recorded.then(Vec::new),
            record_bytes: 0,
            row_bytes: 0,
            record_max,
            rows_max: (checkpoint_bytes / 64).max(4096).min(record_max),
            writes: Vec::new(),
            log_patches: Vec::new(),
            digest,
            count_delta: BTreeMap::new(),
        }
    }

    /// Adds `n` bytes to the record, and gives the record up if it has grown too large.
    fn grow_record(&mut self, n: u64) {
        self.record_bytes += n;
        if self.record_bytes > self.record_max {
            self.redo = None;
        }
    }

    /// Applies one pending object: its row goes to `rows`, its write to the log entry, its
    /// change to the digest and counts, and its rows or patches to the record.
    fn apply_object(
        &mut self,
        view: &NameView<'_>,
        key: &[u8],
        p: &mut Pending,
        fields_max: usize,
        rows: &mut Rows,
    ) -> Result<()> {
        if p.op.is_none() && p.after.is_none() && p.remote.is_empty() {
            return Ok(());
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
        let mut op = p.op.take();
        let fast = match (&parsed, &mut op) {
            (Some(parsed), None) => Some(self.patch_remote(view, coll, p, parsed)?),
            (Some(parsed), Some(NetOp::Update(fields))) => {
                let fields = std::mem::take(fields);
                Some(self.patch_update(view, coll, p, parsed, fields)?)
            }
            _ => None,
        };
        drop(parsed);
        let (new_row, width, patch) = match fast {
            Some(fast) => fast,
            None => match self.rebuild(view, coll, p, before, op)? {
                Some(rebuilt) => rebuilt,
                None => return Ok(()),
            },
        };
        if !p.purge {
            check_width(fields_max, coll, &p.pk, width)?;
        }
        let row = (!p.purge).then_some(new_row);
        self.record_object(key, patch, row.as_ref());
        match row {
            Some(row) if absent => rows.fresh.push((key.to_vec(), row)),
            row => rows.put.push((key.to_vec(), row)),
        }
        Ok(())
    }

    /// The fast path for remote writes to a live row: the row's bytes patched, and the
    /// record's patches grouped by stamp in the order first seen.
    fn patch_remote(
        &mut self,
        view: &NameView<'_>,
        coll: &str,
        p: &mut Pending,
        parsed: &row::Parsed<'_>,
    ) -> Result<NewRow> {
        let remote = take_remote(&mut p.remote);
        let sets: Vec<(u32, Stamp, &Value)> = remote.iter().map(|(f, s, v)| (*f, *s, v)).collect();
        let patched = parsed.patch(&sets);
        drop(sets);
        let width = (parsed.field_count(), patched.fields);
        let mut by_stamp: Vec<StampedFields> = Vec::new();
        let mut stamp_at: HashMap<Stamp, usize> = HashMap::new();
        for ((id, s, value), applied) in remote.into_iter().zip(patched.applied) {
            if !applied {
                continue;
            }
            let old = parsed.field(id)?;
            let term = (coll, &p.pk, view.name(id)?);
            replace_term(&mut self.digest, term, old.as_ref(), (s, &value));
            if self.redo.is_some() {
                let at = *stamp_at.entry(s).or_insert_with(|| {
                    by_stamp.push((s, Vec::new()));
                    by_stamp.len() - 1
                });
                by_stamp[at].1.push((id, value));
            }
        }
        Ok((patched.row, width, Some(by_stamp)))
    }

    /// The fast path for a local update of a live row: the row's bytes patched, and the
    /// update logged; the record patches the row from the log entry.
    fn patch_update(
        &mut self,
        view: &NameView<'_>,
        coll: &str,
        p: &Pending,
        parsed: &row::Parsed<'_>,
        fields: BTreeMap<String, Value>,
    ) -> Result<NewRow> {
        let stamp = self.stamp;
        let mut ids = Vec::with_capacity(fields.len());
        for name in fields.keys() {
            ids.push(view.id(name).ok_or_else(|| internal("uninterned field"))?);
        }
        let sets: Vec<(u32, Stamp, &Value)> = ids
            .iter()
            .copied()
            .zip(fields.values())
            .map(|(id, v)| (id, stamp, v))
            .collect();
        let patched = parsed.patch(&sets);
        drop(sets);
        let width = (parsed.field_count(), patched.fields);
        let mut logged = Vec::with_capacity(fields.len());
        for (((name, value), id), applied) in fields.into_iter().zip(ids).zip(patched.applied) {
            let old = parsed.field(id)?;
            if applied {
                let term = (coll, &p.pk, name.as_str());
                replace_term(&mut self.digest, term, old.as_ref(), (stamp, &value));
            }
            logged.push(FieldWrite {
                field: id,
                value,
                base: old.map(|(s, _)| s),
            });
        }
        // A write the row did not take (none can: the stamp is the newest) is not taken at
        // the replay either.
        self.log_patches.push(self.writes.len() as u32);
        self.writes.push(Write {
            collection: p.coll,
            pk: p.pk.clone(),
            op: Op::Update { fields: logged },
        });
        Ok((patched.row, width, Some(Vec::new())))
    }

    /// The general path: the object's state decoded, merged and encoded again. `None` if
    /// the state did not change.
    fn rebuild(
        &mut self,
        view: &NameView<'_>,
        coll: &str,
        p: &mut Pending,
        before: Option<Before>,
        op: Option<NetOp>,
    ) -> Result<Option<NewRow>> {
        let before = before.map(Before::into_state).transpose()?;
        let mut state = p
            .after
            .take()
            .or_else(|| before.clone())
            .unwrap_or_default();
        // Remote writes the fast path did not take (the row did not parse).
        state.apply_fields(take_remote(&mut p.remote));
        if let Some(write) = apply_local(view, &mut state, op, self.stamp)? {
            self.writes.push(Write {
                collection: p.coll,
                pk: p.pk.clone(),
                op: write,
            });
        }
        let width = (
            before.as_ref().map_or(0, |b| b.fields.len()),
            state.fields.len(),
        );
        if before.as_ref() == Some(&state) {
            return Ok(None);
        }
        let delta = view.digest_delta(coll, &p.pk, before.as_ref(), &state, &mut self.digest)?;
        if delta != 0 {
            *self.count_delta.entry(p.coll).or_default() += delta;
        }
        Ok(Some((encode_state(&state)?, width, None)))
    }

    /// Puts one object's patches, or its row, into the record.
    fn record_object(
        &mut self,
        key: &[u8],
        patch: Option<Vec<StampedFields>>,
        row: Option<&Vec<u8>>,
    ) {
        let Some(r) = &mut self.redo else {
            return;
        };
        match patch {
            Some(by_stamp) => {
                for (stamp, fields) in by_stamp {
                    let values: usize = fields.iter().map(|(_, v)| 8 + v.size_bytes()).sum();
                    self.record_bytes += (key.len() + 24 + values) as u64;
                    r.push(Redo::Patch(key.to_vec(), stamp, fields));
                }
            }
            None => {
                let n = (key.len() + row.map_or(0, Vec::len)) as u64;
                self.record_bytes += n;
                self.row_bytes += n;
                r.push(Redo::Object(key.to_vec(), row.cloned()));
            }
        }
        if self.record_bytes > self.record_max || self.row_bytes > self.rows_max {
            self.redo = None;
        }
    }

    /// Appends the transaction's log entry at `seq`, if it wrote anything, and records it.
    /// Returns the entry.
    fn seal_log_entry(
        &mut self,
        log: &mut redb::Table<u64, &[u8]>,
        seq: LogPos,
    ) -> Result<Option<LogEntry<u32>>> {
        if self.writes.is_empty() {
            return Ok(None);
        }
        let writes = std::mem::take(&mut self.writes);
        let entry = LogEntry {
            seq,
            stamp: self.stamp,
            writes,
        };
        let bytes = encode_into(&entry, Vec::with_capacity(entry.size_hint()))?;
        log.insert(seq, bytes.as_slice())?;
        if let Some(r) = &mut self.redo {
            let n = bytes.len() as u64 + 4 * self.log_patches.len() as u64;
            r.push(if self.log_patches.is_empty() {
                Redo::Log(seq, bytes)
            } else {
                Redo::LogPatches(seq, bytes, std::mem::take(&mut self.log_patches))
            });
            self.grow_record(n);
        }
        Ok(Some(entry))
    }

    /// Puts other modules' rows, and records them.
    fn put_aux(&mut self, txn: &redb::WriteTransaction, aux: Vec<wal::Aux>) -> Result<()> {
        wal::Aux::apply_all(&aux, txn)?;
        if let Some(r) = &mut self.redo {
            let n = aux.iter().map(wal::Aux::bytes).sum::<u64>();
            r.extend(aux.into_iter().map(Redo::Aux));
            self.grow_record(n);
        }
        Ok(())
    }

    /// Puts the names the transaction interned, numbered after the committed ones.
    fn put_names(
        &mut self,
        txn: &redb::WriteTransaction,
        committed: usize,
        new: &NewNames,
    ) -> Result<()> {
        if new.is_empty() {
            return Ok(());
        }
        let mut table = txn.open_table(NAMES)?;
        for (i, n) in new.by_pos.iter().enumerate() {
            let id = (committed + i) as u32;
            table.insert(id, n.as_str())?;
            if let Some(redo) = &mut self.redo {
                redo.push(Redo::Name(id, n.clone()));
            }
        }
        Ok(())
    }

    /// Puts the changed collections' object counts; returns them.
    fn put_counts(
        &mut self,
        meta: &mut redb::Table<&str, &[u8]>,
        counts: &HashMap<u32, u64>,
    ) -> Result<Vec<(u32, u64)>> {
        let mut out = Vec::new();
        for (cid, delta) in &self.count_delta {
            let n = counts.get(cid).copied().unwrap_or(0);
            let n = n.saturating_add_signed(*delta);
            put_meta(
                meta,
                &mut self.redo,
                &format!("{META_COUNT_PREFIX}{cid}"),
                &n.to_le_bytes(),
            )?;
            out.push((*cid, n));
        }
        Ok(out)
    }

    /// Writes the `head` meta row (or, with a record, leaves it to the batch's commit) and
    /// seals the record. Returns the head row the batch writes, and the record.
    fn seal_record(
        self,
        meta: &mut redb::Table<&str, &[u8]>,
        mut head: Head,
        replica: u64,
    ) -> Result<HeadAndRecord> {
        // A record's number goes into the database with its rows; a commit without one
        // leaves the last record's.
        let wal_seq = head.wal_seq + 1;
        if self.redo.is_some() {
            head.wal_seq = wal_seq;
        }
        let head = head.encode();
        match self.redo {
            Some(mut rows) => {
                rows.push(Redo::Meta(META_HEAD.to_owned(), head.to_vec()));
                let record = wal::encode(&wal::Record {
                    replica,
                    seq: wal_seq,
                    rows,
                })?;
                Ok((Some(head.to_vec()), Some(record)))
            }
            None => {
                meta.insert(META_HEAD, head.as_slice())?;
                Ok((None, None))
            }
        }
    }
}

impl WriteTx<'_> {
    /// The transaction's stamp: a tick of the clock if it writes anything locally, else
    /// the clock's high-water mark.
    fn stamp(&mut self, has_local: bool) -> Stamp {
        let now = self.store.options.time.now_ms();
        Stamp {
            time: if has_local {
                self.writer.hlc.tick(now)
            } else {
                self.writer.hlc.high_water()
            },
            replica: self.store.replica,
        }
    }

    /// Puts the transaction into redb's transaction `txn` (through `tables`) and builds its
    /// write-ahead record; `None` if there is nothing to commit.
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
        let stamp = self.stamp(has_local);
        let recorded = self.store.wal.is_some() && !self.raw_used;
        let checkpoint_bytes = self.store.options.checkpoint_bytes;
        let mut d = Draft::new(stamp, recorded, checkpoint_bytes, self.writer.digest);
        let names = self.store.names();
        let view = NameView {
            base: &names,
            new: Some(&self.new_names),
        };
        let fields_max = self.store.options.fields_per_object_max;
        let mut rows = Rows::default();
        for (key, p) in &mut self.pending {
            d.apply_object(&view, key, p, fields_max, &mut rows)?;
        }
        // Nothing is written before every object has passed its checks: a transaction
        // refused here ([`Error::TooManyFields`]) leaves the batch it joined as it was.
        rows.write(&mut tables.objects)?;
        let log_next = self.writer.log_next;
        let entry = d.seal_log_entry(&mut tables.log, log_next)?;
        let seq = entry.as_ref().map(|e| e.seq);
        if let Some(entry) = entry {
            if self.history.is_some() {
                let named = entry.map_names(|id| view.name(id).map(str::to_owned))?;
                if let Some(row) = self.history_of_own_entry(&named)? {
                    self.aux.push(row);
                }
            }
        }
        d.put_aux(txn, std::mem::take(&mut self.aux))?;
        d.put_names(txn, names.by_id.len(), &self.new_names)?;
        drop(names);
        let counts = d.put_counts(&mut tables.meta, &self.writer.counts)?;
        let digest = d.digest;
        let head = Head {
            log_next: seq.map_or(log_next, |s| s + 1),
            hlc: self.writer.hlc.high_water(),
            wal_seq: self.writer.wal_seq,
            digest: digest.digest(),
        };
        let (head, record) = d.seal_record(&mut tables.meta, head, self.store.replica.0)?;
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
    let id = |name: &str| view.id(name).ok_or_else(|| internal("uninterned field"));
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
