//! Replies (RFC 1928 §6): the reply codes, the one table from the cause of a failed request
//! to its code, and the reply message.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};

use super::wire::{encode_socket_addr, SOCKS_VERSION};

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
}

/// Appends a complete reply `VER REP RSV ATYP BND.ADDR BND.PORT`.
pub fn encode_reply(code: ReplyCode, bound: SocketAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&[SOCKS_VERSION, code.as_u8(), 0x00]);
    encode_socket_addr(bound, out);
}

/// Appends a failure reply, whose bound address is all zeros.
pub fn encode_failure_reply(code: ReplyCode, out: &mut Vec<u8>) {
    encode_reply(code, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), out);
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
    fn causes_map_to_their_codes() {
        let cases = [
            (Failure::Malformed, ReplyCode::GeneralFailure),
            (Failure::ResourceExhausted, ReplyCode::GeneralFailure),
            (Failure::Other, ReplyCode::GeneralFailure),
            (Failure::DeniedByRule, ReplyCode::NotAllowed),
            (Failure::NetworkUnreachable, ReplyCode::NetworkUnreachable),
            (Failure::HostUnreachable, ReplyCode::HostUnreachable),
            (Failure::DnsFailure, ReplyCode::HostUnreachable),
            (Failure::ConnectionRefused, ReplyCode::ConnectionRefused),
            (Failure::ConnectTimeout, ReplyCode::TtlExpired),
            (Failure::CommandNotSupported, ReplyCode::CommandNotSupported),
            (
                Failure::AddressTypeNotSupported,
                ReplyCode::AddressTypeNotSupported,
            ),
        ];
        for (failure, code) in cases {
            assert_eq!(failure.reply_code(), code, "{failure}");
        }
    }
}
