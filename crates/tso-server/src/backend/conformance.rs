//! The conformance suite every [`Backend`] implementation runs.
//!
//! Call [`run_all`] from a test with a function that opens the backend on the same storage each
//! time it is called (the previous instance is dropped first). The backend must become leader
//! of a fresh store on its own (a single-node store, or a one-node raft cluster). Failures
//! panic with the contract rule that was broken.

use std::future::Future;
use std::time::Duration;

use tso_core::{Epoch, PHYSICAL_MAX_MS};

use super::{Backend, BackendError, Leadership, OracleCommand, OracleState, SeqCounters, SeqEnds};

/// How long the suite waits for a fresh backend to report `Leader`.
const LEADER_WAIT: Duration = Duration::from_secs(30);

/// Runs every check, reopening the backend between them with `open`.
pub async fn run_all<B, F, Fut>(mut open: F)
where
    B: Backend,
    F: FnMut() -> Fut,
    Fut: Future<Output = B>,
{
    let backend = open().await;
    let epoch = wait_for_leader(&backend).await;
    assert_eq!(
        backend.load().await.expect("load on a fresh store"),
        OracleState::default(),
        "a fresh store loads the default state"
    );
    persist_returns_the_maximum(&backend, epoch).await;
    refuses_out_of_range(&backend, epoch).await;
    refuses_a_stale_epoch(&backend, epoch).await;
    refuses_a_newer_epoch(&backend, epoch).await;
    a_dropped_persist_is_harmless(&backend, epoch).await;
    let stored = high_water(&backend).await.expect("load");
    let lease_record = lease_records_replace_and_fence(&backend, epoch).await;
    let counters = sequences_ratchet_per_key(&backend, epoch).await;
    let whole = backend.load().await.expect("load");
    drop(backend);

    let backend = open().await;
    let reopened_epoch = wait_for_leader(&backend).await;
    assert!(
        reopened_epoch >= epoch,
        "epochs never go back: {reopened_epoch} after {epoch}"
    );
    let reopened = backend.load().await.expect("load after reopen");
    assert_eq!(reopened.high_water_ms, stored, "durable across reopen");
    assert_eq!(
        reopened.sequences, counters,
        "sequence counters are durable across reopen"
    );
    assert_eq!(
        reopened.leases, lease_record,
        "the lease record is durable across reopen"
    );
    assert_eq!(reopened, whole, "the whole state is durable across reopen");
    concurrent_persists_ratchet(&backend, reopened_epoch, stored).await;
    the_last_millisecond_is_the_limit(&backend, reopened_epoch).await;
    concurrent_sequence_persists_ratchet(&backend, reopened_epoch).await;
}

async fn high_water<B: Backend>(backend: &B) -> Result<u64, BackendError> {
    backend.load().await.map(|s| s.high_water_ms)
}

async fn sequences<B: Backend>(backend: &B) -> Result<SeqCounters, BackendError> {
    backend.load().await.map(|s| s.sequences)
}

async fn leases<B: Backend>(backend: &B) -> Result<Vec<u8>, BackendError> {
    backend.load().await.map(|s| s.leases)
}

/// Applies an advance of the high-water; returns the durable high-water.
async fn raise<B: Backend>(
    backend: &B,
    at_least_ms: u64,
    epoch: Epoch,
) -> Result<u64, BackendError> {
    let cmd = OracleCommand::AdvanceHighWater { at_least_ms };
    backend.apply(cmd, epoch).await.map(|s| s.high_water_ms)
}

async fn advance<B: Backend>(backend: &B, ends: SeqEnds, epoch: Epoch) -> Result<(), BackendError> {
    let cmd = OracleCommand::AdvanceSequences { ends };
    backend.apply(cmd, epoch).await.map(drop)
}

async fn replace<B: Backend>(
    backend: &B,
    record: Vec<u8>,
    epoch: Epoch,
) -> Result<(), BackendError> {
    let cmd = OracleCommand::replace_leases(record, epoch);
    backend.apply(cmd, epoch).await.map(drop)
}

/// The stamping-lease record (SEMANTICS §14): empty on a fresh store, replaced whole by each
/// persist, refused under another epoch. Returns what is stored.
async fn lease_records_replace_and_fence<B: Backend>(backend: &B, epoch: Epoch) -> Vec<u8> {
    let load = || async { leases(backend).await.expect("load leases") };
    assert!(load().await.is_empty(), "a fresh store has no lease record");
    let first = b"first lease set".to_vec();
    replace(backend, first.clone(), epoch)
        .await
        .expect("persist leases");
    assert_eq!(load().await, first, "a persisted lease record loads back");
    let second = vec![7u8; 4096];
    replace(backend, second.clone(), epoch)
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
        match replace(backend, b"stale".to_vec(), other).await {
            Err(BackendError::Fenced { .. } | BackendError::NotLeader { .. }) => {}
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
async fn sequences_ratchet_per_key<B: Backend>(backend: &B, epoch: Epoch) -> SeqCounters {
    let load = || async { sequences(backend).await.expect("load sequences") };
    assert_eq!(
        load().await,
        SeqCounters::new(),
        "a fresh store has no counters"
    );
    let long = "k".repeat(tso_proto::limits::SEQ_KEY_BYTES_MAX);
    advance(
        backend,
        ends_of(&[("a", 5), ("b", 3), (&long, u64::MAX)]),
        epoch,
    )
    .await
    .expect("persist sequences");
    let expected = counters_of(&[("a", 5), ("b", 3), (&long, u64::MAX)]);
    assert_eq!(load().await, expected, "persisted counters load back");
    advance(backend, ends_of(&[("a", 2), ("b", 4)]), epoch)
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
        match advance(backend, ends_of(&[("a", 100)]), other).await {
            Err(BackendError::Fenced { .. } | BackendError::NotLeader { .. }) => {}
            res => panic!("a sequence persist under epoch {other} must be refused, got {res:?}"),
        }
        assert_eq!(
            load().await,
            expected,
            "a refused sequence persist stores nothing"
        );
    }
    {
        let call = advance(backend, ends_of(&[("a", 50)]), epoch);
        let _ = tokio::time::timeout(Duration::ZERO, call).await;
    }
    let after = load().await;
    assert!(
        after["a"] == 5 || after["a"] == 50,
        "after a dropped sequence persist of 50 over 5, the store holds {}",
        after["a"]
    );
    advance(backend, ends_of(&[("a", 51)]), epoch)
        .await
        .expect("a sequence persist after a dropped one works");
    load().await
}

async fn concurrent_sequence_persists_ratchet<B: Backend>(backend: &B, epoch: Epoch) {
    let calls = (1..=16u64).map(|i| advance(backend, ends_of(&[("c", i * 10)]), epoch));
    for result in futures_util::future::join_all(calls).await {
        result.expect("concurrent sequence persist");
    }
    let loaded = sequences(backend).await.expect("load sequences");
    assert_eq!(
        loaded.get("c"),
        Some(&160),
        "the highest concurrent end wins"
    );
}

/// Waits until the backend reports `Leader` and returns its epoch.
pub async fn wait_for_leader<B: Backend>(backend: &B) -> Epoch {
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

async fn persist_returns_the_maximum<B: Backend>(backend: &B, epoch: Epoch) {
    assert_eq!(
        raise(backend, 1_000, epoch).await.unwrap(),
        1_000,
        "persist returns the value"
    );
    assert_eq!(
        high_water(backend).await.unwrap(),
        1_000,
        "load sees the persisted value"
    );
    assert_eq!(
        raise(backend, 500, epoch).await.unwrap(),
        1_000,
        "a lower persist is absorbed"
    );
    assert_eq!(
        raise(backend, 1_000, epoch).await.unwrap(),
        1_000,
        "a repeated persist is absorbed"
    );
    assert_eq!(raise(backend, 2_000, epoch).await.unwrap(), 2_000);
    assert_eq!(
        high_water(backend).await.unwrap(),
        2_000,
        "load never sees a lowered value"
    );
}

async fn refuses_out_of_range<B: Backend>(backend: &B, epoch: Epoch) {
    let before = high_water(backend).await.unwrap();
    match raise(backend, PHYSICAL_MAX_MS + 1, epoch).await {
        Err(BackendError::Permanent(_)) => {}
        other => {
            panic!("a value past the 46-bit layout must be refused as Permanent, got {other:?}")
        }
    }
    assert_eq!(
        high_water(backend).await.unwrap(),
        before,
        "a refused value is not stored"
    );
}

async fn refuses_a_stale_epoch<B: Backend>(backend: &B, epoch: Epoch) {
    if epoch == Epoch::ZERO {
        return;
    }
    let stale = Epoch::new(epoch.get() - 1);
    let before = high_water(backend).await.unwrap();
    match raise(backend, before + 10_000, stale).await {
        Err(BackendError::Fenced { .. } | BackendError::NotLeader { .. }) => {}
        other => panic!("a persist under a stale epoch must be refused, got {other:?}"),
    }
    assert_eq!(
        high_water(backend).await.unwrap(),
        before,
        "a fenced persist is not stored"
    );
}

async fn concurrent_persists_ratchet<B: Backend>(backend: &B, epoch: Epoch, base: u64) {
    let calls = (1..=16u64).map(|i| raise(backend, base + i * 100, epoch));
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
        high_water(backend).await.unwrap(),
        base + 1_600,
        "the highest concurrent persist wins"
    );
}

async fn refuses_a_newer_epoch<B: Backend>(backend: &B, epoch: Epoch) {
    let newer = Epoch::new(epoch.get() + 1);
    let before = high_water(backend).await.unwrap();
    match raise(backend, before + 10_000, newer).await {
        Err(BackendError::Fenced { .. } | BackendError::NotLeader { .. }) => {}
        other => panic!(
            "a persist under an epoch this node does not lead must be refused, got {other:?}"
        ),
    }
    assert_eq!(
        high_water(backend).await.unwrap(),
        before,
        "a persist under a newer epoch is not stored"
    );
}

/// A persist dropped before it finished may or may not take effect (SEMANTICS §4: cancel-safe),
/// but it leaves nothing else behind: the store holds the old value or the dropped one, and
/// the next calls work as usual.
async fn a_dropped_persist_is_harmless<B: Backend>(backend: &B, epoch: Epoch) {
    let before = high_water(backend).await.unwrap();
    let dropped = before + 5_000;
    {
        let call = raise(backend, dropped, epoch);
        let _ = tokio::time::timeout(Duration::ZERO, call).await;
    }
    let after = high_water(backend)
        .await
        .expect("load after a dropped persist");
    assert!(
        after == before || after == dropped,
        "after a dropped persist of {dropped} over {before}, the store holds {after}"
    );
    assert_eq!(
        raise(backend, dropped + 1, epoch).await.unwrap(),
        dropped + 1,
        "a persist after a dropped one works"
    );
}

/// The last millisecond of the 46-bit layout is storable, and nothing past it ever loads.
async fn the_last_millisecond_is_the_limit<B: Backend>(backend: &B, epoch: Epoch) {
    assert_eq!(
        raise(backend, PHYSICAL_MAX_MS, epoch).await.unwrap(),
        PHYSICAL_MAX_MS,
        "the largest physical value is storable"
    );
    refuses_out_of_range(backend, epoch).await;
    let loaded = high_water(backend).await.unwrap();
    assert_eq!(loaded, PHYSICAL_MAX_MS, "values stay in range");
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::watch;

    use super::*;
    use crate::backend::{BoxFuture, Stored};

    /// An in-memory backend, correct unless told to accept any epoch or to overwrite counters:
    /// the suite must pass the one and catch the others.
    struct Memory {
        stored: Arc<Mutex<OracleState>>,
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
        fn open(stored: Arc<Mutex<OracleState>>, starts: &Mutex<u128>, bug: Bug) -> Self {
            let mut n = starts.lock().unwrap();
            *n += 1;
            let epoch = Epoch::new(*n);
            let (leadership, _) = watch::channel(Leadership::Leader { epoch });
            Self {
                stored,
                epoch,
                bug,
                leadership,
            }
        }

        fn check(&self, epoch: Epoch) -> Result<(), BackendError> {
            let any = self.bug == Bug::AnyNewerEpoch && epoch > self.epoch;
            if epoch != self.epoch && !any {
                return Err(BackendError::Fenced {
                    expected: epoch,
                    current: self.epoch,
                });
            }
            Ok(())
        }
    }

    impl Backend for Memory {
        fn leadership(&self) -> watch::Receiver<Leadership> {
            self.leadership.subscribe()
        }

        fn leader_lease_valid(&self, _epoch: Epoch) -> bool {
            true
        }

        fn load(&self) -> BoxFuture<'_, Result<OracleState, BackendError>> {
            let state = self.stored.lock().unwrap().clone();
            Box::pin(async move { Ok(state) })
        }

        fn apply(
            &self,
            cmd: OracleCommand,
            epoch: Epoch,
        ) -> BoxFuture<'_, Result<Stored, BackendError>> {
            Box::pin(async move {
                cmd.check(epoch)?;
                self.check(epoch)?;
                let mut state = self.stored.lock().unwrap();
                match &cmd {
                    OracleCommand::AdvanceSequences { ends }
                        if self.bug == Bug::SequencesOverwrite =>
                    {
                        for (key, end) in ends {
                            state.sequences.insert(key.clone(), *end);
                        }
                    }
                    _ => {
                        state.apply(&cmd);
                    }
                }
                state.includes(&cmd)?;
                Ok(Stored {
                    high_water_ms: state.high_water_ms,
                })
            })
        }
    }

    async fn run(bug: Bug) {
        let stored = Arc::default();
        let starts = Mutex::new(0);
        run_all(|| {
            let backend = Memory::open(Arc::clone(&stored), &starts, bug);
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
