//! `tso seq`: a block of a dense sequence from any server speaking `tsoracle.v1`, through the
//! client library (hints followed; a call that may have been granted is never retried), one
//! line per key: `KEY START..END (count N, epoch E)`, the block being `START..END` (END
//! excluded).

use std::io::{BufWriter, Write};

use anyhow::Context;
use tso_client::{Error, SeqBlock};

use crate::cli::SeqArgs;

pub fn run(args: SeqArgs) -> anyhow::Result<()> {
    crate::serve::init_logging(&args.log)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(seq(args))
}

async fn seq(args: SeqArgs) -> anyhow::Result<()> {
    let client = args
        .tls
        .client_builder()?
        .overall_timeout(args.timeout)
        .connect(&args.endpoints)
        .await
        .context("bad --endpoints")?;
    let result = if let [key] = &args.keys[..] {
        client.get_seq(key, args.count).await.map(|b| vec![b])
    } else {
        let entries: Vec<(&str, u32)> =
            args.keys.iter().map(|k| (k.as_str(), args.count)).collect();
        client
            .get_seq_batch(&entries)
            .await
            .map(|b| b.into_blocks())
    };
    let blocks = result.map_err(|err| explain(err, &args))?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    for block in &blocks {
        writeln!(out, "{}", line(block))?;
    }
    out.flush()?;
    Ok(())
}

/// `KEY START..END (count N, epoch E)`.
fn line(block: &SeqBlock) -> String {
    format!(
        "{} {}..{} (count {}, epoch {})",
        block.key(),
        block.start(),
        block.end(),
        block.count(),
        block.epoch()
    )
}

/// The error with what it means for the caller: an uncertain call may have spent the values.
fn explain(err: Error, args: &SeqArgs) -> anyhow::Error {
    let keys = args.keys.join(",");
    let context = match &err {
        Error::SeqUncertain { .. } => format!(
            "uncertain: the request for {keys} was sent but no block came back; the values may \
             have been granted (and are then spent), so it was not retried"
        ),
        Error::InvalidSeqKey { .. }
        | Error::InvalidSeqCount { .. }
        | Error::InvalidSeqBatch { .. } => "bad request".to_string(),
        _ => format!(
            "no block of {keys} from {}: {}",
            args.endpoints.join(","),
            crate::tls::unreachable_hint(&args.tls, &err)
        ),
    };
    anyhow::Error::new(err).context(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_uncertain_failure_says_so() {
        let args = SeqArgs {
            keys: vec!["orders".into()],
            count: 5,
            endpoints: vec!["127.0.0.1:1".into()],
            tls: Default::default(),
            timeout: std::time::Duration::from_secs(1),
            log: "warn".into(),
        };
        let uncertain = Error::SeqUncertain {
            endpoint: "http://127.0.0.1:1".into(),
            asked: vec![("orders".into(), 5)],
            reason: "Unavailable: write failed".into(),
        };
        let text = format!("{:#}", explain(uncertain, &args));
        assert!(text.starts_with("uncertain: "), "{text}");
        assert!(text.contains("may be spent"), "{text}");
        let down = Error::Unavailable {
            attempts: 8,
            last: "refused".into(),
        };
        let text = format!("{:#}", explain(down, &args));
        assert!(text.contains("is a server running there?"), "{text}");
        assert!(!text.contains("uncertain"), "{text}");
    }
}
