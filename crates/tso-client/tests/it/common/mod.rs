//! A small real gRPC `TsoService` over loopback, for the client's tests, with the streaming
//! `GetTsStream` (`tso.stream.v1`) beside it unless a test asks for a plain `tsoracle.v1`
//! server ([`StreamSupport`]). Each server runs on
//! its own thread and tokio runtime, so stopping it closes every connection at once (like a
//! killed process) and the client's runtime holds only the client's own tasks.
//!
//! The allocator is correct (unique, increasing, never past 262143 logicals) and lives in
//! [`Shared`], which outlives a server: restarting on the same address continues above every
//! earlier grant, as a durable server would. So do its dense sequences: one counter per key,
//! each block granted from it. [`Mode`] makes it misbehave on purpose, for every RPC it
//! applies to.
//!
//! Stamping leases (SEMANTICS §14) are kept in [`Shared`] too: idempotent per holder and
//! holder epoch, superseded by a higher one; they never expire on their own, a test ends one
//! with [`Shared::expire_lease`]. A node in a "not leader" mode answers `GetSafeFrontier` with 0
//! and a zero epoch, as a follower does.

#![allow(dead_code)]

pub mod real;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};
use tso_core::{Epoch, LOGICAL_COUNT};
use tso_proto::LEADER_HINT_KEY;
use tso_proto::tso::stream::v1::tso_stream_server::{TsoStream, TsoStreamServer};
use tso_proto::tso::stream::v1::{
    TsStreamRefusal, TsStreamRequest, TsStreamResponse, ts_stream_response,
};
use tso_proto::v1::tso_service_server::{TsoService, TsoServiceServer};
use tso_proto::v1::*;

/// Generous bound for anything a test awaits: only a hang guard, never what a test measures.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// How a test server answers `GetTs`, `GetSeq` and `GetSeqBatch`.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Grants correctly.
    Leader,
    /// "not leader" with a hint naming `endpoint` at `epoch` (both optional, as on the wire).
    Follower {
        endpoint: Option<String>,
        epoch: Option<Epoch>,
    },
    /// "not leader" with a trailer that is not a `LeaderHint`.
    HintNotProtobuf,
    /// "not leader" with a hint whose endpoint is not `host:port`.
    HintBadEndpoint,
    /// Grants one timestamp (or sequence value) more than asked.
    CountMismatch,
    /// Grants a range that passes the last logical of the millisecond (`GetTs` only).
    LogicalOverflow,
    /// Answers sequence calls with a reply of the wrong shape (`GetTs` grants correctly).
    SeqMalformed(SeqFault),
    /// Answers every call with this status.
    Status(tonic::Code, &'static str),
    /// `UNAVAILABLE` this many times, then grants.
    UnavailableTimes(u32),
    /// "not leader" without a hint (an election) this many times, then grants.
    NoLeaderTimes(u32),
    /// Waits for a permit of [`Shared::release`] before granting.
    Stall,
    /// `INVALID_ARGUMENT`, as a server answers a count of 0.
    InvalidArgument,
    /// Stream replies carry the wrong request id (unary `GetTs` grants correctly).
    StreamWrongId,
}

/// Whether a test server offers the timestamp stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamSupport {
    /// `tso.stream.v1.TsoStream` beside `tsoracle.v1`, as the project's server.
    Offered,
    /// No such service: a plain `tsoracle.v1` server (gRPC answers `UNIMPLEMENTED`).
    Absent,
    /// The service answers every stream call `UNIMPLEMENTED` itself, counting the calls.
    Refused,
}

/// How [`Mode::SeqMalformed`] breaks a sequence reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqFault {
    /// The (first) grant names another key.
    WrongKey,
    /// The (first) block passes `u64::MAX`.
    Overflow,
    /// No epoch.
    NoEpoch,
    /// A batch's grants in reverse order.
    Reversed,
    /// A batch's last grant missing.
    Missing,
}

/// State that outlives one server incarnation.
pub struct Shared {
    mode: Mutex<Mode>,
    cursor: Mutex<(u64, u32)>,
    /// Each sequence key's next value.
    counters: Mutex<HashMap<String, u64>>,
    /// Every sequence request received, in arrival order: `(key, count)` per entry.
    seq_requests: Mutex<Vec<Vec<(String, u32)>>>,
    epoch: Epoch,
    rpcs: AtomicU64,
    counts: Mutex<Vec<u32>>,
    unary_calls: AtomicU64,
    stream_calls: AtomicU64,
    granted: AtomicU64,
    streams: StreamSupport,
    /// Bumped by [`Shared::end_streams`]: every open stream ends with `UNAVAILABLE`.
    stream_ends: watch::Sender<u64>,
    gate: Semaphore,
    arrived: Notify,
    leases: Mutex<Leases>,
}

/// The lease table of a test server.
#[derive(Default)]
struct Leases {
    next_id: u64,
    /// Every lease granted, by id.
    by_id: HashMap<u64, FakeLease>,
    /// Each holder's live lease id.
    live: HashMap<Vec<u8>, u64>,
    /// Every lease RPC received: `acquire`, `renew ID`, `release ID`, `frontier`.
    calls: Vec<String>,
}

#[derive(Clone, Debug)]
struct FakeLease {
    holder: Vec<u8>,
    holder_epoch: u64,
    ttl_ms: u64,
    ended: Option<&'static str>,
}

/// The frontier a leading test server answers.
pub const TEST_FRONTIER_MS: u64 = 1_234_567;

impl Shared {
    pub fn new(mode: Mode, epoch: Epoch) -> Arc<Self> {
        Self::with_streams(mode, epoch, StreamSupport::Offered)
    }

    pub fn with_streams(mode: Mode, epoch: Epoch, streams: StreamSupport) -> Arc<Self> {
        Arc::new(Self {
            mode: Mutex::new(mode),
            cursor: Mutex::new((0, 0)),
            counters: Mutex::new(HashMap::new()),
            seq_requests: Mutex::new(Vec::new()),
            epoch,
            rpcs: AtomicU64::new(0),
            counts: Mutex::new(Vec::new()),
            unary_calls: AtomicU64::new(0),
            stream_calls: AtomicU64::new(0),
            granted: AtomicU64::new(0),
            streams,
            stream_ends: watch::channel(0).0,
            gate: Semaphore::new(0),
            arrived: Notify::new(),
            leases: Mutex::new(Leases::default()),
        })
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// RPCs received so far (`GetTs` and sequences), in any mode.
    pub fn rpcs(&self) -> u64 {
        self.rpcs.load(Ordering::SeqCst)
    }

    /// The `count` of every `GetTs` received, unary or on a stream, in arrival order.
    pub fn counts(&self) -> Vec<u32> {
        self.counts.lock().unwrap().clone()
    }

    /// Unary `GetTs` RPCs received.
    pub fn unary_calls(&self) -> u64 {
        self.unary_calls.load(Ordering::SeqCst)
    }

    /// `GetTsStream` calls received (streams opened, or refused with [`StreamSupport::Refused`]).
    pub fn stream_calls(&self) -> u64 {
        self.stream_calls.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` stream calls have arrived.
    pub async fn wait_for_stream_calls(&self, n: u64) {
        loop {
            let notified = self.arrived.notified();
            if self.stream_calls() >= n {
                return;
            }
            notified.await;
        }
    }

    /// Ends every open stream with `UNAVAILABLE`, whatever its requests wait for.
    pub fn end_streams(&self) {
        self.stream_ends.send_modify(|n| *n += 1);
    }

    /// Timestamps granted so far, in every mode (broken replies included).
    pub fn granted(&self) -> u64 {
        self.granted.load(Ordering::SeqCst)
    }

    /// Every sequence request received, in arrival order.
    pub fn seq_requests(&self) -> Vec<Vec<(String, u32)>> {
        self.seq_requests.lock().unwrap().clone()
    }

    /// The next value of sequence `key` (0 for a key never granted).
    pub fn seq_next(&self, key: &str) -> u64 {
        self.counters.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    /// Every lease RPC received, in arrival order: `acquire`, `renew ID`, `release ID`,
    /// `frontier`.
    pub fn lease_calls(&self) -> Vec<String> {
        self.leases.lock().unwrap().calls.clone()
    }

    /// How many lease RPCs received start with `prefix`.
    pub fn lease_calls_of(&self, prefix: &str) -> usize {
        let leases = self.leases.lock().unwrap();
        leases
            .calls
            .iter()
            .filter(|c| c.starts_with(prefix))
            .count()
    }

    /// Ends lease `id` as if its TTL had passed: renewing it fails from now on.
    pub fn expire_lease(&self, id: u64) {
        let mut leases = self.leases.lock().unwrap();
        let lease = leases.by_id.get_mut(&id).expect("a lease of this server");
        lease.ended = Some("expired");
        let holder = lease.holder.clone();
        if leases.live.get(&holder) == Some(&id) {
            leases.live.remove(&holder);
        }
    }

    /// True while lease `id` was granted and not released.
    pub fn lease_exists(&self, id: u64) -> bool {
        self.leases.lock().unwrap().by_id.contains_key(&id)
    }

    /// Lets `n` stalled RPCs proceed.
    pub fn release(&self, n: usize) {
        self.gate.add_permits(n);
    }

    /// Waits until at least `n` RPCs have arrived.
    pub async fn wait_for_rpcs(&self, n: u64) {
        loop {
            let notified = self.arrived.notified();
            if self.rpcs() >= n {
                return;
            }
            notified.await;
        }
    }

    /// A correct grant: the cursor moves to the wall clock when it is ahead, and to the next
    /// millisecond when the logicals would overflow.
    fn grant(&self, count: u32) -> (u64, u32) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let mut cursor = self.cursor.lock().unwrap();
        if now_ms > cursor.0 {
            *cursor = (now_ms, 0);
        }
        if cursor.1 + count > LOGICAL_COUNT {
            *cursor = (cursor.0 + 1, 0);
        }
        let start = *cursor;
        cursor.1 += count;
        self.granted.fetch_add(u64::from(count), Ordering::SeqCst);
        start
    }

    /// Grants every `(key, count)` at once from the keys' counters: the starts, in order.
    fn grant_seq(&self, entries: &[(String, u32)]) -> Vec<u64> {
        let mut counters = self.counters.lock().unwrap();
        entries
            .iter()
            .map(|(key, count)| {
                let next = counters.entry(key.clone()).or_insert(0);
                let start = *next;
                *next += u64::from(*count);
                start
            })
            .collect()
    }

    fn epoch_wire(&self) -> Option<EpochWire> {
        Some(EpochWire {
            hi: self.epoch.hi(),
            lo: self.epoch.lo(),
        })
    }

    /// Takes one step of a counting mode: true while the misbehaviour lasts.
    fn count_down(&self) -> bool {
        let mut mode = self.mode.lock().unwrap();
        match &mut *mode {
            Mode::UnavailableTimes(n) | Mode::NoLeaderTimes(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Records one `GetTs` request, unary or on a stream.
    fn arrived_ts(&self, count: u32) {
        self.counts.lock().unwrap().push(count);
        self.rpcs.fetch_add(1, Ordering::SeqCst);
        self.arrived.notify_waiters();
    }

    fn reply(&self, physical_ms: u64, logical_start: u32, count: u32) -> GetTsResponse {
        GetTsResponse {
            physical_ms,
            logical_start,
            count,
            epoch_hi: self.epoch.hi(),
            epoch_lo: self.epoch.lo(),
        }
    }
}

fn not_leader(trailer: Option<Vec<u8>>) -> Status {
    let mut metadata = MetadataMap::new();
    if let Some(bytes) = trailer {
        metadata.insert_bin(LEADER_HINT_KEY, MetadataValue::from_bytes(&bytes));
    }
    Status::with_metadata(tonic::Code::FailedPrecondition, "not leader", metadata)
}

fn hint(endpoint: Option<String>, epoch: Option<Epoch>) -> Vec<u8> {
    LeaderHint {
        leader_endpoint: endpoint,
        leader_epoch: epoch.map(|e| EpochWire {
            hi: e.hi(),
            lo: e.lo(),
        }),
    }
    .encode_to_vec()
}

struct Service(Arc<Shared>);

impl Service {
    async fn get_ts(&self, count: u32) -> Result<GetTsResponse, Status> {
        let shared = &self.0;
        let mode = shared.mode.lock().unwrap().clone();
        match mode {
            Mode::Leader => {}
            Mode::Follower { endpoint, epoch } => {
                return Err(not_leader(Some(hint(endpoint, epoch))));
            }
            Mode::HintNotProtobuf => return Err(not_leader(Some(vec![0x0a, 0x05, b'a']))),
            Mode::HintBadEndpoint => {
                return Err(not_leader(Some(hint(Some("::garbage::".into()), None))));
            }
            Mode::CountMismatch => {
                let (p, l) = shared.grant(count + 1);
                return Ok(shared.reply(p, l, count + 1));
            }
            Mode::LogicalOverflow => return Ok(shared.reply(1, LOGICAL_COUNT - 1, count.max(2))),
            Mode::UnavailableTimes(_) if shared.count_down() => {
                return Err(Status::unavailable("transient consensus error"));
            }
            Mode::NoLeaderTimes(_) if shared.count_down() => {
                return Err(not_leader(Some(hint(None, None))));
            }
            Mode::UnavailableTimes(_)
            | Mode::NoLeaderTimes(_)
            | Mode::SeqMalformed(_)
            | Mode::StreamWrongId => {}
            Mode::Stall => shared.gate.acquire().await.expect("gate open").forget(),
            Mode::InvalidArgument => return Err(Status::invalid_argument("count out of range")),
            Mode::Status(code, message) => return Err(Status::new(code, message)),
        }
        if count == 0 || count > LOGICAL_COUNT {
            return Err(Status::invalid_argument(format!("count {count}")));
        }
        let (p, l) = shared.grant(count);
        Ok(shared.reply(p, l, count))
    }
}

/// A sequence grant before the mode breaks it: `(key, start, count)` per entry.
type SeqGrants = Vec<(String, u64, u32)>;

impl Service {
    /// What every sequence RPC does before it grants: refuse, stall, or break the reply.
    async fn seq_gate(&self, entries: &[(String, u32)]) -> Result<Option<SeqFault>, Status> {
        let shared = &self.0;
        let mode = shared.mode.lock().unwrap().clone();
        match mode {
            Mode::Leader | Mode::CountMismatch | Mode::LogicalOverflow | Mode::StreamWrongId => {}
            Mode::Follower { endpoint, epoch } => {
                return Err(not_leader(Some(hint(endpoint, epoch))));
            }
            Mode::HintNotProtobuf => return Err(not_leader(Some(vec![0x0a, 0x05, b'a']))),
            Mode::HintBadEndpoint => {
                return Err(not_leader(Some(hint(Some("::garbage::".into()), None))));
            }
            Mode::UnavailableTimes(_) if shared.count_down() => {
                return Err(Status::unavailable("the durable write failed"));
            }
            Mode::NoLeaderTimes(_) if shared.count_down() => {
                return Err(not_leader(Some(hint(None, None))));
            }
            Mode::UnavailableTimes(_) | Mode::NoLeaderTimes(_) => {}
            Mode::Stall => shared.gate.acquire().await.expect("gate open").forget(),
            Mode::InvalidArgument => return Err(Status::invalid_argument("key out of range")),
            Mode::Status(code, message) => return Err(Status::new(code, message)),
            Mode::SeqMalformed(fault) => return Ok(Some(fault)),
        }
        if entries.iter().any(|(k, c)| k.is_empty() || *c == 0) {
            return Err(Status::invalid_argument("empty key or zero count"));
        }
        Ok(None)
    }

    /// Grants `entries` and breaks the grants as the mode says.
    fn seq_grants(&self, entries: &[(String, u32)], fault: Option<SeqFault>) -> SeqGrants {
        let starts = self.0.grant_seq(entries);
        let extra = u32::from(matches!(*self.0.mode.lock().unwrap(), Mode::CountMismatch));
        let mut grants: SeqGrants = entries
            .iter()
            .zip(starts)
            .map(|((key, count), start)| (key.clone(), start, count + extra))
            .collect();
        match fault {
            None | Some(SeqFault::NoEpoch) => {}
            Some(SeqFault::WrongKey) => grants[0].0.push_str("-other"),
            Some(SeqFault::Overflow) => grants[0].1 = u64::MAX - u64::from(grants[0].2) + 1,
            Some(SeqFault::Reversed) => grants.reverse(),
            Some(SeqFault::Missing) => drop(grants.pop()),
        }
        grants
    }

    fn epoch_for(&self, fault: Option<SeqFault>) -> Option<EpochWire> {
        match fault {
            Some(SeqFault::NoEpoch) => None,
            _ => self.0.epoch_wire(),
        }
    }

    fn arrived_seq(&self, entries: &[(String, u32)]) {
        let shared = &self.0;
        shared.seq_requests.lock().unwrap().push(entries.to_vec());
        shared.rpcs.fetch_add(1, Ordering::SeqCst);
        shared.arrived.notify_waiters();
    }
}

/// A request key as text, whether the generated field is `bytes` or `string`.
fn key_text(key: impl AsRef<[u8]>) -> String {
    String::from_utf8_lossy(key.as_ref()).into_owned()
}

#[tonic::async_trait]
impl TsoService for Service {
    async fn get_ts(
        &self,
        request: Request<GetTsRequest>,
    ) -> Result<Response<GetTsResponse>, Status> {
        let count = request.get_ref().count;
        self.0.unary_calls.fetch_add(1, Ordering::SeqCst);
        self.0.arrived_ts(count);
        Service::get_ts(self, count).await.map(Response::new)
    }

    async fn get_current_max_safe(
        &self,
        _: Request<GetCurrentMaxSafeRequest>,
    ) -> Result<Response<GetCurrentMaxSafeResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn get_seq(
        &self,
        request: Request<GetSeqRequest>,
    ) -> Result<Response<GetSeqResponse>, Status> {
        let request = request.into_inner();
        let entries = [(key_text(request.key), request.count)];
        self.arrived_seq(&entries);
        let fault = self.seq_gate(&entries).await?;
        let (key, start, count) = self.seq_grants(&entries, fault).remove(0);
        Ok(Response::new(GetSeqResponse {
            key,
            start,
            count,
            epoch: self.epoch_for(fault),
        }))
    }

    async fn get_seq_batch(
        &self,
        request: Request<GetSeqBatchRequest>,
    ) -> Result<Response<GetSeqBatchResponse>, Status> {
        let entries: Vec<(String, u32)> = request
            .into_inner()
            .entries
            .into_iter()
            .map(|e| (key_text(e.key), e.count))
            .collect();
        self.arrived_seq(&entries);
        let fault = self.seq_gate(&entries).await?;
        let grants = self.seq_grants(&entries, fault).into_iter();
        let grants = grants.map(|(key, start, count)| SeqGrantEntry { key, start, count });
        Ok(Response::new(GetSeqBatchResponse {
            grants: grants.collect(),
            epoch: self.epoch_for(fault),
        }))
    }

    async fn acquire_lease(
        &self,
        request: Request<AcquireLeaseRequest>,
    ) -> Result<Response<AcquireLeaseResponse>, Status> {
        self.lease_gate("acquire".into()).await?;
        self.acquire(request.into_inner()).map(Response::new)
    }

    async fn renew_lease(
        &self,
        request: Request<RenewLeaseRequest>,
    ) -> Result<Response<RenewLeaseResponse>, Status> {
        let lease_id = request.get_ref().lease_id;
        self.lease_gate(format!("renew {lease_id}")).await?;
        self.renew(lease_id).map(Response::new)
    }

    async fn release_lease(
        &self,
        request: Request<ReleaseLeaseRequest>,
    ) -> Result<Response<ReleaseLeaseResponse>, Status> {
        let lease_id = request.get_ref().lease_id;
        self.lease_gate(format!("release {lease_id}")).await?;
        let mut leases = self.0.leases.lock().unwrap();
        let removed = leases.by_id.remove(&lease_id);
        let live = removed.filter(|lease| leases.live.get(&lease.holder) == Some(&lease_id));
        if let Some(lease) = live {
            leases.live.remove(&lease.holder);
        }
        Ok(Response::new(ReleaseLeaseResponse {}))
    }

    async fn get_safe_frontier(
        &self,
        _: Request<GetSafeFrontierRequest>,
    ) -> Result<Response<GetSafeFrontierResponse>, Status> {
        let zero = GetSafeFrontierResponse {
            frontier_physical_ms: 0,
            epoch_hi: 0,
            epoch_lo: 0,
        };
        match self.lease_gate("frontier".into()).await {
            Ok(()) => Ok(Response::new(GetSafeFrontierResponse {
                frontier_physical_ms: TEST_FRONTIER_MS,
                epoch_hi: self.0.epoch.hi(),
                epoch_lo: self.0.epoch.lo(),
            })),
            // A node that does not lead answers 0 with a zero epoch, never "not leader".
            Err(status) if status.message() == "not leader" => Ok(Response::new(zero)),
            Err(status) => Err(status),
        }
    }
}

/// The time on this machine's wall clock, as a leader reads it.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

impl Service {
    /// What every lease RPC does first: record it, then refuse or stall as the mode says.
    async fn lease_gate(&self, call: String) -> Result<(), Status> {
        let shared = &self.0;
        shared.leases.lock().unwrap().calls.push(call);
        shared.rpcs.fetch_add(1, Ordering::SeqCst);
        shared.arrived.notify_waiters();
        let mode = shared.mode.lock().unwrap().clone();
        match mode {
            Mode::Follower { endpoint, epoch } => Err(not_leader(Some(hint(endpoint, epoch)))),
            Mode::HintNotProtobuf => Err(not_leader(Some(vec![0x0a, 0x05, b'a']))),
            Mode::HintBadEndpoint => Err(not_leader(Some(hint(Some("::garbage::".into()), None)))),
            Mode::UnavailableTimes(_) if shared.count_down() => {
                Err(Status::unavailable("the durable write failed"))
            }
            Mode::NoLeaderTimes(_) if shared.count_down() => {
                Err(not_leader(Some(hint(None, None))))
            }
            Mode::Stall => {
                shared.gate.acquire().await.expect("gate open").forget();
                Ok(())
            }
            Mode::InvalidArgument => Err(Status::invalid_argument("ttl out of range")),
            Mode::Status(code, message) => Err(Status::new(code, message)),
            Mode::Leader
            | Mode::CountMismatch
            | Mode::LogicalOverflow
            | Mode::StreamWrongId
            | Mode::SeqMalformed(_)
            | Mode::UnavailableTimes(_)
            | Mode::NoLeaderTimes(_) => Ok(()),
        }
    }

    fn acquire(&self, request: AcquireLeaseRequest) -> Result<AcquireLeaseResponse, Status> {
        let holder = request.holder.to_vec();
        if holder.is_empty() || holder.len() > 128 || request.ttl_ms == 0 {
            return Err(Status::invalid_argument("bad holder or ttl"));
        }
        let mut leases = self.0.leases.lock().unwrap();
        let live = leases.live.get(&holder).copied();
        if let Some(id) = live {
            let lease = leases.by_id[&id].clone();
            if request.holder_epoch < lease.holder_epoch {
                return Err(Status::failed_precondition(format!(
                    "holder_epoch {} is below {}",
                    request.holder_epoch, lease.holder_epoch
                )));
            }
            if request.holder_epoch == lease.holder_epoch {
                return Ok(self.acquired(id, lease.ttl_ms));
            }
            leases.by_id.get_mut(&id).unwrap().ended = Some("superseded");
        }
        leases.next_id += 1;
        let id = leases.next_id;
        let lease = FakeLease {
            holder: holder.clone(),
            holder_epoch: request.holder_epoch,
            ttl_ms: request.ttl_ms,
            ended: None,
        };
        leases.by_id.insert(id, lease);
        leases.live.insert(holder, id);
        Ok(self.acquired(id, request.ttl_ms))
    }

    fn acquired(&self, lease_id: u64, ttl_ms: u64) -> AcquireLeaseResponse {
        let now = now_ms();
        AcquireLeaseResponse {
            lease_id,
            ts_upper_bound: now + ttl_ms,
            expires_at_ms: now + ttl_ms,
            epoch: self.0.epoch_wire(),
        }
    }

    fn renew(&self, lease_id: u64) -> Result<RenewLeaseResponse, Status> {
        let leases = self.0.leases.lock().unwrap();
        let lease = leases
            .by_id
            .get(&lease_id)
            .ok_or_else(|| Status::not_found(format!("no lease {lease_id}")))?;
        if let Some(ended) = lease.ended {
            return Err(Status::failed_precondition(format!(
                "lease {lease_id} {ended}"
            )));
        }
        let now = now_ms();
        Ok(RenewLeaseResponse {
            ts_upper_bound: now + lease.ttl_ms,
            expires_at_ms: now + lease.ttl_ms,
            epoch: self.0.epoch_wire(),
        })
    }
}

/// The streaming `GetTs` over the same allocator and modes: requests answered one by one in
/// order, each as unary `GetTs` would answer it (an error status becomes a refusal); "not
/// leader" is the last reply, as on the project's server.
#[tonic::async_trait]
impl TsoStream for Service {
    type GetTsStreamStream = ReceiverStream<Result<TsStreamResponse, Status>>;

    async fn get_ts_stream(
        &self,
        request: Request<Streaming<TsStreamRequest>>,
    ) -> Result<Response<Self::GetTsStreamStream>, Status> {
        self.0.stream_calls.fetch_add(1, Ordering::SeqCst);
        self.0.arrived.notify_waiters();
        if self.0.streams == StreamSupport::Refused {
            return Err(Status::unimplemented("no stream here"));
        }
        let (replies, outbound) = mpsc::channel(4);
        let service = Service(Arc::clone(&self.0));
        tokio::spawn(async move {
            let mut ends = service.0.stream_ends.subscribe();
            tokio::select! {
                _ = ends.changed() => {
                    let _ = replies.send(Err(Status::unavailable("stream ended by the test"))).await;
                }
                _ = service.stream(request.into_inner(), &replies) => {}
            }
        });
        Ok(Response::new(ReceiverStream::new(outbound)))
    }
}

type StreamReplies = mpsc::Sender<Result<TsStreamResponse, Status>>;

impl Service {
    async fn stream(&self, mut inbound: Streaming<TsStreamRequest>, replies: &StreamReplies) {
        while let Ok(Some(request)) = inbound.message().await {
            self.0.arrived_ts(request.count);
            let mut request_id = request.request_id;
            if matches!(*self.0.mode.lock().unwrap(), Mode::StreamWrongId) {
                request_id += 1;
            }
            let (result, last) = match Service::get_ts(self, request.count).await {
                Ok(grant) => (ts_stream_response::Result::Grant(grant), false),
                Err(status) => refusal(&status),
            };
            let reply = TsStreamResponse {
                request_id,
                result: Some(result),
            };
            if replies.send(Ok(reply)).await.is_err() || last {
                return;
            }
        }
    }
}

/// A unary status as a stream refusal, and whether it ends the stream ("not leader"). A hint
/// trailer that is not a `LeaderHint` becomes a hint whose endpoint is not `host:port`.
fn refusal(status: &Status) -> (ts_stream_response::Result, bool) {
    let not_leader = status.code() == tonic::Code::FailedPrecondition;
    let hint = status.metadata().get_bin(LEADER_HINT_KEY).map(|value| {
        let bytes = value.to_bytes().unwrap();
        LeaderHint::decode(bytes).unwrap_or(LeaderHint {
            leader_endpoint: Some("::garbage::".into()),
            leader_epoch: None,
        })
    });
    let refusal = TsStreamRefusal {
        code: status.code() as i32,
        message: status.message().into(),
        hint,
    };
    (ts_stream_response::Result::Refusal(refusal), not_leader)
}

/// One running server. Dropping it stops it.
pub struct TestServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    /// A server in `mode` at epoch 1 on a fresh loopback port, with the stream.
    pub fn start(mode: Mode) -> Self {
        Self::start_streams(mode, StreamSupport::Offered)
    }

    /// A server in `mode` at epoch 1 on a fresh loopback port, with `streams`.
    pub fn start_streams(mode: Mode, streams: StreamSupport) -> Self {
        Self::start_with(
            Shared::with_streams(mode, Epoch::new(1), streams),
            "127.0.0.1:0".parse().unwrap(),
        )
    }

    /// A server over `shared` on `addr` (port 0 picks a free one; a used port is re-bound).
    pub fn start_with(shared: Arc<Shared>, addr: SocketAddr) -> Self {
        let (stop, stopped) = oneshot::channel();
        let (bound, bound_rx) = std::sync::mpsc::channel();
        let service = TsoServiceServer::new(Service(Arc::clone(&shared)));
        let stream = (shared.streams != StreamSupport::Absent)
            .then(|| TsoStreamServer::new(Service(Arc::clone(&shared))));
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(serve(service, stream, addr, bound, stopped));
        });
        let addr = bound_rx.recv().expect("the server thread binds or panics");
        Self {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:port`, without a scheme, as a user would configure it.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops the server and closes its connections; returns once the port is free.
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

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

async fn serve(
    service: TsoServiceServer<Service>,
    stream: Option<TsoStreamServer<Service>>,
    addr: SocketAddr,
    bound: std::sync::mpsc::Sender<SocketAddr>,
    stopped: oneshot::Receiver<()>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).expect("bind the test server");
    let listener = socket.listen(1024).unwrap();
    bound.send(listener.local_addr().unwrap()).unwrap();
    let server = tonic::transport::Server::builder()
        .add_service(service)
        .add_optional_service(stream)
        .serve_with_incoming(TcpListenerStream::new(listener));
    // Not graceful on purpose: returning drops the runtime and every connection with it.
    tokio::select! {
        result = server => result.expect("test server failed"),
        _ = stopped => {}
    }
}

/// An address that refuses connections: a socket bound but never listening, which keeps any
/// other test from taking the port while this value lives.
pub struct DeadEndpoint {
    socket: tokio::net::TcpSocket,
}

impl DeadEndpoint {
    pub fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        Self { socket }
    }

    pub fn endpoint(&self) -> String {
        self.socket.local_addr().unwrap().to_string()
    }
}

/// An address that accepts connections and closes them at once, before any HTTP/2 exchange: a
/// transport failure on every attempt, counted so a test can see which endpoints were tried.
/// Runs on its own thread and runtime, like [`TestServer`]; dropping it stops it.
pub struct ResetEndpoint {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ResetEndpoint {
    pub fn start() -> Self {
        let connections = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = oneshot::channel::<()>();
        let (bound, bound_rx) = std::sync::mpsc::channel();
        let counter = Arc::clone(&connections);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                bound.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            counter.fetch_add(1, Ordering::SeqCst);
                            drop(accepted);
                        }
                        _ = &mut stopped => break,
                    }
                }
            });
        });
        let addr = bound_rx
            .recv()
            .expect("the endpoint thread binds or panics");
        Self {
            addr,
            connections,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted (and closed) so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for ResetEndpoint {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("endpoint thread panicked");
        }
    }
}

/// The seed of a randomized test: `TSO_TEST_SEED` when set, else the clock. Printed so a
/// failure can be replayed.
pub fn seed() -> u64 {
    let seed = std::env::var("TSO_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("seed: {seed} (replay with TSO_TEST_SEED={seed})");
    seed
}

pub use tso_testkit::topic;
