//! The open-loop pacer: plain threads (not the async runtime) that own the established
//! sessions and send on an absolute schedule, so the instrument's own timing error stays in
//! the tens of microseconds and is measured in every record.
//!
//! Each pacer thread owns its share of the sessions (session `id` goes to thread
//! `id % threads`) and one epoll set holding their sockets and a timerfd. It sleeps in
//! `epoll_wait` until shortly before the next send — the timerfd is armed at an absolute
//! CLOCK_MONOTONIC time with nanosecond resolution, and the thread's timer slack is 1 ns — so
//! echoes that arrive meanwhile wake it and are timestamped when they arrive. For the last
//! stretch it polls the clock, draining ready sockets with zero-timeout waits. The stretch
//! (the margin) adapts to how late the timer has been waking this thread. `--pacer spin`
//! never sleeps: the most exact schedule, at the price of a core per pacer thread.
//!
//! (epoll_pwait2 would give the same microsecond timeouts without a timerfd, but rustix only
//! uses it when built with its `linux_5_11` feature, which the workspace would then impose on
//! the proxy's own epoll mode too.)
//!
//! The schedule is the offered load: evenly spaced (`uniform`) or with exponential gaps
//! (`poisson`, seeded), dealt to the thread's sessions in turn. A session whose previous
//! message has not come back owes the send and makes it the moment the echo arrives; its
//! latency still counts from the scheduled time (no coordinated omission).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::num::NonZeroU64;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Exp};
use rustix::event::epoll;
use rustix::time::{
    timerfd_create, timerfd_settime, ClockId, Itimerspec, TimerfdClockId, TimerfdFlags,
    TimerfdTimerFlags, Timespec,
};

use crate::cli::{Arrivals, PacerKind};
use crate::measure::{histogram, Phase, Shared};
use crate::record::Cause;
use crate::workload::fill_pattern;

/// A send more than this late counts as late in the record.
pub const LATE_NS: u64 = 50_000;
const TIMER: u64 = u64::MAX;
/// The longest a pacer sleeps, so it notices a phase change promptly even at low rates.
const MAX_SLEEP_NS: u64 = 10_000_000;
/// How often in-flight messages are checked against `--io-timeout`.
const TIMEOUT_SWEEP_NS: u64 = 100_000_000;
/// How long the pacer waits for messages in flight once the run stops.
const DRAIN_NS: u64 = 10_000_000_000;

/// What every pacer thread is told.
#[derive(Debug, Clone)]
pub struct PacerConfig {
    /// How the last stretch before a send is waited.
    pub kind: PacerKind,
    /// The shape of the schedule.
    pub arrivals: Arrivals,
    /// Messages per second offered, over all threads.
    pub rate: f64,
    /// Pacer threads.
    pub threads: usize,
    /// Bytes per message.
    pub size: usize,
    /// Limit for one message round trip.
    pub io_timeout: Duration,
    /// Seed of the Poisson schedule (thread i uses seed + i).
    pub seed: u64,
    /// The share of the gap between its sends a thread may spend polling before a send (its
    /// margin is capped at this × the gap): unlimited for one process; for an agent, a slice
    /// of a common budget, because K agents polling on one host would take its cores from the
    /// server under test and make every wake-up later still.
    pub poll_share: f64,

    /// Where this agent's schedule starts within one gap, as a fraction of it
    /// ([`Segment::phase`](crate::segment::Segment::phase)): agents interleave their sends.
    pub phase: f64,
}

/// What one pacer thread measured.
pub struct PacerReport {
    /// Round trip from the scheduled send time, µs (measured window only).
    pub rtt: Histogram<u64>,
    /// From the actual write to the echo, µs.
    pub service: Histogram<u64>,
    /// How late the pacer acted on each scheduled send, µs.
    pub lateness: Histogram<u64>,
    /// Scheduled sends due in the measured window that the pacer acted on.
    pub dispatched: u64,
    /// Scheduled sends due in the measured window that the pacer had not reached when the
    /// window closed (it fell behind its schedule).
    pub backlog: u64,
    /// Sends scheduled in the window that never completed: their session broke, or they
    /// were still owed or out when the drain ended (counted as lost, never as fast).
    pub unfinished: u64,
    /// Pacer threads that had sessions.
    pub active_threads: u64,
    /// Of those, how many more than [`LATE_NS`] late.
    pub late: u64,
    /// Of those, how many waited for the session's previous echo.
    pub queued_behind_echo: u64,
    /// Scheduled sends with no live session left to carry them.
    pub skipped: u64,
    /// Nanoseconds of the window the pacer spent blocked in epoll_wait (its timer or an echo).
    pub slept_ns: u64,
    /// Nanoseconds of the window the pacer polled with nothing to do (the spin before a send).
    pub idle_poll_ns: u64,
}

impl PacerReport {
    fn new() -> Self {
        PacerReport {
            rtt: histogram(),
            service: histogram(),
            lateness: histogram(),
            dispatched: 0,
            backlog: 0,
            unfinished: 0,
            active_threads: 0,
            late: 0,
            queued_behind_echo: 0,
            skipped: 0,
            slept_ns: 0,
            idle_poll_ns: 0,
        }
    }

    /// Adds another thread's report to this one.
    pub fn merge(&mut self, other: PacerReport) {
        let _ = self.rtt.add(other.rtt);
        let _ = self.service.add(other.service);
        let _ = self.lateness.add(other.lateness);
        self.dispatched += other.dispatched;
        self.backlog += other.backlog;
        self.unfinished += other.unfinished;
        self.active_threads += other.active_threads;
        self.late += other.late;
        self.queued_behind_echo += other.queued_behind_echo;
        self.skipped += other.skipped;
        self.slept_ns += other.slept_ns;
        self.idle_poll_ns += other.idle_poll_ns;
    }
}

/// The running pacer threads and the way sessions are handed to them.
pub struct Pacers {
    inlets: Vec<Sender<(usize, TcpStream)>>,
    threads: Vec<JoinHandle<PacerReport>>,
}

/// Where dialed sessions go: cloned into every session task.
#[derive(Clone)]
pub struct Inlet(Arc<Vec<Sender<(usize, TcpStream)>>>);

impl Inlet {
    /// Hands session `id`'s established connection to its pacer thread; false if that thread
    /// is gone (the session is then lost, and the caller must count it).
    pub fn hand_over(&self, id: usize, stream: TcpStream) -> bool {
        self.0[id % self.0.len()].send((id, stream)).is_ok()
    }
}

impl Pacers {
    /// Starts the pacer threads; they take sessions now and start sending at the warm-up.
    pub fn start(config: &PacerConfig, shared: Arc<Shared>) -> io::Result<Pacers> {
        let mut inlets = Vec::new();
        let mut threads = Vec::new();
        for index in 0..config.threads.max(1) {
            let (tx, rx) = mpsc::channel();
            let config = config.clone();
            let shared = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("loadgen-pacer-{index}"))
                    .spawn(move || run(index, &config, &rx, &shared))?,
            );
            inlets.push(tx);
        }
        Ok(Pacers { inlets, threads })
    }

    /// The inlet sessions are handed over through.
    pub fn inlet(&self) -> Inlet {
        Inlet(Arc::new(self.inlets.clone()))
    }

    /// Waits for every pacer thread (they end after the stop phase) and merges their reports.
    pub fn join(self) -> PacerReport {
        drop(self.inlets);
        let mut total = PacerReport::new();
        for thread in self.threads {
            if let Ok(report) = thread.join() {
                total.merge(report);
            }
        }
        total
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn timespec(ns: u64) -> Timespec {
    Timespec {
        tv_sec: (ns / 1_000_000_000) as i64,
        tv_nsec: (ns % 1_000_000_000) as i64,
    }
}

/// Makes this thread's timers fire when asked, not up to 50 µs later (the default slack).
pub fn tighten_timer_slack() {
    let _ = rustix::thread::set_current_timer_slack(NonZeroU64::new(1));
}

/// A message on its way: when it was due, when it was written, and whether it counts.
struct InFlight {
    scheduled: u64,
    written: u64,
    measured: bool,
    /// Bytes of it not written yet (a short write), or 0.
    unwritten: usize,
}

struct Session {
    id: usize,
    stream: TcpStream,
    seq: u64,
    in_flight: Option<InFlight>,
    /// Sends owed while the previous message was out: when each was due, and whether it was
    /// due in the measured window.
    owed: VecDeque<(u64, bool)>,
    received: Vec<u8>,
    alive: bool,
}

/// The gaps between scheduled sends of one thread.
struct Schedule {
    gap_ns: f64,
    poisson: Option<(SmallRng, Exp<f64>)>,
    next: f64,
}

impl Schedule {
    /// The schedule of thread `index` holding `sessions` of the `total` established, from
    /// `start` (the same for every thread).
    fn new(
        config: &PacerConfig,
        index: usize,
        sessions: usize,
        total: usize,
        start: u64,
    ) -> Schedule {
        let rate = config.rate * sessions as f64 / total.max(1) as f64;
        let gap_ns = 1e9 / rate.max(1e-9);
        // Threads interleave their evenly spaced sends rather than send together.
        let offset = gap_ns * (index as f64 + config.phase) / config.threads.max(1) as f64;
        let poisson = (config.arrivals == Arrivals::Poisson).then(|| {
            let rng = SmallRng::seed_from_u64(config.seed.wrapping_add(index as u64));
            (
                rng,
                Exp::new(1.0 / gap_ns).unwrap_or_else(|_| Exp::new(1.0).expect("rate 1")),
            )
        });
        Schedule {
            gap_ns,
            poisson,
            next: start as f64 + offset,
        }
    }

    fn due(&self) -> u64 {
        self.next as u64
    }

    fn advance(&mut self) {
        self.next += match &mut self.poisson {
            Some((rng, exp)) => exp.sample(rng),
            None => self.gap_ns,
        };
    }
}

/// How early the thread wakes before a send: a running mean and mean deviation of how late
/// its timer fired, mean + 4 deviations, within [5 µs, `cap`] (2 ms, or less for an agent:
/// see [`PacerConfig::poll_share`]). On a machine whose wake-ups are late by more than the
/// gap between sends (this 2-core VM: ~40–140 µs), the pacer ends up polling most of the
/// time to keep the schedule; the record says how much it slept.
struct Margin {
    mean: f64,
    deviation: f64,
    cap: f64,
}

impl Margin {
    fn new(cap_ns: f64) -> Self {
        Margin {
            mean: 20_000.0,
            deviation: 10_000.0,
            cap: cap_ns.clamp(5_000.0, 2_000_000.0),
        }
    }

    fn ns(&self) -> u64 {
        (self.mean + 4.0 * self.deviation).clamp(5_000.0, self.cap) as u64
    }

    fn observe(&mut self, late_ns: u64) {
        let late = late_ns as f64;
        self.deviation += ((late - self.mean).abs() - self.deviation) / 16.0;
        self.mean += (late - self.mean) / 16.0;
    }

    /// Forgets a little at every send, so one hiccup cannot keep the pacer polling for the
    /// rest of the run: a margin that no wake-up refreshes halves in about 69,000 sends, until
    /// the pacer sleeps (and measures) again.
    fn relax(&mut self) {
        self.mean *= 0.99999;
        self.deviation *= 0.99999;
    }
}

/// What one wait saw.
struct Waited {
    /// Sockets served.
    served: usize,
    /// Whether the timer fired.
    timer_fired: bool,
    /// When epoll_wait returned.
    returned: u64,
    /// How long it blocked.
    blocked_ns: u64,
}

struct Pacer<'a> {
    config: &'a PacerConfig,
    shared: &'a Shared,
    epoll: OwnedFd,
    timer: OwnedFd,
    sessions: Vec<Session>,
    turn: usize,
    expected: Vec<u8>,
    report: PacerReport,
}

fn run(
    index: usize,
    config: &PacerConfig,
    inlet: &Receiver<(usize, TcpStream)>,
    shared: &Shared,
) -> PacerReport {
    tighten_timer_slack();
    let mut waiting = Vec::new();
    while shared.phase() < Phase::Warmup {
        waiting.extend(inlet.try_iter());
        std::thread::sleep(Duration::from_millis(5));
    }
    waiting.extend(inlet.try_iter());
    if shared.phase() == Phase::Stop {
        for _ in waiting {
            Shared::count(&shared.dropped, Cause::Timeout);
        }
        return PacerReport::new();
    }
    match Pacer::new(config, shared) {
        Ok(mut pacer) => {
            for (id, stream) in waiting {
                pacer.adopt(id, stream);
            }
            pacer.pace(index, inlet);
            pacer.drain();
            pacer.report
        }
        Err(err) => {
            eprintln!("loadgen: pacer {index} cannot start: {err}");
            for _ in waiting.into_iter().chain(inlet.try_iter()) {
                Shared::count(&shared.dropped, Cause::of(&err));
            }
            PacerReport::new()
        }
    }
}

impl<'a> Pacer<'a> {
    fn new(config: &'a PacerConfig, shared: &'a Shared) -> io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let timer = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        epoll::add(
            &epoll,
            &timer,
            epoll::EventData::new_u64(TIMER),
            epoll::EventFlags::IN,
        )?;
        Ok(Pacer {
            config,
            shared,
            epoll,
            timer,
            sessions: Vec::new(),
            turn: 0,
            expected: vec![0; config.size],
            report: PacerReport::new(),
        })
    }

    /// Takes over an established session; one that cannot be watched is counted as dropped.
    fn adopt(&mut self, id: usize, stream: TcpStream) {
        let key = self.sessions.len();
        let watched = stream.set_nonblocking(true).and_then(|()| {
            epoll::add(
                &self.epoll,
                &stream,
                epoll::EventData::new_u64(key as u64),
                epoll::EventFlags::IN,
            )
            .map_err(io::Error::from)
        });
        if let Err(err) = watched {
            Shared::count(&self.shared.dropped, Cause::of(&err));
            return;
        }
        self.sessions.push(Session {
            id,
            stream,
            seq: 0,
            in_flight: None,
            owed: VecDeque::new(),
            received: Vec::with_capacity(self.config.size),
            alive: true,
        });
    }

    /// Sends on schedule until the stop phase.
    fn pace(&mut self, index: usize, inlet: &Receiver<(usize, TcpStream)>) {
        if self.sessions.is_empty() {
            return;
        }
        self.report.active_threads = 1;
        let total = self.shared.established.load(Ordering::Acquire) as usize;
        let start = self.shared.warmup_started_ns.load(Ordering::Acquire);
        let mut schedule = Schedule::new(self.config, index, self.sessions.len(), total, start);
        let mut margin = Margin::new(schedule.gap_ns * self.config.poll_share);
        let mut events = Vec::with_capacity(256);
        let mut next_sweep = now_ns() + TIMEOUT_SWEEP_NS;
        let mut was_measuring = false;
        loop {
            let phase = self.shared.phase();
            if phase == Phase::Stop {
                // Sends due in the window that were never reached: the pacer fell behind.
                let now = now_ns();
                while was_measuring && schedule.due() <= now {
                    self.report.backlog += 1;
                    schedule.advance();
                }
                return;
            }
            was_measuring = phase == Phase::Measure;
            let now = now_ns();
            let due = schedule.due();
            if now >= due {
                self.dispatch(due, now, phase);
                schedule.advance();
                margin.relax();
                // Catch up on every send already due before looking at sockets again.
                continue;
            }
            let sleep = self.config.kind == PacerKind::Sleep && due - now > margin.ns();
            let wake_at = if sleep {
                (due - margin.ns()).min(now + MAX_SLEEP_NS)
            } else {
                0
            };
            let measured = phase == Phase::Measure;
            if sleep && self.arm(wake_at).is_ok() {
                let waited = self.wait(&mut events, None);
                if waited.timer_fired {
                    margin.observe(waited.returned.saturating_sub(wake_at));
                }
                if measured {
                    self.report.slept_ns += waited.blocked_ns;
                }
            } else {
                // The last stretch (or no timer): poll, exact but dear.
                let waited = self.wait(&mut events, Some(Duration::ZERO));
                if measured && waited.served == 0 {
                    self.report.idle_poll_ns += now_ns() - now;
                }
            }
            if now >= next_sweep {
                self.expire_timeouts(now);
                // A session dialed late (after the warm-up began) joins the rotation.
                for (id, stream) in inlet.try_iter() {
                    self.adopt(id, stream);
                }
                next_sweep = now + TIMEOUT_SWEEP_NS;
            }
        }
    }

    /// After the stop phase: the sends due in the window that still wait for an echo go out
    /// and the messages in flight come back, within the drain bound and `--io-timeout`; what
    /// has not come back then is counted as unfinished. Then the sessions end with a FIN.
    fn drain(&mut self) {
        let deadline = now_ns() + DRAIN_NS;
        let mut events = Vec::with_capacity(256);
        for session in &mut self.sessions {
            session.owed.retain(|&(_, measured)| measured);
        }
        let busy = |pacer: &Pacer<'_>| {
            pacer
                .sessions
                .iter()
                .any(|s| s.alive && (s.in_flight.is_some() || !s.owed.is_empty()))
        };
        while now_ns() < deadline && busy(self) {
            self.wait(&mut events, Some(Duration::from_millis(10)));
            self.expire_timeouts(now_ns());
        }
        for key in 0..self.sessions.len() {
            let session = &self.sessions[key];
            if session.alive && (session.in_flight.is_some() || !session.owed.is_empty()) {
                self.drop_session(key, Cause::Timeout);
            }
        }
        for session in &self.sessions {
            let _ = session.stream.shutdown(std::net::Shutdown::Write);
        }
    }

    fn arm(&self, at_ns: u64) -> io::Result<()> {
        let spec = Itimerspec {
            it_interval: timespec(0),
            it_value: timespec(at_ns.max(1)),
        };
        timerfd_settime(&self.timer, TimerfdTimerFlags::ABSTIME, &spec)?;
        Ok(())
    }

    /// Waits for readiness (`None`: until something happens) and serves it.
    fn wait(&mut self, events: &mut Vec<epoll::Event>, timeout: Option<Duration>) -> Waited {
        events.clear();
        let timeout = timeout.map(|t| timespec(t.as_nanos() as u64));
        let before = now_ns();
        let result = epoll::wait(
            &self.epoll,
            rustix::buffer::spare_capacity(events),
            timeout.as_ref(),
        );
        let returned = now_ns();
        match result {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(err) => {
                eprintln!("loadgen: pacer wait failed: {err}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut timer_fired = false;
        let mut served = 0;
        for event in events.iter() {
            let key = event.data.u64();
            if key == TIMER {
                let mut expirations = [0u8; 8];
                let _ = rustix::io::read(&self.timer, &mut expirations);
                timer_fired = true;
                continue;
            }
            served += 1;
            let flags = event.flags;
            if flags.contains(epoll::EventFlags::OUT) {
                self.continue_write(key as usize);
            }
            if flags
                .intersects(epoll::EventFlags::IN | epoll::EventFlags::HUP | epoll::EventFlags::ERR)
            {
                self.on_readable(key as usize);
            }
        }
        Waited {
            served,
            timer_fired,
            returned,
            blocked_ns: returned - before,
        }
    }

    /// Acts on the send scheduled at `due`: the next live session sends now, or owes it.
    fn dispatch(&mut self, due: u64, now: u64, phase: Phase) {
        let measured = phase == Phase::Measure;
        let late = now - due;
        if measured {
            let _ = self.report.lateness.record((late / 1000).max(1));
            self.report.dispatched += 1;
            if late > LATE_NS {
                self.report.late += 1;
            }
        }
        let count = self.sessions.len();
        let Some(key) = (0..count)
            .map(|step| (self.turn + step) % count)
            .find(|&key| self.sessions[key].alive)
        else {
            if measured {
                self.report.skipped += 1;
            }
            return;
        };
        self.turn = (key + 1) % count;
        if self.sessions[key].in_flight.is_some() {
            self.sessions[key].owed.push_back((due, measured));
            if measured {
                self.report.queued_behind_echo += 1;
            }
            return;
        }
        self.send(key, due, measured);
    }

    /// Writes the session's next message, due at `scheduled`.
    fn send(&mut self, key: usize, scheduled: u64, measured: bool) {
        let size = self.config.size;
        let session = &mut self.sessions[key];
        fill_pattern(&mut self.expected, session.id, session.seq);
        let written = now_ns();
        let sent = match (&session.stream).write(&self.expected) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
            Err(err) => return self.drop_session(key, Cause::of(&err)),
        };
        session.received.clear();
        session.in_flight = Some(InFlight {
            scheduled,
            written,
            measured,
            unwritten: size - sent,
        });
        if sent < size {
            self.watch(key, true);
        }
    }

    /// Finishes a short write once the socket takes more.
    fn continue_write(&mut self, key: usize) {
        let size = self.config.size;
        let session = &mut self.sessions[key];
        let Some(flight) = session.in_flight.as_mut() else {
            return;
        };
        if flight.unwritten == 0 || !session.alive {
            return;
        }
        fill_pattern(&mut self.expected, session.id, session.seq);
        match (&session.stream).write(&self.expected[size - flight.unwritten..]) {
            Ok(n) => flight.unwritten -= n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
            Err(err) => return self.drop_session(key, Cause::of(&err)),
        }
        if flight.unwritten == 0 {
            self.watch(key, false);
        }
    }

    fn watch(&self, key: usize, writable: bool) {
        let mut flags = epoll::EventFlags::IN;
        if writable {
            flags |= epoll::EventFlags::OUT;
        }
        let _ = epoll::modify(
            &self.epoll,
            &self.sessions[key].stream,
            epoll::EventData::new_u64(key as u64),
            flags,
        );
    }

    fn on_readable(&mut self, key: usize) {
        let size = self.config.size;
        let session = &mut self.sessions[key];
        if !session.alive {
            return;
        }
        let mut buf = [0u8; 16 * 1024];
        loop {
            let want = if session.in_flight.is_some() {
                (size - session.received.len()).min(buf.len())
            } else {
                // Nothing is owed to us: any byte, or the end, means the session broke.
                1
            };
            if want == 0 {
                break;
            }
            match (&session.stream).read(&mut buf[..want]) {
                Ok(0) => return self.drop_session(key, Cause::Eof),
                Ok(_) if session.in_flight.is_none() => {
                    self.shared.corrupted.fetch_add(1, Ordering::Relaxed);
                    return self.drop_session(key, Cause::Corrupted);
                }
                Ok(n) => session.received.extend_from_slice(&buf[..n]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return self.drop_session(key, Cause::of(&err)),
            }
        }
        if session.received.len() == size {
            self.complete(key);
        }
    }

    /// A whole echo arrived: check it, count it, and send what is owed.
    fn complete(&mut self, key: usize) {
        let done = now_ns();
        let session = &mut self.sessions[key];
        let Some(flight) = session.in_flight.take() else {
            return;
        };
        fill_pattern(&mut self.expected, session.id, session.seq);
        if session.received != self.expected {
            self.shared.corrupted.fetch_add(1, Ordering::Relaxed);
            return self.drop_session(key, Cause::Corrupted);
        }
        session.seq += 1;
        session.received.clear();
        self.shared.messages_total.fetch_add(1, Ordering::Relaxed);
        // Throughput counts what completes in the window; latency, what was due in it.
        if self.shared.phase() == Phase::Measure {
            self.shared.messages.fetch_add(1, Ordering::Relaxed);
        }
        if flight.measured {
            let _ = self
                .report
                .rtt
                .record(((done - flight.scheduled.min(done)) / 1000).max(1));
            let _ = self
                .report
                .service
                .record(((done - flight.written.min(done)) / 1000).max(1));
        }
        if let Some((due, measured)) = session.owed.pop_front() {
            self.send(key, due, measured);
        }
    }

    fn expire_timeouts(&mut self, now: u64) {
        let limit = self.config.io_timeout.as_nanos() as u64;
        for key in 0..self.sessions.len() {
            let session = &self.sessions[key];
            let expired = session
                .in_flight
                .as_ref()
                .is_some_and(|flight| now.saturating_sub(flight.written) > limit);
            if session.alive && expired {
                self.drop_session(key, Cause::Timeout);
            }
        }
    }

    fn drop_session(&mut self, key: usize, cause: Cause) {
        let session = &mut self.sessions[key];
        if !session.alive {
            return;
        }
        session.alive = false;
        let lost = session
            .in_flight
            .take()
            .filter(|f| f.measured)
            .map_or(0, |_| 1)
            + session
                .owed
                .iter()
                .filter(|&&(_, measured)| measured)
                .count() as u64;
        self.report.unfinished += lost;
        session.owed.clear();
        let _ = epoll::delete(&self.epoll, session.stream.as_fd());
        Shared::count(&self.shared.dropped, cause);
    }
}

/// The host's own hiccups: how late a thread that sleeps 1 ms at a time wakes, recorded in
/// the measured window, until the stop phase. Runs on its own thread.
pub fn control_sleeper(shared: Arc<Shared>) -> JoinHandle<Histogram<u64>> {
    std::thread::spawn(move || {
        tighten_timer_slack();
        let mut lateness = histogram();
        const NAP: Duration = Duration::from_millis(1);
        while shared.phase() != Phase::Stop {
            let before = now_ns();
            std::thread::sleep(NAP);
            let late = now_ns().saturating_sub(before + NAP.as_nanos() as u64);
            if shared.phase() == Phase::Measure {
                let _ = lateness.record((late / 1000).max(1));
            }
        }
        lateness
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(arrivals: Arrivals) -> PacerConfig {
        PacerConfig {
            kind: PacerKind::Sleep,
            arrivals,
            rate: 10_000.0,
            threads: 2,
            size: 16,
            io_timeout: Duration::from_secs(1),
            seed: 7,
            phase: 0.0,
            poll_share: f64::INFINITY,
        }
    }

    #[test]
    fn agents_interleave_their_schedules() {
        // Two agents of one 10,000 msg/s run, one pacer thread each: 5,000 msg/s apiece,
        // agent 1 half a gap after agent 0, so together they send every 100 µs.
        let agent = |index: u32| {
            let segment = crate::segment::Segment { index, count: 2 };
            PacerConfig {
                rate: segment.scale(10_000.0, 100),
                threads: 1,
                phase: segment.phase(),
                ..config(Arrivals::Uniform)
            }
        };
        let mut zero = Schedule::new(&agent(0), 0, 50, 50, 0);
        let mut one = Schedule::new(&agent(1), 0, 50, 50, 0);
        let mut sends = Vec::new();
        for _ in 0..3 {
            sends.push(zero.due());
            sends.push(one.due());
            zero.advance();
            one.advance();
        }
        assert_eq!(sends, [0, 100_000, 200_000, 300_000, 400_000, 500_000]);
    }

    #[test]
    fn uniform_schedules_are_even_and_threads_interleave() {
        let config = config(Arrivals::Uniform);
        // Thread 0 and 1 hold 50 sessions each: 5,000 msg/s each, 200 µs apart, 100 µs offset.
        let mut zero = Schedule::new(&config, 0, 50, 100, 1_000_000);
        let mut one = Schedule::new(&config, 1, 50, 100, 1_000_000);
        assert_eq!(zero.due(), 1_000_000);
        assert_eq!(one.due(), 1_100_000);
        zero.advance();
        one.advance();
        assert_eq!(zero.due(), 1_200_000);
        assert_eq!(one.due(), 1_300_000);
    }

    #[test]
    fn poisson_schedules_are_seeded_and_keep_the_mean_rate() {
        let config = config(Arrivals::Poisson);
        let gaps = |seed_thread: usize| {
            let mut schedule = Schedule::new(&config, seed_thread, 50, 100, 0);
            let first = schedule.due();
            for _ in 0..20_000 {
                schedule.advance();
            }
            (schedule.due() - first) as f64 / 20_000.0
        };
        let mean = gaps(0);
        assert!((mean - 200_000.0).abs() < 200_000.0 * 0.03, "{mean}");
        assert_eq!(gaps(0), mean, "the same seed gives the same schedule");
        assert_ne!(gaps(1), mean, "threads draw different gaps");
    }

    #[test]
    fn the_margin_follows_how_late_the_timer_wakes() {
        let mut margin = Margin::new(f64::INFINITY);
        for _ in 0..200 {
            margin.observe(3_000);
        }
        assert!(margin.ns() <= 6_000, "{}", margin.ns());
        for _ in 0..200 {
            margin.observe(400_000);
        }
        assert!(margin.ns() >= 400_000, "{}", margin.ns());
        // An agent among several polls at most its share of the gap, however late it wakes.
        let mut capped = Margin::new(25_000.0);
        for _ in 0..200 {
            capped.observe(400_000);
        }
        assert_eq!(capped.ns(), 25_000);
    }
}
