//! Embedding the oracle in your own tonic server.
//!
//! Start an [`OracleGuard`] over a backend, add its service to your server next to your own
//! services, and stop the guard when your server stops. `guard.failed()` resolves if serving is
//! poisoned (a permanent backend error), so your server can stop loudly too.
//!
//! Run: `cargo run -p tso-server --example embed`

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tso_proto::v1::GetTsRequest;
use tso_proto::v1::tso_service_client::TsoServiceClient;
use tso_server::backend::file::FileBackend;
use tso_server::{Config, OracleGuard};

/// Serves the oracle inside a host server, takes three timestamps, and stops.
pub async fn run(data_dir: &std::path::Path) -> Result<Vec<u64>, Box<dyn std::error::Error>> {
    let backend = Arc::new(FileBackend::open(data_dir)?);
    let guard = OracleGuard::start(backend, Config::default());

    // Your own server: add your services beside the oracle's.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let server = Server::builder()
        .add_service(guard.service())
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), stop.clone().cancelled_owned());
    let server = tokio::spawn(server);

    guard.wait_serving().await;
    let mut client = TsoServiceClient::connect(format!("http://{addr}")).await?;
    let mut values = Vec::new();
    for _ in 0..3 {
        let reply = client.get_ts(GetTsRequest { count: 1 }).await?.into_inner();
        values.push(reply.physical_ms << 18 | reply.logical_start as u64);
    }

    // Stop your server first (in-flight calls finish), then the oracle.
    stop.cancel();
    server.await??;
    guard.shutdown().await?;
    Ok(values)
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("tso-embed-example-{}", std::process::id()));
    for ts in run(&dir).await? {
        println!("{ts}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
