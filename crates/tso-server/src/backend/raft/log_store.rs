//! The durable raft log and vote: one [`RecordFile`] replayed into memory at open.
//!
//! Every change (vote, appended entries, truncation, purge, commit index) is a record appended
//! and fsync'd before openraft is told it happened, in call order, so writes are serialized as
//! openraft requires. The commit index is kept so that a restarted node re-applies everything
//! committed before it stopped, before it serves (SEMANTICS §13). The in-memory view always equals the replay of the file. A purge may rewrite the
//! file to drop dead records (atomically: temp file, fsync, rename).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogId, RaftLogReader, StorageIOError};
use serde::{Deserialize, Serialize};

use super::record_file::{RecordFile, RecordFileError};
use super::types::{Entry, EntryV1, LogId, StorageError, TypeConfig, Vote, entry_from_v1};

/// File name of the log inside the raft data directory.
pub const LOG_FILE: &str = "raft-log";

/// A purge rewrites the file when it holds more than this many bytes beyond twice the live
/// records. Entries are tens of bytes, so 64 KiB is thousands of dead records: rewrites stay
/// rare (one per several snapshots) and the file stays under 2 × live + 64 KiB.
const REWRITE_SLACK_BYTES: u64 = 64 * 1024;

/// One change of the log file. Variants are told apart by their index: new ones go at the end.
#[derive(Debug, Serialize, Deserialize)]
enum Record {
    Vote(Vote),
    /// An entry of the layout before admin addresses (read, never written).
    EntryV1(EntryV1),
    /// Delete entries with index >= `since`.
    Truncate {
        since: u64,
    },
    /// Delete entries up to and including `upto`.
    Purge {
        upto: LogId,
    },
    /// The last committed log id. Appended last so that older files stay readable.
    Committed(LogId),
    /// An entry whose membership, if any, carries admin addresses ([`super::NodeAddrs`]).
    Entry(Entry),
    /// The incarnation of the data directory this log belongs to (`identity.rs`), written at
    /// its first start before anything else, and kept by every rewrite.
    Incarnation(u64),
}

#[derive(Debug)]
struct Inner {
    file: RecordFile,
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote>,
    last_purged: Option<LogId>,
    committed: Option<LogId>,
    incarnation: Option<u64>,
}

/// The log store handed to openraft; clones share one file.
#[derive(Debug, Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
}

impl LogStore {
    /// Opens the log in `dir` (created empty if absent) and replays it.
    pub fn open(dir: &Path) -> Result<Self, RecordFileError> {
        let path = dir.join(LOG_FILE);
        let (file, payloads) = RecordFile::open(&path)?;
        let mut inner = Inner {
            file,
            entries: BTreeMap::new(),
            vote: None,
            last_purged: None,
            committed: None,
            incarnation: None,
        };
        for (i, p) in payloads.iter().enumerate() {
            let record: Record = postcard::from_bytes(p).map_err(|_| RecordFileError::Corrupt {
                path: path.clone(),
                offset: i as u64,
            })?;
            inner.replay(record);
        }
        Ok(Self {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("log store mutex poisoned")
    }

    /// The id of the last entry in the log (or of the last purged one when none is left).
    pub fn last_log_id(&self) -> Option<LogId> {
        let inner = self.lock();
        inner
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(inner.last_purged)
    }

    /// The last committed log id raft saved here (for the status call).
    pub fn committed(&self) -> Option<LogId> {
        self.lock().committed
    }

    /// The incarnation this log was stamped with, if any.
    pub fn incarnation(&self) -> Option<u64> {
        self.lock().incarnation
    }

    /// Stamps the log with `incarnation`, durably.
    pub fn set_incarnation(&self, incarnation: u64) -> Result<(), RecordFileError> {
        self.lock().commit(vec![Record::Incarnation(incarnation)])
    }

    /// True if nothing was ever written: no vote, no entry, no purge.
    pub fn is_pristine(&self) -> bool {
        let inner = self.lock();
        inner.vote.is_none() && inner.entries.is_empty() && inner.last_purged.is_none()
    }
}

/// The entries a stopped node's log holds (committed or not, in index order), read without
/// changing anything (see [`super::record_file::read_only`]). The replay is [`Inner::replay`]'s
/// for entries: appends, truncations and purges.
pub(super) fn entries_read_only(dir: &Path) -> Result<Vec<Entry>, RecordFileError> {
    let path = dir.join(LOG_FILE);
    let mut entries: BTreeMap<u64, Entry> = BTreeMap::new();
    for (i, p) in super::record_file::read_only(&path)?.iter().enumerate() {
        let record: Record = postcard::from_bytes(p).map_err(|_| RecordFileError::Corrupt {
            path: path.clone(),
            offset: i as u64,
        })?;
        match record {
            Record::Entry(e) => {
                entries.insert(e.log_id.index, e);
            }
            Record::EntryV1(old) => {
                let e = entry_from_v1(old);
                entries.insert(e.log_id.index, e);
            }
            Record::Truncate { since } => {
                entries.split_off(&since);
            }
            Record::Purge { upto } => {
                entries = entries.split_off(&(upto.index + 1));
            }
            Record::Vote(_) | Record::Committed(_) | Record::Incarnation(_) => {}
        }
    }
    Ok(entries.into_values().collect())
}

impl Inner {
    fn replay(&mut self, record: Record) {
        match record {
            Record::Vote(v) => self.vote = Some(v),
            Record::Entry(e) => {
                self.entries.insert(e.log_id.index, e);
            }
            Record::EntryV1(old) => {
                let e = entry_from_v1(old);
                self.entries.insert(e.log_id.index, e);
            }
            Record::Truncate { since } => {
                self.entries.split_off(&since);
            }
            Record::Purge { upto } => {
                self.entries = self.entries.split_off(&(upto.index + 1));
                if self.last_purged.is_none_or(|p| p < upto) {
                    self.last_purged = Some(upto);
                }
            }
            Record::Committed(c) => {
                if self.committed.is_none_or(|old| old < c) {
                    self.committed = Some(c);
                }
            }
            Record::Incarnation(i) => self.incarnation = Some(i),
        }
    }

    /// Writes the records durably, then applies them to memory.
    fn commit(&mut self, records: Vec<Record>) -> Result<(), RecordFileError> {
        let payloads: Vec<Vec<u8>> = records.iter().map(encode).collect();
        let lazily = super::record_file::acks_before_fsync()
            && records
                .iter()
                .all(|r| matches!(r, Record::Entry(_) | Record::Committed(_)));
        if lazily {
            self.file.append_lazily(&payloads)?;
        } else {
            self.file.append(&payloads)?;
        }
        for r in records {
            self.replay(r);
        }
        Ok(())
    }

    /// The records that rebuild the current state.
    fn live_records(&self) -> Vec<Vec<u8>> {
        let head = [
            self.incarnation.map(Record::Incarnation),
            self.vote.map(Record::Vote),
            self.last_purged.map(|upto| Record::Purge { upto }),
            self.committed.map(Record::Committed),
        ];
        let head = head.into_iter().flatten().map(|r| encode(&r));
        let entries = self
            .entries
            .values()
            .map(|e| encode(&Record::Entry(e.clone())));
        head.chain(entries).collect()
    }

    fn rewrite_if_mostly_dead(&mut self) -> Result<(), RecordFileError> {
        let live = self.live_records();
        let live_bytes: u64 = live.iter().map(|p| p.len() as u64 + 8).sum();
        if self.file.len_bytes() > 2 * live_bytes + REWRITE_SLACK_BYTES {
            self.file.rewrite(&live)?;
        }
        Ok(())
    }
}

fn encode(record: &Record) -> Vec<u8> {
    postcard::to_stdvec(record).expect("a log record always encodes")
}

fn write_err(e: RecordFileError) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(self
            .lock()
            .entries
            .range(range)
            .map(|(_, e)| e.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let inner = self.lock();
        let last = inner.entries.values().next_back().map(|e| *e.get_log_id());
        Ok(LogState {
            last_purged_log_id: inner.last_purged,
            last_log_id: last.or(inner.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.lock()
            .commit(vec![Record::Vote(*vote)])
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        let Some(c) = committed else {
            return Ok(());
        };
        let mut inner = self.lock();
        if inner.committed.is_some_and(|old| old >= c) {
            return Ok(());
        }
        inner
            .commit(vec![Record::Committed(c)])
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let records: Vec<Record> = entries.into_iter().map(Record::Entry).collect();
        let result = self.lock().commit(records);
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.lock()
            .commit(vec![Record::Truncate {
                since: log_id.index,
            }])
            .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut inner = self.lock();
        inner
            .commit(vec![Record::Purge { upto: log_id }])
            .map_err(write_err)?;
        inner.rewrite_if_mostly_dead().map_err(write_err)
    }
}
