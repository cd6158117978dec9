//! The server's byte budgets, connection slots and counters: what [`Limits`] bounds, kept
//! where every connection of one server shares it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::ReadBudget;
use crate::sync::server::Limits;

/// What a server's transport holds and has refused, as counted by the server itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Connections open now.
    pub connections_open: u64,
    /// Connections refused at accept because `connections_max` were open.
    pub connections_refused: u64,
    /// Bytes of frames read and not yet handled, over all connections, now.
    pub frame_bytes_buffered: u64,
    /// The most `frame_bytes_buffered` has been.
    pub frame_bytes_buffered_peak: u64,
    /// The part of `frame_bytes_buffered` beyond the connections' own allowances (what
    /// `server_buffer_bytes_max` bounds), now.
    pub shared_bytes_buffered: u64,
    /// The most `shared_bytes_buffered` has been.
    pub shared_bytes_buffered_peak: u64,
    /// Times a connection had to wait for room in the server's buffer budget before
    /// reading on.
    pub buffer_waits: u64,
    /// Bytes of unfinished upload transactions held, over all connections, now.
    pub transaction_bytes_buffered: u64,
    /// The most `transaction_bytes_buffered` has been.
    pub transaction_bytes_buffered_peak: u64,
    /// Uploads refused with `Busy` because `server_transaction_bytes_max` was reached.
    pub transactions_refused: u64,
    /// Connections closed because no `Hello` came within `handshake_timeout_ms`.
    pub handshake_timeouts: u64,
    /// Sessions closed because no message came within `idle_timeout_ms`.
    pub idle_timeouts: u64,
    /// Sessions closed because a reply could not be written within `idle_timeout_ms`.
    pub write_timeouts: u64,
    /// Sessions ended because their token expired.
    pub tokens_expired: u64,
}

/// Counters behind [`ServerStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connections_refused: AtomicU64,
    pub frame_bytes: AtomicU64,
    pub frame_bytes_peak: AtomicU64,
    pub shared_bytes: AtomicU64,
    pub shared_bytes_peak: AtomicU64,
    pub buffer_waits: AtomicU64,
    pub transaction_bytes: AtomicU64,
    pub transaction_bytes_peak: AtomicU64,
    pub transactions_refused: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub idle_timeouts: AtomicU64,
    pub write_timeouts: AtomicU64,
    pub tokens_expired: AtomicU64,
}

/// Adds `n` to a gauge and raises its peak.
fn raise(gauge: &AtomicU64, peak: &AtomicU64, n: usize) {
    let now = gauge.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
    peak.fetch_max(now, Ordering::SeqCst);
}

fn lower(gauge: &AtomicU64, n: usize) {
    gauge.fetch_sub(n as u64, Ordering::SeqCst);
}

/// Tokio's semaphores count at most this many permits.
fn permits(n: usize) -> usize {
    n.min(Semaphore::MAX_PERMITS)
}

/// One server's shared budgets: connection slots, frame bytes, transaction bytes.
#[derive(Debug)]
pub(crate) struct Budgets {
    pub limits: Limits,
    slots: Arc<Semaphore>,
    /// Frame bytes beyond the connections' allowances (`server_buffer_bytes_max`).
    shared: Semaphore,
    pub counters: Counters,
    /// Refusals at accept, logged at most once per [`LOG_EVERY`].
    pub refusal_log: Throttled,
    /// Failures of accept itself (out of file descriptors, say), likewise.
    pub accept_log: Throttled,
    /// Uploads refused at `server_transaction_bytes_max`, likewise.
    pub busy_log: Throttled,
}

/// The shortest time between two log lines about the same repeated event.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);

impl Budgets {
    pub fn new(limits: Limits) -> Arc<Budgets> {
        Arc::new(Budgets {
            slots: Arc::new(Semaphore::new(permits(limits.connections_max))),
            shared: Semaphore::new(permits(limits.server_buffer_bytes_max)),
            limits,
            counters: Counters::default(),
            refusal_log: Throttled::new(LOG_EVERY),
            accept_log: Throttled::new(LOG_EVERY),
            busy_log: Throttled::new(LOG_EVERY),
        })
    }

    /// A connection slot, if fewer than `connections_max` are taken; the connection holds
    /// it until it ends.
    pub fn slot(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.slots).try_acquire_owned().ok()
    }

    pub fn stats(&self) -> ServerStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let open = permits(self.limits.connections_max) - self.slots.available_permits();
        ServerStats {
            connections_open: open as u64,
            connections_refused: get(&c.connections_refused),
            frame_bytes_buffered: get(&c.frame_bytes),
            frame_bytes_buffered_peak: get(&c.frame_bytes_peak),
            shared_bytes_buffered: get(&c.shared_bytes),
            shared_bytes_buffered_peak: get(&c.shared_bytes_peak),
            buffer_waits: get(&c.buffer_waits),
            transaction_bytes_buffered: get(&c.transaction_bytes),
            transaction_bytes_buffered_peak: get(&c.transaction_bytes_peak),
            transactions_refused: get(&c.transactions_refused),
            handshake_timeouts: get(&c.handshake_timeouts),
            idle_timeouts: get(&c.idle_timeouts),
            write_timeouts: get(&c.write_timeouts),
            tokens_expired: get(&c.tokens_expired),
        }
    }
}

/// A repeated event logged at most once per period, with the count of those not logged.
#[derive(Debug)]
pub(crate) struct Throttled {
    every: Duration,
    last: Mutex<Option<Instant>>,
    unlogged: AtomicU64,
}

impl Throttled {
    pub fn new(every: Duration) -> Self {
        Throttled {
            every,
            last: Mutex::new(None),
            unlogged: AtomicU64::new(0),
        }
    }

    /// Counts one event; returns `Some(events since the last line)` when this one is to be
    /// logged.
    pub fn hit(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.unlogged.fetch_add(1, Ordering::SeqCst);
            return None;
        }
        *last = Some(now);
        Some(self.unlogged.swap(0, Ordering::SeqCst) + 1)
    }
}

/// One connection's frame bytes read and not yet handled.
#[derive(Debug)]
pub(crate) struct ConnBuffer {
    budgets: Arc<Budgets>,
    used: Mutex<ConnUse>,
    room: Notify,
    /// `connection_buffer_bytes_max`, never below one frame.
    max: usize,
    /// Bytes this connection may hold outside the server's shared budget.
    allowance: usize,
}

#[derive(Debug, Default)]
struct ConnUse {
    total: usize,
    allowance: usize,
}

impl ConnBuffer {
    pub fn new(budgets: &Arc<Budgets>) -> Arc<ConnBuffer> {
        let l = &budgets.limits;
        Arc::new(ConnBuffer {
            max: l
                .connection_buffer_bytes_max
                .max(l.frame_bytes_max)
                .max(l.hello_frame_bytes_max),
            allowance: l.hello_frame_bytes_max,
            budgets: Arc::clone(budgets),
            used: Mutex::new(ConnUse::default()),
            room: Notify::new(),
        })
    }

    /// An empty reservation, for one frame.
    pub fn ticket(self: &Arc<Self>) -> Ticket {
        Ticket {
            conn: Arc::clone(self),
            total: 0,
            allowance: 0,
            shared: 0,
            counted: 0,
        }
    }

    /// Takes `n` bytes of the connection's room if there is room; returns the part that
    /// came out of its allowance.
    fn try_take(&self, n: usize) -> Option<usize> {
        let mut u = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        if u.total + n > self.max {
            return None;
        }
        u.total += n;
        let free = self.allowance.saturating_sub(u.allowance).min(n);
        u.allowance += free;
        Some(free)
    }
}

/// Bytes reserved for one frame (and the message decoded from it); given back when
/// dropped, i.e. once the message is handled.
#[derive(Debug)]
pub(crate) struct Ticket {
    conn: Arc<ConnBuffer>,
    /// Bytes taken from the connection's bound.
    total: usize,
    /// The part of `total` within the connection's allowance.
    allowance: usize,
    /// Bytes taken from the server's shared budget.
    shared: usize,
    /// Bytes granted in full (in [`ServerStats::frame_bytes_buffered`]).
    counted: usize,
}

impl ReadBudget for Ticket {
    async fn reserve(&mut self, n: usize) {
        let free = loop {
            let room = self.conn.room.notified();
            if let Some(free) = self.conn.try_take(n) {
                break free;
            }
            room.await;
        };
        self.total += n;
        self.allowance += free;
        let counters = &self.conn.budgets.counters;
        let need = n - free;
        if need == 0 {
            self.counted += n;
            raise(&counters.frame_bytes, &counters.frame_bytes_peak, n);
            return;
        }
        // need <= the 64 KiB chunk a frame reader reserves at once.
        let need_u32 = u32::try_from(need).unwrap_or(u32::MAX);
        let shared = &self.conn.budgets.shared;
        let permit = match shared.try_acquire_many(need_u32) {
            Ok(p) => Some(p),
            Err(_) => {
                counters.buffer_waits.fetch_add(1, Ordering::SeqCst);
                tracing::debug!(bytes = need, "server buffer budget full; connection waits");
                shared.acquire_many(need_u32).await.ok()
            }
        };
        if let Some(p) = permit {
            p.forget();
            self.shared += need_u32 as usize;
            raise(
                &counters.shared_bytes,
                &counters.shared_bytes_peak,
                need_u32 as usize,
            );
        }
        // Counted once granted: a reservation still waiting holds nothing.
        self.counted += n;
        raise(&counters.frame_bytes, &counters.frame_bytes_peak, n);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        {
            let mut u = self
                .conn
                .used
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            u.total -= self.total;
            u.allowance -= self.allowance;
        }
        self.conn.room.notify_waiters();
        let budgets = &self.conn.budgets;
        lower(&budgets.counters.frame_bytes, self.counted);
        if self.shared > 0 {
            budgets.shared.add_permits(self.shared);
            lower(&budgets.counters.shared_bytes, self.shared);
        }
    }
}

/// One connection's share of `server_transaction_bytes_max`: the bytes of its unfinished
/// upload transaction.
#[derive(Debug)]
pub(crate) struct PiecesHeld {
    budgets: Arc<Budgets>,
    held: usize,
}

impl PiecesHeld {
    pub fn new(budgets: &Arc<Budgets>) -> Self {
        PiecesHeld {
            budgets: Arc::clone(budgets),
            held: 0,
        }
    }

    /// Holds `want` bytes; `false` (holding what it held) if the server's budget has no
    /// room for them. Never waits: a transaction waiting for room another unfinished one
    /// holds could wait for ever.
    pub fn set(&mut self, want: usize) -> bool {
        let c = &self.budgets.counters;
        if want <= self.held {
            lower(&c.transaction_bytes, self.held - want);
            self.held = want;
            return true;
        }
        let more = (want - self.held) as u64;
        let max = self.budgets.limits.server_transaction_bytes_max as u64;
        let taken = c
            .transaction_bytes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now| {
                (now + more <= max).then_some(now + more)
            });
        match taken {
            Ok(before) => {
                c.transaction_bytes_peak
                    .fetch_max(before + more, Ordering::SeqCst);
                self.held = want;
                true
            }
            Err(_) => false,
        }
    }
}

impl Drop for PiecesHeld {
    fn drop(&mut self) {
        lower(&self.budgets.counters.transaction_bytes, self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            hello_frame_bytes_max: 10,
            frame_bytes_max: 100,
            connection_buffer_bytes_max: 150,
            server_buffer_bytes_max: 60,
            server_transaction_bytes_max: 50,
            ..Limits::default()
        }
    }

    #[tokio::test]
    async fn allowance_first_then_the_shared_budget_and_all_given_back() {
        let b = Budgets::new(limits());
        let conn = ConnBuffer::new(&b);
        let mut t = conn.ticket();
        t.reserve(8).await;
        assert_eq!(b.stats().shared_bytes_buffered, 0, "within the allowance");
        t.reserve(50).await;
        let s = b.stats();
        assert_eq!((s.frame_bytes_buffered, s.shared_bytes_buffered), (58, 48));
        // The shared budget has 12 left: a second connection waits for more.
        let other = ConnBuffer::new(&b);
        let mut t2 = other.ticket();
        t2.reserve(10).await;
        let blocked = tokio::time::timeout(Duration::ZERO, t2.reserve(20)).await;
        assert!(blocked.is_err(), "the shared budget is full");
        assert_eq!(b.stats().buffer_waits, 1);
        drop(t);
        t2.reserve(20).await;
        drop(t2);
        let s = b.stats();
        assert_eq!((s.frame_bytes_buffered, s.shared_bytes_buffered), (0, 0));
        assert_eq!(s.shared_bytes_buffered_peak, 48);
    }

    #[tokio::test]
    async fn one_connection_waits_at_its_own_bound() {
        let l = Limits {
            server_buffer_bytes_max: 1_000,
            ..limits()
        };
        let b = Budgets::new(l);
        let conn = ConnBuffer::new(&b);
        let mut t = conn.ticket();
        t.reserve(100).await;
        let mut t2 = conn.ticket();
        t2.reserve(50).await;
        let blocked = tokio::time::timeout(Duration::ZERO, t2.reserve(1)).await;
        assert!(blocked.is_err(), "150 bytes is the connection's bound");
        drop(t);
        t2.reserve(1).await;
    }

    #[test]
    fn transaction_bytes_are_refused_past_the_server_budget() {
        let b = Budgets::new(limits());
        let mut a = PiecesHeld::new(&b);
        let mut c = PiecesHeld::new(&b);
        assert!(a.set(40));
        assert!(!c.set(20), "40 + 20 is over 50");
        assert!(c.set(10));
        assert!(a.set(0));
        assert!(c.set(50));
        drop(c);
        let s = b.stats();
        assert_eq!(s.transaction_bytes_buffered, 0);
        assert_eq!(s.transaction_bytes_buffered_peak, 50);
    }

    #[test]
    fn a_throttled_event_is_logged_once_per_period_with_its_count() {
        let t = Throttled::new(Duration::from_secs(3600));
        assert_eq!(t.hit(), Some(1));
        for _ in 0..5 {
            assert_eq!(t.hit(), None);
        }
        *t.last.lock().unwrap() = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(t.hit(), Some(6));
    }
}
