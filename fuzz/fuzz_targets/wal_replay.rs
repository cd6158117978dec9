//! See `fieldlog_fuzz::wal_replay` (fuzz/src/wal_replay.rs) for what this target checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fieldlog_fuzz::wal_replay::check(data));
