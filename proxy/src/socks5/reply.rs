//! The one table from the cause of a failed session to its SOCKS5 reply code (RFC 1928 §6).

use std::fmt;
use std::io;

/// A SOCKS5 reply code (the REP field of a reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReplyCode {
    /// 0x00: the request succeeded.
    Succeeded = 0x00,
    /// 0x01: general SOCKS server failure.
    GeneralFailure = 0x01,
    /// 0x02: connection not allowed by ruleset.
    NotAllowed = 0x02,
    /// 0x03: network unreachable.
    NetworkUnreachable = 0x03,
    /// 0x04: host unreachable (also used for a name that does not resolve).
    HostUnreachable = 0x04,
    /// 0x05: connection refused by the target.
    ConnectionRefused = 0x05,
    /// 0x06: TTL expired; used, as by most servers, for a connect timeout.
    TtlExpired = 0x06,
    /// 0x07: command not supported.
    CommandNotSupported = 0x07,
    /// 0x08: address type not supported.
    AddressTypeNotSupported = 0x08,
}

impl ReplyCode {
    /// The byte on the wire.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The code for a byte on the wire, if it is one RFC 1928 defines.
    pub fn from_u8(byte: u8) -> Option<Self> {
        Some(match byte {
            0x00 => Self::Succeeded,
            0x01 => Self::GeneralFailure,
            0x02 => Self::NotAllowed,
            0x03 => Self::NetworkUnreachable,
            0x04 => Self::HostUnreachable,
            0x05 => Self::ConnectionRefused,
            0x06 => Self::TtlExpired,
            0x07 => Self::CommandNotSupported,
            0x08 => Self::AddressTypeNotSupported,
            _ => return None,
        })
    }
}

/// Why a session failed after its request was parsed; each cause has exactly one reply code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// The request was malformed (bad version, RSV not zero, empty domain name).
    Malformed,
    /// An access rule denied the destination.
    DeniedByRule,
    /// The kernel has no route to the destination network.
    NetworkUnreachable,
    /// The destination host cannot be reached.
    HostUnreachable,
    /// The domain name did not resolve to any address.
    DnsFailure,
    /// The target refused the connection.
    ConnectionRefused,
    /// The connect did not complete within the connect timeout.
    ConnectTimeout,
    /// The command is not CONNECT (BIND, UDP ASSOCIATE or unknown).
    CommandNotSupported,
    /// ATYP is not IPv4, IPv6 or a domain name.
    AddressTypeNotSupported,
    /// The server ran out of a resource (descriptors, threads, memory).
    ResourceExhausted,
    /// Anything else.
    Other,
}

impl Failure {
    /// The single mapping from a cause to the reply code sent to the client.
    pub fn reply_code(self) -> ReplyCode {
        match self {
            Failure::Malformed | Failure::ResourceExhausted | Failure::Other => {
                ReplyCode::GeneralFailure
            }
            Failure::DeniedByRule => ReplyCode::NotAllowed,
            Failure::NetworkUnreachable => ReplyCode::NetworkUnreachable,
            Failure::HostUnreachable | Failure::DnsFailure => ReplyCode::HostUnreachable,
            Failure::ConnectionRefused => ReplyCode::ConnectionRefused,
            Failure::ConnectTimeout => ReplyCode::TtlExpired,
            Failure::CommandNotSupported => ReplyCode::CommandNotSupported,
            Failure::AddressTypeNotSupported => ReplyCode::AddressTypeNotSupported,
        }
    }

    /// Classifies an error from creating or connecting the outgoing socket.
    pub fn from_connect_error(err: &io::Error) -> Self {
        if crate::net::limits::is_resource_exhaustion(err) {
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
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Failure::Malformed => "malformed request",
            Failure::DeniedByRule => "destination denied by rule",
            Failure::NetworkUnreachable => "network unreachable",
            Failure::HostUnreachable => "host unreachable",
            Failure::DnsFailure => "name did not resolve",
            Failure::ConnectionRefused => "connection refused by target",
            Failure::ConnectTimeout => "connect timed out",
            Failure::CommandNotSupported => "command not supported",
            Failure::AddressTypeNotSupported => "address type not supported",
            Failure::ResourceExhausted => "server out of resources",
            Failure::Other => "general failure",
        };
        f.write_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_byte() {
        for byte in 0..=8u8 {
            let code = ReplyCode::from_u8(byte).expect("defined code");
            assert_eq!(code.as_u8(), byte);
        }
        assert_eq!(ReplyCode::from_u8(9), None);
    }

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
            assert_eq!(
                Failure::from_connect_error(&err).reply_code(),
                code,
                "{errno:?}"
            );
        }
        assert_eq!(Failure::DnsFailure.reply_code(), ReplyCode::HostUnreachable);
        assert_eq!(Failure::DeniedByRule.reply_code(), ReplyCode::NotAllowed);
        assert_eq!(
            Failure::CommandNotSupported.reply_code(),
            ReplyCode::CommandNotSupported
        );
        assert_eq!(
            Failure::AddressTypeNotSupported.reply_code(),
            ReplyCode::AddressTypeNotSupported
        );
    }
}
