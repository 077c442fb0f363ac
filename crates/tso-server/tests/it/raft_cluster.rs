//! Three raft nodes in one process over real loopback gRPC: election, persist on the leader,
//! the follower's hint, failover without regression, and a restarted node rejoining.

use crate::common;

use common::HighWaterCalls;
use std::time::Duration;

use common::raft::{
    client_addr, start_cluster, start_cluster_with, test_timings, wait_for_follower_of,
    wait_for_leader,
};
use tso_core::Epoch;
use tso_server::backend::BackendError;
use tso_server::backend::raft::{Links, SnapshotOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_persist_hint_and_fail_over_without_regression() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut nodes = start_cluster(dir.path(), 3, &links).await;
    let all = [0, 1, 2];

    // A busy machine can hold an extra election right after the first: persist through
    // whoever leads, then look the leader up again.
    let persisted = common::raft::persist_on_leader(&nodes, &all, 1_000).await;
    assert_eq!(persisted, 1_000);
    let (leader, epoch) = wait_for_leader(&nodes, &all, Epoch::ZERO).await;
    let leader_id = nodes[leader].id;
    assert_eq!(epoch.lo(), leader_id, "epoch = (term, leader id)");

    for &f in all.iter().filter(|&&i| i != leader) {
        wait_for_follower_of(&nodes[f], &client_addr(leader_id)).await;
        match nodes[f].backend.raise_high_water(5_000, epoch).await {
            Err(BackendError::NotLeader {
                leader_endpoint: Some(addr),
                leader_epoch: Some(hinted),
            }) => {
                // A busy machine may re-elect in between: the hint then names a later epoch,
                // always together with that epoch's leader.
                assert!(
                    hinted >= epoch,
                    "hint epochs never go back: {hinted} < {epoch}"
                );
                assert_eq!(
                    addr,
                    client_addr(hinted.lo()),
                    "hint names the leader's client address"
                );
            }
            other => panic!("a follower must refuse with a hint, got {other:?}"),
        }
    }
    let leader_backend = nodes[leader].backend.clone();
    common::raft::wait_until("a leader in contact with its peers holds a lease", || {
        leader_backend.lease_is_valid()
    })
    .await;

    nodes[leader].stop().await;
    let rest: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
    let (next, next_epoch) = wait_for_leader(&nodes, &rest, epoch).await;
    assert!(next_epoch > epoch);
    let loaded = nodes[next].backend.high_water_ms().await.unwrap();
    assert!(
        loaded >= 1_000,
        "the new leader sees every persisted value: {loaded}"
    );
    let higher = nodes[next]
        .backend
        .raise_high_water(2_000, next_epoch)
        .await
        .unwrap();
    assert_eq!(higher, 2_000);
    assert_eq!(
        nodes[next]
            .backend
            .raise_high_water(1_500, next_epoch)
            .await
            .unwrap(),
        2_000,
        "never lowered"
    );
    match nodes[next].backend.raise_high_water(3_000, epoch).await {
        Err(BackendError::Fenced { .. } | BackendError::NotLeader { .. }) => {}
        other => panic!("the old epoch must be refused on the new leader, got {other:?}"),
    }
    for n in &mut nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_quorum_fails_transiently_and_service_resumes() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut nodes = start_cluster(dir.path(), 3, &links).await;
    let all = [0, 1, 2];
    let (leader, epoch) = wait_for_leader(&nodes, &all, Epoch::ZERO).await;
    nodes[leader]
        .backend
        .raise_high_water(1_000, epoch)
        .await
        .unwrap();

    // Cut the leader off: no quorum on its side.
    links.isolate(nodes[leader].id, nodes.iter().map(|n| n.id));
    let started = std::time::Instant::now();
    match nodes[leader].backend.raise_high_water(9_000, epoch).await {
        Err(BackendError::Transient(_) | BackendError::NotLeader { .. }) => {}
        other => panic!("a leader without quorum must fail transiently, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the failure is bounded by the call timeout"
    );

    let rest: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
    let (next, next_epoch) = wait_for_leader(&nodes, &rest, epoch).await;
    links.heal_all();
    let loaded = nodes[next].backend.high_water_ms().await.unwrap();
    assert!(
        loaded >= 1_000,
        "no regression after the partition: {loaded}"
    );
    let resumed = nodes[next]
        .backend
        .raise_high_water(loaded + 1, next_epoch)
        .await
        .unwrap();
    assert!(resumed > loaded);
    for n in &mut nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_follower_catches_up_and_a_full_restart_keeps_the_high_water() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut nodes = start_cluster(dir.path(), 3, &links).await;
    let all = [0, 1, 2];
    let (leader, epoch) = wait_for_leader(&nodes, &all, Epoch::ZERO).await;
    let follower = (leader + 1) % 3;
    let follower_peer = common::raft::peer_addr(&nodes[follower]);
    nodes[follower].stop().await;

    let running: Vec<usize> = all.iter().copied().filter(|&i| i != follower).collect();
    let mut last = 0;
    for i in 1..=20u64 {
        last = common::raft::persist_on_leader(&nodes, &running, i * 100).await;
    }
    let id = nodes[follower].id;
    nodes[follower] = common::raft::restart_node(dir.path(), id, &follower_peer, &links).await;
    let rejoined = &nodes[follower];
    common::raft::wait_until(
        "the restarted follower applies the leader's high-water",
        || rejoined.backend.applied_high_water_ms() == last,
    )
    .await;

    let peers: Vec<String> = nodes.iter().map(common::raft::peer_addr).collect();
    for n in &mut nodes {
        n.stop().await;
    }
    let mut restarted = Vec::new();
    for (i, peer) in peers.iter().enumerate() {
        restarted.push(common::raft::restart_node(dir.path(), i as u64 + 1, peer, &links).await);
    }
    // openraft restores a committed vote: the old leader may resume in its own term, so the
    // epoch after a full restart is at least, not above, the one before.
    let (leader, restarted_epoch) = wait_for_leader(&restarted, &all, Epoch::ZERO).await;
    assert!(restarted_epoch >= epoch, "epochs never go back");
    let loaded = restarted[leader].backend.high_water_ms().await.unwrap();
    assert_eq!(
        loaded, last,
        "all three killed and restarted: nothing acknowledged is lost"
    );
    for n in &mut restarted {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_purged_log_catches_up_by_snapshot() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let snapshot = SnapshotOptions {
        every_entries: 10,
        entries_kept: 0,
    };
    let mut nodes = common::raft::start_cluster_with(
        dir.path(),
        3,
        &links,
        snapshot,
        common::raft::test_timings(),
    )
    .await;
    let all = [0, 1, 2];
    let (leader, _) = wait_for_leader(&nodes, &all, Epoch::ZERO).await;
    let follower = (leader + 1) % 3;
    let follower_peer = common::raft::peer_addr(&nodes[follower]);
    nodes[follower].stop().await;
    let behind = nodes[follower].backend.applied_high_water_ms();

    let running: Vec<usize> = all.iter().copied().filter(|&i| i != follower).collect();
    let mut last = 0;
    // Past one purge batch (64 entries) beyond the snapshot interval.
    for i in 1..=100u64 {
        last = common::raft::persist_on_leader(&nodes, &running, behind + i * 10).await;
    }
    common::raft::wait_until("a running node purges the log the follower lacks", || {
        running
            .iter()
            .all(|&i| nodes[i].backend.purged_index().is_some_and(|p| p > 10))
    })
    .await;

    let id = nodes[follower].id;
    nodes[follower] = common::raft::restart_node(dir.path(), id, &follower_peer, &links).await;
    let rejoined = nodes[follower].backend.clone();
    common::raft::wait_until("the follower installs the snapshot and catches up", || {
        rejoined.applied_high_water_ms() == last && rejoined.snapshot_index().is_some()
    })
    .await;
    for n in &mut nodes {
        n.stop().await;
    }
}

/// SEMANTICS §13: the fence's read reflects every committed write, even on a leader that comes
/// back in its own term after a restart (openraft restores a committed vote for itself as
/// leadership at once, without a new blank entry). Its snapshot covers the term's first entry,
/// so openraft's read point is already applied at start; the extensions committed after the
/// snapshot must still be in what a load returns, or the fence would seed the
/// cursor from a stale high-water and, with a clock behind the last grants, repeat timestamps.
/// Replication from the restarted leader is held while heartbeats pass, so its read barrier
/// wins the race against its log replication (as it can after a power loss): the read must
/// then wait (and fail as `Transient` when the wait runs out), never return the snapshot's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restarted_into_its_own_term_loads_every_committed_high_water() {
    let _turn = crate::common::topic(module_path!());
    const ROUNDS: u64 = 3;
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let snapshot = SnapshotOptions {
        every_entries: 5,
        entries_kept: 0,
    };
    let mut nodes = start_cluster_with(dir.path(), 3, &links, snapshot, test_timings()).await;
    let all = [0, 1, 2];
    let mut last = 0;
    for round in 1..=ROUNDS {
        let (leader, epoch) = extend_in_one_term(&nodes, &mut last).await;
        let peers: Vec<String> = nodes.iter().map(common::raft::peer_addr).collect();
        for n in &mut nodes {
            n.stop().await;
        }
        let leader_id = leader as u64 + 1;
        for id in (1..=3).filter(|&id| id != leader_id) {
            links.hold_replication(leader_id, id);
        }
        let mut restarted = Vec::new();
        for i in std::iter::once(leader).chain(all.into_iter().filter(|&i| i != leader)) {
            let id = i as u64 + 1;
            let node =
                common::raft::restart_node_with(dir.path(), id, &peers[i], &links, snapshot).await;
            restarted.push((i, node));
        }
        restarted.sort_by_key(|(i, _)| *i);
        nodes = restarted.into_iter().map(|(_, n)| n).collect();
        let held = load_with_retries(&nodes[leader], 1).await;
        if let Some(v) = held {
            assert!(
                v >= last,
                "round {round}: node {leader_id} restarted in {epoch} loaded high-water {v} \
                 below the committed {last} while its replication was held"
            );
        }
        links.heal_all();
        let loaded = load_with_retries(&nodes[leader], u32::MAX)
            .await
            .expect("the load succeeds once replication flows");
        eprintln!("round {round}: leader {epoch}, last committed {last}, loaded {loaded}");
        assert!(
            loaded >= last,
            "round {round}: node {} restarted in {epoch} loaded high-water {loaded} below the \
             committed {last}",
            nodes[leader].id
        );
    }
    for n in &mut nodes {
        n.stop().await;
    }
}

/// Persists at least `EXTENSIONS` rising high-waters on one leader within one term, until its
/// snapshot covers the term's first entry and at least one committed entry lies past the
/// snapshot; starts over under a new leader if an election intervenes. Returns the leader.
async fn extend_in_one_term(nodes: &[common::raft::TestNode], last: &mut u64) -> (usize, Epoch) {
    /// With a snapshot every 5 entries: two snapshots or more per term.
    const EXTENSIONS: u64 = 12;
    let all = [0, 1, 2];
    'term: loop {
        let (leader, epoch) = wait_for_leader(nodes, &all, Epoch::ZERO).await;
        let backend = &nodes[leader].backend;
        let term_start = backend.last_log_index().unwrap_or(0);
        let mut extensions = 0;
        loop {
            *last += 1_000;
            if let Err(e) = backend.raise_high_water(*last, epoch).await {
                eprintln!("persist in {epoch} failed ({e}); starting over");
                continue 'term;
            }
            extensions += 1;
            let covered = backend.snapshot_index().is_some_and(|s| s > term_start);
            let past = backend.snapshot_index() < backend.last_log_index();
            if extensions >= EXTENSIONS && covered && past {
                return (leader, epoch);
            }
            assert!(
                extensions < 10 * EXTENSIONS,
                "no snapshot past index {term_start} after {extensions} extensions"
            );
        }
    }
}

/// The restarted leader's fence read, retried while it fails as `Transient` (its peers coming
/// back, or its wait for the log to be applied running out), up to `timeouts` times after a
/// wait ran out (`None` then).
async fn load_with_retries(node: &common::raft::TestNode, timeouts: u32) -> Option<u64> {
    let attempt = async {
        let mut left = timeouts;
        loop {
            match node.backend.high_water_ms().await {
                Ok(v) => return Some(v),
                Err(BackendError::Transient(e)) if e.contains("not confirmed") => {
                    left -= 1;
                    if left == 0 {
                        return None;
                    }
                }
                Err(BackendError::Transient(_)) => {}
                Err(e) => panic!("the restarted leader's load failed: {e}"),
            }
        }
    };
    tokio::time::timeout(common::raft::CLUSTER_WAIT, attempt)
        .await
        .expect("the restarted leader loads within the wait")
}
