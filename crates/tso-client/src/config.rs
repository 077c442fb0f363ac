//! Client options, their defaults and their bounds.
//!
//! Invariant: a [`Config`] only exists validated (every limit at least 1, every duration above
//! zero, backoff base at most its cap), so the rest of the crate never re-checks it.

use std::time::Duration;

use tonic::transport::ClientTlsConfig;
use tso_proto::tls::{CaCertificates, TlsIdentity};

use crate::endpoint::{Scheme, Target, parse_address};
use crate::{Client, Error, Result};

/// Per-attempt deadline. A healthy `GetTs` takes well under a millisecond and at worst waits
/// for one window extension (an fsync or a consensus round, tens of ms); a node silent for 1 s
/// is treated as hung, which still leaves several attempts inside the overall deadline.
pub const ATTEMPT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(1);

/// Overall deadline of one call, queueing included. Covers a failover: an election (about 1-2 s
/// of raft election timeout) plus the new leader's fence (one durable write), with margin.
pub const OVERALL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);

/// Attempts that may fail with a transport error, a timeout or `UNAVAILABLE` before a call
/// gives up. Following a leader hint spends none. 8 tries every node of a 3- or 5-node cluster
/// at least once, with backoff in between.
pub const ATTEMPTS_MAX_DEFAULT: u32 = 8;

/// First backoff step. Full jitter draws the sleep from `0..=min(cap, base * 2^n)`; 20 ms is
/// about one fence retry step on the server (SEMANTICS §5 uses 25 ms).
pub const BACKOFF_BASE_DEFAULT: Duration = Duration::from_millis(20);

/// Largest backoff step: 20 ms doubled five times is 640 ms; capping at 500 ms keeps a retry
/// inside every second of an election.
pub const BACKOFF_CAP_DEFAULT: Duration = Duration::from_millis(500);

/// Callers that may wait for a dispatch. One waiter is about 64 bytes, so a full queue holds
/// about 4 MiB; far above the thousands of concurrent callers one process has, small enough
/// that an overloaded client fails fast with `QueueFull` instead of growing without bound.
pub const QUEUED_CALLERS_MAX_DEFAULT: usize = 65_536;

/// `GetTs` RPCs in flight at once. One RPC carries every caller queued at that moment (up to
/// 262144 timestamps), so a few in flight keep the link busy while the next batch forms: with 4,
/// a burst is split across at most 4 round trips instead of waiting for one. More add server
/// load on small machines for little gain.
pub const IN_FLIGHT_RPCS_MAX_DEFAULT: usize = 4;

/// How long an address that answered the timestamp stream with `UNIMPLEMENTED` (a plain
/// `tsoracle.v1` server) gets unary `GetTs` before the stream is tried again. Servers are
/// upgraded rarely; asking again costs one round trip every 5 minutes.
pub(crate) const STREAM_UNSUPPORTED_RECHECK: Duration = Duration::from_secs(300);

/// Leader hints followed in one call before hints are ignored. A real cluster redirects once or
/// twice; more means hints are cycling between nodes, and rotation takes over.
pub(crate) const REDIRECTS_PER_CALL_MAX: u32 = 8;

/// How soon a call asks a hinted leader again when it answers that it does not serve yet (no
/// hint, or one naming itself): a leader handing off names its successor before the successor
/// has won its election and run its fence, which takes a few milliseconds on a LAN.
pub(crate) const HINTED_LEADER_POLL: Duration = Duration::from_millis(2);

/// Polls of one hinted leader per call before rotation (with its backoff) takes over: 25 polls
/// cover 50 ms, well past a handoff's election and fence on a LAN; past them it is an election.
pub(crate) const HINTED_LEADER_POLLS_MAX: u32 = 25;

/// Connections the client keeps: the configured endpoints plus hinted leaders. A cluster has a
/// handful of nodes; the cap keeps a stream of bogus hints from growing the map.
pub(crate) const CHANNELS_MAX: usize = 64;

/// How long a TLS handshake may take. It is part of connecting, so the per-attempt deadline
/// bounds it too; this only stops a server that accepts and never answers from holding a
/// connection attempt past it.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS for `https://` endpoints: the CA that server certificates must chain to (no system
/// roots are used), and for mutual TLS the client's own certificate and key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    ca: CaCertificates,
    identity: Option<TlsIdentity>,
}

impl ClientTls {
    /// Trust servers whose certificate `ca` signed.
    pub fn new(ca: CaCertificates) -> Self {
        Self { ca, identity: None }
    }

    /// Present `identity` to servers that require client certificates (mutual TLS).
    pub fn identity(mut self, identity: TlsIdentity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The same TLS as tonic takes it, for callers that dial raw gRPC channels beside the
    /// client.
    pub fn tonic_config(&self) -> ClientTlsConfig {
        tso_proto::tls::install_crypto_provider();
        let config = ClientTlsConfig::new()
            .ca_certificate(self.ca.to_tonic())
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        match &self.identity {
            Some(identity) => config.identity(identity.to_tonic()),
            None => config,
        }
    }
}

/// Validated options shared by every part of the client.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) endpoints: Vec<Target>,
    /// Used for every `https` target, configured or hinted; `None` when no TLS is configured
    /// (then no target is `https`, except a hint, which then cannot connect).
    pub(crate) tls: Option<ClientTlsConfig>,
    pub(crate) attempt_timeout: Duration,
    pub(crate) overall_timeout: Duration,
    pub(crate) attempts_max: u32,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_cap: Duration,
    pub(crate) queued_callers_max: usize,
    pub(crate) in_flight_rpcs_max: usize,
}

/// Options of a [`Client`]; start from [`Client::builder`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    attempt_timeout: Duration,
    overall_timeout: Duration,
    attempts_max: u32,
    backoff_base: Duration,
    backoff_cap: Duration,
    queued_callers_max: usize,
    in_flight_rpcs_max: usize,
    tls: Option<ClientTls>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        Self {
            attempt_timeout: ATTEMPT_TIMEOUT_DEFAULT,
            overall_timeout: OVERALL_TIMEOUT_DEFAULT,
            attempts_max: ATTEMPTS_MAX_DEFAULT,
            backoff_base: BACKOFF_BASE_DEFAULT,
            backoff_cap: BACKOFF_CAP_DEFAULT,
            queued_callers_max: QUEUED_CALLERS_MAX_DEFAULT,
            in_flight_rpcs_max: IN_FLIGHT_RPCS_MAX_DEFAULT,
            tls: None,
        }
    }
}

impl ClientBuilder {
    /// Deadline of one RPC attempt, connecting included.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Deadline of a whole call, from the moment it is made (queueing, retries, redirects and
    /// backoff included).
    pub fn overall_timeout(mut self, timeout: Duration) -> Self {
        self.overall_timeout = timeout;
        self
    }

    /// Attempts that may fail (transport error, timeout, `UNAVAILABLE`) before a call gives up.
    pub fn attempts_max(mut self, attempts: u32) -> Self {
        self.attempts_max = attempts;
        self
    }

    /// Full-jitter exponential backoff: the n-th retry sleeps a random time in
    /// `0..=min(cap, base * 2^n)`.
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_cap = cap;
        self
    }

    /// Callers that may wait for a dispatch; one more gets [`Error::QueueFull`].
    pub fn queued_callers_max(mut self, callers: usize) -> Self {
        self.queued_callers_max = callers;
        self
    }

    /// `GetTs` RPCs in flight at once.
    pub fn in_flight_rpcs_max(mut self, rpcs: usize) -> Self {
        self.in_flight_rpcs_max = rpcs;
        self
    }

    /// TLS for `https://` endpoints, and for leader hints received over them (a hint never
    /// leads from `https` to plaintext). With TLS set, a scheme-less endpoint means `https`.
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Validates the options and starts a client over `endpoints` (`host:port`, or with an
    /// `http://` or `https://` scheme). Dials lazily: the first call connects. Must run inside a
    /// tokio runtime, which hosts the client's background task.
    pub async fn connect<I, S>(self, endpoints: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let config = self.validate(endpoints)?;
        Ok(Client::start(config))
    }

    pub(crate) fn validate<I, S>(self, endpoints: I) -> Result<Config>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let has_tls = self.tls.is_some();
        let endpoints = endpoints
            .into_iter()
            .map(|raw| parse_endpoint(raw.as_ref(), has_tls))
            .collect::<Result<Vec<_>>>()?;
        let invalid = |reason: &str| {
            Err(Error::InvalidConfig {
                reason: reason.into(),
            })
        };
        if endpoints.is_empty() {
            return invalid("no endpoints: give at least one host:port");
        }
        if self.attempt_timeout.is_zero() || self.overall_timeout.is_zero() {
            return invalid("timeouts must be above zero");
        }
        if self.attempts_max == 0 || self.queued_callers_max == 0 || self.in_flight_rpcs_max == 0 {
            return invalid("attempts, queued callers and in-flight RPCs must be at least 1");
        }
        if self.backoff_base.is_zero() || self.backoff_base > self.backoff_cap {
            return invalid("backoff base must be above zero and at most the cap");
        }
        Ok(Config {
            endpoints,
            tls: self.tls.as_ref().map(ClientTls::tonic_config),
            attempt_timeout: self.attempt_timeout,
            overall_timeout: self.overall_timeout,
            attempts_max: self.attempts_max,
            backoff_base: self.backoff_base,
            backoff_cap: self.backoff_cap,
            queued_callers_max: self.queued_callers_max,
            in_flight_rpcs_max: self.in_flight_rpcs_max,
        })
    }
}

/// A configured endpoint; scheme-less means `https` when TLS is configured, else `http`.
/// `https` without TLS configured is refused: no system roots are trusted, so such an endpoint
/// could never connect, which is a configuration error, not something to retry until the
/// deadline.
fn parse_endpoint(raw: &str, has_tls: bool) -> Result<Target> {
    let invalid = |reason: String| Error::InvalidEndpoint {
        endpoint: raw.into(),
        reason,
    };
    let default_scheme = if has_tls { Scheme::Https } else { Scheme::Http };
    let target = parse_address(raw, default_scheme).map_err(invalid)?;
    if target.scheme() == Scheme::Https && !has_tls {
        return Err(invalid(
            "https needs a CA certificate to check the server with: configure TLS \
             (ClientBuilder::tls; on the command line --tls-ca FILE)"
                .into(),
        ));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_validated() {
        let ok = ClientBuilder::default()
            .validate(["a:1", "http://b:2"])
            .unwrap();
        assert_eq!(ok.endpoints.len(), 2);
        let none: [&str; 0] = [];
        assert!(ClientBuilder::default().validate(none).is_err());
        assert!(ClientBuilder::default().validate(["a"]).is_err());
        assert!(ClientBuilder::default().validate(["https://a:1"]).is_err());
        let zero = ClientBuilder::default().attempts_max(0).validate(["a:1"]);
        assert!(matches!(zero, Err(Error::InvalidConfig { .. })));
        let inverted = ClientBuilder::default()
            .backoff(Duration::from_secs(2), Duration::from_secs(1))
            .validate(["a:1"]);
        assert!(inverted.is_err());
        let no_queue = ClientBuilder::default()
            .queued_callers_max(0)
            .validate(["a:1"]);
        assert!(no_queue.is_err());
    }

    #[test]
    fn https_needs_tls_and_tls_makes_scheme_less_endpoints_https() {
        let no_ca = ClientBuilder::default().validate(["https://a:1"]);
        assert!(
            matches!(&no_ca, Err(Error::InvalidEndpoint { reason, .. }) if reason.contains("CA")),
            "{no_ca:?}"
        );
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = CaCertificates::from_pem(params.self_signed(&key).unwrap().pem()).unwrap();
        let config = ClientBuilder::default()
            .tls(ClientTls::new(ca))
            .validate(["a:1", "https://b:2", "http://c:3"])
            .unwrap();
        let uris: Vec<_> = config.endpoints.iter().map(Target::uri).collect();
        assert_eq!(uris, ["https://a:1", "https://b:2", "http://c:3"]);
        assert!(config.tls.is_some());
    }
}
