//! `proxy`: the SOCKS5 server's command line.

use std::ffi::OsString;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use ipnet::IpNet;
use tracing_subscriber::EnvFilter;

use proxy::config::access_log::AccessLog;
use proxy::config::file::flags_from_file;
use proxy::config::{parse_cidr, parse_duration, parse_size, LiveConfig};
use proxy::net::{limits, listener};
use proxy::{modes, workers, Acl, Config, Mode, Shutdown};

/// A SOCKS5 proxy server (RFC 1928 CONNECT in every mode, BIND and UDP ASSOCIATE in `async`;
/// RFC 1929 username/password).
///
/// Prints `listening on <ADDR> mode=<MODE>` on stdout once it accepts connections.
/// SIGINT/SIGTERM stop accepting and let sessions finish for --grace; a second signal exits
/// at once. SIGHUP reloads --config and --users-file: new sessions get the new users, rules
/// and timeouts, established ones are not touched.
#[derive(Debug, Parser)]
#[command(name = "proxy", version)]
struct Args {
    /// Read settings from this TOML file: every long flag is a key with the same name and
    /// meaning (`listen = "0.0.0.0:1080"`, `deny-dest = ["10.0.0.0/8"]`); a flag given on the
    /// command line wins over the file. Reloaded on SIGHUP.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:1080", value_name = "ADDR")]
    listen: SocketAddr,

    /// Concurrency model.
    #[arg(long, value_enum, default_value_t = Mode::Async)]
    mode: Mode,

    /// Threads: tokio workers (async) or event loops (epoll, epoll-et, uring: one ring each)
    /// [default: number of cores; 1 for select and poll]. Ignored by `threads`, which has one
    /// per session.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,

    /// `uring` mode: let each wait gather completions for up to this long (e.g. 250us, 1ms)
    /// before the loop runs them: fewer wake-ups per message, added latency up to the window;
    /// 0 wakes for every completion. Needs Linux 6.12.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "0")]
    batch_window: Duration,

    /// Internal (tests): direct descriptor slots per io_uring ring [default: the descriptor
    /// limit].
    #[arg(long, value_name = "N", hide = true, value_parser = clap::value_parser!(u32).range(8..))]
    uring_slots: Option<u32>,

    /// Stack size of each session thread in `threads` mode (e.g. 131072, 128k, 1m)
    /// [default: 128k; only touched pages cost memory].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    stack_size: Option<usize>,

    /// Require username/password authentication and allow this user (repeatable).
    #[arg(long = "user", value_name = "NAME:PASS")]
    users: Vec<String>,

    /// Require authentication and allow the users in FILE, one `name:password` a line
    /// (`#` comments and blank lines are skipped).
    #[arg(long, value_name = "FILE")]
    users_file: Option<PathBuf>,

    /// Allow clients from this network only (repeatable) [default: any client].
    #[arg(long = "allow-client", value_name = "CIDR", value_parser = parse_cidr)]
    allow_clients: Vec<IpNet>,

    /// Allow destinations in this network only (repeatable) [default: any destination].
    #[arg(long = "allow-dest", value_name = "CIDR", value_parser = parse_cidr)]
    allow_dests: Vec<IpNet>,

    /// Never connect to this network (repeatable; wins over --allow-dest; replies 0x02).
    #[arg(long = "deny-dest", value_name = "CIDR", value_parser = parse_cidr)]
    deny_dests: Vec<IpNet>,

    /// Connections from this network (repeatable: your load balancers) start with a PROXY
    /// protocol header (v1 or v2) naming the real client, which --allow-client and the logs
    /// then see; such a connection without a valid header is closed. From anyone else a
    /// PROXY header is a bad greeting.
    #[arg(long = "trusted-proxy", value_name = "CIDR", value_parser = parse_cidr)]
    trusted_proxies: Vec<IpNet>,

    /// Time a client has to finish the handshake (e.g. 10, 2.5s, 500ms).
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    handshake_timeout: Duration,

    /// Time to resolve and connect to the target, all addresses together.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    connect_timeout: Duration,

    /// Close an established session after this long without traffic [default: never].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    idle_timeout: Option<Duration>,

    /// Accept at most N sessions at once; newcomers beyond are closed at once.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_sessions: Option<u64>,

    /// After SIGINT/SIGTERM, how long running sessions may go on before they are closed.
    #[arg(long, default_value = "5s", value_name = "DURATION", value_parser = parse_duration)]
    grace: Duration,

    /// Address that UDP ASSOCIATE replies advertise for the relay socket (when the server sits
    /// behind NAT) [default: the local address of the client's control connection].
    #[arg(long, value_name = "ADDR")]
    udp_advertise: Option<std::net::IpAddr>,

    /// Run N worker processes sharing the port (SO_REUSEPORT), each in --mode, supervised
    /// by this process: how to hold more sessions than one process's descriptor limit allows.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,

    /// Serve Prometheus metrics at http://ADDR/metrics (not on the SOCKS port): sessions
    /// active and ended by reply code, bytes each way, handshake durations, refused
    /// connections by cause, descriptors in use and the limit; summed over --workers
    /// [default: off].
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,

    /// Write a JSON line per session when it ends (client, user, target, reply, bytes each
    /// way, duration, why it ended) to this file (appended; reopened on SIGHUP), or to stderr
    /// for `-` [default: off].
    #[arg(long, value_name = "PATH")]
    access_log: Option<PathBuf>,

    /// Log filter (error, warn, info, debug, trace, or a RUST_LOG directive) [default: RUST_LOG or info].
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,

    /// Internal: this process is a worker started by `--workers`.
    #[arg(long = "worker-of-parent", hide = true)]
    worker: bool,
}

/// Below this descriptor limit the proxy refuses to start rather than fail after its ready line.
const MIN_DESCRIPTORS: u64 = 32;

fn main() -> ExitCode {
    let command_line: Vec<OsString> = std::env::args_os().collect();
    // Errors in the command line itself (and --help) print as clap prints them.
    let matches = Args::command().get_matches_from(&command_line);
    let args = match with_config_file(&command_line, &matches) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("proxy: {err:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(err) = init_logging(args.log_level.as_deref()) {
        eprintln!("proxy: {err:#}");
        return ExitCode::from(2);
    }
    match start(args, command_line) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("proxy: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(level: Option<&str>) -> anyhow::Result<()> {
    let filter = match level {
        Some(level) => {
            EnvFilter::try_new(level).with_context(|| format!("bad --log-level '{level}'"))?
        }
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    Ok(())
}

/// The settings: the command line's, and for the flags it leaves out, those of its --config
/// file.
fn with_config_file(command_line: &[OsString], matches: &ArgMatches) -> anyhow::Result<Args> {
    let args = Args::from_arg_matches(matches)?;
    let Some(path) = &args.config else {
        return Ok(args);
    };
    let from_file = flags_from_file(path, &Args::command(), |id| {
        matches.value_source(id) == Some(ValueSource::CommandLine)
    })?;
    let mut all = command_line[..1].to_vec();
    all.extend(from_file);
    all.extend_from_slice(&command_line[1..]);
    Args::try_parse_from(all).map_err(|err| anyhow::anyhow!("{}", err.render()))
}

/// The server's settings from the parsed flags (reads the users file).
fn build_config(args: &Args) -> anyhow::Result<Config> {
    let users = proxy::config::users::load(&args.users, args.users_file.as_deref())?;
    let access_log = match &args.access_log {
        Some(path) => Some(Arc::new(AccessLog::open(path).with_context(|| {
            format!("cannot open the access log {}", path.display())
        })?)),
        None => None,
    };
    Ok(Config {
        access_log,
        users,
        acl: Acl {
            allow_clients: args.allow_clients.clone(),
            allow_dests: args.allow_dests.clone(),
            deny_dests: args.deny_dests.clone(),
        },
        trusted_proxies: args.trusted_proxies.clone(),
        handshake_timeout: args.handshake_timeout,
        connect_timeout: args.connect_timeout,
        idle_timeout: args.idle_timeout.filter(|d| !d.is_zero()),
        max_sessions: args.max_sessions.map(|n| n as usize),
        grace: args.grace,
        threads: args.threads.map(usize::from),
        stack_size: args.stack_size,
        udp_advertise: args.udp_advertise,
        batch_window: args.batch_window,
        uring_slots: args.uring_slots,
    })
}

/// Reads the command line's settings again (the --config file and the users file as they are
/// now) for SIGHUP. What the running server was built with (listen address, mode, threads,
/// workers) keeps its value; a change there is logged as needing a restart.
fn reload(command_line: &[OsString], running: &Args, live: &LiveConfig) -> anyhow::Result<()> {
    let matches = Args::command().try_get_matches_from(command_line)?;
    let args = with_config_file(command_line, &matches)?;
    let mut config = build_config(&args)?;
    let current = live.load();
    config.threads = current.threads;
    config.stack_size = current.stack_size;
    config.batch_window = current.batch_window;
    config.uring_slots = current.uring_slots;
    let fixed = [
        ("listen", args.listen != running.listen),
        ("mode", args.mode != running.mode),
        ("threads", args.threads != running.threads),
        ("workers", args.workers != running.workers),
        ("batch-window", args.batch_window != running.batch_window),
        ("stack-size", args.stack_size != running.stack_size),
        ("log-level", args.log_level != running.log_level),
    ];
    for (key, changed) in fixed {
        if changed {
            tracing::warn!("reload: '{key}' changed; it takes effect at the next restart");
        }
    }
    let summary = format!(
        "users={} allow_client={} allow_dest={} deny_dest={} trusted_proxy={}",
        config.users.as_ref().map_or(0, |u| u.len()),
        config.acl.allow_clients.len(),
        config.acl.allow_dests.len(),
        config.acl.deny_dests.len(),
        config.trusted_proxies.len(),
    );
    live.replace(Arc::new(config));
    tracing::info!("reloaded: new sessions use these settings: {summary}");
    Ok(())
}

fn start(args: Args, command_line: Vec<OsString>) -> anyhow::Result<()> {
    let config = Arc::new(build_config(&args)?);
    if args.mode == Mode::Uring {
        modes::uring::probe(args.batch_window)
            .map_err(|err| anyhow::anyhow!("--mode uring: {err}"))?;
    } else if !args.batch_window.is_zero() {
        bail!("--batch-window applies to --mode uring only");
    }
    if let Some(size) = args.stack_size {
        if size < 32 * 1024 {
            bail!("--stack-size {size} is too small; use at least 32k");
        }
    }

    let descriptors = limits::raise_nofile_limit().context("cannot raise RLIMIT_NOFILE")?;
    if descriptors < MIN_DESCRIPTORS {
        bail!(
            "the descriptor limit is {descriptors}, too low to serve anything: the proxy needs \
             about {} of its own plus 2 per session; raise it (`ulimit -n`, LimitNOFILE=) to at \
             least {MIN_DESCRIPTORS}",
            limits::BASELINE_DESCRIPTORS
        );
    }
    if args.workers > 1 && !args.worker {
        return supervise_workers(&args, &config, descriptors);
    }
    if args.worker {
        // A worker must not outlive its supervisor.
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))
            .context("cannot set the parent-death signal")?;
    }
    let listener: TcpListener = listener::bind(args.listen, args.worker)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener
        .local_addr()
        .context("cannot read the bound address")?;

    if !args.worker {
        warn_if_open(&config, bound);
    }
    if let Some(addr) = args.metrics {
        proxy::metrics::enable();
        // A worker serves its own on loopback, for its supervisor to sum.
        let addr = if args.worker {
            SocketAddr::from(([127, 0, 0, 1], 0))
        } else {
            addr
        };
        let metrics = proxy::metrics::bind(addr, bound)
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        let serving = metrics.local_addr().context("metrics address")?;
        proxy::metrics::serve(metrics, proxy::metrics::render)
            .context("cannot start the metrics thread")?;
        if args.worker {
            println!("{}{serving}", workers::METRICS_LINE);
        } else {
            tracing::info!("metrics at http://{serving}/metrics");
        }
    }
    let shutdown = Shutdown::new();
    let mode = args.mode;
    let live = LiveConfig::new(config.clone());
    let reload_live = live.clone();
    spawn_signal_handler(shutdown.clone(), move || {
        if let Err(err) = reload(&command_line, &args, &reload_live) {
            tracing::error!("reload failed, the current settings stay: {err:#}");
        }
    })?;

    let threads = config.threads.unwrap_or_else(|| mode.default_threads());
    tracing::info!(
        mode = %mode,
        threads,
        auth = config.users.as_ref().map_or(0, |u| u.len()),
        "descriptor limit {descriptors} allows about {} sessions ({})",
        mode.sessions_per_process(descriptors, threads),
        if mode == Mode::Uring {
            "in each ring's direct descriptor table, as large as the limit"
        } else {
            "2 descriptors each"
        }
    );
    let announce = || {
        let mut stdout = std::io::stdout().lock();
        writeln!(
            stdout,
            "{}",
            listener::ready_line(&[bound], Some(mode.name()))
        )?;
        stdout.flush()
    };
    modes::run_announced(listener, live, mode, shutdown, announce).context("server failed")?;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Runs `--workers N` processes and supervises them until a signal.
fn supervise_workers(args: &Args, config: &Config, descriptors: u64) -> anyhow::Result<()> {
    let (_reservation, bound) = listener::reserve(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    warn_if_open(config, bound);
    let threads = config
        .threads
        .unwrap_or_else(|| args.mode.default_threads());
    let per_worker = args.mode.sessions_per_process(descriptors, threads);
    tracing::info!(
        mode = %args.mode,
        workers = args.workers,
        "each worker's descriptor limit {descriptors} allows about {per_worker} sessions; {} in all",
        per_worker * u64::from(args.workers)
    );
    let worker_args = workers::worker_args(std::env::args_os().skip(1), bound);
    let metrics = args
        .metrics
        .map(|addr| {
            proxy::metrics::bind(addr, bound)
                .with_context(|| format!("cannot serve metrics on {addr}"))
        })
        .transpose()?;
    if let Some(serving) = metrics.as_ref().and_then(|l| l.local_addr().ok()) {
        tracing::info!("metrics at http://{serving}/metrics (summed over the workers)");
    }
    let clean = workers::supervise(
        usize::from(args.workers),
        bound,
        args.mode,
        worker_args,
        metrics,
    )
    .context("worker supervision failed")?;
    if !clean {
        bail!("a worker did not shut down cleanly");
    }
    tracing::info!("shut down cleanly");
    Ok(())
}

fn warn_if_open(config: &Config, bound: SocketAddr) {
    if config.users.is_none() && !bound.ip().is_loopback() {
        tracing::warn!(
            "!!! listening on {bound} WITHOUT AUTHENTICATION: anyone who can reach this address \
             can use this proxy; open proxies are found and abused within hours. Use --user or \
             --users-file, or --allow-client to restrict who may connect. !!!"
        );
    }
}

/// Installs SIGINT/SIGTERM (shutdown) and SIGHUP (`reload`) handlers on a small thread of their own, so they work the same
/// whatever the mode. Returns once the handlers are installed.
fn spawn_signal_handler(
    shutdown: Shutdown,
    reload: impl Fn() + Send + 'static,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal thread")?;
    let (mut interrupt, mut terminate, mut hangup) = runtime.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ))
    })?;
    std::thread::Builder::new()
        .name("proxy-signals".into())
        .spawn(move || {
            runtime.block_on(async {
                loop {
                    tokio::select! {
                        _ = interrupt.recv() => break,
                        _ = terminate.recv() => break,
                        _ = hangup.recv() => {
                            tracing::info!("SIGHUP: reloading the settings");
                            reload();
                        }
                    }
                }
                tracing::info!("signal received: no new sessions; draining");
                shutdown.trigger();
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
                tracing::warn!("second signal: exiting now");
                std::process::exit(130);
            })
        })
        .context("cannot start the signal thread")?;
    Ok(())
}
