//! `tso check --backend etcd` as a user runs it: the real binary starts a 3-member etcd cluster
//! (`/usr/bin/etcd`, Debian's `etcd-server`) and three `tso serve --backend etcd` nodes on it,
//! kills oracle nodes, one etcd member, and two of the three (quorum lost), and comes out clean;
//! usage it cannot run is refused (exit 2).

use crate::common;

use common::check::{explain, tso_check};

fn count(result: &serde_json::Value, kind: &str) -> u64 {
    result["faults"][kind]
        .as_object()
        .map(|outcomes| outcomes.values().filter_map(|n| n.as_u64()).sum())
        .unwrap_or(0)
}

/// Whether a process still runs whose command line names `path` (an etcd member or an oracle
/// node of the run).
fn process_under(path: &std::path::Path) -> Option<String> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .find(|cmdline| cmdline.contains(&needle))
}

/// Three oracle nodes on etcd under oracle kills, etcd member kills and quorum losses (seed 19
/// draws 4 kills, 2 etcd-kills and 2 etcd-quorums, one of them 3 s long: past the 2 s lease,
/// so the oracle stops granting and elects again): clean, and no etcd is left behind.
#[test]
fn oracle_nodes_on_etcd_under_member_kills_and_quorum_loss_are_clean() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--backend",
            "etcd",
            "--nodes",
            "3",
            "--faults",
            "kill,etcd-kill,etcd-quorum",
            "--seed",
            "19",
            "--duration",
            "20s",
            "--fault-interval",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    assert_eq!(result["backend"], "etcd", "{result:#}");
    for kind in ["kill", "etcd-kill", "etcd-quorum"] {
        assert!(
            result["faults"][kind]["applied"].as_u64().unwrap_or(0) >= 1,
            "{kind}: {:#}",
            result["faults"]
        );
    }
    assert_eq!(count(&result, "etcd-quorum"), 2, "{:#}", result["faults"]);
    let leftover = process_under(&dir.path().join("work"));
    assert!(leftover.is_none(), "left running: {leftover:?}");
}

/// What `--backend etcd` cannot run is refused before anything starts, and the etcd faults
/// need `--backend etcd`.
#[test]
fn usage_the_etcd_backend_cannot_run_is_refused() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let refused = |extra: &[&str], says: &str| {
        let (output, _) = tso_check(dir.path(), extra);
        assert_eq!(output.status.code(), Some(2), "{}", explain(&output));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{extra:?}: {}", explain(&output));
    };
    let etcd = |more: &[&'static str]| {
        let mut args = vec!["--backend", "etcd", "--nodes", "3"];
        args.extend_from_slice(more);
        args
    };
    for raft_only in ["partition", "handoff", "member", "wipe"] {
        refused(
            &etcd(&["--faults", raft_only]),
            &format!("{raft_only} faults need a raft cluster"),
        );
    }
    for disk in ["power", "disk-error", "disk-full", "slow-disk"] {
        refused(
            &etcd(&["--faults", disk]),
            "an etcd node keeps nothing on one",
        );
    }
    refused(
        &etcd(&["--unsafe-positive-control"]),
        "the --unsafe-* controls break raft or file-backend servers",
    );
    refused(
        &etcd(&["--workload", "seq", "--unsafe-seq-forget"]),
        "the --unsafe-* controls",
    );
    refused(
        &etcd(&["--endpoints", "http://127.0.0.1:1"]),
        "drop --endpoints",
    );
    refused(
        &["--nodes", "3", "--faults", "etcd-kill"],
        "etcd-kill faults hit the etcd cluster under the oracle: add --backend etcd",
    );
    refused(
        &["--faults", "kill,etcd-quorum"],
        "etcd-quorum faults hit the etcd cluster",
    );
    refused(&["--backend", "zookeeper"], "invalid value");
    refused(
        &["--nodes", "3", "--faults", "etcd-cut"],
        "etcd-cut faults hit the etcd cluster under the oracle: add --backend etcd",
    );
    refused(
        &["--nodes", "3", "--unsafe-etcd-ignore-lease"],
        "break etcd-backend servers: add --backend etcd",
    );
    refused(
        &etcd(&["--workload", "seq", "--unsafe-etcd-ignore-lease"]),
        "use it with --workload ts",
    );
    refused(
        &[
            "--nodes",
            "3",
            "--workload",
            "seq",
            "--unsafe-etcd-skip-fence",
        ],
        "break etcd-backend servers: add --backend etcd",
    );
    refused(
        &etcd(&["--unsafe-etcd-skip-fence", "--call-timeout", "6s"]),
        "use it with --workload seq",
    );
    refused(
        &etcd(&["--workload", "seq", "--unsafe-etcd-skip-fence"]),
        "give --call-timeout 6s",
    );
}

/// Oracle nodes cut off from etcd (seed 7 draws a cut of the leader for 3.6 s, past its 2 s
/// lease, then one of node 2 for 4 s): a cut-off leader stops granting when its lease ends,
/// before another node wins, so the clients pinned to every node see no two leaders: clean.
#[test]
fn oracle_nodes_cut_off_from_etcd_are_clean() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--backend",
            "etcd",
            "--nodes",
            "3",
            "--faults",
            "etcd-cut",
            "--seed",
            "7",
            "--duration",
            "10s",
            "--fault-interval",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    assert!(
        result["faults"]["etcd-cut"]["applied"]
            .as_u64()
            .unwrap_or(0)
            >= 2,
        "{:#}",
        result["faults"]
    );
    let leftover = process_under(&dir.path().join("work"));
    assert!(leftover.is_none(), "left running: {leftover:?}");
}

/// The ignore-lease control: oracle nodes whose leader lease ignores its deadline, the leader
/// cut off from etcd for 5 s (twice in 12 s): the cut-off leader grants while another node
/// wins and grants above it, so the pinned clients see later calls answered below earlier
/// ones (exit 1).
#[test]
fn the_etcd_ignore_lease_control_is_caught() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--backend",
            "etcd",
            "--nodes",
            "3",
            "--unsafe-etcd-ignore-lease",
            "--seed",
            "7",
            "--duration",
            "12s",
            "--fault-interval",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert_eq!(result["verdict"], "violation", "{result:#}");
    assert!(
        result["violations"]["real_time"].as_u64().unwrap() > 0,
        "{result:#}"
    );
    let leftover = process_under(&dir.path().join("work"));
    assert!(leftover.is_none(), "left running: {leftover:?}");
}

/// The skip-fence control: oracle nodes whose writes skip the transaction's compares, the
/// leader paused for 4.5 s (past its 2 s etcd lease and the successor's campaign) five times while
/// clients wait up to 6 s:
/// the calls it had queued are written blindly over its successor's state when it resumes and
/// answered with blocks the successor already handed out, so the checker sees values answered
/// twice (D1 overlaps, exit 1).
#[test]
fn the_etcd_skip_fence_control_is_caught() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--backend",
            "etcd",
            "--nodes",
            "3",
            "--workload",
            "seq",
            "--unsafe-etcd-skip-fence",
            "--call-timeout",
            "6s",
            "--seed",
            "7",
            "--duration",
            "29s",
            "--fault-interval",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert_eq!(result["verdict"], "violation", "{result:#}");
    assert!(
        result["violations"]["overlap"].as_u64().unwrap_or(0) > 0,
        "{result:#}"
    );
    let leftover = process_under(&dir.path().join("work"));
    assert!(leftover.is_none(), "left running: {leftover:?}");
}

/// Compactions of etcd's keyspace and defragmentations of its members while three oracle nodes
/// hand out sequences (every block is a write of the state key, so compaction has old revisions
/// to drop): the backend reads no old revision and rides out a member that stops answering
/// while it defragments, so the history is clean.
#[test]
fn etcd_compaction_and_defragmentation_while_serving_are_clean() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--backend",
            "etcd",
            "--nodes",
            "3",
            "--workload",
            "seq",
            "--faults",
            "etcd-compact,etcd-defrag",
            "--seed",
            "3",
            "--duration",
            "10s",
            "--fault-interval",
            "500ms",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    for kind in ["etcd-compact", "etcd-defrag"] {
        assert!(
            result["faults"][kind]["applied"].as_u64().unwrap_or(0) >= 2,
            "{kind}: {:#}",
            result["faults"]
        );
    }
    // The schedule's lines (on stderr) say what each one did.
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("compacted at revision"),
        "{}",
        explain(&output)
    );
    assert!(said.contains("defragmented in"), "{}", explain(&output));
}
