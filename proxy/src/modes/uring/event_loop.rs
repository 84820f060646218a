//! One io_uring event loop: its ring, its sessions, and the state machine that moves each
//! session on as its operations complete.
//!
//! A session's life in operations: accepted into a direct slot; single-shot receives feed
//! the handshake (one at a time, so a pipelining client is held back while the target is
//! dialed); replies are sends of owned bytes; the target is connected on an ordinary
//! non-blocking socket (its local address is BND.ADDR, which a direct socket cannot report),
//! polled until writable, then moved into a direct slot; after the success reply, one
//! multishot receive per side and sends straight from the filled buffers. A direction whose
//! destination has not taken `HIGH_WATER` buffers stops being received from until it has
//! (backpressure); its bytes wait in the kernel's socket buffers meanwhile.
//!
//! A session is freed only when none of its operations is in flight: closing cancels them
//! all, and their last completions come back before the slab entry goes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{eventfd, EventfdFlags};
use slab::Slab;

use super::sys::{Completion, Ring, BUF_LEN};
use super::Shared;
use crate::config::access_log::SessionTrail;
use crate::config::LoopConfig;
use crate::modes::session::{self, Dialer, EXHAUSTION_BACKOFF};
use crate::net::connect;
use crate::net::limits;
use crate::net::resolver::{Resolved, Resolver};
use crate::net::BurstLog;
use crate::shutdown::Shutdown;
use crate::socks5::{Command, Failure, Handshake, Step, TargetAddr};

/// Submission queue entries per ring.
const SQ_ENTRIES: u32 = 1024;
/// Buffers one direction may have waiting for its destination before it stops receiving.
const HIGH_WATER: usize = 4;
/// Direct slots kept free (at most), so that sessions being dialed can still install their
/// target; an eighth of the table when that is less.
pub(super) const SLOT_RESERVE: u32 = 64;
/// Direct slots per ring at most (the kernel's IORING_MAX_FIXED_FILES).
pub(super) const MAX_SLOTS: u64 = 1 << 20;
/// Completions one wait gathers at most, when a batch window is set.
const BATCH: usize = 64;

static TABLE_FULL: BurstLog =
    BurstLog::new("io_uring direct descriptor table full; connection refused");

/// What an operation was for: the low byte of its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    /// Accepting clients (the token's id is the accept generation).
    Accept = 1,
    /// The eventfd: resolver results and shutdown.
    Wake,
    /// Cancels, closes, socket options, shutdowns: their completions need nothing.
    Ignore,
    HandshakeRecv,
    ReplySend,
    ConnectPoll,
    Install,
    LeftoverSend,
    /// Client → target: receive on the client.
    RecvUp,
    /// Target → client: receive on the target.
    RecvDown,
    /// Client → target: send on the target.
    SendUp,
    /// Target → client: send on the client.
    SendDown,
}

#[cfg(test)]
impl Op {
    const ALL: [Op; 12] = [
        Op::Accept,
        Op::Wake,
        Op::Ignore,
        Op::HandshakeRecv,
        Op::ReplySend,
        Op::ConnectPoll,
        Op::Install,
        Op::LeftoverSend,
        Op::RecvUp,
        Op::RecvDown,
        Op::SendUp,
        Op::SendDown,
    ];
}

/// `id:32 | key:24 | op:8`.
fn token(op: Op, key: usize, id: u32) -> u64 {
    (u64::from(id) << 32) | (((key as u64) & 0xff_ffff) << 8) | op as u64
}

fn untoken(token: u64) -> Option<(Op, usize, u32)> {
    let op = match token & 0xff {
        1 => Op::Accept,
        2 => Op::Wake,
        3 => Op::Ignore,
        4 => Op::HandshakeRecv,
        5 => Op::ReplySend,
        6 => Op::ConnectPoll,
        7 => Op::Install,
        8 => Op::LeftoverSend,
        9 => Op::RecvUp,
        10 => Op::RecvDown,
        11 => Op::SendUp,
        12 => Op::SendDown,
        _ => return None,
    };
    Some((
        op,
        ((token >> 8) & 0xff_ffff) as usize,
        (token >> 32) as u32,
    ))
}

const IGNORE: u64 = Op::Ignore as u64;

/// Which way bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Up,
    Down,
}

impl Way {
    fn recv_op(self) -> Op {
        match self {
            Way::Up => Op::RecvUp,
            Way::Down => Op::RecvDown,
        }
    }
    fn send_op(self) -> Op {
        match self {
            Way::Up => Op::SendUp,
            Way::Down => Op::SendDown,
        }
    }
}

/// Received bytes in a provided buffer, waiting to be sent on.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    bid: u16,
    /// Where the unsent bytes start and end in the buffer (≤ `BUF_LEN`, which fits).
    start: u16,
    end: u16,
}

/// One direction of an established session.
#[derive(Default)]
struct Direction {
    /// The chunk being sent.
    sending: Option<Chunk>,
    /// Chunks received while one was being sent; allocated only while there are some.
    waiting: VecDeque<Chunk>,
    /// A multishot receive is in flight.
    receiving: bool,
    /// Its cancel was asked for (backpressure).
    pausing: bool,
    /// The source ended (EOF).
    eof: bool,
    /// EOF passed on: the destination's sending side is shut down.
    done: bool,
}

impl Direction {
    fn held(&self) -> usize {
        usize::from(self.sending.is_some()) + self.waiting.len()
    }
}

struct Relay {
    up: Direction,
    down: Direction,
    /// When bytes last moved, in milliseconds of the loop's clock (kept only with an idle
    /// timeout).
    last_activity: u32,
    /// The idle timeout it started with, in milliseconds (0: none): a reload does not change
    /// it for established sessions.
    idle_ms: u32,
}

impl Relay {
    fn way(&mut self, way: Way) -> &mut Direction {
        match way {
            Way::Up => &mut self.up,
            Way::Down => &mut self.down,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NegotiationStep {
    /// Receiving the greeting, authentication and request (after any reply is sent).
    Reading,
    Resolving,
    Connecting,
    /// Moving the connected target into a direct slot.
    Installing,
    /// Sending the success reply, then relay.
    Replying,
    /// Sending what the client sent past its request to the target, then relay.
    Forwarding,
    /// Sending a failure reply, then close.
    Closing,
}

/// Handshake and connect state, boxed: freed once the relay starts.
struct Negotiation {
    handshake: Handshake,
    peer: Option<SocketAddr>,
    out: Vec<u8>,
    step: NegotiationStep,
    /// A reply is being sent.
    replying: bool,
    dialer: Option<Dialer>,
    /// The target being connected, as an ordinary descriptor.
    connecting: Option<TcpStream>,
    bound: Option<SocketAddr>,
}

enum Phase {
    Negotiating(Box<Negotiation>),
    Relaying(Relay),
}

/// A session from accept to close.
struct Session {
    /// Tells successive sessions in one slab entry apart (part of every token).
    id: u32,
    client: u32,
    target: Option<u32>,
    /// Operations of this session whose last completion has not come.
    in_flight: u16,
    closing: bool,
    /// The timer entry that is current for this session; older entries are ignored.
    timer_ticket: u32,
    phase: Phase,
}

/// Where accepting stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accepting {
    /// An accept is in flight.
    Armed,
    /// Its cancel was asked for.
    Cancelling,
    /// No accept in flight.
    Idle,
}

/// One thread's loop: its ring and its sessions.
pub(super) struct EventLoop<'a> {
    ring: Ring,
    listener: Option<TcpListener>,
    accepting: Accepting,
    accept_generation: u32,
    accept_paused_until: Option<Instant>,
    sessions: Slab<Session>,
    next_id: u32,
    slots_used: u32,
    /// Whether this loop counts itself in `Shared::rings_with_room`.
    has_room: bool,
    /// Receives that ended for want of buffers: (key, id, op), re-armed when buffers return.
    starved: Vec<(usize, u32, Op)>,
    timers: BinaryHeap<Reverse<(Instant, usize, u32, u32)>>,
    next_ticket: u32,
    resolved_tx: Sender<Resolved>,
    resolved_rx: Receiver<Resolved>,
    waker: Arc<OwnedFd>,
    epoch: Instant,
    /// Refreshed once a turn: a reload reaches sessions accepted after it.
    config: LoopConfig,
    shared: &'a Shared,
    /// What the access log will say of each session, by key: only while the log is on, so
    /// that sessions do not grow by a pointer for it. It counts the bytes relayed itself.
    trails: HashMap<usize, SessionTrail>,
    /// What a session without a trail writes to (nothing sticks: it stays empty).
    no_trail: SessionTrail,
}

impl<'a> EventLoop<'a> {
    /// Sets up a loop on `listener`: its ring (on the calling thread, which must be the one
    /// that serves), direct table and buffers.
    pub(super) fn new(
        listener: TcpListener,
        config: LoopConfig,
        shutdown: &Shutdown,
        shared: &'a Shared,
    ) -> io::Result<Self> {
        let slots = config
            .uring_slots
            .map_or_else(|| limits::nofile_limit().min(MAX_SLOTS), u64::from)
            .max(8) as u32;
        let ring = Ring::new(SQ_ENTRIES, slots)?;
        let waker = Arc::new(eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?);
        {
            let waker = waker.clone();
            shutdown.on_trigger(move || wake(&waker));
        }
        let (resolved_tx, resolved_rx) = mpsc::channel();
        let mut event_loop = EventLoop {
            ring,
            listener: Some(listener),
            accepting: Accepting::Idle,
            accept_generation: 0,
            accept_paused_until: None,
            sessions: Slab::new(),
            next_id: 0,
            slots_used: 0,
            has_room: true,
            starved: Vec::new(),
            timers: BinaryHeap::new(),
            next_ticket: 0,
            resolved_tx,
            resolved_rx,
            waker,
            epoch: Instant::now(),
            config,
            shared,
            trails: HashMap::new(),
            no_trail: SessionTrail::default(),
        };
        tracing::debug!("io_uring loop: {slots} direct slots");
        event_loop.arm_wake()?;
        Ok(event_loop)
    }
}

fn wake(fd: &OwnedFd) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// The errno of a negative result.
fn errno(result: i32) -> io::Error {
    io::Error::from_raw_os_error(-result)
}

impl EventLoop<'_> {
    /// Serves until shutdown and the grace period are over.
    pub(super) fn serve(&mut self, shutdown: &Shutdown) -> io::Result<()> {
        let mut completions = Vec::with_capacity(1024);
        let mut grace_deadline: Option<Instant> = None;
        loop {
            if grace_deadline.is_none() && shutdown.is_triggered() {
                self.listener = None;
                grace_deadline = Some(Instant::now() + self.config.grace);
                session::log_draining(self.config.grace, self.sessions.len());
            }
            if let Some(deadline) = grace_deadline {
                if self.sessions.is_empty() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    session::log_grace_over(self.sessions.len());
                    let keys: Vec<usize> = self.sessions.iter().map(|(key, _)| key).collect();
                    for key in keys {
                        self.trail(key)
                            .ended_because(&"server shut down (grace period over)");
                        self.close(key, false)?;
                    }
                    return Ok(());
                }
            }
            self.sync_accept()?;
            let timeout = self.next_timeout(grace_deadline);
            self.ring.wait(timeout, self.config.batch_window, BATCH)?;
            // After the wait: a connection that woke it is served with a reload that came
            // while it waited.
            self.config.refresh();
            completions.clear();
            self.ring.reap(&mut completions);
            for completion in completions.drain(..) {
                self.dispatch(completion)?;
            }
            self.rearm_starved()?;
            self.ring.publish();
            self.fire_timers()?;
        }
    }

    fn next_timeout(&self, grace_deadline: Option<Instant>) -> Option<Duration> {
        let now = Instant::now();
        [
            self.timers.peek().map(|Reverse((at, ..))| *at),
            self.accept_paused_until,
            grace_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| at.saturating_duration_since(now))
    }

    fn clock_ms(&self) -> u32 {
        self.epoch.elapsed().as_millis() as u32
    }

    fn arm_timer(&mut self, key: usize, at: Instant) {
        // Zero means "no timer"; skip it when the counter wraps.
        self.next_ticket = self.next_ticket.wrapping_add(1).max(1);
        let session = &mut self.sessions[key];
        session.timer_ticket = self.next_ticket;
        self.timers
            .push(Reverse((at, key, session.id, self.next_ticket)));
    }

    /// Pushes an operation of session `key` (counted until its last completion).
    fn session_op(
        &mut self,
        key: usize,
        op: Op,
        push: impl FnOnce(&mut Ring, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let session = &mut self.sessions[key];
        push(&mut self.ring, token(op, key, session.id))?;
        session.in_flight += 1;
        Ok(())
    }

    // ---- accepting ----

    /// Whether a client just accepted (its slot counted) can have a target too, with the
    /// reserve kept for sessions being dialed.
    fn room_for_a_target(&self) -> bool {
        let reserve = SLOT_RESERVE.min(self.ring.slots() / 8);
        self.slots_used + 1 + reserve <= self.ring.slots()
    }

    /// Arms or cancels the accept to match what is wanted now.
    fn sync_accept(&mut self) -> io::Result<()> {
        if self
            .accept_paused_until
            .is_some_and(|at| at <= Instant::now())
        {
            self.accept_paused_until = None;
        }
        let has_room = self.room_for_a_target();
        if has_room != self.has_room {
            self.has_room = has_room;
            let rings = &self.shared.rings_with_room;
            if has_room {
                rings.fetch_add(1, Ordering::Relaxed);
            } else {
                rings.fetch_sub(1, Ordering::Relaxed);
            }
        }
        // A full loop leaves newcomers to loops with room; when every loop is full, it
        // accepts them to refuse them (close) at once rather than leave them waiting in the
        // backlog.
        let wanted = self.listener.is_some()
            && self.accept_paused_until.is_none()
            && (has_room || self.shared.rings_with_room.load(Ordering::Relaxed) == 0);
        match (wanted, self.accepting) {
            (true, Accepting::Idle) => {
                let Some(listener) = &self.listener else {
                    return Ok(());
                };
                self.accept_generation = self.accept_generation.wrapping_add(1);
                let token = token(Op::Accept, 0, self.accept_generation);
                self.ring.accept_one(listener.as_raw_fd(), token)?;
                self.accepting = Accepting::Armed;
            }
            (false, Accepting::Armed) => {
                let token = token(Op::Accept, 0, self.accept_generation);
                self.ring.cancel(token, IGNORE)?;
                self.accepting = Accepting::Cancelling;
            }
            _ => {}
        }
        Ok(())
    }

    fn on_accept(&mut self, completion: Completion, generation: u32) -> io::Result<()> {
        let current = generation == self.accept_generation;
        if current && !completion.more {
            self.accepting = Accepting::Idle;
        }
        if completion.result < 0 {
            let err = errno(completion.result);
            match -completion.result {
                libc::ECANCELED => {}
                libc::ENFILE => {
                    // The kernel accepted the connection, found no free slot and closed it.
                    TABLE_FULL.hit(&format_args!(
                        "{} sessions open, {} of {} slots used",
                        self.sessions.len(),
                        self.slots_used,
                        self.ring.slots()
                    ));
                    self.pause_accepting();
                }
                _ if limits::is_resource_exhaustion(&err) => {
                    tracing::warn!("accept: {err}");
                    self.pause_accepting();
                }
                _ if limits::is_transient_accept_error(&err) => {}
                _ => {
                    tracing::error!("accept failed: {err}");
                    self.pause_accepting();
                }
            }
            return Ok(());
        }
        let slot = completion.result as u32;
        self.slots_used += 1;
        let peer = completion.held.as_ref().and_then(|held| held.peer());
        let open = self.shared.sessions.load(Ordering::Relaxed);
        let admitted = self.listener.is_some()
            && peer.is_some_and(|peer| session::admit(&self.config, peer, open));
        if admitted && !self.room_for_a_target() {
            crate::metrics::refused(crate::metrics::Refusal::ModeLimit);
            TABLE_FULL.hit(&format_args!(
                "{} sessions open, {} of {} slots used",
                self.sessions.len(),
                self.slots_used,
                self.ring.slots()
            ));
        }
        if !admitted || !self.room_for_a_target() {
            self.ring.close(slot, false, IGNORE)?;
            self.slots_used -= 1;
            return Ok(());
        }
        self.next_id = self.next_id.wrapping_add(1);
        let key = self.sessions.insert(Session {
            id: self.next_id,
            client: slot,
            target: None,
            in_flight: 0,
            closing: false,
            timer_ticket: 0,
            phase: Phase::Negotiating(Box::new(Negotiation {
                handshake: peer.map_or_else(
                    || Handshake::new(self.config.users.clone()),
                    |peer| session::new_handshake(&self.config, peer),
                ),
                peer,
                out: Vec::new(),
                step: NegotiationStep::Reading,
                replying: false,
                dialer: None,
                connecting: None,
                bound: None,
            })),
        });
        self.shared.sessions.fetch_add(1, Ordering::Relaxed);
        if let Some(peer) = peer.filter(|_| SessionTrail::wanted(self.config.access_log())) {
            self.trails
                .insert(key, SessionTrail::begin(self.config.access_log(), peer));
        }
        self.arm_timer(key, Instant::now() + self.config.handshake_timeout);
        self.session_op(key, Op::HandshakeRecv, |ring, token| {
            ring.recv_one(slot, token)
        })
    }

    fn pause_accepting(&mut self) {
        self.accept_paused_until = Some(Instant::now() + EXHAUSTION_BACKOFF);
    }

    // ---- completions ----

    fn dispatch(&mut self, completion: Completion) -> io::Result<()> {
        let Some((op, key, id)) = untoken(completion.token) else {
            // The final cancel of the ring's drop, or a token this loop never made.
            return Ok(());
        };
        match op {
            Op::Ignore => {
                if completion.result < 0 {
                    tracing::trace!("io_uring housekeeping: {}", errno(completion.result));
                }
                return Ok(());
            }
            Op::Accept => return self.on_accept(completion, id),
            Op::Wake => return self.on_wake(),
            _ => {}
        }
        let Some(session) = self.sessions.get_mut(key).filter(|s| s.id == id) else {
            // Cannot happen (a session is freed only when nothing of it is in flight), but a
            // buffer must never be lost.
            if let Some(bid) = completion.buffer {
                self.ring.recycle(bid);
            }
            return Ok(());
        };
        if !completion.more {
            session.in_flight -= 1;
        }
        if session.closing {
            if let Some(bid) = completion.buffer {
                self.ring.recycle(bid);
            }
            let way = match op {
                Op::SendUp => Some(Way::Up),
                Op::SendDown => Some(Way::Down),
                _ => None,
            };
            if let (Some(way), Phase::Relaying(relay)) = (way, &mut session.phase) {
                // The buffer it was sending from is the kernel's no more.
                if let Some(chunk) = relay.way(way).sending.take() {
                    self.ring.recycle(chunk.bid);
                }
            }
            if op == Op::Install {
                if let Some(slot) = completion.held.as_ref().and_then(|h| h.installed_slot()) {
                    if completion.result == 1 {
                        self.ring.close(slot, false, IGNORE)?;
                    }
                }
            }
            self.free_if_done(key);
            return Ok(());
        }
        match op {
            Op::HandshakeRecv => self.on_handshake_recv(key, completion),
            Op::ReplySend | Op::LeftoverSend => self.on_reply_sent(key, op, completion),
            Op::ConnectPoll => self.on_connect_poll(key, completion),
            Op::Install => self.on_install(key, completion),
            Op::RecvUp => self.on_recv(key, Way::Up, completion),
            Op::RecvDown => self.on_recv(key, Way::Down, completion),
            Op::SendUp => self.on_sent(key, Way::Up, completion),
            Op::SendDown => self.on_sent(key, Way::Down, completion),
            Op::Ignore | Op::Accept | Op::Wake => Ok(()),
        }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let fd = self.waker.as_raw_fd();
        self.ring.read_counter(fd, token(Op::Wake, 0, 0))
    }

    fn on_wake(&mut self) -> io::Result<()> {
        while let Ok((key, id, result)) = self.resolved_rx.try_recv() {
            if self
                .sessions
                .get(key)
                .is_some_and(|s| s.id == id && !s.closing)
            {
                self.on_resolved(key, result)?;
            }
        }
        // Re-armed even after shutdown: the loop keeps running for the grace period.
        self.arm_wake()
    }

    // ---- negotiation ----

    /// The session's access-log trail (one that keeps nothing while the log is off).
    fn trail(&mut self, key: usize) -> &mut SessionTrail {
        if self.trails.is_empty() {
            // The log is off (or no session has a trail): not even a hash.
            return &mut self.no_trail;
        }
        match self.trails.get_mut(&key) {
            Some(trail) => trail,
            None => &mut self.no_trail,
        }
    }

    fn negotiation(&mut self, key: usize) -> Option<&mut Negotiation> {
        match &mut self.sessions[key].phase {
            Phase::Negotiating(negotiation) => Some(negotiation),
            Phase::Relaying(_) => None,
        }
    }

    fn on_handshake_recv(&mut self, key: usize, completion: Completion) -> io::Result<()> {
        match (completion.result, completion.buffer) {
            (n, Some(bid)) if n > 0 => {
                let bytes = self.ring.buffer(bid, n as usize);
                if let Phase::Negotiating(negotiation) = &mut self.sessions[key].phase {
                    negotiation.handshake.receive(bytes);
                }
                self.ring.recycle(bid);
                self.advance_handshake(key)
            }
            (n, bid) => {
                if let Some(bid) = bid {
                    self.ring.recycle(bid);
                }
                if n == -libc::ENOBUFS {
                    self.starved
                        .push((key, self.sessions[key].id, Op::HandshakeRecv));
                    return Ok(());
                }
                if n < 0 {
                    tracing::debug!("handshake ended: {}", errno(n));
                    self.trail(key).ended_because(&errno(n));
                } else {
                    self.trail(key)
                        .ended_because(&"client closed during the handshake");
                }
                self.close(key, false)
            }
        }
    }

    fn advance_handshake(&mut self, key: usize) -> io::Result<()> {
        let deadline = Instant::now() + self.config.connect_timeout;
        let session = &mut self.sessions[key];
        let Phase::Negotiating(negotiation) = &mut session.phase else {
            return Ok(());
        };
        let step = negotiation.handshake.step(&mut negotiation.out);
        if let Some(trail) = self.trails.get_mut(&key) {
            match &step {
                Step::Close(err) => trail.handshake_failed(&negotiation.handshake, err),
                Step::Request(request) => trail.requested(request),
                Step::NeedInput => {}
            }
        }
        match step {
            Step::NeedInput => {
                if negotiation.out.is_empty() {
                    let client = self.sessions[key].client;
                    self.session_op(key, Op::HandshakeRecv, |ring, token| {
                        ring.recv_one(client, token)
                    })
                } else {
                    self.send_reply(key)
                }
            }
            Step::Close(err) => {
                tracing::debug!("handshake ended: {err}");
                negotiation.step = NegotiationStep::Closing;
                self.send_reply(key)
            }
            Step::Request(request) if session::proxied_client_refused(&self.config, &request) => {
                self.fail_request(key, Failure::DeniedByRule)
            }
            Step::Request(request) if request.command != Command::Connect => {
                // BIND and UDP ASSOCIATE are served by the async mode only.
                self.fail_request(key, Failure::CommandNotSupported)
            }
            Step::Request(request) => {
                match request.target {
                    TargetAddr::Ip(addr) => {
                        negotiation.dialer = Some(Dialer::new(vec![addr]));
                        negotiation.step = NegotiationStep::Connecting;
                    }
                    TargetAddr::Domain(name, port) => {
                        negotiation.step = NegotiationStep::Resolving;
                        let waker = self.waker.clone();
                        Resolver::global().resolve_for_session(
                            &name,
                            port,
                            (key, self.sessions[key].id),
                            self.resolved_tx.clone(),
                            move || wake(&waker),
                        );
                    }
                }
                self.arm_timer(key, deadline);
                // A pipelining client's method choice (and auth reply) go out meanwhile.
                self.send_reply(key)?;
                if self.negotiation(key).map(|n| n.step) == Some(NegotiationStep::Connecting) {
                    self.connect_next(key)?;
                }
                Ok(())
            }
        }
    }

    /// Sends what the handshake wrote to `out`; its completion moves the step on.
    fn send_reply(&mut self, key: usize) -> io::Result<()> {
        let client = self.sessions[key].client;
        let Some(negotiation) = self.negotiation(key) else {
            return Ok(());
        };
        if negotiation.replying {
            // One send at a time: its completion sends what was queued since.
            return Ok(());
        }
        if negotiation.out.is_empty() {
            return self.after_reply(key);
        }
        let bytes = std::mem::take(&mut negotiation.out);
        negotiation.replying = true;
        self.session_op(key, Op::ReplySend, |ring, token| {
            ring.send_bytes(client, bytes, token)
        })
    }

    fn fail_request(&mut self, key: usize, failure: Failure) -> io::Result<()> {
        self.trail(key).failed(failure);
        let Some(negotiation) = self.negotiation(key) else {
            return Ok(());
        };
        let _ = negotiation
            .handshake
            .request_failed(failure, &mut negotiation.out);
        negotiation.step = NegotiationStep::Closing;
        // A connect socket stays open until the poll or install on it has completed (an
        // entry not yet submitted names it by number); the session's end closes it.
        session::log_request_failed(negotiation.peer, None, failure);
        self.send_reply(key)
    }

    fn on_reply_sent(&mut self, key: usize, op: Op, completion: Completion) -> io::Result<()> {
        let expected = match &completion.held {
            Some(super::sys::Held::Bytes(bytes)) => bytes.len() as i32,
            _ => -1,
        };
        if completion.result != expected {
            if completion.result < 0 {
                tracing::debug!("reply not sent: {}", errno(completion.result));
            }
            let reset = completion.result == -libc::ECONNRESET || completion.result == -libc::EPIPE;
            self.trail(key).ended_because(&format_args!(
                "reply not sent: {}",
                errno(completion.result.min(-1))
            ));
            return self.close(key, reset);
        }
        if op == Op::LeftoverSend {
            self.trail(key).count(true, expected as u64);
            return self.start_relay(key);
        }
        if let Some(negotiation) = self.negotiation(key) {
            negotiation.replying = false;
            if !negotiation.out.is_empty() {
                // A failure reply queued while the last one was in flight.
                return self.send_reply(key);
            }
        }
        self.after_reply(key)
    }

    /// What follows a sent reply, by step.
    fn after_reply(&mut self, key: usize) -> io::Result<()> {
        let Some(negotiation) = self.negotiation(key) else {
            return Ok(());
        };
        match negotiation.step {
            NegotiationStep::Reading => self.advance_handshake(key),
            NegotiationStep::Closing => self.close(key, false),
            NegotiationStep::Replying => {
                let leftover = negotiation.handshake.take_leftover();
                if leftover.is_empty() {
                    return self.start_relay(key);
                }
                negotiation.step = NegotiationStep::Forwarding;
                let Some(target) = self.sessions[key].target else {
                    return self.close(key, false);
                };
                self.session_op(key, Op::LeftoverSend, |ring, token| {
                    ring.send_bytes(target, leftover, token)
                })
            }
            // Waiting on something else (a resolution, a connect): it moves on from there.
            _ => Ok(()),
        }
    }

    fn on_resolved(&mut self, key: usize, result: io::Result<Vec<SocketAddr>>) -> io::Result<()> {
        let Some(negotiation) = self.negotiation(key) else {
            return Ok(());
        };
        if negotiation.step != NegotiationStep::Resolving {
            return Ok(());
        }
        match result {
            // An empty list fails in the dialer, with the same DnsFailure.
            Ok(addrs) => {
                negotiation.dialer = Some(Dialer::new(addrs));
                negotiation.step = NegotiationStep::Connecting;
                self.connect_next(key)
            }
            Err(_) => self.fail_request(key, Failure::DnsFailure),
        }
    }

    /// Starts connecting to the next allowed address, or fails the request.
    fn connect_next(&mut self, key: usize) -> io::Result<()> {
        let acl = &self.config.acl;
        let Phase::Negotiating(negotiation) = &mut self.sessions[key].phase else {
            return Ok(());
        };
        let Some(dialer) = negotiation.dialer.as_mut() else {
            return self.fail_request(key, Failure::Other);
        };
        while let Some(addr) = dialer.next_allowed(acl) {
            match connect::start_connect(addr) {
                Ok(stream) => {
                    let fd = stream.as_raw_fd();
                    negotiation.connecting = Some(stream);
                    return self.session_op(key, Op::ConnectPoll, |ring, token| {
                        ring.poll_writable(fd, token)
                    });
                }
                Err(failure) => dialer.failed(failure),
            }
        }
        let failure = dialer.failure();
        self.fail_request(key, failure)
    }

    fn on_connect_poll(&mut self, key: usize, completion: Completion) -> io::Result<()> {
        let Some(negotiation) = self.negotiation(key) else {
            return Ok(());
        };
        if negotiation.step != NegotiationStep::Connecting {
            return Ok(());
        }
        let Some(stream) = negotiation.connecting.as_ref() else {
            return Ok(());
        };
        let connected = if completion.result < 0 {
            Err(connect::failure_of(&errno(completion.result)))
        } else {
            connect::connect_result(stream).and_then(|()| connect::bound_addr(stream))
        };
        match connected {
            Ok(bound) => {
                let _ = stream.set_nodelay(true);
                let fd = stream.as_raw_fd();
                let connected = stream.peer_addr().ok();
                negotiation.bound = Some(bound);
                negotiation.step = NegotiationStep::Installing;
                self.trail(key).connected_to(connected);
                self.session_op(key, Op::Install, |ring, token| ring.install(fd, token))
            }
            Err(failure) => {
                negotiation.connecting = None;
                if let Some(dialer) = negotiation.dialer.as_mut() {
                    dialer.failed(failure);
                }
                self.connect_next(key)
            }
        }
    }

    fn on_install(&mut self, key: usize, completion: Completion) -> io::Result<()> {
        let slot = completion
            .held
            .as_ref()
            .and_then(|held| held.installed_slot())
            .filter(|_| completion.result == 1);
        let client = self.sessions[key].client;
        let Some(negotiation) = self.negotiation(key) else {
            return Ok(());
        };
        if negotiation.step != NegotiationStep::Installing {
            // Timed out meanwhile: the failure reply is on its way.
            if let Some(slot) = slot {
                self.ring.close(slot, false, IGNORE)?;
            }
            return Ok(());
        }
        // The socket lives on in the direct slot (or failed to move there): drop the
        // ordinary descriptor either way.
        negotiation.connecting = None;
        let Some(slot) = slot else {
            TABLE_FULL.hit(&format_args!(
                "target not installed: {}",
                errno(completion.result.min(-1))
            ));
            return self.fail_request(key, Failure::ResourceExhausted);
        };
        let bound = negotiation
            .bound
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        match negotiation
            .handshake
            .request_granted(bound, &mut negotiation.out)
        {
            Ok(()) => {
                negotiation.step = NegotiationStep::Replying;
                self.trail(key).granted(None);
            }
            Err(err) => {
                tracing::debug!("handshake ended: {err}");
                negotiation.step = NegotiationStep::Closing;
            }
        }
        self.sessions[key].target = Some(slot);
        self.slots_used += 1;
        self.ring.set_nodelay(client, IGNORE)?;
        self.send_reply(key)
    }

    // ---- relay ----

    fn start_relay(&mut self, key: usize) -> io::Result<()> {
        let last_activity = self.clock_ms();
        let session = &mut self.sessions[key];
        let Some(target) = session.target else {
            return self.close(key, false);
        };
        let client = session.client;
        session.phase = Phase::Relaying(Relay {
            up: Direction {
                receiving: true,
                ..Direction::default()
            },
            down: Direction {
                receiving: true,
                ..Direction::default()
            },
            last_activity,
            idle_ms: self.config.idle_timeout_ms(),
        });
        match self.config.idle_timeout {
            Some(idle) => self.arm_timer(key, Instant::now() + idle),
            None => self.sessions[key].timer_ticket = 0,
        }
        self.session_op(key, Op::RecvUp, |ring, token| {
            ring.recv_multi(client, token)
        })?;
        self.session_op(key, Op::RecvDown, |ring, token| {
            ring.recv_multi(target, token)
        })
    }

    /// The slots a direction receives on and sends to.
    fn ends(&self, key: usize, way: Way) -> (u32, u32) {
        let session = &self.sessions[key];
        let target = session.target.unwrap_or(u32::MAX);
        match way {
            Way::Up => (session.client, target),
            Way::Down => (target, session.client),
        }
    }

    fn relay(&mut self, key: usize) -> Option<&mut Relay> {
        match &mut self.sessions[key].phase {
            Phase::Relaying(relay) => Some(relay),
            Phase::Negotiating(_) => None,
        }
    }

    fn on_recv(&mut self, key: usize, way: Way, completion: Completion) -> io::Result<()> {
        let now = self.clock_ms();
        let id = self.sessions[key].id;
        let Phase::Relaying(relay) = &mut self.sessions[key].phase else {
            if let Some(bid) = completion.buffer {
                self.ring.recycle(bid);
            }
            return Ok(());
        };
        relay.last_activity = now;
        let direction = relay.way(way);
        if !completion.more {
            // Ended, whatever asked it to: a pause in progress has nothing left to cancel,
            // and the receive is armed again once the backlog is sent.
            direction.receiving = false;
            direction.pausing = false;
        }
        match (completion.result, completion.buffer) {
            (n, Some(bid)) if n > 0 => {
                let chunk = Chunk {
                    bid,
                    start: 0,
                    end: n as u16,
                };
                if direction.sending.is_none() {
                    direction.sending = Some(chunk);
                    self.send_chunk(key, way, chunk)?;
                } else {
                    direction.waiting.push_back(chunk);
                }
                let direction = self.relay(key).map(|relay| relay.way(way));
                if let Some(direction) = direction {
                    if direction.held() >= HIGH_WATER && direction.receiving && !direction.pausing {
                        // Backpressure: the destination is behind; stop receiving.
                        direction.pausing = true;
                        let recv = token(way.recv_op(), key, id);
                        self.ring.cancel(recv, IGNORE)?;
                    }
                }
                Ok(())
            }
            (0, bid) => {
                if let Some(bid) = bid {
                    self.ring.recycle(bid);
                }
                direction.eof = true;
                self.pass_eof_if_drained(key, way)
            }
            (n, bid) => {
                if let Some(bid) = bid {
                    self.ring.recycle(bid);
                }
                match -n {
                    libc::ENOBUFS => {
                        self.starved.push((key, id, way.recv_op()));
                        Ok(())
                    }
                    libc::ECANCELED => {
                        direction.pausing = false;
                        self.resume_if_drained(key, way)
                    }
                    _ if n > 0 => Ok(()),
                    errno_value => {
                        let err = io::Error::from_raw_os_error(errno_value);
                        tracing::debug!("session ended: {err}");
                        self.trail(key).ended_because(&err);
                        let reset = errno_value == libc::ECONNRESET || errno_value == libc::EPIPE;
                        self.close(key, reset)
                    }
                }
            }
        }
    }

    fn send_chunk(&mut self, key: usize, way: Way, chunk: Chunk) -> io::Result<()> {
        let (_, to) = self.ends(key, way);
        let (start, end) = (usize::from(chunk.start), usize::from(chunk.end));
        debug_assert!(end <= BUF_LEN);
        self.session_op(key, way.send_op(), |ring, token| {
            ring.send_buffer(to, chunk.bid, start, end - start, token)
        })
    }

    fn on_sent(&mut self, key: usize, way: Way, completion: Completion) -> io::Result<()> {
        let now = self.clock_ms();
        let Phase::Relaying(relay) = &mut self.sessions[key].phase else {
            return Ok(());
        };
        relay.last_activity = now;
        let direction = relay.way(way);
        let Some(mut chunk) = direction.sending.take() else {
            return Ok(());
        };
        if completion.result < 0 {
            self.ring.recycle(chunk.bid);
            let err = errno(completion.result);
            tracing::debug!("session ended: {err}");
            let reset = crate::relay::is_peer_reset(&err);
            self.trail(key).ended_because(&err);
            return self.close(key, reset);
        }
        self.trail(key)
            .count(way == Way::Up, completion.result as u64);
        let Phase::Relaying(relay) = &mut self.sessions[key].phase else {
            return Ok(());
        };
        let direction = relay.way(way);
        chunk.start += completion.result as u16;
        if chunk.start < chunk.end {
            direction.sending = Some(chunk);
            return self.send_chunk(key, way, chunk);
        }
        self.ring.recycle(chunk.bid);
        if let Some(next) = direction.waiting.pop_front() {
            direction.sending = Some(next);
            if direction.waiting.is_empty() {
                // Give the allocation back: an idle session holds no memory but its entry.
                direction.waiting = VecDeque::new();
            }
            return self.send_chunk(key, way, next);
        }
        if direction.eof {
            return self.pass_eof_if_drained(key, way);
        }
        self.resume_if_drained(key, way)
    }

    /// Receives again on a direction that was paused or starved, once its backlog is sent.
    fn resume_if_drained(&mut self, key: usize, way: Way) -> io::Result<()> {
        let (from, _) = self.ends(key, way);
        let Some(relay) = self.relay(key) else {
            return Ok(());
        };
        let direction = relay.way(way);
        if direction.receiving || direction.pausing || direction.eof || direction.held() > 0 {
            return Ok(());
        }
        direction.receiving = true;
        self.session_op(key, way.recv_op(), |ring, token| {
            ring.recv_multi(from, token)
        })
    }

    /// After EOF and the last bytes sent: shuts the destination's sending side; closes the
    /// session once both directions are done.
    fn pass_eof_if_drained(&mut self, key: usize, way: Way) -> io::Result<()> {
        let (_, to) = self.ends(key, way);
        let Some(relay) = self.relay(key) else {
            return Ok(());
        };
        let direction = relay.way(way);
        if !direction.eof || direction.done || direction.held() > 0 {
            return Ok(());
        }
        direction.done = true;
        let finished = relay.up.done && relay.down.done;
        if finished {
            return self.close(key, false);
        }
        self.ring.shutdown_write(to, IGNORE)
    }

    fn rearm_starved(&mut self) -> io::Result<()> {
        if self.starved.is_empty() || self.ring.buffers_with_kernel() == 0 {
            // Nothing came back yet that the kernel has not consumed: re-arming now would
            // only fail again. (`publish` below makes recycled buffers count.)
            if self.starved.is_empty() {
                return Ok(());
            }
            self.ring.publish();
            if self.ring.buffers_with_kernel() == 0 {
                return Ok(());
            }
        }
        for (key, id, op) in std::mem::take(&mut self.starved) {
            let Some(session) = self.sessions.get(key).filter(|s| s.id == id && !s.closing) else {
                continue;
            };
            let client = session.client;
            match op {
                Op::HandshakeRecv => {
                    self.session_op(key, op, |ring, token| ring.recv_one(client, token))?;
                }
                Op::RecvUp | Op::RecvDown => {
                    let way = if op == Op::RecvUp { Way::Up } else { Way::Down };
                    self.resume_if_drained(key, way)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    // ---- timers and close ----

    fn fire_timers(&mut self) -> io::Result<()> {
        let now = Instant::now();
        while let Some(Reverse((at, key, id, ticket))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let clock = self.clock_ms();
            let Some(session) = self.sessions.get_mut(key) else {
                continue;
            };
            if session.id != id || session.timer_ticket != ticket || session.closing {
                continue;
            }
            match &mut session.phase {
                Phase::Relaying(relay) => {
                    // The session's own timeout, from when its relay started.
                    if relay.idle_ms == 0 {
                        session.timer_ticket = 0;
                        continue;
                    }
                    let idle = Duration::from_millis(u64::from(relay.idle_ms));
                    let quiet =
                        Duration::from_millis(u64::from(clock.wrapping_sub(relay.last_activity)));
                    if quiet >= idle {
                        tracing::debug!("idle timeout");
                        self.trail(key).ended_because(&"idle timeout");
                        self.close(key, false)?;
                    } else {
                        self.arm_timer(key, now + (idle - quiet));
                    }
                }
                Phase::Negotiating(negotiation) => match negotiation.step {
                    NegotiationStep::Resolving
                    | NegotiationStep::Connecting
                    | NegotiationStep::Installing => {
                        if negotiation.step == NegotiationStep::Connecting
                            && negotiation.connecting.is_some()
                        {
                            let poll = token(Op::ConnectPoll, key, id);
                            self.ring.cancel(poll, IGNORE)?;
                        }
                        self.fail_request(key, Failure::ConnectTimeout)?;
                    }
                    _ => {
                        tracing::debug!("handshake timed out");
                        self.trail(key).ended_because(&"handshake timed out");
                        self.close(key, false)?;
                    }
                },
            }
        }
        Ok(())
    }

    /// Closes a session: cancels its operations and closes its sockets (RST with `reset`);
    /// its entry goes once the last operation has completed.
    fn close(&mut self, key: usize, reset: bool) -> io::Result<()> {
        let session = &mut self.sessions[key];
        if session.closing {
            return Ok(());
        }
        session.closing = true;
        session.timer_ticket = 0;
        if let Some(trail) = self.trails.remove(&key) {
            trail.finish(self.config.access_log(), 0, 0, &"closed");
        }
        let client = session.client;
        let target = session.target;
        let mut buffers = Vec::new();
        match &mut session.phase {
            Phase::Negotiating(negotiation) => {
                if negotiation.step == NegotiationStep::Connecting
                    && negotiation.connecting.is_some()
                {
                    // The poll ends with the cancel; the socket closes with the session's
                    // entry, after the poll's completion.
                    let poll = token(Op::ConnectPoll, key, session.id);
                    self.ring.cancel(poll, IGNORE)?;
                }
            }
            Phase::Relaying(relay) => {
                // The chunks being sent are recycled when their (cancelled) sends complete.
                for direction in [&mut relay.up, &mut relay.down] {
                    buffers.extend(direction.waiting.drain(..).map(|chunk| chunk.bid));
                }
            }
        }
        for bid in buffers {
            self.ring.recycle(bid);
        }
        self.ring.close(client, reset, IGNORE)?;
        self.slots_used -= 1;
        if let Some(target) = target {
            self.ring.close(target, reset, IGNORE)?;
            self.slots_used -= 1;
        }
        self.free_if_done(key);
        Ok(())
    }

    fn free_if_done(&mut self, key: usize) {
        let session = &self.sessions[key];
        if session.closing && session.in_flight == 0 {
            self.sessions.remove(key);
            self.shared.sessions.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for op in Op::ALL {
            for (key, id) in [(0, 0), (1, 7), (0xff_ffff, u32::MAX), (12345, 0x8000_0000)] {
                assert_eq!(untoken(token(op, key, id)), Some((op, key, id)));
            }
        }
        assert_eq!(untoken(u64::MAX), None);
    }

    /// An idle established session costs its slab entry (the kernel's socket memory is not
    /// the process's); this keeps the entry small.
    #[test]
    fn session_state_stays_small() {
        assert!(
            std::mem::size_of::<Session>() <= 128,
            "{}",
            std::mem::size_of::<Session>()
        );
    }
}
