//! The processes loadgen runs (the echo target and the proxy) and what it reads about them.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

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

/// CPU time and memory of a process and all its descendants.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeUsage {
    /// User + system CPU, milliseconds.
    pub cpu_ms: u64,
    /// Resident set size, bytes (summed over the processes).
    pub rss_bytes: u64,
    /// How many processes were summed.
    pub processes: usize,
}

/// Reads process trees through sysinfo (tasks are not listed: a thread-per-session proxy
/// has thousands of them).
pub struct ProcessProbe {
    system: System,
}

impl ProcessProbe {
    /// A probe with nothing read yet.
    pub fn new() -> Self {
        ProcessProbe {
            system: System::new(),
        }
    }

    /// CPU and RSS of `root` and its descendants now.
    pub fn tree(&mut self, root: u32) -> TreeUsage {
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            ProcessRefreshKind::nothing()
                .with_memory()
                .with_cpu()
                .without_tasks(),
        );
        let root = Pid::from_u32(root);
        let mut members = vec![root];
        let mut usage = TreeUsage::default();
        let mut i = 0;
        while i < members.len() {
            let pid = members[i];
            i += 1;
            if let Some(process) = self.system.process(pid) {
                usage.cpu_ms += process.accumulated_cpu_time();
                usage.rss_bytes += process.memory();
                usage.processes += 1;
            }
            for (child, process) in self.system.processes() {
                if process.parent() == Some(pid) && process.thread_kind().is_none() {
                    members.push(*child);
                }
            }
        }
        usage
    }
}

impl Default for ProcessProbe {
    fn default() -> Self {
        Self::new()
    }
}

/// This process's own CPU time (user + system), milliseconds, from /proc/self/stat.
pub fn own_cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let hz = 100; // USER_HZ is 100 on Linux for /proc reporting.
    (ticks(11) + ticks(12)) * 1000 / hz
}

/// Kernel TCP memory from /proc/net/sockstat: (sockets in use, memory in bytes).
pub fn kernel_tcp() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let page = rustix::param::page_size() as u64;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("TCP:") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let field = |name: &str| {
                words
                    .iter()
                    .position(|w| *w == name)
                    .and_then(|i| words.get(i + 1))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            return (field("inuse"), field("mem") * page);
        }
    }
    (0, 0)
}
