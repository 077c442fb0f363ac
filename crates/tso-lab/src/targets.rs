//! Connections to the configured endpoints, following leader hints (docs/protocol.md).
//!
//! Each endpoint gets a fixed number of HTTP/2 connections, made lazily and shared by callers
//! (`slot % connections`). A caller keeps its client and switches only when the server says
//! "not leader" with a hint, or when its endpoint is unreachable (then it rotates through the
//! configured list); a pinned caller never switches. A reply the client library refuses as
//! malformed is a [`Failure::Malformed`], which the callers count as a violation, not an error.
//! A sequence call (`GetSeq`) that failed after it may have been granted is a
//! [`Failure::Uncertain`]: the checks must allow its values to be spent (SEMANTICS §11, D2).
//! A `GetSeqBatch` succeeds or fails as a whole: one block per key asked, or one failure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use prost::Message;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};
use tso_proto::LEADER_HINT_KEY;
use tso_proto::v1::tso_service_client::TsoServiceClient;
use tso_proto::v1::{
    GetSeqBatchRequest, GetSeqBatchResponse, GetSeqRequest, GetSeqResponse, GetTsRequest,
    SeqRequestEntry,
};

use crate::check::history::WireGrant;

/// Connections per endpoint at most: each is one HTTP/2 connection with its own task.
pub const CONNECTIONS_MAX: usize = 64;

/// How the load generators dial: plaintext, or TLS with the CA (and client certificate) of
/// the TLS flags. Under TLS a scheme-less address, configured or hinted, means `https`, as in
/// the client library.
#[derive(Clone, Debug, Default)]
pub struct Dial {
    tls: Option<ClientTlsConfig>,
}

impl Dial {
    pub fn new(tls: Option<ClientTlsConfig>) -> Dial {
        Dial { tls }
    }

    /// `scheme://host:port` for `endpoint`, which may lack the scheme.
    pub fn uri(&self, endpoint: &str) -> String {
        match (endpoint.contains("://"), &self.tls) {
            (true, _) => endpoint.to_string(),
            (false, None) => format!("http://{endpoint}"),
            (false, Some(_)) => format!("https://{endpoint}"),
        }
    }

    /// A lazily connecting channel's endpoint for `endpoint`; `https` needs TLS configured.
    pub fn endpoint(&self, endpoint: &str) -> anyhow::Result<Endpoint> {
        let uri = self.uri(endpoint);
        let plain =
            Endpoint::from_shared(uri.clone()).with_context(|| format!("bad endpoint {uri:?}"))?;
        if !uri.starts_with("https://") {
            return Ok(plain);
        }
        let tls = self
            .tls
            .clone()
            .with_context(|| format!("{uri}: https needs --tls-ca FILE"))?;
        plain
            .tls_config(tls)
            .with_context(|| format!("{uri}: cannot set up TLS"))
    }
}

/// A client-library builder with `tls` set, if any: the library callers' counterpart of
/// [`Dial`].
pub fn client_builder(tls: Option<&tso_client::ClientTls>) -> tso_client::ClientBuilder {
    let builder = tso_client::Client::builder();
    match tls {
        Some(tls) => builder.tls(tls.clone()),
        None => builder,
    }
}

pub struct Targets {
    endpoints: Vec<String>,
    connections: usize,
    timeout: Duration,
    dial: Dial,
    pools: Mutex<HashMap<String, Vec<Channel>>>,
}

impl Targets {
    /// `endpoints` as `host:port`, `http://host:port` or `https://host:port`; `connections`
    /// per endpoint; every call times out after `timeout`.
    pub fn new(
        endpoints: &[String],
        connections: usize,
        timeout: Duration,
        dial: Dial,
    ) -> anyhow::Result<Targets> {
        anyhow::ensure!(!endpoints.is_empty(), "give at least one endpoint");
        anyhow::ensure!(
            (1..=CONNECTIONS_MAX).contains(&connections),
            "connections must be 1 to {CONNECTIONS_MAX}, not {connections}"
        );
        Ok(Targets {
            endpoints: endpoints.iter().map(|e| dial.uri(e)).collect(),
            connections,
            timeout,
            dial,
            pools: Mutex::new(HashMap::new()),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A client on connection `slot % connections` of `endpoint`.
    pub fn client(&self, endpoint: &str, slot: usize) -> anyhow::Result<TsoServiceClient<Channel>> {
        let endpoint = self.dial.uri(endpoint);
        let mut pools = self.pools.lock().expect("targets lock");
        if !pools.contains_key(&endpoint) {
            let mut pool = Vec::with_capacity(self.connections);
            for _ in 0..self.connections {
                let channel = self
                    .dial
                    .endpoint(&endpoint)?
                    .tcp_nodelay(true)
                    .timeout(self.timeout)
                    .connect_timeout(self.timeout)
                    .connect_lazy();
                pool.push(channel);
            }
            pools.insert(endpoint.clone(), pool);
        }
        let channel = pools[&endpoint][slot % self.connections].clone();
        Ok(TsoServiceClient::new(channel))
    }
}

/// The leader endpoint named by a "not leader" status, if it names one.
pub fn leader_hint(status: &Status) -> Option<String> {
    if status.code() != Code::FailedPrecondition {
        return None;
    }
    let bytes = status
        .metadata()
        .get_bin(LEADER_HINT_KEY)?
        .to_bytes()
        .ok()?;
    let hint = tso_proto::v1::LeaderHint::decode(bytes).ok()?;
    hint.leader_endpoint.filter(|e| !e.is_empty())
}

/// A short, stable name for a status code (`Unavailable`, `FailedPrecondition`, ...).
pub fn code_name(code: Code) -> String {
    format!("{code:?}")
}

/// How a caller reaches the oracle: raw `GetTs` RPCs over the shared connections (following
/// hints itself), raw RPCs to one node only, or the project's client library (coalescing, its
/// own leader discovery).
pub enum Route {
    Raw {
        targets: Arc<Targets>,
        slot: usize,
        rotation: usize,
        client: TsoServiceClient<Channel>,
    },
    /// Never moves: every call goes to the same node, whatever it answers.
    Pinned(TsoServiceClient<Channel>),
    Library(tso_client::Client),
}

/// Why a call brought no grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// An error reply, or none: the name of a gRPC code or of the client library's error kind.
    /// It constrains nothing.
    Error(String),
    /// A sequence call that failed after its request may have been granted: its values may be
    /// spent. The name of the gRPC code or of the client library's error kind.
    Uncertain(String),
    /// A reply that breaks the protocol (the client library, or the sequence route's own check,
    /// refused it): a violation.
    Malformed(String),
}

/// A sequence block as granted, checked against its request: `start..start + count`, with
/// `count` what was asked for and no overflow, and the epoch of the leader that made it
/// durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireBlock {
    pub start: u64,
    pub count: u32,
    pub epoch: u128,
}

impl WireBlock {
    /// The last value of the block.
    pub fn last(&self) -> u64 {
        self.start + u64::from(self.count) - 1
    }
}

/// A caller whose raw target is unreachable waits this long before its next try, so a dead
/// server is not spun on (the library has its own backoff).
const UNREACHABLE_PAUSE: Duration = Duration::from_millis(5);

impl Route {
    /// Raw RPCs on connection `slot` of the first reachable endpoint.
    pub fn raw(targets: Arc<Targets>, slot: usize) -> anyhow::Result<Route> {
        let rotation = slot % targets.endpoints().len();
        let client = targets.client(&targets.endpoints()[rotation].clone(), slot)?;
        Ok(Route::Raw {
            targets,
            slot,
            rotation,
            client,
        })
    }

    /// Raw RPCs on connection `slot` of endpoint `node`, and nowhere else.
    pub fn pinned(targets: &Targets, node: usize, slot: usize) -> anyhow::Result<Route> {
        let endpoint = targets.endpoints()[node].clone();
        Ok(Route::Pinned(targets.client(&endpoint, slot)?))
    }

    /// One `count`-timestamp grant, or why there is none.
    pub async fn get(&mut self, count: u32) -> Result<WireGrant, Failure> {
        match self {
            Route::Raw {
                targets,
                slot,
                rotation,
                client,
            } => match raw_get(client, count).await {
                Ok(grant) => Ok(grant),
                Err(status) => {
                    if follow(targets, *slot, rotation, client, &status) {
                        tokio::time::sleep(UNREACHABLE_PAUSE).await;
                    }
                    Err(Failure::Error(code_name(status.code())))
                }
            },
            Route::Pinned(client) => raw_get(client, count)
                .await
                .map_err(|status| Failure::Error(code_name(status.code()))),
            Route::Library(client) => match client.get_ts_batch(u64::from(count)).await {
                Ok(batch) => library_grant(&batch),
                Err(err) => Err(library_failure(&err)),
            },
        }
    }
}

impl Route {
    /// One block of `count` values of sequence `key`, or why there is none.
    pub async fn seq(&mut self, key: &str, count: u32) -> Result<WireBlock, Failure> {
        match self {
            Route::Raw {
                targets,
                slot,
                rotation,
                client,
            } => match raw_seq(client, key, count).await {
                Ok(reply) => check_block(key, count, &reply).map_err(Failure::Malformed),
                Err(status) => {
                    if follow(targets, *slot, rotation, client, &status) {
                        tokio::time::sleep(UNREACHABLE_PAUSE).await;
                    }
                    Err(seq_failure(&status))
                }
            },
            Route::Pinned(client) => match raw_seq(client, key, count).await {
                Ok(reply) => check_block(key, count, &reply).map_err(Failure::Malformed),
                Err(status) => Err(seq_failure(&status)),
            },
            Route::Library(client) => match client.get_seq(key, count).await {
                Ok(block) => Ok(library_block(&block)),
                Err(err) => Err(library_failure(&err)),
            },
        }
    }

    /// One block for each `(key, count)` of `entries` (distinct keys), in their order, from one
    /// `GetSeqBatch`: all of them or one failure for all.
    pub async fn seq_batch(&mut self, entries: &[(&str, u32)]) -> Result<Vec<WireBlock>, Failure> {
        match self {
            Route::Raw {
                targets,
                slot,
                rotation,
                client,
            } => match raw_seq_batch(client, entries).await {
                Ok(reply) => check_batch(entries, &reply).map_err(Failure::Malformed),
                Err(status) => {
                    if follow(targets, *slot, rotation, client, &status) {
                        tokio::time::sleep(UNREACHABLE_PAUSE).await;
                    }
                    Err(seq_failure(&status))
                }
            },
            Route::Pinned(client) => match raw_seq_batch(client, entries).await {
                Ok(reply) => check_batch(entries, &reply).map_err(Failure::Malformed),
                Err(status) => Err(seq_failure(&status)),
            },
            Route::Library(client) => match client.get_seq_batch(entries).await {
                Ok(batch) => Ok(batch.into_blocks().iter().map(library_block).collect()),
                Err(err) => Err(library_failure(&err)),
            },
        }
    }
}

fn library_block(block: &tso_client::SeqBlock) -> WireBlock {
    WireBlock {
        start: block.start(),
        count: block.count(),
        epoch: block.epoch().get(),
    }
}

/// One raw `GetSeq`, its reply taken as it came.
async fn raw_seq(
    client: &mut TsoServiceClient<Channel>,
    key: &str,
    count: u32,
) -> Result<GetSeqResponse, Status> {
    let request = GetSeqRequest {
        key: key.into(),
        count,
    };
    Ok(client.get_seq(request).await?.into_inner())
}

/// A raw `GetSeq` reply checked as the client library checks it: the key and count asked for,
/// an epoch, and no value past `u64::MAX`.
fn check_block(key: &str, count: u32, reply: &GetSeqResponse) -> Result<WireBlock, String> {
    if reply.key != key || reply.count != count {
        return Err(format!(
            "asked for {count} values of {key:?}, got {} of {:?}",
            reply.count, reply.key
        ));
    }
    let Some(epoch) = reply.epoch else {
        return Err("the reply has no epoch".into());
    };
    if reply.start.checked_add(u64::from(count)).is_none() {
        return Err(format!("block {}+{count} passes u64::MAX", reply.start));
    }
    Ok(WireBlock {
        start: reply.start,
        count,
        epoch: tso_core::Epoch::from_parts(epoch.hi, epoch.lo).get(),
    })
}

/// One raw `GetSeqBatch`, its reply taken as it came.
async fn raw_seq_batch(
    client: &mut TsoServiceClient<Channel>,
    entries: &[(&str, u32)],
) -> Result<GetSeqBatchResponse, Status> {
    let request = GetSeqBatchRequest {
        entries: entries
            .iter()
            .map(|&(key, count)| SeqRequestEntry {
                key: key.into(),
                count,
            })
            .collect(),
    };
    Ok(client.get_seq_batch(request).await?.into_inner())
}

/// A raw `GetSeqBatch` reply checked as the client library checks it: one grant per entry, in
/// request order, each of the key and count asked for and no value past `u64::MAX`, and one
/// epoch for all.
fn check_batch(
    entries: &[(&str, u32)],
    reply: &GetSeqBatchResponse,
) -> Result<Vec<WireBlock>, String> {
    if reply.grants.len() != entries.len() {
        return Err(format!(
            "asked for {} keys, got {} grants",
            entries.len(),
            reply.grants.len()
        ));
    }
    entries
        .iter()
        .zip(&reply.grants)
        .map(|(&(key, count), grant)| {
            let one = GetSeqResponse {
                key: grant.key.clone(),
                start: grant.start,
                count: grant.count,
                epoch: reply.epoch,
            };
            check_block(key, count, &one)
        })
        .collect()
}

/// A failed raw `GetSeq`: uncertain unless nothing was sent or the server refused.
fn seq_failure(status: &Status) -> Failure {
    let code = code_name(status.code());
    if tso_client::seq_status_is_uncertain(status) {
        Failure::Uncertain(code)
    } else {
        Failure::Error(code)
    }
}

/// One raw `GetTs`, its reply taken as it came.
async fn raw_get(
    client: &mut TsoServiceClient<Channel>,
    count: u32,
) -> Result<WireGrant, tonic::Status> {
    let reply = client.get_ts(GetTsRequest { count }).await?.into_inner();
    Ok(WireGrant {
        physical_ms: reply.physical_ms,
        logical_start: reply.logical_start,
        count: reply.count,
    })
}

/// Moves a raw caller after an error: to the leader a "not leader" reply names, or to the next
/// endpoint. Returns whether it rotated (the caller then pauses).
fn follow(
    targets: &Targets,
    slot: usize,
    rotation: &mut usize,
    client: &mut TsoServiceClient<Channel>,
    status: &Status,
) -> bool {
    if let Some(leader) = leader_hint(status) {
        if let Ok(next) = targets.client(&leader, slot) {
            *client = next;
        }
        return false;
    }
    if status.code() == Code::InvalidArgument {
        return false;
    }
    // Unreachable, timed out, or "not leader" without a hint (an election, or a node cut off
    // from its peers): try the next endpoint.
    *rotation = (*rotation + 1) % targets.endpoints().len();
    let endpoint = targets.endpoints()[*rotation].clone();
    if let Ok(next) = targets.client(&endpoint, slot) {
        *client = next;
    }
    true
}

/// A library batch as one grant: its first range. For a count one grant can hold the library
/// returns one range; a split batch shows as a short grant, which the checks flag.
fn library_grant(batch: &tso_client::Batch) -> Result<WireGrant, Failure> {
    let range = batch
        .ranges()
        .first()
        .ok_or_else(|| Failure::Malformed("the client library returned an empty batch".into()))?;
    Ok(WireGrant {
        physical_ms: range.first().physical_ms(),
        logical_start: range.first().logical(),
        count: range.count(),
    })
}

/// A library error as a failure: a reply the library refused as malformed is a violation,
/// everything else an error.
fn library_failure(err: &tso_client::Error) -> Failure {
    match err {
        tso_client::Error::MalformedReply { .. } => Failure::Malformed(err.to_string()),
        tso_client::Error::SeqUncertain { .. } => Failure::Uncertain(library_error_name(err)),
        _ => Failure::Error(library_error_name(err)),
    }
}

fn library_error_name(err: &tso_client::Error) -> String {
    use tso_client::Error as E;
    match err {
        E::InvalidCount { .. } => "InvalidCount".into(),
        E::InvalidArgument { .. } => "InvalidArgument".into(),
        E::InvalidEndpoint { .. } => "InvalidEndpoint".into(),
        E::InvalidConfig { .. } => "InvalidConfig".into(),
        E::QueueFull { .. } => "QueueFull".into(),
        E::Unavailable { .. } => "Unavailable".into(),
        E::DeadlineExceeded { .. } => "DeadlineExceeded".into(),
        E::MalformedReply { .. } => "MalformedReply".into(),
        E::MalformedHint { .. } => "MalformedHint".into(),
        E::Server { code, .. } => code_name(*code),
        E::Closed => "Closed".into(),
        E::InvalidSeqKey { .. } => "InvalidSeqKey".into(),
        E::InvalidSeqCount { .. } => "InvalidSeqCount".into(),
        E::InvalidSeqBatch { .. } => "InvalidSeqBatch".into(),
        E::SeqUncertain { .. } => "SeqUncertain".into(),
        E::InvalidLeaseHolder { .. } => "InvalidLeaseHolder".into(),
        E::InvalidLeaseTtl { .. } => "InvalidLeaseTtl".into(),
        E::LeaseNotFound { .. } => "LeaseNotFound".into(),
        E::LeaseLost { .. } => "LeaseLost".into(),
        E::StaleHolderEpoch { .. } => "StaleHolderEpoch".into(),
        E::LeaseTtlDiffers { .. } => "LeaseTtlDiffers".into(),
        E::LeaseStalled { .. } => "LeaseStalled".into(),
    }
}

#[cfg(test)]
mod tests {
    use tonic::metadata::{MetadataMap, MetadataValue};

    use super::*;

    fn not_leader(hint: tso_proto::v1::LeaderHint) -> Status {
        let mut metadata = MetadataMap::new();
        metadata.insert_bin(
            LEADER_HINT_KEY,
            MetadataValue::from_bytes(&hint.encode_to_vec()),
        );
        Status::with_metadata(Code::FailedPrecondition, "not leader", metadata)
    }

    #[test]
    fn reads_the_leader_hint_trailer() {
        let hinted = not_leader(tso_proto::v1::LeaderHint {
            leader_endpoint: Some("127.0.0.1:7002".into()),
            leader_epoch: None,
        });
        assert_eq!(leader_hint(&hinted).as_deref(), Some("127.0.0.1:7002"));
        let unknown = not_leader(tso_proto::v1::LeaderHint::default());
        assert_eq!(leader_hint(&unknown), None);
        assert_eq!(leader_hint(&Status::unavailable("down")), None);
    }

    #[test]
    fn a_malformed_library_reply_is_not_an_error() {
        let malformed = tso_client::Error::MalformedReply {
            endpoint: "http://127.0.0.1:1".into(),
            reason: "granted 2 timestamps for a request of 1".into(),
        };
        assert!(matches!(
            library_failure(&malformed),
            Failure::Malformed(reason) if reason.contains("granted 2 timestamps")
        ));
        let down = tso_client::Error::Unavailable {
            attempts: 3,
            last: "refused".into(),
        };
        assert_eq!(library_failure(&down), Failure::Error("Unavailable".into()));
    }

    #[test]
    fn raw_sequence_replies_and_failures_are_sorted() {
        let reply = |key: &str, start, count| GetSeqResponse {
            key: key.into(),
            start,
            count,
            epoch: Some(tso_proto::v1::EpochWire { hi: 0, lo: 1 }),
        };
        let block = check_block("k", 3, &reply("k", 10, 3)).unwrap();
        assert_eq!((block.start, block.last()), (10, 12));
        assert!(check_block("k", 3, &reply("k", 10, 4)).is_err());
        assert!(check_block("k", 3, &reply("j", 10, 3)).is_err());
        assert!(check_block("k", 3, &reply("k", u64::MAX - 1, 3)).is_err());
        let no_epoch = GetSeqResponse {
            epoch: None,
            ..reply("k", 10, 3)
        };
        assert!(check_block("k", 3, &no_epoch).is_err());
        assert_eq!(
            seq_failure(&Status::unavailable("write failed")),
            Failure::Uncertain("Unavailable".into())
        );
        assert_eq!(
            seq_failure(&Status::failed_precondition("not leader")),
            Failure::Error("FailedPrecondition".into())
        );
        // A cap or a full queue refuses before anything is written.
        assert_eq!(
            seq_failure(&Status::resource_exhausted("refused")),
            Failure::Error("ResourceExhausted".into())
        );
        let uncertain = tso_client::Error::SeqUncertain {
            endpoint: "http://a:1".into(),
            asked: vec![("k".into(), 1)],
            reason: "reset".into(),
        };
        assert_eq!(
            library_failure(&uncertain),
            Failure::Uncertain("SeqUncertain".into())
        );
    }

    #[test]
    fn raw_batch_replies_are_checked_grant_by_grant() {
        let grant = |key: &str, start, count| tso_proto::v1::SeqGrantEntry {
            key: key.into(),
            start,
            count,
        };
        let reply = |grants| GetSeqBatchResponse {
            grants,
            epoch: Some(tso_proto::v1::EpochWire { hi: 2, lo: 3 }),
        };
        let asked = [("a", 2), ("b", 1)];
        let blocks = check_batch(&asked, &reply(vec![grant("a", 5, 2), grant("b", 0, 1)])).unwrap();
        let epoch = tso_core::Epoch::from_parts(2, 3).get();
        assert_eq!(
            blocks,
            vec![
                WireBlock {
                    start: 5,
                    count: 2,
                    epoch
                },
                WireBlock {
                    start: 0,
                    count: 1,
                    epoch
                }
            ]
        );
        assert!(check_batch(&asked, &reply(vec![grant("a", 5, 2)])).is_err());
        assert!(check_batch(&asked, &reply(vec![grant("b", 0, 1), grant("a", 5, 2)])).is_err());
        assert!(check_batch(&asked, &reply(vec![grant("a", 5, 3), grant("b", 0, 1)])).is_err());
        let no_epoch = GetSeqBatchResponse {
            epoch: None,
            ..reply(vec![grant("a", 5, 2), grant("b", 0, 1)])
        };
        assert!(check_batch(&asked, &no_epoch).is_err());
    }

    #[test]
    fn endpoints_get_a_scheme() {
        let plain = Dial::default();
        assert_eq!(plain.uri("127.0.0.1:1"), "http://127.0.0.1:1");
        assert_eq!(plain.uri("http://h:2"), "http://h:2");
        assert_eq!(plain.uri("https://h:2"), "https://h:2");
        assert!(plain.endpoint("https://h:2").is_err());
        let tls = Dial::new(Some(ClientTlsConfig::new()));
        assert_eq!(tls.uri("h:2"), "https://h:2");
        assert_eq!(tls.uri("http://h:2"), "http://h:2");
    }

    #[tokio::test]
    async fn callers_share_a_bounded_pool_per_endpoint() {
        let targets = Targets::new(
            &["127.0.0.1:1".into()],
            2,
            Duration::from_secs(1),
            Dial::default(),
        )
        .unwrap();
        for slot in 0..5 {
            targets.client("127.0.0.1:1", slot).unwrap();
            targets.client("http://127.0.0.1:9", slot).unwrap();
        }
        let pools = targets.pools.lock().unwrap();
        assert_eq!(pools.len(), 2);
        assert!(pools.values().all(|pool| pool.len() == 2));
        drop(pools);
        assert!(Targets::new(&["a:1".into()], 0, Duration::from_secs(1), Dial::default()).is_err());
        assert!(
            Targets::new(
                &["a:1".into()],
                CONNECTIONS_MAX + 1,
                Duration::from_secs(1),
                Dial::default()
            )
            .is_err()
        );
        assert!(Targets::new(&[], 1, Duration::from_secs(1), Dial::default()).is_err());
    }
}
