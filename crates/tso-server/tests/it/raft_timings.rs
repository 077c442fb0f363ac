//! Raft timings are cluster-wide (SEMANTICS §13): the leader lease assumes every voter waits
//! the same `election_timeout_max`. Timings the lease cannot rely on are refused at start, a
//! data directory keeps the timings of its first start, and a peer with other timings is
//! refused on the wire.

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::raft::{start_cluster, start_node, test_timings, wait_for_leader};
use tso_core::Epoch;
use tso_proto::tso::raft_v1::RaftMessage;
use tso_proto::tso::raft_v1::raft_peer_client::RaftPeerClient;
use tso_server::backend::raft::{
    Links, NodeAddrs, RaftBackend, RaftConfig, RaftOpenError, RaftTimings, SnapshotOptions,
};

fn config(dir: &std::path::Path, timings: RaftTimings) -> RaftConfig {
    let members = BTreeMap::from([(
        1,
        NodeAddrs {
            client_addr: "tso-1.test:7000".into(),
            peer_addr: "127.0.0.1:1".into(),
            ..Default::default()
        },
    )]);
    RaftConfig {
        node_id: 1,
        data_dir: dir.join("node-1"),
        initial_members: members,
        join: false,
        timings,
        snapshot: SnapshotOptions::default(),
        links: Links::default(),
        peer_tls: None,
    }
}

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[tokio::test]
async fn timings_the_lease_cannot_rely_on_are_refused() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let base = RaftTimings::default();
    let cases = [
        (
            RaftTimings {
                election_timeout_max: Duration::from_micros(350_500),
                ..base
            },
            "whole number of milliseconds",
        ),
        (
            RaftTimings {
                heartbeat_interval: ms(120),
                ..base
            },
            "not well inside the leader lease",
        ),
        (
            RaftTimings {
                election_timeout_min: ms(400),
                ..base
            },
            "election timeout min < election timeout max",
        ),
        (
            RaftTimings {
                heartbeat_interval: Duration::ZERO,
                ..base
            },
            "above 0",
        ),
    ];
    for (timings, why) in cases {
        match RaftBackend::open(config(dir.path(), timings)).await {
            Err(e @ RaftOpenError::Config(_)) => {
                assert!(e.to_string().contains(why), "{timings:?}: {e}")
            }
            Err(e) => panic!("{timings:?}: expected a timings error, got {e}"),
            Ok(_) => panic!("{timings:?} must be refused ({why})"),
        }
    }
}

#[tokio::test]
async fn a_restart_with_other_timings_is_refused_and_the_recorded_ones_start() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let first = RaftBackend::open(config(dir.path(), RaftTimings::default()))
        .await
        .expect("first start");
    first.shutdown().await;
    drop(first);

    let other = RaftTimings {
        election_timeout_max: ms(400),
        ..RaftTimings::default()
    };
    let mut restart = config(dir.path(), other);
    restart.initial_members.clear();
    match RaftBackend::open(restart.clone()).await {
        Err(e @ RaftOpenError::TimingsDiffer { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("50/200/350") && text.contains("50/200/400"),
                "names both: {text}"
            );
        }
        Err(e) => panic!("expected TimingsDiffer, got {e}"),
        Ok(_) => panic!("a restart with other timings must be refused"),
    }
    restart.timings = RaftTimings::default();
    let again = RaftBackend::open(restart)
        .await
        .expect("the recorded timings start");
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_other_timings_is_refused_on_the_wire() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut nodes = start_cluster(dir.path(), 3, &links).await;
    let (leader, _) = wait_for_leader(&nodes, &[0, 1, 2], Epoch::ZERO).await;
    let peer = common::raft::peer_addr(&nodes[leader]);
    let mut client = RaftPeerClient::connect(format!("http://{peer}"))
        .await
        .unwrap();

    let own = test_timings().cluster_key();
    for sent in [Some("50/200/350"), None, Some(own.as_str())] {
        let mut request = tonic::Request::new(RaftMessage {
            payload: vec![0xff],
        });
        if let Some(t) = sent {
            request
                .metadata_mut()
                .insert("tso-raft-timings", t.parse().unwrap());
        }
        let status = client.vote(request).await.expect_err("garbage is refused");
        if sent == Some(own.as_str()) {
            // Same timings: the request gets past the check and fails on its payload.
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        } else {
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");
            assert!(status.message().contains("raft timings differ"), "{status}");
        }
    }
    for n in &mut nodes {
        n.stop().await;
    }
}

/// A fresh node started with other timings than the cluster's never joins it: its peers refuse
/// it, so it can neither be elected nor help elect anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_other_timings_cannot_join() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let mut listeners = BTreeMap::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = NodeAddrs {
            client_addr: common::raft::client_addr(id),
            peer_addr: listener.local_addr().unwrap().to_string(),
            ..Default::default()
        };
        members.insert(id, addrs);
        listeners.insert(id, listener);
    }
    let mut nodes = Vec::new();
    for (id, listener) in listeners {
        let mut timings = test_timings();
        if id == 3 {
            timings.election_timeout_max += ms(1);
        }
        let config = RaftConfig {
            node_id: id,
            data_dir: dir.path().join(format!("node-{id}")),
            initial_members: members.clone(),
            join: false,
            timings,
            snapshot: SnapshotOptions::default(),
            links: Links::default(),
            peer_tls: None,
        };
        nodes.push(start_node(config, listener).await);
    }
    let (leader, epoch) = wait_for_leader(&nodes, &[0, 1], Epoch::ZERO).await;
    let durable = common::raft::persist_on_leader(&nodes, &[0, 1], 5_000).await;
    assert_eq!(durable, 5_000);
    // The two nodes with the same timings replicate to each other; the odd one learns nothing
    // (it would have the entry by now: the leader's other follower applied it).
    let other = 1 - leader;
    common::raft::wait_until("the matching follower applies the write", || {
        nodes[other].backend.applied_high_water_ms() == 5_000
    })
    .await;
    assert_eq!(nodes[2].backend.applied_high_water_ms(), 0);
    assert!(
        !matches!(nodes[2].leadership(), tso_server::backend::Leadership::Leader { epoch: e } if e >= epoch),
        "the odd node never leads"
    );
    for n in &mut nodes {
        n.stop().await;
    }
}
