//! The server modes: each differs only in how it waits for readiness.

use std::io;
use std::net::TcpListener;
use std::sync::Arc;

use crate::config::Config;
use crate::shutdown::Shutdown;

pub mod async_tokio;

/// A concurrency model for the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Mode {
    /// One tokio task per session on a multi-threaded runtime.
    Async,
}

impl Mode {
    /// The name used on the command line and in the ready line.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Async => "async",
        }
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
    config: Arc<Config>,
    mode: Mode,
    shutdown: Shutdown,
) -> io::Result<()> {
    match mode {
        Mode::Async => {
            let threads = config.threads.unwrap_or_else(default_threads).max(1);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("proxy-worker")
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                async_tokio::serve(listener, config, shutdown).await
            })
        }
    }
}

/// One thread per available core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
