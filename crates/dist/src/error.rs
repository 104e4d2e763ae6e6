//! The crate's one error type.

use std::time::Duration;

/// Everything that can go wrong in `dist`: a bad config, the rendezvous, the libraries, the
/// collectives. Each message names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A [`DistConfig`](crate::DistConfig) field (or a rendezvous parameter) is out of range.
    #[error("invalid distributed setting `{field}`: {reason}")]
    Config {
        /// The field, as the config (and the CLI flag to come) names it.
        field: &'static str,
        /// What is wrong with its value.
        reason: String,
    },

    /// A socket operation of the rendezvous failed.
    #[error("rendezvous: {what} {addr}: {source}")]
    Io {
        /// What was being done ("binding", "accepting on", "sending the unique id to", ...).
        what: &'static str,
        /// The address or peer concerned.
        addr: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The rendezvous did not complete in time.
    #[error("rendezvous at {addr}: timed out after {waited:?} {during}")]
    Timeout {
        /// The rendezvous address.
        addr: String,
        /// The timeout that ran out.
        waited: Duration,
        /// What was still missing (which nodes, or the unique id), and the last refusal.
        during: String,
    },

    /// The host refused a node whose hello does not match its own settings (reported by the
    /// host; the node gets [`DistError::RefusedByHost`] with the same reason).
    #[error("rendezvous: refused node {peer}: `{field}`: {reason}")]
    PeerRefused {
        /// The peer's address and, when it said so, its node rank.
        peer: String,
        /// The hello field that did not match.
        field: &'static str,
        /// Expected and received values.
        reason: String,
    },

    /// The rendezvous host refused this node (reported by the joining node).
    #[error("rendezvous: the host at {addr} refused this node: {reason}")]
    RefusedByHost {
        /// The host's address.
        addr: String,
        /// The host's reason, as it sent it.
        reason: String,
    },

    /// A peer sent bytes that are not a message of the rendezvous protocol.
    #[error("rendezvous: bad message from {peer}: {reason}")]
    Protocol {
        /// The peer's address.
        peer: String,
        /// What was wrong with the bytes.
        reason: String,
    },

    /// The NCCL library cannot be loaded.
    #[error("NCCL is not available: {0}")]
    NcclUnavailable(String),

    /// No CUDA driver, or not the devices asked for.
    #[error("no CUDA device: {0}")]
    NoDevice(String),

    /// `NCCL_NVLS_ENABLE` is not `0` in the environment: NVLink multicast must stay off.
    #[error(
        "NCCL_NVLS_ENABLE must be 0 before NCCL starts (NVLink multicast stays off on these \
         machines); it is {found}: run with NCCL_NVLS_ENABLE=0 in the environment"
    )]
    NvlsNotDisabled {
        /// The variable's value, or "unset".
        found: String,
    },

    /// A buffer passed to a collective has the wrong length (checked before NCCL is called).
    #[error("{op}: `{buffer}` has {got} elements, expected {expected}")]
    LengthMismatch {
        /// The collective.
        op: &'static str,
        /// The argument.
        buffer: &'static str,
        /// The length it must have.
        expected: usize,
        /// The length it has.
        got: usize,
    },

    /// A rank argument is not below the world size.
    #[error("{op}: `{what}` is {rank}, but the world has {world_size} ranks")]
    RankOutOfRange {
        /// The operation.
        op: &'static str,
        /// The argument (`root`, `rank`).
        what: &'static str,
        /// Its value.
        rank: usize,
        /// The number of ranks.
        world_size: usize,
    },

    /// An NCCL call returned an error.
    #[error("NCCL {op} failed: {code}")]
    Nccl {
        /// The call.
        op: &'static str,
        /// NCCL's result code.
        code: String,
    },

    /// A CUDA driver call of a collective or of the set-up failed.
    #[error("CUDA {what} failed: {message}")]
    Cuda {
        /// What was being done.
        what: &'static str,
        /// The driver's error.
        message: String,
    },

    /// A rank of [`NcclCommunicator::run_on_local_gpus`](crate::NcclCommunicator::run_on_local_gpus)
    /// failed to start or panicked.
    #[error("rank {rank}: {message}")]
    Rank {
        /// The rank.
        rank: usize,
        /// What happened to it.
        message: String,
    },
}

impl DistError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Config {
            field,
            reason: reason.into(),
        }
    }
}
