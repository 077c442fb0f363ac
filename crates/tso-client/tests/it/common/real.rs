//! The project's real server (`tso-server`) on loopback, for the client's tests: over the file
//! backend, or over [`ClusterBackend`], an in-memory "replicated" oracle state shared by
//! several nodes whose leadership the test sets, so a follower's hint and a failover are the real
//! server's own.
//!
//! Each node runs on its own thread and runtime; stopping it drops every connection at once.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{oneshot, watch};
use tso_core::Epoch;
use tso_server::backend::file::FileBackend;
use tso_server::backend::{
    Backend, BackendError, BoxFuture, Leadership, OracleCommand, OracleState, Stored,
};
use tso_server::{Config, OracleGuard, ServingState};

use super::HANG_GUARD;

/// One oracle state shared by every node of a pretend cluster: what a quorum would store.
#[derive(Default)]
pub struct ClusterStore {
    state: Mutex<OracleState>,
}

/// One node's view of the [`ClusterStore`], with leadership set by the test.
pub struct ClusterBackend {
    store: Arc<ClusterStore>,
    leadership: watch::Sender<Leadership>,
}

impl ClusterBackend {
    pub fn new(store: Arc<ClusterStore>, initial: Leadership) -> Arc<Self> {
        Arc::new(Self {
            store,
            leadership: watch::channel(initial).0,
        })
    }

    pub fn set_leadership(&self, state: Leadership) {
        self.leadership.send_replace(state);
    }

    fn not_leader(&self) -> BackendError {
        match &*self.leadership.borrow() {
            Leadership::Follower {
                leader_endpoint,
                leader_epoch,
            } => BackendError::NotLeader {
                leader_endpoint: leader_endpoint.clone(),
                leader_epoch: *leader_epoch,
            },
            _ => BackendError::NotLeader {
                leader_endpoint: None,
                leader_epoch: None,
            },
        }
    }
}

impl Backend for ClusterBackend {
    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    /// No lease: the test moves leadership by hand, and a deposed node learns it at once.
    fn leader_lease_valid(&self, _epoch: Epoch) -> bool {
        true
    }

    fn load(&self) -> BoxFuture<'_, Result<OracleState, BackendError>> {
        let state = self.store.state.lock().unwrap().clone();
        Box::pin(async move { Ok(state) })
    }

    fn apply(
        &self,
        cmd: OracleCommand,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<Stored, BackendError>> {
        let leads = *self.leadership.borrow() == Leadership::Leader { epoch };
        let result = if leads {
            cmd.check(epoch).map(|()| {
                let mut state = self.store.state.lock().unwrap();
                state.apply(&cmd);
                Stored {
                    high_water_ms: state.high_water_ms,
                }
            })
        } else {
            Err(self.not_leader())
        };
        Box::pin(async move { result })
    }
}

/// A real server node. Dropping it stops it.
pub struct RealServer {
    addr: SocketAddr,
    serving: watch::Receiver<ServingState>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl RealServer {
    /// A node over `backend` on a fresh loopback port.
    pub fn start(backend: Arc<dyn Backend>) -> Self {
        Self::start_on(backend, "127.0.0.1:0".parse().unwrap())
    }

    /// A single node over the file backend in `dir`, on `addr` (port 0 picks one).
    pub fn start_file(dir: &Path, addr: SocketAddr) -> Self {
        let backend = FileBackend::open(dir).expect("open the file backend");
        Self::start_on(Arc::new(backend), addr)
    }

    fn start_on(backend: Arc<dyn Backend>, addr: SocketAddr) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.set_reuseaddr(true).unwrap();
                socket.bind(addr).expect("bind the real server");
                let listener = socket.listen(1024).unwrap();
                let guard = OracleGuard::start(backend, Config::default());
                ready
                    .send((listener.local_addr().unwrap(), guard.serving()))
                    .unwrap();
                // Not graceful on purpose: returning drops the runtime, every connection and the
                // backend at once, like a killed process.
                let serve = tso_server::serve_listener(listener, guard, std::future::pending());
                tokio::select! {
                    _ = serve => {}
                    _ = stopped => {}
                }
            });
        });
        let (addr, serving) = ready_rx.recv().expect("the server thread binds or panics");
        Self {
            addr,
            serving,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits (hang guard only) until the node serves at an epoch of at least `epoch`.
    pub async fn wait_serving(&mut self, epoch: Epoch) {
        let serving = self
            .serving
            .wait_for(|s| matches!(s, ServingState::Serving { epoch: e } if *e >= epoch));
        tokio::time::timeout(HANG_GUARD, serving)
            .await
            .expect("the node never served")
            .expect("the node stopped");
    }

    /// Waits (hang guard only) until the node has stopped serving.
    pub async fn wait_not_serving(&mut self) {
        let not_serving = self
            .serving
            .wait_for(|s| !matches!(s, ServingState::Serving { .. }));
        tokio::time::timeout(HANG_GUARD, not_serving)
            .await
            .expect("the node kept serving")
            .expect("the node stopped");
    }

    /// Stops the node; returns once its thread (and its backend) is gone.
    pub fn stop(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("server thread panicked");
        }
    }
}

impl Drop for RealServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Two real servers over one [`ClusterStore`]: `a` leads in epoch 1, `b` follows it, until
/// [`Pair::fail_over`] moves leadership to `b` in epoch 2.
pub struct Pair {
    pub a: RealServer,
    pub b: RealServer,
    a_backend: Arc<ClusterBackend>,
    b_backend: Arc<ClusterBackend>,
}

impl Pair {
    pub const FIRST: Epoch = Epoch::new(1);
    pub const SECOND: Epoch = Epoch::new(2);

    pub async fn start() -> Pair {
        let store = Arc::new(ClusterStore::default());
        let a_backend =
            ClusterBackend::new(store.clone(), Leadership::Leader { epoch: Pair::FIRST });
        let mut a = RealServer::start(a_backend.clone());
        a.wait_serving(Pair::FIRST).await;
        let b_backend = ClusterBackend::new(
            store,
            Leadership::Follower {
                leader_endpoint: Some(a.endpoint()),
                leader_epoch: Some(Pair::FIRST),
            },
        );
        let b = RealServer::start(b_backend.clone());
        Pair {
            a,
            b,
            a_backend,
            b_backend,
        }
    }

    /// `a` follows `b`, `b` leads in epoch 2; returns once `a` stopped and `b` started serving.
    pub async fn fail_over(&mut self) {
        self.a_backend.set_leadership(Leadership::Follower {
            leader_endpoint: Some(self.b.endpoint()),
            leader_epoch: Some(Pair::SECOND),
        });
        self.b_backend.set_leadership(Leadership::Leader {
            epoch: Pair::SECOND,
        });
        self.a.wait_not_serving().await;
        self.b.wait_serving(Pair::SECOND).await;
    }
}
