//! Invariant 6: bad input is a typed error, not a crash, and leaves the store intact.
//!
//! Every refused call is checked for its exact error variant and for a store left exactly as
//! it was: digest, visible state, live counts, Updates log and clock high-water mark.

use std::sync::Arc;

use fieldlog::{
    Changeset, Digest, Error, FieldSpec, FieldType, FieldWrite, LogEntry, ManualTimeSource,
    NameKind, Object, Op, Options, Pk, ReplicaId, Schema, Stamp, Store, Value, Write,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const T0: u64 = 1_700_000_000_000;
const COLLS: [&str; 5] = ["Dog", "Cat", "Bird", "Item", ""];

#[derive(Debug, PartialEq)]
struct Snap {
    digest: Digest,
    scans: Vec<Vec<Object>>,
    counts: Vec<u64>,
    head: u64,
    log: Vec<LogEntry>,
    high_water: u64,
}

fn snap(s: &Store) -> Snap {
    Snap {
        digest: s.digest(),
        scans: COLLS.iter().map(|c| s.scan(c).unwrap()).collect(),
        counts: COLLS.iter().map(|c| s.count(c).unwrap()).collect(),
        head: s.log_head(),
        log: s.log_after(0, usize::MAX).unwrap(),
        high_water: s.clock_high_water(),
    }
}

fn opts(clock: &ManualTimeSource) -> Options {
    Options::default().time(Arc::new(clock.clone()))
}

fn open(options: Options) -> Store {
    Store::open_backend(redb::backends::InMemoryBackend::new(), options).unwrap()
}

fn dog_schema() -> Schema {
    Schema::new("Dog")
        .field("name", FieldSpec::required(FieldType::String))
        .field("age", FieldSpec::optional(FieldType::Int))
}

/// A receiving store with a schema on `Dog` and a little data.
fn receiver(options: Options) -> Store {
    let s = open(options);
    s.set_schema(dog_schema()).unwrap();
    s.write(|tx| {
        tx.insert(
            "Dog",
            1,
            [("name", Value::from("Rex")), ("age", Value::from(3))],
        )?;
        tx.insert("Cat", "c", [("x", 1)])
    })
    .unwrap();
    s.write(|tx| tx.set("Cat", "c", "x", 2)).unwrap();
    s
}

/// A small valid changeset from another replica (same clock), as bytes.
fn small_changeset(clock: &ManualTimeSource) -> Vec<u8> {
    let s = open(opts(clock));
    s.write(|tx| {
        tx.insert(
            "Dog",
            7,
            [("name", Value::from("Bo")), ("age", Value::from(1))],
        )
    })
    .unwrap();
    s.write(|tx| {
        tx.set("Dog", 7, "age", 2)?;
        tx.delete("Dog", 7)?;
        tx.insert("Dog", 7, [("name", "Bo2")])
    })
    .unwrap();
    s.export(0, usize::MAX).unwrap().encode().unwrap()
}

macro_rules! assert_err {
    ($r:expr, $pat:pat) => {
        match $r {
            Err($pat) => {}
            other => panic!("expected {}, got {:?}", stringify!($pat), other),
        }
    };
    ($r:expr, $pat:pat, $($ctx:tt)+) => {
        match $r {
            Err($pat) => {}
            other => panic!(
                "expected {}, got {:?} ({})",
                stringify!($pat),
                other,
                format!($($ctx)+)
            ),
        }
    };
}

fn seal(body: &[u8]) -> Vec<u8> {
    let mut out = b"FLC1".to_vec();
    out.extend_from_slice(body);
    let h = blake3::hash(&out);
    out.extend_from_slice(h.as_bytes());
    out
}

#[test]
fn truncated_changesets_are_refused() {
    let clock = ManualTimeSource::new(T0);
    let bytes = small_changeset(&clock);
    let r = receiver(opts(&clock));
    let before = snap(&r);
    for len in 0..bytes.len() {
        assert_err!(
            r.import_bytes(&bytes[..len]),
            Error::BadChangeset { .. },
            "prefix of {len} bytes"
        );
        assert_err!(
            Changeset::decode(&bytes[..len], usize::MAX),
            Error::BadChangeset { .. }
        );
    }
    assert_eq!(snap(&r), before);
    // The whole thing is valid and goes in.
    r.import_bytes(&bytes).unwrap();
    assert_eq!(
        r.get("Dog", 7).unwrap().unwrap().fields,
        [("name".to_string(), Value::from("Bo2"))].into()
    );
}

#[test]
fn every_bit_flip_is_refused() {
    let clock = ManualTimeSource::new(T0);
    let bytes = small_changeset(&clock);
    let r = receiver(opts(&clock));
    let before = snap(&r);
    for bit in 0..bytes.len() * 8 {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        assert_err!(r.import_bytes(&b), Error::BadChangeset { .. }, "bit {bit}");
        if bit % 97 == 0 {
            assert_eq!(snap(&r), before, "bit {bit}");
        }
    }
    assert_eq!(snap(&r), before);
    r.import_bytes(&bytes).unwrap();
}

#[test]
fn random_bytes_are_refused() {
    let clock = ManualTimeSource::new(T0);
    let r = receiver(opts(&clock));
    let before = snap(&r);
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for i in 0..1000 {
        let len = rng.random_range(0..300);
        let mut b = vec![0u8; len];
        rng.fill(&mut b[..]);
        if i % 2 == 0 && len >= 4 {
            b[..4].copy_from_slice(b"FLC1");
        }
        assert_err!(
            r.import_bytes(&b),
            Error::BadChangeset { .. },
            "case {i}: {b:02x?}"
        );
    }
    assert_eq!(snap(&r), before);
}

/// Garbage behind a checksum that passes: the postcard decoder must refuse it, not panic.
#[test]
fn garbage_with_a_valid_checksum_is_refused() {
    let clock = ManualTimeSource::new(T0);
    let r = receiver(opts(&clock));
    let before = snap(&r);
    let mut rng = StdRng::seed_from_u64(0x6a7b);
    let mut refused = 0;
    for i in 0..1000 {
        let len = rng.random_range(0..200);
        let mut body = vec![0u8; len];
        rng.fill(&mut body[..]);
        let bytes = seal(&body);
        if Changeset::decode(&bytes, usize::MAX).is_ok() {
            // Random bytes that happen to be a well-formed changeset are not garbage.
            continue;
        }
        assert_err!(
            r.import_bytes(&bytes),
            Error::BadChangeset { .. },
            "case {i}"
        );
        refused += 1;
    }
    assert!(refused >= 990, "only {refused} of 1000 were garbage");
    assert_eq!(snap(&r), before);
}

/// Postcard by hand: the valid changeset below, then one malformation at a time.
struct Enc(Vec<u8>);

impl Enc {
    fn new() -> Self {
        Enc(Vec::new())
    }
    fn v(mut self, mut x: u64) -> Self {
        loop {
            let b = (x & 0x7f) as u8;
            x >>= 7;
            if x == 0 {
                self.0.push(b);
                return self;
            }
            self.0.push(b | 0x80);
        }
    }
    fn s(self, s: &[u8]) -> Self {
        let mut e = self.v(s.len() as u64);
        e.0.extend_from_slice(s);
        e
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

fn zigzag(i: i64) -> u64 {
    ((i << 1) ^ (i >> 63)) as u64
}

/// origin, entries.len, seq, stamp.time, stamp.replica, writes.len, collection, pk.
fn head(time: u64) -> Enc {
    Enc::new()
        .v(42)
        .v(1)
        .v(1)
        .v(time)
        .v(42)
        .v(1)
        .s(b"Dog")
        .v(0)
        .v(zigzag(7))
}

#[test]
fn malformed_postcard_is_refused() {
    let clock = ManualTimeSource::new(T0);
    let r = receiver(opts(&clock));
    let time = T0 << 16;
    // Op::Insert, one field, "name" = Value::String("Rex").
    let valid = head(time).v(0).v(1).s(b"name").v(4).s(b"Rex").0;
    let expect = Changeset {
        origin: ReplicaId(42),
        entries: vec![LogEntry {
            seq: 1,
            stamp: Stamp {
                time,
                replica: ReplicaId(42),
            },
            writes: vec![Write {
                collection: "Dog".into(),
                pk: Pk::Int(7),
                op: Op::Insert {
                    fields: vec![("name".into(), Value::from("Rex"))],
                },
            }],
        }],
    };
    assert_eq!(
        seal(&valid),
        expect.encode().unwrap(),
        "the hand encoding is right"
    );
    assert_eq!(
        Changeset::decode(&seal(&valid), usize::MAX).unwrap(),
        expect
    );

    let before = snap(&r);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty body", vec![]),
        ("value tag 6", head(time).v(0).v(1).s(b"name").v(6).0),
        (
            "value tag huge",
            head(time).v(0).v(1).s(b"name").v(u64::MAX).0,
        ),
        ("bool 2", head(time).v(0).v(1).s(b"name").v(1).raw(&[2]).0),
        (
            "short float",
            head(time).v(0).v(1).s(b"name").v(3).raw(&[0; 5]).0,
        ),
        ("op tag 3", head(time).v(3).0),
        ("delete base tag 2", head(time).v(2).v(2).0),
        (
            "pk tag 4",
            Enc::new()
                .v(42)
                .v(1)
                .v(1)
                .v(time)
                .v(42)
                .v(1)
                .s(b"Dog")
                .v(4)
                .0,
        ),
        (
            "collection not UTF-8",
            Enc::new()
                .v(42)
                .v(1)
                .v(1)
                .v(time)
                .v(42)
                .v(1)
                .s(b"D\xffg")
                .v(0)
                .v(zigzag(7))
                .v(2)
                .v(0)
                .0,
        ),
        ("field not UTF-8", head(time).v(0).v(1).s(b"n\xc3").v(0).0),
        (
            "string runs past the end",
            head(time).v(0).v(1).s(b"name").v(4).v(1000).raw(b"Rex").0,
        ),
        ("trailing byte", {
            let mut b = valid.clone();
            b.push(0);
            b
        }),
        ("last byte cut", valid[..valid.len() - 1].to_vec()),
        ("u64::MAX entries", Enc::new().v(42).v(u64::MAX).0),
        (
            "u64::MAX writes",
            Enc::new().v(42).v(1).v(1).v(time).v(42).v(u64::MAX).0,
        ),
        ("u64::MAX fields", head(time).v(0).v(u64::MAX).0),
        ("overlong varint", Enc::new().raw(&[0xff; 11]).0),
        (
            "varint over u64",
            Enc::new()
                .raw(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f])
                .0,
        ),
        (
            "pk Id12 short",
            Enc::new()
                .v(42)
                .v(1)
                .v(1)
                .v(time)
                .v(42)
                .v(1)
                .s(b"Dog")
                .v(2)
                .raw(&[1; 5])
                .0,
        ),
    ];
    for (what, body) in cases {
        assert_err!(
            r.import_bytes(&seal(&body)),
            Error::BadChangeset { .. },
            "{what}"
        );
    }
    assert_eq!(snap(&r), before);
}

fn entry(seq: u64, time: u64, writes: Vec<Write>) -> LogEntry {
    LogEntry {
        seq,
        stamp: Stamp {
            time,
            replica: ReplicaId(42),
        },
        writes,
    }
}

fn insert(coll: &str, pk: impl Into<Pk>, fields: &[(&str, Value)]) -> Write {
    Write {
        collection: coll.into(),
        pk: pk.into(),
        op: Op::Insert {
            fields: fields
                .iter()
                .map(|(f, v)| (f.to_string(), v.clone()))
                .collect(),
        },
    }
}

fn update(coll: &str, pk: impl Into<Pk>, fields: &[(&str, Value)]) -> Write {
    Write {
        collection: coll.into(),
        pk: pk.into(),
        op: Op::Update {
            fields: fields
                .iter()
                .map(|(f, v)| FieldWrite {
                    field: f.to_string(),
                    value: v.clone(),
                    base: None,
                })
                .collect(),
        },
    }
}

fn cs(entries: Vec<LogEntry>) -> Changeset {
    Changeset {
        origin: ReplicaId(42),
        entries,
    }
}

/// Well-formed postcard whose content breaks the rules: refused whole, by bytes or struct.
#[test]
fn invalid_changeset_content_is_refused() {
    let clock = ManualTimeSource::new(T0);
    let r = receiver(opts(&clock));
    let t = T0 << 16;
    let ok = || insert("Cat", 9, &[("x", Value::from(1))]);
    let long = "x".repeat(65);
    let long_pk = "p".repeat(257);
    let cases: Vec<(&str, Changeset)> = vec![
        (
            "empty field name",
            cs(vec![entry(
                1,
                t,
                vec![ok(), insert("Bird", 1, &[("", Value::Null)])],
            )]),
        ),
        (
            "reserved field name",
            cs(vec![entry(
                1,
                t,
                vec![ok(), update("Bird", 1, &[("__x", Value::Null)])],
            )]),
        ),
        (
            "_id field",
            cs(vec![entry(
                1,
                t,
                vec![ok(), insert("Bird", 1, &[("_id", Value::Null)])],
            )]),
        ),
        (
            "long field name",
            cs(vec![entry(
                1,
                t,
                vec![ok(), insert("Bird", 1, &[(&long, Value::Null)])],
            )]),
        ),
        (
            "space in field name",
            cs(vec![entry(
                1,
                t,
                vec![ok(), insert("Bird", 1, &[("a b", Value::Null)])],
            )]),
        ),
        (
            "empty collection",
            cs(vec![entry(1, t, vec![ok(), insert("", 1, &[])])]),
        ),
        (
            "reserved collection",
            cs(vec![entry(1, t, vec![ok(), insert("__c", 1, &[])])]),
        ),
        (
            "long collection",
            cs(vec![entry(1, t, vec![ok(), insert(&long, 1, &[])])]),
        ),
        (
            "empty string pk",
            cs(vec![entry(1, t, vec![ok(), insert("Bird", "", &[])])]),
        ),
        (
            "257-byte pk",
            cs(vec![entry(
                1,
                t,
                vec![ok(), insert("Bird", long_pk.as_str(), &[])],
            )]),
        ),
        ("seq 0", cs(vec![entry(0, t, vec![ok()])])),
        (
            "seq repeats",
            cs(vec![
                entry(1, t, vec![ok()]),
                entry(1, t + 1, vec![update("Cat", 9, &[("x", Value::from(2))])]),
            ]),
        ),
        (
            "seq falls",
            cs(vec![
                entry(5, t, vec![ok()]),
                entry(4, t + 1, vec![update("Cat", 9, &[("x", Value::from(2))])]),
            ]),
        ),
        (
            "two writes to one object",
            cs(vec![entry(
                1,
                t,
                vec![ok(), update("Cat", 9, &[("x", Value::from(2))])],
            )]),
        ),
        (
            "update of no fields",
            cs(vec![entry(1, t, vec![ok(), update("Bird", 1, &[])])]),
        ),
        (
            "field twice in insert",
            cs(vec![entry(
                1,
                t,
                vec![insert(
                    "Bird",
                    1,
                    &[("a", Value::from(1)), ("a", Value::from(2))],
                )],
            )]),
        ),
        (
            "field twice in update",
            cs(vec![entry(
                1,
                t,
                vec![update(
                    "Bird",
                    1,
                    &[("a", Value::from(1)), ("a", Value::from(2))],
                )],
            )]),
        ),
    ];
    let before = snap(&r);
    for (what, c) in cases {
        assert_err!(r.import(&c), Error::BadChangeset { .. }, "{what} (struct)");
        assert_err!(
            r.import_bytes(&c.encode().unwrap()),
            Error::BadChangeset { .. },
            "{what} (bytes)"
        );
        assert_eq!(snap(&r), before, "{what}");
    }
}

#[test]
fn remote_schema_violation_refuses_the_whole_changeset() {
    let clock = ManualTimeSource::new(T0);
    let r = receiver(opts(&clock));
    // Ten milliseconds ahead of the receiver: newer than its own writes, within the bound.
    let t = (T0 + 10) << 16;
    let before = snap(&r);
    let valid = || {
        entry(
            1,
            t,
            vec![
                insert("Cat", 5, &[("x", Value::from(1))]),
                insert("Dog", 2, &[("name", Value::from("ok"))]),
                update("Dog", 1, &[("age", Value::from(4))]),
            ],
        )
    };
    let cases: Vec<(Write, Pk, &str, &str, &str)> = vec![
        // (bad write, pk, field, expected, found)
        (
            update("Dog", 3, &[("age", Value::from("old"))]),
            Pk::Int(3),
            "age",
            "int",
            "string",
        ),
        (
            update("Dog", 1, &[("name", Value::from(5))]),
            Pk::Int(1),
            "name",
            "string",
            "int",
        ),
        (
            update("Dog", 1, &[("name", Value::Null)]),
            Pk::Int(1),
            "name",
            "string (required)",
            "null",
        ),
        (
            insert(
                "Dog",
                "d",
                &[("name", Value::from("x")), ("color", Value::from("red"))],
            ),
            Pk::Str("d".into()),
            "color",
            "a declared field",
            "an undeclared field",
        ),
        (
            insert("Dog", 4, &[("age", Value::from(2))]),
            Pk::Int(4),
            "name",
            "a value for required string field",
            "nothing",
        ),
    ];
    for (bad, want_pk, want_field, want_expected, want_found) in cases {
        let c = cs(vec![valid(), entry(2, t + 1, vec![bad])]);
        for bytes in [false, true] {
            let res = if bytes {
                r.import_bytes(&c.encode().unwrap())
            } else {
                r.import(&c)
            };
            match res {
                Err(Error::Schema {
                    collection,
                    pk,
                    field,
                    expected,
                    found,
                }) => {
                    assert_eq!(collection, "Dog");
                    assert_eq!(pk, want_pk);
                    assert_eq!(field, want_field);
                    assert_eq!(expected, want_expected);
                    assert_eq!(found, want_found);
                }
                other => panic!("{want_field}: expected Error::Schema, got {other:?}"),
            }
            assert_eq!(snap(&r), before, "nothing of the changeset applied");
        }
    }
    // The valid part alone goes in.
    r.import(&cs(vec![valid()])).unwrap();
    assert!(r.get("Cat", 5).unwrap().is_some());
    assert_eq!(
        r.get_field("Dog", 1, "age").unwrap().map(|x| x.0),
        Some(Value::from(4))
    );
}

#[test]
fn local_schema_violations_are_refused() {
    let r = receiver(Options::default());
    let before = snap(&r);
    let schema_err = |res: fieldlog::Result<((), fieldlog::Committed)>,
                      pk: Pk,
                      field: &str,
                      expected: &str,
                      found: &str| match res {
        Err(Error::Schema {
            collection,
            pk: p,
            field: f,
            expected: e,
            found: fd,
        }) => {
            assert_eq!((collection.as_str(), p, f.as_str()), ("Dog", pk, field));
            assert_eq!((e.as_str(), fd.as_str()), (expected, found));
        }
        other => panic!("expected Error::Schema for {field}, got {other:?}"),
    };
    schema_err(
        r.write(|tx| tx.insert("Dog", 3, [("name", 5)])),
        Pk::Int(3),
        "name",
        "string",
        "int",
    );
    schema_err(
        r.write(|tx| tx.set("Dog", 1, "age", "old")),
        Pk::Int(1),
        "age",
        "int",
        "string",
    );
    schema_err(
        r.write(|tx| tx.update("Dog", 1, [("age", Value::from(4)), ("name", Value::Null)])),
        Pk::Int(1),
        "name",
        "string (required)",
        "null",
    );
    schema_err(
        r.write(|tx| tx.set("Dog", 1, "color", "red")),
        Pk::Int(1),
        "color",
        "a declared field",
        "an undeclared field",
    );
    schema_err(
        r.write(|tx| tx.insert("Dog", 4, [("age", 2)])),
        Pk::Int(4),
        "name",
        "a value for required string field",
        "nothing",
    );
    schema_err(
        r.write(|tx| tx.insert("Dog", 4, [("name", Value::Null)])),
        Pk::Int(4),
        "name",
        "string (required)",
        "null",
    );
    #[derive(serde::Serialize)]
    struct BadDog {
        name: String,
        age: String,
    }
    let bad = BadDog {
        name: "Rex".into(),
        age: "three".into(),
    };
    schema_err(
        r.write(|tx| tx.put("Dog", 5, &bad).map(|_| ())),
        Pk::Int(5),
        "age",
        "int",
        "string",
    );
    assert_eq!(snap(&r), before);
}

#[test]
fn oversized_values_are_refused() {
    let clock = ManualTimeSource::new(T0);
    let r = receiver(opts(&clock).value_bytes_max(16));
    let before = snap(&r);
    let big = "x".repeat(17);
    match r.write(|tx| tx.insert("Dog", 2, [("name", big.as_str())])) {
        Err(Error::ValueTooLarge {
            collection,
            pk,
            field,
            size,
            max,
        }) => {
            assert_eq!(
                (collection.as_str(), pk, field.as_str(), size, max),
                ("Dog", Pk::Int(2), "name", 17, 16)
            );
        }
        other => panic!("expected ValueTooLarge, got {other:?}"),
    }
    assert_err!(
        r.write(|tx| tx.set("Cat", "c", "blob", vec![0u8; 17])),
        Error::ValueTooLarge {
            size: 17,
            max: 16,
            ..
        }
    );
    assert_eq!(snap(&r), before);

    // Remote: a sender with the default limit.
    let sender = open(opts(&clock));
    sender
        .write(|tx| tx.insert("Dog", 3, [("name", big.as_str())]))
        .unwrap();
    let c = sender.export(0, usize::MAX).unwrap();
    assert_err!(r.import(&c), Error::BadChangeset { .. });
    assert_err!(
        r.import_bytes(&c.encode().unwrap()),
        Error::BadChangeset { .. }
    );
    assert_err!(
        Changeset::decode(&c.encode().unwrap(), 16),
        Error::BadChangeset { .. }
    );
    assert_eq!(snap(&r), before);

    // At the limit: accepted, locally and remotely.
    let at = "y".repeat(16);
    r.write(|tx| tx.set("Cat", "c", "blob", vec![0u8; 16]))
        .unwrap();
    sender
        .write(|tx| tx.set("Dog", 3, "name", at.as_str()))
        .unwrap();
    r.import(&sender.export(1, usize::MAX).unwrap()).unwrap();
}

#[test]
fn clock_drift_is_refused_and_the_bound_is_honoured() {
    let clock = ManualTimeSource::new(T0);
    let r = receiver(opts(&clock).max_drift_ms(60_000));
    let sender_at = |ms: u64| {
        let c = ManualTimeSource::new(ms);
        (open(opts(&c)), c)
    };
    let before = snap(&r);

    // An hour ahead.
    let (s, _) = sender_at(T0 + 3_600_000);
    let (_, c) = s
        .write(|tx| tx.insert("Dog", 9, [("name", "Future")]))
        .unwrap();
    let far = c.stamp.unwrap();
    let cs_far = s.export(0, usize::MAX).unwrap();
    for bytes in [false, true] {
        let res = if bytes {
            r.import_bytes(&cs_far.encode().unwrap())
        } else {
            r.import(&cs_far)
        };
        match res {
            Err(Error::ClockDrift {
                stamp,
                now_ms,
                max_drift_ms,
            }) => {
                assert_eq!((stamp, now_ms, max_drift_ms), (far, T0, 60_000));
            }
            other => panic!("expected ClockDrift, got {other:?}"),
        }
        assert_eq!(snap(&r), before, "refused, and the clock did not move");
    }

    // One good entry, then the sender's clock jumps: the whole changeset is refused.
    let (s, sc) = sender_at(T0 + 1_000);
    s.write(|tx| tx.insert("Dog", 10, [("name", "Ok")]))
        .unwrap();
    sc.set(T0 + 3_600_000);
    s.write(|tx| tx.set("Dog", 10, "name", "Late")).unwrap();
    assert_err!(
        r.import(&s.export(0, usize::MAX).unwrap()),
        Error::ClockDrift { .. }
    );
    assert_eq!(snap(&r), before);

    // A stamp of u64::MAX.
    let mut max = s.export(0, 1).unwrap();
    max.entries[0].stamp.time = u64::MAX;
    assert_err!(r.import(&max), Error::ClockDrift { .. });
    assert_eq!(snap(&r), before);

    // One millisecond past the bound: refused; at the bound: accepted.
    let (s, _) = sender_at(T0 + 60_001);
    s.write(|tx| tx.insert("Dog", 11, [("name", "Edge")]))
        .unwrap();
    assert_err!(
        r.import(&s.export(0, usize::MAX).unwrap()),
        Error::ClockDrift { .. }
    );
    assert_eq!(snap(&r), before);
    let (s, _) = sender_at(T0 + 60_000);
    let (_, c) = s
        .write(|tx| tx.insert("Dog", 11, [("name", "Edge")]))
        .unwrap();
    let edge = c.stamp.unwrap();
    r.import(&s.export(0, usize::MAX).unwrap()).unwrap();
    assert!(r.clock_high_water() >= edge.time);

    // The receiver's next stamp is above it, though its wall clock is a minute behind.
    let (_, mine) = r.write(|tx| tx.set("Dog", 11, "name", "Mine")).unwrap();
    let mine = mine.stamp.unwrap();
    assert!(mine.time > edge.time, "{mine} must be above {edge}");
    s.import(&r.export(0, usize::MAX).unwrap()).unwrap();
    for st in [&r, &s] {
        assert_eq!(
            st.get_field("Dog", 11, "name").unwrap(),
            Some((Value::from("Mine"), mine))
        );
    }
}

#[test]
fn bad_names_and_keys_are_refused() {
    let r = receiver(Options::default());
    let before = snap(&r);
    let long = "x".repeat(65);
    let bad_names = ["", "__x", "_id", long.as_str(), "a b", "é", "a/b"];
    for name in bad_names {
        assert_err!(
            r.write(|tx| tx.insert(name, 1, [("a", 1)])),
            Error::BadName {
                kind: NameKind::Collection,
                ..
            },
            "insert into collection {name:?}"
        );
        assert_err!(
            r.write(|tx| tx.delete(name, 1)),
            Error::BadName {
                kind: NameKind::Collection,
                ..
            },
            "delete from collection {name:?}"
        );
        assert_err!(
            r.write(|tx| tx.insert("Bird", 1, [("a", 1), (name, 2)])),
            Error::BadName {
                kind: NameKind::Field,
                ..
            },
            "insert field {name:?}"
        );
        assert_err!(
            r.write(|tx| tx.set("Cat", "c", name, 2)),
            Error::BadName {
                kind: NameKind::Field,
                ..
            },
            "set field {name:?}"
        );
        assert_err!(
            r.set_schema(Schema::new(name)),
            Error::BadName {
                kind: NameKind::Collection,
                ..
            },
            "schema {name:?}"
        );
        assert_err!(
            r.set_schema(Schema::new("Bird").field(name, FieldSpec::optional(FieldType::Any))),
            Error::BadName {
                kind: NameKind::Field,
                ..
            },
            "schema field {name:?}"
        );
        // Reads with bad names find nothing and do not fail hard.
        let _ = r.get(name, 1);
        let _ = r.get_field("Cat", "c", name);
        let _ = r.scan(name);
    }
    let long_pk = "p".repeat(257);
    for pk in ["", long_pk.as_str()] {
        assert_err!(
            r.write(|tx| tx.insert("Cat", pk, [("x", 1)])),
            Error::BadPk { .. },
            "insert pk of {} bytes",
            pk.len()
        );
        assert_err!(r.write(|tx| tx.delete("Cat", pk)), Error::BadPk { .. });
        assert_err!(r.write(|tx| tx.set("Cat", pk, "x", 1)), Error::BadPk { .. });
    }
    assert_eq!(snap(&r), before);
    assert!(r.schema("Bird").is_none());

    // At the limits: accepted.
    let name64 = "n".repeat(64);
    let pk256 = "p".repeat(256);
    r.write(|tx| {
        tx.insert(
            &name64,
            pk256.as_str(),
            [(name64.as_str(), 1), ("a-b.c_d", 2)],
        )
    })
    .unwrap();
    assert_eq!(r.count(&name64).unwrap(), 1);
}

#[test]
fn a_failed_call_leaves_the_transaction_intact() {
    let r = receiver(Options::default().value_bytes_max(16));
    let head = r.log_head();
    let dog1 = r.get("Dog", 1).unwrap();
    let mut tx = r.begin().unwrap();
    tx.insert(
        "Dog",
        5,
        [("name", Value::from("Bo")), ("age", Value::from(1))],
    )
    .unwrap();
    assert_err!(
        tx.insert("Dog", 5, [("name", "again")]),
        Error::AlreadyExists { .. }
    );
    assert_err!(
        tx.insert("Dog", 1, [("name", "again")]),
        Error::AlreadyExists { .. }
    );
    assert_err!(tx.update("Dog", 99, [("age", 1)]), Error::NotFound { .. });
    assert_err!(tx.delete("Cat", "zz"), Error::NotFound { .. });
    assert_err!(tx.delete("Fish", 1), Error::NotFound { .. });
    assert_err!(tx.set("Dog", 5, "age", "old"), Error::Schema { .. });
    assert_err!(
        tx.update("Dog", 5, [("age", Value::from(2)), ("name", Value::Null)]),
        Error::Schema { .. }
    );
    assert_err!(
        tx.set("Dog", 5, "name", "z".repeat(17)),
        Error::ValueTooLarge { .. }
    );
    assert_err!(
        tx.update("Cat", "c", [("y", vec![0u8; 3]), ("z", vec![0u8; 17])]),
        Error::ValueTooLarge { .. }
    );
    assert_err!(
        tx.insert("Bird", 1, [("ok", 1), ("__x", 2)]),
        Error::BadName { .. }
    );
    assert_err!(tx.set("Dog", 5, "__bad", 1), Error::BadName { .. });
    assert_err!(tx.insert("Dog", "", [("name", "x")]), Error::BadPk { .. });
    assert_eq!(
        tx.get("Dog", 5).unwrap().unwrap().fields,
        [
            ("age".to_string(), Value::from(1)),
            ("name".to_string(), Value::from("Bo"))
        ]
        .into()
    );
    tx.set("Cat", "c", "x", 3).unwrap();
    tx.insert("Bird", 2, [("ok", 3)]).unwrap();
    let c = tx.commit().unwrap();
    assert_eq!(c.seq, Some(head + 1));

    assert_eq!(r.get("Dog", 1).unwrap(), dog1);
    assert_eq!(
        r.get("Dog", 5).unwrap().unwrap().fields,
        [
            ("age".to_string(), Value::from(1)),
            ("name".to_string(), Value::from("Bo"))
        ]
        .into()
    );
    assert_eq!(
        r.get("Cat", "c").unwrap().unwrap().fields,
        [("x".to_string(), Value::from(3))].into()
    );
    assert_eq!(r.scan("Bird").unwrap().len(), 1);
    assert_eq!(r.scan("Fish").unwrap(), vec![]);
    let log = r.log_after(head, usize::MAX).unwrap();
    assert_eq!(log.len(), 1);
    let mut objects: Vec<(String, Pk)> = log[0]
        .writes
        .iter()
        .map(|w| (w.collection.clone(), w.pk.clone()))
        .collect();
    objects.sort();
    assert_eq!(
        objects,
        [
            ("Bird".to_string(), Pk::Int(2)),
            ("Cat".to_string(), Pk::Str("c".into())),
            ("Dog".to_string(), Pk::Int(5))
        ]
    );

    // Names interned by the failed calls left nothing behind: a replica that takes the whole
    // log sees the same state.
    let other = Store::open_in_memory().unwrap();
    other.import(&r.export(0, usize::MAX).unwrap()).unwrap();
    for c in ["Dog", "Cat", "Bird", "Fish"] {
        assert_eq!(other.scan(c).unwrap(), r.scan(c).unwrap(), "{c}");
    }
    assert_eq!(other.digest(), r.digest());

    // A closure that fails rolls the whole transaction back.
    let before = snap(&r);
    assert_err!(
        r.write(|tx| {
            tx.set("Cat", "c", "x", 4)?;
            tx.insert("Bird", 3, [("ok", 1)])?;
            tx.set("Dog", 5, "age", "old")
        }),
        Error::Schema { .. }
    );
    assert_eq!(snap(&r), before);
}
