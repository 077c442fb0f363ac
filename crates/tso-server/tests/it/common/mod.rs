//! Shared test helpers: a fault-injecting backend at the backend seam, a manual clock, a real
//! gRPC server on loopback, and a metrics recorder local to one test's thread.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use prost::Message;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tso_core::Epoch;
use tso_proto::LEADER_HINT_KEY;
use tso_proto::v1::tso_service_client::TsoServiceClient;
use tso_proto::v1::{GetTsRequest, GetTsResponse};
use tso_server::backend::{
    Backend, BackendError, BoxFuture, Leadership, OracleCommand, OracleState, Stored,
};
use tso_server::clock::Clock;
use tso_server::{Config, OracleGuard, ServeError, ServingState};

/// Hang guard for waits in tests: generous, never the thing a test asserts on.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

/// A clock the test moves by hand: a wall reading and a monotonic one. Time passing moves both;
/// a step (an NTP step, a VM resumed) moves only the wall reading.
#[derive(Debug)]
pub struct ManualClock {
    wall_ms: AtomicI64,
    monotonic_ms: AtomicU64,
}

impl ManualClock {
    pub fn new(now_ms: u64) -> Arc<Self> {
        Arc::new(Self {
            wall_ms: AtomicI64::new(now_ms as i64),
            monotonic_ms: AtomicU64::new(0),
        })
    }
    /// Time passes until the wall clock reads `now_ms`; setting it back is a backward step.
    pub fn set(&self, now_ms: u64) {
        let before = self.wall_ms.swap(now_ms as i64, Ordering::SeqCst);
        self.pass((now_ms as i64 - before).max(0) as u64);
    }
    /// Time passes by `delta_ms`; a negative delta is a backward step.
    pub fn advance(&self, delta_ms: i64) {
        self.wall_ms.fetch_add(delta_ms, Ordering::SeqCst);
        self.pass(delta_ms.max(0) as u64);
    }
    /// The wall clock steps by `delta_ms`; no time passes.
    pub fn step(&self, delta_ms: i64) {
        self.wall_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }
    fn pass(&self, delta_ms: u64) {
        self.monotonic_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.wall_ms.load(Ordering::SeqCst) as u64
    }

    fn monotonic_ms(&self) -> u64 {
        self.monotonic_ms.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Load,
    Persist,
}

/// What the fault backend does on one call.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Do the call for real (a placeholder to fault a later call).
    Pass,
    Fail(BackendError),
    /// Wait until [`FaultBackend::release`] before doing the call for real. A stalled call
    /// that its caller drops does nothing.
    Stall,
    /// A persist already on its way to storage (say, appended to a raft log): it waits until
    /// [`FaultBackend::release`], then commits even if its caller dropped the call meanwhile.
    /// Load calls treat it as [`Fault::Stall`].
    StallCommit,
    /// Never return.
    Hang,
    Panic,
}

#[derive(Default)]
struct Faults {
    load: VecDeque<Fault>,
    persist: VecDeque<Fault>,
}

/// A backend at the backend seam whose faults the test scripts: errors of each class on the
/// next N calls, stalled or hung calls, panics, and leadership events.
pub struct FaultBackend {
    me: Weak<FaultBackend>,
    stored: Mutex<OracleState>,
    leadership: Mutex<Option<watch::Sender<Leadership>>>,
    faults: Mutex<Faults>,
    /// Release generation: a stalled call waits for it to pass the value it saw when it began,
    /// so a release is never lost to a call that has not been polled yet.
    released: watch::Sender<u64>,
    pub loads: AtomicU64,
    pub persists: AtomicU64,
    /// Calls (load or persist) whose result reached the caller.
    pub returned: AtomicU64,
    /// Calls (load or persist) the caller dropped before they returned.
    pub abandoned: AtomicU64,
    /// Persists that reached storage, with the value asked and the epoch.
    pub persisted: Mutex<Vec<(u64, Epoch)>>,
}

impl FaultBackend {
    pub fn new(initial: Leadership, stored_ms: u64) -> Arc<Self> {
        Arc::new_cyclic(|me| FaultBackend {
            me: me.clone(),
            stored: Mutex::new(OracleState {
                high_water_ms: stored_ms,
                ..OracleState::default()
            }),
            leadership: Mutex::new(Some(watch::channel(initial).0)),
            faults: Mutex::default(),
            released: watch::channel(0).0,
            loads: AtomicU64::new(0),
            persists: AtomicU64::new(0),
            returned: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            persisted: Mutex::default(),
        })
    }

    pub fn leader(epoch: u128, stored_ms: u64) -> Arc<Self> {
        Self::new(
            Leadership::Leader {
                epoch: Epoch::new(epoch),
            },
            stored_ms,
        )
    }

    pub fn inject(&self, op: Op, fault: Fault, times: usize) {
        let mut faults = self.faults.lock().unwrap();
        let queue = match op {
            Op::Load => &mut faults.load,
            Op::Persist => &mut faults.persist,
        };
        queue.extend(std::iter::repeat_n(fault, times));
    }

    pub fn set_leadership(&self, state: Leadership) {
        self.leadership
            .lock()
            .unwrap()
            .as_ref()
            .expect("leadership closed")
            .send_replace(state);
    }

    /// Closes the leadership stream, as a backend that died would.
    pub fn close_leadership(&self) {
        self.leadership.lock().unwrap().take();
    }

    /// Drops every fault not yet used.
    pub fn clear_faults(&self) {
        *self.faults.lock().unwrap() = Faults::default();
    }

    /// Lets every call stalled so far go on.
    pub fn release(&self) {
        self.released.send_modify(|generation| *generation += 1);
    }

    /// Whether every call begun so far has returned or been dropped by its caller.
    pub fn settled(&self) -> bool {
        let begun = self.loads.load(Ordering::SeqCst) + self.persists.load(Ordering::SeqCst);
        let ended = self.returned.load(Ordering::SeqCst) + self.abandoned.load(Ordering::SeqCst);
        begun == ended
    }

    pub fn stored(&self) -> u64 {
        self.stored.lock().unwrap().high_water_ms
    }

    pub fn set_stored(&self, value: u64) {
        self.stored.lock().unwrap().high_water_ms = value;
    }

    fn next_fault(&self, op: Op) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap();
        match op {
            Op::Load => faults.load.pop_front(),
            Op::Persist => faults.persist.pop_front(),
        }
    }

    /// A future that resolves at the next [`FaultBackend::release`] after this call.
    fn released_later(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut released = self.released.subscribe();
        let seen = *released.borrow_and_update();
        async move {
            let _ = released.wait_for(|generation| *generation > seen).await;
        }
    }

    async fn fault(&self, fault: Option<Fault>) -> Result<(), BackendError> {
        match fault {
            None | Some(Fault::Pass) => Ok(()),
            Some(Fault::Fail(err)) => Err(err),
            Some(Fault::Stall | Fault::StallCommit) => {
                self.released_later().await;
                Ok(())
            }
            Some(Fault::Hang) => std::future::pending().await,
            Some(Fault::Panic) => panic!("injected panic in the backend"),
        }
    }

    /// Applies `cmd`; an advance of the high-water is recorded in [`Self::persisted`].
    fn commit(&self, cmd: &OracleCommand, epoch: Epoch) -> Stored {
        let mut stored = self.stored.lock().unwrap();
        stored.apply(cmd);
        if let OracleCommand::AdvanceHighWater { at_least_ms } = cmd {
            self.persisted.lock().unwrap().push((*at_least_ms, epoch));
        }
        Stored {
            high_water_ms: stored.high_water_ms,
        }
    }
}

impl Backend for FaultBackend {
    fn leadership(&self) -> watch::Receiver<Leadership> {
        match self.leadership.lock().unwrap().as_ref() {
            Some(sender) => sender.subscribe(),
            None => watch::channel(Leadership::Unknown).1,
        }
    }

    /// A single node's backend: its lease always holds.
    fn leader_lease_valid(&self, _epoch: Epoch) -> bool {
        true
    }

    fn load(&self) -> BoxFuture<'_, Result<OracleState, BackendError>> {
        Box::pin(async move {
            self.loads.fetch_add(1, Ordering::SeqCst);
            let call = CallGuard::new(self);
            let result = self.fault(self.next_fault(Op::Load)).await;
            call.returned();
            result.map(|()| self.stored.lock().unwrap().clone())
        })
    }

    fn apply(
        &self,
        cmd: OracleCommand,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<Stored, BackendError>> {
        Box::pin(async move {
            self.persists.fetch_add(1, Ordering::SeqCst);
            let call = CallGuard::new(self);
            if let Err(err) = cmd.check(epoch) {
                call.returned();
                return Err(err);
            }
            let result = match self.next_fault(Op::Persist) {
                Some(Fault::StallCommit) => self.commit_detached(cmd, epoch).await,
                fault => match self.fault(fault).await {
                    Ok(()) => Ok(self.commit(&cmd, epoch)),
                    Err(err) => Err(err),
                },
            };
            call.returned();
            result
        })
    }
}

impl FaultBackend {
    /// Commits at the next release in a task of its own, so dropping the call does not stop it.
    async fn commit_detached(
        &self,
        cmd: OracleCommand,
        epoch: Epoch,
    ) -> Result<Stored, BackendError> {
        let me = self.me.upgrade().expect("backend alive during a call");
        let released = self.released_later();
        let (done, durable) = oneshot::channel();
        tokio::spawn(async move {
            released.await;
            let _ = done.send(me.commit(&cmd, epoch));
        });
        durable
            .await
            .map_err(|_| BackendError::Transient("runtime shutting down".into()))
    }
}

/// The high-water calls tests make most, in terms of the seam's `load` and `apply`.
pub trait HighWaterCalls: Backend {
    /// The high-water of a linearizable load.
    fn high_water_ms(&self) -> BoxFuture<'_, Result<u64, BackendError>> {
        Box::pin(async move { self.load().await.map(|s| s.high_water_ms) })
    }

    /// Applies an advance of the high-water; the durable high-water after it.
    fn raise_high_water(
        &self,
        at_least_ms: u64,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<u64, BackendError>> {
        let cmd = OracleCommand::AdvanceHighWater { at_least_ms };
        Box::pin(async move { self.apply(cmd, epoch).await.map(|s| s.high_water_ms) })
    }
}

impl<B: Backend + ?Sized> HighWaterCalls for B {}

/// Counts a backend call as returned, or as abandoned if its caller drops it first.
struct CallGuard<'a> {
    backend: &'a FaultBackend,
    returned: bool,
}

impl<'a> CallGuard<'a> {
    fn new(backend: &'a FaultBackend) -> Self {
        Self {
            backend,
            returned: false,
        }
    }

    fn returned(mut self) {
        self.returned = true;
        self.backend.returned.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if !self.returned {
            self.backend.abandoned.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A server on a loopback port, with a client connected to it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub serving: watch::Receiver<ServingState>,
    stop: Option<oneshot::Sender<()>>,
    /// Set once the server has taken the stop request (its shutdown future resolved).
    pub stop_taken: Arc<std::sync::atomic::AtomicBool>,
    pub task: JoinHandle<Result<(), ServeError>>,
}

impl TestServer {
    pub async fn start(
        backend: Arc<dyn Backend>,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let guard = OracleGuard::start_with_clock(backend, config, clock);
        Self::from_guard(listener, guard)
    }

    /// Serves an already started guard on `listener`.
    pub fn from_guard(listener: tokio::net::TcpListener, guard: OracleGuard) -> TestServer {
        let addr = listener.local_addr().unwrap();
        let serving = guard.serving();
        let (stop, stopped) = oneshot::channel();
        let stop_taken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let taken = Arc::clone(&stop_taken);
        let task = tokio::spawn(tso_server::serve_listener(listener, guard, async move {
            let _ = stopped.await;
            taken.store(true, Ordering::SeqCst);
        }));
        TestServer {
            addr,
            serving,
            stop: Some(stop),
            stop_taken,
            task,
        }
    }

    pub async fn client(&self) -> TsoServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        TsoServiceClient::new(channel)
    }

    /// Waits (bounded by the hang guard) until the serving state matches.
    pub async fn wait_for(
        &mut self,
        what: &str,
        pred: impl FnMut(&ServingState) -> bool,
    ) -> ServingState {
        let result = match tokio::time::timeout(HANG_GUARD, self.serving.wait_for(pred)).await {
            Ok(Ok(state)) => Some(state.clone()),
            Ok(Err(_)) => panic!("serving state channel closed while waiting for {what}"),
            Err(_) => None,
        };
        result.unwrap_or_else(|| {
            panic!(
                "timed out waiting for {what}; state is {:?}",
                *self.serving.borrow()
            )
        })
    }

    pub async fn wait_serving(&mut self) -> Epoch {
        match self
            .wait_for("Serving", |s| matches!(s, ServingState::Serving { .. }))
            .await
        {
            ServingState::Serving { epoch } => epoch,
            _ => unreachable!(),
        }
    }

    /// Waits for the serve call to return by itself (no shutdown asked) and returns its result.
    pub async fn finished(self) -> Result<(), ServeError> {
        tokio::time::timeout(HANG_GUARD, self.task)
            .await
            .expect("serve did not return by itself")
            .expect("serve task panicked")
    }

    /// Asks for shutdown and returns the serve call's result.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(HANG_GUARD, self.task)
            .await
            .expect("serve did not return")
            .expect("serve task panicked")
    }
}

/// Every timestamp of a reply, packed.
pub fn values(reply: &GetTsResponse) -> std::ops::RangeInclusive<u64> {
    let first = reply.physical_ms << 18 | reply.logical_start as u64;
    first..=first + reply.count as u64 - 1
}

pub async fn get_ts(
    client: &mut TsoServiceClient<Channel>,
    count: u32,
) -> Result<GetTsResponse, tonic::Status> {
    client
        .get_ts(GetTsRequest { count })
        .await
        .map(|r| r.into_inner())
}

/// Windows so wide that the extender's idle tick (a quarter window) never fires during a test:
/// with a [`ManualClock`], an extension starts only when a grant asks for one, so a test decides
/// exactly which call meets which injected fault. A fence leaves 400 s of room, above the 300 s
/// low-water mark, so no extension follows it either.
pub fn quiet_config() -> Config {
    Config {
        window_ahead: Duration::from_secs(600),
        failover_advance: Duration::from_secs(400),
        shutdown_grace: Duration::from_secs(5),
        ..Config::default()
    }
}

/// Small windows so tests exercise extensions quickly.
pub fn test_config() -> Config {
    Config {
        window_ahead: Duration::from_millis(3_000),
        failover_advance: Duration::from_millis(1_000),
        shutdown_grace: Duration::from_secs(5),
        ..Config::default()
    }
}

/// Polls `cond` every millisecond, bounded by the hang guard.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The leader hint in the trailers of a "not leader" status.
pub fn hint_in(status: &tonic::Status) -> tso_proto::v1::LeaderHint {
    let value = status
        .metadata()
        .get_bin(LEADER_HINT_KEY)
        .unwrap_or_else(|| panic!("no leader-hint trailer in {status:?}"));
    tso_proto::v1::LeaderHint::decode(value.to_bytes().unwrap()).unwrap()
}

/// The epoch of a wire hint, as a number.
pub fn hint_epoch(hint: &tso_proto::v1::LeaderHint) -> Option<u128> {
    hint.leader_epoch
        .as_ref()
        .map(|e| Epoch::from_parts(e.hi, e.lo).get())
}

/// Asserts that `status` is the "not leader" refusal, and returns its hint.
pub fn assert_not_leader(status: &tonic::Status) -> tso_proto::v1::LeaderHint {
    assert_eq!(
        status.code(),
        tonic::Code::FailedPrecondition,
        "expected not leader: {status:?}"
    );
    assert_eq!(status.message(), tso_server::NOT_LEADER_MESSAGE);
    hint_in(status)
}

/// Counts counters, for the thread it is installed on. A `#[tokio::test]` runs the server and
/// the test on one thread, so installing it with `metrics::set_default_local_recorder` sees
/// exactly this test's metrics, whatever other tests run in parallel.
#[derive(Default)]
pub struct TestRecorder {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl TestRecorder {
    /// The value of counter `name` with exactly `labels` (0 if never incremented).
    pub fn counter(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let id = format!("{name}{{{}}}", labels.join(","));
        self.counters
            .lock()
            .unwrap()
            .get(&id)
            .map_or(0, |c| c.load(Ordering::SeqCst))
    }

    fn id(key: &Key) -> String {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        format!("{}{{{}}}", key.name(), labels.join(","))
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.counters.lock().unwrap();
        Counter::from_arc(Arc::clone(counters.entry(Self::id(key)).or_default()))
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Clusters of in-process raft nodes on loopback gRPC.
#[cfg(feature = "raft")]
pub mod raft;

pub use tso_testkit::topic;
