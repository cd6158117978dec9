//! `rules_load`: permission rules files (invariant 6) and their evaluation (invariant 5).
//!
//! The first byte picks how the rest is read: as the file's text, or as a rules file built
//! from the input (so evaluation is reached often). For every file that loads:
//! - loading is deterministic, and the same JSON re-serialised (other whitespace and number
//!   spelling) loads to the same rules;
//! - the role that applies is the first whose `apply_when` matches;
//! - each check's answer follows from the role: no role ⇒ `NoRole` denials and no reads;
//!   an allowed update ⇒ the object is readable before and after (a role reads what it
//!   may write) and every field written is writable; an allowed insert or delete ⇒ every
//!   field of the object is writable; every denial names the applying role (and the field,
//!   exactly when a field is not writable);
//! - field by field: writable ⇒ readable ⇒ the object is readable and the role may read
//!   the field somewhere;
//! - `check_schema` returns (typed error or `Ok`) for schemas built from the input.

use std::collections::BTreeMap;

use fieldlog::rules::{load, DenialKind, Rules, User};
use fieldlog::{FieldSpec, FieldType, Schema, Value};
use serde_json::{json, Map, Value as Json};

use super::input::Input;

const COLLECTIONS: [&str; 3] = ["Item", "Dog", "Secret"];
const FIELDS: [&str; 5] = ["ownerId", "n", "status", "_id", "team"];
const USER_KEYS: [&str; 3] = ["%%user.id", "%%user.team", "%%user.custom_data.isAdmin"];
const OPS: [&str; 10] = [
    "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$not",
];

/// Runs the rules checks on `data`.
pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let text = if input.u8().is_multiple_of(2) {
        let len = usize::from(input.u16());
        String::from_utf8_lossy(input.take(len)).into_owned()
    } else {
        gen_file(&mut input).to_string()
    };
    let Ok(rules) = load(&text) else {
        return;
    };
    assert_eq!(
        load(&text).as_ref(),
        Ok(&rules),
        "loading is not deterministic"
    );
    if let Ok(json) = serde_json::from_str::<Json>(&text) {
        let again = serde_json::to_string_pretty(&json).expect("re-serialise");
        assert_eq!(
            load(&again).as_ref(),
            Ok(&rules),
            "the same JSON, spelt otherwise, loads differently:\n{again}"
        );
    }
    for _ in 0..1 + input.below(4) {
        let coll = *input.choose(&COLLECTIONS);
        let user = gen_user(&mut input);
        check_user(&rules, coll, &user, &mut input);
    }
    let mut schema = Schema::new(*input.choose(&COLLECTIONS));
    for f in FIELDS.iter().filter(|f| **f != "_id") {
        if input.bool() {
            let spec = FieldSpec::optional(FieldType::Any);
            schema = schema.field(*f, if input.bool() { spec.queryable() } else { spec });
        }
    }
    let _ = rules.check_schema(&schema);
}

fn check_user(rules: &Rules, coll: &str, user: &User, input: &mut Input<'_>) {
    let role = rules.role_for(coll, user);
    let first = rules.roles(coll).iter().find(|r| r.applies_to(user));
    assert_eq!(
        role.map(|r| r.name()),
        first.map(|r| r.name()),
        "role_for is not the first match"
    );
    let pk = input.pk();
    let before = gen_object(input, user);
    let after = gen_object(input, user);
    let written: Vec<&str> = FIELDS
        .iter()
        .copied()
        .filter(|f| *f != "_id" && input.bool())
        .collect();
    let read = rules.can_read(coll, user, &pk, &before);
    assert_eq!(read, role.is_some_and(|r| r.can_read(user, &pk, &before)));
    if let Some(access) = rules.access(coll, user, &pk, &before) {
        assert_eq!(access.can_read(), read);
        for f in FIELDS {
            if access.can_write_field(f) {
                assert!(access.can_read_field(f), "{f} is writable, not readable");
            }
            if access.can_read_field(f) {
                assert!(read, "{f} is readable in an object that is not");
                assert!(access.role().may_read_field(f));
            }
        }
    }
    let results = [
        rules.check_update(coll, user, &pk, &before, &after, &written),
        rules.check_insert(coll, user, &pk, &after, &written),
        rules.check_delete(coll, user, &pk, &before),
    ];
    for r in &results {
        match (role, r) {
            (None, Ok(())) => panic!("a write was allowed with no role"),
            (None, Err(d)) => assert_eq!(d.kind, DenialKind::NoRole),
            (Some(_), Err(d)) if d.kind == DenialKind::NoRole => {
                panic!("NoRole although role {:?} applies", role.map(|r| r.name()))
            }
            (Some(role), Err(d)) => assert_eq!(d.role.as_deref(), Some(role.name())),
            (Some(_), Ok(())) => {}
        }
        if let Err(d) = r {
            assert!(!d.reason().is_empty());
            assert_eq!(d.field.is_some(), d.kind == DenialKind::FieldNotWritable);
        }
    }
    let writable = |fields: &BTreeMap<String, Value>, names: &[&str]| {
        let access = rules.access(coll, user, &pk, fields).expect("a role");
        names.iter().all(|f| access.can_write_field(f))
    };
    if results[0].is_ok() {
        assert!(
            read,
            "an update was allowed on an object the user may not read"
        );
        assert!(
            rules.can_read(coll, user, &pk, &after),
            "an update was allowed into an object the user may not read"
        );
        assert!(
            writable(&before, &written),
            "an update wrote a field that is not writable"
        );
    }
    if results[1].is_ok() {
        assert!(
            writable(
                &after,
                &after.keys().map(String::as_str).collect::<Vec<_>>()
            ),
            "an insert has a field that is not writable"
        );
    }
    if results[2].is_ok() {
        assert!(
            writable(
                &before,
                &before.keys().map(String::as_str).collect::<Vec<_>>()
            ),
            "a delete of an object with a field that is not writable"
        );
    }
}

fn gen_user(input: &mut Input<'_>) -> User {
    let mut u = User::new(*input.choose(&["u1", "u2", ""]));
    if input.bool() {
        u = u.with("team", *input.choose(&["red", "1", "true", "2.5"]));
    }
    if input.bool() {
        u = u.with(
            "custom_data.isAdmin",
            *input.choose(&["true", "false", "x"]),
        );
    }
    u
}

fn gen_object(input: &mut Input<'_>, user: &User) -> BTreeMap<String, Value> {
    let mut fields = BTreeMap::new();
    for f in FIELDS.iter().filter(|f| **f != "_id") {
        match input.u8() % 4 {
            0 => {}
            1 => {
                fields.insert((*f).to_owned(), Value::String(user.id.clone()));
            }
            _ => {
                fields.insert((*f).to_owned(), small_value(input));
            }
        }
    }
    fields
}

fn small_value(input: &mut Input<'_>) -> Value {
    match input.u8() % 6 {
        0 => Value::Null,
        1 => Value::Bool(input.bool()),
        2 => Value::Int(i64::from(input.u8() % 4)),
        3 => Value::Float(f64::from(input.u8() % 4) / 2.0),
        4 => Value::String((*input.choose(&["u1", "u2", "red", "true"])).to_owned()),
        _ => input.value(),
    }
}

/// A rules file: mostly well-formed, with a few shapes the loader must refuse.
fn gen_file(input: &mut Input<'_>) -> Json {
    let mut top = Map::new();
    if !input.one_in(4) {
        let mut rules = Map::new();
        for _ in 0..input.below(3) {
            let coll = *input.choose(&COLLECTIONS);
            let roles: Vec<Json> = (0..input.below(3)).map(|i| gen_role(input, i)).collect();
            rules.insert(coll.to_owned(), Json::Array(roles));
        }
        top.insert("rules".into(), Json::Object(rules));
    }
    if !input.one_in(3) {
        let roles: Vec<Json> = (0..1 + input.below(2))
            .map(|i| gen_role(input, i))
            .collect();
        top.insert("defaultRoles".into(), Json::Array(roles));
    }
    if input.one_in(16) {
        top.insert("extra".into(), json!(1));
    }
    Json::Object(top)
}

fn gen_role(input: &mut Input<'_>, i: usize) -> Json {
    let mut role = Map::new();
    if !input.one_in(16) {
        role.insert(
            "name".into(),
            json!(format!("r{}", if input.one_in(8) { 0 } else { i })),
        );
    }
    if input.bool() {
        role.insert("apply_when".into(), gen_expr(input, 0, true));
    }
    let filter = |input: &mut Input<'_>| match input.u8() % 4 {
        0 => json!(true),
        1 => json!(false),
        _ => gen_expr(input, 0, false),
    };
    let mut filters = Map::new();
    filters.insert("read".into(), filter(input));
    if !input.one_in(16) {
        filters.insert("write".into(), filter(input));
    }
    role.insert("document_filters".into(), Json::Object(filters));
    for flag in ["read", "write", "insert", "delete", "search"] {
        if input.bool() {
            let v = if (flag == "insert" || flag == "delete") && input.one_in(3) {
                gen_expr(input, 0, false)
            } else {
                json!(input.bool())
            };
            role.insert(flag.into(), v);
        }
    }
    if input.bool() {
        let mut fields = Map::new();
        for _ in 0..input.below(3) {
            let f = *input.choose(&FIELDS);
            fields.insert(f.to_owned(), gen_field_perms(input, true));
        }
        role.insert("fields".into(), Json::Object(fields));
    }
    if input.bool() {
        role.insert("additional_fields".into(), gen_field_perms(input, false));
    }
    Json::Object(role)
}

/// `{ "read": bool, "write": bool }`, each present or not, with embedded `fields` when
/// `nested`.
fn gen_field_perms(input: &mut Input<'_>, nested: bool) -> Json {
    let mut perms = Map::new();
    for key in ["read", "write"] {
        if input.bool() {
            perms.insert(key.into(), json!(input.bool()));
        }
    }
    if nested && input.one_in(8) {
        perms.insert(
            "fields".into(),
            json!({ "inner": { "read": input.bool() } }),
        );
    }
    Json::Object(perms)
}

fn gen_key(input: &mut Input<'_>, user_only: bool) -> String {
    if user_only || input.one_in(4) {
        (*input.choose(&USER_KEYS)).to_owned()
    } else {
        (*input.choose(&FIELDS)).to_owned()
    }
}

fn gen_term(input: &mut Input<'_>) -> Json {
    match input.u8() % 8 {
        0 => Json::Null,
        1 => json!(input.bool()),
        2 => json!(i64::from(input.u8() % 4)),
        3 => json!(f64::from(input.u8() % 4) / 2.0),
        4 => json!(*input.choose(&USER_KEYS)),
        _ => json!(*input.choose(&["u1", "u2", "red", "true", "1"])),
    }
}

fn gen_ops(input: &mut Input<'_>, depth: usize) -> Json {
    let mut ops = Map::new();
    for _ in 0..1 + input.below(2) {
        let op = *input.choose(&OPS);
        let v = match op {
            "$in" | "$nin" => Json::Array((0..input.below(3)).map(|_| gen_term(input)).collect()),
            "$exists" => json!(input.bool()),
            "$not" if depth < 4 => gen_ops(input, depth + 1),
            "$not" => json!({}),
            _ => gen_term(input),
        };
        ops.insert(op.into(), v);
    }
    Json::Object(ops)
}

fn gen_expr(input: &mut Input<'_>, depth: usize, user_only: bool) -> Json {
    let mut m = Map::new();
    let n = if depth > 3 { 0 } else { input.below(3) };
    for _ in 0..n {
        match input.u8() % 6 {
            0 | 1 => {
                let k = gen_key(input, user_only);
                m.insert(k, gen_term(input));
            }
            2 => {
                let k = gen_key(input, user_only);
                m.insert(k, gen_ops(input, depth));
            }
            3 => {
                let op = *input.choose(&["$and", "$or", "$nor"]);
                let items = (0..input.below(3))
                    .map(|_| gen_expr(input, depth + 1, user_only))
                    .collect();
                m.insert(op.into(), Json::Array(items));
            }
            4 => {
                m.insert("$not".into(), gen_expr(input, depth + 1, user_only));
            }
            _ => {}
        }
    }
    // A pk test on a document filter now and then.
    if !user_only && input.one_in(8) {
        m.insert("_id".into(), json!(i64::from(input.u8() % 4)));
    }
    Json::Object(m)
}
