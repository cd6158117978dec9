//! Hybrid logical clock and stamps: the total order over every write on every replica.
//!
//! Pure logic: the current time comes in as an argument (see [`TimeSource`]), so tests and
//! the simulation drive the clock without sleeping.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Bits of a hybrid time given to the logical counter; the rest hold milliseconds.
const COUNTER_BITS: u32 = 16;

/// Default bound on how far a remote stamp may run ahead of local physical time.
pub const MAX_DRIFT_MS_DEFAULT: u64 = 5 * 60 * 1000;

/// The id of one replica (one store taking part in sync). Random, persisted in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReplicaId(pub u64);

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// When a write happened: hybrid logical time, then replica id as the tie-break. Ordered
/// first by time, then by replica, so every replica picks the same winner and never looks
/// at the value to do so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Stamp {
    /// Milliseconds since the Unix epoch in the high 48 bits, a logical counter in the low 16.
    pub time: u64,
    /// The replica that made the write.
    pub replica: ReplicaId,
}

impl Stamp {
    /// The lowest possible stamp; below every real write.
    pub const ZERO: Stamp = Stamp {
        time: 0,
        replica: ReplicaId(0),
    };

    /// The physical part of the stamp, in milliseconds since the Unix epoch.
    pub fn physical_ms(&self) -> u64 {
        self.time >> COUNTER_BITS
    }

    /// The bytes the digest hashes for this stamp.
    pub(crate) fn digest_bytes_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.time.to_le_bytes());
        out.extend_from_slice(&self.replica.0.to_le_bytes());
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}@{}",
            self.physical_ms(),
            self.time & ((1 << COUNTER_BITS) - 1),
            self.replica
        )
    }
}

/// A remote stamp was further ahead of local time than the bound allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriftExceeded {
    /// The offending stamp.
    pub stamp: Stamp,
    /// Local physical time when it was seen.
    pub now_ms: u64,
}

/// A hybrid logical clock. Issues strictly increasing times even when the wall clock goes
/// back, and advances past every time it observes.
#[derive(Clone, Debug)]
pub struct Hlc {
    last: u64,
    max_drift_ms: u64,
}

impl Hlc {
    /// A clock that will never issue a time at or below `high_water` (the last persisted time).
    pub fn new(high_water: u64, max_drift_ms: u64) -> Self {
        Hlc {
            last: high_water,
            max_drift_ms,
        }
    }

    /// The highest time issued or observed so far.
    pub fn high_water(&self) -> u64 {
        self.last
    }

    /// The next time, strictly above everything issued or observed.
    pub fn tick(&mut self, now_ms: u64) -> u64 {
        let physical = now_ms.saturating_mul(1 << COUNTER_BITS);
        self.last = physical.max(self.last.saturating_add(1));
        self.last
    }

    /// Checks a remote stamp against the drift bound; does not advance the clock.
    pub fn check(&self, stamp: Stamp, now_ms: u64) -> Result<(), DriftExceeded> {
        if stamp.physical_ms() > now_ms.saturating_add(self.max_drift_ms) {
            Err(DriftExceeded { stamp, now_ms })
        } else {
            Ok(())
        }
    }

    /// Advances the clock past a remote time that passed [`Hlc::check`].
    pub fn observe(&mut self, time: u64) {
        self.last = self.last.max(time);
    }
}

/// Where the store reads physical time. The one seam through which time enters the engine.
pub trait TimeSource: Send + Sync + fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemTimeSource;

impl TimeSource for SystemTimeSource {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that moves only when told to: for tests and the deterministic simulation.
#[derive(Debug, Default, Clone)]
pub struct ManualTimeSource(Arc<AtomicU64>);

impl ManualTimeSource {
    /// A manual clock reading `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        ManualTimeSource(Arc::new(AtomicU64::new(now_ms)))
    }
    /// Sets the time (it may go backwards, as wall clocks do).
    pub fn set(&self, now_ms: u64) {
        self.0.store(now_ms, AtomicOrdering::SeqCst);
    }
    /// Moves the time forward.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, AtomicOrdering::SeqCst);
    }
}

impl TimeSource for ManualTimeSource {
    fn now_ms(&self) -> u64 {
        self.0.load(AtomicOrdering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_rise_when_wall_clock_goes_back() {
        let mut c = Hlc::new(0, MAX_DRIFT_MS_DEFAULT);
        let a = c.tick(1_000);
        let b = c.tick(500);
        let d = c.tick(500);
        assert!(a < b && b < d);
    }

    #[test]
    fn restarts_above_high_water() {
        let mut c = Hlc::new(0, MAX_DRIFT_MS_DEFAULT);
        let a = c.tick(2_000);
        let mut c2 = Hlc::new(c.high_water(), MAX_DRIFT_MS_DEFAULT);
        assert!(c2.tick(1_000) > a);
    }

    #[test]
    fn far_future_stamps_are_refused() {
        let c = Hlc::new(0, 1_000);
        let ahead = Stamp {
            time: 5_000 << COUNTER_BITS,
            replica: ReplicaId(1),
        };
        assert!(c.check(ahead, 3_000).is_err());
        assert!(c.check(ahead, 4_000).is_ok());
    }

    #[test]
    fn observe_moves_past_remote() {
        let mut c = Hlc::new(0, MAX_DRIFT_MS_DEFAULT);
        c.observe(10_000 << COUNTER_BITS);
        assert!(c.tick(1) > 10_000 << COUNTER_BITS);
    }
}
