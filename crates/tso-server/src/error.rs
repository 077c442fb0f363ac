//! The server's error type: why serving stopped, or could not start.

use crate::backend::BackendError;
use crate::backend::file::FileError;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("could not listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC transport failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    File(#[from] FileError),
    /// A permanent backend error: serving is poisoned.
    #[error("stopped serving on a permanent backend error: {0}")]
    Backend(BackendError),
    /// A broken invariant (a backend that broke its contract, a value past the layout).
    #[error("stopped serving on a broken invariant: {0}")]
    Invariant(String),
    #[error("the leadership stream of the backend closed; the node cannot know whether it leads")]
    LeadershipClosed,
    #[error(
        "this backend already serves another oracle in this process: two oracles on one backend \
         would grant the same timestamps; stop the other first"
    )]
    BackendInUse,
    #[error("the leadership watch task panicked: {0}")]
    WatchPanicked(String),
    #[error("the leadership watch did not stop within the shutdown grace of {grace_ms} ms")]
    GraceExceeded { grace_ms: u64 },
}
