//! The vocabulary every attempt speaks, whichever RPC it makes: what an attempt came to
//! ([`Outcome`]), how a status the server sent is sorted into one, and the time one attempt has
//! ([`AttemptClock`]). The call loop (`call.rs`) acts on outcomes; the attempts (`call.rs`,
//! `stream.rs`, `seq_call.rs`, `lease_call.rs`) make them.
//!
//! Invariant: an attempt never runs past the call's deadline, and running out of time is
//! blamed on the server only when the per-attempt timeout, not the call's deadline, ended it.

use std::error::Error as _;
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;
use tso_proto::LEADER_HINT_KEY;

use crate::Error;
use crate::endpoint::{Hint, Target, decode_hint};
use crate::grant::TsRange;

/// What one attempt came to.
#[derive(Debug)]
pub(crate) enum Outcome<G> {
    Granted(G),
    NotLeader(Hint),
    /// "not leader" with a hint that cannot be decoded or used: why.
    MalformedHint(String),
    /// The server answered `UNAVAILABLE` (or `UNKNOWN`): still leader, a transient refusal.
    Refused(String),
    /// Nothing reached a server: a transport failure (refused, reset, HTTP/2 error) or a
    /// per-attempt timeout (for `GetTs`, where a lost request costs nothing), or a failure to
    /// connect (for sequences).
    Unreachable(String),
    /// The call's own deadline ended the attempt before anything that matters was sent: nothing
    /// is known about the endpoint.
    DeadlinePassed,
    /// A request that may have been granted failed (SEMANTICS §11, D2): the call ends with
    /// `error`, unretried. `endpoint_failed` when the transport failed or the attempt timed out:
    /// the endpoint is then dropped as leader and passed over, as for `Unreachable`.
    Uncertain {
        error: Error,
        endpoint_failed: bool,
    },
    Fatal(Error),
}

/// The time one attempt has: the per-attempt timeout, cut short by the call's deadline when
/// that comes first.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttemptClock {
    start: Instant,
    deadline: Instant,
    cut_by_caller: bool,
}

impl AttemptClock {
    /// Starts an attempt now, of at most `attempt_timeout`, within a call ending at
    /// `call_deadline`.
    pub(crate) fn start(call_deadline: Instant, attempt_timeout: Duration) -> Self {
        let start = Instant::now();
        Self {
            start,
            deadline: call_deadline.min(start + attempt_timeout),
            cut_by_caller: call_deadline <= start + attempt_timeout,
        }
    }

    /// When the attempt ends.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
    }

    /// True when the call's deadline comes first: running out of time then says nothing about
    /// the server.
    pub(crate) fn cut_by_caller(&self) -> bool {
        self.cut_by_caller
    }

    /// The attempt's whole time, from its start.
    pub(crate) fn budget(&self) -> Duration {
        self.deadline.saturating_duration_since(self.start)
    }

    /// What is left of the attempt's time now.
    pub(crate) fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// True when the attempt's `grpc-timeout` ran out, on this side (tonic enforces it and reports
/// `TimeoutExpired`) or on the server (a `DEADLINE_EXCEEDED` or `CANCELLED` status).
pub(crate) fn is_timeout(status: &tonic::Status) -> bool {
    let mut source = status.source();
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = error.source();
    }
    status.source().is_none() && matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled)
}

/// Sorts a status sent by the server into what the call does next (docs/protocol.md, errors).
pub(crate) fn classify(target: &Target, status: &tonic::Status) -> Outcome<TsRange> {
    let endpoint = target.to_string();
    match status.code() {
        Code::FailedPrecondition => match hint_of(target, status) {
            Ok(hint) => Outcome::NotLeader(hint),
            Err(reason) => Outcome::MalformedHint(reason),
        },
        Code::InvalidArgument => Outcome::Fatal(Error::InvalidArgument {
            message: status.message().into(),
        }),
        Code::Unavailable | Code::Unknown => Outcome::Refused(format!(
            "{endpoint}: {:?}: {}",
            status.code(),
            status.message()
        )),
        code => Outcome::Fatal(Error::Server {
            endpoint,
            code,
            message: status.message().into(),
        }),
    }
}

pub(crate) fn hint_of(target: &Target, status: &tonic::Status) -> Result<Hint, String> {
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
