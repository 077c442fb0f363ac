//! `tso check --workload lease` as a user runs it, on real processes: 3 raft nodes whose leader
//! is killed and cut off while holders acquire, renew, release and supersede stamping leases,
//! readers poll the safe frontier and stampers take timestamps, come out clean (exit 0: no
//! frontier above a live lease, no regression on one leader, every bound above earlier grants,
//! no shared lease id); the control, whose every new leader starts with an empty lease set, is
//! caught as a rule-1 violation (exit 1); bad usage exits 2. The cluster tests need root and
//! `unshare` (each node runs in its own mount namespace), as CI has.
//!
//! Nothing here depends on timing: the liveness bound is far above any restart, and the
//! control's catch follows from its schedule (it opens with four kills of the leader; each
//! restarted or new leader has forgotten leases its holders still hold for seconds, while
//! readers poll its frontier every few milliseconds).

mod common;

use std::path::Path;
use std::process::Command;

use common::check::explain;

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

/// Seed 3's schedule (at `--fault-interval 2s`) kills the leader three times, then node 2.
#[test]
fn a_raft_cluster_under_kills_and_partitions_keeps_the_frontier_below_live_leases() {
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history.jsonl");
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--faults",
            "kill,partition",
            "--duration",
            "15s",
            "--seed",
            "3",
            "--clients",
            "8",
            "--fault-interval",
            "2s",
            "--history",
            history.to_str().unwrap(),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    assert_eq!(result["workload"], "lease", "{result:#}");
    let stats = &result["history"];
    assert!(stats["leases"].as_u64().unwrap() > 0, "{result:#}");
    assert!(stats["frontier_reads"].as_u64().unwrap() > 0, "{result:#}");
    assert!(stats["grants"].as_u64().unwrap() > 0, "{result:#}");
    assert!(!leader_faults(&result).is_empty(), "{result:#}");
    assert_eq!(
        result["violations"],
        serde_json::json!({
            "frontier_above_lease": 0,
            "frontier_regression": 0,
            "bound_below_grant": 0,
            "shared_lease_id": 0,
            "examples": [],
        })
    );
    // Every call is in the history, one JSON line each, with its operation.
    let text = std::fs::read_to_string(&history).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as u64, stats["calls"].as_u64().unwrap());
    assert!(
        lines
            .iter()
            .any(|l| l["op"] == "acquire" && l["bound_ms"].is_u64())
    );
}

/// Servers whose every new leader starts with an empty lease set, and a schedule that opens
/// with kills of the leader: a frontier read after a kill passes the bound of a lease its
/// holder still holds.
#[test]
fn the_lease_forget_control_is_reported_as_a_frontier_above_a_live_lease() {
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

#[test]
fn usage_errors_exit_with_2() {
    let dir = tempfile::tempdir().unwrap();
    let check = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tso"))
            .arg("check")
            .args(["--work-dir", dir.path().to_str().unwrap()])
            .args(args)
            .output()
            .expect("running tso check")
    };
    for args in [
        // Clock faults: expiry is by the leader's clock (the default faults include clock).
        &["--workload", "lease"][..],
        &["--workload", "lease", "--faults", "kill,clock"],
        &[
            "--workload",
            "lease",
            "--faults",
            "kill",
            "--mode",
            "library",
        ],
        &["--unsafe-lease-forget", "--faults", "kill"],
        &[
            "--workload",
            "seq",
            "--unsafe-lease-forget",
            "--faults",
            "kill",
        ],
        &[
            "--workload",
            "lease",
            "--unsafe-lease-forget",
            "--faults",
            "kill",
            "--endpoints",
            "127.0.0.1:1",
        ],
    ] {
        let output = check(args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            explain(&output)
        );
    }
    let output = check(&["--workload", "lease", "--faults", "pause,clock"]);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot take clock faults"),
        "{}",
        explain(&output)
    );
}
