//! The readiness event loop shared by `select`, `poll`, `epoll` and `epoll-et`: one thread,
//! non-blocking sockets, one state machine per session. The modes differ only in the
//! [`Poller`] that waits for readiness.
//!
//! Nothing blocks the loop: accept and connect are non-blocking (connect completes on
//! writability, then `SO_ERROR` tells the outcome), names are resolved on the
//! [`Resolver`] pool which wakes the loop through an eventfd, and timeouts come from a heap
//! the loop checks itself. Sessions hold no relay buffer while idle: bytes move through one
//! scratch buffer per loop, and only what a destination could not take is kept.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{eventfd, EventfdFlags};
use slab::Slab;

use super::poller::{Event, Interest, Poller, Token};
use crate::config::Config;
use crate::modes::session::{self, Dialer, EXHAUSTION_BACKOFF};
use crate::net::connect;
use crate::net::limits;
use crate::net::resolver::Resolver;
use crate::net::BurstLog;
use crate::relay::{self, Pipe, PipeState, ReadUntil, SCRATCH_SIZE};
use crate::shutdown::Shutdown;
use crate::socks5::wire::MAX_MESSAGE_LEN;
use crate::socks5::{Command, Failure, Handshake, Step, TargetAddr};

static OVER_POLLER_LIMIT: BurstLog = BurstLog::new(
    "descriptor at or above FD_SETSIZE (1024) cannot be watched by select; session refused",
);

/// Sessions refused because select could not watch one of their descriptors.
pub static SELECT_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The token of the listening socket.
pub const LISTENER: Token = u64::MAX;
const WAKER: Token = u64::MAX - 1;
/// Connections accepted per readiness report before the loop serves its sessions again.
const ACCEPT_BATCH: usize = 64;

/// Which socket of a session an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Target,
}

fn token(key: usize, side: Side) -> Token {
    ((key as u64) << 1) | u64::from(side == Side::Target)
}

fn untoken(token: Token) -> (usize, Side) {
    let side = if token & 1 == 1 {
        Side::Target
    } else {
        Side::Client
    };
    ((token >> 1) as usize, side)
}

/// A session from accept to close.
struct Session {
    /// Distinguishes successive sessions in one slab slot, so stale timer and resolver
    /// reports are ignored when a slot is reused.
    id: u32,
    client: TcpStream,
    target: Option<TcpStream>,
    client_interest: Interest,
    target_interest: Interest,
    /// The timer entry that is current for this session; older entries are ignored.
    timer_ticket: u32,
    phase: Phase,
}

enum Phase {
    Negotiating(Box<Negotiation>),
    Relaying(Relay),
}

/// Handshake and connect state, boxed: freed once the relay starts.
struct Negotiation {
    handshake: Handshake,
    out: Vec<u8>,
    written: usize,
    step: NegotiationStep,
}

enum NegotiationStep {
    Reading,
    Resolving,
    Connecting(Dialer),
    /// Flushing the success reply, then relay.
    Replying,
    /// Flushing a failure reply, then close.
    Closing,
}

struct Relay {
    up: Pipe,
    down: Pipe,
    /// When bytes last moved, in milliseconds of the loop's clock (only kept up to date
    /// with an idle timeout). 4 bytes instead of an `Instant`'s 16: this is per session.
    last_activity: u32,
}

/// What a session needs after being driven.
enum Outcome {
    /// Wait for readiness (interests updated).
    Wait,
    /// It has more to do right now (relay budget spent): drive again after other work.
    Again,
    /// Close it.
    Close { reset: bool },
}

/// Which directions of a relay an event concerns.
#[derive(Clone, Copy)]
struct Wake {
    up: bool,
    down: bool,
}

impl Wake {
    /// Both directions: after accept, a resolution, a timer, or a relay budget spent.
    const BOTH: Wake = Wake {
        up: true,
        down: true,
    };
}

/// Shared between the loops of one process.
pub struct Shared {
    /// Sessions open across all loops (for `--max-sessions`).
    pub sessions: AtomicUsize,
}

/// The loop's state besides its sessions (split so sessions can be borrowed alongside).
struct Context<'a> {
    config: &'a Config,
    edge: bool,
    scratch: Box<[u8]>,
    timers: BinaryHeap<Reverse<(Instant, usize, u32, u32)>>,
    next_ticket: u32,
    resolved_tx: Sender<(usize, u32, io::Result<Vec<SocketAddr>>)>,
    /// The origin of `Relay::last_activity`.
    epoch: Instant,
    waker: Arc<OwnedFd>,
}

impl Context<'_> {
    fn read_until(&self) -> ReadUntil {
        if self.edge {
            ReadUntil::WouldBlock
        } else {
            ReadUntil::ShortRead
        }
    }

    /// Milliseconds since the loop started (wraps after 49 days; compared with wrapping
    /// arithmetic).
    fn clock_ms(&self) -> u32 {
        self.epoch.elapsed().as_millis() as u32
    }

    fn arm_timer(&mut self, session: &mut Session, key: usize, at: Instant) {
        // Zero means "no timer"; skip it when the counter wraps.
        self.next_ticket = self.next_ticket.wrapping_add(1).max(1);
        session.timer_ticket = self.next_ticket;
        self.timers
            .push(Reverse((at, key, session.id, self.next_ticket)));
    }
}

/// Writes to an eventfd to wake its loop.
fn wake(fd: &OwnedFd) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// Runs one event loop on `listener` until shutdown and the grace period are over.
pub fn run<P: Poller>(
    mut poller: P,
    listener: TcpListener,
    config: &Config,
    shutdown: &Shutdown,
    shared: &Shared,
) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let waker = Arc::new(eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?);
    poller.set_interest(waker.as_fd(), WAKER, Interest::READ)?;
    poller.watch_listener(listener.as_fd(), LISTENER, true)?;
    {
        let waker = waker.clone();
        shutdown.on_trigger(move || wake(&waker));
    }
    let (resolved_tx, resolved_rx) = mpsc::channel();
    let mut event_loop = EventLoop {
        poller,
        listener: Some(listener),
        accept_pending: true,
        accept_paused_until: None,
        sessions: Slab::new(),
        next_id: 0,
        again: Vec::new(),
        resolved_rx,
        shared,
        ctx: Context {
            config,
            edge: false,
            scratch: vec![0u8; SCRATCH_SIZE].into_boxed_slice(),
            timers: BinaryHeap::new(),
            next_ticket: 0,
            resolved_tx,
            waker,
            epoch: Instant::now(),
        },
    };
    event_loop.ctx.edge = event_loop.poller.edge_triggered();
    event_loop.serve(shutdown)
}

struct EventLoop<'a, P: Poller> {
    poller: P,
    listener: Option<TcpListener>,
    /// The listener may have more connections waiting (edge-triggered, or a full batch).
    accept_pending: bool,
    accept_paused_until: Option<Instant>,
    sessions: Slab<Session>,
    next_id: u32,
    again: Vec<(usize, u32)>,
    resolved_rx: Receiver<(usize, u32, io::Result<Vec<SocketAddr>>)>,
    shared: &'a Shared,
    ctx: Context<'a>,
}

impl<P: Poller> EventLoop<'_, P> {
    fn serve(&mut self, shutdown: &Shutdown) -> io::Result<()> {
        let mut events = Vec::with_capacity(1024);
        let mut grace_deadline: Option<Instant> = None;
        loop {
            if grace_deadline.is_none() && shutdown.is_triggered() {
                self.stop_accepting();
                grace_deadline = Some(Instant::now() + self.ctx.config.grace);
                session::log_draining(self.ctx.config.grace, self.sessions.len());
            }
            if let Some(deadline) = grace_deadline {
                if self.sessions.is_empty() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    session::log_grace_over(self.sessions.len());
                    let keys: Vec<usize> = self.sessions.iter().map(|(key, _)| key).collect();
                    for key in keys {
                        self.close(key, false);
                    }
                    return Ok(());
                }
            }

            let timeout = self.next_timeout(grace_deadline);
            events.clear();
            self.poller.wait(&mut events, timeout)?;
            for event in &events {
                match event.token {
                    LISTENER => self.accept_pending = true,
                    WAKER => self.on_wake(),
                    token => {
                        let (key, side) = untoken(token);
                        self.on_socket_event(key, side, event);
                    }
                }
            }
            self.drive_again();
            if self.accept_pending && self.listener.is_some() && self.accept_paused_until.is_none()
            {
                self.accept_batch();
            }
            self.fire_timers();
        }
    }

    fn next_timeout(&self, grace_deadline: Option<Instant>) -> Option<Duration> {
        if !self.again.is_empty()
            || (self.accept_pending
                && self.listener.is_some()
                && self.accept_paused_until.is_none())
        {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        [
            self.ctx.timers.peek().map(|Reverse((at, ..))| *at),
            self.accept_paused_until,
            grace_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| at.saturating_duration_since(now))
    }

    fn stop_accepting(&mut self) {
        if let Some(listener) = self.listener.take() {
            let _ = self.poller.remove(listener.as_fd());
        }
    }

    fn on_wake(&mut self) {
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(&*self.ctx.waker, &mut counter);
        while let Ok((key, id, result)) = self.resolved_rx.try_recv() {
            if self.sessions.get(key).is_some_and(|s| s.id == id) {
                self.on_resolved(key, result);
            }
        }
    }

    fn on_socket_event(&mut self, key: usize, side: Side, event: &Event) {
        let Some(session) = self.sessions.get(key) else {
            return;
        };
        let wake = match (side, &session.phase) {
            (_, Phase::Negotiating(_)) => Wake::BOTH,
            (Side::Client, Phase::Relaying(_)) => Wake {
                up: event.readable,
                down: event.writable,
            },
            (Side::Target, Phase::Relaying(_)) => Wake {
                up: event.writable,
                down: event.readable,
            },
        };
        let target_writable = side == Side::Target && event.writable;
        self.drive(key, wake, target_writable);
    }

    fn drive_again(&mut self) {
        let again = std::mem::take(&mut self.again);
        for (key, id) in again {
            if self.sessions.get(key).is_some_and(|s| s.id == id) {
                self.drive(key, Wake::BOTH, false);
            }
        }
    }

    fn drive(&mut self, key: usize, wake: Wake, target_writable: bool) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        let outcome = match &mut session.phase {
            Phase::Negotiating(_) => negotiate(
                session,
                key,
                &mut self.ctx,
                &mut self.poller,
                target_writable,
            ),
            Phase::Relaying(_) => relay(session, &mut self.ctx, wake),
        };
        match outcome {
            Ok(Outcome::Wait) => self.update_interest(key),
            Ok(Outcome::Again) => {
                self.update_interest(key);
                let id = self.sessions[key].id;
                self.again.push((key, id));
            }
            Ok(Outcome::Close { reset }) => self.close(key, reset),
            Err(err) => {
                tracing::debug!("session ended: {err}");
                self.close(key, relay::is_peer_reset(&err));
            }
        }
    }

    fn update_interest(&mut self, key: usize) {
        let session = &mut self.sessions[key];
        let (client, target) = wanted_interest(session);
        if client != session.client_interest {
            session.client_interest = client;
            if let Err(err) =
                self.poller
                    .set_interest(session.client.as_fd(), token(key, Side::Client), client)
            {
                tracing::warn!("cannot watch a client socket: {err}");
            }
        }
        if let Some(stream) = &session.target {
            if target != session.target_interest {
                session.target_interest = target;
                if let Err(err) =
                    self.poller
                        .set_interest(stream.as_fd(), token(key, Side::Target), target)
                {
                    tracing::warn!("cannot watch a target socket: {err}");
                }
            }
        }
    }

    fn close(&mut self, key: usize, reset: bool) {
        let session = self.sessions.remove(key);
        let _ = self.poller.remove(session.client.as_fd());
        if let Some(target) = &session.target {
            let _ = self.poller.remove(target.as_fd());
        }
        if reset {
            // Pass a reset on: closing with a zero linger sends RST, not FIN.
            match &session.target {
                Some(target) => session::pass_reset_on(&[&session.client, target]),
                None => session::pass_reset_on(&[&session.client]),
            }
        }
        drop(session);
        self.shared.sessions.fetch_sub(1, Ordering::Relaxed);
        if self.accept_paused_until.is_some() {
            // A descriptor just came free: try accepting again now.
            self.accept_paused_until = Some(Instant::now());
        }
    }

    fn accept_batch(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            let Some(listener) = &self.listener else {
                return;
            };
            match limits::new_descriptor(|| listener.accept()) {
                Ok((stream, peer)) => self.on_accepted(stream, peer),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_pending = false;
                    return;
                }
                Err(err) if limits::is_resource_exhaustion(&err) => {
                    limits::refuse_on_exhaustion(listener, &err, self.sessions.len());
                    self.pause_accepting();
                    return;
                }
                Err(err) if limits::is_transient_accept_error(&err) => {}
                Err(err) => {
                    tracing::error!("accept failed: {err}");
                    self.pause_accepting();
                    return;
                }
            }
        }
        // A full batch: more may be waiting, and edge-triggered readiness will not say so.
        self.accept_pending = true;
    }

    fn pause_accepting(&mut self) {
        self.accept_paused_until = Some(Instant::now() + EXHAUSTION_BACKOFF);
        if let Some(listener) = &self.listener {
            // Level-triggered pollers would report the waiting connection again and again.
            let _ = self
                .poller
                .watch_listener(listener.as_fd(), LISTENER, false);
        }
    }

    fn resume_accepting(&mut self) {
        if let Some(listener) = &self.listener {
            if let Err(err) = self.poller.watch_listener(listener.as_fd(), LISTENER, true) {
                // Out of kernel memory or epoll watches: stay paused and try again later,
                // rather than never watching the listener again.
                tracing::warn!("cannot watch the listener again: {err}");
                self.accept_paused_until = Some(Instant::now() + EXHAUSTION_BACKOFF);
                return;
            }
        }
        self.accept_paused_until = None;
        self.accept_pending = true;
    }

    fn on_accepted(&mut self, client: TcpStream, peer: SocketAddr) {
        let config = self.ctx.config;
        if !session::admit(config, peer, self.shared.sessions.load(Ordering::Relaxed)) {
            return;
        }
        if !self.poller.can_watch(client.as_raw_fd()) {
            SELECT_REFUSED.fetch_add(1, Ordering::Relaxed);
            OVER_POLLER_LIMIT.hit(&format_args!(
                "client descriptor {}; {} refused so far",
                client.as_raw_fd(),
                SELECT_REFUSED.load(Ordering::Relaxed)
            ));
            return;
        }
        if let Err(err) = client.set_nonblocking(true) {
            tracing::warn!("cannot make a client socket non-blocking: {err}");
            return;
        }
        self.next_id = self.next_id.wrapping_add(1);
        let session = Session {
            id: self.next_id,
            client,
            target: None,
            client_interest: Interest::NONE,
            target_interest: Interest::NONE,
            timer_ticket: 0,
            phase: Phase::Negotiating(Box::new(Negotiation {
                handshake: Handshake::new(config.users.clone()),
                out: Vec::new(),
                written: 0,
                step: NegotiationStep::Reading,
            })),
        };
        self.shared.sessions.fetch_add(1, Ordering::Relaxed);
        let key = self.sessions.insert(session);
        let deadline = Instant::now() + config.handshake_timeout;
        let session = &mut self.sessions[key];
        self.ctx.arm_timer(session, key, deadline);
        // The greeting often arrives with the connection: try it before waiting.
        self.drive(key, Wake::BOTH, false);
    }

    fn on_resolved(&mut self, key: usize, result: io::Result<Vec<SocketAddr>>) {
        let session = &mut self.sessions[key];
        let Phase::Negotiating(negotiation) = &mut session.phase else {
            return;
        };
        if !matches!(negotiation.step, NegotiationStep::Resolving) {
            return;
        }
        let failure = match result {
            Ok(addrs) if !addrs.is_empty() => {
                negotiation.step = NegotiationStep::Connecting(Dialer::new(addrs));
                None
            }
            _ => Some(Failure::DnsFailure),
        };
        if let Some(failure) = failure {
            fail_request(negotiation, failure);
        }
        self.drive(key, Wake::BOTH, false);
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, key, id, ticket))) = self.ctx.timers.peek().copied() {
            if at > now {
                break;
            }
            self.ctx.timers.pop();
            let Some(session) = self.sessions.get_mut(key) else {
                continue;
            };
            if session.id != id || session.timer_ticket != ticket {
                continue;
            }
            match &mut session.phase {
                Phase::Relaying(relay) => {
                    let idle = self.ctx.config.idle_timeout.unwrap_or_default();
                    let quiet_ms = self.ctx.clock_ms().wrapping_sub(relay.last_activity);
                    let quiet = Duration::from_millis(u64::from(quiet_ms));
                    if quiet >= idle {
                        tracing::debug!("idle timeout");
                        self.close(key, false);
                    } else {
                        self.ctx.arm_timer(session, key, now + (idle - quiet));
                    }
                }
                Phase::Negotiating(negotiation) => match negotiation.step {
                    NegotiationStep::Resolving | NegotiationStep::Connecting(_) => {
                        fail_request(negotiation, Failure::ConnectTimeout);
                        if let Some(target) = session.target.take() {
                            let _ = self.poller.remove(target.as_fd());
                        }
                        session.target_interest = Interest::NONE;
                        self.drive(key, Wake::BOTH, false);
                    }
                    _ => {
                        tracing::debug!("handshake timed out");
                        self.close(key, false);
                    }
                },
            }
        }
        if self.accept_paused_until.is_some_and(|at| at <= now) {
            self.resume_accepting();
        }
    }
}

/// What each socket of a session should be watched for in its current state.
fn wanted_interest(session: &Session) -> (Interest, Interest) {
    match &session.phase {
        Phase::Negotiating(negotiation) => {
            let flushing = negotiation.written < negotiation.out.len();
            let client = match negotiation.step {
                _ if flushing => Interest::WRITE,
                NegotiationStep::Reading => Interest::READ,
                _ => Interest::NONE,
            };
            let target = match negotiation.step {
                NegotiationStep::Connecting(_) if session.target.is_some() => Interest::WRITE,
                _ => Interest::NONE,
            };
            (client, target)
        }
        Phase::Relaying(relay) => {
            let up = relay.up.last_state();
            let down = relay.down.last_state();
            // A yielded pipe is driven again by the loop; keeping its read interest avoids
            // switching it off and on between bursts.
            let reading = |state| matches!(state, PipeState::WantsRead | PipeState::Yielded);
            let client = Interest {
                read: reading(up),
                write: down == PipeState::WantsWrite,
            };
            let target = Interest {
                read: reading(down),
                write: up == PipeState::WantsWrite,
            };
            (client, target)
        }
    }
}

/// Queues a failure reply and moves to flushing it before close.
fn fail_request(negotiation: &mut Negotiation, failure: Failure) {
    let _ = negotiation
        .handshake
        .request_failed(failure, &mut negotiation.out);
    negotiation.step = NegotiationStep::Closing;
    tracing::info!("request failed: {failure}");
}

/// Drives the handshake, resolution and connect as far as they go without blocking.
fn negotiate(
    session: &mut Session,
    key: usize,
    ctx: &mut Context<'_>,
    poller: &mut impl Poller,
    target_writable: bool,
) -> io::Result<Outcome> {
    loop {
        let Phase::Negotiating(negotiation) = &mut session.phase else {
            return Ok(Outcome::Wait);
        };
        // Flush pending replies first.
        while negotiation.written < negotiation.out.len() {
            match (&session.client).write(&negotiation.out[negotiation.written..]) {
                Ok(n) => negotiation.written += n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(Outcome::Wait),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        negotiation.out.clear();
        negotiation.written = 0;
        match &mut negotiation.step {
            NegotiationStep::Closing => return Ok(Outcome::Close { reset: false }),
            NegotiationStep::Replying => {
                let leftover = negotiation.handshake.take_leftover();
                session.phase = Phase::Relaying(Relay {
                    up: Pipe::with_leftover(leftover),
                    down: Pipe::default(),
                    last_activity: ctx.clock_ms(),
                });
                if let Some(idle) = ctx.config.idle_timeout {
                    ctx.arm_timer(session, key, Instant::now() + idle);
                } else {
                    session.timer_ticket = 0;
                }
                return relay(session, ctx, Wake::BOTH);
            }
            NegotiationStep::Resolving => return Ok(Outcome::Wait),
            NegotiationStep::Connecting(_) => {
                match advance_connect(session, ctx, poller, target_writable) {
                    Some(outcome) => return Ok(outcome),
                    None => continue,
                }
            }
            NegotiationStep::Reading => {
                let limit = MAX_MESSAGE_LEN.min(ctx.scratch.len());
                match (&session.client).read(&mut ctx.scratch[..limit]) {
                    Ok(0) => return Ok(Outcome::Close { reset: false }),
                    Ok(n) => negotiation.handshake.receive(&ctx.scratch[..n]),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(Outcome::Wait)
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => return Err(err),
                }
                match negotiation.handshake.step(&mut negotiation.out) {
                    Step::NeedInput => {}
                    Step::Close(err) => {
                        tracing::debug!("handshake ended: {err}");
                        negotiation.step = NegotiationStep::Closing;
                    }
                    Step::Request(request) if request.command != Command::Connect => {
                        // BIND and UDP ASSOCIATE are served by the async mode only.
                        fail_request(negotiation, Failure::CommandNotSupported);
                    }
                    Step::Request(request) => {
                        let deadline = Instant::now() + ctx.config.connect_timeout;
                        ctx.arm_timer(session, key, deadline);
                        let Phase::Negotiating(negotiation) = &mut session.phase else {
                            continue;
                        };
                        match request.target {
                            TargetAddr::Ip(addr) => {
                                negotiation.step =
                                    NegotiationStep::Connecting(Dialer::new(vec![addr]));
                            }
                            TargetAddr::Domain(name, port) => {
                                negotiation.step = NegotiationStep::Resolving;
                                let reply = ctx.resolved_tx.clone();
                                let waker = ctx.waker.clone();
                                let id = session.id;
                                Resolver::global().resolve(
                                    &name,
                                    port,
                                    Box::new(move |result| {
                                        let _ = reply.send((key, id, result));
                                        wake(&waker);
                                    }),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Moves a connect on: checks the attempt in flight (when the target became writable), or
/// starts the next allowed address. `None` means the step changed and negotiation goes on.
fn advance_connect(
    session: &mut Session,
    ctx: &mut Context<'_>,
    poller: &mut impl Poller,
    target_writable: bool,
) -> Option<Outcome> {
    let Phase::Negotiating(negotiation) = &mut session.phase else {
        return Some(Outcome::Wait);
    };
    let NegotiationStep::Connecting(dialer) = &mut negotiation.step else {
        return None;
    };
    if let Some(target) = &session.target {
        if !target_writable {
            return Some(Outcome::Wait);
        }
        let connected = connect::connect_result(target).and_then(|()| connect::bound_addr(target));
        match connected {
            Ok(bound) => {
                if let Err(err) = negotiation
                    .handshake
                    .request_granted(bound, &mut negotiation.out)
                {
                    tracing::debug!("handshake ended: {err}");
                    negotiation.step = NegotiationStep::Closing;
                    return None;
                }
                let _ = target.set_nodelay(true);
                let _ = session.client.set_nodelay(true);
                negotiation.step = NegotiationStep::Replying;
                return None;
            }
            Err(failure) => dialer.failed(failure),
        }
        // This address failed: forget its socket and try the next one.
        if let Some(target) = session.target.take() {
            let _ = poller.remove(target.as_fd());
        }
        session.target_interest = Interest::NONE;
    }
    while let Some(addr) = dialer.next_allowed(&ctx.config.acl) {
        match start_connect(addr, poller) {
            Ok(stream) => {
                session.target = Some(stream);
                return Some(Outcome::Wait);
            }
            Err(failure) => dialer.failed(failure),
        }
    }
    let failure = dialer.failure();
    fail_request(negotiation, failure);
    None
}

/// Starts a non-blocking connect to `addr`, refusing descriptors the poller cannot watch.
fn start_connect(addr: SocketAddr, poller: &impl Poller) -> Result<TcpStream, Failure> {
    let stream = connect::start_connect(addr)?;
    if !poller.can_watch(stream.as_raw_fd()) {
        SELECT_REFUSED.fetch_add(1, Ordering::Relaxed);
        OVER_POLLER_LIMIT.hit(&format_args!("target descriptor {}", stream.as_raw_fd()));
        return Err(Failure::ResourceExhausted);
    }
    Ok(stream)
}

/// Moves bytes in the directions `wake` names, as far as they go.
fn relay(session: &mut Session, ctx: &mut Context<'_>, wake: Wake) -> io::Result<Outcome> {
    let Some(target) = &session.target else {
        return Ok(Outcome::Close { reset: false });
    };
    let Phase::Relaying(relay) = &mut session.phase else {
        return Ok(Outcome::Wait);
    };
    let until = ctx.read_until();
    let moved_before = relay.up.bytes() + relay.down.bytes();
    if wake.up {
        relay
            .up
            .pump(&mut &session.client, &mut &*target, &mut ctx.scratch, until)?;
    }
    if wake.down {
        relay
            .down
            .pump(&mut &*target, &mut &session.client, &mut ctx.scratch, until)?;
    }
    if ctx.config.idle_timeout.is_some() && relay.up.bytes() + relay.down.bytes() != moved_before {
        relay.last_activity = ctx.clock_ms();
    }
    let (up, down) = (relay.up.last_state(), relay.down.last_state());
    if up == PipeState::Finished && down == PipeState::Finished {
        return Ok(Outcome::Close { reset: false });
    }
    if up == PipeState::Yielded || down == PipeState::Yielded {
        return Ok(Outcome::Again);
    }
    Ok(Outcome::Wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle established session costs its slab entry plus the poller's bookkeeping; this
    /// keeps the entry small (the measured whole is in the README).
    #[test]
    fn session_state_stays_small() {
        assert!(
            std::mem::size_of::<Session>() <= 96,
            "{}",
            std::mem::size_of::<Session>()
        );
    }
}
