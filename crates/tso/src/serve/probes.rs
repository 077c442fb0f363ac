//! The HTTP endpoint of `--metrics-listen`: `/metrics` (Prometheus text), and the probes a
//! container orchestrator polls, `/healthz` (alive and not poisoned) and `/readyz` (serves
//! timestamps, or follows a known leader) (SEMANTICS §12).
//!
//! Invariant: the endpoint holds at most [`CONNECTIONS_MAX`] connections, each for at most
//! [`CONNECTION_TIME_MAX`] and one request, so a slow or hostile client cannot pin memory or
//! tasks; further connections wait in the kernel's accept queue.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tso_core::Epoch;
use tso_server::ServingState;
use tso_server::backend::{Backend, Leadership};

/// Connections served at once. A probe or scrape holds one for a few milliseconds; 64 covers a
/// kubelet (two probes), several Prometheus replicas and an operator's curl many times over,
/// at a few tens of KiB each (hyper's read buffer and one rendered reply).
pub const CONNECTIONS_MAX: usize = 64;
/// Time a client has to send its request head; hyper closes the connection after it.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Time one connection may take in all, reading the request and writing the reply: the header
/// timeout plus room for a slow reader of the largest reply (the metrics, a few KiB).
pub const CONNECTION_TIME_MAX: Duration = Duration::from_secs(10);
/// Bytes buffered while reading a request: hyper's minimum, far above a probe's head (~100 B).
pub const REQUEST_BUFFER_BYTES_MAX: usize = 8 * 1024;
/// How often the recorder drains histogram samples into its summaries. The exporter's own
/// listener did this every 5 s; without it histograms would grow without bound.
pub const METRICS_UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The answer to a probe: whether it passes (200, else 503) and the state in a few words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub ok: bool,
    pub state: String,
}

impl Probe {
    fn pass(state: impl Into<String>) -> Probe {
        Probe {
            ok: true,
            state: state.into(),
        }
    }

    fn fail(state: impl Into<String>) -> Probe {
        Probe {
            ok: false,
            state: state.into(),
        }
    }
}

/// What the node looks like to the probes. Starts as "starting"; [`ProbeState::follow`] points
/// it at the oracle once that runs, [`ProbeState::stopping`] marks the drain. Clones share it.
#[derive(Clone, Default)]
pub struct ProbeState(Arc<Inner>);

#[derive(Default)]
struct Inner {
    oracle: OnceLock<Oracle>,
    stopping: AtomicBool,
}

struct Oracle {
    serving: watch::Receiver<ServingState>,
    /// Read for the leadership (is a not-serving leader still fencing?) and the lease.
    backend: Arc<dyn Backend>,
}

impl ProbeState {
    /// From now on, report the serving state `serving` of the oracle over `backend`. Called once.
    pub fn follow(&self, serving: watch::Receiver<ServingState>, backend: Arc<dyn Backend>) {
        let set = self.0.oracle.set(Oracle { serving, backend });
        assert!(set.is_ok(), "the probes follow one oracle");
    }

    /// Marks the node as draining at shutdown: no longer ready, still alive.
    pub fn stopping(&self) {
        self.0.stopping.store(true, Ordering::Relaxed);
    }

    /// `/healthz`: fails only once serving is poisoned.
    pub fn health(&self) -> Probe {
        let probe = self.readiness();
        let failed = matches!(self.serving().as_ref(), Some(ServingState::Failed { .. }));
        Probe {
            ok: !failed,
            ..probe
        }
    }

    /// `/readyz`: passes while this node grants timestamps or follows a known leader.
    pub fn readiness(&self) -> Probe {
        let stopping = self.0.stopping.load(Ordering::Relaxed);
        let Some(oracle) = self.0.oracle.get() else {
            return Probe::fail(if stopping {
                "shutting down"
            } else {
                "starting"
            });
        };
        let serving = oracle.serving.borrow().clone();
        let leadership = oracle.backend.leadership().borrow().clone();
        readiness_of(
            &serving,
            &leadership,
            |epoch| oracle.backend.leader_lease_valid(epoch),
            stopping,
        )
    }

    fn serving(&self) -> Option<ServingState> {
        let oracle = self.0.oracle.get()?;
        Some(oracle.serving.borrow().clone())
    }
}

/// Readiness from the serving state, the backend's view of leadership and its lease, and
/// whether a shutdown was requested. A poisoning is reported whatever else holds.
fn readiness_of(
    serving: &ServingState,
    leadership: &Leadership,
    leader_lease_valid: impl Fn(Epoch) -> bool,
    stopping: bool,
) -> Probe {
    match serving {
        ServingState::Failed { reason } => Probe::fail(format!("failed: {reason}")),
        _ if stopping => Probe::fail("shutting down"),
        ServingState::Serving { epoch } if leader_lease_valid(*epoch) => {
            Probe::pass(format!("serving epoch {epoch}"))
        }
        // Cut off from its peers: grants are refused until a quorum renews the lease.
        ServingState::Serving { epoch } => {
            Probe::fail(format!("leader of epoch {epoch} without a lease"))
        }
        ServingState::NotServing {
            leader_endpoint: Some(endpoint),
            ..
        } => Probe::pass(format!("follower of {endpoint}")),
        ServingState::NotServing { .. } => match leadership {
            Leadership::Leader { epoch } => Probe::fail(format!("fencing in epoch {epoch}")),
            _ => Probe::fail("no leader known"),
        },
    }
}

/// Installs the Prometheus recorder for this process and returns the handle that renders it.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(METRICS_UPKEEP_INTERVAL).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    state: ProbeState,
    stop: CancellationToken,
) {
    let routes = Arc::new(Routes { metrics, state });
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = accept(&listener, &slots) => accepted,
        };
        let Some((stream, peer, slot)) = accepted else {
            continue;
        };
        let routes = Arc::clone(&routes);
        tokio::spawn(async move {
            serve_connection(stream, peer, routes).await;
            drop(slot);
        });
    }
}

/// Takes a connection slot, then a connection; `None` if accepting failed (logged).
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> Option<(TcpStream, SocketAddr, tokio::sync::OwnedSemaphorePermit)> {
    let slot = Arc::clone(slots)
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    match listener.accept().await {
        Ok((stream, peer)) => Some((stream, peer, slot)),
        Err(err) => {
            // Out of file handles, most likely: back off instead of spinning on the error.
            tracing::warn!(error = %err, "metrics endpoint: accepting a connection failed");
            tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            None
        }
    }
}

/// Pause after a failed accept, so that a lack of file handles does not spin a core.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// One request on one connection, within [`CONNECTION_TIME_MAX`].
async fn serve_connection(stream: TcpStream, peer: SocketAddr, routes: Arc<Routes>) {
    let service = service_fn(move |request| {
        let response = routes.answer(&request);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(REQUEST_BUFFER_BYTES_MAX)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    match tokio::time::timeout(CONNECTION_TIME_MAX, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!(%peer, error = %err, "metrics endpoint: connection failed"),
        Err(_) => tracing::debug!(%peer, "metrics endpoint: connection timed out"),
    }
}

struct Routes {
    metrics: PrometheusHandle,
    state: ProbeState,
}

/// The content type of the Prometheus text exposition format.
const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

impl Routes {
    fn answer(&self, request: &Request<Incoming>) -> Response<String> {
        let path = request.uri().path();
        if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
            let hint = "not found: try /metrics, /healthz or /readyz\n";
            return text(StatusCode::NOT_FOUND, hint.into());
        }
        if request.method() != Method::GET {
            let mut response = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "only GET is allowed\n".into(),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET"));
            return response;
        }
        match path {
            "/metrics" => {
                let mut response = Response::new(self.metrics.render());
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
                response
            }
            "/healthz" => probe(self.state.health()),
            _ => probe(self.state.readiness()),
        }
    }
}

fn probe(probe: Probe) -> Response<String> {
    let status = match probe.ok {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    text(status, format!("{}\n", probe.state))
}

fn text(status: StatusCode, body: String) -> Response<String> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_CONTENT_TYPE));
    response
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use tso_server::backend::{BackendError, BoxFuture, OracleCommand, OracleState, Stored};

    use super::*;

    fn epoch(term: u64, node: u64) -> Epoch {
        Epoch::from_parts(term, node)
    }

    #[test]
    fn readiness_follows_the_serving_state() {
        let follower = Leadership::Follower {
            leader_endpoint: None,
            leader_epoch: None,
        };
        let leader = Leadership::Leader { epoch: epoch(3, 1) };
        let cases = [
            (
                ServingState::Serving { epoch: epoch(3, 1) },
                &leader,
                true,
                Probe::pass("serving epoch 3.1"),
            ),
            (
                ServingState::Serving { epoch: epoch(3, 1) },
                &leader,
                false,
                Probe::fail("leader of epoch 3.1 without a lease"),
            ),
            (
                ServingState::NotServing {
                    leader_endpoint: Some("10.0.0.2:50551".into()),
                    leader_epoch: Some(epoch(3, 2)),
                },
                &follower,
                false,
                Probe::pass("follower of 10.0.0.2:50551"),
            ),
            (
                ServingState::NotServing {
                    leader_endpoint: None,
                    leader_epoch: None,
                },
                &Leadership::Unknown,
                false,
                Probe::fail("no leader known"),
            ),
            (
                ServingState::NotServing {
                    leader_endpoint: None,
                    leader_epoch: None,
                },
                &leader,
                true,
                Probe::fail("fencing in epoch 3.1"),
            ),
            (
                ServingState::Failed {
                    reason: "disk gone".into(),
                },
                &leader,
                true,
                Probe::fail("failed: disk gone"),
            ),
        ];
        for (serving, leadership, lease, want) in cases {
            let got = readiness_of(&serving, leadership, |_| lease, false);
            assert_eq!(got, want, "{serving:?}");
            let stopping = readiness_of(&serving, leadership, |_| lease, true);
            match &serving {
                ServingState::Failed { .. } => assert_eq!(stopping, want),
                _ => assert_eq!(stopping, Probe::fail("shutting down")),
            }
        }
    }

    /// A backend that only reports leadership; the probes never persist.
    struct Stub(watch::Sender<Leadership>);

    impl Backend for Stub {
        fn leadership(&self) -> watch::Receiver<Leadership> {
            self.0.subscribe()
        }

        /// Like a single node's: the lease always holds.
        fn leader_lease_valid(&self, _: Epoch) -> bool {
            true
        }

        fn load(&self) -> BoxFuture<'_, Result<OracleState, BackendError>> {
            unreachable!("the probes never load")
        }

        fn apply(&self, _: OracleCommand, _: Epoch) -> BoxFuture<'_, Result<Stored, BackendError>> {
            unreachable!("the probes never apply")
        }
    }

    /// An endpoint on a free loopback port over a state the test sets; stops when dropped.
    struct Endpoint {
        addr: SocketAddr,
        serving: watch::Sender<ServingState>,
        state: ProbeState,
        _stop: tokio_util::sync::DropGuard,
    }

    async fn endpoint() -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (serving, rx) = watch::channel(ServingState::NotServing {
            leader_endpoint: None,
            leader_epoch: None,
        });
        let (leadership, _) = watch::channel(Leadership::Unknown);
        let state = ProbeState::default();
        state.follow(rx, Arc::new(Stub(leadership)));
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, metrics, state.clone(), stop.clone()));
        Endpoint {
            addr,
            serving,
            state,
            _stop: stop.drop_guard(),
        }
    }

    /// Sends `request` on a new connection and reads the reply to its end.
    fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(HANG_GUARD)).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        exchange(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
    }

    /// Bound on waits for the server; never what a test asserts on.
    const HANG_GUARD: Duration = Duration::from_secs(30);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn routes_answer_by_path_and_method() {
        let ep = endpoint().await;
        let addr = ep.addr;
        tokio::task::spawn_blocking(move || {
            let reply = get(addr, "/readyz");
            assert!(reply.starts_with("HTTP/1.1 503 "), "{reply}");
            assert!(reply.ends_with("\r\n\r\nno leader known\n"), "{reply}");
            let reply = get(addr, "/healthz");
            assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
            let reply = get(addr, "/metrics");
            assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
            assert!(
                reply.contains("content-type: text/plain; version=0.0.4"),
                "{reply}"
            );
            let reply = get(addr, "/nope");
            assert!(reply.starts_with("HTTP/1.1 404 "), "{reply}");
            let reply = exchange(
                addr,
                "POST /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            );
            assert!(reply.starts_with("HTTP/1.1 405 "), "{reply}");
            assert!(reply.contains("allow: GET"), "{reply}");
            // Old clients (the exporter's scrapers, `curl -0`) speak HTTP/1.0.
            let reply = exchange(addr, "GET /healthz HTTP/1.0\r\n\r\n");
            assert!(reply.starts_with("HTTP/1.0 200 "), "{reply}");
        })
        .await
        .unwrap();
    }

    /// Poisoning fails both probes; draining fails readiness only.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_fails_health_and_stopping_fails_readiness() {
        let ep = endpoint().await;
        let addr = ep.addr;
        ep.serving.send_replace(ServingState::NotServing {
            leader_endpoint: Some("127.0.0.1:7001".into()),
            leader_epoch: None,
        });
        let ready = tokio::task::spawn_blocking(move || get(addr, "/readyz"))
            .await
            .unwrap();
        assert!(ready.starts_with("HTTP/1.1 200 "), "{ready}");
        assert!(ready.ends_with("follower of 127.0.0.1:7001\n"), "{ready}");

        ep.state.stopping();
        let (ready, health) =
            tokio::task::spawn_blocking(move || (get(addr, "/readyz"), get(addr, "/healthz")))
                .await
                .unwrap();
        assert!(ready.starts_with("HTTP/1.1 503 "), "{ready}");
        assert!(ready.ends_with("shutting down\n"), "{ready}");
        assert!(health.starts_with("HTTP/1.1 200 "), "{health}");

        ep.serving.send_replace(ServingState::Failed {
            reason: "record file gone".into(),
        });
        let health = tokio::task::spawn_blocking(move || get(addr, "/healthz"))
            .await
            .unwrap();
        assert!(health.starts_with("HTTP/1.1 503 "), "{health}");
        assert!(health.ends_with("failed: record file gone\n"), "{health}");
    }

    /// At the bound: with [`CONNECTIONS_MAX`] connections open mid-request, one more waits
    /// in the accept queue; it is answered once a slot frees.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_bound_wait_for_a_slot() {
        let ep = endpoint().await;
        let addr = ep.addr;
        tokio::task::spawn_blocking(move || {
            let mut held: Vec<std::net::TcpStream> = (0..CONNECTIONS_MAX)
                .map(|_| {
                    let mut s = std::net::TcpStream::connect(addr).unwrap();
                    s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
                    s
                })
                .collect();
            let mut extra = std::net::TcpStream::connect(addr).unwrap();
            extra
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            // Well inside the header timeout of the held connections, so none has freed a
            // slot yet: a reply now would mean the bound was exceeded.
            extra
                .set_read_timeout(Some(HEADER_READ_TIMEOUT / 10))
                .unwrap();
            let mut byte = [0u8; 1];
            let early = extra.read(&mut byte);
            assert!(
                matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut),
                "answered beyond the bound: {early:?}"
            );
            drop(held.pop());
            extra.set_read_timeout(Some(HANG_GUARD)).unwrap();
            let mut reply = String::new();
            extra.read_to_string(&mut reply).unwrap();
            assert!(reply.starts_with("HTTP/1.1 200 "), "{reply}");
        })
        .await
        .unwrap();
    }

    /// A client that connects and sends nothing is dropped after the header timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_connection_is_closed() {
        let ep = endpoint().await;
        let addr = ep.addr;
        tokio::task::spawn_blocking(move || {
            let mut silent = std::net::TcpStream::connect(addr).unwrap();
            silent.set_read_timeout(Some(HANG_GUARD)).unwrap();
            let mut rest = Vec::new();
            // EOF (or a reset): the server gave up on the request head.
            let _ = silent.read_to_end(&mut rest);
            assert!(
                rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
                "{rest:?}"
            );
        })
        .await
        .unwrap();
    }
}
