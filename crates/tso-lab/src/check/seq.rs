//! A recorded history of `GetSeq` and `GetSeqBatch` calls and the checks over it (SEMANTICS
//! §11, D1, D2 and the epoch of D3).
//!
//! Every call is recorded per key as (client, key, count asked, start, end, outcome), with start
//! and end on `CLOCK_MONOTONIC` like the timestamp history; a `GetSeqBatch` is one such entry
//! per key it asked for, numbered as one batch, sharing the call's start, end and outcome (a
//! batch is all or nothing, under one epoch). An outcome is a block and the epoch that made it
//! durable, a definite refusal (nothing spent), an uncertain failure (the block may have been
//! spent, and we never see where), or a reply the client refused as malformed. Per key, the
//! checks are: D1, no two blocks share a value; D2, every value below the highest block that no
//! block holds is explained by uncertain calls on that key (see `check_gaps`); the order of
//! epochs, by value per key and by real time over every key (see `check_epoch_order` and
//! `check_epoch_time`); and the shape of each block and batch. Each key costs O(n log n)
//! plus a bounded subset-sum bitset.

use std::collections::{HashMap, HashSet};
use std::fmt;

use super::history::{Answered, VIOLATIONS_KEPT_MAX};

/// The epoch of the leader that made a block durable, ordered as the 128-bit epoch
/// (`hi`, then `lo`). Two words instead of a `u128`, which would align every recorded call to
/// 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockEpoch {
    hi: u64,
    lo: u64,
}

impl BlockEpoch {
    pub fn from_parts(hi: u64, lo: u64) -> BlockEpoch {
        BlockEpoch { hi, lo }
    }

    /// `hi.lo`, as the result files write epochs.
    pub fn text(&self) -> String {
        format!("{}.{}", self.hi, self.lo)
    }

    /// Reads [`BlockEpoch::text`] back.
    pub fn parse(text: &str) -> Option<BlockEpoch> {
        let (hi, lo) = text.split_once('.')?;
        Some(BlockEpoch::from_parts(hi.parse().ok()?, lo.parse().ok()?))
    }
}

impl From<u128> for BlockEpoch {
    fn from(epoch: u128) -> BlockEpoch {
        BlockEpoch {
            hi: (epoch >> 64) as u64,
            lo: epoch as u64,
        }
    }
}

/// What a `GetSeq` call, or one entry of a `GetSeqBatch`, returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeqOutcome {
    /// The block `start..start + count`, made durable by the leader of `epoch` (`None` in a
    /// history file that does not say).
    Block {
        start: u64,
        count: u32,
        epoch: Option<BlockEpoch>,
    },
    /// A definite refusal ("not leader", a bad argument, a cap, nothing sent): the gRPC code or
    /// the client library's error kind. Nothing was spent.
    Refused(String),
    /// A failure after the request may have been granted: the block may be spent.
    Uncertain(String),
    /// A reply that breaks the protocol, refused by the client (why, as text).
    Malformed(String),
}

/// One recorded `GetSeq` call, or one entry of a `GetSeqBatch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqCall {
    pub client: u32,
    /// Index of the key in the run's key list.
    pub key: u32,
    pub requested: u32,
    /// `None` for a `GetSeq`; for an entry of a `GetSeqBatch`, the number of that batch among
    /// its client's batches. The entries of one batch share client, start, end and outcome.
    pub batch: Option<u32>,
    pub start_ns: u64,
    pub end_ns: u64,
    pub outcome: SeqOutcome,
}

impl SeqCall {
    /// The block's first value and one past its last (meaningful only for a well-shaped block).
    fn span(&self) -> Option<(u64, u64)> {
        match self.outcome {
            SeqOutcome::Block { start, count, .. } => Some((start, start + u64::from(count))),
            _ => None,
        }
    }

    /// The epoch of the block, if this call got one and it is known.
    pub fn epoch(&self) -> Option<BlockEpoch> {
        match self.outcome {
            SeqOutcome::Block { epoch, .. } => epoch,
            _ => None,
        }
    }

    /// Why this call's reply is not a valid answer to its request, if it is not.
    fn shape_error(&self) -> Option<String> {
        match &self.outcome {
            SeqOutcome::Block { start, count, .. } => {
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

    /// Whether `other` may be another entry of this call's batch: same start, end and kind of
    /// outcome, and for blocks the same epoch.
    fn same_batch_reply(&self, other: &SeqCall) -> bool {
        let kind = |c: &SeqCall| std::mem::discriminant(&c.outcome);
        self.start_ns == other.start_ns
            && self.end_ns == other.end_ns
            && kind(self) == kind(other)
            && self.epoch() == other.epoch()
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

/// How many RPCs a history holds: `GetSeq` calls, and `GetSeqBatch` calls with their entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rpcs {
    pub get_seq: u64,
    pub get_seq_batch: u64,
    pub batch_entries: u64,
}

impl Rpcs {
    pub fn count(calls: &[SeqCall]) -> Rpcs {
        let mut rpcs = Rpcs::default();
        let mut batches = HashSet::new();
        for call in calls {
            match call.batch {
                None => rpcs.get_seq += 1,
                Some(batch) => {
                    rpcs.batch_entries += 1;
                    if batches.insert((call.client, batch)) {
                        rpcs.get_seq_batch += 1;
                    }
                }
            }
        }
        rpcs
    }

    pub fn total(&self) -> u64 {
        self.get_seq + self.get_seq_batch
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
    /// D3's epoch, by value: `above` lies above `below` in the values of `key`, but came from an
    /// earlier leader.
    EpochOrder {
        key: u32,
        below: usize,
        above: usize,
    },
    /// D3's epoch, in real time: `later` started after `earlier` returned, but came from an
    /// earlier leader.
    EpochStale { earlier: usize, later: usize },
    /// A block that is not the count asked for, a reply the client refused as malformed, or a
    /// batch whose entries disagree.
    Shape { call: usize, reason: String },
}

impl Violation {
    /// A one-line description with the calls and values involved.
    pub fn describe(&self, calls: &[SeqCall], keys: &[&str]) -> String {
        let name = |key: u32| keys.get(key as usize).copied().unwrap_or("?");
        let span = |i: usize| describe_call(calls, keys, i);
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
            Violation::EpochOrder { key, below, above } => format!(
                "epoch order on {:?}: {} lies above {}, from an earlier leader",
                name(*key),
                span(*above),
                span(*below)
            ),
            Violation::EpochStale { earlier, later } => format!(
                "stale epoch: {} started after {} returned, from an earlier leader",
                span(*later),
                span(*earlier)
            ),
            Violation::Shape { call, reason } => format!("bad block: {}: {reason}", span(*call)),
        }
    }
}

/// "call #7 (client 2, batch 3, 10..20 ns) got 5..9 of "k" at epoch 0.2".
fn describe_call(calls: &[SeqCall], keys: &[&str], i: usize) -> String {
    let c = &calls[i];
    let key = keys.get(c.key as usize).copied().unwrap_or("?");
    let batch = c.batch.map(|b| format!("batch {b}, ")).unwrap_or_default();
    let got = match (c.span(), c.epoch()) {
        (Some((from, to)), Some(epoch)) => {
            format!("{from}..{to} of {key:?} at epoch {}", epoch.text())
        }
        (Some((from, to)), None) => format!("{from}..{to} of {key:?}"),
        (None, _) => format!("nothing of {key:?}"),
    };
    format!(
        "call #{i} (client {}, {batch}{}..{} ns) got {got}",
        c.client, c.start_ns, c.end_ns
    )
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ViolationCounts {
    pub overlap: u64,
    pub gap: u64,
    pub epoch: u64,
    pub shape: u64,
}

impl ViolationCounts {
    pub fn total(&self) -> u64 {
        self.overlap + self.gap + self.epoch + self.shape
    }
}

impl fmt::Display for ViolationCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} D1 overlap, {} D2 gap, {} epoch, {} shape",
            self.overlap, self.gap, self.epoch, self.shape
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
    pub rpcs: Rpcs,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.counts.total() == 0
    }

    fn add(&mut self, violation: Violation) {
        let count = match violation {
            Violation::Overlap { .. } => &mut self.counts.overlap,
            Violation::Gap { .. } => &mut self.counts.gap,
            Violation::EpochOrder { .. } | Violation::EpochStale { .. } => &mut self.counts.epoch,
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
/// and left out of the other checks, whose arithmetic assumes a block of the count asked for.
pub fn check(calls: &[SeqCall], keys: usize, floor: Floor) -> Report {
    let mut report = Report {
        keys: vec![KeyStats::default(); keys],
        rpcs: Rpcs::count(calls),
        ..Report::default()
    };
    check_batches(calls, &mut report);
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
        check_key(
            calls,
            key as u32,
            &mut blocks[key],
            &mut uncertain[key],
            floor,
            &mut report,
        );
    }
    check_epoch_time(calls, &blocks.concat(), &mut report);
    report
}

/// The checks of one key: its stats, D1, the epoch order by value, and D2.
fn check_key(
    calls: &[SeqCall],
    key: u32,
    blocks: &mut [usize],
    uncertain: &mut [usize],
    floor: Floor,
    report: &mut Report,
) {
    blocks.sort_unstable_by_key(|&i| (calls[i].span(), calls[i].start_ns));
    uncertain.sort_unstable_by_key(|&i| calls[i].start_ns);
    let stats = &mut report.keys[key as usize];
    stats.blocks = blocks.len() as u64;
    stats.values = blocks.iter().map(|&i| u64::from(calls[i].requested)).sum();
    stats.uncertain = uncertain.len() as u64;
    stats.uncertain_values = uncertain
        .iter()
        .map(|&i| u64::from(calls[i].requested))
        .sum();
    check_overlaps(calls, key, blocks, report);
    check_epoch_order(calls, key, blocks, report);
    check_gaps(calls, key, blocks, uncertain, floor, report);
}

fn span(calls: &[SeqCall], i: usize) -> (u64, u64) {
    calls[i].span().expect("a well-shaped block")
}

/// The entries of one batch (same client and batch number) are one RPC: they must share start,
/// end, kind of outcome and epoch, and name distinct keys. A recorded run writes them so; a
/// history file may not.
fn check_batches(calls: &[SeqCall], report: &mut Report) {
    let mut first: HashMap<(u32, u32), usize> = HashMap::new();
    let mut keys: HashMap<(u32, u32, u32), usize> = HashMap::new();
    for (i, call) in calls.iter().enumerate() {
        let Some(batch) = call.batch else {
            continue;
        };
        let head = *first.entry((call.client, batch)).or_insert(i);
        let reason = if !calls[head].same_batch_reply(call) {
            Some(format!(
                "batch {batch} is one call, but call #{head} of it has another span, outcome \
                 or epoch (a batch is all or nothing, under one epoch)"
            ))
        } else if let Some(&twice) = keys.get(&(call.client, batch, call.key)) {
            Some(format!(
                "batch {batch} asks for this key twice (also call #{twice})"
            ))
        } else {
            None
        };
        keys.entry((call.client, batch, call.key)).or_insert(i);
        if let Some(reason) = reason {
            report.add(Violation::Shape { call: i, reason });
        }
    }
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

/// The epoch rule by value: with a key's blocks sorted by start, the epochs never go down. A
/// block from a later leader never lies below a block from an earlier one.
///
/// Why a correct server keeps it: a block is answered only once the write that covers it is
/// durable under its leader's epoch E (D3: fsync'd by the process that opened the data
/// directory for the E-th time, or committed by a raft quorum in term E, a write that committed
/// in another term being answered as uncertain). A leader of a later epoch E' loads the
/// counters before its first block: on the file backend after the E process let go of the
/// directory; on raft with a read that applies its whole log, which holds every entry
/// committed in an earlier term. So it starts at or above the end of every block of E, and its
/// counters only grow. (Equal epochs are one leader, or one node resuming its own term.)
fn check_epoch_order(calls: &[SeqCall], key: u32, blocks: &[usize], report: &mut Report) {
    let mut latest: Option<(BlockEpoch, usize)> = None;
    for &i in blocks {
        let Some(epoch) = calls[i].epoch() else {
            continue;
        };
        match latest {
            Some((seen, below)) if epoch < seen => {
                report.add(Violation::EpochOrder {
                    key,
                    below,
                    above: i,
                });
            }
            Some((seen, _)) if epoch == seen => {}
            _ => latest = Some((epoch, i)),
        }
    }
}

/// The epoch rule in real time, over every key: a call that starts after a block of epoch E
/// returned never gets a block of an epoch below E.
///
/// Why a correct server keeps it: the block of E was durable when it returned (D3), so the
/// leader of E had made a write durable in its epoch. An earlier leader can make nothing
/// durable after that: on the file backend its process has exited (the directory is locked);
/// on raft a quorum has moved to term E and refuses appends of older terms, and an older entry
/// that commits later commits in a later term, which the server answers as uncertain. The
/// later call's block is written after the call arrived (its write is planned from the queue
/// the call joined), so only by a leader of E or after.
fn check_epoch_time(calls: &[SeqCall], blocks: &[usize], report: &mut Report) {
    // One entry per RPC: the entries of a batch share their span and epoch.
    let mut by_start: Vec<usize> = blocks
        .iter()
        .copied()
        .filter(|&i| calls[i].epoch().is_some() && opens_rpc(calls, i))
        .collect();
    let mut by_end = by_start.clone();
    by_start.sort_unstable_by_key(|&i| calls[i].start_ns);
    by_end.sort_unstable_by_key(|&i| calls[i].end_ns);
    let mut returned = by_end.iter().peekable();
    let mut latest: Option<(BlockEpoch, usize)> = None;
    for &i in &by_start {
        let call = &calls[i];
        while let Some(&j) = returned.next_if(|&&j| calls[j].end_ns < call.start_ns) {
            let epoch = calls[j].epoch().expect("filtered");
            if latest.is_none_or(|(seen, _)| epoch > seen) {
                latest = Some((epoch, j));
            }
        }
        if let Some((seen, earlier)) = latest
            && call.epoch().expect("filtered") < seen
        {
            report.add(Violation::EpochStale { earlier, later: i });
        }
    }
}

/// Whether call `i` is a `GetSeq` or the first recorded entry of its batch.
fn opens_rpc(calls: &[SeqCall], i: usize) -> bool {
    let call = &calls[i];
    call.batch.is_none()
        || i == 0
        || calls[i - 1].client != call.client
        || calls[i - 1].batch != call.batch
}

/// A run of values of a key that no block holds, below the block `above`.
struct Gap {
    from: u64,
    to: u64,
    above: usize,
}

/// The gaps between a key's blocks (sorted by start), from 0 on a fresh cluster, from the
/// lowest block otherwise.
fn gaps_of(calls: &[SeqCall], blocks: &[usize], floor: Floor) -> Vec<Gap> {
    let Some(&lowest) = blocks.first() else {
        return Vec::new();
    };
    let mut covered = match floor {
        Floor::Zero => 0,
        Floor::Unknown => span(calls, lowest).0,
    };
    let mut gaps = Vec::new();
    for &above in blocks {
        let (start, end) = span(calls, above);
        if start > covered {
            gaps.push(Gap {
                from: covered,
                to: start,
                above,
            });
        }
        covered = covered.max(end);
    }
    gaps
}

/// For each uncertain call of a key (sorted by start), the highest end of the key's blocks that
/// returned before it started: if it spent values, they lie at or above this. Non-decreasing,
/// as the calls are sorted by start.
fn floors_of(calls: &[SeqCall], blocks: &[usize], uncertain: &[usize]) -> Vec<u64> {
    // (return, highest end among the blocks returned by then), sorted by return.
    let mut returned: Vec<(u64, u64)> = blocks
        .iter()
        .map(|&b| (calls[b].end_ns, span(calls, b).1))
        .collect();
    returned.sort_unstable();
    let mut highest = 0;
    for (_, end) in returned.iter_mut() {
        highest = highest.max(*end);
        *end = highest;
    }
    uncertain
        .iter()
        .map(|&u| {
            let before = returned.partition_point(|&(at, _)| at < calls[u].start_ns);
            before.checked_sub(1).map_or(0, |n| returned[n].1)
        })
        .collect()
}

/// D2: every gap between the blocks of a key (values below a block that no block holds, from
/// 0 on a fresh cluster) must be the values of uncertain calls on that key.
///
/// What an uncertain call U may have received: a block of exactly its count, granted at any
/// instant after U started (the request may sit on the server long after the client gave up:
/// a paused server, a call timed out in the server's queue; so U's end bounds nothing), never
/// overlapping another block. What places U is real time: **U lies at or above the end of every
/// block whose call returned before U started** (its floor, [`floors_of`]). A block B that
/// returned was durable (D3), and a key's counter never goes below a durable advance: on the
/// same leader, U joined the queue after B's write was planned, so its block comes from
/// counters that already cover B (a write hands out its blocks in arrival order, from where
/// the last write, failed or not, left them); on a later leader, the counters are loaded
/// from storage, which holds B; and an earlier leader can no longer write once B's leader did
/// (see [`check_epoch_time`]). So U may lie in a gap only if the gap starts at or above U's
/// floor. The floors grow with the start, so each gap's candidates are a prefix of the
/// uncertain calls sorted by start, and the prefix grows from the lowest gap to the highest.
///
/// **Budget does not carry forward**: each uncertain call is one block, so it fills one gap at
/// most, and a call that fills a lower gap is spent for the higher ones. Checking each gap alone
/// against all its candidates would let one call explain every gap it could lie in. So the
/// values skipped in all the gaps up to each one must be the counts of *distinct* candidates:
/// a subset sum of the candidates' counts (not merely at most their total), as must each gap
/// alone. Both are necessary conditions of a correct server (a sound relaxation of the exact
/// assignment of calls to gaps), so the check never reports a history a correct server could
/// produce. The sums come from one bitset per key, grown as candidates join (bounded by
/// [`SUBSET_WORK_MAX`] and [`SUBSET_WORDS_MAX`]; past the bound only the totals are compared).
/// A gap found unexplained is reported and left out of the running total, so the gaps above
/// it are judged on their own and each unexplained one is reported once.
fn check_gaps(
    calls: &[SeqCall],
    key: u32,
    blocks: &[usize],
    uncertain: &[usize],
    floor: Floor,
    report: &mut Report,
) {
    let gaps = gaps_of(calls, blocks, floor);
    let stats = &mut report.keys[key as usize];
    stats.gaps = gaps.len() as u64;
    stats.skipped = gaps.iter().map(|g| g.to - g.from).sum();
    let floors = floors_of(calls, blocks, uncertain);
    let mut sums = SubsetSums::new(stats.skipped, uncertain.len());
    let (mut added, mut asked, mut skipped) = (0, 0u64, 0u64);
    for gap in gaps {
        let fit = floors.partition_point(|&f| f <= gap.from);
        for &u in &uncertain[added..fit] {
            sums.add(u64::from(calls[u].requested));
            asked += u64::from(calls[u].requested);
        }
        added = fit;
        let size = gap.to - gap.from;
        let reason = if size > asked {
            Some(format!(
                "the {fit} uncertain call(s) that could lie here (started before any block \
                 above it returned) asked for {asked} in all"
            ))
        } else if sums.contains(size) == Some(false) {
            Some(format!(
                "no subset of the {fit} uncertain call(s) that could lie here asks for exactly \
                 {size}"
            ))
        } else if skipped + size > asked {
            Some(format!(
                "{} value(s) skipped up to here, but the {fit} uncertain call(s) that could lie \
                 in these gaps asked for {asked} in all",
                skipped + size
            ))
        } else if sums.contains(skipped + size) == Some(false) {
            Some(format!(
                "{} value(s) skipped up to here, and no set of distinct uncertain calls among \
                 the {fit} that could lie in these gaps asks for exactly that (each fills one \
                 gap at most)",
                skipped + size
            ))
        } else {
            None
        };
        match reason {
            Some(reason) => report.add(Violation::Gap {
                key,
                from: gap.from,
                to: gap.to,
                above: gap.above,
                reason,
            }),
            None => skipped += size,
        }
    }
}

/// Word operations the subset sums of one key may take (one shift-or over the bitset per
/// uncertain call); past it the bitset is made smaller, and the sums above it are judged by
/// the totals alone. 2^24 is a few ms.
pub const SUBSET_WORK_MAX: u64 = 1 << 24;
/// Words of one key's subset-sum bitset at most: 512 KiB, sums up to 4 194 303 values.
pub const SUBSET_WORDS_MAX: u64 = 1 << 16;

/// Which totals some subset of the counts added so far makes, up to a capacity: bit `s` of the
/// bitset is set when some subset sums to `s`. Adding only ever sets bits, and a sum below the
/// capacity never depends on one above it, so every answer below the capacity is exact.
struct SubsetSums {
    bits: Vec<u64>,
}

impl SubsetSums {
    /// Room for sums up to `target_max`, within [`SUBSET_WORDS_MAX`] words and
    /// [`SUBSET_WORK_MAX`] word operations over `adds` additions.
    fn new(target_max: u64, adds: usize) -> SubsetSums {
        let words = (target_max / 64 + 1)
            .min(SUBSET_WORDS_MAX)
            .min(SUBSET_WORK_MAX / (adds as u64).max(1))
            .max(1);
        let mut bits = vec![0u64; words as usize];
        bits[0] = 1;
        SubsetSums { bits }
    }

    fn add(&mut self, count: u64) {
        shift_or(&mut self.bits, count);
    }

    /// Whether some subset of the counts added sums to exactly `target`; `None` past the
    /// capacity.
    fn contains(&self, target: u64) -> Option<bool> {
        let word = self.bits.get(usize::try_from(target / 64).ok()?)?;
        Some(word >> (target % 64) & 1 == 1)
    }
}

/// `bits |= bits << by`, over a little-endian array of words (bits past the end dropped).
fn shift_or(bits: &mut [u64], by: u64) {
    let Ok(words) = usize::try_from(by / 64) else {
        return;
    };
    let rest = (by % 64) as u32;
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
            batch: None,
            start_ns,
            end_ns,
            outcome: SeqOutcome::Block {
                start,
                count,
                epoch: Some(BlockEpoch::from_parts(1, 1)),
            },
        }
    }

    fn at_epoch(call: SeqCall, hi: u64) -> SeqCall {
        let SeqOutcome::Block { start, count, .. } = call.outcome else {
            panic!("not a block");
        };
        SeqCall {
            outcome: SeqOutcome::Block {
                start,
                count,
                epoch: Some(BlockEpoch::from_parts(hi, 1)),
            },
            ..call
        }
    }

    fn uncertain(client: u32, start_ns: u64, end_ns: u64, count: u32) -> SeqCall {
        SeqCall {
            client,
            key: 0,
            requested: count,
            batch: None,
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

    fn on_key(call: SeqCall, key: u32) -> SeqCall {
        SeqCall { key, ..call }
    }

    fn in_batch(call: SeqCall, batch: u32) -> SeqCall {
        SeqCall {
            batch: Some(batch),
            ..call
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

    fn reasons(report: &Report, calls: &[SeqCall]) -> Vec<String> {
        report
            .violations
            .iter()
            .map(|v| v.describe(calls, &["k", "j", "i"]))
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
        let calls = vec![block(0, 0, 10, 0, 4), on_key(block(1, 0, 10, 0, 4), 1)];
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
    fn every_burnt_refusal_is_its_own_gap() {
        // The burn control: refused calls whose blocks were spent, nothing uncertain. Each gap
        // is reported, not only the first.
        let calls = vec![
            block(0, 0, 10, 0, 2),
            refused(1, 11, 12, 3), // 2..5 burnt
            block(0, 13, 20, 5, 1),
            refused(1, 21, 22, 64), // 6..70 burnt
            block(0, 23, 30, 70, 1),
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(gaps(&report), vec![(2, 5), (6, 70)], "{report:?}");
        assert_eq!(report.keys[0].skipped, 67);
        assert_eq!(report.keys[0].gaps, 2);
    }

    #[test]
    fn an_uncertain_call_lies_above_every_block_returned_before_it_started() {
        let calls = vec![
            block(0, 0, 10, 0, 2),
            block(0, 11, 20, 5, 1),
            uncertain(1, 21, 30, 3), // started after 5..6 was durable: above it
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(gaps(&report), vec![(2, 5)], "{report:?}");
        // Any block above the gap bounds it, not only the nearest one: both calls started
        // after 9..10 returned, so neither lies below it, in 2..5 or in 6..9.
        let calls = vec![
            block(0, 0, 10, 0, 2),
            block(2, 0, 12, 9, 1), // returned at 12
            uncertain(1, 15, 30, 3),
            block(0, 11, 40, 5, 1), // just above the gap, returned at 40
            uncertain(1, 31, 32, 3),
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(gaps(&report), vec![(2, 5), (6, 9)], "{report:?}");
        // Starting at the very instant it returned is not after it.
        let calls = vec![
            block(0, 0, 10, 0, 2),
            block(0, 11, 20, 5, 1),
            uncertain(1, 20, 30, 3),
        ];
        assert!(check(&calls, 1, Floor::Zero).is_clean());
        // A block below the gap that returned first bounds nothing: the call may still lie
        // in the gap above it.
        let calls = vec![
            block(0, 0, 10, 0, 2),
            uncertain(1, 11, 30, 3),
            block(0, 5, 40, 5, 1),
        ];
        assert!(check(&calls, 1, Floor::Zero).is_clean());
    }

    #[test]
    fn a_call_that_must_lie_above_a_gap_explains_only_the_gaps_above() {
        // Two gaps of 3; the call that started after 3..4 returned lies above it, so only the
        // upper gap may be its, and the lower one has no candidate at all.
        let calls = vec![
            block(0, 0, 10, 3, 1), // 0..3 skipped below it
            uncertain(1, 11, 30, 3),
            block(0, 12, 40, 7, 1), // 4..7 skipped below it
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(gaps(&report), vec![(0, 3)], "{report:?}");
        // The same call started before the first block returned: either gap, but not both.
        let calls = vec![
            uncertain(1, 9, 30, 3),
            block(0, 0, 10, 3, 1),
            block(0, 12, 40, 7, 1),
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(gaps(&report), vec![(4, 7)], "{report:?}");
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
        assert!(reasons(&report, &calls)[0].contains("no subset"));
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
        assert!(reasons(&report, &calls)[0].contains("6 value(s) skipped"));
    }

    #[test]
    fn budget_spent_on_a_lower_gap_does_not_carry_forward() {
        // Gaps of 3 and 3; calls of 3, 2 and 2 (7 values in all, more than the 6 skipped).
        // Each gap alone is the call of 3, but only one gap can have it, and 2 + 2 is not 3:
        // the running total 6 is no sum of distinct counts among 3, 2, 2.
        let calls = vec![
            uncertain(1, 0, 5, 3),
            uncertain(2, 0, 5, 2),
            uncertain(3, 0, 5, 2),
            block(0, 0, 10, 3, 1),
            block(0, 11, 20, 7, 1),
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(gaps(&report), vec![(4, 7)], "{report:?}");
        assert!(reasons(&report, &calls)[0].contains("distinct"));
        // With a call of 1 more, 3 + (2 + 1) fills both.
        let mut calls = calls;
        calls.push(uncertain(4, 0, 5, 1));
        assert!(check(&calls, 1, Floor::Zero).is_clean());
    }

    #[test]
    fn an_unexplained_gap_does_not_spoil_the_gaps_above_it() {
        // 0..5 has no candidate; 6..9 is the uncertain call's, and is not reported for the
        // deficit below it.
        let calls = vec![
            uncertain(1, 0, 5, 3),
            block(0, 0, 10, 5, 1),
            block(0, 11, 20, 9, 1),
        ];
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(gaps(&report), vec![(0, 5)], "{report:?}");
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

    #[test]
    fn batch_entries_are_checked_per_key() {
        // One batch granted 0..2 of k and 0..3 of j; a second one is uncertain on both keys and
        // spent its blocks; a GetSeq on each key then continues above.
        let calls = vec![
            in_batch(block(0, 0, 10, 0, 2), 0),
            in_batch(on_key(block(0, 0, 10, 0, 3), 1), 0),
            in_batch(uncertain(0, 11, 20, 4), 1),
            in_batch(on_key(uncertain(0, 11, 20, 1), 1), 1),
            block(1, 21, 30, 6, 1),
            on_key(block(1, 31, 40, 4, 1), 1),
        ];
        let report = check(&calls, 2, Floor::Zero);
        assert!(report.is_clean(), "{:?}", reasons(&report, &calls));
        assert_eq!(
            Rpcs::count(&calls),
            Rpcs {
                get_seq: 2,
                get_seq_batch: 2,
                batch_entries: 4
            }
        );
        // The batch entry of j overlaps a later block of j.
        let mut overlapping = calls.clone();
        overlapping[5] = on_key(block(1, 31, 40, 2, 1), 1);
        assert_eq!(check(&overlapping, 2, Floor::Zero).counts.overlap, 1);
    }

    #[test]
    fn a_batch_is_one_reply() {
        let calls = vec![
            in_batch(block(0, 0, 10, 0, 2), 0),
            in_batch(on_key(refused(0, 0, 10, 3), 1), 0), // half granted, half refused
            in_batch(block(1, 0, 10, 2, 2), 0),
            in_batch(on_key(at_epoch(block(1, 0, 10, 0, 3), 2), 1), 0), // another epoch
            in_batch(block(2, 0, 10, 4, 1), 0),
            in_batch(block(2, 0, 10, 5, 1), 0), // the same key twice
        ];
        let report = check(&calls, 2, Floor::Zero);
        assert_eq!(report.counts.shape, 3, "{:?}", reasons(&report, &calls));
        assert!(reasons(&report, &calls)[0].contains("all or nothing"));
        assert!(reasons(&report, &calls)[2].contains("twice"));
    }

    #[test]
    fn epochs_never_go_down_with_the_values_of_a_key() {
        let calls = vec![
            at_epoch(block(0, 0, 10, 0, 2), 1),
            at_epoch(block(1, 0, 10, 2, 2), 1),
            at_epoch(block(0, 11, 20, 4, 2), 3), // a new leader, above
            at_epoch(block(1, 11, 20, 6, 2), 3),
        ];
        assert!(check(&calls, 1, Floor::Zero).is_clean());
        // A leader of epoch 2 handing out 8..10 after epoch 3 had 4..8: concurrent calls, so
        // only the value order shows it.
        let mut calls = calls;
        calls.push(at_epoch(block(2, 5, 30, 8, 2), 2));
        let report = check(&calls, 1, Floor::Zero);
        assert_eq!(
            report.violations,
            vec![Violation::EpochOrder {
                key: 0,
                below: 2,
                above: 4
            }]
        );
        assert!(reasons(&report, &calls)[0].contains("epoch order"));
        // Another key has its own order.
        let calls = vec![
            at_epoch(block(0, 0, 10, 0, 2), 3),
            on_key(at_epoch(block(0, 11, 20, 0, 2), 3), 1),
            on_key(at_epoch(block(1, 0, 10, 2, 2), 3), 1),
        ];
        assert!(check(&calls, 2, Floor::Zero).is_clean());
        // Unknown epochs (an old history file) are not judged.
        let mut unknown = block(2, 5, 30, 8, 2);
        unknown.outcome = SeqOutcome::Block {
            start: 8,
            count: 2,
            epoch: None,
        };
        let calls = vec![at_epoch(block(0, 0, 10, 0, 8), 3), unknown];
        assert!(check(&calls, 1, Floor::Zero).is_clean());
    }

    #[test]
    fn a_call_after_a_block_of_epoch_e_gets_e_or_later_on_every_key() {
        let calls = vec![
            at_epoch(block(0, 0, 10, 0, 2), 3),
            on_key(at_epoch(block(1, 11, 20, 0, 2), 2), 1), // started after epoch 3 answered
        ];
        let report = check(&calls, 2, Floor::Zero);
        assert_eq!(
            report.violations,
            vec![Violation::EpochStale {
                earlier: 0,
                later: 1
            }]
        );
        assert!(reasons(&report, &calls)[0].contains("stale epoch"));
        // Overlapping in time, either order is possible.
        let calls = vec![
            at_epoch(block(0, 0, 10, 0, 2), 3),
            on_key(at_epoch(block(1, 10, 20, 0, 2), 2), 1),
        ];
        assert!(check(&calls, 2, Floor::Zero).is_clean());
        // Later epochs after earlier ones are the rule.
        let calls = vec![
            at_epoch(block(0, 0, 10, 0, 2), 2),
            on_key(at_epoch(block(1, 11, 20, 0, 2), 3), 1),
            at_epoch(block(1, 21, 30, 2, 2), 3),
        ];
        assert!(check(&calls, 2, Floor::Zero).is_clean());
    }

    #[test]
    fn a_recorded_call_stays_small() {
        // `options::CALLS_MAX` counts on it.
        assert!(std::mem::size_of::<SeqCall>() <= 80);
    }

    #[test]
    fn epochs_read_back_from_their_text() {
        let epoch = BlockEpoch::from(3u128 << 64 | 7);
        assert_eq!(epoch.text(), "3.7");
        assert_eq!(BlockEpoch::parse("3.7"), Some(epoch));
        assert_eq!(BlockEpoch::parse("37"), None);
        assert_eq!(BlockEpoch::parse("3.x"), None);
        assert!(BlockEpoch::from_parts(1, u64::MAX) < BlockEpoch::from_parts(2, 0));
    }

    fn sums_of(counts: impl IntoIterator<Item = u64>, target_max: u64) -> SubsetSums {
        let counts: Vec<u64> = counts.into_iter().collect();
        let mut sums = SubsetSums::new(target_max, counts.len());
        for count in counts {
            sums.add(count);
        }
        sums
    }

    #[test]
    fn subset_sums() {
        assert_eq!(sums_of([4, 4], 10).contains(5), Some(false));
        assert_eq!(sums_of([4, 4, 1], 10).contains(5), Some(true));
        assert_eq!(sums_of([3, 3, 3], 10).contains(9), Some(true));
        assert_eq!(sums_of([3, 3, 3], 10).contains(10), Some(false));
        assert_eq!(sums_of([], 0).contains(0), Some(true));
        assert_eq!(sums_of([2], 1).contains(1), Some(false));
        // Across word boundaries.
        let threes = || std::iter::repeat_n(3, 100);
        assert_eq!(sums_of(threes(), 301).contains(300), Some(true));
        assert_eq!(sums_of(threes(), 301).contains(301), Some(false));
        let fours = std::iter::repeat_n(4, 50).chain([1]);
        assert_eq!(sums_of(fours, 129).contains(129), Some(true));
        // A count past the capacity leaves the sums below it as they were.
        assert_eq!(sums_of([1 << 40, 5], 10).contains(5), Some(true));
        // Past the capacity: not judged.
        assert_eq!(sums_of([1 << 40], 1 << 41).contains(1 << 40), None);
    }

    #[test]
    fn the_subset_sums_stay_within_their_bounds() {
        let wide = SubsetSums::new(u64::MAX, 1);
        assert_eq!(wide.bits.len() as u64, SUBSET_WORDS_MAX);
        let many = SubsetSums::new(1 << 30, 1 << 20);
        assert_eq!(many.bits.len() as u64, SUBSET_WORK_MAX >> 20);
        let past_work = SubsetSums::new(1 << 30, usize::MAX);
        assert_eq!(past_work.bits.len(), 1);
        assert_eq!(past_work.contains(64), None);
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

    /// Clients, calls each, one call in how many uncertain (0: none), one in how many a batch.
    #[derive(Debug, Clone, Copy)]
    struct Shape {
        clients: u32,
        per_client: usize,
        uncertain_one_in: u32,
    }

    /// A history a correct server could produce: sequential clients on three keys, a batch now
    /// and then; a granted call takes effect at a random instant inside its span; an uncertain
    /// one may take effect at any instant after it started, even after its client gave up, or
    /// never. Leaders change at random instants, each with a higher epoch; a block carries the
    /// epoch of the leader at its instant.
    fn valid_history(seed: u64, shape: Shape) -> Vec<SeqCall> {
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut calls, mut effects) = (Vec::new(), Vec::new());
        for client in 0..shape.clients {
            let (mut t, mut batches) = (rng.random_range(0..1_000u64), 0);
            for _ in 0..shape.per_client {
                let start_ns = t + rng.random_range(0..50);
                let end_ns = start_ns + rng.random_range(1..200);
                t = end_ns;
                let keys: Vec<u32> = match rng.random_range(0..4) {
                    0 => (0..3).filter(|_| rng.random_bool(0.7)).collect(),
                    _ => vec![rng.random_range(0..3)],
                };
                if keys.is_empty() {
                    continue;
                }
                let batch = (keys.len() > 1).then(|| {
                    batches += 1;
                    batches
                });
                let kind = rng.random_range(0..10);
                let uncertain = shape.uncertain_one_in > 0 && kind % shape.uncertain_one_in == 1;
                let effect = if uncertain {
                    rng.random_bool(0.5)
                        .then(|| (start_ns + rng.random_range(0..2_000), false))
                } else if kind == 0 {
                    None // refused
                } else {
                    Some((rng.random_range(start_ns..=end_ns), true))
                };
                let first = calls.len();
                for key in keys {
                    let outcome = match uncertain {
                        true => SeqOutcome::Uncertain("Unavailable".into()),
                        false => SeqOutcome::Refused("FailedPrecondition".into()),
                    };
                    calls.push(SeqCall {
                        client,
                        key,
                        requested: rng.random_range(1..=64),
                        batch,
                        start_ns,
                        end_ns,
                        outcome,
                    });
                }
                if let Some((at, seen)) = effect {
                    effects.push((at, first..calls.len(), seen));
                }
            }
        }
        effects.sort_unstable_by_key(|(at, ..)| *at);
        let (mut counters, mut epoch, mut leader_until) = ([0u64; 3], 1, 0);
        for (at, entries, seen) in effects {
            if at >= leader_until {
                epoch += rng.random_range(0..2);
                leader_until = at + rng.random_range(100..3_000);
            }
            for i in entries {
                let call = &mut calls[i];
                let counter = &mut counters[call.key as usize];
                if seen {
                    call.outcome = SeqOutcome::Block {
                        start: *counter,
                        count: call.requested,
                        epoch: Some(BlockEpoch::from_parts(epoch, 1)),
                    };
                }
                *counter += u64::from(call.requested);
            }
        }
        calls
    }

    proptest! {
        #[test]
        fn valid_histories_pass(seed in any::<u64>(), clients in 1u32..8, per_client in 1usize..60) {
            let shape = Shape { clients, per_client, uncertain_one_in: 4 };
            let calls = valid_history(seed, shape);
            let report = check(&calls, 3, Floor::Zero);
            prop_assert!(report.is_clean(), "seed {seed} {shape:?}: {:?}", reasons(&report, &calls));
        }

        #[test]
        fn a_block_moved_onto_another_is_caught(seed in any::<u64>(), clients in 1u32..6, per_client in 2usize..40) {
            let shape = Shape { clients, per_client, uncertain_one_in: 4 };
            let mut calls = valid_history(seed, shape);
            let blocks: Vec<usize> = (0..calls.len())
                .filter(|&i| calls[i].span().is_some())
                .collect();
            let pair = blocks.iter().flat_map(|&a| blocks.iter().map(move |&b| (a, b)))
                .find(|&(a, b)| a != b && calls[a].key == calls[b].key);
            if let Some((a, b)) = pair {
                let (start, _) = calls[a].span().unwrap();
                let epoch = calls[b].epoch();
                calls[b].outcome = SeqOutcome::Block { start, count: calls[b].requested, epoch };
                let report = check(&calls, 3, Floor::Zero);
                prop_assert!(report.counts.overlap >= 1, "seed {seed}: {:?}", report.counts);
            }
        }

        #[test]
        fn a_burnt_refusal_is_caught_when_nothing_is_uncertain(seed in any::<u64>(), clients in 1u32..6, per_client in 2usize..40) {
            let shape = Shape { clients, per_client, uncertain_one_in: 0 };
            let mut calls = valid_history(seed, shape);
            // A granted GetSeq below the top of its key, now refused: its block is a gap.
            let top = |calls: &[SeqCall], key| calls.iter().filter(|c| c.key == key)
                .filter_map(SeqCall::span).map(|(_, end)| end).max();
            let burnt = (0..calls.len()).find(|&i| calls[i].batch.is_none()
                && calls[i].span().is_some_and(|(_, end)| Some(end) < top(&calls, calls[i].key)));
            if let Some(i) = burnt {
                calls[i].outcome = SeqOutcome::Refused("ResourceExhausted".into());
                let report = check(&calls, 3, Floor::Zero);
                prop_assert_eq!(report.counts.gap, 1, "seed {}: {:?}", seed, reasons(&report, &calls));
            }
        }

        #[test]
        fn a_stale_epoch_is_caught(seed in any::<u64>(), clients in 1u32..6, per_client in 2usize..40) {
            let shape = Shape { clients, per_client, uncertain_one_in: 4 };
            let mut calls = valid_history(seed, shape);
            // A block that started after another returned, answered (with its batch) as if by a
            // leader before every other.
            let blocks: Vec<usize> = (0..calls.len()).filter(|&i| calls[i].span().is_some()).collect();
            let pair = blocks.iter().flat_map(|&a| blocks.iter().map(move |&b| (a, b)))
                .find(|&(a, b)| calls[b].start_ns > calls[a].end_ns);
            if let Some((_, b)) = pair {
                let (client, start_ns) = (calls[b].client, calls[b].start_ns);
                for call in calls.iter_mut().filter(|c| c.client == client && c.start_ns == start_ns) {
                    if let SeqOutcome::Block { epoch, .. } = &mut call.outcome {
                        *epoch = Some(BlockEpoch::from_parts(0, 1));
                    }
                }
                let report = check(&calls, 3, Floor::Zero);
                prop_assert!(report.counts.epoch >= 1, "seed {seed}: {:?}", report.counts);
            }
        }
    }
}
