//! `loadgen`: opens N concurrent SOCKS5 sessions through the proxy to a loopback echo target
//! and measures throughput, latency, and the proxy's memory and CPU.

mod echo;
mod plot;
mod record;
mod stack;
mod workload;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use record::{
    EncodedHistograms, KernelUsage, Latencies, LoadgenUsage, Messages, Percentiles, ProxyUsage,
    Record, RunConfig, Sessions,
};
use stack::{ChildProcess, ProcessProbe};
use workload::{lock, Phase, Plan, Shared};

/// Descriptors loadgen and the echo target keep besides one per session.
const DESCRIPTOR_MARGIN: u64 = 64;

/// Opens N concurrent SOCKS5 sessions through a proxy to a loopback echo target and measures
/// throughput, latency (HdrHistogram), and the proxy's memory and CPU.
///
/// Starts the echo target and (unless --proxy is given) the workspace's `proxy` binary as
/// child processes, ramps the sessions, holds them idle, then runs the workload: closed loop
/// (one message outstanding per session) or open loop (--rate). Writes
/// results/runs/<stamp>-<label>-c<conns>.json, .hgrm histograms beside it, and a row in
/// results/summary.csv.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Sub>,

    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Internal: the echo target process.
    #[command(hide = true)]
    Echo {
        /// Addresses to listen on.
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
        /// Runtime threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Draw the c10k charts (SVG and PNG) and results/README.md from stored records, without
    /// running anything.
    Plot {
        /// Directory holding runs/ (charts/ and README.md are written there).
        #[arg(long, default_value = "results")]
        results: PathBuf,
        /// Only records of this sweep (`--tag` of the runs) [default: every record].
        #[arg(long)]
        tag: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Concurrent sessions to open.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    conns: u64,

    /// Proxy mode to start (threads, select, poll, epoll, epoll-et, async), or `direct` for
    /// no proxy (the physical baseline).
    #[arg(long, default_value = "async")]
    mode: String,

    /// Measure an external SOCKS5 server at HOST:PORT instead of starting one.
    #[arg(long, value_name = "HOST:PORT")]
    proxy: Option<SocketAddr>,

    /// The external server's PID (it and its descendants are measured).
    #[arg(long, requires = "proxy")]
    proxy_pid: Option<u32>,

    /// Name for the run in records and charts [default: the mode, or "external"].
    #[arg(long)]
    label: Option<String>,

    /// Proxy worker processes [default: as many as the descriptor limit requires].
    #[arg(long)]
    workers: Option<u16>,

    /// Proxy threads (passed to --threads).
    #[arg(long)]
    threads: Option<u16>,

    /// Sessions opened per second during the ramp.
    #[arg(long, default_value_t = 2000.0)]
    ramp_rate: f64,

    /// Dials (connect + handshake) in flight at most.
    #[arg(long, default_value_t = 256)]
    max_dials: usize,

    /// Username:password for RFC 1929 (also given to the proxy loadgen starts).
    #[arg(long, value_name = "USER:PASS")]
    auth: Option<String>,

    /// Bytes per message.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    size: u64,

    /// Measured window (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = proxy::config::parse_duration)]
    duration: Duration,

    /// Warm-up before the window, not counted.
    #[arg(long, default_value = "2s", value_parser = proxy::config::parse_duration)]
    warmup: Duration,

    /// How long all sessions are held idle after the ramp (idle memory is sampled at its end).
    #[arg(long, default_value = "2s", value_parser = proxy::config::parse_duration)]
    idle_hold: Duration,

    /// Open loop: total messages per second, spread evenly over the sessions; latency is
    /// measured from each message's scheduled send time. Default: closed loop.
    #[arg(long)]
    rate: Option<f64>,

    /// Source addresses 127.0.0.1..=127.0.0.K that sessions are spread over
    /// [default: one per 8,000 sessions].
    #[arg(long)]
    sources: Option<u8>,

    /// Limit for one dial and for one message round trip.
    #[arg(long, default_value = "30s", value_parser = proxy::config::parse_duration)]
    io_timeout: Duration,

    /// Directory for records.
    #[arg(long, default_value = "results")]
    results: PathBuf,

    /// A name stored in the record, grouping the runs of one sweep.
    #[arg(long)]
    tag: Option<String>,

    /// loadgen's own runtime threads [default: 1 for open loop, where one thread keeps up and
    /// avoids cross-thread wake-ups; every core for closed loop].
    #[arg(long)]
    loadgen_threads: Option<usize>,

    /// Do not write a record (still prints the summary).
    #[arg(long)]
    no_record: bool,

    /// The proxy binary [default: `proxy` beside this executable].
    #[arg(long)]
    proxy_bin: Option<PathBuf>,

    /// No progress bar or status lines.
    #[arg(long, short)]
    quiet: bool,

    /// Print the record as JSON on stdout (implies --quiet).
    #[arg(long)]
    json: bool,
}

/// Raises the soft descriptor limit to the hard limit; returns the soft limit.
pub fn raise_nofile_limit() -> u64 {
    proxy::net::limits::raise_nofile_limit().unwrap_or_else(|_| proxy::net::limits::nofile_limit())
}

const MODES: [&str; 7] = [
    "direct", "threads", "select", "poll", "epoll", "epoll-et", "async",
];

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Sub::Echo { listen, threads }) = &args.command {
        return match echo::run(listen, *threads) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("loadgen echo: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Sub::Plot { results, tag }) = &args.command {
        return match plot::plot(results, tag.as_deref()) {
            Ok(files) => {
                for file in files {
                    println!("{}", file.display());
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("loadgen plot: {err:#}");
                ExitCode::from(2)
            }
        };
    }
    match run(args.run) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("loadgen: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// What the descriptor limits allow; fails before anything is opened when a run cannot fit.
fn plan_descriptors(args: &RunArgs, external: bool) -> anyhow::Result<usize> {
    let limit = raise_nofile_limit();
    let conns = args.conns;
    let needed = conns + DESCRIPTOR_MARGIN;
    if needed > limit {
        bail!(
            "{conns} sessions need {needed} descriptors in loadgen (and as many in its echo \
             target), but RLIMIT_NOFILE allows {limit}. Raise the hard limit (`ulimit -Hn`, \
             /etc/security/limits.conf, or LimitNOFILE= for a service; it needs root or \
             CAP_SYS_RESOURCE), or use fewer --conns."
        );
    }
    if external || args.mode == "direct" {
        return Ok(0);
    }
    let per_worker = proxy::net::limits::sessions_for_descriptors(limit).max(1);
    let required = conns.div_ceil(per_worker) as usize;
    match args.workers {
        Some(workers) if (workers as usize) < required => {
            eprintln!(
                "loadgen: note: {conns} sessions need {required} proxy workers at {per_worker} \
                 sessions each (descriptor limit {limit}); with --workers {workers} the proxy \
                 will refuse some"
            );
            Ok(workers as usize)
        }
        Some(workers) => Ok(workers as usize),
        None => {
            if required > 1 {
                eprintln!(
                    "loadgen: {conns} sessions need 2 descriptors each in the proxy; one process \
                     holds {per_worker} (limit {limit}), so the proxy runs with --workers {required}"
                );
            }
            Ok(required)
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let quiet = args.quiet || args.json;
    let external = args.proxy.is_some();
    if !external && !MODES.contains(&args.mode.as_str()) {
        bail!(
            "unknown --mode '{}'; one of: {}",
            args.mode,
            MODES.join(", ")
        );
    }
    let conns = args.conns as usize;
    let workers = plan_descriptors(&args, external)?;
    let auth = match &args.auth {
        Some(spec) => {
            let (name, pass) = spec.split_once(':').context("--auth must be USER:PASS")?;
            Some((name.to_owned(), pass.to_owned()))
        }
        None => None,
    };
    let sources_count = args
        .sources
        .map_or_else(|| conns.div_ceil(8000).clamp(1, 250), usize::from)
        .max(1);
    let sources: Vec<Ipv4Addr> = (0..sources_count)
        .map(|i| Ipv4Addr::new(127, 0, 0, 1 + i as u8))
        .collect();

    // The echo target: one address per source address, so proxy→echo connections spread too.
    let exe = std::env::current_exe()?;
    let mut echo_cmd = Command::new(&exe);
    echo_cmd.arg("echo").args(["--threads", "1"]);
    for i in 0..sources_count {
        echo_cmd.args(["--listen", &format!("127.0.1.{}:0", 1 + i)]);
    }
    let echo = ChildProcess::spawn("echo target", echo_cmd)?;

    // The proxy.
    let mut proxy_child = None;
    let (proxy_addr, proxy_pid, label) = if let Some(addr) = args.proxy {
        (
            Some(addr),
            args.proxy_pid,
            args.label.clone().unwrap_or_else(|| "external".into()),
        )
    } else if args.mode == "direct" {
        (None, None, "direct".to_owned())
    } else {
        let binary = stack::proxy_binary(args.proxy_bin.as_deref())?;
        let mut cmd = Command::new(binary);
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--mode",
            &args.mode,
            "--log-level",
            "warn",
        ]);
        cmd.args(["--workers", &workers.max(1).to_string()]);
        // Sessions are held idle on purpose; a tight handshake budget is not the point.
        cmd.args([
            "--handshake-timeout",
            "60s",
            "--connect-timeout",
            "60s",
            "--grace",
            "2s",
        ]);
        if let Some(threads) = args.threads {
            cmd.args(["--threads", &threads.to_string()]);
        }
        if let Some(spec) = &args.auth {
            cmd.args(["--user", spec]);
        }
        let child = ChildProcess::spawn("proxy", cmd)?;
        let addr = child
            .addrs
            .first()
            .copied()
            .context("proxy printed no address")?;
        let pid = child.pid();
        proxy_child = Some(child);
        (
            Some(addr),
            Some(pid),
            args.label.clone().unwrap_or_else(|| args.mode.clone()),
        )
    };
    if !quiet {
        eprintln!(
            "loadgen: {label}: {conns} sessions, echo pid {}{}",
            echo.pid(),
            proxy_pid.map_or(String::new(), |p| format!(", proxy pid {p}"))
        );
    }

    let plan = Arc::new(Plan {
        conns,
        proxy: proxy_addr,
        echo: echo.addrs.clone(),
        sources: sources.clone(),
        auth,
        size: args.size as usize,
        rate: args.rate,
        io_timeout: args.io_timeout,
    });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let loadgen_threads = args
        .loadgen_threads
        .unwrap_or(if args.rate.is_some() { 1 } else { cores })
        .max(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(loadgen_threads)
        .enable_all()
        .build()?;
    let (started_at, stamp) = record::utc_now();
    let outcome = runtime.block_on(drive(
        &args,
        plan.clone(),
        proxy_pid,
        proxy_child.as_mut(),
        quiet,
    ));
    let measured = match outcome {
        Ok(measured) => measured,
        Err(Interrupted) => {
            eprintln!("loadgen: interrupted; stopping the echo target and the proxy");
            drop(proxy_child);
            drop(echo);
            return Ok(ExitCode::from(130));
        }
    };
    // Stop the proxy and the echo target before writing anything (no orphans on any path).
    if let Some(child) = proxy_child.as_mut() {
        child.stop(Duration::from_secs(10));
    }
    drop(proxy_child);
    drop(echo);

    let record = build_record(&args, &plan, &label, workers, started_at, measured)?;
    let histograms = record_histograms(&record)?;
    if !args.no_record {
        let named: Vec<(&str, &hdrhistogram::Histogram<u64>)> =
            histograms.iter().map(|(n, h)| (*n, h)).collect();
        let path = record::write(&args.results, &stamp, &record, &named)?;
        if !quiet {
            eprintln!("loadgen: record written to {}", path.display());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        print_summary(&record);
    }
    Ok(if record.outcome == "ok" {
        ExitCode::SUCCESS
    } else {
        eprintln!("loadgen: run failed: {}", record.outcome);
        ExitCode::from(1)
    })
}

/// The run was interrupted by Ctrl-C or SIGTERM.
struct Interrupted;

/// Everything measured while the sessions ran.
struct Measured {
    shared: Arc<Shared>,
    window: Duration,
    proxy: ProxyUsage,
    kernel: KernelUsage,
    loadgen_cpu_s: f64,
    proxy_died: Option<String>,
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

async fn drive(
    args: &RunArgs,
    plan: Arc<Plan>,
    proxy_pid: Option<u32>,
    proxy_child: Option<&mut ChildProcess>,
    quiet: bool,
) -> Result<Measured, Interrupted> {
    let shared = Shared::new();
    let mut probe = ProcessProbe::new();
    let mut proxy_usage = ProxyUsage::default();
    let mut kernel = KernelUsage::default();
    let tree = |probe: &mut ProcessProbe| proxy_pid.map(|pid| probe.tree(pid)).unwrap_or_default();
    let mut proxy_child = proxy_child;

    let before = tree(&mut probe);
    proxy_usage.rss_before = before.rss_bytes;
    proxy_usage.processes = before.processes;
    kernel.tcp_mem_before = stack::kernel_tcp().1;

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
        let start = tokio::time::Instant::now();
        let spacing = Duration::from_secs_f64(1.0 / args.ramp_rate.max(1.0));
        for id in 0..plan.conns {
            tokio::time::sleep_until(start + spacing * id as u32).await;
            let Ok(permit) = dials.clone().acquire_owned().await else {
                break;
            };
            sessions.spawn(workload::session(id, plan.clone(), shared.clone(), permit));
            if id % 64 == 0 {
                bar.set_position(shared.dialed.load(Ordering::Relaxed));
                bar.set_message(format!("{} failed", shared.failed()));
            }
        }
        while (shared.dialed.load(Ordering::Relaxed) as usize) < plan.conns {
            tokio::time::sleep(Duration::from_millis(50)).await;
            bar.set_position(shared.dialed.load(Ordering::Relaxed));
            bar.set_message(format!("{} failed", shared.failed()));
        }
        bar.finish_and_clear();
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
        shared.set_phase(Phase::Idle);
        tokio::time::sleep(args.idle_hold).await;
        let idle = tree(&mut probe);
        proxy_usage.rss_idle = idle.rss_bytes;
        proxy_usage.processes = idle.processes;
        let (sockets, mem) = stack::kernel_tcp();
        kernel.tcp_mem_idle = mem;
        kernel.tcp_sockets_idle = sockets;

        // Warm-up, then the measured window, with a status line every second.
        shared.set_phase(Phase::Warmup);
        tokio::time::sleep(args.warmup).await;
        let window_start_usage = tree(&mut probe);
        let own_start = stack::own_cpu_ms();
        shared.set_phase(Phase::Measure);
        let window_start = tokio::time::Instant::now();
        let mut peak_rss = window_start_usage.rss_bytes;
        let mut peak_tcp = stack::kernel_tcp().1;
        let mut last_messages = shared.messages_total.load(Ordering::Relaxed);
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        while window_start.elapsed() < args.duration {
            let left = args.duration.saturating_sub(window_start.elapsed());
            tokio::select! {
                _ = ticker.tick() => {}
                _ = tokio::time::sleep(left) => break,
            }
            let usage = tree(&mut probe);
            peak_rss = peak_rss.max(usage.rss_bytes);
            peak_tcp = peak_tcp.max(stack::kernel_tcp().1);
            let total = shared.messages_total.load(Ordering::Relaxed);
            if !quiet {
                let p99 = lock(&shared.histograms.rtt).value_at_quantile(0.99);
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
        }
        let window = window_start.elapsed();
        let window_end_usage = tree(&mut probe);
        let own_end = stack::own_cpu_ms();
        shared.set_phase(Phase::Stop);
        proxy_usage.rss_peak = peak_rss.max(window_end_usage.rss_bytes);
        proxy_usage.cpu_window_s = window_end_usage
            .cpu_ms
            .saturating_sub(window_start_usage.cpu_ms) as f64
            / 1000.0;
        kernel.tcp_mem_peak = peak_tcp;

        // Let sessions finish the message in flight, bounded.
        let drained = tokio::time::timeout(Duration::from_secs(10), async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            sessions.abort_all();
        }
        (window, (own_end.saturating_sub(own_start)) as f64 / 1000.0)
    };
    let (window, loadgen_cpu_s) = tokio::select! {
        result = run => result,
        _ = interrupted() => {
            shared.set_phase(Phase::Stop);
            return Err(Interrupted);
        }
    };
    let proxy_died = proxy_child.as_mut().and_then(|child| child.exited());
    Ok(Measured {
        shared,
        window,
        proxy: proxy_usage,
        kernel,
        loadgen_cpu_s,
        proxy_died,
    })
}

fn build_record(
    args: &RunArgs,
    plan: &Plan,
    label: &str,
    workers: usize,
    started_at: String,
    measured: Measured,
) -> anyhow::Result<Record> {
    let shared = &measured.shared;
    let established = shared.established.load(Ordering::Relaxed);
    let messages = shared.messages.load(Ordering::Relaxed);
    let window_s = measured.window.as_secs_f64();
    let mut proxy = measured.proxy;
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
    let corrupted = shared.corrupted.load(Ordering::Relaxed);
    let dropped = lock(&shared.dropped).clone();
    let dropped_total: u64 = dropped.values().sum();
    let outcome = if corrupted > 0 {
        format!("data corruption: {corrupted} echoed messages differed from what was sent")
    } else if let Some(status) = &measured.proxy_died {
        format!("the proxy died during the run ({status})")
    } else if dropped_total > 0 {
        format!("{dropped_total} established sessions were dropped mid-run ({dropped:?}): bytes in flight were lost")
    } else {
        "ok".to_owned()
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let loadgen = LoadgenUsage {
        cpu_window_s: measured.loadgen_cpu_s,
        maybe_bottleneck: window_s > 0.0 && measured.loadgen_cpu_s / window_s > 0.8 * cores,
    };
    let handshake = lock(&shared.histograms.handshake).clone();
    let rtt = lock(&shared.histograms.rtt).clone();
    let service = lock(&shared.histograms.service).clone();
    Ok(Record {
        schema_version: record::SCHEMA_VERSION,
        started_at,
        host: record::Host::current(),
        git_revision: record::git_revision(),
        config: RunConfig {
            mode: if args.proxy.is_some() {
                "external".into()
            } else {
                args.mode.clone()
            },
            label: label.to_owned(),
            conns: plan.conns,
            workers,
            threads: args.threads.map(usize::from),
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
            loadgen_threads: args
                .loadgen_threads
                .unwrap_or(if args.rate.is_some() {
                    1
                } else {
                    cores as usize
                })
                .max(1),
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
            per_second: if window_s > 0.0 {
                messages as f64 / window_s
            } else {
                0.0
            },
            bytes_per_second: if window_s > 0.0 {
                (messages * plan.size as u64) as f64 / window_s
            } else {
                0.0
            },
            corrupted,
        },
        latency_us: Latencies {
            handshake: Percentiles::of(&handshake),
            rtt: Percentiles::of(&rtt),
            service: plan.rate.map(|_| Percentiles::of(&service)),
        },
        proxy,
        kernel: measured.kernel,
        loadgen,
        outcome,
        histograms: EncodedHistograms {
            handshake: record::encode(&handshake)?,
            rtt: record::encode(&rtt)?,
            service: plan.rate.map(|_| record::encode(&service)).transpose()?,
        },
    })
}

fn record_histograms(
    record: &Record,
) -> anyhow::Result<Vec<(&'static str, hdrhistogram::Histogram<u64>)>> {
    let mut out = vec![
        ("handshake", record::decode(&record.histograms.handshake)?),
        ("rtt", record::decode(&record.histograms.rtt)?),
    ];
    if let Some(service) = &record.histograms.service {
        out.push(("service", record::decode(service)?));
    }
    Ok(out)
}

fn print_summary(record: &Record) {
    let c = &record.config;
    let s = &record.sessions;
    let m = &record.messages;
    let p = &record.proxy;
    let l = &record.latency_us;
    let kib = |b: f64| b / 1024.0;
    println!();
    println!(
        "{} · {} sessions · {} B messages · {}",
        c.label,
        c.conns,
        c.size,
        c.rate
            .map_or("closed loop".to_owned(), |r| format!("open loop {r} msg/s"))
    );
    println!(
        "  sessions     {} established, {} failed {:?}, {} dropped",
        s.established,
        s.failed,
        s.failures,
        s.dropped.values().sum::<u64>()
    );
    println!(
        "  throughput   {:.0} msg/s, {:.2} MB/s each way over {:.1} s",
        m.per_second,
        m.bytes_per_second / 1e6,
        m.window_s
    );
    println!(
        "  round trip   p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs",
        l.rtt.p50, l.rtt.p90, l.rtt.p99, l.rtt.p999, l.rtt.max
    );
    if let Some(service) = &l.service {
        println!(
            "  service      p50 {} µs  p99 {} µs  p99.9 {} µs  (from the actual write)",
            service.p50, service.p99, service.p999
        );
    }
    println!(
        "  handshake    p50 {} µs  p99 {} µs  max {} µs",
        l.handshake.p50, l.handshake.p99, l.handshake.max
    );
    if c.mode != "direct" {
        println!(
            "  proxy RSS    {:.0} KiB before, {:.0} KiB idle, {:.0} KiB peak: {:.0} B/session idle, {:.0} B/session peak ({} processes)",
            kib(p.rss_before as f64),
            kib(p.rss_idle as f64),
            kib(p.rss_peak as f64),
            p.rss_per_session_idle,
            p.rss_per_session_peak,
            p.processes
        );
        println!(
            "  proxy CPU    {:.2} s in the ramp, {:.2} s in the window: {:.1} µs per message",
            p.cpu_ramp_s, p.cpu_window_s, p.cpu_us_per_message
        );
    }
    println!(
        "  kernel TCP   {:.0} KiB before, {:.0} KiB idle, {:.0} KiB peak ({} sockets idle)",
        kib(record.kernel.tcp_mem_before as f64),
        kib(record.kernel.tcp_mem_idle as f64),
        kib(record.kernel.tcp_mem_peak as f64),
        record.kernel.tcp_sockets_idle
    );
    println!(
        "  loadgen CPU  {:.2} s in the window{}",
        record.loadgen.cpu_window_s,
        if record.loadgen.maybe_bottleneck {
            "  (WARNING: loadgen may be the bottleneck)"
        } else {
            ""
        }
    );
    println!("  outcome      {}", record.outcome);
}
