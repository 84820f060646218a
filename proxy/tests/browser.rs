//! A real browser through the proxy: headless Chromium, `--proxy-server=socks5://…`, loading a
//! page by name so that the name travels to the proxy (remote DNS, like `socks5h`). Everything
//! runs in a network namespace of its own with nothing but loopback, so the browser's
//! background requests cannot leave the machine. Skipped, saying why, without root, `ip` or
//! Chromium (Debian package `chromium`).

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::proxy_binary;

/// A network namespace, deleted on drop.
struct Namespace(String);

impl Namespace {
    fn create() -> Option<Namespace> {
        let name = format!("pxbrowser{}", std::process::id());
        let made = Command::new("ip")
            .args(["netns", "add", &name])
            .stderr(Stdio::null())
            .status()
            .ok()?
            .success();
        if !made {
            return None;
        }
        let namespace = Namespace(name);
        let up = namespace
            .command("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .ok()?
            .success();
        up.then_some(namespace)
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.0, program]);
        command
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `command` to its end or kills it after `limit`; returns its stdout.
fn run_bounded(mut command: Command, limit: Duration) -> String {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.wait();
    reader.join().expect("reader")
}

#[test]
fn headless_chromium_loads_a_page_by_name_through_the_proxy() {
    let Some(chromium) = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|name| Command::new(name).arg("--version").output().is_ok())
    else {
        eprintln!("skipped: Chromium is not installed (Debian package chromium)");
        return;
    };
    let Some(namespace) = Namespace::create() else {
        eprintln!("skipped: cannot create a network namespace here (needs root and ip)");
        return;
    };
    // The page is the proxy's own metrics endpoint: an HTTP server on loopback that needs no
    // other program, and whose body shows the browser's own session.
    let mut proxy = namespace
        .command(proxy_binary())
        .args([
            "--listen",
            "127.0.0.1:1080",
            "--mode",
            "async",
            "--metrics",
            "127.0.0.1:9464",
            "--access-log",
            "-",
            "--log-level",
            "error",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the proxy");
    let mut ready = String::new();
    let mut stdout = proxy.stdout.take().expect("stdout");
    let mut byte = [0u8; 1];
    while !ready.ends_with('\n') && stdout.read(&mut byte).unwrap_or(0) == 1 {
        ready.push(char::from(byte[0]));
    }
    assert!(ready.starts_with("listening on"), "{ready:?}");

    let profile = std::env::temp_dir().join(format!("proxy-chromium-{}", std::process::id()));
    let mut browser = namespace.command(chromium);
    browser
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--proxy-server=socks5://127.0.0.1:1080",
            // Loopback is not proxied by default; the page must go through the proxy.
            "--proxy-bypass-list=<-loopback>",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(["--dump-dom", "http://localhost:9464/metrics"]);
    let page = run_bounded(browser, Duration::from_secs(90));
    let _ = std::fs::remove_dir_all(&profile);

    let _ = proxy.kill();
    let mut log = String::new();
    let _ = proxy
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut log);
    let _ = proxy.wait();
    assert!(
        page.contains("socks5_sessions_active"),
        "the page did not arrive: {page:?}\naccess log:\n{log}"
    );
    // The browser sent the name, and the proxy resolved it (remote DNS).
    let line = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|line| line["target"] == "localhost:9464")
        .unwrap_or_else(|| panic!("no session to localhost:9464 in the access log:\n{log}"));
    assert_eq!(line["reply"], 0, "{line}");
    assert!(line["connected"]
        .as_str()
        .is_some_and(|addr| addr.starts_with("127.0.0.1:") || addr.starts_with("[::1]:")));
}
