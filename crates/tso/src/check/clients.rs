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
//! With `--workload seq` each call is one `GetSeq` on one of [`SEQ_KEYS`], key and count drawn
//! from the same seeded generator; a failure is recorded as uncertain when the values may have
//! been spent (SEMANTICS §11, D2), as refused otherwise.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;

use super::History;
use super::history::{Call, Outcome, WireGrant, monotonic_ns};
use super::seq::{SeqCall, SeqOutcome};
use crate::cli::Workload;
use crate::targets::{Failure, Route, WireBlock};

/// Calls recorded in one run at most, over all clients: about 60 bytes each, under 1 GiB (a
/// release build against 3 local nodes makes about 13k calls/s, so 10 minutes fit).
/// When the clients have made this many they stop, and the nemesis with them.
pub const CALLS_MAX: usize = 16_000_000;
/// The sequence keys of `--workload seq`: few, so that every key sees many blocks, failures
/// and failovers; fixed names, so repeated runs against one server do not grow its key set.
pub const SEQ_KEYS: [&str; 3] = ["check-seq-0", "check-seq-1", "check-seq-2"];
/// A `GetSeq` call asks for 1 to this many values: small counts keep the D2 subset sums cheap
/// and make many distinct ways to fill a gap.
pub const SEQ_COUNT_MAX: u32 = 4;
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
        if self.calls_started.fetch_add(1, Ordering::Relaxed) < self.calls_max {
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
        while !self.shared.is_stopped() && self.shared.take_call() {
            let key = rng.random_range(0..SEQ_KEYS.len());
            let requested = rng.random_range(1..=SEQ_COUNT_MAX);
            let start_ns = monotonic_ns();
            let reply = self.route.seq(SEQ_KEYS[key], requested).await;
            let end_ns = monotonic_ns();
            calls.push(SeqCall {
                client: self.id,
                key: key as u32,
                requested,
                start_ns,
                end_ns,
                outcome: self.seq_outcome(reply, end_ns).await,
            });
        }
        calls
    }

    /// Records a sequence reply; pauses after a failure.
    async fn seq_outcome(&self, reply: Result<WireBlock, Failure>, end_ns: u64) -> SeqOutcome {
        let outcome = match reply {
            Ok(block) => {
                if !self.pinned {
                    self.shared.last_ok_ns.fetch_max(end_ns, Ordering::Relaxed);
                }
                return SeqOutcome::Block {
                    start: block.start,
                    count: block.count,
                };
            }
            Err(Failure::Malformed(reason)) => return SeqOutcome::Malformed(reason),
            Err(Failure::Uncertain(code)) => SeqOutcome::Uncertain(code),
            Err(Failure::Error(code)) => SeqOutcome::Refused(code),
        };
        tokio::time::sleep(FAILED_PAUSE).await;
        outcome
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
