//! Bulk transfer through each mode on loopback: 64 MiB from client to target per iteration.
#![allow(missing_docs)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use clap::ValueEnum;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use proxy::config::access_log::AccessLog;
use proxy::socks5::client;
use proxy::socks5::Command;
use proxy::socks5::TargetAddr;
use proxy::{Config, Mode};

const SIZE: usize = 64 << 20;

/// A target that reads to EOF, then answers with the byte count.
fn sink() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = stream.write_all(&total.to_be_bytes());
            });
        }
    });
    addr
}

fn start_proxy(mode: Mode, config: Config) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = Arc::new(config);
    std::thread::spawn(move || proxy::modes::run(listener, config, mode, proxy::Shutdown::new()));
    addr
}

fn transfer(proxy: SocketAddr, target: SocketAddr, payload: &[u8]) {
    let mut stream = TcpStream::connect(proxy).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let mut hello = client::encode_greeting(&[0]);
    client::encode_request(Command::Connect, &TargetAddr::Ip(target), &mut hello);
    stream.write_all(&hello).expect("handshake");
    let mut reply = [0u8; 12];
    stream.read_exact(&mut reply).expect("reply");
    assert_eq!(&reply[..4], &[5, 0, 5, 0]);
    stream.write_all(payload).expect("payload");
    stream.shutdown(Shutdown::Write).expect("FIN");
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).expect("count");
    assert_eq!(u64::from_be_bytes(count), payload.len() as u64);
}

fn bench(c: &mut Criterion) {
    let target = sink();
    let payload = vec![0x5au8; SIZE];
    let mut group = c.benchmark_group("relay_64MiB");
    group.throughput(Throughput::Bytes(SIZE as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(4));
    group.bench_function("direct", |b| {
        b.iter(|| {
            let mut stream = TcpStream::connect(target).expect("connect");
            stream.write_all(&payload).expect("payload");
            stream.shutdown(Shutdown::Write).expect("FIN");
            let mut count = [0u8; 8];
            stream.read_exact(&mut count).expect("count");
        })
    });
    for &mode in Mode::value_variants() {
        let proxy = start_proxy(mode, Config::default());
        group.bench_function(mode.name(), |b| {
            b.iter(|| transfer(proxy, target, &payload))
        });
    }
    group.finish();

    // The same with the access log (into a sink) and the metrics on: their cost on the relay.
    // Last, because turning the metrics on is for the whole process.
    proxy::metrics::enable();
    let mut group = c.benchmark_group("relay_64MiB_logged_and_counted");
    group.throughput(Throughput::Bytes(SIZE as u64));
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(4));
    for &mode in Mode::value_variants() {
        let config = Config {
            access_log: Some(Arc::new(AccessLog::to_writer(Box::new(std::io::sink())))),
            ..Config::default()
        };
        let proxy = start_proxy(mode, config);
        group.bench_function(mode.name(), |b| {
            b.iter(|| transfer(proxy, target, &payload))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
