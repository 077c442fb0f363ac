//! The etcd backend: leadership by a leader key held under an etcd lease, the leader lease
//! (SEMANTICS G3) from that lease's keep-alives, and the whole [`OracleState`] in one key
//! written only by fenced transactions. Nothing is kept on local disk. See `docs/etcd.md`.
//!
//! Keys, under the configured prefix `P`:
//!
//! - `P/leader`: `"<node_id> <client_addr>"`, attached to the leader's etcd lease. Its create
//!   revision is the high half of the leader's epoch (the node id the low half): create
//!   revisions only grow, so epochs only grow.
//! - `P/state`: a version byte, then the postcard encoding of the [`OracleState`].
//!
//! An apply is one compare-and-swap transaction: it writes only if the leader key is still the
//! one this node created under its lease (a deposed leader's write never lands) and the state
//! key is still at the revision this node computed from (so a write dropped by a cancelled
//! call, landing late, is never overwritten by a state that lacks it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tso_core::Epoch;
use tso_proto::etcd::TxnRequest;
use tso_proto::etcd::compare::{CompareTarget, TargetUnion};
use tso_proto::etcd::kv_client::KvClient;
use tso_proto::etcd::lease_client::LeaseClient;

use super::{Backend, BackendError, BoxFuture, Leadership, OracleCommand, OracleState, Stored};

mod campaign;
mod client;
pub mod leader_lease;

pub use campaign::POLL_INTERVAL;
pub use leader_lease::unsafe_etcd_ignore_lease;

/// The default TTL of the etcd lease that holds the leader key.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);
/// The shortest TTL accepted: keep-alives go every third of it, and etcd raises shorter TTLs to
/// its own minimum (1.5 election timeouts, rounded up to whole seconds: 2 s by default).
pub const MIN_LEASE_TTL: Duration = Duration::from_secs(2);
/// The deadline of each call to etcd (reads, transactions, grants, revokes).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The version byte in front of the encoded state.
const STATE_VERSION: u8 = 1;
/// How many times an apply recomputes after the state key moved under it.
const MAX_CAS_ATTEMPTS: usize = 8;

/// The switch of [`unsafe_etcd_skip_fence`].
static SKIP_FENCE: AtomicBool = AtomicBool::new(false);

/// FOR THE CHECKER'S POSITIVE CONTROL ONLY: from now on every apply writes the state key
/// blindly, without the transaction's compares (the leader key's create revision and lease,
/// the state key's mod revision). A deposed leader's write then lands over its successor's,
/// and calls it queued before it lost leadership are answered from its stale state. For the
/// whole process.
pub fn unsafe_etcd_skip_fence() {
    SKIP_FENCE.store(true, Ordering::Relaxed);
}

/// How to reach etcd, and who this node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// etcd client URLs (`http://host:port`, or `host:port`); calls are balanced over them.
    pub endpoints: Vec<String>,
    /// The key prefix of this oracle (e.g. `/tso/default`); every key is under it.
    pub prefix: String,
    /// This node's id: the low half of its epochs. Distinct per node.
    pub node_id: u64,
    /// This node's oracle client address (`host:port`), put in leader hints.
    pub client_addr: String,
    /// The TTL of the etcd lease behind leadership: whole seconds, at least [`MIN_LEASE_TTL`].
    pub lease_ttl: Duration,
    /// TLS to etcd: `None` speaks plaintext (`http://` endpoints).
    pub tls: Option<EtcdTls>,
}

/// How this node speaks TLS to etcd: which CA signs the members' server certificates, and the
/// certificate it presents itself when etcd asks for one (`--client-cert-auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: crate::tls::CaCertificates,
    pub identity: Option<crate::tls::TlsIdentity>,
    /// The name the members' certificates must carry, when it is not the endpoint's host.
    pub server_name: Option<String>,
}

impl EtcdTls {
    fn client_config(&self) -> ClientTlsConfig {
        crate::tls::install_crypto_provider();
        let mut config = ClientTlsConfig::new()
            .ca_certificate(self.ca.to_tonic())
            .timeout(crate::tls::HANDSHAKE_TIMEOUT);
        if let Some(identity) = &self.identity {
            config = config.identity(identity.to_tonic());
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        config
    }
}

impl EtcdConfig {
    /// A configuration with the default lease TTL.
    pub fn new(
        endpoints: Vec<String>,
        prefix: impl Into<String>,
        node_id: u64,
        client_addr: impl Into<String>,
    ) -> Self {
        Self {
            endpoints,
            prefix: prefix.into(),
            node_id,
            client_addr: client_addr.into(),
            lease_ttl: DEFAULT_LEASE_TTL,
            tls: None,
        }
    }
}

/// Why the backend could not be opened (a configuration error: nothing is contacted yet).
#[derive(Debug, thiserror::Error)]
pub enum EtcdOpenError {
    #[error("no etcd endpoint given")]
    NoEndpoints,
    #[error("bad etcd endpoint {endpoint:?}: {reason}")]
    BadEndpoint { endpoint: String, reason: String },
    #[error("the etcd lease TTL must be whole seconds and at least {MIN_LEASE_TTL:?}, got {0:?}")]
    LeaseTtl(Duration),
    #[error("the key prefix must not be empty")]
    EmptyPrefix,
    #[error("the client address {0:?} must be non-empty and without spaces")]
    ClientAddr(String),
}

/// The keys of one oracle.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    leader: Vec<u8>,
    state: Vec<u8>,
}

/// The term this node leads: its epoch, the leader key's create revision, and the etcd lease
/// that key is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Term {
    epoch: Epoch,
    revision: i64,
    lease_id: i64,
}

/// The state as this node last wrote or read it, and the state key's mod revision then.
#[derive(Debug, Clone)]
struct Cached {
    epoch: Epoch,
    state: OracleState,
    mod_revision: i64,
}

/// What the campaign task and the calls share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    clock: leader_lease::LeaderLease,
    term: Mutex<Option<Term>>,
    /// The highest epoch ever published on the leadership watch.
    reported: Mutex<Option<Epoch>>,
    /// Wakes the campaign task to read the leader key now (an apply saw it move).
    recheck: Notify,
    cache: tokio::sync::Mutex<Option<Cached>>,
}

/// The etcd backend. Dropping it stops its campaign and revokes its etcd lease (in the
/// background), so another node can lead at once.
pub struct EtcdBackend {
    etcd: client::Etcd,
    keys: Keys,
    node_id: u64,
    shared: Arc<Shared>,
    leadership: watch::Receiver<Leadership>,
    task: JoinHandle<()>,
}

/// The endpoint of one etcd URL: `https://` needs `tls`, `http://` refuses it, and a bare
/// `host:port` takes the scheme `tls` implies.
fn endpoint(url: &str, tls: Option<&EtcdTls>) -> Result<Endpoint, EtcdOpenError> {
    let bad = |reason: String| EtcdOpenError::BadEndpoint {
        endpoint: url.to_owned(),
        reason,
    };
    let full = match (url.split_once("://"), tls) {
        (None, None) => format!("http://{url}"),
        (None, Some(_)) => format!("https://{url}"),
        (Some(("http", _)), None) | (Some(("https", _)), Some(_)) => url.to_owned(),
        (Some(("http", _)), Some(_)) => {
            return Err(bad(
                "plaintext http:// while TLS to etcd is configured: use https://".into(),
            ));
        }
        (Some(("https", _)), None) => {
            return Err(bad(
                "https:// needs the CA that signed etcd's certificates (--etcd-tls-ca)".into(),
            ));
        }
        (Some((scheme, _)), _) => {
            return Err(bad(format!(
                "unknown scheme {scheme:?}: use http:// or https://"
            )));
        }
    };
    let mut endpoint = Endpoint::from_shared(full).map_err(|e| bad(e.to_string()))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls.client_config())
            .map_err(|e| bad(e.to_string()))?;
    }
    Ok(endpoint
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(2)))
}

impl EtcdBackend {
    /// Checks the configuration and starts campaigning (lazily connected: an unreachable etcd
    /// shows as `Unknown` leadership, not as an error here). Needs a tokio runtime.
    pub async fn open(config: EtcdConfig) -> Result<EtcdBackend, EtcdOpenError> {
        let ttl = config.lease_ttl;
        if ttl < MIN_LEASE_TTL || ttl.subsec_nanos() != 0 {
            return Err(EtcdOpenError::LeaseTtl(ttl));
        }
        let prefix = config.prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(EtcdOpenError::EmptyPrefix);
        }
        if config.client_addr.is_empty() || config.client_addr.contains(char::is_whitespace) {
            return Err(EtcdOpenError::ClientAddr(config.client_addr));
        }
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| endpoint(e, config.tls.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        let channel = match endpoints.len() {
            0 => return Err(EtcdOpenError::NoEndpoints),
            1 => endpoints[0].connect_lazy(),
            _ => Channel::balance_list(endpoints.into_iter()),
        };
        let etcd = client::Etcd {
            kv: KvClient::new(channel.clone()),
            lease: LeaseClient::new(channel),
            timeout: REQUEST_TIMEOUT,
        };
        let keys = Keys {
            leader: format!("{prefix}/leader").into_bytes(),
            state: format!("{prefix}/state").into_bytes(),
        };
        let shared = Arc::new(Shared::default());
        let (tx, leadership) = watch::channel(Leadership::Unknown);
        let campaign = campaign::Campaign {
            etcd: etcd.clone(),
            keys: keys.clone(),
            node_id: config.node_id,
            client_addr: config.client_addr,
            ttl,
            shared: Arc::clone(&shared),
            tx,
        };
        let task = tokio::spawn(campaign.run());
        Ok(EtcdBackend {
            etcd,
            keys,
            node_id: config.node_id,
            shared,
            leadership,
            task,
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// Stops campaigning and gives leadership up now: grants stop, the leadership watch
    /// closes, and the etcd lease is revoked (deleting the leader key) before this returns,
    /// unless etcd does not answer (then the key expires with the lease).
    pub async fn shutdown(&self) {
        self.task.abort();
        self.shared.clock.clear_all();
        let term = self.shared.term.lock().expect("term lock").take();
        if let Some(term) = term {
            let _ = self.etcd.revoke(term.lease_id).await;
        }
    }

    /// Refuses `epoch` unless this node leads in it; returns the term to fence the write with.
    fn check_epoch(&self, epoch: Epoch) -> Result<Term, BackendError> {
        let term = *self.shared.term.lock().expect("term lock");
        match term {
            Some(t) if t.epoch == epoch => Ok(t),
            Some(t) => Err(BackendError::Fenced {
                expected: epoch,
                current: t.epoch,
            }),
            None => Err(match self.leadership.borrow().clone() {
                Leadership::Follower {
                    leader_endpoint,
                    leader_epoch,
                } => BackendError::NotLeader {
                    leader_endpoint,
                    leader_epoch,
                },
                _ => BackendError::NotLeader {
                    leader_endpoint: None,
                    leader_epoch: None,
                },
            }),
        }
    }

    /// A linearizable read of the state and the state key's mod revision (0 when absent).
    async fn read_state(&self) -> Result<(OracleState, i64), BackendError> {
        match self.etcd.get(&self.keys.state).await? {
            Some(kv) => Ok((decode(&kv.value)?, kv.mod_revision)),
            None => Ok((OracleState::default(), 0)),
        }
    }

    async fn load_inner(&self) -> Result<OracleState, BackendError> {
        let (state, mod_revision) = self.read_state().await?;
        let term = *self.shared.term.lock().expect("term lock");
        if let (Some(term), Ok(mut cache)) = (term, self.shared.cache.try_lock())
            && cache
                .as_ref()
                .is_none_or(|c| c.epoch != term.epoch || c.mod_revision < mod_revision)
        {
            *cache = Some(Cached {
                epoch: term.epoch,
                state: state.clone(),
                mod_revision,
            });
        }
        Ok(state)
    }

    async fn apply_inner(&self, cmd: OracleCommand, epoch: Epoch) -> Result<Stored, BackendError> {
        cmd.check(epoch)?;
        let term = self.check_epoch(epoch)?;
        let mut cache = self.shared.cache.lock().await;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let cached = match cache.as_ref().filter(|c| c.epoch == epoch) {
                Some(c) => c.clone(),
                None => {
                    let (state, mod_revision) = self.read_state().await?;
                    Cached {
                        epoch,
                        state,
                        mod_revision,
                    }
                }
            };
            let mut next = cached.state.clone();
            next.apply(&cmd);
            let mut txn = TxnRequest {
                compare: vec![
                    client::equal(
                        &self.keys.leader,
                        CompareTarget::Create,
                        TargetUnion::CreateRevision(term.revision),
                    ),
                    client::equal(
                        &self.keys.leader,
                        CompareTarget::Lease,
                        TargetUnion::Lease(term.lease_id),
                    ),
                    client::equal(
                        &self.keys.state,
                        CompareTarget::Mod,
                        TargetUnion::ModRevision(cached.mod_revision),
                    ),
                ],
                success: vec![client::put_op(&self.keys.state, encode(&next), 0)],
                failure: vec![
                    client::range_op(&self.keys.leader),
                    client::range_op(&self.keys.state),
                ],
            };
            if SKIP_FENCE.load(Ordering::Relaxed) {
                txn.compare.clear();
            }
            // Until this call answers, the cache may lack a write that lands: drop it.
            *cache = None;
            let resp = self.etcd.txn(txn).await?;
            if resp.succeeded {
                *cache = Some(Cached {
                    epoch,
                    state: next.clone(),
                    mod_revision: client::revision(resp.header.as_ref()),
                });
                next.includes(&cmd)?;
                return Ok(Stored {
                    high_water_ms: next.high_water_ms,
                });
            }
            let leader = client::range_result(&resp, 0)?;
            match leader {
                Some(kv) if kv.create_revision == term.revision && kv.lease == term.lease_id => {}
                other => {
                    // Deposed: grants stop now, and the campaign task looks at once.
                    self.shared.clock.clear(epoch);
                    self.shared.recheck.notify_one();
                    return Err(match other {
                        Some(kv) => BackendError::Fenced {
                            expected: epoch,
                            current: campaign::leader_of(&kv).0,
                        },
                        None => BackendError::NotLeader {
                            leader_endpoint: None,
                            leader_epoch: None,
                        },
                    });
                }
            }
            // The state key moved (a write of an earlier, dropped call landed late).
            let (state, mod_revision) = match client::range_result(&resp, 1)? {
                Some(kv) => (decode(&kv.value)?, kv.mod_revision),
                None => (OracleState::default(), 0),
            };
            *cache = Some(Cached {
                epoch,
                state,
                mod_revision,
            });
        }
        Err(BackendError::Transient(format!(
            "the state key moved under {MAX_CAS_ATTEMPTS} attempts of one apply"
        )))
    }
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.clock.clear_all();
        let term = self.shared.term.lock().expect("term lock").take();
        if let (Some(term), Ok(runtime)) = (term, tokio::runtime::Handle::try_current()) {
            let etcd = self.etcd.clone();
            runtime.spawn(async move {
                let _ = etcd.revoke(term.lease_id).await;
            });
        }
    }
}

/// Reads this oracle's state key (`P/state`) once, for `tso export --backend etcd`: a
/// linearizable read, safe against a live cluster (it writes nothing and takes no part in the
/// election). Returns the state and the key's mod revision, or `None` when the key is absent
/// (nothing was ever stored under `prefix`). Errors are for an operator to read.
pub async fn read_state_key(
    endpoints: &[String],
    prefix: &str,
    tls: Option<&EtcdTls>,
) -> Result<Option<(OracleState, i64)>, String> {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return Err(EtcdOpenError::EmptyPrefix.to_string());
    }
    let endpoints = endpoints
        .iter()
        .map(|e| endpoint(e, tls))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let channel = match endpoints.len() {
        0 => return Err(EtcdOpenError::NoEndpoints.to_string()),
        1 => endpoints[0].connect_lazy(),
        _ => Channel::balance_list(endpoints.into_iter()),
    };
    let etcd = client::Etcd {
        kv: KvClient::new(channel.clone()),
        lease: LeaseClient::new(channel),
        timeout: REQUEST_TIMEOUT,
    };
    let key = format!("{prefix}/state").into_bytes();
    match etcd.get(&key).await.map_err(|e| e.to_string())? {
        Some(kv) => Ok(Some((
            decode(&kv.value).map_err(|e| e.to_string())?,
            kv.mod_revision,
        ))),
        None => Ok(None),
    }
}

/// The state key's value: [`STATE_VERSION`], then postcard.
fn encode(state: &OracleState) -> Vec<u8> {
    let mut buf = vec![STATE_VERSION];
    buf.extend(postcard::to_stdvec(state).expect("an OracleState encodes"));
    buf
}

fn decode(bytes: &[u8]) -> Result<OracleState, BackendError> {
    let corrupt = |what: String| {
        BackendError::Permanent(format!(
            "the oracle state stored in etcd is corrupt: {what}"
        ))
    };
    let (&version, body) = bytes.split_first().ok_or_else(|| corrupt("empty".into()))?;
    if version != STATE_VERSION {
        return Err(corrupt(format!(
            "version {version}, this binary reads {STATE_VERSION}"
        )));
    }
    let (state, rest) =
        postcard::take_from_bytes::<OracleState>(body).map_err(|e| corrupt(e.to_string()))?;
    if !rest.is_empty() {
        return Err(corrupt(format!("{} bytes after the state", rest.len())));
    }
    Ok(state)
}

impl Backend for EtcdBackend {
    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.clone()
    }

    fn leader_lease_valid(&self, epoch: Epoch) -> bool {
        self.shared.clock.is_valid(epoch)
    }

    fn load(&self) -> BoxFuture<'_, Result<OracleState, BackendError>> {
        Box::pin(self.load_inner())
    }

    fn apply(
        &self,
        cmd: OracleCommand,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<Stored, BackendError>> {
        Box::pin(self.apply_inner(cmd, epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_round_trips_and_damage_is_permanent() {
        let mut state = OracleState {
            high_water_ms: 1_700_000_000_000,
            lease_term: 12,
            leases: b"lease set".to_vec(),
            ..Default::default()
        };
        state.sequences.insert("invoice".into(), 42);
        let bytes = encode(&state);
        assert_eq!(bytes[0], STATE_VERSION);
        assert_eq!(decode(&bytes), Ok(state));
        let permanent = |r| matches!(r, Err(BackendError::Permanent(_)));
        assert!(permanent(decode(&[])));
        assert!(permanent(decode(&[2])));
        assert!(permanent(decode(&bytes[..bytes.len() - 1])));
        let mut long = bytes.clone();
        long.push(0);
        assert!(permanent(decode(&long)));
    }

    #[test]
    fn unavailable_is_transient_and_a_refusal_permanent() {
        let transient = |code| {
            matches!(
                client::classify("x", &tonic::Status::new(code, "m")),
                BackendError::Transient(_)
            )
        };
        assert!(transient(tonic::Code::Unavailable));
        assert!(transient(tonic::Code::DeadlineExceeded));
        assert!(!transient(tonic::Code::InvalidArgument));
        assert!(!transient(tonic::Code::PermissionDenied));
        assert!(!transient(tonic::Code::DataLoss));
    }
}
