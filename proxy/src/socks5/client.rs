//! The client side of the SOCKS5 wire format, for tests, benchmarks and the load generator.

use super::reply::ReplyCode;
use super::wire::{AddrError, Command, TargetAddr, AUTH_VERSION, SOCKS_VERSION};

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
pub fn encode_request(command: Command, target: &TargetAddr, out: &mut Vec<u8>) {
    out.extend_from_slice(&[SOCKS_VERSION, command.to_byte(), 0x00]);
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
    match TargetAddr::decode(&input[3..]) {
        Ok(None) => Ok(None),
        Ok(Some((addr, used))) => Ok(Some((code, addr, 3 + used))),
        Err(AddrError::UnknownType(_)) => Err(BadReply("unknown address type")),
        Err(AddrError::BadName) => Err(BadReply("bad domain name")),
    }
}
