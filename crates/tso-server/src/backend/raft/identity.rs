//! Which node, of which cluster, a data directory belongs to. Written once, before the cluster
//! is formed; checked at every later start, so that a directory copied from another node or
//! another cluster fails with a clear error instead of joining with someone else's log.
//!
//! A data directory also has an *incarnation*: a random number made at its first start and
//! stamped both in `raft-identity` and as the first record of the raft log. A start that finds
//! one without the other (the log lost, or the identity lost) is refused: a voter that comes
//! back with its vote and log gone could vote twice in one term, or make a lagging candidate
//! leader (SEMANTICS §12). A directory lost entirely cannot be told from a new one here; its
//! peers keep it out instead: the cluster records each member's incarnation and refuses a
//! member that answers with another one (`network.rs`).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::record_file::{RecordFile, RecordFileError};
use super::{NodeAddrs, RaftOpenError, RaftTimings};

/// File name of the identity record inside the raft data directory.
pub const IDENTITY_FILE: &str = "raft-identity";

/// File name of the recorded raft timings inside the raft data directory.
pub const TIMINGS_FILE: &str = "raft-timings";

/// The second record of `raft-identity`, since incarnations: a tag, then the incarnation.
const INCARNATION_TAG: &[u8] = b"incarnation:";

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
    let Some(first) = payloads.first() else {
        let identity = Identity {
            node_id,
            member_ids,
        };
        let bytes = postcard::to_stdvec(&identity).expect("identity always encodes");
        return Ok(file.rewrite(&[bytes])?);
    };
    let stored: Identity = postcard::from_bytes(first)
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
    let Some(first) = payloads.first() else {
        return Ok(false);
    };
    let stored: Identity = postcard::from_bytes(first)
        .map_err(|_| RaftOpenError::Storage(RecordFileError::Corrupt { path, offset: 0 }))?;
    Ok(stored.node_id == node_id && stored.member_ids.is_empty())
}

/// The node id a data directory belongs to, read without changing anything (for `tso export`
/// of a stopped node's copy); `None` when it has no identity record.
pub fn node_id_read_only(dir: &Path) -> Result<Option<u64>, RecordFileError> {
    let path = dir.join(IDENTITY_FILE);
    let Some(first) = super::record_file::read_only(&path)?.into_iter().next() else {
        return Ok(None);
    };
    let identity: Identity =
        postcard::from_bytes(&first).map_err(|_| RecordFileError::Corrupt { path, offset: 0 })?;
    Ok(Some(identity.node_id))
}

/// What a start found of a data directory's durable parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirParts {
    /// The incarnation stamped in the raft log, if any.
    pub log_incarnation: Option<u64>,
    /// Whether the log holds anything beyond its stamp (a vote, an entry, a purge).
    pub log_written: bool,
    /// Whether a snapshot is stored.
    pub snapshot: bool,
}

/// The identity record as stored: `None` when there is none yet.
fn read_identity(dir: &Path) -> Result<Option<(Identity, Option<u64>)>, RaftOpenError> {
    let path = dir.join(IDENTITY_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let (_, payloads) = RecordFile::open(&path)?;
    let corrupt = |offset| {
        RaftOpenError::Storage(RecordFileError::Corrupt {
            path: path.clone(),
            offset,
        })
    };
    let Some(first) = payloads.first() else {
        return Ok(None);
    };
    let identity: Identity = postcard::from_bytes(first).map_err(|_| corrupt(0))?;
    let incarnation = match payloads.get(1) {
        None => None,
        Some(p) => {
            let bytes = p.strip_prefix(INCARNATION_TAG).ok_or_else(|| corrupt(1))?;
            Some(u64::from_le_bytes(
                bytes.try_into().map_err(|_| corrupt(1))?,
            ))
        }
    };
    Ok(Some((identity, incarnation)))
}

/// Rewrites the identity record with `incarnation` after it.
fn write_identity(dir: &Path, identity: &Identity, incarnation: u64) -> Result<(), RaftOpenError> {
    let (mut file, _) = RecordFile::open(&dir.join(IDENTITY_FILE))?;
    let mut tagged = INCARNATION_TAG.to_vec();
    tagged.extend(incarnation.to_le_bytes());
    let bytes = postcard::to_stdvec(identity).expect("identity always encodes");
    Ok(file.rewrite(&[bytes, tagged])?)
}

/// A fresh random number (the OS seeds std's hasher keys).
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    hasher.finish()
}

/// Why a directory cannot be started as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Partial {
    /// The raft log (and with it the vote) is gone or was replaced; the identity remains.
    LogLost,
    /// The identity is gone; a log or snapshot remains.
    IdentityLost,
    /// The log and the identity come from different directories.
    Mismatched { identity: u64, log: u64 },
}

impl std::fmt::Display for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Partial::LogLost => write!(
                f,
                "its raft log and vote (`raft-log`) are missing or empty while its identity (`raft-identity`) remains"
            ),
            Partial::IdentityLost => write!(
                f,
                "its identity (`raft-identity`) is missing while its raft log or snapshot remains"
            ),
            Partial::Mismatched { identity, log } => write!(
                f,
                "its identity (incarnation {identity:016x}) and its raft log (incarnation {log:016x}) come from different directories"
            ),
        }
    }
}

/// The incarnation of the directory, after checking that its durable parts belong together:
/// made and stamped (log first, then identity) on a first start, adopted on the first start of a
/// directory from before incarnations whose log is intact.
pub fn check_incarnation(
    dir: &Path,
    parts: DirParts,
    stamp_log: impl FnOnce(u64) -> Result<(), RecordFileError>,
) -> Result<u64, RaftOpenError> {
    let partial = |what| RaftOpenError::Partial {
        dir: dir.to_owned(),
        what,
    };
    match (read_identity(dir)?, parts.log_incarnation) {
        (Some((_, Some(identity))), Some(log)) if identity == log => Ok(identity),
        (Some((_, Some(identity))), Some(log)) => {
            Err(partial(Partial::Mismatched { identity, log }))
        }
        (Some((_, Some(_))), None) => Err(partial(Partial::LogLost)),
        // From before incarnations: adopt one if the log shows the directory took part (or,
        // for a node that joined, it may still be waiting to be added). An initial member with
        // an empty log may have lost it.
        (Some((identity, None)), None) => {
            if !parts.log_written && (!identity.member_ids.is_empty() || parts.snapshot) {
                return Err(partial(Partial::LogLost));
            }
            let incarnation = random_u64();
            stamp_log(incarnation)?;
            write_identity(dir, &identity, incarnation)?;
            Ok(incarnation)
        }
        (Some((identity, None)), Some(log)) => {
            // A first start cut between stamping the log and the identity.
            write_identity(dir, &identity, log)?;
            Ok(log)
        }
        (None, Some(log)) if !parts.log_written && !parts.snapshot => {
            // A first start cut after stamping the log: the identity follows in `open`.
            Ok(log)
        }
        (None, _) if parts.log_written || parts.snapshot || parts.log_incarnation.is_some() => {
            Err(partial(Partial::IdentityLost))
        }
        (None, _) => {
            let incarnation = random_u64();
            stamp_log(incarnation)?;
            Ok(incarnation)
        }
    }
}

/// Records `incarnation` after the identity written by [`check_or_write`] on a first start.
pub fn record_incarnation(dir: &Path, incarnation: u64) -> Result<(), RaftOpenError> {
    match read_identity(dir)? {
        Some((_, Some(_))) => Ok(()),
        Some((identity, None)) => write_identity(dir, &identity, incarnation),
        None => Ok(()),
    }
}

/// File name of the formation digest inside the raft data directory.
pub const FORMATION_FILE: &str = "raft-formation";

/// A digest of the initial members list (ids and every address) a node formed its cluster
/// with: every initial member must have been started with the same list, or the first
/// membership entry (built from the lowest id's list) would not be what the others were told.
pub fn formation_digest(members: &BTreeMap<u64, NodeAddrs>) -> u32 {
    let listed: Vec<(&u64, &NodeAddrs)> = members.iter().collect();
    crc32c::crc32c(&postcard::to_stdvec(&listed).expect("members always encode"))
}

/// The formation digest of this directory: recorded at the first start of an initial member
/// (`fresh` with `members`), read back on every later start; `None` for a node that joined, or
/// a directory from before the digest.
///
/// A directory seeded by `tso init --from` folds its seed's fingerprint into the digest, so
/// that initial members seeded differently (or one not seeded at all) refuse each other's peer
/// RPCs like members given different lists: a seeded majority can never elect a leader whose
/// state lacks the seed.
pub fn formation(
    dir: &Path,
    fresh: bool,
    members: &BTreeMap<u64, NodeAddrs>,
) -> Result<Option<u32>, RaftOpenError> {
    let path = dir.join(FORMATION_FILE);
    let (mut file, payloads) = RecordFile::open(&path)?;
    if let Some(stored) = payloads.first() {
        let bytes: [u8; 4] = stored.as_slice().try_into().map_err(|_| {
            RaftOpenError::Storage(RecordFileError::Corrupt {
                path: path.clone(),
                offset: 0,
            })
        })?;
        return Ok(Some(u32::from_le_bytes(bytes)));
    }
    if !fresh || members.is_empty() {
        return Ok(None);
    }
    let digest = match super::state_machine::read_seed(dir)? {
        Some((_, seed)) => crc32c::crc32c_append(formation_digest(members), &seed.to_le_bytes()),
        None => formation_digest(members),
    };
    file.rewrite(&[digest.to_le_bytes().to_vec()])?;
    Ok(Some(digest))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A data directory's parts as `check_incarnation` sees them, with a log stamp in memory.
    struct Dir {
        dir: tempfile::TempDir,
        parts: DirParts,
    }

    impl Dir {
        fn new() -> Dir {
            Dir {
                dir: tempfile::tempdir().unwrap(),
                parts: DirParts {
                    log_incarnation: None,
                    log_written: false,
                    snapshot: false,
                },
            }
        }

        fn check(&mut self) -> Result<u64, RaftOpenError> {
            let mut stamped = None;
            let result = check_incarnation(self.dir.path(), self.parts, |i| {
                stamped = Some(i);
                Ok(())
            });
            if let Some(i) = stamped {
                self.parts.log_incarnation = Some(i);
            }
            result
        }

        /// A first start as `open` makes it: the check, the identity, the incarnation after it.
        fn first_start(&mut self, members: &[u64]) -> u64 {
            let incarnation = self.check().expect("a fresh directory starts");
            let members = members
                .iter()
                .map(|id| (*id, NodeAddrs::default()))
                .collect();
            check_or_write(self.dir.path(), 1, &members).unwrap();
            record_incarnation(self.dir.path(), incarnation).unwrap();
            incarnation
        }
    }

    fn partial(result: Result<u64, RaftOpenError>) -> Partial {
        match result {
            Err(RaftOpenError::Partial { what, .. }) => what,
            other => panic!("expected a refusal of a partial directory, got {other:?}"),
        }
    }

    #[test]
    fn a_directory_keeps_its_incarnation_across_restarts() {
        let mut dir = Dir::new();
        let first = dir.first_start(&[1, 2, 3]);
        dir.parts.log_written = true;
        assert_eq!(dir.check().unwrap(), first);
        assert_eq!(dir.check().unwrap(), first);
        let other = Dir::new().first_start(&[1, 2, 3]);
        assert_ne!(first, other, "every directory gets its own");
    }

    #[test]
    fn a_lost_log_or_a_lost_identity_is_refused() {
        let mut dir = Dir::new();
        dir.first_start(&[1, 2, 3]);
        dir.parts = DirParts {
            log_incarnation: None,
            log_written: false,
            snapshot: false,
        };
        assert_eq!(partial(dir.check()), Partial::LogLost);

        let mut dir = Dir::new();
        let incarnation = dir.first_start(&[1, 2, 3]);
        std::fs::remove_file(dir.dir.path().join(IDENTITY_FILE)).unwrap();
        dir.parts.log_written = true;
        assert_eq!(partial(dir.check()), Partial::IdentityLost);
        dir.parts.log_written = false;
        dir.parts.snapshot = true;
        assert_eq!(partial(dir.check()), Partial::IdentityLost);
        let _ = incarnation;

        let mut dir = Dir::new();
        let ours = dir.first_start(&[1, 2, 3]);
        dir.parts.log_incarnation = Some(ours ^ 1);
        assert_eq!(
            partial(dir.check()),
            Partial::Mismatched {
                identity: ours,
                log: ours ^ 1
            }
        );
    }

    #[test]
    fn a_first_start_cut_short_is_finished_on_the_next() {
        // Cut after the log was stamped, before the identity was written.
        let mut dir = Dir::new();
        let stamped = dir.check().unwrap();
        assert!(!dir.dir.path().join(IDENTITY_FILE).exists());
        assert_eq!(dir.check().unwrap(), stamped);
        // Cut after the identity, before its incarnation.
        let mut dir = Dir::new();
        let stamped = dir.check().unwrap();
        check_or_write(dir.dir.path(), 1, &BTreeMap::new()).unwrap();
        assert_eq!(dir.check().unwrap(), stamped);
        assert_eq!(
            read_identity(dir.dir.path()).unwrap().unwrap().1,
            Some(stamped)
        );
    }

    #[test]
    fn a_directory_from_before_incarnations_is_adopted_when_its_log_is_intact() {
        let old_identity = |dir: &Path, members: &[u64]| {
            let members = members
                .iter()
                .map(|id| (*id, NodeAddrs::default()))
                .collect();
            check_or_write(dir, 1, &members).unwrap();
        };
        let mut dir = Dir::new();
        old_identity(dir.dir.path(), &[1, 2, 3]);
        dir.parts.log_written = true;
        let adopted = dir.check().expect("an intact old directory starts");
        assert_eq!(
            dir.parts.log_incarnation,
            Some(adopted),
            "the log is stamped"
        );
        assert_eq!(dir.check().unwrap(), adopted);

        // An initial member of an old cluster with an empty log may have lost it.
        let mut dir = Dir::new();
        old_identity(dir.dir.path(), &[1, 2, 3]);
        assert_eq!(partial(dir.check()), Partial::LogLost);

        // A node that joined and was never added has nothing to lose.
        let mut dir = Dir::new();
        old_identity(dir.dir.path(), &[]);
        assert!(dir.check().is_ok());
    }
}
