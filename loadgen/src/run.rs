//! The run's schedule: ramp the sessions, hold them idle, warm up, measure a window, drain;
//! with the proxy's and the kernel's usage sampled at each step and a status line a second.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::RunArgs;
use hdrhistogram::Histogram;

use crate::agents::status;
use crate::measure::{histogram, lock, Phase, Shared};
use crate::pacer::{self, PacerReport, Pacers};
use crate::probe::{self, ProcessProbe};
use crate::record::{HostMemory, KernelUsage, ProxyUsage};
use crate::workload::{self, Plan};

/// The run was interrupted by Ctrl-C or SIGTERM.
pub struct Interrupted;

/// Everything measured while the sessions ran.
pub struct Measured {
    /// The sessions' counters and histograms.
    pub shared: Arc<Shared>,
    /// The measured window's actual length.
    pub window: Duration,
    /// The proxy's resources.
    pub proxy: ProxyUsage,
    /// Kernel TCP memory.
    pub kernel: KernelUsage,
    /// loadgen's own CPU seconds in the window.
    pub loadgen_cpu_s: f64,
    /// The proxy's exit status, if it died during the run.
    pub proxy_died: Option<String>,
    /// Open loop: what the pacer threads measured, themselves included.
    pub pacer: Option<PacerReport>,
    /// How late a thread sleeping 1 ms at a time woke in the window (host hiccups), µs.
    pub control: Histogram<u64>,
    /// The whole machine's CPU in the window, and what the hypervisor took.
    pub host: probe::HostCpuShare,
    /// The window's start and end on the wall clock (agents' windows are compared by it).
    pub window_wall: (SystemTime, SystemTime),
    /// On a shared schedule (--start-at): sessions not yet dialed (or still dialing) when
    /// the ramp's time ran out.
    pub ramp_cut_short: Option<u64>,
    /// loadgen's and the echo target's memory.
    pub memory: HostMemory,
}

/// How long the ramp may take on a shared schedule, beyond sessions ÷ ramp rate: a quarter
/// more, plus this.
const RAMP_SLACK: Duration = Duration::from_secs(2);

/// How often an agent reports its progress to the parent.
const STATUS_EVERY: Duration = Duration::from_millis(250);

/// How long the ramp of a run on a shared schedule may take: sessions ÷ ramp rate, a
/// quarter more, and [`RAMP_SLACK`] (the same for every agent, and for `loadgen sample`).
pub fn ramp_budget(args: &RunArgs) -> Duration {
    let ramp = Duration::from_secs_f64(args.conns as f64 / args.ramp_rate.max(1e-3));
    ramp.mul_f64(1.25) + RAMP_SLACK
}

/// The phases of a run on absolute times (--start-at): every agent of a run, on any host,
/// ramps, idles, warms up and measures at the same instants.
#[derive(Debug, Clone)]
pub struct Timeline {
    /// When the ramp starts.
    pub ramp_start: Instant,
    /// When every agent's ramp must be done (its sessions are then held idle).
    pub idle_start: Instant,
    /// When the warm-up starts.
    pub warmup_start: Instant,
    /// CLOCK_MONOTONIC nanoseconds of `warmup_start`: the pacers' schedule origin.
    pub warmup_mono_ns: u64,
    /// When the measured window starts.
    pub window_start: Instant,
}

impl Timeline {
    /// The phases of a run of `args` starting at `start` on the wall clock; an error if that
    /// has passed.
    pub fn new(start: SystemTime, args: &RunArgs) -> anyhow::Result<Timeline> {
        let now_wall = SystemTime::now();
        let now = Instant::now();
        let now_mono = crate::pacer::now_ns();
        let ahead = start.duration_since(now_wall).map_err(|late| {
            anyhow::anyhow!(
                "--start-at is {:.3} s in the past: agents must be started before it",
                late.duration().as_secs_f64()
            )
        })?;
        let ramp_budget = ramp_budget(args);
        let ramp_start = now + ahead;
        let idle_start = ramp_start + ramp_budget;
        let warmup_start = idle_start + args.idle_hold;
        Ok(Timeline {
            ramp_start,
            idle_start,
            warmup_start,
            warmup_mono_ns: now_mono + (ahead + ramp_budget + args.idle_hold).as_nanos() as u64,
            window_start: warmup_start + args.warmup,
        })
    }
}

async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// Runs the phases (ramp, idle hold, warm-up, measured window, drain) and samples the proxy
/// and the kernel between them. `proxy_pid` is the process tree measured.
pub async fn drive(
    args: &RunArgs,
    plan: Arc<Plan>,
    proxy_pid: Option<u32>,
    echo_pids: Vec<u32>,
    timeline: Option<Timeline>,
) -> Result<Measured, Interrupted> {
    let quiet = args.is_quiet();
    let shared = Shared::new();
    let mut probe = ProcessProbe::new();
    let mut proxy_usage = ProxyUsage::default();
    let mut kernel = KernelUsage::default();
    let tree = |probe: &mut ProcessProbe| proxy_pid.map(|pid| probe.tree(pid)).unwrap_or_default();

    let before = tree(&mut probe);
    proxy_usage.rss_before = before.rss_bytes;
    proxy_usage.processes = before.processes;
    kernel.tcp_mem_before = probe::kernel_tcp().1;
    kernel.slab_before = probe::kernel_slab();
    let mut memory = HostMemory {
        loadgen_processes: 1,
        loadgen_rss_before: probe::own_rss(),
        echo_processes: echo_pids.len(),
        echo_rss_before: echo_pids.iter().map(|&pid| probe.tree(pid).rss_bytes).sum(),
        ..HostMemory::default()
    };
    // Kernel TCP memory is machine-wide and moves on its own: the peak is the highest of every
    // sample, before and idle included, so it can never read below them.
    let mut peak_tcp = kernel.tcp_mem_before;

    let pacers = match (plan.rate, &args.pacer_config()) {
        (Some(_), Some(config)) => match Pacers::start(config, shared.clone()) {
            Ok(pacers) => Some(pacers),
            Err(err) => {
                eprintln!("loadgen: cannot start the pacer threads: {err}");
                return Err(Interrupted);
            }
        },
        _ => None,
    };
    let inlet = pacers.as_ref().map(Pacers::inlet);
    let control = pacer::control_sleeper(shared.clone());

    let run = async {
        // Ramp.
        let bar = if quiet {
            indicatif::ProgressBar::hidden()
        } else {
            let bar = indicatif::ProgressBar::new(plan.conns as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "ramp {bar:40} {pos}/{len} dialed, {msg} [{elapsed}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        };
        let ramp_start = tree(&mut probe);
        let dials = Arc::new(Semaphore::new(args.max_dials.max(1)));
        let mut sessions = JoinSet::new();
        if let Some(timeline) = &timeline {
            tokio::time::sleep_until(timeline.ramp_start).await;
        }
        let start = Instant::now();
        let spacing = Duration::from_secs_f64(1.0 / args.segment_ramp_rate().max(1e-3));
        let mut last_status = start;
        let ramp = async {
            for local in 0..plan.conns {
                let id = plan.first_id + local;
                // Agents dial interleaved, as one process would, not K at the same instant.
                let at = local as f64 + args.segment.phase();
                tokio::time::sleep_until(start + spacing.mul_f64(at)).await;
                let Ok(permit) = dials.clone().acquire_owned().await else {
                    break;
                };
                sessions.spawn(workload::session(
                    id,
                    plan.clone(),
                    shared.clone(),
                    permit,
                    inlet.clone(),
                ));
                if local % 64 == 0 {
                    bar.set_position(shared.dialed.load(Ordering::Relaxed));
                    bar.set_message(format!("{} failed", shared.failed()));
                    if args.agent_status && last_status.elapsed() >= STATUS_EVERY {
                        last_status = Instant::now();
                        status::emit(&shared, Phase::Ramp);
                    }
                }
            }
            while (shared.dialed.load(Ordering::Relaxed) as usize) < plan.conns {
                tokio::time::sleep(Duration::from_millis(50)).await;
                bar.set_position(shared.dialed.load(Ordering::Relaxed));
                bar.set_message(format!("{} failed", shared.failed()));
                if args.agent_status && last_status.elapsed() >= STATUS_EVERY {
                    last_status = Instant::now();
                    status::emit(&shared, Phase::Ramp);
                }
            }
        };
        // On a shared schedule the ramp ends at the idle point however far it got, so this
        // agent's window starts with the others'; dials in flight go on, sessions not yet
        // dialed never are, and the record says how many.
        let cut_short = match &timeline {
            Some(timeline) => tokio::time::timeout_at(timeline.idle_start, ramp)
                .await
                .is_err()
                .then(|| plan.conns as u64 - shared.dialed.load(Ordering::Relaxed)),
            None => {
                ramp.await;
                None
            }
        };
        bar.finish_and_clear();
        if args.agent_status {
            status::emit(&shared, Phase::Idle);
        }
        let ramp_end = tree(&mut probe);
        proxy_usage.cpu_ramp_s = ramp_end.cpu_ms.saturating_sub(ramp_start.cpu_ms) as f64 / 1000.0;
        if !quiet {
            eprintln!(
                "loadgen: {} established, {} failed {:?} in {:.1}s",
                shared.established.load(Ordering::Relaxed),
                shared.failed(),
                lock(&shared.failures),
                start.elapsed().as_secs_f64()
            );
        }

        // Idle hold: memory with every session open and quiet.
        if let Some(timeline) = &timeline {
            tokio::time::sleep_until(timeline.idle_start).await;
        }
        shared.set_phase(Phase::Idle);
        match &timeline {
            Some(timeline) => tokio::time::sleep_until(timeline.warmup_start).await,
            None => tokio::time::sleep(args.idle_hold).await,
        }
        let idle = tree(&mut probe);
        proxy_usage.rss_idle = idle.rss_bytes;
        proxy_usage.processes = idle.processes;
        let (sockets, mem) = probe::kernel_tcp();
        kernel.tcp_mem_idle = mem;
        kernel.tcp_sockets_idle = sockets;
        kernel.slab_idle = probe::kernel_slab();
        peak_tcp = peak_tcp.max(mem);
        memory.loadgen_rss_idle = probe::own_rss();
        memory.echo_rss_idle = echo_pids.iter().map(|&pid| probe.tree(pid).rss_bytes).sum();

        // Warm-up, then the measured window, with a status line every second.
        if let Some(timeline) = &timeline {
            // Every agent's pacers start their schedule at the same instant, exactly.
            shared
                .warmup_started_ns
                .store(timeline.warmup_mono_ns, Ordering::Release);
        }
        shared.set_phase(Phase::Warmup);
        match &timeline {
            Some(timeline) => tokio::time::sleep_until(timeline.window_start).await,
            None => tokio::time::sleep(args.warmup).await,
        }
        // The window opens first, then the samples, as it closes before them at its end: the
        // CPU figures are shifted by the sampling time at both ends alike, and the counting
        // (in every agent) starts on time however long sampling a big process tree takes.
        shared.set_phase(Phase::Measure);
        let window_start = timeline
            .as_ref()
            .map_or_else(Instant::now, |t| t.window_start);
        let window_start_wall = std::time::SystemTime::now() - window_start.elapsed();
        let own_start = probe::own_cpu_us();
        let host_start = probe::host_cpu();
        let window_start_usage = tree(&mut probe);
        let switches_start = proxy_pid.and_then(probe::context_switches);
        let mut peak_rss = window_start_usage.rss_bytes;
        peak_tcp = peak_tcp.max(probe::kernel_tcp().1);
        let mut last_messages = shared.messages_total.load(Ordering::Relaxed);
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        while window_start.elapsed() < args.duration {
            let left = args.duration.saturating_sub(window_start.elapsed());
            tokio::select! {
                _ = ticker.tick() => {}
                _ = tokio::time::sleep(left) => break,
            }
            // A sample near the end would run past it (reading every process takes
            // milliseconds) and lengthen this agent's window against the others'.
            if args.duration.saturating_sub(window_start.elapsed()) < Duration::from_millis(200) {
                continue;
            }
            let usage = tree(&mut probe);
            peak_rss = peak_rss.max(usage.rss_bytes);
            peak_tcp = peak_tcp.max(probe::kernel_tcp().1);
            let total = shared.messages_total.load(Ordering::Relaxed);
            if !quiet {
                // Open loop measures in the pacer threads: its p99 is known at the end.
                let p99 = if plan.rate.is_none() {
                    lock(&shared.histograms.rtt)
                        .value_at_quantile(0.99)
                        .to_string()
                } else {
                    "-".to_owned()
                };
                eprintln!(
                    "loadgen: t={:>3.0}s {:>9} msg/s  p99 {:>8} µs  established {}  dropped {}  proxy rss {:.1} MiB",
                    window_start.elapsed().as_secs_f64(),
                    total - last_messages,
                    p99,
                    shared.established.load(Ordering::Relaxed),
                    shared.dropped_total(),
                    usage.rss_bytes as f64 / (1 << 20) as f64
                );
            }
            last_messages = total;
            if args.agent_status {
                status::emit(&shared, Phase::Measure);
            }
        }
        let window = window_start.elapsed();
        let window_wall = (window_start_wall, std::time::SystemTime::now());
        // The window ends for everyone at once: pacers stop counting now.
        shared.set_phase(Phase::Stop);
        let own_end = probe::own_cpu_us();
        let host = probe::host_cpu().since(host_start, window.as_secs_f64());
        let window_end_usage = tree(&mut probe);
        let switches_end = proxy_pid.and_then(probe::context_switches);
        if let (Some(start), Some(end)) = (switches_start, switches_end) {
            proxy_usage.context_switches_window = end.saturating_sub(start);
        }
        proxy_usage.rss_peak = peak_rss.max(window_end_usage.rss_bytes);
        proxy_usage.cpu_window_s = window_end_usage
            .cpu_ms
            .saturating_sub(window_start_usage.cpu_ms) as f64
            / 1000.0;

        // Let sessions finish the message in flight, bounded.
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            sessions.abort_all();
        }
        (
            window,
            window_wall,
            own_end.saturating_sub(own_start) as f64 / 1e6,
            host,
            cut_short,
        )
    };
    let finished = tokio::select! {
        result = run => Some(result),
        _ = interrupted() => None,
    };
    shared.set_phase(Phase::Stop);
    // The pacers let their messages in flight come back (bounded), then end.
    let pacer = match pacers {
        Some(pacers) => tokio::task::spawn_blocking(move || pacers.join())
            .await
            .ok(),
        None => None,
    };
    let control = tokio::task::spawn_blocking(move || control.join())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_else(histogram);
    let Some((window, window_wall, loadgen_cpu_s, host, cut_short)) = finished else {
        return Err(Interrupted);
    };
    kernel.tcp_mem_peak = peak_tcp;
    if let Some(report) = &pacer {
        let _ = lock(&shared.histograms.rtt).add(&report.rtt);
        let _ = lock(&shared.histograms.service).add(&report.service);
    }
    Ok(Measured {
        shared,
        window,
        proxy: proxy_usage,
        kernel,
        loadgen_cpu_s,
        proxy_died: None,
        pacer,
        control,
        host,
        window_wall,
        ramp_cut_short: cut_short,
        memory,
    })
}
