//! The contract between the event loop and a readiness backend (select, poll, epoll): what
//! to watch, what became ready, and how to wait. Everything else about the loop is the same
//! for every backend.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use rustix::event::Timespec;

/// Identifies what a readiness event is about.
pub type Token = u64;

/// What to watch a descriptor for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interest {
    /// Wake when readable.
    pub read: bool,
    /// Wake when writable.
    pub write: bool,
}

impl Interest {
    /// Nothing: stop watching.
    pub const NONE: Interest = Interest {
        read: false,
        write: false,
    };
    /// Readable only.
    pub const READ: Interest = Interest {
        read: true,
        write: false,
    };
    /// Writable only.
    pub const WRITE: Interest = Interest {
        read: false,
        write: true,
    };

    /// Whether nothing is watched.
    pub fn is_none(self) -> bool {
        !self.read && !self.write
    }
}

/// One readiness report. Errors and hang-ups are reported as both readable and writable, so
/// the next read or write discovers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The token the descriptor was registered with.
    pub token: Token,
    /// Readable (or error / hang-up).
    pub readable: bool,
    /// Writable (or error / hang-up).
    pub writable: bool,
}

/// How the event loop waits for readiness.
pub trait Poller {
    /// Whether `fd` can be watched at all (select: only below FD_SETSIZE).
    fn can_watch(&self, _fd: RawFd) -> bool {
        true
    }

    /// Whether readiness is reported only on change, so every socket must be drained to
    /// `WouldBlock` before waiting again.
    fn edge_triggered(&self) -> bool {
        false
    }

    /// Starts (`watching`) or stops watching the listening socket for connections.
    fn watch_listener(
        &mut self,
        fd: BorrowedFd<'_>,
        token: Token,
        watching: bool,
    ) -> io::Result<()> {
        let interest = if watching {
            Interest::READ
        } else {
            Interest::NONE
        };
        self.set_interest(fd, token, interest)
    }

    /// Sets what `fd` is watched for; `Interest::NONE` stops watching it (but it stays known).
    fn set_interest(
        &mut self,
        fd: BorrowedFd<'_>,
        token: Token,
        interest: Interest,
    ) -> io::Result<()>;

    /// Forgets `fd`. Must be called before the descriptor is closed.
    fn remove(&mut self, fd: BorrowedFd<'_>) -> io::Result<()>;

    /// Waits up to `timeout` (forever with `None`) and appends what became ready to `events`.
    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()>;
}

pub(super) fn timespec(timeout: Option<Duration>) -> Option<Timespec> {
    timeout.map(|t| Timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(t.subsec_nanos()),
    })
}

pub(super) fn fd_index(fd: BorrowedFd<'_>) -> usize {
    fd.as_raw_fd() as usize
}
