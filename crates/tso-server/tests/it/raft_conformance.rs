//! The backend-seam conformance suite against a one-node raft cluster on disk.

use std::collections::BTreeMap;

use tso_server::backend::conformance;
use tso_server::backend::raft::{
    Links, NodeAddrs, RaftBackend, RaftConfig, RaftOpenError, RaftTimings, SnapshotOptions,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_raft_cluster_keeps_the_backend_contract() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let members = BTreeMap::from([(
        1,
        NodeAddrs {
            client_addr: "127.0.0.1:7000".to_owned(),
            peer_addr: "127.0.0.1:7001".to_owned(),
            ..Default::default()
        },
    )]);
    let config = RaftConfig {
        node_id: 1,
        data_dir: dir.path().to_owned(),
        initial_members: members,
        join: false,
        timings: RaftTimings::default(),
        snapshot: SnapshotOptions::default(),
        links: Links::default(),
        peer_tls: None,
    };
    conformance::run_all(|| {
        let config = config.clone();
        async move { RaftBackend::open(config).await.expect("open one-node raft") }
    })
    .await;
}

fn one_member(id: u64) -> BTreeMap<u64, NodeAddrs> {
    BTreeMap::from([(
        id,
        NodeAddrs {
            client_addr: "127.0.0.1:7000".to_owned(),
            peer_addr: "127.0.0.1:7001".to_owned(),
            ..Default::default()
        },
    )])
}

fn config(dir: &std::path::Path, node_id: u64, members: BTreeMap<u64, NodeAddrs>) -> RaftConfig {
    RaftConfig {
        node_id,
        data_dir: dir.to_owned(),
        initial_members: members,
        join: false,
        timings: RaftTimings::default(),
        snapshot: SnapshotOptions::default(),
        links: Links::default(),
        peer_tls: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_refuses_a_foreign_directory_or_a_missing_member() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    match RaftBackend::open(config(dir.path(), 1, BTreeMap::new())).await {
        Err(RaftOpenError::NoMembers(_)) => {}
        other => panic!(
            "a fresh directory without members must be refused, got {:?}",
            other.err()
        ),
    }
    match RaftBackend::open(config(dir.path(), 2, one_member(1))).await {
        Err(RaftOpenError::NotAMember { node_id: 2, .. }) => {}
        other => panic!(
            "a node missing from the members must be refused, got {:?}",
            other.err()
        ),
    }
    let backend = RaftBackend::open(config(dir.path(), 1, one_member(1)))
        .await
        .unwrap();
    backend.shutdown().await;
    drop(backend);
    match RaftBackend::open(config(dir.path(), 3, BTreeMap::new())).await {
        Err(RaftOpenError::WrongNode {
            stored: 1,
            node_id: 3,
            ..
        }) => {}
        other => panic!(
            "another node's directory must be refused, got {:?}",
            other.err()
        ),
    }
    match RaftBackend::open(config(
        dir.path(),
        1,
        one_member(7).into_iter().chain(one_member(1)).collect(),
    ))
    .await
    {
        Err(RaftOpenError::OtherCluster { .. }) => {}
        other => panic!(
            "another cluster's directory must be refused, got {:?}",
            other.err()
        ),
    }
    let restarted = RaftBackend::open(config(dir.path(), 1, BTreeMap::new()))
        .await
        .expect("a restart without members reads them from the log");
    let known = async {
        while !restarted.members().contains_key(&1) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), known)
        .await
        .expect("the restarted node knows its members from the log");
    conformance::wait_for_leader(&restarted).await;
    restarted.shutdown().await;
}
