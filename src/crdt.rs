//! Conflict-free field types: `Counter` and collaborative `Text`.
//!
//! Both are kept as ordinary field writes on hidden per-replica sub-fields, so they travel,
//! log, conflict-check and recover like any field:
//! - counter `n`: each replica writes `__c.n.<replica>` = its own running total (an Int);
//!   the value is the sum. A total, not a delta, so a replayed or duplicated write never
//!   counts twice; only its replica writes it, so last-writer-wins on it loses nothing.
//! - text `t`: each replica writes `__t.t.<replica>` = every automerge change it made to the
//!   text (length-prefixed raw changes). The value is the text of a document built from a
//!   fixed genesis change plus every replica's changes, so edits merge character by
//!   character in any order.
//!
//! Pure logic: no redb, no network.

use std::collections::BTreeMap;

pub(crate) use text::{render, splice};

use crate::clock::ReplicaId;
use crate::error::{NameKind, Result};
use crate::value::{validate_name, Value};

const COUNTER_PREFIX: &str = "__c.";
const TEXT_PREFIX: &str = "__t.";

/// Which conflict-free type a sub-field belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Text,
}

/// The sub-field holding `replica`'s part of field `field`.
pub(crate) fn sub_field(kind: Kind, field: &str, replica: ReplicaId) -> String {
    let prefix = match kind {
        Kind::Counter => COUNTER_PREFIX,
        Kind::Text => TEXT_PREFIX,
    };
    format!("{prefix}{field}.{replica}")
}

/// Splits a sub-field name into its kind, parent field and replica.
pub(crate) fn parse_sub(name: &str) -> Option<(Kind, &str, ReplicaId)> {
    let (kind, rest) = if let Some(r) = name.strip_prefix(COUNTER_PREFIX) {
        (Kind::Counter, r)
    } else {
        (Kind::Text, name.strip_prefix(TEXT_PREFIX)?)
    };
    let (parent, replica) = rest.rsplit_once('.')?;
    if replica.len() != 16 {
        return None;
    }
    let replica = u64::from_str_radix(replica, 16).ok()?;
    validate_name(NameKind::Field, parent).ok()?;
    Some((kind, parent, ReplicaId(replica)))
}

/// Checks a field name that may be an engine sub-field (names from other replicas).
pub(crate) fn validate_field_name(name: &str) -> Result<()> {
    if parse_sub(name).is_some() {
        return Ok(());
    }
    validate_name(NameKind::Field, name)
}

/// Checks a sub-field's value: counters hold ints, texts hold decodable changes.
pub(crate) fn check_sub_value(name: &str, value: &Value) -> std::result::Result<(), String> {
    match (parse_sub(name), value) {
        (None, _) => Ok(()),
        (Some((Kind::Counter, _, _)), Value::Int(_)) => Ok(()),
        (Some((Kind::Text, _, _)), Value::Bytes(b)) => text::check_part(b),
        (Some((Kind::Counter, ..)), v) => {
            Err(format!("counter part {name} holds {}", v.type_name()))
        }
        (Some((Kind::Text, ..)), v) => Err(format!("text part {name} holds {}", v.type_name())),
    }
}

/// Text fields over automerge.
#[cfg(feature = "text")]
mod text {
    use automerge::transaction::{CommitOptions, Transactable};
    use automerge::{ActorId, AutoCommit, Change, ObjId, ObjType, ReadDoc, ROOT};

    use crate::clock::ReplicaId;
    use crate::error::{Error, Result};

    /// Bytes one text sub-field may hold (a replica's whole edit history of one text).
    const TEXT_PART_BYTES_MAX: usize = 4 << 20;

    /// Checks that a text part decodes.
    pub(super) fn check_part(bytes: &[u8]) -> std::result::Result<(), String> {
        decode_part(bytes).map(|_| ())
    }

    fn decode_part(bytes: &[u8]) -> std::result::Result<Vec<Change>, String> {
        if bytes.len() > TEXT_PART_BYTES_MAX {
            return Err(format!(
                "text part of {} bytes is over the limit",
                bytes.len()
            ));
        }
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let (len, tail) = rest
                .split_first_chunk::<4>()
                .ok_or("text part: truncated length")?;
            let len = u32::from_le_bytes(*len) as usize;
            if len > tail.len() {
                return Err("text part: truncated change".into());
            }
            let (raw, tail) = tail.split_at(len);
            out.push(Change::from_bytes(raw.to_vec()).map_err(|e| format!("text change: {e}"))?);
            rest = tail;
        }
        Ok(out)
    }

    fn encode_part(changes: &[Change]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in changes {
            let raw = c.raw_bytes();
            out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
            out.extend_from_slice(raw);
        }
        out
    }

    fn actor(replica: ReplicaId) -> ActorId {
        let mut bytes = [0u8; 16];
        bytes[8..].copy_from_slice(&replica.0.to_be_bytes());
        bytes[0] = 1; // never the genesis actor (all zeros)
        ActorId::from(bytes)
    }

    fn text_err(e: impl std::fmt::Display) -> Error {
        Error::Corrupt {
            what: format!("text: {e}"),
        }
    }

    /// The same first change on every replica, so every replica edits the same text object.
    fn genesis() -> Result<(AutoCommit, ObjId)> {
        let mut doc = AutoCommit::new().with_actor(ActorId::from([0u8; 16]));
        let text = doc
            .put_object(ROOT, "text", ObjType::Text)
            .map_err(text_err)?;
        doc.commit_with(CommitOptions::default().with_time(0));
        Ok((doc, text))
    }

    fn load<'a>(parts: impl Iterator<Item = &'a [u8]>) -> Result<(AutoCommit, ObjId)> {
        let (mut doc, text) = genesis()?;
        let mut changes = Vec::new();
        for p in parts {
            changes.extend(decode_part(p).map_err(text_err)?);
        }
        doc.apply_changes(changes).map_err(text_err)?;
        Ok((doc, text))
    }

    /// The text that replicas' parts make.
    pub(crate) fn render<'a>(parts: impl Iterator<Item = &'a [u8]>) -> Result<String> {
        let (doc, text) = load(parts)?;
        doc.text(&text).map_err(text_err)
    }

    /// Applies a splice (delete `delete` characters at `pos`, insert `insert`) as `me`, on the
    /// text all `parts` make; returns `me`'s new part.
    pub(crate) fn splice<'a>(
        parts: impl Iterator<Item = &'a [u8]>,
        me: ReplicaId,
        pos: usize,
        delete: usize,
        insert: &str,
    ) -> Result<Vec<u8>> {
        let (doc, text) = load(parts)?;
        let mut doc = doc.with_actor(actor(me));
        let len = doc.length(&text);
        if pos > len || delete > len - pos {
            return Err(Error::Conversion {
                reason: format!("splice at {pos} deleting {delete} in a text of {len} characters"),
            });
        }
        let delete = isize::try_from(delete).map_err(text_err)?;
        doc.splice_text(&text, pos, delete, insert)
            .map_err(text_err)?;
        doc.commit();
        let mine: Vec<Change> = doc
            .get_changes(&[])
            .into_iter()
            .filter(|c| c.actor_id() == &actor(me))
            .collect();
        let part = encode_part(&mine);
        if part.len() > TEXT_PART_BYTES_MAX {
            return Err(Error::Conversion {
                reason: format!(
                    "this replica's edits of the text exceed {TEXT_PART_BYTES_MAX} bytes"
                ),
            });
        }
        Ok(part)
    }
}

/// Without the `text` feature there is no automerge: a text field, local or received, is
/// an error that names the feature, and counters and plain fields work as ever.
#[cfg(not(feature = "text"))]
mod text {
    use crate::clock::ReplicaId;
    use crate::error::{Error, Result};

    fn needs_text() -> Error {
        Error::NeedsFeature {
            what: "a text field",
            feature: "text",
        }
    }

    pub(super) fn check_part(_bytes: &[u8]) -> std::result::Result<(), String> {
        Err(needs_text().to_string())
    }

    pub(crate) fn render<'a>(_parts: impl Iterator<Item = &'a [u8]>) -> Result<String> {
        Err(needs_text())
    }

    pub(crate) fn splice<'a>(
        _parts: impl Iterator<Item = &'a [u8]>,
        _me: ReplicaId,
        _pos: usize,
        _delete: usize,
        _insert: &str,
    ) -> Result<Vec<u8>> {
        Err(needs_text())
    }
}

/// Replaces counter and text parts by the values they make, under the parent names.
pub(crate) fn fold(fields: BTreeMap<String, Value>) -> Result<BTreeMap<String, Value>> {
    if !fields.keys().any(|k| k.starts_with("__")) {
        return Ok(fields);
    }
    let mut out = BTreeMap::new();
    let mut counters: BTreeMap<String, i64> = BTreeMap::new();
    let mut texts: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for (name, value) in fields {
        match (parse_sub(&name), value) {
            (Some((Kind::Counter, parent, _)), Value::Int(n)) => {
                let sum = counters.entry(parent.to_owned()).or_default();
                *sum = sum.wrapping_add(n);
            }
            (Some((Kind::Text, parent, _)), Value::Bytes(b)) => {
                texts.entry(parent.to_owned()).or_default().push(b);
            }
            (_, value) => {
                out.insert(name, value);
            }
        }
    }
    for (name, n) in counters {
        out.insert(name, Value::Int(n));
    }
    for (name, parts) in texts {
        out.insert(
            name,
            Value::String(render(parts.iter().map(Vec::as_slice))?),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_field_names_round_trip() {
        let n = sub_field(Kind::Counter, "likes", ReplicaId(0xab));
        assert_eq!(
            parse_sub(&n),
            Some((Kind::Counter, "likes", ReplicaId(0xab)))
        );
        assert!(parse_sub("__c.likes.zz").is_none());
        assert!(parse_sub("likes").is_none());
        assert!(validate_field_name(&n).is_ok());
        assert!(validate_field_name("__x").is_err());
    }

    #[cfg(feature = "text")]
    #[test]
    fn concurrent_text_edits_keep_every_insertion_in_any_order() {
        let parts: Vec<Vec<u8>> = ["alpha ", "beta ", "gamma "]
            .iter()
            .enumerate()
            .map(|(i, s)| splice(std::iter::empty(), ReplicaId(i as u64 + 1), 0, 0, s).unwrap())
            .collect();
        let a = render(parts.iter().map(Vec::as_slice)).unwrap();
        let b = render(parts.iter().rev().map(Vec::as_slice)).unwrap();
        assert_eq!(a, b);
        for w in ["alpha ", "beta ", "gamma "] {
            assert!(a.contains(w), "{a:?}");
        }
    }

    #[cfg(feature = "text")]
    #[test]
    fn bad_text_parts_are_errors() {
        assert!(
            check_sub_value("__t.x.0000000000000001", &Value::Bytes(vec![9, 0, 0, 0, 1])).is_err()
        );
        assert!(check_sub_value("__t.x.0000000000000001", &Value::Int(1)).is_err());
        assert!(check_sub_value("__c.x.0000000000000001", &Value::Int(1)).is_ok());
    }

    #[cfg(not(feature = "text"))]
    #[test]
    fn text_without_the_feature_is_an_error_that_names_it() {
        let part = "__t.x.0000000000000001";
        let err = check_sub_value(part, &Value::Bytes(Vec::new())).unwrap_err();
        assert!(err.contains("`text` feature"), "{err}");
        let err = splice(std::iter::empty(), ReplicaId(1), 0, 0, "a").unwrap_err();
        assert!(err.to_string().contains("`text` feature"), "{err}");
        let mut f = BTreeMap::new();
        f.insert(part.to_owned(), Value::Bytes(Vec::new()));
        assert!(fold(f).is_err());
    }

    #[test]
    fn counters_sum() {
        let mut f = BTreeMap::new();
        f.insert(sub_field(Kind::Counter, "n", ReplicaId(1)), Value::Int(3));
        f.insert(sub_field(Kind::Counter, "n", ReplicaId(2)), Value::Int(4));
        f.insert("other".to_owned(), Value::Int(1));
        let out = fold(f).unwrap();
        assert_eq!(out.get("n"), Some(&Value::Int(7)));
        assert_eq!(out.len(), 2);
    }
}
