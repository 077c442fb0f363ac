//! `tso bench --spawn` end to end: it starts its own server, reports one JSON object, and its
//! check of the replies passes; against a server whose replies break the protocol, the check
//! fails (exit 1). Asserts the shape of the report, never a rate.

use crate::common;

use std::process::Command;

use common::malformed::MalformedServer;

#[test]
fn raw_bench_against_a_spawned_server_reports_json() {
    let _turn = crate::common::topic(module_path!());
    bench_reports_json("raw");
}

#[test]
fn library_bench_against_a_spawned_server_reports_json() {
    let _turn = crate::common::topic(module_path!());
    bench_reports_json("library");
}

#[test]
fn stream_bench_against_a_spawned_server_reports_json() {
    let _turn = crate::common::topic(module_path!());
    bench_reports_json("stream");
}

#[test]
fn stream_per_caller_bench_against_a_spawned_server_reports_json() {
    let _turn = crate::common::topic(module_path!());
    let report = bench_reports_json_with("stream", &["--stream-per-caller"]);
    assert_eq!(report["stream_per_caller"], true);
}

fn bench_reports_json(mode: &str) {
    bench_reports_json_with(mode, &[]);
}

fn bench_reports_json_with(mode: &str, extra: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_tso"))
        .args(["bench", "--spawn", "--json", "--callers", "4"])
        .args(["--connections", "2", "--mode", mode])
        .args(extra)
        .args(["--count", "3", "--duration", "1s", "--warmup", "200ms"])
        .output()
        .expect("running tso bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "exit {:?}\n{stdout}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(report["callers"], 4);
    assert_eq!(report["mode"], mode);
    assert_eq!(report["count"], 3);
    assert!(report["calls"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(
        report["timestamps"].as_u64().unwrap(),
        3 * report["calls"].as_u64().unwrap()
    );
    assert_eq!(report["check"]["ok"], true, "{report:#}");
    for key in ["p50", "p90", "p99", "p99_9", "max"] {
        assert!(report["latency_ms"][key].is_number(), "{key} in {report:#}");
    }
    assert!(report["longest_gap_ms"].is_number());
    assert!(report["cores"].as_u64().unwrap() >= 1);
    report
}

/// Through the client library, a reply the library refuses as malformed is a violation of the
/// check (exit 1), not an error among others.
#[test]
fn library_bench_against_a_malformed_server_reports_a_violation() {
    let _turn = crate::common::topic(module_path!());
    let server = MalformedServer::start();
    let output = Command::new(env!("CARGO_BIN_EXE_tso"))
        .args(["bench", "--json", "--callers", "2", "--mode", "library"])
        .args(["--endpoints", &server.endpoint()])
        .args(["--duration", "300ms", "--warmup", "0s"])
        .output()
        .expect("running tso bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(report["check"]["ok"], false, "{report:#}");
    assert!(
        report["check"]["malformed"].as_u64().unwrap() > 0,
        "{report:#}"
    );
}
