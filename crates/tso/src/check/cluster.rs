//! The local cluster a check runs against, and how faults are applied to it and healed.
//!
//! One node runs the file backend; 3 or 5 run `tso serve --backend raft` on loopback ports
//! picked at start, with the same members list. A fault aimed at "the leader" finds it through
//! the public protocol: the serving leader answers `GetCurrentMaxSafe` with a non-zero
//! watermark, followers with 0. A partition blackholes the loopback proxies of every directed
//! peer link of one node (see TESTING.md); clients still reach every node directly.

use std::path::Path;

use anyhow::Context;

use std::net::SocketAddr;
use std::time::Duration;

use tso_proto::v1::GetCurrentMaxSafeRequest;
use tso_proto::v1::tso_service_client::TsoServiceClient;

use super::proxy::LinkProxy;
use super::schedule::{Fault, Target};
use crate::node::Node;

/// How long finding the leader may ask one node before treating it as not leading.
const LEADER_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Hidden server flag of the positive control: the fence reads the durable high-water as 0.
pub const FORGET_HIGH_WATER_FLAG: &str = "--unsafe-forget-high-water";
/// Hidden server flag of the no-lease control: grants skip the leader lease check.
pub const NO_LEASE_FLAG: &str = "--unsafe-no-lease";
/// Hidden server flag of the sequence control: each new leader starts every sequence from 0.
pub const SEQ_FORGET_FLAG: &str = "--unsafe-seq-forget";
/// Hidden server flag of the lease control: each new leader starts with an empty lease set.
pub const LEASE_FORGET_FLAG: &str = "--unsafe-lease-forget";

pub struct Cluster {
    pub nodes: Vec<Node>,
    /// The proxy of every directed peer link `(from, to)` of a raft cluster.
    links: Vec<((usize, usize), LinkProxy)>,
}

impl Cluster {
    /// Starts `nodes` local servers under `dir`: one on the file backend, or a raft cluster.
    /// Every server also gets `unsafe_flags` (a positive control's broken server).
    pub async fn start(
        bin: &Path,
        dir: &Path,
        nodes: usize,
        unsafe_flags: &[&str],
    ) -> anyhow::Result<Cluster> {
        let mut common = vec!["--log".to_string(), "info".to_string()];
        common.extend(unsafe_flags.iter().map(|f| f.to_string()));
        let mut started = Vec::with_capacity(nodes);
        let mut links = Vec::new();
        if nodes == 1 {
            started.push(Node::new(bin, &dir.join("n0"), "n0", common, true)?);
        } else {
            let ports = free_ports(2 * nodes)?;
            let (clients, peers) = ports.split_at(nodes);
            let members = raft_members(clients, peers);
            for from in 0..nodes {
                for to in (0..nodes).filter(|&to| to != from) {
                    let proxy =
                        LinkProxy::start(link_addr(from, to, peers[to].port()), peers[to]).await?;
                    links.push(((from, to), proxy));
                }
            }
            for i in 0..nodes {
                let mut extra = vec![
                    "--backend".to_string(),
                    "raft".to_string(),
                    "--node-id".to_string(),
                    (i + 1).to_string(),
                    "--peer-addr".to_string(),
                    peers[i].to_string(),
                    "--members".to_string(),
                    members.clone(),
                ];
                extra.extend(common.iter().cloned());
                let name = format!("n{i}");
                let node_dir = dir.join(&name);
                let node = Node::new(bin, &node_dir, &name, extra, true)?
                    .with_listen(clients[i])
                    .with_hosts_file(write_hosts(&node_dir, i, nodes)?);
                started.push(node);
            }
        }
        for node in &mut started {
            node.start()
                .await
                .with_context(|| format!("starting node {}", node.name))?;
        }
        Ok(Cluster {
            nodes: started,
            links,
        })
    }

    /// The node a target names now; `None` when no running node leads.
    pub async fn resolve(&self, target: Target) -> Option<usize> {
        match target {
            Target::Node(i) => Some(i),
            Target::Leader if self.nodes.len() == 1 => Some(0),
            Target::Leader => {
                for (i, node) in self.nodes.iter().enumerate() {
                    if node.is_running() && leads(&node.endpoint()).await {
                        return Some(i);
                    }
                }
                None
            }
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(Node::endpoint).collect()
    }

    /// Starts a fault on node `at`. Returns `false` when it does not apply now (the node is
    /// down).
    pub async fn apply(&mut self, fault: Fault, at: usize) -> anyhow::Result<bool> {
        match fault {
            Fault::Kill { .. } => {
                let node = &mut self.nodes[at];
                if !node.is_running() {
                    return Ok(false);
                }
                node.kill().await?;
            }
            Fault::Pause { .. } => {
                let node = &mut self.nodes[at];
                if !node.is_running() {
                    return Ok(false);
                }
                node.pause()?;
            }
            Fault::Clock { offset_ms, .. } => self.nodes[at].set_clock_offset_ms(offset_ms)?,
            Fault::Partition { .. } => self.cut(at, true),
        }
        Ok(true)
    }

    /// Ends a fault on node `at`: restarts a killed node, resumes a paused one.
    pub async fn heal(&mut self, fault: Fault, at: usize) -> anyhow::Result<()> {
        match fault {
            Fault::Kill { .. } => {
                self.nodes[at].start().await?;
            }
            Fault::Pause { .. } => self.nodes[at].resume()?,
            Fault::Partition { .. } => self.cut(at, false),
            Fault::Clock { .. } => {}
        }
        Ok(())
    }

    /// Cuts (or heals) every peer link to and from node `at`.
    fn cut(&self, at: usize, cut: bool) {
        for ((from, to), proxy) in &self.links {
            if *from == at || *to == at {
                proxy.set_cut(cut);
            }
        }
    }

    /// Stops every node gracefully (bounded).
    pub async fn stop(&mut self) {
        for node in &mut self.nodes {
            if let Err(err) = node.stop().await {
                eprintln!("tso check: stopping node {}: {err:#}", node.name);
            }
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

/// `count` distinct free loopback ports (bound then released: another process could take one
/// in between, which makes the node's start fail with a clear error).
fn free_ports(count: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let listeners = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("picking free loopback ports")?;
    listeners
        .iter()
        .map(|l| l.local_addr().context("reading a picked port"))
        .collect()
}

/// The name node `i` has in the members list; each node resolves it through its own hosts file.
fn peer_name(i: usize) -> String {
    format!("n{i}")
}

/// The raft `--members` list: `ID=CLIENT_ADDR/PEER_NAME:PORT`, ids from 1. Peers are named, so
/// that each node reaches each other node through the proxy of that one link.
fn raft_members(clients: &[SocketAddr], peers: &[SocketAddr]) -> String {
    clients
        .iter()
        .zip(peers)
        .enumerate()
        .map(|(i, (client, peer))| format!("{}={client}/{}:{}", i + 1, peer_name(i), peer.port()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Where the proxy of the link `from → to` listens: its own loopback address (any 127.x.y.z
/// is loopback on Linux), on the target's peer port.
fn link_addr(from: usize, to: usize, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 10 + from as u8, 10 + to as u8, 1], port))
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
    fn members_name_client_and_peer_addresses() {
        let a: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:7101".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:7002".parse().unwrap();
        let d: SocketAddr = "127.0.0.1:7102".parse().unwrap();
        assert_eq!(
            raft_members(&[a, c], &[b, d]),
            "1=127.0.0.1:7001/n0:7101,2=127.0.0.1:7002/n1:7102"
        );
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
