//! The etcd cluster a check on the etcd backend (`--backend etcd`) runs its oracle nodes on:
//! [`ETCD_MEMBERS`] local etcd processes, `m0` to `m2`, each with its data directory and log
//! under `etcd/` of the work directory, on free loopback ports picked at start and kept for
//! every restart. The nemesis kills members (`kill -9`) and restarts them on their data,
//! compacts the keyspace and defragments members, and asks each member whether it leads.
//!
//! Children are killed when the cluster is dropped, and when the thread that started them ends
//! (`PR_SET_PDEATHSIG`), so a failed or killed run leaves no etcd behind.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};
use tso_proto::etcd::kv_client::KvClient;
use tso_proto::etcd::maintenance_client::MaintenanceClient;
use tso_proto::etcd::{CompactionRequest, DefragmentRequest, RangeRequest, StatusRequest};

use super::cluster::free_ports;
use super::schedule::ETCD_MEMBERS;

/// Where Debian's `etcd-server` installs etcd; else `etcd` on the PATH.
const ETCD_BIN: &str = "/usr/bin/etcd";
/// What etcd logs once it serves clients (after its cluster has a leader and it published
/// itself).
const READY: &str = "ready to serve client requests";
/// How long a member may take to serve: a start needs a quorum, a restart an election.
pub const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);
/// The deadline of the checker's own calls to a member (status, compaction, defragmentation).
const ETCD_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One etcd member.
struct Member {
    name: String,
    dir: PathBuf,
    client_url: String,
    peer_url: String,
    child: Option<Child>,
}

impl Member {
    fn log_file(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(self.log_file()).map_or(0, |m| m.len())
    }

    /// Whether the member logged [`READY`] past byte `from` of its log.
    fn ready_since(&self, from: u64) -> bool {
        std::fs::read(self.log_file())
            .map(|bytes| {
                let from = (from as usize).min(bytes.len());
                String::from_utf8_lossy(&bytes[from..]).contains(READY)
            })
            .unwrap_or(false)
    }
}

/// The local etcd cluster.
pub struct EtcdCluster {
    bin: PathBuf,
    members: Vec<Member>,
    initial_cluster: String,
}

impl EtcdCluster {
    /// Starts [`ETCD_MEMBERS`] members under `dir` and waits until each serves.
    pub async fn start(dir: &Path) -> anyhow::Result<EtcdCluster> {
        let bin = if Path::new(ETCD_BIN).exists() {
            PathBuf::from(ETCD_BIN)
        } else {
            PathBuf::from("etcd")
        };
        let ports = free_ports(2 * ETCD_MEMBERS)?;
        let members: Vec<Member> = (0..ETCD_MEMBERS)
            .map(|i| Member {
                name: format!("m{i}"),
                dir: dir.join(format!("m{i}")),
                client_url: format!("http://{}", ports[i]),
                peer_url: format!("http://{}", ports[ETCD_MEMBERS + i]),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            bin,
            members,
            initial_cluster,
        };
        // All at once: a member serves only once the cluster has a quorum.
        let all: Vec<usize> = (0..ETCD_MEMBERS).collect();
        cluster.start_members(&all).await?;
        Ok(cluster)
    }

    /// The client address of every member (the targets of the nodes' etcd link proxies).
    pub fn client_addrs(&self) -> Vec<std::net::SocketAddr> {
        self.members
            .iter()
            .map(|m| {
                m.client_url
                    .trim_start_matches("http://")
                    .parse()
                    .expect("a member's client URL is http://IP:PORT")
            })
            .collect()
    }

    /// The client URLs of every member, for `--etcd-endpoints`.
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Starts the members `which` (each must be stopped) and waits until each logs that it
    /// serves clients.
    pub async fn start_members(&mut self, which: &[usize]) -> anyhow::Result<()> {
        let mut marks = Vec::new();
        for &i in which {
            marks.push((i, self.members[i].log_len()));
            self.spawn(i)?;
        }
        let deadline = tokio::time::Instant::now() + ETCD_START_TIMEOUT;
        for (i, mark) in marks {
            loop {
                let member = &mut self.members[i];
                if member.ready_since(mark) {
                    break;
                }
                if let Some(child) = member.child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    member.child = None;
                    anyhow::bail!(
                        "etcd member {} exited with {status} before serving (see {})",
                        member.name,
                        member.log_file().display()
                    );
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "etcd member {} did not serve within {ETCD_START_TIMEOUT:?} (see {})",
                    member.name,
                    member.log_file().display()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let member = &self.members[i];
        assert!(member.child.is_none(), "etcd member {} runs", member.name);
        std::fs::create_dir_all(&member.dir)
            .with_context(|| format!("creating {}", member.dir.display()))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(member.log_file())
            .context("opening an etcd member's log")?;
        let mut command = Command::new(&self.bin);
        command
            .arg(format!("--name={}", member.name))
            .arg(format!("--data-dir={}", member.dir.join("data").display()))
            .arg(format!("--listen-client-urls={}", member.client_url))
            .arg(format!("--advertise-client-urls={}", member.client_url))
            .arg(format!("--listen-peer-urls={}", member.peer_url))
            .arg(format!("--initial-advertise-peer-urls={}", member.peer_url))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            // Ignored on a restart: the member's data directory holds its cluster.
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=tso-check");
        // SAFETY: prctl(2) is async-signal-safe; it only marks the child to be killed when the
        // spawning thread (a runtime worker, alive as long as the run) ends.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("etcd's log")?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (install Debian's etcd-server, etcd 3.4 or later)",
                    self.bin.display()
                )
            })?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// `kill -9` member `i`, and reaps it.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.members[i].child.take() {
            child.start_kill().context("sending SIGKILL to etcd")?;
            child.wait().await.context("reaping a killed etcd member")?;
        }
        Ok(())
    }

    /// Whether member `i` runs (as far as this cluster knows).
    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// A channel to member `i`'s client port (connected now, with a short deadline).
    async fn channel(&self, i: usize) -> anyhow::Result<tonic::transport::Channel> {
        let url = &self.members[i].client_url;
        tonic::transport::Endpoint::from_shared(url.clone())
            .with_context(|| format!("etcd member URL {url}"))?
            .connect_timeout(ETCD_CALL_TIMEOUT)
            .timeout(ETCD_CALL_TIMEOUT)
            .connect()
            .await
            .with_context(|| format!("connecting to etcd member m{i} at {url}"))
    }

    /// Whether member `i` is etcd's leader now; `None` when it does not answer.
    pub async fn leads(&self, i: usize) -> Option<bool> {
        if !self.is_running(i) {
            return None;
        }
        let mut client = MaintenanceClient::new(self.channel(i).await.ok()?);
        let status = client.status(StatusRequest {}).await.ok()?.into_inner();
        let me = status.header?.member_id;
        Some(status.leader != 0 && status.leader == me)
    }

    /// Compacts the keyspace at its current revision through member `i`, physically (the
    /// call returns once the old revisions are gone from that member's database). Returns the
    /// revision, or `None` when it was compacted already (nothing written since).
    pub async fn compact(&self, i: usize) -> anyhow::Result<Option<i64>> {
        let mut kv = KvClient::new(self.channel(i).await?);
        let head = kv
            .range(RangeRequest {
                key: b"/".to_vec(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("reading etcd's revision from m{i}"))?
            .into_inner();
        let revision = head.header.map_or(0, |h| h.revision);
        match kv
            .compact(CompactionRequest {
                revision,
                physical: true,
            })
            .await
        {
            Ok(_) => Ok(Some(revision)),
            // Nothing was written since the last compaction.
            Err(status) if status.code() == tonic::Code::OutOfRange => Ok(None),
            Err(status) => Err(status)
                .with_context(|| format!("compacting etcd at revision {revision} through m{i}")),
        }
    }

    /// Defragments member `i`; returns how long it took.
    pub async fn defragment(&self, i: usize) -> anyhow::Result<Duration> {
        let mut client = MaintenanceClient::new(self.channel(i).await?);
        let started = std::time::Instant::now();
        client
            .defragment(DefragmentRequest {})
            .await
            .with_context(|| format!("defragmenting etcd member m{i}"))?;
        Ok(started.elapsed())
    }

    /// Kills every member.
    pub async fn stop(&mut self) {
        for i in 0..self.members.len() {
            if let Err(err) = self.kill(i).await {
                eprintln!("tso check: stopping etcd member m{i}: {err:#}");
            }
        }
    }
}
