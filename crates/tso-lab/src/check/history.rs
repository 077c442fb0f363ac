//! A recorded history of `GetTs` calls and the checks over it (SEMANTICS G1, G2).
//!
//! Every call is recorded as (client, start, end, requested count, grant or error), with start
//! and end read from one monotonic clock ([`monotonic_ns`], `CLOCK_MONOTONIC`, shared by every
//! process on the machine, so histories of several processes merge). The checks are exact over
//! the whole history and cost O(n log n): duplicates, per-client regression, real-time order
//! across all clients, and the shape of each grant (one millisecond, a contiguous logical range,
//! the count asked for). Failed calls carry no values, so they constrain nothing; a reply the
//! client library refused as malformed is a shape violation.

use std::fmt;

use tso_core::{LOGICAL_BITS, LOGICAL_COUNT, PHYSICAL_MAX_MS};

/// Violations of one kind kept in a report; the rest are only counted.
pub const VIOLATIONS_KEPT_MAX: usize = 20;

/// Nanoseconds on `CLOCK_MONOTONIC`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A grant as it came over the wire (`GetTsResponse`), unchecked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireGrant {
    pub physical_ms: u64,
    pub logical_start: u32,
    pub count: u32,
}

impl WireGrant {
    /// The first timestamp, packed (meaningful only for a well-shaped grant).
    pub fn first(&self) -> u64 {
        self.physical_ms << LOGICAL_BITS | u64::from(self.logical_start)
    }

    /// The last timestamp, packed (meaningful only for a well-shaped grant).
    pub fn last(&self) -> u64 {
        self.first() + u64::from(self.count.max(1)) - 1
    }

    /// Why this grant is not a valid answer to a request for `requested`, if it is not.
    pub fn shape_error(&self, requested: u32) -> Option<String> {
        if self.count != requested {
            return Some(format!(
                "asked for {requested}, got a grant of {}",
                self.count
            ));
        }
        if self.physical_ms > PHYSICAL_MAX_MS {
            return Some(format!(
                "physical_ms {} is past the 46-bit field",
                self.physical_ms
            ));
        }
        if u64::from(self.logical_start) + u64::from(self.count) > u64::from(LOGICAL_COUNT) {
            return Some(format!(
                "logicals {}..+{} leave the millisecond {}",
                self.logical_start, self.count, self.physical_ms
            ));
        }
        None
    }
}

/// What a call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Granted(WireGrant),
    /// The gRPC code (or `timeout`, `transport`), as text.
    Failed(String),
    /// A reply that breaks the protocol, refused by the client library (why, as text).
    Malformed(String),
}

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub client: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub requested: u32,
    pub outcome: Outcome,
}

impl Answered for Call {
    fn client(&self) -> u32 {
        self.client
    }

    fn end_ns(&self) -> u64 {
        self.end_ns
    }

    fn succeeded(&self) -> bool {
        matches!(self.outcome, Outcome::Granted(_))
    }
}

/// What liveness reads of a recorded call, whatever the workload.
pub trait Answered {
    fn client(&self) -> u32;
    fn end_ns(&self) -> u64;
    /// Whether the call got what it asked for (a grant, a block).
    fn succeeded(&self) -> bool;
}

impl Call {
    fn grant(&self) -> Option<&WireGrant> {
        match &self.outcome {
            Outcome::Granted(grant) => Some(grant),
            Outcome::Failed(_) | Outcome::Malformed(_) => None,
        }
    }
}

/// A broken guarantee, naming the calls (indices into the history) that show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Two calls received the same timestamp.
    Duplicate { a: usize, b: usize, value: u64 },
    /// A client's later call got a value not above its earlier call's.
    Regression {
        client: u32,
        earlier: usize,
        later: usize,
    },
    /// `earlier` returned before `later` started, yet `later` got a value not above it.
    RealTime { earlier: usize, later: usize },
    /// A grant is not one millisecond, not contiguous, or not the count asked for (or the
    /// client library refused the reply as malformed).
    Shape { call: usize, reason: String },
}

impl Violation {
    /// A one-line description with the values involved.
    pub fn describe(&self, calls: &[Call]) -> String {
        let span = |i: usize| {
            let c = &calls[i];
            let values = c.grant().map_or("-".to_string(), |g| {
                format!(
                    "{}..={} ({}:{})",
                    g.first(),
                    g.last(),
                    g.physical_ms,
                    g.logical_start
                )
            });
            format!(
                "call #{i} (client {}, {}..{} ns) got {values}",
                c.client, c.start_ns, c.end_ns
            )
        };
        match self {
            Violation::Duplicate { a, b, value } => {
                format!("duplicate {value}: {} and {}", span(*a), span(*b))
            }
            Violation::Regression {
                client,
                earlier,
                later,
            } => format!(
                "client {client} regressed: {} then {}",
                span(*earlier),
                span(*later)
            ),
            Violation::RealTime { earlier, later } => format!(
                "real-time order broken: {} returned before {} started",
                span(*earlier),
                span(*later)
            ),
            Violation::Shape { call, reason } => format!("bad grant: {}: {reason}", span(*call)),
        }
    }
}

/// The outcome of checking a history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Up to [`VIOLATIONS_KEPT_MAX`] of each kind.
    pub violations: Vec<Violation>,
    /// Every violation found, kept or not, by kind.
    pub counts: ViolationCounts,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ViolationCounts {
    pub duplicate: u64,
    pub regression: u64,
    pub real_time: u64,
    pub shape: u64,
}

impl ViolationCounts {
    pub fn total(&self) -> u64 {
        self.duplicate + self.regression + self.real_time + self.shape
    }
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.counts.total() == 0
    }

    fn add(&mut self, violation: Violation) {
        let count = match violation {
            Violation::Duplicate { .. } => &mut self.counts.duplicate,
            Violation::Regression { .. } => &mut self.counts.regression,
            Violation::RealTime { .. } => &mut self.counts.real_time,
            Violation::Shape { .. } => &mut self.counts.shape,
        };
        *count += 1;
        if *count <= VIOLATIONS_KEPT_MAX as u64 {
            self.violations.push(violation);
        }
    }
}

impl fmt::Display for ViolationCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} duplicate, {} regression, {} real-time, {} shape",
            self.duplicate, self.regression, self.real_time, self.shape
        )
    }
}

/// Runs every check over `calls`. Calls with a badly shaped grant are reported and left out
/// of the value checks, whose arithmetic assumes a well-formed range.
pub fn check(calls: &[Call]) -> Report {
    let mut report = Report::default();
    let mut granted = Vec::with_capacity(calls.len());
    for (i, call) in calls.iter().enumerate() {
        let shape_error = match &call.outcome {
            Outcome::Granted(grant) => grant.shape_error(call.requested),
            Outcome::Malformed(reason) => Some(format!("malformed reply: {reason}")),
            Outcome::Failed(_) => continue,
        };
        match shape_error {
            Some(reason) => report.add(Violation::Shape { call: i, reason }),
            None => granted.push(i),
        }
    }
    check_duplicates(calls, &granted, &mut report);
    check_regression(calls, &granted, &mut report);
    check_real_time(calls, &granted, &mut report);
    report
}

fn first(calls: &[Call], i: usize) -> u64 {
    calls[i].grant().expect("a granted call").first()
}

fn last(calls: &[Call], i: usize) -> u64 {
    calls[i].grant().expect("a granted call").last()
}

/// Sorts ranges by their first value; any range starting at or below the highest last value
/// seen so far overlaps an earlier one.
fn check_duplicates(calls: &[Call], granted: &[usize], report: &mut Report) {
    let mut order = granted.to_vec();
    order.sort_unstable_by_key(|&i| first(calls, i));
    let mut highest: Option<usize> = None;
    for &i in &order {
        if let Some(h) = highest {
            if first(calls, i) <= last(calls, h) {
                report.add(Violation::Duplicate {
                    a: h,
                    b: i,
                    value: first(calls, i),
                });
            }
            if last(calls, i) > last(calls, h) {
                highest = Some(i);
            }
        } else {
            highest = Some(i);
        }
    }
}

/// Each client's calls, in the order it made them, must rise.
fn check_regression(calls: &[Call], granted: &[usize], report: &mut Report) {
    let mut order = granted.to_vec();
    order.sort_unstable_by_key(|&i| (calls[i].client, calls[i].start_ns, calls[i].end_ns));
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if calls[a].client == calls[b].client && first(calls, b) <= last(calls, a) {
            report.add(Violation::Regression {
                client: calls[a].client,
                earlier: a,
                later: b,
            });
        }
    }
}

/// Walks calls by start time, keeping the largest value among calls that ended strictly
/// before the current start; the current call's smallest value must be above it.
fn check_real_time(calls: &[Call], granted: &[usize], report: &mut Report) {
    let mut by_start = granted.to_vec();
    by_start.sort_unstable_by_key(|&i| calls[i].start_ns);
    let mut by_end = granted.to_vec();
    by_end.sort_unstable_by_key(|&i| calls[i].end_ns);
    let mut ended = by_end.iter().peekable();
    let mut highest: Option<usize> = None;
    for &i in &by_start {
        while let Some(&&e) = ended.peek() {
            if calls[e].end_ns >= calls[i].start_ns {
                break;
            }
            if highest.is_none_or(|h| last(calls, e) > last(calls, h)) {
                highest = Some(e);
            }
            ended.next();
        }
        if let Some(h) = highest
            && first(calls, i) <= last(calls, h)
        {
            report.add(Violation::RealTime {
                earlier: h,
                later: i,
            });
        }
    }
}

/// A fault after which the service did not answer within the bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    /// Index of the heal in the list given to [`check_liveness`].
    pub heal: usize,
    /// How long until the first successful reply, if any came.
    pub recovered_after_ns: Option<u64>,
}

/// What liveness is judged on.
pub struct LivenessScope<F> {
    /// A successful reply must end within this long after each heal.
    pub bound_ns: u64,
    /// When the clients stopped calling: a heal without a reply whose bound runs past it is
    /// not judged (the clients stopped, not the service).
    pub until_ns: u64,
    /// Whether a call counts (the clients that follow the leader; pinned clients may sit on
    /// a follower for the whole run).
    pub counts: F,
}

/// For each heal time, the first successful reply of a counted call must end within the bound
/// after it. Returns the recovery time of every heal (`None`: no reply at all) and the stalls.
pub fn check_liveness<C: Answered>(
    calls: &[C],
    heals_ns: &[u64],
    scope: &LivenessScope<impl Fn(&C) -> bool>,
) -> (Vec<Option<u64>>, Vec<Stall>) {
    let mut ends: Vec<u64> = calls
        .iter()
        .filter(|c| c.succeeded() && (scope.counts)(c))
        .map(|c| c.end_ns())
        .collect();
    ends.sort_unstable();
    let mut recoveries = Vec::with_capacity(heals_ns.len());
    let mut stalls = Vec::new();
    for (heal, &at) in heals_ns.iter().enumerate() {
        let next = ends.partition_point(|&e| e < at);
        let recovered = ends.get(next).map(|&e| e - at);
        let stalled = match recovered {
            Some(after) => after > scope.bound_ns,
            None => at.saturating_add(scope.bound_ns) <= scope.until_ns,
        };
        if stalled {
            stalls.push(Stall {
                heal,
                recovered_after_ns: recovered,
            });
        }
        recoveries.push(recovered);
    }
    (recoveries, stalls)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn ok(client: u32, start_ns: u64, end_ns: u64, physical_ms: u64, logical: u32, n: u32) -> Call {
        Call {
            client,
            start_ns,
            end_ns,
            requested: n,
            outcome: Outcome::Granted(WireGrant {
                physical_ms,
                logical_start: logical,
                count: n,
            }),
        }
    }

    fn failed(client: u32, start_ns: u64, end_ns: u64) -> Call {
        Call {
            client,
            start_ns,
            end_ns,
            requested: 1,
            outcome: Outcome::Failed("Unavailable".into()),
        }
    }

    #[test]
    fn a_clean_history_passes() {
        let calls = vec![
            ok(0, 0, 10, 100, 0, 2),
            ok(1, 5, 15, 100, 2, 1),
            failed(0, 11, 20),
            ok(0, 21, 30, 101, 0, 5),
            ok(1, 16, 40, 100, 3, 1), // concurrent with client 0's third call: any order
        ];
        assert_eq!(check(&calls), Report::default());
    }

    #[test]
    fn catches_a_duplicate_between_concurrent_calls() {
        let calls = vec![ok(0, 0, 10, 100, 0, 3), ok(1, 5, 15, 100, 2, 1)];
        let report = check(&calls);
        assert_eq!(report.counts.duplicate, 1);
        assert_eq!(
            report.violations,
            vec![Violation::Duplicate {
                a: 0,
                b: 1,
                value: 100 << 18 | 2
            }]
        );
    }

    #[test]
    fn catches_a_duplicate_contained_in_a_wide_range() {
        let calls = vec![
            ok(0, 0, 10, 100, 0, 10),
            ok(1, 0, 10, 100, 10, 1),
            ok(2, 0, 10, 100, 5, 1),
        ];
        let report = check(&calls);
        assert_eq!(report.counts.duplicate, 1, "{report:?}");
    }

    #[test]
    fn catches_a_per_client_regression() {
        // Overlapping in time with nothing else, so only the per-client order can catch it...
        let calls = vec![ok(7, 0, 10, 100, 5, 1), ok(7, 10, 20, 100, 4, 1)];
        let report = check(&calls);
        assert_eq!(report.counts.regression, 1);
        assert!(report.violations.contains(&Violation::Regression {
            client: 7,
            earlier: 0,
            later: 1
        }));
        // ...(the second starts at the instant the first ended: not strictly after).
        assert_eq!(report.counts.real_time, 0);
    }

    #[test]
    fn catches_a_real_time_violation_across_clients() {
        let calls = vec![
            ok(0, 0, 10, 100, 0, 1),
            ok(1, 2, 50, 200, 0, 1), // concurrent with both others
            ok(2, 11, 20, 99, 0, 1), // starts after client 0's call returned, yet lower
        ];
        let report = check(&calls);
        assert_eq!(report.counts.real_time, 1, "{report:?}");
        assert_eq!(report.counts.regression, 0);
        assert_eq!(report.counts.duplicate, 0);
        assert!(report.violations.contains(&Violation::RealTime {
            earlier: 0,
            later: 2
        }));
    }

    #[test]
    fn concurrent_calls_may_return_in_any_order() {
        let calls = vec![ok(0, 0, 10, 200, 0, 1), ok(1, 10, 20, 100, 0, 1)];
        assert!(check(&calls).counts.real_time == 0);
    }

    #[test]
    fn catches_bad_grant_shapes() {
        let calls = vec![
            ok(0, 0, 1, 100, LOGICAL_COUNT - 1, 2), // leaves the millisecond
            Call {
                requested: 4,
                ..ok(0, 2, 3, 101, 0, 3)
            }, // short grant
            ok(0, 4, 5, PHYSICAL_MAX_MS + 1, 0, 1),
        ];
        let report = check(&calls);
        assert_eq!(report.counts.shape, 3, "{report:?}");
    }

    #[test]
    fn keeps_a_bounded_number_of_violations() {
        let calls: Vec<Call> = (0..100).map(|i| ok(i, 0, 1, 100, 0, 1)).collect();
        let report = check(&calls);
        assert_eq!(report.counts.duplicate, 99);
        assert_eq!(report.violations.len(), VIOLATIONS_KEPT_MAX);
    }

    #[test]
    fn liveness_measures_the_first_reply_after_each_heal() {
        let calls = vec![
            ok(0, 0, 10, 100, 0, 1),
            failed(0, 11, 500),
            ok(0, 501, 600, 101, 0, 1),
        ];
        let scope = LivenessScope {
            bound_ns: 100,
            until_ns: 800,
            counts: |_: &Call| true,
        };
        let (recoveries, stalls) = check_liveness(&calls, &[20, 550, 700], &scope);
        assert_eq!(recoveries, vec![Some(580), Some(50), None]);
        assert_eq!(
            stalls,
            vec![
                Stall {
                    heal: 0,
                    recovered_after_ns: Some(580)
                },
                Stall {
                    heal: 2,
                    recovered_after_ns: None
                }
            ]
        );
    }

    /// A heal whose bound runs past the end of the recording (the clients stopped at the call
    /// cap) is not judged without a reply; a reply that came too late is a stall all the same.
    #[test]
    fn liveness_does_not_judge_heals_after_the_clients_stopped() {
        let calls = vec![ok(0, 0, 10, 100, 0, 1), ok(0, 300, 400, 101, 0, 1)];
        let scope = LivenessScope {
            bound_ns: 100,
            until_ns: 450,
            counts: |_: &Call| true,
        };
        let (recoveries, stalls) = check_liveness(&calls, &[50, 349, 351, 420], &scope);
        assert_eq!(recoveries, vec![Some(350), Some(51), Some(49), None]);
        assert_eq!(
            stalls,
            vec![Stall {
                heal: 0,
                recovered_after_ns: Some(350)
            }]
        );
        let ended_early = LivenessScope {
            until_ns: 519,
            ..scope
        };
        assert_eq!(check_liveness(&calls, &[420], &ended_early).1, vec![]);
        let ended_late = LivenessScope {
            until_ns: 520,
            ..ended_early
        };
        assert_eq!(check_liveness(&calls, &[420], &ended_late).1.len(), 1);
    }

    /// Pinned clients' replies do not count: a follower's pinned client answering does not
    /// hide a leader nobody else reached.
    #[test]
    fn liveness_counts_only_the_chosen_clients() {
        let calls = vec![ok(0, 0, 10, 100, 0, 1), ok(1, 20, 30, 101, 0, 1)];
        let scope = LivenessScope {
            bound_ns: 100,
            until_ns: 1_000,
            counts: |c: &Call| c.client != 1,
        };
        let (recoveries, stalls) = check_liveness(&calls, &[15], &scope);
        assert_eq!(recoveries, vec![None]);
        assert_eq!(stalls.len(), 1);
    }

    #[test]
    fn a_malformed_reply_is_a_shape_violation() {
        let calls = vec![
            ok(0, 0, 10, 100, 0, 1),
            Call {
                outcome: Outcome::Malformed("granted 2 timestamps for a request of 1".into()),
                ..failed(1, 0, 10)
            },
            failed(2, 0, 10),
        ];
        let report = check(&calls);
        assert_eq!(report.counts.shape, 1, "{report:?}");
        assert_eq!(report.counts.total(), 1);
        assert!(
            report.violations[0]
                .describe(&calls)
                .contains("malformed reply")
        );
    }

    /// A valid history: sequential clients whose calls take effect at a random instant inside
    /// their span, values handed out in that order like an oracle would.
    fn valid_history(seed: u64, clients: u32, calls_per_client: usize) -> Vec<Call> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut calls = Vec::new();
        let mut effects = Vec::new();
        for client in 0..clients {
            let mut t = rng.random_range(0..1_000u64);
            for _ in 0..calls_per_client {
                let start = t + rng.random_range(0..50);
                let end = start + rng.random_range(1..200);
                let effect = rng.random_range(start..=end);
                t = end;
                let requested = if rng.random_bool(0.2) {
                    rng.random_range(1..=LOGICAL_COUNT)
                } else {
                    rng.random_range(1..=8)
                };
                if rng.random_bool(0.1) {
                    calls.push(Call {
                        requested,
                        ..failed(client, start, end)
                    });
                    continue;
                }
                effects.push((effect, calls.len()));
                calls.push(ok(client, start, end, 0, 0, requested));
            }
        }
        effects.sort_unstable();
        let (mut ms, mut logical) = (1_000u64, 0u32);
        for (_, i) in effects {
            let n = calls[i].requested;
            if rng.random_bool(0.1) {
                (ms, logical) = (ms + rng.random_range(1..5), 0);
            }
            if logical + n > LOGICAL_COUNT {
                (ms, logical) = (ms + 1, 0);
            }
            calls[i].outcome = Outcome::Granted(WireGrant {
                physical_ms: ms,
                logical_start: logical,
                count: n,
            });
            logical += n;
        }
        calls
    }

    proptest! {
        #[test]
        fn valid_histories_pass(seed in any::<u64>(), clients in 1u32..8, per in 1usize..60) {
            let calls = valid_history(seed, clients, per);
            let report = check(&calls);
            prop_assert!(report.is_clean(), "seed {seed}: {:?}", report);
        }

        #[test]
        fn swapping_two_ordered_grants_is_caught(seed in any::<u64>(), clients in 1u32..6, per in 2usize..40) {
            let mut calls = valid_history(seed, clients, per);
            let granted: Vec<usize> = (0..calls.len()).filter(|&i| calls[i].grant().is_some()).collect();
            // Find two calls in real-time order with different counts-free swap: swap the
            // outcomes and the counts asked for, so shapes stay valid.
            let pair = granted.iter().flat_map(|&a| granted.iter().map(move |&b| (a, b)))
                .find(|&(a, b)| calls[a].end_ns < calls[b].start_ns);
            if let Some((a, b)) = pair {
                let (oa, ob) = (calls[a].outcome.clone(), calls[b].outcome.clone());
                let (ra, rb) = (calls[a].requested, calls[b].requested);
                calls[a].outcome = ob;
                calls[a].requested = rb;
                calls[b].outcome = oa;
                calls[b].requested = ra;
                let report = check(&calls);
                prop_assert!(report.counts.real_time >= 1, "seed {seed}: {:?}", report.counts);
            }
        }
    }
}
