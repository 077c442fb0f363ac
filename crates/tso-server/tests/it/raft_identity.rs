//! Lost data directories (SEMANTICS §12, G1/G3): a voter restarted under its old id with its
//! log and vote gone must not take part, or it could vote twice in one term and elect a lagging
//! candidate that fences below timestamps already issued. A directory that lost only part of
//! itself is refused at start; one lost entirely runs, but its peers keep it out.

use crate::common;

use common::HighWaterCalls;
use std::collections::BTreeMap;
use std::time::Duration;

use common::raft::{
    client_addr, persist_on_leader, start_cluster, start_node, test_timings, wait_for_lease_holder,
    wait_until,
};
use tso_server::backend::Leadership;
use tso_server::backend::raft::{
    Links, NodeAddrs, RaftBackend, RaftConfig, RaftOpenError, SnapshotOptions,
};

/// Waits until every node of `nodes` has applied the incarnations of all of them.
async fn wait_identities_recorded(nodes: &[common::raft::TestNode]) {
    wait_until("every member's incarnation is recorded everywhere", || {
        nodes.iter().all(|n| {
            nodes
                .iter()
                .all(|m| n.backend.recorded_incarnation(m.id) == Some(m.backend.incarnation()))
                && n.backend.cluster_id().is_some()
        })
    })
    .await;
}

fn config(
    dir: &std::path::Path,
    id: u64,
    members: &BTreeMap<u64, NodeAddrs>,
    links: &Links,
) -> RaftConfig {
    RaftConfig {
        node_id: id,
        data_dir: dir.join(format!("node-{id}")),
        initial_members: members.clone(),
        join: false,
        timings: test_timings(),
        snapshot: SnapshotOptions::default(),
        links: links.clone(),
        peer_tls: None,
    }
}

/// Node 3 is cut off; the leader commits a high-water with node 2 alone; the leader stops, and
/// node 2 comes back under its old id on an empty directory, with the same flags. Node 3 lacks
/// the last write: no leader may ever serve from its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_voter_never_lets_a_lagging_node_lead() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut nodes = start_cluster(dir.path(), 3, &links).await;
    wait_identities_recorded(&nodes).await;
    let (leader, _) = wait_for_lease_holder(&nodes).await;
    let lagging = (leader + 1) % 3;
    let wiped = (leader + 2) % 3;
    let ids: Vec<u64> = nodes.iter().map(|n| n.id).collect();
    links.isolate(
        ids[lagging],
        ids.iter().copied().filter(|&i| i != ids[lagging]),
    );
    let last = persist_on_leader(&nodes, &[leader, wiped], 1_000_000).await;
    assert!(nodes[lagging].backend.applied_high_water_ms() < last);

    let members: BTreeMap<u64, NodeAddrs> = nodes
        .iter()
        .map(|n| {
            let addrs = NodeAddrs {
                client_addr: client_addr(n.id),
                peer_addr: n.peer_addr.clone(),
                ..Default::default()
            };
            (n.id, addrs)
        })
        .collect();
    nodes[leader].stop().await;
    nodes[wiped].stop().await;
    std::fs::remove_dir_all(dir.path().join(format!("node-{}", ids[wiped]))).unwrap();
    let listener = tokio::net::TcpListener::bind(&nodes[wiped].peer_addr)
        .await
        .unwrap();
    nodes[wiped] = start_node(config(dir.path(), ids[wiped], &members, &links), listener).await;
    links.heal_all();
    links.isolate(
        ids[leader],
        ids.iter().copied().filter(|&i| i != ids[leader]),
    );

    // Long enough for several elections with the test timings (1.4 s max timeout).
    let watch_until = tokio::time::Instant::now() + Duration::from_secs(8);
    while tokio::time::Instant::now() < watch_until {
        for i in [lagging, wiped] {
            if let Leadership::Leader { epoch } = nodes[i].leadership() {
                let loaded = nodes[i].backend.high_water_ms().await;
                if let Ok(loaded) = loaded {
                    assert!(
                        loaded >= last,
                        "node {} leads at epoch {epoch} and loads high-water {loaded}, below \
                         {last} already committed: the wiped node's vote elected it",
                        ids[i]
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for node in &mut nodes {
        node.stop().await;
    }
}

async fn open_err(config: RaftConfig) -> RaftOpenError {
    match RaftBackend::open(config).await {
        Ok(backend) => {
            backend.shutdown().await;
            panic!("the node started")
        }
        Err(e) => e,
    }
}

/// A directory that kept its identity but lost its log (or the reverse) is refused at start,
/// naming what is missing and the way back, even when started with the original members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_that_lost_part_of_itself_is_refused() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut nodes = start_cluster(dir.path(), 3, &links).await;
    persist_on_leader(&nodes, &[0, 1, 2], 5).await;
    // Restarted "with the same flags", as an operator would.
    let members: BTreeMap<u64, NodeAddrs> = nodes
        .iter()
        .map(|n| {
            let addrs = NodeAddrs {
                client_addr: client_addr(n.id),
                peer_addr: n.peer_addr.clone(),
                ..Default::default()
            };
            (n.id, addrs)
        })
        .collect();
    for node in &mut nodes {
        node.stop().await;
    }
    let node_dir = |id: u64| dir.path().join(format!("node-{id}"));

    std::fs::remove_file(node_dir(1).join("raft-log")).unwrap();
    let lost_log = open_err(config(dir.path(), 1, &members, &links)).await;
    let message = lost_log.to_string();
    assert!(
        matches!(lost_log, RaftOpenError::Partial { .. })
            && message.contains("raft log and vote")
            && message.contains("new id"),
        "{message}"
    );

    std::fs::remove_file(node_dir(2).join("raft-identity")).unwrap();
    let lost_identity = open_err(config(dir.path(), 2, &members, &links)).await;
    assert!(
        lost_identity.to_string().contains("identity"),
        "{lost_identity}"
    );

    // The intact one still starts.
    let backend = RaftBackend::open(config(dir.path(), 3, &members, &links))
        .await
        .expect("an intact directory starts");
    backend.shutdown().await;
}

/// Two initial members started with different `--members` lists (here node 3's peer address
/// differs) must not form a cluster: the first membership entry comes from the lowest id's list,
/// and the other node would silently follow a configuration it was not given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_members_with_different_lists_refuse_to_form() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut listeners = Vec::new();
    let mut members = BTreeMap::new();
    for id in 1..=3u64 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = NodeAddrs {
            client_addr: client_addr(id),
            peer_addr: listener.local_addr().unwrap().to_string(),
            ..Default::default()
        };
        members.insert(id, addrs);
        listeners.push(listener);
    }
    let mut other = members.clone();
    other.get_mut(&3).unwrap().peer_addr = "127.0.0.1:9".into();
    let mut listeners = listeners.into_iter();
    let mut nodes = vec![
        start_node(
            config(dir.path(), 1, &members, &links),
            listeners.next().unwrap(),
        )
        .await,
        start_node(
            config(dir.path(), 2, &other, &links),
            listeners.next().unwrap(),
        )
        .await,
    ];
    // Node 1 forms the cluster at once and campaigns; give it several election timeouts.
    tokio::time::sleep(test_timings().election_timeout_max * 3).await;
    for node in &nodes {
        assert!(
            !matches!(node.leadership(), Leadership::Leader { .. }),
            "node {} leads a cluster formed from two different members lists",
            node.id
        );
    }
    for node in &mut nodes {
        node.stop().await;
    }
}
