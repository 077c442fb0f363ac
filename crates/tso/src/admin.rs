//! `tso admin`: the raft cluster's membership through a node's admin service (`tso.admin.v1`).
//! Changes go to the leader: a "not leader" answer names the leader's admin address, which is
//! followed (a bounded number of times); while no leader is known the call is retried until
//! `--timeout`.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use prost::Message;
use tonic::transport::{Channel, ClientTlsConfig};
use tso_proto::tso::admin_v1 as pb;
use tso_proto::tso::admin_v1::admin_client::AdminClient;

use crate::members::parse_member;
use crate::tls::ClientTlsArgs;

/// Redirects followed for one command. A cluster points at its one leader, so two are enough
/// (one stale hint after an election, then the leader); more means hints disagree.
const REDIRECTS_MAX: usize = 4;

/// Pause before asking again while no leader is known (an election takes under a second).
const NO_LEADER_RETRY: Duration = Duration::from_millis(250);

/// How long a connection attempt to an admin endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    pub action: AdminAction,
    /// A node's admin address (`host:port` or `http://host:port`, its `--admin-listen`); changes
    /// are sent on to the leader.
    #[arg(long, global = true, env = "TSO_ADMIN_ENDPOINT")]
    pub endpoint: Option<String>,
    /// Bound on the whole command, redirects and retries included (a change waits for the one
    /// before it, and a promotion for the learner to catch up).
    #[arg(long, global = true, default_value = "40s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// TLS to admin ports started with --admin-tls-*: --tls-ca, and the operator's certificate
    /// (--tls-cert, --tls-key), which those ports require. Give them before the action.
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

#[derive(Debug, Subcommand)]
pub enum AdminAction {
    /// Print the members: id, role, addresses, and who leads (the leader's view, if reachable).
    Members {
        /// Print the view of the node at --endpoint instead of the leader's.
        #[arg(long)]
        local: bool,
    },
    /// Add a node (started with `tso serve --join`) as a learner.
    AddLearner {
        node_id: u64,
        /// `HOST:CLIENT_PORT/PEER_PORT[/ADMIN_PORT]`, as in `--members` (each part after the
        /// first may be a full `HOST:PORT`).
        addrs: String,
    },
    /// Make a caught-up learner a voter.
    Promote { node_id: u64 },
    /// Remove a voter or a learner (refused if the rest would lose their quorum, and for the
    /// leader when one other voter would be left: transfer leadership first).
    Remove { node_id: u64 },
    /// Hand leadership to a caught-up voter; returns once it leads. The leader stops granting
    /// at once and clients follow the hint to the new leader, so callers see a short pause.
    TransferLeader { node_id: u64 },
    /// Raise a running oracle's high-water so that every later timestamp is above a
    /// millisecond (moving from another oracle without downtime). Any backend: it goes to the
    /// leader's client port (--endpoints), not the admin port; forward only.
    Raise(crate::ops::RaiseArgs),
}

pub fn run(args: AdminArgs) -> anyhow::Result<()> {
    if let AdminAction::Raise(raise) = args.action {
        return crate::ops::raise(raise, &args.tls);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let timeout = args.timeout;
    runtime.block_on(async move {
        tokio::time::timeout(timeout, run_async(args))
            .await
            .unwrap_or_else(|_| bail!("no answer within --timeout {timeout:?}"))
    })
}

async fn run_async(args: AdminArgs) -> anyhow::Result<()> {
    let endpoint = args
        .endpoint
        .context("give --endpoint, a node's admin address (its --admin-listen)")?;
    let tls = args.tls.load()?.map(|tls| tls.tonic_config());
    let dial = Dial { tls: tls.as_ref() };
    match args.action {
        AdminAction::Raise(_) => unreachable!("run sends a raise to the client port"),
        AdminAction::Members { local } => {
            let mut reply = list(dial, &endpoint).await?;
            let leader_admin = leader_admin_addr(&reply);
            if !local
                && reply.leader_id != Some(reply.node_id)
                && let Some(leader) = leader_admin
            {
                match list(dial, &leader).await {
                    Ok(leader_view) => reply = leader_view,
                    Err(e) => eprintln!(
                        "tso: the leader at {leader} did not answer ({e:#}); showing node {}'s view",
                        reply.node_id
                    ),
                }
            }
            print_members(&reply);
            Ok(())
        }
        AdminAction::AddLearner { node_id, addrs } => {
            let (_, addrs) = parse_member(&format!("{node_id}={addrs}"))?;
            let request = pb::AddLearnerRequest {
                node_id,
                client_addr: addrs.client_addr,
                peer_addr: addrs.peer_addr,
                admin_addr: addrs.admin_addr,
            };
            let reply = change(dial, &endpoint, |mut c| {
                let r = request.clone();
                async move { c.add_learner(r).await }
            })
            .await?;
            report(
                &reply,
                &format!("added node {node_id} as a learner"),
                &format!("node {node_id} already is a member with these addresses"),
            );
            Ok(())
        }
        AdminAction::Promote { node_id } => {
            let reply = change(dial, &endpoint, |mut c| async move {
                c.promote(pb::PromoteRequest { node_id }).await
            })
            .await?;
            report(
                &reply,
                &format!("promoted node {node_id} to voter"),
                &format!("node {node_id} already is a voter"),
            );
            Ok(())
        }
        AdminAction::Remove { node_id } => {
            let reply = change(dial, &endpoint, |mut c| async move {
                c.remove(pb::RemoveRequest { node_id }).await
            })
            .await?;
            report(
                &reply,
                &format!("removed node {node_id}"),
                &format!("node {node_id} is not a member"),
            );
            Ok(())
        }
        AdminAction::TransferLeader { node_id } => {
            let reply = change(dial, &endpoint, |mut c| async move {
                c.transfer_leader(pb::TransferLeaderRequest { node_id })
                    .await
            })
            .await?;
            report(
                &reply,
                &format!("node {node_id} leads now"),
                &format!("node {node_id} already leads"),
            );
            Ok(())
        }
    }
}

fn report(reply: &pb::ChangeResponse, done: &str, already: &str) {
    if reply.changed {
        println!("{done}");
    } else {
        println!("{already}: nothing to change");
    }
    if let Some(members) = &reply.members {
        print_members(members);
    }
}

/// How admin endpoints are dialed: over TLS when `tso admin` was given `--tls-ca` (then a
/// scheme-less address, as hints are, means `https`).
#[derive(Clone, Copy)]
struct Dial<'a> {
    tls: Option<&'a ClientTlsConfig>,
}

async fn connect(dial: Dial<'_>, endpoint: &str) -> anyhow::Result<AdminClient<Channel>> {
    let uri = match (endpoint.contains("://"), dial.tls) {
        (true, _) => endpoint.to_owned(),
        (false, Some(_)) => format!("https://{endpoint}"),
        (false, None) => format!("http://{endpoint}"),
    };
    let mut channel = Channel::from_shared(uri.clone())
        .with_context(|| format!("{endpoint:?} is not an admin address (host:port)"))?
        .connect_timeout(CONNECT_TIMEOUT);
    if uri.starts_with("https://") {
        let tls = dial.tls.with_context(|| {
            format!("{endpoint} is an https address: give --tls-ca (and --tls-cert, --tls-key)")
        })?;
        channel = channel
            .tls_config(tls.clone())
            .with_context(|| format!("the TLS configuration for {endpoint}"))?;
    }
    let channel = channel
        .connect()
        .await
        .with_context(|| format!("cannot reach the admin service at {endpoint}"))?;
    Ok(AdminClient::new(channel))
}

async fn list(dial: Dial<'_>, endpoint: &str) -> anyhow::Result<pb::ListMembersResponse> {
    let mut client = connect(dial, endpoint).await?;
    let reply = client
        .list_members(pb::ListMembersRequest {})
        .await
        .map_err(|s| status_error(endpoint, &s))?;
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

/// Sends a change to `endpoint`, following "not leader" hints to the leader.
async fn change<F, Fut>(
    dial: Dial<'_>,
    endpoint: &str,
    call: F,
) -> anyhow::Result<pb::ChangeResponse>
where
    F: Fn(AdminClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<pb::ChangeResponse>, tonic::Status>>,
{
    let mut target = endpoint.to_owned();
    let mut redirects = 0;
    loop {
        let client = connect(dial, &target).await?;
        let status = match call(client).await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status) => status,
        };
        let Some(hint) = admin_hint(&status) else {
            return Err(status_error(&target, &status));
        };
        match (hint.leader_id, hint.leader_admin_addr) {
            (Some(_), Some(leader)) if redirects < REDIRECTS_MAX => {
                eprintln!("tso: {target} is not the leader; following to the leader at {leader}");
                redirects += 1;
                target = leader;
            }
            (Some(leader), Some(addr)) => bail!(
                "gave up after {REDIRECTS_MAX} redirects (last: node {leader} at {addr}); \
                 the nodes disagree on who leads, retry shortly"
            ),
            (Some(leader), None) => bail!(
                "{target} is not the leader; the leader is node {leader}, whose admin address \
                 the membership does not know: run this against its --admin-listen address"
            ),
            (None, _) => {
                eprintln!("tso: {target} knows no leader yet; retrying");
                tokio::time::sleep(NO_LEADER_RETRY).await;
            }
        }
    }
}

/// The admin leader hint of a "not leader" answer, if it is one.
fn admin_hint(status: &tonic::Status) -> Option<pb::AdminLeaderHint> {
    let bin = status
        .metadata()
        .get_bin(tso_proto::ADMIN_LEADER_HINT_KEY)?;
    let bytes = bin.to_bytes().ok()?;
    pb::AdminLeaderHint::decode(bytes.as_ref()).ok()
}

fn status_error(endpoint: &str, status: &tonic::Status) -> anyhow::Error {
    use tonic::Code;
    let what = match status.code() {
        Code::FailedPrecondition | Code::InvalidArgument => "refused",
        Code::Aborted => "refused for now",
        Code::Unavailable => "unavailable",
        Code::Unimplemented => "has no admin service",
        _ => "failed",
    };
    anyhow::anyhow!("{endpoint} {what}: {}", status.message())
}

fn print_members(reply: &pb::ListMembersResponse) {
    match reply.leader_id {
        Some(leader) => println!(
            "leader: node {leader}, term {} (as node {} sees it){}",
            reply.term,
            reply.node_id,
            if reply.joint {
                "; a change is half-way (joint configuration)"
            } else {
                ""
            }
        ),
        None => println!(
            "leader: none known (term {}, as node {} sees it)",
            reply.term, reply.node_id
        ),
    }
    let rows: Vec<[String; 6]> = reply
        .members
        .iter()
        .map(|m| {
            let role = match pb::Role::try_from(m.role) {
                Ok(pb::Role::Voter) if reply.leader_id == Some(m.node_id) => "voter, leader",
                Ok(pb::Role::Voter) => "voter",
                Ok(pb::Role::Learner) => "learner",
                _ => "?",
            };
            let or_dash = |s: &str| {
                if s.is_empty() {
                    "-".to_owned()
                } else {
                    s.to_owned()
                }
            };
            [
                m.node_id.to_string(),
                role.to_owned(),
                or_dash(&m.client_addr),
                or_dash(&m.peer_addr),
                or_dash(&m.admin_addr),
                m.matched_index.map_or("-".to_owned(), |i| i.to_string()),
            ]
        })
        .collect();
    let header = ["ID", "ROLE", "CLIENT", "PEER", "ADMIN", "MATCHED"].map(str::to_owned);
    let mut widths = [0; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
