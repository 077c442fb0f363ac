//! Piggyback mode: a host service that already runs openraft embeds the oracle.
//!
//! The host here is a small replicated key-value store. Its raft log carries both its own
//! `Put` commands and the oracle's [`OracleCommand`]; its state machine holds the map and an
//! [`OracleState`]; one snapshot covers both. Each node runs one tonic server with the
//! oracle's `TsoService` and the store's own `Kv` service. The three nodes live in one process
//! and reach each other's raft through an in-process [`Router`] (a real host would use its own
//! network). Storage is in memory, to keep the example short; a real host's is durable.
//!
//! Run: `cargo run -p tso-server --example piggyback`
//!
//! `tests/it/piggyback.rs` includes this file and drives the same cluster.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io::Cursor;
use std::net::SocketAddr;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};

use openraft::error::{
    ClientWriteError, InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, EntryPayload, LogId, LogState, RaftLogId, RaftLogReader, RaftNetwork,
    RaftNetworkFactory, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership, Vote,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tso_proto::tso::example_kv_v1::kv_server::{Kv, KvServer};
use tso_proto::tso::example_kv_v1::{GetReply, GetRequest, PutReply, PutRequest};
use tso_server::backend::raft::piggyback::{
    LeaderLeaseHeld, OracleCommand, OracleState, PiggybackBackend, VoteGate,
};
use tso_server::{Config, OracleGuard};

/// The host's app data: its own command, or the oracle's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Cmd {
    Put { key: String, value: String },
    Oracle(OracleCommand),
}

openraft::declare_raft_types!(
    /// The host's raft types. `BasicNode::addr` is the node's client address (its tonic server,
    /// serving both the oracle and the store), so hints come from the membership.
    pub KvConfig:
        D = Cmd,
        R = (),
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<KvConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<KvConfig>;
type Entry = openraft::Entry<KvConfig>;

/// The replicated state: the host's map and the oracle's state. A snapshot is this.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvState {
    pub kv: BTreeMap<String, String>,
    pub oracle: OracleState,
}

// ---- log storage (in memory) ----

#[derive(Debug, Default)]
struct LogInner {
    vote: Option<Vote<u64>>,
    log: BTreeMap<u64, Entry>,
    purged: Option<LogId<u64>>,
}

/// The host's raft log, in memory; clones share it.
#[derive(Debug, Clone, Default)]
pub struct LogStore(Arc<Mutex<LogInner>>);

impl LogStore {
    /// The commands in the log (not purged yet), in log order.
    pub fn commands(&self) -> Vec<Cmd> {
        let inner = self.0.lock().unwrap();
        let normal = |e: &Entry| match &e.payload {
            EntryPayload::Normal(cmd) => Some(cmd.clone()),
            _ => None,
        };
        inner.log.values().filter_map(normal).collect()
    }
}

impl RaftLogReader<KvConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<u64>> {
        let inner = self.0.lock().unwrap();
        Ok(inner.log.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<KvConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<KvConfig>, StorageError<u64>> {
        let inner = self.0.lock().unwrap();
        let last = inner.log.values().next_back().map(|e| *e.get_log_id());
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id: last.or(inner.purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        self.0.lock().unwrap().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        Ok(self.0.lock().unwrap().vote)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<KvConfig>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.0.lock().unwrap();
        for e in entries {
            inner.log.insert(e.log_id.index, e);
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        self.0.lock().unwrap().log.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mut inner = self.0.lock().unwrap();
        inner.log = inner.log.split_off(&(log_id.index + 1));
        inner.purged = Some(log_id);
        Ok(())
    }
}

// ---- state machine: the map and the oracle's state ----

#[derive(Debug, Default)]
struct SmInner {
    last_applied: Option<LogId<u64>>,
    membership: StoredMembership<u64, BasicNode>,
    state: KvState,
    snapshot: Option<(SnapshotMeta<u64, BasicNode>, Vec<u8>)>,
    built: u64,
}

/// The host's state machine; clones share it.
#[derive(Debug, Clone, Default)]
pub struct StateMachine(Arc<Mutex<SmInner>>);

impl StateMachine {
    /// The applied state (the map and the oracle's state).
    pub fn state(&self) -> KvState {
        self.0.lock().unwrap().state.clone()
    }

    /// Calls `f` with the applied oracle state, in place: what the oracle's adapter reads.
    pub fn with_oracle(&self, f: &mut dyn FnMut(&OracleState)) {
        f(&self.0.lock().unwrap().state.oracle)
    }

    pub fn high_water_ms(&self) -> u64 {
        self.0.lock().unwrap().state.oracle.high_water_ms
    }

    /// The current snapshot's metadata and bytes, if one was built or installed.
    pub fn current_snapshot(&self) -> Option<(SnapshotMeta<u64, BasicNode>, Vec<u8>)> {
        self.0.lock().unwrap().snapshot.clone()
    }
}

/// Decodes a snapshot's bytes: both the map and the oracle's state.
pub fn decode_snapshot(data: &[u8]) -> Option<KvState> {
    postcard::from_bytes(data).ok()
}

fn snapshot_of(meta: SnapshotMeta<u64, BasicNode>, data: Vec<u8>) -> openraft::Snapshot<KvConfig> {
    openraft::Snapshot {
        meta,
        snapshot: Box::new(Cursor::new(data)),
    }
}

impl RaftSnapshotBuilder<KvConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<openraft::Snapshot<KvConfig>, StorageError<u64>> {
        let mut inner = self.0.lock().unwrap();
        inner.built += 1;
        let data = postcard::to_stdvec(&inner.state).expect("the state encodes");
        let meta = SnapshotMeta {
            last_log_id: inner.last_applied,
            last_membership: inner.membership.clone(),
            snapshot_id: format!("{:?}-{}", inner.last_applied.map(|l| l.index), inner.built),
        };
        inner.snapshot = Some((meta.clone(), data.clone()));
        Ok(snapshot_of(meta, data))
    }
}

impl RaftStateMachine<KvConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, BasicNode>), StorageError<u64>> {
        let inner = self.0.lock().unwrap();
        Ok((inner.last_applied, inner.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.0.lock().unwrap();
        let mut replies = Vec::new();
        for entry in entries {
            inner.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(Cmd::Put { key, value }) => {
                    inner.state.kv.insert(key, value);
                }
                EntryPayload::Normal(Cmd::Oracle(cmd)) => {
                    inner.state.oracle.apply(&cmd);
                }
                EntryPayload::Membership(m) => {
                    inner.membership = StoredMembership::new(Some(entry.log_id), m);
                }
            }
            replies.push(());
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let data = snapshot.into_inner();
        let state = decode_snapshot(&data).ok_or_else(|| {
            let e = std::io::Error::other("snapshot does not decode");
            StorageIOError::read_snapshot(Some(meta.signature()), &e)
        })?;
        let mut inner = self.0.lock().unwrap();
        inner.state = state;
        inner.last_applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.snapshot = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<openraft::Snapshot<KvConfig>>, StorageError<u64>> {
        let inner = self.0.lock().unwrap();
        Ok(inner.snapshot.clone().map(|(m, d)| snapshot_of(m, d)))
    }
}

// ---- in-process raft network ----

/// One reachable node: its raft, and the oracle's vote gate once the oracle runs on it.
#[derive(Clone)]
struct Target {
    raft: Raft,
    votes: Option<VoteGate>,
}

/// Delivers raft messages by calling the target node's `Raft` directly.
#[derive(Clone, Default)]
pub struct Router(Arc<Mutex<BTreeMap<u64, Target>>>);

impl Router {
    /// Makes node `id` reachable at `raft`.
    pub fn add(&self, id: u64, raft: Raft) {
        let target = Target { raft, votes: None };
        self.0.lock().unwrap().insert(id, target);
    }

    /// Routes the vote requests node `id` receives through the oracle's gate (a node without
    /// the oracle's lease has nothing to protect, so until then votes go straight to raft).
    pub fn gate_votes(&self, id: u64, votes: VoteGate) {
        if let Some(t) = self.0.lock().unwrap().get_mut(&id) {
            t.votes = Some(votes);
        }
    }

    /// Makes node `id` unreachable (its raft was shut down).
    pub fn remove(&self, id: u64) {
        self.0.lock().unwrap().remove(&id);
    }
}

pub struct Conn {
    router: Router,
    target: u64,
}

impl Conn {
    fn target(&self) -> Option<Raft> {
        self.router
            .0
            .lock()
            .unwrap()
            .get(&self.target)
            .map(|t| t.raft.clone())
    }

    fn unreachable<E: std::error::Error>(&self) -> RPCError<u64, BasicNode, E> {
        let e = std::io::Error::other(format!("node {} is down", self.target));
        RPCError::Unreachable(Unreachable::new(&e))
    }

    fn refused<E: std::error::Error>(&self, held: LeaderLeaseHeld) -> RPCError<u64, BasicNode, E> {
        RPCError::Unreachable(Unreachable::new(&held))
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RPCError<u64, BasicNode, E> {
        RPCError::RemoteError(RemoteError::new(self.target, e))
    }
}

impl RaftNetworkFactory<KvConfig> for Router {
    type Network = Conn;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> Conn {
        Conn {
            router: self.clone(),
            target,
        }
    }
}

type RpcResult<T, E = RaftError<u64>> = Result<T, RPCError<u64, BasicNode, E>>;

impl RaftNetwork<KvConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<KvConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>> {
        let raft = self.target().ok_or_else(|| self.unreachable())?;
        raft.append_entries(rpc).await.map_err(|e| self.remote(e))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<KvConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> {
        let raft = self.target().ok_or_else(|| self.unreachable())?;
        raft.install_snapshot(rpc).await.map_err(|e| self.remote(e))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>> {
        let target = self.router.0.lock().unwrap().get(&self.target).cloned();
        let target = target.ok_or_else(|| self.unreachable())?;
        // The oracle's rule for every host: a vote request passes the gate before raft sees it.
        let answer = match &target.votes {
            Some(gate) => gate
                .vote(&target.raft, rpc)
                .await
                .map_err(|held: LeaderLeaseHeld| self.refused(held))?,
            None => target.raft.vote(rpc).await,
        };
        answer.map_err(|e| self.remote(e))
    }
}

// ---- the host's own gRPC API ----

/// The store's own `Kv` service.
pub struct KvApi {
    raft: Raft,
    sm: StateMachine,
}

fn write_status(e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> tonic::Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            let leader = f.leader_node.map(|n| n.addr).unwrap_or_default();
            tonic::Status::failed_precondition(format!("not leader; leader at {leader:?}"))
        }
        other => tonic::Status::unavailable(other.to_string()),
    }
}

#[tonic::async_trait]
impl Kv for KvApi {
    async fn put(
        &self,
        request: tonic::Request<PutRequest>,
    ) -> Result<tonic::Response<PutReply>, tonic::Status> {
        let PutRequest { key, value } = request.into_inner();
        let reply = self
            .raft
            .client_write(Cmd::Put { key, value })
            .await
            .map_err(write_status)?;
        Ok(tonic::Response::new(PutReply {
            log_index: reply.log_id.index,
        }))
    }

    async fn get(
        &self,
        request: tonic::Request<GetRequest>,
    ) -> Result<tonic::Response<GetReply>, tonic::Status> {
        self.raft
            .ensure_linearizable()
            .await
            .map_err(|e| tonic::Status::failed_precondition(e.to_string()))?;
        let value = self.sm.state().kv.get(&request.into_inner().key).cloned();
        Ok(tonic::Response::new(GetReply { value }))
    }
}

// ---- one node, and a cluster of them ----

/// One node of the host: its raft, its state machine, and its tonic server serving both the
/// oracle and the store.
pub struct Node {
    pub id: u64,
    pub raft: Raft,
    pub sm: StateMachine,
    pub log: LogStore,
    /// The oracle's adapter on this node's raft (also held by the oracle).
    pub backend: Arc<PiggybackBackend<KvConfig>>,
    /// The client address of the node's tonic server (`host:port`).
    pub addr: SocketAddr,
    oracle: Option<OracleGuard>,
    stop: CancellationToken,
    server: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl Node {
    /// Stops the node: its tonic server, its oracle, then its raft; peers no longer reach it.
    pub async fn stop(&mut self, router: &Router) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        router.remove(self.id);
        let _ = self.raft.shutdown().await;
        if let Some(oracle) = self.oracle.take() {
            let _ = oracle.shutdown().await;
        }
    }
}

/// Three (or `n`) nodes in this process.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub router: Router,
}

/// The host's raft timings. The election timeout is wider than the oracle's standalone
/// default (200..350 ms) so that a debug build on a busy machine does not hold elections
/// nobody asked for; the adapter reads these from `raft.config()`.
fn raft_config() -> Arc<openraft::Config> {
    let config = openraft::Config {
        cluster_name: "piggyback-kv".to_owned(),
        heartbeat_interval: 50,
        election_timeout_min: 400,
        election_timeout_max: 700,
        ..Default::default()
    };
    Arc::new(config.validate().expect("valid raft config"))
}

/// Starts node `id`'s raft on `log` and `sm`, reachable by its peers through `router`.
pub async fn open_raft(
    id: u64,
    log: LogStore,
    sm: StateMachine,
    router: &Router,
) -> Result<Raft, openraft::error::Fatal<u64>> {
    let raft = Raft::new(id, raft_config(), router.clone(), log, sm).await?;
    router.add(id, raft.clone());
    Ok(raft)
}

/// The oracle's adapter on this host's raft. The three pieces: the oracle's command wrapped in
/// the host's enum, the applied oracle state read in place from the host's state machine, and
/// a member's oracle client address, from its membership entry.
pub fn oracle_backend(raft: &Raft, sm: &StateMachine) -> PiggybackBackend<KvConfig> {
    let sm = sm.clone();
    PiggybackBackend::new(
        raft.clone(),
        Cmd::Oracle,
        move |f| sm.with_oracle(f),
        |_id, node: &BasicNode| Some(node.addr.clone()),
    )
}

/// Starts node `id` on `storage` (its log and state machine), serving the oracle and the
/// store on `listener`.
pub async fn start_node(
    id: u64,
    listener: tokio::net::TcpListener,
    (log, sm): (LogStore, StateMachine),
    router: &Router,
) -> Result<Node, Box<dyn std::error::Error>> {
    let addr = listener.local_addr()?;
    let raft = open_raft(id, log.clone(), sm.clone(), router).await?;
    let backend = Arc::new(oracle_backend(&raft, &sm));
    router.gate_votes(id, backend.vote_gate());
    let oracle = OracleGuard::start(backend.clone(), Config::default());

    let stop = CancellationToken::new();
    let server = Server::builder()
        .add_service(oracle.service())
        .add_service(KvServer::new(KvApi {
            raft: raft.clone(),
            sm: sm.clone(),
        }))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), stop.clone().cancelled_owned());
    Ok(Node {
        id,
        raft,
        sm,
        log,
        backend,
        addr,
        oracle: Some(oracle),
        stop,
        server: Some(tokio::spawn(server)),
    })
}

/// Starts `n` nodes (ids 1..=n) on loopback, forms the cluster, and serves on each node the
/// oracle and the store on one tonic server.
pub async fn start_cluster(n: u64) -> Result<Cluster, Box<dyn std::error::Error>> {
    let router = Router::default();
    let mut listeners = Vec::new();
    for _ in 1..=n {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
    }
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()?;
    let members: BTreeMap<u64, BasicNode> = (1..=n)
        .map(|id| (id, BasicNode::new(addrs[id as usize - 1])))
        .collect();

    let mut nodes = Vec::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = i as u64 + 1;
        let storage = (LogStore::default(), StateMachine::default());
        nodes.push(start_node(id, listener, storage, &router).await?);
    }
    nodes[0].raft.initialize(members).await?;
    Ok(Cluster { nodes, router })
}

impl Cluster {
    /// Waits until a running node leads, and returns its index in `nodes`.
    pub async fn wait_leader(&self, excluding: &BTreeSet<u64>) -> usize {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            for (i, node) in self.nodes.iter().enumerate() {
                if excluding.contains(&node.id) {
                    continue;
                }
                let m = node.raft.metrics().borrow().clone();
                if m.current_leader == Some(node.id) && m.state.is_leader() {
                    return i;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no leader elected in time"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Restarts the stopped node at `index` on its storage and its address.
    pub async fn restart(&mut self, index: usize) -> Result<(), Box<dyn std::error::Error>> {
        let node = &self.nodes[index];
        let listener = tokio::net::TcpListener::bind(node.addr).await?;
        let storage = (node.log.clone(), node.sm.clone());
        let id = node.id;
        self.nodes[index] = start_node(id, listener, storage, &self.router).await?;
        Ok(())
    }

    /// Stops every node still running.
    pub async fn stop_all(&mut self) {
        for node in &mut self.nodes {
            node.stop(&self.router).await;
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    use tso_proto::tso::example_kv_v1::kv_client::KvClient;
    use tso_proto::v1::GetTsRequest;
    use tso_proto::v1::tso_service_client::TsoServiceClient;

    let mut cluster = start_cluster(3).await?;
    let leader = &cluster.nodes[cluster.wait_leader(&BTreeSet::new()).await];
    println!("node {} leads, serving at {}", leader.id, leader.addr);
    let endpoint = format!("http://{}", leader.addr);
    let mut kv = KvClient::connect(endpoint.clone()).await?;
    let mut tso = TsoServiceClient::connect(endpoint).await?;
    for i in 0..3 {
        let put = PutRequest {
            key: format!("k{i}"),
            value: format!("v{i}"),
        };
        let index = kv.put(put).await?.into_inner().log_index;
        let ts = loop {
            match tso.get_ts(GetTsRequest { count: 1 }).await {
                Ok(r) => {
                    let r = r.into_inner();
                    break r.physical_ms << 18 | r.logical_start as u64;
                }
                // The oracle starts serving once its first high-water is committed.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        };
        println!("put k{i} at log index {index}; timestamp {ts}");
    }
    let value = kv.get(GetRequest { key: "k1".into() }).await?.into_inner();
    println!("k1 = {:?}", value.value);
    println!(
        "high-water in the replicated state: {} ms",
        leader.sm.high_water_ms()
    );
    cluster.stop_all().await;
    Ok(())
}
