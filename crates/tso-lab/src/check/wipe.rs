//! Lost data as faults (docs/semantics.md §12, "Cluster identity"): a member that lost its
//! durable state never takes part again under its old id.
//!
//! - **Log lost**: a follower is killed and its `raft-log` file deleted, its `raft-identity`
//!   kept; started again with the same flags it must refuse ("is incomplete"). A start is
//!   `started_partial`, a violation. Then the operator's repair: replace it under a new id.
//! - **Wholly wiped**: a follower is killed, its data directory emptied, and it is started
//!   again under its old id with the same flags. It runs, but the cluster recorded another
//!   incarnation for it: it is kept out (its peers log "answers from another data directory",
//!   it logs "was replaced") while the clients call. Then the documented remedy: `remove` the
//!   old id, stop it, and a new node joins under a new id.
//! - **Stale vote** (the trust-wiped control's opening): a follower B is cut off while the
//!   leader commits window extensions with the other follower A alone; the leader is killed, A
//!   is restarted wholly wiped under its old id and B's links heal. A server that counts A's
//!   empty vote elects B on a log without the last extensions, and B fences below timestamps
//!   already given out; a correct one keeps A out, and B waits for the leader to come back.
//!
//! While a wiped node runs under its old id its slot is `kept_out`: no fault targets it and no
//! admin call goes to it.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::admin_client::Change;
use super::cluster::{Applied, Cluster};
use super::schedule::{Loss, TRUST_WIPED_CLOCK_MS};
use crate::node::Started;

/// The raft log file of a data directory (the server's `log_store::LOG_FILE`).
const RAFT_LOG_FILE: &str = "raft-log";
/// What a node refusing an incomplete data directory says.
const REFUSED_MARK: &str = "is incomplete";
/// What a wiped node logs when it learns it was replaced.
const REPLACED_MARK: &str = "was replaced";
/// What the peers of a wiped node log of its requests and replies.
const OTHER_DIR_MARK: &str = "answers from another data directory";
/// How long the logs are watched for a sign that a wiped node is kept out: the leader's next
/// heartbeat (every 50 ms) carries the incarnations, so a second is plenty on a loaded machine.
const KEPT_OUT_WAIT: Duration = Duration::from_secs(3);
/// How often the logs are read while watching.
const KEPT_OUT_POLL: Duration = Duration::from_millis(100);

/// Bound on the repair that ends a stale-vote opening. A correct cluster repairs in a few
/// seconds (the old leader restarts and leads, the wiped node is removed and replaced); a
/// server that trusted the wiped node may have split into two cluster identities that can
/// never commit the removal, and the run, a violation already, should not wait out every
/// admin call's own bound.
const STALE_VOTE_REPAIR_MAX: Duration = Duration::from_secs(15);

/// The outcome of a node that started on a directory without its raft log: a violation.
pub const STARTED_PARTIAL: &str = "started_partial";

impl Cluster {
    /// Kills follower `at` and loses its data (`loss`), then starts it again with the same
    /// flags: refused without its log, kept out when wholly wiped.
    pub(super) async fn wipe(&mut self, at: usize, loss: Loss) -> anyhow::Result<Applied> {
        let id = self.slots()[at].id;
        self.nodes[at].kill().await?;
        match loss {
            Loss::Log => self.restart_without_log(at, id).await,
            Loss::Whole => self.restart_wiped(at, id).await,
        }
    }

    async fn restart_without_log(&mut self, at: usize, id: u64) -> anyhow::Result<Applied> {
        let node = &mut self.nodes[at];
        node.remove_data_file(RAFT_LOG_FILE)?;
        let log_from = node.log_len();
        let started = node.start_once().await?;
        let said = node.log_since(log_from);
        let named = said.contains(REFUSED_MARK);
        Ok(match started {
            Started::Exited { code: Some(code) } if code != 0 && named => Applied {
                outcome: "refused_partial",
                note: Some(format!(
                    "node {id} without its raft-log refused to start (exit {code})"
                )),
                hung: false,
            },
            Started::Serving(_) => Applied {
                outcome: STARTED_PARTIAL,
                note: Some(format!(
                    "node {id} started without its raft-log: a partial data directory was accepted"
                )),
                hung: false,
            },
            other => bail!(
                "node {id} without its raft-log ended {other:?} without saying its directory \
                 {REFUSED_MARK:?}: {}",
                last_lines(&said)
            ),
        })
    }

    async fn restart_wiped(&mut self, at: usize, id: u64) -> anyhow::Result<Applied> {
        let log_from: Vec<u64> = self.nodes.iter().map(|n| n.log_len()).collect();
        self.start_wiped(at)
            .await
            .with_context(|| format!("restarting node {id} wiped under its old id"))?;
        let seen = self.watch_kept_out(at, &log_from).await;
        Ok(Applied {
            outcome: if seen.is_some() {
                "wiped_kept_out"
            } else {
                "wiped_not_kept_out"
            },
            note: Some(format!(
                "node {id} restarted wiped under its old id; {}",
                seen.unwrap_or_else(|| format!("no sign it was kept out within {KEPT_OUT_WAIT:?}"))
            )),
            hung: false,
        })
    }

    /// Wipes the stopped node of slot `at` and starts it under its old id with its old flags.
    async fn start_wiped(&mut self, at: usize) -> anyhow::Result<()> {
        self.nodes[at].wipe_data()?;
        self.nodes[at].start().await?;
        self.raft.as_mut().expect("a raft cluster").slots[at].kept_out = true;
        Ok(())
    }

    /// Watches the logs (from the offsets `log_from`, one per slot) until the node of slot
    /// `at` says it was replaced or a peer says it answers from another directory; returns
    /// what was seen.
    async fn watch_kept_out(&self, at: usize, log_from: &[u64]) -> Option<String> {
        let deadline = Instant::now() + KEPT_OUT_WAIT;
        loop {
            if self.nodes[at]
                .log_since(log_from[at])
                .contains(REPLACED_MARK)
            {
                return Some(format!("it logged {REPLACED_MARK:?}"));
            }
            let peer = (0..self.nodes.len()).filter(|&i| i != at).find(|&i| {
                self.nodes[i]
                    .log_since(log_from[i])
                    .contains(OTHER_DIR_MARK)
            });
            if let Some(peer) = peer {
                return Some(format!(
                    "node {} logged that it {OTHER_DIR_MARK}",
                    self.slots()[peer].id
                ));
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(KEPT_OUT_POLL).await;
        }
    }

    /// Repairs slot `at` after a wipe, as an operator would. A node kept out is removed first
    /// (the documented remedy), then stopped, and a new node joins in its slot; a stopped node
    /// (its restart refused) or one that started on a partial directory is replaced (a new
    /// node joins, then the old id is removed).
    pub(super) async fn repair_wiped(&mut self, at: usize) -> anyhow::Result<String> {
        let old = self.slots()[at].id;
        if !(self.slots()[at].kept_out && self.nodes[at].is_running()) {
            self.nodes[at].kill().await?;
            return self.replace(at).await;
        }
        self.change(Change::Remove(old)).await?;
        self.mark_removed(old);
        self.nodes[at].kill().await?;
        self.nodes[at].wipe_data()?;
        let new = self.join_slot(at).await?;
        let voters = self.check_voters().await?;
        Ok(format!(
            "node {old} removed, node {new} joined in its place; voters {voters:?}"
        ))
    }

    /// The trust-wiped control's opening with `leader` leading (see the module's comment).
    /// `None` when the cluster does not have exactly two other voters running.
    pub(super) async fn stale_vote(
        &mut self,
        leader: usize,
        cut_ms: u64,
    ) -> anyhow::Result<Option<Applied>> {
        let followers: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| i != leader && self.nodes[i].is_running())
            .filter(|&i| self.slots()[i].member && !self.slots()[i].kept_out)
            .collect();
        let [a, b] = followers[..] else {
            return Ok(None);
        };
        let id = |i: usize| self.slots()[i].id;
        let (id_l, id_a, id_b) = (id(leader), id(a), id(b));
        self.nodes[b].set_clock_offset_ms(TRUST_WIPED_CLOCK_MS)?;
        self.cut(b, true);
        tokio::time::sleep(Duration::from_millis(cut_ms)).await;
        self.nodes[leader].kill().await?;
        self.nodes[a].kill().await?;
        self.stale_vote = Some((a, b));
        let started = self.start_wiped(a).await;
        self.cut(b, false);
        started.with_context(|| format!("restarting node {id_a} wiped under its old id"))?;
        Ok(Some(Applied {
            outcome: "stale_vote_opened",
            note: Some(format!(
                "node {id_l} led; node {id_b} was cut off for {cut_ms} ms, then node {id_l} \
                 was killed and node {id_a} restarted wiped under its old id"
            )),
            hung: false,
        }))
    }

    /// Ends the opening: restarts the old leader (slot `leader`), resets B's clock, repairs A.
    pub(super) async fn end_stale_vote(&mut self, leader: usize) -> anyhow::Result<String> {
        let (a, b) = self
            .stale_vote
            .take()
            .context("no stale-vote opening under way")?;
        self.nodes[b].set_clock_offset_ms(0)?;
        let id_l = self.slots()[leader].id;
        self.nodes[leader]
            .start()
            .await
            .with_context(|| format!("restarting node {id_l}"))?;
        let repaired = tokio::time::timeout(STALE_VOTE_REPAIR_MAX, self.repair_wiped(a))
            .await
            .with_context(|| {
                format!("repairing the wiped node took more than {STALE_VOTE_REPAIR_MAX:?}")
            })??;
        Ok(format!("node {id_l} restarted; {repaired}"))
    }
}

/// The last lines of a log excerpt, for an error message.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}
