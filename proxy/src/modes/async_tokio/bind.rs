//! BIND (RFC 1928 §4): the server listens for one inbound connection on the client's behalf,
//! answers twice (listening, then connected), and relays.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout_at, Instant};

use super::{accept, fail, resolve};
use crate::config::access_log::SessionTrail;
use crate::config::Config;
use crate::net::{connect, limits};
use crate::socks5::{Failure, Handshake, Request, TargetAddr};

/// BIND: listen on the control connection's local address, send the first reply, accept the
/// expected peer (DST.ADDR, unless it is unspecified) within the connect timeout, send the
/// second reply. Returns the client, the inbound connection and early client bytes, to relay.
pub async fn bind(
    mut client: TcpStream,
    mut handshake: Handshake,
    request: Request,
    peer: SocketAddr,
    config: &Config,
    trail: &mut SessionTrail,
) -> Result<(TcpStream, TcpStream, Vec<u8>), String> {
    let (inbound, from) =
        match accept_peer(&mut client, &mut handshake, &request, peer, config).await {
            Ok(Some(accepted)) => accepted,
            // The client went away after the first reply: nothing left to answer.
            Ok(None) => return Err("client closed while BIND waited".into()),
            Err(failure) => {
                fail(&mut client, &mut handshake, failure, peer, None, trail).await;
                return Err(failure.to_string());
            }
        };
    let mut out = Vec::new();
    handshake
        .request_granted(from, &mut out)
        .map_err(|err| err.to_string())?;
    trail.granted(Some(from));
    client
        .write_all(&out)
        .await
        .map_err(|err| format!("cannot send the reply: {err}"))?;
    let _ = client.set_nodelay(true);
    let _ = inbound.set_nodelay(true);
    Ok((client, inbound, handshake.take_leftover()))
}

/// Listens, sends the first reply, and waits for the expected peer: `Err` is the failure to
/// answer with, `Ok(None)` a client that could not be told it was listening.
async fn accept_peer(
    client: &mut TcpStream,
    handshake: &mut Handshake,
    request: &Request,
    peer: SocketAddr,
    config: &Config,
) -> Result<Option<(TcpStream, SocketAddr)>, Failure> {
    let expected: Option<Vec<IpAddr>> = match &request.target {
        TargetAddr::Ip(addr) if addr.ip().is_unspecified() => None,
        target => Some(resolve(target).await?.iter().map(SocketAddr::ip).collect()),
    };
    if let Some(ips) = &expected {
        if !ips.iter().any(|ip| config.acl.dest_allowed(*ip)) {
            return Err(Failure::DeniedByRule);
        }
    }
    let Ok(local) = client.local_addr() else {
        return Ok(None);
    };
    let listener = tcp_listener((local.ip(), 0).into()).map_err(|err| connect::failure_of(&err))?;
    let Ok(listening) = listener.local_addr() else {
        return Ok(None);
    };
    let mut out = Vec::new();
    handshake.bind_listening(listening, &mut out);
    if client.write_all(&out).await.is_err() {
        return Ok(None);
    }
    let deadline = Instant::now() + config.connect_timeout;
    loop {
        let (stream, from) = timeout_at(deadline, accept(&listener))
            .await
            .map_err(|_| Failure::ConnectTimeout)?
            .map_err(|err| connect::failure_of(&err))?;
        let expected_peer = expected.as_ref().is_none_or(|ips| ips.contains(&from.ip()));
        if expected_peer && config.acl.dest_allowed(from.ip()) {
            return Ok(Some((stream, from)));
        }
        tracing::info!(%peer, %from, "BIND: connection from an unexpected peer closed");
    }
}

/// A listening socket for BIND, made through the descriptor gate.
fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = limits::new_descriptor(|| std::net::TcpListener::bind(addr))?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}
