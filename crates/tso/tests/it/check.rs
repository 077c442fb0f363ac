//! `tso check` as a user runs it, on real processes: short runs against one file-backed node
//! (kills, pauses, clock jumps; raw and through the client library) and against 3 raft nodes
//! (kills and partitions of the leader, with clients pinned to each node) come out clean
//! (exit 0); the positive controls, whose servers really forget their high-water or grant
//! without their lease, are caught (exit 1), and so is a server whose replies the client
//! library refuses as malformed; a run that reaches its call cap stops its nemesis too and
//! reports no stall; bad usage exits 2. The cluster tests need root and `unshare` (each node
//! runs in its own mount namespace), as CI has.
//!
//! Nothing here depends on timing: the liveness bound is far above any restart, and the
//! positive controls' violations follow from their schedules, not from luck (the no-leader-lease
//! control cuts the leader off three times, each for longer than its window lasts).

use crate::common;

use std::path::Path;
use std::process::Command;

use common::check::{explain, tso_check};
use common::malformed::MalformedServer;

#[test]
fn a_short_check_with_kills_pauses_and_clock_jumps_is_clean() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--seed",
            "20261126",
            "--clients",
            "4",
            "--duration",
            "15s",
            "--fault-interval",
            "1s",
            "--faults",
            "kill,pause,clock",
            "--history",
            dir.path().join("history.jsonl").to_str().unwrap(),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("seed 20261126"));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    assert_eq!(result["seed"], 20261126);
    let faults: Vec<String> = result["schedule"]
        .as_array()
        .unwrap()
        .iter()
        .map(|step| step["fault"].as_str().unwrap().to_string())
        .collect();
    assert!(
        faults.iter().any(|f| f.starts_with("kill -9")),
        "{faults:?}"
    );
    assert!(
        faults.iter().any(|f| f.contains("clock offset")),
        "{faults:?}"
    );
    let granted = result["history"]["granted"].as_u64().unwrap();
    assert!(granted > 0);
    let history = std::fs::read_to_string(dir.path().join("history.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = history
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        lines.len() as u64,
        result["history"]["calls"].as_u64().unwrap()
    );
    assert_eq!(
        lines.iter().filter(|l| l["count"].is_number()).count() as u64,
        granted
    );

    // The history verifies on its own, and two copies of it merged are caught: the second
    // copy's calls repeat every value.
    let history = dir.path().join("history.jsonl");
    let verify = |files: &[&Path]| {
        let list: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        Command::new(env!("CARGO_BIN_EXE_tso"))
            .args(["check", "--verify", &list.join(",")])
            .output()
            .expect("running tso check --verify")
    };
    let alone = verify(&[&history]);
    assert_eq!(alone.status.code(), Some(0), "{}", explain(&alone));
    let twice = verify(&[&history, &history]);
    assert_eq!(twice.status.code(), Some(1), "{}", explain(&twice));
    assert!(String::from_utf8_lossy(&twice.stdout).contains("duplicate"));
}

#[test]
fn a_check_through_the_client_library_is_clean() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--mode",
            "library",
            "--seed",
            "7",
            "--clients",
            "8",
            "--duration",
            "8s",
            "--fault-interval",
            "1s",
            "--faults",
            "kill,clock",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    assert_eq!(result["mode"], "library");
}

#[test]
fn the_positive_control_is_reported_as_a_violation() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--unsafe-positive-control",
            "--seed",
            "1",
            "--clients",
            "4",
            "--duration",
            "5s",
            "--fault-interval",
            "1s",
            "--faults",
            "kill",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert_eq!(result["verdict"], "violation", "{result:#}");
    assert!(
        result["violations"]["real_time"].as_u64().unwrap() > 0,
        "{result:#}"
    );
}

/// The leader stopped with SIGSTOP (up to 3 s, well past the election timeout), then resumed
/// while a new leader serves: the merged history stays clean. (On resume the old leader learns
/// the new term within a round trip; the lease check that closes the remaining window is proven
/// by `tso-server/tests/raft_partition.rs`, which fails without it.)
#[test]
fn a_raft_cluster_with_its_leader_paused_is_clean() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--seed",
            "5",
            "--clients",
            "6",
            "--duration",
            "20s",
            "--fault-interval",
            "1s",
            "--faults",
            "pause",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    let faults: Vec<&str> = result["schedule"]
        .as_array()
        .unwrap()
        .iter()
        .map(|step| step["fault"].as_str().unwrap())
        .collect();
    assert!(
        faults.iter().any(|f| f.starts_with("SIGSTOP the leader")),
        "{faults:?}"
    );
}

/// The short cluster check of the CI: 3 raft nodes, kills and partitions, seed 3 (whose
/// schedule kills the leader 4 times and cuts it off 3 times, among 13 faults in 30 s).
#[test]
fn a_raft_cluster_under_kills_and_partitions_is_clean() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--seed",
            "3",
            "--clients",
            "6",
            "--duration",
            "30s",
            "--fault-interval",
            "1s",
            "--faults",
            "kill,partition",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    let faults: Vec<&str> = result["schedule"]
        .as_array()
        .unwrap()
        .iter()
        .map(|step| step["fault"].as_str().unwrap())
        .collect();
    assert!(
        faults
            .iter()
            .any(|f| f.starts_with("cut every peer link of the leader")),
        "{faults:?}"
    );
    assert!(
        faults.iter().any(|f| f.starts_with("kill -9 the leader")),
        "{faults:?}"
    );
}

#[test]
fn the_raft_positive_control_is_reported_as_a_violation() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--unsafe-positive-control",
            "--seed",
            "3",
            "--clients",
            "4",
            "--duration",
            "5s",
            "--fault-interval",
            "1s",
            "--faults",
            "kill",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert!(
        result["violations"]["real_time"].as_u64().unwrap() > 0,
        "{result:#}"
    );
}

/// A cut-off old leader that keeps granting (its lease check skipped) while the new leader
/// serves: the clients pinned to each node put both leaders' grants in one history, and the
/// real-time order check catches the old leader's lower values.
#[test]
fn the_no_leader_lease_control_is_reported_as_a_violation() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--unsafe-no-leader-lease",
            "--faults",
            "partition",
            "--seed",
            "3",
            "--clients",
            "6",
            "--duration",
            "15s",
            "--fault-interval",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert_eq!(result["no_leader_lease_control"], true, "{result:#}");
    assert_eq!(
        result["pinned_clients"].as_array().unwrap().len(),
        3,
        "{result:#}"
    );
    assert!(
        result["violations"]["real_time"].as_u64().unwrap() > 0,
        "{result:#}"
    );
}

/// Through the client library, a reply that breaks the protocol is a violation, not an error.
#[test]
fn a_malformed_reply_through_the_client_library_is_a_violation() {
    let _turn = crate::common::topic(module_path!());
    let server = MalformedServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--endpoints",
            &server.endpoint(),
            "--mode",
            "library",
            "--seed",
            "1",
            "--clients",
            "2",
            "--duration",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert!(
        result["history"]["granted"].as_u64().unwrap() > 0,
        "{result:#}"
    );
    assert!(
        result["history"]["malformed"].as_u64().unwrap() > 0,
        "{result:#}"
    );
    assert!(
        result["violations"]["shape"].as_u64().unwrap() > 0,
        "{result:#}"
    );
}

/// Clients that reach `--calls-max` long before the duration stop the nemesis with them: the
/// run ends early, clean, with no stall reported for faults the clients did not see through.
#[test]
fn a_run_that_reaches_its_call_cap_stops_its_nemesis_too() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--seed",
            "5",
            "--clients",
            "4",
            "--calls-max",
            "1000",
            "--duration",
            "120s",
            "--fault-interval",
            "300ms",
            "--faults",
            "kill,pause",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    assert_eq!(result["history"]["calls"], 1000, "{result:#}");
    assert!(result["capped_ms"].is_u64(), "{result:#}");
    let applied = result["schedule"].as_array().unwrap().len() as u64;
    assert!(
        applied < result["faults_planned"].as_u64().unwrap(),
        "{result:#}"
    );
    assert_eq!(result["liveness"]["stalls"], serde_json::json!([]));
}

#[test]
fn usage_and_setup_errors_exit_with_2() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, _) = tso_check(dir.path(), &["--nodes", "4"]);
    assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
    let (output, _) = tso_check(dir.path(), &["--nodes", "2"]);
    assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
    let (output, _) = tso_check(dir.path(), &["--clients", "0"]);
    assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
    let (output, _) = tso_check(dir.path(), &["--faults", "partition"]);
    assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
    let (output, _) = tso_check(dir.path(), &["--no-such-flag"]);
    assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
    let (output, _) = tso_check(dir.path(), &["--calls-max", "0"]);
    assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
    let (output, _) = tso_check(dir.path(), &["--unsafe-no-leader-lease"]);
    assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
    let (output, _) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--unsafe-no-leader-lease",
            "--unsafe-positive-control",
        ],
    );
    assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
}
