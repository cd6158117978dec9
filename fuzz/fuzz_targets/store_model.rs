//! See `fieldlog_fuzz::store_model` (fuzz/src/store_model.rs) for what this target checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fieldlog_fuzz::store_model::check(data));
