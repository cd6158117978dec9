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

fn object_prefix(tag: u8, collection: &str, pk: &Pk) -> blake3::Hasher {
    let mut h = blake3::Hasher::new();
    h.update(&[tag]);
    h.update(&(collection.len() as u64).to_le_bytes());
    h.update(collection.as_bytes());
    pk.hash_into(&mut h);
    h
}

/// The term of a live object's existence.
pub(crate) fn exists_term(collection: &str, pk: &Pk, stamp: Stamp) -> Digest {
    let mut h = object_prefix(b'o', collection, pk);
    stamp.hash_into(&mut h);
    Digest(*h.finalize().as_bytes())
}

/// The term of one field of a live object.
pub(crate) fn field_term(
    collection: &str,
    pk: &Pk,
    name: &str,
    stamp: Stamp,
    value: &Value,
) -> Digest {
    let mut h = object_prefix(b'f', collection, pk);
    h.update(&(name.len() as u64).to_le_bytes());
    h.update(name.as_bytes());
    stamp.hash_into(&mut h);
    value.hash_into(&mut h);
    Digest(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

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
