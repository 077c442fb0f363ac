//! `tso bench` and `tso check`: their flags turned into the lab's typed options (TLS loaded
//! here; this binary named as the one whose `serve` runs local servers), and the checker's
//! exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use tso_lab::bench::BenchOptions;
use tso_lab::check::{CheckOptions, Controls, Verdict};

use crate::cli::{BenchArgs, CheckArgs, CheckControls};

/// Exit code of a clean history.
pub const EXIT_CLEAN: u8 = 0;
/// Exit code of a violation (history or liveness).
pub const EXIT_VIOLATION: u8 = 1;
/// Exit code of a usage or setup error.
pub const EXIT_SETUP: u8 = 2;

/// Runs `tso bench`.
pub fn bench(args: BenchArgs) -> anyhow::Result<()> {
    tso_lab::bench::run(bench_options(args)?)
}

/// Runs `tso check` and maps the outcome to its exit code.
pub fn check(args: CheckArgs) -> ExitCode {
    match check_options(args).and_then(tso_lab::check::run) {
        Ok(Verdict::Clean) => ExitCode::from(EXIT_CLEAN),
        Ok(Verdict::Violation) => ExitCode::from(EXIT_VIOLATION),
        Err(err) => {
            eprintln!("tso check: error: {err:#}");
            ExitCode::from(EXIT_SETUP)
        }
    }
}

fn bench_options(args: BenchArgs) -> anyhow::Result<BenchOptions> {
    Ok(BenchOptions {
        endpoints: args.endpoints,
        tls: args.tls.load()?,
        spawn: args.spawn,
        server_bin: this_binary()?,
        callers: args.callers,
        connections: args.connections,
        count: args.count,
        mode: args.mode,
        stream_per_caller: args.stream_per_caller,
        rpc: args.rpc,
        seq_keys: args.seq_keys,
        duration: args.duration,
        warmup: args.warmup,
        timeout: args.timeout,
        threads: args.threads,
        json: args.json,
    })
}

fn check_options(args: CheckArgs) -> anyhow::Result<CheckOptions> {
    Ok(CheckOptions {
        server_bin: this_binary()?,
        nodes: args.nodes,
        backend: args.backend,
        endpoints: args.endpoints,
        tls: args.tls.load()?,
        clients: args.clients,
        calls_max: args.calls_max,
        workload: args.workload,
        count_max: args.count_max,
        mode: args.mode,
        duration: args.duration,
        faults: args.faults,
        fault_interval: args.fault_interval,
        slow_fsync: args.slow_fsync,
        seed: args.seed,
        liveness_bound: args.liveness_bound,
        call_timeout: args.call_timeout,
        out: args.out,
        history: args.history,
        verify: args.verify,
        work_dir: args.work_dir,
        controls: controls(args.controls),
    })
}

fn controls(flags: CheckControls) -> Controls {
    Controls {
        unsafe_positive_control: flags.unsafe_positive_control,
        unsafe_no_leader_lease: flags.unsafe_no_leader_lease,
        unsafe_seq_forget: flags.unsafe_seq_forget,
        unsafe_lease_forget: flags.unsafe_lease_forget,
        unsafe_allow_leader_removal: flags.unsafe_allow_leader_removal,
        unsafe_trust_wiped: flags.unsafe_trust_wiped,
        unsafe_lease_wall_expiry: flags.unsafe_lease_wall_expiry,
        unsafe_lease_bound_in_memory: flags.unsafe_lease_bound_in_memory,
        unsafe_seq_burn_refused: flags.unsafe_seq_burn_refused,
        unsafe_handoff_keep_leader_lease: flags.unsafe_handoff_keep_leader_lease,
        unsafe_skip_dir_fsync: flags.unsafe_skip_dir_fsync,
        unsafe_ack_before_fsync: flags.unsafe_ack_before_fsync,
        unsafe_ungate_elections: flags.unsafe_ungate_elections,
        unsafe_etcd_ignore_lease: flags.unsafe_etcd_ignore_lease,
        unsafe_etcd_skip_fence: flags.unsafe_etcd_skip_fence,
        unsafe_raise_in_memory: flags.unsafe_raise_in_memory,
    }
}

/// The `tso` binary running now: local servers are its `serve`.
fn this_binary() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("finding this binary")
}
