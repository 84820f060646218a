//! The readiness event loop shared by `select`, `poll`, `epoll` and `epoll-et`: one thread,
//! non-blocking sockets, one state machine per session (see `conn.rs`). The modes differ
//! only in the [`Poller`] that waits for readiness.
//!
//! Nothing blocks the loop: accept and connect are non-blocking (connect completes on
//! writability, then `SO_ERROR` tells the outcome), names are resolved on the
//! [`Resolver`](crate::net::resolver::Resolver) pool which wakes the loop through an eventfd,
//! and timeouts come from a heap the loop checks itself. Sessions hold no relay buffer while
//! idle: bytes move through one scratch buffer per loop, and only what a destination could not
//! take is kept.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{eventfd, EventfdFlags};
use slab::Slab;

use super::conn::{
    fail_request, negotiate, relay, token, untoken, wanted_interest, Negotiation, NegotiationStep,
    Outcome, Phase, Session, Side, Wake, OVER_POLLER_LIMIT, SELECT_REFUSED,
};
use super::poller::{Event, Interest, Poller, Token};
use crate::config::access_log::SessionTrail;
use crate::config::LoopConfig;
use crate::modes::session::{self, Dialer, EXHAUSTION_BACKOFF};
use crate::net::limits;
use crate::net::resolver::Resolved;
use crate::relay::{self, ReadUntil, SCRATCH_SIZE};
use crate::shutdown::Shutdown;
use crate::socks5::Failure;

/// The token of the listening socket.
pub const LISTENER: Token = u64::MAX;
const WAKER: Token = u64::MAX - 1;
/// Connections accepted per readiness report before the loop serves its sessions again.
const ACCEPT_BATCH: usize = 64;

/// Shared between the loops of one process.
pub struct Shared {
    /// Sessions open across all loops (for `--max-sessions`).
    pub sessions: AtomicUsize,
}

/// The loop's state besides its sessions (split so sessions can be borrowed alongside).
pub(super) struct Context {
    /// Refreshed once a turn: a reload reaches sessions accepted after it.
    pub(super) config: LoopConfig,
    pub(super) edge: bool,
    pub(super) scratch: Box<[u8]>,
    pub(super) timers: BinaryHeap<Reverse<(Instant, usize, u32, u32)>>,
    pub(super) next_ticket: u32,
    pub(super) resolved_tx: Sender<Resolved>,
    /// The origin of `Relay::last_activity`.
    pub(super) epoch: Instant,
    pub(super) waker: Arc<OwnedFd>,
    /// What the access log will say of each session, by key: only while the log is on, so
    /// that sessions do not grow by a pointer for it.
    pub(super) trails: HashMap<usize, SessionTrail>,
    /// What a session without a trail writes to (nothing sticks: it stays empty).
    pub(super) no_trail: SessionTrail,
}

impl Context {
    /// The session's access-log trail (one that keeps nothing while the log is off).
    pub(super) fn trail(&mut self, key: usize) -> &mut SessionTrail {
        if self.trails.is_empty() {
            // The log is off (or no session has a trail): not even a hash.
            return &mut self.no_trail;
        }
        match self.trails.get_mut(&key) {
            Some(trail) => trail,
            None => &mut self.no_trail,
        }
    }

    pub(super) fn read_until(&self) -> ReadUntil {
        if self.edge {
            ReadUntil::WouldBlock
        } else {
            ReadUntil::ShortRead
        }
    }

    /// Milliseconds since the loop started (wraps after 49 days; compared with wrapping
    /// arithmetic).
    pub(super) fn clock_ms(&self) -> u32 {
        self.epoch.elapsed().as_millis() as u32
    }

    pub(super) fn arm_timer(&mut self, session: &mut Session, key: usize, at: Instant) {
        // Zero means "no timer"; skip it when the counter wraps.
        self.next_ticket = self.next_ticket.wrapping_add(1).max(1);
        session.timer_ticket = self.next_ticket;
        self.timers
            .push(Reverse((at, key, session.id, self.next_ticket)));
    }
}

/// Writes to an eventfd to wake its loop.
pub(super) fn wake(fd: &OwnedFd) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// Runs one event loop on `listener` until shutdown and the grace period are over.
pub fn run<P: Poller>(
    mut poller: P,
    listener: TcpListener,
    config: LoopConfig,
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
            trails: HashMap::new(),
            no_trail: SessionTrail::default(),
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
    resolved_rx: Receiver<Resolved>,
    shared: &'a Shared,
    ctx: Context,
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
                        self.close(key, false, &"server shut down (grace period over)");
                    }
                    return Ok(());
                }
            }

            let timeout = self.next_timeout(grace_deadline);
            events.clear();
            self.poller.wait(&mut events, timeout)?;
            // After the wait: a connection that woke it is served with a reload that came
            // while it waited.
            self.ctx.config.refresh();
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
            Ok(Outcome::Close { reset }) => self.close(key, reset, &"closed"),
            Err(err) => {
                tracing::debug!("session ended: {err}");
                self.close(key, relay::is_peer_reset(&err), &err);
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

    /// Closes a session; `end` is why, for the access log (unless it already knows).
    fn close(&mut self, key: usize, reset: bool, end: &dyn std::fmt::Display) {
        let session = self.sessions.remove(key);
        let (up, down) = match &session.phase {
            Phase::Relaying(relay) => (relay.up.bytes(), relay.down.bytes()),
            Phase::Negotiating(_) => (0, 0),
        };
        if let Some(trail) = self.ctx.trails.remove(&key) {
            trail.finish(self.ctx.config.access_log(), up, down, end);
        }
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
        if !session::admit(
            &self.ctx.config,
            peer,
            self.shared.sessions.load(Ordering::Relaxed),
        ) {
            return;
        }
        if !self.poller.can_watch(client.as_raw_fd()) {
            SELECT_REFUSED.fetch_add(1, Ordering::Relaxed);
            crate::metrics::refused(crate::metrics::Refusal::ModeLimit);
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
                handshake: session::new_handshake(&self.ctx.config, peer),
                out: Vec::new(),
                written: 0,
                step: NegotiationStep::Reading,
            })),
        };
        self.shared.sessions.fetch_add(1, Ordering::Relaxed);
        let key = self.sessions.insert(session);
        let log = self.ctx.config.access_log();
        if SessionTrail::wanted(log) {
            let trail = SessionTrail::begin(log, peer);
            self.ctx.trails.insert(key, trail);
        }
        let deadline = Instant::now() + self.ctx.config.handshake_timeout;
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
            // An empty list fails in the dialer, with the same DnsFailure.
            Ok(addrs) => {
                negotiation.step = NegotiationStep::Connecting(Dialer::new(addrs));
                None
            }
            Err(_) => Some(Failure::DnsFailure),
        };
        if let Some(failure) = failure {
            fail_request(negotiation, self.ctx.trail(key), failure);
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
                    // The session's own timeout, from when its relay started.
                    if relay.idle_ms == 0 {
                        session.timer_ticket = 0;
                        continue;
                    }
                    let idle = Duration::from_millis(u64::from(relay.idle_ms));
                    let quiet_ms = self.ctx.clock_ms().wrapping_sub(relay.last_activity);
                    let quiet = Duration::from_millis(u64::from(quiet_ms));
                    if quiet >= idle {
                        tracing::debug!("idle timeout");
                        self.close(key, false, &"idle timeout");
                    } else {
                        self.ctx.arm_timer(session, key, now + (idle - quiet));
                    }
                }
                Phase::Negotiating(negotiation) => match negotiation.step {
                    NegotiationStep::Resolving | NegotiationStep::Connecting(_) => {
                        fail_request(negotiation, self.ctx.trail(key), Failure::ConnectTimeout);
                        if let Some(target) = session.target.take() {
                            let _ = self.poller.remove(target.as_fd());
                        }
                        session.target_interest = Interest::NONE;
                        self.drive(key, Wake::BOTH, false);
                    }
                    _ => {
                        tracing::debug!("handshake timed out");
                        self.close(key, false, &"handshake timed out");
                    }
                },
            }
        }
        if self.accept_paused_until.is_some_and(|at| at <= now) {
            self.resume_accepting();
        }
    }
}
