//! `tso parse`: timestamps decoded offline (no server), and the smallest timestamp of a
//! millisecond, for reading logs and choosing `--at`-style bounds by hand.

use std::io::BufRead;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use tso_core::{LOGICAL_BITS, PHYSICAL_MAX_MS, Timestamp};

use crate::cli::ParseArgs;

pub fn run(args: ParseArgs) -> anyhow::Result<()> {
    if let Some(at) = &args.at {
        anyhow::ensure!(
            args.timestamps.is_empty(),
            "give timestamps to decode, or --at, not both"
        );
        println!("{}", smallest_at(at)?);
        return Ok(());
    }
    anyhow::ensure!(
        !args.timestamps.is_empty(),
        "give one or more timestamps to decode (`-` reads them from stdin, one per line), or --at TIME"
    );
    for word in &args.timestamps {
        if word == "-" {
            for line in std::io::stdin().lock().lines() {
                let line = line.context("reading stdin")?;
                for word in line.split_whitespace() {
                    println!("{}", describe(word)?);
                }
            }
        } else {
            println!("{}", describe(word)?);
        }
    }
    Ok(())
}

/// `TS  physical_ms=MS (RFC 3339 UTC)  logical=L`.
fn describe(word: &str) -> anyhow::Result<String> {
    let raw: u64 = word
        .parse()
        .with_context(|| format!("{word:?} is not a timestamp (an unsigned 64-bit integer)"))?;
    let ts = Timestamp::from_u64(raw);
    let time = UNIX_EPOCH + Duration::from_millis(ts.physical_ms());
    Ok(format!(
        "{raw}  physical_ms={} ({})  logical={}",
        ts.physical_ms(),
        humantime::format_rfc3339_millis(time),
        ts.logical()
    ))
}

/// The smallest timestamp of the millisecond `at` (RFC 3339 in UTC: `Z`, or no zone).
fn smallest_at(at: &str) -> anyhow::Result<u64> {
    let time = humantime::parse_rfc3339_weak(at).with_context(|| {
        format!("--at {at:?} is not an RFC 3339 time in UTC (like 2026-12-01T00:00:00Z)")
    })?;
    let ms = match time.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis(),
        Err(_) => bail!("--at {at} is before 1970: timestamps start at the Unix epoch"),
    };
    let ms = u64::try_from(ms)
        .ok()
        .filter(|&ms| ms <= PHYSICAL_MAX_MS)
        .with_context(|| {
            format!(
                "--at {at} is past the last millisecond a timestamp can hold ({})",
                humantime::format_rfc3339_millis(
                    SystemTime::UNIX_EPOCH + Duration::from_millis(PHYSICAL_MAX_MS)
                )
            )
        })?;
    Ok(ms << LOGICAL_BITS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timestamp_is_decoded_into_its_millisecond_and_logical() {
        let raw = (1_764_547_200_123u64 << LOGICAL_BITS) | 7;
        assert_eq!(
            describe(&raw.to_string()).unwrap(),
            format!("{raw}  physical_ms=1764547200123 (2025-12-01T00:00:00.123Z)  logical=7")
        );
        assert!(describe("12x").is_err());
        assert!(describe("-1").is_err());
    }

    #[test]
    fn at_gives_the_smallest_timestamp_of_the_millisecond() {
        let ts = smallest_at("2026-12-01T00:00:00Z").unwrap();
        assert_eq!(ts >> LOGICAL_BITS, 1_796_083_200_000);
        assert_eq!(ts & ((1 << LOGICAL_BITS) - 1), 0);
        assert_eq!(smallest_at("2026-12-01T00:00:00.000Z").unwrap(), ts);
        assert!(
            smallest_at("2026-12-01T01:00:00+01:00").is_err(),
            "UTC only: an offset is refused, not misread"
        );
        assert!(
            smallest_at("1969-12-31T23:59:59Z").is_err(),
            "before the Unix epoch"
        );
        assert!(smallest_at("yesterday").is_err());
    }
}
