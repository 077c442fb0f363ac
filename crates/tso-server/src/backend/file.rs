//! The single-node file backend (the default).
//!
//! The data directory holds `LOCK` (an exclusive advisory lock held for the life of the
//! process, so two servers never share a directory) and `high-water`, one small record: magic,
//! version, high-water, start counter, CRC32C. A write goes to a temporary file, is fsync'd,
//! renamed over the record and the directory is fsync'd, so the record on disk is always a
//! whole old one or a whole new one. A damaged record stops start-up with an error naming the
//! file; the backend never silently restarts from 0. `INITIALIZED` is written (durably) after
//! the first record, so a directory whose record went missing is refused too.
//!
//! Dense-sequence counters live beside it in `sequences` (magic, version, key count, the keys in
//! ascending order each with its counter, CRC32C), written the same way and marked the same way
//! (`SEQUENCES` once the first record is durable), so a damaged or missing record is refused
//! rather than read as "every counter at 0", which would hand out blocks again. Stamping
//! leases live in `leases` (magic, version, length, the server's encoded lease set, CRC32C),
//! written and marked (`LEASES`) the same way.
//!
//! The node is always leader. Its epoch is the start counter, raised and made durable on every
//! open, so epochs grow across restarts and the fence runs on every start.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tso_core::{Epoch, PHYSICAL_MAX_MS};

use crate::consensus::state::merge_sequences;
use crate::consensus::{BoxFuture, Consensus, ConsensusError, Leadership, SeqCounters, SeqEnds};

const LOCK_FILE: &str = "LOCK";
const RECORD_FILE: &str = "high-water";
/// Created (and made durable) once the first record is: a directory that has it but no record
/// lost its record, and is refused rather than treated as new.
const MARK_FILE: &str = "INITIALIZED";
const TEMP_FILE: &str = "high-water.tmp";
const MAGIC: [u8; 4] = *b"TSOH";
const VERSION: u16 = 1;
/// magic (4) + version (2) + reserved (2) + high-water (8) + start counter (8) + CRC32C (4).
const RECORD_LEN: usize = 28;
const CRC_OFFSET: usize = RECORD_LEN - 4;

/// Why the data directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(
        "data directory {dir} is in use by another tso process: stop it, or use another --data-dir"
    )]
    Locked { dir: PathBuf },
    #[error(
        "{path}: {problem}; the file is damaged: restore it from a backup, or seed a new directory with `tso init` above the last issued timestamp"
    )]
    Damaged { path: PathBuf, problem: String },
    #[error("{path} already exists: refusing to overwrite an initialized data directory")]
    AlreadyInitialized { path: PathBuf },
    #[error("high-water {value_ms} ms is above the 46-bit maximum {PHYSICAL_MAX_MS}")]
    OutOfRange { value_ms: u64 },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// The durable content of the record.
const SEQ_FILE: &str = "sequences";
const SEQ_TEMP_FILE: &str = "sequences.tmp";
const SEQ_MARK_FILE: &str = "SEQUENCES";
const SEQ_MAGIC: [u8; 4] = *b"TSOQ";
const SEQ_VERSION: u16 = 1;
/// magic (4) + version (2) + reserved (2) + key count (4).
const SEQ_HEADER_LEN: usize = 12;
/// The longest key a record holds: its length is one byte (SEMANTICS §11 allows 128).
const SEQ_KEY_LEN_MAX: usize = u8::MAX as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Record {
    high_water_ms: u64,
    starts: u64,
}

impl Record {
    fn encode(&self) -> [u8; RECORD_LEN] {
        assert!(
            self.high_water_ms <= PHYSICAL_MAX_MS,
            "encoding an out-of-range high-water"
        );
        let mut buf = [0u8; RECORD_LEN];
        buf[0..4].copy_from_slice(&MAGIC);
        buf[4..6].copy_from_slice(&VERSION.to_le_bytes());
        buf[8..16].copy_from_slice(&self.high_water_ms.to_le_bytes());
        buf[16..24].copy_from_slice(&self.starts.to_le_bytes());
        let crc = crc32c::crc32c(&buf[..CRC_OFFSET]);
        buf[CRC_OFFSET..].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    fn decode(bytes: &[u8]) -> Result<Record, String> {
        if bytes.len() != RECORD_LEN {
            return Err(format!(
                "record is {} bytes, expected {RECORD_LEN}",
                bytes.len()
            ));
        }
        if bytes[0..4] != MAGIC {
            return Err(format!(
                "wrong magic {:02x?}, expected {:02x?} (not a tso high-water file)",
                &bytes[0..4],
                MAGIC
            ));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(format!(
                "unsupported record version {version}, this build reads version {VERSION}"
            ));
        }
        let stored_crc = u32::from_le_bytes(bytes[CRC_OFFSET..].try_into().expect("4 bytes"));
        let crc = crc32c::crc32c(&bytes[..CRC_OFFSET]);
        if stored_crc != crc {
            return Err(format!(
                "checksum mismatch (stored {stored_crc:08x}, computed {crc:08x})"
            ));
        }
        let high_water_ms = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
        let starts = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        if high_water_ms > PHYSICAL_MAX_MS {
            return Err(format!(
                "high-water {high_water_ms} ms is above the 46-bit maximum"
            ));
        }
        Ok(Record {
            high_water_ms,
            starts,
        })
    }
}

/// Encodes the counters as one `sequences` record.
fn encode_sequences(counters: &SeqCounters) -> Vec<u8> {
    let mut buf = Vec::with_capacity(SEQ_HEADER_LEN + counters.len() * 24 + 4);
    buf.extend_from_slice(&SEQ_MAGIC);
    buf.extend_from_slice(&SEQ_VERSION.to_le_bytes());
    buf.extend_from_slice(&[0, 0]);
    let count = u32::try_from(counters.len()).expect("fewer than 2^32 keys");
    buf.extend_from_slice(&count.to_le_bytes());
    for (key, next) in counters {
        assert!(
            !key.is_empty() && key.len() <= SEQ_KEY_LEN_MAX,
            "encoding a sequence key of {} bytes",
            key.len()
        );
        buf.push(key.len() as u8);
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(&next.to_le_bytes());
    }
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

/// Decodes a `sequences` record, refusing anything but exactly what [`encode_sequences`]
/// writes: right magic, version and checksum, UTF-8 keys in strictly ascending order, no byte
/// left over.
fn decode_sequences(bytes: &[u8]) -> Result<SeqCounters, String> {
    if bytes.len() < SEQ_HEADER_LEN + 4 {
        return Err(format!(
            "record is {} bytes, shorter than its header and checksum",
            bytes.len()
        ));
    }
    if bytes[0..4] != SEQ_MAGIC {
        return Err(format!(
            "wrong magic {:02x?}, expected {:02x?} (not a tso sequences file)",
            &bytes[0..4],
            SEQ_MAGIC
        ));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored_crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(body);
    if stored_crc != computed {
        return Err(format!(
            "checksum mismatch (stored {stored_crc:08x}, computed {computed:08x})"
        ));
    }
    let version = u16::from_le_bytes([body[4], body[5]]);
    if version != SEQ_VERSION {
        return Err(format!(
            "unsupported record version {version}, this build reads version {SEQ_VERSION}"
        ));
    }
    let count = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) as usize;
    let mut rest = &body[SEQ_HEADER_LEN..];
    let mut counters = SeqCounters::new();
    for i in 0..count {
        let truncated = || format!("record ends inside key {i} of {count}");
        let (&len, tail) = rest.split_first().ok_or_else(truncated)?;
        let len = len as usize;
        if len == 0 || tail.len() < len + 8 {
            return Err(if len == 0 {
                format!("key {i} is empty")
            } else {
                truncated()
            });
        }
        let key = std::str::from_utf8(&tail[..len])
            .map_err(|_| format!("key {i} is not UTF-8"))?
            .to_owned();
        let next = u64::from_le_bytes(tail[len..len + 8].try_into().expect("8 bytes"));
        if counters
            .last_key_value()
            .is_some_and(|(last, _)| *last >= key)
        {
            return Err(format!("key {i} {key:?} is out of order"));
        }
        counters.insert(key, next);
        rest = &tail[len + 8..];
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the last key", rest.len()));
    }
    Ok(counters)
}

/// The open `sequences` record of a data directory: the counters as on disk.
struct SeqStore {
    dir: PathBuf,
    counters: SeqCounters,
    /// `SEQUENCES` is known to be durable in the directory.
    marked: bool,
}

impl SeqStore {
    /// Reads the record (or none yet) of a directory this process has locked.
    fn open(dir: &Path) -> Result<SeqStore, FileError> {
        let counters = read_marked_record(dir, SEQ_TEMP_FILE, SEQ_FILE, SEQ_MARK_FILE)?
            .map(|(path, bytes)| {
                decode_sequences(&bytes).map_err(|problem| FileError::Damaged { path, problem })
            })
            .transpose()?
            .unwrap_or_default();
        Ok(SeqStore {
            dir: dir.to_path_buf(),
            counters,
            marked: false,
        })
    }

    /// Raises each counter to at least its end, durably (temp, fsync, rename, directory
    /// fsync), and only then adopts the new counters.
    fn advance(&mut self, ends: &SeqEnds) -> Result<(), FileError> {
        let mut next = self.counters.clone();
        merge_sequences(&mut next, ends);
        if next == self.counters {
            return Ok(());
        }
        replace_durably(&self.dir, SEQ_TEMP_FILE, SEQ_FILE, &encode_sequences(&next))?;
        self.counters = next;
        if !self.marked {
            mark_durably(&self.dir, SEQ_MARK_FILE)?;
            self.marked = true;
        }
        Ok(())
    }
}

/// Reads `dir/name` (dropping a temporary file a crash left behind): its path and bytes, or
/// `None` if it was never written. A record missing while its mark file is there was deleted
/// or lost, and is refused rather than read as empty.
fn read_marked_record(
    dir: &Path,
    temp_name: &str,
    name: &str,
    mark_name: &str,
) -> Result<Option<(PathBuf, Vec<u8>)>, FileError> {
    remove_file_if_present(&dir.join(temp_name))?;
    let path = dir.join(name);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some((path, bytes))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if dir.join(mark_name).exists() {
                return Err(FileError::Damaged {
                    path,
                    problem: format!(
                        "the record is missing from a directory that held one ({mark_name} is \
                         there); it was deleted or lost"
                    ),
                });
            }
            Ok(None)
        }
        Err(source) => Err(FileError::Io { path, source }),
    }
}

/// Replaces `dir/name` with `bytes` so that a crash leaves the old content or the new, whole:
/// a temporary file, fsync, rename over the record, directory fsync.
fn replace_durably(dir: &Path, temp_name: &str, name: &str, bytes: &[u8]) -> Result<(), FileError> {
    let temp = dir.join(temp_name);
    let path = dir.join(name);
    let mut file = File::create(&temp).map_err(io_at(&temp))?;
    file.write_all(bytes).map_err(io_at(&temp))?;
    file.sync_all().map_err(io_at(&temp))?;
    drop(file);
    fs::rename(&temp, &path).map_err(io_at(&path))?;
    sync_dir(dir)
}

/// Creates the mark file `name` (durably) unless it is there.
fn mark_durably(dir: &Path, name: &str) -> Result<(), FileError> {
    let mark = dir.join(name);
    if !mark.exists() {
        File::create(&mark)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&mark))?;
        sync_dir(dir)?;
    }
    Ok(())
}

const LEASE_FILE: &str = "leases";
const LEASE_TEMP_FILE: &str = "leases.tmp";
const LEASE_MARK_FILE: &str = "LEASES";
const LEASE_MAGIC: [u8; 4] = *b"TSOL";
const LEASE_VERSION: u16 = 1;
/// magic (4) + version (2) + reserved (2) + payload length (4).
const LEASE_HEADER_LEN: usize = 12;

/// Wraps the server's lease record (opaque here) with magic, version, length and CRC32C.
fn encode_leases(payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(LEASE_HEADER_LEN + payload.len() + 4);
    buf.extend_from_slice(&LEASE_MAGIC);
    buf.extend_from_slice(&LEASE_VERSION.to_le_bytes());
    buf.extend_from_slice(&[0, 0]);
    let len = u32::try_from(payload.len()).expect("a lease record under 4 GiB");
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

fn decode_leases(bytes: &[u8]) -> Result<Vec<u8>, String> {
    if bytes.len() < LEASE_HEADER_LEN + 4 {
        return Err(format!(
            "record is {} bytes, shorter than its header and checksum",
            bytes.len()
        ));
    }
    if bytes[0..4] != LEASE_MAGIC {
        return Err(format!(
            "wrong magic {:02x?}, expected {:02x?} (not a tso leases file)",
            &bytes[0..4],
            LEASE_MAGIC
        ));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored_crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(body);
    if stored_crc != computed {
        return Err(format!(
            "checksum mismatch (stored {stored_crc:08x}, computed {computed:08x})"
        ));
    }
    let version = u16::from_le_bytes([body[4], body[5]]);
    if version != LEASE_VERSION {
        return Err(format!(
            "unsupported record version {version}, this build reads version {LEASE_VERSION}"
        ));
    }
    let len = u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")) as usize;
    if body.len() != LEASE_HEADER_LEN + len {
        return Err(format!(
            "the header says {len} bytes of leases, the record holds {}",
            body.len() - LEASE_HEADER_LEN
        ));
    }
    Ok(body[LEASE_HEADER_LEN..].to_vec())
}

/// The open `leases` record of a data directory.
struct LeaseStore {
    dir: PathBuf,
    record: Vec<u8>,
    marked: bool,
}

impl LeaseStore {
    fn open(dir: &Path) -> Result<LeaseStore, FileError> {
        let record = read_marked_record(dir, LEASE_TEMP_FILE, LEASE_FILE, LEASE_MARK_FILE)?
            .map(|(path, bytes)| {
                decode_leases(&bytes).map_err(|problem| FileError::Damaged { path, problem })
            })
            .transpose()?
            .unwrap_or_default();
        Ok(LeaseStore {
            dir: dir.to_path_buf(),
            record,
            marked: false,
        })
    }

    fn replace(&mut self, record: Vec<u8>) -> Result<(), FileError> {
        replace_durably(
            &self.dir,
            LEASE_TEMP_FILE,
            LEASE_FILE,
            &encode_leases(&record),
        )?;
        self.record = record;
        if !self.marked {
            mark_durably(&self.dir, LEASE_MARK_FILE)?;
            self.marked = true;
        }
        Ok(())
    }
}

/// An open data directory: holds the lock and the current record.
struct Store {
    dir: PathBuf,
    record: Record,
    _lock: File,
}

impl Store {
    fn open(dir: &Path) -> Result<Store, FileError> {
        create_dir_durably(dir)?;
        let lock = lock_dir(dir)?;
        remove_stale_temp(dir)?;
        let record = read_record(dir)?;
        let marked = dir.join(MARK_FILE).exists();
        if record.is_none() && marked {
            return Err(FileError::Damaged {
                path: dir.join(RECORD_FILE),
                problem: format!(
                    "the record is missing from a directory that held one ({MARK_FILE} is \
                     there); it was deleted or lost"
                ),
            });
        }
        let mut store = Store {
            dir: dir.to_path_buf(),
            record: record.unwrap_or_default(),
            _lock: lock,
        };
        if record.is_some() && !marked {
            store.mark()?;
        }
        Ok(store)
    }

    /// Records durably that this directory holds a record.
    fn mark(&mut self) -> Result<(), FileError> {
        let path = self.dir.join(MARK_FILE);
        File::create(&path)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&path))?;
        sync_dir(&self.dir)
    }

    /// Writes `record` durably and only then adopts it.
    fn write(&mut self, record: Record) -> Result<(), FileError> {
        let temp = self.dir.join(TEMP_FILE);
        let path = self.dir.join(RECORD_FILE);
        let mut file = File::create(&temp).map_err(io_at(&temp))?;
        file.write_all(&record.encode()).map_err(io_at(&temp))?;
        file.sync_all().map_err(io_at(&temp))?;
        drop(file);
        fs::rename(&temp, &path).map_err(io_at(&path))?;
        sync_dir(&self.dir)?;
        let first = !self.dir.join(MARK_FILE).exists();
        self.record = record;
        if first {
            self.mark()?;
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<(), FileError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(dir))
}

/// Creates `dir` (and missing parents) so that the creation itself survives a crash: each
/// created directory's parent is fsync'd.
fn create_dir_durably(dir: &Path) -> Result<(), FileError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durably(parent)?;
    }
    match fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io_at(dir)(e)),
        _ => {}
    }
    match dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn lock_dir(dir: &Path) -> Result<File, FileError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_at(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(FileError::Locked {
            dir: dir.to_path_buf(),
        }),
        Err(fs::TryLockError::Error(source)) => Err(FileError::Io { path, source }),
    }
}

/// A temporary file left by a crash before its rename was never adopted: drop it.
fn remove_stale_temp(dir: &Path) -> Result<(), FileError> {
    remove_file_if_present(&dir.join(TEMP_FILE))
}

fn remove_file_if_present(path: &Path) -> Result<(), FileError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_at(path)(e)),
        _ => Ok(()),
    }
}

fn read_record(dir: &Path) -> Result<Option<Record>, FileError> {
    let path = dir.join(RECORD_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(FileError::Io { path, source }),
    };
    Record::decode(&bytes)
        .map(Some)
        .map_err(|problem| FileError::Damaged { path, problem })
}

/// Seeds a fresh data directory so the first timestamps are above `seed_physical_ms`.
/// Refuses a directory that already holds a record.
pub fn init(dir: &Path, seed_physical_ms: u64) -> Result<(), FileError> {
    if seed_physical_ms > PHYSICAL_MAX_MS {
        return Err(FileError::OutOfRange {
            value_ms: seed_physical_ms,
        });
    }
    let mut store = Store::open(dir)?;
    let path = dir.join(RECORD_FILE);
    if path.exists() {
        return Err(FileError::AlreadyInitialized { path });
    }
    store.write(Record {
        high_water_ms: seed_physical_ms,
        starts: 0,
    })
}

/// The file backend. Cheap to share (`Arc`); the directory stays locked until it is dropped.
pub struct FileBackend {
    store: Arc<Mutex<Store>>,
    /// Its own lock: a sequence write never delays a window extension behind it.
    sequences: Arc<Mutex<SeqStore>>,
    leases: Arc<Mutex<LeaseStore>>,
    epoch: Epoch,
    leadership: watch::Sender<Leadership>,
}

impl FileBackend {
    /// Opens (creating if needed) and locks `dir`, and records this start.
    pub fn open(dir: &Path) -> Result<FileBackend, FileError> {
        let mut store = Store::open(dir)?;
        let record = Record {
            starts: store.record.starts + 1,
            ..store.record
        };
        store.write(record)?;
        let sequences = SeqStore::open(dir)?;
        let leases = LeaseStore::open(dir)?;
        let epoch = Epoch::new(record.starts as u128);
        let (leadership, _) = watch::channel(Leadership::Leader { epoch });
        Ok(FileBackend {
            store: Arc::new(Mutex::new(store)),
            sequences: Arc::new(Mutex::new(sequences)),
            leases: Arc::new(Mutex::new(leases)),
            epoch,
            leadership,
        })
    }

    pub fn dir(&self) -> PathBuf {
        self.store.lock().expect("store lock").dir.clone()
    }

    /// The epoch of this start.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
}

fn classify(err: FileError) -> ConsensusError {
    match &err {
        FileError::Io { source, .. } if is_transient(source) => {
            ConsensusError::Transient(err.to_string())
        }
        // A failed fsync leaves the page cache in an unknown state: retrying could report a
        // value durable that is not. Everything else is Permanent too.
        _ => ConsensusError::Permanent(err.to_string()),
    }
}

/// Errors that may pass once load drops or space is freed: interrupted or timed-out calls, a
/// full disk or quota, and running out of file handles or memory (SEMANTICS §4).
fn is_transient(e: &io::Error) -> bool {
    let kind = matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::TimedOut
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::StorageFull
            | io::ErrorKind::QuotaExceeded
            | io::ErrorKind::OutOfMemory
    );
    let errno = matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::EDQUOT | libc::ENOMEM | libc::ENOSPC)
    );
    kind || errno
}

impl Consensus for FileBackend {
    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    fn load_high_water(&self) -> BoxFuture<'_, Result<u64, ConsensusError>> {
        // The directory lock makes this process the only writer: memory equals disk.
        let value = self.store.lock().expect("store lock").record.high_water_ms;
        Box::pin(async move { Ok(value) })
    }

    fn persist_high_water(
        &self,
        at_least_ms: u64,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<u64, ConsensusError>> {
        let store = Arc::clone(&self.store);
        let current = self.epoch;
        Box::pin(async move {
            if at_least_ms > PHYSICAL_MAX_MS {
                return Err(ConsensusError::Permanent(
                    FileError::OutOfRange {
                        value_ms: at_least_ms,
                    }
                    .to_string(),
                ));
            }
            if epoch != current {
                return Err(ConsensusError::Fenced {
                    expected: epoch,
                    current,
                });
            }
            // A blocking task finishes its write even if this future is dropped: harmless,
            // the stored value only ratchets up, under the store's mutex.
            let write = tokio::task::spawn_blocking(move || {
                let mut store = store.lock().expect("store lock");
                let record = store.record;
                if at_least_ms <= record.high_water_ms {
                    return Ok(record.high_water_ms);
                }
                store
                    .write(Record {
                        high_water_ms: at_least_ms,
                        ..record
                    })
                    .map_err(classify)?;
                Ok(at_least_ms)
            });
            write
                .await
                .map_err(|e| ConsensusError::Permanent(format!("file write task failed: {e}")))?
        })
    }

    fn sequences_supported(&self) -> bool {
        true
    }

    fn load_sequences(&self) -> BoxFuture<'_, Result<SeqCounters, ConsensusError>> {
        // As for the high-water, the directory lock makes memory equal disk.
        let counters = self
            .sequences
            .lock()
            .expect("sequences lock")
            .counters
            .clone();
        Box::pin(async move { Ok(counters) })
    }

    fn persist_sequences(
        &self,
        ends: SeqEnds,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<(), ConsensusError>> {
        let sequences = Arc::clone(&self.sequences);
        let current = self.epoch;
        Box::pin(async move {
            if epoch != current {
                return Err(ConsensusError::Fenced {
                    expected: epoch,
                    current,
                });
            }
            // Like the high-water write: a dropped caller leaves the blocking write to finish,
            // and counters only ratchet up under the mutex.
            let write = tokio::task::spawn_blocking(move || {
                sequences
                    .lock()
                    .expect("sequences lock")
                    .advance(&ends)
                    .map_err(classify)
            });
            write
                .await
                .map_err(|e| ConsensusError::Permanent(format!("file write task failed: {e}")))?
        })
    }

    fn leases_supported(&self) -> bool {
        true
    }

    fn load_leases(&self) -> BoxFuture<'_, Result<Vec<u8>, ConsensusError>> {
        let record = self.leases.lock().expect("leases lock").record.clone();
        Box::pin(async move { Ok(record) })
    }

    fn persist_leases(
        &self,
        record: Vec<u8>,
        epoch: Epoch,
    ) -> BoxFuture<'_, Result<(), ConsensusError>> {
        let leases = Arc::clone(&self.leases);
        let current = self.epoch;
        Box::pin(async move {
            if epoch != current {
                return Err(ConsensusError::Fenced {
                    expected: epoch,
                    current,
                });
            }
            let write = tokio::task::spawn_blocking(move || {
                leases
                    .lock()
                    .expect("leases lock")
                    .replace(record)
                    .map_err(classify)
            });
            write
                .await
                .map_err(|e| ConsensusError::Permanent(format!("file write task failed: {e}")))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Out of file handles, memory or quota: may succeed once connections close or space is
    /// freed (SEMANTICS §4), so the node retries instead of stopping.
    #[test]
    fn resource_exhaustion_is_transient_and_damage_permanent() {
        let at = |errno| FileError::Io {
            path: PathBuf::from("/d/high-water.tmp"),
            source: io::Error::from_raw_os_error(errno),
        };
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::EDQUOT,
            libc::ENOMEM,
            libc::ENOSPC,
            libc::EINTR,
            libc::EAGAIN,
        ] {
            assert!(
                matches!(classify(at(errno)), ConsensusError::Transient(_)),
                "errno {errno} must be transient"
            );
        }
        for errno in [libc::EIO, libc::EROFS, libc::EACCES] {
            assert!(
                matches!(classify(at(errno)), ConsensusError::Permanent(_)),
                "errno {errno} must be permanent"
            );
        }
    }

    #[test]
    fn the_sequences_record_round_trips_and_refuses_damage() {
        let counters: SeqCounters = [
            ("a", 0),
            ("invoice", 42),
            ("z".repeat(128).as_str(), u64::MAX),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let bytes = encode_sequences(&counters);
        assert_eq!(decode_sequences(&bytes), Ok(counters));
        assert_eq!(
            decode_sequences(&encode_sequences(&SeqCounters::new())),
            Ok(SeqCounters::new())
        );
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_sequences(&damaged).is_err(),
                "bit {bit} flip not detected"
            );
        }
        for len in 0..bytes.len() {
            assert!(
                decode_sequences(&bytes[..len]).is_err(),
                "truncated to {len}"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(decode_sequences(&long).is_err());
    }

    #[test]
    fn the_leases_record_round_trips_and_refuses_damage() {
        let payload = b"any bytes the server encodes".to_vec();
        let bytes = encode_leases(&payload);
        assert_eq!(decode_leases(&bytes), Ok(payload));
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_leases(&damaged).is_err(),
                "bit {bit} flip not detected"
            );
        }
        for len in 0..bytes.len() {
            assert!(decode_leases(&bytes[..len]).is_err(), "truncated to {len}");
        }
    }

    #[test]
    fn record_round_trips_and_detects_damage() {
        let record = Record {
            high_water_ms: 1_700_000_000_000,
            starts: 7,
        };
        let bytes = record.encode();
        assert_eq!(Record::decode(&bytes), Ok(record));
        for bit in 0..RECORD_LEN * 8 {
            let mut damaged = bytes;
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Record::decode(&damaged).is_err(),
                "bit {bit} flip not detected"
            );
        }
        assert!(
            Record::decode(&bytes[..RECORD_LEN - 1])
                .unwrap_err()
                .contains("27 bytes")
        );
        let mut long = bytes.to_vec();
        long.push(0);
        assert!(Record::decode(&long).unwrap_err().contains("29 bytes"));
    }
}
