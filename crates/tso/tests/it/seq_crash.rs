//! Dense sequences through crashes of the real binary: `tso serve` is killed with SIGKILL in the
//! middle of a burst of GetSeq calls, five times, and restarted on the same directory. Over the
//! whole history no block is handed out twice (D1), and the values skipped add up to no more
//! than the calls whose outcome was unknown (D2).

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tso_proto::v1::GetSeqRequest;

const ROUNDS: usize = 5;
const CALLERS: usize = 16;
const KEYS: [&str; 2] = ["invoice", "offset"];

#[derive(Debug, Default)]
struct History {
    /// Per key: every block granted, `[start, end)`.
    blocks: BTreeMap<String, Vec<(u64, u64)>>,
    /// Per key: the values asked for by calls whose outcome is unknown.
    ambiguous: BTreeMap<String, u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_burst_never_reuses_a_block_and_skips_only_ambiguous_values() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let history = Arc::new(Mutex::new(History::default()));
    for round in 0..ROUNDS {
        let server = Server::start(dir.path(), &[]);
        let mut callers = Vec::new();
        for caller in 0..CALLERS {
            let client = server.client().await;
            let history = Arc::clone(&history);
            callers.push(tokio::spawn(async move {
                burst(client, caller, history).await;
            }));
        }
        // Kill once every caller has had some blocks, so calls are in flight at the kill.
        let granted = |h: &History| h.blocks.values().map(Vec::len).sum::<usize>();
        let target = (round + 1) * 400;
        let deadline = tokio::time::Instant::now() + HANG_GUARD;
        while granted(&history.lock().unwrap()) < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: too few blocks"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.kill9();
        for caller in callers {
            caller.await.unwrap();
        }
    }
    let history = history.lock().unwrap();
    for (key, blocks) in &history.blocks {
        let mut blocks = blocks.clone();
        blocks.sort_unstable();
        let (mut end, mut skipped) = (0, 0);
        for (start, stop) in blocks {
            assert!(
                start >= end,
                "{key}: [{start}, {stop}) reuses values below {end}"
            );
            skipped += start - end;
            end = stop;
        }
        let ambiguous = history.ambiguous.get(key).copied().unwrap_or(0);
        eprintln!("{key}: end {end}, {skipped} skipped, {ambiguous} asked by ambiguous calls");
        assert!(
            skipped <= ambiguous,
            "{key}: {skipped} values skipped, more than the {ambiguous} of ambiguous calls"
        );
    }
}

/// Calls GetSeq until the server goes away; the call that meets the kill is ambiguous.
async fn burst(
    mut client: tso_proto::v1::tso_service_client::TsoServiceClient<tonic::transport::Channel>,
    caller: usize,
    history: Arc<Mutex<History>>,
) {
    for i in 0.. {
        let key = KEYS[(caller + i) % KEYS.len()];
        let count = (i % 3) as u32 + 1;
        let mut request = tonic::Request::new(GetSeqRequest {
            key: key.as_bytes().to_vec(),
            count,
        });
        request.set_timeout(Duration::from_secs(10));
        let result = client.get_seq(request).await;
        let mut history = history.lock().unwrap();
        match result {
            Ok(reply) => {
                let reply = reply.into_inner();
                assert_eq!((reply.key.as_str(), reply.count), (key, count));
                let block = (reply.start, reply.start + count as u64);
                history.blocks.entry(key.into()).or_default().push(block);
            }
            Err(status) => {
                *history.ambiguous.entry(key.into()).or_default() += count as u64;
                assert!(
                    matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ),
                    "unexpected {status:?}"
                );
                return;
            }
        }
    }
}

/// The sequence limits are serve flags: a third key past `--seq-keys-max 2` is refused with a
/// clear error and spends nothing; `--seq-count-max` bounds one entry.
#[test]
fn the_sequence_limits_are_serve_flags() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--seq-keys-max", "2", "--seq-count-max", "10"],
    );
    let endpoint = server.addr.clone();
    let seq = |args: &[&str]| {
        let mut all = vec!["seq"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--endpoints", &endpoint]);
        run_tso(&all)
    };
    let (status, out, err) = seq(&["a", "b", "-n", "10"]);
    assert!(status.success(), "{err}");
    assert_eq!(
        out,
        "a 0..10 (count 10, epoch 1)\nb 0..10 (count 10, epoch 1)\n"
    );
    let (status, _, err) = seq(&["c"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("maximum of 2 sequence keys"), "{err}");
    let (status, _, err) = seq(&["a", "-n", "11"]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("count 11 is out of range"), "{err}");
    let (status, out, err) = seq(&["a"]);
    assert!(status.success(), "{err}");
    assert_eq!(
        out, "a 10..11 (count 1, epoch 1)\n",
        "the refusals spent nothing"
    );
    let (status, _, err) = run_tso(&["serve", "--seq-keys-max", "0"]);
    assert_eq!(status.code(), Some(2), "{err}");
}

/// The positive control of `tso check --workload seq`: with `--unsafe-seq-forget` a restarted
/// server hands out a block it had handed out before.
#[test]
fn the_forgetting_control_reissues_blocks_after_a_restart() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let first = |server: &Server| {
        let (status, out, err) = run_tso(&["seq", "k", "-n", "5", "--endpoints", &server.addr]);
        assert!(status.success(), "{err}");
        out
    };
    let server = Server::start(dir.path(), &["--unsafe-seq-forget"]);
    assert_eq!(first(&server), "k 0..5 (count 5, epoch 1)\n");
    server.kill9();
    let server = Server::start(dir.path(), &["--unsafe-seq-forget"]);
    assert_eq!(
        first(&server),
        "k 0..5 (count 5, epoch 2)\n",
        "the control reissues"
    );
    server.kill9();
    let server = Server::start(dir.path(), &[]);
    assert_eq!(
        first(&server),
        "k 5..10 (count 5, epoch 3)\n",
        "the durable counter was kept"
    );
}
