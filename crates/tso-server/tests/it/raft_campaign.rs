//! A `Campaign` (the handoff's request that a follower campaign at once) names the process of
//! the leader that sent it. openraft restores a restarted leader into its own term, so the
//! term alone cannot tell a `Campaign` sent by an earlier start of the leader (replayed, or
//! delayed past the restart) from a current one: the follower compares the sender's process
//! with the one whose entries it last accepted, and refuses another.

use crate::common;

use common::raft::client_addr;
use common::raft::{start_cluster, test_timings, wait_for_follower_of, wait_for_lease_holder};
use tso_proto::tso::raft_v1::RaftMessage;
use tso_proto::tso::raft_v1::raft_peer_client::RaftPeerClient;
use tso_server::backend::Leadership;
use tso_server::backend::raft::Links;

/// A Campaign as the leader `leader_id` sends it in `term` (postcard: two varints and an
/// optional varint), from the process `process` of that leader.
fn campaign(
    term: u64,
    leader_id: u64,
    last_log_index: Option<u64>,
    process: u64,
) -> tonic::Request<RaftMessage> {
    let payload = postcard::to_stdvec(&(term, leader_id, last_log_index)).unwrap();
    let mut request = tonic::Request::new(RaftMessage { payload });
    let md = request.metadata_mut();
    md.insert(
        "tso-raft-timings",
        test_timings().cluster_key().parse().unwrap(),
    );
    md.insert("tso-node", leader_id.to_string().parse().unwrap());
    md.insert("tso-process", format!("{process:016x}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_from_another_start_of_the_leader_is_refused() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut nodes = start_cluster(dir.path(), 3, &links).await;
    let (leader, epoch) = wait_for_lease_holder(&nodes).await;
    let follower = (leader + 1) % 3;
    wait_for_follower_of(&nodes[follower], &client_addr(nodes[leader].id)).await;
    let mut peer = RaftPeerClient::connect(format!("http://{}", nodes[follower].peer_addr))
        .await
        .unwrap();
    let last = nodes[follower].backend.last_log_index();
    // Whatever the leader's current process is, this one is another (a replay from an earlier
    // start): 64 random bits make a collision with the current one practically impossible.
    let stale_process = rand::random::<u64>();
    let refused = peer
        .campaign(campaign(epoch.hi(), nodes[leader].id, last, stale_process))
        .await
        .expect_err("a Campaign from another process of the leader");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("earlier start"), "{refused:?}");
    assert_eq!(
        nodes[leader].leadership(),
        Leadership::Leader { epoch },
        "the leader keeps its epoch"
    );
    for node in &mut nodes {
        node.stop().await;
    }
}
