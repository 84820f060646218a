//! The server modes: each differs only in how it waits for readiness.
//!
//! | mode | waits with |
//! |---|---|
//! | `threads` | a thread per session, blocking on its own sockets |
//! | `select` | one event loop on select(2) (FD_SETSIZE wall enforced) |
//! | `poll` | one event loop on poll(2) |
//! | `epoll` | event loops on level-triggered epoll |
//! | `epoll-et` | event loops on edge-triggered epoll |
//! | `async` | tokio tasks |
//! | `uring` | io_uring completions, one ring per loop thread |
//!
//! Where each lives: `threads.rs`; `readiness/` (select, poll, epoll and epoll-et: one event
//! loop over a `Poller` backend); `async_tokio/` (with BIND and UDP ASSOCIATE as children);
//! `uring/` (completion-based; all its `unsafe` in `uring/sys.rs`).
//! What every mode decides the same way (admission, dialing, resets, draining) is in
//! `session.rs`.

use std::io;
use std::net::TcpListener;

use crate::config::LiveConfig;
use crate::shutdown::Shutdown;

pub mod async_tokio;
pub mod readiness;
pub mod session;
pub mod threads;
pub mod uring;

use readiness::Backend;

/// A concurrency model for the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Mode {
    /// A thread per session (small explicit stacks), blocking on its own sockets.
    Threads,
    /// One thread, select(2); sessions needing a descriptor ≥ 1024 are refused.
    Select,
    /// One thread, poll(2) over every descriptor each round.
    Poll,
    /// Level-triggered epoll, one event loop per --threads.
    Epoll,
    /// Edge-triggered epoll (reads and writes drain to EAGAIN), one loop per --threads.
    EpollEt,
    /// One tokio task per session on a multi-threaded runtime.
    Async,
    /// io_uring: multishot accept and receive, direct descriptors, one ring per --threads.
    Uring,
}

impl Mode {
    /// Every mode, in the order the command line lists them.
    pub const ALL: [Mode; 7] = [
        Mode::Threads,
        Mode::Select,
        Mode::Poll,
        Mode::Epoll,
        Mode::EpollEt,
        Mode::Async,
        Mode::Uring,
    ];

    /// The name used on the command line and in the ready line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Threads => "threads",
            Mode::Select => "select",
            Mode::Poll => "poll",
            Mode::Epoll => "epoll",
            Mode::EpollEt => "epoll-et",
            Mode::Async => "async",
            Mode::Uring => "uring",
        }
    }

    /// Threads used when `--threads` is not given.
    pub fn default_threads(self) -> usize {
        match self {
            // The classic single-threaded loops: their per-round cost is what is measured.
            Mode::Select | Mode::Poll => 1,
            _ => default_threads(),
        }
    }

    /// Sessions one process of this mode can hold under the descriptor limit `limit` with
    /// `threads` threads: 2 descriptors a session, except in `uring`, whose sockets live in
    /// each ring's direct table (as large as the limit allows, per ring).
    pub fn sessions_per_process(self, limit: u64, threads: usize) -> u64 {
        match self {
            Mode::Uring => uring::sessions_for_limit(limit, threads.max(1)),
            _ => crate::net::limits::sessions_for_descriptors(limit),
        }
    }

    /// Whether the mode supports BIND and UDP ASSOCIATE besides CONNECT (others reply 0x07).
    pub fn supports_bind_and_udp(self) -> bool {
        self == Mode::Async
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Serves on a bound listener in `mode` until `shutdown` fires and the grace period ends.
/// Blocks the calling thread.
pub fn run(
    listener: TcpListener,
    config: impl Into<LiveConfig>,
    mode: Mode,
    shutdown: Shutdown,
) -> io::Result<()> {
    run_announced(listener, config, mode, shutdown, || Ok(()))
}

/// [`run`], calling `ready` once the mode is set up and about to serve (connections that come
/// earlier wait in the listener's backlog): the moment to print a ready line.
pub fn run_announced(
    listener: TcpListener,
    config: impl Into<LiveConfig>,
    mode: Mode,
    shutdown: Shutdown,
    ready: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    let config: LiveConfig = config.into();
    // How the mode is built (threads, rings) is fixed at start; a reload changes what sessions
    // are allowed and how long they may take.
    let threads = config
        .load()
        .threads
        .unwrap_or_else(|| mode.default_threads())
        .max(1);
    // Held from the start, so that even the first connection past the limit is refused cleanly.
    crate::net::limits::replenish_reserve();
    match mode {
        Mode::Async => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("proxy-worker")
                .enable_all()
                .build()?;
            ready()?;
            runtime.block_on(async move {
                listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                async_tokio::serve(listener, config, shutdown).await
            })
        }
        Mode::Threads => {
            ready()?;
            threads::run(listener, config, shutdown)
        }
        Mode::Select => {
            ready()?;
            readiness::run(listener, &config, &shutdown, threads, Backend::Select)
        }
        Mode::Poll => {
            ready()?;
            readiness::run(listener, &config, &shutdown, threads, Backend::Poll)
        }
        Mode::Epoll => {
            ready()?;
            readiness::run(listener, &config, &shutdown, threads, Backend::Epoll)
        }
        Mode::EpollEt => {
            ready()?;
            readiness::run(listener, &config, &shutdown, threads, Backend::EpollEt)
        }
        // Its rings and buffers are made on their threads first, then `ready` is called.
        Mode::Uring => uring::run(listener, &config, &shutdown, threads, ready),
    }
}

/// One thread per available core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn all_lists_every_mode_under_its_command_line_name() {
        assert_eq!(Mode::ALL.as_slice(), Mode::value_variants());
        for mode in Mode::ALL {
            let parsed = Mode::from_str(mode.name(), false).expect("parses");
            assert_eq!(parsed, mode);
        }
    }
}
