//! Who is on the other end of a peer RPC: every request and every reply carries the sender's
//! node id, the incarnation of its data directory, a nonce of its process and, once recorded,
//! the cluster's identity. Both ends check them against what the cluster recorded
//! (`Command::RecordClusterId`, `Command::RecordIncarnation`, applied by every member):
//!
//! - a node of another cluster is refused;
//! - a member that answers with another incarnation than the one recorded for it (its data
//!   directory was wiped or replaced, and it runs again under its old id) is refused as a peer:
//!   its vote requests are refused, and its votes and append acknowledgements are thrown away
//!   by whoever asked, so it never votes, never counts toward a commit or a lease, and never
//!   leads, until it is removed and rejoins under a new id;
//! - a node that finds itself replaced (the cluster records another incarnation for its id)
//!   refuses every peer RPC and says so in its log.
//!
//! A member's incarnation is recorded by the leader the first time the member answers it; the
//! cluster's identity by the first leader that knows the incarnations of a majority of the
//! members. Neither is written while a member answers without these headers (a node of an
//! older version, during an upgrade node by node): it could not read the command. A request or
//! reply without the headers is accepted.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

use super::state_machine::StateMachine;
use super::types::NodeId;

pub const NODE_HEADER: &str = "tso-node";
pub const INCARNATION_HEADER: &str = "tso-incarnation";
pub const PROCESS_HEADER: &str = "tso-process";
pub const CLUSTER_HEADER: &str = "tso-cluster";
pub const FORMATION_HEADER: &str = "tso-formation";

/// At most one log line per this interval about a refused peer.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// What a peer's headers say about it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerHeaders {
    pub node: Option<NodeId>,
    pub incarnation: Option<u64>,
    pub process: Option<u64>,
    pub cluster: Option<u128>,
    pub formation: Option<u32>,
}

impl PeerHeaders {
    pub fn read(md: &MetadataMap) -> Self {
        let text = |key| md.get(key).and_then(|v| v.to_str().ok());
        Self {
            node: text(NODE_HEADER).and_then(|s| s.parse().ok()),
            incarnation: text(INCARNATION_HEADER).and_then(|s| u64::from_str_radix(s, 16).ok()),
            process: text(PROCESS_HEADER).and_then(|s| u64::from_str_radix(s, 16).ok()),
            cluster: text(CLUSTER_HEADER).and_then(|s| u128::from_str_radix(s, 16).ok()),
            formation: text(FORMATION_HEADER).and_then(|s| u32::from_str_radix(s, 16).ok()),
        }
    }
}

/// This node's side of the check; shared by its network (requests out, replies in) and its peer
/// service (requests in, replies out).
#[derive(Debug)]
pub struct PeerIdentity {
    pub node_id: NodeId,
    pub incarnation: u64,
    /// Made at every start: a `Campaign` names the process of the leader that sent it.
    pub process: u64,
    /// The digest of the members list this node formed its cluster with, if it was one of the
    /// initial members.
    formation: Option<u32>,
    sm: StateMachine,
    /// Incarnations peers answered with that the cluster has not recorded yet.
    observed: Mutex<BTreeMap<NodeId, u64>>,
    /// Peers whose last reply carried no headers (an older version).
    legacy: Mutex<std::collections::BTreeSet<NodeId>>,
    /// The process of the leader whose entries this node last accepted.
    leader_process: Mutex<Option<(NodeId, u64)>>,
    /// When this node last accepted entries from a leader (its start, before any).
    leader_contact: Mutex<Instant>,
    refusal_logged: Mutex<Option<Instant>>,
    /// The positive control's hole: incarnations are not checked.
    trust_wiped: std::sync::atomic::AtomicBool,
}

impl PeerIdentity {
    pub fn new(
        node_id: NodeId,
        incarnation: u64,
        formation: Option<u32>,
        sm: StateMachine,
    ) -> Self {
        Self {
            node_id,
            incarnation,
            formation,
            process: super::identity::random_u64(),
            sm,
            observed: Mutex::default(),
            legacy: Mutex::default(),
            leader_process: Mutex::default(),
            leader_contact: Mutex::new(Instant::now()),
            refusal_logged: Mutex::default(),
            trust_wiped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Adds this node's headers to an outgoing request or reply.
    pub fn stamp(&self, md: &mut MetadataMap) {
        let mut put = |key: &'static str, value: String| {
            if let Ok(v) = value.parse() {
                md.insert(key, v);
            }
        };
        put(NODE_HEADER, self.node_id.to_string());
        put(INCARNATION_HEADER, format!("{:016x}", self.incarnation));
        put(PROCESS_HEADER, format!("{:016x}", self.process));
        if let Some(cluster) = self.sm.cluster_id() {
            put(CLUSTER_HEADER, format!("{cluster:032x}"));
        }
        if let Some(formation) = self.formation {
            put(FORMATION_HEADER, format!("{formation:08x}"));
        }
    }

    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: a member answering from another data directory
    /// than the one recorded for it is heard as if nothing happened.
    pub fn unsafe_trust_wiped(&self) {
        self.trust_wiped
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn trusts_wiped(&self) -> bool {
        self.trust_wiped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True once the cluster has recorded another incarnation for this node's id.
    pub fn replaced(&self) -> Option<u64> {
        self.sm
            .incarnation_of(self.node_id)
            .filter(|recorded| *recorded != self.incarnation)
    }

    /// Why a peer with `headers` must not be heard, if it must not.
    fn refusal(&self, headers: &PeerHeaders, peer: Option<NodeId>) -> Option<String> {
        if let Some(recorded) = self.replaced().filter(|_| !self.trusts_wiped()) {
            return Some(format!(
                "node {} was replaced: the cluster records incarnation {recorded:016x} for it, \
                 but this data directory is {:016x}. It takes no part under this id: remove it \
                 (`tso admin remove {}`) and rejoin under a new id with --join",
                self.node_id, self.incarnation, self.node_id
            ));
        }
        if let (Some(ours), Some(theirs)) = (self.sm.cluster_id(), headers.cluster)
            && ours != theirs
        {
            return Some(format!(
                "the peer belongs to another cluster ({theirs:032x}; this one is {ours:032x})"
            ));
        }
        if let (Some(ours), Some(theirs)) = (self.formation, headers.formation)
            && ours != theirs
        {
            return Some(format!(
                "the peer was started with another initial members list (--members), or another \
                 `tso init --from` seed, than this node (digest {theirs:08x}, this node \
                 {ours:08x}): every initial member must get the same list, ids and addresses, \
                 and the same seed; stop the nodes, fix the flags, and start them again on empty \
                 data directories (seeded again from the same exports)"
            ));
        }
        let peer = peer.or(headers.node)?;
        if self.trusts_wiped() {
            return None;
        }
        match (self.sm.incarnation_of(peer), headers.incarnation) {
            (Some(recorded), Some(theirs)) if recorded != theirs => Some(format!(
                "node {peer} answers from another data directory (incarnation {theirs:016x}) \
                 than the cluster recorded for it ({recorded:016x}): it was wiped or replaced \
                 and is kept out; remove it (`tso admin remove {peer}`) and let it rejoin under \
                 a new id"
            )),
            _ => None,
        }
    }

    fn log_refusal(&self, what: &str, reason: &str) {
        let mut logged = self.refusal_logged.lock().expect("refusal log lock");
        if logged.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
            *logged = Some(Instant::now());
            tracing::error!("refusing {what}: {reason}");
        }
    }

    /// The check of an incoming request; `Err` is the status to answer with.
    pub fn check_request(&self, md: &MetadataMap) -> Result<PeerHeaders, tonic::Status> {
        let headers = PeerHeaders::read(md);
        match self.refusal(&headers, None) {
            None => Ok(headers),
            Some(reason) => {
                self.log_refusal("a raft peer's request", &reason);
                Err(tonic::Status::failed_precondition(reason))
            }
        }
    }

    /// The check of `target`'s reply; `Err` says why it must be thrown away.
    pub fn check_reply(&self, target: NodeId, md: &MetadataMap) -> Result<(), String> {
        let headers = PeerHeaders::read(md);
        if let Some(reason) = self.refusal(&headers, Some(target)) {
            self.log_refusal("a raft peer's reply", &reason);
            return Err(reason);
        }
        let mut legacy = self.legacy.lock().expect("legacy lock");
        match headers.incarnation {
            None => {
                legacy.insert(target);
            }
            Some(theirs) => {
                legacy.remove(&target);
                if self.sm.incarnation_of(target).is_none() {
                    self.observed
                        .lock()
                        .expect("observed lock")
                        .insert(target, theirs);
                }
            }
        }
        Ok(())
    }

    /// Notes the process of the leader whose entries this node accepts.
    pub fn note_leader(&self, headers: &PeerHeaders) {
        *self.leader_contact.lock().expect("leader contact lock") = Instant::now();
        if let (Some(node), Some(process)) = (headers.node, headers.process) {
            *self.leader_process.lock().expect("leader process lock") = Some((node, process));
        }
    }

    /// True if this node accepted entries from a leader within `window` (counting its start
    /// as a contact, as openraft does).
    pub fn heard_leader_within(&self, window: Duration) -> bool {
        self.leader_contact
            .lock()
            .expect("leader contact lock")
            .elapsed()
            < window
    }

    /// The process of `leader` whose entries this node last accepted, if known.
    pub fn leader_process(&self, leader: NodeId) -> Option<u64> {
        self.leader_process
            .lock()
            .expect("leader process lock")
            .filter(|(node, _)| *node == leader)
            .map(|(_, process)| process)
    }

    /// What the leader should record now: incarnations not recorded yet (this node's own among
    /// them), and whether to name the cluster (once the incarnations of a majority of the
    /// members are known). Nothing while a member answers without headers.
    pub fn to_record(&self) -> (Vec<(NodeId, u64)>, bool) {
        let members = self.sm.member_ids();
        let legacy = self.legacy.lock().expect("legacy lock").clone();
        if members.iter().any(|m| legacy.contains(m)) {
            return (Vec::new(), false);
        }
        let observed = self.observed.lock().expect("observed lock").clone();
        let mut records: Vec<(NodeId, u64)> = Vec::new();
        let mut known = 0;
        for &id in &members {
            if self.sm.incarnation_of(id).is_some() {
                known += 1;
                continue;
            }
            let incarnation = if id == self.node_id {
                Some(self.incarnation)
            } else {
                observed.get(&id).copied()
            };
            if let Some(i) = incarnation {
                known += 1;
                records.push((id, i));
            }
        }
        let name_cluster = self.sm.cluster_id().is_none() && known > members.len() / 2;
        (records, name_cluster)
    }
}
