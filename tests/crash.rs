//! Invariant 3 (durability) under real `kill -9`, in the style of sled's crash tests.
//!
//! `crash_kill9_cycles` runs this test binary again as a child (`child_writer`, selected with
//! `--exact --ignored` and given its store directory in `FIELDLOG_CRASH_CHILD_DIR`). The child
//! writes transactions of mixed shape to a durable store forever and prints one `ACK` line per
//! commit that returned `Ok`. The parent SIGKILLs it after a random 20–300 ms, reopens the
//! same store and checks, against a model built only from `ACK` lines of every cycle so far:
//!
//! 1. the store opens;
//! 2. every acknowledged write is visible with its value and stamp unless a later acknowledged
//!    write replaced it; the only thing allowed beyond the model is the one transaction in
//!    flight at the kill (log head = last acked seq, or last acked seq + 1);
//! 3. no partial transaction: the state's digest equals that of a fresh store that replays
//!    the whole Updates log, and the log is contiguous;
//! 4. the clock: the high-water mark covers every stamp in the store, and a new write's stamp
//!    is strictly greater than all of them.
//!
//! Every cycle reuses the same store, so each child continues the previous one's history.
//! Environment: `FIELDLOG_CRASH_CYCLES` (default 25), `FIELDLOG_CRASH_SEED` (default fixed),
//! `FIELDLOG_CRASH_DIR` (start a fresh store there and keep it, instead of a temporary one).
#![cfg(unix)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fieldlog::{LogEntry, Op, Pk, Store, Value};

const CHILD_DIR_ENV: &str = "FIELDLOG_CRASH_CHILD_DIR";
const CHILD_SEED_ENV: &str = "FIELDLOG_CRASH_CHILD_SEED";
const CHILD_CYCLE_ENV: &str = "FIELDLOG_CRASH_CHILD_CYCLE";
const STORE_FILE: &str = "crash.redb";

/// Collections the child writes; the parent's own probe writes go to `PROBE`.
const COLLS: [&str; 3] = ["A", "B", "C"];
const PROBE: &str = "Probe";
/// Primary keys per collection: few, so deletes and re-inserts of one key are common.
const PKS: u64 = 48;
const FIELDS: [&str; 8] = ["f0", "f1", "f2", "f3", "f4", "f5", "f6", "f7"];

/// splitmix64: small, deterministic, no dependency on a `rand` version.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn mix(a: u64, b: u64) -> u64 {
    Rng::new(a ^ b.wrapping_mul(0x2545_f491_4f6c_dd1d)).next()
}

/// The value a value id stands for; `ACK` lines carry ids, so the parent can rebuild every
/// acknowledged value exactly (a few KB ones included) and compare it bit for bit.
fn value_of(vid: u64) -> Value {
    let mut r = Rng::new(vid);
    match vid % 16 {
        0 => Value::Null,
        1 | 2 => Value::Bool(r.next() & 1 == 1),
        3..=5 => Value::Int(r.next() as i64),
        6 => Value::Float(f64::from_bits(r.next())),
        7..=10 => {
            const CHARS: [char; 8] = ['a', 'b', 'z', ' ', '0', 'é', '字', '🦀'];
            let len = r.below(48);
            Value::String((0..len).map(|_| CHARS[r.below(8) as usize]).collect())
        }
        11..=14 => Value::Bytes((0..r.below(200)).map(|_| r.next() as u8).collect()),
        _ => Value::Bytes((0..1024 + r.below(3072)).map(|_| r.next() as u8).collect()),
    }
}

/// One call the child made in a transaction, as printed in its `ACK` line.
#[derive(Clone, Debug, PartialEq)]
enum AckOp {
    Insert(String, i64, Vec<(String, u64)>),
    Set(String, i64, String, u64),
    Delete(String, i64),
}

/// One acknowledged commit.
#[derive(Clone, Debug, PartialEq)]
struct Ack {
    seq: u64,
    stamp: u64,
    ops: Vec<AckOp>,
}

impl Ack {
    /// `ACK <seq> <stamp> I,A,5,f0=12,f3=99;S,B,7,f2=55;D,C,3`
    fn line(&self) -> String {
        let ops: Vec<String> = self
            .ops
            .iter()
            .map(|op| match op {
                AckOp::Insert(c, pk, fields) => {
                    let mut s = format!("I,{c},{pk}");
                    for (f, vid) in fields {
                        s.push_str(&format!(",{f}={vid}"));
                    }
                    s
                }
                AckOp::Set(c, pk, f, vid) => format!("S,{c},{pk},{f}={vid}"),
                AckOp::Delete(c, pk) => format!("D,{c},{pk}"),
            })
            .collect();
        format!("ACK {} {} {}\n", self.seq, self.stamp, ops.join(";"))
    }

    fn parse(s: &str) -> Option<Ack> {
        let mut parts = s.trim_end().splitn(4, ' ');
        if parts.next()? != "ACK" {
            return None;
        }
        let seq = parts.next()?.parse().ok()?;
        let stamp = parts.next()?.parse().ok()?;
        let field = |kv: &str| -> Option<(String, u64)> {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        };
        let mut ops = Vec::new();
        for op in parts.next()?.split(';') {
            let t: Vec<&str> = op.split(',').collect();
            let (coll, pk) = (t.get(1)?.to_string(), t.get(2)?.parse().ok()?);
            ops.push(match *t.first()? {
                "I" => AckOp::Insert(
                    coll,
                    pk,
                    t[3..].iter().map(|kv| field(kv)).collect::<Option<_>>()?,
                ),
                "S" => {
                    let (f, vid) = field(t.get(3)?)?;
                    AckOp::Set(coll, pk, f, vid)
                }
                "D" => AckOp::Delete(coll, pk),
                _ => return None,
            });
        }
        Some(Ack { seq, stamp, ops })
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// The writer. Without `FIELDLOG_CRASH_CHILD_DIR` it does nothing, so running ignored tests
/// by hand is harmless.
#[test]
#[ignore = "the child process of crash_kill9_cycles; a no-op when run by hand"]
fn child_writer() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let seed = env_u64(CHILD_SEED_ENV).expect("child seed");
    let cycle = env_u64(CHILD_CYCLE_ENV).expect("child cycle");
    let store = Store::open(Path::new(&dir).join(STORE_FILE)).expect("child: open");

    // The child is the only writer: what is live now, it learns from the store once.
    let mut live: BTreeSet<(usize, i64)> = BTreeSet::new();
    for (ci, coll) in COLLS.iter().enumerate() {
        for o in store.scan(coll).expect("child: scan") {
            let Pk::Int(pk) = o.pk else {
                panic!("child: unexpected pk {:?}", o.pk)
            };
            live.insert((ci, pk));
        }
    }

    let mut rng = Rng::new(mix(seed, cycle));
    let deadline = Instant::now() + Duration::from_secs(60);
    let stdout = std::io::stdout();
    loop {
        let n = if rng.below(2) == 0 {
            1 + rng.below(3)
        } else {
            1 + rng.below(20)
        };
        let mut after = live.clone();
        let mut ops = Vec::new();
        for _ in 0..n {
            let r = rng.below(100);
            if r < 30 || after.is_empty() {
                let ci = rng.below(COLLS.len() as u64) as usize;
                let pk = rng.below(PKS) as i64;
                if after.contains(&(ci, pk)) {
                    let f = FIELDS[rng.below(FIELDS.len() as u64) as usize];
                    ops.push(AckOp::Set(COLLS[ci].into(), pk, f.into(), rng.next()));
                } else {
                    let mut fields = BTreeMap::new();
                    for _ in 0..1 + rng.below(6) {
                        let f = FIELDS[rng.below(FIELDS.len() as u64) as usize];
                        fields.insert(f.to_owned(), rng.next());
                    }
                    ops.push(AckOp::Insert(
                        COLLS[ci].into(),
                        pk,
                        fields.into_iter().collect(),
                    ));
                    after.insert((ci, pk));
                }
            } else {
                let &(ci, pk) = after
                    .iter()
                    .nth(rng.below(after.len() as u64) as usize)
                    .expect("non-empty");
                if r < 85 {
                    let f = FIELDS[rng.below(FIELDS.len() as u64) as usize];
                    ops.push(AckOp::Set(COLLS[ci].into(), pk, f.into(), rng.next()));
                } else {
                    ops.push(AckOp::Delete(COLLS[ci].into(), pk));
                    after.remove(&(ci, pk));
                }
            }
        }
        let (_, c) = store
            .write(|tx| {
                for op in &ops {
                    match op {
                        AckOp::Insert(coll, pk, fields) => tx.insert(
                            coll,
                            *pk,
                            fields.iter().map(|(f, vid)| (f.as_str(), value_of(*vid))),
                        )?,
                        AckOp::Set(coll, pk, f, vid) => tx.set(coll, *pk, f, value_of(*vid))?,
                        AckOp::Delete(coll, pk) => tx.delete(coll, *pk)?,
                    }
                }
                Ok(())
            })
            .expect("child: write");
        live = after;
        let ack = Ack {
            seq: c.seq.expect("a transaction with writes has a seq"),
            stamp: c.stamp.expect("a local transaction has a stamp").time,
            ops,
        };
        let mut out = stdout.lock();
        out.write_all(ack.line().as_bytes()).expect("child: stdout");
        out.flush().expect("child: flush");
        drop(out);
        assert!(
            Instant::now() < deadline,
            "child: not killed within 60 s; is the parent alive?"
        );
    }
}

/// One field as the model expects it: its value and the stamp time of the write that set it.
#[derive(Clone, Debug, PartialEq)]
struct Field {
    value: Value,
    stamp: u64,
}

/// Live objects only: (collection, pk) → field → (value, stamp).
type Model = BTreeMap<(String, i64), BTreeMap<String, Field>>;

/// Applies one acknowledged commit. Errors if the child did something the model says was
/// impossible (which would mean the store it read had lost or resurrected something).
fn apply_ack(model: &mut Model, ack: &Ack) -> Result<(), String> {
    let field = |vid: u64| Field {
        value: value_of(vid),
        stamp: ack.stamp,
    };
    for op in &ack.ops {
        match op {
            AckOp::Insert(c, pk, fields) => {
                let key = (c.clone(), *pk);
                if model.contains_key(&key) {
                    return Err(format!("seq {}: child inserted live {c}[{pk}]", ack.seq));
                }
                let fields = fields.iter().map(|(f, v)| (f.clone(), field(*v)));
                model.insert(key, fields.collect());
            }
            AckOp::Set(c, pk, f, vid) => match model.get_mut(&(c.clone(), *pk)) {
                Some(o) => {
                    o.insert(f.clone(), field(*vid));
                }
                None => return Err(format!("seq {}: child set dead {c}[{pk}]", ack.seq)),
            },
            AckOp::Delete(c, pk) => {
                if model.remove(&(c.clone(), *pk)).is_none() {
                    return Err(format!("seq {}: child deleted dead {c}[{pk}]", ack.seq));
                }
            }
        }
    }
    Ok(())
}

/// Applies a log entry (the net effect of one transaction on each object it touched).
fn apply_entry(model: &mut Model, e: &LogEntry) -> Result<(), String> {
    for w in &e.writes {
        let Pk::Int(pk) = w.pk else {
            return Err(format!("seq {}: unexpected pk {:?}", e.seq, w.pk));
        };
        let key = (w.collection.clone(), pk);
        let field = |v: &Value| Field {
            value: v.clone(),
            stamp: e.stamp.time,
        };
        match &w.op {
            Op::Insert { fields } => {
                model.insert(
                    key,
                    fields.iter().map(|(f, v)| (f.clone(), field(v))).collect(),
                );
            }
            Op::Update { fields } => {
                let o = model
                    .get_mut(&key)
                    .ok_or_else(|| format!("seq {}: update of dead {key:?}", e.seq))?;
                for fw in fields {
                    o.insert(fw.field.clone(), field(&fw.value));
                }
            }
            Op::Delete { .. } => {
                model.remove(&key);
            }
        }
    }
    Ok(())
}

/// What one check found.
#[derive(Debug, Default)]
struct Found {
    /// Expected fields or objects missing or different, outside the in-flight transaction.
    lost: u64,
    /// Anything else not explained by acked writes plus at most one whole in-flight
    /// transaction: a half-applied one, a replay mismatch, extra log entries.
    partial: u64,
    problems: Vec<String>,
}

impl Found {
    fn lost(&mut self, msg: String) {
        self.lost += 1;
        self.note(msg);
    }
    fn partial(&mut self, msg: String) {
        self.partial += 1;
        self.note(msg);
    }
    fn note(&mut self, msg: String) {
        if self.problems.len() < 20 {
            self.problems.push(msg);
        }
    }
}

/// Compares the store's visible state (values and stamps) with `expected` exactly.
/// Differences on objects in `in_flight` count as partial, the others as lost.
fn compare_state(
    store: &Store,
    expected: &Model,
    in_flight: &BTreeSet<(String, i64)>,
    found: &mut Found,
) {
    let replica = store.replica_id();
    let report = |found: &mut Found, key: &(String, i64), msg: String| {
        if in_flight.contains(key) {
            found.partial(format!("in-flight {}[{}]: {msg}", key.0, key.1));
        } else {
            found.lost(format!("{}[{}]: {msg}", key.0, key.1));
        }
    };
    for coll in COLLS.iter().chain([&PROBE]) {
        let mut actual: BTreeMap<(String, i64), BTreeMap<String, Value>> = BTreeMap::new();
        let scanned = store.scan(coll).expect("scan");
        assert_eq!(
            store.count(coll).expect("count"),
            scanned.len() as u64,
            "count({coll}) disagrees with scan"
        );
        for o in scanned {
            let Pk::Int(pk) = o.pk else {
                panic!("unexpected pk {:?}", o.pk)
            };
            actual.insert((coll.to_string(), pk), o.fields);
        }
        let want = expected.range((coll.to_string(), i64::MIN)..=(coll.to_string(), i64::MAX));
        for (key, fields) in want {
            let Some(got) = actual.remove(key) else {
                report(found, key, "acknowledged object is missing".into());
                continue;
            };
            for (f, want) in fields {
                match store.get_field(&key.0, key.1, f).expect("get_field") {
                    None => report(found, key, format!("field {f} is missing")),
                    Some((v, s)) => {
                        if v != want.value || got.get(f) != Some(&want.value) {
                            report(found, key, format!("field {f}: value differs"));
                        } else if s.time != want.stamp || s.replica != replica {
                            report(
                                found,
                                key,
                                format!("field {f}: stamp {s} != {}", want.stamp),
                            );
                        }
                    }
                }
            }
            for f in got.keys().filter(|f| !fields.contains_key(*f)) {
                report(found, key, format!("unacknowledged field {f}"));
            }
        }
        for key in actual.keys() {
            found.partial(format!(
                "{}[{}]: live, but no acknowledged write made it so",
                key.0, key.1
            ));
        }
    }
}

/// Totals over the run.
#[derive(Debug, Default)]
struct Totals {
    acked_txs: u64,
    acked_writes: u64,
    in_flight_kept: u64,
    torn_lines: u64,
    no_ack_cycles: u64,
}

#[test]
fn crash_kill9_cycles() {
    let started = Instant::now();
    let cycles = env_u64("FIELDLOG_CRASH_CYCLES").unwrap_or(25).max(1);
    let seed = env_u64("FIELDLOG_CRASH_SEED").unwrap_or(0x00c0_ffee_f1e1_d106);
    let tmp;
    let dir: PathBuf = match std::env::var_os("FIELDLOG_CRASH_DIR") {
        Some(d) => {
            std::fs::create_dir_all(&d).expect("create FIELDLOG_CRASH_DIR");
            d.into()
        }
        None => {
            tmp = tempfile::tempdir().expect("tempdir");
            tmp.path().to_owned()
        }
    };
    let path = dir.join(STORE_FILE);
    // The model starts empty, so the store must too.
    let _ = std::fs::remove_file(&path);
    let exe = std::env::current_exe().expect("current_exe");
    eprintln!(
        "crash: seed={seed:#x} cycles={cycles} store={}",
        path.display()
    );

    let mut model = Model::new();
    let mut last_seq = 0u64;
    let mut last_stamp = 0u64;
    let mut replica = None;
    let mut totals = Totals::default();
    let mut lost = 0u64;
    let mut partial = 0u64;
    let mut sleep_rng = Rng::new(mix(seed, u64::MAX));

    for cycle in 0..cycles {
        // Run the child and kill it at a random moment.
        let mut child = Command::new(&exe)
            .args(["--exact", "child_writer", "--nocapture", "--ignored"])
            .args(["--test-threads", "1"])
            .env(CHILD_DIR_ENV, &dir)
            .env(CHILD_SEED_ENV, seed.to_string())
            .env(CHILD_CYCLE_ENV, cycle.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let spawned = Instant::now();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut first_ack = None;
            let mut torn = false;
            let mut r = BufReader::new(stdout);
            loop {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    // A line cut short by the kill acknowledges nothing.
                    Ok(_) if !line.ends_with('\n') => torn = line.contains("ACK"),
                    Ok(_) => {
                        if first_ack.is_none() && line.contains("ACK") {
                            first_ack = Some(spawned.elapsed());
                        }
                        lines.push(line);
                    }
                }
            }
            (lines, torn, first_ack)
        });
        let sleep_ms = 20 + sleep_rng.below(281);
        std::thread::sleep(Duration::from_millis(sleep_ms));
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("cycle {cycle}: the child exited by itself ({status}); see its stderr");
        }
        child.kill().expect("SIGKILL the child");
        let status = child.wait().expect("wait for the child");
        assert_eq!(status.signal(), Some(9), "cycle {cycle}: child {status}");
        let (lines, torn, first_ack) = reader.join().expect("reader thread");
        totals.torn_lines += u64::from(torn);

        // Fold this cycle's acknowledgements into the model.
        let mut acks = Vec::new();
        for l in &lines {
            // libtest may print "test child_writer ... " on the same line as the first ACK.
            if let Some(i) = l.find("ACK ") {
                let ack = Ack::parse(&l[i..]).unwrap_or_else(|| panic!("bad ACK line {l:?}"));
                acks.push(ack);
            }
        }
        for ack in &acks {
            assert_eq!(
                ack.seq,
                last_seq + 1,
                "cycle {cycle}: acknowledged seqs must follow the log head"
            );
            assert!(ack.stamp > last_stamp, "cycle {cycle}: stamps must rise");
            apply_ack(&mut model, ack).unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
            last_seq = ack.seq;
            last_stamp = ack.stamp;
            totals.acked_txs += 1;
            totals.acked_writes += ack.ops.len() as u64;
        }
        totals.no_ack_cycles += u64::from(acks.is_empty());

        // 1. The store opens.
        let store = Store::open(&path)
            .unwrap_or_else(|e| panic!("cycle {cycle}: the store does not open after kill: {e}"));
        let rid = store.replica_id();
        assert_eq!(*replica.get_or_insert(rid), rid, "replica id changed");
        let mut found = Found::default();

        // 3a. The log is contiguous from 1 to its head.
        let log = store.log_after(0, usize::MAX).expect("log_after");
        let head = store.log_head();
        if log.len() as u64 != head || log.iter().zip(1..).any(|(e, i)| e.seq != i) {
            found.partial(format!("log of {} entries is not 1..={head}", log.len()));
        }
        // Every acknowledged commit is in the log with its stamp.
        for ack in &acks {
            match log.get(ack.seq as usize - 1) {
                Some(e) if e.seq == ack.seq && e.stamp.time == ack.stamp => {}
                other => found.lost(format!(
                    "seq {}: log entry {:?} for acked stamp {}",
                    ack.seq,
                    other.map(|e| (e.seq, e.stamp)),
                    ack.stamp
                )),
            }
        }

        // 2. Acked state, plus at most the one transaction in flight at the kill.
        let mut expected = model.clone();
        let mut in_flight = BTreeSet::new();
        let extra: Vec<&LogEntry> = log.iter().filter(|e| e.seq > last_seq).collect();
        if head < last_seq {
            found.lost(format!(
                "log head {head} is below the last acked seq {last_seq}"
            ));
        } else if extra.len() > 1 || head > last_seq + 1 {
            found.partial(format!(
                "{} unacknowledged entries after seq {last_seq}; at most one may be in flight",
                extra.len()
            ));
        } else if let Some(e) = extra.first() {
            if let Err(msg) = apply_entry(&mut expected, e) {
                found.partial(msg);
            }
            for w in &e.writes {
                if let Pk::Int(pk) = w.pk {
                    in_flight.insert((w.collection.clone(), pk));
                }
            }
        }
        compare_state(&store, &expected, &in_flight, &mut found);

        // 3b. No partial transaction: the state is exactly the replay of the log.
        let replay = Store::open_in_memory().expect("in-memory store");
        replay
            .import(&store.export(0, usize::MAX).expect("export"))
            .expect("import the store's own log");
        if replay.digest() != store.digest() {
            found.partial(format!(
                "digest {} != replay of the log {}",
                store.digest(),
                replay.digest()
            ));
        }

        let problems = std::mem::take(&mut found.problems);
        lost += found.lost;
        partial += found.partial;
        assert!(
            problems.is_empty(),
            "cycle {cycle} (seed {seed:#x}, slept {sleep_ms} ms, {} acks): lost={} partial={}:\n  {}",
            acks.len(),
            found.lost,
            found.partial,
            problems.join("\n  ")
        );

        // 4. The clock covers every stamp, and a new write goes above all of them.
        let max_stamp = extra
            .first()
            .map_or(last_stamp, |e| e.stamp.time.max(last_stamp));
        let high = store.clock_high_water();
        assert!(
            high >= max_stamp,
            "cycle {cycle}: clock high water {high} < last stamp {max_stamp}"
        );

        // The in-flight transaction is history now: the next child builds on it.
        if let Some(e) = extra.first() {
            apply_entry(&mut model, e).expect("checked above");
            last_seq = e.seq;
            totals.in_flight_kept += 1;
        }
        let probe = Ack {
            seq: 0,
            stamp: 0,
            ops: vec![AckOp::Insert(
                PROBE.into(),
                cycle as i64,
                vec![("n".into(), cycle * 16 + 3)],
            )],
        };
        let (_, c) = store
            .write(|tx| tx.insert(PROBE, cycle as i64, [("n", value_of(cycle * 16 + 3))]))
            .expect("probe write");
        let (seq, stamp) = (c.seq.expect("seq"), c.stamp.expect("stamp").time);
        assert!(
            stamp > high && stamp > max_stamp,
            "cycle {cycle}: new stamp {stamp} not above high water {high} / last {max_stamp}"
        );
        assert_eq!(seq, last_seq + 1, "cycle {cycle}: probe seq");
        apply_ack(
            &mut model,
            &Ack {
                seq,
                stamp,
                ..probe
            },
        )
        .expect("probe");
        last_seq = seq;
        last_stamp = stamp;
        drop(store);

        eprintln!(
            "crash: cycle {cycle:2}: killed at {sleep_ms:3} ms, first ack at {}, acked {:3} txs{}, \
             {} objects live",
            first_ack.map_or("-".into(), |d| format!("{} ms", d.as_millis())),
            acks.len(),
            if extra.is_empty() {
                ""
            } else {
                " + 1 in flight"
            },
            model.len()
        );
    }

    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    eprintln!(
        "crash: acked_txs={} in_flight_kept={} torn_ack_lines={} cycles_without_ack={} \
         file={} KiB time={:.1}s",
        totals.acked_txs,
        totals.in_flight_kept,
        totals.torn_lines,
        totals.no_ack_cycles,
        size / 1024,
        started.elapsed().as_secs_f64()
    );
    println!(
        "crash: cycles={cycles} acked_writes={} lost={lost} partial={partial}",
        totals.acked_writes
    );
    assert!(
        totals.acked_txs >= 100,
        "only {} transactions acknowledged over {cycles} cycles: the test exercised little",
        totals.acked_txs
    );
}
