//! The rules' judgement of uploaded writes: which writes a client's roles and
//! subscriptions allow, and how a refused write is reported (in Atlas Device Sync's words).

use super::state::SyncServer;
use crate::conflict::apply_write;
use crate::error::Result;
use crate::log::{LogEntry, Op};
use crate::merge::ObjectState;
use crate::store::Store;
use crate::sync::protocol::{ErrorCode, RefusedWrite};
use crate::sync::view::View;
use crate::value::Value;

impl SyncServer {
    /// Takes the writes the client's roles or subscriptions do not allow out of the upload
    /// and returns them. Each write is judged on the object as the upload's earlier
    /// (allowed) writes leave it.
    pub(super) fn enforce(
        &self,
        view: &View,
        entries: &mut [LogEntry],
    ) -> Result<Vec<RefusedWrite>> {
        let mut overlay = Overlay::default();
        let mut refused = Vec::new();
        for e in entries.iter_mut() {
            let mut kept = Vec::with_capacity(e.writes.len());
            for w in std::mem::take(&mut e.writes) {
                let state = overlay.state(&self.store, &w)?;
                let mut after = state.clone();
                apply_write(&mut after, &w, e.stamp);
                let (before_fields, after_fields) = (live_fields(state)?, live_fields(&after)?);
                let denial = judge(view, &w, before_fields.as_ref(), after_fields.as_ref());
                match denial {
                    None => {
                        *state = after;
                        kept.push(w);
                    }
                    Some((reason, detail)) => {
                        refused.push(refused_write(&w, e.stamp, reason, detail));
                    }
                }
            }
            e.writes = kept;
        }
        Ok(refused)
    }
}

/// A refused write as the client is told of it.
pub(super) fn refused_write(
    w: &crate::log::Write,
    stamp: crate::clock::Stamp,
    reason: String,
    detail: Option<String>,
) -> RefusedWrite {
    let (fields, delete) = match &w.op {
        Op::Insert { fields } => (fields.clone(), false),
        Op::Update { fields } => (
            fields
                .iter()
                .map(|f| (f.field.clone(), f.value.clone()))
                .collect(),
            false,
        ),
        Op::Delete { .. } => (Vec::new(), true),
    };
    RefusedWrite {
        collection: w.collection.clone(),
        pk: w.pk.clone(),
        code: ErrorCode::CompensatingWrite,
        reason,
        detail,
        fields,
        delete,
        stamp,
    }
}

/// An object's live fields with their values folded (`None`: it does not exist).
fn live_fields(
    s: &ObjectState<String>,
) -> Result<Option<std::collections::BTreeMap<String, Value>>> {
    if !s.is_live() {
        return Ok(None);
    }
    let fields = s
        .fields
        .iter()
        .map(|(f, _, v)| (f.clone(), v.clone()))
        .collect();
    crate::crdt::fold(fields).map(Some)
}

/// The user-level fields a write sets: a part of a counter or text field counts as the
/// field itself.
fn written_fields(w: &crate::log::Write) -> Vec<&str> {
    let names: Vec<&str> = match &w.op {
        Op::Insert { fields } => fields.iter().map(|(f, _)| f.as_str()).collect(),
        Op::Update { fields } => fields.iter().map(|f| f.field.as_str()).collect(),
        Op::Delete { .. } => Vec::new(),
    };
    let mut out: Vec<&str> = names
        .into_iter()
        .map(|n| crate::crdt::parse_sub(n).map_or(n, |(_, parent, _)| parent))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether the view lets the write through; if not, the reason (Atlas's words) and our
/// detail. `before` and `after` are the object's live fields around the write.
fn judge(
    view: &View,
    w: &crate::log::Write,
    before: Option<&std::collections::BTreeMap<String, Value>>,
    after: Option<&std::collections::BTreeMap<String, Value>>,
) -> Option<(String, Option<String>)> {
    let (coll, pk) = (&w.collection, &w.pk);
    let empty = std::collections::BTreeMap::new();
    let written = written_fields(w);
    let denial = match (view.rules(), &w.op, before) {
        (None, ..) => None,
        (Some(r), Op::Delete { .. }, Some(b)) => r.check_delete(coll, view.user(), pk, b).err(),
        (Some(_), Op::Delete { .. }, None) => None,
        (Some(r), _, None) => r
            .check_insert(coll, view.user(), pk, after.unwrap_or(&empty), &written)
            .err(),
        (Some(r), _, Some(b)) => r
            .check_update(coll, view.user(), pk, b, after.unwrap_or(&empty), &written)
            .err(),
    };
    if let Some(d) = denial {
        return Some((not_allowed(w), Some(d.reason())));
    }
    // The object must be in the view: as it will be, or (a delete) as it was.
    let judged = match w.op {
        Op::Delete { .. } => before,
        _ => after,
    };
    let in_view = judged.is_none_or(|f| view.subscribed(coll, pk, f));
    (!in_view).then(|| {
        (
            format!(
                "{}; object is outside of the current query view",
                not_allowed(w)
            ),
            None,
        )
    })
}

/// Atlas Device Sync's reason for a refused write: `write to "a2" in table "Item" not
/// allowed`.
pub(super) fn not_allowed(w: &crate::log::Write) -> String {
    format!(
        "write to {} in table \"{}\" not allowed",
        atlas_pk(&w.pk),
        w.collection
    )
}

/// A primary key as Atlas Device Sync writes it in a compensating write's reason: `7`,
/// `"a2"`, `ObjectID("5f…")`, `UUID(0123…-…)`.
pub(super) fn atlas_pk(pk: &crate::value::Pk) -> String {
    use crate::value::Pk;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    match pk {
        Pk::Int(i) => i.to_string(),
        Pk::Str(s) => format!("\"{s}\""),
        Pk::Id12(b) => format!("ObjectID(\"{}\")", hex(b)),
        Pk::Id16(b) => format!(
            "UUID({}-{}-{}-{}-{})",
            hex(&b[..4]),
            hex(&b[4..6]),
            hex(&b[6..8]),
            hex(&b[8..10]),
            hex(&b[10..])
        ),
    }
}

/// The server's objects as an upload's earlier writes leave them, loaded on first use.
#[derive(Default)]
struct Overlay(std::collections::HashMap<(String, crate::value::Pk), ObjectState<String>>);

impl Overlay {
    fn state(&mut self, store: &Store, w: &crate::log::Write) -> Result<&mut ObjectState<String>> {
        let key = (w.collection.clone(), w.pk.clone());
        Ok(match self.0.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(store.object_state_named(&w.collection, &w.pk)?)
            }
        })
    }
}
