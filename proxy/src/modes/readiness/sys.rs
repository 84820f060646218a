//! The readiness modes' only `unsafe` code: select(2) and poll(2) over descriptors the event
//! loop has registered by number. (The crate's other `unsafe` module is `modes/uring/sys.rs`.)
//!
//! rustix marks these calls unsafe for I/O safety (the descriptors are named by number, not
//! borrowed), not for memory safety: the kernel only reads the sets and writes the result
//! flags into memory we own. The event loop removes every descriptor from its poller before
//! closing it, so each number names the socket it was registered for.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{BorrowedFd, RawFd};

use rustix::event::{FdSetElement, PollFd, PollFlags, Timespec};

/// select(2)'s classic set size: descriptors at or above it cannot be placed in an `fd_set`.
pub const FD_SETSIZE: usize = 1024;

/// Calls select(2) with read and write sets of registered descriptors below `nfds`.
pub fn select_registered(
    nfds: usize,
    read: &mut [FdSetElement],
    write: &mut [FdSetElement],
    timeout: Option<&Timespec>,
) -> io::Result<usize> {
    let nfds = i32::try_from(nfds).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: the sets hold only descriptors the event loop registered and has not closed
    // (it removes them from the poller first), and both slices are sized by the caller for
    // `nfds` bits, as rustix requires.
    let ready = unsafe { rustix::event::select(nfds, Some(read), Some(write), None, timeout)? };
    Ok(ready as usize)
}

/// Calls poll(2) on `(descriptor, events)` pairs; returns the `revents` of each, in order.
pub fn poll_registered(
    watched: &[(RawFd, PollFlags)],
    revents: &mut Vec<PollFlags>,
    timeout: Option<&Timespec>,
) -> io::Result<usize> {
    let mut fds: Vec<PollFd<'_>> = watched
        .iter()
        .map(|&(fd, events)| {
            // SAFETY: `fd` was registered by the event loop and is removed from the poller
            // before it is closed, so it is open for the duration of this call.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            PollFd::from_borrowed_fd(fd, events)
        })
        .collect();
    let ready = rustix::event::poll(&mut fds, timeout)?;
    revents.clear();
    revents.extend(fds.iter().map(PollFd::revents));
    Ok(ready)
}
