//! The SOCKS5 protocol core: bytes in, bytes out. No sockets, no system calls, no runtime and
//! no process-wide state live here, so every rule of the protocol can be tested by feeding
//! bytes, and every server mode drives the same code.
//!
//! - [`wire`]: constants, the command byte, the one address codec.
//! - [`handshake`]: the server's state machine from greeting to the request's answer.
//! - [`reply`]: reply codes, the failure → code table, the reply message.
//! - [`auth`]: username/password verification (RFC 1929).
//! - [`udp`]: the UDP ASSOCIATE datagram header.
//! - [`client`]: the client's side of the wire format (tests, benches, loadgen).
//! - [`proxy_header`]: the PROXY protocol header a trusted load balancer sends first.
#![forbid(unsafe_code)]

pub mod auth;
pub mod client;
pub mod handshake;
pub mod proxy_header;
pub mod reply;
pub mod udp;
pub mod wire;

pub use handshake::{Handshake, HandshakeError, Request, Step};
pub use reply::{Failure, ReplyCode};
pub use wire::{Command, TargetAddr};
