//! `--access-log PATH` (`-` for stderr): one JSON object per line when a session ends — who,
//! which user, what was asked and what was connected, the reply, the bytes each way, how long,
//! and why it ended. Never a password. The same trail feeds `--metrics` when it ends. With
//! both off, a session has no trail.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use crate::metrics;
use crate::socks5::{Command, Failure, Handshake, HandshakeError, ReplyCode, Request, TargetAddr};

/// Where the access log goes.
pub struct AccessLog {
    out: Mutex<Box<dyn Write + Send>>,
    /// The file, or `None` for stderr.
    path: Option<PathBuf>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("path", &self.path)
            .finish()
    }
}

impl AccessLog {
    /// Opens `path` for appending (created with mode 0640), or stderr for `-`. Opened again on
    /// every reload, so a rotated file is let go.
    pub fn open(path: &Path) -> io::Result<AccessLog> {
        if path == Path::new("-") {
            return Ok(AccessLog {
                out: Mutex::new(Box::new(io::stderr())),
                path: None,
            });
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(path)?;
        Ok(AccessLog {
            out: Mutex::new(Box::new(io::LineWriter::new(file))),
            path: Some(path.to_owned()),
        })
    }

    /// An access log into `out` (tests).
    pub fn to_writer(out: Box<dyn Write + Send>) -> AccessLog {
        AccessLog {
            out: Mutex::new(out),
            path: None,
        }
    }

    fn write_line(&self, line: &str) {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // One write per line, so lines from many threads never interleave.
        let mut buffer = Vec::with_capacity(line.len() + 1);
        buffer.extend_from_slice(line.as_bytes());
        buffer.push(b'\n');
        if let Err(err) = out.write_all(&buffer).and_then(|()| out.flush()) {
            drop(out);
            tracing::warn!("cannot write the access log: {err}");
        }
    }
}

/// What the access log will say of one session, filled in as it goes.
#[derive(Debug)]
pub struct Trail {
    started: Instant,
    started_at: SystemTime,
    client: SocketAddr,
    user: Option<String>,
    command: Option<Command>,
    target: Option<TargetAddr>,
    connected: Option<SocketAddr>,
    reply: Option<ReplyCode>,
    /// Bytes counted here by modes that have no counter of their own (client → target,
    /// target → client).
    counted: (u64, u64),
    /// The reply's delay was counted (`--metrics`).
    answered: bool,
    /// Why it ended, when that was known before it closed (a failure reply, a handshake
    /// error): it wins over what the closing code says.
    end: Option<String>,
}

/// A session's trail: nothing when the access log is off.
#[derive(Debug, Default)]
pub struct SessionTrail(Option<Box<Trail>>);

impl SessionTrail {
    /// Whether sessions need a trail: the access log or the metrics are on.
    pub fn wanted(log: Option<&AccessLog>) -> bool {
        log.is_some() || metrics::enabled()
    }

    /// Starts the trail of a session from `client`, if the access log (`log`) or the metrics
    /// are on.
    pub fn begin(log: Option<&AccessLog>, client: SocketAddr) -> Self {
        if !Self::wanted(log) {
            return SessionTrail(None);
        }
        if metrics::enabled() {
            metrics::session_started();
        }
        SessionTrail(Some({
            Box::new(Trail {
                started: Instant::now(),
                started_at: SystemTime::now(),
                client,
                user: None,
                command: None,
                target: None,
                connected: None,
                reply: None,
                counted: (0, 0),
                answered: false,
                end: None,
            })
        }))
    }

    /// The client asked for `request` (behind a balancer, the client is the one it named).
    pub fn requested(&mut self, request: &Request) {
        if let Some(trail) = &mut self.0 {
            trail.user.clone_from(&request.user);
            trail.command = Some(request.command);
            trail.target = Some(request.target.clone());
            if let Some(client) = request.client {
                trail.client = client;
            }
        }
    }

    /// The request succeeded: the proxy connected to `connected` (CONNECT, BIND: the peer;
    /// UDP ASSOCIATE: none).
    pub fn granted(&mut self, connected: Option<SocketAddr>) {
        self.replied(ReplyCode::Succeeded);
        self.connected_to(connected);
    }

    /// The proxy connected to `connected` (the reply may follow later).
    pub fn connected_to(&mut self, connected: Option<SocketAddr>) {
        if let Some(trail) = &mut self.0 {
            if connected.is_some() {
                trail.connected = connected;
            }
        }
    }

    /// `n` more bytes moved client → target (`up`) or target → client.
    pub fn count(&mut self, up: bool, n: u64) {
        if let Some(trail) = &mut self.0 {
            if up {
                trail.counted.0 += n;
            } else {
                trail.counted.1 += n;
            }
        }
    }

    /// The request was answered with `reply`.
    pub fn replied(&mut self, reply: ReplyCode) {
        if let Some(trail) = &mut self.0 {
            trail.reply = Some(reply);
            if !trail.answered && metrics::enabled() {
                trail.answered = true;
                metrics::handshake_answered(trail.started.elapsed());
            }
        }
    }

    /// The request failed with `failure` (its reply is noted, and it is why the session ends).
    pub fn failed(&mut self, failure: Failure) {
        self.replied(failure.reply_code());
        self.ended_because(&failure);
    }

    /// The handshake ended with `err` (the reply it sent, if any, is noted, and the user who
    /// had authenticated, if one had).
    pub fn handshake_failed(&mut self, handshake: &Handshake, err: &HandshakeError) {
        if let HandshakeError::Request(failure) = err {
            self.replied(failure.reply_code());
        }
        if let Some(trail) = &mut self.0 {
            if trail.user.is_none() {
                trail.user = handshake.user().map(str::to_owned);
            }
        }
        self.ended_because(err);
    }

    /// Notes why the session is about to end (the first reason given is kept).
    pub fn ended_because(&mut self, reason: &dyn std::fmt::Display) {
        if let Some(trail) = &mut self.0 {
            if trail.end.is_none() {
                trail.end = Some(reason.to_string());
            }
        }
    }

    /// Writes the session's line: `up` bytes went client → target, `down` target → client,
    /// and it ended because of `end`.
    pub fn finish(self, log: Option<&AccessLog>, up: u64, down: u64, end: &dyn std::fmt::Display) {
        let Some(trail) = self.0 else {
            return;
        };
        let (up, down) = (up + trail.counted.0, down + trail.counted.1);
        if metrics::enabled() {
            metrics::session_ended(trail.reply, up, down);
        }
        let Some(log) = log else {
            return;
        };
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_micros(trail.started_at).to_string(),
            "client": trail.client.to_string(),
            "user": trail.user,
            "command": trail.command.map(command_name),
            "target": trail.target.as_ref().map(ToString::to_string),
            "connected": trail.connected.map(|a| a.to_string()),
            "reply": trail.reply.map(ReplyCode::as_u8),
            "bytes_up": up,
            "bytes_down": down,
            "duration_s": trail.started.elapsed().as_secs_f64(),
            "end": trail.end.unwrap_or_else(|| end.to_string()),
        });
        log.write_line(&line.to_string());
    }
}

fn command_name(command: Command) -> String {
    match command {
        Command::Connect => "connect".into(),
        Command::Bind => "bind".into(),
        Command::UdpAssociate => "udp-associate".into(),
        Command::Unknown(byte) => format!("unknown-{byte:#04x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_session_is_one_json_line_without_secrets() {
        let sink = Shared::default();
        let log = AccessLog::to_writer(Box::new(sink.clone()));
        let client: SocketAddr = "192.0.2.7:5555".parse().expect("addr");
        let mut trail = SessionTrail::begin(Some(&log), client);
        trail.requested(&Request {
            command: Command::Connect,
            target: TargetAddr::Domain("example.com".into(), 443),
            user: Some("alice".into()),
            client: None,
        });
        trail.granted(Some("93.184.216.34:443".parse().expect("addr")));
        trail.finish(Some(&log), 10, 2000, &"closed");
        let text = String::from_utf8(sink.0.lock().expect("lock").clone()).expect("utf8");
        assert_eq!(text.lines().count(), 1);
        let line: serde_json::Value = serde_json::from_str(text.trim()).expect("JSON");
        assert_eq!(line["client"], "192.0.2.7:5555");
        assert_eq!(line["user"], "alice");
        assert_eq!(line["command"], "connect");
        assert_eq!(line["target"], "example.com:443");
        assert_eq!(line["connected"], "93.184.216.34:443");
        assert_eq!(line["reply"], 0);
        assert_eq!(line["bytes_up"], 10);
        assert_eq!(line["bytes_down"], 2000);
        assert_eq!(line["end"], "closed");
        assert!(line["time"].as_str().expect("time").ends_with('Z'));
    }

    #[test]
    fn off_it_keeps_nothing() {
        let mut trail = SessionTrail::begin(None, "127.0.0.1:1".parse().expect("addr"));
        trail.replied(ReplyCode::NotAllowed);
        assert!(trail.0.is_none());
        trail.finish(None, 0, 0, &"closed");
    }
}
