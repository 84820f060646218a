//! `poll` mode's backend: poll(2) over every watched descriptor.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use rustix::event::PollFlags;

use super::poller::{fd_index, timespec, Event, Interest, Poller, Token};
use super::sys;

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
