//! Dense sequences (SEMANTICS §11) over real gRPC on the file backend: the argument table,
//! all-or-nothing batches, the key cap, the end of the counter, restarts, group commit counted
//! at the seam, and what a failed write means for the next block.

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;
use tso_core::Epoch;
use tso_proto::v1::tso_service_client::TsoServiceClient;
use tso_proto::v1::{GetSeqBatchRequest, GetSeqRequest, GetSeqResponse, SeqRequestEntry};
use tso_server::backend::file::FileBackend;
use tso_server::backend::{
    Backend, BackendError, BoxFuture, Leadership, OracleCommand, OracleState, SeqEnds, Stored,
};
use tso_server::clock::SystemClock;
use tso_server::{Config, OracleGuard};

/// The file backend, with every sequence write counted and recorded, the first one held until
/// the test opens the gate, and scripted failures before or after the write reaches the disk.
struct Probe {
    inner: FileBackend,
    writes: AtomicU64,
    /// The ends of every write asked for, in order.
    requested: Mutex<Vec<SeqEnds>>,
    /// The ends of every write that reached the file backend, in order.
    written: Mutex<Vec<SeqEnds>>,
    /// While false, the first write waits before touching the disk.
    gate: watch::Sender<bool>,
    fail_before: AtomicUsize,
    fail_after: AtomicUsize,
    /// Writes that reach the disk and are then reported as fenced, as raft does for an entry
    /// that committed in a later term of the same leader.
    fenced_after: AtomicUsize,
    /// While set, every load fails for good.
    loads_fail: AtomicBool,
    /// While set, every sequence write fails for good before it reaches the disk.
    writes_fail: AtomicBool,
    /// What the oracle is told about leadership: the file backend's, until the test changes it.
    leadership: watch::Sender<Leadership>,
}

impl Probe {
    fn open(dir: &Path, gated: bool) -> Arc<Probe> {
        Probe::over(FileBackend::open(dir).unwrap(), gated)
    }

    fn over(inner: FileBackend, gated: bool) -> Arc<Probe> {
        let leadership = watch::channel(inner.leadership().borrow().clone()).0;
        Arc::new(Probe {
            inner,
            writes: AtomicU64::new(0),
            requested: Mutex::default(),
            written: Mutex::default(),
            gate: watch::channel(!gated).0,
            fail_before: AtomicUsize::new(0),
            fail_after: AtomicUsize::new(0),
            fenced_after: AtomicUsize::new(0),
            loads_fail: AtomicBool::new(false),
            writes_fail: AtomicBool::new(false),
            leadership,
        })
    }

    fn take_one(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

impl Backend for Probe {
    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    fn leader_lease_valid(&self, epoch: Epoch) -> bool {
        self.inner.leader_lease_valid(epoch)
    }

    fn load(&self) -> BoxFuture<'_, Result<OracleState, BackendError>> {
        if self.loads_fail.load(Ordering::SeqCst) {
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
        let OracleCommand::AdvanceSequences { ends } = &cmd else {
            return self.inner.apply(cmd, epoch);
        };
        if self.writes_fail.load(Ordering::SeqCst) {
            return Box::pin(async {
                Err(BackendError::Permanent("fsync failed (injected)".into()))
            });
        }
        let ends = ends.clone();
        Box::pin(async move {
            self.requested.lock().unwrap().push(ends.clone());
            self.writes.fetch_add(1, Ordering::SeqCst);
            let _ = self.gate.subscribe().wait_for(|open| *open).await;
            if Probe::take_one(&self.fail_before) {
                return Err(BackendError::Transient("injected before the write".into()));
            }
            self.written.lock().unwrap().push(ends);
            let stored = self.inner.apply(cmd, epoch).await?;
            if Probe::take_one(&self.fail_after) {
                return Err(BackendError::Transient("injected after the write".into()));
            }
            if Probe::take_one(&self.fenced_after) {
                let current = Epoch::from_parts(epoch.hi() + 1, epoch.lo());
                return Err(BackendError::Fenced {
                    expected: epoch,
                    current,
                });
            }
            Ok(stored)
        })
    }
}

/// Opens the directory again once the stopped server's last task let go of its lock.
async fn reopen(dir: &Path) -> FileBackend {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match FileBackend::open(dir) {
            Ok(backend) => return backend,
            Err(tso_server::backend::file::FileError::Locked { .. })
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await
            }
            Err(e) => panic!("reopen {}: {e}", dir.display()),
        }
    }
}

async fn server_on(backend: Arc<dyn Backend>, config: Config) -> TestServer {
    let mut server = TestServer::start(backend, config, Arc::new(SystemClock)).await;
    server.wait_serving().await;
    server
}

async fn seq(
    client: &mut TsoServiceClient<Channel>,
    key: &[u8],
    count: u32,
) -> Result<GetSeqResponse, tonic::Status> {
    client
        .get_seq(GetSeqRequest {
            key: key.to_vec(),
            count,
        })
        .await
        .map(|r| r.into_inner())
}

fn batch(entries: &[(&[u8], u32)]) -> GetSeqBatchRequest {
    GetSeqBatchRequest {
        entries: entries
            .iter()
            .map(|(key, count)| SeqRequestEntry {
                key: key.to_vec(),
                count: *count,
            })
            .collect(),
    }
}

fn assert_code(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, text: &str) {
    let status = result.expect_err("the call must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(text),
        "{status:?} should say {text:?}"
    );
}

#[tokio::test]
async fn every_bad_argument_is_refused_and_spends_nothing() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = server_on(Probe::open(dir.path(), false), test_config()).await;
    let mut client = server.client().await;
    let long = [b'k'; 129];
    let invalid = Code::InvalidArgument;
    assert_code(seq(&mut client, b"a", 0).await, invalid, "count 0");
    assert_code(seq(&mut client, b"a", 65_537).await, invalid, "count 65537");
    assert_code(seq(&mut client, b"", 1).await, invalid, "0 bytes");
    assert_code(seq(&mut client, &long, 1).await, invalid, "129 bytes");
    assert_code(seq(&mut client, b"a\xff", 1).await, invalid, "not UTF-8");
    let batches: Vec<(GetSeqBatchRequest, &str)> = vec![
        (batch(&[]), "empty"),
        (batch(&[(b"a", 1), (b"b", 2), (b"a", 3)]), "twice"),
        (batch(&[(b"a", 1), (b"b", 0)]), "entry 1: count 0"),
        (
            batch(&[(b"a", 1), (b"\xc3", 1)]),
            "entry 1: the key is not UTF-8",
        ),
        (
            GetSeqBatchRequest {
                entries: (0..129)
                    .map(|i| SeqRequestEntry {
                        key: format!("k{i}").into_bytes(),
                        count: 1,
                    })
                    .collect(),
            },
            "129 keys",
        ),
    ];
    for (request, text) in batches {
        let result = client.get_seq_batch(request).await;
        assert_code(result, invalid, text);
    }
    // Nothing above was spent: both keys start at 0.
    assert_eq!(seq(&mut client, b"a", 1).await.unwrap().start, 0);
    assert_eq!(seq(&mut client, b"b", 1).await.unwrap().start, 0);
    // The largest legal call: 128 keys of 128 bytes, each 65 536 values.
    let entries: Vec<SeqRequestEntry> = (0..128)
        .map(|i| SeqRequestEntry {
            key: format!("{i:0>128}").into_bytes(),
            count: 65_536,
        })
        .collect();
    let reply = client
        .get_seq_batch(GetSeqBatchRequest {
            entries: entries.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.grants.len(), 128);
    for (grant, entry) in reply.grants.iter().zip(&entries) {
        assert_eq!(
            grant.key.as_bytes(),
            entry.key.as_slice(),
            "grants in request order"
        );
        assert_eq!((grant.start, grant.count), (0, 65_536));
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn blocks_follow_each_other_and_survive_a_restart() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = server_on(Probe::open(dir.path(), false), test_config()).await;
    let mut client = server.client().await;
    let first = seq(&mut client, b"invoice", 10).await.unwrap();
    assert_eq!(
        (first.key.as_str(), first.start, first.count),
        ("invoice", 0, 10)
    );
    let epoch = first.epoch.expect("an epoch");
    assert_eq!(seq(&mut client, b"invoice", 5).await.unwrap().start, 10);
    let both = client
        .get_seq_batch(batch(&[(b"row", 3), (b"invoice", 1)]))
        .await
        .unwrap()
        .into_inner();
    let starts: Vec<(String, u64, u32)> = both
        .grants
        .iter()
        .map(|g| (g.key.clone(), g.start, g.count))
        .collect();
    assert_eq!(
        starts,
        vec![("row".into(), 0, 3), ("invoice".into(), 15, 1)]
    );
    assert_eq!(both.epoch, Some(epoch), "one epoch for the batch");
    server.stop().await.unwrap();

    let server = server_on(Probe::over(reopen(dir.path()).await, false), test_config()).await;
    let mut client = server.client().await;
    let after = seq(&mut client, b"invoice", 1).await.unwrap();
    assert_eq!(
        after.start, 16,
        "the next block starts where the last one ended"
    );
    let new_epoch = after.epoch.unwrap();
    assert!(
        (new_epoch.hi, new_epoch.lo) > (epoch.hi, epoch.lo),
        "a restart serves a higher epoch"
    );
    assert_eq!(seq(&mut client, b"row", 1).await.unwrap().start, 3);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_key_cap_refuses_new_keys_and_whole_batches() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        seq_keys_max: 3,
        ..test_config()
    };
    let server = server_on(Probe::open(dir.path(), false), config).await;
    let mut client = server.client().await;
    client
        .get_seq_batch(batch(&[(b"a", 1), (b"b", 1)]))
        .await
        .unwrap();
    let exhausted = Code::ResourceExhausted;
    let refused = client
        .get_seq_batch(batch(&[(b"a", 1), (b"c", 1), (b"d", 1)]))
        .await;
    assert_code(refused, exhausted, "maximum of 3 sequence keys");
    assert_eq!(
        seq(&mut client, b"a", 1).await.unwrap().start,
        1,
        "the refused batch spent nothing"
    );
    assert_eq!(seq(&mut client, b"c", 1).await.unwrap().start, 0);
    assert_code(
        seq(&mut client, b"d", 1).await,
        exhausted,
        "\"d\" is a new one",
    );
    assert_eq!(
        seq(&mut client, b"b", 1).await.unwrap().start,
        1,
        "known keys go on"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_counter_stops_at_u64_max_and_a_batch_with_it_spends_nothing() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let probe = Probe::open(dir.path(), false);
    let epoch = tso_server::backend::conformance::wait_for_leader(&probe.inner).await;
    let ends = vec![("end".into(), u64::MAX - 10)];
    probe
        .inner
        .apply(OracleCommand::AdvanceSequences { ends }, epoch)
        .await
        .unwrap();
    let server = server_on(probe, test_config()).await;
    let mut client = server.client().await;
    let refused = client
        .get_seq_batch(batch(&[(b"other", 1), (b"end", 11)]))
        .await;
    assert_code(
        refused,
        Code::FailedPrecondition,
        "would pass 18446744073709551615",
    );
    let last = seq(&mut client, b"end", 10).await.unwrap();
    assert_eq!(
        last.start,
        u64::MAX - 10,
        "the block ending exactly at u64::MAX is granted"
    );
    let status = seq(&mut client, b"end", 1).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_ne!(
        status.message(),
        tso_server::NOT_LEADER_MESSAGE,
        "not a redirect"
    );
    assert!(
        status
            .metadata()
            .get_bin(tso_proto::LEADER_HINT_KEY)
            .is_none()
    );
    assert_eq!(seq(&mut client, b"other", 1).await.unwrap().start, 0);
    server.stop().await.unwrap();
}

/// The deterministic group-commit check: the first write is held at the seam while a burst
/// queues behind it; releasing it lets exactly one more write carry the whole burst.
#[tokio::test]
async fn a_burst_of_calls_takes_two_writes() {
    let _turn = crate::common::topic(module_path!());
    const CALLS: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let probe = Probe::open(dir.path(), true);
    let guard = OracleGuard::start(probe.clone(), test_config());
    assert!(guard.wait_serving().await);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = guard.service();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let calls: Vec<_> = (0..CALLS)
        .map(|_| {
            let mut client = TsoServiceClient::new(channel.clone());
            tokio::spawn(async move { seq(&mut client, b"shared", 1).await })
        })
        .collect();
    // The first write carries the calls queued when the writer started (each asks for one
    // value of a fresh key, so its end is their number); every later arrival queues behind it.
    wait_until("the first write is held", || {
        probe.writes.load(Ordering::SeqCst) == 1
    })
    .await;
    let in_first = probe.requested.lock().unwrap()[0][0].1 as usize;
    wait_until("every call is in the held write or queued", || {
        in_first + guard.queued_sequence_calls() == CALLS as usize
    })
    .await;
    let gate = probe.gate.clone();
    gate.send_replace(true);
    let mut starts = Vec::new();
    for call in calls {
        let reply = call.await.unwrap().expect("a granted block");
        starts.push(reply.start);
    }
    starts.sort_unstable();
    assert_eq!(
        starts,
        (0..CALLS).collect::<Vec<_>>(),
        "every value once, no gap"
    );
    assert_eq!(
        probe.writes.load(Ordering::SeqCst),
        2,
        "{CALLS} calls, two writes"
    );
    let written = probe.written.lock().unwrap().clone();
    assert_eq!(written[1], vec![("shared".to_string(), CALLS)]);
    server.abort();
    guard.shutdown().await.unwrap();
}

/// A write that fails may or may not have reached storage: its callers hear UNAVAILABLE and
/// its blocks are never handed out again, whichever side of the disk the failure was on.
#[tokio::test]
async fn a_failed_write_answers_unavailable_and_its_block_is_never_reused() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let probe = Probe::open(dir.path(), false);
    let server = server_on(probe.clone(), test_config()).await;
    let mut client = server.client().await;
    assert_eq!(seq(&mut client, b"k", 4).await.unwrap().start, 0);
    probe.fail_before.store(1, Ordering::SeqCst);
    assert_code(
        seq(&mut client, b"k", 3).await,
        Code::Unavailable,
        "may have been spent",
    );
    assert_eq!(
        seq(&mut client, b"k", 1).await.unwrap().start,
        7,
        "[4, 7) stays spent"
    );
    probe.fail_after.store(1, Ordering::SeqCst);
    assert_code(
        seq(&mut client, b"k", 2).await,
        Code::Unavailable,
        "may have been spent",
    );
    assert_eq!(
        seq(&mut client, b"k", 1).await.unwrap().start,
        10,
        "[8, 10) was written"
    );
    server.stop().await.unwrap();
    drop(probe);
    let backend = reopen(dir.path()).await;
    let stored = backend.load().await.unwrap().sequences;
    assert_eq!(stored.get("k"), Some(&11));
}

/// D2: raft reports `Fenced` for an entry that committed in a later term of the same leader
/// (its leadership watch had not caught up): the block was spent, so the caller must hear that
/// the outcome is unknown, not a definite "not leader" after which nothing explains the gap.
#[tokio::test]
async fn a_write_fenced_after_it_committed_is_uncertain() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let probe = Probe::open(dir.path(), false);
    let server = server_on(probe.clone(), test_config()).await;
    let mut client = server.client().await;
    assert_eq!(seq(&mut client, b"k", 4).await.unwrap().start, 0);
    probe.fenced_after.store(1, Ordering::SeqCst);
    assert_code(
        seq(&mut client, b"k", 3).await,
        Code::Unavailable,
        "may have been spent",
    );
    assert_eq!(
        seq(&mut client, b"k", 1).await.unwrap().start,
        7,
        "[4, 7) was written"
    );
    server.stop().await.unwrap();
}

/// A term that has ended writes none of the groups still queued on it: its callers hear "not
/// leader" (definite, and true: nothing was written for them).
#[tokio::test]
async fn an_ended_term_writes_no_queued_group() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let probe = Probe::open(dir.path(), true);
    let guard = OracleGuard::start(probe.clone(), test_config());
    assert!(guard.wait_serving().await);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(guard.service())
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let call = || {
        let mut client = TsoServiceClient::new(channel.clone());
        tokio::spawn(async move { seq(&mut client, b"k", 1).await })
    };
    let first = call();
    wait_until("the first write is held", || {
        probe.writes.load(Ordering::SeqCst) == 1
    })
    .await;
    let queued: Vec<_> = (0..3).map(|_| call()).collect();
    wait_until("three calls queue behind it", || {
        guard.queued_sequence_calls() == 3
    })
    .await;
    let mut serving = guard.serving();
    probe.leadership.send_replace(Leadership::Unknown);
    tokio::time::timeout(
        HANG_GUARD,
        serving.wait_for(|s| !matches!(s, tso_server::ServingState::Serving { .. })),
    )
    .await
    .expect("the term ends")
    .unwrap();
    probe.gate.send_replace(true);
    let _ = first.await.unwrap();
    for call in queued {
        let status = call.await.unwrap().expect_err("the term ended");
        assert_not_leader(&status);
    }
    assert_eq!(
        probe.writes.load(Ordering::SeqCst),
        1,
        "the ended term wrote its queued group"
    );
    server.abort();
    guard.shutdown().await.unwrap();
}

/// A permanent failure reading the counters stops serving loudly too.
#[tokio::test]
async fn a_permanent_load_failure_poisons_the_server() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let probe = Probe::open(dir.path(), false);
    let server = server_on(probe.clone(), test_config()).await;
    probe.loads_fail.store(true, Ordering::SeqCst);
    let mut client = server.client().await;
    assert_code(
        seq(&mut client, b"k", 1).await,
        Code::Internal,
        "read failed (injected)",
    );
    let error = server.finished().await.unwrap_err();
    assert!(error.to_string().contains("read failed"), "{error}");
}

/// A permanent failure of a sequence write stops serving loudly, like one of the high-water.
#[tokio::test]
async fn a_permanent_write_failure_poisons_the_server() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let probe = Probe::open(dir.path(), false);
    probe.writes_fail.store(true, Ordering::SeqCst);
    let server = server_on(probe, test_config()).await;
    let mut client = server.client().await;
    assert_code(
        seq(&mut client, b"k", 1).await,
        Code::Internal,
        "fsync failed (injected)",
    );
    let error = server.finished().await.unwrap_err();
    assert!(error.to_string().contains("fsync failed"), "{error}");
}

/// The sequences record is damage-checked like the high-water: a flipped bit, a truncation or
/// a deleted record stops the start with an error naming the file.
#[tokio::test]
async fn a_damaged_or_missing_sequences_record_is_refused() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    {
        let backend = FileBackend::open(dir.path()).unwrap();
        let epoch = backend.epoch();
        let ends = vec![("k".into(), 5)];
        backend
            .apply(OracleCommand::AdvanceSequences { ends }, epoch)
            .await
            .unwrap();
    }
    let path = dir.path().join("sequences");
    let good = std::fs::read(&path).unwrap();
    let mut flipped = good.clone();
    flipped[14] ^= 0x04;
    for (bytes, text) in [
        (flipped, "checksum mismatch"),
        (good[..good.len() - 1].to_vec(), "checksum mismatch"),
    ] {
        std::fs::write(&path, bytes).unwrap();
        let err = FileBackend::open(dir.path())
            .err()
            .expect("damage must be refused");
        let message = err.to_string();
        assert!(
            message.contains(text) && message.contains("sequences"),
            "{message}"
        );
    }
    std::fs::remove_file(&path).unwrap();
    let err = FileBackend::open(dir.path())
        .err()
        .expect("a lost record must be refused");
    assert!(err.to_string().contains("missing"), "{err}");
    std::fs::write(&path, good).unwrap();
    let backend = FileBackend::open(dir.path()).unwrap();
    let loaded = backend.load().await.unwrap();
    assert_eq!(loaded.sequences.get("k"), Some(&5));
}
