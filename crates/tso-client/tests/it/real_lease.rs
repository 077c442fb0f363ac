//! Stamping leases and the safe frontier through the client against the project's real server
//! (`tso-server`, file backend) over loopback: acquire, renew, release and the frontier, the
//! holder-epoch rules, and the server's TTL bounds as `InvalidArgument`. Asserts relations
//! between the server's values, never timings.

use crate::common;

use std::time::Duration;

use common::HANG_GUARD;
use common::real::RealServer;
use tso_client::{Client, ClientBuilder, Error, LeaseKeeper};

const TTL: Duration = Duration::from_secs(10);

fn builder() -> ClientBuilder {
    Client::builder()
        .overall_timeout(HANG_GUARD)
        .attempt_timeout(Duration::from_secs(10))
        .backoff(Duration::from_millis(1), Duration::from_millis(20))
}

#[tokio::test]
async fn acquire_renew_release_and_the_frontier_on_the_file_backend() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = RealServer::start_file(dir.path(), "127.0.0.1:0".parse().unwrap());
    let client = builder().connect([server.endpoint()]).await.unwrap();
    let before = client.safe_frontier().await.unwrap();

    let lease = client.acquire_lease(b"writer-a", 1, TTL).await.unwrap();
    assert!(lease.ts_upper_bound_ms() >= lease.expires_at_ms());
    let again = client.acquire_lease(b"writer-a", 1, TTL).await.unwrap();
    assert_eq!(
        again.lease_id(),
        lease.lease_id(),
        "the same lease, renewed"
    );
    assert!(again.ts_upper_bound_ms() >= lease.ts_upper_bound_ms());
    let frontier = client.safe_frontier().await.unwrap();
    assert!(frontier.physical_ms() <= again.ts_upper_bound_ms());
    assert!(frontier.physical_ms() >= before.physical_ms());

    let renewed = client.renew_lease(lease.lease_id(), TTL).await.unwrap();
    assert!(renewed.ts_upper_bound_ms() >= lease.ts_upper_bound_ms());
    assert!(renewed.expires_at_ms() >= lease.expires_at_ms());

    let newer = client.acquire_lease(b"writer-a", 2, TTL).await.unwrap();
    assert_ne!(newer.lease_id(), lease.lease_id());
    assert!(matches!(
        client.acquire_lease(b"writer-a", 1, TTL).await,
        Err(Error::StaleHolderEpoch {
            holder_epoch: 1,
            ..
        })
    ));
    assert!(matches!(
        client.renew_lease(lease.lease_id(), TTL).await,
        Err(Error::LeaseLost { .. })
    ));

    client.release_lease(newer.lease_id()).await.unwrap();
    client.release_lease(newer.lease_id()).await.unwrap();
    client.release_lease(lease.lease_id()).await.unwrap();
    assert!(matches!(
        client.renew_lease(u64::MAX, TTL).await,
        Err(Error::LeaseNotFound { lease_id: u64::MAX })
    ));
    let after = client.safe_frontier().await.unwrap();
    assert!(after.physical_ms() >= frontier.physical_ms());
}

#[tokio::test]
async fn ttls_outside_the_servers_bounds_are_invalid_arguments() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = RealServer::start_file(dir.path(), "127.0.0.1:0".parse().unwrap());
    let client = builder().connect([server.endpoint()]).await.unwrap();
    for ttl in [Duration::from_secs(1), Duration::from_secs(301)] {
        assert!(
            matches!(
                client.acquire_lease(b"w", 0, ttl).await,
                Err(Error::InvalidArgument { .. })
            ),
            "{ttl:?}"
        );
    }
}

#[tokio::test]
async fn a_keeper_holds_a_lease_on_the_real_server_and_releases_it() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = RealServer::start_file(dir.path(), "127.0.0.1:0".parse().unwrap());
    let client = builder().connect([server.endpoint()]).await.unwrap();
    let keeper = LeaseKeeper::start(&client, b"writer-k", 1, TTL)
        .await
        .unwrap();
    let permit = keeper.wait_permit().await.unwrap();
    let frontier = client.safe_frontier().await.unwrap();
    assert!(frontier.physical_ms() <= permit.ts_upper_bound_ms());
    let id = keeper.lease_id();
    keeper.stop().await.unwrap();
    assert!(matches!(
        client.renew_lease(id, TTL).await,
        Err(Error::LeaseNotFound { .. } | Error::LeaseLost { .. })
    ));
}

/// SEMANTICS §14: a repeated acquire must not leave the holder believing in a TTL the server
/// does not hold. The answer carries no TTL, so an acquire for the live lease of the same
/// holder and epoch with another TTL is refused, and a keeper started that way fails instead of
/// handing out permits past the server's expiry; the same TTL stays idempotent.
#[tokio::test]
async fn an_acquire_with_another_ttl_for_a_live_lease_is_refused() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = RealServer::start_file(dir.path(), "127.0.0.1:0".parse().unwrap());
    let client = builder().connect([server.endpoint()]).await.unwrap();
    let short = Duration::from_secs(5);
    let lease = client.acquire_lease(b"writer-t", 1, short).await.unwrap();
    let again = client.acquire_lease(b"writer-t", 1, short).await.unwrap();
    assert_eq!(
        again.lease_id(),
        lease.lease_id(),
        "the same TTL is idempotent"
    );
    let longer = client
        .acquire_lease(b"writer-t", 1, Duration::from_secs(30))
        .await;
    match longer {
        Err(Error::LeaseTtlDiffers {
            holder_epoch: 1,
            message,
        }) => assert!(message.contains("5000 ms"), "names the live TTL: {message}"),
        other => panic!("expected LeaseTtlDiffers, got {other:?}"),
    }
    let keeper = LeaseKeeper::start(&client, b"writer-t", 1, Duration::from_secs(30)).await;
    assert!(
        matches!(keeper, Err(Error::LeaseTtlDiffers { .. })),
        "a keeper asking another TTL fails: {:?}",
        keeper.as_ref().err()
    );
    // A higher holder epoch supersedes it with the new TTL.
    let newer = client
        .acquire_lease(b"writer-t", 2, Duration::from_secs(30))
        .await
        .unwrap();
    assert_ne!(newer.lease_id(), lease.lease_id());
}
