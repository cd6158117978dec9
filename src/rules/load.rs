//! Loading a rules file: JSON that keeps key order and refuses duplicate keys, and its
//! validation into [`Rules`], with errors that name the role and the key's path. The file's
//! shape is described in [`permissions`](super::permissions).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::expr::{Filter, Key, Term, Test};
use super::permissions::{
    FieldPerms, Role, Rules, RulesError, FILTER_DEPTH_MAX, LABEL_LEN_MAX, RULES_LEN_MAX,
};
use super::query::CmpOp;
use crate::error::NameKind;
use crate::value::{validate_name, Value};
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

pub(super) fn role_location(name: Option<&str>, index: usize, collection: Option<&str>) -> String {
    let role = match name {
        Some(n) => format!("{:?}", shorten(n)),
        None => format!("#{index}"),
    };
    match collection {
        Some(c) => format!("role {role} in {:?}", shorten(c)),
        None => format!("default role {role}"),
    }
}

/// Parses and validates a rules file; see the [`permissions`](super::permissions) module.
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
    let mut role = Role {
        name: String::new(),
        apply_when: Filter::Const(true),
        read_filter: Filter::Const(false),
        write_filter: Filter::Const(false),
        read: false,
        write: false,
        insert: Filter::Const(true),
        delete: Filter::Const(true),
        search: true,
        fields: BTreeMap::new(),
        additional_fields: FieldPerms::default(),
    };
    let mut filters = None;
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
            "_id" => {
                if !matches!(v, Json::Str(_)) {
                    return Err(kat.expected("a string", &v));
                }
            }
            "apply_when" => {
                if !matches!(v, Json::Obj(_)) {
                    return Err(kat.expected("an expression object", &v));
                }
                role.apply_when = filter(v, &kat, Scope::User, 0)?;
            }
            "document_filters" => filters = Some(document_filters(v, &kat)?),
            "read" => role.read = flag(&v, &kat)?,
            "write" => role.write = flag(&v, &kat)?,
            "insert" => role.insert = flag_or_expression(v, &kat)?,
            "delete" => role.delete = flag_or_expression(v, &kat)?,
            "search" => role.search = flag(&v, &kat)?,
            "fields" => role.fields = field_perms_map(v, &kat, 0)?,
            "additional_fields" => role.additional_fields = field_perms(v, &kat, None)?,
            _ => {
                return Err(at.unknown_key(
                    &k,
                    "name, apply_when, document_filters, read, write, insert, delete, search, \
                     fields, additional_fields or _id",
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
    role.name = name;
    role.read_filter = read_filter;
    role.write_filter = write_filter;
    Ok(role)
}

fn flag(v: &Json, at: &At<'_>) -> Result<bool, RulesError> {
    match v {
        Json::Bool(b) => Ok(*b),
        _ => Err(at.expected("true or false", v)),
    }
}

/// `insert` and `delete`: a boolean, or an expression over the object.
fn flag_or_expression(v: Json, at: &At<'_>) -> Result<Filter, RulesError> {
    match v {
        Json::Bool(b) => Ok(Filter::Const(b)),
        Json::Obj(_) => filter(v, at, Scope::Document, 0),
        _ => Err(at.expected("true, false or an expression object", &v)),
    }
}

/// `fields`: field name → permissions. Nested (embedded) `fields` are checked and dropped:
/// values here hold no embedded documents.
fn field_perms_map(
    v: Json,
    at: &At<'_>,
    depth: usize,
) -> Result<BTreeMap<String, FieldPerms>, RulesError> {
    let Json::Obj(entries) = v else {
        return Err(at.expected("an object of field names", &v));
    };
    let mut out = BTreeMap::new();
    for (k, v) in entries {
        let kat = at.key(&k);
        if depth == 0 && k == "_id" {
            return Err(kat.err(
                "the primary key takes no field-level permissions (it is readable wherever \
                 the object is; Atlas Device Sync refuses such a role too)",
            ));
        }
        validate_name(NameKind::Field, &k).map_err(|e| kat.err(e.to_string()))?;
        out.insert(k, field_perms(v, &kat, Some(depth))?);
    }
    Ok(out)
}

/// A field's permissions: `read` and `write` (default `false`) and, for an entry of
/// `fields` (`depth` given), embedded `fields`.
fn field_perms(v: Json, at: &At<'_>, depth: Option<usize>) -> Result<FieldPerms, RulesError> {
    let Json::Obj(entries) = v else {
        return Err(at.expected("an object with `read` and `write`", &v));
    };
    let mut perms = FieldPerms::default();
    for (k, v) in entries {
        let kat = at.key(&k);
        match (k.as_str(), depth) {
            ("read", _) => perms.read = flag(&v, &kat)?,
            ("write", _) => perms.write = flag(&v, &kat)?,
            ("fields", Some(depth)) => {
                if depth >= FILTER_DEPTH_MAX {
                    return Err(kat.err(format!(
                        "embedded `fields` nest deeper than {FILTER_DEPTH_MAX} levels"
                    )));
                }
                field_perms_map(v, &kat, depth + 1)?;
            }
            (_, Some(_)) => return Err(at.unknown_key(&k, "read, write or fields")),
            (_, None) => return Err(at.unknown_key(&k, "read or write")),
        }
    }
    Ok(perms)
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
