//! The query language of subscriptions and local reads: comparisons of one field (or the
//! primary key `_id`) with a value or a parameter, combined with `AND`, `OR` and `NOT`.
//!
//! ```text
//! status == "completed" AND ownerId == $user
//! NOT (complexity > 4 OR name BEGINSWITH 'tmp') && _id != 0x00ff
//! ```
//!
//! # Grammar
//!
//! ```text
//! query      := or
//! or         := and (("OR" | "||") and)*          left-associative
//! and        := not (("AND" | "&&") not)*         left-associative
//! not        := ("NOT" | "!") not | primary       NOT binds tighter than AND, AND than OR
//! primary    := "(" or ")" | "TRUEPREDICATE" | "FALSEPREDICATE" | comparison
//! comparison := field op operand | operand op field
//! op         := "==" | "=" | "!=" | "<>" | "<" | "<=" | ">" | ">="
//!             | "BEGINSWITH" | "ENDSWITH" | "CONTAINS"
//! field      := "_id" | name | "`" name "`"
//! operand    := literal | "$" digits | "$" [A-Za-z_][A-Za-z0-9_]*
//! literal    := "null" | "true" | "false" | int | float | string | bytes
//! ```
//!
//! - Keywords are case-insensitive; [`Query`]'s `Display` writes them in upper case (literals
//!   in lower case).
//! - A bare `name` starts with an ASCII letter or `_` and goes on with letters, digits, `_`,
//!   `-` and `.`, the characters field names may use. Names that are keywords, or that start
//!   with a digit, `-` or `.`, are written in backticks: `` `not` ``, `` `2nd` ``.
//! - Either side may be the field: `4 >= complexity` is read as `complexity <= 4` (the
//!   parsed query keeps the field on the left). `BEGINSWITH`, `ENDSWITH` and `CONTAINS` need
//!   the field on the left. Exactly one side is a field: comparing two fields, or two
//!   values, is an error.
//! - int: an optional sign and decimal digits, within `i64`. float: an optional sign, digits,
//!   and a fraction (`1.5`) and/or an exponent (`-2e3`); also `inf`, `-inf`, `nan` (the
//!   quiet NaN `0x7ff8000000000000`) and `nan(0x…)` with the 16 hex digits of any other
//!   NaN's bits, so every float can be written bit for bit.
//! - string: in `"…"` or `'…'`, escapes `\"` `\'` `\\` `\n` `\r` `\t` `\0` `\u{1F600}`;
//!   any other character, newlines included, may appear as is.
//! - bytes: `0x` followed by an even number of hex digits (`0x` alone is empty bytes).
//! - `$0`, `$1`, … are positional parameters, `$user`, `$name` named ones; they get their
//!   values from [`Query::bind`].
//!
//! Limits: at most [`QUERY_LEN_MAX`] bytes, both as written and in canonical form (what
//! `Display` prints, which can be longer: `a<1` prints as `a < 1`), and at most
//! [`QUERY_DEPTH_MAX`] levels of parentheses and `NOT`. Every malformed input is a
//! [`QueryError`] naming the byte position; the parser never panics and never recurses
//! deeper than the depth limit.
//!
//! # Semantics
//!
//! See [`compare`] for how two values compare. A field missing from the object compares as
//! `null`; `_id` compares the primary key as [`pk_value`] converts it. `a != b` is exactly
//! `NOT (a == b)`, so a comparison between values of different types is false for every
//! operator but `!=`. `BEGINSWITH`, `ENDSWITH` and `CONTAINS` are case-sensitive and hold
//! only between two strings or two byte strings.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use super::parser::keyword;
pub use super::parser::parse;
pub use super::query_error::{CmpOp, QueryError, QUERY_DEPTH_MAX, QUERY_LEN_MAX};
use crate::schema::Schema;
use crate::value::{Pk, Value};

/// The bits of the NaN that the literal `nan` denotes.
pub(super) const CANONICAL_NAN_BITS: u64 = 0x7ff8_0000_0000_0000;

/// A parsed query. Build one with [`parse`] (or `str::parse`), or directly.
///
/// `Display` writes a canonical form that parses back to an equal `Query`, for every query
/// [`parse`] returns. A query built in code prints the same way and parses back when it
/// could have been parsed: its field names are 1 to 64 of the characters names use (and
/// not `_id`), string operators have string or bytes operands, and it stays within the
/// limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// `TRUEPREDICATE`: every object.
    True,
    /// `FALSEPREDICATE`: no object.
    False,
    /// One comparison.
    Cmp(Comparison),
    /// `NOT q`.
    Not(Box<Query>),
    /// `a AND b`.
    And(Box<Query>, Box<Query>),
    /// `a OR b`.
    Or(Box<Query>, Box<Query>),
}

/// `field op operand`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comparison {
    /// The field compared (always on the left once parsed).
    pub field: Field,
    /// The operator.
    pub op: CmpOp,
    /// What the field is compared with.
    pub operand: Operand,
}

/// What a comparison looks at in an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Field {
    /// `_id`: the primary key.
    Id,
    /// A field by name.
    Named(String),
}

impl Field {
    /// The name as used in queries and rules: `_id` for the primary key.
    pub fn name(&self) -> &str {
        match self {
            Field::Id => "_id",
            Field::Named(n) => n,
        }
    }
}

impl CmpOp {
    /// Whether `lhs op rhs` holds, by the rules of [`compare`].
    pub fn holds(self, lhs: &Value, rhs: &Value) -> bool {
        match self {
            CmpOp::Eq | CmpOp::Ne | CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge => {
                self.holds_for(compare(lhs, rhs))
            }
            CmpOp::BeginsWith => match (lhs, rhs) {
                (Value::String(a), Value::String(b)) => a.starts_with(b.as_str()),
                (Value::Bytes(a), Value::Bytes(b)) => a.starts_with(b),
                _ => false,
            },
            CmpOp::EndsWith => match (lhs, rhs) {
                (Value::String(a), Value::String(b)) => a.ends_with(b.as_str()),
                (Value::Bytes(a), Value::Bytes(b)) => a.ends_with(b),
                _ => false,
            },
            CmpOp::Contains => match (lhs, rhs) {
                (Value::String(a), Value::String(b)) => a.contains(b.as_str()),
                (Value::Bytes(a), Value::Bytes(b)) => {
                    b.is_empty() || a.windows(b.len()).any(|w| w == b.as_slice())
                }
                _ => false,
            },
        }
    }
}

/// The right-hand side of a comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operand {
    /// A literal value.
    Value(Value),
    /// A parameter, replaced by a value in [`Query::bind`].
    Param(Param),
}

/// A query parameter.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Param {
    /// `$0`, `$1`, …
    Index(u32),
    /// `$user`, `$name`, … (the name without the `$`).
    Named(String),
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Param::Index(i) => write!(f, "${i}"),
            Param::Named(n) => write!(f, "${n}"),
        }
    }
}

/// Values for a query's parameters: positional (`$0`, `$1`, …) and named (`$user`).
///
/// ```
/// use fieldlog::rules::Params;
/// let p = Params::new().arg(4).named("user", "alice");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Params {
    positional: Vec<Value>,
    named: BTreeMap<String, Value>,
}

impl Params {
    /// No parameters.
    pub fn new() -> Self {
        Params::default()
    }

    /// Adds the next positional parameter (`$0` first).
    pub fn arg(mut self, value: impl Into<Value>) -> Self {
        self.positional.push(value.into());
        self
    }

    /// Sets a named parameter; `name` is written without the `$`.
    pub fn named(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.named.insert(name.into(), value.into());
        self
    }

    /// The value of a parameter, if given.
    pub fn get(&self, param: &Param) -> Option<&Value> {
        match param {
            Param::Index(i) => usize::try_from(*i)
                .ok()
                .and_then(|i| self.positional.get(i)),
            Param::Named(n) => self.named.get(n),
        }
    }
}

impl Query {
    /// The fields the query reads, `_id` included when it compares the primary key.
    pub fn fields(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        self.visit(&mut |c| {
            out.insert(c.field.name().to_owned());
        });
        out
    }

    /// The parameters the query uses.
    pub fn params(&self) -> BTreeSet<Param> {
        let mut out = BTreeSet::new();
        self.visit(&mut |c| {
            if let Operand::Param(p) = &c.operand {
                out.insert(p.clone());
            }
        });
        out
    }

    fn visit(&self, f: &mut impl FnMut(&Comparison)) {
        match self {
            Query::True | Query::False => {}
            Query::Cmp(c) => f(c),
            Query::Not(q) => q.visit(f),
            Query::And(a, b) | Query::Or(a, b) => {
                a.visit(f);
                b.visit(f);
            }
        }
    }

    /// Checks the query against a collection's schema: every field it uses must be declared
    /// queryable (`_id` always may be used). Without a schema every field may be used.
    pub fn check(&self, schema: Option<&Schema>) -> Result<(), QueryError> {
        let Some(schema) = schema else {
            return Ok(());
        };
        let mut err = None;
        self.visit(&mut |c| {
            if let Field::Named(name) = &c.field {
                if err.is_none() && !schema.is_queryable(name) {
                    err = Some(QueryError::NotQueryable {
                        field: name.clone(),
                        collection: schema.collection.clone(),
                    });
                }
            }
        });
        err.map_or(Ok(()), Err)
    }

    /// Replaces every parameter by its value. Fails naming the first parameter without a
    /// value, or one whose value cannot be used with its string operator.
    pub fn bind(&self, params: &Params) -> Result<BoundQuery, QueryError> {
        self.bind_inner(params).map(BoundQuery)
    }

    fn bind_inner(&self, params: &Params) -> Result<Query, QueryError> {
        Ok(match self {
            Query::True => Query::True,
            Query::False => Query::False,
            Query::Cmp(c) => {
                let value = match &c.operand {
                    Operand::Value(v) => v.clone(),
                    Operand::Param(p) => {
                        let v = params.get(p).ok_or_else(|| QueryError::MissingParam {
                            param: p.to_string(),
                        })?;
                        if c.op.is_string_op() && !is_text(v) {
                            return Err(QueryError::BadParam {
                                param: p.to_string(),
                                op: c.op,
                                found: v.type_name(),
                            });
                        }
                        v.clone()
                    }
                };
                Query::Cmp(Comparison {
                    field: c.field.clone(),
                    op: c.op,
                    operand: Operand::Value(value),
                })
            }
            Query::Not(q) => Query::Not(Box::new(q.bind_inner(params)?)),
            Query::And(a, b) => Query::And(
                Box::new(a.bind_inner(params)?),
                Box::new(b.bind_inner(params)?),
            ),
            Query::Or(a, b) => Query::Or(
                Box::new(a.bind_inner(params)?),
                Box::new(b.bind_inner(params)?),
            ),
        })
    }

    /// Binding strength, for printing the fewest parentheses that keep the tree.
    fn precedence(&self) -> u8 {
        match self {
            Query::Or(..) => 1,
            Query::And(..) => 2,
            Query::True | Query::False | Query::Cmp(_) | Query::Not(_) => 3,
        }
    }
}

pub(super) fn is_text(v: &Value) -> bool {
    matches!(v, Value::String(_) | Value::Bytes(_))
}

impl FromStr for Query {
    type Err = QueryError;
    fn from_str(s: &str) -> Result<Query, QueryError> {
        parse(s)
    }
}

/// A query whose parameters all have values; evaluate it with [`BoundQuery::matches`].
/// `Display` writes it as a query without parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundQuery(Query);

impl BoundQuery {
    /// Whether the object with primary key `pk` and these fields is in the query's view.
    pub fn matches(&self, pk: &Pk, fields: &BTreeMap<String, Value>) -> bool {
        eval(&self.0, pk, fields)
    }

    /// The query with every parameter replaced by its value.
    pub fn query(&self) -> &Query {
        &self.0
    }
}

impl fmt::Display for BoundQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

static NULL: Value = Value::Null;

fn eval(q: &Query, pk: &Pk, fields: &BTreeMap<String, Value>) -> bool {
    match q {
        Query::True => true,
        Query::False => false,
        Query::Not(q) => !eval(q, pk, fields),
        Query::And(a, b) => eval(a, pk, fields) && eval(b, pk, fields),
        Query::Or(a, b) => eval(a, pk, fields) || eval(b, pk, fields),
        Query::Cmp(c) => {
            // A BoundQuery has no parameters left; an unbound one never matches.
            let Operand::Value(rhs) = &c.operand else {
                return false;
            };
            let lhs: Cow<'_, Value> = match &c.field {
                Field::Id => Cow::Owned(pk_value(pk)),
                Field::Named(n) => Cow::Borrowed(fields.get(n).unwrap_or(&NULL)),
            };
            c.op.holds(&lhs, rhs)
        }
    }
}

/// The primary key as a value: `Pk::Int` → `Int`, `Pk::Str` → `String`, the 12- and 16-byte
/// ids → `Bytes`.
pub fn pk_value(pk: &Pk) -> Value {
    match pk {
        Pk::Int(i) => Value::Int(*i),
        Pk::Str(s) => Value::String(s.clone()),
        Pk::Id12(b) => Value::Bytes(b.to_vec()),
        Pk::Id16(b) => Value::Bytes(b.to_vec()),
    }
}

/// How queries and permission filters compare two values; `None` when they are of
/// different kinds and so not comparable (then `==`, `<`, … are false and `!=` is true).
///
/// - `null` equals `null` only (a missing field is `null`).
/// - bools: `false < true`.
/// - ints and floats compare with each other by exact mathematical value (`1 == 1.0`,
///   `0 == -0.0`, `2^53 + 1 > 2.0^53`).
/// - two floats compare by `f64::total_cmp`, the order [`Value`] uses: equality is on the
///   bits (`NaN == NaN`, `-0.0 != 0.0`, `-0.0 < 0.0`) and NaN sorts above `inf` (a NaN with
///   the sign bit set below `-inf`); an int against a NaN follows the same order.
/// - strings and bytes compare bytewise.
pub fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Null, Value::Null) => Some(Ordering::Equal),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        (Value::Int(x), Value::Int(y)) => Some(x.cmp(y)),
        (Value::Float(x), Value::Float(y)) => Some(x.total_cmp(y)),
        (Value::Int(x), Value::Float(y)) => Some(cmp_int_float(*x, *y)),
        (Value::Float(x), Value::Int(y)) => Some(cmp_int_float(*y, *x).reverse()),
        (Value::String(x), Value::String(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        (Value::Bytes(x), Value::Bytes(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Compares an int with a float exactly (no rounding of the int to a float).
fn cmp_int_float(i: i64, f: f64) -> Ordering {
    if f.is_nan() {
        return if f.is_sign_negative() {
            Ordering::Greater
        } else {
            Ordering::Less
        };
    }
    // 2^63 is exactly representable; every float at or above it exceeds every i64, and
    // every float below -2^63 is below every i64.
    const TWO_63: f64 = 9_223_372_036_854_775_808.0;
    if f >= TWO_63 {
        return Ordering::Less;
    }
    if f < -TWO_63 {
        return Ordering::Greater;
    }
    let t = f.trunc();
    // In range and integral, so the cast is exact.
    let ti = t as i64;
    match i.cmp(&ti) {
        Ordering::Equal => {
            if f > t {
                Ordering::Less
            } else if f < t {
                Ordering::Greater
            } else {
                Ordering::Equal
            }
        }
        o => o,
    }
}

// ---------------------------------------------------------------------------------------
// Printing

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Query::True => f.write_str("TRUEPREDICATE"),
            Query::False => f.write_str("FALSEPREDICATE"),
            Query::Cmp(c) => {
                write_field(f, &c.field)?;
                write!(f, " {} ", c.op)?;
                match &c.operand {
                    Operand::Value(v) => write_literal(f, v),
                    Operand::Param(p) => write!(f, "{p}"),
                }
            }
            Query::Not(q) => {
                f.write_str("NOT ")?;
                write_child(f, q, q.precedence() < 3)
            }
            Query::And(a, b) => {
                write_child(f, a, a.precedence() < 2)?;
                f.write_str(" AND ")?;
                write_child(f, b, b.precedence() <= 2)
            }
            Query::Or(a, b) => {
                write_child(f, a, a.precedence() < 1)?;
                f.write_str(" OR ")?;
                write_child(f, b, b.precedence() <= 1)
            }
        }
    }
}

fn write_child(f: &mut fmt::Formatter<'_>, q: &Query, parens: bool) -> fmt::Result {
    if parens {
        write!(f, "({q})")
    } else {
        write!(f, "{q}")
    }
}

fn write_field(f: &mut fmt::Formatter<'_>, field: &Field) -> fmt::Result {
    match field {
        Field::Id => f.write_str("_id"),
        Field::Named(n) if is_bare_name(n) => f.write_str(n),
        Field::Named(n) => write!(f, "`{n}`"),
    }
}

/// Whether a field name can be written without backticks.
fn is_bare_name(n: &str) -> bool {
    let mut bytes = n.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(is_name_byte)
        && keyword(n).is_none()
        && n != "_id"
}

pub(super) fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.'
}

/// Writes a value as a query literal that parses back to the same value, bit for bit.
fn write_literal(f: &mut impl fmt::Write, v: &Value) -> fmt::Result {
    match v {
        Value::Null => f.write_str("null"),
        Value::Bool(b) => write!(f, "{b}"),
        Value::Int(i) => write!(f, "{i}"),
        Value::Float(x) if x.is_nan() => {
            if x.to_bits() == CANONICAL_NAN_BITS {
                f.write_str("nan")
            } else {
                write!(f, "nan(0x{:016x})", x.to_bits())
            }
        }
        Value::Float(x) if x.is_infinite() => f.write_str(if *x > 0.0 { "inf" } else { "-inf" }),
        // Debug is the shortest text that reads back to the same bits, and always has a
        // `.` or an exponent, so it reads back as a float, not an int.
        Value::Float(x) => write!(f, "{x:?}"),
        Value::String(s) => {
            f.write_char('"')?;
            for c in s.chars() {
                match c {
                    '"' => f.write_str("\\\"")?,
                    '\\' => f.write_str("\\\\")?,
                    '\n' => f.write_str("\\n")?,
                    '\r' => f.write_str("\\r")?,
                    '\t' => f.write_str("\\t")?,
                    c if c.is_control() => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                    c => f.write_char(c)?,
                }
            }
            f.write_char('"')
        }
        Value::Bytes(b) => {
            f.write_str("0x")?;
            b.iter().try_for_each(|x| write!(f, "{x:02x}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    fn eval_str(q: &str, fields: &[(&str, Value)]) -> bool {
        parse(q)
            .unwrap()
            .bind(&Params::new())
            .unwrap()
            .matches(&Pk::Int(1), &obj(fields))
    }

    #[test]
    fn precedence_not_and_or() {
        let q = parse("NOT a == 1 AND b == 2 OR c == 3").unwrap();
        assert_eq!(q.to_string(), "NOT a == 1 AND b == 2 OR c == 3");
        let Query::Or(l, _) = &q else { panic!() };
        let Query::And(n, _) = &**l else { panic!() };
        assert!(matches!(**n, Query::Not(_)));
        assert_eq!(
            parse("a == 1 AND (b == 2 OR c == 3)").unwrap().to_string(),
            "a == 1 AND (b == 2 OR c == 3)"
        );
        assert_eq!(
            parse("a == 1 OR (b == 2 OR c == 3)").unwrap().to_string(),
            "a == 1 OR (b == 2 OR c == 3)"
        );
        assert_eq!(
            parse("((a == 1) OR b == 2) OR c == 3").unwrap().to_string(),
            "a == 1 OR b == 2 OR c == 3"
        );
    }

    #[test]
    fn literals() {
        let cases = [
            ("x == null", Value::Null),
            ("x == TRUE", Value::Bool(true)),
            ("x == -9223372036854775808", Value::Int(i64::MIN)),
            ("x == +7", Value::Int(7)),
            ("x == 1.5", Value::Float(1.5)),
            ("x == -2e3", Value::Float(-2000.0)),
            ("x == -inf", Value::Float(f64::NEG_INFINITY)),
            (
                "x == \"a\\\"b\\\\c\\n\\u{1F600}\"",
                Value::from("a\"b\\c\n😀"),
            ),
            ("x == 'a\\'b'", Value::from("a'b")),
            ("x == 0x00fF", Value::Bytes(vec![0, 255])),
            ("x == 0x", Value::Bytes(vec![])),
        ];
        for (text, want) in cases {
            let q = parse(text).unwrap();
            let Query::Cmp(c) = &q else { panic!() };
            assert_eq!(c.operand, Operand::Value(want), "{text}");
            assert_eq!(parse(&q.to_string()).unwrap(), q, "{text}");
        }
    }

    #[test]
    fn nan_literals_keep_their_bits() {
        let odd = f64::from_bits(0xfff8_0000_0000_0001);
        let q = Query::Cmp(Comparison {
            field: Field::Named("x".into()),
            op: CmpOp::Eq,
            operand: Operand::Value(Value::Float(odd)),
        });
        assert_eq!(q.to_string(), "x == nan(0xfff8000000000001)");
        assert_eq!(parse(&q.to_string()).unwrap(), q);
        assert_eq!(parse("x == NaN").unwrap().to_string(), "x == nan");
        assert!(parse("x == nan(0x0000000000000001)").is_err());
    }

    #[test]
    fn int_float_exact() {
        assert_eq!(cmp_int_float(1, 1.0), Ordering::Equal);
        assert_eq!(cmp_int_float(0, -0.0), Ordering::Equal);
        assert_eq!(
            cmp_int_float((1 << 53) + 1, 9007199254740992.0),
            Ordering::Greater
        );
        assert_eq!(cmp_int_float(i64::MAX, 2f64.powi(63)), Ordering::Less);
        assert_eq!(cmp_int_float(i64::MIN, -(2f64.powi(63))), Ordering::Equal);
        assert_eq!(cmp_int_float(-1, -1.5), Ordering::Greater);
        assert_eq!(cmp_int_float(-2, -1.5), Ordering::Less);
        assert_eq!(cmp_int_float(i64::MAX, f64::NAN), Ordering::Less);
        assert_eq!(cmp_int_float(i64::MIN, -f64::NAN), Ordering::Greater);
        assert_eq!(cmp_int_float(5, f64::INFINITY), Ordering::Less);
    }

    #[test]
    fn evaluation_basics() {
        assert!(eval_str("a == 1", &[("a", Value::Float(1.0))]));
        assert!(eval_str("a == null", &[]));
        assert!(eval_str("a != 1", &[]));
        assert!(!eval_str("a < 1", &[]));
        assert!(eval_str("_id == 1", &[]));
        assert!(eval_str(
            "name CONTAINS 'ell'",
            &[("name", Value::from("hello"))]
        ));
        assert!(eval_str(
            "b BEGINSWITH 0x01",
            &[("b", Value::Bytes(vec![1, 2]))]
        ));
        assert!(eval_str("b CONTAINS 0x", &[("b", Value::Bytes(vec![]))]));
        assert!(eval_str("TRUEPREDICATE", &[]));
        assert!(!eval_str("FALSEPREDICATE", &[]));
    }

    #[test]
    fn display_of_odd_names() {
        let q = Query::Cmp(Comparison {
            field: Field::Named("2nd".into()),
            op: CmpOp::Eq,
            operand: Operand::Param(Param::Named("user".into())),
        });
        assert_eq!(q.to_string(), "`2nd` == $user");
        assert_eq!(parse("`2nd` == $user").unwrap(), q);
        assert_eq!(parse("`and` == 1").unwrap().to_string(), "`and` == 1");
    }
}
