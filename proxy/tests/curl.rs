//! Interoperability with a real SOCKS5 client: curl, against every mode.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::process::Command;

use common::*;
use proxy::Config;
use proxy::Mode;

const BODY: &str = "hello from the loopback web server\n";

/// A minimal HTTP/1.1 server answering every request with [`BODY`].
fn web_server(bind: &str) -> Target {
    Target::spawn(bind, |mut stream| {
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
            BODY.len()
        );
        let _ = stream.write_all(response.as_bytes());
    })
}

/// Runs curl through the proxy; returns (exit code, body).
fn curl(proxy_flag: &str, proxy: &str, url: &str, user: Option<&str>) -> (Option<i32>, String) {
    let mut command = Command::new("curl");
    command.args([
        "--silent",
        "--max-time",
        "20",
        "--noproxy",
        "",
        proxy_flag,
        proxy,
        url,
    ]);
    if let Some(user) = user {
        command.args(["--proxy-user", user]);
    }
    let output = command
        .output()
        .expect("curl must be installed (.ci/run installs it)");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn curl_fetches_through_every_mode(mode: Mode) {
    let v4 = web_server("127.0.0.1:0");
    let v6 = web_server("[::1]:0");
    let urls = [
        format!("http://127.0.0.1:{}/", v4.addr.port()),
        format!("http://[::1]:{}/", v6.addr.port()),
        format!("http://localhost:{}/", v4.addr.port()),
    ];
    let server = TestServer::start(mode, Config::default());
    let proxy = server.addr.to_string();
    for flag in ["--socks5", "--socks5-hostname"] {
        for url in &urls {
            let (code, body) = curl(flag, &proxy, url, None);
            assert_eq!(code, Some(0), "{mode} {flag} {url}");
            assert_eq!(body, BODY, "{mode} {flag} {url}");
        }
    }
}

fn curl_authenticates_with_proxy_user(mode: Mode) {
    let web = web_server("127.0.0.1:0");
    let url = format!("http://localhost:{}/", web.addr.port());
    let server = TestServer::start(mode, with_users(&[("alice", "s3cret")]));
    let proxy = server.addr.to_string();
    for flag in ["--socks5", "--socks5-hostname"] {
        let (code, body) = curl(flag, &proxy, &url, Some("alice:s3cret"));
        assert_eq!((code, body.as_str()), (Some(0), BODY), "{mode} {flag}");
        let (code, body) = curl(flag, &proxy, &url, Some("alice:wrong"));
        assert_ne!(code, Some(0), "{mode} {flag}: wrong password accepted");
        assert!(body.is_empty());
        let (code, _) = curl(flag, &proxy, &url, None);
        assert_ne!(code, Some(0), "{mode} {flag}: no credentials accepted");
    }
}

per_mode!(
    curl_fetches_through_every_mode,
    curl_authenticates_with_proxy_user,
);
