//! The leadership watch and the failover fence (SEMANTICS §5).
//!
//! One task follows the backend's leadership stream. On every `Leader` event it fences: stop
//! serving, end the previous term's extender, load the prior high-water, persist a new one above
//! `max(prior + 1, now)`, and only then serve. Transient errors are retried for as long as the
//! node stays leader, each wait racing the stream; NotLeader/Fenced step down; Permanent errors
//! and broken invariants end the task with an error, which poisons serving.

use std::sync::Arc;

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
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Ok(Next::Stop),
            _ = self.shared.failed.cancelled() => Err(self.shared.take_fatal()),
            changed = self.leadership.changed() => changed.map(|()| Next::Handle).map_err(|_| ServeError::LeadershipClosed),
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

    async fn fence(&mut self, epoch: Epoch) -> Result<Next, ServeError> {
        info!(%epoch, "leader: fencing before serving");
        self.step_down(LeaderHint::default()).await;
        let mut backoff = Backoff::fence();
        let mut retries: u64 = 0;
        loop {
            let attempt = fence_attempt(&self.shared, epoch);
            let result = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(Next::Stop),
                _ = self.shared.failed.cancelled() => return Err(self.shared.take_fatal()),
                changed = self.leadership.changed() => return changed.map(|()| Next::Handle).map_err(|_| ServeError::LeadershipClosed),
                result = attempt => result,
            };
            let err = match result {
                Ok(window) => {
                    self.serve(epoch, window);
                    return Ok(Next::Wait);
                }
                Err(FenceFailure::Invariant(msg)) => return Err(ServeError::Invariant(msg)),
                Err(FenceFailure::Backend(err)) => err,
            };
            match err {
                ConsensusError::Transient(msg) => {
                    retries += 1;
                    metrics::fence_retry("transient");
                    // Warn on the 1st, 2nd, 4th, 8th... retry: visible, never a flood.
                    if retries.is_power_of_two() {
                        warn!(%epoch, retries, error = %msg, "fence failed transiently; still leader, retrying");
                    }
                    let delay = backoff.next_delay();
                    tokio::select! {
                        biased;
                        _ = self.shutdown.cancelled() => return Ok(Next::Stop),
                        changed = self.leadership.changed() => return changed.map(|()| Next::Handle).map_err(|_| ServeError::LeadershipClosed),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                ConsensusError::NotLeader { .. } | ConsensusError::Fenced { .. } => {
                    metrics::fence_done("stepped_down");
                    warn!(%epoch, error = %err, "fence refused: stepping down");
                    self.shared.step_down(hint_of(&err));
                    return Ok(Next::Wait);
                }
                ConsensusError::Permanent(_) => {
                    metrics::fence_done("fatal");
                    return Err(ServeError::Consensus(err));
                }
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
async fn fence_attempt(shared: &Shared, epoch: Epoch) -> Result<Window, FenceFailure> {
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
