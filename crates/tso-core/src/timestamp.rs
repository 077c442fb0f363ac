//! The 64-bit timestamp: `physical_ms << 18 | logical`. Integer order is (physical, logical)
//! order; a `Timestamp` can only hold in-range parts.

use std::fmt;

use crate::Error;

/// Bits of the logical counter.
pub const LOGICAL_BITS: u32 = 18;
/// Bits of the physical millisecond part.
pub const PHYSICAL_BITS: u32 = 46;
/// Logicals per millisecond (262144); a grant holds at most this many timestamps.
pub const LOGICAL_COUNT: u32 = 1 << LOGICAL_BITS;
/// The largest physical millisecond the layout can carry.
pub const PHYSICAL_MAX_MS: u64 = (1 << PHYSICAL_BITS) - 1;

const _: () = assert!(LOGICAL_BITS + PHYSICAL_BITS == 64);
const _: () = assert!(LOGICAL_COUNT == 262_144);
const _: () = assert!(PHYSICAL_MAX_MS << LOGICAL_BITS >> LOGICAL_BITS == PHYSICAL_MAX_MS);

/// One issued timestamp.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// Packs `physical_ms` and `logical`, refusing parts out of range.
    pub const fn new(physical_ms: u64, logical: u32) -> Result<Self, Error> {
        if physical_ms > PHYSICAL_MAX_MS {
            return Err(Error::PhysicalOutOfRange { physical_ms });
        }
        if logical >= LOGICAL_COUNT {
            return Err(Error::LogicalOutOfRange { logical });
        }
        Ok(Self(physical_ms << LOGICAL_BITS | logical as u64))
    }

    /// Every `u64` is a valid timestamp.
    pub const fn from_u64(raw: u64) -> Self {
        Self(raw)
    }

    pub const fn as_u64(self) -> u64 {
        self.0
    }

    pub const fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    pub const fn logical(self) -> u32 {
        (self.0 & (LOGICAL_COUNT as u64 - 1)) as u32
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({}:{})", self.physical_ms(), self.logical())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<Timestamp> for u64 {
    fn from(ts: Timestamp) -> u64 {
        ts.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_and_unpacks() {
        let ts = Timestamp::new(1_700_000_000_000, 5).unwrap();
        assert_eq!(ts.physical_ms(), 1_700_000_000_000);
        assert_eq!(ts.logical(), 5);
        assert_eq!(ts.as_u64(), 1_700_000_000_000 << 18 | 5);
        assert_eq!(Timestamp::from_u64(ts.as_u64()), ts);
    }

    #[test]
    fn refuses_out_of_range_parts() {
        assert_eq!(
            Timestamp::new(PHYSICAL_MAX_MS + 1, 0),
            Err(Error::PhysicalOutOfRange {
                physical_ms: PHYSICAL_MAX_MS + 1
            })
        );
        assert_eq!(
            Timestamp::new(0, LOGICAL_COUNT),
            Err(Error::LogicalOutOfRange {
                logical: LOGICAL_COUNT
            })
        );
        assert_eq!(
            Timestamp::new(PHYSICAL_MAX_MS, LOGICAL_COUNT - 1)
                .unwrap()
                .as_u64(),
            u64::MAX
        );
    }

    #[test]
    fn integer_order_is_part_order() {
        let a = Timestamp::new(10, LOGICAL_COUNT - 1).unwrap();
        let b = Timestamp::new(11, 0).unwrap();
        assert!(a < b);
        assert_eq!(a.as_u64() + 1, b.as_u64());
    }
}
