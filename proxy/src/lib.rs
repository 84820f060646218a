//! A SOCKS5 server (RFC 1928 CONNECT, BIND and UDP ASSOCIATE; RFC 1929 username/password)
//! with one sans-IO protocol core and interchangeable concurrency models.
//!
//! Three layers, each using only those below it:
//!
//! ```text
//!   modes/      how a server waits: threads, select, poll, epoll, epoll-et, async
//!               (+ modes/session.rs: the policy every mode applies the same way)
//!      │
//!   net/  relay.rs   OS plumbing (listen, connect, descriptor limits, resolver, logs)
//!      │             and the one relay pipe every mode moves bytes with
//!   socks5/     the protocol: bytes in, bytes out; no sockets, no unsafe
//! ```
//!
//! Beside them: `config/` (what a server is told: rules, timeouts, users), `shutdown.rs` (the
//! trigger every mode waits on) and `workers.rs` (`--workers N`: a supervisor of processes).
//!
//! | module | what lives there |
//! |---|---|
//! | [`socks5::wire`] | constants, the command byte, the one address codec |
//! | [`socks5::handshake`] | the server's handshake state machine |
//! | [`socks5::reply`] | reply codes, failure → code, the reply message |
//! | [`socks5::auth`], [`socks5::udp`], [`socks5::client`] | RFC 1929 check; UDP header; client side |
//! | [`relay`] | the pipe: bytes from one socket to the other, with backpressure |
//! | [`net::listener`] | listening sockets and the ready line |
//! | [`net::connect`] | outgoing connects and errno → failure |
//! | [`net::limits`] | descriptor limit, the reserve, refusing on exhaustion |
//! | [`net::resolver`], [`net::burst_log`] | getaddrinfo off the loops; rate-limited warnings |
//! | [`modes::session`] | admission, the dialer, resets, draining |
//! | [`modes::threads`], [`modes::readiness`], [`modes::async_tokio`] | the drivers |
//! | [`config`], [`shutdown`], [`workers`] | settings, the stop trigger, worker processes |
//!
//! A program binds a listener and calls [`modes::run`] with a [`Config`], a [`Mode`] and a
//! [`Shutdown`] trigger; or, inside a tokio runtime, [`modes::async_tokio::serve`].

pub mod config;
pub mod metrics;
pub mod modes;
pub mod net;
pub mod relay;
pub mod shutdown;
pub mod socks5;
pub mod workers;

pub use config::{Acl, Config};
pub use modes::Mode;
pub use shutdown::Shutdown;
