//! `async` mode: one tokio task per session on a multi-threaded runtime.
//!
//! The task waits for readiness (`readable`/`writable`) and moves bytes with non-blocking
//! `try_read`/`try_write` through the shared [`Pipe`], using a per-thread scratch buffer, so an
//! idle session holds two sockets and a few words of state rather than two copy buffers.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at, Instant};

use super::session::{self, Dialer, SessionError, EXHAUSTION_BACKOFF};
use crate::config::access_log::SessionTrail;
use crate::config::{Acl, Config, LiveConfig};
use crate::net::connect;
use crate::net::limits;
use crate::relay::{self, NonBlockingIo, Pipe, PipeState, ReadUntil, SCRATCH_SIZE};
use crate::shutdown::Shutdown;
use crate::socks5::wire::MAX_MESSAGE_LEN;
use crate::socks5::{Command, Failure, Handshake, Request, Step, TargetAddr};

mod bind;
mod udp_associate;

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_SIZE]);
}

/// Runs `f` with this thread's scratch buffer. Never held across an `.await`.
fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|scratch| f(&mut scratch.borrow_mut()))
}

/// Sends FIN on `stream`; a peer that is already gone is not an error here (the other
/// direction decides what happens next).
fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match rustix::net::shutdown(stream.as_fd(), rustix::net::Shutdown::Write) {
        Err(rustix::io::Errno::NOTCONN) => Ok(()),
        other => other.map_err(io::Error::from),
    }
}

/// Serves SOCKS5 on `listener` until `shutdown` fires, then lets sessions finish for
/// `config.grace` before closing the rest. Each session takes the configuration current when
/// it is accepted.
pub async fn serve(listener: TcpListener, live: LiveConfig, shutdown: Shutdown) -> io::Result<()> {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.wait() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = accept(&listener) => match accepted {
                Ok((stream, peer)) => {
                    while sessions.try_join_next().is_some() {}
                    let config = live.load();
                    if !session::admit(&config, peer, sessions.len()) {
                        continue;
                    }
                    sessions.spawn(session(stream, peer, config));
                }
                Err(err) if limits::is_resource_exhaustion(&err) => {
                    limits::refuse_on_exhaustion(&listener, &err, sessions.len());
                    tokio::select! {
                        _ = shutdown.wait() => break,
                        Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
                        _ = tokio::time::sleep(EXHAUSTION_BACKOFF) => {}
                    }
                }
                Err(err) if limits::is_transient_accept_error(&err) => {}
                Err(err) => {
                    tracing::error!("accept failed: {err}");
                    tokio::time::sleep(EXHAUSTION_BACKOFF).await;
                }
            }
        }
    }
    drop(listener);
    while sessions.try_join_next().is_some() {}
    if !sessions.is_empty() {
        let config = live.load();
        session::log_draining(config.grace, sessions.len());
        let drained = timeout(config.grace, async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            session::log_grace_over(sessions.len());
            sessions.abort_all();
            while sessions.join_next().await.is_some() {}
        }
    }
    Ok(())
}

/// One client from accept to close.
async fn session(client: TcpStream, peer: SocketAddr, config: Arc<Config>) {
    let mut trail = SessionTrail::begin(config.access_log(), peer);
    // The handshake's state is boxed so that it is freed when the handshake ends: a task's
    // future is as large as its largest state, and the relay state is what idle sessions keep.
    let established = Box::pin(establish(client, peer, &config, &mut trail)).await;
    let (client, target, leftover) = match established {
        Ok(relay) => relay,
        Err(end) => {
            trail.finish(config.access_log(), 0, 0, &end);
            return;
        }
    };
    let idle_timeout = config.idle_timeout;
    // Only the access log and the metrics (when on) keep the configuration past the handshake.
    let config = SessionTrail::wanted(config.access_log()).then_some(config);
    let (up, down, result) = relay(client, target, leftover, idle_timeout).await;
    match &result {
        Ok(()) => tracing::debug!(%peer, up, down, "session closed"),
        Err(err) => tracing::debug!(%peer, "session ended: {err}"),
    }
    if let Some(config) = config {
        trail.finish(config.access_log(), up, down, &session::end_of(&result));
    }
}

/// Why a session ended before its relay (or, for UDP ASSOCIATE, with its association).
type Ended = String;

/// Runs the handshake and the request: CONNECT or BIND return both sockets to relay and the
/// bytes the client already sent for the other side; UDP ASSOCIATE runs here to its end.
async fn establish(
    mut client: TcpStream,
    peer: SocketAddr,
    config: &Config,
    trail: &mut SessionTrail,
) -> Result<(TcpStream, TcpStream, Vec<u8>), Ended> {
    let mut handshake = session::new_handshake(config, peer);
    let request = match timeout(
        config.handshake_timeout,
        read_request(&mut client, &mut handshake),
    )
    .await
    {
        Ok(Ok(request)) => request,
        Ok(Err(err)) => {
            tracing::debug!(%peer, "handshake ended: {err}");
            if let SessionError::Handshake(err) = &err {
                trail.handshake_failed(&handshake, err);
            }
            return Err(err.to_string());
        }
        Err(_) => {
            tracing::debug!(%peer, "handshake timed out");
            return Err("handshake timed out".into());
        }
    };
    trail.requested(&request);
    if session::proxied_client_refused(config, &request) {
        fail(
            &mut client,
            &mut handshake,
            Failure::DeniedByRule,
            peer,
            Some(&request.target),
            trail,
        )
        .await;
        return Err(Failure::DeniedByRule.to_string());
    }
    // Behind a trusted balancer, the client is the one its PROXY header named: BIND's and UDP
    // ASSOCIATE's checks of who may use them look at it.
    let peer = request.client.unwrap_or(peer);
    match request.command {
        Command::Bind => return bind::bind(client, handshake, request, peer, config, trail).await,
        Command::UdpAssociate => {
            return Err(udp_associate::udp_associate(
                client, handshake, request, peer, config, trail,
            )
            .await);
        }
        Command::Connect | Command::Unknown(_) => {}
    }
    let mut out = Vec::new();
    let outcome = match connect(&request.target, config).await {
        Ok(target) => target
            .local_addr()
            .map(|bound| (target, bound))
            .map_err(|err| connect::failure_of(&err)),
        Err(failure) => Err(failure),
    };
    let (target, bound) = match outcome {
        Ok(connected) => connected,
        Err(failure) => {
            fail(
                &mut client,
                &mut handshake,
                failure,
                peer,
                Some(&request.target),
                trail,
            )
            .await;
            return Err(failure.to_string());
        }
    };
    handshake
        .request_granted(bound, &mut out)
        .map_err(|err| err.to_string())?;
    trail.granted(target.peer_addr().ok());
    client
        .write_all(&out)
        .await
        .map_err(|err| format!("cannot send the reply: {err}"))?;
    let _ = client.set_nodelay(true);
    let _ = target.set_nodelay(true);
    Ok((client, target, handshake.take_leftover()))
}

/// Drives the handshake until the client's request is complete.
async fn read_request(
    client: &mut TcpStream,
    handshake: &mut Handshake,
) -> Result<Request, SessionError> {
    let mut out = Vec::new();
    loop {
        let step = handshake.step(&mut out);
        if !out.is_empty() {
            client.write_all(&out).await?;
            out.clear();
        }
        match step {
            Step::NeedInput => {
                client.readable().await?;
                let received = with_scratch(|scratch| {
                    let n = client.try_read(&mut scratch[..MAX_MESSAGE_LEN])?;
                    handshake.receive(&scratch[..n]);
                    Ok::<_, io::Error>(n)
                });
                match received {
                    Ok(0) => return Err(SessionError::ClientClosed),
                    Ok(_) => {}
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    Err(err) => return Err(err.into()),
                }
            }
            Step::Request(request) => return Ok(request),
            Step::Close(err) => return Err(err.into()),
        }
    }
}

/// Accepts one connection through the descriptor gate (see [`limits::new_descriptor`]); the
/// gate is held only within one poll, never across an await.
async fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    std::future::poll_fn(|cx| limits::new_descriptor(|| listener.poll_accept(cx))).await
}

/// Answers the request with `failure` and logs it.
async fn fail(
    client: &mut TcpStream,
    handshake: &mut Handshake,
    failure: Failure,
    peer: SocketAddr,
    target: Option<&TargetAddr>,
    trail: &mut SessionTrail,
) {
    trail.replied(failure.reply_code());
    let mut out = Vec::new();
    let _ = handshake.request_failed(failure, &mut out);
    let _ = client.write_all(&out).await;
    session::log_request_failed(Some(peer), target, failure);
}

/// Resolves a target to its addresses without blocking the runtime.
async fn resolve(target: &TargetAddr) -> Result<Vec<SocketAddr>, Failure> {
    match target {
        TargetAddr::Ip(addr) => Ok(vec![*addr]),
        TargetAddr::Domain(name, port) => {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), *port))
                .await
                .map_err(|_| Failure::DnsFailure)?
                .collect();
            if found.is_empty() {
                return Err(Failure::DnsFailure);
            }
            Ok(found)
        }
    }
}

/// Resolves the target without blocking and tries each allowed address in order, all within
/// the connect timeout.
async fn connect(target: &TargetAddr, config: &Config) -> Result<TcpStream, Failure> {
    let deadline = Instant::now() + config.connect_timeout;
    let addrs = match timeout_at(deadline, resolve(target)).await {
        Err(_) => return Err(Failure::ConnectTimeout),
        Ok(resolved) => resolved?,
    };
    connect_first(Dialer::new(addrs), &config.acl, deadline).await
}

/// Connects to the first address the dialer yields that answers, until `deadline`.
async fn connect_first(
    mut dialer: Dialer,
    acl: &Acl,
    deadline: Instant,
) -> Result<TcpStream, Failure> {
    while let Some(addr) = dialer.next_allowed(acl) {
        let attempt = async move {
            let stream = TcpStream::from_std(connect::start_connect(addr)?)
                .map_err(|err| connect::failure_of(&err))?;
            stream
                .writable()
                .await
                .map_err(|err| connect::failure_of(&err))?;
            connect::connect_result(&stream)?;
            Ok(stream)
        };
        match timeout_at(deadline, attempt).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(failure)) => dialer.failed(failure),
            Err(_) => return Err(Failure::ConnectTimeout),
        }
    }
    Err(dialer.failure())
}

/// A tokio socket driven through `poll_read`/`poll_write` from inside a future's `poll`.
/// `WouldBlock` means the task's waker is registered for that direction. Unlike `try_read`,
/// a short `poll_read` clears the socket's readiness, so reading on until `WouldBlock` costs
/// no extra system call: the next `poll_read` finds no readiness and just registers the waker.
struct Polled<'a, 'w> {
    stream: &'a mut TcpStream,
    cx: Context<'w>,
}

impl NonBlockingIo for Polled<'_, '_> {
    fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut read_buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.stream).poll_read(&mut self.cx, &mut read_buf) {
            Poll::Ready(Ok(())) => Ok(read_buf.filled().len()),
            Poll::Ready(Err(err)) => Err(err),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.stream).poll_write(&mut self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn shutdown_write(&mut self) -> io::Result<()> {
        shutdown_write(self.stream)
    }
}

/// Relays until both directions have ended, one side fails, or the session idles out.
/// Returns the bytes moved client→target and target→client.
async fn relay(
    mut client: TcpStream,
    mut target: TcpStream,
    leftover: Vec<u8>,
    idle_timeout: Option<Duration>,
) -> (u64, u64, io::Result<()>) {
    let mut up = Pipe::with_leftover(leftover);
    let mut down = Pipe::default();
    let mut idle_timer = idle_timeout.map(|idle| Box::pin(tokio::time::sleep(idle)));
    let mut last_activity = Instant::now();
    let result = std::future::poll_fn(|cx| {
        let moved_before = up.bytes() + down.bytes();
        let waker = cx.waker();
        let pumped = with_scratch(|scratch| {
            let mut client_io = Polled {
                stream: &mut client,
                cx: Context::from_waker(waker),
            };
            let mut target_io = Polled {
                stream: &mut target,
                cx: Context::from_waker(waker),
            };
            let up_state = up.pump(
                &mut client_io,
                &mut target_io,
                scratch,
                ReadUntil::WouldBlock,
            )?;
            let down_state = down.pump(
                &mut target_io,
                &mut client_io,
                scratch,
                ReadUntil::WouldBlock,
            )?;
            Ok::<_, io::Error>((up_state, down_state))
        });
        let (up_state, down_state) = match pumped {
            Ok(states) => states,
            Err(err) => return Poll::Ready(Err(err)),
        };
        if up_state == PipeState::Finished && down_state == PipeState::Finished {
            return Poll::Ready(Ok(()));
        }
        if up_state == PipeState::Yielded || down_state == PipeState::Yielded {
            // Let other sessions on this thread run, then continue.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let Some(timer) = idle_timer.as_mut() else {
            return Poll::Pending;
        };
        let idle = idle_timeout.unwrap_or_default();
        if up.bytes() + down.bytes() != moved_before {
            last_activity = Instant::now();
        }
        while timer.as_mut().poll(cx).is_ready() {
            if last_activity.elapsed() >= idle {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")));
            }
            timer.as_mut().reset(last_activity + idle);
        }
        Poll::Pending
    })
    .await;
    if result.as_ref().is_err_and(relay::is_peer_reset) {
        session::pass_reset_on(&[&client, &target]);
    }
    (up.bytes(), down.bytes(), result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connect_first_tries_each_address_in_order() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let open = listener.local_addr().expect("addr");
        let closed = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            probe.local_addr().expect("addr")
        };
        let closed_v6: SocketAddr = format!("[::1]:{}", closed.port()).parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(10);
        let acl = Acl {
            deny_dests: vec![crate::config::parse_cidr("127.0.0.2").expect("cidr")],
            ..Acl::default()
        };
        let denied = SocketAddr::new("127.0.0.2".parse().expect("ip"), open.port());
        let fails_at_once: SocketAddr = "255.255.255.255:9".parse().expect("addr");
        let addrs = vec![denied, fails_at_once, closed_v6, closed, open];
        let stream = connect_first(Dialer::new(addrs), &acl, deadline)
            .await
            .expect("the last address answers");
        assert_eq!(stream.peer_addr().expect("peer"), open);
        let failure = connect_first(Dialer::new(vec![closed_v6, closed]), &acl, deadline)
            .await
            .err();
        assert_eq!(failure, Some(Failure::ConnectionRefused));
        let failure = connect_first(Dialer::new(vec![denied]), &acl, deadline)
            .await
            .err();
        assert_eq!(failure, Some(Failure::DeniedByRule));
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// An idle session's cost is mostly its task's future; this guards the design that keeps
    /// the handshake boxed and the relay free of buffers and waiter nodes (before it, the
    /// session future was 1,168 bytes).
    #[tokio::test]
    async fn idle_session_state_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server_side, _) = listener.accept().await.expect("accept");
        let other = TcpStream::connect(addr).await.expect("connect");
        let session_future = session(client, addr, Arc::new(Config::default()));
        let relay_future = relay(server_side, other, Vec::new(), None);
        assert!(
            std::mem::size_of_val(&session_future) <= 768,
            "{}",
            std::mem::size_of_val(&session_future)
        );
        assert!(
            std::mem::size_of_val(&relay_future) <= 640,
            "{}",
            std::mem::size_of_val(&relay_future)
        );
    }
}
