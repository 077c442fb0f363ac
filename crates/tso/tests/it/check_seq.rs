//! `tso check --workload seq` as a user runs it, on real processes: 3 raft nodes whose leader
//! is killed and cut off while clients take blocks of three dense sequences, by `GetSeq` and
//! `GetSeqBatch`, come out clean (exit 0: no overlap, every gap explained by uncertain calls,
//! epochs in order), and so does one node through the client library; the controls are
//! caught: servers that restart every sequence from 0 in each new term as a D1 overlap, servers
//! that refuse a call after spending its block as a D2 gap (exit 1); the recorded history
//! verifies on its own; bad usage exits 2. The cluster tests need root and `unshare` (each node
//! runs in its own mount namespace), as CI has.
//!
//! Nothing here depends on timing: the liveness bound is far above any restart; the forget
//! control's overlap follows from its schedule (it opens with two kills of the leader, each
//! after a block was granted, and the run goes on until a block is granted after the last);
//! the burn control's run has no faults and ends at a fixed number of calls, of which the
//! server burns every 50th granted one.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::check::explain;

/// `tso check --workload seq EXTRA...` (see [`common::check::tso_check`]).
fn tso_check(dir: &Path, extra: &[&str]) -> (std::process::Output, serde_json::Value) {
    let args: Vec<&str> = ["--workload", "seq"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    common::check::tso_check(dir, &args)
}

/// The faults of a result file that hit the leader and were applied (each one a failover: a
/// killed or cut-off leader is replaced by an election).
fn failovers(result: &serde_json::Value) -> Vec<String> {
    result["schedule"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|step| step["applied"] == true)
        .map(|step| step["fault"].as_str().unwrap().to_string())
        .filter(|f| f.contains(" the leader"))
        .collect()
}

/// Seed 16's schedule (at `--fault-interval 1s`) kills the leader, cuts it off, kills node 1
/// and cuts the leader off again.
#[test]
fn a_raft_cluster_under_kills_and_partitions_hands_out_dense_blocks() {
    let _turn = crate::common::topic(module_path!());
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
            "16",
            "--clients",
            "6",
            "--fault-interval",
            "1s",
            "--history",
            history.to_str().unwrap(),
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    assert_eq!(result["workload"], "seq", "{result:#}");
    assert!(
        result["history"]["blocks"].as_u64().unwrap() > 0,
        "{result:#}"
    );
    assert_eq!(result["history"]["keys"].as_array().unwrap().len(), 3);
    assert!(
        result["history"]["get_seq_batch_calls"].as_u64().unwrap() > 0,
        "{result:#}"
    );
    let failovers = failovers(&result);
    assert!(!failovers.is_empty(), "{result:#}");
    assert_eq!(
        result["violations"],
        serde_json::json!({"overlap": 0, "gap": 0, "epoch": 0, "shape": 0, "examples": []})
    );

    // The file has granted batch entries, and every block names its epoch.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&history)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let blocks = || lines.iter().filter(|line| line.get("start").is_some());
    assert!(blocks().all(|line| line["epoch"].is_string()));
    assert!(blocks().any(|line| line.get("batch").is_some()));

    // The history verifies on its own; two copies merged overlap everywhere.
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
    assert!(String::from_utf8_lossy(&twice.stdout).contains("D1 overlap"));
}

/// Through the client library, an uncertain call is `Error::SeqUncertain`; one node killed,
/// paused and shifted in time.
#[test]
fn a_single_node_through_the_client_library_is_clean() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--mode",
            "library",
            "--faults",
            "kill,pause,clock",
            "--duration",
            "8s",
            "--seed",
            "7",
            "--clients",
            "4",
            "--fault-interval",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    assert_eq!(result["mode"], "library");
    assert!(
        result["history"]["blocks"].as_u64().unwrap() > 0,
        "{result:#}"
    );
}

/// Servers that start every sequence from 0 in each new term, and a schedule that opens with
/// kills of the leader: the new leader hands out blocks already held, a D1 overlap.
#[test]
fn the_seq_forget_control_is_reported_as_an_overlap() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--unsafe-seq-forget",
            "--faults",
            "kill",
            "--duration",
            "8s",
            "--seed",
            "7",
            "--clients",
            "6",
            "--fault-interval",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert_eq!(result["verdict"], "violation", "{result:#}");
    assert_eq!(result["seq_forget_control"], true, "{result:#}");
    assert!(
        result["violations"]["overlap"].as_u64().unwrap() > 0,
        "{result:#}"
    );
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("D1 overlap on \"check-seq-"),
        "{}",
        explain(&output)
    );
    assert!(!failovers(&result).is_empty(), "{result:#}");
}

/// Servers that answer every 50th granted call `RESOURCE_EXHAUSTED` after spending its block: a
/// definite refusal that spent values, so each such block is a gap no uncertain call explains.
/// One node and no faults (the first would come after 5 minutes), so nothing is uncertain; the
/// clients stop at 1000 calls, whatever the machine's speed.
#[test]
fn the_seq_burn_control_is_reported_as_a_gap() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--unsafe-seq-burn-refused",
            "--faults",
            "kill",
            "--fault-interval",
            "10m",
            "--duration",
            "5m",
            "--calls-max",
            "1000",
            "--seed",
            "7",
            "--clients",
            "4",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert_eq!(result["verdict"], "violation", "{result:#}");
    assert_eq!(result["seq_burn_refused_control"], true, "{result:#}");
    assert!(
        result["history"]["refused"]["ResourceExhausted"]
            .as_u64()
            .unwrap()
            > 0,
        "{result:#}"
    );
    assert_eq!(result["history"]["uncertain"], 0, "{result:#}");
    assert!(
        result["violations"]["gap"].as_u64().unwrap() > 0,
        "{result:#}"
    );
    assert_eq!(result["violations"]["overlap"], 0, "{result:#}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("D2 gap on \"check-seq-"),
        "{}",
        explain(&output)
    );
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
    for args in [
        &["--unsafe-seq-forget"][..],
        &["--workload", "ts", "--unsafe-seq-forget"],
        &["--workload", "seq", "--unsafe-positive-control"],
        &[
            "--workload",
            "seq",
            "--nodes",
            "3",
            "--unsafe-no-leader-lease",
        ],
        &[
            "--workload",
            "seq",
            "--unsafe-seq-forget",
            "--endpoints",
            "127.0.0.1:1",
        ],
        &["--workload", "sequences"],
        &["--unsafe-seq-burn-refused"],
        &["--workload", "lease", "--unsafe-seq-burn-refused"],
        &[
            "--workload",
            "seq",
            "--unsafe-seq-burn-refused",
            "--endpoints",
            "127.0.0.1:1",
        ],
        &[
            "--workload",
            "seq",
            "--unsafe-seq-burn-refused",
            "--unsafe-seq-forget",
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
}
