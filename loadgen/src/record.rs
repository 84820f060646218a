//! One record per run: JSON with every measurement, the histograms as .hgrm text beside it,
//! and a row in results/summary.csv. Histograms are also stored serialized (HdrHistogram V2,
//! deflated, base64) so records from different runs or hosts can be merged.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Bumped when a field changes meaning or disappears.
pub const SCHEMA_VERSION: u32 = 1;

/// The machine a run happened on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    /// Host name.
    pub hostname: String,
    /// Kernel release.
    pub kernel: String,
    /// Logical CPUs.
    pub cores: usize,
    /// CPU model name.
    pub cpu_model: String,
}

impl Host {
    /// Reads the machine's description.
    pub fn current() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_else(|| "unknown".into());
        Host {
            hostname: sysinfo::System::host_name().unwrap_or_default(),
            kernel: sysinfo::System::kernel_version().unwrap_or_default(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
        }
    }
}

/// How the run was configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    /// Proxy mode, `direct`, or `external`.
    pub mode: String,
    /// Name shown in charts (the mode, or --label for an external proxy).
    pub label: String,
    /// Sessions requested.
    pub conns: usize,
    /// Proxy worker processes (0 when loadgen did not start the proxy).
    pub workers: usize,
    /// Proxy threads, if set.
    pub threads: Option<usize>,
    /// Bytes per message.
    pub size: usize,
    /// Offered messages per second (open loop), or null for closed loop.
    pub rate: Option<f64>,
    /// Measured window, seconds.
    pub duration_s: f64,
    /// Warm-up before the window, seconds.
    pub warmup_s: f64,
    /// Sessions opened per second.
    pub ramp_rate: f64,
    /// Dials in flight at most.
    pub max_dials: usize,
    /// Whether username/password was used.
    pub auth: bool,
    /// The proxy address.
    pub proxy: Option<String>,
    /// Echo target addresses.
    pub echo_addrs: Vec<String>,
    /// Source addresses sessions were spread over.
    pub source_addrs: Vec<String>,
    /// The command line.
    pub command: Vec<String>,
    /// A name grouping the runs of one sweep (`--tag`).
    #[serde(default)]
    pub tag: Option<String>,
    /// loadgen's own runtime threads.
    #[serde(default)]
    pub loadgen_threads: usize,
}

/// Percentiles of a latency histogram, microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Smallest.
    pub min: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl Percentiles {
    /// Summarises a histogram (all zeros when empty).
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: histogram.len(),
            min: histogram.min(),
            mean: histogram.mean(),
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
        }
    }
}

/// Session counts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sessions {
    /// Asked for.
    pub requested: usize,
    /// Handshake completed.
    pub established: u64,
    /// Dial failed.
    pub failed: u64,
    /// Failed dials by cause (refused, timeout, eof, reset, socks-0x01, …).
    pub failures: BTreeMap<String, u64>,
    /// Established sessions that broke during the workload, by cause.
    pub dropped: BTreeMap<String, u64>,
}

/// Message throughput in the measured window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Messages {
    /// Round trips completed in the window.
    pub count: u64,
    /// Length of the window, seconds.
    pub window_s: f64,
    /// Round trips per second.
    pub per_second: f64,
    /// Payload bytes per second, both directions counted once (a round trip moves `size`
    /// bytes each way).
    pub bytes_per_second: f64,
    /// Echoes that differed from what was sent (must be 0).
    pub corrupted: u64,
}

/// The proxy's resources (its process and every descendant).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProxyUsage {
    /// Processes measured (parent and workers).
    pub processes: usize,
    /// RSS before any session, bytes.
    pub rss_before: u64,
    /// RSS holding every established session idle, bytes.
    pub rss_idle: u64,
    /// Highest RSS sampled under load, bytes.
    pub rss_peak: u64,
    /// (rss_idle − rss_before) / established.
    pub rss_per_session_idle: f64,
    /// (rss_peak − rss_before) / established.
    pub rss_per_session_peak: f64,
    /// CPU seconds (user + system) while sessions were opened.
    pub cpu_ramp_s: f64,
    /// CPU seconds in the measured window.
    pub cpu_window_s: f64,
    /// CPU microseconds per round trip in the window.
    pub cpu_us_per_message: f64,
}

/// Kernel TCP memory (not part of any RSS), from /proc/net/sockstat.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KernelUsage {
    /// Bytes before any session.
    pub tcp_mem_before: u64,
    /// Bytes with every session idle.
    pub tcp_mem_idle: u64,
    /// Highest sampled under load.
    pub tcp_mem_peak: u64,
    /// TCP sockets in use with every session idle.
    pub tcp_sockets_idle: u64,
}

/// loadgen's own cost.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadgenUsage {
    /// CPU seconds in the measured window.
    pub cpu_window_s: f64,
    /// Whether loadgen used most of a machine's CPU, so it may have limited the result.
    pub maybe_bottleneck: bool,
}

/// Latencies, microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latencies {
    /// Connect start → CONNECT reply.
    pub handshake: Percentiles,
    /// Message round trip (open loop: from the scheduled send time).
    pub rtt: Percentiles,
    /// Open loop: from the actual write.
    pub service: Option<Percentiles>,
}

/// Histograms, serialized (V2 deflate, base64), for merging.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EncodedHistograms {
    /// Handshake latency.
    pub handshake: String,
    /// Round-trip latency.
    pub rtt: String,
    /// Service time (open loop).
    pub service: Option<String>,
}

/// Everything about one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// UTC start time, RFC 3339.
    pub started_at: String,
    /// The machine.
    pub host: Host,
    /// `git describe`-like revision of the workspace, if known.
    pub git_revision: Option<String>,
    /// Configuration.
    pub config: RunConfig,
    /// Session counts.
    pub sessions: Sessions,
    /// Throughput.
    pub messages: Messages,
    /// Latencies.
    pub latency_us: Latencies,
    /// Proxy resources.
    pub proxy: ProxyUsage,
    /// Kernel memory.
    pub kernel: KernelUsage,
    /// loadgen's own cost.
    pub loadgen: LoadgenUsage,
    /// `ok`, or why the run failed.
    pub outcome: String,
    /// Serialized histograms.
    pub histograms: EncodedHistograms,
}

/// Serializes a histogram for the record.
pub fn encode(histogram: &Histogram<u64>) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    V2DeflateSerializer::new()
        .serialize(histogram, &mut bytes)
        .map_err(|e| anyhow::anyhow!("cannot serialize histogram: {e:?}"))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Reads a histogram back from a record.
pub fn decode(text: &str) -> anyhow::Result<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("histogram is not base64")?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("cannot read histogram: {e:?}"))
}

/// HdrHistogram's percentile distribution text (the .hgrm format), values in µs.
pub fn percentile_distribution(histogram: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for value in histogram.iter_quantiles(5) {
        total += value.count_since_last_iteration();
        let quantile = value.quantile_iterated_to();
        if quantile < 1.0 {
            let _ = writeln!(
                out,
                "{:>12.3} {:>14.12} {:>10} {:>14.2}",
                value.value_iterated_to() as f64,
                quantile,
                total,
                1.0 / (1.0 - quantile)
            );
        } else {
            let _ = writeln!(
                out,
                "{:>12.3} {:>14.12} {:>10}",
                value.value_iterated_to() as f64,
                quantile,
                total
            );
        }
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        histogram.mean(),
        histogram.stdev()
    );
    let _ = writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        histogram.max() as f64,
        histogram.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        histogram.buckets(),
        histogram.distinct_values()
    );
    out
}

/// UTC now as RFC 3339 (`2026-11-28T19:32:55Z`) and as a file-name stamp (`20261128T193255Z`).
pub fn utc_now() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    (
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z"),
        format!("{year:04}{month:02}{day:02}T{h:02}{m:02}{s:02}Z"),
    )
}

/// The workspace's git revision (with `-dirty` for uncommitted changes), if git knows it.
pub fn git_revision() -> Option<String> {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let revision = run(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty =
        run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{revision}-dirty")
    } else {
        revision
    })
}

/// The columns of results/summary.csv.
pub const SUMMARY_HEADER: &str = "started_at,label,mode,conns,workers,rate,size,established,failed,dropped,corrupted,msgs_per_s,rtt_p50_us,rtt_p99_us,rtt_p999_us,handshake_p99_us,rss_per_session_idle,cpu_us_per_message,outcome,record";

/// Writes `runs/<stamp>-<label>-c<conns>.json`, the .hgrm files, and a summary row.
pub fn write(
    dir: &Path,
    stamp: &str,
    record: &Record,
    histograms: &[(&str, &Histogram<u64>)],
) -> anyhow::Result<PathBuf> {
    let runs = dir.join("runs");
    std::fs::create_dir_all(&runs).with_context(|| format!("cannot create {}", runs.display()))?;
    let base = format!("{stamp}-{}-c{}", record.config.label, record.config.conns);
    let json_path = runs.join(format!("{base}.json"));
    std::fs::write(&json_path, serde_json::to_string_pretty(record)? + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    for (name, histogram) in histograms {
        let path = runs.join(format!("{base}-{name}.hgrm"));
        std::fs::write(&path, percentile_distribution(histogram))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let summary = dir.join("summary.csv");
    let new_file = !summary.exists();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&summary)
        .with_context(|| format!("cannot open {}", summary.display()))?;
    if new_file {
        writeln!(file, "{SUMMARY_HEADER}")?;
    }
    let c = &record.config;
    let dropped: u64 = record.sessions.dropped.values().sum();
    writeln!(
        file,
        "{},{},{},{},{},{},{},{},{},{},{},{:.1},{},{},{},{},{:.0},{:.2},{},{}",
        record.started_at,
        c.label,
        c.mode,
        c.conns,
        c.workers,
        c.rate.map_or(String::new(), |r| format!("{r}")),
        c.size,
        record.sessions.established,
        record.sessions.failed,
        dropped,
        record.messages.corrupted,
        record.messages.per_second,
        record.latency_us.rtt.p50,
        record.latency_us.rtt.p99,
        record.latency_us.rtt.p999,
        record.latency_us.handshake.p99,
        record.proxy.rss_per_session_idle,
        record.proxy.cpu_us_per_message,
        record.outcome,
        json_path.strip_prefix(dir).unwrap_or(&json_path).display()
    )?;
    Ok(json_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_round_trip_and_merge() {
        let mut a = crate::workload::histogram();
        let mut b = crate::workload::histogram();
        for v in 1..=1000 {
            a.record(v).expect("record");
            b.record(v * 10).expect("record");
        }
        let mut merged = decode(&encode(&a).expect("encode")).expect("decode");
        assert_eq!(merged, a);
        merged
            .add(decode(&encode(&b).expect("encode")).expect("decode"))
            .expect("add");
        assert_eq!(merged.len(), 2000);
        let text = percentile_distribution(&merged);
        assert!(text.contains("Total count    =         2000"), "{text}");
    }

    #[test]
    fn dates_are_civil() {
        let (rfc, stamp) = utc_now();
        assert_eq!(rfc.len(), 20);
        assert_eq!(stamp.len(), 16);
        assert!(rfc.starts_with("20"));
    }
}
