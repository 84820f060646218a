//! What loadgen reads about processes and the kernel while it runs: the CPU and memory of the
//! proxy's process tree (through sysinfo), its own CPU, and kernel TCP memory.

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

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

/// This process's own CPU time (user + system) so far, in microseconds (getrusage).
pub fn own_cpu_us() -> u64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0, |usage| {
        let micros = |t: nix::sys::time::TimeVal| {
            (t.tv_sec() as u64).saturating_mul(1_000_000) + t.tv_usec() as u64
        };
        micros(usage.user_time()) + micros(usage.system_time())
    })
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
