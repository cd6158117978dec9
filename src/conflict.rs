//! Conflicts: detection from the base stamps uploaded writes carry, and resolution policies.
//!
//! Pure logic. The server detects conflicts against its state before an upload is merged,
//! merges the upload by stamp (which is `LastWriterWins`), and then expresses any other
//! policy's decision as new ordinary field writes stamped after the client's, so clients
//! converge with the one merge rule they know.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::{ReplicaId, Stamp};
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
        match self.collections.get(&c.collection) {
            Some((p, kinds)) => kinds.get(&c.kind).unwrap_or(p),
            None => &self.default,
        }
    }
}

/// What the server did about a conflict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
}
