//! The write-ahead file: how a small durable commit costs one append and one fsync instead
//! of a redb commit (which writes every page it dirtied, ~27 writes for one field).
//!
//! A local transaction writes into redb's open write transaction (a *batch*, committed
//! without durability when a reader needs it or it fills up; see `Batch` in `store.rs`)
//! and appends a *record* to the write-ahead file: the rows it put into the
//! store's tables (a physical redo), except that an update of a live object records only
//! the fields it set (a patch, replayed onto the row the record was made against; for a
//! local update, the fields are read from the transaction's log entry, which the record
//! holds anyway). Syncing the file makes the record, and so the commit, durable; one sync
//! covers every record appended before it (group commit). A durable redb
//! commit (a *checkpoint*) makes every earlier commit durable in the database itself, after
//! which the file is written again from its start.
//!
//! Every record has a sequence number, and the transaction that made it stores that number
//! in the database (`meta/wal_seq`). On open, the records after the database's number are
//! put back, in order, while they continue it: the first record that is torn (length or
//! checksum), from another store (replica id), or out of sequence (a stale record from
//! before the last checkpoint) ends the replay. Only a record whose sync never finished can
//! be torn, and no commit after it was acknowledged.

use redb::{TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};

use crate::clock::Stamp;
use crate::error::{Error, Result};
use crate::value::Value;

/// One row a transaction put into (or took out of) a store table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Redo {
    /// `objects`: the key and the new row, or `None` for a removed row.
    Object(
        #[serde(with = "serde_bytes")] Vec<u8>,
        #[serde(with = "serde_bytes")] Option<Vec<u8>>,
    ),
    /// `log`: an entry at a position.
    Log(u64, #[serde(with = "serde_bytes")] Vec<u8>),
    /// `names`: a new interned name.
    Name(u32, String),
    /// `meta`: a key and its new value.
    Meta(String, #[serde(with = "serde_bytes")] Vec<u8>),
    /// `objects`: fields (by name id) set on a live object at one stamp, by a local update
    /// or merged from remote ones (one patch per stamp). A tenth of the row for a one-field
    /// update of a ten-field object; replay applies them to the row as the record's
    /// predecessor left it, which gives the same row (the merge is order-free).
    Patch(
        #[serde(with = "serde_bytes")] Vec<u8>,
        Stamp,
        Vec<(u32, Value)>,
    ),
    /// `log`: an entry at a position, and the indexes of its writes that are local updates
    /// of live objects, each replayed as a `Patch` of its fields at the entry's stamp. A
    /// local update's values are in the record once (in the entry), not twice: records of
    /// update batches are about half the size, so half as many checkpoints.
    LogPatches(u64, #[serde(with = "serde_bytes")] Vec<u8>, Vec<u32>),
    /// A row of a table another module keeps in the store's database (the sync server's
    /// history and client records, the sync client's download cursor): with it, an upload
    /// or a download is a record too, not a durable redb commit.
    Aux(Aux),
}

/// A row of another module's table: the table's name (`sync_`…), the key, the value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Aux {
    /// A table of `u64` keys and byte values.
    U64Bytes(String, u64, #[serde(with = "serde_bytes")] Vec<u8>),
    /// A table of string keys and `u64` values.
    StrU64(String, String, u64),
    /// A table of `(u64, u64)` keys and byte values (format 8).
    U64PairBytes(String, u64, u64, #[serde(with = "serde_bytes")] Vec<u8>),
}

impl Aux {
    pub(crate) fn u64_bytes(table: TableDefinition<u64, &[u8]>, key: u64, value: Vec<u8>) -> Aux {
        Aux::U64Bytes(table.name().to_owned(), key, value)
    }

    pub(crate) fn str_u64(table: TableDefinition<&str, u64>, key: &str, value: u64) -> Aux {
        Aux::StrU64(table.name().to_owned(), key.to_owned(), value)
    }

    pub(crate) fn u64_pair_bytes(
        table: TableDefinition<(u64, u64), &[u8]>,
        key: (u64, u64),
        value: Vec<u8>,
    ) -> Aux {
        Aux::U64PairBytes(table.name().to_owned(), key.0, key.1, value)
    }

    fn table(&self) -> &str {
        match self {
            Aux::U64Bytes(t, ..) | Aux::StrU64(t, ..) | Aux::U64PairBytes(t, ..) => t,
        }
    }

    /// Its size in a record, near enough.
    pub(crate) fn bytes(&self) -> u64 {
        match self {
            Aux::U64Bytes(t, _, v) => (t.len() + 10 + v.len()) as u64,
            Aux::StrU64(t, k, _) => (t.len() + k.len() + 10) as u64,
            Aux::U64PairBytes(t, _, _, v) => (t.len() + 20 + v.len()) as u64,
        }
    }

    /// Puts rows into their tables, opening each table once for a run of rows to it. Only
    /// the other modules' tables (`sync_`…) take rows this way: a record naming one of the
    /// store's own is refused.
    pub(crate) fn apply_all(rows: &[Aux], txn: &redb::WriteTransaction) -> Result<()> {
        for run in rows.chunk_by(|a, b| {
            std::mem::discriminant(a) == std::mem::discriminant(b) && a.table() == b.table()
        }) {
            let name = run[0].table();
            if !name.starts_with("sync_") {
                return Err(Error::Corrupt {
                    what: format!("write-ahead row for table {name:?}"),
                });
            }
            match &run[0] {
                Aux::U64Bytes(..) => {
                    let mut t = txn.open_table(TableDefinition::<u64, &[u8]>::new(name))?;
                    for row in run {
                        if let Aux::U64Bytes(_, k, v) = row {
                            t.insert(*k, v.as_slice())?;
                        }
                    }
                }
                Aux::StrU64(..) => {
                    let mut t = txn.open_table(TableDefinition::<&str, u64>::new(name))?;
                    for row in run {
                        if let Aux::StrU64(_, k, v) = row {
                            t.insert(k.as_str(), *v)?;
                        }
                    }
                }
                Aux::U64PairBytes(..) => {
                    let mut t = txn.open_table(TableDefinition::<(u64, u64), &[u8]>::new(name))?;
                    for row in run {
                        if let Aux::U64PairBytes(_, a, b, v) = row {
                            t.insert((*a, *b), v.as_slice())?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// One transaction's rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The store it belongs to (a write-ahead file left beside a different store is not
    /// replayed into it).
    pub replica: u64,
    /// Its number: one more than the record before it.
    pub seq: u64,
    pub rows: Vec<Redo>,
}

/// Length (4 bytes) and checksum (16 bytes) before the body.
const HEADER: usize = 20;

/// No record is larger than this; a longer length field is a torn header.
pub(crate) const RECORD_BYTES_MAX: u64 = 64 << 20;

fn checksum(body: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(body).as_bytes()[..16]);
    out
}

/// The record as it goes into the file.
pub(crate) fn encode(record: &Record) -> Result<Vec<u8>> {
    let corrupt = |what: String| Error::Corrupt { what };
    let guess = 32
        + record
            .rows
            .iter()
            .map(|r| match r {
                Redo::Object(k, v) => 16 + k.len() + v.as_ref().map_or(0, Vec::len),
                Redo::Log(_, e) => 16 + e.len(),
                Redo::LogPatches(_, e, at) => 16 + e.len() + 4 * at.len(),
                Redo::Name(_, n) => 16 + n.len(),
                Redo::Meta(k, v) => 16 + k.len() + v.len(),
                Redo::Patch(k, _, fields) => 32 + k.len() + fields.len() * 112,
                Redo::Aux(a) => 8 + a.bytes() as usize,
            })
            .sum::<usize>();
    // The body goes straight after room for the header, which is filled in last.
    let mut out = Vec::with_capacity(HEADER + guess);
    out.resize(HEADER, 0);
    let mut out = postcard::to_extend(record, out)
        .map_err(|e| corrupt(format!("write-ahead record: {e}")))?;
    let body_len = out.len() - HEADER;
    let len = u32::try_from(body_len)
        .ok()
        .filter(|&l| u64::from(l) <= RECORD_BYTES_MAX)
        .ok_or_else(|| corrupt(format!("write-ahead record of {body_len} bytes")))?;
    let sum = checksum(&out[HEADER..]);
    out[..4].copy_from_slice(&len.to_le_bytes());
    out[4..HEADER].copy_from_slice(&sum);
    Ok(out)
}

/// Records appended but not yet written to the file. Committing transactions append here
/// under the writer lock; whoever syncs the file next writes them all in one call outside
/// it, then syncs: the writer lock is not held across a system call, and eight concurrent
/// commits cost one write and one sync, not eight writes.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    /// Where `bytes` go in the file.
    at: u64,
    bytes: Vec<u8>,
    /// The number of the last record appended, written or not.
    seq: u64,
}

impl Tail {
    /// An empty tail after record number `seq`.
    pub(crate) fn new(seq: u64) -> Tail {
        Tail {
            seq,
            ..Tail::default()
        }
    }

    /// Appends record number `seq`, which goes at offset `at`: right after the one before
    /// it, or anywhere when the tail is empty (the file restarts after a checkpoint, which
    /// discards the tail).
    pub(crate) fn push(&mut self, at: u64, record: Vec<u8>, seq: u64) {
        if self.bytes.is_empty() {
            // Taken, not copied: a large record is often alone.
            self.at = at;
            self.bytes = record;
        } else {
            debug_assert_eq!(
                self.at + self.bytes.len() as u64,
                at,
                "records out of place"
            );
            self.bytes.extend_from_slice(&record);
        }
        self.seq = seq;
    }

    /// The number of the last record appended.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// What is left to write, where it goes, and the number of the last record it holds
    /// (every record up to it is then written).
    pub(crate) fn take(&mut self) -> (u64, Vec<u8>, u64) {
        (self.at, std::mem::take(&mut self.bytes), self.seq)
    }

    /// Forgets the unwritten records: a checkpoint has made them durable in the database.
    pub(crate) fn discard(&mut self) {
        self.bytes.clear();
    }
}

/// The records of `file` that continue a database whose last record was `after`: records
/// at or below `after` are skipped, then each must be the next number; the first torn,
/// foreign or out-of-sequence record ends the list. Never fails: whatever cannot be read is
/// a tail that was never acknowledged.
pub(crate) fn replayable(file: &[u8], replica: u64, after: u64) -> Vec<Record> {
    let mut out = Vec::new();
    let mut expected = after + 1;
    let mut at = 0usize;
    while let Some(header) = file.get(at..at + HEADER) {
        let mut len = [0u8; 4];
        len.copy_from_slice(&header[..4]);
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len as u64 > RECORD_BYTES_MAX {
            break;
        }
        let Some(body) = file.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if header[4..] != checksum(body) {
            break;
        }
        let Ok(record) = postcard::from_bytes::<Record>(body) else {
            break;
        };
        if record.replica != replica {
            break;
        }
        if record.seq == expected {
            expected += 1;
            out.push(record);
        } else if record.seq > after || !out.is_empty() {
            break;
        }
        at += HEADER + len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64) -> Record {
        Record {
            replica: 7,
            seq,
            rows: vec![
                Redo::Object(vec![1, 2, seq as u8], Some(vec![9; 40])),
                Redo::Object(vec![3], None),
                Redo::Log(seq, vec![5; 10]),
                Redo::Name(3, "field".into()),
                Redo::Meta("wal_seq".into(), seq.to_le_bytes().to_vec()),
                Redo::Patch(
                    vec![1, 2, 3],
                    Stamp {
                        time: seq << 16,
                        replica: crate::clock::ReplicaId(7),
                    },
                    vec![(2, Value::from("patched")), (5, Value::Int(-1))],
                ),
            ],
        }
    }

    fn file(seqs: &[u64]) -> Vec<u8> {
        seqs.iter()
            .flat_map(|&s| encode(&rec(s)).expect("encode"))
            .collect()
    }

    fn seqs(records: &[Record]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn records_round_trip_in_order() {
        let f = file(&[1, 2, 3]);
        let got = replayable(&f, 7, 0);
        assert_eq!(got, vec![rec(1), rec(2), rec(3)]);
        assert_eq!(seqs(&replayable(&f, 7, 2)), vec![3]);
        assert!(replayable(&f, 7, 3).is_empty());
    }

    #[test]
    fn a_torn_tail_ends_the_replay_at_every_cut() {
        let f = file(&[1, 2, 3]);
        let one = encode(&rec(1)).expect("encode").len();
        for cut in 0..f.len() {
            let got = seqs(&replayable(&f[..cut], 7, 0));
            let whole = (0..=3).filter(|&n| n * one <= cut).count() as u64 - 1;
            assert_eq!(got, (1..=whole).collect::<Vec<_>>(), "cut at {cut}");
        }
    }

    #[test]
    fn a_flipped_bit_ends_the_replay_before_that_record() {
        let f = file(&[1, 2, 3]);
        let one = encode(&rec(1)).expect("encode").len();
        for byte in 0..f.len() {
            let mut g = f.clone();
            g[byte] ^= 0x10;
            let got = seqs(&replayable(&g, 7, 0));
            let damaged = (byte / one) as u64 + 1;
            assert_eq!(got, (1..damaged).collect::<Vec<_>>(), "flip at {byte}");
        }
    }

    #[test]
    fn stale_records_after_a_checkpoint_are_not_replayed() {
        // Written again from the start after checkpoint 3: 4, 5, then what is left of the
        // previous round (2, 3).
        let mut f = file(&[4, 5]);
        f.extend(file(&[2, 3]));
        assert_eq!(seqs(&replayable(&f, 7, 3)), vec![4, 5]);
        // Checkpointed through 5 before the crash: nothing to replay.
        assert!(replayable(&f, 7, 5).is_empty());
        // A gap (the database is older than the file continues) replays nothing.
        assert!(replayable(&file(&[6, 7]), 7, 3).is_empty());
    }

    #[test]
    fn another_stores_records_are_not_replayed() {
        let f = file(&[1, 2]);
        assert!(replayable(&f, 8, 0).is_empty());
    }

    #[test]
    fn zeros_and_garbage_are_an_empty_file() {
        assert!(replayable(&[0u8; 4096], 7, 0).is_empty());
        let noise: Vec<u8> = (0..5000u32)
            .map(|i| i.wrapping_mul(2_654_435_761) as u8)
            .collect();
        assert!(replayable(&noise, 7, 0).is_empty());
    }

    #[test]
    fn the_tail_writes_whole_records_in_file_order_and_a_zero_length_ends_the_replay() {
        let (one, two, three) = (
            encode(&rec(1)).expect("encode"),
            encode(&rec(2)).expect("encode"),
            encode(&rec(3)).expect("encode"),
        );
        let mut file = Vec::new();
        let mut tail = Tail::new(0);
        let at_two = one.len() as u64;
        tail.push(0, one, 1);
        tail.push(at_two, two, 2);
        let (at, bytes, seq) = tail.take();
        assert_eq!((at, seq), (0, 2));
        file.extend(bytes);
        let at_three = file.len() as u64;
        tail.push(at_three, three, 3);
        assert_eq!(tail.seq(), 3);
        let (at, bytes, seq) = tail.take();
        assert_eq!((at, seq), (at_three, 3));
        file.extend(bytes);
        assert_eq!(seqs(&replayable(&file, 7, 0)), vec![1, 2, 3]);
        // A zero length (the file grown ahead of the records) ends the replay.
        let mut grown = file.clone();
        grown[at_three as usize..at_three as usize + 4].fill(0);
        assert_eq!(seqs(&replayable(&grown, 7, 0)), vec![1, 2]);
        // After a checkpoint the file starts again; what was never written is dropped.
        tail.push(file.len() as u64, encode(&rec(4)).expect("encode"), 4);
        tail.discard();
        let (_, bytes, seq) = tail.take();
        assert!(bytes.is_empty());
        assert_eq!(seq, 4);
        tail.push(0, encode(&rec(5)).expect("encode"), 5);
        assert_eq!(tail.take().0, 0);
    }
}
