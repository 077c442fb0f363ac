//! Dense sequences (SEMANTICS §11): what a call returns, [`SeqBlock`] and [`SeqBatch`], and
//! the checks on both sides of the wire: a request is validated before any RPC
//! ([`SeqRequest::one`], [`SeqRequest::batch`]), a reply before any caller sees it
//! ([`SeqRequest::validate_one`], [`SeqRequest::validate_batch`]).
//!
//! Invariant: a `SeqBlock` only exists with `count >= 1` and `start + count <= u64::MAX`, so
//! [`SeqBlock::end`] never overflows; a `SeqBatch` holds one block per requested key, in request
//! order, all granted by the leader of its epoch.

use std::collections::HashSet;
use std::ops::Range;

use tso_core::Epoch;
use tso_proto::v1::{
    EpochWire, GetSeqBatchRequest, GetSeqBatchResponse, GetSeqRequest, GetSeqResponse,
    SeqRequestEntry,
};

use crate::grant::Granted;
use crate::{Error, Result};

pub use tso_proto::limits::{SEQ_BATCH_KEYS_MAX, SEQ_COUNT_MAX, SEQ_KEY_BYTES_MAX};

/// A contiguous block of one key's sequence: `start, start + 1, ..., end() - 1`, granted by the
/// leader of `epoch`. Nobody else ever receives these values (D1).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SeqBlock {
    key: String,
    start: u64,
    count: u32,
    epoch: Epoch,
}

impl SeqBlock {
    /// Checked constructor: `count >= 1` and the block ends at most at `u64::MAX`.
    pub(crate) fn new(key: String, start: u64, count: u32, epoch: Epoch) -> Option<Self> {
        let fits = start.checked_add(u64::from(count)).is_some();
        (count >= 1 && fits).then_some(Self {
            key,
            start,
            count,
            epoch,
        })
    }

    /// The key this block belongs to.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The first value of the block.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// How many values the block holds (what the caller asked for).
    pub fn count(&self) -> u32 {
        self.count
    }

    /// One past the last value: the block is `start()..end()`.
    pub fn end(&self) -> u64 {
        self.start + u64::from(self.count)
    }

    /// The last value of the block.
    pub fn last(&self) -> u64 {
        self.end() - 1
    }

    /// The values, as a range.
    pub fn range(&self) -> Range<u64> {
        self.start..self.end()
    }

    /// The epoch of the leader that granted the block.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
}

/// The blocks of one `get_seq_batch` call: one per requested key, in request order, all from
/// one grant of the leader of [`SeqBatch::epoch`]. Never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqBatch {
    blocks: Vec<SeqBlock>,
    epoch: Epoch,
}

impl SeqBatch {
    /// The blocks, in the order the keys were asked for.
    pub fn blocks(&self) -> &[SeqBlock] {
        &self.blocks
    }

    /// The block of `key`, if it was asked for.
    pub fn get(&self, key: &str) -> Option<&SeqBlock> {
        self.blocks.iter().find(|b| b.key == key)
    }

    /// The epoch of the leader that granted the batch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// Takes the blocks out, in request order.
    pub fn into_blocks(self) -> Vec<SeqBlock> {
        self.blocks
    }
}

impl Granted for SeqBatch {
    fn epoch(&self) -> Epoch {
        self.epoch
    }
}

/// Which RPC a request travels as: `get_seq` sends `GetSeq`, `get_seq_batch` always sends
/// `GetSeqBatch` (even for one key), so the server sees what the caller wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SeqRpc {
    One,
    Batch,
}

/// A validated sequence request: 1 to `SEQ_BATCH_KEYS_MAX` distinct, valid keys, each with a
/// count in `1..=SEQ_COUNT_MAX` (one entry for `SeqRpc::One`).
#[derive(Clone, Debug)]
pub(crate) struct SeqRequest {
    rpc: SeqRpc,
    entries: Vec<(String, u32)>,
}

impl SeqRequest {
    /// A `GetSeq` for `count` values of `key`.
    pub(crate) fn one(key: &str, count: u32) -> Result<Self> {
        check_entry(key, count)?;
        Ok(Self {
            rpc: SeqRpc::One,
            entries: vec![(key.to_owned(), count)],
        })
    }

    /// A `GetSeqBatch` for every `(key, count)`, in this order.
    pub(crate) fn batch<K: AsRef<str>>(entries: &[(K, u32)]) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidSeqBatch {
            entries: entries.len(),
            reason,
        };
        if entries.is_empty() {
            return Err(invalid("ask for at least one key".into()));
        }
        if entries.len() > SEQ_BATCH_KEYS_MAX {
            return Err(invalid(format!(
                "ask for at most {SEQ_BATCH_KEYS_MAX} keys per call"
            )));
        }
        let mut seen = HashSet::with_capacity(entries.len());
        for (key, count) in entries {
            let key = key.as_ref();
            check_entry(key, *count)?;
            if !seen.insert(key) {
                return Err(invalid(format!(
                    "key {key:?} appears twice: ask once with the sum of the counts"
                )));
            }
        }
        Ok(Self {
            rpc: SeqRpc::Batch,
            entries: entries
                .iter()
                .map(|(k, c)| (k.as_ref().to_owned(), *c))
                .collect(),
        })
    }

    pub(crate) fn rpc(&self) -> SeqRpc {
        self.rpc
    }

    /// `(key, count)` in request order.
    pub(crate) fn entries(&self) -> &[(String, u32)] {
        &self.entries
    }

    pub(crate) fn to_one(&self) -> GetSeqRequest {
        let (key, count) = &self.entries[0];
        GetSeqRequest {
            key: key.as_str().into(),
            count: *count,
        }
    }

    pub(crate) fn to_batch(&self) -> GetSeqBatchRequest {
        let entries = self.entries.iter().map(|(key, count)| SeqRequestEntry {
            key: key.as_str().into(),
            count: *count,
        });
        GetSeqBatchRequest {
            entries: entries.collect(),
        }
    }

    /// Checks a `GetSeq` reply against this request; the error text says what is wrong.
    pub(crate) fn validate_one(&self, reply: &GetSeqResponse) -> Result<SeqBatch, String> {
        let epoch = epoch_of(reply.epoch.as_ref())?;
        let block = self.block(0, &reply.key, reply.start, reply.count, epoch)?;
        Ok(SeqBatch {
            blocks: vec![block],
            epoch,
        })
    }

    /// Checks a `GetSeqBatch` reply: one grant per entry, same keys and counts, same order.
    pub(crate) fn validate_batch(&self, reply: &GetSeqBatchResponse) -> Result<SeqBatch, String> {
        let epoch = epoch_of(reply.epoch.as_ref())?;
        if reply.grants.len() != self.entries.len() {
            return Err(format!(
                "{} grants for a request of {} keys",
                reply.grants.len(),
                self.entries.len()
            ));
        }
        let blocks = reply
            .grants
            .iter()
            .enumerate()
            .map(|(i, grant)| self.block(i, &grant.key, grant.start, grant.count, epoch));
        Ok(SeqBatch {
            blocks: blocks.collect::<Result<_, _>>()?,
            epoch,
        })
    }

    /// Entry `index` as granted, checked against what was asked.
    fn block(
        &self,
        index: usize,
        key: &str,
        start: u64,
        count: u32,
        epoch: Epoch,
    ) -> Result<SeqBlock, String> {
        let (asked_key, asked_count) = &self.entries[index];
        if key != asked_key {
            return Err(format!(
                "grant {index} is for key {key:?}, the request's entry {index} is {asked_key:?}"
            ));
        }
        if count != *asked_count {
            return Err(format!(
                "granted {count} values of {key:?} for a request of {asked_count}"
            ));
        }
        SeqBlock::new(key.to_owned(), start, count, epoch).ok_or_else(|| {
            format!("block {start}+{count} of {key:?} passes the largest value, u64::MAX")
        })
    }
}

/// Refuses a key or count the protocol does not allow.
fn check_entry(key: &str, count: u32) -> Result<()> {
    let invalid_key = |reason: String| Error::InvalidSeqKey {
        key: key.to_owned(),
        reason,
    };
    if key.is_empty() {
        return Err(invalid_key("a key must not be empty".into()));
    }
    if key.len() > SEQ_KEY_BYTES_MAX {
        return Err(invalid_key(format!(
            "{} bytes long: a key has at most {SEQ_KEY_BYTES_MAX}",
            key.len()
        )));
    }
    if !(1..=SEQ_COUNT_MAX).contains(&count) {
        return Err(Error::InvalidSeqCount {
            key: key.to_owned(),
            count,
        });
    }
    Ok(())
}

/// The epoch of a grant: present and not zero (zero means "no epoch", and a grant always names
/// the leader that made it).
fn epoch_of(wire: Option<&EpochWire>) -> Result<Epoch, String> {
    let wire = wire.ok_or("the reply has no epoch")?;
    let epoch = Epoch::from_parts(wire.hi, wire.lo);
    if epoch == Epoch::ZERO {
        return Err("the reply's epoch is zero".into());
    }
    Ok(epoch)
}

#[cfg(test)]
mod tests {
    use tso_proto::v1::SeqGrantEntry;

    use super::*;

    fn wire(lo: u64) -> Option<EpochWire> {
        Some(EpochWire { hi: 0, lo })
    }

    fn one(key: &str, start: u64, count: u32) -> GetSeqResponse {
        GetSeqResponse {
            key: key.into(),
            start,
            count,
            epoch: wire(7),
        }
    }

    fn grant(key: &str, start: u64, count: u32) -> SeqGrantEntry {
        SeqGrantEntry {
            key: key.into(),
            start,
            count,
        }
    }

    #[test]
    fn a_block_never_passes_the_largest_value() {
        let max = u64::MAX;
        let block = SeqBlock::new("k".into(), max - 3, 3, Epoch::new(1)).unwrap();
        assert_eq!(
            (block.start(), block.last(), block.end()),
            (max - 3, max - 1, max)
        );
        assert_eq!(block.range().count(), 3);
        assert!(SeqBlock::new("k".into(), max - 3, 4, Epoch::new(1)).is_none());
        assert!(SeqBlock::new("k".into(), 0, 0, Epoch::new(1)).is_none());
    }

    #[test]
    fn requests_are_validated_at_the_bounds() {
        let longest = "k".repeat(SEQ_KEY_BYTES_MAX);
        assert!(SeqRequest::one(&longest, 1).is_ok());
        assert!(SeqRequest::one("k", SEQ_COUNT_MAX).is_ok());
        let too_long = "k".repeat(SEQ_KEY_BYTES_MAX + 1);
        assert!(matches!(
            SeqRequest::one(&too_long, 1),
            Err(Error::InvalidSeqKey { key, .. }) if key == too_long
        ));
        // 43 three-byte characters are 129 bytes: the limit is on bytes, not characters.
        assert!(SeqRequest::one(&"€".repeat(43), 1).is_err());
        assert!(matches!(
            SeqRequest::one("", 1),
            Err(Error::InvalidSeqKey { .. })
        ));
        for count in [0, SEQ_COUNT_MAX + 1, u32::MAX] {
            assert!(matches!(
                SeqRequest::one("k", count),
                Err(Error::InvalidSeqCount { count: c, .. }) if c == count
            ));
        }
    }

    #[test]
    fn batches_are_validated_at_the_bounds() {
        let keys: Vec<(String, u32)> = (0..=SEQ_BATCH_KEYS_MAX)
            .map(|i| (format!("k{i}"), 1))
            .collect();
        assert!(SeqRequest::batch(&keys[..SEQ_BATCH_KEYS_MAX]).is_ok());
        assert!(matches!(
            SeqRequest::batch(&keys),
            Err(Error::InvalidSeqBatch { entries, .. }) if entries == SEQ_BATCH_KEYS_MAX + 1
        ));
        let none: [(&str, u32); 0] = [];
        assert!(matches!(
            SeqRequest::batch(&none),
            Err(Error::InvalidSeqBatch { entries: 0, .. })
        ));
        assert!(matches!(
            SeqRequest::batch(&[("a", 1), ("b", 2), ("a", 3)]),
            Err(Error::InvalidSeqBatch { entries: 3, reason }) if reason.contains("\"a\"")
        ));
        assert!(matches!(
            SeqRequest::batch(&[("a", 1), ("b", 0)]),
            Err(Error::InvalidSeqCount { count: 0, .. })
        ));
        let request = SeqRequest::batch(&[("b", 2), ("a", 1)]).unwrap();
        assert_eq!(request.rpc(), SeqRpc::Batch);
        let wire = request.to_batch();
        assert_eq!(wire.entries.len(), 2);
        assert_eq!(wire.entries[0].count, 2);
    }

    #[test]
    fn one_reply_is_checked_against_the_request() {
        let request = SeqRequest::one("k", 3).unwrap();
        let batch = request.validate_one(&one("k", 10, 3)).unwrap();
        assert_eq!(batch.epoch(), Epoch::new(7));
        assert_eq!(batch.blocks()[0].range(), 10..13);
        assert_eq!(batch.get("k").unwrap().epoch(), Epoch::new(7));
        for bad in [
            one("k", 10, 4),
            one("other", 10, 3),
            one("k", u64::MAX - 2, 3),
            GetSeqResponse {
                epoch: None,
                ..one("k", 10, 3)
            },
            GetSeqResponse {
                epoch: wire(0),
                ..one("k", 10, 3)
            },
        ] {
            assert!(request.validate_one(&bad).is_err(), "{bad:?} accepted");
        }
        assert!(request.validate_one(&one("k", u64::MAX - 3, 3)).is_ok());
    }

    #[test]
    fn batch_replies_match_the_request_keys_in_order() {
        let request = SeqRequest::batch(&[("a", 1), ("b", 2)]).unwrap();
        let reply = |grants: Vec<SeqGrantEntry>| GetSeqBatchResponse {
            grants,
            epoch: wire(3),
        };
        let good = request
            .validate_batch(&reply(vec![grant("a", 0, 1), grant("b", 5, 2)]))
            .unwrap();
        let keys: Vec<&str> = good.blocks().iter().map(SeqBlock::key).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(good.get("b").unwrap().range(), 5..7);
        for bad in [
            vec![grant("b", 5, 2), grant("a", 0, 1)],
            vec![grant("a", 0, 1)],
            vec![grant("a", 0, 1), grant("b", 5, 2), grant("c", 0, 1)],
            vec![grant("a", 0, 1), grant("b", 5, 3)],
            vec![grant("a", 0, 1), grant("b", u64::MAX, 2)],
        ] {
            assert!(
                request.validate_batch(&reply(bad.clone())).is_err(),
                "{bad:?} accepted"
            );
        }
        let no_epoch = GetSeqBatchResponse {
            grants: vec![grant("a", 0, 1), grant("b", 5, 2)],
            epoch: None,
        };
        assert!(request.validate_batch(&no_epoch).is_err());
    }
}
