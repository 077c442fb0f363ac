//! TLS over real `tso serve` processes: a raft cluster with client TLS (client certificates
//! required) and mutual TLS between peers; clients with the wrong CA, no certificate or a
//! certificate from another CA are refused with a clear error; a peer whose certificate another
//! CA signed never joins; a routable plaintext peer listener needs `--insecure`; bad files fail
//! at start naming the flag and the path. Certificates are made here with rcgen.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::certs::{Ca, TlsFiles};
use common::raft::*;
use common::*;
use prost::Message;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tso_client::{CaCertificates, Client, ClientTls, TlsIdentity};
use tso_proto::v1::GetTsRequest;
use tso_proto::v1::tso_service_client::TsoServiceClient;

/// Timestamps the healthy part of a cluster must grant before a refused peer is checked.
const CALLS_BEFORE_CHECK: usize = 50;

/// How many times, 100 ms apart, a node that must not join is asked whether it knows a
/// leader. A node that joins learns the leader from the next heartbeat (50 ms); 3 s is about
/// 60 heartbeats and 8 election timeouts.
const NO_LEADER_PROBES: usize = 30;

/// Spawns `tso` with `args`, and waits for its `serving on` line (`Err` with its stderr if it
/// exits first).
fn spawn_server(args: &[String]) -> Result<Server, String> {
    let mut command = Command::new(tso_bin());
    command.args(args);
    Server::spawn(command).map_err(|(status, log)| format!("exited with {status}: {log}"))
}

/// The flags of raft node `n` with client TLS (`client`, client certificates required from
/// its CA) and peer TLS (`peer`).
fn node_args(
    dir: &Path,
    n: &RaftNode,
    members: &str,
    client: &TlsFiles,
    peer: &TlsFiles,
) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    vec![
        "serve".into(),
        "--backend".into(),
        "raft".into(),
        "--node-id".into(),
        n.id.to_string(),
        "--listen".into(),
        format!("127.0.0.1:{}", n.client_port),
        "--peer-addr".into(),
        format!("127.0.0.1:{}", n.peer_port),
        "--members".into(),
        members.into(),
        "--data-dir".into(),
        path(&dir.join(format!("node-{}", n.id))),
        "--tls-cert".into(),
        path(&client.cert),
        "--tls-key".into(),
        path(&client.key),
        "--tls-client-ca".into(),
        path(&client.ca),
        "--peer-tls-cert".into(),
        path(&peer.cert),
        "--peer-tls-key".into(),
        path(&peer.key),
        "--peer-tls-ca".into(),
        path(&peer.ca),
    ]
}

/// A raw gRPC client of one node over TLS, presenting `identity`.
fn raw_client(port: u16, ca: &str, identity: &TlsFiles) -> TsoServiceClient<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(&identity.cert).unwrap(),
            std::fs::read(&identity.key).unwrap(),
        ));
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(1))
        .connect_lazy();
    TsoServiceClient::new(channel)
}

/// What one raw `GetTs` to a node says about leadership.
#[derive(Debug, PartialEq)]
enum Answer {
    Grants,
    /// "Not leader", naming the leader's client address (empty: no leader known).
    NotLeader(String),
    /// Anything else (not reachable, unavailable).
    Other(String),
}

async fn ask(client: &mut TsoServiceClient<Channel>) -> Answer {
    match client.get_ts(GetTsRequest { count: 1 }).await {
        Ok(_) => Answer::Grants,
        Err(status) if status.code() == tonic::Code::FailedPrecondition => {
            let hint = status
                .metadata()
                .get_bin(tso_proto::LEADER_HINT_KEY)
                .and_then(|bin| bin.to_bytes().ok())
                .and_then(|bytes| tso_proto::v1::LeaderHint::decode(bytes.as_ref()).ok())
                .and_then(|hint| hint.leader_endpoint)
                .unwrap_or_default();
            Answer::NotLeader(hint)
        }
        Err(status) => Answer::Other(status.to_string()),
    }
}

/// Waits until one node grants and each other node of `clients` names it as leader; returns
/// the leader's index.
async fn wait_leader_known_by_all(
    nodes: &[RaftNode],
    clients: &mut [TsoServiceClient<Channel>],
) -> usize {
    let wait = async {
        loop {
            let mut answers = Vec::new();
            for client in clients.iter_mut() {
                answers.push(ask(client).await);
            }
            if let Some(leader) = answers.iter().position(|a| *a == Answer::Grants) {
                let want = format!("127.0.0.1:{}", nodes[leader].client_port);
                let followed = answers
                    .iter()
                    .enumerate()
                    .all(|(i, a)| i == leader || *a == Answer::NotLeader(want.clone()));
                if followed {
                    return leader;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, wait)
        .await
        .expect("no leader known by every node within the hang guard")
}

fn tso(args: &[&str]) -> (bool, String, String) {
    let (status, out, err) = run_tso(args);
    (status.success(), out, err)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Tests 1-3 of TLS on one cluster: every node presents a certificate of the cluster CA on
/// both ports and requires client certificates from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_serves_clients_with_the_right_certificates_only() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("tso test CA");
    let nodes = raft_nodes(3);
    let members = members(&nodes);
    let mut servers = Vec::new();
    for n in &nodes {
        let files = ca.write_leaf(dir.path(), &format!("node-{}", n.id));
        let args = node_args(dir.path(), n, &members, &files, &files);
        servers.push(spawn_server(&args).unwrap_or_else(|e| panic!("node {}: {e}", n.id)));
    }
    let client_files = ca.write_leaf(dir.path(), "client");
    let mut clients: Vec<_> = nodes
        .iter()
        .map(|n| raw_client(n.client_port, &ca.pem, &client_files))
        .collect();
    // Every node follows one leader: the three peers reached each other over mutual TLS.
    let leader = wait_leader_known_by_all(&nodes, &mut clients).await;
    let follower = &nodes[(leader + 1) % nodes.len()];
    let follower_endpoint = format!("127.0.0.1:{}", follower.client_port);

    // The library, given only a follower: its hint (scheme-less) is followed over https.
    let tls = ClientTls::new(CaCertificates::from_pem(ca.pem.clone()).unwrap()).identity(
        TlsIdentity::from_pem(
            std::fs::read(&client_files.cert).unwrap(),
            std::fs::read(&client_files.key).unwrap(),
        )
        .unwrap(),
    );
    let client = Client::builder()
        .tls(tls)
        .connect([&follower_endpoint])
        .await
        .unwrap();
    let first = client.get_ts().await.expect("timestamps over TLS");
    let batch = client.get_ts_batch(100).await.unwrap();
    assert!(batch.first() > first);
    // Sequence and lease calls take their own channels: TLS there too.
    client
        .get_seq("tls-test", 2)
        .await
        .expect("a sequence block over TLS");
    client.safe_frontier().await.expect("the frontier over TLS");

    // The CLI, likewise through the follower.
    let (ok, out, err) = tso(&[
        "get",
        "-n",
        "3",
        "--endpoints",
        &follower_endpoint,
        "--tls-ca",
        s(&client_files.ca),
        "--tls-cert",
        s(&client_files.cert),
        "--tls-key",
        s(&client_files.key),
    ]);
    assert!(ok, "tso get over TLS failed: {err}");
    assert_eq!(out.lines().count(), 3, "{out}");

    // Refusals. Each is a short call: one attempt budget inside 3 s.
    let endpoint = format!("127.0.0.1:{}", nodes[leader].client_port);
    let refused = |extra: &[&str]| {
        let mut args = vec!["get", "--timeout", "3s", "--endpoints", &endpoint];
        args.extend_from_slice(extra);
        let (ok, _, err) = tso(&args);
        assert!(!ok, "{extra:?} was served");
        err
    };
    // Plaintext against a TLS port.
    let err = refused(&[]);
    assert!(
        err.contains("a server with TLS needs --tls-ca FILE"),
        "{err}"
    );
    // A CA of another authority: the server's certificate is refused by the client.
    let other = Ca::new("another CA");
    let other_files = other.write_leaf(dir.path(), "stranger");
    let err = refused(&["--tls-ca", s(&other_files.ca)]);
    assert!(
        err.contains("invalid peer certificate") && err.contains("UnknownIssuer"),
        "{err}"
    );
    assert!(err.contains("signed by the CA of --tls-ca"), "{err}");
    // The right CA but no client certificate: the server refuses the client.
    let err = refused(&["--tls-ca", s(&client_files.ca)]);
    assert!(err.contains("give --tls-cert and --tls-key"), "{err}");
    // A client certificate another CA signed.
    let err = refused(&[
        "--tls-ca",
        s(&client_files.ca),
        "--tls-cert",
        s(&other_files.cert),
        "--tls-key",
        s(&other_files.key),
    ]);
    assert!(err.contains("refused this client's certificate"), "{err}");
    // And the library without a CA refuses `https` outright.
    let no_ca = Client::builder()
        .connect([format!("https://{endpoint}")])
        .await
        .expect_err("https without a CA accepted");
    assert!(no_ca.to_string().contains("CA certificate"), "{no_ca}");
}

/// Test 4: a node whose peer certificate another CA signed is refused by its peers (and
/// refuses them): nodes 1 and 2 form the cluster and serve, node 3 never learns a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_certificate_from_another_ca_never_joins() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cluster CA");
    let rogue_ca = Ca::new("rogue CA");
    let nodes = raft_nodes(3);
    let members = members(&nodes);
    let client_files = ca.write_leaf(dir.path(), "client");
    let mut servers = Vec::new();
    for n in &nodes {
        let name = format!("node-{}", n.id);
        let client_port = ca.write_leaf(dir.path(), &name);
        let mut peer = client_port.clone();
        if n.id == 3 {
            // Its own certificate from the rogue CA; it trusts the cluster CA like the others.
            peer = rogue_ca.write_leaf(dir.path(), "node-3-peer");
            peer.ca = client_port.ca.clone();
        }
        let args = node_args(dir.path(), n, &members, &client_port, &peer);
        servers.push(spawn_server(&args).unwrap_or_else(|e| panic!("node {}: {e}", n.id)));
    }
    let mut clients: Vec<_> = nodes
        .iter()
        .map(|n| raw_client(n.client_port, &ca.pem, &client_files))
        .collect();
    let leader = wait_leader_known_by_all(&nodes[..2], &mut clients[..2]).await;
    let mut granted = 0;
    while granted < CALLS_BEFORE_CHECK {
        if ask(&mut clients[leader]).await == Answer::Grants {
            granted += 1;
        } else {
            // A late election between nodes 1 and 2: find the leader again.
            wait_leader_known_by_all(&nodes[..2], &mut clients[..2]).await;
        }
    }
    for probe in 0..NO_LEADER_PROBES {
        let answer = ask(&mut clients[2]).await;
        assert!(
            matches!(&answer, Answer::NotLeader(hint) if hint.is_empty()),
            "probe {probe}: node 3 answered {answer:?}: it joined the cluster"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Test 5: a routable peer listener without peer TLS refuses to start unless `--insecure`.
#[test]
fn a_routable_plaintext_peer_listener_needs_insecure() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let client_port = free_port();
    let base = |data: &str| -> Vec<String> {
        vec![
            "serve".into(),
            "--backend".into(),
            "raft".into(),
            "--node-id".into(),
            "1".into(),
            "--listen".into(),
            format!("127.0.0.1:{client_port}"),
            "--peer-addr".into(),
            "0.0.0.0:0".into(),
            "--members".into(),
            format!("1=127.0.0.1:{client_port}/127.0.0.1:1"),
            "--data-dir".into(),
            dir.path().join(data).display().to_string(),
        ]
    };
    let err = spawn_server(&base("refused"))
        .err()
        .expect("started without TLS");
    assert!(
        err.contains("raft peer listener (--peer-addr) 0.0.0.0:0 is reachable")
            && err.contains("--peer-tls-cert")
            && err.contains("--insecure"),
        "{err}"
    );
    assert!(
        !dir.path().join("refused").exists(),
        "the refused node touched its data directory"
    );
    let mut insecure = base("insecure");
    insecure.push("--insecure".into());
    let server = spawn_server(&insecure).unwrap_or_else(|e| panic!("with --insecure: {e}"));
    drop(server);
    // With peer TLS it starts without --insecure.
    let ca = Ca::new("peer CA");
    let files = ca.write_leaf(dir.path(), "peer");
    let mut with_tls = base("tls");
    for (flag, path) in [
        ("--peer-tls-cert", &files.cert),
        ("--peer-tls-key", &files.key),
        ("--peer-tls-ca", &files.ca),
    ] {
        with_tls.push(flag.into());
        with_tls.push(path.display().to_string());
    }
    spawn_server(&with_tls).unwrap_or_else(|e| panic!("with peer TLS: {e}"));
}

/// Test 6: missing files, garbage and a key of another certificate fail at start, naming the
/// flag and the path.
#[test]
fn bad_tls_files_fail_at_start_naming_the_flag_and_the_path() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    let good = ca.write_leaf(dir.path(), "good");
    let other = ca.write_leaf(dir.path(), "other");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let start = |extra: &[&Path], flags: &[&str]| -> String {
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.path().join("data").display().to_string(),
        ];
        for (flag, path) in flags.iter().zip(extra) {
            args.push(flag.to_string());
            args.push(path.display().to_string());
        }
        spawn_server(&args)
            .err()
            .expect("started with bad TLS files")
    };
    let cases: [(&[&Path], &[&str], String); 5] = [
        (
            &[&missing, &good.key],
            &["--tls-cert", "--tls-key"],
            format!("--tls-cert {}: cannot read the file", missing.display()),
        ),
        (
            &[&garbage, &good.key],
            &["--tls-cert", "--tls-key"],
            format!("--tls-cert {}: not a PEM certificate", garbage.display()),
        ),
        (
            &[&good.cert, &garbage],
            &["--tls-cert", "--tls-key"],
            format!("--tls-key {}: not a PEM private key", garbage.display()),
        ),
        (
            &[&good.cert, &other.key],
            &["--tls-cert", "--tls-key"],
            format!(
                "--tls-key {}: the private key does not belong to the certificate in --tls-cert {}",
                other.key.display(),
                good.cert.display()
            ),
        ),
        (
            &[&good.cert, &good.key, &garbage],
            &["--tls-cert", "--tls-key", "--tls-client-ca"],
            format!(
                "--tls-client-ca {}: not a PEM certificate",
                garbage.display()
            ),
        ),
    ];
    for (paths, flags, want) in cases {
        let err = start(paths, flags);
        assert!(err.contains(&want), "{flags:?}: want {want:?} in {err}");
    }
    // A key without its certificate is a usage error.
    let (ok, _, err) = tso(&["serve", "--tls-key", s(&good.key)]);
    assert!(!ok && err.contains("--tls-cert"), "{err}");
}

/// `tso bench` (raw RPCs, streams, the library) and `tso check` attached to a server that
/// requires client certificates, with the CLI's TLS flags.
#[test]
fn bench_and_check_attach_over_mutual_tls() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    let server_files = ca.write_leaf(dir.path(), "server");
    let client_files = ca.write_leaf(dir.path(), "client");
    let server = Server::start(
        &dir.path().join("data"),
        &[
            "--tls-cert",
            s(&server_files.cert),
            "--tls-key",
            s(&server_files.key),
            "--tls-client-ca",
            s(&server_files.ca),
        ],
    );
    let tls = [
        "--tls-ca",
        s(&client_files.ca),
        "--tls-cert",
        s(&client_files.cert),
        "--tls-key",
        s(&client_files.key),
    ];
    for mode in ["raw", "stream", "library"] {
        let mut args = vec!["bench", "--json", "--callers", "2", "--mode", mode];
        args.extend(["--duration", "300ms", "--warmup", "0s"]);
        args.extend(["--endpoints", &server.addr]);
        args.extend(tls);
        let (ok, out, err) = tso(&args);
        assert!(ok, "bench --mode {mode}: {err}\n{out}");
        let report: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert!(report["calls"].as_u64().unwrap() > 0, "{report:#}");
        assert_eq!(report["check"]["ok"], true, "{report:#}");
    }
    let out = dir.path().join("check.json");
    let mut args = vec!["check", "--clients", "2", "--duration", "1s"];
    args.extend(["--endpoints", &server.addr, "--out", s(&out)]);
    args.extend(tls);
    let (ok, stdout, err) = tso(&args);
    assert!(ok, "check: {err}\n{stdout}");
    // Without the client certificate not one call succeeds.
    let (ok, out, err) = tso(&[
        "bench",
        "--json",
        "--duration",
        "300ms",
        "--warmup",
        "0s",
        "--endpoints",
        &server.addr,
        "--tls-ca",
        s(&client_files.ca),
    ]);
    assert!(ok, "bench: {err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(report["calls"], 0, "{report:#}");
    assert!(
        report["errors"].as_object().is_some_and(|e| !e.is_empty()),
        "{report:#}"
    );
}

/// The admin port: with `--admin-tls-*` it takes only operators whose certificate the admin
/// CA signed (`tso admin` with `--tls-ca`, `--tls-cert`, `--tls-key`); a routable admin
/// listener without TLS needs `--insecure`, and refuses to start before touching the data.
#[test]
fn the_admin_port_takes_mutual_tls_and_a_routable_plaintext_one_needs_insecure() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("admin CA");
    let server_files = ca.write_leaf(dir.path(), "node-1");
    let operator = ca.write_leaf(dir.path(), "operator");
    let stranger = Ca::new("another CA").write_leaf(dir.path(), "stranger");
    let (client_port, peer_port, admin_port) = (free_port(), free_port(), free_port());
    let base = |data: &str, admin_listen: &str| -> Vec<String> {
        vec![
            "serve".into(),
            "--backend".into(),
            "raft".into(),
            "--node-id".into(),
            "1".into(),
            "--listen".into(),
            format!("127.0.0.1:{client_port}"),
            "--peer-addr".into(),
            format!("127.0.0.1:{peer_port}"),
            "--admin-listen".into(),
            admin_listen.into(),
            "--members".into(),
            format!("1=127.0.0.1:{client_port}/{peer_port}/{admin_port}"),
            "--data-dir".into(),
            dir.path().join(data).display().to_string(),
        ]
    };

    // Routable and plaintext: refused, naming the flags, before the data directory exists.
    let err = spawn_server(&base("refused", "0.0.0.0:0"))
        .err()
        .expect("a routable plaintext admin port started");
    assert!(
        err.contains("admin listener (--admin-listen) 0.0.0.0:0 is reachable")
            && err.contains("--admin-tls-cert")
            && err.contains("--insecure"),
        "{err}"
    );
    assert!(!dir.path().join("refused").exists());
    let mut insecure = base("insecure", "0.0.0.0:0");
    insecure.push("--insecure".into());
    drop(spawn_server(&insecure).unwrap_or_else(|e| panic!("with --insecure: {e}")));

    // Mutual TLS on the admin port.
    let mut args = base("tls", &format!("127.0.0.1:{admin_port}"));
    for (flag, path) in [
        ("--admin-tls-cert", &server_files.cert),
        ("--admin-tls-key", &server_files.key),
        ("--admin-tls-ca", &server_files.ca),
    ] {
        args.push(flag.into());
        args.push(path.display().to_string());
    }
    let _server = spawn_server(&args).unwrap_or_else(|e| panic!("admin over TLS: {e}"));
    let endpoint = format!("127.0.0.1:{admin_port}");
    let admin = |tls: &[&str]| {
        let mut a = vec!["admin", "--timeout", "20s"];
        a.extend_from_slice(tls);
        a.extend_from_slice(&["members", "--endpoint", &endpoint]);
        tso(&a)
    };
    // The operator's certificate: the members table (the single node leads once elected).
    let (ok, out, err) = admin(&[
        "--tls-ca",
        s(&operator.ca),
        "--tls-cert",
        s(&operator.cert),
        "--tls-key",
        s(&operator.key),
    ]);
    assert!(ok, "tso admin over mutual TLS failed: {err}");
    assert!(out.contains("voter"), "{out}");
    // Plaintext, no client certificate, or one from another CA: refused.
    let (ok, _, err) = admin(&[]);
    assert!(!ok, "a plaintext admin call was served: {err}");
    let (ok, _, err) = admin(&["--tls-ca", s(&operator.ca)]);
    assert!(
        !ok,
        "an admin call without a client certificate was served: {err}"
    );
    let (ok, _, err) = admin(&[
        "--tls-ca",
        s(&operator.ca),
        "--tls-cert",
        s(&stranger.cert),
        "--tls-key",
        s(&stranger.key),
    ]);
    assert!(
        !ok,
        "an admin call with another CA's certificate was served: {err}"
    );
}
