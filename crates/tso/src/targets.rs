//! Connections to the configured endpoints, following leader hints (PROTOCOL.md, "Errors").
//!
//! Each endpoint gets a fixed number of HTTP/2 connections, made lazily and shared by callers
//! (`slot % connections`). A caller keeps its client and switches only when the server says
//! "not leader" with a hint, or when its endpoint is unreachable (then it rotates through the
//! configured list).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use prost::Message;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tso_proto::LEADER_HINT_KEY;
use tso_proto::v1::tso_service_client::TsoServiceClient;

/// Connections per endpoint at most: each is one HTTP/2 connection with its own task.
pub const CONNECTIONS_MAX: usize = 64;

pub struct Targets {
    endpoints: Vec<String>,
    connections: usize,
    timeout: Duration,
    pools: Mutex<HashMap<String, Vec<Channel>>>,
}

impl Targets {
    /// `endpoints` as `host:port` or `http://host:port`; `connections` per endpoint; every
    /// call times out after `timeout`.
    pub fn new(
        endpoints: &[String],
        connections: usize,
        timeout: Duration,
    ) -> anyhow::Result<Targets> {
        anyhow::ensure!(!endpoints.is_empty(), "give at least one endpoint");
        anyhow::ensure!(
            (1..=CONNECTIONS_MAX).contains(&connections),
            "connections must be 1 to {CONNECTIONS_MAX}, not {connections}"
        );
        Ok(Targets {
            endpoints: endpoints.iter().map(|e| uri(e)).collect(),
            connections,
            timeout,
            pools: Mutex::new(HashMap::new()),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A client on connection `slot % connections` of `endpoint`.
    pub fn client(&self, endpoint: &str, slot: usize) -> anyhow::Result<TsoServiceClient<Channel>> {
        let endpoint = uri(endpoint);
        let mut pools = self.pools.lock().expect("targets lock");
        if !pools.contains_key(&endpoint) {
            let mut pool = Vec::with_capacity(self.connections);
            for _ in 0..self.connections {
                let channel = Endpoint::from_shared(endpoint.clone())
                    .with_context(|| format!("bad endpoint {endpoint:?}"))?
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

/// `http://host:port` for a scheme-less `host:port`.
pub fn uri(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
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
