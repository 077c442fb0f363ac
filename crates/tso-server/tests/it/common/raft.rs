//! Helpers shared by the raft tests: clusters of in-process nodes on real loopback gRPC.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tso_core::Epoch;
use tso_server::backend::raft::{
    Links, NodeAddrs, RaftBackend, RaftConfig, RaftTimings, SnapshotOptions,
};
use tso_server::backend::{Backend, Leadership, OracleCommand};

/// Bound on any wait for a cluster to reach a state (elections take well under a second; the
/// rest is slack for a busy 2-core machine).
pub const CLUSTER_WAIT: Duration = Duration::from_secs(30);

/// Timings for in-process clusters: three nodes share one test process on a busy 2-core
/// machine, where a debug build can stall a node for a few hundred milliseconds; a wider
/// election timeout than the default keeps such stalls from causing elections the test did not
/// ask for. (The process tests run the defaults.)
pub fn test_timings() -> RaftTimings {
    RaftTimings {
        election_timeout_min: Duration::from_millis(800),
        election_timeout_max: Duration::from_millis(1_400),
        call_timeout: Duration::from_secs(2),
        ..RaftTimings::default()
    }
}

/// The advertised client address of node `id` (never dialled by these tests).
pub fn client_addr(id: u64) -> String {
    format!("tso-{id}.test:7000")
}

/// One running node: its backend and the task serving its peer port.
pub struct TestNode {
    pub id: u64,
    /// The address its peer port listens on (and advertises).
    pub peer_addr: String,
    pub backend: Arc<RaftBackend>,
    stop_peers: Option<oneshot::Sender<()>>,
    peer_task: Option<JoinHandle<()>>,
}

impl TestNode {
    /// Stops the node: its peer server first (peers see it vanish), then its raft.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop_peers.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.peer_task.take() {
            let _ = task.await;
        }
        self.backend.shutdown().await;
    }

    pub fn leadership(&self) -> Leadership {
        self.backend.leadership().borrow().clone()
    }
}

/// Starts `n` nodes (ids 1..=n) with data under `dir`, peers on fresh loopback ports.
pub async fn start_cluster(dir: &Path, n: u64, links: &Links) -> Vec<TestNode> {
    start_cluster_with(dir, n, links, SnapshotOptions::default(), test_timings()).await
}

/// [`start_cluster`] with the given snapshot options and timings on every node.
pub async fn start_cluster_with(
    dir: &Path,
    n: u64,
    links: &Links,
    snapshot: SnapshotOptions,
    timings: RaftTimings,
) -> Vec<TestNode> {
    let mut listeners = BTreeMap::new();
    let mut members = BTreeMap::new();
    for id in 1..=n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = NodeAddrs {
            client_addr: client_addr(id),
            peer_addr: listener.local_addr().unwrap().to_string(),
            ..Default::default()
        };
        members.insert(id, addrs);
        listeners.insert(id, listener);
    }
    let mut nodes = Vec::new();
    for (id, listener) in listeners {
        let config = RaftConfig {
            node_id: id,
            data_dir: dir.join(format!("node-{id}")),
            initial_members: members.clone(),
            join: false,
            timings,
            snapshot,
            links: links.clone(),
            peer_tls: None,
        };
        nodes.push(start_node(config, listener).await);
    }
    nodes
}

/// Opens one node and serves its peer port on `listener`.
pub async fn start_node(config: RaftConfig, listener: tokio::net::TcpListener) -> TestNode {
    let id = config.node_id;
    let peer_addr = listener.local_addr().unwrap().to_string();
    let backend = Arc::new(RaftBackend::open(config).await.expect("open raft node"));
    let (tx, rx) = oneshot::channel::<()>();
    let serving = backend.clone();
    let peer_task = tokio::spawn(async move {
        serving
            .serve_peers(listener, async {
                let _ = rx.await;
            })
            .await
            .expect("serve peers");
    });
    TestNode {
        id,
        peer_addr,
        backend,
        stop_peers: Some(tx),
        peer_task: Some(peer_task),
    }
}

/// Waits until exactly one of the `running` nodes reports `Leader` at an epoch above `after`,
/// and returns its index and epoch.
pub async fn wait_for_leader(
    nodes: &[TestNode],
    running: &[usize],
    after: Epoch,
) -> (usize, Epoch) {
    let wait = async {
        loop {
            let leaders: Vec<(usize, Epoch)> = running
                .iter()
                .filter_map(|&i| match nodes[i].leadership() {
                    Leadership::Leader { epoch } if epoch > after => Some((i, epoch)),
                    _ => None,
                })
                .collect();
            if let [one] = leaders[..] {
                return one;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    match tokio::time::timeout(CLUSTER_WAIT, wait).await {
        Ok(found) => found,
        Err(_) => {
            let states: Vec<String> = nodes
                .iter()
                .map(|n| format!("node {}: {:?}", n.id, n.leadership()))
                .collect();
            panic!("no single leader above epoch {after} in time: {states:?}")
        }
    }
}

/// Waits until one node leads under a valid lease and returns its index and epoch: whoever holds
/// one first (a busy machine may elect more than once).
pub async fn wait_for_lease_holder(nodes: &[TestNode]) -> (usize, Epoch) {
    let mut found = None;
    wait_until("a leader holds a lease", || {
        found = nodes
            .iter()
            .enumerate()
            .find_map(|(i, n)| match n.leadership() {
                Leadership::Leader { epoch } if n.backend.lease_is_valid() => Some((i, epoch)),
                _ => None,
            });
        found.is_some()
    })
    .await;
    found.expect("a lease holder")
}

/// Waits until node `i` reports `Follower` naming `leader_client_addr`.
pub async fn wait_for_follower_of(node: &TestNode, leader_client_addr: &str) {
    let mut rx = node.backend.leadership();
    let wait = async {
        loop {
            if let Leadership::Follower {
                leader_endpoint: Some(addr),
                ..
            } = &*rx.borrow_and_update()
                && addr == leader_client_addr
            {
                return;
            }
            rx.changed().await.expect("leadership watch closed");
        }
    };
    tokio::time::timeout(CLUSTER_WAIT, wait)
        .await
        .expect("follower never named the leader");
}

/// Restarts node `id` on its data directory under `dir` without a members list (a restarted
/// node learns the members from its log), serving peers again on `peer_addr`.
pub async fn restart_node(dir: &Path, id: u64, peer_addr: &str, links: &Links) -> TestNode {
    restart_node_with(dir, id, peer_addr, links, SnapshotOptions::default()).await
}

/// [`restart_node`] with the given snapshot options.
pub async fn restart_node_with(
    dir: &Path,
    id: u64,
    peer_addr: &str,
    links: &Links,
    snapshot: SnapshotOptions,
) -> TestNode {
    let listener = tokio::net::TcpListener::bind(peer_addr).await.unwrap();
    let config = RaftConfig {
        node_id: id,
        data_dir: dir.join(format!("node-{id}")),
        initial_members: BTreeMap::new(),
        join: false,
        timings: test_timings(),
        snapshot,
        links: links.clone(),
        peer_tls: None,
    };
    start_node(config, listener).await
}

/// The peer address node `i` advertises (known before it has learnt the membership).
pub fn peer_addr(node: &TestNode) -> String {
    node.peer_addr.clone()
}

/// Waits until `check` holds, polling; panics after [`CLUSTER_WAIT`] with `what`.
pub async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let wait = async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(CLUSTER_WAIT, wait).await.is_err() {
        panic!("timed out waiting until {what}");
    }
}

/// Persists `at_least_ms` through whichever of the `running` nodes leads, following elections
/// (a busy machine can cause one at any time); returns the durable value.
pub async fn persist_on_leader(nodes: &[TestNode], running: &[usize], at_least_ms: u64) -> u64 {
    let attempt = async {
        loop {
            let (leader, epoch) = wait_for_leader(nodes, running, Epoch::ZERO).await;
            let cmd = OracleCommand::AdvanceHighWater { at_least_ms };
            match nodes[leader].backend.apply(cmd, epoch).await {
                Ok(stored) => return stored.high_water_ms,
                Err(e) => eprintln!("persist on node {} failed, retrying: {e}", nodes[leader].id),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(CLUSTER_WAIT, attempt)
        .await
        .expect("no leader accepted the persist in time")
}
