//! The session policy every mode applies, written once: who is admitted, how the target's
//! addresses are dialed, how a reset is passed on, and what is logged while draining. A mode
//! differs from the others only in how it waits; what it decides comes from here.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::Duration;

use thiserror::Error;

use crate::config::{Acl, Config};
use crate::metrics::{self, Refusal};
use crate::net::BurstLog;
use crate::socks5::{Failure, Handshake, HandshakeError, Request, TargetAddr};

/// How long accepting pauses after running out of descriptors or threads, unless a session
/// ends first.
pub const EXHAUSTION_BACKOFF: Duration = Duration::from_millis(100);

static OVER_MAX_SESSIONS: BurstLog = BurstLog::new("--max-sessions reached; refusing newcomers");

/// The end of a session before or during its relay.
#[derive(Debug, Error)]
pub enum SessionError {
    /// The client closed before completing the handshake.
    #[error("client closed during the handshake")]
    ClientClosed,
    /// The handshake failed (a reply, if any, was sent).
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    /// A socket error.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

/// Whether a client connecting from `peer` may start a session while `open_sessions` are
/// open: its address must be allowed and `--max-sessions` not reached. A refused client is
/// logged here and is to be closed at once, before any byte.
/// A trusted load balancer is admitted whatever the client rules say: they apply to the client
/// its PROXY header names ([`proxied_client_refused`]).
pub fn admit(config: &Config, peer: SocketAddr, open_sessions: usize) -> bool {
    if !config.proxy_trusted(peer.ip()) && !config.acl.client_allowed(peer.ip()) {
        tracing::info!(%peer, "client not allowed; closed");
        metrics::refused(Refusal::ClientNotAllowed);
        return false;
    }
    if config.max_sessions.is_some_and(|max| open_sessions >= max) {
        OVER_MAX_SESSIONS.hit(&format_args!("closed {peer}"));
        metrics::refused(Refusal::MaxSessions);
        return false;
    }
    true
}

/// The handshake for a client connecting from `peer`: with `--users`, authentication; from a
/// trusted load balancer, a PROXY protocol header first.
pub fn new_handshake(config: &Config, peer: SocketAddr) -> Handshake {
    let handshake = Handshake::new(config.users.clone());
    if config.proxy_trusted(peer.ip()) {
        handshake.expecting_proxy_header(peer)
    } else {
        handshake
    }
}

/// Whether the client a trusted balancer named is refused by the client rules: the mode then
/// fails the request with [`Failure::DeniedByRule`] (0x02). Logged here.
pub fn proxied_client_refused(config: &Config, request: &Request) -> bool {
    let Some(client) = request.client else {
        return false;
    };
    if config.acl.client_allowed(client.ip()) {
        return false;
    }
    tracing::info!(%client, "client (named by a trusted balancer) not allowed; refused");
    true
}

/// Walks the addresses a target resolved to, in order, the way every mode dials: addresses
/// the rules deny are skipped, an address whose connect fails (at once or later) gives way to
/// the next, and running out of descriptors, memory or ports stops the walk, however the
/// connect reported it (the next address would fail alike). What to reply when no address
/// connects is [`Dialer::failure`].
///
/// It holds no socket: the mode opens and waits for each connect its own way, then reports
/// a failure with [`Dialer::failed`].
#[derive(Debug)]
pub struct Dialer {
    addrs: Vec<SocketAddr>,
    next: usize,
    failure: Failure,
}

impl Dialer {
    /// A dialer over `addrs`, in the order the resolver gave them.
    pub fn new(addrs: Vec<SocketAddr>) -> Self {
        let failure = if addrs.is_empty() {
            Failure::DnsFailure
        } else {
            Failure::DeniedByRule
        };
        Dialer {
            addrs,
            next: 0,
            failure,
        }
    }

    /// The next address the rules allow, or `None` when there is none left to try.
    pub fn next_allowed(&mut self, acl: &Acl) -> Option<SocketAddr> {
        if self.failure == Failure::ResourceExhausted {
            return None;
        }
        while let Some(&addr) = self.addrs.get(self.next) {
            self.next += 1;
            if acl.dest_allowed(addr.ip()) {
                return Some(addr);
            }
        }
        None
    }

    /// Records that the address last returned failed with `failure`.
    pub fn failed(&mut self, failure: Failure) {
        self.failure = failure;
    }

    /// The failure to reply with once no address connected: the last address's;
    /// [`Failure::DeniedByRule`] when the rules allowed none; [`Failure::DnsFailure`] when
    /// there was no address at all.
    pub fn failure(&self) -> Failure {
        self.failure
    }
}

/// Logs a request that failed (its reply was sent), with the client and the destination
/// asked for when the mode knows them.
pub fn log_request_failed(peer: Option<SocketAddr>, target: Option<&TargetAddr>, failure: Failure) {
    match (peer, target) {
        (Some(peer), Some(target)) => tracing::info!(%peer, %target, "request failed: {failure}"),
        (Some(peer), None) => tracing::info!(%peer, "request failed: {failure}"),
        (None, Some(target)) => tracing::info!(%target, "request failed: {failure}"),
        (None, None) => tracing::info!("request failed: {failure}"),
    }
}

/// Why a session ended, as the access log says it: `closed` when both sides finished, else
/// the error.
pub fn end_of<E: std::fmt::Display>(result: &Result<(), E>) -> String {
    match result {
        Ok(()) => "closed".to_owned(),
        Err(err) => err.to_string(),
    }
}

/// Makes closing these sockets send RST rather than FIN: what a relay does when one side
/// reset the connection, so the other side learns the stream was cut, not ended.
pub fn pass_reset_on<S: AsFd>(sockets: &[&S]) {
    for socket in sockets {
        let _ = rustix::net::sockopt::set_socket_linger(*socket, Some(Duration::ZERO));
    }
}

/// Logs the start of draining: `open` sessions may run on for up to `grace`.
pub fn log_draining(grace: Duration, open: usize) {
    if open > 0 {
        tracing::info!("shutting down: waiting up to {grace:?} for {open} sessions");
    }
}

/// Logs the end of the grace period with `open` sessions still running, which are closed.
pub fn log_grace_over(open: usize) {
    tracing::warn!("grace period over; closing {open} sessions");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_cidr;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("addr")
    }

    #[test]
    fn dialer_skips_denied_goes_past_failures_and_stops_on_exhaustion() {
        let acl = Acl {
            deny_dests: vec![parse_cidr("10.0.0.0/8").expect("cidr")],
            ..Acl::default()
        };
        // [denied, fails at once, ok]: the third is reached.
        let mut dialer = Dialer::new(vec![
            addr("10.0.0.1:80"),
            addr("255.255.255.255:80"),
            addr("127.0.0.1:80"),
        ]);
        assert_eq!(dialer.next_allowed(&acl), Some(addr("255.255.255.255:80")));
        dialer.failed(Failure::NetworkUnreachable);
        assert_eq!(dialer.next_allowed(&acl), Some(addr("127.0.0.1:80")));
        dialer.failed(Failure::ConnectionRefused);
        assert_eq!(dialer.next_allowed(&acl), None);
        assert_eq!(dialer.failure(), Failure::ConnectionRefused);

        let mut denied = Dialer::new(vec![addr("10.0.0.1:80"), addr("10.9.9.9:80")]);
        assert_eq!(denied.next_allowed(&acl), None);
        assert_eq!(denied.failure(), Failure::DeniedByRule);

        let mut exhausted = Dialer::new(vec![addr("127.0.0.1:1"), addr("127.0.0.1:2")]);
        assert!(exhausted.next_allowed(&acl).is_some());
        exhausted.failed(Failure::ResourceExhausted);
        assert_eq!(exhausted.next_allowed(&acl), None);
        assert_eq!(exhausted.failure(), Failure::ResourceExhausted);

        assert_eq!(Dialer::new(Vec::new()).failure(), Failure::DnsFailure);
    }

    #[test]
    fn admission_checks_the_client_rules_and_the_session_cap() {
        let config = Config {
            acl: Acl {
                allow_clients: vec![parse_cidr("127.0.0.0/8").expect("cidr")],
                ..Acl::default()
            },
            max_sessions: Some(2),
            ..Config::default()
        };
        assert!(admit(&config, addr("127.0.0.9:5000"), 1));
        assert!(!admit(&config, addr("127.0.0.9:5000"), 2));
        assert!(!admit(&config, addr("[::2]:5000"), 0));
    }
}
