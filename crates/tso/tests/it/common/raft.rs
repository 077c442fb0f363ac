//! A raft cluster of real `tso serve` processes on loopback: node addresses, the `--members`
//! flag, starting a node, and waiting for a node to follow another.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tonic::transport::Channel;
use tso_proto::v1::GetTsRequest;
use tso_proto::v1::tso_service_client::TsoServiceClient;

use super::{HANG_GUARD, Server, free_port, tso_bin};

/// One node of a test cluster: its id and its client and peer ports on 127.0.0.1.
pub struct RaftNode {
    pub id: u64,
    pub client_port: u16,
    pub peer_port: u16,
}

impl RaftNode {
    /// The client address, `127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Starts this node with its data under `dir` and waits for its `serving on` line. `None`
    /// starts it without `--members`, as a restart may.
    pub fn start(&self, dir: &Path, members: Option<&str>) -> Server {
        self.start_with(dir, members, &[])
    }

    /// [`Self::start`] with `extra` flags.
    pub fn start_with(&self, dir: &Path, members: Option<&str>, extra: &[&str]) -> Server {
        let mut command = Command::new(tso_bin());
        command
            .args([
                "serve",
                "--backend",
                "raft",
                "--node-id",
                &self.id.to_string(),
            ])
            .args(["--listen", &self.endpoint()])
            .args(["--peer-addr", &format!("127.0.0.1:{}", self.peer_port)])
            .arg("--data-dir")
            .arg(dir.join(format!("node-{}", self.id)));
        if let Some(members) = members {
            command.args(["--members", members]);
        }
        command.args(extra);
        Server::spawn(command)
            .unwrap_or_else(|(status, log)| panic!("node {} exited with {status}: {log}", self.id))
    }

    /// A plaintext client of this node that connects on first use, with short timeouts so
    /// that polling a dead node moves on quickly.
    pub fn connect(&self) -> TsoServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.endpoint()))
            .unwrap()
            .connect_timeout(Duration::from_millis(200))
            .timeout(Duration::from_millis(500))
            .connect_lazy();
        TsoServiceClient::new(channel)
    }
}

/// `n` nodes with ids 1..=n on free ports.
pub fn raft_nodes(n: u64) -> Vec<RaftNode> {
    (1..=n)
        .map(|id| RaftNode {
            id,
            client_port: free_port(),
            peer_port: free_port(),
        })
        .collect()
}

/// The `--members` flag for `nodes`: `ID=HOST:CLIENT/PEER,...`.
pub fn members(nodes: &[RaftNode]) -> String {
    nodes
        .iter()
        .map(|n| format!("{}=127.0.0.1:{}/{}", n.id, n.client_port, n.peer_port))
        .collect::<Vec<_>>()
        .join(",")
}

/// Waits (hang guard only) until `node` answers "not leader" with a hint naming `leader`.
pub async fn wait_follows(node: &RaftNode, leader: &RaftNode) {
    use prost::Message;
    let want = leader.endpoint();
    let mut client = node.connect();
    let wait = async {
        loop {
            if let Err(status) = client.get_ts(GetTsRequest { count: 1 }).await
                && let Some(bin) = status.metadata().get_bin(tso_proto::LEADER_HINT_KEY)
                && let Ok(bytes) = bin.to_bytes()
                && let Ok(hint) = tso_proto::v1::LeaderHint::decode(bytes.as_ref())
                && hint.leader_endpoint.as_deref() == Some(want.as_str())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(HANG_GUARD, wait)
        .await
        .unwrap_or_else(|_| panic!("node {} never followed node {}", node.id, leader.id));
}
