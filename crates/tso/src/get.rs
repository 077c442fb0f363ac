//! `tso get`: timestamps from any server speaking `tsoracle.v1`, through the client library
//! (leader hints followed, bounded retries), one per line.

use std::io::{BufWriter, Write};

use crate::cli::GetArgs;
use anyhow::Context;

pub fn run(args: GetArgs) -> anyhow::Result<()> {
    crate::serve::init_logging(&args.log)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(get(args))
}

async fn get(args: GetArgs) -> anyhow::Result<()> {
    let client = args
        .tls
        .client_builder()?
        .overall_timeout(args.timeout)
        .connect(&args.endpoints)
        .await
        .context("bad --endpoints")?;
    let batch = client.get_ts_batch(args.count).await.map_err(|e| {
        let hint = crate::tls::unreachable_hint(&args.tls, &e);
        anyhow::Error::new(e).context(format!(
            "no timestamps from {}: {hint}",
            args.endpoints.join(",")
        ))
    })?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    for range in batch.ranges() {
        for ts in range.iter() {
            if args.verbose {
                writeln!(
                    out,
                    "{ts}\tphysical_ms={}\tlogical={}\tepoch={}",
                    ts.physical_ms(),
                    ts.logical(),
                    range.epoch()
                )?;
            } else {
                writeln!(out, "{ts}")?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
