//! An append-only file of framed records, the one durable format of the raft storage.
//!
//! Frame: `len: u32 LE | crc32c(payload): u32 LE | payload`. Invariant: every frame that
//! [`RecordFile::append`] acknowledged is read back by [`RecordFile::open`] intact, because the
//! append returns only after `fsync`. A crash in the middle of an append leaves a torn tail (a
//! frame cut short, or zeros the file system appended); open drops it, since it was never
//! acknowledged. A bad frame *followed by data* is corruption and open refuses the file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Largest payload of one frame. Records are a vote, one log entry or the state-machine
/// snapshot: a membership of a few nodes with their addresses is well under 4 KiB, so 1 MiB is
/// far above any legitimate record and a larger length is a damaged header.
pub const RECORD_BYTES_MAX: usize = 1 << 20;

/// Frame header: length and checksum, 4 bytes each.
const HEADER_BYTES: usize = 8;

/// Damage that open cannot repair: the file was not written by an interrupted append.
#[derive(Debug, thiserror::Error)]
pub enum RecordFileError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is damaged at byte {offset} (bad frame followed by more data); \
         restore the node's data directory or remove it to rejoin empty"
    )]
    Corrupt { path: PathBuf, offset: u64 },
}

/// An open record file, positioned for appends.
#[derive(Debug)]
pub struct RecordFile {
    path: PathBuf,
    file: File,
    len_bytes: u64,
    /// When the last fsync of appended records returned (see [`Self::append_lazily`]).
    synced_at: std::time::Instant,
}

impl RecordFile {
    /// Opens (or creates) the file and returns it with every intact payload, in order. A torn
    /// tail is cut off the file before returning.
    pub fn open(path: &Path) -> Result<(Self, Vec<Vec<u8>>), RecordFileError> {
        let io = |source| RecordFileError::Io {
            path: path.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let (payloads, intact_bytes) = parse(&bytes).ok_or_else(|| RecordFileError::Corrupt {
            path: path.to_owned(),
            offset: first_bad_offset(&bytes),
        })?;
        if intact_bytes < bytes.len() {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = bytes.len() - intact_bytes,
                "dropping a torn tail left by an interrupted write"
            );
            file.set_len(intact_bytes as u64).map_err(io)?;
            file.sync_all().map_err(io)?;
        }
        sync_parent(path).map_err(io)?;
        let this = Self {
            path: path.to_owned(),
            file,
            len_bytes: intact_bytes as u64,
            synced_at: std::time::Instant::now(),
        };
        Ok((this, payloads))
    }

    /// Appends the payloads and returns after they are on disk.
    pub fn append(&mut self, payloads: &[Vec<u8>]) -> Result<(), RecordFileError> {
        let buf = frame_all(payloads);
        let io = |source| RecordFileError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(&buf).map_err(io)?;
        wait_while_fsync_stalled();
        self.file.sync_data().map_err(io)?;
        self.len_bytes += buf.len() as u64;
        self.synced_at = std::time::Instant::now();
        Ok(())
    }

    /// FOR THE CHECKER'S POSITIVE CONTROL ONLY (see [`unsafe_ack_before_fsync`]): appends the
    /// payloads and returns before they are durable; they are fsync'd with a later append once
    /// a second has passed since the last fsync. A power loss loses what was acknowledged in
    /// that second.
    pub fn append_lazily(&mut self, payloads: &[Vec<u8>]) -> Result<(), RecordFileError> {
        if self.synced_at.elapsed() >= LAZY_FSYNC_EVERY {
            return self.append(payloads);
        }
        let buf = frame_all(payloads);
        self.file
            .write_all(&buf)
            .map_err(|source| RecordFileError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.len_bytes += buf.len() as u64;
        Ok(())
    }

    /// Replaces the whole file with `payloads`, atomically: a crash leaves either the old or the
    /// new content (temp file, fsync, rename, fsync of the directory).
    pub fn rewrite(&mut self, payloads: &[Vec<u8>]) -> Result<(), RecordFileError> {
        let io = |source| RecordFileError::Io {
            path: self.path.clone(),
            source,
        };
        let buf = frame_all(payloads);
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = File::create(&tmp).map_err(io)?;
            f.write_all(&buf).map_err(io)?;
            wait_while_fsync_stalled();
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        sync_parent(&self.path).map_err(io)?;
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        self.len_bytes = buf.len() as u64;
        Ok(())
    }

    /// Size of the file in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }
}

/// Every intact payload of the file at `path`, in order, without changing anything: no file is
/// created (a missing file has none), and a torn tail is skipped, not cut off. For offline
/// readers of a stopped node's directory or of a copy of it (`tso export`), which must never
/// write to what they read.
pub fn read_only(path: &Path) -> Result<Vec<Vec<u8>>, RecordFileError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(RecordFileError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let (payloads, _) = parse(&bytes).ok_or_else(|| RecordFileError::Corrupt {
        path: path.to_owned(),
        offset: first_bad_offset(&bytes),
    })?;
    Ok(payloads)
}

fn frame_all(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(payloads.iter().map(|p| p.len() + HEADER_BYTES).sum());
    for p in payloads {
        assert!(
            !p.is_empty() && p.len() <= RECORD_BYTES_MAX,
            "record of {} bytes is outside 1..={RECORD_BYTES_MAX}",
            p.len()
        );
        buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32c::crc32c(p).to_le_bytes());
        buf.extend_from_slice(p);
    }
    buf
}

/// One frame at the start of `bytes`: `Some(Ok((payload, frame_len)))` if intact,
/// `Some(Err(()))` if bad, `None` if `bytes` is empty.
fn frame_at(bytes: &[u8]) -> Option<Result<(&[u8], usize), ()>> {
    if bytes.is_empty() {
        return None;
    }
    if bytes.len() < HEADER_BYTES {
        return Some(Err(()));
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if len == 0 || len > RECORD_BYTES_MAX || bytes.len() < HEADER_BYTES + len {
        return Some(Err(()));
    }
    let payload = &bytes[HEADER_BYTES..HEADER_BYTES + len];
    if crc32c::crc32c(payload) != crc {
        return Some(Err(()));
    }
    Some(Ok((payload, HEADER_BYTES + len)))
}

/// Parses all frames. Returns the payloads and the length of the intact prefix, or `None` if
/// a bad frame is not a torn tail.
fn parse(bytes: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    let mut payloads = Vec::new();
    let mut at = 0;
    while let Some(frame) = frame_at(&bytes[at..]) {
        match frame {
            Ok((payload, n)) => {
                payloads.push(payload.to_vec());
                at += n;
            }
            Err(()) if is_torn_tail(&bytes[at..]) => break,
            Err(()) => return None,
        }
    }
    Some((payloads, at))
}

/// A bad frame is a torn tail when nothing intact can follow it: the frame runs past the end
/// of the file, or the rest of the file is zeros (space a file system extended but never
/// filled).
fn is_torn_tail(rest: &[u8]) -> bool {
    if rest.len() < HEADER_BYTES {
        return true;
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let runs_past_end = len <= RECORD_BYTES_MAX && rest.len() <= HEADER_BYTES + len;
    runs_past_end || rest.iter().all(|b| *b == 0)
}

fn first_bad_offset(bytes: &[u8]) -> u64 {
    let mut at = 0;
    while let Some(Ok((_, n))) = frame_at(&bytes[at..]) {
        at += n;
    }
    at as u64
}

/// How often [`RecordFile::append_lazily`] makes what it acknowledged durable.
const LAZY_FSYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The switch of [`unsafe_ack_before_fsync`].
static ACK_BEFORE_FSYNC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// FOR THE CHECKER'S POSITIVE CONTROL ONLY: from now on the raft log store acknowledges
/// appended entries and commit marks before they are durable, fsyncing them at most once a
/// second (votes, truncations and purges stay durable before they are acknowledged). Raft's
/// safety assumes the opposite, so a power loss of a quorum loses committed entries. For the
/// whole process.
pub fn unsafe_ack_before_fsync() {
    ACK_BEFORE_FSYNC.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`unsafe_ack_before_fsync`] was called.
pub(super) fn acks_before_fsync() -> bool {
    ACK_BEFORE_FSYNC.load(std::sync::atomic::Ordering::Relaxed)
}

/// The fault seam of [`unsafe_stall_fsync_while_exists`].
static FSYNC_STALL_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// FOR FAULT TESTS ONLY: from now on, while a file exists at `path`, every fsync of the raft
/// log and vote waits (in the thread that asked for it, as a stuck disk would). The first path
/// given stays for the life of the process.
pub fn unsafe_stall_fsync_while_exists(path: std::path::PathBuf) {
    let _ = FSYNC_STALL_FILE.set(path);
}

fn wait_while_fsync_stalled() {
    let Some(path) = FSYNC_STALL_FILE.get() else {
        return;
    };
    if path.exists() {
        tracing::warn!(path = %path.display(), "fsync stalled by the fault file");
        while path.exists() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(path: &Path) -> Vec<Vec<u8>> {
        RecordFile::open(path).expect("open").1
    }

    #[test]
    fn appended_records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut f, got) = RecordFile::open(&path).unwrap();
        assert!(got.is_empty());
        f.append(&[b"one".to_vec(), b"two".to_vec()]).unwrap();
        f.append(&[b"three".to_vec()]).unwrap();
        drop(f);
        assert_eq!(
            reopen(&path),
            vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
    }

    #[test]
    fn a_torn_tail_is_dropped_at_every_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut f, _) = RecordFile::open(&path).unwrap();
        f.append(&[b"kept".to_vec(), b"torn-record".to_vec()])
            .unwrap();
        drop(f);
        let full = std::fs::read(&path).unwrap();
        let first_frame = HEADER_BYTES + 4;
        for cut in first_frame..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            assert_eq!(reopen(&path), vec![b"kept".to_vec()], "cut at {cut}");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), first_frame as u64);
        }
    }

    #[test]
    fn a_zero_filled_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut f, _) = RecordFile::open(&path).unwrap();
        f.append(&[b"kept".to_vec()]).unwrap();
        drop(f);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[0u8; 4096]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(reopen(&path), vec![b"kept".to_vec()]);
    }

    #[test]
    fn damage_before_intact_data_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut f, _) = RecordFile::open(&path).unwrap();
        f.append(&[b"first".to_vec(), b"second".to_vec()]).unwrap();
        drop(f);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_BYTES] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        match RecordFile::open(&path) {
            Err(RecordFileError::Corrupt { offset: 0, .. }) => {}
            other => panic!("expected corruption at 0, got {other:?}"),
        }
    }

    #[test]
    fn a_record_at_the_size_bound_round_trips_and_a_length_past_it_is_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut f, _) = RecordFile::open(&path).unwrap();
        let biggest = vec![7u8; RECORD_BYTES_MAX];
        f.append(std::slice::from_ref(&biggest)).unwrap();
        f.append(&[b"after".to_vec()]).unwrap();
        drop(f);
        assert_eq!(reopen(&path), vec![biggest, b"after".to_vec()]);

        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0..4].copy_from_slice(&(RECORD_BYTES_MAX as u32 + 1).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        assert!(
            matches!(
                RecordFile::open(&path),
                Err(RecordFileError::Corrupt { offset: 0, .. })
            ),
            "a length past the bound, followed by data, is damage"
        );
    }

    #[test]
    #[should_panic(expected = "outside 1..=")]
    fn appending_past_the_size_bound_is_a_programmer_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, _) = RecordFile::open(&dir.path().join("log")).unwrap();
        let _ = f.append(&[vec![0u8; RECORD_BYTES_MAX + 1]]);
    }

    #[test]
    fn rewrite_replaces_the_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut f, _) = RecordFile::open(&path).unwrap();
        f.append(&[b"old".to_vec()]).unwrap();
        f.rewrite(&[b"new".to_vec()]).unwrap();
        f.append(&[b"after".to_vec()]).unwrap();
        drop(f);
        assert_eq!(reopen(&path), vec![b"new".to_vec(), b"after".to_vec()]);
    }
}
