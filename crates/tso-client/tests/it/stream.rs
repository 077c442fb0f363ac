//! The client over the streaming `GetTs` (`tso.stream.v1`) of scripted loopback servers
//! (`tests/common`): the stream is used when offered, unary `GetTs` when not, and hints,
//! deadlines, broken streams and malformed replies behave as on the unary path. Deadlines here
//! are hang guards, or deadlines the test server never answers within: no assertion depends on
//! timing or machine speed.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use common::{HANG_GUARD, Mode, Shared, StreamSupport, TestServer};
use tokio::task::JoinSet;
use tso_client::{Client, ClientBuilder, Epoch, Error, Timestamp};

fn builder() -> ClientBuilder {
    Client::builder()
        .overall_timeout(HANG_GUARD)
        .attempt_timeout(Duration::from_secs(10))
        .backoff(Duration::from_millis(1), Duration::from_millis(10))
}

/// `callers` tasks make `calls_each` calls each: every value unique, each caller's rising.
async fn load(client: &Client, callers: usize, calls_each: usize) -> Vec<Timestamp> {
    let mut tasks = JoinSet::new();
    for _ in 0..callers {
        let client = client.clone();
        tasks.spawn(async move {
            let mut got = Vec::with_capacity(calls_each);
            for _ in 0..calls_each {
                got.push(client.get_ts().await.expect("get_ts"));
            }
            got
        });
    }
    let mut all = Vec::new();
    while let Some(got) = tasks.join_next().await {
        let got = got.unwrap();
        assert!(got.windows(2).all(|w| w[0] < w[1]), "a caller went back");
        all.extend(got);
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "duplicate timestamps");
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offered_stream_carries_every_call_on_one_stream() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Leader);
    let client = builder().connect([server.endpoint()]).await.unwrap();
    let first = client.get_ts().await.unwrap();
    let all = load(&client, 32, 50).await;
    assert!(all.iter().all(|&ts| ts > first));
    let shared = server.shared();
    assert_eq!(shared.unary_calls(), 0, "a unary GetTs beside the stream");
    assert_eq!(shared.stream_calls(), 1, "one stream per connection");
    assert_eq!(
        shared.granted(),
        all.len() as u64 + 1,
        "every timestamp granted reached a caller: nothing fetched ahead"
    );
}

#[tokio::test]
async fn a_plain_tsoracle_server_is_served_by_unary_get_ts() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start_streams(Mode::Leader, StreamSupport::Absent);
    let client = builder().connect([server.endpoint()]).await.unwrap();
    let all = load(&client, 8, 20).await;
    let shared = server.shared();
    assert_eq!(shared.unary_calls(), shared.rpcs());
    assert_eq!(shared.granted(), all.len() as u64);
}

#[tokio::test]
async fn unimplemented_is_remembered_per_endpoint() {
    let _turn = crate::common::topic(module_path!());
    let plain = TestServer::start_streams(Mode::Leader, StreamSupport::Refused);
    let client = builder().connect([plain.endpoint()]).await.unwrap();
    for _ in 0..50 {
        client.get_ts().await.unwrap();
    }
    assert_eq!(plain.shared().stream_calls(), 1, "the stream asked again");
    assert_eq!(plain.shared().unary_calls(), 50);
}

#[tokio::test]
async fn a_follower_refusal_on_the_stream_leads_to_the_leader() {
    let _turn = crate::common::topic(module_path!());
    let leader = TestServer::start_with(
        Shared::new(Mode::Leader, Epoch::new(3)),
        "127.0.0.1:0".parse().unwrap(),
    );
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
    let ts = client.get_ts().await.unwrap();
    let all = load(&client, 16, 10).await;
    assert!(all.iter().all(|&t| t > ts));
    assert_eq!(
        client.leader(),
        (Some(format!("http://{}", leader.endpoint())), Epoch::new(3))
    );
    assert_eq!(follower.shared().rpcs(), 1, "the leader is cached");
    assert_eq!(follower.shared().unary_calls(), 0);
    assert_eq!(leader.shared().unary_calls(), 0);
    assert_eq!(leader.shared().stream_calls(), 1);
}

#[tokio::test]
async fn a_plain_follower_hints_to_a_streaming_leader() {
    let _turn = crate::common::topic(module_path!());
    let leader = TestServer::start(Mode::Leader);
    let follower = TestServer::start_streams(
        Mode::Follower {
            endpoint: Some(leader.endpoint()),
            epoch: None,
        },
        StreamSupport::Absent,
    );
    let client = builder().connect([follower.endpoint()]).await.unwrap();
    load(&client, 4, 10).await;
    assert_eq!(follower.shared().unary_calls(), 1);
    assert_eq!(leader.shared().unary_calls(), 0);
}

/// A stream that ends while requests wait on it fails them like a transport error: the callers
/// are retried on a new stream and answered from grants made after the retry; the request
/// that was waiting is never granted.
#[tokio::test]
async fn a_stream_ended_mid_flight_retries_its_callers_on_a_new_stream() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Leader);
    let client = builder()
        .in_flight_rpcs_max(1)
        .connect([server.endpoint()])
        .await
        .unwrap();
    let before = client.get_ts().await.unwrap();
    let shared = server.shared();
    shared.set_mode(Mode::Stall);
    let mut callers = JoinSet::new();
    for _ in 0..10 {
        let client = client.clone();
        callers.spawn(async move { client.get_ts().await });
    }
    shared.wait_for_rpcs(2).await;
    shared.end_streams();
    // The client opens a new stream only after the old one failed, so the request that waited
    // on it is gone by then; the new stream's first request stalls until released.
    shared.wait_for_stream_calls(2).await;
    let granted_before_end = shared.granted();
    shared.set_mode(Mode::Leader);
    shared.release(100);
    let mut got = Vec::new();
    while let Some(result) = callers.join_next().await {
        got.push(result.unwrap().expect("retried after the stream ended"));
    }
    assert_eq!(granted_before_end, 1, "the waiting request was granted");
    let unique: HashSet<_> = got.iter().collect();
    assert_eq!(unique.len(), 10);
    assert!(got.iter().all(|&ts| ts > before));
    assert_eq!(
        shared.granted(),
        11,
        "a value was fetched ahead or granted twice"
    );
    assert_eq!(
        shared.stream_calls(),
        2,
        "one stream, then one after it ended"
    );
    assert_eq!(shared.unary_calls(), 0);
}

#[tokio::test]
async fn a_stream_reply_to_the_wrong_request_is_malformed() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::StreamWrongId);
    let client = builder().connect([server.endpoint()]).await.unwrap();
    let error = client.get_ts().await.unwrap_err();
    assert!(matches!(error, Error::MalformedReply { .. }), "{error}");
    assert!(!error.is_retryable());
    // The broken stream was dropped: the next call opens a new one (and fails the same way).
    let error = client.get_ts_batch(3).await.unwrap_err();
    assert!(matches!(error, Error::MalformedReply { .. }), "{error}");
    assert_eq!(server.shared().stream_calls(), 2);
    assert_eq!(server.shared().unary_calls(), 0);
}

#[tokio::test]
async fn count_mismatch_and_invalid_argument_on_the_stream_end_the_call() {
    let _turn = crate::common::topic(module_path!());
    for mode in [Mode::CountMismatch, Mode::LogicalOverflow] {
        let server = TestServer::start(mode.clone());
        let client = builder().connect([server.endpoint()]).await.unwrap();
        let error = client.get_ts_batch(3).await.unwrap_err();
        assert!(
            matches!(error, Error::MalformedReply { .. }),
            "{mode:?}: {error}"
        );
        assert_eq!(server.shared().unary_calls(), 0);
    }
    let server = TestServer::start(Mode::InvalidArgument);
    let client = builder().connect([server.endpoint()]).await.unwrap();
    for _ in 0..3 {
        let error = client.get_ts().await.unwrap_err();
        assert!(matches!(error, Error::InvalidArgument { .. }), "{error}");
    }
    assert_eq!(
        server.shared().stream_calls(),
        1,
        "a refusal closed the stream"
    );
}

/// The server never answers within the caller's deadline: the caller gets `DeadlineExceeded`,
/// and since the attempt was cut by the caller's own deadline the stream and the leader stay.
#[tokio::test]
async fn a_callers_deadline_holds_on_the_stream_and_keeps_it() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Leader);
    let client = builder()
        .overall_timeout(Duration::from_millis(300))
        .connect([server.endpoint()])
        .await
        .unwrap();
    client.get_ts().await.unwrap();
    let shared = server.shared();
    shared.set_mode(Mode::Stall);
    let error = client.get_ts().await.unwrap_err();
    assert!(matches!(error, Error::DeadlineExceeded { .. }), "{error}");
    shared.set_mode(Mode::Leader);
    shared.release(1);
    let ts = tokio::time::timeout(HANG_GUARD, client.get_ts())
        .await
        .unwrap();
    assert!(ts.is_ok(), "{ts:?}");
    assert_eq!(shared.stream_calls(), 1, "the deadline dropped the stream");
    assert_eq!(
        client.leader().0,
        Some(format!("http://{}", server.endpoint()))
    );
}

#[tokio::test]
async fn unavailable_on_the_stream_is_retried_on_the_same_leader() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::UnavailableTimes(3));
    let client = builder()
        .attempts_max(4)
        .connect([server.endpoint()])
        .await
        .unwrap();
    client.get_ts().await.unwrap();
    assert_eq!(server.shared().rpcs(), 4);
    assert_eq!(
        server.shared().stream_calls(),
        1,
        "a refusal closed the stream"
    );
    server.shared().set_mode(Mode::UnavailableTimes(4));
    let error = client.get_ts().await.unwrap_err();
    assert!(
        matches!(error, Error::Unavailable { attempts: 4, .. }),
        "{error}"
    );
}
