//! `tso check --workload lease` as a user runs it, on real processes: 3 raft nodes whose leader
//! is killed and cut off, and whose clocks step, while holders acquire, renew, release and
//! supersede stamping leases (raw, or through `LeaseKeeper` with `--mode library`), readers
//! poll the safe frontier and stampers take timestamps, come out clean (exit 0: no frontier
//! above a live lease, no regression on one leader, every bound above earlier grants, no shared
//! lease id, no later leader granting below a bound, no permit past the server's expiry). The
//! controls are caught (exit 1): servers whose every new leader starts with an empty lease set
//! (rule 1), that judge expiry by the wall clock (rule 1 or 2 under clock steps), and that keep
//! a lease's bound in memory only (rule 5 after a kill); bad usage exits 2. The cluster tests
//! need root and `unshare` (each node runs in its own mount namespace), as CI has.
//!
//! Nothing here depends on timing: the liveness bound is far above any restart, and each
//! control's catch follows from its schedule (see each test), while readers poll the frontier
//! and stampers take timestamps every few milliseconds.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::check::{explain, faults};

/// `tso check --workload lease EXTRA...` (see [`common::check::tso_check`]).
fn tso_check(dir: &Path, extra: &[&str]) -> (std::process::Output, serde_json::Value) {
    let args: Vec<&str> = ["--workload", "lease"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    common::check::tso_check(dir, &args)
}

/// The faults of a result file that hit the leader and were applied.
fn leader_faults(result: &serde_json::Value) -> Vec<String> {
    result["schedule"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|step| step["applied"] == true)
        .map(|step| step["fault"].as_str().unwrap().to_string())
        .filter(|f| f.contains(" the leader"))
        .collect()
}

/// The clean counts of every rule.
fn no_violations() -> serde_json::Value {
    serde_json::json!({
        "frontier_above_lease": 0,
        "frontier_regression": 0,
        "bound_below_grant": 0,
        "shared_lease_id": 0,
        "later_grant_below_bound": 0,
        "permit_past_expiry": 0,
        "examples": [],
    })
}

/// Seed 11's schedule over 17 s at `--fault-interval 1s`: clock steps of every node both
/// ways (the last two step the leader's clock 16.5 s forward, then to 11.7 s behind), two kills
/// and two cuts (one of the leader).
const CLEAN_FAULTS: [&str; 10] = [
    "--nodes",
    "3",
    "--faults",
    "kill,partition,clock",
    "--duration",
    "17s",
    "--seed",
    "11",
    "--fault-interval",
    "1s",
];

/// A clean run's common checks: exit 0, every rule had material, a clock step and a fault on
/// the leader were applied.
fn assert_clean(output: &std::process::Output, result: &serde_json::Value) {
    assert_eq!(output.status.code(), Some(0), "{}", explain(output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    assert_eq!(result["workload"], "lease", "{result:#}");
    let stats = &result["history"];
    for key in [
        "leases",
        "frontier_reads",
        "frontier_reads_bounded",
        "grants",
        "grants_bounded",
    ] {
        assert!(stats[key].as_u64().unwrap() > 0, "{key}: {result:#}");
    }
    assert!(faults(result, "clock", "applied") > 0, "{result:#}");
    assert!(!leader_faults(result).is_empty(), "{result:#}");
    assert_eq!(result["violations"], no_violations(), "{result:#}");
}

#[test]
fn a_raft_cluster_under_kills_partitions_and_clock_steps_keeps_the_frontier_below_live_leases() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history.jsonl");
    let mut args = CLEAN_FAULTS.to_vec();
    args.extend(["--clients", "8", "--history", history.to_str().unwrap()]);
    let (output, result) = tso_check(dir.path(), &args);
    assert_clean(&output, &result);
    // Every call is in the history, one JSON line each, with its operation; grants carry
    // their epoch.
    let text = std::fs::read_to_string(&history).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len() as u64,
        result["history"]["calls"].as_u64().unwrap()
    );
    assert!(
        lines
            .iter()
            .any(|l| l["op"] == "acquire" && l["bound_ms"].is_u64())
    );
    assert!(
        lines
            .iter()
            .any(|l| l["op"] == "ts" && l["physical_ms"].is_u64() && l["epoch"].is_string())
    );
}

/// The same schedule with holders on `LeaseKeeper`: every permit it gives is judged against
/// the answer that set its lease's expiry.
#[test]
fn lease_keepers_give_no_permit_past_the_servers_expiry() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let mut args = CLEAN_FAULTS.to_vec();
    args.extend(["--clients", "8", "--mode", "library"]);
    let (output, result) = tso_check(dir.path(), &args);
    assert_clean(&output, &result);
    assert_eq!(result["mode"], "library", "{result:#}");
    let stats = &result["history"];
    assert!(stats["permits"].as_u64().unwrap() > 0, "{result:#}");
    assert_eq!(stats["permits_bounded"], stats["permits"], "{result:#}");
}

/// Servers whose every new leader starts with an empty lease set, and a schedule that opens
/// with kills of the leader: a frontier read after a kill passes the bound of a lease its
/// holder still holds.
#[test]
fn the_lease_forget_control_is_reported_as_a_frontier_above_a_live_lease() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--unsafe-lease-forget",
            "--faults",
            "kill",
            "--duration",
            "20s",
            "--seed",
            "7",
            "--clients",
            "8",
            "--fault-interval",
            "3s",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert_eq!(result["verdict"], "violation", "{result:#}");
    assert_eq!(result["lease_forget_control"], true, "{result:#}");
    assert!(
        result["violations"]["frontier_above_lease"]
            .as_u64()
            .unwrap()
            > 0,
        "{result:#}"
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("rule 1 frontier above a live lease"),
        "{}",
        explain(&output)
    );
    assert!(!leader_faults(&result).is_empty(), "{result:#}");
}

/// Servers that judge lease expiry by the wall clock, under clock steps alone: seed 7's
/// schedule (at `--fault-interval 2s`) steps the leader's clock 6 s forward at about 2 s, so it
/// drops leases its holders renewed a moment before (rule 1), and later back (8.7 s), so it
/// counts dropped ones again (rule 2).
#[test]
fn the_wall_expiry_control_is_reported_as_a_frontier_above_a_live_lease_or_going_back() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--unsafe-lease-wall-expiry",
            "--faults",
            "clock",
            "--duration",
            "12s",
            "--seed",
            "7",
            "--clients",
            "8",
            "--fault-interval",
            "2s",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert_eq!(result["verdict"], "violation", "{result:#}");
    assert_eq!(result["lease_wall_expiry_control"], true, "{result:#}");
    let violations = &result["violations"];
    let caught = violations["frontier_above_lease"].as_u64().unwrap()
        + violations["frontier_regression"].as_u64().unwrap();
    assert!(caught > 0, "{result:#}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("rule 1 frontier above a live lease")
            || stdout.contains("rule 2 frontier went back"),
        "{}",
        explain(&output)
    );
    assert!(faults(&result, "clock", "applied") > 0, "{result:#}");
}

/// Servers that raise the high-water for a lease's bound in memory only: seed 7's schedule
/// (at `--fault-interval 2s`) kills the leader four times in 15 s, some down past an election;
/// the new leader fences from the older durable high-water and grants below bounds its
/// predecessor answered while stampers take timestamps every 10 ms (rule 5).
#[test]
fn the_bound_in_memory_control_is_reported_as_a_later_grant_below_a_bound() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--unsafe-lease-bound-in-memory",
            "--faults",
            "kill",
            "--duration",
            "15s",
            "--seed",
            "7",
            "--clients",
            "8",
            "--fault-interval",
            "2s",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert_eq!(result["verdict"], "violation", "{result:#}");
    assert_eq!(result["lease_bound_in_memory_control"], true, "{result:#}");
    assert!(
        result["violations"]["later_grant_below_bound"]
            .as_u64()
            .unwrap()
            > 0,
        "{result:#}"
    );
    assert!(
        String::from_utf8_lossy(&output.stdout)
            .contains("rule 5 a later leader granted at or below an answered bound"),
        "{}",
        explain(&output)
    );
    assert!(!leader_faults(&result).is_empty(), "{result:#}");
}

#[test]
fn usage_errors_exit_with_2() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let check = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tso"))
            .arg("check")
            .args(["--work-dir", dir.path().to_str().unwrap()])
            .args(args)
            .output()
            .expect("running tso check")
    };
    for (args, says) in [
        (
            &["--unsafe-lease-forget", "--faults", "kill"][..],
            "add --workload lease",
        ),
        (
            &[
                "--workload",
                "seq",
                "--unsafe-lease-forget",
                "--faults",
                "kill",
            ],
            "add --workload lease",
        ),
        (
            &[
                "--workload",
                "lease",
                "--unsafe-lease-forget",
                "--faults",
                "kill",
                "--endpoints",
                "127.0.0.1:1",
            ],
            "need a local cluster",
        ),
        // Each new control needs the lease workload, its faults, and a local cluster.
        (
            &["--unsafe-lease-wall-expiry", "--faults", "clock"],
            "add --workload lease",
        ),
        (
            &[
                "--workload",
                "lease",
                "--unsafe-lease-wall-expiry",
                "--faults",
                "kill,partition",
            ],
            "add clock to --faults",
        ),
        (
            &[
                "--workload",
                "lease",
                "--unsafe-lease-bound-in-memory",
                "--faults",
                "clock",
            ],
            "add kill to --faults",
        ),
        (
            &[
                "--workload",
                "lease",
                "--unsafe-lease-bound-in-memory",
                "--faults",
                "kill",
                "--endpoints",
                "127.0.0.1:1",
            ],
            "need a local cluster",
        ),
        // One control at a time.
        (
            &[
                "--workload",
                "lease",
                "--unsafe-lease-wall-expiry",
                "--unsafe-lease-bound-in-memory",
                "--faults",
                "kill,clock",
            ],
            "cannot be used with",
        ),
    ] {
        let output = check(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            explain(&output)
        );
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(says),
            "{args:?} should say {says:?}: {}",
            explain(&output)
        );
    }
}
