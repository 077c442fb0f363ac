//! Which node, of which cluster, a data directory belongs to. Written once, before the cluster
//! is formed; checked at every later start, so that a directory copied from another node or
//! another cluster fails with a clear error instead of joining with someone else's log.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::record_file::{RecordFile, RecordFileError};
use super::{NodeAddrs, RaftOpenError, RaftTimings};

/// File name of the identity record inside the raft data directory.
pub const IDENTITY_FILE: &str = "raft-identity";

/// File name of the recorded raft timings inside the raft data directory.
pub const TIMINGS_FILE: &str = "raft-timings";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    node_id: u64,
    /// The ids of the initial members (addresses may move; the ids may not); empty for a node
    /// that joined a running cluster.
    member_ids: Vec<u64>,
}

/// Checks the directory's identity against this start, writing it on the first start.
/// A restart may omit the members (`initial_members` empty); if given, their ids must match.
pub fn check_or_write(
    dir: &Path,
    node_id: u64,
    initial_members: &BTreeMap<u64, NodeAddrs>,
) -> Result<(), RaftOpenError> {
    let path = dir.join(IDENTITY_FILE);
    let (mut file, payloads) = RecordFile::open(&path)?;
    let member_ids: Vec<u64> = initial_members.keys().copied().collect();
    let Some(last) = payloads.last() else {
        let identity = Identity {
            node_id,
            member_ids,
        };
        let bytes = postcard::to_stdvec(&identity).expect("identity always encodes");
        return Ok(file.rewrite(&[bytes])?);
    };
    let stored: Identity = postcard::from_bytes(last)
        .map_err(|_| RaftOpenError::Storage(RecordFileError::Corrupt { path, offset: 0 }))?;
    if stored.node_id != node_id {
        return Err(RaftOpenError::WrongNode {
            dir: dir.to_owned(),
            stored: stored.node_id,
            node_id,
        });
    }
    if !member_ids.is_empty() && member_ids != stored.member_ids {
        return Err(RaftOpenError::OtherCluster {
            dir: dir.to_owned(),
            stored: stored.member_ids,
            given: member_ids,
        });
    }
    Ok(())
}

/// True if the directory belongs to `node_id` and was first started to join a running cluster
/// (no initial members recorded): its restart, before or after it was added, waits to be added
/// as its first start did.
pub fn joined_before(dir: &Path, node_id: u64) -> Result<bool, RaftOpenError> {
    let path = dir.join(IDENTITY_FILE);
    if !path.exists() {
        return Ok(false);
    }
    let (_, payloads) = RecordFile::open(&path)?;
    let Some(last) = payloads.last() else {
        return Ok(false);
    };
    let stored: Identity = postcard::from_bytes(last)
        .map_err(|_| RaftOpenError::Storage(RecordFileError::Corrupt { path, offset: 0 }))?;
    Ok(stored.node_id == node_id && stored.member_ids.is_empty())
}

/// Checks this start's raft timings against those recorded at the directory's first start
/// (recording them then, or on the first start of a directory from before they were recorded):
/// the leader lease is sound only while every node keeps the same heartbeat and election
/// timeouts, so a restart with other values is refused.
pub fn check_or_record_timings(dir: &Path, timings: &RaftTimings) -> Result<(), RaftOpenError> {
    let path = dir.join(TIMINGS_FILE);
    let (mut file, payloads) = RecordFile::open(&path)?;
    let given = timings.cluster_key();
    let Some(last) = payloads.last() else {
        return Ok(file.rewrite(&[given.into_bytes()])?);
    };
    let stored = std::str::from_utf8(last)
        .map_err(|_| RaftOpenError::Storage(RecordFileError::Corrupt { path, offset: 0 }))?;
    if stored != given {
        return Err(RaftOpenError::TimingsDiffer {
            dir: dir.to_owned(),
            stored: stored.to_owned(),
            given,
        });
    }
    Ok(())
}
