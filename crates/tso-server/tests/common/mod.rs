//! Shared test helpers: a fault-injecting backend at the consensus seam, a manual clock, and a
//! real gRPC server on loopback.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tso_core::{Epoch, PHYSICAL_MAX_MS};
use tso_proto::v1::tso_service_client::TsoServiceClient;
use tso_proto::v1::{GetTsRequest, GetTsResponse};
use tso_server::clock::Clock;
use tso_server::consensus::{BoxFuture, Consensus, ConsensusError, Leadership};
use tso_server::{Config, OracleGuard, ServeError, ServingState};

/// Hang guard for waits in tests: generous, never the thing a test asserts on.
pub const HANG_GUARD: Duration = Duration::from_secs(30);

/// A clock the test sets by hand.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(now_ms: u64) -> Arc<Self> {
        Arc::new(Self(AtomicI64::new(now_ms as i64)))
    }
    pub fn set(&self, now_ms: u64) {
        self.0.store(now_ms as i64, Ordering::SeqCst);
    }
    pub fn advance(&self, delta_ms: i64) {
        self.0.fetch_add(delta_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst) as u64
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
    Fail(ConsensusError),
    /// Wait until [`FaultBackend::release`] before doing the call for real.
    Stall,
    /// Never return.
    Hang,
    Panic,
}

#[derive(Default)]
struct Faults {
    load: VecDeque<Fault>,
    persist: VecDeque<Fault>,
}

/// A backend at the consensus seam whose faults the test scripts: errors of each class on the
/// next N calls, stalled or hung calls, panics, and leadership events.
pub struct FaultBackend {
    stored: Mutex<u64>,
    leadership: Mutex<Option<watch::Sender<Leadership>>>,
    faults: Mutex<Faults>,
    release: Notify,
    pub loads: AtomicU64,
    pub persists: AtomicU64,
    /// Persists that reached storage, with the value asked and the epoch.
    pub persisted: Mutex<Vec<(u64, Epoch)>>,
}

impl FaultBackend {
    pub fn new(initial: Leadership, stored_ms: u64) -> Arc<Self> {
        Arc::new(FaultBackend {
            stored: Mutex::new(stored_ms),
            leadership: Mutex::new(Some(watch::channel(initial).0)),
            faults: Mutex::default(),
            release: Notify::new(),
            loads: AtomicU64::new(0),
            persists: AtomicU64::new(0),
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

    pub fn clear_faults(&self) {
        *self.faults.lock().unwrap() = Faults::default();
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

    pub fn release(&self) {
        self.release.notify_waiters();
    }

    pub fn stored(&self) -> u64 {
        *self.stored.lock().unwrap()
    }

    pub fn set_stored(&self, value: u64) {
        *self.stored.lock().unwrap() = value;
    }

    fn next_fault(&self, op: Op) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap();
        match op {
            Op::Load => faults.load.pop_front(),
            Op::Persist => faults.persist.pop_front(),
        }
    }

    async fn apply(&self, fault: Option<Fault>) -> Result<(), ConsensusError> {
        match fault {
            None | Some(Fault::Pass) => Ok(()),
            Some(Fault::Fail(err)) => Err(err),
            Some(Fault::Stall) => {
                self.release.notified().await;
                Ok(())
            }
            Some(Fault::Hang) => std::future::pending().await,
            Some(Fault::Panic) => panic!("injected panic in the backend"),
        }
    }

    fn commit(&self, at_least_ms: u64, epoch: Epoch) -> u64 {
        let mut stored = self.stored.lock().unwrap();
        *stored = (*stored).max(at_least_ms);
        self.persisted.lock().unwrap().push((at_least_ms, epoch));
        *stored
    }
}

impl Consensus for FaultBackend {
    fn leadership(&self) -> watch::Receiver<Leadership> {
        match self.leadership.lock().unwrap().as_ref() {
            Some(sender) => sender.subscribe(),
            None => watch::channel(Leadership::Unknown).1,
        }
    }

    fn load_high_water(&self) -> BoxFuture<'_, Result<u64, ConsensusError>> {
        Box::pin(async move {
            self.loads.fetch_add(1, Ordering::SeqCst);
            self.apply(self.next_fault(Op::Load)).await?;
            Ok(self.stored())
        })
    }

    fn persist_high_water(
        &self,
        at_least_ms: u64,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<u64, ConsensusError>> {
        Box::pin(async move {
            self.persists.fetch_add(1, Ordering::SeqCst);
            if at_least_ms > PHYSICAL_MAX_MS {
                return Err(ConsensusError::Permanent("out of range".into()));
            }
            self.apply(self.next_fault(Op::Persist)).await?;
            Ok(self.commit(at_least_ms, epoch))
        })
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
        backend: Arc<dyn Consensus>,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let guard = OracleGuard::start_with_clock(backend, config, clock);
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

/// Small windows so tests exercise extensions quickly.
pub fn test_config() -> Config {
    Config {
        window_ahead: Duration::from_millis(3_000),
        failover_advance: Duration::from_millis(1_000),
        shutdown_grace: Duration::from_secs(5),
    }
}
