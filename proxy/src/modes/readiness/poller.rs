//! Readiness backends for the shared event loop: select(2), poll(2), epoll level- and
//! edge-triggered. Everything else about the loop is the same for all of them.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use rustix::event::{epoll, FdSetElement, PollFlags, Timespec};

use super::sys::{self, FD_SETSIZE};

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

fn timespec(timeout: Option<Duration>) -> Option<Timespec> {
    timeout.map(|t| Timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(t.subsec_nanos()),
    })
}

fn fd_index(fd: BorrowedFd<'_>) -> usize {
    fd.as_raw_fd() as usize
}

/// select(2), with the classic FD_SETSIZE wall enforced: descriptors ≥ 1024 are refused
/// (placing one in an `fd_set` is memory corruption in C). Sets are rebuilt every wait.
pub struct SelectPoller {
    watched: Vec<Option<(Token, Interest)>>,
    highest: usize,
    read: Vec<FdSetElement>,
    write: Vec<FdSetElement>,
    ready: Vec<u8>,
}

impl SelectPoller {
    /// An empty select poller.
    pub fn new() -> Self {
        let words = FD_SETSIZE.div_ceil(8 * std::mem::size_of::<FdSetElement>());
        SelectPoller {
            watched: vec![None; FD_SETSIZE],
            highest: 0,
            read: vec![FdSetElement::default(); words],
            write: vec![FdSetElement::default(); words],
            ready: Vec::new(),
        }
    }
}

impl Default for SelectPoller {
    fn default() -> Self {
        Self::new()
    }
}

impl Poller for SelectPoller {
    fn can_watch(&self, fd: RawFd) -> bool {
        (fd as usize) < FD_SETSIZE
    }

    fn set_interest(
        &mut self,
        fd: BorrowedFd<'_>,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        let index = fd_index(fd);
        let slot = self
            .watched
            .get_mut(index)
            .ok_or_else(|| io::Error::other("descriptor at or above FD_SETSIZE"))?;
        *slot = Some((token, interest));
        self.highest = self.highest.max(index + 1);
        Ok(())
    }

    fn remove(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        if let Some(slot) = self.watched.get_mut(fd_index(fd)) {
            *slot = None;
        }
        while self.highest > 0 && self.watched[self.highest - 1].is_none() {
            self.highest -= 1;
        }
        Ok(())
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        self.read.fill(FdSetElement::default());
        self.write.fill(FdSetElement::default());
        let mut nfds = 0;
        for (fd, slot) in self.watched[..self.highest].iter().enumerate() {
            if let Some((_, interest)) = slot {
                if interest.read {
                    rustix::event::fd_set_insert(&mut self.read, fd as RawFd);
                }
                if interest.write {
                    rustix::event::fd_set_insert(&mut self.write, fd as RawFd);
                }
                if !interest.is_none() {
                    nfds = fd + 1;
                }
            }
        }
        let timeout = timespec(timeout);
        match sys::select_registered(nfds, &mut self.read, &mut self.write, timeout.as_ref()) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(err) => return Err(err),
        }
        self.ready.clear();
        self.ready.resize(nfds, 0);
        for fd in rustix::event::FdSetIter::new(&self.read) {
            self.ready[fd as usize] |= 1;
        }
        for fd in rustix::event::FdSetIter::new(&self.write) {
            self.ready[fd as usize] |= 2;
        }
        for (fd, &ready) in self.ready.iter().enumerate() {
            let Some((token, _)) = self.watched[fd] else {
                continue;
            };
            if ready != 0 {
                events.push(Event {
                    token,
                    readable: ready & 1 != 0,
                    writable: ready & 2 != 0,
                });
            }
        }
        Ok(())
    }
}

/// poll(2) over every watched descriptor, rebuilt each wait: the linear scan is the point.
#[derive(Debug, Default)]
pub struct PollPoller {
    entries: Vec<(RawFd, Interest, Token)>,
    /// Index into `entries` for each descriptor number.
    position: Vec<u32>,
    watched: Vec<(RawFd, PollFlags)>,
    /// For each watched descriptor, its index into `entries`.
    watched_entry: Vec<u32>,
    revents: Vec<PollFlags>,
}

impl PollPoller {
    /// An empty poll poller.
    pub fn new() -> Self {
        Self::default()
    }
}

const NOT_WATCHED: u32 = u32::MAX;

impl Poller for PollPoller {
    fn set_interest(
        &mut self,
        fd: BorrowedFd<'_>,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        let index = fd_index(fd);
        if self.position.len() <= index {
            self.position.resize(index + 1, NOT_WATCHED);
        }
        match self.position[index] {
            NOT_WATCHED => {
                self.position[index] = self.entries.len() as u32;
                self.entries.push((fd.as_raw_fd(), interest, token));
            }
            at => self.entries[at as usize] = (fd.as_raw_fd(), interest, token),
        }
        Ok(())
    }

    fn remove(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let index = fd_index(fd);
        let Some(&at) = self.position.get(index) else {
            return Ok(());
        };
        if at == NOT_WATCHED {
            return Ok(());
        }
        self.entries.swap_remove(at as usize);
        if let Some(&(moved, _, _)) = self.entries.get(at as usize) {
            self.position[moved as usize] = at;
        }
        self.position[index] = NOT_WATCHED;
        Ok(())
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        self.watched.clear();
        self.watched_entry.clear();
        for (entry, &(fd, interest, _)) in self.entries.iter().enumerate() {
            // A descriptor with no interest is left out entirely: poll reports hang-ups even
            // for empty event masks, which would wake the loop for nothing.
            if interest.is_none() {
                continue;
            }
            let mut flags = PollFlags::empty();
            if interest.read {
                flags |= PollFlags::IN;
            }
            if interest.write {
                flags |= PollFlags::OUT;
            }
            self.watched.push((fd, flags));
            self.watched_entry.push(entry as u32);
        }
        let timeout = timespec(timeout);
        match sys::poll_registered(&self.watched, &mut self.revents, timeout.as_ref()) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(err) => return Err(err),
        }
        let trouble = PollFlags::ERR | PollFlags::HUP | PollFlags::NVAL;
        for (revents, &entry) in self.revents.iter().zip(&self.watched_entry) {
            if revents.is_empty() {
                continue;
            }
            let token = self.entries[entry as usize].2;
            let bad = revents.intersects(trouble);
            events.push(Event {
                token,
                readable: bad || revents.contains(PollFlags::IN),
                writable: bad || revents.contains(PollFlags::OUT),
            });
        }
        Ok(())
    }
}

/// epoll, level- or edge-triggered.
///
/// Level-triggered: the interest set follows what each socket waits for, and a socket with no
/// interest is removed from the set (epoll reports hang-ups even with an empty mask).
/// Edge-triggered: each socket is added once for reading and writing and never modified; the
/// loop must drain it to `WouldBlock` because no new edge comes otherwise.
pub struct EpollPoller {
    epoll: std::os::fd::OwnedFd,
    edge: bool,
    registered: Vec<bool>,
    buffer: Vec<epoll::Event>,
}

impl EpollPoller {
    /// A new epoll instance.
    pub fn new(edge: bool) -> io::Result<Self> {
        Ok(EpollPoller {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
            edge,
            registered: Vec::new(),
            buffer: Vec::with_capacity(1024),
        })
    }

    fn mark(&mut self, fd: BorrowedFd<'_>, registered: bool) {
        let index = fd_index(fd);
        if self.registered.len() <= index {
            self.registered.resize(index + 1, false);
        }
        self.registered[index] = registered;
    }

    fn is_registered(&self, fd: BorrowedFd<'_>) -> bool {
        self.registered.get(fd_index(fd)).copied().unwrap_or(false)
    }
}

impl Poller for EpollPoller {
    fn edge_triggered(&self) -> bool {
        self.edge
    }

    /// With several loops sharing one listening socket, EPOLLEXCLUSIVE wakes one of them per
    /// connection instead of all (the thundering herd). The flag is only accepted when adding,
    /// so level-triggered pausing deletes and re-adds; edge-triggered never pauses the
    /// registration (no new edge arrives while nobody accepts, so there is nothing to mute).
    fn watch_listener(
        &mut self,
        fd: BorrowedFd<'_>,
        token: Token,
        watching: bool,
    ) -> io::Result<()> {
        match (watching, self.is_registered(fd)) {
            (true, false) => {
                let mut flags = epoll::EventFlags::IN | epoll::EventFlags::EXCLUSIVE;
                if self.edge {
                    flags |= epoll::EventFlags::ET;
                }
                epoll::add(&self.epoll, fd, epoll::EventData::new_u64(token), flags)?;
                self.mark(fd, true);
            }
            (false, true) if !self.edge => {
                epoll::delete(&self.epoll, fd)?;
                self.mark(fd, false);
            }
            _ => {}
        }
        Ok(())
    }

    fn set_interest(
        &mut self,
        fd: BorrowedFd<'_>,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        let registered = self.is_registered(fd);
        let data = epoll::EventData::new_u64(token);
        if self.edge {
            if !registered {
                let flags = epoll::EventFlags::IN
                    | epoll::EventFlags::OUT
                    | epoll::EventFlags::RDHUP
                    | epoll::EventFlags::ET;
                epoll::add(&self.epoll, fd, data, flags)?;
                self.mark(fd, true);
            }
            return Ok(());
        }
        let mut flags = epoll::EventFlags::empty();
        if interest.read {
            flags |= epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
        }
        if interest.write {
            flags |= epoll::EventFlags::OUT;
        }
        match (registered, interest.is_none()) {
            (false, true) => {}
            (false, false) => {
                epoll::add(&self.epoll, fd, data, flags)?;
                self.mark(fd, true);
            }
            (true, false) => epoll::modify(&self.epoll, fd, data, flags)?,
            (true, true) => {
                epoll::delete(&self.epoll, fd)?;
                self.mark(fd, false);
            }
        }
        Ok(())
    }

    fn remove(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        // Explicit, because closing a descriptor removes it from the set only when no
        // duplicate is open (a listener shared by several loops has one per loop).
        if self.is_registered(fd) {
            self.mark(fd, false);
            epoll::delete(&self.epoll, fd)?;
        }
        Ok(())
    }

    fn wait(&mut self, events: &mut Vec<Event>, timeout: Option<Duration>) -> io::Result<()> {
        self.buffer.clear();
        let timeout = timespec(timeout);
        match epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(&mut self.buffer),
            timeout.as_ref(),
        ) {
            Ok(_) => {}
            Err(err) if err == rustix::io::Errno::INTR => return Ok(()),
            Err(err) => return Err(err.into()),
        }
        let trouble = epoll::EventFlags::ERR | epoll::EventFlags::HUP;
        for event in &self.buffer {
            let flags = event.flags;
            let bad = flags.intersects(trouble);
            events.push(Event {
                token: event.data.u64(),
                readable: bad || flags.intersects(epoll::EventFlags::IN | epoll::EventFlags::RDHUP),
                writable: bad || flags.contains(epoll::EventFlags::OUT),
            });
        }
        Ok(())
    }
}
