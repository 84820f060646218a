//! Why a session ended early, common to every mode.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;

use rustix::net::{AddressFamily, SocketFlags, SocketType};
use thiserror::Error;

use crate::socks5::handshake::HandshakeError;
use crate::socks5::reply::Failure;

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
    /// A state the protocol core should never produce.
    #[error("protocol state error: {0}")]
    Protocol(&'static str),
}

/// Creates a non-blocking socket and starts connecting it to `addr`. The connect completes
/// when the socket becomes writable; [`connect_result`] then tells how it went.
pub fn start_connect(addr: SocketAddr) -> Result<TcpStream, Failure> {
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let socket = crate::net::limits::new_descriptor(|| {
        rustix::net::socket_with(
            family,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
    })
    .map_err(|errno| Failure::from_connect_error(&errno.into()))?;
    match rustix::net::connect(&socket, &addr) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => Ok(TcpStream::from(socket)),
        Err(errno) => Err(Failure::from_connect_error(&errno.into())),
    }
}

/// The outcome of a non-blocking connect whose socket became writable.
pub fn connect_result(stream: &impl AsFd) -> Result<(), Failure> {
    match rustix::net::sockopt::socket_error(stream) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(errno)) | Err(errno) => Err(Failure::from_connect_error(&errno.into())),
    }
}
