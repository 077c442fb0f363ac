//! The `tsoracle.v1.TsoService` gRPC handler: argument checks, the grant call, and the mapping
//! of refusals to gRPC statuses with the leader-hint trailer (docs/protocol.md).

use std::sync::Arc;

use prost::Message;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};
use tso_core::{Epoch, LOGICAL_COUNT};
use tso_proto::LEADER_HINT_KEY;
use tso_proto::v1::tso_service_server::TsoService;
use tso_proto::v1::*;

use crate::oracle::Shared;
use crate::refusal::{LeaderHint as Hint, Refusal};
use crate::sequence::{SeqCall, check_call};

/// The gRPC handler; mount it with [`crate::OracleGuard::service`].
#[derive(Clone)]
pub struct TsoHandler {
    shared: Arc<Shared>,
}

impl TsoHandler {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// A sequence call's arguments, checked.
    fn checked(&self, entries: Vec<(Vec<u8>, u32)>) -> Result<SeqCall, Status> {
        check_call(entries, self.shared.config.seq_count_max).map_err(Status::invalid_argument)
    }
}

/// The message of every "not leader" status; clients match on the code, not the text.
pub const NOT_LEADER_MESSAGE: &str = "not leader";

pub(crate) fn status_of(refusal: Refusal) -> Status {
    match refusal {
        Refusal::NotLeader(hint) => not_leader(&hint),
        Refusal::InvalidArgument(msg) => Status::invalid_argument(msg),
        Refusal::OutOfRange(msg) => Status::out_of_range(msg),
        Refusal::Unavailable(msg) => Status::unavailable(msg),
        Refusal::Internal(msg) => Status::internal(msg),
        Refusal::ResourceExhausted(msg) => Status::resource_exhausted(msg),
        Refusal::FailedPrecondition(msg) => Status::failed_precondition(msg),
        Refusal::NotFound(msg) => Status::not_found(msg),
    }
}

/// `FAILED_PRECONDITION "not leader"` with the hint trailer (fields absent when unknown).
pub fn not_leader(hint: &Hint) -> Status {
    let wire = tso_proto::v1::LeaderHint {
        leader_endpoint: hint.endpoint.clone(),
        leader_epoch: hint.epoch.map(epoch_wire),
    };
    let mut metadata = MetadataMap::new();
    metadata.insert_bin(
        LEADER_HINT_KEY,
        MetadataValue::from_bytes(&wire.encode_to_vec()),
    );
    Status::with_metadata(Code::FailedPrecondition, NOT_LEADER_MESSAGE, metadata)
}

fn epoch_wire(epoch: Epoch) -> EpochWire {
    EpochWire {
        hi: epoch.hi(),
        lo: epoch.lo(),
    }
}

#[tonic::async_trait]
impl TsoService for TsoHandler {
    async fn get_ts(
        &self,
        request: Request<GetTsRequest>,
    ) -> Result<Response<GetTsResponse>, Status> {
        let count = request.into_inner().count;
        if count == 0 || count > LOGICAL_COUNT {
            return Err(Status::invalid_argument(format!(
                "count {count} is out of range: ask for 1 to {LOGICAL_COUNT}"
            )));
        }
        let (grant, epoch) = self.shared.grant(count).await.map_err(status_of)?;
        Ok(Response::new(GetTsResponse {
            physical_ms: grant.physical_ms(),
            logical_start: grant.logical_start(),
            count: grant.count(),
            epoch_hi: epoch.hi(),
            epoch_lo: epoch.lo(),
        }))
    }

    async fn get_current_max_safe(
        &self,
        _request: Request<GetCurrentMaxSafeRequest>,
    ) -> Result<Response<GetCurrentMaxSafeResponse>, Status> {
        let (max_safe_physical_ms, epoch) = self.shared.max_safe();
        Ok(Response::new(GetCurrentMaxSafeResponse {
            max_safe_physical_ms,
            epoch_hi: epoch.hi(),
            epoch_lo: epoch.lo(),
        }))
    }

    async fn get_seq(
        &self,
        request: Request<GetSeqRequest>,
    ) -> Result<Response<GetSeqResponse>, Status> {
        let GetSeqRequest { key, count } = request.into_inner();
        let call = self.checked(vec![(key, count)])?;
        let (call, starts, epoch) = self.shared.sequence(call).await.map_err(status_of)?;
        let (key, count) = call.entries.into_iter().next().expect("one entry");
        Ok(Response::new(GetSeqResponse {
            key,
            start: starts[0],
            count,
            epoch: Some(epoch_wire(epoch)),
        }))
    }

    async fn get_seq_batch(
        &self,
        request: Request<GetSeqBatchRequest>,
    ) -> Result<Response<GetSeqBatchResponse>, Status> {
        let entries = request
            .into_inner()
            .entries
            .into_iter()
            .map(|e| (e.key, e.count))
            .collect();
        let call = self.checked(entries)?;
        let (call, starts, epoch) = self.shared.sequence(call).await.map_err(status_of)?;
        let grants = call
            .entries
            .into_iter()
            .zip(starts)
            .map(|((key, count), start)| SeqGrantEntry { key, start, count })
            .collect();
        Ok(Response::new(GetSeqBatchResponse {
            grants,
            epoch: Some(epoch_wire(epoch)),
        }))
    }

    async fn acquire_lease(
        &self,
        request: Request<AcquireLeaseRequest>,
    ) -> Result<Response<AcquireLeaseResponse>, Status> {
        let AcquireLeaseRequest {
            holder,
            holder_epoch,
            ttl_ms,
        } = request.into_inner();
        let ttl_range = (
            self.shared.config.lease_ttl_min,
            self.shared.config.lease_ttl_max,
        );
        crate::stamping::check_acquire(&holder, ttl_ms, ttl_range)
            .map_err(Status::invalid_argument)?;
        let grant = self
            .shared
            .acquire_lease(holder, holder_epoch, ttl_ms)
            .await
            .map_err(status_of)?;
        Ok(Response::new(AcquireLeaseResponse {
            lease_id: grant.lease_id,
            ts_upper_bound: grant.bound_ms,
            expires_at_ms: grant.expires_at_ms,
            epoch: Some(epoch_wire(grant.epoch)),
        }))
    }

    async fn renew_lease(
        &self,
        request: Request<RenewLeaseRequest>,
    ) -> Result<Response<RenewLeaseResponse>, Status> {
        let lease_id = request.into_inner().lease_id;
        let grant = self.shared.renew_lease(lease_id).await.map_err(status_of)?;
        Ok(Response::new(RenewLeaseResponse {
            ts_upper_bound: grant.bound_ms,
            expires_at_ms: grant.expires_at_ms,
            epoch: Some(epoch_wire(grant.epoch)),
        }))
    }

    async fn release_lease(
        &self,
        request: Request<ReleaseLeaseRequest>,
    ) -> Result<Response<ReleaseLeaseResponse>, Status> {
        let lease_id = request.into_inner().lease_id;
        self.shared
            .release_lease(lease_id)
            .await
            .map_err(status_of)?;
        Ok(Response::new(ReleaseLeaseResponse {}))
    }

    async fn get_safe_frontier(
        &self,
        _request: Request<GetSafeFrontierRequest>,
    ) -> Result<Response<GetSafeFrontierResponse>, Status> {
        let (frontier_physical_ms, epoch) = self.shared.safe_frontier().await.map_err(status_of)?;
        Ok(Response::new(GetSafeFrontierResponse {
            frontier_physical_ms,
            epoch_hi: epoch.hi(),
            epoch_lo: epoch.lo(),
        }))
    }
}
