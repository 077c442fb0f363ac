//! The operator calls of the client port (`tso.ops.v1`), on every backend: a node's status at a
//! glance, from memory, and raising a running oracle's high-water (forward only). Kept out of
//! `tsoracle.v1`: clients of the public protocol never see them.

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use tso_proto::tso::ops_v1 as pb;
use tso_proto::tso::ops_v1::ops_server::{Ops, OpsServer};

use crate::oracle::Shared;
use crate::service::status_of;

pub use crate::oracle::unsafe_raise_in_memory;

/// The ceiling of a raise when the request names none: a raise further ahead of the leader's
/// clock than this is taken for a typo.
pub const RAISE_MAX_AHEAD_DEFAULT: Duration = Duration::from_secs(24 * 3600);

/// What reads a raft node's view for the status call (its term, log indexes and, on the
/// leader, each member's progress).
pub type RaftStatusFn = Arc<dyn Fn() -> pb::RaftStatus + Send + Sync>;

/// What the status call says of a node beyond the oracle's own state.
#[derive(Clone)]
pub struct NodeInfo {
    /// `file`, `raft`, `etcd`, or what an embedding service calls its backend.
    pub backend: String,
    /// The node's id in its cluster (0 for a single node).
    pub node_id: u64,
    /// The raft view, on raft nodes.
    pub raft: Option<RaftStatusFn>,
}

impl Default for NodeInfo {
    fn default() -> Self {
        NodeInfo {
            backend: "embedded".into(),
            node_id: 0,
            raft: None,
        }
    }
}

impl std::fmt::Debug for NodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeInfo")
            .field("backend", &self.backend)
            .field("node_id", &self.node_id)
            .field("raft", &self.raft.is_some())
            .finish()
    }
}

/// The `tso.ops.v1.Ops` service of one oracle.
pub struct OpsHandler {
    shared: Arc<Shared>,
    info: NodeInfo,
}

impl OpsHandler {
    pub(crate) fn server(shared: Arc<Shared>, info: NodeInfo) -> OpsServer<OpsHandler> {
        OpsServer::new(OpsHandler { shared, info })
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}

#[tonic::async_trait]
impl Ops for OpsHandler {
    async fn get_status(
        &self,
        _request: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::NodeStatus>, Status> {
        let s = self.shared.status().await;
        let role = match (&s.failed, s.serving) {
            (Some(_), _) => pb::Role::Failed,
            (None, Some(_)) => pb::Role::Leader,
            (None, None) => pb::Role::Follower,
        };
        let epoch = s.serving.unwrap_or_default();
        let leader_epoch = s.hint.epoch.unwrap_or_default();
        Ok(Response::new(pb::NodeStatus {
            version: env!("CARGO_PKG_VERSION").into(),
            backend: self.info.backend.clone(),
            node_id: self.info.node_id,
            role: role as i32,
            epoch_hi: epoch.hi(),
            epoch_lo: epoch.lo(),
            leader_endpoint: s.hint.endpoint.clone().unwrap_or_default(),
            leader_epoch_hi: leader_epoch.hi(),
            leader_epoch_lo: leader_epoch.lo(),
            serving_since_unix_ms: s.serving_since_unix_ms,
            high_water_ms: s.high_water_ms,
            clock_unix_ms: s.clock_ms,
            last_fence_ms: s.last_fence.map_or(0, millis),
            leaderless_ms: s.leaderless.map_or(0, millis),
            failure: s.failed.unwrap_or_default(),
            stamping_leases: s.live_leases.unwrap_or(0) as u64,
            sequence_keys: s.sequence_keys.unwrap_or(0) as u64,
            leases_loaded: s.live_leases.is_some(),
            sequences_loaded: s.sequence_keys.is_some(),
            raft: self.info.raft.as_ref().map(|read| read()),
        }))
    }

    async fn raise_high_water(
        &self,
        request: Request<pb::RaiseHighWaterRequest>,
    ) -> Result<Response<pb::RaiseHighWaterResponse>, Status> {
        let req = request.into_inner();
        if req.to_physical_ms == 0 {
            return Err(Status::invalid_argument(
                "to_physical_ms is 0: name the millisecond every later timestamp must be above",
            ));
        }
        let max_ahead_ms = match req.max_ahead_ms {
            0 => millis(RAISE_MAX_AHEAD_DEFAULT),
            ms => ms,
        };
        let (high_water_ms, epoch) = self
            .shared
            .raise(req.to_physical_ms, max_ahead_ms)
            .await
            .map_err(status_of)?;
        tracing::info!(
            above_physical_ms = req.to_physical_ms,
            high_water_ms,
            %epoch,
            "high-water raised by an operator"
        );
        Ok(Response::new(pb::RaiseHighWaterResponse {
            above_physical_ms: req.to_physical_ms,
            high_water_ms,
            epoch_hi: epoch.hi(),
            epoch_lo: epoch.lo(),
        }))
    }
}
