//! Sans-I/O core of the tso timestamp oracle.
//!
//! Everything here is pure arithmetic over inputs: the caller passes the wall clock (`now_ms`)
//! and the durable high-water it has; the core returns decisions. No runtime, no clock reads, no
//! files, so every rule of SEMANTICS §1, §3, §5 and §9 is testable without I/O.

mod epoch;
mod error;
mod fence;
mod timestamp;
mod window;

pub use epoch::Epoch;
pub use error::Error;
pub use fence::{Fence, fence_floor_ms};
pub use timestamp::{LOGICAL_BITS, LOGICAL_COUNT, PHYSICAL_BITS, PHYSICAL_MAX_MS, Timestamp};
pub use window::{Grant, Window};
