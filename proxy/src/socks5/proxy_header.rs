//! The PROXY protocol header (HAProxy's, versions 1 and 2) a load balancer puts before the
//! client's bytes, naming the client it accepted: parsed here as bytes in, header out, no
//! sockets. Only connections from a trusted balancer may carry one (`--trusted-proxy`); from
//! anyone else it would let a client pick the address the rules and logs see.
//!
//! Input may arrive split at any byte; bytes that cannot start a header are refused at once,
//! so a balancer that sends none is not waited for.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// Version 2's fixed signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 1's prefix.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest version 1 line, CRLF included (from the specification).
pub const V1_MAX: usize = 107;
/// The longest version 2 header accepted (16 fixed bytes, addresses and TLVs): far above what
/// balancers send (addresses plus a few TLVs), far below the 64 KiB the length field allows.
pub const V2_MAX: usize = 4096;

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// The balancer relayed a client: `source` is the client, `destination` the address it
    /// connected to.
    Proxied {
        /// The client's address.
        source: SocketAddr,
        /// The address the client connected to (the balancer's frontend).
        destination: SocketAddr,
    },
    /// The balancer speaks for itself (version 2 LOCAL, e.g. a health check) or could not
    /// name the client (version 1 UNKNOWN, another address family): the connection's own
    /// addresses stand.
    Local,
}

/// Why the bytes are not a header this server accepts.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProxyHeaderError {
    /// The bytes do not start with either version's signature.
    #[error("no PROXY protocol header (the connection did not start with one)")]
    Missing,
    /// A version 1 line that breaks the format.
    #[error("bad PROXY protocol v1 header: {0}")]
    BadV1(&'static str),
    /// A version 2 header that breaks the format.
    #[error("bad PROXY protocol v2 header: {0}")]
    BadV2(&'static str),
    /// Longer than this server accepts.
    #[error("PROXY protocol header longer than {0} bytes")]
    TooLong(usize),
}

/// The result of parsing from the front of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A header, and how many bytes it took.
    Done {
        /// The header.
        header: ProxyHeader,
        /// Bytes consumed; what follows belongs to the client's protocol.
        consumed: usize,
    },
}

/// Parses a version 1 or 2 header from the front of `input`.
pub fn parse(input: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let starts = |prefix: &[u8]| {
        let n = input.len().min(prefix.len());
        input[..n] == prefix[..n]
    };
    if starts(&V2_SIGNATURE) {
        if input.len() < V2_SIGNATURE.len() {
            return Ok(Parsed::Incomplete);
        }
        parse_v2(input)
    } else if starts(V1_PREFIX) {
        if input.len() < V1_PREFIX.len() {
            return Ok(Parsed::Incomplete);
        }
        parse_v1(input)
    } else {
        Err(ProxyHeaderError::Missing)
    }
}

fn parse_v1(input: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let bad = ProxyHeaderError::BadV1;
    let window = &input[..input.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        if window.len() >= V1_MAX {
            return Err(ProxyHeaderError::TooLong(V1_MAX));
        }
        // A lone CR must be followed by LF; anything else is malformed already.
        if window.contains(&b'\n') || window[..window.len() - 1].contains(&b'\r') {
            return Err(bad("line not ended by CRLF"));
        }
        return Ok(Parsed::Incomplete);
    };
    let line = std::str::from_utf8(&input[V1_PREFIX.len()..end]).map_err(|_| bad("not ASCII"))?;
    let consumed = end + 2;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["UNKNOWN", ..] => Ok(Parsed::Done {
            header: ProxyHeader::Local,
            consumed,
        }),
        [family @ ("TCP4" | "TCP6"), source, destination, source_port, destination_port] => {
            let v6 = *family == "TCP6";
            let ip = |text: &str| -> Result<IpAddr, ProxyHeaderError> {
                if v6 {
                    text.parse::<Ipv6Addr>()
                        .map(IpAddr::V6)
                        .map_err(|_| bad("not an IPv6 address"))
                } else {
                    text.parse::<Ipv4Addr>()
                        .map(IpAddr::V4)
                        .map_err(|_| bad("not an IPv4 address"))
                }
            };
            let port = |text: &str| -> Result<u16, ProxyHeaderError> {
                // Decimal, no sign, no leading zero (the specification's form).
                let canonical = !text.is_empty()
                    && text.bytes().all(|b| b.is_ascii_digit())
                    && (text == "0" || !text.starts_with('0'));
                if !canonical {
                    return Err(bad("not a port number"));
                }
                text.parse().map_err(|_| bad("port out of range"))
            };
            Ok(Parsed::Done {
                header: ProxyHeader::Proxied {
                    source: SocketAddr::new(ip(source)?, port(source_port)?),
                    destination: SocketAddr::new(ip(destination)?, port(destination_port)?),
                },
                consumed,
            })
        }
        [_, ..] => Err(bad("unknown protocol or wrong number of fields")),
        [] => Err(bad("empty line")),
    }
}

fn parse_v2(input: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let bad = ProxyHeaderError::BadV2;
    if input.len() < 16 {
        // Check what has arrived of the version and command already.
        if let Some(&version_command) = input.get(12) {
            check_version_command(version_command)?;
        }
        return Ok(Parsed::Incomplete);
    }
    let local = check_version_command(input[12])?;
    let family = input[13];
    let length = usize::from(u16::from_be_bytes([input[14], input[15]]));
    let total = 16 + length;
    if total > V2_MAX {
        return Err(ProxyHeaderError::TooLong(V2_MAX));
    }
    if input.len() < total {
        return Ok(Parsed::Incomplete);
    }
    let body = &input[16..total];
    if local {
        return Ok(Parsed::Done {
            header: ProxyHeader::Local,
            consumed: total,
        });
    }
    let header = match family {
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 => {
            if body.len() < 12 {
                return Err(bad("IPv4 addresses cut short"));
            }
            let ip = |at: usize| {
                Ipv4Addr::from(<[u8; 4]>::try_from(&body[at..at + 4]).expect("4 bytes"))
            };
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0).into(), port(8)),
                destination: SocketAddr::new(ip(4).into(), port(10)),
            }
        }
        // TCP over IPv6.
        0x21 => {
            if body.len() < 36 {
                return Err(bad("IPv6 addresses cut short"));
            }
            let ip = |at: usize| {
                Ipv6Addr::from(<[u8; 16]>::try_from(&body[at..at + 16]).expect("16 bytes"))
            };
            let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0).into(), port(32)),
                destination: SocketAddr::new(ip(16).into(), port(34)),
            }
        }
        // UNSPEC, UDP or UNIX: no TCP client address to use; the connection's own stands.
        0x00 | 0x12 | 0x22 | 0x31 | 0x32 => ProxyHeader::Local,
        _ => return Err(bad("unknown address family or transport")),
    };
    Ok(Parsed::Done {
        header,
        consumed: total,
    })
}

/// Version must be 2; returns whether the command is LOCAL (else PROXY).
fn check_version_command(byte: u8) -> Result<bool, ProxyHeaderError> {
    match byte {
        0x20 => Ok(true),
        0x21 => Ok(false),
        b if b >> 4 != 2 => Err(ProxyHeaderError::BadV2("version is not 2")),
        _ => Err(ProxyHeaderError::BadV2("unknown command")),
    }
}

/// Encodes a version 1 header for `source` → `destination` (tests, load generators).
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let family = match (source, destination) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => "TCP4",
        (SocketAddr::V6(_), SocketAddr::V6(_)) => "TCP6",
        _ => return b"PROXY UNKNOWN\r\n".to_vec(),
    };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// Encodes a version 2 PROXY header for `source` → `destination`, followed by `tlvs` (raw
/// type-length-value bytes, which the parser skips).
pub fn encode_v2(source: SocketAddr, destination: SocketAddr, tlvs: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    let mut body = Vec::new();
    match (source, destination) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push(0x11);
            body.extend_from_slice(&s.ip().octets());
            body.extend_from_slice(&d.ip().octets());
        }
        (s, d) => {
            out.push(0x21);
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                IpAddr::V6(ip) => ip,
            };
            body.extend_from_slice(&v6(s).octets());
            body.extend_from_slice(&v6(d).octets());
        }
    }
    body.extend_from_slice(&source.port().to_be_bytes());
    body.extend_from_slice(&destination.port().to_be_bytes());
    body.extend_from_slice(tlvs);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4() -> (SocketAddr, SocketAddr) {
        (
            "192.0.2.7:51234".parse().expect("addr"),
            "198.51.100.1:1080".parse().expect("addr"),
        )
    }

    fn v6() -> (SocketAddr, SocketAddr) {
        (
            "[2001:db8::7]:40000".parse().expect("addr"),
            "[2001:db8::1]:1080".parse().expect("addr"),
        )
    }

    /// Every header, whole, then cut at every byte: each prefix is Incomplete, the whole is
    /// the header, and bytes after it are left alone.
    fn parses_whole_and_in_every_prefix(bytes: &[u8], expected: ProxyHeader) {
        for cut in 0..bytes.len() {
            assert_eq!(
                parse(&bytes[..cut]),
                Ok(Parsed::Incomplete),
                "prefix of {cut} bytes of {bytes:?}"
            );
        }
        let mut followed = bytes.to_vec();
        followed.extend_from_slice(&[5, 1, 0]);
        assert_eq!(
            parse(&followed),
            Ok(Parsed::Done {
                header: expected,
                consumed: bytes.len()
            })
        );
    }

    #[test]
    fn version_1_tcp4_tcp6_and_unknown() {
        let (s, d) = v4();
        parses_whole_and_in_every_prefix(
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 1080\r\n",
            ProxyHeader::Proxied {
                source: s,
                destination: d,
            },
        );
        let (s, d) = v6();
        parses_whole_and_in_every_prefix(
            &encode_v1(s, d),
            ProxyHeader::Proxied {
                source: s,
                destination: d,
            },
        );
        parses_whole_and_in_every_prefix(b"PROXY UNKNOWN\r\n", ProxyHeader::Local);
        parses_whole_and_in_every_prefix(
            b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n",
            ProxyHeader::Local,
        );
    }

    #[test]
    fn version_2_ipv4_ipv6_local_and_tlvs() {
        let (s, d) = v4();
        parses_whole_and_in_every_prefix(
            &encode_v2(s, d, &[]),
            ProxyHeader::Proxied {
                source: s,
                destination: d,
            },
        );
        // A TLV (type 0x05 unique id, 3 bytes) is skipped.
        parses_whole_and_in_every_prefix(
            &encode_v2(s, d, &[0x05, 0, 3, b'a', b'b', b'c']),
            ProxyHeader::Proxied {
                source: s,
                destination: d,
            },
        );
        let (s, d) = v6();
        parses_whole_and_in_every_prefix(
            &encode_v2(s, d, &[]),
            ProxyHeader::Proxied {
                source: s,
                destination: d,
            },
        );
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        parses_whole_and_in_every_prefix(&local, ProxyHeader::Local);
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0, 216]);
        unix.extend_from_slice(&[0u8; 216]);
        parses_whole_and_in_every_prefix(&unix, ProxyHeader::Local);
    }

    #[test]
    fn a_socks_greeting_or_anything_else_is_refused_at_the_first_byte() {
        assert_eq!(parse(&[5]), Err(ProxyHeaderError::Missing));
        assert_eq!(parse(&[5, 1, 0]), Err(ProxyHeaderError::Missing));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyHeaderError::Missing));
        assert_eq!(parse(b"PROXZ"), Err(ProxyHeaderError::Missing));
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX"), Err(ProxyHeaderError::Missing));
        assert_eq!(parse(b""), Ok(Parsed::Incomplete));
    }

    #[test]
    fn malformed_headers_name_what_is_wrong() {
        let bad_v1: &[&[u8]] = &[
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51234\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 51234 99999\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 01 2\r\n",
            b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 198.51.100.1 1 2\r\n",
            b"PROXY TCP4  192.0.2.7 198.51.100.1 1 2\r\n",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n",
            b"PROXY TCP4 192.0.2.7\r198.51.100.1 1 2\r\n",
        ];
        for bytes in bad_v1 {
            assert!(
                matches!(parse(bytes), Err(ProxyHeaderError::BadV1(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(bytes),
                parse(bytes)
            );
        }
        let endless = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(parse(&endless), Err(ProxyHeaderError::TooLong(V1_MAX)));

        let (s, d) = v4();
        let good = encode_v2(s, d, &[]);
        let mut version_1 = good.clone();
        version_1[12] = 0x11;
        assert_eq!(
            parse(&version_1),
            Err(ProxyHeaderError::BadV2("version is not 2"))
        );
        assert_eq!(
            parse(&version_1[..13]),
            Err(ProxyHeaderError::BadV2("version is not 2")),
            "refused as soon as the version byte arrives"
        );
        let mut command = good.clone();
        command[12] = 0x22;
        assert_eq!(
            parse(&command),
            Err(ProxyHeaderError::BadV2("unknown command"))
        );
        let mut family = good.clone();
        family[13] = 0x41;
        assert!(matches!(parse(&family), Err(ProxyHeaderError::BadV2(_))));
        let mut short = good.clone();
        short[15] = 4;
        short.truncate(20);
        assert_eq!(
            parse(&short),
            Err(ProxyHeaderError::BadV2("IPv4 addresses cut short"))
        );
        let mut huge = good;
        huge[14] = 0xff;
        assert_eq!(parse(&huge), Err(ProxyHeaderError::TooLong(V2_MAX)));
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn addr() -> impl Strategy<Value = SocketAddr> {
            prop_oneof![
                (any::<[u8; 4]>(), any::<u16>())
                    .prop_map(|(ip, port)| SocketAddr::new(Ipv4Addr::from(ip).into(), port)),
                (any::<[u8; 16]>(), any::<u16>())
                    .prop_map(|(ip, port)| SocketAddr::new(Ipv6Addr::from(ip).into(), port)),
            ]
        }

        proptest! {
            #[test]
            fn encoded_headers_parse_back_split_anywhere(
                source in addr(),
                destination in addr(),
                v2 in any::<bool>(),
                tlvs in proptest::collection::vec(any::<u8>(), 0..64),
                cut in any::<prop::sample::Index>(),
            ) {
                let same_family = source.is_ipv4() == destination.is_ipv4();
                let bytes = if v2 { encode_v2(source, destination, &tlvs) } else { encode_v1(source, destination) };
                let expected = if v2 {
                    let v6 = |a: SocketAddr| match a.ip() {
                        IpAddr::V4(ip) if !(source.is_ipv4() && destination.is_ipv4()) => SocketAddr::new(ip.to_ipv6_mapped().into(), a.port()),
                        _ => a,
                    };
                    ProxyHeader::Proxied { source: v6(source), destination: v6(destination) }
                } else if same_family {
                    ProxyHeader::Proxied { source, destination }
                } else {
                    ProxyHeader::Local
                };
                let at = cut.index(bytes.len());
                prop_assert_eq!(parse(&bytes[..at]), Ok(Parsed::Incomplete));
                prop_assert_eq!(parse(&bytes), Ok(Parsed::Done { header: expected, consumed: bytes.len() }));
            }

            #[test]
            fn arbitrary_bytes_never_panic_and_never_overrun(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
                if let Ok(Parsed::Done { consumed, .. }) = parse(&bytes) {
                    prop_assert!(consumed <= bytes.len());
                }
            }
        }
    }
}
