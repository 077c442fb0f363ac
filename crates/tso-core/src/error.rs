//! The core's one error type. Every variant carries the values that made it.

use crate::{LOGICAL_COUNT, PHYSICAL_MAX_MS};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("physical part {physical_ms} ms is above the 46-bit maximum {PHYSICAL_MAX_MS}")]
    PhysicalOutOfRange { physical_ms: u64 },
    #[error("logical part {logical} is above the 18-bit maximum {}", LOGICAL_COUNT - 1)]
    LogicalOutOfRange { logical: u32 },
    #[error("count {count} is out of range: ask for 1 to {LOGICAL_COUNT} timestamps")]
    InvalidCount { count: u32 },
    /// The grant needs a millisecond above the durable high-water: extend the window first.
    #[error(
        "window exhausted: the grant needs {needed_ms} ms, the durable high-water is {high_water_ms} ms"
    )]
    WindowExhausted { needed_ms: u64, high_water_ms: u64 },
    /// A backend reported less than it was asked to make durable: its contract is broken.
    #[error(
        "backend reported {durable_ms} ms durable after being asked for at least {target_ms} ms"
    )]
    DurableBelowTarget { durable_ms: u64, target_ms: u64 },
}
