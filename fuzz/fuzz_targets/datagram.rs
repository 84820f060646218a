//! UDP ASSOCIATE datagrams and SOCKS5 replies, parsed from arbitrary bytes: no panic, and what
//! parses re-encodes to the same header bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy::socks5::client;
use proxy::socks5::udp::{encode_datagram, parse_datagram};
use proxy::socks5::TargetAddr;

fuzz_target!(|data: &[u8]| {
    if let Ok((TargetAddr::Ip(target), payload)) = parse_datagram(data) {
        let mut encoded = Vec::new();
        encode_datagram(target, payload, &mut encoded);
        assert_eq!(encoded, data, "a parsed datagram re-encodes differently");
    }
    if let Ok(Some((_, _, used))) = client::parse_reply(data) {
        assert!(used <= data.len());
    }
});
