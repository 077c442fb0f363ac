//! One call as the client sees it: attempts, redirects and backoff until a grant, a final
//! error, or the deadline. [`drive`] runs the loop for any RPC; [`fetch`] is the `GetTs` call
//! (the sequence calls' attempts are in `seq_call.rs`).
//!
//! Invariants: following a leader hint spends no attempt (at most `REDIRECTS_PER_CALL_MAX` per
//! call); transport errors, per-attempt timeouts and `UNAVAILABLE` spend attempts and back off;
//! only the first two count against the endpoint (`UNAVAILABLE` is a leader's transient refusal,
//! retried on the same leader); an attempt cut short by the call's own deadline ends the call
//! and counts against nothing; "no leader known" (or a malformed hint) rotates to the next
//! endpoint and backs off after each full pass, except that a hinted leader that does not serve
//! yet is asked again every [`HINTED_LEADER_POLL`] for a while (a handoff names its successor
//! a few milliseconds before it serves); an uncertain outcome (a sequence request that
//! may have been granted) ends the call at once; nothing waits past the call's deadline.

use std::collections::HashSet;
use std::error::Error as _;
use std::sync::Mutex;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tso_proto::v1::GetTsRequest;
use tso_proto::v1::tso_service_client::TsoServiceClient;

use crate::attempt::{AttemptClock, Outcome, classify, is_timeout};
use crate::config::{HINTED_LEADER_POLL, HINTED_LEADER_POLLS_MAX, REDIRECTS_PER_CALL_MAX};
use crate::endpoint::{Hint, Target};
use crate::grant::{Granted, TsRange, validate_reply};
use crate::router::Router;
use crate::stream::{self, Streams};
use crate::{Error, Result};

/// What to do after an attempt.
enum Step<G> {
    Done(G),
    RetryNow,
    RetryAfter(Duration),
}

/// The last error a call saw, readable while the call runs (callers coalesced into it whose
/// own deadline passes first are answered with it).
pub(crate) type LastError = Mutex<String>;

/// Gets one grant of `count` (1..=LOGICAL_COUNT) timestamps before `deadline`, keeping the last
/// error seen in `last_error`.
pub(crate) async fn fetch(
    router: &Router,
    streams: &Streams,
    count: u32,
    deadline: Instant,
    last_error: &LastError,
) -> Result<TsRange> {
    drive(router, deadline, last_error, |target| {
        attempt(router, streams, target, count, deadline)
    })
    .await
}

/// Runs `attempt` against the endpoint the call points at until it grants, fails for good, or
/// `deadline` passes; keeps the last error seen in `last_error`.
pub(crate) async fn drive<G, F>(
    router: &Router,
    deadline: Instant,
    last_error: &LastError,
    mut attempt: impl FnMut(Target) -> F,
) -> Result<G>
where
    G: Granted,
    F: Future<Output = Outcome<G>>,
{
    let mut call = Call::new(router, last_error);
    loop {
        let outcome = attempt(call.target.clone()).await;
        let wait = match call.next_step(outcome)? {
            Step::Done(grant) => return Ok(grant),
            Step::RetryNow => Duration::ZERO,
            Step::RetryAfter(wait) => wait,
        };
        if Instant::now() + wait >= deadline {
            return Err(call.deadline_exceeded());
        }
        tokio::time::sleep(wait).await;
    }
}

/// The retry state of one call.
struct Call<'a> {
    router: &'a Router,
    target: Target,
    attempts_failed: u32,
    redirects: u32,
    /// The target was named by a leader hint (not picked by rotation); the endpoint that named
    /// it, if so.
    hinted_by: Option<Target>,
    /// Times a hinted target that did not serve yet was asked again.
    hinted_polls: u32,
    /// "No leader" replies in the current pass over the configured endpoints.
    leaderless_in_pass: u32,
    /// Full passes that found no leader: the backoff exponent while an election lasts.
    leaderless_passes: u32,
    /// Configured endpoints that sent a malformed hint; when all did, the call fails.
    malformed_hints: HashSet<Target>,
    last_error: &'a LastError,
}

impl<'a> Call<'a> {
    fn new(router: &'a Router, last_error: &'a LastError) -> Self {
        Self {
            router,
            target: router.first_target(),
            attempts_failed: 0,
            redirects: 0,
            hinted_by: None,
            hinted_polls: 0,
            leaderless_in_pass: 0,
            leaderless_passes: 0,
            malformed_hints: HashSet::new(),
            last_error,
        }
    }

    fn next_step<G: Granted>(&mut self, outcome: Outcome<G>) -> Result<Step<G>> {
        if matches!(
            outcome,
            Outcome::Granted(_)
                | Outcome::NotLeader(_)
                | Outcome::MalformedHint(_)
                | Outcome::Refused(_)
                | Outcome::Uncertain {
                    endpoint_failed: false,
                    ..
                }
        ) {
            // It answered, so it is reachable whatever it said.
            self.router.mark_reachable(&self.target);
        }
        match outcome {
            Outcome::Granted(grant) => {
                self.router.observe_leader(&self.target, grant.epoch());
                Ok(Step::Done(grant))
            }
            Outcome::NotLeader(hint) => Ok(self.on_not_leader(hint)),
            Outcome::MalformedHint(reason) => self.on_malformed_hint(reason),
            Outcome::Refused(error) => self.on_refused(error),
            Outcome::Unreachable(error) => self.on_unreachable(error),
            Outcome::DeadlinePassed => {
                self.set_last_error(format!(
                    "{} had not answered when the deadline passed",
                    self.target
                ));
                Err(self.deadline_exceeded())
            }
            Outcome::Uncertain {
                error,
                endpoint_failed,
            } => {
                if endpoint_failed {
                    self.router.forget_leader(&self.target);
                    self.router.mark_unreachable(&self.target);
                }
                Err(error)
            }
            Outcome::Fatal(error) => Err(error),
        }
    }

    /// Follows a usable hint at once and for free. A hinted target that names no other leader
    /// than itself, or than the endpoint that sent the call to it under no newer epoch (a leader
    /// handing off names its successor before the successor knows it leads), is about to
    /// serve: it is asked again shortly, a bounded number of times. Otherwise the call moves on
    /// to the next endpoint.
    fn on_not_leader<G>(&mut self, hint: Hint) -> Step<G> {
        if let Some(hinted_by) = &self.hinted_by
            && self.hinted_polls < HINTED_LEADER_POLLS_MAX
        {
            let about_to_serve = match &hint {
                Hint::None => true,
                Hint::Leader { target, epoch } => {
                    target == &self.target
                        || (target == hinted_by && !epoch.is_some_and(|e| self.router.is_newer(e)))
                }
            };
            if about_to_serve {
                self.hinted_polls += 1;
                return Step::RetryAfter(HINTED_LEADER_POLL);
            }
        }
        if let Some(leader) = self.usable_hint(hint) {
            tracing::debug!(from = %self.target, to = %leader, "following leader hint");
            self.redirects += 1;
            self.hinted_by = Some(std::mem::replace(&mut self.target, leader));
            return Step::RetryNow;
        }
        self.set_last_error(format!(
            "{} is not leader and gave no usable hint",
            self.target
        ));
        self.rotate_leaderless()
    }

    /// One broken follower must not fail the call: move on, unless every configured endpoint
    /// has sent a malformed hint (nothing in the cluster then follows the protocol).
    fn on_malformed_hint<G>(&mut self, reason: String) -> Result<Step<G>> {
        tracing::warn!(endpoint = %self.target, %reason, "ignoring a malformed leader hint");
        let endpoints = &self.router.config().endpoints;
        if endpoints.contains(&self.target) {
            self.malformed_hints.insert(self.target.clone());
        }
        if endpoints.iter().all(|t| self.malformed_hints.contains(t)) {
            return Err(Error::MalformedHint {
                endpoint: self.target.to_string(),
                reason,
            });
        }
        self.set_last_error(format!(
            "{} sent a malformed leader hint: {reason}",
            self.target
        ));
        Ok(self.rotate_leaderless())
    }

    /// Rotates to the next configured endpoint, backing off after each full pass over them
    /// (an election is waited out this way).
    fn rotate_leaderless<G>(&mut self) -> Step<G> {
        self.router.forget_leader(&self.target);
        self.target = self.router.next_configured();
        self.hinted_by = None;
        self.leaderless_in_pass += 1;
        if (self.leaderless_in_pass as usize) < self.router.config().endpoints.len() {
            return Step::RetryNow;
        }
        self.leaderless_in_pass = 0;
        self.leaderless_passes += 1;
        Step::RetryAfter(self.backoff(self.leaderless_passes))
    }

    /// The hinted leader, unless the redirect budget is spent, the hint names the node that
    /// sent it (it is about to serve: wait as for an election), it names an epoch older than a
    /// leader already seen (a stale hint), or it names an endpoint that recently failed at the
    /// transport level and the hint brings no newer epoch (the follower has not noticed yet).
    fn usable_hint(&self, hint: Hint) -> Option<Target> {
        let Hint::Leader { target, epoch } = hint else {
            return None;
        };
        if self.redirects >= REDIRECTS_PER_CALL_MAX || target == self.target {
            return None;
        }
        if epoch.is_some_and(|epoch| !self.router.is_current(epoch)) {
            return None;
        }
        if self.router.is_unreachable(&target) {
            if !epoch.is_some_and(|epoch| self.router.is_newer(epoch)) {
                return None;
            }
            // A leader the client has not seen yet: it was elected after the failure.
            self.router.mark_reachable(&target);
        }
        if let Some(epoch) = epoch {
            self.router.observe_leader(&target, epoch);
        }
        Some(target)
    }

    /// The leader refused for now (SEMANTICS §6): back off and ask it again.
    fn on_refused<G>(&mut self, error: String) -> Result<Step<G>> {
        tracing::debug!(target = %self.target, %error, "leader refused for now");
        self.spend_attempt(error)?;
        Ok(Step::RetryAfter(self.backoff(self.attempts_failed)))
    }

    fn on_unreachable<G>(&mut self, error: String) -> Result<Step<G>> {
        tracing::debug!(target = %self.target, %error, "attempt failed");
        self.router.forget_leader(&self.target);
        // Rotation passes over it for a while; a hint with a newer epoch can still lead back.
        self.router.mark_unreachable(&self.target);
        self.spend_attempt(error)?;
        self.target = self.router.next_configured();
        self.hinted_by = None;
        Ok(Step::RetryAfter(self.backoff(self.attempts_failed)))
    }

    fn spend_attempt(&mut self, error: String) -> Result<()> {
        self.attempts_failed += 1;
        self.set_last_error(error);
        if self.attempts_failed >= self.router.config().attempts_max {
            return Err(Error::Unavailable {
                attempts: self.attempts_failed,
                last: self.last_error(),
            });
        }
        Ok(())
    }

    fn backoff(&self, retry: u32) -> Duration {
        let config = self.router.config();
        full_jitter(config.backoff_base, config.backoff_cap, retry)
    }

    fn set_last_error(&self, error: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn deadline_exceeded(&self) -> Error {
        Error::DeadlineExceeded {
            timeout: self.router.config().overall_timeout,
            last: self.last_error(),
        }
    }
}

/// A random sleep in `0..=min(cap, base * 2^(retry - 1))`.
fn full_jitter(base: Duration, cap: Duration, retry: u32) -> Duration {
    let doublings = retry.saturating_sub(1).min(31);
    let ceiling = base.saturating_mul(1 << doublings).min(cap);
    let ceiling_us = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(rand::rng().random_range(0..=ceiling_us))
}

/// One `GetTs` to `target` over its timestamp stream, or a unary RPC when it has none; bounded
/// by the per-attempt deadline and the call's deadline.
async fn attempt(
    router: &Router,
    streams: &Streams,
    target: Target,
    count: u32,
    deadline: Instant,
) -> Outcome<TsRange> {
    let target = &target;
    let clock = AttemptClock::start(deadline, router.config().attempt_timeout);
    let budget = clock.budget();
    let timed_out = || {
        if clock.cut_by_caller() {
            return Outcome::DeadlinePassed;
        }
        router.drop_channel(target);
        Outcome::Unreachable(format!("{target} did not answer within {budget:?}"))
    };
    if streams.offered(target) {
        let stream = stream::attempt(router, streams, target, count, clock.deadline(), timed_out);
        if let Some(outcome) = stream.await {
            return outcome;
        }
    }
    let mut request = tonic::Request::new(GetTsRequest { count });
    request.set_timeout(budget);
    let mut client = TsoServiceClient::new(router.channel(target));
    match tokio::time::timeout_at(clock.deadline(), client.get_ts(request)).await {
        Err(_) => timed_out(),
        Ok(Ok(reply)) => match validate_reply(count, reply.get_ref()) {
            Ok(range) => Outcome::Granted(range),
            Err(reason) => Outcome::Fatal(Error::MalformedReply {
                endpoint: target.to_string(),
                reason,
            }),
        },
        Ok(Err(status)) if is_timeout(&status) => timed_out(),
        Ok(Err(status)) if status.source().is_some() => {
            // Made on this side from a transport error; a server's status carries no source.
            router.drop_channel(target);
            Outcome::Unreachable(format!("{target}: {status}"))
        }
        Ok(Err(status)) => classify(target, &status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientBuilder;
    use crate::endpoint::{Scheme, parse_address};

    /// The outcome of a `GetTs` attempt.
    type O = Outcome<TsRange>;

    fn router(endpoints: &[&str], attempts_max: u32) -> Router {
        let builder = ClientBuilder::default().attempts_max(attempts_max);
        Router::new(builder.validate(endpoints.iter()).unwrap())
    }

    fn hint_to(raw: &str) -> O {
        O::NotLeader(Hint::Leader {
            target: parse_address(raw, Scheme::Http).unwrap(),
            epoch: None,
        })
    }

    #[test]
    fn redirects_are_free_up_to_the_cap_then_rotation_takes_over() {
        let router = router(&["a:1"], 1);
        let last_error = LastError::default();
        let mut call = Call::new(&router, &last_error);
        // Three followers naming each other in a ring (two naming each other are a handoff in
        // progress, polled for a while: see the test below).
        let cycle = ["h:7", "h:8", "h:9"];
        for i in 0..REDIRECTS_PER_CALL_MAX as usize {
            let next = cycle[i % 3];
            assert!(matches!(call.next_step(hint_to(next)), Ok(Step::RetryNow)));
            assert_eq!(call.target.uri(), format!("http://{next}"));
        }
        let next = cycle[REDIRECTS_PER_CALL_MAX as usize % 3];
        assert!(matches!(
            call.next_step(hint_to(next)),
            Ok(Step::RetryAfter(_))
        ));
        assert_eq!(
            call.target.uri(),
            "http://a:1",
            "the cycle goes on after the cap"
        );
        assert_eq!(call.attempts_failed, 0, "redirects spent an attempt");
    }

    #[test]
    fn a_hint_naming_its_sender_is_waited_on_like_an_election() {
        let router = router(&["a:1"], 1);
        let last_error = LastError::default();
        let mut call = Call::new(&router, &last_error);
        assert!(matches!(
            call.next_step(hint_to("a:1")),
            Ok(Step::RetryAfter(_))
        ));
        assert_eq!(call.redirects, 0);
    }

    #[test]
    fn a_hinted_leader_that_does_not_serve_yet_is_polled_shortly_then_rotation_takes_over() {
        let router = router(&["a:1", "b:2"], 1);
        let last_error = LastError::default();
        let mut call = Call::new(&router, &last_error);
        let first = call.target.clone();
        assert!(matches!(call.next_step(hint_to("h:9")), Ok(Step::RetryNow)));
        let successor = call.target.clone();
        for i in 0..HINTED_LEADER_POLLS_MAX {
            // In turn: still following the one that named it, no leader known yet (electing),
            // and fencing (a hint naming itself).
            let outcome = match i % 3 {
                0 => hint_to(first.uri().strip_prefix("http://").unwrap()),
                1 => O::NotLeader(Hint::None),
                _ => hint_to("h:9"),
            };
            let step = call.next_step(outcome);
            assert!(
                matches!(step, Ok(Step::RetryAfter(d)) if d == HINTED_LEADER_POLL),
                "poll {i}"
            );
            assert_eq!(call.target, successor);
        }
        call.next_step(O::NotLeader(Hint::None)).unwrap();
        assert_ne!(call.target, successor, "rotation after the polls");
        assert_eq!(call.attempts_failed, 0, "polls spend no attempt");
        // A configured endpoint reached by rotation is not polled.
        let rotated = call.target.clone();
        call.next_step(O::NotLeader(Hint::None)).unwrap();
        assert_ne!(call.target, rotated);
    }

    #[test]
    fn a_hint_back_under_a_newer_epoch_is_followed_not_polled() {
        let router = router(&["a:1"], 1);
        let last_error = LastError::default();
        let mut call = Call::new(&router, &last_error);
        router.observe_leader(&call.target.clone(), tso_core::Epoch::new(5));
        assert!(matches!(call.next_step(hint_to("h:9")), Ok(Step::RetryNow)));
        let back = O::NotLeader(Hint::Leader {
            target: parse_address("a:1", Scheme::Http).unwrap(),
            epoch: Some(tso_core::Epoch::new(6)),
        });
        assert!(matches!(call.next_step(back), Ok(Step::RetryNow)));
        assert_eq!(call.target.uri(), "http://a:1");
    }

    #[test]
    fn transport_errors_spend_the_attempt_budget_and_move_on() {
        let router = router(&["a:1", "b:2"], 3);
        let last_error = LastError::default();
        let mut call = Call::new(&router, &last_error);
        for _ in 0..2 {
            let failed = call.target.clone();
            let step = call.next_step(O::Unreachable("refused".into()));
            assert!(matches!(step, Ok(Step::RetryAfter(_))));
            assert!(router.is_unreachable(&failed));
            assert_ne!(call.target, failed);
        }
        let last = call.next_step(O::Unreachable("refused".into()));
        assert!(matches!(last, Err(Error::Unavailable { attempts: 3, .. })));
    }

    #[test]
    fn a_refusal_spends_an_attempt_and_stays_with_the_leader() {
        let router = router(&["a:1", "b:2"], 3);
        let last_error = LastError::default();
        let mut call = Call::new(&router, &last_error);
        let leader = call.target.clone();
        router.observe_leader(&leader, tso_core::Epoch::new(1));
        for _ in 0..2 {
            let step = call.next_step(O::Refused("UNAVAILABLE".into()));
            assert!(matches!(step, Ok(Step::RetryAfter(_))));
            assert_eq!(call.target, leader);
        }
        assert!(!router.is_unreachable(&leader));
        assert_eq!(router.leader().0, Some(leader));
        let last = call.next_step(O::Refused("UNAVAILABLE".into()));
        assert!(matches!(last, Err(Error::Unavailable { attempts: 3, .. })));
    }

    #[test]
    fn a_deadline_cut_ends_the_call_and_counts_against_nothing() {
        let router = router(&["a:1"], 3);
        let last_error = LastError::default();
        let mut call = Call::new(&router, &last_error);
        let leader = call.target.clone();
        router.observe_leader(&leader, tso_core::Epoch::new(1));
        let step = call.next_step(O::DeadlinePassed);
        assert!(matches!(step, Err(Error::DeadlineExceeded { .. })));
        assert!(!router.is_unreachable(&leader));
        assert_eq!(router.leader().0, Some(leader));
        assert_eq!(call.attempts_failed, 0);
    }

    #[test]
    fn malformed_hints_rotate_until_every_configured_endpoint_sent_one() {
        let router = router(&["a:1", "b:2", "c:3"], 1);
        let [a, b, c] = [0, 1, 2].map(|i| router.config().endpoints[i].clone());
        let last_error = LastError::default();
        let mut call = Call::new(&router, &last_error);
        for (from, fails) in [(&a, false), (&a, false), (&b, false), (&c, true)] {
            call.target = from.clone();
            let step = call.next_step(O::MalformedHint("garbage".into()));
            if fails {
                assert!(matches!(step, Err(Error::MalformedHint { .. })));
            } else {
                assert!(matches!(step, Ok(Step::RetryNow | Step::RetryAfter(_))));
                assert_ne!(&call.target, from, "did not move on");
            }
        }
        assert_eq!(call.attempts_failed, 0);
    }

    #[test]
    fn a_newer_hint_overrides_the_unreachable_skip_and_a_stale_one_does_not() {
        let router = router(&["a:1"], 1);
        let last_error = LastError::default();
        let mut call = Call::new(&router, &last_error);
        let leader = parse_address("h:9", Scheme::Http).unwrap();
        router.observe_leader(&leader, tso_core::Epoch::new(3));
        router.mark_unreachable(&leader);
        let hint = |epoch| {
            O::NotLeader(Hint::Leader {
                target: leader.clone(),
                epoch: Some(tso_core::Epoch::new(epoch)),
            })
        };
        assert!(matches!(call.next_step(hint(3)), Ok(Step::RetryAfter(_))));
        assert!(router.is_unreachable(&leader));
        assert!(matches!(call.next_step(hint(4)), Ok(Step::RetryNow)));
        assert_eq!(call.target, leader);
        assert!(!router.is_unreachable(&leader));
    }

    #[test]
    fn no_leader_rotates_and_backs_off_after_each_full_pass() {
        let router = router(&["a:1", "b:2"], 1);
        let last_error = LastError::default();
        let mut call = Call::new(&router, &last_error);
        let first = call.target.clone();
        assert!(matches!(
            call.next_step(O::NotLeader(Hint::None)),
            Ok(Step::RetryNow)
        ));
        assert_ne!(call.target, first);
        for _ in 0..10 {
            let step = call.next_step(O::NotLeader(Hint::None));
            assert!(matches!(step, Ok(Step::RetryAfter(_))));
            let step = call.next_step(O::NotLeader(Hint::None));
            assert!(matches!(step, Ok(Step::RetryNow)));
        }
        assert_eq!(call.attempts_failed, 0, "an election spends no attempt");
    }

    #[test]
    fn an_uncertain_outcome_ends_the_call_and_only_a_failed_endpoint_is_dropped() {
        let router = router(&["a:1"], 8);
        let last_error = LastError::default();
        let uncertain = |endpoint_failed| O::Uncertain {
            error: Error::SeqUncertain {
                endpoint: "http://a:1".into(),
                asked: vec![("k".into(), 1)],
                reason: "UNAVAILABLE".into(),
            },
            endpoint_failed,
        };
        for endpoint_failed in [false, true] {
            let mut call = Call::new(&router, &last_error);
            let leader = call.target.clone();
            router.observe_leader(&leader, tso_core::Epoch::new(1));
            let step = call.next_step(uncertain(endpoint_failed));
            assert!(matches!(step, Err(Error::SeqUncertain { .. })));
            assert_eq!(call.attempts_failed, 0);
            assert_eq!(router.is_unreachable(&leader), endpoint_failed);
            assert_eq!(router.leader().0.is_none(), endpoint_failed);
        }
    }

    #[test]
    fn full_jitter_stays_under_the_capped_ceiling() {
        let base = Duration::from_millis(20);
        let cap = Duration::from_millis(500);
        for retry in 0..40u32 {
            let ceiling = base
                .saturating_mul(1 << retry.saturating_sub(1).min(31))
                .min(cap);
            for _ in 0..50 {
                assert!(full_jitter(base, cap, retry) <= ceiling);
            }
        }
    }
}
