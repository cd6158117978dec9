//! Importing changesets from other replicas (and exporting them): remote writes merged
//! by stamp.

use crate::changeset::Changeset;
use crate::clock::Stamp;
use crate::error::{Error, NameKind, Result};
use crate::log::{LogPos, Op, Write};
use crate::merge::{wins, Outcome};
use crate::row;
use crate::value::Value;

use super::write_tx::WriteTx;
use super::Store;

/// What importing a changeset did, counted in field writes (an insert or delete counts one
/// more for the object's existence).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportReport {
    /// Writes that won and changed the state.
    pub applied: u64,
    /// Writes already held, or older than what we hold.
    pub stale: u64,
}

impl Store {
    /// This store's own log entries after `after`, as a changeset.
    pub fn export(&self, after: LogPos, limit: usize) -> Result<Changeset> {
        Ok(Changeset {
            origin: self.replica,
            entries: self.log_after(after, limit)?,
        })
    }

    /// Decodes, validates and imports a changeset's bytes (see [`Store::import`]).
    pub fn import_bytes(&self, bytes: &[u8]) -> Result<ImportReport> {
        let cs = Changeset::decode(bytes, self.options.value_bytes_max)?;
        self.import(&cs)
    }

    /// Merges another replica's changes, field by field, by stamp. All or nothing: a change
    /// that is invalid, breaks a schema, or carries a stamp too far in the future refuses the
    /// whole changeset and leaves the store untouched. Imported writes do not enter this
    /// store's Updates log (it records local writes).
    pub fn import(&self, cs: &Changeset) -> Result<ImportReport> {
        self.import_with(cs, |_, _| Ok(())).map(|(r, ())| r)
    }

    /// Imports a changeset and runs `extra` inside the same redb transaction, so sync
    /// bookkeeping (history, cursors) commits atomically with the state it describes.
    pub(crate) fn import_with<R>(
        &self,
        cs: &Changeset,
        extra: impl FnOnce(&mut WriteTx<'_>, &ImportReport) -> Result<R>,
    ) -> Result<(ImportReport, R)> {
        cs.validate(self.options.value_bytes_max)?;
        let mut tx = self.begin()?;
        let now = self.options.time.now_ms();
        for e in &cs.entries {
            tx.writer
                .hlc
                .check(e.stamp, now)
                .map_err(|d| Error::ClockDrift {
                    stamp: d.stamp,
                    now_ms: d.now_ms,
                    max_drift_ms: self.options.max_drift_ms,
                })?;
            for w in &e.writes {
                check_remote_schema(self, w)?;
            }
        }
        let mut report = ImportReport::default();
        let mut max_time = 0;
        for e in &cs.entries {
            max_time = max_time.max(e.stamp.time);
            for w in &e.writes {
                tx.merge_remote(w, e.stamp, &mut report)?;
            }
        }
        tx.writer.hlc.observe(max_time);
        let r = extra(&mut tx, &report)?;
        for e in &cs.entries {
            tx.put_history_of_import(cs.origin, e)?;
        }
        tx.commit()?;
        Ok((report, r))
    }

    /// Checks one incoming write against this store's schema.
    pub(crate) fn check_write_schema(&self, w: &Write) -> Result<()> {
        check_remote_schema(self, w)
    }
}

pub(super) fn check_remote_schema(store: &Store, w: &Write) -> Result<()> {
    let Some(schema) = store.schema_of(&w.collection) else {
        return Ok(());
    };
    match &w.op {
        Op::Insert { fields } => {
            for (f, v) in fields {
                schema.check_value(&w.pk, f, v)?;
            }
            schema.check_complete(&w.pk, |name| {
                fields.iter().find(|(f, _)| f == name).map(|(_, v)| v)
            })
        }
        Op::Update { fields } => fields
            .iter()
            .try_for_each(|fw| schema.check_value(&w.pk, &fw.field, &fw.value)),
        Op::Delete { .. } => Ok(()),
    }
}

impl<'s> WriteTx<'s> {
    /// Merges one remote write into the transaction.
    pub(super) fn merge_remote(
        &mut self,
        w: &Write,
        stamp: Stamp,
        report: &mut ImportReport,
    ) -> Result<()> {
        let key = self.load_unsettled(&w.collection, &w.pk)?;
        let mut field_ids = Vec::new();
        match &w.op {
            Op::Insert { fields } => {
                for (f, _) in fields {
                    field_ids.push(self.intern(NameKind::Field, f)?);
                }
            }
            Op::Update { fields } => {
                for fw in fields {
                    field_ids.push(self.intern(NameKind::Field, &fw.field)?);
                }
            }
            Op::Delete { .. } => {}
        }
        let Some(p) = self.pending.get_mut(&key) else {
            return Ok(());
        };
        // An update of a live row with nothing else pending (the common case): keep the
        // winning writes apart, judged against the row's stamps without decoding it, so
        // commit patches the row's bytes.
        if let (Op::Update { fields }, None, None, Some(before)) =
            (&w.op, &p.op, &p.after, &p.before)
        {
            if let Some(parsed) = row::parse(&before.row)?.filter(row::Parsed::is_live) {
                let floor = parsed.floor();
                for (fw, &id) in fields.iter().zip(&field_ids) {
                    let current = match p.remote.get(&id) {
                        Some((s, _)) => Some(*s),
                        None => parsed.field_stamp(id),
                    };
                    if !wins(floor, current, stamp) {
                        report.stale += 1;
                        continue;
                    }
                    p.remote.insert(id, (stamp, fw.value.clone()));
                    report.applied += 1;
                }
                return Ok(());
            }
        }
        p.settle()?;
        let mut state = p.take_state()?;
        let mut count = |o: Outcome| match o {
            Outcome::Applied => report.applied += 1,
            Outcome::Stale => report.stale += 1,
        };
        let values: Vec<&Value> = match &w.op {
            Op::Insert { fields } => {
                count(state.apply_exists(stamp, true));
                fields.iter().map(|(_, v)| v).collect()
            }
            Op::Update { fields } => fields.iter().map(|fw| &fw.value).collect(),
            Op::Delete { .. } => {
                count(state.apply_exists(stamp, false));
                Vec::new()
            }
        };
        let writes = field_ids
            .into_iter()
            .zip(values)
            .map(|(id, v)| (id, stamp, v.clone()))
            .collect();
        state.apply_fields(writes).into_iter().for_each(count);
        p.after = Some(state);
        Ok(())
    }
}
