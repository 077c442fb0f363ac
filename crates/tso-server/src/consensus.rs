//! The one seam between the oracle and durability/leadership (SEMANTICS §4).
//!
//! A backend tells the server who leads and stores one record, [`OracleState`] (the durable
//! high-water, the dense-sequence counters and the stamping-lease set), changed only through
//! [`OracleCommand`]s under the merge rules of `consensus/state.rs`. The server never reads or
//! writes storage any other way, so a backend that keeps this contract keeps every guarantee of
//! the oracle.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;
use tso_core::Epoch;

pub mod conformance;
pub mod state;

pub use state::{Merged, OracleCommand, OracleState, Part};

/// A boxed future, so that backends can be chosen at run time (`Arc<dyn Consensus>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The durable dense-sequence counters (SEMANTICS §11): each key's next unissued value. A key
/// that was never advanced is absent (its next value is 0).
pub type SeqCounters = BTreeMap<String, u64>;

/// One durable advance of dense-sequence counters: each key's counter becomes at least its
/// `end` (applied as `max`, like the high-water). Keys are distinct.
pub type SeqEnds = Vec<(String, u64)>;

/// What a node knows of leadership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// This node leads in `epoch`.
    Leader { epoch: Epoch },
    /// Another node leads; its client address (`host:port`) and epoch when known.
    Follower {
        leader_endpoint: Option<String>,
        leader_epoch: Option<Epoch>,
    },
    /// No leader is known (election in progress, start-up).
    Unknown,
}

/// A classified backend error. The class decides what the server does (SEMANTICS §5, §6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConsensusError {
    /// Leadership moved away from this node.
    #[error("not leader (leader {leader_endpoint:?}, epoch {leader_epoch:?})")]
    NotLeader {
        leader_endpoint: Option<String>,
        leader_epoch: Option<Epoch>,
    },
    /// A call made under `expected` was refused because the backend is at `current`.
    #[error("fenced: call made in epoch {expected}, backend is at epoch {current}")]
    Fenced { expected: Epoch, current: Epoch },
    /// May succeed if retried: momentary quorum loss, a transport flap, a timeout.
    #[error("transient consensus error: {0}")]
    Transient(String),
    /// Will not succeed: corruption, a read-only disk, a fatal raft error, an out-of-range value.
    #[error("permanent consensus error: {0}")]
    Permanent(String),
}

/// Durability and leadership, as the oracle needs them.
///
/// To be correct, an implementation must:
///
/// - **leadership**: return a watch whose current value is ready at once; report `Leader`
///   only while this node may persist under that epoch; never report an epoch lower than one it
///   reported before. Closing the watch (dropping the sender) means the backend is gone: the
///   server then stops serving for good.
/// - **load_high_water**: return the durable high-water as of a linearizable read (0 when
///   nothing was ever stored). On a replicated backend this is a read barrier through the
///   current leader, never a possibly stale local copy.
/// - **persist_high_water**: make `max(stored, at_least_ms)` durable (fsync'd, or committed by a
///   quorum) *before* returning it; never return less than `at_least_ms`; never lower the
///   stored value; refuse `epoch` other than this node's current leader epoch with `Fenced` or
///   `NotLeader`; refuse values above [`tso_core::PHYSICAL_MAX_MS`] with `Permanent` before
///   writing anything.
/// - **classify** every error honestly: `Transient` only if a retry may succeed.
/// - be **cancel-safe**: a dropped persist may still complete later (harmless, persists only
///   ratchet up), but must never corrupt the stored value.
///
/// Dense sequences (SEMANTICS §11) are optional. A backend that keeps them returns true from
/// `sequences_supported` and must:
///
/// - **load_sequences**: return the durable counters as of a linearizable read, like
///   `load_high_water` (an empty map when nothing was ever stored);
/// - **persist_sequences**: make every `max(stored, end)` durable before returning, all keys in
///   one atomic write (all or none applied); never lower a counter; refuse `epoch` other than
///   this node's current leader epoch with `Fenced` or `NotLeader`, and answer `NotLeader` only
///   when nothing was written (the server tells its caller the call is safe to redirect);
/// - keep the counters in the same durable place as the high-water (same directory, same log
///   and snapshot), so that they survive exactly what the high-water survives.
///
/// Stamping leases (SEMANTICS §14) are optional too. A backend that keeps them returns true
/// from `leases_supported` and must:
///
/// - **load_leases**: return the stored lease record (opaque bytes the server encodes; empty
///   when nothing was ever stored) as of a linearizable read;
/// - **persist_leases**: replace the stored record durably before returning, under the same
///   epoch rules as `persist_high_water`, and never let a record written under an older epoch
///   replace one written under a newer epoch (a set computed by a deposed leader must not make
///   a newer leader's leases vanish);
/// - keep it where the high-water is.
///
/// Run [`conformance::run_all`] against every implementation.
pub trait Consensus: Send + Sync + 'static {
    fn leadership(&self) -> watch::Receiver<Leadership>;

    fn load_high_water(&self) -> BoxFuture<'_, Result<u64, ConsensusError>>;

    fn persist_high_water(
        &self,
        at_least_ms: u64,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<u64, ConsensusError>>;

    /// Whether this node may still grant under `epoch` right now (SEMANTICS G3). A replicated
    /// backend returns false once a newer leader could have been elected without this node
    /// knowing (its leader lease, renewed by quorum acknowledgements, ran out); the server then
    /// refuses grants until the lease is renewed. Checked on every grant: it must be cheap (a
    /// lock-free read and a clock read). A single-node backend is always leader: the default.
    fn lease_valid(&self, epoch: Epoch) -> bool {
        let _ = epoch;
        true
    }

    /// Whether this backend keeps dense sequences; without them the server answers
    /// `UNIMPLEMENTED` to `GetSeq` and `GetSeqBatch`.
    fn sequences_supported(&self) -> bool {
        false
    }

    fn load_sequences(&self) -> BoxFuture<'_, Result<SeqCounters, ConsensusError>> {
        Box::pin(async { Err(sequences_unsupported()) })
    }

    fn persist_sequences(
        &self,
        ends: SeqEnds,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<(), ConsensusError>> {
        let _ = (ends, epoch);
        Box::pin(async { Err(sequences_unsupported()) })
    }

    /// Whether this backend keeps stamping leases; without them the server answers
    /// `UNIMPLEMENTED` to the lease RPCs and `GetSafeFrontier`.
    fn leases_supported(&self) -> bool {
        false
    }

    fn load_leases(&self) -> BoxFuture<'_, Result<Vec<u8>, ConsensusError>> {
        Box::pin(async { Err(leases_unsupported()) })
    }

    fn persist_leases(
        &self,
        record: Vec<u8>,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<(), ConsensusError>> {
        let _ = (record, epoch);
        Box::pin(async { Err(leases_unsupported()) })
    }
}

fn leases_unsupported() -> ConsensusError {
    ConsensusError::Permanent("this backend does not keep stamping leases".into())
}

fn sequences_unsupported() -> ConsensusError {
    ConsensusError::Permanent("this backend does not keep dense sequences".into())
}

impl<T: Consensus + ?Sized> Consensus for std::sync::Arc<T> {
    fn leadership(&self) -> watch::Receiver<Leadership> {
        (**self).leadership()
    }

    fn load_high_water(&self) -> BoxFuture<'_, Result<u64, ConsensusError>> {
        (**self).load_high_water()
    }

    fn persist_high_water(
        &self,
        at_least_ms: u64,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<u64, ConsensusError>> {
        (**self).persist_high_water(at_least_ms, epoch)
    }

    fn lease_valid(&self, epoch: Epoch) -> bool {
        (**self).lease_valid(epoch)
    }

    fn sequences_supported(&self) -> bool {
        (**self).sequences_supported()
    }

    fn load_sequences(&self) -> BoxFuture<'_, Result<SeqCounters, ConsensusError>> {
        (**self).load_sequences()
    }

    fn persist_sequences(
        &self,
        ends: SeqEnds,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<(), ConsensusError>> {
        (**self).persist_sequences(ends, epoch)
    }

    fn leases_supported(&self) -> bool {
        (**self).leases_supported()
    }

    fn load_leases(&self) -> BoxFuture<'_, Result<Vec<u8>, ConsensusError>> {
        (**self).load_leases()
    }

    fn persist_leases(
        &self,
        record: Vec<u8>,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<(), ConsensusError>> {
        (**self).persist_leases(record, epoch)
    }
}
