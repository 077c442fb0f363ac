//! `tso get`.

use crate::cli::GetArgs;

pub fn run(_args: GetArgs) -> anyhow::Result<()> {
    anyhow::bail!("tso get needs the client library")
}
