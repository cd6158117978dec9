//! Permissions: a rules file of roles, in the JSON shape Atlas Device Sync rules use. A role
//! copied from the Atlas documentation loads as it is and means what it means there.
//!
//! ```json
//! {
//!   "rules": {
//!     "Item": [
//!       { "name": "owner-read-write",
//!         "apply_when": {},
//!         "document_filters": { "read": { "ownerId": "%%user.id" },
//!                               "write": { "ownerId": "%%user.id" } },
//!         "read": true, "write": true }
//!     ]
//!   },
//!   "defaultRoles": [
//!     { "name": "readAll", "apply_when": {},
//!       "document_filters": { "read": true, "write": false },
//!       "read": true, "write": false,
//!       "fields": { "salary": { "read": false } },
//!       "additional_fields": { "read": true } }
//!   ]
//! }
//! ```
//!
//! # The file
//!
//! - Top level: `rules` (collection name → ordered array of roles) and `defaultRoles` (the
//!   roles of every collection that has no entry in `rules`); both optional. A collection
//!   listed with an empty array has no roles: nobody may read or write it.
//! - A role has the keys of an Atlas role, with Atlas's defaults:
//!
//!   | key | value | default |
//!   | --- | --- | --- |
//!   | `name` | a string, unique in its array | required |
//!   | `apply_when` | an expression over the user | `{}` (always) |
//!   | `document_filters` | `{ "read": F, "write": F }`, each `true`, `false` or an expression | required (Device Sync needs both) |
//!   | `read` | `true` or `false` | `false` |
//!   | `write` | `true` or `false` | `false` |
//!   | `insert` | `true`, `false` or an expression over the new object | `true` |
//!   | `delete` | `true`, `false` or an expression over the object | `true` |
//!   | `search` | `true` or `false` (Atlas Search; fieldlog has none, so it changes nothing) | `true` |
//!   | `fields` | `{ "<field>": { "read": bool, "write": bool, "fields": {…} } }` | `{}` |
//!   | `additional_fields` | `{ "read": bool, "write": bool }`, for fields not in `fields` | `{}` |
//!   | `_id` | a string (the role's id in an Atlas export; ignored) | none |
//!
//!   In `fields` and `additional_fields`, `read` and `write` default to `false`. A field
//!   entry's own `fields` (permissions of an embedded document's fields) is checked like the
//!   outer one and grants nothing: fieldlog values hold no embedded documents, and Atlas
//!   applies a field's permissions to everything inside it. `fields` may not name `_id`
//!   (Atlas Device Sync refuses such a role too): the primary key is readable wherever the
//!   object is.
//! - Any other key, at any level, is an error, as is a duplicate key, a value of the wrong
//!   type or a file over [`RULES_LEN_MAX`] bytes. Errors name the collection, the role (by
//!   name, or by index when it has none) and the path of the key.
//!
//! # Expressions
//!
//! `apply_when`, the document filters and the `insert` / `delete` expressions are match
//! expressions, as in MongoDB:
//!
//! - `{}` matches everything; several keys in one object must all match.
//! - `{ "key": value }` is equality; `{ "key": { "$op": … } }` applies operators (several
//!   in one object must all hold): `$eq`, `$ne`, `$gt`, `$gte`, `$lt`, `$lte`, `$in`,
//!   `$nin` (arrays of values), `$exists` (a boolean), `$not` (an object of operators).
//! - `{ "$and": [..] }`, `{ "$or": [..] }`, `{ "$nor": [..] }` (non-empty arrays of
//!   expressions) and `{ "$not": { … } }` (an expression).
//! - In an expression over an object a key is a field name or `_id` (the primary key); in
//!   every kind a key may be `%%user.id` or `%%user.<key>`; `apply_when` may use only those.
//! - A value is `null`, a boolean, a number (integers become `Int`, other numbers
//!   `Float`), a string, or the string `"%%user.id"` / `"%%user.<key>"`. JSON has no bytes,
//!   so a bytes field (or a 12- or 16-byte `_id`) can only be tested with `$exists`.
//!
//! `%%user.id` is the user's id; `%%user.<key>` is `User::fields[<key>]`, the key taken
//! verbatim (`%%user.custom_data.isAdmin` reads the key `custom_data.isAdmin`). User values
//! are strings: compared with a value of another type they are read as that type first
//! (`"true"`/`"false"` for booleans; an `i64`, else an `f64`, for numbers), and a string
//! that does not read as that type does not compare. A user key the user does not have
//! compares with nothing (so `$eq` and `$in` are false, `$ne` and `$nin` true);
//! `$exists` tests whether the user has it.
//!
//! Document values compare as [`compare`](super::query::compare) says, the same rules as queries: a missing field
//! is `null`; ints and floats compare numerically; different types do not compare, so
//! every operator but `$ne`/`$nin` is false for them. `$exists` is true for a field present
//! in the object, even with a `null` value; `_id` always exists.
//!
//! # Evaluation
//!
//! The first role (in file order) whose `apply_when` matches the user applies; no role means
//! no access. With the role, on an object where the read filter gives `R` and the write
//! filter `W`, and where `perm(f)` is `fields[f]` if the role lists `f`, else
//! `additional_fields`:
//!
//! - a field `f` is writable when `W && (write || perm(f).write)`: document-level `write`
//!   covers every field, field-level permissions add to it;
//! - a field `f` is readable when `R && (read || perm(f).read)`, or when it is writable (a
//!   role may read what it may write, as in Atlas);
//! - the object is readable when the role grants reading some field there: `R` and
//!   (`read`, `additional_fields.read` or some `fields.*.read`), or `W` and (`write`,
//!   `additional_fields.write` or some `fields.*.write`). A client receives a readable
//!   object with its readable fields only (and its primary key).
//!
//! Writes (a role that may write no field at all may do none of them):
//!
//! - update: the write filter holds on the object before and after the change (so no one
//!   can move an object out of, or into, what they may write), and every field written is
//!   writable;
//! - insert: `insert` holds on the new object, the write filter holds on it, and every field
//!   of it is writable (Atlas checks write permission on all fields of a new document);
//! - delete: `delete` holds on the object, the write filter holds on it, and every field it
//!   has is writable.
//!
//! A refused write names the role and the check that refused it ([`Denial`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::expr::{Filter, Subject};
pub use super::load::load;
use super::load::role_location;
use crate::schema::Schema;
use crate::value::{Pk, Value};

/// Longest rules file [`load`] accepts, in bytes.
pub const RULES_LEN_MAX: usize = 1 << 20;

/// Deepest nesting of `$and`, `$or`, `$nor` and `$not` in one expression, and of embedded
/// `fields` in a role.
pub const FILTER_DEPTH_MAX: usize = 32;

/// Longest role name or `%%user.<key>` key, in bytes.
pub(super) const LABEL_LEN_MAX: usize = 256;

/// What [`load`] and [`Rules::check_schema`] refuse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RulesError {
    /// The file is larger than [`RULES_LEN_MAX`].
    #[error("rules file is {len} bytes; the limit is {max}")]
    TooLarge {
        /// The file's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The file is not JSON (or has a duplicate key, or a number out of range).
    #[error("rules file is not valid JSON: {message}")]
    Json {
        /// serde_json's description, with line and column.
        message: String,
    },
    /// The JSON is not a valid rules file.
    #[error("{location}: {}{message}", path_prefix(.path))]
    Invalid {
        /// Where: `role "name" in "Collection"`, `role #2 in "Collection"`, `default role
        /// "name"`, or `rules file`.
        location: String,
        /// The key's path inside that place, such as `document_filters.write.$and[1]`;
        /// empty for the place itself.
        path: String,
        /// What is wrong.
        message: String,
    },
}

fn path_prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

/// The user a request acts for, as the sync token names them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    /// The user id (`%%user.id`).
    pub id: String,
    /// Further fields (`%%user.<key>`), such as the token's extra claims.
    pub fields: BTreeMap<String, String>,
}

impl User {
    /// A user with an id and no other fields.
    pub fn new(id: impl Into<String>) -> Self {
        User {
            id: id.into(),
            fields: BTreeMap::new(),
        }
    }

    /// Adds a field.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.fields.insert(key.into(), value.into());
        self
    }
}

/// A validated rules file. Build one with [`load`] or [`Rules::allow_all`].
#[derive(Clone, Debug, PartialEq)]
pub struct Rules {
    pub(super) collections: BTreeMap<String, Vec<Role>>,
    pub(super) default_roles: Vec<Role>,
}

/// One role: who it applies to, which objects and fields it may see and change, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct Role {
    pub(super) name: String,
    pub(super) apply_when: Filter,
    pub(super) read_filter: Filter,
    pub(super) write_filter: Filter,
    pub(super) read: bool,
    pub(super) write: bool,
    pub(super) insert: Filter,
    pub(super) delete: Filter,
    pub(super) search: bool,
    pub(super) fields: BTreeMap<String, FieldPerms>,
    pub(super) additional_fields: FieldPerms,
}

/// A role's document-level permissions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoleFlags {
    /// May read every field of objects that match the read filter.
    pub read: bool,
    /// May write (and read) every field of objects that match the write filter.
    pub write: bool,
    /// `insert` is not `false`: inserts its expression allows may go ahead.
    pub insert: bool,
    /// `delete` is not `false`: deletes its expression allows may go ahead.
    pub delete: bool,
    /// `search` (Atlas Search), kept as the file gives it; it changes nothing here.
    pub search: bool,
}

/// A role's permissions on one field (`fields.<name>`) or on every field it does not list
/// (`additional_fields`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FieldPerms {
    /// May read the field of objects that match the read filter.
    pub read: bool,
    /// May write (and read) the field of objects that match the write filter.
    pub write: bool,
}

/// What a role lets a user do with one object, field by field: see the
/// [module documentation](self). Built by [`Role::access`] or [`Rules::access`].
#[derive(Clone, Copy, Debug)]
pub struct Access<'a> {
    role: &'a Role,
    read_filter: bool,
    write_filter: bool,
}

impl Access<'_> {
    /// The role that decides.
    pub fn role(&self) -> &Role {
        self.role
    }

    /// Whether the user may read the object (some field of it).
    pub fn can_read(&self) -> bool {
        (self.read_filter && self.role.reads_some())
            || (self.write_filter && self.role.writes_some())
    }

    /// Whether the user may read `field` of the object.
    pub fn can_read_field(&self, field: &str) -> bool {
        (self.read_filter && (self.role.read || self.role.perms(field).read))
            || self.can_write_field(field)
    }

    /// Whether the user may write `field` of the object.
    pub fn can_write_field(&self, field: &str) -> bool {
        self.write_filter && (self.role.write || self.role.perms(field).write)
    }
}

/// What was being attempted when a [`Denial`] happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// A change to an existing object.
    Update,
    /// A new object.
    Insert,
    /// Deleting an object.
    Delete,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Update => "update",
            Action::Insert => "insert",
            Action::Delete => "delete",
        })
    }
}

/// Which check refused a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenialKind {
    /// No role applies to the user in this collection.
    NoRole,
    /// The role may not do this at all: it may write no field, or its `insert` / `delete`
    /// is `false` or does not hold on the object.
    NotAllowed,
    /// The write filter does not hold on the object before the change.
    FilterBefore,
    /// The write filter does not hold on the object after the change.
    FilterAfter,
    /// A field written (or, for an insert or delete, a field of the object) is not
    /// writable in the role; [`Denial::field`] names it.
    FieldNotWritable,
}

/// Why a write was refused. `Display` gives the detail of the compensating write:
/// `denied by write filter in role "readOwnWriteOwn" (object after the update)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The role that refused it; `None` when no role applies.
    pub role: Option<String>,
    /// What was attempted.
    pub action: Action,
    /// Which check failed.
    pub kind: DenialKind,
    /// The field that is not writable, for [`DenialKind::FieldNotWritable`].
    pub field: Option<String>,
}

impl Denial {
    /// The reason as text (the same as `Display`).
    pub fn reason(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let role = self.role.as_deref().unwrap_or("");
        match self.kind {
            DenialKind::NoRole => write!(f, "{} denied: no role applies to the user", self.action),
            DenialKind::NotAllowed => write!(f, "{} not allowed by role {role:?}", self.action),
            DenialKind::FilterBefore => write!(
                f,
                "denied by write filter in role {role:?} (object before the {})",
                self.action
            ),
            DenialKind::FilterAfter => write!(
                f,
                "denied by write filter in role {role:?} (object after the {})",
                self.action
            ),
            DenialKind::FieldNotWritable => write!(
                f,
                "{} denied: field {:?} is not writable in role {role:?}",
                self.action,
                self.field.as_deref().unwrap_or("")
            ),
        }
    }
}

impl std::error::Error for Denial {}

impl Rules {
    /// Rules with one default role, `allowAll`, that may read, write, insert and delete
    /// everything.
    pub fn allow_all() -> Rules {
        Rules {
            collections: BTreeMap::new(),
            default_roles: vec![Role {
                name: "allowAll".into(),
                apply_when: Filter::Const(true),
                read_filter: Filter::Const(true),
                write_filter: Filter::Const(true),
                read: true,
                write: true,
                insert: Filter::Const(true),
                delete: Filter::Const(true),
                search: true,
                fields: BTreeMap::new(),
                additional_fields: FieldPerms::default(),
            }],
        }
    }

    /// Parses and validates a rules file; see the [module documentation](self).
    pub fn load(json: &str) -> Result<Rules, RulesError> {
        load(json)
    }

    /// The roles of `collection`: its own if the file lists it, else the default roles.
    pub fn roles(&self, collection: &str) -> &[Role] {
        self.collections
            .get(collection)
            .unwrap_or(&self.default_roles)
    }

    /// The collections the file lists under `rules`.
    pub fn collections(&self) -> impl Iterator<Item = &str> {
        self.collections.keys().map(String::as_str)
    }

    /// The role that applies to `user` in `collection`: the first whose `apply_when`
    /// matches. `None` means no access at all.
    pub fn role_for(&self, collection: &str, user: &User) -> Option<&Role> {
        self.roles(collection).iter().find(|r| r.applies_to(user))
    }

    /// What `user` may do with the object, field by field; `None` when no role applies.
    pub fn access<'a>(
        &'a self,
        collection: &str,
        user: &User,
        pk: &Pk,
        fields: &BTreeMap<String, Value>,
    ) -> Option<Access<'a>> {
        self.role_for(collection, user)
            .map(|r| r.access(user, pk, fields))
    }

    /// Whether `user` may read the object (some field of it).
    pub fn can_read(
        &self,
        collection: &str,
        user: &User,
        pk: &Pk,
        fields: &BTreeMap<String, Value>,
    ) -> bool {
        self.role_for(collection, user)
            .is_some_and(|r| r.can_read(user, pk, fields))
    }

    /// Whether `user` may change the object from `before` to `after` by writing the fields
    /// `written`.
    pub fn check_update(
        &self,
        collection: &str,
        user: &User,
        pk: &Pk,
        before: &BTreeMap<String, Value>,
        after: &BTreeMap<String, Value>,
        written: &[&str],
    ) -> Result<(), Denial> {
        self.role_or_denial(collection, user, Action::Update)?
            .can_write_update(user, pk, before, after, written)
    }

    /// Whether `user` may insert the object `after`, writing the fields `written` (the
    /// object's own fields are checked too).
    pub fn check_insert(
        &self,
        collection: &str,
        user: &User,
        pk: &Pk,
        after: &BTreeMap<String, Value>,
        written: &[&str],
    ) -> Result<(), Denial> {
        self.role_or_denial(collection, user, Action::Insert)?
            .can_insert(user, pk, after, written)
    }

    /// Whether `user` may delete the object.
    pub fn check_delete(
        &self,
        collection: &str,
        user: &User,
        pk: &Pk,
        before: &BTreeMap<String, Value>,
    ) -> Result<(), Denial> {
        self.role_or_denial(collection, user, Action::Delete)?
            .can_delete(user, pk, before)
    }

    fn role_or_denial(
        &self,
        collection: &str,
        user: &User,
        action: Action,
    ) -> Result<&Role, Denial> {
        self.role_for(collection, user).ok_or(Denial {
            role: None,
            action,
            kind: DenialKind::NoRole,
            field: None,
        })
    }

    /// Checks the roles that govern `schema.collection` against its schema: every field
    /// their document filters and `insert` / `delete` expressions use must be declared
    /// queryable (the server evaluates them over queryable fields only, like
    /// subscriptions).
    pub fn check_schema(&self, schema: &Schema) -> Result<(), RulesError> {
        let own = self.collections.contains_key(&schema.collection);
        for (i, role) in self.roles(&schema.collection).iter().enumerate() {
            let expressions = [
                ("document_filters.read", &role.read_filter),
                ("document_filters.write", &role.write_filter),
                ("insert", &role.insert),
                ("delete", &role.delete),
            ];
            for (path, filter) in expressions {
                let mut fields = BTreeSet::new();
                filter.fields(&mut fields);
                if let Some(field) = fields.iter().find(|f| !schema.is_queryable(f)) {
                    let collection = own.then_some(schema.collection.as_str());
                    return Err(RulesError::Invalid {
                        location: role_location(Some(&role.name), i, collection),
                        path: path.to_owned(),
                        message: format!(
                            "field `{field}` is not queryable in `{}`",
                            schema.collection
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

impl Role {
    /// The role's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The role's document-level permissions.
    pub fn flags(&self) -> RoleFlags {
        RoleFlags {
            read: self.read,
            write: self.write,
            insert: self.insert != Filter::Const(false),
            delete: self.delete != Filter::Const(false),
            search: self.search,
        }
    }

    /// The role's permissions on `field` (`fields.<field>`, else `additional_fields`).
    pub fn perms(&self, field: &str) -> FieldPerms {
        self.fields
            .get(field)
            .copied()
            .unwrap_or(self.additional_fields)
    }

    /// Whether the role lets anyone read `field` of some object: `read` or `write`, or
    /// the field's own permissions. A field this is false for is never readable.
    pub fn may_read_field(&self, field: &str) -> bool {
        let p = self.perms(field);
        self.read || self.write || p.read || p.write
    }

    /// Whether the role's `apply_when` matches `user`.
    pub fn applies_to(&self, user: &User) -> bool {
        self.apply_when.eval(&Subject { user, doc: None })
    }

    /// What the role lets `user` do with the object.
    pub fn access<'a>(
        &'a self,
        user: &User,
        pk: &Pk,
        fields: &BTreeMap<String, Value>,
    ) -> Access<'a> {
        let s = Subject {
            user,
            doc: Some((pk, fields)),
        };
        Access {
            role: self,
            read_filter: self.read_filter.eval(&s),
            write_filter: self.write_filter.eval(&s),
        }
    }

    /// Whether the role lets `user` read the object (some field of it).
    pub fn can_read(&self, user: &User, pk: &Pk, fields: &BTreeMap<String, Value>) -> bool {
        self.access(user, pk, fields).can_read()
    }

    /// Whether the role lets `user` change the object from `before` to `after` by writing
    /// the fields `written`: the write filter holds on both, and each field is writable.
    pub fn can_write_update(
        &self,
        user: &User,
        pk: &Pk,
        before: &BTreeMap<String, Value>,
        after: &BTreeMap<String, Value>,
        written: &[&str],
    ) -> Result<(), Denial> {
        let action = Action::Update;
        self.writes_anything(action)?;
        self.filter_holds(user, pk, before, action, DenialKind::FilterBefore)?;
        self.fields_writable(written.iter().copied(), action)?;
        self.filter_holds(user, pk, after, action, DenialKind::FilterAfter)
    }

    /// Whether the role lets `user` insert the object `after`, writing `written`: `insert`
    /// and the write filter hold on it, and each of its fields (and of `written`) is
    /// writable.
    pub fn can_insert(
        &self,
        user: &User,
        pk: &Pk,
        after: &BTreeMap<String, Value>,
        written: &[&str],
    ) -> Result<(), Denial> {
        let action = Action::Insert;
        self.writes_anything(action)?;
        self.expression_holds(&self.insert, user, pk, after, action)?;
        self.filter_holds(user, pk, after, action, DenialKind::FilterAfter)?;
        let fields: BTreeSet<&str> = after
            .keys()
            .map(String::as_str)
            .chain(written.iter().copied())
            .collect();
        self.fields_writable(fields.into_iter(), action)
    }

    /// Whether the role lets `user` delete the object: `delete` and the write filter hold
    /// on it as it was, and each of its fields is writable.
    pub fn can_delete(
        &self,
        user: &User,
        pk: &Pk,
        before: &BTreeMap<String, Value>,
    ) -> Result<(), Denial> {
        let action = Action::Delete;
        self.writes_anything(action)?;
        self.expression_holds(&self.delete, user, pk, before, action)?;
        self.filter_holds(user, pk, before, action, DenialKind::FilterBefore)?;
        self.fields_writable(before.keys().map(String::as_str), action)
    }

    /// The role grants reading some field somewhere.
    fn reads_some(&self) -> bool {
        self.read || self.additional_fields.read || self.fields.values().any(|p| p.read)
    }

    /// The role grants writing some field somewhere.
    fn writes_some(&self) -> bool {
        self.write || self.additional_fields.write || self.fields.values().any(|p| p.write)
    }

    fn denial(&self, action: Action, kind: DenialKind) -> Denial {
        Denial {
            role: Some(self.name.clone()),
            action,
            kind,
            field: None,
        }
    }

    fn writes_anything(&self, action: Action) -> Result<(), Denial> {
        if self.writes_some() {
            Ok(())
        } else {
            Err(self.denial(action, DenialKind::NotAllowed))
        }
    }

    fn expression_holds(
        &self,
        expression: &Filter,
        user: &User,
        pk: &Pk,
        fields: &BTreeMap<String, Value>,
        action: Action,
    ) -> Result<(), Denial> {
        let s = Subject {
            user,
            doc: Some((pk, fields)),
        };
        if expression.eval(&s) {
            Ok(())
        } else {
            Err(self.denial(action, DenialKind::NotAllowed))
        }
    }

    /// Each field is writable where the write filter holds (the caller checked it does).
    fn fields_writable<'f>(
        &self,
        mut fields: impl Iterator<Item = &'f str>,
        action: Action,
    ) -> Result<(), Denial> {
        match fields.find(|f| !(self.write || self.perms(f).write)) {
            None => Ok(()),
            Some(f) => Err(Denial {
                field: Some(f.to_owned()),
                ..self.denial(action, DenialKind::FieldNotWritable)
            }),
        }
    }

    fn filter_holds(
        &self,
        user: &User,
        pk: &Pk,
        fields: &BTreeMap<String, Value>,
        action: Action,
        kind: DenialKind,
    ) -> Result<(), Denial> {
        let s = Subject {
            user,
            doc: Some((pk, fields)),
        };
        if self.write_filter.eval(&s) {
            Ok(())
        } else {
            Err(self.denial(action, kind))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    fn role(filter: &str) -> Role {
        let json = format!(
            r#"{{"defaultRoles": [{{"name": "r", "document_filters": {{"read": {filter}, "write": false}}, "read": true}}]}}"#
        );
        let rules = load(&json).unwrap_or_else(|e| panic!("{filter}: {e}"));
        rules.default_roles[0].clone()
    }

    fn reads(filter: &str, user: &User, fields: &[(&str, Value)]) -> bool {
        role(filter).can_read(user, &Pk::Int(7), &doc(fields))
    }

    /// Found by the `rules_load` fuzzer: an object's keys are unordered, so the same
    /// filter spelt in another key order must load to the same rules.
    #[test]
    fn key_order_does_not_change_the_rules() {
        for (a, b) in [
            (
                r#"{"n": {"$lte": 1, "$lt": 5}}"#,
                r#"{"n": {"$lt": 5, "$lte": 1}}"#,
            ),
            (r#"{"team": "x", "n": 1}"#, r#"{"n": 1, "team": "x"}"#),
            (
                r#"{"$or": [{"a": 1}], "n": {"$in": [1], "$exists": true}}"#,
                r#"{"n": {"$exists": true, "$in": [1]}, "$or": [{"a": 1}]}"#,
            ),
        ] {
            assert_eq!(role(a), role(b), "{a} vs {b}");
        }
    }

    #[test]
    fn operators() {
        let u = User::new("alice").with("level", "3").with("admin", "true");
        let d = [("n", Value::Int(5)), ("s", Value::from("x"))];
        let cases = [
            (r#"{}"#, true),
            (r#"{"n": 5}"#, true),
            (r#"{"n": 5.0}"#, true),
            (r#"{"n": {"$gt": 4, "$lt": 6}}"#, true),
            (r#"{"n": {"$gte": 6}}"#, false),
            (r#"{"n": {"$in": [1, 5]}}"#, true),
            (r#"{"n": {"$nin": [1, 5]}}"#, false),
            (r#"{"n": {"$ne": "5"}}"#, true),
            (r#"{"n": {"$not": {"$eq": 5}}}"#, false),
            (r#"{"missing": null}"#, true),
            (r#"{"missing": {"$exists": false}}"#, true),
            (r#"{"s": {"$exists": true}}"#, true),
            (r#"{"_id": 7}"#, true),
            (r#"{"_id": {"$exists": true}}"#, true),
            (r#"{"n": {"$gt": "%%user.level"}}"#, true),
            (r#"{"%%user.admin": true}"#, true),
            (r#"{"%%user.admin": "true"}"#, true),
            (r#"{"%%user.nope": {"$exists": true}}"#, false),
            (r#"{"%%user.nope": {"$ne": "x"}}"#, true),
            (r#"{"s": "%%user.nope"}"#, false),
            (r#"{"$or": [{"n": 1}, {"s": "x"}]}"#, true),
            (r#"{"$and": [{"n": 5}, {"s": "y"}]}"#, false),
            (r#"{"$nor": [{"n": 1}, {"s": "y"}]}"#, true),
            (r#"{"$not": {"n": 5}}"#, false),
        ];
        for (f, want) in cases {
            assert_eq!(reads(f, &u, &d), want, "{f}");
        }
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let e = load(r#"{"defaultRoles": [], "defaultRoles": []}"#).unwrap_err();
        assert!(e.to_string().contains("duplicate key"), "{e}");
    }

    #[test]
    fn allow_all_allows() {
        let r = Rules::allow_all();
        let u = User::new("u");
        let d = doc(&[]);
        assert!(r.can_read("X", &u, &Pk::Int(1), &d));
        assert!(r.check_update("X", &u, &Pk::Int(1), &d, &d, &["f"]).is_ok());
        assert!(r.check_insert("X", &u, &Pk::Int(1), &d, &["f"]).is_ok());
        assert!(r.check_delete("X", &u, &Pk::Int(1), &d).is_ok());
    }
}
