//! The local cluster a check runs against, and how faults are applied to it and healed.
//!
//! One node runs the file backend; 3 or 5 run `tso serve --backend raft` on loopback ports
//! picked at start, with the same members list. A fault aimed at "the leader" finds it through
//! the public protocol: the serving leader answers `GetCurrentMaxSafe` with a non-zero
//! watermark, followers with 0. Partitions (a loopback proxy per directed peer link that a
//! fault blackholes, see TESTING.md) are not here yet; they would plug in as one more fault.

use std::path::Path;

use anyhow::Context;

use std::net::SocketAddr;
use std::time::Duration;

use tso_proto::v1::GetCurrentMaxSafeRequest;
use tso_proto::v1::tso_service_client::TsoServiceClient;

use super::schedule::{Fault, Target};
use crate::node::Node;

/// How long finding the leader may ask one node before treating it as not leading.
const LEADER_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Hidden server flag of the positive control: the fence reads the durable high-water as 0.
pub const FORGET_HIGH_WATER_FLAG: &str = "--unsafe-forget-high-water";

pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `nodes` local servers under `dir`: one on the file backend, or a raft cluster.
    /// With `broken`, every server runs the positive control's fault (it forgets its
    /// high-water at each start).
    pub async fn start(
        bin: &Path,
        dir: &Path,
        nodes: usize,
        broken: bool,
    ) -> anyhow::Result<Cluster> {
        let mut common = vec!["--log".to_string(), "info".to_string()];
        if broken {
            common.push(FORGET_HIGH_WATER_FLAG.to_string());
        }
        let mut started = Vec::with_capacity(nodes);
        if nodes == 1 {
            started.push(Node::new(bin, &dir.join("n0"), "n0", common, true)?);
        } else {
            let ports = free_ports(2 * nodes)?;
            let (clients, peers) = ports.split_at(nodes);
            let members = raft_members(clients, peers);
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
                let node =
                    Node::new(bin, &dir.join(&name), &name, extra, true)?.with_listen(clients[i]);
                started.push(node);
            }
        }
        for node in &mut started {
            node.start()
                .await
                .with_context(|| format!("starting node {}", node.name))?;
        }
        Ok(Cluster { nodes: started })
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
            Fault::Clock { .. } => {}
        }
        Ok(())
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

/// The raft `--members` list: `ID=CLIENT_ADDR/PEER_ADDR`, ids from 1.
fn raft_members(clients: &[SocketAddr], peers: &[SocketAddr]) -> String {
    clients
        .iter()
        .zip(peers)
        .enumerate()
        .map(|(i, (client, peer))| format!("{}={client}/{peer}", i + 1))
        .collect::<Vec<_>>()
        .join(",")
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
            "1=127.0.0.1:7001/127.0.0.1:7101,2=127.0.0.1:7002/127.0.0.1:7102"
        );
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
