//! The file backend's record files, written once: one envelope and one durable replace.
//!
//! Every record file is `magic (4) | version (2) | reserved (2, zero) | payload | CRC32C (4)`,
//! integers little-endian, the checksum over everything before it; the payload's length is the
//! file's. A replace writes a temporary file, fsyncs it, renames it over the record and fsyncs
//! the directory, so the file on disk is always a whole old record or a whole new one. After the
//! first replace a mark file is made durable, so that a directory whose record went missing is
//! refused rather than read as new (which would hand out timestamps, blocks or lease ids again).
//!
//! Invariant: [`unseal`] gives back exactly what [`seal`] wrapped, and refuses any other bytes
//! with what is wrong with them.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::FileError;
use crate::backend::dir;

/// magic (4) + version (2) + reserved (2).
const HEADER_LEN: usize = 8;
const CRC_LEN: usize = 4;

/// One kind of record file.
pub(super) struct Kind {
    pub file: &'static str,
    /// Written, then renamed over `file`; one left by a crash is dropped on open.
    pub temp: &'static str,
    /// Made durable once `file` was written.
    pub mark: &'static str,
    pub magic: [u8; 4],
    pub version: u16,
    /// What the file holds, for errors ("not a tso … file").
    pub what: &'static str,
}

/// What a record file holds, and how.
pub(super) trait Payload: Default + Sized {
    const KIND: Kind;

    fn encode(&self) -> Vec<u8>;

    /// Refuses anything but exactly what [`Self::encode`] writes.
    fn decode(payload: &[u8]) -> Result<Self, String>;
}

/// Wraps `payload` in the envelope of `kind`.
pub(super) fn seal(kind: &Kind, payload: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len() + CRC_LEN);
    buf.extend_from_slice(&kind.magic);
    buf.extend_from_slice(&kind.version.to_le_bytes());
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(payload);
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

/// The payload of a record of `kind`: right magic, version and checksum. The version is read
/// before the checksum, so that a record of another version says so.
pub(super) fn unseal<'a>(kind: &Kind, bytes: &'a [u8]) -> Result<&'a [u8], String> {
    if bytes.len() < HEADER_LEN + CRC_LEN {
        return Err(format!(
            "record is {} bytes, shorter than its header and checksum",
            bytes.len()
        ));
    }
    if bytes[0..4] != kind.magic {
        return Err(format!(
            "wrong magic {:02x?}, expected {:02x?} (not a tso {} file)",
            &bytes[0..4],
            kind.magic,
            kind.what
        ));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != kind.version {
        return Err(format!(
            "unsupported record version {version}, this build reads version {}",
            kind.version
        ));
    }
    let (body, crc) = bytes.split_at(bytes.len() - CRC_LEN);
    let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:08x}, computed {computed:08x})"
        ));
    }
    Ok(&body[HEADER_LEN..])
}

/// One open record file of a directory this process has locked: its value as on disk.
pub(super) struct RecordFile<T> {
    dir: PathBuf,
    pub value: T,
    /// The mark is durable: the directory holds this record.
    marked: bool,
}

impl<T: Payload> RecordFile<T> {
    /// Reads the record (the default value if it was never written), dropping a temporary file
    /// a crash left behind. A record missing while its mark is there was deleted or lost, and
    /// is refused; a record without its mark (written before marks existed) gets one.
    pub fn open(dir: &Path) -> Result<RecordFile<T>, FileError> {
        let kind = &T::KIND;
        remove_if_present(&dir.join(kind.temp))?;
        let path = dir.join(kind.file);
        let marked = dir.join(kind.mark).exists();
        let value = match fs::read(&path) {
            Ok(bytes) => Some(
                unseal(kind, &bytes)
                    .and_then(T::decode)
                    .map_err(|problem| FileError::Damaged {
                        path: path.clone(),
                        problem,
                    })?,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(FileError::Io { path, source }),
        };
        if value.is_none() && marked {
            return Err(FileError::Damaged {
                path,
                problem: format!(
                    "the record is missing from a directory that held one ({} is there); it \
                     was deleted or lost",
                    kind.mark
                ),
            });
        }
        let mut file = RecordFile {
            dir: dir.to_path_buf(),
            marked,
            value: T::default(),
        };
        if let Some(value) = value {
            file.value = value;
            file.mark()?;
        }
        Ok(file)
    }

    /// Whether the directory holds this record (it was there on open, or written since).
    pub fn written(&self) -> bool {
        self.marked
    }

    /// Replaces the record with `next` durably, and only then adopts it.
    pub fn replace(&mut self, next: T) -> Result<(), FileError> {
        let kind = &T::KIND;
        let temp = self.dir.join(kind.temp);
        let path = self.dir.join(kind.file);
        let bytes = seal(kind, &next.encode());
        let mut file = File::create(&temp).map_err(io_at(&temp))?;
        file.write_all(&bytes).map_err(io_at(&temp))?;
        file.sync_all().map_err(io_at(&temp))?;
        drop(file);
        fs::rename(&temp, &path).map_err(io_at(&path))?;
        if !SKIP_DIR_FSYNC.load(std::sync::atomic::Ordering::Relaxed) {
            sync_dir(&self.dir)?;
        }
        self.value = next;
        self.mark()
    }

    /// Makes the mark durable unless it is.
    fn mark(&mut self) -> Result<(), FileError> {
        if self.marked {
            return Ok(());
        }
        let mark = self.dir.join(T::KIND.mark);
        File::create(&mark)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&mark))?;
        sync_dir(&self.dir)?;
        self.marked = true;
        Ok(())
    }
}

/// The switch of [`unsafe_skip_dir_fsync`].
static SKIP_DIR_FSYNC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// FOR THE CHECKER'S POSITIVE CONTROL ONLY: from now on a record replaced by rename is not
/// followed by an fsync of its directory, so after a power loss the name may point at the old
/// record again. For the whole process.
pub fn unsafe_skip_dir_fsync() {
    SKIP_DIR_FSYNC.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn sync_dir(dir: &Path) -> Result<(), FileError> {
    dir::sync(dir).map_err(|e| super::dir_error(e, dir))
}

fn remove_if_present(path: &Path) -> Result<(), FileError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_at(path)(e)),
        _ => Ok(()),
    }
}

pub(super) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    }
}
