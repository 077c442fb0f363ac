//! Failover fence arithmetic (SEMANTICS §5). A new leader must start strictly above the old
//! leader's durable high-water: the old one may have granted `(prior, 262143)`, hence `+ 1`.

use crate::{Error, PHYSICAL_MAX_MS, Window};

/// The first millisecond a new leader may grant in: above the prior high-water, and not behind
/// its own clock.
pub fn fence_floor_ms(prior_high_water_ms: u64, now_ms: u64) -> u64 {
    (prior_high_water_ms + 1).max(now_ms)
}

/// A planned fence: the floor the new term starts at and the high-water it must persist first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    floor_ms: u64,
    target_ms: u64,
}

impl Fence {
    /// Plans the fence from the loaded prior high-water.
    pub fn plan(
        prior_high_water_ms: u64,
        now_ms: u64,
        failover_advance_ms: u64,
    ) -> Result<Fence, Error> {
        let floor_ms = fence_floor_ms(prior_high_water_ms, now_ms);
        let target_ms = floor_ms
            .saturating_add(failover_advance_ms)
            .min(PHYSICAL_MAX_MS);
        if floor_ms > PHYSICAL_MAX_MS {
            return Err(Error::PhysicalOutOfRange {
                physical_ms: floor_ms,
            });
        }
        Ok(Fence {
            floor_ms,
            target_ms,
        })
    }

    pub fn floor_ms(&self) -> u64 {
        self.floor_ms
    }

    /// What to persist before serving.
    pub fn target_ms(&self) -> u64 {
        self.target_ms
    }

    /// Seeds the allocator once `durable_ms` is durable. A backend that reports less than the
    /// target broke its contract; serving on it could pass the durable bound.
    pub fn complete(self, durable_ms: u64) -> Result<Window, Error> {
        if durable_ms > PHYSICAL_MAX_MS {
            return Err(Error::PhysicalOutOfRange {
                physical_ms: durable_ms,
            });
        }
        if durable_ms < self.target_ms {
            return Err(Error::DurableBelowTarget {
                durable_ms,
                target_ms: self.target_ms,
            });
        }
        Ok(Window::seeded(self.floor_ms, durable_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_value_past_the_layout_is_refused_not_asserted() {
        let fence = Fence::plan(100, 50, 10).unwrap();
        assert!(matches!(
            fence.complete(PHYSICAL_MAX_MS + 1),
            Err(Error::PhysicalOutOfRange { .. })
        ));
    }

    #[test]
    fn floor_is_above_prior_and_not_behind_the_clock() {
        assert_eq!(fence_floor_ms(100, 50), 101);
        assert_eq!(fence_floor_ms(100, 101), 101);
        assert_eq!(fence_floor_ms(100, 500), 500);
        assert_eq!(fence_floor_ms(0, 0), 1);
    }

    #[test]
    fn plan_and_complete() {
        let f = Fence::plan(1_000, 900, 1_000).unwrap();
        assert_eq!((f.floor_ms(), f.target_ms()), (1_001, 2_001));
        assert_eq!(
            f.complete(2_000),
            Err(Error::DurableBelowTarget {
                durable_ms: 2_000,
                target_ms: 2_001
            })
        );
        let mut w = f.complete(5_000).unwrap();
        assert_eq!(w.high_water_ms(), 5_000);
        let g = w.grant(1, 900).unwrap();
        assert_eq!((g.physical_ms(), g.logical_start()), (1_001, 0));
    }

    #[test]
    fn plan_refuses_a_floor_past_the_layout() {
        assert!(Fence::plan(PHYSICAL_MAX_MS, 0, 1_000).is_err());
        let f = Fence::plan(PHYSICAL_MAX_MS - 1, 0, 1_000).unwrap();
        assert_eq!(f.target_ms(), PHYSICAL_MAX_MS);
    }
}
