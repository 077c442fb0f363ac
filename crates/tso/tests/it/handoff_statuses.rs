//! Calls on a leader that is handing its leadership on (SIGTERM) end with a status a client can
//! act on: the answer, "not leader" with a hint, or UNAVAILABLE; never UNKNOWN, CANCELLED or
//! INTERNAL, which leave a client unsure whether its call took effect. Raw clients keep one
//! connection per node (as long-lived clients do) and follow hints; before the server waited
//! for them to leave after its handoff, closing its connections cut some of their calls short
//! (hyper's "connection closed", seen as CANCELLED) in most runs of five handoffs.

use crate::common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::raft::*;
use common::*;
use prost::Message;
use tonic::transport::Channel;
use tso_proto::v1::GetTsRequest;
use tso_proto::v1::tso_service_client::TsoServiceClient;

fn raw_client(endpoint: &str) -> TsoServiceClient<Channel> {
    let channel = Channel::from_shared(format!("http://{endpoint}"))
        .unwrap()
        .connect_timeout(Duration::from_millis(200))
        .timeout(Duration::from_secs(2))
        .connect_lazy();
    TsoServiceClient::new(channel)
}

/// One raw client: one connection, to whichever node the last hint named.
fn raw_caller(
    endpoints: Vec<String>,
    stop: Arc<AtomicBool>,
    codes: Arc<Mutex<BTreeMap<String, u64>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut at = 0;
        // One connection per node, kept for the whole run, as a long-lived client would.
        let clients: Vec<_> = endpoints.iter().map(|e| raw_client(e)).collect();
        let mut client = clients[at].clone();
        while !stop.load(Ordering::Relaxed) {
            match client.get_ts(GetTsRequest { count: 1 }).await {
                Ok(_) => {}
                Err(status) => {
                    if !matches!(
                        status.code(),
                        tonic::Code::FailedPrecondition | tonic::Code::Unavailable
                    ) {
                        eprintln!("ambiguous status: {status:?}");
                    }
                    *codes
                        .lock()
                        .unwrap()
                        .entry(format!("{:?}", status.code()))
                        .or_default() += 1;
                    let hint = status
                        .metadata()
                        .get_bin(tso_proto::LEADER_HINT_KEY)
                        .and_then(|b| b.to_bytes().ok())
                        .and_then(|b| tso_proto::v1::LeaderHint::decode(b.as_ref()).ok())
                        .and_then(|h| h.leader_endpoint);
                    at = match hint.and_then(|h| endpoints.iter().position(|e| *e == h)) {
                        Some(i) => i,
                        None => (at + 1) % endpoints.len(),
                    };
                    client = clients[at].clone();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_a_leader_handing_off_end_with_an_actionable_status() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let nodes = raft_nodes(3);
    let members = members(&nodes);
    let mut servers: Vec<Option<Server>> = nodes
        .iter()
        .map(|n| Some(n.start(dir.path(), Some(&members))))
        .collect();
    let endpoints: Vec<String> = nodes.iter().map(RaftNode::endpoint).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let codes = Arc::new(Mutex::new(BTreeMap::new()));
    let callers: Vec<_> = (0..16)
        .map(|_| raw_caller(endpoints.clone(), stop.clone(), codes.clone()))
        .collect();
    for round in 0..5 {
        // Find the leader: the node that grants.
        let leader = loop {
            let mut found = None;
            for (i, n) in nodes.iter().enumerate() {
                if servers[i].is_some()
                    && n.connect().get_ts(GetTsRequest { count: 1 }).await.is_ok()
                {
                    found = Some(i);
                }
            }
            if let Some(i) = found {
                break i;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut server = servers[leader].take().unwrap();
        server.signal(libc::SIGTERM);
        let status = tokio::task::spawn_blocking(move || server.wait_exit())
            .await
            .unwrap();
        eprintln!("round {round}: leader {} exited {status}", nodes[leader].id);
        servers[leader] = Some(nodes[leader].start(dir.path(), None));
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }
    let codes = codes.lock().unwrap().clone();
    eprintln!("statuses seen: {codes:?}");
    for bad in ["Unknown", "Cancelled", "Internal"] {
        assert!(!codes.contains_key(bad), "a call ended {bad}: {codes:?}");
    }
}
