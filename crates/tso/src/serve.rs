//! `tso serve` and `tso init`.

mod probes;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tso_server::backend::etcd::{EtcdBackend, EtcdConfig};
use tso_server::backend::file::{self, FileBackend};
use tso_server::backend::raft::{HandoffOutcome, RaftBackend};
use tso_server::backend::{
    Backend, BackendError, BoxFuture, Leadership, OracleCommand, OracleState, Stored,
};
use tso_server::clock::{Clock, OffsetClock, SystemClock};
use tso_server::ops::NodeInfo;
use tso_server::{Config, OracleGuard, serve_listener_tls};

use crate::cli::{BackendKind, InitArgs, ServeArgs};
use crate::cluster;
use probes::ProbeState;

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(&args.log)?;
    anyhow::ensure!(
        args.lease_ttl_min >= std::time::Duration::from_millis(1)
            && args.lease_ttl_min <= args.lease_ttl_max,
        "--lease-ttl-min {:?} must be at least 1ms and at most --lease-ttl-max {:?}",
        args.lease_ttl_min,
        args.lease_ttl_max
    );
    raise_open_files_limit();
    let stop = take_stop_signals(args.shutdown_grace)?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        builder.worker_threads(threads.into());
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args, stop))
}

/// Open files a server may ask for when the hard limit is unlimited: the kernel's usual
/// `nr_open` ceiling; far above what one node's connections need.
const OPEN_FILES_WANTED: libc::rlim_t = 1 << 20;

/// Raises the soft limit on open files to the hard limit, as servers do: Rust keeps the soft
/// default (often 1024), so about a thousand client connections would leave no handle for the
/// data directory. Running out stays survivable (the backend retries), this only makes it rare.
fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(
            "cannot read the open files limit: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    let wanted = limit.rlim_max.min(OPEN_FILES_WANTED);
    if limit.rlim_cur >= wanted {
        return;
    }
    let before = limit.rlim_cur;
    limit.rlim_cur = wanted;
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        tracing::warn!(
            "cannot raise the open files limit from {before}: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    tracing::info!(from = before, to = wanted, "raised the open files limit");
}

async fn serve(args: ServeArgs, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let probes = ProbeState::default();
    let stop_probes = CancellationToken::new();
    if let Some(addr) = args.metrics_listen {
        start_metrics_endpoint(addr, probes.clone(), stop_probes.clone()).await?;
    }
    let served = match args.backend {
        BackendKind::File => serve_file(args, &probes, stop).await,
        BackendKind::Raft => serve_raft(args, &probes, stop).await,
        BackendKind::Etcd => serve_etcd(args, &probes, stop).await,
    };
    stop_probes.cancel();
    served
}

/// Binds `--metrics-listen` and serves `/metrics`, `/healthz` and `/readyz` on it until `stop`.
async fn start_metrics_endpoint(
    addr: SocketAddr,
    probes: ProbeState,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot serve metrics on {addr}: pick another --metrics-listen")
    })?;
    let metrics = probes::install_metrics().context("installing the metrics recorder")?;
    tokio::spawn(probes::serve(listener, metrics, probes, stop));
    Ok(())
}

/// Resolves once a stop signal came (see [`take_stop_signals`]), after marking the node as
/// draining for `/readyz`.
async fn stop_requested(probes: &ProbeState, mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
    probes.stopping();
}

/// After a handoff, how long without a client call before the server closes its connections,
/// and the most it waits for that: a client that follows the hint leaves within a round trip.
const HANDOFF_LINGER_IDLE: Duration = Duration::from_millis(50);
const HANDOFF_LINGER_MAX: Duration = Duration::from_millis(300);

/// The exit status of a shutdown cut short, by the grace running out or a second signal.
const EXIT_SHUTDOWN_CUT: i32 = 1;

/// Takes SIGTERM and SIGINT away from every thread but one of its own, which reports the first
/// on the returned watch. From then on the whole exit (handoff, drain, backend shutdown) has
/// `grace`: past it the thread ends the process, and a second signal ends it at once. Neither
/// depends on the async runtime, whose threads a disk stuck in fsync can all block; either way
/// is a crash as far as durable state goes, which every backend survives.
///
/// Call it before any other thread starts: they inherit the blocked signals.
fn take_stop_signals(grace: Duration) -> anyhow::Result<watch::Receiver<bool>> {
    // SAFETY: the sigset is initialized by sigemptyset before use; pthread_sigmask and
    // sigwait/sigtimedwait only read and write the values passed to them.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        anyhow::ensure!(rc == 0, "cannot block the stop signals: error {rc}");
        set
    };
    let (tx, rx) = watch::channel(false);
    std::thread::Builder::new()
        .name("tso-stop-signals".into())
        .spawn(move || {
            let mut signal: libc::c_int = 0;
            // SAFETY: see above.
            while unsafe { libc::sigwait(&set, &mut signal) } != 0 {}
            tx.send_replace(true);
            let timeout = libc::timespec {
                tv_sec: grace.as_secs() as libc::time_t,
                tv_nsec: grace.subsec_nanos() as libc::c_long,
            };
            // SAFETY: see above.
            let second = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
            if second > 0 {
                tracing::warn!("a second stop signal: exiting now, without finishing the shutdown");
            } else {
                tracing::error!(
                    grace_ms = grace.as_millis() as u64,
                    "the shutdown did not finish within --shutdown-grace; exiting now"
                );
            }
            std::process::exit(EXIT_SHUTDOWN_CUT);
        })
        .context("starting the signal thread")?;
    Ok(rx)
}

async fn bind_client(args: &ServeArgs) -> anyhow::Result<TcpListener> {
    TcpListener::bind(args.listen).await.with_context(|| {
        format!(
            "cannot listen on {}: is another server using it? pick another --listen",
            args.listen
        )
    })
}

fn oracle_config(args: &ServeArgs) -> Config {
    if args.controls.unsafe_no_leader_lease {
        tracing::warn!(
            "UNSAFE: grants skip the leader lease check; this server breaks its guarantees on purpose"
        );
    }
    if args.controls.unsafe_lease_forget {
        tracing::warn!(
            "UNSAFE: every term starts with no stamping leases; this server breaks its guarantees on purpose"
        );
    }
    if args.controls.unsafe_seq_forget {
        tracing::warn!(
            "UNSAFE: sequences restart from 0 in every term; this server breaks its guarantees on purpose"
        );
    }
    if args.controls.unsafe_lease_wall_expiry {
        tracing::warn!(
            "UNSAFE: stamping leases expire by the wall clock; this server breaks its guarantees on purpose"
        );
    }
    if args.controls.unsafe_lease_bound_in_memory {
        tracing::warn!(
            "UNSAFE: stamping lease bounds are not made durable; this server breaks its guarantees on purpose"
        );
    }
    if args.controls.unsafe_seq_burn_refused {
        tracing::warn!(
            "UNSAFE: some refused sequence calls spend their block; this server breaks its guarantees on purpose"
        );
    }
    Config {
        window_ahead: args.window_ahead,
        failover_advance: args.failover_advance,
        shutdown_grace: args.shutdown_grace,
        unsafe_skip_leader_lease_check: args.controls.unsafe_no_leader_lease,
        seq_count_max: args.seq_count_max,
        seq_keys_max: args.seq_keys_max as usize,
        unsafe_seq_skip_load: args.controls.unsafe_seq_forget,
        lease_ttl_min: args.lease_ttl_min,
        lease_ttl_max: args.lease_ttl_max,
        unsafe_lease_skip_load: args.controls.unsafe_lease_forget,
        unsafe_lease_wall_expiry: args.controls.unsafe_lease_wall_expiry,
        unsafe_lease_bound_in_memory: args.controls.unsafe_lease_bound_in_memory,
        unsafe_seq_burn_refused: args.controls.unsafe_seq_burn_refused,
    }
}

/// One node of a raft cluster: peers on `--peer-addr`, clients on `--listen`. Followers serve
/// too (they answer "not leader" with the leader's address), so nothing waits for leadership.
async fn serve_raft(
    args: ServeArgs,
    probes: &ProbeState,
    stop_rx: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (raft_config, peer_listen) = cluster::raft_config(&args)?;
    let peer_tls = raft_config.peer_tls.is_some();
    let tls = args.tls.client_port()?;
    let client_tls = tls.is_some();
    let node_id = raft_config.node_id;
    let peer_listener = TcpListener::bind(peer_listen).await.with_context(|| {
        format!("cannot listen for peers on {peer_listen}: pick another --peer-addr")
    })?;
    let listener = bind_client(&args).await?;
    let addr = listener.local_addr()?;
    let admin_listener = cluster::bind_admin(&args).await?;
    anyhow::ensure!(
        !args.controls.unsafe_skip_dir_fsync,
        "--unsafe-skip-dir-fsync breaks the file backend: use it without --backend raft"
    );
    anyhow::ensure!(
        !args.controls.unsafe_etcd_ignore_lease && !args.controls.unsafe_etcd_skip_fence,
        "--unsafe-etcd-ignore-lease and --unsafe-etcd-skip-fence break the etcd backend: use them with --backend etcd"
    );
    if args.controls.unsafe_ack_before_fsync {
        tracing::warn!(
            "UNSAFE: the raft log acknowledges entries before they are durable; this server breaks its guarantees on purpose"
        );
        tso_server::backend::raft::unsafe_ack_before_fsync();
    }
    if let Some(path) = &args.controls.unsafe_fsync_stall_file {
        tracing::warn!(path = %path.display(), "UNSAFE: raft fsyncs stall while this file exists; for fault tests only");
        tso_server::backend::raft::unsafe_stall_fsync_while_exists(path.clone());
    }
    let backend = Arc::new(
        RaftBackend::open(raft_config)
            .await
            .context("starting the raft node")?,
    );
    if args.controls.unsafe_ungate_elections {
        tracing::warn!("UNSAFE: elections skip the pre-vote gate; for measurements only");
        backend.unsafe_ungate_elections();
    }
    if args.controls.unsafe_trust_wiped {
        tracing::warn!(
            "UNSAFE: members on wiped data directories count again; this server breaks its guarantees on purpose"
        );
        backend.unsafe_trust_wiped_members();
    }
    if args.controls.unsafe_handoff_keep_leader_lease {
        tracing::warn!(
            "UNSAFE: a handoff keeps this node's lease and grants under it; this server breaks its guarantees on purpose"
        );
        backend.unsafe_handoff_keep_leader_lease();
    }
    let stop_admin = CancellationToken::new();
    let admin = cluster::serve_admin(
        admin_listener,
        &backend,
        args.controls.unsafe_allow_leader_removal,
        stop_admin.clone(),
    )?;
    let (stop_peers, peers_stopped) = tokio::sync::oneshot::channel::<()>();
    let peers = {
        let backend = Arc::clone(&backend);
        tokio::spawn(async move {
            let stopped = async {
                let _ = peers_stopped.await;
            };
            backend.serve_peers(peer_listener, stopped).await
        })
    };
    let info = NodeInfo {
        backend: "raft".into(),
        node_id,
        raft: Some(backend.status_reader()),
    };
    let guard = start_oracle(&args, backend.clone(), probes).with_node_info(info);
    tracing::info!(
        %addr, node_id, peers = %peer_listen, client_tls, peer_tls,
        data_dir = %args.data_dir.display(), "serving"
    );
    println!("serving on {addr}");
    // The client listener keeps answering during the handoff: "not leader", with a hint to the
    // successor, so clients go straight there.
    let activity = guard.activity();
    let stop = async {
        stop_requested(probes, stop_rx).await;
        let deadline = tokio::time::Instant::now() + args.shutdown_grace;
        if !args.no_handoff
            && let Ok(HandoffOutcome::HandedTo { .. }) = backend.hand_off(deadline).await
        {
            // Clients are told "not leader" with the successor's address; closing the
            // connections while they still send would cut calls short (a client sees them
            // CANCELLED, not knowing whether they ran). Wait until they have gone.
            let linger_until = deadline.min(tokio::time::Instant::now() + HANDOFF_LINGER_MAX);
            activity.wait_idle(HANDOFF_LINGER_IDLE, linger_until).await;
        }
    };
    let served = serve_listener_tls(listener, guard, tls, stop).await;
    stop_admin.cancel();
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    let _ = stop_peers.send(());
    let _ = peers.await;
    backend.shutdown().await;
    served?;
    tracing::info!("stopped");
    Ok(())
}

async fn serve_etcd(
    args: ServeArgs,
    probes: &ProbeState,
    stop_rx: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.tls.has_peer_flags() && !args.tls.has_admin_flags(),
        "--peer-tls-* and --admin-tls-* apply to raft clusters: use them with --backend raft"
    );
    anyhow::ensure!(
        args.cluster.admin_listen.is_none()
            && args.cluster.peer_addr.is_none()
            && args.cluster.members.is_empty()
            && !args.cluster.join,
        "--admin-listen, --peer-addr, --members and --join are raft flags: an etcd backend's \
         members are whoever runs with the same --etcd-endpoints and --etcd-prefix"
    );
    anyhow::ensure!(
        !args.controls.unsafe_ack_before_fsync && !args.controls.unsafe_skip_dir_fsync,
        "the fsync controls break a local disk; the etcd backend keeps nothing on one"
    );
    if args.controls.unsafe_etcd_ignore_lease {
        tracing::warn!(
            "UNSAFE: the etcd leader lease ignores its deadline; this server breaks its guarantees on purpose"
        );
        tso_server::backend::etcd::unsafe_etcd_ignore_lease();
    }
    if args.controls.unsafe_etcd_skip_fence {
        tracing::warn!(
            "UNSAFE: etcd writes skip their fencing compares; this server breaks its guarantees on purpose"
        );
        tso_server::backend::etcd::unsafe_etcd_skip_fence();
    }
    let node_id = args
        .cluster
        .node_id
        .context("--backend etcd needs --node-id (distinct for every node of one oracle)")?;
    anyhow::ensure!(
        !args.etcd.etcd_endpoints.is_empty(),
        "--backend etcd needs --etcd-endpoints (the etcd cluster's client URLs)"
    );
    let tls = args.tls.client_port()?;
    let client_tls = tls.is_some();
    let listener = bind_client(&args).await?;
    let addr = listener.local_addr()?;
    let client_addr = args
        .cluster
        .advertise_client_addr
        .clone()
        .unwrap_or_else(|| addr.to_string());
    let config = EtcdConfig {
        endpoints: args.etcd.etcd_endpoints.clone(),
        prefix: args.etcd.etcd_prefix.clone(),
        node_id,
        client_addr,
        lease_ttl: args.etcd.etcd_lease_ttl,
        tls: args.etcd.tls()?,
    };
    let backend = Arc::new(
        EtcdBackend::open(config)
            .await
            .context("starting the etcd backend")?,
    );
    let info = NodeInfo {
        backend: "etcd".into(),
        node_id,
        raft: None,
    };
    let guard = start_oracle(&args, backend.clone(), probes).with_node_info(info);
    tracing::info!(
        %addr, node_id, etcd = %args.etcd.etcd_endpoints.join(","),
        prefix = %args.etcd.etcd_prefix, client_tls, "serving"
    );
    println!("serving on {addr}");
    let served = serve_listener_tls(listener, guard, tls, stop_requested(probes, stop_rx)).await;
    backend.shutdown().await;
    served?;
    tracing::info!("stopped");
    Ok(())
}

async fn serve_file(
    args: ServeArgs,
    probes: &ProbeState,
    stop_rx: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.tls.has_peer_flags(),
        "--peer-tls-* apply to raft peers: use them with --backend raft"
    );
    anyhow::ensure!(
        args.cluster.admin_listen.is_none() && !args.tls.has_admin_flags(),
        "--admin-listen and --admin-tls-* serve raft membership changes: use them with --backend raft"
    );
    anyhow::ensure!(
        !args.controls.unsafe_ack_before_fsync,
        "--unsafe-ack-before-fsync breaks the raft log store: use it with --backend raft"
    );
    anyhow::ensure!(
        !args.controls.unsafe_etcd_ignore_lease && !args.controls.unsafe_etcd_skip_fence,
        "--unsafe-etcd-ignore-lease and --unsafe-etcd-skip-fence break the etcd backend: use them with --backend etcd"
    );
    let tls = args.tls.client_port()?;
    let client_tls = tls.is_some();
    if args.controls.unsafe_skip_dir_fsync {
        tracing::warn!(
            "UNSAFE: replaced records are not followed by a directory fsync; this server breaks its guarantees on purpose"
        );
        tso_server::backend::file::unsafe_skip_dir_fsync();
    }
    let backend: Arc<dyn Backend> = Arc::new(FileBackend::open(&args.data_dir)?);
    let listener = bind_client(&args).await?;
    let addr = listener.local_addr()?;
    let info = NodeInfo {
        backend: "file".into(),
        node_id: 0,
        raft: None,
    };
    let guard = start_oracle(&args, backend, probes).with_node_info(info);
    if !guard.wait_serving().await {
        return guard
            .shutdown()
            .await
            .context("the server failed before serving");
    }
    tracing::info!(%addr, client_tls, data_dir = %args.data_dir.display(), "serving");
    println!("serving on {addr}");
    serve_listener_tls(listener, guard, tls, stop_requested(probes, stop_rx)).await?;
    tracing::info!("stopped");
    Ok(())
}

/// The positive control of `tso check`: a backend whose loads read the durable high-water as
/// 0, as if its record were lost, so the fence starts from the clock alone. Applying still
/// ratchets the real record, and the leader lease is the backend's own; only the fence's view
/// of the high-water is wrong.
struct ForgetHighWater<B>(B);

impl<B: Backend> Backend for ForgetHighWater<B> {
    fn leadership(&self) -> tokio::sync::watch::Receiver<Leadership> {
        self.0.leadership()
    }

    fn leader_lease_valid(&self, epoch: tso_core::Epoch) -> bool {
        self.0.leader_lease_valid(epoch)
    }

    fn load(&self) -> BoxFuture<'_, Result<OracleState, BackendError>> {
        Box::pin(async {
            let state = self.0.load().await?;
            Ok(OracleState {
                high_water_ms: 0,
                ..state
            })
        })
    }

    fn apply(
        &self,
        cmd: OracleCommand,
        epoch: tso_core::Epoch,
    ) -> BoxFuture<'_, Result<Stored, BackendError>> {
        self.0.apply(cmd, epoch)
    }
}

/// Starts the oracle on `backend` (through a positive control's wrapper when one is asked
/// for), with this server's configuration and clock, and points the probes at it.
fn start_oracle(args: &ServeArgs, backend: Arc<dyn Backend>, probes: &ProbeState) -> OracleGuard {
    if args.controls.unsafe_raise_in_memory {
        tracing::warn!(
            "UNSAFE: raises of the high-water stay in memory; this server breaks its guarantees on purpose"
        );
        tso_server::ops::unsafe_raise_in_memory();
    }
    let guard = OracleGuard::start_with_clock(
        positive_control(args, Arc::clone(&backend)),
        oracle_config(args),
        clock(args),
    );
    probes.follow(guard.serving(), backend);
    guard
}

/// `backend`, or, for the checker's positive control, the same backend with its high-water
/// forgotten by the fence.
fn positive_control(args: &ServeArgs, backend: Arc<dyn Backend>) -> Arc<dyn Backend> {
    if !args.controls.unsafe_forget_high_water {
        return backend;
    }
    tracing::warn!(
        "UNSAFE: the fence forgets the durable high-water; this server breaks its guarantees on purpose"
    );
    Arc::new(ForgetHighWater(backend))
}

/// The system clock, or, for fault tests, one shifted by the offset in a file.
fn clock(args: &ServeArgs) -> Arc<dyn Clock> {
    let Some(path) = args.controls.unsafe_clock_offset_file.clone() else {
        return Arc::new(SystemClock);
    };
    tracing::warn!(path = %path.display(), "UNSAFE: the clock follows an offset file; for fault tests only");
    let clock = Arc::new(OffsetClock::new(read_offset(&path)));
    let shifted = Arc::clone(&clock);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(CLOCK_OFFSET_POLL).await;
            shifted.set_offset_ms(read_offset(&path));
        }
    });
    clock
}

/// How often the offset file is re-read.
const CLOCK_OFFSET_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// The offset in the file; 0 when the file is missing or unreadable.
fn read_offset(path: &std::path::Path) -> i64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

pub fn init_logging(filter: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).with_context(|| {
        format!("invalid --log filter {filter:?}: use e.g. `info` or `tso_server=debug`")
    })?;
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    Ok(())
}

pub fn init(args: InitArgs) -> anyhow::Result<()> {
    let Some(seed_physical_ms) = args.seed_physical_ms else {
        return crate::recover::init(args);
    };
    file::init(&args.data_dir, seed_physical_ms)?;
    println!(
        "initialized {} at {} ms",
        args.data_dir.display(),
        seed_physical_ms
    );
    Ok(())
}
