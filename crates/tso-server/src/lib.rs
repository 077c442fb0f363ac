//! The tso server: the `tsoracle.v1` gRPC service, the leadership watch and failover fence, the
//! serving state, and the backends behind one narrow seam ([`backend::Backend`]).
//!
//! Embedders either call [`serve_with_shutdown`], or start an [`OracleGuard`] and add
//! [`OracleGuard::service`] to their own tonic server.

pub mod backend;
mod backoff;
mod claim;
pub mod clock;
mod error;
mod extend;
pub mod metrics;
pub mod ops;
mod oracle;
mod refusal;
mod sequence;
mod serve;
mod service;
mod stamping;
mod stream;
mod term;
pub mod tls;
mod watch;

pub use error::ServeError;
pub use oracle::{Config, ServingState};
pub use refusal::LeaderHint;
pub use sequence::{SEQ_KEYS_MAX_DEFAULT, SEQ_QUEUE_MAX};
pub use serve::{
    Activity, OracleGuard, TSO_SERVICE_NAME, serve_listener, serve_listener_tls,
    serve_with_shutdown,
};
pub use service::{NOT_LEADER_MESSAGE, TsoHandler, not_leader};
pub use stamping::{LEASE_TTL_MAX_DEFAULT, LEASE_TTL_MIN_DEFAULT, LEASES_MAX};
pub use stream::{STREAM_REPLIES_BUFFERED, TsoStreamHandler};
pub use term::EXHAUSTED_WAIT_MAX;
