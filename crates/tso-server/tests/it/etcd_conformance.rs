//! The etcd backend against a real `etcd` process (Debian's `etcd-server`, etcd 3.4): the
//! backend-seam conformance suite, leadership between two nodes, the fence on a deposed
//! leader's writes, and the leader lease ending when keep-alives stop reaching etcd.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tso_core::Epoch;
use tso_proto::etcd::kv_client::KvClient;
use tso_proto::etcd::lease_client::LeaseClient;
use tso_proto::etcd::maintenance_client::MaintenanceClient;
use tso_proto::etcd::{LeaseRevokeRequest, RangeRequest, StatusRequest};
use tso_server::backend::conformance;
use tso_server::backend::etcd::{EtcdBackend, EtcdConfig};
use tso_server::backend::{Backend, BackendError, Leadership, OracleCommand};
use tso_testkit::etcd::EtcdProcess;

const PREFIX: &str = "/tso/test";
/// The shortest TTL the backend (and etcd, at its default election timeout) accepts.
const TTL: Duration = Duration::from_secs(2);
/// Hang guard for waits: generous, never what a test asserts on.
const WAIT: Duration = Duration::from_secs(30);

/// One single-member etcd, killed on drop (`tso_testkit::etcd`).
struct Etcd {
    process: EtcdProcess,
    client_url: String,
}

impl Etcd {
    async fn start() -> Etcd {
        let process = tokio::task::spawn_blocking(EtcdProcess::start)
            .await
            .expect("starting etcd");
        let client_url = process.client_url().to_string();
        let etcd = Etcd {
            process,
            client_url,
        };
        etcd.wait_ready().await;
        etcd
    }

    async fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            if let Ok(mut m) = MaintenanceClient::connect(self.client_url.clone()).await
                && let Ok(status) = m.status(StatusRequest {}).await
                && status.get_ref().leader != 0
            {
                return;
            }
            assert!(
                started.elapsed() < WAIT,
                "etcd did not answer at {} within {WAIT:?}",
                self.client_url
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn config(&self, node_id: u64) -> EtcdConfig {
        EtcdConfig {
            lease_ttl: TTL,
            ..EtcdConfig::new(
                vec![self.client_url.clone()],
                PREFIX,
                node_id,
                format!("127.0.0.1:{}", 7000 + node_id),
            )
        }
    }

    fn signal(&self, signal: libc::c_int) {
        self.process.signal(signal);
    }
}

async fn open(etcd: &Etcd, node_id: u64) -> EtcdBackend {
    EtcdBackend::open(etcd.config(node_id))
        .await
        .expect("open the etcd backend")
}

/// Waits until `rx` shows a value `f` accepts, and returns what `f` made of it.
async fn wait_for<T>(
    rx: &mut watch::Receiver<Leadership>,
    what: &str,
    mut f: impl FnMut(&Leadership) -> Option<T>,
) -> T {
    let wait = async {
        loop {
            if let Some(t) = f(&rx.borrow_and_update()) {
                return t;
            }
            rx.changed().await.expect("leadership watch closed");
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}; now {:?}", *rx.borrow()))
}

fn leader_epoch(l: &Leadership) -> Option<Epoch> {
    match l {
        Leadership::Leader { epoch } => Some(*epoch),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_etcd_member_keeps_the_backend_contract() {
    let _turn = crate::common::topic(module_path!());
    let etcd = Etcd::start().await;
    conformance::run_all(|| open(&etcd, 1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_nodes_leads_and_the_other_follows_then_takes_over_higher() {
    let _turn = crate::common::topic(module_path!());
    let etcd = Etcd::start().await;
    let a = open(&etcd, 1).await;
    let b = open(&etcd, 2).await;
    let (mut ra, mut rb) = (a.leadership(), b.leadership());
    let first = tokio::time::timeout(WAIT, async {
        loop {
            let (la, lb) = (ra.borrow().clone(), rb.borrow().clone());
            match (&la, &lb) {
                (Leadership::Leader { .. }, Leadership::Follower { .. })
                | (Leadership::Follower { .. }, Leadership::Leader { .. }) => return (la, lb),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
    .expect("one leader and one follower");
    let (leader, follower, leader_id, follower_rx) = match first {
        (Leadership::Leader { epoch }, f) => (epoch, f, 1, &mut rb),
        (f, Leadership::Leader { epoch }) => (epoch, f, 2, &mut ra),
        _ => unreachable!(),
    };
    assert_eq!(
        leader.lo(),
        leader_id,
        "the epoch's low half is the node id"
    );
    assert_eq!(
        follower,
        Leadership::Follower {
            leader_endpoint: Some(format!("127.0.0.1:{}", 7000 + leader_id)),
            leader_epoch: Some(leader),
        },
        "the follower names the leader's client address and epoch"
    );
    let (old, survivor) = if leader_id == 1 { (a, b) } else { (b, a) };
    assert!(old.leader_lease_valid(leader));
    assert!(
        !survivor.leader_lease_valid(leader),
        "a follower never grants"
    );
    drop(old);
    let next = wait_for(follower_rx, "the survivor to lead", leader_epoch).await;
    assert!(
        next > leader,
        "the new epoch {next} is above the old {leader}"
    );
    assert_eq!(next.lo(), survivor.node_id());
    let stored = survivor
        .apply(OracleCommand::AdvanceHighWater { at_least_ms: 77 }, next)
        .await
        .expect("the new leader applies");
    assert_eq!(stored.high_water_ms, 77);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leaders_write_never_lands() {
    let _turn = crate::common::topic(module_path!());
    let etcd = Etcd::start().await;
    let a = open(&etcd, 1).await;
    let ea = conformance::wait_for_leader(&a).await;
    a.apply(OracleCommand::AdvanceHighWater { at_least_ms: 10 }, ea)
        .await
        .expect("the leader applies");
    let b = open(&etcd, 2).await;
    let mut rb = b.leadership();
    wait_for(&mut rb, "b to follow a", |l| {
        matches!(l, Leadership::Follower { leader_epoch: Some(e), .. } if *e == ea).then_some(())
    })
    .await;

    // Revoke a's etcd lease by hand: its leader key goes, and both nodes campaign.
    let key = format!("{PREFIX}/leader").into_bytes();
    let mut kv = KvClient::connect(etcd.client_url.clone()).await.unwrap();
    let held = kv
        .range(RangeRequest {
            key: key.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .kvs
        .remove(0);
    let mut lease = LeaseClient::connect(etcd.client_url.clone()).await.unwrap();
    lease
        .lease_revoke(LeaseRevokeRequest { id: held.lease })
        .await
        .expect("revoke a's lease");
    let refused = |res: Result<_, BackendError>, when: &str| match res {
        Err(BackendError::Fenced { .. } | BackendError::NotLeader { .. }) => {}
        other => panic!("a deposed leader's apply ({when}) must be refused, got {other:?}"),
    };
    // At once (usually before a's poll notices: the fence compare of the transaction refuses).
    refused(
        a.apply(
            OracleCommand::AdvanceHighWater {
                at_least_ms: 555_555,
            },
            ea,
        )
        .await,
        "at once",
    );
    assert!(!a.leader_lease_valid(ea), "a deposed leader stops granting");

    // Either node may win the next term; it is a higher epoch either way.
    let ra = a.leadership();
    let next = tokio::time::timeout(WAIT, async {
        loop {
            for (node, rx) in [(&a, &ra), (&b, &rb)] {
                match *rx.borrow() {
                    Leadership::Leader { epoch } if epoch > ea => return (node, epoch),
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a new leader");
    let (leader, en) = next;
    assert!(en > ea, "the new epoch {en} is above the deposed {ea}");

    refused(
        a.apply(
            OracleCommand::AdvanceHighWater {
                at_least_ms: 999_999,
            },
            ea,
        )
        .await,
        "after the new term began",
    );
    assert!(
        !a.leader_lease_valid(ea),
        "the deposed epoch never grants again"
    );
    let state = leader.load().await.expect("load");
    assert_eq!(
        state.high_water_ms, 10,
        "the deposed leader's writes never landed"
    );
    let stored = leader
        .apply(OracleCommand::AdvanceHighWater { at_least_ms: 20 }, en)
        .await
        .expect("the new leader applies");
    assert_eq!(stored.high_water_ms, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_lease_ends_within_the_ttl_once_keep_alives_stop_reaching_etcd() {
    let _turn = crate::common::topic(module_path!());
    let etcd = Etcd::start().await;
    let a = open(&etcd, 1).await;
    let epoch = conformance::wait_for_leader(&a).await;
    // Through a few keep-alives, the lease holds.
    tokio::time::sleep(TTL * 2).await;
    assert!(a.leader_lease_valid(epoch), "keep-alives hold the lease");

    etcd.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let bound = TTL + Duration::from_secs(1);
    while a.leader_lease_valid(epoch) {
        assert!(
            stopped.elapsed() < bound,
            "the leader lease is still valid {:?} after etcd stopped answering",
            stopped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut ra = a.leadership();
    wait_for(&mut ra, "a to stop reporting Leader", |l| {
        (!matches!(l, Leadership::Leader { .. })).then_some(())
    })
    .await;

    etcd.signal(libc::SIGCONT);
    let next = wait_for(&mut ra, "a to lead again", leader_epoch).await;
    assert!(
        next > epoch,
        "a new term has a higher epoch: {next} after {epoch}"
    );
    assert!(
        !a.leader_lease_valid(epoch),
        "the old term never grants again"
    );
}
