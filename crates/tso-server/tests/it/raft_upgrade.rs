//! Data directories written by an earlier version (the raft log, snapshot and identity of a
//! three-node cluster made by commit 86af38c, in `tests/fixtures/raft-86af38c`: forty window
//! extensions, two sequence counters, a stamping-lease record, snapshots and purged log) open,
//! elect a leader that loads everything they held, and get the cluster identity and each
//! member's incarnation on their first start.

use crate::common;

use common::HighWaterCalls;
use std::collections::BTreeMap;
use std::path::Path;

use common::raft::{TestNode, start_node, test_timings, wait_for_leader, wait_until};
use tso_core::Epoch;
use tso_server::backend::Backend;
use tso_server::backend::raft::{Links, RaftBackend, RaftConfig, SnapshotOptions};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/raft-86af38c");

fn config(dir: &Path, id: u64) -> RaftConfig {
    RaftConfig {
        node_id: id,
        data_dir: dir.join(format!("node-{id}")),
        initial_members: BTreeMap::new(),
        join: false,
        timings: test_timings(),
        snapshot: SnapshotOptions::default(),
        links: Links::default(),
        peer_tls: None,
    }
}

fn copy_fixture(to: &Path) {
    for id in 1..=3 {
        let node = to.join(format!("node-{id}"));
        std::fs::create_dir_all(&node).unwrap();
        for entry in std::fs::read_dir(Path::new(FIXTURE).join(format!("node-{id}"))).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), node.join(entry.file_name())).unwrap();
        }
    }
}

/// Starts the three nodes on their recorded peer addresses (the members in their log).
async fn start_all(dir: &Path) -> Vec<TestNode> {
    let probe = RaftBackend::open(config(dir, 1))
        .await
        .expect("an old directory opens");
    wait_until("the log is loaded", || probe.members().len() == 3).await;
    let members = probe.members();
    probe.shutdown().await;
    let mut nodes = Vec::new();
    for (id, addrs) in members {
        let listener = tokio::net::TcpListener::bind(&addrs.peer_addr)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "binding node {id}'s recorded address {}: {e}",
                    addrs.peer_addr
                )
            });
        nodes.push(start_node(config(dir, id), listener).await);
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_written_by_an_earlier_version_opens_and_serves() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    copy_fixture(dir.path());
    let mut nodes = start_all(dir.path()).await;
    let all = [0, 1, 2];
    let (leader, epoch) = wait_for_leader(&nodes, &all, Epoch::ZERO).await;
    let backend = &nodes[leader].backend;
    let state = backend.load().await.unwrap();
    assert!(state.high_water_ms >= 2_000_000);
    assert_eq!(state.sequences.get("orders"), Some(&42));
    assert_eq!(state.sequences.get("rows"), Some(&7));
    assert_eq!(state.leases, b"lease-record-from-main");
    backend.raise_high_water(3_000_000, epoch).await.unwrap();
    wait_until(
        "the cluster records its identity and every incarnation",
        || {
            nodes.iter().all(|n| {
                n.backend.cluster_id().is_some()
                    && nodes.iter().all(|m| {
                        n.backend.recorded_incarnation(m.id) == Some(m.backend.incarnation())
                    })
            })
        },
    )
    .await;
    let incarnations: Vec<u64> = nodes.iter().map(|n| n.backend.incarnation()).collect();
    for node in &mut nodes {
        node.stop().await;
    }

    // Restarted, the directories keep their incarnations and still serve.
    let mut nodes = start_all(dir.path()).await;
    let again: Vec<u64> = nodes.iter().map(|n| n.backend.incarnation()).collect();
    assert_eq!(again, incarnations);
    let (leader, epoch) = wait_for_leader(&nodes, &all, Epoch::ZERO).await;
    let loaded = nodes[leader].backend.high_water_ms().await.unwrap();
    assert!(loaded >= 3_000_000, "{loaded}");
    nodes[leader]
        .backend
        .raise_high_water(loaded + 1, epoch)
        .await
        .unwrap();
    for node in &mut nodes {
        node.stop().await;
    }
}
