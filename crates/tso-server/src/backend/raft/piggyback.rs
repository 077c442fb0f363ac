//! Piggyback mode: the oracle's record carried in a host's own openraft log.
//!
//! A service that already runs openraft 0.9 (features `serde`, `storage-v2`) embeds the oracle
//! with three pieces:
//!
//! - [`OracleCommand`]: the oracle's one command; the host wraps it in its own app-data enum
//!   (e.g. `enum Cmd { Put { .. }, Oracle(OracleCommand) }`) and applies it on every node, in
//!   log order, with [`OracleState::apply`];
//! - [`OracleState`]: the state the host embeds in its state machine (the high-water, the
//!   dense-sequence counters and the stamping-lease set), serialized with the rest of the
//!   host's snapshot;
//! - [`PiggybackBackend`]: the adapter from the host's `openraft::Raft<C>` to the backend
//!   seam, to hand to [`crate::OracleGuard::start`]. Every oracle RPC is served: timestamps,
//!   dense sequences and stamping leases.
//!
//! Leadership, epochs, error classes and the leader lease are those of the standalone raft
//! backend, through the same adapter (`seam.rs`): epoch `(term, leader id)`, `ForwardToLeader`
//! → `NotLeader` naming the leader's oracle client address, fatal errors → `Permanent`, quorum
//! loss and timeouts → `Transient`.

use std::sync::Arc;
use std::time::Duration;

use openraft::impls::OneshotResponder;
use openraft::{RaftTypeConfig, TokioRuntime};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tso_core::Epoch;

use super::leader_lease::{LeaderLease, leader_lease_duration};
pub use super::leadership::{LeaderLeaseHeld, VoteGate};
use super::leadership::{leadership_with, renew_leader_lease, watch_leadership};
use super::seam::{Record, Seam};
use super::{LeaderLeaseView, RaftTimings};
use crate::backend::{Backend, BackendError, BoxFuture, Leadership, Stored};
pub use crate::backend::{OracleCommand, OracleState};

/// Turns the oracle's command into the host's app data (`C::D`).
pub type WrapCommand<C> = Arc<dyn Fn(OracleCommand) -> <C as RaftTypeConfig>::D + Send + Sync>;

/// Calls its argument once with the [`OracleState`] applied on this node's state machine.
pub type ReadState = Arc<dyn Fn(&mut dyn FnMut(&OracleState)) + Send + Sync>;

/// Names the oracle client address (`host:port`) of a member, from its id and its membership
/// entry (`C::Node`); `None` when unknown. Followers put it in their "not leader" hints.
pub type ClientAddrOf<C> =
    Arc<dyn Fn(u64, &<C as RaftTypeConfig>::Node) -> Option<String> + Send + Sync>;

/// The backend seam on a host's own openraft node.
///
/// Built with [`PiggybackBackend::new`] inside a tokio runtime (it starts two tasks: the
/// leadership watch and the lease renewal; dropping the adapter stops them). The host keeps
/// owning its raft: the adapter never shuts it down, and when the host's raft stops the
/// leadership watch closes, which stops the oracle.
///
/// For the oracle's guarantees to hold, the host must (see `docs/raft.md`, "What a host must
/// do"): pass every vote request its node receives through [`Self::vote_gate`], and give the
/// oracle's commands the same durability as its own entries.
pub struct PiggybackBackend<C: RaftTypeConfig> {
    seam: Seam<C, HostRecord<C>>,
    tasks: Vec<JoinHandle<()>>,
}

/// The oracle's record as a host keeps it: one command in its log, one state in its state
/// machine.
struct HostRecord<C: RaftTypeConfig> {
    wrap: WrapCommand<C>,
    read: ReadState,
}

impl<C: RaftTypeConfig> Record<C> for HostRecord<C> {
    fn wrap(&self, cmd: OracleCommand) -> C::D {
        (self.wrap)(cmd)
    }

    fn with_state<T>(&self, f: impl FnOnce(&OracleState) -> T) -> T {
        let mut f = Some(f);
        let mut out = None;
        (self.read)(&mut |state| {
            if let Some(f) = f.take() {
                out = Some(f(state));
            }
        });
        out.expect("the host's read calls its argument with the applied state")
    }
}

impl<C> PiggybackBackend<C>
where
    C: RaftTypeConfig<NodeId = u64, AsyncRuntime = TokioRuntime, Responder = OneshotResponder<C>>,
{
    /// Adapts `raft`. `wrap` wraps the oracle's command into the host's app data; `read` calls
    /// its argument once with the [`OracleState`] applied on this node (e.g.
    /// `move |f| f(&sm.lock().unwrap().oracle)`; it must see an entry's effect once openraft
    /// has applied it); `client_addr` names a member's oracle client address. Timings come
    /// from `raft.config()`; calls are bounded by one second (see [`Self::with_call_timeout`]).
    pub fn new(
        raft: openraft::Raft<C>,
        wrap: impl Fn(OracleCommand) -> C::D + Send + Sync + 'static,
        read: impl Fn(&mut dyn FnMut(&OracleState)) + Send + Sync + 'static,
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
        let lease = Arc::new(LeaderLease::new(leader_lease_duration(
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
            tokio::spawn(renew_leader_lease(
                raft.clone(),
                leadership.clone(),
                lease.clone(),
                timings,
            )),
        ];
        let record = HostRecord {
            wrap: Arc::new(wrap),
            read: Arc::new(read),
        };
        let seam = Seam {
            raft,
            record,
            client_addr,
            leadership,
            handover: watch::channel(None).1,
            leader_lease: lease,
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

    /// The gate every vote request this node receives must pass before it reaches the host's
    /// raft: it refuses while this node holds an unexpired leader lease. A host's
    /// `RaftNetwork::vote` target calls `gate.vote(&raft, request)` instead of
    /// `raft.vote(request)` and reports `Err(LeaderLeaseHeld)` to the candidate as a failed call.
    pub fn vote_gate(&self) -> VoteGate {
        VoteGate::new(self.seam.leader_lease.clone())
    }

    /// The leader lease of this node (see [`super::RaftBackend::leader_lease_view`]).
    pub fn leader_lease_view(&self) -> LeaderLeaseView {
        self.seam.leader_lease_view()
    }

    /// The high-water applied on this node (possibly stale on a follower; for diagnostics).
    pub fn applied_high_water_ms(&self) -> u64 {
        self.seam.record.with_state(|state| state.high_water_ms)
    }
}

impl<C: RaftTypeConfig> Drop for PiggybackBackend<C> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl<C> Backend for PiggybackBackend<C>
where
    C: RaftTypeConfig<NodeId = u64, AsyncRuntime = TokioRuntime, Responder = OneshotResponder<C>>,
{
    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.seam.leadership.clone()
    }

    fn leader_lease_valid(&self, epoch: Epoch) -> bool {
        self.seam.leader_lease_valid(epoch)
    }

    fn load(&self) -> BoxFuture<'_, Result<OracleState, BackendError>> {
        Box::pin(self.seam.load())
    }

    fn apply(
        &self,
        cmd: OracleCommand,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<Stored, BackendError>> {
        Box::pin(self.seam.apply(cmd, epoch))
    }
}
