//! Primary keys: their order, their byte encoding (whose byte order is key order) and
//! their display. A leaf: errors name keys, so this module uses no error type.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A primary key. Keys of one collection sort by type (int, string, 12-byte id, 16-byte id),
/// then by value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Pk {
    /// A signed integer key.
    Int(i64),
    /// A string key.
    Str(String),
    /// A 12-byte id (an ObjectId).
    Id12([u8; 12]),
    /// A 16-byte id (a UUID).
    Id16([u8; 16]),
}

/// Longest string primary key, in bytes.
pub const PK_STR_LEN_MAX: usize = 256;

impl Pk {
    /// Encodes the key so that byte order equals key order (used as the redb key suffix).
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Pk::Int(i) => {
                out.push(1);
                out.extend_from_slice(&((*i as u64) ^ (1 << 63)).to_be_bytes());
            }
            Pk::Str(s) => {
                out.push(2);
                out.extend_from_slice(s.as_bytes());
            }
            Pk::Id12(b) => {
                out.push(3);
                out.extend_from_slice(b);
            }
            Pk::Id16(b) => {
                out.push(4);
                out.extend_from_slice(b);
            }
        }
    }

    /// Decodes a key written by [`Pk::encode_into`]; `None` if the bytes are not one.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Pk> {
        let (&tag, rest) = bytes.split_first()?;
        match tag {
            1 => {
                let raw: [u8; 8] = rest.try_into().ok()?;
                Some(Pk::Int((u64::from_be_bytes(raw) ^ (1 << 63)) as i64))
            }
            2 => std::str::from_utf8(rest)
                .ok()
                .map(|s| Pk::Str(s.to_owned())),
            3 => rest.try_into().ok().map(Pk::Id12),
            4 => rest.try_into().ok().map(Pk::Id16),
            _ => None,
        }
    }

    /// The bytes the digest hashes for this key: its length, then its encoding.
    pub(crate) fn digest_bytes_into(&self, out: &mut Vec<u8>) {
        let at = out.len();
        out.extend_from_slice(&[0u8; 8]);
        self.encode_into(out);
        let len = (out.len() - at - 8) as u64;
        out[at..at + 8].copy_from_slice(&len.to_le_bytes());
    }
}

impl fmt::Display for Pk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pk::Int(i) => write!(f, "{i}"),
            Pk::Str(s) => write!(f, "{s}"),
            Pk::Id12(b) => b.iter().try_for_each(|x| write!(f, "{x:02x}")),
            Pk::Id16(b) => b.iter().try_for_each(|x| write!(f, "{x:02x}")),
        }
    }
}

impl From<i64> for Pk {
    fn from(v: i64) -> Self {
        Pk::Int(v)
    }
}
impl From<i32> for Pk {
    fn from(v: i32) -> Self {
        Pk::Int(v.into())
    }
}
impl From<&str> for Pk {
    fn from(v: &str) -> Self {
        Pk::Str(v.to_owned())
    }
}
impl From<String> for Pk {
    fn from(v: String) -> Self {
        Pk::Str(v)
    }
}
impl From<[u8; 12]> for Pk {
    fn from(v: [u8; 12]) -> Self {
        Pk::Id12(v)
    }
}
impl From<[u8; 16]> for Pk {
    fn from(v: [u8; 16]) -> Self {
        Pk::Id16(v)
    }
}
