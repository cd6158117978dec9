//! The state digest: a blake3-based hash of the visible state, equal on converged replicas.
//!
//! It is a multiset hash: the sum (four wrapping 64-bit lanes) of one blake3 hash per
//! visible object, so a write updates it by subtracting the object's old hash and adding
//! its new one, without a scan. Interned ids never enter it; names do.

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

/// The hash of one visible object. `fields` must be sorted by name.
pub(crate) fn object_hash<'a>(
    collection: &str,
    pk: &Pk,
    fields: impl Iterator<Item = (&'a str, Stamp, &'a Value)>,
) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(&(collection.len() as u64).to_le_bytes());
    h.update(collection.as_bytes());
    pk.hash_into(&mut h);
    for (name, stamp, value) in fields {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        stamp.hash_into(&mut h);
        value.hash_into(&mut h);
    }
    Digest(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_then_sub_is_identity() {
        let mut s = DigestSum::default();
        let a = object_hash("C", &Pk::Int(1), std::iter::empty());
        let b = object_hash("C", &Pk::Int(2), std::iter::empty());
        s.add(&a);
        s.add(&b);
        s.sub(&a);
        let mut t = DigestSum::default();
        t.add(&b);
        assert_eq!(s.digest(), t.digest());
        assert_eq!(DigestSum::from_digest(s.digest()), s);
    }
}
