//! Helpers for process tests: start `tso serve` as a real process, wait for its ready line,
//! signal it, and talk to it over gRPC.
#![allow(dead_code)]

pub mod certs;
pub mod check;
pub mod lease_server;
pub mod malformed;
pub mod raft;
pub mod seq_server;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tso_proto::v1::GetTsRequest;
use tso_proto::v1::tso_service_client::TsoServiceClient;

/// Hang guard for waits on processes; never what a test asserts on.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// A port that was free on 127.0.0.1 a moment ago, below the ephemeral range (see
/// `tso_testkit::ports`).
pub use tso_testkit::ports::free_port;

pub fn tso_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tso"))
}

/// A running `tso serve`.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub stderr: mpsc::Receiver<String>,
}

impl Server {
    /// Starts `tso serve` on a free loopback port over `data_dir`, and waits for
    /// `serving on <addr>`.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::try_start(data_dir, extra)
            .unwrap_or_else(|(status, log)| panic!("tso serve exited with {status}: {log}"))
    }

    /// Like [`Server::start`], but returns the exit status and stderr if it exits first.
    pub fn try_start(data_dir: &Path, extra: &[&str]) -> Result<Server, (ExitStatus, String)> {
        Self::try_start_limited(data_dir, extra, None)
    }

    /// [`Server::start`] with the process's open files limit set to `(soft, hard)` first.
    pub fn start_limited(data_dir: &Path, extra: &[&str], open_files: (u64, u64)) -> Server {
        Self::try_start_limited(data_dir, extra, Some(open_files))
            .unwrap_or_else(|(status, log)| panic!("tso serve exited with {status}: {log}"))
    }

    fn try_start_limited(
        data_dir: &Path,
        extra: &[&str],
        open_files: Option<(u64, u64)>,
    ) -> Result<Server, (ExitStatus, String)> {
        let mut command = Command::new(tso_bin());
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra);
        if let Some((soft, hard)) = open_files {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        Self::spawn(command)
    }

    /// Spawns `command` (a `tso serve` with all its flags) with piped output, and waits for
    /// `serving on <addr>`; the exit status and stderr if it exits first.
    pub fn spawn(mut command: Command) -> Result<Server, (ExitStatus, String)> {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawning tso serve");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (err_tx, err_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = err_tx.send(line);
            }
        });
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = line_tx.send(lines.next().and_then(Result::ok));
            for _ in lines {}
        });
        match line_rx.recv_timeout(HANG_GUARD) {
            Ok(Some(line)) => {
                let addr = line
                    .strip_prefix("serving on ")
                    .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
                Ok(Server {
                    child,
                    addr: addr.to_string(),
                    stderr: err_rx,
                })
            }
            Ok(None) => {
                let status = wait_exit(&mut child);
                Err((status, drain(&err_rx)))
            }
            Err(_) => panic!("tso serve printed nothing within the hang guard"),
        }
    }

    pub async fn client(&self) -> TsoServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        TsoServiceClient::new(channel)
    }

    pub fn signal(&self, signal: i32) {
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    /// SIGKILL and reap.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        wait_exit(&mut self.child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within the hang guard"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn drain(rx: &mpsc::Receiver<String>) -> String {
    let mut out = String::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// One `GetTs`, returning the packed last timestamp of the grant.
pub async fn last_of(client: &mut TsoServiceClient<Channel>, count: u32) -> (u64, u64) {
    let reply = client
        .get_ts(GetTsRequest { count })
        .await
        .expect("GetTs")
        .into_inner();
    assert_eq!(reply.count, count);
    let first = reply.physical_ms << 18 | reply.logical_start as u64;
    (first, first + count as u64 - 1)
}

/// Runs `tso` with `args` to completion; returns (status, stdout, stderr).
pub fn run_tso(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(tso_bin())
        .args(args)
        .output()
        .expect("running tso");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub use tso_testkit::topic;
