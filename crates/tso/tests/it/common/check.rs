//! `tso check` as a user runs it: the real binary with a result file and a work directory under
//! a test's temporary directory, and the counts of its result file.

use std::path::Path;
use std::process::{Command, Output};

/// Runs `tso check --out DIR/result.json --work-dir DIR/work --liveness-bound 60s EXTRA...`;
/// returns its output and the result file (`Null` when none was written).
pub fn tso_check(dir: &Path, extra: &[&str]) -> (Output, serde_json::Value) {
    let out = dir.join("result.json");
    let output = Command::new(env!("CARGO_BIN_EXE_tso"))
        .arg("check")
        .arg("--out")
        .arg(&out)
        .arg("--work-dir")
        .arg(dir.join("work"))
        .args(["--liveness-bound", "60s"])
        .args(extra)
        .output()
        .expect("running tso check");
    let result = std::fs::read_to_string(&out)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(serde_json::Value::Null);
    (output, result)
}

/// The exit code and both streams, for an assertion's message.
pub fn explain(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// How many faults of `kind` ended with `outcome` (the result file's `faults` counts).
pub fn faults(result: &serde_json::Value, kind: &str, outcome: &str) -> u64 {
    result["faults"][kind][outcome].as_u64().unwrap_or(0)
}
