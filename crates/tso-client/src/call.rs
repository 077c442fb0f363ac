//! One `GetTs` call as the dispatcher sees it: attempts, redirects and backoff until a grant,
//! a final error, or the deadline.
//!
//! Invariants: following a leader hint spends no attempt (at most `REDIRECTS_PER_CALL_MAX` per
//! call); only transport errors, timeouts and `UNAVAILABLE` spend attempts and back off; "no
//! leader known" rotates to the next endpoint and backs off after each full pass; nothing waits
//! past the call's deadline.

use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tonic::Code;
use tso_proto::LEADER_HINT_KEY;
use tso_proto::v1::GetTsRequest;
use tso_proto::v1::tso_service_client::TsoServiceClient;

use crate::config::REDIRECTS_PER_CALL_MAX;
use crate::endpoint::{Hint, Target, decode_hint};
use crate::grant::{TsRange, validate_reply};
use crate::router::Router;
use crate::{Error, Result};

/// What one attempt came to.
#[derive(Debug)]
enum Outcome {
    Granted(TsRange),
    NotLeader(Hint),
    /// Worth another attempt elsewhere or later: transport error, timeout, `UNAVAILABLE`.
    Transient(String),
    Fatal(Error),
}

/// What to do after an attempt.
enum Step {
    Done(TsRange),
    RetryNow,
    RetryAfter(Duration),
}

/// Gets one grant of `count` (1..=LOGICAL_COUNT) timestamps before `deadline`.
pub(crate) async fn fetch(router: &Router, count: u32, deadline: Instant) -> Result<TsRange> {
    let mut call = Call::new(router);
    loop {
        let outcome = attempt(router, &call.target, count, deadline).await;
        let wait = match call.next_step(outcome)? {
            Step::Done(range) => return Ok(range),
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
    /// "No leader" replies in the current pass over the configured endpoints.
    leaderless_in_pass: u32,
    /// Full passes that found no leader: the backoff exponent while an election lasts.
    leaderless_passes: u32,
    last_error: String,
}

impl<'a> Call<'a> {
    fn new(router: &'a Router) -> Self {
        Self {
            router,
            target: router.first_target(),
            attempts_failed: 0,
            redirects: 0,
            leaderless_in_pass: 0,
            leaderless_passes: 0,
            last_error: "none".into(),
        }
    }

    fn next_step(&mut self, outcome: Outcome) -> Result<Step> {
        match outcome {
            Outcome::Granted(range) => {
                self.router.mark_reachable(&self.target);
                self.router.observe_leader(&self.target, range.epoch());
                Ok(Step::Done(range))
            }
            Outcome::NotLeader(hint) => Ok(self.on_not_leader(hint)),
            Outcome::Transient(error) => self.on_transient(error),
            Outcome::Fatal(error) => Err(error),
        }
    }

    /// Follows a usable hint at once and for free; otherwise rotates, backing off after each
    /// full pass over the configured endpoints (an election is waited out this way).
    fn on_not_leader(&mut self, hint: Hint) -> Step {
        if let Some(leader) = self.usable_hint(hint) {
            tracing::debug!(from = %self.target, to = %leader, "following leader hint");
            self.redirects += 1;
            self.target = leader;
            return Step::RetryNow;
        }
        self.router.forget_leader(&self.target);
        self.last_error = format!("{} is not leader and gave no usable hint", self.target);
        self.target = self.router.next_configured();
        self.leaderless_in_pass += 1;
        if (self.leaderless_in_pass as usize) < self.router.config().endpoints.len() {
            return Step::RetryNow;
        }
        self.leaderless_in_pass = 0;
        self.leaderless_passes += 1;
        Step::RetryAfter(self.backoff(self.leaderless_passes))
    }

    /// The hinted leader, unless the redirect budget is spent, the hint names the node that
    /// sent it (it is about to serve: wait as for an election), or it names an epoch older than
    /// a leader already seen (a stale hint).
    fn usable_hint(&self, hint: Hint) -> Option<Target> {
        let Hint::Leader { target, epoch } = hint else {
            return None;
        };
        if self.redirects >= REDIRECTS_PER_CALL_MAX
            || target == self.target
            || self.router.is_unreachable(&target)
        {
            return None;
        }
        match epoch {
            Some(epoch) if !self.router.is_current(epoch) => None,
            Some(epoch) => {
                self.router.observe_leader(&target, epoch);
                Some(target)
            }
            None => Some(target),
        }
    }

    fn on_transient(&mut self, error: String) -> Result<Step> {
        tracing::debug!(target = %self.target, %error, "attempt failed");
        self.attempts_failed += 1;
        self.last_error = error;
        self.router.forget_leader(&self.target);
        // Rotation passes over it for a while; a hint can still lead back to it.
        self.router.mark_unreachable(&self.target);
        if self.attempts_failed >= self.router.config().attempts_max {
            return Err(Error::Unavailable {
                attempts: self.attempts_failed,
                last: self.last_error.clone(),
            });
        }
        self.target = self.router.next_configured();
        Ok(Step::RetryAfter(self.backoff(self.attempts_failed)))
    }

    fn backoff(&self, retry: u32) -> Duration {
        let config = self.router.config();
        full_jitter(config.backoff_base, config.backoff_cap, retry)
    }

    fn deadline_exceeded(&self) -> Error {
        Error::DeadlineExceeded {
            timeout: self.router.config().overall_timeout,
            last: self.last_error.clone(),
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

/// One `GetTs` RPC to `target`, bounded by the per-attempt deadline and the call's deadline.
async fn attempt(router: &Router, target: &Target, count: u32, deadline: Instant) -> Outcome {
    let now = Instant::now();
    let attempt_deadline = deadline.min(now + router.config().attempt_timeout);
    let budget = attempt_deadline.saturating_duration_since(now);
    let mut request = tonic::Request::new(GetTsRequest { count });
    request.set_timeout(budget);
    let mut client = TsoServiceClient::new(router.channel(target));
    match tokio::time::timeout_at(attempt_deadline, client.get_ts(request)).await {
        Err(_) => {
            router.drop_channel(target);
            Outcome::Transient(format!("{target} did not answer within {budget:?}"))
        }
        Ok(Ok(reply)) => match validate_reply(count, reply.get_ref()) {
            Ok(range) => Outcome::Granted(range),
            Err(reason) => Outcome::Fatal(Error::MalformedReply {
                endpoint: target.to_string(),
                reason,
            }),
        },
        Ok(Err(status)) => classify(target, &status),
    }
}

/// Sorts an error status into what the call does next (PROTOCOL.md, Errors).
fn classify(target: &Target, status: &tonic::Status) -> Outcome {
    let endpoint = target.to_string();
    match status.code() {
        Code::FailedPrecondition => match hint_of(target, status) {
            Ok(hint) => Outcome::NotLeader(hint),
            Err(reason) => Outcome::Fatal(Error::MalformedHint { endpoint, reason }),
        },
        Code::InvalidArgument => Outcome::Fatal(Error::InvalidArgument {
            message: status.message().into(),
        }),
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled => {
            Outcome::Transient(format!(
                "{endpoint}: {:?}: {}",
                status.code(),
                status.message()
            ))
        }
        code => Outcome::Fatal(Error::Server {
            endpoint,
            code,
            message: status.message().into(),
        }),
    }
}

fn hint_of(target: &Target, status: &tonic::Status) -> Result<Hint, String> {
    let bytes = match status.metadata().get_bin(LEADER_HINT_KEY) {
        None => None,
        Some(value) => Some(
            value
                .to_bytes()
                .map_err(|e| format!("trailer is not base64: {e}"))?,
        ),
    };
    decode_hint(bytes.as_deref(), target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientBuilder;
    use crate::endpoint::{Scheme, parse_address};

    fn router(endpoints: &[&str], attempts_max: u32) -> Router {
        let builder = ClientBuilder::default().attempts_max(attempts_max);
        Router::new(builder.validate(endpoints.iter()).unwrap())
    }

    fn hint_to(raw: &str) -> Outcome {
        Outcome::NotLeader(Hint::Leader {
            target: parse_address(raw, Scheme::Http).unwrap(),
            epoch: None,
        })
    }

    #[test]
    fn redirects_are_free_up_to_the_cap_then_rotation_takes_over() {
        let router = router(&["a:1"], 1);
        let mut call = Call::new(&router);
        // Two followers naming each other.
        let cycle = ["h:8", "h:9"];
        for i in 0..REDIRECTS_PER_CALL_MAX as usize {
            let next = cycle[i % 2];
            assert!(matches!(call.next_step(hint_to(next)), Ok(Step::RetryNow)));
            assert_eq!(call.target.uri(), format!("http://{next}"));
        }
        let next = cycle[REDIRECTS_PER_CALL_MAX as usize % 2];
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
        let mut call = Call::new(&router);
        assert!(matches!(
            call.next_step(hint_to("a:1")),
            Ok(Step::RetryAfter(_))
        ));
        assert_eq!(call.redirects, 0);
    }

    #[test]
    fn transient_errors_spend_the_attempt_budget() {
        let router = router(&["a:1", "b:2"], 3);
        let mut call = Call::new(&router);
        for _ in 0..2 {
            let step = call.next_step(Outcome::Transient("refused".into()));
            assert!(matches!(step, Ok(Step::RetryAfter(_))));
        }
        let last = call.next_step(Outcome::Transient("refused".into()));
        assert!(matches!(last, Err(Error::Unavailable { attempts: 3, .. })));
    }

    #[test]
    fn no_leader_rotates_and_backs_off_after_each_full_pass() {
        let router = router(&["a:1", "b:2"], 1);
        let mut call = Call::new(&router);
        let first = call.target.clone();
        assert!(matches!(
            call.next_step(Outcome::NotLeader(Hint::None)),
            Ok(Step::RetryNow)
        ));
        assert_ne!(call.target, first);
        for _ in 0..10 {
            let step = call.next_step(Outcome::NotLeader(Hint::None));
            assert!(matches!(step, Ok(Step::RetryAfter(_))));
            let step = call.next_step(Outcome::NotLeader(Hint::None));
            assert!(matches!(step, Ok(Step::RetryNow)));
        }
        assert_eq!(call.attempts_failed, 0, "an election spends no attempt");
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
