//! The gRPC service over loopback against the file backend: argument checks, grant sizes,
//! concurrency, contiguity, the read watermark, and the clock stepped back.

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;

use common::*;
use tonic::Code;
use tso_core::LOGICAL_COUNT;
use tso_proto::v1::GetCurrentMaxSafeRequest;
use tso_server::backend::file::FileBackend;
use tso_server::clock::SystemClock;

async fn file_server(dir: &std::path::Path) -> TestServer {
    let backend = Arc::new(FileBackend::open(dir).unwrap());
    let mut server = TestServer::start(backend, test_config(), Arc::new(SystemClock)).await;
    server.wait_serving().await;
    server
}

#[tokio::test]
async fn grants_of_every_legal_size_are_contiguous_and_increasing() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = file_server(dir.path()).await;
    let mut client = server.client().await;
    let mut last = 0u64;
    for count in [1, 64, LOGICAL_COUNT, 1, 64, LOGICAL_COUNT - 1, 2] {
        let reply = get_ts(&mut client, count).await.unwrap();
        assert_eq!(reply.count, count, "a grant is never partial");
        assert!(reply.logical_start as u64 + count as u64 <= LOGICAL_COUNT as u64);
        assert!(
            *values(&reply).start() > last,
            "grant {reply:?} not above {last}"
        );
        last = *values(&reply).end();
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn out_of_range_counts_are_invalid_arguments() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = file_server(dir.path()).await;
    let mut client = server.client().await;
    for count in [0, LOGICAL_COUNT + 1, u32::MAX] {
        let status = get_ts(&mut client, count).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "count {count}: {status:?}"
        );
    }
    assert_eq!(get_ts(&mut client, 1).await.unwrap().count, 1);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn thousands_of_concurrent_calls_are_all_unique() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = file_server(dir.path()).await;
    let client = server.client().await;
    let mut tasks = Vec::new();
    for caller in 0..4_000u32 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            get_ts(&mut client, 1 + caller % 7).await.unwrap()
        }));
    }
    let mut seen = HashSet::new();
    for task in tasks {
        let reply = task.await.unwrap();
        for ts in values(&reply) {
            assert!(seen.insert(ts), "duplicate timestamp {ts}");
        }
    }
    assert_eq!(
        seen.len(),
        (0..4_000u32).map(|c| 1 + c as usize % 7).sum::<usize>()
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn max_safe_closes_what_was_issued_and_never_goes_back() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = file_server(dir.path()).await;
    let mut client = server.client().await;
    let mut previous = 0;
    for _ in 0..50 {
        let reply = get_ts(&mut client, 3).await.unwrap();
        let safe = client
            .get_current_max_safe(GetCurrentMaxSafeRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(safe.max_safe_physical_ms >= previous, "watermark went back");
        assert!(safe.max_safe_physical_ms >= reply.physical_ms - 1);
        assert_eq!(
            (safe.epoch_hi, safe.epoch_lo),
            (reply.epoch_hi, reply.epoch_lo)
        );
        let next = get_ts(&mut client, 1).await.unwrap();
        assert!(
            next.physical_ms > safe.max_safe_physical_ms,
            "issued at or below the closed watermark"
        );
        previous = safe.max_safe_physical_ms;
    }
    server.stop().await.unwrap();
}

/// SEMANTICS §9: a clock stepped back stalls the physical part; values keep increasing.
#[tokio::test]
async fn clock_stepped_back_keeps_values_increasing() {
    let _turn = crate::common::topic(module_path!());
    let clock = ManualClock::new(1_000_000);
    let backend = FaultBackend::leader(1, 0);
    let mut server = TestServer::start(backend, test_config(), clock.clone()).await;
    server.wait_serving().await;
    let mut client = server.client().await;
    let mut last = 0u64;
    for step in [0i64, 5, -3_000, 1, -10, 0, 7_000, -60_000, 2] {
        clock.advance(step);
        for _ in 0..20 {
            let reply = get_ts(&mut client, 5_000).await.unwrap();
            assert!(*values(&reply).start() > last);
            last = *values(&reply).end();
        }
    }
    server.stop().await.unwrap();
}

/// The grant path never waits on an extension: with every extension persist stalled, grants
/// inside the window keep being answered while the extension is in flight.
#[tokio::test]
async fn grants_do_not_wait_for_an_extension_in_flight() {
    let _turn = crate::common::topic(module_path!());
    let clock = ManualClock::new(1_000_000);
    let backend = FaultBackend::leader(1, 0);
    let mut server = TestServer::start(backend.clone(), test_config(), clock.clone()).await;
    server.wait_serving().await;
    let persists = || backend.persists.load(std::sync::atomic::Ordering::SeqCst);
    let mut client = server.client().await;
    // The first extension starts right after the fence; let it finish, then stall the next.
    wait_until("the first extension", || backend.stored() >= 1_004_001).await;
    backend.inject(Op::Persist, Fault::Stall, 1);
    let before = persists();
    // Move into the low-water zone of the window: this asks for an extension, which stalls.
    clock.advance(3_000);
    get_ts(&mut client, 1).await.unwrap();
    wait_until("the stalled extension to start", || persists() > before).await;
    for _ in 0..200 {
        let reply = get_ts(&mut client, 10).await.unwrap();
        assert_eq!(reply.count, 10);
        assert!(reply.physical_ms <= 1_004_001);
    }
    assert_eq!(
        backend.stored(),
        1_004_001,
        "the extension was still in flight during the grants"
    );
    backend.release();
    server.stop().await.unwrap();
}

/// Shutdown lets an in-flight call finish: a call waiting on an extension when the stop is
/// asked is answered once the extension completes, and the serve call returns Ok.
#[tokio::test]
async fn shutdown_lets_in_flight_calls_finish() {
    let _turn = crate::common::topic(module_path!());
    let clock = ManualClock::new(1_000_000);
    let backend = FaultBackend::leader(1, 0);
    let mut server = TestServer::start(backend.clone(), test_config(), clock.clone()).await;
    server.wait_serving().await;
    let mut client = server.client().await;
    wait_until("the first extension", || backend.stored() >= 1_004_001).await;
    backend.inject(Op::Persist, Fault::Stall, 1);
    clock.advance(60_000);
    let before = backend.persists.load(std::sync::atomic::Ordering::SeqCst);
    let call = tokio::spawn(async move { get_ts(&mut client, 1).await });
    wait_until("the call to wait on the stalled extension", || {
        backend.persists.load(std::sync::atomic::Ordering::SeqCst) > before
    })
    .await;
    let stop_taken = Arc::clone(&server.stop_taken);
    let stop = tokio::spawn(server.stop());
    wait_until("the server to take the stop", || {
        stop_taken.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    // Give the gRPC server time to act on the stop; the call must survive whatever it does.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!call.is_finished(), "the call is in flight during shutdown");
    backend.release();
    let reply = call.await.unwrap().expect("the in-flight call is answered");
    assert_eq!(reply.physical_ms, 1_060_000);
    stop.await.unwrap().expect("serve returns Ok");
}

/// The old term may have granted up to `(H, 262143)`; with the clock behind, a new term must
/// still start above it: the `+ 1` of the fence floor.
#[tokio::test]
async fn a_new_term_starts_above_a_fully_used_window() {
    let _turn = crate::common::topic(module_path!());
    let clock = ManualClock::new(1_000_000);
    let backend = FaultBackend::leader(1, 0);
    // The fence's persist passes; every extension after it hangs, so H stays at the fence's.
    backend.inject(Op::Persist, Fault::Pass, 1);
    backend.inject(Op::Persist, Fault::Hang, 1_000);
    let mut server = TestServer::start(backend.clone(), test_config(), clock.clone()).await;
    server.wait_serving().await;
    let mut client = server.client().await;
    let high_water = backend.stored();
    let mut last = 0;
    for _ in 1_000_000..=high_water {
        let reply = get_ts(&mut client, LOGICAL_COUNT).await.unwrap();
        last = *values(&reply).end();
    }
    assert_eq!(
        last,
        high_water << 18 | (LOGICAL_COUNT as u64 - 1),
        "the whole window was used"
    );
    server.stop().await.unwrap();

    backend.clear_faults();
    backend.set_leadership(tso_server::backend::Leadership::Leader {
        epoch: tso_core::Epoch::new(2),
    });
    let mut server = TestServer::start(backend.clone(), test_config(), clock).await;
    server.wait_serving().await;
    let first = get_ts(&mut server.client().await, 1).await.unwrap();
    assert!(
        *values(&first).start() > last,
        "new term reissued at or below {last}"
    );
    server.stop().await.unwrap();
}
