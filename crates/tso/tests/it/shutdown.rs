//! A stopping server exits within `--shutdown-grace`, whatever it is waiting for, and at once on
//! a second signal: a disk stuck in fsync (a hidden fault flag stalls every raft log fsync while
//! a file exists) must not keep a SIGTERM'd process up until someone sends SIGKILL.

use crate::common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::raft::*;
use common::*;
use tso_proto::v1::GetTsRequest;

/// Waits (hang guard) until `server`'s log has a line containing `text`; returns the log so far.
fn wait_for_log(server: &Server, text: &str, log: &mut String) {
    let deadline = Instant::now() + HANG_GUARD;
    while !log.contains(text) {
        let left = deadline.saturating_duration_since(Instant::now());
        match server.stderr.recv_timeout(left) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
            }
            Err(_) => panic!("no log line with {text:?} within the hang guard; log:\n{log}"),
        }
    }
}

/// Stalls `stall`'s fsyncs and waits until the raft log of `server` is stuck in one (a window
/// extension comes within a second with `--window-ahead 1s`).
fn stall_fsync(server: &Server, stall: &Path, log: &mut String) {
    std::fs::write(stall, b"").unwrap();
    wait_for_log(server, "fsync stalled", log);
}

async fn granting(node: &RaftNode) -> bool {
    node.connect()
        .get_ts(GetTsRequest { count: 1 })
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stuck_in_fsync_exits_within_its_grace_on_sigterm() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let nodes = raft_nodes(3);
    let members = members(&nodes);
    let stall_files: Vec<_> = nodes
        .iter()
        .map(|n| dir.path().join(format!("stall-{}", n.id)))
        .collect();
    let mut servers: Vec<Server> = nodes
        .iter()
        .zip(&stall_files)
        .map(|(n, stall)| {
            n.start_with(
                dir.path(),
                Some(&members),
                &[
                    "--shutdown-grace",
                    "2s",
                    "--window-ahead",
                    "1s",
                    "--unsafe-fsync-stall-file",
                    stall.to_str().unwrap(),
                ],
            )
        })
        .collect();
    let leader = loop {
        let mut found = None;
        for (i, n) in nodes.iter().enumerate() {
            if granting(n).await {
                found = Some(i);
            }
        }
        if let Some(i) = found {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut log = String::new();
    stall_fsync(&servers[leader], &stall_files[leader], &mut log);

    let stopping = Instant::now();
    servers[leader].signal(libc::SIGTERM);
    let mut server = servers.remove(leader);
    let status = tokio::task::spawn_blocking(move || {
        let status = server.wait_exit();
        (status, drain(&server.stderr))
    })
    .await
    .unwrap();
    let (status, rest) = status;
    log.push_str(&rest);
    eprintln!("the stuck leader exited after {:?}", stopping.elapsed());
    assert_eq!(
        status.code(),
        Some(1),
        "a cut shutdown exits 1; log:\n{log}"
    );
    assert!(
        log.contains("did not finish within --shutdown-grace"),
        "the log says why; log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_ends_a_stuck_shutdown_at_once() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let nodes = raft_nodes(1);
    let stall = dir.path().join("stall");
    let server = nodes[0].start_with(
        dir.path(),
        Some(&members(&nodes)),
        &[
            // Far past the hang guard: only the second signal can end the process in time.
            "--shutdown-grace",
            "600s",
            "--window-ahead",
            "1s",
            "--unsafe-fsync-stall-file",
            stall.to_str().unwrap(),
        ],
    );
    let mut log = String::new();
    stall_fsync(&server, &stall, &mut log);
    server.signal(libc::SIGTERM);
    wait_for_log(&server, "shutdown requested", &mut log);
    server.signal(libc::SIGINT);
    let mut server = server;
    let (status, rest) = tokio::task::spawn_blocking(move || {
        let status = server.wait_exit();
        (status, drain(&server.stderr))
    })
    .await
    .unwrap();
    log.push_str(&rest);
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    assert!(log.contains("a second stop signal"), "log:\n{log}");
}
