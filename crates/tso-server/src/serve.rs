//! Starting and stopping the oracle: the guard that owns the leadership watch, and
//! `serve_with_shutdown` for a ready-made gRPC server.
//!
//! Shutdown is written once here: a cancellation token stops the watch, the gRPC server drains
//! in-flight calls, and the whole stop is bounded by the configured grace.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tracing::{error, info, warn};
use tso_proto::tso::stream::v1::tso_stream_server::TsoStreamServer;
use tso_proto::v1::tso_service_server::TsoServiceServer;

use crate::backend::Backend;
use crate::clock::{Clock, SystemClock};
use crate::error::ServeError;
use crate::oracle::{Config, ServingState, Shared};
use crate::service::TsoHandler;
use crate::stream::TsoStreamHandler;
use crate::watch as leadership_watch;

/// The gRPC name of the oracle's service, as health checks name it.
pub const TSO_SERVICE_NAME: &str = "tsoracle.v1.TsoService";

/// Concurrent calls on one HTTP/2 connection. A call holds nothing but a few hundred bytes while
/// it waits (at most [`crate::EXHAUSTED_WAIT_MAX`]), so 1024 callers sharing one connection cost
/// well under a megabyte; more queue at the client.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// Pings on an idle connection find dead peers: every 30 s, dropped after 10 s without a reply.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Owns the oracle's background work. Mount [`OracleGuard::service`] in a tonic server, then
/// call [`OracleGuard::shutdown`] when it stops; [`OracleGuard::failed`] resolves if serving is
/// poisoned, so a host can stop its own server on it.
///
/// Dropping the guard without [`OracleGuard::shutdown`] stops its tasks too (without waiting
/// for them); the backend is released once they have ended.
pub struct OracleGuard {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    /// Taken by [`OracleGuard::shutdown`].
    supervisor: Option<JoinHandle<Result<(), ServeError>>>,
    activity: Activity,
    /// What the status call says of this node's backend.
    node_info: crate::ops::NodeInfo,
}

impl Drop for OracleGuard {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl OracleGuard {
    /// Starts the oracle over `backend` with the system clock.
    pub fn start(backend: Arc<dyn Backend>, config: Config) -> OracleGuard {
        Self::start_with_clock(backend, config, Arc::new(SystemClock))
    }

    /// Starts the oracle with an injected clock (tests, fault injection).
    pub fn start_with_clock(
        backend: Arc<dyn Backend>,
        config: Config,
        clock: Arc<dyn Clock>,
    ) -> OracleGuard {
        crate::metrics::register(crate::stamping::LEASES_MAX);
        let shared = Arc::new(Shared::new(backend, config, clock));
        let shutdown = CancellationToken::new();
        let watch_task = tokio::spawn(leadership_watch::run(Arc::clone(&shared), shutdown.clone()));
        let supervisor = tokio::spawn(supervise(Arc::clone(&shared), watch_task));
        OracleGuard {
            shared,
            shutdown,
            supervisor: Some(supervisor),
            activity: Activity::default(),
            node_info: crate::ops::NodeInfo::default(),
        }
    }

    /// Names this node's backend, id and raft view in the status call ([`Self::ops_service`]).
    pub fn with_node_info(mut self, info: crate::ops::NodeInfo) -> OracleGuard {
        self.node_info = info;
        self
    }

    /// The operator calls (`tso.ops.v1`: status, raising the high-water), to add beside
    /// [`Self::service`] on the client port.
    pub fn ops_service(
        &self,
    ) -> tso_proto::tso::ops_v1::ops_server::OpsServer<crate::ops::OpsHandler> {
        crate::ops::OpsHandler::server(Arc::clone(&self.shared), self.node_info.clone())
    }

    /// The gRPC service, to add to a tonic server or router.
    pub fn service(&self) -> TsoServiceServer<TsoHandler> {
        TsoServiceServer::new(TsoHandler::new(Arc::clone(&self.shared)))
    }

    /// The streaming timestamp service (`tso.stream.v1`), to add beside [`Self::service`].
    /// Its streams end when [`Self::begin_draining`] is called or serving is poisoned.
    pub fn stream_service(&self) -> TsoStreamServer<TsoStreamHandler> {
        TsoStreamServer::new(TsoStreamHandler::new(Arc::clone(&self.shared)))
    }

    /// When client calls last arrived through [`serve_listener_tls`]: a stopping server that
    /// handed its leadership on waits with it until clients have followed the hint away, so
    /// that closing its connections interrupts no call.
    pub fn activity(&self) -> Activity {
        self.activity.clone()
    }

    /// Ends every open timestamp stream (with UNAVAILABLE), so that a server draining for
    /// shutdown does not wait on them. [`Self::shutdown`] does it too.
    pub fn begin_draining(&self) {
        self.shared.draining.cancel();
    }

    /// The standard `grpc.health.v1` service, following the serving state: the overall status
    /// (`""`) is SERVING unless serving is poisoned (a follower is healthy: it redirects), and
    /// `tsoracle.v1.TsoService` is SERVING only while this node grants timestamps.
    pub fn health_service(&self) -> HealthServer<impl Health> {
        let (reporter, server) = tonic_health::server::health_reporter();
        let mut serving = self.serving();
        tokio::spawn(async move {
            loop {
                let (overall, tso) = match &*serving.borrow_and_update() {
                    ServingState::Serving { .. } => {
                        (ServingStatus::Serving, ServingStatus::Serving)
                    }
                    ServingState::NotServing { .. } => {
                        (ServingStatus::Serving, ServingStatus::NotServing)
                    }
                    ServingState::Failed { .. } => {
                        (ServingStatus::NotServing, ServingStatus::NotServing)
                    }
                };
                reporter.set_service_status("", overall).await;
                reporter.set_service_status(TSO_SERVICE_NAME, tso).await;
                if serving.changed().await.is_err() {
                    return;
                }
            }
        });
        server
    }

    /// Dense-sequence calls waiting for the current term's next group write (diagnostics).
    pub fn queued_sequence_calls(&self) -> usize {
        self.shared.queued_sequence_calls()
    }

    /// The serving state, updated on every change.
    pub fn serving(&self) -> watch::Receiver<ServingState> {
        self.shared.serving()
    }

    /// Resolves once serving is poisoned (a fatal error; [`OracleGuard::shutdown`] returns it).
    pub async fn failed(&self) {
        self.shared.failed.cancelled().await
    }

    /// Waits until the node serves, or fails. Returns whether it serves.
    pub async fn wait_serving(&self) -> bool {
        let mut rx = self.serving();
        let state = rx
            .wait_for(|s| !matches!(s, ServingState::NotServing { .. }))
            .await;
        matches!(state.as_deref(), Ok(ServingState::Serving { .. }))
    }

    /// Stops the watch within the grace and returns why serving ended: `Ok` for a requested
    /// stop, the fatal error if serving was poisoned.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        self.shared.draining.cancel();
        self.shutdown.cancel();
        let grace = self.shared.config.shutdown_grace;
        let supervisor = self.supervisor.take().expect("shutdown runs once");
        let abort = supervisor.abort_handle();
        match tokio::time::timeout(grace, supervisor).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(ServeError::WatchPanicked(join.to_string())),
            Err(_) => {
                abort.abort();
                Err(ServeError::GraceExceeded {
                    grace_ms: grace.as_millis() as u64,
                })
            }
        }
    }
}

/// Waits for the watch task; whatever ends it other than a requested stop poisons serving, so
/// an embedder is never left with a silently dead watch.
async fn supervise(
    shared: Arc<Shared>,
    watch_task: JoinHandle<Result<(), ServeError>>,
) -> Result<(), ServeError> {
    let result = match watch_task.await {
        Ok(result) => result,
        Err(join) if join.is_panic() => {
            Err(ServeError::WatchPanicked(panic_message(join.into_panic())))
        }
        Err(join) => Err(ServeError::WatchPanicked(join.to_string())),
    };
    // A stop requested right after a poisoning can end the watch before it saw the poisoning;
    // the poisoning is still why serving ended.
    let result = match result {
        Ok(()) if shared.is_poisoned() => Err(shared.take_fatal()),
        other => other,
    };
    if let Err(err) = &result {
        error!(error = %err, "leadership watch ended: serving is poisoned");
        // The supervisor returns the error itself; the state only needs its message.
        shared.mark_poisoned(err.to_string());
    }
    result
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".into())
}

/// When the last client call arrived (see [`OracleGuard::activity`]).
#[derive(Debug, Clone)]
pub struct Activity {
    base: std::time::Instant,
    last_ns: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            base: std::time::Instant::now(),
            last_ns: Arc::default(),
        }
    }
}

impl Activity {
    fn touch(&self) {
        let ns = self.base.elapsed().as_nanos() as u64;
        self.last_ns
            .fetch_max(ns, std::sync::atomic::Ordering::Relaxed);
    }

    fn idle_for(&self) -> std::time::Duration {
        let last = std::time::Duration::from_nanos(
            self.last_ns.load(std::sync::atomic::Ordering::Relaxed),
        );
        self.base.elapsed().saturating_sub(last)
    }

    /// Waits until no call has arrived for `idle`, or until `deadline`.
    pub async fn wait_idle(&self, idle: std::time::Duration, deadline: tokio::time::Instant) {
        loop {
            let quiet = self.idle_for();
            if quiet >= idle || tokio::time::Instant::now() >= deadline {
                return;
            }
            let next = (tokio::time::Instant::now() + (idle - quiet)).min(deadline);
            tokio::time::sleep_until(next).await;
        }
    }
}

/// Binds `addr` and serves until `shutdown` resolves or serving is poisoned.
pub async fn serve_with_shutdown(
    addr: SocketAddr,
    backend: Arc<dyn Backend>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let guard = OracleGuard::start(backend, config);
    serve_listener(listener, guard, shutdown).await
}

/// Serves the oracle of `guard` on `listener` until `shutdown` resolves or serving is
/// poisoned; then drains in-flight calls and stops the guard, all within the grace.
pub async fn serve_listener(
    listener: TcpListener,
    guard: OracleGuard,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    serve_listener_tls(listener, guard, None, shutdown).await
}

/// gRPC server reflection (`grpc.reflection.v1`) for the services of the client port:
/// `tsoracle.v1`, `tso.stream.v1`, `tso.ops.v1` and health, so reflection-based tools (grpcurl, Postman) list
/// and call them with no `.proto` at hand.
pub fn reflection_service() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tso_proto::CLIENT_PORT_DESCRIPTORS)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the descriptor sets compiled into this binary decode")
}

/// [`serve_listener`], over TLS when `tls` is given (build it with
/// [`crate::tls::server_tls_config`]).
pub async fn serve_listener_tls(
    listener: TcpListener,
    guard: OracleGuard,
    tls: Option<ServerTlsConfig>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    // Nagle's algorithm would hold small replies for a delayed ACK (tens of ms).
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let stop = CancellationToken::new();
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(InterceptedService::new(guard.service(), {
            let activity = guard.activity();
            move |request: tonic::Request<()>| {
                activity.touch();
                Ok(request)
            }
        }))
        .add_service(guard.stream_service())
        .add_service(guard.ops_service())
        .add_service(guard.health_service())
        .add_service(reflection_service())
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    tokio::pin!(server);
    let served = tokio::select! {
        result = &mut server => Some(result),
        _ = shutdown => { info!("shutdown requested: draining in-flight calls"); None }
        _ = guard.failed() => None,
    };
    let served = match served {
        Some(result) => result,
        None => {
            guard.begin_draining();
            stop.cancel();
            let grace = guard.shared.config.shutdown_grace;
            match tokio::time::timeout(grace, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    warn!(
                        grace_ms = grace.as_millis() as u64,
                        "in-flight calls did not finish within the grace"
                    );
                    Ok(())
                }
            }
        }
    };
    let stopped = guard.shutdown().await;
    served?;
    stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A poisoning that the leadership watch has not seen yet when shutdown is asked for must
    /// still be what shutdown returns: the process exits 1 for it, never 0.
    #[tokio::test]
    async fn a_poisoning_not_yet_seen_by_the_watch_is_what_shutdown_returns() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(crate::backend::file::FileBackend::open(dir.path()).unwrap());
        let guard = OracleGuard::start(backend, Config::default());
        assert!(guard.wait_serving().await);
        // No await between the poisoning and the shutdown: the watch task cannot run first.
        guard
            .shared
            .poison(ServeError::Invariant("injected for the test".into()));
        let result = guard.shutdown().await;
        assert!(
            matches!(&result, Err(ServeError::Invariant(reason)) if reason.contains("injected")),
            "shutdown after a poisoning returned {result:?}"
        );
    }
}
