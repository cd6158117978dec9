//! The checks behind the cargo-fuzz targets, shared with `tests/fuzz_corpus.rs` (which
//! includes this file with `#[path]`), so a crasher found by fuzzing replays as an
//! ordinary test on stable. Each module has one `check(&[u8])` that panics when a property
//! fails; the targets in `fuzz_targets/` only call it.
//!
//! Inputs are read with [`input::Input`] (every byte string is valid), not `arbitrary`, so
//! the tests need no dependency the main crate lacks.

#[path = "changeset.rs"]
pub mod changeset;
#[path = "disk.rs"]
pub mod disk;
#[path = "frame.rs"]
pub mod frame;
#[path = "input.rs"]
pub mod input;
#[path = "merge_laws.rs"]
pub mod merge_laws;
#[path = "query.rs"]
pub mod query;
#[path = "rules.rs"]
pub mod rules;
#[path = "session.rs"]
pub mod session;
#[path = "store_model.rs"]
pub mod store_model;
#[path = "wal_replay.rs"]
pub mod wal_replay;

/// Whether `FIELDLOG_FUZZ_TRACE` is set: the model targets then print each step.
pub fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("FIELDLOG_FUZZ_TRACE").is_some())
}

/// A target's check: panics when a property fails.
pub type Check = fn(&[u8]);

/// Every target: its name (as in `fuzz/Cargo.toml` and `tests/corpus/`) and its check.
pub const TARGETS: [(&str, Check); 8] = [
    ("changeset_import", changeset::check),
    ("frame_decode", frame::check),
    ("merge_laws", merge_laws::check),
    ("query", query::check),
    ("rules_load", rules::check),
    ("server_session", session::check),
    ("store_model", store_model::check),
    ("wal_replay", wal_replay::check),
];
