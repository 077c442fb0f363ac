//! Dense sequences through the client against the project's real server (`tso-server`) over
//! loopback: the file backend keeps every key dense across concurrent callers and across a
//! restart, and a replicated backend across a failover (every backend keeps sequences, so no
//! real server answers `UNIMPLEMENTED`; the client's handling of that answer is tested against
//! the scripted server in `seq.rs`).

use crate::common;

use std::time::Duration;

use common::HANG_GUARD;
use common::real::{Pair, RealServer};
use tokio::task::JoinSet;
use tso_client::{Client, ClientBuilder};

fn builder() -> ClientBuilder {
    Client::builder()
        .overall_timeout(HANG_GUARD)
        .attempt_timeout(Duration::from_secs(10))
        .backoff(Duration::from_millis(1), Duration::from_millis(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_keep_every_key_dense_on_the_real_server() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = RealServer::start_file(dir.path(), "127.0.0.1:0".parse().unwrap());
    let client = builder().connect([server.endpoint()]).await.unwrap();
    let mut tasks = JoinSet::new();
    for caller in 0..32u32 {
        let client = client.clone();
        tasks.spawn(async move {
            let mut blocks = Vec::new();
            for i in 0..10u32 {
                let count = 1 + (caller + i) % 7;
                blocks.push(client.get_seq("shared", count).await.unwrap().range());
                let batch = [("shared-a", 2), ("shared-b", 3)];
                let got = client.get_seq_batch(&batch).await.unwrap();
                assert_eq!(got.blocks()[1].count(), 3);
            }
            blocks
        });
    }
    let mut blocks = Vec::new();
    while let Some(got) = tasks.join_next().await {
        blocks.extend(got.unwrap());
    }
    blocks.sort_by_key(|r| r.start);
    assert_eq!(blocks[0].start, 0);
    for pair in blocks.windows(2) {
        assert_eq!(pair[0].end, pair[1].start, "overlap or gap: {pair:?}");
    }
    // 320 batches of 2 and 3 values: each key holds exactly what was granted.
    let next = client
        .get_seq_batch(&[("shared-a", 1), ("shared-b", 1)])
        .await
        .unwrap();
    assert_eq!(next.blocks()[0].start(), 2 * 320);
    assert_eq!(next.blocks()[1].start(), 3 * 320);
}

#[tokio::test]
async fn a_restart_continues_each_key_exactly_where_it_stopped() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = RealServer::start_file(dir.path(), "127.0.0.1:0".parse().unwrap());
    let addr = server.addr();
    let client = builder().connect([server.endpoint()]).await.unwrap();
    let before = client.get_seq("k", 10).await.unwrap();
    let epoch_before = before.epoch();
    server.stop();
    let _server = RealServer::start_file(dir.path(), addr);
    // A fresh client: the old one's connection may not have noticed the stop yet, and a
    // request written into it would be reported uncertain (it cannot tell where it went).
    let client = builder().connect([addr.to_string()]).await.unwrap();
    let after = client.get_seq("k", 5).await.unwrap();
    assert_eq!(after.start(), before.end(), "a value was lost or reissued");
    assert!(after.epoch() > epoch_before, "a restart is a new epoch");
}

#[tokio::test]
async fn a_failover_continues_each_key_where_the_old_leader_stopped() {
    let _turn = crate::common::topic(module_path!());
    let mut pair = Pair::start().await;
    let client = builder()
        .connect([pair.b.endpoint(), pair.a.endpoint()])
        .await
        .unwrap();
    let before = client.get_seq("k", 10).await.unwrap();
    assert_eq!((before.start(), before.epoch()), (0, Pair::FIRST));

    pair.fail_over().await;
    let after = client.get_seq("k", 5).await.unwrap();
    assert_eq!(after.start(), before.end(), "a value was lost or reissued");
    assert_eq!(after.epoch(), Pair::SECOND);
}
