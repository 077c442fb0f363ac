//! Why a request was not served, and the one mapping from a backend failure to that answer.
//!
//! Every caller of the backend words its failure through [`Refusal::from_backend`], so the rule
//! that decides what a caller may conclude is written once: only "not leader" (and a fenced call
//! that wrote nothing) is a definite refusal; any other failure of a write may have taken effect.

use tso_core::Epoch;

use crate::backend::BackendError;
use crate::error::ServeError;

/// What this node knows of the leader, as sent in a "not leader" hint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderHint {
    pub endpoint: Option<String>,
    pub epoch: Option<Epoch>,
}

/// Why a request was not served; the service maps each to a gRPC status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotLeader(LeaderHint),
    InvalidArgument(String),
    OutOfRange(String),
    Unavailable(String),
    Internal(String),
    /// A configured cap is reached (sequence keys, queued sequence calls).
    ResourceExhausted(String),
    /// The request cannot succeed in the current state (a sequence counter at its end).
    FailedPrecondition(String),
    /// The request names something the server does not know (a lease id).
    NotFound(String),
}

/// A failed backend call as its caller words it; each message starts with the `&str`, what was
/// attempted.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Call<'a> {
    /// A call that wrote nothing when it failed (a load, a window extension): a fenced epoch is
    /// a definite "not leader", and a transient failure is worth a retry.
    Read(&'a str),
    /// A write that may have taken effect on any failure but "not leader": raft reports an entry
    /// that committed in a later term of this same node as fenced. The caller retries to learn.
    Write(&'a str),
    /// A write that spends sequence blocks: its callers learn that a block may have been spent.
    Spend(&'a str),
}

impl Refusal {
    /// Maps a backend failure of `call` to the caller's answer. `hint` is asked only for "not
    /// leader"; `poison`, if given, is called with a permanent failure before it is answered.
    pub(crate) fn from_backend(
        err: BackendError,
        call: Call<'_>,
        hint: impl FnOnce() -> LeaderHint,
        poison: Option<&dyn Fn(ServeError)>,
    ) -> Refusal {
        match (err, call) {
            (BackendError::NotLeader { .. }, _) | (BackendError::Fenced { .. }, Call::Read(_)) => {
                Refusal::NotLeader(hint())
            }
            (BackendError::Fenced { expected, current }, Call::Write(what)) => {
                Refusal::Unavailable(format!(
                    "{what} in epoch {expected} was fenced at epoch {current}; it may have taken \
                     effect: retry"
                ))
            }
            (BackendError::Fenced { expected, current }, Call::Spend(what)) => {
                Refusal::Unavailable(format!(
                    "{what} of epoch {expected} was fenced at epoch {current}; the block may have \
                     been spent"
                ))
            }
            (BackendError::Transient(msg), Call::Read(what) | Call::Write(what)) => {
                Refusal::Unavailable(format!("{what} failed transiently: {msg}; retry"))
            }
            (BackendError::Transient(msg), Call::Spend(what)) => Refusal::Unavailable(format!(
                "{what} failed: {msg}; the block may have been spent"
            )),
            (
                BackendError::Permanent(msg),
                Call::Read(what) | Call::Write(what) | Call::Spend(what),
            ) => {
                let reason = format!("{what} failed: {msg}");
                if let Some(poison) = poison {
                    poison(ServeError::Backend(BackendError::Permanent(msg)));
                }
                Refusal::Internal(reason)
            }
        }
    }
}

/// The hint carried by a NotLeader error.
pub(crate) fn hint_of(err: &BackendError) -> LeaderHint {
    match err {
        BackendError::NotLeader {
            leader_endpoint,
            leader_epoch,
        } => LeaderHint {
            endpoint: leader_endpoint.clone(),
            epoch: *leader_epoch,
        },
        _ => LeaderHint::default(),
    }
}
