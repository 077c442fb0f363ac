//! The replicated state machine: the oracle's record ([`OracleState`], changed only by its
//! merge rules), the cluster's identity, plus what openraft needs (last applied log id,
//! membership) and its snapshot.
//!
//! The state itself lives in memory; durability comes from the log (entries are fsync'd before
//! they count) and from the snapshot file, written atomically before openraft may purge the log
//! it covers. At open the state is the snapshot's; openraft re-applies the log after it.
//! Invariant: the snapshot layouts are those of earlier builds (the record's fields sit inline
//! where the flat fields were), so every earlier build of a cluster reads what this one writes.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};

use super::record_file::{RecordFile, RecordFileError};
use super::seam::Record;
use super::types::{
    Applied, Command, Entry, LogId, Snapshot, SnapshotMeta, SnapshotMetaV1, StorageError,
    StoredMembership, StoredMembershipV1, TypeConfig, snapshot_meta_from_v1,
    stored_membership_from_v1,
};
use crate::backend::{OracleCommand, OracleState, SeqCounters};

/// File name of the snapshot inside the raft data directory.
pub const SNAPSHOT_FILE: &str = "raft-snapshot";

/// File name of the seed `tso init --from` writes into a fresh raft data directory: the
/// [`OracleState`] the node's state machine starts from while it has no snapshot (see
/// [`StateMachine::open`] and `seed.rs`). One record, [`SEED_VERSION`] then postcard.
pub const SEED_FILE: &str = "raft-seed";

/// The first byte of the seed record.
const SEED_VERSION: u8 = 1;

/// The whole replicated state; a snapshot is this, encoded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// postcard writes a nested struct's fields inline: the bytes are those of the flat fields
    /// (high-water, counters, lease term, lease record) of earlier builds.
    oracle: OracleState,
    /// The cluster's identity, once its first leader recorded one.
    cluster_id: Option<u128>,
    /// Each member's incarnation (the data directory it answered from), once recorded.
    incarnations: BTreeMap<u64, u64>,
}

/// The first byte of snapshot state data that carries the cluster identity and incarnations
/// (written only once there is one, so that a node of the version before can still read the
/// snapshots of a cluster that has not recorded any).
const LAYOUT_WITH_IDENTITY_MARK: u8 = 0xA3;

/// The state layout behind [`LAYOUT_WITH_ADMIN_MARK`]: as today's, without the identity.
#[derive(Debug, Serialize, Deserialize)]
struct StateV2 {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    oracle: OracleState,
}

/// The first byte of a snapshot (file record and state data) whose membership carries admin
/// addresses. Every older layout starts with an `Option` tag, 0 or 1, so the mark can never
/// be mistaken for one, and an older build refuses a marked snapshot instead of misreading it.
const LAYOUT_WITH_ADMIN_MARK: u8 = 0xA2;

/// The layouts of snapshots written by earlier versions (unmarked); read, never written.
/// postcard is not self-describing: each is tried from the newest, and an older layout fails
/// on the fields it lacks before a newer one could be mistaken for it.
#[derive(Debug, Deserialize)]
struct StateV1WithLeases {
    last_applied: Option<LogId>,
    membership: StoredMembershipV1,
    oracle: OracleState,
}

#[derive(Debug, Deserialize)]
struct StateWithoutLeases {
    last_applied: Option<LogId>,
    membership: StoredMembershipV1,
    high_water_ms: u64,
    sequences: BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
struct StateWithoutSequences {
    last_applied: Option<LogId>,
    membership: StoredMembershipV1,
    high_water_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// A snapshot file record from before admin addresses (unmarked); read, never written.
#[derive(Debug, Deserialize)]
struct StoredSnapshotV1 {
    meta: SnapshotMetaV1,
    data: Vec<u8>,
}

/// `value` encoded behind [`LAYOUT_WITH_ADMIN_MARK`].
fn encode_marked<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = vec![LAYOUT_WITH_ADMIN_MARK];
    out.extend(postcard::to_stdvec(value).expect("snapshot parts always encode"));
    out
}

/// Decodes a snapshot file record, marked or of the layout before admin addresses.
fn decode_stored(bytes: &[u8]) -> Option<StoredSnapshot> {
    if let Some(rest) = bytes.strip_prefix(&[LAYOUT_WITH_ADMIN_MARK]) {
        return postcard::from_bytes(rest).ok();
    }
    let old: StoredSnapshotV1 = postcard::from_bytes(bytes).ok()?;
    Some(StoredSnapshot {
        meta: snapshot_meta_from_v1(old.meta),
        data: old.data,
    })
}

#[derive(Debug)]
struct Inner {
    state: State,
    /// The seed this directory was initialized with (`tso init --from`), if any.
    seed: Option<OracleState>,
    snapshot: Option<StoredSnapshot>,
    file: RecordFile,
    /// Counts snapshots built by this process, to keep snapshot ids unique.
    built_count: u64,
}

/// The state machine handed to openraft; clones share the state.
#[derive(Debug, Clone)]
pub struct StateMachine {
    inner: Arc<Mutex<Inner>>,
}

impl StateMachine {
    /// Opens the state machine in `dir`, starting from the stored snapshot if there is one,
    /// else from the directory's seed (`tso init --from`), else from nothing. openraft then
    /// re-applies the log after it; the merge rules only ratchet, so a seed under the log's
    /// entries is the seed raised by them. A snapshot, once there, was built from (or installed
    /// from a leader holding) a state that already includes the seed.
    pub fn open(dir: &Path) -> Result<Self, RecordFileError> {
        let seed = read_seed(dir)?.map(|(seed, _)| seed);
        let path = dir.join(SNAPSHOT_FILE);
        let (file, payloads) = RecordFile::open(&path)?;
        let corrupt = || RecordFileError::Corrupt {
            path: path.clone(),
            offset: 0,
        };
        let snapshot: Option<StoredSnapshot> = match payloads.last() {
            Some(p) => Some(decode_stored(p).ok_or_else(corrupt)?),
            None => None,
        };
        let state = match &snapshot {
            Some(s) => decode_state(&s.data).ok_or_else(corrupt)?,
            None => State {
                oracle: seed.clone().unwrap_or_default(),
                ..State::default()
            },
        };
        let inner = Inner {
            state,
            seed,
            snapshot,
            file,
            built_count: 0,
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("state machine mutex poisoned")
    }

    /// The applied high-water, in milliseconds.
    pub fn high_water_ms(&self) -> u64 {
        self.lock().state.oracle.high_water_ms
    }

    /// The applied dense-sequence counters.
    pub fn sequences(&self) -> SeqCounters {
        self.lock().state.oracle.sequences.clone()
    }

    /// The applied stamping-lease record and the term that wrote it.
    pub fn leases(&self) -> (u64, Vec<u8>) {
        let oracle = &self.lock().state.oracle;
        (oracle.lease_term, oracle.leases.clone())
    }

    /// The seed this directory was initialized with, if any.
    pub fn seed(&self) -> Option<OracleState> {
        self.lock().seed.clone()
    }

    /// Whether a snapshot is stored.
    pub fn has_snapshot(&self) -> bool {
        self.lock().snapshot.is_some()
    }

    /// The recorded cluster identity, if any.
    pub fn cluster_id(&self) -> Option<u128> {
        self.lock().state.cluster_id
    }

    /// The recorded incarnation of `node`, if any.
    pub fn incarnation_of(&self, node: u64) -> Option<u64> {
        self.lock().state.incarnations.get(&node).copied()
    }

    /// The voters and learners of the applied membership.
    pub fn member_ids(&self) -> Vec<u64> {
        self.lock()
            .state
            .membership
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect()
    }
}

impl Record<TypeConfig> for StateMachine {
    fn wrap(&self, cmd: OracleCommand) -> Command {
        Command::from(cmd)
    }

    fn with_state<T>(&self, f: impl FnOnce(&OracleState) -> T) -> T {
        f(&self.lock().state.oracle)
    }
}

/// Decodes a snapshot's state: marked, the current layout; unmarked, one of the layouts from
/// before admin addresses (every admin address unknown). One written before dense sequences
/// had none, so it decodes as that layout with every counter at 0 (postcard stops short of the
/// missing map).
fn decode_state(data: &[u8]) -> Option<State> {
    if let Some(rest) = data.strip_prefix(&[LAYOUT_WITH_IDENTITY_MARK]) {
        return postcard::from_bytes::<State>(rest).ok();
    }
    if let Some(rest) = data.strip_prefix(&[LAYOUT_WITH_ADMIN_MARK]) {
        let v2 = postcard::from_bytes::<StateV2>(rest).ok()?;
        return Some(State {
            last_applied: v2.last_applied,
            membership: v2.membership,
            oracle: v2.oracle,
            ..State::default()
        });
    }
    if let Ok(old) = postcard::from_bytes::<StateV1WithLeases>(data) {
        return Some(State {
            last_applied: old.last_applied,
            membership: stored_membership_from_v1(old.membership),
            oracle: old.oracle,
            ..State::default()
        });
    }
    if let Ok(old) = postcard::from_bytes::<StateWithoutLeases>(data) {
        return Some(State {
            last_applied: old.last_applied,
            membership: stored_membership_from_v1(old.membership),
            oracle: OracleState {
                high_water_ms: old.high_water_ms,
                sequences: old.sequences,
                ..OracleState::default()
            },
            ..State::default()
        });
    }
    let old: StateWithoutSequences = postcard::from_bytes(data).ok()?;
    Some(State {
        last_applied: old.last_applied,
        membership: stored_membership_from_v1(old.membership),
        oracle: OracleState {
            high_water_ms: old.high_water_ms,
            ..OracleState::default()
        },
        ..State::default()
    })
}

/// A snapshot's state data: behind [`LAYOUT_WITH_IDENTITY_MARK`] once an identity is recorded,
/// else in the layout before it, which every earlier build of the same cluster reads.
fn encode_state(state: &State) -> Vec<u8> {
    if state.cluster_id.is_some() || !state.incarnations.is_empty() {
        let mut out = vec![LAYOUT_WITH_IDENTITY_MARK];
        out.extend(postcard::to_stdvec(state).expect("the state always encodes"));
        return out;
    }
    encode_marked(&StateV2 {
        last_applied: state.last_applied,
        membership: state.membership.clone(),
        oracle: state.oracle.clone(),
    })
}

/// What a decoded snapshot holds: last applied, high-water, number of counters (tests only).
#[cfg(test)]
pub(super) fn decode_state_for_tests(data: &[u8]) -> Option<(Option<LogId>, u64, usize)> {
    decode_state(data).map(|s| {
        let oracle = &s.oracle;
        (s.last_applied, oracle.high_water_ms, oracle.sequences.len())
    })
}

/// Writes `seed` as the seed of the fresh raft data directory `dir`, durably (temporary file,
/// fsync, rename, directory fsync). The caller checked that `dir` is empty.
pub fn write_seed(dir: &Path, seed: &OracleState) -> Result<(), RecordFileError> {
    let mut bytes = vec![SEED_VERSION];
    bytes.extend(postcard::to_stdvec(seed).expect("an OracleState encodes"));
    let (mut file, _) = RecordFile::open(&dir.join(SEED_FILE))?;
    file.rewrite(&[bytes])
}

/// The seed of `dir` and its fingerprint (the CRC32C of its record), read without changing
/// anything; `None` when the directory has no seed.
pub fn read_seed(dir: &Path) -> Result<Option<(OracleState, u32)>, RecordFileError> {
    let path = dir.join(SEED_FILE);
    let payloads = super::record_file::read_only(&path)?;
    let Some(last) = payloads.last() else {
        return Ok(None);
    };
    let corrupt = || RecordFileError::Corrupt {
        path: path.clone(),
        offset: 0,
    };
    let body = last.strip_prefix(&[SEED_VERSION]).ok_or_else(corrupt)?;
    let (seed, rest) = postcard::take_from_bytes::<OracleState>(body).map_err(|_| corrupt())?;
    if !rest.is_empty() {
        return Err(corrupt());
    }
    Ok(Some((seed, crc32c::crc32c(last))))
}

/// Everything a stopped node's copy of a data directory could have answered from, read without
/// changing anything: the stored snapshot's state (or the seed, or nothing), then every entry of
/// its log after the snapshot, committed or not. An entry that was never committed, or was
/// later truncated on the live cluster, only raises the result: a restore must be above what
/// was answered, and being further above is safe.
pub fn read_offline(dir: &Path) -> Result<OracleState, RecordFileError> {
    let path = dir.join(SNAPSHOT_FILE);
    let corrupt = || RecordFileError::Corrupt {
        path: path.clone(),
        offset: 0,
    };
    let mut state = match super::record_file::read_only(&path)?.last() {
        Some(p) => {
            let stored = decode_stored(p).ok_or_else(corrupt)?;
            let mut state = decode_state(&stored.data).ok_or_else(corrupt)?;
            state.last_applied = stored.meta.last_log_id;
            state
        }
        None => State {
            oracle: read_seed(dir)?.map(|(seed, _)| seed).unwrap_or_default(),
            ..State::default()
        },
    };
    for entry in super::log_store::entries_read_only(dir)? {
        if state
            .last_applied
            .is_some_and(|applied| entry.log_id.index <= applied.index)
        {
            continue;
        }
        apply_one(&mut state, entry);
    }
    Ok(state.oracle)
}

fn apply_one(state: &mut State, entry: Entry) -> Applied {
    state.last_applied = Some(entry.log_id);
    match entry.payload {
        EntryPayload::Blank => {}
        EntryPayload::Normal(command) => apply_command(state, command),
        EntryPayload::Membership(m) => {
            // A node that leaves is forgotten: its id may come back as a new member.
            state.incarnations.retain(|id, _| m.get_node(id).is_some());
            state.membership = StoredMembership::new(Some(entry.log_id), m);
        }
    }
    Applied {
        high_water_ms: state.oracle.high_water_ms,
    }
}

fn apply_command(state: &mut State, command: Command) {
    let cmd = match command {
        Command::AdvanceHighWater { at_least_ms } => {
            OracleCommand::AdvanceHighWater { at_least_ms }
        }
        Command::AdvanceSequences { ends } => OracleCommand::AdvanceSequences { ends },
        Command::ReplaceLeases { term, record } => OracleCommand::ReplaceLeases { term, record },
        Command::RecordClusterId { id } => {
            state.cluster_id.get_or_insert(id);
            return;
        }
        Command::RecordIncarnation { node, incarnation } => {
            if state.membership.membership().get_node(&node).is_some() {
                state.incarnations.entry(node).or_insert(incarnation);
            }
            return;
        }
    };
    state.oracle.apply(&cmd);
}

impl Inner {
    /// Makes `snapshot` the current one, durably, then replaces the state with its content.
    fn store_snapshot(
        &mut self,
        snapshot: StoredSnapshot,
        state: State,
    ) -> Result<(), Box<StorageError>> {
        let bytes = encode_marked(&snapshot);
        self.file.rewrite(&[bytes]).map_err(|e| {
            Box::new(StorageIOError::write_snapshot(Some(snapshot.meta.signature()), &e).into())
        })?;
        self.state = state;
        self.snapshot = Some(snapshot);
        Ok(())
    }

    fn current(&self) -> Option<Snapshot> {
        self.snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let mut inner = self.lock();
        inner.built_count += 1;
        let state = inner.state.clone();
        let data = encode_state(&state);
        let snapshot_id = match state.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, inner.built_count),
            None => format!("none-{}", inner.built_count),
        };
        let meta = SnapshotMeta {
            last_log_id: state.last_applied,
            last_membership: state.membership.clone(),
            snapshot_id,
        };
        inner
            .store_snapshot(StoredSnapshot { meta, data }, state)
            .map_err(|e| *e)?;
        Ok(inner.current().expect("just stored"))
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let inner = self.lock();
        Ok((inner.state.last_applied, inner.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut inner = self.lock();
        Ok(entries
            .into_iter()
            .map(|e| apply_one(&mut inner.state, e))
            .collect())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let mut state = decode_state(&data).ok_or_else(|| -> StorageError {
            StorageIOError::read_snapshot(Some(meta.signature()), &DecodeError).into()
        })?;
        // The meta is authoritative for what the snapshot covers.
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.lock().store_snapshot(stored, state).map_err(|e| *e)
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.lock().current())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("snapshot data does not decode as the oracle's state")]
struct DecodeError;
