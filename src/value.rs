//! Values, primary keys (defined in `pk`, checked here) and names: the vocabulary every
//! field write is made of.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, NameKind};
pub use crate::pk::{Pk, PK_STR_LEN_MAX};

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

impl Pk {
    /// Checks a key the application gives: string keys have a length limit.
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
