//! Coalescing: callers queue as [`Waiter`]s; one background task turns whatever is queued at
//! the moment into one `GetTs` RPC and hands each waiter its contiguous slice of the grant.
//!
//! - An idle client sends a lone caller's request at once: there is no batching window. Batches
//!   form only from callers that queued while the in-flight limit was reached.
//! - Freshness (G2): a waiter is only ever served by an RPC sent after it queued; nothing is
//!   fetched ahead or kept for later.
//! - Bounds: the queue holds at most `queued_callers_max` waiters, at most
//!   `in_flight_rpcs_max` RPCs run at once, and one RPC asks for at most `LOGICAL_COUNT`.
//! - The task ends when the client is dropped; dropping it aborts the RPCs it runs.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tso_core::LOGICAL_COUNT;

use crate::Result;
use crate::call::fetch;
use crate::grant::{TsRange, slice_grant};
use crate::router::Router;

/// One caller waiting for `count` (1..=LOGICAL_COUNT) timestamps.
pub(crate) struct Waiter {
    pub(crate) count: u32,
    pub(crate) deadline: Instant,
    pub(crate) reply: oneshot::Sender<Result<TsRange>>,
}

/// Runs until every sender of `queue` is gone.
pub(crate) async fn run(mut queue: mpsc::Receiver<Waiter>, router: Arc<Router>) {
    let permits = Arc::new(Semaphore::new(router.config().in_flight_rpcs_max));
    let mut rpcs = JoinSet::new();
    let mut carry = None;
    loop {
        let first = match carry.take() {
            Some(waiter) => waiter,
            None => match queue.recv().await {
                Some(waiter) => waiter,
                None => break,
            },
        };
        // Callers that arrive while this waits for a free slot join the batch below.
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .expect("the permit semaphore is never closed");
        let (batch, rest) = drain(first, &mut queue);
        carry = rest;
        while rpcs.try_join_next().is_some() {}
        if !batch.is_empty() {
            rpcs.spawn(serve(Arc::clone(&router), batch, permit));
        }
    }
}

/// Takes `first` and every queued waiter that fits in one grant; returns the batch and the
/// first waiter that did not fit. Waiters whose caller gave up are dropped.
fn drain(first: Waiter, queue: &mut mpsc::Receiver<Waiter>) -> (Vec<Waiter>, Option<Waiter>) {
    let mut batch = Vec::new();
    let mut total: u32 = 0;
    let mut next = Some(first);
    while let Some(waiter) = next.take().or_else(|| queue.try_recv().ok()) {
        if waiter.reply.is_closed() {
            continue;
        }
        if total + waiter.count > LOGICAL_COUNT {
            return (batch, Some(waiter));
        }
        total += waiter.count;
        batch.push(waiter);
    }
    (batch, None)
}

/// Sends one RPC for the whole batch and fans the result out: each waiter its slice, or every
/// waiter the same error.
async fn serve(router: Arc<Router>, batch: Vec<Waiter>, permit: OwnedSemaphorePermit) {
    let count = batch.iter().map(|w| w.count).sum();
    let deadline = batch
        .iter()
        .map(|w| w.deadline)
        .min()
        .expect("a batch is never empty");
    let result = fetch(&router, count, deadline).await;
    drop(permit);
    match result {
        Ok(grant) => {
            let counts: Vec<u32> = batch.iter().map(|w| w.count).collect();
            for (waiter, slice) in batch.into_iter().zip(slice_grant(grant, &counts)) {
                let _ = waiter.reply.send(Ok(slice));
            }
        }
        Err(error) => {
            for waiter in batch {
                let _ = waiter.reply.send(Err(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(count: u32) -> (Waiter, oneshot::Receiver<Result<TsRange>>) {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now();
        (
            Waiter {
                count,
                deadline,
                reply,
            },
            rx,
        )
    }

    #[test]
    fn a_batch_never_passes_one_grant_and_skips_abandoned_callers() {
        let (tx, mut queue) = mpsc::channel(8);
        let (first, _keep_first) = waiter(200_000);
        let (gone, gone_rx) = waiter(5);
        drop(gone_rx);
        let (small, _keep_small) = waiter(62_144);
        let (big, _keep_big) = waiter(1);
        for w in [gone, small, big] {
            assert!(tx.try_send(w).is_ok());
        }
        let (batch, rest) = drain(first, &mut queue);
        let counts: Vec<u32> = batch.iter().map(|w| w.count).collect();
        assert_eq!(counts, [200_000, 62_144]);
        assert_eq!(rest.map(|w| w.count), Some(1));
        let (batch, rest) = drain(waiter(LOGICAL_COUNT).0, &mut queue);
        assert_eq!(batch.len(), 1);
        assert!(rest.is_none());
    }

    #[test]
    fn random_queues_drain_in_order_into_batches_of_at_most_one_grant() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = std::env::var("TSO_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random);
        println!("seed: {seed} (replay with TSO_TEST_SEED={seed})");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let counts: Vec<u32> = (0..500)
            .map(|_| match rng.random_range(0..10) {
                0 => rng.random_range(1..=LOGICAL_COUNT),
                _ => rng.random_range(1..=1000),
            })
            .collect();
        let (tx, mut queue) = mpsc::channel(counts.len());
        let mut receivers = Vec::new();
        for &count in &counts {
            let (w, rx) = waiter(count);
            assert!(tx.try_send(w).is_ok());
            receivers.push(rx);
        }
        let mut drained = Vec::new();
        let mut carry = None;
        while let Some(first) = carry.take().or_else(|| queue.try_recv().ok()) {
            let (batch, rest) = drain(first, &mut queue);
            let total: u64 = batch.iter().map(|w| u64::from(w.count)).sum();
            assert!(
                (1..=u64::from(LOGICAL_COUNT)).contains(&total),
                "seed {seed}"
            );
            drained.extend(batch.iter().map(|w| w.count));
            carry = rest;
        }
        assert_eq!(
            drained, counts,
            "seed {seed}: a waiter was lost or reordered"
        );
    }
}
