//! Stamping leases and the safe frontier (SEMANTICS §14).
//!
//! A holder that stamps events itself acquires a lease: a bound `B` on the physical part it may
//! stamp with, for a TTL. `B` comes from the same durable high-water as window extensions
//! (`max(H + 1, now + ttl)`, persisted before the answer), so it is above every timestamp granted
//! before it and no later leader grants below it. The safe frontier is `min(H, the bounds of
//! every live lease, active or superseded)`.
//!
//! Liveness is monotonic time, never the wall clock (which may step either way): the leader that
//! grants or renews a lease counts its TTL from the moment the write was durable (the holder
//! counts from before it sent the call, so its count ends first); a leader that loads the set
//! counts a full TTL from the load for every lease in it. The stored `expires_at_ms` is the
//! granting leader's wall clock plus the TTL, for display only.
//!
//! Each serving term owns one [`LeaseBook`] behind an async mutex: lease calls are rare, so
//! they are simply serialized. The book holds the lease set as loaded from the backend on the
//! term's first lease call (a linearizable read) and the monotonic deadline of each lease, and
//! every change is written whole through the backend, fenced by the term's epoch, before it is
//! answered.
//!
//! Invariants:
//! - a lease is answered only after both its bound (the high-water) and the set holding it are
//!   durable; a crash in between only burns timestamps;
//! - lease ids come from a durable counter in the set: never reused, across failovers too;
//! - a failed write leaves nothing stale: the book reads the set back on its next call (the
//!   write may yet commit), keeps its deadlines, and never hands out the failed write's id again.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tso_core::{Epoch, PHYSICAL_MAX_MS};
use tso_proto::limits::LEASE_HOLDER_BYTES_MAX;

use crate::backend::OracleCommand;
use crate::error::ServeError;
use crate::refusal::{Call, Refusal};
use crate::term::TermIo;

/// Default shortest and longest TTL a holder may ask for (SEMANTICS §14; `--lease-ttl-min`,
/// `--lease-ttl-max`).
pub const LEASE_TTL_MIN_DEFAULT: Duration = Duration::from_secs(5);
pub const LEASE_TTL_MAX_DEFAULT: Duration = Duration::from_secs(300);
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

/// A term's lease set, loaded on its first lease call, and when each of its leases stops being
/// live by monotonic time.
#[derive(Default)]
pub(crate) struct LeaseBook {
    /// `None` until loaded, and again after a write that may or may not have committed: the next
    /// call reads the set back rather than answer from a copy that may be stale.
    set: Option<LeaseSet>,
    /// The end of each lease's life in [`Clock::monotonic_ms`](crate::clock::Clock): for a lease
    /// this term granted or renewed, the moment the write was durable plus its TTL; for one it
    /// loaded, the load plus its TTL (the holder's own count ended no later). Kept across
    /// reloads of the set, so a lease this term judged expired stays expired, and no wall-clock
    /// step moves any of them.
    deadlines: HashMap<u64, u64>,
    /// Ids handed to writes that failed are not handed out again, even if the set is reloaded.
    next_id_floor: u64,
}

/// One reading of both clocks.
#[derive(Debug, Clone, Copy)]
struct Now {
    wall_ms: u64,
    monotonic_ms: u64,
}

impl LeaseBook {
    /// Whether lease `id` is live. With `wall_expiry` (a positive control only), by its stored
    /// wall-clock expiry, as before SEMANTICS §14 said otherwise.
    fn live(&self, id: u64, lease: &LeaseRecord, now: Now, wall_expiry: bool) -> bool {
        if wall_expiry {
            return now.wall_ms < lease.expires_at_ms;
        }
        // Every lease of a loaded set has a deadline; one without would be live (the safe side).
        self.deadlines
            .get(&id)
            .is_none_or(|deadline| now.monotonic_ms < *deadline)
    }

    /// Drops leases that expired longer ago than the longest TTL: a renew of them is then
    /// "unknown" rather than "expired", and the set stays bounded by what is recent.
    fn forget_long_expired(&self, set: &mut LeaseSet, now: Now, ttl_max: Duration, wall: bool) {
        let keep_ms = ttl_max.as_millis() as u64;
        let long_ago = Now {
            wall_ms: now.wall_ms.saturating_sub(keep_ms),
            monotonic_ms: now.monotonic_ms.saturating_sub(keep_ms),
        };
        set.leases
            .retain(|id, lease| self.live(*id, lease, long_ago, wall));
    }

    /// Exports how many leases of `set` are live and held, while the term still serves.
    fn export(&self, set: &LeaseSet, io: &TermIo) {
        if io.high_water_ms().is_none() {
            return;
        }
        let (now, wall) = (Now::read(io), io.limits.unsafe_lease_wall_expiry);
        let leases = set.leases.iter();
        let live = leases
            .filter(|(id, l)| self.live(**id, l, now, wall))
            .count();
        crate::metrics::stamping_leases(live, set.leases.len());
    }
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
pub(crate) fn check_acquire(
    holder: &[u8],
    ttl_ms: u64,
    (min, max): (Duration, Duration),
) -> Result<(), String> {
    if holder.is_empty() || holder.len() > LEASE_HOLDER_BYTES_MAX {
        return Err(format!(
            "the holder is {} bytes: holders are 1 to {LEASE_HOLDER_BYTES_MAX} bytes",
            holder.len()
        ));
    }
    let (min_ms, max_ms) = (min.as_millis() as u64, max.as_millis() as u64);
    if ttl_ms < min_ms || ttl_ms > max_ms {
        return Err(format!(
            "ttl_ms {ttl_ms} is out of range: ask for {min_ms} to {max_ms}"
        ));
    }
    Ok(())
}

impl LeaseBook {
    /// Acquires (or renews, or supersedes) the lease of `holder` (SEMANTICS §14).
    pub async fn acquire(
        &mut self,
        io: &TermIo,
        holder: Vec<u8>,
        holder_epoch: u64,
        ttl_ms: u64,
    ) -> Result<LeaseGrant, Refusal> {
        let mut set = self.loaded_leases(io).await?;
        let now = Now::read(io);
        let wall = io.limits.unsafe_lease_wall_expiry;
        self.forget_long_expired(&mut set, now, io.limits.lease_ttl_max, wall);
        let mine = set.leases.iter().filter(|(_, l)| l.holder == holder);
        let highest = mine.clone().map(|(_, l)| l.holder_epoch).max();
        if let Some(highest) = highest.filter(|h| holder_epoch < *h) {
            self.set = Some(set);
            return Err(Refusal::FailedPrecondition(format!(
                "holder epoch {holder_epoch} is below {highest}, already used by this holder"
            )));
        }
        let active = mine
            .filter(|(id, l)| !l.superseded && self.live(**id, l, now, wall))
            .map(|(id, l)| (*id, l.clone()))
            .next();
        if let Some((id, lease)) = &active
            && lease.holder_epoch == holder_epoch
        {
            // The answer has no TTL field: a lease with another TTL than asked would leave the
            // holder counting on time the server does not hold (SEMANTICS §14).
            if lease.ttl_ms != ttl_ms {
                self.set = Some(set);
                return Err(Refusal::FailedPrecondition(format!(
                    "holder epoch {holder_epoch} already holds live lease {id} with a TTL of {} \
                     ms, not {ttl_ms} ms: ask with the same TTL, or supersede it with a higher \
                     holder epoch",
                    lease.ttl_ms
                )));
            }
            // The same lease back, renewed: the holder counts its TTL from this call, so the
            // server's must not have started earlier (a retried acquire whose first answer was
            // lost would otherwise leave the holder stamping past the server's expiry).
            return self.renew_in(io, set, *id, now).await;
        }
        if set.leases.len() >= LEASES_MAX {
            self.set = Some(set);
            return Err(Refusal::ResourceExhausted(format!(
                "{LEASES_MAX} leases are held; release some, or wait for them to expire"
            )));
        }
        let bound_ms = match raise_for_lease(io, now.wall_ms, ttl_ms).await {
            Ok(bound_ms) => bound_ms,
            Err(refusal) => {
                self.set = Some(set);
                return Err(refusal);
            }
        };
        let mut next = set.clone();
        if let Some((id, _)) = active {
            next.leases.get_mut(&id).expect("active lease").superseded = true;
        }
        let lease_id = next.next_id;
        next.next_id += 1;
        let expires_at_ms = now.wall_ms + ttl_ms;
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
        self.write_leases(io, next, Some((lease_id, ttl_ms)))
            .await?;
        Ok(LeaseGrant {
            lease_id,
            bound_ms,
            expires_at_ms,
            epoch: io.epoch,
        })
    }

    /// Renews lease `lease_id` with its original TTL: a fresh bound and expiry.
    pub async fn renew(&mut self, io: &TermIo, lease_id: u64) -> Result<LeaseGrant, Refusal> {
        let set = self.loaded_leases(io).await?;
        let now = Now::read(io);
        let Some(lease) = set.leases.get(&lease_id) else {
            self.set = Some(set);
            return Err(Refusal::NotFound(format!(
                "lease {lease_id} is unknown (never acquired, released, or expired long ago)"
            )));
        };
        let refused = if lease.superseded {
            Some("was superseded by a higher holder epoch")
        } else if !self.live(lease_id, lease, now, io.limits.unsafe_lease_wall_expiry) {
            Some("has expired")
        } else {
            None
        };
        if let Some(why) = refused {
            self.set = Some(set);
            return Err(Refusal::FailedPrecondition(format!(
                "lease {lease_id} {why}: acquire a new one"
            )));
        }
        self.renew_in(io, set, lease_id, now).await
    }

    /// Gives live lease `lease_id` of `set` a fresh bound and expiry and writes it.
    async fn renew_in(
        &mut self,
        io: &TermIo,
        set: LeaseSet,
        lease_id: u64,
        now: Now,
    ) -> Result<LeaseGrant, Refusal> {
        let lease = set.leases.get(&lease_id).expect("a live lease").clone();
        let bound_ms = match raise_for_lease(io, now.wall_ms, lease.ttl_ms).await {
            Ok(bound_ms) => bound_ms.max(lease.bound_ms),
            Err(refusal) => {
                self.set = Some(set);
                return Err(refusal);
            }
        };
        let expires_at_ms = (now.wall_ms + lease.ttl_ms).max(lease.expires_at_ms);
        let mut next = set;
        let renewed = next.leases.get_mut(&lease_id).expect("known lease");
        renewed.bound_ms = bound_ms;
        renewed.expires_at_ms = expires_at_ms;
        self.write_leases(io, next, Some((lease_id, lease.ttl_ms)))
            .await?;
        Ok(LeaseGrant {
            lease_id,
            bound_ms,
            expires_at_ms,
            epoch: io.epoch,
        })
    }

    /// Releases lease `lease_id` (idempotent): it stops binding the frontier at once.
    pub async fn release(&mut self, io: &TermIo, lease_id: u64) -> Result<(), Refusal> {
        let mut next = self.loaded_leases(io).await?;
        if next.leases.remove(&lease_id).is_none() {
            self.set = Some(next);
            return Ok(());
        }
        self.write_leases(io, next, None).await?;
        self.deadlines.remove(&lease_id);
        Ok(())
    }

    /// The safe frontier: `(0, zero epoch)` unless the term still serves; else
    /// `min(H, the bounds of every live lease)` and the epoch.
    pub async fn safe_frontier(&mut self, io: &TermIo) -> Result<(u64, Epoch), Refusal> {
        let set = match self.loaded_leases(io).await {
            Ok(set) => set,
            Err(Refusal::NotLeader(_)) => return Ok((0, Epoch::ZERO)),
            Err(refusal) => return Err(refusal),
        };
        let now = Now::read(io);
        let wall = io.limits.unsafe_lease_wall_expiry;
        let lowest_bound = set
            .leases
            .iter()
            .filter(|(id, l)| self.live(**id, l, now, wall))
            .map(|(_, l)| l.bound_ms)
            .min();
        self.export(&set, io);
        self.set = Some(set);
        let Some(high_water_ms) = io.high_water_ms() else {
            return Ok((0, Epoch::ZERO));
        };
        let frontier = lowest_bound.map_or(high_water_ms, |b| b.min(high_water_ms));
        Ok((frontier, io.epoch))
    }

    /// The set of the book, loaded from the backend if this term has not yet (or a write since
    /// left it uncertain). A lease the book has no deadline for is live for its full TTL from
    /// now: whatever the stored wall-clock expiry says, its holder's count may not have ended.
    async fn loaded_leases(&mut self, io: &TermIo) -> Result<LeaseSet, Refusal> {
        if let Some(set) = self.set.take() {
            return Ok(set);
        }
        if io.limits.unsafe_lease_skip_load {
            return Ok(LeaseSet {
                next_id: self.next_id_floor.max(1),
                ..LeaseSet::default()
            });
        }
        let loaded = io.backend.load().await.map(|state| state.leases);
        let record = loaded.map_err(|e| io.refusal(e, Call::Read("reading the lease set")))?;
        let mut set = LeaseSet::decode(&record).map_err(|problem| {
            let reason = format!("the stored lease set is damaged: {problem}");
            io.poison(ServeError::Invariant(reason.clone()));
            Refusal::Internal(reason)
        })?;
        set.next_id = set.next_id.max(self.next_id_floor);
        let now = Now::read(io);
        if io.limits.unsafe_lease_wall_expiry {
            set.leases
                .retain(|_, lease| now.wall_ms < lease.expires_at_ms);
        }
        self.deadlines.retain(|id, _| set.leases.contains_key(id));
        for (id, lease) in &set.leases {
            self.deadlines
                .entry(*id)
                .or_insert(now.monotonic_ms.saturating_add(lease.ttl_ms));
        }
        self.export(&set, io);
        Ok(set)
    }

    /// Writes `next` through the backend, fenced by the term's epoch; on success the book holds
    /// it and `live` (a lease granted or renewed, and its TTL) gets its deadline, counted from
    /// now. On failure the book forgets its copy: the write may yet commit (a raft entry
    /// appended before a timeout), so the next call reads the set back. The id counter stays
    /// advanced.
    async fn write_leases(
        &mut self,
        io: &TermIo,
        next: LeaseSet,
        live: Option<(u64, u64)>,
    ) -> Result<(), Refusal> {
        self.next_id_floor = self.next_id_floor.max(next.next_id);
        self.set = None;
        let cmd = OracleCommand::replace_leases(next.encode(), io.epoch);
        io.backend
            .apply(cmd, io.epoch)
            .await
            .map_err(|err| io.refusal(err, Call::Write("writing the lease set")))?;
        self.set = Some(next);
        if let Some((id, ttl_ms)) = live {
            let deadline = io.clock.monotonic_ms().saturating_add(ttl_ms);
            let known = self.deadlines.entry(id).or_insert(deadline);
            *known = (*known).max(deadline);
        }
        if let Some(set) = &self.set {
            self.export(set, io);
        }
        Ok(())
    }
}

/// Persists `max(H + 1, now + ttl)` as the high-water and raises the term's window to it;
/// returns the durable value, the lease's bound. Not `max(H + 1, now) + ttl`: `H` already
/// holds the previous bound, so that would add a whole TTL on every renewal however little
/// time passed, and walk the high-water (and every later failover) away from the clock.
/// This bound still covers the TTL (`>= now + ttl`) and every timestamp granted so far
/// (`> H`).
async fn raise_for_lease(io: &TermIo, now_ms: u64, ttl_ms: u64) -> Result<u64, Refusal> {
    let high_water_ms = io
        .high_water_ms()
        .ok_or_else(|| Refusal::NotLeader(io.hint()))?;
    let target_ms = (high_water_ms + 1).max(now_ms.saturating_add(ttl_ms));
    if target_ms > PHYSICAL_MAX_MS {
        return Err(Refusal::OutOfRange(format!(
            "a bound of {target_ms} ms would pass the 46-bit physical field"
        )));
    }
    let durable_ms = if io.limits.unsafe_lease_bound_in_memory {
        target_ms
    } else {
        let cmd = OracleCommand::AdvanceHighWater {
            at_least_ms: target_ms,
        };
        let what = "persisting the lease's bound";
        io.backend
            .apply(cmd, io.epoch)
            .await
            .map_err(|e| io.refusal(e, Call::Write(what)))?
            .high_water_ms
    };
    if durable_ms < target_ms || durable_ms > PHYSICAL_MAX_MS {
        let reason =
            format!("the backend made {durable_ms} ms durable when asked for {target_ms} ms");
        io.poison(ServeError::Invariant(reason.clone()));
        return Err(Refusal::Internal(reason));
    }
    io.raise_high_water(durable_ms);
    Ok(durable_ms)
}

impl Now {
    fn read(io: &TermIo) -> Now {
        Now {
            wall_ms: io.clock.now_ms(),
            monotonic_ms: io.clock.monotonic_ms(),
        }
    }
}

/// For the status call: how many leases of the loaded set are live now.
impl LeaseBook {
    /// Leases of the loaded set whose life (by this term's monotonic deadlines) has not ended;
    /// `None` while the set is not loaded.
    pub(crate) fn live_count(&self, monotonic_now_ms: u64) -> Option<usize> {
        let set = self.set.as_ref()?;
        Some(
            set.leases
                .keys()
                .filter(|id| {
                    self.deadlines
                        .get(id)
                        .is_some_and(|&end| end > monotonic_now_ms)
                })
                .count(),
        )
    }
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
        set.leases.insert(
            7,
            lease(&[0xff; LEASE_HOLDER_BYTES_MAX], u64::MAX - 1, true),
        );
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
    fn liveness_and_forgetting_follow_monotonic_time_only() {
        let mut set = LeaseSet::default();
        set.leases.insert(1, lease(b"a", 1_000, false));
        set.leases.insert(2, lease(b"b", 100_000, false));
        set.leases.insert(3, lease(b"c", 100_000, false));
        let mut book = LeaseBook::default();
        book.deadlines.insert(1, 10_000);
        book.deadlines.insert(2, 70_000);
        let at = |monotonic_ms, wall_ms| Now {
            wall_ms,
            monotonic_ms,
        };
        // Wall readings far on either side change nothing.
        for wall_ms in [0, u64::MAX / 2] {
            assert!(book.live(1, &set.leases[&1], at(9_999, wall_ms), false));
            assert!(!book.live(1, &set.leases[&1], at(10_000, wall_ms), false));
            assert!(
                book.live(3, &set.leases[&3], at(10_000, wall_ms), false),
                "no deadline"
            );
        }
        // The control judges by the stored wall expiry.
        assert!(!book.live(3, &set.leases[&3], at(0, 100_001), true));
        // Forgotten once expired longer ago than the longest TTL.
        book.forget_long_expired(&mut set, at(69_999, 0), Duration::from_secs(60), false);
        assert_eq!(
            set.leases.keys().copied().collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        book.forget_long_expired(&mut set, at(70_000, 0), Duration::from_secs(60), false);
        assert_eq!(set.leases.keys().copied().collect::<Vec<_>>(), vec![2, 3]);
    }
}
