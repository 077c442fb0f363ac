//! `tso export` and `tso init --from`: disaster recovery when a cluster's disks are gone but
//! copies of some nodes' data directories (or etcd's keys) survive.
//!
//! An export is one JSON object (format `tso-export`, version 1):
//!
//! ```json
//! {
//!   "format": "tso-export",
//!   "version": 1,
//!   "source": {"backend": "raft", "data_dir": "/var/lib/tso/node-2", "node_id": 2,
//!              "exported_at": "2026-12-07T14:00:00Z", "exported_at_ms": 1796652000000},
//!   "high_water_ms": 1796651990123,
//!   "sequences": {"invoice": 1042, "order": 77},
//!   "lease_term": 3,
//!   "leases": "0103000000...",
//!   "lease_count": 1, "lease_next_id": 3, "lease_bound_max_ms": 1796651989000,
//!   "checksum": "crc32c:5d1f0a3c"
//! }
//! ```
//!
//! - `sequences` maps each dense-sequence key to its next unissued value. Keys are JSON strings
//!   as they are: the oracle only accepts non-empty UTF-8 keys (SEMANTICS §11), which JSON
//!   strings carry exactly (serde_json escapes what needs escaping).
//! - `leases` is the stamping-lease set exactly as the backend stores it, in lowercase hex (the
//!   encoding of `stamping.rs`, opaque here); `lease_count`, `lease_next_id` and
//!   `lease_bound_max_ms` are decoded from it for the operator, and checked against it on read.
//! - `checksum` is the CRC32C of the object without `checksum`, in a canonical form (objects
//!   with their keys sorted, no whitespace, numbers and strings as serde_json writes them), so
//!   reformatting a file keeps it valid while any change of a value, a damaged byte, an extra
//!   or a missing field makes `tso init` refuse the file, naming it.
//!
//! `tso init --from` takes the maximum of every field over all the exports (each counter per
//! key), adds the margins, and seeds a fresh directory with it; see docs/operations.md,
//! "Disaster recovery: export and init", for why and how to choose the margins.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use serde_json::{Map, Value, json};
use tso_core::PHYSICAL_MAX_MS;
use tso_server::backend::OracleState;
use tso_server::backend::recover::{self, DirKind};

use crate::cli::{BackendKind, EtcdArgs, ExportArgs, InitArgs};

/// The `format` of an export file.
const FORMAT: &str = "tso-export";
/// The `version` this build writes and reads.
const VERSION: u64 = 1;
/// Every field of an export, besides `checksum`: a file with any other is refused.
const FIELDS: [&str; 10] = [
    "format",
    "version",
    "source",
    "high_water_ms",
    "sequences",
    "lease_term",
    "leases",
    "lease_count",
    "lease_next_id",
    "lease_bound_max_ms",
];

/// `tso export`.
pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    let (source, state) = match (&args.data_dir, args.backend) {
        (Some(dir), _) => export_dir(dir)?,
        (None, Some(BackendKind::Etcd)) => export_etcd(&args.etcd)?,
        (None, Some(other)) => bail!(
            "--backend {} reads a data directory: give --data-dir (--backend is for etcd)",
            match other {
                BackendKind::File => "file",
                _ => "raft",
            }
        ),
        (None, None) => bail!("give --data-dir DIR, or --backend etcd with --etcd-endpoints"),
    };
    let doc = to_json(source, &state)?;
    let text = serde_json::to_string_pretty(&doc).expect("JSON values always print") + "\n";
    match &args.out {
        Some(out) => write_atomically(out, text.as_bytes())?,
        None => print!("{text}"),
    }
    eprintln!(
        "exported high-water {} ms, {} sequence keys, lease term {}{}",
        state.high_water_ms,
        state.sequences.len(),
        state.lease_term,
        args.out
            .as_ref()
            .map(|o| format!(" to {}", o.display()))
            .unwrap_or_default()
    );
    Ok(())
}

fn export_dir(dir: &Path) -> anyhow::Result<(Map<String, Value>, OracleState)> {
    let found = recover::export_dir(dir).with_context(|| format!("exporting {}", dir.display()))?;
    let shown = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
    let mut source = Map::new();
    source.insert("backend".into(), found.kind.name().into());
    source.insert("data_dir".into(), shown.display().to_string().into());
    if found.kind == DirKind::Raft {
        source.insert(
            "node_id".into(),
            found.node_id.map_or(Value::Null, Value::from),
        );
    }
    Ok((source, found.state))
}

fn export_etcd(args: &EtcdArgs) -> anyhow::Result<(Map<String, Value>, OracleState)> {
    ensure!(
        !args.etcd_endpoints.is_empty(),
        "--backend etcd needs --etcd-endpoints (the etcd cluster's client URLs)"
    );
    let tls = args.tls()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let read = runtime.block_on(tso_server::backend::etcd::read_state_key(
        &args.etcd_endpoints,
        &args.etcd_prefix,
        tls.as_ref(),
    ));
    let read = read.map_err(|e| anyhow::anyhow!("reading {}/state: {e}", args.etcd_prefix))?;
    let Some((state, mod_revision)) = read else {
        bail!(
            "etcd holds no state under {} ({}): check --etcd-prefix",
            args.etcd_prefix,
            args.etcd_endpoints.join(",")
        );
    };
    let mut source = Map::new();
    source.insert("backend".into(), "etcd".into());
    source.insert("etcd_endpoints".into(), json!(args.etcd_endpoints));
    source.insert("etcd_prefix".into(), args.etcd_prefix.clone().into());
    source.insert("etcd_mod_revision".into(), mod_revision.into());
    Ok((source, state))
}

/// The export document of `state`, with its checksum.
fn to_json(mut source: Map<String, Value>, state: &OracleState) -> anyhow::Result<Value> {
    let now = SystemTime::now();
    source.insert(
        "exported_at".into(),
        humantime::format_rfc3339_seconds(now).to_string().into(),
    );
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    source.insert("exported_at_ms".into(), now_ms.into());
    let leases = recover::lease_summary(&state.leases)
        .map_err(|e| anyhow::anyhow!("the stored lease set does not decode: {e}"))?;
    let sequences: Map<String, Value> = state
        .sequences
        .iter()
        .map(|(key, next)| (key.clone(), Value::from(*next)))
        .collect();
    let mut doc = json!({
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "high_water_ms": state.high_water_ms,
        "sequences": sequences,
        "lease_term": state.lease_term,
        "leases": hex(&state.leases),
        "lease_count": leases.count,
        "lease_next_id": leases.next_id,
        "lease_bound_max_ms": leases.bound_max_ms,
    });
    let sum = checksum(&doc);
    doc.as_object_mut()
        .expect("an object")
        .insert("checksum".into(), sum.into());
    Ok(doc)
}

/// `crc32c:` and the CRC32C of the canonical form of `doc` (without its `checksum`).
fn checksum(doc: &Value) -> String {
    let mut text = String::new();
    canonical(doc, &mut text);
    format!("crc32c:{:08x}", recover::crc32c(text.as_bytes()))
}

/// `value` with object keys sorted at every level and no whitespace; scalars as serde_json
/// writes them (`checksum` at the top level left out).
fn canonical(value: &Value, out: &mut String) {
    canonical_at(value, out, true);
}

fn canonical_at(value: &Value, out: &mut String, top: bool) {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<&String, &Value> = map
                .iter()
                .filter(|(k, _)| !(top && k.as_str() == "checksum"))
                .collect();
            out.push('{');
            for (i, (key, value)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::from(key.as_str()).to_string());
                out.push(':');
                canonical_at(value, out, false);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_at(item, out, false);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One verified export file.
struct Export {
    path: PathBuf,
    source: String,
    state: OracleState,
}

/// Reads and verifies the export at `path`: JSON, format and version, checksum, every field
/// present and well-formed, the decoded lease summary equal to the set. Every error names the
/// file.
fn read_export(path: &Path) -> anyhow::Result<Export> {
    let refuse = |why: String| {
        anyhow::anyhow!(
            "{}: {why}; refusing this export (write a new one with `tso export`)",
            path.display()
        )
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: Value =
        serde_json::from_str(&text).map_err(|e| refuse(format!("not valid JSON ({e})")))?;
    let obj = doc
        .as_object()
        .ok_or_else(|| refuse("not a JSON object".into()))?;
    match obj.get("format").and_then(Value::as_str) {
        Some(FORMAT) => {}
        other => return Err(refuse(format!("format {other:?}, expected {FORMAT:?}"))),
    }
    match obj.get("version").and_then(Value::as_u64) {
        Some(VERSION) => {}
        other => {
            return Err(refuse(format!(
                "version {other:?}, this build reads version {VERSION}"
            )));
        }
    }
    let stored = obj
        .get("checksum")
        .and_then(Value::as_str)
        .ok_or_else(|| refuse("no checksum".into()))?;
    let computed = checksum(&doc);
    if stored != computed {
        return Err(refuse(format!(
            "checksum mismatch (stored {stored}, computed {computed}): the file was damaged or \
             edited"
        )));
    }
    if let Some(extra) = obj
        .keys()
        .find(|k| k.as_str() != "checksum" && !FIELDS.contains(&k.as_str()))
    {
        return Err(refuse(format!("unknown field {extra:?}")));
    }
    let number = |field: &str| {
        obj.get(field)
            .and_then(Value::as_u64)
            .ok_or_else(|| refuse(format!("{field} is missing or not a whole number")))
    };
    let high_water_ms = number("high_water_ms")?;
    if high_water_ms > PHYSICAL_MAX_MS {
        return Err(refuse(format!(
            "high-water {high_water_ms} ms is past the 46-bit timestamp layout"
        )));
    }
    let mut sequences = BTreeMap::new();
    let seqs = obj
        .get("sequences")
        .and_then(Value::as_object)
        .ok_or_else(|| refuse("sequences is missing or not an object".into()))?;
    for (key, next) in seqs {
        let next = next
            .as_u64()
            .filter(|_| !key.is_empty())
            .ok_or_else(|| refuse(format!("sequence {key:?} is not a whole number")))?;
        sequences.insert(key.clone(), next);
    }
    let leases = obj
        .get("leases")
        .and_then(Value::as_str)
        .and_then(unhex)
        .ok_or_else(|| refuse("leases is missing or not hex".into()))?;
    let summary =
        recover::lease_summary(&leases).map_err(|e| refuse(format!("the lease set: {e}")))?;
    let declared = (
        number("lease_count")?,
        number("lease_next_id")?,
        number("lease_bound_max_ms")?,
    );
    if declared != (summary.count as u64, summary.next_id, summary.bound_max_ms) {
        return Err(refuse(
            "lease_count, lease_next_id or lease_bound_max_ms disagree with the lease set".into(),
        ));
    }
    let source = obj
        .get("source")
        .and_then(Value::as_object)
        .ok_or_else(|| refuse("source is missing or not an object".into()))?;
    let describe = |k: &str| source.get(k).map(|v| format!("{k} {v}"));
    let source = [
        "backend",
        "data_dir",
        "node_id",
        "etcd_prefix",
        "exported_at",
    ]
    .iter()
    .filter_map(|k| describe(k))
    .collect::<Vec<_>>()
    .join(", ");
    Ok(Export {
        path: path.to_owned(),
        source,
        state: OracleState {
            high_water_ms,
            sequences,
            lease_term: number("lease_term")?,
            leases,
        },
    })
}

/// What `tso init --from` seeds, from the exports and the margins.
///
/// - high-water: the highest of the exports' high-waters and lease bounds, plus the ts margin.
///   A lease's bound is a high-water the dead cluster made durable; putting the seed above the
///   highest one keeps every timestamp of the new cluster above whatever a holder may still
///   stamp under an old lease.
/// - counters: each key's highest next value over the exports, plus the seq margin.
/// - lease set: the one with the highest lease bound (the latest the exports saw; ties go to
///   the highest lease term), so that the new leader keeps old holders' bounds in the safe
///   frontier until they expire, with its next lease id raised to the highest of all exports
///   plus the seq margin (a lease id is never handed out twice), and its term reset to 0 (the
///   new cluster's terms start again from 1, and a set of a higher term would never be
///   replaced).
fn merge(exports: &[Export], ts_margin: Duration, seq_margin: u64) -> anyhow::Result<OracleState> {
    let mut high_water_ms = 0;
    let mut sequences: BTreeMap<String, u64> = BTreeMap::new();
    let mut next_id = 1;
    let mut latest: Option<((u64, u64), &[u8])> = None;
    for e in exports {
        high_water_ms = high_water_ms.max(e.state.high_water_ms);
        for (key, next) in &e.state.sequences {
            let counter = sequences.entry(key.clone()).or_insert(0);
            *counter = (*counter).max(*next);
        }
        let summary = recover::lease_summary(&e.state.leases)
            .map_err(|err| anyhow::anyhow!("{}: the lease set: {err}", e.path.display()))?;
        next_id = next_id.max(summary.next_id);
        high_water_ms = high_water_ms.max(summary.bound_max_ms);
        let rank = (summary.bound_max_ms, e.state.lease_term);
        if !e.state.leases.is_empty() && latest.is_none_or(|(best, _)| rank > best) {
            latest = Some((rank, &e.state.leases));
        }
    }
    let margin_ms = u64::try_from(ts_margin.as_millis()).unwrap_or(u64::MAX);
    let high_water_ms = high_water_ms.saturating_add(margin_ms);
    ensure!(
        high_water_ms <= PHYSICAL_MAX_MS,
        "the seed's high-water {high_water_ms} ms is past the 46-bit timestamp layout: \
         --ts-margin is too large"
    );
    // A counter at u64::MAX has nothing left to issue: staying there never issues a value twice.
    for next in sequences.values_mut() {
        *next = next.saturating_add(seq_margin);
    }
    let leases = match latest {
        Some((_, record)) => {
            recover::raise_lease_next_id(record, next_id.saturating_add(seq_margin))
                .map_err(|e| anyhow::anyhow!("the lease set: {e}"))?
        }
        None => Vec::new(),
    };
    Ok(OracleState {
        high_water_ms,
        sequences,
        lease_term: 0,
        leases,
    })
}

/// `tso init --from FILE... --ts-margin D --seq-margin N --data-dir DIR [--backend file|raft]`.
pub fn init(args: InitArgs) -> anyhow::Result<()> {
    ensure!(
        !args.from.is_empty(),
        "give --seed-physical-ms, or --from with the files of `tso export`"
    );
    let ts_margin = args.ts_margin.context(
        "--from needs --ts-margin: how far the dead cluster may have run past the exports \
         (see docs/operations.md, \"Disaster recovery\")",
    )?;
    let seq_margin = args.seq_margin.context(
        "--from needs --seq-margin: how many sequence values per key the exports may lack \
         (see docs/operations.md, \"Disaster recovery\")",
    )?;
    let exports = args
        .from
        .iter()
        .map(|path| read_export(path))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let seed = merge(&exports, ts_margin, seq_margin)?;
    let dir = &args.data_dir;
    let fingerprint = match args.backend {
        BackendKind::File => {
            recover::seed_file_dir(dir, &seed)
                .with_context(|| format!("seeding {}", dir.display()))?;
            None
        }
        BackendKind::Raft => {
            recover::seed_raft_dir(dir, &seed)
                .with_context(|| format!("seeding {}", dir.display()))?;
            tso_server::backend::raft::seed_fingerprint(dir)
                .with_context(|| format!("reading back the seed of {}", dir.display()))?
        }
        BackendKind::Etcd => bail!(
            "--backend etcd keeps nothing on local disk: seed a file directory or raft \
             directories (--backend file or raft)"
        ),
    };
    for e in &exports {
        println!(
            "from {}: high-water {} ms, {} sequence keys ({})",
            e.path.display(),
            e.state.high_water_ms,
            e.state.sequences.len(),
            e.source
        );
    }
    let leases = recover::lease_summary(&seed.leases).unwrap_or_default();
    println!(
        "seeded {} ({} backend): high-water {} ms ({}), {} sequence keys, {} leases (next lease \
         id {}); margins {} ms and {} values",
        dir.display(),
        match args.backend {
            BackendKind::Raft => "raft",
            _ => "file",
        },
        seed.high_water_ms,
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(seed.high_water_ms)),
        seed.sequences.len(),
        leases.count,
        leases.next_id,
        ts_margin.as_millis(),
        seq_margin,
    );
    if let Some(fingerprint) = fingerprint {
        println!(
            "raft seed fingerprint {fingerprint:08x}: seed every initial member of the new \
             cluster from the same exports and margins (the same fingerprint) before its first \
             start"
        );
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same directory, fsync'd, then
/// renamed: a reader never sees half an export.
fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let mut temp_name = name.to_owned();
    temp_name.push(".tmp");
    let temp = path.with_file_name(temp_name);
    let mut file =
        std::fs::File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", temp.display()))?;
    drop(file);
    std::fs::rename(&temp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_junk() {
        let bytes = vec![0, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&bytes)), Some(bytes));
        assert_eq!(unhex(""), Some(vec![]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn the_canonical_form_ignores_layout_and_key_order_but_not_values() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": [1, 2], "x": "s"}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":"s","y":[1,2]},"b":1}"#).unwrap();
        let c: Value = serde_json::from_str(r#"{"a":{"x":"s","y":[1,2]},"b":2}"#).unwrap();
        assert_eq!(checksum(&a), checksum(&b));
        assert_ne!(checksum(&a), checksum(&c));
        let mut with_sum = a.clone();
        with_sum
            .as_object_mut()
            .unwrap()
            .insert("checksum".into(), "x".into());
        assert_eq!(
            checksum(&with_sum),
            checksum(&a),
            "the checksum is left out"
        );
    }

    fn export(high_water_ms: u64, keys: &[(&str, u64)]) -> Export {
        Export {
            path: PathBuf::from("x.json"),
            source: String::new(),
            state: OracleState {
                high_water_ms,
                sequences: keys.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                ..OracleState::default()
            },
        }
    }

    #[test]
    fn the_seed_is_the_maximum_plus_the_margins() {
        let exports = [
            export(1_000, &[("a", 10), ("b", 3)]),
            export(2_000, &[("a", 7), ("c", u64::MAX)]),
        ];
        let seed = merge(&exports, Duration::from_secs(10), 100).unwrap();
        assert_eq!(seed.high_water_ms, 12_000);
        let expected: BTreeMap<String, u64> = [("a", 110), ("b", 103), ("c", u64::MAX)]
            .map(|(k, v)| (k.to_string(), v))
            .into();
        assert_eq!(seed.sequences, expected);
        assert!(seed.leases.is_empty());
        assert!(merge(&exports, Duration::from_millis(PHYSICAL_MAX_MS), 0).is_err());
    }

    #[test]
    fn an_export_round_trips_and_an_edit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.json");
        let state = export(1_796_000_000_000, &[("inv\"oice", 42), ("é", 1)]).state;
        let mut source = Map::new();
        source.insert("backend".into(), "file".into());
        let doc = to_json(source, &state).unwrap();
        let text = serde_json::to_string_pretty(&doc).unwrap();
        std::fs::write(&path, &text).unwrap();
        assert_eq!(read_export(&path).unwrap().state, state);
        let edited = text.replace("1796000000000", "1796000000001");
        std::fs::write(&path, edited).unwrap();
        let err = read_export(&path).err().unwrap().to_string();
        assert!(
            err.contains("checksum mismatch") && err.contains("e.json"),
            "{err}"
        );
    }
}
