//! The nemesis schedule: a list of faults at offsets from the start of a run, drawn from a seed
//! alone, so `--seed` replays the same faults at the same times.
//!
//! Faults run one after another: each heals (restart, SIGCONT) before the next quiet gap starts.
//! A clock offset stays until the next clock fault, so later kills and pauses happen under a
//! shifted clock: that is how combinations arise. The positive controls open with fixed steps
//! that their broken servers fail (clocks back then a kill; long cuts of the leader; kills of
//! the leader for the sequence and lease controls; removals of the leader of two voters; stale
//! votes of a wiped follower), then draw as usual.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Faults in one schedule at most: a bound on the run's bookkeeping, far above what a run of
/// minutes draws with a gap of a second or more.
pub const FAULTS_MAX: usize = 10_000;
/// The largest clock shift drawn, either way.
pub const CLOCK_SHIFT_MAX_MS: i64 = 20_000;
/// A partition lasts from about one election timeout to several.
pub const PARTITION_MIN_MS: u64 = 200;
pub const PARTITION_MAX_MS: u64 = 5_000;
/// The positive control sets clocks back this far before its kills: far more than a restart
/// takes, so a server that forgets its high-water reissues values it already gave out.
pub const POSITIVE_CONTROL_SHIFT_MS: i64 = -60_000;
/// The no-leader-lease control cuts the leader off for this long: past the election (followers
/// campaign 550 to 700 ms after the last heartbeat, then the new leader fences) and past the
/// old leader's window (1.5 to 3 s ahead of its clock at the cut with `--window-ahead 3s`), so
/// the two leaders grant side by side until the old one's window runs dry.
pub const NO_LEASE_CUT_MS: u64 = 4_000;
/// Cuts of the leader the no-leader-lease control opens with: each one alone gives the checker a
/// second or more of two leaders granting; three make a miss on a slow machine unlikely.
pub const NO_LEASE_CUTS: usize = 3;

/// Kills of the leader the sequence control opens with: each starts a new term (a new leader,
/// or the restarted node on one node) whose counters restart from 0, below blocks clients
/// already hold; two make the catch independent of one kill landing before any block.
pub const SEQ_FORGET_KILLS: usize = 2;
/// Kills of the leader the lease control opens with: each new leader forgets every lease, and
/// its frontier passes the bound of a lease a holder still holds when that lease's last renewal
/// is older than about its TTL less the window (2 s for a 5 s TTL). Holders wait up to 3 s
/// between renewals, so each kill finds such a lease with a fair chance; four make a miss
/// unlikely.
pub const LEASE_FORGET_KILLS: usize = 4;
/// Removals of the leader of a two-voter cluster the leader-removal control opens with. About
/// every other one gives two leaders granting side by side for 5 to 35 ms (see
/// [`LEADER_REMOVAL_SLOW_MS`]), which the clients pinned to each node catch; six make a miss
/// unlikely (8 of 8 runs caught, 2 to 4 removals with an overlap each, on the busy 2-core
/// machine with the debug build).
pub const LEADER_REMOVALS: usize = 6;
/// How long the links between the last two voters hold their replies while a shrink removes
/// one of them. The survivor takes the configuration that leaves it the only voter at once and
/// elects itself at its next tick (openraft ticks every 75 ms with the default 50 ms heartbeat),
/// with no vote to wait for; the old leader learns that the change committed, and later that
/// the survivor's term passed its own, this much later, and steps down at its first tick after
/// that. A server that lets the leader of two be removed thus grants from both. Kept well
/// below openraft's AppendEntries timeout (one heartbeat interval, 50 ms) so the change still
/// commits.
pub const LEADER_REMOVAL_SLOW_MS: u64 = 25;
/// How long the leader-removal control leaves the removed leader running before it stops it
/// and the cluster grows back: past the old leader's step-down.
pub const LEADER_REMOVAL_HOLD_MS: u64 = 300;
/// The slowest link between the last two voters a drawn shrink removes one of them over.
pub const SHRINK_SLOW_MAX_MS: u64 = LEADER_REMOVAL_SLOW_MS;
/// A stopped node (kill, handoff, replacement) stays down up to this long.
pub const DOWN_MAX_MS: u64 = 1_000;
/// A shrunk cluster stays small from this long to this long before it grows back.
pub const SHRINK_MIN_MS: u64 = 200;
pub const SHRINK_MAX_MS: u64 = 3_000;

/// A wholly wiped follower restarted under its old id runs this long at least, and at most,
/// before it is removed and replaced.
pub const WIPE_MIN_MS: u64 = 1_000;
pub const WIPE_MAX_MS: u64 = 4_000;
/// Openings of the trust-wiped control. Each cuts a follower B off, lets the leader commit
/// window extensions with the other follower A alone, kills the leader, restarts A wiped under
/// its old id and heals B: a server that counts A's empty vote elects B on a stale log.
pub const TRUST_WIPED_OPENINGS: usize = 3;
/// How long the trust-wiped control cuts B off: past the leader's whole window (3 s ahead with
/// the default `--window-ahead`, extended when half is used), so the leader grants above the
/// last window end B's log holds.
pub const TRUST_WIPED_CUT_MS: u64 = 4_000;
/// B's clock in the trust-wiped control, set at the cut and reset at the heal: behind the
/// timestamps the leader gave out, so that B, elected on a stale log, fences from that log's
/// window end instead of from a clock already past every grant.
pub const TRUST_WIPED_CLOCK_MS: i64 = -60_000;
/// How long the trust-wiped control leaves B and the wiped A alone (the leader down) before it
/// restarts the leader and repairs A: past an election or two (550 to 700 ms each).
pub const TRUST_WIPED_HOLD_MS: u64 = 3_000;

/// A power loss takes the node (or every node) down this long at most before the restart.
pub const POWER_DOWN_MAX_MS: u64 = 1_000;
/// A disk fault (errors, full, slow) lasts from this long to this long before it heals.
pub const DISK_FAULT_MIN_MS: u64 = 500;
pub const DISK_FAULT_MAX_MS: u64 = 4_000;
/// How long each fsync takes on a slow disk, at most (the docs' figures use 200 ms).
pub const SLOW_FSYNC_MAX_MS: u64 = 300;
/// Power losses the power controls open with (of the one node, or of every node of a
/// cluster at once): a server that acknowledged a write its disk had not made durable loses
/// it at each, and answers below what it answered before.
pub const POWER_CONTROL_LOSSES: usize = 3;
/// Between the power control's losses: long enough for the servers to extend their windows
/// (at half of `--window-ahead`, 1.5 s by default) and answer above the last durable end.
pub const POWER_CONTROL_GAP_MS: u64 = 3_000;

/// Members of the etcd cluster a check on the etcd backend starts (`--backend etcd`).
pub const ETCD_MEMBERS: usize = 3;
/// A killed etcd member (`etcd-kill`) stays down up to this long before its restart.
pub const ETCD_DOWN_MAX_MS: u64 = 1_000;
/// An etcd cluster that lost its quorum (`etcd-quorum`: two of three members killed) stays so
/// from this long to this long: long enough, past 2 s, that the oracle's leader lease (TTL 2 s)
/// runs out with no keep-alive answered, and the oracle must stop granting.
pub const ETCD_QUORUM_MIN_MS: u64 = 1_000;
pub const ETCD_QUORUM_MAX_MS: u64 = 4_000;
/// An oracle node cut off from every etcd member (`etcd-cut`) stays so from this long to this
/// long: from less than the leader lease (TTL 2 s, a cut-off leader may keep leading) to past
/// it and the other nodes' campaign (a cut-off leader must have stopped granting).
pub const ETCD_CUT_MIN_MS: u64 = 1_000;
pub const ETCD_CUT_MAX_MS: u64 = 5_000;
/// The ignore-lease control cuts the leader off from etcd for this long: past its etcd lease
/// (TTL 2 s from its last keep-alive), another node's campaign (polls every 100 ms) and fence,
/// so a leader that ignores its lease deadline grants while the new one does, until its window
/// runs dry (1.5 to 3 s ahead of its clock at the cut with `--window-ahead 3s`).
pub const ETCD_IGNORE_LEASE_CUT_MS: u64 = 5_000;
/// Cuts of the leader the ignore-lease control opens with.
pub const ETCD_IGNORE_LEASE_CUTS: usize = 3;
/// The skip-fence control pauses the leader for this long: past its etcd lease (TTL 2 s),
/// another node's campaign, fence and first sequence writes, so the sequence calls the paused
/// leader had queued are written, blindly, over its successor's state when it resumes; and
/// below the server's own 5 s wait for a sequence write, so those calls are still answered.
pub const ETCD_SKIP_FENCE_PAUSE_MS: u64 = 4_500;
/// Pauses of the leader the skip-fence control opens with.
pub const ETCD_SKIP_FENCE_PAUSES: usize = 5;
/// The furthest ahead of the clock a drawn raise goes: past the window (`--window-ahead`, 3 s
/// by default) and a failover's advance (1 s), so a later leader must fence above a raise, not
/// merely above its own clock.
pub const RAISE_AHEAD_MAX_MS: u64 = 5_000;
/// The raise control raises this far ahead of the clock, then kills the leader.
pub const RAISE_CONTROL_AHEAD_MS: u64 = 6_000;
/// Raise-then-kill steps the raise control opens with.
pub const RAISE_CONTROL_ROUNDS: usize = 3;

/// The kinds of fault a run may draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum FaultKind {
    /// `kill -9`, then a restart on the same data and address.
    Kill,
    /// `SIGSTOP`, then `SIGCONT`.
    Pause,
    /// Shift the server's clock forward or backward (test-only offset file).
    Clock,
    /// Cut every peer link to and from one node (clusters only).
    Partition,
    /// SIGTERM the leader (it hands its leadership to an up-to-date voter), wait for it to
    /// exit, restart it (clusters only).
    Handoff,
    /// Change the members through the admin service: replace a node by a new one, or shrink
    /// to one voter and grow back (clusters only).
    Member,
    /// Lose a follower's data: its raft log alone (the restart must be refused), or all of it
    /// (restarted under its old id, it must be kept out); then replace it (clusters only).
    Wipe,
    /// Power loss: `kill -9`, every write no fsync made durable is forgotten (sometimes a
    /// write in flight lands partly), restart. In a cluster one node, or now and then every
    /// node at once (a rack losing power).
    Power,
    /// Every fsync answers EIO (once, or until healed); the node is restarted at the heal.
    DiskError,
    /// Writes and fsyncs answer ENOSPC until healed.
    DiskFull,
    /// Every fsync takes up to [`SLOW_FSYNC_MAX_MS`] until healed.
    SlowDisk,
    /// `kill -9` one member of the etcd cluster (maybe etcd's leader), restart it on the same
    /// data after up to [`ETCD_DOWN_MAX_MS`] (`--backend etcd` only).
    EtcdKill,
    /// `kill -9` two of the three etcd members (quorum lost), restart both after
    /// [`ETCD_QUORUM_MIN_MS`] to [`ETCD_QUORUM_MAX_MS`] (`--backend etcd` only).
    EtcdQuorum,
    /// Cut every link of one oracle node to the etcd members (its clients still reach it) for
    /// [`ETCD_CUT_MIN_MS`] to [`ETCD_CUT_MAX_MS`], then heal (`--backend etcd` only).
    EtcdCut,
    /// Compact the etcd keyspace at its current revision (physically: old revisions are
    /// dropped, as etcd's auto-compaction does), through one member (`--backend etcd` only).
    EtcdCompact,
    /// Defragment one etcd member (maybe etcd's leader): it rewrites its database and answers
    /// nothing meanwhile (`--backend etcd` only).
    EtcdDefrag,
    /// `tso admin raise`: raise the leader's high-water to 0 to [`RAISE_AHEAD_MAX_MS`] ahead
    /// of the checker's clock (`RaiseHighWater` on the client port); every backend.
    Raise,
    /// Disaster recovery as an operator runs it: `kill -9` every node, `tso export` each
    /// one's data directory, seed fresh directories from all the exports (`tso init --from`),
    /// start every node on them after up to [`DOWN_MAX_MS`] (file and raft backends, without
    /// membership changes or disk faults).
    Restore,
}

impl FaultKind {
    /// The name `--faults` takes, and the key of the result file's counts.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
            FaultKind::Clock => "clock",
            FaultKind::Partition => "partition",
            FaultKind::Handoff => "handoff",
            FaultKind::Member => "member",
            FaultKind::Wipe => "wipe",
            FaultKind::Power => "power",
            FaultKind::DiskError => "disk-error",
            FaultKind::DiskFull => "disk-full",
            FaultKind::SlowDisk => "slow-disk",
            FaultKind::EtcdKill => "etcd-kill",
            FaultKind::EtcdQuorum => "etcd-quorum",
            FaultKind::EtcdCut => "etcd-cut",
            FaultKind::EtcdCompact => "etcd-compact",
            FaultKind::EtcdDefrag => "etcd-defrag",
            FaultKind::Raise => "raise",
            FaultKind::Restore => "restore",
        }
    }

    /// Whether the kind hits the etcd cluster under the oracle rather than an oracle node
    /// (`--backend etcd` only).
    pub fn on_etcd(self) -> bool {
        matches!(
            self,
            FaultKind::EtcdKill
                | FaultKind::EtcdQuorum
                | FaultKind::EtcdCompact
                | FaultKind::EtcdDefrag
        )
    }

    /// Whether the kind needs the etcd backend (`--backend etcd`): the faults of etcd members,
    /// and the cut of an oracle node's links to them.
    pub fn needs_etcd(self) -> bool {
        self.on_etcd() || self == FaultKind::EtcdCut
    }

    /// Whether the kind needs the nodes' data directories on the fault layer.
    pub fn needs_fault_disk(self) -> bool {
        matches!(
            self,
            FaultKind::Power | FaultKind::DiskError | FaultKind::DiskFull | FaultKind::SlowDisk
        )
    }

    /// Whether the kind needs a raft cluster (more than one node).
    pub fn needs_cluster(self) -> bool {
        matches!(
            self,
            FaultKind::Partition | FaultKind::Handoff | FaultKind::Member | FaultKind::Wipe
        )
    }
}

/// How a replacement stops the node it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `kill -9`: the node dies with its disk.
    Kill,
    /// SIGTERM, bounded: a leader hands its leadership on first.
    Term,
}

/// What a follower whose data is lost loses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loss {
    /// Its `raft-log` file alone: the restart must be refused ("is incomplete").
    Log,
    /// Its whole data directory: restarted under its old id, it runs but must be kept out.
    Whole,
}

/// Which node a fault hits: a fixed one, whoever leads when the fault starts, or a voter that
/// does not lead (the first such from slot `i` on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Leader,
    Node(usize),
    Follower(usize),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Leader => write!(f, "the leader"),
            Target::Node(i) => write!(f, "node {i}"),
            Target::Follower(i) => write!(f, "a follower (from node {i} on)"),
        }
    }
}

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Kill {
        node: Target,
        down_ms: u64,
    },
    Pause {
        node: Target,
        for_ms: u64,
    },
    Clock {
        node: Target,
        offset_ms: i64,
    },
    Partition {
        node: Target,
        for_ms: u64,
    },
    /// SIGTERM the leader, wait for it to exit, restart it after `down_ms`.
    Handoff {
        down_ms: u64,
    },
    /// Stop `node`, and after `down_ms` replace it: wipe its data, start it under a new id with
    /// `--join`, add it as a learner, promote it, remove the old id.
    Replace {
        node: Target,
        stop: Stop,
        down_ms: u64,
    },
    /// Remove followers until two voters are left, then one of the two (the leader when
    /// `remove_leader`, as an operator would: `remove`, refused, `transfer-leader`, `remove`)
    /// while the links between the two hold every reply for `slow_ms`; after `for_ms`, add new
    /// nodes back until the cluster has its size again.
    Shrink {
        remove_leader: bool,
        slow_ms: u64,
        for_ms: u64,
    },
    /// Stop a follower (`kill -9`) and lose its data (`loss`); a lost log must be refused at
    /// the restart, a wholly wiped node restarted under its old id must be kept out for
    /// `for_ms`; then it is replaced under a new id.
    Wipe {
        node: Target,
        loss: Loss,
        for_ms: u64,
    },
    /// The trust-wiped control's opening (see [`TRUST_WIPED_OPENINGS`]): cut a follower B off
    /// for `cut_ms` with its clock set back, kill the leader, restart the other follower A
    /// wholly wiped under its old id, heal B; after `hold_ms` restart the leader, reset B's
    /// clock, replace A.
    StaleVote {
        cut_ms: u64,
        hold_ms: u64,
    },
    /// `kill -9` `node` (every node when `every`), drop what no fsync made durable (with a
    /// write in flight landing partly when `torn`), restart after `down_ms`.
    Power {
        node: Target,
        every: bool,
        torn: bool,
        down_ms: u64,
    },
    /// Fsyncs of `node` answer EIO (the next one only when `once`) for `for_ms`; then the disk
    /// heals and the node is restarted (an operator replacing the disk).
    DiskError {
        node: Target,
        once: bool,
        for_ms: u64,
    },
    /// Writes and fsyncs of `node` answer ENOSPC for `for_ms`; the node is restarted at the
    /// heal only if it exited.
    DiskFull {
        node: Target,
        for_ms: u64,
    },
    /// Every fsync of `node` takes `fsync_ms` for `for_ms`.
    SlowDisk {
        node: Target,
        fsync_ms: u64,
        for_ms: u64,
    },
    /// `kill -9` etcd member `member` (an index below [`ETCD_MEMBERS`], not an oracle node),
    /// restart it on its data after `down_ms`.
    EtcdKill {
        member: usize,
        down_ms: u64,
    },
    /// `kill -9` etcd members `first` and the next one after it (mod [`ETCD_MEMBERS`]): the
    /// etcd cluster loses its quorum; restart both after `down_ms`.
    EtcdQuorum {
        first: usize,
        down_ms: u64,
    },
    /// Cut every link of oracle node `node` to the etcd members for `for_ms`, then heal.
    EtcdCut {
        node: Target,
        for_ms: u64,
    },
    /// Compact etcd's keyspace at its current revision, through etcd member `member`.
    EtcdCompact {
        member: usize,
    },
    /// Defragment etcd member `member`.
    EtcdDefrag {
        member: usize,
    },
    /// Raise the leader's high-water to `ahead_ms` ahead of the checker's clock.
    Raise {
        ahead_ms: u64,
    },
    /// Kill every node, export, seed fresh directories from the exports, restart after
    /// `down_ms`.
    Restore {
        down_ms: u64,
    },
}

impl Fault {
    /// How long the fault lasts before it heals.
    pub fn length_ms(&self) -> u64 {
        match *self {
            Fault::Kill { down_ms, .. } => down_ms,
            Fault::Pause { for_ms, .. } => for_ms,
            Fault::Clock { .. } => 0,
            Fault::Partition { for_ms, .. } => for_ms,
            Fault::Handoff { down_ms } => down_ms,
            Fault::Replace { down_ms, .. } => down_ms,
            Fault::Shrink { for_ms, .. } => for_ms,
            Fault::Wipe { for_ms, .. } => for_ms,
            Fault::StaleVote { hold_ms, .. } => hold_ms,
            Fault::Power { down_ms, .. } => down_ms,
            Fault::DiskError { for_ms, .. }
            | Fault::DiskFull { for_ms, .. }
            | Fault::SlowDisk { for_ms, .. } => for_ms,
            Fault::EtcdKill { down_ms, .. } | Fault::EtcdQuorum { down_ms, .. } => down_ms,
            Fault::EtcdCut { for_ms, .. } => for_ms,
            Fault::EtcdCompact { .. } | Fault::EtcdDefrag { .. } | Fault::Raise { .. } => 0,
            Fault::Restore { down_ms } => down_ms,
        }
    }

    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::Kill { .. } => FaultKind::Kill,
            Fault::Pause { .. } => FaultKind::Pause,
            Fault::Clock { .. } => FaultKind::Clock,
            Fault::Partition { .. } => FaultKind::Partition,
            Fault::Handoff { .. } => FaultKind::Handoff,
            Fault::Replace { .. } | Fault::Shrink { .. } => FaultKind::Member,
            Fault::Wipe { .. } | Fault::StaleVote { .. } => FaultKind::Wipe,
            Fault::Power { .. } => FaultKind::Power,
            Fault::DiskError { .. } => FaultKind::DiskError,
            Fault::DiskFull { .. } => FaultKind::DiskFull,
            Fault::SlowDisk { .. } => FaultKind::SlowDisk,
            Fault::EtcdKill { .. } => FaultKind::EtcdKill,
            Fault::EtcdQuorum { .. } => FaultKind::EtcdQuorum,
            Fault::EtcdCut { .. } => FaultKind::EtcdCut,
            Fault::EtcdCompact { .. } => FaultKind::EtcdCompact,
            Fault::EtcdDefrag { .. } => FaultKind::EtcdDefrag,
            Fault::Raise { .. } => FaultKind::Raise,
            Fault::Restore { .. } => FaultKind::Restore,
        }
    }

    /// The node the fault hits. For the etcd faults, `Target::Node(i)` names etcd member `i`
    /// (the first of the two an `etcd-quorum` kills), not an oracle node.
    pub fn target(&self) -> Target {
        match *self {
            Fault::Kill { node, .. }
            | Fault::Pause { node, .. }
            | Fault::Clock { node, .. }
            | Fault::Partition { node, .. }
            | Fault::Replace { node, .. }
            | Fault::Wipe { node, .. }
            | Fault::Power { node, .. }
            | Fault::DiskError { node, .. }
            | Fault::DiskFull { node, .. }
            | Fault::SlowDisk { node, .. }
            | Fault::EtcdCut { node, .. } => node,
            Fault::Handoff { .. }
            | Fault::Shrink { .. }
            | Fault::StaleVote { .. }
            | Fault::Raise { .. }
            | Fault::Restore { .. } => Target::Leader,
            Fault::EtcdKill { member, .. }
            | Fault::EtcdCompact { member }
            | Fault::EtcdDefrag { member } => Target::Node(member),
            Fault::EtcdQuorum { first, .. } => Target::Node(first),
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            Fault::Kill { node, down_ms } => format!("kill -9 {node}, restart after {down_ms} ms"),
            Fault::Pause { node, for_ms } => format!("SIGSTOP {node} for {for_ms} ms"),
            Fault::Clock { node, offset_ms } => {
                format!("set the clock offset of {node} to {offset_ms:+} ms")
            }
            Fault::Partition { node, for_ms } => {
                format!("cut every peer link of {node} for {for_ms} ms")
            }
            Fault::Handoff { down_ms } => {
                format!("SIGTERM the leader (handoff), restart after {down_ms} ms")
            }
            Fault::Replace {
                node,
                stop,
                down_ms,
            } => format!(
                "replace {node}: {} it, after {down_ms} ms a new node joins on a wiped disk, \
                 the old one is removed",
                match stop {
                    Stop::Kill => "kill -9",
                    Stop::Term => "SIGTERM",
                }
            ),
            Fault::Shrink {
                remove_leader,
                slow_ms,
                for_ms,
            } => format!(
                "shrink to two voters, remove the {} of the two over a link slowed by {slow_ms} \
                 ms, grow back after {for_ms} ms",
                if remove_leader { "leader" } else { "follower" }
            ),
            Fault::Wipe {
                node,
                loss: Loss::Log,
                for_ms,
            } => format!(
                "kill -9 {node}, delete its raft-log, restart it (must be refused), replace it \
                 after {for_ms} ms"
            ),
            Fault::Wipe {
                node,
                loss: Loss::Whole,
                for_ms,
            } => format!(
                "kill -9 {node}, wipe its data, restart it under its old id (must be kept out), \
                 replace it after {for_ms} ms"
            ),
            Fault::StaleVote { cut_ms, hold_ms } => format!(
                "cut follower B off for {cut_ms} ms (its clock {TRUST_WIPED_CLOCK_MS:+} ms), kill \
                 -9 the leader, restart follower A wiped under its old id, heal B; after \
                 {hold_ms} ms restart the leader and replace A"
            ),
            Fault::Power {
                node,
                every,
                torn,
                down_ms,
            } => format!(
                "power loss of {}: kill -9, drop every write no fsync made durable{}, restart \
                 after {down_ms} ms",
                if every {
                    "every node".to_string()
                } else {
                    node.to_string()
                },
                if torn {
                    " (a write in flight lands partly)"
                } else {
                    ""
                }
            ),
            Fault::DiskError { node, once, for_ms } => format!(
                "the disk of {node} answers EIO to {} for {for_ms} ms, then it is restarted",
                if once {
                    "the next fsync"
                } else {
                    "every fsync"
                }
            ),
            Fault::DiskFull { node, for_ms } => {
                format!("the disk of {node} is full (ENOSPC) for {for_ms} ms")
            }
            Fault::SlowDisk {
                node,
                fsync_ms,
                for_ms,
            } => format!("every fsync of {node} takes {fsync_ms} ms for {for_ms} ms"),
            Fault::EtcdKill { member, down_ms } => {
                format!("kill -9 etcd member m{member}, restart it after {down_ms} ms")
            }
            Fault::EtcdQuorum { first, down_ms } => {
                let (a, b) = etcd_quorum_members(first);
                format!(
                    "kill -9 etcd members m{a} and m{b} (quorum lost), restart both after \
                     {down_ms} ms"
                )
            }
            Fault::EtcdCut { node, for_ms } => {
                format!("cut every etcd link of {node} for {for_ms} ms")
            }
            Fault::EtcdCompact { member } => {
                format!("compact etcd at its current revision through member m{member}")
            }
            Fault::EtcdDefrag { member } => format!("defragment etcd member m{member}"),
            Fault::Raise { ahead_ms } => {
                format!("raise the leader's high-water to {ahead_ms} ms ahead of the clock")
            }
            Fault::Restore { down_ms } => format!(
                "kill -9 every node, export each data directory, seed fresh ones from the \
                 exports, restart after {down_ms} ms"
            ),
        }
    }
}

/// The two etcd members an `etcd-quorum` fault starting at member `first` kills.
pub fn etcd_quorum_members(first: usize) -> (usize, usize) {
    (first % ETCD_MEMBERS, (first + 1) % ETCD_MEMBERS)
}

/// A fault at `at_ms` after the start of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub at_ms: u64,
    pub fault: Fault,
}

/// What a schedule is drawn from.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub nodes: usize,
    pub kinds: Vec<FaultKind>,
    pub duration: Duration,
    /// Mean quiet gap between faults.
    pub interval: Duration,
    /// Upper bound of a pause: kept below the liveness bound so a pause alone is no stall.
    pub pause_max: Duration,
    /// Open with clock-back-then-kill steps that a server forgetting its high-water fails.
    pub positive_control: bool,
    /// Open with long cuts of the leader that a server granting without its lease fails.
    pub no_leader_lease_control: bool,
    /// Open with kills of the leader that a server forgetting its sequences fails.
    pub seq_forget_control: bool,
    /// Open with kills of the leader that a server forgetting its leases fails.
    pub lease_forget_control: bool,
    /// Open with removals of the leader of two voters that a server allowing them fails.
    pub leader_removal_control: bool,
    /// Open with stale-vote elections that a server trusting wiped nodes fails.
    pub trust_wiped_control: bool,
    /// Open with power losses (of every node of a cluster at once) that a server acknowledging
    /// writes before they are durable fails.
    pub power_control: bool,
    /// Open with long cuts of the leader from etcd that an etcd node ignoring its leader
    /// lease's deadline fails.
    pub etcd_ignore_lease_control: bool,
    /// Open with pauses of the leader past its etcd lease that an etcd node writing without
    /// its fencing compares fails.
    pub etcd_skip_fence_control: bool,
    /// Open with raises of the high-water, each followed by a kill of the leader, that a
    /// server keeping its raises in memory fails.
    pub raise_control: bool,
    /// How long each fsync of a slow disk takes; drawn for each fault when `None`.
    pub slow_fsync_ms: Option<u64>,
}

/// Draws the schedule of `plan`: same plan, same schedule.
pub fn draw(plan: &Plan) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let end_ms = plan.duration.as_millis() as u64;
    let interval_ms = (plan.interval.as_millis() as u64).max(1);
    let (mut steps, mut t) = control_steps(plan, interval_ms);
    if plan.kinds.is_empty() {
        return steps;
    }
    while steps.len() < FAULTS_MAX {
        t += rng.random_range(interval_ms / 2..=interval_ms * 3 / 2);
        let fault = draw_fault(plan, &mut rng);
        if t + fault.length_ms() >= end_ms {
            break;
        }
        steps.push(Step { at_ms: t, fault });
        t += fault.length_ms();
    }
    steps
}

/// The fixed opening steps of the positive controls, and the offset after them.
fn control_steps(plan: &Plan, interval_ms: u64) -> (Vec<Step>, u64) {
    let mut steps = Vec::new();
    let mut t = interval_ms / 2;
    if plan.positive_control {
        for node in 0..plan.nodes {
            steps.push(Step {
                at_ms: t,
                fault: Fault::Clock {
                    node: Target::Node(node),
                    offset_ms: POSITIVE_CONTROL_SHIFT_MS,
                },
            });
        }
        t += interval_ms;
        steps.push(Step {
            at_ms: t,
            fault: Fault::Kill {
                node: Target::Leader,
                down_ms: 100,
            },
        });
        t += 100 + interval_ms;
    }
    if plan.no_leader_lease_control {
        for _ in 0..NO_LEASE_CUTS {
            steps.push(Step {
                at_ms: t,
                fault: Fault::Partition {
                    node: Target::Leader,
                    for_ms: NO_LEASE_CUT_MS,
                },
            });
            t += NO_LEASE_CUT_MS + interval_ms;
        }
    }
    if plan.etcd_ignore_lease_control {
        for _ in 0..ETCD_IGNORE_LEASE_CUTS {
            steps.push(Step {
                at_ms: t,
                fault: Fault::EtcdCut {
                    node: Target::Leader,
                    for_ms: ETCD_IGNORE_LEASE_CUT_MS,
                },
            });
            t += ETCD_IGNORE_LEASE_CUT_MS + interval_ms;
        }
    }
    if plan.raise_control {
        for _ in 0..RAISE_CONTROL_ROUNDS {
            steps.push(Step {
                at_ms: t,
                fault: Fault::Raise {
                    ahead_ms: RAISE_CONTROL_AHEAD_MS,
                },
            });
            t += interval_ms;
            steps.push(Step {
                at_ms: t,
                fault: Fault::Kill {
                    node: Target::Leader,
                    down_ms: 100,
                },
            });
            t += 100 + interval_ms;
        }
    }
    if plan.etcd_skip_fence_control {
        for _ in 0..ETCD_SKIP_FENCE_PAUSES {
            steps.push(Step {
                at_ms: t,
                fault: Fault::Pause {
                    node: Target::Leader,
                    for_ms: ETCD_SKIP_FENCE_PAUSE_MS,
                },
            });
            t += ETCD_SKIP_FENCE_PAUSE_MS + interval_ms;
        }
    }
    let kills = match (plan.seq_forget_control, plan.lease_forget_control) {
        (true, _) => SEQ_FORGET_KILLS,
        (_, true) => LEASE_FORGET_KILLS,
        _ => 0,
    };
    for _ in 0..kills {
        steps.push(Step {
            at_ms: t,
            fault: Fault::Kill {
                node: Target::Leader,
                down_ms: 100,
            },
        });
        t += 100 + interval_ms;
    }
    if plan.leader_removal_control {
        for _ in 0..LEADER_REMOVALS {
            steps.push(Step {
                at_ms: t,
                fault: Fault::Shrink {
                    remove_leader: true,
                    slow_ms: LEADER_REMOVAL_SLOW_MS,
                    for_ms: LEADER_REMOVAL_HOLD_MS,
                },
            });
            t += LEADER_REMOVAL_HOLD_MS + interval_ms;
        }
    }
    if plan.trust_wiped_control {
        for _ in 0..TRUST_WIPED_OPENINGS {
            steps.push(Step {
                at_ms: t,
                fault: Fault::StaleVote {
                    cut_ms: TRUST_WIPED_CUT_MS,
                    hold_ms: TRUST_WIPED_HOLD_MS,
                },
            });
            t += TRUST_WIPED_CUT_MS + TRUST_WIPED_HOLD_MS + interval_ms;
        }
    }
    if plan.power_control {
        for _ in 0..POWER_CONTROL_LOSSES {
            t += POWER_CONTROL_GAP_MS;
            steps.push(Step {
                at_ms: t,
                fault: Fault::Power {
                    node: Target::Leader,
                    every: plan.nodes > 1,
                    torn: false,
                    down_ms: 100,
                },
            });
            t += 100 + interval_ms;
        }
    }
    (steps, t)
}

/// One fault of the kinds `plan` allows, aimed at the leader or at a node.
fn draw_fault(plan: &Plan, rng: &mut StdRng) -> Fault {
    // A single node is its own leader; only a cluster draws between the leader and a node.
    let node = if plan.nodes > 1 && rng.random_bool(0.5) {
        Target::Leader
    } else {
        Target::Node(rng.random_range(0..plan.nodes))
    };
    match plan.kinds[rng.random_range(0..plan.kinds.len())] {
        FaultKind::Kill => Fault::Kill {
            node,
            down_ms: rng.random_range(0..=DOWN_MAX_MS),
        },
        FaultKind::Pause => Fault::Pause {
            node,
            for_ms: rng.random_range(50..=(plan.pause_max.as_millis() as u64).max(50)),
        },
        FaultKind::Clock => Fault::Clock {
            node,
            offset_ms: rng.random_range(-CLOCK_SHIFT_MAX_MS..=CLOCK_SHIFT_MAX_MS),
        },
        FaultKind::Partition => Fault::Partition {
            node,
            for_ms: rng.random_range(PARTITION_MIN_MS..=PARTITION_MAX_MS),
        },
        FaultKind::Handoff => Fault::Handoff {
            down_ms: rng.random_range(0..=DOWN_MAX_MS),
        },
        FaultKind::Member if rng.random_bool(0.5) => Fault::Replace {
            node,
            stop: if rng.random_bool(0.5) {
                Stop::Kill
            } else {
                Stop::Term
            },
            down_ms: rng.random_range(0..=DOWN_MAX_MS),
        },
        FaultKind::Member => Fault::Shrink {
            remove_leader: rng.random_bool(0.5),
            slow_ms: rng.random_range(0..=SHRINK_SLOW_MAX_MS),
            for_ms: rng.random_range(SHRINK_MIN_MS..=SHRINK_MAX_MS),
        },
        FaultKind::Wipe => {
            let node = Target::Follower(rng.random_range(0..plan.nodes));
            if rng.random_bool(0.5) {
                Fault::Wipe {
                    node,
                    loss: Loss::Log,
                    for_ms: rng.random_range(0..=DOWN_MAX_MS),
                }
            } else {
                Fault::Wipe {
                    node,
                    loss: Loss::Whole,
                    for_ms: rng.random_range(WIPE_MIN_MS..=WIPE_MAX_MS),
                }
            }
        }
        FaultKind::Power => Fault::Power {
            node,
            every: plan.nodes > 1 && rng.random_ratio(1, 4),
            torn: rng.random_bool(0.5),
            down_ms: rng.random_range(0..=POWER_DOWN_MAX_MS),
        },
        FaultKind::DiskError => Fault::DiskError {
            node,
            once: rng.random_bool(0.5),
            for_ms: rng.random_range(DISK_FAULT_MIN_MS..=DISK_FAULT_MAX_MS),
        },
        FaultKind::DiskFull => Fault::DiskFull {
            node,
            for_ms: rng.random_range(DISK_FAULT_MIN_MS..=DISK_FAULT_MAX_MS),
        },
        FaultKind::SlowDisk => Fault::SlowDisk {
            node,
            fsync_ms: plan
                .slow_fsync_ms
                .unwrap_or_else(|| rng.random_range(1..=SLOW_FSYNC_MAX_MS)),
            for_ms: rng.random_range(DISK_FAULT_MIN_MS..=DISK_FAULT_MAX_MS),
        },
        FaultKind::EtcdKill => Fault::EtcdKill {
            member: rng.random_range(0..ETCD_MEMBERS),
            down_ms: rng.random_range(0..=ETCD_DOWN_MAX_MS),
        },
        FaultKind::EtcdQuorum => Fault::EtcdQuorum {
            first: rng.random_range(0..ETCD_MEMBERS),
            down_ms: rng.random_range(ETCD_QUORUM_MIN_MS..=ETCD_QUORUM_MAX_MS),
        },
        FaultKind::EtcdCut => Fault::EtcdCut {
            node,
            for_ms: rng.random_range(ETCD_CUT_MIN_MS..=ETCD_CUT_MAX_MS),
        },
        FaultKind::EtcdCompact => Fault::EtcdCompact {
            member: rng.random_range(0..ETCD_MEMBERS),
        },
        FaultKind::EtcdDefrag => Fault::EtcdDefrag {
            member: rng.random_range(0..ETCD_MEMBERS),
        },
        FaultKind::Raise => Fault::Raise {
            ahead_ms: rng.random_range(0..=RAISE_AHEAD_MAX_MS),
        },
        FaultKind::Restore => Fault::Restore {
            down_ms: rng.random_range(0..=DOWN_MAX_MS),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(seed: u64) -> Plan {
        Plan {
            seed,
            nodes: 3,
            kinds: vec![
                FaultKind::Kill,
                FaultKind::Pause,
                FaultKind::Clock,
                FaultKind::Partition,
            ],
            duration: Duration::from_secs(60),
            interval: Duration::from_secs(1),
            pause_max: Duration::from_secs(2),
            positive_control: false,
            no_leader_lease_control: false,
            seq_forget_control: false,
            lease_forget_control: false,
            leader_removal_control: false,
            trust_wiped_control: false,
            power_control: false,
            etcd_ignore_lease_control: false,
            etcd_skip_fence_control: false,
            raise_control: false,
            slow_fsync_ms: None,
        }
    }

    #[test]
    fn a_seed_replays_its_schedule() {
        assert_eq!(draw(&plan(7)), draw(&plan(7)));
        assert_ne!(draw(&plan(7)), draw(&plan(8)));
    }

    #[test]
    fn faults_do_not_overlap_and_end_in_time() {
        for seed in 0..50 {
            let steps = draw(&plan(seed));
            assert!(!steps.is_empty());
            for pair in steps.windows(2) {
                assert!(pair[0].at_ms + pair[0].fault.length_ms() < pair[1].at_ms);
            }
            let last = steps.last().unwrap();
            assert!(last.at_ms + last.fault.length_ms() < 60_000);
            for step in &steps {
                match step.fault {
                    Fault::Pause { for_ms, .. } => assert!((50..=2_000).contains(&for_ms)),
                    Fault::Kill { down_ms, .. }
                    | Fault::Handoff { down_ms }
                    | Fault::Replace { down_ms, .. } => assert!(down_ms <= DOWN_MAX_MS),
                    Fault::Shrink {
                        slow_ms, for_ms, ..
                    } => {
                        assert!((SHRINK_MIN_MS..=SHRINK_MAX_MS).contains(&for_ms));
                        assert!(slow_ms <= SHRINK_SLOW_MAX_MS);
                    }
                    Fault::Clock { offset_ms, .. } => {
                        assert!(offset_ms.abs() <= CLOCK_SHIFT_MAX_MS)
                    }
                    Fault::Partition { for_ms, .. } => {
                        assert!((PARTITION_MIN_MS..=PARTITION_MAX_MS).contains(&for_ms))
                    }
                    Fault::Wipe { .. } | Fault::StaleVote { .. } => {}
                    Fault::Power { down_ms, .. } => assert!(down_ms <= POWER_DOWN_MAX_MS),
                    Fault::DiskError { for_ms, .. }
                    | Fault::DiskFull { for_ms, .. }
                    | Fault::SlowDisk { for_ms, .. } => {
                        assert!((DISK_FAULT_MIN_MS..=DISK_FAULT_MAX_MS).contains(&for_ms))
                    }
                    Fault::EtcdKill { .. }
                    | Fault::EtcdQuorum { .. }
                    | Fault::EtcdCompact { .. }
                    | Fault::EtcdDefrag { .. } => {}
                    Fault::Raise { ahead_ms } => assert!(ahead_ms <= RAISE_AHEAD_MAX_MS),
                    Fault::Restore { down_ms } => assert!(down_ms <= DOWN_MAX_MS),
                    Fault::EtcdCut { for_ms, .. } => {
                        assert!((ETCD_CUT_MIN_MS..=ETCD_CUT_MAX_MS).contains(&for_ms))
                    }
                }
            }
        }
    }

    #[test]
    fn disk_faults_are_drawn_in_their_bounds_and_the_power_control_opens_with_losses() {
        let disk = Plan {
            kinds: vec![
                FaultKind::Power,
                FaultKind::DiskError,
                FaultKind::DiskFull,
                FaultKind::SlowDisk,
            ],
            ..plan(3)
        };
        let steps = draw(&disk);
        for kind in &disk.kinds {
            assert!(steps.iter().any(|s| s.fault.kind() == *kind), "{kind:?}");
        }
        for step in &steps {
            if let Fault::SlowDisk { fsync_ms, .. } = step.fault {
                assert!((1..=SLOW_FSYNC_MAX_MS).contains(&fsync_ms));
            }
        }
        let fixed = draw(&Plan {
            slow_fsync_ms: Some(200),
            ..disk.clone()
        });
        assert!(fixed.iter().all(|s| match s.fault {
            Fault::SlowDisk { fsync_ms, .. } => fsync_ms == 200,
            _ => true,
        }));
        let control = draw(&Plan {
            power_control: true,
            kinds: vec![],
            ..plan(1)
        });
        assert_eq!(control.len(), POWER_CONTROL_LOSSES);
        assert!(
            control
                .iter()
                .all(|s| matches!(s.fault, Fault::Power { every: true, .. }))
        );
    }

    #[test]
    fn the_positive_control_sets_clocks_back_then_kills() {
        let steps = draw(&Plan {
            positive_control: true,
            kinds: vec![],
            ..plan(1)
        });
        assert_eq!(steps.len(), 4);
        assert!(matches!(steps[0].fault, Fault::Clock { offset_ms, .. } if offset_ms < 0));
        assert!(matches!(steps[3].fault, Fault::Kill { .. }));
    }

    #[test]
    fn the_no_leader_lease_control_cuts_the_leader_off_then_draws() {
        let steps = draw(&Plan {
            no_leader_lease_control: true,
            kinds: vec![FaultKind::Partition],
            ..plan(1)
        });
        let cut = Fault::Partition {
            node: Target::Leader,
            for_ms: NO_LEASE_CUT_MS,
        };
        assert!(steps.len() > NO_LEASE_CUTS);
        assert!(steps[..NO_LEASE_CUTS].iter().all(|s| s.fault == cut));
        for pair in steps.windows(2) {
            assert!(pair[0].at_ms + pair[0].fault.length_ms() < pair[1].at_ms);
        }
    }

    #[test]
    fn the_seq_forget_control_kills_the_leader_then_draws() {
        let steps = draw(&Plan {
            seq_forget_control: true,
            kinds: vec![FaultKind::Kill],
            ..plan(1)
        });
        let kill = Fault::Kill {
            node: Target::Leader,
            down_ms: 100,
        };
        assert!(steps.len() > SEQ_FORGET_KILLS);
        assert!(steps[..SEQ_FORGET_KILLS].iter().all(|s| s.fault == kill));
        for pair in steps.windows(2) {
            assert!(pair[0].at_ms + pair[0].fault.length_ms() < pair[1].at_ms);
        }
    }

    #[test]
    fn the_lease_forget_control_kills_the_leader_then_draws() {
        let steps = draw(&Plan {
            lease_forget_control: true,
            kinds: vec![FaultKind::Kill],
            ..plan(1)
        });
        let kill = Fault::Kill {
            node: Target::Leader,
            down_ms: 100,
        };
        assert!(steps.len() > LEASE_FORGET_KILLS);
        assert!(steps[..LEASE_FORGET_KILLS].iter().all(|s| s.fault == kill));
    }

    #[test]
    fn handoffs_and_member_changes_are_drawn_with_the_others() {
        let kinds = vec![
            FaultKind::Kill,
            FaultKind::Partition,
            FaultKind::Handoff,
            FaultKind::Member,
        ];
        let steps: Vec<Step> = (0..20)
            .flat_map(|seed| {
                draw(&Plan {
                    kinds: kinds.clone(),
                    ..plan(seed)
                })
            })
            .collect();
        for kind in &kinds {
            assert!(steps.iter().any(|s| s.fault.kind() == *kind), "{kind:?}");
        }
        let shrinks = |remove_leader: bool| {
            steps
                .iter()
                .filter(|s| s.fault.kind() == FaultKind::Member)
                .filter(|s| matches!(s.fault, Fault::Shrink { remove_leader: r, .. } if r == remove_leader))
                .count()
        };
        assert!(shrinks(true) > 0 && shrinks(false) > 0);
        let stops = |stop: Stop| {
            steps
                .iter()
                .filter(|s| matches!(s.fault, Fault::Replace { stop: s, .. } if s == stop))
                .count()
        };
        assert!(stops(Stop::Kill) > 0 && stops(Stop::Term) > 0);
        assert!(steps.iter().all(|s| match s.fault {
            Fault::Handoff { .. } | Fault::Shrink { .. } => s.fault.target() == Target::Leader,
            _ => true,
        }));
    }

    #[test]
    fn the_leader_removal_control_removes_the_leader_of_two_then_draws() {
        let steps = draw(&Plan {
            leader_removal_control: true,
            kinds: vec![FaultKind::Kill],
            ..plan(1)
        });
        let removal = Fault::Shrink {
            remove_leader: true,
            slow_ms: LEADER_REMOVAL_SLOW_MS,
            for_ms: LEADER_REMOVAL_HOLD_MS,
        };
        assert!(steps.len() > LEADER_REMOVALS);
        assert!(steps[..LEADER_REMOVALS].iter().all(|s| s.fault == removal));
        for pair in steps.windows(2) {
            assert!(pair[0].at_ms + pair[0].fault.length_ms() < pair[1].at_ms);
        }
    }

    #[test]
    fn wipes_hit_followers_and_draw_both_losses() {
        let steps: Vec<Step> = (0..20)
            .flat_map(|seed| {
                draw(&Plan {
                    kinds: vec![FaultKind::Kill, FaultKind::Wipe],
                    ..plan(seed)
                })
            })
            .collect();
        let wipes = |loss: Loss| {
            steps
                .iter()
                .filter(|s| matches!(s.fault, Fault::Wipe { loss: l, .. } if l == loss))
                .count()
        };
        assert!(wipes(Loss::Log) > 0 && wipes(Loss::Whole) > 0);
        for step in &steps {
            if let Fault::Wipe { node, loss, for_ms } = step.fault {
                assert!(matches!(node, Target::Follower(_)), "{node}");
                if loss == Loss::Whole {
                    assert!((WIPE_MIN_MS..=WIPE_MAX_MS).contains(&for_ms));
                }
            }
        }
    }

    #[test]
    fn the_trust_wiped_control_opens_with_stale_votes_then_draws() {
        let steps = draw(&Plan {
            trust_wiped_control: true,
            kinds: vec![FaultKind::Kill],
            ..plan(1)
        });
        let opening = Fault::StaleVote {
            cut_ms: TRUST_WIPED_CUT_MS,
            hold_ms: TRUST_WIPED_HOLD_MS,
        };
        assert!(steps.len() > TRUST_WIPED_OPENINGS);
        assert!(
            steps[..TRUST_WIPED_OPENINGS]
                .iter()
                .all(|s| s.fault == opening)
        );
        for pair in steps.windows(2) {
            // The opening's cut runs before its length starts (inside the apply).
            let cut = match pair[0].fault {
                Fault::StaleVote { cut_ms, .. } => cut_ms,
                _ => 0,
            };
            assert!(pair[0].at_ms + cut + pair[0].fault.length_ms() < pair[1].at_ms);
        }
    }

    #[test]
    fn etcd_faults_are_drawn_in_their_bounds() {
        let kinds = vec![FaultKind::Kill, FaultKind::EtcdKill, FaultKind::EtcdQuorum];
        let steps: Vec<Step> = (0..20)
            .flat_map(|seed| {
                draw(&Plan {
                    kinds: kinds.clone(),
                    ..plan(seed)
                })
            })
            .collect();
        for kind in &kinds {
            assert!(steps.iter().any(|s| s.fault.kind() == *kind), "{kind:?}");
        }
        let mut members = [false; ETCD_MEMBERS];
        for step in &steps {
            match step.fault {
                Fault::EtcdKill { member, down_ms } => {
                    assert!(member < ETCD_MEMBERS);
                    assert!(down_ms <= ETCD_DOWN_MAX_MS);
                    assert_eq!(step.fault.target(), Target::Node(member));
                    members[member] = true;
                }
                Fault::EtcdQuorum { first, down_ms } => {
                    assert!(first < ETCD_MEMBERS);
                    assert!((ETCD_QUORUM_MIN_MS..=ETCD_QUORUM_MAX_MS).contains(&down_ms));
                    let (a, b) = etcd_quorum_members(first);
                    assert!(a != b && a < ETCD_MEMBERS && b < ETCD_MEMBERS);
                }
                _ => {}
            }
            assert_eq!(
                step.fault.kind().on_etcd(),
                matches!(
                    step.fault,
                    Fault::EtcdKill { .. } | Fault::EtcdQuorum { .. }
                )
            );
        }
        assert!(
            members.iter().all(|&m| m),
            "every member is drawn: {members:?}"
        );
        for pair in steps.windows(2) {
            if pair[0].at_ms < pair[1].at_ms {
                assert!(pair[0].at_ms + pair[0].fault.length_ms() < pair[1].at_ms);
            }
        }
    }

    #[test]
    fn etcd_cuts_are_drawn_in_their_bounds_and_the_ignore_lease_control_cuts_the_leader() {
        let kinds = vec![FaultKind::Kill, FaultKind::EtcdCut];
        let steps: Vec<Step> = (0..20)
            .flat_map(|seed| {
                draw(&Plan {
                    kinds: kinds.clone(),
                    ..plan(seed)
                })
            })
            .collect();
        let cuts: Vec<&Step> = steps
            .iter()
            .filter(|s| s.fault.kind() == FaultKind::EtcdCut)
            .collect();
        assert!(!cuts.is_empty());
        let mut leader = false;
        for step in cuts {
            let Fault::EtcdCut { node, for_ms } = step.fault else {
                unreachable!("an etcd-cut step")
            };
            assert!((ETCD_CUT_MIN_MS..=ETCD_CUT_MAX_MS).contains(&for_ms));
            assert!(!step.fault.kind().on_etcd() && step.fault.kind().needs_etcd());
            match node {
                Target::Leader => leader = true,
                Target::Node(i) => assert!(i < 3),
                Target::Follower(_) => panic!("a cut aims at the leader or a node"),
            }
        }
        assert!(leader, "the leader is cut now and then");
        let control = draw(&Plan {
            etcd_ignore_lease_control: true,
            etcd_skip_fence_control: false,
            raise_control: false,
            kinds: vec![FaultKind::EtcdCut],
            ..plan(1)
        });
        let cut = Fault::EtcdCut {
            node: Target::Leader,
            for_ms: ETCD_IGNORE_LEASE_CUT_MS,
        };
        assert!(control.len() > ETCD_IGNORE_LEASE_CUTS);
        assert!(
            control[..ETCD_IGNORE_LEASE_CUTS]
                .iter()
                .all(|s| s.fault == cut)
        );
        for pair in control.windows(2) {
            assert!(pair[0].at_ms + pair[0].fault.length_ms() < pair[1].at_ms);
        }
    }

    #[test]
    fn no_kinds_no_faults() {
        let steps = draw(&Plan {
            kinds: vec![],
            ..plan(1)
        });
        assert!(steps.is_empty());
    }
}
