//! openraft's own storage conformance suite, and crash/reopen checks of the durable store.

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder};
use tempfile::TempDir;

use super::log_store::{LOG_FILE, LogStore};
use super::state_machine::StateMachine;
use super::types::{Command, Entry, LogId, StorageError, TypeConfig, Vote};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open(dir.path()).expect("open log");
        let sm = StateMachine::open(dir.path()).expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn advance(term: u64, index: u64, at_least_ms: u64) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Command::AdvanceHighWater { at_least_ms }),
    }
}

/// Appends and waits for the flush callback, as openraft does.
async fn append(log: &mut LogStore, entries: Vec<Entry>) {
    log.blocking_append(entries).await.expect("append");
}

#[tokio::test]
async fn log_and_vote_survive_reopen_and_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(dir.path()).unwrap();
        log.save_vote(&Vote::new(3, 1)).await.unwrap();
        append(&mut log, (1..=5).map(|i| advance(3, i, i * 100)).collect()).await;
        log.truncate(log_id(3, 5)).await.unwrap();
        log.purge(log_id(3, 1)).await.unwrap();
    }
    // A crash in the middle of the next append leaves half a record.
    let path = dir.path().join(LOG_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&[42, 0, 0, 0, 1, 2]);
    std::fs::write(&path, &bytes).unwrap();

    let mut log = LogStore::open(dir.path()).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(3, 1)));
    assert_eq!(state.last_log_id, Some(log_id(3, 4)));
    let entries = openraft::RaftLogReader::try_get_log_entries(&mut log, 0..100)
        .await
        .unwrap();
    let indexes: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
    assert_eq!(indexes, vec![2, 3, 4]);
}

#[tokio::test]
async fn state_machine_applies_max_and_snapshot_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut sm = StateMachine::open(dir.path()).unwrap();
        let replies = sm
            .apply(vec![
                advance(1, 1, 500),
                advance(1, 2, 300),
                advance(1, 3, 900),
            ])
            .await
            .unwrap();
        let values: Vec<u64> = replies.iter().map(|r| r.high_water_ms).collect();
        assert_eq!(values, vec![500, 500, 900], "applied as max");
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        sm.apply(vec![advance(1, 4, 1_000)]).await.unwrap();
    }
    let mut sm = StateMachine::open(dir.path()).unwrap();
    assert_eq!(
        sm.high_water_ms(),
        900,
        "the snapshot is durable; later entries replay from the log"
    );
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 3)));
}

fn advance_sequences(term: u64, index: u64, ends: &[(&str, u64)]) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Command::AdvanceSequences {
            ends: ends.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }),
    }
}

#[tokio::test]
async fn sequence_counters_apply_as_max_per_key_and_ride_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut sm = StateMachine::open(dir.path()).unwrap();
        sm.apply(vec![
            advance_sequences(1, 1, &[("a", 10), ("b", 4)]),
            advance_sequences(1, 2, &[("a", 7)]),
            advance(1, 3, 900),
        ])
        .await
        .unwrap();
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        sm.apply(vec![advance_sequences(1, 4, &[("a", 20)])])
            .await
            .unwrap();
    }
    let sm = StateMachine::open(dir.path()).unwrap();
    let expected: std::collections::BTreeMap<String, u64> =
        [("a".to_string(), 10), ("b".to_string(), 4)].into();
    assert_eq!(
        sm.sequences(),
        expected,
        "a counter never goes down; the snapshot keeps them"
    );
    assert_eq!(sm.high_water_ms(), 900);
}

/// A snapshot written before dense sequences existed still opens, with no counters.
#[test]
fn a_snapshot_from_before_sequences_opens_without_counters() {
    #[derive(serde::Serialize)]
    struct OldState {
        last_applied: Option<LogId>,
        membership: super::types::StoredMembership,
        high_water_ms: u64,
    }
    let old = OldState {
        last_applied: Some(log_id(2, 7)),
        membership: Default::default(),
        high_water_ms: 1_234,
    };
    let data = postcard::to_stdvec(&old).unwrap();
    let state = super::state_machine::decode_state_for_tests(&data).expect("old layout decodes");
    assert_eq!(state, (Some(log_id(2, 7)), 1_234, 0));
}
