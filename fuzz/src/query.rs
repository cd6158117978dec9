//! `query`: the query language (invariant 6, and the documented print ↔ parse contract).
//!
//! The first byte picks how the rest is read: as query text (parsed as is), or as a query
//! tree built in code (printed, then parsed). For every query that parses:
//! - printing it and parsing the text gives the same query, and printing that gives the
//!   same text (a server may store either form);
//! - `check` against a schema refuses exactly the non-queryable fields;
//! - `bind` refuses exactly missing parameters and non-text parameters of string operators;
//! - on objects built from the input: `NOT q` matches exactly where `q` does not; the bound
//!   query prints and parses back to a query that matches the same objects; `!=` is
//!   exactly `NOT ==`; the ordering operators agree with `compare`, which is antisymmetric.

use std::collections::BTreeMap;

use fieldlog::rules::{
    compare, parse, pk_value, CmpOp, Comparison, Field, Operand, Param, Params, Query, QueryError,
    QUERY_LEN_MAX,
};
use fieldlog::{FieldSpec, FieldType, Pk, Schema, Value};

use super::input::Input;

const OPS: [CmpOp; 9] = [
    CmpOp::Eq,
    CmpOp::Ne,
    CmpOp::Lt,
    CmpOp::Le,
    CmpOp::Gt,
    CmpOp::Ge,
    CmpOp::BeginsWith,
    CmpOp::EndsWith,
    CmpOp::Contains,
];

/// Field names a generated query uses: bare, keyword-like, ones that need backticks.
const NAMES: [&str; 10] = [
    "status", "n", "a.b", "x-y", "_under", "not", "AND", "2nd", "nan", "inf",
];

/// Named parameters a generated query uses.
const PARAMS: [&str; 3] = ["user", "n", "_x"];

/// Runs the query checks on `data`.
pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let query = if mode.is_multiple_of(4) {
        // A tree built in code; it must print as text that parses back to it.
        let q = gen_query(&mut input, 0);
        let text = q.to_string();
        match parse(&text) {
            Ok(back) => assert_eq!(
                back, q,
                "a built query printed as {text:?} parses differently"
            ),
            Err(QueryError::TooLong { .. } | QueryError::CanonicalTooLong { .. }) => return,
            Err(e) => panic!("a built query printed as {text:?} does not parse: {e}"),
        }
        q
    } else {
        let len = usize::from(input.u16()) % (QUERY_LEN_MAX + 64);
        let text = String::from_utf8_lossy(input.take(len)).into_owned();
        match parse(&text) {
            Ok(q) => q,
            Err(_) => return,
        }
    };
    check_parsed(&query, &mut input);
}

fn check_parsed(q: &Query, input: &mut Input<'_>) {
    // Print → parse round trip.
    let text = q.to_string();
    assert!(
        text.len() <= QUERY_LEN_MAX,
        "canonical form over the limit was accepted"
    );
    let back = parse(&text).unwrap_or_else(|e| panic!("canonical {text:?} does not parse: {e}"));
    assert_eq!(&back, q, "canonical {text:?} parses to another query");
    assert_eq!(back.to_string(), text, "printing is not stable");

    // check: refuses exactly the non-queryable named fields.
    assert_eq!(q.check(None), Ok(()));
    let mut schema = Schema::new("C");
    let mut refused = false;
    for f in q.fields() {
        if f == "_id" {
            continue;
        }
        let queryable = !input.u8().is_multiple_of(4);
        refused |= !queryable;
        let spec = FieldSpec::optional(FieldType::Any);
        schema = schema.field(f, if queryable { spec.queryable() } else { spec });
    }
    match q.check(Some(&schema)) {
        Ok(()) => assert!(!refused, "a non-queryable field was accepted"),
        Err(QueryError::NotQueryable { .. }) => assert!(refused, "a queryable field was refused"),
        Err(e) => panic!("check failed with {e:?}"),
    }

    // bind: parameters from the input, some missing.
    let mut params = Params::new();
    let mut positional = Vec::new();
    let mut missing = false;
    let wanted = q.params();
    let max_index = wanted
        .iter()
        .filter_map(|p| match p {
            Param::Index(i) => Some(*i),
            Param::Named(_) => None,
        })
        .max();
    if let Some(max) = max_index.filter(|&m| m < 16) {
        for _ in 0..=max {
            positional.push(param_value(input));
        }
    }
    for v in &positional {
        params = params.arg(v.clone());
    }
    for p in &wanted {
        match p {
            Param::Index(i) => missing |= *i as usize >= positional.len(),
            Param::Named(n) => {
                if input.one_in(6) {
                    missing = true;
                } else {
                    params = params.named(n.clone(), param_value(input));
                }
            }
        }
    }
    let bound = match q.bind(&params) {
        Ok(b) => b,
        Err(QueryError::MissingParam { .. }) => {
            assert!(missing, "bind reported a missing parameter that was given");
            return;
        }
        Err(QueryError::BadParam { .. }) => return,
        Err(e) => panic!("bind failed with {e:?}"),
    };
    assert!(!missing, "bind succeeded without every parameter");
    let negated = Query::Not(Box::new(q.clone()))
        .bind(&params)
        .expect("NOT q binds when q does");
    // The bound query prints as a query without parameters that means the same.
    let reparsed = match parse(&bound.to_string()) {
        Ok(r) => Some(r.bind(&Params::new()).expect("no parameters left")),
        Err(QueryError::TooLong { .. } | QueryError::CanonicalTooLong { .. }) => None,
        Err(e) => panic!("bound query {bound} does not parse: {e}"),
    };
    if let Some(r) = &reparsed {
        assert_eq!(r.query(), bound.query(), "bound query does not round-trip");
    }

    let mut literals = Vec::new();
    collect_literals(bound.query(), &mut literals);
    for _ in 0..1 + input.below(4) {
        let (pk, fields) = object(input, q, &literals);
        let m = bound.matches(&pk, &fields);
        assert_eq!(negated.matches(&pk, &fields), !m, "NOT q does not negate q");
        if let Some(r) = &reparsed {
            assert_eq!(
                r.matches(&pk, &fields),
                m,
                "reparsed bound query matches differently"
            );
        }
        check_comparisons(bound.query(), &pk, &fields);
    }
    // The operators on values straight from the input.
    let (a, b) = (input.value(), input.value());
    check_values(&a, &b);
}

fn param_value(input: &mut Input<'_>) -> Value {
    if input.bool() {
        Value::String(input.short_string(6))
    } else {
        input.value()
    }
}

/// Every value literal in a query (used to build objects that match some comparisons).
fn collect_literals(q: &Query, out: &mut Vec<Value>) {
    match q {
        Query::True | Query::False => {}
        Query::Cmp(c) => {
            if let Operand::Value(v) = &c.operand {
                out.push(v.clone());
            }
        }
        Query::Not(a) => collect_literals(a, out),
        Query::And(a, b) | Query::Or(a, b) => {
            collect_literals(a, out);
            collect_literals(b, out);
        }
    }
}

/// An object whose fields are the query's fields (some missing), with values from the input
/// or from the query's own literals.
fn object(input: &mut Input<'_>, q: &Query, literals: &[Value]) -> (Pk, BTreeMap<String, Value>) {
    let pk = if !literals.is_empty() && input.one_in(3) {
        match input.choose(literals) {
            Value::Int(i) => Pk::Int(*i),
            Value::String(s) => Pk::Str(s.clone()),
            _ => input.pk(),
        }
    } else {
        input.pk()
    };
    let mut fields = BTreeMap::new();
    for f in q.fields() {
        if f == "_id" || input.one_in(5) {
            continue;
        }
        let v = if !literals.is_empty() && input.bool() {
            input.choose(literals).clone()
        } else {
            input.value()
        };
        fields.insert(f, v);
    }
    (pk, fields)
}

/// For every comparison in the bound query: `!=` is `NOT ==`, and the ordering operators
/// agree with `compare`.
fn check_comparisons(q: &Query, pk: &Pk, fields: &BTreeMap<String, Value>) {
    match q {
        Query::True | Query::False => {}
        Query::Not(a) => check_comparisons(a, pk, fields),
        Query::And(a, b) | Query::Or(a, b) => {
            check_comparisons(a, pk, fields);
            check_comparisons(b, pk, fields);
        }
        Query::Cmp(Comparison { field, operand, .. }) => {
            let Operand::Value(rhs) = operand else {
                panic!("a bound query kept a parameter");
            };
            let lhs = match field {
                Field::Id => pk_value(pk),
                Field::Named(n) => fields.get(n).cloned().unwrap_or(Value::Null),
            };
            check_values(&lhs, rhs);
        }
    }
}

fn check_values(a: &Value, b: &Value) {
    let ab = compare(a, b);
    assert_eq!(
        ab.map(|o| o.reverse()),
        compare(b, a),
        "compare is not antisymmetric"
    );
    if matches!((a, b), (Value::Float(x), Value::Float(y)) if x.to_bits() == y.to_bits()) {
        assert_eq!(
            ab,
            Some(std::cmp::Ordering::Equal),
            "a float differs from itself"
        );
    }
    assert_eq!(
        CmpOp::Ne.holds(a, b),
        !CmpOp::Eq.holds(a, b),
        "!= is not NOT =="
    );
    let expect = |op: CmpOp| match op {
        CmpOp::Eq => ab == Some(std::cmp::Ordering::Equal),
        CmpOp::Ne => ab != Some(std::cmp::Ordering::Equal),
        CmpOp::Lt => ab == Some(std::cmp::Ordering::Less),
        CmpOp::Le => ab.is_some_and(|o| o.is_le()),
        CmpOp::Gt => ab == Some(std::cmp::Ordering::Greater),
        CmpOp::Ge => ab.is_some_and(|o| o.is_ge()),
        _ => unreachable!(),
    };
    for op in &OPS[..6] {
        assert_eq!(
            op.holds(a, b),
            expect(*op),
            "{op} disagrees with compare on {a:?}, {b:?}"
        );
    }
}

/// A query tree from the input, within the documented conditions for printing back:
/// names from [`NAMES`], string operators with string or bytes operands.
fn gen_query(input: &mut Input<'_>, depth: usize) -> Query {
    let leaf = depth >= 5 || input.is_empty();
    match if leaf { input.u8() % 3 } else { input.u8() % 7 } {
        0 => Query::True,
        1 => Query::False,
        2 => Query::Cmp(gen_cmp(input)),
        3 => Query::Not(Box::new(gen_query(input, depth + 1))),
        4 => Query::And(
            Box::new(gen_query(input, depth + 1)),
            Box::new(gen_query(input, depth + 1)),
        ),
        5 => Query::Or(
            Box::new(gen_query(input, depth + 1)),
            Box::new(gen_query(input, depth + 1)),
        ),
        _ => Query::Cmp(gen_cmp(input)),
    }
}

fn gen_cmp(input: &mut Input<'_>) -> Comparison {
    let field = if input.one_in(5) {
        Field::Id
    } else {
        Field::Named((*input.choose(&NAMES)).to_owned())
    };
    let op = *input.choose(&OPS);
    let operand = if input.one_in(4) {
        Operand::Param(if input.bool() {
            Param::Index(if input.one_in(8) {
                u32::MAX
            } else {
                u32::from(input.u8() % 3)
            })
        } else {
            Param::Named((*input.choose(&PARAMS)).to_owned())
        })
    } else if matches!(op, CmpOp::BeginsWith | CmpOp::EndsWith | CmpOp::Contains) {
        if input.bool() {
            Operand::Value(Value::String(input.short_string(8)))
        } else {
            Operand::Value(Value::Bytes(input.bytes(8).to_vec()))
        }
    } else {
        Operand::Value(input.value())
    };
    Comparison { field, op, operand }
}
