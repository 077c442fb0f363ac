//! The local cluster a check runs against, and how faults are applied to it and healed.
//!
//! Today a cluster is one node on the file backend. A raft cluster plugs in here: its nodes
//! get their peer flags through `Node`'s extra arguments, a loopback proxy per directed peer
//! link goes in front of every peer address, and a partition fault cuts proxies; the schedule
//! and the history checks do not change.

use std::path::Path;

use anyhow::{Context, bail};

use super::schedule::Fault;
use crate::node::Node;

/// Hidden server flag of the positive control: the fence reads the durable high-water as 0.
pub const FORGET_HIGH_WATER_FLAG: &str = "--unsafe-forget-high-water";

pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `nodes` local servers under `dir`. With `broken`, every server runs the
    /// positive control's fault (it forgets its high-water at each start).
    pub async fn start(
        bin: &Path,
        dir: &Path,
        nodes: usize,
        broken: bool,
    ) -> anyhow::Result<Cluster> {
        if nodes != 1 {
            bail!(
                "a {nodes}-node cluster needs the raft backend, which this build lacks; \
                 use --nodes 1 (file backend) or --endpoints to attach to a running cluster"
            );
        }
        let mut extra = vec!["--log".to_string(), "info".to_string()];
        if broken {
            extra.push(FORGET_HIGH_WATER_FLAG.to_string());
        }
        let mut node = Node::new(bin, &dir.join("n0"), "n0", extra, true)?;
        node.start().await.context("starting node n0")?;
        Ok(Cluster { nodes: vec![node] })
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(Node::endpoint).collect()
    }

    /// Starts a fault. Returns `false` when it does not apply now (its node is down).
    pub async fn apply(&mut self, fault: Fault) -> anyhow::Result<bool> {
        match fault {
            Fault::Kill { node, .. } => {
                let node = &mut self.nodes[node];
                if !node.is_running() {
                    return Ok(false);
                }
                node.kill().await?;
            }
            Fault::Pause { node, .. } => {
                let node = &mut self.nodes[node];
                if !node.is_running() {
                    return Ok(false);
                }
                node.pause()?;
            }
            Fault::Clock { node, offset_ms } => self.nodes[node].set_clock_offset_ms(offset_ms)?,
        }
        Ok(true)
    }

    /// Ends a fault: restarts a killed node, resumes a paused one.
    pub async fn heal(&mut self, fault: Fault) -> anyhow::Result<()> {
        match fault {
            Fault::Kill { node, .. } => {
                self.nodes[node].start().await?;
            }
            Fault::Pause { node, .. } => self.nodes[node].resume()?,
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
