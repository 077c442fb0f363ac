//! Capped exponential backoff for retries that must go on for as long as they make sense.

use std::time::Duration;

/// First fence retry delay (SEMANTICS §5).
pub const FENCE_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// Cap of the fence retry delay: a leader retries at least four times a second.
pub const FENCE_BACKOFF_CAP: Duration = Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        assert!(!base.is_zero() && base <= cap);
        Self {
            base,
            cap,
            next: base,
        }
    }

    pub fn fence() -> Self {
        Self::new(FENCE_BACKOFF_BASE, FENCE_BACKOFF_CAP)
    }

    /// The delay before the next retry: doubles from `base` up to `cap`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.cap);
        delay
    }

    pub fn reset(&mut self) {
        self.next = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::fence();
        let delays: Vec<u64> = (0..6).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [25, 50, 100, 200, 250, 250]);
        b.reset();
        assert_eq!(b.next_delay(), FENCE_BACKOFF_BASE);
    }
}
