//! A raft node's view for the status call (`tso.ops.v1.GetStatus`): term, leader, log indexes,
//! members and, on the leader, how far each member's log lags. Read from openraft's metrics and
//! the log store's memory: no disk, no consensus round.

use tso_proto::tso::ops_v1::{PeerProgress, RaftStatus};

use super::RaftBackend;
use crate::ops::RaftStatusFn;

impl RaftBackend {
    /// A reader of this node's raft view, for [`crate::ops::NodeInfo::raft`].
    pub fn status_reader(&self) -> RaftStatusFn {
        let metrics = self.seam.raft.metrics();
        let log = self.log.clone();
        std::sync::Arc::new(move || {
            let m = metrics.borrow().clone();
            let last_log_index = m.last_log_index.unwrap_or(0);
            let membership = m.membership_config.membership();
            let peers = m
                .replication
                .as_ref()
                .map(|replication| {
                    replication
                        .iter()
                        .filter(|(id, _)| **id != m.id)
                        .map(|(id, matched)| {
                            let matched_index = matched.map_or(0, |l| l.index);
                            PeerProgress {
                                node_id: *id,
                                matched_index,
                                lag_entries: last_log_index.saturating_sub(matched_index),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            RaftStatus {
                term: m.current_term,
                leader_id: m.current_leader.unwrap_or(0),
                last_log_index,
                committed_index: log.committed().map_or(0, |c| c.index),
                applied_index: m.last_applied.map_or(0, |l| l.index),
                voters: membership.voter_ids().collect(),
                learners: membership.learner_ids().collect(),
                peers,
            }
        })
    }
}
