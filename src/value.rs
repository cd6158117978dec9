//! Values, primary keys and names: the vocabulary every field write is made of.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, NameKind};

/// Longest collection or field name, in bytes.
pub const NAME_LEN_MAX: usize = 64;

/// The value of one field. Floats compare and travel bit for bit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Value {
    /// An explicit null (a field that is present but empty).
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed 64-bit integer.
    Int(i64),
    /// A 64-bit float; equality is on the bits, so `NaN == NaN` and `0.0 != -0.0`.
    Float(f64),
    /// UTF-8 text.
    String(String),
    /// Raw bytes.
    Bytes(#[serde(with = "serde_bytes_compat")] Vec<u8>),
}

impl Value {
    /// The value's size as counted against the store's value size limit.
    pub fn size_bytes(&self) -> usize {
        match self {
            Value::Null | Value::Bool(_) => 1,
            Value::Int(_) | Value::Float(_) => 8,
            Value::String(s) => s.len(),
            Value::Bytes(b) => b.len(),
        }
    }

    /// The name of this value's type, as used in error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::String(_) => "string",
            Value::Bytes(_) => "bytes",
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Int(_) => 2,
            Value::Float(_) => 3,
            Value::String(_) => 4,
            Value::Bytes(_) => 5,
        }
    }

    /// Feeds the value into a hasher in a self-delimiting form.
    /// The bytes the digest hashes for this value.
    pub(crate) fn digest_bytes_into(&self, out: &mut Vec<u8>) {
        out.push(self.rank());
        match self {
            Value::Null => {}
            Value::Bool(b) => out.push(u8::from(*b)),
            Value::Int(i) => out.extend_from_slice(&i.to_le_bytes()),
            Value::Float(f) => out.extend_from_slice(&f.to_bits().to_le_bytes()),
            Value::String(s) => {
                out.extend_from_slice(&(s.len() as u64).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Value::Bytes(b) => {
                out.extend_from_slice(&(b.len() as u64).to_le_bytes());
                out.extend_from_slice(b);
            }
        }
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Value {}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A total order: by type, then by value; floats by `f64::total_cmp`.
impl Ord for Value {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Value::Null, Value::Null) => Ordering::Equal,
            (Value::Bool(a), Value::Bool(b)) => a.cmp(b),
            (Value::Int(a), Value::Int(b)) => a.cmp(b),
            (Value::Float(a), Value::Float(b)) => a.total_cmp(b),
            (Value::String(a), Value::String(b)) => a.cmp(b),
            (Value::Bytes(a), Value::Bytes(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => write!(f, "null"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::String(s) => write!(f, "{s:?}"),
            Value::Bytes(b) => write!(f, "<{} bytes>", b.len()),
        }
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(v.into())
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::String(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::String(v)
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Postcard already writes `Vec<u8>` as length + bytes; this keeps it that way explicitly
/// and lets serde formats that distinguish bytes see them as bytes.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = a.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

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

    pub(crate) fn validate(&self) -> Result<(), Error> {
        if let Pk::Str(s) = self {
            if s.is_empty() || s.len() > PK_STR_LEN_MAX {
                return Err(Error::BadPk {
                    pk: self.clone(),
                    reason: format!("string keys must be 1 to {PK_STR_LEN_MAX} bytes"),
                });
            }
        }
        Ok(())
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

/// Checks a collection or field name: 1 to [`NAME_LEN_MAX`] bytes of ASCII letters, digits,
/// `_`, `-` or `.`, not starting with `__` (reserved for the engine) and not `_id` (the
/// primary key's name in rules and queries).
pub fn validate_name(kind: NameKind, name: &str) -> Result<(), Error> {
    let bad = |reason: &str| {
        Err(Error::BadName {
            kind,
            name: name.chars().take(NAME_LEN_MAX + 8).collect(),
            reason: reason.to_owned(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > NAME_LEN_MAX {
        return bad("longer than 64 bytes");
    }
    if name.starts_with("__") || name == "_id" {
        return bad("reserved");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return bad("only ASCII letters, digits, '_', '-' and '.' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pk_encoding_preserves_order() {
        let keys = [
            Pk::Int(i64::MIN),
            Pk::Int(-1),
            Pk::Int(0),
            Pk::Int(7),
            Pk::Int(i64::MAX),
            Pk::Str("a".into()),
            Pk::Str("ab".into()),
            Pk::Str("b".into()),
            Pk::Id12([0; 12]),
            Pk::Id16([1; 16]),
        ];
        let enc: Vec<Vec<u8>> = keys
            .iter()
            .map(|k| {
                let mut v = Vec::new();
                k.encode_into(&mut v);
                v
            })
            .collect();
        for w in enc.windows(2) {
            assert!(w[0] < w[1]);
        }
        for (k, e) in keys.iter().zip(&enc) {
            assert_eq!(Pk::decode(e).as_ref(), Some(k));
        }
    }

    #[test]
    fn floats_compare_by_bits() {
        assert_eq!(Value::Float(f64::NAN), Value::Float(f64::NAN));
        assert_ne!(Value::Float(0.0), Value::Float(-0.0));
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name(NameKind::Field, "age").is_ok());
        for bad in ["", "__x", "_id", "a b", &"x".repeat(65)] {
            assert!(validate_name(NameKind::Field, bad).is_err(), "{bad:?}");
        }
    }
}
