//! A scripted `tsoracle.v1` server for the lease commands (`tso lease`, `tso frontier`): a
//! leader that grants leases with fixed bounds (lease ids from 1, bound and expiry
//! `LEASE_BOUND_MS`, epoch 1) and knows the ones it granted, or a follower that answers the
//! frontier with 0 and a zero epoch and everything else with "not leader" and no hint. It runs
//! on its own thread and runtime, and stops when dropped.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::thread::JoinHandle;

use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tso_proto::v1::tso_service_server::{TsoService, TsoServiceServer};
use tso_proto::v1::*;

/// The bound and expiry of every grant, and the leader's frontier.
pub const LEASE_BOUND_MS: u64 = 1_700_000_010_000;
pub const FRONTIER_MS: u64 = 1_700_000_000_000;

pub struct LeaseServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl LeaseServer {
    /// A leader (`leading`) or a follower that knows no leader, on a free loopback port.
    pub fn start(leading: bool) -> LeaseServer {
        let (stop, stopped) = oneshot::channel();
        let (bound, bound_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the lease server");
            runtime.block_on(serve(leading, bound, stopped));
        });
        let addr = bound_rx.recv().expect("the server thread binds or panics");
        LeaseServer {
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

impl Drop for LeaseServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    leading: bool,
    bound: std::sync::mpsc::Sender<SocketAddr>,
    stopped: oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the lease server");
    bound.send(listener.local_addr().unwrap()).unwrap();
    let service = TsoServiceServer::new(Leases {
        leading,
        granted: Mutex::new(HashSet::new()),
    });
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
            let _ = stopped.await;
        });
    server.await.expect("the lease server failed");
}

struct Leases {
    leading: bool,
    granted: Mutex<HashSet<u64>>,
}

impl Leases {
    fn lead(&self) -> Result<(), Status> {
        if self.leading {
            Ok(())
        } else {
            Err(Status::failed_precondition("not leader"))
        }
    }
}

fn epoch() -> Option<EpochWire> {
    Some(EpochWire { hi: 0, lo: 1 })
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("lease test server"))
}

#[tonic::async_trait]
impl TsoService for Leases {
    async fn get_ts(&self, _: Request<GetTsRequest>) -> Result<Response<GetTsResponse>, Status> {
        unimplemented()
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
        request: Request<AcquireLeaseRequest>,
    ) -> Result<Response<AcquireLeaseResponse>, Status> {
        self.lead()?;
        if request.get_ref().ttl_ms < 5_000 {
            return Err(Status::invalid_argument(
                "ttl_ms is below the floor of 5000",
            ));
        }
        let mut granted = self.granted.lock().unwrap();
        let lease_id = granted.len() as u64 + 1;
        granted.insert(lease_id);
        Ok(Response::new(AcquireLeaseResponse {
            lease_id,
            ts_upper_bound: LEASE_BOUND_MS,
            expires_at_ms: LEASE_BOUND_MS,
            epoch: epoch(),
        }))
    }

    async fn renew_lease(
        &self,
        request: Request<RenewLeaseRequest>,
    ) -> Result<Response<RenewLeaseResponse>, Status> {
        self.lead()?;
        let lease_id = request.get_ref().lease_id;
        if !self.granted.lock().unwrap().contains(&lease_id) {
            return Err(Status::not_found(format!("no lease {lease_id}")));
        }
        Ok(Response::new(RenewLeaseResponse {
            ts_upper_bound: LEASE_BOUND_MS,
            expires_at_ms: LEASE_BOUND_MS,
            epoch: epoch(),
        }))
    }

    async fn release_lease(
        &self,
        _: Request<ReleaseLeaseRequest>,
    ) -> Result<Response<ReleaseLeaseResponse>, Status> {
        self.lead()?;
        Ok(Response::new(ReleaseLeaseResponse {}))
    }

    async fn get_safe_frontier(
        &self,
        _: Request<GetSafeFrontierRequest>,
    ) -> Result<Response<GetSafeFrontierResponse>, Status> {
        let (frontier_physical_ms, epoch_lo) = if self.leading {
            (FRONTIER_MS, 1)
        } else {
            (0, 0)
        };
        Ok(Response::new(GetSafeFrontierResponse {
            frontier_physical_ms,
            epoch_hi: 0,
            epoch_lo,
        }))
    }
}
