//! The echo target: a separate process (`loadgen echo`) that sends every byte back.
//!
//! Built never to be the bottleneck: a multi-threaded runtime, sockets waited on for
//! readiness with no per-connection buffer, bytes read into a per-thread scratch buffer and
//! written straight back (only a short write keeps a leftover).

use std::cell::RefCell;
use std::io::{self, Write};
use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 64 * 1024]);
}

/// Listens on every address, prints `listening on A B …`, and echoes until killed.
pub fn run(addrs: &[SocketAddr], threads: usize) -> anyhow::Result<()> {
    // Die with loadgen, even if it is killed outright: no orphans.
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))?;
    if rustix::process::getppid().is_none_or(|pid| pid.as_raw_nonzero().get() == 1) {
        anyhow::bail!("parent already gone");
    }
    crate::stack::raise_nofile_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut bound = Vec::new();
        let mut listeners = Vec::new();
        for addr in addrs {
            let listener = proxy::net::listener::bind(*addr, false)?;
            listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(listener)?;
            bound.push(listener.local_addr()?);
            listeners.push(listener);
        }
        {
            let mut stdout = io::stdout().lock();
            writeln!(stdout, "{}", proxy::net::listener::ready_line(&bound, None))?;
            stdout.flush()?;
        }
        let mut tasks = tokio::task::JoinSet::new();
        for listener in listeners {
            tasks.spawn(accept_loop(listener));
        }
        while tasks.join_next().await.is_some() {}
        Ok(())
    })
}

async fn accept_loop(listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(echo(stream));
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
        }
    }
}

async fn echo(mut stream: TcpStream) {
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let leftover = SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            match stream.try_read(&mut scratch) {
                Ok(0) => Err(()),
                Ok(n) => match stream.try_write(&scratch[..n]) {
                    Ok(w) if w == n => Ok(None),
                    Ok(w) => Ok(Some(scratch[w..n].to_vec())),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        Ok(Some(scratch[..n].to_vec()))
                    }
                    Err(_) => Err(()),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(_) => Err(()),
            }
        });
        match leftover {
            Ok(None) => {}
            Ok(Some(rest)) => {
                if stream.write_all(&rest).await.is_err() {
                    return;
                }
            }
            Err(()) => {
                let _ = stream.shutdown().await;
                return;
            }
        }
    }
}
