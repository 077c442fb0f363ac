//! `tso serve --backend raft`: flags to a [`RaftConfig`], the peer server, and the members list.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tso_server::backend::raft::{Links, RaftBackend, RaftConfig, RaftTimings, SnapshotOptions};

use crate::cli::ServeArgs;
use crate::members::parse_members;

/// The raft configuration the flags describe, and the address to listen on for peers. A
/// routable peer listener needs peer TLS, or `--insecure`.
pub fn raft_config(args: &ServeArgs) -> anyhow::Result<(RaftConfig, SocketAddr)> {
    let c = &args.cluster;
    let node_id = c.node_id.context("--backend raft needs --node-id")?;
    let peer_listen = c
        .peer_addr
        .context("--backend raft needs --peer-addr (the address to listen on for peers)")?;
    let peer_tls = args.tls.peer()?;
    crate::tls::require_tls_or_insecure(
        "raft peer listener (--peer-addr)",
        peer_listen,
        peer_tls.is_some(),
        args.tls.insecure,
        "--peer-tls-cert, --peer-tls-key and --peer-tls-ca",
    )?;
    let members = parse_members(&c.members)?;
    if c.join && !members.is_empty() {
        bail!(
            "--join waits to be added to a running cluster and takes no --members; drop one of them"
        );
    }
    if let Some(own) = members.get(&node_id) {
        check_advertised("client", &c.advertise_client_addr, &own.client_addr)?;
        check_advertised("peer", &c.advertise_peer_addr, &own.peer_addr)?;
        if !own.admin_addr.is_empty() && c.admin_listen.is_none() {
            tracing::warn!(
                admin_addr = %own.admin_addr,
                "this node's entry in --members names an admin address, but --admin-listen is not \
                 given: `tso admin` redirects to it will fail"
            );
        }
    } else if !members.is_empty() {
        bail!(
            "node {node_id} is not in --members (ids {:?}); add it, with the same list on every node",
            members.keys().collect::<Vec<_>>()
        );
    }
    let config = RaftConfig {
        node_id,
        data_dir: args.data_dir.clone(),
        initial_members: members,
        join: c.join,
        snapshot: SnapshotOptions::default(),
        timings: RaftTimings {
            heartbeat_interval: c.heartbeat_interval,
            election_timeout_min: c.election_timeout_min,
            election_timeout_max: c.election_timeout_max,
            ..RaftTimings::default()
        },
        links: Links::default(),
        peer_tls,
    };
    Ok((config, peer_listen))
}

/// Binds `--admin-listen`, if given (before the node starts, so a taken port fails the start).
pub async fn bind_admin(args: &ServeArgs) -> anyhow::Result<Option<AdminListener>> {
    let Some(addr) = args.cluster.admin_listen else {
        anyhow::ensure!(
            !args.tls.has_admin_flags(),
            "--admin-tls-* apply to the admin port: give --admin-listen too"
        );
        return Ok(None);
    };
    let tls = args.tls.admin_port()?;
    crate::tls::require_tls_or_insecure(
        "admin listener (--admin-listen)",
        addr,
        tls.is_some(),
        args.tls.insecure,
        "--admin-tls-cert, --admin-tls-key and --admin-tls-ca",
    )?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot serve admin on {addr}: pick another --admin-listen"))?;
    Ok(Some(AdminListener { listener, tls }))
}

/// The bound admin port and its TLS (mutual, from `--admin-tls-*`), if any.
pub struct AdminListener {
    listener: TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

/// Serves the admin service (`tso.admin.v1`) on `admin` until `stop`. One tonic server of its
/// own, so that its TLS is apart from the client port's.
pub fn serve_admin(
    admin: Option<AdminListener>,
    backend: &RaftBackend,
    unsafe_allow_leader_removal: bool,
    stop: CancellationToken,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    let Some(AdminListener { listener, tls }) = admin else {
        return Ok(None);
    };
    let secure = tls.is_some();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .context("the TLS configuration of the admin port")?;
    }
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, tls = secure, "serving admin");
    }
    let mut admin = backend.admin();
    if unsafe_allow_leader_removal {
        tracing::warn!(
            "UNSAFE: the leader of two voters may be removed; this server breaks its guarantees on purpose"
        );
        admin = admin.unsafe_allow_leader_removal();
        backend.unsafe_ungate_elections();
    }
    let server = builder.add_service(admin.into_server());
    Ok(Some(tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let stopped = async move { stop.cancelled().await };
        if let Err(e) = server.serve_with_incoming_shutdown(incoming, stopped).await {
            tracing::error!("the admin server failed: {e}");
        }
    })))
}

/// An explicit `--advertise-*` flag must agree with the node's own entry in the members list,
/// since the list is what peers and hints use.
fn check_advertised(kind: &str, flag: &Option<String>, listed: &str) -> anyhow::Result<()> {
    match flag {
        Some(given) if given != listed => bail!(
            "--advertise-{kind}-addr {given} differs from this node's entry {listed} in --members; \
             make them the same"
        ),
        _ => Ok(()),
    }
}
