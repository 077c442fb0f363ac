//! `tso bench`: closed-loop load against a `tsoracle.v1` server.
//!
//! N callers, each waiting for its reply before the next call, spread over K HTTP/2
//! connections. Each caller keeps its own latency histogram and checks what it receives (its
//! values rise; no value is seen twice across callers; a reply the client library refuses as
//! malformed is a violation, not an error), so the hot loop shares nothing but two relaxed
//! counters and one `fetch_max`. Calls during the warm-up are checked but not measured.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;

use crate::cli::BenchArgs;
use crate::cli::BenchMode;
use crate::node::Node;
use crate::targets::{Failure, Route, Targets};

/// Callers at most: each is one task with a ~60 KiB histogram.
pub const CALLERS_MAX: usize = 4096;
/// Worker threads of the load generator at most.
pub const THREADS_MAX: usize = 256;
/// Latencies above this are recorded as this (a call times out long before).
pub const LATENCY_MAX_US: u64 = 60_000_000;
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

/// Counters shared by callers and the progress line.
#[derive(Default)]
struct Live {
    calls: AtomicU64,
    errors: AtomicU64,
    /// Nanoseconds after the warm-up of the latest successful reply.
    last_ok_ns: AtomicU64,
    /// The longest stretch between successful replies seen so far.
    longest_gap_ns: AtomicU64,
}

impl Live {
    fn success(&self, at_ns: u64) {
        let previous = self.last_ok_ns.fetch_max(at_ns, Ordering::Relaxed);
        if at_ns > previous {
            self.longest_gap_ns
                .fetch_max(at_ns - previous, Ordering::Relaxed);
        }
    }
}

/// What one caller saw.
struct CallerStats {
    latency_us: Histogram<u32>,
    calls: u64,
    timestamps: u64,
    errors: BTreeMap<String, u64>,
    regressions: u64,
    /// Replies the client library refused as malformed (warm-up included).
    malformed: u64,
    /// Every grant received (warm-up included), as `(first, last)`; rising per caller.
    ranges: Vec<(u64, u64)>,
    ranges_dropped: u64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=CALLERS_MAX).contains(&args.callers),
        "--callers must be 1 to {CALLERS_MAX}"
    );
    anyhow::ensure!(
        (1..=tso_core::LOGICAL_COUNT).contains(&args.count),
        "--count must be 1 to {}",
        tso_core::LOGICAL_COUNT
    );
    anyhow::ensure!(!args.duration.is_zero(), "--duration must be above 0");
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        anyhow::ensure!(
            (1..=THREADS_MAX).contains(&threads),
            "--threads must be 1 to {THREADS_MAX}"
        );
        runtime.worker_threads(threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(bench(args))
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let mut spawned = None;
    let endpoints = if args.spawn {
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        let bin = std::env::current_exe().context("finding this binary")?;
        let extra = vec!["--log".into(), "warn".into()];
        let mut node = Node::new(&bin, dir.path(), "bench", extra, false)?;
        node.start().await?;
        let endpoint = node.endpoint();
        spawned = Some((node, dir));
        vec![endpoint]
    } else {
        args.endpoints.clone()
    };
    let targets = Arc::new(Targets::new(&endpoints, args.connections, args.timeout)?);
    let library = match args.mode {
        BenchMode::Raw => None,
        BenchMode::Library => Some(
            tso_client::Client::builder()
                .overall_timeout(args.timeout)
                .connect(&endpoints)
                .await
                .context("starting the client library")?,
        ),
    };
    let load_before = load_average();
    let origin = Instant::now();
    let phases = Phases {
        origin,
        warmup_end: origin + args.warmup,
        deadline: origin + args.warmup + args.duration,
    };
    let live = Arc::new(Live::default());
    let ranges_per_caller = RANGES_KEPT_MAX / args.callers;
    let mut callers = Vec::with_capacity(args.callers);
    for id in 0..args.callers {
        let route = match &library {
            Some(client) => Route::Library(client.clone()),
            None => Route::raw(Arc::clone(&targets), id)?,
        };
        let caller = Caller {
            route,
            count: args.count,
            live: Arc::clone(&live),
            phases,
            ranges_max: ranges_per_caller,
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

struct Caller {
    route: Route,
    live: Arc<Live>,
    phases: Phases,
    count: u32,
    ranges_max: usize,
}

impl Caller {
    async fn run(mut self) -> anyhow::Result<CallerStats> {
        let mut stats = CallerStats {
            latency_us: Histogram::new_with_bounds(1, LATENCY_MAX_US, 3)
                .expect("valid histogram bounds"),
            calls: 0,
            timestamps: 0,
            errors: BTreeMap::new(),
            regressions: 0,
            malformed: 0,
            ranges: Vec::new(),
            ranges_dropped: 0,
        };
        let mut highest: u64 = 0;
        loop {
            let start = Instant::now();
            if start >= self.phases.deadline {
                break;
            }
            let reply = self.route.get(self.count).await;
            let end = Instant::now();
            let measured = start >= self.phases.warmup_end;
            let grant = match reply {
                Ok(grant) => grant,
                Err(Failure::Malformed(_)) => {
                    stats.malformed += 1;
                    continue;
                }
                Err(Failure::Error(code)) => {
                    self.live.errors.fetch_add(1, Ordering::Relaxed);
                    if measured {
                        *stats.errors.entry(code).or_default() += 1;
                    }
                    continue;
                }
            };
            let (first, last) = (grant.first(), grant.last());
            if first <= highest || grant.shape_error(self.count).is_some() {
                stats.regressions += 1;
            }
            highest = highest.max(last);
            if stats.ranges.len() < self.ranges_max {
                stats.ranges.push((first, last));
            } else {
                stats.ranges_dropped += 1;
            }
            self.live.calls.fetch_add(1, Ordering::Relaxed);
            if measured {
                let micros = (end - start).as_micros() as u64;
                stats.latency_us.saturating_record(micros.max(1));
                stats.calls += 1;
                stats.timestamps += u64::from(grant.count);
                self.live
                    .success((end - self.phases.warmup_end).as_nanos() as u64);
            }
        }
        Ok(stats)
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
    mode: BenchMode,
    threads: Option<usize>,
    duration: Duration,
    warmup: Duration,
    calls: u64,
    timestamps: u64,
    latency_us: Histogram<u32>,
    errors: BTreeMap<String, u64>,
    longest_gap: Duration,
    /// The machine's 1-minute load average before and after: figures from a busy machine
    /// are lower bounds.
    load_average: (Option<f64>, Option<f64>),
    checked: u64,
    unchecked: u64,
    duplicates: u64,
    regressions: u64,
    malformed: u64,
}

impl Report {
    fn merge(
        args: &BenchArgs,
        endpoints: &[String],
        stats: Vec<CallerStats>,
        live: &Live,
    ) -> Report {
        let mut latency_us =
            Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds");
        let mut errors = BTreeMap::new();
        let (mut calls, mut timestamps, mut regressions, mut unchecked) = (0, 0, 0, 0);
        let mut malformed = 0;
        let mut ranges = Vec::new();
        for s in stats {
            latency_us
                .add(&s.latency_us)
                .expect("same histogram bounds");
            calls += s.calls;
            timestamps += s.timestamps;
            regressions += s.regressions;
            malformed += s.malformed;
            unchecked += s.ranges_dropped;
            for (code, n) in s.errors {
                *errors.entry(code).or_default() += n;
            }
            ranges.extend(s.ranges);
        }
        let checked = ranges.len() as u64;
        Report {
            target: format!(
                "{}{}",
                endpoints.join(","),
                if args.spawn { " (spawned)" } else { "" }
            ),
            callers: args.callers,
            connections: args.connections,
            count: args.count,
            mode: args.mode,
            threads: args.threads,
            duration: args.duration,
            warmup: args.warmup,
            calls,
            timestamps,
            latency_us,
            errors,
            longest_gap: Duration::from_nanos(live.longest_gap_ns.load(Ordering::Relaxed)),
            load_average: (None, None),
            checked,
            unchecked,
            duplicates: duplicates(ranges),
            regressions,
            malformed,
        }
    }

    /// Whether every reply kept the oracle's guarantees.
    fn ok(&self) -> bool {
        self.duplicates == 0 && self.regressions == 0 && self.malformed == 0
    }

    fn per_second(&self, n: u64) -> f64 {
        n as f64 / self.duration.as_secs_f64()
    }

    fn percentile_ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
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
        let check = if self.ok() {
            format!(
                "ok: {} grants, no duplicates, every caller's values rise",
                thousands(self.checked)
            )
        } else {
            format!(
                "VIOLATION: {} duplicates, {} regressions or short grants, {} malformed replies, in {} grants",
                self.duplicates,
                self.regressions,
                self.malformed,
                thousands(self.checked)
            )
        };
        let unchecked = if self.unchecked > 0 {
            format!(
                " ({} more grants checked per caller only)",
                thousands(self.unchecked)
            )
        } else {
            String::new()
        };
        format!(
            "target       {}\n\
             load         {} callers, {}, {} timestamp(s) per call, {} after {} warm-up\n\
             calls        {} ({}/s)\n\
             timestamps   {} ({}/s)\n\
             latency      p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms\n\
             errors       {errors}\n\
             longest gap  {:.3} ms without a successful reply\n\
             machine      load average {} before, {} after, {} cores\n\
             check        {check}{unchecked}\n",
            self.target,
            self.callers,
            match self.mode {
                BenchMode::Raw => format!("raw RPCs over {} connection(s)", self.connections),
                BenchMode::Library => "through the client library (coalescing)".to_string(),
            },
            self.count,
            humantime::format_duration(self.duration),
            humantime::format_duration(self.warmup),
            thousands(self.calls),
            thousands(self.per_second(self.calls) as u64),
            thousands(self.timestamps),
            thousands(self.per_second(self.timestamps) as u64),
            self.percentile_ms(0.5),
            self.percentile_ms(0.9),
            self.percentile_ms(0.99),
            self.percentile_ms(0.999),
            self.latency_us.max() as f64 / 1000.0,
            self.longest_gap.as_secs_f64() * 1000.0,
            show_load(self.load_average.0),
            show_load(self.load_average.1),
            cores(),
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "target": self.target,
            "callers": self.callers,
            "connections": self.connections,
            "count": self.count,
            "mode": self.mode.name(),
            "threads": self.threads,
            "duration_s": self.duration.as_secs_f64(),
            "warmup_s": self.warmup.as_secs_f64(),
            "calls": self.calls,
            "calls_per_s": self.per_second(self.calls),
            "timestamps": self.timestamps,
            "timestamps_per_s": self.per_second(self.timestamps),
            "latency_ms": {
                "p50": self.percentile_ms(0.5),
                "p90": self.percentile_ms(0.9),
                "p99": self.percentile_ms(0.99),
                "p99_9": self.percentile_ms(0.999),
                "max": self.latency_us.max() as f64 / 1000.0,
            },
            "errors": self.errors,
            "longest_gap_ms": self.longest_gap.as_secs_f64() * 1000.0,
            "load_average_before": self.load_average.0,
            "load_average_after": self.load_average.1,
            "cores": cores(),
            "check": {
                "ok": self.ok(),
                "grants_checked": self.checked,
                "grants_checked_per_caller_only": self.unchecked,
                "duplicates": self.duplicates,
                "regressions": self.regressions,
                "malformed": self.malformed,
            },
        })
    }
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

/// Overlapping grants among `ranges` (each `(first, last)`).
fn duplicates(mut ranges: Vec<(u64, u64)>) -> u64 {
    ranges.sort_unstable();
    let mut found = 0;
    let mut highest: Option<u64> = None;
    for (first, last) in ranges {
        if highest.is_some_and(|h| first <= h) {
            found += 1;
        }
        highest = Some(highest.map_or(last, |h| h.max(last)));
    }
    found
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
    fn finds_overlapping_grants() {
        assert_eq!(duplicates(vec![(1, 3), (4, 4), (10, 20)]), 0);
        assert_eq!(duplicates(vec![(10, 20), (1, 3), (15, 15)]), 1);
        assert_eq!(duplicates(vec![(1, 100), (5, 5), (50, 60)]), 2);
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
        for at in [10, 30, 25, 100, 90] {
            live.success(at);
        }
        assert_eq!(live.longest_gap_ns.load(Ordering::Relaxed), 70);
    }
}
