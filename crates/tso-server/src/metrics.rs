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
/// Registers every metric at its zero; `leases_max` is the cap on held stamping leases.
pub fn register(leases_max: usize) {
    for name in [EXTENSIONS, EXHAUSTED_WAITS] {
        metrics::counter!(name).increment(0);
    }
    metrics::counter!(FENCE_RETRIES, "class" => "transient").increment(0);
    for class in ["transient", "not_leader", "permanent"] {
        metrics::counter!(EXTENSION_ERRORS, "class" => class).increment(0);
    }
    for outcome in ["ok", "failed"] {
        metrics::counter!(SEQ_WRITES, "outcome" => outcome).increment(0);
    }
    for outcome in ["served", "stepped_down", "fatal"] {
        metrics::counter!(FENCES, "outcome" => outcome).increment(0);
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    metrics::gauge!(LEASES_MAX).set(leases_max as f64);
    serving(false);
}

pub fn fence_retry(class: &'static str) {
    metrics::counter!(FENCE_RETRIES, "class" => class).increment(1);
}

pub fn fence_done(outcome: &'static str) {
    metrics::counter!(FENCES, "outcome" => outcome).increment(1);
}

pub const FENCE_SECONDS: &str = "tso_fence_seconds";
pub const LAST_FENCE_SECONDS: &str = "tso_last_fence_seconds";

/// A fence that ended serving took `took`, from the election seen to the first grant possible
/// (its retries included).
pub fn fence_took(took: Duration) {
    metrics::histogram!(FENCE_SECONDS).record(took.as_secs_f64());
    metrics::gauge!(LAST_FENCE_SECONDS).set(took.as_secs_f64());
}

/// One extension (or a fence) made `high_water_ms` durable at wall-clock `now_ms`.
pub fn extension_done(took: Duration, high_water_ms: u64, now_ms: u64) {
    metrics::counter!(EXTENSIONS).increment(1);
    metrics::histogram!(EXTENSION_SECONDS).record(took.as_secs_f64());
    metrics::gauge!(HIGH_WATER_MS).set(high_water_ms as f64);
    metrics::gauge!(CLOCK_AHEAD_MS).set(high_water_ms as f64 - now_ms as f64);
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

/// Whether this node serves. The gauges of a serving term's state drop to 0 when it stops:
/// only the serving node reports them.
pub fn serving(on: bool) {
    metrics::gauge!(SERVING).set(if on { 1.0 } else { 0.0 });
    if !on {
        metrics::gauge!(CLOCK_AHEAD_MS).set(0.0);
        seq_keys(0);
        stamping_leases(0, 0);
    }
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

pub const BUILD_INFO: &str = "tso_build_info";
pub const CLOCK_AHEAD_MS: &str = "tso_clock_ahead_ms";
pub const SEQ_KEYS: &str = "tso_seq_keys";
pub const SEQ_KEYS_MAX: &str = "tso_seq_keys_max";
pub const LEASES_LIVE: &str = "tso_stamping_leases_live";
pub const LEASES_HELD: &str = "tso_stamping_leases_held";
pub const LEASES_MAX: &str = "tso_stamping_leases_max";

/// A new term serves: the caps its writers enforce.
pub fn term_started(seq_keys_max: usize, leases_max: usize) {
    metrics::gauge!(SEQ_KEYS_MAX).set(seq_keys_max as f64);
    metrics::gauge!(LEASES_MAX).set(leases_max as f64);
}

/// The serving term's sequence keys after one of its writes.
pub fn seq_keys(keys: usize) {
    metrics::gauge!(SEQ_KEYS).set(keys as f64);
}

/// The serving term's stamping leases: `live` ones bind the frontier, `held` ones (live,
/// superseded, or expired but not yet forgotten) count against the cap.
pub fn stamping_leases(live: usize, held: usize) {
    metrics::gauge!(LEASES_LIVE).set(live as f64);
    metrics::gauge!(LEASES_HELD).set(held as f64);
}

pub const RAFT_LEADER_ID: &str = "tso_raft_leader_id";
pub const RAFT_LAST_LOG_INDEX: &str = "tso_raft_last_log_index";
pub const RAFT_APPLIED_INDEX: &str = "tso_raft_applied_index";
pub const RAFT_REPLICATION_LAG: &str = "tso_raft_replication_lag_entries";

#[cfg(feature = "raft")]
/// What the raft progress gauges last showed: an update sets only what changed, and once this
/// node stops leading the lag of every peer it reported drops to 0.
#[derive(Debug, Default)]
pub struct RaftGauges {
    indexes: Option<(u64, u64, u64)>,
    lags: std::collections::BTreeMap<u64, u64>,
}

#[cfg(feature = "raft")]
impl RaftGauges {
    /// Mirrors one openraft metrics snapshot: the leader this node knows (0: none), its last
    /// log and applied indexes, and on a leader each peer's lag (its last log index minus the
    /// peer's matched index; every entry while nothing matched yet). The first snapshot also
    /// registers the raft counters at 0.
    pub fn update<N: openraft::Node>(&mut self, m: &openraft::RaftMetrics<u64, N>) {
        let last_log = m.last_log_index.unwrap_or(0);
        let indexes = (
            m.current_leader.unwrap_or(0),
            last_log,
            m.last_applied.map_or(0, |l| l.index),
        );
        if self.indexes.is_none() {
            for outcome in ["ok", "failed"] {
                metrics::counter!(RAFT_HANDOFFS, "outcome" => outcome).increment(0);
                metrics::counter!(LEADER_LEASE_RENEWALS, "outcome" => outcome).increment(0);
            }
        }
        if self.indexes != Some(indexes) {
            self.indexes = Some(indexes);
            metrics::gauge!(RAFT_LEADER_ID).set(indexes.0 as f64);
            metrics::gauge!(RAFT_LAST_LOG_INDEX).set(indexes.1 as f64);
            metrics::gauge!(RAFT_APPLIED_INDEX).set(indexes.2 as f64);
        }
        let mut lags: std::collections::BTreeMap<u64, u64> =
            self.lags.keys().map(|p| (*p, 0)).collect();
        for (peer, matched) in m.replication.iter().flatten() {
            if *peer != m.id {
                let matched = matched.map_or(0, |l| l.index);
                lags.insert(*peer, last_log.saturating_sub(matched));
            }
        }
        for (peer, lag) in &lags {
            if self.lags.get(peer) != Some(lag) {
                metrics::gauge!(RAFT_REPLICATION_LAG, "peer" => peer.to_string()).set(*lag as f64);
            }
        }
        self.lags = lags;
    }
}

#[cfg(all(test, feature = "raft"))]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use metrics::{Counter, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, SharedString, Unit};
    use openraft::testing::log_id;

    use super::*;

    type Seen = Arc<Mutex<BTreeMap<String, f64>>>;

    /// Records the gauges set through it by name and labels (`name{k=v}`); the rest is dropped.
    #[derive(Default)]
    struct Gauges(Seen);

    struct OneGauge(Seen, String);

    impl GaugeFn for OneGauge {
        fn increment(&self, value: f64) {
            *self.0.lock().unwrap().entry(self.1.clone()).or_default() += value;
        }

        fn decrement(&self, value: f64) {
            self.increment(-value);
        }

        fn set(&self, value: f64) {
            self.0.lock().unwrap().insert(self.1.clone(), value);
        }
    }

    impl metrics::Recorder for Gauges {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }

        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let name = match labels.is_empty() {
                true => key.name().to_string(),
                false => format!("{}{{{}}}", key.name(), labels.join(",")),
            };
            Gauge::from_arc(Arc::new(OneGauge(Arc::clone(&self.0), name)))
        }

        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    /// A leader reports each follower's lag; once it follows, every lag it reported reads 0,
    /// and stepping down zeroes the serving term's lease and key gauges.
    #[test]
    fn leader_only_gauges_read_zero_once_the_node_stops_leading() {
        let recorder = Gauges::default();
        let seen = Arc::clone(&recorder.0);
        let get = |name: &str| seen.lock().unwrap().get(name).copied();
        let mut gauges = RaftGauges::default();
        let mut m = openraft::RaftMetrics::<u64, openraft::BasicNode>::new_initial(1);
        m.current_leader = Some(1);
        m.last_log_index = Some(10);
        m.last_applied = Some(log_id(1, 1, 9));
        let matched = [
            (1, Some(log_id(1, 1, 10))),
            (2, Some(log_id(1, 1, 4))),
            (3, None),
        ];
        m.replication = Some(matched.into_iter().collect());
        metrics::with_local_recorder(&recorder, || {
            gauges.update(&m);
            seq_keys(7);
            stamping_leases(3, 5);
        });
        assert_eq!(get(RAFT_LEADER_ID), Some(1.0));
        assert_eq!(get(RAFT_LAST_LOG_INDEX), Some(10.0));
        assert_eq!(get(RAFT_APPLIED_INDEX), Some(9.0));
        assert_eq!(get("tso_raft_replication_lag_entries{peer=1}"), None);
        assert_eq!(get("tso_raft_replication_lag_entries{peer=2}"), Some(6.0));
        assert_eq!(get("tso_raft_replication_lag_entries{peer=3}"), Some(10.0));
        assert_eq!(get(LEASES_HELD), Some(5.0));

        m.current_leader = Some(2);
        m.replication = None;
        metrics::with_local_recorder(&recorder, || {
            gauges.update(&m);
            serving(false);
        });
        assert_eq!(get(RAFT_LEADER_ID), Some(2.0));
        assert_eq!(get("tso_raft_replication_lag_entries{peer=2}"), Some(0.0));
        assert_eq!(get("tso_raft_replication_lag_entries{peer=3}"), Some(0.0));
        for name in [SEQ_KEYS, LEASES_LIVE, LEASES_HELD, CLOCK_AHEAD_MS, SERVING] {
            assert_eq!(get(name), Some(0.0), "{name}");
        }
    }
}
