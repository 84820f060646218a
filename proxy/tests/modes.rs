//! Mode-specific behaviour: select's FD_SETSIZE wall, uring's direct descriptors past the
//! descriptor limit, and `--workers` processes.

#[macro_use]
mod common;

use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::*;
use proxy::socks5::ReplyCode;
use proxy::socks5::TargetAddr;
use proxy::Mode;
use rustix::process::Signal;

/// select cannot watch descriptors ≥ 1024: sessions beyond the wall are refused cleanly, the
/// rest keep working, and new sessions are served once others close.
#[test]
fn select_refuses_sessions_beyond_fd_setsize_and_recovers() {
    let echo = Target::echo("127.0.0.1:0");
    let proxy = ProxyProcess::start(&["--mode", "select", "--log-level", "warn"]);
    let target = TargetAddr::Ip(echo.addr);
    let mut established = Vec::new();
    let mut refused = 0;
    for _ in 0..600 {
        match socks_connect(proxy.addr, &target, None) {
            Ok((stream, ReplyCode::Succeeded, _)) => established.push(stream),
            Ok((_, ReplyCode::GeneralFailure, _)) | Err(_) => refused += 1,
            Ok((_, code, _)) => panic!("unexpected reply {code:?}"),
        }
    }
    let count = established.len();
    assert!((400..512).contains(&count), "{count} sessions under select");
    assert_eq!(count + refused, 600);
    for (i, stream) in established.iter_mut().enumerate() {
        assert!(
            echo_check(stream, format!("select {i}").as_bytes()),
            "session {i}"
        );
    }
    established.truncate(count - 100);
    let mut served = 0;
    for _ in 0..500 {
        if let Ok((mut stream, ReplyCode::Succeeded, _)) = socks_connect(proxy.addr, &target, None)
        {
            assert!(echo_check(&mut stream, b"after the wall"));
            established.push(stream);
            served += 1;
            if served == 50 {
                break;
            }
        } else {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    assert_eq!(served, 50, "new sessions after 100 closed");
}

/// The inode of the IPv4 TCP socket with local port `port` connected to `remote`, from
/// /proc/net/tcp (a local port alone is ambiguous: the kernel reuses ephemeral ports for
/// different destinations).
fn inode_of(port: u16, remote: std::net::SocketAddr) -> Option<u64> {
    let std::net::SocketAddr::V4(remote) = remote else {
        return None;
    };
    let remote_hex = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(remote.ip().octets()),
        remote.port()
    );
    proc_net_rows("tcp").into_iter().find_map(|fields| {
        let local_port = fields.get(1)?.rsplit(':').next()?;
        let matches =
            u16::from_str_radix(local_port, 16).ok()? == port && *fields.get(2)? == remote_hex;
        let inode: u64 = fields.get(9)?.parse().ok()?;
        (matches && inode != 0).then_some(inode)
    })
}

/// In every mode: two workers share the port, SIGKILL on one leaves the other's sessions
/// untouched, the parent starts a replacement, and SIGTERM ends everything with exit 0.
fn workers_share_the_port_and_a_dead_worker_is_replaced(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    let mut proxy = ProxyProcess::start(&[
        "--workers",
        "2",
        "--mode",
        mode.name(),
        "--threads",
        "1",
        "--log-level",
        "warn",
    ]);
    let parent = proxy.child.id();
    let workers = children(parent);
    assert_eq!(workers.len(), 2, "{mode}: {workers:?}");

    // Open sessions and find which worker holds each (by its outgoing socket's inode).
    let mut sessions: Vec<(TcpStream, u32)> = Vec::new();
    for _ in 0..40 {
        let (stream, code, bound) =
            socks_connect(proxy.addr, &TargetAddr::Ip(echo.addr), None).expect("handshake");
        assert_eq!(code, ReplyCode::Succeeded);
        let TargetAddr::Ip(bound) = bound else {
            panic!("bound is not an IP")
        };
        let inode = inode_of(bound.port(), echo.addr).expect("outgoing socket in /proc/net/tcp");
        let owner = workers
            .iter()
            .copied()
            .find(|&pid| socket_inodes(pid).contains(&inode))
            .unwrap_or_else(|| {
                panic!(
                    "no worker holds inode {inode} (port {}): {:?}",
                    bound.port(),
                    workers
                        .iter()
                        .map(|&p| socket_inodes(p))
                        .collect::<Vec<_>>()
                )
            });
        sessions.push((stream, owner));
    }
    let victim = workers[0];
    let survivor = workers[1];
    let on_victim = sessions.iter().filter(|(_, pid)| *pid == victim).count();
    assert!(
        on_victim > 0 && on_victim < 40,
        "{mode}: sessions on both workers ({on_victim} of 40 on one)"
    );

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(victim as i32).expect("pid"),
        Signal::KILL,
    )
    .expect("kill worker");
    for (stream, pid) in sessions.iter_mut() {
        if *pid == survivor {
            assert!(
                echo_check(stream, b"untouched"),
                "{mode}: survivor's session broken"
            );
        } else {
            assert!(
                closed_without_data(stream),
                "{mode}: victim's session still open"
            );
        }
    }
    // The parent starts a replacement.
    let mut replaced = false;
    for _ in 0..500 {
        let now = children(parent);
        if now.len() == 2 && now.contains(&survivor) && !now.contains(&victim) {
            replaced = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        replaced,
        "{mode}: no replacement worker: {:?}",
        children(parent)
    );
    for _ in 0..10 {
        let mut stream = open_session(proxy.addr, echo.addr);
        assert!(echo_check(&mut stream, b"after the replacement"));
    }
    drop(sessions);
    proxy.signal(Signal::TERM);
    let status = proxy.wait();
    assert_eq!(status.code(), Some(0), "{mode}: {status}");
    assert!(children(parent).is_empty());
}

fn every_mode_is_accepted_by_the_binary(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    let mut proxy = ProxyProcess::start(&["--mode", mode.name()]);
    assert!(proxy
        .ready_line
        .trim_end()
        .ends_with(&format!("mode={mode}")));
    let mut stream = open_session(proxy.addr, echo.addr);
    assert!(echo_check(&mut stream, mode.name().as_bytes()));
    drop(stream);
    proxy.signal(Signal::TERM);
    assert_eq!(proxy.wait().code(), Some(0), "{mode}");
}

#[test]
fn a_stack_size_below_the_minimum_exits_2() {
    let output = Command::new(proxy_binary())
        .args(["--mode", "threads", "--stack-size", "4k"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
}

/// Where io_uring cannot be used, `--mode uring` exits 2 with one line saying why, before any
/// ready line; `--batch-window` belongs to uring alone.
#[test]
fn uring_unavailable_exits_2_with_one_line() {
    let output = Command::new(proxy_binary())
        .args(["--mode", "uring", "--listen", "127.0.0.1:0"])
        .env(proxy::modes::uring::FORCE_UNAVAILABLE_ENV, "1")
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty(), "no ready line");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--mode uring: io_uring unavailable"),
        "{stderr}"
    );

    let output = Command::new(proxy_binary())
        .args(["--mode", "epoll", "--batch-window", "20us"])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--mode uring only"), "{stderr}");
}

/// Direct descriptors do not count against RLIMIT_NOFILE: under a limit of 64 descriptors,
/// which holds at most ~25 sessions in any other mode, one uring process with two rings
/// holds and relays more than 32 (each ring's table may be as large as the limit), refuses
/// the rest cleanly, and serves newcomers once sessions close; none is left open.
#[test]
fn uring_holds_more_sessions_than_the_descriptor_limit() {
    if let Err(why) = proxy::modes::uring::probe(Duration::ZERO) {
        eprintln!("skipped: {why}");
        return;
    }
    let echo = Target::echo("127.0.0.1:0");
    let target = TargetAddr::Ip(echo.addr);
    let mut command = Command::new("sh");
    command.args([
        "-c",
        "ulimit -n 64 && exec \"$0\" --listen 127.0.0.1:0 --log-level error --mode uring --threads 2",
        proxy_binary(),
    ]);
    let proxy = ProxyProcess::spawn(command);
    let pid = proxy.child.id();
    let mut established = Vec::new();
    let mut refused = 0;
    for _ in 0..80 {
        match attempt_session(proxy.addr, &target).expect("an answer") {
            Attempt::Established(stream) => established.push(stream),
            Attempt::RefusedWithReply | Attempt::RefusedClosed => refused += 1,
        }
    }
    let count = established.len();
    assert!(count > 32, "only {count} sessions under a limit of 64");
    assert!(refused > 0, "all 80 held: the tables were not limited");
    for (i, stream) in established.iter_mut().enumerate() {
        assert!(
            echo_check(stream, format!("direct {i}").as_bytes()),
            "session {i}"
        );
    }
    assert_eq!(session_sockets(pid), 2 * count, "sockets held");
    established.truncate(count - 10);
    for i in 0..10 {
        let mut stream = open_session_eventually(proxy.addr, echo.addr).expect("served again");
        assert!(echo_check(&mut stream, b"after closes"), "newcomer {i}");
        established.push(stream);
    }
    established.clear();
    assert_eq!(wait_for_no_session_sockets(pid), 0, "sockets left open");
}

per_mode!(
    every_mode_is_accepted_by_the_binary,
    workers_share_the_port_and_a_dead_worker_is_replaced,
);
