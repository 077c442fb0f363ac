//! The public handle. Cloning is cheap and shares one queue, one background task and one set
//! of connections; dropping the last clone stops the background task and its RPCs.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt, stream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tso_core::{Epoch, LOGICAL_COUNT, Timestamp};

use crate::config::Config;
use crate::dispatch::{self, Waiter};
use crate::grant::{Batch, TsRange};
use crate::lease::{AcquireRequest, Frontier, LeaseGrant};
use crate::router::Router;
use crate::seq::{SeqBatch, SeqBlock, SeqRequest};
use crate::{ClientBuilder, Error, Result, lease_call, seq_call};

/// How long after its deadline a call of several grants stops waiting on its own. The
/// dispatcher reports a missed deadline itself, with the last error seen; this timer is the
/// backstop for a chunk queued behind callers whose deadlines are later than its own.
const CALLER_DEADLINE_GRACE: Duration = Duration::from_millis(100);

/// A timestamp oracle client. See the crate documentation.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    queue: mpsc::Sender<Waiter>,
    router: Arc<Router>,
    dispatcher: AbortHandle,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let config = self.inner.router.config();
        let endpoints: Vec<String> = config.endpoints.iter().map(|t| t.to_string()).collect();
        f.debug_struct("Client")
            .field("endpoints", &endpoints)
            .field("leader", &self.leader())
            .field("queued_callers", &self.queued_callers())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.dispatcher.abort();
    }
}

impl Client {
    /// Options with their defaults (see the `*_DEFAULT` constants).
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// A client with default options over `endpoints` (`host:port` or `http://host:port`).
    /// Dials lazily; must run inside a tokio runtime.
    pub async fn connect<I, S>(endpoints: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::builder().connect(endpoints).await
    }

    pub(crate) fn start(config: Config) -> Client {
        let (queue, waiters) = mpsc::channel(config.queued_callers_max);
        let router = Arc::new(Router::new(config));
        let dispatcher = tokio::spawn(dispatch::run(waiters, Arc::clone(&router))).abort_handle();
        Client {
            inner: Arc::new(Inner {
                queue,
                router,
                dispatcher,
            }),
        }
    }

    /// One timestamp, granted after this call started.
    pub async fn get_ts(&self) -> Result<Timestamp> {
        let deadline = Instant::now() + self.inner.router.config().overall_timeout;
        Ok(self.request(1, deadline).await?.first())
    }

    /// `count` timestamps (any count from 1), all granted after this call started. Up to
    /// `LOGICAL_COUNT` come from one grant; more are split across grants, each range carrying
    /// its own epoch. The whole call shares one overall deadline.
    pub async fn get_ts_batch(&self, count: u64) -> Result<Batch> {
        if count == 0 {
            return Err(Error::InvalidCount { count });
        }
        let deadline = Instant::now() + self.inner.router.config().overall_timeout;
        if count <= u64::from(LOGICAL_COUNT) {
            // One grant: no fan-out to drive (most calls).
            let range = self.request(count as u32, deadline).await?;
            return Batch::new(vec![range]).map_err(|reason| Error::MalformedReply {
                endpoint: "one server".into(),
                reason,
            });
        }
        // Chunks queue one by one as earlier ones finish, behind callers with later deadlines:
        // the dispatcher may see this deadline only late, so the call keeps a timer of its own.
        let chunks = stream::iter(grant_counts(count))
            .map(|chunk| self.request(chunk, deadline))
            .buffer_unordered(self.inner.router.config().in_flight_rpcs_max)
            .try_collect();
        let ranges: Vec<TsRange> =
            match tokio::time::timeout_at(deadline + CALLER_DEADLINE_GRACE, chunks).await {
                Ok(ranges) => ranges?,
                Err(_) => {
                    return Err(Error::DeadlineExceeded {
                        timeout: self.inner.router.config().overall_timeout,
                        last: "still queued: every in-flight slot stayed busy".into(),
                    });
                }
            };
        Batch::new(ranges).map_err(|reason| Error::MalformedReply {
            endpoint: "several servers".into(),
            reason,
        })
    }

    /// `count` (1 to [`SEQ_COUNT_MAX`](crate::SEQ_COUNT_MAX)) consecutive values of the dense
    /// sequence `key` (1 to [`SEQ_KEY_BYTES_MAX`](crate::SEQ_KEY_BYTES_MAX) bytes), from one
    /// `GetSeq` RPC: each call is its own RPC, never shared with another caller. Invalid keys and
    /// counts are refused before any RPC.
    ///
    /// A "not leader" refusal is followed like for timestamps, and a failure to connect is
    /// retried; a failure after the request was sent is [`Error::SeqUncertain`] and is never
    /// retried, because the block may have been granted (and is then spent): asking again is
    /// the caller's decision.
    pub async fn get_seq(&self, key: &str, count: u32) -> Result<SeqBlock> {
        let request = SeqRequest::one(key, count)?;
        let batch = self.sequences(&request).await?;
        let block = batch.into_blocks().pop();
        Ok(block.expect("a validated reply holds one block per requested key"))
    }

    /// Blocks of several distinct keys at once, all or nothing, from one `GetSeqBatch` RPC:
    /// `entries` are `(key, count)`, at most
    /// [`SEQ_BATCH_KEYS_MAX`](crate::SEQ_BATCH_KEYS_MAX), each key once. The blocks come
    /// back in the order asked. Errors as for [`Client::get_seq`].
    pub async fn get_seq_batch<K: AsRef<str>>(&self, entries: &[(K, u32)]) -> Result<SeqBatch> {
        let request = SeqRequest::batch(entries)?;
        self.sequences(&request).await
    }

    async fn sequences(&self, request: &SeqRequest) -> Result<SeqBatch> {
        let router = &self.inner.router;
        let deadline = Instant::now() + router.config().overall_timeout;
        seq_call::fetch(router, request, deadline).await
    }

    /// Acquires a stamping lease for `holder` (1 to
    /// [`LEASE_HOLDER_BYTES_MAX`](crate::LEASE_HOLDER_BYTES_MAX) opaque bytes) at
    /// `holder_epoch`, for `ttl` (a whole number of milliseconds; the server accepts 5 s to
    /// 300 s by default and refuses others with [`Error::InvalidArgument`]). A bad holder or
    /// TTL is refused before any RPC (SEMANTICS §14).
    ///
    /// The same holder and `holder_epoch` while its lease lives gets the same lease back, as it
    /// stands; a higher `holder_epoch` supersedes it; a lower one is
    /// [`Error::StaleHolderEpoch`]. Transport errors and `UNAVAILABLE` are retried: acquiring
    /// is idempotent per holder and `holder_epoch`. See [`LeaseGrant::local_expiry`] for how
    /// long the holder may stamp, or let a [`LeaseKeeper`](crate::LeaseKeeper) hold the lease.
    pub async fn acquire_lease(
        &self,
        holder: &[u8],
        holder_epoch: u64,
        ttl: Duration,
    ) -> Result<LeaseGrant> {
        let request = AcquireRequest::new(holder, holder_epoch, ttl)?;
        lease_call::acquire(&self.inner.router, &request, self.deadline()).await
    }

    /// Renews lease `lease_id`: a fresh bound and expiry with the TTL it was acquired with,
    /// which the reply does not repeat: pass it as `ttl` (it only sets the returned grant's
    /// [`local_expiry`](LeaseGrant::local_expiry)). [`Error::LeaseNotFound`] when the leader
    /// knows no such lease, [`Error::LeaseLost`] when it expired or was superseded: stop
    /// stamping and acquire again. Transport errors and `UNAVAILABLE` are retried: a repeat
    /// just renews again.
    pub async fn renew_lease(&self, lease_id: u64, ttl: Duration) -> Result<LeaseGrant> {
        crate::lease::ttl_ms(ttl)?;
        lease_call::renew(&self.inner.router, lease_id, ttl, self.deadline()).await
    }

    /// Releases lease `lease_id`: it stops holding the safe frontier back at once. Idempotent:
    /// an unknown or already released id is fine, and failures are retried like the others.
    pub async fn release_lease(&self, lease_id: u64) -> Result<()> {
        lease_call::release(&self.inner.router, lease_id, self.deadline()).await
    }

    /// The safe frontier: the smallest of the leader's durable high-water and the bounds of
    /// every unexpired lease, in physical ms. Followers answer 0 with no epoch and no hint, so
    /// the call asks the leader it knows, else each configured endpoint in turn, until one
    /// leads; [`Error::DeadlineExceeded`] when none does within the overall deadline.
    pub async fn safe_frontier(&self) -> Result<Frontier> {
        lease_call::frontier(&self.inner.router, self.deadline()).await
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.router.config().overall_timeout
    }

    /// The leader this client currently sends to (`http://host:port`) and the highest epoch
    /// it has seen; `None` until a leader answered or was named.
    pub fn leader(&self) -> (Option<String>, Epoch) {
        let (target, epoch) = self.inner.router.leader();
        (target.map(|t| t.to_string()), epoch)
    }

    /// Callers queued and not yet taken into an RPC.
    pub fn queued_callers(&self) -> usize {
        let queue = &self.inner.queue;
        queue.max_capacity() - queue.capacity()
    }

    async fn request(&self, count: u32, deadline: Instant) -> Result<TsRange> {
        let (reply, receive) = oneshot::channel();
        let waiter = Waiter {
            count,
            deadline,
            reply,
        };
        self.inner.queue.try_send(waiter).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::QueueFull {
                capacity: self.inner.queue.max_capacity(),
            },
            mpsc::error::TrySendError::Closed(_) => Error::Closed,
        })?;
        // No timer here: the dispatcher answers every waiter by its deadline (dispatch.rs).
        receive.await.unwrap_or(Err(Error::Closed))
    }
}

/// Splits `count` into grant-sized chunks of at most `LOGICAL_COUNT`.
fn grant_counts(count: u64) -> impl Iterator<Item = u32> {
    let full = count / u64::from(LOGICAL_COUNT);
    let rest = (count % u64::from(LOGICAL_COUNT)) as u32;
    (0..full)
        .map(|_| LOGICAL_COUNT)
        .chain((rest > 0).then_some(rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_split_into_grants_of_at_most_logical_count() {
        let l = LOGICAL_COUNT;
        assert_eq!(grant_counts(1).collect::<Vec<_>>(), [1]);
        assert_eq!(grant_counts(u64::from(l)).collect::<Vec<_>>(), [l]);
        assert_eq!(
            grant_counts(u64::from(l) * 2 + 5).collect::<Vec<_>>(),
            [l, l, 5]
        );
        for count in [
            2,
            u64::from(l) - 1,
            u64::from(l) + 1,
            10 * u64::from(l) + 3,
            1 << 30,
        ] {
            let chunks: Vec<u32> = grant_counts(count).collect();
            assert!(chunks.iter().all(|&c| (1..=l).contains(&c)));
            assert_eq!(chunks.iter().map(|&c| u64::from(c)).sum::<u64>(), count);
        }
    }
}
