//! `/healthz`, `/readyz` and `/metrics` on `--metrics-listen`, against real `tso serve`
//! processes: a single file-backed node, a three-node raft cluster losing its peers, and a node
//! whose data directory disappears under it (SEMANTICS §12).

use crate::common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// One HTTP exchange: the status code and body, `None` if nothing answers.
fn request(addr: &str, method: &str, path: &str) -> Option<(u16, String)> {
    let addr = addr.parse().unwrap();
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(head.as_bytes()).ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).ok()?;
    let (head, body) = reply.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    request(addr, "GET", path)
}

/// Polls `path` until an answer satisfies `want`; panics with the last answer at the hang
/// guard. `during` is called on every round (to check what must hold meanwhile).
fn wait_for(
    addr: &str,
    path: &str,
    want: impl Fn(u16, &str) -> bool,
    mut during: impl FnMut(),
) -> (u16, String) {
    let deadline = Instant::now() + HANG_GUARD;
    let mut last = None;
    while Instant::now() < deadline {
        during();
        if let Some((status, body)) = get(addr, path) {
            if want(status, &body) {
                return (status, body);
            }
            last = Some((status, body));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{addr}{path} never gave the wanted answer; last {last:?}");
}

#[test]
fn a_single_node_is_alive_ready_and_still_exports_metrics() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut server = Server::start(dir.path(), &["--metrics-listen", &metrics]);

    let (_, body) = wait_for(&metrics, "/healthz", |s, _| s == 200, || {});
    assert!(body.starts_with("serving epoch "), "{body}");
    let (_, body) = wait_for(&metrics, "/readyz", |s, _| s == 200, || {});
    assert!(body.starts_with("serving epoch "), "{body}");

    let (status, body) = get(&metrics, "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("# TYPE tso_serving gauge"), "{body}");
    assert!(body.contains("tso_serving 1"), "{body}");

    assert_eq!(get(&metrics, "/nope").map(|a| a.0), Some(404));
    assert_eq!(get(&metrics, "/metrics/").map(|a| a.0), Some(404));
    assert_eq!(request(&metrics, "POST", "/readyz").map(|a| a.0), Some(405));

    server.signal(libc::SIGTERM);
    assert!(server.wait_exit().success());
}

struct Node {
    id: u64,
    client_port: u16,
    peer_port: u16,
    metrics: String,
}

impl Node {
    fn client_addr(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }
}

/// Starts raft node `n` of `members` with its metrics endpoint, and waits for `serving on`.
fn start(dir: &std::path::Path, n: &Node, members: &str) -> Server {
    let mut child = Command::new(tso_bin())
        .args(["serve", "--backend", "raft", "--node-id", &n.id.to_string()])
        .args(["--listen", &n.client_addr()])
        .args(["--peer-addr", &format!("127.0.0.1:{}", n.peer_port)])
        .args(["--metrics-listen", &n.metrics, "--members", members])
        .arg("--data-dir")
        .arg(dir.join(format!("node-{}", n.id)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning tso serve");
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (err_tx, err_rx) = mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = err_tx.send(line);
        }
    });
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("serving on ")
        .unwrap_or_else(|| panic!("node {} did not start: {:?} {}", n.id, line, drain(&err_rx)))
        .to_owned();
    Server {
        child,
        addr,
        stderr: err_rx,
    }
}

/// The index of the leader, once its `/readyz` says it serves and every other live node's
/// says it follows that leader, all in one round (an election may move leadership meanwhile).
fn wait_settled(nodes: &[Node], alive: &[bool]) -> usize {
    let deadline = Instant::now() + HANG_GUARD;
    let mut last = Vec::new();
    while Instant::now() < deadline {
        last = nodes
            .iter()
            .zip(alive)
            .map(|(n, &up)| up.then(|| get(&n.metrics, "/readyz")).flatten())
            .collect::<Vec<_>>();
        let serving = |a: &Option<(u16, String)>| matches!(a, Some((200, body)) if body.starts_with("serving epoch "));
        if let Some(leader) = last.iter().position(serving) {
            let want = format!("follower of {}\n", nodes[leader].client_addr());
            let followed = last.iter().enumerate().all(|(i, a)| {
                i == leader || !alive[i] || matches!(a, Some((200, body)) if *body == want)
            });
            if followed {
                return leader;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the cluster never settled on a ready leader and followers; last {last:?}");
}

/// Waits until `node`'s `/readyz` fails, checking on every round that `/healthz` still passes;
/// returns the readiness body.
fn wait_unready_but_alive(node: &Node) -> String {
    let (_, body) = wait_for(
        &node.metrics,
        "/readyz",
        |s, _| s == 503,
        || {
            let health = get(&node.metrics, "/healthz");
            assert!(
                matches!(health, Some((200, _))),
                "node {} not healthy: {health:?}",
                node.id
            );
        },
    );
    body
}

/// Leader and followers are ready; a node cut off from both peers becomes unready but stays
/// healthy, as leader (its lease runs out) and as follower (no leader known), and a leader
/// that regains a quorum is ready again.
#[test]
fn a_cluster_reports_leader_followers_and_isolation() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Node> = (1..=3)
        .map(|id| Node {
            id,
            client_port: free_port(),
            peer_port: free_port(),
            metrics: format!("127.0.0.1:{}", free_port()),
        })
        .collect();
    let members = nodes
        .iter()
        .map(|n| format!("{}=127.0.0.1:{}/{}", n.id, n.client_port, n.peer_port))
        .collect::<Vec<_>>()
        .join(",");
    let mut servers: Vec<Option<Server>> = nodes
        .iter()
        .map(|n| Some(start(dir.path(), n, &members)))
        .collect();
    let mut alive = vec![true; 3];

    let leader = wait_settled(&nodes, &alive);
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();

    // The leader alone: it keeps leading in raft's eyes, but without a quorum its lease runs
    // out and it stops granting.
    for &f in &followers {
        servers[f].take().unwrap().kill9();
        alive[f] = false;
    }
    let body = wait_unready_but_alive(&nodes[leader]);
    assert!(
        body.starts_with("leader of epoch ") && body.ends_with(" without a lease\n")
            || body == "no leader known\n",
        "{body:?}"
    );

    // One follower back: a quorum again, and a leader serving.
    let back = followers[0];
    servers[back] = Some(start(dir.path(), &nodes[back], &members));
    alive[back] = true;
    let leader = wait_settled(&nodes, &alive);
    let follower = (0..3).find(|&i| alive[i] && i != leader).unwrap();

    // The follower alone: once it stops hearing the leader, no leader is known.
    servers[leader].take().unwrap().kill9();
    alive[leader] = false;
    let body = wait_unready_but_alive(&nodes[follower]);
    assert_eq!(body, "no leader known\n");
}

/// A node whose data directory is removed fails its next window extension permanently:
/// serving is poisoned and the process exits 1. The probes never pass again in between:
/// `/healthz` answers 200 until the poisoning, then 503 until the process is gone. (The 503
/// lasts only as long as the drain, so the test cannot demand to see it.)
#[test]
fn a_poisoned_node_fails_health_then_exits() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut server = Server::start(
        &data,
        &["--window-ahead", "400ms", "--metrics-listen", &metrics],
    );
    wait_for(&metrics, "/healthz", |s, _| s == 200, || {});

    std::fs::remove_dir_all(&data).unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + HANG_GUARD;
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the node never stopped");
        if let Some((code, body)) = get(&metrics, "/healthz")
            && seen.last().map(|(c, _)| *c) != Some(code)
        {
            seen.push((code, body));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!("/healthz answers, in order: {seen:?}");
    assert_eq!(status.code(), Some(1), "{}", drain(&server.stderr));
    let codes: Vec<u16> = seen.iter().map(|(c, _)| *c).collect();
    assert!(
        matches!(codes.as_slice(), [200] | [200, 503] | [503] | []),
        "{seen:?}"
    );
    if let Some((503, body)) = seen.last() {
        assert!(body.starts_with("failed: "), "{body}");
    }
}
