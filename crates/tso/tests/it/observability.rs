//! The dashboard (`deploy/grafana/tso.json`) and the alert rules
//! (`deploy/prometheus/tso-alerts.yml`) against what the server exports: every metric either
//! names is on the `/metrics` of a live three-node raft cluster that granted timestamps, a
//! sequence block and a stamping lease; the rules pass `promtool check rules` and their unit
//! tests (`promtool test rules`); the dashboard is valid JSON whose every panel queries.
//!
//! `promtool` comes with Debian's `prometheus` package, which `scripts/test` installs; without
//! it the rules tests fail with a message, never skip.

use crate::common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::raft::*;
use common::*;
use tso_proto::v1::{AcquireLeaseRequest, GetSafeFrontierRequest, GetSeqRequest, GetTsRequest};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

fn read(relative: &str) -> String {
    let path = workspace_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Every `tso_...` metric name in `text`, with the `_bucket`/`_sum`/`_count` suffix of a
/// histogram or summary series taken off: the family is what the server must export.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let is_name = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let mut at = 0;
    while let Some(found) = text[at..].find("tso_") {
        let start = at + found;
        let mut end = start + "tso_".len();
        while end < bytes.len() && is_name(bytes[end]) {
            end += 1;
        }
        at = end;
        if start > 0 && (is_name(bytes[start - 1]) || bytes[start - 1].is_ascii_uppercase()) {
            continue;
        }
        let name = &text[start..end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        names.insert(family.to_string());
    }
    names
}

/// The PromQL of every target of every panel of the dashboard (rows included, if collapsed).
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_string();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_string()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The `expr:` of every rule of the rules file, single-line or a `|`/`>` block.
fn rule_exprs(rules: &str) -> Vec<String> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if !value.starts_with('|') && !value.starts_with('>') {
            exprs.push(value.to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let block = lines[i + 1..]
            .iter()
            .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
            .map(|l| l.trim())
            .collect::<Vec<_>>();
        exprs.push(block.join(" "));
    }
    exprs
}

/// Every metric family the dashboard's queries and the alert rules' expressions name.
fn referenced_metrics() -> BTreeSet<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/tso.json")).expect("the dashboard's JSON");
    let mut names = BTreeSet::new();
    for (_, expr) in dashboard_exprs(&dashboard) {
        names.extend(metric_names(&expr));
    }
    for expr in rule_exprs(&read("deploy/prometheus/tso-alerts.yml")) {
        names.extend(metric_names(&expr));
    }
    names
}

/// The metric families of one Prometheus text scrape.
fn scraped_families(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .flat_map(metric_names)
        .collect()
}

/// The value of the sample `series` (name and labels exactly as exported), if present.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// `GET /metrics` on `addr`: the body of a 200, `None` otherwise.
fn scrape(addr: &str) -> Option<String> {
    let addr = addr.parse().unwrap();
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let head = "GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n";
    stream.write_all(head.as_bytes()).ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// Polls every node until one grants; returns its index.
async fn find_leader(nodes: &[RaftNode]) -> usize {
    let wait = async {
        let mut clients: Vec<_> = nodes.iter().map(RaftNode::connect).collect();
        loop {
            for (i, client) in clients.iter_mut().enumerate() {
                if client.get_ts(GetTsRequest { count: 1 }).await.is_ok() {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, wait)
        .await
        .expect("no node granted within the hang guard")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_and_the_alerts_is_exported_by_a_live_raft_cluster() {
    let _turn = crate::common::topic(module_path!());
    let wanted = referenced_metrics();
    eprintln!("metrics the dashboard and the alerts name: {wanted:?}");
    assert!(
        wanted.len() >= 20 && wanted.contains("tso_raft_replication_lag_entries"),
        "the names found in the dashboard and the rules look wrong: {wanted:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let nodes = raft_nodes(3);
    let members = members(&nodes);
    let metrics: Vec<String> = nodes
        .iter()
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let _servers: Vec<Server> = nodes
        .iter()
        .zip(&metrics)
        .map(|(n, m)| n.start_with(dir.path(), Some(&members), &["--metrics-listen", m]))
        .collect();

    // Timestamps, a sequence block and a stamping lease through the leader; a retry finds the
    // leader again should an election move it meanwhile.
    let mut leader = find_leader(&nodes).await;
    let calls = async {
        loop {
            let mut client = nodes[leader].connect();
            let done = async {
                for _ in 0..20 {
                    client.get_ts(GetTsRequest { count: 10 }).await?;
                }
                let seq = GetSeqRequest {
                    key: b"observability".to_vec(),
                    count: 5,
                };
                client.get_seq(seq).await?;
                let lease = AcquireLeaseRequest {
                    holder: b"dashboard-test".to_vec(),
                    holder_epoch: 1,
                    ttl_ms: 120_000,
                };
                client.acquire_lease(lease).await?;
                client.get_safe_frontier(GetSafeFrontierRequest {}).await?;
                Ok::<_, tonic::Status>(())
            };
            match done.await {
                Ok(()) => return,
                Err(status) => {
                    eprintln!(
                        "node {} refused ({status}); finding the leader",
                        nodes[leader].id
                    );
                    leader = find_leader(&nodes).await;
                }
            }
        }
    };
    tokio::time::timeout(HANG_GUARD, calls)
        .await
        .expect("the calls did not succeed within the hang guard");

    // The leader's scrape names every family; followers are not serving and hold no lease or
    // key gauges. Polled: the leader's replication lag appears once its followers acknowledge.
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let bodies: Vec<Option<String>> = metrics.iter().map(|m| scrape(m)).collect();
        let serving: Vec<usize> = (0..nodes.len())
            .filter(|i| {
                let body = bodies[*i].as_deref().unwrap_or("");
                sample(body, "tso_serving") == Some(1.0)
            })
            .collect();
        let missing: BTreeSet<String> = match serving.as_slice() {
            [i] => {
                let families = scraped_families(bodies[*i].as_deref().unwrap_or(""));
                wanted.difference(&families).cloned().collect()
            }
            _ => wanted.clone(),
        };
        let checks = match serving.as_slice() {
            [i] => {
                let leader = bodies[*i].as_deref().unwrap_or("");
                let followers_idle = (0..nodes.len()).filter(|j| j != i).all(|j| {
                    let body = bodies[j].as_deref().unwrap_or("");
                    sample(body, "tso_serving") == Some(0.0)
                        && sample(body, "tso_stamping_leases_live") == Some(0.0)
                        && sample(body, "tso_seq_keys") == Some(0.0)
                });
                let peers_reported = (0..nodes.len()).filter(|j| j != i).all(|j| {
                    let series = format!(
                        "tso_raft_replication_lag_entries{{peer=\"{}\"}}",
                        nodes[j].id
                    );
                    sample(leader, &series).is_some()
                });
                sample(leader, "tso_stamping_leases_live") == Some(1.0)
                    && sample(leader, "tso_stamping_leases_held") == Some(1.0)
                    && sample(leader, "tso_stamping_leases_max").is_some_and(|m| m > 1.0)
                    && sample(leader, "tso_seq_keys") == Some(1.0)
                    && sample(leader, "tso_seq_keys_max").is_some_and(|m| m > 1.0)
                    && sample(leader, "tso_raft_leader_id") == Some(nodes[*i].id as f64)
                    && followers_idle
                    && peers_reported
            }
            _ => false,
        };
        if missing.is_empty() && checks {
            return;
        }
        if Instant::now() >= deadline {
            let mut last = vec![format!("serving nodes {serving:?}; missing {missing:?}")];
            last.extend(bodies.into_iter().map(|b| b.unwrap_or_default()));
            panic!(
                "the cluster never exported what the dashboard and the alerts need: {}",
                last.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `promtool` with `args`, run in `deploy/prometheus`; fails the test if it is missing.
fn promtool(args: &[&str]) -> Output {
    let found = Command::new("promtool").arg("--version").output();
    assert!(
        found.as_ref().is_ok_and(|out| out.status.success()),
        "promtool is missing or broken ({found:?}): run scripts/test, which installs Debian's \
         prometheus package (it ships promtool), to check the alert rules"
    );
    Command::new("promtool")
        .args(args)
        .current_dir(workspace_root().join("deploy/prometheus"))
        .output()
        .expect("running promtool")
}

fn explain(output: &Output) -> String {
    format!(
        "{}\n--- stdout:\n{}\n--- stderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let _turn = crate::common::topic(module_path!());
    let check = promtool(&["check", "rules", "tso-alerts.yml"]);
    assert!(check.status.success(), "{}", explain(&check));
    let test = promtool(&["test", "rules", "tso-alerts.test.yml"]);
    assert!(test.status.success(), "{}", explain(&test));

    // Every alert says how bad it is and what it means, in words.
    let rules = read("deploy/prometheus/tso-alerts.yml");
    let alerts = rules.matches("- alert: ").count();
    assert!(alerts >= 6, "{alerts} alerts");
    for field in ["severity: ", "summary: ", "description: "] {
        assert_eq!(
            rules.matches(field).count(),
            alerts,
            "each alert needs one {field}"
        );
    }
    for alert in [
        "TsoNoLeader",
        "TsoFenceFailing",
        "TsoWindowExhausted",
        "TsoExtensionSlow",
        "TsoNodeBehind",
        "TsoStampingLeasesNearCap",
    ] {
        assert!(
            rules.contains(&format!("- alert: {alert}\n")),
            "{alert} is missing"
        );
    }
}

#[test]
fn the_dashboard_is_valid_json_and_every_panel_queries() {
    let _turn = crate::common::topic(module_path!());
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/tso.json")).expect("the dashboard's JSON");
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("template variables")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for variable in ["datasource", "job", "instance"] {
        assert!(variables.contains(&variable), "{variables:?}");
    }

    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut queried = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(panel["id"].as_u64()),
            "panel id repeated: {title}"
        );
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().map_or(0, |targets| {
            targets
                .iter()
                .filter(|t| t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()))
                .count()
        });
        assert!(targets > 0, "panel {title:?} queries nothing");
        queried += 1;
    }
    assert!(queried >= 10, "{queried} panels query");
    let exprs = dashboard_exprs(&dashboard);
    for (title, expr) in &exprs {
        assert!(
            expr.matches('(').count() == expr.matches(')').count()
                && expr.matches('{').count() == expr.matches('}').count(),
            "panel {title:?}: unbalanced query {expr}"
        );
    }
}

/// Each panel query, with Grafana's variables filled in, is valid PromQL: promtool parses it as
/// a recording rule.
#[test]
fn the_dashboard_queries_parse_as_promql() {
    let _turn = crate::common::topic(module_path!());
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/tso.json")).expect("the dashboard's JSON");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (title, expr)) in dashboard_exprs(&dashboard).iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*")
            .replace("$job", ".*");
        let quoted = serde_json::to_string(&expr).unwrap();
        rules += &format!(
            "      # {title}\n      - record: dashboard_query_{i}\n        expr: {quoted}\n"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, &rules).unwrap();
    let check = promtool(&["check", "rules", file.to_str().unwrap()]);
    assert!(check.status.success(), "{}\n{rules}", explain(&check));
}

#[test]
fn metric_names_are_found_as_families() {
    let _turn = crate::common::topic(module_path!());
    let expr = "rate(tso_a_sum[1m]) / rate(tso_a_count[1m]) + x_tso_b + tso_c{peer=\"1\"} \
                + histogram_quantile(0.99, tso_d_bucket) and on (instance) tso_serving == 1";
    let names: Vec<String> = metric_names(expr).into_iter().collect();
    assert_eq!(names, ["tso_a", "tso_c", "tso_d", "tso_serving"]);
    assert_eq!(
        rule_exprs(
            "      - alert: A\n        expr: up == 0\n        for: 1m\n        expr: |\n          tso_x\n            > 1\n        labels:\n"
        ),
        ["up == 0", "tso_x > 1"]
    );
    let body = "# TYPE tso_s summary\ntso_s{quantile=\"0.5\"} 1\ntso_s_sum 2\ntso_g 3\n";
    assert_eq!(
        scraped_families(body).into_iter().collect::<Vec<_>>(),
        ["tso_g", "tso_s"]
    );
    assert_eq!(sample(body, "tso_g"), Some(3.0));
    assert_eq!(sample(body, "tso_s{quantile=\"0.5\"}"), Some(1.0));
}
