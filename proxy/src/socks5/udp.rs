//! The UDP ASSOCIATE datagram header (RFC 1928 §7), sans-IO:
//! `RSV(2) FRAG(1) ATYP DST.ADDR DST.PORT DATA`.

use std::net::SocketAddr;

use thiserror::Error;

use super::wire::{encode_socket_addr, AddrError, TargetAddr};

/// Why a datagram from the client is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum DatagramError {
    /// Shorter than its header says.
    #[error("truncated datagram header")]
    Truncated,
    /// RSV is not zero.
    #[error("reserved bytes are not zero")]
    Reserved,
    /// FRAG is not zero: fragmentation is not supported (RFC 1928 allows dropping these).
    #[error("fragmented datagram (FRAG {0})")]
    Fragmented(u8),
    /// Unknown ATYP.
    #[error("address type {0:#04x} not supported")]
    AddressType(u8),
    /// An empty or non-UTF-8 domain name.
    #[error("bad domain name")]
    BadName,
}

/// Splits a client datagram into its destination and payload.
pub fn parse_datagram(datagram: &[u8]) -> Result<(TargetAddr, &[u8]), DatagramError> {
    let header = datagram.get(..4).ok_or(DatagramError::Truncated)?;
    if header[0] != 0 || header[1] != 0 {
        return Err(DatagramError::Reserved);
    }
    if header[2] != 0 {
        return Err(DatagramError::Fragmented(header[2]));
    }
    match TargetAddr::decode(&datagram[3..]) {
        Ok(Some((target, used))) => Ok((target, &datagram[3 + used..])),
        Ok(None) => Err(DatagramError::Truncated),
        Err(AddrError::UnknownType(atyp)) => Err(DatagramError::AddressType(atyp)),
        Err(AddrError::BadName) => Err(DatagramError::BadName),
    }
}

/// Appends the header for a datagram that came from `source`, then the payload.
pub fn encode_datagram(source: SocketAddr, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&[0, 0, 0]);
    encode_socket_addr(source, out);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_headers() {
        let mut wire = Vec::new();
        encode_datagram("[::1]:53".parse().expect("addr"), b"query", &mut wire);
        let (target, payload) = parse_datagram(&wire).expect("valid");
        assert_eq!(target, TargetAddr::Ip("[::1]:53".parse().expect("addr")));
        assert_eq!(payload, b"query");
        for len in 0..wire.len() - 5 {
            assert_eq!(
                parse_datagram(&wire[..len]),
                Err(DatagramError::Truncated),
                "{len}"
            );
        }
        let domain = [
            0, 0, 0, 3, 9, b'l', b'o', b'c', b'a', b'l', b'h', b'o', b's', b't', 0, 7, b'x',
        ];
        let (target, payload) = parse_datagram(&domain).expect("valid");
        assert_eq!(target, TargetAddr::Domain("localhost".into(), 7));
        assert_eq!(payload, b"x");
        assert_eq!(
            parse_datagram(&[0, 0, 1, 1, 127, 0, 0, 1, 0, 7]),
            Err(DatagramError::Fragmented(1))
        );
        assert_eq!(
            parse_datagram(&[0, 1, 0, 1, 127, 0, 0, 1, 0, 7]),
            Err(DatagramError::Reserved)
        );
        assert_eq!(
            parse_datagram(&[0, 0, 0, 9, 1]),
            Err(DatagramError::AddressType(9))
        );
        assert_eq!(
            parse_datagram(&[0, 0, 0, 3, 0, 0, 7]),
            Err(DatagramError::BadName)
        );
    }
}
