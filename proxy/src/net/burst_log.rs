//! Warnings for conditions that recur in bursts (out of descriptors, a full server), logged at
//! most once a second with a count of what was left unsaid.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Logs a recurring condition at most once per interval, with how often it happened since.
#[derive(Debug)]
pub struct BurstLog {
    what: &'static str,
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl BurstLog {
    /// A burst logger for `what`, logging at most once per second.
    pub const fn new(what: &'static str) -> Self {
        BurstLog {
            what,
            interval: Duration::from_secs(1),
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Records one occurrence, logging a warning if none was logged within the interval.
    pub fn hit(&self, detail: &dyn std::fmt::Display) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < self.interval) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        let more = self.suppressed.swap(0, Ordering::Relaxed);
        if more > 0 {
            tracing::warn!(
                "{}: {detail} ({more} more since the last report)",
                self.what
            );
        } else {
            tracing::warn!("{}: {detail}", self.what);
        }
    }
}
