//! Stamping leases and the safe frontier through the client against scripted gRPC servers over
//! loopback (`tests/common`): grants, hints, the frontier found past followers that answer 0,
//! typed refusals, retries of what is safe to repeat, local validation, and a `LeaseKeeper`
//! that renews and stalls. Deadlines here are hang guards or the failure under test; no
//! assertion depends on machine speed (the keeper's timing is tested on a paused clock in
//! `src/keeper.rs`).

use crate::common;

use std::time::Duration;

use common::{DeadEndpoint, HANG_GUARD, Mode, Shared, TEST_FRONTIER_MS, TestServer};
use tonic::Code;
use tso_client::{
    Client, ClientBuilder, Epoch, Error, LEASE_HOLDER_BYTES_MAX, LeaseKeeper, StampPermit,
};

const TTL: Duration = Duration::from_secs(10);

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

fn server_at(mode: Mode, epoch: u128) -> TestServer {
    TestServer::start_with(
        Shared::new(mode, Epoch::new(epoch)),
        "127.0.0.1:0".parse().unwrap(),
    )
}

fn follower_of(leader: &TestServer) -> TestServer {
    TestServer::start(Mode::Follower {
        endpoint: Some(leader.endpoint()),
        epoch: None,
    })
}

fn uri(server: &TestServer) -> Option<String> {
    Some(format!("http://{}", server.endpoint()))
}

#[tokio::test]
async fn acquire_renew_release_and_the_holder_epoch_rules() {
    let _turn = crate::common::topic(module_path!());
    let server = server_at(Mode::Leader, 3);
    let client = client(&[server.endpoint()]).await;
    let lease = client.acquire_lease(b"writer-a", 1, TTL).await.unwrap();
    assert_eq!(lease.epoch(), Epoch::new(3));
    assert_eq!(lease.ttl(), TTL);
    assert!(lease.ts_upper_bound_ms() >= lease.expires_at_ms());
    assert!(lease.local_expiry() <= tokio::time::Instant::now() + TTL);

    let again = client.acquire_lease(b"writer-a", 1, TTL).await.unwrap();
    assert_eq!(
        again.lease_id(),
        lease.lease_id(),
        "idempotent per holder epoch"
    );
    let renewed = client.renew_lease(lease.lease_id(), TTL).await.unwrap();
    assert_eq!(renewed.lease_id(), lease.lease_id());
    assert!(renewed.requested_at() >= lease.requested_at());

    let newer = client.acquire_lease(b"writer-a", 2, TTL).await.unwrap();
    assert_ne!(
        newer.lease_id(),
        lease.lease_id(),
        "a higher epoch supersedes"
    );
    match client.acquire_lease(b"writer-a", 1, TTL).await {
        Err(Error::StaleHolderEpoch {
            holder_epoch: 1,
            message,
        }) => {
            assert!(message.contains("below 2"), "{message}")
        }
        other => panic!("a lower holder epoch was not refused: {other:?}"),
    }
    match client.renew_lease(lease.lease_id(), TTL).await {
        Err(error @ Error::LeaseLost { .. }) => {
            assert!(error.to_string().contains("superseded"), "{error}");
            assert!(!error.is_retryable());
        }
        other => panic!("a superseded lease renewed: {other:?}"),
    }

    client.release_lease(newer.lease_id()).await.unwrap();
    assert!(!server.shared().lease_exists(newer.lease_id()));
    client.release_lease(newer.lease_id()).await.unwrap();
    assert_eq!(
        client.renew_lease(newer.lease_id(), TTL).await,
        Err(Error::LeaseNotFound {
            lease_id: newer.lease_id()
        })
    );
    let other = client.acquire_lease(b"writer-b", 0, TTL).await.unwrap();
    server.shared().expire_lease(other.lease_id());
    assert!(matches!(
        client.renew_lease(other.lease_id(), TTL).await,
        Err(Error::LeaseLost { message, .. }) if message.contains("expired")
    ));
}

#[tokio::test]
async fn lease_calls_follow_the_leader_hint_and_then_go_straight_to_it() {
    let _turn = crate::common::topic(module_path!());
    let leader = server_at(Mode::Leader, 5);
    let follower = follower_of(&leader);
    let client = client(&[follower.endpoint()]).await;
    let lease = client.acquire_lease(b"w", 0, TTL).await.unwrap();
    assert_eq!(lease.epoch(), Epoch::new(5));
    assert_eq!(client.leader(), (uri(&leader), Epoch::new(5)));
    assert_eq!(follower.shared().lease_calls(), ["acquire"]);
    client.renew_lease(lease.lease_id(), TTL).await.unwrap();
    client.release_lease(lease.lease_id()).await.unwrap();
    assert_eq!(
        follower.shared().rpcs(),
        1,
        "the cached leader is asked first"
    );
    let id = lease.lease_id();
    assert_eq!(
        leader.shared().lease_calls(),
        [
            "acquire".to_string(),
            format!("renew {id}"),
            format!("release {id}")
        ]
    );
}

#[tokio::test]
async fn the_frontier_comes_from_the_leader_past_followers_that_answer_zero() {
    let _turn = crate::common::topic(module_path!());
    let leader = server_at(Mode::Leader, 7);
    // Followers that know no leader: they answer 0 with a zero epoch, no error, no hint.
    let no_leader = || Mode::Follower {
        endpoint: None,
        epoch: None,
    };
    let followers = [
        TestServer::start(no_leader()),
        TestServer::start(no_leader()),
    ];
    let endpoints = [
        followers[0].endpoint(),
        followers[1].endpoint(),
        leader.endpoint(),
    ];
    let client = client(&endpoints).await;
    let frontier = client.safe_frontier().await.unwrap();
    assert_eq!(frontier.physical_ms(), TEST_FRONTIER_MS);
    assert_eq!(frontier.epoch(), Epoch::new(7));
    assert_eq!(client.leader(), (uri(&leader), Epoch::new(7)));
    for follower in &followers {
        assert_eq!(follower.shared().lease_calls(), ["frontier"]);
    }
    client.safe_frontier().await.unwrap();
    assert_eq!(leader.shared().lease_calls_of("frontier"), 2);
    assert_eq!(
        followers[0].shared().rpcs() + followers[1].shared().rpcs(),
        2,
        "the known leader is asked first"
    );
}

#[tokio::test]
async fn the_frontier_moves_on_when_the_cached_leader_stops_leading() {
    let _turn = crate::common::topic(module_path!());
    let old = server_at(Mode::Leader, 1);
    let new = server_at(Mode::Leader, 2);
    new.shared().set_mode(Mode::Follower {
        endpoint: None,
        epoch: None,
    });
    let client = client(&[old.endpoint(), new.endpoint()]).await;
    assert_eq!(client.safe_frontier().await.unwrap().epoch(), Epoch::new(1));
    old.shared().set_mode(Mode::Follower {
        endpoint: None,
        epoch: None,
    });
    new.shared().set_mode(Mode::Leader);
    assert_eq!(client.safe_frontier().await.unwrap().epoch(), Epoch::new(2));
    assert_eq!(client.leader(), (uri(&new), Epoch::new(2)));
}

#[tokio::test]
async fn without_a_leader_the_frontier_is_a_deadline_error_not_a_zero() {
    let _turn = crate::common::topic(module_path!());
    let followers = [
        TestServer::start(Mode::Follower {
            endpoint: None,
            epoch: None,
        }),
        TestServer::start(Mode::Follower {
            endpoint: None,
            epoch: None,
        }),
    ];
    let endpoints = [followers[0].endpoint(), followers[1].endpoint()];
    let client = builder()
        .overall_timeout(Duration::from_millis(300))
        .connect(endpoints)
        .await
        .unwrap();
    let error = client.safe_frontier().await.unwrap_err();
    assert!(matches!(error, Error::DeadlineExceeded { .. }), "{error:?}");
    assert!(error.is_retryable());
    assert!(followers.iter().all(|f| f.shared().rpcs() >= 1));
}

#[tokio::test]
async fn refusals_are_typed_and_unimplemented_is_final() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Status(Code::Unimplemented, "no leases here"));
    let client = client(&[server.endpoint()]).await;
    let unimplemented = |result: Result<(), Error>| match result {
        Err(Error::Server { code, message, .. }) => {
            assert_eq!(code, Code::Unimplemented);
            assert_eq!(message, "no leases here");
        }
        other => panic!("not UNIMPLEMENTED: {other:?}"),
    };
    unimplemented(client.acquire_lease(b"w", 0, TTL).await.map(drop));
    unimplemented(client.renew_lease(1, TTL).await.map(drop));
    unimplemented(client.release_lease(1).await);
    unimplemented(client.safe_frontier().await.map(drop));
    assert_eq!(server.shared().rpcs(), 4, "never retried");

    server.shared().set_mode(Mode::InvalidArgument);
    assert!(matches!(
        client.acquire_lease(b"w", 0, TTL).await,
        Err(Error::InvalidArgument { .. })
    ));
    server
        .shared()
        .set_mode(Mode::Status(Code::FailedPrecondition, "lease 4 expired"));
    assert!(matches!(
        client.renew_lease(4, TTL).await,
        Err(Error::LeaseLost { lease_id: 4, message }) if message == "lease 4 expired"
    ));
    server
        .shared()
        .set_mode(Mode::Status(Code::NotFound, "no lease 4"));
    assert_eq!(
        client.renew_lease(4, TTL).await,
        Err(Error::LeaseNotFound { lease_id: 4 })
    );
    assert_eq!(server.shared().rpcs(), 7);
}

#[tokio::test]
async fn unavailable_is_retried_for_every_lease_call_within_the_budget() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::UnavailableTimes(3));
    let client = client(&[server.endpoint()]).await;
    let lease = client.acquire_lease(b"w", 0, TTL).await.unwrap();
    assert_eq!(server.shared().lease_calls(), ["acquire"; 4]);
    server.shared().set_mode(Mode::UnavailableTimes(2));
    client.renew_lease(lease.lease_id(), TTL).await.unwrap();
    server.shared().set_mode(Mode::UnavailableTimes(2));
    client.release_lease(lease.lease_id()).await.unwrap();
    server.shared().set_mode(Mode::UnavailableTimes(2));
    client.safe_frontier().await.unwrap();
    assert_eq!(server.shared().rpcs(), 4 + 3 + 3 + 3);

    server.shared().set_mode(Mode::UnavailableTimes(100));
    let limited = builder().attempts_max(3).connect([server.endpoint()]).await;
    let error = limited
        .unwrap()
        .acquire_lease(b"w", 0, TTL)
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::Unavailable { attempts: 3, .. }),
        "{error:?}"
    );
    assert!(error.is_retryable());
}

#[tokio::test]
async fn a_dead_endpoint_is_passed_over() {
    let _turn = crate::common::topic(module_path!());
    let dead = DeadEndpoint::new();
    let leader = TestServer::start(Mode::Leader);
    let client = client(&[dead.endpoint(), leader.endpoint()]).await;
    let lease = client.acquire_lease(b"w", 0, TTL).await.unwrap();
    client.renew_lease(lease.lease_id(), TTL).await.unwrap();
    assert_eq!(client.safe_frontier().await.unwrap().epoch(), Epoch::new(1));
}

#[tokio::test]
async fn bad_holders_and_ttls_are_refused_before_any_rpc() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Leader);
    let client = client(&[server.endpoint()]).await;
    let longest = vec![b'h'; LEASE_HOLDER_BYTES_MAX];
    for holder in [vec![], vec![b'h'; LEASE_HOLDER_BYTES_MAX + 1]] {
        assert_eq!(
            client.acquire_lease(&holder, 0, TTL).await.unwrap_err(),
            Error::InvalidLeaseHolder {
                holder_bytes: holder.len()
            }
        );
    }
    for ttl in [Duration::ZERO, Duration::from_micros(1500)] {
        let expected = Error::InvalidLeaseTtl { ttl };
        assert_eq!(
            client.acquire_lease(&longest, 0, ttl).await.unwrap_err(),
            expected
        );
        assert_eq!(client.renew_lease(1, ttl).await.unwrap_err(), expected);
        let keeper = LeaseKeeper::start(&client, b"w", 0, ttl).await;
        assert_eq!(keeper.unwrap_err(), expected);
    }
    let too_short = LeaseKeeper::builder(b"w", 0, Duration::from_secs(1)).start(&client);
    assert!(matches!(too_short.await, Err(Error::InvalidConfig { .. })));
    assert_eq!(server.shared().rpcs(), 0);
    client.acquire_lease(&longest, 0, TTL).await.unwrap();
}

/// Polls `keeper.permit()` until `done` says so; bounded by the hang guard only.
async fn poll_permit(
    keeper: &LeaseKeeper,
    done: impl Fn(&Result<StampPermit, Error>) -> bool,
) -> Result<StampPermit, Error> {
    let wait = async {
        loop {
            let permit = keeper.permit();
            if done(&permit) {
                return permit;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, wait)
        .await
        .expect("hang guard")
}

#[tokio::test]
async fn a_keeper_renews_stalls_while_renewals_fail_and_releases_when_stopped() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Leader);
    let client = client(&[server.endpoint()]).await;
    // The fake server takes any TTL: a short one keeps the test quick. Nothing below depends on
    // how fast the machine is; every wait is for a condition.
    let ttl = Duration::from_millis(300);
    let keeper = LeaseKeeper::builder(b"w", 0, ttl)
        .expiry_margin(Duration::from_millis(30))
        .start(&client)
        .await
        .unwrap();
    let id = keeper.lease_id();
    assert_eq!(
        server.shared().lease_calls()[..2],
        ["acquire".to_string(), format!("renew {id}")],
        "the start renews at once"
    );
    let shared = server.shared();
    tokio::time::timeout(HANG_GUARD, async {
        while shared.lease_calls_of("renew") < 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the keeper renews in the background");
    let permit = keeper.wait_permit().await.unwrap();
    assert_eq!(permit.lease_id(), id);
    let grant = keeper.grant().unwrap();
    assert!(permit.valid_until() <= grant.local_expiry() - Duration::from_millis(30));

    shared.set_mode(Mode::Status(Code::Unavailable, "the durable write failed"));
    let stalled = poll_permit(&keeper, |p| p.is_err()).await;
    match stalled {
        Err(error @ Error::LeaseStalled { .. }) => assert!(error.is_retryable(), "{error}"),
        other => panic!("not stalled: {other:?}"),
    }
    let last = keeper.grant().unwrap();
    assert!(tokio::time::Instant::now() + Duration::from_millis(30) >= last.local_expiry());

    shared.set_mode(Mode::Leader);
    keeper.wait_permit().await.expect("renewals resume");
    shared.expire_lease(id);
    let lost = poll_permit(&keeper, |p| matches!(p, Err(Error::LeaseLost { .. }))).await;
    assert!(!lost.unwrap_err().is_retryable());
    keeper.stop().await.unwrap();
    assert_eq!(
        shared.lease_calls().last().unwrap(),
        &format!("release {id}")
    );
}

#[tokio::test]
async fn dropping_a_keeper_releases_its_lease() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Leader);
    let client = client(&[server.endpoint()]).await;
    let keeper = LeaseKeeper::start(&client, b"w", 0, TTL).await.unwrap();
    let id = keeper.lease_id();
    assert!(keeper.permit().unwrap().allows(1));
    drop(keeper);
    tokio::time::timeout(HANG_GUARD, async {
        while server.shared().lease_exists(id) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("released after the drop");
}

#[tokio::test]
async fn a_keeper_on_a_server_without_leases_fails_to_start() {
    let _turn = crate::common::topic(module_path!());
    let server = TestServer::start(Mode::Status(Code::Unimplemented, "no leases"));
    let client = client(&[server.endpoint()]).await;
    let error = LeaseKeeper::start(&client, b"w", 0, TTL).await.unwrap_err();
    assert!(
        matches!(
            error,
            Error::Server {
                code: Code::Unimplemented,
                ..
            }
        ),
        "{error:?}"
    );
}
