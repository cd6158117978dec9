//! Optional per-collection schemas: field types, required fields, queryable fields.
//!
//! Pure logic: checks a write against a schema; the store persists schemas in `meta`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::crdt::{parse_sub, Kind};
use crate::error::{Error, NameKind, Result};
use crate::value::{validate_name, Pk, Value};

/// The type a schema requires of a field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FieldType {
    /// `Value::Bool`.
    Bool,
    /// `Value::Int`.
    Int,
    /// `Value::Float`.
    Float,
    /// `Value::String`.
    String,
    /// `Value::Bytes`.
    Bytes,
    /// Any value.
    Any,
    /// A counter: changed only by `increment`; concurrent increments add up.
    Counter,
    /// Collaborative text: changed only by `edit_text`; concurrent edits merge by character.
    Text,
}

impl FieldType {
    fn admits(self, v: &Value) -> bool {
        matches!(
            (self, v),
            (FieldType::Any, _)
                | (FieldType::Bool, Value::Bool(_))
                | (FieldType::Int, Value::Int(_))
                | (FieldType::Float, Value::Float(_))
                | (FieldType::String, Value::String(_))
                | (FieldType::Bytes, Value::Bytes(_))
        )
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FieldType::Bool => "bool",
            FieldType::Int => "int",
            FieldType::Float => "float",
            FieldType::String => "string",
            FieldType::Bytes => "bytes",
            FieldType::Any => "any",
            FieldType::Counter => "counter",
            FieldType::Text => "text",
        })
    }
}

/// One field of a schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldSpec {
    /// The required type (null is allowed only when the field is optional).
    pub ty: FieldType,
    /// Must be present and non-null on insert, and may never be set to null.
    pub required: bool,
    /// May be used in subscription queries and rules.
    pub queryable: bool,
}

impl FieldSpec {
    /// A required field of type `ty`.
    pub fn required(ty: FieldType) -> Self {
        FieldSpec {
            ty,
            required: true,
            queryable: false,
        }
    }
    /// An optional (nullable, may be absent) field of type `ty`.
    pub fn optional(ty: FieldType) -> Self {
        FieldSpec {
            ty,
            required: false,
            queryable: false,
        }
    }
    /// Marks the field queryable.
    pub fn queryable(mut self) -> Self {
        self.queryable = true;
        self
    }
}

/// The schema of one collection. Without one, a collection takes any field of any type.
/// With one, only declared fields may be written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schema {
    /// The collection this schema governs.
    pub collection: String,
    /// Declared fields by name.
    pub fields: BTreeMap<String, FieldSpec>,
}

impl Schema {
    /// An empty schema for `collection`; add fields with [`Schema::field`].
    pub fn new(collection: impl Into<String>) -> Self {
        Schema {
            collection: collection.into(),
            fields: BTreeMap::new(),
        }
    }

    /// Declares a field.
    pub fn field(mut self, name: impl Into<String>, spec: FieldSpec) -> Self {
        self.fields.insert(name.into(), spec);
        self
    }

    /// Checks the schema's own names.
    pub fn validate(&self) -> Result<()> {
        validate_name(NameKind::Collection, &self.collection)?;
        for name in self.fields.keys() {
            validate_name(NameKind::Field, name)?;
        }
        Ok(())
    }

    fn err(&self, pk: &Pk, field: &str, expected: String, found: String) -> Error {
        Error::Schema {
            collection: self.collection.clone(),
            pk: pk.clone(),
            field: field.to_owned(),
            expected,
            found,
        }
    }

    /// Checks one field value.
    pub fn check_value(&self, pk: &Pk, field: &str, value: &Value) -> Result<()> {
        if let Some((kind, parent, _)) = parse_sub(field) {
            let want = match kind {
                Kind::Counter => FieldType::Counter,
                Kind::Text => FieldType::Text,
            };
            return match self.fields.get(parent) {
                Some(spec) if spec.ty == want => Ok(()),
                Some(spec) => Err(self.err(pk, parent, spec.ty.to_string(), want.to_string())),
                None => Err(self.err(
                    pk,
                    parent,
                    "a declared field".into(),
                    "an undeclared field".into(),
                )),
            };
        }
        let Some(spec) = self.fields.get(field) else {
            return Err(self.err(
                pk,
                field,
                "a declared field".into(),
                "an undeclared field".into(),
            ));
        };
        if matches!(value, Value::Null) {
            if spec.required {
                return Err(self.err(pk, field, format!("{} (required)", spec.ty), "null".into()));
            }
            return Ok(());
        }
        if matches!(spec.ty, FieldType::Counter | FieldType::Text) {
            let how = if spec.ty == FieldType::Counter {
                "changes through increment"
            } else {
                "changes through edit_text"
            };
            return Err(self.err(
                pk,
                field,
                format!("{} ({how})", spec.ty),
                value.type_name().into(),
            ));
        }
        if !spec.ty.admits(value) {
            return Err(self.err(pk, field, spec.ty.to_string(), value.type_name().into()));
        }
        Ok(())
    }

    /// Checks that a new object names every required field.
    pub fn check_complete<'a>(
        &self,
        pk: &Pk,
        mut present: impl FnMut(&str) -> Option<&'a Value>,
    ) -> Result<()> {
        for (name, spec) in &self.fields {
            let merged_type = matches!(spec.ty, FieldType::Counter | FieldType::Text);
            if spec.required && !merged_type && matches!(present(name), None | Some(Value::Null)) {
                return Err(self.err(
                    pk,
                    name,
                    format!("a value for required {} field", spec.ty),
                    "nothing".into(),
                ));
            }
        }
        Ok(())
    }

    /// Whether `field` is declared queryable.
    pub fn is_queryable(&self, field: &str) -> bool {
        self.fields.get(field).is_some_and(|s| s.queryable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dog() -> Schema {
        Schema::new("Dog")
            .field("name", FieldSpec::required(FieldType::String))
            .field("age", FieldSpec::optional(FieldType::Int).queryable())
    }

    #[test]
    fn types_are_checked() {
        let s = dog();
        let pk = Pk::Int(1);
        assert!(s.check_value(&pk, "age", &Value::Int(3)).is_ok());
        assert!(s.check_value(&pk, "age", &Value::Null).is_ok());
        let e = s.check_value(&pk, "age", &Value::from("old")).unwrap_err();
        assert!(
            e.to_string()
                .contains("Dog[1].age: expected int, found string"),
            "{e}"
        );
        assert!(s.check_value(&pk, "name", &Value::Null).is_err());
        assert!(s.check_value(&pk, "color", &Value::Null).is_err());
    }

    #[test]
    fn required_fields_must_be_present() {
        let s = dog();
        let e = s.check_complete(&Pk::Int(1), |_| None).unwrap_err();
        assert!(matches!(e, Error::Schema { ref field, .. } if field == "name"));
    }
}
