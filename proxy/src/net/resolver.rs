//! Name resolution off the event loops: a small pool of threads calling getaddrinfo.
//!
//! getaddrinfo blocks, so an event loop hands names to this pool and gets the addresses back
//! through a callback (which typically queues them and wakes the loop).

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

/// Threads in the pool: enough for a burst of slow lookups, small enough to cost nothing idle.
const RESOLVER_THREADS: usize = 4;

/// What the pool calls with a lookup's outcome.
pub type ResolveCallback = Box<dyn FnOnce(io::Result<Vec<SocketAddr>>) + Send>;

/// A resolution for an event loop's session: its slab key, its id, and the addresses.
pub type Resolved = (usize, u32, io::Result<Vec<SocketAddr>>);

struct Job {
    name: String,
    port: u16,
    done: ResolveCallback,
}

/// The process-wide resolver pool.
pub struct Resolver {
    jobs: Mutex<Sender<Job>>,
}

impl Resolver {
    /// The shared pool, started on first use.
    pub fn global() -> &'static Resolver {
        static POOL: OnceLock<Resolver> = OnceLock::new();
        POOL.get_or_init(|| {
            let (jobs, queue) = mpsc::channel::<Job>();
            let queue = Arc::new(Mutex::new(queue));
            for i in 0..RESOLVER_THREADS {
                let queue = queue.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("proxy-resolver-{i}"))
                    .stack_size(256 * 1024)
                    .spawn(move || serve_lookups(&queue));
                if let Err(err) = spawned {
                    tracing::error!("cannot start resolver thread: {err}");
                }
            }
            Resolver {
                jobs: Mutex::new(jobs),
            }
        })
    }

    /// Resolves `name:port` for the session `(key, id)` of an event loop: sends the result
    /// on `reply` (the loop checks the id, so a reused slab entry ignores it), then `wake`s
    /// the loop.
    pub fn resolve_for_session(
        &self,
        name: &str,
        port: u16,
        session: (usize, u32),
        reply: Sender<Resolved>,
        wake: impl Fn() + Send + 'static,
    ) {
        let (key, id) = session;
        self.resolve(
            name,
            port,
            Box::new(move |result| {
                let _ = reply.send((key, id, result));
                wake();
            }),
        );
    }

    /// Resolves `name:port` on the pool and calls `done` with the addresses, in the order
    /// getaddrinfo gave them.
    pub fn resolve(&self, name: &str, port: u16, done: ResolveCallback) {
        let job = Job {
            name: name.to_owned(),
            port,
            done,
        };
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(mpsc::SendError(job)) = jobs.send(job) {
            (job.done)(Err(io::Error::other("resolver pool is gone")));
        }
    }
}

fn serve_lookups(queue: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let queue = queue.lock().unwrap_or_else(|p| p.into_inner());
            match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let result = (job.name.as_str(), job.port)
            .to_socket_addrs()
            .map(|addrs| addrs.collect());
        (job.done)(result);
    }
}
