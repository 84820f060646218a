//! Listening sockets (a deep backlog, SO_REUSEPORT for worker processes) and the ready line
//! a server prints once it listens.

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

/// The line a server prints on stdout once it accepts connections:
/// `listening on ADDR [ADDR…] [mode=MODE]`. Scripts and supervisors wait for it.
pub fn ready_line(addrs: &[SocketAddr], mode: Option<&str>) -> String {
    let mut line = String::from("listening on");
    for addr in addrs {
        line.push(' ');
        line.push_str(&addr.to_string());
    }
    if let Some(mode) = mode {
        line.push_str(" mode=");
        line.push_str(mode);
    }
    line
}

/// What a ready line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The addresses listened on, in order.
    pub addrs: Vec<SocketAddr>,
    /// The mode, when the line names one.
    pub mode: Option<String>,
}

/// Parses a line written by [`ready_line`] (a trailing newline is allowed); `None` for any
/// other line.
pub fn parse_ready_line(line: &str) -> Option<Ready> {
    let rest = line.trim_end().strip_prefix("listening on ")?;
    let mut ready = Ready {
        addrs: Vec::new(),
        mode: None,
    };
    for word in rest.split_whitespace() {
        match word.strip_prefix("mode=") {
            Some(mode) => ready.mode = Some(mode.to_owned()),
            None if ready.mode.is_none() => ready.addrs.push(word.parse().ok()?),
            None => return None,
        }
    }
    (!ready.addrs.is_empty()).then_some(ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_round_trip() {
        let addrs: Vec<SocketAddr> = vec![
            "127.0.0.1:1080".parse().expect("addr"),
            "[::1]:9".parse().expect("addr"),
        ];
        let line = ready_line(&addrs, Some("epoll-et"));
        assert_eq!(line, "listening on 127.0.0.1:1080 [::1]:9 mode=epoll-et");
        let ready = parse_ready_line(&format!("{line}\n")).expect("ready line");
        assert_eq!(ready.addrs, addrs);
        assert_eq!(ready.mode.as_deref(), Some("epoll-et"));
        let echo = parse_ready_line(&ready_line(&addrs[..1], None)).expect("ready line");
        assert_eq!((echo.addrs.len(), echo.mode), (1, None));
        for other in [
            "",
            "listening on",
            "listening on nowhere",
            "ready 127.0.0.1:1",
        ] {
            assert_eq!(parse_ready_line(other), None, "{other:?}");
        }
    }
}
