//! A `tsoracle.v1` server that breaks the protocol on purpose: every other `GetTs` reply grants
//! one timestamp more than was asked for (values still unique and rising, so only the shape is
//! wrong), the others are correct. The client library refuses such a reply as malformed; the
//! correct ones keep a run from failing only for want of a grant. It runs on its own thread and
//! runtime, and stops when dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tso_proto::v1::tso_service_server::{TsoService, TsoServiceServer};
use tso_proto::v1::*;

/// The first millisecond granted; each reply takes the next one.
const FIRST_MS: u64 = 1_000_000;

pub struct MalformedServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MalformedServer {
    /// Serves on a free loopback port.
    pub fn start() -> MalformedServer {
        let (stop, stopped) = oneshot::channel();
        let (bound, bound_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the malformed server");
            runtime.block_on(serve(bound, stopped));
        });
        let addr = bound_rx.recv().expect("the server thread binds or panics");
        MalformedServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:port`.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for MalformedServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(bound: std::sync::mpsc::Sender<SocketAddr>, stopped: oneshot::Receiver<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the malformed server");
    bound.send(listener.local_addr().unwrap()).unwrap();
    let service = TsoServiceServer::new(Malformed(AtomicU64::new(FIRST_MS)));
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
            let _ = stopped.await;
        });
    server.await.expect("the malformed server failed");
}

struct Malformed(AtomicU64);

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("malformed test server"))
}

#[tonic::async_trait]
impl TsoService for Malformed {
    async fn get_ts(
        &self,
        request: Request<GetTsRequest>,
    ) -> Result<Response<GetTsResponse>, Status> {
        let physical_ms = self.0.fetch_add(1, Ordering::Relaxed);
        let extra = u32::from(physical_ms % 2 == 1);
        Ok(Response::new(GetTsResponse {
            physical_ms,
            logical_start: 0,
            count: request.get_ref().count + extra,
            epoch_hi: 0,
            epoch_lo: 1,
        }))
    }

    async fn get_current_max_safe(
        &self,
        _: Request<GetCurrentMaxSafeRequest>,
    ) -> Result<Response<GetCurrentMaxSafeResponse>, Status> {
        unimplemented()
    }

    async fn get_seq(&self, _: Request<GetSeqRequest>) -> Result<Response<GetSeqResponse>, Status> {
        unimplemented()
    }

    async fn get_seq_batch(
        &self,
        _: Request<GetSeqBatchRequest>,
    ) -> Result<Response<GetSeqBatchResponse>, Status> {
        unimplemented()
    }

    async fn acquire_lease(
        &self,
        _: Request<AcquireLeaseRequest>,
    ) -> Result<Response<AcquireLeaseResponse>, Status> {
        unimplemented()
    }

    async fn renew_lease(
        &self,
        _: Request<RenewLeaseRequest>,
    ) -> Result<Response<RenewLeaseResponse>, Status> {
        unimplemented()
    }

    async fn release_lease(
        &self,
        _: Request<ReleaseLeaseRequest>,
    ) -> Result<Response<ReleaseLeaseResponse>, Status> {
        unimplemented()
    }

    async fn get_safe_frontier(
        &self,
        _: Request<GetSafeFrontierRequest>,
    ) -> Result<Response<GetSafeFrontierResponse>, Status> {
        unimplemented()
    }
}
