//! The leadership watch and the failover fence (SEMANTICS §5).
//!
//! One task follows the backend's leadership stream. On every `Leader` event it fences: stop
//! serving, end the previous term's extender, load the prior high-water, persist a new one above
//! `max(prior + 1, now)`, and only then serve. Transient errors are retried for as long as the
//! node stays leader, each wait racing the stream; NotLeader/Fenced step down; Permanent errors
//! and broken invariants end the task with an error, which poisons serving.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tso_core::{Epoch, Fence, Window};

use crate::backoff::Backoff;
use crate::consensus::{ConsensusError, Leadership};
use crate::error::ServeError;
use crate::extend;
use crate::metrics;
use crate::oracle::{LeaderHint, Shared, hint_of};

/// What the watch does after handling a state.
enum Next {
    /// Wait for the next leadership change.
    Wait,
    /// A change already arrived: handle the current state at once.
    Handle,
    /// Shutdown was asked.
    Stop,
}

/// How a wait that races the leadership stream ended.
enum Raced<T> {
    /// The work finished first.
    Done(T),
    /// A leadership change or a shutdown came first.
    Interrupted(Next),
}

/// Where a fence attempt leaves the fence.
enum Settled {
    /// Serving, or stepped down: wait for the next leadership change.
    Done,
    /// Failed transiently: retry after a backoff.
    Retry(String),
}

/// Retries of one fence: the backoff, the retry metric and an occasional warning.
struct FenceRetry {
    epoch: Epoch,
    backoff: Backoff,
    retries: u64,
    warn_at: u64,
}

/// Warnings go out at retry 1, 2, 4 ... 256, then once per this many retries: at the 250 ms
/// backoff cap, 240 retries are about a minute.
const FENCE_RETRY_WARN_EVERY: u64 = 240;

impl FenceRetry {
    fn new(epoch: Epoch) -> Self {
        Self {
            epoch,
            backoff: Backoff::fence(),
            retries: 0,
            warn_at: 1,
        }
    }

    /// Counts a transient failure and returns how long to wait before the next attempt.
    fn next_delay(&mut self, error: &str) -> Duration {
        self.retries += 1;
        metrics::fence_retry("transient");
        if self.retries == self.warn_at {
            self.warn_at = if self.warn_at < FENCE_RETRY_WARN_EVERY {
                self.warn_at * 2
            } else {
                self.warn_at + FENCE_RETRY_WARN_EVERY
            };
            let (epoch, retries) = (self.epoch, self.retries);
            warn!(%epoch, retries, error, "fence failed transiently; still leader, retrying");
        }
        self.backoff.next_delay()
    }
}

/// Why a fence attempt failed.
enum FenceFailure {
    Backend(ConsensusError),
    Invariant(String),
}

/// The extender of the current term.
struct Extender {
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

struct Watcher {
    shared: Arc<Shared>,
    leadership: watch::Receiver<Leadership>,
    shutdown: CancellationToken,
    extender: Option<Extender>,
}

/// Follows leadership until shutdown or a fatal error.
pub(crate) async fn run(
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let leadership = shared.backend.leadership();
    let mut watcher = Watcher {
        shared,
        leadership,
        shutdown,
        extender: None,
    };
    let result = watcher.follow().await;
    watcher.end_term().await;
    result
}

impl Watcher {
    async fn follow(&mut self) -> Result<(), ServeError> {
        loop {
            let state = self.leadership.borrow_and_update().clone();
            let next = match state {
                Leadership::Leader { epoch } => self.fence(epoch).await?,
                Leadership::Follower {
                    leader_endpoint,
                    leader_epoch,
                } => {
                    self.step_down(LeaderHint {
                        endpoint: leader_endpoint,
                        epoch: leader_epoch,
                    })
                    .await;
                    Next::Wait
                }
                Leadership::Unknown => {
                    self.step_down(LeaderHint::default()).await;
                    Next::Wait
                }
            };
            let next = match next {
                Next::Wait => self.wait_for_change().await?,
                other => other,
            };
            if let Next::Stop = next {
                return Ok(());
            }
        }
    }

    async fn wait_for_change(&mut self) -> Result<Next, ServeError> {
        match self.race(std::future::pending::<Infallible>()).await? {
            Raced::Interrupted(next) => Ok(next),
            Raced::Done(never) => match never {},
        }
    }

    /// Runs `work` until it finishes, unless a leadership change, a shutdown or a poisoning
    /// comes first; `work` is then dropped, which backend calls allow (they are cancel-safe).
    async fn race<T>(&mut self, work: impl Future<Output = T>) -> Result<Raced<T>, ServeError> {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Ok(Raced::Interrupted(Next::Stop)),
            _ = self.shared.failed.cancelled() => Err(self.shared.take_fatal()),
            changed = self.leadership.changed() => match changed {
                Ok(()) => Ok(Raced::Interrupted(Next::Handle)),
                Err(_) => Err(ServeError::LeadershipClosed),
            },
            done = work => Ok(Raced::Done(done)),
        }
    }

    /// Stops serving first (the term and its allocator are dropped, so nothing more is granted
    /// under it), then waits for the term's extender to end.
    async fn step_down(&mut self, hint: LeaderHint) {
        self.shared.step_down(hint);
        self.end_term().await;
    }

    /// Ends the current term's extender and waits for it, so no extension of an older term is
    /// in flight once a new fence starts.
    async fn end_term(&mut self) {
        if let Some(extender) = self.extender.take() {
            extender.cancel.cancel();
            let _ = extender.task.await;
        }
    }

    /// Fences for `epoch` and serves, retrying transient failures for as long as no other
    /// leadership state arrives.
    async fn fence(&mut self, epoch: Epoch) -> Result<Next, ServeError> {
        info!(%epoch, "leader: fencing before serving");
        self.step_down(LeaderHint::default()).await;
        let mut retry = FenceRetry::new(epoch);
        loop {
            let attempt = fence_attempt(Arc::clone(&self.shared), epoch);
            let result = match self.race(attempt).await? {
                Raced::Done(result) => result,
                Raced::Interrupted(next) => return Ok(next),
            };
            let delay = match self.settle(epoch, result)? {
                Settled::Done => return Ok(Next::Wait),
                Settled::Retry(error) => retry.next_delay(&error),
            };
            if let Raced::Interrupted(next) = self.race(tokio::time::sleep(delay)).await? {
                return Ok(next);
            }
        }
    }

    /// Acts on one fence attempt: serve, step down, retry, or fail (SEMANTICS §5).
    fn settle(
        &mut self,
        epoch: Epoch,
        result: Result<Window, FenceFailure>,
    ) -> Result<Settled, ServeError> {
        let err = match result {
            Ok(window) => {
                self.serve(epoch, window);
                return Ok(Settled::Done);
            }
            Err(FenceFailure::Invariant(msg)) => {
                metrics::fence_done("fatal");
                return Err(ServeError::Invariant(msg));
            }
            Err(FenceFailure::Backend(err)) => err,
        };
        match err {
            ConsensusError::Transient(msg) => Ok(Settled::Retry(msg)),
            ConsensusError::NotLeader { .. } | ConsensusError::Fenced { .. } => {
                metrics::fence_done("stepped_down");
                warn!(%epoch, error = %err, "fence refused: stepping down");
                self.shared.step_down(hint_of(&err));
                Ok(Settled::Done)
            }
            ConsensusError::Permanent(_) => {
                metrics::fence_done("fatal");
                Err(ServeError::Consensus(err))
            }
        }
    }

    fn serve(&mut self, epoch: Epoch, window: Window) {
        let Some((term_id, wake)) = self.shared.start_serving(epoch, window.clone()) else {
            return;
        };
        metrics::fence_done("served");
        info!(%epoch, floor_ms = window.cursor_ms(), high_water_ms = window.high_water_ms(), "serving");
        let cancel = self.shutdown.child_token();
        let task = tokio::spawn(extend::run(
            Arc::clone(&self.shared),
            term_id,
            wake,
            cancel.clone(),
        ));
        self.extender = Some(Extender { cancel, task });
    }
}

/// One fence attempt: load, plan, persist, seed.
async fn fence_attempt(shared: Arc<Shared>, epoch: Epoch) -> Result<Window, FenceFailure> {
    let prior_ms = shared
        .backend
        .load_high_water()
        .await
        .map_err(FenceFailure::Backend)?;
    let now_ms = shared.clock.now_ms();
    let failover_advance_ms = shared.config.failover_advance.as_millis() as u64;
    let fence = Fence::plan(prior_ms, now_ms, failover_advance_ms)
        .map_err(|e| FenceFailure::Invariant(e.to_string()))?;
    let durable_ms = shared
        .backend
        .persist_high_water(fence.target_ms(), epoch)
        .await
        .map_err(FenceFailure::Backend)?;
    fence
        .complete(durable_ms)
        .map_err(|e| FenceFailure::Invariant(e.to_string()))
}
