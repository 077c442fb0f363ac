//! The `--members` list: `ID=HOST:CLIENT_PORT/PEER_PORT[/ADMIN_PORT]` entries, as `tso serve`
//! and `tso admin add` read them.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use tso_server::backend::raft::NodeAddrs;

/// Parses one `ID=HOST:CLIENT_PORT/PEER_PORT[/ADMIN_PORT]` member; each part after the first
/// may also be a full `HOST:PORT`.
pub fn parse_member(s: &str) -> anyhow::Result<(u64, NodeAddrs)> {
    let usage = || format!("member {s:?} is not ID=HOST:CLIENT_PORT/PEER_PORT[/ADMIN_PORT]");
    let (id, addrs) = s.split_once('=').with_context(usage)?;
    let id: u64 = id.trim().parse().with_context(usage)?;
    let parts: Vec<&str> = addrs.trim().split('/').collect();
    let (client_addr, peer, admin) = match parts[..] {
        [client, peer] => (client, peer, None),
        [client, peer, admin] => (client, peer, Some(admin)),
        _ => bail!(usage()),
    };
    let (host, port) = client_addr.rsplit_once(':').with_context(usage)?;
    anyhow::ensure!(!host.is_empty() && port.parse::<u16>().is_ok(), usage());
    let full = |part: &str| -> anyhow::Result<String> {
        if part.contains(':') {
            return Ok(part.to_owned());
        }
        let port: u16 = part.parse().with_context(usage)?;
        Ok(format!("{host}:{port}"))
    };
    Ok((
        id,
        NodeAddrs {
            client_addr: client_addr.to_owned(),
            peer_addr: full(peer)?,
            admin_addr: admin.map(full).transpose()?.unwrap_or_default(),
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
        assert_eq!(m[&1].admin_addr, "", "no admin part: unknown");
    }

    #[test]
    fn members_take_an_optional_admin_part() {
        let m = parse_members(&[
            "1=127.0.0.1:7001/7101/7201".to_owned(),
            "2=tso-2.tso:7001/10.0.0.2:7101/10.0.0.2:7201".to_owned(),
        ])
        .unwrap();
        assert_eq!(m[&1].peer_addr, "127.0.0.1:7101");
        assert_eq!(m[&1].admin_addr, "127.0.0.1:7201");
        assert_eq!(m[&2].admin_addr, "10.0.0.2:7201");
        for bad in ["1=h:1/2/3/4", "1=h:1/2/x", "1=h:1/2/"] {
            assert!(parse_members(&[bad.to_owned()]).is_err(), "{bad} accepted");
        }
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
