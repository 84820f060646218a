//! Property tests over the sans-IO handshake: arbitrary bytes, split at arbitrary points.

#[macro_use]
mod common;

use std::sync::Arc;

use proptest::prelude::*;
use proxy::socks5::auth::UserDb;
use proxy::socks5::client;
use proxy::socks5::{Command, Handshake, Step, TargetAddr};

/// What a handshake did with some input: the bytes it wrote and where it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    out: Vec<u8>,
    step: Step,
    leftover: Vec<u8>,
}

fn users() -> Option<Arc<UserDb>> {
    Some(common::user_db(&[("alice", "s3cret")]))
}

/// Feeds `input` in chunks ending at `cuts`, stopping as soon as the machine stops asking.
fn run(auth: bool, input: &[u8], cuts: &[usize]) -> Outcome {
    let mut hs = Handshake::new(if auth { users() } else { None });
    let mut out = Vec::new();
    let mut step = Step::NeedInput;
    let mut start = 0;
    let mut ends: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    ends.sort_unstable();
    ends.push(input.len());
    for end in ends {
        if end < start {
            continue;
        }
        hs.receive(&input[start..end]);
        start = end;
        step = hs.step(&mut out);
        if !matches!(step, Step::NeedInput) || !hs.wants_input() {
            break;
        }
    }
    // After a request, the bytes that follow it belong to the relay: those buffered plus
    // those not fed yet must be the same whatever the split. After a close they are moot.
    let leftover = if matches!(step, Step::Request(_)) {
        let mut leftover = hs.take_leftover();
        leftover.extend_from_slice(&input[start..]);
        leftover
    } else {
        Vec::new()
    };
    Outcome {
        out,
        step,
        leftover,
    }
}

/// Inputs that reach deep states: a valid greeting, credentials and request, then mutated.
fn structured() -> impl Strategy<Value = Vec<u8>> {
    let target = prop_oneof![
        any::<([u8; 4], u16)>().prop_map(|(ip, port)| TargetAddr::Ip((ip, port).into())),
        any::<([u8; 16], u16)>().prop_map(|(ip, port)| TargetAddr::Ip((ip, port).into())),
        ("[a-z0-9.-]{0,40}", any::<u16>()).prop_map(|(name, port)| TargetAddr::Domain(name, port)),
    ];
    (
        prop::collection::vec(any::<u8>(), 1..4),
        any::<bool>(),
        "[a-z]{0,8}",
        "[a-z0-9]{0,8}",
        0u8..5,
        target,
        prop::collection::vec(any::<u8>(), 0..16),
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
    )
        .prop_map(
            |(methods, auth, name, pass, command, target, tail, mutations)| {
                let mut wire = client::encode_greeting(&methods);
                if auth {
                    wire.extend(client::encode_auth(&name, &pass));
                }
                client::encode_request(Command::from_byte(command), &target, &mut wire);
                wire.extend(tail);
                let len = wire.len();
                for (at, byte) in mutations {
                    wire[at % len] = byte;
                }
                wire
            },
        )
}

fn inputs() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![prop::collection::vec(any::<u8>(), 0..600), structured()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// No panic, and the same outcome whatever the split.
    #[test]
    fn outcome_does_not_depend_on_the_split(
        input in inputs(),
        auth in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let whole = run(auth, &input, &[]);
        let split = run(auth, &input, &cuts);
        let byte_by_byte = run(auth, &input, &(0..input.len()).collect::<Vec<_>>());
        prop_assert_eq!(&whole, &split);
        prop_assert_eq!(&whole, &byte_by_byte);
    }

    /// A request is only acted on once all of its bytes have arrived, and nothing but the
    /// method choice and the authentication status is written before a connect outcome.
    #[test]
    fn requests_are_complete_and_no_success_precedes_a_connect(
        input in inputs(),
        auth in any::<bool>(),
    ) {
        // Byte at a time, so the machine stops exactly at the end of the request.
        let mut hs = Handshake::new(if auth { users() } else { None });
        let mut out = Vec::new();
        for (i, byte) in input.iter().enumerate() {
            hs.receive(std::slice::from_ref(byte));
            match hs.step(&mut out) {
                Step::NeedInput => {
                    prop_assert!(matches!(out.len(), 0 | 2 | 4), "early output {:?}", out);
                }
                Step::Request(request) => {
                    let mut encoded = Vec::new();
                    client::encode_request(request.command, &request.target, &mut encoded);
                    prop_assert!(i + 1 >= encoded.len());
                    let start = i + 1 - encoded.len();
                    // RSV is checked to be 0 by the core, so the re-encoding is byte-exact.
                    prop_assert_eq!(&input[start..=i], &encoded[..]);
                    prop_assert!(matches!(out.len(), 2 | 4), "output before the request: {:?}", out);
                    return Ok(());
                }
                Step::Close(_) => {
                    // A failure reply, if any, never says success.
                    if out.len() >= 10 {
                        let reply = &out[out.len() - 10..];
                        prop_assert_eq!(reply[0], 5);
                        prop_assert_ne!(reply[1], 0);
                    }
                    return Ok(());
                }
            }
        }
    }
}
