//! Shared helpers for the integration tests: an in-process server per mode, loopback targets,
//! and a blocking SOCKS5 client. Nothing here sleeps to synchronise: servers are bound before
//! they are used, and every wait has a bounded timeout.
#![allow(dead_code, missing_docs)]

use std::io::{self, Read, Write};
use std::net::{Shutdown as NetShutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use proxy::socks5::auth::UserDb;
use proxy::socks5::client;
use proxy::socks5::Command;
use proxy::socks5::ReplyCode;
use proxy::socks5::TargetAddr;
use proxy::{Config, Mode, Shutdown};

/// Every socket read in a test gives up after this long, so a bug fails instead of hanging.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

pub mod procfs;
#[allow(unused_imports)]
pub use procfs::*;

/// One test per mode for each case written as `fn case(mode: Mode)`: `per_mode!(case);`
/// makes `case::threads`, `case::select`, … `case::async_tokio`, so a red test names its mode
/// and `cargo test epoll_et` runs one mode. `per_mode!(only [Async]: case)` runs a case in the
/// modes listed. Needs `#[macro_use] mod common;`.
#[allow(unused_macros)]
macro_rules! per_mode {
    (only $modes:tt: $case:ident $(, $rest:ident)* $(,)?) => {
        per_mode!(@case $case $modes);
        per_mode!(only $modes: $($rest),*);
    };
    (only $modes:tt:) => {};
    (@case $case:ident [$($mode:ident),+ $(,)?]) => {
        mod $case {
            $(per_mode!(@test $case $mode);)+
        }
    };
    (@test $case:ident Threads) => { #[test] fn threads() { super::$case(proxy::Mode::Threads) } };
    (@test $case:ident Select) => { #[test] fn select() { super::$case(proxy::Mode::Select) } };
    (@test $case:ident Poll) => { #[test] fn poll() { super::$case(proxy::Mode::Poll) } };
    (@test $case:ident Epoll) => { #[test] fn epoll() { super::$case(proxy::Mode::Epoll) } };
    (@test $case:ident EpollEt) => { #[test] fn epoll_et() { super::$case(proxy::Mode::EpollEt) } };
    (@test $case:ident Async) => { #[test] fn async_tokio() { super::$case(proxy::Mode::Async) } };
    (@test $case:ident Uring) => {
        #[test]
        fn uring() {
            // Where the kernel has no usable io_uring, the mode exits 2 (tested in modes.rs).
            if let Err(why) = proxy::modes::uring::probe(std::time::Duration::ZERO) {
                eprintln!("skipped: {why}");
                return;
            }
            super::$case(proxy::Mode::Uring)
        }
    };
    ($($case:ident),+ $(,)?) => {
        // A mode added to `Mode` fails to compile here until it gets its tests below.
        const _: fn(proxy::Mode) = |mode| match mode {
            proxy::Mode::Threads
            | proxy::Mode::Select
            | proxy::Mode::Poll
            | proxy::Mode::Epoll
            | proxy::Mode::EpollEt
            | proxy::Mode::Async
            | proxy::Mode::Uring => {}
        };
        per_mode!(only [Threads, Select, Poll, Epoll, EpollEt, Async, Uring]: $($case),+);
    };
}

/// A server running in this process on 127.0.0.1:<free port>.
pub struct TestServer {
    pub addr: SocketAddr,
    pub mode: Mode,
    shutdown: Shutdown,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl TestServer {
    #[track_caller]
    pub fn start(mode: Mode, config: Config) -> Self {
        Self::start_on("127.0.0.1:0", mode, config)
    }

    #[track_caller]
    pub fn start_on(listen: &str, mode: Mode, config: Config) -> Self {
        let listener = TcpListener::bind(listen).expect("bind proxy listener");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = Shutdown::new();
        let trigger = shutdown.clone();
        let config = Arc::new(Config {
            threads: config.threads.or(Some(2)),
            ..config
        });
        let thread = std::thread::spawn(move || proxy::modes::run(listener, config, mode, trigger));
        TestServer {
            addr,
            mode,
            shutdown,
            thread: Some(thread),
        }
    }

    /// Triggers shutdown and waits for the server to return.
    pub fn stop(mut self) -> io::Result<()> {
        self.shutdown.trigger();
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("server thread panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A connected socket with test timeouts set.
#[track_caller]
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    stream
}

/// Reads until EOF; `Err` on reset or timeout.
pub fn read_to_end(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut all = Vec::new();
    stream.read_to_end(&mut all)?;
    Ok(all)
}

/// Whether the server closed the connection (EOF or reset) without sending anything more.
pub fn closed_without_data(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(err) => err.kind() == io::ErrorKind::ConnectionReset,
    }
}

/// Reads one complete SOCKS5 reply.
pub fn read_reply(stream: &mut TcpStream) -> io::Result<(ReplyCode, TargetAddr)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match client::parse_reply(&buf) {
            Ok(Some((code, addr, _))) => return Ok((code, addr)),
            Ok(None) => {}
            Err(err) => return Err(io::Error::new(io::ErrorKind::InvalidData, err)),
        }
        // One byte at a time so nothing past the reply is consumed.
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.push(byte[0]);
    }
}

/// Reads exactly `n` bytes.
pub fn read_exact(stream: &mut TcpStream, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf)?;
    Ok(buf)
}

/// Greets with "no auth" (or username/password, which must be accepted) on a connected
/// stream.
pub fn negotiate(stream: &mut TcpStream, credentials: Option<(&str, &str)>) -> io::Result<()> {
    let method = if credentials.is_some() { 2 } else { 0 };
    stream.write_all(&client::encode_greeting(&[method]))?;
    let chosen = read_exact(stream, 2)?;
    if chosen != [5, method] {
        return Err(io::Error::other(format!("method reply {chosen:?}")));
    }
    if let Some((name, password)) = credentials {
        stream.write_all(&client::encode_auth(name, password))?;
        let status = read_exact(stream, 2)?;
        if status != [1, 0] {
            return Err(io::Error::other(format!("auth reply {status:?}")));
        }
    }
    Ok(())
}

/// Sends a request after the greeting and reads its (first) reply.
pub fn request_on(
    stream: &mut TcpStream,
    command: Command,
    target: &TargetAddr,
) -> io::Result<(ReplyCode, TargetAddr)> {
    let mut request = Vec::new();
    client::encode_request(command, target, &mut request);
    stream.write_all(&request)?;
    read_reply(stream)
}

/// Greets with "no auth" (or username/password), requests CONNECT to `target`, and returns the
/// stream with the reply read.
pub fn socks_connect(
    proxy: SocketAddr,
    target: &TargetAddr,
    credentials: Option<(&str, &str)>,
) -> io::Result<(TcpStream, ReplyCode, TargetAddr)> {
    let mut stream = connect(proxy);
    negotiate(&mut stream, credentials)?;
    let (code, bound) = request_on(&mut stream, Command::Connect, target)?;
    Ok((stream, code, bound))
}

/// Like [`socks_connect`] but insists on success.
#[track_caller]
pub fn open_session(proxy: SocketAddr, target: SocketAddr) -> TcpStream {
    let (stream, code, _) =
        socks_connect(proxy, &TargetAddr::Ip(target), None).expect("SOCKS5 handshake");
    assert_eq!(code, ReplyCode::Succeeded);
    stream
}

/// A target server on its own thread that runs `handle` for every accepted connection.
pub struct Target {
    pub addr: SocketAddr,
    _thread: JoinHandle<()>,
}

impl Target {
    #[track_caller]
    pub fn spawn<F>(bind: &str, handle: F) -> Self
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind(bind).expect("bind target");
        Self::spawn_on(listener, handle)
    }

    pub fn spawn_on<F>(listener: TcpListener, handle: F) -> Self
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let addr = listener.local_addr().expect("addr");
        let handle = Arc::new(handle);
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                let handle = handle.clone();
                std::thread::spawn(move || handle(stream));
            }
        });
        Target {
            addr,
            _thread: thread,
        }
    }

    /// Echoes every byte back; passes the client's FIN on once everything is echoed.
    pub fn echo(bind: &str) -> Self {
        Self::spawn(bind, |mut stream| {
            let mut buf = [0u8; 16384];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = stream.shutdown(NetShutdown::Write);
        })
    }
}

/// A port on 127.0.0.1 with nothing listening (bound, then released).
pub fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// Deterministic bytes: a different stream for each seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// The path of the `proxy` binary built for these tests.
pub fn proxy_binary() -> &'static str {
    env!("CARGO_BIN_EXE_proxy")
}

/// The `proxy` binary running as a child process; killed when dropped.
pub struct ProxyProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub ready_line: String,
}

impl ProxyProcess {
    /// Starts `command` (which runs the proxy binary, perhaps through a shell) and waits for
    /// its ready line.
    #[track_caller]
    pub fn spawn(mut command: std::process::Command) -> Self {
        let child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn proxy");
        Self::spawn_from(child)
    }

    /// Adopts a child spawned with piped stdout (and perhaps piped stderr, collected in the
    /// background for [`ProxyProcess::take_stderr`]).
    #[track_caller]
    pub fn spawn_from(mut child: std::process::Child) -> Self {
        use std::io::BufRead;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let ready_line = rx.recv_timeout(IO_TIMEOUT).expect("ready line in time");
        let addr = proxy::net::listener::parse_ready_line(&ready_line)
            .map(|ready| ready.addrs[0])
            .unwrap_or_else(|| panic!("unexpected ready line {ready_line:?}"));
        ProxyProcess {
            child,
            addr,
            ready_line,
        }
    }

    /// Everything the process wrote on stderr (call after it exited).
    pub fn take_stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }

    /// Starts the proxy binary with `args` (which name the listen address), keeping its
    /// stderr for [`ProxyProcess::take_stderr`].
    #[track_caller]
    pub fn start_capturing_stderr<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Self {
        let child = std::process::Command::new(proxy_binary())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn proxy");
        Self::spawn_from(child)
    }

    /// Starts the proxy binary with `args` on a free loopback port.
    #[track_caller]
    pub fn start(args: &[&str]) -> Self {
        let mut command = std::process::Command::new(proxy_binary());
        command.args(["--listen", "127.0.0.1:0"]).args(args);
        Self::spawn(command)
    }

    /// Sends a signal to the process.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, signal).expect("kill");
    }

    /// Waits for the process to exit (bounded) and returns its status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        for _ in 0..3000 {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("proxy did not exit within 30 s");
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The socket inodes a process holds: in its descriptor table, and in the direct
/// descriptor tables of its io_uring rings (which /proc/PID/fd does not show; the ring's
/// fdinfo lists them under `UserFiles:` as `   N: socket:[INODE]`).
pub fn socket_inodes(pid: u32) -> std::collections::HashSet<u64> {
    fn inode(text: &str) -> Option<u64> {
        text.trim()
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    }
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Default::default();
    };
    let mut inodes = std::collections::HashSet::new();
    for entry in dir.flatten() {
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let link = link.to_string_lossy();
        if let Some(inode) = inode(&link) {
            inodes.insert(inode);
        } else if link == "anon_inode:[io_uring]" {
            let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
            let info = std::fs::read_to_string(info).unwrap_or_default();
            let direct = info
                .lines()
                .skip_while(|line| !line.starts_with("UserFiles:"))
                .skip(1)
                .take_while(|line| line.starts_with(' ') || line.starts_with('\t'));
            inodes.extend(direct.filter_map(|line| inode(line.split_once(':')?.1)));
        }
    }
    inodes
}

/// The rows of a /proc/net table (tcp, tcp6, unix), split into fields, header skipped.
pub fn proc_net_rows(table: &str) -> Vec<Vec<String>> {
    std::fs::read_to_string(format!("/proc/net/{table}"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().map(str::to_owned).collect())
        .collect()
}

/// The inodes of the sockets a process may hold for itself rather than for a session: TCP
/// sockets in the LISTEN state (st 0A, inode in field 9) and Unix sockets (a runtime's signal
/// pipe; inode in field 6), machine-wide.
fn own_socket_inodes() -> std::collections::HashSet<u64> {
    let listening = ["tcp", "tcp6"]
        .into_iter()
        .flat_map(proc_net_rows)
        .filter(|fields| fields.get(3).is_some_and(|state| state == "0A"))
        .filter_map(|fields| fields.get(9)?.parse().ok());
    let unix = proc_net_rows("unix")
        .into_iter()
        .filter_map(|fields| fields.get(6)?.parse().ok());
    listening.chain(unix).collect()
}

/// How many sockets a process holds for its sessions: every socket but its listeners and Unix
/// sockets, in any state (a socket that was reset is in no table, but still counts here).
pub fn session_sockets(pid: u32) -> usize {
    let own = own_socket_inodes();
    socket_inodes(pid)
        .iter()
        .filter(|inode| !own.contains(inode))
        .count()
}

/// Waits (bounded, 20 s) until a process holds no session socket; returns how many remain.
pub fn wait_for_no_session_sockets(pid: u32) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let open = session_sockets(pid);
        if open == 0 || std::time::Instant::now() >= deadline {
            return open;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a read ended because the peer closed (EOF or reset), as opposed to timing out.
pub fn ends_with_close(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(err) => {
                return matches!(
                    err.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                )
            }
        }
    }
}

/// Closes a socket with a reset (SO_LINGER 0) instead of a FIN.
pub fn reset(stream: TcpStream) {
    rustix::net::sockopt::set_socket_linger(&stream, Some(Duration::ZERO)).expect("linger");
    drop(stream);
}

/// A loopback listener whose accept queue is full, so further SYNs are dropped: a connect to
/// it neither succeeds nor fails until it times out. Returns the address and the connections
/// that fill the queue (keep them alive).
#[track_caller]
pub fn black_hole() -> (SocketAddr, Vec<TcpStream>) {
    use rustix::net::{bind, listen, socket, AddressFamily, SocketType};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    bind(&fd, &"127.0.0.1:0".parse::<SocketAddr>().expect("addr")).expect("bind");
    listen(&fd, 0).expect("listen");
    let listener = TcpListener::from(fd);
    let addr = listener.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(stream) => fillers.push(stream),
            Err(_) => {
                std::mem::forget(listener);
                return (addr, fillers);
            }
        }
    }
    panic!("could not fill the accept queue of a backlog-0 listener");
}

/// Whether an I/O error is a timeout (the peer neither answered nor closed).
pub fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes `message` and reads it back; whether it came back intact.
pub fn echo_check(stream: &mut TcpStream, message: &[u8]) -> bool {
    stream.write_all(message).is_ok()
        && read_exact(stream, message.len()).is_ok_and(|echo| echo == message)
}

/// Writes `message` and insists it comes back intact.
#[track_caller]
pub fn assert_echo(stream: &mut TcpStream, message: &[u8]) {
    stream.write_all(message).expect("write");
    assert_eq!(read_exact(stream, message.len()).expect("echo"), message);
}

/// A user list for username/password authentication.
pub fn user_db(users: &[(&str, &str)]) -> Arc<UserDb> {
    let mut db = UserDb::default();
    for (name, password) in users {
        db.insert(name, password);
    }
    Arc::new(db)
}

/// A server configuration requiring these users.
pub fn with_users(users: &[(&str, &str)]) -> Config {
    Config {
        users: Some(user_db(users)),
        ..Config::default()
    }
}

/// A file of this test process's temporary directory with `contents` and permission `mode`;
/// the directory is per process, so parallel test binaries do not collide.
#[track_caller]
pub fn temp_file(name: &str, contents: &str, mode: u32) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("proxy-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    // Written aside and renamed into place: a proxy of a test running alongside never reads
    // it half written.
    let aside = dir.join(format!(".{name}.{:?}", std::thread::current().id()));
    std::fs::write(&aside, contents).expect("write temp file");
    std::fs::set_permissions(&aside, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::fs::rename(&aside, &path).expect("rename temp file");
    path
}

/// A users file (`name:password` lines) with permission `mode`.
#[track_caller]
pub fn users_file(name: &str, users: &[(&str, &str)], mode: u32) -> std::path::PathBuf {
    let text: String = users.iter().map(|(n, p)| format!("{n}:{p}\n")).collect();
    temp_file(name, &text, mode)
}

/// How the proxy answered one session attempt while short of a resource.
#[derive(Debug)]
pub enum Attempt {
    Established(TcpStream),
    /// Reply 0x01: the outgoing socket could not be created.
    RefusedWithReply,
    /// Closed (EOF or reset) before a reply: refused at accept.
    RefusedClosed,
}

/// One CONNECT attempt; a client left waiting (no answer within the I/O timeout) and any
/// reply other than success or 0x01 are errors, never refusals.
pub fn attempt_session(proxy: SocketAddr, target: &TargetAddr) -> Result<Attempt, String> {
    match socks_connect(proxy, target, None) {
        Ok((stream, ReplyCode::Succeeded, _)) => Ok(Attempt::Established(stream)),
        Ok((_, ReplyCode::GeneralFailure, _)) => Ok(Attempt::RefusedWithReply),
        Ok((_, code, _)) => Err(format!("unexpected reply {code:?}")),
        Err(err) if is_timeout(&err) => {
            Err("a client was left waiting instead of being refused".to_string())
        }
        Err(_) => Ok(Attempt::RefusedClosed),
    }
}

/// Opens sessions until one works (bounded: 200 tries, 20 ms apart), retrying while the
/// server notices earlier closes or frees the resource it ran out of.
pub fn open_session_eventually(proxy: SocketAddr, target: SocketAddr) -> Option<TcpStream> {
    for _ in 0..200 {
        if let Ok((stream, ReplyCode::Succeeded, _)) =
            socks_connect(proxy, &TargetAddr::Ip(target), None)
        {
            return Some(stream);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A proxy whose stderr lines arrive on a channel as they are written, so a test can wait
/// for the log line that says a reload was done (or refused).
pub struct Logged {
    pub proxy: ProxyProcess,
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Logged {
    pub fn start(args: &[&std::ffi::OsStr]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(proxy_binary())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn proxy");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Logged {
            proxy: ProxyProcess::spawn_from(child),
            lines,
        }
    }

    /// Waits (bounded) until `count` log lines containing `text` have been written.
    #[track_caller]
    pub fn wait_for(&self, text: &str, count: usize) -> String {
        let mut seen = Vec::new();
        let mut found = 0;
        while found < count {
            let line = self
                .lines
                .recv_timeout(IO_TIMEOUT)
                .unwrap_or_else(|_| panic!("no log line with {text:?}; saw {seen:#?}"));
            if line.contains(text) {
                found += 1;
            }
            seen.push(line);
        }
        seen.join("\n")
    }
}

/// Whether `program` runs here; when it does not, says that the test is skipped and which
/// Debian package has it.
pub fn installed_or_skip(program: &str, package: &str) -> bool {
    let found = std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        eprintln!("skipped: {program} is not installed (Debian package {package})");
    }
    found
}
