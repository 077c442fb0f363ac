//! `tso bench --mode stream`: raw `GetTsStream` calls (`tso.stream.v1`), no client library.
//!
//! Callers share [`StreamSlot`]s: one per connection (`--connections`), or one each
//! (`--stream-per-caller`, the streams spread over the connections). A slot sends each
//! caller's request on its open stream and hands the replies back in order, matched by request
//! id; a reply that does not match (id, shape) is a [`Failure::Malformed`], which the callers
//! count as a violation. When a stream fails or ends, its waiting callers get an error and the
//! next call opens a new stream; a "not leader" refusal moves the slot to the hinted leader
//! (or the next endpoint), as raw callers do.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Code;
use tonic::codec::Streaming;
use tonic::transport::Channel;
use tso_proto::tso::stream::v1::tso_stream_client::TsoStreamClient;
use tso_proto::tso::stream::v1::{TsStreamRequest, TsStreamResponse, ts_stream_response};

use crate::check::history::WireGrant;
use crate::targets::{Dial, Failure, code_name};

type Reply = Result<WireGrant, Failure>;

/// One stream shared by some callers, reopened after it fails.
pub struct StreamSlot {
    endpoints: Vec<String>,
    timeout: Duration,
    dial: Dial,
    /// The endpoint in use (an index into `endpoints`, or a hinted leader) and its channel.
    place: Mutex<Place>,
    /// The open stream; at most one, opened by the first caller that finds none.
    open: tokio::sync::Mutex<Option<Arc<OpenStream>>>,
}

struct Place {
    rotation: usize,
    endpoint: String,
    channel: Channel,
}

struct OpenStream {
    requests: mpsc::UnboundedSender<TsStreamRequest>,
    state: Arc<Mutex<State>>,
    reader: AbortHandle,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// The requests waiting on one stream, in send order. At most one per caller sharing the
/// stream (each waits for its reply), plus those whose caller timed out.
#[derive(Default)]
struct State {
    next_id: u64,
    pending: VecDeque<(u64, u32, oneshot::Sender<Reply>)>,
    closed: bool,
    /// Where a "not leader" refusal on this stream said to go; `Some(None)`: no leader named.
    redirect: Option<Option<String>>,
}

/// `count` slots over the connections of `endpoints[0]`: slot `i` on connection
/// `i % connections`.
pub fn slots(
    endpoints: &[String],
    connections: usize,
    count: usize,
    timeout: Duration,
    dial: &Dial,
) -> anyhow::Result<Vec<Arc<StreamSlot>>> {
    let channels: Vec<Channel> = (0..connections)
        .map(|_| channel(dial, &endpoints[0], timeout))
        .collect::<anyhow::Result<_>>()?;
    Ok((0..count)
        .map(|i| {
            Arc::new(StreamSlot {
                endpoints: endpoints.to_vec(),
                timeout,
                dial: dial.clone(),
                place: Mutex::new(Place {
                    rotation: 0,
                    endpoint: endpoints[0].clone(),
                    channel: channels[i % connections].clone(),
                }),
                open: tokio::sync::Mutex::new(None),
            })
        })
        .collect())
}

fn channel(dial: &Dial, endpoint: &str, timeout: Duration) -> anyhow::Result<Channel> {
    Ok(dial
        .endpoint(endpoint)?
        .tcp_nodelay(true)
        .connect_timeout(timeout)
        .connect_lazy())
}

impl StreamSlot {
    /// One `count`-timestamp grant over the slot's stream, or why there is none.
    pub async fn get(&self, count: u32) -> Reply {
        let stream = self.stream().await?;
        let receive = {
            let mut state = lock(&stream.state);
            if state.closed {
                return Err(Failure::Error("StreamClosed".into()));
            }
            state.next_id += 1;
            let id = state.next_id;
            let (reply, receive) = oneshot::channel();
            let request = TsStreamRequest {
                request_id: id,
                count,
            };
            if stream.requests.send(request).is_err() {
                return Err(Failure::Error("StreamClosed".into()));
            }
            state.pending.push_back((id, count, reply));
            receive
        };
        match tokio::time::timeout(self.timeout, receive).await {
            Err(_) => Err(Failure::Error("DeadlineExceeded".into())),
            Ok(Err(_)) => Err(Failure::Error("StreamClosed".into())),
            Ok(Ok(reply)) => reply,
        }
    }

    /// The open stream, opening one (after a failed one, where its refusal pointed) if needed.
    async fn stream(&self) -> Result<Arc<OpenStream>, Failure> {
        let mut open = self.open.lock().await;
        if let Some(stream) = open.as_ref() {
            let state = lock(&stream.state);
            if !state.closed {
                return Ok(Arc::clone(stream));
            }
            let redirect = state.redirect.clone();
            drop(state);
            if let Some(leader) = redirect {
                self.move_to(leader);
            }
        }
        *open = None;
        let channel = lock(&self.place).channel.clone();
        let opened = tokio::time::timeout(self.timeout, OpenStream::open(channel)).await;
        match opened {
            Err(_) => Err(Failure::Error("DeadlineExceeded".into())),
            Ok(Err(status)) => {
                self.move_to(None);
                Err(Failure::Error(code_name(status.code())))
            }
            Ok(Ok(stream)) => Ok(Arc::clone(open.insert(Arc::new(stream)))),
        }
    }

    /// To the hinted leader, or the next configured endpoint when none is named.
    fn move_to(&self, leader: Option<String>) {
        let mut place = lock(&self.place);
        let endpoint = match leader {
            Some(leader) => leader,
            None => {
                place.rotation = (place.rotation + 1) % self.endpoints.len();
                self.endpoints[place.rotation].clone()
            }
        };
        if endpoint != place.endpoint
            && let Ok(channel) = channel(&self.dial, &endpoint, self.timeout)
        {
            place.endpoint = endpoint;
            place.channel = channel;
        }
    }
}

impl OpenStream {
    async fn open(channel: Channel) -> Result<OpenStream, tonic::Status> {
        let (requests, outbound) = mpsc::unbounded_channel();
        let mut client = TsoStreamClient::new(channel);
        let outbound = UnboundedReceiverStream::new(outbound);
        let inbound = client.get_ts_stream(outbound).await?.into_inner();
        let state = Arc::new(Mutex::new(State::default()));
        let reader = tokio::spawn(read(inbound, Arc::clone(&state)));
        Ok(OpenStream {
            requests,
            state,
            reader: reader.abort_handle(),
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a reply does to its stream.
enum After {
    Continue,
    /// The stream is done: broken, or "not leader" (where to go, if a leader is named).
    Close(Option<Option<String>>),
}

/// Hands each reply to the caller waiting for it until the stream fails, ends or breaks the
/// protocol; then fails every caller still waiting.
async fn read(mut inbound: Streaming<TsStreamResponse>, state: Arc<Mutex<State>>) {
    let why = loop {
        let reply = match inbound.message().await {
            Ok(Some(reply)) => reply,
            Ok(None) => break "StreamEnded".to_string(),
            Err(status) => break code_name(status.code()),
        };
        let Some((id, count, caller)) = lock(&state).pending.pop_front() else {
            break "StreamReplyToNothing".to_string();
        };
        let (answer, after) = answer(id, count, reply);
        let why = match after {
            After::Continue => None,
            After::Close(redirect) => {
                let mut state = lock(&state);
                state.closed = true;
                state.redirect = redirect;
                Some(match &answer {
                    Err(Failure::Error(code) | Failure::Malformed(code)) => code.clone(),
                    _ => "StreamClosed".to_string(),
                })
            }
        };
        let _ = caller.send(answer);
        if let Some(why) = why {
            break why;
        }
    };
    let pending = {
        let mut state = lock(&state);
        state.closed = true;
        std::mem::take(&mut state.pending)
    };
    for (_, _, caller) in pending {
        let _ = caller.send(Err(Failure::Error(why.clone())));
    }
}

/// One reply to request `id` for `count`: the grant, or the refusal's code, and what it does
/// to the stream.
fn answer(id: u64, count: u32, reply: TsStreamResponse) -> (Reply, After) {
    let malformed = |why: String| (Err(Failure::Malformed(why)), After::Close(None));
    if reply.request_id != id {
        return malformed(format!(
            "stream reply to request {} where {id} was next",
            reply.request_id
        ));
    }
    match reply.result {
        None => malformed("a stream reply with neither grant nor refusal".into()),
        Some(ts_stream_response::Result::Grant(g)) => {
            let grant = WireGrant {
                physical_ms: g.physical_ms,
                logical_start: g.logical_start,
                count: g.count,
            };
            match grant.shape_error(count) {
                Some(why) => malformed(why),
                None => (Ok(grant), After::Continue),
            }
        }
        Some(ts_stream_response::Result::Refusal(refusal)) => {
            let code = Code::from(refusal.code);
            let failure = Err(Failure::Error(code_name(code)));
            if code != Code::FailedPrecondition {
                return (failure, After::Continue);
            }
            // "Not leader" is the stream's last reply.
            let leader = refusal
                .hint
                .and_then(|h| h.leader_endpoint)
                .filter(|e| !e.is_empty());
            (failure, After::Close(Some(leader)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tso_proto::tso::stream::v1::TsStreamRefusal;
    use tso_proto::v1::{GetTsResponse, LeaderHint};

    fn grant(request_id: u64, logical_start: u32, count: u32) -> TsStreamResponse {
        TsStreamResponse {
            request_id,
            result: Some(ts_stream_response::Result::Grant(GetTsResponse {
                physical_ms: 1_000,
                logical_start,
                count,
                epoch_hi: 0,
                epoch_lo: 1,
            })),
        }
    }

    #[test]
    fn replies_are_checked_against_their_request() {
        assert!(matches!(
            answer(3, 2, grant(3, 0, 2)),
            (Ok(_), After::Continue)
        ));
        let wrong = [grant(4, 0, 2), grant(3, 0, 3), grant(3, (1 << 18) - 1, 2)];
        for reply in wrong {
            assert!(matches!(
                answer(3, 2, reply),
                (Err(Failure::Malformed(_)), After::Close(None))
            ));
        }
        let empty = TsStreamResponse {
            request_id: 3,
            result: None,
        };
        assert!(matches!(
            answer(3, 2, empty),
            (Err(Failure::Malformed(_)), _)
        ));
    }

    #[test]
    fn not_leader_closes_the_stream_toward_the_hint() {
        let refusal = |code: Code, leader: Option<&str>| TsStreamResponse {
            request_id: 1,
            result: Some(ts_stream_response::Result::Refusal(TsStreamRefusal {
                code: code as i32,
                message: "no".into(),
                hint: Some(LeaderHint {
                    leader_endpoint: leader.map(str::to_string),
                    leader_epoch: None,
                }),
            })),
        };
        let (reply, after) = answer(1, 1, refusal(Code::FailedPrecondition, Some("h:1")));
        assert_eq!(reply, Err(Failure::Error("FailedPrecondition".into())));
        assert!(matches!(after, After::Close(Some(Some(h))) if h == "h:1"));
        let (_, after) = answer(1, 1, refusal(Code::FailedPrecondition, None));
        assert!(matches!(after, After::Close(Some(None))));
        let (reply, after) = answer(1, 1, refusal(Code::Unavailable, None));
        assert_eq!(reply, Err(Failure::Error("Unavailable".into())));
        assert!(matches!(after, After::Continue));
    }
}
