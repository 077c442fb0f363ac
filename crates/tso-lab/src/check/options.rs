//! What one `tso check` run is given: typed options, which the `tso` binary fills from its
//! flags (the lab never sees a flag struct), the positive controls grouped in one struct, and
//! the checks that refuse combinations that cannot work. Messages name the flags, since that is
//! how people give the options.

/// Calls recorded in one run at most, over all clients (each entry of a `GetSeqBatch` counts as
/// one): about 60 bytes each (80 for a sequence call), under 1.3 GiB (a release build against 3
/// local nodes makes about 13k calls/s, so 10 minutes fit). When the clients have made this
/// many they stop, and the nemesis with them.
pub const CALLS_MAX: usize = 16_000_000;

use std::path::PathBuf;
use std::time::Duration;

use tso_client::ClientTls;

use super::CLIENTS_MAX;
use super::schedule::{self, FaultKind};

/// One run of the checker (each field is the flag of the same name of `tso check`).
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The `tso` binary whose `serve` runs the nodes of the local cluster.
    pub server_bin: PathBuf,
    /// Nodes of the local cluster (1: file backend, unless `backend` is etcd).
    pub nodes: usize,
    /// What the nodes of a local cluster keep their state on: raft among themselves (or the
    /// file backend on one node), or a 3-member etcd cluster the checker starts.
    pub backend: CheckBackend,
    /// Attach to these instead of starting a cluster: load and history checks only.
    pub endpoints: Vec<String>,
    /// TLS towards `endpoints`, loaded; a cluster the checker starts runs without TLS.
    pub tls: Option<ClientTls>,
    /// Concurrent clients, each making one call at a time.
    pub clients: usize,
    /// Calls recorded at most, over all clients.
    pub calls_max: usize,
    pub workload: Workload,
    /// Each `GetTs` call asks for a random count from 1 to this.
    pub count_max: u32,
    pub mode: BenchMode,
    /// How long the clients and the nemesis run.
    pub duration: Duration,
    /// Faults the nemesis draws from.
    pub faults: Vec<schedule::FaultKind>,
    /// Mean quiet time between faults.
    pub fault_interval: Duration,
    /// How long each fsync takes during a slow-disk fault; drawn for each fault when `None`.
    pub slow_fsync: Option<Duration>,
    /// Seed of the schedule and of the clients' counts; random when absent.
    pub seed: Option<u64>,
    /// After each fault heals, a call must succeed within this long.
    pub liveness_bound: Duration,
    /// Deadline of each call.
    pub call_timeout: Duration,
    /// The result file [default: `tso-check-SEED.json`].
    pub out: Option<PathBuf>,
    /// Where to write every recorded call, one JSON object per line.
    pub history: Option<PathBuf>,
    /// Check these history files instead of running anything.
    pub verify: Vec<PathBuf>,
    /// Directory for the nodes' data and logs [default: a temporary one].
    pub work_dir: Option<PathBuf>,
    pub controls: Controls,
}

/// The positive controls, and the one ablation: each runs servers broken on purpose (through
/// their hidden `--unsafe-*` flags) and the faults that expose them, so a working checker
/// reports a violation (exit 1). At most one per run; `validate` says which runs each needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Controls {
    /// Servers that forget their durable high-water at start; clocks set back, nodes killed.
    pub unsafe_positive_control: bool,
    /// Raft servers that grant without checking their leader lease; the leader cut off.
    pub unsafe_no_leader_lease: bool,
    /// Servers whose every new leader starts each sequence from 0; the leader killed.
    pub unsafe_seq_forget: bool,
    /// Servers whose every new leader starts with an empty lease set; the leader killed.
    pub unsafe_lease_forget: bool,
    /// Servers that let the leader of two voters be removed at once; the cluster shrunk to two
    /// voters, then its leader removed.
    pub unsafe_allow_leader_removal: bool,
    /// Servers that let a member restarted on a wiped directory vote again.
    pub unsafe_trust_wiped: bool,
    /// Servers that judge stamping leases' expiry by the wall clock (caught under clock faults).
    pub unsafe_lease_wall_expiry: bool,
    /// Servers that raise the high-water for a lease's bound in memory only.
    pub unsafe_lease_bound_in_memory: bool,
    /// Servers that now and then refuse a sequence call after spending its block.
    pub unsafe_seq_burn_refused: bool,
    /// Servers whose leader keeps its lease, and keeps granting, after handing off.
    pub unsafe_handoff_keep_leader_lease: bool,
    /// File-backend servers that replace records without the directory fsync; power losses.
    pub unsafe_skip_dir_fsync: bool,
    /// Raft servers whose log store acknowledges appends before they are durable; power
    /// losses of every node at once.
    pub unsafe_ack_before_fsync: bool,
    /// Not a control: raft servers whose elections skip the pre-vote gate, to measure what a
    /// follower's heal costs without it.
    pub unsafe_ungate_elections: bool,
    /// Etcd-backend servers whose leader lease ignores its deadline; the leader cut off from
    /// etcd.
    pub unsafe_etcd_ignore_lease: bool,
    /// Etcd-backend servers whose writes skip the fencing compares; the leader paused past its
    /// etcd lease.
    pub unsafe_etcd_skip_fence: bool,
    /// Servers whose raise of the high-water stays in memory; raises then kills of the leader.
    pub unsafe_raise_in_memory: bool,
}

impl CheckOptions {
    /// Whether the nodes' data directories sit on the fault layer: a disk fault is drawn, or a
    /// power control runs.
    pub fn fault_disk(&self) -> bool {
        self.faults.iter().any(|k| k.needs_fault_disk()) || self.controls.power_control()
    }
}

impl Controls {
    /// Whether any control (or the ablation) is on.
    pub fn any(&self) -> bool {
        self.unsafe_positive_control
            || self.unsafe_no_leader_lease
            || self.unsafe_seq_forget
            || self.unsafe_lease_forget
            || self.unsafe_allow_leader_removal
            || self.unsafe_trust_wiped
            || self.unsafe_lease_wall_expiry
            || self.unsafe_lease_bound_in_memory
            || self.unsafe_seq_burn_refused
            || self.unsafe_handoff_keep_leader_lease
            || self.unsafe_skip_dir_fsync
            || self.unsafe_ack_before_fsync
            || self.unsafe_ungate_elections
            || self.unsafe_etcd_ignore_lease
            || self.unsafe_etcd_skip_fence
            || self.unsafe_raise_in_memory
    }

    /// Whether a control that opens with power losses is on.
    pub fn power_control(&self) -> bool {
        self.unsafe_skip_dir_fsync || self.unsafe_ack_before_fsync
    }

    /// The hidden `tso serve` flags of the controls that are on.
    pub fn server_flags(&self) -> Vec<&'static str> {
        let mut unsafe_flags = Vec::new();
        if self.unsafe_positive_control {
            unsafe_flags.push(super::cluster::FORGET_HIGH_WATER_FLAG);
        }
        if self.unsafe_no_leader_lease {
            unsafe_flags.push(super::cluster::NO_LEADER_LEASE_FLAG);
        }
        if self.unsafe_seq_forget {
            unsafe_flags.push(super::cluster::SEQ_FORGET_FLAG);
        }
        if self.unsafe_lease_forget {
            unsafe_flags.push(super::cluster::LEASE_FORGET_FLAG);
        }
        if self.unsafe_allow_leader_removal {
            unsafe_flags.push(super::cluster::ALLOW_LEADER_REMOVAL_FLAG);
        }
        if self.unsafe_trust_wiped {
            unsafe_flags.push(super::cluster::TRUST_WIPED_FLAG);
        }
        if self.unsafe_lease_wall_expiry {
            unsafe_flags.push(super::cluster::LEASE_WALL_EXPIRY_FLAG);
        }
        if self.unsafe_lease_bound_in_memory {
            unsafe_flags.push(super::cluster::LEASE_BOUND_IN_MEMORY_FLAG);
        }
        if self.unsafe_seq_burn_refused {
            unsafe_flags.push(super::cluster::SEQ_BURN_REFUSED_FLAG);
        }
        if self.unsafe_skip_dir_fsync {
            unsafe_flags.push(super::cluster::SKIP_DIR_FSYNC_FLAG);
        }
        if self.unsafe_ack_before_fsync {
            unsafe_flags.push(super::cluster::ACK_BEFORE_FSYNC_FLAG);
        }
        if self.unsafe_handoff_keep_leader_lease {
            unsafe_flags.push(super::cluster::HANDOFF_KEEP_LEADER_LEASE_FLAG);
        }
        if self.unsafe_ungate_elections {
            unsafe_flags.push(super::cluster::UNGATE_ELECTIONS_FLAG);
        }
        if self.unsafe_etcd_ignore_lease {
            unsafe_flags.push(super::cluster::ETCD_IGNORE_LEASE_FLAG);
        }
        if self.unsafe_etcd_skip_fence {
            unsafe_flags.push(super::cluster::ETCD_SKIP_FENCE_FLAG);
        }
        if self.unsafe_raise_in_memory {
            unsafe_flags.push(super::cluster::RAISE_IN_MEMORY_FLAG);
        }
        unsafe_flags
    }
}

/// The backend of the local cluster `tso check` starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CheckBackend {
    /// A raft cluster of `--nodes` nodes (the file backend with `--nodes 1`).
    #[default]
    Raft,
    /// `--nodes` oracle nodes on a 3-member etcd cluster the checker starts (`/usr/bin/etcd`,
    /// or `etcd` on the PATH).
    Etcd,
}

impl CheckBackend {
    pub fn name(self) -> &'static str {
        match self {
            CheckBackend::Raft => "raft",
            CheckBackend::Etcd => "etcd",
        }
    }
}

/// What `tso check` clients call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// `GetTs`: timestamps, checked for duplicates, regression, real-time order and shape.
    Ts,
    /// `GetSeq` and `GetSeqBatch` on a few fixed keys: blocks checked for overlaps (D1), gaps
    /// (D2), the order of their epochs, and shape.
    Seq,
    /// Stamping leases (acquire, renew, release), `GetSafeFrontier` reads and `GetTs`: the
    /// frontier checked against live leases and itself, bounds against earlier grants.
    Lease,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Ts => "ts",
            Workload::Seq => "seq",
            Workload::Lease => "lease",
        }
    }
}

/// How `tso bench` and `tso check` callers reach the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchMode {
    /// One `GetTs` RPC per call.
    Raw,
    /// Through `tso-client`, which coalesces concurrent callers into shared RPCs.
    Library,
}

impl BenchMode {
    pub fn name(self) -> &'static str {
        match self {
            BenchMode::Raw => "raw",
            BenchMode::Library => "library",
        }
    }
}

pub(super) fn validate(args: &CheckOptions) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=CLIENTS_MAX).contains(&args.clients),
        "--clients must be 1 to {CLIENTS_MAX}"
    );
    anyhow::ensure!(
        (1..=CALLS_MAX).contains(&args.calls_max),
        "--calls-max must be 1 to {CALLS_MAX}"
    );
    anyhow::ensure!(
        (1..=tso_core::LOGICAL_COUNT).contains(&args.count_max),
        "--count-max must be 1 to {}",
        tso_core::LOGICAL_COUNT
    );
    anyhow::ensure!(matches!(args.nodes, 1 | 3 | 5), "--nodes must be 1, 3 or 5");
    anyhow::ensure!(
        !args.endpoints.is_empty() || args.tls.is_none(),
        "the cluster the checker starts has no TLS: give --tls-* only with --endpoints"
    );
    anyhow::ensure!(
        args.endpoints.is_empty() || !args.controls.any(),
        "the positive controls need a local cluster: drop --endpoints"
    );
    anyhow::ensure!(
        args.nodes > 1 || !args.controls.unsafe_ungate_elections,
        "--unsafe-ungate-elections changes raft elections: give --nodes 3"
    );
    if args.faults.contains(&FaultKind::Restore) {
        anyhow::ensure!(
            args.backend != CheckBackend::Etcd,
            "restore faults seed fresh data directories, and an etcd node keeps none: use them \
             with --backend raft (the default)"
        );
        anyhow::ensure!(
            !args
                .faults
                .iter()
                .any(|k| matches!(k, FaultKind::Member | FaultKind::Wipe)),
            "restore faults seed the cluster's first members again: drop the member and wipe \
             faults"
        );
        anyhow::ensure!(
            !args.fault_disk(),
            "restore faults move data directories aside, and the fault layer is mounted on them: \
             drop the disk faults and the power controls"
        );
        // A restored node's epochs start again (docs/operations.md, "Disaster recovery"); the
        // sequence history's epoch order would report that known gap, not D1.
        anyhow::ensure!(
            args.workload != Workload::Seq,
            "restore faults start the epochs again (a restored cluster's first leader has a \
             lower epoch than the dead one's last: a known gap, docs/operations.md), which the \
             sequence history's epoch order reports: use --workload ts or lease"
        );
    }
    anyhow::ensure!(
        args.workload == Workload::Ts || !args.controls.unsafe_raise_in_memory,
        "the --unsafe-raise-in-memory control breaks timestamps: use it with --workload ts"
    );
    anyhow::ensure!(
        args.workload == Workload::Seq || !args.controls.unsafe_seq_forget,
        "the --unsafe-seq-forget control breaks sequences: add --workload seq"
    );
    validate_seq(args)?;
    anyhow::ensure!(
        args.workload == Workload::Lease || !args.controls.unsafe_lease_forget,
        "the --unsafe-lease-forget control breaks stamping leases: add --workload lease"
    );
    validate_lease(args)?;
    anyhow::ensure!(
        args.workload == Workload::Ts
            || !(args.controls.unsafe_positive_control || args.controls.unsafe_no_leader_lease),
        "the --unsafe-positive-control and --unsafe-no-leader-lease controls break timestamps: use them with --workload ts"
    );
    anyhow::ensure!(
        args.slow_fsync.is_none_or(|d| d <= Duration::from_secs(10)),
        "--slow-fsync must be at most 10s"
    );
    anyhow::ensure!(
        !args.fault_interval.is_zero(),
        "--fault-interval must be above 0"
    );
    validate_etcd(args)?;
    validate_fault_disk(args)?;
    if let Some(kind) = args.faults.iter().find(|k| k.needs_cluster())
        && args.nodes == 1
    {
        anyhow::bail!(
            "{} faults need a raft cluster (one node runs the file backend): add --nodes 3 or 5",
            kind.name()
        );
    }
    anyhow::ensure!(
        args.nodes > 1 || !args.controls.unsafe_no_leader_lease,
        "the no-leader-lease control needs a raft cluster: add --nodes 3 or 5"
    );
    validate_leader_removal(args)?;
    validate_handoff_keep_lease(args)?;
    anyhow::ensure!(
        !args.controls.unsafe_trust_wiped || args.nodes == 3,
        "the trust-wiped control cuts off one of two followers and wipes the other: add --nodes 3"
    );
    anyhow::ensure!(
        args.workload == Workload::Ts || !args.controls.unsafe_trust_wiped,
        "the --unsafe-trust-wiped control breaks timestamps: use it with --workload ts"
    );
    Ok(())
}

/// What `--backend etcd` refuses: attached runs, the faults of raft clusters and of local
/// disks (etcd nodes keep nothing on one), and the positive controls but its own; and what
/// only it takes: the faults of etcd members and of the links to them, and the ignore-lease
/// control.
fn validate_etcd(args: &CheckOptions) -> anyhow::Result<()> {
    if args.backend != CheckBackend::Etcd {
        anyhow::ensure!(
            !args.controls.unsafe_etcd_ignore_lease && !args.controls.unsafe_etcd_skip_fence,
            "the --unsafe-etcd-* controls break etcd-backend servers: add --backend etcd"
        );
        if let Some(kind) = args.faults.iter().find(|k| k.needs_etcd()) {
            anyhow::bail!(
                "{} faults hit the etcd cluster under the oracle: add --backend etcd",
                kind.name()
            );
        }
        return Ok(());
    }
    anyhow::ensure!(
        args.endpoints.is_empty(),
        "--backend etcd starts its own etcd cluster and oracle nodes: drop --endpoints"
    );
    if let Some(kind) = args.faults.iter().find(|k| k.needs_cluster()) {
        anyhow::bail!(
            "{} faults need a raft cluster: use them with --backend raft (the default)",
            kind.name()
        );
    }
    if let Some(kind) = args.faults.iter().find(|k| k.needs_fault_disk()) {
        anyhow::bail!(
            "{} faults hit a node's local disk, and an etcd node keeps nothing on one: use them \
             with --backend raft (the default)",
            kind.name()
        );
    }
    let controls = Controls {
        unsafe_etcd_ignore_lease: false,
        unsafe_etcd_skip_fence: false,
        unsafe_raise_in_memory: false,
        ..args.controls
    };
    anyhow::ensure!(
        !controls.any(),
        "the --unsafe-* controls break raft or file-backend servers (on etcd only \
         --unsafe-etcd-ignore-lease, --unsafe-etcd-skip-fence and --unsafe-raise-in-memory run): \
         use them with --backend raft (the default)"
    );
    anyhow::ensure!(
        !(args.controls.unsafe_etcd_ignore_lease && args.controls.unsafe_etcd_skip_fence),
        "--unsafe-etcd-ignore-lease and --unsafe-etcd-skip-fence each open with their own \
         faults: run them one at a time"
    );
    if args.controls.unsafe_etcd_skip_fence {
        // Only a sequence call queued before the pause, written after it, shows the blind
        // write: its values are answered again by the successor.
        anyhow::ensure!(
            args.workload == Workload::Seq,
            "the --unsafe-etcd-skip-fence control breaks sequences: use it with --workload seq"
        );
        anyhow::ensure!(
            args.nodes > 1,
            "the --unsafe-etcd-skip-fence control needs a successor: give --nodes 3"
        );
        let pause = Duration::from_millis(schedule::ETCD_SKIP_FENCE_PAUSE_MS);
        anyhow::ensure!(
            args.call_timeout > pause + Duration::from_secs(1),
            "the --unsafe-etcd-skip-fence control pauses the leader for {pause:?}, and the calls \
             it had queued must still be awaited when it resumes: give --call-timeout 6s"
        );
    }
    if args.controls.unsafe_etcd_ignore_lease {
        anyhow::ensure!(
            args.workload == Workload::Ts,
            "the --unsafe-etcd-ignore-lease control breaks timestamps: use it with --workload ts"
        );
        // A cut-off leader granting beside the new one shows only in a history that has both:
        // one client pinned to each node, and one more to follow the leader.
        anyhow::ensure!(
            args.nodes > 1 && args.clients > args.nodes,
            "the --unsafe-etcd-ignore-lease control pins one client to each of several nodes: \
             give --nodes 3 and --clients {} or more",
            args.nodes.max(3) + 1
        );
    }
    Ok(())
}

/// What the sequence controls refuse beyond `--unsafe-seq-forget`'s own check: the burnt
/// refusals show only in a sequence history, from servers the checker starts.
fn validate_seq(args: &CheckOptions) -> anyhow::Result<()> {
    if !args.controls.unsafe_seq_burn_refused {
        return Ok(());
    }
    anyhow::ensure!(
        args.workload == Workload::Seq,
        "the --unsafe-seq-burn-refused control breaks sequences: add --workload seq"
    );
    anyhow::ensure!(
        args.endpoints.is_empty(),
        "the positive controls need a local cluster: drop --endpoints"
    );
    Ok(())
}

/// What the disk faults and the power controls refuse: they need the nodes the checker starts,
/// and they do not mix with faults that wipe or replace a node's data directory (its mount).
fn validate_fault_disk(args: &CheckOptions) -> anyhow::Result<()> {
    if !args.fault_disk() {
        return Ok(());
    }
    anyhow::ensure!(
        args.endpoints.is_empty(),
        "disk faults and the power controls need the nodes the checker starts: drop --endpoints"
    );
    if let Some(kind) = args
        .faults
        .iter()
        .find(|k| matches!(k, FaultKind::Member | FaultKind::Wipe))
    {
        anyhow::bail!(
            "{} faults replace data directories, which disk faults keep on a mount: run them in \
             another check",
            kind.name()
        );
    }
    let controls = &args.controls;
    anyhow::ensure!(
        !controls.unsafe_skip_dir_fsync || args.nodes == 1,
        "the --unsafe-skip-dir-fsync control breaks the file backend: give --nodes 1"
    );
    anyhow::ensure!(
        !controls.unsafe_ack_before_fsync || args.nodes > 1,
        "the --unsafe-ack-before-fsync control breaks the raft log: add --nodes 3 or 5"
    );
    anyhow::ensure!(
        !controls.power_control() || args.faults.contains(&FaultKind::Power),
        "the power controls are caught by power losses: add --faults power"
    );
    Ok(())
}

/// What the leader-removal control refuses.
fn validate_leader_removal(args: &CheckOptions) -> anyhow::Result<()> {
    if !args.controls.unsafe_allow_leader_removal {
        return Ok(());
    }
    anyhow::ensure!(
        args.nodes > 1,
        "the leader-removal control needs a raft cluster: add --nodes 3 or 5"
    );
    anyhow::ensure!(
        args.workload == Workload::Ts,
        "the --unsafe-allow-leader-removal control breaks timestamps: use it with --workload ts"
    );
    // Two leaders granting side by side show only in a history that has both: one client
    // pinned to each node, and one more to follow the leader.
    anyhow::ensure!(
        args.clients > args.nodes,
        "the --unsafe-allow-leader-removal control pins one client to each node: give --clients \
         {} or more",
        args.nodes + 1
    );
    Ok(())
}

/// What the handoff control refuses: its two granting nodes show only with handoffs, on a raft
/// cluster the checker starts, in a history of timestamps with a client pinned to each node.
fn validate_handoff_keep_lease(args: &CheckOptions) -> anyhow::Result<()> {
    if !args.controls.unsafe_handoff_keep_leader_lease {
        return Ok(());
    }
    anyhow::ensure!(
        args.endpoints.is_empty(),
        "the positive controls need a local cluster: drop --endpoints"
    );
    anyhow::ensure!(
        args.nodes > 1,
        "the handoff control needs a raft cluster: add --nodes 3 or 5"
    );
    anyhow::ensure!(
        args.faults.contains(&schedule::FaultKind::Handoff),
        "the --unsafe-handoff-keep-leader-lease control breaks handoffs: add handoff to --faults"
    );
    anyhow::ensure!(
        args.workload == Workload::Ts,
        "the --unsafe-handoff-keep-leader-lease control breaks timestamps: use it with --workload ts"
    );
    anyhow::ensure!(
        args.clients > args.nodes,
        "the --unsafe-handoff-keep-leader-lease control pins one client to each node: give --clients \
         {} or more",
        args.nodes + 1
    );
    Ok(())
}

/// What the stamping-lease controls need. `--workload lease` itself takes every fault (lease
/// liveness is on monotonic time, which clock faults leave alone) and both modes.
fn validate_lease(args: &CheckOptions) -> anyhow::Result<()> {
    use schedule::FaultKind;
    let controls = [
        // A server that judges expiry by its wall clock is wrong only when that clock steps:
        // forward, it drops a live lease (rule 1); back, an expired one binds again (rule 2).
        (
            args.controls.unsafe_lease_wall_expiry,
            "--unsafe-lease-wall-expiry",
            FaultKind::Clock,
        ),
        // A bound kept in memory only is lost when its leader dies: the next leader grants
        // below it (rule 5).
        (
            args.controls.unsafe_lease_bound_in_memory,
            "--unsafe-lease-bound-in-memory",
            FaultKind::Kill,
        ),
    ];
    for (_, flag, fault) in controls.into_iter().filter(|(on, _, _)| *on) {
        anyhow::ensure!(
            args.workload == Workload::Lease,
            "the {flag} control breaks stamping leases: add --workload lease"
        );
        anyhow::ensure!(
            args.faults.contains(&fault),
            "the {flag} control is caught through {} faults: add {} to --faults",
            fault.name(),
            fault.name()
        );
        anyhow::ensure!(
            args.endpoints.is_empty(),
            "the positive controls need a local cluster: drop --endpoints"
        );
    }
    Ok(())
}
