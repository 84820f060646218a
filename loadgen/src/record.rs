//! One record per run: its schema, its typed outcome and failure causes, how it is assembled
//! from what a run measured, and its JSON file. Histograms are stored serialized (HdrHistogram
//! V2, deflated, base64) so records from different runs or hosts can be merged. The text
//! summary, the .hgrm files and results/summary.csv are in `report.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::Context;
use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::cli::RunArgs;
use crate::measure::lock;
use crate::run::Measured;
use crate::segment::Segment;
use crate::stack::Resources;
use crate::workload::Plan;

/// Bumped when a field changes meaning or disappears.
pub const SCHEMA_VERSION: u32 = 2;

fn bytes() -> String {
    "bytes".to_owned()
}

/// Why a dial failed or an established session was dropped; its text is the key it is
/// counted under in `sessions.failures` and `sessions.dropped`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The connection was refused.
    Refused,
    /// The connection was reset (or the pipe broke).
    Reset,
    /// The peer closed early.
    Eof,
    /// No answer within `--io-timeout`.
    Timeout,
    /// No ephemeral port was free for the source address.
    NoSourcePort,
    /// loadgen itself ran out of descriptors.
    LoadgenOutOfDescriptors,
    /// Another I/O error, by kind.
    Io(io::ErrorKind),
    /// The server chose a method loadgen did not offer.
    Method(u8),
    /// Username/password was rejected.
    AuthRejected,
    /// The CONNECT reply carried this failure code.
    Socks(u8),
    /// The reply could not be parsed.
    BadReply,
    /// An echo differed from what was sent.
    Corrupted,
}

impl Cause {
    /// Classifies an I/O error.
    pub fn of(err: &io::Error) -> Self {
        if err.raw_os_error() == Some(rustix::io::Errno::MFILE.raw_os_error()) {
            return Cause::LoadgenOutOfDescriptors;
        }
        match err.kind() {
            io::ErrorKind::ConnectionRefused => Cause::Refused,
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Cause::Reset,
            io::ErrorKind::UnexpectedEof => Cause::Eof,
            io::ErrorKind::TimedOut => Cause::Timeout,
            io::ErrorKind::AddrNotAvailable => Cause::NoSourcePort,
            kind => Cause::Io(kind),
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Refused => f.write_str("refused"),
            Cause::Reset => f.write_str("reset"),
            Cause::Eof => f.write_str("eof"),
            Cause::Timeout => f.write_str("timeout"),
            Cause::NoSourcePort => f.write_str("no-source-port"),
            Cause::LoadgenOutOfDescriptors => f.write_str("loadgen-out-of-descriptors"),
            Cause::Io(kind) => write!(f, "io: {kind}"),
            Cause::Method(method) => write!(f, "method-{method:02x}"),
            Cause::AuthRejected => f.write_str("auth-rejected"),
            Cause::Socks(code) => write!(f, "socks-{code:#04x}"),
            Cause::BadReply => f.write_str("bad-reply"),
            Cause::Corrupted => f.write_str("corrupted"),
        }
    }
}

/// How a run ended. Stored in the JSON as text: `ok`, or why the run failed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum Outcome {
    /// Every established session kept its bytes, and the proxy lived.
    #[default]
    Ok,
    /// This many echoes differed from what was sent.
    Corrupted(u64),
    /// The proxy exited during the run, with this status.
    ProxyDied(String),
    /// Established sessions broke mid-run, by cause.
    Dropped(BTreeMap<String, u64>),
    /// A failure read back from a stored record.
    Failed(String),
}

impl Outcome {
    /// Whether the run succeeded.
    pub fn is_ok(&self) -> bool {
        *self == Outcome::Ok
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => f.write_str("ok"),
            Outcome::Corrupted(n) => write!(
                f,
                "data corruption: {n} echoed messages differed from what was sent"
            ),
            Outcome::ProxyDied(status) => write!(f, "the proxy died during the run ({status})"),
            Outcome::Dropped(causes) => write!(
                f,
                "{} established sessions were dropped mid-run ({causes:?}): bytes in flight were lost",
                causes.values().sum::<u64>()
            ),
            Outcome::Failed(text) => f.write_str(text),
        }
    }
}

impl From<Outcome> for String {
    fn from(outcome: Outcome) -> String {
        outcome.to_string()
    }
}

impl From<String> for Outcome {
    fn from(text: String) -> Outcome {
        if text == "ok" {
            Outcome::Ok
        } else {
            Outcome::Failed(text)
        }
    }
}

/// The machine a run happened on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// The external server measured (`--proxy`), as its starter described it.
    #[serde(default)]
    pub external: Option<ExternalServer>,
    /// An agent's record: which segment of the `conns` sessions it ran (null for a whole run
    /// and for a merged record).
    #[serde(default)]
    pub segment: Option<Segment>,
    /// A merged record: the agents' records it was made from, by segment.
    #[serde(default)]
    pub segments: Vec<SegmentSource>,
    /// The shared start (--start-at), RFC 3339, if the run had one.
    #[serde(default)]
    pub start_at: Option<String>,
}

/// An external SOCKS5 server's identity, as given on the command line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExternalServer {
    /// Name and version (`--proxy-version`).
    pub version: Option<String>,
    /// How it was started (`--proxy-started-with`).
    pub started_with: Option<String>,
    /// Its PID (`--proxy-pid`), whose process tree was measured.
    pub pid: Option<u32>,
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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// The window's start on the wall clock, Unix seconds (agents' windows are matched by it).
    #[serde(default)]
    pub window_start_unix_s: f64,
    /// The window's end on the wall clock, Unix seconds.
    #[serde(default)]
    pub window_end_unix_s: f64,
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
    /// (rss_idle − rss_before) / established (0 in an agent's record: see the merged one).
    pub rss_per_session_idle: f64,
    /// (rss_peak − rss_before) / established.
    pub rss_per_session_peak: f64,
    /// CPU seconds (user + system) while sessions were opened.
    pub cpu_ramp_s: f64,
    /// CPU seconds in the measured window.
    pub cpu_window_s: f64,
    /// CPU microseconds per round trip in the window.
    pub cpu_us_per_message: f64,
    /// Context switches of the proxy's threads in the window (its wake-ups: each time a
    /// thread slept and woke, or was preempted); absent in older records; 0 when the proxy
    /// ran more than 4,096 threads (counting them would stall the run).
    #[serde(default)]
    pub context_switches_window: u64,
    /// Context switches per round trip in the window.
    #[serde(default)]
    pub context_switches_per_message: f64,
}

/// Kernel TCP memory (not part of any RSS), from /proc/net/sockstat: machine-wide, so other
/// traffic on the host counts too.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KernelUsage {
    /// The unit of the `tcp_mem_*` fields: bytes (sockstat's pages × the page size).
    #[serde(default = "bytes")]
    pub tcp_mem_unit: String,
    /// Bytes before any session.
    pub tcp_mem_before: u64,
    /// Bytes with every session idle.
    pub tcp_mem_idle: u64,
    /// Highest of every sample (before, idle and each second of the window).
    pub tcp_mem_peak: u64,
    /// TCP sockets in use with every session idle.
    pub tcp_sockets_idle: u64,
    /// Kernel slab memory in use before any session, bytes (active objects × size from
    /// /proc/slabinfo; /proc/meminfo `Slab` where that is unreadable, as in records before
    /// 2026-12-04T04): where socket, inode and epoll structures live (sockstat's TCP memory
    /// counts only buffers).
    #[serde(default)]
    pub slab_before: u64,
    /// Kernel slab memory with every session idle, bytes.
    #[serde(default)]
    pub slab_idle: u64,
}

/// The memory of loadgen's and the echo target's processes (the proxy's is in `proxy`, the
/// kernel's in `kernel`), so a session's cost can be counted with everything included.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostMemory {
    /// loadgen processes summed (agents).
    pub loadgen_processes: usize,
    /// Their RSS before any session, bytes.
    pub loadgen_rss_before: u64,
    /// Their RSS with every session idle, bytes.
    pub loadgen_rss_idle: u64,
    /// Echo target processes summed.
    pub echo_processes: usize,
    /// Their RSS before any session, bytes.
    pub echo_rss_before: u64,
    /// Their RSS with every session idle, bytes.
    pub echo_rss_idle: u64,
    /// What one idle session added, everything included: the growth of the proxy's,
    /// loadgen's and the echo target's RSS and of the kernel's TCP buffers and slab (sockets,
    /// inodes, epoll items), over `established`. Kernel figures are host-wide.
    pub bytes_per_session_idle: f64,
}

impl HostMemory {
    /// Fills `bytes_per_session_idle` from the record's other sections.
    pub fn account(&mut self, proxy: &ProxyUsage, kernel: &KernelUsage, established: u64) {
        let grew = |before: u64, idle: u64| idle.saturating_sub(before) as f64;
        let total = grew(self.loadgen_rss_before, self.loadgen_rss_idle)
            + grew(self.echo_rss_before, self.echo_rss_idle)
            + grew(proxy.rss_before, proxy.rss_idle)
            + grew(kernel.tcp_mem_before, kernel.tcp_mem_idle)
            + grew(kernel.slab_before, kernel.slab_idle);
        self.bytes_per_session_idle = if established == 0 {
            0.0
        } else {
            total / established as f64
        };
    }
}

/// Where a merged record's sessions were run: one agent's record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SegmentSource {
    /// The agent's segment.
    pub segment: Segment,
    /// Its record file, as given to `merge` (or written by the parent).
    pub record: String,
    /// The host it ran on.
    pub hostname: String,
    /// Its sessions established.
    pub established: u64,
    /// Its measured window on the wall clock, Unix seconds.
    pub window_start_unix_s: f64,
    /// The end of that window.
    pub window_end_unix_s: f64,
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
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latencies {
    /// Connect start → CONNECT reply.
    pub handshake: Percentiles,
    /// Message round trip (open loop: from the scheduled send time).
    pub rtt: Percentiles,
    /// Open loop: from the actual write.
    pub service: Option<Percentiles>,
}

/// How far the instrument itself was off in a run, and whether that limits the result.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Harness {
    /// Open loop: how the pacer waited before sends (`sleep` or `spin`); null in closed loop.
    pub pacer: Option<String>,
    /// Open loop: `uniform` or `poisson`.
    pub arrivals: Option<String>,
    /// Open loop: pacer threads.
    pub pacer_threads: usize,
    /// Open loop: how late the pacer acted on each scheduled send (acted − scheduled), µs.
    pub lateness_us: Option<Percentiles>,
    /// Open loop: the share of scheduled sends acted on more than 50 µs late.
    pub late_share: Option<f64>,
    /// Open loop: messages per second offered.
    pub offered_rate: Option<f64>,
    /// Open loop: scheduled sends the pacer acted on, per second of the window.
    pub dispatched_rate: Option<f64>,
    /// Open loop: scheduled sends due in the window that the pacer acted on.
    #[serde(default)]
    pub dispatched: u64,
    /// Round trips completed per second of the window.
    pub achieved_rate: f64,
    /// Open loop: sends that waited for their session's previous echo (they still count from
    /// their scheduled time).
    pub queued_behind_echo: u64,
    /// Open loop: scheduled sends no live session could carry (sessions were dropped).
    pub skipped: u64,
    /// Open loop: sends due in the window the pacer never reached (it fell behind).
    #[serde(default)]
    pub backlog: u64,
    /// Open loop: sends due in the window that never completed (session broke, or still
    /// owed or out when the drain ended); lost, never counted as fast.
    #[serde(default)]
    pub unfinished: u64,
    /// Open loop: set when the point is not at the offered load (achieved more than 1 % short,
    /// or sends never completed): the system under test, not the instrument, fell behind.
    #[serde(default)]
    pub saturated: Option<String>,
    /// How late a thread sleeping 1 ms at a time woke in the window: the host's own hiccups.
    pub control_sleep_late_us: Percentiles,
    /// The share of the machine's CPU time in the window that the hypervisor gave to someone
    /// else (steal, from /proc/stat): a VM's stalls that no pacer can prevent.
    #[serde(default)]
    pub host_steal_share: f64,
    /// The whole machine's busy cores in the window (loadgen, the proxy, the echo target and
    /// anything else running).
    #[serde(default)]
    pub host_busy_cores: f64,
    /// Open loop: the share of the window the pacer threads slept (timer or echo), per thread.
    pub pacer_slept_share: Option<f64>,
    /// Open loop: the share of the window the pacer threads polled with nothing to do (the
    /// spin before each send), per thread.
    pub pacer_idle_poll_share: Option<f64>,
    /// loadgen's CPU in the window, in cores (CPU seconds / window seconds).
    pub loadgen_cores: f64,
    /// loadgen's CPU less its pacers' idle polling, in cores: the work it did.
    pub loadgen_busy_cores: f64,
    /// Whether the instrument may have shaped the result (see `limited_by`).
    pub limited: bool,
    /// Why: schedule lateness p99 over 50 µs, sends due in the window not reached or a
    /// uniform schedule off by more than 1 %, loadgen near a core.
    pub limited_by: Vec<String>,
}

/// The self-check's limits.
pub mod limits {
    /// Schedule lateness p99 above this marks a run harness-limited, µs.
    pub const LATENESS_P99_US: u64 = 50;
    /// A schedule (or achieved rate) further than this from the offered one, as a fraction.
    pub const RATE_ERROR: f64 = 0.01;
    /// Open loop: loadgen's CPU above this, in cores.
    pub const CORES: f64 = 0.9;
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
    /// Schedule lateness (open loop).
    #[serde(default)]
    pub lateness: Option<String>,
}

/// Everything about one run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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
    /// loadgen's and the echo target's memory, and a session's cost everything included.
    #[serde(default)]
    pub memory: HostMemory,
    /// loadgen's own cost.
    pub loadgen: LoadgenUsage,
    /// How far the instrument was off (absent from schema 1 records).
    #[serde(default)]
    pub harness: Harness,
    /// `ok`, or why the run failed.
    pub outcome: Outcome,
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

/// UTC now as RFC 3339 (`2026-11-28T19:32:55Z`) and as a file-name stamp (`20261128T193255Z`).
pub fn utc_now() -> (String, String) {
    let rfc3339 = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let stamp = rfc3339.replace(['-', ':'], "");
    (rfc3339, stamp)
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
    // results/ is excluded: every tagged run appends to results/summary.csv, which would mark
    // every record after a sweep's first as dirty.
    let dirty = run(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ":(top)",
        ":(top,exclude)results",
    ])
    .is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{revision}-dirty")
    } else {
        revision
    })
}

/// Writes the record as `runs/<stamp>-<label>-c<conns>.json` under `dir` (an agent's with
/// `-agent-<I>-of-<K>` before `.json`); returns its path.
pub fn write(dir: &Path, stamp: &str, record: &Record) -> anyhow::Result<PathBuf> {
    let runs = dir.join("runs");
    std::fs::create_dir_all(&runs).with_context(|| format!("cannot create {}", runs.display()))?;
    let mut base = format!("{stamp}-{}-c{}", record.config.label, record.config.conns);
    if let Some(segment) = record.config.segment {
        base.push_str(&format!("-agent-{}-of-{}", segment.index, segment.count));
    }
    let text = serde_json::to_string_pretty(record)? + "\n";
    // Two runs of one point can end within the stamp's second: never overwrite a record.
    for attempt in 1..=1000 {
        let name = match attempt {
            1 => format!("{base}.json"),
            n => format!("{base}-{n}.json"),
        };
        let json_path = runs.join(name);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&json_path)
        {
            Ok(mut file) => {
                use std::io::Write as _;
                file.write_all(text.as_bytes())
                    .with_context(|| format!("cannot write {}", json_path.display()))?;
                return Ok(json_path);
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(err) => {
                return Err(err).with_context(|| format!("cannot write {}", json_path.display()))
            }
        }
    }
    anyhow::bail!("{} already holds 1000 records named {base}", runs.display())
}

/// Assembles the record of a run from its settings and what it measured.
pub fn assemble(
    args: &RunArgs,
    plan: &Plan,
    resources: &Resources,
    label: &str,
    started_at: String,
    measured: Measured,
) -> anyhow::Result<Record> {
    let shared = &measured.shared;
    let established = shared.established.load(Ordering::Relaxed);
    let messages = shared.messages.load(Ordering::Relaxed);
    let window_s = measured.window.as_secs_f64();
    let mut proxy = measured.proxy.clone();
    let per_session = |rss: u64| {
        if established == 0 {
            0.0
        } else {
            rss.saturating_sub(proxy.rss_before) as f64 / established as f64
        }
    };
    proxy.rss_per_session_idle = per_session(proxy.rss_idle);
    proxy.rss_per_session_peak = per_session(proxy.rss_peak);
    proxy.cpu_us_per_message = if messages == 0 {
        0.0
    } else {
        proxy.cpu_window_s * 1e6 / messages as f64
    };
    proxy.context_switches_per_message = if messages == 0 {
        0.0
    } else {
        proxy.context_switches_window as f64 / messages as f64
    };
    if args.segment.is_split() {
        // An agent measures the whole proxy (and host) but holds only its share of the
        // sessions and messages: per-session and per-message figures belong to the merged
        // record, which divides by the whole run's.
        proxy.rss_per_session_idle = 0.0;
        proxy.rss_per_session_peak = 0.0;
        proxy.cpu_us_per_message = 0.0;
        proxy.context_switches_per_message = 0.0;
    }
    let corrupted = shared.corrupted.load(Ordering::Relaxed);
    let dropped = lock(&shared.dropped).clone();
    let outcome = if corrupted > 0 {
        Outcome::Corrupted(corrupted)
    } else if let Some(status) = measured.proxy_died.clone() {
        Outcome::ProxyDied(status)
    } else if dropped.values().sum::<u64>() > 0 {
        Outcome::Dropped(dropped.clone())
    } else {
        Outcome::Ok
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let harness = harness(args, plan, &measured, messages, window_s);
    let mut kernel = measured.kernel;
    kernel.tcp_mem_unit = bytes();
    let loadgen = LoadgenUsage {
        cpu_window_s: measured.loadgen_cpu_s,
        maybe_bottleneck: window_s > 0.0 && measured.loadgen_cpu_s / window_s > 0.8 * cores,
    };
    let handshake = lock(&shared.histograms.handshake).clone();
    let rtt = lock(&shared.histograms.rtt).clone();
    let service = lock(&shared.histograms.service).clone();
    let per_window = |count: f64| {
        if window_s > 0.0 {
            count / window_s
        } else {
            0.0
        }
    };
    Ok(Record {
        schema_version: SCHEMA_VERSION,
        started_at,
        host: Host::current(),
        git_revision: git_revision(),
        config: RunConfig {
            mode: if args.proxy.is_some() {
                "external".into()
            } else {
                args.mode.name().to_owned()
            },
            label: label.to_owned(),
            conns: args.conns as usize,
            workers: resources.workers,
            threads: resources.proxy_threads,
            size: plan.size,
            rate: plan.rate,
            duration_s: args.duration.as_secs_f64(),
            warmup_s: args.warmup.as_secs_f64(),
            ramp_rate: args.ramp_rate,
            max_dials: args.max_dials,
            auth: plan.auth.is_some(),
            proxy: plan.proxy.map(|a| a.to_string()),
            echo_addrs: plan.echo.iter().map(ToString::to_string).collect(),
            source_addrs: plan.sources.iter().map(ToString::to_string).collect(),
            command: std::env::args().collect(),
            tag: args.tag.clone(),
            loadgen_threads: args.runtime_threads(),
            external: args.proxy.map(|_| ExternalServer {
                version: args.proxy_version.clone(),
                started_with: args.proxy_started_with.clone(),
                pid: args.proxy_pid,
            }),
            segment: args.segment.is_split().then_some(args.segment),
            segments: Vec::new(),
            start_at: args
                .start_at
                .map(|t| humantime::format_rfc3339_nanos(t).to_string()),
        },
        sessions: Sessions {
            requested: plan.conns,
            established,
            failed: shared.failed(),
            failures: lock(&shared.failures).clone(),
            dropped,
        },
        messages: Messages {
            count: messages,
            window_s,
            per_second: per_window(messages as f64),
            bytes_per_second: per_window((messages * plan.size as u64) as f64),
            corrupted,
            window_start_unix_s: unix_seconds(measured.window_wall.0),
            window_end_unix_s: unix_seconds(measured.window_wall.1),
        },
        latency_us: Latencies {
            handshake: Percentiles::of(&handshake),
            rtt: Percentiles::of(&rtt),
            service: plan.rate.map(|_| Percentiles::of(&service)),
        },
        memory: {
            let mut memory = measured.memory.clone();
            if !args.segment.is_split() {
                memory.account(&proxy, &kernel, established);
            }
            memory
        },
        proxy,
        kernel,
        loadgen,
        harness,
        outcome,
        histograms: EncodedHistograms {
            handshake: encode(&handshake)?,
            rtt: encode(&rtt)?,
            service: plan.rate.map(|_| encode(&service)).transpose()?,
            lateness: measured
                .pacer
                .as_ref()
                .map(|report| encode(&report.lateness))
                .transpose()?,
        },
    })
}

/// Seconds since the Unix epoch (0 before it).
pub fn unix_seconds(time: std::time::SystemTime) -> f64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The instrument's self-check of one run.
fn harness(
    args: &RunArgs,
    plan: &Plan,
    measured: &Measured,
    messages: u64,
    window_s: f64,
) -> Harness {
    let per_second = |count: u64| {
        if window_s > 0.0 {
            count as f64 / window_s
        } else {
            0.0
        }
    };
    let loadgen_cores = if window_s > 0.0 {
        measured.loadgen_cpu_s / window_s
    } else {
        0.0
    };
    let mut harness = Harness {
        achieved_rate: per_second(messages),
        control_sleep_late_us: Percentiles::of(&measured.control),
        loadgen_cores,
        loadgen_busy_cores: loadgen_cores,
        host_steal_share: measured.host.steal_share,
        host_busy_cores: measured.host.busy_cores,
        ..Harness::default()
    };
    if let (Some(offered), Some(report)) = (plan.rate, &measured.pacer) {
        // An agent offers its segment's share of the run's rate.
        let offered = args.segment.scale(offered, args.conns as usize);
        let lateness = Percentiles::of(&report.lateness);
        harness.pacer = Some(args.pacer.name().to_owned());
        harness.arrivals = Some(args.arrivals.name().to_owned());
        harness.pacer_threads = usize::from(args.pacer_threads);
        harness.late_share = Some(if report.dispatched == 0 {
            0.0
        } else {
            report.late as f64 / report.dispatched as f64
        });
        harness.offered_rate = Some(offered);
        harness.dispatched_rate = Some(per_second(report.dispatched));
        harness.dispatched = report.dispatched;
        harness.queued_behind_echo = report.queued_behind_echo;
        harness.skipped = report.skipped;
        if lateness.p99 > limits::LATENESS_P99_US {
            // Say what the host did meanwhile: a stolen CPU or a late control sleeper is a
            // stall no pacer could have avoided.
            harness.limited_by.push(format!(
                "schedule lateness p99 {} µs > {} µs (host: {:.1} % of CPU stolen, control sleeper up to {} µs late)",
                lateness.p99,
                limits::LATENESS_P99_US,
                measured.host.steal_share * 100.0,
                harness.control_sleep_late_us.max
            ));
        }
        harness.backlog = report.backlog;
        harness.unfinished = report.unfinished;
        // The pacer fell behind its own schedule: sends due in the window it never reached.
        let due = report.dispatched + report.backlog;
        if due > 0 && report.backlog as f64 / due as f64 > limits::RATE_ERROR {
            harness.limited_by.push(format!(
                "{} of {due} sends due in the window were never reached",
                report.backlog
            ));
        }
        // Evenly spaced sends must also add up to the offered rate (Poisson counts vary by
        // chance, so only the backlog above judges them).
        let dispatched = per_second(report.dispatched);
        let error = dispatched / offered - 1.0;
        if args.arrivals == crate::cli::Arrivals::Uniform && error.abs() > limits::RATE_ERROR {
            harness.limited_by.push(format!(
                "dispatched {dispatched:.0} msg/s is {:+.1} % off the offered {offered:.0}",
                error * 100.0
            ));
        }
        // Not the instrument's fault, but the point is not at the offered load: say so.
        let achieved_error = harness.achieved_rate / offered - 1.0;
        if achieved_error < -limits::RATE_ERROR || report.unfinished > 0 {
            harness.saturated = Some(format!(
                "achieved {:.0} of {offered:.0} msg/s offered; {} sends waited for an echo; {} never completed",
                harness.achieved_rate, report.queued_behind_echo, report.unfinished
            ));
        }
        harness.lateness_us = Some(lateness);
        let threads = report.active_threads.max(1) as f64;
        if window_s > 0.0 {
            harness.pacer_slept_share = Some(report.slept_ns as f64 / 1e9 / window_s / threads);
            let idle_poll_cores = report.idle_poll_ns as f64 / 1e9 / window_s;
            harness.pacer_idle_poll_share = Some(idle_poll_cores / threads);
            harness.loadgen_busy_cores = (loadgen_cores - idle_poll_cores).max(0.0);
        }
    }
    // Open loop: loadgen near a core takes CPU the proxy under test could have used, even
    // when most of it is polling to keep the schedule (the reason says how much). Closed loop
    // runs loadgen on every core on purpose; there it only counts once it takes most of the
    // machine.
    let cpu_limit = if plan.rate.is_some() {
        limits::CORES
    } else {
        0.8 * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
    };
    if harness.loadgen_cores > cpu_limit {
        harness.limited_by.push(format!(
            "loadgen held {:.2} cores ({:.2} of them busy, the rest polling before sends)",
            harness.loadgen_cores, harness.loadgen_busy_cores
        ));
    }
    if let Some(left) = measured.ramp_cut_short {
        harness.limited_by.push(format!(
            "the ramp ran out of its time on the shared schedule (--start-at) with {left} of {} sessions still to dial or dialing",
            plan.conns
        ));
    }
    harness.limited = !harness.limited_by.is_empty();
    harness
}

/// The record's histograms, decoded, by name.
pub fn histograms(record: &Record) -> anyhow::Result<Vec<(&'static str, Histogram<u64>)>> {
    let mut out = vec![
        ("handshake", decode(&record.histograms.handshake)?),
        ("rtt", decode(&record.histograms.rtt)?),
    ];
    if let Some(service) = &record.histograms.service {
        out.push(("service", decode(service)?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_round_trip_and_merge() {
        let mut a = crate::measure::histogram();
        let mut b = crate::measure::histogram();
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
    }

    #[test]
    fn dates_are_rfc3339_and_stamps_their_digits() {
        let (rfc, stamp) = utc_now();
        assert_eq!(rfc.len(), 20, "{rfc}");
        assert!(rfc.ends_with('Z') && rfc.as_bytes()[10] == b'T', "{rfc}");
        assert_eq!(stamp.len(), 16, "{stamp}");
        assert_eq!(stamp, rfc.replace(['-', ':'], ""));
    }

    #[test]
    fn outcomes_and_causes_keep_their_json_text() {
        let json = serde_json::to_string(&Outcome::Ok).expect("json");
        assert_eq!(json, "\"ok\"");
        let back: Outcome = serde_json::from_str(&json).expect("parse");
        assert!(back.is_ok());
        let died = Outcome::ProxyDied("signal: 9 (SIGKILL)".into());
        let back: Outcome =
            serde_json::from_str(&serde_json::to_string(&died).expect("json")).expect("parse");
        assert_eq!(back.to_string(), died.to_string());
        assert!(!back.is_ok());
        assert_eq!(Cause::Socks(1).to_string(), "socks-0x01");
        assert_eq!(Cause::Method(0xff).to_string(), "method-ff");
        let emfile = io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        assert_eq!(Cause::of(&emfile), Cause::LoadgenOutOfDescriptors);
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(Cause::of(&refused).to_string(), "refused");
    }
}
