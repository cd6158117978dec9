//! Rules: the query language (parse errors, schema checks, evaluation, printing) and the
//! permissions file (loading, validation errors, role evaluation), with property tests
//! that no input panics and that printing a query parses back to the same query.

use std::collections::BTreeMap;

use fieldlog::rules::{
    load, parse, Action, CmpOp, Comparison, DenialKind, Field, Operand, Param, Params, Query,
    QueryError, RoleFlags, RulesError, User, QUERY_DEPTH_MAX, QUERY_LEN_MAX,
};
use fieldlog::{FieldSpec, FieldType, Pk, Schema, Value};
use proptest::prelude::*;

fn obj(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// Whether `query` (without parameters) matches the object `pk` + `fields`.
fn hits(query: &str, pk: impl Into<Pk>, fields: &[(&str, Value)]) -> bool {
    parse(query)
        .unwrap_or_else(|e| panic!("{query}: {e}"))
        .bind(&Params::new())
        .unwrap()
        .matches(&pk.into(), &obj(fields))
}

// ---------------------------------------------------------------------------------------
// Query: parsing

#[test]
fn parse_errors_name_the_position_and_what_was_expected() {
    // (query, byte position, text the message must contain)
    let cases: &[(&str, usize, &str)] = &[
        (
            "",
            0,
            "expected a comparison, `(` or `NOT`, found end of input",
        ),
        (
            "complexity <=",
            13,
            "expected a value or parameter after `<=`, found end of input",
        ),
        (
            "complexity <= 4 AND",
            19,
            "expected a comparison, `(` or `NOT`, found end of input",
        ),
        (
            "a == 1 b == 2",
            7,
            "expected `AND`, `OR` or end of input, found `b`",
        ),
        (
            "(a == 1",
            7,
            "expected `)` to close the `(` at 0, found end of input",
        ),
        (
            "a == 1)",
            6,
            "expected `AND`, `OR` or end of input, found `)`",
        ),
        (
            "a 1",
            2,
            "expected a comparison operator after `a`, found `1`",
        ),
        (
            "a == b",
            5,
            "expected a value or parameter after `==`, found `b`",
        ),
        ("1 == 2", 5, "expected a field after `==`, found `2`"),
        (
            "'x' BEGINSWITH name",
            4,
            "`BEGINSWITH` needs the field on its left",
        ),
        (
            "name CONTAINS 5",
            14,
            "`CONTAINS` needs a string or bytes value, found int",
        ),
        (
            "a == \"abc",
            9,
            "expected a closing \" for the string at 5, found end of input",
        ),
        ("a == 'x\\q'", 7, "unknown escape `\\q`"),
        ("a == '\\u{110000}'", 6, "is not a character"),
        ("a == '\\u{zz}'", 6, "expected `\\u{` 1 to 6 hex digits `}`"),
        ("a == 99999999999999999999", 5, "out of range for i64"),
        ("a == 12ab", 5, "bad number `12ab`"),
        ("a == 1.", 7, "expected a digit after `.`"),
        ("a == 1e", 7, "expected a digit in the exponent"),
        ("a == -x", 5, "expected a digit after the sign"),
        ("a == 0xabc", 5, "even number of hex digits"),
        ("a == $", 5, "expected a parameter number or name after `$`"),
        ("a == $99999999999", 5, "parameter number out of range"),
        ("a == nan(0x1)", 8, "after `nan`"),
        ("a & b", 2, "unexpected character '&'"),
        ("a == 1 @", 7, "unexpected character '@'"),
        ("é == 1", 0, "unexpected character 'é'"),
        ("`a b` == 1", 0, "a field name is 1 to 64 ASCII letters"),
        ("`unclosed == 1", 0, "unterminated"),
        (
            "a == 1 AND NOT",
            14,
            "expected a comparison, `(` or `NOT`, found end of input",
        ),
        ("a ==", 4, "found end of input"),
        ("==", 0, "expected a comparison, `(` or `NOT`, found `==`"),
        ("a == 1 OR OR b == 2", 10, "found `OR`"),
    ];
    for &(text, pos, msg) in cases {
        let err = parse(text).expect_err(text);
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("at {pos}: ")),
            "{text:?}: {shown}"
        );
        assert!(shown.contains(msg), "{text:?}: {shown}");
    }
}

#[test]
fn limits_are_errors_not_crashes() {
    let long = format!("a == '{}'", "x".repeat(QUERY_LEN_MAX));
    assert!(matches!(parse(&long), Err(QueryError::TooLong { .. })));

    let deep = format!("{}a == 1{}", "(".repeat(10_000), ")".repeat(10_000));
    assert!(matches!(
        parse(&deep[..QUERY_LEN_MAX]),
        Err(QueryError::TooLong { .. }) | Err(QueryError::TooDeep { .. })
    ));
    let deep = format!("{}a == 1{}", "(".repeat(40), ")".repeat(40));
    assert!(
        matches!(parse(&deep), Err(QueryError::TooDeep { pos: 32, .. })),
        "{:?}",
        parse(&deep)
    );
    let nots = format!("{}a == 1", "NOT ".repeat(1000));
    assert!(matches!(
        parse(&nots),
        Err(QueryError::TooDeep { pos: 128, .. })
    ));
    assert!(matches!(
        parse(&format!("{}a == 1", "!".repeat(QUERY_DEPTH_MAX + 1))),
        Err(QueryError::TooDeep { .. })
    ));
    let ok = format!(
        "{}a == 1{}",
        "(".repeat(QUERY_DEPTH_MAX),
        ")".repeat(QUERY_DEPTH_MAX)
    );
    assert!(parse(&ok).is_ok());

    // A chain that fits as written but not in canonical form (`a < 1 AND …`) is refused,
    // so that every parsed query prints to text that parses.
    let chain = vec!["a<1"; QUERY_LEN_MAX / 6].join("&&");
    assert!(matches!(
        parse(&chain),
        Err(QueryError::CanonicalTooLong { .. })
    ));
    // The longest chain that fits is fine to parse, print, evaluate and drop.
    let chain = vec!["a<1"; (QUERY_LEN_MAX + 5) / 10].join("&&");
    let q = parse(&chain).unwrap();
    assert!(q.to_string().len() > QUERY_LEN_MAX - 10);
    assert_eq!(parse(&q.to_string()).unwrap(), q);
    let b = q.bind(&Params::new()).unwrap();
    assert!(b.matches(&Pk::Int(1), &obj(&[("a", Value::Int(0))])));
}

#[test]
fn keywords_aliases_and_either_side() {
    let pairs = [
        (
            "a == 1 and b = 2 or not c <> 3",
            "a == 1 AND b == 2 OR NOT c != 3",
        ),
        (
            "a == 1 && b == 2 || !(c == 3)",
            "a == 1 AND b == 2 OR NOT c == 3",
        ),
        ("4 >= complexity", "complexity <= 4"),
        ("4 < complexity", "complexity > 4"),
        ("'x' == name", "name == \"x\""),
        ("$0 != _id", "_id != $0"),
        (
            "name beginsWith 'a' AND name EndsWith 'z' AND name contains \"m\"",
            "name BEGINSWITH \"a\" AND name ENDSWITH \"z\" AND name CONTAINS \"m\"",
        ),
        (
            "truepredicate OR FalsePredicate",
            "TRUEPREDICATE OR FALSEPREDICATE",
        ),
        ("`and` == NULL", "`and` == null"),
        ("user.name-2 == 'x'", "user.name-2 == \"x\""),
        ("a == 0X0aFF", "a == 0x0aff"),
        ("a == 1E3", "a == 1000.0"),
        ("a == -0.0", "a == -0.0"),
        (
            "a == +inf OR a == -INF OR a == NaN",
            "a == inf OR a == -inf OR a == nan",
        ),
        ("_id == $user", "_id == $user"),
    ];
    for (text, canonical) in pairs {
        let q = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(q.to_string(), canonical, "{text}");
        assert_eq!(parse(canonical).unwrap(), q, "{text}");
    }
}

#[test]
fn fields_and_params_are_listed() {
    let q = parse("a == 1 AND (NOT b > $0 OR _id == $user) AND a < $1").unwrap();
    assert_eq!(
        q.fields().into_iter().collect::<Vec<_>>(),
        ["_id", "a", "b"]
    );
    assert_eq!(
        q.params().into_iter().collect::<Vec<_>>(),
        [
            Param::Index(0),
            Param::Index(1),
            Param::Named("user".into())
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Query: schema and parameters

fn item_schema() -> Schema {
    Schema::new("Item")
        .field(
            "complexity",
            FieldSpec::required(FieldType::Int).queryable(),
        )
        .field(
            "ownerId",
            FieldSpec::required(FieldType::String).queryable(),
        )
        .field("secret", FieldSpec::optional(FieldType::String))
}

#[test]
fn non_queryable_fields_are_refused() {
    let s = item_schema();
    assert!(parse("complexity <= 4 AND _id > 0")
        .unwrap()
        .check(Some(&s))
        .is_ok());
    let e = parse("complexity <= 4 OR secret == 'x'")
        .unwrap()
        .check(Some(&s))
        .unwrap_err();
    assert_eq!(e.to_string(), "field `secret` is not queryable in `Item`");
    let e = parse("NOT undeclared == 1")
        .unwrap()
        .check(Some(&s))
        .unwrap_err();
    assert!(matches!(e, QueryError::NotQueryable { ref field, .. } if field == "undeclared"));
    assert!(parse("secret == 'x'").unwrap().check(None).is_ok());
}

#[test]
fn parameters_bind_positionally_and_by_name() {
    let q = parse("status == $0 AND ownerId == $user AND n > $1").unwrap();
    let params = Params::new().arg("done").arg(2).named("user", "alice");
    let b = q.bind(&params).unwrap();
    assert_eq!(
        b.to_string(),
        r#"status == "done" AND ownerId == "alice" AND n > 2"#
    );
    let mine = obj(&[
        ("status", "done".into()),
        ("ownerId", "alice".into()),
        ("n", Value::Int(3)),
    ]);
    assert!(b.matches(&Pk::Int(1), &mine));
    let theirs = obj(&[
        ("status", "done".into()),
        ("ownerId", "bob".into()),
        ("n", Value::Int(3)),
    ]);
    assert!(!b.matches(&Pk::Int(1), &theirs));

    let e = q
        .bind(&Params::new().arg("done").named("user", "a"))
        .unwrap_err();
    assert_eq!(e.to_string(), "missing parameter `$1`");
    let e = q.bind(&Params::new().arg("done").arg(1)).unwrap_err();
    assert_eq!(e.to_string(), "missing parameter `$user`");

    let e = parse("name BEGINSWITH $0")
        .unwrap()
        .bind(&Params::new().arg(5))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "parameter `$0` is int; `BEGINSWITH` needs a string or bytes"
    );
}

// ---------------------------------------------------------------------------------------
// Query: evaluation

#[test]
fn missing_fields_compare_as_null() {
    let none: &[(&str, Value)] = &[];
    assert!(hits("a == null", 1, none));
    assert!(hits("a == null", 1, &[("a", Value::Null)]));
    assert!(!hits("a != null", 1, none));
    assert!(hits("a != null", 1, &[("a", Value::Int(0))]));
    assert!(hits("a != 1", 1, none));
    for op in ["<", "<=", ">", ">="] {
        assert!(!hits(&format!("a {op} 1"), 1, none), "{op}");
        assert!(!hits(&format!("a {op} 'x'"), 1, none), "{op}");
    }
    assert!(hits("a <= null AND a >= null", 1, none));
    assert!(!hits("a BEGINSWITH ''", 1, none));
}

#[test]
fn different_types_compare_false_except_not_equal() {
    let values = [
        Value::Null,
        Value::Bool(true),
        Value::Int(1),
        Value::from("1"),
        Value::Bytes(vec![1]),
    ];
    let literals = ["null", "true", "1", "'1'", "0x01"];
    for (i, v) in values.iter().enumerate() {
        for (j, lit) in literals.iter().enumerate() {
            let f = [("x", v.clone())];
            let same = i == j;
            assert_eq!(hits(&format!("x == {lit}"), 1, &f), same, "{v:?} == {lit}");
            assert_eq!(hits(&format!("x != {lit}"), 1, &f), !same, "{v:?} != {lit}");
            for op in ["<", ">"] {
                assert!(!hits(&format!("x {op} {lit}"), 1, &f), "{v:?} {op} {lit}");
            }
            assert_eq!(hits(&format!("x <= {lit}"), 1, &f), same, "{v:?} <= {lit}");
            assert_eq!(hits(&format!("x >= {lit}"), 1, &f), same, "{v:?} >= {lit}");
        }
    }
}

#[test]
fn ints_and_floats_compare_numerically() {
    let table: &[(Value, &str, bool)] = &[
        (Value::Int(1), "== 1.0", true),
        (Value::Float(1.0), "== 1", true),
        (Value::Float(1.5), "> 1", true),
        (Value::Float(1.5), "< 2", true),
        (Value::Int(2), "> 1.5", true),
        (Value::Int(-1), "> -1.5", true),
        (Value::Int(0), "== -0.0", true),
        (Value::Float(-0.0), "== 0", true),
        (
            Value::Int(9_007_199_254_740_993),
            "> 9007199254740992.0",
            true,
        ),
        (
            Value::Int(9_007_199_254_740_993),
            "!= 9007199254740992.0",
            true,
        ),
        (Value::Int(i64::MAX), "< 9223372036854775808.0", true),
        (Value::Int(i64::MAX), "< inf", true),
        (Value::Int(i64::MIN), "> -inf", true),
        (Value::Float(4.0), "<= 4", true),
        (Value::Float(4.000_000_1), "<= 4", false),
    ];
    for (v, cond, want) in table {
        assert_eq!(
            hits(&format!("x {cond}"), 1, &[("x", v.clone())]),
            *want,
            "{v:?} {cond}"
        );
    }
}

#[test]
fn nan_and_signed_zero_follow_the_bit_exact_total_order() {
    let nan = [("x", Value::Float(f64::NAN))];
    assert!(hits("x == nan", 1, &nan));
    assert!(!hits("x != nan", 1, &nan));
    assert!(!hits("x == 1.0", 1, &nan));
    assert!(hits("x != 1.0", 1, &nan));
    // NaN sorts above inf, as in Value's own order.
    assert!(hits("x > inf", 1, &nan));
    assert!(hits("x > 5", 1, &nan));
    assert!(!hits("x < 5", 1, &nan));
    let other_nan = [("x", Value::Float(f64::from_bits(0x7ff8_0000_0000_0001)))];
    assert!(!hits("x == nan", 1, &other_nan));
    assert!(hits("x == nan(0x7ff8000000000001)", 1, &other_nan));
    let neg_zero = [("x", Value::Float(-0.0))];
    assert!(!hits("x == 0.0", 1, &neg_zero));
    assert!(hits("x < 0.0", 1, &neg_zero));
    assert!(hits("x == -0.0", 1, &neg_zero));
}

#[test]
fn string_operators_are_case_sensitive_and_bytewise() {
    let f = [
        ("s", Value::from("Hello, World")),
        ("b", Value::Bytes(vec![1, 2, 3])),
    ];
    let table = [
        ("s BEGINSWITH 'Hello'", true),
        ("s BEGINSWITH 'hello'", false),
        ("s ENDSWITH 'World'", true),
        ("s CONTAINS ', W'", true),
        ("s CONTAINS 'world'", false),
        ("s CONTAINS ''", true),
        ("s BEGINSWITH 0x48", false),
        ("b BEGINSWITH 0x0102", true),
        ("b ENDSWITH 0x03", true),
        ("b CONTAINS 0x0203", true),
        ("b CONTAINS 0x0301", false),
        ("b BEGINSWITH 'x'", false),
        ("s > 'Hello'", true),
        ("s < 'hello'", true),
        ("b > 0x01", true),
        ("NOT s CONTAINS 'xyz'", true),
    ];
    for (q, want) in table {
        assert_eq!(hits(q, 1, &f), want, "{q}");
    }
}

#[test]
fn not_binds_tighter_than_and_tighter_than_or() {
    for bits in 0..8u8 {
        let (a, b, c) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0);
        let f = [
            ("a", Value::Bool(a)),
            ("b", Value::Bool(b)),
            ("c", Value::Bool(c)),
        ];
        let t = |q: &str| hits(q, 1, &f);
        assert_eq!(
            t("NOT a == true AND b == true OR c == true"),
            (!a && b) || c
        );
        assert_eq!(t("a == true OR b == true AND c == true"), a || (b && c));
        assert_eq!(
            t("NOT (a == true OR b == true) AND c == true"),
            !(a || b) && c
        );
        assert_eq!(t("!a == true || !b == true && c == true"), !a || (!b && c));
        assert_eq!(t("NOT NOT a == true"), a);
    }
}

#[test]
fn id_compares_the_primary_key() {
    assert!(hits("_id == 7", 7, &[]));
    assert!(hits("_id > 6 AND _id < 8.5", 7, &[]));
    assert!(hits("_id == 'k1'", "k1", &[]));
    assert!(hits("_id BEGINSWITH 'k'", "k1", &[]));
    assert!(hits(
        "_id == 0x0102030405060708090a0b0c",
        [1u8, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
        &[]
    ));
    assert!(!hits("_id == '7'", 7, &[]));
    // A field literally named `_id` does not shadow the key.
    assert!(!hits("_id == 1", 2, &[("_id", Value::Int(1))]));
}

// ---------------------------------------------------------------------------------------
// Query: properties

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z_][a-zA-Z0-9_.-]{0,10}",
        "[a-zA-Z0-9_.-]{1,12}",
        Just("and".to_owned()),
        Just("NOT".to_owned()),
        Just("nan".to_owned()),
        Just("TruePredicate".to_owned()),
    ]
    .prop_filter("_id is the key", |n| n != "_id")
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<f64>().prop_map(Value::Float),
        any::<u64>().prop_map(|b| Value::Float(f64::from_bits(b))),
        Just(Value::Float(f64::NAN)),
        any::<String>().prop_map(Value::String),
        "[\"'\\\\\n\t\r\u{0}\u{7f}a-z]{0,8}".prop_map(Value::String),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::Bytes),
    ]
}

fn text_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<String>().prop_map(Value::String),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::Bytes),
    ]
}

fn param() -> impl Strategy<Value = Param> {
    prop_oneof![
        any::<u32>().prop_map(Param::Index),
        "[a-zA-Z_][a-zA-Z0-9_]{0,8}".prop_map(Param::Named),
    ]
}

fn comparison() -> impl Strategy<Value = Query> {
    let field = prop_oneof![Just(Field::Id), field_name().prop_map(Field::Named)];
    let ordering_op = prop_oneof![
        Just(CmpOp::Eq),
        Just(CmpOp::Ne),
        Just(CmpOp::Lt),
        Just(CmpOp::Le),
        Just(CmpOp::Gt),
        Just(CmpOp::Ge),
    ];
    let string_op = prop_oneof![
        Just(CmpOp::BeginsWith),
        Just(CmpOp::EndsWith),
        Just(CmpOp::Contains),
    ];
    let operand = prop_oneof![
        value().prop_map(Operand::Value),
        param().prop_map(Operand::Param)
    ];
    let text_operand = prop_oneof![
        text_value().prop_map(Operand::Value),
        param().prop_map(Operand::Param)
    ];
    prop_oneof![
        (field.clone(), ordering_op, operand),
        (field, string_op, text_operand),
    ]
    .prop_map(|(field, op, operand)| Query::Cmp(Comparison { field, op, operand }))
}

fn query() -> impl Strategy<Value = Query> {
    let leaf = prop_oneof![
        6 => comparison(),
        1 => Just(Query::True),
        1 => Just(Query::False),
    ];
    leaf.prop_recursive(6, 48, 2, |inner| {
        prop_oneof![
            inner.clone().prop_map(|q| Query::Not(Box::new(q))),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Query::And(Box::new(a), Box::new(b))),
            (inner.clone(), inner).prop_map(|(a, b)| Query::Or(Box::new(a), Box::new(b))),
        ]
    })
}

/// Random choices for [`render`], drawn in turn from a fixed pool.
struct Style {
    choices: Vec<u8>,
    next: usize,
}

impl Style {
    fn pick(&mut self, n: usize) -> usize {
        let c = self.choices[self.next % self.choices.len()];
        self.next += 1;
        usize::from(c) % n
    }
    fn word(&mut self, upper: &str) -> String {
        match self.pick(3) {
            0 => upper.to_owned(),
            1 => upper.to_lowercase(),
            _ => upper
                .chars()
                .enumerate()
                .map(|(i, c)| {
                    if i % 2 == 0 {
                        c.to_ascii_lowercase()
                    } else {
                        c
                    }
                })
                .collect(),
        }
    }
    fn space(&mut self) -> &'static str {
        ["", " ", "  \t\n"][self.pick(3)]
    }
}

/// Writes `q` the way a person might: any keyword case, aliases (`&&`, `=`, `<>`, `!`),
/// value-first comparisons, redundant parentheses, single quotes, `+` signs, exponents.
fn render(q: &Query, st: &mut Style) -> String {
    let core = match q {
        Query::True => st.word("TRUEPREDICATE"),
        Query::False => st.word("FALSEPREDICATE"),
        Query::Cmp(c) => {
            let field = match &c.field {
                Field::Id => "_id".to_owned(),
                Field::Named(n) => {
                    let bare = Query::Cmp(Comparison {
                        field: c.field.clone(),
                        op: CmpOp::Eq,
                        operand: Operand::Value(Value::Null),
                    })
                    .to_string();
                    if bare.starts_with('`') || st.pick(4) == 0 {
                        format!("`{n}`")
                    } else {
                        n.clone()
                    }
                }
            };
            let operand = match &c.operand {
                Operand::Param(p) => p.to_string(),
                Operand::Value(v) => render_value(v, st),
            };
            let flipped = match c.op {
                CmpOp::Eq => Some(["==", "="][st.pick(2)]),
                CmpOp::Ne => Some(["!=", "<>"][st.pick(2)]),
                CmpOp::Lt => Some(">"),
                CmpOp::Le => Some(">="),
                CmpOp::Gt => Some("<"),
                CmpOp::Ge => Some("<="),
                _ => None,
            };
            let op = match c.op {
                CmpOp::Eq => ["==", "="][st.pick(2)].to_owned(),
                CmpOp::Ne => ["!=", "<>"][st.pick(2)].to_owned(),
                CmpOp::BeginsWith => format!(" {} ", st.word("BEGINSWITH")),
                CmpOp::EndsWith => format!(" {} ", st.word("ENDSWITH")),
                CmpOp::Contains => format!(" {} ", st.word("CONTAINS")),
                other => other.to_string(),
            };
            let (s1, s2) = (st.space(), st.space());
            match flipped {
                Some(f) if st.pick(2) == 0 => format!("{operand} {s1}{f}{s2} {field}"),
                _ => format!("{field} {s1}{op}{s2} {operand}"),
            }
        }
        Query::Not(inner) => {
            let child = render(inner, st);
            let child = if matches!(**inner, Query::And(..) | Query::Or(..)) {
                format!("({child})")
            } else {
                child
            };
            match st.pick(2) {
                0 => format!("{} {child}", st.word("NOT")),
                _ => format!("!{child}"),
            }
        }
        Query::And(a, b) | Query::Or(a, b) => {
            let and = matches!(q, Query::And(..));
            let (la, lb) = (render(a, st), render(b, st));
            let wrap_a = if and {
                matches!(**a, Query::Or(..))
            } else {
                false
            };
            let wrap_b = if and {
                matches!(**b, Query::And(..) | Query::Or(..))
            } else {
                matches!(**b, Query::Or(..))
            };
            let la = if wrap_a { format!("({la})") } else { la };
            let lb = if wrap_b { format!("({lb})") } else { lb };
            let op = match (and, st.pick(2)) {
                (true, 0) => format!(" {} ", st.word("AND")),
                (true, _) => "&&".to_owned(),
                (false, 0) => format!(" {} ", st.word("OR")),
                (false, _) => "||".to_owned(),
            };
            format!("{la}{op}{lb}")
        }
    };
    if st.pick(5) == 0 {
        format!("({}{core}{})", st.space(), st.space())
    } else {
        core
    }
}

fn render_value(v: &Value, st: &mut Style) -> String {
    match v {
        Value::Int(i) if *i >= 0 && st.pick(2) == 0 => format!("+{i}"),
        Value::Float(x) if x.is_finite() && st.pick(2) == 0 => format!("{x:e}"),
        Value::String(s) if st.pick(2) == 0 => {
            // Single quotes, and raw characters where the canonical form escapes them.
            let body: String = s
                .chars()
                .map(|c| match c {
                    '\'' => "\\'".to_owned(),
                    '\\' => "\\\\".to_owned(),
                    c => c.to_string(),
                })
                .collect();
            format!("'{body}'")
        }
        Value::Bytes(b) if st.pick(2) == 0 => {
            let hex: String = b.iter().map(|x| format!("{x:02X}")).collect();
            format!("0X{hex}")
        }
        Value::Null | Value::Bool(_) => {
            let s = Query::Cmp(Comparison {
                field: Field::Id,
                op: CmpOp::Eq,
                operand: Operand::Value(v.clone()),
            })
            .to_string();
            st.word(&s["_id == ".len()..].to_uppercase())
        }
        _ => {
            let s = Query::Cmp(Comparison {
                field: Field::Id,
                op: CmpOp::Eq,
                operand: Operand::Value(v.clone()),
            })
            .to_string();
            s["_id == ".len()..].to_owned()
        }
    }
}

/// Fragments that make random text reach deep into the grammar.
const PIECES: &[&str] = &[
    "a",
    "_id",
    "`x`",
    " ",
    "(",
    ")",
    "==",
    "!=",
    "<",
    "<=",
    ">=",
    "=",
    "!",
    " AND ",
    " or ",
    "NOT ",
    " BEGINSWITH ",
    " contains ",
    "&&",
    "||",
    "1",
    "-",
    "+",
    ".5",
    "e",
    "0x",
    "ff",
    "'",
    "\"",
    "\\",
    "\\u{",
    "}",
    "$",
    "$0",
    "$user",
    "nan",
    "nan(0x7ff8000000000001)",
    "inf",
    "null",
    "TRUEPREDICATE",
    "é",
];

fn query_soup() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        9 => proptest::sample::select(PIECES).prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
    ];
    proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics_on_random_text(s in any::<String>()) {
        let _ = parse(&s);
    }

    #[test]
    fn parse_never_panics_on_query_like_text(s in query_soup()) {
        // Whatever parses also prints to text that parses back to the same query.
        if let Ok(q) = parse(&s) {
            let printed = q.to_string();
            prop_assert_eq!(parse(&printed), Ok(q), "{:?} printed as {:?}", s, printed);
        }
    }

    #[test]
    fn any_spelling_of_a_query_parses_to_it(
        q in query(),
        choices in proptest::collection::vec(any::<u8>(), 1..64),
    ) {
        let text = render(&q, &mut Style { choices, next: 0 });
        if text.len() <= QUERY_LEN_MAX && q.to_string().len() <= QUERY_LEN_MAX {
            prop_assert_eq!(parse(&text), Ok(q), "written as {:?}", text);
        }
    }

    #[test]
    fn printing_a_query_parses_back_to_it(q in query()) {
        let printed = q.to_string();
        if printed.len() <= QUERY_LEN_MAX {
            prop_assert_eq!(parse(&printed), Ok(q), "printed as {:?}", printed);
        } else {
            let refused = matches!(parse(&printed), Err(QueryError::TooLong { .. }));
            prop_assert!(refused);
        }
    }

    #[test]
    fn not_equal_is_not_equal_and_orders_are_consistent(a in value(), b in value()) {
        let fields = obj(&[("x", a.clone())]);
        let pk = Pk::Int(0);
        let eval = |op: CmpOp| {
            Query::Cmp(Comparison { field: Field::Named("x".into()), op, operand: Operand::Value(b.clone()) })
                .bind(&Params::new())
                .unwrap()
                .matches(&pk, &fields)
        };
        let (eq, ne, lt, le, gt, ge) =
            (eval(CmpOp::Eq), eval(CmpOp::Ne), eval(CmpOp::Lt), eval(CmpOp::Le), eval(CmpOp::Gt), eval(CmpOp::Ge));
        prop_assert_eq!(ne, !eq);
        prop_assert_eq!(le, lt || eq);
        prop_assert_eq!(ge, gt || eq);
        prop_assert!(!(lt && gt));
        // Comparable values (same kind, or both numbers): exactly one of <, ==, > holds.
        let comparable = std::mem::discriminant(&a) == std::mem::discriminant(&b)
            || matches!((&a, &b), (Value::Int(_) | Value::Float(_), Value::Int(_) | Value::Float(_)));
        prop_assert_eq!(comparable, lt || eq || gt);
        // Between two floats or two ints, == is Value's own (bit-exact) equality.
        if std::mem::discriminant(&a) == std::mem::discriminant(&b) {
            prop_assert_eq!(eq, a == b);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Permissions

const ITEM_RULES: &str = r#"{
  "rules": {
    "Item": [
      {
        "name": "admin",
        "apply_when": { "%%user.custom_data.isAdmin": true },
        "document_filters": { "read": true, "write": true },
        "read": true, "write": true, "insert": true, "delete": true
      },
      {
        "name": "readOwnWriteOwn",
        "apply_when": {},
        "document_filters": {
          "read": { "ownerId": "%%user.id" },
          "write": { "ownerId": "%%user.id" }
        },
        "read": true, "write": true, "insert": true, "delete": true
      }
    ]
  },
  "defaultRoles": [
    {
      "name": "readAll",
      "apply_when": {},
      "document_filters": { "read": true, "write": false },
      "read": true, "write": false
    }
  ]
}"#;

fn item(owner: &str) -> BTreeMap<String, Value> {
    obj(&[("ownerId", owner.into()), ("title", "t".into())])
}

#[test]
fn owners_read_and_write_their_own_items_only() {
    let rules = load(ITEM_RULES).unwrap();
    let alice = User::new("alice");
    let role = rules.role_for("Item", &alice).unwrap();
    assert_eq!(role.name(), "readOwnWriteOwn");
    let pk = Pk::Int(1);
    let (mine, theirs) = (item("alice"), item("bob"));

    assert!(role.can_read(&alice, &pk, &mine));
    assert!(!role.can_read(&alice, &pk, &theirs));
    assert!(role.can_insert(&alice, &pk, &mine, &[]).is_ok());
    assert!(role.can_delete(&alice, &pk, &mine).is_ok());
    let mut edited = mine.clone();
    edited.insert("title".into(), "new".into());
    assert!(role
        .can_write_update(&alice, &pk, &mine, &edited, &["title"])
        .is_ok());

    // Another's item: not before.
    let d = role
        .can_write_update(&alice, &pk, &theirs, &theirs, &["title"])
        .unwrap_err();
    assert_eq!(d.kind, DenialKind::FilterBefore);
    assert_eq!(
        d.to_string(),
        r#"denied by write filter in role "readOwnWriteOwn" (object before the update)"#
    );
    // Giving one's item away: not after.
    let d = role
        .can_write_update(&alice, &pk, &mine, &theirs, &["ownerId"])
        .unwrap_err();
    assert_eq!(d.kind, DenialKind::FilterAfter);
    assert_eq!(
        d.reason(),
        r#"denied by write filter in role "readOwnWriteOwn" (object after the update)"#
    );
    // Taking another's item: not before.
    assert_eq!(
        role.can_write_update(&alice, &pk, &theirs, &mine, &["ownerId"])
            .unwrap_err()
            .kind,
        DenialKind::FilterBefore
    );
    let d = role.can_insert(&alice, &pk, &theirs, &[]).unwrap_err();
    assert_eq!(
        d.to_string(),
        r#"denied by write filter in role "readOwnWriteOwn" (object after the insert)"#
    );
    let d = role.can_delete(&alice, &pk, &theirs).unwrap_err();
    assert_eq!(
        (d.action, d.kind),
        (Action::Delete, DenialKind::FilterBefore)
    );
    // An item without an owner belongs to nobody.
    assert!(!role.can_read(&alice, &pk, &obj(&[])));

    // The same through Rules.
    assert!(rules.can_read("Item", &alice, &pk, &mine));
    assert!(rules
        .check_update("Item", &alice, &pk, &mine, &theirs, &["ownerId"])
        .is_err());
    assert!(rules.check_insert("Item", &alice, &pk, &mine, &[]).is_ok());
    assert!(rules.check_delete("Item", &alice, &pk, &theirs).is_err());
}

#[test]
fn the_first_matching_role_applies() {
    let rules = load(ITEM_RULES).unwrap();
    let admin = User::new("root").with("custom_data.isAdmin", "true");
    let not_admin = User::new("eve").with("custom_data.isAdmin", "false");
    assert_eq!(rules.role_for("Item", &admin).unwrap().name(), "admin");
    assert_eq!(
        rules.role_for("Item", &not_admin).unwrap().name(),
        "readOwnWriteOwn"
    );
    let pk = Pk::Int(2);
    assert!(rules.can_read("Item", &admin, &pk, &item("bob")));
    assert!(rules
        .check_update(
            "Item",
            &admin,
            &pk,
            &item("bob"),
            &item("alice"),
            &["ownerId"]
        )
        .is_ok());
    assert!(!rules.can_read("Item", &not_admin, &pk, &item("bob")));
}

#[test]
fn default_roles_govern_collections_without_rules() {
    let rules = load(ITEM_RULES).unwrap();
    let alice = User::new("alice");
    let role = rules.role_for("Note", &alice).unwrap();
    assert_eq!(role.name(), "readAll");
    let pk = Pk::Str("n1".into());
    let note = obj(&[("ownerId", "bob".into())]);
    assert!(role.can_read(&alice, &pk, &note));
    let d = role
        .can_write_update(&alice, &pk, &note, &note, &["ownerId"])
        .unwrap_err();
    assert_eq!(d.to_string(), r#"update not allowed by role "readAll""#);
    let d = role.can_insert(&alice, &pk, &note, &[]).unwrap_err();
    assert_eq!(d.to_string(), r#"insert not allowed by role "readAll""#);
    let d = role.can_delete(&alice, &pk, &note).unwrap_err();
    assert_eq!(d.to_string(), r#"delete not allowed by role "readAll""#);
}

#[test]
fn no_role_means_no_access() {
    let rules = load(r#"{"rules": {"Item": []}, "defaultRoles": [{"name": "x", "apply_when": {"%%user.id": "root"}, "document_filters": {"read": true, "write": true}, "read": true}]}"#).unwrap();
    let alice = User::new("alice");
    assert!(rules.role_for("Item", &alice).is_none());
    assert!(rules.role_for("Other", &alice).is_none());
    assert!(rules.role_for("Other", &User::new("root")).is_some());
    let pk = Pk::Int(1);
    assert!(!rules.can_read("Item", &alice, &pk, &obj(&[])));
    let d = rules
        .check_insert("Item", &alice, &pk, &obj(&[]), &[])
        .unwrap_err();
    assert_eq!(d.to_string(), "insert denied: no role applies to the user");
    assert!(load("{}").unwrap().role_for("Any", &alice).is_none());
}

#[test]
fn write_implies_read_only_where_writable() {
    let rules = load(
        r#"{"defaultRoles": [{"name": "w", "document_filters": {"read": true, "write": {"ownerId": "%%user.id"}}, "write": true}]}"#,
    )
    .unwrap();
    let alice = User::new("alice");
    let role = rules.role_for("X", &alice).unwrap();
    let pk = Pk::Int(1);
    assert!(role.can_read(&alice, &pk, &item("alice")));
    // `read` is false, so the read filter grants nothing on its own.
    assert!(!role.can_read(&alice, &pk, &item("bob")));
}

#[test]
fn filters_use_user_fields_pk_and_operators() {
    let rules = load(
        r#"{"defaultRoles": [{
            "name": "team",
            "apply_when": {"$or": [{"%%user.team": {"$exists": true}}, {"%%user.id": "root"}]},
            "document_filters": {
                "read": {"$or": [{"teamId": "%%user.team"}, {"public": true}], "_id": {"$nin": [13]}},
                "write": {"teamId": "%%user.team", "level": {"$lte": "%%user.level", "$gte": 0}}
            },
            "read": true, "write": true
        }]}"#,
    )
    .unwrap();
    let u = User::new("u1").with("team", "7").with("level", "2");
    let role = rules.role_for("Doc", &u).unwrap();
    let d = |team: i64, level: i64, public: bool| {
        obj(&[
            ("teamId", Value::Int(team)),
            ("level", Value::Int(level)),
            ("public", Value::Bool(public)),
        ])
    };
    // The user's "7" reads as the int 7 against an int field.
    assert!(role.can_read(&u, &Pk::Int(1), &d(7, 9, false)));
    assert!(role.can_read(&u, &Pk::Int(1), &d(8, 0, true)));
    assert!(!role.can_read(&u, &Pk::Int(1), &d(8, 0, false)));
    // Key 13 is excluded from the read filter; only writing grants reading it.
    assert!(!role.can_read(&u, &Pk::Int(13), &d(8, 0, true)));
    assert!(role.can_read(&u, &Pk::Int(13), &d(7, 0, false)));
    assert!(role
        .can_write_update(
            &u,
            &Pk::Int(1),
            &d(7, 1, false),
            &d(7, 2, false),
            &["level"]
        )
        .is_ok());
    assert!(role
        .can_write_update(
            &u,
            &Pk::Int(1),
            &d(7, 1, false),
            &d(7, 3, false),
            &["level"]
        )
        .is_err());
    // No team: the role does not apply, and root has no team to match.
    assert!(rules.role_for("Doc", &User::new("u2")).is_none());
    let root = User::new("root");
    let role = rules.role_for("Doc", &root).unwrap();
    assert!(!role.can_read(&root, &Pk::Int(1), &d(7, 0, false)));
    assert!(role.can_read(&root, &Pk::Int(1), &d(7, 0, true)));
}

#[test]
fn rules_check_fields_against_the_schema() {
    let rules = load(ITEM_RULES).unwrap();
    assert!(rules.check_schema(&item_schema()).is_ok());
    let bad = load(
        r#"{"rules": {"Item": [{"name": "peek", "document_filters": {"read": {"secret": "x"}, "write": false}, "read": true}]}}"#,
    )
    .unwrap();
    let e = bad.check_schema(&item_schema()).unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"role "peek" in "Item": document_filters.read: field `secret` is not queryable in `Item`"#
    );
}

/// Roles copied verbatim from the Atlas Device Sync permissions guide (default roles): they
/// omit `insert` and `delete`, which default to true there.
const GUIDE_OWNER_READ_WRITE: &str = r#"{ "defaultRoles": [
    {
      "name": "owner-read-write",
      "apply_when": {},
      "document_filters": {
        "read": { "owner_id": "%%user.id" },
        "write": { "owner_id": "%%user.id" }
      },
      "read": true,
      "write": true
    }
] }"#;

const GUIDE_OWNER_WRITE: &str = r#"{ "defaultRoles": [
    {
      "name": "owner-write",
      "apply_when": {},
      "document_filters": {
        "read": true,
        "write": { "owner_id": "%%user.id" }
      },
      "read": true,
      "write": true
    }
] }"#;

const GUIDE_ADMIN: &str = r#"{ "defaultRoles": [
      {
        "name": "admin",
        "apply_when": {
          "%%user.custom_data.isGlobalAdmin": true
        },
        "document_filters": {
          "read": true,
          "write": true
        },
        "read": true,
        "write": true
      },
      {
        "name": "user",
        "apply_when": {},
        "document_filters": {
          "read": { "owner_id": "%%user.id" },
          "write": { "owner_id": "%%user.id" }
        },
        "read": true,
        "write": true
      }
] }"#;

/// The role of the App Services CLI's collection rules template (`rules.json`), with its
/// placeholders filled in.
const DOCS_RULES_JSON_ROLE: &str = r#"{ "rules": { "Item": [
    {
      "name": "owner",
      "apply_when": {},
      "document_filters": {
        "read": { "owner_id": "%%user.id" },
        "write": { "owner_id": "%%user.id" }
      },
      "insert": true,
      "delete": true,
      "search": true,
      "fields": {
        "myField": { "read": true, "write": true }
      },
      "additional_fields": { "read": true, "write": true }
    }
] } }"#;

fn owned(owner: &str) -> BTreeMap<String, Value> {
    obj(&[("owner_id", owner.into()), ("title", "t".into())])
}

#[test]
fn roles_copied_from_the_atlas_docs_behave_as_there() {
    let pk = Pk::Int(1);
    let (alice, bob) = (User::new("alice"), User::new("bob"));

    // Users can only read and write their own data; insert and delete default to true.
    let rules = load(GUIDE_OWNER_READ_WRITE).unwrap();
    assert!(rules.can_read("Note", &alice, &pk, &owned("alice")));
    assert!(!rules.can_read("Note", &alice, &pk, &owned("bob")));
    assert!(rules
        .check_insert("Note", &alice, &pk, &owned("alice"), &["owner_id", "title"])
        .is_ok());
    assert!(rules
        .check_delete("Note", &alice, &pk, &owned("alice"))
        .is_ok());
    let d = rules
        .check_insert("Note", &alice, &pk, &owned("bob"), &["owner_id", "title"])
        .unwrap_err();
    assert_eq!(d.kind, DenialKind::FilterAfter);
    assert!(rules
        .check_delete("Note", &bob, &pk, &owned("alice"))
        .is_err());
    let role = rules.role_for("Note", &alice).unwrap();
    assert_eq!(
        role.flags(),
        RoleFlags {
            read: true,
            write: true,
            insert: true,
            delete: true,
            search: true
        }
    );

    // Users can read all data but only write their own.
    let rules = load(GUIDE_OWNER_WRITE).unwrap();
    assert!(rules.can_read("Recipe", &alice, &pk, &owned("bob")));
    let d = rules
        .check_update(
            "Recipe",
            &alice,
            &pk,
            &owned("bob"),
            &owned("bob"),
            &["title"],
        )
        .unwrap_err();
    assert_eq!(d.kind, DenialKind::FilterBefore);
    assert!(rules
        .check_insert("Recipe", &alice, &pk, &owned("alice"), &[])
        .is_ok());
    assert!(rules
        .check_delete("Recipe", &alice, &pk, &owned("alice"))
        .is_ok());

    // Admins read and write everything; users their own.
    let rules = load(GUIDE_ADMIN).unwrap();
    let admin = User::new("root").with("custom_data.isGlobalAdmin", "true");
    assert_eq!(rules.role_for("Any", &admin).unwrap().name(), "admin");
    assert!(rules
        .check_delete("Any", &admin, &pk, &owned("bob"))
        .is_ok());
    assert!(rules
        .check_insert("Any", &admin, &pk, &owned("bob"), &[])
        .is_ok());
    assert_eq!(rules.role_for("Any", &alice).unwrap().name(), "user");
    assert!(rules
        .check_delete("Any", &alice, &pk, &owned("bob"))
        .is_err());
    assert!(rules
        .check_delete("Any", &alice, &pk, &owned("alice"))
        .is_ok());

    // The CLI template's role, with `search`, `fields` and `additional_fields`.
    let rules = load(DOCS_RULES_JSON_ROLE).unwrap();
    let role = rules.role_for("Item", &alice).unwrap();
    assert!(role.flags().search);
    let mine = owned("alice");
    let access = rules.access("Item", &alice, &pk, &mine).unwrap();
    assert!(access.can_read() && access.can_read_field("myField"));
    assert!(access.can_write_field("title"));
    assert!(rules
        .check_update("Item", &alice, &pk, &mine, &mine, &["myField", "title"])
        .is_ok());
    assert!(!rules.can_read("Item", &alice, &pk, &owned("bob")));
}

/// The field-level templates of the Atlas role examples, placeholders filled in.
#[test]
fn field_level_permissions_follow_atlas() {
    let file = |role: &str| {
        load(&format!(
            r#"{{"defaultRoles": [{{"name": "r", "apply_when": {{}}, "document_filters": {{"read": true, "write": {{"owner_id": "%%user.id"}}}}, {role}}}]}}"#
        ))
        .unwrap_or_else(|e| panic!("{role}: {e}"))
    };
    let alice = User::new("alice");
    let pk = Pk::Int(1);
    let doc = |owner: &str| {
        obj(&[
            ("owner_id", owner.into()),
            ("title", "t".into()),
            ("status", "open".into()),
        ])
    };
    let (mine, theirs) = (doc("alice"), doc("bob"));

    // "The Role Can Read All Fields & Write to Specific Fields".
    let rules = file(
        r#""insert": true, "delete": true, "read": true, "write": false, "fields": { "status": { "write": true } }"#,
    );
    assert!(rules
        .check_update("X", &alice, &pk, &mine, &mine, &["status"])
        .is_ok());
    let d = rules
        .check_update("X", &alice, &pk, &mine, &mine, &["status", "title"])
        .unwrap_err();
    assert_eq!(
        (d.kind, d.field.as_deref(), d.action),
        (DenialKind::FieldNotWritable, Some("title"), Action::Update)
    );
    assert_eq!(
        d.to_string(),
        r#"update denied: field "title" is not writable in role "r""#
    );
    // The write filter still decides whose objects: not bob's.
    let d = rules
        .check_update("X", &alice, &pk, &theirs, &theirs, &["status"])
        .unwrap_err();
    assert_eq!(d.kind, DenialKind::FilterBefore);
    // Inserting or deleting needs every field of the object writable.
    let d = rules
        .check_insert("X", &alice, &pk, &mine, &["status"])
        .unwrap_err();
    assert_eq!(d.kind, DenialKind::FieldNotWritable);
    assert!(rules.check_delete("X", &alice, &pk, &mine).is_err());
    let only_status = obj(&[("status", "open".into()), ("owner_id", "alice".into())]);
    assert_eq!(
        rules
            .check_delete("X", &alice, &pk, &only_status)
            .unwrap_err()
            .field
            .as_deref(),
        Some("owner_id")
    );

    // "The Role Cannot Write to Specific Fields".
    let rules = file(
        r#""insert": true, "delete": true, "read": true, "fields": { "owner_id": { "read": true, "write": false } }, "additional_fields": { "write": true }"#,
    );
    assert!(rules
        .check_update("X", &alice, &pk, &mine, &mine, &["title", "status"])
        .is_ok());
    let d = rules
        .check_update("X", &alice, &pk, &mine, &mine, &["owner_id"])
        .unwrap_err();
    assert_eq!(d.field.as_deref(), Some("owner_id"));
    let access = rules.access("X", &alice, &pk, &theirs).unwrap();
    assert!(access.can_read_field("owner_id") && !access.can_write_field("title"));

    // A hidden field: readable fields come from `additional_fields`, not `read`.
    let rules =
        file(r#""fields": { "status": { "read": false } }, "additional_fields": { "read": true }"#);
    let access = rules.access("X", &alice, &pk, &theirs).unwrap();
    assert!(access.can_read());
    assert!(access.can_read_field("title") && !access.can_read_field("status"));
    assert!(!rules
        .role_for("X", &alice)
        .unwrap()
        .may_read_field("status"));
    // Document-level `read` covers every field, whatever `fields` says.
    let rules = file(r#""read": true, "fields": { "status": { "read": false } }"#);
    let access = rules.access("X", &alice, &pk, &theirs).unwrap();
    assert!(access.can_read_field("status"));
    // Writing a field grants reading it, where the write filter holds.
    let rules = file(r#""fields": { "status": { "write": true } }"#);
    assert!(rules
        .access("X", &alice, &pk, &mine)
        .unwrap()
        .can_read_field("status"));
    let access = rules.access("X", &alice, &pk, &theirs).unwrap();
    assert!(!access.can_read() && !access.can_read_field("status"));
    // A role that grants no field reads no object.
    let rules = file(r#""fields": {}, "additional_fields": {}"#);
    assert!(!rules.can_read("X", &alice, &pk, &mine));
    let d = rules
        .check_insert("X", &alice, &pk, &mine, &[])
        .unwrap_err();
    assert_eq!(d.kind, DenialKind::NotAllowed);
    // Embedded fields' permissions load and grant nothing (no embedded documents here).
    let rules = file(
        r#""fields": { "status": { "fields": { "inner": { "read": true, "write": true } } } }, "additional_fields": { "read": true }"#,
    );
    let access = rules.access("X", &alice, &pk, &mine).unwrap();
    assert!(!access.can_read_field("status") && access.can_read_field("title"));
}

#[test]
fn insert_and_delete_take_expressions() {
    let rules = load(
        r#"{"defaultRoles": [{"name": "r", "document_filters": {"read": true, "write": true},
            "read": true, "write": true,
            "insert": {"owner_id": "%%user.id"}, "delete": {"status": {"$in": ["done", "void"]}}}]}"#,
    )
    .unwrap();
    let alice = User::new("alice");
    let pk = Pk::Int(1);
    assert!(rules
        .check_insert("X", &alice, &pk, &owned("alice"), &[])
        .is_ok());
    let d = rules
        .check_insert("X", &alice, &pk, &owned("bob"), &[])
        .unwrap_err();
    assert_eq!(d.to_string(), r#"insert not allowed by role "r""#);
    let done = obj(&[("status", "done".into())]);
    assert!(rules.check_delete("X", &alice, &pk, &done).is_ok());
    let d = rules
        .check_delete("X", &alice, &pk, &owned("alice"))
        .unwrap_err();
    assert_eq!((d.action, d.kind), (Action::Delete, DenialKind::NotAllowed));
    let flags = rules.role_for("X", &alice).unwrap().flags();
    assert!(flags.insert && flags.delete);
    // Their fields must be queryable, like the document filters'.
    let e = rules.check_schema(&item_schema()).unwrap_err();
    assert!(
        e.to_string()
            .contains("insert: field `owner_id` is not queryable"),
        "{e}"
    );
}

fn load_err(json: &str) -> String {
    match load(json) {
        Ok(_) => panic!("loaded: {json}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_rules_files_are_refused_naming_role_and_key() {
    let role =
        |body: &str| format!(r#"{{"rules": {{"Item": [{{"name": "readOwnWriteOwn", {body}}}]}}}}"#);
    let ok_filters = r#""document_filters": {"read": true, "write": true}"#;
    let cases: Vec<(String, &str)> = vec![
        (
            role(r#""document_filters": {"read": true, "write": {"ownerId": {"$regex": "^a"}}}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters.write.ownerId.$regex: unknown operator `$regex`"#,
        ),
        (
            role(r#""document_filters": {"read": {"$where": "x"}, "write": true}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters.read.$where: unknown operator `$where`"#,
        ),
        (
            role(&format!(r#"{ok_filters}, "serach": true"#)),
            r#"role "readOwnWriteOwn" in "Item": unknown key "serach" (expected name, apply_when, document_filters, read, write, insert, delete, search, fields, additional_fields or _id)"#,
        ),
        (
            role(&format!(r#"{ok_filters}, "search": "yes""#)),
            r#"role "readOwnWriteOwn" in "Item": search: expected true or false, found a string"#,
        ),
        (
            role(&format!(
                r#"{ok_filters}, "fields": {{"_id": {{"read": true}}}}"#
            )),
            r#"role "readOwnWriteOwn" in "Item": fields._id: the primary key takes no field-level permissions"#,
        ),
        (
            role(&format!(
                r#"{ok_filters}, "fields": {{"a b": {{"read": true}}}}"#
            )),
            r#"role "readOwnWriteOwn" in "Item": fields.a b: bad field name "a b""#,
        ),
        (
            role(&format!(r#"{ok_filters}, "fields": {{"a": true}}"#)),
            r#"role "readOwnWriteOwn" in "Item": fields.a: expected an object with `read` and `write`, found a boolean"#,
        ),
        (
            role(&format!(
                r#"{ok_filters}, "fields": {{"a": {{"read": 1}}}}"#
            )),
            r#"role "readOwnWriteOwn" in "Item": fields.a.read: expected true or false, found a number"#,
        ),
        (
            role(&format!(
                r#"{ok_filters}, "fields": {{"a": {{"fields": {{"b": {{"delete": true}}}}}}}}"#
            )),
            r#"role "readOwnWriteOwn" in "Item": fields.a.fields.b: unknown key "delete" (expected read, write or fields)"#,
        ),
        (
            role(&format!(r#"{ok_filters}, "fields": []"#)),
            r#"role "readOwnWriteOwn" in "Item": fields: expected an object of field names, found an array"#,
        ),
        (
            role(&format!(
                r#"{ok_filters}, "additional_fields": {{"read": true, "fields": {{}}}}"#
            )),
            r#"role "readOwnWriteOwn" in "Item": additional_fields: unknown key "fields" (expected read or write)"#,
        ),
        (
            role(&format!(
                r#"{ok_filters}, "insert": {{"ownerId": {{"$regex": "a"}}}}"#
            )),
            r#"role "readOwnWriteOwn" in "Item": insert.ownerId.$regex: unknown operator `$regex`"#,
        ),
        (
            role(&format!(r#"{ok_filters}, "_id": 5"#)),
            r#"role "readOwnWriteOwn" in "Item": _id: expected a string, found a number"#,
        ),
        (
            role(&format!(r#"{ok_filters}, "read": "yes""#)),
            r#"role "readOwnWriteOwn" in "Item": read: expected true or false, found a string"#,
        ),
        (
            role(r#""document_filters": {"read": true}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters: missing key `write`"#,
        ),
        (
            role(r#""document_filters": {"read": true, "write": 1}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters.write: expected true, false or an expression object, found a number"#,
        ),
        (
            role(r#""document_filters": {"read": true, "write": true, "delete": true}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters: unknown key "delete""#,
        ),
        (
            role(r#""apply_when": {}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters: missing"#,
        ),
        (
            role(&format!(
                r#"{ok_filters}, "apply_when": {{"ownerId": "x"}}"#
            )),
            r#"role "readOwnWriteOwn" in "Item": apply_when.ownerId: apply_when sees only the user"#,
        ),
        (
            role(&format!(r#"{ok_filters}, "apply_when": {{"%%root.x": 1}}"#)),
            r#"role "readOwnWriteOwn" in "Item": apply_when.%%root.x: unknown expansion `%%root.x`"#,
        ),
        (
            role(r#""document_filters": {"read": {"a": "%%user"}, "write": true}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters.read.a: unknown expansion `%%user`"#,
        ),
        (
            role(r#""document_filters": {"read": {"a": {"$in": 5}}, "write": true}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters.read.a.$in: expected an array of values, found a number"#,
        ),
        (
            role(r#""document_filters": {"read": {"a": {"$in": [1, [2]]}}, "write": true}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters.read.a.$in[1]: expected a value, found an array"#,
        ),
        (
            role(r#""document_filters": {"read": {"$and": []}, "write": true}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters.read.$and: must not be empty"#,
        ),
        (
            role(r#""document_filters": {"read": {"$or": [{"a": 1}, 2]}, "write": true}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters.read.$or[1]: expected an expression object, found a number"#,
        ),
        (
            role(r#""document_filters": {"read": {"a": {"b": 1}}, "write": true}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters.read.a: expected a value or an object of operators"#,
        ),
        (
            role(r#""document_filters": {"read": {"a b": 1}, "write": true}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters.read.a b: bad field name "a b""#,
        ),
        (
            role(r#""document_filters": {"read": {"a": {"$exists": 1}}, "write": true}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters.read.a.$exists: expected true or false, found a number"#,
        ),
        (
            role(r#""document_filters": {"read": {"a": {"$not": 3}}, "write": true}"#),
            r#"role "readOwnWriteOwn" in "Item": document_filters.read.a.$not: expected an object of operators, found a number"#,
        ),
        (
            r#"{"rules": {"Item": [{"document_filters": {"read": true, "write": true}}]}}"#.into(),
            r#"role #0 in "Item": name: missing"#,
        ),
        (
            r#"{"rules": {"Item": [{"name": 5}]}}"#.into(),
            r#"role #0 in "Item": name: expected a string, found a number"#,
        ),
        (
            format!(
                r#"{{"defaultRoles": [{{"name": "a", {ok_filters}}}, {{"name": "a", {ok_filters}}}]}}"#
            ),
            r#"default role "a": name: duplicate role name (also role #0)"#,
        ),
        (
            format!(r#"{{"defaultRoles": [{{"name": "a", {ok_filters}, "insert": null}}]}}"#),
            r#"default role "a": insert: expected true, false or an expression object, found null"#,
        ),
        (
            r#"{"rules": {"Item": {}}}"#.into(),
            r#"rules file: rules.Item: expected an array of roles, found an object"#,
        ),
        (
            r#"{"rules": {"bad name": []}}"#.into(),
            r#"rules file: rules.bad name: bad collection name"#,
        ),
        (
            r#"{"rules": {}, "default_roles": []}"#.into(),
            r#"rules file: unknown key "default_roles""#,
        ),
        (
            r#"[]"#.into(),
            "rules file: expected an object, found an array",
        ),
        (
            r#"{"rules": {"Item": [3]}}"#.into(),
            "rules file: rules.Item[0]: expected a role object, found a number",
        ),
        (r#"{"rules": "#.into(), "rules file is not valid JSON"),
        (
            r#"{"rules": {}, "rules": {}}"#.into(),
            r#"duplicate key "rules""#,
        ),
        (
            role(r#""document_filters": {"read": {"a": 18446744073709551615}, "write": true}"#),
            "out of range for i64",
        ),
    ];
    for (json, want) in &cases {
        let got = load_err(json);
        assert!(got.contains(want), "{json}\n  got:  {got}\n  want: {want}");
    }
}

#[test]
fn rules_limits_are_errors_not_crashes() {
    let big = format!(
        r#"{{"rules": {{}}, "x": "{}"}}"#,
        "a".repeat(fieldlog::rules::RULES_LEN_MAX)
    );
    assert!(matches!(load(&big), Err(RulesError::TooLarge { .. })));
    let deep_json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(load(&deep_json[..fieldlog::rules::RULES_LEN_MAX.min(deep_json.len())]).is_err());
    let nested = |n: usize| {
        format!(
            r#"{{"defaultRoles": [{{"name": "r", "document_filters": {{"read": {}{{}}{}, "write": true}}}}]}}"#,
            r#"{"$not": "#.repeat(n),
            "}".repeat(n)
        )
    };
    assert!(load(&nested(fieldlog::rules::FILTER_DEPTH_MAX)).is_ok());
    let e = load(&nested(fieldlog::rules::FILTER_DEPTH_MAX + 1)).unwrap_err();
    assert!(e.to_string().contains("nest deeper than"), "{e}");
    // Deeper than serde_json's own limit: still an error, not a stack overflow.
    assert!(load(&nested(1000)).is_err());
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{json, Value as J};
    let key = prop_oneof![
        Just("rules"),
        Just("defaultRoles"),
        Just("Item"),
        Just("name"),
        Just("apply_when"),
        Just("document_filters"),
        Just("read"),
        Just("write"),
        Just("insert"),
        Just("delete"),
        Just("$and"),
        Just("$or"),
        Just("$nor"),
        Just("$not"),
        Just("$in"),
        Just("$nin"),
        Just("$eq"),
        Just("$ne"),
        Just("$gt"),
        Just("$lte"),
        Just("$exists"),
        Just("$regex"),
        Just("%%user.id"),
        Just("%%user.x"),
        Just("%%root"),
        Just("_id"),
        Just("ownerId"),
        Just("bad key"),
        Just(""),
    ]
    .prop_map(str::to_owned);
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<u64>().prop_map(|i| json!(i)),
        (-1e300f64..1e300).prop_map(|f| json!(f)),
        Just(json!("%%user.id")),
        Just(json!("%%user.team")),
        Just(json!("%%nope")),
        ".{0,6}".prop_map(J::String),
    ];
    leaf.prop_recursive(8, 64, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(J::Array),
            proptest::collection::vec((key.clone(), inner), 0..5)
                .prop_map(|kv| J::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn load_never_panics_on_random_text(s in any::<String>()) {
        let _ = load(&s);
    }

    #[test]
    fn load_never_panics_on_random_json(v in json_value()) {
        let text = v.to_string();
        if let Ok(rules) = load(&text) {
            // Whatever loads also evaluates without panicking.
            let user = User::new("alice").with("x", "1").with("team", "7");
            let fields = obj(&[("ownerId", "alice".into()), ("x", Value::Int(1))]);
            for coll in ["Item", "Other"] {
                if let Some(role) = rules.role_for(coll, &user) {
                    let pk = Pk::Int(1);
                    let _ = role.can_read(&user, &pk, &fields);
                    let _ = role.can_write_update(&user, &pk, &fields, &fields, &["a"]);
                    let _ = role.can_insert(&user, &pk, &fields, &[]);
                    let _ = role.can_delete(&user, &pk, &fields);
                }
            }
        }
    }

    #[test]
    fn load_never_panics_on_role_shaped_json(
        read in json_value(),
        write in json_value(),
        apply in json_value(),
        flag in json_value(),
    ) {
        let text = format!(
            r#"{{"rules": {{"Item": [{{"name": "r", "apply_when": {apply}, "document_filters": {{"read": {read}, "write": {write}}}, "read": {flag}}}]}}}}"#
        );
        if let Ok(rules) = load(&text) {
            let user = User::new("alice").with("x", "1");
            if let Some(role) = rules.role_for("Item", &user) {
                let fields = obj(&[("ownerId", "alice".into())]);
                let _ = role.can_read(&user, &Pk::Str("k".into()), &fields);
                let _ = role.can_write_update(&user, &Pk::Str("k".into()), &fields, &obj(&[]), &[]);
            }
        }
    }
}
