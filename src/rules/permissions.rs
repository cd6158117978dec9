//! Permissions: a rules file of roles, in the JSON shape Atlas Device Sync rules use.
//!
//! ```json
//! {
//!   "rules": {
//!     "Item": [
//!       { "name": "readOwnWriteOwn",
//!         "apply_when": {},
//!         "document_filters": { "read": { "ownerId": "%%user.id" },
//!                               "write": { "ownerId": "%%user.id" } },
//!         "read": true, "write": true, "insert": true, "delete": true }
//!     ]
//!   },
//!   "defaultRoles": [
//!     { "name": "readAll", "apply_when": {},
//!       "document_filters": { "read": true, "write": false },
//!       "read": true, "write": false }
//!   ]
//! }
//! ```
//!
//! # The file
//!
//! - Top level: `rules` (collection name → ordered array of roles) and `defaultRoles` (the
//!   roles of every collection that has no entry in `rules`); both optional. A collection
//!   listed with an empty array has no roles: nobody may read or write it.
//! - A role: `name` (required, unique in its array), `apply_when` (optional, default `{}`),
//!   `document_filters` (required, with both `read` and `write`), and the flags `read`,
//!   `write`, `insert`, `delete` (optional, default `false`).
//! - Any other key, at any level, is an error, as is a duplicate key, a value of the wrong
//!   type or a file over [`RULES_LEN_MAX`] bytes. Errors name the collection, the role (by
//!   name, or by index when it has none) and the path of the key.
//!
//! # Expressions
//!
//! `apply_when` and the document filters are match expressions, as in MongoDB:
//!
//! - `{}` matches everything; several keys in one object must all match.
//! - `{ "key": value }` is equality; `{ "key": { "$op": … } }` applies operators (several
//!   in one object must all hold): `$eq`, `$ne`, `$gt`, `$gte`, `$lt`, `$lte`, `$in`,
//!   `$nin` (arrays of values), `$exists` (a boolean), `$not` (an object of operators).
//! - `{ "$and": [..] }`, `{ "$or": [..] }`, `{ "$nor": [..] }` (non-empty arrays of
//!   expressions) and `{ "$not": { … } }` (an expression).
//! - In a document filter a key is a field name or `_id` (the primary key); in both kinds a
//!   key may be `%%user.id` or `%%user.<key>`; `apply_when` may use only those.
//! - A value is `null`, a boolean, a number (integers become `Int`, other numbers
//!   `Float`), a string, or the string `"%%user.id"` / `"%%user.<key>"`. JSON has no bytes,
//!   so a bytes field (or a 12- or 16-byte `_id`) can only be tested with `$exists`.
//! - `document_filters.read` and `.write` may also be `true` or `false`.
//!
//! `%%user.id` is the user's id; `%%user.<key>` is `User::fields[<key>]`, the key taken
//! verbatim (`%%user.custom_data.isAdmin` reads the key `custom_data.isAdmin`). User values
//! are strings: compared with a value of another type they are read as that type first
//! (`"true"`/`"false"` for booleans; an `i64`, else an `f64`, for numbers), and a string
//! that does not read as that type does not compare. A user key the user does not have
//! compares with nothing (so `$eq` and `$in` are false, `$ne` and `$nin` true);
//! `$exists` tests whether the user has it.
//!
//! Document values compare as [`compare`] says, the same rules as queries: a missing field
//! is `null`; ints and floats compare numerically; different types do not compare, so
//! every operator but `$ne`/`$nin` is false for them. `$exists` is true for a field present
//! in the object, even with a `null` value; `_id` always exists.
//!
//! # Evaluation
//!
//! The first role (in file order) whose `apply_when` matches the user applies; no role means
//! no access. With the role:
//!
//! - read: `(read && read filter)` or `(write && write filter)` holds on the object — a
//!   role may read what it may write (as in Atlas), but the read filter alone grants nothing
//!   when `read` is false.
//! - update: `write`, and the write filter holds on the object before and after the change
//!   (so no one can move an object out of, or into, what they may write).
//! - insert: `insert`, and the write filter holds on the new object.
//! - delete: `delete`, and the write filter holds on the object as it was.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::query::{compare, pk_value, CmpOp};
use crate::error::NameKind;
use crate::schema::Schema;
use crate::value::{validate_name, Pk, Value};

/// Longest rules file [`load`] accepts, in bytes.
pub const RULES_LEN_MAX: usize = 1 << 20;

/// Deepest nesting of `$and`, `$or`, `$nor` and `$not` in one expression.
pub const FILTER_DEPTH_MAX: usize = 32;

/// Longest role name or `%%user.<key>` key, in bytes.
const LABEL_LEN_MAX: usize = 256;

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
    collections: BTreeMap<String, Vec<Role>>,
    default_roles: Vec<Role>,
}

/// One role: who it applies to, which objects it may see and change, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct Role {
    name: String,
    apply_when: Filter,
    read_filter: Filter,
    write_filter: Filter,
    flags: RoleFlags,
}

/// A role's flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoleFlags {
    /// May read objects that match the read filter.
    pub read: bool,
    /// May update (and read) objects that match the write filter.
    pub write: bool,
    /// May insert objects that match the write filter.
    pub insert: bool,
    /// May delete objects that match the write filter.
    pub delete: bool,
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
    /// The role's flag for the action is false.
    NotAllowed,
    /// The write filter does not hold on the object before the change.
    FilterBefore,
    /// The write filter does not hold on the object after the change.
    FilterAfter,
}

/// Why a write was refused. `Display` gives the reason for the compensating write:
/// `denied by write filter in role "readOwnWriteOwn" (object after the update)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The role that refused it; `None` when no role applies.
    pub role: Option<String>,
    /// What was attempted.
    pub action: Action,
    /// Which check failed.
    pub kind: DenialKind,
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
                flags: RoleFlags {
                    read: true,
                    write: true,
                    insert: true,
                    delete: true,
                },
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

    /// Whether `user` may read the object.
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

    /// Whether `user` may change the object from `before` to `after`.
    pub fn check_update(
        &self,
        collection: &str,
        user: &User,
        pk: &Pk,
        before: &BTreeMap<String, Value>,
        after: &BTreeMap<String, Value>,
    ) -> Result<(), Denial> {
        self.role_or_denial(collection, user, Action::Update)?
            .can_write_update(user, pk, before, after)
    }

    /// Whether `user` may insert the object.
    pub fn check_insert(
        &self,
        collection: &str,
        user: &User,
        pk: &Pk,
        after: &BTreeMap<String, Value>,
    ) -> Result<(), Denial> {
        self.role_or_denial(collection, user, Action::Insert)?
            .can_insert(user, pk, after)
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
        })
    }

    /// Checks the roles that govern `schema.collection` against its schema: every field
    /// their document filters use must be declared queryable (the server evaluates filters
    /// over queryable fields only, like subscriptions).
    pub fn check_schema(&self, schema: &Schema) -> Result<(), RulesError> {
        let own = self.collections.contains_key(&schema.collection);
        for (i, role) in self.roles(&schema.collection).iter().enumerate() {
            for (which, filter) in [("read", &role.read_filter), ("write", &role.write_filter)] {
                let mut fields = BTreeSet::new();
                filter.fields(&mut fields);
                if let Some(field) = fields.iter().find(|f| !schema.is_queryable(f)) {
                    let location = if own {
                        role_location(Some(&role.name), i, Some(&schema.collection))
                    } else {
                        role_location(Some(&role.name), i, None)
                    };
                    return Err(RulesError::Invalid {
                        location,
                        path: format!("document_filters.{which}"),
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

    /// The role's flags.
    pub fn flags(&self) -> RoleFlags {
        self.flags
    }

    /// Whether the role's `apply_when` matches `user`.
    pub fn applies_to(&self, user: &User) -> bool {
        self.apply_when.eval(&Subject { user, doc: None })
    }

    /// Whether the role lets `user` read the object: `read` and the read filter, or
    /// `write` and the write filter.
    pub fn can_read(&self, user: &User, pk: &Pk, fields: &BTreeMap<String, Value>) -> bool {
        let s = Subject {
            user,
            doc: Some((pk, fields)),
        };
        (self.flags.read && self.read_filter.eval(&s))
            || (self.flags.write && self.write_filter.eval(&s))
    }

    /// Whether the role lets `user` change the object from `before` to `after`: `write`, and
    /// the write filter holds on both.
    pub fn can_write_update(
        &self,
        user: &User,
        pk: &Pk,
        before: &BTreeMap<String, Value>,
        after: &BTreeMap<String, Value>,
    ) -> Result<(), Denial> {
        self.allowed(self.flags.write, Action::Update)?;
        self.filter_holds(user, pk, before, Action::Update, DenialKind::FilterBefore)?;
        self.filter_holds(user, pk, after, Action::Update, DenialKind::FilterAfter)
    }

    /// Whether the role lets `user` insert the object: `insert`, and the write filter holds
    /// on it.
    pub fn can_insert(
        &self,
        user: &User,
        pk: &Pk,
        after: &BTreeMap<String, Value>,
    ) -> Result<(), Denial> {
        self.allowed(self.flags.insert, Action::Insert)?;
        self.filter_holds(user, pk, after, Action::Insert, DenialKind::FilterAfter)
    }

    /// Whether the role lets `user` delete the object: `delete`, and the write filter holds
    /// on it as it was.
    pub fn can_delete(
        &self,
        user: &User,
        pk: &Pk,
        before: &BTreeMap<String, Value>,
    ) -> Result<(), Denial> {
        self.allowed(self.flags.delete, Action::Delete)?;
        self.filter_holds(user, pk, before, Action::Delete, DenialKind::FilterBefore)
    }

    fn denial(&self, action: Action, kind: DenialKind) -> Denial {
        Denial {
            role: Some(self.name.clone()),
            action,
            kind,
        }
    }

    fn allowed(&self, flag: bool, action: Action) -> Result<(), Denial> {
        if flag {
            Ok(())
        } else {
            Err(self.denial(action, DenialKind::NotAllowed))
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

// ---------------------------------------------------------------------------------------
// Expressions

/// A validated match expression.
#[derive(Clone, Debug, PartialEq)]
enum Filter {
    Const(bool),
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
    Test(Key, Test),
}

/// What an expression looks at.
#[derive(Clone, Debug, PartialEq)]
enum Key {
    Pk,
    Field(String),
    UserId,
    UserField(String),
}

/// A value in an expression, possibly the user's.
#[derive(Clone, Debug, PartialEq)]
enum Term {
    Value(Value),
    UserId,
    UserField(String),
}

#[derive(Clone, Debug, PartialEq)]
enum Test {
    Cmp(CmpOp, Term),
    In(Vec<Term>),
    Exists(bool),
}

/// What an expression is evaluated against: the user, and the object for document filters.
struct Subject<'a> {
    user: &'a User,
    doc: Option<(&'a Pk, &'a BTreeMap<String, Value>)>,
}

/// A key or term resolved against a subject.
enum Resolved<'a> {
    Value(Cow<'a, Value>),
    /// A user value, a string read as whatever type it is compared with.
    User(&'a str),
    /// A user key the user does not have; it compares with nothing.
    Absent,
}

static NULL: Value = Value::Null;

impl Filter {
    fn eval(&self, s: &Subject<'_>) -> bool {
        match self {
            Filter::Const(b) => *b,
            Filter::All(fs) => fs.iter().all(|f| f.eval(s)),
            Filter::Any(fs) => fs.iter().any(|f| f.eval(s)),
            Filter::Not(f) => !f.eval(s),
            Filter::Test(key, test) => {
                let lhs = s.key(key);
                match test {
                    Test::Cmp(op, term) => op.holds_for(cmp_resolved(&lhs, &s.term(term))),
                    Test::In(terms) => terms
                        .iter()
                        .any(|t| cmp_resolved(&lhs, &s.term(t)) == Some(Ordering::Equal)),
                    Test::Exists(want) => s.exists(key) == *want,
                }
            }
        }
    }

    fn fields(&self, out: &mut BTreeSet<String>) {
        match self {
            Filter::Const(_) => {}
            Filter::All(fs) | Filter::Any(fs) => fs.iter().for_each(|f| f.fields(out)),
            Filter::Not(f) => f.fields(out),
            Filter::Test(Key::Field(n), _) => {
                out.insert(n.clone());
            }
            Filter::Test(..) => {}
        }
    }
}

impl<'a> Subject<'a> {
    fn key(&self, key: &'a Key) -> Resolved<'a> {
        match (key, self.doc) {
            (Key::Pk, Some((pk, _))) => Resolved::Value(Cow::Owned(pk_value(pk))),
            (Key::Field(n), Some((_, fields))) => {
                Resolved::Value(Cow::Borrowed(fields.get(n).unwrap_or(&NULL)))
            }
            // apply_when is validated to use user keys only; there is no object there.
            (Key::Pk | Key::Field(_), None) => Resolved::Absent,
            (Key::UserId, _) => Resolved::User(&self.user.id),
            (Key::UserField(k), _) => self
                .user
                .fields
                .get(k)
                .map_or(Resolved::Absent, |v| Resolved::User(v)),
        }
    }

    fn term(&self, term: &'a Term) -> Resolved<'a> {
        match term {
            Term::Value(v) => Resolved::Value(Cow::Borrowed(v)),
            Term::UserId => Resolved::User(&self.user.id),
            Term::UserField(k) => self
                .user
                .fields
                .get(k)
                .map_or(Resolved::Absent, |v| Resolved::User(v)),
        }
    }

    fn exists(&self, key: &Key) -> bool {
        match (key, self.doc) {
            (Key::Pk, doc) => doc.is_some(),
            (Key::Field(n), Some((_, fields))) => fields.contains_key(n),
            (Key::Field(_), None) => false,
            (Key::UserId, _) => true,
            (Key::UserField(k), _) => self.user.fields.contains_key(k),
        }
    }
}

fn cmp_resolved(a: &Resolved<'_>, b: &Resolved<'_>) -> Option<Ordering> {
    match (a, b) {
        (Resolved::Absent, _) | (_, Resolved::Absent) => None,
        (Resolved::Value(x), Resolved::Value(y)) => compare(x, y),
        (Resolved::User(s), Resolved::Value(v)) => compare(&read_user_value(s, v)?, v),
        (Resolved::Value(v), Resolved::User(s)) => compare(v, &read_user_value(s, v)?),
        (Resolved::User(x), Resolved::User(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
    }
}

/// Reads a user's string as the type of `like`; `None` if it does not read as one.
fn read_user_value(s: &str, like: &Value) -> Option<Value> {
    match like {
        Value::String(_) => Some(Value::String(s.to_owned())),
        Value::Bool(_) => match s {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            _ => None,
        },
        Value::Int(_) | Value::Float(_) => s
            .parse::<i64>()
            .map(Value::Int)
            .ok()
            .or_else(|| s.parse::<f64>().ok().map(Value::Float)),
        Value::Null | Value::Bytes(_) => None,
    }
}

// ---------------------------------------------------------------------------------------
// JSON

/// A JSON value that keeps object keys in file order and refuses duplicate keys (serde_json's
/// own `Value` silently keeps the last one, which would hide a mistake in a rules file).
#[derive(Debug)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Int(_) | Json::Float(_) => "a number",
            Json::Str(_) => "a string",
            Json::Arr(_) => "an array",
            Json::Obj(_) => "an object",
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Json, E> {
        Ok(Json::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Json, E> {
        Ok(Json::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Json, E> {
        i64::try_from(v)
            .map(Json::Int)
            .map_err(|_| E::custom(format!("integer {v} is out of range for i64")))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Json, E> {
        Ok(Json::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Json, E> {
        Ok(Json::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Json, E> {
        Ok(Json::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = a.next_element()? {
            out.push(v);
        }
        Ok(Json::Arr(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Json, A::Error> {
        let mut out: Vec<(String, Json)> = Vec::new();
        let mut seen = BTreeSet::new();
        while let Some(k) = a.next_key::<String>()? {
            if !seen.insert(k.clone()) {
                return Err(de::Error::custom(format!("duplicate key {k:?}")));
            }
            let v = a.next_value()?;
            out.push((k, v));
        }
        Ok(Json::Obj(out))
    }
}

/// Where in the file we are, for error messages.
#[derive(Clone)]
struct At<'a> {
    location: &'a str,
    path: String,
}

impl<'a> At<'a> {
    fn new(location: &'a str) -> Self {
        At {
            location,
            path: String::new(),
        }
    }

    fn key(&self, k: &str) -> At<'a> {
        let path = if self.path.is_empty() {
            k.to_owned()
        } else {
            format!("{}.{k}", self.path)
        };
        At {
            location: self.location,
            path,
        }
    }

    fn index(&self, i: usize) -> At<'a> {
        At {
            location: self.location,
            path: format!("{}[{i}]", self.path),
        }
    }

    fn err(&self, message: impl Into<String>) -> RulesError {
        RulesError::Invalid {
            location: self.location.to_owned(),
            path: self.path.clone(),
            message: message.into(),
        }
    }

    fn expected(&self, what: &str, found: &Json) -> RulesError {
        self.err(format!("expected {what}, found {}", found.kind()))
    }

    fn unknown_key(&self, key: &str, expected: &str) -> RulesError {
        self.err(format!(
            "unknown key {:?} (expected {expected})",
            shorten(key)
        ))
    }
}

/// Cuts a name from the file short for an error message.
fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

fn role_location(name: Option<&str>, index: usize, collection: Option<&str>) -> String {
    let role = match name {
        Some(n) => format!("{:?}", shorten(n)),
        None => format!("#{index}"),
    };
    match collection {
        Some(c) => format!("role {role} in {:?}", shorten(c)),
        None => format!("default role {role}"),
    }
}

/// Parses and validates a rules file; see the [module documentation](self).
pub fn load(json: &str) -> Result<Rules, RulesError> {
    if json.len() > RULES_LEN_MAX {
        return Err(RulesError::TooLarge {
            len: json.len(),
            max: RULES_LEN_MAX,
        });
    }
    // serde_json limits nesting to 128 levels, so deep input is an error, not a stack
    // overflow.
    let doc: Json = serde_json::from_str(json).map_err(|e| RulesError::Json {
        message: e.to_string(),
    })?;
    let top = At::new("rules file");
    let Json::Obj(entries) = doc else {
        return Err(top.expected("an object", &doc));
    };
    let mut rules = Rules {
        collections: BTreeMap::new(),
        default_roles: Vec::new(),
    };
    for (k, v) in entries {
        match k.as_str() {
            "rules" => {
                let at = top.key("rules");
                let Json::Obj(colls) = v else {
                    return Err(at.expected("an object of collections", &v));
                };
                for (coll, roles) in colls {
                    let at = at.key(&coll);
                    validate_name(NameKind::Collection, &coll)
                        .map_err(|e| at.err(e.to_string()))?;
                    let roles = load_roles(roles, Some(&coll), &at)?;
                    rules.collections.insert(coll, roles);
                }
            }
            "defaultRoles" => rules.default_roles = load_roles(v, None, &top.key("defaultRoles"))?,
            _ => return Err(top.unknown_key(&k, "\"rules\" or \"defaultRoles\"")),
        }
    }
    Ok(rules)
}

fn load_roles(v: Json, collection: Option<&str>, at: &At<'_>) -> Result<Vec<Role>, RulesError> {
    let Json::Arr(items) = v else {
        return Err(at.expected("an array of roles", &v));
    };
    let mut roles: Vec<Role> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let role = load_role(item, i, collection, at)?;
        if let Some(j) = roles.iter().position(|r| r.name == role.name) {
            let location = role_location(Some(&role.name), i, collection);
            return Err(At::new(&location)
                .key("name")
                .err(format!("duplicate role name (also role #{j})")));
        }
        roles.push(role);
    }
    Ok(roles)
}

fn load_role(
    v: Json,
    index: usize,
    collection: Option<&str>,
    outer: &At<'_>,
) -> Result<Role, RulesError> {
    let Json::Obj(entries) = v else {
        return Err(outer.index(index).expected("a role object", &v));
    };
    // Name the role by its name in every later message, if it has a usable one.
    let name = entries.iter().find_map(|(k, v)| match (k.as_str(), v) {
        ("name", Json::Str(s)) if !s.is_empty() && s.len() <= LABEL_LEN_MAX => Some(s.clone()),
        _ => None,
    });
    let location = role_location(name.as_deref(), index, collection);
    let at = At::new(&location);
    let mut apply_when = Filter::Const(true);
    let mut filters = None;
    let mut flags = RoleFlags::default();
    for (k, v) in entries {
        let kat = at.key(&k);
        match k.as_str() {
            "name" => match &v {
                Json::Str(s) if s.is_empty() => return Err(kat.err("must not be empty")),
                Json::Str(s) if s.len() > LABEL_LEN_MAX => {
                    return Err(kat.err(format!("longer than {LABEL_LEN_MAX} bytes")))
                }
                Json::Str(_) => {}
                _ => return Err(kat.expected("a string", &v)),
            },
            "apply_when" => {
                if !matches!(v, Json::Obj(_)) {
                    return Err(kat.expected("an expression object", &v));
                }
                apply_when = filter(v, &kat, Scope::User, 0)?;
            }
            "document_filters" => filters = Some(document_filters(v, &kat)?),
            "read" => flags.read = flag(&v, &kat)?,
            "write" => flags.write = flag(&v, &kat)?,
            "insert" => flags.insert = flag(&v, &kat)?,
            "delete" => flags.delete = flag(&v, &kat)?,
            _ => {
                return Err(at.unknown_key(
                    &k,
                    "name, apply_when, document_filters, read, write, insert or delete",
                ))
            }
        }
    }
    let Some(name) = name else {
        return Err(at.key("name").err("missing (every role needs a name)"));
    };
    let Some((read_filter, write_filter)) = filters else {
        return Err(at
            .key("document_filters")
            .err("missing (give both `read` and `write`, each `true`, `false` or an expression)"));
    };
    Ok(Role {
        name,
        apply_when,
        read_filter,
        write_filter,
        flags,
    })
}

fn flag(v: &Json, at: &At<'_>) -> Result<bool, RulesError> {
    match v {
        Json::Bool(b) => Ok(*b),
        _ => Err(at.expected("true or false", v)),
    }
}

fn document_filters(v: Json, at: &At<'_>) -> Result<(Filter, Filter), RulesError> {
    let Json::Obj(entries) = v else {
        return Err(at.expected("an object with `read` and `write`", &v));
    };
    let (mut read, mut write) = (None, None);
    for (k, v) in entries {
        let kat = at.key(&k);
        let f = match v {
            Json::Bool(b) => Filter::Const(b),
            Json::Obj(_) => filter(v, &kat, Scope::Document, 0)?,
            _ => return Err(kat.expected("true, false or an expression object", &v)),
        };
        match k.as_str() {
            "read" => read = Some(f),
            "write" => write = Some(f),
            _ => return Err(at.unknown_key(&k, "read or write")),
        }
    }
    match (read, write) {
        (Some(r), Some(w)) => Ok((r, w)),
        (None, _) => Err(at.err("missing key `read`")),
        (_, None) => Err(at.err("missing key `write`")),
    }
}

/// What an expression's keys may refer to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// `apply_when`: the user only.
    User,
    /// Document filters: the object's fields, `_id` and the user.
    Document,
}

fn deeper(at: &At<'_>, depth: usize) -> Result<usize, RulesError> {
    if depth >= FILTER_DEPTH_MAX {
        return Err(at.err(format!(
            "expressions nest deeper than {FILTER_DEPTH_MAX} levels"
        )));
    }
    Ok(depth + 1)
}

/// Combines the conditions of one object: all must hold.
fn all(mut parts: Vec<Filter>) -> Filter {
    if parts.len() == 1 {
        parts.pop().unwrap_or(Filter::Const(true))
    } else {
        Filter::All(parts)
    }
}

/// An expression object: `{}`, `{ "key": value-or-operators, "$and": [..], … }`.
fn filter(v: Json, at: &At<'_>, scope: Scope, depth: usize) -> Result<Filter, RulesError> {
    let Json::Obj(entries) = v else {
        return Err(at.expected("an expression object", &v));
    };
    let mut parts = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        let kat = at.key(&k);
        let part = match k.as_str() {
            "$and" | "$or" | "$nor" => {
                let depth = deeper(&kat, depth)?;
                let Json::Arr(items) = v else {
                    return Err(kat.expected("an array of expressions", &v));
                };
                if items.is_empty() {
                    return Err(kat.err("must not be empty"));
                }
                let subs = items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| filter(item, &kat.index(i), scope, depth))
                    .collect::<Result<Vec<_>, _>>()?;
                match k.as_str() {
                    "$and" => Filter::All(subs),
                    "$or" => Filter::Any(subs),
                    _ => Filter::Not(Box::new(Filter::Any(subs))),
                }
            }
            "$not" => {
                let depth = deeper(&kat, depth)?;
                Filter::Not(Box::new(filter(v, &kat, scope, depth)?))
            }
            op if op.starts_with('$') => {
                return Err(kat.err(format!(
                    "unknown operator `{}` (expected $and, $or, $nor, $not or a key)",
                    shorten(op)
                )))
            }
            _ => {
                let key = parse_key(&k, &kat, scope)?;
                key_tests(&key, v, &kat, depth)?
            }
        };
        parts.push((k, part));
    }
    Ok(all(in_key_order(parts)))
}

/// The conditions of one object, ordered by their keys: an object's keys are unordered, so
/// the same object spelt in another order loads to the same rules. (Parsing goes in file
/// order, so the first error reported is the first in the file.)
fn in_key_order(mut parts: Vec<(String, Filter)>) -> Vec<Filter> {
    parts.sort_by(|a, b| a.0.cmp(&b.0));
    parts.into_iter().map(|(_, f)| f).collect()
}

fn parse_key(k: &str, at: &At<'_>, scope: Scope) -> Result<Key, RulesError> {
    if k.starts_with("%%") {
        return Ok(match user_ref(k, at)? {
            UserRef::Id => Key::UserId,
            UserRef::Field(f) => Key::UserField(f),
        });
    }
    if scope == Scope::User {
        return Err(at.err(format!(
            "apply_when sees only the user: expected `%%user.id`, `%%user.<key>` or an \
             operator, found `{}`",
            shorten(k)
        )));
    }
    if k == "_id" {
        return Ok(Key::Pk);
    }
    validate_name(NameKind::Field, k).map_err(|e| at.err(e.to_string()))?;
    Ok(Key::Field(k.to_owned()))
}

/// `%%user.id` or `%%user.<key>`.
enum UserRef {
    Id,
    Field(String),
}

fn user_ref(s: &str, at: &At<'_>) -> Result<UserRef, RulesError> {
    match s.strip_prefix("%%user.") {
        Some("id") => Ok(UserRef::Id),
        Some(k) if !k.is_empty() && k.len() <= LABEL_LEN_MAX => Ok(UserRef::Field(k.to_owned())),
        _ => Err(at.err(format!(
            "unknown expansion `{}` (expected `%%user.id` or `%%user.<key>`)",
            shorten(s)
        ))),
    }
}

/// The value after a key: a plain value (equality) or an object of operators.
fn key_tests(key: &Key, v: Json, at: &At<'_>, depth: usize) -> Result<Filter, RulesError> {
    let ops = match v {
        Json::Obj(ops) if !ops.is_empty() && ops.iter().all(|(k, _)| k.starts_with('$')) => ops,
        Json::Obj(_) => {
            return Err(at.err(
                "expected a value or an object of operators ($eq, $ne, $gt, $gte, $lt, $lte, \
                 $in, $nin, $exists, $not)",
            ))
        }
        Json::Arr(_) => {
            return Err(at.err("expected a value; arrays go after $in, $nin, $and, $or or $nor"))
        }
        v => {
            return Ok(Filter::Test(
                key.clone(),
                Test::Cmp(CmpOp::Eq, term(v, at)?),
            ))
        }
    };
    let mut parts = Vec::with_capacity(ops.len());
    for (op, v) in ops {
        let oat = at.key(&op);
        let cmp = |c: CmpOp, v: Json| -> Result<Filter, RulesError> {
            Ok(Filter::Test(key.clone(), Test::Cmp(c, term(v, &oat)?)))
        };
        let part = match op.as_str() {
            "$eq" => cmp(CmpOp::Eq, v)?,
            "$ne" => cmp(CmpOp::Ne, v)?,
            "$gt" => cmp(CmpOp::Gt, v)?,
            "$gte" => cmp(CmpOp::Ge, v)?,
            "$lt" => cmp(CmpOp::Lt, v)?,
            "$lte" => cmp(CmpOp::Le, v)?,
            "$in" | "$nin" => {
                let Json::Arr(items) = v else {
                    return Err(oat.expected("an array of values", &v));
                };
                let terms = items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| term(item, &oat.index(i)))
                    .collect::<Result<Vec<_>, _>>()?;
                let t = Filter::Test(key.clone(), Test::In(terms));
                if op == "$in" {
                    t
                } else {
                    Filter::Not(Box::new(t))
                }
            }
            "$exists" => match v {
                Json::Bool(b) => Filter::Test(key.clone(), Test::Exists(b)),
                _ => return Err(oat.expected("true or false", &v)),
            },
            "$not" => {
                let depth = deeper(&oat, depth)?;
                if !matches!(&v, Json::Obj(ops) if !ops.is_empty() && ops.iter().all(|(k, _)| k.starts_with('$')))
                {
                    return Err(oat.expected("an object of operators", &v));
                }
                Filter::Not(Box::new(key_tests(key, v, &oat, depth)?))
            }
            _ => {
                return Err(oat.err(format!(
                    "unknown operator `{}` (expected $eq, $ne, $gt, $gte, $lt, $lte, $in, \
                     $nin, $exists or $not)",
                    shorten(&op)
                )))
            }
        };
        parts.push((op, part));
    }
    Ok(all(in_key_order(parts)))
}

/// A value in an expression.
fn term(v: Json, at: &At<'_>) -> Result<Term, RulesError> {
    Ok(Term::Value(match v {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(b),
        Json::Int(i) => Value::Int(i),
        Json::Float(x) => Value::Float(x),
        Json::Str(s) if s.starts_with("%%") => {
            return Ok(match user_ref(&s, at)? {
                UserRef::Id => Term::UserId,
                UserRef::Field(f) => Term::UserField(f),
            })
        }
        Json::Str(s) => Value::String(s),
        Json::Arr(_) | Json::Obj(_) => return Err(at.expected("a value", &v)),
    }))
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
        assert!(r.check_update("X", &u, &Pk::Int(1), &d, &d).is_ok());
        assert!(r.check_insert("X", &u, &Pk::Int(1), &d).is_ok());
        assert!(r.check_delete("X", &u, &Pk::Int(1), &d).is_ok());
    }
}
