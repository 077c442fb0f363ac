//! `tso check --faults handoff` as a user runs it, on real processes: 3 raft nodes whose leader
//! is sent SIGTERM again and again (it hands its leadership to an up-to-date voter, exits, and
//! is restarted on the same data and addresses) while clients pinned to every node and
//! clients following the leader call it, come out clean (exit 0), for timestamps and for dense
//! sequences (a call in flight on the leaving leader may fail with any status; a sequence call
//! that may have been granted is uncertain, and every gap must be explained by such calls);
//! handoffs need a raft cluster (exit 2 on one node). The positive control, servers whose
//! leader hands off without giving up its lease, is reported as a violation (exit 1). The
//! cluster tests need root and `unshare` (each node runs in its own mount namespace), as CI has.
//!
//! What is asserted does not depend on timing: the runs are clean whatever the handoffs'
//! outcome, and the counts asserted (handoffs applied, none killed for hanging) hold for any
//! server whose shutdown is bounded; a handoff that fails (the cluster elects instead) is
//! counted, not asserted against.

use crate::common;

use common::check::{explain, faults, tso_check};

/// Seed 8's schedule (at `--fault-interval 1s`) hands the leadership off 6 times among 10
/// faults in 15 s, with kills of the leader and of followers between them.
#[test]
fn a_raft_cluster_whose_leader_hands_off_again_and_again_is_clean() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--faults",
            "handoff,kill",
            "--seed",
            "8",
            "--clients",
            "6",
            "--duration",
            "15s",
            "--fault-interval",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    let handoffs: u64 = ["handed_off", "handoff_failed", "no_handoff"]
        .iter()
        .map(|outcome| faults(&result, "handoff", outcome))
        .sum();
    assert!(handoffs >= 3, "{:#}", result["faults"]);
    assert!(
        faults(&result, "handoff", "handed_off") >= 1,
        "{:#}",
        result["faults"]
    );
    assert_eq!(
        faults(&result, "handoff", "killed"),
        0,
        "{:#}",
        result["faults"]
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("seed 8"), "{stdout}");
    assert!(stdout.contains("handoff ("), "{stdout}");
}

/// Dense sequences across handoffs: calls caught on the leaving leader end refused or
/// uncertain, and the gaps they may leave are all explained (D2).
#[test]
fn sequences_across_handoffs_have_no_overlap_and_no_unexplained_gap() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--workload",
            "seq",
            "--faults",
            "handoff",
            "--seed",
            "2",
            "--clients",
            "6",
            "--duration",
            "10s",
            "--fault-interval",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    assert!(
        result["history"]["blocks"].as_u64().unwrap() > 0,
        "{result:#}"
    );
    assert!(
        faults(&result, "handoff", "handed_off") >= 1,
        "{:#}",
        result["faults"]
    );
}

/// Servers whose leader keeps its lease through a handoff: it goes on granting for the rest of
/// it (100–250 ms) while its successor, voted in by it, already serves above it. The clients
/// pinned to both put their grants in one history: real-time order breaks in nearly every
/// handoff.
#[test]
fn the_handoff_keep_lease_control_is_reported_as_a_violation() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--unsafe-handoff-keep-leader-lease",
            "--faults",
            "handoff",
            "--seed",
            "7",
            "--clients",
            "6",
            "--duration",
            "10s",
            "--fault-interval",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert_eq!(result["verdict"], "violation", "{result:#}");
    assert!(
        faults(&result, "handoff", "handed_off") >= 1,
        "{:#}",
        result["faults"]
    );
    assert!(
        result["violations"]["real_time"].as_u64().unwrap() > 0,
        "{result:#}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("real-time order broken"), "{stdout}");
}

/// The control shows only with handoffs, in a timestamp history with a client pinned to each
/// node of a raft cluster the checker starts.
#[test]
fn the_handoff_keep_lease_control_refuses_what_cannot_show_it() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    for (args, says) in [
        (
            &["--unsafe-handoff-keep-leader-lease", "--faults", "handoff"][..],
            "--nodes 3 or 5",
        ),
        (
            &[
                "--nodes",
                "3",
                "--unsafe-handoff-keep-leader-lease",
                "--faults",
                "kill",
            ],
            "add handoff to --faults",
        ),
        (
            &[
                "--nodes",
                "3",
                "--unsafe-handoff-keep-leader-lease",
                "--faults",
                "handoff",
                "--workload",
                "seq",
            ],
            "--workload ts",
        ),
        (
            &[
                "--nodes",
                "3",
                "--unsafe-handoff-keep-leader-lease",
                "--faults",
                "handoff",
                "--clients",
                "3",
            ],
            "--clients 4 or more",
        ),
    ] {
        let (output, _) = tso_check(dir.path(), args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            explain(&output)
        );
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(says),
            "{args:?}: {}",
            explain(&output)
        );
    }
}

#[test]
fn handoffs_need_a_raft_cluster() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, _) = tso_check(dir.path(), &["--faults", "handoff", "--duration", "1s"]);
    assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--nodes 3 or 5"),
        "{}",
        explain(&output)
    );
}
