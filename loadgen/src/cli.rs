//! The command line: what to run and how, as typed values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::builder::PossibleValue;
use clap::{Parser, Subcommand, ValueEnum};
use proxy::config::parse_duration;
use proxy::Mode;

use crate::segment::Segment;

/// Opens N concurrent SOCKS5 sessions through a proxy to a loopback echo target and measures
/// throughput, latency (HdrHistogram), and the proxy's memory and CPU.
///
/// Starts the echo target and (unless --proxy is given) the workspace's `proxy` binary as
/// child processes, ramps the sessions, holds them idle, then runs the workload: closed loop
/// (one message outstanding per session) or open loop (--rate). Writes
/// results/runs/<stamp>-<label>-c<conns>.json, .hgrm histograms beside it, and a row in
/// results/summary.csv.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, args_conflicts_with_subcommands = true)]
pub struct Args {
    /// A subcommand; without one, a measured run.
    #[command(subcommand)]
    pub command: Option<Sub>,

    /// The run's settings.
    #[command(flatten)]
    pub run: RunArgs,
}

/// loadgen's subcommands.
#[derive(Debug, Subcommand)]
pub enum Sub {
    /// The echo target runs start for themselves: echoes every byte on each --listen address
    /// and prints a ready line (run it yourself for agents on other hosts, with --echo).
    Echo {
        /// Addresses to listen on.
        #[arg(long = "listen", required = true)]
        listen: Vec<SocketAddr>,
        /// Runtime threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Merge the records of one run's agents (`--segment I/K`, on one host or many) into one
    /// record: histograms added, counters summed, each agent's rate over its window summed.
    /// Refuses missing, duplicate or non-overlapping segments.
    Merge {
        /// The agents' records (JSON), one per segment.
        #[arg(required = true)]
        records: Vec<PathBuf>,
        /// Directory the merged record goes to (runs/, with its .hgrm and a summary.csv row).
        #[arg(long, default_value = "results")]
        results: PathBuf,
        /// Print the merged record on stdout instead of writing it.
        #[arg(long)]
        json: bool,
    },
    /// Print a Kubernetes Job that runs one run's agents on many nodes: an Indexed Job of
    /// --agents pods, pod I running `--segment I/K` with a shared --start-at, each writing its
    /// record to a shared volume for `loadgen merge`. It is printed, not applied.
    K8sManifest(crate::k8s::ManifestArgs),
    /// On a proxy host: measure a process and its descendants (RSS, CPU, context switches)
    /// over a run's phases (the agents' --start-at and run flags), for `loadgen merge`.
    Sample(crate::sample::SampleArgs),
    /// Print every --mode value, one a line: `direct`, then the proxy's modes (for scripts).
    Modes,
    /// Draw the c10k charts (SVG and PNG) and results/README.md from stored records, without
    /// running anything.
    Plot {
        /// Directory holding runs/ (charts/ and README.md are written there).
        #[arg(long, default_value = "results")]
        results: PathBuf,
        /// The sweep to draw (`--tag` of its runs) [default: the latest finished sweep, as
        /// recorded in results/sweeps/ by scripts/c10k.sh]. Records of other sweeps and
        /// ad-hoc runs never enter its medians.
        #[arg(long)]
        tag: Option<String>,
        /// Write nothing; fail if README.md or the charts differ from what the records produce.
        #[arg(long)]
        check: bool,
    },
}

/// What a run measures: the physical baseline, or the proxy in one of its modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// No proxy: sessions connect straight to the echo target.
    Direct,
    /// The workspace's proxy in this mode.
    Proxy(Mode),
}

impl Target {
    /// `direct`, then every proxy mode in `Mode::ALL` order.
    pub const ALL: [Target; 1 + Mode::ALL.len()] = {
        let mut all = [Target::Direct; 1 + Mode::ALL.len()];
        let mut i = 0;
        while i < Mode::ALL.len() {
            all[i + 1] = Target::Proxy(Mode::ALL[i]);
            i += 1;
        }
        all
    };

    /// The name on the command line and in records.
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Proxy(mode) => mode.name(),
        }
    }
}

impl ValueEnum for Target {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(PossibleValue::new(self.name()))
    }
}

/// How an open-loop pacer waits for the last stretch before a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PacerKind {
    /// Sleep (timerfd, 1 ns slack) until shortly before the send, then poll the clock: the
    /// default; costs little CPU on a small machine.
    Sleep,
    /// Poll the clock and the sockets without ever sleeping: the most exact schedule, and a
    /// whole core per pacer thread.
    Spin,
}

impl PacerKind {
    /// The name in records.
    pub fn name(self) -> &'static str {
        match self {
            PacerKind::Sleep => "sleep",
            PacerKind::Spin => "spin",
        }
    }
}

/// When open-loop messages are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Arrivals {
    /// Evenly spaced: the default, comparable between runs.
    Uniform,
    /// Exponential gaps (seeded by --seed): what independent users look like.
    Poisson,
}

impl Arrivals {
    /// The name in records.
    pub fn name(self) -> &'static str {
        match self {
            Arrivals::Uniform => "uniform",
            Arrivals::Poisson => "poisson",
        }
    }
}

/// The settings of a measured run.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Concurrent sessions to open.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub conns: u64,

    /// Proxy mode to start, or `direct` for no proxy (the physical baseline).
    #[arg(long, value_enum, default_value_t = Target::Proxy(Mode::Async))]
    pub mode: Target,

    /// Measure an external SOCKS5 server at HOST:PORT instead of starting one.
    #[arg(long, value_name = "HOST:PORT")]
    pub proxy: Option<SocketAddr>,

    /// The external server's PID (it and its descendants are measured).
    #[arg(long, requires = "proxy")]
    pub proxy_pid: Option<u32>,

    /// Name for the run in records and charts [default: the mode, or "external"].
    #[arg(long)]
    pub label: Option<String>,

    /// What the external server is (name and version), kept in the record.
    #[arg(long, requires = "proxy", value_name = "TEXT")]
    pub proxy_version: Option<String>,

    /// How the external server was started (its command line and limits), kept in the record.
    #[arg(long, requires = "proxy", value_name = "TEXT")]
    pub proxy_started_with: Option<String>,

    /// Proxy worker processes [default: as many as the descriptor limit requires].
    #[arg(long)]
    pub workers: Option<u16>,

    /// Proxy threads (passed to --threads).
    #[arg(long)]
    pub threads: Option<u16>,

    /// Sessions opened per second during the ramp.
    #[arg(long, default_value_t = 2000.0)]
    pub ramp_rate: f64,

    /// Dials (connect + handshake) in flight at most.
    #[arg(long, default_value_t = 256)]
    pub max_dials: usize,

    /// Username:password for RFC 1929 (also given to the proxy loadgen starts).
    #[arg(long, value_name = "USER:PASS")]
    pub auth: Option<String>,

    /// Bytes per message.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub size: u64,

    /// Measured window (e.g. 10s).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Warm-up before the window, not counted.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// How long all sessions are held idle after the ramp (idle memory is sampled at its end).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub idle_hold: Duration,

    /// Open loop: total messages per second offered, dealt to the sessions in turn and sent by
    /// pacer threads on an absolute schedule (--pacer, --arrivals); latency is measured from
    /// each message's scheduled send time. A list (`1000,10000,50000`) makes one run, with
    /// its own stack and record, per rate, in order. Default: closed loop.
    #[arg(long = "rate", value_name = "RATE[,RATE...]", value_delimiter = ',', value_parser = parse_rate)]
    pub rates: Vec<f64>,

    /// The offered rate of the run in progress (one of `rates`), `None` in closed loop.
    #[arg(skip)]
    pub rate: Option<f64>,

    /// Open loop: how the pacer waits before each send (the record says which).
    #[arg(long, value_enum, default_value_t = PacerKind::Sleep)]
    pub pacer: PacerKind,

    /// Open loop: evenly spaced sends, or Poisson arrivals.
    #[arg(long, value_enum, default_value_t = Arrivals::Uniform)]
    pub arrivals: Arrivals,

    /// Open loop: pacer threads, each owning an equal share of the sessions.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub pacer_threads: u16,

    /// Seed of the Poisson schedule.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Source addresses 127.0.0.1..=127.0.0.K that sessions are spread over
    /// [default: one per 8,000 sessions; ignored when --proxy is not on loopback: the
    /// kernel picks the source].
    #[arg(long)]
    pub sources: Option<u8>,

    /// Limit for one dial and for one message round trip.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub io_timeout: Duration,

    /// Directory for records.
    #[arg(long, default_value = "results")]
    pub results: PathBuf,

    /// A name stored in the record, grouping the runs of one sweep.
    #[arg(long)]
    pub tag: Option<String>,

    /// loadgen's own runtime threads, which dial and run the phases (and, in closed loop, the
    /// sessions) [default: 1 for open loop, where the pacer threads send; every core for
    /// closed loop].
    #[arg(long)]
    pub loadgen_threads: Option<usize>,

    /// Do not write a record (still prints the summary).
    #[arg(long)]
    pub no_record: bool,

    /// The proxy binary [default: `proxy` beside this executable].
    #[arg(long)]
    pub proxy_bin: Option<PathBuf>,

    /// No progress bar or status lines.
    #[arg(long, short)]
    pub quiet: bool,

    /// Print the record as JSON on stdout (implies --quiet).
    #[arg(long)]
    pub json: bool,

    /// Run as this many agent processes, each holding its share of --conns under the
    /// descriptor limit, with one merged record [default: as many as the limit requires].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub agents: Option<u32>,

    /// Run only segment I of K (0-based) of the --conns sessions: sessions
    /// ⌊N·I/K⌋..⌊N·(I+1)/K⌋, with the same share of --rate and --ramp-rate. Agents of one run
    /// share --start-at; `loadgen merge` joins their records.
    #[arg(long, value_name = "I/K", default_value = "0/1")]
    pub segment: Segment,

    /// Start the ramp at this absolute time (RFC 3339, e.g. 2026-12-04T03:00:00.5Z, or Unix
    /// seconds), and every later phase at a fixed offset from it, so agents on several
    /// processes or hosts measure the same window. Their clocks must agree (chrony/PTP).
    #[arg(long, value_name = "TIME", value_parser = parse_start_at)]
    pub start_at: Option<SystemTime>,

    /// Use the echo target at these addresses instead of starting one (agents: the one their
    /// parent started; on several hosts: an echo target the proxy can reach, e.g. a
    /// `loadgen echo` process or service). Session i uses address i mod the count.
    #[arg(long = "echo", value_name = "ADDR[,ADDR...]", value_delimiter = ',')]
    pub echo: Vec<SocketAddr>,

    /// Internal (agents): processes whose memory this agent records as the echo target's.
    #[arg(long = "echo-pid", hide = true, value_delimiter = ',')]
    pub echo_pids: Vec<u32>,

    /// Internal (agents): report progress as status lines on stderr for the parent.
    #[arg(long, hide = true)]
    pub agent_status: bool,
}

/// The share of one core that all agents of a run together may spend polling before their
/// sends (each thread's margin is capped at its slice of its gap).
pub const AGENTS_POLL_BUDGET: f64 = 0.25;

/// An absolute start time: RFC 3339, or Unix seconds (fractions allowed).
pub fn parse_start_at(text: &str) -> Result<SystemTime, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        if seconds.is_finite() && seconds >= 0.0 {
            return Ok(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(seconds));
        }
    }
    humantime::parse_rfc3339(text).map_err(|err| {
        format!(
            "{text:?} is not a time (RFC 3339 like 2026-12-04T03:00:00Z, or Unix seconds): {err}"
        )
    })
}

/// One offered rate: messages per second, positive and finite.
fn parse_rate(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        Ok(_) => Err(format!(
            "{text:?} is not a positive number of messages per second"
        )),
        Err(_) => Err(format!("{text:?} is not a number of messages per second")),
    }
}

impl RunArgs {
    /// The runs this invocation makes: each offered rate of `--rate` in order, or one closed-loop
    /// run.
    pub fn each_run(&self) -> Vec<Option<f64>> {
        if self.rates.is_empty() {
            vec![None]
        } else {
            self.rates.iter().copied().map(Some).collect()
        }
    }

    /// No progress bar or status lines.
    pub fn is_quiet(&self) -> bool {
        self.quiet || self.json
    }

    /// loadgen's runtime threads for this run.
    pub fn runtime_threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.loadgen_threads
            .unwrap_or(if self.rate.is_some() { 1 } else { cores })
            .max(1)
    }

    /// The open-loop pacer's settings, or `None` in closed loop.
    pub fn pacer_config(&self) -> Option<crate::pacer::PacerConfig> {
        self.rate.map(|rate| crate::pacer::PacerConfig {
            kind: self.pacer,
            arrivals: self.arrivals,
            rate: self.segment.scale(rate, self.conns as usize),
            threads: usize::from(self.pacer_threads),
            size: self.size as usize,
            io_timeout: self.io_timeout,
            // Each agent's Poisson stream must be its own, not a copy of agent 0's.
            seed: self
                .seed
                .wrapping_add(u64::from(self.segment.index).wrapping_mul(1 << 20)),
            phase: self.segment.phase(),
            poll_share: if self.segment.is_split() {
                AGENTS_POLL_BUDGET
                    / (f64::from(self.segment.count) * f64::from(self.pacer_threads.max(1)))
            } else {
                f64::INFINITY
            },
        })
    }

    /// The ramp rate of this agent's share of the sessions.
    pub fn segment_ramp_rate(&self) -> f64 {
        self.segment.scale(self.ramp_rate, self.conns as usize)
    }

    /// The username and password of `--auth`.
    pub fn credentials(&self) -> anyhow::Result<Option<(String, String)>> {
        self.auth
            .as_deref()
            .map(|spec| {
                let (name, pass) = spec
                    .split_once(':')
                    .ok_or_else(|| anyhow::anyhow!("--auth must be USER:PASS"))?;
                Ok((name.to_owned(), pass.to_owned()))
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mode_and_direct_parse_as_targets() {
        assert_eq!(Target::ALL[0], Target::Direct);
        assert_eq!(Target::ALL.len(), Mode::ALL.len() + 1);
        for target in Target::ALL {
            assert_eq!(Target::from_str(target.name(), false), Ok(target));
        }
        assert!(Target::from_str("nonsense", false).is_err());
        let args = Args::try_parse_from(["loadgen", "--mode", "epoll-et"]).expect("parses");
        assert_eq!(args.run.mode, Target::Proxy(Mode::EpollEt));
    }

    #[test]
    fn rate_takes_a_list_and_refuses_what_is_not_a_rate() {
        let closed = Args::try_parse_from(["loadgen"]).expect("parses");
        assert_eq!(closed.run.each_run(), vec![None]);
        let one = Args::try_parse_from(["loadgen", "--rate", "2500"]).expect("parses");
        assert_eq!(one.run.each_run(), vec![Some(2500.0)]);
        let list = Args::try_parse_from(["loadgen", "--rate", "1000,10000,50000"]).expect("parses");
        assert_eq!(
            list.run.each_run(),
            vec![Some(1000.0), Some(10000.0), Some(50000.0)]
        );
        for bad in ["0", "-5", "ten", "1000,,2000", "inf", "NaN"] {
            assert!(
                Args::try_parse_from(["loadgen", "--rate", bad]).is_err(),
                "--rate {bad} was accepted"
            );
        }
    }
}
