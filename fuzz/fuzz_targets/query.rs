//! See `fieldlog_fuzz::query` (fuzz/src/query.rs) for what this target checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fieldlog_fuzz::query::check(data));
