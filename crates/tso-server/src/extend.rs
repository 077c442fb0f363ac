//! The extender: one task per term that keeps the durable high-water ahead of the clock.
//!
//! It wakes when the grant path asks (room below half a window, or exhausted) and on a tick
//! while idle, so that steady-state requests never wait on a durable write. Only one extension
//! of a term is ever in flight. Its result is applied only to the term that started it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backend::{BackendError, OracleCommand};
use crate::backoff::Backoff;
use crate::error::ServeError;
use crate::metrics;
use crate::oracle::{Plan, Shared};
use crate::refusal::hint_of;

/// Shortest idle tick, so a tiny window does not spin the task.
const TICK_MIN: Duration = Duration::from_millis(1);

/// Runs until the term ends, the node steps down, or `cancel` fires.
pub(crate) async fn run(
    shared: Arc<Shared>,
    term_id: u64,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    // An idle node still extends once per quarter window, so its first request after a pause
    // finds room.
    let tick = (shared.config.window_ahead / 4).max(TICK_MIN);
    let mut backoff = Backoff::fence();
    let mut wait = false;
    loop {
        if wait {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
        }
        wait = true;
        let (target_ms, epoch) = match shared.plan_extension(term_id) {
            Plan::Extend { target_ms, epoch } => (target_ms, epoch),
            Plan::Idle => continue,
            Plan::Gone => return,
        };
        let started = Instant::now();
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            result = shared.backend.apply(OracleCommand::AdvanceHighWater { at_least_ms: target_ms }, epoch) => result.map(|s| s.high_water_ms),
        };
        match shared.finish_extension(term_id, target_ms, result) {
            Ok(()) => {
                debug!(
                    target_ms,
                    took_us = started.elapsed().as_micros() as u64,
                    "window extended"
                );
                metrics::extension_done(started.elapsed(), target_ms, shared.clock.now_ms());
                backoff.reset();
            }
            Err(err) => {
                if !on_error(&shared, err) {
                    return;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

/// Acts on a failed extension; returns whether the term goes on.
fn on_error(shared: &Shared, err: BackendError) -> bool {
    match err {
        BackendError::Transient(ref msg) => {
            metrics::extension_failed("transient");
            warn!(error = %msg, "window extension failed transiently; still leader, retrying");
            true
        }
        BackendError::NotLeader { .. } | BackendError::Fenced { .. } => {
            metrics::extension_failed("not_leader");
            warn!(error = %err, "window extension refused: stepping down");
            shared.step_down(hint_of(&err));
            false
        }
        BackendError::Permanent(_) => {
            metrics::extension_failed("permanent");
            tracing::error!(error = %err, "window extension failed permanently: stopping serving");
            shared.poison(ServeError::Backend(err));
            false
        }
    }
}
