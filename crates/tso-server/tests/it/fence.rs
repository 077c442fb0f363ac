//! The failover fence under failure (SEMANTICS §4 to §7), driven over real gRPC on loopback
//! against a backend whose faults each test scripts at the backend seam.
//!
//! Every wait is on a condition (the serving state, a backend counter, a metric) bounded by the
//! hang guard; no test sleeps and hopes, and none asserts on speed. Each `#[tokio::test]` runs the
//! server and the test on one thread, which makes the order of backend calls deterministic and
//! lets a thread-local metrics recorder see exactly this test's counters.

use crate::common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::*;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tso_core::Epoch;
use tso_proto::v1::GetCurrentMaxSafeRequest;
use tso_server::backend::{BackendError, Leadership};
use tso_server::metrics::{EXTENSION_ERRORS, FENCE_RETRIES, FENCES};
use tso_server::{OracleGuard, ServeError, ServingState};

/// The manual clock's start: a plausible wall time in ms.
const START_MS: u64 = 1_800_000_000_000;
/// `quiet_config`'s failover advance and window, in ms.
const ADVANCE_MS: u64 = 400_000;
const WINDOW_MS: u64 = 600_000;
const OTHER_LEADER: &str = "10.0.0.2:50551";

fn leader(epoch: u128) -> Leadership {
    Leadership::Leader {
        epoch: Epoch::new(epoch),
    }
}

fn follower(epoch: u128) -> Leadership {
    Leadership::Follower {
        leader_endpoint: Some(OTHER_LEADER.into()),
        leader_epoch: Some(Epoch::new(epoch)),
    }
}

fn transient() -> Fault {
    Fault::Fail(BackendError::Transient("quorum lost for a moment".into()))
}

fn not_leader(epoch: u128) -> BackendError {
    BackendError::NotLeader {
        leader_endpoint: Some(OTHER_LEADER.into()),
        leader_epoch: Some(Epoch::new(epoch)),
    }
}

/// A backend that keeps failing transiently until the test clears its faults.
const UNTIL_CLEARED: usize = 100_000;

fn loads(backend: &FaultBackend) -> u64 {
    backend.loads.load(Ordering::SeqCst)
}

fn persists(backend: &FaultBackend) -> u64 {
    backend.persists.load(Ordering::SeqCst)
}

fn fence_retries(recorder: &TestRecorder) -> u64 {
    recorder.counter(FENCE_RETRIES, &[("class", "transient")])
}

fn fences(recorder: &TestRecorder, outcome: &str) -> u64 {
    recorder.counter(FENCES, &[("outcome", outcome)])
}

/// Whether `backend` ever persisted under `epoch`.
fn persisted_under(backend: &FaultBackend, epoch: u128) -> bool {
    let persisted = backend.persisted.lock().unwrap();
    persisted.iter().any(|(_, e)| *e == Epoch::new(epoch))
}

async fn serving_at(server: &mut TestServer, epoch: u128) {
    let what = format!("Serving at epoch {epoch}");
    server
        .wait_for(
            &what,
            |s| matches!(s, ServingState::Serving { epoch: e } if *e == Epoch::new(epoch)),
        )
        .await;
}

/// Waits until the node stands down naming `endpoint` and `epoch` as the leader.
async fn stood_down_for(server: &mut TestServer, endpoint: Option<&str>, epoch: Option<u128>) {
    let expected = ServingState::NotServing {
        leader_endpoint: endpoint.map(String::from),
        leader_epoch: epoch.map(Epoch::new),
    };
    let what = format!("{expected:?}");
    server.wait_for(&what, |s| *s == expected).await;
}

fn is_failed(state: &ServingState) -> bool {
    matches!(state, ServingState::Failed { .. })
}

/// The reason a poisoned node publishes to embedders and operators: `error`'s own message,
/// not a relabelled one.
fn assert_failed_for(state: &ServingState, error: &ServeError) {
    assert_eq!(
        *state,
        ServingState::Failed {
            reason: error.to_string()
        }
    );
}

/// Every timestamp issued in a test: all unique, each grant above every earlier one.
#[derive(Default)]
struct History {
    seen: HashSet<u64>,
    last: u64,
}

impl History {
    /// Takes `grants` grants of 1000 and checks each against everything issued before.
    /// Returns the lowest physical ms among them.
    async fn take(&mut self, server: &TestServer, epoch: u128, grants: usize) -> u64 {
        let mut client = server.client().await;
        let mut lowest_ms = u64::MAX;
        for _ in 0..grants {
            let reply = get_ts(&mut client, 1_000).await.unwrap();
            assert_eq!(
                Epoch::from_parts(reply.epoch_hi, reply.epoch_lo),
                Epoch::new(epoch)
            );
            self.record(values(&reply));
            lowest_ms = lowest_ms.min(reply.physical_ms);
        }
        lowest_ms
    }

    fn record(&mut self, values: std::ops::RangeInclusive<u64>) {
        assert!(
            *values.start() > self.last,
            "grant {values:?} not above an earlier timestamp {}",
            self.last
        );
        self.last = *values.end();
        for ts in values {
            assert!(self.seen.insert(ts), "timestamp {ts} issued twice");
        }
    }
}

/// Scenario 1. A transient persist error during the fence is retried; the node serves only once
/// an attempt fully succeeds, and starts above the prior high-water.
#[tokio::test]
async fn transient_persist_error_is_retried_and_serving_waits_for_success() {
    let _turn = crate::common::topic(module_path!());
    let recorder = TestRecorder::default();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let prior_ms = START_MS + 50_000;
    let backend = FaultBackend::leader(1, prior_ms);
    backend.inject(Op::Persist, transient(), 1);
    backend.inject(Op::Persist, Fault::Stall, 1);
    let mut server =
        TestServer::start(backend.clone(), quiet_config(), ManualClock::new(START_MS)).await;
    let mut client = server.client().await;

    wait_until("the retried persist", || persists(&backend) == 2).await;
    // The retry is in flight: fencing, so not serving, and no leader to name.
    assert_eq!(
        *server.serving.borrow(),
        ServingState::NotServing {
            leader_endpoint: None,
            leader_epoch: None
        }
    );
    let hint = assert_not_leader(&get_ts(&mut client, 1).await.unwrap_err());
    assert_eq!(hint, Default::default());

    backend.release();
    serving_at(&mut server, 1).await;
    let reply = get_ts(&mut client, 1).await.unwrap();
    assert!(
        reply.physical_ms > prior_ms,
        "{reply:?} not above {prior_ms}"
    );
    assert_eq!(
        loads(&backend),
        2,
        "each attempt starts again from the load"
    );
    assert_eq!(fence_retries(&recorder), 1);
    assert_eq!(fences(&recorder, "served"), 1);
    server.stop().await.unwrap();
}

/// Scenario 2. Transient load errors during the fence are retried, then the node serves.
#[tokio::test]
async fn transient_load_errors_are_retried_then_the_node_serves() {
    let _turn = crate::common::topic(module_path!());
    let recorder = TestRecorder::default();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let prior_ms = START_MS + 50_000;
    let backend = FaultBackend::leader(1, prior_ms);
    backend.inject(Op::Load, transient(), 3);
    let mut server =
        TestServer::start(backend.clone(), quiet_config(), ManualClock::new(START_MS)).await;

    serving_at(&mut server, 1).await;
    let mut client = server.client().await;
    let reply = get_ts(&mut client, 1).await.unwrap();
    assert_eq!(
        reply.physical_ms,
        prior_ms + 1,
        "the fence floor is prior + 1"
    );
    assert_eq!((loads(&backend), persists(&backend)), (4, 1));
    assert_eq!(fence_retries(&recorder), 3);
    server.stop().await.unwrap();
}

/// Scenario 3. Twenty transient errors in a row while the node stays leader in the same term:
/// no new leadership event comes, and the node still ends up serving (no retry budget).
#[tokio::test]
async fn twenty_transient_errors_in_one_term_still_end_serving() {
    let _turn = crate::common::topic(module_path!());
    let recorder = TestRecorder::default();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let prior_ms = START_MS + 50_000;
    let backend = FaultBackend::leader(1, prior_ms);
    backend.inject(Op::Load, transient(), 10);
    backend.inject(Op::Persist, transient(), 10);
    let mut server =
        TestServer::start(backend.clone(), quiet_config(), ManualClock::new(START_MS)).await;

    serving_at(&mut server, 1).await;
    assert_eq!(fence_retries(&recorder), 20);
    assert_eq!((loads(&backend), persists(&backend)), (21, 11));
    let mut history = History::default();
    assert!(history.take(&server, 1, 3).await > prior_ms);
    server.stop().await.unwrap();
}

/// Scenario 4. A Follower event during the retries ends them at once; the node names the new
/// leader; a later Leader event fences and serves above what the other leader stored.
#[tokio::test]
async fn follower_event_stops_the_retries_and_a_later_leader_serves() {
    let _turn = crate::common::topic(module_path!());
    let recorder = TestRecorder::default();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let backend = FaultBackend::leader(1, START_MS);
    backend.inject(Op::Load, transient(), UNTIL_CLEARED);
    let mut server =
        TestServer::start(backend.clone(), quiet_config(), ManualClock::new(START_MS)).await;
    wait_until("fence retries", || loads(&backend) >= 3).await;

    backend.set_leadership(follower(2));
    stood_down_for(&mut server, Some(OTHER_LEADER), Some(2)).await;
    let mut client = server.client().await;
    let hint = assert_not_leader(&get_ts(&mut client, 1).await.unwrap_err());
    assert_eq!(hint.leader_endpoint.as_deref(), Some(OTHER_LEADER));
    assert_eq!(hint_epoch(&hint), Some(2));

    // The backend still fails every load, yet nothing retries any more: when it heals and a new
    // term starts, the fence takes exactly one more load.
    let (loads_stopped, retries_stopped) = (loads(&backend), fence_retries(&recorder));
    backend.clear_faults();
    let other_high_ms = START_MS + 77_000;
    backend.set_stored(other_high_ms);
    backend.set_leadership(leader(3));
    serving_at(&mut server, 3).await;
    assert_eq!(loads(&backend), loads_stopped + 1);
    assert_eq!(fence_retries(&recorder), retries_stopped);
    assert!(
        !persisted_under(&backend, 1),
        "the abandoned term never persisted"
    );
    let mut history = History::default();
    assert!(history.take(&server, 3, 3).await > other_high_ms);
    server.stop().await.unwrap();
}

/// Runs a term at epoch 1, then fences at epoch 3 against a persist refused with `refusal`
/// (another node leads at epoch 4 and issued timestamps meanwhile), then serves at epoch 5.
/// Checks the node steps down, serves again, and stays monotonic across all terms.
async fn refused_fence_steps_down_then_serves(
    refusal: BackendError,
    hint_endpoint: Option<&str>,
    hint_epoch_expected: Option<u128>,
) {
    let recorder = TestRecorder::default();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let backend = FaultBackend::leader(1, 0);
    let mut server =
        TestServer::start(backend.clone(), quiet_config(), ManualClock::new(START_MS)).await;
    serving_at(&mut server, 1).await;
    let mut history = History::default();
    history.take(&server, 1, 5).await;

    backend.inject(Op::Persist, Fault::Fail(refusal), 1);
    backend.set_leadership(leader(3));
    wait_until("the refused fence to step down", || {
        fences(&recorder, "stepped_down") == 1
    })
    .await;
    stood_down_for(&mut server, hint_endpoint, hint_epoch_expected).await;
    let mut client = server.client().await;
    let hint = assert_not_leader(&get_ts(&mut client, 1).await.unwrap_err());
    assert_eq!(hint.leader_endpoint.as_deref(), hint_endpoint);
    assert_eq!(hint_epoch(&hint), hint_epoch_expected);
    assert_eq!(fence_retries(&recorder), 0, "a refusal is not retried");
    assert!(!persisted_under(&backend, 3));

    // The other leader issued timestamps up to a higher high-water; then this node wins again.
    let other_high_ms = backend.stored() + 30_000;
    backend.set_stored(other_high_ms);
    backend.set_leadership(leader(5));
    serving_at(&mut server, 5).await;
    assert!(history.take(&server, 5, 5).await > other_high_ms);
    assert_eq!(fences(&recorder, "served"), 2);
    server.stop().await.unwrap();
}

/// Scenario 5. NotLeader during the fence: step down naming the new leader, serve after the
/// next election, monotonic across both terms.
#[tokio::test]
async fn not_leader_during_the_fence_steps_down_with_a_hint_then_serves() {
    let _turn = crate::common::topic(module_path!());
    refused_fence_steps_down_then_serves(not_leader(4), Some(OTHER_LEADER), Some(4)).await;
}

/// Scenario 6. Fenced during the fence: likewise (a Fenced error names no leader).
#[tokio::test]
async fn fenced_during_the_fence_steps_down_then_serves() {
    let _turn = crate::common::topic(module_path!());
    let fenced = BackendError::Fenced {
        expected: Epoch::new(3),
        current: Epoch::new(4),
    };
    refused_fence_steps_down_then_serves(fenced, None, None).await;
}

/// Scenario 7, through `serve_listener`: a permanent error during the fence poisons serving and
/// the serve call returns that error by itself.
#[tokio::test]
async fn permanent_fence_error_poisons_and_the_serve_call_returns_it() {
    let _turn = crate::common::topic(module_path!());
    let recorder = TestRecorder::default();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let backend = FaultBackend::leader(1, 0);
    backend.inject(
        Op::Persist,
        Fault::Fail(BackendError::Permanent("disk is read-only".into())),
        1,
    );
    let mut server =
        TestServer::start(backend.clone(), quiet_config(), ManualClock::new(START_MS)).await;
    let state = server.wait_for("Failed", is_failed).await;
    let err = server.finished().await.unwrap_err();
    assert!(
        matches!(&err, ServeError::Backend(BackendError::Permanent(m)) if m == "disk is read-only"),
        "{err:?}"
    );
    assert_failed_for(&state, &err);
    assert!(err.to_string().contains("disk is read-only"), "{err}");
    assert_eq!(persists(&backend), 1, "a permanent error is not retried");
    assert_eq!(fence_retries(&recorder), 0);
    assert_eq!(fences(&recorder, "fatal"), 1);
}

/// Serves the service of `guard` from an embedder's own tonic server on loopback.
async fn host(guard: &OracleGuard) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = Server::builder()
        .add_service(guard.service())
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
            let _ = stopped.await;
        });
    tokio::spawn(server);
    (addr, stop)
}

/// Scenario 7, embedded: after a permanent error the service stays mounted in the host's server
/// and refuses every call with "not leader" at once, without touching the backend; the guard
/// returns the error.
#[tokio::test]
async fn poisoned_embedded_oracle_refuses_calls_and_its_guard_returns_the_error() {
    let _turn = crate::common::topic(module_path!());
    let backend = FaultBackend::leader(1, 0);
    backend.inject(
        Op::Persist,
        Fault::Fail(BackendError::Permanent("record damaged".into())),
        1,
    );
    let guard =
        OracleGuard::start_with_clock(backend.clone(), quiet_config(), ManualClock::new(START_MS));
    let (addr, stop) = host(&guard).await;
    tokio::time::timeout(HANG_GUARD, guard.failed())
        .await
        .expect("guard never reported the failure");
    assert!(is_failed(&guard.serving().borrow()));

    // Any later backend call would hang: a call that touched the backend could not answer.
    backend.inject(Op::Load, Fault::Hang, UNTIL_CLEARED);
    backend.inject(Op::Persist, Fault::Hang, UNTIL_CLEARED);
    let calls = (loads(&backend), persists(&backend));
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tso_proto::v1::tso_service_client::TsoServiceClient::new(channel);
    for count in [1, 7, 1_000] {
        let status = tokio::time::timeout(HANG_GUARD, get_ts(&mut client, count))
            .await
            .expect("a poisoned node must answer at once")
            .unwrap_err();
        assert_eq!(assert_not_leader(&status), Default::default());
    }
    let safe = client
        .get_current_max_safe(GetCurrentMaxSafeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(safe.max_safe_physical_ms, 0);
    assert_eq!((loads(&backend), persists(&backend)), calls);

    let err = guard.shutdown().await.unwrap_err();
    assert!(
        matches!(&err, ServeError::Backend(BackendError::Permanent(m)) if m == "record damaged"),
        "{err:?}"
    );
    let status = get_ts(&mut client, 1).await.unwrap_err();
    assert_not_leader(&status);
    let _ = stop.send(());
}

/// Scenario 8. Four rapid flaps: each time the node is elected the backend flaps (transient
/// errors), it loses leadership before it could fence, and wins again. It serves after each,
/// never fences in an epoch it lost, and every timestamp is above all earlier ones, including
/// those the other leader issued in between.
#[tokio::test]
async fn four_rapid_flaps_opened_by_transient_errors_serve_after_each() {
    let _turn = crate::common::topic(module_path!());
    let recorder = TestRecorder::default();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let backend = FaultBackend::leader(1, 0);
    let mut server =
        TestServer::start(backend.clone(), quiet_config(), ManualClock::new(START_MS)).await;
    serving_at(&mut server, 1).await;
    let mut history = History::default();
    history.take(&server, 1, 3).await;

    for round in 0..4u128 {
        let (elected, other, reelected) = (10 * round + 2, 10 * round + 3, 10 * round + 4);
        backend.inject(Op::Load, transient(), UNTIL_CLEARED);
        let loads_before = loads(&backend);
        backend.set_leadership(leader(elected));
        wait_until("fence retries", || loads(&backend) >= loads_before + 2).await;
        backend.set_leadership(follower(other));
        stood_down_for(&mut server, Some(OTHER_LEADER), Some(other)).await;

        // The other leader issues timestamps; then this node is elected again and the backend
        // flaps once more, on the persist this time.
        let other_high_ms = backend.stored() + 10_000;
        backend.set_stored(other_high_ms);
        backend.clear_faults();
        backend.inject(Op::Persist, transient(), 2);
        backend.set_leadership(leader(reelected));
        serving_at(&mut server, reelected).await;
        assert!(history.take(&server, reelected, 3).await > other_high_ms);
        assert!(
            !persisted_under(&backend, elected),
            "fenced in lost epoch {elected}"
        );
    }
    assert_eq!(fences(&recorder, "served"), 5);
    server.stop().await.unwrap();
}

/// Scenario 9. An extension of term N is in flight when term N+1 fences; it commits only after
/// N+1 serves, above N+1's high-water. N+1 still grants only under its own high-water (past it,
/// a grant needs an extension of N+1), and nothing is issued twice.
#[tokio::test]
async fn late_extension_of_an_old_term_does_not_raise_the_new_terms_high_water() {
    let _turn = crate::common::topic(module_path!());
    let clock = ManualClock::new(START_MS);
    let backend = FaultBackend::leader(1, 0);
    let mut server = TestServer::start(backend.clone(), quiet_config(), clock.clone()).await;
    serving_at(&mut server, 1).await;
    let high_1 = START_MS + ADVANCE_MS;
    assert_eq!(backend.stored(), high_1);
    let mut history = History::default();
    history.take(&server, 1, 3).await;

    // Move into the low-water zone: the next grant asks for an extension, which stalls in flight.
    backend.inject(Op::Persist, Fault::StallCommit, 1);
    clock.advance(200_000);
    history.take(&server, 1, 3).await;
    wait_until("the extension of term 1", || persists(&backend) == 2).await;
    let stale_target = high_1 + 1 + WINDOW_MS;

    // Term 2 fences and serves while that extension is still in flight.
    backend.set_leadership(leader(2));
    serving_at(&mut server, 2).await;
    let high_2 = high_1 + 1 + ADVANCE_MS;
    assert_eq!(backend.stored(), high_2);
    history.take(&server, 2, 3).await;

    // Now the old write commits, above term 2's high-water.
    backend.release();
    wait_until("the late commit", || {
        backend.stored() == stale_target && backend.settled()
    })
    .await;

    // Past term 2's own high-water, a grant needs an extension of term 2; make those fail.
    backend.inject(Op::Persist, transient(), UNTIL_CLEARED);
    clock.set(high_2 + 100_000);
    assert!(high_2 + 100_000 < stale_target);
    let mut client = server.client().await;
    let status = get_ts(&mut client, 1).await.unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "granted past term 2's high-water: {status:?}"
    );
    assert!(
        matches!(*server.serving.borrow(), ServingState::Serving { epoch } if epoch == Epoch::new(2))
    );

    backend.clear_faults();
    let first_ms = history.take(&server, 2, 3).await;
    assert_eq!(first_ms, high_2 + 100_000);
    server.stop().await.unwrap();
}

/// Starts a node serving at epoch 1 under `quiet_config`, then moves the clock past its
/// high-water so that the next grant must wait for an extension.
async fn serving_with_an_exhausted_window()
-> (Arc<FaultBackend>, Arc<ManualClock>, TestServer, History) {
    let clock = ManualClock::new(START_MS);
    let backend = FaultBackend::leader(1, 0);
    let mut server = TestServer::start(backend.clone(), quiet_config(), clock.clone()).await;
    serving_at(&mut server, 1).await;
    let mut history = History::default();
    history.take(&server, 1, 3).await;
    clock.set(START_MS + ADVANCE_MS + 100_000);
    (backend, clock, server, history)
}

/// Scenario 10, Transient: the waiting call gets UNAVAILABLE and the node stays leader; once the
/// backend heals the same term grants again.
#[tokio::test]
async fn extension_transient_error_answers_unavailable_and_stays_leader() {
    let _turn = crate::common::topic(module_path!());
    let recorder = TestRecorder::default();
    let _metrics = metrics::set_default_local_recorder(&recorder);
    let (backend, _clock, server, mut history) = serving_with_an_exhausted_window().await;
    backend.inject(Op::Persist, transient(), UNTIL_CLEARED);
    let mut client = server.client().await;
    let status = get_ts(&mut client, 1).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("quorum lost"), "{status:?}");
    assert!(matches!(
        *server.serving.borrow(),
        ServingState::Serving { .. }
    ));
    assert!(recorder.counter(EXTENSION_ERRORS, &[("class", "transient")]) >= 1);

    backend.clear_faults();
    history.take(&server, 1, 3).await;
    server.stop().await.unwrap();
}

/// Scenario 10, Permanent: the waiting call gets INTERNAL; serving is poisoned and the serve
/// call returns the error.
#[tokio::test]
async fn extension_permanent_error_answers_internal_and_poisons() {
    let _turn = crate::common::topic(module_path!());
    let (backend, _clock, mut server, _) = serving_with_an_exhausted_window().await;
    backend.inject(
        Op::Persist,
        Fault::Fail(BackendError::Permanent("fatal raft error".into())),
        1,
    );
    let mut client = server.client().await;
    let status = get_ts(&mut client, 1).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains("fatal raft error"), "{status:?}");
    server.wait_for("Failed", is_failed).await;
    let serving = server.serving.clone();
    let err = server.finished().await.unwrap_err();
    let server_state = serving.borrow().clone();
    assert!(
        matches!(&err, ServeError::Backend(BackendError::Permanent(m)) if m == "fatal raft error"),
        "{err:?}"
    );
    // Read after the serve call returned: the watch's own end must not relabel the cause.
    assert_failed_for(&server_state, &err);
}

/// Scenario 10, NotLeader: the waiting call gets "not leader" naming the new leader, the node
/// steps down at once, and serves again after the next election, monotonic across terms.
#[tokio::test]
async fn extension_not_leader_error_answers_not_leader_with_hint_and_steps_down() {
    let _turn = crate::common::topic(module_path!());
    let (backend, _clock, mut server, mut history) = serving_with_an_exhausted_window().await;
    backend.inject(Op::Persist, Fault::Fail(not_leader(4)), 1);
    let mut client = server.client().await;
    let hint = assert_not_leader(&get_ts(&mut client, 1).await.unwrap_err());
    assert_eq!(hint.leader_endpoint.as_deref(), Some(OTHER_LEADER));
    assert_eq!(hint_epoch(&hint), Some(4));
    stood_down_for(&mut server, Some(OTHER_LEADER), Some(4)).await;
    let hint = assert_not_leader(&get_ts(&mut client, 1).await.unwrap_err());
    assert_eq!(hint_epoch(&hint), Some(4));

    backend.set_leadership(leader(5));
    serving_at(&mut server, 5).await;
    history.take(&server, 5, 3).await;
    server.stop().await.unwrap();
}

/// Scenario 10, Fenced: "not leader" and a step-down too. A later stale NotLeader naming an
/// epoch below one already reported yields a hint without that epoch.
#[tokio::test]
async fn extension_fenced_error_steps_down_and_hints_never_go_back() {
    let _turn = crate::common::topic(module_path!());
    let (backend, clock, mut server, _) = serving_with_an_exhausted_window().await;
    let fenced = BackendError::Fenced {
        expected: Epoch::new(1),
        current: Epoch::new(2),
    };
    backend.inject(Op::Persist, Fault::Fail(fenced), 1);
    let mut client = server.client().await;
    assert_not_leader(&get_ts(&mut client, 1).await.unwrap_err());
    stood_down_for(&mut server, None, None).await;

    // Serve at epoch 7, then meet a late NotLeader that names epoch 4, below one already
    // reported: the hint must not name it.
    backend.set_leadership(leader(7));
    serving_at(&mut server, 7).await;
    backend.inject(Op::Persist, Fault::Fail(not_leader(4)), 1);
    clock.set(backend.stored() + 100_000);
    let hint = assert_not_leader(&get_ts(&mut client, 1).await.unwrap_err());
    assert!(
        hint_epoch(&hint).is_none_or(|epoch| epoch >= 7),
        "hint went back: {hint:?}"
    );
    let state = server
        .wait_for("NotServing", |s| {
            matches!(s, ServingState::NotServing { .. })
        })
        .await;
    assert!(
        matches!(state, ServingState::NotServing { leader_epoch, .. } if leader_epoch.is_none_or(|e| e >= Epoch::new(7))),
        "{state:?}"
    );
    server.stop().await.unwrap();
}

/// Scenario 11, stream closed: while serving, and while retrying a fence, the leadership stream
/// closing poisons the node and the serve call names the cause.
#[tokio::test]
async fn leadership_stream_closing_poisons_and_the_serve_call_names_it() {
    let _turn = crate::common::topic(module_path!());
    for while_fencing in [false, true] {
        let backend = FaultBackend::leader(1, 0);
        if while_fencing {
            backend.inject(Op::Load, transient(), UNTIL_CLEARED);
        }
        let mut server =
            TestServer::start(backend.clone(), quiet_config(), ManualClock::new(START_MS)).await;
        if while_fencing {
            wait_until("fence retries", || loads(&backend) >= 2).await;
        } else {
            serving_at(&mut server, 1).await;
        }
        backend.close_leadership();
        let state = server.wait_for("Failed", is_failed).await;
        let err = server.finished().await.unwrap_err();
        assert!(matches!(err, ServeError::LeadershipClosed), "{err:?}");
        assert_failed_for(&state, &err);
        assert!(err.to_string().contains("leadership stream"), "{err}");
    }
}

/// Scenario 11, panic: a panic inside the watch (here from the backend, during a re-fence)
/// poisons the node and the serve call names it.
#[tokio::test]
async fn panic_in_the_watch_poisons_and_the_serve_call_names_it() {
    let _turn = crate::common::topic(module_path!());
    let backend = FaultBackend::leader(1, 0);
    let mut server =
        TestServer::start(backend.clone(), quiet_config(), ManualClock::new(START_MS)).await;
    serving_at(&mut server, 1).await;
    backend.inject(Op::Load, Fault::Panic, 1);
    backend.set_leadership(leader(2));
    let state = server.wait_for("Failed", is_failed).await;
    let err = server.finished().await.unwrap_err();
    assert!(
        matches!(&err, ServeError::WatchPanicked(m) if m.contains("injected panic")),
        "{err:?}"
    );
    assert_failed_for(&state, &err);
}

/// Scenario 12, hung fence: shutdown while the fence's load hangs forever returns within the
/// grace: the serve call reports a clean stop, not an exceeded grace.
#[tokio::test]
async fn shutdown_with_a_hung_fence_call_returns_within_the_grace() {
    let _turn = crate::common::topic(module_path!());
    let backend = FaultBackend::leader(1, 0);
    backend.inject(Op::Load, Fault::Hang, 1);
    let server =
        TestServer::start(backend.clone(), quiet_config(), ManualClock::new(START_MS)).await;
    wait_until("the hung load", || loads(&backend) == 1).await;
    server.stop().await.unwrap();
    assert_eq!(backend.abandoned.load(Ordering::SeqCst), 1);
}

/// Scenario 12, hung extension: likewise while an extension's persist hangs forever.
#[tokio::test]
async fn shutdown_with_a_hung_extension_returns_within_the_grace() {
    let _turn = crate::common::topic(module_path!());
    let clock = ManualClock::new(START_MS);
    let backend = FaultBackend::leader(1, 0);
    let mut server = TestServer::start(backend.clone(), quiet_config(), clock.clone()).await;
    serving_at(&mut server, 1).await;
    backend.inject(Op::Persist, Fault::Hang, 1);
    clock.advance(200_000);
    let mut history = History::default();
    history.take(&server, 1, 1).await;
    wait_until("the hung extension", || persists(&backend) == 2).await;
    server.stop().await.unwrap();
    assert_eq!(backend.abandoned.load(Ordering::SeqCst), 1);
}

/// Scenario 12, hung extension with a caller waiting on it: the call still gets an answer
/// (UNAVAILABLE once its bounded wait for the extension ends, which is shorter than the grace),
/// and the serve call reports a clean stop.
#[tokio::test]
async fn shutdown_with_a_caller_waiting_on_a_hung_extension_answers_it_and_returns() {
    let _turn = crate::common::topic(module_path!());
    let clock = ManualClock::new(START_MS);
    let backend = FaultBackend::leader(1, 0);
    let config = tso_server::Config {
        shutdown_grace: 2 * tso_server::EXHAUSTED_WAIT_MAX,
        ..quiet_config()
    };
    let mut server = TestServer::start(backend.clone(), config, clock.clone()).await;
    serving_at(&mut server, 1).await;
    backend.inject(Op::Persist, Fault::Hang, 1);
    clock.set(START_MS + ADVANCE_MS + 100_000);
    let mut client = server.client().await;
    let waiting = tokio::spawn(async move { get_ts(&mut client, 1).await });
    wait_until("the hung extension", || persists(&backend) == 2).await;

    server.stop().await.unwrap();
    let status = waiting.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
}
