//! The `proxy` binary as a user runs it: flags, ready line, errors, signals, descriptor limits.

#[macro_use]
mod common;

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use common::*;
use proxy::socks5::ReplyCode;
use proxy::socks5::TargetAddr;
use proxy::Mode;
use rustix::process::Signal;

/// Runs the binary to completion and returns (exit code, stderr).
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(proxy_binary())
        .args(args)
        .output()
        .expect("run proxy");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn ready_line_names_the_real_address_and_mode() {
    let echo = Target::echo("127.0.0.1:0");
    let proxy = ProxyProcess::start(&["--mode", "async"]);
    assert!(proxy.addr.port() != 0);
    assert_eq!(
        proxy.ready_line.trim_end(),
        format!("listening on {} mode=async", proxy.addr)
    );
    let mut stream = open_session(proxy.addr, echo.addr);
    assert_echo(&mut stream, b"ping");
}

#[test]
fn help_explains_every_flag() {
    let output = Command::new(proxy_binary())
        .arg("--help")
        .output()
        .expect("run");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--listen",
        "--mode",
        "--threads",
        "--user",
        "--users-file",
        "--allow-client",
        "--allow-dest",
        "--deny-dest",
        "--handshake-timeout",
        "--connect-timeout",
        "--idle-timeout",
        "--max-sessions",
        "--grace",
        "--log-level",
    ] {
        assert!(help.contains(flag), "--help does not mention {flag}");
    }
}

#[test]
fn unusable_values_exit_2_with_one_line() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr").to_string();
    let bad_file = temp_file("users-bad", "alice:one\nbob\n", 0o600);
    let bad_file = bad_file.to_str().expect("utf-8 path");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--bogus"], "--bogus"),
        (vec!["--deny-dest", "10.0.0.0/33"], "CIDR"),
        (vec!["--allow-client", "nonsense"], "CIDR"),
        (vec!["--mode", "fork"], "fork"),
        (vec!["--listen", "127.0.0.1:99999"], "99999"),
        (vec!["--handshake-timeout", "soon"], "duration"),
        (vec!["--user", "nocolon"], "name:password"),
        (
            vec!["--users-file", "/nonexistent/users"],
            "/nonexistent/users",
        ),
        (vec!["--users-file", bad_file], ":2:"),
        (vec!["--log-level", "info,=,"], "log-level"),
    ];
    for (args, needle) in cases {
        let (code, stderr) = run_to_exit(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    // The cause is told once, not repeated by the error chain.
    let (_, stderr) = run_to_exit(&["--users-file", "/nonexistent/users"]);
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "{stderr}"
    );
    // Port in use: the listener above still holds it.
    let (code, stderr) = run_to_exit(&["--listen", &taken]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot listen on"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn sigterm_and_sigint_exit_0_after_draining() {
    for signal in [Signal::TERM, Signal::INT] {
        let echo = Target::echo("127.0.0.1:0");
        let mut proxy = ProxyProcess::start(&["--grace", "10s"]);
        let mut stream = open_session(proxy.addr, echo.addr);
        proxy.signal(signal);
        // The running session keeps working during the grace period...
        assert_echo(&mut stream, b"draining");
        // ...and once it ends, the process exits cleanly.
        drop(stream);
        let status = proxy.wait();
        assert_eq!(status.code(), Some(0), "{signal:?}");
    }
}

#[test]
fn users_file_authenticates_and_warns_when_world_readable() {
    let echo = Target::echo("127.0.0.1:0");
    let path = temp_file("users-open", "# team\ncarol:pw1\n", 0o644);
    let mut proxy = ProxyProcess::start_capturing_stderr(&[
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--users-file".as_ref(),
        path.as_os_str(),
    ]);
    let target = TargetAddr::Ip(echo.addr);
    let (_, code, _) = socks_connect(proxy.addr, &target, Some(("carol", "pw1"))).expect("auth");
    assert_eq!(code, ReplyCode::Succeeded);
    assert!(socks_connect(proxy.addr, &target, Some(("carol", "pw2"))).is_err());
    proxy.signal(Signal::TERM);
    assert_eq!(proxy.wait().code(), Some(0));
    let stderr = proxy.take_stderr();
    assert!(stderr.contains("readable by every user"), "{stderr}");
    assert!(!stderr.contains("pw1"), "a password was logged: {stderr}");
}

#[test]
fn public_bind_without_auth_warns_loudly() {
    let mut proxy = ProxyProcess::start_capturing_stderr(&["--listen", "0.0.0.0:0"]);
    proxy.signal(Signal::TERM);
    assert_eq!(proxy.wait().code(), Some(0));
    let stderr = proxy.take_stderr();
    assert!(stderr.contains("WITHOUT AUTHENTICATION"), "{stderr}");
}

/// With a soft and hard descriptor limit of 64, more sessions are opened than fit, in every
/// mode, one after another and then 30 at once: the established ones keep flowing, every other
/// client is refused promptly and cleanly (EOF, or reply 0x01 when the outgoing socket could
/// not be created) rather than left queued, and new sessions work once old ones close.
fn descriptor_exhaustion_refuses_cleanly_and_recovers(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    let target = TargetAddr::Ip(echo.addr);
    let mut command = Command::new("sh");
    command.args([
        "-c",
        "ulimit -n 64 && exec \"$0\" --listen 127.0.0.1:0 --log-level error --mode \"$1\"",
        proxy_binary(),
        mode.name(),
    ]);
    let mut proxy = ProxyProcess::spawn(command);
    let mut outcomes = Vec::new();
    for _ in 0..60 {
        outcomes.push(attempt_session(proxy.addr, &target));
    }
    let concurrent: Vec<_> = (0..30)
        .map(|_| {
            let (addr, target) = (proxy.addr, target.clone());
            std::thread::spawn(move || attempt_session(addr, &target))
        })
        .collect();
    outcomes.extend(
        concurrent
            .into_iter()
            .map(|t| t.join().expect("client thread")),
    );
    let mut established = Vec::new();
    let mut refused = 0;
    for outcome in outcomes {
        match outcome.unwrap_or_else(|err| panic!("{mode}: {err}")) {
            Attempt::Established(stream) => established.push(stream),
            Attempt::RefusedWithReply | Attempt::RefusedClosed => refused += 1,
        }
    }
    let count = established.len();
    assert!(
        (10..60).contains(&count),
        "{mode}: {count} sessions established"
    );
    assert!(refused >= 30, "{mode}: only {refused} refused");
    // Saturated, with a newcomer knocking every 20 ms: a busy loop would burn the whole
    // window, and every knock must still be answered (refused or served), none left queued.
    let pid = proxy.child.id();
    let before = cpu_ticks(pid);
    for _ in 0..100 {
        let mut knock = connect(proxy.addr);
        let _ = knock.write_all(&proxy::socks5::client::encode_greeting(&[0]));
        let mut byte = [0u8; 1];
        if let Err(err) = std::io::Read::read(&mut knock, &mut byte) {
            assert!(
                !is_timeout(&err),
                "{mode}: a knocking client was left waiting"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let spent = cpu_ticks(pid) - before;
    assert!(
        spent < ticks_per_second(),
        "{mode}: {spent} CPU ticks in about 2 s while saturated (a busy loop?)"
    );
    assert!(
        proxy.child.try_wait().expect("try_wait").is_none(),
        "{mode}: proxy died"
    );
    for (i, stream) in established.iter_mut().enumerate() {
        assert!(
            echo_check(stream, format!("session {i} still flows").as_bytes()),
            "{mode}: session {i} of {count}"
        );
    }
    established.truncate(count / 2);
    let mut recovered = open_session_eventually(proxy.addr, echo.addr)
        .unwrap_or_else(|| panic!("{mode}: no new session after descriptors were freed"));
    assert!(echo_check(&mut recovered, b"recovered"), "{mode}");
    assert!(
        proxy.child.try_wait().expect("try_wait").is_none(),
        "{mode}: proxy died"
    );
}

#[test]
fn a_descriptor_limit_too_low_to_serve_is_refused_before_the_ready_line() {
    let output = Command::new("sh")
        .args([
            "-c",
            "ulimit -n 12 && exec \"$0\" --listen 127.0.0.1:0",
            proxy_binary(),
        ])
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(output.stdout.is_empty(), "no ready line");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("descriptor limit is 12"), "{stderr}");
}

/// The README's hardened setup, flag for flag (but on loopback, with the listed client
/// 127.0.0.2): an unlisted client is closed before any reply, and loopback, link-local and
/// cloud-metadata, private and unique-local destinations (IPv4, IPv6, IPv4-mapped and by
/// name) all get 0x02 without being contacted, in every mode.
fn the_readme_hardened_example_denies_private_destinations_and_unlisted_clients(mode: Mode) {
    let users = temp_file("hardened-users", "alice:s3cret\n", 0o600);
    let contacted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = contacted.clone();
    let echo = Target::spawn("127.0.0.1:0", move |_| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    });
    let denied = [
        TargetAddr::Ip(echo.addr),
        TargetAddr::Ip("169.254.169.254:80".parse().expect("addr")),
        TargetAddr::Ip("10.1.2.3:80".parse().expect("addr")),
        TargetAddr::Ip("172.16.0.1:80".parse().expect("addr")),
        TargetAddr::Ip("192.168.1.1:80".parse().expect("addr")),
        TargetAddr::Ip("[::1]:80".parse().expect("addr")),
        TargetAddr::Ip("[fe80::1]:80".parse().expect("addr")),
        TargetAddr::Ip("[fd00::1]:80".parse().expect("addr")),
        TargetAddr::Ip("[::ffff:10.0.0.1]:80".parse().expect("addr")),
        TargetAddr::Domain("localhost".into(), echo.addr.port()),
    ];
    let mut command = Command::new(proxy_binary());
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--mode",
        mode.name(),
        "--users-file",
        users.to_str().expect("path"),
        "--allow-client",
        "127.0.0.2/32",
        "--deny-dest",
        "127.0.0.0/8",
        "--deny-dest",
        "::1/128",
        "--deny-dest",
        "169.254.0.0/16",
        "--deny-dest",
        "fe80::/10",
        "--deny-dest",
        "10.0.0.0/8",
        "--deny-dest",
        "172.16.0.0/12",
        "--deny-dest",
        "192.168.0.0/16",
        "--deny-dest",
        "fc00::/7",
        "--idle-timeout",
        "10m",
        "--max-sessions",
        "5000",
        "--log-level",
        "error",
    ]);
    let proxy = ProxyProcess::spawn(command);

    // A client that is not listed: closed before any reply.
    let mut unlisted = connect(proxy.addr);
    let _ = unlisted.write_all(&proxy::socks5::client::encode_greeting(&[2]));
    assert!(
        closed_without_data(&mut unlisted),
        "{mode}: unlisted client"
    );

    for target in &denied {
        let socket = rustix::net::socket(
            rustix::net::AddressFamily::INET,
            rustix::net::SocketType::STREAM,
            None,
        )
        .expect("socket");
        let from: std::net::SocketAddr = "127.0.0.2:0".parse().expect("addr");
        rustix::net::bind(&socket, &from).expect("bind 127.0.0.2");
        rustix::net::connect(&socket, &proxy.addr).expect("connect");
        let mut stream = std::net::TcpStream::from(socket);
        stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        negotiate(&mut stream, Some(("alice", "s3cret"))).expect("authenticated");
        let (code, _) =
            request_on(&mut stream, proxy::socks5::Command::Connect, target).expect("reply");
        assert_eq!(code, ReplyCode::NotAllowed, "{mode}: {target:?}");
    }
    assert_eq!(
        contacted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a denied target was contacted"
    );
}

per_mode!(
    the_readme_hardened_example_denies_private_destinations_and_unlisted_clients,
    descriptor_exhaustion_refuses_cleanly_and_recovers,
);
