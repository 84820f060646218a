//! The sessions: dial through the proxy (or directly), then keep messages going and check
//! every echoed byte.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use proxy::socks5::client;
use proxy::socks5::Command;
use proxy::socks5::ReplyCode;
use proxy::socks5::TargetAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{timeout, Instant};

use crate::measure::{lock, Phase, Shared};
use crate::pacer::Inlet;
use crate::record::Cause;

/// What every session needs to know.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Sessions this process opens (its segment's share).
    pub conns: usize,
    /// The global id of its first session: ids `first_id..first_id + conns` (patterns,
    /// source and echo addresses follow the global id, so every agent's bytes differ).
    pub first_id: usize,
    /// The SOCKS5 server, or `None` to connect straight to the echo target.
    pub proxy: Option<SocketAddr>,
    /// Echo target addresses; session i uses `echo[i % len]`.
    pub echo: Vec<SocketAddr>,
    /// Source addresses; session i binds `sources[i % len]`.
    pub sources: Vec<Ipv4Addr>,
    /// Username and password for RFC 1929.
    pub auth: Option<(String, String)>,
    /// Bytes per message.
    pub size: usize,
    /// Total messages per second (open loop), or `None` for closed loop.
    pub rate: Option<f64>,
    /// Limit for one dial (connect + handshake) and for one message round trip.
    pub io_timeout: Duration,
}

/// Fills `buf` with the bytes of message `seq` of session `id`: every message differs, so a
/// byte from another session or another message is caught.
pub fn fill_pattern(buf: &mut [u8], id: usize, seq: u64) {
    let mut state = (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ seq.wrapping_mul(0xD1B5_4A32_D192_ED03)
        | 1;
    for chunk in buf.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
}

/// Opens the session's connection: connect (from its source address) and, through a proxy,
/// the SOCKS5 handshake.
async fn dial(id: usize, plan: &Plan) -> Result<TcpStream, Cause> {
    let source = plan.sources[id % plan.sources.len()];
    let echo = plan.echo[id % plan.echo.len()];
    let socket = TcpSocket::new_v4().map_err(|e| Cause::of(&e))?;
    // Choose the source port at connect time, not at bind time: a port then only needs to be
    // unique per 4-tuple (and TIME_WAIT ports from earlier runs can be reused on loopback).
    // Bound without this, every session would hold a port exclusively, and the proxy's own
    // outgoing connections would run out of ephemeral ports.
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .map_err(|e| Cause::of(&io::Error::from(e)))?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .map_err(|e| Cause::of(&e))?;
    let connect_to = plan.proxy.unwrap_or(echo);
    let mut stream = socket
        .connect(connect_to)
        .await
        .map_err(|e| Cause::of(&e))?;
    stream.set_nodelay(true).map_err(|e| Cause::of(&e))?;
    if plan.proxy.is_none() {
        return Ok(stream);
    }
    let method = if plan.auth.is_some() { 2 } else { 0 };
    let io = |e: io::Error| Cause::of(&e);
    stream
        .write_all(&client::encode_greeting(&[method]))
        .await
        .map_err(io)?;
    let mut chosen = [0u8; 2];
    stream.read_exact(&mut chosen).await.map_err(io)?;
    if chosen != [5, method] {
        return Err(Cause::Method(chosen[1]));
    }
    if let Some((name, password)) = &plan.auth {
        stream
            .write_all(&client::encode_auth(name, password))
            .await
            .map_err(io)?;
        let mut status = [0u8; 2];
        stream.read_exact(&mut status).await.map_err(io)?;
        if status != [1, 0] {
            return Err(Cause::AuthRejected);
        }
    }
    let mut request = Vec::with_capacity(32);
    client::encode_request(Command::Connect, &TargetAddr::Ip(echo), &mut request);
    stream.write_all(&request).await.map_err(io)?;
    let mut reply = Vec::with_capacity(22);
    let mut byte = [0u8; 1];
    loop {
        match client::parse_reply(&reply) {
            Ok(Some((ReplyCode::Succeeded, _, _))) => return Ok(stream),
            Ok(Some((code, _, _))) => return Err(Cause::Socks(code.as_u8())),
            Ok(None) => {}
            Err(_) => return Err(Cause::BadReply),
        }
        stream.read_exact(&mut byte).await.map_err(io)?;
        reply.push(byte[0]);
    }
}

/// One session: dial, then either hand the connection to its pacer thread (open loop, with
/// an `inlet`) or wait for the workload and run it closed-loop until the stop phase.
pub async fn session(
    id: usize,
    plan: Arc<Plan>,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
    inlet: Option<Inlet>,
) {
    let started = Instant::now();
    let dialed = timeout(plan.io_timeout, dial(id, &plan)).await;
    drop(permit);
    let stream = match dialed {
        Ok(Ok(stream)) => stream,
        Ok(Err(cause)) => {
            Shared::count(&shared.failures, cause);
            shared.dialed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(_) => {
            Shared::count(&shared.failures, Cause::Timeout);
            shared.dialed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let micros = started.elapsed().as_micros() as u64;
    let _ = lock(&shared.histograms.handshake).record(micros.max(1));
    shared.established.fetch_add(1, Ordering::Relaxed);
    if let Some(inlet) = inlet {
        match stream.into_std() {
            Ok(stream) => {
                if !inlet.hand_over(id, stream) {
                    Shared::count(&shared.dropped, Cause::Reset);
                }
            }
            Err(err) => Shared::count(&shared.dropped, Cause::of(&err)),
        }
        // Counted once handed over, so the warm-up (which waits for every dial) finds it
        // with its pacer.
        shared.dialed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    shared.dialed.fetch_add(1, Ordering::Relaxed);

    let mut phases = shared.phases();
    while *phases.borrow_and_update() < Phase::Warmup {
        if phases.changed().await.is_err() {
            return;
        }
    }
    drop(phases);
    if let Err(cause) = closed_loop(id, stream, &plan, &shared).await {
        Shared::count(&shared.dropped, cause);
    }
}

/// Sends one message at a time, each as soon as the previous echo is back, until the stop
/// phase; `Err(cause)` if the session broke.
async fn closed_loop(
    id: usize,
    mut stream: TcpStream,
    plan: &Plan,
    shared: &Shared,
) -> Result<(), Cause> {
    let mut sent = vec![0u8; plan.size];
    let mut received = vec![0u8; plan.size];
    let mut seq = 0u64;
    loop {
        let phase = shared.phase();
        if phase == Phase::Stop {
            let _ = stream.shutdown().await;
            return Ok(());
        }
        fill_pattern(&mut sent, id, seq);
        let written_at = Instant::now();
        let round_trip = async {
            stream.write_all(&sent).await?;
            stream.read_exact(&mut received).await?;
            Ok::<_, io::Error>(())
        };
        match timeout(plan.io_timeout, round_trip).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => return Err(Cause::of(&err)),
            Err(_) => return Err(Cause::Timeout),
        }
        if received != sent {
            shared.corrupted.fetch_add(1, Ordering::Relaxed);
            return Err(Cause::Corrupted);
        }
        shared.messages_total.fetch_add(1, Ordering::Relaxed);
        if phase == Phase::Measure {
            shared.messages.fetch_add(1, Ordering::Relaxed);
            let rtt = written_at.elapsed().as_micros() as u64;
            let _ = lock(&shared.histograms.rtt).record(rtt.max(1));
        }
        seq += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_per_session_and_message() {
        let mut a = [0u8; 128];
        let mut b = [0u8; 128];
        fill_pattern(&mut a, 1, 0);
        fill_pattern(&mut b, 1, 0);
        assert_eq!(a, b);
        fill_pattern(&mut b, 1, 1);
        assert_ne!(a, b);
        fill_pattern(&mut b, 2, 0);
        assert_ne!(a, b);
        let mut odd = [0u8; 13];
        fill_pattern(&mut odd, 3, 3);
        assert!(odd.iter().any(|&x| x != 0));
    }
}
