//! openraft's own storage conformance suite, and crash/reopen checks of the durable store.

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader, RaftSnapshotBuilder};
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
        membership: super::types::StoredMembershipV1,
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

fn members_v1() -> openraft::Membership<u64, super::types::NodeAddrsV1> {
    let nodes: std::collections::BTreeMap<u64, super::types::NodeAddrsV1> = (1..=3)
        .map(|id| {
            let addrs = super::types::NodeAddrsV1 {
                client_addr: format!("10.0.0.{id}:7001"),
                peer_addr: format!("10.0.0.{id}:7101"),
            };
            (id, addrs)
        })
        .collect();
    openraft::Membership::new(vec![[1, 2].into_iter().collect()], nodes)
}

fn check_members_from_v1(m: &openraft::Membership<u64, super::NodeAddrs>) {
    let voters: Vec<u64> = m.voter_ids().collect();
    let learners: Vec<u64> = m.learner_ids().collect();
    assert_eq!((voters, learners), (vec![1, 2], vec![3]));
    let n3 = m.get_node(&3).expect("node 3 kept");
    assert_eq!(n3.client_addr, "10.0.0.3:7001");
    assert_eq!(n3.peer_addr, "10.0.0.3:7101");
    assert_eq!(
        n3.admin_addr, "",
        "an old member's admin address is unknown"
    );
}

/// A log written before admin addresses (entries of the old member layout under the old
/// record variant) opens, with its membership intact and admin addresses unknown; entries
/// appended after it use the new layout, and both survive a reopen.
#[tokio::test]
async fn a_log_from_before_admin_addresses_opens() {
    #[derive(serde::Serialize)]
    enum OldRecord {
        Vote(Vote),
        Entry(super::types::EntryV1),
    }
    let dir = tempfile::tempdir().unwrap();
    let old = [
        OldRecord::Vote(Vote::new_committed(1, 1)),
        OldRecord::Entry(super::types::EntryV1 {
            log_id: log_id(1, 1),
            payload: EntryPayload::Membership(members_v1()),
        }),
        OldRecord::Entry(super::types::EntryV1 {
            log_id: log_id(1, 2),
            payload: EntryPayload::Normal(Command::AdvanceHighWater { at_least_ms: 77 }),
        }),
    ];
    let payloads: Vec<Vec<u8>> = old
        .iter()
        .map(|r| postcard::to_stdvec(r).unwrap())
        .collect();
    let (mut file, _) = super::record_file::RecordFile::open(&dir.path().join(LOG_FILE)).unwrap();
    file.append(&payloads).unwrap();
    drop(file);
    for round in 0..2 {
        let mut log = LogStore::open(dir.path()).expect("old log opens");
        let entries = log.try_get_log_entries(1..=3).await.unwrap();
        assert_eq!(entries.len(), 2 + round, "round {round}");
        let EntryPayload::Membership(m) = &entries[0].payload else {
            panic!("entry 1 is not the membership: {:?}", entries[0]);
        };
        check_members_from_v1(m);
        assert!(matches!(
            entries[1].payload,
            EntryPayload::Normal(Command::AdvanceHighWater { at_least_ms: 77 })
        ));
        if round == 0 {
            append(&mut log, vec![advance(1, 3, 88)]).await;
        }
    }
}

/// A snapshot file written before admin addresses opens, with its membership and state; the
/// next snapshot is written in the new layout and opens too.
#[tokio::test]
async fn a_snapshot_from_before_admin_addresses_opens() {
    #[derive(serde::Serialize)]
    struct OldState {
        last_applied: Option<LogId>,
        membership: super::types::StoredMembershipV1,
        high_water_ms: u64,
        sequences: std::collections::BTreeMap<String, u64>,
        lease_term: u64,
        leases: Vec<u8>,
    }
    #[derive(serde::Serialize)]
    struct OldStoredSnapshot {
        meta: super::types::SnapshotMetaV1,
        data: Vec<u8>,
    }
    let membership = super::types::StoredMembershipV1::new(Some(log_id(1, 1)), members_v1());
    let state = OldState {
        last_applied: Some(log_id(1, 9)),
        membership: membership.clone(),
        high_water_ms: 4_321,
        sequences: [("k".to_owned(), 5)].into_iter().collect(),
        lease_term: 1,
        leases: vec![1, 2, 3],
    };
    let stored = OldStoredSnapshot {
        meta: super::types::SnapshotMetaV1 {
            last_log_id: Some(log_id(1, 9)),
            last_membership: membership,
            snapshot_id: "old".to_owned(),
        },
        data: postcard::to_stdvec(&state).unwrap(),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(super::state_machine::SNAPSHOT_FILE);
    let (mut file, _) = super::record_file::RecordFile::open(&path).unwrap();
    file.rewrite(&[postcard::to_stdvec(&stored).unwrap()])
        .unwrap();
    drop(file);
    for round in 0..2 {
        let mut sm = StateMachine::open(dir.path()).expect("old snapshot opens");
        let (applied, members) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(1, 9)), "round {round}");
        check_members_from_v1(members.membership());
        assert_eq!(sm.high_water_ms(), 4_321);
        assert_eq!(sm.sequences().get("k"), Some(&5));
        assert_eq!(sm.leases(), (1, vec![1, 2, 3]));
        let current = sm
            .get_current_snapshot()
            .await
            .unwrap()
            .expect("a snapshot");
        check_members_from_v1(current.meta.last_membership.membership());
        if round == 0 {
            sm.build_snapshot().await.expect("a new-layout snapshot");
        }
    }
}

/// The log's oracle commands are [`crate::backend::OracleCommand`]'s: same variant index,
/// same fields, so an entry's bytes are the oracle command's bytes.
#[test]
fn log_commands_encode_as_the_oracle_commands() {
    use crate::backend::OracleCommand;
    let commands = [
        OracleCommand::AdvanceHighWater { at_least_ms: 300 },
        OracleCommand::AdvanceSequences {
            ends: vec![("k".to_owned(), 9)],
        },
        OracleCommand::ReplaceLeases {
            term: 4,
            record: vec![7, 8],
        },
    ];
    for (index, cmd) in commands.into_iter().enumerate() {
        let oracle = postcard::to_stdvec(&cmd).unwrap();
        assert_eq!(oracle[0], index as u8, "variant index of {cmd:?}");
        assert_eq!(postcard::to_stdvec(&Command::from(cmd)).unwrap(), oracle);
    }
}

/// A snapshot's state data is the flat layout of earlier builds: the oracle's record nested in
/// the state writes the same bytes as its fields did inline, with and without an identity.
#[tokio::test]
async fn snapshot_state_keeps_the_flat_layout() {
    #[derive(serde::Serialize)]
    struct Flat {
        last_applied: Option<LogId>,
        membership: super::types::StoredMembership,
        high_water_ms: u64,
        sequences: std::collections::BTreeMap<String, u64>,
        lease_term: u64,
        leases: Vec<u8>,
    }
    #[derive(serde::Serialize)]
    struct FlatWithIdentity {
        flat: Flat,
        cluster_id: Option<u128>,
        incarnations: std::collections::BTreeMap<u64, u64>,
    }
    let flat = || Flat {
        last_applied: Some(log_id(1, 4)),
        membership: Default::default(),
        high_water_ms: 900,
        sequences: [("a".to_owned(), 10)].into_iter().collect(),
        lease_term: 1,
        leases: vec![5, 6],
    };
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachine::open(dir.path()).unwrap();
    let entry = |index, command| Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(command),
    };
    sm.apply(vec![
        advance(1, 1, 900),
        advance_sequences(1, 2, &[("a", 10)]),
        entry(
            3,
            Command::ReplaceLeases {
                term: 1,
                record: vec![5, 6],
            },
        ),
        advance(1, 4, 800),
    ])
    .await
    .unwrap();
    let data = sm.build_snapshot().await.unwrap().snapshot.into_inner();
    let mut expected = vec![0xA2];
    expected.extend(postcard::to_stdvec(&flat()).unwrap());
    assert_eq!(data, expected, "without an identity");

    sm.apply(vec![entry(5, Command::RecordClusterId { id: 42 })])
        .await
        .unwrap();
    let data = sm.build_snapshot().await.unwrap().snapshot.into_inner();
    let with_identity = FlatWithIdentity {
        flat: Flat {
            last_applied: Some(log_id(1, 5)),
            ..flat()
        },
        cluster_id: Some(42),
        incarnations: Default::default(),
    };
    let mut expected = vec![0xA3];
    expected.extend(postcard::to_stdvec(&with_identity).unwrap());
    assert_eq!(data, expected, "with an identity");
}
