//! The `restore` fault: disaster recovery as docs/operations.md tells an operator to run it.
//! Every node is killed, each one's data directory is exported (`tso export`), fresh
//! directories are seeded from all the exports (`tso init --from`), and every node starts on
//! its fresh directory. The history then shows whether anything answered after the restore is
//! at or below something answered before (G1, D1).
//!
//! The seed is taken from every node's copy, so no margin is needed to cover a lagging copy:
//! the timestamp margin is 0 and the sequence margin 0, which also keeps the sequences dense
//! (a margin would show as a gap no failed call explains).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::process::Command;

use super::cluster::{Applied, Cluster};

/// Runs `tso ARGS`; its stdout, or an error with its stderr.
async fn tso(bin: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {} {}", bin.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "tso {} exited with {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Cluster {
    /// Kills every node, exports each data directory, and seeds a fresh one for each from all
    /// the exports (the old directories are kept beside, renamed). The nodes start at the heal.
    pub(super) async fn restore(&mut self) -> anyhow::Result<Applied> {
        let backend = if self.raft.is_some() { "raft" } else { "file" };
        for node in &mut self.nodes {
            node.kill().await?;
        }
        let round = self.restores;
        self.restores += 1;
        let mut exports: Vec<PathBuf> = Vec::new();
        for node in &self.nodes {
            let data = node.data_dir();
            if !data.exists() {
                continue;
            }
            let out = node.node_dir().join(format!("export-{round}.json"));
            tso(
                node.bin(),
                &[
                    "export",
                    "--data-dir",
                    &data.to_string_lossy(),
                    "--out",
                    &out.to_string_lossy(),
                ],
            )
            .await
            .with_context(|| format!("exporting node {}", node.name))?;
            exports.push(out);
        }
        anyhow::ensure!(
            !exports.is_empty(),
            "no node had a data directory to export"
        );
        let mut said = String::new();
        for node in &self.nodes {
            let data = node.data_dir();
            if data.exists() {
                let kept = node.node_dir().join(format!("data.before-restore-{round}"));
                std::fs::rename(&data, &kept)
                    .with_context(|| format!("moving {} aside", data.display()))?;
            }
            let mut args = vec![
                "init".to_string(),
                "--backend".into(),
                backend.into(),
                "--data-dir".into(),
                data.to_string_lossy().into_owned(),
                "--ts-margin".into(),
                "0s".into(),
                "--seq-margin".into(),
                "0".into(),
            ];
            for export in &exports {
                args.push("--from".into());
                args.push(export.to_string_lossy().into_owned());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            said = tso(node.bin(), &args)
                .await
                .with_context(|| format!("seeding node {}", node.name))?;
        }
        let seeded = said
            .lines()
            .find(|l| l.contains("high-water") || l.contains("seeded"))
            .unwrap_or("")
            .trim()
            .to_string();
        Ok(Applied {
            outcome: "applied",
            note: Some(format!(
                "{} export(s); every node seeded from all of them{}",
                exports.len(),
                if seeded.is_empty() {
                    String::new()
                } else {
                    format!(": {seeded}")
                }
            )),
            hung: false,
        })
    }
}
