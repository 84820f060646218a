//! The `uring` mode: completion-based I/O on io_uring, one ring per event-loop thread.
//!
//! Where the readiness modes ask "which socket can I read?" and then read, this mode hands
//! the kernel the reads and writes themselves and is told when they are done. Clients are
//! accepted straight into the ring's direct descriptor table, so a
//! session's sockets never occupy the process's descriptor table (RLIMIT_NOFILE limits each
//! ring's table, not their sum); established sessions receive with multishot receives into
//! a provided-buffer ring shared by the ring's sessions (an idle session owns no buffer), and
//! send straight from those buffers. The handshake is the same sans-IO state machine as every
//! mode's; admission, dialing, timeouts and draining follow `modes::session`. Only CONNECT is
//! served: BIND and UDP ASSOCIATE are answered 0x07, as in the readiness modes.
//!
//! Accepts are single-shot, deliberately: with several rings on one listener, a multishot
//! accept keeps its place at the head of the listener's wait queue and took 9,969 of 10,000
//! sessions into one ring here, while a single-shot accept re-queues behind the other rings'
//! and spreads sessions across them (it also reports the client's address, which the client
//! rules need).
//!
//! `event_loop.rs` is the loop and the session state machine; `sys.rs` holds all the
//! `unsafe` (the ring and the memory the kernel uses while an operation runs).

use std::io;
use std::net::TcpListener;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;
use std::time::Duration;

use crate::config::LiveConfig;
use crate::shutdown::Shutdown;

mod event_loop;
mod sys;

use event_loop::EventLoop;

/// Set to `1` to make [`probe`] report io_uring as unavailable (to test that path).
pub const FORCE_UNAVAILABLE_ENV: &str = "PROXY_URING_FORCE_UNAVAILABLE";

/// Whether io_uring offers what this mode needs here (with `batch_window`, the min-wait
/// timeout); `Err` says what is missing, in one line.
pub fn probe(batch_window: Duration) -> Result<(), String> {
    if std::env::var_os(FORCE_UNAVAILABLE_ENV).is_some_and(|v| v == "1") {
        return Err(format!("io_uring unavailable ({FORCE_UNAVAILABLE_ENV}=1)"));
    }
    // On a thread of its own: tearing down a ring can leave its thread a pending
    // notification that interrupts that thread's next blocking call (EINTR).
    let min_wait = !batch_window.is_zero();
    std::thread::spawn(move || sys::probe(min_wait))
        .join()
        .unwrap_or_else(|_| Err("the probe panicked".into()))
        .map_err(|err| format!("io_uring unavailable: {err}"))
}

/// Sessions one process can hold with `rings` rings when each ring's direct table is as
/// large as the descriptor limit `limit` (the reserve kept for dialing subtracted).
pub fn sessions_for_limit(limit: u64, rings: usize) -> u64 {
    let slots = limit.min(event_loop::MAX_SLOTS);
    let reserve = u64::from(event_loop::SLOT_RESERVE).min(slots / 8);
    (slots.saturating_sub(reserve) / 2) * rings as u64
}

/// Shared between the loops of one process.
struct Shared {
    /// Sessions open across all loops (for `--max-sessions`).
    sessions: AtomicUsize,
    /// Loops whose direct table has room for another session: a full loop leaves accepting
    /// to them, and refuses newcomers itself only when there is none.
    rings_with_room: AtomicUsize,
}

/// Runs `threads` io_uring event loops sharing the listener until shutdown; the first loop
/// to fail stops the others. `ready` is called once every loop has its ring and buffers (so
/// that what is measured after it includes them).
pub fn run(
    listener: TcpListener,
    config: &LiveConfig,
    shutdown: &Shutdown,
    threads: usize,
    ready: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    let shared = Shared {
        sessions: AtomicUsize::new(0),
        rings_with_room: AtomicUsize::new(threads),
    };
    let failed = |err: io::Error| {
        tracing::error!("io_uring event loop failed: {err}");
        shutdown.trigger();
        err
    };
    let (set_up_tx, set_up_rx) = mpsc::channel::<bool>();
    std::thread::scope(|scope| {
        let mut others = Vec::new();
        for i in 1..threads {
            let listener = listener.try_clone()?;
            let (set_up, shared) = (set_up_tx.clone(), &shared);
            let handle = std::thread::Builder::new()
                .name(format!("proxy-ring-{i}"))
                .spawn_scoped(scope, move || {
                    let event_loop = EventLoop::new(listener, config.for_loop(), shutdown, shared);
                    let _ = set_up.send(event_loop.is_ok());
                    event_loop
                        .and_then(|mut event_loop| event_loop.serve(shutdown))
                        .map_err(failed)
                })?;
            others.push(handle);
        }
        let mut result = EventLoop::new(listener, config.for_loop(), shutdown, &shared).and_then(
            |mut event_loop| {
                let all_set_up = (1..threads).all(|_| set_up_rx.recv().unwrap_or(false));
                if !all_set_up {
                    return Err(io::Error::other("an io_uring event loop could not start"));
                }
                ready()?;
                event_loop.serve(shutdown)
            },
        );
        if let Err(err) = result {
            result = Err(failed(err));
        }
        for handle in others {
            let joined = handle
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("event loop panicked")));
            result = result.and(joined);
        }
        result
    })
}
