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
