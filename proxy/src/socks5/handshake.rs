//! The SOCKS5 handshake as a sans-IO state machine: bytes in, replies and the next step out.
//!
//! No sockets live here. A server mode feeds whatever bytes arrived with [`Handshake::receive`],
//! calls [`Handshake::step`] and acts on the returned [`Step`]: write the bytes appended to `out`,
//! read more, open the outgoing connection, or close. Input may be split at any byte boundary,
//! and bytes the client pipelines after its request are kept for the relay
//! ([`Handshake::take_leftover`]). Behind a trusted load balancer
//! ([`Handshake::expecting_proxy_header`]), the PROXY protocol header that names the real
//! client comes first.

use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;

use super::auth::UserDb;
use super::proxy_header::{self, ProxyHeader, ProxyHeaderError};
use super::reply::{encode_failure_reply, encode_reply, Failure, ReplyCode};
use super::wire::{
    AddrError, Command, TargetAddr, AUTH_VERSION, METHOD_NONE_ACCEPTABLE, METHOD_NO_AUTH,
    METHOD_USERNAME_PASSWORD, SOCKS_VERSION,
};

/// A parsed request the server must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// CONNECT, BIND or UDP ASSOCIATE (unknown commands are answered by the core).
    pub command: Command,
    /// The destination.
    pub target: TargetAddr,
    /// The authenticated user, when username/password was negotiated.
    pub user: Option<String>,
    /// Behind a trusted balancer: the client its PROXY protocol header named, or the balancer
    /// when it named none; `None`: not behind a balancer (the connection's peer is the client
    /// and was judged on accept). The client rules apply to it.
    pub client: Option<SocketAddr>,
}

/// Why a handshake ended without a relay.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// The first byte of the greeting was not 5; closed without a reply.
    #[error("client spoke protocol version {0}, not SOCKS5")]
    BadVersion(u8),
    /// NMETHODS was zero.
    #[error("greeting offered no methods")]
    NoMethods,
    /// None of the client's methods is acceptable to this server.
    #[error("no acceptable authentication method offered")]
    NoAcceptableMethod,
    /// The username/password sub-negotiation had a version other than 1.
    #[error("username/password sub-negotiation version {0}, not 1")]
    BadAuthVersion(u8),
    /// Wrong username or password.
    #[error("authentication failed")]
    AuthFailed,
    /// The request failed with this cause (a failure reply was written).
    #[error("request failed: {0}")]
    Request(Failure),
    /// A connection from a trusted balancer did not start with a valid PROXY protocol
    /// header; closed without a reply.
    #[error(transparent)]
    ProxyHeader(#[from] ProxyHeaderError),
    /// The caller drove the handshake out of order (stepped it after its request was
    /// answered, or answered a request it was not asked to carry out).
    #[error("handshake driven out of order")]
    OutOfOrder,
}

/// What the caller must do next.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write any bytes appended to `out`, then read more input.
    NeedInput,
    /// Write any bytes appended to `out`, then carry out this request (CONNECT, BIND or UDP
    /// ASSOCIATE) and answer it: [`Handshake::request_granted`] with the bound address (for
    /// BIND, after [`Handshake::bind_listening`], with the peer's address), then relay; or
    /// [`Handshake::request_failed`]. A mode that does not serve a command fails it with
    /// [`Failure::CommandNotSupported`].
    Request(Request),
    /// Write the bytes appended to `out` (a failure reply, if any), then close.
    Close(HandshakeError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ProxyHeader,
    Greeting,
    Auth,
    Request,
    Connecting,
    Established,
    Closed,
}

/// One client's SOCKS5 handshake, from greeting to the CONNECT reply.
#[derive(Debug)]
pub struct Handshake {
    state: State,
    input: Vec<u8>,
    users: Option<Arc<UserDb>>,
    user: Option<String>,
    client: Option<SocketAddr>,
}

/// The outcome of parsing one message from the front of the input buffer.
enum Parsed<T> {
    Incomplete,
    Done { message: T, consumed: usize },
}

impl Handshake {
    /// Starts a handshake; with `users`, username/password authentication is required.
    pub fn new(users: Option<Arc<UserDb>>) -> Self {
        Handshake {
            state: State::Greeting,
            input: Vec::new(),
            users,
            user: None,
            client: None,
        }
    }

    /// Expects a PROXY protocol header (version 1 or 2) before the greeting: for connections
    /// from a trusted load balancer at `balancer` only. The client is then the one the header
    /// names, or the balancer itself when it names none (LOCAL, UNKNOWN).
    pub fn expecting_proxy_header(mut self, balancer: SocketAddr) -> Self {
        if self.state == State::Greeting {
            self.state = State::ProxyHeader;
            self.client = Some(balancer);
        }
        self
    }

    /// The user who authenticated, once one has.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// Behind a trusted balancer: the client its PROXY protocol header named (the balancer
    /// itself until one is parsed, or when it named none).
    pub fn proxied_client(&self) -> Option<SocketAddr> {
        self.client
    }

    /// Whether the state machine can use more input now. While it waits for a connect outcome
    /// it does not: the caller should stop reading so a pipelining client is held back.
    pub fn wants_input(&self) -> bool {
        matches!(
            self.state,
            State::ProxyHeader | State::Greeting | State::Auth | State::Request
        )
    }

    /// Appends bytes received from the client.
    pub fn receive(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// Processes the buffered input as far as it goes, appending replies to `out`.
    pub fn step(&mut self, out: &mut Vec<u8>) -> Step {
        loop {
            let progressed = match self.state {
                State::ProxyHeader => self.on_proxy_header(),
                State::Greeting => self.on_greeting(out),
                State::Auth => self.on_auth(out),
                State::Request => self.on_request(out),
                State::Connecting => return Step::NeedInput,
                State::Established | State::Closed => {
                    return Step::Close(HandshakeError::OutOfOrder)
                }
            };
            match progressed {
                Ok(None) => {}
                Ok(Some(step)) => return step,
                Err(err) => {
                    self.state = State::Closed;
                    self.input = Vec::new();
                    return Step::Close(err);
                }
            }
        }
    }

    /// Grants the request: appends the success reply, whose BND.ADDR/BND.PORT is `bound`
    /// (CONNECT: the outgoing socket's local address; BIND: the peer that connected; UDP
    /// ASSOCIATE: the relay socket). The relay may start once it is written.
    pub fn request_granted(
        &mut self,
        bound: SocketAddr,
        out: &mut Vec<u8>,
    ) -> Result<(), HandshakeError> {
        if self.state != State::Connecting {
            return Err(HandshakeError::OutOfOrder);
        }
        encode_reply(ReplyCode::Succeeded, bound, out);
        self.state = State::Established;
        Ok(())
    }

    /// BIND's first reply: the server listens at `listening` for the inbound connection.
    /// The second reply follows with [`Handshake::request_granted`] and the peer's address.
    pub fn bind_listening(&mut self, listening: SocketAddr, out: &mut Vec<u8>) {
        if self.state == State::Connecting {
            encode_reply(ReplyCode::Succeeded, listening, out);
        }
    }

    /// Fails the request: appends the failure reply for `failure` and returns why the
    /// session closes.
    pub fn request_failed(&mut self, failure: Failure, out: &mut Vec<u8>) -> HandshakeError {
        if self.state != State::Connecting {
            self.state = State::Closed;
            return HandshakeError::OutOfOrder;
        }
        self.fail_request(failure, out)
    }

    /// Takes the bytes the client sent after its request, which belong to the target.
    pub fn take_leftover(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.input)
    }

    fn fail_request(&mut self, failure: Failure, out: &mut Vec<u8>) -> HandshakeError {
        encode_failure_reply(failure.reply_code(), out);
        self.state = State::Closed;
        self.input = Vec::new();
        HandshakeError::Request(failure)
    }

    fn consume(&mut self, n: usize) {
        self.input.drain(..n);
    }

    fn on_proxy_header(&mut self) -> Result<Option<Step>, HandshakeError> {
        match proxy_header::parse(&self.input)? {
            proxy_header::Parsed::Incomplete => Ok(Some(Step::NeedInput)),
            proxy_header::Parsed::Done { header, consumed } => {
                if let ProxyHeader::Proxied { source, .. } = header {
                    self.client = Some(source);
                }
                self.consume(consumed);
                self.state = State::Greeting;
                Ok(None)
            }
        }
    }

    fn on_greeting(&mut self, out: &mut Vec<u8>) -> Result<Option<Step>, HandshakeError> {
        let methods = match parse_greeting(&self.input)? {
            Parsed::Incomplete => return Ok(Some(Step::NeedInput)),
            Parsed::Done { message, consumed } => {
                let chosen = self.choose_method(message);
                self.consume(consumed);
                chosen
            }
        };
        match methods {
            Some(method) => {
                out.extend_from_slice(&[SOCKS_VERSION, method]);
                self.state = if method == METHOD_USERNAME_PASSWORD {
                    State::Auth
                } else {
                    State::Request
                };
                Ok(None)
            }
            None => {
                out.extend_from_slice(&[SOCKS_VERSION, METHOD_NONE_ACCEPTABLE]);
                Err(HandshakeError::NoAcceptableMethod)
            }
        }
    }

    fn choose_method(&self, offered: &[u8]) -> Option<u8> {
        let wanted = if self.users.is_some() {
            METHOD_USERNAME_PASSWORD
        } else {
            METHOD_NO_AUTH
        };
        offered.contains(&wanted).then_some(wanted)
    }

    fn on_auth(&mut self, out: &mut Vec<u8>) -> Result<Option<Step>, HandshakeError> {
        let (ok, user, consumed) = match parse_auth(&self.input) {
            Err(err) => {
                out.extend_from_slice(&[AUTH_VERSION, 0x01]);
                return Err(err);
            }
            Ok(Parsed::Incomplete) => return Ok(Some(Step::NeedInput)),
            Ok(Parsed::Done {
                message: (name, password),
                consumed,
            }) => {
                let ok = self
                    .users
                    .as_ref()
                    .is_some_and(|users| users.verify(name, password));
                (ok, String::from_utf8_lossy(name).into_owned(), consumed)
            }
        };
        self.consume(consumed);
        if ok {
            out.extend_from_slice(&[AUTH_VERSION, 0x00]);
            self.user = Some(user);
            self.state = State::Request;
            Ok(None)
        } else {
            out.extend_from_slice(&[AUTH_VERSION, 0x01]);
            Err(HandshakeError::AuthFailed)
        }
    }

    fn on_request(&mut self, out: &mut Vec<u8>) -> Result<Option<Step>, HandshakeError> {
        match parse_request(&self.input) {
            Ok(Parsed::Incomplete) => Ok(Some(Step::NeedInput)),
            Err(failure) => Ok(Some(Step::Close(self.fail_request(failure, out)))),
            Ok(Parsed::Done {
                message: (command, target),
                consumed,
            }) => {
                self.consume(consumed);
                if matches!(command, Command::Unknown(_)) {
                    let err = self.fail_request(Failure::CommandNotSupported, out);
                    return Ok(Some(Step::Close(err)));
                }
                self.state = State::Connecting;
                Ok(Some(Step::Request(Request {
                    command,
                    target,
                    user: self.user.take(),
                    client: self.client,
                })))
            }
        }
    }
}

/// Parses `VER NMETHODS METHODS`, returning the offered methods.
fn parse_greeting(input: &[u8]) -> Result<Parsed<&[u8]>, HandshakeError> {
    let Some(&version) = input.first() else {
        return Ok(Parsed::Incomplete);
    };
    if version != SOCKS_VERSION {
        return Err(HandshakeError::BadVersion(version));
    }
    let Some(&count) = input.get(1) else {
        return Ok(Parsed::Incomplete);
    };
    if count == 0 {
        return Err(HandshakeError::NoMethods);
    }
    let end = 2 + count as usize;
    match input.get(2..end) {
        None => Ok(Parsed::Incomplete),
        Some(methods) => Ok(Parsed::Done {
            message: methods,
            consumed: end,
        }),
    }
}

/// A username and password as received.
type Credentials<'a> = (&'a [u8], &'a [u8]);

/// Parses `VER ULEN UNAME PLEN PASSWD` (RFC 1929).
fn parse_auth(input: &[u8]) -> Result<Parsed<Credentials<'_>>, HandshakeError> {
    let Some(&version) = input.first() else {
        return Ok(Parsed::Incomplete);
    };
    if version != AUTH_VERSION {
        return Err(HandshakeError::BadAuthVersion(version));
    }
    let Some(&name_len) = input.get(1) else {
        return Ok(Parsed::Incomplete);
    };
    let name_end = 2 + name_len as usize;
    let Some(&pass_len) = input.get(name_end) else {
        return Ok(Parsed::Incomplete);
    };
    let pass_end = name_end + 1 + pass_len as usize;
    if input.len() < pass_end {
        return Ok(Parsed::Incomplete);
    }
    Ok(Parsed::Done {
        message: (&input[2..name_end], &input[name_end + 1..pass_end]),
        consumed: pass_end,
    })
}

/// Parses `VER CMD RSV ATYP DST.ADDR DST.PORT`; an error is the failure to reply with.
fn parse_request(input: &[u8]) -> Result<Parsed<(Command, TargetAddr)>, Failure> {
    if input.len() < 4 {
        // Reject a wrong version as soon as it is visible rather than waiting for more bytes.
        if input.first().is_some_and(|&v| v != SOCKS_VERSION) {
            return Err(Failure::Malformed);
        }
        return Ok(Parsed::Incomplete);
    }
    let (version, command, reserved) = (input[0], input[1], input[2]);
    if version != SOCKS_VERSION {
        return Err(Failure::Malformed);
    }
    let (target, used) = match TargetAddr::decode(&input[3..]) {
        Ok(None) => return Ok(Parsed::Incomplete),
        Ok(Some(decoded)) => decoded,
        Err(AddrError::UnknownType(_)) => return Err(Failure::AddressTypeNotSupported),
        Err(AddrError::BadName) => return Err(Failure::Malformed),
    };
    if reserved != 0 {
        return Err(Failure::Malformed);
    }
    Ok(Parsed::Done {
        message: (Command::from_byte(command), target),
        consumed: 3 + used,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socks5::client;
    use std::net::Ipv6Addr;

    fn users() -> Option<Arc<UserDb>> {
        let mut db = UserDb::default();
        db.insert("alice", "s3cret");
        Some(Arc::new(db))
    }

    /// Feeds `input` in chunks cut at `cuts`, returning the output and each step taken.
    fn run(hs: &mut Handshake, input: &[u8], cuts: &[usize]) -> (Vec<u8>, Vec<Step>) {
        let mut out = Vec::new();
        let mut steps = Vec::new();
        let mut start = 0;
        for &cut in cuts.iter().chain(std::iter::once(&input.len())) {
            if !hs.wants_input() {
                break;
            }
            hs.receive(&input[start..cut]);
            start = cut;
            let step = hs.step(&mut out);
            let stop = !matches!(step, Step::NeedInput);
            steps.push(step);
            if stop {
                break;
            }
        }
        (out, steps)
    }

    fn connect_request(target: &TargetAddr) -> Vec<u8> {
        let mut bytes = Vec::new();
        client::encode_request(Command::Connect, target, &mut bytes);
        bytes
    }

    fn every_split(message: &[u8]) -> impl Iterator<Item = Vec<usize>> + '_ {
        // Every single cut, plus the byte-at-a-time split.
        (0..=message.len())
            .map(|cut| vec![cut])
            .chain(std::iter::once((1..message.len()).collect()))
    }

    #[test]
    fn no_auth_connect_at_every_split_gives_one_outcome() {
        let targets = [
            TargetAddr::Ip("127.0.0.1:80".parse().expect("addr")),
            TargetAddr::Ip("[::1]:443".parse().expect("addr")),
            TargetAddr::Domain("localhost".into(), 8080),
        ];
        for target in targets {
            let mut wire = client::encode_greeting(&[METHOD_NO_AUTH]);
            wire.extend(connect_request(&target));
            wire.extend_from_slice(b"pipelined");
            for cuts in every_split(&wire) {
                let mut hs = Handshake::new(None);
                let (out, steps) = run(&mut hs, &wire, &cuts);
                assert_eq!(out, [5, 0], "cuts {cuts:?}");
                let Some(Step::Request(request)) = steps.last() else {
                    panic!("no connect for cuts {cuts:?}: {steps:?}");
                };
                assert_eq!(request.target, target);
                assert_eq!(request.command, Command::Connect);
                // Bytes past the request that were fed before the connect stay for the relay.
                let leftover = hs.take_leftover();
                assert!(b"pipelined".starts_with(&leftover), "cuts {cuts:?}");
            }
        }
    }

    #[test]
    fn a_proxy_header_then_the_handshake_at_every_split_names_the_client() {
        use crate::socks5::proxy_header::{encode_v1, encode_v2};
        let client_addr: SocketAddr = "192.0.2.7:50000".parse().expect("addr");
        let frontend: SocketAddr = "203.0.113.1:1080".parse().expect("addr");
        let target = TargetAddr::Domain("example.test".into(), 443);
        for header in [
            encode_v1(client_addr, frontend),
            encode_v2(client_addr, frontend, &[]),
        ] {
            let mut wire = header.clone();
            wire.extend(client::encode_greeting(&[METHOD_USERNAME_PASSWORD]));
            wire.extend(client::encode_auth("alice", "s3cret"));
            wire.extend(connect_request(&target));
            for cuts in every_split(&wire) {
                let mut hs = Handshake::new(users()).expecting_proxy_header(frontend);
                let (out, steps) = run(&mut hs, &wire, &cuts);
                assert_eq!(out, [5, 2, 1, 0], "cuts {cuts:?}");
                let Some(Step::Request(request)) = steps.last() else {
                    panic!("no request for cuts {cuts:?}: {steps:?}");
                };
                assert_eq!(request.client, Some(client_addr));
                assert_eq!(request.user.as_deref(), Some("alice"));
                assert_eq!(hs.proxied_client(), Some(client_addr));
            }
        }
    }

    #[test]
    fn a_missing_or_broken_proxy_header_closes_without_a_reply() {
        for wire in [
            &[5u8, 1, 0][..],
            b"PROXY TCP9 a b 1 2\r\n",
            b"\r\n\r\n\0\r\nQUIT\n\x11",
        ] {
            let balancer: SocketAddr = "127.0.0.1:9".parse().expect("addr");
            let mut hs = Handshake::new(None).expecting_proxy_header(balancer);
            hs.receive(wire);
            let mut out = Vec::new();
            assert!(
                matches!(
                    hs.step(&mut out),
                    Step::Close(HandshakeError::ProxyHeader(_))
                ),
                "{wire:?}"
            );
            assert!(out.is_empty());
        }
        // Without the expectation, the header is not SOCKS5.
        let mut hs = Handshake::new(None);
        hs.receive(b"PROXY UNKNOWN\r\n");
        assert_eq!(
            hs.step(&mut Vec::new()),
            Step::Close(HandshakeError::BadVersion(b'P'))
        );
    }

    #[test]
    fn pipelined_data_is_kept_for_the_relay() {
        let target = TargetAddr::Ip("10.1.2.3:22".parse().expect("addr"));
        let mut wire = client::encode_greeting(&[METHOD_NO_AUTH]);
        wire.extend(connect_request(&target));
        wire.extend_from_slice(b"hello target");
        let mut hs = Handshake::new(None);
        hs.receive(&wire);
        let mut out = Vec::new();
        assert!(matches!(hs.step(&mut out), Step::Request(_)));
        assert!(!hs.wants_input());
        let bound: SocketAddr = "127.0.0.1:5555".parse().expect("addr");
        assert_eq!(hs.request_granted(bound, &mut out), Ok(()));
        assert_eq!(out, [5, 0, 5, 0, 0, 1, 127, 0, 0, 1, 0x15, 0xb3]);
        assert_eq!(hs.take_leftover(), b"hello target");
    }

    #[test]
    fn username_password_at_every_split() {
        let target = TargetAddr::Domain("example.test".into(), 443);
        let mut wire = client::encode_greeting(&[METHOD_NO_AUTH, METHOD_USERNAME_PASSWORD]);
        wire.extend(client::encode_auth("alice", "s3cret"));
        wire.extend(connect_request(&target));
        for cuts in every_split(&wire) {
            let mut hs = Handshake::new(users());
            let (out, steps) = run(&mut hs, &wire, &cuts);
            assert_eq!(out, [5, 2, 1, 0], "cuts {cuts:?}");
            match steps.last() {
                Some(Step::Request(request)) => {
                    assert_eq!(request.target, target);
                    assert_eq!(request.user.as_deref(), Some("alice"));
                }
                other => panic!("cuts {cuts:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn wrong_password_gets_status_failure_and_close() {
        let mut wire = client::encode_greeting(&[METHOD_USERNAME_PASSWORD]);
        wire.extend(client::encode_auth("alice", "wrong"));
        for cuts in every_split(&wire) {
            let mut hs = Handshake::new(users());
            let (out, steps) = run(&mut hs, &wire, &cuts);
            assert_eq!(out, [5, 2, 1, 1]);
            assert_eq!(steps.last(), Some(&Step::Close(HandshakeError::AuthFailed)));
        }
    }

    #[test]
    fn unknown_user_and_empty_credentials_fail() {
        for (name, pass) in [("bob", "s3cret"), ("", ""), ("alice", "")] {
            let mut wire = client::encode_greeting(&[METHOD_USERNAME_PASSWORD]);
            wire.extend(client::encode_auth(name, pass));
            let mut hs = Handshake::new(users());
            let (out, steps) = run(&mut hs, &wire, &[]);
            assert_eq!(out, [5, 2, 1, 1]);
            assert_eq!(steps.last(), Some(&Step::Close(HandshakeError::AuthFailed)));
        }
    }

    #[test]
    fn bad_auth_version_is_rejected() {
        let mut wire = client::encode_greeting(&[METHOD_USERNAME_PASSWORD]);
        wire.extend_from_slice(&[0x05, 1, b'a', 1, b'b']);
        let mut hs = Handshake::new(users());
        let (out, steps) = run(&mut hs, &wire, &[]);
        assert_eq!(out, [5, 2, 1, 1]);
        assert_eq!(
            steps.last(),
            Some(&Step::Close(HandshakeError::BadAuthVersion(5)))
        );
    }

    #[test]
    fn method_is_chosen_only_among_those_offered() {
        // Auth required but the client offers only "no auth".
        let mut hs = Handshake::new(users());
        let (out, steps) = run(&mut hs, &[5, 1, 0], &[]);
        assert_eq!(out, [5, 0xFF]);
        assert_eq!(
            steps.last(),
            Some(&Step::Close(HandshakeError::NoAcceptableMethod))
        );
        // No auth configured but the client offers only username/password and GSSAPI.
        let mut hs = Handshake::new(None);
        let (out, _) = run(&mut hs, &[5, 2, 2, 1], &[]);
        assert_eq!(out, [5, 0xFF]);
    }

    #[test]
    fn malformed_greetings_close() {
        let mut hs = Handshake::new(None);
        let (out, steps) = run(&mut hs, &[4, 1, 0], &[]);
        assert!(out.is_empty());
        assert_eq!(
            steps.last(),
            Some(&Step::Close(HandshakeError::BadVersion(4)))
        );

        let mut hs = Handshake::new(None);
        let (out, steps) = run(&mut hs, &[5, 0], &[]);
        assert!(out.is_empty());
        assert_eq!(steps.last(), Some(&Step::Close(HandshakeError::NoMethods)));
    }

    fn request_reply(request: &[u8]) -> (Vec<u8>, Step) {
        let mut hs = Handshake::new(None);
        let mut out = Vec::new();
        hs.receive(&[5, 1, 0]);
        assert_eq!(hs.step(&mut out), Step::NeedInput);
        out.clear();
        hs.receive(request);
        let step = hs.step(&mut out);
        (out, step)
    }

    #[test]
    fn request_errors_map_to_reply_codes() {
        let cases: [(&[u8], u8); 5] = [
            (&[5, 9, 0, 1, 127, 0, 0, 1, 0, 80], 0x07), // unknown command
            (&[5, 1, 0, 7], 0x08),                      // unknown ATYP
            (&[5, 1, 1, 1, 127, 0, 0, 1, 0, 80], 0x01), // RSV not zero
            (&[4, 1, 0, 1, 127, 0, 0, 1, 0, 80], 0x01), // bad version
            (&[5, 1, 0, 3, 0, 0, 80], 0x01),            // zero-length domain
        ];
        for (request, code) in cases {
            let (out, step) = request_reply(request);
            assert_eq!(out, [5, code, 0, 1, 0, 0, 0, 0, 0, 0], "{request:?}");
            assert!(matches!(step, Step::Close(HandshakeError::Request(_))));
        }
    }

    #[test]
    fn bind_and_udp_associate_reach_the_mode() {
        for (command, expected) in [(2u8, Command::Bind), (3, Command::UdpAssociate)] {
            let (out, step) = request_reply(&[5, command, 0, 1, 127, 0, 0, 1, 0, 0]);
            assert!(out.is_empty());
            let Step::Request(request) = step else {
                panic!("{step:?}");
            };
            assert_eq!(request.command, expected);
        }
        // BIND: two replies, then relay.
        let mut hs = Handshake::new(None);
        let mut out = Vec::new();
        hs.receive(&[5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 0]);
        assert!(matches!(hs.step(&mut out), Step::Request(_)));
        out.clear();
        hs.bind_listening("127.0.0.1:1000".parse().expect("addr"), &mut out);
        hs.request_granted("127.0.0.2:2000".parse().expect("addr"), &mut out)
            .expect("granted");
        assert_eq!(
            out,
            [5, 0, 0, 1, 127, 0, 0, 1, 0x03, 0xe8, 5, 0, 0, 1, 127, 0, 0, 2, 0x07, 0xd0]
        );
    }

    #[test]
    fn connect_failure_reply_uses_the_table() {
        let mut hs = Handshake::new(None);
        let mut out = Vec::new();
        hs.receive(&[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80]);
        assert!(matches!(hs.step(&mut out), Step::Request(_)));
        out.clear();
        let err = hs.request_failed(Failure::ConnectionRefused, &mut out);
        assert_eq!(out, [5, 5, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(err, HandshakeError::Request(Failure::ConnectionRefused));
        assert_eq!(hs.step(&mut out), Step::Close(HandshakeError::OutOfOrder));
        assert!(!hs.wants_input());
    }

    #[test]
    fn success_reply_carries_ipv6_bound_address() {
        let mut hs = Handshake::new(None);
        let mut out = Vec::new();
        hs.receive(&[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80]);
        assert!(matches!(hs.step(&mut out), Step::Request(_)));
        out.clear();
        hs.request_granted("[::1]:258".parse().expect("addr"), &mut out)
            .expect("granted");
        let mut expected = vec![5, 0, 0, 4];
        expected.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        expected.extend_from_slice(&[1, 2]);
        assert_eq!(out, expected);
    }

    #[test]
    fn success_without_connect_is_refused() {
        let mut hs = Handshake::new(None);
        let mut out = Vec::new();
        let granted = hs.request_granted("127.0.0.1:1".parse().expect("addr"), &mut out);
        assert_eq!(granted, Err(HandshakeError::OutOfOrder));
        assert!(out.is_empty());
        // Nor may a granted request be stepped again or answered twice.
        let mut hs = Handshake::new(None);
        hs.receive(&[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0, 80]);
        assert!(matches!(hs.step(&mut out), Step::Request(_)));
        hs.request_granted("127.0.0.1:1".parse().expect("addr"), &mut out)
            .expect("granted");
        assert_eq!(hs.step(&mut out), Step::Close(HandshakeError::OutOfOrder));
        let again = hs.request_failed(Failure::Other, &mut Vec::new());
        assert_eq!(again, HandshakeError::OutOfOrder);
    }

    #[test]
    fn every_truncated_prefix_needs_input() {
        let target = TargetAddr::Domain("a.example".into(), 1);
        let mut wire = client::encode_greeting(&[METHOD_USERNAME_PASSWORD]);
        wire.extend(client::encode_auth("alice", "s3cret"));
        wire.extend(connect_request(&target));
        for len in 0..wire.len() {
            let mut hs = Handshake::new(users());
            hs.receive(&wire[..len]);
            assert_eq!(hs.step(&mut Vec::new()), Step::NeedInput, "prefix {len}");
        }
    }

    #[test]
    fn client_parses_what_the_server_writes() {
        for bound in ["127.0.0.1:9", "[::1]:65535"] {
            let bound: SocketAddr = bound.parse().expect("addr");
            let mut out = Vec::new();
            encode_reply(ReplyCode::Succeeded, bound, &mut out);
            for len in 0..out.len() {
                assert_eq!(client::parse_reply(&out[..len]), Ok(None));
            }
            let (code, addr, used) = client::parse_reply(&out).expect("valid").expect("complete");
            assert_eq!((code, used), (ReplyCode::Succeeded, out.len()));
            assert_eq!(addr, TargetAddr::Ip(bound));
        }
    }
}
