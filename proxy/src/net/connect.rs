//! Outgoing connections: a non-blocking connect through the descriptor gate, its outcome, and
//! the one classification of socket errors into SOCKS5 failure causes.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;

use rustix::net::{AddressFamily, SocketFlags, SocketType};

use super::burst_log::BurstLog;
use super::limits;
use crate::socks5::Failure;

static CONNECT_EXHAUSTED: BurstLog =
    BurstLog::new("cannot create an outgoing socket; replying 0x01");

/// Creates a non-blocking socket and starts connecting it to `addr`. The connect completes
/// when the socket becomes writable; [`connect_result`] then tells how it went.
pub fn start_connect(addr: SocketAddr) -> Result<TcpStream, Failure> {
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let started = limits::new_descriptor(|| {
        rustix::net::socket_with(
            family,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )
    })
    .and_then(|socket| match rustix::net::connect(&socket, &addr) {
        Ok(()) | Err(rustix::io::Errno::INPROGRESS) => Ok(TcpStream::from(socket)),
        Err(errno) => Err(errno),
    });
    started.map_err(|errno| {
        let failure = failure_of(&errno.into());
        if failure == Failure::ResourceExhausted {
            CONNECT_EXHAUSTED.hit(&errno);
        }
        failure
    })
}

/// The outcome of a non-blocking connect whose socket became writable.
pub fn connect_result(stream: &impl AsFd) -> Result<(), Failure> {
    match rustix::net::sockopt::socket_error(stream) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(errno)) | Err(errno) => Err(failure_of(&errno.into())),
    }
}

/// The local address of a connected outgoing socket: BND.ADDR of the success reply.
pub fn bound_addr(stream: &TcpStream) -> Result<SocketAddr, Failure> {
    stream.local_addr().map_err(|err| failure_of(&err))
}

/// Classifies an error from creating, binding or connecting a socket.
pub fn failure_of(err: &io::Error) -> Failure {
    if limits::is_resource_exhaustion(err) {
        return Failure::ResourceExhausted;
    }
    match err.kind() {
        io::ErrorKind::ConnectionRefused => Failure::ConnectionRefused,
        io::ErrorKind::NetworkUnreachable | io::ErrorKind::NetworkDown => {
            Failure::NetworkUnreachable
        }
        io::ErrorKind::HostUnreachable => Failure::HostUnreachable,
        io::ErrorKind::TimedOut => Failure::ConnectTimeout,
        // On connect, EADDRNOTAVAIL means no local port is free: the server's resource.
        io::ErrorKind::AddrNotAvailable => Failure::ResourceExhausted,
        io::ErrorKind::OutOfMemory => Failure::ResourceExhausted,
        _ => Failure::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socks5::ReplyCode;

    #[test]
    fn connect_errors_map_to_their_codes() {
        let cases = [
            (rustix::io::Errno::CONNREFUSED, ReplyCode::ConnectionRefused),
            (rustix::io::Errno::NETUNREACH, ReplyCode::NetworkUnreachable),
            (rustix::io::Errno::HOSTUNREACH, ReplyCode::HostUnreachable),
            (rustix::io::Errno::TIMEDOUT, ReplyCode::TtlExpired),
            (rustix::io::Errno::MFILE, ReplyCode::GeneralFailure),
            (rustix::io::Errno::ACCESS, ReplyCode::GeneralFailure),
            (rustix::io::Errno::ADDRNOTAVAIL, ReplyCode::GeneralFailure),
        ];
        for (errno, code) in cases {
            let err = io::Error::from_raw_os_error(errno.raw_os_error());
            assert_eq!(failure_of(&err).reply_code(), code, "{errno:?}");
        }
    }

    #[test]
    fn a_broadcast_address_fails_at_once_without_a_packet() {
        // The kernel refuses TCP to broadcast before sending anything: the dialer tests rely
        // on this as "an address that fails at once".
        let failure = start_connect("255.255.255.255:9".parse().expect("addr")).err();
        assert_eq!(failure, Some(Failure::NetworkUnreachable));
    }
}
