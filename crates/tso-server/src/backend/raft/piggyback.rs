//! Piggyback mode: the oracle's high-water carried in a host's own openraft log.
//!
//! A service that already runs openraft 0.9 (features `serde`, `storage-v2`) embeds the oracle
//! with three pieces:
//!
//! - [`HighWaterCommand`]: the oracle's one command; the host wraps it in its own app-data
//!   enum (e.g. `enum Cmd { Put { .. }, HighWater(HighWaterCommand) }`);
//! - [`HighWaterState`]: the state the host embeds in its state machine, applied as `max`,
//!   serialized with the rest of the host's snapshot;
//! - [`PiggybackConsensus`]: the adapter from the host's `openraft::Raft<C>` to the consensus
//!   seam, to hand to [`crate::OracleGuard::start`].
//!
//! Stamping leases are opt-in the same way ([`LeaseCommand`], [`LeaseState`],
//! [`PiggybackConsensus::with_leases`]). Dense sequences (`GetSeq`) are opt-in: a host that
//! also carries [`SequenceCommand`] in its log and a [`SequenceState`] in its state machine
//! enables them with [`PiggybackConsensus::with_sequences`]; without it they answer
//! `UNIMPLEMENTED`.
//!
//! Leadership, epochs, error classes and the leader lease are those of the standalone raft
//! backend, through the same adapter (`seam.rs`): epoch `(term, leader id)`, `ForwardToLeader`
//! → `NotLeader` naming the leader's oracle client address, fatal errors → `Permanent`, quorum
//! loss and timeouts → `Transient`. The three states apply the merge rules of
//! [`crate::consensus::OracleState::apply`].

use std::sync::Arc;
use std::time::Duration;

use openraft::impls::OneshotResponder;
use openraft::{RaftTypeConfig, TokioRuntime};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tso_core::Epoch;

pub use super::leadership::{LeaseHeld, VoteGate};
use super::leadership::{leadership_with, renew_lease, watch_leadership};
use super::lease::{LeaseClock, lease_duration};
use super::seam::{Record, Seam};
use super::{LeaseView, RaftTimings};
use crate::consensus::state::{merge_high_water, merge_leases, merge_sequences};
use crate::consensus::{
    BoxFuture, Consensus, ConsensusError, Leadership, OracleCommand, OracleState, Part,
    SeqCounters, SeqEnds,
};

/// The oracle's command in a host's log: raise the high-water to at least `at_least_ms`.
///
/// Apply it with [`HighWaterState::apply`]; apply it on every node, in log order, like any
/// other entry of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HighWaterCommand {
    /// The high-water to reach, in milliseconds since the Unix epoch.
    pub at_least_ms: u64,
    /// The raft term of the leader that proposed it (for diagnostics; applying ignores it).
    pub term: u64,
}

/// The oracle's state inside a host's state machine: the high-water, applied as `max`.
///
/// Serialize it with the rest of the host's state into each snapshot, and restore it from the
/// snapshot on install. It never decreases whatever the order or repetition of commands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HighWaterState {
    high_water_ms: u64,
}

impl HighWaterState {
    /// Applies one command and returns the high-water after it.
    pub fn apply(&mut self, cmd: &HighWaterCommand) -> u64 {
        merge_high_water(&mut self.high_water_ms, cmd.at_least_ms);
        self.high_water_ms
    }

    /// The applied high-water, in milliseconds (0 when nothing was ever applied).
    pub fn high_water_ms(&self) -> u64 {
        self.high_water_ms
    }
}

/// The oracle's dense-sequence command in a host's log: raise each key's counter to at least
/// its end (one group commit of the leader). Apply it with [`SequenceState::apply`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SequenceCommand {
    /// `(key, end)` pairs with distinct keys.
    pub ends: Vec<(String, u64)>,
    /// The raft term of the leader that proposed it (for diagnostics; applying ignores it).
    pub term: u64,
}

/// The oracle's dense-sequence counters inside a host's state machine, applied as `max` per
/// key; snapshot and restore it with the rest of the host's state, like [`HighWaterState`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SequenceState {
    counters: SeqCounters,
}

impl SequenceState {
    /// Applies one command.
    pub fn apply(&mut self, cmd: &SequenceCommand) {
        merge_sequences(&mut self.counters, &cmd.ends);
    }

    /// Each key's next unissued value (keys never advanced are absent).
    pub fn counters(&self) -> &SeqCounters {
        &self.counters
    }
}

/// The oracle's stamping-lease command in a host's log: replace the lease record with one
/// computed by the leader of `term`. Apply it with [`LeaseState::apply`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseCommand {
    /// The raft term of the leader that wrote it: a record of an older term never replaces
    /// one of a newer term.
    pub term: u64,
    /// The lease set, encoded by the oracle (opaque to the host).
    pub record: Vec<u8>,
}

/// The oracle's stamping-lease record inside a host's state machine; snapshot and restore it
/// with the rest of the host's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseState {
    term: u64,
    record: Vec<u8>,
}

impl LeaseState {
    /// Applies one command: replaces the record unless the stored one is of a later term.
    pub fn apply(&mut self, cmd: &LeaseCommand) {
        merge_leases((&mut self.term, &mut self.record), cmd.term, &cmd.record);
    }

    /// The term of the record and the record.
    pub fn get(&self) -> (u64, &[u8]) {
        (self.term, &self.record)
    }
}

/// Turns the oracle's lease command into the host's app data (`C::D`).
pub type WrapLeaseCommand<C> = Arc<dyn Fn(LeaseCommand) -> <C as RaftTypeConfig>::D + Send + Sync>;

/// Reads the applied [`LeaseState`] (term and record) from the host's state machine.
pub type ReadLeases = Arc<dyn Fn() -> (u64, Vec<u8>) + Send + Sync>;

/// Turns the oracle's dense-sequence command into the host's app data (`C::D`).
pub type WrapSequenceCommand<C> =
    Arc<dyn Fn(SequenceCommand) -> <C as RaftTypeConfig>::D + Send + Sync>;

/// Reads the counters applied on this node from the host's state machine.
pub type ReadSequences = Arc<dyn Fn() -> SeqCounters + Send + Sync>;

/// Turns the oracle's command into the host's app data (`C::D`).
pub type WrapCommand<C> = Arc<dyn Fn(HighWaterCommand) -> <C as RaftTypeConfig>::D + Send + Sync>;

/// Reads the high-water applied on this node from the host's state machine.
pub type ReadHighWater = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Names the oracle client address (`host:port`) of a member, from its id and its membership
/// entry (`C::Node`); `None` when unknown. Followers put it in their "not leader" hints.
pub type ClientAddrOf<C> =
    Arc<dyn Fn(u64, &<C as RaftTypeConfig>::Node) -> Option<String> + Send + Sync>;

/// The consensus seam on a host's own openraft node.
///
/// Built with [`PiggybackConsensus::new`] inside a tokio runtime (it starts two tasks: the
/// leadership watch and the lease renewal; dropping the adapter stops them). The host keeps
/// owning its raft: the adapter never shuts it down, and when the host's raft stops the
/// leadership watch closes, which stops the oracle.
///
/// For the oracle's guarantees to hold, the host must (see `docs/raft.md`, "What a host must
/// do"): pass every vote request its node receives through [`Self::vote_gate`], and give the
/// oracle's commands the same durability as its own entries.
pub struct PiggybackConsensus<C: RaftTypeConfig> {
    seam: Seam<C, HostRecord<C>>,
    tasks: Vec<JoinHandle<()>>,
}

/// The oracle's record as a host keeps it: one command and one state per part, the high-water
/// always, sequences and leases when the host enables them.
struct HostRecord<C: RaftTypeConfig> {
    high_water: (WrapCommand<C>, ReadHighWater),
    sequences: Option<(WrapSequenceCommand<C>, ReadSequences)>,
    leases: Option<(WrapLeaseCommand<C>, ReadLeases)>,
}

impl<C: RaftTypeConfig> Record<C> for HostRecord<C> {
    fn keeps(&self, part: Part) -> bool {
        match part {
            Part::HighWater => true,
            Part::Sequences => self.sequences.is_some(),
            Part::Leases => self.leases.is_some(),
        }
    }

    fn wrap(&self, cmd: OracleCommand, term: u64) -> C::D {
        const KEPT: &str = "the seam wraps only a part the host keeps";
        match cmd {
            OracleCommand::AdvanceHighWater { at_least_ms } => {
                (self.high_water.0)(HighWaterCommand { at_least_ms, term })
            }
            OracleCommand::AdvanceSequences { ends } => {
                (self.sequences.as_ref().expect(KEPT).0)(SequenceCommand { ends, term })
            }
            OracleCommand::ReplaceLeases { term, record } => {
                (self.leases.as_ref().expect(KEPT).0)(LeaseCommand { term, record })
            }
        }
    }

    fn read(&self, part: Part) -> OracleState {
        let mut state = OracleState::default();
        match part {
            Part::HighWater => state.high_water_ms = (self.high_water.1)(),
            Part::Sequences => {
                if let Some((_, read)) = &self.sequences {
                    state.sequences = read();
                }
            }
            Part::Leases => {
                if let Some((_, read)) = &self.leases {
                    (state.lease_term, state.leases) = read();
                }
            }
        }
        state
    }
}

impl<C> PiggybackConsensus<C>
where
    C: RaftTypeConfig<NodeId = u64, AsyncRuntime = TokioRuntime, Responder = OneshotResponder<C>>,
{
    /// Adapts `raft`. `wrap` wraps the oracle's command into the host's app data; `read` reads
    /// the applied [`HighWaterState::high_water_ms`] from the host's state machine (it must see
    /// an entry's effect once openraft has applied it); `client_addr` names a member's oracle
    /// client address. Timings come from `raft.config()`; calls are bounded by one second (see
    /// [`Self::with_call_timeout`]).
    pub fn new(
        raft: openraft::Raft<C>,
        wrap: impl Fn(HighWaterCommand) -> C::D + Send + Sync + 'static,
        read: impl Fn() -> u64 + Send + Sync + 'static,
        client_addr: impl Fn(u64, &C::Node) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        let config = raft.config();
        let timings = RaftTimings {
            heartbeat_interval: Duration::from_millis(config.heartbeat_interval),
            election_timeout_min: Duration::from_millis(config.election_timeout_min),
            election_timeout_max: Duration::from_millis(config.election_timeout_max),
            call_timeout: RaftTimings::default().call_timeout,
        };
        let client_addr: ClientAddrOf<C> = Arc::new(client_addr);
        let metrics = raft.metrics();
        let initial = leadership_with(&metrics.borrow(), &*client_addr);
        let (tx, leadership) = watch::channel(initial);
        let lease = Arc::new(LeaseClock::new(lease_duration(
            timings.election_timeout_max,
        )));
        let tasks = vec![
            tokio::spawn(watch_leadership(
                metrics,
                tx,
                client_addr.clone(),
                watch::channel(None).1,
                watch::channel(false).1,
            )),
            tokio::spawn(renew_lease(
                raft.clone(),
                leadership.clone(),
                lease.clone(),
                timings,
            )),
        ];
        let record = HostRecord {
            high_water: (Arc::new(wrap), Arc::new(read)),
            sequences: None,
            leases: None,
        };
        let seam = Seam {
            raft,
            record,
            client_addr,
            leadership,
            handover: watch::channel(None).1,
            lease,
            timings,
        };
        Self { seam, tasks }
    }

    /// Bounds each write and read barrier by `call_timeout` (default one second); past it the
    /// call fails as `Transient`.
    pub fn with_call_timeout(mut self, call_timeout: Duration) -> Self {
        self.seam.timings.call_timeout = call_timeout;
        self
    }

    /// Enables dense sequences: `wrap` wraps a [`SequenceCommand`] into the host's app data,
    /// `read` reads the applied [`SequenceState::counters`] (it must see an entry's effect once
    /// openraft has applied it). The host's snapshots must carry the [`SequenceState`].
    pub fn with_sequences(
        mut self,
        wrap: impl Fn(SequenceCommand) -> C::D + Send + Sync + 'static,
        read: impl Fn() -> SeqCounters + Send + Sync + 'static,
    ) -> Self {
        self.seam.record.sequences = Some((Arc::new(wrap), Arc::new(read)));
        self
    }

    /// Enables stamping leases: `wrap` wraps a [`LeaseCommand`] into the host's app data,
    /// `read` reads the applied [`LeaseState`] as `(term, record)`. The host's snapshots must
    /// carry the [`LeaseState`].
    pub fn with_leases(
        mut self,
        wrap: impl Fn(LeaseCommand) -> C::D + Send + Sync + 'static,
        read: impl Fn() -> (u64, Vec<u8>) + Send + Sync + 'static,
    ) -> Self {
        self.seam.record.leases = Some((Arc::new(wrap), Arc::new(read)));
        self
    }

    /// The gate every vote request this node receives must pass before it reaches the host's
    /// raft: it refuses while this node holds an unexpired leader lease. A host's
    /// `RaftNetwork::vote` target calls `gate.vote(&raft, request)` instead of
    /// `raft.vote(request)` and reports `Err(LeaseHeld)` to the candidate as a failed call.
    pub fn vote_gate(&self) -> VoteGate {
        VoteGate::new(self.seam.lease.clone())
    }

    /// The leader lease of this node (see [`super::RaftBackend::lease_view`]).
    pub fn lease_view(&self) -> LeaseView {
        self.seam.lease_view()
    }

    /// The high-water applied on this node (possibly stale on a follower; for diagnostics).
    pub fn applied_high_water_ms(&self) -> u64 {
        (self.seam.record.high_water.1)()
    }
}

impl<C: RaftTypeConfig> Drop for PiggybackConsensus<C> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl<C> Consensus for PiggybackConsensus<C>
where
    C: RaftTypeConfig<NodeId = u64, AsyncRuntime = TokioRuntime, Responder = OneshotResponder<C>>,
{
    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.seam.leadership.clone()
    }

    fn load_high_water(&self) -> BoxFuture<'_, Result<u64, ConsensusError>> {
        Box::pin(self.seam.load_high_water())
    }

    fn persist_high_water(
        &self,
        at_least_ms: u64,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<u64, ConsensusError>> {
        Box::pin(self.seam.persist_high_water(at_least_ms, epoch))
    }

    fn lease_valid(&self, epoch: Epoch) -> bool {
        self.seam.lease_valid(epoch)
    }

    fn sequences_supported(&self) -> bool {
        self.seam.record.keeps(Part::Sequences)
    }

    fn load_sequences(&self) -> BoxFuture<'_, Result<SeqCounters, ConsensusError>> {
        Box::pin(self.seam.load_sequences())
    }

    fn persist_sequences(
        &self,
        ends: SeqEnds,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<(), ConsensusError>> {
        Box::pin(self.seam.persist_sequences(ends, epoch))
    }

    fn leases_supported(&self) -> bool {
        self.seam.record.keeps(Part::Leases)
    }

    fn load_leases(&self) -> BoxFuture<'_, Result<Vec<u8>, ConsensusError>> {
        Box::pin(self.seam.load_leases())
    }

    fn persist_leases(
        &self,
        record: Vec<u8>,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<(), ConsensusError>> {
        Box::pin(self.seam.persist_leases(record, epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn high_water_state_applies_as_max_and_round_trips() {
        let mut s = HighWaterState::default();
        assert_eq!(s.high_water_ms(), 0);
        assert_eq!(
            s.apply(&HighWaterCommand {
                at_least_ms: 10,
                term: 1
            }),
            10
        );
        assert_eq!(
            s.apply(&HighWaterCommand {
                at_least_ms: 5,
                term: 2
            }),
            10
        );
        let bytes = postcard::to_stdvec(&s).unwrap();
        let back: HighWaterState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back.high_water_ms(), 10);
    }
}
