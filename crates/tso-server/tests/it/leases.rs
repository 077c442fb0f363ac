//! Stamping leases and the safe frontier (SEMANTICS §14) over real gRPC on the file backend,
//! with the clock injected where expiry matters: the frontier with no lease, a dead holder's
//! lease holding it until exactly its expiry, a superseded one likewise, a released one not at
//! all; idempotent re-acquire and stale holder epochs; renewals of unknown, expired and
//! superseded leases; TTL and holder bounds; a failed write changing nothing; a restart.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;
use tso_core::Epoch;
use tso_proto::v1::tso_service_client::TsoServiceClient;
use tso_proto::v1::{
    AcquireLeaseRequest, AcquireLeaseResponse, GetSafeFrontierRequest, GetTsRequest,
    ReleaseLeaseRequest, RenewLeaseRequest,
};
use tso_server::backend::file::FileBackend;
use tso_server::backend::{
    Backend, BackendError, BoxFuture, Leadership, OracleCommand, OracleState, Stored,
};

const START_MS: u64 = 1_800_000_000_000;

/// The file backend, with the next `fail_leases` lease writes failing before they reach it.
struct Scripted {
    inner: FileBackend,
    fail_leases: AtomicUsize,
    /// The next lease writes that reach the disk and then report a timeout, as a raft entry
    /// appended before its call timed out commits later.
    fail_after_leases: AtomicUsize,
    /// Every lease load fails for good from here on.
    fail_loads: std::sync::atomic::AtomicBool,
}

impl Backend for Scripted {
    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.inner.leadership()
    }
    fn leader_lease_valid(&self, epoch: Epoch) -> bool {
        self.inner.leader_lease_valid(epoch)
    }
    fn load(&self) -> BoxFuture<'_, Result<OracleState, BackendError>> {
        if self.fail_loads.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(BackendError::Permanent("read failed (injected)".into()))
            });
        }
        self.inner.load()
    }
    fn apply(
        &self,
        cmd: OracleCommand,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<Stored, BackendError>> {
        if !matches!(cmd, OracleCommand::ReplaceLeases { .. }) {
            return self.inner.apply(cmd, epoch);
        }
        let fail = self
            .fail_leases
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Box::pin(async { Err(BackendError::Transient("injected".into())) });
        }
        let fail_after = self
            .fail_after_leases
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        Box::pin(async move {
            let stored = self.inner.apply(cmd, epoch).await?;
            if fail_after {
                return Err(BackendError::Transient("timed out (injected)".into()));
            }
            Ok(stored)
        })
    }
}

async fn start(dir: &Path, clock: Arc<ManualClock>) -> (TestServer, Arc<Scripted>, Client) {
    let backend = Arc::new(Scripted {
        inner: FileBackend::open(dir).unwrap(),
        fail_leases: AtomicUsize::new(0),
        fail_after_leases: AtomicUsize::new(0),
        fail_loads: Default::default(),
    });
    // Wide windows: no extension runs behind the test, so H moves only when a lease moves it.
    let mut server = TestServer::start(backend.clone(), quiet_config(), clock).await;
    server.wait_serving().await;
    let client = server.client().await;
    (server, backend, client)
}

type Client = TsoServiceClient<Channel>;

async fn acquire(
    client: &mut Client,
    holder: &[u8],
    holder_epoch: u64,
    ttl_ms: u64,
) -> Result<AcquireLeaseResponse, tonic::Status> {
    let request = AcquireLeaseRequest {
        holder: holder.to_vec(),
        holder_epoch,
        ttl_ms,
    };
    client.acquire_lease(request).await.map(|r| r.into_inner())
}

async fn frontier(client: &mut Client) -> u64 {
    let reply = client
        .get_safe_frontier(GetSafeFrontierRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        (reply.epoch_hi, reply.epoch_lo),
        (0, 0),
        "a leader answers with its epoch"
    );
    reply.frontier_physical_ms
}

async fn renew(client: &mut Client, lease_id: u64) -> Result<(u64, u64), tonic::Status> {
    let reply = client.renew_lease(RenewLeaseRequest { lease_id }).await?;
    let reply = reply.into_inner();
    Ok((reply.ts_upper_bound, reply.expires_at_ms))
}

async fn release(client: &mut Client, lease_id: u64) {
    client
        .release_lease(ReleaseLeaseRequest { lease_id })
        .await
        .expect("release is idempotent and always answers");
}

async fn high_water(backend: &Scripted) -> u64 {
    backend.inner.high_water_ms().await.unwrap()
}

fn refused(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, text: &str) {
    let status = result.expect_err("must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(text),
        "{status:?} should say {text:?}"
    );
}

#[tokio::test]
async fn the_frontier_follows_every_unexpired_lease_until_exactly_its_expiry() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (server, backend, mut client) = start(dir.path(), clock.clone()).await;

    assert_eq!(
        frontier(&mut client).await,
        high_water(&backend).await,
        "no lease: H"
    );
    let ts = client
        .get_ts(GetTsRequest { count: 1 })
        .await
        .unwrap()
        .into_inner();

    // A holder that dies: its lease binds the frontier until its expiry, to the millisecond.
    let h0 = high_water(&backend).await;
    let a = acquire(&mut client, b"writer-a", 1, 10_000).await.unwrap();
    assert_eq!(a.ts_upper_bound, (h0 + 1).max(START_MS + 10_000));
    assert!(
        a.ts_upper_bound > ts.physical_ms,
        "above every timestamp granted before"
    );
    assert_eq!(a.expires_at_ms, START_MS + 10_000);
    assert_eq!(
        high_water(&backend).await,
        a.ts_upper_bound,
        "the bound is the durable H"
    );
    clock.advance(1);
    let b = acquire(&mut client, b"writer-b", 1, 20_000).await.unwrap();
    assert!(b.ts_upper_bound > a.ts_upper_bound);
    assert_ne!(a.lease_id, b.lease_id);
    assert_eq!(frontier(&mut client).await, a.ts_upper_bound);
    clock.set(a.expires_at_ms - 1);
    assert_eq!(
        frontier(&mut client).await,
        a.ts_upper_bound,
        "a dead holder still binds"
    );
    clock.set(a.expires_at_ms);
    assert_eq!(
        frontier(&mut client).await,
        b.ts_upper_bound,
        "until exactly its expiry"
    );
    refused(
        renew(&mut client, a.lease_id).await,
        Code::FailedPrecondition,
        "expired",
    );

    // A higher holder epoch supersedes: the old lease binds until its own expiry, cannot renew.
    let c = acquire(&mut client, b"writer-b", 2, 20_000).await.unwrap();
    assert_ne!(c.lease_id, b.lease_id);
    refused(
        renew(&mut client, b.lease_id).await,
        Code::FailedPrecondition,
        "superseded",
    );
    refused(
        acquire(&mut client, b"writer-b", 1, 20_000).await,
        Code::FailedPrecondition,
        "holder epoch 1 is below 2",
    );
    assert_eq!(
        frontier(&mut client).await,
        b.ts_upper_bound,
        "a superseded lease binds"
    );
    clock.set(b.expires_at_ms);
    assert_eq!(frontier(&mut client).await, c.ts_upper_bound);

    // The same holder at the same epoch while live: the same lease back, renewed (its holder
    // counts the TTL from this call, so the server must too).
    let again = acquire(&mut client, b"writer-b", 2, 20_000).await.unwrap();
    assert_eq!(again.lease_id, c.lease_id, "the same lease");
    assert!(again.ts_upper_bound >= c.ts_upper_bound && again.expires_at_ms >= c.expires_at_ms);
    let c = again;

    // A renewal: a fresh bound above the current high-water, a later expiry.
    let h = high_water(&backend).await;
    let (bound, expires) = renew(&mut client, c.lease_id).await.unwrap();
    assert_eq!(bound, (h + 1).max(b.expires_at_ms + 20_000));
    assert_eq!(expires, b.expires_at_ms + 20_000);

    // A release stops binding at once; it is idempotent; the id is then unknown.
    release(&mut client, c.lease_id).await;
    release(&mut client, c.lease_id).await;
    assert_eq!(frontier(&mut client).await, high_water(&backend).await);
    refused(
        renew(&mut client, c.lease_id).await,
        Code::NotFound,
        "unknown",
    );
    refused(renew(&mut client, 999).await, Code::NotFound, "unknown");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn holders_and_ttls_out_of_bounds_are_refused() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (server, _backend, mut client) = start(dir.path(), ManualClock::new(START_MS)).await;
    let invalid = Code::InvalidArgument;
    refused(
        acquire(&mut client, b"h", 1, 4_999).await,
        invalid,
        "ask for 5000 to 300000",
    );
    refused(
        acquire(&mut client, b"h", 1, 300_001).await,
        invalid,
        "ttl_ms 300001",
    );
    refused(
        acquire(&mut client, b"", 1, 5_000).await,
        invalid,
        "0 bytes",
    );
    refused(
        acquire(&mut client, &[1; 129], 1, 5_000).await,
        invalid,
        "129 bytes",
    );
    acquire(&mut client, &[1; 128], 1, 5_000).await.unwrap();
    acquire(&mut client, b"h", 1, 300_000).await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_failed_write_answers_unavailable_and_changes_nothing() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (server, backend, mut client) = start(dir.path(), ManualClock::new(START_MS)).await;
    let kept = acquire(&mut client, b"kept", 1, 10_000).await.unwrap();
    backend.fail_leases.store(1, Ordering::SeqCst);
    refused(
        acquire(&mut client, b"lost", 1, 10_000).await,
        Code::Unavailable,
        "injected",
    );
    assert_eq!(
        frontier(&mut client).await,
        kept.ts_upper_bound,
        "only the kept lease binds"
    );
    backend.fail_leases.store(1, Ordering::SeqCst);
    refused(
        renew(&mut client, kept.lease_id).await,
        Code::Unavailable,
        "injected",
    );
    assert_eq!(
        frontier(&mut client).await,
        kept.ts_upper_bound,
        "the renewal changed nothing"
    );
    let retried = acquire(&mut client, b"lost", 1, 10_000).await.unwrap();
    assert!(
        retried.lease_id > kept.lease_id + 1,
        "the failed attempt's id is not reused"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn leases_and_their_bounds_survive_a_restart() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (server, backend, mut client) = start(dir.path(), clock.clone()).await;
    let a = acquire(&mut client, b"a", 1, 60_000).await.unwrap();
    let dead = acquire(&mut client, b"dead", 1, 5_000).await.unwrap();
    server.stop().await.unwrap();
    drop((backend, client));

    // The dead holder's 5 s pass during the restart, but the new term cannot know how long
    // ago it was granted: both leases count as live for a full TTL from the load.
    clock.advance(5_000);
    let (server, backend, mut client) = start(dir.path(), clock.clone()).await;
    assert_eq!(
        frontier(&mut client).await,
        a.ts_upper_bound,
        "a's lease came back"
    );
    clock.advance(5_000);
    refused(
        renew(&mut client, dead.lease_id).await,
        Code::FailedPrecondition,
        "expired",
    );
    let (bound, _) = renew(&mut client, a.lease_id).await.unwrap();
    assert!(bound > dead.ts_upper_bound && bound == high_water(&backend).await);
    let b = acquire(&mut client, b"b", 1, 5_000).await.unwrap();
    assert!(
        b.lease_id > dead.lease_id,
        "ids are never reused across restarts"
    );
    server.stop().await.unwrap();
}

/// SEMANTICS §14: a lease's bound is `max(H + 1, now + ttl)`, not `max(H + 1, now) + ttl`, so
/// renewals do not walk the high-water away from the clock: after 1 000 back-to-back renewals
/// (the clock standing still) it is within one TTL and one window of the clock, and so is the
/// first timestamp after a restart (plus the failover advance).
#[tokio::test]
async fn renewals_keep_the_high_water_within_a_ttl_of_the_clock() {
    let _turn = crate::common::topic(module_path!());
    const TTL_MS: u64 = 60_000;
    const RENEWALS: usize = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let config = quiet_config();
    let window_ms = config.window_ahead.as_millis() as u64;
    let advance_ms = config.failover_advance.as_millis() as u64;
    let (server, backend, mut client) = start(dir.path(), clock.clone()).await;
    let lease = acquire(&mut client, b"keeper", 1, TTL_MS).await.unwrap();
    let mut bound = lease.ts_upper_bound;
    for _ in 0..RENEWALS {
        let (next, _) = renew(&mut client, lease.lease_id).await.unwrap();
        assert!(next >= bound, "a renewed bound is never lower");
        assert!(next >= START_MS + TTL_MS, "the bound covers the TTL");
        bound = next;
    }
    let high = high_water(&backend).await;
    assert!(
        high <= START_MS + TTL_MS + window_ms + RENEWALS as u64 + 1,
        "after {RENEWALS} renewals the high-water is {} s ahead of the clock (TTL {} s, window \
         {} s)",
        (high - START_MS) / 1000,
        TTL_MS / 1000,
        window_ms / 1000
    );
    server.stop().await.unwrap();
    drop((backend, client));

    let (server, _backend, mut client) = start(dir.path(), clock.clone()).await;
    let physical_ms = get_ts(&mut client, 1).await.unwrap().physical_ms;
    assert!(
        physical_ms <= START_MS + TTL_MS + window_ms + advance_ms + RENEWALS as u64 + 1,
        "after a restart the first timestamp is {} s ahead of the clock",
        (physical_ms - START_MS) / 1000
    );
    server.stop().await.unwrap();
}

/// SEMANTICS §14: liveness is judged on monotonic time. A forward step of the leader's wall
/// clock (an NTP step, a VM resumed) past a lease's expiry leaves it live: the frontier stays at
/// its bound and it renews, until its TTL has really passed.
#[tokio::test]
async fn a_forward_clock_step_does_not_end_a_lease() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (server, _backend, mut client) = start(dir.path(), clock.clone()).await;
    let a = acquire(&mut client, b"writer-a", 1, 10_000).await.unwrap();
    clock.advance(1_000);
    let b = acquire(&mut client, b"writer-b", 1, 10_000).await.unwrap();
    clock.step(60_000);
    assert_eq!(
        frontier(&mut client).await,
        a.ts_upper_bound,
        "the wall clock stepped 60 s forward 1 s into a 10 s lease: it still binds"
    );
    clock.advance(500);
    let (renewed, _) = renew(&mut client, a.lease_id)
        .await
        .expect("a live lease renews after a forward step");
    assert_eq!(frontier(&mut client).await, b.ts_upper_bound);
    clock.advance(9_499);
    assert_eq!(frontier(&mut client).await, b.ts_upper_bound);
    clock.advance(1);
    assert_eq!(
        frontier(&mut client).await,
        renewed,
        "b is 10 s old by monotonic time and has expired; a, renewed 9.5 s ago, binds"
    );
    server.stop().await.unwrap();
}

/// SEMANTICS §14: a backward step never brings an expired lease back, so the frontier never
/// goes back on one leader.
#[tokio::test]
async fn a_backward_clock_step_does_not_bring_a_lease_back() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (server, _backend, mut client) = start(dir.path(), clock.clone()).await;
    let a = acquire(&mut client, b"writer-a", 1, 10_000).await.unwrap();
    clock.advance(1_000);
    let b = acquire(&mut client, b"writer-b", 1, 60_000).await.unwrap();
    clock.advance(9_000);
    let after_expiry = frontier(&mut client).await;
    assert_eq!(after_expiry, b.ts_upper_bound, "a has expired, b binds");
    clock.step(-30_000);
    let after_step = frontier(&mut client).await;
    assert!(
        after_step >= after_expiry,
        "the frontier went back from {after_expiry} to {after_step} after a backward step"
    );
    refused(
        renew(&mut client, a.lease_id).await,
        Code::FailedPrecondition,
        "expired",
    );
    server.stop().await.unwrap();
}

/// SEMANTICS §14: a leader that loads the set treats every lease in it as live for a full TTL
/// from the load, whatever its clock says: a new leader whose clock is ahead must not drop a
/// lease its holder still stamps under.
#[tokio::test]
async fn a_new_leader_with_a_clock_ahead_keeps_a_live_lease() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (server, backend, mut client) = start(dir.path(), clock.clone()).await;
    let a = acquire(&mut client, b"writer-a", 1, 10_000).await.unwrap();
    server.stop().await.unwrap();
    drop((backend, client));

    clock.advance(1_000);
    clock.step(120_000);
    let (server, _backend, mut client) = start(dir.path(), clock.clone()).await;
    assert_eq!(
        frontier(&mut client).await,
        a.ts_upper_bound,
        "the new leader's clock reads 2 minutes past the expiry, but the holder's 10 s have not \
         passed: the lease binds"
    );
    clock.advance(9_999);
    assert_eq!(frontier(&mut client).await, a.ts_upper_bound);
    clock.advance(1);
    assert!(
        frontier(&mut client).await > a.ts_upper_bound,
        "a full TTL after the load it has expired"
    );
    server.stop().await.unwrap();
}

/// A lease write that timed out may have committed: the lease it carried binds the frontier
/// from then on (the book reads the set back rather than keep its older copy).
#[tokio::test]
async fn a_lease_write_that_may_have_committed_binds_the_frontier() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (server, backend, mut client) = start(dir.path(), clock.clone()).await;
    backend.fail_after_leases.store(1, Ordering::SeqCst);
    refused(
        acquire(&mut client, b"uncertain", 1, 10_000).await,
        Code::Unavailable,
        "timed out (injected)",
    );
    let uncertain_bound = high_water(&backend).await;
    clock.advance(1);
    let b = acquire(&mut client, b"writer-b", 1, 20_000).await.unwrap();
    assert!(b.ts_upper_bound > uncertain_bound);
    assert_eq!(
        frontier(&mut client).await,
        uncertain_bound,
        "the lease written by the timed-out call is durable and live: it binds"
    );
    server.stop().await.unwrap();
}

/// A permanent failure reading the lease set stops serving loudly, like one of the high-water.
#[tokio::test]
async fn a_permanent_lease_load_failure_poisons_the_server() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (server, backend, mut client) = start(dir.path(), ManualClock::new(START_MS)).await;
    backend.fail_loads.store(true, Ordering::SeqCst);
    refused(
        acquire(&mut client, b"h", 1, 10_000).await,
        Code::Internal,
        "read failed (injected)",
    );
    let error = server.finished().await.unwrap_err();
    assert!(error.to_string().contains("read failed"), "{error}");
}

/// A holder whose acquire answer was lost retries it; it counts its TTL from the retry, so the
/// server must too: the retry renews the lease (same id, fresh bound and expiry) rather than
/// hand back the first answer, whose expiry started earlier.
#[tokio::test]
async fn a_retried_acquire_counts_its_ttl_from_the_retry() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (server, _backend, mut client) = start(dir.path(), clock.clone()).await;
    let lost = acquire(&mut client, b"writer-a", 1, 10_000).await.unwrap();
    clock.advance(6_000);
    let retried = acquire(&mut client, b"writer-a", 1, 10_000).await.unwrap();
    assert_eq!(retried.lease_id, lost.lease_id, "the same lease");
    clock.advance(6_000);
    let b = acquire(&mut client, b"writer-b", 1, 60_000).await.unwrap();
    assert!(b.ts_upper_bound > retried.ts_upper_bound);
    assert_eq!(
        frontier(&mut client).await,
        retried.ts_upper_bound,
        "12 s after the first acquire and 6 s after the retry, the holder still stamps: its lease binds"
    );
    server.stop().await.unwrap();
}
