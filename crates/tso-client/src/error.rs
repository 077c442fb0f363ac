//! The client's one error type. It is `Clone` so that one failed RPC reaches every caller that
//! was coalesced into it; [`Error::is_retryable`] separates "retry later" from "your request or
//! configuration is wrong". A sequence call that failed after its request was sent is
//! [`Error::SeqUncertain`]: not retryable, because a block may have been spent (SEMANTICS §11).
//! A stamping lease that can no longer be renewed is [`Error::LeaseLost`] (or
//! [`Error::LeaseNotFound`]); one that may have run out by the holder's clock while renewals
//! still fail is [`Error::LeaseStalled`] (SEMANTICS §14).

use std::fmt::Write as _;
use std::time::Duration;

/// Everything a client call can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The caller asked for zero timestamps.
    #[error("count {count} is out of range: ask for at least one timestamp")]
    InvalidCount { count: u64 },
    /// The server refused the request as malformed (gRPC `INVALID_ARGUMENT`).
    #[error("the server refused the request as invalid: {message}")]
    InvalidArgument { message: String },
    /// An endpoint in the configuration cannot be used.
    #[error("endpoint {endpoint:?} is invalid: {reason}")]
    InvalidEndpoint { endpoint: String, reason: String },
    /// A builder option is out of range.
    #[error("invalid client configuration: {reason}")]
    InvalidConfig { reason: String },
    /// Too many callers are already waiting: the client is overloaded.
    #[error("{capacity} callers are already waiting: the client is overloaded, retry later")]
    QueueFull { capacity: usize },
    /// Every attempt of the budget failed with a transport error, a timeout or `UNAVAILABLE`.
    #[error("no server answered after {attempts} attempts, retry later (last error: {last})")]
    Unavailable { attempts: u32, last: String },
    /// The overall deadline of the call passed before a grant arrived. For a sequence call,
    /// nothing of it can have been granted: an attempt cut short after its request was sent is
    /// [`Error::SeqUncertain`] instead.
    #[error(
        "nothing granted within the overall deadline of {timeout:?}, retry later (last error: {last})"
    )]
    DeadlineExceeded { timeout: Duration, last: String },
    /// A server answered with a reply that breaks the protocol.
    #[error("server {endpoint} sent a malformed reply: {reason}")]
    MalformedReply { endpoint: String, reason: String },
    /// Every configured endpoint answered "not leader" with a leader hint that cannot be
    /// decoded or used (one such node alone is skipped); `endpoint` is the last of them.
    #[error("server {endpoint} sent a malformed leader hint: {reason}")]
    MalformedHint { endpoint: String, reason: String },
    /// A server answered with an error status the client does not retry (`INTERNAL`,
    /// `OUT_OF_RANGE`, `UNIMPLEMENTED`, ...).
    #[error("server {endpoint} failed the request with {code:?}: {message}")]
    Server {
        endpoint: String,
        code: tonic::Code,
        message: String,
    },
    /// The client's background task is gone (its runtime is shutting down).
    #[error("the client is shut down: its runtime stopped")]
    Closed,
    /// A sequence key the protocol does not allow: empty, or longer than
    /// [`SEQ_KEY_BYTES_MAX`](crate::SEQ_KEY_BYTES_MAX) bytes. Refused before any RPC.
    #[error("sequence key {} is invalid: {reason}", show_key(.key))]
    InvalidSeqKey { key: String, reason: String },
    /// A sequence count outside `1..=SEQ_COUNT_MAX`. Refused before any RPC.
    #[error(
        "count {count} for sequence key {} is out of range: ask for 1 to {}",
        show_key(.key),
        crate::SEQ_COUNT_MAX
    )]
    InvalidSeqCount { key: String, count: u32 },
    /// A sequence batch that is empty, has more than
    /// [`SEQ_BATCH_KEYS_MAX`](crate::SEQ_BATCH_KEYS_MAX) entries, or names a key twice.
    /// Refused before any RPC.
    #[error("a sequence batch of {entries} entries is invalid: {reason}")]
    InvalidSeqBatch { entries: usize, reason: String },
    /// A sequence call failed after its request was sent (a timeout, a transport failure, or a
    /// status such as `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL` or `UNKNOWN`): the server
    /// may or may not have granted the blocks in `asked`, and a granted block is spent even
    /// though nobody received it. The client never retries such a call on its own; whether to
    /// ask again (and accept a gap) is the caller's decision.
    #[error(
        "server {endpoint} may have granted {} before the call failed: {reason}; those values \
         may be spent, so the call was not retried: decide whether to ask again",
        show_asked(.asked)
    )]
    SeqUncertain {
        endpoint: String,
        /// What the call asked for: `(key, count)` in request order.
        asked: Vec<(String, u32)>,
        reason: String,
    },
    /// A lease holder the protocol does not allow: empty, or longer than
    /// [`LEASE_HOLDER_BYTES_MAX`](crate::LEASE_HOLDER_BYTES_MAX) bytes. Refused before any RPC.
    #[error(
        "a lease holder of {holder_bytes} bytes is invalid: give 1 to {} bytes",
        crate::LEASE_HOLDER_BYTES_MAX
    )]
    InvalidLeaseHolder { holder_bytes: usize },
    /// A lease TTL below one millisecond or beyond `u64::MAX` ms. Refused before any RPC; the
    /// server refuses a TTL outside its own bounds (5 s to 300 s by default) with
    /// [`Error::InvalidArgument`].
    #[error("lease TTL {ttl:?} is invalid: give a whole number of milliseconds, at least 1 ms")]
    InvalidLeaseTtl { ttl: Duration },
    /// The leader knows no lease `lease_id` (`NOT_FOUND`): it was never granted, or released,
    /// or expired and dropped. Acquire a new lease.
    #[error(
        "lease {lease_id} is unknown to the leader (released, or expired and dropped): stop \
         stamping under it and acquire a new lease"
    )]
    LeaseNotFound { lease_id: u64 },
    /// The lease can no longer be renewed (`FAILED_PRECONDITION`): it expired, or the holder
    /// acquired again with a higher `holder_epoch` and superseded it. `message` is the server's.
    #[error(
        "lease {lease_id} can no longer be renewed ({message}): it expired or a higher \
         holder_epoch superseded it; stop stamping under it and acquire again"
    )]
    LeaseLost { lease_id: u64, message: String },
    /// `AcquireLease` with a `holder_epoch` below the one of the holder's live lease
    /// (`FAILED_PRECONDITION`): a newer incarnation of the holder owns the lease.
    #[error(
        "holder_epoch {holder_epoch} is below the one of this holder's live lease ({message}): \
         a newer incarnation holds it; do not stamp"
    )]
    StaleHolderEpoch { holder_epoch: u64, message: String },
    /// `AcquireLease` for the holder's live lease at the same `holder_epoch`, with another TTL
    /// than the lease holds (`FAILED_PRECONDITION`): the server keeps the lease as it is, and
    /// the wire has no field to tell the holder its TTL, so it refuses rather than answer with
    /// a lease the holder would count on for the wrong time. Ask with the lease's TTL (the
    /// server's `message` names it), or supersede it with a higher `holder_epoch`.
    #[error(
        "this holder already holds a live lease at holder_epoch {holder_epoch} with another TTL \
         ({message}): ask with that TTL, or use a higher holder_epoch"
    )]
    LeaseTtlDiffers { holder_epoch: u64, message: String },
    /// A [`LeaseKeeper`](crate::LeaseKeeper) cannot vouch for its lease right now: by this
    /// holder's own clock the lease may have run out, and no renewal has succeeded since. The
    /// keeper keeps renewing; stamping must stall (never skew) until it vouches again.
    #[error(
        "lease {lease_id} may have run out by this holder's clock and is not renewed yet \
         ({reason}): stall stamping and ask again"
    )]
    LeaseStalled { lease_id: u64, reason: String },
}

impl Error {
    /// True when the same call may succeed later without changing the request or the
    /// configuration: overload, unavailability, a passed deadline, a server that is out of
    /// capacity.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::QueueFull { .. }
            | Error::Unavailable { .. }
            | Error::DeadlineExceeded { .. }
            | Error::LeaseStalled { .. } => true,
            Error::Server { code, .. } => {
                matches!(code, tonic::Code::ResourceExhausted | tonic::Code::Aborted)
            }
            // The server may have spent the block: retrying on its own would hide a gap.
            Error::SeqUncertain { .. } => false,
            Error::InvalidCount { .. }
            | Error::InvalidSeqKey { .. }
            | Error::InvalidSeqCount { .. }
            | Error::InvalidSeqBatch { .. }
            | Error::InvalidArgument { .. }
            | Error::InvalidEndpoint { .. }
            | Error::InvalidConfig { .. }
            | Error::MalformedReply { .. }
            | Error::MalformedHint { .. }
            | Error::InvalidLeaseHolder { .. }
            | Error::InvalidLeaseTtl { .. }
            | Error::LeaseNotFound { .. }
            | Error::LeaseLost { .. }
            | Error::StaleHolderEpoch { .. }
            | Error::LeaseTtlDiffers { .. }
            | Error::Closed => false,
        }
    }
}

/// Result with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Characters of a key shown in a message: an invalid key can be of any length.
const KEY_SHOWN_CHARS_MAX: usize = 40;

/// Entries of an uncertain batch shown in a message; the rest are counted.
const ASKED_SHOWN_MAX: usize = 3;

/// A key as a message shows it: quoted, cut after `KEY_SHOWN_CHARS_MAX` characters.
fn show_key(key: &str) -> String {
    let shown: String = key.chars().take(KEY_SHOWN_CHARS_MAX).collect();
    if shown.len() < key.len() {
        format!("{shown:?}... ({} bytes)", key.len())
    } else {
        format!("{shown:?}")
    }
}

/// `count values of "key"`, or a short list for a batch.
fn show_asked(asked: &[(String, u32)]) -> String {
    let mut out = String::new();
    for (i, (key, count)) in asked.iter().take(ASKED_SHOWN_MAX).enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(out, "{sep}{count} values of {}", show_key(key));
    }
    if asked.len() > ASKED_SHOWN_MAX {
        let _ = write!(out, " and {} more keys", asked.len() - ASKED_SHOWN_MAX);
    }
    if asked.is_empty() {
        out.push_str("nothing");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_later_is_told_apart_from_a_wrong_request() {
        assert!(Error::QueueFull { capacity: 1 }.is_retryable());
        assert!(
            Error::Unavailable {
                attempts: 3,
                last: "refused".into()
            }
            .is_retryable()
        );
        assert!(
            !Error::InvalidArgument {
                message: "count 0".into()
            }
            .is_retryable()
        );
        assert!(!Error::InvalidCount { count: 0 }.is_retryable());
        let internal = Error::Server {
            endpoint: "http://a:1".into(),
            code: tonic::Code::Internal,
            message: "broken".into(),
        };
        assert!(!internal.is_retryable());
    }

    #[test]
    fn an_uncertain_sequence_call_is_not_retryable_and_says_what_may_be_spent() {
        let uncertain = Error::SeqUncertain {
            endpoint: "http://a:1".into(),
            asked: vec![("orders".into(), 5)],
            reason: "UNAVAILABLE: disk full".into(),
        };
        assert!(!uncertain.is_retryable());
        let text = uncertain.to_string();
        assert!(text.contains("5 values of \"orders\""), "{text}");
        assert!(text.contains("may be spent"), "{text}");
        let many: Vec<(String, u32)> = (0..5).map(|i| (format!("k{i}"), 1)).collect();
        let text = Error::SeqUncertain {
            endpoint: "http://a:1".into(),
            asked: many,
            reason: "reset".into(),
        }
        .to_string();
        assert!(text.contains("and 2 more keys"), "{text}");
    }

    #[test]
    fn long_keys_are_cut_in_messages() {
        let key = "x".repeat(1000);
        let text = Error::InvalidSeqKey {
            key,
            reason: "too long".into(),
        }
        .to_string();
        assert!(text.len() < 200, "{text}");
        assert!(text.contains("(1000 bytes)"), "{text}");
        assert!(
            !Error::InvalidSeqCount {
                key: "k".into(),
                count: 0
            }
            .is_retryable()
        );
    }
}
