//! `tso check --faults restore`: disaster recovery as an operator runs it (every node killed,
//! `tso export` of each data directory, fresh directories seeded from all the exports with
//! `tso init --from`, every node restarted on them) among kills, on one file-backend node and
//! on a raft cluster: timestamps and stamping leases stay above everything answered before.

use crate::common;

use common::check::{explain, tso_check};

fn restores_are_clean(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--faults",
        "kill,restore",
        "--seed",
        "3",
        "--duration",
        "12s",
        "--fault-interval",
        "1s",
    ];
    args.extend_from_slice(extra);
    let (output, result) = tso_check(dir.path(), &args);
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    assert!(
        result["faults"]["restore"]["applied"].as_u64().unwrap_or(0) >= 1,
        "{:#}",
        result["faults"]
    );
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("every node seeded from all of them"),
        "{}",
        explain(&output)
    );
}

#[test]
fn restores_of_one_file_node_are_clean() {
    let _turn = crate::common::topic(module_path!());
    restores_are_clean(&["--nodes", "1"]);
}

#[test]
fn restores_of_a_raft_cluster_handing_out_leases_are_clean() {
    let _turn = crate::common::topic(module_path!());
    restores_are_clean(&["--nodes", "3", "--workload", "lease"]);
}

#[test]
fn restores_refuse_what_cannot_run() {
    let _turn = crate::common::topic(module_path!());
    for (args, expect) in [
        (
            &["--nodes", "3", "--workload", "seq", "--faults", "restore"][..],
            "epochs again",
        ),
        (
            &["--nodes", "3", "--faults", "restore,member"][..],
            "drop the member and wipe faults",
        ),
        (
            &["--nodes", "3", "--faults", "restore,power"][..],
            "drop the disk faults",
        ),
        (
            &["--backend", "etcd", "--nodes", "3", "--faults", "restore"][..],
            "an etcd node keeps none",
        ),
    ] {
        let mut all = vec!["check"];
        all.extend_from_slice(args);
        let (status, _, err) = common::run_tso(&all);
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in {err}"
        );
    }
}
