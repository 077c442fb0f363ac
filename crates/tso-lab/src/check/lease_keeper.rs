//! The library clients of `--workload lease --mode library`: holders that hold their leases
//! through [`LeaseKeeper`] and readers that call [`Client::safe_frontier`], all on one shared
//! client library. Stampers stay raw (`lease_client.rs`): rule 5 needs each grant's epoch.
//!
//! A keeper makes its calls on its own, so a holder records what it sees of them: the keeper's
//! start (an acquire, then a renewal) as one acquire; each renewal the keeper made in the
//! background when the holder first sees its grant, spanning from the instant the keeper's
//! schedule let it send its first attempt (any failed attempts lie inside too); the stop (a
//! release) as a release, preceded by an ambiguous renewal when one may have been under way
//! unseen; and every permit the keeper gives. Invariant: a permit is recorded only after the
//! grant it came from, so rule 6 pairs each permit with the latest grant recorded before it.
//!
//! Each keeper gets a holder epoch one above the last and a TTL drawn anew, holds for one to
//! three TTLs asking for a permit every `PERMIT_PAUSE`, then is stopped (its lease released)
//! or, one time in three, superseded: the next keeper starts first, so the old lease is
//! superseded while its keeper still runs.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tso_client::{Client, LEASE_EXPIRY_MARGIN_DEFAULT, LeaseKeeper};

use super::clients::Shared;
use super::history::monotonic_ns;
use super::lease::{LeaseCall, LeaseOp, LeaseOutcome};
use super::lease_client::{call_succeeded, draw_ttl_ms, holder_name};

/// A keeper renews when `ttl / RENEW_AHEAD_DIVISOR` is left (its default, set explicitly: the
/// recorded renewals start from that instant).
const RENEW_AHEAD_DIVISOR: u32 = 3;
/// A holder asks its keeper for a permit this often: 50 a second, so a permit given past the
/// lease's end would show within 20 ms of it.
const PERMIT_PAUSE: Duration = Duration::from_millis(20);
/// Readers wait this long between frontier reads, like the raw ones.
const POLL_PAUSE: Duration = Duration::from_millis(10);
/// Pause after a failed call.
const FAILED_PAUSE: Duration = Duration::from_millis(20);
/// The code of the ambiguous renewal recorded when a keeper stops while one may have been under
/// way without the holder seeing its answer.
pub const UNSEEN_RENEWAL: &str = "KeeperRenewalUnseen";

/// A holder whose leases a [`LeaseKeeper`] holds.
pub struct KeeperHolder {
    pub id: u32,
    pub seed: u64,
    pub client: Client,
    pub shared: Arc<Shared>,
}

/// One running keeper and what the holder saw of it.
struct Held {
    keeper: LeaseKeeper,
    lease_id: u64,
    ttl: Duration,
    /// The end of the permits of the latest grant seen: identifies that grant.
    valid_until: tokio::time::Instant,
    /// When the keeper may send its next renewal (`CLOCK_MONOTONIC` ns), by the latest grant.
    renew_at_ns: u64,
}

impl KeeperHolder {
    /// Holds leases until told to stop or the budget runs out; returns every call it recorded.
    pub async fn run(self) -> Vec<LeaseCall> {
        let mut rng = StdRng::seed_from_u64(
            self.seed ^ u64::from(self.id).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let name = holder_name(self.seed, self.id);
        let mut calls = Vec::new();
        let mut holder_epoch = 0;
        let mut next: Option<Held> = None;
        while !self.shared.is_stopped() && self.shared.take_call() {
            let held = match next.take() {
                Some(held) => Some(held),
                None => {
                    holder_epoch += 1;
                    let ttl_ms = draw_ttl_ms(&mut rng);
                    self.start(&name, holder_epoch, ttl_ms, &mut calls).await
                }
            };
            let Some(mut held) = held else {
                self.shared.sleep_until(Instant::now() + FAILED_PAUSE).await;
                continue;
            };
            let hold = held.ttl.mul_f64(rng.random_range(1.0..=3.0));
            let kept = self
                .hold(&mut held, Instant::now() + hold, &mut calls)
                .await;
            if kept && !self.shared.is_stopped() && rng.random_ratio(1, 3) {
                holder_epoch += 1;
                let ttl_ms = draw_ttl_ms(&mut rng);
                next = self.start(&name, holder_epoch, ttl_ms, &mut calls).await;
            }
            self.stop(held, &mut calls).await;
        }
        if let Some(held) = next {
            self.stop(held, &mut calls).await;
        }
        calls
    }

    /// Starts a keeper, recorded as an acquire answered with the grant it starts from.
    async fn start(
        &self,
        name: &[u8],
        holder_epoch: u64,
        ttl_ms: u64,
        calls: &mut Vec<LeaseCall>,
    ) -> Option<Held> {
        let ttl = Duration::from_millis(ttl_ms);
        let op = LeaseOp::Acquire {
            holder: self.id,
            holder_epoch,
            ttl_ms,
        };
        let start_ns = monotonic_ns();
        let started = LeaseKeeper::builder(name, holder_epoch, ttl)
            .expiry_margin(LEASE_EXPIRY_MARGIN_DEFAULT)
            .renew_ahead(ttl / RENEW_AHEAD_DIVISOR)
            .start(&self.client)
            .await;
        let end_ns = monotonic_ns();
        let (held, outcome) = match started {
            Ok(keeper) => match keeper.grant() {
                Some(grant) => {
                    let outcome = LeaseOutcome::Lease {
                        lease_id: grant.lease_id(),
                        bound_ms: grant.ts_upper_bound_ms(),
                        epoch: grant.epoch().get(),
                    };
                    let held = Held {
                        lease_id: grant.lease_id(),
                        ttl,
                        valid_until: grant.local_expiry() - LEASE_EXPIRY_MARGIN_DEFAULT,
                        renew_at_ns: renew_at_ns(&grant),
                        keeper,
                    };
                    (Some(held), outcome)
                }
                None => {
                    // Lost before the holder looked: the lease exists, with an unseen bound.
                    let _ = keeper.stop().await;
                    (None, LeaseOutcome::Ambiguous("LeaseLost".into()))
                }
            },
            // The acquire may have answered before the renewal failed: ambiguous, unless the
            // acquire itself was refused.
            Err(err @ tso_client::Error::StaleHolderEpoch { .. })
            | Err(err @ tso_client::Error::LeaseTtlDiffers { .. }) => {
                (None, LeaseOutcome::Refused(error_name(&err)))
            }
            Err(err) => (None, LeaseOutcome::Ambiguous(error_name(&err))),
        };
        self.record(calls, start_ns, end_ns, op, outcome);
        held
    }

    /// Asks for a permit every [`PERMIT_PAUSE`] until `until`, the lease is lost, or the run
    /// stops; records each permit given. Returns whether the keeper still holds the lease.
    async fn hold(&self, held: &mut Held, until: Instant, calls: &mut Vec<LeaseCall>) -> bool {
        while Instant::now() < until && !self.shared.is_stopped() {
            if !self.observe(held, calls) {
                return false;
            }
            let start_ns = monotonic_ns();
            match held.keeper.permit() {
                // The stamp itself is not checked: `allows` at the bound asks only whether the
                // permit still runs.
                Ok(permit)
                    if permit.valid_until() == held.valid_until
                        && permit.allows(permit.ts_upper_bound_ms()) =>
                {
                    if !self.shared.take_call() {
                        return true;
                    }
                    let op = LeaseOp::Permit {
                        lease_id: held.lease_id,
                        ttl_ms: held.ttl.as_millis() as u64,
                    };
                    let outcome = LeaseOutcome::Permitted {
                        bound_ms: permit.ts_upper_bound_ms(),
                    };
                    self.record(calls, start_ns, monotonic_ns(), op, outcome);
                }
                // A grant newer than the one recorded (seen at the next turn), or the permit
                // ran out in between: no stamp.
                Ok(_) => {}
                // Stall: the keeper keeps renewing.
                Err(tso_client::Error::LeaseStalled { .. }) => {}
                Err(_) => return false,
            }
            self.shared.sleep_until(Instant::now() + PERMIT_PAUSE).await;
        }
        true
    }

    /// Records a renewal whose grant the holder has not seen yet; false once the lease is lost.
    fn observe(&self, held: &mut Held, calls: &mut Vec<LeaseCall>) -> bool {
        let Some(grant) = held.keeper.grant() else {
            return false;
        };
        let valid_until = grant.local_expiry() - LEASE_EXPIRY_MARGIN_DEFAULT;
        if valid_until == held.valid_until {
            return true;
        }
        let sent_ns = requested_ns(&grant);
        let op = LeaseOp::Renew {
            lease_id: held.lease_id,
            ttl_ms: held.ttl.as_millis() as u64,
        };
        let outcome = LeaseOutcome::Lease {
            lease_id: grant.lease_id(),
            bound_ms: grant.ts_upper_bound_ms(),
            epoch: grant.epoch().get(),
        };
        self.record(
            calls,
            held.renew_at_ns.min(sent_ns),
            monotonic_ns(),
            op,
            outcome,
        );
        held.valid_until = valid_until;
        held.renew_at_ns = renew_at_ns(&grant);
        true
    }

    /// Stops the keeper (it releases the lease), recorded as a release.
    async fn stop(&self, mut held: Held, calls: &mut Vec<LeaseCall>) {
        self.observe(&mut held, calls);
        let start_ns = monotonic_ns();
        if held.renew_at_ns < start_ns {
            let op = LeaseOp::Renew {
                lease_id: held.lease_id,
                ttl_ms: held.ttl.as_millis() as u64,
            };
            let outcome = LeaseOutcome::Ambiguous(UNSEEN_RENEWAL.into());
            self.record(calls, held.renew_at_ns, start_ns, op, outcome);
        }
        let outcome = match held.keeper.stop().await {
            Ok(()) => LeaseOutcome::Released,
            Err(err) => LeaseOutcome::Ambiguous(error_name(&err)),
        };
        let op = LeaseOp::Release {
            lease_id: held.lease_id,
        };
        self.record(calls, start_ns, monotonic_ns(), op, outcome);
    }

    fn record(
        &self,
        calls: &mut Vec<LeaseCall>,
        start_ns: u64,
        end_ns: u64,
        op: LeaseOp,
        outcome: LeaseOutcome,
    ) {
        let call = LeaseCall {
            client: self.id,
            start_ns,
            end_ns,
            op,
            outcome,
        };
        if call_succeeded(&call) {
            self.shared.last_ok_ns.fetch_max(end_ns, Ordering::Relaxed);
        }
        calls.push(call);
    }
}

/// A reader of the safe frontier through the client library.
pub struct LibraryReader {
    pub id: u32,
    pub client: Client,
    pub shared: Arc<Shared>,
}

impl LibraryReader {
    /// Reads until told to stop or the budget runs out; returns every read.
    pub async fn run(self) -> Vec<LeaseCall> {
        let mut calls = Vec::new();
        while !self.shared.is_stopped() && self.shared.take_call() {
            let start_ns = monotonic_ns();
            let read = self.client.safe_frontier().await;
            let end_ns = monotonic_ns();
            // A frontier read writes nothing: every failure is a refusal.
            let (outcome, pause) = match read {
                Ok(frontier) => (
                    LeaseOutcome::Frontier {
                        frontier_ms: frontier.physical_ms(),
                        epoch: frontier.epoch().get(),
                    },
                    POLL_PAUSE,
                ),
                Err(err) => (LeaseOutcome::Refused(error_name(&err)), FAILED_PAUSE),
            };
            let call = LeaseCall {
                client: self.id,
                start_ns,
                end_ns,
                op: LeaseOp::Frontier,
                outcome,
            };
            if call_succeeded(&call) {
                self.shared.last_ok_ns.fetch_max(end_ns, Ordering::Relaxed);
            }
            calls.push(call);
            self.shared.sleep_until(Instant::now() + pause).await;
        }
        calls
    }
}

/// When the call that brought `grant` started, in `CLOCK_MONOTONIC` ns, rounded down.
fn requested_ns(grant: &tso_client::LeaseGrant) -> u64 {
    instant_ns(grant.requested_at())
}

/// When the keeper renews after `grant`: `requested_at + ttl - ttl / RENEW_AHEAD_DIVISOR`.
fn renew_at_ns(grant: &tso_client::LeaseGrant) -> u64 {
    let ahead = grant.ttl() - grant.ttl() / RENEW_AHEAD_DIVISOR;
    requested_ns(grant) + ahead.as_nanos() as u64
}

/// A past instant in `CLOCK_MONOTONIC` ns (std's `Instant`, under tokio's, reads that clock
/// on Linux), never later than it was: the checker's clock is read first, then the instant's.
fn instant_ns(at: tokio::time::Instant) -> u64 {
    let now_ns = monotonic_ns();
    let now = tokio::time::Instant::now();
    now_ns.saturating_sub(now.saturating_duration_since(at).as_nanos() as u64)
}

/// The name of a client library error's kind (`Unavailable`, `LeaseLost`, ...), as recorded.
fn error_name(err: &tso_client::Error) -> String {
    let debug = format!("{err:?}");
    let name = debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or_default();
    match err {
        tso_client::Error::Server { code, .. } => crate::targets::code_name(*code),
        _ => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_named_by_kind() {
        let down = tso_client::Error::Unavailable {
            attempts: 3,
            last: "refused".into(),
        };
        assert_eq!(error_name(&down), "Unavailable");
        assert_eq!(error_name(&tso_client::Error::Closed), "Closed");
        let server = tso_client::Error::Server {
            endpoint: "x".into(),
            code: tonic::Code::Internal,
            message: "m".into(),
        };
        assert_eq!(
            error_name(&server),
            crate::targets::code_name(tonic::Code::Internal)
        );
    }

    #[test]
    fn an_instant_maps_to_monotonic_ns_never_later() {
        let before_ns = monotonic_ns();
        let at = tokio::time::Instant::now();
        let after_ns = monotonic_ns();
        let ns = instant_ns(at);
        assert!(ns <= after_ns, "{ns} > {after_ns}");
        // The conversion is exact up to the two clock reads it takes (well under 10 ms).
        assert!(ns + 10_000_000 >= before_ns, "{ns} far below {before_ns}");
    }
}
