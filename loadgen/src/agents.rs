//! A run too large for one process: the parent starts the echo target and the proxy once,
//! then K agent processes of itself (`--segment I/K`, one shared `--start-at`), shows their
//! progress as one, stops them all on an error or Ctrl-C, and merges their records.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::cli::{RunArgs, Target};
use crate::merge;
use crate::probe::ProcessProbe;
use crate::record::{self, Record};
use crate::report;
use crate::segment::Segment;
use crate::stack::{Resources, Stack};

/// Time the agents get to start before the shared start, beyond this per agent.
const START_AHEAD: Duration = Duration::from_secs(3);
const START_AHEAD_PER_AGENT: Duration = Duration::from_millis(200);

/// How agents report progress to their parent: one line on stderr, `PREFIX` + JSON.
pub mod status {
    use std::sync::atomic::Ordering;

    use serde::{Deserialize, Serialize};

    use crate::measure::{Phase, Shared};

    /// The start of a status line.
    pub const PREFIX: &str = "loadgen-agent-status ";

    /// An agent's counters now.
    #[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
    pub struct Status {
        /// Phase (0 ramp, 1 idle, 3 measuring).
        pub phase: u8,
        /// Dials finished.
        pub dialed: u64,
        /// Sessions established.
        pub established: u64,
        /// Dials failed.
        pub failed: u64,
        /// Round trips completed (any phase).
        pub messages_total: u64,
        /// Established sessions dropped.
        pub dropped: u64,
    }

    /// Prints the agent's status line.
    pub fn emit(shared: &Shared, phase: Phase) {
        let status = Status {
            phase: phase as u8,
            dialed: shared.dialed.load(Ordering::Relaxed),
            established: shared.established.load(Ordering::Relaxed),
            failed: shared.failed(),
            messages_total: shared.messages_total.load(Ordering::Relaxed),
            dropped: shared.dropped_total(),
        };
        if let Ok(json) = serde_json::to_string(&status) {
            eprintln!("{PREFIX}{json}");
        }
    }

    /// Reads a status line; `None` for any other line.
    pub fn parse(line: &str) -> Option<Status> {
        serde_json::from_str(line.strip_prefix(PREFIX)?).ok()
    }
}

/// The run settings every agent of a run is given, wherever it runs: the parent's flags,
/// the shared start, and the echo target (`count` agents share `--max-dials`). The caller
/// adds `--segment` and where the record goes.
pub fn shared_agent_args(
    args: &RunArgs,
    label: &str,
    echo: &[SocketAddr],
    count: u32,
    start_at: SystemTime,
) -> Vec<String> {
    let micros = |d: Duration| format!("{}us", d.as_micros());
    let mut out: Vec<String> = vec![
        "--conns".into(),
        args.conns.to_string(),
        "--start-at".into(),
        format!("{:.6}", record::unix_seconds(start_at)),
        "--label".into(),
        label.to_owned(),
        "--size".into(),
        args.size.to_string(),
        "--duration".into(),
        micros(args.duration),
        "--warmup".into(),
        micros(args.warmup),
        "--idle-hold".into(),
        micros(args.idle_hold),
        "--ramp-rate".into(),
        args.ramp_rate.to_string(),
        "--max-dials".into(),
        args.max_dials.div_ceil(count as usize).max(1).to_string(),
        "--io-timeout".into(),
        micros(args.io_timeout),
        "--pacer".into(),
        args.pacer.name().into(),
        "--arrivals".into(),
        args.arrivals.name().into(),
        "--pacer-threads".into(),
        args.pacer_threads.to_string(),
        "--seed".into(),
        args.seed.to_string(),
        "--echo".into(),
        echo.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    ];
    if let Some(sources) = args.sources {
        out.extend(["--sources".into(), sources.to_string()]);
    }
    if let Some(rate) = args.rate {
        out.extend(["--rate".into(), rate.to_string()]);
    }
    if let Some(tag) = &args.tag {
        out.extend(["--tag".into(), tag.clone()]);
    }
    if let Some(threads) = args.loadgen_threads {
        out.extend(["--loadgen-threads".into(), threads.to_string()]);
    }
    if let Some(auth) = &args.auth {
        out.extend(["--auth".into(), auth.clone()]);
    }
    if let Some(version) = &args.proxy_version {
        out.extend(["--proxy-version".into(), version.clone()]);
    }
    if let Some(started_with) = &args.proxy_started_with {
        out.extend(["--proxy-started-with".into(), started_with.clone()]);
    }
    out
}

/// The command line of agent `segment` run by this parent: the shared settings, the echo
/// target and proxy the parent started, its record on stdout and its progress on stderr.
/// Agent 0 also measures the proxy's and the echo target's processes (once for the run).
fn agent_args(
    args: &RunArgs,
    stack: &Stack,
    segment: Segment,
    start_at: SystemTime,
) -> Vec<String> {
    let mut out = shared_agent_args(
        args,
        &stack.label,
        &stack.echo_addrs,
        segment.count,
        start_at,
    );
    out.extend([
        "--segment".into(),
        segment.to_string(),
        "--json".into(),
        "--no-record".into(),
        "--agent-status".into(),
    ]);
    match stack.proxy_addr {
        Some(proxy) => {
            out.extend(["--proxy".into(), proxy.to_string()]);
            if segment.index == 0 {
                if let Some(pid) = stack.proxy_pid {
                    out.extend(["--proxy-pid".into(), pid.to_string()]);
                }
            }
        }
        None => out.extend(["--mode".into(), Target::Direct.name().into()]),
    }
    let echo_pids = stack.echo_pids(args);
    if segment.index == 0 && !echo_pids.is_empty() {
        let pids: Vec<String> = echo_pids.iter().map(ToString::to_string).collect();
        out.extend(["--echo-pid".into(), pids.join(",")]);
    }
    out
}

/// Every agent, once all have exited, and the first that failed without a record.
struct AllFinished {
    agents: Vec<Finished>,
    first_failure: Option<String>,
}

/// What one agent left behind.
struct Finished {
    segment: Segment,
    code: Option<i32>,
    stdout: String,
}

/// Sends SIGTERM to every agent still running.
fn terminate(children: &[Option<u32>]) {
    for pid in children.iter().flatten() {
        if let Some(pid) = rustix::process::Pid::from_raw(*pid as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
    }
}

/// Runs one measured run as `resources.agents` agents; 0 when it succeeded, 1 when it ran
/// but failed, 130 when interrupted.
pub fn run(args: &RunArgs, resources: &Resources) -> anyhow::Result<ExitCode> {
    let agents = resources.agents as u32;
    let quiet = args.is_quiet();
    let mut stack = Stack::start(args, resources)?;
    if !quiet {
        eprintln!(
            "loadgen: {}: {} sessions as {agents} agents, {} echo processes{}",
            stack.label,
            args.conns,
            stack.echo.len(),
            stack.proxy_pid.map_or(String::new(), |p| format!(
                ", proxy pid {p} ({} workers)",
                resources.workers
            ))
        );
    }
    let start_at = args
        .start_at
        .unwrap_or_else(|| SystemTime::now() + START_AHEAD + START_AHEAD_PER_AGENT * agents);
    let (started_at, stamp) = record::utc_now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let finished = runtime.block_on(drive_agents(args, &stack, agents, start_at))?;
    let Some(finished) = finished else {
        eprintln!("loadgen: interrupted; stopping the agents, the echo target and the proxy");
        // Agents first (dropping the runtime kills any still running), then the proxy and
        // the echo target.
        drop(runtime);
        drop(stack);
        return Ok(ExitCode::from(130));
    };
    let proxy_died = stack.proxy_exited();
    let label = stack.label.clone();
    stack.stop();

    // Every agent must have left a record; one that failed before (exit 2) fails the run.
    if let Some(first) = &finished.first_failure {
        bail!("{first}; the run has no record (the agents' messages are above)");
    }
    let mut records = Vec::new();
    for agent in &finished.agents {
        if !matches!(agent.code, Some(0 | 1)) {
            bail!(
                "agent {} exited with {:?} and no record (its messages are above)",
                agent.segment,
                agent.code
            );
        }
        let record: Record = serde_json::from_str(&agent.stdout)
            .with_context(|| format!("agent {} printed no record", agent.segment))?;
        records.push((agent.segment, record));
    }
    let mut named = Vec::new();
    let segments_dir = if args.no_record {
        PathBuf::new()
    } else {
        new_dir(
            &args.results.join("runs").join("segments"),
            &format!("{stamp}-{label}-c{}", args.conns),
        )?
    };
    for (segment, record) in records {
        let name = if args.no_record {
            format!("agent {segment}")
        } else {
            write_agent_record(&segments_dir, segment, &record)?
                .display()
                .to_string()
        };
        named.push((name, record));
    }
    let mut merged = merge::merge(named)?;
    merged.started_at = started_at;
    merged.config.command = std::env::args().collect();
    merged.config.mode = if args.proxy.is_some() {
        "external".into()
    } else {
        args.mode.name().to_owned()
    };
    merged.config.workers = resources.workers;
    merged.config.threads = resources.proxy_threads;
    merged.config.ramp_rate = args.ramp_rate;
    merged.config.max_dials = args.max_dials;
    if args.proxy.is_none() {
        merged.config.external = None;
    }
    if let Some(status) = proxy_died {
        merged.outcome = record::Outcome::ProxyDied(status);
    }
    finish(args, &merged, &stamp)
}

/// Creates `parent/base` (or `base-2`, `base-3`, … if taken: two runs can end within the
/// stamp's second) and returns it.
fn new_dir(parent: &Path, base: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    for attempt in 1..=1000 {
        let dir = match attempt {
            1 => parent.join(base),
            n => parent.join(format!("{base}-{n}")),
        };
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(err) => {
                return Err(err).with_context(|| format!("cannot create {}", dir.display()))
            }
        }
    }
    bail!(
        "{} already holds 1000 directories named {base}",
        parent.display()
    )
}

/// Writes agent `segment`'s record under `dir`.
fn write_agent_record(dir: &Path, segment: Segment, record: &Record) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("agent-{}-of-{}.json", segment.index, segment.count));
    std::fs::write(&path, serde_json::to_string_pretty(record)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Writes the merged record (unless --no-record) and prints it; the run's exit code.
fn finish(args: &RunArgs, merged: &Record, stamp: &str) -> anyhow::Result<ExitCode> {
    if !args.no_record {
        let path = record::write(&args.results, stamp, merged)?;
        report::write_hgrms(&path, &record::histograms(merged)?)?;
        report::append_summary(&args.results, merged, &path)?;
        if !args.is_quiet() {
            eprintln!(
                "loadgen: merged record of {} agents written to {} (theirs under {})",
                merged.config.segments.len(),
                path.display(),
                args.results.join("runs").join("segments").display()
            );
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(merged)?);
    } else {
        report::print_summary(merged);
    }
    Ok(if merged.outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        eprintln!("loadgen: run failed: {}", merged.outcome);
        ExitCode::from(1)
    })
}

/// Starts the agents and follows them to the end: `None` if interrupted. An agent that fails
/// before its record stops every other.
async fn drive_agents(
    args: &RunArgs,
    stack: &Stack,
    agents: u32,
    start_at: SystemTime,
) -> anyhow::Result<Option<AllFinished>> {
    use tokio::signal::unix::{signal, SignalKind};
    let exe = std::env::current_exe()?;
    let (lines_tx, mut lines) = mpsc::unbounded_channel::<(u32, String)>();
    let mut running = JoinSet::new();
    let mut pids = Vec::new();
    for index in 0..agents {
        let segment = Segment {
            index,
            count: agents,
        };
        let mut child: Child = Command::new(&exe)
            .args(agent_args(args, stack, segment, start_at))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start agent {segment}"))?;
        pids.push(child.id());
        let stderr = child.stderr.take().context("agent has no stderr")?;
        let mut stdout = child.stdout.take().context("agent has no stdout")?;
        let tx = lines_tx.clone();
        running.spawn(async move {
            let forward = async {
                // Bytes, not lines: a line that is not UTF-8 must not stop the draining.
                let mut reader = BufReader::new(stderr);
                let mut line = Vec::new();
                while reader
                    .read_until(b'\n', &mut line)
                    .await
                    .is_ok_and(|n| n > 0)
                {
                    let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                    let _ = tx.send((index, text));
                    line.clear();
                }
            };
            let mut out = String::new();
            let read = stdout.read_to_string(&mut out);
            let (_, _) = tokio::join!(forward, read);
            let code = child.wait().await.ok().and_then(|s| s.code());
            Finished {
                segment,
                code,
                stdout: out,
            }
        });
    }
    drop(lines_tx);

    let quiet = args.is_quiet();
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(args.conns);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "ramp {bar:40} {pos}/{len} dialed by {msg} [{elapsed}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(format!("{agents} agents"));
        bar
    };
    let mut latest = vec![status::Status::default(); agents as usize];
    let mut last_messages = 0u64;
    let mut probe = ProcessProbe::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let (mut int, mut term) = (
        signal(SignalKind::interrupt())?,
        signal(SignalKind::terminate())?,
    );
    let mut finished = Vec::new();
    let mut first_failure = None;
    let mut lines_open = true;
    let mut measured_before = false;
    let mut interrupted = false;
    loop {
        tokio::select! {
            // Lines first: an agent's last words must be shown before its exit is acted on.
            biased;
            line = lines.recv(), if lines_open => {
                let Some((index, line)) = line else {
                    lines_open = false;
                    continue;
                };
                match status::parse(&line) {
                    Some(now) => latest[index as usize] = now,
                    None => bar.suspend(|| eprintln!("agent {index}/{agents}: {line}")),
                }
            }
            _ = ticker.tick() => {
                let dialed: u64 = latest.iter().map(|s| s.dialed).sum();
                let measuring = latest.iter().all(|s| s.phase >= 1);
                if !measuring {
                    bar.set_position(dialed);
                } else if !bar.is_finished() {
                    bar.finish_and_clear();
                }
                let total: u64 = latest.iter().map(|s| s.messages_total).sum();
                let was_measuring = measured_before;
                measured_before = latest.iter().any(|s| s.phase >= 3);
                // The first line in the window would count the warm-up's messages too.
                if was_measuring && !quiet {
                    let rss = stack.proxy_pid.map_or(0, |pid| probe.tree(pid).rss_bytes);
                    eprintln!(
                        "loadgen: {:>9} msg/s  established {}  failed {}  dropped {}  proxy rss {:.1} MiB",
                        total.saturating_sub(last_messages),
                        latest.iter().map(|s| s.established).sum::<u64>(),
                        latest.iter().map(|s| s.failed).sum::<u64>(),
                        latest.iter().map(|s| s.dropped).sum::<u64>(),
                        rss as f64 / (1 << 20) as f64
                    );
                }
                last_messages = total;
            }
            done = running.join_next() => {
                let Some(done) = done else { break };
                let agent = done.context("an agent's task failed")?;
                // Reaped: its PID may be reused, so it is never signalled again.
                pids[agent.segment.index as usize] = None;
                if !matches!(agent.code, Some(0 | 1)) && first_failure.is_none() {
                    let failure = format!("agent {} exited with {:?}", agent.segment, agent.code);
                    bar.suspend(|| eprintln!("loadgen: {failure}; stopping the others"));
                    first_failure = Some(failure);
                    terminate(&pids);
                }
                finished.push(agent);
            }
            _ = int.recv() => { interrupted = true; break; }
            _ = term.recv() => { interrupted = true; break; }
        }
    }
    bar.finish_and_clear();
    if interrupted {
        terminate(&pids);
        wait_all(&mut running).await;
        show_remaining(&mut lines, agents).await;
        return Ok(None);
    }
    show_remaining(&mut lines, agents).await;
    finished.sort_by_key(|f| f.segment);
    Ok(Some(AllFinished {
        agents: finished,
        first_failure,
    }))
}

/// Prints the agents' lines still queued (their stderr has closed, or they were stopped).
async fn show_remaining(lines: &mut mpsc::UnboundedReceiver<(u32, String)>, agents: u32) {
    while let Ok(Some((index, line))) =
        tokio::time::timeout(Duration::from_millis(200), lines.recv()).await
    {
        if status::parse(&line).is_none() {
            eprintln!("agent {index}/{agents}: {line}");
        }
    }
}

/// Waits (bounded) for every agent to exit; the rest are killed when their task is dropped.
async fn wait_all(running: &mut JoinSet<Finished>) {
    let _ = tokio::time::timeout(Duration::from_secs(15), async {
        while running.join_next().await.is_some() {}
    })
    .await;
    running.abort_all();
}
