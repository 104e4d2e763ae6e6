//! Ranks on another node, on loopback: two "nodes" are threads of this process that meet at
//! the rendezvous and keep its connection; node 0 runs `TensorParallelBackend::spawn_multi_node`,
//! node 1 `serve_remote_ranks`. The ranks are sharded CPU backends of a tiny dummy Llama
//! whose collective is one in-process `ThreadGroup` (across hosts it would be NCCL). Raw
//! sockets stand in for a node or for node 0 that breaks the protocol.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use dist::{
    DistConfig, DistError, GroupAbort, MAX_STEP_FRAME, Rendezvous, TensorParallelBackend,
    ThreadGroup, UniqueId, serve_remote_ranks,
};
use kv_block_manager::{BlockId, CopyOp};
use model::{Backend, CpuBackend, ModelError, RowSampling, Shard};

use common::{Fault, VOCAB, argmax, cache, faulty, full_weights, max_diff, prompt, weights};

const TIMEOUT: Duration = Duration::from_secs(30);

/// Node 0's and node 1's configs of `world` ranks over 2 nodes.
fn configs(world: usize) -> (DistConfig, DistConfig) {
    (
        DistConfig::multi_node(world, 2, 0, "127.0.0.1:29500"),
        DistConfig::multi_node(world, 2, 1, "127.0.0.1:29500"),
    )
}

/// Node 0's end and node 1's end of a kept rendezvous connection.
fn connect_nodes(world: usize) -> (TcpStream, TcpStream) {
    let rendezvous = Rendezvous {
        nnodes: 2,
        tensor_parallel_size: world,
        timeout: TIMEOUT,
    };
    let host = rendezvous.bind("127.0.0.1:0").unwrap();
    let addr = host.local_addr();
    let node = thread::spawn(move || rendezvous.join_keep(addr, 1));
    let mut streams = host.serve_keep(&UniqueId([7; 128])).unwrap();
    let (id, stream) = node.join().unwrap().unwrap();
    assert_eq!(id, UniqueId([7; 128]));
    assert_eq!(streams.len(), 1);
    (streams.remove(0), stream)
}

/// Two nodes of `faults.len()` ranks in all (world rank `r` gets `faults[r]`, and fails to
/// build when it is `broken`): node 0's backend, and node 1's thread.
fn cluster(
    faults: &[Fault],
    broken: Option<usize>,
) -> (
    Result<TensorParallelBackend, DistError>,
    JoinHandle<Result<(), DistError>>,
) {
    let world = faults.len();
    let members = ThreadGroup::new(world).unwrap();
    let (config0, config1) = configs(world);
    let (to_node1, to_node0) = connect_nodes(world);
    let build = {
        let faults = faults.to_vec();
        let members = members.clone();
        move |rank: usize| {
            if broken == Some(rank) {
                return Err(ModelError::Unsupported(format!(
                    "no weights for rank {rank}"
                )));
            }
            faulty(&members[rank], faults[rank])
        }
    };
    let node1 = {
        let (build, group) = (build.clone(), Arc::new(members[world / 2].clone()));
        thread::spawn(move || serve_remote_ranks(to_node0, &config1, group, build))
    };
    let group: Arc<dyn GroupAbort> = Arc::new(members[0].clone());
    let tp = TensorParallelBackend::spawn_multi_node(&config0, vec![to_node1], group, build);
    (tp, node1)
}

fn single_rank_logits(world: usize, prompt: &common::Prompt) -> Vec<f32> {
    let mut one = CpuBackend::new(full_weights(world), cache()).unwrap();
    let mut want = Vec::new();
    one.forward(&prompt.batch(), &mut want).unwrap();
    want
}

fn op(src: u32, dst: u32) -> CopyOp {
    CopyOp {
        src: BlockId(src),
        dst: BlockId(dst),
    }
}

/// Logits equal one rank's; sampled forwards and block copies reach every rank alike; node 1
/// returns Ok once the backend is dropped.
fn assert_serves(world: usize) {
    let (tp, node1) = cluster(&vec![Fault::None; world], None);
    let mut tp = tp.unwrap();
    assert_eq!(tp.world_size(), world);
    assert_eq!(tp.kv_cache_config(), cache());
    assert!(tp.samples_on_device());
    let want = single_rank_logits(world, &prompt());
    let mut got = Vec::new();
    for _ in 0..2 {
        tp.forward(&prompt().batch(), &mut got).unwrap();
        assert!(max_diff(&want, &got) < 1e-3, "{world} ranks");
    }
    let history = [5u32, 17, 42];
    let row = RowSampling {
        temperature: 0.7,
        top_k: 40,
        top_p: 0.9,
        min_p: 0.05,
        repetition_penalty: 1.1,
        history: &history,
        uniform: 0.25,
    };
    let mut tokens = Vec::new();
    for sample_vocab in [VOCAB, 100] {
        tp.forward_sampled(&prompt().batch(), &[row], sample_vocab, &mut tokens)
            .unwrap();
        assert_eq!(tokens, [argmax(&want[..sample_vocab])]);
    }
    tp.copy_blocks(&[op(0, 1), op(2, 3)]).unwrap();
    tp.swap_out(&[op(0, 1)]).unwrap();
    tp.swap_in(&[op(1, 2)]).unwrap();
    assert!(tp.dead_reason().is_none());
    drop(tp);
    node1.join().unwrap().unwrap();
}

#[test]
fn one_rank_per_node_gives_the_logits_of_one() {
    assert_serves(2);
}

#[test]
fn two_ranks_per_node_give_the_logits_of_one() {
    assert_serves(4);
}

#[test]
fn a_bad_batch_fails_alike_on_both_nodes_and_the_group_goes_on() {
    let (tp, node1) = cluster(&[Fault::None; 4], None);
    let mut tp = tp.unwrap();
    let mut bad = prompt();
    bad.tokens[0] = VOCAB as u32;
    let mut logits = Vec::new();
    let err = tp.forward(&bad.batch(), &mut logits).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::InvalidBatch {
                field: "token_ids",
                ..
            }
        ),
        "{err}"
    );
    assert!(tp.dead_reason().is_none());
    tp.forward(&prompt().batch(), &mut logits).unwrap();
    assert!(max_diff(&single_rank_logits(4, &prompt()), &logits) < 1e-3);
    drop(tp);
    node1.join().unwrap().unwrap();
}

/// One good step, then one that kills the backend with an error containing every word;
/// later calls fail at once; dropping the backend returns.
fn assert_dies_with(tp: &mut TensorParallelBackend, words: &[&str]) -> String {
    let mut logits = Vec::new();
    tp.forward(&prompt().batch(), &mut logits).unwrap();
    let err = tp.forward(&prompt().batch(), &mut logits).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, ModelError::Unrecoverable(_)), "{message}");
    for word in words {
        assert!(message.contains(word), "no {word:?} in {message}");
    }
    let again = tp.copy_blocks(&[op(0, 1)]).unwrap_err();
    assert_eq!(again.to_string(), message);
    message
}

#[test]
fn a_remote_rank_that_fails_a_step_kills_the_backend_naming_it() {
    for (faults, words) in [
        (
            vec![Fault::None, Fault::Fail(2)],
            ["rank 1 failed", "injected failure"],
        ),
        (
            vec![Fault::None, Fault::Panic(2)],
            ["rank 1 panicked", "injected panic"],
        ),
        (
            vec![Fault::None, Fault::None, Fault::None, Fault::Fail(2)],
            ["rank 3 failed", "injected failure"],
        ),
    ] {
        let (tp, node1) = cluster(&faults, None);
        let mut tp = tp.unwrap();
        let message = assert_dies_with(&mut tp, &words);
        // Every rank answered: none was left waiting in a collective.
        assert!(!message.contains("did not answer"), "{message}");
        drop(tp);
        // Node 1 is told to shut down and does, however its ranks ended.
        node1.join().unwrap().unwrap();
    }
}

#[test]
fn remote_ranks_that_hang_kill_the_backend_at_the_step_timeout() {
    let (tp, _node1) = cluster(&[Fault::Block(2); 2], None);
    let mut tp = tp.unwrap();
    tp.set_step_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert_dies_with(
        &mut tp,
        &["ranks 0, 1 did not answer within the step timeout of 200ms"],
    );
    // Returns: the proxy's connection is shut down (node 1 stays blocked with its rank).
    drop(tp);
}

#[test]
fn a_remote_rank_that_cannot_build_fails_the_start() {
    for (world, broken) in [(2, 1), (4, 3), (4, 0)] {
        let (tp, node1) = cluster(&vec![Fault::None; world], Some(broken));
        match tp {
            Err(DistError::Rank { rank, message }) => {
                assert_eq!(rank, broken);
                assert!(
                    message.contains(&format!("no weights for rank {broken}")),
                    "{message}"
                );
            }
            other => panic!("expected rank {broken}'s error, got {other:?}"),
        }
        let node = node1.join().unwrap();
        if broken >= world / 2 {
            assert!(
                matches!(node, Err(DistError::Rank { rank, .. }) if rank == broken),
                "{node:?}"
            );
        } else {
            assert!(node.is_err(), "node 1 started without node 0's ranks");
        }
    }
}

/// A frame as the wire has it: the length, then the payload.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// A connected pair of loopback sockets.
fn socket_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (b, _) = listener.accept().unwrap();
    (a, b)
}

fn read_frame(stream: &mut TcpStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).unwrap();
    let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
    stream.read_exact(&mut payload).unwrap();
    payload
}

/// Node 0 with rank 0 a whole (unsharded) model, so it needs no peer, and node 1 a raw
/// socket that answers ready and then `script` (its answers to the steps, by hand).
fn node0_with_a_raw_node(script: impl FnOnce(TcpStream) + Send + 'static) -> TensorParallelBackend {
    let (node0_end, mut raw) = socket_pair();
    let fake = thread::spawn(move || {
        raw.write_all(&frame(&[0])).unwrap(); // ready
        script(raw);
    });
    let (config0, _) = configs(2);
    let members = ThreadGroup::new(2).unwrap();
    let group: Arc<dyn GroupAbort> = Arc::new(members[0].clone());
    let tp = TensorParallelBackend::spawn_multi_node(&config0, vec![node0_end], group, |_| {
        CpuBackend::new(weights(Shard::FULL), cache())
    })
    .unwrap();
    fake.join().unwrap();
    tp
}

#[test]
fn a_node_whose_connection_drops_mid_run_kills_the_backend() {
    let mut tp = node0_with_a_raw_node(|mut raw| {
        thread::spawn(move || {
            // One step answered "done", then the node goes away while the second is sent.
            let step = read_frame(&mut raw);
            assert_eq!(step[0], 0, "a forward");
            raw.write_all(&frame(&[1])).unwrap();
            let _ = read_frame(&mut raw);
        });
    });
    let message = assert_dies_with(&mut tp, &["rank 1 is lost", "node 1 (127.0.0.1:"]);
    assert!(message.contains("connection"), "{message}");
}

#[test]
fn a_node_that_answers_nonsense_is_lost() {
    for (answer, words) in [
        (vec![9u8], "`answer tag`: unknown tag 9"),
        // Names rank 0, which node 1 does not hold.
        (
            vec![2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            "`failures.rank` 0 is not a rank of the node",
        ),
        (vec![0], "answered `ready` to a step"),
    ] {
        let mut tp = node0_with_a_raw_node(move |mut raw| {
            thread::spawn(move || {
                let _ = read_frame(&mut raw);
                raw.write_all(&frame(&[1])).unwrap();
                let _ = read_frame(&mut raw);
                raw.write_all(&frame(&answer)).unwrap();
                let _ = raw.read(&mut [0u8; 64]); // until node 0 hangs up
            });
        });
        assert_dies_with(&mut tp, &["rank 1 is lost", words]);
    }
}

/// Node 1 serving one whole-model rank to a raw node 0 that sends `bytes` after the ready
/// answer (then closes its end); what `serve_remote_ranks` returned.
fn serve_to_raw_node0(bytes: Vec<u8>) -> Result<(), DistError> {
    let (node1_end, mut raw) = socket_pair();
    let (_, config1) = configs(2);
    let members = ThreadGroup::new(2).unwrap();
    let node1 = thread::spawn(move || {
        serve_remote_ranks(node1_end, &config1, Arc::new(members[1].clone()), |_| {
            CpuBackend::new(weights(Shard::FULL), cache())
        })
    });
    assert_eq!(read_frame(&mut raw), [0], "ready");
    raw.write_all(&bytes).unwrap();
    drop(raw);
    node1.join().unwrap()
}

#[test]
fn node_side_refuses_bad_frames_and_ends_on_shutdown_or_close() {
    assert!(serve_to_raw_node0(frame(&[3])).is_ok(), "shutdown");
    assert!(
        serve_to_raw_node0(Vec::new()).is_ok(),
        "closed between steps"
    );
    let too_long = u32::try_from(MAX_STEP_FRAME + 1).unwrap().to_le_bytes();
    for (bytes, words) in [
        (frame(&[9]), "`command tag`: unknown tag 9"),
        (too_long.to_vec(), "longer than the"),
        (vec![10, 0, 0, 0, 0, 1], "closed mid-frame"),
        (frame(&[0, 5, 0, 0, 0, 1]), "`token_ids`"),
        (frame(&[2, 7, 0, 0, 0, 0]), "`copy kind`"),
    ] {
        match serve_to_raw_node0(bytes) {
            Err(e @ DistError::Protocol { .. }) => {
                let message = e.to_string();
                assert!(message.contains(words), "no {words:?} in {message}");
            }
            other => panic!("expected a protocol error with {words:?}, got {other:?}"),
        }
    }
}

#[test]
fn entry_points_refuse_the_wrong_node_and_connection_count() {
    let (config0, config1) = configs(2);
    let members = ThreadGroup::new(2).unwrap();
    let group: Arc<dyn GroupAbort> = Arc::new(members[0].clone());
    let build = |_| CpuBackend::new(weights(Shard::FULL), cache());
    let field = |r: Result<(), DistError>| match r {
        Err(DistError::Config { field, .. }) => field,
        other => panic!("expected a config error, got {other:?}"),
    };
    let on_node1 =
        TensorParallelBackend::spawn_multi_node(&config1, Vec::new(), Arc::clone(&group), build);
    assert_eq!(field(on_node1.map(drop)), "node_rank");
    let no_remote =
        TensorParallelBackend::spawn_multi_node(&config0, Vec::new(), Arc::clone(&group), build);
    assert_eq!(field(no_remote.map(drop)), "nnodes");
    let mut bad = config0.clone();
    bad.tensor_parallel_size = 3;
    let uneven = TensorParallelBackend::spawn_multi_node(&bad, Vec::new(), group, build);
    assert_eq!(field(uneven.map(drop)), "tensor_parallel_size");
    let (a, _b) = socket_pair();
    let served = serve_remote_ranks(a, &config0, Arc::new(members[1].clone()), build);
    assert_eq!(field(served), "node_rank");
}

#[test]
fn kept_rendezvous_connections_come_in_node_order() {
    let rendezvous = Rendezvous {
        nnodes: 4,
        tensor_parallel_size: 4,
        timeout: TIMEOUT,
    };
    let host = rendezvous.bind("127.0.0.1:0").unwrap();
    let addr = host.local_addr();
    // Nodes join in reverse order; each says its rank on the kept connection.
    let nodes: Vec<_> = (1..4)
        .rev()
        .map(|rank| {
            thread::sleep(Duration::from_millis(20));
            thread::spawn(move || {
                let (_, mut stream) = rendezvous.join_keep(addr, rank).unwrap();
                stream.write_all(&[rank as u8]).unwrap();
            })
        })
        .collect();
    let streams = host.serve_keep(&UniqueId([1; 128])).unwrap();
    let said: Vec<u8> = streams
        .into_iter()
        .map(|mut s| {
            let mut b = [0u8];
            s.read_exact(&mut b).unwrap();
            b[0]
        })
        .collect();
    assert_eq!(said, [1, 2, 3]);
    for node in nodes {
        node.join().unwrap();
    }
}
