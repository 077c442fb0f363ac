//! The backend seam on any openraft node, written once: the standalone raft backend and
//! piggyback mode both delegate to a [`Seam`], generic over the raft's type configuration.
//!
//! A seam holds what the two share: the raft handle, the leader lease, the leadership watch
//! (with the handoff's override of it), the timings, the error classes, the epoch check, the
//! load and the apply. What differs sits in a [`Record`]: how an [`OracleCommand`] becomes the
//! raft's app data, and where the state applied on this node is.
//!
//! Invariant: an apply answers `Ok` only once its command committed in the caller's term and
//! the applied state includes it ([`OracleState::includes`]).

use std::sync::Arc;

use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use openraft::impls::OneshotResponder;
use openraft::{RaftTypeConfig, TokioRuntime};
use tokio::sync::watch;
use tso_core::Epoch;

use super::leader_lease::LeaderLease;
use super::leadership::{ClientAddrFn, Handover, read_applied, stepped_down, write_in_term};
use super::{LeaderLeaseView, RaftTimings};
use crate::backend::{BackendError, Leadership, OracleCommand, OracleState, Stored};

/// Where a raft's state machine keeps the oracle's record.
pub(super) trait Record<C: RaftTypeConfig>: Send + Sync + 'static {
    /// `cmd` as the raft's app data.
    fn wrap(&self, cmd: OracleCommand) -> C::D;

    /// Calls `f` with the state applied on this node, in place (no copy of the whole record on
    /// the write path). It must show an entry's effect once openraft has applied the entry.
    fn with_state<T>(&self, f: impl FnOnce(&OracleState) -> T) -> T;
}

/// The backend seam on one node of `openraft::Raft<C>`.
pub(super) struct Seam<C: RaftTypeConfig, R> {
    pub raft: openraft::Raft<C>,
    pub record: R,
    /// Names a member's oracle client address, for "not leader" hints.
    pub client_addr: ClientAddrFn<C::Node>,
    pub leadership: watch::Receiver<Leadership>,
    /// A handoff's override of this node's own leadership (never set in piggyback mode).
    pub handover: watch::Receiver<Option<Handover>>,
    pub leader_lease: Arc<LeaderLease>,
    pub timings: RaftTimings,
}

impl<C, R> Seam<C, R>
where
    C: RaftTypeConfig<NodeId = u64, AsyncRuntime = TokioRuntime, Responder = OneshotResponder<C>>,
    R: Record<C>,
{
    /// The leader lease of this node, as a cheap view.
    pub fn leader_lease_view(&self) -> LeaderLeaseView {
        LeaderLeaseView {
            clock: Arc::clone(&self.leader_lease),
            leadership: self.leadership.clone(),
        }
    }

    /// Whether this node may still grant under `epoch` (its leader lease of that term holds).
    pub fn leader_lease_valid(&self, epoch: Epoch) -> bool {
        self.leader_lease.is_valid(epoch.hi())
    }

    /// The whole state, as of a read barrier (see [`read_applied`]).
    pub async fn load(&self) -> Result<OracleState, BackendError> {
        let map = |e| self.map_read_error(e);
        read_applied(&self.raft, &self.leader_lease, &self.timings, map, || {
            self.record.with_state(OracleState::clone)
        })
        .await
    }

    /// Commits `cmd` in the term of `epoch` (see [`write_in_term`]), then checks that the
    /// applied state includes it: openraft answers a write once the entry is applied.
    pub async fn apply(&self, cmd: OracleCommand, epoch: Epoch) -> Result<Stored, BackendError> {
        cmd.check(epoch)?;
        self.check_epoch(epoch)?;
        let data = self.record.wrap(cmd.clone());
        let map = |e| self.map_write_error(e);
        write_in_term(
            &self.raft,
            &self.leader_lease,
            &self.timings,
            epoch,
            data,
            map,
        )
        .await?;
        self.record.with_state(|state| {
            state.includes(&cmd).map(|()| Stored {
                high_water_ms: state.high_water_ms,
            })
        })
    }

    /// Refuses an apply under any epoch but this node's current leader epoch (as published,
    /// with a handoff's stepdown applied).
    fn check_epoch(&self, epoch: Epoch) -> Result<(), BackendError> {
        let current = self.leadership.borrow().clone();
        let current = stepped_down(current, self.handover.borrow().as_ref());
        super::leadership::check_epoch(current, epoch)
    }

    fn not_leader(&self, forward: &ForwardToLeader<u64, C::Node>) -> BackendError {
        let term = self.raft.metrics().borrow().current_term;
        let endpoint = match (forward.leader_id, forward.leader_node.as_ref()) {
            (Some(id), Some(node)) => (self.client_addr)(id, node),
            _ => None,
        };
        BackendError::NotLeader {
            leader_endpoint: endpoint,
            leader_epoch: forward.leader_id.map(|id| Epoch::from_parts(term, id)),
        }
    }

    fn map_read_error(&self, e: RaftError<u64, CheckIsLeaderError<u64, C::Node>>) -> BackendError {
        match e {
            RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => self.not_leader(&f),
            RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
                BackendError::Transient(format!("read barrier: {q}"))
            }
            RaftError::Fatal(f) => BackendError::Permanent(format!("raft stopped: {f}")),
        }
    }

    fn map_write_error(&self, e: RaftError<u64, ClientWriteError<u64, C::Node>>) -> BackendError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => self.not_leader(&f),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
                BackendError::Permanent(format!("unexpected membership error: {c}"))
            }
            RaftError::Fatal(f) => BackendError::Permanent(format!("raft stopped: {f}")),
        }
    }
}
