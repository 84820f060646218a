//! `--metrics ADDR`: the server's counters in the Prometheus text format at
//! `http://ADDR/metrics`, served by a small responder on a thread of its own (never on the
//! SOCKS port). The counters are process-wide atomics, touched when a session starts and ends
//! and when a connection is refused, never per byte; with `--workers`, the supervisor asks each
//! worker for its text and sums the series.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::socks5::ReplyCode;

/// Whether sessions are counted (`--metrics` given); off, sessions skip the counting.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// How long a scraper has to send its request head, and how long it may be.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);
const MAX_REQUEST_HEAD: usize = 8 << 10;

/// Upper bounds (seconds) of the handshake-duration histogram's buckets.
const HANDSHAKE_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10.0,
];

/// Why a connection was closed before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `--allow-client` does not list it (or the client its balancer named).
    ClientNotAllowed,
    /// `--max-sessions` reached.
    MaxSessions,
    /// Out of descriptors, memory or threads.
    Exhausted,
    /// Past what the mode can watch (select's FD_SETSIZE, a full io_uring table).
    ModeLimit,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::ClientNotAllowed,
        Refusal::MaxSessions,
        Refusal::Exhausted,
        Refusal::ModeLimit,
    ];

    fn label(self) -> &'static str {
        match self {
            Refusal::ClientNotAllowed => "client_not_allowed",
            Refusal::MaxSessions => "max_sessions",
            Refusal::Exhausted => "resources_exhausted",
            Refusal::ModeLimit => "mode_limit",
        }
    }
}

/// Reply labels: the nine codes, and "none" for a session that got no reply.
const REPLIES: usize = 10;

struct Counters {
    active: AtomicI64,
    started: AtomicU64,
    ended: [AtomicU64; REPLIES],
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    handshake_buckets: [AtomicU64; HANDSHAKE_BUCKETS.len()],
    handshake_count: AtomicU64,
    handshake_sum_ns: AtomicU64,
    refused: [AtomicU64; 4],
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);

static COUNTERS: Counters = Counters {
    active: AtomicI64::new(0),
    started: AtomicU64::new(0),
    ended: [ZERO; REPLIES],
    bytes_up: AtomicU64::new(0),
    bytes_down: AtomicU64::new(0),
    handshake_buckets: [ZERO; HANDSHAKE_BUCKETS.len()],
    handshake_count: AtomicU64::new(0),
    handshake_sum_ns: AtomicU64::new(0),
    refused: [ZERO; 4],
};

/// Turns session counting on (for `--metrics`, before serving).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether sessions are counted.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A connection was closed before its handshake, for `why`.
pub fn refused(why: Refusal) {
    COUNTERS.refused[why as usize].fetch_add(1, Ordering::Relaxed);
}

/// A session started.
pub fn session_started() {
    COUNTERS.started.fetch_add(1, Ordering::Relaxed);
    COUNTERS.active.fetch_add(1, Ordering::Relaxed);
}

/// The handshake was answered `elapsed` after accept.
pub fn handshake_answered(elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    for (bound, bucket) in HANDSHAKE_BUCKETS.iter().zip(&COUNTERS.handshake_buckets) {
        if seconds <= *bound {
            bucket.fetch_add(1, Ordering::Relaxed);
        }
    }
    COUNTERS.handshake_count.fetch_add(1, Ordering::Relaxed);
    COUNTERS.handshake_sum_ns.fetch_add(
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// A session ended with `reply` sent (or none), having moved `up` bytes client → target and
/// `down` back.
pub fn session_ended(reply: Option<ReplyCode>, up: u64, down: u64) {
    let index = reply.map_or(REPLIES - 1, |code| usize::from(code.as_u8()));
    COUNTERS.ended[index.min(REPLIES - 1)].fetch_add(1, Ordering::Relaxed);
    COUNTERS.active.fetch_sub(1, Ordering::Relaxed);
    COUNTERS.bytes_up.fetch_add(up, Ordering::Relaxed);
    COUNTERS.bytes_down.fetch_add(down, Ordering::Relaxed);
}

fn reply_label(index: usize) -> String {
    if index == REPLIES - 1 {
        "none".to_owned()
    } else {
        format!("0x{index:02x}")
    }
}

/// This process's metrics in the Prometheus text exposition format (version 0.0.4).
pub fn render() -> String {
    let c = &COUNTERS;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    family(
        &mut out,
        "socks5_sessions_active",
        "gauge",
        "Sessions open now.",
    );
    let _ = writeln!(
        out,
        "socks5_sessions_active {}",
        c.active.load(Ordering::Relaxed).max(0)
    );
    family(
        &mut out,
        "socks5_sessions_started_total",
        "counter",
        "Sessions admitted (connections past the client rules and limits).",
    );
    let _ = writeln!(out, "socks5_sessions_started_total {}", load(&c.started));
    family(
        &mut out,
        "socks5_sessions_total",
        "counter",
        "Sessions ended, by the SOCKS5 reply code they were sent (none: no reply, e.g. a failed password or a client that left).",
    );
    for (index, ended) in c.ended.iter().enumerate() {
        let _ = writeln!(
            out,
            "socks5_sessions_total{{reply=\"{}\"}} {}",
            reply_label(index),
            load(ended)
        );
    }
    family(
        &mut out,
        "socks5_bytes_total",
        "counter",
        "Bytes relayed by ended sessions: up is client to target, down target to client.",
    );
    let _ = writeln!(
        out,
        "socks5_bytes_total{{direction=\"up\"}} {}",
        load(&c.bytes_up)
    );
    let _ = writeln!(
        out,
        "socks5_bytes_total{{direction=\"down\"}} {}",
        load(&c.bytes_down)
    );
    family(
        &mut out,
        "socks5_handshake_duration_seconds",
        "histogram",
        "From accept to the reply to the request (success or failure).",
    );
    for (bound, bucket) in HANDSHAKE_BUCKETS.iter().zip(&c.handshake_buckets) {
        let _ = writeln!(
            out,
            "socks5_handshake_duration_seconds_bucket{{le=\"{bound}\"}} {}",
            load(bucket)
        );
    }
    let count = load(&c.handshake_count);
    let _ = writeln!(
        out,
        "socks5_handshake_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let _ = writeln!(
        out,
        "socks5_handshake_duration_seconds_sum {}",
        load(&c.handshake_sum_ns) as f64 / 1e9
    );
    let _ = writeln!(out, "socks5_handshake_duration_seconds_count {count}");
    family(
        &mut out,
        "socks5_connections_refused_total",
        "counter",
        "Connections closed before their handshake, by cause.",
    );
    for why in Refusal::ALL {
        let _ = writeln!(
            out,
            "socks5_connections_refused_total{{cause=\"{}\"}} {}",
            why.label(),
            load(&c.refused[why as usize])
        );
    }
    let (open, limit) = descriptors();
    family(
        &mut out,
        "process_open_fds",
        "gauge",
        "Open file descriptors.",
    );
    let _ = writeln!(out, "process_open_fds {open}");
    family(
        &mut out,
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors (RLIMIT_NOFILE).",
    );
    let _ = writeln!(out, "process_max_fds {limit}");
    out
}

/// A metric family's HELP and TYPE lines.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Descriptors open now, and the limit.
fn descriptors() -> (u64, u64) {
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count() as u64);
    (open, crate::net::limits::nofile_limit())
}

/// Sums the sample lines of several expositions of the same families (one per worker): the
/// HELP and TYPE lines of the first, each series' values added.
pub fn sum(texts: &[String]) -> String {
    let mut order: Vec<String> = Vec::new();
    let mut values: std::collections::HashMap<String, f64> = std::collections::HashMap::new();
    for text in texts {
        for line in text.lines() {
            if line.starts_with('#') {
                if !order.iter().any(|l| l == line) {
                    order.push(line.to_owned());
                }
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            match values.get_mut(series) {
                Some(total) => *total += value,
                None => {
                    values.insert(series.to_owned(), value);
                    order.push(series.to_owned());
                }
            }
        }
    }
    let mut out = String::new();
    for line in order {
        match values.get(&line) {
            Some(value) => {
                let _ = writeln!(out, "{line} {value}");
            }
            None => {
                let _ = writeln!(out, "{line}");
            }
        }
    }
    out
}

/// Serves `GET /metrics` on `listener` until the process exits, with `render` making the
/// body of each response. One request at a time, each with a short read timeout: a scraper
/// is one client, and a slow one cannot hold the server for long.
pub fn serve(
    listener: TcpListener,
    render: impl Fn() -> String + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("proxy-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else {
                    // Out of descriptors, most likely: the connection stays queued, so do not
                    // spin on it.
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                if let Err(err) = respond(stream, &render) {
                    tracing::debug!("metrics request: {err}");
                }
            }
        })?;
    Ok(())
}

/// Gets a worker's metrics from its loopback responder (a plain HTTP/1.0 GET).
pub fn fetch(addr: SocketAddr) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.take(16 << 20).read_to_string(&mut response)?;
    let Some((head, body)) = response.split_once("\r\n\r\n") else {
        return Err(io::Error::other("no HTTP response"));
    };
    if !head.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!("worker answered {head}")));
    }
    Ok(body.to_owned())
}

/// Binds the metrics address (refusing the SOCKS port's own address).
pub fn bind(addr: SocketAddr, socks: SocketAddr) -> io::Result<TcpListener> {
    if addr == socks {
        return Err(io::Error::other(
            "--metrics must not be the SOCKS listening address",
        ));
    }
    TcpListener::bind(addr)
}

fn respond(stream: TcpStream, render: &impl Fn() -> String) -> io::Result<()> {
    // The request head, read whole within one deadline and a size bound: a client that
    // trickles bytes or never ends its head is dropped, not waited for.
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || head.len() > MAX_REQUEST_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head too slow or too long",
            ));
        }
        stream.set_read_timeout(Some(left))?;
        let n = (&stream).read(&mut chunk)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    stream.set_write_timeout(Some(REQUEST_DEADLINE))?;
    let head = String::from_utf8_lossy(&head);
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    };
    let mut writer = &stream;
    write!(
        writer,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_add_series_and_keep_one_header() {
        let a = "# HELP x X.\n# TYPE x counter\nx{a=\"1\"} 2\nx{a=\"2\"} 1\n".to_owned();
        let b = "# HELP x X.\n# TYPE x counter\nx{a=\"1\"} 3\nx{a=\"2\"} 0.5\n".to_owned();
        assert_eq!(
            sum(&[a, b]),
            "# HELP x X.\n# TYPE x counter\nx{a=\"1\"} 5\nx{a=\"2\"} 1.5\n"
        );
    }
}
