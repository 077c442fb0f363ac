//! Leadership from openraft's metrics, and the task that keeps the leader lease fresh.
//!
//! Invariant: the published leadership never names an epoch lower than one published before;
//! the watch closes when raft stops.

use std::sync::Arc;
use std::time::Instant;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;
use openraft::raft::{VoteRequest, VoteResponse};
use openraft::{RaftMetrics, ServerState};
use tokio::sync::watch;
use tso_core::Epoch;

use super::RaftTimings;
use super::leader_lease::LeaderLease;
use super::types::{NodeAddrs, NodeId};
use crate::backend::{BackendError, Leadership};

/// The client address of a tso cluster member: the one its membership entry carries.
pub fn tso_client_addr(_id: NodeId, node: &NodeAddrs) -> Option<String> {
    Some(node.client_addr.clone())
}

/// Names a member's oracle client address from its id and membership entry.
pub type ClientAddrFn<N> = Arc<dyn Fn(NodeId, &N) -> Option<String> + Send + Sync>;

/// What this node knows of leadership, from one metrics snapshot.
pub fn leadership_of(m: &RaftMetrics<NodeId, NodeAddrs>) -> Leadership {
    leadership_with(m, &tso_client_addr)
}

/// [`leadership_of`] for any node type: `client_addr` names the oracle client address of a
/// member (from its membership entry or elsewhere), `None` when unknown.
pub fn leadership_with<N: openraft::Node>(
    m: &RaftMetrics<NodeId, N>,
    client_addr: &(dyn Fn(NodeId, &N) -> Option<String> + Send + Sync),
) -> Leadership {
    if m.running_state.is_err() {
        return Leadership::Unknown;
    }
    match m.current_leader {
        Some(leader) if leader == m.id && m.state == ServerState::Leader => Leadership::Leader {
            epoch: Epoch::from_parts(m.current_term, m.id),
        },
        Some(leader) if leader != m.id => Leadership::Follower {
            leader_endpoint: m
                .membership_config
                .membership()
                .get_node(&leader)
                .and_then(|n| client_addr(leader, n)),
            leader_epoch: Some(Epoch::from_parts(m.current_term, leader)),
        },
        _ => Leadership::Unknown,
    }
}

/// Refuses a persist under `epoch` unless `current` is this node leading in exactly that epoch:
/// another epoch of this node is Fenced, a follower or an unknown leader is NotLeader.
pub fn check_epoch(current: Leadership, epoch: Epoch) -> Result<(), BackendError> {
    match current {
        Leadership::Leader { epoch: current } if current == epoch => Ok(()),
        Leadership::Leader { epoch: current } => Err(BackendError::Fenced {
            expected: epoch,
            current,
        }),
        Leadership::Follower {
            leader_endpoint,
            leader_epoch,
        } => Err(BackendError::NotLeader {
            leader_endpoint,
            leader_epoch,
        }),
        Leadership::Unknown => Err(BackendError::NotLeader {
            leader_endpoint: None,
            leader_epoch: None,
        }),
    }
}

fn epoch_of(l: &Leadership) -> Option<Epoch> {
    match l {
        Leadership::Leader { epoch } => Some(*epoch),
        Leadership::Follower { leader_epoch, .. } => *leader_epoch,
        Leadership::Unknown => None,
    }
}

/// A leader handing its leadership on (`RaftBackend::hand_off`): in `term` and below this node
/// no longer reports itself leader, but a follower hinting at `hint` (the chosen successor's
/// client address), so the oracle steps down and clients go straight to the successor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stepdown {
    pub term: u64,
    pub hint: Option<String>,
}

/// What a handoff makes this node publish in place of raft's view of its own leadership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handover {
    /// Grants stopped for good in the term: see [`Stepdown`].
    Stepdown(Stepdown),
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: this node goes on reporting itself leader in
    /// this epoch whatever raft says (it may have voted its successor in already), so it grants
    /// for as long as its lease of that term is valid. G3 broken on purpose.
    UnsafeStillLeading(Epoch),
}

/// `next` as published while `handover` holds: under a [`Stepdown`], a leadership of its term
/// or below becomes a follower hinting at the successor (no epoch: the successor is not
/// elected yet).
pub fn stepped_down(next: Leadership, handover: Option<&Handover>) -> Leadership {
    match (next, handover) {
        (Leadership::Leader { epoch }, Some(Handover::Stepdown(s))) if epoch.hi() <= s.term => {
            Leadership::Follower {
                leader_endpoint: s.hint.clone(),
                leader_epoch: None,
            }
        }
        (_, Some(Handover::UnsafeStillLeading(epoch))) => Leadership::Leader { epoch: *epoch },
        (next, _) => next,
    }
}

/// Mirrors openraft's metrics into the leadership watch until raft stops; then the watch closes.
/// Epochs never go back: a state naming an older epoch than one already published is `Unknown`.
/// A [`Handover`] on `handover` overrides this node's own leadership (see [`stepped_down`]). While
/// `leader_silent` holds, a follower reports no leader: it has not heard from the one openraft
/// still names for an election timeout (with the pre-vote gate, a follower cut off from a dead
/// leader does not campaign, so openraft would go on naming it).
pub async fn watch_leadership<N: openraft::Node>(
    mut metrics: watch::Receiver<RaftMetrics<NodeId, N>>,
    tx: watch::Sender<Leadership>,
    client_addr: ClientAddrFn<N>,
    mut handover: watch::Receiver<Option<Handover>>,
    mut leader_silent: watch::Receiver<bool>,
) {
    let mut highest: Option<Epoch> = None;
    let mut handover_open = true;
    let mut silent_open = true;
    let mut gauges = crate::metrics::RaftGauges::default();
    loop {
        let (next, stopped, term) = {
            let m = metrics.borrow_and_update();
            gauges.update(&m);
            (
                leadership_with(&m, &*client_addr),
                m.running_state.is_err(),
                m.current_term,
            )
        };
        let mut next = stepped_down(next, handover.borrow_and_update().as_ref());
        if *leader_silent.borrow_and_update() && matches!(next, Leadership::Follower { .. }) {
            next = Leadership::Unknown;
        }
        match (epoch_of(&next), highest) {
            (Some(e), Some(h)) if e < h => next = Leadership::Unknown,
            (Some(e), _) => highest = Some(e),
            (None, _) => {}
        }
        let leads = matches!(next, Leadership::Leader { .. });
        let changed = tx.send_if_modified(|current| {
            let changed = *current != next;
            *current = next;
            changed
        });
        if changed {
            crate::metrics::raft_leadership(term, leads);
        }
        if stopped {
            return;
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() {
                return;
            },
            changed = handover.changed(), if handover_open => if changed.is_err() {
                handover_open = false;
            },
            changed = leader_silent.changed(), if silent_open => if changed.is_err() {
                silent_open = false;
            },
        }
    }
}

/// While this node leads, confirms leadership with a quorum every heartbeat interval and
/// extends the lease from the instant read *before* each confirmation was sent.
pub async fn renew_leader_lease<C>(
    raft: openraft::Raft<C>,
    mut leadership: watch::Receiver<Leadership>,
    lease: Arc<LeaderLease>,
    timings: RaftTimings,
) where
    C: openraft::RaftTypeConfig<NodeId = NodeId>,
{
    loop {
        let epoch = match *leadership.borrow_and_update() {
            Leadership::Leader { epoch } => Some(epoch),
            _ => None,
        };
        let Some(epoch) = epoch else {
            if leadership.changed().await.is_err() {
                return;
            }
            continue;
        };
        let sent = Instant::now();
        let confirm = tokio::time::timeout(timings.call_timeout, raft.get_read_log_id()).await;
        let term_after = raft.metrics().borrow().current_term;
        let confirmed = matches!(confirm, Ok(Ok(_))) && term_after == epoch.hi();
        if confirmed {
            lease.extend(epoch.hi(), sent);
        }
        crate::metrics::leader_lease_renewal(confirmed);
        tokio::time::sleep(timings.heartbeat_interval).await;
    }
}

/// A node's peer vote handler: hands a vote request to raft only while this node holds no
/// unexpired lease, and keeps its lease from being extended while the vote is decided.
///
/// openraft 0.9 refreshes a node's vote-refusal clock whenever it hears from a leader, but a
/// leader's own clock is set once, when it is elected: after `election_timeout_max` in office
/// its raft votes for any higher-term candidate with an up-to-date log. The leader counts itself
/// in the quorum that renews its lease, so that vote would let a candidate win while the old
/// leader still grants. Every vote request a node receives must pass through this gate.
#[derive(Debug, Clone)]
pub struct VoteGate {
    lease: Arc<LeaderLease>,
}

/// A vote request refused because this node holds a leader lease that has not ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this node holds the leader lease of term {term} for another {remaining:?}; not voting")]
pub struct LeaderLeaseHeld {
    pub term: u64,
    pub remaining: std::time::Duration,
}

/// Ends a vote admitted by the gate, even if the task handling it is torn down: the vote term
/// stays the request's (the vote may have been given) unless raft's answer says otherwise.
struct VoteInFlight {
    lease: Arc<LeaderLease>,
    vote_term: u64,
}

impl Drop for VoteInFlight {
    fn drop(&mut self) {
        self.lease.end_vote(self.vote_term);
    }
}

impl VoteGate {
    pub(super) fn new(lease: Arc<LeaderLease>) -> Self {
        Self { lease }
    }

    /// Handles one peer vote request on `raft`: `Err(LeaderLeaseHeld)` if refused here, else raft's
    /// answer. The request is decided in its own task, so a caller that goes away (a cancelled
    /// RPC) cannot leave lease extensions suspended.
    pub async fn vote<C>(
        &self,
        raft: &openraft::Raft<C>,
        req: VoteRequest<NodeId>,
    ) -> Result<Result<VoteResponse<NodeId>, RaftError<NodeId>>, LeaderLeaseHeld>
    where
        C: openraft::RaftTypeConfig<NodeId = NodeId, AsyncRuntime = openraft::TokioRuntime>,
    {
        let now = Instant::now();
        self.lease.begin_vote(now).map_err(|held| LeaderLeaseHeld {
            term: held.term,
            remaining: held.valid_until - now,
        })?;
        let mut in_flight = VoteInFlight {
            lease: self.lease.clone(),
            vote_term: req.vote.leader_id.term,
        };
        let raft = raft.clone();
        let decided = tokio::spawn(async move {
            let answer = raft.vote(req).await;
            if let Ok(resp) = &answer {
                in_flight.vote_term = resp.vote.leader_id.term;
            }
            drop(in_flight);
            answer
        });
        match decided.await {
            Ok(answer) => Ok(answer),
            Err(e) => {
                tracing::error!("a vote task failed: {e}");
                Ok(Err(RaftError::Fatal(openraft::error::Fatal::Panicked)))
            }
        }
    }
}

/// The fence's read (SEMANTICS §13): a read barrier that confirms leadership with a quorum,
/// then a wait until the state machine has applied everything in this leader's log, so the
/// value reflects every write committed before it, even on a leader that restarted into its
/// own term (whose read point may already be covered by its snapshot while later committed
/// entries are not applied yet). Each successful barrier extends the lease. A quorum that does
/// not answer in time is retried within `call_timeout`; past it, `Transient`.
pub async fn read_applied<C, T>(
    raft: &openraft::Raft<C>,
    lease: &LeaderLease,
    timings: &RaftTimings,
    map_read_error: impl Fn(RaftError<NodeId, CheckIsLeaderError<NodeId, C::Node>>) -> BackendError,
    read: impl Fn() -> T,
) -> Result<T, BackendError>
where
    C: openraft::RaftTypeConfig<NodeId = NodeId, AsyncRuntime = openraft::TokioRuntime>,
{
    let deadline = tokio::time::Instant::now() + timings.call_timeout;
    let timeout = || transient_timeout("read barrier", timings.call_timeout);
    loop {
        let term = raft.metrics().borrow().current_term;
        let sent = Instant::now();
        let error = match tokio::time::timeout_at(deadline, raft.ensure_linearizable()).await {
            Err(_) => return Err(timeout()),
            Ok(Ok(_)) => {
                lease.extend(term, sent);
                let last = raft.metrics().borrow().last_log_index;
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                return match raft
                    .wait(Some(left))
                    .applied_index_at_least(last, "fence read")
                    .await
                {
                    Ok(_) => Ok(read()),
                    Err(openraft::metrics::WaitError::Timeout(..)) => Err(timeout()),
                    Err(e) => Err(BackendError::Permanent(format!("raft stopped: {e}"))),
                };
            }
            Ok(Err(e)) => map_read_error(e),
        };
        let retry_at = tokio::time::Instant::now() + timings.heartbeat_interval;
        if !matches!(error, BackendError::Transient(_)) || retry_at >= deadline {
            return Err(error);
        }
        tokio::time::sleep_until(retry_at).await;
    }
}

/// Writes `data` through `raft`, bounded by the call timeout, and requires it to commit in the
/// term of `epoch` (`Fenced` otherwise); a commit in that term confirms leadership as of the
/// instant the write was sent, so the lease is extended from then.
pub async fn write_in_term<C>(
    raft: &openraft::Raft<C>,
    lease: &LeaderLease,
    timings: &RaftTimings,
    epoch: Epoch,
    data: C::D,
    map_write_error: impl Fn(RaftError<NodeId, ClientWriteError<NodeId, C::Node>>) -> BackendError,
) -> Result<ClientWriteResponse<C>, BackendError>
where
    C: openraft::RaftTypeConfig<
            NodeId = NodeId,
            AsyncRuntime = openraft::TokioRuntime,
            Responder = openraft::impls::OneshotResponder<C>,
        >,
{
    let sent = Instant::now();
    let write = raft.client_write(data);
    let reply = match tokio::time::timeout(timings.call_timeout, write).await {
        Err(_) => return Err(transient_timeout("write", timings.call_timeout)),
        Ok(r) => r.map_err(map_write_error)?,
    };
    let committed_term = reply.log_id.leader_id.term;
    if committed_term != epoch.hi() {
        let current = Epoch::from_parts(committed_term, reply.log_id.leader_id.node_id);
        return Err(BackendError::Fenced {
            expected: epoch,
            current,
        });
    }
    lease.extend(committed_term, sent);
    Ok(reply)
}

/// A raft call that a quorum did not confirm in time.
pub fn transient_timeout(what: &str, after: std::time::Duration) -> BackendError {
    BackendError::Transient(format!(
        "raft {what} not confirmed by a quorum within {after:?}; retry"
    ))
}
