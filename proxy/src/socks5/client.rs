//! The client side of the SOCKS5 wire format, for tests, benchmarks and the load generator.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::socks5::handshake::{
    TargetAddr, ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6, AUTH_VERSION, SOCKS_VERSION,
};
use crate::socks5::reply::ReplyCode;

/// A server reply that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed SOCKS5 reply: {0}")]
pub struct BadReply(pub &'static str);

/// The greeting `VER NMETHODS METHODS` offering `methods`.
pub fn encode_greeting(methods: &[u8]) -> Vec<u8> {
    let mut out = vec![SOCKS_VERSION, methods.len() as u8];
    out.extend_from_slice(methods);
    out
}

/// The RFC 1929 request `VER ULEN UNAME PLEN PASSWD`; parts longer than 255 bytes are cut.
pub fn encode_auth(name: &str, password: &str) -> Vec<u8> {
    let name = &name.as_bytes()[..name.len().min(255)];
    let password = &password.as_bytes()[..password.len().min(255)];
    let mut out = vec![AUTH_VERSION, name.len() as u8];
    out.extend_from_slice(name);
    out.push(password.len() as u8);
    out.extend_from_slice(password);
    out
}

/// Appends the request `VER CMD RSV ATYP DST.ADDR DST.PORT`.
pub fn encode_request(command: u8, target: &TargetAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&[SOCKS_VERSION, command, 0x00]);
    target.encode(out);
}

/// Parses a reply from the front of `input`: `Ok(None)` while incomplete, else the code, the
/// bound address and how many bytes the reply took.
pub fn parse_reply(input: &[u8]) -> Result<Option<(ReplyCode, TargetAddr, usize)>, BadReply> {
    if input.len() < 4 {
        return Ok(None);
    }
    if input[0] != SOCKS_VERSION {
        return Err(BadReply("version is not 5"));
    }
    let code = ReplyCode::from_u8(input[1]).ok_or(BadReply("unknown reply code"))?;
    let (addr, used) = match input[3] {
        ATYP_IPV4 => {
            let Some(f) = input.get(4..10) else {
                return Ok(None);
            };
            let ip = Ipv4Addr::new(f[0], f[1], f[2], f[3]);
            (
                TargetAddr::Ip(SocketAddr::from((ip, u16::from_be_bytes([f[4], f[5]])))),
                10,
            )
        }
        ATYP_IPV6 => {
            let Some(f) = input.get(4..22) else {
                return Ok(None);
            };
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&f[..16]);
            let port = u16::from_be_bytes([f[16], f[17]]);
            (
                TargetAddr::Ip(SocketAddr::from((Ipv6Addr::from(octets), port))),
                22,
            )
        }
        ATYP_DOMAIN => {
            let Some(&len) = input.get(4) else {
                return Ok(None);
            };
            let end = 5 + len as usize + 2;
            let Some(f) = input.get(5..end) else {
                return Ok(None);
            };
            let (name, port) = f.split_at(len as usize);
            let name = String::from_utf8_lossy(name).into_owned();
            (
                TargetAddr::Domain(name, u16::from_be_bytes([port[0], port[1]])),
                end,
            )
        }
        _ => return Err(BadReply("unknown address type")),
    };
    Ok(Some((code, addr, used)))
}
