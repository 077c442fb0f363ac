//! Disaster recovery with `tso export` and `tso init --from`: a cluster (raft, file, etcd) is
//! killed, its state exported from the stopped nodes' directories (or from etcd), a new one
//! seeded from the exports, and every timestamp and sequence value the new one answers is above
//! everything answered before. Damaged or edited exports, a running node's directory and a
//! non-empty target directory are refused.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::raft::*;
use common::*;
use tonic::transport::Channel;
use tso_proto::v1::tso_service_client::TsoServiceClient;
use tso_proto::v1::{GetSeqRequest, GetTsRequest};

const KEYS: [&str; 3] = ["a", "invoice", "órder/1"];
const SEQ_MARGIN: u64 = 1000;

/// What a cluster answered: the highest timestamp, and each key's end (one past its highest
/// value).
#[derive(Debug, Default)]
struct Answered {
    ts_max: u64,
    seq_ends: BTreeMap<String, u64>,
}

/// Timestamps and sequence blocks from `client`, recorded in `answered`.
async fn take_values(client: &mut TsoServiceClient<Channel>, answered: &mut Answered) {
    for i in 0..30u32 {
        let (_, last) = last_of(client, 1 + i % 7).await;
        answered.ts_max = answered.ts_max.max(last);
        let key = KEYS[i as usize % KEYS.len()];
        let reply = client
            .get_seq(GetSeqRequest {
                key: key.as_bytes().to_vec(),
                count: 1 + i % 5,
            })
            .await
            .expect("GetSeq")
            .into_inner();
        let end = reply.start + reply.count as u64;
        let known = answered.seq_ends.entry(key.to_owned()).or_insert(0);
        assert!(reply.start >= *known, "{key}: {} reused", reply.start);
        *known = end;
    }
}

/// The first grant of a restored cluster and one block of every key are above `before`.
async fn assert_above(client: &mut TsoServiceClient<Channel>, before: &Answered) {
    let reply = client
        .get_ts(GetTsRequest { count: 1 })
        .await
        .expect("GetTs")
        .into_inner();
    let first = reply.physical_ms << 18 | reply.logical_start as u64;
    assert!(
        first > before.ts_max,
        "restored: timestamp {first} not above {}",
        before.ts_max
    );
    for (key, end) in &before.seq_ends {
        let reply = client
            .get_seq(GetSeqRequest {
                key: key.as_bytes().to_vec(),
                count: 1,
            })
            .await
            .expect("GetSeq")
            .into_inner();
        assert!(
            reply.start >= end + SEQ_MARGIN,
            "restored: {key} starts at {}, not above {end} plus the margin",
            reply.start
        );
    }
}

fn export(dir: &Path, out: &Path) {
    let (status, _, err) = run_tso(&[
        "export",
        "--data-dir",
        dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(status.success(), "export of {}: {err}", dir.display());
}

/// `tso init --from` every file into `dir`; returns (status, stdout, stderr).
fn init(from: &[PathBuf], dir: &Path, backend: &str) -> (std::process::ExitStatus, String, String) {
    let mut args = vec!["init".to_owned()];
    for f in from {
        args.extend(["--from".to_owned(), f.display().to_string()]);
    }
    args.extend(
        [
            "--ts-margin",
            "10s",
            "--seq-margin",
            &SEQ_MARGIN.to_string(),
            "--backend",
            backend,
            "--data-dir",
        ]
        .map(str::to_owned),
    );
    args.push(dir.display().to_string());
    run_tso(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Polls every node until one grants; returns its index.
async fn leader_of(nodes: &[RaftNode]) -> usize {
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

/// Values from whoever leads, retried across an election nobody asked for.
async fn take_values_from_leader(nodes: &[RaftNode], answered: &mut Answered) {
    let leader = leader_of(nodes).await;
    let mut client = nodes[leader].connect();
    take_values(&mut client, answered).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raft_cluster_restored_from_the_exports_of_its_stopped_nodes_answers_above() {
    let _turn = crate::common::topic(module_path!());
    let old = tempfile::tempdir().unwrap();
    let nodes = raft_nodes(3);
    let list = members(&nodes);
    let servers: Vec<Server> = nodes
        .iter()
        .map(|n| n.start(old.path(), Some(&list)))
        .collect();
    let mut before = Answered::default();
    take_values_from_leader(&nodes, &mut before).await;
    take_values_from_leader(&nodes, &mut before).await;
    for server in servers {
        server.kill9();
    }

    let exports = tempfile::tempdir().unwrap();
    let files: Vec<PathBuf> = nodes
        .iter()
        .map(|n| {
            let out = exports.path().join(format!("node-{}.json", n.id));
            export(&old.path().join(format!("node-{}", n.id)), &out);
            out
        })
        .collect();
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&files[0]).unwrap()).unwrap();
    assert_eq!(doc["source"]["backend"], "raft");
    assert_eq!(doc["source"]["node_id"], 1);

    // A new cluster on new ports and fresh directories, every member seeded alike.
    let new = tempfile::tempdir().unwrap();
    let fresh = raft_nodes(3);
    let mut fingerprints = Vec::new();
    for n in &fresh {
        let (status, out, err) = init(&files, &new.path().join(format!("node-{}", n.id)), "raft");
        assert!(status.success(), "init: {err}");
        let line = out
            .lines()
            .find(|l| l.starts_with("raft seed fingerprint"))
            .unwrap_or_else(|| panic!("no fingerprint in {out}"));
        fingerprints.push(line.split_whitespace().nth(3).unwrap().to_owned());
    }
    assert!(
        fingerprints.windows(2).all(|w| w[0] == w[1]),
        "{fingerprints:?}"
    );
    let list = members(&fresh);
    let servers: Vec<Server> = fresh
        .iter()
        .map(|n| n.start(new.path(), Some(&list)))
        .collect();
    let leader = leader_of(&fresh).await;
    assert_above(&mut fresh[leader].connect(), &before).await;

    // The seed is in the log too: a copy of each new node without its seed file (as a node
    // added later holds none) still exports everything above what the old cluster answered.
    wait_for_line(&servers[leader], "is in the raft log");
    for server in servers {
        server.kill9();
    }
    for n in &fresh {
        let copy = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(new.path().join(format!("node-{}", n.id))).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name();
            if name != "raft-seed" && name != "LOCK" {
                std::fs::copy(entry.path(), copy.path().join(&name)).unwrap();
            }
        }
        let out = copy.path().join("export.json");
        export(copy.path(), &out);
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        let high_water = doc["high_water_ms"].as_u64().unwrap();
        assert!(
            high_water >= (before.ts_max >> 18) + 10_000,
            "node {}: the log alone holds high-water {high_water}",
            n.id
        );
        for (key, end) in &before.seq_ends {
            let next = doc["sequences"][key.as_str()].as_u64().unwrap_or(0);
            assert!(
                next >= end + SEQ_MARGIN,
                "node {}: the log alone holds {key} at {next}",
                n.id
            );
        }
    }
}

/// Waits (hang guard only) for a line of `server`'s log that contains `text`.
fn wait_for_line(server: &Server, text: &str) {
    let deadline = std::time::Instant::now() + HANG_GUARD;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match server.stderr.recv_timeout(left) {
            Ok(line) if line.contains(text) => return,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no log line with {text:?}:\n{}", seen.join("\n")),
        }
    }
}

/// An initial member started without the seed is refused by the seeded ones: the seeded
/// majority forms the cluster and serves above the old one, the unseeded node never joins in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unseeded_initial_member_is_refused_by_the_seeded_majority() {
    let _turn = crate::common::topic(module_path!());
    let old = tempfile::tempdir().unwrap();
    let server = Server::start(old.path(), &[]);
    let mut before = Answered::default();
    take_values(&mut server.client().await, &mut before).await;
    server.kill9();
    let exported = old.path().join("file.json");
    let copy = tempfile::tempdir().unwrap();
    for name in ["high-water", "sequences", "INITIALIZED", "SEQUENCES"] {
        std::fs::copy(old.path().join(name), copy.path().join(name)).unwrap();
    }
    export(copy.path(), &exported);

    let new = tempfile::tempdir().unwrap();
    let nodes = raft_nodes(3);
    for n in &nodes[..2] {
        let dir = new.path().join(format!("node-{}", n.id));
        let (status, _, err) = init(std::slice::from_ref(&exported), &dir, "raft");
        assert!(status.success(), "init: {err}");
    }
    let list = members(&nodes);
    let servers: Vec<Server> = nodes
        .iter()
        .map(|n| n.start(new.path(), Some(&list)))
        .collect();
    let leader = leader_of(&nodes).await;
    assert_ne!(leader, 2, "the unseeded node led");
    assert_above(&mut nodes[leader].connect(), &before).await;
    wait_for_line(&servers[2], "`tso init --from` seed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_node_restored_from_its_export_answers_above_and_refusals_are_clear() {
    let _turn = crate::common::topic(module_path!());
    let old = tempfile::tempdir().unwrap();
    let server = Server::start(old.path(), &[]);
    let mut before = Answered::default();
    take_values(&mut server.client().await, &mut before).await;

    // A running node's directory is refused, and left as it was.
    let exports = tempfile::tempdir().unwrap();
    let out = exports.path().join("node.json");
    let (status, _, err) = run_tso(&[
        "export",
        "--data-dir",
        old.path().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        !status.success() && err.contains("in use by a running tso process"),
        "{err}"
    );
    assert!(!out.exists());
    server.kill9();
    let listing = |dir: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let files_before = listing(old.path());
    export(old.path(), &out);
    assert_eq!(
        listing(old.path()),
        files_before,
        "export changed the directory"
    );

    let new = tempfile::tempdir().unwrap();
    let target = new.path().join("restored");
    let (status, stdout, err) = init(std::slice::from_ref(&out), &target, "file");
    assert!(status.success(), "init: {err}");
    assert!(stdout.contains("3 sequence keys"), "{stdout}");

    // A second init into the now seeded directory is refused.
    let (status, _, err) = init(std::slice::from_ref(&out), &target, "file");
    assert!(!status.success() && err.contains("is not empty"), "{err}");

    let server = Server::start(&target, &[]);
    assert_above(&mut server.client().await, &before).await;
    drop(server);

    // An edited export is refused, naming the file; so is a damaged one.
    let text = std::fs::read_to_string(&out).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let high_water = doc["high_water_ms"].as_u64().unwrap();
    let edited = exports.path().join("edited.json");
    std::fs::write(
        &edited,
        text.replace(&high_water.to_string(), &(high_water - 5000).to_string()),
    )
    .unwrap();
    let damaged = exports.path().join("damaged.json");
    std::fs::write(&damaged, &text[..text.len() / 2]).unwrap();
    for bad in [&edited, &damaged] {
        let (status, _, err) = init(
            &[out.clone(), bad.clone()],
            &new.path().join("other"),
            "file",
        );
        assert!(
            !status.success() && err.contains(bad.to_str().unwrap()),
            "{}: {err}",
            bad.display()
        );
        assert!(!new.path().join("other").exists(), "a refused init wrote");
    }
    let (_, _, err) = init(&[edited], &new.path().join("other"), "file");
    assert!(err.contains("checksum mismatch"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_oracle_exported_from_etcd_restores_into_a_file_node_above() {
    let _turn = crate::common::topic(module_path!());
    let etcd = tokio::task::spawn_blocking(tso_testkit::etcd::EtcdProcess::start)
        .await
        .unwrap();
    let url = etcd.client_url().to_string();
    let scratch = tempfile::tempdir().unwrap();
    let flags = [
        "--backend",
        "etcd",
        "--node-id",
        "1",
        "--etcd-endpoints",
        &url,
        "--etcd-prefix",
        "/tso/recover",
        "--etcd-lease-ttl",
        "2s",
    ];
    let server = Server::start(scratch.path(), &flags);
    let mut client = server.client().await;
    let deadline = std::time::Instant::now() + HANG_GUARD;
    while client.get_ts(GetTsRequest { count: 1 }).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the etcd node never led"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut before = Answered::default();
    take_values(&mut client, &mut before).await;

    // Exported while the node still runs: etcd's key is what it answered from.
    let out = scratch.path().join("etcd.json");
    let (status, _, err) = run_tso(&[
        "export",
        "--backend",
        "etcd",
        "--etcd-endpoints",
        &url,
        "--etcd-prefix",
        "/tso/recover",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(status.success(), "export from etcd: {err}");
    server.kill9();

    let target = scratch.path().join("restored");
    let (status, _, err) = init(std::slice::from_ref(&out), &target, "file");
    assert!(status.success(), "init: {err}");
    let server = Server::start(&target, &[]);
    assert_above(&mut server.client().await, &before).await;
}
