//! `loadgen sample`: on a proxy host, the proxy's memory and CPU (a process and its
//! descendants) over the same absolute phases as the agents (`--start-at` and the run's
//! flags), written as a sample file that `loadgen merge` folds into the merged record's proxy
//! section. Agents on other hosts cannot see the proxy's processes; this can.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::cli::RunArgs;
use crate::probe::{self, ProcessProbe};
use crate::record::{unix_seconds, Host, ProxyUsage};
use crate::run::ramp_budget;

/// The value of a sample file's `kind`.
pub const KIND: &str = "proxy-sample";

/// `loadgen sample`'s settings: the run's timeline (the same flags the agents got), the
/// process to measure and where to write.
#[derive(Debug, clap::Args)]
pub struct SampleArgs {
    /// The run, as the agents were given it: --start-at, --conns, --ramp-rate, --idle-hold,
    /// --warmup and --duration place the phases.
    #[command(flatten)]
    pub run: RunArgs,

    /// The process to measure, with its descendants (the proxy, or its supervisor).
    #[arg(long)]
    pub pid: u32,

    /// The sample file to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// One proxy host's usage over a run's phases.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxySample {
    /// Always [`KIND`]: how `merge` tells a sample from a record.
    pub kind: String,
    /// The host measured.
    pub host: Host,
    /// The process measured (with its descendants).
    pub pid: u32,
    /// The run's shared start, Unix seconds.
    pub start_at_unix_s: f64,
    /// The measured window, Unix seconds.
    pub window_start_unix_s: f64,
    /// Its end.
    pub window_end_unix_s: f64,
    /// Memory and CPU; the per-session and per-message fields are left to the merge.
    pub proxy: ProxyUsage,
}

/// Sleeps until `at` on the wall clock (at once if it has passed).
fn sleep_until(at: SystemTime) {
    if let Ok(left) = at.duration_since(SystemTime::now()) {
        std::thread::sleep(left);
    }
}

/// Samples the process tree over the run's phases and writes the sample file.
pub fn sample(args: &SampleArgs) -> anyhow::Result<ProxySample> {
    let run = &args.run;
    let Some(start) = run.start_at else {
        bail!("--start-at is required: the sample must cover the agents' window");
    };
    if start.duration_since(SystemTime::now()).is_err() {
        bail!("--start-at has passed: start the sampler before the run starts");
    }
    let idle_start = start + ramp_budget(run);
    let window_start = idle_start + run.idle_hold + run.warmup;
    let window_end = window_start + run.duration;
    let mut probe = ProcessProbe::new();
    let mut proxy = ProxyUsage::default();
    let before = probe.tree(args.pid);
    if before.processes == 0 {
        bail!("no process {} to measure", args.pid);
    }
    proxy.rss_before = before.rss_bytes;
    proxy.processes = before.processes;
    sleep_until(start);
    let ramp_start = probe.tree(args.pid);
    sleep_until(idle_start + run.idle_hold);
    let idle = probe.tree(args.pid);
    proxy.cpu_ramp_s = idle.cpu_ms.saturating_sub(ramp_start.cpu_ms) as f64 / 1000.0;
    proxy.rss_idle = idle.rss_bytes;
    proxy.processes = idle.processes;
    sleep_until(window_start);
    let at_start = probe.tree(args.pid);
    let switches_start = probe::context_switches(args.pid);
    let mut peak = at_start.rss_bytes;
    while SystemTime::now() + Duration::from_secs(1) < window_end {
        std::thread::sleep(Duration::from_secs(1));
        peak = peak.max(probe.tree(args.pid).rss_bytes);
    }
    sleep_until(window_end);
    let at_end = probe.tree(args.pid);
    if at_end.processes == 0 {
        bail!("process {} ended during the window", args.pid);
    }
    if let (Some(a), Some(b)) = (switches_start, probe::context_switches(args.pid)) {
        proxy.context_switches_window = b.saturating_sub(a);
    }
    proxy.rss_peak = peak.max(at_end.rss_bytes);
    proxy.cpu_window_s = at_end.cpu_ms.saturating_sub(at_start.cpu_ms) as f64 / 1000.0;
    let sample = ProxySample {
        kind: KIND.to_owned(),
        host: Host::current(),
        pid: args.pid,
        start_at_unix_s: unix_seconds(start),
        window_start_unix_s: unix_seconds(window_start),
        window_end_unix_s: unix_seconds(window_end),
        proxy,
    };
    let text = serde_json::to_string_pretty(&sample)? + "\n";
    std::fs::write(&args.out, text)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    Ok(sample)
}
