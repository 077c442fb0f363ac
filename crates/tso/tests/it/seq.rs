//! The sequence commands end to end against scripted servers (`common/seq_server.rs`):
//! `tso seq` prints blocks and says when a failure is uncertain; `tso bench --rpc seq` reports
//! its figures and its checks catch an overlap (D1) and a gap (D2). Asserts shapes and
//! verdicts, never a rate.

use crate::common;

use std::process::Command;

use common::run_tso;
use common::seq_server::{SeqMode, SeqServer};

#[test]
fn tso_seq_prints_one_block_per_key() {
    let _turn = crate::common::topic(module_path!());
    let server = SeqServer::start(SeqMode::Correct);
    let endpoint = server.endpoint();
    let (status, out, err) = run_tso(&["seq", "orders", "-n", "5", "--endpoints", &endpoint]);
    assert!(status.success(), "{err}");
    assert_eq!(out, "orders 0..5 (count 5, epoch 1)\n");
    let (status, out, err) = run_tso(&["seq", "orders", "--endpoints", &endpoint]);
    assert!(status.success(), "{err}");
    assert_eq!(out, "orders 5..6 (count 1, epoch 1)\n");
    let args = [
        "seq",
        "orders",
        "invoices",
        "-n",
        "2",
        "--endpoints",
        &endpoint,
    ];
    let (status, out, err) = run_tso(&args);
    assert!(status.success(), "{err}");
    assert_eq!(
        out,
        "orders 6..8 (count 2, epoch 1)\ninvoices 0..2 (count 2, epoch 1)\n"
    );
}

#[test]
fn tso_seq_says_when_a_failure_is_uncertain() {
    let _turn = crate::common::topic(module_path!());
    let server = SeqServer::start(SeqMode::Unavailable);
    let (status, out, err) = run_tso(&["seq", "k", "--endpoints", &server.endpoint()]);
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("tso: error: uncertain: "), "{err}");
    assert!(err.contains("may be spent"), "{err}");
}

#[test]
fn tso_seq_against_nothing_is_a_certain_failure() {
    let _turn = crate::common::topic(module_path!());
    let (status, _, err) = run_tso(&["seq", "k", "--endpoints", "127.0.0.1:1", "--timeout", "2s"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("is a server running there?"), "{err}");
    assert!(!err.contains("uncertain"), "{err}");
}

#[test]
fn tso_seq_refuses_a_bad_request_before_sending_it() {
    let _turn = crate::common::topic(module_path!());
    // Nothing listens there: a refusal that reached the network would read differently.
    let too_long = "k".repeat(129);
    for args in [
        vec!["seq", "k", "-n", "0"],
        vec!["seq", "k", "-n", "65537"],
        vec!["seq", ""],
        vec!["seq", &too_long],
        vec!["seq", "a", "a"],
    ] {
        let mut args = args.clone();
        args.extend(["--endpoints", "127.0.0.1:1"]);
        let (status, _, err) = run_tso(&args);
        assert_eq!(status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("tso: error: bad request: "),
            "{args:?}: {err}"
        );
    }
}

/// Runs a short `tso bench --rpc seq --json` and returns its exit code and report.
fn bench(endpoint: &str, mode: &str, keys: &str) -> (Option<i32>, serde_json::Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_tso"))
        .args(["bench", "--json", "--rpc", "seq", "--seq-keys", keys])
        .args(["--mode", mode, "--callers", "4", "--count", "3"])
        .args(["--endpoints", endpoint])
        .args(["--duration", "300ms", "--warmup", "100ms"])
        .output()
        .expect("running tso bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "not one JSON object ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code(), report)
}

#[test]
fn seq_bench_reports_values_and_passes_its_checks() {
    let _turn = crate::common::topic(module_path!());
    let server = SeqServer::start(SeqMode::Correct);
    for (mode, keys) in [("raw", "shared"), ("library", "per-caller")] {
        let (code, report) = bench(&server.endpoint(), mode, keys);
        assert_eq!(code, Some(0), "{mode} {keys}: {report:#}");
        assert_eq!(report["rpc"], "seq");
        assert_eq!(report["seq_keys"], keys);
        assert_eq!(report["mode"], mode);
        assert!(report["calls"].as_u64().unwrap() > 0, "{report:#}");
        assert_eq!(
            report["values"].as_u64().unwrap(),
            3 * report["calls"].as_u64().unwrap()
        );
        assert!(report.get("timestamps").is_none(), "{report:#}");
        assert_eq!(report["check"]["ok"], true, "{report:#}");
        assert_eq!(report["check"]["gap_values"], 0);
        assert!(report["latency_ms"]["p99"].is_number());
    }
}

#[test]
fn seq_bench_catches_overlapping_blocks() {
    let _turn = crate::common::topic(module_path!());
    let server = SeqServer::start(SeqMode::Overlap);
    for (mode, keys) in [("raw", "shared"), ("library", "per-caller")] {
        let (code, report) = bench(&server.endpoint(), mode, keys);
        assert_eq!(code, Some(1), "{mode} {keys}: {report:#}");
        assert_eq!(report["check"]["ok"], false);
        let broken = report["check"]["duplicates"].as_u64().unwrap()
            + report["check"]["regressions"].as_u64().unwrap();
        assert!(broken > 0, "{mode} {keys}: {report:#}");
    }
}

#[test]
fn seq_bench_catches_a_gap_no_uncertain_call_explains() {
    let _turn = crate::common::topic(module_path!());
    let server = SeqServer::start(SeqMode::Gap);
    for (mode, keys) in [("raw", "shared"), ("library", "per-caller")] {
        let (code, report) = bench(&server.endpoint(), mode, keys);
        assert_eq!(code, Some(1), "{mode} {keys}: {report:#}");
        assert_eq!(report["check"]["uncertain"], 0);
        assert!(
            report["check"]["gap_values"].as_u64().unwrap() > 0,
            "{mode} {keys}: {report:#}"
        );
    }
}

#[test]
fn tso_seq_against_a_real_server_continues_across_a_kill_9() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = common::Server::start(dir.path(), &[]);
    let (status, out, err) = run_tso(&["seq", "k", "-n", "4", "--endpoints", &server.addr]);
    assert!(status.success(), "{err}");
    assert!(out.starts_with("k 0..4 (count 4, epoch "), "{out}");
    server.kill9();
    let server = common::Server::start(dir.path(), &[]);
    let (status, out, err) = run_tso(&["seq", "k", "j", "--endpoints", &server.addr]);
    assert!(status.success(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("k 4..5 (count 1, epoch "), "{out}");
    assert!(lines[1].starts_with("j 0..1 (count 1, epoch "), "{out}");
}

#[test]
fn seq_bench_against_a_spawned_server_passes_its_checks() {
    let _turn = crate::common::topic(module_path!());
    for (mode, keys) in [("raw", "shared"), ("library", "per-caller")] {
        let output = Command::new(env!("CARGO_BIN_EXE_tso"))
            .args([
                "bench",
                "--spawn",
                "--json",
                "--rpc",
                "seq",
                "--seq-keys",
                keys,
            ])
            .args(["--mode", mode, "--callers", "4", "--count", "3"])
            .args(["--duration", "500ms", "--warmup", "100ms"])
            .output()
            .expect("running tso bench");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{mode} {keys}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert!(report["calls"].as_u64().unwrap() > 0, "{report:#}");
        assert_eq!(report["check"]["ok"], true, "{report:#}");
        assert_eq!(report["check"]["gap_values"], 0, "{report:#}");
    }
}
