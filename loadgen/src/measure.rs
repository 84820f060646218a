//! What the sessions measure while they run: the phase they are in, counters, and latency
//! histograms (HdrHistogram, microseconds), shared by every session.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use tokio::sync::watch;

use crate::record::Cause;

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    /// Sessions are being opened.
    Ramp = 0,
    /// All sessions are open and idle (memory is sampled).
    Idle = 1,
    /// Messages flow but are not counted.
    Warmup = 2,
    /// Messages flow and are counted.
    Measure = 3,
    /// Sessions finish their message in flight and close.
    Stop = 4,
}

impl Phase {
    fn from_u8(value: u8) -> Phase {
        match value {
            0 => Phase::Ramp,
            1 => Phase::Idle,
            2 => Phase::Warmup,
            3 => Phase::Measure,
            _ => Phase::Stop,
        }
    }
}

/// Latency histograms in microseconds, shared by all sessions.
pub struct Histograms {
    /// Connect start → CONNECT reply (or connected, direct).
    pub handshake: Mutex<Histogram<u64>>,
    /// Message round trip; in open loop, from the scheduled send time.
    pub rtt: Mutex<Histogram<u64>>,
    /// Open loop only: from the actual write to the echo.
    pub service: Mutex<Histogram<u64>>,
}

/// A histogram of microseconds from 1 µs to 1 h at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

impl Histograms {
    /// Empty histograms.
    pub fn new() -> Self {
        Histograms {
            handshake: Mutex::new(histogram()),
            rtt: Mutex::new(histogram()),
            service: Mutex::new(histogram()),
        }
    }
}

/// Counters and histograms filled by the sessions.
pub struct Shared {
    phase: AtomicU8,
    phase_tx: watch::Sender<Phase>,
    /// Sessions whose dial completed.
    pub established: AtomicU64,
    /// CLOCK_MONOTONIC nanoseconds when the warm-up began: every pacer thread's schedule
    /// starts here.
    pub warmup_started_ns: AtomicU64,
    /// Sessions whose dial failed, by cause.
    pub failures: Mutex<BTreeMap<String, u64>>,
    /// Dials finished (established or failed).
    pub dialed: AtomicU64,
    /// Messages completed in the measured window.
    pub messages: AtomicU64,
    /// Messages completed since the workload started (for the status line).
    pub messages_total: AtomicU64,
    /// Echoed messages that differed from what was sent.
    pub corrupted: AtomicU64,
    /// Established sessions that ended (EOF, reset, timeout) while the workload ran.
    pub dropped: Mutex<BTreeMap<String, u64>>,
    /// Latencies.
    pub histograms: Histograms,
}

impl Shared {
    /// Counters at zero, in the ramp phase.
    pub fn new() -> Arc<Self> {
        let (phase_tx, _) = watch::channel(Phase::Ramp);
        Arc::new(Shared {
            phase: AtomicU8::new(Phase::Ramp as u8),
            phase_tx,
            established: AtomicU64::new(0),
            warmup_started_ns: AtomicU64::new(0),
            failures: Mutex::new(BTreeMap::new()),
            dialed: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            messages_total: AtomicU64::new(0),
            corrupted: AtomicU64::new(0),
            dropped: Mutex::new(BTreeMap::new()),
            histograms: Histograms::new(),
        })
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// A receiver that sees every phase change.
    pub fn phases(&self) -> watch::Receiver<Phase> {
        self.phase_tx.subscribe()
    }

    /// Moves every session to `phase`. The warm-up's start is the pacers' schedule origin:
    /// now, unless a shared schedule set it already.
    pub fn set_phase(&self, phase: Phase) {
        if phase == Phase::Warmup {
            let _ = self.warmup_started_ns.compare_exchange(
                0,
                crate::pacer::now_ns(),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
        self.phase.store(phase as u8, Ordering::Release);
        self.phase_tx.send_replace(phase);
    }

    /// Counts one failed dial or dropped session under its cause.
    pub fn count(map: &Mutex<BTreeMap<String, u64>>, cause: Cause) {
        *lock(map).entry(cause.to_string()).or_default() += 1;
    }

    /// Total failed dials.
    pub fn failed(&self) -> u64 {
        lock(&self.failures).values().sum()
    }

    /// Total dropped sessions.
    pub fn dropped_total(&self) -> u64 {
        lock(&self.dropped).values().sum()
    }
}

/// Locks a mutex, ignoring poisoning (a panicking session must not hide the others' data).
pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
