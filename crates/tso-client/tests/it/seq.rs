//! Dense sequences through the client against scripted gRPC servers over loopback
//! (`tests/common`): blocks, hints, local validation, malformed replies, and D2's rule that a
//! call which may have been granted is reported uncertain and never retried (the fake server
//! counts every request). Deadlines here are hang guards or the failure under test; no
//! assertion depends on machine speed.

use crate::common;

use std::time::Duration;

use common::{DeadEndpoint, HANG_GUARD, Mode, SeqFault, Shared, TestServer, seed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use tonic::Code;
use tso_client::{
    Client, ClientBuilder, Epoch, Error, SEQ_BATCH_KEYS_MAX, SEQ_COUNT_MAX, SEQ_KEY_BYTES_MAX,
};

/// Options for tests: deadlines far beyond any real wait, short backoff so retries are quick.
fn builder() -> ClientBuilder {
    Client::builder()
        .overall_timeout(HANG_GUARD)
        .attempt_timeout(Duration::from_secs(10))
        .backoff(Duration::from_millis(1), Duration::from_millis(10))
}

async fn client(endpoints: &[String]) -> Client {
    builder().connect(endpoints).await.unwrap()
}

fn leader_at(epoch: u128) -> TestServer {
    TestServer::start_with(
        Shared::new(Mode::Leader, Epoch::new(epoch)),
        "127.0.0.1:0".parse().unwrap(),
    )
}

/// The `asked` of an uncertain error, or a panic naming what came instead.
fn uncertain_asked(error: &Error) -> Vec<(String, u32)> {
    match error {
        Error::SeqUncertain { asked, .. } => asked.clone(),
        other => panic!("expected an uncertain error, got {other:?}: {other}"),
    }
}

#[tokio::test]
async fn blocks_of_a_key_are_contiguous_and_keys_are_independent() {
    let _turn = crate::common::topic(module_path!());
    let server = leader_at(4);
    let client = client(&[server.endpoint()]).await;
    let a = client.get_seq("orders", 5).await.unwrap();
    assert_eq!((a.key(), a.range(), a.count()), ("orders", 0..5, 5));
    assert_eq!((a.last(), a.end(), a.epoch()), (4, 5, Epoch::new(4)));
    let b = client.get_seq("orders", 3).await.unwrap();
    assert_eq!(b.range(), 5..8);
    let other = client.get_seq("invoices", 1).await.unwrap();
    assert_eq!(other.range(), 0..1);
    assert_eq!(
        server.shared().seq_requests(),
        [
            vec![("orders".to_string(), 5)],
            vec![("orders".to_string(), 3)],
            vec![("invoices".to_string(), 1)],
        ]
    );
    assert_eq!(
        client.leader(),
        (Some(format!("http://{}", server.endpoint())), Epoch::new(4))
    );
}

#[tokio::test]
async fn a_batch_is_one_rpc_with_blocks_in_request_order() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Leader);
    let client = client(&[server.endpoint()]).await;
    client.get_seq("b", 10).await.unwrap();
    let batch = client
        .get_seq_batch(&[("b", 2), ("a", SEQ_COUNT_MAX)])
        .await
        .unwrap();
    let got: Vec<(&str, std::ops::Range<u64>)> = batch
        .blocks()
        .iter()
        .map(|b| (b.key(), b.range()))
        .collect();
    assert_eq!(got, [("b", 10..12), ("a", 0..u64::from(SEQ_COUNT_MAX))]);
    assert_eq!(batch.epoch(), Epoch::new(1));
    assert_eq!(batch.get("a").unwrap().count(), SEQ_COUNT_MAX);
    // Owned keys work too, and one key still travels as a batch.
    let owned = vec![("c".to_string(), 1)];
    assert_eq!(
        client.get_seq_batch(&owned).await.unwrap().blocks().len(),
        1
    );
    let keys: Vec<(String, u32)> = (0..SEQ_BATCH_KEYS_MAX)
        .map(|i| (format!("k{i}"), 1))
        .collect();
    let full = client.get_seq_batch(&keys).await.unwrap();
    assert_eq!(full.blocks().len(), SEQ_BATCH_KEYS_MAX);
    assert_eq!(server.shared().rpcs(), 4, "one RPC per call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_on_one_key_tile_it_without_overlap() {
    let _turn = crate::common::topic(module_path!());
    let mut rng = StdRng::seed_from_u64(seed());
    let server = TestServer::start(Mode::Leader);
    let client = client(&[server.endpoint()]).await;
    let mut tasks = JoinSet::new();
    let mut total = 0;
    for _ in 0..32 {
        let counts: Vec<u32> = (0..20).map(|_| rng.random_range(1..=100)).collect();
        total += counts.iter().map(|&c| u64::from(c)).sum::<u64>();
        let client = client.clone();
        tasks.spawn(async move {
            let mut blocks = Vec::new();
            for count in counts {
                blocks.push(client.get_seq("shared", count).await.unwrap().range());
            }
            blocks
        });
    }
    let mut blocks = Vec::new();
    while let Some(got) = tasks.join_next().await {
        let got = got.unwrap();
        assert!(
            got.windows(2).all(|w| w[0].end <= w[1].start),
            "a caller went back"
        );
        blocks.extend(got);
    }
    blocks.sort_by_key(|r| r.start);
    assert_eq!(blocks[0].start, 0);
    for pair in blocks.windows(2) {
        assert_eq!(pair[0].end, pair[1].start, "overlap or gap: {pair:?}");
    }
    assert_eq!(blocks.last().unwrap().end, total);
}

#[tokio::test]
async fn a_follower_address_leads_to_the_leader_through_the_hint() {
    let _turn = crate::common::topic(module_path!());
    let leader = leader_at(3);
    let follower = TestServer::start(Mode::Follower {
        endpoint: Some(leader.endpoint()),
        epoch: Some(Epoch::new(3)),
    });
    // One attempt only: following the hint must not spend it.
    let client = builder()
        .attempts_max(1)
        .connect([follower.endpoint()])
        .await
        .unwrap();
    let first = client.get_seq("k", 2).await.unwrap();
    let batch = client.get_seq_batch(&[("k", 1)]).await.unwrap();
    assert_eq!((first.range(), batch.blocks()[0].range()), (0..2, 2..3));
    assert_eq!(first.epoch(), Epoch::new(3));
    assert_eq!(
        follower.shared().rpcs(),
        1,
        "the leader is cached after the redirect"
    );
    assert_eq!(leader.shared().rpcs(), 2);
    assert_eq!(
        follower.shared().seq_next("k"),
        0,
        "the follower granted nothing"
    );
}

#[tokio::test]
async fn an_election_without_hint_is_waited_out() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::NoLeaderTimes(3));
    let client = builder()
        .attempts_max(1)
        .connect([server.endpoint()])
        .await
        .unwrap();
    assert_eq!(client.get_seq("k", 1).await.unwrap().range(), 0..1);
    assert_eq!(server.shared().rpcs(), 4);
}

#[tokio::test]
async fn a_hint_cycle_ends_at_the_overall_deadline() {
    let _turn = crate::common::topic(module_path!());
    let a = TestServer::start(Mode::Leader);
    let b = TestServer::start(Mode::Follower {
        endpoint: Some(a.endpoint()),
        epoch: None,
    });
    a.shared().set_mode(Mode::Follower {
        endpoint: Some(b.endpoint()),
        epoch: None,
    });
    let client = builder()
        .overall_timeout(Duration::from_millis(300))
        .connect([a.endpoint()])
        .await
        .unwrap();
    let call = tokio::time::timeout(HANG_GUARD, client.get_seq("k", 1));
    let error = call.await.expect("the hint cycle never ended").unwrap_err();
    // Cut between attempts, nothing was granted; cut while a request was out, that request is
    // uncertain (the client cannot know the node it went to is still not the leader).
    assert!(
        matches!(
            error,
            Error::DeadlineExceeded { .. } | Error::SeqUncertain { .. }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn unavailable_is_uncertain_and_never_retried() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::UnavailableTimes(1));
    let client = builder()
        .attempts_max(8)
        .connect([server.endpoint()])
        .await
        .unwrap();
    let error = client.get_seq("k", 7).await.unwrap_err();
    assert_eq!(uncertain_asked(&error), [("k".to_string(), 7)]);
    assert!(!error.is_retryable());
    assert_eq!(server.shared().rpcs(), 1, "an uncertain call was retried");
    // The server answered, so it stays the leader; the next call goes out normally.
    assert_eq!(client.get_seq("k", 1).await.unwrap().range(), 0..1);
    assert_eq!(server.shared().rpcs(), 2);
}

#[tokio::test]
async fn statuses_that_may_follow_a_write_are_uncertain() {
    let _turn = crate::common::topic(module_path!());
    for code in [
        Code::Internal,
        Code::Unknown,
        Code::DeadlineExceeded,
        Code::Cancelled,
        Code::Aborted,
    ] {
        let server = TestServer::start(Mode::Status(code, "something failed"));
        let client = builder()
            .attempts_max(8)
            .connect([server.endpoint()])
            .await
            .unwrap();
        let error = client
            .get_seq_batch(&[("a", 1), ("b", 2)])
            .await
            .unwrap_err();
        let expected = [("a".to_string(), 1), ("b".to_string(), 2)];
        assert_eq!(uncertain_asked(&error), expected, "{code:?}");
        assert_eq!(server.shared().rpcs(), 1, "{code:?}: retried");
    }
}

#[tokio::test]
async fn refusals_that_write_nothing_end_the_call_without_uncertainty() {
    let _turn = crate::common::topic(module_path!());
    let cases = [
        (
            Mode::Status(
                Code::FailedPrecondition,
                "counter of \"k\" would pass u64::MAX",
            ),
            "final",
        ),
        (
            Mode::Status(Code::Unimplemented, "GetSeq is not implemented"),
            "final",
        ),
        (Mode::Status(Code::ResourceExhausted, "1000 keys"), "busy"),
        (Mode::InvalidArgument, "invalid"),
    ];
    for (mode, expected) in cases {
        let server = TestServer::start(mode.clone());
        let client = client(&[server.endpoint()]).await;
        let error = client.get_seq("k", 1).await.unwrap_err();
        let kind = match &error {
            Error::Server {
                code: Code::ResourceExhausted,
                ..
            } => "busy",
            Error::Server { .. } => "final",
            Error::InvalidArgument { .. } => "invalid",
            _ => "other",
        };
        assert_eq!(kind, expected, "{mode:?}: {error}");
        // Out of capacity (the key cap or a full queue) may pass; the others will not.
        assert_eq!(error.is_retryable(), kind == "busy", "{mode:?}");
        assert_eq!(server.shared().rpcs(), 1, "{mode:?}");
    }
}

#[tokio::test]
async fn a_server_that_hangs_past_the_deadline_is_uncertain_and_asked_once() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Leader);
    let client = builder()
        .overall_timeout(Duration::from_millis(500))
        .connect([server.endpoint()])
        .await
        .unwrap();
    client.get_seq("k", 1).await.unwrap();
    server.shared().set_mode(Mode::Stall);
    let error = client.get_seq("k", 2).await.unwrap_err();
    assert_eq!(uncertain_asked(&error), [("k".to_string(), 2)]);
    assert_eq!(server.shared().rpcs(), 2, "asked once after the warm-up");
    // The caller's own deadline cut the attempt: the leader stays cached.
    assert!(client.leader().0.is_some());

    // A per-attempt timeout inside a longer deadline: still one request, and the endpoint is
    // dropped as leader as for any silent server.
    let client = builder()
        .attempt_timeout(Duration::from_millis(200))
        .attempts_max(8)
        .connect([server.endpoint()])
        .await
        .unwrap();
    let error = client.get_seq("k", 3).await.unwrap_err();
    assert_eq!(uncertain_asked(&error), [("k".to_string(), 3)]);
    assert_eq!(server.shared().rpcs(), 3, "an attempt timeout was retried");
    assert_eq!(client.leader().0, None);
}

#[tokio::test]
async fn a_connection_dropped_after_the_request_arrived_is_uncertain() {
    let _turn = crate::common::topic(module_path!());
    let shared = Shared::new(Mode::Leader, Epoch::new(1));
    let server = TestServer::start_with(shared.clone(), "127.0.0.1:0".parse().unwrap());
    let addr = server.addr();
    let client = client(&[server.endpoint()]).await;
    client.get_seq("k", 1).await.unwrap();
    shared.set_mode(Mode::Stall);
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.get_seq("k", 4).await }
    });
    shared.wait_for_rpcs(2).await;
    server.stop();
    let error = tokio::time::timeout(HANG_GUARD, call)
        .await
        .expect("the call outlived its connection")
        .unwrap()
        .unwrap_err();
    assert_eq!(uncertain_asked(&error), [("k".to_string(), 4)]);
    assert!(!error.is_retryable());
    assert_eq!(shared.rpcs(), 2, "retried after the connection dropped");
    assert_eq!(
        client.leader().0,
        None,
        "a failed endpoint stays the leader"
    );

    // The server comes back on the same address: the client connects afresh.
    shared.set_mode(Mode::Leader);
    let _server = TestServer::start_with(shared.clone(), addr);
    let next = client.get_seq("k", 1).await.unwrap();
    // This fake had not granted the stalled block yet; the client could not know that.
    assert_eq!(next.start(), 1);
}

#[tokio::test]
async fn refused_connections_send_nothing_and_are_retried() {
    let _turn = crate::common::topic(module_path!());
    let dead = [DeadEndpoint::new(), DeadEndpoint::new()];
    let endpoints = dead.each_ref().map(DeadEndpoint::endpoint);
    let only_dead = builder().attempts_max(3).connect(&endpoints).await.unwrap();
    let error = only_dead.get_seq("k", 1).await.unwrap_err();
    assert!(
        matches!(error, Error::Unavailable { attempts: 3, .. }),
        "{error}"
    );
    assert!(error.is_retryable(), "nothing was sent: retrying is safe");

    let server = TestServer::start(Mode::Leader);
    let client = client(&[dead[0].endpoint(), server.endpoint()]).await;
    assert_eq!(client.get_seq("k", 1).await.unwrap().range(), 0..1);
    assert_eq!(server.shared().rpcs(), 1);
}

#[tokio::test]
async fn only_dead_addresses_fail_within_the_overall_deadline() {
    let _turn = crate::common::topic(module_path!());
    let overall = Duration::from_millis(500);
    let dead = DeadEndpoint::new();
    let client = builder()
        .attempts_max(u32::MAX)
        .overall_timeout(overall)
        .connect([dead.endpoint()])
        .await
        .unwrap();
    let call = tokio::time::timeout(HANG_GUARD, client.get_seq("k", 1));
    let error = call
        .await
        .expect("the call ignored its deadline")
        .unwrap_err();
    assert!(
        matches!(error, Error::DeadlineExceeded { timeout, .. } if timeout == overall),
        "{error}"
    );
    assert!(error.is_retryable());
}

#[tokio::test]
async fn invalid_requests_are_refused_without_an_rpc() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Leader);
    let client = client(&[server.endpoint()]).await;
    let long = "k".repeat(SEQ_KEY_BYTES_MAX + 1);
    let errors = [
        client.get_seq("", 1).await.unwrap_err(),
        client.get_seq(&long, 1).await.unwrap_err(),
        client.get_seq("k", 0).await.unwrap_err(),
        client.get_seq("k", SEQ_COUNT_MAX + 1).await.unwrap_err(),
    ];
    assert!(matches!(&errors[0], Error::InvalidSeqKey { key, .. } if key.is_empty()));
    assert!(matches!(&errors[1], Error::InvalidSeqKey { key, .. } if *key == long));
    assert!(matches!(errors[2], Error::InvalidSeqCount { count: 0, .. }));
    assert!(
        matches!(errors[3], Error::InvalidSeqCount { count, .. } if count == SEQ_COUNT_MAX + 1)
    );

    let none: [(&str, u32); 0] = [];
    let too_many: Vec<(String, u32)> = (0..=SEQ_BATCH_KEYS_MAX)
        .map(|i| (format!("k{i}"), 1))
        .collect();
    let batch_errors = [
        client.get_seq_batch(&none).await.unwrap_err(),
        client.get_seq_batch(&too_many).await.unwrap_err(),
        client
            .get_seq_batch(&[("a", 1), ("a", 1)])
            .await
            .unwrap_err(),
        client
            .get_seq_batch(&[("a", 1), ("", 1)])
            .await
            .unwrap_err(),
        client
            .get_seq_batch(&[("a", 1), ("b", 0)])
            .await
            .unwrap_err(),
    ];
    assert!(matches!(
        batch_errors[0],
        Error::InvalidSeqBatch { entries: 0, .. }
    ));
    assert!(
        matches!(batch_errors[1], Error::InvalidSeqBatch { entries, .. } if entries == SEQ_BATCH_KEYS_MAX + 1)
    );
    assert!(matches!(
        batch_errors[2],
        Error::InvalidSeqBatch { entries: 2, .. }
    ));
    assert!(matches!(batch_errors[3], Error::InvalidSeqKey { .. }));
    assert!(matches!(
        batch_errors[4],
        Error::InvalidSeqCount { count: 0, .. }
    ));
    for error in errors.iter().chain(&batch_errors) {
        assert!(!error.is_retryable(), "{error}");
    }
    assert_eq!(
        server.shared().rpcs(),
        0,
        "an invalid request reached the server"
    );
}

#[tokio::test]
async fn malformed_replies_are_errors_and_never_retried() {
    let _turn = crate::common::topic(module_path!());
    let faults = [
        Mode::CountMismatch,
        Mode::SeqMalformed(SeqFault::WrongKey),
        Mode::SeqMalformed(SeqFault::Overflow),
        Mode::SeqMalformed(SeqFault::NoEpoch),
    ];
    for mode in faults {
        let server = TestServer::start(mode.clone());
        let client = client(&[server.endpoint()]).await;
        let error = client.get_seq("k", 3).await.unwrap_err();
        assert!(
            matches!(error, Error::MalformedReply { .. }),
            "{mode:?}: {error}"
        );
        assert!(!error.is_retryable());
        let error = client
            .get_seq_batch(&[("a", 1), ("b", 2)])
            .await
            .unwrap_err();
        assert!(
            matches!(error, Error::MalformedReply { .. }),
            "{mode:?}: {error}"
        );
        assert_eq!(server.shared().rpcs(), 2, "{mode:?}: retried");
    }
    for fault in [SeqFault::Reversed, SeqFault::Missing] {
        let server = TestServer::start(Mode::SeqMalformed(fault));
        let client = client(&[server.endpoint()]).await;
        let error = client
            .get_seq_batch(&[("a", 1), ("b", 2)])
            .await
            .unwrap_err();
        assert!(
            matches!(error, Error::MalformedReply { .. }),
            "{fault:?}: {error}"
        );
        assert_eq!(server.shared().rpcs(), 1, "{fault:?}: retried");
    }
}
