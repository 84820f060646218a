//! `--workers N`: a parent process supervising N worker processes that share one port.
//!
//! One process can hold only as many sessions as its descriptor limit allows (about 9,990 at
//! a hard limit of 20,000), so more sessions need more processes, as nginx and Dante do. The
//! parent reserves the address (a bound, never-listening SO_REUSEPORT socket, which also
//! resolves port 0), starts the workers with the same flags, each listening on that address
//! with SO_REUSEPORT so the kernel spreads connections over them, prints the ready line once
//! every worker is listening, forwards SIGINT/SIGTERM, and restarts a worker that dies
//! unexpectedly. Trade-offs: workers share nothing (each has its own `--max-sessions` count,
//! its own resolver pool), and a worker's queued connections are reset if it dies.

use std::ffi::OsString;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::modes::Mode;
use crate::net::listener::ready_line;

/// How long a worker has to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// A worker that dies sooner than this after starting counts towards a crash loop.
const QUICK_DEATH: Duration = Duration::from_secs(2);
/// Consecutive quick deaths after which the parent gives up.
const MAX_QUICK_DEATHS: u32 = 5;

/// The hidden flag that tells a process it is a worker.
pub const WORKER_FLAG: &str = "--worker-of-parent";

/// Builds a worker's command line from the parent's: the same flags, minus `--workers` and
/// `--listen`, plus the resolved address and the worker flag.
pub fn worker_args(
    parent_args: impl IntoIterator<Item = OsString>,
    bound: SocketAddr,
) -> Vec<OsString> {
    let mut args = Vec::new();
    let mut skip_value = false;
    for arg in parent_args {
        if skip_value {
            skip_value = false;
            continue;
        }
        let text = arg.to_string_lossy();
        if text == "--workers" || text == "--listen" {
            skip_value = true;
            continue;
        }
        if text.starts_with("--workers=") || text.starts_with("--listen=") {
            continue;
        }
        args.push(arg);
    }
    args.push("--listen".into());
    args.push(bound.to_string().into());
    args.push(WORKER_FLAG.into());
    args
}

struct Worker {
    pid: Option<Pid>,
    generation: u64,
    started: Instant,
    /// Whether it printed its ready line (so it handles signals itself).
    ready: bool,
}

enum Report {
    Ready {
        index: usize,
        generation: u64,
    },
    NotReady {
        index: usize,
        why: String,
    },
    Exited {
        index: usize,
        generation: u64,
        status: String,
        success: bool,
        /// The signal that ended it, if one did.
        signal: Option<i32>,
    },
}

/// Starts worker `index` and a task that reports its readiness and its exit.
/// Where each worker serves its own metrics (loopback, for the supervisor to sum), by index.
type WorkerMetrics = Arc<Mutex<Vec<Option<SocketAddr>>>>;

/// The line a worker prints before its ready line when `--metrics` is on.
pub const METRICS_LINE: &str = "metrics on ";

fn spawn_worker(
    index: usize,
    generation: u64,
    program: &OsString,
    args: &[OsString],
    reports: &mpsc::UnboundedSender<Report>,
    metrics: &WorkerMetrics,
) -> io::Result<Worker> {
    let mut child: Child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().and_then(|id| Pid::from_raw(id as i32));
    let stdout = child.stdout.take();
    let reports = reports.clone();
    let metrics = metrics.clone();
    tokio::spawn(async move {
        let ready = async {
            let mut reader = BufReader::new(stdout?);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).await.ok()? == 0 {
                    return None;
                }
                if let Some(addr) = line.trim().strip_prefix(METRICS_LINE) {
                    let addr = addr.parse().ok();
                    metrics.lock().unwrap_or_else(|p| p.into_inner())[index] = addr;
                    continue;
                }
                return crate::net::listener::parse_ready_line(&line).map(|_| ());
            }
        };
        let report = match tokio::time::timeout(READY_TIMEOUT, ready).await {
            Ok(Some(())) => Report::Ready { index, generation },
            Ok(None) => Report::NotReady {
                index,
                why: "exited before listening".into(),
            },
            Err(_) => Report::NotReady {
                index,
                why: format!("not listening after {READY_TIMEOUT:?}"),
            },
        };
        let _ = reports.send(report);
        let exited = child.wait().await;
        metrics.lock().unwrap_or_else(|p| p.into_inner())[index] = None;
        let (status, success, signal) = match exited {
            Ok(status) => (
                status.to_string(),
                status.success(),
                std::os::unix::process::ExitStatusExt::signal(&status),
            ),
            Err(err) => (err.to_string(), false, None),
        };
        let _ = reports.send(Report::Exited {
            index,
            generation,
            status,
            success,
            signal,
        });
    });
    Ok(Worker {
        pid,
        generation,
        started: Instant::now(),
        ready: false,
    })
}

fn signal_all(workers: &[Worker], signal: Signal) {
    for worker in workers {
        if let Some(pid) = worker.pid {
            let _ = kill_process(pid, signal);
        }
    }
}

/// Runs `count` workers on `bound` until SIGINT/SIGTERM; returns whether every worker then
/// exited cleanly. Prints the ready line once all are listening.
/// With `metrics`, serves `/metrics` there: the sum of what the workers report.
pub fn supervise(
    count: usize,
    bound: SocketAddr,
    mode: Mode,
    args: Vec<OsString>,
    metrics: Option<std::net::TcpListener>,
) -> io::Result<bool> {
    let worker_metrics: WorkerMetrics = Arc::new(Mutex::new(vec![None; count]));
    if let Some(listener) = metrics {
        let addrs = worker_metrics.clone();
        crate::metrics::serve(listener, move || {
            let addrs: Vec<SocketAddr> = addrs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .flatten()
                .copied()
                .collect();
            let texts: Vec<String> = addrs
                .iter()
                .filter_map(|addr| crate::metrics::fetch(*addr).ok())
                .collect();
            crate::metrics::sum(&texts)
        })?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let program: OsString = std::env::current_exe()?.into();
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        // Installed before any worker starts: SIGHUP's default action would end the supervisor.
        let mut hangup = signal(SignalKind::hangup())?;
        let (reports_tx, mut reports) = mpsc::unbounded_channel();
        let mut workers = Vec::with_capacity(count);
        for index in 0..count {
            workers.push(spawn_worker(index, 0, &program, &args, &reports_tx, &worker_metrics)?);
        }

        // Wait for every first-generation worker to listen.
        let mut ready = 0;
        while ready < count {
            let report = tokio::select! {
                report = reports.recv() => report,
                _ = interrupt.recv() => None,
                _ = terminate.recv() => None,
            };
            match report {
                Some(Report::Ready { index, .. }) => {
                    tracing::info!(worker = index, pid = ?workers[index].pid, "worker listening");
                    workers[index].ready = true;
                    ready += 1;
                }
                Some(Report::NotReady { index, why, .. }) => {
                    signal_all(&workers, Signal::KILL);
                    return Err(io::Error::other(format!("worker {index} failed to start: {why}")));
                }
                Some(Report::Exited { index, status, .. }) => {
                    signal_all(&workers, Signal::KILL);
                    return Err(io::Error::other(format!("worker {index} exited at start: {status}")));
                }
                None => {
                    signal_all(&workers, Signal::TERM);
                    return Ok(false);
                }
            }
        }
        {
            let mut stdout = io::stdout().lock();
            writeln!(stdout, "{}", ready_line(&[bound], Some(mode.name())))?;
            stdout.flush()?;
        }
        tracing::info!("{count} workers listening on {bound}");

        let mut quick_deaths = 0u32;
        let forwarded = loop {
            tokio::select! {
                _ = interrupt.recv() => break Signal::INT,
                _ = terminate.recv() => break Signal::TERM,
                _ = hangup.recv() => {
                    // Each worker reloads its own settings; one still starting reads the
                    // file as it is now anyway (and has no handler yet).
                    let ready: Vec<&Worker> = workers.iter().filter(|w| w.ready).collect();
                    tracing::info!("SIGHUP: asking {} workers to reload", ready.len());
                    for worker in ready {
                        if let Some(pid) = worker.pid {
                            let _ = kill_process(pid, Signal::HUP);
                        }
                    }
                }
                report = reports.recv() => match report {
                    Some(Report::Exited { index, generation, status, .. })
                        if workers[index].generation == generation =>
                    {
                        let lived = workers[index].started.elapsed();
                        quick_deaths = if lived < QUICK_DEATH { quick_deaths + 1 } else { 0 };
                        if quick_deaths >= MAX_QUICK_DEATHS {
                            signal_all(&workers, Signal::TERM);
                            return Err(io::Error::other(format!(
                                "workers keep dying ({MAX_QUICK_DEATHS} in a row within {QUICK_DEATH:?}); last: {status}"
                            )));
                        }
                        tracing::warn!(worker = index, pid = ?workers[index].pid, "worker exited unexpectedly ({status}); starting a replacement");
                        tokio::time::sleep(Duration::from_millis(100) * quick_deaths).await;
                        workers[index] = spawn_worker(index, generation + 1, &program, &args, &reports_tx, &worker_metrics)?;
                    }
                    Some(Report::Ready { index, generation }) if workers[index].generation == generation => {
                        workers[index].ready = true;
                        tracing::info!(worker = index, pid = ?workers[index].pid, "replacement worker listening");
                    }
                    Some(Report::NotReady { index, why, .. }) => {
                        tracing::warn!(worker = index, "replacement worker not listening: {why}");
                    }
                    Some(_) => {}
                    None => break Signal::TERM,
                },
            }
        };

        tracing::info!("signal received: stopping {count} workers");
        signal_all(&workers, forwarded);
        let mut running = count;
        let mut all_clean = true;
        while running > 0 {
            tokio::select! {
                report = reports.recv() => match report {
                    Some(Report::Ready { index, generation }) if workers[index].generation == generation => {
                        workers[index].ready = true;
                    }
                    Some(Report::Exited { index, generation, success, status, signal })
                        if workers[index].generation == generation =>
                    {
                        running -= 1;
                        // A replacement still starting has no handlers yet: the forwarded
                        // signal ends it at once, which is the shutdown it was asked for.
                        let stopped_while_starting =
                            !workers[index].ready && signal == Some(forwarded.as_raw());
                        if !success && !stopped_while_starting {
                            tracing::warn!(worker = index, "worker exited: {status}");
                            all_clean = false;
                        }
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = interrupt.recv() => { signal_all(&workers, Signal::KILL); std::process::exit(130); }
                _ = terminate.recv() => { signal_all(&workers, Signal::KILL); std::process::exit(130); }
            }
        }
        Ok(all_clean)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_args_replace_listen_and_workers() {
        let parent: Vec<OsString> = [
            "--mode",
            "epoll",
            "--workers",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--user=a:b",
            "--workers=3",
            "--listen=[::1]:0",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        let bound: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        let args = worker_args(parent, bound);
        let args: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--mode",
                "epoll",
                "--user=a:b",
                "--listen",
                "127.0.0.1:4000",
                WORKER_FLAG
            ]
        );
    }
}
