//! Measures the client under load: `callers` tasks call `get_ts()` in a loop for `seconds`;
//! prints timestamps per second and the p50/p99/max latency of a call, and, for comparison, the
//! latency of one raw `GetTs` RPC on an idle connection.
//!
//! ```text
//! cargo run --release -p tso-client --example load -- 127.0.0.1:50551 256 5 [in_flight] [multi|current]
//! ```
//!
//! The last argument picks the tokio runtime of the load generator (and so of the client):
//! multi-threaded (the default) or current-thread.

use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tso_client::Client;
use tso_proto::v1::GetTsRequest;
use tso_proto::v1::tso_service_client::TsoServiceClient;

/// Raw RPCs timed for the baseline, after as many warm-up calls.
const RAW_CALLS: usize = 2000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let endpoint = args.next().unwrap_or_else(|| "127.0.0.1:50551".into());
    let callers: usize = args.next().map(|n| n.parse()).transpose()?.unwrap_or(16);
    let seconds: u64 = args.next().map(|n| n.parse()).transpose()?.unwrap_or(5);
    let in_flight: usize = args
        .next()
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(tso_client::IN_FLIGHT_RPCS_MAX_DEFAULT);
    let runtime = match args.next().as_deref() {
        None | Some("multi") => tokio::runtime::Builder::new_multi_thread(),
        Some("current") => tokio::runtime::Builder::new_current_thread(),
        Some(other) => return Err(format!("runtime {other:?}: use multi or current").into()),
    }
    .enable_all()
    .build()?;
    runtime.block_on(run(endpoint, callers, seconds, in_flight))
}

async fn run(
    endpoint: String,
    callers: usize,
    seconds: u64,
    in_flight: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let raw = raw_rpc_latencies(&endpoint).await?;
    report("raw GetTs RPC, 1 caller", &raw, None);

    let client = Client::builder()
        .in_flight_rpcs_max(in_flight)
        .connect([endpoint.as_str()])
        .await?;
    for _ in 0..1000 {
        client.get_ts().await?;
    }
    let run_for = Duration::from_secs(seconds);
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    for _ in 0..callers {
        let client = client.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            while start.elapsed() < run_for {
                let asked = Instant::now();
                client.get_ts().await.expect("get_ts");
                latencies.push(asked.elapsed());
            }
            latencies
        });
    }
    let mut latencies = Vec::new();
    while let Some(got) = tasks.join_next().await {
        latencies.extend(got?);
    }
    let elapsed = start.elapsed();
    let runtime = match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::CurrentThread => "current-thread",
        _ => "multi-thread",
    };
    let what =
        format!("client get_ts, {callers} callers, {in_flight} in flight, {runtime} runtime");
    report(&what, &latencies, Some(elapsed));
    Ok(())
}

async fn raw_rpc_latencies(endpoint: &str) -> Result<Vec<Duration>, Box<dyn std::error::Error>> {
    let mut raw = TsoServiceClient::connect(format!("http://{endpoint}")).await?;
    let mut latencies = Vec::with_capacity(RAW_CALLS);
    for i in 0..2 * RAW_CALLS {
        let asked = Instant::now();
        raw.get_ts(GetTsRequest { count: 1 }).await?;
        if i >= RAW_CALLS {
            latencies.push(asked.elapsed());
        }
    }
    Ok(latencies)
}

fn report(what: &str, latencies: &[Duration], elapsed: Option<Duration>) {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize];
    let rate = elapsed
        .map(|e| {
            format!(
                "{:.0} timestamps/s, ",
                sorted.len() as f64 / e.as_secs_f64()
            )
        })
        .unwrap_or_default();
    println!(
        "{what}: {rate}{} calls, p50 {:?}, p99 {:?}, max {:?}",
        sorted.len(),
        at(0.5),
        at(0.99),
        sorted[sorted.len() - 1]
    );
}
