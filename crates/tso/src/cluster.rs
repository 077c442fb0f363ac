//! `tso serve --backend raft`: flags to a [`RaftConfig`], the peer server, and the members list.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use tso_server::backend::raft::{Links, NodeAddrs, RaftConfig, RaftTimings, SnapshotOptions};

use crate::cli::ServeArgs;

/// Parses one `ID=HOST:CLIENT_PORT/PEER_PORT` (or `ID=CLIENT_ADDR/PEER_ADDR`) member.
pub fn parse_member(s: &str) -> anyhow::Result<(u64, NodeAddrs)> {
    let usage = || format!("member {s:?} is not ID=HOST:CLIENT_PORT/PEER_PORT");
    let (id, addrs) = s.split_once('=').with_context(usage)?;
    let id: u64 = id.trim().parse().with_context(usage)?;
    let (client_addr, peer) = addrs.trim().split_once('/').with_context(usage)?;
    let (host, _) = client_addr.rsplit_once(':').with_context(usage)?;
    let peer_addr = if peer.contains(':') {
        peer.to_owned()
    } else {
        let port: u16 = peer.parse().with_context(usage)?;
        format!("{host}:{port}")
    };
    Ok((
        id,
        NodeAddrs {
            client_addr: client_addr.to_owned(),
            peer_addr,
        },
    ))
}

/// The members list of the flags (empty when not given).
pub fn parse_members(list: &[String]) -> anyhow::Result<BTreeMap<u64, NodeAddrs>> {
    let mut members = BTreeMap::new();
    for s in list.iter().filter(|s| !s.trim().is_empty()) {
        let (id, addrs) = parse_member(s)?;
        if members.insert(id, addrs).is_some() {
            bail!("member id {id} appears twice in --members");
        }
    }
    Ok(members)
}

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
    if let Some(own) = members.get(&node_id) {
        check_advertised("client", &c.advertise_client_addr, &own.client_addr)?;
        check_advertised("peer", &c.advertise_peer_addr, &own.peer_addr)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_parse_in_both_forms() {
        let m = parse_members(&[
            "1=127.0.0.1:7001/7101".to_owned(),
            "2=tso-2.tso:7001/10.0.0.2:7101".to_owned(),
        ])
        .unwrap();
        assert_eq!(m[&1].client_addr, "127.0.0.1:7001");
        assert_eq!(m[&1].peer_addr, "127.0.0.1:7101");
        assert_eq!(m[&2].client_addr, "tso-2.tso:7001");
        assert_eq!(m[&2].peer_addr, "10.0.0.2:7101");
    }

    #[test]
    fn bad_members_are_refused() {
        for bad in ["1=127.0.0.1:7001", "x=h:1/2", "1=h/2", "1=h:1/port"] {
            assert!(parse_members(&[bad.to_owned()]).is_err(), "{bad} accepted");
        }
        let twice = ["1=h:1/2".to_owned(), "1=h:3/4".to_owned()];
        assert!(parse_members(&twice).is_err());
    }
}
