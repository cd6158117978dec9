//! Arbitrary bytes as a changeset: decoding and importing either succeeds or returns a typed
//! error, and a refused changeset leaves the store exactly as it was.
#![no_main]

use fieldlog::{Changeset, Store, Value};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(store) = Store::open_in_memory() else {
        return;
    };
    let seeded = store.write(|tx| tx.insert("Item", 1, [("name", Value::from("seed"))]));
    assert!(seeded.is_ok());
    let before = store.digest();
    // Raw bytes, and the same bytes behind a valid magic and checksum, so the postcard
    // decoder and the validator are reached.
    let mut framed = b"FLC1".to_vec();
    framed.extend_from_slice(data);
    framed.extend_from_slice(blake3::hash(&framed).as_bytes());
    for bytes in [data.to_vec(), framed] {
        match store.import_bytes(&bytes) {
            Ok(_) => {}
            Err(_) => assert_eq!(store.digest(), before, "a refused changeset changed the store"),
        }
    }
    if let Ok(cs) = Changeset::decode(data, usize::MAX) {
        let again = cs.encode().expect("re-encode");
        assert_eq!(Changeset::decode(&again, usize::MAX).ok(), Some(cs));
    }
});

