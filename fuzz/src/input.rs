//! A reader that turns fuzzer bytes into structured choices. Every read succeeds: past the
//! end it yields zeros, so any byte string is a valid input and a shorter one is a simpler
//! case (what libFuzzer's minimiser wants).

use fieldlog::{Pk, Stamp, Value};

/// Fuzzer bytes, consumed from the front.
#[derive(Clone, Debug)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether every byte was consumed.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The bytes not consumed yet.
    pub fn rest(&self) -> &'a [u8] {
        self.data
    }

    /// One byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// Two bytes, little-endian.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    /// Four bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    /// Eight bytes, little-endian.
    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// A flag.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// True about once in `n` reads (`n` ≥ 1).
    pub fn one_in(&mut self, n: u8) -> bool {
        self.u8().is_multiple_of(n.max(1))
    }

    /// A number in `0..n` (`n` ≥ 1; 0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        if n <= 256 {
            usize::from(self.u8()) % n
        } else {
            usize::from(self.u16()) % n
        }
    }

    /// One of `items` (which must not be empty).
    pub fn choose<'t, T>(&mut self, items: &'t [T]) -> &'t T {
        &items[self.below(items.len())]
    }

    /// Up to `max` raw bytes (the length comes first).
    pub fn bytes(&mut self, max: usize) -> &'a [u8] {
        let want = self.below(max.saturating_add(1));
        let n = want.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// Exactly `n` bytes, or all that are left.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// Up to `max` bytes as text (invalid UTF-8 replaced).
    pub fn text(&mut self, max: usize) -> String {
        String::from_utf8_lossy(self.bytes(max)).into_owned()
    }

    /// A short string from a small alphabet that has the characters escaping cares about.
    pub fn short_string(&mut self, max: usize) -> String {
        const CHARS: [char; 16] = [
            'a', 'b', 'z', 'A', '0', ' ', '"', '\'', '\\', '\n', '\u{0}', 'é', '字', '🦀', '.', '_',
        ];
        let n = self.below(max + 1);
        (0..n).map(|_| *self.choose(&CHARS)).collect()
    }

    /// A float, often one of the awkward ones.
    pub fn float(&mut self) -> f64 {
        const SPECIAL: [f64; 8] = [
            0.0,
            -0.0,
            1.0,
            -1.5,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            9_007_199_254_740_993.0,
        ];
        if self.bool() {
            *self.choose(&SPECIAL)
        } else {
            f64::from_bits(self.u64())
        }
    }

    /// An int, often a small or extreme one.
    pub fn int(&mut self) -> i64 {
        match self.u8() % 4 {
            0 => i64::from(self.u8() % 8),
            1 => *self.choose(&[i64::MIN, i64::MAX, -1, 1 << 53]),
            2 => i64::from(self.u8() as i8),
            _ => self.u64() as i64,
        }
    }

    /// A value of any type.
    pub fn value(&mut self) -> Value {
        match self.u8() % 8 {
            0 => Value::Null,
            1 => Value::Bool(self.bool()),
            2 | 3 => Value::Int(self.int()),
            4 => Value::Float(self.float()),
            5 | 6 => Value::String(self.short_string(12)),
            _ => Value::Bytes(self.bytes(16).to_vec()),
        }
    }

    /// A primary key: mostly a few small ints or strings (so keys collide), sometimes an id
    /// or an invalid (empty or over-long) string.
    pub fn pk(&mut self) -> Pk {
        match self.u8() % 16 {
            0..=8 => Pk::Int(i64::from(self.u8() % 6)),
            9..=11 => Pk::Str(["a", "b", "k-1"][self.below(3)].to_owned()),
            12 => {
                let mut id = [0u8; 12];
                id[0] = self.u8() % 3;
                Pk::Id12(id)
            }
            13 => {
                let mut id = [0u8; 16];
                id[15] = self.u8() % 3;
                Pk::Id16(id)
            }
            14 => Pk::Int(self.int()),
            _ => Pk::Str(if self.bool() {
                String::new()
            } else {
                "x".repeat(257)
            }),
        }
    }

    /// A stamp near `now` (hybrid time: milliseconds in the high 48 bits) by `replica`.
    pub fn stamp_near(&mut self, now_ms: u64, replica: fieldlog::ReplicaId) -> Stamp {
        let time = match self.u8() % 8 {
            0 => self.u64(),
            1 => (now_ms + 3_600_000) << 16,
            2 => 0,
            _ => ((now_ms.saturating_sub(u64::from(self.u8() % 4))) << 16) + u64::from(self.u8()),
        };
        Stamp { time, replica }
    }
}
