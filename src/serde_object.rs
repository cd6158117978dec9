//! Conversion between serde types and objects (flat lists of named scalar fields).
//!
//! The store keeps every field separately, so only flat shapes are accepted: a struct or a
//! string-keyed map whose values are scalars. Anything nested is refused with an error that
//! names the field, rather than being silently encoded into an opaque blob.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::value::{SeqDeserializer, StrDeserializer};
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::ser::{self, Impossible, Serialize};

use crate::error::{Error, Result};
use crate::value::Value;

/// Turns a `#[derive(Serialize)]` struct (or a map with string keys) into its fields, in declaration order.
pub(crate) fn to_fields<T: Serialize + ?Sized>(value: &T) -> Result<Vec<(String, Value)>> {
    value
        .serialize(TopSerializer)
        .map_err(ConvError::into_error)
}

/// Builds a `#[derive(Deserialize)]` struct from an object's fields.
pub(crate) fn from_fields<T: de::DeserializeOwned>(fields: &BTreeMap<String, Value>) -> Result<T> {
    T::deserialize(FieldsDeserializer { fields }).map_err(ConvError::into_error)
}

/// The error type both directions use internally; serde needs one that implements its
/// `Error` traits, which the crate's [`Error`] does not.
#[derive(Debug)]
struct ConvError {
    /// The field the failure happened in, when known.
    field: Option<String>,
    /// What went wrong.
    msg: String,
}

impl ConvError {
    fn msg(msg: impl Into<String>) -> Self {
        ConvError {
            field: None,
            msg: msg.into(),
        }
    }

    /// Attributes the error to `field`, unless it already names one.
    fn in_field(mut self, field: &str) -> Self {
        if self.field.is_none() {
            self.field = Some(field.to_owned());
        }
        self
    }

    fn into_error(self) -> Error {
        Error::Conversion {
            reason: self.to_string(),
        }
    }
}

impl fmt::Display for ConvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "field `{field}`: {}", self.msg),
            None => f.write_str(&self.msg),
        }
    }
}

impl std::error::Error for ConvError {}

impl ser::Error for ConvError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ConvError::msg(msg.to_string())
    }
}

impl de::Error for ConvError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ConvError::msg(msg.to_string())
    }
}

// ---------------------------------------------------------------------------------------
// Serialization
// ---------------------------------------------------------------------------------------

/// Generates `Serializer` methods that all refuse with `self.refuse(what)`. Only for the
/// non-generic methods; the generic ones are written out by hand.
macro_rules! refuse {
    ($( $method:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty => $what:expr; )*) => {
        $(
            fn $method(self, $($arg: $ty),*) -> std::result::Result<$ret, ConvError> {
                let _ = ($($arg,)*);
                Err(self.refuse($what))
            }
        )*
    };
}

/// Serializes the top level: only a struct, a string-keyed map, or a newtype around one.
struct TopSerializer;

impl TopSerializer {
    fn refuse(&self, found: &str) -> ConvError {
        ConvError::msg(format!(
            "expected a struct or a map with string keys at the top level, found {found}"
        ))
    }
}

impl ser::Serializer for TopSerializer {
    type Ok = Vec<(String, Value)>;
    type Error = ConvError;
    type SerializeSeq = Impossible<Self::Ok, ConvError>;
    type SerializeTuple = Impossible<Self::Ok, ConvError>;
    type SerializeTupleStruct = Impossible<Self::Ok, ConvError>;
    type SerializeTupleVariant = Impossible<Self::Ok, ConvError>;
    type SerializeMap = FieldCollector;
    type SerializeStruct = FieldCollector;
    type SerializeStructVariant = Impossible<Self::Ok, ConvError>;

    refuse! {
        serialize_bool(v: bool) -> Self::Ok => "a bool";
        serialize_i8(v: i8) -> Self::Ok => "an integer";
        serialize_i16(v: i16) -> Self::Ok => "an integer";
        serialize_i32(v: i32) -> Self::Ok => "an integer";
        serialize_i64(v: i64) -> Self::Ok => "an integer";
        serialize_i128(v: i128) -> Self::Ok => "an integer";
        serialize_u8(v: u8) -> Self::Ok => "an integer";
        serialize_u16(v: u16) -> Self::Ok => "an integer";
        serialize_u32(v: u32) -> Self::Ok => "an integer";
        serialize_u64(v: u64) -> Self::Ok => "an integer";
        serialize_u128(v: u128) -> Self::Ok => "an integer";
        serialize_f32(v: f32) -> Self::Ok => "a float";
        serialize_f64(v: f64) -> Self::Ok => "a float";
        serialize_char(v: char) -> Self::Ok => "a char";
        serialize_str(v: &str) -> Self::Ok => "a string";
        serialize_bytes(v: &[u8]) -> Self::Ok => "bytes";
        serialize_none() -> Self::Ok => "an option";
        serialize_unit() -> Self::Ok => "unit";
        serialize_unit_struct(name: &'static str) -> Self::Ok => "a unit struct";
        serialize_unit_variant(name: &'static str, index: u32, variant: &'static str)
            -> Self::Ok => "an enum";
        serialize_seq(len: Option<usize>) -> Self::SerializeSeq => "a sequence";
        serialize_tuple(len: usize) -> Self::SerializeTuple => "a tuple";
        serialize_tuple_struct(name: &'static str, len: usize)
            -> Self::SerializeTupleStruct => "a tuple struct";
        serialize_tuple_variant(name: &'static str, index: u32, variant: &'static str, len: usize)
            -> Self::SerializeTupleVariant => "an enum";
        serialize_struct_variant(name: &'static str, index: u32, variant: &'static str, len: usize)
            -> Self::SerializeStructVariant => "an enum";
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<Self::Ok, ConvError> {
        Err(self.refuse("an option"))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Self::Ok, ConvError> {
        // A wrapper around an object is still that object.
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<Self::Ok, ConvError> {
        Err(self.refuse("an enum"))
    }

    fn serialize_map(self, len: Option<usize>) -> Result<FieldCollector, ConvError> {
        Ok(FieldCollector::with_capacity(len.unwrap_or(0)))
    }

    fn serialize_struct(
        self,
        _name: &'static str,
        len: usize,
    ) -> Result<FieldCollector, ConvError> {
        Ok(FieldCollector::with_capacity(len))
    }
}

/// Gathers the fields of the top-level struct or map, keeping their order.
struct FieldCollector {
    fields: Vec<(String, Value)>,
    /// Names already used; a map (or `#[serde(flatten)]`) could repeat one.
    seen: BTreeSet<String>,
    /// The key given to `serialize_key`, waiting for its value.
    pending_key: Option<String>,
}

impl FieldCollector {
    fn with_capacity(len: usize) -> Self {
        FieldCollector {
            fields: Vec::with_capacity(len),
            seen: BTreeSet::new(),
            pending_key: None,
        }
    }

    fn push<T: Serialize + ?Sized>(&mut self, name: String, value: &T) -> Result<(), ConvError> {
        let value = value
            .serialize(FieldSerializer)
            .map_err(|e| e.in_field(&name))?;
        if !self.seen.insert(name.clone()) {
            return Err(ConvError::msg("appears more than once").in_field(&name));
        }
        self.fields.push((name, value));
        Ok(())
    }
}

impl ser::SerializeStruct for FieldCollector {
    type Ok = Vec<(String, Value)>;
    type Error = ConvError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ConvError> {
        self.push(key.to_owned(), value)
    }

    // `skip_field` keeps its default (do nothing): skipped fields are simply absent.

    fn end(self) -> Result<Self::Ok, ConvError> {
        Ok(self.fields)
    }
}

impl ser::SerializeMap for FieldCollector {
    type Ok = Vec<(String, Value)>;
    type Error = ConvError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), ConvError> {
        self.pending_key = Some(key.serialize(KeySerializer)?);
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ConvError> {
        let key = self
            .pending_key
            .take()
            .ok_or_else(|| ConvError::msg("map value serialized before its key"))?;
        self.push(key, value)
    }

    fn end(self) -> Result<Self::Ok, ConvError> {
        Ok(self.fields)
    }
}

/// Serializes a map key, which becomes a field name and so must be a string.
struct KeySerializer;

impl KeySerializer {
    fn refuse(&self, found: &str) -> ConvError {
        ConvError::msg(format!("map keys must be strings, found {found}"))
    }
}

impl ser::Serializer for KeySerializer {
    type Ok = String;
    type Error = ConvError;
    type SerializeSeq = Impossible<String, ConvError>;
    type SerializeTuple = Impossible<String, ConvError>;
    type SerializeTupleStruct = Impossible<String, ConvError>;
    type SerializeTupleVariant = Impossible<String, ConvError>;
    type SerializeMap = Impossible<String, ConvError>;
    type SerializeStruct = Impossible<String, ConvError>;
    type SerializeStructVariant = Impossible<String, ConvError>;

    fn serialize_str(self, v: &str) -> Result<String, ConvError> {
        Ok(v.to_owned())
    }

    fn serialize_char(self, v: char) -> Result<String, ConvError> {
        Ok(v.to_string())
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<String, ConvError> {
        // Matches how unit variants are stored as values, and reads back the same way.
        Ok(variant.to_owned())
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<String, ConvError> {
        value.serialize(self)
    }

    refuse! {
        serialize_bool(v: bool) -> String => "a bool";
        serialize_i8(v: i8) -> String => "an integer";
        serialize_i16(v: i16) -> String => "an integer";
        serialize_i32(v: i32) -> String => "an integer";
        serialize_i64(v: i64) -> String => "an integer";
        serialize_i128(v: i128) -> String => "an integer";
        serialize_u8(v: u8) -> String => "an integer";
        serialize_u16(v: u16) -> String => "an integer";
        serialize_u32(v: u32) -> String => "an integer";
        serialize_u64(v: u64) -> String => "an integer";
        serialize_u128(v: u128) -> String => "an integer";
        serialize_f32(v: f32) -> String => "a float";
        serialize_f64(v: f64) -> String => "a float";
        serialize_bytes(v: &[u8]) -> String => "bytes";
        serialize_none() -> String => "an option";
        serialize_unit() -> String => "unit";
        serialize_unit_struct(name: &'static str) -> String => "a unit struct";
        serialize_seq(len: Option<usize>) -> Self::SerializeSeq => "a sequence";
        serialize_tuple(len: usize) -> Self::SerializeTuple => "a tuple";
        serialize_tuple_struct(name: &'static str, len: usize)
            -> Self::SerializeTupleStruct => "a tuple struct";
        serialize_tuple_variant(name: &'static str, index: u32, variant: &'static str, len: usize)
            -> Self::SerializeTupleVariant => "an enum variant with data";
        serialize_map(len: Option<usize>) -> Self::SerializeMap => "a map";
        serialize_struct(name: &'static str, len: usize) -> Self::SerializeStruct => "a struct";
        serialize_struct_variant(name: &'static str, index: u32, variant: &'static str, len: usize)
            -> Self::SerializeStructVariant => "an enum variant with data";
    }

    fn serialize_some<T: Serialize + ?Sized>(self, _value: &T) -> Result<String, ConvError> {
        Err(self.refuse("an option"))
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _value: &T,
    ) -> Result<String, ConvError> {
        Err(self.refuse("an enum variant with data"))
    }
}

/// Serializes one field's value into a scalar [`Value`]. Errors leave the field name out;
/// [`FieldCollector`] adds it.
struct FieldSerializer;

impl FieldSerializer {
    fn refuse(&self, what: &str) -> ConvError {
        ConvError::msg(format!(
            "nested {what} are not supported; store them as separate fields or bytes"
        ))
    }
}

/// The message for enum variants that carry data.
fn variant_with_data(name: &str, variant: &str) -> ConvError {
    ConvError::msg(format!(
        "enum variant `{name}::{variant}` carries data; only unit variants are supported"
    ))
}

impl ser::Serializer for FieldSerializer {
    type Ok = Value;
    type Error = ConvError;
    type SerializeSeq = Impossible<Value, ConvError>;
    type SerializeTuple = Impossible<Value, ConvError>;
    type SerializeTupleStruct = Impossible<Value, ConvError>;
    type SerializeTupleVariant = Impossible<Value, ConvError>;
    type SerializeMap = Impossible<Value, ConvError>;
    type SerializeStruct = Impossible<Value, ConvError>;
    type SerializeStructVariant = Impossible<Value, ConvError>;

    fn serialize_bool(self, v: bool) -> Result<Value, ConvError> {
        Ok(Value::Bool(v))
    }

    fn serialize_i8(self, v: i8) -> Result<Value, ConvError> {
        Ok(Value::Int(v.into()))
    }

    fn serialize_i16(self, v: i16) -> Result<Value, ConvError> {
        Ok(Value::Int(v.into()))
    }

    fn serialize_i32(self, v: i32) -> Result<Value, ConvError> {
        Ok(Value::Int(v.into()))
    }

    fn serialize_i64(self, v: i64) -> Result<Value, ConvError> {
        Ok(Value::Int(v))
    }

    fn serialize_i128(self, v: i128) -> Result<Value, ConvError> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| ConvError::msg(format!("{v} does not fit in a signed 64-bit integer")))
    }

    fn serialize_u8(self, v: u8) -> Result<Value, ConvError> {
        Ok(Value::Int(v.into()))
    }

    fn serialize_u16(self, v: u16) -> Result<Value, ConvError> {
        Ok(Value::Int(v.into()))
    }

    fn serialize_u32(self, v: u32) -> Result<Value, ConvError> {
        Ok(Value::Int(v.into()))
    }

    fn serialize_u64(self, v: u64) -> Result<Value, ConvError> {
        // Refused rather than wrapped: a wrapped value would read back as a different number.
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| ConvError::msg(format!("{v} does not fit in a signed 64-bit integer")))
    }

    fn serialize_u128(self, v: u128) -> Result<Value, ConvError> {
        i64::try_from(v)
            .map(Value::Int)
            .map_err(|_| ConvError::msg(format!("{v} does not fit in a signed 64-bit integer")))
    }

    fn serialize_f32(self, v: f32) -> Result<Value, ConvError> {
        // Widening is exact, NaN included.
        Ok(Value::Float(f64::from(v)))
    }

    fn serialize_f64(self, v: f64) -> Result<Value, ConvError> {
        Ok(Value::Float(v))
    }

    fn serialize_char(self, v: char) -> Result<Value, ConvError> {
        Ok(Value::String(v.to_string()))
    }

    fn serialize_str(self, v: &str) -> Result<Value, ConvError> {
        Ok(Value::String(v.to_owned()))
    }

    fn serialize_bytes(self, v: &[u8]) -> Result<Value, ConvError> {
        Ok(Value::Bytes(v.to_vec()))
    }

    fn serialize_none(self) -> Result<Value, ConvError> {
        Ok(Value::Null)
    }

    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Value, ConvError> {
        value.serialize(self)
    }

    fn serialize_unit(self) -> Result<Value, ConvError> {
        Ok(Value::Null)
    }

    fn serialize_unit_struct(self, _name: &'static str) -> Result<Value, ConvError> {
        Ok(Value::Null)
    }

    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
    ) -> Result<Value, ConvError> {
        // By name, not index, so reordering the enum's variants does not change stored data.
        Ok(Value::String(variant.to_owned()))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<Value, ConvError> {
        value.serialize(self)
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        _value: &T,
    ) -> Result<Value, ConvError> {
        Err(variant_with_data(name, variant))
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeTupleVariant, ConvError> {
        Err(variant_with_data(name, variant))
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Self::SerializeStructVariant, ConvError> {
        Err(variant_with_data(name, variant))
    }

    refuse! {
        serialize_seq(len: Option<usize>) -> Self::SerializeSeq => "sequences";
        serialize_tuple(len: usize) -> Self::SerializeTuple => "tuples";
        serialize_tuple_struct(name: &'static str, len: usize)
            -> Self::SerializeTupleStruct => "tuple structs";
        serialize_map(len: Option<usize>) -> Self::SerializeMap => "maps";
        serialize_struct(name: &'static str, len: usize) -> Self::SerializeStruct => "structs";
    }
}

// ---------------------------------------------------------------------------------------
// Deserialization
// ---------------------------------------------------------------------------------------

/// Presents an object's fields as a map, which is what derived structs ask for.
struct FieldsDeserializer<'a> {
    fields: &'a BTreeMap<String, Value>,
}

impl<'de> de::Deserializer<'de> for FieldsDeserializer<'_> {
    type Error = ConvError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConvError> {
        visitor.visit_map(FieldsAccess {
            iter: self.fields.iter(),
            pending: None,
        })
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ConvError> {
        // Mirrors `TopSerializer`, which looks through newtypes.
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

/// Walks the fields in name order, attributing value errors to their field.
struct FieldsAccess<'a> {
    iter: std::collections::btree_map::Iter<'a, String, Value>,
    /// The entry whose key was just handed out.
    pending: Option<(&'a str, &'a Value)>,
}

impl<'de, 'a> MapAccess<'de> for FieldsAccess<'a> {
    type Error = ConvError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ConvError> {
        match self.iter.next() {
            Some((name, value)) => {
                self.pending = Some((name, value));
                let key: StrDeserializer<'a, ConvError> = name.as_str().into_deserializer();
                seed.deserialize(key).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, ConvError> {
        let (name, value) = self
            .pending
            .take()
            .ok_or_else(|| ConvError::msg("map value requested before its key"))?;
        seed.deserialize(ValueDeserializer { value })
            .map_err(|e| e.in_field(name))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

/// Deserializes one field's value.
struct ValueDeserializer<'a> {
    value: &'a Value,
}

impl ValueDeserializer<'_> {
    /// Yields bytes one by one, for targets that ask for a sequence (`Vec<u8>`, `[u8; N]`).
    fn visit_byte_seq<'de, V: Visitor<'de>>(
        bytes: &[u8],
        visitor: V,
    ) -> Result<V::Value, ConvError> {
        let mut seq = SeqDeserializer::new(bytes.iter().copied());
        let out = visitor.visit_seq(&mut seq)?;
        // Catches leftovers, e.g. 5 bytes read into a `[u8; 4]`.
        seq.end()?;
        Ok(out)
    }
}

impl<'de> de::Deserializer<'de> for ValueDeserializer<'_> {
    type Error = ConvError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConvError> {
        // The visitor range-checks and type-checks; its errors say what was expected.
        match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Int(i) => visitor.visit_i64(*i),
            Value::Float(f) => visitor.visit_f64(*f),
            Value::String(s) => visitor.visit_str(s),
            Value::Bytes(b) => visitor.visit_byte_buf(b.clone()),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConvError> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConvError> {
        match self.value {
            Value::Bytes(b) => Self::visit_byte_seq(b, visitor),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, ConvError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ConvError> {
        match self.value {
            // `StrDeserializer` offers the string as a unit variant name.
            Value::String(s) => {
                let variant: StrDeserializer<'_, ConvError> = s.as_str().into_deserializer();
                visitor.visit_enum(variant)
            }
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ConvError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ConvError> {
        // Unknown fields are skipped without copying their value.
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct tuple_struct map struct identifier
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};
    use serde_bytes::ByteBuf;

    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
    enum Color {
        Red,
        Green,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Meters(f64);

    #[derive(Debug, Serialize, Deserialize)]
    struct Everything {
        name: String,
        count: i64,
        small: u32,
        tiny: i8,
        ratio: f64,
        nan: f64,
        neg_zero: f64,
        half: f32,
        flag: bool,
        letter: char,
        missing: Option<i64>,
        present: Option<String>,
        #[serde(with = "serde_bytes")]
        blob: Vec<u8>,
        buf: ByteBuf,
        color: Color,
        length: Meters,
        nothing: (),
    }

    fn everything() -> Everything {
        Everything {
            name: "Ada".into(),
            count: i64::MIN,
            small: u32::MAX,
            tiny: -5,
            ratio: 0.1,
            nan: f64::NAN,
            neg_zero: -0.0,
            half: 0.5,
            flag: true,
            letter: 'λ',
            missing: None,
            present: Some("here".into()),
            blob: vec![0, 1, 255],
            buf: ByteBuf::from(vec![7u8; 3]),
            color: Color::Green,
            length: Meters(2.5),
            nothing: (),
        }
    }

    fn map(fields: Vec<(String, Value)>) -> BTreeMap<String, Value> {
        fields.into_iter().collect()
    }

    fn fields_of(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    fn reason(e: Error) -> String {
        match e {
            Error::Conversion { reason } => reason,
            other => panic!("expected a conversion error, got {other:?}"),
        }
    }

    #[test]
    fn round_trip_of_every_supported_type() {
        let fields = to_fields(&everything()).unwrap();
        let expected: Vec<(String, Value)> = vec![
            ("name", Value::String("Ada".into())),
            ("count", Value::Int(i64::MIN)),
            ("small", Value::Int(u32::MAX.into())),
            ("tiny", Value::Int(-5)),
            ("ratio", Value::Float(0.1)),
            ("nan", Value::Float(f64::NAN)),
            ("neg_zero", Value::Float(-0.0)),
            ("half", Value::Float(0.5)),
            ("flag", Value::Bool(true)),
            ("letter", Value::String("λ".into())),
            ("missing", Value::Null),
            ("present", Value::String("here".into())),
            ("blob", Value::Bytes(vec![0, 1, 255])),
            ("buf", Value::Bytes(vec![7, 7, 7])),
            ("color", Value::String("Green".into())),
            ("length", Value::Float(2.5)),
            ("nothing", Value::Null),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        // `Value` equality is bitwise on floats, so this also checks NaN and -0.0 exactly.
        assert_eq!(fields, expected);

        let back: Everything = from_fields(&map(fields)).unwrap();
        let orig = everything();
        assert_eq!(back.name, orig.name);
        assert_eq!(back.count, orig.count);
        assert_eq!(back.small, orig.small);
        assert_eq!(back.tiny, orig.tiny);
        assert_eq!(back.ratio.to_bits(), orig.ratio.to_bits());
        assert_eq!(back.nan.to_bits(), orig.nan.to_bits());
        assert!(back.nan.is_nan());
        assert_eq!(back.neg_zero.to_bits(), (-0.0f64).to_bits());
        assert_eq!(back.half.to_bits(), orig.half.to_bits());
        assert_eq!(back.flag, orig.flag);
        assert_eq!(back.letter, orig.letter);
        assert_eq!(back.missing, None);
        assert_eq!(back.present, orig.present);
        assert_eq!(back.blob, orig.blob);
        assert_eq!(back.buf, orig.buf);
        assert_eq!(back.color, orig.color);
        assert_eq!(back.length.0.to_bits(), orig.length.0.to_bits());
    }

    #[test]
    fn nested_sequence_is_refused_naming_the_field() {
        #[derive(Serialize)]
        struct Tagged {
            name: String,
            tags: Vec<String>,
        }
        let err = to_fields(&Tagged {
            name: "a".into(),
            tags: vec!["x".into()],
        })
        .unwrap_err();
        assert_eq!(
            reason(err),
            "field `tags`: nested sequences are not supported; store them as separate fields or bytes"
        );
    }

    #[test]
    fn nested_struct_map_tuple_and_data_enum_are_refused() {
        #[derive(Serialize)]
        struct Inner {
            x: i64,
        }
        #[derive(Serialize)]
        enum Shape {
            Circle(f64),
        }
        #[derive(Serialize)]
        struct WithStruct {
            inner: Inner,
        }
        #[derive(Serialize)]
        struct WithMap {
            attrs: BTreeMap<String, i64>,
        }
        #[derive(Serialize)]
        struct WithTuple {
            pair: (i64, i64),
        }
        #[derive(Serialize)]
        struct WithEnum {
            shape: Shape,
        }
        let r = reason(
            to_fields(&WithStruct {
                inner: Inner { x: 1 },
            })
            .unwrap_err(),
        );
        assert!(r.starts_with("field `inner`: nested structs"), "{r}");
        let r = reason(
            to_fields(&WithMap {
                attrs: BTreeMap::new(),
            })
            .unwrap_err(),
        );
        assert!(r.starts_with("field `attrs`: nested maps"), "{r}");
        let r = reason(to_fields(&WithTuple { pair: (1, 2) }).unwrap_err());
        assert!(r.starts_with("field `pair`: nested tuples"), "{r}");
        let r = reason(
            to_fields(&WithEnum {
                shape: Shape::Circle(1.0),
            })
            .unwrap_err(),
        );
        assert!(
            r.contains("field `shape`") && r.contains("Shape::Circle"),
            "{r}"
        );
    }

    #[test]
    fn u64_above_i64_max_is_refused() {
        #[derive(Serialize)]
        struct Big {
            n: u64,
        }
        let r = reason(to_fields(&Big { n: u64::MAX }).unwrap_err());
        assert!(
            r.contains("field `n`") && r.contains("18446744073709551615"),
            "{r}"
        );
        let ok = to_fields(&Big { n: i64::MAX as u64 }).unwrap();
        assert_eq!(ok, vec![("n".to_owned(), Value::Int(i64::MAX))]);
    }

    #[test]
    fn top_level_must_be_a_struct_or_string_keyed_map() {
        for r in [
            reason(to_fields(&5i64).unwrap_err()),
            reason(to_fields(&vec![1, 2]).unwrap_err()),
            reason(to_fields(&Some(1)).unwrap_err()),
        ] {
            assert!(r.contains("at the top level"), "{r}");
        }
        let int_keys: BTreeMap<i64, i64> = [(1, 2)].into_iter().collect();
        let r = reason(to_fields(&int_keys).unwrap_err());
        assert!(r.contains("map keys must be strings"), "{r}");
    }

    #[test]
    fn string_keyed_map_round_trips() {
        let m: BTreeMap<String, i64> = [("b".to_owned(), 2), ("a".to_owned(), 1)]
            .into_iter()
            .collect();
        let fields = to_fields(&m).unwrap();
        assert_eq!(
            fields,
            vec![
                ("a".to_owned(), Value::Int(1)),
                ("b".to_owned(), Value::Int(2))
            ]
        );
        let back: BTreeMap<String, i64> = from_fields(&map(fields)).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn newtype_around_a_struct_is_transparent() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Inner {
            x: i64,
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Wrapper(Inner);
        let fields = to_fields(&Wrapper(Inner { x: 3 })).unwrap();
        assert_eq!(fields, vec![("x".to_owned(), Value::Int(3))]);
        let back: Wrapper = from_fields(&map(fields)).unwrap();
        assert_eq!(back, Wrapper(Inner { x: 3 }));
    }

    #[test]
    fn flattened_struct_becomes_top_level_fields() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Audit {
            by: String,
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Doc {
            title: String,
            #[serde(flatten)]
            audit: Audit,
        }
        let doc = Doc {
            title: "t".into(),
            audit: Audit { by: "me".into() },
        };
        let fields = to_fields(&doc).unwrap();
        assert_eq!(
            fields,
            vec![
                ("title".to_owned(), Value::String("t".into())),
                ("by".to_owned(), Value::String("me".into())),
            ]
        );
        let back: Doc = from_fields(&map(fields)).unwrap();
        assert_eq!(back, doc);
    }

    #[test]
    fn skip_serializing_if_leaves_the_field_out() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Sparse {
            a: i64,
            #[serde(skip_serializing_if = "Option::is_none")]
            b: Option<i64>,
            #[serde(skip)]
            c: i64,
        }
        let fields = to_fields(&Sparse {
            a: 1,
            b: None,
            c: 9,
        })
        .unwrap();
        assert_eq!(fields, vec![("a".to_owned(), Value::Int(1))]);
        let back: Sparse = from_fields(&map(fields)).unwrap();
        assert_eq!(
            back,
            Sparse {
                a: 1,
                b: None,
                c: 0
            }
        );
        let fields = to_fields(&Sparse {
            a: 1,
            b: Some(2),
            c: 0,
        })
        .unwrap();
        assert_eq!(fields.len(), 2);
    }

    #[test]
    fn missing_required_field_is_an_error_naming_it() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Person {
            name: String,
            age: i64,
        }
        let r = reason(from_fields::<Person>(&fields_of(&[("age", Value::Int(3))])).unwrap_err());
        assert!(r.contains("missing field `name`"), "{r}");
    }

    #[test]
    fn missing_option_field_is_none_without_serde_default() {
        #[derive(Debug, PartialEq, Deserialize)]
        struct Person {
            name: String,
            nick: Option<String>,
        }
        let p: Person = from_fields(&fields_of(&[("name", Value::String("x".into()))])).unwrap();
        assert_eq!(
            p,
            Person {
                name: "x".into(),
                nick: None
            }
        );
        let p: Person = from_fields(&fields_of(&[
            ("name", Value::String("x".into())),
            ("nick", Value::Null),
        ]))
        .unwrap();
        assert_eq!(p.nick, None);
    }

    #[test]
    fn wrong_type_or_out_of_range_names_the_field() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Small {
            level: u8,
        }
        let r =
            reason(from_fields::<Small>(&fields_of(&[("level", Value::Int(300))])).unwrap_err());
        assert!(r.contains("field `level`") && r.contains("300"), "{r}");
        let r = reason(from_fields::<Small>(&fields_of(&[("level", Value::Int(-1))])).unwrap_err());
        assert!(r.contains("field `level`"), "{r}");
        let r = reason(
            from_fields::<Small>(&fields_of(&[("level", Value::String("hi".into()))])).unwrap_err(),
        );
        assert!(
            r.contains("field `level`") && r.contains("invalid type"),
            "{r}"
        );
        let r = reason(from_fields::<Small>(&fields_of(&[("level", Value::Null)])).unwrap_err());
        assert!(r.contains("field `level`"), "{r}");
    }

    #[test]
    fn enum_from_unknown_string_is_an_error() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Paint {
            color: Color,
        }
        let r = reason(
            from_fields::<Paint>(&fields_of(&[("color", Value::String("Blue".into()))]))
                .unwrap_err(),
        );
        assert!(
            r.contains("field `color`") && r.contains("unknown variant `Blue`"),
            "{r}"
        );
        let r = reason(from_fields::<Paint>(&fields_of(&[("color", Value::Int(0))])).unwrap_err());
        assert!(r.contains("field `color`"), "{r}");
    }

    #[test]
    fn bytes_read_into_plain_vec_and_array() {
        #[derive(Debug, PartialEq, Deserialize)]
        struct Raw {
            plain: Vec<u8>,
            fixed: [u8; 3],
        }
        let fields = fields_of(&[
            ("plain", Value::Bytes(vec![1, 2])),
            ("fixed", Value::Bytes(vec![3, 4, 5])),
        ]);
        let raw: Raw = from_fields(&fields).unwrap();
        assert_eq!(
            raw,
            Raw {
                plain: vec![1, 2],
                fixed: [3, 4, 5]
            }
        );
        let fields = fields_of(&[
            ("plain", Value::Bytes(vec![])),
            ("fixed", Value::Bytes(vec![3, 4, 5, 6])),
        ]);
        let r = reason(from_fields::<Raw>(&fields).unwrap_err());
        assert!(r.contains("field `fixed`"), "{r}");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        #[derive(Debug, PartialEq, Deserialize)]
        struct One {
            a: i64,
        }
        let one: One = from_fields(&fields_of(&[
            ("a", Value::Int(1)),
            ("zzz", Value::Bytes(vec![1])),
        ]))
        .unwrap();
        assert_eq!(one, One { a: 1 });
    }

    #[test]
    fn int_reads_into_float_but_float_not_into_int() {
        #[derive(Debug, Deserialize)]
        struct F {
            x: f64,
        }
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct I {
            x: i64,
        }
        let f: F = from_fields(&fields_of(&[("x", Value::Int(2))])).unwrap();
        assert_eq!(f.x.to_bits(), 2.0f64.to_bits());
        assert!(from_fields::<I>(&fields_of(&[("x", Value::Float(2.0))])).is_err());
    }
}
