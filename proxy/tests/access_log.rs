//! `--access-log`: one JSON line per session, in every mode, for a success and for each
//! failure a client can be given, with the bytes each way and never a password.

#[macro_use]
mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use proxy::config::access_log::AccessLog;
use proxy::config::parse_cidr;
use proxy::socks5::{Command, ReplyCode, TargetAddr};
use proxy::{Acl, Config, Mode};
use serde_json::Value;

/// The log's lines, shared with the server.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().expect("lock").clone()).expect("UTF-8")
    }

    /// Waits (bounded) for line `index` and returns it parsed.
    #[track_caller]
    fn line(&self, index: usize) -> Value {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(line) = self.text().lines().nth(index) {
                return serde_json::from_str(line).expect("a JSON line");
            }
            assert!(
                Instant::now() < deadline,
                "no line {index}: {}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

const PASSWORD: &str = "correct-horse-battery";

fn authenticated(proxy: std::net::SocketAddr) -> std::net::TcpStream {
    let mut stream = connect(proxy);
    negotiate(&mut stream, Some(("alice", PASSWORD))).expect("authenticates");
    stream
}

fn every_session_is_logged_once_with_its_reply_and_bytes(mode: Mode) {
    let sink = Sink::default();
    let denied_target = Target::echo("127.0.0.2:0");
    let config = Config {
        users: Some(user_db(&[("alice", PASSWORD)])),
        acl: Acl {
            deny_dests: vec![parse_cidr("127.0.0.2/32").expect("cidr")],
            ..Acl::default()
        },
        connect_timeout: Duration::from_millis(500),
        access_log: Some(Arc::new(AccessLog::to_writer(Box::new(sink.clone())))),
        ..Config::default()
    };
    let server = TestServer::start(mode, config);
    let echo = Target::echo("127.0.0.1:0");
    let mut at = 0;
    let mut next = |sink: &Sink| {
        let line = sink.line(at);
        at += 1;
        line
    };

    // A relayed session: 5 bytes up, 5 back, closed by the client.
    let mut stream = authenticated(server.addr);
    let (code, _) =
        request_on(&mut stream, Command::Connect, &TargetAddr::Ip(echo.addr)).expect("reply");
    assert_eq!(code, ReplyCode::Succeeded);
    assert_echo(&mut stream, b"hello");
    let client = stream.local_addr().expect("addr");
    drop(stream);
    let line = next(&sink);
    assert_eq!(line["client"], client.to_string(), "{mode}: {line}");
    assert_eq!(line["user"], "alice", "{mode}: {line}");
    assert_eq!(line["command"], "connect", "{mode}: {line}");
    assert_eq!(line["target"], echo.addr.to_string(), "{mode}: {line}");
    assert_eq!(line["connected"], echo.addr.to_string(), "{mode}: {line}");
    assert_eq!(line["reply"], 0, "{mode}: {line}");
    assert_eq!(line["bytes_up"], 5, "{mode}: {line}");
    assert_eq!(line["bytes_down"], 5, "{mode}: {line}");
    assert_eq!(line["end"], "closed", "{mode}: {line}");
    assert!(
        line["duration_s"].as_f64().is_some_and(|d| d >= 0.0),
        "{line}"
    );

    // Each failure reply: a denied destination (0x02), an unreachable network (0x03: the
    // broadcast address, refused by connect itself, nothing is sent), a refused port (0x05), a
    // connect that times out (0x06), an unknown command (0x07), an unknown address type (0x08).
    let (hole, _fillers) = black_hole();
    let failures: [(TargetAddr, Command, u8); 5] = [
        (TargetAddr::Ip(denied_target.addr), Command::Connect, 0x02),
        (
            TargetAddr::Ip("255.255.255.255:9".parse().expect("addr")),
            Command::Connect,
            0x03,
        ),
        (TargetAddr::Ip(closed_port()), Command::Connect, 0x05),
        (TargetAddr::Ip(hole), Command::Connect, 0x06),
        (TargetAddr::Ip(echo.addr), Command::Unknown(0x09), 0x07),
    ];
    for (target, command, reply) in failures {
        let mut stream = authenticated(server.addr);
        let (code, _) = request_on(&mut stream, command, &target).expect("reply");
        assert_eq!(code.as_u8(), reply, "{mode}: {target:?}");
        drop(stream);
        let line = next(&sink);
        assert_eq!(line["reply"], reply, "{mode}: {line}");
        assert_eq!(line["user"], "alice", "{mode}: {line}");
        // An unknown command is answered by the protocol core before there is a request.
        if reply != 0x07 {
            assert_eq!(line["target"], target.to_string(), "{mode}: {line}");
        }
        assert_eq!(line["bytes_up"], 0, "{mode}: {line}");
        assert!(line["connected"].is_null(), "{mode}: {line}");
        assert_ne!(line["end"], "closed", "{mode}: {line}");
    }
    let mut stream = authenticated(server.addr);
    stream
        .write_all(&[5, 1, 0, 0x05, 1, 2, 3, 4, 0, 80])
        .expect("write");
    let (code, _) = read_reply(&mut stream).expect("reply");
    assert_eq!(code, ReplyCode::AddressTypeNotSupported);
    drop(stream);
    let line = next(&sink);
    assert_eq!(line["reply"], 0x08, "{mode}: {line}");

    // A wrong password: no reply code (RFC 1929 answers it), the reason, and no password.
    let mut stream = connect(server.addr);
    assert!(negotiate(&mut stream, Some(("alice", "wrong-guess"))).is_err());
    drop(stream);
    let line = next(&sink);
    assert!(line["reply"].is_null(), "{mode}: {line}");
    assert_eq!(line["end"], "authentication failed", "{mode}: {line}");

    let all = sink.text();
    assert_eq!(
        all.lines().count(),
        8,
        "{mode}: one line per session: {all}"
    );
    assert!(
        !all.contains(PASSWORD) && !all.contains("wrong-guess"),
        "{all}"
    );
}

per_mode!(every_session_is_logged_once_with_its_reply_and_bytes);
