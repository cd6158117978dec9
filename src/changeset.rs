//! Changesets: batches of log entries shipped between replicas.
//!
//! Wire form: `"FLC1"`, the postcard body, then the blake3 hash of everything before it.
//! The hash is the changeset's id and its checksum: a flipped bit anywhere is refused.
//! Decoding validates everything before a single write is applied.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::clock::ReplicaId;
use crate::crdt::{check_sub_value, validate_field_name};
use crate::error::{Error, NameKind, Result};
use crate::log::{LogEntry, Op};
use crate::value::{validate_name, Value};

const MAGIC: &[u8; 4] = b"FLC1";
const HASH_LEN: usize = 32;

/// The blake3 hash of a changeset's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChangesetId(pub [u8; 32]);

impl fmt::Debug for ChangesetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0[..8].iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Display for ChangesetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A batch of log entries from one replica's Updates log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Changeset {
    /// The replica whose log the entries come from.
    pub origin: ReplicaId,
    /// Entries in log order.
    pub entries: Vec<LogEntry>,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::BadChangeset {
        reason: reason.into(),
    }
}

impl Changeset {
    /// Encodes the changeset with its checksum.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut out = MAGIC.to_vec();
        out = postcard::to_extend(self, out).map_err(|e| bad(format!("encode: {e}")))?;
        let hash = blake3::hash(&out);
        out.extend_from_slice(hash.as_bytes());
        Ok(out)
    }

    /// The id of encoded changeset bytes (their trailing hash), without decoding them.
    pub fn id_of(bytes: &[u8]) -> Option<ChangesetId> {
        let tail = bytes.len().checked_sub(HASH_LEN)?;
        bytes[tail..].try_into().ok().map(ChangesetId)
    }

    /// Decodes and fully validates a changeset; values larger than `value_bytes_max` are
    /// refused. Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8], value_bytes_max: usize) -> Result<Changeset> {
        if bytes.len() < MAGIC.len() + HASH_LEN {
            return Err(bad(format!("{} bytes is too short", bytes.len())));
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(bad("not a changeset (bad magic)"));
        }
        let split = bytes.len() - HASH_LEN;
        let (body, hash) = bytes.split_at(split);
        if blake3::hash(body).as_bytes() != hash {
            return Err(bad("checksum mismatch (corrupted or truncated)"));
        }
        let (cs, rest): (Changeset, _) = postcard::take_from_bytes(&body[MAGIC.len()..])
            .map_err(|e| bad(format!("decode: {e}")))?;
        if !rest.is_empty() {
            return Err(bad(format!("{} trailing bytes", rest.len())));
        }
        // The id is the hash of the bytes: one changeset must have one encoding.
        let canonical = postcard::to_allocvec(&cs).map_err(|e| bad(format!("encode: {e}")))?;
        if canonical != body[MAGIC.len()..] {
            return Err(bad("non-canonical encoding"));
        }
        cs.validate(value_bytes_max)?;
        Ok(cs)
    }

    /// Checks names, keys, value sizes and the shape of every entry.
    pub fn validate(&self, value_bytes_max: usize) -> Result<()> {
        let mut prev_seq = 0;
        for (i, e) in self.entries.iter().enumerate() {
            let at = |msg: String| bad(format!("entry {i} (seq {}): {msg}", e.seq));
            if e.seq <= prev_seq {
                return Err(at("sequence numbers must rise".into()));
            }
            prev_seq = e.seq;
            // Duplicates are found by sorting references: no name is copied or hashed.
            let mut objects = Vec::with_capacity(e.writes.len());
            let mut names: Vec<&str> = Vec::new();
            for w in &e.writes {
                validate_name(NameKind::Collection, &w.collection)
                    .map_err(|err| at(err.to_string()))?;
                w.pk.validate().map_err(|err| at(err.to_string()))?;
                objects.push((w.collection.as_str(), &w.pk));
                names.clear();
                let check = |name: &str, value: &Value| -> Result<()> {
                    validate_field_name(name).map_err(|err| at(err.to_string()))?;
                    check_sub_value(name, value).map_err(at)?;
                    if value.size_bytes() > value_bytes_max {
                        return Err(at(format!(
                            "value of {}[{}].{name} is {} bytes; the limit is {value_bytes_max}",
                            w.collection,
                            w.pk,
                            value.size_bytes()
                        )));
                    }
                    Ok(())
                };
                match &w.op {
                    Op::Insert { fields } => {
                        for (n, v) in fields {
                            check(n, v)?;
                            names.push(n);
                        }
                    }
                    Op::Update { fields } => {
                        if fields.is_empty() {
                            return Err(at("an update with no fields".into()));
                        }
                        for fw in fields {
                            check(&fw.field, &fw.value)?;
                            names.push(&fw.field);
                        }
                    }
                    Op::Delete { .. } => {}
                }
                if names.len() > 1 {
                    names.sort_unstable();
                    if let Some(d) = names.windows(2).find(|d| d[0] == d[1]) {
                        return Err(at(format!("field {} written twice", d[0])));
                    }
                }
            }
            objects.sort_unstable();
            if let Some(d) = objects.windows(2).find(|d| d[0] == d[1]) {
                return Err(at(format!("two writes to {}[{}]", d[0].0, d[0].1)));
            }
        }
        Ok(())
    }
}
