//! The sans-IO handshake fed arbitrary bytes in arbitrary pieces: no panic, the same outcome
//! whatever the split, and no success reply without a connect outcome.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use proxy::socks5::auth::UserDb;
use proxy::socks5::Failure;
use proxy::socks5::{Handshake, HandshakeError, Step};

/// The bytes written, where the machine stopped, and the bytes left for the relay.
fn run(users: Option<Arc<UserDb>>, input: &[u8], pieces: &[u8]) -> (Vec<u8>, Step, Vec<u8>) {
    let mut handshake = Handshake::new(users);
    let mut out = Vec::new();
    let mut step = Step::NeedInput;
    let mut start = 0;
    let mut sizes = pieces.iter().map(|&p| usize::from(p % 16) + 1).cycle();
    while start < input.len() {
        let end = if pieces.is_empty() {
            input.len()
        } else {
            (start + sizes.next().unwrap_or(1)).min(input.len())
        };
        handshake.receive(&input[start..end]);
        start = end;
        step = handshake.step(&mut out);
        if !matches!(step, Step::NeedInput) || !handshake.wants_input() {
            break;
        }
    }
    if input.is_empty() {
        step = handshake.step(&mut out);
    }
    let mut leftover = Vec::new();
    if matches!(step, Step::Request(_)) {
        // Only a connect outcome may produce a reply now; never success before it.
        assert!(
            matches!(out.len(), 2 | 4),
            "output before a connect outcome: {out:?}"
        );
        leftover = handshake.take_leftover();
        leftover.extend_from_slice(&input[start..]);
        let mut failed = Vec::new();
        let after = handshake.request_failed(Failure::ConnectionRefused, &mut failed);
        assert_eq!(after, HandshakeError::Request(Failure::ConnectionRefused));
        assert_eq!(failed.get(1), Some(&0x05));
    }
    if let Step::Close(_) = step {
        if out.len() >= 10 {
            assert_ne!(out[out.len() - 9], 0, "a success reply on close");
        }
    }
    (out, step, leftover)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let pieces_len = usize::from(flags >> 1 & 7).min(rest.len());
    let (pieces, input) = rest.split_at(pieces_len);
    let users = (flags & 1 == 1).then(|| {
        let mut db = UserDb::default();
        db.insert("alice", "s3cret");
        Arc::new(db)
    });
    let whole = run(users.clone(), input, &[]);
    let split = run(users, input, pieces);
    assert_eq!(
        whole, split,
        "the outcome depends on how the input was split"
    );
});
