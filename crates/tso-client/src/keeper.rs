//! [`LeaseKeeper`]: one stamping lease held for its owner (SEMANTICS §14). A background task
//! renews it ahead of expiry; the owner asks [`LeaseKeeper::permit`] before stamping and gets
//! the bound it may stamp up to, or an error saying it must stall.
//!
//! Invariant: a permit is only given before `requested_at + ttl - expiry_margin` of the latest
//! grant, where `requested_at` is the instant on the holder's own monotonic clock when the call
//! that brought the grant started. The server computed its expiry from its own clock at some
//! moment after that instant, so (up to the margin, which covers clock rates and offsets
//! between leaders) the holder stops before the server lets the lease go, however renewals
//! fail. The leader's `expires_at_ms` is never compared with the holder's clock.
//!
//! Sizing the TTL: the keeper renews when `renew_ahead` (a third of the TTL by default) is left,
//! so a renewal has `renew_ahead - expiry_margin` to succeed before stamping stalls. That window
//! must cover a failover: the election (about 0.7 s on a default raft cluster), the new leader's
//! fence (one durable write), and the client finding it (a few backoff steps): about 1-2 s. With
//! the defaults, `ttl / 3 - 0.5 s >= 2 s` gives a TTL of at least 7.5 s; 10 s to 30 s is a good
//! choice. A longer TTL also holds the safe frontier back longer when a holder dies without
//! releasing.

use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tso_core::Epoch;

use crate::lease::{AcquireRequest, LeaseGrant};
use crate::{Client, Error, Result};

/// How much earlier than `requested_at + ttl` the keeper stops vouching for its lease by
/// default. It covers what the holder's clock cannot see: the leader's monotonic clock running
/// faster than the holder's (100 ppm over a 300 s TTL is 30 ms). Wall clocks do not enter into
/// it: servers judge leases on monotonic time, and a new leader counts a full TTL from its load
/// (SEMANTICS §14), so 500 ms leaves a wide berth.
pub const LEASE_EXPIRY_MARGIN_DEFAULT: Duration = Duration::from_millis(500);

/// The keeper renews when `ttl / RENEW_AHEAD_DIVISOR` of the TTL is left, by default.
const RENEW_AHEAD_DIVISOR: u32 = 3;

/// Pause between renewal calls that failed (each call already retried within the client's
/// attempt budget): a twentieth of the TTL, so about 6 more calls fit in the default renewal
/// window, at most 1 s, at least 1 ms.
fn retry_pause(ttl: Duration) -> Duration {
    (ttl / 20).clamp(Duration::from_millis(1), Duration::from_secs(1))
}

/// What the keeper's task needs from a client: renewing and releasing one lease. A trait so the
/// task's timing can be tested on a paused clock without a network.
pub(crate) trait Renewer: Send + Sync + 'static {
    fn renew(
        &self,
        lease_id: u64,
        ttl: Duration,
    ) -> impl Future<Output = Result<LeaseGrant>> + Send;
    fn release(&self, lease_id: u64) -> impl Future<Output = Result<()>> + Send;
}

impl Renewer for Client {
    fn renew(
        &self,
        lease_id: u64,
        ttl: Duration,
    ) -> impl Future<Output = Result<LeaseGrant>> + Send {
        self.renew_lease(lease_id, ttl)
    }

    fn release(&self, lease_id: u64) -> impl Future<Output = Result<()>> + Send {
        self.release_lease(lease_id)
    }
}

/// The keeper's timing, validated: `expiry_margin < renew_ahead < ttl`.
#[derive(Clone, Copy, Debug)]
struct Timing {
    ttl: Duration,
    expiry_margin: Duration,
    renew_ahead: Duration,
}

impl Timing {
    /// The last instant a permit may run to under `grant`.
    fn valid_until(&self, grant: &LeaseGrant) -> Instant {
        grant.local_expiry() - self.expiry_margin
    }

    fn renew_at(&self, grant: &LeaseGrant) -> Instant {
        grant.local_expiry() - self.renew_ahead
    }
}

/// What the keeper knows of its lease.
#[derive(Clone, Debug)]
enum State {
    /// The latest grant; `renew_error` is why the renewals since failed, if they did.
    Held {
        grant: LeaseGrant,
        valid_until: Instant,
        renew_error: Option<String>,
    },
    /// The server said the lease is gone (or the client stopped): no permit ever again.
    Lost(Error),
}

/// Leave to stamp now: physical parts up to [`StampPermit::ts_upper_bound_ms`], until
/// [`StampPermit::valid_until`] on the holder's clock. Check [`StampPermit::allows`] for each
/// stamp, or ask the keeper again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StampPermit {
    lease_id: u64,
    ts_upper_bound_ms: u64,
    valid_until: Instant,
    epoch: Epoch,
}

impl StampPermit {
    pub fn lease_id(&self) -> u64 {
        self.lease_id
    }

    /// The highest physical millisecond a stamp may carry (inclusive).
    pub fn ts_upper_bound_ms(&self) -> u64 {
        self.ts_upper_bound_ms
    }

    /// The permit's end on the holder's monotonic clock.
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    /// The epoch of the leader that granted the lease's latest bound.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// True when a stamp with this physical part may be made now: within the bound and before
    /// the permit ends. A holder whose clock passed the bound stalls until a renewal raises it;
    /// it never stamps a smaller physical part than its clock says (never skews).
    pub fn allows(&self, physical_ms: u64) -> bool {
        physical_ms <= self.ts_upper_bound_ms && Instant::now() < self.valid_until
    }
}

/// Options of a [`LeaseKeeper`]; start from [`LeaseKeeper::builder`].
#[derive(Clone, Debug)]
pub struct LeaseKeeperBuilder {
    holder: Vec<u8>,
    holder_epoch: u64,
    ttl: Duration,
    expiry_margin: Duration,
    renew_ahead: Option<Duration>,
}

impl LeaseKeeperBuilder {
    /// How much earlier than its conservative local expiry the keeper stops giving permits
    /// (default [`LEASE_EXPIRY_MARGIN_DEFAULT`]).
    pub fn expiry_margin(mut self, margin: Duration) -> Self {
        self.expiry_margin = margin;
        self
    }

    /// How much of the TTL is left when the keeper renews (default a third of the TTL). Must
    /// be above the expiry margin and below the TTL.
    pub fn renew_ahead(mut self, ahead: Duration) -> Self {
        self.renew_ahead = Some(ahead);
        self
    }

    /// Acquires the lease through `client`, renews it once (so that its expiry is known to run
    /// from this call even if an earlier call with the same holder and `holder_epoch` created
    /// it), and starts renewing it in the background. Fails when either call fails; a lease
    /// acquired by then is released, best effort.
    pub async fn start(self, client: &Client) -> Result<LeaseKeeper> {
        AcquireRequest::new(&self.holder, self.holder_epoch, self.ttl)?;
        let timing = self.timing()?;
        let acquired = client
            .acquire_lease(&self.holder, self.holder_epoch, self.ttl)
            .await?;
        let lease_id = acquired.lease_id();
        match client.renew_lease(lease_id, self.ttl).await {
            Ok(grant) => Ok(LeaseKeeper::spawn(client.clone(), grant, timing)),
            Err(error) => {
                let client = client.clone();
                tokio::spawn(async move { client.release_lease(lease_id).await });
                Err(error)
            }
        }
    }

    fn timing(&self) -> Result<Timing> {
        let renew_ahead = self.renew_ahead.unwrap_or(self.ttl / RENEW_AHEAD_DIVISOR);
        if !(self.expiry_margin < renew_ahead && renew_ahead < self.ttl) {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "a lease keeper needs expiry margin < renew ahead < TTL, got {:?}, {:?} \
                     and {:?}: lengthen the TTL or shorten the margin",
                    self.expiry_margin, renew_ahead, self.ttl
                ),
            });
        }
        Ok(Timing {
            ttl: self.ttl,
            expiry_margin: self.expiry_margin,
            renew_ahead,
        })
    }
}

/// Holds one stamping lease: renews it ahead of expiry in a background task and tells its owner
/// whether it may stamp now ([`LeaseKeeper::permit`]). See the module docs for how to size the
/// TTL, and docs/client.md ("What a holder must do") for what a holder must do.
///
/// Stopping it ([`LeaseKeeper::stop`]) or dropping it releases the lease (best effort when
/// dropped; an unreleased lease ends at its TTL). It never acquires again on its own: once the
/// server says the lease is gone ([`Error::LeaseLost`], [`Error::LeaseNotFound`]), every
/// permit is refused and the owner decides whether to start a new keeper (with a higher
/// `holder_epoch` if another incarnation may hold the lease).
#[derive(Debug)]
pub struct LeaseKeeper {
    lease_id: u64,
    state: watch::Receiver<State>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<()>>,
}

impl LeaseKeeper {
    /// Options for a keeper of `holder`'s lease at `holder_epoch` with `ttl`.
    pub fn builder(holder: &[u8], holder_epoch: u64, ttl: Duration) -> LeaseKeeperBuilder {
        LeaseKeeperBuilder {
            holder: holder.to_vec(),
            holder_epoch,
            ttl,
            expiry_margin: LEASE_EXPIRY_MARGIN_DEFAULT,
            renew_ahead: None,
        }
    }

    /// A keeper with default options: see [`LeaseKeeperBuilder::start`].
    pub async fn start(
        client: &Client,
        holder: &[u8],
        holder_epoch: u64,
        ttl: Duration,
    ) -> Result<LeaseKeeper> {
        Self::builder(holder, holder_epoch, ttl).start(client).await
    }

    fn spawn<R: Renewer>(renewer: R, grant: LeaseGrant, timing: Timing) -> LeaseKeeper {
        let lease_id = grant.lease_id();
        let (state_tx, state) = watch::channel(held(&timing, grant.clone()));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(keep(renewer, grant, timing, state_tx, stopped));
        LeaseKeeper {
            lease_id,
            state,
            stop,
            task,
        }
    }

    /// The lease's id.
    pub fn lease_id(&self) -> u64 {
        self.lease_id
    }

    /// The latest grant of the lease, or `None` once it is lost.
    pub fn grant(&self) -> Option<LeaseGrant> {
        match &*self.state.borrow() {
            State::Held { grant, .. } => Some(grant.clone()),
            State::Lost(_) => None,
        }
    }

    /// May the owner stamp now, and up to which physical millisecond? A permit, or:
    /// [`Error::LeaseStalled`] when the lease may have run out by the holder's clock and no
    /// renewal has succeeded since (stall; the keeper keeps trying); the server's refusal
    /// ([`Error::LeaseLost`], [`Error::LeaseNotFound`]) once the lease is gone for good.
    pub fn permit(&self) -> Result<StampPermit> {
        permit_of(&self.state.borrow())
    }

    /// Waits until [`LeaseKeeper::permit`] gives a permit, or the lease is gone for good.
    pub async fn wait_permit(&self) -> Result<StampPermit> {
        let mut state = self.state.clone();
        loop {
            let permit = permit_of(&state.borrow_and_update());
            match permit {
                Err(Error::LeaseStalled { .. }) => {}
                done => return done,
            }
            if state.changed().await.is_err() {
                return Err(Error::Closed);
            }
        }
    }

    /// Stops renewing and releases the lease; the error of the release, if it failed (the
    /// lease then ends at its TTL).
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or(Err(Error::Closed))
    }
}

fn held(timing: &Timing, grant: LeaseGrant) -> State {
    State::Held {
        valid_until: timing.valid_until(&grant),
        grant,
        renew_error: None,
    }
}

fn permit_of(state: &State) -> Result<StampPermit> {
    match state {
        State::Held {
            grant,
            valid_until,
            renew_error,
        } => {
            if Instant::now() < *valid_until {
                return Ok(StampPermit {
                    lease_id: grant.lease_id(),
                    ts_upper_bound_ms: grant.ts_upper_bound_ms(),
                    valid_until: *valid_until,
                    epoch: grant.epoch(),
                });
            }
            Err(Error::LeaseStalled {
                lease_id: grant.lease_id(),
                reason: renew_error
                    .clone()
                    .unwrap_or_else(|| "its renewal has not answered yet".into()),
            })
        }
        State::Lost(error) => Err(error.clone()),
    }
}

/// The keeper's task: renew at each grant's `renew_at` until stopped (or dropped), then release.
async fn keep<R: Renewer>(
    renewer: R,
    grant: LeaseGrant,
    timing: Timing,
    state: watch::Sender<State>,
    mut stop: oneshot::Receiver<()>,
) -> Result<()> {
    let lease_id = grant.lease_id();
    let mut renew_at = timing.renew_at(&grant);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep_until(renew_at) => {}
        }
        let renewal = tokio::select! {
            _ = &mut stop => break,
            renewal = renewer.renew(lease_id, timing.ttl) => renewal,
        };
        renew_at = match renewal {
            Ok(grant) => {
                let next = timing.renew_at(&grant);
                state.send_replace(held(&timing, grant));
                next
            }
            Err(
                error @ (Error::LeaseLost { .. } | Error::LeaseNotFound { .. } | Error::Closed),
            ) => {
                tracing::warn!(lease_id, %error, "the stamping lease is gone");
                state.send_replace(State::Lost(error));
                let _ = (&mut stop).await;
                break;
            }
            Err(error) => {
                // Not known to be gone: keep trying. Permits stop by the clock meanwhile.
                tracing::warn!(lease_id, %error, "renewing the stamping lease failed");
                state.send_modify(|state| {
                    if let State::Held { renew_error, .. } = state {
                        *renew_error = Some(error.to_string());
                    }
                });
                Instant::now() + retry_pause(timing.ttl)
            }
        };
    }
    renewer.release(lease_id).await
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::lease::test_grant;

    /// A scripted server: renewals answer `next` (a grant at the call's instant when `Ok`),
    /// and every call is recorded with its instant.
    #[derive(Clone, Default)]
    struct Fake {
        next: Arc<Mutex<Option<Error>>>,
        calls: Arc<Mutex<Vec<(&'static str, Instant)>>>,
    }

    impl Fake {
        fn fail_with(&self, error: Option<Error>) {
            *self.next.lock().unwrap() = error;
        }

        fn calls(&self, kind: &str) -> Vec<Instant> {
            let calls = self.calls.lock().unwrap();
            calls.iter().filter(|c| c.0 == kind).map(|c| c.1).collect()
        }
    }

    impl Renewer for Fake {
        fn renew(
            &self,
            lease_id: u64,
            ttl: Duration,
        ) -> impl Future<Output = Result<LeaseGrant>> + Send {
            let now = Instant::now();
            self.calls.lock().unwrap().push(("renew", now));
            let result = match self.next.lock().unwrap().clone() {
                None => Ok(test_grant(
                    lease_id,
                    1_000 + self.calls("renew").len() as u64,
                    ttl,
                    now,
                )),
                Some(error) => Err(error),
            };
            std::future::ready(result)
        }

        fn release(&self, _: u64) -> impl Future<Output = Result<()>> + Send {
            self.calls.lock().unwrap().push(("release", Instant::now()));
            std::future::ready(Ok(()))
        }
    }

    const TTL: Duration = Duration::from_secs(9);

    fn timing() -> Timing {
        LeaseKeeper::builder(b"w", 0, TTL).timing().unwrap()
    }

    /// Lets the keeper's task run at the current (paused) instant.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Moves the paused clock to `end` in 10 ms steps, letting the task run at each.
    async fn run_until(end: Instant) {
        while Instant::now() < end {
            let step = (end - Instant::now()).min(Duration::from_millis(10));
            tokio::time::advance(step).await;
            settle().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn renews_when_a_third_of_the_ttl_is_left_and_never_stalls_while_renewals_work() {
        let fake = Fake::default();
        let start = Instant::now();
        let keeper = LeaseKeeper::spawn(fake.clone(), test_grant(7, 1_000, TTL, start), timing());
        for step in 1..=60 {
            tokio::time::advance(Duration::from_millis(500)).await;
            settle().await;
            let permit = keeper
                .permit()
                .unwrap_or_else(|e| panic!("step {step}: {e}"));
            assert!(permit.valid_until() > Instant::now());
            assert!(permit.allows(permit.ts_upper_bound_ms()));
            assert!(!permit.allows(permit.ts_upper_bound_ms() + 1));
        }
        let renewals = fake.calls("renew");
        let expected: Vec<Instant> = (1..=5)
            .map(|k| start + Duration::from_secs(6 * k))
            .collect();
        assert_eq!(renewals, expected, "one renewal every ttl - ttl/3");
        assert_eq!(keeper.permit().unwrap().ts_upper_bound_ms(), 1_005);
        keeper.stop().await.unwrap();
        assert_eq!(fake.calls("release").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn stalls_by_its_own_clock_when_renewals_fail_and_resumes_after_one_succeeds() {
        let fake = Fake::default();
        fake.fail_with(Some(Error::Unavailable {
            attempts: 8,
            last: "write failed".into(),
        }));
        let start = Instant::now();
        let keeper = LeaseKeeper::spawn(fake.clone(), test_grant(7, 1_000, TTL, start), timing());
        let valid_until = start + TTL - LEASE_EXPIRY_MARGIN_DEFAULT;
        run_until(valid_until - Duration::from_millis(1)).await;
        let permit = keeper.permit().expect("still inside the margin");
        assert_eq!(permit.valid_until(), valid_until);
        assert!(fake.calls("renew").len() >= 2, "it kept trying");
        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert!(!permit.allows(1), "a held permit ends with the lease");
        match keeper.permit() {
            Err(Error::LeaseStalled {
                lease_id: 7,
                reason,
            }) => {
                assert!(reason.contains("write failed"), "{reason}")
            }
            other => panic!("not stalled: {other:?}"),
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        settle().await;
        assert!(keeper.permit().is_err(), "still stalled long after");
        fake.fail_with(None);
        let resumed = tokio::time::timeout(Duration::from_secs(2), keeper.wait_permit());
        let permit = resumed.await.expect("a renewal within the pause").unwrap();
        assert!(permit.valid_until() > Instant::now() + TTL / 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_refuses_every_permit_and_stopping_releases_it() {
        let fake = Fake::default();
        let keeper = LeaseKeeper::spawn(
            fake.clone(),
            test_grant(7, 1_000, TTL, Instant::now()),
            timing(),
        );
        fake.fail_with(Some(Error::LeaseLost {
            lease_id: 7,
            message: "superseded".into(),
        }));
        assert!(keeper.permit().is_ok(), "held until the renewal");
        tokio::time::advance(TTL - TTL / 3).await;
        settle().await;
        assert!(matches!(
            keeper.permit(),
            Err(Error::LeaseLost { lease_id: 7, .. })
        ));
        assert!(matches!(
            keeper.wait_permit().await,
            Err(Error::LeaseLost { .. })
        ));
        assert_eq!(
            fake.calls("renew").len(),
            1,
            "a lost lease is not renewed again"
        );
        assert!(keeper.grant().is_none());
        drop(keeper);
        settle().await;
        assert_eq!(fake.calls("release").len(), 1, "dropping releases");
    }

    #[test]
    fn timings_are_validated() {
        let builder = |ttl| LeaseKeeper::builder(b"w", 0, ttl);
        assert!(builder(Duration::from_secs(5)).timing().is_ok());
        assert!(
            builder(Duration::from_millis(1500)).timing().is_err(),
            "ttl/3 = margin"
        );
        let margin = builder(Duration::from_secs(5)).expiry_margin(Duration::from_secs(2));
        assert!(margin.timing().is_err());
        let ahead = builder(Duration::from_secs(5)).renew_ahead(Duration::from_secs(5));
        assert!(ahead.timing().is_err());
        assert_eq!(
            retry_pause(Duration::from_secs(10)),
            Duration::from_millis(500)
        );
        assert_eq!(
            retry_pause(Duration::from_secs(300)),
            Duration::from_secs(1)
        );
    }
}
