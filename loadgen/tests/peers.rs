//! The other servers (scripts/peers.sh) measured by the same loadgen as our modes, and drawn
//! apart from them by `loadgen plot`. A peer that is not installed is skipped with a line,
//! except under CI (`CI` set), whose `.ci/run` installs them all: there a missing one fails.
#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

#[path = "../../proxy/tests/common/procfs.rs"]
mod procfs;

use procfs::alive;

const PEERS: [&str; 3] = ["fast-socks5", "microsocks", "dante"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn peers_sh(args: &[&str]) -> std::process::Output {
    Command::new(repo().join("scripts/peers.sh"))
        .args(args)
        .output()
        .expect("run scripts/peers.sh")
}

/// The installed peers; under CI every peer must be installed.
fn installed() -> Vec<String> {
    let output = peers_sh(&["list"]);
    assert!(output.status.success(), "peers.sh list failed");
    let listed: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let missing: Vec<&str> = PEERS
        .into_iter()
        .filter(|peer| !listed.iter().any(|l| l == peer))
        .collect();
    if !missing.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs every peer (scripts/peers.sh install), but {missing:?} are missing"
        );
        eprintln!("skipping peers not installed here: {missing:?} (scripts/peers.sh install)");
    }
    listed
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loadgen-peers-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A small run (20 sessions) of `duration` recorded under `results`.
/// Builds the proxy binary beside loadgen if `cargo test -p loadgen` alone did not.
fn ensure_proxy_built() {
    let loadgen = Path::new(env!("CARGO_BIN_EXE_loadgen"));
    if !loadgen.with_file_name("proxy").is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "proxy", "--bin", "proxy"])
            .status()
            .expect("run cargo");
        assert!(status.success(), "cannot build the proxy binary");
    }
}

fn loadgen(results: &Path, duration: &str, args: &[&str]) -> std::process::Output {
    ensure_proxy_built();
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "--duration",
            duration,
            "--warmup",
            "200ms",
            "--idle-hold",
            "200ms",
        ])
        .args([
            "--conns",
            "20",
            "--quiet",
            "--tag",
            "peers-test",
            "--results",
        ])
        .arg(results)
        .args(args)
        .output()
        .expect("run loadgen")
}

fn records(results: &Path) -> Vec<Value> {
    std::fs::read_dir(results.join("runs"))
        .expect("runs")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).expect("read")).expect("JSON"))
        .collect()
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .trim()
        .to_owned()
}

#[test]
fn peers_are_measured_like_our_modes_and_plotted_apart() {
    let peers = installed();
    let results = temp_dir("results");
    let started = temp_dir("started");
    for peer in &peers {
        for rate in [None, Some("400")] {
            let start = peers_sh(&["start", peer, started.to_str().expect("utf-8")]);
            assert!(
                start.status.success(),
                "{peer} did not start: {}",
                String::from_utf8_lossy(&start.stderr)
            );
            let pid: u32 = read(&started, &format!("{peer}.pid")).parse().expect("pid");
            let addr = read(&started, &format!("{peer}.addr"));
            assert!(addr.starts_with("127.0.0.1:"), "loopback only: {addr}");
            let version = read(&started, &format!("{peer}.version"));
            let command = read(&started, &format!("{peer}.command"));
            let mut args = vec![
                "--proxy",
                &addr,
                "--label",
                peer,
                "--proxy-version",
                &version,
                "--proxy-started-with",
                &command,
            ];
            let pid_text = pid.to_string();
            args.extend(["--proxy-pid", &pid_text]);
            if let Some(rate) = rate {
                args.extend(["--rate", rate]);
            }
            let output = loadgen(&results, "1s", &args);
            let stop = peers_sh(&["stop", peer, started.to_str().expect("utf-8")]);
            assert!(stop.status.success());
            assert!(!alive(pid), "{peer} (pid {pid}) still runs after stop");
            assert!(
                output.status.success(),
                "{peer}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    // Our mode, in the same sweep, for the comparison.
    for rate in [None, Some("400")] {
        let mut args = vec!["--mode", "epoll"];
        if let Some(rate) = rate {
            args.extend(["--rate", rate]);
        }
        let output = loadgen(&results, "1s", &args);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let records = records(&results);
    assert_eq!(records.len(), 2 * peers.len() + 2);
    for record in records.iter().filter(|r| r["config"]["mode"] == "external") {
        let label = record["config"]["label"].as_str().expect("label");
        assert_eq!(record["outcome"], "ok", "{label}");
        assert_eq!(record["sessions"]["established"], 20, "{label}");
        let external = &record["config"]["external"];
        assert!(
            external["version"]
                .as_str()
                .is_some_and(|v| v.contains(label)),
            "{label}: {external}"
        );
        assert!(external["started_with"]
            .as_str()
            .is_some_and(|c| c.contains("ulimit -n")));
        // Its process tree was measured.
        assert!(
            record["proxy"]["rss_idle"].as_u64().is_some_and(|r| r > 0),
            "{label}"
        );
        assert!(
            record["proxy"]["processes"]
                .as_u64()
                .is_some_and(|n| n >= 1),
            "{label}"
        );
    }

    let plot = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["plot", "--tag", "peers-test", "--results"])
        .arg(&results)
        .output()
        .expect("run loadgen plot");
    assert!(
        plot.status.success(),
        "{}",
        String::from_utf8_lossy(&plot.stderr)
    );
    let readme = std::fs::read_to_string(results.join("README.md")).expect("README");
    assert!(results.join("charts/8-at-top.png").is_file());
    assert!(results.join("charts/8-at-top.svg").is_file());
    for peer in &peers {
        assert!(
            readme.contains(&format!("| {peer} (other server) |")),
            "{peer} is in the table as another server"
        );
        let svg = std::fs::read_to_string(results.join("charts/2-throughput.svg")).expect("svg");
        assert!(
            svg.contains(&format!("{peer} (other server)")),
            "{peer} in the legend"
        );
    }
    if !peers.is_empty() {
        assert!(readme.contains("Our best mode against each other server"));
    }
    let _ = std::fs::remove_dir_all(&results);
    let _ = std::fs::remove_dir_all(&started);
}

#[test]
fn an_external_server_that_dies_mid_run_fails_the_run() {
    let peers = installed();
    if !peers.iter().any(|p| p == "microsocks") {
        return;
    }
    let results = temp_dir("dies");
    let started = temp_dir("dies-started");
    let start = peers_sh(&["start", "microsocks", started.to_str().expect("utf-8")]);
    assert!(start.status.success());
    let pid: u32 = read(&started, "microsocks.pid").parse().expect("pid");
    let addr = read(&started, "microsocks.addr");
    let pid_text = pid.to_string();
    ensure_proxy_built();
    let killer = std::thread::spawn(move || {
        // During the 3 s window (after 20 sessions ramp and a 200 ms hold and warm-up).
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let _ = Command::new("kill").args(["-KILL", &pid_text]).status();
    });
    let output = loadgen(
        &results,
        "3s",
        &[
            "--proxy",
            &addr,
            "--proxy-pid",
            &pid.to_string(),
            "--label",
            "microsocks",
        ],
    );
    killer.join().expect("killer");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let records = records(&results);
    assert_eq!(records.len(), 1);
    // Sessions broke with it too, but the record names the cause: the server is gone.
    let outcome = records[0]["outcome"].to_string();
    assert!(outcome.contains("is gone"), "{outcome}");
    let _ = peers_sh(&["stop", "microsocks", started.to_str().expect("utf-8")]);
    let _ = std::fs::remove_dir_all(&results);
    let _ = std::fs::remove_dir_all(&started);
}
