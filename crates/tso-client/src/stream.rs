//! The streaming `GetTs` (`tso.stream.v1.TsoStream/GetTsStream`, docs/protocol.md
//! "Extensions"): one long-lived stream per leader connection carries the dispatcher's
//! requests, several in flight at once, each answered in order by the server.
//!
//! Invariants:
//! - A request is queued to the stream and recorded as pending under one lock, so the pending
//!   queue is in send order and the server's in-order replies match it front to back.
//! - A reply whose request id, count or shape does not match the front request is
//!   `MalformedReply` for that request; the stream is then broken and dropped.
//! - A stream that fails or ends fails every request still pending on it the way a transport
//!   error fails a unary RPC (retryable); after a "not leader" refusal (the server's last reply
//!   on a stream) the requests behind it get the same refusal.
//! - Nothing is fetched ahead: a request is sent only by a call's attempt, for callers already
//!   batched, exactly as a unary `GetTs` would be.
//! - At most [`STREAM_PENDING_MAX`] requests wait on one stream, and [`Streams`] keeps at most
//!   one open stream per address, `CHANNELS_MAX` addresses in all.

use std::collections::{HashMap, VecDeque};
use std::error::Error as _;
use std::sync::{Arc, Mutex, MutexGuard};

use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tonic::Code;
use tonic::codec::Streaming;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tso_proto::LEADER_HINT_KEY;
use tso_proto::tso::stream::v1::tso_stream_client::TsoStreamClient;
use tso_proto::tso::stream::v1::{
    TsStreamRefusal, TsStreamRequest, TsStreamResponse, ts_stream_response,
};

use crate::attempt::{Outcome, classify, is_timeout};
use crate::config::{CHANNELS_MAX, STREAM_UNSUPPORTED_RECHECK};
use crate::endpoint::Target;
use crate::grant::{TsRange, validate_reply};
use crate::router::Router;
use crate::{Error, Result};

/// Requests waiting for their reply on one stream at most. The dispatcher keeps at most
/// `in_flight_rpcs_max` (4 by default) in flight; the rest are requests whose callers gave up
/// (their deadline passed) and whose replies have not come yet. A server that leaves 1024
/// requests unanswered is stuck: the stream is dropped and the next attempt opens a new one.
pub(crate) const STREAM_PENDING_MAX: usize = 1024;

/// Why a stream takes no more requests; what every request still pending on it is told.
#[derive(Clone, Debug)]
enum Closed {
    /// "Not leader" (the hint, or why it cannot be used): the server's last reply.
    NotLeader(Result<crate::endpoint::Hint, String>),
    /// The stream failed or ended: like a transport error of a unary RPC.
    Broken(String),
}

impl Closed {
    fn outcome(&self) -> Outcome<TsRange> {
        match self {
            Closed::NotLeader(Ok(hint)) => Outcome::NotLeader(hint.clone()),
            Closed::NotLeader(Err(reason)) => Outcome::MalformedHint(reason.clone()),
            Closed::Broken(reason) => Outcome::Unreachable(reason.clone()),
        }
    }
}

struct Pending {
    id: u64,
    count: u32,
    reply: oneshot::Sender<Outcome<TsRange>>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    pending: VecDeque<Pending>,
    closed: Option<Closed>,
}

/// One open `GetTsStream` to one endpoint. Dropping the last handle ends the stream.
pub(crate) struct TsStream {
    target: Target,
    requests: mpsc::UnboundedSender<TsStreamRequest>,
    state: Arc<Mutex<State>>,
    reader: AbortHandle,
}

impl Drop for TsStream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl TsStream {
    /// Opens the stream on `channel`; the server's status when it refuses (`UNIMPLEMENTED`
    /// from a server without the service).
    async fn open(channel: Channel, target: &Target) -> Result<TsStream, tonic::Status> {
        // Unbounded, but every request in it is also pending: STREAM_PENDING_MAX bounds both.
        let (requests, mut outbound) = mpsc::unbounded_channel();
        let outbound = futures_util::stream::poll_fn(move |cx| outbound.poll_recv(cx));
        let mut client = TsoStreamClient::new(channel);
        let inbound = client.get_ts_stream(outbound).await?.into_inner();
        let state = Arc::new(Mutex::new(State::default()));
        let reader = tokio::spawn(read(inbound, Arc::clone(&state), target.clone()));
        Ok(TsStream {
            target: target.clone(),
            requests,
            state,
            reader: reader.abort_handle(),
        })
    }

    /// True once the stream takes no more requests.
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    /// Sends a request for `count` timestamps; the receiver gets what it came to. `Err` when
    /// the stream is closed (with what a request on it is told) or full.
    fn send(&self, count: u32) -> Result<oneshot::Receiver<Outcome<TsRange>>, Outcome<TsRange>> {
        let mut state = self.lock();
        if let Some(closed) = &state.closed {
            return Err(closed.outcome());
        }
        if state.pending.len() >= STREAM_PENDING_MAX {
            let reason = format!(
                "{} left {STREAM_PENDING_MAX} stream requests unanswered",
                self.target
            );
            drop(state);
            self.close(Closed::Broken(reason.clone()));
            return Err(Outcome::Unreachable(reason));
        }
        state.next_id += 1;
        let id = state.next_id;
        let request = TsStreamRequest {
            request_id: id,
            count,
        };
        if self.requests.send(request).is_err() {
            // The stream's request body is gone: the call itself ended.
            let reason = format!("{}: the timestamp stream is closed", self.target);
            drop(state);
            self.close(Closed::Broken(reason.clone()));
            return Err(Outcome::Unreachable(reason));
        }
        let (reply, receive) = oneshot::channel();
        state.pending.push_back(Pending { id, count, reply });
        Ok(receive)
    }

    /// Closes the stream: every pending request is told `why` (unless it was closed before,
    /// then what it was closed with).
    fn close(&self, why: Closed) {
        close(&self.state, why);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

/// What the client knows of an address's timestamp stream.
enum StreamSlot {
    Open(Arc<TsStream>),
    /// It answered `UNIMPLEMENTED` (a plain `tsoracle.v1` server): unary `GetTs` until then.
    Unsupported {
        until: Instant,
    },
}

/// The timestamp stream of each address, on its `GetTs` channel: at most one open per address,
/// or a note that the address has none. At most `CHANNELS_MAX` entries; when full, addresses
/// that are not configured endpoints (hinted leaders) are forgotten first.
pub(crate) struct Streams {
    configured: Vec<Target>,
    slots: Mutex<HashMap<Target, StreamSlot>>,
}

impl Streams {
    /// No streams yet, over the `configured` endpoints.
    pub(crate) fn new(configured: Vec<Target>) -> Self {
        Self {
            configured,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// False while `target` is known to have no timestamp stream.
    pub(crate) fn offered(&self, target: &Target) -> bool {
        match self.lock_slots().get(target) {
            Some(StreamSlot::Unsupported { until }) => *until <= Instant::now(),
            _ => true,
        }
    }

    /// The open timestamp stream to `target`, if there is one that still takes requests.
    fn kept(&self, target: &Target) -> Option<Arc<TsStream>> {
        match self.lock_slots().get(target) {
            Some(StreamSlot::Open(stream)) if !stream.is_closed() => Some(Arc::clone(stream)),
            _ => None,
        }
    }

    /// Keeps `stream` as `target`'s stream, unless another attempt opened one first that still
    /// takes requests: then that one, so callers share one stream per connection.
    fn keep(&self, target: &Target, stream: Arc<TsStream>) -> Arc<TsStream> {
        let mut slots = self.lock_slots();
        if let Some(StreamSlot::Open(kept)) = slots.get(target)
            && !kept.is_closed()
        {
            return Arc::clone(kept);
        }
        self.make_room(&mut slots, target);
        slots.insert(target.clone(), StreamSlot::Open(Arc::clone(&stream)));
        stream
    }

    /// Forgets `stream` as `target`'s stream (a newer one stays).
    fn forget(&self, target: &Target, stream: &Arc<TsStream>) {
        let mut slots = self.lock_slots();
        if let Some(StreamSlot::Open(kept)) = slots.get(target)
            && Arc::ptr_eq(kept, stream)
        {
            slots.remove(target);
        }
    }

    /// Records that `target` has no timestamp stream: unary `GetTs` until the recheck.
    fn mark_unsupported(&self, target: &Target) {
        let mut slots = self.lock_slots();
        self.make_room(&mut slots, target);
        let until = Instant::now() + STREAM_UNSUPPORTED_RECHECK;
        slots.insert(target.clone(), StreamSlot::Unsupported { until });
    }

    /// Before `target` gets a slot: when full, forgets every address that is not configured.
    fn make_room(&self, slots: &mut HashMap<Target, StreamSlot>, target: &Target) {
        if slots.len() >= CHANNELS_MAX && !slots.contains_key(target) {
            slots.retain(|t, _| self.configured.contains(t));
        }
    }

    fn lock_slots(&self) -> MutexGuard<'_, HashMap<Target, StreamSlot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn close(state: &Mutex<State>, why: Closed) {
    let mut state = lock(state);
    let why = state.closed.get_or_insert(why).clone();
    let pending = std::mem::take(&mut state.pending);
    drop(state);
    for request in pending {
        let _ = request.reply.send(why.outcome());
    }
}

/// Hands each reply to its request until the stream fails, ends or breaks the protocol.
async fn read(mut inbound: Streaming<TsStreamResponse>, state: Arc<Mutex<State>>, target: Target) {
    let why = loop {
        match inbound.message().await {
            Ok(Some(reply)) => {
                if let Some(why) = deliver(&state, &target, reply) {
                    break why;
                }
            }
            Ok(None) => break Closed::Broken(format!("{target} ended the timestamp stream")),
            Err(status) => break Closed::Broken(format!("{target}: timestamp stream: {status}")),
        }
    };
    close(&state, why);
}

/// Answers the front request with `reply`; `Some` when the stream must close.
fn deliver(state: &Mutex<State>, target: &Target, reply: TsStreamResponse) -> Option<Closed> {
    let Some(front) = lock(state).pending.pop_front() else {
        return Some(Closed::Broken(format!(
            "{target} answered stream request {} that was never sent",
            reply.request_id
        )));
    };
    let (outcome, why) = match reply_outcome(target, &front, reply) {
        Ok(Replied::Granted(range)) => (Outcome::Granted(range), None),
        Ok(Replied::Refused(outcome)) => (outcome, None),
        Ok(Replied::NotLeader(hint)) => {
            let why = Closed::NotLeader(hint);
            (why.outcome(), Some(why))
        }
        Err(reason) => {
            let outcome = Outcome::Fatal(Error::MalformedReply {
                endpoint: target.to_string(),
                reason: reason.clone(),
            });
            let why = format!("{target} broke the stream protocol: {reason}");
            (outcome, Some(Closed::Broken(why)))
        }
    };
    if let Some(why) = &why {
        // Closed before the front request hears of it, so that its caller's next attempt
        // never lands on this stream.
        close(state, why.clone());
    }
    let _ = front.reply.send(outcome);
    why
}

/// What one well-formed reply says.
enum Replied {
    Granted(TsRange),
    /// "Not leader": the last reply of the stream.
    NotLeader(Result<crate::endpoint::Hint, String>),
    /// Any other refusal, sorted as the same status of a unary `GetTs`.
    Refused(Outcome<TsRange>),
}

/// Checks `reply` against the request it answers; `Err` says how it breaks the protocol.
fn reply_outcome(
    target: &Target,
    request: &Pending,
    reply: TsStreamResponse,
) -> Result<Replied, String> {
    if reply.request_id != request.id {
        return Err(format!(
            "reply to request {} where request {} was next",
            reply.request_id, request.id
        ));
    }
    match reply.result {
        None => Err(format!(
            "reply to request {} holds neither a grant nor a refusal",
            request.id
        )),
        Some(ts_stream_response::Result::Grant(grant)) => {
            validate_reply(request.count, &grant).map(Replied::Granted)
        }
        Some(ts_stream_response::Result::Refusal(refusal)) => {
            Ok(match classify(target, &status_of(refusal)) {
                Outcome::NotLeader(hint) => Replied::NotLeader(Ok(hint)),
                Outcome::MalformedHint(reason) => Replied::NotLeader(Err(reason)),
                outcome => Replied::Refused(outcome),
            })
        }
    }
}

/// The status a unary `GetTs` would have answered for `refusal`, hint trailer included, so
/// that both paths sort refusals the same way.
fn status_of(refusal: TsStreamRefusal) -> tonic::Status {
    let mut metadata = MetadataMap::new();
    if let Some(hint) = refusal.hint {
        let bytes = hint.encode_to_vec();
        metadata.insert_bin(LEADER_HINT_KEY, MetadataValue::from_bytes(&bytes));
    }
    tonic::Status::with_metadata(Code::from(refusal.code), refusal.message, metadata)
}

/// One `GetTs` attempt over the stream to `target`, until `attempt_deadline`; `timed_out`
/// says what running out of time means. `None` when `target` has no stream service:
/// `streams` remembers it and the caller falls back to unary `GetTs`.
pub(crate) async fn attempt(
    router: &Router,
    streams: &Streams,
    target: &Target,
    count: u32,
    attempt_deadline: Instant,
    timed_out: impl Fn() -> Outcome<TsRange>,
) -> Option<Outcome<TsRange>> {
    let stream = match streams.kept(target) {
        Some(stream) => stream,
        None => {
            let open = TsStream::open(router.channel(target), target);
            match tokio::time::timeout_at(attempt_deadline, open).await {
                Err(_) => return Some(timed_out()),
                Ok(Ok(stream)) => streams.keep(target, Arc::new(stream)),
                Ok(Err(status)) => {
                    return refused_to_open(router, streams, target, &status, timed_out);
                }
            }
        }
    };
    let receive = match stream.send(count) {
        Ok(receive) => receive,
        Err(outcome) => return Some(on_broken(router, target, outcome)),
    };
    let outcome = match tokio::time::timeout_at(attempt_deadline, receive).await {
        Err(_) => {
            let outcome = timed_out();
            if let Outcome::Unreachable(reason) = &outcome {
                // A stream that does not answer is dead: its other requests fail now too.
                stream.close(Closed::Broken(reason.clone()));
                streams.forget(target, &stream);
            }
            outcome
        }
        Ok(Err(_)) => Outcome::Unreachable(format!("{target}: the timestamp stream is closed")),
        Ok(Ok(outcome)) => outcome,
    };
    Some(on_broken(router, target, outcome))
}

/// After a stream failed like a transport error, the next attempt dials afresh.
fn on_broken(router: &Router, target: &Target, outcome: Outcome<TsRange>) -> Outcome<TsRange> {
    if matches!(outcome, Outcome::Unreachable(_)) {
        router.drop_channel(target);
    }
    outcome
}

/// Sorts a refusal to open the stream: `None` (fall back to unary) for `UNIMPLEMENTED` from
/// the server, else what the same status of a unary `GetTs` means.
fn refused_to_open(
    router: &Router,
    streams: &Streams,
    target: &Target,
    status: &tonic::Status,
    timed_out: impl Fn() -> Outcome<TsRange>,
) -> Option<Outcome<TsRange>> {
    if is_timeout(status) {
        return Some(timed_out());
    }
    if status.source().is_some() {
        // Made on this side from a transport error; a server's status carries no source.
        router.drop_channel(target);
        return Some(Outcome::Unreachable(format!("{target}: {status}")));
    }
    if status.code() == Code::Unimplemented {
        tracing::debug!(%target, "no timestamp stream on this server: using unary GetTs");
        streams.mark_unsupported(target);
        return None;
    }
    Some(classify(target, status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{Hint, Scheme, parse_address};
    use std::time::Duration;
    use tso_proto::v1::{GetTsResponse, LeaderHint};

    fn state_with(
        requests: &[(u64, u32)],
    ) -> (Mutex<State>, Vec<oneshot::Receiver<Outcome<TsRange>>>) {
        let mut state = State::default();
        let mut receivers = Vec::new();
        for &(id, count) in requests {
            let (reply, receive) = oneshot::channel();
            state.pending.push_back(Pending { id, count, reply });
            receivers.push(receive);
        }
        (Mutex::new(state), receivers)
    }

    fn target() -> Target {
        parse_address("a:1", Scheme::Http).unwrap()
    }

    fn grant(request_id: u64, count: u32) -> TsStreamResponse {
        TsStreamResponse {
            request_id,
            result: Some(ts_stream_response::Result::Grant(GetTsResponse {
                physical_ms: 100,
                logical_start: 0,
                count,
                epoch_hi: 0,
                epoch_lo: 1,
            })),
        }
    }

    fn refusal(request_id: u64, code: Code, hint: Option<LeaderHint>) -> TsStreamResponse {
        TsStreamResponse {
            request_id,
            result: Some(ts_stream_response::Result::Refusal(TsStreamRefusal {
                code: code as i32,
                message: "refused".into(),
                hint,
            })),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_without_the_stream_is_asked_again_only_after_the_recheck() {
        let [a, b] = ["a:1", "b:2"].map(|s| parse_address(s, Scheme::Http).unwrap());
        let streams = Streams::new(vec![a.clone(), b.clone()]);
        assert!(streams.offered(&a));
        streams.mark_unsupported(&a);
        assert!(!streams.offered(&a));
        assert!(streams.offered(&b), "remembered per address");
        tokio::time::advance(STREAM_UNSUPPORTED_RECHECK - Duration::from_millis(1)).await;
        assert!(!streams.offered(&a));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(streams.offered(&a));
    }

    #[test]
    fn replies_are_matched_in_order_and_a_mismatch_breaks_the_stream() {
        let (state, mut rx) = state_with(&[(1, 2), (2, 1), (3, 1)]);
        assert!(deliver(&state, &target(), grant(1, 2)).is_none());
        assert!(matches!(rx[0].try_recv(), Ok(Outcome::Granted(r)) if r.count() == 2));
        // The server skipped request 2.
        let why = deliver(&state, &target(), grant(3, 1));
        assert!(matches!(why, Some(Closed::Broken(_))));
        assert!(matches!(
            rx[1].try_recv(),
            Ok(Outcome::Fatal(Error::MalformedReply { .. }))
        ));
        close(&state, why.unwrap());
        assert!(matches!(rx[2].try_recv(), Ok(Outcome::Unreachable(_))));
    }

    #[test]
    fn a_wrong_count_or_an_empty_reply_is_malformed_and_closes_the_stream() {
        let empty = |request_id| TsStreamResponse {
            request_id,
            result: None,
        };
        for bad in [grant(1, 3), empty(1)] {
            let (state, mut rx) = state_with(&[(1, 2), (2, 1)]);
            assert!(deliver(&state, &target(), bad).is_some());
            assert!(matches!(
                rx[0].try_recv(),
                Ok(Outcome::Fatal(Error::MalformedReply { .. }))
            ));
            assert!(matches!(rx[1].try_recv(), Ok(Outcome::Unreachable(_))));
            assert!(lock(&state).closed.is_some());
        }
        let (state, _) = state_with(&[]);
        assert!(
            deliver(&state, &target(), grant(1, 1)).is_some(),
            "a reply to nothing"
        );
    }

    #[test]
    fn not_leader_answers_every_request_behind_it_and_other_refusals_do_not_close() {
        let (state, mut rx) = state_with(&[(1, 1), (2, 1), (3, 1)]);
        let invalid = deliver(&state, &target(), refusal(1, Code::InvalidArgument, None));
        assert!(invalid.is_none());
        assert!(matches!(
            rx[0].try_recv(),
            Ok(Outcome::Fatal(Error::InvalidArgument { .. }))
        ));
        let hint = LeaderHint {
            leader_endpoint: Some("b:2".into()),
            leader_epoch: None,
        };
        let why = deliver(
            &state,
            &target(),
            refusal(2, Code::FailedPrecondition, Some(hint)),
        );
        close(&state, why.expect("not leader closes the stream"));
        for rx in &mut rx[1..] {
            let Ok(Outcome::NotLeader(Hint::Leader { target, .. })) = rx.try_recv() else {
                panic!("not the hint");
            };
            assert_eq!(target.uri(), "http://b:2");
        }
        let (state, mut rx) = state_with(&[(7, 1)]);
        assert!(deliver(&state, &target(), refusal(7, Code::Unavailable, None)).is_none());
        assert!(matches!(rx[0].try_recv(), Ok(Outcome::Refused(_))));
    }
}
