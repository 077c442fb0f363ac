//! The 128-bit leadership epoch. Epochs order leaders: a later leader has a larger epoch. On the
//! wire it travels as two 64-bit halves, `hi << 64 | lo`.

use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(u128);

impl Epoch {
    pub const ZERO: Epoch = Epoch(0);

    pub const fn new(value: u128) -> Self {
        Self(value)
    }

    pub const fn from_parts(hi: u64, lo: u64) -> Self {
        Self((hi as u128) << 64 | lo as u128)
    }

    pub const fn get(self) -> u128 {
        self.0
    }

    pub const fn hi(self) -> u64 {
        (self.0 >> 64) as u64
    }

    pub const fn lo(self) -> u64 {
        self.0 as u64
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Epoch({})", self)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.hi() == 0 {
            write!(f, "{}", self.lo())
        } else {
            write!(f, "{}.{}", self.hi(), self.lo())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_round_trip_and_order() {
        let e = Epoch::from_parts(3, 7);
        assert_eq!((e.hi(), e.lo()), (3, 7));
        assert!(Epoch::from_parts(3, u64::MAX) < Epoch::from_parts(4, 0));
        assert_eq!(e.to_string(), "3.7");
        assert_eq!(Epoch::new(9).to_string(), "9");
    }
}
