//! Membership changes on in-process nodes over loopback gRPC, through the admin service: a node
//! that joins after the log it needs was purged catches up by snapshot before its promotion is
//! accepted, then counts in the quorum, and restarts without `join`; concurrent changes are
//! serialized.

use crate::common;

use std::collections::BTreeMap;

use common::raft::{
    client_addr, persist_on_leader, restart_node_with, start_cluster_with, start_node,
    test_timings, wait_for_follower_of, wait_for_leader, wait_until,
};
use tso_core::Epoch;
use tso_proto::tso::admin_v1 as pb;
use tso_proto::tso::admin_v1::admin_client::AdminClient;
use tso_server::backend::Leadership;
use tso_server::backend::raft::{Links, RaftBackend, RaftConfig, SnapshotOptions};

/// Serves `backend`'s admin service on a loopback port; returns a client of it.
async fn admin_client(backend: &RaftBackend) -> AdminClient<tonic::transport::Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder().add_service(backend.admin_service());
    tokio::spawn(
        server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    AdminClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_learner_catches_up_by_snapshot_and_counts_once_promoted() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let snapshot = SnapshotOptions {
        every_entries: 10,
        entries_kept: 0,
    };
    let mut nodes = start_cluster_with(dir.path(), 3, &links, snapshot, test_timings()).await;
    let all = [0, 1, 2];
    let mut last = 0;
    // Past one purge batch (64 entries) beyond the snapshot interval.
    for i in 1..=100u64 {
        last = persist_on_leader(&nodes, &all, i * 10).await;
    }
    let (leader, _) = wait_for_leader(&nodes, &all, Epoch::ZERO).await;
    wait_until("the leader purges its log", || {
        nodes[leader].backend.purged_index().is_some()
    })
    .await;

    // Node 4 joins: no members, waits.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = RaftConfig {
        node_id: 4,
        data_dir: dir.path().join("node-4"),
        initial_members: BTreeMap::new(),
        join: true,
        timings: test_timings(),
        snapshot,
        links: links.clone(),
        peer_tls: None,
    };
    nodes.push(start_node(config, listener).await);
    assert_eq!(nodes[3].leadership(), Leadership::Unknown);
    assert!(nodes[3].backend.members().is_empty());

    let mut admin = admin_client(&nodes[leader].backend).await;
    let added = admin
        .add_learner(pb::AddLearnerRequest {
            node_id: 4,
            client_addr: client_addr(4),
            peer_addr: nodes[3].peer_addr.clone(),
            admin_addr: String::new(),
        })
        .await
        .expect("add learner")
        .into_inner();
    assert!(added.changed);
    let promoted = admin
        .promote(pb::PromoteRequest { node_id: 4 })
        .await
        .expect("promote once caught up")
        .into_inner();
    assert!(promoted.changed);
    assert!(
        nodes[3].backend.snapshot_index().is_some(),
        "the joined node caught up without a snapshot, though the log was purged"
    );
    wait_until("node 4 applies what was granted", || {
        nodes[3].backend.applied_high_water_ms() >= last
    })
    .await;
    let voters: Vec<u64> = promoted
        .members
        .unwrap()
        .members
        .iter()
        .filter(|m| m.role == pb::Role::Voter as i32)
        .map(|m| m.node_id)
        .collect();
    assert_eq!(voters, vec![1, 2, 3, 4]);

    // Two changes at once are serialized by the leader: both succeed (openraft alone refuses
    // a change while another is uncommitted).
    let nowhere = |id: u64| pb::AddLearnerRequest {
        node_id: id,
        client_addr: client_addr(id),
        peer_addr: format!("127.0.0.1:{}", 1 + id),
        admin_addr: String::new(),
    };
    let mut second = admin.clone();
    let (five, six) = tokio::join!(
        admin.add_learner(nowhere(5)),
        second.add_learner(nowhere(6))
    );
    assert!(five.expect("add 5").into_inner().changed);
    assert!(six.expect("add 6").into_inner().changed);
    let (five, six) = tokio::join!(
        admin.remove(pb::RemoveRequest { node_id: 5 }),
        second.remove(pb::RemoveRequest { node_id: 6 })
    );
    assert!(five.expect("remove 5").into_inner().changed);
    assert!(six.expect("remove 6").into_inner().changed);

    // Remove one original follower and stop the other: the leader commits with node 4 alone.
    let followers: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
    admin
        .remove(pb::RemoveRequest {
            node_id: followers[0] as u64 + 1,
        })
        .await
        .expect("remove a follower");
    nodes[followers[0]].stop().await;
    nodes[followers[1]].stop().await;
    let running = [leader, 3];
    last = persist_on_leader(&nodes, &running, last + 10).await;

    // The joined node restarts without `join`, and follows again.
    let peer = nodes[3].peer_addr.clone();
    nodes[3].stop().await;
    nodes[3] = restart_node_with(dir.path(), 4, &peer, &links, snapshot).await;
    wait_for_follower_of(&nodes[3], &client_addr(leader as u64 + 1)).await;
    let after = persist_on_leader(&nodes, &running, last + 10).await;
    assert!(after > last);
}
