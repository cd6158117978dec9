//! Conflicts: detection from the base stamps uploaded writes carry, and resolution policies.
//!
//! Pure logic. The server detects conflicts against its state before an upload is merged,
//! merges the upload by stamp (which is `LastWriterWins`), and then expresses any other
//! policy's decision as new ordinary field writes stamped after the client's, so clients
//! converge with the one merge rule they know.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::{ReplicaId, Stamp};
use crate::error::Result;
use crate::log::{Op, Write};
use crate::merge::ObjectState;
use crate::value::{Pk, Value};

/// The kinds of conflict, named as users of sync frameworks know them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConflictKind {
    /// The client inserted a primary key another replica created.
    ClientInsertServerInsert,
    /// The same field changed on both sides since the client's base.
    ClientUpdateServerUpdate,
    /// The client updated an object the server has deleted.
    ClientUpdateServerDelete,
    /// The client deleted an object whose fields changed on the server since its base.
    ClientDeleteServerUpdate,
    /// The write failed validation or a constraint.
    ErrorsOccurred,
}

impl fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One side of a conflict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Side {
    /// The value (`None`: absent, or the object is deleted; for existence conflicts the
    /// object's live fields are not listed).
    pub value: Option<Value>,
    /// When it was written (`None`: never written).
    pub stamp: Option<Stamp>,
    /// The replica that wrote it.
    pub replica: Option<ReplicaId>,
    /// The user that replica last authenticated as, if the server knows it.
    pub user: Option<String>,
}

/// A detected conflict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    /// What kind.
    pub kind: ConflictKind,
    /// Collection.
    pub collection: String,
    /// Primary key.
    pub pk: Pk,
    /// The field, for field conflicts (`ClientUpdateServerUpdate`).
    pub field: Option<String>,
    /// The client's side.
    pub client: Side,
    /// The server's side.
    pub server: Side,
}

impl Conflict {
    /// Which side the merge rule alone (last writer wins) picks.
    pub fn stamp_winner_is_client(&self) -> bool {
        self.client.stamp > self.server.stamp
    }
}

/// What a custom handler decides.
#[derive(Clone, Debug, PartialEq)]
pub enum Resolution {
    /// The server's side stays.
    KeepServer,
    /// The client's side wins.
    TakeClient,
    /// A new value for the field (field conflicts only; elsewhere treated as `TakeClient`).
    Merged(Value),
}

/// A custom conflict handler: sees both sides, decides.
pub type Handler = Arc<dyn Fn(&Conflict) -> Resolution + Send + Sync>;

/// How a collection's conflicts are resolved.
#[derive(Clone, Default)]
pub enum Policy {
    /// The higher stamp wins (the merge rule; no extra writes).
    #[default]
    LastWriterWins,
    /// The server's side stays, whatever the stamps.
    ServerWins,
    /// The client's write is forced; an update of a deleted object becomes an insert.
    ClientWins,
    /// A handler decides.
    Custom(Handler),
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::LastWriterWins => "LastWriterWins",
            Policy::ServerWins => "ServerWins",
            Policy::ClientWins => "ClientWins",
            Policy::Custom(_) => "Custom",
        })
    }
}

/// Policies: a default, per collection, and per conflict kind within a collection.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    default: Policy,
    collections: HashMap<String, (Policy, HashMap<ConflictKind, Policy>)>,
}

impl Policies {
    /// Every collection uses `policy` unless told otherwise.
    pub fn new(policy: Policy) -> Self {
        Policies {
            default: policy,
            collections: HashMap::new(),
        }
    }

    /// Sets a collection's policy.
    pub fn collection(mut self, collection: &str, policy: Policy) -> Self {
        self.collections
            .entry(collection.to_owned())
            .or_insert_with(|| (Policy::default(), HashMap::new()))
            .0 = policy;
        self
    }

    /// Overrides a collection's policy for one kind of conflict.
    pub fn kind(mut self, collection: &str, kind: ConflictKind, policy: Policy) -> Self {
        let entry = self
            .collections
            .entry(collection.to_owned())
            .or_insert_with(|| (self.default.clone(), HashMap::new()));
        entry.1.insert(kind, policy);
        self
    }

    /// The policy for a conflict.
    pub fn for_conflict(&self, c: &Conflict) -> &Policy {
        self.for_kind(&c.collection, c.kind)
    }

    /// The policy for one kind of conflict in a collection.
    pub fn for_kind(&self, collection: &str, kind: ConflictKind) -> &Policy {
        match self.collections.get(collection) {
            Some((p, kinds)) => kinds.get(&kind).unwrap_or(p),
            None => &self.default,
        }
    }

    /// Whether a client's update of a deleted object in this collection may bring it back
    /// (then the server keeps deleted objects' last fields to bring back whole).
    pub(crate) fn may_revive(&self, collection: &str) -> bool {
        matches!(
            self.for_kind(collection, ConflictKind::ClientUpdateServerDelete),
            Policy::ClientWins | Policy::Custom(_)
        )
    }
}

/// What the server did about a conflict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// The client's side (by stamp or by policy).
    Client,
    /// The server's side.
    Server,
    /// A merged value.
    Merged,
}

/// A conflict as the server records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConflictRecord {
    /// Its number in the server's conflict record.
    pub id: u64,
    /// The conflict.
    pub conflict: Conflict,
    /// The policy that resolved it (by name).
    pub policy: String,
    /// What won.
    pub decision: Decision,
}

fn side(stamp: Option<Stamp>, value: Option<Value>) -> Side {
    Side {
        replica: stamp.map(|s| s.replica),
        value,
        stamp,
        user: None,
    }
}

/// Conflicts between a client's write (`stamp`, from `client`) and the server's state of the
/// object before the write. Writes to different fields never conflict; neither does a
/// client with its own earlier writes.
pub fn detect(
    w: &Write,
    stamp: Stamp,
    client: ReplicaId,
    server: &ObjectState<String>,
) -> Vec<Conflict> {
    let conflict = |kind, field: Option<&str>, client_value, server_stamp, server_value| Conflict {
        kind,
        collection: w.collection.clone(),
        pk: w.pk.clone(),
        field: field.map(str::to_owned),
        client: side(Some(stamp), client_value),
        server: side(server_stamp, server_value),
    };
    let foreign = |s: Stamp| s.replica != client;
    let mut out = Vec::new();
    match &w.op {
        Op::Insert { .. } => {
            if let Some((s, true)) = server.exists {
                if foreign(s) && s != stamp {
                    out.push(conflict(
                        ConflictKind::ClientInsertServerInsert,
                        None,
                        Some(Value::Bool(true)),
                        Some(s),
                        Some(Value::Bool(true)),
                    ));
                }
            }
        }
        Op::Update { fields } => match server.exists {
            Some((d, false)) if foreign(d) => out.push(conflict(
                ConflictKind::ClientUpdateServerDelete,
                None,
                None,
                Some(d),
                None,
            )),
            _ => {
                for fw in fields {
                    if let Some((s, v)) = server.field(fw.field.clone()) {
                        if foreign(s) && Some(s) != fw.base && s != stamp {
                            out.push(conflict(
                                ConflictKind::ClientUpdateServerUpdate,
                                Some(&fw.field),
                                Some(fw.value.clone()),
                                Some(s),
                                Some(v.clone()),
                            ));
                        }
                    }
                }
            }
        },
        Op::Delete { base } => {
            if server.is_live() {
                let newer = server
                    .fields
                    .iter()
                    .filter(|(_, s, _)| foreign(*s) && Some(*s) > *base)
                    .map(|(_, s, _)| *s)
                    .max();
                if let Some(s) = newer {
                    out.push(conflict(
                        ConflictKind::ClientDeleteServerUpdate,
                        None,
                        Some(Value::Bool(false)),
                        Some(s),
                        Some(Value::Bool(true)),
                    ));
                }
            }
        }
    }
    out
}

/// Merges one write into a named object state, by stamp (as the store merges it), in time
/// linear in the object's fields and the write's.
pub(crate) fn apply_write(state: &mut ObjectState<String>, w: &Write, stamp: Stamp) {
    match &w.op {
        Op::Insert { fields } => {
            state.apply_exists(stamp, true);
            apply_fields(state, stamp, fields.iter().map(|(f, v)| (f, v)));
        }
        Op::Update { fields } => {
            apply_fields(state, stamp, fields.iter().map(|f| (&f.field, &f.value)));
        }
        Op::Delete { .. } => {
            state.apply_exists(stamp, false);
        }
    }
}

/// Merges field writes all stamped `stamp` by the merge rule, in one pass.
fn apply_fields<'a>(
    state: &mut ObjectState<String>,
    stamp: Stamp,
    fields: impl ExactSizeIterator<Item = (&'a String, &'a Value)>,
) {
    let writes = fields.map(|(f, v)| (f.clone(), stamp, v.clone())).collect();
    state.apply_fields(writes);
}

/// What the sync server supplies to plan an upload's conflicts.
pub(crate) trait PlanSource {
    /// The object's merged state before the upload.
    fn state(&mut self, collection: &str, pk: &Pk) -> Result<ObjectState<String>>;
    /// The user `replica` last authenticated as, if the server knows it.
    fn user(&mut self, replica: ReplicaId) -> Option<String>;
    /// The object's live fields before its last deletion, if the server kept them.
    fn grave(&mut self, collection: &str, pk: &Pk) -> Result<Option<Vec<(String, Value)>>>;
    /// Why `value` may not be written to the field (schema, size), if it may not.
    fn refuses(&self, collection: &str, pk: &Pk, field: &str, value: &Value) -> Option<String>;
}

/// A conflict, the policy that decided it (by name) and what it decided.
#[derive(Clone, Debug)]
pub(crate) struct Decided {
    pub conflict: Conflict,
    pub policy: String,
    pub decision: Decision,
}

/// An object (collection, primary key) and what it must read after an upload (`None`:
/// deleted), by raw field name.
pub(crate) type Target = (String, Pk, Option<BTreeMap<String, Value>>);

/// An object (collection, primary key) and fields of it, by raw field name.
pub(crate) type ObjectFields = (String, Pk, Vec<(String, Value)>);

/// What an upload's conflicts come to.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Every conflict, in the order the upload met it, decided.
    pub decided: Vec<Decided>,
    /// Objects decisions changed, with what each must read once the upload is applied
    /// (`None`: deleted), by raw field name (counter and text parts included).
    pub targets: Vec<Target>,
    /// Objects the upload leaves deleted that were live in it or before it, with their last
    /// live fields, in collections where a client's update may bring them back.
    pub graves: Vec<ObjectFields>,
}

/// One object as the upload's writes so far, and the decisions on them, leave it.
struct Track {
    state: ObjectState<String>,
    /// Field conflicts of the object's current incarnation not decided yet (indexes into
    /// `Planner::conflicts`): a later write of the same field joins its conflict.
    open: Vec<usize>,
    /// The highest stamp of a server change the client had not seen and that the decisions
    /// kept (the server's side or a merged value): deleting the object destroys it.
    unseen: Option<Stamp>,
    /// The live fields before the object's last deletion in this upload.
    last_live: Option<Vec<(String, Value)>>,
    /// A decision changed the object.
    decided: bool,
}

/// Decides an upload's conflicts write by write. Each write is checked against the object
/// as the upload's earlier writes *and the decisions on them* leave it, so a later write of
/// the same upload builds on what was decided: a later delete deletes what a decision
/// kept, a later update of a field in conflict joins that conflict (the client's side is the
/// field's last value in the upload; the policy decides once). Decisions never write into
/// an object that is not there: the plan ends with the state each object must have.
pub(crate) struct Planner<'p> {
    policies: &'p Policies,
    client: ReplicaId,
    user: String,
    tracks: HashMap<(String, Pk), Track>,
    /// Objects in the order the upload first wrote them.
    order: Vec<(String, Pk)>,
    /// Conflicts in the order met, with their policy and decision once decided.
    conflicts: Vec<(Conflict, Option<(String, Decision)>)>,
    users: HashMap<ReplicaId, Option<String>>,
}

fn live_fields(s: &ObjectState<String>) -> Vec<(String, Value)> {
    s.fields
        .iter()
        .map(|(f, _, v)| (f.clone(), v.clone()))
        .collect()
}

fn write_fields(w: &Write) -> Vec<(String, Value)> {
    match &w.op {
        Op::Insert { fields } => fields.clone(),
        Op::Update { fields } => fields
            .iter()
            .map(|f| (f.field.clone(), f.value.clone()))
            .collect(),
        Op::Delete { .. } => Vec::new(),
    }
}

/// A live object made at `stamp` with exactly these fields.
fn incarnation(stamp: Stamp, fields: BTreeMap<String, Value>) -> ObjectState<String> {
    ObjectState {
        exists: Some((stamp, true)),
        floor: stamp,
        fields: fields.into_iter().map(|(f, v)| (f, stamp, v)).collect(),
    }
}

/// Puts a decided value into a field, whatever the stamps there.
fn set_field(state: &mut ObjectState<String>, field: String, stamp: Stamp, value: Value) {
    match state.fields.binary_search_by(|(f, _, _)| f.cmp(&field)) {
        Ok(i) => state.fields[i] = (field, stamp, value),
        Err(i) => state.fields.insert(i, (field, stamp, value)),
    }
}

impl<'p> Planner<'p> {
    /// A planner for one upload of `client`, signed in as `user`.
    pub(crate) fn new(policies: &'p Policies, client: ReplicaId, user: &str) -> Self {
        Planner {
            policies,
            client,
            user: user.to_owned(),
            tracks: HashMap::new(),
            order: Vec::new(),
            conflicts: Vec::new(),
            users: HashMap::new(),
        }
    }

    /// Takes the upload's next write (stamped `stamp`).
    pub(crate) fn write(
        &mut self,
        src: &mut impl PlanSource,
        w: &Write,
        stamp: Stamp,
    ) -> Result<()> {
        let key = (w.collection.clone(), w.pk.clone());
        let mut t = match self.tracks.remove(&key) {
            Some(t) => t,
            None => {
                self.order.push(key.clone());
                Track {
                    state: src.state(&w.collection, &w.pk)?,
                    open: Vec::new(),
                    unseen: None,
                    last_live: None,
                    decided: false,
                }
            }
        };
        let r = self.step(src, &mut t, w, stamp);
        self.tracks.insert(key, t);
        r
    }

    fn step(
        &mut self,
        src: &mut impl PlanSource,
        t: &mut Track,
        w: &Write,
        stamp: Stamp,
    ) -> Result<()> {
        if !matches!(w.op, Op::Update { .. }) {
            // An insert or a delete ends the incarnation its field conflicts were about.
            self.close(src, t);
        }
        let mut found = detect(w, stamp, self.client, &t.state);
        match &w.op {
            Op::Update { fields } => {
                for fw in fields {
                    if let Some(i) = self.open_on(t, &fw.field) {
                        let c = &mut self.conflicts[i].0;
                        c.client.value = Some(fw.value.clone());
                        c.client.stamp = Some(stamp);
                    }
                }
                found.retain(|c| {
                    c.field
                        .as_ref()
                        .is_none_or(|f| self.open_on(t, f).is_none())
                });
            }
            Op::Delete { .. } => {
                // The base stamp cannot tell a server change the client never saw once the
                // client's own later writes raised it; the upload's field conflicts can.
                let seen = found
                    .iter()
                    .any(|c| c.kind == ConflictKind::ClientDeleteServerUpdate);
                if let (false, true, Some(unseen)) = (seen, t.state.is_live(), t.unseen) {
                    found.push(Conflict {
                        kind: ConflictKind::ClientDeleteServerUpdate,
                        collection: w.collection.clone(),
                        pk: w.pk.clone(),
                        field: None,
                        client: side(Some(stamp), Some(Value::Bool(false))),
                        server: side(Some(unseen), Some(Value::Bool(true))),
                    });
                }
            }
            Op::Insert { .. } => t.unseen = None,
        }
        for c in &mut found {
            c.client.user = Some(self.user.clone());
            c.server.user = match c.server.replica {
                Some(r) => self.users.entry(r).or_insert_with(|| src.user(r)).clone(),
                None => None,
            };
        }
        // The object before the write, copied only when it may be needed: to restore the
        // server's side of an existence conflict, or to keep a deleted object's fields.
        let prior = found
            .iter()
            .any(|c| c.kind != ConflictKind::ClientUpdateServerUpdate)
            .then(|| t.state.clone());
        let deleting = matches!(w.op, Op::Delete { .. }) && t.state.is_live();
        let last_live =
            (deleting && self.policies.may_revive(&w.collection)).then(|| live_fields(&t.state));
        apply_write(&mut t.state, w, stamp);
        for c in found {
            match &prior {
                Some(prior) if c.kind != ConflictKind::ClientUpdateServerUpdate => {
                    let decided = self.decide_existence(src, t, &c, prior, w, stamp)?;
                    self.conflicts.push((c, Some(decided)));
                }
                _ => {
                    t.open.push(self.conflicts.len());
                    self.conflicts.push((c, None));
                }
            }
        }
        if !t.state.is_live() {
            t.unseen = None;
            if last_live.is_some() {
                t.last_live = last_live;
            }
        }
        Ok(())
    }

    fn open_on(&self, t: &Track, field: &str) -> Option<usize> {
        t.open
            .iter()
            .copied()
            .find(|&i| self.conflicts[i].0.field.as_deref() == Some(field))
    }

    /// The policy's decision (`by_stamp`: what the merge by stamp decided), with the
    /// policy's name and a merged value.
    fn choose(
        &self,
        src: &impl PlanSource,
        c: &Conflict,
        by_stamp: Decision,
    ) -> (String, Decision, Option<Value>) {
        let policy = self.policies.for_conflict(c);
        let name = format!("{policy:?}");
        match policy {
            Policy::LastWriterWins => (name, by_stamp, None),
            Policy::ServerWins => (name, Decision::Server, None),
            Policy::ClientWins => (name, Decision::Client, None),
            Policy::Custom(handler) => match (handler(c), &c.field) {
                (Resolution::KeepServer, _) => (name, Decision::Server, None),
                (Resolution::TakeClient, _) | (Resolution::Merged(_), None) => {
                    (name, Decision::Client, None)
                }
                (Resolution::Merged(v), Some(f)) => {
                    match src.refuses(&c.collection, &c.pk, f, &v) {
                        None => (name, Decision::Merged, Some(v)),
                        // A value the server cannot hold leaves the server's side in place.
                        Some(why) => (
                            format!("{name} (merged value refused: {why})"),
                            Decision::Server,
                            None,
                        ),
                    }
                }
            },
        }
    }

    /// Decides an insert/insert, update/delete or delete/update conflict on the spot:
    /// `prior` is the object before the write, `t` after the merge by stamp.
    fn decide_existence(
        &mut self,
        src: &mut impl PlanSource,
        t: &mut Track,
        c: &Conflict,
        prior: &ObjectState<String>,
        w: &Write,
        stamp: Stamp,
    ) -> Result<(String, Decision)> {
        let client_won = match c.kind {
            ConflictKind::ClientInsertServerInsert => t.state.exists == Some((stamp, true)),
            ConflictKind::ClientDeleteServerUpdate => !t.state.is_live(),
            // An update never brings a deleted object back by itself.
            _ => t.state.is_live(),
        };
        let by_stamp = if client_won {
            Decision::Client
        } else {
            Decision::Server
        };
        let (policy, decision, _) = self.choose(src, c, by_stamp);
        let lww = matches!(self.policies.for_conflict(c), Policy::LastWriterWins);
        let client = decision == Decision::Client;
        // A forced client insert is the whole object, even where the merge kept newer
        // server fields beside the client's insert.
        let exact = (c.kind == ConflictKind::ClientInsertServerInsert && client && !lww)
            .then(|| incarnation(stamp, write_fields(w).into_iter().collect()));
        if let Some(want) = exact {
            if live_fields(&want) != live_fields(&t.state) || !t.state.is_live() {
                t.state = want;
                t.decided = true;
            }
            return Ok((policy, decision));
        }
        if decision == by_stamp {
            // The merge already did it.
            return Ok((policy, decision));
        }
        match (c.kind, client) {
            (ConflictKind::ClientInsertServerInsert, true) => {
                t.state = incarnation(stamp, write_fields(w).into_iter().collect());
            }
            // The object comes back with every field it had before its deletion (what the
            // client holds), then the fields the client wrote since, with the client's values.
            (ConflictKind::ClientUpdateServerDelete, true) => {
                let mut fields: BTreeMap<String, Value> = match t.last_live.clone() {
                    Some(f) => f.into_iter().collect(),
                    None => src
                        .grave(&c.collection, &c.pk)?
                        .unwrap_or_default()
                        .into_iter()
                        .collect(),
                };
                fields.extend(live_fields(&t.state));
                fields.extend(write_fields(w));
                t.state = incarnation(stamp, fields);
            }
            (ConflictKind::ClientDeleteServerUpdate, true) => {
                t.state.exists = Some((stamp, false));
            }
            // The server's side: the object as it was before the write.
            _ => t.state = prior.clone(),
        }
        t.decided = true;
        Ok((policy, decision))
    }

    /// Decides the object's open field conflicts and puts each decided value in its field.
    fn close(&mut self, src: &impl PlanSource, t: &mut Track) {
        for i in std::mem::take(&mut t.open) {
            let c = &self.conflicts[i].0;
            let Some(field) = c.field.clone() else {
                continue;
            };
            let client_won = t.state.field(field.clone()).is_some_and(|(s, v)| {
                Some(s) == c.client.stamp && Some(v) == c.client.value.as_ref()
            });
            let by_stamp = if client_won {
                Decision::Client
            } else {
                Decision::Server
            };
            let (policy, decision, merged) = self.choose(src, c, by_stamp);
            let (stamp, value) = match decision {
                Decision::Client => (c.client.stamp, c.client.value.clone()),
                Decision::Server => (c.server.stamp, c.server.value.clone()),
                // A merged value holds the server's change: it counts as the server's side.
                Decision::Merged => (c.server.stamp, merged),
            };
            if decision != Decision::Client {
                t.unseen = t.unseen.max(c.server.stamp);
            }
            if let (Some(stamp), Some(value)) = (stamp, value) {
                if decision != by_stamp || decision == Decision::Merged {
                    set_field(&mut t.state, field, stamp, value);
                    t.decided = true;
                }
            }
            self.conflicts[i].1 = Some((policy, decision));
        }
    }

    /// Decides what is still open and returns the plan.
    pub(crate) fn finish(mut self, src: &impl PlanSource) -> Plan {
        let mut plan = Plan::default();
        for key in std::mem::take(&mut self.order) {
            let Some(mut t) = self.tracks.remove(&key) else {
                continue;
            };
            self.close(src, &mut t);
            let (collection, pk) = key;
            let live = t.state.is_live();
            if let (false, Some(fields)) = (live, t.last_live) {
                if self.policies.may_revive(&collection) {
                    plan.graves.push((collection.clone(), pk.clone(), fields));
                }
            }
            if t.decided {
                let target = live.then(|| live_fields(&t.state).into_iter().collect());
                plan.targets.push((collection, pk, target));
            }
        }
        plan.decided = self
            .conflicts
            .into_iter()
            .filter_map(|(conflict, d)| {
                d.map(|(policy, decision)| Decided {
                    conflict,
                    policy,
                    decision,
                })
            })
            .collect();
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::FieldWrite;

    fn st(t: u64, r: u64) -> Stamp {
        Stamp {
            time: t,
            replica: ReplicaId(r),
        }
    }

    fn server_obj() -> ObjectState<String> {
        let mut o = ObjectState::default();
        o.apply_exists(st(1, 9), true);
        o.apply_field("a".to_owned(), st(1, 9), Value::Int(1));
        o.apply_field("b".to_owned(), st(5, 9), Value::Int(2));
        o
    }

    fn update(field: &str, base: Option<Stamp>) -> Write {
        Write {
            collection: "C".into(),
            pk: Pk::Int(1),
            op: Op::Update {
                fields: vec![FieldWrite {
                    field: field.into(),
                    value: Value::Int(7),
                    base,
                }],
            },
        }
    }

    #[test]
    fn different_fields_never_conflict() {
        // The client saw a@1 and b@1... but only wrote a: b's server change is no conflict.
        let c = detect(
            &update("a", Some(st(1, 9))),
            st(6, 1),
            ReplicaId(1),
            &server_obj(),
        );
        assert!(c.is_empty(), "{c:?}");
    }

    #[test]
    fn same_field_changed_since_base_conflicts() {
        let c = detect(
            &update("b", Some(st(1, 9))),
            st(6, 1),
            ReplicaId(1),
            &server_obj(),
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].kind, ConflictKind::ClientUpdateServerUpdate);
        assert_eq!(c[0].server.value, Some(Value::Int(2)));
        assert!(c[0].stamp_winner_is_client());
    }

    #[test]
    fn update_of_deleted_and_delete_of_updated() {
        let mut deleted = server_obj();
        deleted.apply_exists(st(7, 9), false);
        let c = detect(
            &update("a", Some(st(1, 9))),
            st(6, 1),
            ReplicaId(1),
            &deleted,
        );
        assert_eq!(c[0].kind, ConflictKind::ClientUpdateServerDelete);

        let del = Write {
            collection: "C".into(),
            pk: Pk::Int(1),
            op: Op::Delete {
                base: Some(st(1, 9)),
            },
        };
        let c = detect(&del, st(6, 1), ReplicaId(1), &server_obj());
        assert_eq!(c[0].kind, ConflictKind::ClientDeleteServerUpdate);
        let c = detect(
            &Write {
                op: Op::Delete {
                    base: Some(st(5, 9)),
                },
                ..del
            },
            st(6, 1),
            ReplicaId(1),
            &server_obj(),
        );
        assert!(c.is_empty(), "the client had seen the update");
    }

    #[test]
    fn a_large_write_merges_as_its_fields_one_at_a_time() {
        let mut base = server_obj();
        for i in 0..30 {
            base.apply_field(format!("f{i:02}"), st(3 + i % 5, 9), Value::Int(i as i64));
        }
        let fields: Vec<(String, Value)> = (0..40)
            .rev()
            .map(|i| (format!("f{:02}", i * 7 % 45), Value::Int(100 + i)))
            .chain([("f00".to_owned(), Value::Int(-1))])
            .collect();
        for (insert, stamp) in [(false, st(5, 1)), (true, st(4, 1)), (true, st(6, 1))] {
            let op = match insert {
                true => Op::Insert {
                    fields: fields.clone(),
                },
                false => Op::Update {
                    fields: fields
                        .iter()
                        .map(|(f, v)| FieldWrite {
                            field: f.clone(),
                            value: v.clone(),
                            base: None,
                        })
                        .collect(),
                },
            };
            let w = Write {
                collection: "C".into(),
                pk: Pk::Int(1),
                op,
            };
            let mut one_by_one = base.clone();
            if insert {
                one_by_one.apply_exists(stamp, true);
            }
            for (f, v) in &fields {
                one_by_one.apply_field(f.clone(), stamp, v.clone());
            }
            let mut merged = base.clone();
            apply_write(&mut merged, &w, stamp);
            assert_eq!(merged, one_by_one, "{stamp:?}");
        }
    }

    /// The server's side of what a planner is shown, in memory.
    #[derive(Default)]
    struct Source {
        objects: HashMap<Pk, ObjectState<String>>,
    }

    impl PlanSource for Source {
        fn state(&mut self, _: &str, pk: &Pk) -> Result<ObjectState<String>> {
            Ok(self.objects.get(pk).cloned().unwrap_or_default())
        }
        fn user(&mut self, _: ReplicaId) -> Option<String> {
            None
        }
        fn grave(&mut self, _: &str, _: &Pk) -> Result<Option<Vec<(String, Value)>>> {
            Ok(None)
        }
        fn refuses(&self, _: &str, _: &Pk, _: &str, v: &Value) -> Option<String> {
            (*v == Value::Null).then(|| "null".to_owned())
        }
    }

    fn merging(c: &Conflict) -> Resolution {
        match (&c.server.value, &c.client.value) {
            (Some(Value::Int(a)), Some(Value::Int(b))) => Resolution::Merged(Value::Int(a + b)),
            _ => Resolution::Merged(Value::Null),
        }
    }

    fn plan(policy: Policy, writes: &[(Write, Stamp)]) -> Plan {
        let policies = Policies::new(policy);
        let mut src = Source::default();
        src.objects.insert(Pk::Int(1), server_obj());
        let mut planner = Planner::new(&policies, ReplicaId(1), "u");
        for (w, stamp) in writes {
            planner.write(&mut src, w, *stamp).unwrap();
        }
        planner.finish(&src)
    }

    #[test]
    fn later_writes_of_a_field_in_conflict_join_it() {
        let second = Write {
            op: Op::Update {
                fields: vec![FieldWrite {
                    field: "b".into(),
                    value: Value::Int(10),
                    base: Some(st(6, 1)),
                }],
            },
            ..update("b", None)
        };
        let writes = [(update("b", Some(st(1, 9))), st(6, 1)), (second, st(7, 1))];
        let p = plan(Policy::Custom(Arc::new(merging)), &writes);
        assert_eq!(p.decided.len(), 1, "{:?}", p.decided);
        let d = &p.decided[0];
        assert_eq!(d.decision, Decision::Merged);
        assert_eq!(d.conflict.client.value, Some(Value::Int(10)));
        assert_eq!(d.conflict.client.stamp, Some(st(7, 1)));
        let target = p.targets[0].2.as_ref().expect("live");
        assert_eq!(
            target.get("b"),
            Some(&Value::Int(12)),
            "server 2 + client 10"
        );
        assert_eq!(target.get("a"), Some(&Value::Int(1)));
    }

    #[test]
    fn a_merged_value_the_server_cannot_hold_leaves_the_servers_side() {
        let mut w = update("b", Some(st(1, 9)));
        if let Op::Update { fields } = &mut w.op {
            fields[0].value = Value::from("text");
        }
        let p = plan(Policy::Custom(Arc::new(merging)), &[(w, st(6, 1))]);
        assert_eq!(p.decided[0].decision, Decision::Server);
        assert!(p.decided[0].policy.contains("refused"), "{:?}", p.decided);
        let target = p.targets[0].2.as_ref().expect("live");
        assert_eq!(target.get("b"), Some(&Value::Int(2)));
    }

    #[test]
    fn a_decision_is_never_written_into_an_object_the_upload_then_deletes() {
        let del = Write {
            collection: "C".into(),
            pk: Pk::Int(1),
            op: Op::Delete {
                base: Some(st(6, 1)),
            },
        };
        for policy in [
            Policy::LastWriterWins,
            Policy::ServerWins,
            Policy::ClientWins,
            Policy::Custom(Arc::new(merging)),
        ] {
            let writes = [
                (update("b", Some(st(1, 9))), st(6, 1)),
                (del.clone(), st(7, 1)),
            ];
            let p = plan(policy.clone(), &writes);
            // The server's side (or a merge of it) is a change the client never saw: its
            // delete conflicts with it.
            let kinds: Vec<_> = p.decided.iter().map(|d| d.conflict.kind).collect();
            let keeps_server = !matches!(policy, Policy::LastWriterWins | Policy::ClientWins);
            assert_eq!(
                kinds.len(),
                1 + usize::from(keeps_server),
                "{policy:?} {kinds:?}"
            );
            for (_, _, target) in &p.targets {
                if let Some(fields) = target {
                    assert!(keeps_server, "{policy:?}");
                    assert!(fields.contains_key("b"));
                }
            }
        }
    }
}
