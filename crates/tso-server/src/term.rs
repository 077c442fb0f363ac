//! What a serving term's writers (the sequence group committer, the lease book) may touch: the
//! backend under the term's epoch, the clock, the limits they enforce, and a narrow view of the
//! serving state.
//!
//! The oracle builds a [`TermIo`] for one term and hands it down; the writers never see the
//! oracle itself, so they cannot reach its lock or its other terms. Every write they make goes
//! through the backend fenced by [`TermIo::epoch`].

use std::sync::Arc;
use std::time::Duration;

use tso_core::Epoch;

use crate::backend::{Backend, BackendError};
use crate::clock::Clock;
use crate::error::ServeError;
use crate::refusal::{Call, LeaderHint, Refusal};

/// Callers that found the window exhausted wait at most this long for the extension, then get
/// `UNAVAILABLE`; it bounds a request on a stalled backend below common client deadlines. A
/// sequence call waits at most as long for its group's write.
pub const EXHAUSTED_WAIT_MAX: Duration = Duration::from_secs(5);

/// The serving state as a term's writers see it; the oracle implements it.
pub(crate) trait Serving: Send + Sync {
    /// The hint to send with "not leader" now.
    fn hint(&self) -> LeaderHint;
    /// Poisons serving for good and records why.
    fn poison(&self, error: ServeError);
    /// The durable high-water of the term serving `epoch`, if that term still serves.
    fn serving_high_water(&self, epoch: Epoch) -> Option<u64>;
    /// Raises the window of the term serving `epoch` to a newly durable high-water.
    fn raise_serving_high_water(&self, epoch: Epoch, durable_ms: u64);
}

/// The limits and positive controls of the oracle's `Config` that a term's writers enforce.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TermLimits {
    pub seq_keys_max: usize,
    pub lease_ttl_max: Duration,
    pub unsafe_seq_skip_load: bool,
    pub unsafe_seq_burn_refused: bool,
    pub unsafe_lease_skip_load: bool,
    pub unsafe_lease_wall_expiry: bool,
    pub unsafe_lease_bound_in_memory: bool,
}

/// One serving term's access to the backend and the serving state.
pub(crate) struct TermIo {
    pub backend: Arc<dyn Backend>,
    pub clock: Arc<dyn Clock>,
    /// The term's epoch: every write is fenced by it.
    pub epoch: Epoch,
    pub limits: TermLimits,
    pub serving: Arc<dyn Serving>,
}

impl TermIo {
    pub fn hint(&self) -> LeaderHint {
        self.serving.hint()
    }

    pub fn poison(&self, error: ServeError) {
        self.serving.poison(error);
    }

    /// The term's durable high-water, if it still serves.
    pub fn high_water_ms(&self) -> Option<u64> {
        self.serving.serving_high_water(self.epoch)
    }

    /// Raises the term's window to a newly durable high-water.
    pub fn raise_high_water(&self, durable_ms: u64) {
        self.serving
            .raise_serving_high_water(self.epoch, durable_ms);
    }

    /// Maps a failed backend call to its callers' answer; a permanent failure poisons serving.
    pub fn refusal(&self, err: BackendError, call: Call<'_>) -> Refusal {
        Refusal::from_backend(err, call, || self.hint(), Some(&|e| self.poison(e)))
    }
}
