//! The piggyback example: three host nodes in one process whose raft log carries both the
//! store's writes and the oracle's high-water, and the backend contract on a one-node host.

use crate::common;
#[path = "../../examples/piggyback.rs"]
mod host;

use common::HighWaterCalls;
use std::collections::BTreeSet;
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use host::{Cmd, LogStore, Router, StateMachine};
use openraft::BasicNode;
use openraft::storage::RaftStateMachine;
use tso_proto::tso::example_kv_v1::kv_client::KvClient;
use tso_proto::tso::example_kv_v1::{GetRequest, PutRequest};
use tso_proto::v1::tso_service_client::TsoServiceClient;
use tso_proto::v1::{GetSeqRequest, GetTsRequest};
use tso_server::backend::{Backend, BackendError, Leadership, OracleCommand, conformance};

const DEADLINE: Duration = Duration::from_secs(20);

/// One timestamp from the oracle at `addr`, retried until it serves (it starts serving once
/// its first high-water is committed after the election).
async fn ts_from(addr: std::net::SocketAddr) -> u64 {
    let mut client = TsoServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        match client.get_ts(GetTsRequest { count: 1 }).await {
            Ok(r) => {
                let r = r.into_inner();
                return r.physical_ms << 18 | r.logical_start as u64;
            }
            Err(status) => {
                assert!(
                    tokio::time::Instant::now() < until,
                    "oracle at {addr} never served: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Takes timestamps one at a time until `stop`, from whichever of `addrs` serves: on a "not
/// leader" refusal it follows the hint, on a transport error it tries the next address.
async fn ask_following_hints(
    addrs: Vec<std::net::SocketAddr>,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<u64> {
    let endpoints: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let mut clients: Vec<_> = endpoints
        .iter()
        .map(|e| {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{e}"))
                .unwrap()
                .timeout(Duration::from_millis(500))
                .connect_lazy();
            TsoServiceClient::new(channel)
        })
        .collect();
    let mut at = 0;
    let mut got = Vec::new();
    while !stop.is_cancelled() {
        match clients[at].get_ts(GetTsRequest { count: 1 }).await {
            Ok(r) => {
                let r = r.into_inner();
                got.push(r.physical_ms << 18 | r.logical_start as u64);
            }
            Err(status) => {
                let hinted = status
                    .metadata()
                    .get_bin(tso_proto::LEADER_HINT_KEY)
                    .map(|_| common::hint_in(&status))
                    .and_then(|h| h.leader_endpoint)
                    .and_then(|e| endpoints.iter().position(|x| *x == e));
                at = match hinted {
                    Some(i) if i != at => i,
                    _ => (at + 1) % clients.len(),
                };
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    got
}

/// A block of `count` values of `key` from the node at `addr`: `(start, count)`.
async fn seq_from(addr: std::net::SocketAddr, key: &str, count: u32) -> u64 {
    let mut client = TsoServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let request = GetSeqRequest {
        key: key.as_bytes().to_vec(),
        count,
    };
    let reply = client.get_seq(request).await.unwrap().into_inner();
    assert_eq!((reply.key.as_str(), reply.count), (key, count));
    reply.start
}

async fn put(addr: std::net::SocketAddr, key: &str, value: &str) {
    let mut kv = KvClient::connect(format!("http://{addr}")).await.unwrap();
    kv.put(PutRequest {
        key: key.to_owned(),
        value: value.to_owned(),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_writes_and_timestamps_share_one_log_snapshot_and_failover() {
    let _turn = crate::common::topic(module_path!());
    let mut cluster = host::start_cluster(3).await.unwrap();
    let leader = cluster.wait_leader(&BTreeSet::new()).await;
    let leader_addr = cluster.nodes[leader].addr;

    // KV writes and timestamps interleave.
    let mut stamps = Vec::new();
    for i in 0..5 {
        put(leader_addr, &format!("k{i}"), &format!("v{i}")).await;
        stamps.push(ts_from(leader_addr).await);
    }
    assert!(stamps.windows(2).all(|w| w[0] < w[1]), "{stamps:?}");
    assert_eq!(seq_from(leader_addr, "invoice", 10).await, 0);
    assert_eq!(seq_from(leader_addr, "invoice", 5).await, 10);

    // One log carries every kind of command.
    let commands = cluster.nodes[leader].log.commands();
    let puts = commands
        .iter()
        .filter(|c| matches!(c, Cmd::Put { .. }))
        .count();
    let high_waters = commands
        .iter()
        .filter(|c| matches!(c, Cmd::Oracle(OracleCommand::AdvanceHighWater { .. })))
        .count();
    assert_eq!(puts, 5, "{commands:?}");
    assert!(high_waters >= 1, "{commands:?}");
    let sequences = commands
        .iter()
        .filter(|c| matches!(c, Cmd::Oracle(OracleCommand::AdvanceSequences { .. })))
        .count();
    assert_eq!(sequences, 2, "one entry per group write: {commands:?}");
    let hw = cluster.nodes[leader].sm.high_water_ms();
    assert!(
        stamps.iter().all(|ts| ts >> 18 <= hw),
        "every timestamp is under the replicated high-water {hw}"
    );

    // A follower refuses with a hint naming the leader's client address (the address of the
    // tonic server that serves both the oracle and the store).
    let follower = (leader + 1) % 3;
    let mut client = TsoServiceClient::connect(format!("http://{}", cluster.nodes[follower].addr))
        .await
        .unwrap();
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = client
            .get_ts(GetTsRequest { count: 1 })
            .await
            .expect_err("a follower does not grant");
        let hint = common::assert_not_leader(&status);
        if hint.leader_endpoint.as_deref() == Some(&leader_addr.to_string()) {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "hint {hint:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The adapter's view: the leader holds a lease, a follower refuses a persist under the
    // leader's epoch with a hint naming the leader.
    common::wait_until("the leader holds a lease", || {
        cluster.nodes[leader].backend.leader_lease_view().is_valid()
    })
    .await;
    assert!(
        !cluster.nodes[follower]
            .backend
            .leader_lease_view()
            .is_valid()
    );
    let epoch = match cluster.nodes[leader].backend.leadership().borrow().clone() {
        Leadership::Leader { epoch } => epoch,
        other => panic!("leader reports {other:?}"),
    };
    match cluster.nodes[follower]
        .backend
        .raise_high_water(1, epoch)
        .await
    {
        Err(BackendError::NotLeader {
            leader_endpoint, ..
        }) => assert_eq!(leader_endpoint, Some(leader_addr.to_string())),
        other => panic!("a follower must refuse with NotLeader, got {other:?}"),
    }

    // One snapshot covers both the map and the high-water, and restoring it restores both.
    let node = &cluster.nodes[leader];
    node.raft.trigger().snapshot().await.unwrap();
    let applied = node.raft.metrics().borrow().last_applied.unwrap().index;
    node.raft
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= applied),
            "snapshot built",
        )
        .await
        .unwrap();
    let (meta, data) = node.sm.current_snapshot().expect("a snapshot");
    let state = host::decode_snapshot(&data).expect("snapshot decodes");
    assert_eq!(state.kv.len(), 5);
    assert_eq!(state.kv["k3"], "v3");
    assert!(state.oracle.high_water_ms >= stamps[4] >> 18);
    assert_eq!(state.oracle.sequences.get("invoice"), Some(&15));
    let mut restored = StateMachine::default();
    restored
        .install_snapshot(&meta, Box::new(Cursor::new(data)))
        .await
        .unwrap();
    assert_eq!(restored.state(), state, "restoring restores both");
    assert_eq!(restored.high_water_ms(), state.oracle.high_water_ms);

    // A learner that joins after the log is purged catches up from that snapshot, over raft.
    node.raft.trigger().purge_log(applied).await.unwrap();
    node.raft
        .wait(Some(DEADLINE))
        .metrics(|m| m.purged.is_some(), "log purged")
        .await
        .unwrap();
    let learner_sm = StateMachine::default();
    let learner = host::open_raft(4, LogStore::default(), learner_sm.clone(), &cluster.router)
        .await
        .unwrap();
    node.raft
        .add_learner(4, BasicNode::new("127.0.0.1:1"), true)
        .await
        .unwrap();
    common::wait_until("the learner applies the snapshot", || {
        learner_sm.state().kv.len() == state.kv.len()
    })
    .await;
    let learned = learner_sm.state();
    assert_eq!(learned.kv, state.kv, "the learner has the map");
    assert_eq!(
        learned.oracle.sequences, state.oracle.sequences,
        "the learner has the counters"
    );
    assert!(
        learned.oracle.high_water_ms >= state.oracle.high_water_ms,
        "the learner has the high-water"
    );
    // openraft publishes the installed snapshot in its metrics just after the state machine
    // holds it: wait for the metrics rather than reading them once.
    learner
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.snapshot.is_some(),
            "the learner caught up by snapshot",
        )
        .await
        .expect("the learner caught up by snapshot");
    cluster.router.remove(4);
    learner.shutdown().await.unwrap();

    // Leader change: the old leader's raft stops while a client that knows all three
    // addresses and follows hints keeps asking; the new leader serves above everything.
    let last = *stamps.last().unwrap();
    let addrs: Vec<_> = cluster.nodes.iter().map(|n| n.addr).collect();
    let stop_asking = tokio_util::sync::CancellationToken::new();
    let asker = tokio::spawn(ask_following_hints(addrs, stop_asking.clone()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let old_id = cluster.nodes[leader].id;
    let router = cluster.router.clone();
    cluster.nodes[leader].stop(&router).await;
    let new_leader = cluster.wait_leader(&BTreeSet::from([old_id])).await;
    let new_addr = cluster.nodes[new_leader].addr;
    let after = ts_from(new_addr).await;
    assert!(after > last, "{after} after {last}: a regression");
    put(new_addr, "k-after", "v").await;
    let mut kv = KvClient::connect(format!("http://{new_addr}"))
        .await
        .unwrap();
    let got = kv
        .get(GetRequest { key: "k2".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.value.as_deref(), Some("v2"), "the store survived");
    let final_ts = ts_from(new_addr).await;
    assert!(final_ts > after);
    assert_eq!(
        seq_from(new_addr, "invoice", 1).await,
        15,
        "the new leader's block follows the old leader's"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop_asking.cancel();
    let asked = asker.await.unwrap();
    assert!(
        asked.windows(2).all(|w| w[0] < w[1]),
        "one client's timestamps across the failover are strictly increasing"
    );
    assert!(asked.first().is_some_and(|&t| t > last), "{asked:?}");
    assert!(
        asked.last().is_some_and(|&t| t > after),
        "the client reached the new leader: {asked:?}"
    );

    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_piggyback_host_keeps_the_backend_contract() {
    let _turn = crate::common::topic(module_path!());
    // The same storage on each reopen; the previous raft is shut down before the next starts.
    let log = LogStore::default();
    let sm = StateMachine::default();
    let router = Router::default();
    let previous: Arc<Mutex<Option<host::Raft>>> = Arc::default();
    conformance::run_all(|| {
        let (log, sm, router, previous) =
            (log.clone(), sm.clone(), router.clone(), previous.clone());
        async move {
            let old = previous.lock().unwrap().take();
            let fresh = old.is_none();
            if let Some(old) = old {
                old.shutdown().await.unwrap();
            }
            let raft = host::open_raft(1, log, sm.clone(), &router).await.unwrap();
            if fresh {
                let member = BasicNode::new("127.0.0.1:7000");
                raft.initialize(
                    [(1u64, member)]
                        .into_iter()
                        .collect::<std::collections::BTreeMap<_, _>>(),
                )
                .await
                .unwrap();
            }
            *previous.lock().unwrap() = Some(raft.clone());
            host::oracle_backend(&raft, &sm)
        }
    })
    .await;
    let raft = previous.lock().unwrap().take();
    if let Some(raft) = raft {
        raft.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_quorum_is_transient_and_service_resumes() {
    let _turn = crate::common::topic(module_path!());
    let mut cluster = host::start_cluster(3).await.unwrap();
    let leader = cluster.wait_leader(&BTreeSet::new()).await;
    ts_from(cluster.nodes[leader].addr).await;
    let backend = cluster.nodes[leader].backend.clone();
    let epoch = match backend.leadership().borrow().clone() {
        Leadership::Leader { epoch } => epoch,
        other => panic!("leader reports {other:?}"),
    };

    // Every node unreachable: the leader has no quorum.
    for node in &cluster.nodes {
        cluster.router.remove(node.id);
    }
    let started = std::time::Instant::now();
    match backend.raise_high_water(9_000, epoch).await {
        Err(BackendError::Transient(_) | BackendError::NotLeader { .. }) => {}
        other => panic!("a persist without quorum must fail transiently, got {other:?}"),
    }
    match backend.high_water_ms().await {
        Err(BackendError::Transient(_) | BackendError::NotLeader { .. }) => {}
        other => panic!("a load without quorum must fail transiently, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failures are bounded by the call timeout"
    );

    // Quorum back: a leader serves again.
    for node in &cluster.nodes {
        cluster.router.add(node.id, node.raft.clone());
        cluster.router.gate_votes(node.id, node.backend.vote_gate());
    }
    // Followers that timed out while cut off may hold a new election once healed: take a
    // timestamp from whichever node ends up serving.
    ts_from_any(cluster.nodes.iter().map(|n| n.addr).collect()).await;
    cluster.stop_all().await;
}

/// One timestamp from whichever of `addrs` serves first, retried within [`DEADLINE`].
async fn ts_from_any(addrs: Vec<std::net::SocketAddr>) -> u64 {
    let until = tokio::time::Instant::now() + DEADLINE;
    loop {
        for addr in &addrs {
            if let Ok(mut client) = TsoServiceClient::connect(format!("http://{addr}")).await
                && let Ok(r) = client.get_ts(GetTsRequest { count: 1 }).await
            {
                let r = r.into_inner();
                return r.physical_ms << 18 | r.logical_start as u64;
            }
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no oracle served within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_nodes_restarted_on_their_storage_serve_above_everything_before() {
    let _turn = crate::common::topic(module_path!());
    let mut cluster = host::start_cluster(3).await.unwrap();
    let leader = cluster.wait_leader(&BTreeSet::new()).await;
    put(cluster.nodes[leader].addr, "k", "v").await;
    let before = ts_from(cluster.nodes[leader].addr).await;

    cluster.stop_all().await;
    for i in 0..3 {
        cluster.restart(i).await.unwrap();
    }
    let leader = cluster.wait_leader(&BTreeSet::new()).await;
    let after = ts_from(cluster.nodes[leader].addr).await;
    assert!(after > before, "{after} after {before}: a regression");
    let mut kv = KvClient::connect(format!("http://{}", cluster.nodes[leader].addr))
        .await
        .unwrap();
    let got = kv.get(GetRequest { key: "k".into() }).await.unwrap();
    assert_eq!(got.into_inner().value.as_deref(), Some("v"));
    cluster.stop_all().await;
}
