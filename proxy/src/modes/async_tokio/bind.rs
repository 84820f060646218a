//! BIND (RFC 1928 §4): the server listens for one inbound connection on the client's behalf,
//! answers twice (listening, then connected), and relays.

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout_at, Instant};

use super::{accept, fail, resolve};
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
) -> Option<(TcpStream, TcpStream, Vec<u8>)> {
    let expected: Option<Vec<IpAddr>> = match &request.target {
        TargetAddr::Ip(addr) if addr.ip().is_unspecified() => None,
        target => match resolve(target).await {
            Ok(addrs) => Some(addrs.iter().map(SocketAddr::ip).collect()),
            Err(failure) => {
                fail(&mut client, &mut handshake, failure, peer, None).await;
                return None;
            }
        },
    };
    if let Some(ips) = &expected {
        if !ips.iter().any(|ip| config.acl.dest_allowed(*ip)) {
            fail(
                &mut client,
                &mut handshake,
                Failure::DeniedByRule,
                peer,
                None,
            )
            .await;
            return None;
        }
    }
    let local_ip = client.local_addr().ok()?.ip();
    let listener = match tcp_listener((local_ip, 0).into()) {
        Ok(listener) => listener,
        Err(err) => {
            fail(
                &mut client,
                &mut handshake,
                connect::failure_of(&err),
                peer,
                None,
            )
            .await;
            return None;
        }
    };
    let mut out = Vec::new();
    handshake.bind_listening(listener.local_addr().ok()?, &mut out);
    client.write_all(&out).await.ok()?;
    out.clear();
    let deadline = Instant::now() + config.connect_timeout;
    let (inbound, from) = loop {
        match timeout_at(deadline, accept(&listener)).await {
            Err(_) => {
                fail(
                    &mut client,
                    &mut handshake,
                    Failure::ConnectTimeout,
                    peer,
                    None,
                )
                .await;
                return None;
            }
            Ok(Err(err)) => {
                fail(
                    &mut client,
                    &mut handshake,
                    connect::failure_of(&err),
                    peer,
                    None,
                )
                .await;
                return None;
            }
            Ok(Ok((stream, from))) => {
                let expected_peer = expected.as_ref().is_none_or(|ips| ips.contains(&from.ip()));
                if expected_peer && config.acl.dest_allowed(from.ip()) {
                    break (stream, from);
                }
                tracing::info!(%peer, %from, "BIND: connection from an unexpected peer closed");
            }
        }
    };
    drop(listener);
    handshake.request_granted(from, &mut out).ok()?;
    client.write_all(&out).await.ok()?;
    let _ = client.set_nodelay(true);
    let _ = inbound.set_nodelay(true);
    Some((client, inbound, handshake.take_leftover()))
}

/// A listening socket for BIND, made through the descriptor gate.
fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = limits::new_descriptor(|| std::net::TcpListener::bind(addr))?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}
