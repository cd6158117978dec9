//! See `fieldlog_fuzz::merge_laws` (fuzz/src/merge_laws.rs) for what this target checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fieldlog_fuzz::merge_laws::check(data));
