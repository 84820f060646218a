//! BIND and UDP ASSOCIATE, in the modes that serve them (`async`); the others must answer
//! 0x07.

#[macro_use]
mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use common::*;
use proxy::config::parse_cidr;
use proxy::socks5::udp::parse_datagram;
use proxy::socks5::ReplyCode;
use proxy::socks5::{Command, TargetAddr};
use proxy::{Acl, Config, Mode};

/// Sends a request with `command` after a no-auth greeting; returns the stream and the reply.
#[track_caller]
fn request(
    proxy: SocketAddr,
    command: Command,
    target: &TargetAddr,
) -> (TcpStream, ReplyCode, TargetAddr) {
    let mut stream = connect(proxy);
    negotiate(&mut stream, None).expect("greeting");
    let (code, bound) = request_on(&mut stream, command, target).expect("reply");
    (stream, code, bound)
}

/// A UDP echo server on `bind`.
fn udp_echo(bind: &str) -> SocketAddr {
    let socket = UdpSocket::bind(bind).expect("bind udp");
    let addr = socket.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
    addr
}

fn ip_of(addr: &TargetAddr) -> SocketAddr {
    match addr {
        TargetAddr::Ip(addr) => *addr,
        TargetAddr::Domain(..) => panic!("bound address is a name"),
    }
}

/// Sends `payload` to `target` through the association and returns what came back.
fn through(
    client: &UdpSocket,
    relay: SocketAddr,
    target: &TargetAddr,
    payload: &[u8],
) -> Option<(TargetAddr, Vec<u8>)> {
    let mut wire = vec![0, 0, 0];
    target.encode(&mut wire);
    wire.extend_from_slice(payload);
    client.send_to(&wire, relay).expect("send");
    let mut buf = [0u8; 65536];
    let (n, from) = client.recv_from(&mut buf).ok()?;
    assert_eq!(from, relay, "replies come from the relay");
    let (source, data) = parse_datagram(&buf[..n]).expect("wrapped reply");
    Some((source, data.to_vec()))
}

fn udp_associate_relays_ipv4_ipv6_and_names(mode: Mode) {
    let echo_v4 = udp_echo("127.0.0.1:0");
    let echo_v6 = udp_echo("[::1]:0");
    let server = TestServer::start(mode, Config::default());
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let (control, code, bound) = request(
        server.addr,
        Command::UdpAssociate,
        &TargetAddr::Ip(client.local_addr().expect("addr")),
    );
    assert_eq!(code, ReplyCode::Succeeded, "{mode}");
    let relay = ip_of(&bound);
    assert!(relay.ip().is_loopback() && relay.port() != 0);
    for (target, source) in [
        (TargetAddr::Ip(echo_v4), echo_v4),
        (TargetAddr::Ip(echo_v6), echo_v6),
        (
            TargetAddr::Domain("localhost".into(), echo_v4.port()),
            echo_v4,
        ),
    ] {
        let (from, data) = through(&client, relay, &target, b"ping over udp").expect("echo");
        assert_eq!(data, b"ping over udp", "{mode} {target}");
        assert_eq!(
            from,
            TargetAddr::Ip(source),
            "{mode}: reply wrapped with its source"
        );
    }
    drop(control);
}

fn udp_strangers_and_denied_destinations_are_dropped_and_teardown_follows_the_control_connection(
    mode: Mode,
) {
    let echo = udp_echo("127.0.0.1:0");
    let config = Config {
        acl: Acl {
            deny_dests: vec![parse_cidr("127.0.0.2/32").expect("cidr")],
            ..Acl::default()
        },
        ..Config::default()
    };
    let server = TestServer::start(mode, config);
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    client
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let (control, code, bound) = request(
        server.addr,
        Command::UdpAssociate,
        &TargetAddr::Ip(client.local_addr().expect("addr")),
    );
    assert_eq!(code, ReplyCode::Succeeded);
    let relay = ip_of(&bound);
    // A stranger (another port of the same host: the request named the client's port).
    let stranger = UdpSocket::bind("127.0.0.1:0").expect("bind");
    stranger
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    assert!(
        through(&stranger, relay, &TargetAddr::Ip(echo), b"stranger").is_none(),
        "{mode}"
    );
    // A denied destination.
    let denied: SocketAddr = format!("127.0.0.2:{}", echo.port()).parse().expect("addr");
    assert!(
        through(&client, relay, &TargetAddr::Ip(denied), b"denied").is_none(),
        "{mode}"
    );
    // A fragment.
    client
        .send_to(&[0, 0, 1, 1, 127, 0, 0, 1, 0, 9, b'x'], relay)
        .expect("send");
    // The client itself still gets through.
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let (_, data) = through(&client, relay, &TargetAddr::Ip(echo), b"mine").expect("echo");
    assert_eq!(data, b"mine");
    // Closing the control connection ends the association: the relay port closes, so a
    // datagram to it is refused (ICMP port unreachable on loopback).
    drop(control);
    let probe = UdpSocket::bind("127.0.0.1:0").expect("bind");
    probe.connect(relay).expect("connect");
    probe
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut closed = false;
    for _ in 0..100 {
        let _ = probe.send(&[0, 0, 0, 1, 127, 0, 0, 1, 0, 9]);
        if probe
            .recv(&mut [0u8; 16])
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "{mode}: relay socket still open after the control connection closed"
    );
}

fn bind_accepts_the_expected_peer_and_relays_both_ways(mode: Mode) {
    let server = TestServer::start(mode, Config::default());
    // DST.ADDR names the peer we expect (127.0.0.1); port 0: any port.
    let expected: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let (mut control, code, first) = request(server.addr, Command::Bind, &TargetAddr::Ip(expected));
    assert_eq!(code, ReplyCode::Succeeded, "{mode}: first reply");
    let listening = ip_of(&first);
    let mut peer = connect(listening);
    let (code, second) = read_reply(&mut control).expect("second reply");
    assert_eq!(code, ReplyCode::Succeeded);
    assert_eq!(
        ip_of(&second),
        peer.local_addr().expect("addr"),
        "{mode}: second reply names the peer"
    );
    peer.write_all(b"from the peer").expect("write");
    assert_eq!(
        read_exact(&mut control, 13).expect("read"),
        b"from the peer"
    );
    control.write_all(b"from the client").expect("write");
    assert_eq!(read_exact(&mut peer, 15).expect("read"), b"from the client");
}

fn bind_times_out_with_0x06_and_refuses_denied_peers_with_0x02(mode: Mode) {
    let config = Config {
        connect_timeout: Duration::from_millis(300),
        acl: Acl {
            deny_dests: vec![parse_cidr("127.0.0.9/32").expect("cidr")],
            ..Acl::default()
        },
        ..Config::default()
    };
    let server = TestServer::start(mode, config);
    let (mut control, code, _) = request(
        server.addr,
        Command::Bind,
        &TargetAddr::Ip("127.0.0.1:0".parse().expect("addr")),
    );
    assert_eq!(code, ReplyCode::Succeeded);
    let (code, _) = read_reply(&mut control).expect("second reply");
    assert_eq!(code, ReplyCode::TtlExpired, "{mode}: nobody connected");
    assert!(closed_without_data(&mut control));

    let (mut control, code, _) = request(
        server.addr,
        Command::Bind,
        &TargetAddr::Ip("127.0.0.9:0".parse().expect("addr")),
    );
    assert_eq!(code, ReplyCode::NotAllowed, "{mode}: denied peer");
    assert!(closed_without_data(&mut control));
}

/// BIND and UDP ASSOCIATE in every mode: 07 where the mode does not serve them, else a
/// success reply (the commands themselves are tested above).
fn bind_and_udp_associate_are_served_or_answered_0x07(mode: Mode) {
    // A short grace: the BIND session left waiting for its peer need not be waited for.
    let config = Config {
        grace: Duration::from_millis(100),
        ..Config::default()
    };
    let server = TestServer::start(mode, config);
    for command in [Command::Bind, Command::UdpAssociate] {
        let (mut stream, code, _) = request(
            server.addr,
            command,
            &TargetAddr::Ip("127.0.0.1:0".parse().expect("addr")),
        );
        if mode.supports_bind_and_udp() {
            assert_eq!(code, ReplyCode::Succeeded, "{mode}: {command:?}");
        } else {
            assert_eq!(code, ReplyCode::CommandNotSupported, "{mode}: {command:?}");
            assert!(closed_without_data(&mut stream));
        }
    }
}

per_mode!(bind_and_udp_associate_are_served_or_answered_0x07);

per_mode!(only [Async]:
    udp_associate_relays_ipv4_ipv6_and_names,
    udp_strangers_and_denied_destinations_are_dropped_and_teardown_follows_the_control_connection,
    bind_accepts_the_expected_peer_and_relays_both_ways,
    bind_times_out_with_0x06_and_refuses_denied_peers_with_0x02,
);
