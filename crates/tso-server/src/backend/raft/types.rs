//! The openraft type configuration of the oracle's cluster: the command in the log, the node
//! data in the membership, and the shared state-machine value. Nothing outside `backend::raft`
//! names these openraft generics.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

/// A member's addresses, carried in the raft membership so that every node learns them from
/// the log (a follower's hint can never drift from what the cluster agreed on). Both are the
/// *advertised* forms, `host:port`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeAddrs {
    /// Where clients reach this node's `tsoracle.v1` service.
    pub client_addr: String,
    /// Where peers reach this node's `tso.raft.v1` service.
    pub peer_addr: String,
}

/// The commands the oracle puts in the log. New variants go at the end: the variant index is
/// what a stored entry carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Raise the high-water to at least this many milliseconds (applied as `max`).
    AdvanceHighWater { at_least_ms: u64 },
    /// Raise each dense-sequence counter to at least its end (applied as `max` per key), one
    /// group commit of the leader.
    AdvanceSequences { ends: Vec<(String, u64)> },
    /// Replace the stamping-lease record (opaque to the log) with one computed by the leader of
    /// `term`; applied only if no record of a later term is already there.
    ReplaceLeases { term: u64, record: Vec<u8> },
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

pub type NodeId = u64;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, NodeAddrs>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeAddrs>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig>;
