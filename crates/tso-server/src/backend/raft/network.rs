//! Peer transport over gRPC (`tso.raft.v1.RaftPeer`): the client side openraft calls, the
//! service that feeds a node's raft, and [`Links`], a per-link switch for in-process partitions.
//!
//! Every call has a deadline (openraft's per-call TTL) and runs on a lazily connected channel
//! that reconnects by itself, so a peer that restarts is reached again without a new client.
//! Failures map to openraft's classes: refused or cut → `Unreachable` (openraft backs off),
//! deadline → `Timeout`, anything else on the wire → `Network`, an error from the remote raft →
//! `RemoteError`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{RPCTypes, RaftNetwork, RaftNetworkFactory};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};
use tso_proto::tso::raft_v1::RaftMessage;
use tso_proto::tso::raft_v1::raft_peer_client::RaftPeerClient;
use tso_proto::tso::raft_v1::raft_peer_server::{RaftPeer, RaftPeerServer};

use super::leadership::VoteGate;
use super::log_store::LogStore;
use super::peer_identity::{PeerHeaders, PeerIdentity};
use super::types::{LogId, NodeAddrs, NodeId, Raft, TypeConfig};
use crate::tls::PeerTls;

/// How long a connection attempt to a peer may take. Loopback and LAN peers connect in well
/// under a millisecond; 500 ms leaves room for a busy machine while staying below the shortest
/// election timeout we accept, so a dead peer never stalls an election.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long openraft waits before retrying a peer it found unreachable. openraft's default,
/// 500 ms, leaves a restarted node behind for that long, and a stale node that campaigns splits
/// the next election's votes. At 100 ms a dead peer costs one refused connection per 100 ms
/// (or one connect timeout per attempt, if blackholed).
const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(100);

/// Switches for the directed links between nodes of one process, for deterministic partitions
/// in tests. A cut link fails every call at once as `Unreachable`. Cheap to clone; clones share
/// the switches. Production nodes use [`Links::default`], where nothing is ever cut.
#[derive(Debug, Clone, Default)]
pub struct Links {
    cut: Arc<RwLock<HashSet<(NodeId, NodeId)>>>,
    held: Arc<RwLock<HashSet<(NodeId, NodeId)>>>,
}

impl Links {
    /// Cuts the directed link `from → to`.
    pub fn cut(&self, from: NodeId, to: NodeId) {
        self.cut.write().expect("links lock").insert((from, to));
    }

    /// Cuts both directions between `node` and every node in `others`.
    pub fn isolate(&self, node: NodeId, others: impl IntoIterator<Item = NodeId>) {
        let mut cut = self.cut.write().expect("links lock");
        for other in others {
            cut.insert((node, other));
            cut.insert((other, node));
        }
    }

    /// Holds log replication on `from → to` while heartbeats pass: an AppendEntries that
    /// names a previous log id fails as `Unreachable`, one without (a heartbeat before the
    /// leader knows where the follower's log matches its own) goes through. This makes a
    /// leader's read barrier win its race against its log replication after a restart, which
    /// a busy network does now and then.
    pub fn hold_replication(&self, from: NodeId, to: NodeId) {
        self.held.write().expect("links lock").insert((from, to));
    }

    /// Restores every link.
    pub fn heal_all(&self) {
        self.cut.write().expect("links lock").clear();
        self.held.write().expect("links lock").clear();
    }

    fn holds_replication(&self, from: NodeId, to: NodeId) -> bool {
        self.held.read().expect("links lock").contains(&(from, to))
    }

    /// True if `from → to` is cut.
    pub fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.cut.read().expect("links lock").contains(&(from, to))
    }
}

/// The request metadata that carries the sender's cluster-wide raft timings
/// ([`super::RaftTimings::cluster_key`]); a node refuses requests whose timings differ from its
/// own, or that carry none, so a node started with other timings is cut off instead of weakening
/// the leader lease.
pub const TIMINGS_HEADER: &str = "tso-raft-timings";

/// At most one log line per this interval about peers with other timings (they call many times
/// per second).
const MISMATCH_LOG_EVERY: Duration = Duration::from_secs(10);

/// Creates one client per target, sharing one channel per peer address.
#[derive(Debug, Clone)]
pub struct Network {
    self_id: NodeId,
    timings: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    links: Links,
    /// Peers are dialed over `https` with this, else over plaintext `http`.
    tls: Option<PeerTls>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    ident: Arc<PeerIdentity>,
}

impl Network {
    pub fn new(
        self_id: NodeId,
        timings_key: String,
        links: Links,
        tls: Option<PeerTls>,
        ident: Arc<PeerIdentity>,
    ) -> Self {
        Self {
            self_id,
            timings: timings_key
                .parse()
                .expect("timings are ASCII digits and slashes"),
            links,
            tls,
            channels: Arc::default(),
            ident,
        }
    }

    fn channel(&self, peer_addr: &str) -> Option<Channel> {
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(c) = channels.get(peer_addr) {
            return Some(c.clone());
        }
        let endpoint = self.endpoint(peer_addr)?;
        let channel = endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(peer_addr.to_owned(), channel.clone());
        Some(channel)
    }

    /// The endpoint of `peer_addr`, `None` if it is not a usable `host:port` (for TLS: its host
    /// must also be a valid server name).
    fn endpoint(&self, peer_addr: &str) -> Option<Endpoint> {
        let Some(tls) = &self.tls else {
            return Endpoint::from_shared(format!("http://{peer_addr}")).ok();
        };
        let endpoint = Endpoint::from_shared(format!("https://{peer_addr}")).ok()?;
        match endpoint.tls_config(tls.client_config()) {
            Ok(endpoint) => Some(endpoint),
            Err(e) => {
                tracing::error!(peer_addr, "cannot set up TLS to this peer: {e}");
                None
            }
        }
    }
}

/// How long a node asked to campaign waits for its own log to reach the index the leader named
/// (the leader saw it replicated, so this only covers the follower's metrics catching up).
const CAMPAIGN_LOG_WAIT: Duration = Duration::from_millis(200);

/// What a leader handing its leadership on asks of its successor (the `Campaign` peer RPC):
/// campaign now, if `leader_id` is the leader it follows in `term` and its log holds
/// `last_log_index` (the leader's last entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignRequest {
    pub term: u64,
    pub leader_id: NodeId,
    pub last_log_index: Option<u64>,
}

/// A follower's question before it may campaign (the `PreVote` peer RPC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    pub last_log_id: Option<LogId>,
}

/// The answer: whether the receiver would vote for that candidate now, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreVoteResponse {
    pub granted: bool,
    pub reason: String,
}

impl Network {
    /// Asks `target` (at `peer_addr`) whether it would vote for this node now; `Err` when it did
    /// not answer (or its answer does not count, see `peer_identity.rs`).
    pub async fn pre_vote(
        &self,
        target: NodeId,
        peer_addr: &str,
        req: PreVoteRequest,
        ttl: Duration,
    ) -> Result<PreVoteResponse, String> {
        if self.links.is_cut(self.self_id, target) {
            return Err(format!("link {} -> {target} is cut", self.self_id));
        }
        let channel = self
            .channel(peer_addr)
            .ok_or_else(|| format!("peer address {peer_addr:?} is not a valid host:port"))?;
        let payload = postcard::to_stdvec(&req).expect("a pre-vote request always encodes");
        let request = peer_request(payload, ttl, &self.timings, &self.ident);
        let mut client = RaftPeerClient::new(channel);
        let reply = match tokio::time::timeout(ttl, client.pre_vote(request)).await {
            Err(_) => return Err(format!("node {target} did not answer within {ttl:?}")),
            Ok(Err(status)) => return Err(format!("node {target}: {}", status.message())),
            Ok(Ok(reply)) => reply,
        };
        self.ident.check_reply(target, reply.metadata())?;
        postcard::from_bytes(&reply.into_inner().payload).map_err(|e| e.to_string())
    }

    /// Asks `target` (at `peer_addr`) to campaign; `Err` carries why it did not.
    pub async fn campaign(
        &self,
        target: NodeId,
        peer_addr: &str,
        req: CampaignRequest,
        ttl: Duration,
    ) -> Result<(), String> {
        if self.links.is_cut(self.self_id, target) {
            return Err(format!("link {} -> {target} is cut", self.self_id));
        }
        let channel = self
            .channel(peer_addr)
            .ok_or_else(|| format!("peer address {peer_addr:?} is not a valid host:port"))?;
        let payload = postcard::to_stdvec(&req).expect("a campaign request always encodes");
        let request = peer_request(payload, ttl, &self.timings, &self.ident);
        let mut client = RaftPeerClient::new(channel);
        match tokio::time::timeout(ttl, client.campaign(request)).await {
            Err(_) => Err(format!("node {target} did not answer within {ttl:?}")),
            Ok(Err(status)) => Err(format!(
                "node {target} refused: {}: {}",
                status.code(),
                status.message()
            )),
            Ok(Ok(_)) => Ok(()),
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeAddrs) -> PeerClient {
        PeerClient {
            self_id: self.self_id,
            timings: self.timings.clone(),
            target,
            node: node.clone(),
            channel: self.channel(&node.peer_addr),
            links: self.links.clone(),
            ident: self.ident.clone(),
        }
    }
}

/// A connection to one peer, as openraft uses it.
pub struct PeerClient {
    self_id: NodeId,
    timings: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    target: NodeId,
    node: NodeAddrs,
    /// `None` when the peer address is not a valid URI authority: every call is `Unreachable`.
    channel: Option<Channel>,
    links: Links,
    ident: Arc<PeerIdentity>,
}

/// Why a call did not bring back the remote raft's answer.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("link {from} -> {to} is cut")]
    Cut { from: NodeId, to: NodeId },
    #[error("peer address {0:?} is not a valid host:port")]
    BadAddress(String),
    #[error("peer unavailable: {0}")]
    Unavailable(tonic::Status),
    #[error("deadline of {0:?} passed")]
    Deadline(Duration),
    #[error("rpc failed: {0}")]
    Status(tonic::Status),
    #[error("undecodable reply: {0}")]
    Decode(postcard::Error),
    #[error("reply refused: {0}")]
    Refused(String),
}

impl PeerClient {
    async fn call<Req, Resp>(
        &self,
        kind: RPCTypes,
        req: &Req,
        ttl: Duration,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        if self.links.is_cut(self.self_id, self.target) {
            return Err(CallError::Cut {
                from: self.self_id,
                to: self.target,
            });
        }
        let channel = self
            .channel
            .clone()
            .ok_or_else(|| CallError::BadAddress(self.node.peer_addr.clone()))?;
        let payload = postcard::to_stdvec(req).expect("raft messages always encode");
        let request = peer_request(payload, ttl, &self.timings, &self.ident);
        let mut client = RaftPeerClient::new(channel);
        let call = async {
            match kind {
                RPCTypes::Vote => client.vote(request).await,
                RPCTypes::InstallSnapshot => client.install_snapshot(request).await,
                _ => client.append_entries(request).await,
            }
        };
        let reply = tokio::time::timeout(ttl, call)
            .await
            .map_err(|_| CallError::Deadline(ttl))?
            .map_err(|s| classify_status(s, ttl))?;
        // A reply from a member whose data directory was replaced, or from another cluster,
        // never counts (a vote, an acknowledgement toward a commit or the lease).
        self.ident
            .check_reply(self.target, reply.metadata())
            .map_err(CallError::Refused)?;
        postcard::from_bytes(&reply.into_inner().payload).map_err(CallError::Decode)
    }

    fn to_rpc_error<E: std::error::Error>(
        &self,
        kind: RPCTypes,
        e: CallError,
    ) -> RPCError<NodeId, NodeAddrs, RaftError<NodeId, E>> {
        match e {
            CallError::Cut { .. }
            | CallError::BadAddress(_)
            | CallError::Unavailable(_)
            | CallError::Refused(_) => RPCError::Unreachable(Unreachable::new(&e)),
            CallError::Deadline(timeout) => RPCError::Timeout(Timeout {
                action: kind,
                id: self.self_id,
                target: self.target,
                timeout,
            }),
            CallError::Status(_) | CallError::Decode(_) => RPCError::Network(NetworkError::new(&e)),
        }
    }

    async fn rpc<Req, Resp, E>(
        &self,
        kind: RPCTypes,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, NodeAddrs, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let reply: Result<Resp, RaftError<NodeId, E>> = self
            .call(kind, req, option.hard_ttl())
            .await
            .map_err(|e| self.to_rpc_error(kind, e))?;
        reply.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

/// A peer RPC carrying `payload`, bounded by `ttl` on both sides, with this node's timings and
/// identity headers.
fn peer_request(
    payload: Vec<u8>,
    ttl: Duration,
    timings: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    ident: &PeerIdentity,
) -> tonic::Request<RaftMessage> {
    let mut request = tonic::Request::new(RaftMessage { payload });
    request.set_timeout(ttl);
    request
        .metadata_mut()
        .insert(TIMINGS_HEADER, timings.clone());
    ident.stamp(request.metadata_mut());
    request
}

fn classify_status(status: tonic::Status, ttl: Duration) -> CallError {
    match status.code() {
        tonic::Code::Unavailable => CallError::Unavailable(status),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => CallError::Deadline(ttl),
        _ => CallError::Status(status),
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeAddrs, RaftError<NodeId>>> {
        if rpc.prev_log_id.is_some() && self.links.holds_replication(self.self_id, self.target) {
            let held = CallError::Cut {
                from: self.self_id,
                to: self.target,
            };
            return Err(RPCError::Unreachable(Unreachable::new(&held)));
        }
        self.rpc(RPCTypes::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeAddrs, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc(RPCTypes::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeAddrs, RaftError<NodeId>>> {
        self.rpc(RPCTypes::Vote, &rpc, &option).await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(UNREACHABLE_BACKOFF))
    }
}

/// The `tso.raft.v1.RaftPeer` service of one node: decodes peer requests into its raft.
///
/// Vote requests pass through the node's [`VoteGate`]: while the node holds an unexpired leader
/// lease they are refused (as unavailable), so its vote cannot elect anyone before its lease ends.
///
/// Every request must carry the sender's raft timings (the `tso-raft-timings` header) equal to
/// this node's: others are refused as a failed precondition, and logged.
#[derive(Clone)]
pub struct PeerService {
    raft: Raft,
    votes: VoteGate,
    timings_key: Arc<str>,
    mismatch_logged: Arc<Mutex<Option<Instant>>>,
    ident: Arc<PeerIdentity>,
    /// How long after a leader's last entries this node refuses a pre-vote (its own
    /// vote-refusal window: `election_timeout_max`).
    pre_vote_window: Duration,
    log: LogStore,
}

impl PeerService {
    pub fn new(
        raft: Raft,
        votes: VoteGate,
        timings_key: String,
        ident: Arc<PeerIdentity>,
        pre_vote_window: Duration,
        log: LogStore,
    ) -> Self {
        Self {
            raft,
            votes,
            timings_key: timings_key.into(),
            mismatch_logged: Arc::default(),
            ident,
            pre_vote_window,
            log,
        }
    }

    /// Whether this node would vote for a candidate whose log ends at `last_log_id` now.
    fn would_vote(&self, req: &PreVoteRequest) -> Result<(), String> {
        let (leads, leader) = {
            let m = self.raft.metrics();
            let m = m.borrow();
            (m.state == openraft::ServerState::Leader, m.current_leader)
        };
        if leads {
            return Err("this node leads".into());
        }
        if self.ident.heard_leader_within(self.pre_vote_window) {
            return Err(format!(
                "this node heard from its leader {leader:?} within {:?}",
                self.pre_vote_window
            ));
        }
        let ours = self.log.last_log_id();
        if req.last_log_id < ours {
            return Err(format!(
                "the candidate's log ends at {:?}, before this node's {ours:?}",
                req.last_log_id
            ));
        }
        Ok(())
    }

    /// The timings and identity checks of every request.
    fn check(&self, request: &tonic::Request<RaftMessage>) -> Result<PeerHeaders, tonic::Status> {
        self.check_timings(request)?;
        self.ident.check_request(request.metadata())
    }

    /// `value` as a reply carrying this node's identity headers.
    fn reply<T: Serialize>(
        &self,
        value: &T,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let mut response = reply(value)?;
        self.ident.stamp(response.metadata_mut());
        Ok(response)
    }

    /// Refuses a request from a peer whose raft timings differ from this node's.
    fn check_timings(&self, request: &tonic::Request<RaftMessage>) -> Result<(), tonic::Status> {
        let theirs = request
            .metadata()
            .get(TIMINGS_HEADER)
            .and_then(|v| v.to_str().ok());
        if theirs == Some(&*self.timings_key) {
            return Ok(());
        }
        let message = format!(
            "raft timings differ: this node runs {} (heartbeat/election-min/election-max, ms), \
             the caller {}; every node of a cluster must use the same timings",
            self.timings_key,
            theirs.unwrap_or("sent none")
        );
        let mut logged = self.mismatch_logged.lock().expect("mismatch log lock");
        if logged.is_none_or(|t| t.elapsed() >= MISMATCH_LOG_EVERY) {
            *logged = Some(Instant::now());
            tracing::error!("refusing a raft peer: {message}");
        }
        Err(tonic::Status::failed_precondition(message))
    }

    pub fn into_server(self) -> RaftPeerServer<Self> {
        RaftPeerServer::new(self)
    }
}

fn decode<T: DeserializeOwned>(request: tonic::Request<RaftMessage>) -> Result<T, tonic::Status> {
    postcard::from_bytes(&request.into_inner().payload)
        .map_err(|e| tonic::Status::invalid_argument(format!("undecodable raft message: {e}")))
}

fn reply<T: Serialize>(value: &T) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
    let payload = postcard::to_stdvec(value).expect("raft replies always encode");
    Ok(tonic::Response::new(RaftMessage { payload }))
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let headers = self.check(&request)?;
        let req: AppendEntriesRequest<TypeConfig> = decode(request)?;
        let answer = self.raft.append_entries(req).await;
        if answer.as_ref().is_ok_and(|a| a.is_success()) {
            self.ident.note_leader(&headers);
        }
        self.reply(&answer)
    }

    async fn vote(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        self.check(&request)?;
        let req: VoteRequest<NodeId> = decode(request)?;
        match self.votes.vote(&self.raft, req).await {
            Ok(answer) => self.reply(&answer),
            Err(held) => Err(tonic::Status::unavailable(held.to_string())),
        }
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        self.check(&request)?;
        let req: InstallSnapshotRequest<TypeConfig> = decode(request)?;
        self.reply(&self.raft.install_snapshot(req).await)
    }

    async fn pre_vote(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        self.check(&request)?;
        let req: PreVoteRequest = decode(request)?;
        let answer = match self.would_vote(&req) {
            Ok(()) => PreVoteResponse {
                granted: true,
                reason: String::new(),
            },
            Err(reason) => PreVoteResponse {
                granted: false,
                reason,
            },
        };
        self.reply(&answer)
    }

    async fn campaign(
        &self,
        request: tonic::Request<RaftMessage>,
    ) -> Result<tonic::Response<RaftMessage>, tonic::Status> {
        let headers = self.check(&request)?;
        let req: CampaignRequest = decode(request)?;
        // A Campaign names the process that sent it: one from an earlier start of the leader
        // (replayed, or delayed past a restart into the same term) is refused.
        if let Some(process) = headers.process
            && self.ident.leader_process(req.leader_id) != Some(process)
        {
            return Err(tonic::Status::failed_precondition(format!(
                "this Campaign comes from a start of node {} whose entries this node has not \
                 accepted (an earlier start, or a replay)",
                req.leader_id
            )));
        }
        // The leader saw its last entry replicated here; wait (briefly) until metrics show it.
        let _ = self
            .raft
            .wait(Some(CAMPAIGN_LOG_WAIT))
            .log_index_at_least(req.last_log_index, "campaign")
            .await;
        check_campaign(&self.raft.metrics().borrow(), &req)
            .map_err(tonic::Status::failed_precondition)?;
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("raft stopped: {e}")))?;
        tracing::info!(
            from = req.leader_id,
            term = req.term,
            "campaigning: the leader is handing its leadership to this node"
        );
        self.reply(&())
    }
}

/// Whether this node (metrics `m`) should campaign on `req`: it follows `req.leader_id` in
/// `req.term`, is a voter, and its log holds the leader's last entry (so the leader's vote,
/// which decides the election, is granted on the log check).
fn check_campaign(
    m: &openraft::RaftMetrics<NodeId, NodeAddrs>,
    req: &CampaignRequest,
) -> Result<(), String> {
    if m.running_state.is_err() {
        return Err("raft has stopped".into());
    }
    if m.current_term != req.term || m.current_leader != Some(req.leader_id) {
        return Err(format!(
            "this node follows {:?} in term {}, not node {} in term {}",
            m.current_leader, m.current_term, req.leader_id, req.term
        ));
    }
    if m.state != openraft::ServerState::Follower {
        return Err(format!("this node is {:?}, not a follower", m.state));
    }
    if !m
        .membership_config
        .membership()
        .voter_ids()
        .any(|id| id == m.id)
    {
        return Err("this node is not a voter".into());
    }
    if m.last_log_index < req.last_log_index {
        return Err(format!(
            "this node's log ends at {:?}, before the leader's {:?}",
            m.last_log_index, req.last_log_index
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_openraft_classes() {
        let ttl = Duration::from_millis(50);
        let unavailable = classify_status(tonic::Status::unavailable("refused"), ttl);
        assert!(matches!(unavailable, CallError::Unavailable(_)));
        let deadline = classify_status(tonic::Status::deadline_exceeded("slow"), ttl);
        assert!(matches!(deadline, CallError::Deadline(d) if d == ttl));
        let other = classify_status(tonic::Status::internal("bug"), ttl);
        assert!(matches!(other, CallError::Status(_)));
    }

    /// Node 2's metrics while it follows node 1 in term 3, with a log ending at 10.
    fn follower_metrics() -> openraft::RaftMetrics<NodeId, NodeAddrs> {
        let nodes: std::collections::BTreeMap<NodeId, NodeAddrs> = (1..=4)
            .map(|id| {
                let addrs = NodeAddrs {
                    client_addr: format!("h:{id}"),
                    peer_addr: format!("h:{}", id + 10),
                    admin_addr: String::new(),
                };
                (id, addrs)
            })
            .collect();
        let voters = [std::collections::BTreeSet::from([1, 2, 3])];
        let membership = openraft::Membership::new(voters.to_vec(), nodes);
        let mut m = openraft::RaftMetrics::new_initial(2);
        m.current_term = 3;
        m.current_leader = Some(1);
        m.state = openraft::ServerState::Follower;
        m.last_log_index = Some(10);
        m.membership_config = Arc::new(openraft::StoredMembership::new(None, membership));
        m
    }

    #[test]
    fn a_campaign_is_run_only_for_the_leader_followed_in_its_term_with_its_log() {
        let m = follower_metrics();
        let asked = CampaignRequest {
            term: 3,
            leader_id: 1,
            last_log_index: Some(10),
        };
        assert_eq!(check_campaign(&m, &asked), Ok(()));
        let refused = [
            CampaignRequest { term: 2, ..asked },
            CampaignRequest {
                leader_id: 3,
                ..asked
            },
            CampaignRequest {
                last_log_index: Some(11),
                ..asked
            },
        ];
        for req in refused {
            assert!(check_campaign(&m, &req).is_err(), "{req:?}");
        }
        let mut candidate = follower_metrics();
        candidate.state = openraft::ServerState::Candidate;
        assert!(check_campaign(&candidate, &asked).is_err());
        let mut learner = follower_metrics();
        learner.id = 4;
        assert!(check_campaign(&learner, &asked).is_err(), "a learner");
    }

    #[test]
    fn links_cut_one_direction_and_isolate_both() {
        let links = Links::default();
        links.cut(1, 2);
        assert!(links.is_cut(1, 2) && !links.is_cut(2, 1));
        links.isolate(3, [1, 2, 3]);
        assert!(links.is_cut(3, 1) && links.is_cut(1, 3) && links.is_cut(2, 3));
        links.heal_all();
        assert!(!links.is_cut(1, 2) && !links.is_cut(3, 1));
    }
}
