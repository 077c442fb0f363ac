//! Where the next attempt goes: the cached leader, else the configured endpoints in rotation;
//! and the gRPC channels: one lazily dialed channel per address for `GetTs`, and one per
//! address for sequence calls that is handed out only once connected. (The timestamp streams
//! on those channels are kept by `stream.rs`.)
//!
//! Invariants: the cached leader's epoch never goes back. A leader is cached only at an epoch at
//! least the highest one seen; forgetting a leader (it failed) keeps that floor. Rotation passes
//! over endpoints that recently failed at the transport level, and when all of them did, it
//! still moves: it takes the one whose skip ends first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use tonic::transport::{Channel, Endpoint};
use tso_core::Epoch;

use crate::config::{CHANNELS_MAX, Config};
use crate::endpoint::{Scheme, Target};

#[derive(Debug, Default)]
struct LeaderCache {
    target: Option<Target>,
    epoch_floor: Epoch,
}

/// The rotation over the configured endpoints.
#[derive(Debug, Default)]
struct Rotation {
    /// Index (into the configured endpoints) where the next search starts.
    next: usize,
    /// Endpoints that failed at the transport level, and until when rotation skips them: during
    /// a failover the dead leader would otherwise spend one attempt per pass. At most
    /// `CHANNELS_MAX` entries.
    unreachable_until: HashMap<Target, Instant>,
}

pub(crate) struct Router {
    config: Config,
    rotation: Mutex<Rotation>,
    leader: Mutex<LeaderCache>,
    channels: Mutex<HashMap<Target, Channel>>,
    /// Channels for sequence calls, each handed out only after its connection was made: a
    /// failure to connect then happens before any request exists, so it is known to have sent
    /// nothing (a lazy channel connects inside the call, where a timeout cannot tell "never
    /// connected" from "sent and unanswered"). At most `CHANNELS_MAX` entries.
    seq_channels: Mutex<HashMap<Target, Channel>>,
}

/// Why no connected sequence channel could be made; in both cases nothing was sent.
#[derive(Debug)]
pub(crate) enum SeqConnectError {
    /// The deadline passed while connecting.
    TimedOut,
    /// The connection failed: the error and its causes.
    Failed(String),
}

/// An error and its causes, `: `-separated (transport errors say little on their own).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let shown = cause.to_string();
        if !text.ends_with(&shown) {
            text.push_str(": ");
            text.push_str(&shown);
        }
        source = cause.source();
    }
    text
}

/// How long rotation passes over an endpoint after a transport error. Long enough to cover an
/// election (hundreds of ms), short enough that a restarted node is soon tried again.
pub(crate) const UNREACHABLE_SKIP: Duration = Duration::from_secs(1);

impl Router {
    pub(crate) fn new(config: Config) -> Self {
        Self {
            config,
            rotation: Mutex::new(Rotation::default()),
            leader: Mutex::new(LeaderCache::default()),
            channels: Mutex::new(HashMap::new()),
            seq_channels: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// The cached leader, else the next configured endpoint.
    pub(crate) fn first_target(&self) -> Target {
        let cached = self.lock_leader().target.clone();
        cached.unwrap_or_else(|| self.next_configured())
    }

    /// The next configured endpoint in rotation, passing over those that recently failed at
    /// the transport level. When every one did, the one whose skip ends first: the failure
    /// furthest in the past, and each failed attempt moves it to the back.
    pub(crate) fn next_configured(&self) -> Target {
        let endpoints = &self.config.endpoints;
        let now = Instant::now();
        let mut rotation = self.lock_rotation();
        let skip_end = |index: usize| {
            rotation
                .unreachable_until
                .get(&endpoints[index])
                .copied()
                .filter(|until| *until > now)
        };
        let order = (0..endpoints.len()).map(|k| (rotation.next + k) % endpoints.len());
        let index = order
            .clone()
            .find(|&index| skip_end(index).is_none())
            .or_else(|| order.min_by_key(|&index| skip_end(index)))
            .expect("at least one endpoint is configured");
        rotation.next = (index + 1) % endpoints.len();
        endpoints[index].clone()
    }

    /// True while `target` is passed over after a transport failure. A follower that still
    /// names a dead leader (it has not noticed yet) is then treated as knowing no leader.
    pub(crate) fn is_unreachable(&self, target: &Target) -> bool {
        let rotation = self.lock_rotation();
        rotation
            .unreachable_until
            .get(target)
            .is_some_and(|until| *until > Instant::now())
    }

    /// Records a transport failure or per-attempt timeout of `target`: rotation passes over it
    /// for a while.
    pub(crate) fn mark_unreachable(&self, target: &Target) {
        let mut rotation = self.lock_rotation();
        let unreachable = &mut rotation.unreachable_until;
        if unreachable.len() >= CHANNELS_MAX {
            let now = Instant::now();
            unreachable.retain(|_, until| *until > now);
        }
        if unreachable.len() < CHANNELS_MAX || unreachable.contains_key(target) {
            unreachable.insert(target.clone(), Instant::now() + UNREACHABLE_SKIP);
        }
    }

    /// Forgets a transport failure of `target`: it answered, or a newer leader lives there.
    pub(crate) fn mark_reachable(&self, target: &Target) {
        self.lock_rotation().unreachable_until.remove(target);
    }

    /// The cached leader and its epoch floor.
    pub(crate) fn leader(&self) -> (Option<Target>, Epoch) {
        let cache = self.lock_leader();
        (cache.target.clone(), cache.epoch_floor)
    }

    /// True when `epoch` is not older than the newest leader seen, so a hint naming it may be
    /// followed.
    pub(crate) fn is_current(&self, epoch: Epoch) -> bool {
        epoch >= self.lock_leader().epoch_floor
    }

    /// True when `epoch` is above every leader seen: news of a leader elected since.
    pub(crate) fn is_newer(&self, epoch: Epoch) -> bool {
        epoch > self.lock_leader().epoch_floor
    }

    /// Records that `target` served (or was named leader) at `epoch`; ignored when older than
    /// the newest leader seen.
    pub(crate) fn observe_leader(&self, target: &Target, epoch: Epoch) {
        let mut cache = self.lock_leader();
        if epoch >= cache.epoch_floor {
            cache.epoch_floor = epoch;
            cache.target = Some(target.clone());
        }
    }

    /// Stops preferring `target` after it failed; the epoch floor stays.
    pub(crate) fn forget_leader(&self, target: &Target) {
        let mut cache = self.lock_leader();
        if cache.target.as_ref() == Some(target) {
            cache.target = None;
        }
    }

    /// The channel to `target`, created (without dialing) on first use.
    pub(crate) fn channel(&self, target: &Target) -> Channel {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(target) {
            return channel.clone();
        }
        if channels.len() >= CHANNELS_MAX {
            channels.retain(|t, _| self.config.endpoints.contains(t));
        }
        let channel = self.dial_lazily(target);
        channels.insert(target.clone(), channel.clone());
        channel
    }

    /// Drops the channel to `target` so that the next attempt dials afresh.
    pub(crate) fn drop_channel(&self, target: &Target) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels.remove(target);
    }

    /// A connected channel to `target` for sequence calls: the cached one, else a new
    /// connection made before `deadline`. An error means nothing was sent; it says why.
    pub(crate) async fn seq_channel(
        &self,
        target: &Target,
        deadline: Instant,
    ) -> Result<Channel, SeqConnectError> {
        if let Some(channel) = self.lock_seq_channels().get(target) {
            return Ok(channel.clone());
        }
        let endpoint = self.endpoint(target);
        let channel = match tokio::time::timeout_at(deadline, endpoint.connect()).await {
            Err(_) => return Err(SeqConnectError::TimedOut),
            Ok(Err(error)) => return Err(SeqConnectError::Failed(error_chain(&error))),
            Ok(Ok(channel)) => channel,
        };
        let mut channels = self.lock_seq_channels();
        if channels.len() >= CHANNELS_MAX && !channels.contains_key(target) {
            channels.retain(|t, _| self.config.endpoints.contains(t));
        }
        // Two calls may have connected at once: keep the first, so calls share a connection.
        Ok(channels.entry(target.clone()).or_insert(channel).clone())
    }

    /// Drops the sequence channel to `target`, so that the next call connects afresh (and a
    /// failure to connect is again known to have sent nothing).
    pub(crate) fn drop_seq_channel(&self, target: &Target) {
        self.lock_seq_channels().remove(target);
    }

    fn dial_lazily(&self, target: &Target) -> Channel {
        self.endpoint(target).connect_lazy()
    }

    fn endpoint(&self, target: &Target) -> Endpoint {
        // A `Target` is a validated `scheme://host:port`, which always parses as a URI.
        let endpoint = Endpoint::from_shared(target.uri().to_string())
            .expect("a validated target is a valid URI")
            .connect_timeout(self.config.attempt_timeout)
            .tcp_nodelay(true);
        let (Scheme::Https, Some(tls)) = (target.scheme(), &self.config.tls) else {
            // An `https` target without TLS configured (only a hint can be one) fails to
            // connect, never falls back to plaintext.
            return endpoint;
        };
        match endpoint.clone().tls_config(tls.clone()) {
            Ok(endpoint) => endpoint,
            Err(e) => {
                // A host that is no valid TLS server name: connecting fails like above.
                tracing::warn!(%target, "cannot set up TLS to this address: {e}");
                endpoint
            }
        }
    }

    fn lock_seq_channels(&self) -> std::sync::MutexGuard<'_, HashMap<Target, Channel>> {
        self.seq_channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_rotation(&self) -> std::sync::MutexGuard<'_, Rotation> {
        self.rotation.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_leader(&self) -> std::sync::MutexGuard<'_, LeaderCache> {
        self.leader.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientBuilder;

    fn router(endpoints: &[&str]) -> Router {
        Router::new(ClientBuilder::default().validate(endpoints.iter()).unwrap())
    }

    #[tokio::test]
    async fn channels_stay_bounded_under_a_stream_of_hinted_addresses() {
        let r = router(&["a:1"]);
        let configured = r.config.endpoints[0].clone();
        r.channel(&configured);
        for port in 1..=3 * CHANNELS_MAX as u16 {
            let hinted =
                crate::endpoint::parse_address(&format!("h:{port}"), crate::endpoint::Scheme::Http)
                    .unwrap();
            r.channel(&hinted);
            let channels = r.channels.lock().unwrap();
            assert!(channels.len() <= CHANNELS_MAX);
            assert!(
                channels.contains_key(&configured),
                "a configured endpoint was evicted"
            );
        }
    }

    #[test]
    fn rotation_cycles_through_configured_endpoints() {
        let r = router(&["a:1", "b:2"]);
        let seen: Vec<String> = (0..4).map(|_| r.next_configured().to_string()).collect();
        assert_eq!(
            seen,
            ["http://a:1", "http://b:2", "http://a:1", "http://b:2"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn rotation_passes_over_unreachable_endpoints_for_a_while() {
        let r = router(&["a:1", "b:2", "c:3"]);
        let a = r.next_configured();
        r.mark_unreachable(&a);
        let seen: Vec<Target> = (0..4).map(|_| r.next_configured()).collect();
        assert!(!seen.contains(&a), "{seen:?}");
        for t in r.config.endpoints.clone() {
            r.mark_unreachable(&t);
        }
        r.next_configured();
        tokio::time::advance(UNREACHABLE_SKIP).await;
        let seen: Vec<Target> = (0..3).map(|_| r.next_configured()).collect();
        assert!(seen.contains(&a), "tried again after the skip: {seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn when_all_are_unreachable_the_one_whose_skip_ends_first_goes_next() {
        let r = router(&["a:1", "b:2", "c:3"]);
        let [a, b, c] = [0, 1, 2].map(|i| r.config.endpoints[i].clone());
        for t in [&b, &c, &a] {
            r.mark_unreachable(t);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        // Each pick fails again, as an attempt on it would.
        let mut seen = Vec::new();
        for _ in 0..6 {
            let t = r.next_configured();
            r.mark_unreachable(&t);
            tokio::time::advance(Duration::from_millis(1)).await;
            seen.push(t);
        }
        assert_eq!(seen, [&b, &c, &a, &b, &c, &a].map(Target::clone));
        // Without another failure the pick stays the oldest, and rotation resumes after it
        // once the skips end.
        assert_eq!(r.next_configured(), b);
        tokio::time::advance(UNREACHABLE_SKIP).await;
        assert_eq!(r.next_configured(), c);
    }

    #[test]
    fn the_cached_leader_never_goes_back_an_epoch() {
        let r = router(&["a:1", "b:2", "c:3"]);
        let [a, b, c] = ["a:1", "b:2", "c:3"].map(|s| {
            r.config
                .endpoints
                .iter()
                .find(|t| t.uri().ends_with(s))
                .unwrap()
                .clone()
        });
        r.observe_leader(&b, Epoch::new(5));
        assert_eq!(r.first_target(), b);
        r.observe_leader(&c, Epoch::new(4));
        assert_eq!(r.leader(), (Some(b.clone()), Epoch::new(5)));
        assert!(!r.is_current(Epoch::new(4)));
        r.forget_leader(&b);
        r.observe_leader(&a, Epoch::new(3));
        assert_eq!(
            r.leader(),
            (None, Epoch::new(5)),
            "forgetting keeps the floor"
        );
        r.observe_leader(&a, Epoch::new(6));
        assert_eq!(r.first_target(), a);
    }
}
