//! The admin service (`tso.admin.v1`): the members of the raft cluster, changes to them at run
//! time (add a learner, promote it, remove a member), and moving leadership to a chosen voter
//! (`transfer-leader`, built on the SIGTERM handoff).
//!
//! Changes are leader-only (a follower answers "not leader" with the leader's admin address in
//! the `tso-admin-leader-bin` metadata), idempotent on the node id, and one at a time: a tokio
//! mutex is held across the whole change, both of openraft's joint and uniform steps. A change
//! that would leave the cluster unable to commit is refused before it is proposed: removing the
//! last voter, or a voter whose removal leaves fewer healthy voters than a majority of the rest
//! (healthy: the leader, and every voter that acknowledged a probe entry written just before).
//!
//! One more removal is refused: the leader's, when a single other voter would be left.
//! openraft lets the only voter of a configuration elect itself at once, on its next tick and
//! without waiting out any vote-refusal window, as soon as that configuration is in its log
//! (appended, not even committed), while this leader may still hold its lease: two nodes would
//! grant side by side. The operator moves leadership first (`TransferLeader`, the handoff of
//! `handoff.rs`), then removes the old leader through the new one.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, RaftMetrics, ServerState};
use prost::Message;
use tonic::{Code, Request, Response, Status};
use tso_proto::tso::admin_v1 as pb;
use tso_proto::tso::admin_v1::admin_server::{Admin, AdminServer};

use super::RaftTimings;
use super::handoff::{Handoff, HandoffError, HandoffOutcome};
use super::types::{Command, NodeAddrs, NodeId, Raft};

/// How long a change waits for the one before it to finish before it is refused (`ABORTED`).
/// A change is two log entries (joint, then uniform), each committed within one call timeout
/// when a quorum is up; 10 s covers a slow one and the promote catch-up wait below.
const CHANGE_QUEUE_WAIT: Duration = Duration::from_secs(10);

/// Bound on committing one membership change (both steps). Past it the answer is `UNAVAILABLE`;
/// the change may still commit later (`tso admin members` shows whether it did).
const CHANGE_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// A learner is promoted only when its log is at most this many entries behind the leader's.
/// Entries are written seconds apart (window extensions) or in small bursts (sequence and lease
/// writes), so a learner that keeps up is within a handful; 16 leaves room for a burst in flight.
pub const PROMOTE_LAG_ENTRIES_MAX: u64 = 16;

/// How long a promotion waits for the learner to come within [`PROMOTE_LAG_ENTRIES_MAX`] before
/// it is refused with the learner's lag (a snapshot install of our small state takes well
/// under this; a dead or unreachable learner never gets there).
const PROMOTE_CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// How long a removal waits for voters to acknowledge the probe entry before it judges who is
/// healthy. A live voter acknowledges within a heartbeat or two; 2 s is generous on a loaded
/// machine and bounds how long a refused removal takes.
const HEALTH_PROBE_WAIT: Duration = Duration::from_secs(2);

type Metrics = RaftMetrics<NodeId, NodeAddrs>;
type WriteError = RaftError<NodeId, ClientWriteError<NodeId, NodeAddrs>>;

/// The `tso.admin.v1.Admin` service of one raft node. Cheap to clone; clones share the change
/// lock of their node.
#[derive(Clone)]
pub struct AdminService {
    raft: Raft,
    id: NodeId,
    changes: Arc<tokio::sync::Mutex<()>>,
    timings: RaftTimings,
    handoff: Handoff,
    /// The positive control's hole: skip the refusal to leave one other voter alone.
    unsafe_allow_leader_removal: bool,
}

impl AdminService {
    pub(super) fn new(
        raft: Raft,
        id: NodeId,
        changes: Arc<tokio::sync::Mutex<()>>,
        timings: RaftTimings,
        handoff: Handoff,
    ) -> Self {
        Self {
            raft,
            id,
            changes,
            timings,
            handoff,
            unsafe_allow_leader_removal: false,
        }
    }

    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: removing the leader of a two-voter cluster is
    /// no longer refused, so the survivor elects itself while this leader still holds its lease
    /// and both grant. This breaks the oracle on purpose.
    pub fn unsafe_allow_leader_removal(mut self) -> Self {
        self.unsafe_allow_leader_removal = true;
        self
    }

    pub fn into_server(self) -> AdminServer<Self> {
        AdminServer::new(self)
    }

    fn metrics(&self) -> Metrics {
        self.raft.metrics().borrow().clone()
    }

    /// Takes the change lock, waiting a bounded time for a change under way, and checks that
    /// this node leads.
    async fn begin_change(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, Status> {
        let guard = tokio::time::timeout(CHANGE_QUEUE_WAIT, self.changes.lock())
            .await
            .map_err(|_| {
                Status::aborted(format!(
                    "another membership change has been under way for over {CHANGE_QUEUE_WAIT:?}; \
                     retry when it is done"
                ))
            })?;
        let m = self.metrics();
        if !(m.state == ServerState::Leader && m.current_leader == Some(self.id)) {
            return Err(not_leader(&m, m.current_leader));
        }
        Ok(guard)
    }

    /// Proposes `change` and waits (bounded) until it commits.
    async fn commit_change(
        &self,
        change: ChangeMembers<NodeId, NodeAddrs>,
        retain: bool,
    ) -> Result<(), Status> {
        let write = self.raft.change_membership(change, retain);
        match tokio::time::timeout(CHANGE_COMMIT_TIMEOUT, write).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.write_status(e)),
            Err(_) => Err(Status::unavailable(format!(
                "the change did not commit within {CHANGE_COMMIT_TIMEOUT:?} (is a quorum up?); \
                 it may still commit: check with `tso admin members`"
            ))),
        }
    }

    fn write_status(&self, e: WriteError) -> Status {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                not_leader(&self.metrics(), f.leader_id)
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => match c {
                ChangeMembershipError::InProgress(p) => Status::aborted(format!(
                    "an earlier membership change is not committed yet ({p}); retry shortly"
                )),
                other => Status::failed_precondition(other.to_string()),
            },
            RaftError::Fatal(f) => Status::internal(format!("raft stopped: {f}")),
        }
    }

    /// Waits until `learner` is within [`PROMOTE_LAG_ENTRIES_MAX`] of the leader's log, or
    /// refuses with how far behind it is.
    async fn wait_caught_up(&self, learner: NodeId) -> Result<(), Status> {
        let mut rx = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + PROMOTE_CATCH_UP_WAIT;
        loop {
            let lag = lag_of(&rx.borrow_and_update(), learner);
            match lag {
                Some(lag) if lag <= PROMOTE_LAG_ENTRIES_MAX => return Ok(()),
                _ if tokio::time::Instant::now() >= deadline => {
                    return Err(Status::failed_precondition(match lag {
                        Some(lag) => format!(
                            "learner {learner} is {lag} entries behind the leader (at most \
                             {PROMOTE_LAG_ENTRIES_MAX} allowed); retry when it has caught up"
                        ),
                        None => format!(
                            "learner {learner} has not acknowledged any entry yet: is it running \
                             (`tso serve --join`) and reachable at its peer address?"
                        ),
                    }));
                }
                _ => {}
            }
            let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
        }
    }

    /// Refuses the removal of voter `target` unless the voters left after it have a healthy
    /// majority: the leader, and those that acknowledge a probe entry written now.
    async fn check_removal_keeps_quorum(&self, target: NodeId) -> Result<(), Status> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let last_config = membership
            .get_joint_config()
            .last()
            .cloned()
            .unwrap_or_default();
        let remaining: BTreeSet<NodeId> =
            last_config.into_iter().filter(|id| *id != target).collect();
        if remaining.is_empty() {
            return Err(Status::failed_precondition(format!(
                "node {target} is the last voter: removing it would leave no quorum; add and \
                 promote another node first"
            )));
        }
        if let Some(refusal) = one_other_voter_left(self.id, target, &remaining)
            && !self.unsafe_allow_leader_removal
        {
            return Err(refusal);
        }
        let probe = Command::AdvanceHighWater { at_least_ms: 0 };
        let probe_index =
            match tokio::time::timeout(self.timings.call_timeout, self.raft.client_write(probe))
                .await
            {
                Ok(Ok(reply)) => reply.log_id.index,
                Ok(Err(e)) => return Err(self.write_status(e)),
                Err(_) => {
                    return Err(Status::unavailable(format!(
                        "the leader cannot commit within {:?} (no quorum?); no change made",
                        self.timings.call_timeout
                    )));
                }
            };
        let majority = remaining.len() / 2 + 1;
        let mut rx = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + HEALTH_PROBE_WAIT;
        loop {
            let healthy = healthy_voters(&rx.borrow_and_update(), &remaining, probe_index);
            if healthy.len() >= majority {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::failed_precondition(format!(
                    "removing voter {target} would leave voters {remaining:?}, of which only \
                     {healthy:?} are healthy (need {majority}): bring a voter back up first"
                )));
            }
            let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
        }
    }
}

/// Bound on a leadership transfer: the old leader's vote clock (up to `election_timeout_max`),
/// the successor's catch-up (a call timeout) and its election (two election timeouts) fit well
/// inside it with the default timings.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);

/// The refusal of a removal that would leave `remaining` = one voter other than `leader`: that
/// voter would elect itself at once while the leader may still hold its lease.
fn one_other_voter_left(
    leader: NodeId,
    target: NodeId,
    remaining: &BTreeSet<NodeId>,
) -> Option<Status> {
    let [only] = remaining.iter().copied().collect::<Vec<_>>()[..] else {
        return None;
    };
    (only != leader).then(|| {
        Status::failed_precondition(format!(
            "removing voter {target} would leave node {only} as the only voter, and an only voter \
             elects itself at once, while this leader (node {leader}) may still hold its lease: \
             two nodes would grant timestamps side by side. Move leadership first with \
             `tso admin transfer-leader {only}`, then remove node {target} through node {only}"
        ))
    })
}

/// How many entries `learner` is behind the leader's last log entry; `None` while the leader
/// knows of no entry on it.
fn lag_of(m: &Metrics, learner: NodeId) -> Option<u64> {
    let matched = m.replication.as_ref()?.get(&learner)?.as_ref()?.index;
    Some(m.last_log_index.unwrap_or(0).saturating_sub(matched))
}

/// The members of `voters` that are the leader itself or have `index` in their log.
fn healthy_voters(m: &Metrics, voters: &BTreeSet<NodeId>, index: u64) -> BTreeSet<NodeId> {
    voters
        .iter()
        .copied()
        .filter(|id| {
            *id == m.id
                || m.replication
                    .as_ref()
                    .and_then(|r| r.get(id))
                    .and_then(|l| l.as_ref())
                    .is_some_and(|l| l.index >= index)
        })
        .collect()
}

/// "not leader", with the leader's id and admin address (if known) in the admin hint metadata.
fn not_leader(m: &Metrics, leader: Option<NodeId>) -> Status {
    let leader = leader.filter(|l| *l != m.id);
    let admin_addr = leader
        .and_then(|l| m.membership_config.membership().get_node(&l).cloned())
        .map(|n| n.admin_addr)
        .filter(|a| !a.is_empty());
    let hint = pb::AdminLeaderHint {
        leader_id: leader,
        leader_admin_addr: admin_addr,
    };
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert_bin(
        tso_proto::ADMIN_LEADER_HINT_KEY,
        tonic::metadata::MetadataValue::from_bytes(&hint.encode_to_vec()),
    );
    Status::with_metadata(Code::FailedPrecondition, "not leader", metadata)
}

/// The members as `m` shows them.
fn members_of(m: &Metrics) -> pb::ListMembersResponse {
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let leads = m.state == ServerState::Leader;
    let nodes: BTreeMap<NodeId, NodeAddrs> =
        membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
    let members = nodes
        .into_iter()
        .map(|(id, n)| pb::Member {
            node_id: id,
            role: if voters.contains(&id) {
                pb::Role::Voter
            } else {
                pb::Role::Learner
            } as i32,
            client_addr: n.client_addr,
            peer_addr: n.peer_addr,
            admin_addr: n.admin_addr,
            matched_index: leads
                .then(|| m.replication.as_ref()?.get(&id)?.map(|l| l.index))
                .flatten(),
        })
        .collect();
    // A leader removed by a change keeps its vote (so openraft still names it) but has
    // stepped down: it leads nothing.
    let leader_id = m.current_leader.filter(|l| *l != m.id || leads);
    pb::ListMembersResponse {
        members,
        leader_id,
        term: m.current_term,
        node_id: m.id,
        joint: membership.get_joint_config().len() > 1,
        last_log_index: m.last_log_index,
    }
}

fn changed(service: &AdminService, changed: bool) -> Response<pb::ChangeResponse> {
    Response::new(pb::ChangeResponse {
        changed,
        members: Some(members_of(&service.metrics())),
    })
}

/// A `host:port` address, as a member's entry must carry.
fn check_addr(kind: &str, addr: &str, required: bool) -> Result<(), Status> {
    if addr.is_empty() && !required {
        return Ok(());
    }
    let ok = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if ok && !addr.contains('/') {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "the {kind} address {addr:?} is not host:port"
    )))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_members(
        &self,
        _: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        Ok(Response::new(members_of(&self.metrics())))
    }

    async fn add_learner(
        &self,
        request: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let r = request.into_inner();
        check_addr("client", &r.client_addr, true)?;
        check_addr("peer", &r.peer_addr, true)?;
        check_addr("admin", &r.admin_addr, false)?;
        let addrs = NodeAddrs {
            client_addr: r.client_addr,
            peer_addr: r.peer_addr,
            admin_addr: r.admin_addr,
        };
        let _guard = self.begin_change().await?;
        let m = self.metrics();
        if let Some(existing) = m.membership_config.membership().get_node(&r.node_id) {
            if *existing == addrs {
                return Ok(changed(self, false));
            }
            return Err(Status::failed_precondition(format!(
                "node {} is already a member with other addresses (client {}, peer {}, admin {:?}); \
                 remove it first, or use another id",
                r.node_id, existing.client_addr, existing.peer_addr, existing.admin_addr
            )));
        }
        let mut nodes = BTreeMap::new();
        nodes.insert(r.node_id, addrs);
        self.commit_change(ChangeMembers::AddNodes(nodes), true)
            .await?;
        tracing::info!(node_id = r.node_id, "added a learner");
        Ok(changed(self, true))
    }

    async fn promote(
        &self,
        request: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let id = request.into_inner().node_id;
        let _guard = self.begin_change().await?;
        let m = self.metrics();
        let membership = m.membership_config.membership();
        if membership.voter_ids().any(|v| v == id) {
            return Ok(changed(self, false));
        }
        if membership.get_node(&id).is_none() {
            return Err(Status::failed_precondition(format!(
                "node {id} is not a learner of this cluster: add it first with add-learner"
            )));
        }
        self.wait_caught_up(id).await?;
        let ids: BTreeSet<NodeId> = [id].into_iter().collect();
        self.commit_change(ChangeMembers::AddVoterIds(ids), true)
            .await?;
        tracing::info!(node_id = id, "promoted a learner to voter");
        Ok(changed(self, true))
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let id = request.into_inner().node_id;
        let _guard = self.begin_change().await?;
        let m = self.metrics();
        let membership = m.membership_config.membership();
        if membership.get_node(&id).is_none() {
            return Ok(changed(self, false));
        }
        let ids: BTreeSet<NodeId> = [id].into_iter().collect();
        let change = if membership.voter_ids().any(|v| v == id) {
            self.check_removal_keeps_quorum(id).await?;
            ChangeMembers::RemoveVoters(ids)
        } else {
            ChangeMembers::RemoveNodes(ids)
        };
        self.commit_change(change, false).await?;
        tracing::info!(node_id = id, "removed a member");
        Ok(changed(self, true))
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let id = request.into_inner().node_id;
        let _guard = self.begin_change().await?;
        if id == self.id {
            return Ok(changed(self, false));
        }
        let m = self.metrics();
        if !m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == id)
        {
            return Err(Status::failed_precondition(format!(
                "node {id} is not a voter of this cluster: only a voter can lead"
            )));
        }
        let deadline = tokio::time::Instant::now() + TRANSFER_TIMEOUT;
        match self.handoff.transfer(deadline, id).await {
            Ok(HandoffOutcome::HandedTo { to, term, took }) if to == id => {
                tracing::info!(node_id = id, term, "transferred leadership in {took:?}");
                Ok(changed(self, true))
            }
            Ok(HandoffOutcome::HandedTo { to, .. }) => Err(Status::aborted(format!(
                "node {to} was elected instead of node {id}; retry the transfer on node {to}"
            ))),
            Ok(HandoffOutcome::NotLeader | HandoffOutcome::NoPeer) => {
                let m = self.metrics();
                Err(not_leader(&m, m.current_leader))
            }
            Err(e @ HandoffError::NotAVoter(_)) => Err(Status::failed_precondition(e.to_string())),
            Err(e @ HandoffError::Deadline(_)) => Err(Status::failed_precondition(format!(
                "node {id} did not catch up with the leader's log in time ({e}); this node still \
                 leads: check that node {id} runs and is reachable, then retry"
            ))),
            Err(e) => Err(Status::unavailable(format!(
                "the transfer to node {id} failed ({e}); this node stopped granting and the \
                 cluster elects a leader within an election timeout: `tso admin members` shows \
                 who leads"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_removal_that_leaves_one_other_voter_is_refused() {
        let set = |ids: &[u64]| ids.iter().copied().collect::<BTreeSet<_>>();
        let refused = one_other_voter_left(1, 1, &set(&[2])).expect("refused");
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert!(
            refused.message().contains("tso admin transfer-leader 2"),
            "{}",
            refused.message()
        );
        assert!(
            one_other_voter_left(1, 2, &set(&[1])).is_none(),
            "the leader stays alone"
        );
        assert!(
            one_other_voter_left(1, 1, &set(&[2, 3])).is_none(),
            "two voters are left"
        );
        assert!(one_other_voter_left(1, 3, &set(&[1, 2])).is_none());
    }

    #[test]
    fn addresses_must_be_host_port() {
        assert!(check_addr("client", "127.0.0.1:7001", true).is_ok());
        assert!(check_addr("client", "tso-4.tso:7001", true).is_ok());
        assert!(check_addr("admin", "", false).is_ok());
        for bad in [
            "",
            "host",
            "host:",
            ":7001",
            "host:port",
            "h:1/2",
            "h:70000",
        ] {
            let err = check_addr("client", bad, true).expect_err(bad);
            assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        }
    }
}
