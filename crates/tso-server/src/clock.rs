//! The clocks, injected at one seam so tests can step the wall clock back, freeze it or jump it,
//! and move monotonic time by hand.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Two readings of time. The wall clock (`now_ms`) gives timestamps their physical part and is
/// advisory (SEMANTICS §9): it may step either way. Monotonic time (`monotonic_ms`) never goes
/// back and does not follow steps; everything that measures how long something lasts (a
/// stamping lease's liveness) reads it (SEMANTICS §14).
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// Milliseconds since an arbitrary origin fixed for the process; never decreases.
    fn monotonic_ms(&self) -> u64;
}

/// Monotonic milliseconds since the first call in this process.
fn process_monotonic_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn monotonic_ms(&self) -> u64 {
        process_monotonic_ms()
    }
}

/// The system clock with its wall reading shifted by an offset that can change at run time
/// (monotonic time is the system's, as a real clock step leaves it). Used by fault tests to
/// jump a server's clock; the binary only builds one behind a flag named as unsafe.
#[derive(Debug, Default)]
pub struct OffsetClock {
    offset_ms: AtomicI64,
}

impl OffsetClock {
    pub fn new(offset_ms: i64) -> Self {
        Self {
            offset_ms: AtomicI64::new(offset_ms),
        }
    }

    pub fn set_offset_ms(&self, offset_ms: i64) {
        self.offset_ms.store(offset_ms, Ordering::Relaxed);
    }
}

impl Clock for OffsetClock {
    fn now_ms(&self) -> u64 {
        SystemClock
            .now_ms()
            .saturating_add_signed(self.offset_ms.load(Ordering::Relaxed))
    }

    fn monotonic_ms(&self) -> u64 {
        process_monotonic_ms()
    }
}
