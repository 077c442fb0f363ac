//! Client of the tso timestamp oracle (docs/semantics.md §10, docs/protocol.md).
//!
//! ```no_run
//! # async fn demo() -> Result<(), tso_client::Error> {
//! let client = tso_client::Client::connect(["127.0.0.1:50551"]).await?;
//! let ts = client.get_ts().await?;
//! let batch = client.get_ts_batch(1000).await?;
//! assert!(batch.first() > ts);
//! # Ok(()) }
//! ```
//!
//! - **Coalescing** (`dispatch.rs`): concurrent callers share RPCs. A lone
//!   caller's request goes out at once; under load, the callers queued at that moment share one
//!   `GetTs`, and each gets a contiguous slice. Nothing is fetched ahead (G2): every timestamp
//!   returned was granted after its caller asked.
//! - **The stream** (`stream.rs`): against a server that offers `tso.stream.v1`, those requests
//!   go pipelined on one `GetTsStream` per connection instead of unary `GetTs`; a plain
//!   `tsoracle.v1` server (`UNIMPLEMENTED`) gets unary `GetTs`, and the stream is asked for
//!   again after 5 minutes. Hints, deadlines and retries are the same on both paths.
//! - **Leader discovery**: a "not leader" reply's hint is followed within the same call without
//!   spending an attempt; the leader is cached and the cache never goes back an epoch; without
//!   a usable hint, the configured endpoints are tried in rotation and an election is waited
//!   out. `UNAVAILABLE` is retried on the same leader; only transport failures and per-attempt
//!   timeouts make rotation pass over an endpoint for a while.
//! - **Bounded**: per-attempt and overall deadlines, an attempt budget, full-jitter backoff on
//!   transport errors and `UNAVAILABLE`, and a bounded queue of callers ([`Error::QueueFull`]).
//!   Each caller keeps its own deadline inside a shared RPC.
//! - **Dense sequences** (`seq.rs`, `seq_call.rs`): [`Client::get_seq`] and
//!   [`Client::get_seq_batch`] send one RPC per call, never coalesced. They follow hints like
//!   `GetTs` and retry only what is known to have written nothing ("not leader", a failure to
//!   connect); a failure after the request was sent is [`Error::SeqUncertain`], never retried.
//! - **Stamping leases and the safe frontier** (`lease.rs`, `lease_call.rs`, `keeper.rs`):
//!   [`Client::acquire_lease`], [`Client::renew_lease`], [`Client::release_lease`] and
//!   [`Client::safe_frontier`], one RPC per attempt, every one safe to repeat and so retried like
//!   `GetTs`. [`LeaseKeeper`] holds one lease, renews it ahead of expiry and tells its owner
//!   whether it may stamp now, by the owner's own clock.
//! - **Errors** are one `Clone` type; [`Error::is_retryable`] tells "retry later" from "the
//!   request or configuration is wrong". Malformed replies and hints are errors, never panics.
//! - **TLS** ([`ClientTls`]): `https://` endpoints are checked against the configured CA only
//!   (no system roots), with an optional client certificate for mutual TLS; hints received over
//!   TLS are followed over TLS, never over plaintext.
//! - Dropping the last [`Client`] clone stops its background task.

mod attempt;
mod call;
mod client;
mod config;
mod dispatch;
mod endpoint;
mod error;
mod grant;
mod keeper;
mod lease;
mod lease_call;
mod router;
mod seq;
mod seq_call;
mod stream;

pub use client::Client;
pub use config::{
    ATTEMPT_TIMEOUT_DEFAULT, ATTEMPTS_MAX_DEFAULT, BACKOFF_BASE_DEFAULT, BACKOFF_CAP_DEFAULT,
    ClientBuilder, ClientTls, IN_FLIGHT_RPCS_MAX_DEFAULT, OVERALL_TIMEOUT_DEFAULT,
    QUEUED_CALLERS_MAX_DEFAULT,
};
pub use error::{Error, Result};
pub use grant::{Batch, TsRange};
pub use keeper::{LEASE_EXPIRY_MARGIN_DEFAULT, LeaseKeeper, LeaseKeeperBuilder, StampPermit};
pub use lease::{Frontier, LEASE_HOLDER_BYTES_MAX, LeaseGrant};
pub use seq::{SEQ_BATCH_KEYS_MAX, SEQ_COUNT_MAX, SEQ_KEY_BYTES_MAX, SeqBatch, SeqBlock};
pub use seq_call::seq_status_is_uncertain;
pub use tso_core::{Epoch, LOGICAL_COUNT, Timestamp};
pub use tso_proto::tls::{CaCertificates, PemError, TlsIdentity};
