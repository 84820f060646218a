//! `threads` mode: one OS thread per session, as microsocks does.
//!
//! Each session thread blocks on its own sockets only: in the handshake, and in the relay in
//! poll(2) over its two sockets (plus a process-wide stop descriptor for the end of the grace
//! period). The thread's stack is small and explicit (`--stack-size`); only the pages it
//! touches count towards RSS.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustix::event::{eventfd, poll, EventfdFlags, PollFd, PollFlags, Timespec};

use super::session::{self, Dialer, SessionError, EXHAUSTION_BACKOFF};
use crate::config::access_log::SessionTrail;
use crate::config::{Config, LiveConfig};
use crate::net::connect;
use crate::net::limits;
use crate::net::resolver::Resolver;
use crate::net::BurstLog;
use crate::relay::{self, Pipe, PipeState, ReadUntil};
use crate::shutdown::Shutdown;
use crate::socks5::wire::MAX_MESSAGE_LEN;
use crate::socks5::{Command, Failure, Step, TargetAddr};

/// Default stack per session thread: the handshake, a 16 KiB relay buffer and logging fit with
/// room to spare (debug builds included), and only touched pages cost memory.
pub const DEFAULT_STACK_SIZE: usize = 128 * 1024;
/// The relay buffer, taken from the heap only while a burst of bytes moves and given back
/// before the thread sleeps: an idle session thread holds none.
const THREAD_SCRATCH: usize = 16 * 1024;

static SPAWN_FAILED: BurstLog = BurstLog::new("cannot start a session thread; refusing newcomers");

/// Counts live session threads so shutdown can wait for them.
#[derive(Default)]
struct LiveSessions {
    count: Mutex<usize>,
    changed: Condvar,
}

impl LiveSessions {
    fn count(&self) -> usize {
        *self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(&self, delta: isize) {
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        *count = count.saturating_add_signed(delta);
        self.changed.notify_all();
    }

    /// Waits until no session is left or `deadline` passes; true when none is left.
    fn wait_empty(&self, deadline: Instant) -> bool {
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        while *count > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            count = self
                .changed
                .wait_timeout(count, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// Decrements the live count when a session thread ends, however it ends.
struct LiveGuard(Arc<LiveSessions>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}

/// Serves with a thread per session until `shutdown`, then waits `config.grace` for sessions.
/// Each session takes the configuration current when it is accepted.
pub fn run(listener: TcpListener, config: LiveConfig, shutdown: Shutdown) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let stack_size = config.load().stack_size.unwrap_or(DEFAULT_STACK_SIZE);
    let wake_acceptor = Arc::new(eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?);
    let stop_sessions = Arc::new(eventfd(0, EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC)?);
    {
        let wake = wake_acceptor.clone();
        shutdown.on_trigger(move || {
            let _ = rustix::io::write(&*wake, &1u64.to_ne_bytes());
        });
    }
    let live = Arc::new(LiveSessions::default());
    let mut paused = false;
    while !shutdown.is_triggered() {
        let mut fds = [
            PollFd::new(
                &listener,
                if paused {
                    PollFlags::empty()
                } else {
                    PollFlags::IN
                },
            ),
            PollFd::new(&*wake_acceptor, PollFlags::IN),
        ];
        let backoff = Timespec::try_from(EXHAUSTION_BACKOFF).ok();
        match poll(&mut fds, if paused { backoff.as_ref() } else { None }) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(err) => return Err(err.into()),
        }
        paused = false;
        loop {
            match limits::new_descriptor(|| listener.accept()) {
                Ok((client, peer)) => {
                    let current = config.load();
                    if !spawn_session(client, peer, current, &live, &stop_sessions, stack_size) {
                        // No thread for them either: refuse the others waiting now rather
                        // than one per back-off.
                        limits::refuse_waiting(&listener);
                        paused = true;
                        break;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if limits::is_resource_exhaustion(&err) => {
                    limits::refuse_on_exhaustion(&listener, &err, live.count());
                    paused = true;
                    break;
                }
                Err(err) if limits::is_transient_accept_error(&err) => {}
                Err(err) => {
                    tracing::error!("accept failed: {err}");
                    paused = true;
                    break;
                }
            }
        }
    }
    drop(listener);
    if live.count() > 0 {
        let config = config.load();
        session::log_draining(config.grace, live.count());
        if !live.wait_empty(Instant::now() + config.grace) {
            session::log_grace_over(live.count());
            // The stop descriptor stays readable: every session thread sees it and returns.
            let _ = rustix::io::write(&*stop_sessions, &1u64.to_ne_bytes());
            live.wait_empty(Instant::now() + Duration::from_secs(5));
        }
    }
    Ok(())
}

/// Starts a thread for one client; false when no thread could be started (the client is
/// closed, and the acceptor should pause).
fn spawn_session(
    client: TcpStream,
    peer: SocketAddr,
    config: Arc<Config>,
    live: &Arc<LiveSessions>,
    stop: &Arc<OwnedFd>,
    stack_size: usize,
) -> bool {
    if !session::admit(&config, peer, live.count()) {
        return true;
    }
    live.add(1);
    let guard = LiveGuard(live.clone());
    let stop = stop.clone();
    let spawned = std::thread::Builder::new()
        .stack_size(stack_size)
        .spawn(move || {
            let _guard = guard;
            let mut trail = SessionTrail::begin(config.access_log(), peer);
            let mut moved = (0, 0);
            let result = serve_session(client, peer, &config, &stop, &mut trail, &mut moved);
            let (up, down) = moved;
            match &result {
                Ok(()) => tracing::debug!(%peer, up, down, "session closed"),
                Err(err) => tracing::debug!(%peer, "session ended: {err}"),
            }
            let end = session::end_of(&result);
            trail.finish(config.access_log(), up, down, &end);
        });
    match spawned {
        Ok(_) => true,
        Err(err) => {
            // The closure (with the client and the guard) was dropped: the client is closed
            // and the count is back.
            SPAWN_FAILED.hit(&err);
            crate::metrics::refused(crate::metrics::Refusal::Exhausted);
            false
        }
    }
}

/// Why a wait ended without the socket becoming ready.
fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

fn stopping() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "server shutting down")
}

/// Waits until `stream` is ready for `flags`, `deadline` passes, or the server stops.
fn wait_ready(
    stream: &impl AsFd,
    flags: PollFlags,
    deadline: Instant,
    stop: &OwnedFd,
) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        let timeout = Timespec::try_from(left).ok();
        let mut fds = [PollFd::new(stream, flags), PollFd::new(stop, PollFlags::IN)];
        match poll(&mut fds, timeout.as_ref()) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(err) => return Err(err.into()),
        }
        if !fds[1].revents().is_empty() {
            return Err(stopping());
        }
        if !fds[0].revents().is_empty() {
            return Ok(());
        }
    }
}

/// Writes all of `bytes`, waiting for writability as needed.
fn write_all(
    stream: &TcpStream,
    bytes: &[u8],
    deadline: Instant,
    stop: &OwnedFd,
) -> io::Result<()> {
    let mut written = 0;
    let mut stream_ref = stream;
    while written < bytes.len() {
        match stream_ref.write(&bytes[written..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                wait_ready(stream, PollFlags::OUT, deadline, stop)?
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// One session from greeting to close; `moved` gets the bytes relayed each way (also when the
/// relay ends in an error).
fn serve_session(
    client: TcpStream,
    peer: SocketAddr,
    config: &Config,
    stop: &OwnedFd,
    trail: &mut SessionTrail,
    moved: &mut (u64, u64),
) -> Result<(), SessionError> {
    client.set_nonblocking(true)?;
    let mut handshake = session::new_handshake(config, peer);
    let mut out = Vec::new();
    let deadline = Instant::now() + config.handshake_timeout;
    let mut buf = [0u8; MAX_MESSAGE_LEN];
    let request = loop {
        let step = handshake.step(&mut out);
        write_all(&client, &out, deadline, stop)?;
        out.clear();
        match step {
            Step::NeedInput => {
                let mut client_ref = &client;
                match client_ref.read(&mut buf) {
                    Ok(0) => return Err(SessionError::ClientClosed),
                    Ok(n) => handshake.receive(&buf[..n]),
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        wait_ready(&client, PollFlags::IN, deadline, stop)?
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => return Err(err.into()),
                }
            }
            Step::Request(request) => break request,
            Step::Close(err) => {
                trail.handshake_failed(&handshake, &err);
                return Err(err.into());
            }
        }
    };
    trail.requested(&request);
    let deadline = Instant::now() + config.connect_timeout;
    let outcome = if session::proxied_client_refused(config, &request) {
        Err(Failure::DeniedByRule)
    } else if request.command == Command::Connect {
        connect(&request.target, config, deadline, stop)
    } else {
        // BIND and UDP ASSOCIATE are served by the async mode only.
        Err(Failure::CommandNotSupported)
    };
    let outcome = outcome.and_then(|target| Ok((connect::bound_addr(&target)?, target)));
    let (bound, target) = match outcome {
        Ok(connected) => connected,
        Err(failure) => {
            trail.replied(failure.reply_code());
            let err = handshake.request_failed(failure, &mut out);
            let _ = write_all(
                &client,
                &out,
                Instant::now() + config.handshake_timeout,
                stop,
            );
            session::log_request_failed(None, Some(&request.target), failure);
            return Err(err.into());
        }
    };
    handshake.request_granted(bound, &mut out)?;
    trail.granted(target.peer_addr().ok());
    write_all(
        &client,
        &out,
        Instant::now() + config.handshake_timeout,
        stop,
    )?;
    let leftover = handshake.take_leftover();
    drop(handshake);
    drop(out);
    let _ = client.set_nodelay(true);
    let _ = target.set_nodelay(true);
    Ok(relay(
        &client,
        &target,
        leftover,
        config.idle_timeout,
        stop,
        moved,
    )?)
}

/// Resolves (on the resolver pool) and connects to the first allowed address that answers.
fn connect(
    target: &TargetAddr,
    config: &Config,
    deadline: Instant,
    stop: &OwnedFd,
) -> Result<TcpStream, Failure> {
    let addrs = match target {
        TargetAddr::Ip(addr) => vec![*addr],
        TargetAddr::Domain(name, port) => {
            let (tx, rx) = mpsc::channel();
            Resolver::global().resolve(
                name,
                *port,
                Box::new(move |result| {
                    let _ = tx.send(result);
                }),
            );
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Ok(addrs)) => addrs,
                Ok(Err(_)) => return Err(Failure::DnsFailure),
                Err(_) => return Err(Failure::ConnectTimeout),
            }
        }
    };
    connect_first(Dialer::new(addrs), config, deadline, stop)
}

/// Connects to the first address the dialer yields that answers, each connect waited for in
/// poll(2), all before `deadline`.
fn connect_first(
    mut dialer: Dialer,
    config: &Config,
    deadline: Instant,
    stop: &OwnedFd,
) -> Result<TcpStream, Failure> {
    while let Some(addr) = dialer.next_allowed(&config.acl) {
        let stream = match connect::start_connect(addr) {
            Ok(stream) => stream,
            Err(failure) => {
                dialer.failed(failure);
                continue;
            }
        };
        match wait_ready(&stream, PollFlags::OUT, deadline, stop) {
            Ok(()) => match connect::connect_result(&stream) {
                Ok(()) => return Ok(stream),
                Err(failure) => dialer.failed(failure),
            },
            Err(err) if err.kind() == io::ErrorKind::TimedOut => {
                return Err(Failure::ConnectTimeout)
            }
            Err(_) => return Err(Failure::Other),
        }
    }
    Err(dialer.failure())
}

/// Relays with the shared pipes, sleeping in poll(2) on the two sockets between bursts.
fn relay(
    client: &TcpStream,
    target: &TcpStream,
    leftover: Vec<u8>,
    idle_timeout: Option<Duration>,
    stop: &OwnedFd,
    moved: &mut (u64, u64),
) -> io::Result<()> {
    let mut up = Pipe::with_leftover(leftover);
    let mut down = Pipe::default();
    let mut last_activity = Instant::now();
    let result = loop {
        let moved_before = up.bytes() + down.bytes();
        let mut scratch = vec![0u8; THREAD_SCRATCH];
        let states = up
            .pump(
                &mut &*client,
                &mut &*target,
                &mut scratch,
                ReadUntil::ShortRead,
            )
            .and_then(|up_state| {
                let down_state = down.pump(
                    &mut &*target,
                    &mut &*client,
                    &mut scratch,
                    ReadUntil::ShortRead,
                )?;
                Ok((up_state, down_state))
            });
        let (up_state, down_state) = match states {
            Ok(states) => states,
            Err(err) => break Err(err),
        };
        if up_state == PipeState::Finished && down_state == PipeState::Finished {
            break Ok(());
        }
        if up.bytes() + down.bytes() != moved_before {
            last_activity = Instant::now();
        }
        if up_state == PipeState::Yielded || down_state == PipeState::Yielded {
            continue;
        }
        drop(scratch);
        let flags = |read: bool, write: bool| {
            let mut flags = PollFlags::empty();
            if read {
                flags |= PollFlags::IN;
            }
            if write {
                flags |= PollFlags::OUT;
            }
            flags
        };
        let client_flags = flags(
            up_state == PipeState::WantsRead,
            down_state == PipeState::WantsWrite,
        );
        let target_flags = flags(
            down_state == PipeState::WantsRead,
            up_state == PipeState::WantsWrite,
        );
        let timeout = idle_timeout.map(|idle| {
            let left = (last_activity + idle).saturating_duration_since(Instant::now());
            Timespec::try_from(left).unwrap_or(Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            })
        });
        // A socket with nothing to wait for is left out of the set: poll reports a hang-up
        // even for an empty mask, which would wake this thread again and again.
        let mut fds = [
            PollFd::new(stop, PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
            PollFd::new(stop, PollFlags::IN),
        ];
        let mut watched = 1;
        for (socket, flags) in [(client, client_flags), (target, target_flags)] {
            if !flags.is_empty() {
                fds[watched] = PollFd::new(socket, flags);
                watched += 1;
            }
        }
        let fds = &mut fds[..watched];
        match poll(fds, timeout.as_ref()) {
            Ok(0) => {
                if idle_timeout.is_some_and(|idle| last_activity.elapsed() >= idle) {
                    break Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                }
            }
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(err) => break Err(err.into()),
        }
        if !fds[0].revents().is_empty() {
            break Err(stopping());
        }
    };
    if result.as_ref().is_err_and(relay::is_peer_reset) {
        session::pass_reset_on(&[client, target]);
    }
    *moved = (up.bytes(), down.bytes());
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_cidr, Acl};

    #[test]
    fn connect_goes_past_denied_and_failing_addresses() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let open = listener.local_addr().expect("addr");
        let config = Config {
            acl: Acl {
                deny_dests: vec![parse_cidr("127.0.0.2").expect("cidr")],
                ..Acl::default()
            },
            ..Config::default()
        };
        let stop = eventfd(0, EventfdFlags::CLOEXEC).expect("eventfd");
        let deadline = Instant::now() + Duration::from_secs(10);
        // [denied, fails at once (broadcast: ENETUNREACH from connect itself), ok].
        let addrs = vec![
            SocketAddr::new("127.0.0.2".parse().expect("ip"), open.port()),
            "255.255.255.255:9".parse().expect("addr"),
            open,
        ];
        let stream = connect_first(Dialer::new(addrs), &config, deadline, &stop)
            .expect("the third address answers");
        assert_eq!(stream.peer_addr().expect("peer"), open);
    }
}
