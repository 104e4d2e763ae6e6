//! The unique-id rendezvous on loopback: nodes are threads, misbehaving peers are raw sockets
//! writing the wire format by hand (as the module docs describe it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use dist::{DistConfig, DistError, MAGIC, PROTOCOL_VERSION, Rendezvous, UniqueId};

const SHORT: Duration = Duration::from_millis(1500);

fn params(nnodes: usize, tp: usize, timeout: Duration) -> Rendezvous {
    Rendezvous {
        nnodes,
        tensor_parallel_size: tp,
        timeout,
    }
}

fn id(seed: u8) -> UniqueId {
    let mut bytes = [0u8; 128];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = seed.wrapping_add(i as u8);
    }
    UniqueId(bytes)
}

/// Binds a host on a free loopback port and serves `id` on a thread.
fn spawn_host(
    rendezvous: Rendezvous,
    id: UniqueId,
) -> (SocketAddr, thread::JoinHandle<Result<(), DistError>>) {
    let host = rendezvous.bind("127.0.0.1:0").unwrap();
    let addr = host.local_addr();
    (addr, thread::spawn(move || host.serve(&id)))
}

fn spawn_join(
    rendezvous: Rendezvous,
    addr: SocketAddr,
    node_rank: usize,
) -> thread::JoinHandle<Result<UniqueId, DistError>> {
    thread::spawn(move || rendezvous.join(addr, node_rank))
}

/// A port nothing listens on (bound, then released).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn hello_bytes(magic: [u8; 4], version: u16, node_rank: u32, nnodes: u32, tp: u32) -> Vec<u8> {
    let mut payload = magic.to_vec();
    payload.extend_from_slice(&version.to_le_bytes());
    for v in [node_rank, nnodes, tp] {
        payload.extend_from_slice(&v.to_le_bytes());
    }
    frame(&payload)
}

/// Connects, writes `bytes`, and returns the host's reply frame (tag, rest), if any.
fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Option<(u8, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(SHORT)).unwrap();
    stream.write_all(bytes).ok()?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut payload = vec![0u8; u32::from_le_bytes(len) as usize];
    stream.read_exact(&mut payload).ok()?;
    let (tag, rest) = payload.split_first()?;
    Some((*tag, rest.to_vec()))
}

fn refused_reason(reply: Option<(u8, Vec<u8>)>) -> String {
    match reply {
        Some((1, reason)) => String::from_utf8(reason).unwrap(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn one_host_and_two_nodes_share_the_same_id() {
    let rendezvous = params(3, 6, SHORT);
    let (addr, host) = spawn_host(rendezvous, id(7));
    let nodes = [
        spawn_join(rendezvous, addr, 2),
        spawn_join(rendezvous, addr, 1),
    ];
    for node in nodes {
        assert_eq!(node.join().unwrap().unwrap(), id(7));
    }
    host.join().unwrap().unwrap();
}

#[test]
fn a_node_started_before_the_host_retries_until_it_is_up() {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let rendezvous = params(2, 2, SHORT);
    let node = spawn_join(rendezvous, addr, 1);
    thread::sleep(Duration::from_millis(200));
    let host = rendezvous.bind(addr).unwrap();
    host.serve(&id(1)).unwrap();
    assert_eq!(node.join().unwrap().unwrap(), id(1));
}

#[test]
fn a_node_with_another_nnodes_is_refused_on_both_sides() {
    let (addr, host) = spawn_host(params(2, 2, SHORT), id(0));
    let err = params(3, 2, SHORT).join(addr, 1).unwrap_err();
    match &err {
        DistError::RefusedByHost { reason, .. } => {
            assert!(
                reason.contains("`nnodes`: node 0 has 2, the node says 3"),
                "{err}"
            );
        }
        other => panic!("{other:?}"),
    }
    match host.join().unwrap().unwrap_err() {
        DistError::PeerRefused { field, reason, .. } => {
            assert_eq!(field, "nnodes");
            assert!(reason.contains("node 0 has 2, the node says 3"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_node_with_another_tensor_parallel_size_is_refused_on_both_sides() {
    let (addr, host) = spawn_host(params(2, 4, SHORT), id(0));
    let err = params(2, 2, SHORT).join(addr, 1).unwrap_err();
    assert!(
        matches!(&err, DistError::RefusedByHost { reason, .. } if reason.contains("tensor_parallel_size")),
        "{err}"
    );
    let err = host.join().unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            DistError::PeerRefused {
                field: "tensor_parallel_size",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_duplicate_node_rank_fails_the_rendezvous_and_tells_the_waiting_node() {
    let (addr, host) = spawn_host(params(3, 3, SHORT), id(0));
    // The first node 1 (raw, so it is accepted before the second connects) waits for the id.
    let first =
        thread::spawn(move || raw_exchange(addr, &hello_bytes(MAGIC, PROTOCOL_VERSION, 1, 3, 3)));
    thread::sleep(Duration::from_millis(100));
    let err = params(3, 3, SHORT).join(addr, 1).unwrap_err();
    assert!(
        matches!(&err, DistError::RefusedByHost { reason, .. } if reason.contains("node 1 joined twice")),
        "{err}"
    );
    let told = refused_reason(first.join().unwrap());
    assert!(told.starts_with("rendezvous aborted"), "{told}");
    let err = host.join().unwrap().unwrap_err();
    assert!(
        matches!(&err, DistError::PeerRefused { field: "node_rank", reason, .. } if reason.contains("twice")),
        "{err}"
    );
}

#[test]
fn out_of_range_node_ranks_are_refused() {
    for rank in [0u32, 2, u32::MAX] {
        let (addr, host) = spawn_host(params(2, 2, SHORT), id(0));
        let reason = refused_reason(raw_exchange(
            addr,
            &hello_bytes(MAGIC, PROTOCOL_VERSION, rank, 2, 2),
        ));
        assert!(reason.contains("`node_rank`"), "{rank}: {reason}");
        let err = host.join().unwrap().unwrap_err();
        assert!(
            matches!(
                err,
                DistError::PeerRefused {
                    field: "node_rank",
                    ..
                }
            ),
            "{rank}: {err}"
        );
    }
    // The joining side refuses them before connecting.
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    for rank in [0, 2] {
        let err = params(2, 2, SHORT).join(addr, rank).unwrap_err();
        assert!(
            matches!(
                err,
                DistError::Config {
                    field: "node_rank",
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
fn another_protocol_version_is_refused() {
    let (addr, host) = spawn_host(params(2, 2, SHORT), id(0));
    let reason = refused_reason(raw_exchange(
        addr,
        &hello_bytes(MAGIC, PROTOCOL_VERSION + 1, 1, 2, 2),
    ));
    assert!(reason.contains("`version`"), "{reason}");
    let err = host.join().unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            DistError::PeerRefused {
                field: "version",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn a_wrong_magic_is_refused_and_reported_when_the_host_gives_up() {
    let (addr, host) = spawn_host(params(2, 2, Duration::from_millis(600)), id(0));
    let reason = refused_reason(raw_exchange(
        addr,
        &hello_bytes(*b"HTTP", PROTOCOL_VERSION, 1, 2, 2),
    ));
    assert!(reason.starts_with("magic"), "{reason}");
    match host.join().unwrap().unwrap_err() {
        DistError::Timeout { during, .. } => {
            assert!(during.contains("node_rank [1]"), "{during}");
            assert!(during.contains("magic"), "{during}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn garbage_connections_do_not_stop_the_host() {
    let rendezvous = params(2, 2, SHORT);
    let (addr, host) = spawn_host(rendezvous, id(9));
    let garbage: [&[u8]; 6] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        &u32::MAX.to_le_bytes(),
        &[0xff; 64],
        &[18, 0, 0, 0, b'K', b'V'],
        &[],
        &[3, 0, 0, 0, 1, 2, 3],
    ];
    for bytes in garbage {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(bytes).unwrap();
        // Closing at once: the host sees the end of the stream, not a stall.
    }
    assert_eq!(rendezvous.join(addr, 1).unwrap(), id(9));
    host.join().unwrap().unwrap();
}

#[test]
fn a_join_with_no_host_times_out() {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let err = params(2, 2, Duration::from_millis(300))
        .join(addr, 1)
        .unwrap_err();
    match &err {
        DistError::Timeout { during, .. } => assert!(during.starts_with("connecting"), "{err}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_silent_host_times_the_node_out_and_a_garbage_reply_is_an_error() {
    // Accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let err = params(2, 2, Duration::from_millis(300))
        .join(addr, 1)
        .unwrap_err();
    assert!(
        matches!(&err, DistError::Timeout { during, .. } if during.starts_with("waiting for the unique id")),
        "{err}"
    );
    drop(silent);

    let replies: [Vec<u8>; 4] = [
        u32::MAX.to_le_bytes().to_vec(),
        frame(&[7, 1, 2]),
        frame(&[0; 50]),
        frame(&[]),
    ];
    for reply in replies {
        let fake = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = fake.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = fake.accept().unwrap();
            let mut hello = [0u8; 22];
            stream.read_exact(&mut hello).unwrap();
            stream.write_all(&reply).unwrap();
        });
        let err = params(2, 2, SHORT).join(addr, 1).unwrap_err();
        assert!(matches!(err, DistError::Protocol { .. }), "{err}");
        server.join().unwrap();
    }
}

#[test]
fn bad_rendezvous_settings_are_refused() {
    for (rendezvous, field) in [
        (params(0, 2, SHORT), "nnodes"),
        (params(2, 0, SHORT), "tensor_parallel_size"),
        (params(2, 2, Duration::ZERO), "timeout"),
        (params(2, 2, Duration::MAX), "timeout"),
    ] {
        let err = rendezvous.bind("127.0.0.1:0").unwrap_err();
        assert!(
            matches!(err, DistError::Config { field: f, .. } if f == field),
            "{err}"
        );
    }
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let err = params(2, 2, Duration::MAX).join(addr, 1).unwrap_err();
    assert!(
        matches!(
            err,
            DistError::Config {
                field: "timeout",
                ..
            }
        ),
        "{err}"
    );
    let err = params(2, 2, SHORT).bind("not an address").unwrap_err();
    assert!(
        matches!(
            err,
            DistError::Io {
                what: "binding",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn bootstrap_shares_one_id_across_nodes_and_skips_the_network_alone() {
    let alone = dist::bootstrap_unique_id(&DistConfig::single_node(4), SHORT, || Ok(id(3)));
    assert_eq!(alone.unwrap(), id(3));

    let addr = format!("127.0.0.1:{}", free_port());
    let host_config = DistConfig::multi_node(4, 2, 0, addr.clone());
    let node_config = DistConfig::multi_node(4, 2, 1, addr);
    let host = thread::spawn(move || dist::bootstrap_unique_id(&host_config, SHORT, || Ok(id(5))));
    let node =
        dist::bootstrap_unique_id(&node_config, SHORT, || panic!("only node 0 makes the id"));
    assert_eq!(node.unwrap(), id(5));
    assert_eq!(host.join().unwrap().unwrap(), id(5));

    // A bad config fails before the id is made or the network touched.
    let bad = DistConfig::multi_node(3, 2, 0, "127.0.0.1:1");
    let err = dist::bootstrap_unique_id(&bad, SHORT, || panic!("not called")).unwrap_err();
    assert!(
        matches!(
            err,
            DistError::Config {
                field: "tensor_parallel_size",
                ..
            }
        ),
        "{err}"
    );
}
