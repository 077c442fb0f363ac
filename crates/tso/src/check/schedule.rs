//! The nemesis schedule: a list of faults at offsets from the start of a run, drawn from a seed
//! alone, so `--seed` replays the same faults at the same times.
//!
//! Faults run one after another: each heals (restart, SIGCONT) before the next quiet gap starts.
//! A clock offset stays until the next clock fault, so later kills and pauses happen under a
//! shifted clock: that is how combinations arise. The positive controls open with fixed steps
//! that their broken servers fail (clocks back then a kill; long cuts of the leader; kills of
//! the leader for the sequence and lease controls), then draw as usual.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Faults in one schedule at most: a bound on the run's bookkeeping, far above what a run of
/// minutes draws with a gap of a second or more.
pub const FAULTS_MAX: usize = 10_000;
/// The largest clock shift drawn, either way.
pub const CLOCK_SHIFT_MAX_MS: i64 = 20_000;
/// A partition lasts from about one election timeout to several.
pub const PARTITION_MIN_MS: u64 = 200;
pub const PARTITION_MAX_MS: u64 = 5_000;
/// The positive control sets clocks back this far before its kills: far more than a restart
/// takes, so a server that forgets its high-water reissues values it already gave out.
pub const POSITIVE_CONTROL_SHIFT_MS: i64 = -60_000;
/// The no-lease control cuts the leader off for this long: past the election (followers
/// campaign 550 to 700 ms after the last heartbeat, then the new leader fences) and past the
/// old leader's window (1.5 to 3 s ahead of its clock at the cut with `--window-ahead 3s`), so
/// the two leaders grant side by side until the old one's window runs dry.
pub const NO_LEASE_CUT_MS: u64 = 4_000;
/// Cuts of the leader the no-lease control opens with: each one alone gives the checker a
/// second or more of two leaders granting; three make a miss on a slow machine unlikely.
pub const NO_LEASE_CUTS: usize = 3;

/// Kills of the leader the sequence control opens with: each starts a new term (a new leader,
/// or the restarted node on one node) whose counters restart from 0, below blocks clients
/// already hold; two make the catch independent of one kill landing before any block.
pub const SEQ_FORGET_KILLS: usize = 2;
/// Kills of the leader the lease control opens with: each new leader forgets every lease, and
/// its frontier passes the bound of a lease a holder still holds when that lease's last renewal
/// is older than about its TTL less the window (2 s for a 5 s TTL). Holders wait up to 3 s
/// between renewals, so each kill finds such a lease with a fair chance; four make a miss
/// unlikely.
pub const LEASE_FORGET_KILLS: usize = 4;

/// The kinds of fault a run may draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum FaultKind {
    /// `kill -9`, then a restart on the same data and address.
    Kill,
    /// `SIGSTOP`, then `SIGCONT`.
    Pause,
    /// Shift the server's clock forward or backward (test-only offset file).
    Clock,
    /// Cut every peer link to and from one node (clusters only).
    Partition,
}

/// Which node a fault hits: a fixed one, or whoever leads when the fault starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Leader,
    Node(usize),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Leader => write!(f, "the leader"),
            Target::Node(i) => write!(f, "node {i}"),
        }
    }
}

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Kill { node: Target, down_ms: u64 },
    Pause { node: Target, for_ms: u64 },
    Clock { node: Target, offset_ms: i64 },
    Partition { node: Target, for_ms: u64 },
}

impl Fault {
    /// How long the fault lasts before it heals.
    pub fn length_ms(&self) -> u64 {
        match *self {
            Fault::Kill { down_ms, .. } => down_ms,
            Fault::Pause { for_ms, .. } => for_ms,
            Fault::Clock { .. } => 0,
            Fault::Partition { for_ms, .. } => for_ms,
        }
    }

    /// The node the fault hits.
    pub fn target(&self) -> Target {
        match *self {
            Fault::Kill { node, .. }
            | Fault::Pause { node, .. }
            | Fault::Clock { node, .. }
            | Fault::Partition { node, .. } => node,
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            Fault::Kill { node, down_ms } => format!("kill -9 {node}, restart after {down_ms} ms"),
            Fault::Pause { node, for_ms } => format!("SIGSTOP {node} for {for_ms} ms"),
            Fault::Clock { node, offset_ms } => {
                format!("set the clock offset of {node} to {offset_ms:+} ms")
            }
            Fault::Partition { node, for_ms } => {
                format!("cut every peer link of {node} for {for_ms} ms")
            }
        }
    }
}

/// A fault at `at_ms` after the start of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub at_ms: u64,
    pub fault: Fault,
}

/// What a schedule is drawn from.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub nodes: usize,
    pub kinds: Vec<FaultKind>,
    pub duration: Duration,
    /// Mean quiet gap between faults.
    pub interval: Duration,
    /// Upper bound of a pause: kept below the liveness bound so a pause alone is no stall.
    pub pause_max: Duration,
    /// Open with clock-back-then-kill steps that a server forgetting its high-water fails.
    pub positive_control: bool,
    /// Open with long cuts of the leader that a server granting without its lease fails.
    pub no_lease_control: bool,
    /// Open with kills of the leader that a server forgetting its sequences fails.
    pub seq_forget_control: bool,
    /// Open with kills of the leader that a server forgetting its leases fails.
    pub lease_forget_control: bool,
}

/// Draws the schedule of `plan`: same plan, same schedule.
pub fn draw(plan: &Plan) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let end_ms = plan.duration.as_millis() as u64;
    let interval_ms = (plan.interval.as_millis() as u64).max(1);
    let (mut steps, mut t) = control_steps(plan, interval_ms);
    if plan.kinds.is_empty() {
        return steps;
    }
    while steps.len() < FAULTS_MAX {
        t += rng.random_range(interval_ms / 2..=interval_ms * 3 / 2);
        let fault = draw_fault(plan, &mut rng);
        if t + fault.length_ms() >= end_ms {
            break;
        }
        steps.push(Step { at_ms: t, fault });
        t += fault.length_ms();
    }
    steps
}

/// The fixed opening steps of the positive controls, and the offset after them.
fn control_steps(plan: &Plan, interval_ms: u64) -> (Vec<Step>, u64) {
    let mut steps = Vec::new();
    let mut t = interval_ms / 2;
    if plan.positive_control {
        for node in 0..plan.nodes {
            steps.push(Step {
                at_ms: t,
                fault: Fault::Clock {
                    node: Target::Node(node),
                    offset_ms: POSITIVE_CONTROL_SHIFT_MS,
                },
            });
        }
        t += interval_ms;
        steps.push(Step {
            at_ms: t,
            fault: Fault::Kill {
                node: Target::Leader,
                down_ms: 100,
            },
        });
        t += 100 + interval_ms;
    }
    if plan.no_lease_control {
        for _ in 0..NO_LEASE_CUTS {
            steps.push(Step {
                at_ms: t,
                fault: Fault::Partition {
                    node: Target::Leader,
                    for_ms: NO_LEASE_CUT_MS,
                },
            });
            t += NO_LEASE_CUT_MS + interval_ms;
        }
    }
    let kills = match (plan.seq_forget_control, plan.lease_forget_control) {
        (true, _) => SEQ_FORGET_KILLS,
        (_, true) => LEASE_FORGET_KILLS,
        _ => 0,
    };
    for _ in 0..kills {
        steps.push(Step {
            at_ms: t,
            fault: Fault::Kill {
                node: Target::Leader,
                down_ms: 100,
            },
        });
        t += 100 + interval_ms;
    }
    (steps, t)
}

/// One fault of the kinds `plan` allows, aimed at the leader or at a node.
fn draw_fault(plan: &Plan, rng: &mut StdRng) -> Fault {
    // A single node is its own leader; only a cluster draws between the leader and a node.
    let node = if plan.nodes > 1 && rng.random_bool(0.5) {
        Target::Leader
    } else {
        Target::Node(rng.random_range(0..plan.nodes))
    };
    match plan.kinds[rng.random_range(0..plan.kinds.len())] {
        FaultKind::Kill => Fault::Kill {
            node,
            down_ms: rng.random_range(0..=1_000),
        },
        FaultKind::Pause => Fault::Pause {
            node,
            for_ms: rng.random_range(50..=(plan.pause_max.as_millis() as u64).max(50)),
        },
        FaultKind::Clock => Fault::Clock {
            node,
            offset_ms: rng.random_range(-CLOCK_SHIFT_MAX_MS..=CLOCK_SHIFT_MAX_MS),
        },
        FaultKind::Partition => Fault::Partition {
            node,
            for_ms: rng.random_range(PARTITION_MIN_MS..=PARTITION_MAX_MS),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(seed: u64) -> Plan {
        Plan {
            seed,
            nodes: 3,
            kinds: vec![
                FaultKind::Kill,
                FaultKind::Pause,
                FaultKind::Clock,
                FaultKind::Partition,
            ],
            duration: Duration::from_secs(60),
            interval: Duration::from_secs(1),
            pause_max: Duration::from_secs(2),
            positive_control: false,
            no_lease_control: false,
            seq_forget_control: false,
            lease_forget_control: false,
        }
    }

    #[test]
    fn a_seed_replays_its_schedule() {
        assert_eq!(draw(&plan(7)), draw(&plan(7)));
        assert_ne!(draw(&plan(7)), draw(&plan(8)));
    }

    #[test]
    fn faults_do_not_overlap_and_end_in_time() {
        for seed in 0..50 {
            let steps = draw(&plan(seed));
            assert!(!steps.is_empty());
            for pair in steps.windows(2) {
                assert!(pair[0].at_ms + pair[0].fault.length_ms() < pair[1].at_ms);
            }
            let last = steps.last().unwrap();
            assert!(last.at_ms + last.fault.length_ms() < 60_000);
            for step in &steps {
                match step.fault {
                    Fault::Pause { for_ms, .. } => assert!((50..=2_000).contains(&for_ms)),
                    Fault::Kill { down_ms, .. } => assert!(down_ms <= 1_000),
                    Fault::Clock { offset_ms, .. } => {
                        assert!(offset_ms.abs() <= CLOCK_SHIFT_MAX_MS)
                    }
                    Fault::Partition { for_ms, .. } => {
                        assert!((PARTITION_MIN_MS..=PARTITION_MAX_MS).contains(&for_ms))
                    }
                }
            }
        }
    }

    #[test]
    fn the_positive_control_sets_clocks_back_then_kills() {
        let steps = draw(&Plan {
            positive_control: true,
            kinds: vec![],
            ..plan(1)
        });
        assert_eq!(steps.len(), 4);
        assert!(matches!(steps[0].fault, Fault::Clock { offset_ms, .. } if offset_ms < 0));
        assert!(matches!(steps[3].fault, Fault::Kill { .. }));
    }

    #[test]
    fn the_no_lease_control_cuts_the_leader_off_then_draws() {
        let steps = draw(&Plan {
            no_lease_control: true,
            kinds: vec![FaultKind::Partition],
            ..plan(1)
        });
        let cut = Fault::Partition {
            node: Target::Leader,
            for_ms: NO_LEASE_CUT_MS,
        };
        assert!(steps.len() > NO_LEASE_CUTS);
        assert!(steps[..NO_LEASE_CUTS].iter().all(|s| s.fault == cut));
        for pair in steps.windows(2) {
            assert!(pair[0].at_ms + pair[0].fault.length_ms() < pair[1].at_ms);
        }
    }

    #[test]
    fn the_seq_forget_control_kills_the_leader_then_draws() {
        let steps = draw(&Plan {
            seq_forget_control: true,
            kinds: vec![FaultKind::Kill],
            ..plan(1)
        });
        let kill = Fault::Kill {
            node: Target::Leader,
            down_ms: 100,
        };
        assert!(steps.len() > SEQ_FORGET_KILLS);
        assert!(steps[..SEQ_FORGET_KILLS].iter().all(|s| s.fault == kill));
        for pair in steps.windows(2) {
            assert!(pair[0].at_ms + pair[0].fault.length_ms() < pair[1].at_ms);
        }
    }

    #[test]
    fn the_lease_forget_control_kills_the_leader_then_draws() {
        let steps = draw(&Plan {
            lease_forget_control: true,
            kinds: vec![FaultKind::Kill],
            ..plan(1)
        });
        let kill = Fault::Kill {
            node: Target::Leader,
            down_ms: 100,
        };
        assert!(steps.len() > LEASE_FORGET_KILLS);
        assert!(steps[..LEASE_FORGET_KILLS].iter().all(|s| s.fault == kill));
    }

    #[test]
    fn no_kinds_no_faults() {
        let steps = draw(&Plan {
            kinds: vec![],
            ..plan(1)
        });
        assert!(steps.is_empty());
    }
}
