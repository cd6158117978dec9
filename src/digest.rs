//! The state digest: a blake3-based hash of the visible state, equal on converged replicas.
//!
//! It is a multiset hash: the sum (four wrapping 64-bit lanes) of one blake3 hash per term
//! of the visible state — one term per live object (collection, pk, existence stamp) and
//! one per field of a live object (collection, pk, field name, stamp, value). A write
//! subtracts the terms it replaces and adds the new ones: a one-field update hashes one
//! field, not the object. Interned ids never enter it; names do.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::clock::Stamp;
use crate::value::{Pk, Value};

/// A digest of a store's visible state.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0[..8].iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The running sum behind a [`Digest`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DigestSum([u64; 4]);

impl DigestSum {
    pub(crate) fn from_digest(d: Digest) -> Self {
        let mut lanes = [0u64; 4];
        for (lane, chunk) in lanes.iter_mut().zip(d.0.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *lane = u64::from_le_bytes(b);
        }
        DigestSum(lanes)
    }

    pub(crate) fn digest(&self) -> Digest {
        let mut out = [0u8; 32];
        for (chunk, lane) in out.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&lane.to_le_bytes());
        }
        Digest(out)
    }

    pub(crate) fn add(&mut self, h: &Digest) {
        let other = DigestSum::from_digest(*h);
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.wrapping_add(b);
        }
    }

    pub(crate) fn sub(&mut self, h: &Digest) {
        let other = DigestSum::from_digest(*h);
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.wrapping_sub(b);
        }
    }
}

/// A term's bytes are gathered into one buffer and hashed at once (a dozen small hasher
/// updates per term cost more than the hash); the buffer is the thread's, kept between
/// terms (a fresh one per term was a malloc and a free for every term).
fn hash_term(tag: u8, collection: &str, pk: &Pk, fill: impl FnOnce(&mut Vec<u8>)) -> Digest {
    thread_local! {
        static TERM: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    /// A buffer that grew past this for a large value is let go after it.
    const KEEP: usize = 64 << 10;
    TERM.with(|b| {
        let mut b = b.borrow_mut();
        b.clear();
        b.push(tag);
        b.extend_from_slice(&(collection.len() as u64).to_le_bytes());
        b.extend_from_slice(collection.as_bytes());
        pk.digest_bytes_into(&mut b);
        fill(&mut b);
        let d = Digest(*blake3::hash(&b).as_bytes());
        if b.capacity() > KEEP {
            *b = Vec::new();
        }
        d
    })
}

/// The term of a live object's existence.
pub(crate) fn exists_term(collection: &str, pk: &Pk, stamp: Stamp) -> Digest {
    hash_term(b'o', collection, pk, |b| stamp.digest_bytes_into(b))
}

/// The term of one field of a live object.
pub(crate) fn field_term(
    collection: &str,
    pk: &Pk,
    name: &str,
    stamp: Stamp,
    value: &Value,
) -> Digest {
    hash_term(b'f', collection, pk, |b| {
        b.extend_from_slice(&(name.len() as u64).to_le_bytes());
        b.extend_from_slice(name.as_bytes());
        stamp.digest_bytes_into(b);
        value.digest_bytes_into(b);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The terms are the same bytes as when they were hashed piece by piece (stores keep
    /// their digest on disk: a change here would fail `verify_digest` on every old store).
    #[test]
    fn terms_hash_the_same_bytes_as_before() {
        fn streamed(tag: u8, coll: &str, pk: &Pk, rest: &[&[u8]]) -> Digest {
            let mut h = blake3::Hasher::new();
            h.update(&[tag]);
            h.update(&(coll.len() as u64).to_le_bytes());
            h.update(coll.as_bytes());
            let mut k = Vec::new();
            pk.encode_into(&mut k);
            h.update(&(k.len() as u64).to_le_bytes());
            h.update(&k);
            for r in rest {
                h.update(r);
            }
            Digest(*h.finalize().as_bytes())
        }
        let stamp = Stamp {
            time: 0x1234_5678_9abc,
            replica: crate::clock::ReplicaId(77),
        };
        let st: Vec<u8> = [stamp.time.to_le_bytes(), stamp.replica.0.to_le_bytes()].concat();
        for pk in [Pk::Int(-5), Pk::Str("user42".into()), Pk::Id12([7; 12])] {
            assert_eq!(
                exists_term("Dog", &pk, stamp),
                streamed(b'o', "Dog", &pk, &[&st])
            );
            let values = [
                (Value::Null, vec![0u8]),
                (Value::Bool(true), vec![1, 1]),
                (
                    Value::Int(-3),
                    [&[2u8][..], &(-3i64).to_le_bytes()].concat(),
                ),
                (
                    Value::Float(1.5),
                    [&[3u8][..], &1.5f64.to_bits().to_le_bytes()].concat(),
                ),
                (
                    Value::from("Rex"),
                    [&[4u8][..], &3u64.to_le_bytes(), b"Rex"].concat(),
                ),
                (
                    Value::Bytes(vec![9, 8]),
                    [&[5u8][..], &2u64.to_le_bytes(), &[9, 8]].concat(),
                ),
            ];
            for (v, bytes) in values {
                let name: &[u8] = b"name";
                assert_eq!(
                    field_term("Dog", &pk, "name", stamp, &v),
                    streamed(b'f', "Dog", &pk, &[&4u64.to_le_bytes(), name, &st, &bytes]),
                    "{v:?}"
                );
            }
        }
    }

    #[test]
    fn add_then_sub_is_identity() {
        let mut s = DigestSum::default();
        let a = exists_term("C", &Pk::Int(1), Stamp::ZERO);
        let b = field_term("C", &Pk::Int(2), "f", Stamp::ZERO, &Value::Int(1));
        s.add(&a);
        s.add(&b);
        s.sub(&a);
        let mut t = DigestSum::default();
        t.add(&b);
        assert_eq!(s.digest(), t.digest());
        assert_eq!(DigestSum::from_digest(s.digest()), s);
    }
}
