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
use tonic::Code;
use tso_proto::v1::GetTsRequest;

use super::history::{Call, Outcome, WireGrant, monotonic_ns};
use crate::targets::{Targets, code_name, leader_hint};

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
    pub targets: Arc<Targets>,
    pub shared: Arc<Shared>,
}

impl Client {
    /// Calls until told to stop; returns every call it made.
    pub async fn run(self) -> anyhow::Result<Vec<Call>> {
        let mut rng = StdRng::seed_from_u64(
            self.seed ^ u64::from(self.id).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let endpoints = self.targets.endpoints().to_vec();
        let mut rotation = self.id as usize % endpoints.len();
        let slot = self.id as usize;
        let mut client = self.targets.client(&endpoints[rotation], slot)?;
        let mut calls = Vec::new();
        while !self.shared.stop.load(Ordering::Relaxed) && calls.len() < self.calls_max {
            let requested = rng.random_range(1..=self.count_max);
            let start_ns = monotonic_ns();
            let reply = client.get_ts(GetTsRequest { count: requested }).await;
            let end_ns = monotonic_ns();
            let outcome = match reply {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    self.shared.last_ok_ns.fetch_max(end_ns, Ordering::Relaxed);
                    Outcome::Granted(WireGrant {
                        physical_ms: reply.physical_ms,
                        logical_start: reply.logical_start,
                        count: reply.count,
                    })
                }
                Err(status) => {
                    if let Some(leader) = leader_hint(&status) {
                        client = self.targets.client(&leader, slot)?;
                    } else if status.code() == Code::Unavailable && endpoints.len() > 1 {
                        rotation = (rotation + 1) % endpoints.len();
                        client = self.targets.client(&endpoints[rotation], slot)?;
                    }
                    tokio::time::sleep(FAILED_PAUSE).await;
                    Outcome::Failed(code_name(status.code()))
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
