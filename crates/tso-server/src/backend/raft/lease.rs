//! The leader lease (SEMANTICS G3): how long this node may keep granting without hearing from
//! a quorum. See `docs/raft-lease.md` for the argument.
//!
//! A lease is extended only by a quorum acknowledgement of a message sent *after* an instant
//! `sent` read on this node before the call started: then every acknowledging follower saw the
//! leader at or after `sent`, and (openraft 0.9) refuses to vote for anyone else until its own
//! `election_timeout_max` has passed since. So no other leader can be elected before
//! `sent + election_timeout_max`; the lease ends earlier by a margin for clock-rate differences.
//! Invariant: within one term the lease end never moves back, and a lease never outlives its term.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The lease is `election_timeout_max - election_timeout_max / LEASE_MARGIN_DIVISOR`: a 10 %
/// margin covers rate differences between the leader's and the followers' monotonic clocks
/// (NTP bounds them to 500 ppm, 200 times smaller) and the time from a lease check to the grant
/// it allows (microseconds).
pub const LEASE_MARGIN_DIVISOR: u32 = 10;

/// The lease length for a cluster whose followers wait `election_timeout_max` before voting.
pub fn lease_duration(election_timeout_max: Duration) -> Duration {
    election_timeout_max - election_timeout_max / LEASE_MARGIN_DIVISOR
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    term: u64,
    valid_until: Instant,
}

/// The lease of one node; shared by the tasks that extend it and the callers that check it.
#[derive(Debug)]
pub struct LeaseClock {
    duration: Duration,
    lease: Mutex<Option<Lease>>,
}

impl LeaseClock {
    pub fn new(duration: Duration) -> Self {
        Self {
            duration,
            lease: Mutex::new(None),
        }
    }

    /// Records that a quorum acknowledged, in `term`, messages sent at or after `sent`.
    pub fn extend(&self, term: u64, sent: Instant) {
        let candidate = Lease {
            term,
            valid_until: sent + self.duration,
        };
        let mut lease = self.lease.lock().expect("lease lock");
        *lease = match *lease {
            Some(old) if old.term > term => Some(old),
            Some(old) if old.term == term && old.valid_until >= candidate.valid_until => Some(old),
            _ => Some(candidate),
        };
    }

    /// The end of the lease held in `term`, if any (it may be in the past).
    pub fn valid_until(&self, term: u64) -> Option<Instant> {
        let lease = *self.lease.lock().expect("lease lock");
        lease.filter(|l| l.term == term).map(|l| l.valid_until)
    }

    /// True while the lease of `term` has not ended: the check on the grant path.
    pub fn is_valid(&self, term: u64) -> bool {
        self.valid_until(term)
            .is_some_and(|until| Instant::now() < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_is_shorter_than_the_follower_wait() {
        let max = Duration::from_millis(350);
        assert_eq!(lease_duration(max), Duration::from_millis(315));
    }

    #[test]
    fn extends_forward_only_and_only_in_its_term() {
        let clock = LeaseClock::new(Duration::from_millis(100));
        let t0 = Instant::now();
        assert_eq!(clock.valid_until(1), None);
        clock.extend(1, t0 + Duration::from_millis(50));
        clock.extend(1, t0);
        assert_eq!(clock.valid_until(1), Some(t0 + Duration::from_millis(150)));
        assert_eq!(clock.valid_until(2), None, "a lease is bound to its term");
        clock.extend(2, t0);
        assert_eq!(clock.valid_until(2), Some(t0 + Duration::from_millis(100)));
        clock.extend(1, t0 + Duration::from_secs(1));
        assert_eq!(clock.valid_until(1), None, "an old term never comes back");
    }
}
