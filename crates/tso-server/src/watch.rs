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

use crate::backend::{BackendError, Leadership, OracleCommand};
use crate::backoff::Backoff;
use crate::error::ServeError;
use crate::extend;
use crate::metrics;
use crate::oracle::Shared;
use crate::refusal::{LeaderHint, hint_of};

/// What the watch does after handling a state.
enum Next {
    /// Wait for the next leadership change.
    Wait,
    /// A change already arrived: handle the current state at once.
    Handle,
    /// The backend refused this node as leader in `Epoch` (a fence or an extension answered
    /// NotLeader/Fenced): if the stream still says this node leads in that epoch, no change
    /// will ever come, so fence again after a backoff.
    Recheck(Epoch),
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
    /// Serving: wait for the next leadership change.
    Done,
    /// Refused as leader: stepped down; recheck.
    SteppedDown,
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
    Backend(BackendError),
    Invariant(String),
}

/// The extender of the current term.
struct Extender {
    epoch: Epoch,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

struct Watcher {
    shared: Arc<Shared>,
    leadership: watch::Receiver<Leadership>,
    shutdown: CancellationToken,
    extender: Option<Extender>,
    /// Paces fences repeated after a refusal in an epoch the stream still reports; reset by
    /// every leadership change.
    recheck: Backoff,
}

/// Resolves when the current term's extender task ends (never, without one).
async fn extender_ended(extender: &mut Option<Extender>) -> Result<(), tokio::task::JoinError> {
    match extender {
        Some(e) => (&mut e.task).await,
        None => std::future::pending().await,
    }
}

/// Follows leadership until shutdown or a fatal error.
pub(crate) async fn run(
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    if !shared.claimed() {
        return Err(ServeError::BackendInUse);
    }
    let leadership = shared.backend.leadership();
    let mut watcher = Watcher {
        shared,
        leadership,
        shutdown,
        extender: None,
        recheck: Backoff::fence(),
    };
    let result = watcher.follow().await;
    watcher.end_term().await;
    if result.is_ok() {
        // A requested stop: nothing is granted any more, and the state says so.
        watcher.shared.step_down(LeaderHint::default());
    }
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
            if !self.settle_next(next).await? {
                return Ok(());
            }
        }
    }

    /// Follows `next` until a state is to be handled (`true`) or shutdown was asked (`false`).
    async fn settle_next(&mut self, mut next: Next) -> Result<bool, ServeError> {
        loop {
            next = match next {
                Next::Wait => self.wait_for_change().await?,
                Next::Recheck(epoch) => self.recheck(epoch).await?,
                Next::Handle => return Ok(true),
                Next::Stop => return Ok(false),
            };
        }
    }

    /// After a refusal in `epoch`: fence again after a backoff if the stream still reports this
    /// node leading in `epoch`, else handle what it reports now.
    async fn recheck(&mut self, epoch: Epoch) -> Result<Next, ServeError> {
        let still =
            matches!(*self.leadership.borrow(), Leadership::Leader { epoch: e } if e == epoch);
        if !still {
            return Ok(Next::Handle);
        }
        let delay = self.recheck.next_delay();
        warn!(%epoch, ?delay, "refused as leader while the backend still reports this node leading: fencing again");
        match self.race(tokio::time::sleep(delay)).await? {
            Raced::Done(()) => Ok(Next::Handle),
            Raced::Interrupted(next) => Ok(next),
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
    /// The current term's extender ending also interrupts: see [`Self::extender_stopped`].
    async fn race<T>(&mut self, work: impl Future<Output = T>) -> Result<Raced<T>, ServeError> {
        let ended = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return Ok(Raced::Interrupted(Next::Stop)),
            _ = self.shared.failed.cancelled() => return Err(self.shared.take_fatal()),
            changed = self.leadership.changed() => match changed {
                Ok(()) => {
                    self.recheck.reset();
                    return Ok(Raced::Interrupted(Next::Handle));
                }
                Err(_) => return Err(ServeError::LeadershipClosed),
            },
            ended = extender_ended(&mut self.extender) => ended,
            done = work => return Ok(Raced::Done(done)),
        };
        let extender = self.extender.take().expect("an extender ended");
        self.extender_stopped(extender.epoch, ended)
            .map(Raced::Interrupted)
    }

    /// The extender stops by itself only after stepping down (NotLeader/Fenced: recheck) or
    /// poisoning serving. Anything else (a panic, a return while its term still serves) would
    /// leave a term that serves with no extension ever coming: fatal.
    fn extender_stopped(
        &mut self,
        epoch: Epoch,
        ended: Result<(), tokio::task::JoinError>,
    ) -> Result<Next, ServeError> {
        if let Err(e) = ended {
            return Err(ServeError::Invariant(format!(
                "the window extender of epoch {epoch} stopped: {e}"
            )));
        }
        if self.shared.is_poisoned() {
            return Err(self.shared.take_fatal());
        }
        if self.shared.serving_epoch().is_some() {
            return Err(ServeError::Invariant(format!(
                "the window extender of epoch {epoch} stopped while its term still serves"
            )));
        }
        Ok(Next::Recheck(epoch))
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
        let started = std::time::Instant::now();
        self.step_down(LeaderHint::default()).await;
        let mut retry = FenceRetry::new(epoch);
        loop {
            let attempt = fence_attempt(Arc::clone(&self.shared), epoch);
            let result = match self.race(attempt).await? {
                Raced::Done(result) => result,
                Raced::Interrupted(next) => return Ok(next),
            };
            let delay = match self.settle(epoch, result)? {
                Settled::Done => {
                    self.shared.note_fence(started.elapsed());
                    return Ok(Next::Wait);
                }
                Settled::SteppedDown => return Ok(Next::Recheck(epoch)),
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
            BackendError::Transient(msg) => Ok(Settled::Retry(msg)),
            BackendError::NotLeader { .. } | BackendError::Fenced { .. } => {
                metrics::fence_done("stepped_down");
                warn!(%epoch, error = %err, "fence refused: stepping down");
                self.shared.step_down(hint_of(&err));
                Ok(Settled::SteppedDown)
            }
            BackendError::Permanent(_) => {
                metrics::fence_done("fatal");
                Err(ServeError::Backend(err))
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
        self.extender = Some(Extender {
            epoch,
            cancel,
            task,
        });
    }
}

/// One fence attempt: load, plan, persist, seed.
async fn fence_attempt(shared: Arc<Shared>, epoch: Epoch) -> Result<Window, FenceFailure> {
    let prior_ms = shared
        .backend
        .load()
        .await
        .map_err(FenceFailure::Backend)?
        .high_water_ms;
    let now_ms = shared.clock.now_ms();
    let failover_advance_ms = shared.config.failover_advance.as_millis() as u64;
    let fence = Fence::plan(prior_ms, now_ms, failover_advance_ms)
        .map_err(|e| FenceFailure::Invariant(e.to_string()))?;
    let cmd = OracleCommand::AdvanceHighWater {
        at_least_ms: fence.target_ms(),
    };
    let durable_ms = shared
        .backend
        .apply(cmd, epoch)
        .await
        .map_err(FenceFailure::Backend)?
        .high_water_ms;
    fence
        .complete(durable_ms)
        .map_err(|e| FenceFailure::Invariant(e.to_string()))
}
