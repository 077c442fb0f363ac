//! The conformance suite every [`Consensus`] implementation runs.
//!
//! Call [`run_all`] from a test with a function that opens the backend on the same storage each
//! time it is called (the previous instance is dropped first). The backend must become leader
//! of a fresh store on its own (a single-node store, or a one-node raft cluster). Failures
//! panic with the contract rule that was broken.

use std::future::Future;
use std::time::Duration;

use tso_core::{Epoch, PHYSICAL_MAX_MS};

use super::{Consensus, ConsensusError, Leadership, SeqCounters};

/// How long the suite waits for a fresh backend to report `Leader`.
const LEADER_WAIT: Duration = Duration::from_secs(30);

/// Runs every check, reopening the backend between them with `open`.
pub async fn run_all<B, F, Fut>(mut open: F)
where
    B: Consensus,
    F: FnMut() -> Fut,
    Fut: Future<Output = B>,
{
    let backend = open().await;
    let epoch = wait_for_leader(&backend).await;
    assert_eq!(
        backend
            .load_high_water()
            .await
            .expect("load on a fresh store"),
        0,
        "a fresh store loads 0"
    );
    persist_returns_the_maximum(&backend, epoch).await;
    refuses_out_of_range(&backend, epoch).await;
    refuses_a_stale_epoch(&backend, epoch).await;
    refuses_a_newer_epoch(&backend, epoch).await;
    a_dropped_persist_is_harmless(&backend, epoch).await;
    let stored = backend.load_high_water().await.expect("load");
    let leases = backend.leases_supported();
    let lease_record = if leases {
        lease_records_replace_and_fence(&backend, epoch).await
    } else {
        Vec::new()
    };
    let sequences = backend.sequences_supported();
    let counters = if sequences {
        sequences_ratchet_per_key(&backend, epoch).await
    } else {
        SeqCounters::new()
    };
    drop(backend);

    let backend = open().await;
    let reopened_epoch = wait_for_leader(&backend).await;
    assert!(
        reopened_epoch >= epoch,
        "epochs never go back: {reopened_epoch} after {epoch}"
    );
    assert_eq!(
        backend.load_high_water().await.expect("load after reopen"),
        stored,
        "durable across reopen"
    );
    concurrent_persists_ratchet(&backend, reopened_epoch, stored).await;
    the_last_millisecond_is_the_limit(&backend, reopened_epoch).await;
    if sequences {
        assert_eq!(
            backend
                .load_sequences()
                .await
                .expect("load sequences after reopen"),
            counters,
            "sequence counters are durable across reopen"
        );
        concurrent_sequence_persists_ratchet(&backend, reopened_epoch).await;
    }
    if leases {
        assert_eq!(
            backend
                .load_leases()
                .await
                .expect("load leases after reopen"),
            lease_record,
            "the lease record is durable across reopen"
        );
    }
}

/// The stamping-lease record (SEMANTICS §14): empty on a fresh store, replaced whole by each
/// persist, refused under another epoch. Returns what is stored.
async fn lease_records_replace_and_fence<B: Consensus>(backend: &B, epoch: Epoch) -> Vec<u8> {
    let load = || async { backend.load_leases().await.expect("load leases") };
    assert!(load().await.is_empty(), "a fresh store has no lease record");
    let first = b"first lease set".to_vec();
    backend
        .persist_leases(first.clone(), epoch)
        .await
        .expect("persist leases");
    assert_eq!(load().await, first, "a persisted lease record loads back");
    let second = vec![7u8; 4096];
    backend
        .persist_leases(second.clone(), epoch)
        .await
        .expect("persist leases");
    assert_eq!(load().await, second, "a lease record is replaced whole");
    for other in [
        Epoch::new(epoch.get() + 1),
        Epoch::new(epoch.get().saturating_sub(1)),
    ] {
        if other == epoch {
            continue;
        }
        match backend.persist_leases(b"stale".to_vec(), other).await {
            Err(ConsensusError::Fenced { .. } | ConsensusError::NotLeader { .. }) => {}
            res => panic!("a lease persist under epoch {other} must be refused, got {res:?}"),
        }
        assert_eq!(
            load().await,
            second,
            "a refused lease persist stores nothing"
        );
    }
    second
}

fn counters_of(pairs: &[(&str, u64)]) -> SeqCounters {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn ends_of(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// Dense-sequence counters (SEMANTICS §11): a fresh store holds none; a persist applies each
/// key as `max`, never lowers one, takes the longest key and the largest value, is refused
/// under another epoch, and a dropped one leaves old-or-new values. Returns what is stored.
async fn sequences_ratchet_per_key<B: Consensus>(backend: &B, epoch: Epoch) -> SeqCounters {
    let load = || async { backend.load_sequences().await.expect("load sequences") };
    assert_eq!(
        load().await,
        SeqCounters::new(),
        "a fresh store has no counters"
    );
    let long = "k".repeat(128);
    backend
        .persist_sequences(ends_of(&[("a", 5), ("b", 3), (&long, u64::MAX)]), epoch)
        .await
        .expect("persist sequences");
    let expected = counters_of(&[("a", 5), ("b", 3), (&long, u64::MAX)]);
    assert_eq!(load().await, expected, "persisted counters load back");
    backend
        .persist_sequences(ends_of(&[("a", 2), ("b", 4)]), epoch)
        .await
        .expect("persist sequences");
    let expected = counters_of(&[("a", 5), ("b", 4), (&long, u64::MAX)]);
    assert_eq!(load().await, expected, "a counter never goes down");
    for other in [
        Epoch::new(epoch.get() + 1),
        Epoch::new(epoch.get().saturating_sub(1)),
    ] {
        if other == epoch {
            continue;
        }
        match backend
            .persist_sequences(ends_of(&[("a", 100)]), other)
            .await
        {
            Err(ConsensusError::Fenced { .. } | ConsensusError::NotLeader { .. }) => {}
            res => panic!("a sequence persist under epoch {other} must be refused, got {res:?}"),
        }
        assert_eq!(
            load().await,
            expected,
            "a refused sequence persist stores nothing"
        );
    }
    {
        let call = backend.persist_sequences(ends_of(&[("a", 50)]), epoch);
        let _ = tokio::time::timeout(Duration::ZERO, call).await;
    }
    let after = load().await;
    assert!(
        after["a"] == 5 || after["a"] == 50,
        "after a dropped sequence persist of 50 over 5, the store holds {}",
        after["a"]
    );
    backend
        .persist_sequences(ends_of(&[("a", 51)]), epoch)
        .await
        .expect("a sequence persist after a dropped one works");
    load().await
}

async fn concurrent_sequence_persists_ratchet<B: Consensus>(backend: &B, epoch: Epoch) {
    let calls = (1..=16u64).map(|i| backend.persist_sequences(ends_of(&[("c", i * 10)]), epoch));
    for result in futures_util::future::join_all(calls).await {
        result.expect("concurrent sequence persist");
    }
    let loaded = backend.load_sequences().await.expect("load sequences");
    assert_eq!(
        loaded.get("c"),
        Some(&160),
        "the highest concurrent end wins"
    );
}

/// Waits until the backend reports `Leader` and returns its epoch.
pub async fn wait_for_leader<B: Consensus>(backend: &B) -> Epoch {
    let mut rx = backend.leadership();
    let wait = async {
        loop {
            if let Leadership::Leader { epoch } = *rx.borrow_and_update() {
                return epoch;
            }
            rx.changed()
                .await
                .expect("leadership watch closed while waiting for a leader");
        }
    };
    tokio::time::timeout(LEADER_WAIT, wait)
        .await
        .expect("backend did not become leader")
}

async fn persist_returns_the_maximum<B: Consensus>(backend: &B, epoch: Epoch) {
    assert_eq!(
        backend.persist_high_water(1_000, epoch).await.unwrap(),
        1_000,
        "persist returns the value"
    );
    assert_eq!(
        backend.load_high_water().await.unwrap(),
        1_000,
        "load sees the persisted value"
    );
    assert_eq!(
        backend.persist_high_water(500, epoch).await.unwrap(),
        1_000,
        "a lower persist is absorbed"
    );
    assert_eq!(
        backend.persist_high_water(1_000, epoch).await.unwrap(),
        1_000,
        "a repeated persist is absorbed"
    );
    assert_eq!(
        backend.persist_high_water(2_000, epoch).await.unwrap(),
        2_000
    );
    assert_eq!(
        backend.load_high_water().await.unwrap(),
        2_000,
        "load never sees a lowered value"
    );
}

async fn refuses_out_of_range<B: Consensus>(backend: &B, epoch: Epoch) {
    let before = backend.load_high_water().await.unwrap();
    match backend.persist_high_water(PHYSICAL_MAX_MS + 1, epoch).await {
        Err(ConsensusError::Permanent(_)) => {}
        other => {
            panic!("a value past the 46-bit layout must be refused as Permanent, got {other:?}")
        }
    }
    assert_eq!(
        backend.load_high_water().await.unwrap(),
        before,
        "a refused value is not stored"
    );
}

async fn refuses_a_stale_epoch<B: Consensus>(backend: &B, epoch: Epoch) {
    if epoch == Epoch::ZERO {
        return;
    }
    let stale = Epoch::new(epoch.get() - 1);
    let before = backend.load_high_water().await.unwrap();
    match backend.persist_high_water(before + 10_000, stale).await {
        Err(ConsensusError::Fenced { .. } | ConsensusError::NotLeader { .. }) => {}
        other => panic!("a persist under a stale epoch must be refused, got {other:?}"),
    }
    assert_eq!(
        backend.load_high_water().await.unwrap(),
        before,
        "a fenced persist is not stored"
    );
}

async fn concurrent_persists_ratchet<B: Consensus>(backend: &B, epoch: Epoch, base: u64) {
    let calls = (1..=16u64).map(|i| backend.persist_high_water(base + i * 100, epoch));
    let mut highest = base;
    for (i, result) in futures_util::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        let got = result.expect("concurrent persist");
        assert!(
            got >= base + (i as u64 + 1) * 100,
            "persist returned less than asked"
        );
        highest = highest.max(got);
    }
    assert_eq!(highest, base + 1_600);
    assert_eq!(
        backend.load_high_water().await.unwrap(),
        base + 1_600,
        "the highest concurrent persist wins"
    );
}

async fn refuses_a_newer_epoch<B: Consensus>(backend: &B, epoch: Epoch) {
    let newer = Epoch::new(epoch.get() + 1);
    let before = backend.load_high_water().await.unwrap();
    match backend.persist_high_water(before + 10_000, newer).await {
        Err(ConsensusError::Fenced { .. } | ConsensusError::NotLeader { .. }) => {}
        other => panic!(
            "a persist under an epoch this node does not lead must be refused, got {other:?}"
        ),
    }
    assert_eq!(
        backend.load_high_water().await.unwrap(),
        before,
        "a persist under a newer epoch is not stored"
    );
}

/// A persist dropped before it finished may or may not take effect (SEMANTICS §4: cancel-safe),
/// but it leaves nothing else behind: the store holds the old value or the dropped one, and
/// the next calls work as usual.
async fn a_dropped_persist_is_harmless<B: Consensus>(backend: &B, epoch: Epoch) {
    let before = backend.load_high_water().await.unwrap();
    let dropped = before + 5_000;
    {
        let call = backend.persist_high_water(dropped, epoch);
        let _ = tokio::time::timeout(Duration::ZERO, call).await;
    }
    let after = backend
        .load_high_water()
        .await
        .expect("load after a dropped persist");
    assert!(
        after == before || after == dropped,
        "after a dropped persist of {dropped} over {before}, the store holds {after}"
    );
    assert_eq!(
        backend
            .persist_high_water(dropped + 1, epoch)
            .await
            .unwrap(),
        dropped + 1,
        "a persist after a dropped one works"
    );
}

/// The last millisecond of the 46-bit layout is storable, and nothing past it ever loads.
async fn the_last_millisecond_is_the_limit<B: Consensus>(backend: &B, epoch: Epoch) {
    assert_eq!(
        backend
            .persist_high_water(PHYSICAL_MAX_MS, epoch)
            .await
            .unwrap(),
        PHYSICAL_MAX_MS,
        "the largest physical value is storable"
    );
    refuses_out_of_range(backend, epoch).await;
    let loaded = backend.load_high_water().await.unwrap();
    assert_eq!(loaded, PHYSICAL_MAX_MS, "values stay in range");
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::watch;

    use super::*;
    use crate::consensus::BoxFuture;

    /// An in-memory backend, correct unless told to accept any epoch: the suite must pass the
    /// one and catch the other.
    struct Memory {
        stored: Arc<Mutex<u64>>,
        counters: Arc<Mutex<SeqCounters>>,
        leases: Arc<Mutex<Vec<u8>>>,
        epoch: Epoch,
        bug: Bug,
        leadership: watch::Sender<Leadership>,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Bug {
        None,
        AnyNewerEpoch,
        SequencesOverwrite,
    }

    impl Memory {
        fn open(
            stored: Arc<Mutex<u64>>,
            counters: Arc<Mutex<SeqCounters>>,
            leases: Arc<Mutex<Vec<u8>>>,
            starts: &Mutex<u128>,
            bug: Bug,
        ) -> Self {
            let mut n = starts.lock().unwrap();
            *n += 1;
            let epoch = Epoch::new(*n);
            let (leadership, _) = watch::channel(Leadership::Leader { epoch });
            Self {
                stored,
                counters,
                leases,
                epoch,
                bug,
                leadership,
            }
        }

        fn check(&self, epoch: Epoch) -> Result<(), ConsensusError> {
            let any = self.bug == Bug::AnyNewerEpoch && epoch > self.epoch;
            if epoch != self.epoch && !any {
                return Err(ConsensusError::Fenced {
                    expected: epoch,
                    current: self.epoch,
                });
            }
            Ok(())
        }
    }

    impl Consensus for Memory {
        fn leadership(&self) -> watch::Receiver<Leadership> {
            self.leadership.subscribe()
        }

        fn load_high_water(&self) -> BoxFuture<'_, Result<u64, ConsensusError>> {
            let v = *self.stored.lock().unwrap();
            Box::pin(async move { Ok(v) })
        }

        fn persist_high_water(
            &self,
            at_least_ms: u64,
            epoch: Epoch,
        ) -> BoxFuture<'_, Result<u64, ConsensusError>> {
            Box::pin(async move {
                if at_least_ms > PHYSICAL_MAX_MS {
                    return Err(ConsensusError::Permanent("out of range".into()));
                }
                self.check(epoch)?;
                let mut v = self.stored.lock().unwrap();
                *v = (*v).max(at_least_ms);
                Ok(*v)
            })
        }

        fn lease_valid(&self, _epoch: Epoch) -> bool {
            true
        }

        fn sequences_supported(&self) -> bool {
            true
        }

        fn load_sequences(&self) -> BoxFuture<'_, Result<SeqCounters, ConsensusError>> {
            let counters = self.counters.lock().unwrap().clone();
            Box::pin(async move { Ok(counters) })
        }

        fn persist_sequences(
            &self,
            ends: crate::consensus::SeqEnds,
            epoch: Epoch,
        ) -> BoxFuture<'_, Result<(), ConsensusError>> {
            Box::pin(async move {
                self.check(epoch)?;
                let mut counters = self.counters.lock().unwrap();
                for (key, end) in ends {
                    let counter = counters.entry(key).or_insert(0);
                    *counter = if self.bug == Bug::SequencesOverwrite {
                        end
                    } else {
                        (*counter).max(end)
                    };
                }
                Ok(())
            })
        }

        fn leases_supported(&self) -> bool {
            true
        }

        fn load_leases(&self) -> BoxFuture<'_, Result<Vec<u8>, ConsensusError>> {
            let record = self.leases.lock().unwrap().clone();
            Box::pin(async move { Ok(record) })
        }

        fn persist_leases(
            &self,
            record: Vec<u8>,
            epoch: Epoch,
        ) -> BoxFuture<'_, Result<(), ConsensusError>> {
            Box::pin(async move {
                self.check(epoch)?;
                *self.leases.lock().unwrap() = record;
                Ok(())
            })
        }
    }

    async fn run(bug: Bug) {
        let stored = Arc::new(Mutex::new(0));
        let counters = Arc::default();
        let leases = Arc::default();
        let starts = Mutex::new(0);
        run_all(|| {
            let backend = Memory::open(
                stored.clone(),
                Arc::clone(&counters),
                Arc::clone(&leases),
                &starts,
                bug,
            );
            async move { backend }
        })
        .await;
    }

    #[tokio::test]
    async fn a_correct_backend_passes() {
        run(Bug::None).await;
    }

    #[tokio::test]
    #[should_panic(expected = "an epoch this node does not lead must be refused")]
    async fn a_backend_that_accepts_a_newer_epoch_is_caught() {
        run(Bug::AnyNewerEpoch).await;
    }

    #[tokio::test]
    #[should_panic(expected = "a counter never goes down")]
    async fn a_backend_that_lowers_a_counter_is_caught() {
        run(Bug::SequencesOverwrite).await;
    }
}
