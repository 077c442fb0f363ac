//! The checker's clients: sequential callers that record every call, granted or not.
//!
//! Each client has its own connection and its own seeded random counts, and makes one call at
//! a time, so its calls never overlap and its order is its start order. A call's start and end
//! are read on `CLOCK_MONOTONIC` right around the RPC; the real call lies inside that span.
//!
//! Against several nodes, some clients are pinned: each calls one node only, whatever it
//! answers, so a cut-off old leader that keeps granting is compared with the new leader in the
//! same history. The others follow the leader, and liveness is judged on them alone. All of
//! them share one budget of calls; when it runs out, they stop together and the run stops with
//! them.
//!
//! With `--workload seq` each call is a `GetSeq` on one of [`SEQ_KEYS`], or now and then a
//! `GetSeqBatch` on several of them, keys and counts drawn from the same seeded generator; a
//! batch is recorded as one entry per key, sharing the call's span and outcome. A failure is
//! recorded as uncertain when the values may have been spent (SEMANTICS §11, D2), as refused
//! otherwise (`RESOURCE_EXHAUSTED` among them: a cap refuses before anything is written).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;

use super::History;
use super::history::{Call, Outcome, WireGrant, monotonic_ns};
use super::options::Workload;
use super::seq::{BlockEpoch, SeqCall, SeqOutcome};
use crate::targets::{Failure, Route, WireBlock};

/// The sequence keys of `--workload seq`: few, so that every key sees many blocks, failures
/// and failovers; fixed names, so repeated runs against one server do not grow its key set.
pub const SEQ_KEYS: [&str; 3] = ["check-seq-0", "check-seq-1", "check-seq-2"];
/// A sequence call asks for 1 to this many values of each key. Counts this large make gaps of
/// every size, and the D2 subset sums stay cheap: a bitset of the skipped values per uncertain
/// call (see `seq::SubsetSums`).
pub const BLOCK_COUNT_MAX: u32 = 64;
/// One sequence call in this many is a `GetSeqBatch` of 1 to all of [`SEQ_KEYS`], distinct and
/// in a random order; the others are a `GetSeq`.
pub const SEQ_BATCH_ONE_IN: u32 = 3;
// The workload's requests stay inside the protocol's limits, so every refusal it sees is a
// server's answer to a valid call.
const _: () = assert!(BLOCK_COUNT_MAX <= tso_proto::limits::SEQ_COUNT_MAX);
const _: () = assert!(SEQ_KEYS.len() <= tso_proto::limits::SEQ_BATCH_KEYS_MAX);
/// Pause after a failed call, so a down server (or a pinned client's follower) is not spun on.
const FAILED_PAUSE: Duration = Duration::from_millis(5);

/// Which clients are pinned to a node, and to which one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// Clients `0..pinned` are pinned, client `i` to node `i % nodes`.
    pub pinned: usize,
    pub nodes: usize,
}

impl Mix {
    /// With more than one node, one client pinned to each node, as long as at least one
    /// client is left to follow the leader; with one node, none.
    pub fn new(clients: usize, nodes: usize) -> Mix {
        let pinned = if nodes > 1 {
            nodes.min(clients.saturating_sub(1))
        } else {
            0
        };
        Mix { pinned, nodes }
    }

    /// The node client `id` is pinned to, if it is pinned.
    pub fn node_of(&self, id: u32) -> Option<usize> {
        let id = id as usize;
        (id < self.pinned).then(|| id % self.nodes)
    }
}

/// State the run shares with its clients.
pub struct Shared {
    stop: AtomicBool,
    stopped: Notify,
    /// `CLOCK_MONOTONIC` ns when the clients were told to stop (0 while they run).
    stopped_ns: AtomicU64,
    /// The clients stopped because they made `calls_max` calls, not because the run ended.
    capped: AtomicBool,
    calls_max: usize,
    calls_started: AtomicUsize,
    /// `CLOCK_MONOTONIC` ns of the latest successful reply to a client that follows the leader.
    pub last_ok_ns: AtomicU64,
}

impl Shared {
    /// Clients that may make `calls_max` calls in all.
    pub fn new(calls_max: usize) -> Shared {
        Shared {
            stop: AtomicBool::new(false),
            stopped: Notify::new(),
            stopped_ns: AtomicU64::new(0),
            capped: AtomicBool::new(false),
            calls_max,
            calls_started: AtomicUsize::new(0),
            last_ok_ns: AtomicU64::new(0),
        }
    }

    /// Tells the clients (and whoever sleeps in [`Shared::sleep_until`]) to stop.
    pub fn stop(&self) {
        let _ = self.stopped_ns.compare_exchange(
            0,
            monotonic_ns(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
        self.stop.store(true, Ordering::Release);
        self.stopped.notify_waiters();
    }

    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// When the clients were told to stop, if they were.
    pub fn stopped_ns(&self) -> Option<u64> {
        Some(self.stopped_ns.load(Ordering::Relaxed)).filter(|&ns| ns > 0)
    }

    /// Whether the clients stopped at the call cap.
    pub fn capped(&self) -> bool {
        self.capped.load(Ordering::Relaxed)
    }

    /// Takes one call from the budget; the first client to find it empty stops everyone.
    pub(super) fn take_call(&self) -> bool {
        self.take_calls(1)
    }

    /// Takes `n` calls from the budget (the entries of one batch), all or none.
    fn take_calls(&self, n: usize) -> bool {
        let started = self.calls_started.fetch_add(n, Ordering::Relaxed);
        if started.saturating_add(n) <= self.calls_max {
            return true;
        }
        if !self.capped.swap(true, Ordering::Relaxed) {
            self.stop();
        }
        false
    }

    /// Sleeps until `at`, or until the clients are told to stop; returns whether `at` came.
    pub async fn sleep_until(&self, at: Instant) -> bool {
        let stopped = self.stopped.notified();
        tokio::pin!(stopped);
        // Registered before the flag is read, so a stop in between still wakes this sleep.
        stopped.as_mut().enable();
        if self.is_stopped() {
            return false;
        }
        tokio::select! {
            _ = stopped => false,
            _ = tokio::time::sleep_until(at.into()) => !self.is_stopped(),
        }
    }
}

/// One recording client.
pub struct Client {
    pub id: u32,
    pub seed: u64,
    pub count_max: u32,
    pub workload: Workload,
    pub route: Route,
    /// Pinned to one node: its replies do not count for liveness.
    pub pinned: bool,
    pub shared: Arc<Shared>,
}

impl Client {
    /// Calls until told to stop or the budget runs out; returns every call it made.
    pub async fn run(self) -> anyhow::Result<History> {
        let rng = StdRng::seed_from_u64(
            self.seed ^ u64::from(self.id).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        Ok(match self.workload {
            Workload::Ts => History::Ts(self.run_ts(rng).await),
            Workload::Seq => History::Seq(self.run_seq(rng).await),
            Workload::Lease => unreachable!("the lease workload runs `LeaseClient`s"),
        })
    }

    async fn run_ts(mut self, mut rng: StdRng) -> Vec<Call> {
        let mut calls = Vec::new();
        while !self.shared.is_stopped() && self.shared.take_call() {
            let requested = rng.random_range(1..=self.count_max);
            let start_ns = monotonic_ns();
            let reply = self.route.get(requested).await;
            let end_ns = monotonic_ns();
            calls.push(Call {
                client: self.id,
                start_ns,
                end_ns,
                requested,
                outcome: self.outcome(reply, end_ns).await,
            });
        }
        calls
    }

    async fn run_seq(mut self, mut rng: StdRng) -> Vec<SeqCall> {
        let mut calls = Vec::new();
        let mut batches = 0;
        while !self.shared.is_stopped() {
            let (batch, entries) = draw_seq(&mut rng);
            if !self.shared.take_calls(entries.len()) {
                break;
            }
            let named: Vec<(&str, u32)> = entries.iter().map(|&(k, n)| (SEQ_KEYS[k], n)).collect();
            let start_ns = monotonic_ns();
            let reply = if batch {
                self.route.seq_batch(&named).await
            } else {
                let (key, count) = named[0];
                self.route.seq(key, count).await.map(|block| vec![block])
            };
            let end_ns = monotonic_ns();
            let outcomes = self.seq_outcomes(reply, entries.len(), end_ns).await;
            let batch = batch.then(|| {
                batches += 1;
                batches - 1
            });
            for ((key, requested), outcome) in entries.into_iter().zip(outcomes) {
                calls.push(SeqCall {
                    client: self.id,
                    key: key as u32,
                    requested,
                    batch,
                    start_ns,
                    end_ns,
                    outcome,
                });
            }
        }
        calls
    }

    /// Records a sequence reply, one outcome per key asked for; pauses after a failure.
    async fn seq_outcomes(
        &self,
        reply: Result<Vec<WireBlock>, Failure>,
        entries: usize,
        end_ns: u64,
    ) -> Vec<SeqOutcome> {
        let outcome = match reply {
            Ok(blocks) => {
                if !self.pinned {
                    self.shared.last_ok_ns.fetch_max(end_ns, Ordering::Relaxed);
                }
                let block = |b: WireBlock| SeqOutcome::Block {
                    start: b.start,
                    count: b.count,
                    epoch: Some(BlockEpoch::from(b.epoch)),
                };
                return blocks.into_iter().map(block).collect();
            }
            Err(Failure::Malformed(reason)) => SeqOutcome::Malformed(reason),
            Err(Failure::Uncertain(code)) => SeqOutcome::Uncertain(code),
            Err(Failure::Error(code)) => SeqOutcome::Refused(code),
        };
        if !matches!(outcome, SeqOutcome::Malformed(_)) {
            tokio::time::sleep(FAILED_PAUSE).await;
        }
        vec![outcome; entries]
    }

    /// Records a reply; pauses after a failure.
    async fn outcome(&self, reply: Result<WireGrant, Failure>, end_ns: u64) -> Outcome {
        match reply {
            Ok(grant) => {
                if !self.pinned {
                    self.shared.last_ok_ns.fetch_max(end_ns, Ordering::Relaxed);
                }
                Outcome::Granted(grant)
            }
            Err(Failure::Malformed(reason)) => Outcome::Malformed(reason),
            // `GetTs` is never uncertain: a lost request spends nothing that must be dense.
            Err(Failure::Error(code) | Failure::Uncertain(code)) => {
                tokio::time::sleep(FAILED_PAUSE).await;
                Outcome::Failed(code)
            }
        }
    }
}

/// One sequence call: whether it is a `GetSeqBatch`, and its `(key index, count)` entries.
fn draw_seq(rng: &mut StdRng) -> (bool, Vec<(usize, u32)>) {
    if rng.random_range(0..SEQ_BATCH_ONE_IN) > 0 {
        let key = rng.random_range(0..SEQ_KEYS.len());
        return (false, vec![(key, rng.random_range(1..=BLOCK_COUNT_MAX))]);
    }
    let mut keys: Vec<usize> = (0..SEQ_KEYS.len()).collect();
    keys.shuffle(rng);
    keys.truncate(rng.random_range(1..=SEQ_KEYS.len()));
    let entries = keys
        .into_iter()
        .map(|key| (key, rng.random_range(1..=BLOCK_COUNT_MAX)))
        .collect();
    (true, entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_per_node_is_pinned_while_one_follows() {
        assert_eq!(Mix::new(8, 3).pinned, 3);
        assert_eq!(Mix::new(4, 5).pinned, 3);
        assert_eq!(Mix::new(1, 3).pinned, 0);
        assert_eq!(Mix::new(8, 1).pinned, 0);
        let mix = Mix::new(8, 3);
        let nodes: Vec<Option<usize>> = (0..5).map(|id| mix.node_of(id)).collect();
        assert_eq!(nodes, vec![Some(0), Some(1), Some(2), None, None]);
    }

    #[test]
    fn the_budget_stops_every_client_once() {
        let shared = Shared::new(2);
        assert!(shared.take_call() && shared.take_call());
        assert!(!shared.is_stopped());
        assert!(!shared.take_call());
        assert!(shared.is_stopped() && shared.capped());
        let stopped_ns = shared.stopped_ns().unwrap();
        assert!(!shared.take_call());
        shared.stop();
        assert_eq!(shared.stopped_ns(), Some(stopped_ns));
    }

    #[test]
    fn a_batch_takes_its_entries_from_the_budget() {
        let shared = Shared::new(4);
        assert!(shared.take_calls(3));
        assert!(!shared.take_calls(2));
        assert!(shared.is_stopped() && shared.capped());
    }

    #[test]
    fn sequence_calls_are_drawn_from_the_seed() {
        let draws = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..300).map(|_| draw_seq(&mut rng)).collect::<Vec<_>>()
        };
        let drawn = draws(5);
        assert_eq!(drawn, draws(5), "replayable");
        for (batch, entries) in &drawn {
            assert!(*batch || entries.len() == 1, "{entries:?}");
            let mut keys: Vec<usize> = entries.iter().map(|&(k, _)| k).collect();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), entries.len(), "distinct keys: {entries:?}");
            assert!(
                entries
                    .iter()
                    .all(|&(_, n)| (1..=BLOCK_COUNT_MAX).contains(&n))
            );
        }
        let batches = drawn.iter().filter(|(batch, _)| *batch).count();
        assert!((50..150).contains(&batches), "{batches} batches in 300");
        let counts = drawn.iter().flat_map(|(_, e)| e.iter().map(|&(_, n)| n));
        assert!(counts.clone().any(|n| n > 32) && counts.clone().any(|n| n <= 4));
        assert!(
            drawn
                .iter()
                .any(|(batch, e)| *batch && e.len() == SEQ_KEYS.len())
        );
    }

    #[tokio::test]
    async fn a_stop_ends_a_sleep() {
        let shared = Arc::new(Shared::new(1));
        let far = Instant::now() + Duration::from_secs(3600);
        let sleeper = tokio::spawn({
            let shared = Arc::clone(&shared);
            async move { shared.sleep_until(far).await }
        });
        shared.stop();
        assert!(!sleeper.await.unwrap());
        assert!(!shared.sleep_until(far).await);
        let fresh = Shared::new(1);
        assert!(fresh.sleep_until(Instant::now()).await);
    }
}
