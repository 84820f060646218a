//! Listening sockets: a deep backlog, and SO_REUSEPORT for worker processes.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;

use rustix::net::{sockopt, AddressFamily, SocketFlags, SocketType};

/// Accept queue length asked for; the kernel caps it at `net.core.somaxconn` (4096 here).
/// std's 128 overflows when thousands of clients connect at once.
pub const BACKLOG: i32 = 4096;

fn socket_for(addr: SocketAddr, reuse_port: bool) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let socket = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_reuseaddr(&socket, true)?;
    if reuse_port {
        sockopt::set_socket_reuseport(&socket, true)?;
    }
    rustix::net::bind(&socket, &addr)?;
    Ok(socket)
}

/// Binds and listens on `addr`; with `reuse_port`, other processes of this user may listen
/// on the same address and the kernel spreads connections over them.
pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = socket_for(addr, reuse_port)?;
    rustix::net::listen(&socket, BACKLOG)?;
    Ok(TcpListener::from(socket))
}

/// Reserves `addr` for worker processes without accepting on it: a bound socket with
/// SO_REUSEPORT that never listens (so no connection is queued to it). Resolves port 0.
pub fn reserve(addr: SocketAddr) -> io::Result<(OwnedFd, SocketAddr)> {
    let socket = socket_for(addr, true)?;
    let bound = rustix::net::getsockname(&socket)?;
    let bound = SocketAddr::try_from(bound)
        .map_err(|_| io::Error::other("bound address is not an IP socket address"))?;
    Ok((socket, bound))
}
