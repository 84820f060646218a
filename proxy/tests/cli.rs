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
    let users = temp_file(
        &format!("hardened-users-{}", mode.name()),
        "alice:s3cret\n",
        0o600,
    );
    let mut command = Command::new(proxy_binary());
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--mode",
        mode.name(),
        "--users-file",
    ]);
    command.arg(&users).args(HARDENED_FLAGS);
    hardened_server_behaves(mode, command);
}

/// The same server from `contrib/proxy.toml` (the README's hardened example as a config file),
/// the command line placing it on loopback: its --listen, --mode, --users-file and
/// --allow-client win over the file's; the deny rules, timeouts and limits come from the file.
fn a_config_file_equivalent_to_the_hardened_example_starts_the_same_server(mode: Mode) {
    let users = temp_file(
        &format!("hardened-users-file-{}", mode.name()),
        "alice:s3cret\n",
        0o600,
    );
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/proxy.toml");
    let mut command = Command::new(proxy_binary());
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--mode",
        mode.name(),
        "--users-file",
    ]);
    command.arg(&users);
    command.args([
        "--allow-client",
        "127.0.0.2/32",
        "--log-level",
        "error",
        "--config",
    ]);
    command.arg(&config);
    hardened_server_behaves(mode, command);
}

/// The README's hardened example's rules, on loopback (the listed client is 127.0.0.2).
const HARDENED_FLAGS: &[&str] = &[
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
];

fn hardened_server_behaves(mode: Mode, command: Command) {
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
    let proxy = ProxyProcess::spawn(command);
    assert!(proxy.addr.ip().is_loopback(), "{}", proxy.ready_line);
    assert!(
        proxy.ready_line.contains(&format!("mode={}", mode.name())),
        "{}",
        proxy.ready_line
    );

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
    a_config_file_equivalent_to_the_hardened_example_starts_the_same_server,
    sighup_reloads_settings,
    a_reload_that_shortens_the_idle_timeout_spares_established_sessions,
    descriptor_exhaustion_refuses_cleanly_and_recovers,
);

/// Whether `name:password` may open a session now (a fresh connection).
fn authenticates(proxy: std::net::SocketAddr, name: &str, password: &str) -> bool {
    let mut stream = connect(proxy);
    negotiate(&mut stream, Some((name, password))).is_ok()
}

/// SIGHUP re-reads the config file and the users file: a user added reaches new sessions at
/// once (in every worker), a session opened before keeps relaying, and a broken file or users
/// file leaves the settings as they were, saying why.
fn sighup_reloads_users_and_rules_and_a_broken_file_changes_nothing(mode: Mode, workers: u16) {
    let tag = format!("{}-{workers}", mode.name());
    let users = temp_file(&format!("reload-users-{tag}"), "alice:one\n", 0o600);
    let config = temp_file(
        &format!("reload-{tag}.toml"),
        &format!(
            "users-file = {:?}\nlog-level = \"info\"\n",
            users.to_str().expect("path")
        ),
        0o600,
    );
    let workers_arg = workers.to_string();
    let args: Vec<&std::ffi::OsStr> = [
        "--listen",
        "127.0.0.1:0",
        "--mode",
        mode.name(),
        "--workers",
        &workers_arg,
        "--config",
    ]
    .into_iter()
    .map(std::ffi::OsStr::new)
    .chain([config.as_os_str()])
    .collect();
    let logged = Logged::start(&args);
    let addr = logged.proxy.addr;
    let echo = Target::echo("127.0.0.1:0");
    let mut alice = connect(addr);
    negotiate(&mut alice, Some(("alice", "one"))).expect("alice authenticates");
    let (code, _) = request_on(
        &mut alice,
        proxy::socks5::Command::Connect,
        &TargetAddr::Ip(echo.addr),
    )
    .expect("reply");
    assert_eq!(code, ReplyCode::Succeeded);
    assert_echo(&mut alice, b"before the reload");
    assert!(!authenticates(addr, "bob", "two"), "{tag}: bob before");

    // Bob is added: every new session (whichever worker takes it) knows him.
    std::fs::write(&users, "alice:one\nbob:two\n").expect("write users");
    logged.proxy.signal(Signal::HUP);
    logged.wait_for("reloaded", usize::from(workers));
    for _ in 0..4 {
        assert!(authenticates(addr, "bob", "two"), "{tag}: bob after");
    }
    assert_echo(&mut alice, b"after the reload");

    // A users file with a broken line, and then a config file that is not TOML: refused, and
    // bob (whom both would remove) stays.
    std::fs::write(&users, "alice:one\nno colon here\n").expect("write users");
    logged.proxy.signal(Signal::HUP);
    let log = logged.wait_for("reload failed", usize::from(workers));
    assert!(log.contains(":2:"), "{tag}: {log}");
    std::fs::write(&users, "alice:one\n").expect("write users");
    std::fs::write(&config, "users-file = [unclosed\n").expect("write config");
    logged.proxy.signal(Signal::HUP);
    let log = logged.wait_for("reload failed", usize::from(workers));
    assert!(log.contains("TOML"), "{tag}: {log}");
    for _ in 0..4 {
        assert!(
            authenticates(addr, "bob", "two"),
            "{tag}: bob after a broken reload"
        );
    }
    assert_echo(&mut alice, b"after a broken reload");
}

fn sighup_reloads_settings(mode: Mode) {
    sighup_reloads_users_and_rules_and_a_broken_file_changes_nothing(mode, 1);
}

#[test]
fn sighup_reaches_every_worker() {
    sighup_reloads_users_and_rules_and_a_broken_file_changes_nothing(Mode::Epoll, 2);
}

#[test]
fn bad_config_files_exit_2_naming_the_key() {
    let cases = [
        ("listn = \"127.0.0.1:0\"\n", "unknown key 'listn'"),
        ("threads = 0\n", "key 'threads'"),
        ("deny-dest = [\"10.0.0.0/33\"]\n", "key 'deny-dest'"),
        ("mode = \"fork\"\n", "key 'mode'"),
        ("listen = \n", "not valid TOML"),
    ];
    for (index, (text, expected)) in cases.into_iter().enumerate() {
        let path = temp_file(&format!("bad-config-{index}.toml"), text, 0o600);
        let (code, stderr) = run_to_exit(&["--config", path.to_str().expect("path")]);
        assert_eq!(code, Some(2), "{text}: {stderr}");
        assert!(stderr.contains(expected), "{text}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{text}: {stderr}");
    }
    let (code, stderr) = run_to_exit(&["--config", "/nonexistent/proxy.toml"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot read config file"), "{stderr}");
}

/// `contrib/proxy.service` is a unit systemd accepts without a warning (with ExecStart pointed
/// at the binary under test: `verify` checks that it exists), and keeps what it promises.
#[test]
fn the_service_unit_passes_systemd_analyze_verify() {
    let unit_path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/proxy.service");
    let unit = std::fs::read_to_string(&unit_path).expect("contrib/proxy.service");
    for line in [
        "ExecStart=/usr/local/bin/proxy --config /etc/proxy/proxy.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=socks5",
        "LimitNOFILE=1048576",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "KillMode=mixed",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    if !installed_or_skip("systemd-analyze", "systemd") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("proxy-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let tested = dir.join("proxy.service");
    std::fs::write(
        &tested,
        unit.replace("/usr/local/bin/proxy", proxy_binary()),
    )
    .expect("write");
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&tested)
        .output()
        .expect("run systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(output.status.success(), "{said}");
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify warned: {said}"
    );
}

/// `--access-log FILE` from the command line: a line per session, appended to the file.
#[test]
fn the_access_log_flag_writes_a_json_line_per_session() {
    let path = std::env::temp_dir().join(format!("proxy-access-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, "an earlier line\n").expect("write");
    let echo = Target::echo("127.0.0.1:0");
    let proxy = ProxyProcess::start(&["--access-log", path.to_str().expect("path")]);
    let mut stream = open_session(proxy.addr, echo.addr);
    assert_echo(&mut stream, b"logged");
    drop(stream);
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    let text = loop {
        let text = std::fs::read_to_string(&path).expect("read the log");
        if text.lines().count() >= 2 || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = std::fs::remove_file(&path);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0], "an earlier line");
    let line: serde_json::Value = serde_json::from_str(lines[1]).expect("JSON");
    assert_eq!(line["reply"], 0, "{line}");
    assert_eq!(line["bytes_up"], 6, "{line}");
    assert_eq!(line["target"], echo.addr.to_string(), "{line}");
}

/// A reload leaves established sessions the idle timeout they started with: shortened from 3 s
/// to 1 s, it does not close a session that was already relaying and is quiet for 2 s at a time
/// (new sessions get 1 s).
fn a_reload_that_shortens_the_idle_timeout_spares_established_sessions(mode: Mode) {
    let config = temp_file(
        &format!("idle-reload-{}.toml", mode.name()),
        "idle-timeout = \"3s\"\nlog-level = \"info\"\n",
        0o600,
    );
    let args: Vec<&std::ffi::OsStr> =
        ["--listen", "127.0.0.1:0", "--mode", mode.name(), "--config"]
            .into_iter()
            .map(std::ffi::OsStr::new)
            .chain([config.as_os_str()])
            .collect();
    let logged = Logged::start(&args);
    let echo = Target::echo("127.0.0.1:0");
    let mut established = open_session(logged.proxy.addr, echo.addr);
    assert_echo(&mut established, b"before");
    std::fs::write(&config, "idle-timeout = \"1s\"\nlog-level = \"info\"\n").expect("write");
    logged.proxy.signal(Signal::HUP);
    logged.wait_for("reloaded", 1);
    let mut newcomer = open_session(logged.proxy.addr, echo.addr);
    assert_echo(&mut newcomer, b"new");
    // Quiet past the new timeout, twice (the second time across the timer armed under the
    // old one): the established session stays, the newcomer is closed.
    std::thread::sleep(Duration::from_millis(1500));
    assert_echo(&mut established, b"still relaying");
    std::thread::sleep(Duration::from_millis(2000));
    assert_echo(&mut established, b"and still");
    assert!(
        ends_with_close(&mut newcomer),
        "{mode}: the newcomer outlived its 1 s"
    );
}
