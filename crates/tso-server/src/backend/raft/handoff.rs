//! Handing leadership to a chosen voter: on SIGTERM before a process exits
//! ([`super::RaftBackend::hand_off`]), and on an operator's `transfer-leader` (the admin
//! service), which is also the way to remove the leader of a two-voter cluster.
//!
//! openraft 0.9 has no transfer call, so: wait until openraft itself would give this leader's
//! vote away (`election_timeout_max` after it was elected), pick a voter whose replicated log
//! matches this leader's, give up the lease of this term for good (grants stop; the oracle steps
//! down and clients are sent to the successor), ask the successor to campaign, and wait until it
//! leads. This node's vote, now admitted by its vote gate, elects it in the next term.
//!
//! The checker's positive control (`RaftBackend::unsafe_handoff_keep_leader_lease`) hands off
//! without giving up the lease: only the vote gate is told, and this node grants on until the
//! lease ends by time while its successor already serves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tso_core::Epoch;

use super::RaftTimings;
use super::leader_lease::LeaderLease;
use super::leadership::{Handover, Stepdown};
use super::network::{CampaignRequest, Network};
use super::types::{NodeId, Raft};

/// How a handoff ended, when it did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoffOutcome {
    /// This node does not lead (or stopped leading meanwhile): nothing to hand on.
    NotLeader,
    /// This node is the only voter: there is no one to hand to.
    NoPeer,
    /// Node `to` leads in `term`; `took` runs from the moment this node stopped granting.
    HandedTo { to: u64, term: u64, took: Duration },
}

/// Why a handoff did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoffError {
    #[error("timed out {0}")]
    Deadline(&'static str),
    #[error("node {to} did not campaign: {reason}")]
    Refused { to: u64, reason: String },
    #[error("asked node {to} to campaign, but no new leader appeared in time")]
    NotElected { to: u64 },
    #[error("this node stopped leading term {term} before its successor was asked")]
    LostLeadership { term: u64 },
    #[error("node {0} is not a voter of this cluster")]
    NotAVoter(u64),
    #[error("raft stopped: {0}")]
    Stopped(String),
}

/// Past openraft's vote clock before asking for the leader's own vote: the clock refuses while
/// `now <= elected + election_timeout_max`, and ticks are not involved, so a few ms suffice.
const VOTE_CLOCK_SLACK: Duration = Duration::from_millis(5);

/// How many `election_timeout_max` a handing-off leader waits for its successor's election.
const ELECTION_WAIT_TIMEOUTS: u32 = 2;

/// What a handoff needs of its node; cheap to clone (the admin service holds one).
#[derive(Clone)]
pub(super) struct Handoff {
    pub(super) id: NodeId,
    pub(super) raft: Raft,
    pub(super) lease: Arc<LeaderLease>,
    pub(super) network: Network,
    /// Set when grants stop: this node no longer reports itself leader in that term.
    pub(super) handover: Arc<watch::Sender<Option<Handover>>>,
    pub(super) timings: RaftTimings,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: hand off without giving up the lease.
    pub(super) unsafe_keep_leader_lease: Arc<AtomicBool>,
}

impl Handoff {
    /// Hands this node's leadership to `to` (or, when `None`, the lowest-id voter that has this
    /// leader's whole log) by `deadline`. A follower, or a single voter, returns at once.
    pub(super) async fn run(
        &self,
        deadline: tokio::time::Instant,
        to: Option<NodeId>,
    ) -> Result<HandoffOutcome, HandoffError> {
        self.run_noting_stop(deadline, to, &mut None).await
    }

    /// [`Self::run`]; `stopped_in` is set to the term in which this node gave up its lease.
    async fn run_noting_stop(
        &self,
        deadline: tokio::time::Instant,
        to: Option<NodeId>,
        stopped_in: &mut Option<u64>,
    ) -> Result<HandoffOutcome, HandoffError> {
        let result = self.try_run(deadline, to, stopped_in).await;
        let kept_lease = self.unsafe_keep_leader_lease.load(Ordering::Relaxed);
        match &result {
            Ok(HandoffOutcome::HandedTo { to, term, took }) => {
                crate::metrics::raft_handoff(true);
                tracing::info!(
                    "handed leadership to node {to} in {} ms (term {term})",
                    took.as_millis()
                );
            }
            Ok(_) => {}
            Err(e) => {
                crate::metrics::raft_handoff(false);
                tracing::warn!("leadership handoff failed: {e}");
            }
        }
        if kept_lease && let Some(term) = *stopped_in {
            self.grant_until_the_kept_lease_ends(term, deadline).await;
        }
        result
    }

    /// [`Self::run`] for an operator's transfer, on a node that keeps running. When the
    /// handoff fails after this node gave up its lease, its raft still leads a term in which
    /// it never grants again, and its heartbeats keep every follower from campaigning (openraft
    /// ignores an election triggered on a leader). So it stops sending heartbeats until a later
    /// term begins: the followers' vote-refusal windows run out, one of them campaigns, and
    /// this node's vote (its gate admits it now) lets it win; a new fence follows.
    pub(super) async fn transfer(
        &self,
        deadline: tokio::time::Instant,
        to: NodeId,
    ) -> Result<HandoffOutcome, HandoffError> {
        let mut stopped_in = None;
        let result = self
            .run_noting_stop(deadline, Some(to), &mut stopped_in)
            .await;
        if result.is_err()
            && let Some(term) = stopped_in
        {
            tracing::warn!(
                "the transfer failed after this node stopped granting in term {term}; its \
                 heartbeats stop until a new leader is elected"
            );
            self.raft.runtime_config().heartbeat(false);
            let raft = self.raft.clone();
            tokio::spawn(async move {
                let mut metrics = raft.metrics();
                let _ = metrics
                    .wait_for(|m| m.current_term > term || m.running_state.is_err())
                    .await;
                raft.runtime_config().heartbeat(true);
            });
        }
        result
    }

    async fn try_run(
        &self,
        deadline: tokio::time::Instant,
        to: Option<NodeId>,
        stopped_in: &mut Option<u64>,
    ) -> Result<HandoffOutcome, HandoffError> {
        let (term, voters) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            if m.state != openraft::ServerState::Leader || m.current_leader != Some(self.id) {
                return Ok(HandoffOutcome::NotLeader);
            }
            let voters: Vec<NodeId> = m
                .membership_config
                .membership()
                .voter_ids()
                .filter(|id| *id != self.id)
                .collect();
            (m.current_term, voters)
        };
        let voters = match to {
            None => voters,
            Some(to) if voters.contains(&to) => vec![to],
            Some(to) => return Err(HandoffError::NotAVoter(to)),
        };
        if voters.is_empty() {
            return Ok(HandoffOutcome::NoPeer);
        }
        // openraft refuses votes until `election_timeout_max` after this leader was elected
        // (its vote clock is not refreshed while it leads): keep serving until then.
        let elected_at = self
            .raft_state(deadline, |st| st.vote_last_modified())
            .await?;
        if let Some(at) = elected_at {
            let votes_from = at + self.timings.election_timeout_max + VOTE_CLOCK_SLACK;
            if votes_from > deadline {
                return Err(HandoffError::Deadline(
                    "before this leader's raft would give its vote",
                ));
            }
            tokio::time::sleep_until(votes_from).await;
        }
        // A healthy follower is caught up within a heartbeat or two: one raft call's bound.
        let catch_up_by = deadline.min(tokio::time::Instant::now() + self.timings.call_timeout);
        let Some((target, _)) = self.wait_caught_up(term, &voters, catch_up_by).await? else {
            return Ok(HandoffOutcome::NotLeader);
        };
        let Some(addrs) = self.member_addrs(target) else {
            return Err(HandoffError::Refused {
                to: target,
                reason: "not in the membership".into(),
            });
        };
        tracing::info!("handing leadership to node {target}");
        // From here this node never grants in `term` again.
        let stopped_granting = Instant::now();
        *stopped_in = Some(term);
        if self.unsafe_keep_leader_lease.load(Ordering::Relaxed) {
            self.keep_lease(term);
        } else {
            self.lease.relinquish(term);
            self.handover
                .send_replace(Some(Handover::Stepdown(Stepdown {
                    term,
                    hint: Some(addrs.client_addr.clone()),
                })));
        }
        // A write that passed its epoch check just before may still be queued in raft: a
        // request through raft's queue runs after it, and then the successor must hold it too.
        match self.raft_state(deadline, |_| ()).await {
            Ok(()) => {}
            Err(HandoffError::Deadline(_)) => return Err(HandoffError::LostLeadership { term }),
            Err(e) => return Err(e),
        }
        let catch_up_by = deadline.min(tokio::time::Instant::now() + self.timings.call_timeout);
        let last_log_index = match self.wait_caught_up(term, &[target], catch_up_by).await {
            Ok(Some((_, last_log_index))) => last_log_index,
            Ok(None) => return Err(HandoffError::LostLeadership { term }),
            Err(HandoffError::Deadline(_)) => {
                return Err(HandoffError::Refused {
                    to: target,
                    reason: "it did not catch up with the last entries in time".into(),
                });
            }
            Err(e) => return Err(e),
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let request = CampaignRequest {
            term,
            leader_id: self.id,
            last_log_index,
        };
        self.network
            .campaign(
                target,
                &addrs.peer_addr,
                request,
                left.min(self.timings.call_timeout),
            )
            .await
            .map_err(|reason| HandoffError::Refused { to: target, reason })?;
        let mut metrics = self.raft.metrics();
        let id = self.id;
        // One vote round elects the successor; if none appears within two election timeouts
        // (it was stopping too, say), the cluster has to elect one as after a crash.
        let elected_by = deadline.min(
            tokio::time::Instant::now()
                + self.timings.election_timeout_max * ELECTION_WAIT_TIMEOUTS,
        );
        let elected = tokio::time::timeout_at(
            elected_by,
            metrics.wait_for(|m| {
                m.current_term > term && m.current_leader.is_some_and(|leader| leader != id)
            }),
        )
        .await;
        match elected {
            Err(_) => Err(HandoffError::NotElected { to: target }),
            Ok(Err(_)) => Err(HandoffError::Stopped("metrics closed".into())),
            Ok(Ok(m)) => Ok(HandoffOutcome::HandedTo {
                to: m.current_leader.unwrap_or(target),
                term: m.current_term,
                took: stopped_granting.elapsed(),
            }),
        }
    }

    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: the bug of a handoff that does not give up its
    /// lease of `term`. The vote gate is told the lease is given up (so this node's raft votes
    /// the successor in), but the lease is renewed as long as raft leads and grants go on under
    /// it: this node goes on reporting itself leader in `term` after its raft has moved on,
    /// until the lease ends by time. G3 broken on purpose.
    fn keep_lease(&self, term: u64) {
        self.lease.unsafe_keep_through_votes(term);
        self.handover
            .send_replace(Some(Handover::UnsafeStillLeading(Epoch::from_parts(
                term, self.id,
            ))));
    }

    /// The end of the control: this node keeps granting in `term` until its lease ends by time
    /// (or the shutdown's `deadline`), then reports raft's view again.
    async fn grant_until_the_kept_lease_ends(&self, term: u64, deadline: tokio::time::Instant) {
        if let Some(until) = self.lease.valid_until(term) {
            let left = until.saturating_duration_since(Instant::now());
            tracing::warn!(
                "UNSAFE: still granting in term {term} for {} ms, until the lease kept through \
                 the handoff ends",
                left.as_millis()
            );
            tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + left)).await;
        }
        self.handover.send_replace(None);
    }

    /// Runs `f` on raft's state inside raft's own task, bounded by `deadline` (a raft stuck on
    /// a slow fsync must not hold a shutdown past its grace).
    async fn raft_state<V: Send + 'static>(
        &self,
        deadline: tokio::time::Instant,
        f: impl FnOnce(
            &openraft::RaftState<NodeId, super::types::NodeAddrs, openraft::TokioInstant>,
        ) -> V
        + Send
        + 'static,
    ) -> Result<V, HandoffError> {
        match tokio::time::timeout_at(deadline, self.raft.with_raft_state(f)).await {
            Err(_) => Err(HandoffError::Deadline("waiting for raft's state")),
            Ok(Err(e)) => Err(HandoffError::Stopped(e.to_string())),
            Ok(Ok(v)) => Ok(v),
        }
    }

    fn member_addrs(&self, id: NodeId) -> Option<super::types::NodeAddrs> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&id)
            .cloned()
    }

    /// Waits until one of `candidates` (the lowest id first) has replicated this leader's whole
    /// log in `term`; returns it and the leader's last log index then. `None` if this node
    /// stopped leading in `term` meanwhile.
    async fn wait_caught_up(
        &self,
        term: u64,
        candidates: &[NodeId],
        deadline: tokio::time::Instant,
    ) -> Result<Option<(NodeId, Option<u64>)>, HandoffError> {
        let mut metrics = self.raft.metrics();
        loop {
            {
                let m = metrics.borrow_and_update();
                if m.running_state.is_err() {
                    return Err(HandoffError::Stopped("raft stopped".into()));
                }
                if m.current_term != term || m.state != openraft::ServerState::Leader {
                    return Ok(None);
                }
                let last = m.last_log_index;
                let caught_up = m.replication.as_ref().and_then(|replication| {
                    let mut ids = candidates.to_vec();
                    ids.sort_unstable();
                    ids.into_iter().find(|id| {
                        replication
                            .get(id)
                            .is_some_and(|matched| matched.map(|l| l.index) >= last)
                    })
                });
                if let Some(id) = caught_up {
                    return Ok(Some((id, last)));
                }
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Err(_) => {
                    return Err(HandoffError::Deadline(
                        "before a voter had replicated this leader's log",
                    ));
                }
                Ok(Err(_)) => return Err(HandoffError::Stopped("metrics closed".into())),
                Ok(Ok(())) => {}
            }
        }
    }
}
