//! A recorded history of stamping-lease calls and the checks over it (SEMANTICS §14).
//!
//! Every call is recorded as (client, operation, start, end, outcome), with start and end on
//! `CLOCK_MONOTONIC` like the other histories: the real call lies inside that span. An outcome
//! is a reply with its values, a definite refusal (nothing changed), or an ambiguous failure
//! (the request may have taken effect, at any instant after it was sent). With `--mode
//! library` a holder is a [`LeaseKeeper`](tso_client::LeaseKeeper): its acquire is the whole
//! `start`, each renewal it makes in the background is recorded when the holder first sees its
//! grant, and each permit the keeper gives is recorded too. Six rules are checked, each in its
//! own function whose comment gives the argument; every rule only uses what real time and the
//! protocol force, so a correct server (and keeper) never fails one:
//! 1. the frontier is never above the bound of a lease that is certainly live;
//! 2. the frontier never goes back on one leader (one epoch);
//! 3. a lease's bound is above every timestamp granted before the lease was asked for;
//! 4. two leases never share an id;
//! 5. a grant from a later epoch than an answered lease, started after it answered, is above
//!    its bound;
//! 6. a keeper never gives a permit after the answer of the call that set its lease's expiry
//!    plus the TTL.
//!
//! Liveness is judged on monotonic time, as the server judges it: clock faults shift the
//! servers' wall clocks only, and every process of a run shares `CLOCK_MONOTONIC`, so no rule
//! needs a margin for them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use super::history::{Answered, VIOLATIONS_KEPT_MAX};

/// Slack taken off a lease's TTL before calling it certainly live (rule 1): the server reads
/// monotonic time in whole milliseconds, truncated, both when it sets a lease's deadline and
/// when it judges it, so it may end a lease up to 2 ms before the exact TTL; 10 ms with room.
/// Nothing else: the server and the checker read the same `CLOCK_MONOTONIC`, and no clock
/// fault moves it.
pub const EXPIRY_MARGIN_NS: u64 = 10_000_000;

/// What a call asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOp {
    /// `AcquireLease` by checker holder `holder` (a client id) at `holder_epoch`; with `--mode
    /// library`, a `LeaseKeeper`'s whole start (an acquire, then a renewal).
    Acquire {
        holder: u32,
        holder_epoch: u64,
        ttl_ms: u64,
    },
    /// `RenewLease` of a lease acquired with `ttl_ms` (a renewal keeps the original TTL); with
    /// `--mode library`, a keeper's renewal, from when its schedule let it send the first
    /// attempt to when the holder saw the grant.
    Renew {
        lease_id: u64,
        ttl_ms: u64,
    },
    Release {
        lease_id: u64,
    },
    /// `GetSafeFrontier`.
    Frontier,
    /// `GetTs` of one timestamp.
    Ts,
    /// A `LeaseKeeper`'s permit asked for before a stamp (`--mode library`), under lease
    /// `lease_id` acquired with `ttl_ms`.
    Permit {
        lease_id: u64,
        ttl_ms: u64,
    },
}

/// What a call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// An acquire or renew answered: the lease, its bound (a physical ms) and the epoch.
    Lease {
        lease_id: u64,
        bound_ms: u64,
        epoch: u128,
    },
    Released,
    /// A frontier; epoch 0 (with frontier 0) from a node that does not serve.
    Frontier {
        frontier_ms: u64,
        epoch: u128,
    },
    /// A `GetTs` grant's physical part, and the epoch of the leader that made it.
    Granted {
        physical_ms: u64,
        epoch: u128,
    },
    /// The keeper gave a permit to stamp up to `bound_ms`.
    Permitted {
        bound_ms: u64,
    },
    /// A definite refusal: nothing changed. The gRPC code.
    Refused(String),
    /// A failure after which the request may still take effect. The gRPC code.
    Ambiguous(String),
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseCall {
    pub client: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub op: LeaseOp,
    pub outcome: LeaseOutcome,
}

impl Answered for LeaseCall {
    fn client(&self) -> u32 {
        self.client
    }

    fn end_ns(&self) -> u64 {
        self.end_ns
    }

    /// A reply from the service; a permit is the keeper's answer, not the service's.
    fn succeeded(&self) -> bool {
        match self.outcome {
            LeaseOutcome::Frontier { epoch, .. } => epoch != 0,
            LeaseOutcome::Lease { .. } | LeaseOutcome::Released | LeaseOutcome::Granted { .. } => {
                true
            }
            LeaseOutcome::Permitted { .. }
            | LeaseOutcome::Refused(_)
            | LeaseOutcome::Ambiguous(_) => false,
        }
    }
}

impl LeaseCall {
    /// The lease, bound and epoch of an answered acquire or renew.
    fn lease(&self) -> Option<(u64, u64, u128)> {
        match self.outcome {
            LeaseOutcome::Lease {
                lease_id,
                bound_ms,
                epoch,
            } => Some((lease_id, bound_ms, epoch)),
            _ => None,
        }
    }

    /// The frontier of a read answered by a serving leader, and its epoch.
    fn frontier(&self) -> Option<(u64, u128)> {
        match self.outcome {
            LeaseOutcome::Frontier { frontier_ms, epoch } if epoch != 0 => {
                Some((frontier_ms, epoch))
            }
            _ => None,
        }
    }

    /// A grant's physical part and epoch.
    fn granted(&self) -> Option<(u64, u128)> {
        match self.outcome {
            LeaseOutcome::Granted { physical_ms, epoch } => Some((physical_ms, epoch)),
            _ => None,
        }
    }

    fn describe(&self, i: usize) -> String {
        let op = match self.op {
            LeaseOp::Acquire {
                holder,
                holder_epoch,
                ttl_ms,
            } => format!("acquire(holder {holder}, epoch {holder_epoch}, ttl {ttl_ms} ms)"),
            LeaseOp::Renew { lease_id, .. } => format!("renew({lease_id})"),
            LeaseOp::Release { lease_id } => format!("release({lease_id})"),
            LeaseOp::Frontier => "frontier".to_string(),
            LeaseOp::Ts => "get_ts".to_string(),
            LeaseOp::Permit { lease_id, .. } => format!("permit({lease_id})"),
        };
        let outcome = match &self.outcome {
            LeaseOutcome::Lease {
                lease_id,
                bound_ms,
                epoch,
            } => format!(
                "lease {lease_id} bound {bound_ms} (epoch {})",
                epoch_text(*epoch)
            ),
            LeaseOutcome::Released => "released".to_string(),
            LeaseOutcome::Frontier { frontier_ms, epoch } => {
                format!("{frontier_ms} (epoch {})", epoch_text(*epoch))
            }
            LeaseOutcome::Granted { physical_ms, epoch } => {
                format!("physical {physical_ms} (epoch {})", epoch_text(*epoch))
            }
            LeaseOutcome::Permitted { bound_ms } => format!("permitted up to {bound_ms}"),
            LeaseOutcome::Refused(code) => format!("refused {code}"),
            LeaseOutcome::Ambiguous(code) => format!("ambiguous {code}"),
        };
        format!(
            "call #{i} (client {}, {}..{} ns) {op} = {outcome}",
            self.client, self.start_ns, self.end_ns
        )
    }
}

/// An epoch as `hi.lo`.
pub fn epoch_text(epoch: u128) -> String {
    format!("{}.{}", epoch >> 64, epoch as u64)
}

/// A broken rule, naming the calls (indices into the history) that show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Rule 1: `read` saw a frontier above `bound_ms`, the highest bound lease `lease_id` could
    /// have had, while `live` (its acquire or renew) shows the lease certainly live.
    AboveLease {
        read: usize,
        live: usize,
        lease_id: u64,
        bound_ms: u64,
    },
    /// Rule 2: `later` was sent after `earlier` returned, on the same epoch, and saw less.
    Regression { earlier: usize, later: usize },
    /// Rule 3: `grant` returned before `lease` was asked for, at or above its bound.
    BoundBelowGrant { lease: usize, grant: usize },
    /// Rule 4: two acquires by different holders or holder epochs got one lease id.
    SharedId { a: usize, b: usize },
    /// Rule 5: `grant`, from a later epoch than `lease` and sent after it answered, is at or
    /// below its bound.
    LaterGrantBelowBound { lease: usize, grant: usize },
    /// Rule 6: `permit` was asked for after the answer of `grant`, the call that set its
    /// lease's expiry, plus the TTL.
    PermitPastExpiry { permit: usize, grant: usize },
}

impl Violation {
    pub fn describe(&self, calls: &[LeaseCall]) -> String {
        let c = |i: usize| calls[i].describe(i);
        match *self {
            Violation::AboveLease {
                read,
                live,
                lease_id,
                bound_ms,
            } => format!(
                "rule 1 frontier above a live lease: {} is above lease {lease_id}'s bound \
                 {bound_ms}, certainly live by {}",
                c(read),
                c(live)
            ),
            Violation::Regression { earlier, later } => format!(
                "rule 2 frontier went back on one leader: {} then {}",
                c(earlier),
                c(later)
            ),
            Violation::BoundBelowGrant { lease, grant } => format!(
                "rule 3 bound not above an earlier grant: {} before {}",
                c(grant),
                c(lease)
            ),
            Violation::SharedId { a, b } => {
                format!("rule 4 lease id shared: {} and {}", c(a), c(b))
            }
            Violation::LaterGrantBelowBound { lease, grant } => format!(
                "rule 5 a later leader granted at or below an answered bound: {} after {}",
                c(grant),
                c(lease)
            ),
            Violation::PermitPastExpiry { permit, grant } => format!(
                "rule 6 permit past the server's expiry: {} more than the TTL after {}",
                c(permit),
                c(grant)
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ViolationCounts {
    pub above_lease: u64,
    pub regression: u64,
    pub bound_below_grant: u64,
    pub shared_id: u64,
    pub later_grant_below_bound: u64,
    pub permit_past_expiry: u64,
}

impl ViolationCounts {
    pub fn total(&self) -> u64 {
        self.above_lease
            + self.regression
            + self.bound_below_grant
            + self.shared_id
            + self.later_grant_below_bound
            + self.permit_past_expiry
    }
}

impl fmt::Display for ViolationCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rule-1 frontier above a live lease, {} rule-2 frontier regression, \
             {} rule-3 bound below a grant, {} rule-4 shared lease id, \
             {} rule-5 later grant below a bound, {} rule-6 permit past expiry",
            self.above_lease,
            self.regression,
            self.bound_below_grant,
            self.shared_id,
            self.later_grant_below_bound,
            self.permit_past_expiry
        )
    }
}

/// What the history holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Distinct leases acquired.
    pub leases: u64,
    pub renewals: u64,
    pub releases: u64,
    /// Frontier reads answered by a serving leader.
    pub frontier_reads: u64,
    pub grants: u64,
    /// Permits a keeper gave (`--mode library`).
    pub permits: u64,
    /// Frontier reads judged against at least one certainly live lease (rule 1).
    pub reads_bounded: u64,
    /// Grants judged against at least one earlier leader's answered bound (rule 5).
    pub grants_bounded: u64,
    /// Permits judged against the answer that set their lease's expiry (rule 6).
    pub permits_bounded: u64,
}

/// The outcome of checking a lease history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Up to [`VIOLATIONS_KEPT_MAX`] of each kind.
    pub violations: Vec<Violation>,
    pub counts: ViolationCounts,
    pub stats: Stats,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.counts.total() == 0
    }

    fn add(&mut self, violation: Violation) {
        let count = match violation {
            Violation::AboveLease { .. } => &mut self.counts.above_lease,
            Violation::Regression { .. } => &mut self.counts.regression,
            Violation::BoundBelowGrant { .. } => &mut self.counts.bound_below_grant,
            Violation::SharedId { .. } => &mut self.counts.shared_id,
            Violation::LaterGrantBelowBound { .. } => &mut self.counts.later_grant_below_bound,
            Violation::PermitPastExpiry { .. } => &mut self.counts.permit_past_expiry,
        };
        *count += 1;
        if *count <= VIOLATIONS_KEPT_MAX as u64 {
            self.violations.push(violation);
        }
    }
}

/// Runs every rule over `calls`; `restarts_ns` are the instants at which the run restarted a
/// server process (rule 2 does not compare reads across them).
pub fn check(calls: &[LeaseCall], restarts_ns: &[u64]) -> Report {
    let mut report = Report::default();
    check_live_leases(calls, &mut report);
    check_regression(calls, restarts_ns, &mut report);
    check_bounds(calls, &mut report);
    check_ids(calls, &mut report);
    check_later_grants(calls, &mut report);
    check_permits(calls, &mut report);
    let s = &mut report.stats;
    for call in calls {
        match (call.op, &call.outcome) {
            (LeaseOp::Renew { .. }, LeaseOutcome::Lease { .. }) => s.renewals += 1,
            (LeaseOp::Release { .. }, LeaseOutcome::Released) => s.releases += 1,
            (LeaseOp::Frontier, _) if call.frontier().is_some() => s.frontier_reads += 1,
            (LeaseOp::Ts, LeaseOutcome::Granted { .. }) => s.grants += 1,
            (LeaseOp::Permit { .. }, LeaseOutcome::Permitted { .. }) => s.permits += 1,
            _ => {}
        }
    }
    s.leases = calls
        .iter()
        .filter(|c| matches!(c.op, LeaseOp::Acquire { .. }))
        .filter_map(|c| c.lease().map(|(id, _, _)| id))
        .collect::<BTreeSet<_>>()
        .len() as u64;
    report
}

/// The TTL an acquire or renew asked for (a renewal keeps the lease's), or a permit's lease
/// was acquired with.
fn ttl_ns(op: LeaseOp) -> u64 {
    match op {
        LeaseOp::Acquire { ttl_ms, .. }
        | LeaseOp::Renew { ttl_ms, .. }
        | LeaseOp::Permit { ttl_ms, .. } => ttl_ms * 1_000_000,
        _ => 0,
    }
}

/// What the history says about one lease id.
#[derive(Default)]
struct LeaseLife {
    /// Answered acquires and renews, sorted by start.
    answered: Vec<usize>,
    /// The highest bound of `answered[..=k]`.
    bound_upto: Vec<u64>,
    /// The earliest send of a release (any outcome: one may take effect unseen).
    released_ns: u64,
    /// Ambiguous renews of the lease, and ambiguous acquires at its holder and holder epoch
    /// (an acquire of a live lease renews it).
    ambiguous: Vec<usize>,
    /// When its bound is unknown: from the send of an ambiguous call to the answer of the first
    /// answered call on the lease sent after it failed (never, if none was).
    unknown: Vec<(u64, u64)>,
}

impl LeaseLife {
    /// Whether an ambiguous call may have set the bound to something unknown by the time a
    /// call spanning `start_ns..end_ns` read it.
    fn unknown_during(&self, start_ns: u64, end_ns: u64) -> bool {
        self.unknown
            .iter()
            .any(|&(from, until)| end_ns > from && start_ns < until)
    }
}

/// Rule 1: the frontier is never above a live lease's bound (SEMANTICS §14: the frontier is
/// `min(H, bound of every unexpired lease)`, and a new leader loads the set).
///
/// Lease L is certainly live at a frontier read R when some answered acquire or renew A of L
/// returned before R was sent (so L was in the durable set before R), no release of L was sent
/// before R returned, and R returned before `start + ttl - margin`, where `start` is when A was
/// sent. The server judges liveness on monotonic time: the leader that answered A counts the
/// TTL from its durable write, which came after A was sent (a repeated acquire renews, so this
/// holds for an acquire retry too); a leader that loads the set later counts a full TTL from the
/// load, later still. Superseded leases count too: they bind until they expire.
///
/// The bound L had at R is then at most the highest bound any call on L sent before R returned
/// could have set; renewals never lower it. An ambiguous call on L (a renew, or an acquire at
/// its holder epoch, which renews a live lease) may have raised it to an unknown value, so L
/// is not judged for reads overlapping the span from its send to the answer of the first call
/// on L sent after it failed. After that answer the bound is known again: the leader handles a
/// lease's calls one at a time and writes the whole set in log order (a deposed leader's writes
/// are fenced), so the ambiguous call took effect before the later one, whose bound is then at
/// least its own, or never takes effect.
fn check_live_leases(calls: &[LeaseCall], report: &mut Report) {
    let lives = lease_lives(calls);
    let mut reads: Vec<usize> = (0..calls.len())
        .filter(|&i| calls[i].frontier().is_some())
        .collect();
    reads.sort_unstable_by_key(|&i| calls[i].start_ns);
    let read_starts: Vec<u64> = reads.iter().map(|&i| calls[i].start_ns).collect();
    let mut bounded = vec![false; calls.len()];
    for (&lease_id, life) in &lives {
        // One report per read and lease, naming the first witness found.
        let mut reported: std::collections::HashSet<usize> = Default::default();
        for &a in &life.answered {
            let live_until =
                (calls[a].start_ns + ttl_ns(calls[a].op)).saturating_sub(EXPIRY_MARGIN_NS);
            let from = read_starts.partition_point(|&s| s <= calls[a].end_ns);
            let to = read_starts.partition_point(|&s| s < live_until);
            for &r in reads.get(from..to.max(from)).unwrap_or(&[]) {
                let read = &calls[r];
                if read.end_ns >= live_until
                    || life.released_ns < read.end_ns
                    || life.unknown_during(read.start_ns, read.end_ns)
                {
                    continue;
                }
                bounded[r] = true;
                let k = life
                    .answered
                    .partition_point(|&i| calls[i].start_ns < read.end_ns);
                let bound_ms = life.bound_upto[k - 1];
                let (frontier_ms, _) = read.frontier().expect("a serving read");
                if frontier_ms > bound_ms && reported.insert(r) {
                    report.add(Violation::AboveLease {
                        read: r,
                        live: a,
                        lease_id,
                        bound_ms,
                    });
                }
            }
        }
    }
    report.stats.reads_bounded = bounded.iter().filter(|&&b| b).count() as u64;
}

/// Every lease id's answered acquires and renews, releases, and ambiguous calls with the spans
/// they leave its bound unknown.
fn lease_lives(calls: &[LeaseCall]) -> BTreeMap<u64, LeaseLife> {
    let mut lives: BTreeMap<u64, LeaseLife> = BTreeMap::new();
    let new_life = || LeaseLife {
        released_ns: u64::MAX,
        ..LeaseLife::default()
    };
    // The leases each holder and holder epoch got, and its ambiguous acquires.
    let mut ids_of: HashMap<(u32, u64), BTreeSet<u64>> = HashMap::new();
    let mut ambiguous_acquires: HashMap<(u32, u64), Vec<usize>> = HashMap::new();
    for (i, call) in calls.iter().enumerate() {
        match (call.op, &call.outcome) {
            (
                LeaseOp::Acquire {
                    holder,
                    holder_epoch,
                    ..
                },
                LeaseOutcome::Lease { lease_id, .. },
            ) => {
                ids_of
                    .entry((holder, holder_epoch))
                    .or_default()
                    .insert(*lease_id);
                lives
                    .entry(*lease_id)
                    .or_insert_with(new_life)
                    .answered
                    .push(i);
            }
            (LeaseOp::Renew { .. }, LeaseOutcome::Lease { lease_id, .. }) => lives
                .entry(*lease_id)
                .or_insert_with(new_life)
                .answered
                .push(i),
            (
                LeaseOp::Acquire {
                    holder,
                    holder_epoch,
                    ..
                },
                LeaseOutcome::Ambiguous(_),
            ) => ambiguous_acquires
                .entry((holder, holder_epoch))
                .or_default()
                .push(i),
            (LeaseOp::Renew { lease_id, .. }, LeaseOutcome::Ambiguous(_)) => lives
                .entry(lease_id)
                .or_insert_with(new_life)
                .ambiguous
                .push(i),
            (LeaseOp::Release { lease_id }, _) => {
                let life = lives.entry(lease_id).or_insert_with(new_life);
                life.released_ns = life.released_ns.min(call.start_ns);
            }
            _ => {}
        }
    }
    for (key, acquires) in ambiguous_acquires {
        for id in ids_of.get(&key).into_iter().flatten() {
            let life = lives.get_mut(id).expect("an answered lease");
            life.ambiguous.extend(&acquires);
        }
    }
    for life in lives.values_mut() {
        life.answered.sort_unstable_by_key(|&i| calls[i].start_ns);
        let mut highest = 0;
        life.bound_upto = life
            .answered
            .iter()
            .map(|&i| {
                highest = highest.max(calls[i].lease().expect("answered").1);
                highest
            })
            .collect();
        let answered = &life.answered;
        life.unknown = life
            .ambiguous
            .iter()
            .map(|&u| {
                let next = answered.partition_point(|&i| calls[i].start_ns < calls[u].end_ns);
                let until = answered.get(next).map_or(u64::MAX, |&i| calls[i].end_ns);
                (calls[u].start_ns, until)
            })
            .collect();
    }
    lives
}

/// Rule 2: on one leader (one non-zero epoch) the frontier never goes back (SEMANTICS §14: a
/// new lease's bound is above `H`, renewals only raise bounds, expiry and release only remove
/// terms of the minimum, and expiry is on monotonic time, so no clock step brings a lease
/// back). So a read sent after another returned, on the same epoch, sees at least as much.
/// Reads that overlap in time are not ordered and not compared.
///
/// Nor are reads on either side of a process restart: a raft leader restarted may resume in
/// its own term, so under the same epoch (§8), and it loads the lease set anew, where every
/// lease neither released nor forgotten is live for a full TTL, also one that had expired
/// before the restart. So a read is compared only with reads sent after the last restart
/// before it returned.
fn check_regression(calls: &[LeaseCall], restarts_ns: &[u64], report: &mut Report) {
    let mut restarts = restarts_ns.to_vec();
    restarts.sort_unstable();
    // Reads by epoch and by the number of restarts at or before they were sent; each group by
    // end, with the read of the highest frontier among the first k.
    let mut groups: BTreeMap<(u128, usize), Vec<usize>> = BTreeMap::new();
    for (i, call) in calls.iter().enumerate() {
        if let Some((_, epoch)) = call.frontier() {
            let span = restarts.partition_point(|&r| r <= call.start_ns);
            groups.entry((epoch, span)).or_default().push(i);
        }
    }
    let frontier = |i: usize| calls[i].frontier().expect("a serving read").0;
    let mut highest: BTreeMap<(u128, usize), (Vec<u64>, Vec<usize>)> = BTreeMap::new();
    for (&key, reads) in groups.iter_mut() {
        reads.sort_unstable_by_key(|&i| calls[i].end_ns);
        let ends: Vec<u64> = reads.iter().map(|&i| calls[i].end_ns).collect();
        let mut highest_upto: Vec<usize> = Vec::with_capacity(reads.len());
        for &i in reads.iter() {
            let best = match highest_upto.last() {
                Some(&h) if frontier(h) >= frontier(i) => h,
                _ => i,
            };
            highest_upto.push(best);
        }
        highest.insert(key, (ends, highest_upto));
    }
    // A read compares with the reads of its epoch sent after the last restart before it
    // returned (those of the group of that many restarts) that returned before it was sent.
    for (later, call) in calls.iter().enumerate() {
        let Some((frontier_ms, epoch)) = call.frontier() else {
            continue;
        };
        let span = restarts.partition_point(|&r| r < call.end_ns);
        let Some((ends, highest_upto)) = highest.get(&(epoch, span)) else {
            continue;
        };
        let k = ends.partition_point(|&e| e < call.start_ns);
        if k > 0 && frontier(highest_upto[k - 1]) > frontier_ms {
            report.add(Violation::Regression {
                earlier: highest_upto[k - 1],
                later,
            });
        }
    }
}

/// Rule 3: a lease's bound is above every timestamp granted before it (SEMANTICS §14: the
/// bound is `max(H + 1, now + ttl)`, and `H` is above every grant, on this leader or any
/// earlier one). A grant that returned before an acquire or renew was sent was granted before
/// the bound it answers was set (a repeated acquire renews, so its bound is set by the repeat),
/// so its physical part is below the bound.
fn check_bounds(calls: &[LeaseCall], report: &mut Report) {
    let mut grants: Vec<usize> = (0..calls.len())
        .filter(|&i| calls[i].granted().is_some())
        .collect();
    grants.sort_unstable_by_key(|&i| calls[i].end_ns);
    let ends: Vec<u64> = grants.iter().map(|&i| calls[i].end_ns).collect();
    let physical = |i: usize| calls[i].granted().expect("a grant").0;
    let mut highest_upto: Vec<usize> = Vec::with_capacity(grants.len());
    for &i in &grants {
        let best = match highest_upto.last() {
            Some(&h) if physical(h) >= physical(i) => h,
            _ => i,
        };
        highest_upto.push(best);
    }
    for (i, call) in calls.iter().enumerate() {
        let Some((_, bound_ms, _)) = call.lease() else {
            continue;
        };
        let k = ends.partition_point(|&e| e < call.start_ns);
        if k > 0 && physical(highest_upto[k - 1]) >= bound_ms {
            report.add(Violation::BoundBelowGrant {
                lease: i,
                grant: highest_upto[k - 1],
            });
        }
    }
}

/// Rule 4: lease ids are never reused (SEMANTICS §14: the id counter is durable with the set,
/// also across failovers). Only the same holder at the same holder epoch may get an id back
/// (the same live lease); two answered acquires with one id and different holders or holder
/// epochs are two leases sharing it.
fn check_ids(calls: &[LeaseCall], report: &mut Report) {
    let mut owner: HashMap<u64, (u32, u64, usize)> = HashMap::new();
    for (i, call) in calls.iter().enumerate() {
        let (
            LeaseOp::Acquire {
                holder,
                holder_epoch,
                ..
            },
            Some((lease_id, _, _)),
        ) = (call.op, call.lease())
        else {
            continue;
        };
        let (h, e, first) = *owner.entry(lease_id).or_insert((holder, holder_epoch, i));
        if (h, e) != (holder, holder_epoch) {
            report.add(Violation::SharedId { a: first, b: i });
        }
    }
}

/// Rule 5: a later leader grants above every answered bound (SEMANTICS §14: the bound is made
/// durable as the high-water before the answer, and a leader's fence starts above the durable
/// high-water, §5). A leader of a later epoch than the one that answered lease call A was
/// elected after A's write committed (a write of an older epoch cannot commit once a later
/// leader is elected), so its fence read A's bound; a grant of it sent after A returned is
/// then above A's bound. Grants of A's own epoch are not judged: that leader grants at its
/// clock, below the bounds it gave, and a restarted raft leader may resume in its own term.
fn check_later_grants(calls: &[LeaseCall], report: &mut Report) {
    // Each epoch's grants by start, and the suffix minimum of their physical parts.
    let mut by_epoch: BTreeMap<u128, Vec<usize>> = BTreeMap::new();
    for (i, call) in calls.iter().enumerate() {
        if let Some((_, epoch)) = call.granted() {
            by_epoch.entry(epoch).or_default().push(i);
        }
    }
    let physical = |i: usize| calls[i].granted().expect("a grant").0;
    let mut lowest_from: BTreeMap<u128, (Vec<u64>, Vec<usize>)> = BTreeMap::new();
    for (&epoch, grants) in by_epoch.iter_mut() {
        grants.sort_unstable_by_key(|&i| calls[i].start_ns);
        let starts = grants.iter().map(|&i| calls[i].start_ns).collect();
        let mut lowest: Vec<usize> = grants.clone();
        for k in (0..lowest.len().saturating_sub(1)).rev() {
            if physical(lowest[k + 1]) < physical(lowest[k]) {
                lowest[k] = lowest[k + 1];
            }
        }
        lowest_from.insert(epoch, (starts, lowest));
    }
    let mut leases: Vec<usize> = (0..calls.len())
        .filter(|&i| calls[i].lease().is_some())
        .collect();
    for &a in &leases {
        let (_, bound_ms, lease_epoch) = calls[a].lease().expect("an answered lease call");
        let later = lowest_from.range(lease_epoch.saturating_add(1)..);
        for (starts, lowest) in later.map(|(_, v)| v) {
            let k = starts.partition_point(|&s| s <= calls[a].end_ns);
            if let Some(&g) = lowest.get(k)
                && physical(g) <= bound_ms
            {
                report.add(Violation::LaterGrantBelowBound { lease: a, grant: g });
                break;
            }
        }
    }
    // A grant is judged when some lease call of an earlier epoch returned before it was sent.
    leases.sort_unstable_by_key(|&i| calls[i].end_ns);
    let ends: Vec<u64> = leases.iter().map(|&i| calls[i].end_ns).collect();
    let mut lowest_epoch = u128::MAX;
    let lowest_epoch_upto: Vec<u128> = leases
        .iter()
        .map(|&i| {
            lowest_epoch = lowest_epoch.min(calls[i].lease().expect("a lease call").2);
            lowest_epoch
        })
        .collect();
    report.stats.grants_bounded = by_epoch
        .iter()
        .flat_map(|(&epoch, grants)| grants.iter().map(move |&g| (epoch, g)))
        .filter(|&(epoch, g)| {
            let k = ends.partition_point(|&e| e < calls[g].start_ns);
            k > 0 && lowest_epoch_upto[k - 1] < epoch
        })
        .count() as u64;
}

/// Rule 6: a `LeaseKeeper` never gives a permit after the server's expiry (SEMANTICS §14;
/// docs/client.md). The server counts the TTL from its durable write, which came before
/// the answer of the call that set the expiry; so once that call's answer plus the TTL has
/// passed, the expiry that call set has certainly passed too. The checker records a keeper's
/// grant when the holder first sees it, at or after the answer, and records a permit only after
/// recording the grant it came from; so a permit's grant is the latest grant of its lease that
/// the same client recorded before asking for it, and a permit asked for later than that
/// grant's recorded answer plus the TTL is past the expiry. A correct keeper never is: it
/// counts from `requested_at`, before the call was sent, and stops a margin before.
fn check_permits(calls: &[LeaseCall], report: &mut Report) {
    // Each client's answered grants per lease, by recorded answer.
    let mut grants: HashMap<(u32, u64), Vec<usize>> = HashMap::new();
    for (i, call) in calls.iter().enumerate() {
        if let Some((lease_id, _, _)) = call.lease() {
            grants.entry((call.client, lease_id)).or_default().push(i);
        }
    }
    for list in grants.values_mut() {
        list.sort_unstable_by_key(|&i| calls[i].end_ns);
    }
    for (i, call) in calls.iter().enumerate() {
        let LeaseOp::Permit { lease_id, .. } = call.op else {
            continue;
        };
        let Some(list) = grants.get(&(call.client, lease_id)) else {
            continue;
        };
        let k = list.partition_point(|&g| calls[g].end_ns <= call.start_ns);
        let Some(&grant) = k.checked_sub(1).map(|k| &list[k]) else {
            continue;
        };
        report.stats.permits_bounded += 1;
        if call.start_ns > calls[grant].end_ns + ttl_ns(calls[grant].op) {
            report.add(Violation::PermitPastExpiry { permit: i, grant });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const TTL_MS: u64 = 10_000;

    fn call(
        client: u32,
        start_ms: u64,
        end_ms: u64,
        op: LeaseOp,
        outcome: LeaseOutcome,
    ) -> LeaseCall {
        LeaseCall {
            client,
            start_ns: start_ms * MS,
            end_ns: end_ms * MS,
            op,
            outcome,
        }
    }

    fn acquire(
        start_ms: u64,
        end_ms: u64,
        holder: u32,
        holder_epoch: u64,
        id: u64,
        bound_ms: u64,
    ) -> LeaseCall {
        call(
            holder,
            start_ms,
            end_ms,
            LeaseOp::Acquire {
                holder,
                holder_epoch,
                ttl_ms: TTL_MS,
            },
            LeaseOutcome::Lease {
                lease_id: id,
                bound_ms,
                epoch: 1,
            },
        )
    }

    fn lease(id: u64, bound_ms: u64) -> LeaseOutcome {
        LeaseOutcome::Lease {
            lease_id: id,
            bound_ms,
            epoch: 1,
        }
    }

    fn renew(start_ms: u64, end_ms: u64, id: u64, outcome: LeaseOutcome) -> LeaseCall {
        call(
            0,
            start_ms,
            end_ms,
            LeaseOp::Renew {
                lease_id: id,
                ttl_ms: TTL_MS,
            },
            outcome,
        )
    }

    fn read(start_ms: u64, end_ms: u64, frontier_ms: u64, epoch: u128) -> LeaseCall {
        call(
            9,
            start_ms,
            end_ms,
            LeaseOp::Frontier,
            LeaseOutcome::Frontier { frontier_ms, epoch },
        )
    }

    fn grant(start_ms: u64, end_ms: u64, physical_ms: u64, epoch: u128) -> LeaseCall {
        call(
            8,
            start_ms,
            end_ms,
            LeaseOp::Ts,
            LeaseOutcome::Granted { physical_ms, epoch },
        )
    }

    fn release(start_ms: u64, end_ms: u64, id: u64, outcome: LeaseOutcome) -> LeaseCall {
        call(
            0,
            start_ms,
            end_ms,
            LeaseOp::Release { lease_id: id },
            outcome,
        )
    }

    fn permit(at_ms: u64, id: u64, bound_ms: u64) -> LeaseCall {
        call(
            0,
            at_ms,
            at_ms,
            LeaseOp::Permit {
                lease_id: id,
                ttl_ms: TTL_MS,
            },
            LeaseOutcome::Permitted { bound_ms },
        )
    }

    fn ambiguous() -> LeaseOutcome {
        LeaseOutcome::Ambiguous("Unavailable".into())
    }

    #[test]
    fn a_frontier_above_a_live_lease_is_caught() {
        // Acquired at 1000..1010 with bound 11_000; a new leader (epoch 2) that forgot it reads
        // 12_000 at 5000, well before 1000 + 10 s.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            read(5_000, 5_001, 12_000, 2),
        ];
        let report = check(&calls, &[]);
        assert_eq!(report.counts.above_lease, 1, "{report:?}");
        assert_eq!(
            report.violations,
            vec![Violation::AboveLease {
                read: 1,
                live: 0,
                lease_id: 7,
                bound_ms: 11_000
            }]
        );
        assert!(report.violations[0].describe(&calls).contains("rule 1"));
        assert_eq!(report.stats.reads_bounded, 1);
        // At or below the bound is fine, and a non-serving read is not judged.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            read(5_000, 5_001, 11_000, 2),
            read(5_000, 5_001, 0, 0),
        ];
        assert!(check(&calls, &[]).is_clean());
    }

    #[test]
    fn a_superseded_lease_still_binds_until_it_expires() {
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            acquire(2_000, 2_010, 0, 2, 8, 12_000),
            read(5_000, 5_001, 11_500, 1),
        ];
        assert_eq!(check(&calls, &[]).counts.above_lease, 1);
    }

    #[test]
    fn a_released_lease_binds_nothing_once_the_release_is_sent() {
        // Sent before the read returned, whatever its outcome (an ambiguous one may apply).
        for outcome in [LeaseOutcome::Released, ambiguous()] {
            let calls = vec![
                acquire(1_000, 1_010, 0, 1, 7, 11_000),
                release(4_999, 6_000, 7, outcome),
                read(5_000, 5_001, 12_000, 1),
            ];
            assert!(check(&calls, &[]).is_clean());
        }
        // A release sent after the read returned does not excuse it.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            read(5_000, 5_001, 12_000, 1),
            release(5_002, 5_003, 7, LeaseOutcome::Released),
        ];
        assert_eq!(check(&calls, &[]).counts.above_lease, 1);
    }

    #[test]
    fn an_expired_lease_binds_nothing() {
        // Sent at 1000 with a 10 s TTL: live on the server's monotonic clock until at least
        // 11 000 less the margin (10 ms); a read returning after that is not judged.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            read(10_990, 10_991, 20_000, 1),
        ];
        assert!(check(&calls, &[]).is_clean());
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            read(10_980, 10_989, 20_000, 1),
        ];
        assert_eq!(check(&calls, &[]).counts.above_lease, 1);
    }

    #[test]
    fn a_read_overlapping_the_acquire_is_not_judged() {
        // The read may have come before the lease existed.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            read(1_005, 1_020, 12_000, 1),
        ];
        assert!(check(&calls, &[]).is_clean());
    }

    #[test]
    fn an_acquire_retry_renews_so_its_expiry_counts_from_the_retry() {
        // The first attempt (ambiguous) created the lease at ~1000; the retry at 5000 renewed
        // it (a repeated acquire renews), so the lease lives until at least 15 000.
        let holder_op = LeaseOp::Acquire {
            holder: 0,
            holder_epoch: 1,
            ttl_ms: TTL_MS,
        };
        let calls = vec![
            call(0, 1_000, 2_000, holder_op, ambiguous()),
            acquire(5_000, 5_010, 0, 1, 7, 15_000),
            read(12_000, 12_001, 20_000, 1),
        ];
        assert_eq!(check(&calls, &[]).counts.above_lease, 1);
        // The ambiguous first attempt leaves the bound unknown until the retry answered.
        let calls = vec![
            call(0, 1_000, 2_000, holder_op, ambiguous()),
            acquire(5_000, 5_010, 0, 1, 7, 15_000),
            read(5_005, 5_020, 20_000, 1),
        ];
        assert!(check(&calls, &[]).is_clean());
    }

    #[test]
    fn renewals_raise_the_bound_and_extend_the_life() {
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            // In flight when the read returned: its bound may already apply.
            renew(4_000, 6_000, 7, lease(7, 14_000)),
            read(5_000, 5_001, 13_000, 1),
            // Past the acquire's expiry, inside the renewal's.
            read(12_000, 12_001, 15_000, 1),
        ];
        let report = check(&calls, &[]);
        assert_eq!(report.counts.above_lease, 1, "{report:?}");
        assert_eq!(
            report.violations[0],
            Violation::AboveLease {
                read: 3,
                live: 1,
                lease_id: 7,
                bound_ms: 14_000
            }
        );
        // An ambiguous renewal may have raised the bound to anything: not judged after it.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            renew(4_000, 6_000, 7, ambiguous()),
            read(5_000, 5_001, 13_000, 1),
            read(3_000, 3_001, 13_000, 1),
        ];
        let report = check(&calls, &[]);
        assert_eq!(report.counts.above_lease, 1, "{report:?}");
        assert!(matches!(
            report.violations[0],
            Violation::AboveLease { read: 3, .. }
        ));
    }

    #[test]
    fn a_lease_is_judged_again_once_a_renewal_after_an_ambiguous_one_answered() {
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            renew(4_000, 6_000, 7, ambiguous()),
            renew(6_100, 6_200, 7, lease(7, 16_000)),
            // Overlaps the later renewal: the ambiguous one may still have been the last.
            read(6_150, 6_250, 17_000, 2),
            // After the later renewal answered: its bound (or a later one's) holds.
            read(7_000, 7_001, 16_500, 1),
        ];
        let report = check(&calls, &[]);
        assert_eq!(
            report.violations,
            vec![Violation::AboveLease {
                read: 4,
                live: 0,
                lease_id: 7,
                bound_ms: 16_000
            }],
            "{report:?}"
        );
        // A renewal sent before the ambiguous one failed does not settle it.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            renew(4_000, 6_000, 7, ambiguous()),
            renew(5_000, 6_200, 7, lease(7, 16_000)),
            read(7_000, 7_001, 16_500, 1),
        ];
        assert!(check(&calls, &[]).is_clean(), "{:?}", check(&calls, &[]));
    }

    #[test]
    fn a_frontier_going_back_on_one_leader_is_caught() {
        let calls = vec![
            read(0, 10, 5_000, 1),
            read(20, 30, 4_999, 1),
            // Overlapping reads are not ordered; another epoch is another leader.
            read(5, 25, 4_000, 1),
            read(40, 50, 1_000, 2),
        ];
        let report = check(&calls, &[]);
        assert_eq!(report.counts.regression, 1, "{report:?}");
        assert_eq!(
            report.violations,
            vec![Violation::Regression {
                earlier: 0,
                later: 1
            }]
        );
        assert!(report.violations[0].describe(&calls).contains("rule 2"));
    }

    #[test]
    fn reads_on_either_side_of_a_restart_are_not_compared() {
        // The leader restarted at 15 ms and resumed its term: it revived a lease that had
        // expired, so its frontier went back under the same epoch.
        let calls = vec![
            read(0, 10, 5_000, 1),
            read(20, 30, 4_000, 1),
            // A read spanning the restart is compared with neither side.
            read(12, 18, 3_000, 1),
            read(40, 50, 3_999, 1),
        ];
        let report = check(&calls, &[15 * MS]);
        assert_eq!(
            report.violations,
            vec![Violation::Regression {
                earlier: 1,
                later: 3
            }],
            "{report:?}"
        );
        // Without the restart, both count.
        assert_eq!(check(&calls, &[]).counts.regression, 3);
    }

    #[test]
    fn a_bound_at_or_below_an_earlier_grant_is_caught() {
        let calls = vec![grant(0, 10, 11_000, 1), acquire(20, 30, 0, 1, 7, 11_000)];
        let report = check(&calls, &[]);
        assert_eq!(report.counts.bound_below_grant, 1, "{report:?}");
        assert!(report.violations[0].describe(&calls).contains("rule 3"));
        // A grant overlapping the acquire may come after the bound was set.
        let calls = vec![grant(25, 35, 20_000, 1), acquire(20, 30, 0, 1, 7, 11_000)];
        assert!(check(&calls, &[]).is_clean());
        // A retry renews, so its bound is above every grant before the retry too.
        let first = LeaseOp::Acquire {
            holder: 0,
            holder_epoch: 1,
            ttl_ms: TTL_MS,
        };
        let calls = vec![
            call(0, 0, 100, first, ambiguous()),
            grant(110, 120, 20_000, 1),
            acquire(200, 210, 0, 1, 7, 11_000),
        ];
        assert_eq!(check(&calls, &[]).counts.bound_below_grant, 1);
    }

    #[test]
    fn a_shared_lease_id_is_caught() {
        let calls = vec![
            acquire(0, 10, 0, 1, 7, 11_000),
            // The same lease back to a retry is fine.
            acquire(20, 30, 0, 1, 7, 11_000),
            acquire(40, 50, 1, 1, 7, 11_050),
            acquire(60, 70, 0, 2, 7, 11_070),
        ];
        let report = check(&calls, &[]);
        assert_eq!(report.counts.shared_id, 2, "{report:?}");
        assert!(report.violations[0].describe(&calls).contains("rule 4"));
        assert_eq!(report.stats.leases, 1);
    }

    #[test]
    fn a_later_leader_granting_at_or_below_an_answered_bound_is_caught() {
        // Lease answered at epoch 1 with bound 11_000; epoch 2 (a new leader that lost the
        // bound) grants 10_500 after the answer.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            grant(2_000, 2_001, 11_001, 2),
            grant(2_010, 2_011, 10_500, 2),
            grant(2_020, 2_021, 12_000, 2),
        ];
        let report = check(&calls, &[]);
        assert_eq!(
            report.violations,
            vec![Violation::LaterGrantBelowBound { lease: 0, grant: 2 }],
            "{report:?}"
        );
        assert!(report.violations[0].describe(&calls).contains("rule 5"));
        assert_eq!(report.stats.grants_bounded, 3);
        // The same leader grants at its clock, below its bounds; a grant sent before the
        // answer may come from a leader elected before the write; a later one above is fine.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            grant(2_000, 2_001, 2_000, 1),
            grant(1_005, 1_020, 1_005, 2),
            grant(2_010, 2_011, 11_001, 2),
        ];
        let report = check(&calls, &[]);
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.stats.grants_bounded, 1);
        // Renewals count like acquires.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            renew(3_000, 3_010, 7, lease(7, 13_000)),
            grant(4_000, 4_001, 12_000, 3),
        ];
        assert_eq!(check(&calls, &[]).counts.later_grant_below_bound, 1);
    }

    #[test]
    fn a_permit_past_the_servers_expiry_is_caught() {
        // The keeper's start answered at 1010 and its renewal was seen at 7000: permits run
        // to 7000 + 10 s at the latest.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            permit(1_020, 7, 11_000),
            permit(10_900, 7, 11_000),
            renew(6_000, 7_000, 7, lease(7, 17_000)),
            permit(16_000, 7, 17_000),
            permit(17_001, 7, 17_000),
        ];
        let report = check(&calls, &[]);
        assert_eq!(
            report.violations,
            vec![Violation::PermitPastExpiry {
                permit: 5,
                grant: 3
            }],
            "{report:?}"
        );
        assert!(report.violations[0].describe(&calls).contains("rule 6"));
        assert_eq!(report.stats.permits, 4);
        assert_eq!(report.stats.permits_bounded, 4);
        // Without the renewal, a permit after 1010 + 10 s is past the acquire's expiry; one at
        // the instant is not.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            permit(11_010, 7, 11_000),
            permit(11_011, 7, 11_000),
        ];
        let report = check(&calls, &[]);
        assert_eq!(report.counts.permit_past_expiry, 1, "{report:?}");
        assert!(matches!(
            report.violations[0],
            Violation::PermitPastExpiry { permit: 2, .. }
        ));
        // Another client's grant of the lease says nothing of this keeper's permits.
        let mut other = renew(6_000, 7_000, 7, lease(7, 17_000));
        other.client = 5;
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            other,
            permit(12_000, 7, 17_000),
        ];
        assert_eq!(check(&calls, &[]).counts.permit_past_expiry, 1);
    }
}
