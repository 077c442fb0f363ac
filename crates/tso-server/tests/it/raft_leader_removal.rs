//! Removing the leader of a two-voter cluster (SEMANTICS §12, G3). openraft lets the only voter
//! of a configuration elect itself at once, as soon as that configuration is in its log, with no
//! vote-refusal window: if the leader of {1, 2} could remove itself, node 2 would elect itself
//! and serve while node 1 still holds its lease. The removal is refused, naming the way: transfer
//! leadership, then remove the old leader through the new one.

use crate::common;

use common::HighWaterCalls;
use std::time::Instant;

use common::raft::{start_cluster, wait_for_leader, wait_for_lease_holder, wait_until};
use tso_core::Epoch;
use tso_proto::tso::admin_v1 as pb;
use tso_proto::tso::admin_v1::admin_client::AdminClient;
use tso_server::backend::raft::{AdminService, Links, RaftBackend};
use tso_server::backend::{Backend, Leadership};

/// Serves `backend`'s admin service on a loopback port; returns a client of it.
async fn admin_client(backend: &RaftBackend) -> AdminClient<tonic::transport::Channel> {
    serve_admin(backend.admin()).await
}

async fn serve_admin(admin: AdminService) -> AdminClient<tonic::transport::Channel> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tonic::transport::Server::builder().add_service(admin.into_server());
    tokio::spawn(
        server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    AdminClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// Asks the leader of two voters to remove itself. If the removal goes ahead, then once the
/// other node leads and has committed a write, the old leader's lease for its epoch must be
/// over. With `cut`, the link between them is cut as soon as the survivor has the new
/// configuration in its log, so the old leader hears nothing more.
async fn remove_the_leader_of_two(cut: bool) {
    remove_the_leader_of_two_with(cut, false).await;
}

/// [`remove_the_leader_of_two`]; with `no_refusal`, the admin service lets the removal through
/// (the positive control's admin service), so only the pre-vote gate stands in the way.
async fn remove_the_leader_of_two_with(cut: bool, no_refusal: bool) {
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut nodes = start_cluster(dir.path(), 2, &links).await;
    let (leader, epoch) = wait_for_lease_holder(&nodes).await;
    let other = 1 - leader;
    let (leader_id, other_id) = (nodes[leader].id, nodes[other].id);
    let admin = nodes[leader].backend.admin();
    let admin = if no_refusal {
        admin.unsafe_allow_leader_removal()
    } else {
        admin
    };
    let mut admin = serve_admin(admin).await;
    let removal =
        tokio::spawn(async move { admin.remove(pb::RemoveRequest { node_id: leader_id }).await });
    wait_until(
        "the removal is refused or reaches the survivor's log",
        || removal.is_finished() || !nodes[other].backend.members().contains_key(&leader_id),
    )
    .await;
    let refused = if removal.is_finished() {
        removal.await.unwrap().err()
    } else {
        removal.abort();
        None
    };
    if let Some(refused) = refused {
        assert_eq!(
            refused.code(),
            tonic::Code::FailedPrecondition,
            "{refused:?}"
        );
        assert!(
            refused
                .message()
                .contains(&format!("tso admin transfer-leader {other_id}")),
            "the refusal names the way: {}",
            refused.message()
        );
        assert_eq!(
            nodes[leader].backend.members().len(),
            2,
            "nothing was removed"
        );
    } else {
        if cut {
            links.isolate(leader_id, [other_id]);
        }
        let (_, new_epoch) = wait_for_leader(&nodes, &[other], Epoch::ZERO).await;
        nodes[other]
            .backend
            .raise_high_water(1, new_epoch)
            .await
            .expect("the survivor commits alone");
        let now = Instant::now();
        if let Some(end) = nodes[leader].backend.lease_end_in(epoch) {
            assert!(
                end <= now,
                "node {other_id} leads (epoch {new_epoch}) and has committed, while node \
                 {leader_id}'s lease for epoch {epoch} runs {:?} more: two nodes grant",
                end - now
            );
        }
    }
    for node in &mut nodes {
        node.stop().await;
    }
}

/// Without the refusal, the pre-vote gate alone keeps the survivor from electing itself until
/// the old leader's lease is over: it campaigns only after `election_timeout_max` without
/// entries from a leader, and the old leader's lease, renewed only by acknowledgements from the
/// survivor, ends sooner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_refusal_the_pre_vote_gate_still_keeps_one_granting_node() {
    let _turn = crate::common::topic(module_path!());
    remove_the_leader_of_two_with(false, true).await;
    remove_the_leader_of_two_with(true, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_leader_of_two_voters_never_lets_two_nodes_grant() {
    let _turn = crate::common::topic(module_path!());
    remove_the_leader_of_two(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_leader_of_two_voters_with_the_old_leader_cut_off_never_lets_two_nodes_grant()
{
    let _turn = crate::common::topic(module_path!());
    remove_the_leader_of_two(true).await;
}

/// The documented way to remove the leader of two voters: transfer leadership, then remove the
/// old leader through the new one. The old leader gives up its lease before its successor can be
/// elected, and the survivor then serves alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_of_two_voters_is_removed_after_a_transfer() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut nodes = start_cluster(dir.path(), 2, &links).await;
    let (leader, epoch) = wait_for_lease_holder(&nodes).await;
    let other = 1 - leader;
    let (leader_id, other_id) = (nodes[leader].id, nodes[other].id);
    let mut admin = admin_client(&nodes[leader].backend).await;

    let not_a_voter = admin
        .transfer_leader(pb::TransferLeaderRequest { node_id: 9 })
        .await
        .expect_err("node 9 is no member");
    assert_eq!(not_a_voter.code(), tonic::Code::FailedPrecondition);
    let to_itself = admin
        .transfer_leader(pb::TransferLeaderRequest { node_id: leader_id })
        .await
        .expect("the leader already leads")
        .into_inner();
    assert!(!to_itself.changed);

    let moved = admin
        .transfer_leader(pb::TransferLeaderRequest { node_id: other_id })
        .await
        .expect("transfer to the other voter")
        .into_inner();
    assert!(moved.changed);
    assert_eq!(moved.members.unwrap().leader_id, Some(other_id));
    assert_eq!(
        nodes[leader].backend.lease_end_in(epoch),
        None,
        "the old leader gave its lease up for good"
    );
    let (_, new_epoch) = wait_for_leader(&nodes, &[other], epoch).await;

    // The old leader, now a follower, sends the removal on to the new leader.
    let not_leader = admin
        .remove(pb::RemoveRequest { node_id: leader_id })
        .await
        .expect_err("a follower makes no change");
    assert_eq!(not_leader.code(), tonic::Code::FailedPrecondition);
    assert_eq!(not_leader.message(), "not leader");
    let mut new_admin = admin_client(&nodes[other].backend).await;
    let removed = new_admin
        .remove(pb::RemoveRequest { node_id: leader_id })
        .await
        .expect("remove the old leader through the new one")
        .into_inner();
    assert!(removed.changed);
    let voters: Vec<u64> = removed
        .members
        .unwrap()
        .members
        .iter()
        .map(|m| m.node_id)
        .collect();
    assert_eq!(voters, vec![other_id]);
    let (_, epoch_now) = wait_for_leader(&nodes, &[other], Epoch::ZERO).await;
    assert!(epoch_now >= new_epoch);
    nodes[other]
        .backend
        .raise_high_water(10, epoch_now)
        .await
        .expect("the survivor commits alone");
    for node in &mut nodes {
        node.stop().await;
    }
}

/// A transfer that fails after the leader stopped granting (its chosen successor's raft is
/// down, though its peer port still answers) must not leave the cluster without a leader: the
/// old leader's raft would lead on without granting, its heartbeats holding every follower back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_transfer_leaves_a_cluster_that_elects_a_leader() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut nodes = start_cluster(dir.path(), 3, &links).await;
    // The leader's first writes (the members' identities) are in: nothing moves the log on.
    wait_until("the cluster has recorded its identity everywhere", || {
        nodes.iter().all(|n| n.backend.cluster_id().is_some())
    })
    .await;
    let (leader, epoch) = wait_for_lease_holder(&nodes).await;
    let target = (leader + 1) % 3;
    let third = (leader + 2) % 3;
    nodes[target].backend.shutdown().await;
    let mut admin = admin_client(&nodes[leader].backend).await;
    let failed = admin
        .transfer_leader(pb::TransferLeaderRequest {
            node_id: nodes[target].id,
        })
        .await
        .expect_err("the successor's raft is down");
    match failed.code() {
        // Usually it fails at the campaign, after this leader gave up its lease: another node
        // must be elected above its term (the old leader's raft must not lead on silently).
        tonic::Code::Unavailable => {
            let (now_leads, new_epoch) = wait_for_leader(&nodes, &[leader, third], epoch).await;
            nodes[now_leads]
                .backend
                .raise_high_water(5, new_epoch)
                .await
                .expect("the new leader commits");
        }
        // On a loaded machine an entry may land after the successor went down, and then the
        // transfer stops at the catch-up check before the leader gave anything up: it still
        // leads in its term, grants and commits.
        tonic::Code::FailedPrecondition => {
            assert!(failed.message().contains("still leads"), "{failed:?}");
            assert_eq!(nodes[leader].leadership(), Leadership::Leader { epoch });
            nodes[leader]
                .backend
                .raise_high_water(5, epoch)
                .await
                .expect("the leader that kept its lease commits");
        }
        other => panic!("unexpected {other:?}: {failed:?}"),
    }
    for node in &mut nodes {
        node.stop().await;
    }
}

/// A transfer whose successor cannot catch up fails before the leader gives anything up: it
/// answers FAILED_PRECONDITION ("still leads") and leads on in its term. The entry written after
/// the successor went down makes this path certain (on a loaded machine it happens by chance in
/// the test above, which then takes the same branch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_to_a_lagging_successor_fails_before_the_leader_gives_up_its_lease() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut nodes = start_cluster(dir.path(), 3, &links).await;
    let (leader, epoch) = wait_for_lease_holder(&nodes).await;
    let target = (leader + 1) % 3;
    nodes[target].backend.shutdown().await;
    nodes[leader]
        .backend
        .raise_high_water(7, epoch)
        .await
        .expect("two of three voters commit");
    let mut admin = admin_client(&nodes[leader].backend).await;
    let failed = admin
        .transfer_leader(pb::TransferLeaderRequest {
            node_id: nodes[target].id,
        })
        .await
        .expect_err("the successor lags");
    assert_eq!(failed.code(), tonic::Code::FailedPrecondition, "{failed:?}");
    assert!(failed.message().contains("still leads"), "{failed:?}");
    assert_eq!(nodes[leader].leadership(), Leadership::Leader { epoch });
    assert!(nodes[leader].backend.leader_lease_valid(epoch));
    nodes[leader]
        .backend
        .raise_high_water(9, epoch)
        .await
        .expect("the leader that kept its lease commits");
    for node in &mut nodes {
        node.stop().await;
    }
}
