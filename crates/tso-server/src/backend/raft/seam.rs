//! The consensus seam on any openraft node, written once: the standalone raft backend and
//! piggyback mode both delegate to a [`Seam`], generic over the raft's type configuration.
//!
//! A seam holds what the two share: the raft handle, the leader lease, the leadership watch
//! (with the handoff's override of it), the timings, the error classes, the epoch check, and
//! each part's load and persist. What differs sits in a [`Record`]: how an [`OracleCommand`]
//! becomes the raft's app data, and how the record applied on this node is read.
//!
//! Invariant: a persist answers `Ok` only once its command committed in the caller's term and
//! the applied record includes it ([`OracleState::includes`]).

use std::sync::Arc;

use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};
use openraft::impls::OneshotResponder;
use openraft::{RaftTypeConfig, TokioRuntime};
use tokio::sync::watch;
use tso_core::{Epoch, PHYSICAL_MAX_MS};

use super::leadership::{ClientAddrFn, Handover, read_applied, stepped_down, write_in_term};
use super::lease::LeaseClock;
use super::{LeaseView, RaftTimings};
use crate::consensus::{
    ConsensusError, Leadership, OracleCommand, OracleState, Part, SeqCounters, SeqEnds,
};

/// Where a raft's state machine keeps the oracle's record.
pub(super) trait Record<C: RaftTypeConfig>: Send + Sync + 'static {
    /// Whether the state machine keeps `part` (a piggyback host may leave sequences or leases
    /// out; the seam refuses those calls as `Permanent` before anything is written).
    fn keeps(&self, part: Part) -> bool;

    /// `cmd` as the raft's app data; `term` is the proposing leader's. Called only for a part
    /// the record keeps.
    fn wrap(&self, cmd: OracleCommand, term: u64) -> C::D;

    /// The record applied on this node, with at least `part` filled in; it must show an entry's
    /// effect once openraft has applied the entry.
    fn read(&self, part: Part) -> OracleState;

    /// Whether the record applied on this node includes `cmd` (checked after each write).
    fn includes(&self, cmd: &OracleCommand) -> Result<(), ConsensusError> {
        self.read(cmd.part()).includes(cmd)
    }
}

/// The consensus seam on one node of `openraft::Raft<C>`.
pub(super) struct Seam<C: RaftTypeConfig, R> {
    pub raft: openraft::Raft<C>,
    pub record: R,
    /// Names a member's oracle client address, for "not leader" hints.
    pub client_addr: ClientAddrFn<C::Node>,
    pub leadership: watch::Receiver<Leadership>,
    /// A handoff's override of this node's own leadership (never set in piggyback mode).
    pub handover: watch::Receiver<Option<Handover>>,
    pub lease: Arc<LeaseClock>,
    pub timings: RaftTimings,
}

impl<C, R> Seam<C, R>
where
    C: RaftTypeConfig<NodeId = u64, AsyncRuntime = TokioRuntime, Responder = OneshotResponder<C>>,
    R: Record<C>,
{
    /// The leader lease of this node, as a cheap view.
    pub fn lease_view(&self) -> LeaseView {
        LeaseView {
            clock: Arc::clone(&self.lease),
            leadership: self.leadership.clone(),
        }
    }

    /// Whether this node may still grant under `epoch` (its leader lease of that term holds).
    pub fn lease_valid(&self, epoch: Epoch) -> bool {
        self.lease.is_valid(epoch.hi())
    }

    pub async fn load_high_water(&self) -> Result<u64, ConsensusError> {
        self.load(Part::HighWater, |s| s.high_water_ms).await
    }

    pub async fn persist_high_water(
        &self,
        at_least_ms: u64,
        epoch: Epoch,
    ) -> Result<u64, ConsensusError> {
        if at_least_ms > PHYSICAL_MAX_MS {
            return Err(ConsensusError::Permanent(format!(
                "high-water {at_least_ms} ms is past the 46-bit timestamp layout ({PHYSICAL_MAX_MS} ms)"
            )));
        }
        self.persist(OracleCommand::AdvanceHighWater { at_least_ms }, epoch)
            .await?;
        Ok(self.record.read(Part::HighWater).high_water_ms)
    }

    pub async fn load_sequences(&self) -> Result<SeqCounters, ConsensusError> {
        self.load(Part::Sequences, |s| s.sequences).await
    }

    pub async fn persist_sequences(
        &self,
        ends: SeqEnds,
        epoch: Epoch,
    ) -> Result<(), ConsensusError> {
        self.persist(OracleCommand::AdvanceSequences { ends }, epoch)
            .await
    }

    pub async fn load_leases(&self) -> Result<Vec<u8>, ConsensusError> {
        self.load(Part::Leases, |s| s.leases).await
    }

    pub async fn persist_leases(
        &self,
        record: Vec<u8>,
        epoch: Epoch,
    ) -> Result<(), ConsensusError> {
        let term = epoch.hi();
        self.persist(OracleCommand::ReplaceLeases { term, record }, epoch)
            .await
    }

    /// The fence's read of `part` (see [`read_applied`]).
    async fn load<T>(
        &self,
        part: Part,
        get: impl Fn(OracleState) -> T,
    ) -> Result<T, ConsensusError> {
        self.kept(part)?;
        let map = |e| self.map_read_error(e);
        read_applied(&self.raft, &self.lease, &self.timings, map, || {
            get(self.record.read(part))
        })
        .await
    }

    /// Commits `cmd` in the term of `epoch` (see [`write_in_term`]), then checks that the
    /// applied record includes it: openraft answers a write once the entry is applied.
    async fn persist(&self, cmd: OracleCommand, epoch: Epoch) -> Result<(), ConsensusError> {
        self.kept(cmd.part())?;
        self.check_epoch(epoch)?;
        let data = self.record.wrap(cmd.clone(), epoch.hi());
        let map = |e| self.map_write_error(e);
        write_in_term(&self.raft, &self.lease, &self.timings, epoch, data, map).await?;
        self.record.includes(&cmd)
    }

    fn kept(&self, part: Part) -> Result<(), ConsensusError> {
        if self.record.keeps(part) {
            return Ok(());
        }
        Err(ConsensusError::Permanent(format!(
            "{part} are not enabled by the host"
        )))
    }

    /// Refuses a persist under any epoch but this node's current leader epoch (as published,
    /// with a handoff's stepdown applied).
    fn check_epoch(&self, epoch: Epoch) -> Result<(), ConsensusError> {
        let current = self.leadership.borrow().clone();
        let current = stepped_down(current, self.handover.borrow().as_ref());
        super::leadership::check_epoch(current, epoch)
    }

    fn not_leader(&self, forward: &ForwardToLeader<u64, C::Node>) -> ConsensusError {
        let term = self.raft.metrics().borrow().current_term;
        let endpoint = match (forward.leader_id, forward.leader_node.as_ref()) {
            (Some(id), Some(node)) => (self.client_addr)(id, node),
            _ => None,
        };
        ConsensusError::NotLeader {
            leader_endpoint: endpoint,
            leader_epoch: forward.leader_id.map(|id| Epoch::from_parts(term, id)),
        }
    }

    fn map_read_error(
        &self,
        e: RaftError<u64, CheckIsLeaderError<u64, C::Node>>,
    ) -> ConsensusError {
        match e {
            RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)) => self.not_leader(&f),
            RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)) => {
                ConsensusError::Transient(format!("read barrier: {q}"))
            }
            RaftError::Fatal(f) => ConsensusError::Permanent(format!("raft stopped: {f}")),
        }
    }

    fn map_write_error(&self, e: RaftError<u64, ClientWriteError<u64, C::Node>>) -> ConsensusError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => self.not_leader(&f),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
                ConsensusError::Permanent(format!("unexpected membership error: {c}"))
            }
            RaftError::Fatal(f) => ConsensusError::Permanent(format!("raft stopped: {f}")),
        }
    }
}
