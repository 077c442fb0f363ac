//! A cluster restored from exports (`tso init --from ... --backend raft`): every initial member
//! starts from the same seed, and the seed goes into the log.
//!
//! `tso init` writes the seed ([`super::state_machine::SEED_FILE`]) into each member's empty
//! data directory before its first start. Three things keep it from being lost:
//!
//! - the state machine of a seeded node starts from the seed while it has no snapshot
//!   (`StateMachine::open`), so a seeded leader's fence reads a high-water at least the seed's
//!   and every counter at least the seed's;
//! - the seed's fingerprint is folded into the formation digest (`identity::formation`), so
//!   initial members seeded differently, or not at all, refuse each other's peer RPCs: when a
//!   majority of the initial members holds the seed, no leader can be elected without it;
//! - the first time a seeded node leads (in each process), [`log_seed`] writes the seed into the
//!   log as ordinary commands. A member that never had the seed file (a learner added later
//!   replays the log from its first entry, or installs a snapshot of a seeded state) gets the
//!   seed that way: before the seed is in the log such a node is only a learner, and it cannot
//!   be promoted before it has caught up with the log.
//!
//! Writing the seed again is harmless: the merge rules take the `max`, and the lease record is
//! written under term 0, which every lease record a later term wrote supersedes.

use std::path::Path;
use std::time::Duration;

use super::RaftTimings;
use super::record_file::RecordFileError;
use super::types::{Command, NodeId, Raft};
use crate::backend::OracleState;

/// The files of a raft data directory (any of them tells one from a file-backend directory).
const RAFT_FILES: [&str; 4] = [
    super::log_store::LOG_FILE,
    super::state_machine::SNAPSHOT_FILE,
    super::identity::IDENTITY_FILE,
    super::state_machine::SEED_FILE,
];

/// Whether `dir` holds any file of a raft data directory.
pub fn is_raft_dir(dir: &Path) -> bool {
    RAFT_FILES.iter().any(|f| dir.join(f).exists())
}

/// The state a stopped raft node's data directory (or a copy of it) holds, and the node id it
/// belongs to when known, read without changing anything (see
/// [`super::state_machine::read_offline`]: the snapshot, or the seed, and every log entry after
/// it, committed or not). The caller makes sure no process runs on the directory.
pub fn export_offline(dir: &Path) -> Result<(OracleState, Option<u64>), RecordFileError> {
    let state = super::state_machine::read_offline(dir)?;
    let node_id = super::identity::node_id_read_only(dir)?;
    Ok((state, node_id))
}

/// Seeds the fresh raft data directory `dir` (created if missing; the caller checked that it is
/// empty) with `seed`, durably. Refuses a seed too large for one record.
pub fn seed_dir(dir: &Path, seed: &OracleState) -> Result<(), RecordFileError> {
    let io = |source| RecordFileError::Io {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let bytes = postcard::to_stdvec(seed)
        .expect("an OracleState encodes")
        .len();
    if bytes >= super::record_file::RECORD_BYTES_MAX {
        return Err(io(std::io::Error::other(format!(
            "the seed takes {bytes} bytes, more than one raft record holds ({} bytes)",
            super::record_file::RECORD_BYTES_MAX
        ))));
    }
    super::state_machine::write_seed(dir, seed)
}

/// The fingerprint of the seed of `dir` (the CRC32C of its record, folded into the formation
/// digest), or `None` when it has no seed.
pub fn seed_fingerprint(dir: &Path) -> Result<Option<u32>, RecordFileError> {
    Ok(super::state_machine::read_seed(dir)?.map(|(_, fingerprint)| fingerprint))
}

/// Keys per `AdvanceSequences` entry of the seed, so that each entry stays a small log record.
const SEED_KEYS_PER_ENTRY: usize = 256;

/// The commands that carry `seed` into the log.
fn seed_commands(seed: &OracleState) -> Vec<Command> {
    let mut commands = vec![Command::AdvanceHighWater {
        at_least_ms: seed.high_water_ms,
    }];
    let ends: Vec<(String, u64)> = seed
        .sequences
        .iter()
        .map(|(key, next)| (key.clone(), *next))
        .collect();
    for chunk in ends.chunks(SEED_KEYS_PER_ENTRY) {
        commands.push(Command::AdvanceSequences {
            ends: chunk.to_vec(),
        });
    }
    if !seed.leases.is_empty() {
        commands.push(Command::ReplaceLeases {
            term: 0,
            record: seed.leases.clone(),
        });
    }
    commands
}

/// Writes `seed` into the log the first time this node leads, then ends; a failed write is
/// tried again on the next round (while the node still leads, or when it leads again).
pub(super) async fn log_seed(raft: Raft, node_id: NodeId, seed: OracleState, timings: RaftTimings) {
    let commands = seed_commands(&seed);
    loop {
        tokio::time::sleep(timings.heartbeat_interval).await;
        let leads = {
            let m = raft.metrics();
            let m = m.borrow();
            if m.running_state.is_err() {
                return;
            }
            m.state == openraft::ServerState::Leader && m.current_leader == Some(node_id)
        };
        if !leads {
            continue;
        }
        let mut written = true;
        for command in &commands {
            let write = tokio::time::timeout(
                timings.call_timeout.max(Duration::from_millis(1)),
                raft.client_write(command.clone()),
            );
            if !matches!(write.await, Ok(Ok(_))) {
                written = false;
                break;
            }
        }
        if written {
            tracing::info!(
                high_water_ms = seed.high_water_ms,
                keys = seed.sequences.len(),
                "the seed of `tso init --from` is in the raft log"
            );
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_becomes_commands_of_bounded_size() {
        let seed = OracleState {
            high_water_ms: 7,
            sequences: (0..600).map(|i| (format!("k{i:04}"), i)).collect(),
            lease_term: 0,
            leases: vec![1, 2, 3],
        };
        let commands = seed_commands(&seed);
        assert_eq!(commands.len(), 1 + 3 + 1);
        assert_eq!(commands[0], Command::AdvanceHighWater { at_least_ms: 7 });
        let keys: usize = commands
            .iter()
            .map(|c| match c {
                Command::AdvanceSequences { ends } => {
                    assert!(ends.len() <= SEED_KEYS_PER_ENTRY);
                    ends.len()
                }
                _ => 0,
            })
            .sum();
        assert_eq!(keys, 600);
        assert_eq!(
            commands[4],
            Command::ReplaceLeases {
                term: 0,
                record: vec![1, 2, 3]
            }
        );
        let empty = seed_commands(&OracleState::default());
        assert_eq!(
            empty.len(),
            1,
            "no lease record, no counters: the high-water only"
        );
    }
}
