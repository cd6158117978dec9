//! `store_model`: store operations from the input against a model (invariants 2, 3, 6).
//!
//! The store runs on a [`SimDisk`], so it can be reopened cheaply: cleanly (drop, open) or
//! after a power cut (unsynced bytes lost). The model is a map (collection, pk) → fields,
//! plus the log head, `last_sync` and the pruned prefix; a second copy is the model as of
//! the last durable commit. After every step the store must agree with the model:
//! - each call succeeds exactly when the model says it may (live or not, valid names, keys
//!   and sizes, counter overflow), and fails with a typed error otherwise;
//! - a transaction's reads see its own writes; a dropped transaction leaves no trace;
//! - a commit gets the next log position exactly when it wrote, and a stamp above every
//!   stamp before it (after reopening too);
//! - `get`, `scan`, `count`, `log_head`, `last_sync`, the log's positions agree with the
//!   model; a clean reopen keeps everything (deferred commits too); a crash keeps exactly
//!   the durable model;
//! - while nothing is pruned, a fresh store importing the whole log has the same digest;
//! - `Options::keep_acknowledged_for` (none, zero or 100 ms, by the input's length):
//!   acknowledging removes exactly the acknowledged entries that old, with the
//!   acknowledgement (a crash brings both back).

use std::collections::BTreeMap;
use std::sync::Arc;

use fieldlog::{
    Durability, Error, ManualTimeSource, Object, Options, Pk, Stamp, Store, TimeSource, Value,
};

use super::disk::SimDisk;
use super::input::Input;

/// Start of simulated time (ms).
pub const T0_MS: u64 = 1_700_000_000_000;
const COLLS: [&str; 2] = ["A", "B"];
const FIELDS: [&str; 3] = ["f0", "f1", "f2"];
const BAD_NAMES: [&str; 4] = ["", "__x", "_id", "bad name"];
const COUNTER: &str = "cnt";
const VALUE_BYTES_MAX: usize = 32;
const STEPS_MAX: usize = 48;

type Key = (String, Pk);
type Fields = BTreeMap<String, Value>;

#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    objects: BTreeMap<Key, Fields>,
    head: u64,
    last_sync: u64,
    /// Log entries at or below this were pruned.
    pruned: u64,
    /// Each log entry's stamp time (ms).
    times: BTreeMap<u64, u64>,
}

struct Harness {
    disk: SimDisk,
    time: ManualTimeSource,
    store: Option<Store>,
    model: Model,
    durable: Model,
    /// The highest stamp issued so far, and the highest one that is durable.
    max_stamp: Option<Stamp>,
    max_durable_stamp: Option<Stamp>,
    /// `Options::keep_acknowledged_for`, in ms.
    keep_ms: Option<u64>,
}

/// Runs the model checks on `data`.
pub fn check(data: &[u8]) {
    let mut input = Input::new(data);
    let mut h = Harness::new([None, Some(0), Some(100)][data.len() % 3]);
    let mut steps = 0;
    while !input.is_empty() && steps < STEPS_MAX {
        steps += 1;
        let kind = input.u8() % 16;
        if super::tracing() {
            eprintln!("step {steps}: kind {kind} model {:?}", h.model);
        }
        match kind {
            0..=8 => h.transaction(&mut input),
            9 => {
                let pos = u64::from(input.u8() % 8);
                h.mark_synced(pos);
            }
            10 => {
                let upto = u64::from(input.u8() % 8);
                h.prune(upto);
            }
            11 => h.reopen(false),
            12 => h.reopen(true),
            13 => {
                // Time moves, sometimes backwards: stamps must rise regardless.
                let ms = u64::from(input.u8());
                if input.bool() {
                    h.time.advance(ms);
                } else {
                    h.time.set(T0_MS.saturating_sub(ms * 1000));
                }
            }
            14 => h.compare_all(),
            _ => {
                // A fresh store per check is costly: only now and then.
                if input.one_in(4) {
                    h.replay_check();
                }
            }
        }
    }
    // Reopening compares everything with the model.
    h.reopen(false);
    h.replay_check();
}

fn valid_name(n: &str) -> bool {
    !BAD_NAMES.contains(&n)
}

fn valid_pk(pk: &Pk) -> bool {
    !matches!(pk, Pk::Str(s) if s.is_empty() || s.len() > 256)
}

fn typed(e: &Error) -> bool {
    matches!(
        e,
        Error::BadName { .. }
            | Error::BadPk { .. }
            | Error::ValueTooLarge { .. }
            | Error::AlreadyExists { .. }
            | Error::NotFound { .. }
            | Error::Conversion { .. }
            | Error::Schema { .. }
    )
}

fn gen_coll(input: &mut Input<'_>) -> String {
    if input.one_in(12) {
        (*input.choose(&BAD_NAMES)).to_owned()
    } else {
        (*input.choose(&COLLS)).to_owned()
    }
}

fn gen_fields(input: &mut Input<'_>, min: usize) -> Vec<(String, Value)> {
    (0..min + input.below(3))
        .map(|_| {
            let name = if input.one_in(16) {
                (*input.choose(&BAD_NAMES)).to_owned()
            } else {
                (*input.choose(&FIELDS)).to_owned()
            };
            (name, input.value())
        })
        .collect()
}

fn fields_ok(fields: &[(String, Value)]) -> bool {
    fields
        .iter()
        .all(|(n, v)| valid_name(n) && v.size_bytes() <= VALUE_BYTES_MAX)
}

fn objects_of(model: &Model, coll: &str) -> Vec<Object> {
    model
        .objects
        .iter()
        .filter(|((c, _), _)| c == coll)
        .map(|((_, pk), f)| Object {
            pk: pk.clone(),
            fields: f.clone(),
        })
        .collect()
}

impl Harness {
    fn new(keep_ms: Option<u64>) -> Harness {
        let mut h = Harness {
            disk: SimDisk::new(),
            time: ManualTimeSource::new(T0_MS),
            store: None,
            model: Model::default(),
            durable: Model::default(),
            max_stamp: None,
            max_durable_stamp: None,
            keep_ms,
        };
        h.store = Some(h.open());
        h
    }

    fn open(&self) -> Store {
        let options = Options::default()
            .value_bytes_max(VALUE_BYTES_MAX)
            .time(Arc::new(self.time.clone()))
            .keep_acknowledged_for(self.keep_ms.map(std::time::Duration::from_millis));
        Store::open_backend(self.disk.backend(), options).expect("the store opens")
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("open")
    }

    fn transaction(&mut self, input: &mut Input<'_>) {
        let immediate = !input.one_in(4);
        let store = self.store.as_ref().expect("open");
        let mut tx = store.begin().expect("begin");
        if !immediate {
            tx.set_durability(Durability::Deferred);
        }
        let mut view = self.model.objects.clone();
        let mut wrote = false;
        for _ in 0..1 + input.below(4) {
            let coll = gen_coll(input);
            let pk = input.pk();
            let key = (coll.clone(), pk.clone());
            let addressable = valid_name(&coll) && valid_pk(&pk);
            let live = view.contains_key(&key);
            let (what, r, expect_ok) = match input.u8() % 6 {
                0 => {
                    let fields = gen_fields(input, 0);
                    let ok = addressable && !live && fields_ok(&fields);
                    let r = tx.insert(&coll, pk.clone(), fields.clone());
                    if r.is_ok() {
                        view.insert(key.clone(), fields.into_iter().collect());
                    }
                    ("insert", r, ok)
                }
                1 | 2 => {
                    let fields = gen_fields(input, 1);
                    let ok = addressable && live && fields_ok(&fields);
                    let r = if fields.len() == 1 && input.bool() {
                        let (f, v) = fields[0].clone();
                        tx.set(&coll, pk.clone(), &f, v)
                    } else {
                        tx.update(&coll, pk.clone(), fields.clone())
                    };
                    if r.is_ok() {
                        view.entry(key.clone()).or_default().extend(fields);
                    }
                    ("update", r, ok)
                }
                3 => {
                    let r = tx.delete(&coll, pk.clone());
                    if r.is_ok() {
                        view.remove(&key);
                    }
                    ("delete", r, addressable && live)
                }
                4 => {
                    let delta = if input.one_in(8) {
                        i64::MAX
                    } else {
                        i64::from(input.u8() % 7) - 3
                    };
                    let current = match view.get(&key).and_then(|f| f.get(COUNTER)) {
                        Some(Value::Int(n)) => *n,
                        _ => 0,
                    };
                    let total = current.checked_add(delta);
                    let r = tx.increment(&coll, pk.clone(), COUNTER, delta);
                    if r.is_ok() {
                        if let Some(t) = total {
                            view.entry(key.clone())
                                .or_default()
                                .insert(COUNTER.into(), Value::Int(t));
                        }
                    }
                    ("increment", r, addressable && live && total.is_some())
                }
                _ => {
                    let got = tx.get(&coll, pk.clone());
                    match &got {
                        Ok(o) => {
                            assert!(addressable, "read of a bad key succeeded");
                            assert_eq!(
                                o.as_ref().map(|o| &o.fields),
                                view.get(&key),
                                "a transaction does not read its own writes at {key:?}"
                            );
                        }
                        Err(e) => {
                            assert!(!addressable && typed(e), "read failed: {e:?}");
                        }
                    }
                    continue;
                }
            };
            match &r {
                Ok(()) => {
                    assert!(expect_ok, "{what} {key:?} succeeded; the model refuses it");
                    wrote = true;
                }
                Err(e) => {
                    assert!(!expect_ok, "{what} {key:?} failed: {e:?}");
                    assert!(typed(e), "{what} failed with an untyped error: {e:?}");
                }
            }
        }
        if input.one_in(6) {
            drop(tx);
            return;
        }
        let c = tx.commit().expect("commit");
        if super::tracing() {
            eprintln!(
                "  commit {c:?} immediate={immediate} hw={}",
                self.store().clock_high_water()
            );
        }
        assert_eq!(
            c.seq.is_some(),
            wrote,
            "a commit's log entry does not match its writes"
        );
        if let Some(seq) = c.seq {
            assert_eq!(seq, self.model.head + 1, "log positions are not contiguous");
            self.model.head = seq;
            let stamp = c.stamp.expect("a write has a stamp");
            assert!(
                Some(stamp) > self.max_stamp,
                "stamp {stamp:?} is not above {:?}",
                self.max_stamp
            );
            assert!(stamp.time <= self.store().clock_high_water());
            self.max_stamp = Some(stamp);
            self.model.times.insert(seq, stamp.physical_ms());
        }
        self.model.objects = view;
        if immediate && wrote {
            self.durable = self.model.clone();
            self.max_durable_stamp = self.max_stamp;
        }
    }

    fn mark_synced(&mut self, pos: u64) {
        self.store().mark_synced(pos).expect("mark_synced");
        if pos > self.model.last_sync {
            // Not synced by itself: a crash before the next durable commit forgets it.
            self.model.last_sync = pos.min(self.model.head);
            // Entries acknowledged and old enough go with it, oldest first, up to the first
            // that is not.
            let cutoff = match self.keep_ms {
                None => None,
                Some(0) => Some(u64::MAX),
                Some(ms) => self.time.now_ms().checked_sub(ms),
            };
            if let Some(cutoff) = cutoff {
                let m = &mut self.model;
                let first = m.pruned + 1;
                m.pruned = (first..=m.last_sync)
                    .take_while(|s| m.times.get(s).is_some_and(|&t| t <= cutoff))
                    .last()
                    .unwrap_or(m.pruned);
            }
        }
        assert_eq!(self.store().last_sync(), self.model.last_sync);
    }

    fn prune(&mut self, upto: u64) {
        let removed = self.store().prune_log(upto).expect("prune_log");
        let upto = upto.min(self.model.last_sync);
        let expected = upto.saturating_sub(self.model.pruned);
        assert_eq!(removed, expected, "prune_log({upto}) removed {removed}");
        self.model.pruned = self.model.pruned.max(upto);
        self.make_durable();
    }

    /// A durable commit happened: everything before it is durable too.
    fn make_durable(&mut self) {
        self.durable = self.model.clone();
        self.max_durable_stamp = self.max_stamp;
    }

    fn reopen(&mut self, crash: bool) {
        if crash {
            self.disk.crash();
            self.model = self.durable.clone();
            // Stamps of lost deferred commits may be issued again; the next stamp need only
            // be above every durable one.
            self.max_stamp = self.max_durable_stamp;
        }
        // A crashed handle fails every operation, so its close writes nothing.
        self.store = None;
        self.store = Some(self.open());
        // Closing cleanly makes deferred commits durable.
        self.make_durable();
        self.compare_all();
        let hw = self.store().clock_high_water();
        if let Some(s) = self.max_stamp {
            assert!(
                hw >= s.time,
                "clock high-water {hw} below stamp {s:?} (crash: {crash})"
            );
        }
    }

    fn compare_all(&self) {
        let store = self.store();
        for coll in COLLS {
            let want = objects_of(&self.model, coll);
            let got = store.scan(coll).expect("scan");
            assert_eq!(got, want, "scan of {coll} differs from the model");
            assert_eq!(
                store.count(coll).expect("count"),
                want.len() as u64,
                "count of {coll}"
            );
            for o in &want {
                let g = store.get(coll, o.pk.clone()).expect("get");
                assert_eq!(g.as_ref(), Some(o), "get {coll}[{}]", o.pk);
            }
        }
        assert_eq!(store.log_head(), self.model.head, "log head");
        assert_eq!(store.last_sync(), self.model.last_sync, "last_sync");
        let seqs: Vec<u64> = store
            .log_after(0, usize::MAX)
            .expect("log")
            .iter()
            .map(|e| e.seq)
            .collect();
        let want: Vec<u64> =
            (self.model.pruned.min(self.model.head) + 1..=self.model.head).collect();
        assert_eq!(seqs, want, "log positions");
    }

    /// While nothing is pruned, the log replayed into a fresh store gives the same digest.
    fn replay_check(&self) {
        if self.model.pruned > 0 {
            return;
        }
        let store = self.store();
        let options = Options::default().time(Arc::new(self.time.clone()));
        let fresh = Store::open_backend(redb::backends::InMemoryBackend::new(), options)
            .expect("fresh store");
        let cs = store.export(0, usize::MAX).expect("export");
        fresh.import(&cs).expect("import of our own log");
        assert_eq!(
            fresh.digest(),
            store.digest(),
            "the log does not replay to the state"
        );
        for coll in COLLS {
            assert_eq!(
                fresh.scan(coll).expect("scan"),
                store.scan(coll).expect("scan"),
                "replayed {coll} differs"
            );
        }
    }
}
