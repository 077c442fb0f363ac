//! The server stays honest when its own parts misbehave: a backend that reports a value past
//! the timestamp layout, an extender that dies, an extension refused as "not leader" while the
//! backend still says this node leads, a guard dropped or shut down, and two oracles started on
//! one backend. Real gRPC on loopback; faults at the backend seam.

use crate::common;

use std::sync::Arc;

use common::*;
use tonic::Code;
use tso_core::{Epoch, PHYSICAL_MAX_MS};
use tso_server::backend::BackendError;
use tso_server::backend::file::FileBackend;
use tso_server::{OracleGuard, ServingState};

const START_MS: u64 = 1_800_000_000_000;
/// Past `quiet_config`'s window (a fence leaves 400 s of room): the next grant is exhausted and
/// asks for an extension.
const PAST_WINDOW_MS: i64 = 500_000;

async fn serving_node(backend: Arc<FaultBackend>) -> (TestServer, Arc<ManualClock>) {
    let clock = ManualClock::new(START_MS);
    let mut server = TestServer::start(backend, quiet_config(), clock.clone()).await;
    server.wait_serving().await;
    (server, clock)
}

async fn wait_failed(server: &mut TestServer) -> String {
    match server
        .wait_for("Failed", |s| matches!(s, ServingState::Failed { .. }))
        .await
    {
        ServingState::Failed { reason } => reason,
        _ => unreachable!(),
    }
}

/// A backend reporting a high-water past the 46-bit layout poisons serving through the normal
/// path: the state says Failed and the serve call returns the cause. (It used to trip an
/// assertion with the state lock held: every later call panicked, and the state said Serving.)
#[tokio::test]
async fn an_out_of_range_high_water_from_an_extension_poisons_serving() {
    let _turn = crate::common::topic(module_path!());
    let backend = FaultBackend::leader(1, START_MS);
    let (mut server, clock) = serving_node(backend.clone()).await;
    let mut client = server.client().await;
    get_ts(&mut client, 1).await.expect("serving");
    backend.set_stored(PHYSICAL_MAX_MS + 1);
    clock.advance(PAST_WINDOW_MS);
    let status = get_ts(&mut client, 1)
        .await
        .expect_err("no grant past the layout");
    assert!(
        matches!(
            status.code(),
            Code::Internal | Code::FailedPrecondition | Code::Unavailable
        ),
        "{status}"
    );
    let reason = wait_failed(&mut server).await;
    assert!(reason.contains("46-bit"), "{reason}");
    let err = server
        .finished()
        .await
        .expect_err("serve returns the cause");
    assert!(err.to_string().contains("46-bit"), "{err}");
}

/// An extender that dies leaves no term serving without extensions: the watch notices and
/// poisons serving, instead of every call past the window waiting and failing forever.
#[tokio::test]
async fn a_dead_extender_poisons_serving() {
    let _turn = crate::common::topic(module_path!());
    let backend = FaultBackend::leader(1, START_MS);
    let (mut server, clock) = serving_node(backend.clone()).await;
    let mut client = server.client().await;
    backend.inject(Op::Persist, Fault::Panic, 1);
    clock.advance(PAST_WINDOW_MS);
    let _ = get_ts(&mut client, 1).await;
    let reason = wait_failed(&mut server).await;
    assert!(reason.contains("extender"), "{reason}");
    server
        .finished()
        .await
        .expect_err("serve returns the cause");
}

/// An extension refused as "not leader" steps down; when the backend still reports this node
/// leading in the same epoch, no leadership event will ever come, so the watch re-checks and
/// fences again (with backoff) instead of staying NotServing forever.
#[tokio::test]
async fn an_extension_refused_while_still_leader_is_fenced_again() {
    let _turn = crate::common::topic(module_path!());
    let backend = FaultBackend::leader(1, START_MS);
    let (mut server, clock) = serving_node(backend.clone()).await;
    let mut client = server.client().await;
    let refused = BackendError::NotLeader {
        leader_endpoint: None,
        leader_epoch: None,
    };
    backend.inject(Op::Persist, Fault::Fail(refused), 1);
    clock.advance(PAST_WINDOW_MS);
    let status = get_ts(&mut client, 1).await.expect_err("refused once");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");
    let epoch = server.wait_serving().await;
    assert_eq!(epoch, Epoch::new(1), "same epoch: no leadership event came");
    get_ts(&mut client, 1).await.expect("serving again");
    server.stop().await.unwrap();
}

/// Dropping a guard without `shutdown` stops its tasks and releases the backend (the data
/// directory can be opened again); `shutdown` publishes NotServing.
#[tokio::test]
async fn a_dropped_guard_releases_its_backend_and_shutdown_stops_serving() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let guard = OracleGuard::start(
        Arc::new(FileBackend::open(dir.path()).unwrap()),
        quiet_config(),
    );
    assert!(guard.wait_serving().await);
    drop(guard);
    wait_until_async("the data directory is unlocked", || {
        FileBackend::open(dir.path()).is_ok()
    })
    .await;

    let guard = OracleGuard::start(
        Arc::new(FileBackend::open(dir.path()).unwrap()),
        quiet_config(),
    );
    assert!(guard.wait_serving().await);
    let serving = guard.serving();
    guard.shutdown().await.unwrap();
    assert!(
        matches!(*serving.borrow(), ServingState::NotServing { .. }),
        "after shutdown: {:?}",
        *serving.borrow()
    );
}

/// Two oracles on one backend would both fence and both serve the same epoch: duplicates. The
/// second is refused (it fails at once, naming why); the first goes on serving.
#[tokio::test]
async fn a_second_oracle_on_one_backend_is_refused() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FileBackend::open(dir.path()).unwrap());
    let first = OracleGuard::start(backend.clone(), quiet_config());
    assert!(first.wait_serving().await);
    let second = OracleGuard::start(backend.clone(), quiet_config());
    assert!(!second.wait_serving().await, "the second must not serve");
    let err = second.shutdown().await.expect_err("refused");
    assert!(err.to_string().contains("already serves"), "{err}");
    assert!(matches!(
        *first.serving().borrow(),
        ServingState::Serving { .. }
    ));
    first.shutdown().await.unwrap();
    // Once the first is gone, the backend may serve a new oracle.
    let third = OracleGuard::start(backend, quiet_config());
    assert!(third.wait_serving().await);
    third.shutdown().await.unwrap();
}

/// Polls `cond` (which may block briefly) until it holds, bounded by the hang guard.
async fn wait_until_async(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
