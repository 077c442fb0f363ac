//! `tso check --faults member` as a user runs it, on real processes: 3 raft nodes whose members
//! change through the real admin service while clients call them (a node replaced by a new one
//! on a wiped disk, after `kill -9` or SIGTERM; the cluster shrunk to two voters, then the
//! leader of the two removed the way an operator would, `remove` refused, `transfer-leader`,
//! `remove`, and grown back) come out clean (exit 0), for timestamps and for stamping leases;
//! the control, whose servers let the leader of two voters be removed at once, is caught
//! (exit 1: the survivor and the removed leader grant side by side); bad usage exits 2. The
//! cluster tests need root and `unshare` (each node runs in its own mount namespace), as CI
//! has.
//!
//! The clean runs' counts follow from their seeds' schedules (which change to make is drawn,
//! not timed). The control's catch needs two leaders at once: each of its six removals gives
//! that about half the time, and one is enough (see `schedule::LEADER_REMOVALS`).

use crate::common;

use common::check::{explain, faults, tso_check};

/// Seed 4's schedule (at `--fault-interval 1s`, 20 s) replaces nodes three times after
/// `kill -9` or SIGTERM (the leader among them), shrinks the cluster five times, removing the
/// leader of two voters twice and the follower three times.
#[test]
fn a_raft_cluster_whose_members_change_under_load_is_clean() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--faults",
            "member",
            "--seed",
            "4",
            "--clients",
            "6",
            "--duration",
            "20s",
            "--fault-interval",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    let counts = &result["faults"];
    assert!(faults(&result, "member", "replace_kill") >= 1, "{counts:#}");
    assert!(
        faults(&result, "member", "replace_sigterm") >= 1,
        "{counts:#}"
    );
    assert!(
        faults(&result, "member", "shrink_leader_transferred") >= 1,
        "{counts:#}"
    );
    assert!(
        faults(&result, "member", "shrink_follower") >= 1,
        "{counts:#}"
    );
    assert_eq!(faults(&result, "member", "error"), 0, "{counts:#}");
    let notes: Vec<String> = result["schedule"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|step| step["notes"].as_array().unwrap().clone())
        .map(|note| note.as_str().unwrap().to_string())
        .collect();
    assert!(
        notes.iter().any(|n| n.contains(" replaced node ")),
        "{notes:#?}"
    );
    assert!(
        notes
            .iter()
            .any(|n| n.contains(" joined in place of node ")),
        "{notes:#?}"
    );
}

/// Stamping leases through replacements, shrinks and handoffs: the frontier's rules hold. Seed
/// 8's schedule (12 s) hands off three times, removes the leader of two voters, replaces the
/// leader after `kill -9`, and removes the follower of two.
#[test]
fn stamping_leases_across_member_changes_and_handoffs_keep_their_rules() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--workload",
            "lease",
            "--faults",
            "member,handoff",
            "--seed",
            "8",
            "--clients",
            "8",
            "--duration",
            "12s",
            "--fault-interval",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    assert!(
        result["history"]["frontier_reads_bounded"]
            .as_u64()
            .unwrap()
            > 0,
        "{result:#}"
    );
    let members: u64 = result["faults"]["member"]
        .as_object()
        .map(|o| o.values().filter_map(|v| v.as_u64()).sum())
        .unwrap_or(0);
    assert!(members >= 2, "{:#}", result["faults"]);
    assert!(
        faults(&result, "handoff", "handed_off") >= 1,
        "{:#}",
        result["faults"]
    );
}

/// Servers that let the leader of two voters be removed: the survivor elects itself at once
/// while the removed leader, which learns of the change a little late, still grants. The
/// clients pinned to both put their grants in one history.
#[test]
fn the_leader_removal_control_is_reported_as_a_violation() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--unsafe-allow-leader-removal",
            "--faults",
            "kill",
            "--seed",
            "1",
            "--clients",
            "6",
            "--duration",
            "10s",
            "--fault-interval",
            "500ms",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert_eq!(result["leader_removal_control"], true, "{result:#}");
    assert!(
        faults(&result, "member", "shrink_leader_removed") >= 1,
        "{:#}",
        result["faults"]
    );
    assert!(
        result["violations"]["real_time"].as_u64().unwrap() > 0,
        "{result:#}"
    );
}

#[test]
fn usage_errors_exit_with_2() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--faults", "member"][..],
        &["--unsafe-allow-leader-removal"],
        &[
            "--nodes",
            "3",
            "--unsafe-allow-leader-removal",
            "--workload",
            "seq",
        ],
        &[
            "--nodes",
            "3",
            "--unsafe-allow-leader-removal",
            "--clients",
            "3",
        ],
        &[
            "--nodes",
            "3",
            "--unsafe-allow-leader-removal",
            "--unsafe-no-leader-lease",
        ],
    ] {
        let (output, _) = tso_check(dir.path(), args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            explain(&output)
        );
    }
}
