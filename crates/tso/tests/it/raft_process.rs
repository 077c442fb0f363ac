//! Three `tso serve --backend raft` processes on loopback: kill -9 of whoever leads, repeated,
//! with a client that knows all three addresses. Every timestamp after a failover is above
//! every one before it; the time from the kill to the first timestamp is printed.

use crate::common;

use std::time::{Duration, Instant};

use common::raft::*;
use common::*;
use tso_proto::v1::GetTsRequest;

/// Kills of the leader in one run; each is followed by a restart of the killed node.
const KILL_ROUNDS: usize = 5;

/// Polls every node until one grants; returns its index and the grant's (first, last).
async fn first_grant(nodes: &[RaftNode], alive: &[bool]) -> (usize, u64, u64) {
    let wait = async {
        let mut clients: Vec<_> = nodes.iter().map(RaftNode::connect).collect();
        loop {
            for (i, client) in clients.iter_mut().enumerate() {
                if !alive[i] {
                    continue;
                }
                if let Ok(reply) = client.get_ts(GetTsRequest { count: 3 }).await {
                    let r = reply.into_inner();
                    let first = r.physical_ms << 18 | r.logical_start as u64;
                    return (i, first, first + r.count as u64 - 1);
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, wait)
        .await
        .expect("no node granted within the hang guard")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_repeated_fails_over_without_regression() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let nodes = raft_nodes(3);
    let members = members(&nodes);
    let mut servers: Vec<Option<Server>> = nodes
        .iter()
        .map(|n| Some(n.start(dir.path(), Some(&members))))
        .collect();
    let mut alive = vec![true; 3];

    let (mut leader, _, mut last) = first_grant(&nodes, &alive).await;
    let mut failovers = Vec::new();
    for round in 0..KILL_ROUNDS {
        let mut client = nodes[leader].connect();
        for _ in 0..50 {
            let reply = client
                .get_ts(tso_proto::v1::GetTsRequest { count: 5 })
                .await;
            let (first, end) = match reply {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    let first = reply.physical_ms << 18 | reply.logical_start as u64;
                    (first, first + 4)
                }
                // An election nobody asked for (right after start-up a node that came up late
                // campaigns once): follow it like any failover, values must still rise.
                Err(status) => {
                    eprintln!("round {round}: leader refused ({status}); finding the leader");
                    let (next, first, end) = first_grant(&nodes, &alive).await;
                    leader = next;
                    client = nodes[leader].connect();
                    (first, end)
                }
            };
            assert!(first > last, "round {round}: {first} not above {last}");
            last = end;
        }
        servers[leader].take().unwrap().kill9();
        alive[leader] = false;
        let killed_at = Instant::now();
        let (next, first, end) = first_grant(&nodes, &alive).await;
        failovers.push(killed_at.elapsed());
        assert_ne!(next, leader);
        assert!(
            first > last,
            "after failover {round}: {first} not above {last}"
        );
        last = end;
        servers[leader] = Some(nodes[leader].start(dir.path(), Some(&members)));
        alive[leader] = true;
        // A failure right after a restart would find the restarted node not yet caught up (it
        // then campaigns with a stale log and splits the vote): wait until it follows the leader.
        wait_follows(&nodes[leader], &nodes[next]).await;
        leader = next;
    }
    failovers.sort();
    eprintln!(
        "failover from kill -9 to the first timestamp: median {:?}, worst {:?} (of {KILL_ROUNDS})",
        failovers[failovers.len() / 2],
        failovers[failovers.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_three_killed_and_restarted_without_members_continue_above() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let nodes = raft_nodes(3);
    let members = members(&nodes);
    let alive = vec![true; 3];
    let mut last = 0;
    for round in 0..3 {
        // First start with the members list; later starts rejoin from the data directories.
        let list = (round == 0).then_some(members.as_str());
        let servers: Vec<Server> = nodes.iter().map(|n| n.start(dir.path(), list)).collect();
        let (leader, first, end) = first_grant(&nodes, &alive).await;
        assert!(first > last, "round {round}: {first} not above {last}");
        last = end;
        let mut client = nodes[leader].connect();
        for _ in 0..20 {
            let (first, end) = last_of(&mut client, 4).await;
            assert!(first > last, "round {round}: {first} not above {last}");
            last = end;
        }
        for server in servers {
            server.kill9();
        }
    }
}

/// Quorum lost (two of three nodes killed): calls to the survivor fail within the client's
/// deadline instead of hanging, nothing it answers is below what was granted, and service
/// resumes above everything once the two come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_quorum_fails_within_the_deadline_and_service_resumes_above() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let nodes = raft_nodes(3);
    let members = members(&nodes);
    let mut servers: Vec<Option<Server>> = nodes
        .iter()
        .map(|n| Some(n.start(dir.path(), Some(&members))))
        .collect();
    let (leader, _, mut last) = first_grant(&nodes, &[true; 3]).await;

    // Keep the leader, kill the other two: the leader loses its quorum (and its lease).
    for (i, server) in servers.iter_mut().enumerate() {
        if i != leader {
            server.take().unwrap().kill9();
        }
    }
    let endpoint = format!("127.0.0.1:{}", nodes[leader].client_port);
    let killed_at = std::time::Instant::now();
    let mut refused = false;
    while killed_at.elapsed() < HANG_GUARD {
        let started = std::time::Instant::now();
        let (status, out, _) = run_tso(&["get", "--endpoints", &endpoint, "--timeout", "1s"]);
        assert!(started.elapsed() < HANG_GUARD, "tso get hung");
        if status.success() {
            // Granted inside the lease that was still running at the kill: above the past.
            let value: u64 = out.trim().parse().unwrap();
            assert!(value > last, "{value} not above {last}");
            last = value;
        } else {
            eprintln!("refused {:?} after the kill", killed_at.elapsed());
            refused = true;
            break;
        }
    }
    assert!(refused, "a leader without a quorum kept granting");

    // Quorum back: service resumes above everything granted before.
    for (i, server) in servers.iter_mut().enumerate() {
        if i != leader {
            *server = Some(nodes[i].start(dir.path(), None));
        }
    }
    let (_, first, _) = first_grant(&nodes, &[true; 3]).await;
    assert!(
        first > last,
        "{first} not above {last} after the quorum came back"
    );
}
