//! The checker's clients: sequential callers that record every call, granted or not.
//!
//! Each client has its own connection and its own seeded random counts, and makes one call at
//! a time, so its calls never overlap and its order is its start order. A call's start and end
//! are read on `CLOCK_MONOTONIC` right around the RPC; the real call lies inside that span.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::history::{Call, Outcome, monotonic_ns};
use crate::targets::Route;

/// Calls recorded in one run at most, over all clients: about 60 bytes each, under 300 MiB.
/// A client that reaches its share stops calling.
pub const CALLS_MAX: usize = 5_000_000;
/// Pause after a failed call, so a down server is not spun on.
const FAILED_PAUSE: Duration = Duration::from_millis(5);

/// State the run shares with its clients.
#[derive(Default)]
pub struct Shared {
    pub stop: AtomicBool,
    /// `CLOCK_MONOTONIC` ns of the latest successful reply.
    pub last_ok_ns: AtomicU64,
}

/// One recording client.
pub struct Client {
    pub id: u32,
    pub seed: u64,
    pub count_max: u32,
    pub calls_max: usize,
    pub route: Route,
    pub shared: Arc<Shared>,
}

impl Client {
    /// Calls until told to stop; returns every call it made.
    pub async fn run(mut self) -> anyhow::Result<Vec<Call>> {
        let mut rng = StdRng::seed_from_u64(
            self.seed ^ u64::from(self.id).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut calls = Vec::new();
        while !self.shared.stop.load(Ordering::Relaxed) && calls.len() < self.calls_max {
            let requested = rng.random_range(1..=self.count_max);
            let start_ns = monotonic_ns();
            let reply = self.route.get(requested).await;
            let end_ns = monotonic_ns();
            let outcome = match reply {
                Ok(grant) => {
                    self.shared.last_ok_ns.fetch_max(end_ns, Ordering::Relaxed);
                    Outcome::Granted(grant)
                }
                Err(code) => {
                    tokio::time::sleep(FAILED_PAUSE).await;
                    Outcome::Failed(code)
                }
            };
            calls.push(Call {
                client: self.id,
                start_ns,
                end_ns,
                requested,
                outcome,
            });
        }
        Ok(calls)
    }
}
