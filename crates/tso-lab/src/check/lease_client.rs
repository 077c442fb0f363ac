//! The recording clients of `--workload lease` on raw `tsoracle.v1` lease RPCs over tonic.
//!
//! Each client has one role, fixed by its id: a holder (its own holder name, holder epochs
//! counted from 1, a TTL drawn for each holder epoch) loops acquire, renew a few times, and now
//! and then releases or supersedes its lease with a higher holder epoch; a reader polls
//! `GetSafeFrontier`; a stamper calls `GetTs` so bounds can be checked against grants before
//! them and grants of later leaders against bounds. Pinned clients (one per node of a cluster)
//! are readers: a deposed leader's frontier is then read too. The others follow "not leader"
//! hints and rotate through the endpoints when a node is unreachable. A failure is recorded as
//! a definite refusal when the protocol says nothing changed, as ambiguous otherwise. With
//! `--mode library` holders and readers go through the client library instead
//! (`lease_keeper.rs`); stampers stay raw, since a grant's epoch is part of the record.
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tso_proto::v1::tso_service_client::TsoServiceClient;
use tso_proto::v1::{
    AcquireLeaseRequest, EpochWire, GetSafeFrontierRequest, GetTsRequest, ReleaseLeaseRequest,
    RenewLeaseRequest,
};

use super::clients::Shared;
use super::history::monotonic_ns;
use super::lease::{LeaseCall, LeaseOp, LeaseOutcome};
use crate::targets::{Targets, code_name, leader_hint};

/// The TTLs holders draw from, one for each holder epoch: from the servers' floor in a check
/// (2 s, whose bound is below the leader's window, 3 s ahead, so the frontier is often held
/// back by a lease, and which expires within a short run) to 10 s.
pub const LEASE_TTLS_MS: [u64; 4] = [2_000, 3_000, 5_000, 10_000];
/// The shortest TTL the servers of a lease check accept (`tso serve --lease-ttl-min`), below
/// the default 5 s: the shortest of [`LEASE_TTLS_MS`]. A keeper renews a third of the TTL
/// before its end and stalls its default margin (500 ms) before it, so 2 s still leaves it a
/// renewal window.
pub const SERVE_LEASE_TTL_MIN_FLAGS: [&str; 2] = ["--lease-ttl-min", "2s"];

const _: () = assert!(
    LEASE_TTLS_MS[0] == 2_000,
    "SERVE_LEASE_TTL_MIN_FLAGS says 2s"
);
/// A holder waits up to this share of its TTL (in thousandths) between calls on a live lease:
/// long enough that a failover often falls in a wait, short enough to renew before expiry.
const HOLD_WAIT_PER_MILLE: u64 = 600;
/// Readers and stampers wait this long between calls: about 100 calls/s each, enough to see
/// every failover from both sides without filling the history.
const POLL_PAUSE: Duration = Duration::from_millis(10);
/// Pause after a failed call, and after rotating to another endpoint.
const FAILED_PAUSE: Duration = Duration::from_millis(20);

/// What a client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Holder,
    Reader,
    Stamper,
}

/// The role of client `id` when clients `0..pinned` are pinned: pinned clients read; the others
/// cycle holder, stamper, holder, reader (the first three cover every rule).
pub fn role(id: u32, pinned: usize) -> Role {
    let Some(k) = (id as usize).checked_sub(pinned) else {
        return Role::Reader;
    };
    match k % 4 {
        0 | 2 => Role::Holder,
        1 => Role::Stamper,
        _ => Role::Reader,
    }
}

/// A TTL for a new holder epoch.
pub fn draw_ttl_ms(rng: &mut StdRng) -> u64 {
    LEASE_TTLS_MS[rng.random_range(0..LEASE_TTLS_MS.len())]
}

/// Where a client sends its calls: a node of its own, or whoever leads.
pub struct LeaseRoute {
    targets: Arc<Targets>,
    slot: usize,
    rotation: usize,
    client: TsoServiceClient<Channel>,
    pinned: bool,
}

impl LeaseRoute {
    /// On connection `slot` of endpoint `node`; only there if `pinned`.
    pub fn new(
        targets: Arc<Targets>,
        node: usize,
        slot: usize,
        pinned: bool,
    ) -> anyhow::Result<LeaseRoute> {
        let rotation = node % targets.endpoints().len();
        let client = targets.client(&targets.endpoints()[rotation].clone(), slot)?;
        Ok(LeaseRoute {
            targets,
            slot,
            rotation,
            client,
            pinned,
        })
    }

    /// Moves after an error, unless pinned: to the leader a "not leader" reply names, or to the
    /// next endpoint when there is no hint or no answer. A refusal the protocol defines (an
    /// expired or unknown lease, a bad argument) is the leader's answer: stay.
    async fn follow(&mut self, status: &Status) {
        if self.pinned {
            return;
        }
        if let Some(leader) = leader_hint(status) {
            if let Ok(next) = self.targets.client(&leader, self.slot) {
                self.client = next;
            }
            return;
        }
        let not_leader =
            status.code() == Code::FailedPrecondition && status.message() == "not leader";
        if is_refusal(status.code()) && !not_leader {
            return;
        }
        self.rotation = (self.rotation + 1) % self.targets.endpoints().len();
        let endpoint = self.targets.endpoints()[self.rotation].clone();
        if let Ok(next) = self.targets.client(&endpoint, self.slot) {
            self.client = next;
        }
        tokio::time::sleep(FAILED_PAUSE).await;
    }

    /// The reply, or the status after following it.
    async fn settle<T>(&mut self, reply: Result<tonic::Response<T>, Status>) -> Result<T, Status> {
        match reply {
            Ok(reply) => Ok(reply.into_inner()),
            Err(status) => {
                self.follow(&status).await;
                Err(status)
            }
        }
    }

    pub async fn call(&mut self, op: LeaseOp, holder: &[u8]) -> Result<LeaseOutcome, Status> {
        let epoch =
            |e: Option<EpochWire>| e.map_or(0, |e| u128::from(e.hi) << 64 | u128::from(e.lo));
        let both = |hi: u64, lo: u64| u128::from(hi) << 64 | u128::from(lo);
        Ok(match op {
            LeaseOp::Acquire {
                holder_epoch,
                ttl_ms,
                ..
            } => {
                let request = AcquireLeaseRequest {
                    holder: holder.to_vec(),
                    holder_epoch,
                    ttl_ms,
                };
                let reply = self.client.acquire_lease(request).await;
                let reply = self.settle(reply).await?;
                LeaseOutcome::Lease {
                    lease_id: reply.lease_id,
                    bound_ms: reply.ts_upper_bound,
                    epoch: epoch(reply.epoch),
                }
            }
            LeaseOp::Renew { lease_id, .. } => {
                let reply = self
                    .client
                    .renew_lease(RenewLeaseRequest { lease_id })
                    .await;
                let reply = self.settle(reply).await?;
                LeaseOutcome::Lease {
                    lease_id,
                    bound_ms: reply.ts_upper_bound,
                    epoch: epoch(reply.epoch),
                }
            }
            LeaseOp::Release { lease_id } => {
                let reply = self
                    .client
                    .release_lease(ReleaseLeaseRequest { lease_id })
                    .await;
                self.settle(reply).await?;
                LeaseOutcome::Released
            }
            LeaseOp::Frontier => {
                let reply = self
                    .client
                    .get_safe_frontier(GetSafeFrontierRequest {})
                    .await;
                let reply = self.settle(reply).await?;
                LeaseOutcome::Frontier {
                    frontier_ms: reply.frontier_physical_ms,
                    epoch: both(reply.epoch_hi, reply.epoch_lo),
                }
            }
            LeaseOp::Permit { .. } => unreachable!("a permit is the keeper's, not an RPC"),
            LeaseOp::Ts => {
                let reply = self.client.get_ts(GetTsRequest { count: 1 }).await;
                let reply = self.settle(reply).await?;
                LeaseOutcome::Granted {
                    physical_ms: reply.physical_ms,
                    epoch: both(reply.epoch_hi, reply.epoch_lo),
                }
            }
        })
    }
}

/// Codes by which the server says it changed nothing (docs/protocol.md, status codes).
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::FailedPrecondition
            | Code::NotFound
            | Code::InvalidArgument
            | Code::ResourceExhausted
            | Code::Unimplemented
    )
}

/// A failed call as recorded: refused when nothing was sent or the server refused; ambiguous
/// otherwise (a timeout, a lost connection, `UNAVAILABLE` after a write that may have landed).
/// "Not leader" to an acquire or renew is ambiguous too: a leader that loses its term while
/// writing the lease set answers it, and the write may still commit in the next term
/// (SEMANTICS §8: a write that committed in another term is reported `Fenced`).
fn failed(op: LeaseOp, status: &Status) -> LeaseOutcome {
    let code = code_name(status.code());
    let unknown_lease =
        status.code() == Code::NotFound && std::error::Error::source(status).is_none();
    let writes = matches!(op, LeaseOp::Acquire { .. } | LeaseOp::Renew { .. });
    let not_leader = status.code() == Code::FailedPrecondition && status.message() == "not leader";
    let refused =
        unknown_lease || !(tso_client::seq_status_is_uncertain(status) || writes && not_leader);
    if refused {
        LeaseOutcome::Refused(code)
    } else {
        LeaseOutcome::Ambiguous(code)
    }
}

/// One recording client of the lease workload.
pub struct LeaseClient {
    pub id: u32,
    pub seed: u64,
    pub role: Role,
    pub route: LeaseRoute,
    pub shared: Arc<Shared>,
}

/// What a holder holds between calls.
struct Holding {
    name: Vec<u8>,
    holder_epoch: u64,
    ttl_ms: u64,
    lease_id: Option<u64>,
}

impl LeaseClient {
    /// Calls until told to stop or the budget runs out; returns every call it made.
    pub async fn run(mut self) -> Vec<LeaseCall> {
        let mut rng = StdRng::seed_from_u64(
            self.seed ^ u64::from(self.id).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut holding = Holding {
            name: holder_name(self.seed, self.id),
            holder_epoch: 1,
            ttl_ms: draw_ttl_ms(&mut rng),
            lease_id: None,
        };
        let mut calls = Vec::new();
        while !self.shared.is_stopped() && self.shared.take_call() {
            let (op, pause) = match self.role {
                Role::Reader => (LeaseOp::Frontier, POLL_PAUSE),
                Role::Stamper => (LeaseOp::Ts, POLL_PAUSE),
                Role::Holder => (holder_op(&mut holding, self.id, &mut rng), Duration::ZERO),
            };
            let start_ns = monotonic_ns();
            let reply = self.route.call(op, &holding.name).await;
            let end_ns = monotonic_ns();
            let outcome = match &reply {
                Ok(outcome) => outcome.clone(),
                Err(status) => failed(op, status),
            };
            let call = LeaseCall {
                client: self.id,
                start_ns,
                end_ns,
                op,
                outcome,
            };
            if !self.route.pinned && call_succeeded(&call) {
                self.shared.last_ok_ns.fetch_max(end_ns, Ordering::Relaxed);
            }
            let pause = match self.role {
                Role::Holder => hold(&mut holding, &call, reply.as_ref().err(), &mut rng),
                _ if reply.is_err() => FAILED_PAUSE,
                _ => pause,
            };
            calls.push(call);
            self.shared.sleep_until(Instant::now() + pause).await;
        }
        calls
    }
}

pub fn call_succeeded(call: &LeaseCall) -> bool {
    super::history::Answered::succeeded(call)
}

/// The holder name of client `id`: distinct across runs with different seeds against one
/// server.
pub fn holder_name(seed: u64, id: u32) -> Vec<u8> {
    format!("tso-check-{seed}-{id}").into_bytes()
}

impl Holding {
    /// Moves to a new holder epoch, without a lease, with a newly drawn TTL (a live lease's
    /// holder epoch keeps its TTL: the server refuses another).
    fn next_epoch(&mut self, rng: &mut StdRng) {
        self.holder_epoch += 1;
        self.lease_id = None;
        self.ttl_ms = draw_ttl_ms(rng);
    }
}

/// A holder's next call: acquire without a lease; with one, mostly renew, sometimes release
/// it or supersede it (a higher holder epoch, acquired at once: the old lease binds on until
/// it expires).
fn holder_op(holding: &mut Holding, holder: u32, rng: &mut StdRng) -> LeaseOp {
    let acquire = |h: &Holding| LeaseOp::Acquire {
        holder,
        holder_epoch: h.holder_epoch,
        ttl_ms: h.ttl_ms,
    };
    let Some(lease_id) = holding.lease_id else {
        return acquire(holding);
    };
    match rng.random_range(0..10) {
        0 => LeaseOp::Release { lease_id },
        1 => {
            holding.next_epoch(rng);
            acquire(holding)
        }
        _ => LeaseOp::Renew {
            lease_id,
            ttl_ms: holding.ttl_ms,
        },
    }
}

/// Updates a holder after its call and returns how long it waits before the next one.
fn hold(
    holding: &mut Holding,
    call: &LeaseCall,
    error: Option<&Status>,
    rng: &mut StdRng,
) -> Duration {
    let most_ms = holding.ttl_ms * HOLD_WAIT_PER_MILLE / 1_000;
    let wait = Duration::from_millis(rng.random_range(100..=most_ms));
    match (call.op, &call.outcome) {
        (LeaseOp::Acquire { .. } | LeaseOp::Renew { .. }, LeaseOutcome::Lease { lease_id, .. }) => {
            holding.lease_id = Some(*lease_id);
            wait
        }
        (LeaseOp::Release { .. }, _) => {
            // Released, or perhaps not: either way a new lease at a new holder epoch.
            holding.next_epoch(rng);
            wait
        }
        _ => {
            // A renewal the leader refused (expired, superseded, unknown) needs a new lease; a
            // stale holder epoch (never expected) a higher one. Anything else is retried as is
            // (an acquire at the same holder epoch gets the same lease back).
            let lost = error.is_some_and(|s| {
                let not_leader = s.message() == "not leader";
                matches!(s.code(), Code::NotFound | Code::FailedPrecondition) && !not_leader
            });
            if lost {
                holding.next_epoch(rng);
            }
            FAILED_PAUSE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_holder_name_is_inside_the_protocol_limit() {
        let longest = holder_name(u64::MAX, u32::MAX);
        assert!(
            longest.len() <= tso_proto::limits::LEASE_HOLDER_BYTES_MAX,
            "{}",
            longest.len()
        );
        assert_ne!(holder_name(1, 2), holder_name(2, 1));
    }

    #[test]
    fn roles_cover_every_rule() {
        let roles: Vec<Role> = (0..8).map(|id| role(id, 3)).collect();
        use Role::*;
        assert_eq!(
            roles,
            vec![
                Reader, Reader, Reader, Holder, Stamper, Holder, Reader, Holder
            ]
        );
        assert_eq!(role(0, 0), Holder);
        assert_eq!(role(1, 0), Stamper);
        let mut rng = StdRng::seed_from_u64(1);
        let ttls: std::collections::BTreeSet<u64> =
            (0..100).map(|_| draw_ttl_ms(&mut rng)).collect();
        assert_eq!(ttls.into_iter().collect::<Vec<_>>(), LEASE_TTLS_MS);
    }

    #[test]
    fn refusals_and_ambiguous_failures() {
        let renew = LeaseOp::Renew {
            lease_id: 3,
            ttl_ms: 2_000,
        };
        assert_eq!(
            failed(renew, &Status::not_found("lease 3 is unknown")),
            LeaseOutcome::Refused("NotFound".into())
        );
        assert_eq!(
            failed(renew, &Status::failed_precondition("lease 3 has expired")),
            LeaseOutcome::Refused("FailedPrecondition".into())
        );
        assert_eq!(
            failed(
                LeaseOp::Frontier,
                &Status::failed_precondition("not leader")
            ),
            LeaseOutcome::Refused("FailedPrecondition".into())
        );
        assert_eq!(
            failed(renew, &Status::failed_precondition("not leader")),
            LeaseOutcome::Ambiguous("FailedPrecondition".into())
        );
        assert_eq!(
            failed(renew, &Status::unavailable("write failed")),
            LeaseOutcome::Ambiguous("Unavailable".into())
        );
        assert_eq!(
            failed(LeaseOp::Ts, &Status::deadline_exceeded("timeout")),
            LeaseOutcome::Ambiguous("DeadlineExceeded".into())
        );
    }
}
