//! Stamping leases on a three-node raft cluster over real gRPC: a lease acquired on one leader
//! survives the failover to the next (it still binds the frontier, it renews above the old
//! high-water), and an acquire racing the failover does not drop another holder's live lease.

use crate::common;

use std::time::Duration;

use common::raft::{CLUSTER_WAIT, start_cluster};
use common::*;
use tokio::time::Instant;
use tonic::transport::Channel;
use tso_proto::v1::tso_service_client::TsoServiceClient;
use tso_proto::v1::{AcquireLeaseRequest, GetSafeFrontierRequest, RenewLeaseRequest};
use tso_server::backend::raft::Links;
use tso_server::{Config, OracleGuard, ServingState};

type Client = TsoServiceClient<Channel>;

fn serving(servers: &[TestServer], except: Option<usize>) -> Option<usize> {
    let serving: Vec<usize> = (0..servers.len())
        .filter(|&i| Some(i) != except)
        .filter(|&i| matches!(*servers[i].serving.borrow(), ServingState::Serving { .. }))
        .collect();
    match serving[..] {
        [one] => Some(one),
        _ => None,
    }
}

async fn wait_serving(servers: &[TestServer], except: Option<usize>) -> usize {
    let deadline = Instant::now() + CLUSTER_WAIT;
    loop {
        if let Some(i) = serving(servers, except) {
            return i;
        }
        assert!(Instant::now() < deadline, "no single serving leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Calls `call` on each client in turn until one answers, bounded by the cluster wait.
async fn on_leader<T, F, Fut>(clients: &mut [Client], mut call: F) -> T
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + CLUSTER_WAIT;
    let mut i = 0;
    loop {
        match call(clients[i % clients.len()].clone()).await {
            Ok(reply) => return reply,
            Err(status) => {
                assert!(
                    Instant::now() < deadline,
                    "no node answered: last {status:?}"
                );
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn acquire_request(holder: &[u8]) -> AcquireLeaseRequest {
    AcquireLeaseRequest {
        holder: holder.to_vec(),
        holder_epoch: 1,
        ttl_ms: 60_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_survives_a_failover_and_a_racing_acquire() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let links = Links::default();
    let mut nodes = start_cluster(dir.path(), 3, &links).await;
    let servers: Vec<TestServer> = nodes
        .iter()
        .map(|node| {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let guard = OracleGuard::start(node.backend.clone(), Config::default());
            TestServer::from_guard(listener, guard)
        })
        .collect();
    let old = wait_serving(&servers, None).await;
    let mut clients = Vec::new();
    for server in &servers {
        clients.push(server.client().await);
    }

    let a = on_leader(&mut clients, |mut c| async move {
        c.acquire_lease(acquire_request(b"holder-a")).await
    })
    .await
    .into_inner();
    let old_high_water = nodes[old].backend.applied_high_water_ms();
    assert!(old_high_water >= a.ts_upper_bound);

    // Another holder acquires while the leader goes away.
    let mut racing_clients: Vec<Client> = clients
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != old)
        .map(|(_, c)| c.clone())
        .collect();
    let racer = tokio::spawn(async move {
        on_leader(&mut racing_clients, |mut c| async move {
            c.acquire_lease(acquire_request(b"holder-b")).await
        })
        .await
        .into_inner()
    });
    nodes[old].stop().await;
    let new = wait_serving(&servers, Some(old)).await;
    let b = racer.await.unwrap();
    assert_ne!(
        a.lease_id, b.lease_id,
        "lease ids are unique across the failover"
    );
    assert!(b.ts_upper_bound > a.ts_upper_bound);

    let mut to_new = clients[new].clone();
    let reply = on_leader(std::slice::from_mut(&mut to_new), |mut c| async move {
        c.get_safe_frontier(GetSafeFrontierRequest {}).await
    })
    .await
    .into_inner();
    assert!(
        reply.frontier_physical_ms <= a.ts_upper_bound,
        "the new leader's frontier {} passed the live lease's bound {}",
        reply.frontier_physical_ms,
        a.ts_upper_bound
    );
    let lease_id = a.lease_id;
    let renewed = on_leader(std::slice::from_mut(&mut to_new), |mut c| async move {
        c.renew_lease(RenewLeaseRequest { lease_id }).await
    })
    .await
    .into_inner();
    assert!(
        renewed.ts_upper_bound > old_high_water,
        "a bound renewed after the failover is above the old high-water"
    );
    for server in servers {
        let _ = server.stop().await;
    }
    for node in &mut nodes {
        node.stop().await;
    }
}
