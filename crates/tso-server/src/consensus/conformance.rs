//! The conformance suite every [`Consensus`] implementation runs.
//!
//! Call [`run_all`] from a test with a function that opens the backend on the same storage each
//! time it is called (the previous instance is dropped first). The backend must become leader
//! of a fresh store on its own (a single-node store, or a one-node raft cluster). Failures
//! panic with the contract rule that was broken.

use std::future::Future;
use std::time::Duration;

use tso_core::{Epoch, PHYSICAL_MAX_MS};

use super::{Consensus, ConsensusError, Leadership};

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
    let stored = backend.load_high_water().await.expect("load");
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
