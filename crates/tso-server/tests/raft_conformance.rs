//! The consensus-seam conformance suite against a one-node raft cluster on disk.

use std::collections::BTreeMap;

use tso_server::backend::raft::{Links, NodeAddrs, RaftBackend, RaftConfig, RaftTimings};
use tso_server::consensus::conformance;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_raft_cluster_keeps_the_consensus_contract() {
    let dir = tempfile::tempdir().unwrap();
    let members = BTreeMap::from([(
        1,
        NodeAddrs {
            client_addr: "127.0.0.1:7000".to_owned(),
            peer_addr: "127.0.0.1:7001".to_owned(),
        },
    )]);
    let config = RaftConfig {
        node_id: 1,
        data_dir: dir.path().to_owned(),
        initial_members: members,
        timings: RaftTimings::default(),
        links: Links::default(),
    };
    conformance::run_all(|| {
        let config = config.clone();
        async move { RaftBackend::open(config).await.expect("open one-node raft") }
    })
    .await;
}
