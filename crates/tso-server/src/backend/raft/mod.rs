//! The replicated backend: the backend seam ([`Backend`]) on an openraft cluster.
//!
//! The replicated state is the oracle's record, [`crate::backend::OracleState`], under its
//! merge rules (`state_machine.rs`); the log and vote are an fsync'd record file
//! (`log_store.rs`); peers talk gRPC (`network.rs`). The backend calls go through `seam.rs`,
//! the adapter this backend shares with piggyback mode. Leadership comes from openraft's
//! metrics: `Leader` at epoch `(term, node id)` while this node leads, `Follower` naming the
//! leader's *client* address from the membership, else `Unknown`.
//! openraft's generics stay inside this module: callers see [`RaftBackend`], [`RaftConfig`],
//! [`NodeAddrs`] and [`Links`], and a host that runs its own openraft sees
//! [`piggyback::PiggybackBackend`], generic over the host's own type configuration only.

mod admin;
mod dir_guard;
mod handoff;
mod identity;
mod leader_lease;
mod leadership;
mod log_store;
mod network;
mod peer_identity;
pub mod piggyback;
mod record_file;
mod seam;
mod seed;
mod state_machine;
mod status;
mod types;

#[cfg(test)]
mod storage_tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::SnapshotPolicy;
use openraft::error::{InitializeError, RaftError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tso_core::Epoch;
use tso_proto::tso::raft_v1::raft_peer_server::RaftPeerServer;

use crate::backend::{
    Backend, BackendError, BoxFuture, Leadership, OracleCommand, OracleState, Stored,
};
use crate::tls::PeerTls;
pub use admin::{AdminService, PROMOTE_LAG_ENTRIES_MAX};
use dir_guard::DirGuard;
use handoff::Handoff;
pub use handoff::{HandoffError, HandoffOutcome};
use leader_lease::LeaderLease;
pub use leadership::{LeaderLeaseHeld, VoteGate};
use leadership::{leadership_of, renew_leader_lease, watch_leadership};
use log_store::LogStore;
use network::Network;
pub use network::{Links, PeerService};
use peer_identity::PeerIdentity;
pub use record_file::{RecordFileError, unsafe_ack_before_fsync, unsafe_stall_fsync_while_exists};
use seam::Seam;
pub use seed::{export_offline, is_raft_dir, seed_dir, seed_fingerprint};
use state_machine::StateMachine;
pub use types::NodeAddrs;
use types::{Command, NodeId, Raft, TypeConfig};

/// Entries between snapshots. An entry is written once per window extension (seconds apart),
/// so 1000 entries is most of an hour of log: replay at start stays instant and snapshots rare.
const SNAPSHOT_EVERY_ENTRIES: u64 = 1000;

/// Entries kept behind a snapshot, so that a briefly lagging follower catches up from the log
/// rather than by a snapshot transfer.
const ENTRIES_KEPT_AFTER_SNAPSHOT: u64 = 100;

/// When to snapshot the state machine, and how much log to keep behind a snapshot (the rest is
/// purged; a follower that needs purged entries gets the snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotOptions {
    pub every_entries: u64,
    pub entries_kept: u64,
}

impl Default for SnapshotOptions {
    fn default() -> Self {
        Self {
            every_entries: SNAPSHOT_EVERY_ENTRIES,
            entries_kept: ENTRIES_KEPT_AFTER_SNAPSHOT,
        }
    }
}

/// While this node leads, records what the cluster does not know yet of who its members are
/// (`peer_identity.rs`): each member's incarnation once it answered, and the cluster's identity.
/// A failed write is tried again on the next round.
async fn record_identities(raft: Raft, ident: Arc<PeerIdentity>, timings: RaftTimings) {
    loop {
        tokio::time::sleep(timings.heartbeat_interval).await;
        let leads = {
            let m = raft.metrics();
            let m = m.borrow();
            if m.running_state.is_err() {
                return;
            }
            m.state == openraft::ServerState::Leader && m.current_leader == Some(ident.node_id)
        };
        if !leads {
            continue;
        }
        let (records, name_cluster) = ident.to_record();
        let mut commands: Vec<Command> = records
            .into_iter()
            .map(|(node, incarnation)| Command::RecordIncarnation { node, incarnation })
            .collect();
        if name_cluster {
            let id =
                (u128::from(identity::random_u64()) << 64) | u128::from(identity::random_u64());
            commands.push(Command::RecordClusterId { id });
        }
        for command in commands {
            let write = tokio::time::timeout(timings.call_timeout, raft.client_write(command));
            if !matches!(write.await, Ok(Ok(_))) {
                break;
            }
        }
    }
}

/// A pre-vote round in front of openraft's elections (openraft 0.9 has none): this node's raft
/// may start an election on its own timer only while a majority of the voters, itself counted,
/// would vote for it now (none of them has heard from a leader for an election timeout, and its
/// log is at least as up to date as theirs). A follower cut off from the others therefore never
/// raises its term, and when it is healed it follows the leader again instead of unseating it
/// with the higher term of its failed campaigns. Only elections on openraft's timer are gated:
/// the cluster's formation and a handoff's `Campaign` elect directly.
async fn gate_elections(
    raft: Raft,
    log: LogStore,
    network: Network,
    ident: Arc<PeerIdentity>,
    timings: RaftTimings,
    ungated: Arc<std::sync::atomic::AtomicBool>,
    leader_silent: watch::Sender<bool>,
) {
    let runtime = raft.runtime_config();
    runtime.elect(false);
    loop {
        tokio::time::sleep(timings.heartbeat_interval).await;
        let silent = {
            let m = raft.metrics();
            let m = m.borrow();
            m.state != openraft::ServerState::Leader
                && !ident.heard_leader_within(timings.election_timeout_max)
        };
        leader_silent.send_if_modified(|current| std::mem::replace(current, silent) != silent);
        if ungated.load(std::sync::atomic::Ordering::Relaxed) {
            runtime.elect(true);
            continue;
        }
        let (running, leads, configs, voters, term) = {
            let m = raft.metrics();
            let m = m.borrow();
            let membership = m.membership_config.membership();
            let configs: Vec<std::collections::BTreeSet<NodeId>> =
                membership.get_joint_config().clone();
            let voters: Vec<(NodeId, NodeAddrs)> = membership
                .voter_ids()
                .filter(|id| *id != ident.node_id)
                .filter_map(|id| Some((id, membership.get_node(&id)?.clone())))
                .collect();
            let is_voter = membership.voter_ids().any(|id| id == ident.node_id);
            (
                m.running_state.is_ok(),
                m.state == openraft::ServerState::Leader,
                configs,
                is_voter.then_some(voters),
                m.current_term,
            )
        };
        if !running {
            return;
        }
        let Some(voters) = voters else {
            continue;
        };
        if leads || ident.heard_leader_within(timings.election_timeout_max) {
            runtime.elect(false);
            continue;
        }
        let last_log_id = log.last_log_id();
        let request = network::PreVoteRequest {
            candidate: ident.node_id,
            last_log_id,
        };
        let ttl = timings.election_timeout_min;
        let asks = voters.iter().map(|(id, node)| {
            let network = network.clone();
            async move { network.pre_vote(*id, &node.peer_addr, request, ttl).await }
        });
        let answers = futures_util::future::join_all(asks).await;
        let granted: std::collections::BTreeSet<NodeId> = voters
            .iter()
            .zip(&answers)
            .filter(|(_, a)| a.as_ref().is_ok_and(|a| a.granted))
            .map(|((id, _), _)| *id)
            .chain([ident.node_id])
            .collect();
        // A majority of every configuration (two while a membership change is half-way).
        let allow = configs
            .iter()
            .all(|config| config.intersection(&granted).count() > config.len() / 2);
        if allow {
            tracing::debug!(term, ?granted, "pre-vote won: this node may campaign");
        }
        runtime.elect(allow);
    }
}

/// On a fresh cluster the member with the lowest id forms it at once (its `initialize` starts an
/// election); the others form it themselves only if they have heard from nobody after this many
/// `election_timeout_max` (the lowest member is down). Every member campaigning at start would
/// let one that comes up late, with a higher id, unseat the first leader: openraft orders
/// `(term 1, node 3)` above `(term 1, node 2)`.
const INITIALIZE_WAIT_ELECTION_TIMEOUTS: u32 = 2;

/// Entries purged per purge call: one call, one record and one fsync, whatever the count.
const PURGE_BATCH_ENTRIES: u64 = 64;

/// Raft timings. The defaults fail a dead leader over in about
/// `election_timeout_max + election_timeout_min..max` = 550..700 ms (followers wait out the
/// leader lease, then a randomized election timeout), and tolerate a node that stalls for up
/// to six heartbeats (300 ms) on a busy machine before anyone campaigns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaftTimings {
    pub heartbeat_interval: Duration,
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Bound on one write or read barrier; past it the call fails as `Transient` (no quorum).
    pub call_timeout: Duration,
}

impl RaftTimings {
    /// Refuses timings the leader lease cannot rely on: openraft counts in whole milliseconds
    /// (a fraction would be dropped there but not from the lease), an election window must
    /// follow the heartbeat, and the lease (renewed once per heartbeat) must span at least
    /// [`HEARTBEATS_PER_LEASE_MIN`] heartbeats, so that one late renewal does not end it.
    pub fn validate(&self) -> Result<(), String> {
        let named = [
            ("heartbeat interval", self.heartbeat_interval),
            ("election timeout min", self.election_timeout_min),
            ("election timeout max", self.election_timeout_max),
        ];
        for (name, d) in named {
            if d.is_zero() || d.subsec_nanos() % 1_000_000 != 0 {
                return Err(format!(
                    "the {name} must be a whole number of milliseconds above 0, not {d:?}"
                ));
            }
        }
        if self.heartbeat_interval >= self.election_timeout_min
            || self.election_timeout_min >= self.election_timeout_max
        {
            return Err(format!(
                "need heartbeat interval < election timeout min < election timeout max, got {:?} / {:?} / {:?}",
                self.heartbeat_interval, self.election_timeout_min, self.election_timeout_max
            ));
        }
        let lease = leader_lease::leader_lease_duration(self.election_timeout_max);
        if self.heartbeat_interval * HEARTBEATS_PER_LEASE_MIN > lease {
            return Err(format!(
                "the heartbeat interval {:?} is not well inside the leader lease {lease:?} \
                 (90 % of the election timeout max): raise the election timeout max to at least \
                 {:?}, or lower the heartbeat",
                self.heartbeat_interval,
                self.heartbeat_interval * HEARTBEATS_PER_LEASE_MIN * 10 / 9
            ));
        }
        Ok(())
    }

    /// The cluster-wide part (what the lease depends on), as peers compare it: `hb/min/max` in
    /// milliseconds.
    pub fn cluster_key(&self) -> String {
        let ms = |d: Duration| d.as_millis();
        format!(
            "{}/{}/{}",
            ms(self.heartbeat_interval),
            ms(self.election_timeout_min),
            ms(self.election_timeout_max)
        )
    }
}

/// Renewals that fit in one lease at least: with 3, a lease survives two late or lost
/// heartbeats (defaults: 50 ms heartbeats, 315 ms lease, over 6 renewals per lease).
pub const HEARTBEATS_PER_LEASE_MIN: u32 = 3;

impl Default for RaftTimings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(200),
            election_timeout_max: Duration::from_millis(350),
            call_timeout: Duration::from_secs(1),
        }
    }
}

/// How to open one raft node.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    pub node_id: u64,
    /// Holds the log, the vote and the snapshot.
    pub data_dir: PathBuf,
    /// The initial members (id → advertised addresses). Used only on the first start of a fresh
    /// data directory; a restarted node learns the members from its log.
    pub initial_members: BTreeMap<u64, NodeAddrs>,
    /// Start a fresh data directory without members and wait to be added to a running cluster
    /// (through its admin service). The directory remembers it: a restart needs no `join`.
    pub join: bool,
    pub timings: RaftTimings,
    pub snapshot: SnapshotOptions,
    /// Link switches for in-process partitions; `Links::default()` in production.
    pub links: Links,
    /// Mutual TLS between peers, both ways: [`RaftBackend::serve_peers`] requires client
    /// certificates from its CA, and this node dials its peers over `https` with it. `None`:
    /// plaintext peer traffic.
    pub peer_tls: Option<PeerTls>,
}

/// Why a raft node could not start.
#[derive(Debug, thiserror::Error)]
pub enum RaftOpenError {
    #[error("raft storage: {0}")]
    Storage(#[from] RecordFileError),
    #[error("cannot create or lock data directory at {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "data directory {0} is fresh: the first start of a node needs the initial members \
         (the same list on every node), or to join a running cluster (`tso serve --join`)"
    )]
    NoMembers(PathBuf),
    #[error(
        "joining a running cluster takes no initial members (got {0:?}): the cluster's leader \
         adds this node"
    )]
    JoinWithMembers(Vec<u64>),
    #[error(
        "node {node_id} is not in the initial members {members:?}; add it to the members list \
         (the same list on every node)"
    )]
    NotAMember { node_id: u64, members: Vec<u64> },
    #[error(
        "data directory {dir} belongs to node {stored}, not node {node_id}; \
         use that node's id, or another directory"
    )]
    WrongNode {
        dir: PathBuf,
        stored: u64,
        node_id: u64,
    },
    #[error(
        "data directory {dir} belongs to a cluster of members {stored:?}, but the members given \
         are {given:?}; pass the original members (or none, on a restart), or use a fresh directory"
    )]
    OtherCluster {
        dir: PathBuf,
        stored: Vec<u64>,
        given: Vec<u64>,
    },
    #[error(
        "data directory {dir} is incomplete: {what}. A node whose log or vote is lost must not \
         take part under its old id (it could vote twice in one term). Remove it from the \
         cluster (`tso admin remove ID` on the leader), then start it on an empty directory \
         under a new id with `--join` and add it (`tso admin add-learner`, `promote`); see \
         docs/operations.md, \"Replacing a dead node\""
    )]
    Partial {
        dir: PathBuf,
        what: identity::Partial,
    },
    #[error("invalid raft timings: {0}")]
    Config(String),
    #[error(
        "data directory {dir} was first started with raft timings {stored} \
         (heartbeat/election-min/election-max, ms), but this start gives {given}: every node of \
         a cluster must keep the same timings, since the leader lease depends on them; pass the \
         recorded values"
    )]
    TimingsDiffer {
        dir: PathBuf,
        stored: String,
        given: String,
    },
    #[error("data directory {0} is still in use by another raft node in this process")]
    DirInUse(PathBuf),
    #[error(
        "data directory {0} is in use by another tso process: stop it, or use another --data-dir"
    )]
    Locked(PathBuf),
    #[error("raft failed to start: {0}")]
    Start(String),
}

/// The leader lease of one node (see [`RaftBackend::leader_lease_valid_until`]). Clones share it.
#[derive(Debug, Clone)]
pub struct LeaderLeaseView {
    clock: Arc<LeaderLease>,
    leadership: watch::Receiver<Leadership>,
}

impl LeaderLeaseView {
    /// The end of the lease held in the current leader term, if any (it may be in the past).
    pub fn valid_until(&self) -> Option<Instant> {
        match *self.leadership.borrow() {
            Leadership::Leader { epoch } => self.clock.valid_until(epoch.hi()),
            _ => None,
        }
    }

    /// True while this node leads under an unexpired lease: the check for the grant path.
    pub fn is_valid(&self) -> bool {
        self.valid_until().is_some_and(|t| Instant::now() < t)
    }
}

/// One node of a tso raft cluster, implementing the backend seam.
pub struct RaftBackend {
    id: NodeId,
    /// The raft, its state machine, leadership, lease and timings; the [`Backend`] calls.
    seam: Seam<TypeConfig, StateMachine>,
    handoff: Handoff,
    peer_tls: Option<PeerTls>,
    tasks: Vec<JoinHandle<()>>,
    /// Released only after raft has stopped (see `Drop`).
    dir_guard: Mutex<Option<DirGuard>>,
    /// Held across a membership change: one at a time (see `admin.rs`).
    changes: Arc<tokio::sync::Mutex<()>>,
    ident: Arc<PeerIdentity>,
    /// A reader of the log store raft owns (for pre-votes).
    log: LogStore,
    /// Set by the positive control: openraft's elections run without the pre-vote gate.
    ungated: Arc<std::sync::atomic::AtomicBool>,
}

impl RaftBackend {
    /// Opens the node's storage, starts its raft, and on a fresh directory forms the cluster
    /// from `initial_members`. Returns once raft runs; leadership arrives on [`Self::leadership`].
    /// Peers reach this node only once [`Self::peer_service`] is served on its peer address.
    pub async fn open(config: RaftConfig) -> Result<Self, RaftOpenError> {
        let dir_guard = DirGuard::acquire(&config.data_dir).await?;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| RaftOpenError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let log = LogStore::open(&config.data_dir)?;
        let sm = StateMachine::open(&config.data_dir)?;
        let parts = identity::DirParts {
            log_incarnation: log.incarnation(),
            log_written: !log.is_pristine(),
            snapshot: sm.has_snapshot(),
        };
        let incarnation =
            identity::check_incarnation(&config.data_dir, parts, |i| log.set_incarnation(i))?;
        let fresh = log.is_pristine();
        if config.join && !config.initial_members.is_empty() {
            return Err(RaftOpenError::JoinWithMembers(
                config.initial_members.keys().copied().collect(),
            ));
        }
        let joining = fresh && config.initial_members.is_empty();
        if joining && !config.join && !identity::joined_before(&config.data_dir, config.node_id)? {
            return Err(RaftOpenError::NoMembers(config.data_dir.clone()));
        }
        if fresh && !joining && !config.initial_members.contains_key(&config.node_id) {
            return Err(RaftOpenError::NotAMember {
                node_id: config.node_id,
                members: config.initial_members.keys().copied().collect(),
            });
        }
        config.timings.validate().map_err(RaftOpenError::Config)?;
        identity::check_or_write(&config.data_dir, config.node_id, &config.initial_members)?;
        identity::record_incarnation(&config.data_dir, incarnation)?;
        let formation =
            identity::formation(&config.data_dir, fresh && !joining, &config.initial_members)?;
        identity::check_or_record_timings(&config.data_dir, &config.timings)?;
        let raft_config = openraft_config(&config.timings, &config.snapshot)?;
        let ident = Arc::new(PeerIdentity::new(
            config.node_id,
            incarnation,
            formation,
            sm.clone(),
        ));
        let network = Network::new(
            config.node_id,
            config.timings.cluster_key(),
            config.links.clone(),
            config.peer_tls.clone(),
            ident.clone(),
        );
        let log_handle = log.clone();
        let raft = Raft::new(
            config.node_id,
            raft_config,
            network.clone(),
            log,
            sm.clone(),
        )
        .await
        .map_err(|e| RaftOpenError::Start(e.to_string()))?;
        let seed = sm.seed();
        let first = config.initial_members.keys().next() == Some(&config.node_id);
        if fresh && first {
            initialize(&raft, config.initial_members.clone()).await?;
        }
        let mut backend = Self::start_tasks(
            config.clone(),
            raft.clone(),
            sm,
            log_handle,
            network,
            ident,
            dir_guard,
        );
        if let Some(seed) = seed {
            backend.tasks.push(tokio::spawn(seed::log_seed(
                raft.clone(),
                config.node_id,
                seed,
                config.timings,
            )));
        }
        if joining {
            tracing::info!(
                node_id = config.node_id,
                "waiting to be added to a cluster (`tso admin add-learner` on its leader)"
            );
        } else if fresh && !first {
            let wait = config.timings.election_timeout_max * INITIALIZE_WAIT_ELECTION_TIMEOUTS;
            let members = config.initial_members;
            backend.tasks.push(tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                if raft.metrics().borrow().current_term == 0
                    && let Err(e) = initialize(&raft, members).await
                {
                    tracing::warn!("forming the cluster from this node failed: {e}");
                }
            }));
        }
        Ok(backend)
    }

    fn start_tasks(
        config: RaftConfig,
        raft: Raft,
        sm: StateMachine,
        log: LogStore,
        network: Network,
        ident: Arc<PeerIdentity>,
        dir_guard: DirGuard,
    ) -> Self {
        let metrics = raft.metrics();
        let (tx, leadership) = watch::channel(leadership_of(&metrics.borrow()));
        let (handover, handover_rx) = watch::channel(None);
        let (leader_silent, leader_silent_rx) = watch::channel(false);
        let ungated = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lease = Arc::new(LeaderLease::new(leader_lease::leader_lease_duration(
            config.timings.election_timeout_max,
        )));
        let tasks = vec![
            tokio::spawn(watch_leadership(
                metrics,
                tx,
                Arc::new(leadership::tso_client_addr),
                handover_rx.clone(),
                leader_silent_rx,
            )),
            tokio::spawn(renew_leader_lease(
                raft.clone(),
                leadership.clone(),
                lease.clone(),
                config.timings,
            )),
            tokio::spawn(record_identities(
                raft.clone(),
                ident.clone(),
                config.timings,
            )),
            tokio::spawn(gate_elections(
                raft.clone(),
                log.clone(),
                network.clone(),
                ident.clone(),
                config.timings,
                ungated.clone(),
                leader_silent,
            )),
        ];
        let handoff = Handoff {
            id: config.node_id,
            raft: raft.clone(),
            lease: lease.clone(),
            network,
            handover: Arc::new(handover),
            timings: config.timings,
            unsafe_keep_leader_lease: Arc::default(),
        };
        let seam = Seam {
            raft,
            record: sm,
            client_addr: Arc::new(leadership::tso_client_addr),
            leadership,
            handover: handover_rx,
            leader_lease: lease,
            timings: config.timings,
        };
        Self {
            id: config.node_id,
            seam,
            handoff,
            peer_tls: config.peer_tls,
            tasks,
            dir_guard: Mutex::new(Some(dir_guard)),
            changes: Arc::default(),
            ident,
            log,
            ungated,
        }
    }

    /// The `tso.raft.v1.RaftPeer` service of this node, to be served on its peer address
    /// (alone, or next to other services on one tonic server).
    pub fn peer_service(&self) -> RaftPeerServer<PeerService> {
        let votes = VoteGate::new(self.seam.leader_lease.clone());
        PeerService::new(
            self.seam.raft.clone(),
            votes,
            self.seam.timings.cluster_key(),
            self.ident.clone(),
            self.seam.timings.election_timeout_max,
            self.log.clone(),
        )
        .into_server()
    }

    /// The `tso.admin.v1.Admin` service of this node (membership changes), to be served on its
    /// admin address; a host may add TLS to the server it mounts it on.
    pub fn admin_service(
        &self,
    ) -> tso_proto::tso::admin_v1::admin_server::AdminServer<AdminService> {
        self.admin().into_server()
    }

    /// The admin service itself, for a host that configures it before serving.
    pub fn admin(&self) -> AdminService {
        AdminService::new(
            self.seam.raft.clone(),
            self.id,
            Arc::clone(&self.changes),
            self.seam.timings,
            self.handoff.clone(),
        )
    }

    /// Serves [`Self::peer_service`] on `listener` until `shutdown` completes; over mutual TLS
    /// when [`RaftConfig::peer_tls`] is set.
    pub async fn serve_peers(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        // Nagle's algorithm would hold the small writes of a fresh HTTP/2 connection for the
        // peer's delayed ACK (about 40 ms): the first vote request between two nodes (as in a
        // handoff) would wait that long.
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.peer_tls {
            builder = builder.tls_config(tls.server_config())?;
        }
        builder
            .add_service(self.peer_service())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
    }

    /// The end of this node's leader lease, if it leads and a quorum acknowledged it in its
    /// current term. Grant only while `Instant::now() < leader_lease_valid_until()`: until then no
    /// other node can have been elected (see `docs/raft-lease.md`).
    pub fn leader_lease_valid_until(&self) -> Option<Instant> {
        self.leader_lease_view().valid_until()
    }

    /// The end of the lease this node held in `epoch`'s term, whatever it leads now; `None` if
    /// it never held one there, or gave it up by voting for a later term.
    pub fn lease_end_in(&self, epoch: Epoch) -> Option<Instant> {
        self.seam.leader_lease.valid_until(epoch.hi())
    }

    /// True while this node leads under an unexpired lease.
    pub fn lease_is_valid(&self) -> bool {
        self.leader_lease_view().is_valid()
    }

    /// A cheap, cloneable view of the lease, for a grant path that does not hold the backend.
    pub fn leader_lease_view(&self) -> LeaderLeaseView {
        self.seam.leader_lease_view()
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.id
    }

    /// The current members (id → advertised addresses), as the log says (empty until raft has
    /// loaded its log, shortly after [`Self::open`]).
    pub fn members(&self) -> BTreeMap<u64, NodeAddrs> {
        let metrics = self.seam.raft.metrics();
        let m = metrics.borrow();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.clone()))
            .collect()
    }

    /// The current raft term of this node (for diagnostics and tests).
    pub fn current_term(&self) -> u64 {
        self.seam.raft.metrics().borrow().current_term
    }

    /// The index of the last entry in this node's log, if any (for diagnostics and tests).
    pub fn last_log_index(&self) -> Option<u64> {
        self.seam.raft.metrics().borrow().last_log_index
    }

    /// The index of the last purged log entry, if any (for diagnostics and tests).
    pub fn purged_index(&self) -> Option<u64> {
        self.seam.raft.metrics().borrow().purged.map(|l| l.index)
    }

    /// The index of the last snapshot this node holds, if any (for diagnostics and tests).
    pub fn snapshot_index(&self) -> Option<u64> {
        self.seam.raft.metrics().borrow().snapshot.map(|l| l.index)
    }

    /// The high-water applied on this node (possibly stale on a follower; for diagnostics).
    pub fn applied_high_water_ms(&self) -> u64 {
        self.seam.record.high_water_ms()
    }

    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: openraft's own elections run without the
    /// pre-vote gate (as openraft alone does: a node that is the only voter of its configuration
    /// elects itself at its next tick). With the admin service's
    /// [`AdminService::unsafe_allow_leader_removal`], removing the leader of two voters lets the
    /// survivor serve while the old leader still does. This breaks the oracle on purpose.
    pub fn unsafe_ungate_elections(&self) {
        self.ungated
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: a member restarted under its old id on a wiped
    /// data directory is heard as a full member (its votes and acknowledgements count), as
    /// before incarnations: it may vote twice in one term and elect a node whose log lacks
    /// committed writes. This breaks the oracle on purpose.
    pub fn unsafe_trust_wiped_members(&self) {
        self.ident.unsafe_trust_wiped();
    }

    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: a handoff (SIGTERM or `transfer-leader`) does
    /// not give up this node's lease. Its vote gate admits the successor's vote request as if
    /// it had, but the node goes on reporting itself leader of its old term and grants until
    /// that lease ends by time, while the successor is elected and serves. This breaks the
    /// oracle on purpose.
    pub fn unsafe_handoff_keep_leader_lease(&self) {
        self.handoff
            .unsafe_keep_leader_lease
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The incarnation of this node's data directory (made at its first start).
    pub fn incarnation(&self) -> u64 {
        self.ident.incarnation
    }

    /// The cluster's identity as applied on this node, once its first leader recorded one.
    pub fn cluster_id(&self) -> Option<u128> {
        self.seam.record.cluster_id()
    }

    /// The incarnation the cluster recorded for `node`, as applied on this node.
    pub fn recorded_incarnation(&self, node: u64) -> Option<u64> {
        self.seam.record.incarnation_of(node)
    }

    /// Hands this node's leadership to an up-to-date voter before a shutdown, by `deadline`
    /// (see `handoff.rs` and `docs/raft-lease.md`, "Handoff"). A follower, or a single
    /// voter, returns at once. After an `Err` past the point where grants stopped, this node
    /// never grants again in its term: call it only to shut down.
    pub async fn hand_off(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<HandoffOutcome, HandoffError> {
        self.handoff.run(deadline, None).await
    }

    /// Stops raft and waits for it; the leadership watch closes and the data directory may be
    /// opened again.
    pub async fn shutdown(&self) {
        let _ = self.seam.raft.shutdown().await;
        for t in &self.tasks {
            t.abort();
        }
        self.dir_guard.lock().expect("dir guard lock").take();
    }
}

impl Drop for RaftBackend {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let raft = self.seam.raft.clone();
        let guard = self.dir_guard.lock().expect("dir guard lock").take();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = raft.shutdown().await;
                drop(guard);
            });
        }
    }
}

impl Backend for RaftBackend {
    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.seam.leadership.clone()
    }

    fn leader_lease_valid(&self, epoch: Epoch) -> bool {
        self.seam.leader_lease_valid(epoch)
    }

    fn load(&self) -> BoxFuture<'_, Result<OracleState, BackendError>> {
        Box::pin(self.seam.load())
    }

    fn apply(
        &self,
        cmd: OracleCommand,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<Stored, BackendError>> {
        Box::pin(self.seam.apply(cmd, epoch))
    }
}

fn openraft_config(
    t: &RaftTimings,
    snapshot: &SnapshotOptions,
) -> Result<std::sync::Arc<openraft::Config>, RaftOpenError> {
    let ms = |d: Duration| d.as_millis() as u64;
    let config = openraft::Config {
        cluster_name: "tso".to_owned(),
        heartbeat_interval: ms(t.heartbeat_interval),
        election_timeout_min: ms(t.election_timeout_min),
        election_timeout_max: ms(t.election_timeout_max),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot.every_entries),
        max_in_snapshot_log_to_keep: snapshot.entries_kept,
        purge_batch_size: PURGE_BATCH_ENTRIES,
        ..Default::default()
    };
    let config = config
        .validate()
        .map_err(|e| RaftOpenError::Config(e.to_string()))?;
    Ok(std::sync::Arc::new(config))
}

async fn initialize(raft: &Raft, members: BTreeMap<u64, NodeAddrs>) -> Result<(), RaftOpenError> {
    match raft.initialize(members).await {
        Ok(()) => Ok(()),
        // Another member initialized first and this node already heard from it: the cluster
        // exists, which is what initialize wants.
        Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
        Err(e) => Err(RaftOpenError::Start(e.to_string())),
    }
}
