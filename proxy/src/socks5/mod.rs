//! The SOCKS5 protocol core.

pub mod auth;
pub mod client;
pub mod handshake;
pub mod reply;
pub mod udp;
