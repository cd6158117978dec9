//! `wal_replay`: a store's write-ahead file from the input (invariants 3 and 6).
//!
//! A small store is built once, on simulated disks: its database as a checkpoint left it
//! (last record number S), and its real write-ahead file after a power cut: records S+1 …
//! S+n of commits acknowledged durable (the state after each is kept), then what the round
//! before the checkpoint left behind (records at or below S). Its replica id is set in the
//! database before any commit, so the records, and the seed files holding them, are the
//! same in every run.
//!
//! The first input byte picks how the rest becomes the write-ahead file beside that
//! database:
//! - 0: the bytes as they are;
//! - 1: the real file, with the bytes written over it at an offset, inserted at it, or
//!   written after a cut there;
//! - 2: pieces: real records (whole, cut short, or with a byte flipped), the old round's
//!   records, raw bytes, and *forged* records: input bytes behind a valid length and
//!   checksum, with the store's (or another) replica id and a chosen number, so postcard's
//!   decoder and the replay's table writes see rows the store never wrote.
//!
//! Checks:
//! - opening never panics;
//! - with no forged record it succeeds; the state is exactly the base state or the state
//!   after the first j real records, where j comes from a model of the replay rule (skip
//!   records at or below S while none was replayed; then each record must be the next
//!   one; anything else — torn, unknown, out of sequence — ends the replay); the digest
//!   verifies; a new durable commit, a power cut, and the store reopens to exactly that
//!   commit's state (nothing replayed twice, nothing left in the file to be replayed after
//!   later records);
//! - with a forged record (a corrupt file that passes the checksum), opening and every
//!   read and write after it return `Ok` or an error, never panic.

use std::sync::{Arc, OnceLock};

use fieldlog::{Digest, ManualTimeSource, Object, Options, Store, Value};

use super::disk::SimDisk;
use super::input::Input;

/// Start of simulated time (ms).
const T0_MS: u64 = 1_700_000_000_000;
/// The base store's replica id.
pub const REPLICA: u64 = 0x0f1e_d10c_5eed_0001;
const COLLS: [&str; 3] = ["A", "B", "Probe"];
/// Small, so the base store checkpoints after a dozen commits.
const CHECKPOINT_BYTES: u64 = 4 << 10;
/// Length and checksum before a record's body (`src/wal.rs`).
const HEADER: usize = 20;
/// Real records after the checkpoint.
const RECORDS: usize = 6;

/// What a state is compared on.
#[derive(Clone, Debug, PartialEq)]
struct State {
    objects: Vec<Vec<Object>>,
    head: u64,
    digest: Digest,
}

fn state(store: &Store) -> State {
    State {
        objects: COLLS.iter().map(|c| store.scan(c).expect("scan")).collect(),
        head: store.log_head(),
        digest: store.digest(),
    }
}

/// The store every input starts from.
pub struct Base {
    time: ManualTimeSource,
    /// The database's durable image.
    db: Vec<u8>,
    /// The real write-ahead file's durable image, without its zero tail.
    pub wal: Vec<u8>,
    /// Records S+1 … S+n, as framed in the file.
    pub records: Vec<Vec<u8>>,
    /// The round before the checkpoint's records (numbers at or below S).
    pub old: Vec<Vec<u8>>,
    /// `states[j]`: after the first j records.
    states: Vec<State>,
    /// S.
    pub seq: u64,
}

fn options(time: &ManualTimeSource) -> Options {
    Options::default()
        .time(Arc::new(time.clone()))
        .checkpoint_bytes(CHECKPOINT_BYTES)
}

/// The frames at the start of a write-ahead file (length-checked only).
pub fn frames(wal: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(h) = wal.get(at..at + HEADER) {
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        match wal.get(at..at + HEADER + len) {
            Some(f) if len > 0 => out.push(f.to_vec()),
            _ => break,
        }
        at += HEADER + len;
    }
    out
}

fn checksum(body: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(body).as_bytes()[..16]);
    out
}

/// A record around `rows` (postcard bytes of the rows, valid or not) with a valid header.
fn forge(replica: u64, seq: u64, rows: &[u8]) -> Vec<u8> {
    let mut body = postcard::to_allocvec(&(replica, seq)).expect("encode");
    body.extend_from_slice(rows);
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&checksum(&body));
    out.extend_from_slice(&body);
    out
}

fn write(store: &Store, i: u64) {
    store
        .write(|tx| {
            let pk = (i % 5) as i64;
            match tx.get("A", pk)? {
                Some(_) if i.is_multiple_of(3) => tx.delete("A", pk)?,
                Some(_) => tx.set("A", pk, "f", i as i64)?,
                None => tx.insert("A", pk, [("f", Value::from(i as i64)), ("g", "x".into())])?,
            }
            if tx.get("B", 0)?.is_none() {
                tx.insert("B", 0, [("cnt", 0)])?;
            }
            if i % 4 == 1 {
                tx.increment("B", 0, "cnt", 2)?;
            }
            if i % 5 == 2 {
                // A new field name: a name row in the record.
                tx.set("B", 0, &format!("n{i}"), vec![i as u8; 40])?;
            }
            Ok(())
        })
        .expect("base write");
}

fn build() -> Base {
    let time = ManualTimeSource::new(T0_MS);
    let (db, wal) = (SimDisk::new(), SimDisk::new());
    drop(
        Store::open_backend_with_wal(db.backend(), wal.backend(), options(&time)).expect("create"),
    );
    {
        let d = redb::Database::builder()
            .create_with_backend(db.backend())
            .expect("redb");
        let txn = d.begin_write().expect("begin");
        {
            let meta: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
            let mut meta = txn.open_table(meta).expect("meta");
            meta.insert("replica_id", REPLICA.to_le_bytes().as_slice())
                .expect("replica id");
        }
        txn.commit().expect("commit");
    }
    let store =
        Store::open_backend_with_wal(db.backend(), wal.backend(), options(&time)).expect("open");
    assert_eq!(store.replica_id().0, REPLICA);
    // Commits until one checkpoints: the next record is written at offset 0 again (the
    // database file's syncs do not tell: redb also syncs when it grows the file).
    let mut i = 0u64;
    let old: Vec<Vec<u8>>;
    let mut states = Vec::new();
    loop {
        let before = state(&store);
        let live = frames(&wal.live_image());
        write(&store, i);
        time.advance(1);
        i += 1;
        if !live.is_empty() && frames(&wal.live_image())[0] != live[0] {
            old = live;
            states.push(before);
            states.push(state(&store));
            break;
        }
        assert!(i < 1000, "no checkpoint");
    }
    for _ in 1..RECORDS {
        write(&store, i);
        time.advance(1);
        i += 1;
        states.push(state(&store));
    }
    let mut wal_image = wal.durable_image();
    let records: Vec<Vec<u8>> = frames(&wal_image).into_iter().take(RECORDS).collect();
    assert_eq!(records.len(), RECORDS, "the records after the checkpoint");
    let db_image = db.durable_image();
    db.crash();
    wal.crash();
    drop(store);
    while wal_image.last() == Some(&0) {
        wal_image.pop();
    }
    // The number before the first record's.
    let (_, first): (u64, u64) = postcard::take_from_bytes(&records[0][HEADER..])
        .expect("a record's number")
        .0;
    // The database alone is the state at the checkpoint.
    let alone = Store::open_backend(
        SimDisk::from_image(db_image.clone()).backend(),
        options(&time),
    )
    .expect("the database alone");
    assert_eq!(
        state(&alone),
        states[0],
        "the database is not at the checkpoint"
    );
    drop(alone);
    Base {
        time,
        db: db_image,
        wal: wal_image,
        records,
        old,
        states,
        seq: first - 1,
    }
}

/// The base store (built on first use).
pub fn base() -> &'static Base {
    static BASE: OnceLock<Base> = OnceLock::new();
    BASE.get_or_init(build)
}

/// How many real records the replay puts back from `wal`, or `None` if it holds a frame
/// with a valid checksum that is not one the store wrote (a forged record).
fn model(base: &Base, wal: &[u8]) -> Option<usize> {
    let mut next = 0;
    let mut at = 0;
    while let Some(h) = wal.get(at..at + HEADER) {
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len == 0 {
            break;
        }
        let Some(frame) = wal.get(at..at + HEADER + len) else {
            break;
        };
        if let Some(i) = base.records.iter().position(|r| r == frame) {
            if i != next {
                break;
            }
            next += 1;
        } else if base.old.iter().any(|r| r == frame) {
            if next > 0 {
                break;
            }
        } else if frame[4..HEADER] == checksum(&frame[HEADER..]) {
            return None;
        } else {
            break;
        }
        at += HEADER + len;
    }
    Some(next)
}

/// The write-ahead file the input describes, and whether it forged a record.
fn wal_of(base: &Base, data: &[u8]) -> (Vec<u8>, bool) {
    let mut input = Input::new(data);
    match input.u8() % 3 {
        0 => (input.rest().to_vec(), false),
        1 => {
            let mut wal = base.wal.clone();
            let how = input.u8() % 3;
            let at = input.below(wal.len() + 1);
            let bytes = input.rest();
            match how {
                0 => {
                    let end = at + bytes.len();
                    if wal.len() < end {
                        wal.resize(end, 0);
                    }
                    wal[at..end].copy_from_slice(bytes);
                }
                1 => {
                    wal.splice(at..at, bytes.iter().copied());
                }
                _ => {
                    wal.truncate(at);
                    wal.extend_from_slice(bytes);
                }
            }
            (wal, false)
        }
        _ => {
            let mut wal = Vec::new();
            let mut forged = false;
            let mut pieces = 0;
            while !input.is_empty() && pieces < 32 {
                pieces += 1;
                match input.u8() % 6 {
                    0 => {
                        let r: &Vec<u8> = input.choose(&base.records);
                        wal.extend_from_slice(r);
                    }
                    1 => {
                        let r = input.choose(&base.records);
                        let n = input.below(r.len());
                        wal.extend_from_slice(&r[..n]);
                    }
                    2 => {
                        let mut r = input.choose(&base.records).clone();
                        let at = input.below(r.len());
                        r[at] ^= input.u8() | 1;
                        wal.extend_from_slice(&r);
                    }
                    3 => {
                        let r: &Vec<u8> = input.choose(&base.old);
                        wal.extend_from_slice(r);
                    }
                    4 => wal.extend_from_slice(input.bytes(64)),
                    _ => {
                        let b = input.u8();
                        let replica = if b & 0x80 != 0 { REPLICA + 1 } else { REPLICA };
                        let seq = base.seq + 1 + u64::from(b & 0x7f) % (RECORDS as u64 + 3);
                        let rows = input.bytes(160);
                        wal.extend(forge(replica, seq, rows));
                        forged = true;
                    }
                }
            }
            (wal, forged)
        }
    }
}

/// Everything a user can do after opening a corrupt store: must not panic.
fn exercise(store: &Store) {
    for c in COLLS {
        let _ = store.scan(c);
        let _ = store.count(c);
        let _ = store.get(c, 0i64);
    }
    let _ = store.log_after(0, usize::MAX);
    let _ = store.verify_digest();
    let _ = store.write(|tx| tx.insert("Probe", 1, [("x", 1)]));
    let _ = store.export(0, usize::MAX);
}

/// The length of the value the new commit after the replay writes (the first input byte
/// above the mode: where its record ends in the file, which is where a record left in the
/// file would be read next).
fn probe_of(data: &[u8]) -> usize {
    usize::from(data.first().copied().unwrap_or(0) / 3) * 8
}

fn probe_fields(j: usize, pad: usize) -> [(&'static str, Value); 2] {
    [
        ("x", Value::from(j as i64)),
        ("pad", Value::from("p".repeat(pad))),
    ]
}

/// Runs the write-ahead replay checks on `data`.
pub fn check(data: &[u8]) {
    let base = base();
    let (wal, forged) = wal_of(base, data);
    let expected = model(base, &wal);
    let db = SimDisk::from_image(base.db.clone());
    let wal_disk = SimDisk::from_image(wal);
    let opened =
        Store::open_backend_with_wal(db.backend(), wal_disk.backend(), options(&base.time));
    let Some(j) = expected.filter(|_| !forged) else {
        // Forged rows: any outcome but a panic.
        if let Ok(store) = opened {
            exercise(&store);
        }
        return;
    };
    let store = opened.expect("a store whose write-ahead file holds no forged record opens");
    let probe = probe_of(data);
    assert_eq!(
        state(&store),
        base.states[j],
        "the state is not the one after the first {j} records"
    );
    assert!(store.verify_digest().expect("verify_digest"), "digest");
    // A new durable commit, then a power cut: exactly that state comes back.
    store
        .write(|tx| tx.insert("Probe", 1, probe_fields(j, probe)))
        .expect("a write after the replay");
    let after = state(&store);
    db.crash();
    wal_disk.crash();
    drop(store);
    let store = Store::open_backend_with_wal(db.backend(), wal_disk.backend(), options(&base.time))
        .expect("reopen after a power cut");
    assert_eq!(state(&store), after, "the state after a power cut");
    assert!(
        store.verify_digest().expect("verify_digest"),
        "digest after reopening"
    );
}

/// The length of the new commit's record after replaying record 0, with `pad`.
fn probe_record_len(base: &Base, pad: usize) -> usize {
    let db = SimDisk::from_image(base.db.clone());
    let wal = SimDisk::from_image(base.records[0].clone());
    let store = Store::open_backend_with_wal(db.backend(), wal.backend(), options(&base.time))
        .expect("open");
    store
        .write(|tx| tx.insert("Probe", 1, probe_fields(1, pad)))
        .expect("write");
    frames(&wal.live_image())[0].len()
}

/// Seed inputs: the real file whole and in each mode, and a few of its damages, each with
/// the number of records the replay puts back (`None`: a forged record).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let base = base();
    let mut out: Vec<(String, Vec<u8>, Option<usize>)> = Vec::new();
    let mut raw = vec![0u8];
    raw.extend_from_slice(&base.wal);
    out.push(("real-wal".to_owned(), raw, Some(RECORDS)));
    // Mode 1: the real file, cut after its third record.
    let third: usize = base.records[..3].iter().map(Vec::len).sum();
    let at = (third as u16).to_le_bytes();
    out.push(("cut-after-3".to_owned(), vec![1, 2, at[0], at[1]], Some(3)));
    // Mode 1: a byte overwritten inside the second record.
    let inside = ((base.records[0].len() + 30) as u16).to_le_bytes();
    out.push((
        "flip-in-2".to_owned(),
        vec![1, 0, inside[0], inside[1], 0xa5],
        Some(1),
    ));
    // Mode 2: an old record, then records 0, 1, 3 (a hole), then 2.
    out.push((
        "pieces-hole".to_owned(),
        vec![2, 3, 0, 0, 0, 0, 1, 0, 3, 0, 2],
        Some(2),
    ));
    // Mode 2: record 0, a hole, then record 2 where the new commit's record will end, with
    // the number after it: it must not be replayed after the next power cut.
    let mut realign = Vec::new();
    for m in 0..85u8 {
        let ends = probe_record_len(base, usize::from(m) * 8);
        let hole = ends.saturating_sub(base.records[0].len());
        if hole == 0 {
            continue;
        }
        realign = vec![2 + 3 * m, 0, 0];
        let mut left = hole;
        while left > 0 {
            let n = left.min(64);
            realign.push(4);
            realign.push(n as u8);
            realign.extend(std::iter::repeat_n(0u8, n));
            left -= n;
        }
        realign.extend([0, 2]);
        break;
    }
    out.push(("pieces-realign".to_owned(), realign, Some(1)));
    // Mode 2: record 0, then a forged record with the next number and garbage rows.
    let mut forged = vec![2, 0, 0, 5, 1, 40];
    forged.extend((0..40u8).map(|i| i.wrapping_mul(37)));
    out.push(("pieces-forged".to_owned(), forged, None));
    out.into_iter()
        .map(|(name, bytes, want)| {
            let (wal, _) = wal_of(base, &bytes);
            assert_eq!(model(base, &wal), want, "seed {name}");
            (name, bytes)
        })
        .collect()
}
