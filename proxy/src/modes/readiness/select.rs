//! `select` mode's backend: select(2), with the classic FD_SETSIZE wall enforced.

use std::io;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

use rustix::event::FdSetElement;

use super::poller::{fd_index, timespec, Event, Interest, Poller, Token};
use super::sys::{self, FD_SETSIZE};

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
