//! Stamping leases and the safe frontier (SEMANTICS §14).
//!
//! A holder that stamps events itself acquires a lease: a bound `B` on the physical part it may
//! stamp with, valid until an expiry by the leader's clock. `B` comes from the same durable
//! high-water as window extensions (`max(H + 1, now + ttl)`, persisted before the answer), so it
//! is above every timestamp granted before it and no later leader grants below it. The safe
//! frontier is `min(H, the bounds of every unexpired lease, active or superseded)`.
//!
//! Each serving term owns one [`LeaseBook`] behind an async mutex: lease calls are rare, so
//! they are simply serialized. The book holds the lease set as loaded from the backend on the
//! term's first lease call (a linearizable read, expired leases dropped), and every change is
//! written whole through the backend, fenced by the term's epoch, before it is answered.
//!
//! Invariants:
//! - a lease is answered only after both its bound (the high-water) and the set holding it are
//!   durable; a crash in between only burns timestamps;
//! - lease ids come from a durable counter in the set: never reused, across failovers too;
//! - a failed write changes nothing the book answers from (only the id counter stays advanced).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tso_core::{Epoch, PHYSICAL_MAX_MS};

use crate::consensus::ConsensusError;
use crate::error::ServeError;
use crate::oracle::{Refusal, Shared};

/// Default shortest and longest TTL a holder may ask for (SEMANTICS §14; `--lease-ttl-min`,
/// `--lease-ttl-max`).
pub const LEASE_TTL_MIN_DEFAULT: Duration = Duration::from_secs(5);
pub const LEASE_TTL_MAX_DEFAULT: Duration = Duration::from_secs(300);
/// A holder is 1 to 128 opaque bytes (SEMANTICS §14).
pub const LEASE_HOLDER_LEN_MAX: usize = 128;
/// Leases the set keeps (live, superseded, or expired but not yet forgotten); an acquire past
/// it is refused with `RESOURCE_EXHAUSTED`. 10 000 records of at most ~170 bytes keep every
/// write of the set under 2 MB.
pub const LEASES_MAX: usize = 10_000;

/// One lease of the set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseRecord {
    pub holder: Vec<u8>,
    pub holder_epoch: u64,
    pub ttl_ms: u64,
    pub bound_ms: u64,
    pub expires_at_ms: u64,
    pub superseded: bool,
}

impl LeaseRecord {
    fn live(&self, now_ms: u64) -> bool {
        now_ms < self.expires_at_ms
    }
}

/// The durable lease set: every lease by id, and the next id to hand out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseSet {
    pub next_id: u64,
    pub leases: BTreeMap<u64, LeaseRecord>,
}

impl Default for LeaseSet {
    fn default() -> Self {
        LeaseSet {
            next_id: 1,
            leases: BTreeMap::new(),
        }
    }
}

const SET_VERSION: u8 = 1;

impl LeaseSet {
    /// Version, next id, count, then each lease: id, holder length and bytes, holder epoch,
    /// TTL, bound, expiry, superseded flag (integers little-endian). The backend adds its own
    /// framing and checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(13 + self.leases.len() * 64);
        buf.push(SET_VERSION);
        buf.extend_from_slice(&self.next_id.to_le_bytes());
        buf.extend_from_slice(&(self.leases.len() as u32).to_le_bytes());
        for (id, lease) in &self.leases {
            buf.extend_from_slice(&id.to_le_bytes());
            buf.push(lease.holder.len() as u8);
            buf.extend_from_slice(&lease.holder);
            for value in [
                lease.holder_epoch,
                lease.ttl_ms,
                lease.bound_ms,
                lease.expires_at_ms,
            ] {
                buf.extend_from_slice(&value.to_le_bytes());
            }
            buf.push(lease.superseded as u8);
        }
        buf
    }

    /// Decodes [`Self::encode`]'s output; an empty record is the empty set.
    pub fn decode(bytes: &[u8]) -> Result<LeaseSet, String> {
        if bytes.is_empty() {
            return Ok(LeaseSet::default());
        }
        let mut reader = Reader(bytes);
        let version = reader.u8()?;
        if version != SET_VERSION {
            return Err(format!(
                "lease set version {version}, this build reads {SET_VERSION}"
            ));
        }
        let next_id = reader.u64()?;
        let count = reader.u32()? as usize;
        let mut leases = BTreeMap::new();
        for _ in 0..count {
            let id = reader.u64()?;
            let len = reader.u8()? as usize;
            let holder = reader.take(len)?.to_vec();
            let lease = LeaseRecord {
                holder,
                holder_epoch: reader.u64()?,
                ttl_ms: reader.u64()?,
                bound_ms: reader.u64()?,
                expires_at_ms: reader.u64()?,
                superseded: reader.u8()? != 0,
            };
            if id >= next_id || leases.insert(id, lease).is_some() {
                return Err(format!("lease id {id} is repeated or not below {next_id}"));
            }
        }
        if !reader.0.is_empty() {
            return Err(format!("{} bytes after the last lease", reader.0.len()));
        }
        Ok(LeaseSet { next_id, leases })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("the lease set ends early".into());
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
}

/// A term's lease set, loaded on its first lease call.
#[derive(Default)]
pub(crate) struct LeaseBook {
    set: Option<LeaseSet>,
}

/// What an acquire or renew answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeaseGrant {
    pub lease_id: u64,
    pub bound_ms: u64,
    pub expires_at_ms: u64,
    pub epoch: Epoch,
}

/// Checks an acquire's holder and TTL against SEMANTICS §14 and the configured bounds.
pub(crate) fn check_acquire(holder: &[u8], ttl_ms: u64, shared: &Shared) -> Result<(), String> {
    if holder.is_empty() || holder.len() > LEASE_HOLDER_LEN_MAX {
        return Err(format!(
            "the holder is {} bytes: holders are 1 to {LEASE_HOLDER_LEN_MAX} bytes",
            holder.len()
        ));
    }
    let (min, max) = (shared.config.lease_ttl_min, shared.config.lease_ttl_max);
    let (min_ms, max_ms) = (min.as_millis() as u64, max.as_millis() as u64);
    if ttl_ms < min_ms || ttl_ms > max_ms {
        return Err(format!(
            "ttl_ms {ttl_ms} is out of range: ask for {min_ms} to {max_ms}"
        ));
    }
    Ok(())
}

impl Shared {
    /// Acquires (or returns, or supersedes) the lease of `holder` (SEMANTICS §14).
    pub async fn acquire_lease(
        self: &Arc<Self>,
        holder: Vec<u8>,
        holder_epoch: u64,
        ttl_ms: u64,
    ) -> Result<LeaseGrant, Refusal> {
        let (book, epoch) = self.lease_book()?;
        let mut book = book.lock().await;
        let mut set = self.loaded_leases(&mut book).await?;
        let now_ms = self.clock.now_ms();
        forget_long_expired(&mut set, now_ms, self.config.lease_ttl_max);
        let mine = set.leases.iter().filter(|(_, l)| l.holder == holder);
        let highest = mine.clone().map(|(_, l)| l.holder_epoch).max();
        if let Some(highest) = highest.filter(|h| holder_epoch < *h) {
            return Err(Refusal::FailedPrecondition(format!(
                "holder epoch {holder_epoch} is below {highest}, already used by this holder"
            )));
        }
        let active = mine
            .filter(|(_, l)| !l.superseded && l.live(now_ms))
            .map(|(id, l)| (*id, l.clone()))
            .next();
        if let Some((id, lease)) = &active
            && lease.holder_epoch == holder_epoch
        {
            book.set = Some(set);
            // The answer has no TTL field: a lease with another TTL than asked would leave the
            // holder counting on time the server does not hold (SEMANTICS §14).
            if lease.ttl_ms != ttl_ms {
                return Err(Refusal::FailedPrecondition(format!(
                    "holder epoch {holder_epoch} already holds live lease {id} with a TTL of {} \
                     ms, not {ttl_ms} ms: ask with the same TTL, or supersede it with a higher \
                     holder epoch",
                    lease.ttl_ms
                )));
            }
            return Ok(LeaseGrant {
                lease_id: *id,
                bound_ms: lease.bound_ms,
                expires_at_ms: lease.expires_at_ms,
                epoch,
            });
        }
        if set.leases.len() >= LEASES_MAX {
            book.set = Some(set);
            return Err(Refusal::ResourceExhausted(format!(
                "{LEASES_MAX} leases are held; release some, or wait for them to expire"
            )));
        }
        let bound_ms = self.raise_for_lease(epoch, now_ms, ttl_ms).await;
        let bound_ms = match bound_ms {
            Ok(bound_ms) => bound_ms,
            Err(refusal) => {
                book.set = Some(set);
                return Err(refusal);
            }
        };
        let mut next = set.clone();
        if let Some((id, _)) = active {
            next.leases.get_mut(&id).expect("active lease").superseded = true;
        }
        let lease_id = next.next_id;
        next.next_id += 1;
        let expires_at_ms = now_ms + ttl_ms;
        next.leases.insert(
            lease_id,
            LeaseRecord {
                holder,
                holder_epoch,
                ttl_ms,
                bound_ms,
                expires_at_ms,
                superseded: false,
            },
        );
        self.write_leases(&mut book, set, next, epoch).await?;
        Ok(LeaseGrant {
            lease_id,
            bound_ms,
            expires_at_ms,
            epoch,
        })
    }

    /// Renews lease `lease_id` with its original TTL: a fresh bound and expiry.
    pub async fn renew_lease(self: &Arc<Self>, lease_id: u64) -> Result<LeaseGrant, Refusal> {
        let (book, epoch) = self.lease_book()?;
        let mut book = book.lock().await;
        let set = self.loaded_leases(&mut book).await?;
        let now_ms = self.clock.now_ms();
        let Some(lease) = set.leases.get(&lease_id).cloned() else {
            book.set = Some(set);
            return Err(Refusal::NotFound(format!(
                "lease {lease_id} is unknown (never acquired, released, or expired long ago)"
            )));
        };
        let refused = if lease.superseded {
            Some("was superseded by a higher holder epoch")
        } else if !lease.live(now_ms) {
            Some("has expired")
        } else {
            None
        };
        if let Some(why) = refused {
            book.set = Some(set);
            return Err(Refusal::FailedPrecondition(format!(
                "lease {lease_id} {why}: acquire a new one"
            )));
        }
        let bound_ms = match self.raise_for_lease(epoch, now_ms, lease.ttl_ms).await {
            Ok(bound_ms) => bound_ms.max(lease.bound_ms),
            Err(refusal) => {
                book.set = Some(set);
                return Err(refusal);
            }
        };
        let expires_at_ms = (now_ms + lease.ttl_ms).max(lease.expires_at_ms);
        let mut next = set.clone();
        let renewed = next.leases.get_mut(&lease_id).expect("known lease");
        renewed.bound_ms = bound_ms;
        renewed.expires_at_ms = expires_at_ms;
        self.write_leases(&mut book, set, next, epoch).await?;
        Ok(LeaseGrant {
            lease_id,
            bound_ms,
            expires_at_ms,
            epoch,
        })
    }

    /// Releases lease `lease_id` (idempotent): it stops binding the frontier at once.
    pub async fn release_lease(self: &Arc<Self>, lease_id: u64) -> Result<(), Refusal> {
        let (book, epoch) = self.lease_book()?;
        let mut book = book.lock().await;
        let set = self.loaded_leases(&mut book).await?;
        if !set.leases.contains_key(&lease_id) {
            book.set = Some(set);
            return Ok(());
        }
        let mut next = set.clone();
        next.leases.remove(&lease_id);
        self.write_leases(&mut book, set, next, epoch).await
    }

    /// The safe frontier: `(0, zero epoch)` unless serving under a valid lease; else
    /// `min(H, the bounds of every unexpired lease)` and the epoch.
    pub async fn safe_frontier(self: &Arc<Self>) -> Result<(u64, Epoch), Refusal> {
        let Ok((book, epoch)) = self.lease_book() else {
            return Ok((0, Epoch::ZERO));
        };
        let mut book = book.lock().await;
        let set = match self.loaded_leases(&mut book).await {
            Ok(set) => set,
            Err(Refusal::NotLeader(_)) => return Ok((0, Epoch::ZERO)),
            Err(refusal) => return Err(refusal),
        };
        let now_ms = self.clock.now_ms();
        let lowest_bound = set
            .leases
            .values()
            .filter(|l| l.live(now_ms))
            .map(|l| l.bound_ms)
            .min();
        book.set = Some(set);
        let Some(high_water_ms) = self.serving_high_water(epoch) else {
            return Ok((0, Epoch::ZERO));
        };
        let frontier = lowest_bound.map_or(high_water_ms, |b| b.min(high_water_ms));
        Ok((frontier, epoch))
    }

    /// The set of the book, loaded from the backend if this term has not yet.
    async fn loaded_leases(&self, book: &mut LeaseBook) -> Result<LeaseSet, Refusal> {
        if let Some(set) = book.set.take() {
            return Ok(set);
        }
        if self.config.unsafe_lease_skip_load {
            return Ok(LeaseSet::default());
        }
        let record = self.backend.load_leases().await.map_err(|e| match e {
            ConsensusError::NotLeader { .. } | ConsensusError::Fenced { .. } => {
                Refusal::NotLeader(self.hint())
            }
            ConsensusError::Transient(msg) => Refusal::Unavailable(format!(
                "reading the lease set failed transiently: {msg}; retry"
            )),
            ConsensusError::Permanent(msg) => {
                Refusal::Internal(format!("reading the lease set failed: {msg}"))
            }
        })?;
        let mut set = LeaseSet::decode(&record).map_err(|problem| {
            let reason = format!("the stored lease set is damaged: {problem}");
            self.poison(ServeError::Invariant(reason.clone()));
            Refusal::Internal(reason)
        })?;
        let now_ms = self.clock.now_ms();
        set.leases.retain(|_, lease| lease.live(now_ms));
        Ok(set)
    }

    /// Writes `next` through the backend; on success the book holds it, on failure the book
    /// keeps `current` (with the id counter of `next`, so that no id is handed out twice).
    async fn write_leases(
        &self,
        book: &mut LeaseBook,
        current: LeaseSet,
        next: LeaseSet,
        epoch: Epoch,
    ) -> Result<(), Refusal> {
        match self.backend.persist_leases(next.encode(), epoch).await {
            Ok(()) => {
                book.set = Some(next);
                Ok(())
            }
            Err(err) => {
                book.set = Some(LeaseSet {
                    next_id: next.next_id,
                    ..current
                });
                Err(self.lease_write_refusal(err, "writing the lease set"))
            }
        }
    }

    /// Persists `max(H + 1, now + ttl)` as the high-water and raises the term's window to it;
    /// returns the durable value, the lease's bound. Not `max(H + 1, now) + ttl`: `H` already
    /// holds the previous bound, so that would add a whole TTL on every renewal however little
    /// time passed, and walk the high-water (and every later failover) away from the clock.
    /// This bound still covers the TTL (`>= now + ttl`) and every timestamp granted so far
    /// (`> H`).
    async fn raise_for_lease(
        &self,
        epoch: Epoch,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<u64, Refusal> {
        let high_water_ms = self
            .serving_high_water(epoch)
            .ok_or_else(|| Refusal::NotLeader(self.hint()))?;
        let target_ms = (high_water_ms + 1).max(now_ms.saturating_add(ttl_ms));
        if target_ms > PHYSICAL_MAX_MS {
            return Err(Refusal::OutOfRange(format!(
                "a bound of {target_ms} ms would pass the 46-bit physical field"
            )));
        }
        let durable_ms = self
            .backend
            .persist_high_water(target_ms, epoch)
            .await
            .map_err(|e| self.lease_write_refusal(e, "persisting the lease's bound"))?;
        if durable_ms < target_ms || durable_ms > PHYSICAL_MAX_MS {
            let reason =
                format!("the backend made {durable_ms} ms durable when asked for {target_ms} ms");
            self.poison(ServeError::Invariant(reason.clone()));
            return Err(Refusal::Internal(reason));
        }
        self.raise_serving_high_water(epoch, durable_ms);
        Ok(durable_ms)
    }

    fn lease_write_refusal(&self, err: ConsensusError, what: &str) -> Refusal {
        match err {
            ConsensusError::NotLeader { .. } | ConsensusError::Fenced { .. } => {
                Refusal::NotLeader(self.hint())
            }
            ConsensusError::Transient(msg) => {
                Refusal::Unavailable(format!("{what} failed transiently: {msg}; retry"))
            }
            ConsensusError::Permanent(msg) => {
                let reason = format!("{what} failed: {msg}");
                self.poison(ServeError::Consensus(ConsensusError::Permanent(msg)));
                Refusal::Internal(reason)
            }
        }
    }
}

/// Drops leases that expired longer ago than the longest TTL: a renew of them is then
/// "unknown" rather than "expired", and the set stays bounded by what is recent.
fn forget_long_expired(set: &mut LeaseSet, now_ms: u64, ttl_max: Duration) {
    let keep_ms = ttl_max.as_millis() as u64;
    set.leases
        .retain(|_, lease| lease.expires_at_ms.saturating_add(keep_ms) > now_ms);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &[u8], bound_ms: u64, superseded: bool) -> LeaseRecord {
        LeaseRecord {
            holder: holder.to_vec(),
            holder_epoch: 3,
            ttl_ms: 5_000,
            bound_ms,
            expires_at_ms: bound_ms + 1,
            superseded,
        }
    }

    #[test]
    fn the_set_round_trips_and_refuses_damage() {
        let mut set = LeaseSet {
            next_id: 9,
            leases: BTreeMap::new(),
        };
        set.leases
            .insert(2, lease(b"writer-a", 1_700_000_000_000, false));
        set.leases
            .insert(7, lease(&[0xff; 128], u64::MAX - 1, true));
        let bytes = set.encode();
        assert_eq!(LeaseSet::decode(&bytes), Ok(set.clone()));
        assert_eq!(LeaseSet::decode(&[]), Ok(LeaseSet::default()));
        for len in 1..bytes.len() {
            assert!(
                LeaseSet::decode(&bytes[..len]).is_err(),
                "truncated to {len}"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(LeaseSet::decode(&long).is_err());
        let mut stale_counter = set.clone();
        stale_counter.next_id = 7;
        assert!(LeaseSet::decode(&stale_counter.encode()).is_err());
    }

    #[test]
    fn long_expired_leases_are_forgotten_recent_ones_kept() {
        let mut set = LeaseSet::default();
        set.leases.insert(1, lease(b"a", 1_000, false)); // expired at 1 001
        set.leases.insert(2, lease(b"b", 100_000, false)); // expires at 100 001
        forget_long_expired(&mut set, 1_001 + 60_000, Duration::from_secs(60));
        assert_eq!(set.leases.keys().copied().collect::<Vec<_>>(), vec![2]);
    }
}
