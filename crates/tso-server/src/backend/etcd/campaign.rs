//! The campaign task: wins, holds and loses the leader key, keeps the etcd lease alive, and
//! publishes what this node knows of leadership.
//!
//! One task per backend. A round reads the leader key: held by someone → follow it (polling
//! with a linearizable read every [`POLL_INTERVAL`]) until it is gone; absent → grant a lease
//! and campaign with a transaction that creates the key only if it does not exist. A winner
//! leads until its local lease deadline passes without a renewal, etcd answers that the lease
//! is gone, or the key is seen deleted or owned by another lease; it then clears its lease
//! (grants stop at once), publishes `Unknown`, revokes its etcd lease and starts a new round
//! (a new lease, a new key, a higher epoch).
//!
//! Invariant: the published epoch never goes down; `Leader` is published only after the term
//! and the lease clock are set, and both are cleared before anything else is published.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tso_core::Epoch;
use tso_proto::etcd::compare::{CompareTarget, TargetUnion};
use tso_proto::etcd::{KeyValue, LeaseKeepAliveRequest, LeaseKeepAliveResponse, TxnRequest};

use super::client::{self, Etcd, equal, put_op, range_op};
use super::{Keys, Shared, Term, leader_lease};
use crate::backend::{BackendError, Leadership};

/// How often a node reads the leader key (followers, to campaign when it is gone; the leader,
/// to notice that it was deposed).
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The longest wait between two failed rounds.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// While campaign rounds keep failing, how often that is logged at warn level.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// The value of the leader key: `"<node_id> <client_addr>"`.
pub(super) fn leader_value(node_id: u64, client_addr: &str) -> Vec<u8> {
    format!("{node_id} {client_addr}").into_bytes()
}

/// The leadership a leader key tells of: its epoch (create revision, node id) and hint.
pub(super) fn leader_of(kv: &KeyValue) -> (Epoch, Option<String>) {
    let text = std::str::from_utf8(&kv.value).unwrap_or("");
    let (id, addr) = match text.split_once(' ') {
        Some((id, addr)) => (id.parse::<u64>().ok(), Some(addr.to_owned())),
        None => (None, None),
    };
    let epoch = Epoch::from_parts(kv.create_revision.max(0) as u64, id.unwrap_or(0));
    (epoch, addr.filter(|a| !a.is_empty()))
}

pub(super) struct Campaign {
    pub etcd: Etcd,
    pub keys: Keys,
    pub node_id: u64,
    pub client_addr: String,
    pub ttl: Duration,
    pub shared: Arc<Shared>,
    pub tx: watch::Sender<Leadership>,
}

/// Why leading ended.
#[derive(Debug)]
enum Lost {
    LeaseRanOut,
    LeaseGone,
    Deposed,
}

impl Campaign {
    pub async fn run(mut self) {
        let mut backoff = POLL_INTERVAL;
        // Since when rounds fail, and when that was last logged at warn level: an etcd that
        // cannot be reached (wrong address, TLS refused) is said at once, then every
        // FAILURE_LOG_EVERY, not at every retry.
        let mut failing: Option<(Instant, Instant)> = None;
        loop {
            match self.round().await {
                Ok(()) => {
                    backoff = POLL_INTERVAL;
                    if let Some((since, _)) = failing.take() {
                        tracing::info!(
                            node_id = self.node_id,
                            failing_ms = since.elapsed().as_millis() as u64,
                            "etcd answers again"
                        );
                    }
                }
                Err(e) => {
                    let now = Instant::now();
                    match &mut failing {
                        None => {
                            failing = Some((now, now));
                            tracing::warn!(node_id = self.node_id, error = %e, "etcd campaign round failed; retrying");
                        }
                        Some((since, logged)) if now - *logged >= FAILURE_LOG_EVERY => {
                            *logged = now;
                            tracing::warn!(
                                node_id = self.node_id,
                                error = %e,
                                failing_ms = (now - *since).as_millis() as u64,
                                "etcd campaign rounds still fail; retrying"
                            );
                        }
                        Some(_) => {
                            tracing::debug!(node_id = self.node_id, error = %e, "etcd campaign round failed");
                        }
                    }
                    self.publish(Leadership::Unknown);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Publishes `next` unless it would show an epoch below one published before (then
    /// `Unknown`); a value equal to the current one wakes nobody.
    fn publish(&mut self, next: Leadership) {
        let epoch = match &next {
            Leadership::Leader { epoch } => Some(*epoch),
            Leadership::Follower { leader_epoch, .. } => *leader_epoch,
            Leadership::Unknown => None,
        };
        let mut reported = self.shared.reported.lock().expect("reported lock");
        let next = match (epoch, *reported) {
            (Some(e), Some(r)) if e < r => Leadership::Unknown,
            (Some(e), _) => {
                *reported = Some(e);
                next
            }
            (None, _) => next,
        };
        drop(reported);
        self.tx.send_if_modified(|current| {
            if *current == next {
                return false;
            }
            *current = next;
            true
        });
    }

    /// One round: follow the current leader until its key is gone, or campaign, lead, and
    /// step down.
    async fn round(&mut self) -> Result<(), BackendError> {
        if let Some(kv) = self.etcd.get(&self.keys.leader).await? {
            return self.follow(kv).await;
        }
        let sent = Instant::now();
        let (lease_id, granted) = self.etcd.grant(self.ttl.as_secs() as i64).await?;
        let granted = Duration::from_secs(granted as u64);
        let campaign = TxnRequest {
            compare: vec![equal(
                &self.keys.leader,
                CompareTarget::Create,
                TargetUnion::CreateRevision(0),
            )],
            success: vec![put_op(
                &self.keys.leader,
                leader_value(self.node_id, &self.client_addr),
                lease_id,
            )],
            failure: vec![range_op(&self.keys.leader)],
        };
        let resp = match self.etcd.txn(campaign).await {
            Ok(resp) => resp,
            Err(e) => {
                // The key may have been created under this lease: revoking deletes it.
                self.revoke_in_background(lease_id);
                return Err(e);
            }
        };
        if !resp.succeeded {
            self.revoke_in_background(lease_id);
            return match client::range_result(&resp, 0)? {
                Some(kv) => self.follow(kv).await,
                None => Ok(()),
            };
        }
        let revision = client::revision(resp.header.as_ref());
        let epoch = Epoch::from_parts(revision as u64, self.node_id);
        let below = self
            .shared
            .reported
            .lock()
            .expect("reported lock")
            .is_some_and(|r| epoch <= r);
        if revision <= 0 || below {
            self.revoke_in_background(lease_id);
            return Err(BackendError::Permanent(format!(
                "etcd campaign won at revision {revision}, not above an epoch published before"
            )));
        }
        let term = Term {
            epoch,
            revision,
            lease_id,
        };
        *self.shared.term.lock().expect("term lock") = Some(term);
        self.shared.clock.start(epoch, sent, granted);
        self.publish(Leadership::Leader { epoch });
        tracing::info!(node_id = self.node_id, %epoch, lease_id, "etcd backend leads");
        let why = self.lead(term).await;
        self.shared.clock.clear(epoch);
        *self.shared.term.lock().expect("term lock") = None;
        self.publish(Leadership::Unknown);
        tracing::info!(node_id = self.node_id, %epoch, reason = ?why, "etcd backend stepped down");
        let _ = self.etcd.revoke(lease_id).await;
        Ok(())
    }

    /// Publishes the leader `kv` names, and polls until its key is gone.
    async fn follow(&mut self, mut kv: KeyValue) -> Result<(), BackendError> {
        loop {
            let (epoch, hint) = leader_of(&kv);
            self.publish(Leadership::Follower {
                leader_endpoint: hint,
                leader_epoch: Some(epoch),
            });
            self.wait_poll().await;
            match self.etcd.get(&self.keys.leader).await? {
                Some(next) => kv = next,
                None => return Ok(()),
            }
        }
    }

    async fn wait_poll(&self) {
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = self.shared.recheck.notified() => {}
        }
    }

    /// Leads in `term` until the lease runs out, is gone, or the key is no longer ours.
    async fn lead(&mut self, term: Term) -> Lost {
        let interval = self.ttl / 3;
        let mut keep_alive = KeepAlive::new(self.etcd.clone(), term.lease_id);
        let mut next_renewal = tokio::time::Instant::now() + interval;
        let mut next_poll = tokio::time::Instant::now() + POLL_INTERVAL;
        loop {
            let Some(until) = self.shared.clock.until(term.epoch) else {
                return Lost::LeaseRanOut;
            };
            // The ignore-lease control leads on past its deadline (see leader_lease.rs).
            let ignore = leader_lease::ignores_lease();
            if !ignore && Instant::now() >= until {
                return Lost::LeaseRanOut;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()), if !ignore => return Lost::LeaseRanOut,
                _ = tokio::time::sleep_until(next_renewal) => {
                    match keep_alive.renew(interval).await {
                        Ok((sent, ttl)) if ttl > 0 => {
                            let ttl = Duration::from_secs(ttl as u64);
                            self.shared.clock.extend(term.epoch, sent, ttl);
                            next_renewal = tokio::time::Instant::now() + interval;
                        }
                        Ok(_) => return Lost::LeaseGone,
                        Err(e) => {
                            tracing::debug!(node_id = self.node_id, error = %e, "etcd keep-alive failed");
                            keep_alive.reset();
                            next_renewal = tokio::time::Instant::now() + POLL_INTERVAL;
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_poll) => {
                    if self.deposed(term).await {
                        return Lost::Deposed;
                    }
                    next_poll = tokio::time::Instant::now() + POLL_INTERVAL;
                }
                _ = self.shared.recheck.notified() => {
                    if self.deposed(term).await {
                        return Lost::Deposed;
                    }
                }
            }
        }
    }

    /// Whether a linearizable read shows the leader key gone or not this term's (a failed read
    /// tells nothing: the lease deadline decides then).
    async fn deposed(&self, term: Term) -> bool {
        match self.etcd.get(&self.keys.leader).await {
            Ok(Some(kv)) => kv.create_revision != term.revision || kv.lease != term.lease_id,
            Ok(None) => true,
            Err(_) => false,
        }
    }

    fn revoke_in_background(&self, lease_id: i64) {
        let etcd = self.etcd.clone();
        tokio::spawn(async move {
            let _ = etcd.revoke(lease_id).await;
        });
    }
}

/// The keep-alive stream of one lease, with at most one renewal in flight: each answer belongs
/// to the request sent last, so the instant it was sent is known. A renewal that fails or
/// times out drops the stream (a late answer must never be credited to a later request).
struct KeepAlive {
    etcd: Etcd,
    lease_id: i64,
    stream: Option<(
        mpsc::Sender<LeaseKeepAliveRequest>,
        tonic::Streaming<LeaseKeepAliveResponse>,
    )>,
}

impl KeepAlive {
    fn new(etcd: Etcd, lease_id: i64) -> Self {
        Self {
            etcd,
            lease_id,
            stream: None,
        }
    }

    fn reset(&mut self) {
        self.stream = None;
    }

    /// Renews once; returns the instant read before the request was sent and the TTL etcd
    /// answered (0 or less: the lease is gone).
    async fn renew(&mut self, timeout: Duration) -> Result<(Instant, i64), BackendError> {
        let req = LeaseKeepAliveRequest { id: self.lease_id };
        let sent = Instant::now();
        let attempt = async {
            if self.stream.is_none() {
                let (tx, rx) = mpsc::channel(1);
                // Queued before the call: etcd sends its response headers with its first answer.
                tx.send(req).await.expect("receiver held below");
                let mut lease = self.etcd.lease.clone();
                let stream = lease
                    .lease_keep_alive(ReceiverStream::new(rx))
                    .await
                    .map_err(|s| client::classify("lease keep-alive", &s))?
                    .into_inner();
                self.stream = Some((tx, stream));
            } else if let Some((tx, _)) = &self.stream {
                tx.send(req).await.map_err(|_| {
                    BackendError::Transient("etcd lease keep-alive: stream closed".into())
                })?;
            }
            let (_, stream) = self.stream.as_mut().expect("opened above");
            match stream.message().await {
                Ok(Some(resp)) if resp.id == self.lease_id => Ok((sent, resp.ttl)),
                Ok(Some(resp)) => Err(BackendError::Permanent(format!(
                    "etcd lease keep-alive for lease {} answered for lease {}",
                    self.lease_id, resp.id
                ))),
                Ok(None) => Err(BackendError::Transient(
                    "etcd lease keep-alive: stream ended".into(),
                )),
                Err(s) => Err(client::classify("lease keep-alive", &s)),
            }
        };
        let result = match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::Transient(format!(
                "etcd lease keep-alive: no answer within {timeout:?}"
            ))),
        };
        if result.is_err() {
            self.reset();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_key_names_the_epoch_and_the_hint() {
        let kv = KeyValue {
            create_revision: 42,
            value: leader_value(7, "10.0.0.1:7000"),
            ..Default::default()
        };
        assert_eq!(
            leader_of(&kv),
            (Epoch::from_parts(42, 7), Some("10.0.0.1:7000".to_owned()))
        );
        let junk = KeyValue {
            create_revision: 9,
            value: b"junk".to_vec(),
            ..Default::default()
        };
        assert_eq!(leader_of(&junk), (Epoch::from_parts(9, 0), None));
    }
}
