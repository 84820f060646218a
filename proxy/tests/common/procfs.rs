//! What the tests read about processes from /proc: alive, children, CPU, memory. Shared by
//! proxy's and loadgen's integration tests (loadgen includes this file by path), so each
//! field of /proc/PID/stat is parsed in one place.
#![allow(dead_code)]

/// The fields of /proc/PID/stat after the command name (which may contain spaces and
/// parentheses): index 0 is the state, 11 and 12 are utime and stime in clock ticks.
pub fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Whether the process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|fields| fields.first().is_some_and(|state| state != "Z"))
}

/// User + system CPU of a process, in clock ticks.
#[track_caller]
pub fn cpu_ticks(pid: u32) -> u64 {
    let fields = stat_fields(pid).expect("the process's /proc/PID/stat");
    let ticks = |i: usize| -> u64 {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .expect("utime/stime")
    };
    ticks(11) + ticks(12)
}

/// Clock ticks per second, the unit of [`cpu_ticks`].
pub fn ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// The direct children of a process.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A `kB` field of /proc/PID/status (e.g. `VmRSS`, `VmSize`), or 0 when unreadable.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Resident set size of a process, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}
