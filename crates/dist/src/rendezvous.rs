//! The TCP rendezvous that hands node 0's NCCL unique id to the other nodes.
//!
//! Node 0 listens; every other node connects (retrying while node 0 is not up yet), says
//! hello, and waits. When all `nnodes - 1` nodes have said a hello that matches node 0's
//! settings, node 0 sends each of them the id and the rendezvous is over: from then on NCCL
//! talks over its own transport. [`RendezvousHost::serve_keep`] and [`Rendezvous::join_keep`]
//! keep each node's connection open instead, for node 0 to send the step plan over it
//! ([`TensorParallelBackend::spawn_multi_node`](crate::TensorParallelBackend::spawn_multi_node),
//! [`serve_remote_ranks`](crate::serve_remote_ranks)); [`PROTOCOL_VERSION`] covers those
//! frames too.
//!
//! # Wire format
//! Every message is a frame: a `u32` little-endian payload length, then the payload, at most
//! [`MAX_FRAME`] bytes (a longer length is refused before anything is allocated).
//!
//! * hello (node → host), 18 bytes: [`MAGIC`], the protocol version (`u16`), then the node's
//!   `node_rank`, `nnodes` and `tensor_parallel_size` (`u32` each), all little-endian;
//! * reply (host → node): `0` then the 128-byte id, or `1` then a UTF-8 reason (at most 512
//!   bytes) when the host refuses the node.
//!
//! The host refuses a hello whose version, `nnodes` or `tensor_parallel_size` differs from its
//! own, whose `node_rank` is out of `1..nnodes`, or whose `node_rank` already joined: that is a
//! misconfigured cluster, so the host also tells the nodes already waiting and fails. A
//! connection that does not speak the protocol at all (wrong magic, wrong length, nothing
//! within a second) is refused and logged, and the host keeps listening: a port scanner does
//! not stop a start-up.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::config::{MAX_WORLD_SIZE, split_host_port};
use crate::{DistConfig, DistError};

/// First bytes of every hello.
pub const MAGIC: [u8; 4] = *b"KVTP";
/// Version of the hello and reply layouts, and of the step frames that may follow on the same
/// connection; both sides must agree. 2: the connection may stay open for the step plan.
pub const PROTOCOL_VERSION: u16 = 2;
/// The largest frame payload read, in bytes.
pub const MAX_FRAME: usize = 1024;
/// Bytes of an NCCL unique id.
pub const UNIQUE_ID_LEN: usize = 128;

const HELLO_LEN: usize = 4 + 2 + 3 * 4;
const REPLY_ID: u8 = 0;
const REPLY_REFUSED: u8 = 1;
const MAX_REASON: usize = 512;
/// How long the host waits for the hello of a connection before dropping it.
const HELLO_WAIT: Duration = Duration::from_secs(1);
/// How often the host polls for connections.
const ACCEPT_POLL: Duration = Duration::from_millis(5);
/// How long a node waits between connection attempts.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// An NCCL unique id: 128 opaque bytes made by rank 0 and shared with every rank.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId(pub [u8; UNIQUE_ID_LEN]);

impl UniqueId {
    /// The id's bytes.
    pub fn as_bytes(&self) -> &[u8; UNIQUE_ID_LEN] {
        &self.0
    }
}

impl fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UniqueId(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// The settings every node of a rendezvous must agree on, and how long to wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rendezvous {
    /// Nodes taking part, node 0 (the host) included.
    pub nnodes: usize,
    /// The tensor-parallel world size, checked to be the same on every node.
    pub tensor_parallel_size: usize,
    /// How long the host waits for all nodes, and a node for the id (connection attempts
    /// included).
    pub timeout: Duration,
}

impl Rendezvous {
    /// The rendezvous of a [`DistConfig`] (which should have been validated).
    pub fn for_config(config: &DistConfig, timeout: Duration) -> Self {
        Self {
            nnodes: config.nnodes,
            tensor_parallel_size: config.tensor_parallel_size,
            timeout,
        }
    }

    fn check(&self) -> Result<(), DistError> {
        if self.nnodes == 0 || self.nnodes > MAX_WORLD_SIZE {
            return Err(DistError::config(
                "nnodes",
                format!("{} is not in 1..={MAX_WORLD_SIZE}", self.nnodes),
            ));
        }
        if self.tensor_parallel_size == 0 || self.tensor_parallel_size > MAX_WORLD_SIZE {
            return Err(DistError::config(
                "tensor_parallel_size",
                format!(
                    "{} is not in 1..={MAX_WORLD_SIZE}",
                    self.tensor_parallel_size
                ),
            ));
        }
        self.deadline().map(|_| ())
    }

    /// When the timeout, counted from now, runs out.
    fn deadline(&self) -> Result<Instant, DistError> {
        if self.timeout.is_zero() {
            return Err(DistError::config("timeout", "must be above zero"));
        }
        Instant::now()
            .checked_add(self.timeout)
            .ok_or_else(|| DistError::config("timeout", format!("{:?} is too long", self.timeout)))
    }

    /// Binds node 0's listener (port 0 picks a free port: see
    /// [`RendezvousHost::local_addr`]). Serve it with [`RendezvousHost::serve`].
    ///
    /// # Errors
    /// [`DistError::Config`] for a bad setting, [`DistError::Io`] when the address cannot be
    /// resolved or bound.
    pub fn bind(
        &self,
        addr: impl ToSocketAddrs + fmt::Display,
    ) -> Result<RendezvousHost, DistError> {
        self.check()?;
        let io = |what, source| DistError::Io {
            what,
            addr: addr.to_string(),
            source,
        };
        let listener = TcpListener::bind(&addr).map_err(|e| io("binding", e))?;
        let local = listener.local_addr().map_err(|e| io("binding", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| io("binding", e))?;
        Ok(RendezvousHost {
            listener,
            local,
            params: *self,
        })
    }

    /// Node 0: binds `addr`, waits for the other `nnodes - 1` nodes and sends them `id`
    /// ([`bind`](Self::bind) then [`RendezvousHost::serve`]).
    ///
    /// # Errors
    /// As [`bind`](Self::bind) and [`RendezvousHost::serve`].
    pub fn host(
        &self,
        addr: impl ToSocketAddrs + fmt::Display,
        id: &UniqueId,
    ) -> Result<(), DistError> {
        self.bind(addr)?.serve(id)
    }

    /// Node `node_rank` (1 or more): connects to node 0 at `addr`, retrying until the timeout
    /// while it is not up yet, says hello and returns the id node 0 sends.
    ///
    /// # Errors
    /// [`DistError::Config`] for a bad setting or a `node_rank` not in `1..nnodes`;
    /// [`DistError::Timeout`] when node 0 cannot be reached or sends nothing in time;
    /// [`DistError::RefusedByHost`] with node 0's reason when it refuses this node;
    /// [`DistError::Protocol`] when its reply is malformed.
    pub fn join(
        &self,
        addr: impl ToSocketAddrs + fmt::Display,
        node_rank: usize,
    ) -> Result<UniqueId, DistError> {
        self.join_keep(addr, node_rank).map(|(id, _)| id)
    }

    /// [`join`](Self::join), keeping the connection to node 0 open (no timeouts left on it,
    /// Nagle off) for [`serve_remote_ranks`](crate::serve_remote_ranks).
    ///
    /// # Errors
    /// As [`join`](Self::join); also [`DistError::Io`] when the connection cannot be set up.
    pub fn join_keep(
        &self,
        addr: impl ToSocketAddrs + fmt::Display,
        node_rank: usize,
    ) -> Result<(UniqueId, TcpStream), DistError> {
        self.check()?;
        if node_rank == 0 || node_rank >= self.nnodes {
            return Err(DistError::config(
                "node_rank",
                format!(
                    "a joining node's rank must be in 1..{} (node 0 hosts), got {node_rank}",
                    self.nnodes
                ),
            ));
        }
        let deadline = self.deadline()?;
        let timeout = |during: String| DistError::Timeout {
            addr: addr.to_string(),
            waited: self.timeout,
            during,
        };
        let mut stream = connect(&addr, deadline)
            .map_err(|last| timeout(format!("connecting (last error: {last})")))?;
        let io = |what, source| DistError::Io {
            what,
            addr: addr.to_string(),
            source,
        };
        let hello = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            node_rank: wire_u32(node_rank),
            nnodes: wire_u32(self.nnodes),
            tensor_parallel_size: wire_u32(self.tensor_parallel_size),
        };
        stream
            .set_write_timeout(Some(remaining(deadline)))
            .and_then(|()| write_frame(&mut stream, &hello.encode()))
            .map_err(|e| io("saying hello to", e))?;
        stream
            .set_read_timeout(Some(remaining(deadline)))
            .map_err(|e| io("reading from", e))?;
        let reply = read_frame(&mut stream).map_err(|e| match e {
            ReadError::TimedOut => timeout(
                "waiting for the unique id (node 0 has not heard from every node yet)".into(),
            ),
            other => DistError::Protocol {
                peer: addr.to_string(),
                reason: format!("reply: {}", other.reason()),
            },
        })?;
        let id = match reply.split_first() {
            Some((&REPLY_ID, id)) => match <[u8; UNIQUE_ID_LEN]>::try_from(id) {
                Ok(id) => Ok(UniqueId(id)),
                Err(_) => Err(DistError::Protocol {
                    peer: addr.to_string(),
                    reason: format!(
                        "the unique id has {} bytes, expected {UNIQUE_ID_LEN}",
                        id.len()
                    ),
                }),
            },
            Some((&REPLY_REFUSED, reason)) => Err(DistError::RefusedByHost {
                addr: addr.to_string(),
                reason: String::from_utf8_lossy(&reason[..reason.len().min(MAX_REASON)])
                    .into_owned(),
            }),
            _ => Err(DistError::Protocol {
                peer: addr.to_string(),
                reason: format!(
                    "reply tag {:?} is neither {REPLY_ID} (id) nor {REPLY_REFUSED} (refused)",
                    reply.first()
                ),
            }),
        }?;
        keep(&stream).map_err(|e| io("keeping the connection to", e))?;
        Ok((id, stream))
    }
}

/// Readies a rendezvous connection for the step plan: blocking, no timeouts, Nagle off.
fn keep(stream: &TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    stream.set_nodelay(true)
}

/// Shares a unique id over the rendezvous of `config` (validated first): node 0 makes it with
/// `new_id` and hosts on all interfaces at `dist_init_addr`'s port; other nodes join. With a
/// single node, `new_id` alone.
///
/// # Errors
/// [`DistConfig::validate`]'s, `new_id`'s, and those of [`Rendezvous::host`] or
/// [`Rendezvous::join`].
pub fn bootstrap_unique_id(
    config: &DistConfig,
    timeout: Duration,
    new_id: impl FnOnce() -> Result<UniqueId, DistError>,
) -> Result<UniqueId, DistError> {
    config.validate()?;
    if config.nnodes == 1 {
        return new_id();
    }
    let Some(addr) = config.dist_init_addr.as_deref() else {
        return Err(DistError::config(
            "dist_init_addr",
            "required with several nodes",
        ));
    };
    let rendezvous = Rendezvous::for_config(config, timeout);
    if config.is_host() {
        // All interfaces, as torch's TCPStore: the name others dial may not be bindable here.
        let (host, port) = split_host_port(addr)?;
        let any: SocketAddr = if host.starts_with('[') {
            (Ipv6Addr::UNSPECIFIED, port).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, port).into()
        };
        let listener = rendezvous.bind(any)?;
        let id = new_id()?;
        listener.serve(&id)?;
        Ok(id)
    } else {
        rendezvous.join(addr, config.node_rank)
    }
}

/// Node 0's bound listener, before it serves.
#[derive(Debug)]
pub struct RendezvousHost {
    listener: TcpListener,
    local: SocketAddr,
    params: Rendezvous,
}

impl RendezvousHost {
    /// The address bound (with the port picked when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Waits for the other `nnodes - 1` nodes, checks their hellos and sends each the id.
    ///
    /// # Errors
    /// [`DistError::PeerRefused`] naming the field when a node's hello does not match (the
    /// nodes already waiting are told and refused too); [`DistError::Timeout`] naming the
    /// nodes still missing (and the last connection refused as not a node);
    /// [`DistError::Io`] when accepting fails or a node cannot be sent the id.
    pub fn serve(self, id: &UniqueId) -> Result<(), DistError> {
        self.serve_keep(id).map(|_| ())
    }

    /// [`serve`](Self::serve), keeping every node's connection open (no timeouts left on
    /// them, Nagle off) and returning them in node order (node 1's first), for
    /// [`TensorParallelBackend::spawn_multi_node`](crate::TensorParallelBackend::spawn_multi_node).
    ///
    /// # Errors
    /// As [`serve`](Self::serve); also [`DistError::Io`] when a connection cannot be set up.
    pub fn serve_keep(self, id: &UniqueId) -> Result<Vec<TcpStream>, DistError> {
        let params = self.params;
        let deadline = params.deadline()?;
        let mut joined: Vec<Option<Peer>> = (0..params.nnodes).map(|_| None).collect();
        let mut missing = params.nnodes - 1;
        let mut last_refusal: Option<String> = None;
        while missing > 0 {
            if Instant::now() >= deadline {
                let nodes: Vec<usize> = (1..params.nnodes)
                    .filter(|&r| joined[r].is_none())
                    .collect();
                let mut during = format!(
                    "waiting for node_rank {nodes:?} ({} of {} joined)",
                    params.nnodes - 1 - missing,
                    params.nnodes - 1
                );
                if let Some(refusal) = &last_refusal {
                    during.push_str(&format!("; last connection refused: {refusal}"));
                }
                refuse_all(&mut joined, "rendezvous aborted: node 0 timed out");
                return Err(DistError::Timeout {
                    addr: self.local.to_string(),
                    waited: params.timeout,
                    during,
                });
            }
            let (stream, addr) = match self.listener.accept() {
                Ok(conn) => conn,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(ACCEPT_POLL.min(remaining(deadline)));
                    continue;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue;
                }
                Err(source) => {
                    refuse_all(&mut joined, "rendezvous aborted: node 0 cannot accept");
                    return Err(DistError::Io {
                        what: "accepting on",
                        addr: self.local.to_string(),
                        source,
                    });
                }
            };
            let mut peer = Peer { stream, addr };
            let hello = match peer.read_hello(deadline) {
                Ok(hello) => hello,
                Err(reason) => {
                    tracing::warn!("rendezvous: refused {addr}: {reason}");
                    peer.refuse(&reason);
                    last_refusal = Some(format!("{addr}: {reason}"));
                    continue;
                }
            };
            match params.check_hello(&hello, &joined) {
                Ok(rank) => {
                    tracing::info!("rendezvous: node {rank} joined from {addr}");
                    joined[rank] = Some(peer);
                    missing -= 1;
                }
                Err((field, reason)) => {
                    peer.refuse(&format!("`{field}`: {reason}"));
                    let peer = format!("{addr} (node_rank {})", hello.node_rank);
                    refuse_all(
                        &mut joined,
                        &format!("rendezvous aborted: node 0 refused {peer}: `{field}`: {reason}"),
                    );
                    return Err(DistError::PeerRefused {
                        peer,
                        field,
                        reason,
                    });
                }
            }
        }
        let mut reply = Vec::with_capacity(1 + UNIQUE_ID_LEN);
        reply.push(REPLY_ID);
        reply.extend_from_slice(id.as_bytes());
        let mut streams = Vec::with_capacity(params.nnodes - 1);
        for (rank, peer) in joined.into_iter().enumerate() {
            if let Some(mut peer) = peer {
                let addr = format!("{} (node_rank {rank})", peer.addr);
                peer.stream
                    .set_write_timeout(Some(remaining(deadline).max(HELLO_WAIT)))
                    .and_then(|()| write_frame(&mut peer.stream, &reply))
                    .map_err(|source| DistError::Io {
                        what: "sending the unique id to",
                        addr: addr.clone(),
                        source,
                    })?;
                keep(&peer.stream).map_err(|source| DistError::Io {
                    what: "keeping the connection to",
                    addr,
                    source,
                })?;
                streams.push(peer.stream);
            }
        }
        Ok(streams)
    }
}

impl Rendezvous {
    /// The node rank of a well-formed hello, or the field that does not match and why.
    fn check_hello(
        &self,
        hello: &Hello,
        joined: &[Option<Peer>],
    ) -> Result<usize, (&'static str, String)> {
        if hello.version != PROTOCOL_VERSION {
            return Err((
                "version",
                format!(
                    "node 0 speaks protocol {PROTOCOL_VERSION}, the node {} (a different build?)",
                    hello.version
                ),
            ));
        }
        let mismatch =
            |ours: usize, theirs: u32| format!("node 0 has {ours}, the node says {theirs}");
        if usize::try_from(hello.nnodes) != Ok(self.nnodes) {
            return Err(("nnodes", mismatch(self.nnodes, hello.nnodes)));
        }
        if usize::try_from(hello.tensor_parallel_size) != Ok(self.tensor_parallel_size) {
            return Err((
                "tensor_parallel_size",
                mismatch(self.tensor_parallel_size, hello.tensor_parallel_size),
            ));
        }
        let rank = usize::try_from(hello.node_rank).unwrap_or(usize::MAX);
        if rank == 0 || rank >= self.nnodes {
            return Err((
                "node_rank",
                format!(
                    "{} is not in 1..{} (node 0 is the host)",
                    hello.node_rank, self.nnodes
                ),
            ));
        }
        if joined.get(rank).is_some_and(Option::is_some) {
            return Err(("node_rank", format!("node {rank} joined twice")));
        }
        Ok(rank)
    }
}

/// A node's connection on the host.
struct Peer {
    stream: TcpStream,
    addr: SocketAddr,
}

impl Peer {
    /// Reads and decodes the hello, or says why the connection is not a node.
    fn read_hello(&mut self, deadline: Instant) -> Result<Hello, String> {
        let wait = HELLO_WAIT.min(remaining(deadline));
        self.stream
            .set_nonblocking(false)
            .and_then(|()| self.stream.set_read_timeout(Some(wait)))
            .and_then(|()| self.stream.set_write_timeout(Some(HELLO_WAIT)))
            .map_err(|e| format!("socket set-up: {e}"))?;
        let frame = read_frame(&mut self.stream).map_err(|e| format!("hello: {}", e.reason()))?;
        Hello::decode(&frame)
    }

    /// Tells the node why it is refused (best effort: it may be gone already).
    fn refuse(&mut self, reason: &str) {
        let mut end = reason.len().min(MAX_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut reply = Vec::with_capacity(1 + end);
        reply.push(REPLY_REFUSED);
        reply.extend_from_slice(&reason.as_bytes()[..end]);
        let _ = write_frame(&mut self.stream, &reply);
    }
}

/// Refuses every node that joined already (the rendezvous is failing).
fn refuse_all(joined: &mut [Option<Peer>], reason: &str) {
    for peer in joined.iter_mut().flatten() {
        peer.refuse(reason);
    }
}

/// A node's hello.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hello {
    magic: [u8; 4],
    version: u16,
    node_rank: u32,
    nnodes: u32,
    tensor_parallel_size: u32,
}

impl Hello {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HELLO_LEN);
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.node_rank.to_le_bytes());
        out.extend_from_slice(&self.nnodes.to_le_bytes());
        out.extend_from_slice(&self.tensor_parallel_size.to_le_bytes());
        out
    }

    /// Decodes a hello, or says why the bytes are not one.
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() != HELLO_LEN {
            return Err(format!(
                "hello: {} bytes, expected {HELLO_LEN}",
                bytes.len()
            ));
        }
        let mut rest = bytes;
        let short = || "hello: too short".to_string();
        let magic: [u8; 4] = take(&mut rest).ok_or_else(short)?;
        if magic != MAGIC {
            return Err(format!(
                "magic: expected {:?}, got {:?} (not a kvserve node)",
                String::from_utf8_lossy(&MAGIC),
                String::from_utf8_lossy(&magic)
            ));
        }
        let version = u16::from_le_bytes(take(&mut rest).ok_or_else(short)?);
        let mut field = || take(&mut rest).map(u32::from_le_bytes).ok_or_else(short);
        Ok(Self {
            magic,
            version,
            node_rank: field()?,
            nnodes: field()?,
            tensor_parallel_size: field()?,
        })
    }
}

/// The first `N` bytes of `rest`, which moves past them.
fn take<const N: usize>(rest: &mut &[u8]) -> Option<[u8; N]> {
    let (head, tail) = rest.split_first_chunk::<N>()?;
    *rest = tail;
    Some(*head)
}

/// A setting checked to be at most [`MAX_WORLD_SIZE`], as a wire `u32`.
fn wire_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// Time left until `deadline`, at least a millisecond (a zero socket timeout is an error).
fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

/// Connects to `addr`, retrying until `deadline`; on failure, the last error.
fn connect(addr: &impl ToSocketAddrs, deadline: Instant) -> Result<TcpStream, String> {
    let mut last = String::from("no address resolved");
    loop {
        match addr.to_socket_addrs() {
            Ok(candidates) => {
                for candidate in candidates {
                    let attempt = remaining(deadline).min(Duration::from_secs(1));
                    match TcpStream::connect_timeout(&candidate, attempt) {
                        Ok(stream) => return Ok(stream),
                        Err(e) => last = format!("{candidate}: {e}"),
                    }
                }
            }
            Err(e) => last = format!("resolving: {e}"),
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(CONNECT_RETRY.min(remaining(deadline)));
    }
}

fn write_frame(out: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&len| len as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "frame too long"))?;
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(payload);
    out.write_all(&frame)?;
    out.flush()
}

enum ReadError {
    TimedOut,
    Closed,
    TooLong(u32),
    Io(io::Error),
}

impl ReadError {
    fn reason(&self) -> String {
        match self {
            Self::TimedOut => "nothing arrived in time".into(),
            Self::Closed => "the connection closed mid-message".into(),
            Self::TooLong(len) => {
                format!("a frame of {len} bytes is longer than the {MAX_FRAME}-byte limit")
            }
            Self::Io(e) => e.to_string(),
        }
    }
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::TimedOut,
            io::ErrorKind::UnexpectedEof => Self::Closed,
            _ => Self::Io(e),
        }
    }
}

/// Reads one frame; a length above [`MAX_FRAME`] is refused before anything is allocated.
fn read_frame(input: &mut impl Read) -> Result<Vec<u8>, ReadError> {
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len as usize > MAX_FRAME {
        return Err(ReadError::TooLong(len));
    }
    let mut payload = vec![0u8; len as usize];
    input.read_exact(&mut payload)?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            node_rank: 1,
            nnodes: 2,
            tensor_parallel_size: 4,
        }
    }

    #[test]
    fn hello_round_trips_and_every_short_or_long_input_is_an_error() {
        let bytes = hello().encode();
        assert_eq!(bytes.len(), HELLO_LEN);
        assert_eq!(Hello::decode(&bytes), Ok(hello()));
        for len in 0..bytes.len() {
            assert!(Hello::decode(&bytes[..len]).is_err(), "{len} bytes");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Hello::decode(&long).is_err());
        let mut wrong = bytes;
        wrong[0] = b'X';
        let err = Hello::decode(&wrong).err().unwrap_or_default();
        assert!(err.starts_with("magic"), "{err}");
    }

    #[test]
    fn frames_round_trip_and_oversized_lengths_are_refused_unread() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"abc").unwrap();
        assert_eq!(buf, [3, 0, 0, 0, b'a', b'b', b'c']);
        assert_eq!(read_frame(&mut buf.as_slice()).ok(), Some(b"abc".to_vec()));
        // A huge length with no payload behind it: refused by the cap, not an allocation.
        let huge = u32::MAX.to_le_bytes();
        assert!(matches!(
            read_frame(&mut huge.as_slice()),
            Err(ReadError::TooLong(u32::MAX))
        ));
        let truncated = [5u8, 0, 0, 0, 1, 2];
        assert!(matches!(
            read_frame(&mut truncated.as_slice()),
            Err(ReadError::Closed)
        ));
        assert!(write_frame(&mut Vec::new(), &[0; MAX_FRAME + 1]).is_err());
    }

    #[test]
    fn hello_checks_name_the_field() {
        let params = Rendezvous {
            nnodes: 3,
            tensor_parallel_size: 6,
            timeout: Duration::from_secs(1),
        };
        let ok = Hello {
            nnodes: 3,
            tensor_parallel_size: 6,
            ..hello()
        };
        let none: Vec<Option<Peer>> = (0..3).map(|_| None).collect();
        assert_eq!(params.check_hello(&ok, &none), Ok(1));
        let field = |h: Hello| params.check_hello(&h, &none).err().map(|(f, _)| f);
        assert_eq!(
            field(Hello {
                version: 9,
                ..ok.clone()
            }),
            Some("version")
        );
        assert_eq!(
            field(Hello {
                nnodes: 2,
                ..ok.clone()
            }),
            Some("nnodes")
        );
        assert_eq!(
            field(Hello {
                tensor_parallel_size: 4,
                ..ok.clone()
            }),
            Some("tensor_parallel_size")
        );
        assert_eq!(
            field(Hello {
                node_rank: 0,
                ..ok.clone()
            }),
            Some("node_rank")
        );
        assert_eq!(
            field(Hello {
                node_rank: 3,
                ..ok.clone()
            }),
            Some("node_rank")
        );
        assert_eq!(
            field(Hello {
                node_rank: u32::MAX,
                ..ok
            }),
            Some("node_rank")
        );
    }

    #[test]
    fn unique_id_debug_shows_a_prefix_only() {
        let mut bytes = [0u8; UNIQUE_ID_LEN];
        bytes[0] = 0xab;
        bytes[100] = 0xcd;
        let shown = format!("{:?}", UniqueId(bytes));
        assert_eq!(shown, "UniqueId(ab00000000000000…)");
    }
}
