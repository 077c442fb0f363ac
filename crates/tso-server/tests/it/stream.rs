//! The streaming timestamp RPC (`tso.stream.v1`) over real gRPC: order and freshness across
//! streams and unary calls, bad counts refused without ending the stream, "not leader" with the
//! hint as the last reply on a follower and after a step-down, shutdown and poisoning ending
//! open streams, and bounded buffering when a client stops reading.

use crate::common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use tso_core::Epoch;
use tso_proto::tso::stream::v1::tso_stream_client::TsoStreamClient;
use tso_proto::tso::stream::v1::{TsStreamRequest, TsStreamResponse, ts_stream_response};
use tso_proto::v1::GetTsResponse;
use tso_server::backend::Leadership;
use tso_server::clock::SystemClock;

/// One open stream: requests go in through `send`, replies come out of `replies`.
struct Stream {
    send: mpsc::Sender<TsStreamRequest>,
    replies: tonic::Streaming<TsStreamResponse>,
    next_id: u64,
}

impl Stream {
    async fn open(server: &TestServer) -> Stream {
        let channel = Channel::from_shared(format!("http://{}", server.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self::open_on(channel, 16).await
    }

    async fn open_on(channel: Channel, buffer: usize) -> Stream {
        let (send, requests) = mpsc::channel(buffer);
        let replies = TsoStreamClient::new(channel)
            .get_ts_stream(ReceiverStream::new(requests))
            .await
            .expect("the stream opens")
            .into_inner();
        Stream {
            send,
            replies,
            next_id: 1,
        }
    }

    async fn ask(&mut self, count: u32) -> TsStreamResponse {
        let request_id = self.next_id;
        self.next_id += 1;
        self.send
            .send(TsStreamRequest { request_id, count })
            .await
            .unwrap();
        let reply = tokio::time::timeout(HANG_GUARD, self.replies.message())
            .await
            .expect("a reply within the hang guard")
            .expect("no stream error")
            .expect("the stream is open");
        assert_eq!(
            reply.request_id, request_id,
            "replies come in request order"
        );
        reply
    }

    async fn grant(&mut self, count: u32) -> GetTsResponse {
        match self.ask(count).await.result {
            Some(ts_stream_response::Result::Grant(grant)) => grant,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    /// What ends the stream: `Ok(())` for a clean end, the status otherwise.
    async fn end(&mut self) -> Result<(), tonic::Status> {
        match tokio::time::timeout(HANG_GUARD, self.replies.message())
            .await
            .expect("the stream ends within the hang guard")
        {
            Ok(None) => Ok(()),
            Ok(Some(reply)) => panic!("expected the end of the stream, got {reply:?}"),
            Err(status) => Err(status),
        }
    }
}

fn refusal(reply: TsStreamResponse) -> tso_proto::tso::stream::v1::TsStreamRefusal {
    match reply.result {
        Some(ts_stream_response::Result::Refusal(refusal)) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn file_server(dir: &std::path::Path) -> TestServer {
    let backend = Arc::new(tso_server::backend::file::FileBackend::open(dir).unwrap());
    let mut server = TestServer::start(backend, test_config(), Arc::new(SystemClock)).await;
    server.wait_serving().await;
    server
}

/// Over many interleavings of four streams and unary calls: a request sent after any reply
/// was received gets larger values (G2), and grants have exactly the shape asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_after_a_reply_gets_larger_values() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = file_server(dir.path()).await;
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(Stream::open(&server).await);
    }
    let mut unary = server.client().await;
    let seed = 20261130u64;
    eprintln!("seed {seed}");
    let mut rng = seed;
    let mut last = 0u64;
    for round in 0..2_000 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let count = (rng >> 33) as u32 % 300 + 1;
        let which = (rng >> 20) as usize % 5;
        let grant = if which == 4 {
            get_ts(&mut unary, count).await.unwrap()
        } else {
            streams[which].grant(count).await
        };
        assert_eq!(grant.count, count, "round {round}");
        assert!(
            *values(&grant).start() > last,
            "round {round}: {grant:?} not above {last}"
        );
        last = *values(&grant).end();
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn bad_counts_are_refused_and_the_stream_goes_on() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = file_server(dir.path()).await;
    let mut stream = Stream::open(&server).await;
    for count in [0, 262_145, u32::MAX] {
        let refused = refusal(stream.ask(count).await);
        assert_eq!(refused.code, Code::InvalidArgument as i32);
        assert!(refused.message.contains("out of range"), "{refused:?}");
        assert!(refused.hint.is_none());
    }
    assert_eq!(stream.grant(262_144).await.count, 262_144);
    server.stop().await.unwrap();
}

/// A follower answers "not leader" with the hint, as the stream's last reply; a leader that
/// steps down mid-stream does the same on the next request.
#[tokio::test]
async fn not_leader_is_the_last_reply_with_the_hint() {
    let _turn = crate::common::topic(module_path!());
    let hint = Leadership::Follower {
        leader_endpoint: Some("10.0.0.7:50551".into()),
        leader_epoch: Some(Epoch::new(9)),
    };
    let backend = FaultBackend::new(hint.clone(), 0);
    let mut server = TestServer::start(backend, test_config(), Arc::new(SystemClock)).await;
    server
        .wait_for("not serving with a hint", |s| {
            matches!(
                s,
                tso_server::ServingState::NotServing {
                    leader_endpoint: Some(_),
                    ..
                }
            )
        })
        .await;
    let mut stream = Stream::open(&server).await;
    let refused = refusal(stream.ask(1).await);
    assert_eq!(refused.code, Code::FailedPrecondition as i32);
    assert_eq!(refused.message, tso_server::NOT_LEADER_MESSAGE);
    let wire = refused.hint.expect("a hint");
    assert_eq!(wire.leader_endpoint.as_deref(), Some("10.0.0.7:50551"));
    assert_eq!(wire.leader_epoch.map(|e| (e.hi, e.lo)), Some((0, 9)));
    stream
        .end()
        .await
        .expect("the refusal ends the stream cleanly");
    server.stop().await.unwrap();

    let backend = FaultBackend::leader(1, 0);
    let mut server = TestServer::start(backend.clone(), test_config(), Arc::new(SystemClock)).await;
    server.wait_serving().await;
    let mut stream = Stream::open(&server).await;
    stream.grant(5).await;
    backend.set_leadership(hint);
    server
        .wait_for("stepped down", |s| {
            !matches!(s, tso_server::ServingState::Serving { .. })
        })
        .await;
    let refused = refusal(stream.ask(1).await);
    assert_eq!(refused.message, tso_server::NOT_LEADER_MESSAGE);
    assert!(refused.hint.is_some());
    stream.end().await.expect("a clean end");
    server.stop().await.unwrap();
}

/// Shutdown does not wait on an open stream: it ends with UNAVAILABLE and the server stops.
#[tokio::test]
async fn shutdown_ends_open_streams() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = file_server(dir.path()).await;
    let mut stream = Stream::open(&server).await;
    stream.grant(1).await;
    let stopping = tokio::spawn(server.stop());
    let ended = stream.end().await.expect_err("ended by the server");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    stopping.await.unwrap().unwrap();
}

/// A client that sends without reading: the server stops taking its requests once its reply
/// buffer and the connection's flow-control windows are full, instead of buffering them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_held_back() {
    let _turn = crate::common::topic(module_path!());
    const OFFERED: u64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let server = file_server(dir.path()).await;
    let taken = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&taken);
    let requests = tokio_stream::iter(1..=OFFERED).map(move |request_id| {
        counter.fetch_add(1, Ordering::SeqCst);
        TsStreamRequest {
            request_id,
            count: 1,
        }
    });
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let _replies = TsoStreamClient::new(channel)
        .get_ts_stream(requests)
        .await
        .unwrap()
        .into_inner();
    // Wait until the client's sends stall: the count stops moving between two looks. What is
    // taken by then is what the flow-control windows and the reply buffer hold (a few
    // megabytes of 10-byte requests), not the whole offer.
    let mut previous = u64::MAX;
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    let stalled = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = taken.load(Ordering::SeqCst);
        if now == previous {
            break true;
        }
        if now == OFFERED || tokio::time::Instant::now() > deadline {
            break false;
        }
        previous = now;
    };
    let taken = taken.load(Ordering::SeqCst);
    eprintln!("the client could send {taken} of {OFFERED} requests without reading");
    assert!(
        stalled && taken < OFFERED,
        "{taken} requests were taken from a client that reads nothing: nothing holds it back"
    );
    server.stop().await.unwrap();
}
