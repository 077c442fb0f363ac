//! A recorded history of stamping-lease calls and the checks over it (SEMANTICS §14).
//!
//! Every call is recorded as (client, operation, start, end, outcome), with start and end on
//! `CLOCK_MONOTONIC` like the other histories: the real call lies inside that span. An outcome
//! is a reply with its values, a definite refusal (nothing changed), or an ambiguous failure
//! (the request may have taken effect, at any instant after it was sent). Four rules are
//! checked, each in its own function whose comment gives the argument; every rule only uses
//! what real time and the protocol force, so a correct server never fails one:
//! 1. the frontier is never above the bound of a lease that is certainly live;
//! 2. the frontier never goes back on one leader (one epoch);
//! 3. a lease's bound is above every timestamp granted before the lease was asked for;
//! 4. two leases never share an id.
//!
//! Expiry is judged by the checker's clock against the leader's: the two run at the same rate
//! on one machine, so this workload refuses clock faults (a shifted leader legitimately expires
//! a lease early).

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::history::{Answered, VIOLATIONS_KEPT_MAX};

/// Slack taken off a lease's TTL before calling it certainly live: the leader's wall clock may
/// be slewed against `CLOCK_MONOTONIC` (NTP slews at most 500 ppm, 5 ms over 10 s) and its
/// millisecond reads truncate; 100 ms covers both with room.
pub const EXPIRY_MARGIN_NS: u64 = 100_000_000;

/// What a call asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseOp {
    /// `AcquireLease` by checker holder `holder` (a client id) at `holder_epoch`.
    Acquire {
        holder: u32,
        holder_epoch: u64,
        ttl_ms: u64,
    },
    /// `RenewLease` of a lease acquired with `ttl_ms` (a renewal keeps the original TTL).
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
    /// A `GetTs` grant's physical part.
    Granted {
        physical_ms: u64,
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

    fn succeeded(&self) -> bool {
        match self.outcome {
            LeaseOutcome::Frontier { epoch, .. } => epoch != 0,
            LeaseOutcome::Lease { .. } | LeaseOutcome::Released | LeaseOutcome::Granted { .. } => {
                true
            }
            LeaseOutcome::Refused(_) | LeaseOutcome::Ambiguous(_) => false,
        }
    }
}

impl LeaseCall {
    /// The lease and bound of an answered acquire or renew.
    fn lease(&self) -> Option<(u64, u64)> {
        match self.outcome {
            LeaseOutcome::Lease {
                lease_id, bound_ms, ..
            } => Some((lease_id, bound_ms)),
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

    fn granted(&self) -> Option<u64> {
        match self.outcome {
            LeaseOutcome::Granted { physical_ms } => Some(physical_ms),
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
            LeaseOutcome::Granted { physical_ms } => format!("physical {physical_ms}"),
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
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ViolationCounts {
    pub above_lease: u64,
    pub regression: u64,
    pub bound_below_grant: u64,
    pub shared_id: u64,
}

impl ViolationCounts {
    pub fn total(&self) -> u64 {
        self.above_lease + self.regression + self.bound_below_grant + self.shared_id
    }
}

impl fmt::Display for ViolationCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rule-1 frontier above a live lease, {} rule-2 frontier regression, \
             {} rule-3 bound below a grant, {} rule-4 shared lease id",
            self.above_lease, self.regression, self.bound_below_grant, self.shared_id
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
    /// Frontier reads judged against at least one certainly live lease (rule 1).
    pub reads_bounded: u64,
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
        };
        *count += 1;
        if *count <= VIOLATIONS_KEPT_MAX as u64 {
            self.violations.push(violation);
        }
    }
}

/// Runs every rule over `calls`.
pub fn check(calls: &[LeaseCall]) -> Report {
    let mut report = Report::default();
    let first_asked = first_acquire_starts(calls);
    check_live_leases(calls, &first_asked, &mut report);
    check_regression(calls, &mut report);
    check_bounds(calls, &first_asked, &mut report);
    check_ids(calls, &mut report);
    let s = &mut report.stats;
    for call in calls {
        match (call.op, &call.outcome) {
            (LeaseOp::Renew { .. }, LeaseOutcome::Lease { .. }) => s.renewals += 1,
            (LeaseOp::Release { .. }, LeaseOutcome::Released) => s.releases += 1,
            (LeaseOp::Frontier, _) if call.frontier().is_some() => s.frontier_reads += 1,
            (LeaseOp::Ts, LeaseOutcome::Granted { .. }) => s.grants += 1,
            _ => {}
        }
    }
    s.leases = calls
        .iter()
        .filter(|c| matches!(c.op, LeaseOp::Acquire { .. }))
        .filter_map(|c| c.lease().map(|(id, _)| id))
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    report
}

/// The earliest start of an acquire by each (holder, holder epoch) that was not refused: the
/// lease an answered acquire names was created at or after that instant. An acquire at the same
/// holder and epoch while the lease is live returns the existing lease (its bound and expiry),
/// so the answer of a retry says nothing about when the lease began; the first attempt that may
/// have taken effect does.
fn first_acquire_starts(calls: &[LeaseCall]) -> HashMap<(u32, u64), u64> {
    let mut first: HashMap<(u32, u64), u64> = HashMap::new();
    for call in calls {
        if let LeaseOp::Acquire {
            holder,
            holder_epoch,
            ..
        } = call.op
            && !matches!(call.outcome, LeaseOutcome::Refused(_))
        {
            let at = first.entry((holder, holder_epoch)).or_insert(call.start_ns);
            *at = (*at).min(call.start_ns);
        }
    }
    first
}

/// The instant from which an answered acquire or renew's lease was certainly created (rule 3)
/// and its expiry counted (rule 1): a renew's own send (the leader reads its clock after it,
/// and a renewal's expiry is `now + ttl`, never earlier than before), an acquire's first
/// attempt at its holder and epoch.
fn asked_ns(call: &LeaseCall, first_asked: &HashMap<(u32, u64), u64>) -> u64 {
    match call.op {
        LeaseOp::Acquire {
            holder,
            holder_epoch,
            ..
        } => first_asked
            .get(&(holder, holder_epoch))
            .copied()
            .unwrap_or(call.start_ns)
            .min(call.start_ns),
        _ => call.start_ns,
    }
}

fn ttl_ns(op: LeaseOp) -> u64 {
    match op {
        LeaseOp::Acquire { ttl_ms, .. } | LeaseOp::Renew { ttl_ms, .. } => ttl_ms * 1_000_000,
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
    /// The earliest send of an ambiguous renew: its bound is unknown from then on.
    unknown_ns: u64,
}

/// Rule 1: the frontier is never above a live lease's bound (SEMANTICS §14: the frontier is
/// `min(H, bound of every unexpired lease)`, and a new leader loads the set).
///
/// Lease L is certainly live at a frontier read R when some answered acquire or renew A of L
/// returned before R was sent (so L was in the durable set before R), no release of L was sent
/// before R returned, and R returned before `asked + ttl - margin`, where `asked` is when A (or
/// for an acquire, its first attempt) was sent: the leader read its clock after that, and the
/// lease's expiry is that reading plus the TTL, so L had not expired when R read the leader's
/// clock. Superseded leases count too: they bind until they expire.
///
/// The bound L had at R is then at most the highest bound any call on L sent before R returned
/// could have set; renewals never lower it, and the same-lease answer of an acquire retry
/// repeats the current bound. That is known unless an ambiguous renew of L was sent before R
/// returned (it may have raised the bound to an unknown value): then L is not judged for R.
fn check_live_leases(
    calls: &[LeaseCall],
    first_asked: &HashMap<(u32, u64), u64>,
    report: &mut Report,
) {
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
            let live_until = (asked_ns(&calls[a], first_asked) + ttl_ns(calls[a].op))
                .saturating_sub(EXPIRY_MARGIN_NS);
            let from = read_starts.partition_point(|&s| s <= calls[a].end_ns);
            let to = read_starts.partition_point(|&s| s < live_until);
            for &r in reads.get(from..to.max(from)).unwrap_or(&[]) {
                let read = &calls[r];
                if read.end_ns >= live_until
                    || life.released_ns < read.end_ns
                    || life.unknown_ns < read.end_ns
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

/// Every lease id's answered acquires and renews, releases and ambiguous renews.
fn lease_lives(calls: &[LeaseCall]) -> BTreeMap<u64, LeaseLife> {
    let mut lives: BTreeMap<u64, LeaseLife> = BTreeMap::new();
    let new_life = || LeaseLife {
        released_ns: u64::MAX,
        unknown_ns: u64::MAX,
        ..LeaseLife::default()
    };
    for (i, call) in calls.iter().enumerate() {
        match (call.op, &call.outcome) {
            (
                LeaseOp::Acquire { .. } | LeaseOp::Renew { .. },
                LeaseOutcome::Lease { lease_id, .. },
            ) => lives
                .entry(*lease_id)
                .or_insert_with(new_life)
                .answered
                .push(i),
            (LeaseOp::Renew { lease_id, .. }, LeaseOutcome::Ambiguous(_)) => {
                let life = lives.entry(lease_id).or_insert_with(new_life);
                life.unknown_ns = life.unknown_ns.min(call.start_ns);
            }
            (LeaseOp::Release { lease_id }, _) => {
                let life = lives.entry(lease_id).or_insert_with(new_life);
                life.released_ns = life.released_ns.min(call.start_ns);
            }
            _ => {}
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
    }
    lives
}

/// Rule 2: on one leader (one non-zero epoch) the frontier never goes back (SEMANTICS §14: a
/// new lease's bound is above `H`, renewals only raise bounds, expiry and release only remove
/// terms of the minimum). So a read sent after another returned, on the same epoch, sees at
/// least as much. Reads that overlap in time are not ordered and not compared.
fn check_regression(calls: &[LeaseCall], report: &mut Report) {
    let mut by_epoch: BTreeMap<u128, Vec<usize>> = BTreeMap::new();
    for (i, call) in calls.iter().enumerate() {
        if let Some((_, epoch)) = call.frontier() {
            by_epoch.entry(epoch).or_default().push(i);
        }
    }
    let frontier = |i: usize| calls[i].frontier().expect("a serving read").0;
    for reads in by_epoch.values_mut() {
        reads.sort_unstable_by_key(|&i| calls[i].end_ns);
        let ends: Vec<u64> = reads.iter().map(|&i| calls[i].end_ns).collect();
        // The read with the highest frontier among reads[..=k].
        let mut highest_upto: Vec<usize> = Vec::with_capacity(reads.len());
        for &i in reads.iter() {
            let best = match highest_upto.last() {
                Some(&h) if frontier(h) >= frontier(i) => h,
                _ => i,
            };
            highest_upto.push(best);
        }
        for &later in reads.iter() {
            let k = ends.partition_point(|&e| e < calls[later].start_ns);
            if k > 0 && frontier(highest_upto[k - 1]) > frontier(later) {
                report.add(Violation::Regression {
                    earlier: highest_upto[k - 1],
                    later,
                });
            }
        }
    }
}

/// Rule 3: a lease's bound is above every timestamp granted before it (SEMANTICS §14: the
/// bound is `max(H + 1, now + ttl)`, and `H` is above every grant, on this leader or any
/// earlier one). A grant that returned before the lease was asked for (for an acquire, before
/// its first attempt: a retry's answer repeats the bound the lease was created with) was
/// granted before the bound was set, so its physical part is below the bound.
fn check_bounds(calls: &[LeaseCall], first_asked: &HashMap<(u32, u64), u64>, report: &mut Report) {
    let mut grants: Vec<usize> = (0..calls.len())
        .filter(|&i| calls[i].granted().is_some())
        .collect();
    grants.sort_unstable_by_key(|&i| calls[i].end_ns);
    let ends: Vec<u64> = grants.iter().map(|&i| calls[i].end_ns).collect();
    let physical = |i: usize| calls[i].granted().expect("a grant");
    let mut highest_upto: Vec<usize> = Vec::with_capacity(grants.len());
    for &i in &grants {
        let best = match highest_upto.last() {
            Some(&h) if physical(h) >= physical(i) => h,
            _ => i,
        };
        highest_upto.push(best);
    }
    for (i, call) in calls.iter().enumerate() {
        let Some((_, bound_ms)) = call.lease() else {
            continue;
        };
        let k = ends.partition_point(|&e| e < asked_ns(call, first_asked));
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
            Some((lease_id, _)),
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

    fn grant(start_ms: u64, end_ms: u64, physical_ms: u64) -> LeaseCall {
        call(
            8,
            start_ms,
            end_ms,
            LeaseOp::Ts,
            LeaseOutcome::Granted { physical_ms },
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

    #[test]
    fn a_frontier_above_a_live_lease_is_caught() {
        // Acquired at 1000..1010 with bound 11_000; a new leader (epoch 2) that forgot it reads
        // 12_000 at 5000, well before 1000 + 10 s.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            read(5_000, 5_001, 12_000, 2),
        ];
        let report = check(&calls);
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
        assert!(check(&calls).is_clean());
    }

    #[test]
    fn a_superseded_lease_still_binds_until_it_expires() {
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            acquire(2_000, 2_010, 0, 2, 8, 12_000),
            read(5_000, 5_001, 11_500, 1),
        ];
        assert_eq!(check(&calls).counts.above_lease, 1);
    }

    #[test]
    fn a_released_lease_binds_nothing_once_the_release_is_sent() {
        // Sent before the read returned, whatever its outcome (an ambiguous one may apply).
        for outcome in [
            LeaseOutcome::Released,
            LeaseOutcome::Ambiguous("Unavailable".into()),
        ] {
            let calls = vec![
                acquire(1_000, 1_010, 0, 1, 7, 11_000),
                release(4_999, 6_000, 7, outcome),
                read(5_000, 5_001, 12_000, 1),
            ];
            assert!(check(&calls).is_clean());
        }
        // A release sent after the read returned does not excuse it.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            read(5_000, 5_001, 12_000, 1),
            release(5_002, 5_003, 7, LeaseOutcome::Released),
        ];
        assert_eq!(check(&calls).counts.above_lease, 1);
    }

    #[test]
    fn an_expired_lease_binds_nothing() {
        // 1000 + 10 s = 11 000: a read returning after that (less the margin) is not judged.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            read(10_950, 10_960, 20_000, 1),
        ];
        assert!(check(&calls).is_clean());
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            read(10_800, 10_850, 20_000, 1),
        ];
        assert_eq!(check(&calls).counts.above_lease, 1);
    }

    #[test]
    fn a_read_overlapping_the_acquire_is_not_judged() {
        // The read may have come before the lease existed.
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            read(1_005, 1_020, 12_000, 1),
        ];
        assert!(check(&calls).is_clean());
    }

    #[test]
    fn an_acquire_retry_counts_expiry_from_the_first_attempt() {
        // The first attempt (ambiguous) created the lease at ~1000; the retry at 5000 got it
        // back. The lease expires by 11 000, not 15 000.
        let holder_op = LeaseOp::Acquire {
            holder: 0,
            holder_epoch: 1,
            ttl_ms: TTL_MS,
        };
        let calls = vec![
            call(
                0,
                1_000,
                2_000,
                holder_op,
                LeaseOutcome::Ambiguous("DeadlineExceeded".into()),
            ),
            acquire(5_000, 5_010, 0, 1, 7, 11_000),
            read(12_000, 12_001, 20_000, 1),
        ];
        assert!(check(&calls).is_clean());
        // A refused first attempt did nothing: the expiry counts from the retry.
        let calls = vec![
            call(
                0,
                1_000,
                1_001,
                holder_op,
                LeaseOutcome::Refused("FailedPrecondition".into()),
            ),
            acquire(5_000, 5_010, 0, 1, 7, 15_000),
            read(12_000, 12_001, 20_000, 1),
        ];
        assert_eq!(check(&calls).counts.above_lease, 1);
    }

    #[test]
    fn renewals_raise_the_bound_and_extend_the_life() {
        let lease = |bound_ms| LeaseOutcome::Lease {
            lease_id: 7,
            bound_ms,
            epoch: 1,
        };
        let calls = vec![
            acquire(1_000, 1_010, 0, 1, 7, 11_000),
            // In flight when the read returned: its bound may already apply.
            renew(4_000, 6_000, 7, lease(14_000)),
            read(5_000, 5_001, 13_000, 1),
            // Past the acquire's expiry, inside the renewal's.
            read(12_000, 12_001, 15_000, 1),
        ];
        let report = check(&calls);
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
            renew(
                4_000,
                6_000,
                7,
                LeaseOutcome::Ambiguous("Unavailable".into()),
            ),
            read(5_000, 5_001, 13_000, 1),
            read(3_000, 3_001, 13_000, 1),
        ];
        let report = check(&calls);
        assert_eq!(report.counts.above_lease, 1, "{report:?}");
        assert!(matches!(
            report.violations[0],
            Violation::AboveLease { read: 3, .. }
        ));
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
        let report = check(&calls);
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
    fn a_bound_at_or_below_an_earlier_grant_is_caught() {
        let calls = vec![grant(0, 10, 11_000), acquire(20, 30, 0, 1, 7, 11_000)];
        let report = check(&calls);
        assert_eq!(report.counts.bound_below_grant, 1, "{report:?}");
        assert!(report.violations[0].describe(&calls).contains("rule 3"));
        // A grant overlapping the acquire may come after the bound was set.
        let calls = vec![grant(25, 35, 20_000), acquire(20, 30, 0, 1, 7, 11_000)];
        assert!(check(&calls).is_clean());
        // A retry's answer repeats the bound set at the first attempt: only grants before
        // that attempt count.
        let first = LeaseOp::Acquire {
            holder: 0,
            holder_epoch: 1,
            ttl_ms: TTL_MS,
        };
        let calls = vec![
            call(
                0,
                0,
                100,
                first,
                LeaseOutcome::Ambiguous("Unavailable".into()),
            ),
            grant(110, 120, 20_000),
            acquire(200, 210, 0, 1, 7, 11_000),
        ];
        assert!(check(&calls).is_clean());
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
        let report = check(&calls);
        assert_eq!(report.counts.shared_id, 2, "{report:?}");
        assert!(report.violations[0].describe(&calls).contains("rule 4"));
        assert_eq!(report.stats.leases, 1);
    }
}
