//! Client reset's storage steps: backup, snapshot export, staging the server's state,
//! the swap, and replaying the unsynced writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use redb::{ReadableDatabase, ReadableTable};

use crate::clock::Stamp;
use crate::crdt;
use crate::digest::DigestSum;
use crate::error::{Error, NameKind, Result};
use crate::log::{FieldWrite, LogEntry, LogPos, Op, Write};
use crate::merge::{ObjectState, Outcome};
use crate::reset::{
    Discarded, ObjectSnapshot, ResetMarker, ResetMode, ResetPhase, ResetReport, Superseded,
    UnsyncedWrite,
};
use crate::schema::Schema;
use crate::value::{Pk, Value};

use super::format::{
    corrupt, decode_state, encode, internal, meta_digest, meta_u64, object_key, u64_of, LOG, META,
    META_COUNT_PREFIX, META_DIGEST, META_LAST_SYNC, META_RESET, META_SCHEMA_PREFIX, OBJECTS,
    REPLACED, STAGING, STAGING_META,
};
use super::locks::lock;
use super::names::NameView;
use super::write_tx::WriteTx;
use super::{Object, Options, Store};

/// A reset's unsynced writes, read when the reset begins (with the server's schemas, which
/// decide what is kept) and replayed onto each staged chunk as it arrives: the staged state
/// is written once, already replayed, instead of staged and then rewritten at the swap. What
/// no chunk held (objects the server lacks) and what the application wrote while staging
/// runs are replayed at the swap.
pub(crate) struct ReplayPlan {
    /// The unsynced entries, in log order; the swap appends those written since.
    pub(super) entries: Vec<LogEntry<u32>>,
    /// The last log position read.
    pub(super) head: LogPos,
    /// Writes not yet replayed, by object key, in log order: (entry, write, slot).
    pub(super) by_key: HashMap<Vec<u8>, Vec<(usize, usize, usize)>>,
    /// Every field write's decision, in log order.
    pub(super) decisions: Vec<Option<Replay>>,
    pub(super) schemas: HashMap<String, Schema>,
    pub(super) discard: Option<&'static str>,
    /// Why the unsynced log could not be read (recover-or-discard mode goes on without it).
    pub(super) unreadable: Option<String>,
    /// Time spent replaying so far.
    pub(super) spent: std::time::Duration,
}

impl std::fmt::Debug for ReplayPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayPlan")
            .field("entries", &self.entries.len())
            .field("head", &self.head)
            .field("objects_left", &self.by_key.len())
            .finish_non_exhaustive()
    }
}

impl ReplayPlan {
    /// Reads the log entries after the plan's up to `head`. A log that cannot be read is
    /// an error, except in recover-or-discard mode, which goes on without it (and the
    /// report says why).
    pub(super) fn read_up_to(
        &mut self,
        store: &Store,
        head: LogPos,
        mode: ResetMode,
    ) -> Result<()> {
        if self.unreadable.is_some() || head <= self.head {
            return Ok(());
        }
        match (store.unsynced_entries(self.head, head), mode) {
            (Ok(entries), _) => self.extend(entries, head),
            (Err(e), ResetMode::RecoverOrDiscard) => self.unreadable = Some(e.to_string()),
            (Err(e), _) => return Err(e),
        }
        Ok(())
    }

    /// Adds `entries` (read after `head`), giving their writes slots for decisions.
    pub(super) fn extend(&mut self, entries: Vec<LogEntry<u32>>, head: LogPos) {
        for e in entries {
            let entry = self.entries.len();
            for (write, w) in e.writes.iter().enumerate() {
                let slot = self.decisions.len();
                self.decisions
                    .resize_with(slot + w.op.write_count(), || None);
                self.by_key
                    .entry(object_key(w.collection, &w.pk))
                    .or_default()
                    .push((entry, write, slot));
            }
            self.entries.push(e);
        }
        self.head = self.head.max(head);
    }

    /// Replays the writes to object `key` onto `state` (decisions recorded), if it has any.
    pub(super) fn replay_object(
        &mut self,
        view: &NameView<'_>,
        key: &[u8],
        coll: &str,
        state: &mut ObjectState<u32>,
    ) -> Result<bool> {
        let Some(writes) = self.by_key.remove(key) else {
            return Ok(false);
        };
        let schema = self.schemas.get(coll);
        for (entry, write, slot) in writes {
            let e = &self.entries[entry];
            let w = &e.writes[write];
            let out = &mut self.decisions[slot..slot + w.op.write_count()];
            replay_write(view, state, e.stamp, w, schema, self.discard, out)?;
        }
        Ok(true)
    }
}

/// What the swap does with one unsynced field write.
pub(super) enum Replay {
    Recovered,
    Superseded {
        server_value: Option<Value>,
        server_stamp: Stamp,
        reason: String,
    },
    Discarded(String),
}

impl Store {
    /// The store's file, if it has one.
    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// An object's full merged state with field names (default if it was never written).
    pub(crate) fn object_state_named(&self, coll: &str, pk: &Pk) -> Result<ObjectState<String>> {
        let Some((state, _)) = self.read_state(coll, pk)? else {
            return Ok(ObjectState::default());
        };
        let names = self.names();
        let view = NameView {
            base: &names,
            new: None,
        };
        let mut fields = state
            .fields
            .into_iter()
            .map(|(f, s, v)| Ok((view.name(f)?.to_owned(), s, v)))
            .collect::<Result<Vec<_>>>()?;
        // Sorted by name: the merge functions binary-search by field key.
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(ObjectState {
            exists: state.exists,
            floor: state.floor,
            fields,
        })
    }

    /// Merges whole object states from the server and removes objects that left this
    /// client's view (a removal is not a delete: nothing is logged), in one transaction with
    /// `extra`. Returns how many objects changed.
    pub(crate) fn merge_view(
        &self,
        objects: &[ObjectSnapshot],
        removed: &[(String, Pk)],
        extra: impl FnOnce(&mut WriteTx<'_>) -> Result<()>,
    ) -> Result<u64> {
        let mut tx = self.begin()?;
        let now = self.options.time.now_ms();
        let mut changed = 0;
        for o in objects {
            o.pk.validate()?;
            let stamps = o
                .fields
                .iter()
                .map(|(_, s, _)| *s)
                .chain(o.exists.map(|(s, _)| s));
            for s in stamps {
                tx.writer.hlc.check(s, now).map_err(|d| Error::ClockDrift {
                    stamp: d.stamp,
                    now_ms: d.now_ms,
                    max_drift_ms: self.options.max_drift_ms,
                })?;
                tx.writer.hlc.observe(s.time);
            }
            let key = tx.load(&o.collection, &o.pk)?;
            let mut fields = Vec::with_capacity(o.fields.len());
            for (name, stamp, value) in &o.fields {
                crdt::check_sub_value(name, value)
                    .map_err(|reason| Error::BadChangeset { reason })?;
                if value.size_bytes() > self.options.value_bytes_max {
                    return Err(Error::BadChangeset {
                        reason: format!("value of {}[{}].{name} is too large", o.collection, o.pk),
                    });
                }
                fields.push((tx.intern(NameKind::Field, name)?, *stamp, value.clone()));
            }
            fields.sort_by_key(|(f, _, _)| *f);
            let incoming = ObjectState {
                exists: o.exists,
                floor: o.floor,
                fields,
            };
            if let Some(p) = tx.pending.get_mut(&key) {
                let mut state = p.take_state()?;
                if state.merge_state(incoming) {
                    changed += 1;
                }
                p.after = Some(state);
            }
        }
        let mut purge = Vec::new();
        for (coll, pk) in removed {
            let key = tx.load(coll, pk)?;
            if tx
                .pending
                .get(&key)
                .is_some_and(|p| p.before.is_some() || p.after.is_some())
            {
                purge.push(key);
            }
        }
        extra(&mut tx)?;
        // Removed objects leave no state behind: a later download may bring them back whole.
        for key in purge {
            if let Some(p) = tx.pending.get_mut(&key) {
                p.after = Some(ObjectState::default());
                p.purge = true;
                changed += 1;
            }
        }
        tx.raw_used = true;
        tx.commit()?;
        Ok(changed)
    }

    /// An object's full state with names, as the server sends it to filtered clients.
    pub(crate) fn object_snapshot(&self, coll: &str, pk: &Pk) -> Result<ObjectSnapshot> {
        let state = self.object_state_named(coll, pk)?;
        Ok(ObjectSnapshot {
            collection: coll.to_owned(),
            pk: pk.clone(),
            exists: state.exists,
            floor: state.floor,
            fields: state.fields,
        })
    }

    /// The marker of a reset under way.
    pub(crate) fn reset_marker(&self) -> Result<Option<ResetMarker>> {
        self.settle()?;
        let db = self.db()?;
        let rtx = db.begin_read()?;
        let meta = rtx.open_table(META)?;
        let m = meta.get(META_RESET)?;
        m.map(|v| {
            postcard::from_bytes(v.value()).map_err(|e| corrupt(format!("reset marker: {e}")))
        })
        .transpose()
    }

    /// Writes (or, with `None`, removes) the reset marker, durably.
    pub(crate) fn set_reset_marker(&self, marker: Option<&ResetMarker>) -> Result<()> {
        self.check_poisoned()?;
        let _w = self.lock_writer()?;
        let txn = self.db()?.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            match marker {
                Some(m) => {
                    meta.insert(META_RESET, encode(m)?.as_slice())?;
                }
                None => {
                    meta.remove(META_RESET)?;
                }
            }
        }
        self.finish(txn.commit().map_err(Error::from))
    }

    /// Copies the store file to `dest` atomically: with no write in flight and everything
    /// committed made durable first, to a temporary file that is fsynced and renamed.
    pub(crate) fn backup_to(&self, dest: &Path) -> Result<()> {
        let Some(src) = self.path.as_deref() else {
            return Ok(());
        };
        self.check_poisoned()?;
        let mut w = self.lock_writer()?;
        // Every commit (deferred ones, those in the write-ahead file) into the file.
        let r = self.checkpoint_with(&mut w, false);
        self.finish(r)?;
        let mut tmp = dest.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = std::path::PathBuf::from(tmp);
        std::fs::copy(src, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dest)?;
        if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Objects after the key `after`, about `max_bytes` of them, as snapshots (tombstones
    /// included), and the key to continue from. Keys are local and opaque.
    pub(crate) fn snapshot_chunk(
        &self,
        after: Option<&[u8]>,
        max_bytes: usize,
    ) -> Result<(Vec<ObjectSnapshot>, Option<Vec<u8>>)> {
        self.settle()?;
        let db = self.db()?;
        let rtx = db.begin_read()?;
        let table = rtx.open_table(OBJECTS)?;
        let names = self.names();
        let view = NameView {
            base: &names,
            new: None,
        };
        let range = match after {
            Some(k) => {
                table.range::<&[u8]>((std::ops::Bound::Excluded(k), std::ops::Bound::Unbounded))?
            }
            None => table.range::<&[u8]>(..)?,
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        for row in range {
            let (k, v) = row?;
            let key = k.value();
            let cid = u32::from_be_bytes(
                key.get(..4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| corrupt("object key"))?,
            );
            let pk = Pk::decode(&key[4..]).ok_or_else(|| corrupt("object key"))?;
            let state = decode_state(v.value())?;
            bytes += v.value().len() + key.len();
            out.push(ObjectSnapshot {
                collection: view.name(cid)?.to_owned(),
                pk,
                exists: state.exists,
                floor: state.floor,
                fields: state
                    .fields
                    .iter()
                    .map(|(f, s, v)| Ok((view.name(*f)?.to_owned(), *s, v.clone())))
                    .collect::<Result<_>>()?,
            });
            if bytes >= max_bytes {
                return Ok((out, Some(key.to_vec())));
            }
        }
        Ok((out, None))
    }

    /// Stages a chunk of the server's state; the first chunk clears what was staged.
    pub(crate) fn stage_snapshot(
        &self,
        objects: &[ObjectSnapshot],
        first: bool,
        plan: &mut ReplayPlan,
    ) -> Result<()> {
        let mut tx = self.begin()?;
        // Other tables are written: its own transaction, committed durably.
        tx.raw()?;
        if first {
            let txn = tx.raw()?;
            txn.delete_table(STAGING)?;
            txn.delete_table(STAGING_META)?;
        }
        let mut staged = Vec::with_capacity(objects.len());
        for o in objects {
            o.pk.validate()?;
            // The clock advances past every stamp it sees, the server's state included:
            // otherwise the next local write could be stamped below a field it overwrites.
            let stamps = o
                .fields
                .iter()
                .map(|(_, s, _)| *s)
                .chain(o.exists.map(|(s, _)| s));
            for s in stamps.chain(std::iter::once(o.floor)) {
                tx.writer.hlc.observe(s.time);
            }
            let cid = tx.intern(NameKind::Collection, &o.collection)?;
            let mut fields = Vec::with_capacity(o.fields.len());
            for (name, stamp, value) in &o.fields {
                fields.push((tx.intern(NameKind::Field, name)?, *stamp, value.clone()));
            }
            fields.sort_by_key(|(f, _, _)| *f);
            let state = ObjectState {
                exists: o.exists,
                floor: o.floor,
                fields,
            };
            staged.push((cid, o, state));
        }
        let names = self.names();
        let view = NameView {
            base: &names,
            new: Some(&tx.new_names),
        };
        let txn = tx.txn_ref()?;
        let mut table = txn.open_table(STAGING)?;
        let mut meta = txn.open_table(STAGING_META)?;
        let mut sum = staged_digest(&meta)?;
        for (cid, o, mut state) in staged {
            let key = object_key(cid, &o.pk);
            let started = std::time::Instant::now();
            if plan.replay_object(&view, &key, &o.collection, &mut state)? {
                plan.spent += started.elapsed();
            }
            if view.digest_delta(&o.collection, &o.pk, None, &state, &mut sum)? > 0 {
                bump_count(&mut meta, cid, 1)?;
            }
            table.insert(key.as_slice(), encode(&state)?.as_slice())?;
        }
        meta.insert(META_DIGEST, sum.digest().0.as_slice())?;
        drop((table, meta, names));
        tx.raw_used = true;
        tx.commit()?;
        Ok(())
    }

    /// Reads the unsynced writes a reset replays, those after `replay_after` (see
    /// [`ReplayPlan`]); `schemas` are the server's, which decide what is kept.
    pub(crate) fn plan_replay(
        &self,
        mode: ResetMode,
        schemas: &[Schema],
        replay_after: LogPos,
    ) -> Result<ReplayPlan> {
        for s in schemas {
            s.validate()?;
        }
        let head = self.log_head();
        let replay_after = replay_after.min(head);
        let mut plan = ReplayPlan {
            entries: Vec::new(),
            head: replay_after,
            by_key: HashMap::new(),
            decisions: Vec::new(),
            schemas: schemas
                .iter()
                .map(|s| (s.collection.clone(), s.clone()))
                .collect(),
            discard: match mode {
                ResetMode::Manual => {
                    Some("manual reset: the write is in the backup for the application to recover")
                }
                ResetMode::DiscardUnsyncedChanges => {
                    Some("discard mode: unsynced changes are dropped")
                }
                _ => None,
            },
            unreadable: None,
            spent: std::time::Duration::ZERO,
        };
        let started = std::time::Instant::now();
        plan.read_up_to(self, head, mode)?;
        plan.spent += started.elapsed();
        Ok(plan)
    }

    /// The log entries in `(after, upto]`, every name in them checked.
    pub(super) fn unsynced_entries(
        &self,
        after: LogPos,
        upto: LogPos,
    ) -> Result<Vec<LogEntry<u32>>> {
        self.read_log(after + 1..=upto, usize::MAX, usize::MAX, |view, e| {
            // Kept with ids (the replay and the new log entries use them), but every name
            // must resolve, so an unreadable log is found here.
            for w in &e.writes {
                view.name(w.collection)?;
                match &w.op {
                    Op::Insert { fields } => {
                        for (f, _) in fields {
                            view.name(*f)?;
                        }
                    }
                    Op::Update { fields } => {
                        for fw in fields {
                            view.name(fw.field)?;
                        }
                    }
                    Op::Delete { .. } => {}
                }
            }
            Ok(e)
        })
    }

    /// Swaps the staged server state in, replaying what `plan` has left (writes to objects
    /// no chunk held, and entries written since it was made), in one transaction (see
    /// `reset.rs`). `extra` runs in the same transaction.
    pub(crate) fn finish_reset(
        &self,
        marker: &ResetMarker,
        schemas: &[Schema],
        mut plan: ReplayPlan,
        extra: impl FnOnce(&mut WriteTx<'_>) -> Result<()>,
    ) -> Result<(ResetReport, LogPos)> {
        for s in schemas {
            s.validate()?;
        }
        let started = std::time::Instant::now();
        let mut tx = self.begin()?;
        // Other tables are written: its own transaction, committed durably.
        tx.raw()?;
        let head = tx.writer.log_next - 1;
        let mut report = ResetReport {
            reason: Some(marker.reason.clone()),
            mode: marker.mode,
            backup: marker.backup.clone(),
            ..ResetReport::default()
        };
        // What the application wrote while staging ran (redb shows this transaction every
        // commit made before it began).
        plan.read_up_to(self, head, marker.mode)?;
        if let Some(why) = plan.unreadable.take() {
            report.discarded.push(Discarded {
                write: UnsyncedWrite {
                    collection: String::new(),
                    pk: Pk::Int(0),
                    field: None,
                    value: Value::Null,
                    stamp: Stamp::ZERO,
                },
                reason: format!("the unsynced log could not be read: {why}"),
            });
        }
        let (sum, counts) = self.replay_left(&tx, &mut plan)?;
        let spent = plan.spent;
        let recovered = self.classify_unsynced(&tx, &mut report, plan)?;
        // The old state is renamed aside, not deleted: freeing it reads every page, and it
        // is dropped once the swap has committed (the open path drops what a crash left).
        // One can only be here already if that drop failed.
        tx.txn_ref()?.delete_table(REPLACED)?;
        tx.txn_ref()?.rename_table(OBJECTS, REPLACED)?;
        tx.txn_ref()?.rename_table(STAGING, OBJECTS)?;
        tx.txn_ref()?.delete_table(STAGING_META)?;
        let swap = Swap {
            head,
            next: head + 1 + recovered.len() as u64,
            sum,
            counts,
        };
        swap.write(&tx, recovered, schemas, marker)?;
        extra(&mut tx)?;
        let until = swap.next - 1;
        self.commit_swap(tx, swap, schemas)?;
        report.replay_time = spent + started.elapsed();
        // The swap stands whatever happens here: a failed drop poisons the store, and the
        // open that follows drops the table.
        self.drop_replaced()?;
        Ok((report, until))
    }

    /// Replays what is left of `plan` onto the staged state, object by object in key
    /// order: each staged object is read, decoded, hashed and written once however many
    /// writes touch it. One object's writes stay in log order, and objects are independent
    /// of each other, so every write is decided exactly as replaying the log in order
    /// would. Returns the staged state's digest and counts.
    fn replay_left(
        &self,
        tx: &WriteTx<'_>,
        plan: &mut ReplayPlan,
    ) -> Result<(DigestSum, HashMap<u32, u64>)> {
        let mut left: Vec<Vec<u8>> = plan.by_key.keys().cloned().collect();
        left.sort_unstable();
        let mut counts: HashMap<u32, u64> = HashMap::new();
        let names = self.names();
        let view = NameView {
            base: &names,
            new: Some(&tx.new_names),
        };
        let mut staging = tx.txn_ref()?.open_table(STAGING)?;
        let smeta = tx.txn_ref()?.open_table(STAGING_META)?;
        let mut sum = staged_digest(&smeta)?;
        for row in smeta.iter()? {
            let (k, v) = row?;
            if let Some(id) = k.value().strip_prefix(META_COUNT_PREFIX) {
                let id: u32 = id.parse().map_err(|_| corrupt("staged count key"))?;
                counts.insert(id, u64_of(v.value(), "staged count")?);
            }
        }
        for key in left {
            let Some(&(entry, write, _)) = plan.by_key.get(&key).and_then(|w| w.first()) else {
                continue;
            };
            let (cid, pk) = {
                let w = &plan.entries[entry].writes[write];
                (w.collection, w.pk.clone())
            };
            let coll = view.name(cid)?;
            let before = staging
                .get(key.as_slice())?
                .map(|r| decode_state(r.value()))
                .transpose()?;
            let mut state = before.clone().unwrap_or_default();
            plan.replay_object(&view, &key, coll, &mut state)?;
            if before.as_ref() == Some(&state) {
                continue;
            }
            let delta = view.digest_delta(coll, &pk, before.as_ref(), &state, &mut sum)?;
            let c = counts.entry(cid).or_default();
            *c = c.saturating_add_signed(delta);
            staging.insert(key.as_slice(), encode(&state)?.as_slice())?;
        }
        Ok((sum, counts))
    }

    /// Back in log order: the report lists every write where the log has it, and the
    /// recovered part of each unsynced entry becomes one new entry with its stamp.
    fn classify_unsynced(
        &self,
        tx: &WriteTx<'_>,
        report: &mut ResetReport,
        plan: ReplayPlan,
    ) -> Result<Vec<(Stamp, Vec<Write<u32>>)>> {
        let ReplayPlan {
            entries: unsynced,
            decisions,
            discard,
            ..
        } = plan;
        let mut recovered = Vec::new();
        let names = self.names();
        let view = NameView {
            base: &names,
            new: Some(&tx.new_names),
        };
        // When recovering, most unsynced writes usually are: one allocation for them.
        if discard.is_none() {
            report.recovered.reserve(decisions.len());
        }
        let mut decisions = decisions.into_iter();
        for e in unsynced {
            let mut writes = Vec::new();
            for w in e.writes {
                if let Some(kept) = classify(&view, report, e.stamp, w, &mut decisions)? {
                    writes.push(kept);
                }
            }
            if !writes.is_empty() {
                recovered.push((e.stamp, writes));
            }
        }
        Ok(recovered)
    }

    /// Commits the swap, handing `commit` the swapped-in digest and log position (and
    /// taking them back if the commit fails); then moves the writer and the schemas to
    /// the swapped-in state.
    fn commit_swap(&self, mut tx: WriteTx<'_>, swap: Swap, schemas: &[Schema]) -> Result<()> {
        let old_digest = std::mem::replace(&mut tx.writer.digest, swap.sum);
        let old_next = std::mem::replace(&mut tx.writer.log_next, swap.next);
        tx.raw_used = true;
        if let Err(e) = tx.commit() {
            let mut w = lock(&self.writer);
            w.digest = old_digest;
            w.log_next = old_next;
            return Err(e);
        }
        let mut w = lock(&self.writer);
        w.counts = swap.counts;
        w.log_next = swap.next;
        w.last_sync = swap.head;
        *lock(&self.visible) = w.visible();
        drop(w);
        let mut map = self.schemas.write().unwrap_or_else(PoisonError::into_inner);
        for s in schemas {
            map.insert(s.collection.clone(), Arc::new(s.clone()));
        }
        Ok(())
    }

    /// Drops the state a reset's swap replaced, in a durable transaction of its own.
    pub(super) fn drop_replaced(&self) -> Result<()> {
        self.check_poisoned()?;
        let _w = self.lock_writer()?;
        let txn = self.db()?.begin_write()?;
        txn.delete_table(REPLACED)?;
        self.finish(txn.commit().map_err(Error::from))
    }
}

pub(super) fn staged_digest(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<DigestSum> {
    Ok(DigestSum::from_digest(meta_digest(meta, META_DIGEST)?))
}

pub(super) fn bump_count(
    meta: &mut redb::Table<'_, &'static str, &'static [u8]>,
    cid: u32,
    by: u64,
) -> Result<()> {
    let key = format!("{META_COUNT_PREFIX}{cid}");
    let n = meta_u64(&*meta, &key, 0)?;
    meta.insert(key.as_str(), (n + by).to_le_bytes().as_slice())?;
    Ok(())
}

/// Replays one unsynced write onto its object's state, deciding each of its field writes
/// on its own (the existence write first), into `out`.
pub(super) fn replay_write(
    view: &NameView<'_>,
    state: &mut ObjectState<u32>,
    stamp: Stamp,
    w: &Write<u32>,
    schema: Option<&Schema>,
    discard: Option<&str>,
    out: &mut [Option<Replay>],
) -> Result<()> {
    let mut out = out.iter_mut();
    let mut decide = |r: Replay| {
        if let Some(slot) = out.next() {
            *slot = Some(r);
        }
    };
    match &w.op {
        Op::Insert { fields } => {
            decide(replay_exists(state, stamp, true, discard));
            for (f, v) in fields {
                let field = (*f, view.name(*f)?);
                decide(replay_field(state, stamp, &w.pk, field, v, schema, discard));
            }
        }
        Op::Update { fields } => {
            for fw in fields {
                let field = (fw.field, view.name(fw.field)?);
                decide(replay_field(
                    state, stamp, &w.pk, field, &fw.value, schema, discard,
                ));
            }
        }
        Op::Delete { .. } => decide(replay_exists(state, stamp, false, discard)),
    }
    Ok(())
}

/// Files each field write of an unsynced write in the report by its decision (taken from
/// `decisions` in order), and returns the write's recovered part, which goes back into the
/// log.
pub(super) fn classify(
    view: &NameView<'_>,
    report: &mut ResetReport,
    stamp: Stamp,
    w: Write<u32>,
    decisions: &mut impl Iterator<Item = Option<Replay>>,
) -> Result<Option<Write<u32>>> {
    let Write { collection, pk, op } = w;
    let coll = view.name(collection)?;
    // Every field write was decided; a missing decision would be a bug here, not lost data.
    let mut next = || {
        decisions
            .next()
            .flatten()
            .ok_or_else(|| internal("an unsynced write was not replayed"))
    };
    let mut file = |r: Replay, field: Option<&str>, value: &Value| -> bool {
        let write = UnsyncedWrite {
            collection: coll.to_owned(),
            pk: pk.clone(),
            field: field.map(str::to_owned),
            value: value.clone(),
            stamp,
        };
        let recovered = matches!(r, Replay::Recovered);
        record(report, r, write);
        recovered
    };
    let kept = match op {
        Op::Insert { fields } => {
            let exists_ok = file(next()?, None, &Value::Bool(true));
            let mut kept_fields = Vec::new();
            for (f, v) in fields {
                if file(next()?, Some(view.name(f)?), &v) {
                    kept_fields.push((f, v));
                }
            }
            if exists_ok {
                Some(Op::Insert {
                    fields: kept_fields,
                })
            } else if kept_fields.is_empty() {
                None
            } else {
                Some(Op::Update {
                    fields: kept_fields
                        .into_iter()
                        .map(|(field, value)| FieldWrite {
                            field,
                            value,
                            base: None,
                        })
                        .collect(),
                })
            }
        }
        Op::Update { fields } => {
            let mut kept_fields = Vec::new();
            for fw in fields {
                if file(next()?, Some(view.name(fw.field)?), &fw.value) {
                    kept_fields.push(fw);
                }
            }
            (!kept_fields.is_empty()).then_some(Op::Update {
                fields: kept_fields,
            })
        }
        Op::Delete { base } => {
            file(next()?, None, &Value::Bool(false)).then_some(Op::Delete { base })
        }
    };
    Ok(kept.map(|op| Write { collection, pk, op }))
}

/// Replays an insert (`alive`) or a delete onto the state.
pub(super) fn replay_exists(
    state: &mut ObjectState<u32>,
    stamp: Stamp,
    alive: bool,
    discard: Option<&str>,
) -> Replay {
    if let Some(why) = discard {
        return Replay::Discarded(why.to_owned());
    }
    match state.exists {
        // Checked before applying: a stale existence write may still raise the floor.
        Some((s, server_alive)) if s >= stamp => Replay::Superseded {
            server_value: Some(Value::Bool(server_alive)),
            server_stamp: s,
            reason: format!(
                "the server {} the object later (by {})",
                if server_alive { "wrote" } else { "deleted" },
                s.replica
            ),
        },
        _ => {
            state.apply_exists(stamp, alive);
            Replay::Recovered
        }
    }
}

/// Replays one field write onto the state.
pub(super) fn replay_field(
    state: &mut ObjectState<u32>,
    stamp: Stamp,
    pk: &Pk,
    (field, name): (u32, &str),
    value: &Value,
    schema: Option<&Schema>,
    discard: Option<&str>,
) -> Replay {
    if let Some(why) = discard {
        return Replay::Discarded(why.to_owned());
    }
    if let Some(Err(e)) = schema.map(|s| s.check_value(pk, name, value)) {
        return Replay::Discarded(format!("the server's schema refuses it: {e}"));
    }
    // An update of an object deleted on the server is kept like in normal sync: merged
    // (hidden while the object is deleted) and uploaded, where the server's conflict policy
    // for update-vs-delete decides.
    if state.apply_field(field, stamp, value.clone()) == Outcome::Applied {
        return Replay::Recovered;
    }
    // A stale write left the state as it was.
    match state.field(field) {
        Some((s, v)) => Replay::Superseded {
            server_value: Some(v.clone()),
            server_stamp: s,
            reason: format!("the server's value is newer (written by {})", s.replica),
        },
        None => Replay::Superseded {
            server_value: None,
            server_stamp: state.floor,
            reason: format!(
                "the object was deleted or re-created after it (by {})",
                state.floor.replica
            ),
        },
    }
}

/// Files one decided field write in the report.
pub(super) fn record(report: &mut ResetReport, outcome: Replay, write: UnsyncedWrite) {
    match outcome {
        Replay::Recovered => report.recovered.push(write),
        Replay::Superseded {
            server_value,
            server_stamp,
            reason,
        } => report.superseded.push(Superseded {
            write,
            server_value,
            server_stamp,
            reason,
        }),
        Replay::Discarded(reason) => report.discarded.push(Discarded { write, reason }),
    }
}

/// What a reset's swap moves the store to: the log position it settles (`head`), the next
/// one after the recovered entries, and the swapped-in state's digest and counts.
struct Swap {
    head: LogPos,
    next: LogPos,
    sum: DigestSum,
    counts: HashMap<u32, u64>,
}

impl Swap {
    /// Appends the recovered writes to the log with their own stamps, settles the old
    /// unsynced entries, and writes the swapped-in counts, the server's schemas and the
    /// marker's next phase.
    fn write(
        &self,
        tx: &WriteTx<'_>,
        recovered: Vec<(Stamp, Vec<Write<u32>>)>,
        schemas: &[Schema],
        marker: &ResetMarker,
    ) -> Result<()> {
        let mut log = tx.txn_ref()?.open_table(LOG)?;
        for (seq, (stamp, writes)) in (self.head + 1..).zip(recovered) {
            let entry = LogEntry { seq, stamp, writes };
            log.insert(seq, encode(&entry)?.as_slice())?;
        }
        let mut meta = tx.txn_ref()?.open_table(META)?;
        meta.insert(META_LAST_SYNC, self.head.to_le_bytes().as_slice())?;
        meta.retain_in::<&str, _>(META_COUNT_PREFIX.."count0", |_, _| false)?;
        for (cid, n) in &self.counts {
            meta.insert(
                format!("{META_COUNT_PREFIX}{cid}").as_str(),
                n.to_le_bytes().as_slice(),
            )?;
        }
        for s in schemas {
            let key = format!("{META_SCHEMA_PREFIX}{}", s.collection);
            meta.insert(key.as_str(), encode(s)?.as_slice())?;
        }
        let m = ResetMarker {
            phase: ResetPhase::Uploading {
                until: self.next - 1,
                settled: self.head,
            },
            ..marker.clone()
        };
        meta.insert(META_RESET, encode(&m)?.as_slice())?;
        Ok(())
    }
}

/// A reset backup, opened for the application to inspect (in `Manual` mode, or before the
/// backup is removed).
#[derive(Debug)]
pub struct Backup {
    store: Store,
    path: PathBuf,
}

impl Backup {
    /// Opens a backup file. It is a copy of the store as it was when the reset began; this
    /// handle only reads it.
    pub fn open(path: impl AsRef<Path>) -> Result<Backup> {
        let path = path.as_ref().to_owned();
        Ok(Backup {
            store: Store::open_with(&path, Options::default())?,
            path,
        })
    }

    /// The writes that were not acknowledged by the server when the reset began.
    pub fn unsynced(&self) -> Result<Vec<LogEntry>> {
        self.store.unsynced(usize::MAX)
    }

    /// An object as it was in the backup.
    pub fn get(&self, collection: &str, pk: impl Into<Pk>) -> Result<Option<Object>> {
        self.store.get(collection, pk)
    }

    /// Deletes the backup file once the application is done with it.
    pub fn remove(self) -> Result<()> {
        let Backup { store, path } = self;
        drop(store);
        std::fs::remove_file(&path)?;
        Ok(())
    }
}
