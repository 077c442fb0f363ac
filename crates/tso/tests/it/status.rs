//! `tso status` and `tso admin raise` as an operator runs them, against real `tso serve`
//! processes: a healthy raft cluster (exit 0, one leader, every node's raft progress), one
//! node killed (the verdict says which node, in words, exit 1), every node down (exit 2); and a
//! raise of the high-water that every later timestamp is above, across a failover.

use std::time::{Duration, Instant};

use crate::common;

use common::raft::{members, raft_nodes};
use common::{Server, last_of, run_tso};

/// Hang guard for what the cluster settles into; never a measure.
const WAIT: Duration = Duration::from_secs(30);

/// Runs `tso status` until `done` accepts its output (hang guard only); returns the last run.
fn status_until(endpoints: &str, done: impl Fn(i32, &str) -> bool) -> (i32, String) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, out, err) = run_tso(&["status", "--endpoints", endpoints]);
        let code = status.code().unwrap_or(-1);
        if done(code, &out) {
            return (code, out);
        }
        assert!(
            Instant::now() < deadline,
            "tso status never settled: exit {code}\n{out}\n{err}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A started 3-node raft cluster, its endpoints joined by commas, and the index of its leader
/// once `tso status` says the cluster is healthy (hang guard only); with that output.
fn healthy_cluster(dir: &std::path::Path) -> ClusterUp {
    let nodes = raft_nodes(3);
    let list = members(&nodes);
    let servers = nodes
        .iter()
        .map(|n| Some(n.start(dir, Some(&list))))
        .collect();
    let endpoints = nodes
        .iter()
        .map(|n| n.endpoint())
        .collect::<Vec<_>>()
        .join(",");
    let (code, out) = status_until(&endpoints, |code, _| code == 0);
    assert_eq!(code, 0, "{out}");
    let leader = nodes
        .iter()
        .position(|n| {
            out.lines()
                .any(|l| l.contains(&n.endpoint()) && l.contains(" leader "))
        })
        .expect("a leader row");
    ClusterUp {
        nodes,
        servers,
        endpoints,
        leader,
        out,
    }
}

struct ClusterUp {
    nodes: Vec<common::raft::RaftNode>,
    servers: Vec<Option<Server>>,
    endpoints: String,
    leader: usize,
    out: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_healthy_degraded_and_down_apart() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let ClusterUp {
        nodes,
        mut servers,
        endpoints,
        leader,
        out,
    } = healthy_cluster(dir.path());

    // Healthy: one leader, the others follow it, every node answers.
    assert!(out.contains("healthy: node"), "{out}");
    assert!(out.contains("3 of 3 node(s) answer"), "{out}");
    assert_eq!(out.matches(" leader ").count(), 1, "{out}");
    assert_eq!(out.matches(" follower ").count(), 2, "{out}");

    // JSON: one document, the same verdict, raft progress of every node.
    let (status, json, _) = run_tso(&["status", "--endpoints", &endpoints, "--json"]);
    assert_eq!(status.code(), Some(0), "{json}");
    let doc: serde_json::Value = serde_json::from_str(&json).expect("one JSON document");
    assert_eq!(doc["state"], "healthy", "{doc:#}");
    let rows = doc["nodes"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        assert_eq!(row["backend"], "raft", "{row:#}");
        assert!(row["raft"]["term"].as_u64().unwrap() > 0, "{row:#}");
        assert!(
            row["raft"]["applied_index"].as_u64().unwrap() > 0,
            "{row:#}"
        );
    }

    // A follower killed: degraded, and the verdict names it.
    let victim = (leader + 1) % 3;
    servers[victim].take().unwrap().kill9();
    let want = format!("the node at {} is unreachable", nodes[victim].endpoint());
    let (code, out) = status_until(&endpoints, |_, out| out.contains(&want));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("degraded: "), "{out}");

    // Every node down: exit 2.
    for server in servers.iter_mut() {
        if let Some(server) = server.take() {
            server.kill9();
        }
    }
    let (code, out) = status_until(&endpoints, |code, _| code == 2);
    assert!(out.contains("down: none of the 3 node(s) answers"), "{out}");
    assert_eq!(code, 2);
}

/// A raise through a follower's address reaches the leader; every later timestamp is above the
/// raised millisecond, also after the leader is killed (the raise is durable); a raise past the
/// ceiling or the layout is refused, and a raise below what was issued changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raise_is_durable_and_forward_only() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let ClusterUp {
        nodes,
        mut servers,
        endpoints,
        leader,
        ..
    } = healthy_cluster(dir.path());
    let follower = (leader + 1) % 3;

    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let target = now_ms + 3_600_000;
    let (status, out, err) = run_tso(&[
        "admin",
        "raise",
        "--to-physical-ms",
        &target.to_string(),
        "--endpoints",
        &nodes[follower].endpoint(),
    ]);
    assert_eq!(status.code(), Some(0), "{out}{err}");
    assert!(out.contains(&format!("above {target} ms")), "{out}");
    let mut client = nodes[leader].connect();
    let (first, _) = last_of(&mut client, 1).await;
    assert!(first >> 18 > target, "{} not above {target}", first >> 18);

    // Below what was issued: accepted, and nothing goes back.
    let (status, out, err) = run_tso(&[
        "admin",
        "raise",
        "--to-physical-ms",
        &now_ms.to_string(),
        "--endpoints",
        &endpoints,
    ]);
    assert_eq!(status.code(), Some(0), "{out}{err}");
    let (again, _) = last_of(&mut client, 1).await;
    assert!(again > first, "{again} after {first}");

    // Refused: a typo-sized jump, and one past the 46-bit layout.
    for (to, expect) in [
        ((now_ms + 10 * 86_400_000).to_string(), "ceiling"),
        ((1u64 << 46).to_string(), "layout"),
    ] {
        let (status, out, err) = run_tso(&[
            "admin",
            "raise",
            "--to-physical-ms",
            &to,
            "--max-ahead",
            if expect == "layout" {
                "1000000d"
            } else {
                "24h"
            },
            "--endpoints",
            &endpoints,
        ]);
        assert_eq!(status.code(), Some(1), "{out}{err}");
        assert!(err.contains(expect), "{expect}: {err}");
    }

    // The leader killed: its successor fences above the raise.
    servers[leader].take().unwrap().kill9();
    let deadline = Instant::now() + WAIT;
    let after = loop {
        let mut found = None;
        for (i, node) in nodes.iter().enumerate() {
            if i == leader {
                continue;
            }
            if let Ok(reply) = node
                .connect()
                .get_ts(tso_proto::v1::GetTsRequest { count: 1 })
                .await
            {
                let reply = reply.into_inner();
                found = Some(reply.physical_ms << 18 | reply.logical_start as u64);
            }
        }
        if let Some(ts) = found {
            break ts;
        }
        assert!(Instant::now() < deadline, "no successor granted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(after > again, "{after} after {again}");
    assert!(after >> 18 > target);
}

/// One file-backend node whose clock runs 5 s ahead (the test-only offset file): healthy, its
/// row says so in the JSON (`clock_skew_ms`), and the table adds a note in words.
#[test]
fn status_notes_a_node_clock_far_from_this_machines() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let offset = dir.path().join("offset");
    std::fs::write(&offset, "5000").unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--unsafe-clock-offset-file", offset.to_str().unwrap()],
    );
    let (code, out) = status_until(&server.addr, |code, _| code == 0);
    // The skew is measured when the answer arrives, so it is 5 s less a round trip.
    let note = format!("note: the clock of the node at {} is ", server.addr);
    assert!(
        out.lines()
            .any(|l| l.starts_with(&note) && l.ends_with(" s ahead of this machine's")),
        "{out}"
    );
    assert_eq!(code, 0, "{out}");
    let (status, json, _) = run_tso(&["status", "--endpoints", &server.addr, "--json"]);
    assert_eq!(status.code(), Some(0), "{json}");
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let skew = doc["nodes"][0]["clock_skew_ms"].as_i64().unwrap();
    assert!((4_000..6_000).contains(&skew), "{doc:#}");
    assert_eq!(doc["nodes"][0]["backend"], "file", "{doc:#}");
}
