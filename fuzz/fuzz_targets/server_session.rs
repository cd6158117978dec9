//! See `fieldlog_fuzz::session` (fuzz/src/session.rs) for what this target checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fieldlog_fuzz::session::check(data));
