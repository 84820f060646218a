//! `loadgen plot` draws one sweep: a stray record never enters its medians, records that cannot
//! share a median are refused, and `--check` catches results that drifted from their records.
#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loadgen-plot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn loadgen(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .arg("--results")
        .arg(dir)
        .output()
        .expect("run loadgen")
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("runs"))
        .expect("runs")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("JSON")
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(value).expect("JSON")).expect("write");
}

/// A finished sweep "fixture" of two direct runs at 4 sessions, as scripts/c10k.sh leaves it.
fn fixture_sweep(name: &str) -> PathBuf {
    let dir = temp_dir(name);
    for _ in 0..2 {
        let output = loadgen(
            &[
                "--mode",
                "direct",
                "--conns",
                "4",
                "--duration",
                "300ms",
                "--warmup",
                "100ms",
                "--idle-hold",
                "100ms",
                "--quiet",
                "--tag",
                "fixture",
            ],
            &dir,
        );
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    std::fs::create_dir_all(dir.join("sweeps")).expect("sweeps");
    std::fs::write(
        dir.join("sweeps/fixture.json"),
        r#"{"tag": "fixture", "revision": "x", "runs": 2, "failures": 0,
            "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:01:00Z",
            "command": "test"}"#,
    )
    .expect("manifest");
    dir
}

/// The msgs/s cell of the direct row in the generated README.
fn direct_throughput(readme: &str) -> String {
    let row = readme
        .lines()
        .find(|line| line.starts_with("| direct (no proxy) |"))
        .unwrap_or_else(|| panic!("no direct row in\n{readme}"));
    row.split('|')
        .nth(3)
        .expect("msgs/s cell")
        .trim()
        .to_owned()
}

#[test]
fn a_stray_record_never_enters_the_sweeps_medians() {
    let dir = fixture_sweep("stray");
    let records = json_files(&dir);
    assert_eq!(records.len(), 2);
    let rates: Vec<f64> = records
        .iter()
        .map(|p| {
            read_json(p)["messages"]["per_second"]
                .as_f64()
                .expect("rate")
        })
        .collect();
    let median = (rates[0] + rates[1]) / 2.0;

    let output = loadgen(&["plot"], &dir);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let before = std::fs::read(dir.join("README.md")).expect("README");
    let chart_before = std::fs::read(dir.join("charts/2-throughput.png")).expect("png");

    // An ad-hoc run at the same point, absurdly fast: untagged, as the README's main job is.
    let mut stray = read_json(&records[0]);
    stray["config"]["tag"] = Value::Null;
    stray["messages"]["per_second"] = Value::from(1.0e9);
    write_json(&dir.join("runs/29990101T000000Z-direct-c4.json"), &stray);

    let output = loadgen(&["plot"], &dir);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let readme = std::fs::read_to_string(dir.join("README.md")).expect("README");
    assert_eq!(
        direct_throughput(&readme),
        format!("{median:.0}"),
        "{readme}"
    );
    assert!(readme.contains("sweep `fixture`"), "{readme}");
    // The published page and charts do not move at all.
    assert_eq!(
        readme.as_bytes(),
        &before[..],
        "README changed with a stray record"
    );
    assert_eq!(
        std::fs::read(dir.join("charts/2-throughput.png")).expect("png"),
        chart_before
    );
    let svg = std::fs::read_to_string(dir.join("charts/2-throughput.svg")).expect("svg");
    assert!(
        svg.contains("sweep fixture"),
        "the chart footer names the sweep"
    );
    assert!(svg.contains("2 runs per point"));

    // What was drawn is what the records produce; a hand edit is caught.
    let check = loadgen(&["plot", "--check"], &dir);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    std::fs::write(dir.join("README.md"), readme.replace("direct", "DIRECT")).expect("edit");
    let check = loadgen(&["plot", "--check"], &dir);
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stderr).contains("README.md"));
    // A chart no record produces is caught too.
    let output = loadgen(&["plot"], &dir);
    assert!(output.status.success());
    std::fs::write(dir.join("charts/9-made-up.svg"), "<svg/>").expect("write");
    let check = loadgen(&["plot", "--check"], &dir);
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stderr).contains("9-made-up.svg"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn records_of_two_revisions_under_one_tag_are_refused() {
    let dir = fixture_sweep("revisions");
    let records = json_files(&dir);
    let mut other = read_json(&records[1]);
    other["git_revision"] = Value::from("0123456789ab");
    write_json(&records[1], &other);
    let output = loadgen(&["plot", "--tag", "fixture"], &dir);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("sweep fixture mixes revisions") && stderr.contains("0123456789ab"),
        "{stderr}"
    );
    assert!(!dir.join("README.md").exists(), "nothing drawn");

    // Other load shapes are refused alike.
    other["git_revision"] = read_json(&records[0])["git_revision"].clone();
    other["config"]["size"] = Value::from(4096);
    write_json(&records[1], &other);
    let output = loadgen(&["plot", "--tag", "fixture"], &dir);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("mixes message sizes"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_a_finished_sweep_plot_says_what_to_do() {
    let dir = temp_dir("none");
    std::fs::create_dir_all(dir.join("runs")).expect("runs");
    let output = loadgen(&["plot"], &dir);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no finished sweep") && stderr.contains("--tag"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
