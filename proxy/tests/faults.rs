//! Faults, against every mode: the proxy runs as its own process so its memory and
//! descriptors can be read from /proc.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use proxy::socks5::ReplyCode;
use proxy::socks5::TargetAddr;
use proxy::Mode;

/// A client that never reads while the target pushes 100 MiB: backpressure holds the proxy's
/// memory to its per-session buffers, and once the client reads, every byte arrives in order.
fn a_client_that_never_reads_does_not_grow_the_proxy(mode: Mode) {
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
    drop(stream);
    assert_eq!(
        wait_for_no_session_sockets(pid),
        0,
        "{mode}: session sockets left open"
    );
}

/// Stalled handshakes (one byte of greeting, or half a request) are closed after the
/// handshake timeout and do not stop a normal session from being served.
fn slowloris_clients_are_closed_and_do_not_block_others(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    // select holds at most ~505 sessions: stay under its wall so the test is about
    // stalling, not about the wall (tested in modes.rs).
    let stalled_count = if mode.name() == "select" { 400 } else { 2000 };
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
    assert_eq!(
        wait_for_no_session_sockets(proxy.child.id()),
        0,
        "{mode}: session sockets left open"
    );
}

/// Connections sending random bytes or truncated messages: no crash, no hang, every one
/// closed, and a normal session works afterwards. (Random bytes never start with 5, and
/// truncated messages never complete a request, so nothing is ever connected to.)
fn garbage_and_truncated_messages_are_closed_cleanly(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    let mut wire = proxy::socks5::client::encode_greeting(&[0]);
    proxy::socks5::client::encode_request(
        proxy::socks5::Command::Connect,
        &proxy::socks5::TargetAddr::Ip(echo.addr),
        &mut wire,
    );
    let proxy = ProxyProcess::start(&[
        "--mode",
        mode.name(),
        "--handshake-timeout",
        "2s",
        "--log-level",
        "error",
    ]);
    for round in 0..20u64 {
        let mut batch = Vec::new();
        for i in 0..100u64 {
            let mut stream = connect(proxy.addr);
            // 2 bytes choose a length, up to 600 more are the garbage.
            let noise = pattern(round * 100 + i, 602);
            let pick = usize::from(u16::from_le_bytes([noise[0], noise[1]]));
            let bytes: Vec<u8> = if i % 2 == 0 {
                let mut bytes = noise[2..3 + pick % 600].to_vec();
                if bytes[0] == 5 {
                    bytes[0] = 4;
                }
                bytes
            } else {
                wire[..pick % wire.len()].to_vec()
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
    assert!(alive(proxy.child.id()), "{mode}: proxy died");
    let mut normal = open_session(proxy.addr, echo.addr);
    normal.write_all(b"still fine").expect("write");
    assert_eq!(
        read_exact(&mut normal, 10).expect("echo"),
        b"still fine",
        "{mode}"
    );
    drop(normal);
    assert_eq!(
        wait_for_no_session_sockets(proxy.child.id()),
        0,
        "{mode}: session sockets left open"
    );
}

/// Misbehaving clients and targets, one after another against one proxy per mode: stalled
/// handshakes, garbage, a refused and an unanswered connect, a client and a target that reset
/// mid-stream, and a client that half-closes to a target that never does (the idle timeout
/// ends it). Each ends promptly with the right reply or a close; afterwards the proxy is
/// alive, a normal session is byte-exact, and no session socket is left open (no leak).
fn misbehaving_peers_are_ended_and_leave_no_socket_behind(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    let resetting = Target::spawn("127.0.0.1:0", |mut stream| {
        let _ = read_exact(&mut stream, 5);
        reset(stream);
    });
    // Reads to the end of the client's data, then keeps its side open: a half-open session.
    let holding = Target::spawn("127.0.0.1:0", |mut stream| {
        let _ = read_to_end(&mut stream);
        std::thread::sleep(IO_TIMEOUT);
    });
    let refused = closed_port();
    let (hole, _fillers) = black_hole();
    let proxy = ProxyProcess::start(&[
        "--mode",
        mode.name(),
        "--handshake-timeout",
        "1s",
        "--connect-timeout",
        "1s",
        "--idle-timeout",
        "3s",
        "--log-level",
        "error",
    ]);
    let pid = proxy.child.id();

    // Stalled handshakes: one byte of greeting, or a greeting and half a request.
    let mut stalled = Vec::new();
    for i in 0..10 {
        let mut stream = connect(proxy.addr);
        if i % 2 == 0 {
            stream.write_all(&[5]).expect("write");
        } else {
            stream
                .write_all(&[5, 1, 0, 5, 1, 0, 1, 127])
                .expect("write");
            assert_eq!(read_exact(&mut stream, 2).expect("method"), [5, 0]);
        }
        stalled.push(stream);
    }
    for mut stream in stalled {
        assert!(ends_with_close(&mut stream), "{mode}: stalled handshake");
    }

    // Garbage: HTTP, SOCKS4 and random bytes.
    for seed in 0..20 {
        let mut stream = connect(proxy.addr);
        let mut bytes = pattern(seed, 300);
        bytes[0] = [b'G', 4, 0][seed as usize % 3];
        let _ = stream.write_all(&bytes);
        assert!(ends_with_close(&mut stream), "{mode}: garbage");
    }

    // A refused and an unanswered connect.
    let (_, code, _) =
        socks_connect(proxy.addr, &TargetAddr::Ip(refused), None).expect("handshake");
    assert_eq!(code, ReplyCode::ConnectionRefused, "{mode}");
    let (_, code, _) = socks_connect(proxy.addr, &TargetAddr::Ip(hole), None).expect("handshake");
    assert_eq!(code, ReplyCode::TtlExpired, "{mode}");

    // A client that resets mid-stream.
    let mut stream = open_session(proxy.addr, echo.addr);
    let data = pattern(7, 64 * 1024);
    stream.write_all(&data).expect("write");
    read_exact(&mut stream, 1000).expect("echo");
    reset(stream);

    // A target that resets mid-stream: the client sees the session end.
    let mut stream = open_session(proxy.addr, resetting.addr);
    stream.write_all(b"hello, then reset").expect("write");
    assert!(ends_with_close(&mut stream), "{mode}: target reset");

    // Half-open: the client's FIN is passed on, the target never sends its own; the idle
    // timeout ends the session.
    let mut stream = open_session(proxy.addr, holding.addr);
    stream.write_all(b"only this").expect("write");
    stream.shutdown(Shutdown::Write).expect("shutdown");
    assert!(ends_with_close(&mut stream), "{mode}: half-open session");

    assert!(alive(proxy.child.id()), "{mode}: proxy died");
    let mut normal = open_session(proxy.addr, echo.addr);
    // The count sees a live session, so that zero below means something. (Checked at once:
    // the idle timeout would end this session after 3 s without traffic.)
    let seen = session_sockets(pid);
    assert!(
        seen >= 2,
        "{mode}: {seen} session sockets seen; the proxy's sockets: {:?}",
        socket_inodes(pid)
    );
    let data = pattern(11, 256 * 1024);
    normal.write_all(&data).expect("write");
    assert!(
        read_exact(&mut normal, data.len()).expect("echo") == data,
        "{mode}: bytes altered"
    );
    drop(normal);
    assert_eq!(
        wait_for_no_session_sockets(pid),
        0,
        "{mode}: session sockets left open"
    );
}

/// A target that never reads while the client keeps writing: backpressure stops the client
/// (its writes stall) long before 64 MiB, and the proxy's memory does not grow.
fn a_target_that_never_reads_does_not_grow_the_proxy(mode: Mode) {
    const CAP: usize = 64 << 20;
    let sink = Target::spawn("127.0.0.1:0", |_stream| std::thread::sleep(IO_TIMEOUT));
    // The idle timeout is what ends a session whose target neither reads nor closes;
    // it is longer than the 1 s without progress that tells the client it is stalled.
    let proxy = ProxyProcess::start(&[
        "--mode",
        mode.name(),
        "--idle-timeout",
        "5s",
        "--log-level",
        "warn",
    ]);
    let pid = proxy.child.id();
    let mut stream = open_session(proxy.addr, sink.addr);
    stream
        .set_write_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let before = rss_kib(pid);
    let block = vec![0x5au8; 64 * 1024];
    let mut written = 0;
    while written < CAP {
        match stream.write(&block) {
            Ok(n) => written += n,
            Err(err) if is_timeout(&err) => break,
            Err(err) => panic!("{mode}: write failed: {err}"),
        }
    }
    assert!(
        written < CAP,
        "{mode}: 64 MiB accepted for a target that never reads"
    );
    let growth = rss_kib(pid).saturating_sub(before);
    assert!(
        growth < 2048,
        "{mode}: proxy RSS grew {growth} KiB while the target did not read"
    );
    assert!(alive(proxy.child.id()), "{mode}: proxy died");
    drop(stream);
    assert_eq!(
        wait_for_no_session_sockets(pid),
        0,
        "{mode}: session sockets left open"
    );
}

/// SIGTERM with 1,000 sessions open (400 under select's wall): the listener closes, every
/// session keeps flowing through the grace period, and once they end the proxy exits 0.
fn sigterm_drains_a_thousand_sessions_and_exits_0(mode: Mode) {
    use rustix::process::Signal;
    // Two descriptors per session in this process too (client and echo side).
    proxy::net::limits::raise_nofile_limit().expect("raise the descriptor limit");
    let echo = Target::echo("127.0.0.1:0");
    let count = if mode.name() == "select" { 400 } else { 1000 };
    let mut proxy = ProxyProcess::start(&[
        "--mode",
        mode.name(),
        "--grace",
        "60s",
        "--log-level",
        "warn",
    ]);
    let mut sessions: Vec<TcpStream> = (0..count)
        .map(|_| open_session(proxy.addr, echo.addr))
        .collect();
    proxy.signal(Signal::TERM);
    // Draining: the proxy stops accepting, so a newcomer is never served.
    let mut newcomer_refused = false;
    for _ in 0..500 {
        match TcpStream::connect(proxy.addr) {
            Err(_) => {
                newcomer_refused = true;
                break;
            }
            Ok(stream) => drop(stream),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(newcomer_refused, "{mode}: still accepting after SIGTERM");
    for (i, stream) in sessions.iter_mut().enumerate() {
        assert_echo(stream, format!("session {i} drains").as_bytes());
    }
    assert!(alive(proxy.child.id()), "{mode}: exited with sessions open");
    sessions.clear();
    let status = proxy.wait();
    assert_eq!(status.code(), Some(0), "{mode}: {status}");
}

/// threads mode when no more threads can be started (an address-space limit that fits about
/// 20 session stacks of 8 MiB, with one malloc arena so the heap does not take the room): sessions
/// beyond it are refused by closing, the established ones keep flowing, the proxy lives on,
/// and new sessions are served once others end.
#[test]
fn thread_exhaustion_in_threads_mode_refuses_cleanly_and_recovers() {
    let echo = Target::echo("127.0.0.1:0");
    let args = [
        "--listen",
        "127.0.0.1:0",
        "--mode",
        "threads",
        "--stack-size",
        "8388608",
        "--log-level",
        "error",
    ];
    let idle = {
        let mut command = std::process::Command::new(proxy_binary());
        command.args(args).env("MALLOC_ARENA_MAX", "1");
        let probe = ProxyProcess::spawn(command);
        status_kib(probe.child.id(), "VmSize")
    };
    assert!(idle > 0, "VmSize of an idle proxy");
    let mut command = std::process::Command::new("bash");
    command
        .args([
            "-c",
            &format!("ulimit -v {} && exec \"$0\" \"$@\"", idle + 20 * 8 * 1024),
            proxy_binary(),
        ])
        .args(args)
        .env("MALLOC_ARENA_MAX", "1");
    let proxy = ProxyProcess::spawn(command);
    let target = TargetAddr::Ip(echo.addr);
    let mut established = Vec::new();
    let mut refused = 0;
    for _ in 0..60 {
        match attempt_session(proxy.addr, &target) {
            Ok(Attempt::Established(stream)) => established.push(stream),
            Ok(Attempt::RefusedClosed) => refused += 1,
            // Out of threads, not descriptors: nothing gets as far as a reply.
            Ok(Attempt::RefusedWithReply) => panic!("unexpected reply GeneralFailure"),
            Err(err) => panic!("{err}"),
        }
    }
    let count = established.len();
    assert!((5..60).contains(&count), "{count} sessions established");
    assert!(refused > 0);
    assert!(alive(proxy.child.id()), "proxy died");
    for (i, stream) in established.iter_mut().enumerate() {
        assert!(
            echo_check(stream, format!("session {i} still flows").as_bytes()),
            "session {i} of {count}"
        );
    }
    established.truncate(count / 2);
    let mut recovered = open_session_eventually(proxy.addr, echo.addr)
        .expect("no new session once threads were freed");
    assert!(echo_check(&mut recovered, b"recovered"));
    assert!(alive(proxy.child.id()), "proxy died");
}

per_mode!(
    a_client_that_never_reads_does_not_grow_the_proxy,
    slowloris_clients_are_closed_and_do_not_block_others,
    garbage_and_truncated_messages_are_closed_cleanly,
    misbehaving_peers_are_ended_and_leave_no_socket_behind,
    a_target_that_never_reads_does_not_grow_the_proxy,
    sigterm_drains_a_thousand_sessions_and_exits_0,
);
