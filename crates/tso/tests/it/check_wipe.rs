//! `tso check --faults wipe` as a user runs it, on real processes: 3 raft nodes whose
//! followers lose their data while clients call them. A follower that lost its raft log alone
//! must refuse to start ("is incomplete"), and one wholly wiped and restarted under its old id
//! must be kept out; both are then replaced under new ids through the real admin service. The
//! run comes out clean (exit 0). The control, whose servers let a wiped member vote again
//! (`--unsafe-trust-wiped`), is caught (exit 1): a follower cut off while the leader extended
//! its window is elected with the wiped node's empty vote and grants below timestamps already
//! given out. The cluster tests need root and `unshare`, as CI has.

use crate::common;

use common::check::{explain, faults, tso_check};

/// Seed 1's schedule (at `--fault-interval 1s`, 15 s) draws eight wipes of followers: six of
/// the raft log alone, two of the whole directory.
#[test]
fn followers_that_lose_their_data_are_refused_or_kept_out_and_replaced() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--faults",
            "wipe",
            "--seed",
            "1",
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
    let counts = &result["faults"];
    assert!(
        faults(&result, "wipe", "refused_partial") >= 1,
        "{counts:#}"
    );
    assert!(faults(&result, "wipe", "wiped_kept_out") >= 1, "{counts:#}");
    assert_eq!(faults(&result, "wipe", "started_partial"), 0, "{counts:#}");
    assert_eq!(faults(&result, "wipe", "error"), 0, "{counts:#}");
    assert_eq!(result["partial_started"], 0, "{result:#}");
}

/// Servers that count a wiped member's vote: the opening elects the cut-off follower on a log
/// without the leader's last window extensions, and it grants below what clients already hold.
#[test]
fn the_trust_wiped_control_is_reported_as_a_violation() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--unsafe-trust-wiped",
            "--faults",
            "kill",
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
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert_eq!(result["trust_wiped_control"], true, "{result:#}");
    let violations = &result["violations"];
    let found = ["duplicate", "regression", "real_time"]
        .iter()
        .map(|kind| violations[kind].as_u64().unwrap_or(0))
        .sum::<u64>();
    assert!(found > 0, "{result:#}");
}

#[test]
fn usage_errors_exit_with_2() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--faults", "wipe"][..],
        &["--unsafe-trust-wiped"],
        &["--nodes", "5", "--unsafe-trust-wiped"],
        &["--nodes", "3", "--unsafe-trust-wiped", "--workload", "seq"],
        &[
            "--nodes",
            "3",
            "--unsafe-trust-wiped",
            "--unsafe-allow-leader-removal",
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
