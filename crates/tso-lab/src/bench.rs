//! `tso bench`: closed-loop load against a `tsoracle.v1` server, on `GetTs` or `GetSeq`.
//!
//! N callers, each waiting for its reply before the next call, spread over K HTTP/2
//! connections: unary RPCs, requests on shared or per-caller `GetTsStream` streams
//! (`stream.rs`), or calls through the client library. Each caller keeps its own latency histogram and checks what it receives (its
//! values rise; no value is seen twice across callers sharing a counter; a reply the client
//! library refuses as malformed is a violation, not an error), so the hot loop shares nothing
//! but two relaxed counters and one `fetch_max`. Calls during the warm-up are checked but not
//! measured.
//!
//! Sequences are also checked for density (D2): the values between blocks of one key that no
//! block holds must be covered by calls that failed uncertainly (they may have spent values).
//! With one key per caller this is exact per caller; with a shared key, over the whole run.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use crate::node::Node;
use crate::targets::{Dial, Failure, Route, Targets, client_builder};

pub mod options;
mod stream;

pub use options::{BenchOptions, BenchRpc, LoadMode, SeqKeys};
use stream::StreamSlot;

/// Callers at most: each is one task with a ~60 KiB histogram.
pub const CALLERS_MAX: usize = 4096;
/// Worker threads of the load generator at most.
pub const THREADS_MAX: usize = 256;
/// Latencies above this are recorded as this (a call times out long before).
pub const LATENCY_MAX_US: u64 = 60_000_000;
/// Significant digits of the latency histograms: percentiles are exact to within 0.1 %.
const LATENCY_SIGFIGS: u8 = 3;
/// Latency histograms the callers record into; a caller uses the one of the thread it runs on,
/// so the few histograms in use stay in the CPU's caches. (With one per caller, 256 callers
/// spent more on cache misses recording than the client library spent on the call.)
const LATENCY_SHARDS: usize = 16;
/// Grants kept for the duplicate check across all callers: 16 bytes each, 128 MiB in all. Past
/// it, later grants are still checked per caller but not across callers (the report says so).
pub const RANGES_KEPT_MAX: usize = 8 << 20;

/// When the run measures.
#[derive(Clone, Copy)]
struct Phases {
    origin: Instant,
    warmup_end: Instant,
    deadline: Instant,
}

fn latency_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIGS).expect("valid histogram bounds")
}

/// The callers' latencies, in microseconds: [`LATENCY_SHARDS`] histograms, one per thread in
/// turn, each behind a lock that only its thread takes (unless there are more threads).
struct Latencies {
    shards: Vec<Shard>,
}

/// One histogram on cache lines of its own: two threads never write the same line.
#[repr(align(128))]
struct Shard(Mutex<Histogram<u32>>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            shards: (0..LATENCY_SHARDS)
                .map(|_| Shard(Mutex::new(latency_histogram())))
                .collect(),
        }
    }
}

impl Latencies {
    fn record(&self, micros: u64) {
        static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % LATENCY_SHARDS;
        }
        let shard = SHARD.with(|shard| *shard);
        let mut histogram = self.shards[shard]
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        histogram.saturating_record(micros.max(1));
    }

    fn merged(&self) -> Histogram<u32> {
        let mut all = latency_histogram();
        for shard in &self.shards {
            let shard = shard.0.lock().unwrap_or_else(|e| e.into_inner());
            all.add(&*shard).expect("same histogram bounds");
        }
        all
    }
}

/// Counters shared by callers and the progress line.
#[derive(Default)]
struct Live {
    latencies: Latencies,
    calls: AtomicU64,
    errors: AtomicU64,
    /// Nanoseconds after the warm-up of the latest successful reply.
    last_ok_ns: AtomicU64,
    /// The longest stretch between successful replies seen so far.
    longest_gap_ns: AtomicU64,
    /// When that stretch ended (nanoseconds after the warm-up; racing updates may pair it with
    /// a gap of about the same length).
    longest_gap_end_ns: AtomicU64,
}

/// A success less than this after the latest recorded one is not recorded, so that callers do
/// not all write the shared counters on every reply: the longest gap is exact to within this.
const GAP_RESOLUTION_NS: u64 = 10_000;

/// Calls a caller counts locally before adding them to the progress line's counter.
const LIVE_CALLS_FLUSH: u64 = 64;

impl Live {
    fn success(&self, at_ns: u64) {
        if at_ns < self.last_ok_ns.load(Ordering::Relaxed) + GAP_RESOLUTION_NS {
            return;
        }
        let previous = self.last_ok_ns.fetch_max(at_ns, Ordering::Relaxed);
        if at_ns > previous {
            let gap = at_ns - previous;
            if self.longest_gap_ns.fetch_max(gap, Ordering::Relaxed) < gap {
                self.longest_gap_end_ns.store(at_ns, Ordering::Relaxed);
            }
        }
    }
}

/// What one caller saw.
struct CallerStats {
    calls: u64,
    /// Values granted (timestamps or sequence values) in measured calls.
    values: u64,
    errors: BTreeMap<String, u64>,
    regressions: u64,
    /// Replies the client library refused as malformed (warm-up included).
    malformed: u64,
    /// Every grant received (warm-up included), as `(first, last)`; rising per caller.
    ranges: Vec<(u64, u64)>,
    ranges_dropped: u64,
    /// Sequence calls that failed uncertainly, and the values they asked for (warm-up
    /// included): what may have been spent without reaching anyone.
    uncertain: u64,
    uncertain_values: u64,
    /// With one key per caller: values missing between its blocks beyond what the uncertain
    /// calls in between may have spent.
    gaps: u64,
}

/// What one successful call brought: `first..=last`, and whether its shape is wrong.
struct Got {
    first: u64,
    last: u64,
    count: u32,
    bad_shape: bool,
}

pub fn run(args: BenchOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=CALLERS_MAX).contains(&args.callers),
        "--callers must be 1 to {CALLERS_MAX}"
    );
    let count_max = match args.rpc {
        BenchRpc::Ts => tso_core::LOGICAL_COUNT,
        BenchRpc::Seq => tso_client::SEQ_COUNT_MAX,
    };
    anyhow::ensure!(
        (1..=count_max).contains(&args.count),
        "--count must be 1 to {count_max} with --rpc {}",
        args.rpc.name()
    );
    anyhow::ensure!(!args.duration.is_zero(), "--duration must be above 0");
    anyhow::ensure!(
        args.mode != LoadMode::Stream || args.rpc == BenchRpc::Ts,
        "--mode stream loads GetTs only: drop --rpc seq"
    );
    if let Some(threads) = args.threads {
        anyhow::ensure!(
            (1..=THREADS_MAX).contains(&threads),
            "--threads must be 1 to {THREADS_MAX}"
        );
    }
    let (threads, _) = thread_split(&args);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(bench(args))
}

/// Worker threads of the load generator, and of the server `--spawn` starts. A spawned server
/// shares the machine with the generator, so by default each gets half of the cores (at least
/// one): on two cores, one thread each beats two each, which spend their time waking each
/// other across cores. Against `--endpoints` the generator takes every core.
fn thread_split(args: &BenchOptions) -> (usize, Option<usize>) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let generator = args.threads.unwrap_or(if args.spawn {
        (cores / 2).max(1)
    } else {
        cores
    });
    let server = args.spawn.then(|| cores.saturating_sub(generator).max(1));
    (generator, server)
}

async fn bench(args: BenchOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.spawn || args.tls.is_none(),
        "the server of --spawn has no TLS: give --tls-* only with --endpoints"
    );
    let mut spawned = None;
    let endpoints = if args.spawn {
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        let server_threads = thread_split(&args).1.unwrap_or(1);
        let extra = vec![
            "--log".into(),
            "warn".into(),
            "--threads".into(),
            server_threads.to_string(),
        ];
        let mut node = Node::new(&args.server_bin, dir.path(), "bench", extra, false)?;
        node.start().await?;
        let endpoint = node.endpoint();
        spawned = Some((node, dir));
        vec![endpoint]
    } else {
        args.endpoints.clone()
    };
    let dial = Dial::new(args.tls.as_ref().map(tso_client::ClientTls::tonic_config));
    let targets = Arc::new(Targets::new(
        &endpoints,
        args.connections,
        args.timeout,
        dial.clone(),
    )?);
    let streams = match (args.mode, args.stream_per_caller) {
        (LoadMode::Stream, per_caller) => {
            let count = if per_caller {
                args.callers
            } else {
                args.connections
            };
            stream::slots(&endpoints, args.connections, count, args.timeout, &dial)?
        }
        _ => Vec::new(),
    };
    let library = match args.mode {
        LoadMode::Raw | LoadMode::Stream => None,
        LoadMode::Library => Some(
            client_builder(args.tls.as_ref())
                .overall_timeout(args.timeout)
                .connect(&endpoints)
                .await
                .context("starting the client library")?,
        ),
    };
    // Each caller's grant log is written to before the clock starts: first touches of fresh
    // memory (page faults, and on a virtual machine the host backing the pages) stalled both
    // generator threads for 10 ms and more in the middle of runs.
    let ranges_per_caller = RANGES_KEPT_MAX / args.callers;
    let mut logs: Vec<Vec<(u64, u64)>> = (0..args.callers)
        .map(|_| prefaulted(ranges_per_caller))
        .collect();
    let load_before = load_average();
    let origin = Instant::now();
    let phases = Phases {
        origin,
        warmup_end: origin + args.warmup,
        deadline: origin + args.warmup + args.duration,
    };
    let live = Arc::new(Live::default());
    let mut callers = Vec::with_capacity(args.callers);
    for id in 0..args.callers {
        let route = match (&library, streams.is_empty()) {
            (Some(client), _) => Via::Route(Route::Library(client.clone())),
            (None, true) => Via::Route(Route::raw(Arc::clone(&targets), id)?),
            (None, false) => Via::Stream(Arc::clone(&streams[id % streams.len()])),
        };
        let caller = Caller {
            route,
            count: args.count,
            live: Arc::clone(&live),
            phases,
            ranges: logs.pop().expect("one grant log per caller"),
            key: (args.rpc == BenchRpc::Seq).then(|| args.seq_keys.key(id)),
            own_key: args.rpc == BenchRpc::Seq && args.seq_keys == SeqKeys::PerCaller,
        };
        callers.push(tokio::spawn(caller.run()));
    }
    let progress = std::io::stderr()
        .is_terminal()
        .then(|| tokio::spawn(progress(Arc::clone(&live), phases)));
    let mut stats = Vec::with_capacity(callers.len());
    for caller in callers {
        stats.push(caller.await.context("a caller panicked")??);
    }
    if let Some(progress) = progress {
        progress.abort();
        eprint!("\r\x1b[K");
    }
    if let Some((mut node, _dir)) = spawned {
        node.stop().await?;
    }
    let end_gap_ns = (phases.deadline - phases.warmup_end).as_nanos() as u64;
    live.success(end_gap_ns);
    let mut report = Report::merge(&args, &endpoints, stats, &live);
    report.load_average = (load_before, load_average());
    let gap_end =
        phases.warmup_end + Duration::from_nanos(live.longest_gap_end_ns.load(Ordering::Relaxed));
    report.longest_gap_end_unix_ms = unix_ms_of(gap_end);
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.human());
    }
    anyhow::ensure!(
        report.ok(),
        "the server's replies broke the oracle's guarantees (see the check line)"
    );
    Ok(())
}

/// What a caller calls through.
enum Via {
    Route(Route),
    Stream(Arc<StreamSlot>),
}

/// An empty vector of `capacity` whose memory has been written once, so that filling it later
/// takes no page faults.
fn prefaulted(capacity: usize) -> Vec<(u64, u64)> {
    let mut v = Vec::with_capacity(capacity);
    v.resize(capacity, (0, 0));
    std::hint::black_box(&mut v);
    v.clear();
    v
}

struct Caller {
    route: Via,
    live: Arc<Live>,
    phases: Phases,
    count: u32,
    /// Where this caller's grants go, for the duplicate check: empty, with its whole capacity
    /// already touched; past the capacity, grants are counted but not kept.
    ranges: Vec<(u64, u64)>,
    /// The sequence key this caller asks for (`--rpc seq`); `None` for `GetTs`.
    key: Option<String>,
    /// Nobody else uses this caller's key, so its blocks must follow each other exactly.
    own_key: bool,
}

/// Where the next block of a caller's own key must start, and what uncertain calls since the
/// last block may have spent.
#[derive(Default)]
struct Density {
    next: Option<u64>,
    uncertain_values: u64,
}

impl Density {
    /// The values before a block starting at `first` that no block holds and the uncertain
    /// calls since the last block cannot have spent.
    fn unexplained_gap(&mut self, first: u64, last: u64) -> u64 {
        let missing = self.next.map_or(0, |next| first.saturating_sub(next));
        self.next = Some(last + 1);
        missing.saturating_sub(std::mem::take(&mut self.uncertain_values))
    }
}

impl Caller {
    async fn run(mut self) -> anyhow::Result<CallerStats> {
        let mut stats = CallerStats {
            calls: 0,
            values: 0,
            errors: BTreeMap::new(),
            regressions: 0,
            malformed: 0,
            ranges: std::mem::take(&mut self.ranges),
            ranges_dropped: 0,
            uncertain: 0,
            uncertain_values: 0,
            gaps: 0,
        };
        let mut highest: Option<u64> = None;
        let mut density = Density::default();
        let mut unflushed = 0;
        // One clock read per call: a call's end is the next one's start.
        let mut next_start = Instant::now();
        loop {
            let start = next_start;
            if start >= self.phases.deadline {
                self.live.calls.fetch_add(unflushed, Ordering::Relaxed);
                break;
            }
            let reply = self.call().await;
            let end = Instant::now();
            next_start = end;
            let measured = start >= self.phases.warmup_end;
            let got = match reply {
                Ok(got) => got,
                Err(failure) => {
                    self.failed(failure, measured, &mut stats, &mut density);
                    continue;
                }
            };
            if highest.is_some_and(|h| got.first <= h) || got.bad_shape {
                stats.regressions += 1;
            }
            highest = Some(highest.map_or(got.last, |h| h.max(got.last)));
            if self.own_key {
                stats.gaps += density.unexplained_gap(got.first, got.last);
            }
            if stats.ranges.len() < stats.ranges.capacity() {
                stats.ranges.push((got.first, got.last));
            } else {
                stats.ranges_dropped += 1;
            }
            unflushed += 1;
            if unflushed == LIVE_CALLS_FLUSH {
                self.live.calls.fetch_add(unflushed, Ordering::Relaxed);
                unflushed = 0;
            }
            if measured {
                let micros = (end - start).as_micros() as u64;
                self.live.latencies.record(micros);
                stats.calls += 1;
                stats.values += u64::from(got.count);
                self.live
                    .success((end - self.phases.warmup_end).as_nanos() as u64);
            }
        }
        Ok(stats)
    }

    /// One call of the configured RPC.
    async fn call(&mut self) -> Result<Got, Failure> {
        let grant = match (&mut self.route, &self.key) {
            (Via::Stream(slot), _) => slot.get(self.count).await,
            (Via::Route(route), None) => route.get(self.count).await,
            (Via::Route(route), Some(key)) => {
                return route.seq(key, self.count).await.map(|b| Got {
                    first: b.start,
                    last: b.last(),
                    count: b.count,
                    bad_shape: false,
                });
            }
        };
        grant.map(|g| Got {
            first: g.first(),
            last: g.last(),
            count: g.count,
            bad_shape: g.shape_error(self.count).is_some(),
        })
    }

    /// Counts a failed call: malformed replies are violations; uncertain ones may have spent
    /// values, which the density checks allow for.
    fn failed(
        &self,
        failure: Failure,
        measured: bool,
        stats: &mut CallerStats,
        density: &mut Density,
    ) {
        let code = match failure {
            Failure::Malformed(_) => {
                stats.malformed += 1;
                return;
            }
            Failure::Error(code) => code,
            Failure::Uncertain(code) => {
                stats.uncertain += 1;
                stats.uncertain_values += u64::from(self.count);
                density.uncertain_values += u64::from(self.count);
                format!("{code} (uncertain)")
            }
        };
        self.live.errors.fetch_add(1, Ordering::Relaxed);
        if measured {
            *stats.errors.entry(code).or_default() += 1;
        }
    }
}

/// Prints one live line on the terminal each second: rate and errors.
async fn progress(live: Arc<Live>, phases: Phases) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut previous = 0;
    loop {
        tick.tick().await;
        let calls = live.calls.load(Ordering::Relaxed);
        let elapsed = phases.origin.elapsed().as_secs();
        let phase = if Instant::now() < phases.warmup_end {
            "warm-up"
        } else {
            "measuring"
        };
        eprint!(
            "\r\x1b[K{elapsed:>4} s  {phase:<9}  {:>10} calls/s  {} errors",
            thousands(calls - previous),
            live.errors.load(Ordering::Relaxed)
        );
        previous = calls;
    }
}

struct Report {
    target: String,
    callers: usize,
    connections: usize,
    count: u32,
    mode: LoadMode,
    /// With `--mode stream`: a stream per caller rather than per connection.
    stream_per_caller: bool,
    rpc: BenchRpc,
    seq_keys: SeqKeys,
    /// Worker threads of the load generator.
    threads: usize,
    duration: Duration,
    warmup: Duration,
    calls: u64,
    values: u64,
    latency_us: Histogram<u32>,
    errors: BTreeMap<String, u64>,
    longest_gap: Duration,
    /// Wall-clock time (ms since the Unix epoch) at which the longest gap ended, to line it up
    /// with events outside the bench (`--json` only).
    longest_gap_end_unix_ms: Option<f64>,
    /// The machine's 1-minute load average before and after: figures from a busy machine
    /// are lower bounds.
    load_average: (Option<f64>, Option<f64>),
    checks: Checks,
}

/// What the checks of every reply found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Checks {
    checked: u64,
    unchecked: u64,
    duplicates: u64,
    regressions: u64,
    malformed: u64,
    /// Sequence calls that failed uncertainly, and the values they asked for.
    uncertain: u64,
    uncertain_values: u64,
    /// Sequence values missing between blocks of a key beyond what uncertain calls may have
    /// spent (D2). Not judged for a shared key when some grants were not kept.
    gap_values: u64,
}

impl Checks {
    /// Merges the callers' findings and checks across callers: every caller's grants for
    /// `GetTs` or a shared key, each caller's alone for keys of their own.
    fn merge(stats: &mut [CallerStats], rpc: BenchRpc, seq_keys: SeqKeys) -> Checks {
        let own_keys = rpc == BenchRpc::Seq && seq_keys == SeqKeys::PerCaller;
        let mut checks = Checks::default();
        let mut ranges = Vec::new();
        for s in stats.iter_mut() {
            checks.checked += s.ranges.len() as u64;
            checks.unchecked += s.ranges_dropped;
            checks.regressions += s.regressions;
            checks.malformed += s.malformed;
            checks.uncertain += s.uncertain;
            checks.uncertain_values += s.uncertain_values;
            checks.gap_values += s.gaps;
            let mine = std::mem::take(&mut s.ranges);
            if own_keys {
                checks.duplicates += duplicates(mine).0;
            } else {
                ranges.extend(mine);
            }
        }
        if !own_keys {
            let (found, missing) = duplicates(ranges);
            checks.duplicates += found;
            if rpc == BenchRpc::Seq && checks.unchecked == 0 {
                checks.gap_values += missing.saturating_sub(checks.uncertain_values);
            }
        }
        checks
    }

    fn ok(&self) -> bool {
        self.duplicates == 0 && self.regressions == 0 && self.malformed == 0 && self.gap_values == 0
    }
}

impl Report {
    fn merge(
        args: &BenchOptions,
        endpoints: &[String],
        mut stats: Vec<CallerStats>,
        live: &Live,
    ) -> Report {
        let latency_us = live.latencies.merged();
        let mut errors = BTreeMap::new();
        let (mut calls, mut values) = (0, 0);
        for s in &stats {
            calls += s.calls;
            values += s.values;
            for (code, n) in &s.errors {
                *errors.entry(code.clone()).or_default() += n;
            }
        }
        Report {
            target: format!(
                "{}{}",
                endpoints.join(","),
                match thread_split(args).1 {
                    Some(threads) => format!(" (spawned, {threads} worker thread(s))"),
                    None => String::new(),
                }
            ),
            callers: args.callers,
            connections: args.connections,
            count: args.count,
            mode: args.mode,
            stream_per_caller: args.stream_per_caller,
            rpc: args.rpc,
            seq_keys: args.seq_keys,
            threads: thread_split(args).0,
            duration: args.duration,
            warmup: args.warmup,
            calls,
            values,
            latency_us,
            errors,
            longest_gap: Duration::from_nanos(live.longest_gap_ns.load(Ordering::Relaxed)),
            longest_gap_end_unix_ms: None,
            load_average: (None, None),
            checks: Checks::merge(&mut stats, args.rpc, args.seq_keys),
        }
    }

    /// Whether every reply kept the oracle's guarantees.
    fn ok(&self) -> bool {
        self.checks.ok()
    }

    fn per_second(&self, n: u64) -> f64 {
        n as f64 / self.duration.as_secs_f64()
    }

    fn percentile_ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// What one call asks for, in words: `timestamp(s)` or `value(s) of key bench-shared`.
    fn unit(&self) -> String {
        match (self.rpc, self.seq_keys) {
            (BenchRpc::Ts, _) => "timestamp(s)".into(),
            (BenchRpc::Seq, SeqKeys::Shared) => "value(s) of one shared sequence key".into(),
            (BenchRpc::Seq, SeqKeys::PerCaller) => "value(s) of each caller's own key".into(),
        }
    }

    fn check_line(&self) -> String {
        let c = &self.checks;
        let uncertain = if c.uncertain > 0 {
            format!(
                "; {} uncertain call(s) may have spent up to {} values",
                thousands(c.uncertain),
                thousands(c.uncertain_values)
            )
        } else {
            String::new()
        };
        let unchecked = if c.unchecked > 0 {
            format!(
                " ({} more grants checked per caller only)",
                thousands(c.unchecked)
            )
        } else {
            String::new()
        };
        let dense = if self.rpc == BenchRpc::Seq {
            ", no unexplained gap"
        } else {
            ""
        };
        if self.ok() {
            return format!(
                "ok: {} grants, no duplicates{dense}, every caller's values rise{uncertain}{unchecked}",
                thousands(c.checked)
            );
        }
        format!(
            "VIOLATION: {} duplicates, {} regressions or short grants, {} malformed replies, {} values missing unexplained, in {} grants{uncertain}{unchecked}",
            c.duplicates,
            c.regressions,
            c.malformed,
            c.gap_values,
            thousands(c.checked)
        )
    }

    fn human(&self) -> String {
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            let parts: Vec<String> = self
                .errors
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            parts.join(", ")
        };
        let values_name = match self.rpc {
            BenchRpc::Ts => "timestamps",
            BenchRpc::Seq => "values    ",
        };
        format!(
            "target       {}\n\
             load         {} callers, {}, {} {} per call, {} after {} warm-up, {} generator thread(s)\n\
             calls        {} ({}/s)\n\
             {values_name}   {} ({}/s)\n\
             latency      p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms\n\
             errors       {errors}\n\
             longest gap  {:.3} ms without a successful reply\n\
             machine      load average {} before, {} after, {} cores\n\
             check        {}\n",
            self.target,
            self.callers,
            match (self.mode, self.rpc) {
                (LoadMode::Raw, _) => format!("raw RPCs over {} connection(s)", self.connections),
                (LoadMode::Stream, _) if self.stream_per_caller => format!(
                    "a GetTsStream per caller over {} connection(s)",
                    self.connections
                ),
                (LoadMode::Stream, _) => format!(
                    "{} shared GetTsStream(s), one per connection",
                    self.connections
                ),
                (LoadMode::Library, BenchRpc::Ts) => {
                    "through the client library (coalescing)".to_string()
                }
                (LoadMode::Library, BenchRpc::Seq) => {
                    "through the client library (one RPC per call)".to_string()
                }
            },
            self.count,
            self.unit(),
            humantime::format_duration(self.duration),
            humantime::format_duration(self.warmup),
            self.threads,
            thousands(self.calls),
            thousands(self.per_second(self.calls) as u64),
            thousands(self.values),
            thousands(self.per_second(self.values) as u64),
            self.percentile_ms(0.5),
            self.percentile_ms(0.9),
            self.percentile_ms(0.99),
            self.percentile_ms(0.999),
            self.latency_us.max() as f64 / 1000.0,
            self.longest_gap.as_secs_f64() * 1000.0,
            show_load(self.load_average.0),
            show_load(self.load_average.1),
            cores(),
            self.check_line(),
        )
    }

    fn json(&self) -> serde_json::Value {
        let c = &self.checks;
        let mut json = serde_json::json!({
            "target": self.target,
            "callers": self.callers,
            "connections": self.connections,
            "count": self.count,
            "mode": self.mode.name(),
            "stream_per_caller": self.stream_per_caller,
            "rpc": self.rpc.name(),
            "threads": self.threads,
            "duration_s": self.duration.as_secs_f64(),
            "warmup_s": self.warmup.as_secs_f64(),
            "calls": self.calls,
            "calls_per_s": self.per_second(self.calls),
            "latency_ms": {
                "p50": self.percentile_ms(0.5),
                "p90": self.percentile_ms(0.9),
                "p99": self.percentile_ms(0.99),
                "p99_9": self.percentile_ms(0.999),
                "max": self.latency_us.max() as f64 / 1000.0,
            },
            "errors": self.errors,
            "longest_gap_ms": self.longest_gap.as_secs_f64() * 1000.0,
            "longest_gap_end_unix_ms": self.longest_gap_end_unix_ms,
            "load_average_before": self.load_average.0,
            "load_average_after": self.load_average.1,
            "cores": cores(),
            "check": {
                "ok": self.ok(),
                "grants_checked": c.checked,
                "grants_checked_per_caller_only": c.unchecked,
                "duplicates": c.duplicates,
                "regressions": c.regressions,
                "malformed": c.malformed,
            },
        });
        match self.rpc {
            BenchRpc::Ts => {
                json["timestamps"] = self.values.into();
                json["timestamps_per_s"] = self.per_second(self.values).into();
            }
            BenchRpc::Seq => {
                json["seq_keys"] = self.seq_keys.name().into();
                json["values"] = self.values.into();
                json["values_per_s"] = self.per_second(self.values).into();
                json["check"]["uncertain"] = c.uncertain.into();
                json["check"]["uncertain_values"] = c.uncertain_values.into();
                json["check"]["gap_values"] = c.gap_values.into();
            }
        }
        json
    }
}

/// `at` on the wall clock, in milliseconds since the Unix epoch.
fn unix_ms_of(at: Instant) -> Option<f64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    let ago = Instant::now().saturating_duration_since(at);
    Some(now.checked_sub(ago)?.as_secs_f64() * 1000.0)
}

/// The 1-minute load average (Linux), if readable.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn show_load(load: Option<f64>) -> String {
    load.map_or("unknown".into(), |l| format!("{l:.2}"))
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Overlapping grants among `ranges` (each `(first, last)`), and the values between the lowest
/// and the highest that no range holds (for a sequence key: its gaps).
fn duplicates(mut ranges: Vec<(u64, u64)>) -> (u64, u64) {
    ranges.sort_unstable();
    let (mut found, mut missing) = (0, 0);
    let mut highest: Option<u64> = None;
    for (first, last) in ranges {
        match highest {
            Some(h) if first <= h => found += 1,
            Some(h) => missing += first - h - 1,
            None => {}
        }
        highest = Some(highest.map_or(last, |h| h.max(last)));
    }
    (found, missing)
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_overlapping_grants_and_gaps() {
        assert_eq!(duplicates(vec![(1, 3), (4, 4), (10, 20)]), (0, 5));
        assert_eq!(duplicates(vec![(10, 20), (1, 3), (15, 15)]), (1, 6));
        assert_eq!(duplicates(vec![(1, 100), (5, 5), (50, 60)]), (2, 0));
        assert_eq!(duplicates(vec![(0, 0), (1, 9), (10, 10)]), (0, 0));
    }

    #[test]
    fn a_gap_of_an_own_key_is_judged_against_the_uncertain_calls_before_it() {
        let mut density = Density::default();
        assert_eq!(
            density.unexplained_gap(100, 104),
            0,
            "the first block sets the start"
        );
        assert_eq!(density.unexplained_gap(105, 105), 0);
        assert_eq!(density.unexplained_gap(107, 107), 1, "nothing uncertain");
        density.uncertain_values = 3;
        assert_eq!(
            density.unexplained_gap(111, 111),
            0,
            "3 missing, 3 may be spent"
        );
        density.uncertain_values = 3;
        assert_eq!(
            density.unexplained_gap(116, 116),
            1,
            "4 missing, 3 may be spent"
        );
        assert_eq!(density.unexplained_gap(117, 120), 0);
    }

    fn stats(ranges: Vec<(u64, u64)>, uncertain_values: u64) -> CallerStats {
        CallerStats {
            calls: 0,
            values: 0,
            errors: BTreeMap::new(),
            regressions: 0,
            malformed: 0,
            ranges,
            ranges_dropped: 0,
            uncertain: u64::from(uncertain_values > 0),
            uncertain_values,
            gaps: 0,
        }
    }

    #[test]
    fn a_shared_key_is_dense_across_callers_up_to_the_uncertain_values() {
        let dense = || vec![stats(vec![(0, 4), (10, 19)], 0), stats(vec![(5, 9)], 0)];
        let checks = Checks::merge(&mut dense(), BenchRpc::Seq, SeqKeys::Shared);
        assert!(checks.ok(), "{checks:?}");
        let gappy = || vec![stats(vec![(0, 4), (12, 19)], 0), stats(vec![(5, 9)], 1)];
        let checks = Checks::merge(&mut gappy(), BenchRpc::Seq, SeqKeys::Shared);
        assert_eq!(checks.gap_values, 1, "2 missing, 1 may have been spent");
        // Timestamps have gaps by nature, and keys of their own are judged per caller.
        assert!(Checks::merge(&mut gappy(), BenchRpc::Ts, SeqKeys::Shared).ok());
        assert!(Checks::merge(&mut gappy(), BenchRpc::Seq, SeqKeys::PerCaller).ok());
        let overlap = || vec![stats(vec![(0, 4)], 0), stats(vec![(0, 4)], 0)];
        let checks = Checks::merge(&mut overlap(), BenchRpc::Seq, SeqKeys::Shared);
        assert_eq!(checks.duplicates, 1);
        // Two callers' own keys may hold the same values.
        assert!(Checks::merge(&mut overlap(), BenchRpc::Seq, SeqKeys::PerCaller).ok());
    }

    #[test]
    fn formats_thousands() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn the_longest_gap_follows_the_latest_reply() {
        let live = Live::default();
        let us = 1_000;
        for at in [10 * us, 30 * us, 25 * us, 100 * us, 90 * us, 105 * us] {
            live.success(at);
        }
        assert_eq!(live.longest_gap_ns.load(Ordering::Relaxed), 70 * us);
        assert_eq!(live.longest_gap_end_ns.load(Ordering::Relaxed), 100 * us);
        assert_eq!(
            live.last_ok_ns.load(Ordering::Relaxed),
            100 * us,
            "a success within the resolution was recorded"
        );
    }
}
