//! The leader lease of the etcd backend (SEMANTICS G3): until when this node may grant under
//! the epoch it leads, from the etcd lease that holds its leader key. See `docs/etcd.md`.
//!
//! A deadline is only ever computed from an instant read on this node *before* the request
//! that renewed the etcd lease was sent (a grant or a keep-alive), plus the TTL etcd answered,
//! shortened for clock-rate differences: etcd's leader restarts the lease's countdown when it
//! handles the renewal, which is after that instant. Invariant: within one epoch the deadline
//! never moves back; a cleared lease never comes back for its epoch.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tso_core::Epoch;

/// The TTL is shortened by `ttl / CLOCK_RATE_DIVISOR` (1 %) for the rate difference between
/// this host's monotonic clock and the etcd leader's (NTP keeps rates within 500 ppm, twenty
/// times less).
pub const CLOCK_RATE_DIVISOR: u32 = 100;

/// A further fixed margin off every deadline: covers the integer rounding of etcd's TTL to
/// whole seconds on a member whose clock ticks coarsely, and the scheduling delay between a
/// passing check and the grant it allows. See `docs/etcd.md`.
pub const SAFETY_MARGIN: Duration = Duration::from_millis(100);

/// How long, from the instant a renewal was sent, this node may grant after etcd renewed its
/// lease to `ttl`: `ttl - ttl/100 - 100 ms` (zero when that is negative).
pub fn usable(ttl: Duration) -> Duration {
    ttl.saturating_sub(ttl / CLOCK_RATE_DIVISOR)
        .saturating_sub(SAFETY_MARGIN)
}

/// The switch of [`unsafe_etcd_ignore_lease`].
static IGNORE_LEASE: AtomicBool = AtomicBool::new(false);

/// FOR THE CHECKER'S POSITIVE CONTROL ONLY: from now on a leader's lease never runs out by its
/// deadline: grants go on, and the node keeps leading, while its keep-alives fail (it steps
/// down only once etcd answers that its lease or key is gone). A leader cut off from etcd thus
/// grants while another node wins. For the whole process.
pub fn unsafe_etcd_ignore_lease() {
    IGNORE_LEASE.store(true, Ordering::Relaxed);
}

/// Whether [`unsafe_etcd_ignore_lease`] was called.
pub(super) fn ignores_lease() -> bool {
    IGNORE_LEASE.load(Ordering::Relaxed)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    epoch: Epoch,
    until: Instant,
}

/// The lease of one node, shared by the campaign task (which extends and clears it) and the
/// grant path (which checks it: one uncontended mutex read and a clock read).
#[derive(Debug, Default)]
pub struct LeaderLease {
    held: Mutex<Option<Held>>,
}

impl LeaderLease {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        self.held.lock().expect("lease clock lock")
    }

    /// Starts the lease of a new epoch: etcd granted `ttl` to a request sent at `sent`.
    pub fn start(&self, epoch: Epoch, sent: Instant, ttl: Duration) {
        *self.lock() = Some(Held {
            epoch,
            until: sent + usable(ttl),
        });
    }

    /// etcd renewed the lease of `epoch` to `ttl` on a keep-alive sent at `sent`. Ignored for
    /// any other epoch than the one held (a cleared or replaced lease is not revived).
    pub fn extend(&self, epoch: Epoch, sent: Instant, ttl: Duration) {
        let until = sent + usable(ttl);
        let mut held = self.lock();
        if let Some(h) = held.as_mut()
            && h.epoch == epoch
            && h.until < until
        {
            h.until = until;
        }
    }

    /// Ends the lease of `epoch` at once (no-op if another epoch is held).
    pub fn clear(&self, epoch: Epoch) {
        let mut held = self.lock();
        if held.is_some_and(|h| h.epoch == epoch) {
            *held = None;
        }
    }

    /// Ends whatever lease is held.
    pub fn clear_all(&self) {
        *self.lock() = None;
    }

    /// The end of the lease of `epoch`, if held (it may be in the past).
    pub fn until(&self, epoch: Epoch) -> Option<Instant> {
        self.lock().filter(|h| h.epoch == epoch).map(|h| h.until)
    }

    /// True while the lease of `epoch` has not ended: the check on the grant path.
    pub fn is_valid(&self, epoch: Epoch) -> bool {
        self.until(epoch)
            .is_some_and(|until| ignores_lease() || Instant::now() < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usable_part_is_shorter_by_one_percent_and_the_margin() {
        assert_eq!(usable(Duration::from_secs(3)), Duration::from_millis(2_870));
        assert_eq!(
            usable(Duration::from_secs(10)),
            Duration::from_millis(9_800)
        );
        assert_eq!(usable(Duration::from_millis(50)), Duration::ZERO);
    }

    #[test]
    fn extends_forward_only_within_its_epoch_and_never_revives() {
        let clock = LeaderLease::default();
        let (e1, e2) = (Epoch::from_parts(5, 1), Epoch::from_parts(9, 2));
        let t0 = Instant::now();
        let ttl = Duration::from_secs(3);
        clock.start(e1, t0, ttl);
        assert_eq!(clock.until(e1), Some(t0 + usable(ttl)));
        clock.extend(e1, t0 - Duration::from_secs(1), ttl);
        assert_eq!(clock.until(e1), Some(t0 + usable(ttl)), "never moves back");
        clock.extend(e1, t0 + Duration::from_secs(1), ttl);
        assert_eq!(
            clock.until(e1),
            Some(t0 + Duration::from_secs(1) + usable(ttl))
        );
        assert_eq!(clock.until(e2), None, "bound to its epoch");
        clock.extend(e2, t0, ttl);
        assert_eq!(clock.until(e2), None, "an extension never starts a lease");
        clock.clear(e2);
        assert!(
            clock.until(e1).is_some(),
            "clearing another epoch is a no-op"
        );
        clock.clear(e1);
        clock.extend(e1, Instant::now(), ttl);
        assert!(!clock.is_valid(e1), "a cleared lease is not revived");
    }
}
