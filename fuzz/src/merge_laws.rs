//! `merge_laws`: convergence (invariant 1) and the clock under exchange.
//!
//! Two or three in-memory stores write concurrently (inserts, updates, deletes, counter
//! increments on a few shared keys) and exchange slices of their logs in an order the input
//! picks, with duplicates. Then every store receives every other store's whole log, one
//! entry per changeset, in an order the input picks. What must hold:
//! - every import of a valid changeset succeeds; importing it again applies nothing and
//!   changes nothing; importing a store's own log into itself changes nothing;
//! - a local commit's stamp is above every stamp its store has seen (the HLC observes
//!   imports);
//! - at the end every store, and a fresh store importing every log in order, has the same
//!   digest and the same objects.

use std::sync::Arc;

use fieldlog::{Changeset, Error, ManualTimeSource, Options, Pk, Store, Value};

use super::input::Input;

const COLLS: [&str; 2] = ["A", "B"];
const FIELDS: [&str; 3] = ["f0", "f1", "f2"];
const STEPS_MAX: usize = 64;
const T0_MS: u64 = 1_700_000_000_000;

struct Replica {
    store: Store,
    /// The highest stamp time this store has issued or imported.
    seen: u64,
}

/// Runs the merge-law checks on `data`.
pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let time = ManualTimeSource::new(T0_MS);
    let open = || {
        let options = Options::default().time(Arc::new(time.clone()));
        Store::open_backend(redb::backends::InMemoryBackend::new(), options).expect("store")
    };
    let n = 2 + input.below(2);
    let mut reps: Vec<Replica> = (0..n)
        .map(|_| Replica {
            store: open(),
            seen: 0,
        })
        .collect();
    let mut steps = 0;
    while !input.is_empty() && steps < STEPS_MAX {
        steps += 1;
        match input.u8() % 8 {
            0..=3 => {
                let i = input.below(n);
                write(&mut reps[i], &mut input);
            }
            4..=6 => {
                let (i, j) = (input.below(n), input.below(n));
                let head = reps[i].store.log_head();
                let after = u64::from(input.u8()) % (head + 1);
                let limit = 1 + input.below(4);
                let cs = reps[i].store.export(after, limit).expect("export");
                deliver(&mut reps, j, &cs, input.bool());
            }
            _ => time.advance(u64::from(input.u8() % 16)),
        }
    }
    // Everyone gets everything, one entry at a time, in an order from the input.
    let mut all: Vec<(usize, Changeset)> = Vec::new();
    for (i, r) in reps.iter().enumerate() {
        let cs = r.store.export(0, usize::MAX).expect("export");
        for e in cs.entries {
            all.push((
                i,
                Changeset {
                    origin: cs.origin,
                    entries: vec![e],
                },
            ));
        }
    }
    for j in 0..n {
        let mut order: Vec<usize> = (0..all.len()).collect();
        // A permutation from the input (Fisher–Yates).
        for k in (1..order.len()).rev() {
            let m = input.below(k + 1);
            order.swap(k, m);
        }
        for &k in &order {
            let (i, cs) = &all[k];
            if *i != j {
                deliver(&mut reps, j, cs, input.one_in(4));
            }
        }
    }
    let oracle = open();
    for r in &reps {
        oracle
            .import(&r.store.export(0, usize::MAX).expect("export"))
            .expect("oracle import");
    }
    for (i, r) in reps.iter().enumerate() {
        assert_eq!(
            r.store.digest(),
            oracle.digest(),
            "replica {i} did not converge"
        );
        for coll in COLLS {
            assert_eq!(
                r.store.scan(coll).expect("scan"),
                oracle.scan(coll).expect("scan"),
                "replica {i} differs in {coll} with an equal digest"
            );
        }
    }
}

fn deliver(reps: &mut [Replica], j: usize, cs: &Changeset, twice: bool) {
    let r = &mut reps[j];
    let own = cs.origin == r.store.replica_id();
    let before = r.store.digest();
    let report = r.store.import(cs).expect("a valid changeset imports");
    if own {
        assert_eq!(report.applied, 0, "a store's own log applied to itself");
        assert_eq!(r.store.digest(), before, "a store's own log changed it");
    }
    if let Some(t) = cs.entries.iter().map(|e| e.stamp.time).max() {
        r.seen = r.seen.max(t);
    }
    if twice {
        let after = r.store.digest();
        let again = r.store.import(cs).expect("a repeated changeset imports");
        assert_eq!(again.applied, 0, "a repeated changeset applied writes");
        assert_eq!(
            r.store.digest(),
            after,
            "a repeated changeset changed the state"
        );
    }
}

fn write(r: &mut Replica, input: &mut Input<'_>) {
    let mut tx = r.store.begin().expect("begin");
    for _ in 0..1 + input.below(3) {
        let coll = *input.choose(&COLLS);
        let pk = Pk::Int(i64::from(input.u8() % 4));
        let field = *input.choose(&FIELDS);
        let res = match input.u8() % 6 {
            0 => {
                let fields: Vec<(&str, Value)> = FIELDS[..1 + input.below(3)]
                    .iter()
                    .map(|f| (*f, input.value()))
                    .collect();
                tx.insert(coll, pk, fields)
            }
            1 | 2 => tx.set(coll, pk, field, input.value()),
            3 => tx.delete(coll, pk),
            4 => tx.increment(coll, pk, "cnt", i64::from(input.u8() % 5) - 2),
            _ => tx.get(coll, pk).map(|_| ()),
        };
        if let Err(e) = res {
            assert!(
                matches!(e, Error::AlreadyExists { .. } | Error::NotFound { .. }),
                "a write failed with {e:?}"
            );
        }
    }
    let c = tx.commit().expect("commit");
    if let Some(s) = c.stamp {
        assert!(
            s.time > r.seen,
            "stamp {s:?} is not above the {} already seen",
            r.seen
        );
        r.seen = s.time;
    }
}
