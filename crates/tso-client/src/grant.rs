//! What a call returns: [`TsRange`], one contiguous run of timestamps from one server grant, and
//! [`Batch`], the ranges of one `get_ts_batch` call in increasing order.
//!
//! Invariant: a `TsRange` only exists with `count >= 1` and all of its timestamps inside one
//! millisecond (`logical + count <= LOGICAL_COUNT`); replies that break this are refused by
//! [`validate_reply`] before any caller sees them.

use tso_core::{Epoch, LOGICAL_COUNT, Timestamp};
use tso_proto::v1::GetTsResponse;

/// What one successful attempt brings: it names the epoch of the leader that granted it, which
/// the router caches.
pub(crate) trait Granted {
    fn epoch(&self) -> Epoch;
}

impl Granted for TsRange {
    fn epoch(&self) -> Epoch {
        self.epoch
    }
}

/// A contiguous run of timestamps granted in one reply: `first, first + 1, ..., last`, all in
/// one millisecond, issued by the leader of `epoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TsRange {
    first: Timestamp,
    count: u32,
    epoch: Epoch,
}

impl TsRange {
    /// Checked constructor: `count >= 1` and the run stays inside `first`'s millisecond.
    pub(crate) fn new(first: Timestamp, count: u32, epoch: Epoch) -> Option<Self> {
        let end = u64::from(first.logical()) + u64::from(count);
        (count >= 1 && end <= u64::from(LOGICAL_COUNT)).then_some(Self {
            first,
            count,
            epoch,
        })
    }

    /// The smallest timestamp of the range.
    pub fn first(&self) -> Timestamp {
        self.first
    }

    /// The largest timestamp of the range.
    pub fn last(&self) -> Timestamp {
        Timestamp::from_u64(self.first.as_u64() + u64::from(self.count) - 1)
    }

    /// How many timestamps the range holds (at least 1, at most `LOGICAL_COUNT`).
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The epoch of the leader that granted the range.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The timestamps in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = Timestamp> + use<> {
        let first = self.first.as_u64();
        (first..first + u64::from(self.count)).map(Timestamp::from_u64)
    }

    /// Splits off the first `count` timestamps; `None` when `count` is 0 or not below
    /// `self.count`.
    pub(crate) fn split_front(self, count: u32) -> Option<(TsRange, TsRange)> {
        if count == 0 || count >= self.count {
            return None;
        }
        let rest_first = Timestamp::from_u64(self.first.as_u64() + u64::from(count));
        let front = TsRange { count, ..self };
        let rest = TsRange {
            first: rest_first,
            count: self.count - count,
            ..self
        };
        Some((front, rest))
    }
}

/// Hands each caller its contiguous slice of one grant, in order. `counts` must sum to the
/// grant's count (the dispatcher asked for exactly that sum).
pub(crate) fn slice_grant(grant: TsRange, counts: &[u32]) -> Vec<TsRange> {
    let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    assert_eq!(total, u64::from(grant.count), "slices must cover the grant");
    let mut slices = Vec::with_capacity(counts.len());
    let mut rest = grant;
    for &count in counts {
        match rest.split_front(count) {
            Some((front, tail)) => {
                slices.push(front);
                rest = tail;
            }
            None => slices.push(rest),
        }
    }
    slices
}

/// Checks a `GetTs` reply against the request and the timestamp layout, and turns it into a
/// range. The error text says what is wrong.
pub(crate) fn validate_reply(requested: u32, reply: &GetTsResponse) -> Result<TsRange, String> {
    if reply.count != requested {
        return Err(format!(
            "granted {} timestamps for a request of {requested}",
            reply.count
        ));
    }
    let first = Timestamp::new(reply.physical_ms, reply.logical_start)
        .map_err(|e| format!("first timestamp out of range: {e}"))?;
    let epoch = Epoch::from_parts(reply.epoch_hi, reply.epoch_lo);
    TsRange::new(first, reply.count, epoch).ok_or_else(|| {
        format!(
            "logical range {}+{} passes the {LOGICAL_COUNT} logicals of a millisecond",
            reply.logical_start, reply.count
        )
    })
}

/// The timestamps of one `get_ts_batch` call: one or more ranges, disjoint and in increasing
/// order. Never empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    ranges: Vec<TsRange>,
}

impl Batch {
    /// Sorts the ranges and checks they do not overlap (two grants sharing a timestamp would be
    /// a broken server). `ranges` must not be empty.
    pub(crate) fn new(mut ranges: Vec<TsRange>) -> Result<Self, String> {
        assert!(!ranges.is_empty(), "a batch holds at least one range");
        ranges.sort_by_key(|r| r.first);
        for pair in ranges.windows(2) {
            if pair[1].first <= pair[0].last() {
                return Err(format!(
                    "grants overlap: {:?}..={:?} and {:?}..={:?}",
                    pair[0].first,
                    pair[0].last(),
                    pair[1].first,
                    pair[1].last()
                ));
            }
        }
        Ok(Self { ranges })
    }

    /// The smallest timestamp of the batch.
    pub fn first(&self) -> Timestamp {
        self.ranges[0].first
    }

    /// The largest timestamp of the batch.
    pub fn last(&self) -> Timestamp {
        self.ranges[self.ranges.len() - 1].last()
    }

    /// How many timestamps the batch holds (what the caller asked for).
    pub fn count(&self) -> u64 {
        self.ranges.iter().map(|r| u64::from(r.count)).sum()
    }

    /// The ranges, one per grant slice, in increasing order; each carries its epoch.
    pub fn ranges(&self) -> &[TsRange] {
        &self.ranges
    }

    /// Every timestamp in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = Timestamp> + '_ {
        self.ranges.iter().flat_map(TsRange::iter)
    }
}

impl<'a> IntoIterator for &'a Batch {
    type Item = Timestamp;
    type IntoIter = Box<dyn Iterator<Item = Timestamp> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(physical_ms: u64, logical: u32, count: u32) -> TsRange {
        let first = Timestamp::new(physical_ms, logical).unwrap();
        TsRange::new(first, count, Epoch::new(1)).unwrap()
    }

    fn reply(physical_ms: u64, logical_start: u32, count: u32) -> GetTsResponse {
        GetTsResponse {
            physical_ms,
            logical_start,
            count,
            epoch_hi: 0,
            epoch_lo: 1,
        }
    }

    #[test]
    fn a_range_stays_inside_one_millisecond() {
        let first = Timestamp::new(5, LOGICAL_COUNT - 2).unwrap();
        assert!(TsRange::new(first, 2, Epoch::ZERO).is_some());
        assert!(TsRange::new(first, 3, Epoch::ZERO).is_none());
        assert!(TsRange::new(first, 0, Epoch::ZERO).is_none());
    }

    #[test]
    fn slices_are_contiguous_and_cover_the_grant() {
        let grant = range(9, 10, 6);
        let slices = slice_grant(grant, &[1, 3, 2]);
        let got: Vec<u32> = slices
            .iter()
            .flat_map(|r| r.iter())
            .map(|t| t.logical())
            .collect();
        assert_eq!(got, (10..16).collect::<Vec<_>>());
        assert_eq!(
            slices.iter().map(|r| r.count()).collect::<Vec<_>>(),
            [1, 3, 2]
        );
        assert_eq!(slice_grant(grant, &[6]), [grant]);
    }

    #[test]
    fn replies_are_validated() {
        assert_eq!(validate_reply(3, &reply(100, 4, 3)), Ok(range(100, 4, 3)));
        assert_eq!(
            validate_reply(3, &reply(100, 4, 3)).unwrap().epoch(),
            Epoch::new(1)
        );
        assert!(
            validate_reply(3, &reply(100, 4, 4)).is_err(),
            "count mismatch"
        );
        assert!(validate_reply(3, &reply(100, LOGICAL_COUNT - 2, 3)).is_err());
        assert!(validate_reply(1, &reply(100, LOGICAL_COUNT, 1)).is_err());
        assert!(
            validate_reply(1, &reply(1 << 46, 0, 1)).is_err(),
            "47-bit physical"
        );
        assert!(validate_reply(1, &reply(100, LOGICAL_COUNT - 1, 1)).is_ok());
    }

    #[test]
    fn a_batch_is_sorted_and_refuses_overlap() {
        let batch = Batch::new(vec![range(2, 0, 2), range(1, 5, 3)]).unwrap();
        assert_eq!(batch.first(), Timestamp::new(1, 5).unwrap());
        assert_eq!(batch.last(), Timestamp::new(2, 1).unwrap());
        assert_eq!(batch.count(), 5);
        let all: Vec<_> = batch.iter().collect();
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        assert_eq!((&batch).into_iter().count(), 5);
        assert!(Batch::new(vec![range(1, 0, 4), range(1, 3, 1)]).is_err());
    }
}
