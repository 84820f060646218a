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

/// Context switches (voluntary + involuntary) of every thread of `root` and its descendants
/// so far, from /proc/PID/task/*/status: how often the proxy's threads went to sleep or were
/// preempted, i.e. its wake-ups. Threads that ended are not counted, so take it over a
/// window in which the threads live (the measured window). `None` past
/// [`MAX_TASKS_COUNTED`] threads.
pub fn context_switches(root: u32) -> Option<u64> {
    let mut pids = vec![root];
    let mut total = 0;
    let mut tasks_read = 0;
    let mut i = 0;
    while i < pids.len() {
        let pid = pids[i];
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            tasks_read += 1;
            if tasks_read > MAX_TASKS_COUNTED {
                return None;
            }
            let path = task.path();
            let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
            total += status
                .lines()
                .filter_map(|line| {
                    line.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
                })
                .filter_map(|value| value.trim().parse::<u64>().ok())
                .sum::<u64>();
            let children = std::fs::read_to_string(path.join("children")).unwrap_or_default();
            pids.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    Some(total)
}

/// Past this many threads (a thread-per-session proxy), reading every thread's status would
/// take seconds at each end of the window: context switches are then not counted.
const MAX_TASKS_COUNTED: usize = 4096;

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

/// This process's resident set size now, bytes (/proc/self/statm; 0 where unreadable).
pub fn own_rss() -> u64 {
    let text = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages = text
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    pages * rustix::param::page_size() as u64
}

/// Kernel slab memory in use now, bytes: active objects × object size summed over
/// /proc/slabinfo (readable by root). Elsewhere `Slab:` of /proc/meminfo, which also counts
/// the free objects slab pages keep after a run, so a run after a bigger one reads low there.
pub fn kernel_slab() -> u64 {
    let in_use: u64 = std::fs::read_to_string("/proc/slabinfo")
        .unwrap_or_default()
        .lines()
        .filter(|line| !line.starts_with('#') && !line.starts_with("slabinfo"))
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let active: u64 = fields.next()?.parse().ok()?;
            let _allocated = fields.next()?;
            let size: u64 = fields.next()?.parse().ok()?;
            Some(active * size)
        })
        .sum();
    if in_use > 0 {
        return in_use;
    }
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|line| line.strip_prefix("Slab:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
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

/// The whole machine's CPU time so far, from the `cpu` line of /proc/stat, in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostCpu {
    /// Every state summed (user, nice, system, idle, iowait, irq, softirq, steal).
    total: u64,
    /// Idle and waiting for I/O.
    idle: u64,
    /// Time the hypervisor ran something else while this VM wanted a CPU.
    steal: u64,
}

/// The machine's CPU over an interval: how busy it was and how much the host took away.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostCpuShare {
    /// The share of all CPU time that was stolen by the hypervisor (0 on bare metal).
    pub steal_share: f64,
    /// Cores busy on average (everything but idle, I/O wait and steal).
    pub busy_cores: f64,
}

/// The machine's CPU counters now (all zero where /proc/stat cannot be read).
pub fn host_cpu() -> HostCpu {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    HostCpu::parse(&text)
}

impl HostCpu {
    /// Reads the aggregate `cpu ` line of /proc/stat's text.
    fn parse(text: &str) -> HostCpu {
        let Some(line) = text.lines().find(|line| line.starts_with("cpu ")) else {
            return HostCpu::default();
        };
        // user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|field| field.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
        HostCpu {
            total: ticks.iter().sum(),
            idle: at(3) + at(4),
            steal: at(7),
        }
    }

    /// What happened between `start` and `self`, over a window of `window_s` seconds.
    pub fn since(self, start: HostCpu, window_s: f64) -> HostCpuShare {
        let total = self.total.saturating_sub(start.total);
        if total == 0 || window_s <= 0.0 {
            return HostCpuShare::default();
        }
        let steal = self.steal.saturating_sub(start.steal);
        let idle = self.idle.saturating_sub(start.idle);
        let ticks_per_second = rustix::param::clock_ticks_per_second() as f64;
        HostCpuShare {
            steal_share: steal as f64 / total as f64,
            busy_cores: total.saturating_sub(idle + steal) as f64 / ticks_per_second / window_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_cpu_reads_the_aggregate_line_and_shares_the_interval() {
        let before = HostCpu::parse(
            "cpu  100 0 50 800 10 0 20 20 0 0\ncpu0 50 0 25 400 5 0 10 10 0 0\nintr 1 2\n",
        );
        assert_eq!((before.total, before.idle, before.steal), (1000, 810, 20));
        let after = HostCpu::parse("cpu  200 0 100 1500 10 0 40 50 0 0\n");
        let share = after.since(before, 1.0);
        // 900 ticks passed: 30 stolen, 700 idle, 170 busy.
        assert!((share.steal_share - 30.0 / 900.0).abs() < 1e-9);
        let hz = rustix::param::clock_ticks_per_second() as f64;
        assert!((share.busy_cores - 170.0 / hz).abs() < 1e-9);
        assert_eq!(
            HostCpu::parse("nothing here").since(before, 1.0),
            HostCpuShare::default()
        );
    }
}
