//! The `uring` mode: completion-based I/O on io_uring, one ring per event-loop thread.
//!
//! Where the readiness modes ask "which socket can I read?" and then read, this mode hands
//! the kernel the reads and writes themselves and is told when they are done. Clients are
//! accepted by a multishot accept straight into the ring's direct descriptor table, so a
//! session's sockets never occupy the process's descriptor table (RLIMIT_NOFILE limits each
//! ring's table, not their sum); established sessions receive with multishot receives into
//! a provided-buffer ring shared by the ring's sessions (an idle session owns no buffer), and
//! send straight from those buffers. The handshake is the same sans-IO state machine as every
//! mode's; admission, dialing, timeouts and draining follow `modes::session`. Only CONNECT is
//! served: BIND and UDP ASSOCIATE are answered 0x07, as in the readiness modes.
//!
//! `event_loop.rs` is the loop and the session state machine; `sys.rs` holds all the
//! `unsafe` (the ring and the memory the kernel uses while an operation runs).

use std::io;
use std::net::TcpListener;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use crate::config::Config;
use crate::shutdown::Shutdown;

mod event_loop;
mod sys;

/// Set to `1` to make [`probe`] report io_uring as unavailable (to test that path).
pub const FORCE_UNAVAILABLE_ENV: &str = "PROXY_URING_FORCE_UNAVAILABLE";

/// Whether io_uring offers what this mode needs here (with `batch_window`, the min-wait
/// timeout); `Err` says what is missing, in one line.
pub fn probe(batch_window: Duration) -> Result<(), String> {
    if std::env::var_os(FORCE_UNAVAILABLE_ENV).is_some_and(|v| v == "1") {
        return Err(format!("io_uring unavailable ({FORCE_UNAVAILABLE_ENV}=1)"));
    }
    sys::probe(!batch_window.is_zero()).map_err(|err| format!("io_uring unavailable: {err}"))
}

/// Shared between the loops of one process.
struct Shared {
    /// Sessions open across all loops (for `--max-sessions`).
    sessions: AtomicUsize,
}

/// Runs `threads` io_uring event loops sharing the listener until shutdown; the first loop
/// to fail stops the others.
pub fn run(
    listener: TcpListener,
    config: &Config,
    shutdown: &Shutdown,
    threads: usize,
) -> io::Result<()> {
    let shared = Shared {
        sessions: AtomicUsize::new(0),
    };
    let run_one = |listener: TcpListener| {
        let result = event_loop::run(listener, config, shutdown, &shared);
        if let Err(err) = &result {
            tracing::error!("io_uring event loop failed: {err}");
            shutdown.trigger();
        }
        result
    };
    std::thread::scope(|scope| {
        let mut others = Vec::new();
        for i in 1..threads {
            let listener = listener.try_clone()?;
            let handle = std::thread::Builder::new()
                .name(format!("proxy-ring-{i}"))
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
