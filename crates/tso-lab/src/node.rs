//! Local `tso serve` processes, as `tso bench --spawn` and `tso check` run them: start, kill -9,
//! SIGTERM with a bound on the exit, restart on the same address, one start attempt that may be
//! refused, SIGSTOP/SIGCONT, a wiped data directory or one file of it, and the test-only clock
//! offset file.
//!
//! A node owns one directory (`data/`, `clock-offset-ms`, `serve.log`). Its client address is
//! picked by the OS on the first start and kept for every restart, so clients keep one endpoint.
//! Children are killed when their `Node` is dropped, so a failed run leaves no server behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a start may take until `serving on` (a fence is one fsync; a loaded machine is slow).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Start attempts before giving up: a restart on the same port can race the old socket.
pub const START_ATTEMPTS_MAX: usize = 5;
/// How long a node that closed its stdout without serving may take to exit.
pub const EXIT_WAIT: Duration = Duration::from_secs(5);
/// How long a graceful stop may take before the node is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// One local `tso serve` process and its directory.
pub struct Node {
    pub name: String,
    bin: PathBuf,
    dir: PathBuf,
    listen: SocketAddr,
    extra_args: Vec<String>,
    /// Whether the server follows the test-only clock offset file.
    clock_offset: bool,
    /// A file bind-mounted over `/etc/hosts` in the node's own mount namespace, so that peer
    /// names resolve to this node's link proxies.
    hosts_file: Option<PathBuf>,
    child: Option<Child>,
    paused: bool,
    /// The fault layer under `data/`, when the run has disk faults: dropped after `child`
    /// (which kills the process), so the mount goes once nothing uses it.
    disk: Option<tso_faultfs::Mount>,
}

impl Node {
    /// A node named `name` living in `dir` (created if missing), started with `extra_args`
    /// appended to `tso serve`; with `clock_offset`, its clock follows
    /// [`Node::set_clock_offset_ms`] (a test-only server flag).
    pub fn new(
        bin: &Path,
        dir: &Path,
        name: &str,
        extra_args: Vec<String>,
        clock_offset: bool,
    ) -> anyhow::Result<Node> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the node directory {}", dir.display()))?;
        let node = Node {
            name: name.to_string(),
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            extra_args,
            clock_offset,
            hosts_file: None,
            child: None,
            paused: false,
            disk: None,
        };
        node.set_clock_offset_ms(0)?;
        Ok(node)
    }

    /// Puts the node's data directory on the fault layer (an in-memory filesystem that knows
    /// what each fsync made durable), mounted at `data/`. The checker's process must be in a
    /// private mount namespace ([`tso_faultfs::enter_private_mount_namespace`]).
    pub fn with_fault_disk(mut self) -> anyhow::Result<Node> {
        let data = self.dir.join("data");
        std::fs::create_dir_all(&data)
            .with_context(|| format!("creating the mount point {}", data.display()))?;
        let mount = tso_faultfs::Mount::new(&data)
            .with_context(|| format!("mounting the fault layer on {}", data.display()))?;
        self.disk = Some(mount);
        Ok(self)
    }

    /// The switches of the node's fault layer, if it has one.
    pub fn disk(&self) -> Option<tso_faultfs::Control> {
        self.disk.as_ref().map(tso_faultfs::Mount::control)
    }

    /// Whether the process ended on its own (reaps it if so): a server that stopped on a
    /// permanent error, say.
    pub fn exited(&mut self) -> bool {
        let ended = match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(_))) | Some(Err(_)) => true,
            Some(Ok(None)) | None => false,
        };
        if ended {
            self.child = None;
            self.paused = false;
        }
        ended
    }

    /// Starts on `listen` instead of a port the OS picks (a raft cluster's members list names
    /// every client address before any node starts).
    pub fn with_listen(mut self, listen: SocketAddr) -> Node {
        self.listen = listen;
        self
    }

    /// Runs the node in its own mount namespace with `hosts` as its `/etc/hosts` (needs root
    /// and `unshare`).
    pub fn with_hosts_file(mut self, hosts: PathBuf) -> Node {
        self.hosts_file = Some(hosts);
        self
    }

    /// The client address (`http://host:port`), known once the node has started.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.listen)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    fn offset_file(&self) -> PathBuf {
        self.dir.join("clock-offset-ms")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.join("serve.log")
    }

    /// Starts the process and waits until it serves; returns its client address.
    pub async fn start(&mut self) -> anyhow::Result<SocketAddr> {
        assert!(self.child.is_none(), "node {} already runs", self.name);
        let mut last_error = None;
        for attempt in 0..START_ATTEMPTS_MAX {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            match self.start_once().await {
                Ok(Started::Serving(addr)) => return Ok(addr),
                Ok(_) => {
                    last_error = Some(anyhow::anyhow!(
                        "node {} did not start serving (see {}): {}",
                        self.name,
                        self.log_file().display(),
                        log_tail(&self.log_file())
                    ))
                }
                Err(err) => last_error = Some(err),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// Starts the process once, without retrying, and tells how that went: a node that must
    /// refuse its data directory exits at once.
    pub async fn start_once(&mut self) -> anyhow::Result<Started> {
        assert!(self.child.is_none(), "node {} already runs", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .context("opening the node log")?;
        let mut command = match &self.hosts_file {
            None => Command::new(&self.bin),
            Some(hosts) => {
                // unshare(1) and `exec` keep one process, so signals reach the server itself.
                let mut c = Command::new("unshare");
                c.args(["-m", "--", "sh", "-c"])
                    .arg(r#"mount --bind "$1" /etc/hosts && shift && exec "$@""#)
                    .arg("sh")
                    .arg(hosts)
                    .arg(&self.bin);
                c
            }
        };
        command
            .arg("serve")
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--data-dir")
            .arg(self.dir.join("data"));
        if self.clock_offset {
            command
                .arg("--unsafe-clock-offset-file")
                .arg(self.offset_file());
        }
        // SAFETY: prctl(2) is async-signal-safe; it only marks the child to be killed when
        // this process's spawning thread (a runtime worker, alive as long as the run) ends, so
        // an interrupted bench or check leaves no server behind.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix("serving on ") {
                    return Ok(Some(addr.trim().parse::<SocketAddr>()?));
                }
            }
            Ok::<_, anyhow::Error>(None)
        })
        .await;
        let addr = match ready {
            Ok(Ok(Some(addr))) => addr,
            Ok(Ok(None)) => {
                // Stdout closed without `serving on`: the process is exiting (or exited).
                let code = match tokio::time::timeout(EXIT_WAIT, child.wait()).await {
                    Ok(status) => status.context("reaping the node")?.code(),
                    Err(_) => {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        return Ok(Started::Silent);
                    }
                };
                return Ok(Started::Exited { code });
            }
            Ok(Err(_)) | Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Ok(Started::Silent);
            }
        };
        // Keep draining stdout so the server never blocks or dies on a closed pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.listen = addr;
        self.child = Some(child);
        self.paused = false;
        Ok(Started::Serving(addr))
    }

    /// `kill -9`, and reaps the process.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill().context("sending SIGKILL")?;
            child.wait().await.context("reaping the killed node")?;
        }
        self.paused = false;
        Ok(())
    }

    /// `SIGSTOP`: the process freezes with its sockets open.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        self.signal(libc::SIGSTOP)?;
        self.paused = true;
        Ok(())
    }

    /// `SIGCONT`.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        self.signal(libc::SIGCONT)?;
        self.paused = false;
        Ok(())
    }

    fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        let Some(pid) = self.child.as_ref().and_then(Child::id) else {
            bail!("node {} is not running", self.name);
        };
        // SAFETY: plain kill(2) on a child we own and have not reaped.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            bail!(
                "signal {signal} to node {}: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Shifts the node's clock by `offset_ms` (the server re-reads the file every 50 ms).
    pub fn set_clock_offset_ms(&self, offset_ms: i64) -> anyhow::Result<()> {
        let tmp = self.dir.join("clock-offset-ms.tmp");
        std::fs::write(&tmp, offset_ms.to_string()).context("writing the clock offset")?;
        std::fs::rename(&tmp, self.offset_file()).context("installing the clock offset")?;
        Ok(())
    }

    /// Graceful stop (SIGTERM), bounded; kills it when the bound passes.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.terminate(STOP_TIMEOUT).await.map(|_| ())
    }

    /// SIGTERM (a raft leader hands its leadership on first), then waits up to `within` for the
    /// process to exit; kills it (`kill -9`) when the bound passes. A node that is not running
    /// stops at once.
    pub async fn terminate(&mut self, within: Duration) -> anyhow::Result<Stopped> {
        if self.paused {
            self.resume()?;
        }
        let Some(mut child) = self.child.take() else {
            return Ok(Stopped::NotRunning);
        };
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        let started = std::time::Instant::now();
        match tokio::time::timeout(within, child.wait()).await {
            Ok(status) => Ok(Stopped::Exited {
                code: status.context("waiting for the node to exit")?.code(),
                took: started.elapsed(),
            }),
            Err(_) => {
                child.start_kill().context("sending SIGKILL")?;
                child.wait().await.context("reaping the killed node")?;
                Ok(Stopped::Killed)
            }
        }
    }

    /// The length of the node's log now: pass it to [`Node::log_since`] to read what the node
    /// logged from here on.
    pub fn log_len(&self) -> u64 {
        std::fs::metadata(self.log_file()).map_or(0, |m| m.len())
    }

    /// What the node logged from byte `offset` of its log on (empty if unreadable).
    pub fn log_since(&self, offset: u64) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(self.log_file())
            && file.seek(SeekFrom::Start(offset)).is_ok()
        {
            let mut bytes = Vec::new();
            if file.read_to_end(&mut bytes).is_ok() {
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
        text
    }

    /// The node's data directory (`--data-dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The node's own directory (its data directory, log and files beside them).
    pub fn node_dir(&self) -> &Path {
        &self.dir
    }

    /// The `tso` binary the node runs.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Deletes the node's data directory (the node must be stopped): the next start is a
    /// fresh node, as on a new disk.
    pub fn wipe_data(&self) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "node {} still runs", self.name);
        let data = self.dir.join("data");
        match std::fs::remove_dir_all(&data) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(err).with_context(|| format!("wiping {}", data.display()))
            }
            _ => Ok(()),
        }
    }

    /// Deletes one file of the node's data directory (the node must be stopped): `raft-log`
    /// alone makes the directory incomplete, which the next start must refuse.
    pub fn remove_data_file(&self, name: &str) -> anyhow::Result<()> {
        assert!(self.child.is_none(), "node {} still runs", self.name);
        let path = self.dir.join("data").join(name);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }
}

/// How one start attempt ([`Node::start_once`]) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// It printed `serving on ADDR`.
    Serving(SocketAddr),
    /// It exited before serving, with this code (`None`: ended by a signal).
    Exited { code: Option<i32> },
    /// It neither served nor exited within [`START_TIMEOUT`] (then [`EXIT_WAIT`]): killed.
    Silent,
}

/// How [`Node::terminate`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The process exited by itself after SIGTERM: its exit code (`None` if a signal ended it)
    /// and how long it took.
    Exited { code: Option<i32>, took: Duration },
    /// It had not exited when the bound passed, and was killed.
    Killed,
    /// It was not running.
    NotRunning,
}

/// The last lines of a log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}
