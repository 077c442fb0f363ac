//! Asks a tso server for one timestamp and a batch, and prints them.
//!
//! ```text
//! cargo run -p tso-client --example get_ts -- 127.0.0.1:50551,127.0.0.1:50552 1000
//! ```
//!
//! The first argument lists the servers (any of them: the leader is found through hints); the
//! second is the batch size.

use std::time::Duration;

use tso_client::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let endpoints = args.next().unwrap_or_else(|| "127.0.0.1:50551".into());
    let count: u64 = args.next().map(|n| n.parse()).transpose()?.unwrap_or(1000);

    let client = Client::builder()
        .overall_timeout(Duration::from_secs(10))
        .connect(endpoints.split(','))
        .await?;

    let ts = client.get_ts().await?;
    println!(
        "one timestamp: {ts} (physical {} ms, logical {})",
        ts.physical_ms(),
        ts.logical()
    );

    let batch = client.get_ts_batch(count).await?;
    println!(
        "{} timestamps from {} to {}",
        batch.count(),
        batch.first(),
        batch.last()
    );
    for range in batch.ranges() {
        println!(
            "  grant of {} at epoch {}: {}..={}",
            range.count(),
            range.epoch(),
            range.first(),
            range.last()
        );
    }
    if let (Some(leader), epoch) = client.leader() {
        println!("leader: {leader} at epoch {epoch}");
    }
    Ok(())
}
