//! `changeset_import`: bytes as a changeset (invariant 6). Decoding and importing either
//! succeed or return a typed error; a refused changeset leaves the store exactly as it was;
//! decoded bytes are canonical (they re-encode to themselves: a changeset's id is the hash
//! of its bytes) and decode ∘ encode is the identity; an accepted changeset imported twice
//! changes nothing the second time.

use fieldlog::{Changeset, Error, Store, Value};

/// Runs the changeset checks on `data`.
pub fn check(data: &[u8]) {
    let store = Store::open_in_memory().expect("in-memory store");
    store
        .write(|tx| tx.insert("Item", 1, [("name", Value::from("seed"))]))
        .expect("seed write");
    // Raw bytes, and the same bytes behind a valid magic and checksum, so the postcard
    // decoder and the validator are reached.
    let mut framed = b"FLC1".to_vec();
    framed.extend_from_slice(data);
    framed.extend_from_slice(blake3::hash(&framed).as_bytes());
    for bytes in [data, framed.as_slice()] {
        let before = store.digest();
        match store.import_bytes(bytes) {
            Ok(_) => {
                let after = store.digest();
                let again = store
                    .import_bytes(bytes)
                    .expect("an accepted changeset again");
                assert_eq!(again.applied, 0, "a repeated import applied writes");
                assert_eq!(store.digest(), after, "a repeated import changed the state");
            }
            Err(e) => {
                assert!(
                    matches!(
                        e,
                        Error::BadChangeset { .. }
                            | Error::ClockDrift { .. }
                            | Error::Schema { .. }
                            | Error::BadName { .. }
                            | Error::BadPk { .. }
                            | Error::ValueTooLarge { .. }
                            | Error::TooManyFields { .. }
                    ),
                    "import refused with an unexpected error: {e:?}"
                );
                assert_eq!(
                    store.digest(),
                    before,
                    "a refused changeset changed the store"
                );
            }
        }
        if let Ok(cs) = Changeset::decode(bytes, usize::MAX) {
            let again = cs.encode().expect("re-encode");
            assert_eq!(
                again, bytes,
                "a decoded changeset re-encodes to other bytes"
            );
            assert_eq!(Changeset::decode(&again, usize::MAX).ok(), Some(cs));
        }
    }
}
