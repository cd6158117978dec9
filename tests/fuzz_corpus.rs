//! Invariant 6 (bad input is an error, not a crash), and invariants 1–3 through the model
//! targets: every cargo-fuzz target's checks, run on stable as ordinary tests.
//!
//! The checks themselves live in `fuzz/src/` (included here with `#[path]`), so a fuzz
//! target and its replay can never disagree. Each target's test runs:
//! - seed inputs built in code (valid and invalid frames, changesets, queries, rules files,
//!   and byte strings for the structured targets);
//! - every file in `tests/corpus/<target>/`: crashers that `scripts/fuzz_smoke.sh` copied
//!   there (each a regression test from then on) and the seed files written by
//!   `write_seed_files` (`cargo test --test fuzz_corpus -- --ignored write_seed_files`),
//!   which the fuzz smoke also uses as a starting corpus.
//!
//! Prints `fuzz-corpus: target=T inputs=N` per target.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz_checks;

use std::path::{Path, PathBuf};

use fieldlog::sync::frame::{decode_frame, encode_frame, FRAME_LEN_MAX_DEFAULT};
use fieldlog::sync::protocol::{ClientMsg, ErrorCode, ServerMsg};
use fieldlog::{Changeset, LogEntry, Op, Pk, ReplicaId, Stamp, Store, Value, Write};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target)
}

fn check_of(target: &str) -> fn(&[u8]) {
    fuzz_checks::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .expect("a known target")
}

/// Runs `target`'s check on its seeds and on every corpus file; fails naming each input
/// that fails.
fn replay(target: &str) {
    let check = check_of(target);
    let mut inputs: Vec<(String, Vec<u8>)> = seeds(target);
    if let Ok(dir) = std::fs::read_dir(corpus_dir(target)) {
        let mut files: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files {
            let bytes = std::fs::read(&f).expect("read corpus file");
            inputs.push((f.display().to_string(), bytes));
        }
    }
    let mut failed = Vec::new();
    for (name, bytes) in &inputs {
        if std::panic::catch_unwind(|| check(bytes)).is_err() {
            failed.push(name.clone());
        }
    }
    println!(
        "fuzz-corpus: target={target} inputs={} failed={}",
        inputs.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{target}: inputs that fail: {failed:#?}");
}

#[test]
fn changeset_import() {
    replay("changeset_import");
}

#[test]
fn frame_decode() {
    replay("frame_decode");
}

#[test]
fn merge_laws() {
    replay("merge_laws");
}

#[test]
fn query() {
    replay("query");
}

#[test]
fn rules_load() {
    replay("rules_load");
}

#[test]
fn server_session() {
    replay("server_session");
}

#[test]
fn store_model() {
    replay("store_model");
}

#[test]
fn wal_replay() {
    replay("wal_replay");
}

/// Writes the seeds as files into `tests/corpus/<target>/seed-*`, for the fuzzers.
#[test]
#[ignore = "regenerates tests/corpus/*/seed-*; run by hand after changing the seeds"]
fn write_seed_files() {
    for (target, _) in fuzz_checks::TARGETS {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("mkdir");
        for (name, bytes) in seeds(target) {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
        }
    }
}

/// Regression test (invariant 6; found by `frame_decode`): the frame decoder accepted
/// non-canonical postcard — `Ping { id: 0 }` with the id spelt `0x80 0x00` instead of
/// `0x00`, or maps with unsorted or repeated keys (`tests/corpus/frame_decode/
/// noncanonical-map-order`) — so one message had several encodings. Fixed: a body that does
/// not re-encode to itself is `Malformed` (and so is such a changeset, whose id is the hash
/// of its bytes).
#[test]
fn frame_noncanonical_varint_is_refused() {
    let canonical = postcard::to_allocvec(&ClientMsg::Ping { id: 0 }).expect("encode");
    assert_eq!(canonical.last(), Some(&0));
    let mut long = canonical[..canonical.len() - 1].to_vec();
    long.extend_from_slice(&[0x80, 0x00]);
    let frame = fuzz_checks::frame::frame_around(&long);
    let got = decode_frame::<ClientMsg>(&frame, FRAME_LEN_MAX_DEFAULT);
    assert!(
        got.is_err(),
        "a non-canonical frame decoded to {:?}",
        got.ok().flatten().map(|(m, _)| m)
    );
}

// ---------------------------------------------------------------------------------------
// Seeds

/// splitmix64, for byte-string seeds.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

fn sample_changeset() -> Changeset {
    let store = Store::open_in_memory().expect("store");
    store
        .write(|tx| {
            tx.insert(
                "Item",
                1,
                [("name", Value::from("a\"b")), ("f", Value::from(-0.0))],
            )?;
            tx.insert("Dog", "rex", [("bytes", Value::from(vec![0u8, 255]))])
        })
        .expect("write");
    store
        .write(|tx| {
            tx.set("Item", 1, "name", Value::Null)?;
            tx.delete("Dog", "rex")
        })
        .expect("write");
    store.export(0, usize::MAX).expect("export")
}

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add = |name: &str, bytes: Vec<u8>| out.push((name.to_owned(), bytes));
    match target {
        "frame_decode" => {
            let cs = sample_changeset();
            let client = [
                ClientMsg::Ping { id: 7 },
                ClientMsg::DownloadAck { cursor: 3 },
                ClientMsg::SnapshotAck { settled: Some(2) },
                ClientMsg::Upload {
                    changeset: cs.clone(),
                    more: false,
                },
            ];
            let server = [
                ServerMsg::UploadAck {
                    seq: 2,
                    server_version: 9,
                },
                ServerMsg::Download {
                    changeset: cs,
                    more: true,
                    cursor: 4,
                },
                ServerMsg::Error {
                    code: ErrorCode::BadFrame,
                    message: "bad".into(),
                },
            ];
            let mut frames: Vec<Vec<u8>> = client
                .iter()
                .map(|m| encode_frame(m, FRAME_LEN_MAX_DEFAULT).expect("encode"))
                .collect();
            frames.extend(
                server
                    .iter()
                    .map(|m| encode_frame(m, FRAME_LEN_MAX_DEFAULT).expect("encode")),
            );
            for (i, f) in frames.iter().enumerate() {
                add(&format!("frame-{i}"), f.clone());
                // The body alone (the check frames it) and a damaged copy.
                add(&format!("body-{i}"), f[8..].to_vec());
                let mut flipped = f.clone();
                let last = flipped.len() - 1;
                flipped[last] ^= 1;
                add(&format!("flipped-{i}"), flipped);
                add(&format!("cut-{i}"), f[..f.len() / 2].to_vec());
            }
            add(
                "two-frames",
                [frames[0].clone(), frames[4].clone()].concat(),
            );
            add("huge-length", vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
            add("empty", Vec::new());
        }
        "changeset_import" => {
            let cs = sample_changeset();
            let bytes = cs.encode().expect("encode");
            // The check puts a magic and checksum around the input too: the body alone
            // reaches the validator.
            add("valid", bytes.clone());
            add("body", bytes[4..bytes.len() - 32].to_vec());
            add("truncated", bytes[..bytes.len() - 1].to_vec());
            let mut far = cs.clone();
            far.entries[0].stamp.time = u64::MAX;
            add("far-future", far.encode().expect("encode"));
            let bad = Changeset {
                origin: ReplicaId(9),
                entries: vec![LogEntry {
                    seq: 1,
                    stamp: Stamp {
                        time: 1,
                        replica: ReplicaId(9),
                    },
                    writes: vec![Write {
                        collection: "__bad".into(),
                        pk: Pk::Str(String::new()),
                        op: Op::Delete { base: None },
                    }],
                }],
            };
            add("bad-names", bad.encode().expect("encode"));
        }
        "query" => {
            for (i, q) in [
                r#"status == "completed" AND ownerId == $user"#,
                "NOT (complexity > 4 OR name BEGINSWITH 'tmp') && _id != 0x00ff",
                "4 >= complexity",
                "f == nan(0x7ff0000000000001) OR g < -inf OR h == -0.0",
                "`not` == null AND `2nd` CONTAINS \"\\u{1F600}\\n\" AND $0 < x",
                "TRUEPREDICATE OR FALSEPREDICATE",
                "a ==",
                "((((((((((((((((((((((((((((((((((a == 1))))))))))))))))))))))))))))))))))",
                "a == 99999999999999999999",
            ]
            .iter()
            .enumerate()
            {
                // Mode 1: text, after a two-byte length.
                let len = (q.len() as u16).to_le_bytes();
                let mut b = vec![1, len[0], len[1]];
                b.extend_from_slice(q.as_bytes());
                b.extend(noise(i as u64, 48));
                add(&format!("text-{i}"), b);
            }
            for i in 0..4 {
                // Mode 0: a query tree built from the bytes.
                let mut b = vec![0];
                b.extend(noise(100 + i, 96));
                add(&format!("tree-{i}"), b);
            }
        }
        "rules_load" => {
            let files = [
                r#"{"rules":{"Item":[{"name":"readOwnWriteOwn","apply_when":{},"document_filters":{"read":{"ownerId":"%%user.id"},"write":{"ownerId":"%%user.id"}},"read":true,"write":true,"insert":true,"delete":true}]},"defaultRoles":[{"name":"readAll","apply_when":{},"document_filters":{"read":true,"write":false},"read":true,"write":false}]}"#,
                r#"{"defaultRoles":[{"name":"admin","apply_when":{"%%user.custom_data.isAdmin":true},"document_filters":{"read":true,"write":true},"read":true,"write":true,"insert":true,"delete":true},{"name":"team","apply_when":{"%%user.team":{"$exists":true}},"document_filters":{"read":{"$or":[{"team":"%%user.team"},{"n":{"$gte":2,"$lt":5}}]},"write":{"$not":{"_id":{"$in":[1,2]}}}},"read":true,"write":true}]}"#,
                r#"{"rules":{"Item":[]}}"#,
                r#"{"rules":{"Item":[{"name":"x","document_filters":{"read":true}}]}}"#,
                r#"{"defaultRoles":[{"name":"owner-read-write","apply_when":{},"document_filters":{"read":{"owner_id":"%%user.id"},"write":{"owner_id":"%%user.id"}},"read":true,"write":true}]}"#,
                r#"{"rules":{"Item":[{"name":"staff","apply_when":{},"document_filters":{"read":true,"write":{"ownerId":"%%user.id"}},"search":true,"insert":{"ownerId":"%%user.id"},"delete":{"n":{"$lt":2}},"fields":{"n":{"read":false,"write":false},"team":{"write":true,"fields":{"inner":{"read":true}}}},"additional_fields":{"read":true}}]}}"#,
                r#"{"rules":{}, "rules":{}}"#,
                "not json",
            ];
            for (i, f) in files.iter().enumerate() {
                let len = (f.len() as u16).to_le_bytes();
                let mut b = vec![0, len[0], len[1]];
                b.extend_from_slice(f.as_bytes());
                b.extend(noise(i as u64, 64));
                add(&format!("text-{i}"), b);
            }
            for i in 0..4 {
                let mut b = vec![1];
                b.extend(noise(200 + i, 128));
                add(&format!("built-{i}"), b);
            }
        }
        "wal_replay" => {
            // A real write-ahead file (whole, cut, damaged, rearranged, with a forged
            // record: see `fuzz/src/wal_replay.rs`), and noise in each mode.
            for (name, bytes) in fuzz_checks::wal_replay::seeds() {
                add(&name, bytes);
            }
            for mode in 0..3u8 {
                let mut b = vec![mode];
                b.extend(noise(400 + u64::from(mode), 96));
                add(&format!("noise-{mode}"), b);
            }
        }
        _ => {
            // The structured targets read any bytes as steps.
            for (i, len) in [0usize, 16, 64, 256, 1024].iter().enumerate() {
                add(&format!("noise-{i}"), noise(300 + i as u64, *len));
            }
        }
    }
    out
}
