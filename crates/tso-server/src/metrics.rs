//! Metric names and the small helpers that record them, so control flow stays free of them.

use std::time::Duration;

pub const FENCE_RETRIES: &str = "tso_fence_retries_total";
pub const FENCES: &str = "tso_fences_total";
pub const EXTENSIONS: &str = "tso_window_extensions_total";
pub const EXTENSION_ERRORS: &str = "tso_window_extension_errors_total";
pub const EXTENSION_SECONDS: &str = "tso_window_extension_seconds";
pub const EXHAUSTED_WAITS: &str = "tso_window_exhausted_waits_total";
pub const SERVING: &str = "tso_serving";
pub const HIGH_WATER_MS: &str = "tso_high_water_ms";
pub const SEQ_WRITES: &str = "tso_seq_writes_total";
pub const SEQ_WRITE_CALLS: &str = "tso_seq_write_calls";

/// Registers every counter at zero, so dashboards and alerts see a 0, not a missing series.
pub fn register() {
    for name in [FENCES, EXTENSIONS, EXHAUSTED_WAITS] {
        metrics::counter!(name).increment(0);
    }
    metrics::counter!(FENCE_RETRIES, "class" => "transient").increment(0);
    for class in ["transient", "not_leader", "permanent"] {
        metrics::counter!(EXTENSION_ERRORS, "class" => class).increment(0);
    }
    for outcome in ["ok", "failed"] {
        metrics::counter!(SEQ_WRITES, "outcome" => outcome).increment(0);
    }
    serving(false);
}

pub fn fence_retry(class: &'static str) {
    metrics::counter!(FENCE_RETRIES, "class" => class).increment(1);
}

pub fn fence_done(outcome: &'static str) {
    metrics::counter!(FENCES, "outcome" => outcome).increment(1);
}

pub fn extension_done(took: Duration, high_water_ms: u64) {
    metrics::counter!(EXTENSIONS).increment(1);
    metrics::histogram!(EXTENSION_SECONDS).record(took.as_secs_f64());
    metrics::gauge!(HIGH_WATER_MS).set(high_water_ms as f64);
}

pub fn extension_failed(class: &'static str) {
    metrics::counter!(EXTENSION_ERRORS, "class" => class).increment(1);
}

pub fn exhausted_wait() {
    metrics::counter!(EXHAUSTED_WAITS).increment(1);
}

/// One group-committed sequence write and the calls it answered.
pub fn seq_write(ok: bool, calls: usize) {
    let outcome = if ok { "ok" } else { "failed" };
    metrics::counter!(SEQ_WRITES, "outcome" => outcome).increment(1);
    metrics::histogram!(SEQ_WRITE_CALLS).record(calls as f64);
}

pub fn serving(on: bool) {
    metrics::gauge!(SERVING).set(if on { 1.0 } else { 0.0 });
}

pub const RAFT_TERM: &str = "tso_raft_term";
pub const RAFT_LEADER: &str = "tso_raft_leader";
pub const LEADER_LEASE_RENEWALS: &str = "tso_raft_lease_renewals_total";
pub const RAFT_HANDOFFS: &str = "tso_raft_handoffs_total";

/// One leadership handoff at shutdown (`ok`: a successor was elected; `failed`: the cluster
/// elects one as after a crash).
pub fn raft_handoff(ok: bool) {
    let outcome = if ok { "ok" } else { "failed" };
    metrics::counter!(RAFT_HANDOFFS, "outcome" => outcome).increment(1);
}

/// The raft term and whether this node leads in it, on every leadership change.
pub fn raft_leadership(term: u64, leader: bool) {
    metrics::gauge!(RAFT_TERM).set(term as f64);
    metrics::gauge!(RAFT_LEADER).set(if leader { 1.0 } else { 0.0 });
}

/// One attempt of the leader to renew its lease (`ok`, or `failed`: no quorum in time).
pub fn leader_lease_renewal(ok: bool) {
    let outcome = if ok { "ok" } else { "failed" };
    metrics::counter!(LEADER_LEASE_RENEWALS, "outcome" => outcome).increment(1);
}
