//! Dense sequences on a three-node raft cluster over real gRPC: followers redirect, blocks keep
//! following each other across a leader failover under load (D1 never reused; D2 gaps only where
//! a call was ambiguous), and the counters survive a restart of the whole cluster.

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::raft::{CLUSTER_WAIT, client_addr, peer_addr, restart_node, start_cluster, wait_until};
use common::*;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;
use tso_proto::v1::GetSeqRequest;
use tso_proto::v1::tso_service_client::TsoServiceClient;
use tso_server::backend::raft::Links;
use tso_server::{Config, OracleGuard, ServingState};

const KEYS: [&str; 2] = ["orders", "rows"];

/// What one call of the load saw.
#[derive(Debug, Clone)]
enum Outcome {
    Block {
        key: String,
        start: u64,
        count: u32,
    },
    /// Refused before anything was written ("not leader", lease expired).
    Refused,
    /// The block may or may not have been spent.
    Ambiguous {
        key: String,
        count: u32,
    },
}

type History = Arc<Mutex<Vec<Outcome>>>;

fn servers_of(nodes: &[common::raft::TestNode]) -> Vec<TestServer> {
    nodes
        .iter()
        .map(|node| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let guard = OracleGuard::start(node.backend.clone(), Config::default());
            TestServer::from_guard(listener, guard)
        })
        .collect()
}

async fn wait_for_serving(servers: &[TestServer], not: Option<usize>) -> usize {
    let deadline = Instant::now() + CLUSTER_WAIT;
    loop {
        let serving: Vec<usize> = (0..servers.len())
            .filter(|&i| Some(i) != not)
            .filter(|&i| matches!(*servers[i].serving.borrow(), ServingState::Serving { .. }))
            .collect();
        if let [one] = serving[..] {
            return one;
        }
        assert!(Instant::now() < deadline, "no single serving leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Calls GetSeq in a loop over `clients`, moving to the next one after any failure.
async fn load(
    mut clients: Vec<TsoServiceClient<Channel>>,
    worker: usize,
    history: History,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut next = 0;
    let mut i = 0usize;
    while !stop.is_cancelled() {
        i += 1;
        let key = KEYS[(worker + i) % KEYS.len()].to_string();
        let count = (i % 4) as u32 + 1;
        let n = clients.len();
        let mut request = tonic::Request::new(GetSeqRequest {
            key: key.clone().into_bytes(),
            count,
        });
        request.set_timeout(Duration::from_secs(3));
        let outcome = match clients[next % n].get_seq(request).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                assert_eq!((reply.key.as_str(), reply.count), (key.as_str(), count));
                Outcome::Block {
                    key,
                    start: reply.start,
                    count,
                }
            }
            Err(status) if status.code() == Code::FailedPrecondition => {
                assert_eq!(status.message(), tso_server::NOT_LEADER_MESSAGE);
                next += 1;
                Outcome::Refused
            }
            Err(status) => {
                // The stopped node's raft is gone: its writes fail as INTERNAL.
                let ambiguous = [
                    Code::Unavailable,
                    Code::DeadlineExceeded,
                    Code::Unknown,
                    Code::Cancelled,
                    Code::Internal,
                ];
                assert!(ambiguous.contains(&status.code()), "unexpected {status:?}");
                next += 1;
                Outcome::Ambiguous { key, count }
            }
        };
        if !matches!(outcome, Outcome::Block { .. }) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        history.lock().unwrap().push(outcome);
    }
}

/// D1 and D2 over a history: per key, blocks never overlap, and the holes between them add up
/// to no more than the counts of the key's ambiguous calls. Returns each key's end.
fn check(history: &[Outcome]) -> BTreeMap<String, u64> {
    let mut blocks: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    let mut ambiguous: BTreeMap<&str, u64> = BTreeMap::new();
    for outcome in history {
        match outcome {
            Outcome::Block { key, start, count } => blocks
                .entry(key)
                .or_default()
                .push((*start, start + *count as u64)),
            Outcome::Ambiguous { key, count } => {
                *ambiguous.entry(key).or_default() += *count as u64
            }
            Outcome::Refused => {}
        }
    }
    let mut ends = BTreeMap::new();
    for (key, mut spans) in blocks {
        spans.sort_unstable();
        let mut end = 0;
        let mut holes = 0;
        for (start, stop) in spans {
            assert!(
                start >= end,
                "{key}: block [{start}, {stop}) overlaps one ending at {end}"
            );
            holes += start - end;
            end = stop;
        }
        let allowed = ambiguous.get(key).copied().unwrap_or(0);
        assert!(
            holes <= allowed,
            "{key}: {holes} values skipped, but ambiguous calls account for only {allowed}"
        );
        ends.insert(key.to_string(), end);
    }
    ends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_stay_dense_through_a_failover_and_a_full_restart() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut nodes = start_cluster(dir.path(), 3, &links).await;
    let servers = servers_of(&nodes);
    let old = wait_for_serving(&servers, None).await;

    // A follower redirects with the leader's client address, before writing anything.
    let follower = (old + 1) % 3;
    let mut to_follower = servers[follower].client().await;
    wait_until("the follower knows the leader", || {
        matches!(
            &*servers[follower].serving.borrow(),
            ServingState::NotServing {
                leader_endpoint: Some(_),
                ..
            }
        )
    })
    .await;
    let status = to_follower
        .get_seq(GetSeqRequest {
            key: b"orders".to_vec(),
            count: 1,
        })
        .await
        .unwrap_err();
    let hint = assert_not_leader(&status);
    assert_eq!(hint.leader_endpoint, Some(client_addr(nodes[old].id)));

    let history: History = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for worker in 0..8 {
        let mut clients = Vec::new();
        for k in 0..3 {
            clients.push(servers[(old + k) % 3].client().await);
        }
        workers.push(tokio::spawn(load(
            clients,
            worker,
            history.clone(),
            stop.clone(),
        )));
    }
    let blocks = |h: &History| {
        h.lock()
            .unwrap()
            .iter()
            .filter(|o| matches!(o, Outcome::Block { .. }))
            .count()
    };
    wait_until("blocks before the failover", || blocks(&history) >= 200).await;
    nodes[old].stop().await;
    let before = blocks(&history);
    let new = wait_for_serving(&servers, Some(old)).await;
    assert_ne!(new, old);
    wait_until("blocks after the failover", || {
        blocks(&history) >= before + 200
    })
    .await;
    stop.cancel();
    for worker in workers {
        worker.await.unwrap();
    }
    let history = history.lock().unwrap().clone();
    let ends = check(&history);
    let ambiguous = history
        .iter()
        .filter(|o| matches!(o, Outcome::Ambiguous { .. }))
        .count();
    eprintln!(
        "{} calls, {} ambiguous, ends {ends:?}",
        history.len(),
        ambiguous
    );

    // A full restart: every node stops, all three come back, the counters are where they were.
    for server in servers {
        let _ = server.stop().await;
    }
    let peers: Vec<String> = nodes.iter().map(peer_addr).collect();
    for node in &mut nodes {
        node.stop().await;
    }
    drop(nodes);
    let mut nodes = Vec::new();
    for (i, peer) in peers.iter().enumerate() {
        nodes.push(restart_node(dir.path(), i as u64 + 1, peer, &links).await);
    }
    let servers = servers_of(&nodes);
    let leader = wait_for_serving(&servers, None).await;
    let mut client = servers[leader].client().await;
    for key in KEYS {
        let reply = tokio::time::timeout(CLUSTER_WAIT, async {
            loop {
                let request = GetSeqRequest {
                    key: key.as_bytes().to_vec(),
                    count: 1,
                };
                match client.get_seq(request).await {
                    Ok(reply) => return reply.into_inner(),
                    Err(status) => eprintln!("{key} after the restart: {status:?}; retrying"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("a block after the restart");
        assert!(
            reply.start >= ends[key],
            "{key}: block at {} after a restart, below the end {} handed out before",
            reply.start,
            ends[key]
        );
    }
    for server in servers {
        let _ = server.stop().await;
    }
    for node in &mut nodes {
        node.stop().await;
    }
}
