//! A real single-member etcd (Debian's `etcd-server`, 3.4) for the etcd backend's tests: its
//! own temporary data directory and free loopback ports, killed on drop.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's `etcd-server` installs etcd.
pub const ETCD: &str = "/usr/bin/etcd";

/// How long etcd may take to say it serves: a hang guard, never a measure.
const START_WAIT: Duration = Duration::from_secs(30);

/// The PEM files of an etcd serving TLS to its clients.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    /// The CA that signs the server's certificate and, with `client_cert_auth`, the clients'.
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// Refuse clients without a certificate `ca` signed (etcd's `--client-cert-auth`).
    pub client_cert_auth: bool,
}

/// One single-member etcd cluster, killed on drop.
pub struct EtcdProcess {
    child: Child,
    client_url: String,
    dir: tempfile::TempDir,
}

impl EtcdProcess {
    /// Starts etcd and waits until its log says it serves clients. Panics with what to install
    /// when etcd is missing: a test that needs etcd never skips.
    pub fn start() -> EtcdProcess {
        Self::start_with(None)
    }

    /// Starts etcd serving its clients over TLS (`https://`): it presents `tls.cert`, and with
    /// `tls.client_cert_auth` it accepts only clients whose certificate `tls.ca` signed.
    pub fn start_tls(tls: &EtcdTlsFiles) -> EtcdProcess {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<&EtcdTlsFiles>) -> EtcdProcess {
        assert!(
            Path::new(ETCD).exists(),
            "{ETCD} is missing: install Debian's `etcd-server` package (`scripts/test` does) to \
             run the etcd backend tests"
        );
        let dir = tempfile::tempdir().expect("a temporary directory for etcd");
        let (client, peer) = (free_port(), free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log_path = dir.path().join("etcd.log");
        let log = std::fs::File::create(&log_path).expect("etcd's log file");
        let mut command = Command::new(ETCD);
        if let Some(tls) = tls {
            command
                .arg(format!("--cert-file={}", tls.cert.display()))
                .arg(format!("--key-file={}", tls.key.display()))
                .arg(format!("--trusted-ca-file={}", tls.ca.display()));
            if tls.client_cert_auth {
                command.arg("--client-cert-auth");
            }
        }
        let child = command
            .arg("--name=default")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd's log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {ETCD}: {e}"));
        let mut etcd = EtcdProcess {
            child,
            client_url,
            dir,
        };
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains("ready to serve client requests") {
                return etcd;
            }
            if let Ok(Some(status)) = etcd.child.try_wait() {
                panic!("etcd exited with {status} before serving:\n{text}");
            }
            assert!(
                started.elapsed() < START_WAIT,
                "etcd did not serve within {START_WAIT:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The client URL (`http://127.0.0.1:PORT`, or `https://` when it serves TLS).
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// etcd's own log, for an assertion's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Sends `signal` to etcd (SIGSTOP and SIGCONT to cut it off and bring it back).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own child, which we have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({signal}) of etcd");
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

use crate::ports::free_port;
