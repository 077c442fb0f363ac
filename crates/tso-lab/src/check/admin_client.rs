//! The nemesis's client of the admin service (`tso.admin.v1`), for membership changes while
//! the clients run.
//!
//! A change goes to any node; a "not leader" answer names the leader's admin address, which is
//! followed. Every change is idempotent on the node id, so it is retried as it is while the
//! cluster elects, while another change is under way, while a learner catches up, and across
//! lost connections, until [`CHANGE_TIMEOUT`]. A refusal (FAILED_PRECONDITION without a leader
//! hint, INVALID_ARGUMENT) comes back as it came: the caller decides what it means (a refused
//! removal of the leader of two voters is the cue for `transfer-leader`).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;
use tso_proto::tso::admin_v1 as pb;
use tso_proto::tso::admin_v1::admin_client::AdminClient;

/// Bound on one change with its retries: the leader waits up to 10 s for a change under way,
/// 10 s for a commit, 5 s for a learner to catch up and 10 s for a transfer; an election in
/// between takes about a second.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause before retrying after an answer that says "not now" (at most
/// `CHANGE_TIMEOUT / RETRY_PAUSE` = 600 attempts per change).
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Redirects followed in a row before pausing: one stale hint after an election, then the
/// leader.
const REDIRECTS_MAX: usize = 4;
/// How long connecting to an admin port may take (loopback: a refused port fails at once).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of one admin RPC: above the longest wait the leader itself bounds (a change
/// queued behind another for 10 s, then committed within 10 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(25);

/// One membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Add node `id` as a learner with its advertised addresses.
    AddLearner {
        id: u64,
        client_addr: String,
        peer_addr: String,
        admin_addr: String,
    },
    Promote(u64),
    Remove(u64),
    /// Move leadership to voter `id` (returns once it leads).
    TransferLeader(u64),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::AddLearner {
                id,
                client_addr,
                peer_addr,
                admin_addr,
            } => write!(f, "add-learner {id} {client_addr}/{peer_addr}/{admin_addr}"),
            Change::Promote(id) => write!(f, "promote {id}"),
            Change::Remove(id) => write!(f, "remove {id}"),
            Change::TransferLeader(id) => write!(f, "transfer-leader {id}"),
        }
    }
}

/// How the leader answered a change.
#[derive(Debug)]
pub enum Answer {
    /// Done, or already so.
    Done,
    /// Refused, with the leader's reason.
    Refused(tonic::Status),
}

/// Sends `change` to the nodes at `endpoints` (admin addresses, `host:port`), following the
/// leader and retrying what may pass later, until [`CHANGE_TIMEOUT`].
pub async fn change(endpoints: &[String], change: &Change) -> anyhow::Result<Answer> {
    anyhow::ensure!(
        !endpoints.is_empty(),
        "no admin endpoint to send {change} to"
    );
    let deadline = Instant::now() + CHANGE_TIMEOUT;
    let mut next = 0;
    let mut target = endpoints[0].clone();
    let mut redirects = 0;
    let mut last_error = String::from("no answer");
    while Instant::now() < deadline {
        let status = match call(&target, change).await {
            Ok(Ok(_)) => return Ok(Answer::Done),
            Ok(Err(status)) => status,
            Err(err) => {
                last_error = format!("{err:#}");
                next += 1;
                target = endpoints[next % endpoints.len()].clone();
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        last_error = format!("{target}: {:?}: {}", status.code(), status.message());
        if let Some(hint) = admin_hint(&status) {
            match hint.leader_admin_addr {
                Some(leader) if redirects < REDIRECTS_MAX && leader != target => {
                    redirects += 1;
                    target = leader;
                    continue;
                }
                _ => {
                    // No leader known yet, or hints that go round: ask another node shortly.
                    redirects = 0;
                    next += 1;
                    target = endpoints[next % endpoints.len()].clone();
                }
            }
        } else if !retried(change, &status) {
            return Ok(Answer::Refused(status));
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    bail!("{change} did not pass within {CHANGE_TIMEOUT:?}: last answer {last_error}")
}

/// Whether an answer without a leader hint may pass on a retry of the same change.
fn retried(change: &Change, status: &tonic::Status) -> bool {
    match status.code() {
        // Another change under way, an election that elected someone else, a commit without
        // a quorum yet, a lost connection: all pass once the cluster settles.
        Code::Aborted
        | Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Unknown => true,
        // A learner that has not caught up within the leader's own wait: it is catching up.
        Code::FailedPrecondition => {
            matches!(change, Change::Promote(_))
                && (status.message().contains("behind")
                    || status.message().contains("has not acknowledged"))
        }
        _ => false,
    }
}

async fn connect(endpoint: &str) -> anyhow::Result<AdminClient<Channel>> {
    let channel = Channel::from_shared(format!("http://{endpoint}"))
        .with_context(|| format!("{endpoint:?} is not an admin address"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .with_context(|| format!("cannot reach the admin service at {endpoint}"))?;
    Ok(AdminClient::new(channel))
}

/// One attempt: `Err` when the node could not be reached, else its answer.
async fn call(
    endpoint: &str,
    change: &Change,
) -> anyhow::Result<Result<pb::ChangeResponse, tonic::Status>> {
    let mut client = connect(endpoint).await?;
    let reply = match change.clone() {
        Change::AddLearner {
            id,
            client_addr,
            peer_addr,
            admin_addr,
        } => {
            client
                .add_learner(pb::AddLearnerRequest {
                    node_id: id,
                    client_addr,
                    peer_addr,
                    admin_addr,
                })
                .await
        }
        Change::Promote(node_id) => client.promote(pb::PromoteRequest { node_id }).await,
        Change::Remove(node_id) => client.remove(pb::RemoveRequest { node_id }).await,
        Change::TransferLeader(node_id) => {
            client
                .transfer_leader(pb::TransferLeaderRequest { node_id })
                .await
        }
    };
    Ok(reply.map(tonic::Response::into_inner))
}

/// The members as the leader sees them: asks the nodes at `endpoints` in turn until one knows
/// the leader, then the leader itself (when its admin address is known), until
/// [`CHANGE_TIMEOUT`].
pub async fn members(endpoints: &[String]) -> anyhow::Result<pb::ListMembersResponse> {
    anyhow::ensure!(!endpoints.is_empty(), "no admin endpoint to ask");
    let deadline = Instant::now() + CHANGE_TIMEOUT;
    let mut last_error = String::from("no answer");
    for endpoint in endpoints.iter().cycle() {
        if Instant::now() >= deadline {
            break;
        }
        match list(endpoint).await {
            Ok(reply) if reply.leader_id == Some(reply.node_id) => return Ok(reply),
            Ok(reply) => {
                if let Some(leader) = leader_admin_addr(&reply)
                    && let Ok(view) = list(&leader).await
                    && view.leader_id == Some(view.node_id)
                {
                    return Ok(view);
                }
                last_error = format!("{endpoint} knows no serving leader");
            }
            Err(err) => last_error = format!("{err:#}"),
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    bail!("no leader listed the members within {CHANGE_TIMEOUT:?}: {last_error}")
}

async fn list(endpoint: &str) -> anyhow::Result<pb::ListMembersResponse> {
    let mut client = connect(endpoint).await?;
    let reply = client
        .list_members(pb::ListMembersRequest {})
        .await
        .with_context(|| format!("listing the members at {endpoint}"))?;
    Ok(reply.into_inner())
}

/// The leader's admin address as `reply`'s membership knows it.
fn leader_admin_addr(reply: &pb::ListMembersResponse) -> Option<String> {
    let leader = reply.leader_id?;
    reply
        .members
        .iter()
        .find(|m| m.node_id == leader && !m.admin_addr.is_empty())
        .map(|m| m.admin_addr.clone())
}

/// The voters of a members list, sorted.
pub fn voters(reply: &pb::ListMembersResponse) -> Vec<u64> {
    reply
        .members
        .iter()
        .filter(|m| m.role == pb::Role::Voter as i32)
        .map(|m| m.node_id)
        .collect()
}

/// The admin leader hint of a "not leader" answer, if it is one.
fn admin_hint(status: &tonic::Status) -> Option<pb::AdminLeaderHint> {
    if status.code() != Code::FailedPrecondition {
        return None;
    }
    let bin = status
        .metadata()
        .get_bin(tso_proto::ADMIN_LEADER_HINT_KEY)?;
    let bytes = bin.to_bytes().ok()?;
    pb::AdminLeaderHint::decode(bytes.as_ref()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_answers_that_may_pass_later_are_retried() {
        let promote = Change::Promote(4);
        let remove = Change::Remove(1);
        let behind = tonic::Status::failed_precondition("learner 4 is 230 entries behind");
        assert!(retried(&promote, &behind));
        assert!(!retried(&remove, &behind));
        let refused = tonic::Status::failed_precondition(
            "removing voter 1 would leave node 2 as the only voter ... `tso admin transfer-leader 2`",
        );
        assert!(!retried(&remove, &refused));
        assert!(retried(&remove, &tonic::Status::aborted("another change")));
        assert!(retried(&remove, &tonic::Status::unavailable("no quorum")));
        assert!(!retried(&remove, &tonic::Status::invalid_argument("bad")));
    }

    #[test]
    fn a_not_leader_answer_carries_the_leaders_admin_address() {
        let hint = pb::AdminLeaderHint {
            leader_id: Some(2),
            leader_admin_addr: Some("127.0.0.1:7202".into()),
        };
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert_bin(
            tso_proto::ADMIN_LEADER_HINT_KEY,
            tonic::metadata::MetadataValue::from_bytes(&hint.encode_to_vec()),
        );
        let status = tonic::Status::with_metadata(Code::FailedPrecondition, "not leader", metadata);
        assert_eq!(admin_hint(&status), Some(hint));
        assert_eq!(admin_hint(&tonic::Status::failed_precondition("x")), None);
    }
}
