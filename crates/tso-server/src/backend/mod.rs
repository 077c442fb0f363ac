//! The one seam between the oracle and durability/leadership (SEMANTICS §4).
//!
//! A backend tells the server who leads and stores one record, [`OracleState`] (the durable
//! high-water, the dense-sequence counters and the stamping-lease set), changed only through
//! [`OracleCommand`]s under the merge rules of `backend/state.rs`. The server never reads or
//! writes storage any other way, so a backend that keeps this contract keeps every guarantee of
//! the oracle.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;
use tso_core::Epoch;

pub mod conformance;
pub(crate) mod dir;
#[cfg(feature = "raft")]
pub mod etcd;
pub mod file;
#[cfg(feature = "raft")]
pub mod raft;
pub mod recover;
pub mod state;

pub use state::{Merged, OracleCommand, OracleState};

/// A boxed future, so that backends can be chosen at run time (`Arc<dyn Backend>`).
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
pub enum BackendError {
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
    #[error("transient backend error: {0}")]
    Transient(String),
    /// Will not succeed: corruption, a read-only disk, a fatal raft error, an out-of-range value.
    #[error("permanent backend error: {0}")]
    Permanent(String),
}

/// What a durable apply left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The durable high-water once the command is applied (for an advance of it, at least the
    /// value asked for; a caller may raise its window to this).
    pub high_water_ms: u64,
}

/// Durability and leadership, as the oracle needs them: the few things only a backend can
/// provide. Every method is required, so a wrapper decides each of them (no default can switch
/// a safety check off).
///
/// To be correct, an implementation must:
///
/// - **leadership**: return a watch whose current value is ready at once; report `Leader`
///   only while this node may apply under that epoch; never report an epoch lower than one it
///   reported before. Closing the watch (dropping the sender) means the backend is gone: the
///   server then stops serving for good.
/// - **leader_lease_valid**: say whether this node may still grant under `epoch` right now
///   (SEMANTICS G3). A replicated backend answers false once a newer leader could have been
///   elected without this node knowing (its leader lease, renewed by quorum acknowledgements,
///   ran out); the server then refuses until the lease is renewed. Called on every grant: it
///   must be cheap (a lock-free read and a clock read). A single-node backend, always leader,
///   answers true.
/// - **load**: return the whole [`OracleState`] as of a linearizable read (the default state
///   when nothing was ever stored). On a replicated backend this is a read barrier through the
///   current leader, never a possibly stale local copy.
/// - **apply**: refuse what [`OracleCommand::check`] refuses before writing anything; refuse
///   `epoch` other than this node's current leader epoch with `Fenced` or `NotLeader`, and
///   answer `NotLeader` only when nothing was written (the server tells its caller the call is
///   safe to redirect); otherwise apply the command with [`OracleState::apply`]'s merge rules,
///   all of it in one atomic write (a sequence group commit is all or none), and make the
///   result durable (fsync'd, or committed by a quorum) *before* answering `Ok`. `Ok` means the
///   stored state includes the command ([`OracleState::includes`]); a lease record a later
///   term's record superseded answers `Fenced`. Keep every part in the same durable place
///   (directory, log and snapshot), so each survives what the others survive.
/// - **classify** every error honestly: `Transient` only if a retry may succeed.
/// - be **cancel-safe**: a dropped apply may still complete later (harmless: the merge rules
///   only ratchet), but must never corrupt the stored state.
///
/// Run [`conformance::run_all`] against every implementation.
pub trait Backend: Send + Sync + 'static {
    fn leadership(&self) -> watch::Receiver<Leadership>;

    fn leader_lease_valid(&self, epoch: Epoch) -> bool;

    fn load(&self) -> BoxFuture<'_, Result<OracleState, BackendError>>;

    fn apply(
        &self,
        cmd: OracleCommand,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<Stored, BackendError>>;
}

impl<T: Backend + ?Sized> Backend for std::sync::Arc<T> {
    fn leadership(&self) -> watch::Receiver<Leadership> {
        (**self).leadership()
    }

    fn leader_lease_valid(&self, epoch: Epoch) -> bool {
        (**self).leader_lease_valid(epoch)
    }

    fn load(&self) -> BoxFuture<'_, Result<OracleState, BackendError>> {
        (**self).load()
    }

    fn apply(
        &self,
        cmd: OracleCommand,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<Stored, BackendError>> {
        (**self).apply(cmd, epoch)
    }
}
