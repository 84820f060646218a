//! Throughput of the sans-IO handshake: complete handshakes parsed per second.
#![allow(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use proxy::socks5::auth::UserDb;
use proxy::socks5::client;
use proxy::socks5::Command;
use proxy::socks5::{Handshake, Step, TargetAddr};

fn wire(auth: bool, target: &TargetAddr) -> Vec<u8> {
    let mut wire = client::encode_greeting(&[if auth { 2 } else { 0 }]);
    if auth {
        wire.extend(client::encode_auth("alice", "correct horse battery staple"));
    }
    client::encode_request(Command::Connect, target, &mut wire);
    wire
}

fn complete(users: Option<Arc<UserDb>>, wire: &[u8], chunk: usize) -> usize {
    let mut handshake = Handshake::new(users);
    let mut out = Vec::with_capacity(32);
    for piece in wire.chunks(chunk) {
        handshake.receive(piece);
        if let Step::Request(_) = handshake.step(&mut out) {
            let bound: SocketAddr = ([127, 0, 0, 1], 40000).into();
            handshake.request_granted(bound, &mut out).expect("granted");
            return out.len();
        }
    }
    panic!("handshake did not complete");
}

fn bench(c: &mut Criterion) {
    let mut users = UserDb::default();
    for i in 0..16 {
        users.insert(&format!("user{i}"), "x");
    }
    users.insert("alice", "correct horse battery staple");
    let users = Arc::new(users);
    let ipv4 = TargetAddr::Ip(([127, 0, 0, 1], 8080).into());
    let domain = TargetAddr::Domain("www.example.com".into(), 443);

    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Elements(1));
    for (name, users, wire, chunk) in [
        (
            "no_auth_ipv4_one_read",
            None,
            wire(false, &ipv4),
            usize::MAX,
        ),
        (
            "no_auth_domain_one_read",
            None,
            wire(false, &domain),
            usize::MAX,
        ),
        (
            "userpass_17_users_one_read",
            Some(users.clone()),
            wire(true, &ipv4),
            usize::MAX,
        ),
        ("no_auth_ipv4_byte_at_a_time", None, wire(false, &ipv4), 1),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || users.clone(),
                |users| complete(users, &wire, chunk),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
