//! Faults, against every mode: the proxy runs as its own process so its memory and
//! descriptors can be read from /proc.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A client that never reads while the target pushes 100 MiB: backpressure holds the proxy's
/// memory to its per-session buffers, and once the client reads, every byte arrives in order.
#[test]
fn a_client_that_never_reads_does_not_grow_the_proxy() {
    const SIZE: u64 = 100 << 20;
    let pushed = Arc::new(AtomicU64::new(0));
    let counter = pushed.clone();
    let target = Target::spawn("127.0.0.1:0", move |mut stream| {
        let mut block = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < SIZE {
            for (i, byte) in block.iter_mut().enumerate() {
                *byte = ((sent + i as u64) % 251) as u8;
            }
            if stream.write_all(&block).is_err() {
                return;
            }
            sent += block.len() as u64;
            counter.store(sent, Ordering::Relaxed);
        }
        let _ = stream.shutdown(Shutdown::Write);
    });
    for mode in all_modes() {
        pushed.store(0, Ordering::Relaxed);
        let proxy = ProxyProcess::start(&["--mode", mode.name(), "--log-level", "warn"]);
        let pid = proxy.child.id();
        let mut stream = open_session(proxy.addr, target.addr);
        let before = rss_kib(pid);
        // Wait (bounded) until the target is blocked: nothing more gets through.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = u64::MAX;
        while Instant::now() < deadline {
            let now = pushed.load(Ordering::Relaxed);
            if now == last {
                break;
            }
            last = now;
            std::thread::sleep(Duration::from_millis(300));
        }
        let stalled_at = pushed.load(Ordering::Relaxed);
        assert!(
            stalled_at < SIZE,
            "{mode}: 100 MiB went through a client that never reads"
        );
        let growth = rss_kib(pid).saturating_sub(before);
        assert!(
            growth < 2048,
            "{mode}: proxy RSS grew {growth} KiB while the client did not read"
        );
        // Now read it all and check every byte.
        let mut received = 0u64;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = stream.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            for (i, &byte) in buf[..n].iter().enumerate() {
                assert_eq!(
                    byte,
                    ((received + i as u64) % 251) as u8,
                    "{mode}: byte {}",
                    received + i as u64
                );
            }
            received += n as u64;
        }
        assert_eq!(received, SIZE, "{mode}");
    }
}

/// Stalled handshakes (one byte of greeting, or half a request) are closed after the
/// handshake timeout and do not stop a normal session from being served.
#[test]
fn slowloris_clients_are_closed_and_do_not_block_others() {
    let echo = Target::echo("127.0.0.1:0");
    for mode in all_modes() {
        // select holds at most ~505 sessions: stay under its wall so the test is about
        // stalling, not about the wall (tested in modes.rs).
        let stalled_count = if mode.name() == "select" { 400 } else { 1000 };
        let proxy = ProxyProcess::start(&[
            "--mode",
            mode.name(),
            "--handshake-timeout",
            "1s",
            "--log-level",
            "warn",
        ]);
        let mut stalled = Vec::with_capacity(stalled_count);
        for i in 0..stalled_count {
            let mut stream = connect(proxy.addr);
            let partial: &[u8] = if i % 2 == 0 {
                &[5]
            } else {
                &[5, 1, 0, 5, 1, 0, 1, 127]
            };
            stream.write_all(partial).expect("write");
            stalled.push(stream);
        }
        let mut normal = open_session(proxy.addr, echo.addr);
        normal
            .write_all(b"served despite the stall")
            .expect("write");
        assert_eq!(
            read_exact(&mut normal, 24).expect("echo"),
            b"served despite the stall",
            "{mode}"
        );
        drop(normal);
        for (i, stream) in stalled.iter_mut().enumerate() {
            if i % 2 == 1 {
                // Half a request: the method reply came first.
                assert_eq!(
                    read_exact(stream, 2).expect("method reply"),
                    [5, 0],
                    "{mode}"
                );
            }
            assert!(
                closed_without_data(stream),
                "{mode}: stalled client {i} not closed"
            );
        }
        drop(stalled);
    }
}

/// Connections sending random bytes or truncated messages: no crash, no hang, every one
/// closed, and a normal session works afterwards. (Random bytes never start with 5, and
/// truncated messages never complete a request, so nothing is ever connected to.)
#[test]
fn garbage_and_truncated_messages_are_closed_cleanly() {
    let echo = Target::echo("127.0.0.1:0");
    let mut wire = proxy::client::encode_greeting(&[0]);
    proxy::client::encode_request(1, &proxy::handshake::TargetAddr::Ip(echo.addr), &mut wire);
    for mode in all_modes() {
        let proxy = ProxyProcess::start(&[
            "--mode",
            mode.name(),
            "--handshake-timeout",
            "2s",
            "--log-level",
            "error",
        ]);
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..10 {
            let mut batch = Vec::new();
            for i in 0..100 {
                let mut stream = connect(proxy.addr);
                let bytes: Vec<u8> = if i % 2 == 0 {
                    let len = 1 + (next() % 600) as usize;
                    let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                    if bytes[0] == 5 {
                        bytes[0] = 4;
                    }
                    bytes
                } else {
                    wire[..(next() as usize % wire.len())].to_vec()
                };
                let _ = stream.write_all(&bytes);
                let _ = stream.shutdown(Shutdown::Write);
                batch.push(stream);
            }
            for stream in batch.iter_mut() {
                // Whatever the server answered, it must end the connection.
                let mut sink = Vec::new();
                let ended = match stream.read_to_end(&mut sink) {
                    Ok(_) => true,
                    Err(err) => err.kind() == std::io::ErrorKind::ConnectionReset,
                };
                assert!(ended, "{mode}: round {round}: connection left open");
            }
        }
        assert!(proxy_alive(&proxy), "{mode}: proxy died");
        let mut normal = open_session(proxy.addr, echo.addr);
        normal.write_all(b"still fine").expect("write");
        assert_eq!(
            read_exact(&mut normal, 10).expect("echo"),
            b"still fine",
            "{mode}"
        );
        drop(normal);
    }
}

fn proxy_alive(proxy: &ProxyProcess) -> bool {
    std::fs::read_to_string(format!("/proc/{}/stat", proxy.child.id()))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}
