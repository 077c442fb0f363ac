//! Leadership from openraft's metrics, and the task that keeps the leader lease fresh.
//!
//! Invariant: the published leadership never names an epoch lower than one published before;
//! the watch closes when raft stops.

use std::sync::Arc;
use std::time::Instant;

use openraft::{RaftMetrics, ServerState};
use tokio::sync::watch;
use tso_core::Epoch;

use super::RaftTimings;
use super::lease::LeaseClock;
use super::types::{NodeAddrs, NodeId};
use crate::consensus::{ConsensusError, Leadership};

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
pub fn check_epoch(current: Leadership, epoch: Epoch) -> Result<(), ConsensusError> {
    match current {
        Leadership::Leader { epoch: current } if current == epoch => Ok(()),
        Leadership::Leader { epoch: current } => Err(ConsensusError::Fenced {
            expected: epoch,
            current,
        }),
        Leadership::Follower {
            leader_endpoint,
            leader_epoch,
        } => Err(ConsensusError::NotLeader {
            leader_endpoint,
            leader_epoch,
        }),
        Leadership::Unknown => Err(ConsensusError::NotLeader {
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

/// Mirrors openraft's metrics into the leadership watch until raft stops; then the watch closes.
/// Epochs never go back: a state naming an older epoch than one already published is `Unknown`.
pub async fn watch_leadership<N: openraft::Node>(
    mut metrics: watch::Receiver<RaftMetrics<NodeId, N>>,
    tx: watch::Sender<Leadership>,
    client_addr: ClientAddrFn<N>,
) {
    let mut highest: Option<Epoch> = None;
    loop {
        let (mut next, stopped, term) = {
            let m = metrics.borrow_and_update();
            (
                leadership_with(&m, &*client_addr),
                m.running_state.is_err(),
                m.current_term,
            )
        };
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
        if stopped || metrics.changed().await.is_err() {
            return;
        }
    }
}

/// While this node leads, confirms leadership with a quorum every heartbeat interval and
/// extends the lease from the instant read *before* each confirmation was sent.
pub async fn renew_lease<C>(
    raft: openraft::Raft<C>,
    mut leadership: watch::Receiver<Leadership>,
    lease: Arc<LeaseClock>,
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
        crate::metrics::raft_lease_renewal(confirmed);
        tokio::time::sleep(timings.heartbeat_interval).await;
    }
}

/// Keeps a restarted node from campaigning for `quiet` (its `election_timeout_max`).
///
/// Before a crash this node may have acknowledged the leader at some instant `r`, helping it to
/// a lease until `r + election_timeout_max`. openraft forgets `r` on restart and would let the
/// node campaign at once, voting for itself: with a peer whose own lease has expired that makes
/// a quorum while the old leader still grants. Waiting out `quiet` after the restart (which is
/// after `r`) closes that; the peer service refuses incoming votes for the same span.
pub fn hold_elections<C>(raft: &openraft::Raft<C>, quiet: std::time::Duration)
where
    C: openraft::RaftTypeConfig,
{
    raft.runtime_config().elect(false);
    let raft = raft.clone();
    tokio::spawn(async move {
        tokio::time::sleep(quiet).await;
        raft.runtime_config().elect(true);
    });
}
