//! Collective communication between the ranks of one generation: the students' gradient
//! all-reduce and the teacher → student sends.
//!
//! Two implementations share one reduction algorithm, [`ordered_all_reduce`]: a chain in
//! rank order, so every element is summed as ((b₀ + b₁) + b₂) + … on every rank and the
//! result is bit-identical everywhere, and identical to a single process adding the same
//! partial sums in the same order:
//! - [`LocalCollective`]: threads of one process over channels (embedded mode, tests);
//! - [`TcpCollective`]: processes over TCP, for CPU clusters (addresses from the
//!   coordinator).
//!
//! - [`nccl::NcclCollective`] (feature `cuda`): one rank per GPU over NCCL, with device
//!   methods for the gradient buffer and teacher outputs. NCCL sums in its own order, so
//!   it is bit-identical across ranks but not across topologies; callers that need the
//!   latter keep using [`ordered_all_reduce`] over its `send`/`recv`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Error, Result};

#[cfg(feature = "cuda")]
pub mod nccl;

pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sums `buf` over all ranks, in rank order, into every rank's `buf`. The default is
    /// the chained point-to-point reduction over `send`/`recv` (bit-identical on every
    /// rank); a transport with its own reduction (NCCL) overrides it.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let mine = buf.to_vec();
        ordered_all_reduce(self, &[&mine], buf, CHAIN_CHUNK)
    }
    /// Sends one message to `to`; messages between two ranks arrive in order.
    fn send(&self, to: usize, data: &[u8]) -> Result<()>;
    /// Receives the next message from `from`, blocking until it arrives.
    fn recv(&self, from: usize) -> Result<Vec<u8>>;
    /// Returns once every rank called it.
    fn barrier(&self) -> Result<()>;
}

fn err(msg: String) -> Error {
    Error::Msg(format!("collective: {msg}"))
}

fn check_peer(c: &(impl Collective + ?Sized), peer: usize) -> Result<()> {
    if peer >= c.world_size() || peer == c.rank() {
        return Err(err(format!("rank {} cannot talk to rank {peer} in a group of {}", c.rank(), c.world_size())));
    }
    Ok(())
}

/// f32s per message of the chain, so that ranks down the chain start adding before the
/// first rank finished sending (4 MiB).
pub const CHAIN_CHUNK: usize = 1 << 20;

fn to_bytes(xs: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(xs.len() * 4);
    for x in xs {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

fn from_bytes(bytes: &[u8], out: &mut [f32], from: usize) -> Result<()> {
    if bytes.len() != out.len() * 4 {
        return Err(err(format!("rank {from} sent {} bytes where {} f32s were expected", bytes.len(), out.len())));
    }
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}

/// The all-reduce every implementation here uses. Each rank brings `parts` (its partial
/// sums, in order; usually one); the result, written to `out` on every rank, is
/// `(((p₀₀ + p₀₁) + p₁₀) + …)`: all parts of rank 0 in order, then rank 1's, and so on.
/// A single process that adds the same parts in the same order gets the same bits.
///
/// Reduce: rank 0 sends its running sum to rank 1, which adds its parts and passes it on;
/// rank W−1 holds the result and sends it back down the chain. Both legs are cut into
/// chunks of `chunk` floats so the ranks work in a pipeline.
pub fn ordered_all_reduce(c: &(impl Collective + ?Sized), parts: &[&[f32]], out: &mut [f32], chunk: usize) -> Result<()> {
    let n = out.len();
    if let Some(p) = parts.iter().find(|p| p.len() != n) {
        return Err(err(format!("rank {}: a partial sum has {} elements, the buffer {n}", c.rank(), p.len())));
    }
    let (r, w) = (c.rank(), c.world_size());
    let chunk = chunk.max(1);
    let add_own = |acc: &mut [f32], lo: usize| {
        let len = acc.len();
        for p in parts {
            for (a, x) in acc.iter_mut().zip(&p[lo..lo + len]) {
                *a += *x;
            }
        }
    };
    for lo in (0..n).step_by(chunk) {
        let acc = &mut out[lo..(lo + chunk).min(n)];
        if r == 0 {
            match parts.split_first() {
                Some((first, rest)) => {
                    let len = acc.len();
                    acc.copy_from_slice(&first[lo..lo + len]);
                    for p in rest {
                        for (a, x) in acc.iter_mut().zip(&p[lo..lo + len]) {
                            *a += *x;
                        }
                    }
                }
                None => acc.fill(0.0),
            }
        } else {
            from_bytes(&c.recv(r - 1)?, acc, r - 1)?;
            add_own(acc, lo);
        }
        if r + 1 < w {
            c.send(r + 1, &to_bytes(acc))?;
        }
    }
    // Results flow back from rank W−1 to rank 0.
    for lo in (0..n).step_by(chunk) {
        let acc = &mut out[lo..(lo + chunk).min(n)];
        if r + 1 < w {
            from_bytes(&c.recv(r + 1)?, acc, r + 1)?;
        }
        if r > 0 {
            c.send(r - 1, &to_bytes(acc))?;
        }
    }
    Ok(())
}

/// Every rank sends an empty message to rank 0, which answers everybody once all arrived.
fn gather_barrier(c: &(impl Collective + ?Sized)) -> Result<()> {
    let (r, w) = (c.rank(), c.world_size());
    if r == 0 {
        for from in 1..w {
            let m = c.recv(from)?;
            if !m.is_empty() {
                return Err(err(format!("rank {from} sent a {}-byte message where rank 0 expected a barrier", m.len())));
            }
        }
        for to in 1..w {
            c.send(to, &[])?;
        }
    } else {
        c.send(0, &[])?;
        let m = c.recv(0)?;
        if !m.is_empty() {
            return Err(err(format!("rank 0 sent a {}-byte message where rank {r} expected a barrier", m.len())));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// In-process.

type Inbox = Mutex<Receiver<Vec<u8>>>;

/// One rank of a group of threads in one process.
pub struct LocalCollective {
    rank: usize,
    world: usize,
    /// `to[j]` delivers to rank j's inbox from this rank.
    to: Vec<Option<Sender<Vec<u8>>>>,
    /// `from[j]` holds what rank j sent to this rank.
    from: Vec<Option<Inbox>>,
}

/// A group of `world` ranks; hand one to each thread.
pub fn local_group(world: usize) -> Vec<LocalCollective> {
    let mut senders: Vec<Vec<Option<Sender<Vec<u8>>>>> = (0..world).map(|_| (0..world).map(|_| None).collect()).collect();
    let mut receivers: Vec<Vec<Option<Inbox>>> = (0..world).map(|_| (0..world).map(|_| None).collect()).collect();
    for i in 0..world {
        for j in 0..world {
            if i != j {
                let (tx, rx) = channel();
                senders[i][j] = Some(tx);
                receivers[j][i] = Some(Mutex::new(rx));
            }
        }
    }
    senders
        .into_iter()
        .zip(receivers)
        .enumerate()
        .map(|(rank, (to, from))| LocalCollective { rank, world, to, from })
        .collect()
}

impl Collective for LocalCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn send(&self, to: usize, data: &[u8]) -> Result<()> {
        check_peer(self, to)?;
        let tx = self.to[to].as_ref().expect("every other rank has a channel");
        tx.send(data.to_vec()).map_err(|_| err(format!("rank {to} has left the group")))
    }
    fn recv(&self, from: usize) -> Result<Vec<u8>> {
        check_peer(self, from)?;
        let rx = self.from[from].as_ref().expect("every other rank has a channel");
        let rx = rx.lock().map_err(|_| err(format!("a receiver from rank {from} panicked")))?;
        rx.recv().map_err(|_| err(format!("rank {from} has left the group")))
    }
    fn barrier(&self) -> Result<()> {
        gather_barrier(self)
    }
}

// ---------------------------------------------------------------------------------------
// TCP.

const MAGIC: &[u8; 4] = b"QDCL";
const WIRE_VERSION: u32 = 1;
/// Frames larger than this are refused as garbage rather than allocated.
const MAX_FRAME: u64 = 1 << 36;

struct Handshake {
    group: u64,
    rank: u32,
    world: u32,
}

impl Handshake {
    fn write(&self, s: &mut TcpStream) -> std::io::Result<()> {
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&WIRE_VERSION.to_le_bytes());
        b.extend_from_slice(&self.group.to_le_bytes());
        b.extend_from_slice(&self.rank.to_le_bytes());
        b.extend_from_slice(&self.world.to_le_bytes());
        s.write_all(&b)
    }
    fn read(s: &mut TcpStream) -> std::result::Result<Self, String> {
        let mut b = [0u8; 24];
        s.read_exact(&mut b).map_err(|e| format!("reading the handshake: {e}"))?;
        if &b[0..4] != MAGIC {
            return Err("not a qdistill collective connection".into());
        }
        let v = u32::from_le_bytes(b[4..8].try_into().unwrap());
        if v != WIRE_VERSION {
            return Err(format!("collective wire version {v}, expected {WIRE_VERSION}"));
        }
        Ok(Self {
            group: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            rank: u32::from_le_bytes(b[16..20].try_into().unwrap()),
            world: u32::from_le_bytes(b[20..24].try_into().unwrap()),
        })
    }
}

struct TcpPeer {
    addr: String,
    writer: Mutex<TcpStream>,
    inbox: Mutex<Receiver<std::result::Result<Vec<u8>, String>>>,
}

/// Unblocks every pending `recv`/`send` of a [`TcpCollective`] from another thread, e.g.
/// when the coordinator says the generation ended while a peer hangs.
#[derive(Clone)]
pub struct AbortHandle {
    aborted: Arc<AtomicBool>,
    streams: Arc<Vec<TcpStream>>,
}

impl AbortHandle {
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        for s in self.streams.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
    pub fn is_aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}

/// One rank of a group of processes connected by TCP, a full mesh of one connection per
/// pair. A reader thread per connection drains it into a queue, so a `send` never waits
/// for the receiver to call `recv` and no send order can deadlock.
pub struct TcpCollective {
    rank: usize,
    world: usize,
    peers: Vec<Option<TcpPeer>>,
    abort: AbortHandle,
}

/// Waits for the 24-byte handshake answer without consuming a partial one, so that it
/// can look at `cancelled` and the deadline every 50 ms.
fn await_answer(s: &mut TcpStream, deadline: Instant, cancelled: &dyn Fn() -> bool) -> std::result::Result<Handshake, String> {
    s.set_read_timeout(Some(Duration::from_millis(50))).map_err(|e| e.to_string())?;
    let mut buf = [0u8; 24];
    loop {
        match s.peek(&mut buf) {
            Ok(24) => break,
            Ok(0) => return Err("closed before answering".into()),
            // Part of it is there; the rest is a segment away.
            Ok(_) => std::thread::sleep(Duration::from_millis(1)),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e.to_string()),
        }
        if cancelled() {
            return Err("cancelled".into());
        }
        if Instant::now() >= deadline {
            return Err("no answer before the deadline".into());
        }
    }
    let h = Handshake::read(s);
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    h
}

fn read_frame(s: &mut TcpStream) -> std::result::Result<Vec<u8>, String> {
    let mut len = [0u8; 8];
    s.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(format!("a frame of {len} bytes (garbage on the connection?)"));
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).map_err(|e| e.to_string())?;
    Ok(buf)
}

impl TcpCollective {
    /// Joins group `group` (a number all members agree on, e.g. the generation) as `rank`.
    /// `addrs[j]` is where rank j's `listener` accepts; this rank connects to the ranks
    /// below it and accepts the ranks above it on `listener`. Connections for another
    /// group (a late peer of an old generation) are turned away. Fails after `timeout`.
    pub fn connect(rank: usize, addrs: &[String], listener: &TcpListener, group: u64, timeout: Duration) -> Result<Self> {
        Self::connect_cancellable(rank, addrs, listener, group, timeout, &|| false)
    }

    /// [`Self::connect`] that gives up as soon as `cancelled()` says so (checked every
    /// few milliseconds), e.g. when the coordinator ends the generation while this rank
    /// waits for peers that will never come.
    pub fn connect_cancellable(
        rank: usize,
        addrs: &[String],
        listener: &TcpListener,
        group: u64,
        timeout: Duration,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Self> {
        let world = addrs.len();
        if rank >= world {
            return Err(err(format!("rank {rank} is outside a group of {world}")));
        }
        let deadline = Instant::now() + timeout;
        let me = Handshake { group, rank: rank as u32, world: world as u32 };
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        for (j, addr) in addrs.iter().enumerate().take(rank) {
            streams[j] = Some(Self::dial(addr, j, &me, deadline, cancelled)?);
        }
        let listen_addr = listener.local_addr().map_err(|e| err(format!("listener address: {e}")))?;
        listener.set_nonblocking(true).map_err(|e| err(format!("listener {listen_addr}: {e}")))?;
        let mut missing = world - rank - 1;
        while missing > 0 {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false).map_err(|e| err(format!("{from}: {e}")))?;
                    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                    match Handshake::read(&mut s) {
                        Ok(h) if h.group == group && h.world as usize == world && (h.rank as usize) > rank && streams[h.rank as usize].is_none() => {
                            // A dialer that gave up leaves its connection in the backlog;
                            // answering it fails, and the rank dials again.
                            match me.write(&mut s) {
                                Ok(()) => {
                                    s.set_read_timeout(None).ok();
                                    streams[h.rank as usize] = Some(s);
                                    missing -= 1;
                                }
                                Err(e) => tracing::warn!(%from, rank = h.rank, "collective: answering a connection failed: {e}"),
                            }
                        }
                        Ok(h) => tracing::warn!(%from, group = h.group, rank = h.rank, "collective: turned away a connection for another group or rank"),
                        Err(e) => tracing::warn!(%from, "collective: turned away a connection: {e}"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if cancelled() {
                        return Err(err(format!("rank {rank}: cancelled while waiting for peers to connect")));
                    }
                    if Instant::now() >= deadline {
                        let waiting: Vec<usize> = (rank + 1..world).filter(|&j| streams[j].is_none()).collect();
                        return Err(err(format!("rank {rank} on {listen_addr}: ranks {waiting:?} did not connect within {timeout:?}")));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(err(format!("accepting on {listen_addr}: {e}"))),
            }
        }
        let streams: Vec<Option<TcpStream>> = streams;
        let mut clones = Vec::new();
        let mut peers = Vec::with_capacity(world);
        for (j, s) in streams.into_iter().enumerate() {
            let Some(s) = s else {
                peers.push(None);
                continue;
            };
            s.set_nodelay(true).ok();
            let mut reader = s.try_clone().map_err(|e| err(format!("rank {j}: {e}")))?;
            clones.push(s.try_clone().map_err(|e| err(format!("rank {j}: {e}")))?);
            let (tx, rx) = channel();
            std::thread::Builder::new()
                .name(format!("collective-rx-{j}"))
                .spawn(move || loop {
                    match read_frame(&mut reader) {
                        Ok(m) => {
                            if tx.send(Ok(m)).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                })
                .map_err(|e| err(format!("spawning a reader thread: {e}")))?;
            peers.push(Some(TcpPeer { addr: addrs[j].clone(), writer: Mutex::new(s), inbox: Mutex::new(rx) }));
        }
        Ok(Self { rank, world, peers, abort: AbortHandle { aborted: Arc::new(AtomicBool::new(false)), streams: Arc::new(clones) } })
    }

    fn dial(addr: &str, j: usize, me: &Handshake, deadline: Instant, cancelled: &dyn Fn() -> bool) -> Result<TcpStream> {
        let mut last = String::new();
        let mut wait = Duration::from_millis(10);
        loop {
            let targets: Vec<SocketAddr> = addr.to_socket_addrs().map(|a| a.collect()).unwrap_or_default();
            for t in &targets {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
                match TcpStream::connect_timeout(t, left) {
                    Ok(mut s) => {
                        // The peer answers once it reaches its own connect, which can take
                        // as long as loading its model: wait up to the deadline.
                        let answer = me.write(&mut s).map_err(|e| e.to_string()).and_then(|_| await_answer(&mut s, deadline, cancelled));
                        match answer {
                            Ok(h) if h.group == me.group && h.rank as usize == j && h.world == me.world => {
                                s.set_read_timeout(None).ok();
                                return Ok(s);
                            }
                            Ok(h) => last = format!("{t} answered as rank {} of group {} (want rank {j} of group {})", h.rank, h.group, me.group),
                            Err(e) => last = format!("{t}: {e}"),
                        }
                    }
                    Err(e) => last = format!("{t}: {e}"),
                }
            }
            if targets.is_empty() {
                last = format!("{addr:?} does not resolve to an address");
            }
            if cancelled() {
                return Err(err(format!("rank {}: cancelled while dialling rank {j} at {addr}", me.rank)));
            }
            if Instant::now() >= deadline {
                return Err(err(format!("rank {} could not reach rank {j} at {addr}: {last}", me.rank)));
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_millis(200));
        }
    }

    pub fn abort_handle(&self) -> AbortHandle {
        self.abort.clone()
    }

    fn peer(&self, j: usize) -> Result<&TcpPeer> {
        check_peer(self, j)?;
        Ok(self.peers[j].as_ref().expect("connected to every other rank"))
    }

    fn aborted(&self) -> Error {
        err(format!("rank {}: the group was aborted", self.rank))
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn send(&self, to: usize, data: &[u8]) -> Result<()> {
        let p = self.peer(to)?;
        if self.abort.is_aborted() {
            return Err(self.aborted());
        }
        let mut w = p.writer.lock().map_err(|_| err(format!("a sender to rank {to} panicked")))?;
        w.write_all(&(data.len() as u64).to_le_bytes())
            .and_then(|_| w.write_all(data))
            .map_err(|e| err(format!("sending to rank {to} at {}: {e}", p.addr)))
    }
    fn recv(&self, from: usize) -> Result<Vec<u8>> {
        let p = self.peer(from)?;
        let rx = p.inbox.lock().map_err(|_| err(format!("a receiver from rank {from} panicked")))?;
        match rx.recv() {
            Ok(Ok(m)) => Ok(m),
            _ if self.abort.is_aborted() => Err(self.aborted()),
            Ok(Err(e)) => Err(err(format!("rank {from} at {}: connection lost ({e})", p.addr))),
            Err(_) => Err(err(format!("rank {from} at {}: connection lost", p.addr))),
        }
    }
    fn barrier(&self) -> Result<()> {
        gather_barrier(self)
    }
}

impl Drop for TcpCollective {
    fn drop(&mut self) {
        // Wakes the reader threads so they exit.
        for s in self.abort.streams.iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Sub-groups.

/// Some ranks of a group acting as a group of their own (e.g. the students, without the
/// teacher). Only messages between members pass through it, so it shares the parent's
/// connections safely as long as the parent's other traffic is between other pairs or in
/// a fixed order.
pub struct SubGroup<'a, C: Collective + ?Sized> {
    parent: &'a C,
    members: Vec<usize>,
    rank: usize,
}

impl<'a, C: Collective + ?Sized> SubGroup<'a, C> {
    /// `members` are parent ranks, in the sub-group's rank order; the caller must be one.
    pub fn new(parent: &'a C, members: Vec<usize>) -> Result<Self> {
        let rank = members.iter().position(|&m| m == parent.rank()).ok_or_else(|| {
            err(format!("rank {} is not a member of the sub-group {members:?}", parent.rank()))
        })?;
        if members.iter().any(|&m| m >= parent.world_size()) {
            return Err(err(format!("sub-group {members:?} names ranks outside a group of {}", parent.world_size())));
        }
        Ok(Self { parent, members, rank })
    }
}

impl<C: Collective + ?Sized> Collective for SubGroup<'_, C> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.members.len()
    }
    fn send(&self, to: usize, data: &[u8]) -> Result<()> {
        check_peer(self, to)?;
        self.parent.send(self.members[to], data)
    }
    fn recv(&self, from: usize) -> Result<Vec<u8>> {
        check_peer(self, from)?;
        self.parent.recv(self.members[from])
    }
    fn barrier(&self) -> Result<()> {
        gather_barrier(self)
    }
}

/// The conformance suite every implementation passes: run [`conformance::run`] on every
/// rank's own thread. Public so that the GPU self-test runs it over NCCL too.
pub mod conformance {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{ordered_all_reduce, Collective, SubGroup};

    /// Values whose float sum depends on the order they are added in, so a reduction in
    /// any other order than rank order shows.
    pub fn contribution(rank: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| match (rank + i) % 4 {
                0 => 1.0e8,
                1 => 1.0 + i as f32 * 1e-3,
                2 => -1.0e8,
                _ => 0.1 * (rank as f32 + 1.0) + (i as f32).sin(),
            })
            .collect()
    }

    /// Naive sum in rank order, written independently of the chain.
    pub fn expected(world: usize, n: usize) -> Vec<f32> {
        let parts: Vec<Vec<f32>> = (0..world).map(|r| contribution(r, n)).collect();
        (0..n)
            .map(|i| {
                let mut s = parts[0][i];
                for p in &parts[1..] {
                    s += p[i];
                }
                s
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    macro_rules! ensure {
        ($cond:expr, $($why:tt)*) => {
            if !$cond {
                return Err(format!($($why)*));
            }
        };
    }

    /// Checks the native `all_reduce_sum` of one rank's `buf` against the rank-order sum:
    /// bit for bit where the order is fixed (`exact`, or two ranks, where a + b = b + a);
    /// else within the rounding any summation order of `world` terms can make.
    fn check_sum(got: &[f32], world: usize, n: usize, exact: bool, what: &str) -> Result<(), String> {
        let want = expected(world, n);
        if exact || world <= 2 {
            ensure!(bits(got) == bits(&want), "{what}: all-reduce of {n} floats differs from the rank-order sum");
            return Ok(());
        }
        for i in 0..n {
            let mag: f64 = (0..world).map(|r| contribution(r, n)[i].abs() as f64).sum();
            let tol = world as f64 * f32::EPSILON as f64 * mag;
            ensure!(((got[i] as f64) - (want[i] as f64)).abs() <= tol, "{what}: element {i} is {} where the sum is {} (tolerance {tol:e})", got[i], want[i]);
        }
        Ok(())
    }

    /// One rank's part of the suite. `exact_sum`: whether the native all-reduce promises
    /// rank order (the CPU transports do; NCCL does not beyond two ranks).
    pub fn run(c: &dyn Collective, arrived: &AtomicUsize, exact_sum: bool) -> Result<(), String> {
        let (r, w) = (c.rank(), c.world_size());
        // All-reduce: several sizes, including empty and more than one chain chunk.
        for n in [0, 1, 7, 1000] {
            let mut buf = contribution(r, n);
            c.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
            check_sum(&buf, w, n, exact_sum, &format!("rank {r} n {n}"))?;
        }
        let n = 37;
        let mut buf = contribution(r, n);
        let mine = buf.clone();
        ordered_all_reduce(c, &[&mine], &mut buf, 5).map_err(|e| e.to_string())?;
        ensure!(bits(&buf) == bits(&expected(w, n)), "rank {r}: ordered all-reduce in small chunks differs from the rank-order sum");

        // Several partial sums per rank add in (rank, part) order.
        let parts: Vec<Vec<f32>> = (0..2).map(|k| contribution(2 * r + k, n)).collect();
        let refs: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
        let mut out = vec![0.0; n];
        ordered_all_reduce(c, &refs, &mut out, 8).map_err(|e| e.to_string())?;
        ensure!(bits(&out) == bits(&expected(2 * w, n)), "rank {r}: two parts per rank do not add in (rank, part) order");

        // Point to point: ordered per pair, any sizes, empty included.
        for to in 0..w {
            if to != r {
                for k in 0..3usize {
                    c.send(to, &vec![(r * 10 + k) as u8; k * 1000]).map_err(|e| e.to_string())?;
                }
            }
        }
        for from in 0..w {
            if from != r {
                for k in 0..3usize {
                    let got = c.recv(from).map_err(|e| e.to_string())?;
                    ensure!(got == vec![(from * 10 + k) as u8; k * 1000], "rank {r}: message {k} from rank {from} arrived wrong ({} bytes)", got.len());
                }
            }
        }
        ensure!(c.send(r, b"x").is_err() && c.recv(w).is_err(), "rank {r}: self and out-of-range peers must be refused");

        // Barrier: nobody leaves before everybody arrived.
        arrived.fetch_add(1, Ordering::SeqCst);
        c.barrier().map_err(|e| e.to_string())?;
        ensure!(arrived.load(Ordering::SeqCst) == w, "rank {r} left the barrier early");
        c.barrier().map_err(|e| e.to_string())?;

        // Odd ranks as a sub-group (when there are two or more).
        let odd: Vec<usize> = (0..w).filter(|x| x % 2 == 1).collect();
        if odd.len() >= 2 && r % 2 == 1 {
            let g = SubGroup::new(c, odd.clone()).map_err(|e| e.to_string())?;
            let mut buf = contribution(g.rank(), 9);
            g.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
            ensure!(bits(&buf) == bits(&expected(odd.len(), 9)), "rank {r}: sub-group all-reduce differs from the rank-order sum");
            g.barrier().map_err(|e| e.to_string())?;
        }
        c.barrier().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn in_process_group_passes_the_conformance_suite() {
        for world in [1, 2, 3, 5] {
            let arrived = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for c in local_group(world) {
                    let arrived = &arrived;
                    s.spawn(move || conformance::run(&c, arrived, true).unwrap());
                }
            });
        }
    }

    fn tcp_group(world: usize) -> Vec<(TcpListener, Vec<String>)> {
        let listeners: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        listeners.into_iter().map(|l| (l, addrs.clone())).collect()
    }

    #[test]
    fn tcp_group_passes_the_conformance_suite() {
        for world in [1, 2, 3] {
            let arrived = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for (rank, (l, addrs)) in tcp_group(world).into_iter().enumerate() {
                    let arrived = &arrived;
                    s.spawn(move || {
                        let c = TcpCollective::connect(rank, &addrs, &l, 7, Duration::from_secs(20)).unwrap();
                        conformance::run(&c, arrived, true).unwrap();
                    });
                }
            });
        }
    }

    /// A rank from an old generation dialling in is turned away; the real peer still
    /// joins; a peer that dies turns into an error naming it, not a hang.
    #[test]
    fn tcp_turns_away_other_groups_and_reports_lost_peers() {
        let group = tcp_group(2);
        let addrs = group[0].1.clone();
        let mut it = group.into_iter();
        let (l0, _) = it.next().unwrap();
        let (l1, _) = it.next().unwrap();
        std::thread::scope(|s| {
            let a = addrs.clone();
            let stale = s.spawn(move || {
                // Same address, wrong group: never accepted.
                TcpCollective::dial(&a[0], 0, &Handshake { group: 1, rank: 1, world: 2 }, Instant::now() + Duration::from_millis(300), &|| false)
            });
            let a = addrs.clone();
            let r0 = s.spawn(move || TcpCollective::connect(0, &a, &l0, 2, Duration::from_secs(20)).unwrap());
            assert!(stale.join().unwrap().is_err());
            let r1 = TcpCollective::connect(1, &addrs, &l1, 2, Duration::from_secs(20)).unwrap();
            let r0 = r0.join().unwrap();
            r1.send(0, b"hi").unwrap();
            assert_eq!(r0.recv(1).unwrap(), b"hi");
            drop(r1);
            let e = r0.recv(1).unwrap_err().to_string();
            assert!(e.contains("rank 1") && e.contains("connection lost"), "{e}");
        });
    }

    #[test]
    fn abort_unblocks_a_pending_recv() {
        let group = tcp_group(2);
        let addrs = group[0].1.clone();
        let mut it = group.into_iter();
        let (l0, _) = it.next().unwrap();
        let (l1, _) = it.next().unwrap();
        std::thread::scope(|s| {
            let a = addrs.clone();
            let r1 = s.spawn(move || TcpCollective::connect(1, &a, &l1, 3, Duration::from_secs(20)).unwrap());
            let r0 = TcpCollective::connect(0, &addrs, &l0, 3, Duration::from_secs(20)).unwrap();
            let _r1 = r1.join().unwrap();
            let h = r0.abort_handle();
            let waiter = s.spawn(move || r0.recv(1));
            std::thread::sleep(Duration::from_millis(50));
            h.abort();
            let e = waiter.join().unwrap().unwrap_err().to_string();
            assert!(e.contains("aborted"), "{e}");
        });
    }

    #[test]
    fn a_cancelled_connect_returns_at_once() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = vec![l.local_addr().unwrap().to_string(), other.local_addr().unwrap().to_string()];
        let t0 = Instant::now();
        let flag = AtomicBool::new(false);
        // Connects as `rank` while another thread raises the cancel flag after 100 ms.
        let expect_cancelled = |rank: usize, listener: &TcpListener, what: &str| {
            flag.store(false, Ordering::SeqCst);
            std::thread::scope(|s| {
                s.spawn(|| {
                    std::thread::sleep(Duration::from_millis(100));
                    flag.store(true, Ordering::SeqCst);
                });
                let e = match TcpCollective::connect_cancellable(rank, &addrs, listener, 0, Duration::from_secs(600), &|| flag.load(Ordering::SeqCst)) {
                    Err(e) => e.to_string(),
                    Ok(_) => panic!("{what}"),
                };
                assert!(e.contains("cancelled"), "{e}");
            });
        };
        // Rank 0 waits for a rank 1 that never connects.
        expect_cancelled(0, &l, "nobody connected");
        // Rank 1 dials rank 0, whose listener is in the backlog but never answers.
        expect_cancelled(1, &other, "rank 0 never answered");
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    }

    #[test]
    fn unreachable_peer_fails_with_its_address_after_the_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        let addrs = vec![dead_addr.clone(), l.local_addr().unwrap().to_string()];
        let e = match TcpCollective::connect(1, &addrs, &l, 0, Duration::from_millis(300)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("connected to a closed port"),
        };
        assert!(e.contains(&dead_addr) && e.contains("rank 0"), "{e}");
        let e = match TcpCollective::connect(0, &addrs, &l, 0, Duration::from_millis(100)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("nobody connected"),
        };
        assert!(e.contains("[1] did not connect"), "{e}");
    }
}
