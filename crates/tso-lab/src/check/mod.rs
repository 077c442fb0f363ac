//! `tso check`: a Jepsen-style checker for the oracle.
//!
//! It starts a local cluster (or attaches to endpoints, load only), runs sequential clients
//! that record every call, applies a seeded nemesis schedule, and then checks the whole history
//! (duplicates, per-client regression, real-time order, grant shape) and liveness (a successful
//! reply within a bound after each fault heals). With `--workload seq` the clients take blocks
//! of dense sequences instead (`GetSeq` and `GetSeqBatch`), checked for overlaps (D1),
//! unexplained gaps (D2), the order of epochs and shape (`seq.rs`). With `--workload lease` they hold stamping leases, read the safe frontier and
//! take timestamps, checked for the frontier's rules (`lease.rs`). A run ends in a [`Verdict`]
//! or an error of usage or setup (the `tso` binary exits 0, 1 or 2). The seed is printed
//! first, and the schedule and history summary go to a file. A run is given [`CheckOptions`]
//! (`options.rs`), and starts its servers from the `tso` binary they name.

pub mod admin_client;
pub mod clients;
pub mod cluster;
pub mod etcd;
pub mod gaps;
pub mod history;
pub mod lease;
pub mod lease_client;
pub mod lease_keeper;
pub mod member;
pub mod options;
pub mod proxy;
pub mod restore;
pub mod schedule;
pub mod seq;
pub mod wipe;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;

use self::clients::{BLOCK_COUNT_MAX, Client, Mix, SEQ_BATCH_ONE_IN, SEQ_KEYS, Shared};
use self::cluster::Cluster;
use self::history::{Call, LivenessScope, Outcome, WireGrant, check, check_liveness, monotonic_ns};
use self::lease::{LeaseCall, LeaseOp, LeaseOutcome};
use self::lease_client::{LeaseClient, LeaseRoute};
use self::options::validate;
pub use self::options::{BenchMode, CheckBackend, CheckOptions, Controls, Workload};
use self::schedule::{Plan, Step};
use self::seq::{SeqCall, SeqOutcome};
use crate::targets::{CONNECTIONS_MAX, Dial, Route, Targets, client_builder};

/// Clients in one run at most: each is a task with its own connection.
pub const CLIENTS_MAX: usize = 256;
/// The longest pause drawn (and never more than half the liveness bound): long enough that
/// calls time out and clients reconnect, short enough to leave room for other faults.
const PAUSE_MAX: Duration = Duration::from_secs(3);
/// Violations printed on the terminal (the file has up to `VIOLATIONS_KEPT_MAX` per kind).
const VIOLATIONS_PRINTED_MAX: usize = 5;

/// What a run found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Clean,
    Violation,
}

/// Runs the checker on a runtime of its own: the verdict, or an error of usage or setup.
pub fn run(args: CheckOptions) -> anyhow::Result<Verdict> {
    if args.fault_disk() {
        // Before any thread: the fault layers' mounts then live in this process's own mount
        // namespace, and vanish with it however the run ends.
        tso_faultfs::enter_private_mount_namespace().context(
            "disk faults mount a filesystem under each node: run tso check as root, with \
             /dev/fuse",
        )?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_checker(args))
}

/// One applied fault, as written to the result file.
struct Event {
    step: Step,
    /// The node it hit, once the target was resolved.
    node: Option<usize>,
    applied: bool,
    /// How it went (`applied`, or a handoff's or membership change's outcome); `None` when it
    /// did not apply.
    outcome: Option<&'static str>,
    /// What happened, in words: the apply's, then the heal's.
    notes: Vec<String>,
    /// A node it sent SIGTERM did not exit in time and was killed.
    hung: bool,
    start_ms: u64,
    /// `CLOCK_MONOTONIC` ns when the fault was started, like the calls' times.
    start_ns: u64,
    /// Whether the node it hit led at the time (`leader`, `follower`), when known.
    role: Option<&'static str>,
    heal_ms: Option<u64>,
    heal_ns: Option<u64>,
    error: Option<String>,
}

impl Event {
    /// The outcome this event is counted under: its own, `not_applied`, or `error` when it
    /// failed to apply or heal.
    fn count_key(&self) -> &'static str {
        match (&self.error, self.outcome) {
            (Some(_), _) => "error",
            (None, Some(outcome)) => outcome,
            (None, None) => "not_applied",
        }
    }
}

/// Applied faults by kind, then by outcome.
fn fault_counts(events: &[Event]) -> BTreeMap<&'static str, BTreeMap<&'static str, u64>> {
    let mut counts: BTreeMap<&'static str, BTreeMap<&'static str, u64>> = BTreeMap::new();
    for event in events {
        *counts
            .entry(event.step.fault.kind().name())
            .or_default()
            .entry(event.count_key())
            .or_default() += 1;
    }
    counts
}

/// "3 kill, 2 handoff (1 handed_off, 1 handoff_failed)": the counts on one line.
fn describe_fault_counts(counts: &BTreeMap<&'static str, BTreeMap<&'static str, u64>>) -> String {
    let kinds: Vec<String> = counts
        .iter()
        .map(|(kind, outcomes)| {
            let total: u64 = outcomes.values().sum();
            match outcomes.keys().collect::<Vec<_>>()[..] {
                [&"applied"] => format!("{total} {kind}"),
                _ => {
                    let parts: Vec<String> =
                        outcomes.iter().map(|(o, n)| format!("{n} {o}")).collect();
                    format!("{total} {kind} ({})", parts.join(", "))
                }
            }
        })
        .collect();
    if kinds.is_empty() {
        "none".into()
    } else {
        kinds.join(", ")
    }
}

async fn run_checker(args: CheckOptions) -> anyhow::Result<Verdict> {
    validate(&args)?;
    if !args.verify.is_empty() {
        return verify(&args.verify);
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    println!("tso check: seed {seed} (replay with --seed {seed})");
    let work = WorkDir::new(args.work_dir.clone())?;
    let mut cluster = if args.endpoints.is_empty() {
        Some(start_cluster(&args, &work).await?)
    } else {
        None
    };
    let recorded = record(&args, seed, cluster.as_mut(), &work).await;
    if let Some(cluster) = cluster.as_mut() {
        cluster.stop().await;
    }
    let recorded = recorded?;
    if let Some(path) = &args.history {
        write_history(path, &recorded.history)?;
    }
    let verdict = judge(&args, &recorded, &work)?;
    if verdict == Verdict::Clean {
        work.clean_up();
    }
    Ok(verdict)
}

/// What a run recorded: the input of the verdict and of the result file.
struct Recorded {
    seed: u64,
    endpoints: Vec<String>,
    mix: Mix,
    faults_planned: usize,
    events: Vec<Event>,
    heals: Vec<u64>,
    history: History,
    /// `CLOCK_MONOTONIC` ns when the clients stopped.
    until_ns: u64,
    /// Milliseconds into the run when the clients reached `--calls-max`, if they did.
    capped_ms: Option<u64>,
}

/// Runs the clients and the nemesis for the duration (or until the call cap), then waits for
/// the service to answer after the last heal, and collects every call.
async fn record(
    args: &CheckOptions,
    seed: u64,
    cluster: Option<&mut Cluster>,
    work: &WorkDir,
) -> anyhow::Result<Recorded> {
    let endpoints = match &cluster {
        Some(cluster) => cluster.endpoints(),
        None => args.endpoints.clone(),
    };
    let steps = schedule::draw(&plan(args, seed, cluster.is_some()));
    let mix = Mix::new(args.clients, endpoints.len());
    println!(
        "tso check: {} against {} for {}, {} fault(s) scheduled; work dir {}",
        describe_clients(args, mix),
        endpoints.join(","),
        humantime::format_duration(args.duration),
        steps.len(),
        work.path().display()
    );
    let (shared, tasks) = start_clients(args, seed, &endpoints, mix).await?;
    let origin = Instant::now();
    let origin_ns = monotonic_ns();
    let events = match cluster {
        Some(cluster) => nemesis(cluster, &steps, origin, &shared, args.liveness_bound).await,
        None => Vec::new(),
    };
    shared.sleep_until(origin + args.duration).await;
    let heals: Vec<u64> = events.iter().filter_map(|e| e.heal_ns).collect();
    wait_for_recovery(&shared, heals.last().copied(), args.liveness_bound).await;
    shared.stop();
    let mut history = History::empty(args.workload);
    for task in tasks {
        history.append(task.await.context("a client panicked")??);
    }
    let until_ns = shared.stopped_ns().expect("the clients were stopped");
    let capped_ms = shared
        .capped()
        .then(|| until_ns.saturating_sub(origin_ns) / 1_000_000);
    Ok(Recorded {
        seed,
        endpoints,
        mix,
        faults_planned: steps.len(),
        events,
        heals,
        history,
        until_ns,
        capped_ms,
    })
}

/// The nemesis plan of a run; attached runs (no local cluster) draw no faults.
fn plan(args: &CheckOptions, seed: u64, local: bool) -> Plan {
    Plan {
        seed,
        nodes: args.nodes,
        kinds: if local { args.faults.clone() } else { vec![] },
        duration: args.duration,
        interval: args.fault_interval,
        pause_max: (args.liveness_bound / 2).min(PAUSE_MAX),
        positive_control: args.controls.unsafe_positive_control,
        no_leader_lease_control: args.controls.unsafe_no_leader_lease,
        seq_forget_control: args.controls.unsafe_seq_forget,
        lease_forget_control: args.controls.unsafe_lease_forget,
        leader_removal_control: args.controls.unsafe_allow_leader_removal,
        trust_wiped_control: args.controls.unsafe_trust_wiped,
        power_control: args.controls.power_control(),
        etcd_ignore_lease_control: args.controls.unsafe_etcd_ignore_lease,
        etcd_skip_fence_control: args.controls.unsafe_etcd_skip_fence,
        raise_control: args.controls.unsafe_raise_in_memory,
        slow_fsync_ms: args.slow_fsync.map(|d| d.as_millis() as u64),
    }
}

/// "8 raw client(s) (3 pinned one per node, 5 following the leader)", for the opening line.
fn describe_clients(args: &CheckOptions, mix: Mix) -> String {
    let clients = describe_mix(args, mix);
    match args.workload {
        Workload::Ts => clients,
        Workload::Seq => format!(
            "{clients} taking blocks of 1 to {BLOCK_COUNT_MAX} values of {} (one call in \
             {SEQ_BATCH_ONE_IN} a GetSeqBatch of 1 to {} of them)",
            SEQ_KEYS.join(","),
            SEQ_KEYS.len()
        ),
        Workload::Lease => format!(
            "{clients} holding stamping leases{} (TTL {} ms), reading the frontier and taking timestamps",
            match args.mode {
                BenchMode::Raw => "",
                BenchMode::Library => " through LeaseKeeper (stampers raw)",
            },
            lease_client::LEASE_TTLS_MS
                .map(|t| t.to_string())
                .join(", ")
        ),
    }
}

fn describe_mix(args: &CheckOptions, mix: Mix) -> String {
    let mode = args.mode.name();
    match (mix.pinned, args.mode) {
        (0, _) => format!("{} {mode} client(s)", args.clients),
        (pinned, BenchMode::Raw) => format!(
            "{} raw client(s) ({pinned} pinned one per node, {} following the leader)",
            args.clients,
            args.clients - pinned
        ),
        (pinned, BenchMode::Library) => format!(
            "{} client(s) ({pinned} raw pinned one per node, {} through the client library)",
            args.clients,
            args.clients - pinned
        ),
    }
}

async fn start_cluster(args: &CheckOptions, work: &WorkDir) -> anyhow::Result<Cluster> {
    let mut unsafe_flags = args.controls.server_flags();
    if args.workload == Workload::Lease {
        unsafe_flags.extend(lease_client::SERVE_LEASE_TTL_MIN_FLAGS);
    }
    Cluster::start(
        &args.server_bin,
        work.path(),
        args.nodes,
        args.backend,
        &unsafe_flags,
        args.fault_disk(),
    )
    .await
}

type ClientTask = tokio::task::JoinHandle<anyhow::Result<History>>;

/// Starts the recording clients: the pinned ones on raw RPCs to their node, the others raw or
/// through one shared client library.
async fn start_clients(
    args: &CheckOptions,
    seed: u64,
    endpoints: &[String],
    mix: Mix,
) -> anyhow::Result<(Arc<Shared>, Vec<ClientTask>)> {
    let targets = Arc::new(Targets::new(
        endpoints,
        args.clients.min(CONNECTIONS_MAX),
        args.call_timeout,
        Dial::new(args.tls.as_ref().map(tso_client::ClientTls::tonic_config)),
    )?);
    let library = match args.mode {
        BenchMode::Raw => None,
        BenchMode::Library => Some(
            client_builder(args.tls.as_ref())
                .overall_timeout(args.call_timeout)
                .connect(endpoints)
                .await
                .context("starting the client library")?,
        ),
    };
    let shared = Arc::new(Shared::new(args.calls_max));
    if args.workload == Workload::Lease {
        let tasks = start_lease_clients(args, seed, targets, library.as_ref(), mix, &shared)?;
        return Ok((shared, tasks));
    }
    let mut tasks = Vec::with_capacity(args.clients);
    for id in 0..args.clients {
        let pinned = mix.node_of(id as u32);
        let route = match (pinned, &library) {
            (Some(node), _) => Route::pinned(&targets, node, id)?,
            (None, Some(client)) => Route::Library(client.clone()),
            (None, None) => Route::raw(Arc::clone(&targets), id)?,
        };
        let client = Client {
            id: id as u32,
            seed,
            count_max: args.count_max,
            workload: args.workload,
            route,
            pinned: pinned.is_some(),
            shared: Arc::clone(&shared),
        };
        tasks.push(tokio::spawn(client.run()));
    }
    Ok((shared, tasks))
}

/// Starts the lease workload's clients, pinned readers first: raw RPCs (see
/// `lease_client.rs`), or with `library` its holders through `LeaseKeeper` and its readers
/// through the library too (`lease_keeper.rs`).
fn start_lease_clients(
    args: &CheckOptions,
    seed: u64,
    targets: Arc<Targets>,
    library: Option<&tso_client::Client>,
    mix: Mix,
    shared: &Arc<Shared>,
) -> anyhow::Result<Vec<ClientTask>> {
    let mut tasks = Vec::with_capacity(args.clients);
    for id in 0..args.clients as u32 {
        let pinned = mix.node_of(id);
        let role = lease_client::role(id, mix.pinned);
        let shared = Arc::clone(shared);
        let task = match (role, library, pinned) {
            (lease_client::Role::Holder, Some(client), None) => {
                let holder = lease_keeper::KeeperHolder {
                    id,
                    seed,
                    client: client.clone(),
                    shared,
                };
                tokio::spawn(async move { Ok(History::Lease(holder.run().await)) })
            }
            (lease_client::Role::Reader, Some(client), None) => {
                let reader = lease_keeper::LibraryReader {
                    id,
                    client: client.clone(),
                    shared,
                };
                tokio::spawn(async move { Ok(History::Lease(reader.run().await)) })
            }
            _ => {
                let node = pinned.unwrap_or(id as usize);
                let route =
                    LeaseRoute::new(Arc::clone(&targets), node, id as usize, pinned.is_some())?;
                let client = LeaseClient {
                    id,
                    seed,
                    role,
                    route,
                    shared,
                };
                tokio::spawn(async move { Ok(History::Lease(client.run().await)) })
            }
        };
        tasks.push(task);
    }
    Ok(tasks)
}

/// Applies the schedule in real time; every fault heals before the next one starts, and a
/// fault starts only once a call has succeeded since the previous heal (or the liveness bound
/// passed): faults never pile up on a service that has not recovered, and every fault has
/// replies on both sides of it to compare, whatever the machine's speed. When the clients stop
/// (at the call cap), the fault under way heals at once and no other starts.
async fn nemesis(
    cluster: &mut Cluster,
    steps: &[Step],
    origin: Instant,
    shared: &Shared,
    bound: Duration,
) -> Vec<Event> {
    let mut events: Vec<Event> = Vec::with_capacity(steps.len());
    for &step in steps {
        if !shared
            .sleep_until(origin + Duration::from_millis(step.at_ms))
            .await
        {
            break;
        }
        let healed_ns = events.iter().rev().find_map(|e| e.heal_ns).unwrap_or(0);
        wait_for_recovery(shared, Some(healed_ns), bound).await;
        if shared.is_stopped() {
            break;
        }
        let event = apply_step(cluster, step, origin, shared).await;
        let notes = if event.notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", event.notes.join("; "))
        };
        eprintln!(
            "tso check: {:>7} ms  {}{notes}{}",
            event.start_ms,
            step.fault.describe(),
            event
                .error
                .as_deref()
                .map(|e| format!(": FAILED: {e}"))
                .unwrap_or_default()
        );
        events.push(event);
    }
    events
}

/// Applies one fault, holds it for its length (or until the clients stop), and heals it.
async fn apply_step(cluster: &mut Cluster, step: Step, origin: Instant, shared: &Shared) -> Event {
    let since = |at: Instant| (at - origin).as_millis() as u64;
    let mut event = Event {
        step,
        node: None,
        applied: false,
        outcome: None,
        notes: Vec::new(),
        hung: false,
        start_ms: since(Instant::now()),
        start_ns: monotonic_ns(),
        role: None,
        heal_ms: None,
        heal_ns: None,
        error: None,
    };
    let at = cluster.resolve(step.fault.target()).await;
    event.node = at;
    // An etcd fault's target is an etcd member: its role is the one it has in etcd's raft.
    match (at, step.fault.kind().on_etcd()) {
        (Some(at), false) => event.role = Some(cluster.role_of(step.fault.target(), at).await),
        (Some(at), true) => event.role = cluster.etcd_role_of(at).await,
        (None, _) => {}
    }
    if let Some(at) = at {
        match cluster.apply(step.fault, at).await {
            Ok(Some(applied)) => {
                event.applied = true;
                event.outcome = Some(applied.outcome);
                event.notes.extend(applied.note);
                event.hung = applied.hung;
            }
            Ok(None) => {}
            Err(err) => event.error = Some(format!("{err:#}")),
        }
    }
    if let (true, Some(at)) = (event.applied, at) {
        let length = Duration::from_millis(step.fault.length_ms());
        shared.sleep_until(Instant::now() + length).await;
        event.heal_ms = Some(since(Instant::now()));
        event.heal_ns = Some(monotonic_ns());
        match cluster.heal(step.fault, at).await {
            Ok(note) => event.notes.extend(note),
            Err(err) => event.error = Some(format!("{err:#}")),
        }
    }
    event
}

/// After the last heal, runs on until a reply succeeds after it, the bound passes, or the
/// clients stop.
async fn wait_for_recovery(shared: &Shared, last_heal_ns: Option<u64>, bound: Duration) {
    let Some(heal_ns) = last_heal_ns else {
        return;
    };
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline
        && !shared.is_stopped()
        && shared.last_ok_ns.load(Ordering::Relaxed) <= heal_ns
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the clients recorded, by workload.
pub enum History {
    Ts(Vec<Call>),
    Seq(Vec<SeqCall>),
    Lease(Vec<LeaseCall>),
}

impl History {
    fn empty(workload: Workload) -> History {
        match workload {
            Workload::Ts => History::Ts(Vec::new()),
            Workload::Seq => History::Seq(Vec::new()),
            Workload::Lease => History::Lease(Vec::new()),
        }
    }

    /// Adds one client's calls.
    fn append(&mut self, other: History) {
        match (self, other) {
            (History::Ts(all), History::Ts(more)) => all.extend(more),
            (History::Seq(all), History::Seq(more)) => all.extend(more),
            (History::Lease(all), History::Lease(more)) => all.extend(more),
            _ => unreachable!("every client of a run has the run's workload"),
        }
    }

    fn len(&self) -> usize {
        match self {
            History::Ts(calls) => calls.len(),
            History::Seq(calls) => calls.len(),
            History::Lease(calls) => calls.len(),
        }
    }
}

/// What the history checks found, by workload.
enum Checked {
    Ts(history::Report),
    Seq(seq::Report),
    Lease(lease::Report),
}

impl Checked {
    fn is_clean(&self) -> bool {
        match self {
            Checked::Ts(report) => report.is_clean(),
            Checked::Seq(report) => report.is_clean(),
            Checked::Lease(report) => report.is_clean(),
        }
    }

    /// `clean (0 duplicate, ...)` or `VIOLATION (...)`.
    fn summary(&self) -> String {
        let verdict = if self.is_clean() {
            "clean"
        } else {
            "VIOLATION"
        };
        match self {
            Checked::Ts(report) => format!("{verdict} ({})", report.counts),
            Checked::Seq(report) => {
                let total = report.total();
                format!(
                    "{verdict} ({}; {} value(s) skipped in {} gap(s), {} uncertain call(s) asked for {})",
                    report.counts,
                    total.skipped,
                    total.gaps,
                    total.uncertain,
                    total.uncertain_values
                )
            }
            Checked::Lease(report) => format!(
                "{verdict} ({}; judged: {} frontier read(s) against a live lease, {} grant(s) \
                 against an earlier leader's bound, {} permit(s) against the server's expiry)",
                report.counts,
                report.stats.reads_bounded,
                report.stats.grants_bounded,
                report.stats.permits_bounded
            ),
        }
    }

    /// Every kept violation, described.
    fn examples(&self, history: &History) -> Vec<String> {
        match (self, history) {
            (Checked::Ts(report), History::Ts(calls)) => report
                .violations
                .iter()
                .map(|v| v.describe(calls))
                .collect(),
            (Checked::Seq(report), History::Seq(calls)) => report
                .violations
                .iter()
                .map(|v| v.describe(calls, &SEQ_KEYS))
                .collect(),
            (Checked::Lease(report), History::Lease(calls)) => report
                .violations
                .iter()
                .map(|v| v.describe(calls))
                .collect(),
            _ => unreachable!("a history is checked by its own workload's checks"),
        }
    }
}

/// When the run restarted a server process (the heal of a kill, a handoff, a membership change,
/// a wipe, a power loss, or a disk error or full disk that stopped it): a restarted raft leader
/// may resume its term, so the lease checks do not take one epoch for one process across these.
fn restarts_ns(events: &[Event]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| restarts_a_process(e.step.fault.kind()))
        .filter_map(|e| e.heal_ns)
        .collect()
}

/// Whether the heal of a fault of `kind` may start a server process anew.
fn restarts_a_process(kind: schedule::FaultKind) -> bool {
    use schedule::FaultKind;
    match kind {
        FaultKind::Kill
        | FaultKind::Restore
        | FaultKind::Handoff
        | FaultKind::Member
        | FaultKind::Wipe
        | FaultKind::Power
        | FaultKind::DiskError
        | FaultKind::DiskFull => true,
        // An etcd member's restart leaves every oracle process running (its leader may lose
        // its lease and campaign again, for a new epoch).
        FaultKind::Pause
        | FaultKind::Clock
        | FaultKind::Partition
        | FaultKind::SlowDisk
        | FaultKind::EtcdKill
        | FaultKind::EtcdQuorum
        | FaultKind::EtcdCut
        | FaultKind::EtcdCompact
        | FaultKind::EtcdDefrag
        | FaultKind::Raise => false,
    }
}

/// Checks a sequence history: from 0 on a local cluster (fresh), from each key's lowest block
/// otherwise.
fn check_seq(calls: &[SeqCall], fresh: bool) -> seq::Report {
    let floor = if fresh {
        seq::Floor::Zero
    } else {
        seq::Floor::Unknown
    };
    seq::check(calls, SEQ_KEYS.len(), floor)
}

/// Everything a run found.
struct Findings {
    checked: Checked,
    /// Time from each heal to the next successful reply (`None`: none came).
    recoveries: Vec<Option<u64>>,
    stalls: Vec<history::Stall>,
    /// Heals without a reply whose bound ran past the clients' stop (at the call cap).
    unjudged: usize,
    /// Calls that got what they asked for: grants, or sequence blocks.
    granted: usize,
    malformed: usize,
    /// Failed calls by code; for sequences, the definite refusals only.
    errors: BTreeMap<String, u64>,
    /// Sequence calls that may have spent their values, by code.
    uncertain: BTreeMap<String, u64>,
    /// Faults that could not be applied or healed (a node that did not restart).
    fault_errors: usize,
    /// Nodes that started on a data directory without its raft log.
    partial_started: usize,
    /// For each fault, the longest stretch around it without an answer (see `gaps.rs`).
    gaps: Vec<Option<u64>>,
}

impl Findings {
    fn gather(args: &CheckOptions, recorded: &Recorded) -> Findings {
        let (mut granted, mut malformed) = (0, 0);
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        let mut uncertain: BTreeMap<String, u64> = BTreeMap::new();
        let ((recoveries, stalls), checked) = match &recorded.history {
            History::Ts(calls) => {
                for call in calls {
                    match &call.outcome {
                        Outcome::Granted(_) => granted += 1,
                        Outcome::Malformed(_) => malformed += 1,
                        Outcome::Failed(code) => *errors.entry(code.clone()).or_default() += 1,
                    }
                }
                (liveness(args, recorded, calls), Checked::Ts(check(calls)))
            }
            History::Seq(calls) => {
                for call in calls {
                    match &call.outcome {
                        SeqOutcome::Block { .. } => granted += 1,
                        SeqOutcome::Malformed(_) => malformed += 1,
                        SeqOutcome::Refused(code) => *errors.entry(code.clone()).or_default() += 1,
                        SeqOutcome::Uncertain(code) => {
                            *uncertain.entry(code.clone()).or_default() += 1
                        }
                    }
                }
                let report = check_seq(calls, args.endpoints.is_empty());
                (liveness(args, recorded, calls), Checked::Seq(report))
            }
            History::Lease(calls) => {
                for call in calls {
                    match &call.outcome {
                        LeaseOutcome::Refused(code) => {
                            *errors.entry(code.clone()).or_default() += 1
                        }
                        LeaseOutcome::Ambiguous(code) => {
                            *uncertain.entry(code.clone()).or_default() += 1
                        }
                        _ if history::Answered::succeeded(call) => granted += 1,
                        _ => {}
                    }
                }
                let report = lease::check(calls, &restarts_ns(&recorded.events));
                (liveness(args, recorded, calls), Checked::Lease(report))
            }
        };
        let unanswered = recoveries.iter().filter(|r| r.is_none()).count();
        let stalled_unanswered = stalls.iter().filter(|s| s.recovered_after_ns.is_none());
        Findings {
            checked,
            unjudged: unanswered - stalled_unanswered.count(),
            recoveries,
            stalls,
            granted,
            malformed,
            errors,
            uncertain,
            fault_errors: recorded.events.iter().filter(|e| e.error.is_some()).count(),
            partial_started: recorded
                .events
                .iter()
                .filter(|e| e.outcome == Some(wipe::STARTED_PARTIAL))
                .count(),
            gaps: fault_gaps(args, recorded),
        }
    }

    fn clean(&self) -> bool {
        self.checked.is_clean()
            && self.stalls.is_empty()
            && self.granted > 0
            && self.fault_errors == 0
            && self.partial_started == 0
    }

    fn print(&self, args: &CheckOptions, recorded: &Recorded) {
        if let Some(capped_ms) = recorded.capped_ms {
            println!(
                "tso check: the clients reached --calls-max ({}) after {capped_ms} ms; the nemesis stopped with them ({} of {} fault(s) applied)",
                args.calls_max,
                recorded.events.len(),
                recorded.faults_planned
            );
        }
        let calls = recorded.history.len();
        match &self.checked {
            Checked::Ts(_) => println!(
                "tso check: {calls} calls, {} granted, {} malformed, errors {:?}",
                self.granted, self.malformed, self.errors
            ),
            Checked::Seq(report) => println!(
                "tso check: {} calls ({} GetSeq, {} GetSeqBatch of {} entries), {} blocks ({} values), {} malformed, refused {:?}, uncertain {:?} (by entry)",
                report.rpcs.total(),
                report.rpcs.get_seq,
                report.rpcs.get_seq_batch,
                report.rpcs.batch_entries,
                self.granted,
                report.total().values,
                self.malformed,
                self.errors,
                self.uncertain
            ),
            Checked::Lease(report) => {
                let s = report.stats;
                println!(
                    "tso check: {calls} calls, {} answered: {} lease(s) acquired, {} renewal(s), {} release(s), {} frontier read(s), {} grant(s), {} permit(s); refused {:?}, ambiguous {:?}",
                    self.granted,
                    s.leases,
                    s.renewals,
                    s.releases,
                    s.frontier_reads,
                    s.grants,
                    s.permits,
                    self.errors,
                    self.uncertain
                )
            }
        }
        println!("tso check: history: {}", self.checked.summary());
        for example in self
            .checked
            .examples(&recorded.history)
            .iter()
            .take(VIOLATIONS_PRINTED_MAX)
        {
            println!("  {example}");
        }
        println!(
            "tso check: faults: {}",
            describe_fault_counts(&fault_counts(&recorded.events))
        );
        let hung = recorded.events.iter().filter(|e| e.hung).count();
        if hung > 0 {
            println!(
                "tso check: {hung} node(s) sent SIGTERM did not exit within {:?} and were killed \
                 (a shutdown that hangs: see the notes in the result file)",
                cluster::TERM_EXIT_MAX
            );
        }
        self.print_liveness(args, recorded.heals.len());
        self.print_gaps(recorded);
        if self.granted == 0 {
            println!("tso check: VIOLATION: no call succeeded at all");
        }
        if self.fault_errors > 0 {
            println!(
                "tso check: VIOLATION: {} fault(s) failed to apply or heal (a node did not restart?)",
                self.fault_errors
            );
        }
        if self.partial_started > 0 {
            println!(
                "tso check: VIOLATION: {} node(s) started on a data directory without its raft \
                 log (a partial directory accepted: it could vote twice in one term)",
                self.partial_started
            );
        }
    }

    /// The worst and median gap in answers by kind of fault and the role of the node it hit.
    fn print_gaps(&self, recorded: &Recorded) {
        let mut by_kind: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (event, gap) in recorded.events.iter().zip(&self.gaps) {
            if let Some(gap) = gap {
                let role = event.role.map(|r| format!(" of a {r}")).unwrap_or_default();
                let key = format!("{}{role}", event.step.fault.kind().name());
                by_kind.entry(key).or_default().push(*gap);
            }
        }
        if by_kind.is_empty() {
            return;
        }
        let parts: Vec<String> = by_kind
            .into_iter()
            .map(|(kind, mut gaps)| {
                gaps.sort_unstable();
                let worst = gaps[gaps.len() - 1] as f64 / 1e6;
                let median = gaps[gaps.len() / 2] as f64 / 1e6;
                format!(
                    "{kind}: worst {worst:.1} ms, median {median:.1} ms ({} fault(s))",
                    gaps.len()
                )
            })
            .collect();
        println!(
            "tso check: longest gap in answers around each fault: {}",
            parts.join("; ")
        );
    }

    fn print_liveness(&self, args: &CheckOptions, heals: usize) {
        let bound = humantime::format_duration(args.liveness_bound);
        let worst_ms = self
            .recoveries
            .iter()
            .flatten()
            .max()
            .map(|&ns| ns as f64 / 1e6);
        let judged = heals - self.unjudged;
        match (self.stalls.is_empty(), worst_ms) {
            (true, Some(worst)) => println!(
                "tso check: liveness: {judged} heal(s), every one answered within {bound} (worst {worst:.1} ms)"
            ),
            (true, None) => println!("tso check: liveness: no faults healed"),
            (false, _) => println!(
                "tso check: liveness: VIOLATION: {} heal(s) without a reply within {bound}",
                self.stalls.len()
            ),
        }
        if self.unjudged > 0 {
            println!(
                "tso check: liveness: {} heal(s) not judged: the clients stopped at --calls-max before a reply or the bound",
                self.unjudged
            );
        }
    }
}

/// Checks the history, prints the verdict, and writes the result file.
fn judge(args: &CheckOptions, recorded: &Recorded, work: &WorkDir) -> anyhow::Result<Verdict> {
    let findings = Findings::gather(args, recorded);
    findings.print(args, recorded);
    let clean = findings.clean();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("tso-check-{}.json", recorded.seed)));
    let result = result_json(args, recorded, &findings, work);
    std::fs::write(&out, serde_json::to_string_pretty(&result)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    println!(
        "tso check: {}; schedule and summary in {}",
        if clean { "CLEAN" } else { "VIOLATION" },
        out.display()
    );
    Ok(if clean {
        Verdict::Clean
    } else {
        Verdict::Violation
    })
}

/// For each fault that applied, the longest stretch without an answer to the clients that
/// follow the leader, from its start until the liveness bound after its heal (or the next
/// fault's start, or the clients' stop, if sooner).
fn fault_gaps(args: &CheckOptions, recorded: &Recorded) -> Vec<Option<u64>> {
    let counts = |client: u32| recorded.mix.node_of(client).is_none();
    let answers = match &recorded.history {
        History::Ts(calls) => gaps::Answers::new(calls, |c| counts(c.client)),
        History::Seq(calls) => gaps::Answers::new(calls, |c| counts(c.client)),
        History::Lease(calls) => gaps::Answers::new(calls, |c| counts(c.client)),
    };
    let bound_ns = args.liveness_bound.as_nanos() as u64;
    let events = &recorded.events;
    events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            let heal_ns = event.heal_ns?;
            let next_ns = events.get(i + 1).map_or(u64::MAX, |e| e.start_ns);
            let to_ns = (heal_ns + bound_ns).min(next_ns).min(recorded.until_ns);
            Some(answers.longest_gap_ns(event.start_ns, to_ns))
        })
        .collect()
}

/// Recovery after each heal, judged on the calls of the clients that follow the leader.
fn liveness<C: history::Answered>(
    args: &CheckOptions,
    recorded: &Recorded,
    calls: &[C],
) -> (Vec<Option<u64>>, Vec<history::Stall>) {
    let scope = LivenessScope {
        bound_ns: args.liveness_bound.as_nanos() as u64,
        until_ns: recorded.until_ns,
        counts: |call: &C| recorded.mix.node_of(call.client()).is_none(),
    };
    check_liveness(calls, &recorded.heals, &scope)
}

/// The result file: the run's parameters, the schedule as applied, and the findings.
fn result_json(
    args: &CheckOptions,
    recorded: &Recorded,
    findings: &Findings,
    work: &WorkDir,
) -> serde_json::Value {
    let pinned: Vec<serde_json::Value> = (0..args.clients as u32)
        .filter_map(|id| recorded.mix.node_of(id).map(|node| (id, node)))
        .map(|(client, node)| serde_json::json!({ "client": client, "node": node }))
        .collect();
    let (history, violations) = history_json(recorded, findings);
    serde_json::json!({
        "seed": recorded.seed,
        "verdict": if findings.clean() { "clean" } else { "violation" },
        "workload": args.workload.name(),
        "endpoints": recorded.endpoints,
        "nodes": args.nodes,
        "backend": args.backend.name(),
        "clients": args.clients,
        "pinned_clients": pinned,
        "mode": args.mode.name(),
        "count_max": match args.workload {
            Workload::Ts => args.count_max,
            Workload::Seq => BLOCK_COUNT_MAX,
            Workload::Lease => 1,
        },
        "calls_max": args.calls_max,
        "duration_s": args.duration.as_secs_f64(),
        "capped_ms": recorded.capped_ms,
        "positive_control": args.controls.unsafe_positive_control,
        "no_leader_lease_control": args.controls.unsafe_no_leader_lease,
        "seq_forget_control": args.controls.unsafe_seq_forget,
        "seq_burn_refused_control": args.controls.unsafe_seq_burn_refused,
        "lease_forget_control": args.controls.unsafe_lease_forget,
        "lease_wall_expiry_control": args.controls.unsafe_lease_wall_expiry,
        "lease_bound_in_memory_control": args.controls.unsafe_lease_bound_in_memory,
        "leader_removal_control": args.controls.unsafe_allow_leader_removal,
        "trust_wiped_control": args.controls.unsafe_trust_wiped,
        "skip_dir_fsync_control": args.controls.unsafe_skip_dir_fsync,
        "ack_before_fsync_control": args.controls.unsafe_ack_before_fsync,
        "etcd_ignore_lease_control": args.controls.unsafe_etcd_ignore_lease,
        "etcd_skip_fence_control": args.controls.unsafe_etcd_skip_fence,
        "raise_in_memory_control": args.controls.unsafe_raise_in_memory,
        "handoff_keep_leader_lease_control": args.controls.unsafe_handoff_keep_leader_lease,
        "ungate_elections_ablation": args.controls.unsafe_ungate_elections,
        "partial_started": findings.partial_started,
        "work_dir": work.path(),
        "faults_planned": recorded.faults_planned,
        "faults": fault_counts(&recorded.events),
        "sigterm_killed": recorded.events.iter().filter(|e| e.hung).count(),
        "schedule": recorded.events.iter().zip(&findings.gaps).map(|(e, gap)| serde_json::json!({
            "planned_ms": e.step.at_ms,
            "kind": e.step.fault.kind().name(),
            "fault": e.step.fault.describe(),
            "node": e.node,
            "applied": e.applied,
            "outcome": e.outcome,
            "notes": e.notes,
            "start_ms": e.start_ms,
            "role": e.role,
            "heal_ms": e.heal_ms,
            "error": e.error,
            "gap_ms": gap.map(|ns| ns as f64 / 1e6),
        })).collect::<Vec<_>>(),
        "history": history,
        "violations": violations,
        "liveness": {
            "bound_ms": args.liveness_bound.as_millis() as u64,
            "recoveries_ms": findings.recoveries.iter().map(|r| r.map(|ns| ns as f64 / 1e6)).collect::<Vec<_>>(),
            "stalls": findings.stalls.iter().map(|s| s.heal).collect::<Vec<_>>(),
            "unjudged": findings.unjudged,
        },
    })
}

/// The result file's `history` and `violations` objects, by workload.
fn history_json(
    recorded: &Recorded,
    findings: &Findings,
) -> (serde_json::Value, serde_json::Value) {
    let examples = findings.checked.examples(&recorded.history);
    match (&findings.checked, &recorded.history) {
        (Checked::Ts(report), History::Ts(calls)) => {
            let timestamps: u64 = calls
                .iter()
                .filter_map(|c| match c.outcome {
                    Outcome::Granted(g) => Some(u64::from(g.count)),
                    Outcome::Failed(_) | Outcome::Malformed(_) => None,
                })
                .sum();
            let history = serde_json::json!({
                "calls": calls.len(),
                "granted": findings.granted,
                "malformed": findings.malformed,
                "timestamps": timestamps,
                "errors": findings.errors,
            });
            let violations = serde_json::json!({
                "duplicate": report.counts.duplicate,
                "regression": report.counts.regression,
                "real_time": report.counts.real_time,
                "shape": report.counts.shape,
                "examples": examples,
            });
            (history, violations)
        }
        (Checked::Seq(report), History::Seq(calls)) => {
            let key_json = |name: &str, k: &seq::KeyStats| {
                serde_json::json!({
                    "key": name,
                    "blocks": k.blocks,
                    "values": k.values,
                    "top": k.top,
                    "uncertain": k.uncertain,
                    "uncertain_values": k.uncertain_values,
                    "skipped_values": k.skipped,
                    "gaps": k.gaps,
                })
            };
            let total = report.total();
            let history = serde_json::json!({
                "calls": report.rpcs.total(),
                "get_seq_calls": report.rpcs.get_seq,
                "get_seq_batch_calls": report.rpcs.get_seq_batch,
                "entries": calls.len(),
                "blocks": total.blocks,
                "values": total.values,
                "uncertain": total.uncertain,
                "uncertain_values": total.uncertain_values,
                "skipped_values": total.skipped,
                "gaps": total.gaps,
                "malformed": findings.malformed,
                "refused": findings.errors,
                "uncertain_codes": findings.uncertain,
                "keys": SEQ_KEYS.iter().zip(&report.keys).map(|(n, k)| key_json(n, k)).collect::<Vec<_>>(),
            });
            let violations = serde_json::json!({
                "overlap": report.counts.overlap,
                "gap": report.counts.gap,
                "epoch": report.counts.epoch,
                "shape": report.counts.shape,
                "examples": examples,
            });
            (history, violations)
        }
        (Checked::Lease(report), History::Lease(calls)) => {
            let s = report.stats;
            let history = serde_json::json!({
                "calls": calls.len(),
                "answered": findings.granted,
                "leases": s.leases,
                "renewals": s.renewals,
                "releases": s.releases,
                "frontier_reads": s.frontier_reads,
                "frontier_reads_bounded": s.reads_bounded,
                "grants": s.grants,
                "grants_bounded": s.grants_bounded,
                "permits": s.permits,
                "permits_bounded": s.permits_bounded,
                "refused": findings.errors,
                "ambiguous": findings.uncertain,
            });
            let violations = serde_json::json!({
                "frontier_above_lease": report.counts.above_lease,
                "frontier_regression": report.counts.regression,
                "bound_below_grant": report.counts.bound_below_grant,
                "shared_lease_id": report.counts.shared_id,
                "later_grant_below_bound": report.counts.later_grant_below_bound,
                "permit_past_expiry": report.counts.permit_past_expiry,
                "examples": examples,
            });
            (history, violations)
        }
        _ => unreachable!("a history is checked by its own workload's checks"),
    }
}

/// Checks recorded histories, merged: each file's clients become distinct clients. The files
/// hold timestamp calls or sequence calls (lines with a `key`), not both.
fn verify(paths: &[PathBuf]) -> anyhow::Result<Verdict> {
    let mut calls = Vec::new();
    let mut seq_calls = Vec::new();
    let mut keys: Vec<String> = Vec::new();
    let mut clients: HashMap<(usize, u64), u32> = HashMap::new();
    for (file, path) in paths.iter().enumerate() {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", path.display(), n + 1))?;
            let client = u64_field(&v, "client")
                .with_context(|| format!("{}:{}: not a recorded call", path.display(), n + 1))?;
            let next = clients.len() as u32;
            let client = *clients.entry((file, client)).or_insert(next);
            anyhow::ensure!(
                v.get("op").is_none(),
                "{}:{}: a lease-workload call: --verify checks timestamp and sequence histories only",
                path.display(),
                n + 1
            );
            let parsed = if v.get("key").is_some() {
                parse_seq_call(&v, &mut keys).map(|call| seq_calls.push(SeqCall { client, ..call }))
            } else {
                parse_call(&v).map(|call| calls.push(Call { client, ..call }))
            };
            parsed.with_context(|| format!("{}:{}: not a recorded call", path.display(), n + 1))?;
        }
    }
    anyhow::ensure!(
        calls.is_empty() || seq_calls.is_empty(),
        "the files mix timestamp and sequence calls: verify them apart"
    );
    let (clean, summary, examples) = if seq_calls.is_empty() {
        let report = check(&calls);
        let examples: Vec<String> = report
            .violations
            .iter()
            .map(|v| v.describe(&calls))
            .collect();
        (report.is_clean(), report.counts.to_string(), examples)
    } else {
        // Histories from elsewhere may not start at a fresh key: below each key's lowest block
        // nothing is judged.
        let report = seq::check(&seq_calls, keys.len(), seq::Floor::Unknown);
        let names: Vec<&str> = keys.iter().map(String::as_str).collect();
        let examples: Vec<String> = report
            .violations
            .iter()
            .map(|v| v.describe(&seq_calls, &names))
            .collect();
        (report.is_clean(), report.counts.to_string(), examples)
    };
    println!(
        "tso check: {} calls from {} file(s), {} client(s); history: {} ({summary})",
        calls.len() + seq_calls.len(),
        paths.len(),
        clients.len(),
        if clean { "clean" } else { "VIOLATION" },
    );
    for example in examples.iter().take(VIOLATIONS_PRINTED_MAX) {
        println!("  {example}");
    }
    Ok(if clean {
        Verdict::Clean
    } else {
        Verdict::Violation
    })
}

fn u64_field(v: &serde_json::Value, key: &str) -> anyhow::Result<u64> {
    v[key]
        .as_u64()
        .with_context(|| format!("missing or bad {key:?}"))
}

fn u32_field(v: &serde_json::Value, key: &str) -> anyhow::Result<u32> {
    Ok(u32::try_from(u64_field(v, key)?)?)
}

/// One timestamp line of a `--history` file.
fn parse_call(v: &serde_json::Value) -> anyhow::Result<Call> {
    let outcome = match (v["error"].as_str(), v["malformed"].as_str()) {
        (Some(code), _) => Outcome::Failed(code.to_string()),
        (None, Some(reason)) => Outcome::Malformed(reason.to_string()),
        (None, None) => Outcome::Granted(WireGrant {
            physical_ms: u64_field(v, "physical_ms")?,
            logical_start: u32_field(v, "logical_start")?,
            count: u32_field(v, "count")?,
        }),
    };
    Ok(Call {
        client: u32_field(v, "client")?,
        start_ns: u64_field(v, "start_ns")?,
        end_ns: u64_field(v, "end_ns")?,
        requested: u32_field(v, "requested")?,
        outcome,
    })
}

/// One sequence line of a `--history` file; its key is numbered in `keys`.
fn parse_seq_call(v: &serde_json::Value, keys: &mut Vec<String>) -> anyhow::Result<SeqCall> {
    let name = v["key"].as_str().context("bad \"key\"")?;
    let key = match keys.iter().position(|k| k == name) {
        Some(i) => i,
        None => {
            keys.push(name.to_string());
            keys.len() - 1
        }
    };
    let text = |field: &str| v[field].as_str().map(str::to_string);
    let outcome = match (text("error"), text("uncertain"), text("malformed")) {
        (Some(code), _, _) => SeqOutcome::Refused(code),
        (None, Some(code), _) => SeqOutcome::Uncertain(code),
        (None, None, Some(reason)) => SeqOutcome::Malformed(reason),
        (None, None, None) => SeqOutcome::Block {
            start: u64_field(v, "start")?,
            count: u32_field(v, "count")?,
            epoch: match v.get("epoch") {
                None => None,
                Some(epoch) => Some(
                    epoch
                        .as_str()
                        .and_then(seq::BlockEpoch::parse)
                        .context("bad \"epoch\": give it as \"HI.LO\"")?,
                ),
            },
        },
    };
    let batch = match v.get("batch") {
        None => None,
        Some(_) => Some(u32_field(v, "batch")?),
    };
    Ok(SeqCall {
        client: u32_field(v, "client")?,
        key: key as u32,
        requested: u32_field(v, "requested")?,
        batch,
        start_ns: u64_field(v, "start_ns")?,
        end_ns: u64_field(v, "end_ns")?,
        outcome,
    })
}

/// Every call as one JSON line.
fn write_history(path: &std::path::Path, history: &History) -> anyhow::Result<()> {
    use std::io::Write;
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let lines: Box<dyn Iterator<Item = serde_json::Value>> = match history {
        History::Ts(calls) => Box::new(calls.iter().map(call_json)),
        History::Seq(calls) => Box::new(calls.iter().map(seq_call_json)),
        History::Lease(calls) => Box::new(calls.iter().map(lease_call_json)),
    };
    for line in lines {
        writeln!(out, "{line}")?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

fn call_json(call: &Call) -> serde_json::Value {
    let mut line = serde_json::json!({
        "client": call.client,
        "start_ns": call.start_ns,
        "end_ns": call.end_ns,
        "requested": call.requested,
    });
    match &call.outcome {
        Outcome::Granted(grant) => {
            line["physical_ms"] = grant.physical_ms.into();
            line["logical_start"] = grant.logical_start.into();
            line["count"] = grant.count.into();
        }
        Outcome::Failed(code) => line["error"] = code.as_str().into(),
        Outcome::Malformed(reason) => line["malformed"] = reason.as_str().into(),
    }
    line
}

fn seq_call_json(call: &SeqCall) -> serde_json::Value {
    let mut line = serde_json::json!({
        "client": call.client,
        "start_ns": call.start_ns,
        "end_ns": call.end_ns,
        "key": SEQ_KEYS[call.key as usize],
        "requested": call.requested,
    });
    if let Some(batch) = call.batch {
        line["batch"] = batch.into();
    }
    match &call.outcome {
        SeqOutcome::Block {
            start,
            count,
            epoch,
        } => {
            line["start"] = (*start).into();
            line["count"] = (*count).into();
            if let Some(epoch) = epoch {
                line["epoch"] = epoch.text().into();
            }
        }
        SeqOutcome::Refused(code) => line["error"] = code.as_str().into(),
        SeqOutcome::Uncertain(code) => line["uncertain"] = code.as_str().into(),
        SeqOutcome::Malformed(reason) => line["malformed"] = reason.as_str().into(),
    }
    line
}

/// A lease-workload call: `op` (`acquire`, `renew`, `release`, `frontier`, `ts`, or a keeper's
/// `permit`) with its arguments, then the values of the reply, `error` (a refusal) or
/// `ambiguous`.
fn lease_call_json(call: &LeaseCall) -> serde_json::Value {
    let mut line = serde_json::json!({
        "client": call.client,
        "start_ns": call.start_ns,
        "end_ns": call.end_ns,
    });
    match call.op {
        LeaseOp::Acquire {
            holder,
            holder_epoch,
            ttl_ms,
        } => {
            line["op"] = "acquire".into();
            line["holder"] = holder.into();
            line["holder_epoch"] = holder_epoch.into();
            line["ttl_ms"] = ttl_ms.into();
        }
        LeaseOp::Renew { lease_id, ttl_ms } => {
            line["op"] = "renew".into();
            line["lease_id"] = lease_id.into();
            line["ttl_ms"] = ttl_ms.into();
        }
        LeaseOp::Release { lease_id } => {
            line["op"] = "release".into();
            line["lease_id"] = lease_id.into();
        }
        LeaseOp::Frontier => line["op"] = "frontier".into(),
        LeaseOp::Ts => line["op"] = "ts".into(),
        LeaseOp::Permit { lease_id, ttl_ms } => {
            line["op"] = "permit".into();
            line["lease_id"] = lease_id.into();
            line["ttl_ms"] = ttl_ms.into();
        }
    }
    match &call.outcome {
        LeaseOutcome::Lease {
            lease_id,
            bound_ms,
            epoch,
        } => {
            line["lease_id"] = (*lease_id).into();
            line["bound_ms"] = (*bound_ms).into();
            line["epoch"] = lease::epoch_text(*epoch).into();
        }
        LeaseOutcome::Released => line["released"] = true.into(),
        LeaseOutcome::Frontier { frontier_ms, epoch } => {
            line["frontier_ms"] = (*frontier_ms).into();
            line["epoch"] = lease::epoch_text(*epoch).into();
        }
        LeaseOutcome::Granted { physical_ms, epoch } => {
            line["physical_ms"] = (*physical_ms).into();
            line["epoch"] = lease::epoch_text(*epoch).into();
        }
        LeaseOutcome::Permitted { bound_ms } => line["bound_ms"] = (*bound_ms).into(),
        LeaseOutcome::Refused(code) => line["error"] = code.as_str().into(),
        LeaseOutcome::Ambiguous(code) => line["ambiguous"] = code.as_str().into(),
    }
    line
}

/// The run's directory: the one given, or a temporary one removed after a clean run (kept,
/// with the servers' logs, when something was found).
struct WorkDir {
    path: PathBuf,
    temporary: Option<tempfile::TempDir>,
}

impl WorkDir {
    fn new(given: Option<PathBuf>) -> anyhow::Result<WorkDir> {
        match given {
            Some(path) => {
                std::fs::create_dir_all(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                Ok(WorkDir {
                    path,
                    temporary: None,
                })
            }
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("tso-check-")
                    .tempdir()
                    .context("creating a work directory")?;
                Ok(WorkDir {
                    path: dir.path().to_path_buf(),
                    temporary: Some(dir),
                })
            }
        }
    }

    fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn clean_up(mut self) {
        if let Some(dir) = self.temporary.take() {
            let _ = dir.close();
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        // Keep a temporary directory unless `clean_up` consumed it: it holds the logs.
        if let Some(dir) = self.temporary.take() {
            let _ = dir.keep();
        }
    }
}
