//! Process limits: the descriptor limit, and refusing cleanly when descriptors run out.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::burst_log::BurstLog;

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors a process keeps besides its sessions (std streams, listener, runtime, reserve).
pub const BASELINE_DESCRIPTORS: u64 = 20;

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum;
    let current = limit.current.unwrap_or(u64::MAX);
    if hard.is_some_and(|h| h > current) || (hard.is_none() && limit.current.is_some()) {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: hard,
                maximum: hard,
            },
        )?;
    }
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}

/// The soft descriptor limit in force.
pub fn nofile_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// How many sessions (two descriptors each) fit under a descriptor limit.
pub fn sessions_for_descriptors(limit: u64) -> u64 {
    limit.saturating_sub(BASELINE_DESCRIPTORS) / 2
}

/// Whether an error means the process or system ran out of descriptors or socket memory.
pub fn is_resource_exhaustion(err: &io::Error) -> bool {
    use rustix::io::Errno;
    let Some(code) = err.raw_os_error() else {
        return false;
    };
    [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM]
        .iter()
        .any(|e| e.raw_os_error() == code)
}

/// Whether an accept error concerns only the one connection being accepted, so the next
/// accept can follow at once (the client gave up while queued, for example).
pub fn is_transient_accept_error(err: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    ) || err.raw_os_error().is_some_and(|code| {
        [
            Errno::PROTO,
            Errno::PERM,
            Errno::NOPROTOOPT,
            Errno::HOSTDOWN,
            Errno::NONET,
            Errno::HOSTUNREACH,
            Errno::OPNOTSUPP,
            Errno::NETUNREACH,
        ]
        .iter()
        .any(|e| e.raw_os_error() == code)
    })
}

/// One descriptor per process held back so that, when the process has run out, it can still
/// accept a waiting connection and close it: refusing it cleanly instead of leaving it queued
/// until the client times out.
///
/// The reserve is briefly given up while refusing. Every descriptor a session creates is
/// created through [`new_descriptor`], which holds the read side of this lock, so no other
/// thread can take the freed number in that moment. (Without that, two event loops once left
/// a process with no reserve and no free descriptor at all, and every newcomer waited queued.)
static RESERVE: RwLock<Option<File>> = RwLock::new(None);

fn reserve_read() -> RwLockReadGuard<'static, Option<File>> {
    RESERVE.read().unwrap_or_else(PoisonError::into_inner)
}

fn reserve_write() -> RwLockWriteGuard<'static, Option<File>> {
    RESERVE.write().unwrap_or_else(PoisonError::into_inner)
}

/// Opens the process's reserve descriptor if it is not held (it stays missing while no
/// descriptor is free; [`new_descriptor`] tries again).
pub fn replenish_reserve() {
    let mut reserve = reserve_write();
    if reserve.is_none() {
        *reserve = File::open("/dev/null").ok();
    }
}

/// Runs `create`, which makes one new descriptor (a socket, an accept), such that it never
/// takes the reserve's number while a refusal has given it up. A missing reserve (lost to a
/// descriptor made elsewhere, e.g. by the resolver) is taken back first, before a session can
/// use up the last free descriptors. `create` must not call back into this module.
pub fn new_descriptor<T>(create: impl FnOnce() -> T) -> T {
    {
        let reserve = reserve_read();
        if reserve.is_some() {
            return create();
        }
    }
    replenish_reserve();
    let _reserve = reserve_read();
    create()
}

/// Most connections refused in one go, so that a flood cannot hold a loop for long.
const REFUSE_BATCH: usize = 256;

/// Frees the reserve, accepts and closes the connections waiting on the non-blocking
/// `listener` (at most a batch), and takes the reserve back. Returns how many were refused.
/// Refusing all that wait, not one per back-off, is what keeps a queued client from waiting
/// out its own timeout behind others.
pub fn refuse_waiting(listener: impl AsFd) -> usize {
    let mut reserve = reserve_write();
    *reserve = None;
    let mut refused = 0;
    for _ in 0..REFUSE_BATCH {
        match rustix::net::accept(&listener) {
            Ok(_) => refused += 1,
            Err(rustix::io::Errno::AGAIN) => break,
            // A client that gave up while queued: the next one may still be waiting.
            Err(err) if is_transient_accept_error(&err.into()) => {}
            Err(_) => break,
        }
    }
    *reserve = File::open("/dev/null").ok();
    refused
}

static ACCEPT_EXHAUSTED: BurstLog =
    BurstLog::new("out of descriptors on accept; refusing newcomers");

/// What every mode does when accept fails with `err`, a resource exhaustion: refuse the
/// waiting connections on the reserve ([`refuse_waiting`]) and log the burst. The caller then
/// backs off before accepting again.
pub fn refuse_on_exhaustion(listener: impl AsFd, err: &io::Error, sessions_open: usize) {
    let refused = refuse_waiting(listener);
    for _ in 0..refused {
        crate::metrics::refused(crate::metrics::Refusal::Exhausted);
    }
    ACCEPT_EXHAUSTED.hit(&format_args!(
        "{err}; {sessions_open} sessions open; refused {refused} waiting"
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn refusing_closes_every_waiting_connection_and_keeps_the_reserve() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let mut waiting: Vec<TcpStream> = (0..3)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        assert_eq!(refuse_waiting(&listener), 3);
        for stream in &mut waiting {
            let mut byte = [0u8; 1];
            assert_eq!(stream.read(&mut byte).expect("EOF"), 0);
        }
        assert_eq!(refuse_waiting(&listener), 0, "nothing left waiting");
        assert!(reserve_read().is_some(), "the reserve is held again");
        let made = new_descriptor(|| TcpStream::connect(addr));
        assert!(made.is_ok());
    }
}
