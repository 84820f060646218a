//! The readiness modes: `select`, `poll`, `epoll` and `epoll-et`. One event loop
//! (`event_loop.rs`) drives one state machine per session (`conn.rs`); the modes differ
//! only in the [`Poller`] backend that waits (`select.rs`, `poll.rs`, `epoll.rs`, all behind
//! the contract in `poller.rs`). Their only `unsafe` code is in `sys.rs` (the crate's other
//! `unsafe` module is `uring/sys.rs`).

use std::io;
use std::net::TcpListener;
use std::sync::atomic::AtomicUsize;

use crate::config::LiveConfig;
use crate::shutdown::Shutdown;

mod conn;
mod epoll;
pub mod event_loop;
mod poll;
pub mod poller;
mod select;
mod sys;

pub use conn::SELECT_REFUSED;
pub use epoll::EpollPoller;
pub use poll::PollPoller;
pub use poller::Poller;
pub use select::SelectPoller;

/// The readiness backend of a mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// select(2).
    Select,
    /// poll(2).
    Poll,
    /// Level-triggered epoll.
    Epoll,
    /// Edge-triggered epoll.
    EpollEt,
}

/// Runs `threads` event loops on `backend` sharing the listener until shutdown; the first
/// loop to fail stops the others.
pub fn run(
    listener: TcpListener,
    config: &LiveConfig,
    shutdown: &Shutdown,
    threads: usize,
    backend: Backend,
) -> io::Result<()> {
    match backend {
        Backend::Select => run_loops(listener, config, shutdown, threads, || {
            Ok(SelectPoller::new())
        }),
        Backend::Poll => run_loops(
            listener,
            config,
            shutdown,
            threads,
            || Ok(PollPoller::new()),
        ),
        Backend::Epoll => run_loops(listener, config, shutdown, threads, || {
            EpollPoller::new(false)
        }),
        Backend::EpollEt => run_loops(listener, config, shutdown, threads, || {
            EpollPoller::new(true)
        }),
    }
}

fn run_loops<P: Poller>(
    listener: TcpListener,
    config: &LiveConfig,
    shutdown: &Shutdown,
    threads: usize,
    make_poller: impl Fn() -> io::Result<P> + Sync,
) -> io::Result<()> {
    let shared = event_loop::Shared {
        sessions: AtomicUsize::new(0),
    };
    let run_one = |listener: TcpListener| {
        let result = make_poller().and_then(|poller| {
            event_loop::run(poller, listener, config.for_loop(), shutdown, &shared)
        });
        if let Err(err) = &result {
            tracing::error!("event loop failed: {err}");
            shutdown.trigger();
        }
        result
    };
    std::thread::scope(|scope| {
        let mut others = Vec::new();
        for i in 1..threads {
            let listener = listener.try_clone()?;
            let handle = std::thread::Builder::new()
                .name(format!("proxy-loop-{i}"))
                .spawn_scoped(scope, || run_one(listener))?;
            others.push(handle);
        }
        let mut result = run_one(listener);
        for handle in others {
            let joined = handle
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("event loop panicked")));
            result = result.and(joined);
        }
        result
    })
}
