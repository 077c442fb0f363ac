//! The lease calls (`AcquireLease`, `RenewLease`, `ReleaseLease`) and `GetSafeFrontier`, each
//! one RPC per attempt, driven by the same loop as `GetTs` (`call::drive`): hints followed for
//! free, the leader cached, rotation and backoff while no leader is known.
//!
//! Invariant: every attempt of these calls is safe to repeat, so transport errors, timeouts and
//! `UNAVAILABLE` are retried within the call's attempt budget and deadline, like `GetTs`:
//! - `AcquireLease` is idempotent per `(holder, holder_epoch)`: a repeat while the lease lives
//!   returns the same lease; one after it ended creates a new one, which the first never
//!   reached the caller to be used.
//! - `RenewLease` only moves the lease's bound and expiry forward from the server's clock: a
//!   repeat renews again, and the grant the caller keeps is conservative because its local
//!   expiry runs from the start of the call, before the first attempt was sent.
//! - `ReleaseLease` is idempotent (an unknown id is fine); `GetSafeFrontier` writes nothing.
//!
//! `UNAVAILABLE` means a durable write failed and nothing changed. The only
//! `FAILED_PRECONDITION` followed is "not leader"; any other is the lease's own refusal
//! ([`Error::StaleHolderEpoch`], [`Error::LeaseLost`]). A follower answers `GetSafeFrontier`
//! with 0 and a zero epoch, no error and no hint: that reply is treated as "not leader, no
//! leader known", so the call moves on to the next endpoint until one leads or the deadline
//! passes.

use std::error::Error as _;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;
use tso_proto::v1::tso_service_client::TsoServiceClient;
use tso_proto::v1::{GetSafeFrontierRequest, ReleaseLeaseRequest, RenewLeaseRequest};

use crate::attempt::{AttemptClock, Outcome, hint_of, is_timeout};
use crate::call::{LastError, drive};
use crate::endpoint::{Hint, Target};
use crate::lease::{self, AcquireRequest, Frontier, LeaseGrant, Released};
use crate::router::Router;
use crate::{Error, Result};

/// The message of a "not leader" refusal (docs/protocol.md): the only `FAILED_PRECONDITION`
/// that is followed.
const NOT_LEADER: &str = "not leader";

/// Which RPC an attempt made: how a refusal of it reads.
#[derive(Clone, Copy, Debug)]
enum Rpc {
    Acquire { holder_epoch: u64 },
    Renew { lease_id: u64 },
    Release,
    Frontier,
}

/// Acquires the lease `request` asks for before `deadline`.
pub(crate) async fn acquire(
    router: &Router,
    request: &AcquireRequest,
    deadline: Instant,
) -> Result<LeaseGrant> {
    let requested_at = Instant::now();
    let last_error = LastError::new("none".into());
    let rpc = Rpc::Acquire {
        holder_epoch: request.holder_epoch(),
    };
    drive(router, deadline, &last_error, |target| async move {
        let reply = exchange(router, &target, deadline, rpc, |mut client, budget| {
            let mut wire = tonic::Request::new(request.to_wire());
            wire.set_timeout(budget);
            async move { client.acquire_lease(wire).await }
        })
        .await;
        checked(&target, reply, |reply| request.grant(&reply, requested_at))
    })
    .await
}

/// Renews lease `lease_id` (acquired with `ttl`) before `deadline`.
pub(crate) async fn renew(
    router: &Router,
    lease_id: u64,
    ttl: Duration,
    deadline: Instant,
) -> Result<LeaseGrant> {
    let requested_at = Instant::now();
    let last_error = LastError::new("none".into());
    let rpc = Rpc::Renew { lease_id };
    drive(router, deadline, &last_error, |target| async move {
        let reply = exchange(router, &target, deadline, rpc, |mut client, budget| {
            let mut wire = tonic::Request::new(RenewLeaseRequest { lease_id });
            wire.set_timeout(budget);
            async move { client.renew_lease(wire).await }
        })
        .await;
        checked(&target, reply, |reply| {
            lease::renewed(lease_id, ttl, &reply, requested_at)
        })
    })
    .await
}

/// Releases lease `lease_id` before `deadline`.
pub(crate) async fn release(router: &Router, lease_id: u64, deadline: Instant) -> Result<()> {
    let last_error = LastError::new("none".into());
    drive(router, deadline, &last_error, |target| async move {
        let reply = exchange(
            router,
            &target,
            deadline,
            Rpc::Release,
            |mut client, budget| {
                let mut wire = tonic::Request::new(ReleaseLeaseRequest { lease_id });
                wire.set_timeout(budget);
                async move { client.release_lease(wire).await }
            },
        )
        .await;
        checked(&target, reply, |_| Ok(Released))
    })
    .await
    .map(|Released| ())
}

/// The safe frontier from a node that leads, before `deadline`.
pub(crate) async fn frontier(router: &Router, deadline: Instant) -> Result<Frontier> {
    let last_error = LastError::new("none".into());
    drive(router, deadline, &last_error, |target| async move {
        let reply = exchange(
            router,
            &target,
            deadline,
            Rpc::Frontier,
            |mut client, budget| {
                let mut wire = tonic::Request::new(GetSafeFrontierRequest {});
                wire.set_timeout(budget);
                async move { client.get_safe_frontier(wire).await }
            },
        )
        .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(outcome) => return outcome,
        };
        match lease::frontier(&reply) {
            Ok(Some(frontier)) => Outcome::Granted(frontier),
            Ok(None) => {
                tracing::debug!(%target, "frontier 0 with a zero epoch: not leading");
                Outcome::NotLeader(Hint::None)
            }
            Err(reason) => malformed(&target, reason),
        }
    })
    .await
}

/// A reply checked by `check`, or the outcome of the failed attempt.
fn checked<R, G>(
    target: &Target,
    reply: Result<R, Outcome<G>>,
    check: impl FnOnce(R) -> Result<G, String>,
) -> Outcome<G> {
    match reply.map(check) {
        Ok(Ok(grant)) => Outcome::Granted(grant),
        Ok(Err(reason)) => malformed(target, reason),
        Err(outcome) => outcome,
    }
}

fn malformed<G>(target: &Target, reason: String) -> Outcome<G> {
    Outcome::Fatal(Error::MalformedReply {
        endpoint: target.to_string(),
        reason,
    })
}

/// One RPC to `target` made by `send` (given a client and the attempt's time budget), bounded
/// by the per-attempt deadline and the call's deadline: the reply, or what the failure means.
async fn exchange<R, G, F>(
    router: &Router,
    target: &Target,
    deadline: Instant,
    rpc: Rpc,
    send: impl FnOnce(TsoServiceClient<Channel>, Duration) -> F,
) -> Result<R, Outcome<G>>
where
    F: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let clock = AttemptClock::start(deadline, router.config().attempt_timeout);
    let budget = clock.budget();
    let timed_out = || {
        if clock.cut_by_caller() {
            return Outcome::DeadlinePassed;
        }
        router.drop_channel(target);
        Outcome::Unreachable(format!("{target} did not answer within {budget:?}"))
    };
    let client = TsoServiceClient::new(router.channel(target));
    match tokio::time::timeout_at(clock.deadline(), send(client, budget)).await {
        Err(_) => Err(timed_out()),
        Ok(Ok(reply)) => Ok(reply.into_inner()),
        Ok(Err(status)) if is_timeout(&status) => Err(timed_out()),
        Ok(Err(status)) if status.source().is_some() => {
            // Made on this side from a transport error; a server's status carries no source.
            router.drop_channel(target);
            Err(Outcome::Unreachable(format!("{target}: {status}")))
        }
        Ok(Err(status)) => Err(classify(rpc, target, &status)),
    }
}

/// Sorts a status sent by the server into what the call does next (docs/protocol.md, errors).
fn classify<G>(rpc: Rpc, target: &Target, status: &tonic::Status) -> Outcome<G> {
    let message = status.message().to_owned();
    let server_error = |code| {
        Outcome::Fatal(Error::Server {
            endpoint: target.to_string(),
            code,
            message: message.clone(),
        })
    };
    match (status.code(), rpc) {
        (Code::FailedPrecondition, _) if status.message() == NOT_LEADER => {
            match hint_of(target, status) {
                Ok(hint) => Outcome::NotLeader(hint),
                Err(reason) => Outcome::MalformedHint(reason),
            }
        }
        (Code::FailedPrecondition, Rpc::Acquire { holder_epoch })
            if message.contains(TTL_DIFFERS_MARK) =>
        {
            Outcome::Fatal(Error::LeaseTtlDiffers {
                holder_epoch,
                message,
            })
        }
        (Code::FailedPrecondition, Rpc::Acquire { holder_epoch }) => {
            Outcome::Fatal(Error::StaleHolderEpoch {
                holder_epoch,
                message,
            })
        }
        (Code::FailedPrecondition, Rpc::Renew { lease_id }) => {
            Outcome::Fatal(Error::LeaseLost { lease_id, message })
        }
        (Code::NotFound, Rpc::Renew { lease_id }) => {
            Outcome::Fatal(Error::LeaseNotFound { lease_id })
        }
        (Code::InvalidArgument, _) => Outcome::Fatal(Error::InvalidArgument { message }),
        // A durable write failed and nothing changed (or the server could not tell): every
        // one of these RPCs is safe to repeat (module docs).
        (Code::Unavailable | Code::Unknown, _) => Outcome::Refused(format!(
            "{target}: {:?}: {}",
            status.code(),
            status.message()
        )),
        (code, _) => server_error(code),
    }
}

/// What the server's refusal of an acquire with another TTL than the live lease's says (the
/// wire has no field for it; tso-server's `stamping.rs` writes this phrase).
const TTL_DIFFERS_MARK: &str = "with a TTL of";

#[cfg(test)]
mod tests {
    use tonic::metadata::{MetadataMap, MetadataValue};

    use super::*;
    use crate::endpoint::{Scheme, parse_address};

    fn kind(outcome: &Outcome<Released>) -> String {
        match outcome {
            Outcome::Granted(_) => "granted".into(),
            Outcome::NotLeader(_) => "not leader".into(),
            Outcome::MalformedHint(_) => "malformed hint".into(),
            Outcome::Refused(_) => "refused".into(),
            Outcome::Unreachable(_) => "unreachable".into(),
            Outcome::DeadlinePassed => "deadline".into(),
            Outcome::Uncertain { .. } => "uncertain".into(),
            Outcome::Fatal(Error::Server { code, .. }) => format!("server {code:?}"),
            Outcome::Fatal(error) => format!("{error:?}"),
        }
    }

    #[test]
    fn refusals_read_per_rpc_and_only_not_leader_is_followed() {
        let target = parse_address("a:1", Scheme::Http).unwrap();
        let classify = |rpc, status: tonic::Status| kind(&classify(rpc, &target, &status));
        let mut hinted = MetadataMap::new();
        hinted.insert_bin(tso_proto::LEADER_HINT_KEY, MetadataValue::from_bytes(&[]));
        let not_leader =
            tonic::Status::with_metadata(Code::FailedPrecondition, "not leader", hinted);
        let acquire = Rpc::Acquire { holder_epoch: 3 };
        let renew = Rpc::Renew { lease_id: 9 };
        for rpc in [acquire, renew, Rpc::Release, Rpc::Frontier] {
            assert_eq!(classify(rpc, not_leader.clone()), "not leader", "{rpc:?}");
            let unavailable = tonic::Status::unavailable("write failed");
            assert_eq!(classify(rpc, unavailable), "refused", "{rpc:?}");
            let unimplemented = tonic::Status::unimplemented("no leases");
            assert_eq!(classify(rpc, unimplemented), "server Unimplemented");
            let invalid = tonic::Status::invalid_argument("ttl");
            assert!(classify(rpc, invalid).starts_with("InvalidArgument"));
        }
        let stale = tonic::Status::failed_precondition("holder_epoch 3 < 4");
        assert_eq!(
            classify(acquire, stale.clone()),
            "StaleHolderEpoch { holder_epoch: 3, message: \"holder_epoch 3 < 4\" }"
        );
        assert!(classify(renew, stale.clone()).starts_with("LeaseLost { lease_id: 9"));
        assert_eq!(classify(Rpc::Release, stale), "server FailedPrecondition");
        let unknown = tonic::Status::not_found("lease 9");
        assert_eq!(
            classify(renew, unknown.clone()),
            "LeaseNotFound { lease_id: 9 }"
        );
        assert_eq!(classify(acquire, unknown), "server NotFound");
    }
}
