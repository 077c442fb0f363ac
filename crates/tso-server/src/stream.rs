//! The streaming timestamp RPC (`tso.stream.v1.TsoStream/GetTsStream`, docs/protocol.md
//! "Extensions"): one long-lived stream carrying many GetTs-like requests.
//!
//! Each stream is served by one task that takes a request, grants it through the same path as
//! unary GetTs (lease check included), sends the reply, and only then takes the next request.
//! So replies come in request order, every grant is made after its request arrived, and
//! nothing is granted ahead. The replies waiting to be sent are bounded
//! ([`STREAM_REPLIES_BUFFERED`]): a client that stops reading stops the task, and HTTP/2 flow
//! control then stops the client's sends, so a stream never grows server memory.
//!
//! A "not leader" refusal is the last reply of a stream (the client moves to the hinted leader).
//! Draining for shutdown ends every stream with UNAVAILABLE; a poisoned server ends them with
//! INTERNAL.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tso_core::LOGICAL_COUNT;
use tso_proto::tso::stream::v1::tso_stream_server::TsoStream;
use tso_proto::tso::stream::v1::{
    TsStreamRefusal, TsStreamRequest, TsStreamResponse, ts_stream_response,
};
use tso_proto::v1::{EpochWire, GetTsResponse, LeaderHint};

use crate::oracle::Shared;
use crate::refusal::Refusal;

/// Replies of one stream waiting to be written to its connection. Past it the stream's task
/// waits, and stops reading requests. 64 replies of about 40 bytes each: a few kilobytes per
/// stream, enough to keep a connection's writes full.
pub const STREAM_REPLIES_BUFFERED: usize = 64;

/// The `tso.stream.v1.TsoStream` handler; mount it with [`crate::OracleGuard::stream_service`].
#[derive(Clone)]
pub struct TsoStreamHandler {
    shared: Arc<Shared>,
}

impl TsoStreamHandler {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type Replies = mpsc::Sender<Result<TsStreamResponse, Status>>;

#[tonic::async_trait]
impl TsoStream for TsoStreamHandler {
    type GetTsStreamStream = ReceiverStream<Result<TsStreamResponse, Status>>;

    async fn get_ts_stream(
        &self,
        request: Request<Streaming<TsStreamRequest>>,
    ) -> Result<Response<Self::GetTsStreamStream>, Status> {
        let (replies, outbound) = mpsc::channel(STREAM_REPLIES_BUFFERED);
        let shared = Arc::clone(&self.shared);
        tokio::spawn(serve(shared, request.into_inner(), replies));
        Ok(Response::new(ReceiverStream::new(outbound)))
    }
}

async fn serve(shared: Arc<Shared>, mut inbound: Streaming<TsStreamRequest>, replies: Replies) {
    loop {
        let request = tokio::select! {
            biased;
            status = stopping(&shared) => { finish(&replies, status); return; }
            _ = replies.closed() => return,
            next = inbound.message() => match next {
                Ok(Some(request)) => request,
                Ok(None) => return,
                Err(status) => { finish(&replies, status); return; }
            },
        };
        let (reply, last) = answer(&shared, request).await;
        let sent = tokio::select! {
            biased;
            status = stopping(&shared) => { finish(&replies, status); return; }
            sent = replies.send(Ok(reply)) => sent,
        };
        if sent.is_err() || last {
            return;
        }
    }
}

/// Resolves when the server drains or is poisoned, with the status that ends the stream.
async fn stopping(shared: &Shared) -> Status {
    tokio::select! {
        _ = shared.draining.cancelled() => Status::unavailable(
            "the server is shutting down: reconnect (to another node if there is one)",
        ),
        _ = shared.failed.cancelled() => Status::internal(
            "this node stopped serving on a fatal error",
        ),
    }
}

/// Ends the stream with `status`. A full buffer (a client that stopped reading) must not
/// hold the task, so it is tried once.
fn finish(replies: &Replies, status: Status) {
    let _ = replies.try_send(Err(status));
}

/// Grants one request, or says why not; `true` when this reply ends the stream.
async fn answer(shared: &Shared, request: TsStreamRequest) -> (TsStreamResponse, bool) {
    let request_id = request.request_id;
    let count = request.count;
    let result = if count == 0 || count > LOGICAL_COUNT {
        Err(Refusal::InvalidArgument(format!(
            "count {count} is out of range: ask for 1 to {LOGICAL_COUNT}"
        )))
    } else {
        shared.grant(count).await
    };
    let (result, last) = match result {
        Ok((grant, epoch)) => (
            ts_stream_response::Result::Grant(GetTsResponse {
                physical_ms: grant.physical_ms(),
                logical_start: grant.logical_start(),
                count: grant.count(),
                epoch_hi: epoch.hi(),
                epoch_lo: epoch.lo(),
            }),
            false,
        ),
        Err(refusal) => {
            let last = matches!(refusal, Refusal::NotLeader(_));
            (
                ts_stream_response::Result::Refusal(refusal_of(refusal)),
                last,
            )
        }
    };
    let reply = TsStreamResponse {
        request_id,
        result: Some(result),
    };
    (reply, last)
}

fn refusal_of(refusal: Refusal) -> TsStreamRefusal {
    let (code, message, hint) = match refusal {
        Refusal::NotLeader(hint) => {
            let wire = LeaderHint {
                leader_endpoint: hint.endpoint,
                leader_epoch: hint.epoch.map(|e| EpochWire {
                    hi: e.hi(),
                    lo: e.lo(),
                }),
            };
            (
                Code::FailedPrecondition,
                crate::NOT_LEADER_MESSAGE.to_string(),
                Some(wire),
            )
        }
        Refusal::InvalidArgument(m) => (Code::InvalidArgument, m, None),
        Refusal::OutOfRange(m) => (Code::OutOfRange, m, None),
        Refusal::Unavailable(m) => (Code::Unavailable, m, None),
        Refusal::Internal(m) => (Code::Internal, m, None),
        Refusal::ResourceExhausted(m) => (Code::ResourceExhausted, m, None),
        Refusal::FailedPrecondition(m) => (Code::FailedPrecondition, m, None),
        Refusal::NotFound(m) => (Code::NotFound, m, None),
    };
    TsStreamRefusal {
        code: code as i32,
        message,
        hint,
    }
}
