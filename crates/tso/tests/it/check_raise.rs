//! `tso check` exercising `tso admin raise` (`RaiseHighWater` on the client port): raises of the
//! leader's high-water up to 5 s ahead of the clock between kills of the leader come out clean
//! on every backend (every later leader fences above a raise), and the positive control, servers that keep a
//! raise in memory only, is caught when the leader is killed after it (exit 1).

use crate::common;

use common::check::{explain, tso_check};

#[test]
fn raises_between_kills_of_the_leader_are_clean() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--faults",
            "kill,raise",
            "--seed",
            "5",
            "--duration",
            "12s",
            "--fault-interval",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
    assert_eq!(result["verdict"], "clean", "{result:#}");
    assert!(
        result["faults"]["raise"]["applied"].as_u64().unwrap_or(0) >= 3,
        "{:#}",
        result["faults"]
    );
}

/// The same on the two other backends: one file-backend node (the raise reaches it on its
/// only port, the client port), and three nodes on etcd.
#[test]
fn raises_are_clean_on_the_file_and_etcd_backends() {
    let _turn = crate::common::topic(module_path!());
    for backend in [
        &["--nodes", "1"][..],
        &["--backend", "etcd", "--nodes", "3"][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--faults",
            "kill,raise",
            "--seed",
            "5",
            "--duration",
            "10s",
            "--fault-interval",
            "1s",
        ];
        args.extend_from_slice(backend);
        let (output, result) = tso_check(dir.path(), &args);
        assert_eq!(output.status.code(), Some(0), "{}", explain(&output));
        assert_eq!(result["verdict"], "clean", "{result:#}");
        assert!(
            result["faults"]["raise"]["applied"].as_u64().unwrap_or(0) >= 2,
            "{backend:?}: {:#}",
            result["faults"]
        );
    }
}

#[test]
fn the_raise_in_memory_control_is_caught() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let (output, result) = tso_check(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--unsafe-raise-in-memory",
            "--faults",
            "kill",
            "--seed",
            "7",
            "--duration",
            "10s",
            "--fault-interval",
            "1s",
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", explain(&output));
    assert_eq!(result["verdict"], "violation", "{result:#}");
    assert!(
        result["violations"]["real_time"].as_u64().unwrap_or(0) > 0,
        "{result:#}"
    );
}

#[test]
fn the_raise_control_needs_the_timestamp_workload() {
    let _turn = crate::common::topic(module_path!());
    let (status, _, err) = common::run_tso(&[
        "check",
        "--nodes",
        "3",
        "--workload",
        "seq",
        "--unsafe-raise-in-memory",
    ]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("use it with --workload ts"), "{err}");
}
