//! The relay, shared by every mode: one [`Pipe`] per direction moves bytes between two
//! non-blocking sockets.
//!
//! An idle pipe holds no buffer. Bytes are read into a scratch buffer that belongs to the
//! caller (one per thread or event loop) and written straight on; only what the destination
//! could not take right away is copied into the pipe's own leftover buffer, and the pipe stops
//! reading its source until that leftover has drained (backpressure). Memory per session is
//! therefore bounded by two scratch-sized leftovers, and is zero while nothing moves.

use std::io;

/// The scratch buffer size a mode should give [`Pipe::pump`].
pub const SCRATCH_SIZE: usize = 32 * 1024;

/// How many bytes one `pump` call moves at most before yielding, so that one busy session
/// cannot starve the others sharing a thread.
pub const PUMP_BUDGET: usize = 256 * 1024;

/// A socket driven without blocking: every call returns `WouldBlock` instead of waiting.
pub trait NonBlockingIo {
    /// Reads into `buf`; `Ok(0)` is end of stream.
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes from `buf`, returning how much was taken.
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Sends FIN: no more writes in this direction.
    fn shutdown_write(&mut self) -> io::Result<()>;
}

/// When a pipe stops reading a source that still has data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadUntil {
    /// Stop after a read that did not fill the scratch buffer: the socket is then drained,
    /// and a level-triggered wait reports it again if more arrived. Saves one read per message.
    ShortRead,
    /// Read until `WouldBlock`, as edge-triggered readiness requires (no new edge otherwise).
    WouldBlock,
}

/// A non-blocking std socket (the event loops' and the session threads' sockets).
impl NonBlockingIo for &std::net::TcpStream {
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(self, buf)
    }
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        io::Write::write(self, buf)
    }
    fn shutdown_write(&mut self) -> io::Result<()> {
        match self.shutdown(std::net::Shutdown::Write) {
            // The peer may already be gone; the other direction decides what happens next.
            Err(err) if err.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        }
    }
}

/// What a pipe waits for after a `pump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PipeState {
    /// The source has nothing to read right now: wait until it is readable.
    #[default]
    WantsRead,
    /// The destination cannot take more right now: wait until it is writable.
    WantsWrite,
    /// The budget ran out while data was still moving: pump again soon.
    Yielded,
    /// The source ended and the destination has been shut down for writing.
    Finished,
}

/// Bytes read but not yet taken by the destination.
#[derive(Debug)]
struct Leftover {
    bytes: Vec<u8>,
    written: usize,
}

/// One direction of a session: source → destination. 24 bytes while idle.
#[derive(Debug, Default)]
pub struct Pipe {
    leftover: Option<Box<Leftover>>,
    bytes: u64,
    source_done: bool,
    finished: bool,
    state: PipeState,
}

impl Pipe {
    /// A pipe that starts by delivering `leftover` (e.g. bytes pipelined after the request).
    pub fn with_leftover(leftover: Vec<u8>) -> Self {
        Pipe {
            leftover: (!leftover.is_empty()).then(|| {
                Box::new(Leftover {
                    bytes: leftover,
                    written: 0,
                })
            }),
            ..Pipe::default()
        }
    }

    /// Whether the source has ended and FIN has been passed on.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// What the last `pump` returned (`WantsRead` before the first).
    pub fn last_state(&self) -> PipeState {
        self.state
    }

    /// Bytes delivered to the destination so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes waiting in the leftover buffer (and its capacity, which is what costs memory).
    pub fn buffered(&self) -> (usize, usize) {
        self.leftover.as_ref().map_or((0, 0), |left| {
            (left.bytes.len() - left.written, left.bytes.capacity())
        })
    }

    /// Moves bytes until the source or destination would block (or, with
    /// [`ReadUntil::ShortRead`], the source is drained), the source ends, or the budget is
    /// spent. An error (reset, broken pipe) means the session is over.
    pub fn pump(
        &mut self,
        source: &mut impl NonBlockingIo,
        destination: &mut impl NonBlockingIo,
        scratch: &mut [u8],
        until: ReadUntil,
    ) -> io::Result<PipeState> {
        let state = self.pump_inner(source, destination, scratch, until)?;
        self.state = state;
        Ok(state)
    }

    fn pump_inner(
        &mut self,
        source: &mut impl NonBlockingIo,
        destination: &mut impl NonBlockingIo,
        scratch: &mut [u8],
        until: ReadUntil,
    ) -> io::Result<PipeState> {
        if self.finished {
            return Ok(PipeState::Finished);
        }
        let mut moved = 0usize;
        loop {
            if !self.flush_leftover(destination)? {
                return Ok(PipeState::WantsWrite);
            }
            if self.source_done {
                destination.shutdown_write()?;
                self.finished = true;
                return Ok(PipeState::Finished);
            }
            if moved >= PUMP_BUDGET {
                return Ok(PipeState::Yielded);
            }
            let n = match source.try_read(scratch) {
                Ok(0) => {
                    self.source_done = true;
                    continue;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(PipeState::WantsRead),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            moved += n;
            let mut sent = 0;
            while sent < n {
                match destination.try_write(&scratch[sent..n]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(w) => sent += w,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            self.bytes += sent as u64;
            if sent < n {
                // The destination is full: keep the rest and stop reading until it drains.
                self.leftover = Some(Box::new(Leftover {
                    bytes: scratch[sent..n].to_vec(),
                    written: 0,
                }));
                return Ok(PipeState::WantsWrite);
            }
            if until == ReadUntil::ShortRead && n < scratch.len() {
                return Ok(PipeState::WantsRead);
            }
        }
    }

    /// Writes the leftover out; `Ok(true)` once it is empty (and its memory given back).
    fn flush_leftover(&mut self, destination: &mut impl NonBlockingIo) -> io::Result<bool> {
        let Some(left) = self.leftover.as_mut() else {
            return Ok(true);
        };
        while left.written < left.bytes.len() {
            match destination.try_write(&left.bytes[left.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    left.written += n;
                    self.bytes += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.leftover = None;
        Ok(true)
    }
}

/// Whether an I/O error means the peer reset or vanished (as opposed to a local fault).
pub fn is_peer_reset(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// An in-memory endpoint: reads come from `input` in scripted chunks, writes go to
    /// `output` up to `room` bytes at a time.
    #[derive(Default)]
    struct Fake {
        input: VecDeque<Option<Vec<u8>>>,
        eof: bool,
        output: Vec<u8>,
        room: usize,
        shut: bool,
    }

    impl NonBlockingIo for Fake {
        fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.input.front_mut() {
                None if self.eof => Ok(0),
                None | Some(None) => {
                    self.input.pop_front();
                    Err(io::ErrorKind::WouldBlock.into())
                }
                Some(Some(chunk)) => {
                    let n = chunk.len().min(buf.len());
                    buf[..n].copy_from_slice(&chunk[..n]);
                    chunk.drain(..n);
                    if chunk.is_empty() {
                        self.input.pop_front();
                    }
                    Ok(n)
                }
            }
        }
        fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.shut {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            if self.room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.output.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn shutdown_write(&mut self) -> io::Result<()> {
            self.shut = true;
            Ok(())
        }
    }

    #[test]
    fn moves_bytes_and_passes_fin_on() {
        let mut src = Fake {
            input: VecDeque::from([Some(b"hello ".to_vec()), Some(b"world".to_vec())]),
            eof: true,
            ..Fake::default()
        };
        let mut dst = Fake {
            room: usize::MAX,
            ..Fake::default()
        };
        let mut pipe = Pipe::with_leftover(b">".to_vec());
        let mut scratch = [0u8; 4];
        let state = pipe
            .pump(&mut src, &mut dst, &mut scratch, ReadUntil::WouldBlock)
            .expect("pump");
        assert_eq!(state, PipeState::Finished);
        assert_eq!(dst.output, b">hello world");
        assert!(dst.shut);
        assert_eq!(pipe.bytes(), 12);
    }

    #[test]
    fn a_full_destination_stops_reading_and_idle_pipes_hold_no_buffer() {
        let mut src = Fake {
            input: VecDeque::from([Some(vec![7u8; 100]), None]),
            ..Fake::default()
        };
        let mut dst = Fake {
            room: 30,
            ..Fake::default()
        };
        let mut pipe = Pipe::default();
        let mut scratch = [0u8; 64];
        assert_eq!(
            pipe.pump(&mut src, &mut dst, &mut scratch, ReadUntil::WouldBlock)
                .expect("pump"),
            PipeState::WantsWrite
        );
        // 64 read, 30 written, 34 kept; the other 36 stay unread in the source.
        assert_eq!(pipe.buffered().0, 34);
        assert_eq!(
            src.input.front().and_then(|c| c.as_ref()).map(Vec::len),
            Some(36)
        );
        dst.room = usize::MAX;
        assert_eq!(
            pipe.pump(&mut src, &mut dst, &mut scratch, ReadUntil::WouldBlock)
                .expect("pump"),
            PipeState::WantsRead
        );
        assert_eq!(dst.output, vec![7u8; 100]);
        assert_eq!(pipe.buffered(), (0, 0));
    }

    #[test]
    fn budget_yields_between_chunks() {
        let chunks = (0..(PUMP_BUDGET / 1024 + 2)).map(|_| Some(vec![1u8; 1024]));
        let mut src = Fake {
            input: chunks.collect(),
            ..Fake::default()
        };
        let mut dst = Fake {
            room: usize::MAX,
            ..Fake::default()
        };
        let mut pipe = Pipe::default();
        let mut scratch = [0u8; 1024];
        assert_eq!(
            pipe.pump(&mut src, &mut dst, &mut scratch, ReadUntil::WouldBlock)
                .expect("pump"),
            PipeState::Yielded
        );
        assert_eq!(dst.output.len(), PUMP_BUDGET);
    }

    #[test]
    fn short_reads_end_a_level_triggered_pump_without_another_read() {
        let mut src = Fake {
            input: VecDeque::from([Some(b"small".to_vec()), Some(b"more".to_vec())]),
            ..Fake::default()
        };
        let mut dst = Fake {
            room: usize::MAX,
            ..Fake::default()
        };
        let mut pipe = Pipe::default();
        let mut scratch = [0u8; 64];
        let state = pipe.pump(&mut src, &mut dst, &mut scratch, ReadUntil::ShortRead);
        assert_eq!(state.expect("pump"), PipeState::WantsRead);
        assert_eq!(dst.output, b"small");
        assert_eq!(src.input.len(), 1, "the second chunk was not read");
        assert!(std::mem::size_of::<Pipe>() <= 24);
    }

    #[test]
    fn write_errors_end_the_session() {
        let mut src = Fake {
            input: VecDeque::from([Some(b"x".to_vec())]),
            ..Fake::default()
        };
        let mut dst = Fake {
            room: 10,
            shut: true,
            ..Fake::default()
        };
        let err = Pipe::default()
            .pump(&mut src, &mut dst, &mut [0u8; 8], ReadUntil::WouldBlock)
            .expect_err("broken pipe");
        assert!(is_peer_reset(&err));
    }
}
