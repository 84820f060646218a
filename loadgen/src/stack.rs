//! The processes under test: the echo target and the proxy, started as children (sized to
//! the descriptor limits) and stopped on every path, so no run leaves an orphan.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::cli::{RunArgs, Target};

/// Descriptors loadgen and the echo target keep besides one per session.
const DESCRIPTOR_MARGIN: u64 = 64;

/// How long a child has to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped: no orphans.
pub struct ChildProcess {
    /// What it is, for messages.
    pub name: &'static str,
    /// The process.
    pub child: Child,
    /// The addresses from its ready line.
    pub addrs: Vec<SocketAddr>,
}

impl ChildProcess {
    /// Starts `command` and waits for its `listening on ADDR…` line.
    pub fn spawn(name: &'static str, mut command: Command) -> anyhow::Result<Self> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start the {name}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the child never blocks on a full pipe.
            let mut sink = String::new();
            while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
        });
        let mut process = ChildProcess {
            name,
            child,
            addrs: Vec::new(),
        };
        let line = rx
            .recv_timeout(READY_TIMEOUT)
            .map_err(|_| anyhow!("the {name} did not get ready within {READY_TIMEOUT:?}"))?;
        let Some(ready) = proxy::net::listener::parse_ready_line(&line) else {
            let status = process.child.try_wait().ok().flatten();
            bail!("the {name} did not start (ready line {line:?}, status {status:?})");
        };
        process.addrs = ready.addrs;
        Ok(process)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` if it has exited.
    pub fn exited(&mut self) -> Option<String> {
        self.child
            .try_wait()
            .ok()
            .flatten()
            .map(|status| status.to_string())
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "loadgen: the {} did not stop within {grace:?}; killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// The `proxy` binary: `--proxy-bin`, else beside this executable.
pub fn proxy_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .join("proxy"),
    };
    if !path.is_file() {
        bail!(
            "proxy binary not found at {}: build it with `cargo build --release` (which builds \
             both loadgen and proxy), or pass --proxy-bin",
            path.display()
        );
    }
    Ok(path)
}

/// Raises the soft descriptor limit to the hard limit; returns the soft limit.
pub fn raise_nofile_limit() -> u64 {
    proxy::net::limits::raise_nofile_limit().unwrap_or_else(|_| proxy::net::limits::nofile_limit())
}

/// What a run's processes are given: agents, echo processes, proxy workers and the source
/// addresses sessions use.
#[derive(Debug, Clone)]
pub struct Resources {
    /// loadgen agent processes (1: this process runs every session itself).
    pub agents: usize,
    /// Echo target processes to start (0 when the echo target was given, as to an agent).
    pub echo_processes: usize,
    /// Listening addresses per echo process.
    pub echo_addrs_per_process: usize,
    /// Proxy worker processes (0 when loadgen does not start the proxy).
    pub workers: usize,
    /// Threads per proxy worker, when loadgen sets them (`--threads`, or 1 when there are
    /// more workers than cores); `None`: the proxy's default.
    pub proxy_threads: Option<usize>,
    /// Source addresses 127.0.0.1..; session i binds `sources[i % len]`.
    pub sources: Vec<Ipv4Addr>,
}

/// Sessions one process (an agent or an echo process) can hold under the descriptor limit.
pub fn sessions_per_process(limit: u64) -> u64 {
    limit.saturating_sub(DESCRIPTOR_MARGIN).max(1)
}

/// The `index`th echo address: 127.0.1.1, 127.0.1.2, …, 127.0.1.250, 127.0.2.1, …
pub fn echo_ip(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 1 + (index / 250) as u8, 1 + (index % 250) as u8)
}

/// Sizes a run to the descriptor limits; fails before anything is opened when it cannot fit.
pub fn plan(args: &RunArgs) -> anyhow::Result<Resources> {
    let limit = raise_nofile_limit();
    let conns = args.conns;
    let per_process = sessions_per_process(limit);
    let share = args.segment.share(conns as usize) as u64;
    let agents = if args.segment.is_split() {
        1
    } else {
        match args.agents {
            Some(agents) => agents as usize,
            None => conns.div_ceil(per_process) as usize,
        }
    };
    let own = if agents > 1 {
        conns.div_ceil(agents as u64)
    } else {
        share
    };
    if own + DESCRIPTOR_MARGIN > limit {
        bail!(
            "{own} sessions need {} descriptors in one loadgen process, but RLIMIT_NOFILE \
             allows {limit}: run them as more agents (--agents {}), raise the hard limit \
             (`ulimit -Hn`, /etc/security/limits.conf, or LimitNOFILE= for a service; it needs \
             root or CAP_SYS_RESOURCE), or use fewer --conns.",
            own + DESCRIPTOR_MARGIN,
            conns.div_ceil(per_process)
        );
    }
    let sources_count = args
        .sources
        .map_or_else(
            || (conns as usize).div_ceil(8000).clamp(1, 250),
            usize::from,
        )
        .max(1);
    // Extra source addresses only exist on loopback: a proxy (or echo target) on another
    // host is reached from the address the kernel routes from.
    let first_hop = args.proxy.or_else(|| args.echo.first().copied());
    let sources = if first_hop.is_some_and(|addr| !addr.ip().is_loopback()) {
        vec![Ipv4Addr::UNSPECIFIED]
    } else {
        (0..sources_count)
            .map(|i| Ipv4Addr::new(127, 0, 0, 1 + i as u8))
            .collect()
    };
    // Echo processes hold one socket per session each, under the same limit; one listening
    // address per source address at least (so the proxy's outgoing connections spread over
    // as many address pairs), the same number for each process.
    let (echo_processes, echo_addrs_per_process) = if args.echo.is_empty() {
        let processes = conns.div_ceil(per_process).max(1) as usize;
        (processes, sources_count.div_ceil(processes))
    } else {
        (0, 0)
    };
    let (workers, proxy_threads) = match args.mode {
        Target::Proxy(mode) if args.proxy.is_none() => {
            let mut threads = args
                .threads
                .map_or_else(|| mode.default_threads(), usize::from);
            // More workers than cores: one loop thread each, or the machine runs
            // workers × cores loops that only take turns.
            let needed = |threads| conns.div_ceil(mode.sessions_per_process(limit, threads).max(1));
            let workers = args.workers.map_or_else(|| needed(threads), u64::from);
            if args.threads.is_none()
                && threads > 1
                && workers > proxy::modes::default_threads() as u64
            {
                threads = 1;
            }
            let per_worker = mode.sessions_per_process(limit, threads).max(1);
            let explicit = args.threads.is_some() || threads != mode.default_threads();
            (
                proxy_workers(conns, limit, per_worker, args.workers),
                explicit.then_some(threads),
            )
        }
        _ => (0, None),
    };
    Ok(Resources {
        agents,
        echo_processes,
        echo_addrs_per_process,
        workers,
        proxy_threads,
        sources,
    })
}

/// Proxy workers for `conns` sessions at `per_worker` each (under the descriptor limit
/// `limit`), unless `asked`.
fn proxy_workers(conns: u64, limit: u64, per_worker: u64, asked: Option<u16>) -> usize {
    let required = conns.div_ceil(per_worker) as usize;
    match asked {
        Some(workers) if (workers as usize) < required => {
            eprintln!(
                "loadgen: note: {conns} sessions need {required} proxy workers at {per_worker} \
                 sessions each (descriptor limit {limit}); with --workers {workers} the proxy \
                 will refuse some"
            );
            workers as usize
        }
        Some(workers) => workers as usize,
        None => {
            if required > 1 {
                eprintln!(
                    "loadgen: one proxy process holds {per_worker} sessions (descriptor limit \
                     {limit}), so {conns} sessions run with --workers {required}"
                );
            }
            required
        }
    }
}

/// The processes under test, stopped (proxy first) when dropped.
pub struct Stack {
    /// The proxy loadgen started, if it started one.
    pub proxy: Option<ChildProcess>,
    /// The echo target processes loadgen started (none when it was given, as to an agent).
    pub echo: Vec<ChildProcess>,
    /// Every echo target address; session i uses `echo_addrs[i % len]`.
    pub echo_addrs: Vec<SocketAddr>,
    /// Where sessions connect: the proxy, or `None` to go straight to the echo target.
    pub proxy_addr: Option<SocketAddr>,
    /// The proxy process whose tree is measured.
    pub proxy_pid: Option<u32>,
    /// The run's name in records and charts.
    pub label: String,
}

impl Stack {
    /// Starts the echo target (one address per source address, so the proxy's outgoing
    /// connections spread too; as several processes when one cannot hold every session)
    /// and, unless the proxy is external or the run direct, the proxy.
    pub fn start(args: &RunArgs, resources: &Resources) -> anyhow::Result<Stack> {
        let exe = std::env::current_exe()?;
        let mut echo = Vec::new();
        let mut echo_addrs = args.echo.clone();
        for process in 0..resources.echo_processes {
            let mut echo_cmd = Command::new(&exe);
            echo_cmd.arg("echo").args(["--threads", "1"]);
            let first = process * resources.echo_addrs_per_process;
            for i in first..first + resources.echo_addrs_per_process {
                echo_cmd.args(["--listen", &format!("{}:0", echo_ip(i))]);
            }
            let child = ChildProcess::spawn("echo target", echo_cmd)?;
            echo_addrs.extend(child.addrs.iter().copied());
            echo.push(child);
        }
        let mut stack = Stack {
            proxy: None,
            echo,
            echo_addrs,
            proxy_addr: args.proxy,
            proxy_pid: args.proxy_pid,
            label: args.label.clone().unwrap_or_else(|| "external".into()),
        };
        if args.proxy.is_some() {
            return Ok(stack);
        }
        let Target::Proxy(mode) = args.mode else {
            stack.label = Target::Direct.name().to_owned();
            return Ok(stack);
        };
        let binary = proxy_binary(args.proxy_bin.as_deref())?;
        let mut cmd = Command::new(binary);
        cmd.args(["--listen", "127.0.0.1:0", "--mode", mode.name()]);
        cmd.args(["--log-level", "warn"]);
        cmd.args(["--workers", &resources.workers.max(1).to_string()]);
        // Sessions are held idle on purpose; a tight handshake budget is not the point.
        cmd.args(["--handshake-timeout", "60s", "--connect-timeout", "60s"]);
        cmd.args(["--grace", "2s"]);
        if let Some(threads) = resources.proxy_threads {
            cmd.args(["--threads", &threads.to_string()]);
        }
        if let Some(spec) = &args.auth {
            cmd.args(["--user", spec]);
        }
        let child = ChildProcess::spawn("proxy", cmd)?;
        stack.proxy_addr = Some(*child.addrs.first().context("proxy printed no address")?);
        stack.proxy_pid = Some(child.pid());
        stack.proxy = Some(child);
        stack.label = args.label.clone().unwrap_or_else(|| mode.name().to_owned());
        Ok(stack)
    }

    /// The echo processes' PIDs: started here, or given to an agent to measure.
    pub fn echo_pids(&self, args: &RunArgs) -> Vec<u32> {
        if self.echo.is_empty() {
            args.echo_pids.clone()
        } else {
            self.echo.iter().map(ChildProcess::pid).collect()
        }
    }

    /// How the proxy has exited, if it has: loadgen's own child by its status, an external
    /// server (`--proxy-pid`) by its PID being gone.
    pub fn proxy_exited(&mut self) -> Option<String> {
        if let Some(proxy) = self.proxy.as_mut() {
            return proxy.exited();
        }
        let pid = self.proxy_pid?;
        // Gone, or a zombie its starter has not reaped yet (state Z after the command name).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        matches!(state, None | Some('Z' | 'X'))
            .then(|| format!("external server (pid {pid}) is gone"))
    }

    /// Stops the proxy (letting it drain), then the echo target.
    pub fn stop(mut self) {
        if let Some(proxy) = self.proxy.as_mut() {
            proxy.stop(Duration::from_secs(10));
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Proxy first: its sessions end before their echo target does.
        drop(self.proxy.take());
    }
}
