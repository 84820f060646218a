//! `epoll` and `epoll-et` modes' backend: epoll(7), level- or edge-triggered.

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

use rustix::event::epoll;

use super::poller::{fd_index, timespec, Event, Interest, Poller, Token};

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
