//! The openraft type configuration of the oracle's cluster: the command in the log, the node
//! data in the membership, and the shared state-machine value. Nothing outside `backend::raft`
//! names these openraft generics.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::backend::OracleCommand;

/// A member's addresses, carried in the raft membership so that every node learns them from
/// the log (a follower's hint can never drift from what the cluster agreed on). All are the
/// *advertised* forms, `host:port`.
///
/// postcard is not self-describing, so this layout is told apart from the older one
/// (`NodeAddrsV1`, without the admin address) by the container that holds it: a log record
/// variant of its own, a version mark in front of snapshots (see `log_store.rs` and
/// `state_machine.rs`). A new field needs the same treatment again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeAddrs {
    /// Where clients reach this node's `tsoracle.v1` service.
    pub client_addr: String,
    /// Where peers reach this node's `tso.raft.v1` service.
    pub peer_addr: String,
    /// Where operators reach this node's `tso.admin.v1` service; empty when unknown (a member
    /// from before admin addresses, or a node started without `--admin-listen`).
    pub admin_addr: String,
}

/// The member addresses as data directories written before admin addresses hold them; read,
/// never written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeAddrsV1 {
    pub client_addr: String,
    pub peer_addr: String,
}

impl From<NodeAddrsV1> for NodeAddrs {
    fn from(old: NodeAddrsV1) -> Self {
        Self {
            client_addr: old.client_addr,
            peer_addr: old.peer_addr,
            admin_addr: String::new(),
        }
    }
}

/// The commands the oracle puts in the log. New variants go at the end: the variant index is
/// what a stored entry carries.
///
/// The first three are [`OracleCommand`]'s, in its order and with its fields, so an entry's
/// bytes are those of the oracle's command (`storage_tests.rs` checks it); the state machine
/// applies them with [`crate::backend::OracleState::apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// [`OracleCommand::AdvanceHighWater`].
    AdvanceHighWater { at_least_ms: u64 },
    /// [`OracleCommand::AdvanceSequences`].
    AdvanceSequences { ends: Vec<(String, u64)> },
    /// [`OracleCommand::ReplaceLeases`].
    ReplaceLeases { term: u64, record: Vec<u8> },
    /// Name the cluster (made by its first leader, see `identity.rs`); the first one applied
    /// stays.
    RecordClusterId { id: u128 },
    /// Bind member `node` to the data directory it answered from (its incarnation); the first
    /// one applied stays until the node leaves the membership.
    RecordIncarnation { node: u64, incarnation: u64 },
}

impl From<OracleCommand> for Command {
    fn from(cmd: OracleCommand) -> Self {
        match cmd {
            OracleCommand::AdvanceHighWater { at_least_ms } => {
                Command::AdvanceHighWater { at_least_ms }
            }
            OracleCommand::AdvanceSequences { ends } => Command::AdvanceSequences { ends },
            OracleCommand::ReplaceLeases { term, record } => {
                Command::ReplaceLeases { term, record }
            }
        }
    }
}

/// What applying any entry returns: the high-water after it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub high_water_ms: u64,
}

openraft::declare_raft_types!(
    /// The type configuration of a tso raft node.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = NodeAddrs,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

openraft::declare_raft_types!(
    /// The type configuration of stored data from before admin addresses: only its serde layout
    /// is used, to read old logs and snapshots.
    pub TypeConfigV1:
        D = Command,
        R = Applied,
        NodeId = u64,
        Node = NodeAddrsV1,
        Entry = openraft::Entry<TypeConfigV1>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeAddrs>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeAddrs>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig>;

pub type EntryV1 = openraft::Entry<TypeConfigV1>;
pub type StoredMembershipV1 = openraft::StoredMembership<NodeId, NodeAddrsV1>;
pub type SnapshotMetaV1 = openraft::SnapshotMeta<NodeId, NodeAddrsV1>;

/// A membership of the old layout, with every admin address unknown.
pub fn membership_from_v1(
    old: openraft::Membership<NodeId, NodeAddrsV1>,
) -> openraft::Membership<NodeId, NodeAddrs> {
    let nodes: std::collections::BTreeMap<NodeId, NodeAddrs> = old
        .nodes()
        .map(|(id, n)| (*id, NodeAddrs::from(n.clone())))
        .collect();
    openraft::Membership::new(old.get_joint_config().clone(), nodes)
}

/// A stored membership of the old layout, with every admin address unknown.
pub fn stored_membership_from_v1(old: StoredMembershipV1) -> StoredMembership {
    StoredMembership::new(*old.log_id(), membership_from_v1(old.membership().clone()))
}

/// A log entry of the old layout.
pub fn entry_from_v1(old: EntryV1) -> Entry {
    let payload = match old.payload {
        openraft::EntryPayload::Blank => openraft::EntryPayload::Blank,
        openraft::EntryPayload::Normal(c) => openraft::EntryPayload::Normal(c),
        openraft::EntryPayload::Membership(m) => {
            openraft::EntryPayload::Membership(membership_from_v1(m))
        }
    };
    Entry {
        log_id: old.log_id,
        payload,
    }
}

/// Snapshot metadata of the old layout.
pub fn snapshot_meta_from_v1(old: SnapshotMetaV1) -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: old.last_log_id,
        last_membership: stored_membership_from_v1(old.last_membership),
        snapshot_id: old.snapshot_id,
    }
}
