//! Command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tso_lab::bench::{BenchRpc, LoadMode, SeqKeys};
use tso_lab::check::{BenchMode, Workload};
use tso_proto::limits::SEQ_COUNT_MAX;

#[derive(Debug, Parser)]
#[command(
    name = "tso",
    version,
    about = "A distributed timestamp oracle speaking tsoracle.v1"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a server.
    Serve(Box<ServeArgs>),
    /// Seed a fresh data directory so the first timestamps are above a given millisecond, or,
    /// with --from, so every timestamp and sequence value is above what `tso export` files hold
    /// (disaster recovery; see docs/operations.md).
    Init(InitArgs),
    /// Write the durable state (high-water, sequence counters, lease set) of a stopped node's
    /// data directory, or of etcd, as checksummed JSON for `tso init --from`.
    Export(ExportArgs),
    /// Ask a server for timestamps and print them, one per line.
    Get(GetArgs),
    /// Take a block of a dense sequence (GetSeq; several keys: one GetSeqBatch) and print it.
    Seq(SeqArgs),
    /// Stamping leases: acquire, renew or release one, and print it.
    Lease(LeaseArgs),
    /// Print the safe frontier (GetSafeFrontier) from the leader, in physical ms.
    Frontier(FrontierArgs),
    /// Decode timestamps (physical ms as RFC 3339 UTC, logical), or print the smallest
    /// timestamp of a millisecond (--at); no server needed.
    Parse(ParseArgs),
    /// Closed-loop load against a server: rate, latency percentiles, errors; checks the replies.
    Bench(BenchArgs),
    /// Jepsen-style check: clients recording every call, a seeded nemesis, history checks.
    /// Exit code 0 clean, 1 violation, 2 usage or setup error.
    Check(CheckArgs),
    /// Raft cluster membership: list members, add a learner, promote, remove (see
    /// docs/membership.md). Exit code 0 done, 1 refused or failed.
    Admin(crate::admin::AdminArgs),
    /// One row per node (role, epoch, leader, high-water, fence, raft progress, leases,
    /// sequences, version) and whether the cluster is healthy, in words. Exit code 0 healthy,
    /// 1 degraded (a node unreachable or far behind, no leader), 2 no node answers.
    Status(crate::ops::StatusArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Client address to listen on (port 0 picks a free one; the real address is printed).
    #[arg(
        long,
        visible_alias = "client-addr",
        default_value = "127.0.0.1:50551",
        env = "TSO_LISTEN"
    )]
    pub listen: SocketAddr,
    /// Where durability and leadership come from: `file` (one node), `raft` (a cluster) or
    /// `etcd` (nodes that keep nothing locally, on an etcd cluster you run).
    #[arg(long, value_enum, default_value_t = BackendKind::File, env = "TSO_BACKEND")]
    pub backend: BackendKind,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub tls: crate::tls::ServeTlsArgs,
    /// Data directory (created if missing; locked while the server runs).
    #[arg(long, default_value = "./tso-data", env = "TSO_DATA_DIR")]
    pub data_dir: PathBuf,
    /// How far ahead of the clock each durable window extension reaches.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub window_ahead: Duration,
    /// How far above the fence floor a new leader persists before serving.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub failover_advance: Duration,
    /// How long shutdown waits for in-flight calls and background work.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// For comparisons: a raft leader stops without handing its leadership on (by default it
    /// hands it to an up-to-date voter within the shutdown grace), so the cluster elects a
    /// leader as after a crash.
    #[arg(long, hide = true)]
    pub no_handoff: bool,
    /// Worker threads of the server's runtime (default: one per core).
    #[arg(long, env = "TSO_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
    /// Serve Prometheus metrics on this address (`/metrics`); off when not set.
    #[arg(long, env = "TSO_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub controls: ServeControls,
    /// Largest `count` of one key in one GetSeq/GetSeqBatch entry (at most the protocol's 65536).
    #[arg(long, default_value_t = SEQ_COUNT_MAX,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(SEQ_COUNT_MAX)))]
    pub seq_count_max: u32,
    /// Most distinct dense-sequence keys this server keeps; a new key past it is refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = tso_server::SEQ_KEYS_MAX_DEFAULT as u64,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub seq_keys_max: u64,
    /// Shortest TTL a stamping lease may ask for.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub lease_ttl_min: Duration,
    /// Longest TTL a stamping lease may ask for; leases expired longer ago are forgotten.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub lease_ttl_max: Duration,
    /// Log filter (tracing syntax, e.g. `info`, `tso_server=debug`). Logs go to stderr.
    #[arg(long, default_value = "info,openraft=warn", env = "TSO_LOG")]
    pub log: String,
    /// Read settings from this TOML file: one key per flag above, named as the flag
    /// (`data-dir = "/var/lib/tso"`); flags and TSO_* variables override it. See
    /// examples/tso.toml.
    #[arg(long, value_name = "FILE", env = "TSO_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (file, TSO_* variables and flags) as a TOML file that
    /// --config accepts, and exit without serving.
    #[arg(long)]
    pub print_config: bool,
}

/// The hidden `--unsafe-*` flags of `tso serve`: servers broken on purpose for the checker's
/// positive controls, and the fault tests' hooks. Never set in production.
#[derive(Debug, Args)]
pub struct ServeControls {
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: the failover fence reads the durable
    /// high-water as 0, as if the backend had lost its record, so a restart under a clock set
    /// back reissues timestamps. This breaks the oracle on purpose. Never set it.
    #[arg(long, hide = true)]
    pub unsafe_forget_high_water: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: grant without checking the raft leader lease,
    /// so a leader cut off from its peers keeps granting while a new leader serves. This breaks
    /// the oracle on purpose. Never set it.
    #[arg(long, hide = true)]
    pub unsafe_no_leader_lease: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: the admin service no longer refuses to remove
    /// the leader of a two-voter cluster, so the survivor elects itself at once while the old
    /// leader still grants under its lease. This breaks the oracle on purpose. Never set it.
    #[arg(long, hide = true)]
    pub unsafe_allow_leader_removal: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: a member restarted under its old id on a wiped
    /// data directory counts again (its peers do not check incarnations), so its empty vote can
    /// elect a node whose log lacks committed writes. This breaks the oracle on purpose.
    #[arg(long, hide = true)]
    pub unsafe_trust_wiped: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: each new leader starts every sequence from 0
    /// instead of loading the durable counters, so blocks are handed out twice after a failover
    /// or restart. This breaks the oracle on purpose. Never set it.
    #[arg(long, hide = true)]
    pub unsafe_seq_forget: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: each new leader starts with an empty lease
    /// set instead of loading it, so its safe frontier can pass the bound of a live lease.
    /// This breaks the oracle on purpose. Never set it.
    #[arg(long, hide = true)]
    pub unsafe_lease_forget: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: judge stamping leases' expiry by the wall
    /// clock, so a clock step ends a live lease or brings an expired one back. This breaks the
    /// oracle on purpose. Never set it.
    #[arg(long, hide = true)]
    pub unsafe_lease_wall_expiry: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: a stamping lease's bound raises the high-water
    /// in memory only, so the next leader may grant above an answered bound. This breaks the
    /// oracle on purpose. Never set it.
    #[arg(long, hide = true)]
    pub unsafe_lease_bound_in_memory: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: now and then a sequence call is refused after
    /// its block was spent, a gap nothing explains. This breaks the oracle on purpose. Never
    /// set it.
    #[arg(long, hide = true)]
    pub unsafe_seq_burn_refused: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: a leader handing off (SIGTERM or
    /// transfer-leader) keeps its lease and keeps granting under it after its vote gate lets
    /// the successor be elected. This breaks the oracle on purpose. Never set it.
    #[arg(long, hide = true)]
    pub unsafe_handoff_keep_leader_lease: bool,
    /// FOR MEASURING WHAT THE PRE-VOTE GATE BUYS ONLY: elections skip it, as before it was
    /// built, so a follower cut off and healed raises the term and unseats the leader. Never
    /// set it.
    #[arg(long, hide = true)]
    pub unsafe_ungate_elections: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY (file backend): a record replaced by rename is
    /// not followed by an fsync of the directory, so after a power loss the old record is back.
    /// This breaks the oracle on purpose. Never set it.
    #[arg(long, hide = true)]
    pub unsafe_skip_dir_fsync: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY (raft backend): the log store acknowledges
    /// appended entries before they are durable and fsyncs them at most once a second, so a
    /// power loss of a quorum loses committed entries. This breaks the oracle on purpose.
    /// Never set it.
    #[arg(long, hide = true)]
    pub unsafe_ack_before_fsync: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY (etcd backend): the leader lease never runs
    /// out by its deadline, and the node keeps leading while its keep-alives fail, so a leader
    /// cut off from etcd keeps granting while another node wins. This breaks the oracle on
    /// purpose. Never set it.
    #[arg(long, hide = true)]
    pub unsafe_etcd_ignore_lease: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY (etcd backend): every write of the state key
    /// skips the transaction's fencing compares, so a deposed leader's write lands over its
    /// successor's. This breaks the oracle on purpose. Never set it.
    #[arg(long, hide = true)]
    pub unsafe_etcd_skip_fence: bool,
    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY: `RaiseHighWater` moves the leader's window in
    /// memory and persists nothing, so a later leader grants below what was answered after the
    /// raise. This breaks the oracle on purpose. Never set it.
    #[arg(long, hide = true)]
    pub unsafe_raise_in_memory: bool,
    /// FOR FAULT TESTS ONLY: shift this server's clock by the signed number of milliseconds
    /// written in this file (re-read every 50 ms). Never set it in production.
    #[arg(long, hide = true)]
    pub unsafe_clock_offset_file: Option<PathBuf>,
    /// FOR FAULT TESTS ONLY: while a file exists at this path, every fsync of the raft log
    /// waits, as on a stuck disk. Never set it in production.
    #[arg(long, hide = true)]
    pub unsafe_fsync_stall_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// A single node; the high-water in an fsync'd file in the data directory.
    File,
    /// One node of a raft cluster (needs --node-id, --peer-addr and, on first start, --members).
    Raft,
    /// One of any number of nodes that elect a leader and keep their state on an etcd v3
    /// cluster (needs --node-id and --etcd-endpoints); nothing is kept on local disk.
    Etcd,
}

/// Flags of `--backend etcd` (with `--node-id` and `--advertise-client-addr` of the raft flags).
#[derive(Debug, Args)]
pub struct EtcdArgs {
    /// The etcd cluster's client URLs, comma-separated (`http://10.0.0.1:2379,...`).
    #[arg(long, value_delimiter = ',', env = "TSO_ETCD_ENDPOINTS")]
    pub etcd_endpoints: Vec<String>,
    /// The key prefix this oracle keeps its leader key and its state under; oracles sharing an
    /// etcd cluster need different prefixes.
    #[arg(long, default_value = "/tso/default", env = "TSO_ETCD_PREFIX")]
    pub etcd_prefix: String,
    /// TTL of the etcd lease that holds the leader key (whole seconds, at least 2 s): a dead
    /// leader is replaced about this long after its last keep-alive.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub etcd_lease_ttl: Duration,
    /// PEM file of the CA certificates that signed the etcd members' server certificates:
    /// calls to etcd use TLS (`https://` endpoints; a bare `host:port` then means https).
    #[arg(long, env = "TSO_ETCD_TLS_CA")]
    pub etcd_tls_ca: Option<PathBuf>,
    /// PEM certificate this node presents to etcd (for etcd's `--client-cert-auth`); needs
    /// --etcd-tls-key and --etcd-tls-ca.
    #[arg(long, requires_all = ["etcd_tls_key", "etcd_tls_ca"], env = "TSO_ETCD_TLS_CERT")]
    pub etcd_tls_cert: Option<PathBuf>,
    /// PEM private key of --etcd-tls-cert.
    #[arg(long, requires = "etcd_tls_cert", env = "TSO_ETCD_TLS_KEY")]
    pub etcd_tls_key: Option<PathBuf>,
    /// The name etcd's server certificate must carry, when it is not the endpoint's host.
    #[arg(long, requires = "etcd_tls_ca", env = "TSO_ETCD_TLS_SERVER_NAME")]
    pub etcd_tls_server_name: Option<String>,
}

impl EtcdArgs {
    /// TLS to etcd from the `--etcd-tls-*` flags (`tso serve`, `tso export`), each file checked
    /// now (an error names the flag and the file); `None` without `--etcd-tls-ca`.
    pub fn tls(&self) -> anyhow::Result<Option<tso_server::backend::etcd::EtcdTls>> {
        let Some(ca) = &self.etcd_tls_ca else {
            return Ok(None);
        };
        let identity = match (&self.etcd_tls_cert, &self.etcd_tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::load_identity(
                ("--etcd-tls-cert", cert),
                ("--etcd-tls-key", key),
            )?),
            _ => None,
        };
        Ok(Some(tso_server::backend::etcd::EtcdTls {
            ca: crate::tls::load_ca("--etcd-tls-ca", ca)?,
            identity,
            server_name: self.etcd_tls_server_name.clone(),
        }))
    }
}

/// Flags of `--backend raft`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// This node's id in the cluster (one of the ids in --members).
    #[arg(long, env = "TSO_NODE_ID")]
    pub node_id: Option<u64>,
    /// The client address put in leader hints (defaults to this node's entry in --members, else
    /// --listen). Use it when --listen is `0.0.0.0:…` or behind a proxy.
    #[arg(long)]
    pub advertise_client_addr: Option<String>,
    /// Address to listen on for raft peers.
    #[arg(long, env = "TSO_PEER_ADDR")]
    pub peer_addr: Option<SocketAddr>,
    /// The peer address other nodes dial (defaults to this node's entry in --members, else
    /// --peer-addr).
    #[arg(long)]
    pub advertise_peer_addr: Option<String>,
    /// The initial members, the same list on every node:
    /// `ID=HOST:CLIENT_PORT/PEER_PORT[/ADMIN_PORT]` or `ID=CLIENT_HOST:PORT/PEER_HOST:PORT[/ADMIN_HOST:PORT]`,
    /// comma-separated, advertised forms (the admin part feeds `tso admin`'s leader redirect). Used on the first start of a fresh data directory; a restarted node
    /// reads the members from its log and may omit it.
    #[arg(long, value_delimiter = ',', env = "TSO_MEMBERS")]
    pub members: Vec<String>,
    /// Start a fresh data directory with no --members and wait to be added to a running cluster
    /// (`tso admin add-learner` on its leader); a restart needs no --join.
    #[arg(long)]
    pub join: bool,
    /// Serve the admin service (`tso.admin.v1`: membership changes) on this address; off if
    /// not given.
    #[arg(long, env = "TSO_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Raft heartbeat period (also the leader lease renewal period).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomized election timeout.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout; followers also refuse votes this long
    /// after hearing from a leader (the leader lease is 90 % of it).
    #[arg(long, default_value = "350ms", value_parser = humantime::parse_duration)]
    pub election_timeout_max: Duration,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Data directory to seed (must not hold a record yet; with --from, must be empty).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Millisecond the first timestamps must be above (for example the last physical ms issued
    /// by the oracle this one replaces).
    #[arg(long, required_unless_present = "from", conflicts_with = "from")]
    pub seed_physical_ms: Option<u64>,
    /// A `tso export` file; repeat for every surviving copy. Each is verified; the seed is the
    /// maximum of them all, plus --ts-margin and --seq-margin.
    #[arg(long, value_name = "FILE")]
    pub from: Vec<PathBuf>,
    /// With --from: added to the highest high-water (and lease bound) of the exports. Covers
    /// what the exports may lag the dead cluster by (see docs/operations.md).
    #[arg(long, requires = "from", value_parser = humantime::parse_duration)]
    pub ts_margin: Option<Duration>,
    /// With --from: added to every sequence counter (and to the next lease id). Covers the
    /// group commits the exports may lack.
    #[arg(long, requires = "from")]
    pub seq_margin: Option<u64>,
    /// With --from: the backend of the directory to seed. `raft`: one initial member of a new
    /// cluster; seed every initial member from the same exports and margins before its first
    /// start.
    #[arg(long, value_enum, default_value_t = BackendKind::File, requires = "from")]
    pub backend: BackendKind,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The data directory of a stopped node (or a copy of it); the backend (file or raft) is
    /// told by its files. Read only: nothing in it is changed.
    #[arg(long, required_unless_present = "backend", conflicts_with = "backend")]
    pub data_dir: Option<PathBuf>,
    /// `etcd`: read the state key of --etcd-prefix from --etcd-endpoints (may run against a live
    /// etcd) instead of a data directory.
    #[arg(long, value_enum)]
    pub backend: Option<BackendKind>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Write the export here (atomically) instead of to stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ParseArgs {
    /// Timestamps to decode; `-` reads more from stdin (whitespace-separated).
    pub timestamps: Vec<String>,
    /// Print the smallest timestamp of this millisecond instead (RFC 3339 in UTC, e.g.
    /// 2026-12-01T00:00:00Z).
    #[arg(long)]
    pub at: Option<String>,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// How many timestamps.
    #[arg(short = 'n', long = "count", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Server addresses, comma-separated (`host:port`, `http://host:port` or
    /// `https://host:port`); the leader is found through hints.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:50551",
        env = "TSO_ENDPOINTS"
    )]
    pub endpoints: Vec<String>,
    #[command(flatten)]
    pub tls: crate::tls::ClientTlsArgs,
    /// Print physical ms, logical and epoch beside each timestamp.
    #[arg(long, short)]
    pub verbose: bool,
    /// Give up after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Log filter for the client's own logs on stderr (e.g. `tso_client=debug`).
    #[arg(long, default_value = "warn", env = "TSO_LOG")]
    pub log: String,
}

#[derive(Debug, Args)]
pub struct SeqArgs {
    /// The sequence key (1 to 128 bytes). Several keys are granted together, all or nothing.
    #[arg(required = true, num_args = 1..)]
    pub keys: Vec<String>,
    /// How many values per key (1 to 65536).
    #[arg(short = 'n', long = "count", default_value_t = 1)]
    pub count: u32,
    /// Server addresses, comma-separated (`host:port`, `http://host:port` or
    /// `https://host:port`); the leader is found through hints.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:50551",
        env = "TSO_ENDPOINTS"
    )]
    pub endpoints: Vec<String>,
    #[command(flatten)]
    pub tls: crate::tls::ClientTlsArgs,
    /// Give up after this long (a call already sent is then reported as uncertain).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Log filter for the client's own logs on stderr (e.g. `tso_client=debug`).
    #[arg(long, default_value = "warn", env = "TSO_LOG")]
    pub log: String,
}

/// Flags of the commands that make one call through the client library.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// Server addresses, comma-separated (`host:port`, `http://host:port` or
    /// `https://host:port`); the leader is found through hints.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:50551",
        env = "TSO_ENDPOINTS"
    )]
    pub endpoints: Vec<String>,
    #[command(flatten)]
    pub tls: crate::tls::ClientTlsArgs,
    /// Give up after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Log filter for the client's own logs on stderr (e.g. `tso_client=debug`).
    #[arg(long, default_value = "warn", env = "TSO_LOG")]
    pub log: String,
}

#[derive(Debug, Args)]
pub struct LeaseArgs {
    #[command(subcommand)]
    pub command: LeaseCommand,
}

/// Each prints one line, `ID<TAB>ts_upper_bound=MS<TAB>expires_at_ms=MS<TAB>epoch=E` (release:
/// `ID<TAB>released`).
#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Acquire a lease for a holder (the same holder and holder epoch get the same lease back).
    Acquire(AcquireArgs),
    /// Renew a lease: a fresh bound and expiry with the TTL it was acquired with.
    Renew(LeaseIdArgs),
    /// Release a lease (an unknown id is fine).
    Release(LeaseIdArgs),
}

#[derive(Debug, Args)]
pub struct AcquireArgs {
    /// The holder's name (1 to 128 bytes).
    #[arg(long, value_parser = parse_holder)]
    pub holder: String,
    /// The holder's incarnation: a higher one supersedes the holder's live lease, a lower one
    /// is refused.
    #[arg(long, default_value_t = 0)]
    pub holder_epoch: u64,
    /// How long the lease lasts unless renewed (whole milliseconds; the server accepts 5s to
    /// 300s by default).
    #[arg(long, default_value = "10s", value_parser = parse_ttl)]
    pub ttl: Duration,
    #[command(flatten)]
    pub call: CallArgs,
}

#[derive(Debug, Args)]
pub struct LeaseIdArgs {
    /// The lease id `tso lease acquire` printed.
    pub lease_id: u64,
    #[command(flatten)]
    pub call: CallArgs,
}

#[derive(Debug, Args)]
pub struct FrontierArgs {
    /// Print the epoch of the leader that answered beside the frontier.
    #[arg(long, short)]
    pub verbose: bool,
    #[command(flatten)]
    pub call: CallArgs,
}

/// A lease holder: 1 to 128 bytes.
fn parse_holder(raw: &str) -> Result<String, String> {
    let max = tso_client::LEASE_HOLDER_BYTES_MAX;
    if raw.is_empty() || raw.len() > max {
        return Err(format!("{} bytes: give 1 to {max} bytes", raw.len()));
    }
    Ok(raw.to_owned())
}

/// A lease TTL: a duration of whole milliseconds, at least 1 ms.
fn parse_ttl(raw: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(raw).map_err(|e| e.to_string())?;
    let whole_ms = Duration::from_millis(ttl.as_millis().try_into().unwrap_or(u64::MAX));
    if ttl < Duration::from_millis(1) || whole_ms != ttl {
        return Err(format!(
            "{ttl:?}: give a whole number of milliseconds, at least 1ms"
        ));
    }
    Ok(ttl)
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Server addresses, comma-separated (`host:port`, `http://host:port` or
    /// `https://host:port`); the leader is found through hints. Ignored with `--spawn`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:50551",
        env = "TSO_ENDPOINTS"
    )]
    pub endpoints: Vec<String>,
    #[command(flatten)]
    pub tls: crate::tls::ClientTlsArgs,
    /// Start a `tso serve` of this binary on a temporary directory and a free port, and bench it
    /// (without TLS: the TLS flags apply to --endpoints only).
    #[arg(long)]
    pub spawn: bool,
    /// Concurrent callers; each waits for its reply before its next call.
    #[arg(long, short = 'c', default_value_t = 16)]
    pub callers: usize,
    /// HTTP/2 connections per endpoint; callers are spread over them.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Timestamps (or sequence values) per call.
    #[arg(long, short = 'n', default_value_t = 1)]
    pub count: u32,
    /// Raw unary RPCs; raw calls on the streaming `GetTsStream` (`--rpc ts` only: one stream
    /// per connection shared by its callers, or one each with `--stream-per-caller`); or calls
    /// through the client library (one client shared by every caller; `--connections` does not
    /// apply; `GetTs` callers are coalesced, sequence callers are not).
    #[arg(long, value_enum, default_value = "raw")]
    pub mode: LoadMode,
    /// With `--mode stream`: a stream per caller (spread over the connections) instead of one
    /// per connection.
    #[arg(long)]
    pub stream_per_caller: bool,
    /// The RPC to load: `GetTs`, or `GetSeq` on the keys of `--seq-keys`.
    #[arg(long, value_enum, default_value = "ts")]
    pub rpc: BenchRpc,
    /// With `--rpc seq`: one key shared by every caller (`bench-shared`), or one key per caller
    /// (`bench-caller-N`). The names are fixed, so repeated runs reuse the same keys.
    #[arg(long, value_enum, default_value = "shared")]
    pub seq_keys: SeqKeys,
    /// How long to measure, after the warm-up.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// How long to run before measuring (replies are still checked).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Deadline of each call.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Worker threads of the load generator's runtime [default: one per core; with --spawn,
    /// half of the cores, and the spawned server gets the other half]. On a machine shared
    /// with the server, fewer threads leave it more CPU.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object instead of the human-readable report.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Nodes of the local cluster (1: file backend, unless --backend etcd).
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// What the local cluster's nodes keep their state on: raft among themselves (the file
    /// backend with --nodes 1), or a 3-member etcd cluster the checker starts (`/usr/bin/etcd`),
    /// with --nodes oracle nodes on it. etcd takes the faults kill, pause, clock, etcd-kill and
    /// etcd-quorum, and no --unsafe-* control.
    #[arg(long, value_enum, default_value = "raft")]
    pub backend: tso_lab::check::CheckBackend,
    /// Attach to these endpoints instead of starting a cluster: load and history checks only,
    /// no faults. The TLS flags apply only here: a cluster the checker starts itself runs
    /// without TLS.
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
    #[command(flatten)]
    pub tls: crate::tls::ClientTlsArgs,
    /// Concurrent clients, each making one call at a time over its own connection (clients
    /// share connections past 64). Against several nodes, one client per node is pinned to it
    /// (raw RPCs to that node only) as long as one is left to follow the leader.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Calls recorded at most, over all clients: when they have made this many, the clients
    /// and the nemesis stop together and the history is checked.
    #[arg(long, default_value_t = tso_lab::check::options::CALLS_MAX)]
    pub calls_max: usize,
    /// What the clients call: `GetTs` (timestamps), `GetSeq` and `GetSeqBatch` on a few fixed
    /// keys (dense sequences, checked for D1, D2 and the order of their epochs), or the
    /// stamping-lease RPCs with `GetSafeFrontier` and `GetTs` (checked for the frontier's and
    /// the bounds' rules; with `--mode library` holders run through `LeaseKeeper`, whose
    /// permits are checked against the server's expiry).
    #[arg(long, value_enum, default_value = "ts")]
    pub workload: Workload,
    /// Each `GetTs` call asks for a random count from 1 to this (sequence calls ask for 1 to 64
    /// values of each key).
    #[arg(long, default_value_t = 16)]
    pub count_max: u32,
    /// Raw RPCs, or calls through the client library (one client shared by every checker
    /// client, so calls are coalesced: the history then checks the library too; lease holders
    /// go through `LeaseKeeper`).
    #[arg(long, value_enum, default_value = "raw")]
    pub mode: BenchMode,
    /// How long the clients and the nemesis run.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Faults the nemesis draws from, comma-separated: kill, pause, clock, and for raft
    /// clusters partition, handoff (SIGTERM the leader, restart it) and member (replace a node,
    /// or shrink to one voter and grow back, through the admin service) and wipe (lose a
    /// follower's raft log or whole data directory, then replace it); and on the fault layer under
    /// each data directory: power (kill -9 and drop what no fsync made durable), disk-error (EIO
    /// from fsync), disk-full (ENOSPC), slow-disk (slow fsyncs); and with --backend etcd:
    /// etcd-kill (kill -9 one etcd member, restart it within 1 s) and etcd-quorum (kill -9 two
    /// of the three, restart both after 1 to 4 s).
    #[arg(long, value_delimiter = ',', default_value = "kill,pause,clock")]
    pub faults: Vec<tso_lab::check::schedule::FaultKind>,
    /// Mean quiet time between faults (each gap is drawn from half to 1.5 times this).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub fault_interval: Duration,
    /// How long each fsync takes during a slow-disk fault [default: drawn for each fault, 1 to
    /// 300 ms].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub slow_fsync: Option<Duration>,
    /// Seed of the schedule and of the clients' counts; random when absent, always printed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// After each fault heals, a call must succeed within this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub liveness_bound: Duration,
    /// Deadline of each call.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub call_timeout: Duration,
    /// Where to write the schedule and the history summary (JSON) [default: tso-check-SEED.json].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write every recorded call here, one JSON object per line (`client`, `start_ns` and
    /// `end_ns` on CLOCK_MONOTONIC, `requested`, and `physical_ms`/`logical_start`/`count`,
    /// `error`, or `malformed` for a reply the client library refused; sequence calls have a
    /// `key`, and `start`/`count`/`epoch` (`"HI.LO"`), `error`, `uncertain` or `malformed`; a
    /// `GetSeqBatch` is one line per key, each with the call's span and outcome and the same
    /// `batch`, the number of the batch among its client's; lines without `epoch` or `batch`,
    /// from older files, still verify).
    #[arg(long)]
    pub history: Option<PathBuf>,
    /// Check histories written by `--history` (one or several, e.g. from several processes on
    /// one machine: they share CLOCK_MONOTONIC) instead of running anything: merged, then
    /// checked for duplicates, regression, real-time order and grant shape (sequence calls: for
    /// overlaps, gaps above each key's lowest block, the order of epochs, and shape).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["endpoints", "control"])]
    pub verify: Vec<PathBuf>,
    /// Directory for the nodes' data and logs [default: a temporary one, removed after a clean
    /// run].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[command(flatten)]
    pub controls: CheckControls,
}

/// The positive controls of `tso check` (and its one ablation), at most one per run: each runs
/// servers broken on purpose, through their hidden `--unsafe-*` flags.
#[derive(Debug, Args)]
#[group(id = "control", multiple = false)]
pub struct CheckControls {
    /// POSITIVE CONTROL: run servers that forget their durable high-water at start, set their
    /// clocks back and kill them. A working checker reports a violation (exit 1).
    #[arg(long)]
    pub unsafe_positive_control: bool,
    /// POSITIVE CONTROL of partition safety: run raft servers that grant without checking
    /// their leader lease, and cut the leader off from its peers. A working checker reports a
    /// violation (exit 1).
    #[arg(long)]
    pub unsafe_no_leader_lease: bool,
    /// POSITIVE CONTROL of dense sequences (with `--workload seq`): run servers whose every new
    /// leader starts each sequence from 0, and kill the leader. A working checker reports a D1
    /// violation (exit 1).
    #[arg(long)]
    pub unsafe_seq_forget: bool,
    /// POSITIVE CONTROL of stamping leases (with `--workload lease`): run servers whose every
    /// new leader starts with an empty lease set, and kill the leader. A working checker
    /// reports a rule-1 violation, a frontier above a live lease's bound (exit 1).
    #[arg(long)]
    pub unsafe_lease_forget: bool,
    /// POSITIVE CONTROL of membership changes (raft clusters, `--workload ts`): run servers that
    /// let the leader of two voters be removed at once, and shrink the cluster to two voters
    /// then remove its leader, with clients pinned to every node. A working checker reports a
    /// real-time violation (exit 1): the survivor grants while the removed leader still does.
    #[arg(long)]
    pub unsafe_allow_leader_removal: bool,
    /// POSITIVE CONTROL of cluster identity (`--nodes 3`, `--workload ts`): run servers that
    /// let a member restarted under its old id on a wiped directory vote again, and open with
    /// a follower cut off, the leader killed and the other follower wiped: the cut-off one is
    /// elected on a stale log. A working checker reports duplicates and real-time violations
    /// (exit 1).
    #[arg(long)]
    pub unsafe_trust_wiped: bool,
    /// POSITIVE CONTROL of monotonic lease expiry (`--workload lease`, with clock faults): run
    /// servers that judge stamping leases' expiry by the wall clock. A working checker reports
    /// a frontier above a live lease's bound or a frontier going back (exit 1).
    #[arg(long)]
    pub unsafe_lease_wall_expiry: bool,
    /// POSITIVE CONTROL of durable lease bounds (`--workload lease`): run servers that raise
    /// the high-water for a lease's bound in memory only, and kill the leader. A working
    /// checker reports a later leader's grant above an answered bound (exit 1).
    #[arg(long)]
    pub unsafe_lease_bound_in_memory: bool,
    /// POSITIVE CONTROL of D2 (`--workload seq`): run servers that now and then refuse a
    /// sequence call after spending its block. A working checker reports an unexplained gap
    /// (exit 1).
    #[arg(long)]
    pub unsafe_seq_burn_refused: bool,
    /// POSITIVE CONTROL of the handoff (raft clusters, `--workload ts`, with `handoff` faults):
    /// run servers whose leader keeps its lease, and keeps granting, after handing off. A
    /// working checker reports a real-time violation (exit 1).
    #[arg(long)]
    pub unsafe_handoff_keep_leader_lease: bool,
    /// POSITIVE CONTROL of the file backend's durability (`--nodes 1`, with `power` faults):
    /// run a server that renames records into place without fsyncing the directory, and open
    /// with power losses. A working checker reports values answered again (exit 1).
    #[arg(long)]
    pub unsafe_skip_dir_fsync: bool,
    /// POSITIVE CONTROL of the raft log's durability (raft clusters, with `power` faults): run
    /// servers whose log store acknowledges appends before they are durable, and open with
    /// power losses of every node at once. A working checker reports values answered again
    /// (exit 1).
    #[arg(long)]
    pub unsafe_ack_before_fsync: bool,
    /// POSITIVE CONTROL of the etcd backend's leader lease (`--backend etcd`, `--workload
    /// ts`): run oracle nodes whose leader lease ignores its deadline, and cut the leader off
    /// from etcd. A working checker reports real-time violations (exit 1): the cut-off leader
    /// grants while another node wins.
    #[arg(long)]
    pub unsafe_etcd_ignore_lease: bool,
    /// POSITIVE CONTROL of the etcd backend's fencing (`--backend etcd`, `--workload seq`):
    /// run oracle nodes whose writes skip the transaction's compares, and pause the leader past
    /// its etcd lease while it has sequence calls queued. A working checker reports values
    /// answered twice (exit 1): the resumed leader's blind write lands over its successor's.
    #[arg(long)]
    pub unsafe_etcd_skip_fence: bool,
    /// POSITIVE CONTROL of `tso admin raise` (`--workload ts`): run servers whose raise of the
    /// high-water is kept in memory only, and open with raises 6 s ahead of the clock, each
    /// followed by a kill of the leader. A working checker reports real-time violations (exit
    /// 1): the next leader grants below what was answered after the raise.
    #[arg(long)]
    pub unsafe_raise_in_memory: bool,
    /// ABLATION, not a control: run raft servers whose elections skip the pre-vote gate, as
    /// before it was built, to measure what a follower's heal costs the clients without it
    /// (the run's "longest gap in answers" line). It breaks no guarantee the checker judges.
    #[arg(long)]
    pub unsafe_ungate_elections: bool,
}
