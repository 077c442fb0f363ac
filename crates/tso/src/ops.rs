//! `tso status` and `tso admin raise`: the operator calls of the client port (`tso.ops.v1`), on
//! every backend.
//!
//! `status` asks every endpoint at once, prints one row per node and a verdict in words, and
//! exits 0 when the cluster is healthy, 1 when it is degraded (a node unreachable or far
//! behind, no leader, a node stopped for good) and 2 when no node answers.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Args;
use prost::Message;
use tonic::transport::{Channel, ClientTlsConfig};
use tso_core::Epoch;
use tso_proto::tso::ops_v1 as pb;
use tso_proto::tso::ops_v1::ops_client::OpsClient;

use crate::tls::ClientTlsArgs;

/// How long one node may take to answer the status call (it answers from memory).
const STATUS_TIMEOUT: Duration = Duration::from_secs(3);
/// Redirects a raise follows (a stale hint after an election, then the leader).
const REDIRECTS_MAX: usize = 4;

/// Exit codes of `tso status`.
pub const HEALTHY: u8 = 0;
pub const DEGRADED: u8 = 1;
pub const DOWN: u8 = 2;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Every node's client address, comma-separated (`host:port`, `http://...`, `https://...`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:50551",
        env = "TSO_ENDPOINTS"
    )]
    pub endpoints: Vec<String>,
    /// Print the nodes and the verdict as one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A raft member whose log is more entries than this behind the leader's makes the cluster
    /// degraded.
    #[arg(long, default_value_t = 1000)]
    pub max_lag: u64,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

#[derive(Debug, Args)]
pub struct RaiseArgs {
    /// Every later timestamp's physical part is above this millisecond (Unix ms; `tso parse
    /// --at 2026-12-01T00:00:00Z` prints one), e.g. the last one the oracle you move from
    /// issued.
    #[arg(long)]
    pub to_physical_ms: u64,
    /// Refuse a target further than this ahead of the leader's clock (a typo guard).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_ahead: Duration,
    /// The oracle's client addresses, comma-separated; the raise goes to the leader.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:50551",
        env = "TSO_ENDPOINTS"
    )]
    pub endpoints: Vec<String>,
}

fn tls_config(tls: &ClientTlsArgs) -> anyhow::Result<Option<ClientTlsConfig>> {
    Ok(tls.load()?.map(|t| t.tonic_config()))
}

async fn connect(
    tls: Option<&ClientTlsConfig>,
    endpoint: &str,
) -> anyhow::Result<OpsClient<Channel>> {
    let uri = match (endpoint.contains("://"), tls) {
        (true, _) => endpoint.to_owned(),
        (false, Some(_)) => format!("https://{endpoint}"),
        (false, None) => format!("http://{endpoint}"),
    };
    let mut channel = Channel::from_shared(uri.clone())
        .with_context(|| format!("{endpoint:?} is not a server address (host:port)"))?
        .connect_timeout(STATUS_TIMEOUT)
        .timeout(STATUS_TIMEOUT);
    if uri.starts_with("https://") {
        let tls = tls.with_context(|| {
            format!("{endpoint} is an https address: give --tls-ca (and --tls-cert, --tls-key)")
        })?;
        channel = channel
            .tls_config(tls.clone())
            .with_context(|| format!("the TLS configuration for {endpoint}"))?;
    }
    let channel = channel.connect().await.map_err(|e| {
        // The innermost cause ("Connection refused (os error 111)"), not tonic's wrapper.
        let mut cause: &dyn std::error::Error = &e;
        while let Some(inner) = cause.source() {
            cause = inner;
        }
        anyhow::anyhow!("{cause}")
    })?;
    Ok(OpsClient::new(channel))
}

/// One node's answer, or why there was none.
struct Row {
    endpoint: String,
    answer: Result<pb::NodeStatus, String>,
    /// This machine's clock when the answer arrived (Unix ms).
    local_ms: u64,
}

fn local_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A node's clock minus this machine's when its answer arrived (ms; within a round trip).
fn skew_ms(s: &pb::NodeStatus, local_ms: u64) -> i64 {
    s.clock_unix_ms as i64 - local_ms as i64
}

/// How far apart two clocks may be before `tso status` mentions it.
const SKEW_NOTED_MS: i64 = 1000;

async fn ask(tls: Option<&ClientTlsConfig>, endpoint: &str) -> Row {
    let answer = async {
        let mut client = connect(tls, endpoint).await.map_err(|e| e.to_string())?;
        client
            .get_status(pb::GetStatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| match s.code() {
                tonic::Code::Unimplemented => {
                    "answers, but has no status call (an older tso, or not tso)".to_string()
                }
                _ => s.message().to_string(),
            })
    };
    let answer = tokio::time::timeout(STATUS_TIMEOUT * 2, answer)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", STATUS_TIMEOUT * 2)));
    Row {
        endpoint: endpoint.to_string(),
        answer,
        local_ms: local_now_ms(),
    }
}

/// The cluster's state in words.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub code: u8,
    pub problems: Vec<String>,
    pub summary: String,
}

fn epoch_of(hi: u64, lo: u64) -> Epoch {
    Epoch::from_parts(hi, lo)
}

fn node_name(s: &pb::NodeStatus, endpoint: &str) -> String {
    if s.node_id != 0 {
        format!("node {}", s.node_id)
    } else {
        format!("the node at {endpoint}")
    }
}

/// `4812` as `4 812`.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

fn seconds(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// Judges the answers: healthy, degraded (and why), or down.
fn judge(rows: &[Row], max_lag: u64) -> Verdict {
    let answered: Vec<(&str, &pb::NodeStatus)> = rows
        .iter()
        .filter_map(|r| r.answer.as_ref().ok().map(|s| (r.endpoint.as_str(), s)))
        .collect();
    if answered.is_empty() {
        return Verdict {
            code: DOWN,
            problems: vec![format!("none of the {} node(s) answers", rows.len())],
            summary: "down".into(),
        };
    }
    let mut problems = Vec::new();
    for row in rows {
        if let Err(why) = &row.answer {
            problems.push(format!(
                "the node at {} is unreachable ({why})",
                row.endpoint
            ));
        }
    }
    for (endpoint, s) in &answered {
        if s.role == pb::Role::Failed as i32 {
            problems.push(format!(
                "{} stopped serving for good: {}",
                node_name(s, endpoint),
                s.failure
            ));
        }
    }
    let leaders: Vec<&(&str, &pb::NodeStatus)> = answered
        .iter()
        .filter(|(_, s)| s.role == pb::Role::Leader as i32)
        .collect();
    match leaders.len() {
        0 => {
            let leaderless = answered
                .iter()
                .map(|(_, s)| s.leaderless_ms)
                .min()
                .unwrap_or(0);
            if leaderless > 0 {
                problems.push(format!("no leader for {}", seconds(leaderless)));
            } else {
                let named: Vec<&str> = answered
                    .iter()
                    .map(|(_, s)| s.leader_endpoint.as_str())
                    .filter(|e| !e.is_empty())
                    .collect();
                problems.push(format!(
                    "no node that answers leads (they name {})",
                    if named.is_empty() {
                        "none".into()
                    } else {
                        named.join(", ")
                    }
                ));
            }
        }
        1 => {}
        n => problems.push(format!(
            "{n} nodes say they lead (epochs {}): one was just deposed, or is cut off",
            leaders
                .iter()
                .map(|(_, s)| epoch_of(s.epoch_hi, s.epoch_lo).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
    // Raft lag, from the newest leader's replication view.
    let newest = leaders
        .iter()
        .max_by_key(|(_, s)| epoch_of(s.epoch_hi, s.epoch_lo));
    if let Some((_, leader)) = newest
        && let Some(raft) = &leader.raft
    {
        for peer in &raft.peers {
            if peer.lag_entries > max_lag {
                problems.push(format!(
                    "node {} is {} entries behind",
                    peer.node_id,
                    grouped(peer.lag_entries)
                ));
            }
        }
    }
    let summary = match newest {
        Some((endpoint, s)) => format!(
            "{} leads in epoch {}; {} of {} node(s) answer",
            node_name(s, endpoint),
            epoch_of(s.epoch_hi, s.epoch_lo),
            answered.len(),
            rows.len()
        ),
        None => format!("{} of {} node(s) answer", answered.len(), rows.len()),
    };
    Verdict {
        code: if problems.is_empty() {
            HEALTHY
        } else {
            DEGRADED
        },
        problems,
        summary,
    }
}

fn role_name(role: i32) -> &'static str {
    match pb::Role::try_from(role) {
        Ok(pb::Role::Leader) => "leader",
        Ok(pb::Role::Follower) => "follower",
        Ok(pb::Role::Failed) => "failed",
        _ => "unknown",
    }
}

/// Unix ms as RFC 3339 UTC (second precision).
fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn print_table(rows: &[Row]) {
    let header = [
        "NODE",
        "ENDPOINT",
        "ROLE",
        "EPOCH",
        "LEADER",
        "SERVING SINCE",
        "HIGH-WATER AHEAD",
        "FENCE",
        "RAFT TERM/COMMIT/APPLIED",
        "LAG",
        "LEASES",
        "SEQ KEYS",
        "VERSION",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    // The leader's view of each member's lag.
    let lags: std::collections::HashMap<u64, u64> = rows
        .iter()
        .filter_map(|r| r.answer.as_ref().ok())
        .filter(|s| s.role == pb::Role::Leader as i32)
        .filter_map(|s| s.raft.as_ref())
        .flat_map(|r| r.peers.iter().map(|p| (p.node_id, p.lag_entries)))
        .collect();
    for row in rows {
        let s = match &row.answer {
            Ok(s) => s,
            Err(why) => {
                let mut cells = vec![
                    "?".to_string(),
                    row.endpoint.clone(),
                    format!("unreachable: {why}"),
                ];
                cells.resize(header.len(), String::new());
                table.push(cells);
                continue;
            }
        };
        let leads = s.role == pb::Role::Leader as i32;
        let dash = || "-".to_string();
        let raft = s.raft.as_ref();
        table.push(vec![
            if s.node_id == 0 {
                dash()
            } else {
                s.node_id.to_string()
            },
            row.endpoint.clone(),
            role_name(s.role).to_string(),
            if leads {
                epoch_of(s.epoch_hi, s.epoch_lo).to_string()
            } else {
                dash()
            },
            if leads {
                "(itself)".into()
            } else if s.leader_endpoint.is_empty() {
                if s.leaderless_ms > 0 {
                    format!("none for {}", seconds(s.leaderless_ms))
                } else {
                    dash()
                }
            } else {
                s.leader_endpoint.clone()
            },
            if leads {
                rfc3339(s.serving_since_unix_ms)
            } else {
                dash()
            },
            if leads {
                format!(
                    "{:+.1} s",
                    (s.high_water_ms as f64 - row.local_ms as f64) / 1000.0
                )
            } else {
                dash()
            },
            if leads {
                format!("{} ms", s.last_fence_ms)
            } else {
                dash()
            },
            raft.map_or_else(dash, |r| {
                format!("{}/{}/{}", r.term, r.committed_index, r.applied_index)
            }),
            match (raft, leads) {
                (Some(_), true) => "0".into(),
                (Some(_), false) => lags.get(&s.node_id).map_or_else(dash, |l| grouped(*l)),
                (None, _) => dash(),
            },
            if leads && s.leases_loaded {
                s.stamping_leases.to_string()
            } else {
                dash()
            },
            if leads && s.sequences_loaded {
                s.sequence_keys.to_string()
            } else {
                dash()
            },
            s.version.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn print_json(rows: &[Row], verdict: &Verdict) {
    let nodes: Vec<String> = rows
        .iter()
        .map(|row| match &row.answer {
            Err(why) => format!(
                "{{\"endpoint\":{},\"reachable\":false,\"error\":{}}}",
                json_string(&row.endpoint),
                json_string(why)
            ),
            Ok(s) => {
                let raft = s.raft.as_ref().map_or_else(
                    || "null".to_string(),
                    |r| {
                        let peers: Vec<String> = r
                            .peers
                            .iter()
                            .map(|p| {
                                format!(
                                    "{{\"node_id\":{},\"matched_index\":{},\"lag_entries\":{}}}",
                                    p.node_id, p.matched_index, p.lag_entries
                                )
                            })
                            .collect();
                        format!(
                            "{{\"term\":{},\"leader_id\":{},\"last_log_index\":{},\"committed_index\":{},\"applied_index\":{},\"voters\":{:?},\"learners\":{:?},\"peers\":[{}]}}",
                            r.term, r.leader_id, r.last_log_index, r.committed_index, r.applied_index, r.voters, r.learners, peers.join(",")
                        )
                    },
                );
                format!(
                    "{{\"endpoint\":{},\"reachable\":true,\"node_id\":{},\"backend\":{},\"role\":{},\"epoch\":{},\"leader_endpoint\":{},\"leader_epoch\":{},\"serving_since_unix_ms\":{},\"high_water_ms\":{},\"clock_unix_ms\":{},\"clock_skew_ms\":{},\"high_water_ahead_ms\":{},\"last_fence_ms\":{},\"leaderless_ms\":{},\"failure\":{},\"stamping_leases\":{},\"sequence_keys\":{},\"version\":{},\"raft\":{}}}",
                    json_string(&row.endpoint),
                    s.node_id,
                    json_string(&s.backend),
                    json_string(role_name(s.role)),
                    json_string(&epoch_of(s.epoch_hi, s.epoch_lo).to_string()),
                    json_string(&s.leader_endpoint),
                    json_string(&epoch_of(s.leader_epoch_hi, s.leader_epoch_lo).to_string()),
                    s.serving_since_unix_ms,
                    s.high_water_ms,
                    s.clock_unix_ms,
                    skew_ms(s, row.local_ms),
                    if s.role == pb::Role::Leader as i32 { s.high_water_ms as i64 - row.local_ms as i64 } else { 0 },
                    s.last_fence_ms,
                    s.leaderless_ms,
                    json_string(&s.failure),
                    if s.leases_loaded { s.stamping_leases.to_string() } else { "null".into() },
                    if s.sequences_loaded { s.sequence_keys.to_string() } else { "null".into() },
                    json_string(&s.version),
                    raft
                )
            }
        })
        .collect();
    let state = match verdict.code {
        HEALTHY => "healthy",
        DEGRADED => "degraded",
        _ => "down",
    };
    let problems: Vec<String> = verdict.problems.iter().map(|p| json_string(p)).collect();
    println!(
        "{{\"state\":{},\"summary\":{},\"problems\":[{}],\"nodes\":[{}]}}",
        json_string(state),
        json_string(&verdict.summary),
        problems.join(","),
        nodes.join(",")
    );
}

/// `tso status`: returns the exit code.
pub fn status(args: StatusArgs) -> anyhow::Result<u8> {
    let runtime = runtime()?;
    let tls = tls_config(&args.tls)?;
    let rows = runtime.block_on(async {
        let asks = args.endpoints.iter().map(|e| ask(tls.as_ref(), e));
        futures_util::future::join_all(asks).await
    });
    let verdict = judge(&rows, args.max_lag);
    if args.json {
        print_json(&rows, &verdict);
    } else {
        print_table(&rows);
        for row in &rows {
            if let Ok(s) = &row.answer {
                let skew = skew_ms(s, row.local_ms);
                if skew.abs() > SKEW_NOTED_MS {
                    println!(
                        "note: the clock of {} is {} {} this machine's",
                        node_name(s, &row.endpoint),
                        seconds(skew.unsigned_abs()),
                        if skew > 0 { "ahead of" } else { "behind" }
                    );
                }
            }
        }
        match verdict.code {
            HEALTHY => println!("healthy: {}", verdict.summary),
            DEGRADED => println!(
                "degraded: {} ({})",
                verdict.problems.join("; "),
                verdict.summary
            ),
            _ => println!("down: {}", verdict.problems.join("; ")),
        }
    }
    Ok(verdict.code)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The leader named by a "not leader" refusal's hint.
fn hinted_leader(status: &tonic::Status) -> Option<String> {
    let bytes = status
        .metadata()
        .get_bin(tso_proto::LEADER_HINT_KEY)?
        .to_bytes()
        .ok()?;
    let hint = tso_proto::v1::LeaderHint::decode(bytes.as_ref()).ok()?;
    hint.leader_endpoint.filter(|e| !e.is_empty())
}

/// `tso admin raise`: raises the leader's high-water; follows "not leader" hints.
pub fn raise(args: RaiseArgs, tls: &ClientTlsArgs) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let tls = tls_config(tls)?;
    let max_ahead_ms = args.max_ahead.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
    let request = pb::RaiseHighWaterRequest {
        to_physical_ms: args.to_physical_ms,
        max_ahead_ms,
    };
    runtime.block_on(async {
        let mut queue: Vec<String> = args.endpoints.clone();
        let mut redirects = 0;
        let mut last_error = None;
        while let Some(endpoint) = queue.first().cloned() {
            queue.remove(0);
            let mut client = match connect(tls.as_ref(), &endpoint).await {
                Ok(c) => c,
                Err(e) => {
                    last_error = Some(format!("{endpoint}: {e}"));
                    continue;
                }
            };
            match client.raise_high_water(request).await {
                Ok(reply) => {
                    let r = reply.into_inner();
                    println!(
                        "raised: every later timestamp is above {} ms ({}); high-water {} ms, epoch {}, at {endpoint}",
                        r.above_physical_ms,
                        rfc3339(r.above_physical_ms),
                        r.high_water_ms,
                        epoch_of(r.epoch_hi, r.epoch_lo)
                    );
                    return Ok(());
                }
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    if let Some(leader) = hinted_leader(&status)
                        && redirects < REDIRECTS_MAX
                    {
                        redirects += 1;
                        queue.insert(0, leader);
                    }
                    last_error = Some(format!("{endpoint}: {}", status.message()));
                }
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument | tonic::Code::OutOfRange
                    ) =>
                {
                    bail!("refused by {endpoint}: {}", status.message());
                }
                Err(status) => last_error = Some(format!("{endpoint}: {}", status.message())),
            }
        }
        bail!(
            "no leader raised the high-water: {}",
            last_error.unwrap_or_else(|| "no endpoint given".into())
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64, role: pb::Role) -> pb::NodeStatus {
        pb::NodeStatus {
            node_id: id,
            role: role as i32,
            epoch_hi: if role == pb::Role::Leader { 5 } else { 0 },
            epoch_lo: if role == pb::Role::Leader { id } else { 0 },
            ..Default::default()
        }
    }

    fn row(endpoint: &str, answer: Result<pb::NodeStatus, &str>) -> Row {
        Row {
            endpoint: endpoint.into(),
            answer: answer.map_err(str::to_string),
            local_ms: 0,
        }
    }

    #[test]
    fn the_verdict_says_why_in_words() {
        let healthy = [
            row("a", Ok(node(1, pb::Role::Leader))),
            row("b", Ok(node(2, pb::Role::Follower))),
        ];
        let v = judge(&healthy, 1000);
        assert_eq!(v.code, HEALTHY, "{v:?}");
        assert!(v.summary.contains("node 1 leads in epoch 5.1"), "{v:?}");

        let unreachable = [
            row("a", Ok(node(1, pb::Role::Leader))),
            row("b", Err("connection refused")),
        ];
        let v = judge(&unreachable, 1000);
        assert_eq!(v.code, DEGRADED);
        assert_eq!(
            v.problems,
            ["the node at b is unreachable (connection refused)"]
        );

        let mut lost = node(2, pb::Role::Follower);
        lost.leaderless_ms = 3_200;
        let v = judge(&[row("b", Ok(lost)), row("c", Err("x"))], 1000);
        assert_eq!(v.code, DEGRADED);
        assert!(
            v.problems.contains(&"no leader for 3.2 s".to_string()),
            "{v:?}"
        );

        let mut leader = node(1, pb::Role::Leader);
        leader.raft = Some(pb::RaftStatus {
            peers: vec![pb::PeerProgress {
                node_id: 3,
                matched_index: 10,
                lag_entries: 4_812,
            }],
            ..Default::default()
        });
        let v = judge(&[row("a", Ok(leader))], 1000);
        assert_eq!(v.problems, ["node 3 is 4 812 entries behind"]);

        let v = judge(&[row("a", Err("x")), row("b", Err("y"))], 1000);
        assert_eq!(v.code, DOWN);
    }

    #[test]
    fn numbers_are_grouped_by_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(812), "812");
        assert_eq!(grouped(4812), "4 812");
        assert_eq!(grouped(1_234_567), "1 234 567");
    }
}
