//! Server configuration shared by every mode: authentication, access rules, limits, timeouts.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::socks5::auth::UserDb;

pub mod access_log;
pub mod file;
pub mod live;
pub mod users;

pub use live::{LiveConfig, LoopConfig};

/// Everything a server mode needs to know besides its listener.
#[derive(Debug, Clone)]
pub struct Config {
    /// Users for username/password authentication; `None` means no authentication.
    pub users: Option<Arc<UserDb>>,
    /// Which clients may connect and which destinations they may reach.
    pub acl: Acl,
    /// How long a client has to complete the handshake.
    pub handshake_timeout: Duration,
    /// How long resolving and connecting to the target may take, all addresses together.
    pub connect_timeout: Duration,
    /// Ends an established session after this long without a byte in either direction.
    pub idle_timeout: Option<Duration>,
    /// At most this many sessions at once; newcomers beyond it are closed at once.
    pub max_sessions: Option<usize>,
    /// How long running sessions may go on after a shutdown signal.
    pub grace: Duration,
    /// Worker threads (async), event-loop threads (select, poll, epoll, epoll-et); `None`
    /// means the mode's default (one per core; one for select and poll).
    pub threads: Option<usize>,
    /// Stack size of each session thread in `threads` mode; `None` means the mode's default.
    pub stack_size: Option<usize>,
    /// The address UDP ASSOCIATE replies advertise (behind NAT); `None`: the local address of
    /// the client's control connection.
    pub udp_advertise: Option<IpAddr>,
    /// `uring` mode: how long a wait may hold completions back to gather a batch (zero: wake
    /// for each).
    pub batch_window: Duration,
    /// `uring` mode: direct descriptor slots per ring; `None` means the descriptor limit.
    pub uring_slots: Option<u32>,
    /// Load balancers whose connections start with a PROXY protocol header naming the real
    /// client (`--trusted-proxy`); from anyone else such a header is a bad greeting.
    pub trusted_proxies: Vec<IpNet>,
    /// `--access-log`: a JSON line per session when it ends; `None`: off.
    pub access_log: Option<Arc<access_log::AccessLog>>,
}

impl Config {
    /// The idle timeout in milliseconds as a session keeps it (0: none; at most ~49 days).
    pub fn idle_timeout_ms(&self) -> u32 {
        self.idle_timeout.map_or(0, |idle| {
            u32::try_from(idle.as_millis()).unwrap_or(u32::MAX).max(1)
        })
    }

    /// The access log, when on.
    pub fn access_log(&self) -> Option<&access_log::AccessLog> {
        self.access_log.as_deref()
    }

    /// Whether a connection from `peer` comes from a trusted load balancer.
    pub fn proxy_trusted(&self, peer: IpAddr) -> bool {
        contains(&self.trusted_proxies, canonical(peer))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            users: None,
            acl: Acl::default(),
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: None,
            max_sessions: None,
            grace: Duration::from_secs(5),
            threads: None,
            stack_size: None,
            udp_advertise: None,
            batch_window: Duration::ZERO,
            trusted_proxies: Vec::new(),
            uring_slots: None,
            access_log: None,
        }
    }
}

/// Access rules. Clients: allowed when `allow_clients` is empty or one of its networks holds
/// them. Destinations: a `deny_dests` match always denies (deny wins); otherwise allowed when
/// `allow_dests` is empty or one of its networks holds the address.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    /// Client networks that may connect (empty: all).
    pub allow_clients: Vec<IpNet>,
    /// Destination networks that may be reached (empty: all not denied).
    pub allow_dests: Vec<IpNet>,
    /// Destination networks that may never be reached.
    pub deny_dests: Vec<IpNet>,
}

/// Treats an IPv4-mapped IPv6 address as the IPv4 address it is, so that rules written for
/// IPv4 cannot be bypassed by writing the same host as `::ffff:a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|net| net.contains(&ip))
}

impl Acl {
    /// Whether a client at `ip` may use the proxy.
    pub fn client_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allow_clients.is_empty() || contains(&self.allow_clients, ip)
    }

    /// Whether the proxy may connect to `ip` on a client's behalf.
    pub fn dest_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if contains(&self.deny_dests, ip) {
            return false;
        }
        self.allow_dests.is_empty() || contains(&self.allow_dests, ip)
    }
}

/// Parses a CIDR network, or a bare address meaning just that host.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net);
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("'{text}' is not a CIDR network (like 10.0.0.0/8 or ::1/128)"))
}

/// Parses a size in bytes: `65536`, `64k`/`64KiB`, `1m`/`1MiB`.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let lower = text.trim().to_ascii_lowercase();
    let (number, scale) = if let Some(n) = lower.strip_suffix("kib").or(lower.strip_suffix('k')) {
        (n, 1024)
    } else if let Some(n) = lower.strip_suffix("mib").or(lower.strip_suffix('m')) {
        (n, 1024 * 1024)
    } else {
        (lower.as_str(), 1)
    };
    number
        .trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("'{text}' is not a size (like 131072, 128k or 1m)"))
}

/// Parses a duration: seconds (`10`, `2.5`) or with a unit (`50us`, `500ms`, `10s`, `2m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("us").or(text.strip_suffix("µs")) {
        (n, 0.000_001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a duration (like 10, 2.5s, 500ms, 50us or 2m)"))?;
    if !value.is_finite() || value < 0.0 || value * scale > 1e9 {
        return Err(format!("'{text}' is out of range"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| parse_cidr(n).expect("cidr")).collect()
    }

    #[test]
    fn deny_wins_over_allow() {
        let acl = Acl {
            allow_clients: nets(&["127.0.0.0/8"]),
            allow_dests: nets(&["10.0.0.0/8"]),
            deny_dests: nets(&["10.1.0.0/16", "169.254.0.0/16"]),
        };
        assert!(acl.client_allowed("127.0.0.5".parse().expect("ip")));
        assert!(!acl.client_allowed("192.0.2.1".parse().expect("ip")));
        assert!(acl.dest_allowed("10.2.0.1".parse().expect("ip")));
        assert!(!acl.dest_allowed("10.1.0.1".parse().expect("ip")));
        assert!(!acl.dest_allowed("8.8.8.8".parse().expect("ip")));
        // The mapped form of a denied IPv4 address is denied too.
        assert!(!acl.dest_allowed("::ffff:169.254.169.254".parse().expect("ip")));
    }

    #[test]
    fn empty_rules_allow_everything() {
        let acl = Acl::default();
        assert!(acl.client_allowed("::1".parse().expect("ip")));
        assert!(acl.dest_allowed("192.0.2.1".parse().expect("ip")));
    }

    #[test]
    fn parses_cidrs_and_durations() {
        assert_eq!(parse_cidr("::1").expect("ip").prefix_len(), 128);
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nonsense").is_err());
        assert_eq!(parse_duration("10").expect("d"), Duration::from_secs(10));
        assert_eq!(
            parse_duration("500ms").expect("d"),
            Duration::from_millis(500)
        );
        assert_eq!(parse_duration("2m").expect("d"), Duration::from_secs(120));
        assert_eq!(
            parse_duration("1.5s").expect("d"),
            Duration::from_millis(1500)
        );
        assert!(parse_duration("-1").is_err());
        assert_eq!(parse_size("128k"), Ok(128 * 1024));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
