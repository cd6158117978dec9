//! See `fieldlog_fuzz::rules` (fuzz/src/rules.rs) for what this target checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fieldlog_fuzz::rules::check(data));
