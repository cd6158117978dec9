//! Helpers shared by the integration tests: raw protocol connections (`raw`) and the
//! oracle that says where a write ended up (`oracle`). Each test file uses part of it.
#![allow(dead_code, unused_imports)]

pub mod oracle;
pub mod raw;

pub use raw::*;
