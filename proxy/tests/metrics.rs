//! `--metrics`: the Prometheus endpoint, as a scraper sees it — counts by reply, bytes,
//! refusals, sums over workers, `promtool check metrics`, and a real Prometheus server
//! scraping it (each tool skipped, saying so, where it is not installed).

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use proxy::socks5::{ReplyCode, TargetAddr};

/// The proxy binary with `--metrics 127.0.0.1:0` and `args`; returns it and where its metrics
/// are (from its log line).
fn start(args: &[&str]) -> (Logged, SocketAddr) {
    let all: Vec<&std::ffi::OsStr> = ["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"]
        .iter()
        .chain(args)
        .map(std::ffi::OsStr::new)
        .collect();
    let logged = Logged::start(&all);
    let line = logged.wait_for("metrics at http://", 1);
    let metrics = line
        .lines()
        .find_map(|line| line.split("metrics at http://").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(|addr| addr.trim_end_matches("/metrics"))
        .and_then(|addr| addr.parse().ok())
        .expect("metrics address");
    (logged, metrics)
}

/// GET /metrics: the body.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to metrics");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: proxy\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

/// The value of one series, e.g. `socks5_sessions_total{reply="0x00"}`.
fn value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
        .parse()
        .expect("a number")
}

/// Waits (bounded) until `series` reaches `at_least` (sessions are counted when they end,
/// a moment after the client closes).
fn eventually(addr: SocketAddr, series: &str, at_least: f64) -> String {
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let body = scrape(addr);
        if value(&body, series) >= at_least || Instant::now() > deadline {
            return body;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn denied_and_allowed(proxy: SocketAddr, echo: SocketAddr, denied: SocketAddr, count: usize) {
    for _ in 0..count {
        let mut stream = open_session(proxy, echo);
        assert_echo(&mut stream, b"12345");
    }
    let (_stream, code, _) = socks_connect(proxy, &TargetAddr::Ip(denied), None).expect("reply");
    assert_eq!(code, ReplyCode::NotAllowed);
}

#[test]
fn metrics_count_sessions_by_reply_bytes_and_refusals() {
    let echo = Target::echo("127.0.0.1:0");
    let denied = Target::echo("127.0.0.2:0");
    let (logged, metrics) = start(&[
        "--mode",
        "epoll",
        "--deny-dest",
        "127.0.0.2/32",
        "--allow-client",
        "127.0.0.1/32",
    ]);
    denied_and_allowed(logged.proxy.addr, echo.addr, denied.addr, 3);
    // A client the rules do not list: refused before any byte.
    let socket = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::STREAM,
        None,
    )
    .expect("socket");
    rustix::net::bind(&socket, &"127.0.0.3:0".parse::<SocketAddr>().expect("addr")).expect("bind");
    rustix::net::connect(&socket, &logged.proxy.addr).expect("connect");
    let mut unlisted = TcpStream::from(socket);
    unlisted
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("timeout");
    assert!(closed_without_data(&mut unlisted));

    let body = eventually(metrics, "socks5_sessions_total{reply=\"0x02\"}", 1.0);
    let body = if value(&body, "socks5_sessions_total{reply=\"0x00\"}") < 3.0 {
        eventually(metrics, "socks5_sessions_total{reply=\"0x00\"}", 3.0)
    } else {
        body
    };
    assert_eq!(
        value(&body, "socks5_sessions_total{reply=\"0x00\"}"),
        3.0,
        "{body}"
    );
    assert_eq!(
        value(&body, "socks5_sessions_total{reply=\"0x02\"}"),
        1.0,
        "{body}"
    );
    assert_eq!(value(&body, "socks5_sessions_started_total"), 4.0, "{body}");
    assert_eq!(
        value(&body, "socks5_bytes_total{direction=\"up\"}"),
        15.0,
        "{body}"
    );
    assert_eq!(
        value(&body, "socks5_bytes_total{direction=\"down\"}"),
        15.0,
        "{body}"
    );
    assert_eq!(
        value(&body, "socks5_handshake_duration_seconds_count"),
        4.0,
        "{body}"
    );
    assert_eq!(
        value(
            &body,
            "socks5_connections_refused_total{cause=\"client_not_allowed\"}"
        ),
        1.0,
        "{body}"
    );
    assert!(value(&body, "process_max_fds") >= value(&body, "process_open_fds"));

    // A scraper that never finishes its request, and one that sends an endless head, do not
    // keep the endpoint from answering the next.
    let mut stalled = TcpStream::connect(metrics).expect("connect");
    stalled.write_all(b"GET /metr").expect("write");
    let mut endless = TcpStream::connect(metrics).expect("connect");
    let _ = endless.write_all(&vec![b'a'; 64 << 10]);
    let after = scrape(metrics);
    assert!(after.contains("socks5_sessions_active"), "{after}");
    drop((stalled, endless));

    // Anything but GET /metrics is not served; the SOCKS port is not HTTP.
    let mut other = TcpStream::connect(metrics).expect("connect");
    other.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    let mut answer = String::new();
    other.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Err(_) => eprintln!("skipped promtool: not installed (Debian package prometheus)"),
        Ok(mut promtool) => {
            promtool
                .stdin
                .take()
                .expect("stdin")
                .write_all(body.as_bytes())
                .expect("feed promtool");
            let output = promtool.wait_with_output().expect("promtool");
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(output.status.success(), "promtool: {said}\n{body}");
            assert!(said.trim().is_empty(), "promtool: {said}");
        }
    }
}

#[test]
fn metrics_are_summed_over_workers() {
    let echo = Target::echo("127.0.0.1:0");
    let denied = Target::echo("127.0.0.2:0");
    let (logged, metrics) = start(&[
        "--mode",
        "epoll",
        "--workers",
        "2",
        "--deny-dest",
        "127.0.0.2/32",
    ]);
    denied_and_allowed(logged.proxy.addr, echo.addr, denied.addr, 8);
    let body = eventually(metrics, "socks5_sessions_total{reply=\"0x00\"}", 8.0);
    assert_eq!(
        value(&body, "socks5_sessions_total{reply=\"0x00\"}"),
        8.0,
        "{body}"
    );
    assert_eq!(
        value(&body, "socks5_bytes_total{direction=\"up\"}"),
        40.0,
        "{body}"
    );
    let body = eventually(metrics, "socks5_sessions_total{reply=\"0x02\"}", 1.0);
    assert_eq!(
        value(&body, "socks5_sessions_total{reply=\"0x02\"}"),
        1.0,
        "{body}"
    );
    // Two processes' descriptor limits.
    assert_eq!(
        value(&body, "process_max_fds"),
        2.0 * value_of_limit(),
        "{body}"
    );
    assert_eq!(
        body.matches("# TYPE socks5_sessions_total counter").count(),
        1
    );
}

fn value_of_limit() -> f64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .map_or(0.0, |hard| hard as f64)
}

/// A real Prometheus server scrapes the endpoint and can query what it counted.
#[test]
fn a_prometheus_server_scrapes_it() {
    if !installed_or_skip("prometheus", "prometheus") {
        return;
    }
    let echo = Target::echo("127.0.0.1:0");
    let (logged, metrics) = start(&["--mode", "async"]);
    for _ in 0..2 {
        let mut stream = open_session(logged.proxy.addr, echo.addr);
        assert_echo(&mut stream, b"scraped");
    }
    eventually(metrics, "socks5_sessions_total{reply=\"0x00\"}", 2.0);

    let dir = std::env::temp_dir().join(format!("proxy-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: proxy\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .expect("config");
    let web = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let mut prometheus = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let query = |q: &str| -> Option<String> {
        let mut stream = TcpStream::connect(web).ok()?;
        stream.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
        write!(
            stream,
            "GET /api/v1/query?query={q} HTTP/1.0\r\nHost: prometheus\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response.split_once("\r\n\r\n")?.1.to_owned())
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last;
    let found = loop {
        last = query("socks5_sessions_total%7Breply%3D%220x00%22%7D");
        if last
            .as_deref()
            .is_some_and(|body| body.contains("\"job\":\"proxy\"") && body.contains("\"2\"]"))
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let up = query("up").unwrap_or_default();
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        found,
        "Prometheus did not get the count: {last:?}; up: {up}"
    );
}

#[test]
fn the_metrics_address_must_not_be_the_socks_port() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = holder.local_addr().expect("addr").to_string();
    drop(holder);
    let output = Command::new(proxy_binary())
        .args(["--listen", &addr, "--metrics", &addr])
        .output()
        .expect("run proxy");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("must not be the SOCKS listening address"),
        "{stderr}"
    );
}
