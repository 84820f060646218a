//! The SOCKS5 wire format every message shares: version and method constants, the command
//! byte, and the one address codec (`ATYP DST.ADDR DST.PORT`) used by the request parser, the
//! client's reply parser and the UDP datagram header alike.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// SOCKS protocol version 5.
pub const SOCKS_VERSION: u8 = 0x05;
/// Username/password sub-negotiation version (RFC 1929).
pub const AUTH_VERSION: u8 = 0x01;
/// Method: no authentication required.
pub const METHOD_NO_AUTH: u8 = 0x00;
/// Method: username/password (RFC 1929).
pub const METHOD_USERNAME_PASSWORD: u8 = 0x02;
/// Method reply meaning "no acceptable methods".
pub const METHOD_NONE_ACCEPTABLE: u8 = 0xFF;
/// Address type: IPv4.
pub const ATYP_IPV4: u8 = 0x01;
/// Address type: domain name.
pub const ATYP_DOMAIN: u8 = 0x03;
/// Address type: IPv6.
pub const ATYP_IPV6: u8 = 0x04;
/// The longest handshake message (an RFC 1929 request with 255-byte name and password).
pub const MAX_MESSAGE_LEN: usize = 1 + 1 + 255 + 1 + 255;

/// A SOCKS5 command (CMD field of a request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// 0x01 CONNECT.
    Connect,
    /// 0x02 BIND.
    Bind,
    /// 0x03 UDP ASSOCIATE.
    UdpAssociate,
    /// Any other value.
    Unknown(u8),
}

impl Command {
    /// The command a CMD byte names.
    pub fn from_byte(byte: u8) -> Self {
        match byte {
            0x01 => Command::Connect,
            0x02 => Command::Bind,
            0x03 => Command::UdpAssociate,
            other => Command::Unknown(other),
        }
    }

    /// The CMD byte on the wire.
    pub fn to_byte(self) -> u8 {
        match self {
            Command::Connect => 0x01,
            Command::Bind => 0x02,
            Command::UdpAssociate => 0x03,
            Command::Unknown(other) => other,
        }
    }
}

/// Why an address field cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum AddrError {
    /// ATYP is not IPv4, IPv6 or a domain name.
    #[error("address type {0:#04x} not supported")]
    UnknownType(u8),
    /// A domain name that is empty or not UTF-8.
    #[error("bad domain name")]
    BadName,
}

/// An address as SOCKS5 carries it: a socket address, or a name still to resolve.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetAddr {
    /// An IPv4 or IPv6 socket address.
    Ip(SocketAddr),
    /// A domain name and port.
    Domain(String, u16),
}

impl TargetAddr {
    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            TargetAddr::Ip(addr) => addr.port(),
            TargetAddr::Domain(_, port) => *port,
        }
    }

    /// Appends the ATYP, address and port fields as they appear on the wire (a name longer
    /// than 255 bytes is cut to 255).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            TargetAddr::Ip(addr) => encode_socket_addr(*addr, out),
            TargetAddr::Domain(name, port) => {
                let bytes = name.as_bytes();
                let len = bytes.len().min(255);
                out.push(ATYP_DOMAIN);
                out.push(len as u8);
                out.extend_from_slice(&bytes[..len]);
                out.extend_from_slice(&port.to_be_bytes());
            }
        }
    }

    /// Decodes `ATYP ADDR PORT` from the front of `input`: `Ok(None)` while the field is
    /// incomplete, else the address and how many bytes it took. The whole field is awaited
    /// before a name is judged, so every split of the input gives the same outcome.
    pub fn decode(input: &[u8]) -> Result<Option<(TargetAddr, usize)>, AddrError> {
        let Some(&atyp) = input.first() else {
            return Ok(None);
        };
        let field = &input[1..];
        match atyp {
            ATYP_IPV4 => Ok(field.get(..6).map(|f| {
                let ip = Ipv4Addr::new(f[0], f[1], f[2], f[3]);
                let port = u16::from_be_bytes([f[4], f[5]]);
                (TargetAddr::Ip(SocketAddr::from((ip, port))), 1 + 6)
            })),
            ATYP_IPV6 => Ok(field.get(..18).map(|f| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&f[..16]);
                let port = u16::from_be_bytes([f[16], f[17]]);
                let ip = Ipv6Addr::from(octets);
                (TargetAddr::Ip(SocketAddr::from((ip, port))), 1 + 18)
            })),
            ATYP_DOMAIN => {
                let Some(&len) = field.first() else {
                    return Ok(None);
                };
                let len = usize::from(len);
                let Some(f) = field.get(1..1 + len + 2) else {
                    return Ok(None);
                };
                let (name, port) = f.split_at(len);
                let name = std::str::from_utf8(name).map_err(|_| AddrError::BadName)?;
                if name.is_empty() {
                    return Err(AddrError::BadName);
                }
                let port = u16::from_be_bytes([port[0], port[1]]);
                Ok(Some((
                    TargetAddr::Domain(name.to_owned(), port),
                    1 + 1 + len + 2,
                )))
            }
            other => Err(AddrError::UnknownType(other)),
        }
    }
}

impl std::fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetAddr::Ip(addr) => write!(f, "{addr}"),
            TargetAddr::Domain(name, port) => write!(f, "{name}:{port}"),
        }
    }
}

/// Appends ATYP, address and port for a socket address.
pub fn encode_socket_addr(addr: SocketAddr, out: &mut Vec<u8>) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(ATYP_IPV4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(ATYP_IPV6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<TargetAddr> {
        vec![
            TargetAddr::Ip("127.0.0.1:80".parse().expect("addr")),
            TargetAddr::Ip("[::1]:65535".parse().expect("addr")),
            TargetAddr::Domain("localhost".into(), 8080),
            TargetAddr::Domain("x".into(), 0),
        ]
    }

    #[test]
    fn every_address_round_trips_and_every_prefix_is_incomplete() {
        for addr in samples() {
            let mut wire = Vec::new();
            addr.encode(&mut wire);
            for len in 0..wire.len() {
                assert_eq!(TargetAddr::decode(&wire[..len]), Ok(None), "{addr} {len}");
            }
            wire.extend_from_slice(b"after");
            let decoded = TargetAddr::decode(&wire).expect("valid");
            assert_eq!(decoded, Some((addr.clone(), wire.len() - 5)));
        }
    }

    #[test]
    fn empty_and_non_utf8_names_and_unknown_types_are_errors() {
        assert_eq!(
            TargetAddr::decode(&[ATYP_DOMAIN, 0, 0, 80]),
            Err(AddrError::BadName)
        );
        assert_eq!(TargetAddr::decode(&[ATYP_DOMAIN, 0, 0]), Ok(None));
        assert_eq!(
            TargetAddr::decode(&[ATYP_DOMAIN, 1, 0xFF, 0, 80]),
            Err(AddrError::BadName)
        );
        assert_eq!(
            TargetAddr::decode(&[0x07, 1, 2]),
            Err(AddrError::UnknownType(7))
        );
    }

    #[test]
    fn commands_round_trip_through_their_byte() {
        for byte in 0..=255u8 {
            assert_eq!(Command::from_byte(byte).to_byte(), byte);
        }
        assert_eq!(Command::from_byte(2), Command::Bind);
    }
}
