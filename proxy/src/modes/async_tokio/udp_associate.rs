//! UDP ASSOCIATE (RFC 1928 §7): a relay socket for the client, outbound sockets for its
//! targets, until the control connection closes or the association idles out.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::Instant;

use super::{fail, resolve};
use crate::config::access_log::SessionTrail;
use crate::config::Config;
use crate::net::{connect, limits};
use crate::socks5::udp::{encode_datagram, parse_datagram};
use crate::socks5::{Handshake, Request};

/// How long a UDP association may stay without a datagram when no `--idle-timeout` is set.
pub(super) const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(120);
/// Targets an association remembers as contacted (replies from others are dropped).
const MAX_CONTACTED: usize = 4096;
/// The largest UDP payload.
const DATAGRAM_MAX: usize = 65_535;

/// Receives on an outbound socket, or never if it does not exist yet.
async fn recv_on(socket: &Option<UdpSocket>, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
    match socket {
        Some(socket) => socket.recv_from(buf).await,
        None => std::future::pending().await,
    }
}

/// UDP ASSOCIATE: a relay socket for the client, outbound sockets for targets, until the
/// control connection closes or the association idles out.
pub async fn udp_associate(
    mut client: TcpStream,
    mut handshake: Handshake,
    request: Request,
    peer: SocketAddr,
    config: &Config,
    trail: &mut SessionTrail,
) -> String {
    let Ok(local) = client.local_addr() else {
        return "control connection gone".into();
    };
    let relay = match udp_socket((local.ip(), 0).into()) {
        Ok(socket) => socket,
        Err(err) => {
            let failure = connect::failure_of(&err);
            fail(&mut client, &mut handshake, failure, peer, None, trail).await;
            return failure.to_string();
        }
    };
    let Ok(relay_addr) = relay.local_addr() else {
        return "relay socket gone".into();
    };
    let advertised = SocketAddr::new(
        config.udp_advertise.unwrap_or(relay_addr.ip()),
        relay_addr.port(),
    );
    let mut out = Vec::new();
    if handshake.request_granted(advertised, &mut out).is_err()
        || client.write_all(&out).await.is_err()
    {
        return "cannot send the reply".into();
    }
    trail.granted(None);
    drop(handshake);
    // Only the control connection's host may use the association, from the port it named
    // (when it named one), and from one address once it has sent.
    let expected_port = Some(request.target.port()).filter(|&port| port != 0);
    let mut client_addr: Option<SocketAddr> = None;
    let mut outbound_v4: Option<UdpSocket> = None;
    let mut outbound_v6: Option<UdpSocket> = None;
    let mut contacted: HashSet<SocketAddr> = HashSet::new();
    let (mut from_client, mut from_v4, mut from_v6) = (
        vec![0u8; DATAGRAM_MAX],
        vec![0u8; DATAGRAM_MAX],
        vec![0u8; DATAGRAM_MAX],
    );
    let mut control = [0u8; 64];
    let idle = config.idle_timeout.unwrap_or(DEFAULT_UDP_IDLE);
    let mut last_activity = Instant::now();
    let (mut relayed, mut dropped) = (0u64, 0u64);
    let mut wrapped = Vec::with_capacity(DATAGRAM_MAX + 32);
    loop {
        tokio::select! {
            read = client.read(&mut control) => match read {
                // The association ends with its control connection (bytes on it are ignored).
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            },
            received = relay.recv_from(&mut from_client) => {
                let Ok((n, from)) = received else { break };
                let allowed = from.ip() == peer.ip()
                    && expected_port.is_none_or(|port| port == from.port())
                    && client_addr.is_none_or(|known| known == from);
                if !allowed {
                    dropped += 1;
                    continue;
                }
                client_addr = Some(from);
                let Ok((target, payload)) = parse_datagram(&from_client[..n]) else {
                    dropped += 1;
                    continue;
                };
                let Ok(addrs) = resolve(&target).await else {
                    dropped += 1;
                    continue;
                };
                let Some(destination) = addrs.into_iter().find(|a| config.acl.dest_allowed(a.ip())) else {
                    dropped += 1;
                    continue;
                };
                let outbound = if destination.is_ipv4() { &mut outbound_v4 } else { &mut outbound_v6 };
                if outbound.is_none() {
                    let any: SocketAddr = if destination.is_ipv4() {
                        (Ipv4Addr::UNSPECIFIED, 0).into()
                    } else {
                        (Ipv6Addr::UNSPECIFIED, 0).into()
                    };
                    match udp_socket(any) {
                        Ok(socket) => *outbound = Some(socket),
                        Err(_) => {
                            dropped += 1;
                            continue;
                        }
                    }
                }
                if let Some(socket) = outbound.as_ref() {
                    if socket.send_to(payload, destination).await.is_ok() {
                        relayed += 1;
                        if contacted.len() < MAX_CONTACTED {
                            contacted.insert(destination);
                        }
                        last_activity = Instant::now();
                    }
                }
            },
            received = recv_on(&outbound_v4, &mut from_v4) => {
                let Ok((n, from)) = received else { continue };
                relay_back(&relay, client_addr, &contacted, from, &from_v4[..n], &mut wrapped, &mut relayed, &mut dropped).await;
                last_activity = Instant::now();
            },
            received = recv_on(&outbound_v6, &mut from_v6) => {
                let Ok((n, from)) = received else { continue };
                relay_back(&relay, client_addr, &contacted, from, &from_v6[..n], &mut wrapped, &mut relayed, &mut dropped).await;
                last_activity = Instant::now();
            },
            () = tokio::time::sleep_until(last_activity + idle) => {
                tracing::debug!(%peer, "UDP association idle; closed");
                break;
            }
        }
    }
    tracing::debug!(%peer, relayed, dropped, "UDP association ended");
    format!("association closed: {relayed} datagrams relayed, {dropped} dropped")
}

/// Wraps a target's reply and sends it to the client, if the target was contacted.
#[allow(clippy::too_many_arguments)]
async fn relay_back(
    relay: &UdpSocket,
    client: Option<SocketAddr>,
    contacted: &HashSet<SocketAddr>,
    from: SocketAddr,
    payload: &[u8],
    wrapped: &mut Vec<u8>,
    relayed: &mut u64,
    dropped: &mut u64,
) {
    let Some(client) = client else {
        *dropped += 1;
        return;
    };
    if !contacted.contains(&from) {
        *dropped += 1;
        return;
    }
    wrapped.clear();
    encode_datagram(from, payload, wrapped);
    if relay.send_to(wrapped, client).await.is_ok() {
        *relayed += 1;
    }
}

/// A UDP socket for UDP ASSOCIATE, made through the descriptor gate.
fn udp_socket(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = limits::new_descriptor(|| std::net::UdpSocket::bind(addr))?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}
