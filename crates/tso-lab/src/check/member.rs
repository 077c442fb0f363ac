//! Membership changes as faults: the operator's procedures of docs/operations.md and
//! docs/membership.md, run through the real admin service while the clients call.
//!
//! - **Replacement**: stop a node (`kill -9`, or SIGTERM with its handoff), and after a while
//!   wipe its disk, start a new node with a new id in its slot (`tso serve --join`),
//!   `add-learner`, `promote`, then `remove` the old id: add before remove.
//! - **Shrink and grow back**: remove followers until two voters are left, then one of the two.
//!   Removing the leader of two is done as a naive operator would: `remove LEADER` first; a
//!   correct server refuses it (the survivor would elect itself at once while the leader still
//!   holds its lease) and names `transfer-leader`, so `transfer-leader OTHER`, then
//!   `remove OLD_LEADER` through the new leader. That last removal runs while the links between
//!   the two voters hold their replies a little (`schedule::LEADER_REMOVAL_SLOW_MS`), so that a
//!   server that lets the leader of two go shows two leaders. A removed node keeps running,
//!   without a role, until the cluster grows back: new nodes join the freed slots and are
//!   promoted.
//!
//! A new node keeps its slot's client address (clients keep one endpoint list, a pinned client
//! stays pinned to the slot) and gets new peer and admin ports, so that an old id still in the
//! membership never reaches the new process; its peer links go through proxies like every
//! other node's, so partitions cut it too. After each change the leader's view of the voters
//! must be the one the checker expects.

use std::time::Duration;

use anyhow::{Context, bail};

use super::admin_client::{self, Answer, Change};
use super::cluster::{Applied, Cluster, TERM_EXIT_MAX};
use super::schedule::Stop;
use crate::node::Stopped;

impl Cluster {
    /// Stops node `at` to replace it at the heal; `None` when it is down already.
    pub(super) async fn stop_to_replace(
        &mut self,
        at: usize,
        stop: Stop,
    ) -> anyhow::Result<Option<Applied>> {
        if !self.nodes[at].is_running() {
            return Ok(None);
        }
        let id = self.slots()[at].id;
        Ok(Some(match stop {
            Stop::Kill => {
                self.nodes[at].kill().await?;
                Applied {
                    outcome: "replace_kill",
                    note: Some(format!("killed node {id}")),
                    hung: false,
                }
            }
            Stop::Term => {
                let stopped = self.terminate(at).await?;
                Applied {
                    outcome: "replace_sigterm",
                    note: Some(format!("node {id}: {}", stopped.note.unwrap_or_default())),
                    hung: stopped.hung,
                }
            }
        }))
    }

    /// Replaces the stopped node of slot `at`: a new node joins on a wiped disk and is
    /// promoted, then the old id is removed.
    pub(super) async fn replace(&mut self, at: usize) -> anyhow::Result<String> {
        let old = self.slots()[at].id;
        self.nodes[at].wipe_data()?;
        let new = self.join_slot(at).await?;
        self.change(Change::Remove(old)).await?;
        let voters = self.check_voters().await?;
        Ok(format!("node {new} replaced node {old}; voters {voters:?}"))
    }

    /// Removes followers until two voters are left, then one of the two, the leader (see the
    /// module's comment) or the follower, while the links between the two hold their replies
    /// for `slow_ms`. A shrink that fails half-way grows back at once, so the faults after it
    /// find the cluster whole.
    pub(super) async fn shrink(
        &mut self,
        remove_leader: bool,
        slow_ms: u64,
    ) -> anyhow::Result<Option<Applied>> {
        match self.try_shrink(remove_leader, slow_ms).await {
            Ok(applied) => Ok(Some(applied)),
            Err(err) => match self.grow().await {
                Ok(_) => Err(err),
                Err(grow) => Err(err.context(format!("growing back failed too: {grow:#}"))),
            },
        }
    }

    async fn try_shrink(&mut self, remove_leader: bool, slow_ms: u64) -> anyhow::Result<Applied> {
        let view = admin_client::members(&self.admin_endpoints()).await?;
        let leader = view.leader_id.context("the members list names no leader")?;
        let mut voters = self.check_voters().await?;
        let mut removed = Vec::new();
        while voters.len() > 2 {
            let follower = *voters
                .iter()
                .find(|&&v| v != leader)
                .expect("three voters or more have followers");
            self.remove_voter(follower).await?;
            removed.push(follower);
            voters.retain(|&v| v != follower);
        }
        let follower = *voters.iter().find(|&&v| v != leader).expect("two voters");
        let slot_of = |id: u64| self.slots().iter().position(|s| s.id == id);
        let pair = slot_of(leader).zip(slot_of(follower));
        if let Some((a, b)) = pair {
            self.slow(a, b, Duration::from_millis(slow_ms));
        }
        let removal = if remove_leader {
            self.remove_leader_of_two(leader, follower).await
        } else {
            self.remove_voter(follower)
                .await
                .map(|()| "shrink_follower")
        };
        if let Some((a, b)) = pair {
            self.slow(a, b, Duration::ZERO);
        }
        let outcome = removal?;
        removed.push(if remove_leader { leader } else { follower });
        let left = self.check_voters().await?;
        Ok(Applied {
            outcome,
            note: Some(format!(
                "removed nodes {removed:?} (node {leader} led); voters {left:?}"
            )),
            hung: false,
        })
    }

    /// Removes `leader`, one of two voters with `other`: `remove` first; on the refusal that
    /// names `transfer-leader`, `transfer-leader OTHER` and `remove` again. Returns
    /// `shrink_leader_transferred`, or `shrink_leader_removed` when the server let the leader
    /// of two be removed at once.
    async fn remove_leader_of_two(
        &mut self,
        leader: u64,
        other: u64,
    ) -> anyhow::Result<&'static str> {
        let remove = Change::Remove(leader);
        let outcome = match admin_client::change(&self.admin_endpoints(), &remove).await? {
            Answer::Done => "shrink_leader_removed",
            Answer::Refused(status) if status.message().contains("transfer-leader") => {
                self.change(Change::TransferLeader(other)).await?;
                self.change(remove).await?;
                "shrink_leader_transferred"
            }
            Answer::Refused(status) => bail!(
                "remove {leader} (the leader of two voters) refused without naming \
                 transfer-leader: {:?}: {}",
                status.code(),
                status.message()
            ),
        };
        self.mark_removed(leader);
        Ok(outcome)
    }

    async fn remove_voter(&mut self, id: u64) -> anyhow::Result<()> {
        self.change(Change::Remove(id)).await?;
        self.mark_removed(id);
        Ok(())
    }

    pub(super) fn mark_removed(&mut self, id: u64) {
        for slot in &mut self.raft.as_mut().expect("a raft cluster").slots {
            if slot.id == id {
                slot.member = false;
            }
        }
    }

    /// Grows a shrunk cluster back: the removed nodes stop, and new nodes join their slots.
    pub(super) async fn grow(&mut self) -> anyhow::Result<String> {
        let freed: Vec<usize> = (0..self.slots().len())
            .filter(|&i| !self.slots()[i].member)
            .collect();
        let mut notes = Vec::new();
        for i in freed {
            let old = self.slots()[i].id;
            if self.nodes[i].terminate(TERM_EXIT_MAX).await? == Stopped::Killed {
                notes.push(format!(
                    "removed node {old} did not exit within {TERM_EXIT_MAX:?}: killed"
                ));
            }
            self.nodes[i].wipe_data()?;
            let new = self.join_slot(i).await?;
            notes.push(format!("node {new} joined in place of node {old}"));
        }
        let voters = self.check_voters().await?;
        notes.push(format!("voters {voters:?}"));
        Ok(notes.join("; "))
    }

    /// Starts a new node in the (stopped) slot `at`, with a new id and new peer and admin
    /// ports, waiting to join; adds it as a learner and promotes it. Returns its id.
    pub(super) async fn join_slot(&mut self, at: usize) -> anyhow::Result<u64> {
        assert!(!self.nodes[at].is_running(), "slot {at} still runs a node");
        let ports = super::cluster::free_ports(2)?;
        let raft = self.raft.as_mut().expect("a raft cluster");
        let old_peer = raft.slots[at].peer;
        let id = raft.next_id;
        raft.next_id += 1;
        let slot = &mut raft.slots[at];
        slot.id = id;
        slot.peer = ports[0];
        slot.admin = ports[1];
        slot.member = false;
        slot.kept_out = false;
        let client_addr = slot.client.to_string();
        let peer_addr = slot.peer_addr(at);
        let admin_addr = slot.admin.to_string();
        self.links.retain(|link| link.target != old_peer);
        self.proxy_links_to(at).await?;
        self.nodes[at] = self.raft_node(at, None)?;
        self.nodes[at]
            .start()
            .await
            .with_context(|| format!("starting node {id} to join"))?;
        self.change(Change::AddLearner {
            id,
            client_addr,
            peer_addr,
            admin_addr,
        })
        .await?;
        self.change(Change::Promote(id)).await?;
        self.raft.as_mut().expect("a raft cluster").slots[at].member = true;
        Ok(id)
    }

    /// Makes `change`, which must not be refused.
    pub(super) async fn change(&self, change: Change) -> anyhow::Result<()> {
        match admin_client::change(&self.admin_endpoints(), &change).await? {
            Answer::Done => Ok(()),
            Answer::Refused(status) => bail!(
                "{change} refused: {:?}: {}",
                status.code(),
                status.message()
            ),
        }
    }

    /// The leader's voters, which must be the ids of the member slots; returns them.
    pub(super) async fn check_voters(&self) -> anyhow::Result<Vec<u64>> {
        let view = admin_client::members(&self.admin_endpoints()).await?;
        let listed = admin_client::voters(&view);
        let mut expected: Vec<u64> = self
            .slots()
            .iter()
            .filter(|s| s.member)
            .map(|s| s.id)
            .collect();
        expected.sort_unstable();
        anyhow::ensure!(
            listed == expected && !view.joint,
            "node {} lists voters {listed:?}{}, the checker expects {expected:?}",
            view.node_id,
            if view.joint { " (joint)" } else { "" }
        );
        Ok(listed)
    }

    /// The admin addresses of the running members.
    fn admin_endpoints(&self) -> Vec<String> {
        self.slots()
            .iter()
            .zip(&self.nodes)
            .filter(|(slot, node)| slot.member && !slot.kept_out && node.is_running())
            .map(|(slot, _)| slot.admin.to_string())
            .collect()
    }

    pub(super) fn slots(&self) -> &[super::cluster::Slot] {
        &self
            .raft
            .as_ref()
            .expect("membership changes need a raft cluster")
            .slots
    }
}
