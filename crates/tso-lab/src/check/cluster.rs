//! The local cluster a check runs against, and how faults are applied to it and healed.
//!
//! One node runs the file backend; 3 or 5 run `tso serve --backend raft` on loopback ports
//! picked at start, with the same members list. A fault aimed at "the leader" finds it through
//! the public protocol: the serving leader answers `GetCurrentMaxSafe` with a non-zero
//! watermark, followers with 0. A partition blackholes the loopback proxies of every directed
//! peer link of one node (see TESTING.md); clients still reach every node directly.
//!
//! On the etcd backend (`--backend etcd`), a 3-member etcd cluster starts first (`etcd.rs`),
//! then `--nodes` oracle nodes `tso serve --backend etcd` on it, with ids 1 to `--nodes`; they
//! keep nothing on disk (each node's directory holds its log and clock offset file). Each node
//! reaches each etcd member through a loopback proxy of its own, so `etcd-cut` blackholes one
//! node's links to etcd while its clients still reach it. The etcd faults kill and restart etcd
//! members; the others hit oracle nodes as on raft.
//!
//! A raft cluster has a fixed number of slots, one per node of `--nodes`. A slot keeps its
//! client address, its directory and its name for good, so clients keep one endpoint list and
//! a client stays pinned to a slot; a membership change (`member.rs`) puts a new node, with a
//! new id and new peer and admin ports, into a slot whose old node left.

use std::path::{Path, PathBuf};

use anyhow::Context;

use std::net::SocketAddr;
use std::time::Duration;

use tso_proto::v1::GetCurrentMaxSafeRequest;
use tso_proto::v1::tso_service_client::TsoServiceClient;

use super::etcd::EtcdCluster;
use super::options::CheckBackend;
use super::proxy::LinkProxy;
use super::schedule::{Fault, Target, etcd_quorum_members};
use crate::node::{Node, Stopped};

/// How long finding the leader may ask one node before treating it as not leading.
const LEADER_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Hidden server flag of the positive control: the fence reads the durable high-water as 0.
pub const FORGET_HIGH_WATER_FLAG: &str = "--unsafe-forget-high-water";
/// Hidden server flag of the no-leader-lease control: grants skip the leader lease check.
pub const NO_LEADER_LEASE_FLAG: &str = "--unsafe-no-leader-lease";
/// Hidden server flag of the sequence control: each new leader starts every sequence from 0.
pub const SEQ_FORGET_FLAG: &str = "--unsafe-seq-forget";
/// Hidden server flag of the lease control: each new leader starts with an empty lease set.
pub const LEASE_FORGET_FLAG: &str = "--unsafe-lease-forget";
/// Hidden server flag of the leader-removal control: the leader of two voters may be removed
/// (the survivor elects itself at once while the old leader still holds its lease).
pub const ALLOW_LEADER_REMOVAL_FLAG: &str = "--unsafe-allow-leader-removal";
/// Hidden server flag of the trust-wiped control: peers do not check incarnations, so a member
/// restarted under its old id on a wiped directory votes and counts again.
pub const TRUST_WIPED_FLAG: &str = "--unsafe-trust-wiped";
/// Hidden server flag of the wall-expiry control: stamping leases expire by the wall clock.
pub const LEASE_WALL_EXPIRY_FLAG: &str = "--unsafe-lease-wall-expiry";
/// Hidden server flag of the in-memory-bound control: a lease's bound is not made durable.
pub const LEASE_BOUND_IN_MEMORY_FLAG: &str = "--unsafe-lease-bound-in-memory";
/// Hidden server flag of the burnt-refusal control: some refused sequence calls spend a block.
pub const SEQ_BURN_REFUSED_FLAG: &str = "--unsafe-seq-burn-refused";
/// Hidden server flag of the handoff control: a leader handing off keeps its lease.
pub const HANDOFF_KEEP_LEADER_LEASE_FLAG: &str = "--unsafe-handoff-keep-leader-lease";
/// Hidden server flag of the skip-dir-fsync control: the file backend renames records into
/// place without fsyncing the directory.
pub const SKIP_DIR_FSYNC_FLAG: &str = "--unsafe-skip-dir-fsync";
/// Hidden server flag of the ack-before-fsync control: the raft log store acknowledges
/// appends before they are durable.
pub const ACK_BEFORE_FSYNC_FLAG: &str = "--unsafe-ack-before-fsync";
/// Hidden server flag of the pre-vote ablation: elections skip the pre-vote gate.
pub const UNGATE_ELECTIONS_FLAG: &str = "--unsafe-ungate-elections";
/// Hidden server flag of the ignore-lease control: an etcd-backend leader grants past its
/// leader lease's deadline, and keeps leading while its keep-alives fail.
pub const ETCD_IGNORE_LEASE_FLAG: &str = "--unsafe-etcd-ignore-lease";
/// Hidden server flag of the raise control: a raise of the high-water stays in memory.
pub const RAISE_IN_MEMORY_FLAG: &str = "--unsafe-raise-in-memory";
/// The hidden `tso serve` flag of the skip-fence control (etcd backend).
pub const ETCD_SKIP_FENCE_FLAG: &str = "--unsafe-etcd-skip-fence";
/// The key prefix of the oracle a check on the etcd backend runs.
pub const ETCD_PREFIX: &str = "/tso/check";
/// The TTL of the etcd leases of a check's oracle nodes: etcd's smallest with its default
/// election timeout, so failovers are quick.
pub const ETCD_LEASE_TTL: &str = "2s";
/// How long a SIGTERM'd node may take to exit before it is killed: its whole exit, handoff and
/// drain, is bounded by the server's `--shutdown-grace` (10 s by default), and 5 s cover a
/// loaded machine.
pub const TERM_EXIT_MAX: Duration = Duration::from_secs(15);

pub struct Cluster {
    /// One node per slot.
    pub nodes: Vec<Node>,
    /// The proxy of every directed peer link of a raft cluster.
    pub(super) links: Vec<Link>,
    /// The slots of a raft cluster (`None` on one node).
    pub(super) raft: Option<RaftSlots>,
    /// The slots of the wiped follower A and the cut-off follower B of the trust-wiped
    /// control's opening under way (`wipe.rs`).
    pub(super) stale_vote: Option<(usize, usize)>,
    /// The seed of torn power losses: each draws the next value.
    pub(super) torn_seed: u64,
    /// The etcd cluster the nodes run on (`--backend etcd`).
    pub(super) etcd: Option<EtcdCluster>,
    /// On the etcd backend, the proxy of every link from an oracle node (the index) to an etcd
    /// member: each node's `--etcd-endpoints` are its own proxies, so `etcd-cut` cuts one node
    /// off from etcd while its clients still reach it.
    pub(super) etcd_links: Vec<(usize, LinkProxy)>,
    /// Restores done so far (`restore.rs`): each keeps its exports and old directories apart.
    pub(super) restores: usize,
}

/// The loopback proxy of the directed peer link from slot `from` to the peer port `target` of
/// slot `to`.
pub(super) struct Link {
    pub from: usize,
    pub to: usize,
    pub target: SocketAddr,
    pub proxy: LinkProxy,
}

/// What a raft cluster's slots hold, and how a new node is started in one.
pub(super) struct RaftSlots {
    pub bin: PathBuf,
    pub dir: PathBuf,
    /// Flags every node gets (the log filter, a control's unsafe flags).
    pub common: Vec<String>,
    pub slots: Vec<Slot>,
    /// The id the next node to join gets.
    pub next_id: u64,
}

/// One slot of a raft cluster: the node in it now.
pub(super) struct Slot {
    pub id: u64,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub admin: SocketAddr,
    /// Whether `id` is a voter (false once removed, until a new node joins in the slot).
    pub member: bool,
    /// Whether the node runs on a wiped directory under an id the cluster knows from another
    /// directory: it is kept out, so the nemesis does not send it admin calls.
    pub kept_out: bool,
}

impl Slot {
    /// The member form `ID=CLIENT/NAME:PEER_PORT/ADMIN` of the node in slot `i`: peers are
    /// named, so that each node reaches this one through the proxy of that one link.
    pub fn member(&self, i: usize) -> String {
        format!(
            "{}={}/{}/{}",
            self.id,
            self.client,
            self.peer_addr(i),
            self.admin
        )
    }

    /// The peer address other nodes dial to reach the node in slot `i`: its name (see
    /// [`Slot::member`]) and its peer port.
    pub fn peer_addr(&self, i: usize) -> String {
        format!("{}:{}", peer_name(i), self.peer.port())
    }
}

/// What applying a fault did, for the run's counts and its result file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// How it went, by kind: `applied` for most; a handoff's or a membership change's outcome.
    pub outcome: &'static str,
    /// What happened, in words (who was handed the leadership, which ids changed).
    pub note: Option<String>,
    /// A node sent SIGTERM did not exit within [`TERM_EXIT_MAX`] and was killed.
    pub hung: bool,
}

impl Applied {
    fn plain() -> Applied {
        Applied {
            outcome: "applied",
            note: None,
            hung: false,
        }
    }
}

impl Cluster {
    /// Starts `nodes` local servers under `dir`: one on the file backend, or a raft cluster.
    /// Every server also gets `unsafe_flags` (a positive control's broken server).
    /// With `fault_disk`, each node's data directory is on the fault layer.
    /// On `CheckBackend::Etcd`, starts an etcd cluster first and `nodes` oracle nodes on it.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        nodes: usize,
        backend: CheckBackend,
        unsafe_flags: &[&str],
        fault_disk: bool,
    ) -> anyhow::Result<Cluster> {
        let mut common = vec!["--log".to_string(), "info".to_string()];
        common.extend(unsafe_flags.iter().map(|f| f.to_string()));
        let mut cluster = if backend == CheckBackend::Etcd {
            Cluster::on_etcd(bin, dir, nodes, common).await?
        } else if nodes == 1 {
            Cluster {
                nodes: vec![Node::new(bin, &dir.join("n0"), "n0", common, true)?],
                links: Vec::new(),
                raft: None,
                stale_vote: None,
                torn_seed: 0,

                restores: 0,
                etcd: None,
                etcd_links: Vec::new(),
            }
        } else {
            Cluster::raft(bin, dir, nodes, common).await?
        };
        if fault_disk {
            let plain = std::mem::take(&mut cluster.nodes);
            for node in plain {
                cluster.nodes.push(node.with_fault_disk()?);
            }
        }
        for node in &mut cluster.nodes {
            node.start()
                .await
                .with_context(|| format!("starting node {}", node.name))?;
        }
        Ok(cluster)
    }

    /// A started etcd cluster under `dir/etcd`, and `nodes` oracle nodes on it (ids 1 to
    /// `nodes`), not started yet.
    async fn on_etcd(
        bin: &Path,
        dir: &Path,
        nodes: usize,
        common: Vec<String>,
    ) -> anyhow::Result<Cluster> {
        let etcd = EtcdCluster::start(&dir.join("etcd"))
            .await
            .context("starting the etcd cluster")?;
        let mut etcd_links = Vec::new();
        let mut node_list = Vec::with_capacity(nodes);
        for i in 0..nodes {
            let mut endpoints = Vec::new();
            for (member, target) in etcd.client_addrs().into_iter().enumerate() {
                let listen = etcd_link_addr(i, member, target.port());
                etcd_links.push((i, LinkProxy::start(listen, target).await?));
                endpoints.push(format!("http://{listen}"));
            }
            let mut extra: Vec<String> = [
                "--backend",
                "etcd",
                "--node-id",
                &(i + 1).to_string(),
                "--etcd-endpoints",
                &endpoints.join(","),
                "--etcd-prefix",
                ETCD_PREFIX,
                "--etcd-lease-ttl",
                ETCD_LEASE_TTL,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            extra.extend(common.iter().cloned());
            let name = peer_name(i);
            node_list.push(Node::new(bin, &dir.join(&name), &name, extra, true)?);
        }
        let nodes = node_list;
        Ok(Cluster {
            nodes,
            links: Vec::new(),
            raft: None,
            stale_vote: None,
            torn_seed: 0,

            restores: 0,
            etcd: Some(etcd),
            etcd_links,
        })
    }

    /// A raft cluster of `nodes` slots, ids 1 to `nodes`, with every peer link proxied; not
    /// started yet.
    async fn raft(
        bin: &Path,
        dir: &Path,
        nodes: usize,
        common: Vec<String>,
    ) -> anyhow::Result<Cluster> {
        let ports = free_ports(3 * nodes)?;
        let slots: Vec<Slot> = (0..nodes)
            .map(|i| Slot {
                id: i as u64 + 1,
                client: ports[i],
                peer: ports[nodes + i],
                admin: ports[2 * nodes + i],
                member: true,
                kept_out: false,
            })
            .collect();
        let members = raft_members(&slots);
        let mut cluster = Cluster {
            nodes: Vec::with_capacity(nodes),
            links: Vec::new(),
            raft: Some(RaftSlots {
                bin: bin.to_path_buf(),
                dir: dir.to_path_buf(),
                common,
                slots,
                next_id: nodes as u64 + 1,
            }),
            stale_vote: None,
            torn_seed: 0,

            restores: 0,
            etcd: None,
            etcd_links: Vec::new(),
        };
        for i in 0..nodes {
            cluster.proxy_links_to(i).await?;
            let node = cluster.raft_node(i, Some(&members))?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    /// Starts the proxies of the links from every other slot to the peer port of slot `to`.
    pub(super) async fn proxy_links_to(&mut self, to: usize) -> anyhow::Result<()> {
        let slots = &self.raft.as_ref().expect("a raft cluster").slots;
        let target = slots[to].peer;
        for from in (0..slots.len()).filter(|&from| from != to) {
            let proxy = LinkProxy::start(link_addr(from, to, target.port()), target).await?;
            self.links.push(Link {
                from,
                to,
                target,
                proxy,
            });
        }
        Ok(())
    }

    /// The (not yet started) node of slot `i`: with the cluster's `members` on a first start
    /// of the cluster, or waiting to join (`None`).
    pub(super) fn raft_node(&self, i: usize, members: Option<&str>) -> anyhow::Result<Node> {
        let raft = self.raft.as_ref().expect("a raft cluster");
        let slot = &raft.slots[i];
        let mut extra = vec![
            "--backend".to_string(),
            "raft".to_string(),
            "--node-id".to_string(),
            slot.id.to_string(),
            "--peer-addr".to_string(),
            slot.peer.to_string(),
            "--admin-listen".to_string(),
            slot.admin.to_string(),
        ];
        match members {
            Some(members) => extra.extend(["--members".to_string(), members.to_string()]),
            None => extra.push("--join".to_string()),
        }
        extra.extend(raft.common.iter().cloned());
        let name = peer_name(i);
        let node_dir = raft.dir.join(&name);
        Ok(Node::new(&raft.bin, &node_dir, &name, extra, true)?
            .with_listen(slot.client)
            .with_hosts_file(write_hosts(&node_dir, i, raft.slots.len())?))
    }

    /// The node a target names now; `None` when no running node leads.
    pub async fn resolve(&self, target: Target) -> Option<usize> {
        match target {
            Target::Node(i) => Some(i),
            Target::Leader if self.nodes.len() == 1 => Some(0),
            Target::Leader => self.leader().await,
            Target::Follower(_) if self.nodes.len() == 1 => None,
            Target::Follower(from) => {
                let leader = self.leader().await?;
                let slots = &self.raft.as_ref()?.slots;
                (from..from + slots.len())
                    .map(|i| i % slots.len())
                    .find(|&i| {
                        i != leader
                            && slots[i].member
                            && !slots[i].kept_out
                            && self.nodes[i].is_running()
                    })
            }
        }
    }

    /// Whether node `at`, which `target` resolved to, leads now: `leader` or `follower`.
    pub async fn role_of(&self, target: Target, at: usize) -> &'static str {
        let leads = match target {
            Target::Leader => true,
            Target::Follower(_) => false,
            Target::Node(_) => self.nodes.len() == 1 || self.leader().await == Some(at),
        };
        if leads { "leader" } else { "follower" }
    }

    /// The running node that serves as leader now, if one does.
    async fn leader(&self) -> Option<usize> {
        for (i, node) in self.nodes.iter().enumerate() {
            if node.is_running() && leads(&node.endpoint()).await {
                return Some(i);
            }
        }
        None
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(Node::endpoint).collect()
    }

    /// Starts a fault on node `at`. Returns `None` when it does not apply now (the node is
    /// down).
    /// The etcd faults take `at` as an etcd member's index.
    pub async fn apply(&mut self, fault: Fault, at: usize) -> anyhow::Result<Option<Applied>> {
        if fault.kind().on_etcd() {
            return self.apply_etcd(fault, at).await;
        }
        let running = self.nodes[at].is_running();
        match fault {
            Fault::Kill { .. } | Fault::Pause { .. } | Fault::Handoff { .. } if !running => {
                return Ok(None);
            }
            Fault::Kill { .. } => self.nodes[at].kill().await?,
            Fault::Pause { .. } => self.nodes[at].pause()?,
            Fault::Clock { offset_ms, .. } => self.nodes[at].set_clock_offset_ms(offset_ms)?,
            Fault::Partition { .. } => self.cut(at, true),
            Fault::EtcdCut { .. } => self.cut_etcd(at, true)?,
            Fault::Handoff { .. } => return self.terminate(at).await.map(Some),
            Fault::Raise { ahead_ms } => return self.raise(at, ahead_ms).await,
            Fault::Restore { .. } => return self.restore().await.map(Some),
            Fault::Replace { stop, .. } => return self.stop_to_replace(at, stop).await,
            Fault::Shrink {
                remove_leader,
                slow_ms,
                ..
            } => return self.shrink(remove_leader, slow_ms).await,
            Fault::Wipe { loss, .. } => return self.wipe(at, loss).await.map(Some),
            Fault::StaleVote { cut_ms, .. } => return self.stale_vote(at, cut_ms).await,
            Fault::Power { every, torn, .. } => return self.power_loss(at, every, torn).await,
            Fault::DiskError { once, .. } => self.disk(at)?.fsync_error(if once {
                tso_faultfs::FsyncError::Once
            } else {
                tso_faultfs::FsyncError::UntilHealed
            }),
            Fault::DiskFull { .. } => self.disk(at)?.disk_full(true),
            Fault::SlowDisk { fsync_ms, .. } => {
                self.disk(at)?.slow_fsync(Duration::from_millis(fsync_ms))
            }
            Fault::EtcdKill { .. }
            | Fault::EtcdQuorum { .. }
            | Fault::EtcdCompact { .. }
            | Fault::EtcdDefrag { .. } => {
                unreachable!("etcd faults are applied by apply_etcd")
            }
        }
        Ok(Some(Applied::plain()))
    }

    /// The etcd members an etcd fault at member `at` kills.
    fn etcd_targets(fault: Fault, at: usize) -> Vec<usize> {
        match fault {
            Fault::EtcdQuorum { .. } => {
                let (a, b) = etcd_quorum_members(at);
                vec![a, b]
            }
            _ => vec![at],
        }
    }

    /// `kill -9` the etcd member(s) an etcd fault hits; `None` when one is down already.
    async fn apply_etcd(&mut self, fault: Fault, at: usize) -> anyhow::Result<Option<Applied>> {
        let etcd = self
            .etcd
            .as_mut()
            .context("etcd faults need --backend etcd")?;
        let targets = Self::etcd_targets(fault, at);
        if targets.iter().any(|&i| !etcd.is_running(i)) {
            return Ok(None);
        }
        let note = match fault {
            Fault::EtcdCompact { .. } => Some(match etcd.compact(at).await? {
                Some(revision) => format!("compacted at revision {revision}"),
                None => "compacted already: nothing written since".to_string(),
            }),
            Fault::EtcdDefrag { .. } => {
                let took = etcd.defragment(at).await?;
                Some(format!("defragmented in {} ms", took.as_millis()))
            }
            _ => {
                for &i in &targets {
                    etcd.kill(i).await?;
                }
                None
            }
        };
        Ok(Some(Applied {
            note,
            ..Applied::plain()
        }))
    }

    /// Raises the high-water to `ahead_ms` ahead of the checker's clock through node `at` (the
    /// leader, as found), else any running node that leads by now; `None` when none does.
    async fn raise(&self, at: usize, ahead_ms: u64) -> anyhow::Result<Option<Applied>> {
        use tso_proto::tso::ops_v1::RaiseHighWaterRequest;
        use tso_proto::tso::ops_v1::ops_client::OpsClient;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_millis() as u64;
        let to = now_ms + ahead_ms;
        let order = std::iter::once(at).chain((0..self.nodes.len()).filter(|&i| i != at));
        for i in order {
            if !self.nodes[i].is_running() {
                continue;
            }
            let call = async {
                let mut client = OpsClient::connect(self.nodes[i].endpoint()).await.ok()?;
                client
                    .raise_high_water(RaiseHighWaterRequest {
                        to_physical_ms: to,
                        max_ahead_ms: 0,
                    })
                    .await
                    .ok()
                    .map(|r| r.into_inner())
            };
            if let Ok(Some(reply)) = tokio::time::timeout(LEADER_PROBE_TIMEOUT * 4, call).await {
                return Ok(Some(Applied {
                    note: Some(format!(
                        "{} raised above {to} ms, high-water {} ms",
                        self.nodes[i].name, reply.high_water_ms
                    )),
                    ..Applied::plain()
                }));
            }
        }
        Ok(None)
    }

    /// `leader` or `follower`: the role etcd member `at` has in etcd's own raft now, if it
    /// answers.
    pub async fn etcd_role_of(&self, at: usize) -> Option<&'static str> {
        let leads = self.etcd.as_ref()?.leads(at).await?;
        Some(if leads { "leader" } else { "follower" })
    }

    /// Ends a fault on node `at`: restarts a killed or SIGTERM'd node, resumes a paused one,
    /// replaces a stopped one, grows a shrunk cluster back. Returns what changed, in words,
    /// if there is more to say than the fault's own description.
    pub async fn heal(&mut self, fault: Fault, at: usize) -> anyhow::Result<Option<String>> {
        match fault {
            Fault::Kill { .. } | Fault::Handoff { .. } => {
                self.nodes[at].start().await?;
            }
            Fault::Pause { .. } => self.nodes[at].resume()?,
            Fault::Partition { .. } => self.cut(at, false),
            Fault::EtcdCut { .. } => self.cut_etcd(at, false)?,
            Fault::Clock { .. } => {}
            Fault::Replace { .. } => return self.replace(at).await.map(Some),
            Fault::Shrink { .. } => return self.grow().await.map(Some),
            Fault::Wipe { .. } => return self.repair_wiped(at).await.map(Some),
            Fault::StaleVote { .. } => return self.end_stale_vote(at).await.map(Some),
            Fault::Power { every, .. } => {
                for i in self.power_targets(at, every) {
                    if !self.nodes[i].is_running() {
                        self.nodes[i].start().await?;
                    }
                }
            }
            // A disk that failed fsyncs is replaced by a good one, and the node restarted as an
            // operator would: it stops serving on such an error (SEMANTICS §6).
            Fault::DiskError { .. } => {
                self.disk(at)?.heal();
                let exited = self.nodes[at].exited();
                self.nodes[at].kill().await?;
                self.nodes[at].start().await?;
                return Ok(Some(if exited {
                    "the node had stopped on the error; restarted on a healed disk".to_string()
                } else {
                    "restarted on a healed disk".to_string()
                }));
            }
            // Space is freed: a node that kept running serves again by itself; one that
            // stopped is restarted.
            Fault::DiskFull { .. } => {
                self.disk(at)?.heal();
                if self.nodes[at].exited() {
                    self.nodes[at].start().await?;
                    return Ok(Some(
                        "the node had stopped on the full disk; restarted".to_string(),
                    ));
                }
                return Ok(Some("space freed; the node kept running".to_string()));
            }
            Fault::SlowDisk { .. } => self.disk(at)?.heal(),
            Fault::EtcdCompact { .. } | Fault::EtcdDefrag { .. } | Fault::Raise { .. } => {}
            Fault::Restore { .. } => {
                for node in &mut self.nodes {
                    node.start().await?;
                }
            }
            Fault::EtcdKill { .. } | Fault::EtcdQuorum { .. } => {
                let targets = Self::etcd_targets(fault, at);
                let etcd = self
                    .etcd
                    .as_mut()
                    .context("etcd faults need --backend etcd")?;
                let started = std::time::Instant::now();
                etcd.start_members(&targets).await?;
                return Ok(Some(format!(
                    "restarted; serving again in {} ms",
                    started.elapsed().as_millis()
                )));
            }
        }
        Ok(None)
    }

    /// SIGTERM node `at` and waits (bounded) for it to exit; a leader hands its leadership on
    /// first. The outcome is the handoff's, as the node logged it: `handed_off`,
    /// `handoff_failed`, `no_handoff` (it no longer led), or `killed` when it did not exit
    /// within [`TERM_EXIT_MAX`].
    pub(super) async fn terminate(&mut self, at: usize) -> anyhow::Result<Applied> {
        let node = &mut self.nodes[at];
        let log_from = node.log_len();
        let stopped = node.terminate(TERM_EXIT_MAX).await?;
        Ok(handoff_outcome(stopped, &node.log_since(log_from)))
    }

    /// The switches of node `at`'s fault layer.
    fn disk(&self, at: usize) -> anyhow::Result<tso_faultfs::Control> {
        self.nodes[at]
            .disk()
            .with_context(|| format!("node {} has no fault layer", self.nodes[at].name))
    }

    /// The nodes a power loss hits: `at`, or every node.
    fn power_targets(&self, at: usize, every: bool) -> Vec<usize> {
        if every {
            (0..self.nodes.len()).collect()
        } else {
            vec![at]
        }
    }

    /// Power loss of node `at` (or of every node): `kill -9` whatever runs, then every write
    /// no fsync made durable is dropped (with `torn`, a write in flight lands partly).
    async fn power_loss(
        &mut self,
        at: usize,
        every: bool,
        torn: bool,
    ) -> anyhow::Result<Option<Applied>> {
        let targets = self.power_targets(at, every);
        for &i in &targets {
            self.nodes[i].kill().await?;
        }
        let mut notes = Vec::new();
        for &i in &targets {
            self.torn_seed += 1;
            let lost = self.disk(i)?.power_loss(torn.then_some(self.torn_seed));
            notes.push(format!(
                "node {}: {} file(s) and {} name(s) reverted, {} byte(s) lost, {} write(s) torn",
                self.nodes[i].name,
                lost.files_reverted,
                lost.names_reverted,
                lost.bytes_lost,
                lost.torn_writes
            ));
        }
        Ok(Some(Applied {
            outcome: "applied",
            note: Some(notes.join("; ")),
            hung: false,
        }))
    }

    /// Cuts (or heals) every peer link to and from node `at`.
    pub(super) fn cut(&self, at: usize, cut: bool) {
        for link in &self.links {
            if link.from == at || link.to == at {
                link.proxy.set_cut(cut);
            }
        }
    }

    /// Blackholes (`true`) or heals every link of oracle node `at` to the etcd members.
    fn cut_etcd(&self, at: usize, cut: bool) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.etcd_links.is_empty(),
            "etcd-cut faults need --backend etcd"
        );
        for (node, proxy) in &self.etcd_links {
            if *node == at {
                proxy.set_cut(cut);
            }
        }
        Ok(())
    }

    /// Makes the links between nodes `a` and `b`, both ways, hold every reply for `delay`.
    pub(super) fn slow(&self, a: usize, b: usize, delay: Duration) {
        for link in &self.links {
            if (link.from, link.to) == (a, b) || (link.from, link.to) == (b, a) {
                link.proxy.set_reply_delay(delay);
            }
        }
    }

    /// Stops every node gracefully (bounded), then the etcd cluster under them, if any.
    pub async fn stop(&mut self) {
        for node in &mut self.nodes {
            if let Err(err) = node.stop().await {
                eprintln!("tso check: stopping node {}: {err:#}", node.name);
            }
        }
        if let Some(etcd) = self.etcd.as_mut() {
            etcd.stop().await;
        }
    }
}

/// Whether the node at `endpoint` serves as leader now (a non-zero `GetCurrentMaxSafe`).
async fn leads(endpoint: &str) -> bool {
    let probe = async {
        let mut client = TsoServiceClient::connect(endpoint.to_string()).await.ok()?;
        let reply = client
            .get_current_max_safe(GetCurrentMaxSafeRequest {})
            .await
            .ok()?;
        Some(reply.into_inner().max_safe_physical_ms > 0)
    };
    matches!(
        tokio::time::timeout(LEADER_PROBE_TIMEOUT, probe).await,
        Ok(Some(true))
    )
}

/// What a SIGTERM'd node's exit and its log say of its handoff (see [`Cluster::terminate`]).
fn handoff_outcome(stopped: Stopped, log: &str) -> Applied {
    let (code, took) = match stopped {
        Stopped::Killed => {
            return Applied {
                outcome: "killed",
                note: Some(format!(
                    "did not exit within {TERM_EXIT_MAX:?} of SIGTERM: killed"
                )),
                hung: true,
            };
        }
        Stopped::NotRunning => {
            return Applied {
                outcome: "no_handoff",
                note: Some("was not running".into()),
                hung: false,
            };
        }
        Stopped::Exited { code, took } => (code, took),
    };
    let exit = match code {
        Some(0) => format!("exited in {} ms", took.as_millis()),
        Some(code) => format!("exited with status {code} in {} ms", took.as_millis()),
        None => format!("ended by a signal in {} ms", took.as_millis()),
    };
    let line_after = |mark: &str| {
        log.lines()
            .find_map(|l| l.split_once(mark).map(|(_, rest)| rest.trim().to_string()))
    };
    if let Some(rest) = line_after("handed leadership to node ") {
        return Applied {
            outcome: "handed_off",
            note: Some(format!("handed leadership to node {rest}; {exit}")),
            hung: false,
        };
    }
    if let Some(reason) = line_after("leadership handoff failed: ") {
        return Applied {
            outcome: "handoff_failed",
            note: Some(format!("handoff failed: {reason}; {exit}")),
            hung: false,
        };
    }
    Applied {
        outcome: "no_handoff",
        note: Some(format!("no handoff logged (not the leader); {exit}")),
        hung: false,
    }
}

/// `count` distinct free loopback ports (bound then released: another process could take one
/// in between, which makes the node's start fail with a clear error).
///
/// Picked below the kernel's ephemeral range: a port from `bind(0)` comes from that range, which
/// every outgoing connection (a client, a proxy, etcd's peers) also draws from, so one could take
/// it before the server started on it binds it. Picked at random (other runs pick too), each
/// checked free by a bind held until all are picked, so they are distinct.
pub(super) fn free_ports(count: usize) -> anyhow::Result<Vec<SocketAddr>> {
    use rand::Rng;
    const LOW: u16 = 10_000;
    let high = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|&low| low > LOW + 1_000)
        .unwrap_or(32_768);
    let mut rng = rand::rng();
    let mut held = Vec::with_capacity(count);
    for _ in 0..count * 1_000 {
        if held.len() == count {
            break;
        }
        let port = rng.random_range(LOW..high);
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
        }
    }
    anyhow::ensure!(
        held.len() == count,
        "no {count} free loopback ports between {LOW} and {high}"
    );
    held.iter()
        .map(|l| l.local_addr().context("reading a picked port"))
        .collect()
}

/// The name node `i` has in the members list; each node resolves it through its own hosts file.
fn peer_name(i: usize) -> String {
    format!("n{i}")
}

/// The raft `--members` list: `ID=CLIENT_ADDR/PEER_NAME:PORT/ADMIN_ADDR` for every slot.
fn raft_members(slots: &[Slot]) -> String {
    slots
        .iter()
        .enumerate()
        .map(|(i, slot)| slot.member(i))
        .collect::<Vec<_>>()
        .join(",")
}

/// Where the proxy of the link `from → to` listens: its own loopback address (any 127.x.y.z
/// is loopback on Linux), on the target's peer port.
fn link_addr(from: usize, to: usize, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 10 + from as u8, 10 + to as u8, 1], port))
}

/// The listen address of the proxy of the link from oracle node `node` to etcd member `member`
/// (whose client port is `port`): an address of its own on loopback, so no port is raced for.
fn etcd_link_addr(node: usize, member: usize, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 100 + node as u8, 10 + member as u8, 1], port))
}

/// Node `i`'s `/etc/hosts`: itself on 127.0.0.1, every other node at the proxy of the link
/// from `i` to it.
fn hosts_file(i: usize, nodes: usize) -> String {
    let mut text = format!("127.0.0.1 localhost\n127.0.0.1 {}\n", peer_name(i));
    for to in (0..nodes).filter(|&to| to != i) {
        text.push_str(&format!("{} {}\n", link_addr(i, to, 0).ip(), peer_name(to)));
    }
    text
}

fn write_hosts(dir: &Path, i: usize, nodes: usize) -> anyhow::Result<std::path::PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("hosts");
    std::fs::write(&path, hosts_file(i, nodes)).context("writing a node's hosts file")?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_name_client_peer_and_admin_addresses() {
        let slot = |id: u64, i: u16| Slot {
            id,
            client: format!("127.0.0.1:{}", 7000 + i).parse().unwrap(),
            peer: format!("127.0.0.1:{}", 7100 + i).parse().unwrap(),
            admin: format!("127.0.0.1:{}", 7200 + i).parse().unwrap(),
            member: true,
            kept_out: false,
        };
        let members = raft_members(&[slot(1, 1), slot(4, 2)]);
        assert_eq!(
            members,
            "1=127.0.0.1:7001/n0:7101/127.0.0.1:7201,4=127.0.0.1:7002/n1:7102/127.0.0.1:7202"
        );
        assert_eq!(
            slot(4, 2).peer_addr(1),
            "n1:7102",
            "what add-learner is given"
        );
    }

    #[test]
    fn a_handoff_is_told_from_the_nodes_log() {
        let exited = Stopped::Exited {
            code: Some(0),
            took: Duration::from_millis(14),
        };
        let handed = handoff_outcome(
            exited,
            "x INFO handing leadership to node 2\ny INFO handed leadership to node 2 in 9 ms (term 4)\n",
        );
        assert_eq!(handed.outcome, "handed_off");
        assert_eq!(
            handed.note.as_deref(),
            Some("handed leadership to node 2 in 9 ms (term 4); exited in 14 ms")
        );
        let failed = handoff_outcome(
            exited,
            "WARN leadership handoff failed: node 3 refused; the cluster elects a leader\n",
        );
        assert_eq!(failed.outcome, "handoff_failed");
        assert_eq!(
            handoff_outcome(exited, "INFO stopped\n").outcome,
            "no_handoff"
        );
        assert_eq!(handoff_outcome(Stopped::Killed, "").outcome, "killed");
    }

    #[test]
    fn each_node_reaches_each_peer_through_its_own_link() {
        assert_eq!(
            hosts_file(1, 3),
            "127.0.0.1 localhost\n127.0.0.1 n1\n127.11.10.1 n0\n127.11.12.1 n2\n"
        );
        assert_ne!(link_addr(0, 1, 7000), link_addr(1, 0, 7000));
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(6).unwrap();
        let mut unique = ports.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), 6);
    }
}
