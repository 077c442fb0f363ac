//! The leader lease (SEMANTICS G3): a leader cut off from its peers sees its lease expire
//! before the others can elect a new leader.

mod common;

use std::time::{Duration, Instant};

use common::raft::{start_cluster, wait_until};
use tso_core::Epoch;
use tso_server::backend::raft::Links;
use tso_server::consensus::Leadership;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_loses_its_lease_before_a_new_leader_is_elected() {
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut nodes = start_cluster(dir.path(), 3, &links).await;
    let all = [0usize, 1, 2];
    let (leader, epoch) = common::raft::wait_for_leader(&nodes, &all, Epoch::ZERO).await;
    wait_until("the leader holds a lease", || {
        nodes[leader].backend.lease_is_valid()
    })
    .await;

    links.isolate(nodes[leader].id, nodes.iter().map(|n| n.id));
    let rest: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
    // Poll every millisecond: the new leader appeared after the last poll that did not see it.
    let elected_after = tokio::time::timeout(common::raft::CLUSTER_WAIT, async {
        loop {
            let polled = Instant::now();
            let elected = rest.iter().any(
                |&i| matches!(nodes[i].leadership(), Leadership::Leader { epoch: e } if e > epoch),
            );
            if elected {
                return polled;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the majority side elects a new leader");

    let lease_end = nodes[leader]
        .backend
        .lease_valid_until()
        .expect("the old leader held a lease in its term");
    if let Some(gap) = elected_after.checked_duration_since(lease_end) {
        eprintln!("old lease ended {gap:?} before the new leader was seen");
    }
    assert!(
        lease_end < elected_after,
        "the old lease ends {:?} after the new leader was seen",
        lease_end - elected_after
    );
    assert!(
        !nodes[leader].backend.lease_is_valid(),
        "the cut-off leader must not be able to grant"
    );
    assert!(
        matches!(nodes[leader].leadership(), Leadership::Leader { epoch: e } if e == epoch),
        "openraft 0.9 does not step a cut-off leader down: only the lease protects G2"
    );

    links.heal_all();
    wait_until("the old leader steps down after healing", || {
        !matches!(nodes[leader].leadership(), Leadership::Leader { .. })
    })
    .await;
    for n in &mut nodes {
        n.stop().await;
    }
}
