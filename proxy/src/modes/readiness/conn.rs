//! One session of a readiness event loop, from accept to close: the handshake, resolution
//! and connect as a state machine driven by readiness, then the relay. Everything here runs
//! on the loop's thread and never blocks.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::event_loop::{wake, Context};
use super::poller::{Interest, Poller, Token};
use crate::config::access_log::SessionTrail;
use crate::modes::session::{self, Dialer};
use crate::net::connect;
use crate::net::resolver::Resolver;
use crate::net::BurstLog;
use crate::relay::{Pipe, PipeState};
use crate::socks5::wire::MAX_MESSAGE_LEN;
use crate::socks5::{Command, Failure, Handshake, Step, TargetAddr};

pub(super) static OVER_POLLER_LIMIT: BurstLog = BurstLog::new(
    "descriptor at or above FD_SETSIZE (1024) cannot be watched by select; session refused",
);

/// Sessions refused because select could not watch one of their descriptors.
pub static SELECT_REFUSED: AtomicU64 = AtomicU64::new(0);

/// Which socket of a session an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Client,
    Target,
}

pub(super) fn token(key: usize, side: Side) -> Token {
    ((key as u64) << 1) | u64::from(side == Side::Target)
}

pub(super) fn untoken(token: Token) -> (usize, Side) {
    let side = if token & 1 == 1 {
        Side::Target
    } else {
        Side::Client
    };
    ((token >> 1) as usize, side)
}

/// A session from accept to close.
pub(super) struct Session {
    /// Distinguishes successive sessions in one slab slot, so stale timer and resolver
    /// reports are ignored when a slot is reused.
    pub(super) id: u32,
    pub(super) client: TcpStream,
    pub(super) target: Option<TcpStream>,
    pub(super) client_interest: Interest,
    pub(super) target_interest: Interest,
    /// The timer entry that is current for this session; older entries are ignored.
    pub(super) timer_ticket: u32,
    pub(super) phase: Phase,
}

pub(super) enum Phase {
    Negotiating(Box<Negotiation>),
    Relaying(Relay),
}

/// Handshake and connect state, boxed: freed once the relay starts.
pub(super) struct Negotiation {
    pub(super) handshake: Handshake,
    pub(super) out: Vec<u8>,
    pub(super) written: usize,
    pub(super) step: NegotiationStep,
}

pub(super) enum NegotiationStep {
    Reading,
    Resolving,
    Connecting(Dialer),
    /// Flushing the success reply, then relay.
    Replying,
    /// Flushing a failure reply, then close.
    Closing,
}

pub(super) struct Relay {
    pub(super) up: Pipe,
    pub(super) down: Pipe,
    /// When bytes last moved, in milliseconds of the loop's clock (only kept up to date
    /// with an idle timeout). 4 bytes instead of an `Instant`'s 16: this is per session.
    pub(super) last_activity: u32,
    /// The idle timeout it started with, in milliseconds (0: none): a reload does not change
    /// it for established sessions.
    pub(super) idle_ms: u32,
}

/// What a session needs after being driven.
pub(super) enum Outcome {
    /// Wait for readiness (interests updated).
    Wait,
    /// It has more to do right now (relay budget spent): drive again after other work.
    Again,
    /// Close it.
    Close { reset: bool },
}

/// Which directions of a relay an event concerns.
#[derive(Clone, Copy)]
pub(super) struct Wake {
    pub(super) up: bool,
    pub(super) down: bool,
}

impl Wake {
    /// Both directions: after accept, a resolution, a timer, or a relay budget spent.
    pub(super) const BOTH: Wake = Wake {
        up: true,
        down: true,
    };
}

/// What each socket of a session should be watched for in its current state.
pub(super) fn wanted_interest(session: &Session) -> (Interest, Interest) {
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
pub(super) fn fail_request(
    negotiation: &mut Negotiation,
    trail: &mut SessionTrail,
    failure: Failure,
) {
    trail.failed(failure);
    let _ = negotiation
        .handshake
        .request_failed(failure, &mut negotiation.out);
    negotiation.step = NegotiationStep::Closing;
    session::log_request_failed(None, None, failure);
}

/// Drives the handshake, resolution and connect as far as they go without blocking.
pub(super) fn negotiate(
    session: &mut Session,
    key: usize,
    ctx: &mut Context,
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
                    idle_ms: ctx.config.idle_timeout_ms(),
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
                match advance_connect(session, key, ctx, poller, target_writable) {
                    Some(outcome) => return Ok(outcome),
                    None => continue,
                }
            }
            NegotiationStep::Reading => {
                let limit = MAX_MESSAGE_LEN.min(ctx.scratch.len());
                match (&session.client).read(&mut ctx.scratch[..limit]) {
                    Ok(0) => {
                        ctx.trail(key)
                            .ended_because(&"client closed during the handshake");
                        return Ok(Outcome::Close { reset: false });
                    }
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
                        ctx.trail(key)
                            .handshake_failed(&negotiation.handshake, &err);
                        negotiation.step = NegotiationStep::Closing;
                    }
                    Step::Request(request) => {
                        ctx.trail(key).requested(&request);
                        if session::proxied_client_refused(&ctx.config, &request) {
                            fail_request(negotiation, ctx.trail(key), Failure::DeniedByRule);
                        } else if request.command != Command::Connect {
                            // BIND and UDP ASSOCIATE are served by the async mode only.
                            fail_request(negotiation, ctx.trail(key), Failure::CommandNotSupported);
                        } else {
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
                                    let waker = ctx.waker.clone();
                                    Resolver::global().resolve_for_session(
                                        &name,
                                        port,
                                        (key, session.id),
                                        ctx.resolved_tx.clone(),
                                        move || wake(&waker),
                                    );
                                }
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
    key: usize,
    ctx: &mut Context,
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
                ctx.trail(key).granted(target.peer_addr().ok());
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
    fail_request(negotiation, ctx.trail(key), failure);
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
pub(super) fn relay(session: &mut Session, ctx: &mut Context, wake: Wake) -> io::Result<Outcome> {
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
    if relay.idle_ms != 0 && relay.up.bytes() + relay.down.bytes() != moved_before {
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
