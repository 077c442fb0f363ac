//! The leader lease (SEMANTICS G3): how long this node may keep granting without hearing from
//! a quorum. See `docs/raft-lease.md` for the argument.
//!
//! A lease is extended only by a quorum acknowledgement of a message sent *after* an instant
//! `sent` read on this node before the call started: then every acknowledging follower saw the
//! leader at or after `sent`, and (openraft 0.9) refuses to vote for anyone else until its own
//! `election_timeout_max` has passed since. So no other leader can be elected before
//! `sent + election_timeout_max`; the lease ends earlier by a margin for clock-rate differences.
//! The leader itself is the one voter of that quorum openraft does not hold back, so this clock
//! also gates the node's own votes (`begin_vote`/`end_vote`, used by the peer vote handler).
//! Invariant: within one term the lease end never moves back, a lease never outlives its term,
//! and no lease is extended while this node's vote is being decided or after it voted past it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The lease is `election_timeout_max - election_timeout_max / LEASE_MARGIN_DIVISOR`: the 10 %
/// margin covers rate differences between the leader's and the followers' monotonic clocks (NTP
/// bounds them to 500 ppm, 200 times smaller). The time from a lease check to the grant it allows
/// needs no margin: the grant only has to follow calls that returned before its own call started,
/// and the check runs after that.
pub const LEASE_MARGIN_DIVISOR: u32 = 10;

/// The lease length for a cluster whose followers wait `election_timeout_max` before voting.
pub fn leader_lease_duration(election_timeout_max: Duration) -> Duration {
    election_timeout_max - election_timeout_max / LEASE_MARGIN_DIVISOR
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    term: u64,
    valid_until: Instant,
}

#[derive(Debug, Default)]
struct State {
    lease: Option<Lease>,
    /// Vote requests being handled by raft right now; no lease is extended meanwhile.
    votes_in_flight: u32,
    /// Terms below this are over for this node: it voted in this term or a later one.
    floor_term: u64,
    /// Set by the checker's positive control only ([`LeaderLease::unsafe_keep_through_votes`]):
    /// the lease of this term holds no vote back, and a vote past it does not end it.
    unsafe_kept_term: Option<u64>,
}

/// The lease of one node; shared by the tasks that extend it, the callers that check it, and
/// the peer vote handler that must not give this node's vote away while it holds one.
#[derive(Debug)]
pub struct LeaderLease {
    duration: Duration,
    state: Mutex<State>,
}

/// Why a vote request was refused without reaching raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldsLeaderLease {
    pub term: u64,
    pub valid_until: Instant,
}

impl LeaderLease {
    pub fn new(duration: Duration) -> Self {
        Self {
            duration,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("lease lock")
    }

    /// Records that a quorum acknowledged, in `term`, messages sent at or after `sent`.
    ///
    /// Ignored while a vote request is being handled, and for a term this node has voted past:
    /// the quorum behind such a confirmation may count this node's own vote, which it has given
    /// (or may be giving) to a candidate.
    pub fn extend(&self, term: u64, sent: Instant) {
        let candidate = Lease {
            term,
            valid_until: sent + self.duration,
        };
        let mut state = self.lock();
        if state.votes_in_flight > 0 || term < state.floor_term {
            return;
        }
        state.lease = match state.lease {
            Some(old) if old.term > term => Some(old),
            Some(old) if old.term == term && old.valid_until >= candidate.valid_until => Some(old),
            _ => Some(candidate),
        };
    }

    /// The end of the lease held in `term`, if any (it may be in the past).
    pub fn valid_until(&self, term: u64) -> Option<Instant> {
        let state = self.lock();
        state
            .lease
            .filter(|l| {
                l.term == term && (term >= state.floor_term || state.unsafe_kept_term == Some(term))
            })
            .map(|l| l.valid_until)
    }

    /// True while the lease of `term` has not ended: the check on the grant path.
    pub fn is_valid(&self, term: u64) -> bool {
        self.valid_until(term)
            .is_some_and(|until| Instant::now() < until)
    }

    /// Called before a peer's vote request is handed to raft. Refuses while this node holds an
    /// unexpired lease: its vote would let a candidate win while this node still grants.
    /// Otherwise suspends lease extensions until [`Self::end_vote`].
    pub fn begin_vote(&self, now: Instant) -> Result<(), HoldsLeaderLease> {
        let mut state = self.lock();
        if let Some(l) = state.lease
            && l.term >= state.floor_term
            && now < l.valid_until
            && state.unsafe_kept_term != Some(l.term)
        {
            return Err(HoldsLeaderLease {
                term: l.term,
                valid_until: l.valid_until,
            });
        }
        state.votes_in_flight += 1;
        Ok(())
    }

    /// Gives up this node's lease of `term` for good, before it hands leadership to a peer: from
    /// here on no lease of `term` (or below) is valid, none is extended, and the vote gate no
    /// longer refuses for it. Grants stop at once; this node's vote may be given next.
    pub fn relinquish(&self, term: u64) {
        let mut state = self.lock();
        state.floor_term = state.floor_term.max(term.saturating_add(1));
        if state.lease.is_some_and(|l| l.term < state.floor_term) {
            state.lease = None;
        }
    }

    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: the lease of `term` is given up for the vote
    /// gate alone, which admits votes from now on as [`Self::relinquish`] would. The lease itself
    /// stays: it is extended while this node leads in `term`, and a vote that takes this node
    /// past `term` no longer ends it, so it is valid for grants until it ends by time. A handoff
    /// that calls this instead of `relinquish` lets its successor be elected while this node
    /// still grants: G3 broken on purpose.
    pub fn unsafe_keep_through_votes(&self, term: u64) {
        self.lock().unsafe_kept_term = Some(term);
    }

    /// Called once raft has handled a vote request admitted by [`Self::begin_vote`]:
    /// `vote_term` is this node's vote term afterwards (the request's term when unknown).
    /// A lease of any lower term is over for good.
    pub fn end_vote(&self, vote_term: u64) {
        let mut state = self.lock();
        assert!(state.votes_in_flight > 0, "end_vote without begin_vote");
        state.votes_in_flight -= 1;
        state.floor_term = state.floor_term.max(vote_term);
        if state
            .lease
            .is_some_and(|l| l.term < state.floor_term && state.unsafe_kept_term != Some(l.term))
        {
            state.lease = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_is_shorter_than_the_follower_wait() {
        let max = Duration::from_millis(350);
        assert_eq!(leader_lease_duration(max), Duration::from_millis(315));
    }

    #[test]
    fn extends_forward_only_and_only_in_its_term() {
        let clock = LeaderLease::new(Duration::from_millis(100));
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

    #[test]
    fn a_vote_is_refused_while_the_lease_runs() {
        let clock = LeaderLease::new(Duration::from_millis(100));
        let t0 = Instant::now();
        clock.extend(3, t0);
        let refused = clock.begin_vote(t0 + Duration::from_millis(99));
        assert_eq!(
            refused,
            Err(HoldsLeaderLease {
                term: 3,
                valid_until: t0 + Duration::from_millis(100)
            })
        );
        assert!(clock.begin_vote(t0 + Duration::from_millis(100)).is_ok());
        clock.end_vote(3);
        assert_eq!(
            clock.valid_until(3),
            Some(t0 + Duration::from_millis(100)),
            "a vote that left this node in its term keeps its lease"
        );
    }

    #[test]
    fn a_relinquished_lease_ends_at_once_admits_votes_and_is_never_extended_again() {
        let clock = LeaderLease::new(Duration::from_secs(60));
        let t0 = Instant::now();
        clock.extend(7, t0);
        assert!(clock.is_valid(7));
        assert!(
            clock.begin_vote(t0).is_err(),
            "a running lease holds votes back"
        );
        clock.relinquish(7);
        assert!(!clock.is_valid(7), "no grant after relinquishing");
        assert_eq!(clock.valid_until(7), None);
        clock.extend(7, Instant::now());
        assert!(
            !clock.is_valid(7),
            "a confirmation in the relinquished term is ignored"
        );
        assert!(clock.begin_vote(Instant::now()).is_ok(), "votes pass");
        clock.end_vote(8);
        clock.extend(6, Instant::now());
        assert!(!clock.is_valid(6), "nor does an older term come back");
        clock.extend(9, Instant::now());
        assert!(clock.is_valid(9), "a later term leads normally");
    }

    #[test]
    fn a_lease_kept_through_votes_admits_them_and_grants_until_it_ends_by_time() {
        let clock = LeaderLease::new(Duration::from_millis(200));
        let t0 = Instant::now();
        clock.extend(7, t0);
        clock.unsafe_keep_through_votes(7);
        clock.extend(7, t0 + Duration::from_millis(50));
        assert!(clock.begin_vote(t0).is_ok(), "votes pass at once");
        clock.end_vote(8);
        clock.extend(7, t0 + Duration::from_millis(100));
        assert_eq!(
            clock.valid_until(7),
            Some(t0 + Duration::from_millis(250)),
            "extended until the vote, kept after it, ending by time"
        );
        assert_eq!(clock.valid_until(8), None);
        clock.extend(9, t0);
        assert!(
            clock.begin_vote(t0).is_err(),
            "a later term's lease holds votes back"
        );
    }

    #[test]
    fn no_confirmation_extends_a_lease_during_or_after_a_vote_for_a_higher_term() {
        let clock = LeaderLease::new(Duration::from_millis(100));
        let t0 = Instant::now();
        clock.extend(3, t0);
        let after = t0 + Duration::from_millis(150);
        clock.begin_vote(after).expect("the lease has ended");
        clock.extend(3, after);
        assert_eq!(
            clock.valid_until(3),
            Some(t0 + Duration::from_millis(100)),
            "extensions wait while a vote is in flight"
        );
        clock.end_vote(4);
        assert_eq!(clock.valid_until(3), None);
        clock.extend(3, after + Duration::from_millis(1));
        assert_eq!(
            clock.valid_until(3),
            None,
            "a late confirmation cannot revive term 3"
        );
        assert!(clock.begin_vote(after).is_ok(), "no lease: votes pass");
        clock.end_vote(4);
        clock.extend(5, after);
        assert!(
            clock.valid_until(5).is_some(),
            "a later term leads normally"
        );
    }
}
