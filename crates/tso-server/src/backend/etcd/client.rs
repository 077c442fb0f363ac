//! A thin client over the subset of etcd's v3 API the backend uses: every call has a deadline,
//! and every failure is classified as a [`BackendError`].

use std::time::Duration;

use tonic::transport::Channel;
use tso_proto::etcd::compare::{CompareResult, CompareTarget, TargetUnion};
use tso_proto::etcd::kv_client::KvClient;
use tso_proto::etcd::lease_client::LeaseClient;
use tso_proto::etcd::request_op::Request;
use tso_proto::etcd::{
    Compare, KeyValue, LeaseGrantRequest, LeaseRevokeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest, TxnResponse,
};

use crate::backend::BackendError;

/// The clients of one etcd cluster (cheap to clone: one shared channel).
#[derive(Clone)]
pub(super) struct Etcd {
    pub kv: KvClient<Channel>,
    pub lease: LeaseClient<Channel>,
    /// The deadline of each unary call.
    pub timeout: Duration,
}

/// Classifies a gRPC status from etcd (or from the transport in front of it).
///
/// etcd answers `Unavailable` for "no leader", "leader changed", "request timed out" and a
/// stopped member; `ResourceExhausted` for "too many requests" and "database space exceeded"
/// (passes once an operator compacts and disarms the alarm, like a full disk on the file
/// backend); `Unknown` and `Cancelled` are what the transport reports for a reset connection.
/// Everything else (`InvalidArgument` for a too-large request, `PermissionDenied`,
/// `Unauthenticated`, `DataLoss` for a corrupt member, `Unimplemented`, ...) will not pass on
/// a retry.
pub(super) fn classify(what: &str, status: &tonic::Status) -> BackendError {
    use tonic::Code;
    let text = format!("etcd {what}: {:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::ResourceExhausted
        | Code::Cancelled
        | Code::Unknown => BackendError::Transient(text),
        _ => BackendError::Permanent(text),
    }
}

fn timed_out(what: &str, timeout: Duration) -> BackendError {
    BackendError::Transient(format!("etcd {what}: no answer within {timeout:?}"))
}

/// `key`'s compare of `target` with `value` for equality.
pub(super) fn equal(key: &[u8], target: CompareTarget, value: TargetUnion) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: target as i32,
        key: key.to_vec(),
        target_union: Some(value),
        range_end: Vec::new(),
    }
}

/// A linearizable read of one key, as a transaction operation.
pub(super) fn range_op(key: &[u8]) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        })),
    }
}

/// A write of one key (attached to `lease` unless 0), as a transaction operation.
pub(super) fn put_op(key: &[u8], value: Vec<u8>, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: key.to_vec(),
            value,
            lease,
            ..Default::default()
        })),
    }
}

/// The one key of the `i`-th response of a transaction that ran [`range_op`]s (None if absent).
pub(super) fn range_result(resp: &TxnResponse, i: usize) -> Result<Option<KeyValue>, BackendError> {
    use tso_proto::etcd::response_op::Response;
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(Response::ResponseRange(r)) => Ok(r.kvs.first().cloned()),
        other => Err(BackendError::Permanent(format!(
            "etcd txn: response {i} is not a range: {other:?}"
        ))),
    }
}

/// The revision of a response header (0 if etcd sent none, which it always does).
pub(super) fn revision(header: Option<&tso_proto::etcd::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision)
}

impl Etcd {
    async fn call<T, F>(&self, what: &str, call: F) -> Result<T, BackendError>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(classify(what, &status)),
            Err(_) => Err(timed_out(what, self.timeout)),
        }
    }

    /// A linearizable read of one key.
    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, BackendError> {
        let req = RangeRequest {
            key: key.to_vec(),
            ..Default::default()
        };
        let mut kv = self.kv.clone();
        let resp = self.call("range", kv.range(req)).await?;
        Ok(resp.kvs.into_iter().next())
    }

    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse, BackendError> {
        let mut kv = self.kv.clone();
        self.call("txn", kv.txn(req)).await
    }

    /// Grants a lease of `ttl_secs`; returns its id and the TTL etcd granted (etcd may raise
    /// it to its minimum).
    pub async fn grant(&self, ttl_secs: i64) -> Result<(i64, i64), BackendError> {
        let mut lease = self.lease.clone();
        let req = LeaseGrantRequest {
            ttl: ttl_secs,
            id: 0,
        };
        let resp = self.call("lease grant", lease.lease_grant(req)).await?;
        if !resp.error.is_empty() {
            return Err(BackendError::Transient(format!(
                "etcd lease grant: {}",
                resp.error
            )));
        }
        if resp.id == 0 || resp.ttl <= 0 {
            return Err(BackendError::Permanent(format!(
                "etcd lease grant answered id {} ttl {}",
                resp.id, resp.ttl
            )));
        }
        Ok((resp.id, resp.ttl))
    }

    /// Revokes a lease (deleting the keys attached to it); a lease already gone is fine.
    pub async fn revoke(&self, id: i64) -> Result<(), BackendError> {
        let mut lease = self.lease.clone();
        match self
            .call(
                "lease revoke",
                lease.lease_revoke(LeaseRevokeRequest { id }),
            )
            .await
        {
            Err(BackendError::Permanent(e)) if e.contains("NotFound") => Ok(()),
            other => other.map(drop),
        }
    }
}
