//! See `fieldlog_fuzz::changeset` (fuzz/src/changeset.rs) for what this target checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| fieldlog_fuzz::changeset::check(data));
