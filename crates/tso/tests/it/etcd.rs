//! `tso serve --backend etcd` as a user runs it: real `tso serve` processes on a real etcd
//! (Debian's `etcd-server`; `scripts/test` installs it). Two nodes elect one leader through
//! etcd; the other refuses with a hint naming it; when the leader is killed the other takes
//! over, and its timestamps are above every one answered before.

use std::time::{Duration, Instant};

use tso_proto::v1::GetTsRequest;
use tso_testkit::etcd::{EtcdProcess, EtcdTlsFiles};

use crate::common;

use common::{Server, last_of, run_tso};

/// Hang guard: a TTL (2 s) and an election are far below it; never what the test measures.
const WAIT: Duration = Duration::from_secs(30);

fn node_flags(id: &'static str, etcd: &str) -> Vec<String> {
    [
        "--backend",
        "etcd",
        "--node-id",
        id,
        "--etcd-endpoints",
        etcd,
        "--etcd-prefix",
        "/tso/test",
        "--etcd-lease-ttl",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The first line of `server`'s log that contains `text` (panics past the hang guard).
fn log_line(server: &Server, text: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match server.stderr.recv_timeout(left) {
            Ok(line) if line.contains(text) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!(
                "no log line with {text:?} within {WAIT:?}:\n{}",
                seen.join("\n")
            ),
        }
    }
}

/// Waits until the node at `server` grants; returns its first grant's last timestamp.
async fn first_grant(server: &Server) -> u64 {
    let deadline = Instant::now() + WAIT;
    let mut client = server.client().await;
    loop {
        match client.get_ts(GetTsRequest { count: 1 }).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                return reply.physical_ms << 18 | reply.logical_start as u64;
            }
            Err(status) => assert!(
                Instant::now() < deadline,
                "{} never granted: {status:?}",
                server.addr
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_etcd_serve_one_leader_and_fail_over_above_it() {
    let _turn = crate::common::topic(module_path!());
    let etcd = tokio::task::spawn_blocking(EtcdProcess::start)
        .await
        .unwrap();
    let url = etcd.client_url().to_string();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let f1 = node_flags("1", &url);
    let f2 = node_flags("2", &url);
    let a = Server::start(
        d1.path(),
        &f1.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let b = Server::start(
        d2.path(),
        &f2.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // Whoever wins the campaign grants; wait for one, then the other must refuse.
    let deadline = Instant::now() + WAIT;
    let (leader, follower) = loop {
        let mut ca = a.client().await;
        let mut cb = b.client().await;
        let ra = ca.get_ts(GetTsRequest { count: 1 }).await;
        let rb = cb.get_ts(GetTsRequest { count: 1 }).await;
        match (ra.is_ok(), rb.is_ok()) {
            (true, false) => break (a, b),
            (false, true) => break (b, a),
            (true, true) => panic!("two nodes granted at once"),
            (false, false) => {}
        }
        assert!(Instant::now() < deadline, "no node led: {}", etcd.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let refused = follower
        .client()
        .await
        .get_ts(GetTsRequest { count: 1 })
        .await
        .expect_err("the follower refuses");
    assert_eq!(refused.message(), "not leader", "{refused:?}");
    let hint = refused
        .metadata()
        .get_bin(tso_proto::LEADER_HINT_KEY)
        .expect("a leader hint")
        .to_bytes()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&hint).contains(&leader.addr),
        "the hint names the leader {}: {hint:?}",
        leader.addr
    );
    let (_, before) = last_of(&mut leader.client().await, 100).await;
    leader.kill9();
    // The follower campaigns once the dead leader's etcd lease expires (2 s), then fences.
    let after = first_grant(&follower).await;
    assert!(after > before, "{after} after {before}");
}

#[test]
fn the_etcd_backend_refuses_what_it_cannot_run() {
    let _turn = crate::common::topic(module_path!());
    let (status, _, err) = run_tso(&[
        "serve",
        "--backend",
        "etcd",
        "--etcd-endpoints",
        "http://127.0.0.1:1",
    ]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("--node-id"), "{err}");
    let (status, _, err) = run_tso(&["serve", "--backend", "etcd", "--node-id", "1"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("--etcd-endpoints"), "{err}");
    let (status, _, err) = run_tso(&[
        "serve",
        "--backend",
        "etcd",
        "--node-id",
        "1",
        "--etcd-endpoints",
        "http://127.0.0.1:1",
        "--members",
        "1=127.0.0.1:1/127.0.0.1:2",
    ]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("raft flags"), "{err}");
}

/// TLS to etcd, with certificates made here: etcd serves https and requires client
/// certificates from one CA. A node given that CA and a client certificate it signed leads and
/// grants; one whose client certificate another CA signed is refused in the handshake and says
/// so in its log (it never leads); and the TLS flags that cannot work are refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_etcd_over_tls_with_a_client_certificate() {
    let _turn = crate::common::topic(module_path!());
    let certs = tempfile::tempdir().unwrap();
    let ca = common::certs::Ca::new("etcd test CA");
    let server = ca.write_leaf(certs.path(), "etcd");
    let client = ca.write_leaf(certs.path(), "tso");
    let etcd = tokio::task::spawn_blocking(move || {
        EtcdProcess::start_tls(&EtcdTlsFiles {
            ca: server.ca,
            cert: server.cert,
            key: server.key,
            client_cert_auth: true,
        })
    })
    .await
    .unwrap();
    let url = etcd.client_url().to_string();
    assert!(url.starts_with("https://"), "{url}");
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();

    let mut good = node_flags("1", &url);
    good.extend([
        "--etcd-tls-ca".to_string(),
        path(&client.ca),
        "--etcd-tls-cert".to_string(),
        path(&client.cert),
        "--etcd-tls-key".to_string(),
        path(&client.key),
    ]);
    let d1 = tempfile::tempdir().unwrap();
    let a = Server::start(
        d1.path(),
        &good.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let first = first_grant(&a).await;
    let (_, later) = last_of(&mut a.client().await, 10).await;
    assert!(later > first, "{later} after {first}");

    // A client certificate from a CA etcd does not trust: the handshake fails, the node says
    // why, and it never leads.
    let stranger = common::certs::Ca::new("another CA").write_leaf(certs.path(), "stranger");
    let mut bad = node_flags("2", &url);
    bad.extend([
        "--etcd-tls-ca".to_string(),
        path(&client.ca),
        "--etcd-tls-cert".to_string(),
        path(&stranger.cert),
        "--etcd-tls-key".to_string(),
        path(&stranger.key),
    ]);
    let d2 = tempfile::tempdir().unwrap();
    let b = Server::start(
        d2.path(),
        &bad.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let line = log_line(&b, "etcd campaign round failed");
    assert!(line.contains("WARN"), "{line}");
    let refused = b
        .client()
        .await
        .get_ts(GetTsRequest { count: 1 })
        .await
        .expect_err("a node etcd refuses never leads");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );

    // What cannot work is refused at start, naming the flag.
    let flags = |more: &[&str]| {
        let mut v = vec!["serve", "--backend", "etcd", "--node-id", "3"];
        v.extend_from_slice(more);
        v.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let ca_path = path(&client.ca);
    for (args, expect) in [
        (flags(&["--etcd-endpoints", &url]), "--etcd-tls-ca"),
        (
            flags(&[
                "--etcd-endpoints",
                "http://127.0.0.1:1",
                "--etcd-tls-ca",
                &ca_path,
            ]),
            "use https://",
        ),
        (
            flags(&[
                "--etcd-endpoints",
                &url,
                "--etcd-tls-ca",
                "/nonexistent/ca.pem",
            ]),
            "--etcd-tls-ca /nonexistent/ca.pem",
        ),
        (
            flags(&[
                "--etcd-endpoints",
                &url,
                "--etcd-tls-ca",
                &ca_path,
                "--etcd-tls-cert",
                &ca_path,
            ]),
            "--etcd-tls-key",
        ),
    ] {
        let (status, _, err) = run_tso(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_ne!(status.code(), Some(0), "{args:?}: {err}");
        assert!(
            err.contains(expect),
            "{args:?}: expected {expect:?} in {err}"
        );
    }
}
