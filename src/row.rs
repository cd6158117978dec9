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
use crate::merge::{wins, ObjectState};
use crate::value::Value;

/// The row's bytes (stamp-table layout).
pub(crate) fn encode(state: &ObjectState<u32>) -> Vec<u8> {
    let values = state
        .fields
        .iter()
        .map(|(_, _, v)| v.size_bytes())
        .sum::<usize>();
    write_v2(state.exists, state.floor, &state.fields, values, put_value)
}

/// Writes a row in the stamp-table layout: the stamps in first-use order (existence, floor,
/// then the fields'), and each field's value through `put`.
fn write_v2<T>(
    exists: Option<(Stamp, bool)>,
    floor: Stamp,
    fields: &[(u32, Stamp, T)],
    value_bytes: usize,
    mut put: impl FnMut(&mut Vec<u8>, &T),
) -> Vec<u8> {
    let mut stamps: Vec<Stamp> = Vec::with_capacity(4);
    // Most rows have a few stamps, found by a scan; a row whose fields came from many
    // transactions indexes them, or each field would scan them all.
    const SCANNED: usize = 16;
    let mut indexed: std::collections::HashMap<Stamp, u64> = std::collections::HashMap::new();
    let mut index = |s: Stamp| -> u64 {
        let found = if stamps.len() <= SCANNED {
            stamps.iter().position(|x| *x == s).map(|i| i as u64)
        } else {
            indexed.get(&s).copied()
        };
        if let Some(i) = found {
            return i;
        }
        stamps.push(s);
        let i = (stamps.len() - 1) as u64;
        if stamps.len() > SCANNED {
            if indexed.is_empty() {
                indexed.extend(stamps.iter().enumerate().map(|(i, s)| (*s, i as u64)));
            } else {
                indexed.insert(s, i);
            }
        }
        i
    };
    let exists = exists.map(|(s, alive)| (index(s), alive));
    let floor = index(floor);
    let field_stamps: Vec<u64> = fields.iter().map(|(_, s, _)| index(*s)).collect();
    let mut out = Vec::with_capacity(32 + stamps.len() * 16 + fields.len() * 8 + value_bytes);
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
    put_varint(&mut out, fields.len() as u64);
    for ((f, _, v), si) in fields.iter().zip(field_stamps) {
        put_varint(&mut out, u64::from(*f));
        put_varint(&mut out, si);
        put(&mut out, v);
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

/// Decodes a row read only to be returned: `None` if the object is not live, else each
/// field's id and value passed through `field`, in the row's (field id) order. Checks what
/// [`decode`] checks, but keeps no stamps: `get` builds the object straight from the row.
pub(crate) fn decode_live<T>(
    bytes: &[u8],
    mut field: impl FnMut(u32, Value) -> Result<T>,
) -> Result<Option<Vec<T>>> {
    if bytes.first() != Some(&ROW_V2) {
        let state = decode(bytes)?;
        if !state.is_live() {
            return Ok(None);
        }
        let fields = state.fields.into_iter().map(|(f, _, v)| field(f, v));
        return fields.collect::<Result<_>>().map(Some);
    }
    let mut r = Reader { b: bytes, at: 1 };
    let (stamps, exists, _) = r.head_v2()?;
    let live = matches!(exists, Some((_, true)));
    let n = r.len()?;
    // Each field takes at least 3 bytes: never reserve more than the row could hold.
    let mut out = Vec::with_capacity(if live {
        n.min((bytes.len() - r.at) / 3)
    } else {
        0
    });
    for _ in 0..n {
        let f = r.u32()?;
        r.stamp_at(stamps)?;
        let v = r.value()?;
        if live {
            out.push(field(f, v)?);
        }
    }
    if r.at != bytes.len() {
        return Err(r.bad("trailing bytes"));
    }
    Ok(live.then_some(out))
}

/// Whether the row's object is live, reading only its head (stamp-table layout) or the
/// whole row (older layout).
pub(crate) fn is_live(bytes: &[u8]) -> Result<bool> {
    if bytes.first() != Some(&ROW_V2) {
        return Ok(decode(bytes)?.is_live());
    }
    let mut r = Reader { b: bytes, at: 1 };
    r.stamp_table()?;
    Ok(match r.byte()? {
        0 | 1 => false,
        2 => true,
        _ => return Err(r.bad("existence tag")),
    })
}

/// Where a field's value was: in the old row's bytes, or a new write.
#[derive(Clone, Copy)]
enum Source<'v> {
    Old(usize, usize),
    New(&'v Value),
}

/// A row in the stamp-table layout, read without decoding its values: what a local update
/// of a live object needs (whether it is live, the written fields' old values) and the new
/// row, spliced from the old bytes. Decoding ten values to re-encode them unchanged was a
/// fifth of a field write.
pub(crate) struct Parsed<'a> {
    b: &'a [u8],
    stamps: Vec<Stamp>,
    exists: Option<(usize, bool)>,
    floor: usize,
    /// `(field id, stamp index, value bytes)` in row order.
    fields: Vec<(u32, usize, (usize, usize))>,
}

/// Parses a row in the stamp-table layout; `None` for the older layout. Values are
/// skipped, not checked beyond their framing (a string's UTF-8 is checked when it is read).
pub(crate) fn parse(bytes: &[u8]) -> Result<Option<Parsed<'_>>> {
    if bytes.first() != Some(&ROW_V2) {
        return Ok(None);
    }
    let mut r = Reader { b: bytes, at: 1 };
    let table = r.stamp_table()?;
    let n = table.len() / 16;
    let mut t = Reader { b: table, at: 0 };
    let mut stamps = Vec::with_capacity(n);
    for _ in 0..n {
        stamps.push(Stamp {
            time: t.fixed_u64()?,
            replica: ReplicaId(t.fixed_u64()?),
        });
    }
    let index = |r: &mut Reader| -> Result<usize> {
        let i = r.len()?;
        if i < n {
            Ok(i)
        } else {
            Err(r.bad("stamp index"))
        }
    };
    let exists = match r.byte()? {
        0 => None,
        t @ (1 | 2) => Some((index(&mut r)?, t == 2)),
        _ => return Err(r.bad("existence tag")),
    };
    let floor = index(&mut r)?;
    let count = r.len()?;
    let mut fields = Vec::with_capacity(count.min((bytes.len() - r.at) / 3));
    for _ in 0..count {
        let f = r.u32()?;
        let si = index(&mut r)?;
        let start = r.at;
        r.skip_value()?;
        fields.push((f, si, (start, r.at)));
    }
    if r.at != bytes.len() {
        return Err(r.bad("trailing bytes"));
    }
    Ok(Some(Parsed {
        b: bytes,
        stamps,
        exists,
        floor,
        fields,
    }))
}

impl<'a> Parsed<'a> {
    /// Whether the object is live.
    pub(crate) fn is_live(&self) -> bool {
        matches!(self.exists, Some((_, true)))
    }

    /// The field's stamp and value, as [`ObjectState::field`] finds it.
    pub(crate) fn field(&self, field: u32) -> Result<Option<(Stamp, Value)>> {
        let Ok(i) = self.fields.binary_search_by(|(f, _, _)| f.cmp(&field)) else {
            return Ok(None);
        };
        let (_, si, (start, _)) = self.fields[i];
        let mut r = Reader {
            b: self.b,
            at: start,
        };
        Ok(Some((self.stamps[si], r.value()?)))
    }

    /// The field's stamp, without decoding its value.
    pub(crate) fn field_stamp(&self, field: u32) -> Option<Stamp> {
        let i = self
            .fields
            .binary_search_by(|(f, _, _)| f.cmp(&field))
            .ok()?;
        Some(self.stamps[self.fields[i].1])
    }

    /// Fields written below this stamp were cleared by an insert or a delete.
    pub(crate) fn floor(&self) -> Stamp {
        self.stamps[self.floor]
    }

    /// The row after `writes` (distinct field ids, each with its stamp) are merged in one by
    /// one as [`ObjectState::apply_field`] merges them: byte for byte what decoding, applying
    /// and encoding gives. Also says, per write, whether it was applied. The writes are
    /// sorted once and merged with the row's fields in one pass, so the cost is linear in
    /// the row and the writes (inserted one by one, each new field moved every field after
    /// it: N new fields cost N² moves).
    pub(crate) fn patch(&self, writes: &[(u32, Stamp, &Value)]) -> Patched {
        let floor = self.stamps[self.floor];
        let mut order: Vec<usize> = (0..writes.len()).collect();
        order.sort_unstable_by_key(|&i| writes[i].0);
        let mut applied = vec![false; writes.len()];
        let mut fields: Vec<(u32, Stamp, Source<'_>)> =
            Vec::with_capacity(self.fields.len() + writes.len());
        let mut old = self.fields.iter().peekable();
        for i in order {
            let (id, stamp, value) = writes[i];
            while let Some(&&(f, si, (a, b))) = old.peek().filter(|(f, _, _)| *f < id) {
                fields.push((f, self.stamps[si], Source::Old(a, b)));
                old.next();
            }
            let held = old
                .next_if(|(f, _, _)| *f == id)
                .map(|&(f, si, (a, b))| (f, self.stamps[si], Source::Old(a, b)));
            if wins(floor, held.as_ref().map(|h| h.1), stamp) {
                applied[i] = true;
                fields.push((id, stamp, Source::New(value)));
            } else {
                fields.extend(held);
            }
        }
        for &(f, si, (a, b)) in old {
            fields.push((f, self.stamps[si], Source::Old(a, b)));
        }
        let exists = self.exists.map(|(si, alive)| (self.stamps[si], alive));
        let value_bytes = self.b.len() + writes.len() * 8;
        let row = write_v2(exists, floor, &fields, value_bytes, |out, src| match src {
            Source::Old(a, b) => out.extend_from_slice(&self.b[*a..*b]),
            Source::New(v) => put_value(out, v),
        });
        Patched {
            row,
            applied,
            fields: fields.len(),
        }
    }

    /// How many fields the row holds.
    pub(crate) fn field_count(&self) -> usize {
        self.fields.len()
    }
}

/// What [`Parsed::patch`] made.
#[derive(Debug, PartialEq)]
pub(crate) struct Patched {
    /// The new row.
    pub(crate) row: Vec<u8>,
    /// Per write, whether it was applied.
    pub(crate) applied: Vec<bool>,
    /// How many fields the new row holds.
    pub(crate) fields: usize,
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    #[cold]
    #[inline(never)]
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
    #[inline]
    fn varint(&mut self, max_bytes: u32, last_max: u8) -> Result<u64> {
        // Most varints in a row (ids, indexes, short lengths) are one byte.
        if let Some(&b) = self.b.get(self.at) {
            if b < 0x80 {
                self.at += 1;
                return Ok(u64::from(b));
            }
        }
        self.varint_long(max_bytes, last_max)
    }

    #[inline(never)]
    fn varint_long(&mut self, max_bytes: u32, last_max: u8) -> Result<u64> {
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

    /// Moves past a value, checking what `value` checks except a string's UTF-8.
    fn skip_value(&mut self) -> Result<()> {
        match self.u32()? {
            0 => {}
            1 => {
                self.bool()?;
            }
            2 => {
                self.u64()?;
            }
            3 => {
                self.take(8)?;
            }
            4 | 5 => {
                let n = self.len()?;
                self.take(n)?;
            }
            _ => return Err(self.bad("value type")),
        }
        Ok(())
    }

    fn fixed_u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    /// The row's stamp table: a count, then 16 bytes a stamp (left undecoded).
    fn stamp_table(&mut self) -> Result<&'a [u8]> {
        let n = self.len()?;
        if n > (self.b.len() - self.at) / 16 {
            return Err(self.bad("stamp count"));
        }
        self.take(n * 16)
    }

    /// The stamp-table layout up to its fields: the stamp table (left in place, 16 bytes
    /// a stamp, read by [`Reader::stamp_at`]), the existence and the floor.
    #[expect(
        clippy::type_complexity,
        reason = "a private tuple, named where it is taken"
    )]
    fn head_v2(&mut self) -> Result<(&'a [u8], Option<(Stamp, bool)>, Stamp)> {
        let stamps = self.stamp_table()?;
        let exists = match self.byte()? {
            0 => None,
            t @ (1 | 2) => Some((self.stamp_at(stamps)?, t == 2)),
            _ => return Err(self.bad("existence tag")),
        };
        let floor = self.stamp_at(stamps)?;
        Ok((stamps, exists, floor))
    }

    /// A stamp index, and the stamp it names in the row's stamp table.
    fn stamp_at(&mut self, stamps: &[u8]) -> Result<Stamp> {
        let i = self.len()?;
        let b = i
            .checked_mul(16)
            .and_then(|at| stamps.get(at..at.checked_add(16)?))
            .ok_or_else(|| self.bad("stamp index"))?;
        let (time, replica) = b.split_at(8);
        let le = |b: &[u8]| b.try_into().map(u64::from_le_bytes);
        match (le(time), le(replica)) {
            (Ok(time), Ok(replica)) => Ok(Stamp {
                time,
                replica: ReplicaId(replica),
            }),
            _ => Err(self.bad("stamp index")),
        }
    }

    fn state_v2(&mut self) -> Result<ObjectState<u32>> {
        let (stamps, exists, floor) = self.head_v2()?;
        let n = self.len()?;
        // Each field takes at least 3 bytes: never reserve more than the row could hold.
        let mut fields = Vec::with_capacity(n.min((self.b.len() - self.at) / 3));
        for _ in 0..n {
            let f = self.u32()?;
            let s = self.stamp_at(stamps)?;
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
            // Past 16 stamps, a row's stamps are indexed, not scanned.
            proptest::collection::vec((any::<u32>(), stamp(), value()), 0..40),
        )
            .prop_map(|(exists, floor, mut fields)| {
                // As the store keeps them: one per field, by field id.
                fields.sort_by_key(|(f, _, _)| *f);
                fields.dedup_by_key(|(f, _, _)| *f);
                ObjectState {
                    exists,
                    floor,
                    fields,
                }
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

    /// What decoding, applying `writes` one by one and encoding gives.
    fn applied(s: ObjectState<u32>, writes: &[(u32, Stamp, Value)]) -> (Vec<u8>, Vec<bool>) {
        let mut s = s;
        let outcomes = writes
            .iter()
            .map(|(f, st, v)| s.apply_field(*f, *st, v.clone()) == crate::merge::Outcome::Applied)
            .collect();
        (encode(&s), outcomes)
    }

    /// Writes with distinct field ids, some of them the state's own; each at `stamp`, or
    /// (`own_stamp`) at a stamp of the state's, so ties and older writes are tried too.
    fn writes(
        s: &ObjectState<u32>,
        stamp: Stamp,
        picks: Vec<(prop::sample::Index, bool, bool, Value)>,
    ) -> Vec<(u32, Stamp, Value)> {
        let mut out: Vec<(u32, Stamp, Value)> = Vec::new();
        for (i, existing, own_stamp, v) in picks {
            let (id, st) = if existing && !s.fields.is_empty() {
                let (f, st, _) = &s.fields[i.index(s.fields.len())];
                (*f, *st)
            } else {
                (i.index(1 << 16) as u32, s.floor)
            };
            let st = if own_stamp { st } else { stamp };
            if out.iter().all(|(f, _, _)| *f != id) {
                out.push((id, st, v));
            }
        }
        out
    }

    proptest! {
        /// Patching the bytes is byte for byte decoding, applying and encoding; the parsed
        /// row answers `is_live` and `field` as the decoded state does.
        #[test]
        fn a_patch_is_decode_apply_encode(
            s in state(),
            stamp in stamp(),
            picks in proptest::collection::vec((any::<prop::sample::Index>(), any::<bool>(), any::<bool>(), value()), 0..24),
        ) {
            let bytes = encode(&s);
            let parsed = parse(&bytes).expect("parse").expect("stamp-table layout");
            prop_assert_eq!(parsed.is_live(), s.is_live());
            prop_assert_eq!(is_live(&bytes).expect("is_live"), s.is_live());
            prop_assert_eq!(parsed.floor(), s.floor);
            for (f, st, v) in &s.fields {
                let found = parsed.field(*f).expect("field");
                let want = s.field(*f).map(|(st, v)| (st, v.clone()));
                prop_assert_eq!(found, want, "field {} ({:?} {:?})", f, st, v);
            }
            let w = writes(&s, stamp, picks);
            let ids = s.fields.iter().map(|(f, _, _)| *f).chain(w.iter().map(|(f, _, _)| *f));
            for f in ids {
                prop_assert_eq!(parsed.field_stamp(f), s.field(f).map(|(st, _)| st));
            }
            let refs: Vec<(u32, Stamp, &Value)> = w.iter().map(|(f, st, v)| (*f, *st, v)).collect();
            let (row, outcomes) = applied(s, &w);
            let fields = decode(&row).expect("decode").fields.len();
            prop_assert_eq!(parsed.patch(&refs), Patched { row, applied: outcomes, fields });
        }

        /// Damaged rows: wherever decoding succeeds, parsing agrees with it; never a panic.
        #[test]
        fn damaged_rows_patch_as_they_decode(
            s in state(),
            cut in any::<prop::sample::Index>(),
            flip in any::<prop::sample::Index>(),
            bit in 0u8..8,
            stamp in stamp(),
            v in value(),
        ) {
            let mut bytes = encode(&s);
            let i = flip.index(bytes.len());
            bytes[i] ^= 1 << bit;
            let bytes = &bytes[..cut.index(bytes.len() + 1)];
            let parsed = parse(bytes);
            let live = is_live(bytes);
            if let Ok(decoded) = decode(bytes) {
                prop_assert_eq!(live.expect("is_live"), decoded.is_live());
                if let Some(p) = parsed.expect("parse") {
                    let w = vec![(7u32, stamp, v)];
                    let (row, outcomes) = applied(decoded, &w);
                    prop_assert_eq!(p.patch(&[(7, stamp, &w[0].2)]).row, row);
                    prop_assert_eq!(p.patch(&[(7, stamp, &w[0].2)]).applied, outcomes);
                }
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
