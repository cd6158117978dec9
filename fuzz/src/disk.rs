//! A simulated disk for redb's `StorageBackend`: bytes in memory that a test can reopen,
//! crash, record and break.
//!
//! - `live` is what redb reads and writes (the page cache); `durable` is what the last
//!   successful `sync_data` made stable. A crash ([`SimDisk::crash`]) drops the live bytes:
//!   every later operation of the old handle fails, and reopening sees the durable image.
//! - With recording on, every mutating operation is kept in order, so a test can rebuild
//!   the durable image as of any sync point, or a torn image (the sync's writes cut short).
//!   Disks recording on one [`Clock`] (a database and its write-ahead file) stamp each
//!   operation with the clock's next number, so their histories merge into one order: a
//!   power cut at any moment leaves each file as its own last sync before that moment made
//!   it.
//! - A fault plan fails the k-th operation (read, write, set_len or sync_data), once or
//!   from then on, without applying it.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use redb::StorageBackend;

/// One recorded mutating operation.
#[derive(Clone, Debug)]
pub enum DiskOp {
    /// `write(offset, data)`.
    Write(u64, Vec<u8>),
    /// `set_len(len)`.
    SetLen(u64),
    /// `sync_data()` that succeeded.
    Sync,
}

/// Which operations a fault plan counts and fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// `read`.
    Read,
    /// `write`.
    Write,
    /// `set_len`.
    SetLen,
    /// `sync_data`.
    Sync,
}

/// Fail the `at`-th counted operation (1-based), and every later one if `forever`.
#[derive(Clone, Copy, Debug)]
pub struct FaultPlan {
    /// The first operation to fail.
    pub at: u64,
    /// Keep failing after it.
    pub forever: bool,
}

/// A sequence shared by disks that record together: every recorded operation of any of
/// them takes the next number.
#[derive(Clone, Debug, Default)]
pub struct Clock(Arc<AtomicU64>);

impl Clock {
    /// A clock at 0.
    pub fn new() -> Self {
        Clock::default()
    }

    /// Operations stamped so far.
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    fn tick(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

#[derive(Debug, Default)]
struct State {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Mutations since the last sync, applied to `durable` by the next one.
    pending: Vec<DiskOp>,
    /// Every mutation and sync, when recording.
    history: Option<Vec<DiskOp>>,
    /// The clock stamping them, if recording on one, and each one's stamp.
    clock: Option<Clock>,
    stamps: Vec<u64>,
    /// The handle in use was crashed; a new one must be taken.
    generation: u64,
    fault: Option<FaultPlan>,
    ops: u64,
    /// Faults injected so far, by kind.
    injected: Vec<OpKind>,
    syncs: u64,
}

/// The disk: clone it to keep a way to it while redb owns a [`SimBackend`].
#[derive(Clone, Debug, Default)]
pub struct SimDisk(Arc<Mutex<State>>);

/// What redb is given: the disk, as of one "boot".
#[derive(Debug)]
pub struct SimBackend {
    disk: SimDisk,
    generation: u64,
}

/// Sets the length, zero-filling growth. (`vec![0; n]` takes zeroed memory from the
/// allocator: far faster than `Vec::resize` in the debug builds tests run in.)
fn set_len(buf: &mut Vec<u8>, len: usize) {
    if len <= buf.len() {
        buf.truncate(len);
    } else {
        let mut grown = vec![0u8; len];
        grown[..buf.len()].copy_from_slice(buf);
        *buf = grown;
    }
}

fn apply(buf: &mut Vec<u8>, op: &DiskOp) {
    match op {
        DiskOp::Write(off, data) => {
            let off = *off as usize;
            let end = off + data.len();
            if buf.len() < end {
                set_len(buf, end);
            }
            buf[off..end].copy_from_slice(data);
        }
        DiskOp::SetLen(len) => set_len(buf, *len as usize),
        DiskOp::Sync => {}
    }
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> Self {
        SimDisk::default()
    }

    /// A disk holding these bytes, durably.
    pub fn from_image(image: Vec<u8>) -> Self {
        let disk = SimDisk::default();
        {
            let mut s = disk.lock();
            s.live = image.clone();
            s.durable = image;
        }
        disk
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A backend for the next open.
    pub fn backend(&self) -> SimBackend {
        SimBackend {
            disk: self.clone(),
            generation: self.lock().generation,
        }
    }

    /// Power cut: unsynced bytes are lost and the current backend stops working.
    pub fn crash(&self) {
        let mut s = self.lock();
        s.generation += 1;
        s.live = s.durable.clone();
        s.pending.clear();
    }

    /// Records every mutation from now on (see [`SimDisk::history`]).
    pub fn record(&self) {
        let mut s = self.lock();
        s.history = Some(Vec::new());
        s.stamps.clear();
    }

    /// Records every mutation from now on, each stamped by `clock` (see
    /// [`SimDisk::stamped_history`]).
    pub fn record_on(&self, clock: &Clock) {
        self.record();
        self.lock().clock = Some(clock.clone());
    }

    /// The recorded mutations.
    pub fn history(&self) -> Vec<DiskOp> {
        self.lock().history.clone().unwrap_or_default()
    }

    /// The recorded mutations with their clock stamps (see [`SimDisk::record_on`]).
    pub fn stamped_history(&self) -> Vec<(u64, DiskOp)> {
        let s = self.lock();
        let history = s.history.clone().unwrap_or_default();
        assert_eq!(history.len(), s.stamps.len(), "recorded without a clock");
        s.stamps.iter().copied().zip(history).collect()
    }

    /// The durable image now.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// The live bytes now (what a process that did not crash would read back).
    pub fn live_image(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// Successful syncs so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Counted operations so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Sets (or clears) the fault plan and resets the operation count.
    pub fn set_fault(&self, plan: Option<FaultPlan>) {
        let mut s = self.lock();
        s.fault = plan;
        s.ops = 0;
    }

    /// The kinds of the faults injected so far.
    pub fn injected(&self) -> Vec<OpKind> {
        self.lock().injected.clone()
    }

    fn op(&self, generation: u64, kind: OpKind) -> io::Result<MutexGuard<'_, State>> {
        let mut s = self.lock();
        if s.generation != generation {
            return Err(io::Error::other("the disk crashed under this handle"));
        }
        s.ops += 1;
        if let Some(f) = s.fault {
            if s.ops == f.at || (f.forever && s.ops > f.at) {
                s.injected.push(kind);
                return Err(io::Error::other(format!(
                    "injected {kind:?} fault at op {}",
                    s.ops
                )));
            }
        }
        Ok(s)
    }

    fn mutate(&self, generation: u64, kind: OpKind, op: DiskOp) -> io::Result<()> {
        let mut s = self.op(generation, kind)?;
        if let DiskOp::Write(off, data) = &op {
            let end = (*off as usize).checked_add(data.len());
            if end.is_none_or(|e| e > s.live.len()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "write past the end",
                ));
            }
        }
        apply(&mut s.live, &op);
        s.push_history(&op);
        s.pending.push(op);
        Ok(())
    }
}

impl State {
    fn push_history(&mut self, op: &DiskOp) {
        if let Some(h) = &mut self.history {
            h.push(op.clone());
            if let Some(c) = &self.clock {
                self.stamps.push(c.tick());
            }
        }
    }
}

/// Rebuilds images from a recorded history.
#[derive(Debug)]
pub struct Replayer<'h> {
    history: &'h [DiskOp],
    at: usize,
    image: Vec<u8>,
}

impl<'h> Replayer<'h> {
    /// Starts from `base` (the image when recording began).
    pub fn new(history: &'h [DiskOp], base: Vec<u8>) -> Self {
        Replayer {
            history,
            at: 0,
            image: base,
        }
    }

    /// Advances to the next sync: returns the durable image there, and the mutations that
    /// led to it since the previous sync (for torn images); `None` at the end.
    pub fn next_sync(&mut self) -> Option<(Vec<u8>, &'h [DiskOp])> {
        let start = self.at;
        let rel = self.history[start..]
            .iter()
            .position(|op| matches!(op, DiskOp::Sync))?;
        for op in &self.history[start..start + rel] {
            apply(&mut self.image, op);
        }
        self.at = start + rel + 1;
        Some((self.image.clone(), &self.history[start..start + rel]))
    }

    /// The image `base` with the first `n` of `ops` applied (a sync cut short).
    pub fn torn(base: &[u8], ops: &[DiskOp], n: usize) -> Vec<u8> {
        let mut img = base.to_vec();
        for op in &ops[..n.min(ops.len())] {
            apply(&mut img, op);
        }
        img
    }

    /// The image `base` with every op but the last of `ops` applied, and of the last, if
    /// it is a write, only its first `bytes` bytes (a write torn part-way: its first
    /// sectors reached the disk, the rest did not).
    pub fn torn_within(base: &[u8], ops: &[DiskOp], bytes: usize) -> Vec<u8> {
        let Some((last, before)) = ops.split_last() else {
            return base.to_vec();
        };
        let mut img = Replayer::torn(base, before, before.len());
        match last {
            DiskOp::Write(off, data) => {
                let cut = DiskOp::Write(*off, data[..bytes.min(data.len())].to_vec());
                apply(&mut img, &cut);
            }
            op => apply(&mut img, op),
        }
        img
    }
}

impl StorageBackend for SimBackend {
    fn len(&self) -> Result<u64, io::Error> {
        let s = self.disk.lock();
        if s.generation != self.generation {
            return Err(io::Error::other("the disk crashed under this handle"));
        }
        Ok(s.live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let s = self.disk.op(self.generation, OpKind::Read)?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start.checked_add(out.len());
        match end {
            Some(end) if end <= s.live.len() => {
                out.copy_from_slice(&s.live[start..end]);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read past the end",
            )),
        }
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.disk
            .mutate(self.generation, OpKind::SetLen, DiskOp::SetLen(len))
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut s = self.disk.op(self.generation, OpKind::Sync)?;
        let pending = std::mem::take(&mut s.pending);
        for op in &pending {
            apply(&mut s.durable, op);
        }
        // The durable image has the live length too (a set_len is durable once synced).
        s.push_history(&DiskOp::Sync);
        s.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.disk.mutate(
            self.generation,
            OpKind::Write,
            DiskOp::Write(offset, data.to_vec()),
        )
    }
}
