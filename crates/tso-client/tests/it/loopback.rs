//! The client against real gRPC servers over loopback (`tests/common`). Deadlines here are
//! hang guards only: no assertion depends on timing or machine speed.

use crate::common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use common::{DeadEndpoint, HANG_GUARD, Mode, ResetEndpoint, Shared, TestServer, seed};
use futures_util::future::join_all;
use futures_util::poll;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;
use tso_client::{Client, ClientBuilder, Epoch, Error, LOGICAL_COUNT, Timestamp};

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

/// `callers` concurrent tasks make `calls_each` calls; every value is unique and each caller's
/// values increase.
async fn callers_get_unique_increasing(callers: usize, calls_each: usize) {
    let server = TestServer::start(Mode::Leader);
    let client = client(&[server.endpoint()]).await;
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
    let mut all = HashSet::new();
    while let Some(got) = tasks.join_next().await {
        let got = got.unwrap();
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "a caller's values went back"
        );
        all.extend(got);
    }
    assert_eq!(all.len(), callers * calls_each, "duplicate timestamps");
    assert!(server.shared().rpcs() <= (callers * calls_each) as u64);
}

#[tokio::test]
async fn one_caller_gets_increasing_timestamps() {
    let _turn = crate::common::topic(module_path!());
    callers_get_unique_increasing(1, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_callers_get_unique_increasing_timestamps() {
    let _turn = crate::common::topic(module_path!());
    callers_get_unique_increasing(32, 50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_thousand_callers_get_unique_increasing_timestamps() {
    let _turn = crate::common::topic(module_path!());
    callers_get_unique_increasing(8192, 3).await;
}

/// Polls each future once (which queues its caller) without yielding to the dispatcher.
async fn queue_callers<'a, F>(futures: Vec<Pin<Box<F>>>) -> (Vec<Pin<Box<F>>>, Vec<Error>)
where
    F: Future<Output = Result<Timestamp, Error>> + 'a,
{
    let mut pending = Vec::new();
    let mut refused = Vec::new();
    for mut future in futures {
        match poll!(future.as_mut()) {
            Poll::Pending => pending.push(future),
            Poll::Ready(Err(error)) => refused.push(error),
            Poll::Ready(Ok(ts)) => panic!("{ts:?} granted before the server was released"),
        }
    }
    (pending, refused)
}

#[tokio::test]
async fn callers_queued_behind_a_busy_slot_share_one_rpc() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Stall);
    let client = builder()
        .in_flight_rpcs_max(1)
        .connect([server.endpoint()])
        .await
        .unwrap();
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.get_ts().await }
    });
    server.shared().wait_for_rpcs(1).await;
    let futures = (0..100).map(|_| Box::pin(client.get_ts())).collect();
    let (pending, refused) = queue_callers(futures).await;
    assert!(refused.is_empty(), "{refused:?}");
    server.shared().release(2);
    let first = first.await.unwrap().unwrap();
    let rest: Vec<Timestamp> = join_all(pending)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        server.shared().counts(),
        [1, 100],
        "the 100 queued callers share one RPC"
    );
    assert!(rest.iter().all(|&ts| ts > first));
    let unique: HashSet<_> = rest.iter().collect();
    assert_eq!(unique.len(), 100);
}

#[tokio::test]
async fn a_full_queue_is_an_error_not_a_hang() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Stall);
    let client = builder()
        .in_flight_rpcs_max(1)
        .queued_callers_max(4)
        .connect([server.endpoint()])
        .await
        .unwrap();
    let first = tokio::spawn({
        let client = client.clone();
        async move { client.get_ts().await }
    });
    server.shared().wait_for_rpcs(1).await;
    let futures = (0..5).map(|_| Box::pin(client.get_ts())).collect();
    let (pending, refused) = queue_callers(futures).await;
    assert_eq!(pending.len(), 4);
    assert!(
        matches!(refused[..], [Error::QueueFull { capacity: 4 }]),
        "{refused:?}"
    );
    assert!(refused[0].is_retryable());
    assert_eq!(client.queued_callers(), 4);
    server.shared().release(2);
    first.await.unwrap().unwrap();
    for result in join_all(pending).await {
        result.unwrap();
    }
    assert_eq!(server.shared().counts(), [1, 4]);
}

#[tokio::test]
async fn batches_split_at_the_logical_boundary() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Leader);
    let client = client(&[server.endpoint()]).await;
    let count = 2 * u64::from(LOGICAL_COUNT) + 7;
    let batch = client.get_ts_batch(count).await.unwrap();
    assert_eq!(batch.count(), count);
    assert!(batch.ranges().iter().all(|r| r.count() <= LOGICAL_COUNT));
    let all: Vec<Timestamp> = batch.iter().collect();
    assert_eq!(all.len() as u64, count);
    assert!(all.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(batch.first(), all[0]);
    assert_eq!(batch.last(), all[all.len() - 1]);
    let mut counts = server.shared().counts();
    counts.sort();
    assert_eq!(counts, [7, LOGICAL_COUNT, LOGICAL_COUNT]);

    // Two grants that do not fit one millisecond together: the second starts a new one.
    let a = client.get_ts_batch(200_000).await.unwrap();
    let b = client.get_ts_batch(200_000).await.unwrap();
    assert_eq!(a.ranges().len(), 1);
    assert!(b.first() > a.last());
    assert_eq!(b.first().logical(), 0);
    assert!(b.first().physical_ms() > a.first().physical_ms());
    assert_eq!(b.ranges()[0].epoch(), Epoch::new(1));

    assert!(matches!(
        client.get_ts_batch(0).await,
        Err(Error::InvalidCount { count: 0 })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_random_batches_never_overlap() {
    let _turn = crate::common::topic(module_path!());
    let mut rng = StdRng::seed_from_u64(seed());
    let server = TestServer::start(Mode::Leader);
    let client = client(&[server.endpoint()]).await;
    let mut tasks = JoinSet::new();
    let mut expected = 0;
    for _ in 0..64 {
        let count = if rng.random_bool(0.1) {
            rng.random_range(1..=600_000)
        } else {
            rng.random_range(1..=1000)
        };
        expected += count;
        let client = client.clone();
        tasks.spawn(async move { client.get_ts_batch(count).await.unwrap() });
    }
    let mut ranges = Vec::new();
    while let Some(batch) = tasks.join_next().await {
        ranges.extend(
            batch
                .unwrap()
                .ranges()
                .iter()
                .map(|r| (r.first(), r.last())),
        );
    }
    ranges.sort();
    assert!(
        ranges.windows(2).all(|w| w[0].1 < w[1].0),
        "two callers share a timestamp"
    );
    let total: u64 = ranges
        .iter()
        .map(|(f, l)| l.as_u64() - f.as_u64() + 1)
        .sum();
    assert_eq!(total, expected);
}

#[tokio::test]
async fn real_time_order_holds_across_two_clients() {
    let _turn = crate::common::topic(module_path!());
    let mut rng = StdRng::seed_from_u64(seed());
    let server = TestServer::start(Mode::Leader);
    let clients = [
        client(&[server.endpoint()]).await,
        client(&[server.endpoint()]).await,
    ];
    for pair in 0..500 {
        let first = rng.random_range(0..2);
        let a = clients[first]
            .get_ts_batch(rng.random_range(1..=3000))
            .await
            .unwrap();
        let b = clients[1 - first]
            .get_ts_batch(rng.random_range(1..=3000))
            .await
            .unwrap();
        assert!(
            b.first() > a.last(),
            "pair {pair}: {:?} after {:?}",
            b.first(),
            a.last()
        );
    }
}

#[tokio::test]
async fn a_follower_address_leads_to_the_leader_through_the_hint() {
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
    let batch = client.get_ts_batch(10).await.unwrap();
    assert!(batch.first() > ts);
    assert_eq!(batch.ranges()[0].epoch(), Epoch::new(3));
    assert_eq!(
        client.leader(),
        (Some(format!("http://{}", leader.endpoint())), Epoch::new(3))
    );
    assert_eq!(
        follower.shared().rpcs(),
        1,
        "the leader is cached after the first redirect"
    );
    assert_eq!(leader.shared().rpcs(), 2);
}

#[tokio::test]
async fn a_dead_address_before_a_live_server_is_skipped() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Leader);
    let dead = DeadEndpoint::new();
    let client = client(&[dead.endpoint(), server.endpoint()]).await;
    for _ in 0..3 {
        client.get_ts().await.unwrap();
    }
}

#[tokio::test]
async fn only_dead_addresses_fail_with_a_retryable_error() {
    let _turn = crate::common::topic(module_path!());
    let dead = [DeadEndpoint::new(), DeadEndpoint::new()];
    let endpoints = dead.each_ref().map(DeadEndpoint::endpoint);
    let client = builder().attempts_max(5).connect(&endpoints).await.unwrap();
    let error = client.get_ts().await.unwrap_err();
    assert!(
        matches!(error, Error::Unavailable { attempts: 5, .. }),
        "{error}"
    );
    assert!(error.is_retryable());
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
    let call = tokio::time::timeout(HANG_GUARD, client.get_ts());
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
async fn an_election_without_hint_is_waited_out() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::NoLeaderTimes(5));
    let client = builder()
        .attempts_max(1)
        .connect([server.endpoint()])
        .await
        .unwrap();
    client.get_ts().await.unwrap();
    assert_eq!(server.shared().rpcs(), 6);
}

#[tokio::test]
async fn unavailable_is_retried_within_the_attempt_budget() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::UnavailableTimes(3));
    let client = builder()
        .attempts_max(4)
        .connect([server.endpoint()])
        .await
        .unwrap();
    client.get_ts().await.unwrap();
    assert_eq!(server.shared().rpcs(), 4);

    server.shared().set_mode(Mode::UnavailableTimes(100));
    let client = builder()
        .attempts_max(3)
        .connect([server.endpoint()])
        .await
        .unwrap();
    let error = client.get_ts().await.unwrap_err();
    assert!(
        matches!(error, Error::Unavailable { attempts: 3, .. }),
        "{error}"
    );
    assert_eq!(server.shared().rpcs(), 4 + 3);
}

#[tokio::test]
async fn a_garbage_reply_is_an_error() {
    let _turn = crate::common::topic(module_path!());
    for mode in [Mode::CountMismatch, Mode::LogicalOverflow] {
        let server = TestServer::start(mode.clone());
        let client = client(&[server.endpoint()]).await;
        let error = client.get_ts_batch(3).await.unwrap_err();
        assert!(
            matches!(error, Error::MalformedReply { .. }),
            "{mode:?}: {error}"
        );
        assert!(!error.is_retryable());
    }
}

#[tokio::test]
async fn malformed_hints_from_every_endpoint_are_an_error() {
    let _turn = crate::common::topic(module_path!());
    let broken = [
        TestServer::start(Mode::HintNotProtobuf),
        TestServer::start(Mode::HintBadEndpoint),
    ];
    let client = client(&broken.each_ref().map(TestServer::endpoint)).await;
    let error = client.get_ts().await.unwrap_err();
    assert!(matches!(error, Error::MalformedHint { .. }), "{error}");
    assert!(!error.is_retryable());
    let asked = broken.each_ref().map(|s| s.shared().rpcs());
    assert_eq!(asked, [1, 1], "each endpoint is asked once");
}

#[tokio::test]
async fn invalid_argument_reaches_every_coalesced_caller_unretried() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::InvalidArgument);
    let client = client(&[server.endpoint()]).await;
    let results = join_all((0..20).map(|_| client.get_ts())).await;
    for result in results {
        let error = result.unwrap_err();
        assert!(matches!(error, Error::InvalidArgument { .. }), "{error}");
        assert!(!error.is_retryable());
    }
    assert!(
        server.shared().rpcs() <= 20,
        "an invalid request was retried"
    );
}

#[tokio::test]
async fn the_client_survives_a_server_restart_on_the_same_address() {
    let _turn = crate::common::topic(module_path!());
    let shared = Shared::new(Mode::Leader, Epoch::new(1));
    let server = TestServer::start_with(shared.clone(), "127.0.0.1:0".parse().unwrap());
    let addr = server.addr();
    let client = builder()
        .attempts_max(2)
        .connect([server.endpoint()])
        .await
        .unwrap();
    let before = client.get_ts().await.unwrap();
    server.stop();

    let down = client.get_ts().await.unwrap_err();
    assert!(down.is_retryable(), "{down}");

    let _server = TestServer::start_with(shared, addr);
    let after = client.get_ts().await.unwrap();
    assert!(after > before);
}

#[tokio::test]
async fn dropping_the_client_stops_its_background_work() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Leader);
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let client = client(&[server.endpoint()]).await;
    client.get_ts_batch(5).await.unwrap();
    assert!(
        metrics.num_alive_tasks() > baseline,
        "the client runs a background task"
    );
    drop(client);
    let settled = tokio::time::timeout(HANG_GUARD, async {
        while metrics.num_alive_tasks() > baseline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
    settled.await.expect("background tasks outlived the client");
}

#[tokio::test]
async fn a_hint_older_than_the_cached_leader_is_not_followed() {
    let _turn = crate::common::topic(module_path!());
    let old_leader = TestServer::start_with(
        Shared::new(Mode::Leader, Epoch::new(3)),
        "127.0.0.1:0".parse().unwrap(),
    );
    let current = TestServer::start_with(
        Shared::new(Mode::Leader, Epoch::new(5)),
        "127.0.0.1:0".parse().unwrap(),
    );
    let client = builder()
        .overall_timeout(Duration::from_secs(2))
        .connect([current.endpoint()])
        .await
        .unwrap();
    client.get_ts().await.unwrap();
    assert_eq!(client.leader().1, Epoch::new(5));

    current.shared().set_mode(Mode::Follower {
        endpoint: Some(old_leader.endpoint()),
        epoch: Some(Epoch::new(3)),
    });
    let error = client.get_ts().await.unwrap_err();
    assert!(matches!(error, Error::DeadlineExceeded { .. }), "{error}");
    assert_eq!(old_leader.shared().rpcs(), 0, "followed a stale hint");
    assert_eq!(
        client.leader().1,
        Epoch::new(5),
        "the cache went back an epoch"
    );

    let newer = TestServer::start_with(
        Shared::new(Mode::Leader, Epoch::new(6)),
        "127.0.0.1:0".parse().unwrap(),
    );
    current.shared().set_mode(Mode::Follower {
        endpoint: Some(newer.endpoint()),
        epoch: Some(Epoch::new(6)),
    });
    client.get_ts().await.unwrap();
    assert_eq!(
        client.leader(),
        (Some(format!("http://{}", newer.endpoint())), Epoch::new(6))
    );
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
    let call = tokio::time::timeout(HANG_GUARD, client.get_ts());
    let error = call.await.expect("the hint cycle never ended").unwrap_err();
    assert!(matches!(error, Error::DeadlineExceeded { .. }), "{error}");
}

#[tokio::test]
async fn a_silent_server_spends_one_attempt_per_attempt_deadline() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Stall);
    let client = builder()
        .attempt_timeout(Duration::from_millis(100))
        .attempts_max(2)
        .connect([server.endpoint()])
        .await
        .unwrap();
    let error = client.get_ts().await.unwrap_err();
    assert!(
        matches!(error, Error::Unavailable { attempts: 2, .. }),
        "{error}"
    );
    assert_eq!(server.shared().rpcs(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_fails_every_queued_caller_by_its_deadline() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Stall);
    let client = builder()
        .overall_timeout(Duration::from_millis(300))
        .in_flight_rpcs_max(1)
        .connect([server.endpoint()])
        .await
        .unwrap();
    let calls = join_all((0..50).map(|_| client.get_ts()));
    let results = tokio::time::timeout(HANG_GUARD, calls)
        .await
        .expect("a caller outlived its deadline");
    for result in results {
        let error = result.unwrap_err();
        assert!(matches!(error, Error::DeadlineExceeded { .. }), "{error}");
        assert!(error.is_retryable());
    }
}

/// Three callers queue a quarter of a deadline apart behind one busy slot: when the holder's
/// deadline frees the slot, the second is a quarter from its deadline and the third half.
#[tokio::test]
async fn a_nearly_expired_caller_does_not_cut_short_a_fresh_callers_rpc() {
    let _turn = crate::common::topic(module_path!());
    let overall = Duration::from_secs(3);
    let server = TestServer::start(Mode::Leader);
    let client = builder()
        .overall_timeout(overall)
        .in_flight_rpcs_max(1)
        .connect([server.endpoint()])
        .await
        .unwrap();
    client.get_ts().await.unwrap();
    server.shared().set_mode(Mode::Stall);
    // The only slot is held until its caller's deadline ends the RPC.
    let holder = tokio::spawn({
        let client = client.clone();
        async move { client.get_ts().await }
    });
    server.shared().wait_for_rpcs(2).await;
    tokio::time::sleep(overall / 4).await;
    let (mut nearly_expired, refused) = queue_callers(vec![Box::pin(client.get_ts())]).await;
    assert!(refused.is_empty(), "{refused:?}");
    tokio::time::sleep(overall / 4).await;
    let (mut fresh, refused) = queue_callers(vec![Box::pin(client.get_ts())]).await;
    assert!(refused.is_empty(), "{refused:?}");

    let holder = holder.await.unwrap().unwrap_err();
    assert!(matches!(holder, Error::DeadlineExceeded { .. }), "{holder}");
    // The other two share the next RPC, which stalls past the first one's deadline.
    let expired = nearly_expired.pop().unwrap().await.unwrap_err();
    assert!(
        matches!(expired, Error::DeadlineExceeded { .. }),
        "{expired}"
    );
    server.shared().set_mode(Mode::Leader);
    server.shared().release(16);
    let fresh = fresh.pop().unwrap().await;
    assert!(
        fresh.is_ok(),
        "a fresh caller failed at its nearly expired neighbour's deadline: {fresh:?}"
    );
    assert_eq!(server.shared().counts(), [1, 1, 2]);
    assert_eq!(
        client.leader().0,
        Some(format!("http://{}", server.endpoint())),
        "a call that ran out of time made the client drop a healthy leader"
    );
}

#[tokio::test]
async fn an_attempt_cut_short_by_the_callers_deadline_is_not_an_endpoint_failure() {
    let _turn = crate::common::topic(module_path!());
    let leader = TestServer::start(Mode::Leader);
    let follower = TestServer::start(Mode::Follower {
        endpoint: Some(leader.endpoint()),
        epoch: Some(Epoch::new(1)),
    });
    let client = builder()
        .overall_timeout(Duration::from_secs(1))
        .connect([follower.endpoint()])
        .await
        .unwrap();
    client.get_ts().await.unwrap();
    assert_eq!(follower.shared().rpcs(), 1);

    leader.shared().set_mode(Mode::Stall);
    let error = client.get_ts().await.unwrap_err();
    assert!(matches!(error, Error::DeadlineExceeded { .. }), "{error}");
    leader.shared().set_mode(Mode::Leader);
    leader.shared().release(16);

    client.get_ts().await.unwrap();
    assert_eq!(
        follower.shared().rpcs(),
        1,
        "the leader was dropped or skipped because a caller ran out of time"
    );
}

#[tokio::test]
async fn unavailable_from_the_leader_is_retried_on_the_same_leader() {
    let _turn = crate::common::topic(module_path!());
    let leader = TestServer::start(Mode::Leader);
    let follower = TestServer::start(Mode::Follower {
        endpoint: Some(leader.endpoint()),
        epoch: Some(Epoch::new(1)),
    });
    let client = builder()
        .attempts_max(4)
        .connect([follower.endpoint(), leader.endpoint()])
        .await
        .unwrap();
    client.get_ts().await.unwrap();
    assert_eq!((follower.shared().rpcs(), leader.shared().rpcs()), (1, 1));

    leader.shared().set_mode(Mode::UnavailableTimes(3));
    client.get_ts().await.unwrap();
    assert_eq!(
        follower.shared().rpcs(),
        1,
        "UNAVAILABLE sent the client away from the leader"
    );
    assert_eq!(leader.shared().rpcs(), 1 + 4);
    assert_eq!(
        client.leader(),
        (Some(format!("http://{}", leader.endpoint())), Epoch::new(1))
    );
}

#[tokio::test]
async fn a_fresh_hint_overrides_the_unreachable_skip() {
    let _turn = crate::common::topic(module_path!());
    let dead = DeadEndpoint::new();
    let addr: SocketAddr = dead.endpoint().parse().unwrap();
    let follower = TestServer::start(Mode::InvalidArgument);
    let client = client(&[dead.endpoint(), follower.endpoint()]).await;
    // The dead address is tried first and fails at the transport level; the follower ends the
    // call at once.
    let error = client.get_ts().await.unwrap_err();
    assert!(matches!(error, Error::InvalidArgument { .. }), "{error}");
    assert_eq!(follower.shared().rpcs(), 1);

    // A leader starts there at an epoch the client has never seen, and the follower names it.
    drop(dead);
    let leader = TestServer::start_with(Shared::new(Mode::Leader, Epoch::new(2)), addr);
    follower.shared().set_mode(Mode::Follower {
        endpoint: Some(leader.endpoint()),
        epoch: Some(Epoch::new(2)),
    });
    client.get_ts().await.unwrap();
    let asked = follower.shared().rpcs();
    assert!(
        asked <= 2,
        "the fresh hint was ignored: the follower was asked {asked} times"
    );
    assert_eq!(
        client.leader(),
        (Some(format!("http://{}", leader.endpoint())), Epoch::new(2))
    );
}

#[tokio::test]
async fn when_every_endpoint_is_unreachable_each_is_tried_in_turn() {
    let _turn = crate::common::topic(module_path!());
    let unreachable = [ResetEndpoint::start(), ResetEndpoint::start()];
    let client = builder()
        .attempts_max(6)
        .connect(unreachable.each_ref().map(ResetEndpoint::endpoint))
        .await
        .unwrap();
    let error = client.get_ts().await.unwrap_err();
    assert!(
        matches!(error, Error::Unavailable { attempts: 6, .. }),
        "{error}"
    );
    assert_eq!(
        unreachable.each_ref().map(ResetEndpoint::connections),
        [3, 3],
        "attempts did not take turns over the unreachable endpoints"
    );
}

#[tokio::test]
async fn a_malformed_hint_from_one_follower_moves_on_to_the_next_endpoint() {
    let _turn = crate::common::topic(module_path!());
    let leader = TestServer::start(Mode::Leader);
    for mode in [Mode::HintNotProtobuf, Mode::HintBadEndpoint] {
        let broken = TestServer::start(mode.clone());
        let client = client(&[broken.endpoint(), leader.endpoint()]).await;
        for result in join_all((0..20).map(|_| client.get_ts())).await {
            assert!(result.is_ok(), "{mode:?}: {result:?}");
        }
        assert_eq!(broken.shared().rpcs(), 1, "{mode:?}");
    }
}
