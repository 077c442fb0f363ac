//! A recorded history of `GetSeq` calls and the checks over it (SEMANTICS §11, D1 and D2).
//!
//! Every call is recorded as (client, key, count asked, start, end, outcome), with start and
//! end on `CLOCK_MONOTONIC` like the timestamp history. An outcome is a block, a definite
//! refusal (nothing spent), an uncertain failure (the block may have been spent, and we never
//! see where), or a reply the client refused as malformed. Per key, the checks are: D1, no two
//! blocks share a value; D2, every value below the highest block that no block holds is
//! explained by uncertain calls on that key (see [`check_gaps`] for the rule); and the shape of
//! each block (the count asked for, no overflow). Each key costs O(n log n) plus a bounded
//! subset-sum per gap.

use std::collections::BTreeMap;
use std::fmt;

use super::history::{Answered, VIOLATIONS_KEPT_MAX};

/// What a `GetSeq` call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeqOutcome {
    /// The block `start..start + count`.
    Block { start: u64, count: u32 },
    /// A definite refusal ("not leader", a bad argument, a cap, nothing sent): the gRPC code or
    /// the client library's error kind. Nothing was spent.
    Refused(String),
    /// A failure after the request may have been granted: the block may be spent.
    Uncertain(String),
    /// A reply that breaks the protocol, refused by the client (why, as text).
    Malformed(String),
}

/// One recorded `GetSeq` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqCall {
    pub client: u32,
    /// Index of the key in the run's key list.
    pub key: u32,
    pub requested: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub outcome: SeqOutcome,
}

impl SeqCall {
    /// The block's first value and one past its last (meaningful only for a well-shaped block).
    fn span(&self) -> Option<(u64, u64)> {
        match self.outcome {
            SeqOutcome::Block { start, count } => Some((start, start + u64::from(count))),
            _ => None,
        }
    }

    /// Why this call's reply is not a valid answer to its request, if it is not.
    fn shape_error(&self) -> Option<String> {
        match &self.outcome {
            SeqOutcome::Block { start, count } => {
                if *count != self.requested {
                    Some(format!(
                        "asked for {}, got a block of {count}",
                        self.requested
                    ))
                } else if start.checked_add(u64::from(*count)).is_none() {
                    Some(format!("block {start}+{count} passes u64::MAX"))
                } else {
                    None
                }
            }
            SeqOutcome::Malformed(reason) => Some(format!("malformed reply: {reason}")),
            SeqOutcome::Refused(_) | SeqOutcome::Uncertain(_) => None,
        }
    }
}

impl Answered for SeqCall {
    fn client(&self) -> u32 {
        self.client
    }

    fn end_ns(&self) -> u64 {
        self.end_ns
    }

    fn succeeded(&self) -> bool {
        matches!(self.outcome, SeqOutcome::Block { .. })
    }
}

/// Where each key's counter started, as far as the checker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Floor {
    /// A fresh cluster: every key starts at 0, so values below the lowest block are gaps too.
    Zero,
    /// Attached to a server that may have used the keys before: values below the lowest block
    /// are not judged.
    Unknown,
}

/// A broken guarantee, naming the calls (indices into the history) that show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// D1: two blocks of a key share values (`a` is the one seen reaching highest so far).
    Overlap { key: u32, a: usize, b: usize },
    /// D2: the values `from..to` of a key were never handed out in a block, and the uncertain
    /// calls that could hold them do not explain it. `above` received the block just above.
    Gap {
        key: u32,
        from: u64,
        to: u64,
        above: usize,
        reason: String,
    },
    /// A block that is not the count asked for, or a reply the client refused as malformed.
    Shape { call: usize, reason: String },
}

impl Violation {
    /// A one-line description with the calls and values involved.
    pub fn describe(&self, calls: &[SeqCall], keys: &[&str]) -> String {
        let name = |key: u32| keys.get(key as usize).copied().unwrap_or("?");
        let span = |i: usize| {
            let c = &calls[i];
            let values = c
                .span()
                .map_or("-".to_string(), |(from, to)| format!("{from}..{to}"));
            format!(
                "call #{i} (client {}, {}..{} ns) got {values}",
                c.client, c.start_ns, c.end_ns
            )
        };
        match self {
            Violation::Overlap { key, a, b } => format!(
                "D1 overlap on {:?}: {} and {}",
                name(*key),
                span(*a),
                span(*b)
            ),
            Violation::Gap {
                key,
                from,
                to,
                above,
                reason,
            } => format!(
                "D2 gap on {:?}: values {from}..{to} skipped below {}: {reason}",
                name(*key),
                span(*above)
            ),
            Violation::Shape { call, reason } => {
                format!(
                    "bad block of {:?}: {}: {reason}",
                    name(calls[*call].key),
                    span(*call)
                )
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ViolationCounts {
    pub overlap: u64,
    pub gap: u64,
    pub shape: u64,
}

impl ViolationCounts {
    pub fn total(&self) -> u64 {
        self.overlap + self.gap + self.shape
    }
}

impl fmt::Display for ViolationCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} D1 overlap, {} D2 gap, {} shape",
            self.overlap, self.gap, self.shape
        )
    }
}

/// What one key's history holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyStats {
    pub blocks: u64,
    pub values: u64,
    pub uncertain: u64,
    pub uncertain_values: u64,
    /// Values below the highest block that no block holds (above the floor, if known).
    pub skipped: u64,
    pub gaps: u64,
    /// One past the highest value of any block.
    pub top: u64,
}

/// The outcome of checking a sequence history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Up to [`VIOLATIONS_KEPT_MAX`] of each kind.
    pub violations: Vec<Violation>,
    /// Every violation found, kept or not, by kind.
    pub counts: ViolationCounts,
    /// By key index.
    pub keys: Vec<KeyStats>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.counts.total() == 0
    }

    fn add(&mut self, violation: Violation) {
        let count = match violation {
            Violation::Overlap { .. } => &mut self.counts.overlap,
            Violation::Gap { .. } => &mut self.counts.gap,
            Violation::Shape { .. } => &mut self.counts.shape,
        };
        *count += 1;
        if *count <= VIOLATIONS_KEPT_MAX as u64 {
            self.violations.push(violation);
        }
    }

    /// The totals over every key.
    pub fn total(&self) -> KeyStats {
        self.keys.iter().fold(KeyStats::default(), |t, k| KeyStats {
            blocks: t.blocks + k.blocks,
            values: t.values + k.values,
            uncertain: t.uncertain + k.uncertain,
            uncertain_values: t.uncertain_values + k.uncertain_values,
            skipped: t.skipped + k.skipped,
            gaps: t.gaps + k.gaps,
            top: t.top.max(k.top),
        })
    }
}

/// Runs every check over `calls`, whose keys are `0..keys`. Badly shaped blocks are reported
/// and left out of D1 and D2, whose arithmetic assumes a block of the count asked for.
pub fn check(calls: &[SeqCall], keys: usize, floor: Floor) -> Report {
    let mut report = Report {
        keys: vec![KeyStats::default(); keys],
        ..Report::default()
    };
    let mut blocks: Vec<Vec<usize>> = vec![Vec::new(); keys];
    let mut uncertain: Vec<Vec<usize>> = vec![Vec::new(); keys];
    for (i, call) in calls.iter().enumerate() {
        assert!((call.key as usize) < keys, "call #{i} has no such key");
        if let Some(reason) = call.shape_error() {
            report.add(Violation::Shape { call: i, reason });
            continue;
        }
        match call.outcome {
            SeqOutcome::Block { .. } => blocks[call.key as usize].push(i),
            SeqOutcome::Uncertain(_) => uncertain[call.key as usize].push(i),
            SeqOutcome::Refused(_) | SeqOutcome::Malformed(_) => {}
        }
    }
    for key in 0..keys {
        let (blocks, uncertain) = (&mut blocks[key], &mut uncertain[key]);
        blocks.sort_unstable_by_key(|&i| (calls[i].span(), calls[i].start_ns));
        uncertain.sort_unstable_by_key(|&i| calls[i].start_ns);
        let stats = &mut report.keys[key];
        stats.blocks = blocks.len() as u64;
        stats.values = blocks.iter().map(|&i| u64::from(calls[i].requested)).sum();
        stats.uncertain = uncertain.len() as u64;
        stats.uncertain_values = uncertain
            .iter()
            .map(|&i| u64::from(calls[i].requested))
            .sum();
        check_overlaps(calls, key as u32, blocks, &mut report);
        check_gaps(calls, key as u32, blocks, uncertain, floor, &mut report);
    }
    report
}

fn span(calls: &[SeqCall], i: usize) -> (u64, u64) {
    calls[i].span().expect("a well-shaped block")
}

/// D1: with the blocks sorted by start, a block starting below the highest end seen so far
/// shares values with the block that reached it.
fn check_overlaps(calls: &[SeqCall], key: u32, blocks: &[usize], report: &mut Report) {
    let mut highest: Option<usize> = None;
    for &i in blocks {
        let (start, end) = span(calls, i);
        match highest {
            Some(h) if start < span(calls, h).1 => {
                report.add(Violation::Overlap { key, a: h, b: i });
                if end > span(calls, h).1 {
                    highest = Some(i);
                }
            }
            _ => highest = Some(i),
        }
    }
    report.keys[key as usize].top = highest.map_or(0, |h| span(calls, h).1);
}

/// D2: every gap between the blocks of a key (values below a block that no block holds, from
/// 0 on a fresh cluster) must be the values of uncertain calls on that key.
///
/// What an uncertain call U may have received: a block of exactly its count, granted at any
/// instant after U started (the request may sit on the server long after the client gave up,
/// so U's end bounds nothing), and never overlapping another block. So each gap must be
/// tiled by whole blocks of uncertain calls, each used once. What excludes U from a gap is real
/// time only: a block B returned at B.end, and was durable by then (D3), and a key's counter
/// never goes below a durable advance, on this leader or the next. If U started after B
/// returned, U's values are above all of B's. So U can lie in a gap only if it started no later
/// than the earliest return of any block above the gap (the blocks "above" are all those
/// starting at or past the gap's end). Those bounds grow from the lowest gap to the highest,
/// so each gap's candidates are a prefix of the uncertain calls sorted by start.
///
/// Two necessary conditions follow, and each is checked (a sound relaxation of the exact
/// assignment of calls to gaps: it never reports a history a correct server could produce):
/// - each gap's size is the sum of the counts of some subset of its candidates (a bounded
///   subset-sum; past [`SUBSET_WORK_MAX`] it is skipped, the next condition still applies);
/// - the values skipped in the lowest gaps up to each gap are at most the values asked for by
///   that gap's candidates (the candidates of lower gaps are among them), reported once per key.
fn check_gaps(
    calls: &[SeqCall],
    key: u32,
    blocks: &[usize],
    uncertain: &[usize],
    floor: Floor,
    report: &mut Report,
) {
    let Some(&lowest) = blocks.first() else {
        return;
    };
    // The earliest return among the blocks at sorted positions j.. (those at or above block j).
    let mut earliest_above = vec![u64::MAX; blocks.len() + 1];
    for j in (0..blocks.len()).rev() {
        earliest_above[j] = earliest_above[j + 1].min(calls[blocks[j]].end_ns);
    }
    let mut asked_up_to = Vec::with_capacity(uncertain.len() + 1);
    asked_up_to.push(0u64);
    for &u in uncertain {
        asked_up_to.push(asked_up_to.last().unwrap() + u64::from(calls[u].requested));
    }
    let mut covered = match floor {
        Floor::Zero => 0,
        Floor::Unknown => span(calls, lowest).0,
    };
    let (mut skipped, mut total_reported) = (0u64, false);
    // The counts of the candidates so far (count → calls), grown as the prefix grows.
    let (mut copies, mut added) = (BTreeMap::new(), 0);
    for (j, &above) in blocks.iter().enumerate() {
        let (start, end) = span(calls, above);
        if start > covered {
            let gap = start - covered;
            skipped += gap;
            let stats = &mut report.keys[key as usize];
            stats.skipped += gap;
            stats.gaps += 1;
            let fit = uncertain.partition_point(|&u| calls[u].start_ns <= earliest_above[j]);
            let violation = |reason: String| Violation::Gap {
                key,
                from: covered,
                to: start,
                above,
                reason,
            };
            if skipped > asked_up_to[fit] && !total_reported {
                total_reported = true;
                report.add(violation(format!(
                    "{skipped} value(s) skipped up to here, but the {fit} uncertain call(s) that \
                     started before a block above returned asked for {} in all",
                    asked_up_to[fit]
                )));
            } else if gap <= asked_up_to[fit] {
                for &u in &uncertain[added..fit] {
                    *copies.entry(u64::from(calls[u].requested)).or_default() += 1;
                }
                added = fit;
                if subset_sum(&copies, gap) == Some(false) {
                    report.add(violation(format!(
                        "no subset of the {fit} uncertain call(s) that could lie here asks for \
                         exactly {gap}"
                    )));
                }
            }
        }
        covered = covered.max(end);
    }
}

/// Word operations one subset-sum may take (a shift-or over the reachable sums per group of
/// equal counts); past it the gap is judged by the total bound alone. 2^24 is a few ms.
pub const SUBSET_WORK_MAX: u64 = 1 << 24;

/// Whether some of the calls in `copies` (count → how many calls asked for it) ask for exactly
/// `target` values together; `None` when finding out would take more than [`SUBSET_WORK_MAX`]
/// word operations.
///
/// Each group of `m` equal counts is split into items of 1, 2, 4, ... copies (and the rest),
/// the usual bounded-knapsack trick, so the work is `distinct counts × log(copies) × target / 64`
/// instead of `calls × target / 64`.
pub fn subset_sum(copies: &BTreeMap<u64, u64>, target: u64) -> Option<bool> {
    let mut items = Vec::new();
    for (&count, &calls) in copies.range(1..=target.max(1)) {
        let mut left = calls;
        let mut take = 1;
        while left > 0 {
            let n = take.min(left);
            items.push(count * n);
            left -= n;
            take *= 2;
        }
    }
    let words = target / 64 + 1;
    if (items.len() as u64).saturating_mul(words) > SUBSET_WORK_MAX {
        return None;
    }
    let mut reach = vec![0u64; words as usize];
    reach[0] = 1;
    for item in items.into_iter().filter(|&v| v <= target) {
        shift_or(&mut reach, item);
    }
    Some(reach[(target / 64) as usize] >> (target % 64) & 1 == 1)
}

/// `bits |= bits << by`, over a little-endian array of words (bits past the end dropped).
fn shift_or(bits: &mut [u64], by: u64) {
    let (words, rest) = ((by / 64) as usize, (by % 64) as u32);
    for i in (words..bits.len()).rev() {
        let mut moved = bits[i - words] << rest;
        if rest > 0 && i > words {
            moved |= bits[i - words - 1] >> (64 - rest);
        }
        bits[i] |= moved;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn block(client: u32, start_ns: u64, end_ns: u64, start: u64, count: u32) -> SeqCall {
        SeqCall {
            client,
            key: 0,
            requested: count,
            start_ns,
            end_ns,
            outcome: SeqOutcome::Block { start, count },
        }
    }

    fn uncertain(client: u32, start_ns: u64, end_ns: u64, count: u32) -> SeqCall {
        SeqCall {
            client,
            key: 0,
            requested: count,
            start_ns,
            end_ns,
            outcome: SeqOutcome::Uncertain("Unavailable".into()),
        }
    }

    fn refused(client: u32, start_ns: u64, end_ns: u64, count: u32) -> SeqCall {
        SeqCall {
            outcome: SeqOutcome::Refused("FailedPrecondition".into()),
            ..uncertain(client, start_ns, end_ns, count)
        }
    }

    fn gaps(report: &Report) -> Vec<(u64, u64)> {
        report
            .violations
            .iter()
            .filter_map(|v| match v {
                Violation::Gap { from, to, .. } => Some((*from, *to)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn dense_blocks_from_zero_pass() {
        let calls = vec![
            block(0, 0, 10, 0, 3),
            block(1, 5, 15, 3, 1),
            refused(2, 6, 7, 4),
            block(0, 11, 20, 4, 2),
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.keys[0].blocks, 3);
        assert_eq!(report.keys[0].values, 6);
        assert_eq!(report.keys[0].top, 6);
        assert_eq!(report.keys[0].skipped, 0);
    }

    #[test]
    fn an_overlap_is_caught_naming_both_calls() {
        let calls = vec![
            block(0, 0, 10, 0, 4),
            block(1, 20, 30, 4, 2),
            block(2, 40, 50, 2, 2), // a new leader that forgot: 2..4 again
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(report.counts.overlap, 1, "{report:?}");
        assert_eq!(
            report.violations,
            vec![Violation::Overlap { key: 0, a: 0, b: 2 }]
        );
        assert!(report.violations[0].describe(&calls, &["k"]).contains("D1"));
        // A block inside a wide one.
        let calls = vec![block(0, 0, 10, 0, 4), block(1, 0, 10, 1, 1)];
        assert_eq!(check(&calls, 1, Floor::Zero).counts.overlap, 1);
        // The same values on two keys are no overlap.
        let other = SeqCall {
            key: 1,
            ..block(1, 0, 10, 0, 4)
        };
        let calls = vec![block(0, 0, 10, 0, 4), other];
        assert!(check(&calls, 2, Floor::Zero).is_clean());
    }

    #[test]
    fn a_gap_explained_by_an_uncertain_call_passes() {
        let calls = vec![
            block(0, 0, 10, 0, 2),
            uncertain(1, 5, 1_000, 3), // timed out; its 2..5 were spent
            block(0, 11, 20, 5, 1),
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.keys[0].skipped, 3);
        assert_eq!(report.keys[0].uncertain_values, 3);
    }

    #[test]
    fn an_uncertain_call_may_be_granted_after_its_client_gave_up() {
        // Client 1 gave up at 8, before the block above the gap was even asked for: the server
        // may still have granted its request in between.
        let calls = vec![
            block(0, 0, 10, 0, 2),
            uncertain(1, 5, 8, 3),
            block(0, 11, 20, 5, 1),
        ];
        assert!(check(&calls, 1, Floor::Zero).is_clean());
    }

    #[test]
    fn a_gap_without_an_uncertain_call_is_caught() {
        let calls = vec![
            block(0, 0, 10, 0, 2),
            refused(1, 5, 8, 3), // definite: spent nothing
            block(0, 11, 20, 5, 1),
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(report.counts.gap, 1, "{report:?}");
        assert_eq!(gaps(&report), vec![(2, 5)]);
        // From 0 on a fresh cluster...
        let calls = vec![block(0, 0, 10, 3, 2)];
        assert_eq!(gaps(&check(&calls, 1, Floor::Zero)), vec![(0, 3)]);
        // ...not judged below the lowest block when the floor is unknown.
        assert!(check(&calls, 1, Floor::Unknown).is_clean());
    }

    #[test]
    fn an_uncertain_call_that_started_after_the_block_above_returned_explains_nothing() {
        let calls = vec![
            block(0, 0, 10, 0, 2),
            block(0, 11, 20, 5, 1),
            uncertain(1, 21, 30, 3), // started after 5..6 was durable: above it
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(gaps(&report), vec![(2, 5)], "{report:?}");
        // Any block above the gap bounds it, not only the nearest one.
        let calls = vec![
            block(0, 0, 10, 0, 2),
            block(2, 0, 12, 9, 1), // returned at 12
            uncertain(1, 15, 30, 3),
            block(0, 11, 40, 5, 1), // just above the gap, returned at 40
            uncertain(1, 31, 32, 3),
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(gaps(&report), vec![(2, 5)], "{report:?}");
        // Starting at the very instant it returned is not after it.
        let calls = vec![
            block(0, 0, 10, 0, 2),
            block(0, 11, 20, 5, 1),
            uncertain(1, 20, 30, 3),
        ];
        assert!(check(&calls, 1, Floor::Zero).is_clean());
    }

    #[test]
    fn a_gap_must_be_a_sum_of_whole_uncertain_blocks() {
        // 8 values may be spent, but no two blocks of 4 make a gap of 5.
        let calls = vec![
            uncertain(1, 0, 5, 4),
            uncertain(2, 0, 5, 4),
            block(0, 0, 10, 5, 1),
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(report.counts.gap, 1, "{report:?}");
        assert!(
            report.violations[0]
                .describe(&calls, &["k"])
                .contains("no subset")
        );
        // 4 + 4 = 8 is fine.
        let calls = vec![
            uncertain(1, 0, 5, 4),
            uncertain(2, 0, 5, 4),
            block(0, 0, 10, 8, 1),
        ];
        assert!(check(&calls, 1, Floor::Zero).is_clean());
    }

    #[test]
    fn an_uncertain_call_explains_one_gap_only() {
        // Two gaps of 3, one uncertain call of 3: each gap alone is a sum, both together not.
        let calls = vec![
            uncertain(1, 0, 5, 3),
            block(0, 0, 10, 3, 1),
            block(0, 11, 20, 7, 1),
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(gaps(&report), vec![(4, 7)], "{report:?}");
        assert!(
            report.violations[0]
                .describe(&calls, &["k"])
                .contains("6 value(s) skipped")
        );
    }

    #[test]
    fn bad_shapes_are_caught_and_left_out() {
        let calls = vec![
            SeqCall {
                requested: 2,
                ..block(0, 0, 10, 0, 3)
            },
            block(1, 0, 10, u64::MAX - 1, 3),
            SeqCall {
                outcome: SeqOutcome::Malformed("asked for \"k\", got \"j\"".into()),
                ..uncertain(2, 0, 10, 1)
            },
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(report.counts.shape, 3, "{report:?}");
        assert_eq!(report.counts.total(), 3);
    }

    fn sums_to(counts: impl IntoIterator<Item = u64>, target: u64) -> Option<bool> {
        let mut copies = BTreeMap::new();
        for count in counts {
            *copies.entry(count).or_default() += 1;
        }
        subset_sum(&copies, target)
    }

    #[test]
    fn subset_sums() {
        assert_eq!(sums_to([4, 4], 5), Some(false));
        assert_eq!(sums_to([4, 4, 1], 5), Some(true));
        assert_eq!(sums_to([3, 3, 3], 9), Some(true));
        assert_eq!(sums_to([3, 3, 3], 10), Some(false));
        assert_eq!(sums_to([], 0), Some(true));
        assert_eq!(sums_to([2], 1), Some(false));
        // Across word boundaries.
        assert_eq!(sums_to(std::iter::repeat_n(3, 100), 300), Some(true));
        assert_eq!(sums_to(std::iter::repeat_n(3, 100), 301), Some(false));
        assert_eq!(
            sums_to(std::iter::repeat_n(4, 50).chain([1]), 129),
            Some(true)
        );
        // Many distinct large counts over a huge gap: too much work, not judged.
        assert_eq!(sums_to(1..=100_000, 1 << 40), None);
    }

    #[test]
    fn a_search_past_the_cap_falls_back_to_the_total() {
        let mut calls: Vec<SeqCall> = (0..200_000u32)
            .map(|c| uncertain(c, 0, 5, c % 60_000 + 1))
            .collect();
        calls.push(block(0, 0, 10, 10_000_000, 1));
        // The total may cover the gap, and the search is past the cap: no violation.
        assert!(check(&calls, 1, Floor::Zero).is_clean());
    }

    /// A history a correct server could produce: sequential clients on a few keys; a granted
    /// call takes effect at a random instant inside its span; an uncertain one may take effect
    /// at any instant after it started, even after its client gave up, or never.
    fn valid_history(seed: u64, clients: u32, per_client: usize) -> Vec<SeqCall> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut calls = Vec::new();
        let mut effects = Vec::new();
        for client in 0..clients {
            let mut t = rng.random_range(0..1_000u64);
            for _ in 0..per_client {
                let start = t + rng.random_range(0..50);
                let end = start + rng.random_range(1..200);
                t = end;
                let (key, requested) = (rng.random_range(0..3), rng.random_range(1..=4));
                let call = SeqCall {
                    client,
                    key,
                    requested,
                    start_ns: start,
                    end_ns: end,
                    outcome: SeqOutcome::Refused("FailedPrecondition".into()),
                };
                match rng.random_range(0..10) {
                    0 => {}
                    1 | 2 => {
                        if rng.random_bool(0.5) {
                            effects.push((start + rng.random_range(0..2_000), calls.len(), false));
                        }
                        calls.push(SeqCall {
                            outcome: SeqOutcome::Uncertain("Unavailable".into()),
                            ..call
                        });
                        continue;
                    }
                    _ => effects.push((rng.random_range(start..=end), calls.len(), true)),
                }
                calls.push(call);
            }
        }
        effects.sort_unstable();
        let mut counters = [0u64; 3];
        for (_, i, seen) in effects {
            let call = &mut calls[i];
            let counter = &mut counters[call.key as usize];
            if seen {
                call.outcome = SeqOutcome::Block {
                    start: *counter,
                    count: call.requested,
                };
            }
            *counter += u64::from(call.requested);
        }
        calls
    }

    proptest! {
        #[test]
        fn valid_histories_pass(seed in any::<u64>(), clients in 1u32..8, per in 1usize..60) {
            let calls = valid_history(seed, clients, per);
            let report = check(&calls, 3, Floor::Zero);
            prop_assert!(report.is_clean(), "seed {seed}: {:?}", report.violations);
        }

        #[test]
        fn a_block_moved_onto_another_is_caught(seed in any::<u64>(), clients in 1u32..6, per in 2usize..40) {
            let mut calls = valid_history(seed, clients, per);
            let blocks: Vec<usize> = (0..calls.len())
                .filter(|&i| calls[i].span().is_some())
                .collect();
            let pair = blocks.iter().flat_map(|&a| blocks.iter().map(move |&b| (a, b)))
                .find(|&(a, b)| a != b && calls[a].key == calls[b].key);
            if let Some((a, b)) = pair {
                let (start, _) = calls[a].span().unwrap();
                calls[b].outcome = SeqOutcome::Block { start, count: calls[b].requested };
                let report = check(&calls, 3, Floor::Zero);
                prop_assert!(report.counts.overlap >= 1, "seed {seed}: {:?}", report.counts);
            }
        }
    }
}
