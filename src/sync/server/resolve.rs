//! Conflict resolution on the server: the conflict planner reading the server's store,
//! the graveyard of deleted objects' last fields, and the conflict records kept.

use serde::{Deserialize, Serialize};

use super::state::{corrupt, internal, SyncServer};
use crate::clock::ReplicaId;
use std::sync::atomic::Ordering;

use crate::conflict::{
    Conflict, ConflictKind, ConflictRecord, Decision, Plan, PlanSource, Planner, Side,
};
use crate::error::Result;
use crate::log::{LogEntry, Op};
use crate::merge::ObjectState;
use crate::store::Store;
use crate::store::WriteTx;
use crate::sync::protocol::RefusedWrite;
use crate::value::Value;

impl SyncServer {
    /// Decides the conflicts of an upload's writes with the server's state (see
    /// [`Planner`]): the conflicts with their decisions, and the objects they change.
    pub(super) fn plan_conflicts(
        &self,
        client: ReplicaId,
        user: &str,
        entries: &[LogEntry],
    ) -> Result<Plan> {
        let mut planner = Planner::new(&self.config.conflicts, client, user);
        let mut src = StoreSource { server: self };
        for e in entries {
            for w in &e.writes {
                planner.write(&mut src, w, e.stamp)?;
            }
        }
        Ok(planner.finish(&src))
    }

    /// Numbers the upload's conflict records after the last one kept, and puts them in its
    /// write-ahead record.
    pub(super) fn put_conflicts(
        &self,
        tx: &mut WriteTx<'_>,
        records: &mut [ConflictRecord],
    ) -> Result<()> {
        let mut id = self.last_conflict.load(Ordering::SeqCst);
        for r in records {
            id += 1;
            r.id = id;
            let bytes = postcard::to_allocvec(&*r).map_err(|e| internal(e.to_string()))?;
            tx.put_sync_conflict(id, bytes);
        }
        Ok(())
    }
}

/// Reverts refused writes: the server writes the objects as they are, stamped after the
/// client's writes, so every replica drops the refused values.
pub(super) fn revert<'r>(
    tx: &mut WriteTx<'_>,
    refused: impl Iterator<Item = &'r RefusedWrite>,
) -> Result<()> {
    let mut reverted = std::collections::HashSet::new();
    for r in refused {
        if reverted.insert((r.collection.clone(), r.pk.clone())) {
            tx.reassert(&r.collection, &r.pk)?;
        }
    }
    Ok(())
}

/// The conflict record of a write refused for breaking the server's schema: the server's
/// state stands.
pub(super) fn errors_occurred(r: &RefusedWrite, client: ReplicaId, user: &str) -> ConflictRecord {
    ConflictRecord {
        id: 0,
        conflict: Conflict {
            kind: ConflictKind::ErrorsOccurred,
            collection: r.collection.clone(),
            pk: r.pk.clone(),
            client: Side {
                value: r.fields.first().map(|(_, v)| v.clone()),
                stamp: Some(r.stamp),
                replica: Some(client),
                user: Some(user.to_owned()),
            },
            server: Side {
                value: None,
                stamp: None,
                replica: None,
                user: None,
            },
            field: r.fields.first().map(|(f, _)| f.clone()),
        },
        policy: r.to_string(),
        decision: Decision::Server,
    }
}

/// Writes a plan's decisions as the server's own writes (stamped after the client's) and
/// keeps the graves it names; returns the records of the decided conflicts (not yet
/// numbered).
pub(super) fn apply_plan(tx: &mut WriteTx<'_>, plan: Plan) -> Result<Vec<ConflictRecord>> {
    let Plan {
        decided,
        targets,
        graves,
    } = plan;
    for (collection, pk, target) in targets {
        tx.force(&collection, &pk, target)?;
    }
    for (collection, pk, fields) in &graves {
        let (key, grave) = grave_row(collection, pk, fields)?;
        tx.put_sync_grave(key, grave);
    }
    Ok(decided
        .into_iter()
        .map(|d| ConflictRecord {
            id: 0,
            conflict: d.conflict,
            policy: d.policy,
            decision: d.decision,
        })
        .collect())
}

/// The conflict records kept in a server store (for the `conflicts` command).
pub fn conflicts_in(store: &Store, after: u64, limit: usize) -> Result<Vec<ConflictRecord>> {
    let rows = store.sync_conflicts(after, limit)?;
    rows.iter()
        .map(|r| postcard::from_bytes(r).map_err(|e| corrupt(format!("conflict: {e}"))))
        .collect()
}

/// A deleted object's last live fields, as the server keeps them.
#[derive(Debug, Serialize, Deserialize)]
struct Grave {
    collection: String,
    pk: crate::value::Pk,
    fields: Vec<(String, Value)>,
}

/// The graveyard's key for an object: a hash of its collection and primary key. Two objects
/// with the same hash share a row; the row names its object, so the other one finds none.
fn grave_key(collection: &str, pk: &crate::value::Pk) -> Result<u64> {
    let bytes = postcard::to_allocvec(&(collection, pk)).map_err(|e| internal(e.to_string()))?;
    let hash = blake3::hash(&bytes);
    let mut key = [0u8; 8];
    key.copy_from_slice(&hash.as_bytes()[..8]);
    Ok(u64::from_le_bytes(key))
}

/// The graveyard row of a deleted object: its key and the grave's bytes.
pub(super) fn grave_row(
    collection: &str,
    pk: &crate::value::Pk,
    fields: &[(String, Value)],
) -> Result<(u64, Vec<u8>)> {
    let grave = Grave {
        collection: collection.to_owned(),
        pk: pk.clone(),
        fields: fields.to_vec(),
    };
    let bytes = postcard::to_allocvec(&grave).map_err(|e| internal(e.to_string()))?;
    Ok((grave_key(collection, pk)?, bytes))
}

/// The server's store as the conflict planner reads it.
struct StoreSource<'a> {
    server: &'a SyncServer,
}

impl PlanSource for StoreSource<'_> {
    fn state(&mut self, collection: &str, pk: &crate::value::Pk) -> Result<ObjectState<String>> {
        self.server.store.object_state_named(collection, pk)
    }

    fn user(&mut self, replica: ReplicaId) -> Option<String> {
        let user = self.server.client_record(replica).ok().map(|r| r.user);
        user.filter(|u| !u.is_empty())
    }

    fn grave(
        &mut self,
        collection: &str,
        pk: &crate::value::Pk,
    ) -> Result<Option<Vec<(String, Value)>>> {
        let Some(row) = self.server.store.sync_grave(grave_key(collection, pk)?)? else {
            return Ok(None);
        };
        let grave: Grave =
            postcard::from_bytes(&row).map_err(|e| corrupt(format!("grave: {e}")))?;
        Ok((grave.collection == collection && grave.pk == *pk).then_some(grave.fields))
    }

    fn refuses(
        &self,
        collection: &str,
        pk: &crate::value::Pk,
        field: &str,
        value: &Value,
    ) -> Option<String> {
        let max = self.server.store.options().value_bytes_max;
        if value.size_bytes() > max {
            return Some(format!("{} bytes; the limit is {max}", value.size_bytes()));
        }
        let w = crate::log::Write {
            collection: collection.to_owned(),
            pk: pk.clone(),
            op: Op::Update {
                fields: vec![crate::log::FieldWrite {
                    field: field.to_owned(),
                    value: value.clone(),
                    base: None,
                }],
            },
        };
        self.server
            .store
            .check_write_schema(&w)
            .err()
            .map(|e| e.to_string())
    }
}
