//! The database's format: its tables, the `meta` keys, the format version, and the
//! codecs for rows and meta values.

use redb::{ReadableTable, TableDefinition};
use serde::Serialize;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::log::LogPos;
use crate::merge::ObjectState;
use crate::value::Pk;

/// (collection id, encoded pk) → postcard `ObjectState<u32>`.
pub(super) const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
/// log position → postcard `LogEntry<u32>`.
pub(super) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Where `compact` rebuilds the two big tables before they take the old ones' names.
pub(super) const OBJECTS_REPACK: TableDefinition<&[u8], &[u8]> =
    TableDefinition::new("objects_repack");
pub(super) const LOG_REPACK: TableDefinition<u64, &[u8]> = TableDefinition::new("log_repack");
/// name id → name (collections and fields share one id space).
pub(super) const NAMES: TableDefinition<u32, &str> = TableDefinition::new("names");
/// Small named values; see the `meta` keys below.
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

pub(super) const META_FORMAT: &str = "format";
pub(super) const META_REPLICA: &str = "replica_id";
pub(super) const META_HLC: &str = "hlc";
pub(super) const META_DIGEST: &str = "digest";
pub(super) const META_LOG_NEXT: &str = "log_next";
pub(super) const META_LAST_SYNC: &str = "last_sync";
pub(super) const META_SCHEMA_PREFIX: &str = "schema/";
pub(super) const META_COUNT_PREFIX: &str = "count/";
pub(super) const META_RESET: &str = "reset";
pub(super) const META_WAL_SEQ: &str = "wal_seq";
/// What every commit moves (see [`Head`]); before format 5, the four rows above.
pub(super) const META_HEAD: &str = "head";
/// During a reset: the server's state being downloaded, in the `objects` format.
pub(super) const STAGING: TableDefinition<&[u8], &[u8]> = TableDefinition::new("reset_staging");
/// During a reset: digest and counts of the staged state.
pub(super) const STAGING_META: TableDefinition<&str, &[u8]> =
    TableDefinition::new("reset_staging_meta");
/// After a reset's swap: the state it replaced, until it is dropped in a transaction of its
/// own (or, after a crash, on open). redb reads every page of a table to free it, which
/// would otherwise be a large part of the swap.
pub(super) const REPLACED: TableDefinition<&[u8], &[u8]> = TableDefinition::new("reset_replaced");
/// The write-ahead file grows by this much at a time.
pub(super) const WAL_GROWTH: u64 = 1 << 20;

/// 2: the digest sums per-field terms. 3: commits may sit in the write-ahead file (a build
/// that reads 2 would not replay them). 4: its records may hold patches (a build that reads
/// 3 would take one for a torn record and lose it). 5: the log position, clock, record
/// number and digest are one `head` row (a build that reads 4 would read stale rows). 6: a
/// record's log entry may carry its local updates' patches (a build that reads 5 would
/// take such a record for a torn one and lose it). 7: records may hold other modules' rows
/// (`Aux`). 8: those rows may have `(u64, u64)` keys, and the server's own writes, refusals
/// and conflict records are recorded (a build that reads 7 would take such a record for a
/// torn one).
pub(super) const FORMAT_VERSION: u64 = 8;
/// Older formats this build opens (and upgrades).
pub(super) const FORMAT_UPGRADES: [u64; 6] = [2, 3, 4, 5, 6, 7];

/// The meta row every commit writes: the next log position, the clock's high-water mark,
/// the number of the last write-ahead record in the database, and the state digest. One
/// row, so a one-update commit inserts one meta row, not four.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Head {
    pub(super) log_next: LogPos,
    pub(super) hlc: u64,
    pub(super) wal_seq: u64,
    pub(super) digest: Digest,
}

impl Head {
    pub(super) const BYTES: usize = 24 + 32;

    pub(super) fn encode(&self) -> [u8; Head::BYTES] {
        let mut out = [0u8; Head::BYTES];
        out[..8].copy_from_slice(&self.log_next.to_le_bytes());
        out[8..16].copy_from_slice(&self.hlc.to_le_bytes());
        out[16..24].copy_from_slice(&self.wal_seq.to_le_bytes());
        out[24..].copy_from_slice(&self.digest.0);
        out
    }

    pub(super) fn decode(b: &[u8]) -> Result<Head> {
        if b.len() != Head::BYTES {
            return Err(corrupt(format!("meta head of {} bytes", b.len())));
        }
        Ok(Head {
            log_next: u64_of(&b[..8], META_HEAD)?,
            hlc: u64_of(&b[8..16], META_HEAD)?,
            wal_seq: u64_of(&b[16..24], META_HEAD)?,
            digest: digest_of(&b[24..], META_HEAD)?,
        })
    }

    /// The head row, or in a store from before format 5 the four rows it replaced.
    pub(super) fn read(meta: &impl ReadableTable<&'static str, &'static [u8]>) -> Result<Head> {
        if let Some(v) = meta.get(META_HEAD)? {
            return Head::decode(v.value());
        }
        Ok(Head {
            log_next: meta_u64(meta, META_LOG_NEXT, 1)?,
            hlc: meta_u64(meta, META_HLC, 0)?,
            wal_seq: meta_u64(meta, META_WAL_SEQ, 0)?,
            digest: meta_digest(meta, META_DIGEST)?,
        })
    }
}

pub(super) fn corrupt(what: impl Into<String>) -> Error {
    Error::Corrupt { what: what.into() }
}

/// An internal invariant that did not hold (a bug, not bad bytes on disk).
pub(super) fn internal(what: impl Into<String>) -> Error {
    Error::Internal { what: what.into() }
}

pub(super) fn u64_of(bytes: &[u8], what: &str) -> Result<u64> {
    let b: [u8; 8] = bytes
        .try_into()
        .map_err(|_| corrupt(format!("meta {what}: {} bytes", bytes.len())))?;
    Ok(u64::from_le_bytes(b))
}

pub(super) fn digest_of(bytes: &[u8], what: &str) -> Result<Digest> {
    bytes
        .try_into()
        .map(Digest)
        .map_err(|_| corrupt(format!("meta {what}: {} bytes", bytes.len())))
}

/// A meta row's number, or `default` if the row is absent.
pub(super) fn meta_u64(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
    default: u64,
) -> Result<u64> {
    match meta.get(key)? {
        Some(v) => u64_of(v.value(), key),
        None => Ok(default),
    }
}

/// A meta row's digest, or the empty one if the row is absent.
pub(super) fn meta_digest(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Digest> {
    match meta.get(key)? {
        Some(v) => digest_of(v.value(), key),
        None => Ok(Digest::default()),
    }
}

pub(super) fn object_key(coll: u32, pk: &Pk) -> Vec<u8> {
    let mut k = Vec::with_capacity(24);
    k.extend_from_slice(&coll.to_be_bytes());
    pk.encode_into(&mut k);
    k
}

pub(super) fn decode_state(bytes: &[u8]) -> Result<ObjectState<u32>> {
    crate::row::decode(bytes)
}

pub(super) fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    encode_into(v, Vec::new())
}

/// [`encode`] into `buf` (sized beforehand, where the caller knows about how large).
pub(super) fn encode_into<T: Serialize>(v: &T, buf: Vec<u8>) -> Result<Vec<u8>> {
    postcard::to_extend(v, buf).map_err(|e| internal(format!("encode: {e}")))
}

/// An object row (see `row.rs`).
pub(super) fn encode_state(state: &ObjectState<u32>) -> Result<Vec<u8>> {
    Ok(crate::row::encode(state))
}
