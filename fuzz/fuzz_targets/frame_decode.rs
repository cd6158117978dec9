//! See `fieldlog_fuzz::frame` (fuzz/src/frame.rs) for what this target checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fieldlog_fuzz::frame::check(data));
