//! A scripted `tsoracle.v1` server for the sequence commands (`tso seq`, `tso bench --rpc
//! seq`): correct per-key counters, or broken on purpose ([`SeqMode`]) so that the checks can
//! be seen to catch overlaps (D1) and gaps (D2). `GetTs` is not implemented. It runs on its own
//! thread and runtime, and stops when dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::thread::JoinHandle;

use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tso_proto::v1::tso_service_server::{TsoService, TsoServiceServer};
use tso_proto::v1::*;

/// How the server answers `GetSeq` and `GetSeqBatch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqMode {
    /// Dense, disjoint blocks per key.
    Correct,
    /// Every block starts at 0: blocks of a key overlap.
    Overlap,
    /// One value skipped before every block after a key's first.
    Gap,
    /// `UNAVAILABLE` to everything: every call is uncertain.
    Unavailable,
}

pub struct SeqServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl SeqServer {
    /// Serves in `mode` on a free loopback port.
    pub fn start(mode: SeqMode) -> SeqServer {
        let (stop, stopped) = oneshot::channel();
        let (bound, bound_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the sequence server");
            runtime.block_on(serve(mode, bound, stopped));
        });
        let addr = bound_rx.recv().expect("the server thread binds or panics");
        SeqServer {
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

impl Drop for SeqServer {
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
    mode: SeqMode,
    bound: std::sync::mpsc::Sender<SocketAddr>,
    stopped: oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding the sequence server");
    bound.send(listener.local_addr().unwrap()).unwrap();
    let service = TsoServiceServer::new(Sequences {
        mode,
        next: Mutex::new(HashMap::new()),
    });
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
            let _ = stopped.await;
        });
    server.await.expect("the sequence server failed");
}

struct Sequences {
    mode: SeqMode,
    next: Mutex<HashMap<String, u64>>,
}

impl Sequences {
    /// The start of a block of `count` values of `key`, as the mode makes it.
    fn grant(&self, key: &str, count: u32) -> Result<u64, Status> {
        if key.is_empty() || count == 0 {
            return Err(Status::invalid_argument("empty key or zero count"));
        }
        let mut next = self.next.lock().unwrap();
        let seen = next.contains_key(key);
        let cursor = next.entry(key.to_string()).or_insert(0);
        match self.mode {
            SeqMode::Unavailable => return Err(Status::unavailable("the durable write failed")),
            SeqMode::Overlap => return Ok(0),
            SeqMode::Gap if seen => *cursor += 1,
            SeqMode::Gap | SeqMode::Correct => {}
        }
        let start = *cursor;
        *cursor += u64::from(count);
        Ok(start)
    }
}

fn epoch() -> Option<EpochWire> {
    Some(EpochWire { hi: 0, lo: 1 })
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("sequence test server"))
}

#[tonic::async_trait]
impl TsoService for Sequences {
    async fn get_ts(&self, _: Request<GetTsRequest>) -> Result<Response<GetTsResponse>, Status> {
        unimplemented()
    }

    async fn get_current_max_safe(
        &self,
        _: Request<GetCurrentMaxSafeRequest>,
    ) -> Result<Response<GetCurrentMaxSafeResponse>, Status> {
        unimplemented()
    }

    async fn get_seq(
        &self,
        request: Request<GetSeqRequest>,
    ) -> Result<Response<GetSeqResponse>, Status> {
        let request = request.into_inner();
        let key = String::from_utf8_lossy(request.key.as_ref()).into_owned();
        let start = self.grant(&key, request.count)?;
        Ok(Response::new(GetSeqResponse {
            key,
            start,
            count: request.count,
            epoch: epoch(),
        }))
    }

    async fn get_seq_batch(
        &self,
        request: Request<GetSeqBatchRequest>,
    ) -> Result<Response<GetSeqBatchResponse>, Status> {
        let mut grants = Vec::new();
        for entry in request.into_inner().entries {
            let key = String::from_utf8_lossy(entry.key.as_ref()).into_owned();
            let start = self.grant(&key, entry.count)?;
            grants.push(SeqGrantEntry {
                key,
                start,
                count: entry.count,
            });
        }
        Ok(Response::new(GetSeqBatchResponse {
            grants,
            epoch: epoch(),
        }))
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
