//! The client's one error type. It is `Clone` so that one failed RPC reaches every caller that
//! was coalesced into it; [`Error::is_retryable`] separates "retry later" from "your request or
//! configuration is wrong".

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
    /// The overall deadline of the call passed before a grant arrived.
    #[error(
        "no timestamp within the overall deadline of {timeout:?}, retry later (last error: {last})"
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
}

impl Error {
    /// True when the same call may succeed later without changing the request or the
    /// configuration: overload, unavailability, a passed deadline, a server that is out of
    /// capacity.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::QueueFull { .. }
            | Error::Unavailable { .. }
            | Error::DeadlineExceeded { .. } => true,
            Error::Server { code, .. } => {
                matches!(code, tonic::Code::ResourceExhausted | tonic::Code::Aborted)
            }
            Error::InvalidCount { .. }
            | Error::InvalidArgument { .. }
            | Error::InvalidEndpoint { .. }
            | Error::InvalidConfig { .. }
            | Error::MalformedReply { .. }
            | Error::MalformedHint { .. }
            | Error::Closed => false,
        }
    }
}

/// Result with the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

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
}
