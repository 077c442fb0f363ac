//! Serving state and the grant path.
//!
//! One mutex guards the mode (not serving, serving a term, poisoned). A term owns the window
//! allocator of one fence; when the term ends its allocator is dropped with it, so nothing from
//! an older term (a late extension) can raise the high-water of a newer one. The grant path is
//! one lock, one allocator call and, rarely, a wake of the extender: it never waits on storage
//! unless a burst exhausts the window.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tso_core::{Epoch, Error as CoreError, Grant, PHYSICAL_MAX_MS, Window};

use crate::backend::{Backend, BackendError};
use crate::clock::Clock;
use crate::error::ServeError;
use crate::metrics;
use crate::refusal::{Call, LeaderHint, Refusal};
use crate::sequence::{SeqCall, SeqStarts, Sequencer};
use crate::stamping::{LeaseBook, LeaseGrant};
use crate::term::{EXHAUSTED_WAIT_MAX, Serving, TermIo, TermLimits};
/// Extensions a single request waits through before giving up: one covers `now + ahead`, so
/// a second is only needed when the clock jumps during the first.
pub const EXHAUSTED_ROUNDS_MAX: usize = 3;

/// Tunables of the oracle.
#[derive(Debug, Clone)]
pub struct Config {
    /// How far ahead of the clock each window extension reaches (SEMANTICS §3).
    pub window_ahead: Duration,
    /// How far above the fence floor a new term persists before serving (SEMANTICS §5).
    pub failover_advance: Duration,
    /// How long shutdown waits for the leadership watch to stop.
    pub shutdown_grace: Duration,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: grant without checking the backend's leader
    /// lease, so a leader cut off from its peers keeps granting while a new leader serves
    /// (SEMANTICS G3 broken on purpose). Always `false` outside that test.
    pub unsafe_skip_leader_lease_check: bool,
    /// The largest `count` of one key in one `GetSeq`/`GetSeqBatch` entry (SEMANTICS §11).
    pub seq_count_max: u32,
    /// The most distinct sequence keys the server keeps; a new key past it is refused with
    /// `RESOURCE_EXHAUSTED` (SEMANTICS §11).
    pub seq_keys_max: usize,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: start each term's sequences from 0 instead of
    /// loading the durable counters, so a new leader hands out blocks again (SEMANTICS D1
    /// broken on purpose). Always `false` outside that test.
    pub unsafe_seq_skip_load: bool,
    /// The shortest and longest TTL a stamping lease may ask for (SEMANTICS §14).
    pub lease_ttl_min: Duration,
    pub lease_ttl_max: Duration,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: start each term's lease set empty instead of
    /// loading it, so a new leader forgets the leases of the old one and its frontier can pass
    /// their bounds (SEMANTICS §14 broken on purpose). Always `false` outside that test.
    pub unsafe_lease_skip_load: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: judge a stamping lease's expiry by the wall
    /// clock (its stored `expires_at_ms`) instead of monotonic time, so a clock step ends a live
    /// lease or brings an expired one back (SEMANTICS §14 broken on purpose). Always `false`
    /// outside that test.
    pub unsafe_lease_wall_expiry: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: raise the high-water for a stamping lease's
    /// bound in memory only, without making it durable, so the next leader can grant at or
    /// above an answered bound (SEMANTICS §14 broken on purpose). Always `false` outside that
    /// test.
    pub unsafe_lease_bound_in_memory: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: now and then refuse a sequence call definitely
    /// (`RESOURCE_EXHAUSTED`) after its block was spent and written, a gap no uncertain call
    /// explains (SEMANTICS D2 broken on purpose). Always `false` outside that test.
    pub unsafe_seq_burn_refused: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            window_ahead: Duration::from_secs(3),
            failover_advance: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
            unsafe_skip_leader_lease_check: false,
            seq_count_max: tso_proto::limits::SEQ_COUNT_MAX,
            seq_keys_max: crate::sequence::SEQ_KEYS_MAX_DEFAULT,
            unsafe_seq_skip_load: false,
            lease_ttl_min: crate::stamping::LEASE_TTL_MIN_DEFAULT,
            lease_ttl_max: crate::stamping::LEASE_TTL_MAX_DEFAULT,
            unsafe_lease_skip_load: false,
            unsafe_lease_wall_expiry: false,
            unsafe_lease_bound_in_memory: false,
            unsafe_seq_burn_refused: false,
        }
    }
}

impl Config {
    pub(crate) fn window_ahead_ms(&self) -> u64 {
        self.window_ahead.as_millis() as u64
    }

    /// Room left below which an extension starts: half a window, so that in steady state the
    /// extension finishes long before a request could find the window exhausted.
    pub(crate) fn low_water_ms(&self) -> u64 {
        self.window_ahead_ms() / 2
    }

    fn term_limits(&self) -> TermLimits {
        TermLimits {
            seq_keys_max: self.seq_keys_max,
            lease_ttl_max: self.lease_ttl_max,
            unsafe_seq_skip_load: self.unsafe_seq_skip_load,
            unsafe_seq_burn_refused: self.unsafe_seq_burn_refused,
            unsafe_lease_skip_load: self.unsafe_lease_skip_load,
            unsafe_lease_wall_expiry: self.unsafe_lease_wall_expiry,
            unsafe_lease_bound_in_memory: self.unsafe_lease_bound_in_memory,
        }
    }
}

/// The switch of [`unsafe_raise_in_memory`].
static RAISE_IN_MEMORY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// FOR THE CHECKER'S POSITIVE CONTROL ONLY: from now on a raise moves the leader's window in
/// memory and writes nothing, so the next leader fences below timestamps answered after it.
/// For the whole process.
pub fn unsafe_raise_in_memory() {
    RAISE_IN_MEMORY.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`unsafe_raise_in_memory`] was called.
fn raises_in_memory() -> bool {
    RAISE_IN_MEMORY.load(std::sync::atomic::Ordering::Relaxed)
}

/// The serving state, observable by embedders and operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServingState {
    NotServing {
        leader_endpoint: Option<String>,
        leader_epoch: Option<Epoch>,
    },
    Serving {
        epoch: Epoch,
    },
    /// Poisoned: a fatal error stopped serving for good; every call fails fast.
    Failed {
        reason: String,
    },
}

/// The outcome of the latest extension of a term, broadcast to callers waiting on it.
#[derive(Debug, Clone, Default)]
pub(crate) struct ExtensionOutcome {
    pub error: Option<BackendError>,
}

pub(crate) struct Term {
    pub id: u64,
    pub epoch: Epoch,
    pub window: Window,
    /// An extension is requested or under way; the grant path does not wake the extender again.
    pub extension_wanted: bool,
    pub wake: Arc<Notify>,
    pub outcome: watch::Sender<ExtensionOutcome>,
    /// The term's dense-sequence group committer, made on its first sequence call.
    pub sequencer: Option<Arc<Sequencer>>,
    /// The term's stamping leases, loaded on its first lease call.
    pub leases: Option<Arc<tokio::sync::Mutex<LeaseBook>>>,
}

enum Mode {
    NotServing(LeaderHint),
    Serving(Term),
    Poisoned,
}

struct State {
    mode: Mode,
    /// The highest epoch this node has reported; hints never name a lower one.
    reported_epoch: Epoch,
    next_term_id: u64,
    /// Since when this node has known no leader (`None` while it leads or knows one).
    leaderless_since: Option<Instant>,
    /// When the current term started serving (wall clock, ms), and how long its fence took.
    serving_since_unix_ms: u64,
    last_fence: Option<Duration>,
}

/// What the status call reports of the oracle itself; the backend's part is added by the
/// caller. Read from memory only.
#[derive(Default)]
pub(crate) struct OracleStatus {
    /// The epoch served, if this node leads.
    pub serving: Option<Epoch>,
    /// Why serving stopped for good.
    pub failed: Option<String>,
    /// A follower's knowledge of its leader.
    pub hint: LeaderHint,
    pub serving_since_unix_ms: u64,
    pub high_water_ms: u64,
    pub clock_ms: u64,
    pub last_fence: Option<Duration>,
    pub leaderless: Option<Duration>,
    /// Live stamping leases and sequence keys of the current term, when loaded.
    pub live_leases: Option<usize>,
    pub sequence_keys: Option<usize>,
}

/// State shared by the service, the leadership watch and the extender.
pub(crate) struct Shared {
    pub config: Config,
    pub clock: Arc<dyn Clock>,
    pub backend: Arc<dyn Backend>,
    state: Mutex<State>,
    serving: watch::Sender<ServingState>,
    /// Cancelled when serving is poisoned; the watch and the server stop on it.
    pub failed: CancellationToken,
    /// Cancelled when the server starts draining for shutdown: long-lived streams end on it.
    pub draining: CancellationToken,
    fatal: Mutex<Option<ServeError>>,
    /// This oracle's hold on its backend (`None`: another oracle holds it; this one never serves).
    claim: Option<crate::claim::Claim>,
}

enum Attempt {
    Granted(Grant, Epoch),
    Exhausted(watch::Receiver<ExtensionOutcome>),
}

/// What the extender should do next.
pub(crate) enum Plan {
    Extend { target_ms: u64, epoch: Epoch },
    Idle,
    Gone,
}

impl Shared {
    pub fn new(backend: Arc<dyn Backend>, config: Config, clock: Arc<dyn Clock>) -> Shared {
        let claim = crate::claim::Claim::take(&backend);
        let not_serving = ServingState::NotServing {
            leader_endpoint: None,
            leader_epoch: None,
        };
        Shared {
            config,
            clock,
            backend,
            state: Mutex::new(State {
                mode: Mode::NotServing(LeaderHint::default()),
                reported_epoch: Epoch::ZERO,
                next_term_id: 1,
                leaderless_since: Some(Instant::now()),
                serving_since_unix_ms: 0,
                last_fence: None,
            }),
            serving: watch::channel(not_serving).0,
            failed: CancellationToken::new(),
            draining: CancellationToken::new(),
            fatal: Mutex::new(None),
            claim,
        }
    }

    /// Whether this oracle holds its backend (see `claim.rs`).
    pub fn claimed(&self) -> bool {
        self.claim.is_some()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the allocator in an unknown state; refusing to
        // go on (panicking again) is the only safe answer.
        self.state.lock().expect("oracle state lock poisoned")
    }

    pub fn serving(&self) -> watch::Receiver<ServingState> {
        self.serving.subscribe()
    }

    /// Grants `count` timestamps, waiting for an extension only if the window is exhausted.
    pub async fn grant(&self, count: u32) -> Result<(Grant, Epoch), Refusal> {
        for _ in 0..EXHAUSTED_ROUNDS_MAX {
            let mut outcome = match self.try_grant(count)? {
                Attempt::Granted(grant, epoch) => return Ok((grant, epoch)),
                Attempt::Exhausted(outcome) => outcome,
            };
            metrics::exhausted_wait();
            match tokio::time::timeout(EXHAUSTED_WAIT_MAX, outcome.changed()).await {
                Err(_) => {
                    return Err(Refusal::Unavailable(format!(
                        "window extension did not finish within {} ms; retry",
                        EXHAUSTED_WAIT_MAX.as_millis()
                    )));
                }
                Ok(Err(_)) => return Err(Refusal::NotLeader(self.hint())),
                Ok(Ok(())) => {}
            }
            if let Some(err) = outcome.borrow().error.clone() {
                // The extender retries or steps down on its own; nothing to poison here.
                let call = Call::Read("extending the window");
                return Err(Refusal::from_backend(err, call, || self.hint(), None));
            }
        }
        Err(Refusal::Unavailable(
            "window still exhausted after repeated extensions; the clock may be jumping; retry"
                .into(),
        ))
    }

    fn try_grant(&self, count: u32) -> Result<Attempt, Refusal> {
        let now_ms = self.clock.now_ms();
        let low_water_ms = self.config.low_water_ms();
        let mut state = self.lock();
        let term = self.serving_term(&mut state)?;
        match term.window.grant(count, now_ms) {
            Ok(grant) => {
                if !term.extension_wanted && term.window.wants_extension(now_ms, low_water_ms) {
                    term.extension_wanted = true;
                    term.wake.notify_one();
                }
                Ok(Attempt::Granted(grant, term.epoch))
            }
            Err(CoreError::WindowExhausted { .. }) => {
                let outcome = term.outcome.subscribe();
                term.extension_wanted = true;
                term.wake.notify_one();
                Ok(Attempt::Exhausted(outcome))
            }
            Err(e @ CoreError::InvalidCount { .. }) => Err(Refusal::InvalidArgument(e.to_string())),
            Err(e @ CoreError::PhysicalOutOfRange { .. }) => {
                Err(Refusal::OutOfRange(e.to_string()))
            }
            Err(e) => Err(Refusal::Internal(e.to_string())),
        }
    }

    /// Hands out the blocks of one dense-sequence call (SEMANTICS §11), group-committed with
    /// the calls around it. Refuses before anything is written unless this node serves under a
    /// valid lease.
    pub async fn sequence(self: &Arc<Self>, call: SeqCall) -> Result<SeqStarts, Refusal> {
        let (sequencer, io) = {
            let mut state = self.lock();
            let term = self.serving_term(&mut state)?;
            let sequencer = Arc::clone(term.sequencer.get_or_insert_with(Default::default));
            (sequencer, Arc::new(self.term_io(term.epoch)))
        };
        sequencer.submit(io, call).await
    }

    /// Acquires (or renews, or supersedes) the lease of `holder` (SEMANTICS §14).
    pub async fn acquire_lease(
        self: &Arc<Self>,
        holder: Vec<u8>,
        holder_epoch: u64,
        ttl_ms: u64,
    ) -> Result<LeaseGrant, Refusal> {
        let (book, io) = self.lease_book()?;
        let mut book = book.lock().await;
        book.acquire(&io, holder, holder_epoch, ttl_ms).await
    }

    /// Renews lease `lease_id` with its original TTL: a fresh bound and expiry.
    pub async fn renew_lease(self: &Arc<Self>, lease_id: u64) -> Result<LeaseGrant, Refusal> {
        let (book, io) = self.lease_book()?;
        let mut book = book.lock().await;
        book.renew(&io, lease_id).await
    }

    /// Releases lease `lease_id` (idempotent): it stops binding the frontier at once.
    pub async fn release_lease(self: &Arc<Self>, lease_id: u64) -> Result<(), Refusal> {
        let (book, io) = self.lease_book()?;
        let mut book = book.lock().await;
        book.release(&io, lease_id).await
    }

    /// The safe frontier: `(0, zero epoch)` unless serving under a valid lease; else
    /// `min(H, the bounds of every live lease)` and the epoch.
    pub async fn safe_frontier(self: &Arc<Self>) -> Result<(u64, Epoch), Refusal> {
        let Ok((book, io)) = self.lease_book() else {
            return Ok((0, Epoch::ZERO));
        };
        let mut book = book.lock().await;
        book.safe_frontier(&io).await
    }

    /// The current term's lease book and access, if this node serves under a valid lease.
    fn lease_book(
        self: &Arc<Self>,
    ) -> Result<(Arc<tokio::sync::Mutex<LeaseBook>>, TermIo), Refusal> {
        let mut state = self.lock();
        let term = self.serving_term(&mut state)?;
        let book = Arc::clone(term.leases.get_or_insert_with(Default::default));
        Ok((book, self.term_io(term.epoch)))
    }

    /// The term being served, if this node serves under a valid lease: a leader cut off from
    /// its peers stops answering before a new leader can start.
    fn serving_term<'a>(&self, state: &'a mut State) -> Result<&'a mut Term, Refusal> {
        let term = match &mut state.mode {
            Mode::Serving(term) => term,
            Mode::NotServing(hint) => return Err(Refusal::NotLeader(hint.clone())),
            Mode::Poisoned => return Err(Refusal::NotLeader(LeaderHint::default())),
        };
        if !self.config.unsafe_skip_leader_lease_check
            && !self.backend.leader_lease_valid(term.epoch)
        {
            return Err(Refusal::NotLeader(LeaderHint::default()));
        }
        Ok(term)
    }

    /// The access the writers of the term serving `epoch` get: the backend, the clock, their
    /// limits, and this oracle seen through [`Serving`].
    fn term_io(self: &Arc<Self>, epoch: Epoch) -> TermIo {
        TermIo {
            backend: Arc::clone(&self.backend),
            clock: Arc::clone(&self.clock),
            epoch,
            limits: self.config.term_limits(),
            serving: Arc::clone(self) as Arc<dyn Serving>,
        }
    }

    /// Sequence calls waiting for the current term's next write (diagnostics and tests).
    pub fn queued_sequence_calls(&self) -> usize {
        match &self.lock().mode {
            Mode::Serving(Term {
                sequencer: Some(sequencer),
                ..
            }) => sequencer.queued(),
            _ => 0,
        }
    }

    /// The closed watermark of GetCurrentMaxSafe: `(0, zero epoch)` unless serving.
    pub fn max_safe(&self) -> (u64, Epoch) {
        let now_ms = self.clock.now_ms();
        let mut state = self.lock();
        match &mut state.mode {
            Mode::Serving(term) => (term.window.close_through(now_ms), term.epoch),
            _ => (0, Epoch::ZERO),
        }
    }

    /// The hint to send with "not leader" now.
    pub fn hint(&self) -> LeaderHint {
        match &self.lock().mode {
            Mode::NotServing(hint) => hint.clone(),
            _ => LeaderHint::default(),
        }
    }

    /// Stops serving (the term and its allocator are dropped) and publishes what is known of
    /// the leader. A hint naming an epoch below one already reported is dropped as stale.
    pub fn step_down(&self, hint: LeaderHint) {
        let mut state = self.lock();
        if matches!(state.mode, Mode::Poisoned) {
            return;
        }
        let hint = match hint.epoch {
            Some(epoch) if epoch < state.reported_epoch => LeaderHint::default(),
            Some(epoch) => {
                state.reported_epoch = epoch;
                hint
            }
            None => hint,
        };
        state.leaderless_since = match (&hint.endpoint, hint.epoch) {
            (None, None) => state.leaderless_since.or_else(|| Some(Instant::now())),
            _ => None,
        };
        state.mode = Mode::NotServing(hint.clone());
        // Published with the lock held, so that states are published in the order they were
        // taken: a poisoning in between can never be overwritten by a stale NotServing.
        metrics::serving(false);
        self.serving.send_replace(ServingState::NotServing {
            leader_endpoint: hint.endpoint,
            leader_epoch: hint.epoch,
        });
    }

    /// The epoch of the term being served, if any.
    pub fn serving_epoch(&self) -> Option<Epoch> {
        match &self.lock().mode {
            Mode::Serving(term) => Some(term.epoch),
            _ => None,
        }
    }

    /// True once serving is poisoned.
    pub fn is_poisoned(&self) -> bool {
        matches!(self.lock().mode, Mode::Poisoned)
    }

    /// Installs a freshly fenced window and publishes Serving. Returns the term's id and wake.
    pub fn start_serving(&self, epoch: Epoch, window: Window) -> Option<(u64, Arc<Notify>)> {
        let mut state = self.lock();
        if matches!(state.mode, Mode::Poisoned) {
            return None;
        }
        let id = state.next_term_id;
        state.next_term_id += 1;
        state.reported_epoch = state.reported_epoch.max(epoch);
        state.leaderless_since = None;
        state.serving_since_unix_ms = self.clock.now_ms();
        let wake = Arc::new(Notify::new());
        metrics::extension_done(
            Default::default(),
            window.high_water_ms(),
            self.clock.now_ms(),
        );
        metrics::term_started(self.config.seq_keys_max, crate::stamping::LEASES_MAX);
        state.mode = Mode::Serving(Term {
            id,
            epoch,
            window,
            extension_wanted: false,
            wake: Arc::clone(&wake),
            outcome: watch::channel(ExtensionOutcome::default()).0,
            sequencer: None,
            leases: None,
        });
        metrics::serving(true);
        self.serving.send_replace(ServingState::Serving { epoch });
        drop(state);
        Some((id, wake))
    }

    /// Records how long the fence of the term about to serve took (for the status call).
    pub fn note_fence(&self, took: Duration) {
        metrics::fence_took(took);
        self.lock().last_fence = Some(took);
    }

    /// This node's view for the status call, from memory (never a backend call).
    pub async fn status(&self) -> OracleStatus {
        let clock_ms = self.clock.now_ms();
        let failed = match &*self.serving.borrow() {
            ServingState::Failed { reason } => Some(reason.clone()),
            _ => None,
        };
        let (mut status, leases) = {
            let state = self.lock();
            let mut status = OracleStatus {
                failed,
                clock_ms,
                last_fence: state.last_fence,
                leaderless: state.leaderless_since.map(|since| since.elapsed()),
                ..OracleStatus::default()
            };
            let mut leases = None;
            match &state.mode {
                Mode::Serving(term) => {
                    status.serving = Some(term.epoch);
                    status.serving_since_unix_ms = state.serving_since_unix_ms;
                    status.high_water_ms = term.window.high_water_ms();
                    status.sequence_keys = term.sequencer.as_ref().and_then(|s| s.key_count());
                    leases = term.leases.clone();
                }
                Mode::NotServing(hint) => status.hint = hint.clone(),
                Mode::Poisoned => {}
            }
            (status, leases)
        };
        if let Some(book) = leases {
            // A lease call holding the book is a write in flight: report the set as unknown
            // rather than wait on it.
            if let Ok(book) = book.try_lock() {
                status.live_leases = book.live_count(self.clock.monotonic_ms());
            }
        }
        status
    }

    /// Leader only: makes every later timestamp's physical part above `above_ms`, durably
    /// (the high-water goes to `above_ms` plus the window first, so every later leader fences
    /// above it too). Refused past the layout, and above this node's clock plus `max_ahead_ms`.
    /// Returns the durable high-water and the epoch.
    pub async fn raise(&self, above_ms: u64, max_ahead_ms: u64) -> Result<(u64, Epoch), Refusal> {
        let now_ms = self.clock.now_ms();
        if above_ms > now_ms.saturating_add(max_ahead_ms) {
            return Err(Refusal::InvalidArgument(format!(
                "{above_ms} ms is {} ms ahead of this leader's clock ({now_ms} ms), past the \
                 ceiling of {max_ahead_ms} ms ahead: a typo? (`tso admin raise --max-ahead` moves the \
                 ceiling)",
                above_ms - now_ms
            )));
        }
        let target_ms = above_ms
            .saturating_add(self.config.window_ahead_ms())
            .max(above_ms.saturating_add(1));
        if target_ms > PHYSICAL_MAX_MS {
            return Err(Refusal::OutOfRange(format!(
                "{above_ms} ms and the window above it pass the 46-bit timestamp layout \
                 ({PHYSICAL_MAX_MS} ms)"
            )));
        }
        let epoch = {
            let mut state = self.lock();
            self.serving_term(&mut state)?.epoch
        };
        let cmd = crate::backend::OracleCommand::AdvanceHighWater {
            at_least_ms: target_ms,
        };
        let stored = if raises_in_memory() {
            crate::backend::Stored {
                high_water_ms: target_ms,
            }
        } else {
            self.backend.apply(cmd, epoch).await.map_err(|e| {
                Refusal::from_backend(
                    e,
                    Call::Write("raising the high-water"),
                    || self.hint(),
                    None,
                )
            })?
        };
        let mut state = self.lock();
        match &mut state.mode {
            Mode::Serving(term) if term.epoch == epoch => {
                term.window.raise_high_water(stored.high_water_ms);
                term.window.raise_floor(above_ms);
                Ok((term.window.high_water_ms(), epoch))
            }
            // The raise is durable, so the next term fences above it; this one ended.
            _ => Err(Refusal::NotLeader(match &state.mode {
                Mode::NotServing(hint) => hint.clone(),
                _ => LeaderHint::default(),
            })),
        }
    }

    /// Poisons serving for good and records why, for [`Shared::take_fatal`].
    pub fn poison(&self, error: ServeError) {
        let reason = error.to_string();
        self.fatal.lock().expect("fatal lock").get_or_insert(error);
        self.mark_poisoned(reason);
    }

    /// Poisons serving for good and publishes `reason`, unless it already is poisoned: the
    /// first cause is the one embedders and operators see.
    pub fn mark_poisoned(&self, reason: String) {
        let mut state = self.lock();
        if matches!(state.mode, Mode::Poisoned) {
            return;
        }
        state.mode = Mode::Poisoned;
        metrics::serving(false);
        self.serving.send_replace(ServingState::Failed { reason });
        drop(state);
        self.failed.cancel();
    }

    /// The fatal error recorded by [`Shared::poison`].
    pub fn take_fatal(&self) -> ServeError {
        self.fatal
            .lock()
            .expect("fatal lock")
            .take()
            .unwrap_or_else(|| ServeError::Invariant("poisoned without a recorded cause".into()))
    }

    /// Decides whether term `term_id` should extend now, and to what.
    pub fn plan_extension(&self, term_id: u64) -> Plan {
        let now_ms = self.clock.now_ms();
        let mut state = self.lock();
        let Mode::Serving(term) = &mut state.mode else {
            return Plan::Gone;
        };
        if term.id != term_id {
            return Plan::Gone;
        }
        if !term.extension_wanted
            && !term
                .window
                .wants_extension(now_ms, self.config.low_water_ms())
        {
            return Plan::Idle;
        }
        term.extension_wanted = true;
        Plan::Extend {
            target_ms: term
                .window
                .extension_target_ms(now_ms, self.config.window_ahead_ms()),
            epoch: term.epoch,
        }
    }

    /// Applies an extension's result to term `term_id`, if it is still the current term.
    /// Returns the error class, or `None` on success.
    pub fn finish_extension(
        &self,
        term_id: u64,
        target_ms: u64,
        result: Result<u64, BackendError>,
    ) -> Result<(), BackendError> {
        // Checked before the lock: the allocator asserts the layout, and a panic with the lock
        // held would leave every later call panicking instead of failing fast.
        let result = result.and_then(|durable_ms| {
            if durable_ms > PHYSICAL_MAX_MS {
                return Err(BackendError::Permanent(format!(
                    "the backend reports high-water {durable_ms} ms, past the 46-bit timestamp \
                     layout ({PHYSICAL_MAX_MS} ms)"
                )));
            }
            Ok(durable_ms)
        });
        let mut state = self.lock();
        let Mode::Serving(term) = &mut state.mode else {
            return Ok(());
        };
        if term.id != term_id {
            return Ok(());
        }
        term.extension_wanted = false;
        let error = match result {
            Ok(durable_ms) if durable_ms >= target_ms => {
                term.window.raise_high_water(durable_ms);
                None
            }
            Ok(durable_ms) => Some(BackendError::Permanent(
                CoreError::DurableBelowTarget {
                    durable_ms,
                    target_ms,
                }
                .to_string(),
            )),
            Err(e) => Some(e),
        };
        // On NotLeader/Fenced the extender steps down, which drops the term and its sender:
        // waiters then answer "not leader" with the hint of the step-down.
        if !matches!(
            error,
            Some(BackendError::NotLeader { .. } | BackendError::Fenced { .. })
        ) {
            term.outcome.send_replace(ExtensionOutcome {
                error: error.clone(),
            });
        }
        if term
            .window
            .wants_extension(self.clock.now_ms(), self.config.low_water_ms())
        {
            term.wake.notify_one();
        }
        error.map_or(Ok(()), Err)
    }
}

impl Serving for Shared {
    fn hint(&self) -> LeaderHint {
        Shared::hint(self)
    }

    fn poison(&self, error: ServeError) {
        Shared::poison(self, error);
    }

    fn serving_high_water(&self, epoch: Epoch) -> Option<u64> {
        match &self.lock().mode {
            Mode::Serving(term) if term.epoch == epoch => Some(term.window.high_water_ms()),
            _ => None,
        }
    }

    fn raise_serving_high_water(&self, epoch: Epoch, durable_ms: u64) {
        if let Mode::Serving(term) = &mut self.lock().mode
            && term.epoch == epoch
        {
            term.window.raise_high_water(durable_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{BoxFuture, Leadership, OracleCommand, OracleState, Stored};
    use tso_core::Fence;

    /// A backend the test never calls: the state is driven by hand.
    struct Unused;

    impl Backend for Unused {
        fn leadership(&self) -> watch::Receiver<Leadership> {
            watch::channel(Leadership::Unknown).1
        }

        fn leader_lease_valid(&self, _: Epoch) -> bool {
            true
        }

        fn load(&self) -> BoxFuture<'_, Result<OracleState, BackendError>> {
            unreachable!("not called")
        }

        fn apply(&self, _: OracleCommand, _: Epoch) -> BoxFuture<'_, Result<Stored, BackendError>> {
            unreachable!("not called")
        }
    }

    struct FrozenClock(u64);

    impl Clock for FrozenClock {
        fn now_ms(&self) -> u64 {
            self.0
        }

        fn monotonic_ms(&self) -> u64 {
            0
        }
    }

    fn high_water_ms(shared: &Shared) -> u64 {
        match &shared.lock().mode {
            Mode::Serving(term) => term.window.high_water_ms(),
            _ => panic!("not serving"),
        }
    }

    /// Defence in depth behind the watch ending the old extender before a new fence: even if an
    /// older term's extension reports late, it never raises the current term's high-water.
    #[test]
    fn a_late_extension_of_an_older_term_is_ignored() {
        let now_ms = 1_000_000;
        let shared = Shared::new(
            Arc::new(Unused),
            Config::default(),
            Arc::new(FrozenClock(now_ms)),
        );
        let fence_1 = Fence::plan(0, now_ms, 1_000).unwrap();
        let (term_1, _) = shared
            .start_serving(
                Epoch::new(1),
                fence_1.complete(fence_1.target_ms()).unwrap(),
            )
            .unwrap();
        shared.step_down(LeaderHint::default());
        let fence_2 = Fence::plan(fence_1.target_ms(), now_ms, 1_000).unwrap();
        let (term_2, _) = shared
            .start_serving(
                Epoch::new(2),
                fence_2.complete(fence_2.target_ms()).unwrap(),
            )
            .unwrap();
        assert_ne!(term_1, term_2);

        let late_ms = fence_2.target_ms() + 50_000;
        assert_eq!(
            shared.finish_extension(term_1, late_ms, Ok(late_ms)),
            Ok(())
        );
        assert_eq!(high_water_ms(&shared), fence_2.target_ms());
        assert!(matches!(shared.plan_extension(term_1), Plan::Gone));
    }

    /// A backend whose lease has always run out, like a leader cut off from its peers.
    struct LeaseLost;

    impl Backend for LeaseLost {
        fn leadership(&self) -> watch::Receiver<Leadership> {
            Unused.leadership()
        }

        fn leader_lease_valid(&self, _: Epoch) -> bool {
            false
        }

        fn load(&self) -> BoxFuture<'_, Result<OracleState, BackendError>> {
            unreachable!("not called")
        }

        fn apply(&self, _: OracleCommand, _: Epoch) -> BoxFuture<'_, Result<Stored, BackendError>> {
            unreachable!("not called")
        }
    }

    fn serving_without_lease(config: Config) -> Shared {
        let now_ms = 1_000_000;
        let shared = Shared::new(Arc::new(LeaseLost), config, Arc::new(FrozenClock(now_ms)));
        let fence = Fence::plan(0, now_ms, 1_000).unwrap();
        shared
            .start_serving(Epoch::new(1), fence.complete(fence.target_ms()).unwrap())
            .unwrap();
        shared
    }

    /// The grant path refuses once the lease ran out; only the checker's positive control
    /// (`unsafe_skip_leader_lease_check`) grants anyway.
    #[test]
    fn an_expired_lease_refuses_grants_unless_the_check_is_skipped() {
        let safe = serving_without_lease(Config::default());
        assert!(matches!(safe.try_grant(1), Err(Refusal::NotLeader(_))));
        let broken = serving_without_lease(Config {
            unsafe_skip_leader_lease_check: true,
            ..Config::default()
        });
        assert!(matches!(broken.try_grant(1), Ok(Attempt::Granted(..))));
    }

    /// States are published in the order they were taken: a step-down racing a poisoning never
    /// leaves the published state at NotServing after the node was poisoned.
    #[test]
    fn a_poisoning_is_never_overwritten_by_a_step_down() {
        const ROUNDS: usize = 300;
        for round in 0..ROUNDS {
            let shared = Arc::new(Shared::new(
                Arc::new(Unused),
                Config::default(),
                Arc::new(FrozenClock(1)),
            ));
            let serving = shared.serving();
            let stepping = Arc::clone(&shared);
            let stepper = std::thread::spawn(move || {
                for _ in 0..ROUNDS {
                    stepping.step_down(LeaderHint::default());
                }
            });
            std::thread::yield_now();
            shared.mark_poisoned("poisoned".into());
            stepper.join().unwrap();
            assert!(
                matches!(*serving.borrow(), ServingState::Failed { .. }),
                "round {round}: published {:?} after poisoning",
                *serving.borrow()
            );
        }
    }
}
