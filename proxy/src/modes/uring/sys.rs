//! The `uring` mode's only `unsafe` code: the ring, the memory the kernel reads or writes
//! while an operation runs, and the provided-buffer ring.
//!
//! The contract io_uring imposes is that whatever an operation points at stays valid until
//! its last completion. [`Ring`] keeps that promise itself, so the event loop needs no
//! `unsafe`: an operation's memory is either owned by the ring for as long as the operation
//! runs ([`Held`], given back with the completion) or is the buffer pool, which the ring owns
//! and frees only after every operation has completed (see `Drop`). Socket options point at
//! `static`s.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, CancelBuilder, DestinationSlot, Fd, Fixed, SubmitArgs};
use io_uring::{cqueue, opcode, squeue, IoUring};

/// Bytes in one provided buffer: one receive takes at most this much.
pub const BUF_LEN: usize = 32 * 1024;
/// Provided buffers per ring (a power of two, at most 32,768).
pub const BUF_COUNT: u16 = 512;
/// The buffer group the ring's receives take their buffers from.
const BUF_GROUP: u16 = 0;

static ONE: libc::c_int = 1;
static LINGER_ZERO: libc::linger = libc::linger {
    l_onoff: 1,
    l_linger: 0,
};

/// Memory an operation reads or writes, owned by the ring until the operation completes.
pub enum Held {
    /// Bytes to send (a reply, or what the client sent past its request).
    Bytes(Vec<u8>),
    /// A descriptor to install in the direct table; the kernel writes the slot it chose
    /// over it.
    Install(Box<RawFd>),
    /// Where a single-shot accept writes the client's address.
    Peer(Box<(libc::sockaddr_storage, libc::socklen_t)>),
}

impl Held {
    /// The client address an accept wrote, if this held one.
    pub fn peer(&self) -> Option<SocketAddr> {
        let Held::Peer(peer) = self else {
            return None;
        };
        let (storage, len) = &**peer;
        let len = *len as usize;
        match i32::from(storage.ss_family) {
            libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
                // SAFETY: the kernel wrote a `sockaddr_in` (family AF_INET, length checked)
                // at the start of the storage, which is larger and suitably aligned.
                let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
                let ip = u32::from_be(sin.sin_addr.s_addr);
                Some(SocketAddr::V4(SocketAddrV4::new(
                    ip.into(),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
                // SAFETY: as above, for a `sockaddr_in6`.
                let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    sin6.sin6_addr.s6_addr.into(),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }

    /// The direct slot an install chose.
    pub fn installed_slot(&self) -> Option<u32> {
        match self {
            Held::Install(slot) => u32::try_from(**slot).ok(),
            _ => None,
        }
    }
}

/// One completion, with the memory its operation held when it was the last one.
pub struct Completion {
    /// The token the operation was pushed with.
    pub token: u64,
    /// The result: a count, a slot, or a negated errno.
    pub result: i32,
    /// Whether more completions of the same operation will follow (multishot).
    pub more: bool,
    /// The provided buffer the kernel filled, if any (it must be given back).
    pub buffer: Option<u16>,
    /// What the operation held, after its last completion.
    pub held: Option<Held>,
}

/// Whether the kernel offers what the mode needs, tried on a small ring with the production
/// flags; the error says what is missing.
pub fn probe(min_wait: bool) -> Result<(), String> {
    let mut ring = builder()
        .build(8)
        .map_err(|err| format!("io_uring_setup: {err}{}", disabled_hint()))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|err| format!("probing io_uring opcodes: {err}"))?;
    let needed = [
        (opcode::Accept::CODE, "ACCEPT"),
        (opcode::Recv::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::FilesUpdate::CODE, "FILES_UPDATE"),
        (opcode::Close::CODE, "CLOSE"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        (opcode::Shutdown::CODE, "SHUTDOWN"),
        (opcode::Read::CODE, "READ"),
        (opcode::SetSockOpt::CODE, "URING_CMD"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(format!("the kernel's io_uring lacks {name}"));
        }
    }
    ring.submitter()
        .register_files_sparse(1)
        .map_err(|err| format!("registering a direct descriptor table: {err}"))?;
    probe_socket_option(&mut ring)?;
    if min_wait && !ring.params().is_feature_min_timeout() {
        return Err("--batch-window needs io_uring's min-wait timeout (Linux 6.12)".into());
    }
    Ok(())
}

/// Sets SO_KEEPALIVE on a fresh socket through the ring: socket options by io_uring command
/// (Linux 6.7), which the mode uses for TCP_NODELAY and for passing resets on (SO_LINGER).
fn probe_socket_option(ring: &mut IoUring) -> Result<(), String> {
    let socket = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::STREAM,
        None,
    )
    .map_err(|err| format!("probing socket options: {err}"))?;
    let entry = opcode::SetSockOpt::new(
        Fd(std::os::fd::AsRawFd::as_raw_fd(&socket)),
        libc::SOL_SOCKET as u32,
        libc::SO_KEEPALIVE as u32,
        &ONE as *const libc::c_int as *const libc::c_void,
        std::mem::size_of::<libc::c_int>() as u32,
    )
    .build()
    .user_data(1);
    // SAFETY: the option value is a `static`; the socket outlives the wait below, which
    // returns once the operation has completed.
    unsafe { ring.submission().push(&entry) }
        .map_err(|_| "probing socket options: the submission queue is full".to_string())?;
    ring.submit_and_wait(1)
        .map_err(|err| format!("probing socket options: {err}"))?;
    let result = ring
        .completion()
        .next()
        .map_or(-libc::EIO, |cqe| cqe.result());
    if result < 0 {
        return Err(format!(
            "socket options through io_uring (Linux 6.7): {}",
            io::Error::from_raw_os_error(-result)
        ));
    }
    Ok(())
}

fn disabled_hint() -> String {
    match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(value) if value.trim() != "0" => format!(" (kernel.io_uring_disabled={})", value.trim()),
        _ => String::new(),
    }
}

fn builder() -> io_uring::Builder {
    let mut builder = IoUring::builder();
    // One thread submits and reaps; deferred task work runs only when it waits, in a batch.
    builder
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_submit_all();
    builder
}

/// Anonymous memory, unmapped on drop.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is affected. It is
        // populated so that the pool's pages are resident from the start: an idle session
        // then adds nothing to RSS however many buffers traffic has cycled through.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { addr, len })
    }
}

impl Mapping {
    /// Leaves the memory mapped for good (the kernel may still use it).
    fn forget(&mut self) {
        self.len = 0;
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: the mapping was created by `Mapping::new` with this length, and the ring
        // drops it only once the kernel no longer uses it (see `Ring`'s drop).
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// The provided buffers: `BUF_COUNT` buffers of `BUF_LEN` bytes and the ring that hands
/// them to the kernel. A buffer belongs to the kernel from when it is published until a
/// completion names it, then to the loop until it is recycled.
struct BufPool {
    entries: Mapping,
    buffers: Mapping,
    /// Our tail: entries up to here are written; the kernel sees them once published.
    tail: u16,
    published: u16,
    /// Buffers the kernel holds (published and not yet named by a completion).
    with_kernel: usize,
}

impl BufPool {
    fn new() -> io::Result<BufPool> {
        let entries = Mapping::new(usize::from(BUF_COUNT) * std::mem::size_of::<BufRingEntry>())?;
        let buffers = Mapping::new(usize::from(BUF_COUNT) * BUF_LEN)?;
        let mut pool = BufPool {
            entries,
            buffers,
            tail: 0,
            published: 0,
            with_kernel: 0,
        };
        for bid in 0..BUF_COUNT {
            pool.recycle(bid);
        }
        Ok(pool)
    }

    fn base(&self) -> *mut BufRingEntry {
        self.entries.addr.cast()
    }

    fn recycle(&mut self, bid: u16) {
        debug_assert!(bid < BUF_COUNT);
        let index = usize::from(self.tail & (BUF_COUNT - 1));
        let addr = self.buffers.addr as u64 + u64::from(bid) * BUF_LEN as u64;
        // SAFETY: `index < BUF_COUNT`, inside the entries mapping. The kernel only reads
        // entries between its head and the published tail; this one is past the published
        // tail (we give back only buffers a completion named, so at most BUF_COUNT are ever
        // published and unconsumed: the slot is free).
        let entry = unsafe { &mut *self.base().add(index) };
        entry.set_addr(addr);
        entry.set_len(BUF_LEN as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes the recycled buffers visible to the kernel.
    fn publish(&mut self) {
        if self.tail == self.published {
            return;
        }
        // SAFETY: the tail field lies in the first entry of the page-aligned ring mapping;
        // the kernel reads it atomically, so it is written through an atomic with Release,
        // ordering the entry writes before it.
        let tail = unsafe { &*(BufRingEntry::tail(self.base()) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
        self.with_kernel += usize::from(self.tail.wrapping_sub(self.published));
        self.published = self.tail;
    }

    fn slice(&self, bid: u16, len: usize) -> &[u8] {
        assert!(bid < BUF_COUNT && len <= BUF_LEN, "buffer {bid} len {len}");
        // SAFETY: inside the buffers mapping (checked above). The loop reads a buffer only
        // after a completion named it and before recycling it: the kernel does not write
        // it meanwhile.
        unsafe {
            std::slice::from_raw_parts(
                (self.buffers.addr as *const u8).add(usize::from(bid) * BUF_LEN),
                len,
            )
        }
    }

    fn addr(&self, bid: u16, offset: usize) -> *const u8 {
        assert!(
            bid < BUF_COUNT && offset <= BUF_LEN,
            "buffer {bid} offset {offset}"
        );
        // SAFETY: inside the buffers mapping (checked above).
        unsafe { (self.buffers.addr as *const u8).add(usize::from(bid) * BUF_LEN + offset) }
    }
}

/// One thread's io_uring, its direct descriptor table and its provided buffers.
pub struct Ring {
    // Field order matters for drop: the ring goes (ending every operation) before the pool.
    ring: IoUring,
    pool: BufPool,
    held: HashMap<u64, Held>,
    /// Operations pushed whose last completion has not been reaped.
    in_flight: usize,
    /// Direct descriptor slots registered.
    slots: u32,
}

impl Ring {
    /// A ring with `sq` submission entries, a direct table of `slots` descriptors and the
    /// buffer pool registered. Must be called on the thread that will use it.
    pub fn new(sq: u32, slots: u32) -> io::Result<Ring> {
        let ring = builder().setup_cqsize(sq * 16).build(sq)?;
        ring.submitter().register_files_sparse(slots)?;
        let mut pool = BufPool::new()?;
        // SAFETY: the entries mapping is page-aligned, sized for BUF_COUNT entries, and
        // lives in the same `Ring`, dropped after the `IoUring` (field order).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                pool.base() as u64,
                BUF_COUNT,
                BUF_GROUP,
                0,
            )?;
        }
        pool.publish();
        Ok(Ring {
            ring,
            pool,
            held: HashMap::new(),
            in_flight: 0,
            slots,
        })
    }

    /// Direct descriptor slots in the table.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// Buffers the kernel may still fill.
    pub fn buffers_with_kernel(&self) -> usize {
        self.pool.with_kernel
    }

    /// The bytes the kernel received into buffer `bid`.
    pub fn buffer(&self, bid: u16, len: usize) -> &[u8] {
        self.pool.slice(bid, len)
    }

    /// Gives buffer `bid` back to the kernel (at the next [`Ring::publish`]).
    pub fn recycle(&mut self, bid: u16) {
        self.pool.recycle(bid);
    }

    /// Publishes recycled buffers.
    pub fn publish(&mut self) {
        self.pool.publish();
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry built in this module points only at memory that outlives
            // its operation: `held` entries (kept until the last completion), the pool and
            // `static`s (kept until the ring is gone).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.in_flight += 1;
                return Ok(());
            }
            // Full: hand the queue to the kernel and retry.
            match self.ring.submit() {
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                    // The completion queue is full: the caller reaps at its next wait.
                    self.ring.submit_and_wait(0)?;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Submits what is queued if fewer than `entries` submission entries are free.
    fn make_room(&mut self, entries: usize) -> io::Result<()> {
        let free = {
            let mut sq = self.ring.submission();
            sq.sync();
            sq.capacity() - sq.len()
        };
        if free < entries {
            self.ring.submit()?;
        }
        Ok(())
    }

    fn push_held(&mut self, entry: squeue::Entry, token: u64, held: Held) -> io::Result<()> {
        self.push(entry.user_data(token))?;
        if let Some(old) = self.held.insert(token, held) {
            // Two live operations with one token would be a bug in the loop; never free
            // memory the kernel may still use.
            debug_assert!(false, "token {token:#x} reused while in flight");
            std::mem::forget(old);
        }
        Ok(())
    }

    /// One accept on `listener` into a direct slot, with the client's address.
    pub fn accept_one(&mut self, listener: RawFd, token: u64) -> io::Result<()> {
        // SAFETY: zero is a valid `sockaddr_storage`.
        let mut peer: Box<(libc::sockaddr_storage, libc::socklen_t)> =
            Box::new((unsafe { std::mem::zeroed() }, 0));
        peer.1 = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let entry = opcode::Accept::new(
            Fd(listener),
            &mut peer.0 as *mut _ as *mut libc::sockaddr,
            &mut peer.1,
        )
        .file_index(Some(DestinationSlot::auto_target()))
        .build();
        self.push_held(entry, token, Held::Peer(peer))
    }

    /// One receive on direct `slot` into a provided buffer.
    pub fn recv_one(&mut self, slot: u32, token: u64) -> io::Result<()> {
        let entry = opcode::Recv::new(Fixed(slot), std::ptr::null_mut(), BUF_LEN as u32)
            .buf_group(BUF_GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT);
        self.push(entry.user_data(token))
    }

    /// Multishot receive on direct `slot` into provided buffers.
    pub fn recv_multi(&mut self, slot: u32, token: u64) -> io::Result<()> {
        let entry = opcode::RecvMulti::new(Fixed(slot), BUF_GROUP).build();
        self.push(entry.user_data(token))
    }

    /// Sends `len` bytes of buffer `bid` from `offset` on direct `slot`, all or an error.
    pub fn send_buffer(
        &mut self,
        slot: u32,
        bid: u16,
        offset: usize,
        len: usize,
        token: u64,
    ) -> io::Result<()> {
        assert!(offset + len <= BUF_LEN);
        let entry = opcode::Send::new(Fixed(slot), self.pool.addr(bid, offset), len as u32)
            .flags(libc::MSG_WAITALL)
            .build();
        self.push(entry.user_data(token))
    }

    /// Sends `bytes` on direct `slot`, all or an error.
    pub fn send_bytes(&mut self, slot: u32, bytes: Vec<u8>, token: u64) -> io::Result<()> {
        let entry = opcode::Send::new(Fixed(slot), bytes.as_ptr(), bytes.len() as u32)
            .flags(libc::MSG_WAITALL)
            .build();
        self.push_held(entry, token, Held::Bytes(bytes))
    }

    /// Reads an eventfd's 8-byte counter.
    pub fn read_counter(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut counter = vec![0u8; 8];
        let entry = opcode::Read::new(Fd(fd), counter.as_mut_ptr(), 8).build();
        self.push_held(entry, token, Held::Bytes(counter))
    }

    /// Waits until an ordinary descriptor is writable (a connect finished).
    pub fn poll_writable(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        let entry = opcode::PollAdd::new(Fd(fd), libc::POLLOUT as u32).build();
        self.push(entry.user_data(token))
    }

    /// Moves an ordinary descriptor into a direct slot the kernel picks (the caller closes
    /// the ordinary one after the completion; [`Held::installed_slot`] says which slot).
    pub fn install(&mut self, fd: RawFd, token: u64) -> io::Result<()> {
        let fd = Box::new(fd);
        // Offset -1 is IORING_FILE_INDEX_ALLOC: the kernel picks a free slot and writes it
        // over the descriptor.
        let entry = opcode::FilesUpdate::new(&*fd as *const RawFd, 1)
            .offset(-1)
            .build();
        self.push_held(entry, token, Held::Install(fd))
    }

    /// Sets TCP_NODELAY on direct `slot`.
    pub fn set_nodelay(&mut self, slot: u32, token: u64) -> io::Result<()> {
        let entry = opcode::SetSockOpt::new(
            Fixed(slot),
            libc::IPPROTO_TCP as u32,
            libc::TCP_NODELAY as u32,
            &ONE as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        )
        .build();
        self.push(entry.user_data(token))
    }

    /// Shuts down the sending side of direct `slot` (the peer reads EOF).
    pub fn shutdown_write(&mut self, slot: u32, token: u64) -> io::Result<()> {
        let entry = opcode::Shutdown::new(Fixed(slot), libc::SHUT_WR).build();
        self.push(entry.user_data(token))
    }

    /// Cancels the operation pushed with `target`.
    pub fn cancel(&mut self, target: u64, token: u64) -> io::Result<()> {
        self.push(opcode::AsyncCancel::new(target).build().user_data(token))
    }

    /// Ends every operation on direct `slot`, then closes it; with `reset`, the close sends
    /// RST rather than FIN. The steps are hard-linked: each runs whatever the last gave.
    pub fn close(&mut self, slot: u32, reset: bool, token: u64) -> io::Result<()> {
        // A chain split across two submissions would not be a chain: the close could run
        // before the cancel.
        self.make_room(3)?;
        if reset {
            let linger = opcode::SetSockOpt::new(
                Fixed(slot),
                libc::SOL_SOCKET as u32,
                libc::SO_LINGER as u32,
                &LINGER_ZERO as *const libc::linger as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as u32,
            )
            .build()
            .flags(squeue::Flags::IO_HARDLINK);
            self.push(linger.user_data(token))?;
        }
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::fd(Fixed(slot)).all())
            .build()
            .flags(squeue::Flags::IO_HARDLINK);
        self.push(cancel.user_data(token))?;
        self.push(opcode::Close::new(Fixed(slot)).build().user_data(token))
    }

    /// Submits what was pushed and waits for a completion, at most `timeout` (`None`: until
    /// one comes). With a `batch_window`, waits up to that long for `batch` completions
    /// before returning with what came.
    pub fn wait(
        &mut self,
        timeout: Option<Duration>,
        batch_window: Duration,
        batch: usize,
    ) -> io::Result<()> {
        let windowed = !batch_window.is_zero() && timeout != Some(Duration::ZERO);
        let waited = match timeout {
            // No deadline and no window: no timer to arm in the kernel.
            None if !windowed => self.ring.submit_and_wait(1),
            _ => {
                let timespec =
                    io_uring::types::Timespec::from(timeout.unwrap_or(Duration::from_secs(3600)));
                let mut args = SubmitArgs::new().timespec(&timespec);
                let mut want = 1;
                if windowed {
                    let window = batch_window.as_micros().min(u128::from(u32::MAX)) as u32;
                    args = args.min_wait_usec(window);
                    want = batch;
                }
                self.ring.submitter().submit_with_args(want, &args)
            }
        };
        match waited {
            Ok(_) => Ok(()),
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(err) => Err(err),
        }
    }

    /// Takes every completion that has arrived.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        for cqe in self.ring.completion() {
            let flags = cqe.flags();
            let more = cqueue::more(flags);
            let token = cqe.user_data();
            let held = if more {
                None
            } else {
                self.in_flight -= 1;
                // Only handshakes, installs and accepts hold memory: a relay's completions
                // skip the lookup.
                if self.held.is_empty() {
                    None
                } else {
                    self.held.remove(&token)
                }
            };
            let buffer = cqueue::buffer_select(flags);
            if buffer.is_some() {
                self.pool.with_kernel -= 1;
            }
            out.push(Completion {
                token,
                result: cqe.result(),
                more,
                buffer,
                held,
            });
        }
    }
}

impl Drop for Ring {
    /// Ends every operation and waits (bounded) for their completions, so that no memory
    /// the kernel may still use is freed. If they do not all come, the memory is leaked.
    fn drop(&mut self) {
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::any()).build();
        let _ = self.push(cancel.user_data(u64::MAX));
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut completions = Vec::new();
        while self.in_flight > 0 && Instant::now() < deadline {
            if self
                .wait(Some(Duration::from_millis(50)), Duration::ZERO, 1)
                .is_err()
            {
                break;
            }
            completions.clear();
            self.reap(&mut completions);
        }
        if self.in_flight > 0 {
            tracing::warn!(
                "{} io_uring operations did not end; leaking their memory",
                self.in_flight
            );
            std::mem::forget(std::mem::take(&mut self.held));
            self.pool.buffers.forget();
            self.pool.entries.forget();
        }
    }
}
