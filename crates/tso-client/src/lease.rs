//! Stamping leases and the safe frontier (SEMANTICS §14): what a call returns, [`LeaseGrant`]
//! and [`Frontier`], and the checks on both sides of the wire: a request is validated before
//! any RPC ([`AcquireRequest::new`]), a reply before any caller sees it.
//!
//! Invariant: a `LeaseGrant` only exists with a non-zero epoch, a `ttl` of at least 1 ms and the
//! instant its call started, so [`LeaseGrant::local_expiry`] is always a conservative reading of
//! the server's expiry on the holder's own clock: the server computes its expiry from its clock
//! at some moment after the call started, never before.

use std::time::Duration;

use tokio::time::Instant;
use tso_core::{Epoch, PHYSICAL_MAX_MS};
use tso_proto::v1::{
    AcquireLeaseRequest, AcquireLeaseResponse, GetSafeFrontierResponse, RenewLeaseResponse,
};

use crate::grant::Granted;
use crate::{Error, Result};

pub use tso_proto::limits::LEASE_HOLDER_BYTES_MAX;

/// One grant of a stamping lease, from `AcquireLease` or `RenewLease`: until the lease runs
/// out, its holder may stamp events with physical parts up to
/// [`ts_upper_bound_ms`](LeaseGrant::ts_upper_bound_ms); after, it must stall, never skew.
///
/// "Until the lease runs out" is measured on the holder's clock from
/// [`local_expiry`](LeaseGrant::local_expiry): the instant the call that brought the grant
/// started, plus the TTL. [`expires_at_ms`](LeaseGrant::expires_at_ms) is on the leader's wall
/// clock, which the holder's clock does not share: it is for display and logs only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseGrant {
    lease_id: u64,
    ts_upper_bound_ms: u64,
    expires_at_ms: u64,
    epoch: Epoch,
    ttl: Duration,
    requested_at: Instant,
}

impl LeaseGrant {
    /// The lease's id: what `renew_lease` and `release_lease` take.
    pub fn lease_id(&self) -> u64 {
        self.lease_id
    }

    /// The highest physical millisecond the holder may stamp with (inclusive).
    pub fn ts_upper_bound_ms(&self) -> u64 {
        self.ts_upper_bound_ms
    }

    /// When the lease runs out on the leader's wall clock, in ms since the Unix epoch. Not to
    /// be compared with the holder's clock: use [`LeaseGrant::local_expiry`].
    pub fn expires_at_ms(&self) -> u64 {
        self.expires_at_ms
    }

    /// The epoch of the leader that granted it.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The TTL the lease was acquired with (a renewal keeps it).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The instant the call that brought this grant started, before its first request was
    /// sent: the server granted at some moment after it.
    pub fn requested_at(&self) -> Instant {
        self.requested_at
    }

    /// `requested_at() + ttl()`: on the holder's clock, the lease has not run out before this
    /// instant (up to the clocks' rate difference and the leaders' clock offsets, which a
    /// holder covers with a margin: see [`LeaseKeeper`](crate::LeaseKeeper)).
    ///
    /// Conservative only when the lease's current expiry was set during this call. Acquiring
    /// again with the same holder and `holder_epoch` returns the live lease as it stands, whose
    /// expiry an earlier call may have set: renew it before stamping (the keeper does).
    pub fn local_expiry(&self) -> Instant {
        self.requested_at + self.ttl
    }
}

impl Granted for LeaseGrant {
    fn epoch(&self) -> Epoch {
        self.epoch
    }
}

/// The safe frontier (`GetSafeFrontier`) as the leader of `epoch` computed it: the smallest of
/// its durable high-water and the bounds of every unexpired lease, in physical milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frontier {
    physical_ms: u64,
    epoch: Epoch,
}

impl Frontier {
    /// The frontier, in physical milliseconds.
    pub fn physical_ms(&self) -> u64 {
        self.physical_ms
    }

    /// The epoch of the leader that answered (never zero: a zero epoch means "not leading").
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
}

impl Granted for Frontier {
    fn epoch(&self) -> Epoch {
        self.epoch
    }
}

/// A `ReleaseLease` answered by a leader. The reply names no epoch, so it caches the node as
/// leader only while no epoch is known.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Released;

impl Granted for Released {
    fn epoch(&self) -> Epoch {
        Epoch::ZERO
    }
}

/// A validated `AcquireLease`: a holder of 1 to `LEASE_HOLDER_BYTES_MAX` bytes and a TTL of a
/// whole, non-zero number of milliseconds.
#[derive(Clone, Debug)]
pub(crate) struct AcquireRequest {
    holder: Vec<u8>,
    holder_epoch: u64,
    ttl_ms: u64,
}

impl AcquireRequest {
    pub(crate) fn new(holder: &[u8], holder_epoch: u64, ttl: Duration) -> Result<Self> {
        if holder.is_empty() || holder.len() > LEASE_HOLDER_BYTES_MAX {
            return Err(Error::InvalidLeaseHolder {
                holder_bytes: holder.len(),
            });
        }
        Ok(Self {
            holder: holder.to_vec(),
            holder_epoch,
            ttl_ms: ttl_ms(ttl)?,
        })
    }

    pub(crate) fn holder_epoch(&self) -> u64 {
        self.holder_epoch
    }

    pub(crate) fn to_wire(&self) -> AcquireLeaseRequest {
        AcquireLeaseRequest {
            holder: self.holder.clone(),
            holder_epoch: self.holder_epoch,
            ttl_ms: self.ttl_ms,
        }
    }

    /// Checks an `AcquireLease` reply; `requested_at` is when the call started.
    pub(crate) fn grant(
        &self,
        reply: &AcquireLeaseResponse,
        requested_at: Instant,
    ) -> Result<LeaseGrant, String> {
        let wire = reply.epoch.as_ref().ok_or("the reply has no epoch")?;
        let epoch = grant_epoch(wire.hi, wire.lo)?;
        grant(
            reply.lease_id,
            reply.ts_upper_bound,
            reply.expires_at_ms,
            epoch,
            Duration::from_millis(self.ttl_ms),
            requested_at,
        )
    }
}

/// `ttl` in whole milliseconds: refused when below 1 ms, not whole, or beyond `u64::MAX` ms.
/// A fractional millisecond is refused rather than rounded, so the TTL the holder counts on its
/// clock is exactly the one the server counts.
pub(crate) fn ttl_ms(ttl: Duration) -> Result<u64> {
    let invalid = || Error::InvalidLeaseTtl { ttl };
    let ms = u64::try_from(ttl.as_millis()).map_err(|_| invalid())?;
    if ms == 0 || Duration::from_millis(ms) != ttl {
        return Err(invalid());
    }
    Ok(ms)
}

/// Checks a `RenewLease` reply of lease `lease_id`, acquired with `ttl`.
pub(crate) fn renewed(
    lease_id: u64,
    ttl: Duration,
    reply: &RenewLeaseResponse,
    requested_at: Instant,
) -> Result<LeaseGrant, String> {
    let wire = reply.epoch.as_ref().ok_or("the reply has no epoch")?;
    let epoch = grant_epoch(wire.hi, wire.lo)?;
    grant(
        lease_id,
        reply.ts_upper_bound,
        reply.expires_at_ms,
        epoch,
        ttl,
        requested_at,
    )
}

/// The frontier of a `GetSafeFrontier` reply, or `None` when the node does not lead (a zero
/// epoch: a follower, or a leader not serving yet, answers 0 and no epoch).
pub(crate) fn frontier(reply: &GetSafeFrontierResponse) -> Result<Option<Frontier>, String> {
    let epoch = Epoch::from_parts(reply.epoch_hi, reply.epoch_lo);
    if epoch == Epoch::ZERO {
        return Ok(None);
    }
    if reply.frontier_physical_ms > PHYSICAL_MAX_MS {
        return Err(format!(
            "frontier {} ms is beyond the largest physical part, {PHYSICAL_MAX_MS}",
            reply.frontier_physical_ms
        ));
    }
    Ok(Some(Frontier {
        physical_ms: reply.frontier_physical_ms,
        epoch,
    }))
}

fn grant_epoch(hi: u64, lo: u64) -> Result<Epoch, String> {
    let epoch = Epoch::from_parts(hi, lo);
    if epoch == Epoch::ZERO {
        return Err("the reply's epoch is zero".into());
    }
    Ok(epoch)
}

fn grant(
    lease_id: u64,
    ts_upper_bound_ms: u64,
    expires_at_ms: u64,
    epoch: Epoch,
    ttl: Duration,
    requested_at: Instant,
) -> Result<LeaseGrant, String> {
    if ts_upper_bound_ms == 0 || ts_upper_bound_ms > PHYSICAL_MAX_MS {
        return Err(format!(
            "bound {ts_upper_bound_ms} ms is outside 1..={PHYSICAL_MAX_MS}"
        ));
    }
    if expires_at_ms == 0 {
        return Err("the reply has no expiry".into());
    }
    Ok(LeaseGrant {
        lease_id,
        ts_upper_bound_ms,
        expires_at_ms,
        epoch,
        ttl,
        requested_at,
    })
}

/// A grant as a test scripts it.
#[cfg(test)]
pub(crate) fn test_grant(lease_id: u64, bound_ms: u64, ttl: Duration, at: Instant) -> LeaseGrant {
    grant(lease_id, bound_ms, bound_ms, Epoch::new(1), ttl, at).expect("a valid test grant")
}

#[cfg(test)]
mod tests {
    use tso_proto::v1::EpochWire;

    use super::*;

    fn wire(lo: u64) -> Option<EpochWire> {
        Some(EpochWire { hi: 0, lo })
    }

    #[test]
    fn requests_are_validated_at_the_bounds() {
        let second = Duration::from_secs(1);
        let longest = vec![b'h'; LEASE_HOLDER_BYTES_MAX];
        assert!(AcquireRequest::new(&longest, 0, second).is_ok());
        for holder in [vec![], vec![b'h'; LEASE_HOLDER_BYTES_MAX + 1]] {
            assert_eq!(
                AcquireRequest::new(&holder, 0, second).unwrap_err(),
                Error::InvalidLeaseHolder {
                    holder_bytes: holder.len()
                }
            );
        }
        assert_eq!(ttl_ms(Duration::from_millis(1)), Ok(1));
        assert_eq!(ttl_ms(Duration::from_secs(10)), Ok(10_000));
        for ttl in [
            Duration::ZERO,
            Duration::from_micros(999),
            Duration::from_micros(1500),
            Duration::MAX,
        ] {
            assert_eq!(ttl_ms(ttl), Err(Error::InvalidLeaseTtl { ttl }), "{ttl:?}");
        }
        let wire = AcquireRequest::new(b"w", 7, second).unwrap().to_wire();
        assert_eq!(
            (wire.holder, wire.holder_epoch, wire.ttl_ms),
            (b"w".to_vec(), 7, 1000)
        );
    }

    #[test]
    fn replies_are_checked_and_the_local_expiry_runs_from_the_call_start() {
        let request = AcquireRequest::new(b"w", 1, Duration::from_secs(5)).unwrap();
        let started = Instant::now();
        let reply = AcquireLeaseResponse {
            lease_id: 9,
            ts_upper_bound: 1_000_900,
            expires_at_ms: 1_000_000,
            epoch: wire(3),
        };
        let grant = request.grant(&reply, started).unwrap();
        assert_eq!(grant.lease_id(), 9);
        assert_eq!(grant.ts_upper_bound_ms(), 1_000_900);
        assert_eq!(grant.expires_at_ms(), 1_000_000);
        assert_eq!(grant.epoch(), Epoch::new(3));
        assert_eq!(grant.local_expiry(), started + Duration::from_secs(5));
        for bad in [
            AcquireLeaseResponse {
                epoch: None,
                ..reply
            },
            AcquireLeaseResponse {
                epoch: wire(0),
                ..reply
            },
            AcquireLeaseResponse {
                ts_upper_bound: 0,
                ..reply
            },
            AcquireLeaseResponse {
                ts_upper_bound: PHYSICAL_MAX_MS + 1,
                ..reply
            },
            AcquireLeaseResponse {
                expires_at_ms: 0,
                ..reply
            },
        ] {
            assert!(request.grant(&bad, started).is_err(), "{bad:?} accepted");
        }
        let renewal = RenewLeaseResponse {
            ts_upper_bound: 5,
            expires_at_ms: 6,
            epoch: wire(4),
        };
        let renewed = renewed(9, Duration::from_secs(7), &renewal, started).unwrap();
        assert_eq!(
            (renewed.lease_id(), renewed.ttl()),
            (9, Duration::from_secs(7))
        );
        let no_epoch = RenewLeaseResponse {
            epoch: None,
            ..renewal
        };
        assert!(super::renewed(9, Duration::from_secs(7), &no_epoch, started).is_err());
    }

    #[test]
    fn a_zero_epoch_frontier_means_not_leading() {
        let reply = |ms, lo| GetSafeFrontierResponse {
            frontier_physical_ms: ms,
            epoch_hi: 0,
            epoch_lo: lo,
        };
        assert_eq!(frontier(&reply(0, 0)), Ok(None));
        let f = frontier(&reply(42, 2)).unwrap().unwrap();
        assert_eq!((f.physical_ms(), f.epoch()), (42, Epoch::new(2)));
        assert!(frontier(&reply(PHYSICAL_MAX_MS + 1, 2)).is_err());
    }
}
