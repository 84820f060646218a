//! Mode-specific behaviour: select's FD_SETSIZE wall, and `--workers` processes.

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

per_mode!(
    every_mode_is_accepted_by_the_binary,
    workers_share_the_port_and_a_dead_worker_is_replaced,
);
