//! The match expressions of a rules file (`apply_when`, the document filters, `insert`
//! and `delete`), validated, and their evaluation against a user and an object. The
//! language is described in [`permissions`](super::permissions).

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

use super::permissions::User;
use super::query::{compare, pk_value, CmpOp};
use crate::value::{Pk, Value};

/// A validated match expression.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Filter {
    Const(bool),
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
    Test(Key, Test),
}

/// What an expression looks at.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Key {
    Pk,
    Field(String),
    UserId,
    UserField(String),
}

/// A value in an expression, possibly the user's.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Term {
    Value(Value),
    UserId,
    UserField(String),
}

#[derive(Clone, Debug, PartialEq)]
pub(super) enum Test {
    Cmp(CmpOp, Term),
    In(Vec<Term>),
    Exists(bool),
}

/// What an expression is evaluated against: the user, and the object for document filters.
pub(super) struct Subject<'a> {
    pub(super) user: &'a User,
    pub(super) doc: Option<(&'a Pk, &'a BTreeMap<String, Value>)>,
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
    pub(super) fn eval(&self, s: &Subject<'_>) -> bool {
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

    pub(super) fn fields(&self, out: &mut BTreeSet<String>) {
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
