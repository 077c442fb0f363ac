//! `tso lease acquire|renew|release` and `tso frontier`: stamping leases and the safe frontier
//! from any server speaking `tsoracle.v1`, through the client library (hints followed, retries
//! of what is safe to repeat). One line per result: a lease as
//! `ID<TAB>ts_upper_bound=MS<TAB>expires_at_ms=MS<TAB>epoch=E`, a release as `ID<TAB>released`,
//! the frontier as `MS` (`MS<TAB>epoch=E` with `--verbose`).

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use tso_client::{Client, Error, LeaseGrant};

use crate::cli::{CallArgs, FrontierArgs, LeaseArgs, LeaseCommand};

pub fn run(args: LeaseArgs) -> anyhow::Result<()> {
    let call = match &args.command {
        LeaseCommand::Acquire(a) => &a.call,
        LeaseCommand::Renew(a) | LeaseCommand::Release(a) => &a.call,
    };
    block_on(call, lease(&args.command))
}

pub fn frontier(args: FrontierArgs) -> anyhow::Result<()> {
    block_on(&args.call, async {
        let client = connect(&args.call).await?;
        let frontier = client
            .safe_frontier()
            .await
            .map_err(|err| explain(err, &args.call, "no safe frontier"))?;
        if args.verbose {
            print_line(&format!(
                "{}\tepoch={}",
                frontier.physical_ms(),
                frontier.epoch()
            ))
        } else {
            print_line(&frontier.physical_ms().to_string())
        }
    })
}

fn block_on(call: &CallArgs, work: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    crate::serve::init_logging(&call.log)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(work)
}

async fn connect(call: &CallArgs) -> anyhow::Result<Client> {
    call.tls
        .client_builder()?
        .overall_timeout(call.timeout)
        .connect(&call.endpoints)
        .await
        .context("bad --endpoints")
}

async fn lease(command: &LeaseCommand) -> anyhow::Result<()> {
    match command {
        LeaseCommand::Acquire(args) => {
            let client = connect(&args.call).await?;
            let holder = args.holder.as_bytes();
            let grant = client
                .acquire_lease(holder, args.holder_epoch, args.ttl)
                .await
                .map_err(|err| explain(err, &args.call, "no lease"))?;
            print_line(&line(&grant))
        }
        LeaseCommand::Renew(args) => {
            let client = connect(&args.call).await?;
            // The reply does not repeat the TTL, which only sets the grant's local expiry on
            // this process's clock: a one-shot command prints the server's values only.
            let any_ttl = Duration::from_secs(1);
            let grant = client
                .renew_lease(args.lease_id, any_ttl)
                .await
                .map_err(|err| explain(err, &args.call, "lease not renewed"))?;
            print_line(&line(&grant))
        }
        LeaseCommand::Release(args) => {
            let client = connect(&args.call).await?;
            client
                .release_lease(args.lease_id)
                .await
                .map_err(|err| explain(err, &args.call, "lease not released"))?;
            print_line(&format!("{}\treleased", args.lease_id))
        }
    }
}

/// `ID<TAB>ts_upper_bound=MS<TAB>expires_at_ms=MS<TAB>epoch=E`.
fn line(grant: &LeaseGrant) -> String {
    format!(
        "{}\tts_upper_bound={}\texpires_at_ms={}\tepoch={}",
        grant.lease_id(),
        grant.ts_upper_bound_ms(),
        grant.expires_at_ms(),
        grant.epoch()
    )
}

fn print_line(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// The error with what it means for the caller: the lease's own refusals speak for themselves;
/// anything else is most likely a server that is not there.
fn explain(err: Error, call: &CallArgs, what: &str) -> anyhow::Error {
    let context = match &err {
        Error::LeaseNotFound { .. } | Error::LeaseLost { .. } | Error::StaleHolderEpoch { .. } => {
            format!("{what}: refused")
        }
        Error::InvalidArgument { .. }
        | Error::InvalidLeaseHolder { .. }
        | Error::InvalidLeaseTtl { .. } => "bad request".to_string(),
        Error::Server {
            code: tonic::Code::Unimplemented,
            ..
        } => format!("{what}: this server has no stamping leases"),
        _ => format!(
            "{what} from {}: {}",
            call.endpoints.join(","),
            crate::tls::unreachable_hint(&call.tls, &err)
        ),
    };
    anyhow::Error::new(err).context(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_went_wrong() {
        let call = CallArgs {
            endpoints: vec!["127.0.0.1:1".into()],
            tls: Default::default(),
            timeout: Duration::from_secs(1),
            log: "warn".into(),
        };
        let text = format!(
            "{:#}",
            explain(
                Error::LeaseNotFound { lease_id: 4 },
                &call,
                "lease not renewed"
            )
        );
        assert!(
            text.starts_with("lease not renewed: refused: lease 4"),
            "{text}"
        );
        let down = Error::Unavailable {
            attempts: 8,
            last: "refused".into(),
        };
        let text = format!("{:#}", explain(down, &call, "no lease"));
        assert!(text.contains("is a server running there?"), "{text}");
        let ttl = Error::InvalidArgument {
            message: "ttl_ms 1000 is below 5000".into(),
        };
        let text = format!("{:#}", explain(ttl, &call, "no lease"));
        assert!(text.starts_with("bad request: "), "{text}");
    }
}
