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

/// What a run's processes are given: proxy workers and the source addresses sessions use.
#[derive(Debug, Clone)]
pub struct Resources {
    /// Proxy worker processes (0 when loadgen does not start the proxy).
    pub workers: usize,
    /// Source addresses 127.0.0.1..; session i binds `sources[i % len]`.
    pub sources: Vec<Ipv4Addr>,
}

/// Sizes a run to the descriptor limits; fails before anything is opened when it cannot fit.
pub fn plan(args: &RunArgs) -> anyhow::Result<Resources> {
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
    let sources_count = args
        .sources
        .map_or_else(
            || (conns as usize).div_ceil(8000).clamp(1, 250),
            usize::from,
        )
        .max(1);
    let sources = (0..sources_count)
        .map(|i| Ipv4Addr::new(127, 0, 0, 1 + i as u8))
        .collect();
    let workers = match args.mode {
        Target::Proxy(mode) if args.proxy.is_none() => {
            let threads = args
                .threads
                .map_or_else(|| mode.default_threads(), usize::from);
            let per_worker = mode.sessions_per_process(limit, threads).max(1);
            proxy_workers(conns, limit, per_worker, args.workers)
        }
        _ => 0,
    };
    Ok(Resources { workers, sources })
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
    /// The echo target.
    pub echo: ChildProcess,
    /// Where sessions connect: the proxy, or `None` to go straight to the echo target.
    pub proxy_addr: Option<SocketAddr>,
    /// The proxy process whose tree is measured.
    pub proxy_pid: Option<u32>,
    /// The run's name in records and charts.
    pub label: String,
}

impl Stack {
    /// Starts the echo target (one address per source address, so the proxy's outgoing
    /// connections spread too) and, unless the proxy is external or the run direct, the proxy.
    pub fn start(args: &RunArgs, resources: &Resources) -> anyhow::Result<Stack> {
        let exe = std::env::current_exe()?;
        let mut echo_cmd = Command::new(&exe);
        echo_cmd.arg("echo").args(["--threads", "1"]);
        for i in 0..resources.sources.len() {
            echo_cmd.args(["--listen", &format!("127.0.1.{}:0", 1 + i)]);
        }
        let echo = ChildProcess::spawn("echo target", echo_cmd)?;
        let mut stack = Stack {
            proxy: None,
            echo,
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
        if let Some(threads) = args.threads {
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
