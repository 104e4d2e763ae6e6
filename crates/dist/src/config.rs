//! The distributed config: how many GPUs, over how many nodes, which node this is, and where
//! the nodes meet.

use std::net::SocketAddr;
use std::ops::Range;

use crate::DistError;

/// The largest tensor-parallel world accepted (NCCL ranks are C `int`s; this is far above any
/// deployment and keeps every rank product in range).
pub const MAX_WORLD_SIZE: usize = 1 << 16;

/// Tensor parallelism over `tensor_parallel_size` GPUs spread evenly over `nnodes` nodes.
///
/// A plain struct: the server's flags (`--tensor-parallel-size`, `--nnodes`, `--node-rank`,
/// `--dist-init-addr`) map onto it field by field. Call [`validate`](Self::validate) before
/// using it; the other methods assume a valid config.
///
/// Ranks are numbered node by node: GPU `i` of node `n` is world rank
/// `n * gpus_per_node + i`, so node 0 holds ranks `0..gpus_per_node` (and rank 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistConfig {
    /// GPUs in the whole tensor-parallel group (the NCCL world size), at least 1.
    pub tensor_parallel_size: usize,
    /// Nodes (hosts) the group spans, at least 1; must divide `tensor_parallel_size`.
    pub nnodes: usize,
    /// This node's index, below `nnodes`; node 0 hosts the rendezvous.
    pub node_rank: usize,
    /// `host:port` of node 0's rendezvous (`[v6]:port` for IPv6); required when `nnodes > 1`.
    pub dist_init_addr: Option<String>,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self::single_gpu()
    }
}

impl DistConfig {
    /// One GPU, no parallelism.
    pub fn single_gpu() -> Self {
        Self::single_node(1)
    }

    /// `tensor_parallel_size` GPUs of this host.
    pub fn single_node(tensor_parallel_size: usize) -> Self {
        Self {
            tensor_parallel_size,
            nnodes: 1,
            node_rank: 0,
            dist_init_addr: None,
        }
    }

    /// `tensor_parallel_size` GPUs over `nnodes` hosts meeting at `dist_init_addr`; this host
    /// is node `node_rank`.
    pub fn multi_node(
        tensor_parallel_size: usize,
        nnodes: usize,
        node_rank: usize,
        dist_init_addr: impl Into<String>,
    ) -> Self {
        Self {
            tensor_parallel_size,
            nnodes,
            node_rank,
            dist_init_addr: Some(dist_init_addr.into()),
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`DistError::Config`] naming the first bad field: `tensor_parallel_size` (0 or above
    /// [`MAX_WORLD_SIZE`], or not divisible by `nnodes`), `nnodes` (0), `node_rank` (not
    /// below `nnodes`), `dist_init_addr` (missing with several nodes, or not `host:port`).
    pub fn validate(&self) -> Result<(), DistError> {
        let tp = self.tensor_parallel_size;
        if tp == 0 {
            return Err(DistError::config(
                "tensor_parallel_size",
                "must be at least 1",
            ));
        }
        if tp > MAX_WORLD_SIZE {
            return Err(DistError::config(
                "tensor_parallel_size",
                format!("{tp} is above the supported {MAX_WORLD_SIZE}"),
            ));
        }
        if self.nnodes == 0 {
            return Err(DistError::config("nnodes", "must be at least 1"));
        }
        if self.node_rank >= self.nnodes {
            return Err(DistError::config(
                "node_rank",
                format!("{} is not below nnodes = {}", self.node_rank, self.nnodes),
            ));
        }
        if !tp.is_multiple_of(self.nnodes) {
            return Err(DistError::config(
                "tensor_parallel_size",
                format!(
                    "{tp} GPUs cannot be spread evenly over nnodes = {} (each node runs \
                     tensor_parallel_size / nnodes GPUs)",
                    self.nnodes
                ),
            ));
        }
        match &self.dist_init_addr {
            None if self.nnodes > 1 => Err(DistError::config(
                "dist_init_addr",
                format!(
                    "required with nnodes = {}: the host:port of node 0's rendezvous",
                    self.nnodes
                ),
            )),
            None => Ok(()),
            Some(addr) => check_host_port(addr),
        }
    }

    /// GPUs each node runs: `tensor_parallel_size / nnodes`.
    pub fn gpus_per_node(&self) -> usize {
        self.tensor_parallel_size / self.nnodes.max(1)
    }

    /// The world rank of this node's local GPU `local_gpu`.
    ///
    /// # Errors
    /// [`DistError::Config`] (`local_gpu`) when it is not below
    /// [`gpus_per_node`](Self::gpus_per_node).
    pub fn world_rank(&self, local_gpu: usize) -> Result<usize, DistError> {
        let per_node = self.gpus_per_node();
        if local_gpu >= per_node {
            return Err(DistError::config(
                "local_gpu",
                format!("{local_gpu} is not below the {per_node} GPUs per node"),
            ));
        }
        Ok(self.node_rank * per_node + local_gpu)
    }

    /// The world ranks this node runs.
    pub fn local_ranks(&self) -> Range<usize> {
        let per_node = self.gpus_per_node();
        self.node_rank * per_node..(self.node_rank + 1) * per_node
    }

    /// Whether this node hosts the rendezvous (node 0).
    pub fn is_host(&self) -> bool {
        self.node_rank == 0
    }
}

/// Splits `addr` into host and port (no name lookup: that happens at the rendezvous). The
/// host of `[v6]:port` keeps its brackets.
pub(crate) fn split_host_port(addr: &str) -> Result<(&str, u16), DistError> {
    let bad = |reason: String| Err(DistError::config("dist_init_addr", reason));
    let Some((host, port)) = addr.rsplit_once(':') else {
        return bad(format!("`{addr}` has no port: expected host:port"));
    };
    let bracketed = host.len() > 2 && host.starts_with('[') && host.ends_with(']');
    if host.is_empty() {
        return bad(format!("`{addr}` has no host: expected host:port"));
    }
    if bracketed && addr.parse::<SocketAddr>().is_err() {
        return bad(format!(
            "`{addr}`: the bracketed host is not an IPv6 address"
        ));
    }
    if !bracketed && host.contains(':') {
        return bad(format!(
            "`{addr}`: write an IPv6 address in brackets, as [::1]:29500"
        ));
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad(format!(
            "`{addr}`: the host contains spaces or control characters"
        ));
    }
    match port.parse::<u16>() {
        Ok(0) => bad(format!(
            "`{addr}`: port 0 cannot be joined; name a fixed port"
        )),
        Ok(port) => Ok((host, port)),
        Err(_) => bad(format!(
            "`{addr}`: port `{port}` is not a number from 1 to 65535"
        )),
    }
}

fn check_host_port(addr: &str) -> Result<(), DistError> {
    split_host_port(addr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(config: &DistConfig) -> &'static str {
        match config.validate() {
            Err(DistError::Config { field, .. }) => field,
            other => panic!("{config:?}: expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn good_configs_pass_and_number_ranks_node_by_node() {
        for config in [
            DistConfig::single_gpu(),
            DistConfig::single_node(8),
            DistConfig::multi_node(8, 2, 1, "10.0.0.1:29500"),
            DistConfig::multi_node(4, 4, 3, "node0.cluster:29500"),
            DistConfig::multi_node(2, 2, 0, "[::1]:29500"),
            DistConfig::multi_node(2, 1, 0, "localhost:1"),
        ] {
            config
                .validate()
                .unwrap_or_else(|e| panic!("{config:?}: {e}"));
        }
        let config = DistConfig::multi_node(8, 2, 1, "10.0.0.1:29500");
        assert_eq!(config.gpus_per_node(), 4);
        assert_eq!(config.world_rank(0).ok(), Some(4));
        assert_eq!(config.world_rank(3).ok(), Some(7));
        assert_eq!(config.local_ranks(), 4..8);
        assert!(!config.is_host());
        let host = DistConfig::multi_node(8, 2, 0, "10.0.0.1:29500");
        assert_eq!(host.local_ranks(), 0..4);
        assert!(host.is_host());
    }

    #[test]
    fn bad_tensor_parallel_size_is_named() {
        assert_eq!(
            field_of(&DistConfig::single_node(0)),
            "tensor_parallel_size"
        );
        assert_eq!(
            field_of(&DistConfig::single_node(MAX_WORLD_SIZE + 1)),
            "tensor_parallel_size"
        );
        // 6 GPUs over 4 nodes, and fewer GPUs than nodes.
        let uneven = DistConfig::multi_node(6, 4, 0, "h:1");
        assert_eq!(field_of(&uneven), "tensor_parallel_size");
        let message = uneven
            .validate()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("nnodes = 4"), "{message}");
        assert_eq!(
            field_of(&DistConfig::multi_node(2, 4, 0, "h:1")),
            "tensor_parallel_size"
        );
    }

    #[test]
    fn bad_nnodes_and_node_rank_are_named() {
        let mut config = DistConfig::single_node(2);
        config.nnodes = 0;
        assert_eq!(field_of(&config), "nnodes");
        assert_eq!(
            field_of(&DistConfig::multi_node(4, 2, 2, "h:1")),
            "node_rank"
        );
        let mut config = DistConfig::single_node(2);
        config.node_rank = 1;
        assert_eq!(field_of(&config), "node_rank");
    }

    #[test]
    fn several_nodes_need_an_init_addr() {
        let mut config = DistConfig::multi_node(4, 2, 1, "h:1");
        config.dist_init_addr = None;
        assert_eq!(field_of(&config), "dist_init_addr");
    }

    #[test]
    fn bad_init_addrs_are_named() {
        for addr in [
            "",
            "node0",
            ":29500",
            "node0:",
            "node0:http",
            "node0:65536",
            "node0:0",
            "10.0.0.1:0",
            "::1:29500",
            "node 0:29500",
            "[::1]",
            "[nothost]:29500",
        ] {
            let config = DistConfig::multi_node(2, 2, 0, addr);
            assert_eq!(field_of(&config), "dist_init_addr", "{addr:?}");
        }
        // Checked with a single node too: a bad flag is a bad flag.
        let mut config = DistConfig::single_node(2);
        config.dist_init_addr = Some("nowhere".into());
        assert_eq!(field_of(&config), "dist_init_addr");
    }

    #[test]
    fn world_rank_refuses_a_gpu_beyond_the_node() {
        let config = DistConfig::multi_node(4, 2, 1, "h:1");
        assert!(matches!(
            config.world_rank(2),
            Err(DistError::Config {
                field: "local_gpu",
                ..
            })
        ));
    }
}
