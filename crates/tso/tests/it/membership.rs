//! Membership changes at run time over real `tso serve --backend raft` processes, driven by the
//! real `tso admin` binary: replacing a dead node while a client runs, the leader redirect,
//! idempotence, refusals that would lose quorum, and removing the leader.

use crate::common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;

struct Node {
    id: u64,
    client_port: u16,
    peer_port: u16,
    admin_port: u16,
}

impl Node {
    fn new(id: u64) -> Node {
        Node {
            id,
            client_port: free_port(),
            peer_port: free_port(),
            admin_port: free_port(),
        }
    }

    /// The member form `HOST:CLIENT_PORT/PEER_PORT/ADMIN_PORT`.
    fn addrs(&self) -> String {
        format!(
            "127.0.0.1:{}/{}/{}",
            self.client_port, self.peer_port, self.admin_port
        )
    }

    fn client(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    fn admin(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }
}

fn members_flag(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .map(|n| format!("{}={}", n.id, n.addrs()))
        .collect::<Vec<_>>()
        .join(",")
}

fn data_dir(dir: &std::path::Path, n: &Node) -> std::path::PathBuf {
    dir.join(format!("node-{}", n.id))
}

/// Starts node `n` with its admin port and `extra` flags; waits for `serving on`.
fn start(dir: &std::path::Path, n: &Node, extra: &[&str]) -> Server {
    let mut command = Command::new(tso_bin());
    command
        .args(["serve", "--backend", "raft", "--node-id", &n.id.to_string()])
        .args(["--listen", &n.client()])
        .args(["--peer-addr", &format!("127.0.0.1:{}", n.peer_port)])
        .args(["--admin-listen", &n.admin()])
        .arg("--data-dir")
        .arg(data_dir(dir, n))
        .args(extra);
    Server::spawn(command)
        .unwrap_or_else(|(status, log)| panic!("node {} exited with {status}: {log}", n.id))
}

/// Waits until the server logs a line containing `text`.
fn wait_logged(server: &Server, text: &str) {
    let deadline = Instant::now() + HANG_GUARD;
    while Instant::now() < deadline {
        if let Ok(line) = server.stderr.recv_timeout(Duration::from_millis(200))
            && line.contains(text)
        {
            return;
        }
    }
    panic!("the server never logged {text:?}");
}

/// `tso admin ARGS --endpoint ENDPOINT`: (success, stdout, stderr).
fn admin(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["admin"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--endpoint", endpoint]);
    let (status, out, err) = run_tso(&all);
    eprintln!("tso admin {args:?} --endpoint {endpoint}: {status}\n{out}{err}");
    (status.success(), out, err)
}

fn admin_ok(endpoint: &str, args: &[&str]) -> String {
    let (ok, out, err) = admin(endpoint, args);
    assert!(ok, "tso admin {args:?} failed: {out}{err}");
    out
}

/// Parses `tso admin members`: the leader and the voters.
struct View {
    leader: Option<u64>,
    voters: BTreeSet<u64>,
    learners: BTreeSet<u64>,
}

fn parse_members(out: &str) -> View {
    let leader = out
        .lines()
        .find_map(|l| l.strip_prefix("leader: node "))
        .and_then(|rest| rest.split(',').next())
        .and_then(|id| id.parse().ok());
    let mut view = View {
        leader,
        voters: BTreeSet::new(),
        learners: BTreeSet::new(),
    };
    for line in out.lines() {
        let mut cells = line.split_whitespace();
        let (Some(id), Some(role)) = (cells.next(), cells.next()) else {
            continue;
        };
        let Ok(id) = id.parse::<u64>() else { continue };
        if role.starts_with("voter") {
            view.voters.insert(id);
        } else if role == "learner" {
            view.learners.insert(id);
        }
    }
    view
}

/// Polls `tso admin members` at `endpoint` until `done` holds for the view.
fn wait_view(endpoint: &str, what: &str, done: impl Fn(&View) -> bool) -> View {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let (ok, out, _) = admin(endpoint, &["members"]);
        if ok {
            let view = parse_members(&out);
            if done(&view) {
                return view;
            }
        }
        assert!(Instant::now() < deadline, "never saw {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A client that keeps retrying (through an election and the new leader's fence) up to the
/// hang guard, for checks that one call eventually succeeds.
async fn patient_client(endpoints: impl IntoIterator<Item = String>) -> tso_client::Client {
    tso_client::Client::builder()
        .overall_timeout(HANG_GUARD)
        .attempts_max(1_000)
        .connect(endpoints)
        .await
        .unwrap()
}

/// A client asking for one timestamp after another, checking each is above the one before.
struct Load {
    granted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Load {
    async fn start(endpoints: Vec<String>) -> Load {
        let client = tso_client::Client::connect(endpoints).await.unwrap();
        let granted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (granted, stop) = (granted.clone(), stop.clone());
            async move {
                let mut last = 0u64;
                let mut errors = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match client.get_ts().await {
                        Ok(ts) => {
                            let ts = u64::from(ts);
                            assert!(ts > last, "timestamp {ts} not above {last}");
                            last = ts;
                            granted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            errors += 1;
                            eprintln!("client: {e}");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                errors
            }
        });
        Load {
            granted,
            stop,
            task,
        }
    }

    /// Waits until the client got `count` more timestamps.
    async fn progresses(&self, count: u64, phase: &str) {
        let from = self.granted.load(Ordering::Relaxed);
        let wait = async {
            while self.granted.load(Ordering::Relaxed) < from + count && !self.task.is_finished() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(HANG_GUARD, wait)
            .await
            .unwrap_or_else(|_| panic!("the client stopped getting timestamps ({phase})"));
        assert!(!self.task.is_finished(), "the client task ended ({phase})");
    }

    async fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.task.await.expect("the client saw a regression");
        eprintln!(
            "client: {} timestamps, {errors} failed calls (retried)",
            self.granted.load(Ordering::Relaxed)
        );
    }
}

/// The documented procedure (docs/membership.md): node 3 dies with its disk; node 4 joins,
/// is added, promoted, and node 3 removed, all through `tso admin`, while a client keeps
/// getting rising timestamps. The new cluster then survives the loss of its leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_replaced_while_a_client_runs() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Node> = (1..=4).map(Node::new).collect();
    let members = members_flag(&[&nodes[0], &nodes[1], &nodes[2]]);
    let mut servers: Vec<Option<Server>> = nodes[..3]
        .iter()
        .map(|n| Some(start(dir.path(), n, &["--members", &members])))
        .collect();
    servers.push(None);
    let load = Load::start(nodes[..3].iter().map(Node::client).collect()).await;
    load.progresses(20, "three nodes").await;

    // Node 3 dies and loses its disk.
    servers[2].take().unwrap().kill9();
    std::fs::remove_dir_all(data_dir(dir.path(), &nodes[2])).unwrap();
    load.progresses(20, "node 3 dead").await;

    // Node 4 joins, is added as a learner, promoted; node 3 is removed.
    let joined = start(dir.path(), &nodes[3], &["--join"]);
    wait_logged(&joined, "waiting to be added to a cluster");
    servers[3] = Some(joined);
    let any = nodes[0].admin();
    admin_ok(&any, &["add-learner", "4", &nodes[3].addrs()]);
    admin_ok(&any, &["promote", "4"]);
    admin_ok(&any, &["remove", "3"]);
    let view = parse_members(&admin_ok(&any, &["members"]));
    assert_eq!(view.voters, BTreeSet::from([1, 2, 4]));
    assert!(
        view.learners.is_empty(),
        "learners left: {:?}",
        view.learners
    );
    load.progresses(20, "after the replacement").await;

    // The new cluster keeps serving without its leader (2 of 3), unless the leader is node 4,
    // which then stays to serve a client that knows only node 4.
    let leader = view.leader.expect("a leader");
    let victim = if leader == 4 { 1 } else { leader };
    servers[victim as usize - 1].take().unwrap().kill9();
    load.progresses(20, "after losing a node of the new cluster")
        .await;
    let only_4 = patient_client([nodes[3].client()]).await;
    let ts = only_4
        .get_ts()
        .await
        .expect("a client of node 4 alone finds the leader");
    assert!(u64::from(ts) > 0);
    load.finish().await;
}

/// On a follower's admin port, changes follow the redirect to the leader; every change is
/// idempotent on the node id; wrong ids and other addresses are refused; the removed leader
/// steps down and the rest elect; a removal that would lose quorum is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_redirect_are_idempotent_and_refuse_to_lose_quorum() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<Node> = (1..=4).map(Node::new).collect();
    let members = members_flag(&[&nodes[0], &nodes[1], &nodes[2]]);
    let mut servers: Vec<Option<Server>> = nodes[..3]
        .iter()
        .map(|n| Some(start(dir.path(), n, &["--members", &members])))
        .collect();
    let view = wait_view(&nodes[0].admin(), "a leader", |v| v.leader.is_some());
    let leader = view.leader.unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let on_follower = nodes[follower as usize - 1].admin();

    // A joined node restarts without --join, before and after it is added.
    start(dir.path(), &nodes[3], &["--join"]).kill9();
    servers.push(Some(start(dir.path(), &nodes[3], &[])));
    let (ok, out, err) = admin(&on_follower, &["add-learner", "4", &nodes[3].addrs()]);
    assert!(ok, "{out}{err}");
    assert!(
        err.contains("following to the leader"),
        "no redirect: {err}"
    );
    assert!(out.contains("added node 4 as a learner"), "{out}");
    let again = admin_ok(&on_follower, &["add-learner", "4", &nodes[3].addrs()]);
    assert!(again.contains("nothing to change"), "{again}");
    let other = format!("127.0.0.1:{}/{}", free_port(), free_port());
    let (ok, _, err) = admin(&on_follower, &["add-learner", "4", &other]);
    assert!(!ok && err.contains("other addresses"), "{err}");
    let (ok, _, err) = admin(&on_follower, &["promote", "7"]);
    assert!(!ok && err.contains("not a learner"), "{err}");
    let gone = admin_ok(&on_follower, &["remove", "7"]);
    assert!(gone.contains("not a member"), "{gone}");
    servers[3].take().unwrap().kill9();
    servers[3] = Some(start(dir.path(), &nodes[3], &[]));
    admin_ok(&on_follower, &["promote", "4"]);
    let again = admin_ok(&on_follower, &["promote", "4"]);
    assert!(again.contains("nothing to change"), "{again}");

    // A learner that never caught up (nothing runs at its addresses) is not promoted; as a
    // learner it is removed without a quorum check.
    let nowhere = format!("127.0.0.1:{}/{}", free_port(), free_port());
    admin_ok(&on_follower, &["add-learner", "5", &nowhere]);
    let (ok, _, err) = admin(&on_follower, &["promote", "5"]);
    assert!(!ok && err.contains("learner 5"), "{err}");
    admin_ok(&on_follower, &["remove", "5"]);

    // Removing the leader: it steps down once the change commits, the rest elect.
    let survivor = nodes[follower as usize - 1].admin();
    admin_ok(&survivor, &["remove", &leader.to_string()]);
    let view = wait_view(&survivor, "a new leader among the rest", |v| {
        v.leader.is_some_and(|l| l != leader) && !v.voters.contains(&leader)
    });
    assert_eq!(view.voters.len(), 3, "voters {:?}", view.voters);
    let removed = nodes[leader as usize - 1].admin();
    let (_, out, _) = admin(&removed, &["members", "--local"]);
    assert!(
        !out.contains(&format!("leader: node {leader},")),
        "the removed leader still claims to lead: {out}"
    );
    let ts = tso_client::Client::builder()
        .attempts_max(1)
        .connect([nodes[leader as usize - 1].client()])
        .await
        .unwrap()
        .get_ts()
        .await;
    assert!(ts.is_err(), "the removed leader still grants: {ts:?}");
    let voters = view
        .voters
        .iter()
        .map(|id| nodes[*id as usize - 1].client());
    let ts = patient_client(voters).await.get_ts().await;
    assert!(ts.is_ok(), "the rest serve: {ts:?}");

    // One of the three voters dies: removing a live follower would leave one healthy voter
    // of two, and is refused.
    let new_leader = view.leader.unwrap();
    let followers: Vec<u64> = view
        .voters
        .iter()
        .copied()
        .filter(|id| *id != new_leader)
        .collect();
    servers[followers[0] as usize - 1].take().unwrap().kill9();
    let on_leader = nodes[new_leader as usize - 1].admin();
    let (ok, _, err) = admin(&on_leader, &["remove", &followers[1].to_string()]);
    assert!(!ok && err.contains("healthy"), "{err}");
    let view = parse_members(&admin_ok(&on_leader, &["members"]));
    assert!(
        view.voters.contains(&followers[1]),
        "the refused removal happened"
    );
}

/// A one-node cluster: its only voter cannot be removed; an unknown endpoint is a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_voter_is_never_removed() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let node = Node::new(1);
    let _server = start(dir.path(), &node, &["--members", &members_flag(&[&node])]);
    wait_view(&node.admin(), "node 1 leading", |v| v.leader == Some(1));
    let (ok, _, err) = admin(&node.admin(), &["remove", "1"]);
    assert!(!ok && err.contains("last voter"), "{err}");
    let (ok, _, err) = admin(&format!("127.0.0.1:{}", free_port()), &["members"]);
    assert!(
        !ok && err.contains("cannot reach the admin service"),
        "{err}"
    );
    // A fresh node with neither --members nor --join does not start.
    let other = Node::new(2);
    let (status, _, err) = run_tso(&[
        "serve",
        "--backend",
        "raft",
        "--node-id",
        "2",
        "--listen",
        &other.client(),
        "--peer-addr",
        &format!("127.0.0.1:{}", other.peer_port),
        "--data-dir",
        dir.path().join("fresh").to_str().unwrap(),
    ]);
    assert!(!status.success() && err.contains("--join"), "{err}");
}
