//! Invariants 1 and 2 (convergence, no stale overwrite) and the merge rule, end to end.
//!
//! The property test drives 2–5 in-memory replicas through random local transactions and
//! random (duplicated, reordered, partial) changeset deliveries, and after every step checks
//! each touched replica against an oracle: a model folded, by the merge rule of
//! `src/merge.rs`, from the set of log entries that replica knows.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use fieldlog::{
    Changeset, Error, LogEntry, ManualTimeSource, Object, Op, Options, Pk, Stamp, Store,
    TimeSource, Value,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

/// A time far from zero, so the physical part of every stamp is realistic.
const T0: u64 = 1_700_000_000_000;

const COLLS: [&str; 2] = ["Dog", "Cat"];
const FIELDS: [&str; 4] = ["a", "b", "c", "d"];

fn pks() -> [Pk; 5] {
    [
        Pk::Int(-7),
        Pk::Int(1),
        Pk::Str("x".into()),
        Pk::Id12([7; 12]),
        Pk::Id16([0xfe; 16]),
    ]
}

fn store_at(clock: &ManualTimeSource) -> Store {
    Store::open_backend(
        redb::backends::InMemoryBackend::new(),
        Options::default().time(Arc::new(clock.clone())),
    )
    .expect("open in-memory store")
}

// ---------------------------------------------------------------------------------------
// The oracle: the merge rule stated declaratively over a *set* of log entries.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Default)]
struct ModelObj {
    /// The highest-stamped insert (true) or delete (false).
    exists: Option<(Stamp, bool)>,
    /// Per field: the highest-stamped write at or above the floor (= the exists stamp).
    fields: BTreeMap<String, (Stamp, Value)>,
}

impl ModelObj {
    fn live(&self) -> bool {
        matches!(self.exists, Some((_, true)))
    }
}

type Model = BTreeMap<(String, Pk), ModelObj>;

fn fold<'a>(entries: impl Iterator<Item = &'a LogEntry> + Clone) -> Model {
    let mut m: Model = BTreeMap::new();
    // Pass 1: the existence register (its stamp is also the floor).
    for e in entries.clone() {
        for w in &e.writes {
            let o = m.entry((w.collection.clone(), w.pk.clone())).or_default();
            let alive = match &w.op {
                Op::Insert { .. } => true,
                Op::Delete { .. } => false,
                Op::Update { .. } => continue,
            };
            if o.exists.is_none_or(|(s, _)| e.stamp > s) {
                o.exists = Some((e.stamp, alive));
            }
        }
    }
    // Pass 2: per-field last writer wins among writes not below the floor.
    for e in entries {
        for w in &e.writes {
            let o = m
                .get_mut(&(w.collection.clone(), w.pk.clone()))
                .expect("pass 1 saw it");
            let floor = o.exists.map_or(Stamp::ZERO, |(s, _)| s);
            if e.stamp < floor {
                continue;
            }
            let fields: Vec<(&String, &Value)> = match &w.op {
                Op::Insert { fields } => fields.iter().map(|(f, v)| (f, v)).collect(),
                Op::Update { fields } => fields.iter().map(|fw| (&fw.field, &fw.value)).collect(),
                Op::Delete { .. } => Vec::new(),
            };
            for (f, v) in fields {
                let slot = o.fields.get(f);
                if slot.is_none_or(|(s, _)| e.stamp > *s) {
                    o.fields.insert(f.clone(), (e.stamp, v.clone()));
                }
            }
        }
    }
    m
}

fn visible(m: &Model, coll: &str) -> Vec<Object> {
    m.iter()
        .filter(|((c, _), o)| c == coll && o.live())
        .map(|((_, pk), o)| Object {
            pk: pk.clone(),
            fields: o
                .fields
                .iter()
                .map(|(f, (_, v))| (f.clone(), v.clone()))
                .collect(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The property test.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Kind {
    Insert,
    Update,
    Set,
    Delete,
}

#[derive(Clone, Debug)]
struct LocalOp {
    kind: Kind,
    coll: usize,
    pk: usize,
    fields: Vec<(usize, Value)>,
}

#[derive(Clone, Debug)]
enum Step {
    /// One local transaction on replica `r % n`.
    Local { r: usize, ops: Vec<LocalOp> },
    /// Replica `from` exports its log after a position (`frac/255` of its head) into the
    /// pool, addressed to `to`, once or twice.
    Sync {
        from: usize,
        to: usize,
        frac: u8,
        dup: bool,
    },
    /// Delivers a random changeset from the pool (as bytes or as a struct).
    Deliver { pick: usize, bytes: bool },
    /// Moves a replica's wall clock (possibly backwards).
    Tick { r: usize, delta: i16 },
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop_oneof![any::<i64>(), -2i64..3].prop_map(Value::Int),
        prop_oneof![
            any::<f64>(),
            Just(f64::NAN),
            Just(-f64::NAN),
            Just(f64::from_bits(0x7ff0_0000_0000_0001)), // a signalling NaN payload
            Just(f64::from_bits(0x7ff8_0000_0000_00ff)), // a quiet NaN payload
            Just(0.0),
            Just(-0.0),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
        ]
        .prop_map(Value::Float),
        "[a-z]{0,5}".prop_map(Value::String),
        proptest::collection::vec(any::<u8>(), 0..6).prop_map(Value::Bytes),
    ]
}

fn local_op() -> impl Strategy<Value = LocalOp> {
    let field = (0..FIELDS.len(), value());
    (
        prop_oneof![
            3 => Just(Kind::Insert),
            2 => Just(Kind::Update),
            3 => Just(Kind::Set),
            1 => Just(Kind::Delete),
        ],
        0..COLLS.len(),
        0..5usize,
        proptest::collection::vec(field, 0..4),
    )
        .prop_map(|(kind, coll, pk, mut fields)| {
            match kind {
                Kind::Set => fields.truncate(1),
                Kind::Delete => fields.clear(),
                Kind::Insert | Kind::Update => {}
            }
            if matches!(kind, Kind::Set | Kind::Update) && fields.is_empty() {
                fields.push((0, Value::Int(0)));
            }
            LocalOp {
                kind,
                coll,
                pk,
                fields,
            }
        })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (any::<usize>(), proptest::collection::vec(local_op(), 1..=4))
            .prop_map(|(r, ops)| Step::Local { r, ops }),
        2 => (any::<usize>(), any::<usize>(), any::<u8>(), any::<bool>())
            .prop_map(|(from, to, frac, dup)| Step::Sync { from, to, frac, dup }),
        3 => (any::<usize>(), any::<bool>()).prop_map(|(pick, bytes)| Step::Deliver { pick, bytes }),
        1 => (any::<usize>(), -300i16..700).prop_map(|(r, delta)| Step::Tick { r, delta }),
    ]
}

struct Replica {
    store: Store,
    clock: ManualTimeSource,
    /// Every log entry this replica holds (its own and imported), by stamp.
    known: BTreeMap<Stamp, LogEntry>,
    /// The highest stamp ever observed per (collection, pk, field) on this replica.
    seen: BTreeMap<(usize, usize, usize), Stamp>,
}

/// What one transaction did to one object, as the test predicts it.
#[derive(Clone, Debug, PartialEq)]
enum Net {
    Insert(BTreeMap<String, Value>),
    Update(BTreeMap<String, Value>),
    Delete,
}

fn net_of(op: &Op) -> Net {
    match op {
        Op::Insert { fields } => Net::Insert(fields.iter().cloned().collect()),
        Op::Update { fields } => Net::Update(
            fields
                .iter()
                .map(|fw| (fw.field.clone(), fw.value.clone()))
                .collect(),
        ),
        Op::Delete { .. } => Net::Delete,
    }
}

fn learn(r: &mut Replica, e: &LogEntry) -> Result<(), TestCaseError> {
    if let Some(old) = r.known.get(&e.stamp) {
        prop_assert_eq!(old, e, "two different entries share stamp {}", e.stamp);
    } else {
        r.known.insert(e.stamp, e.clone());
    }
    Ok(())
}

/// Checks a replica: no field went back to a lower stamp, and the visible state, every
/// field's stamp and the live counts equal the oracle's.
fn check(r: &mut Replica, what: &str) -> Result<(), TestCaseError> {
    let m = fold(r.known.values());
    let pks = pks();
    for (ci, coll) in COLLS.iter().enumerate() {
        for (pi, pk) in pks.iter().enumerate() {
            let o = m.get(&(coll.to_string(), pk.clone()));
            for (fi, f) in FIELDS.iter().enumerate() {
                let got = r.store.get_field(coll, pk.clone(), f).unwrap();
                if let Some((_, s)) = &got {
                    if let Some(prev) = r.seen.get(&(ci, pi, fi)) {
                        prop_assert!(
                            s >= prev,
                            "{what}: {coll}[{pk}].{f} went from stamp {prev} down to {s}"
                        );
                    }
                    r.seen.insert((ci, pi, fi), *s);
                }
                let want = o
                    .filter(|o| o.live())
                    .and_then(|o| o.fields.get(*f))
                    .map(|(s, v)| (v.clone(), *s));
                prop_assert_eq!(got, want, "{}: {}[{}].{} vs oracle", what, coll, pk, f);
            }
        }
        let want = visible(&m, coll);
        prop_assert_eq!(
            r.store.count(coll).unwrap(),
            want.len() as u64,
            "{}: count({})",
            what,
            coll
        );
        prop_assert_eq!(
            r.store.scan(coll).unwrap(),
            want,
            "{}: scan({}) vs oracle",
            what,
            coll
        );
    }
    Ok(())
}

fn run_local(r: &mut Replica, ops: &[LocalOp]) -> Result<(), TestCaseError> {
    let pks = pks();
    let before = fold(r.known.values());
    let max_known = r.known.keys().map(|s| s.time).max();
    let mut net: BTreeMap<(String, Pk), Net> = BTreeMap::new();
    let mut tx = r.store.begin().unwrap();
    for op in ops {
        let coll = COLLS[op.coll];
        let pk = pks[op.pk].clone();
        let key = (coll.to_string(), pk.clone());
        let live = match net.get(&key) {
            Some(Net::Delete) => false,
            Some(_) => true,
            None => before.get(&key).is_some_and(ModelObj::live),
        };
        let fields: Vec<(String, Value)> = op
            .fields
            .iter()
            .map(|(f, v)| (FIELDS[*f].to_string(), v.clone()))
            .collect();
        let res = match op.kind {
            Kind::Insert => tx.insert(coll, pk.clone(), fields.clone()),
            Kind::Update => tx.update(coll, pk.clone(), fields.clone()),
            Kind::Set => tx.set(coll, pk.clone(), &fields[0].0, fields[0].1.clone()),
            Kind::Delete => tx.delete(coll, pk.clone()),
        };
        match (op.kind, live) {
            (Kind::Insert, true) => {
                prop_assert!(
                    matches!(res, Err(Error::AlreadyExists { .. })),
                    "insert of live {coll}[{pk}]: {res:?}"
                );
            }
            (Kind::Update | Kind::Set | Kind::Delete, false) => {
                prop_assert!(
                    matches!(res, Err(Error::NotFound { .. })),
                    "{:?} of missing {coll}[{pk}]: {res:?}",
                    op.kind
                );
            }
            (Kind::Insert, false) => {
                prop_assert!(res.is_ok(), "insert {coll}[{pk}]: {res:?}");
                net.insert(key, Net::Insert(fields.into_iter().collect()));
            }
            (Kind::Update | Kind::Set, true) => {
                prop_assert!(res.is_ok(), "update {coll}[{pk}]: {res:?}");
                match net.get_mut(&key) {
                    Some(Net::Insert(f) | Net::Update(f)) => f.extend(fields),
                    _ => {
                        net.insert(key, Net::Update(fields.into_iter().collect()));
                    }
                }
            }
            (Kind::Delete, true) => {
                prop_assert!(res.is_ok(), "delete {coll}[{pk}]: {res:?}");
                net.insert(key, Net::Delete);
            }
        }
    }
    let c = tx.commit().unwrap();
    if net.is_empty() {
        prop_assert_eq!(c.seq, None);
        prop_assert_eq!(c.stamp, None);
        return Ok(());
    }
    let (seq, stamp) = (c.seq.unwrap(), c.stamp.unwrap());
    prop_assert_eq!(seq, r.store.log_head());
    prop_assert_eq!(stamp.replica, r.store.replica_id());
    if let Some(t) = max_known {
        prop_assert!(
            stamp.time > t,
            "local stamp {stamp} not above known time {t}"
        );
    }
    let entry = r.store.log_after(seq - 1, 1).unwrap();
    prop_assert_eq!(entry.len(), 1);
    let entry = &entry[0];
    prop_assert_eq!(entry.seq, seq);
    prop_assert_eq!(entry.stamp, stamp, "log entry stamp vs Committed.stamp");
    let logged: BTreeMap<(String, Pk), Net> = entry
        .writes
        .iter()
        .map(|w| ((w.collection.clone(), w.pk.clone()), net_of(&w.op)))
        .collect();
    prop_assert_eq!(logged.len(), entry.writes.len(), "one write per object");
    prop_assert_eq!(&logged, &net, "logged net effect vs the calls made");
    learn(r, entry)
}

fn import(r: &mut Replica, cs: &Changeset, bytes: bool) -> Result<(), TestCaseError> {
    let all_known = cs.entries.iter().all(|e| r.known.contains_key(&e.stamp));
    let digest = r.store.digest();
    let report = if bytes {
        r.store.import_bytes(&cs.encode().unwrap())
    } else {
        r.store.import(cs)
    };
    let report = match report {
        Ok(rep) => rep,
        Err(e) => return Err(TestCaseError::fail(format!("import failed: {e}"))),
    };
    let writes: u64 = cs
        .entries
        .iter()
        .flat_map(|e| &e.writes)
        .map(|w| w.op.write_count() as u64)
        .sum();
    prop_assert_eq!(report.applied + report.stale, writes, "{:?}", report);
    if all_known {
        prop_assert_eq!(report.applied, 0, "a duplicate changeset applied writes");
        prop_assert_eq!(
            r.store.digest(),
            digest,
            "a duplicate changeset moved the digest"
        );
    }
    for e in &cs.entries {
        learn(r, e)?;
    }
    Ok(())
}

/// Replicas that hold the same set of entries must have the same digest already.
fn check_same_sets(reps: &[Replica]) -> Result<(), TestCaseError> {
    for a in reps {
        for b in reps {
            if a.known.keys().eq(b.known.keys()) {
                prop_assert_eq!(a.store.digest(), b.store.digest(), "same entries");
            }
        }
    }
    Ok(())
}

fn run(n: usize, steps: Vec<Step>, seed: u64) -> Result<(), TestCaseError> {
    let mut reps: Vec<Replica> = (0..n)
        .map(|_| {
            let clock = ManualTimeSource::new(T0);
            Replica {
                store: store_at(&clock),
                clock,
                known: BTreeMap::new(),
                seen: BTreeMap::new(),
            }
        })
        .collect();
    let mut pool: Vec<(usize, Changeset)> = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        match s {
            Step::Local { r, ops } => {
                let r = &mut reps[r % n];
                run_local(r, ops)?;
                check(r, &format!("step {i} (local)"))?;
            }
            Step::Sync {
                from,
                to,
                frac,
                dup,
            } => {
                let src = &reps[from % n].store;
                let head = src.log_head();
                let pos = head * u64::from(*frac) / 255;
                let cs = src.export(pos, usize::MAX).unwrap();
                prop_assert_eq!(cs.origin, src.replica_id());
                let seqs: Vec<u64> = cs.entries.iter().map(|e| e.seq).collect();
                prop_assert_eq!(seqs, (pos + 1..=head).collect::<Vec<_>>());
                pool.push((to % n, cs.clone()));
                if *dup {
                    pool.push((to % n, cs));
                }
            }
            Step::Deliver { pick, bytes } => {
                if pool.is_empty() {
                    continue;
                }
                let (to, cs) = pool.swap_remove(pick % pool.len());
                import(&mut reps[to], &cs, *bytes)?;
                check(&mut reps[to], &format!("step {i} (deliver)"))?;
            }
            Step::Tick { r, delta } => {
                let c = &reps[r % n].clock;
                c.set(c.now_ms().saturating_add_signed(i64::from(*delta)));
            }
        }
        check_same_sets(&reps)?;
    }

    // The end: what is still in flight, then every full log to every replica, twice, in a
    // random order.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut last: Vec<(usize, Changeset)> = pool;
    for from in &reps {
        let cs = from.store.export(0, usize::MAX).unwrap();
        for to in 0..n {
            last.push((to, cs.clone()));
            last.push((to, cs.clone()));
        }
    }
    last.shuffle(&mut rng);
    for (k, (to, cs)) in last.iter().enumerate() {
        import(&mut reps[*to], cs, rng.random())?;
        check(&mut reps[*to], &format!("final delivery {k}"))?;
    }

    let all: BTreeSet<Stamp> = reps.iter().flat_map(|r| r.known.keys().copied()).collect();
    let d0 = reps[0].store.digest();
    let scans0: Vec<Vec<Object>> = COLLS
        .iter()
        .map(|c| reps[0].store.scan(c).unwrap())
        .collect();
    for (i, r) in reps.iter().enumerate() {
        prop_assert!(r.known.keys().copied().eq(all.iter().copied()));
        prop_assert_eq!(r.store.digest(), d0, "digest of replica {} vs replica 0", i);
        prop_assert!(
            r.store.verify_digest().unwrap(),
            "incremental digest of replica {} drifted",
            i
        );
        let scans: Vec<Vec<Object>> = COLLS.iter().map(|c| r.store.scan(c).unwrap()).collect();
        prop_assert_eq!(
            &scans,
            &scans0,
            "visible state of replica {} vs replica 0",
            i
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_and_match_the_oracle(
        n in 2usize..=5,
        steps in proptest::collection::vec(step(), 1..48),
        seed in any::<u64>(),
    ) {
        run(n, steps, seed)?;
    }
}

// ---------------------------------------------------------------------------------------
// Plain tests.
// ---------------------------------------------------------------------------------------

fn sync_both(a: &Store, b: &Store) {
    a.import(&b.export(0, usize::MAX).unwrap()).unwrap();
    b.import(&a.export(0, usize::MAX).unwrap()).unwrap();
}

#[test]
fn offline_edits_of_different_fields_both_survive() {
    let a = Store::open_in_memory().unwrap();
    let b = Store::open_in_memory().unwrap();
    a.write(|tx| {
        tx.insert(
            "Dog",
            1,
            [("name", Value::from("Rex")), ("age", Value::from(3))],
        )
    })
    .unwrap();
    b.import(&a.export(0, usize::MAX).unwrap()).unwrap();
    let seen_a = a.get("Dog", 1).unwrap().unwrap();
    let seen_b = b.get("Dog", 1).unwrap().unwrap();

    // Offline: A changes the age, B renames. B writes last.
    let (_, ca) = a.write(|tx| tx.set("Dog", 1, "age", 4)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2));
    let (_, cb) = b.write(|tx| tx.set("Dog", 1, "name", "Max")).unwrap();
    let (ta, tb) = (ca.stamp.unwrap(), cb.stamp.unwrap());

    sync_both(&a, &b);
    for s in [&a, &b] {
        let dog = s.get("Dog", 1).unwrap().unwrap();
        assert_eq!(dog.get("name"), Some(&Value::from("Max")));
        assert_eq!(dog.get("age"), Some(&Value::from(4)));
    }
    assert_eq!(a.digest(), b.digest());

    // The manual recipe: whole objects with a per-object `lastUpdated`; the newer copy wins.
    let mut copy_a = seen_a.clone();
    copy_a.fields.insert("age".into(), Value::from(4));
    let mut copy_b = seen_b.clone();
    copy_b.fields.insert("name".into(), Value::from("Max"));
    let whole = if ta > tb { &copy_a } else { &copy_b };
    let lost_one =
        whole.get("name") != Some(&Value::from("Max")) || whole.get("age") != Some(&Value::from(4));
    assert!(
        lost_one,
        "whole-object LWW keeps one side's object: {whole:?}"
    );
}

#[test]
fn reinsert_after_delete_brings_back_no_stale_fields() {
    let ca = ManualTimeSource::new(T0);
    let cd = ManualTimeSource::new(T0);
    let a = store_at(&ca);
    let d = store_at(&cd);
    let b = Store::open_in_memory().unwrap();
    let c = Store::open_in_memory().unwrap();

    a.write(|tx| tx.insert("Item", "k", [("a", Value::from(1)), ("b", Value::from(2))]))
        .unwrap();
    d.import(&a.export(0, usize::MAX).unwrap()).unwrap();
    ca.set(T0 + 1);
    a.write(|tx| tx.delete("Item", "k")).unwrap();
    ca.set(T0 + 2);
    let (_, re) = a
        .write(|tx| tx.insert("Item", "k", [("a", Value::from(3))]))
        .unwrap();
    // D, with a clock still at T0, writes b concurrently with the delete: stamped below it.
    let (_, cdw) = d.write(|tx| tx.set("Item", "k", "b", 99)).unwrap();
    assert!(cdw.stamp.unwrap() < re.stamp.unwrap());
    assert_eq!(
        d.get_field("Item", "k", "b").unwrap().map(|x| x.0),
        Some(Value::from(99))
    );

    let entries: Vec<Changeset> = (0..3).map(|i| a.export(i, 1).unwrap()).collect();
    let from_d = d.export(0, usize::MAX).unwrap();
    // B: newest first. C: the re-insert, D's stale write, then the original insert, the delete.
    for cs in entries.iter().rev().chain([&from_d]) {
        b.import(cs).unwrap();
    }
    for cs in [&entries[2], &from_d, &entries[0], &entries[1]] {
        c.import(cs).unwrap();
    }
    a.import(&from_d).unwrap();
    d.import(&a.export(0, usize::MAX).unwrap()).unwrap();

    for (name, s) in [("a", &a), ("b", &b), ("c", &c), ("d", &d)] {
        let o = s.get("Item", "k").unwrap().expect("re-inserted");
        assert_eq!(
            o.fields,
            BTreeMap::from([("a".to_string(), Value::from(3))]),
            "replica {name}"
        );
        assert_eq!(
            s.get_field("Item", "k", "b").unwrap(),
            None,
            "replica {name}"
        );
        assert_eq!(s.count("Item").unwrap(), 1);
        assert_eq!(s.digest(), a.digest(), "replica {name}");
    }
}

#[test]
fn ties_break_by_replica_id_never_by_value() {
    let clock = ManualTimeSource::new(T0);
    let x = store_at(&clock);
    let y = store_at(&clock);
    assert_ne!(x.replica_id(), y.replica_id());
    let (hi, lo) = if x.replica_id() > y.replica_id() {
        (&x, &y)
    } else {
        (&y, &x)
    };
    // Each round the higher replica writes the value that sorts lower (and vice versa).
    let rounds: [(Value, Value); 4] = [
        (Value::from("a"), Value::from("z")),
        (Value::Null, Value::Bytes(vec![0xff; 4])),
        (Value::Float(-0.0), Value::Float(0.0)),
        (Value::Int(i64::MIN), Value::Float(f64::NAN)),
    ];
    for (round, (hv, lv)) in rounds.into_iter().enumerate() {
        let write = |s: &Store, v: Value| {
            let (_, c) = if round == 0 {
                s.write(|tx| tx.insert("Dog", 1, [("name", v)])).unwrap()
            } else {
                s.write(|tx| tx.set("Dog", 1, "name", v)).unwrap()
            };
            c.stamp.unwrap()
        };
        let sh = write(hi, hv.clone());
        let sl = write(lo, lv.clone());
        assert_eq!(sh.time, sl.time, "round {round}: same hybrid time");
        assert!(sh > sl);
        assert!(lv > hv, "the loser's value sorts higher");
        sync_both(hi, lo);
        for s in [hi, lo] {
            let (v, st) = s.get_field("Dog", 1, "name").unwrap().unwrap();
            assert_eq!(v, hv, "round {round}");
            assert_eq!(st, sh, "round {round}");
        }
        if let Value::Float(f) = hv {
            let (v, _) = lo.get_field("Dog", 1, "name").unwrap().unwrap();
            assert!(matches!(v, Value::Float(g) if g.to_bits() == f.to_bits()));
        }
        assert_eq!(hi.digest(), lo.digest());
    }
}

#[test]
fn one_transaction_one_stamp_whole_objects_never_mix() {
    #[derive(serde::Serialize)]
    struct Whole {
        f0: String,
        f1: String,
        f2: String,
        f3: String,
        f4: String,
        f5: String,
    }
    let fields = ["f0", "f1", "f2", "f3", "f4", "f5"];
    let clock_a = ManualTimeSource::new(T0);
    let clock_b = ManualTimeSource::new(T0);
    let a = store_at(&clock_a);
    let b = store_at(&clock_b);
    a.write(|tx| tx.insert("Obj", 1, fields.map(|f| (f, Value::from(0)))))
        .unwrap();
    b.import(&a.export(0, usize::MAX).unwrap()).unwrap();

    let mut rng = StdRng::seed_from_u64(7);
    let mut wins = [0; 2];
    for round in 0..40 {
        let base = T0 + 1000 * (round + 1);
        clock_a.set(base + rng.random_range(0..3));
        clock_b.set(base + rng.random_range(0..3));
        let (ha, hb) = (a.log_head(), b.log_head());
        let write = |s: &Store, tag: &str| -> Stamp {
            let v = |i: usize| format!("{tag}{round}.{i}");
            let (_, c) = match round % 3 {
                // One call per field.
                0 => s
                    .write(|tx| {
                        for (i, f) in fields.iter().enumerate() {
                            tx.set("Obj", 1, f, v(i))?;
                        }
                        Ok(())
                    })
                    .unwrap(),
                // One update of every field.
                1 => s
                    .write(|tx| {
                        tx.update("Obj", 1, fields.iter().enumerate().map(|(i, f)| (*f, v(i))))
                    })
                    .unwrap(),
                // A struct.
                _ => s
                    .write(|tx| {
                        let w = Whole {
                            f0: v(0),
                            f1: v(1),
                            f2: v(2),
                            f3: v(3),
                            f4: v(4),
                            f5: v(5),
                        };
                        tx.put("Obj", 1, &w).map(|_| ())
                    })
                    .unwrap(),
            };
            c.stamp.unwrap()
        };
        let sa = write(&a, "A");
        let sb = write(&b, "B");
        for s in [&a, &b] {
            for f in fields {
                let st = s.get_field("Obj", 1, f).unwrap().unwrap().1;
                let own = if std::ptr::eq(s, &a) { sa } else { sb };
                assert_eq!(st, own, "every field of one transaction has its stamp");
            }
        }
        a.import(&b.export(hb, usize::MAX).unwrap()).unwrap();
        b.import(&a.export(ha, usize::MAX).unwrap()).unwrap();
        let (tag, stamp) = if sa > sb { ("A", sa) } else { ("B", sb) };
        wins[usize::from(tag == "B")] += 1;
        for s in [&a, &b] {
            for (i, f) in fields.iter().enumerate() {
                let (v, st) = s.get_field("Obj", 1, f).unwrap().unwrap();
                assert_eq!(
                    v,
                    Value::from(format!("{tag}{round}.{i}")),
                    "round {round}: {f} must come from the same side as the others"
                );
                assert_eq!(st, stamp);
            }
        }
        assert_eq!(a.digest(), b.digest());
    }
    assert!(
        wins[0] > 0 && wins[1] > 0,
        "both sides won some rounds: {wins:?}"
    );
}
