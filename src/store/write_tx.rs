//! `WriteTx`: a transaction's writes, kept as pending objects until commit.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use redb::{ReadableDatabase, ReadableTable};
use serde::Serialize;

use crate::clock::Stamp;
use crate::crdt;
use crate::error::{Error, NameKind, Result};
use crate::merge::ObjectState;
use crate::row;
use crate::serde_object::to_fields;
use crate::value::{validate_name, Pk, Value};
use crate::wal;

use super::commit::WriterGuard;
use super::format::{decode_state, internal, object_key, OBJECTS};
use super::locks::lock;
use super::names::{NameView, NewNames};
use super::{Committed, Durability, Object, Store};

impl Store {
    /// Starts a write transaction. Only one runs at a time; others wait.
    pub fn begin(&self) -> Result<WriteTx<'_>> {
        self.check_poisoned()?;
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let guard = lock(&self.writer);
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.snapshots.writer_locked();
        Ok(WriteTx {
            store: self,
            writer: WriterGuard { guard, store: self },
            txn: None,
            pending: BTreeMap::new(),
            objects: None,
            new_names: NewNames::default(),
            durability: self.options.durability,
            raw_used: false,
            collection_checked: None,
            history: None,
            aux: Vec::new(),
        })
    }

    /// Runs `f` in a write transaction and commits it if `f` returns `Ok`.
    pub fn write<R>(
        &self,
        f: impl FnOnce(&mut WriteTx<'_>) -> Result<R>,
    ) -> Result<(R, Committed)> {
        let mut tx = self.begin()?;
        let r = f(&mut tx)?;
        let c = tx.commit()?;
        Ok((r, c))
    }
}

/// Fields as the application passes them, names checked.
pub(super) fn user_fields<K: Into<String>, V: Into<Value>>(
    fields: impl IntoIterator<Item = (K, V)>,
) -> Result<Vec<(String, Value)>> {
    let fields: Vec<(String, Value)> = fields
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    user_names(&fields)?;
    Ok(fields)
}

/// Application code names its own fields; `__` names belong to the engine.
pub(super) fn user_names(fields: &[(String, Value)]) -> Result<()> {
    fields
        .iter()
        .try_for_each(|(name, _)| validate_name(NameKind::Field, name))
}

/// The net effect of a transaction's calls on one object so far.
#[derive(Debug)]
pub(super) enum NetOp {
    Insert(BTreeMap<String, Value>),
    Update(BTreeMap<String, Value>),
    Delete,
}

/// An object's row as a transaction read it. Decoded only where a path needs the whole
/// state: a local update of a live object patches the bytes instead (`row::Parsed`).
#[derive(Debug)]
pub(super) struct Before {
    pub(super) row: Vec<u8>,
    pub(super) state: std::cell::OnceCell<ObjectState<u32>>,
}

impl Before {
    pub(super) fn new(row: Vec<u8>) -> Before {
        Before {
            row,
            state: std::cell::OnceCell::new(),
        }
    }

    pub(super) fn state(&self) -> Result<&ObjectState<u32>> {
        if let Some(s) = self.state.get() {
            return Ok(s);
        }
        let s = decode_state(&self.row)?;
        Ok(self.state.get_or_init(|| s))
    }

    pub(super) fn into_state(self) -> Result<ObjectState<u32>> {
        match self.state.into_inner() {
            Some(s) => Ok(s),
            None => decode_state(&self.row),
        }
    }

    pub(super) fn is_live(&self) -> Result<bool> {
        match self.state.get() {
            Some(s) => Ok(s.is_live()),
            None => row::is_live(&self.row),
        }
    }
}

/// Fields (by name id) and their values, all written at one stamp: a write-ahead patch.
pub(super) type StampedFields = (Stamp, Vec<(u32, Value)>);

/// A pending object's remote writes, taken out as `(field, stamp, value)`, by field.
pub(super) fn take_remote(remote: &mut BTreeMap<u32, (Stamp, Value)>) -> Vec<(u32, Stamp, Value)> {
    std::mem::take(remote)
        .into_iter()
        .map(|(f, (s, v))| (f, s, v))
        .collect()
}

impl Pending {
    /// The state after what was merged so far (taken out of `after`, or copied from the
    /// row as read), to merge more into.
    pub(super) fn take_state(&mut self) -> Result<ObjectState<u32>> {
        Ok(match (self.after.take(), &self.before) {
            (Some(after), _) => after,
            (None, Some(before)) => before.state()?.clone(),
            (None, None) => ObjectState::default(),
        })
    }

    /// Moves the unapplied remote writes into `after`, for paths that need the whole state.
    pub(super) fn settle(&mut self) -> Result<()> {
        if self.remote.is_empty() {
            return Ok(());
        }
        let mut state = self.take_state()?;
        state.apply_fields(take_remote(&mut self.remote));
        self.after = Some(state);
        Ok(())
    }
}

#[derive(Debug)]
pub(super) struct Pending {
    pub(super) coll: u32,
    pub(super) pk: Pk,
    pub(super) before: Option<Before>,
    /// Local calls in this transaction, applied at commit with its stamp.
    pub(super) op: Option<NetOp>,
    /// The state after merging remote writes in this transaction (local calls apply on top).
    pub(super) after: Option<ObjectState<u32>>,
    /// Remote field writes that won against a live row, not yet applied: field → `(stamp,
    /// value)`. Kept apart so commit can patch the row's bytes; only while `op` and `after`
    /// are `None` ([`Pending::settle`] folds them in).
    pub(super) remote: BTreeMap<u32, (Stamp, Value)>,
    /// Remove the row instead of writing it (the object left this client's view).
    pub(super) purge: bool,
}

/// A write transaction. Calls that fail leave the transaction as it was; nothing reaches the
/// store until [`WriteTx::commit`]; dropping it rolls back.
pub struct WriteTx<'s> {
    pub(super) store: &'s Store,
    pub(super) writer: WriterGuard<'s>,
    /// Begun by [`WriteTx::raw`], or at commit (which may join an open batch's instead).
    /// Whatever writes through it outside `prepare` must set `raw_used`: the write-ahead
    /// record holds only what `prepare` writes, so such a commit must be a durable redb one.
    pub(super) txn: Option<redb::WriteTransaction>,
    pub(super) pending: BTreeMap<Vec<u8>, Pending>,
    /// The `objects` table as of the transaction's start, for reads.
    pub(super) objects: Option<redb::ReadOnlyTable<&'static [u8], &'static [u8]>>,
    pub(super) new_names: NewNames,
    pub(super) durability: Durability,
    /// Another module wrote its own tables through [`WriteTx::raw`]; commit even if no
    /// object changed.
    pub(super) raw_used: bool,
    /// The last collection name checked (`intern`): one per write would be the check again.
    pub(super) collection_checked: Option<u32>,
    /// Set when the commit is a step of a sync server's history, numbered from it (see
    /// [`WriteTx::record_in_history`]).
    pub(super) history: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    /// Rows of other modules' tables, put at commit and recorded with the rest.
    pub(super) aux: Vec<wal::Aux>,
}

impl std::fmt::Debug for WriteTx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTx")
            .field("objects", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<'s> WriteTx<'s> {
    /// Puts a row into a table another module keeps in this database, at commit. Unlike
    /// [`WriteTx::raw`], the row goes into the write-ahead record, so the commit can be a
    /// record (an append and a sync) rather than a durable redb commit.
    pub(crate) fn put_aux(&mut self, row: wal::Aux) {
        self.aux.push(row);
    }

    /// The underlying redb transaction, for tables other modules keep in this database.
    pub(crate) fn raw(&mut self) -> Result<&redb::WriteTransaction> {
        self.raw_used = true;
        if self.txn.is_none() {
            // A transaction of its own: the batch's members must not depend on whether this
            // one commits. Objects read from the batch are in `pending`; later reads see it
            // committed.
            let r = self.store.close_batch();
            self.store.finish(r)?;
            self.objects = None;
            self.txn = Some(self.store.db()?.begin_write()?);
        }
        match &self.txn {
            Some(txn) => Ok(txn),
            None => Err(internal("no write transaction")),
        }
    }

    /// The transaction [`WriteTx::raw`] began.
    pub(super) fn txn_ref(&self) -> Result<&redb::WriteTransaction> {
        self.txn
            .as_ref()
            .ok_or_else(|| internal("no write transaction"))
    }

    /// Chooses this commit's durability.
    pub fn set_durability(&mut self, d: Durability) {
        self.durability = d;
    }

    /// Loads the object into `pending` (once), with any remote writes merged into `after`,
    /// and returns its key.
    pub(super) fn load(&mut self, coll: &str, pk: &Pk) -> Result<Vec<u8>> {
        let key = self.load_unsettled(coll, pk)?;
        if let Some(p) = self.pending.get_mut(&key) {
            p.settle()?;
        }
        Ok(key)
    }

    /// [`WriteTx::load`] leaving remote writes in `Pending::remote`.
    pub(super) fn load_unsettled(&mut self, coll: &str, pk: &Pk) -> Result<Vec<u8>> {
        pk.validate()?;
        let cid = self.intern(NameKind::Collection, coll)?;
        let key = object_key(cid, pk);
        if !self.pending.contains_key(&key) {
            // Reads go through a read-only table opened once per transaction: opening the
            // write table per object cost more than the lookup. It sees what `txn` sees:
            // objects are written only at commit, and no other commit runs meanwhile.
            let batch = lock(&self.store.batch);
            let in_batch = match &*batch {
                // The batch's members wrote into its transaction, not yet committed. (If a
                // member commits it meanwhile, `objects` was never opened: the next read
                // opens it and sees the batch committed.)
                Some(b) => Some(b.txn.with_dependent(|_, t| {
                    Ok::<_, Error>(
                        t.objects
                            .get(key.as_slice())?
                            .map(|r| Before::new(r.value().to_vec())),
                    )
                })?),
                None => None,
            };
            drop(batch);
            let before = match in_batch {
                Some(before) => before,
                None => {
                    if self.objects.is_none() {
                        self.objects = Some(self.store.db()?.begin_read()?.open_table(OBJECTS)?);
                    }
                    match &self.objects {
                        Some(table) => table
                            .get(key.as_slice())?
                            .map(|r| Before::new(r.value().to_vec())),
                        None => None,
                    }
                }
            };
            self.pending.insert(
                key.clone(),
                Pending {
                    coll: cid,
                    pk: pk.clone(),
                    before,
                    op: None,
                    after: None,
                    remote: BTreeMap::new(),
                    purge: false,
                },
            );
        }
        Ok(key)
    }

    /// Whether the object is live as this transaction sees it (without building it).
    pub(super) fn live(&self, key: &[u8]) -> Result<bool> {
        let Some(p) = self.pending.get(key) else {
            return Ok(false);
        };
        match &p.op {
            Some(NetOp::Insert(_)) => Ok(true),
            Some(NetOp::Delete) => Ok(false),
            None | Some(NetOp::Update(_)) => match (&p.after, &p.before) {
                (Some(after), _) => Ok(after.is_live()),
                (None, Some(before)) => before.is_live(),
                (None, None) => Ok(false),
            },
        }
    }

    /// The object as this transaction sees it: `None` if it is not live.
    pub(super) fn view(&self, key: &[u8]) -> Result<Option<BTreeMap<String, Value>>> {
        let Some(p) = self.pending.get(key) else {
            return Ok(None);
        };
        let names = self.store.names();
        let view = NameView {
            base: &names,
            new: Some(&self.new_names),
        };
        let state = match (&p.after, &p.before) {
            (Some(after), _) => Some(after),
            (None, Some(before)) => Some(before.state()?),
            (None, None) => None,
        };
        let base = match state {
            Some(s) if s.is_live() => Some(view.live_fields(s)?),
            _ => None,
        };
        Ok(match &p.op {
            None => base,
            Some(NetOp::Insert(f)) => Some(f.clone()),
            Some(NetOp::Update(f)) => base.map(|mut b| {
                b.extend(f.iter().map(|(k, v)| (k.clone(), v.clone())));
                b
            }),
            Some(NetOp::Delete) => None,
        })
    }

    pub(super) fn check_fields(
        &mut self,
        coll: &str,
        pk: &Pk,
        fields: Vec<(String, Value)>,
    ) -> Result<BTreeMap<String, Value>> {
        let schema = self.store.schema_of(coll);
        let max = self.store.options.value_bytes_max;
        let mut out = BTreeMap::new();
        for (name, value) in fields {
            self.intern(NameKind::Field, &name)?;
            if value.size_bytes() > max {
                return Err(Error::ValueTooLarge {
                    collection: coll.to_owned(),
                    pk: pk.clone(),
                    field: name,
                    size: value.size_bytes(),
                    max,
                });
            }
            if let Some(s) = &schema {
                s.check_value(pk, &name, &value)?;
            }
            out.insert(name, value);
        }
        Ok(out)
    }

    pub(super) fn not_found(coll: &str, pk: &Pk) -> Error {
        Error::NotFound {
            collection: coll.to_owned(),
            pk: pk.clone(),
        }
    }

    /// Creates an object. Fails if it is live already.
    pub fn insert<K, V>(
        &mut self,
        collection: &str,
        pk: impl Into<Pk>,
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> Result<()>
    where
        K: Into<String>,
        V: Into<Value>,
    {
        let fields = user_fields(fields)?;
        self.insert_fields(collection, pk.into(), fields)
    }

    pub(super) fn insert_fields(
        &mut self,
        coll: &str,
        pk: Pk,
        fields: Vec<(String, Value)>,
    ) -> Result<()> {
        let mark = self.new_names.len();
        let r = self.insert_inner(coll, &pk, fields);
        self.rollback_on_err(r, mark)
    }

    pub(super) fn insert_inner(
        &mut self,
        coll: &str,
        pk: &Pk,
        fields: Vec<(String, Value)>,
    ) -> Result<()> {
        let key = self.load(coll, pk)?;
        if self.live(&key)? {
            return Err(Error::AlreadyExists {
                collection: coll.to_owned(),
                pk: pk.clone(),
            });
        }
        let fields = self.check_fields(coll, pk, fields)?;
        if let Some(s) = self.store.schema_of(coll) {
            s.check_complete(pk, |name| fields.get(name))?;
        }
        if let Some(p) = self.pending.get_mut(&key) {
            p.op = Some(NetOp::Insert(fields));
        }
        Ok(())
    }

    /// Sets fields of a live object. Fails if it is not live.
    pub fn update<K, V>(
        &mut self,
        collection: &str,
        pk: impl Into<Pk>,
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> Result<()>
    where
        K: Into<String>,
        V: Into<Value>,
    {
        let pk = pk.into();
        let fields = user_fields(fields)?;
        let mark = self.new_names.len();
        let r = self.update_inner(collection, &pk, fields);
        self.rollback_on_err(r, mark)
    }

    /// Adds `delta` to a counter field of a live object. Concurrent increments on other
    /// replicas add up; the field reads as the sum.
    pub fn increment(
        &mut self,
        collection: &str,
        pk: impl Into<Pk>,
        field: &str,
        delta: i64,
    ) -> Result<()> {
        let pk = pk.into();
        validate_name(NameKind::Field, field)?;
        let part = crdt::sub_field(crdt::Kind::Counter, field, self.store.replica);
        let mark = self.new_names.len();
        let r = (|| {
            let key = self.load(collection, &pk)?;
            let Some(current) = self.view(&key)? else {
                return Err(Self::not_found(collection, &pk));
            };
            let mine = match current.get(&part) {
                Some(Value::Int(n)) => *n,
                _ => 0,
            };
            let total = mine.checked_add(delta).ok_or_else(|| Error::Conversion {
                reason: format!("counter {collection}[{pk}].{field} would overflow"),
            })?;
            self.update_inner(collection, &pk, vec![(part.clone(), Value::Int(total))])
        })();
        self.rollback_on_err(r, mark)
    }

    /// Edits a text field of a live object: deletes `delete` characters at `pos` and
    /// inserts `insert` there. Concurrent edits from other replicas merge character by
    /// character; the field reads as the merged text.
    pub fn edit_text(
        &mut self,
        collection: &str,
        pk: impl Into<Pk>,
        field: &str,
        pos: usize,
        delete: usize,
        insert: &str,
    ) -> Result<()> {
        let pk = pk.into();
        validate_name(NameKind::Field, field)?;
        let part = crdt::sub_field(crdt::Kind::Text, field, self.store.replica);
        let mark = self.new_names.len();
        let r = (|| {
            let key = self.load(collection, &pk)?;
            let Some(current) = self.view(&key)? else {
                return Err(Self::not_found(collection, &pk));
            };
            let parts = current
                .iter()
                .filter_map(|(name, v)| match (crdt::parse_sub(name), v) {
                    (Some((crdt::Kind::Text, parent, _)), Value::Bytes(b)) if parent == field => {
                        Some(b.as_slice())
                    }
                    _ => None,
                });
            let mine = crdt::splice(parts, self.store.replica, pos, delete, insert)?;
            self.update_inner(collection, &pk, vec![(part.clone(), Value::Bytes(mine))])
        })();
        self.rollback_on_err(r, mark)
    }

    pub(super) fn update_inner(
        &mut self,
        coll: &str,
        pk: &Pk,
        fields: Vec<(String, Value)>,
    ) -> Result<()> {
        let key = self.load(coll, pk)?;
        if !self.live(&key)? {
            return Err(Self::not_found(coll, pk));
        }
        let fields = self.check_fields(coll, pk, fields)?;
        if fields.is_empty() {
            return Ok(());
        }
        if let Some(p) = self.pending.get_mut(&key) {
            match &mut p.op {
                Some(NetOp::Insert(f)) | Some(NetOp::Update(f)) => f.extend(fields),
                _ => p.op = Some(NetOp::Update(fields)),
            }
        }
        Ok(())
    }

    /// Sets one field of a live object.
    pub fn set(
        &mut self,
        collection: &str,
        pk: impl Into<Pk>,
        field: &str,
        value: impl Into<Value>,
    ) -> Result<()> {
        self.update(collection, pk, [(field, value.into())])
    }

    /// Deletes a live object. Fails if it is not live.
    pub fn delete(&mut self, collection: &str, pk: impl Into<Pk>) -> Result<()> {
        let pk = pk.into();
        let mark = self.new_names.len();
        let r = (|| {
            let key = self.load(collection, &pk)?;
            if !self.live(&key)? {
                return Err(Self::not_found(collection, &pk));
            }
            if let Some(p) = self.pending.get_mut(&key) {
                p.op = Some(NetOp::Delete);
            }
            Ok(())
        })();
        self.rollback_on_err(r, mark)
    }

    /// Writes a `#[derive(Serialize)]` value as an object: inserts it if it is not live,
    /// otherwise writes only the fields whose values differ from the stored ones. Returns
    /// the number of field writes this made.
    pub fn put<T: Serialize + ?Sized>(
        &mut self,
        collection: &str,
        pk: impl Into<Pk>,
        value: &T,
    ) -> Result<usize> {
        let pk = pk.into();
        let fields = to_fields(value)?;
        user_names(&fields)?;
        let mark = self.new_names.len();
        let key = match self.load(collection, &pk) {
            Ok(k) => k,
            Err(e) => return self.rollback_on_err(Err(e), mark),
        };
        match self.view(&key)? {
            None => {
                let n = fields.len();
                self.insert_fields(collection, pk, fields).map(|()| n)
            }
            Some(current) => {
                // Counters and texts change only through increment and edit_text.
                let merged: std::collections::HashSet<String> = current
                    .keys()
                    .filter_map(|k| crdt::parse_sub(k).map(|(_, parent, _)| parent.to_owned()))
                    .collect();
                let changed: Vec<_> = fields
                    .into_iter()
                    .filter(|(k, v)| !merged.contains(k) && current.get(k) != Some(v))
                    .collect();
                let n = changed.len();
                let r = self.update_inner(collection, &pk, changed).map(|()| n);
                self.rollback_on_err(r, mark)
            }
        }
    }

    /// Writes the object again exactly as this transaction sees it, stamped by this
    /// transaction: a live object is re-inserted (clearing every field written before),
    /// a missing or deleted one is deleted. Older writes to it lose to this on every
    /// replica: how the server reverts a write it refused.
    pub(crate) fn reassert(&mut self, collection: &str, pk: &Pk) -> Result<()> {
        let key = self.load(collection, pk)?;
        let current = self.view(&key)?;
        if let Some(p) = self.pending.get_mut(&key) {
            p.op = Some(match current {
                Some(fields) => NetOp::Insert(fields),
                None => NetOp::Delete,
            });
        }
        Ok(())
    }

    /// Reads an object as this transaction sees it (including its own writes).
    pub fn get(&mut self, collection: &str, pk: impl Into<Pk>) -> Result<Option<Object>> {
        let pk = pk.into();
        let mark = self.new_names.len();
        let key = match self.load(collection, &pk) {
            Ok(k) => k,
            Err(e) => return self.rollback_on_err(Err(e), mark),
        };
        match self.view(&key)? {
            Some(fields) => Ok(Some(Object {
                pk,
                fields: crdt::fold(fields)?,
            })),
            None => Ok(None),
        }
    }

    /// Names a failed call interned are forgotten, so the call leaves no trace.
    pub(super) fn rollback_on_err<T>(&mut self, r: Result<T>, mark: usize) -> Result<T> {
        if r.is_err() {
            self.new_names.truncate(mark);
            let names_len = self.store.names().by_id.len() + mark;
            self.pending.retain(|_, p| {
                p.op.is_some()
                    || p.after.is_some()
                    || !p.remote.is_empty()
                    || (p.coll as usize) < names_len
            });
        }
        r
    }
}
