//! The client against the project's real server (`tso-server`) over loopback: the file backend
//! for a single node, and nodes sharing an in-memory high-water for hints and failover.

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::HANG_GUARD;
use common::real::{ClusterBackend, ClusterStore, Pair, RealServer};
use tokio::task::JoinSet;
use tso_client::{Client, ClientBuilder, Epoch, LOGICAL_COUNT};
use tso_server::backend::Leadership;

fn builder() -> ClientBuilder {
    Client::builder()
        .overall_timeout(HANG_GUARD)
        .attempt_timeout(Duration::from_secs(10))
        .backoff(Duration::from_millis(1), Duration::from_millis(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_callers_get_unique_increasing_timestamps_from_the_real_server() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = RealServer::start_file(dir.path(), "127.0.0.1:0".parse().unwrap());
    let client = builder().connect([server.endpoint()]).await.unwrap();
    let mut tasks = JoinSet::new();
    for _ in 0..256 {
        let client = client.clone();
        tasks.spawn(async move {
            let mut got = Vec::new();
            for _ in 0..20 {
                got.push(client.get_ts().await.unwrap());
            }
            got
        });
    }
    let mut all = HashSet::new();
    while let Some(got) = tasks.join_next().await {
        let got = got.unwrap();
        assert!(got.windows(2).all(|w| w[0] < w[1]));
        all.extend(got);
    }
    assert_eq!(all.len(), 256 * 20);
}

#[tokio::test]
async fn a_batch_across_the_logical_boundary_from_the_real_server() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = RealServer::start_file(dir.path(), "127.0.0.1:0".parse().unwrap());
    let client = builder().connect([server.endpoint()]).await.unwrap();
    let count = u64::from(LOGICAL_COUNT) + 1000;
    let batch = client.get_ts_batch(count).await.unwrap();
    assert_eq!(batch.count(), count);
    assert_eq!(batch.ranges().len(), 2);
    let all: Vec<_> = batch.iter().collect();
    assert!(all.windows(2).all(|w| w[0] < w[1]));
    let next = client.get_ts().await.unwrap();
    assert!(next > batch.last());
}

#[tokio::test]
async fn the_client_survives_a_real_server_restart() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = RealServer::start_file(dir.path(), "127.0.0.1:0".parse().unwrap());
    let addr = server.addr();
    let client = builder().connect([server.endpoint()]).await.unwrap();
    let before = client.get_ts_batch(1).await.unwrap();
    server.stop();

    let _server = RealServer::start_file(dir.path(), addr);
    let after = client.get_ts_batch(1).await.unwrap();
    assert!(after.first() > before.first());
    assert!(
        after.ranges()[0].epoch() > before.ranges()[0].epoch(),
        "a restart is a new epoch"
    );
}

#[tokio::test]
async fn a_real_follower_hint_leads_to_the_leader() {
    let _turn = crate::common::topic(module_path!());
    let store = Arc::new(ClusterStore::default());
    let epoch = Epoch::new(1);
    let mut leader = RealServer::start(ClusterBackend::new(
        store.clone(),
        Leadership::Leader { epoch },
    ));
    leader.wait_serving(epoch).await;
    let follower = RealServer::start(ClusterBackend::new(
        store,
        Leadership::Follower {
            leader_endpoint: Some(leader.endpoint()),
            leader_epoch: Some(epoch),
        },
    ));
    let client = builder()
        .attempts_max(1)
        .connect([follower.endpoint()])
        .await
        .unwrap();
    let batch = client.get_ts_batch(3).await.unwrap();
    assert_eq!(batch.ranges()[0].epoch(), epoch);
    assert_eq!(
        client.leader(),
        (Some(format!("http://{}", leader.endpoint())), epoch)
    );
}

#[tokio::test]
async fn the_client_follows_a_failover_between_real_servers() {
    let _turn = crate::common::topic(module_path!());
    let mut pair = Pair::start().await;
    let client = builder()
        .connect([pair.b.endpoint(), pair.a.endpoint()])
        .await
        .unwrap();
    let before = client.get_ts_batch(5).await.unwrap();
    assert_eq!(before.ranges()[0].epoch(), Pair::FIRST);

    pair.fail_over().await;

    let after = client.get_ts_batch(5).await.unwrap();
    assert!(after.first() > before.last());
    assert_eq!(after.ranges()[0].epoch(), Pair::SECOND);
    assert_eq!(
        client.leader(),
        (Some(format!("http://{}", pair.b.endpoint())), Pair::SECOND)
    );
}

/// Waits (hang guard only) until `counter` reaches `target`.
async fn wait_for_count(counter: &AtomicU64, target: u64) {
    let reached = async {
        while counter.load(Ordering::SeqCst) < target {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, reached)
        .await
        .expect("callers stopped getting timestamps");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_under_load_ride_through_a_real_server_restart() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = RealServer::start_file(dir.path(), "127.0.0.1:0".parse().unwrap());
    let addr = server.addr();
    let client = builder().connect([server.endpoint()]).await.unwrap();
    let granted = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    for _ in 0..32 {
        let (client, granted, done) = (client.clone(), granted.clone(), done.clone());
        tasks.spawn(async move {
            let mut got = Vec::new();
            while !done.load(Ordering::SeqCst) {
                match client.get_ts().await {
                    Ok(ts) => {
                        got.push(ts);
                        granted.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(error) => assert!(error.is_retryable(), "{error}"),
                }
            }
            got
        });
    }
    wait_for_count(&granted, 2_000).await;
    server.stop();
    let _server = RealServer::start_file(dir.path(), addr);
    let after_restart = granted.load(Ordering::SeqCst) + 2_000;
    wait_for_count(&granted, after_restart).await;
    done.store(true, Ordering::SeqCst);

    let mut all = HashSet::new();
    while let Some(got) = tasks.join_next().await {
        let got = got.unwrap();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "a caller's values went back"
        );
        all.extend(got);
    }
    assert_eq!(
        all.len() as u64,
        granted.load(Ordering::SeqCst),
        "duplicates"
    );
}
