//! The conformance suite: every test runs against every server mode, over real loopback
//! sockets, asserting on bytes and reply codes.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown as NetShutdown, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use proxy::config::parse_cidr;
use proxy::socks5::Command;
use proxy::socks5::ReplyCode;
use proxy::socks5::TargetAddr;
use proxy::{Acl, Config, Mode};
use sha2::{Digest, Sha256};

fn connect_ipv4_relays_and_reports_the_outgoing_address(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    let server = TestServer::start(mode, Config::default());
    let (mut stream, code, bound) =
        socks_connect(server.addr, &TargetAddr::Ip(echo.addr), None).expect("handshake");
    assert_eq!(code, ReplyCode::Succeeded, "{mode}");
    let TargetAddr::Ip(bound) = bound else {
        panic!("{mode}: bound address is not an IP");
    };
    assert!(
        bound.ip().is_loopback() && bound.port() != 0,
        "{mode}: {bound}"
    );
    assert_echo(&mut stream, b"hello through the proxy");
    server.stop().expect("clean stop");
}

fn connect_ipv6_target_and_ipv6_listener(mode: Mode) {
    let echo = Target::echo("[::1]:0");
    let server = TestServer::start_on("[::1]:0", mode, Config::default());
    let (mut stream, code, bound) =
        socks_connect(server.addr, &TargetAddr::Ip(echo.addr), None).expect("handshake");
    assert_eq!(code, ReplyCode::Succeeded, "{mode}");
    assert!(
        matches!(bound, TargetAddr::Ip(SocketAddr::V6(_))),
        "{mode}: {bound}"
    );
    assert_echo(&mut stream, b"over IPv6");
}

fn domain_target_is_resolved_by_the_server(mode: Mode) {
    // Trying every resolved address in turn is tested in the mode's unit tests, since
    // `localhost` may resolve to a single address on a given machine.
    let echo = Target::echo("127.0.0.1:0");
    let server = TestServer::start(mode, Config::default());
    let target = TargetAddr::Domain("localhost".into(), echo.addr.port());
    let (mut stream, code, _) = socks_connect(server.addr, &target, None).expect("handshake");
    assert_eq!(code, ReplyCode::Succeeded, "{mode}");
    assert_echo(&mut stream, b"by name");
}

fn pipelined_greeting_request_and_data_in_one_write(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    let server = TestServer::start(mode, Config::default());
    let mut stream = connect(server.addr);
    let mut wire = proxy::socks5::client::encode_greeting(&[0]);
    proxy::socks5::client::encode_request(Command::Connect, &TargetAddr::Ip(echo.addr), &mut wire);
    wire.extend_from_slice(b"early data");
    stream.write_all(&wire).expect("write");
    assert_eq!(read_exact(&mut stream, 2).expect("method"), [5, 0]);
    let (code, _) = read_reply(&mut stream).expect("reply");
    assert_eq!(code, ReplyCode::Succeeded, "{mode}");
    assert_eq!(
        read_exact(&mut stream, 10).expect("echo"),
        b"early data",
        "{mode}"
    );
}

fn greeting_and_request_split_byte_by_byte(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    let server = TestServer::start(mode, with_users(&[("alice", "s3cret"), ("bob", "hunter2")]));
    let mut stream = connect(server.addr);
    stream.set_nodelay(true).expect("nodelay");
    let mut wire = proxy::socks5::client::encode_greeting(&[0, 2]);
    wire.extend(proxy::socks5::client::encode_auth("bob", "hunter2"));
    proxy::socks5::client::encode_request(Command::Connect, &TargetAddr::Ip(echo.addr), &mut wire);
    for byte in &wire {
        stream.write_all(&[*byte]).expect("write");
    }
    assert_eq!(
        read_exact(&mut stream, 4).expect("method+auth"),
        [5, 2, 1, 0]
    );
    let (code, _) = read_reply(&mut stream).expect("reply");
    assert_eq!(code, ReplyCode::Succeeded, "{mode}");
    assert_echo(&mut stream, b"after a slow handshake");
}

fn username_password_accepts_listed_users_only(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    let server = TestServer::start(mode, with_users(&[("alice", "s3cret"), ("bob", "hunter2")]));
    let target = TargetAddr::Ip(echo.addr);
    let (mut stream, code, _) =
        socks_connect(server.addr, &target, Some(("alice", "s3cret"))).expect("alice");
    assert_eq!(code, ReplyCode::Succeeded);
    assert_echo(&mut stream, b"authenticated");

    for (name, password) in [("alice", "wrong"), ("mallory", "s3cret")] {
        let mut stream = connect(server.addr);
        stream.write_all(&[5, 1, 2]).expect("greeting");
        assert_eq!(read_exact(&mut stream, 2).expect("method"), [5, 2]);
        stream
            .write_all(&proxy::socks5::client::encode_auth(name, password))
            .expect("auth");
        assert_eq!(
            read_exact(&mut stream, 2).expect("status"),
            [1, 1],
            "{mode}"
        );
        assert!(
            closed_without_data(&mut stream),
            "{mode}: closed after failure"
        );
    }

    // A client offering only "no authentication" gets 05 FF and is closed.
    let mut stream = connect(server.addr);
    stream.write_all(&[5, 1, 0]).expect("greeting");
    assert_eq!(
        read_exact(&mut stream, 2).expect("method"),
        [5, 0xFF],
        "{mode}"
    );
    assert!(closed_without_data(&mut stream));
}

fn malformed_greetings_are_closed(mode: Mode) {
    let server = TestServer::start(mode, Config::default());
    // SOCKS4 greeting: no SOCKS5 reply is possible.
    let mut stream = connect(server.addr);
    stream
        .write_all(&[4, 1, 0, 80, 127, 0, 0, 1, 0])
        .expect("write");
    assert!(closed_without_data(&mut stream), "{mode}: bad version");
    // NMETHODS = 0.
    let mut stream = connect(server.addr);
    stream.write_all(&[5, 0]).expect("write");
    assert!(closed_without_data(&mut stream), "{mode}: no methods");
    // Offers only GSSAPI.
    let mut stream = connect(server.addr);
    stream.write_all(&[5, 1, 1]).expect("write");
    assert_eq!(read_exact(&mut stream, 2).expect("method"), [5, 0xFF]);
    assert!(closed_without_data(&mut stream));
}

/// Sends a raw request after a no-auth greeting and returns the reply code, checking that the
/// server closes the connection after a failure.
#[track_caller]
fn raw_request_reply(proxy: SocketAddr, request: &[u8]) -> ReplyCode {
    let mut stream = connect(proxy);
    negotiate(&mut stream, None).expect("greeting");
    stream.write_all(request).expect("request");
    let (code, bound) = read_reply(&mut stream).expect("reply");
    if code != ReplyCode::Succeeded {
        assert_eq!(bound, TargetAddr::Ip("0.0.0.0:0".parse().expect("addr")));
        assert!(
            closed_without_data(&mut stream),
            "closed after failure {code:?}"
        );
    }
    code
}

fn request_errors_get_their_reply_codes(mode: Mode) {
    let cases: [(&str, &[u8], ReplyCode); 7] = [
        (
            "BIND",
            &[5, 2, 0, 1, 127, 0, 0, 1, 0, 80],
            ReplyCode::CommandNotSupported,
        ),
        (
            "UDP ASSOCIATE",
            &[5, 3, 0, 1, 127, 0, 0, 1, 0, 80],
            ReplyCode::CommandNotSupported,
        ),
        (
            "unknown command",
            &[5, 0x7f, 0, 1, 127, 0, 0, 1, 0, 80],
            ReplyCode::CommandNotSupported,
        ),
        (
            "bad ATYP",
            &[5, 1, 0, 9, 127, 0, 0, 1, 0, 80],
            ReplyCode::AddressTypeNotSupported,
        ),
        (
            "RSV not zero",
            &[5, 1, 7, 1, 127, 0, 0, 1, 0, 80],
            ReplyCode::GeneralFailure,
        ),
        (
            "bad version",
            &[6, 1, 0, 1, 127, 0, 0, 1, 0, 80],
            ReplyCode::GeneralFailure,
        ),
        (
            "empty domain",
            &[5, 1, 0, 3, 0, 0, 80],
            ReplyCode::GeneralFailure,
        ),
    ];
    let server = TestServer::start(mode, Config::default());
    for (what, request, expected) in cases {
        if mode.supports_bind_and_udp() && matches!(what, "BIND" | "UDP ASSOCIATE") {
            continue; // served there, and tested in commands.rs
        }
        assert_eq!(
            raw_request_reply(server.addr, request),
            expected,
            "{mode}: {what}"
        );
    }
}

fn refused_target_gets_0x05(mode: Mode) {
    let port = closed_port();
    let server = TestServer::start(mode, Config::default());
    let (_, code, _) = socks_connect(server.addr, &TargetAddr::Ip(port), None).expect("handshake");
    assert_eq!(code, ReplyCode::ConnectionRefused, "{mode}");
}

fn unanswered_connect_times_out_with_0x06(mode: Mode) {
    let (hole, _fillers) = black_hole();
    let config = Config {
        connect_timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let server = TestServer::start(mode, config);
    let (_, code, _) = socks_connect(server.addr, &TargetAddr::Ip(hole), None).expect("handshake");
    assert_eq!(code, ReplyCode::TtlExpired, "{mode}");
}

fn destination_rules_reply_0x02(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    let cidr = |s: &str| parse_cidr(s).expect("cidr");
    let config = Config {
        acl: Acl {
            allow_dests: vec![cidr("127.0.0.0/8")],
            deny_dests: vec![cidr(&format!("{}/32", echo.addr.ip()))],
            ..Acl::default()
        },
        ..Config::default()
    };
    let server = TestServer::start(mode, config);
    // Denied by --deny-dest, which wins over --allow-dest.
    let (_, code, _) =
        socks_connect(server.addr, &TargetAddr::Ip(echo.addr), None).expect("handshake");
    assert_eq!(code, ReplyCode::NotAllowed, "{mode}: denied");
    // Not in --allow-dest (never contacted: the rule is checked first).
    let outside: SocketAddr = "[::1]:9".parse().expect("addr");
    let (_, code, _) = socks_connect(server.addr, &TargetAddr::Ip(outside), None).expect("hs");
    assert_eq!(code, ReplyCode::NotAllowed, "{mode}: outside allow list");
    // A name resolving only to denied addresses is denied too.
    let target = TargetAddr::Domain("localhost".into(), echo.addr.port());
    let (_, code, _) = socks_connect(server.addr, &target, None).expect("handshake");
    assert_eq!(code, ReplyCode::NotAllowed, "{mode}: by name");
}

fn clients_outside_allow_client_are_closed(mode: Mode) {
    let config = Config {
        acl: Acl {
            allow_clients: vec![parse_cidr("192.0.2.0/24").expect("cidr")],
            ..Acl::default()
        },
        ..Config::default()
    };
    let server = TestServer::start(mode, config);
    let mut stream = connect(server.addr);
    let _ = stream.write_all(&[5, 1, 0]);
    assert!(closed_without_data(&mut stream), "{mode}");
}

/// Behind a trusted balancer (loopback here), the PROXY header's client is the one the client
/// rules judge; a trusted connection without a header is closed; from an untrusted peer a
/// PROXY header is a bad greeting.
fn proxy_protocol_from_trusted_balancers_names_the_client(mode: Mode) {
    use proxy::socks5::proxy_header::{encode_v1, encode_v2};
    let echo = Target::echo("127.0.0.1:0");
    let cidr = |s: &str| parse_cidr(s).expect("cidr");
    let config = Config {
        acl: Acl {
            allow_clients: vec![cidr("192.0.2.0/24")],
            ..Acl::default()
        },
        trusted_proxies: vec![cidr("127.0.0.0/8")],
        ..Config::default()
    };
    let server = TestServer::start(mode, config);
    let frontend: SocketAddr = "203.0.113.1:1080".parse().expect("addr");
    let allowed: SocketAddr = "192.0.2.7:50000".parse().expect("addr");
    let refused: SocketAddr = "198.51.100.9:50000".parse().expect("addr");
    // An allowed client, by either version, the header split from the greeting or not.
    for header in [
        encode_v1(allowed, frontend),
        encode_v2(allowed, frontend, &[1, 0, 1, b'h']),
    ] {
        let mut stream = connect(server.addr);
        stream.write_all(&header).expect("header");
        negotiate(&mut stream, None).expect("greeting");
        let (code, _) =
            request_on(&mut stream, Command::Connect, &TargetAddr::Ip(echo.addr)).expect("request");
        assert_eq!(code, ReplyCode::Succeeded, "{mode}: {header:?}");
        assert_echo(&mut stream, b"from behind the balancer");
    }
    let mut stream = connect(server.addr);
    let mut wire = encode_v2(allowed, frontend, &[]);
    wire.extend_from_slice(&proxy::socks5::client::encode_greeting(&[0]));
    stream
        .write_all(&wire)
        .expect("header and greeting in one write");
    assert_eq!(
        read_exact(&mut stream, 2).expect("method"),
        [5, 0],
        "{mode}"
    );
    // A client the rules refuse: the balancer is admitted, the request gets 0x02.
    let mut stream = connect(server.addr);
    stream
        .write_all(&encode_v1(refused, frontend))
        .expect("header");
    negotiate(&mut stream, None).expect("greeting");
    let (code, _) =
        request_on(&mut stream, Command::Connect, &TargetAddr::Ip(echo.addr)).expect("request");
    assert_eq!(code, ReplyCode::NotAllowed, "{mode}: refused client");
    // LOCAL (a health check) names no client: the balancer itself is judged, and loopback is
    // not in --allow-client.
    let mut stream = connect(server.addr);
    let mut local = proxy::socks5::proxy_header::V2_SIGNATURE.to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    stream.write_all(&local).expect("header");
    negotiate(&mut stream, None).expect("greeting");
    let (code, _) =
        request_on(&mut stream, Command::Connect, &TargetAddr::Ip(echo.addr)).expect("request");
    assert_eq!(code, ReplyCode::NotAllowed, "{mode}: LOCAL");
    // A trusted peer that sends no header, or a broken one: closed without a reply.
    for bad in [
        &[5u8, 1, 0][..],
        b"PROXY TCP4 192.0.2.7 1.2.3.4 1\r\n",
        b"PROXY TCP4 x\n",
    ] {
        let mut stream = connect(server.addr);
        let _ = stream.write_all(bad);
        assert!(closed_without_data(&mut stream), "{mode}: {bad:?}");
    }
    server.stop().expect("clean stop");

    // Not trusted: the header is a bad greeting, even naming an allowed client.
    let server = TestServer::start(mode, Config::default());
    for header in [
        encode_v1(allowed, frontend),
        encode_v2(allowed, frontend, &[]),
    ] {
        let mut stream = connect(server.addr);
        let _ = stream.write_all(&header);
        assert!(
            closed_without_data(&mut stream),
            "{mode}: untrusted {header:?}"
        );
    }
}

fn half_close_keeps_the_other_direction_flowing(mode: Mode) {
    const MIB: usize = 1 << 20;
    // The target reads the client's whole upload, then answers with as much of its own.
    let target = Target::spawn("127.0.0.1:0", |mut stream| {
        let upload = read_to_end(&mut stream).expect("upload");
        assert_eq!(upload, pattern(1, MIB));
        stream.write_all(&pattern(2, MIB)).expect("answer");
    });
    let server = TestServer::start(mode, Config::default());
    let mut stream = open_session(server.addr, target.addr);
    stream.write_all(&pattern(1, MIB)).expect("upload");
    stream.shutdown(NetShutdown::Write).expect("FIN");
    let answer = read_to_end(&mut stream).expect("answer");
    assert_eq!(answer.len(), MIB, "{mode}");
    assert!(answer == pattern(2, MIB), "{mode}: answer corrupted");
}

fn hundred_mib_each_way_at_once_arrive_intact(mode: Mode) {
    const SIZE: usize = 100 << 20;
    const CHUNK: usize = 1 << 20;
    fn send_pattern(stream: &mut TcpStream, seed: u64) -> Vec<u8> {
        let mut hash = Sha256::new();
        for i in 0..SIZE / CHUNK {
            let chunk = pattern(seed + i as u64, CHUNK);
            hash.update(&chunk);
            stream.write_all(&chunk).expect("send");
        }
        stream.shutdown(NetShutdown::Write).expect("FIN");
        hash.finalize().to_vec()
    }
    fn hash_until_eof(stream: &mut TcpStream) -> (usize, Vec<u8>) {
        let mut hash = Sha256::new();
        let mut total = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stream.read(&mut buf).expect("receive");
            if n == 0 {
                return (total, hash.finalize().to_vec());
            }
            total += n;
            hash.update(&buf[..n]);
        }
    }
    let (result_tx, result_rx) = std::sync::mpsc::channel();
    let result_tx = std::sync::Mutex::new(result_tx);
    let target = Target::spawn("127.0.0.1:0", move |mut stream| {
        let mut reader = stream.try_clone().expect("clone");
        let receiving = std::thread::spawn(move || hash_until_eof(&mut reader));
        let sent = send_pattern(&mut stream, 1000);
        let received = receiving.join().expect("receiver");
        let _ = result_tx.lock().expect("lock").send((sent, received));
    });
    let server = TestServer::start(mode, Config::default());
    let mut stream = open_session(server.addr, target.addr);
    let mut reader = stream.try_clone().expect("clone");
    let receiving = std::thread::spawn(move || hash_until_eof(&mut reader));
    let sent_up = send_pattern(&mut stream, 0);
    let (down_len, down_hash) = receiving.join().expect("receiver");
    let (sent_down, (up_len, up_hash)) = result_rx.recv().expect("target result");
    assert_eq!((up_len, down_len), (SIZE, SIZE), "{mode}");
    assert!(up_hash == sent_up, "{mode}: client→target corrupted");
    assert!(down_hash == sent_down, "{mode}: target→client corrupted");
}

fn target_reset_closes_the_client(mode: Mode) {
    let target = Target::spawn("127.0.0.1:0", |mut stream| {
        let mut buf = [0u8; 5];
        if stream.read_exact(&mut buf).is_ok() {
            stream.write_all(b"partial").ok();
            // Linger 0: close with RST.
            let _ = rustix::net::sockopt::set_socket_linger(&stream, Some(Duration::ZERO));
        }
    });
    let server = TestServer::start(mode, Config::default());
    let mut stream = open_session(server.addr, target.addr);
    stream.write_all(b"hello").expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert!(b"partial".starts_with(&got), "{mode}: {got:?}");
    // The session is gone: writing eventually fails instead of hanging.
    let mut failed = false;
    for _ in 0..100 {
        if stream.write_all(&[0u8; 1024]).is_err() {
            failed = true;
            break;
        }
        std::thread::yield_now();
    }
    assert!(
        failed,
        "{mode}: client side still open after the target reset"
    );
}

fn stalled_handshake_is_closed_after_the_timeout(mode: Mode) {
    let config = Config {
        handshake_timeout: Duration::from_millis(200),
        ..Config::default()
    };
    let server = TestServer::start(mode, config);
    let mut one_byte = connect(server.addr);
    one_byte.write_all(&[5]).expect("write");
    let mut half_request = connect(server.addr);
    half_request
        .write_all(&[5, 1, 0, 5, 1, 0, 1, 127])
        .expect("write");
    assert!(closed_without_data(&mut one_byte), "{mode}");
    assert_eq!(read_exact(&mut half_request, 2).expect("method"), [5, 0]);
    assert!(closed_without_data(&mut half_request), "{mode}");
}

fn idle_sessions_are_closed_after_the_idle_timeout(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    let config = Config {
        idle_timeout: Some(Duration::from_millis(300)),
        ..Config::default()
    };
    let server = TestServer::start(mode, config);
    let mut stream = open_session(server.addr, echo.addr);
    assert_echo(&mut stream, b"active");
    assert!(closed_without_data(&mut stream), "{mode}");
}

fn max_sessions_refuses_newcomers_and_recovers(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    let config = Config {
        max_sessions: Some(2),
        ..Config::default()
    };
    let server = TestServer::start(mode, config);
    let mut first = open_session(server.addr, echo.addr);
    let mut second = open_session(server.addr, echo.addr);
    let mut third = connect(server.addr);
    let _ = third.write_all(&[5, 1, 0]);
    assert!(closed_without_data(&mut third), "{mode}: third refused");
    assert_echo(&mut first, b"still served");
    assert_echo(&mut second, b"still served");
    drop(first);
    let mut again = open_session_eventually(server.addr, echo.addr)
        .expect("the server never accepted a new session");
    assert_echo(&mut again, b"served after a slot freed");
}

fn shutdown_lets_running_sessions_finish(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    let config = Config {
        grace: Duration::from_secs(20),
        ..Config::default()
    };
    let server = TestServer::start(mode, config);
    let addr = server.addr;
    let mut stream = open_session(addr, echo.addr);
    let stopping = std::thread::spawn(move || server.stop());
    // New connections are refused once the listener is closed.
    let mut refused = false;
    for _ in 0..500 {
        if TcpStream::connect(addr).is_err() {
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(refused, "{mode}: still accepting after shutdown");
    assert_echo(&mut stream, b"still flowing during the grace period");
    stream.shutdown(NetShutdown::Write).expect("FIN");
    assert!(read_to_end(&mut stream).expect("EOF").is_empty());
    stopping.join().expect("join").expect("clean exit");
}

fn shutdown_closes_sessions_left_after_the_grace_period(mode: Mode) {
    let echo = Target::echo("127.0.0.1:0");
    let config = Config {
        grace: Duration::from_millis(100),
        ..Config::default()
    };
    let server = TestServer::start(mode, config);
    let mut stream = open_session(server.addr, echo.addr);
    server.stop().expect("clean exit");
    assert!(closed_without_data(&mut stream), "{mode}");
}

per_mode!(
    connect_ipv4_relays_and_reports_the_outgoing_address,
    connect_ipv6_target_and_ipv6_listener,
    domain_target_is_resolved_by_the_server,
    pipelined_greeting_request_and_data_in_one_write,
    greeting_and_request_split_byte_by_byte,
    username_password_accepts_listed_users_only,
    malformed_greetings_are_closed,
    request_errors_get_their_reply_codes,
    refused_target_gets_0x05,
    unanswered_connect_times_out_with_0x06,
    destination_rules_reply_0x02,
    clients_outside_allow_client_are_closed,
    proxy_protocol_from_trusted_balancers_names_the_client,
    half_close_keeps_the_other_direction_flowing,
    hundred_mib_each_way_at_once_arrive_intact,
    target_reset_closes_the_client,
    stalled_handshake_is_closed_after_the_timeout,
    idle_sessions_are_closed_after_the_idle_timeout,
    max_sessions_refuses_newcomers_and_recovers,
    shutdown_lets_running_sessions_finish,
    shutdown_closes_sessions_left_after_the_grace_period,
);
