//! The leader's window allocator (SEMANTICS §3, §9).
//!
//! Invariants kept here: every grant is above every earlier grant of this window; no grant's
//! physical part passes the durable high-water `H`; a failed grant changes nothing; `H` only
//! rises. The clock is an input: a forward jump moves the cursor to `now`, a backward jump stalls
//! the physical part while logicals keep counting.

use crate::{Error, LOGICAL_BITS, LOGICAL_COUNT, PHYSICAL_MAX_MS, Timestamp};

/// One grant: `count` consecutive timestamps in one millisecond. Only the allocator makes them,
/// so a `Grant` is always in range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    physical_ms: u64,
    logical_start: u32,
    count: u32,
}

impl Grant {
    pub fn physical_ms(&self) -> u64 {
        self.physical_ms
    }

    pub fn logical_start(&self) -> u32 {
        self.logical_start
    }

    pub fn count(&self) -> u32 {
        self.count
    }

    pub fn first(&self) -> Timestamp {
        Timestamp::from_u64(self.physical_ms << LOGICAL_BITS | self.logical_start as u64)
    }

    pub fn last(&self) -> Timestamp {
        Timestamp::from_u64(self.first().as_u64() + self.count as u64 - 1)
    }
}

/// The allocator. The cursor `(cursor_ms, next_logical)` is the next free slot;
/// `next_logical == LOGICAL_COUNT` means the cursor's millisecond is full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    cursor_ms: u64,
    next_logical: u32,
    high_water_ms: u64,
}

impl Window {
    /// A window whose first grant is at or above `(floor_ms, 0)`, bounded by `high_water_ms`.
    pub(crate) fn seeded(floor_ms: u64, high_water_ms: u64) -> Window {
        assert!(floor_ms <= high_water_ms && high_water_ms <= PHYSICAL_MAX_MS);
        Window {
            cursor_ms: floor_ms,
            next_logical: 0,
            high_water_ms,
        }
    }

    pub fn high_water_ms(&self) -> u64 {
        self.high_water_ms
    }

    /// The cursor's millisecond: no later grant of this window is below it.
    pub fn cursor_ms(&self) -> u64 {
        self.cursor_ms
    }

    /// Grants `count` timestamps at `now_ms`, or says why not without changing anything.
    pub fn grant(&mut self, count: u32, now_ms: u64) -> Result<Grant, Error> {
        if count == 0 || count > LOGICAL_COUNT {
            return Err(Error::InvalidCount { count });
        }
        let (mut physical_ms, mut logical) = (self.cursor_ms, self.next_logical);
        if now_ms > physical_ms {
            (physical_ms, logical) = (now_ms, 0);
        }
        if logical as u64 + count as u64 > LOGICAL_COUNT as u64 {
            (physical_ms, logical) = (physical_ms + 1, 0);
        }
        if physical_ms > PHYSICAL_MAX_MS {
            return Err(Error::PhysicalOutOfRange { physical_ms });
        }
        if physical_ms > self.high_water_ms {
            return Err(Error::WindowExhausted {
                needed_ms: physical_ms,
                high_water_ms: self.high_water_ms,
            });
        }
        debug_assert!((physical_ms, logical) >= (self.cursor_ms, self.next_logical));
        self.cursor_ms = physical_ms;
        self.next_logical = logical + count;
        Ok(Grant {
            physical_ms,
            logical_start: logical,
            count,
        })
    }

    /// Raises `H` to a newly durable value. A lower value (a stale or reordered report) is
    /// ignored: `H` never falls.
    pub fn raise_high_water(&mut self, durable_ms: u64) {
        assert!(
            durable_ms <= PHYSICAL_MAX_MS,
            "durable high-water {durable_ms} past the layout"
        );
        self.high_water_ms = self.high_water_ms.max(durable_ms);
    }

    /// Moves the cursor above every timestamp of millisecond `above_ms`, so that every later
    /// grant's physical part is above it. Needs `above_ms < H` (raise `H` first); a cursor
    /// already past it stays.
    pub fn raise_floor(&mut self, above_ms: u64) {
        assert!(
            above_ms < self.high_water_ms,
            "floor {above_ms} not below the high-water {}",
            self.high_water_ms
        );
        if above_ms + 1 > self.cursor_ms {
            (self.cursor_ms, self.next_logical) = (above_ms + 1, 0);
        }
    }

    /// What an extension should persist: `max(H + 1, now) + window_ahead`.
    pub fn extension_target_ms(&self, now_ms: u64, window_ahead_ms: u64) -> u64 {
        (self.high_water_ms + 1)
            .max(now_ms)
            .saturating_add(window_ahead_ms)
            .min(PHYSICAL_MAX_MS)
    }

    /// Whether the remaining room, from the later of the clock and the cursor up to `H`, is
    /// below `low_water_ms`: extend now so that no request waits for it.
    pub fn wants_extension(&self, now_ms: u64, low_water_ms: u64) -> bool {
        let from_ms = now_ms.max(self.cursor_ms);
        self.high_water_ms < PHYSICAL_MAX_MS
            && self.high_water_ms.saturating_sub(from_ms) < low_water_ms
    }

    /// Closes every millisecond below the current one and returns the highest closed one: no
    /// timestamp at or below it will be granted again by this window. Moves the cursor up to the
    /// clock when a grant would do the same, so the watermark follows time while idle.
    pub fn close_through(&mut self, now_ms: u64) -> u64 {
        if now_ms > self.cursor_ms && now_ms <= self.high_water_ms {
            (self.cursor_ms, self.next_logical) = (now_ms, 0);
        }
        if self.next_logical == LOGICAL_COUNT {
            self.cursor_ms
        } else {
            self.cursor_ms - 1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn window(floor: u64, high: u64) -> Window {
        Window::seeded(floor, high)
    }

    #[test]
    fn follows_the_clock_forward() {
        let mut w = window(100, 200);
        assert_eq!(
            w.grant(3, 90).unwrap(),
            Grant {
                physical_ms: 100,
                logical_start: 0,
                count: 3
            }
        );
        assert_eq!(
            w.grant(2, 100).unwrap(),
            Grant {
                physical_ms: 100,
                logical_start: 3,
                count: 2
            }
        );
        assert_eq!(
            w.grant(1, 150).unwrap(),
            Grant {
                physical_ms: 150,
                logical_start: 0,
                count: 1
            }
        );
    }

    #[test]
    fn stalls_when_the_clock_goes_back() {
        let mut w = window(100, 200);
        w.grant(1, 150).unwrap();
        assert_eq!(
            w.grant(1, 120).unwrap(),
            Grant {
                physical_ms: 150,
                logical_start: 1,
                count: 1
            }
        );
    }

    #[test]
    fn logical_overflow_moves_to_the_next_millisecond() {
        let mut w = window(100, 101);
        w.grant(LOGICAL_COUNT - 1, 100).unwrap();
        let g = w.grant(2, 100).unwrap();
        assert_eq!((g.physical_ms(), g.logical_start()), (101, 0));
        w.grant(LOGICAL_COUNT - 2, 100).unwrap();
        assert_eq!(
            w.grant(1, 100),
            Err(Error::WindowExhausted {
                needed_ms: 102,
                high_water_ms: 101
            })
        );
    }

    #[test]
    fn a_failed_grant_changes_nothing() {
        let mut w = window(100, 100);
        w.grant(10, 100).unwrap();
        let before = w.clone();
        assert!(w.grant(0, 100).is_err());
        assert!(w.grant(LOGICAL_COUNT + 1, 100).is_err());
        assert!(w.grant(1, 101).is_err());
        assert!(w.grant(LOGICAL_COUNT, 100).is_err());
        assert_eq!(w, before);
        w.raise_high_water(300);
        assert_eq!(w.grant(1, 250).unwrap().physical_ms(), 250);
    }

    #[test]
    fn whole_millisecond_grant() {
        let mut w = window(100, 100);
        let g = w.grant(LOGICAL_COUNT, 0).unwrap();
        assert_eq!(
            (g.first().logical(), g.last().logical()),
            (0, LOGICAL_COUNT - 1)
        );
        assert_eq!(w.close_through(0), 100);
    }

    #[test]
    fn refuses_past_the_layout() {
        let mut w = window(PHYSICAL_MAX_MS, PHYSICAL_MAX_MS);
        w.grant(LOGICAL_COUNT, 0).unwrap();
        assert_eq!(
            w.grant(1, 0),
            Err(Error::PhysicalOutOfRange {
                physical_ms: PHYSICAL_MAX_MS + 1
            })
        );
        assert!(!w.wants_extension(0, 1_000));
    }

    #[test]
    fn extension_arithmetic() {
        let mut w = window(100, 1_000);
        assert_eq!(w.extension_target_ms(50, 3_000), 4_001);
        assert_eq!(w.extension_target_ms(2_000, 3_000), 5_000);
        assert!(!w.wants_extension(100, 500));
        assert!(w.wants_extension(600, 500));
        w.raise_high_water(500);
        assert_eq!(w.high_water_ms(), 1_000);
    }

    #[test]
    fn close_through_never_goes_back() {
        let mut w = window(100, 1_000);
        assert_eq!(w.close_through(50), 99);
        assert_eq!(w.close_through(500), 499);
        assert_eq!(w.close_through(200), 499);
        assert_eq!(w.close_through(5_000), 499);
        assert_eq!(w.grant(1, 200).unwrap().physical_ms(), 500);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Grant(u32),
        Clock(i64),
        Extend(u64),
        Close,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => prop_oneof![1u32..=4, 1u32..=LOGICAL_COUNT].prop_map(Step::Grant),
            2 => (-2_000i64..=2_000).prop_map(Step::Clock),
            1 => Just(Step::Clock(0)),
            2 => (0u64..=3_000).prop_map(Step::Extend),
            1 => Just(Step::Close),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any mix of grants, clock moves (forward, back, frozen), extensions and watermark reads:
        /// every grant is above everything granted and closed before, and never above `H`.
        #[test]
        fn never_duplicates_regresses_or_passes_high_water(
            start in 1_000u64..=1_000_000,
            ahead in 0u64..=2_000,
            steps in proptest::collection::vec(step(), 1..300),
        ) {
            let mut w = window(start, start + ahead);
            let mut now = start;
            let mut last_issued: Option<u64> = None;
            let mut closed_ms = 0u64;
            for s in steps {
                match s {
                    Step::Grant(count) => {
                        let before = w.clone();
                        match w.grant(count, now) {
                            Ok(g) => {
                                prop_assert!(g.physical_ms() <= w.high_water_ms());
                                prop_assert!(g.physical_ms() > closed_ms);
                                prop_assert_eq!(g.count(), count);
                                prop_assert_eq!(g.last().as_u64() - g.first().as_u64() + 1, count as u64);
                                if let Some(last) = last_issued {
                                    prop_assert!(g.first().as_u64() > last);
                                }
                                if now > before.cursor_ms() && now <= w.high_water_ms() && count <= LOGICAL_COUNT {
                                    prop_assert_eq!(g.physical_ms(), now, "G4: follows a clock ahead");
                                }
                                last_issued = Some(g.last().as_u64());
                            }
                            Err(_) => prop_assert_eq!(&w, &before),
                        }
                    }
                    Step::Clock(delta) => now = now.saturating_add_signed(delta).max(1),
                    Step::Extend(by) => {
                        let target = w.extension_target_ms(now, by);
                        w.raise_high_water(target);
                    }
                    Step::Close => {
                        let m = w.close_through(now);
                        prop_assert!(m >= closed_ms);
                        if let Some(last) = last_issued {
                            prop_assert!(Timestamp::from_u64(last).physical_ms() <= m + 1);
                        }
                        closed_ms = m;
                    }
                }
            }
        }
    }
}
