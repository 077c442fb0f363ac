//! One sequence call (`GetSeq` or `GetSeqBatch`): each call is its own RPC, never coalesced,
//! driven by the same loop as `GetTs` (`call::drive`): hints followed for free, the leader
//! cached, rotation and backoff while no leader is known.
//!
//! Invariant (SEMANTICS §11, D2): an attempt is retried only when it is known that the server
//! wrote nothing: it refused ("not leader", nothing written), or the request was never sent
//! (the connection could not be made). Everything that fails after the request was handed to
//! a connection (a timeout, a reset, `UNAVAILABLE`, `INTERNAL`, `UNKNOWN`, `DEADLINE_EXCEEDED`,
//! `CANCELLED`, any code the protocol does not define for a refusal) may have spent a block:
//! the call ends with [`Error::SeqUncertain`].
//!
//! Telling "not sent" from "sent" with tonic: the attempt first takes a channel that is already
//! connected (`Router::seq_channel`, which connects under the attempt's deadline), so a failure
//! or timeout there happens before any request exists. A connected channel whose connection
//! later broke reconnects inside the call; a failed reconnect reaches us as a status whose
//! causes hold `tonic::ConnectError`, which tonic only produces while connecting. Anything else
//! is treated as sent.

use std::error::Error as _;

use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;
use tso_proto::v1::tso_service_client::TsoServiceClient;

use crate::attempt::{AttemptClock, Outcome, hint_of, is_timeout};
use crate::call::{LastError, drive};
use crate::endpoint::Target;
use crate::router::{Router, SeqConnectError};
use crate::seq::{SeqBatch, SeqRequest, SeqRpc};
use crate::{Error, Result};

/// The message of a "not leader" refusal (docs/protocol.md): the only `FAILED_PRECONDITION`
/// that is followed. Any other (a counter that would pass `u64::MAX`) is final.
const NOT_LEADER: &str = "not leader";

/// Gets the blocks `request` asks for before `deadline`.
pub(crate) async fn fetch(
    router: &Router,
    request: &SeqRequest,
    deadline: Instant,
) -> Result<SeqBatch> {
    let last_error = LastError::new("none".into());
    drive(router, deadline, &last_error, |target| {
        attempt(router, target, request, deadline)
    })
    .await
}

/// One attempt at `target`: connect (nothing sent yet), then send once.
async fn attempt(
    router: &Router,
    target: Target,
    request: &SeqRequest,
    deadline: Instant,
) -> Outcome<SeqBatch> {
    let attempt_timeout = router.config().attempt_timeout;
    let clock = AttemptClock::start(deadline, attempt_timeout);
    let cut_by_caller = clock.cut_by_caller();
    let channel = match router.seq_channel(&target, clock.deadline()).await {
        Ok(channel) => channel,
        Err(SeqConnectError::TimedOut) if cut_by_caller => return Outcome::DeadlinePassed,
        Err(SeqConnectError::TimedOut) => {
            return Outcome::Unreachable(format!(
                "{target}: no connection within {attempt_timeout:?}"
            ));
        }
        Err(SeqConnectError::Failed(error)) => {
            return Outcome::Unreachable(format!("{target}: cannot connect: {error}"));
        }
    };
    let budget = clock.remaining();
    if budget.is_zero() {
        // Connecting took the whole attempt; the request was not sent.
        return if cut_by_caller {
            Outcome::DeadlinePassed
        } else {
            Outcome::Unreachable(format!("{target}: connecting took {attempt_timeout:?}"))
        };
    }
    let sent = send(channel, request, budget, &target);
    match tokio::time::timeout_at(clock.deadline(), sent).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(status)) => classify(router, &target, request, &status, cut_by_caller),
        Err(_) => {
            router.drop_seq_channel(&target);
            let reason = format!("no reply within {budget:?}");
            uncertain(&target, request, reason, !cut_by_caller)
        }
    }
}

/// Sends the request once and checks the reply against it.
async fn send(
    channel: Channel,
    request: &SeqRequest,
    budget: std::time::Duration,
    target: &Target,
) -> Result<Outcome<SeqBatch>, tonic::Status> {
    let mut client = TsoServiceClient::new(channel);
    let checked = match request.rpc() {
        SeqRpc::One => {
            let mut rpc = tonic::Request::new(request.to_one());
            rpc.set_timeout(budget);
            request.validate_one(client.get_seq(rpc).await?.get_ref())
        }
        SeqRpc::Batch => {
            let mut rpc = tonic::Request::new(request.to_batch());
            rpc.set_timeout(budget);
            request.validate_batch(client.get_seq_batch(rpc).await?.get_ref())
        }
    };
    Ok(match checked {
        Ok(batch) => Outcome::Granted(batch),
        Err(reason) => Outcome::Fatal(Error::MalformedReply {
            endpoint: target.to_string(),
            reason,
        }),
    })
}

/// Sorts a failed sequence RPC into "nothing sent", "refused" (nothing written) and
/// "uncertain" (module docs).
fn classify(
    router: &Router,
    target: &Target,
    request: &SeqRequest,
    status: &tonic::Status,
    cut_by_caller: bool,
) -> Outcome<SeqBatch> {
    let describe = || describe(status);
    if is_connect_error(status) {
        router.drop_seq_channel(target);
        return Outcome::Unreachable(format!("{target}: cannot connect: {}", describe()));
    }
    if is_timeout(status) {
        router.drop_seq_channel(target);
        return uncertain(target, request, describe(), !cut_by_caller);
    }
    if status.source().is_some() {
        // Made on this side from a transport error after the request was handed over.
        router.drop_seq_channel(target);
        return uncertain(target, request, describe(), true);
    }
    let endpoint = target.to_string();
    match status.code() {
        Code::FailedPrecondition if status.message() == NOT_LEADER => {
            match hint_of(target, status) {
                Ok(hint) => Outcome::NotLeader(hint),
                Err(reason) => Outcome::MalformedHint(reason),
            }
        }
        Code::InvalidArgument => Outcome::Fatal(Error::InvalidArgument {
            message: status.message().into(),
        }),
        code if is_refusal(code) => Outcome::Fatal(Error::Server {
            endpoint,
            code,
            message: status.message().into(),
        }),
        _ => uncertain(target, request, describe(), false),
    }
}

/// The codes a server uses to refuse a sequence request without writing anything
/// (docs/protocol.md): "not leader" and an exhausted counter (`FAILED_PRECONDITION`), a bad
/// request (`INVALID_ARGUMENT`), the key cap or a full queue of calls (`RESOURCE_EXHAUSTED`),
/// no sequences (`UNIMPLEMENTED`).
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::ResourceExhausted
            | Code::Unimplemented
    )
}

/// True when a failed `GetSeq` or `GetSeqBatch` RPC may have been granted, so that its blocks
/// may be spent (SEMANTICS §11, D2): anything but a failure to connect (nothing was sent) and a
/// refusal the protocol defines (nothing was written). For code that makes raw RPCs on a tonic
/// channel; [`Client::get_seq`](crate::Client::get_seq) applies the same rule and reports such
/// failures as [`Error::SeqUncertain`].
pub fn seq_status_is_uncertain(status: &tonic::Status) -> bool {
    if is_connect_error(status) {
        return false;
    }
    status.source().is_some() || is_timeout(status) || !is_refusal(status.code())
}

/// `Code: message: cause: cause...`: a transport error's message alone says little.
fn describe(status: &tonic::Status) -> String {
    let mut text = format!("{:?}: {}", status.code(), status.message());
    let mut source = status.source();
    while let Some(cause) = source {
        let shown = cause.to_string();
        if !text.ends_with(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        source = cause.source();
    }
    text
}

fn uncertain(
    target: &Target,
    request: &SeqRequest,
    reason: String,
    endpoint_failed: bool,
) -> Outcome<SeqBatch> {
    Outcome::Uncertain {
        error: Error::SeqUncertain {
            endpoint: target.to_string(),
            asked: request.entries().to_vec(),
            reason,
        },
        endpoint_failed,
    }
}

/// True when the status was made from a failure to connect (tonic wraps every connector error
/// in `ConnectError`): the request never left this process.
fn is_connect_error(status: &tonic::Status) -> bool {
    let mut source = status.source();
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tonic::metadata::{MetadataMap, MetadataValue};

    use super::*;
    use crate::ClientBuilder;

    fn setup() -> (Router, Target, SeqRequest) {
        let config = ClientBuilder::default().validate(["a:1"]).unwrap();
        let target = config.endpoints[0].clone();
        let request = SeqRequest::one("k", 2).unwrap();
        (Router::new(config), target, request)
    }

    fn kind(outcome: &Outcome<SeqBatch>) -> &'static str {
        match outcome {
            Outcome::Granted(_) => "granted",
            Outcome::NotLeader(_) => "not leader",
            Outcome::MalformedHint(_) => "malformed hint",
            Outcome::Refused(_) => "refused",
            Outcome::Unreachable(_) => "unreachable",
            Outcome::DeadlinePassed => "deadline",
            Outcome::Uncertain {
                endpoint_failed: true,
                ..
            } => "uncertain, endpoint failed",
            Outcome::Uncertain { .. } => "uncertain",
            Outcome::Fatal(Error::InvalidArgument { .. }) => "invalid",
            Outcome::Fatal(Error::Server { .. }) => "final",
            Outcome::Fatal(_) => "other",
        }
    }

    #[tokio::test]
    async fn only_refusals_the_protocol_defines_are_certain() {
        let (router, target, request) = setup();
        let classify =
            |status: tonic::Status| kind(&classify(&router, &target, &request, &status, false));
        let mut hinted = MetadataMap::new();
        hinted.insert_bin(tso_proto::LEADER_HINT_KEY, MetadataValue::from_bytes(&[]));
        let not_leader =
            tonic::Status::with_metadata(Code::FailedPrecondition, "not leader", hinted);
        assert_eq!(classify(not_leader), "not leader");
        assert_eq!(
            classify(tonic::Status::failed_precondition("not leader")),
            "not leader",
            "no trailer: no leader known"
        );
        let exhausted = tonic::Status::failed_precondition("counter would pass u64::MAX");
        assert_eq!(classify(exhausted), "final");
        assert_eq!(classify(tonic::Status::unimplemented("no")), "final");
        assert_eq!(
            classify(tonic::Status::invalid_argument("count")),
            "invalid"
        );
        assert_eq!(classify(tonic::Status::resource_exhausted("keys")), "final");
        for code in [
            Code::Unavailable,
            Code::Internal,
            Code::Unknown,
            Code::Aborted,
            Code::OutOfRange,
            Code::DataLoss,
            Code::Ok,
        ] {
            assert_eq!(
                classify(tonic::Status::new(code, "x")),
                "uncertain",
                "{code:?}"
            );
        }
        for code in [Code::DeadlineExceeded, Code::Cancelled] {
            let status = tonic::Status::new(code, "x");
            assert_eq!(classify(status), "uncertain, endpoint failed", "{code:?}");
        }
    }

    #[tokio::test]
    async fn a_connect_error_is_not_sent_and_another_transport_error_is_uncertain() {
        let (router, target, request) = setup();
        let mut refused = tonic::Status::unavailable("tcp connect error");
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        refused.set_source(Arc::new(tonic::ConnectError(Box::new(io))));
        let outcome = classify(&router, &target, &request, &refused, false);
        assert_eq!(kind(&outcome), "unreachable");

        let mut reset = tonic::Status::unknown("connection reset");
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        reset.set_source(Arc::new(io));
        let outcome = classify(&router, &target, &request, &reset, false);
        assert_eq!(kind(&outcome), "uncertain, endpoint failed");
        let Outcome::Uncertain {
            error: Error::SeqUncertain { asked, .. },
            ..
        } = outcome
        else {
            panic!("not uncertain");
        };
        assert_eq!(asked, [("k".to_string(), 2)]);
    }

    #[test]
    fn the_public_rule_agrees_with_the_client() {
        let mut refused = tonic::Status::unavailable("tcp connect error");
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        refused.set_source(Arc::new(tonic::ConnectError(Box::new(io))));
        assert!(!seq_status_is_uncertain(&refused));
        assert!(!seq_status_is_uncertain(
            &tonic::Status::failed_precondition("not leader")
        ));
        assert!(!seq_status_is_uncertain(
            &tonic::Status::resource_exhausted("keys")
        ));
        assert!(seq_status_is_uncertain(&tonic::Status::unavailable(
            "write"
        )));
        assert!(seq_status_is_uncertain(&tonic::Status::internal("x")));
        assert!(seq_status_is_uncertain(&tonic::Status::cancelled(
            "timeout"
        )));
        let mut cut = tonic::Status::failed_precondition("looks like a refusal");
        cut.set_source(Arc::new(std::io::Error::from(
            std::io::ErrorKind::BrokenPipe,
        )));
        assert!(
            seq_status_is_uncertain(&cut),
            "a transport error is never a refusal"
        );
    }

    #[tokio::test]
    async fn a_timeout_cut_by_the_callers_deadline_is_uncertain_but_blames_nobody() {
        let (router, target, request) = setup();
        let status = tonic::Status::deadline_exceeded("deadline");
        let outcome = classify(&router, &target, &request, &status, true);
        assert_eq!(kind(&outcome), "uncertain");
    }
}
