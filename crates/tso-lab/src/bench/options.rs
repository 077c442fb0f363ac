//! What one `tso bench` run is given: typed options, which the `tso` binary fills from its flags
//! (the lab never sees a flag struct).

use std::path::PathBuf;
use std::time::Duration;

use tso_client::ClientTls;

/// One run of the load generator (each field is the flag of the same name of `tso bench`).
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Servers to load; ignored with `spawn`.
    pub endpoints: Vec<String>,
    /// TLS towards `endpoints`, loaded; a spawned server runs without TLS.
    pub tls: Option<ClientTls>,
    /// Start a `tso serve` of `server_bin` on a temporary directory and a free port, and load it.
    pub spawn: bool,
    /// The `tso` binary `spawn` runs.
    pub server_bin: PathBuf,
    /// Concurrent callers; each waits for its reply before its next call.
    pub callers: usize,
    /// HTTP/2 connections per endpoint.
    pub connections: usize,
    /// Timestamps (or sequence values) per call.
    pub count: u32,
    pub mode: LoadMode,
    /// With [`LoadMode::Stream`]: a stream per caller instead of one per connection.
    pub stream_per_caller: bool,
    pub rpc: BenchRpc,
    pub seq_keys: SeqKeys,
    /// How long to measure, after the warm-up.
    pub duration: Duration,
    /// How long to run before measuring (replies are still checked).
    pub warmup: Duration,
    /// Deadline of each call.
    pub timeout: Duration,
    /// Worker threads of the load generator's runtime [default: see `thread_split`].
    pub threads: Option<usize>,
    /// Print one JSON object instead of the human-readable report.
    pub json: bool,
}

/// The RPC `tso bench` loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchRpc {
    /// `GetTs`.
    Ts,
    /// `GetSeq`.
    Seq,
}

impl BenchRpc {
    pub fn name(self) -> &'static str {
        match self {
            BenchRpc::Ts => "ts",
            BenchRpc::Seq => "seq",
        }
    }
}

/// Which sequence keys `tso bench --rpc seq` callers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SeqKeys {
    /// One key for every caller: they contend on one counter.
    Shared,
    /// One key per caller: no two callers share a counter.
    PerCaller,
}

impl SeqKeys {
    pub fn name(self) -> &'static str {
        match self {
            SeqKeys::Shared => "shared",
            SeqKeys::PerCaller => "per-caller",
        }
    }

    /// The key caller `id` uses.
    pub fn key(self, id: usize) -> String {
        match self {
            SeqKeys::Shared => "bench-shared".into(),
            SeqKeys::PerCaller => format!("bench-caller-{id}"),
        }
    }
}

/// How `tso bench` callers reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadMode {
    /// One unary `GetTs` (or `GetSeq`) RPC per call.
    Raw,
    /// One request per call on a `GetTsStream` stream (`tso.stream.v1`).
    Stream,
    /// Through `tso-client`, which coalesces concurrent callers into shared RPCs.
    Library,
}

impl LoadMode {
    pub fn name(self) -> &'static str {
        match self {
            LoadMode::Raw => "raw",
            LoadMode::Stream => "stream",
            LoadMode::Library => "library",
        }
    }
}
