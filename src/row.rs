//! The object row codec. Decoding and re-encoding the row is on every write's path, so it
//! is written by hand, and stamps — most of a row's overhead — are stored once per row.
//!
//! Rows written since format 3 start with [`ROW_V2`], then the row's distinct stamps (a
//! count, then 8 bytes of time and 8 of replica id each, little-endian), the existence (0
//! none, 1 deleted, 2 alive; then a stamp index), the floor's stamp index, and the fields as
//! a count and `(field id, stamp index, value)` each. A loaded object's fields share one
//! stamp, so a field costs its value and three bytes, where postcard spent ~19 on varint
//! stamps. Integers are LEB128 varints, `i64` zigzag-encoded, `f64` 8 bytes little-endian,
//! strings and bytes a length then the bytes; a value starts with its variant index.
//!
//! Older rows are postcard's encoding of `ObjectState<u32>` (first byte 0 or 1, never
//! `ROW_V2`); they are still read, and rewritten in the new layout when next written.

/// The first byte of a row in the stamp-table layout.
pub(crate) const ROW_V2: u8 = 0xF1;

use crate::clock::{ReplicaId, Stamp};
use crate::error::{Error, Result};
use crate::merge::ObjectState;
use crate::value::Value;

/// The row's bytes (stamp-table layout).
pub(crate) fn encode(state: &ObjectState<u32>) -> Vec<u8> {
    let mut stamps: Vec<Stamp> = Vec::with_capacity(4);
    let mut index = |s: Stamp| -> u64 {
        match stamps.iter().position(|x| *x == s) {
            Some(i) => i as u64,
            None => {
                stamps.push(s);
                (stamps.len() - 1) as u64
            }
        }
    };
    let exists = state.exists.map(|(s, alive)| (index(s), alive));
    let floor = index(state.floor);
    let field_stamps: Vec<u64> = state.fields.iter().map(|(_, s, _)| index(*s)).collect();
    let guess = 32
        + stamps.len() * 16
        + state.fields.len() * 8
        + state
            .fields
            .iter()
            .map(|(_, _, v)| v.size_bytes())
            .sum::<usize>();
    let mut out = Vec::with_capacity(guess);
    out.push(ROW_V2);
    put_varint(&mut out, stamps.len() as u64);
    for s in &stamps {
        out.extend_from_slice(&s.time.to_le_bytes());
        out.extend_from_slice(&s.replica.0.to_le_bytes());
    }
    match exists {
        None => out.push(0),
        Some((i, alive)) => {
            out.push(1 + u8::from(alive));
            put_varint(&mut out, i);
        }
    }
    put_varint(&mut out, floor);
    put_varint(&mut out, state.fields.len() as u64);
    for ((f, _, v), si) in state.fields.iter().zip(field_stamps) {
        put_varint(&mut out, u64::from(*f));
        put_varint(&mut out, si);
        put_value(&mut out, v);
    }
    out
}

/// The row in the older layout: postcard's encoding (kept to test that it is still read).
#[cfg(test)]
pub(crate) fn encode_postcard(state: &ObjectState<u32>) -> Vec<u8> {
    let guess = 48
        + state.fields.len() * 24
        + state
            .fields
            .iter()
            .map(|(_, _, v)| v.size_bytes())
            .sum::<usize>();
    let mut out = Vec::with_capacity(guess);
    match state.exists {
        None => out.push(0),
        Some((s, alive)) => {
            out.push(1);
            put_stamp(&mut out, s);
            out.push(u8::from(alive));
        }
    }
    put_stamp(&mut out, state.floor);
    put_varint(&mut out, state.fields.len() as u64);
    for (f, s, v) in &state.fields {
        put_varint(&mut out, u64::from(*f));
        put_stamp(&mut out, *s);
        put_value(&mut out, v);
    }
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
fn put_stamp(out: &mut Vec<u8>, s: Stamp) {
    put_varint(out, s.time);
    put_varint(out, s.replica.0);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.push(0),
        Value::Bool(b) => {
            out.push(1);
            out.push(u8::from(*b));
        }
        Value::Int(i) => {
            out.push(2);
            put_varint(out, ((*i << 1) ^ (*i >> 63)) as u64);
        }
        Value::Float(f) => {
            out.push(3);
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Value::String(s) => {
            out.push(4);
            put_bytes(out, s.as_bytes());
        }
        Value::Bytes(b) => {
            out.push(5);
            put_bytes(out, b);
        }
    }
}

/// Decodes a row in either layout; anything that is not a whole, well-formed row is
/// `Corrupt`.
pub(crate) fn decode(bytes: &[u8]) -> Result<ObjectState<u32>> {
    let mut r = Reader { b: bytes, at: 0 };
    let state = if bytes.first() == Some(&ROW_V2) {
        r.at = 1;
        r.state_v2()?
    } else {
        r.state()?
    };
    if r.at != bytes.len() {
        return Err(r.bad("trailing bytes"));
    }
    Ok(state)
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn bad(&self, what: &str) -> Error {
        Error::Corrupt {
            what: format!("object row: {what} at byte {}", self.at),
        }
    }

    fn byte(&mut self) -> Result<u8> {
        let b = *self.b.get(self.at).ok_or_else(|| self.bad("cut short"))?;
        self.at += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| self.bad("length past the end"))?;
        let b: &'a [u8] = self.b;
        self.at = end;
        Ok(&b[end - n..end])
    }

    /// A varint of at most `max_bytes` bytes whose last byte fits in `last_max`
    /// (postcard's rule: 10 bytes and 0x01 for u64, 5 and 0x0f for u32).
    fn varint(&mut self, max_bytes: u32, last_max: u8) -> Result<u64> {
        let mut out = 0u64;
        for i in 0..max_bytes {
            let b = self.byte()?;
            out |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i == max_bytes - 1 && b > last_max {
                    return Err(self.bad("varint overflow"));
                }
                return Ok(out);
            }
        }
        Err(self.bad("varint too long"))
    }

    fn u64(&mut self) -> Result<u64> {
        self.varint(10, 0x01)
    }

    fn u32(&mut self) -> Result<u32> {
        let v = self.varint(5, 0x0f)?;
        u32::try_from(v).map_err(|_| self.bad("u32 overflow"))
    }

    fn bool(&mut self) -> Result<bool> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.bad("bool")),
        }
    }

    fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| self.bad("length"))
    }

    fn stamp(&mut self) -> Result<Stamp> {
        Ok(Stamp {
            time: self.u64()?,
            replica: ReplicaId(self.u64()?),
        })
    }

    fn value(&mut self) -> Result<Value> {
        Ok(match self.u32()? {
            0 => Value::Null,
            1 => Value::Bool(self.bool()?),
            2 => {
                let z = self.u64()?;
                Value::Int(((z >> 1) as i64) ^ -((z & 1) as i64))
            }
            3 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(self.take(8)?);
                Value::Float(f64::from_bits(u64::from_le_bytes(b)))
            }
            4 => {
                let n = self.len()?;
                let s = self.take(n)?;
                let s = std::str::from_utf8(s).map_err(|_| self.bad("string not UTF-8"))?;
                Value::String(s.to_owned())
            }
            5 => {
                let n = self.len()?;
                Value::Bytes(self.take(n)?.to_vec())
            }
            _ => return Err(self.bad("value type")),
        })
    }

    fn fixed_u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn state_v2(&mut self) -> Result<ObjectState<u32>> {
        let n = self.len()?;
        if n > (self.b.len() - self.at) / 16 {
            return Err(self.bad("stamp count"));
        }
        let mut stamps = Vec::with_capacity(n);
        for _ in 0..n {
            stamps.push(Stamp {
                time: self.fixed_u64()?,
                replica: ReplicaId(self.fixed_u64()?),
            });
        }
        let stamp = |r: &mut Self| -> Result<Stamp> {
            let i = r.len()?;
            stamps.get(i).copied().ok_or_else(|| r.bad("stamp index"))
        };
        let exists = match self.byte()? {
            0 => None,
            t @ (1 | 2) => Some((stamp(self)?, t == 2)),
            _ => return Err(self.bad("existence tag")),
        };
        let floor = stamp(self)?;
        let n = self.len()?;
        // Each field takes at least 3 bytes: never reserve more than the row could hold.
        let mut fields = Vec::with_capacity(n.min((self.b.len() - self.at) / 3));
        for _ in 0..n {
            let f = self.u32()?;
            let s = stamp(self)?;
            fields.push((f, s, self.value()?));
        }
        Ok(ObjectState {
            exists,
            floor,
            fields,
        })
    }

    fn state(&mut self) -> Result<ObjectState<u32>> {
        let exists = match self.byte()? {
            0 => None,
            1 => {
                let s = self.stamp()?;
                Some((s, self.bool()?))
            }
            _ => return Err(self.bad("existence tag")),
        };
        let floor = self.stamp()?;
        let n = self.len()?;
        // Each field takes at least 4 bytes: never reserve more than the row could hold.
        let mut fields = Vec::with_capacity(n.min((self.b.len() - self.at) / 4));
        for _ in 0..n {
            let f = self.u32()?;
            let s = self.stamp()?;
            fields.push((f, s, self.value()?));
        }
        Ok(ObjectState {
            exists,
            floor,
            fields,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stamp() -> impl Strategy<Value = Stamp> {
        (any::<u64>(), any::<u64>()).prop_map(|(time, r)| Stamp {
            time,
            replica: ReplicaId(r),
        })
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            any::<u64>().prop_map(|b| Value::Float(f64::from_bits(b))),
            ".{0,40}".prop_map(Value::String),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Value::Bytes),
        ]
    }

    fn state() -> impl Strategy<Value = ObjectState<u32>> {
        (
            proptest::option::of((stamp(), any::<bool>())),
            stamp(),
            proptest::collection::vec((any::<u32>(), stamp(), value()), 0..12),
        )
            .prop_map(|(exists, floor, fields)| ObjectState {
                exists,
                floor,
                fields,
            })
    }

    proptest! {
        /// Rows round-trip, and rows in the older layout (postcard's) still read.
        #[test]
        fn rows_round_trip_in_both_layouts(s in state()) {
            prop_assert_eq!(decode(&encode(&s)).expect("decode"), s.clone());
            let old = encode_postcard(&s);
            prop_assert_eq!(&old, &postcard::to_allocvec(&s).expect("postcard"));
            prop_assert_eq!(decode(&old).expect("decode old"), s);
        }

        /// Damaged rows in the new layout: an error or some row, never a panic.
        #[test]
        fn damaged_rows_never_panic(
            s in state(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut bytes = encode(&s);
            let i = flip.index(bytes.len());
            bytes[i] ^= 1 << bit;
            let _ = decode(&bytes[..cut.index(bytes.len() + 1)]);
        }

        /// Damaged rows: an error or a row postcard would read the same way, never a panic.
        #[test]
        fn damaged_rows_are_errors_or_agree_with_postcard(
            s in state(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut bytes = encode_postcard(&s);
            let i = flip.index(bytes.len());
            bytes[i] ^= 1 << bit;
            let bytes = &bytes[..cut.index(bytes.len() + 1)];
            if let Ok(ours) = decode(bytes) {
                let theirs: ObjectState<u32> = postcard::from_bytes(bytes).expect("postcard agrees");
                prop_assert_eq!(ours, theirs);
            }
        }
    }

    #[test]
    fn garbage_is_corrupt() {
        for bytes in [
            &[][..],
            &[2],
            &[1, 0x80],
            &[0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x7f],
        ] {
            assert!(
                matches!(decode(bytes), Err(Error::Corrupt { .. })),
                "{bytes:?}"
            );
        }
        for mut ok in [
            encode(&ObjectState::default()),
            encode_postcard(&ObjectState::default()),
        ] {
            ok.push(0);
            assert!(decode(&ok).is_err(), "trailing bytes");
        }
        // A stamp index past the table, a stamp count past the row.
        assert!(decode(&[ROW_V2, 0, 0, 0, 0]).is_err());
        assert!(decode(&[ROW_V2, 9, 0]).is_err());
    }
}
