//! Stamping leases through a crash of the real binary: a lease acquired before `kill -9` still
//! binds the safe frontier after the restart and renews above everything issued before; the
//! TTL bounds are serve flags, checked at start.

use crate::common;

use common::*;
use tso_proto::v1::{AcquireLeaseRequest, GetSafeFrontierRequest, GetTsRequest, RenewLeaseRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_binds_the_frontier_across_kill_9() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let mut client = server.client().await;
    let lease = client
        .acquire_lease(AcquireLeaseRequest {
            holder: b"stamper".to_vec(),
            holder_epoch: 1,
            ttl_ms: 120_000,
        })
        .await
        .unwrap()
        .into_inner();
    let ts = client
        .get_ts(GetTsRequest { count: 1 })
        .await
        .unwrap()
        .into_inner();
    server.kill9();

    let server = Server::start(dir.path(), &[]);
    let mut client = server.client().await;
    let frontier = client
        .get_safe_frontier(GetSafeFrontierRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        frontier.frontier_physical_ms <= lease.ts_upper_bound,
        "frontier {} passed the bound {} of a lease acquired before the crash",
        frontier.frontier_physical_ms,
        lease.ts_upper_bound
    );
    let renewed = client
        .renew_lease(RenewLeaseRequest {
            lease_id: lease.lease_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(renewed.ts_upper_bound >= lease.ts_upper_bound);
    assert!(renewed.ts_upper_bound > ts.physical_ms);
    let after = client
        .get_ts(GetTsRequest { count: 1 })
        .await
        .unwrap()
        .into_inner();
    assert!(
        after.physical_ms > lease.ts_upper_bound,
        "the restarted server grants above the lease's durable bound"
    );
}

#[test]
fn lease_ttl_flags_are_checked_and_applied() {
    let _turn = crate::common::topic(module_path!());
    let (status, _, err) = run_tso(&["serve", "--lease-ttl-min", "10s", "--lease-ttl-max", "5s"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("--lease-ttl-min"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--lease-ttl-min", "1s", "--lease-ttl-max", "2s"],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = server.client().await;
        let acquire = |ttl_ms| AcquireLeaseRequest {
            holder: b"h".to_vec(),
            holder_epoch: 1,
            ttl_ms,
        };
        client.acquire_lease(acquire(1_000)).await.unwrap();
        let refused = client.acquire_lease(acquire(2_001)).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(refused.message().contains("1000 to 2000"), "{refused:?}");
    });
}
