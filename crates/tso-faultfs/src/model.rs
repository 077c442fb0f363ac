//! The pure filesystem model: an in-memory inode table that remembers, next to
//! what reads see now, what the last fsync made durable.
//!
//! Nothing here knows about FUSE or threads; every operation is a plain method
//! returning `Result<_, Errno>`, so all semantics can be tested directly.
//!
//! # Durability model
//!
//! * A regular file has `data` (what reads see) and `durable` (its content as of
//!   the last successful fsync/fdatasync of that inode). The changes made since
//!   then are kept in order in `pending`, so a torn power loss can replay a prefix.
//! * A directory has `entries` (names now) and `durable_entries` (names as of the
//!   last successful fsync of that directory). create, mkdir, unlink, rmdir,
//!   rename and link change `entries` only. A directory made by mkdir is itself
//!   only durable once its parent's entries are.
//! * [`Model::power_loss`] replaces every directory's entries by its durable
//!   entries and every file's data by its durable content (or by durable content
//!   plus a prefix of the pending changes when torn), drops what is no longer
//!   reachable from the root, and invalidates every open handle.
//!
//! # Faults
//!
//! * A failed fsync of a file (EIO from [`FsyncError`], or ENOSPC while the disk
//!   is full) makes nothing durable **and drops the unsynced changes**: `data`
//!   reverts to `durable`. That mirrors Linux, where the dirty pages of a failed
//!   writeback may be thrown away and a later fsync can succeed without having
//!   written them; a program that retries fsync after an error must not assume
//!   its earlier writes are on disk.
//! * A failed fsync of a directory makes nothing durable but leaves the names
//!   in place (Linux does not drop directory entries on a failed fsync).
//! * While the disk is full, everything that needs space answers ENOSPC and
//!   changes nothing.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::io;
use std::time::{Duration, SystemTime};

/// Inode number of the root directory (FUSE's fixed root).
pub const ROOT: u64 = 1;

/// Size reported by statfs and the largest offset a file may reach.
pub const CAPACITY: u64 = 1 << 30;

/// Block size reported by statfs and stat.
pub const BLOCK_SIZE: u64 = 4096;

/// Longest name accepted in a directory.
const NAME_MAX: usize = 255;

/// Number of inodes reported as the filesystem's total.
const MAX_INODES: u64 = 1 << 20;

/// An error number answered to the caller (a positive `errno` value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EISDIR: Errno = Errno(libc::EISDIR);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const EFBIG: Errno = Errno(libc::EFBIG);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const ENAMETOOLONG: Errno = Errno(libc::ENAMETOOLONG);
    pub const ENOTEMPTY: Errno = Errno(libc::ENOTEMPTY);
    pub const EOPNOTSUPP: Errno = Errno(libc::EOPNOTSUPP);
}

impl From<Errno> for io::Error {
    fn from(e: Errno) -> io::Error {
        io::Error::from_raw_os_error(e.0)
    }
}

/// Result of a model operation.
pub type Result<T> = std::result::Result<T, Errno>;

/// How fsync and fsyncdir fail, set at run time by the harness.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FsyncError {
    /// fsync works.
    #[default]
    Off,
    /// The next fsync or fsyncdir answers EIO, later ones work.
    Once,
    /// Every fsync and fsyncdir answers EIO until healed.
    UntilHealed,
}

/// What a power loss threw away, for the harness's logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PowerLoss {
    /// Files whose unsynced changes were dropped (fully or, when torn, partly).
    pub files_reverted: u64,
    /// Unsynced bytes written that did not survive.
    pub bytes_lost: u64,
    /// Files where a write landed partly (torn power loss only).
    pub torn_writes: u64,
    /// Directory entries (name → inode pairs) that appeared or vanished.
    pub names_reverted: u64,
    /// Inodes dropped because no durable name reaches them any more.
    pub inodes_dropped: u64,
}

/// Kind of an inode; the model has regular files and directories only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

/// Attributes of an inode, as stat shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// The attribute changes of a setattr; `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// One directory listing entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: OsString,
}

/// The numbers statfs answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// One unsynced change to a file's content, kept in order for torn power loss.
#[derive(Clone, Debug)]
enum Change {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

impl Change {
    /// Number of bytes this change adds or overwrites (for loss accounting).
    fn weight(&self) -> u64 {
        match self {
            Change::Write { bytes, .. } => bytes.len() as u64,
            Change::SetLen(_) => 0,
        }
    }

    /// Applies this change to `data`. Offsets were checked against
    /// [`CAPACITY`] when the change was accepted, so they fit in memory.
    fn apply(&self, data: &mut Vec<u8>) {
        match self {
            Change::Write { offset, bytes } => {
                let start = *offset as usize;
                let end = start + bytes.len();
                if data.len() < end {
                    data.resize(end, 0);
                }
                data[start..end].copy_from_slice(bytes);
            }
            Change::SetLen(len) => data.resize(*len as usize, 0),
        }
    }
}

/// A regular file: current content, durable content, and the changes between.
#[derive(Debug, Default)]
struct FileNode {
    data: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Change>,
    nlink: u32,
}

impl FileNode {
    /// Applies a change now and remembers it as unsynced.
    fn change(&mut self, change: Change) {
        change.apply(&mut self.data);
        self.pending.push(change);
    }

    /// Makes the current content durable (a successful fsync).
    fn sync(&mut self) {
        self.durable.clone_from(&self.data);
        self.pending.clear();
    }

    /// Drops the unsynced changes (failed fsync, power loss); returns the
    /// number of unsynced bytes lost.
    fn drop_unsynced(&mut self) -> u64 {
        let lost = self.pending.iter().map(Change::weight).sum();
        self.data.clone_from(&self.durable);
        self.pending.clear();
        lost
    }

    /// Torn power loss: applies the first `k` unsynced changes fully and a
    /// prefix of the next one, on top of the durable content. Returns the
    /// bytes lost and whether a write landed partly.
    fn tear(&mut self, rng: &mut SplitMix64) -> (u64, bool) {
        let pending = std::mem::take(&mut self.pending);
        let total: u64 = pending.iter().map(Change::weight).sum();
        let k = rng.below(pending.len() as u64 + 1) as usize;
        let mut data = self.durable.clone();
        let mut kept: u64 = 0;
        for change in &pending[..k] {
            change.apply(&mut data);
            kept += change.weight();
        }
        let mut partial = false;
        if let Some(Change::Write { offset, bytes }) = pending.get(k) {
            let cut = rng.below(bytes.len() as u64 + 1) as usize;
            if cut > 0 {
                let prefix = Change::Write {
                    offset: *offset,
                    bytes: bytes[..cut].to_vec(),
                };
                prefix.apply(&mut data);
                kept += cut as u64;
                partial = cut < bytes.len();
            }
        }
        self.data = data;
        self.durable.clone_from(&self.data);
        (total - kept, partial)
    }
}

/// A directory: names now, and names as of its last successful fsync.
#[derive(Debug, Default)]
struct DirNode {
    entries: BTreeMap<OsString, u64>,
    durable_entries: BTreeMap<OsString, u64>,
    /// The directory holding this one now (the root is its own parent).
    parent: u64,
}

#[derive(Debug)]
enum Body {
    File(FileNode),
    Dir(DirNode),
}

/// Ownership, permissions and times of an inode.
#[derive(Clone, Copy, Debug)]
struct Meta {
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
}

impl Meta {
    fn new(perm: u16, uid: u32, gid: u32) -> Meta {
        let now = SystemTime::now();
        Meta {
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }

    /// Records a content change (mtime and ctime).
    fn touch(&mut self) {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
    }
}

#[derive(Debug)]
struct Inode {
    meta: Meta,
    body: Body,
}

/// An open file or directory. `generation` is the model's power-loss
/// generation at open time: a handle from before a power loss answers EIO.
#[derive(Clone, Copy, Debug)]
struct Handle {
    ino: u64,
    generation: u64,
}

/// The fault switches.
#[derive(Clone, Copy, Debug, Default)]
struct Faults {
    fsync: FsyncError,
    disk_full: bool,
    slow_fsync: Duration,
}

/// Small deterministic generator for torn power loss (splitmix64), so a
/// seed reproduces the same tear.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`); the slight modulo bias does not matter here.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The whole filesystem state plus the fault switches.
#[derive(Debug)]
pub struct Model {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    generation: u64,
    faults: Faults,
}

impl Model {
    /// An empty filesystem whose root directory belongs to `uid`/`gid`.
    pub fn new(uid: u32, gid: u32) -> Model {
        let root = Inode {
            meta: Meta::new(0o755, uid, gid),
            body: Body::Dir(DirNode {
                parent: ROOT,
                ..DirNode::default()
            }),
        };
        Model {
            inodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_fh: 1,
            generation: 0,
            faults: Faults::default(),
        }
    }

    // ---- fault switches -------------------------------------------------

    /// Sets how fsync and fsyncdir fail.
    pub fn set_fsync_error(&mut self, mode: FsyncError) {
        self.faults.fsync = mode;
    }

    /// Makes everything that needs space answer ENOSPC (or stops doing so).
    pub fn set_disk_full(&mut self, full: bool) {
        self.faults.disk_full = full;
    }

    /// Sets how long every fsync and fsyncdir takes before it answers.
    pub fn set_slow_fsync(&mut self, delay: Duration) {
        self.faults.slow_fsync = delay;
    }

    /// How long the adapter must wait before answering an fsync.
    pub fn slow_fsync_delay(&self) -> Duration {
        self.faults.slow_fsync
    }

    /// Clears all faults.
    pub fn heal(&mut self) {
        self.faults = Faults::default();
    }

    // ---- lookups --------------------------------------------------------

    fn inode(&self, ino: u64) -> Result<&Inode> {
        self.inodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn inode_mut(&mut self, ino: u64) -> Result<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: u64) -> Result<&DirNode> {
        match &self.inode(ino)?.body {
            Body::Dir(d) => Ok(d),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut DirNode> {
        match &mut self.inode_mut(ino)?.body {
            Body::Dir(d) => Ok(d),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut FileNode> {
        match &mut self.inode_mut(ino)?.body {
            Body::File(f) => Ok(f),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn kind(&self, ino: u64) -> Result<Kind> {
        Ok(match self.inode(ino)?.body {
            Body::File(_) => Kind::File,
            Body::Dir(_) => Kind::Dir,
        })
    }

    /// The inode `name` refers to in directory `parent` now.
    fn child(&self, parent: u64, name: &OsStr) -> Result<u64> {
        self.dir(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT)
    }

    /// The inode behind an open handle; EIO if it predates a power loss.
    fn handle(&self, fh: u64) -> Result<u64> {
        let h = self.handles.get(&fh).ok_or(Errno::EBADF)?;
        if h.generation != self.generation {
            return Err(Errno::EIO);
        }
        Ok(h.ino)
    }

    fn attr(&self, ino: u64) -> Result<Attr> {
        let inode = self.inode(ino)?;
        let (kind, size, nlink) = match &inode.body {
            Body::File(f) => (Kind::File, f.data.len() as u64, f.nlink),
            Body::Dir(d) => {
                let subdirs = d
                    .entries
                    .values()
                    .filter(|c| matches!(self.kind(**c), Ok(Kind::Dir)))
                    .count() as u32;
                (Kind::Dir, BLOCK_SIZE, 2 + subdirs)
            }
        };
        Ok(Attr {
            ino,
            kind,
            size,
            perm: inode.meta.perm,
            nlink,
            uid: inode.meta.uid,
            gid: inode.meta.gid,
            atime: inode.meta.atime,
            mtime: inode.meta.mtime,
            ctime: inode.meta.ctime,
        })
    }

    /// Attributes of `name` in `parent`.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr> {
        let ino = match name.as_encoded_bytes() {
            b"." => {
                self.dir(parent)?;
                parent
            }
            b".." => self.dir(parent)?.parent,
            _ => self.child(parent, name)?,
        };
        self.attr(ino)
    }

    /// Attributes of an inode.
    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        self.attr(ino)
    }

    /// Changes attributes. Growing a file needs space (ENOSPC while full); a
    /// size change is an unsynced change like a write.
    pub fn setattr(&mut self, ino: u64, fh: Option<u64>, set: &SetAttr) -> Result<Attr> {
        if let Some(fh) = fh {
            self.handle(fh)?;
        }
        let disk_full = self.faults.disk_full;
        if let Some(size) = set.size {
            if size > CAPACITY {
                return Err(Errno::EFBIG);
            }
            let file = self.file_mut(ino)?;
            if size > file.data.len() as u64 && disk_full {
                return Err(Errno::ENOSPC);
            }
            if size != file.data.len() as u64 {
                file.change(Change::SetLen(size));
            }
        }
        let meta = &mut self.inode_mut(ino)?.meta;
        if let Some(mode) = set.mode {
            meta.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = set.uid {
            meta.uid = uid;
        }
        if let Some(gid) = set.gid {
            meta.gid = gid;
        }
        if let Some(atime) = set.atime {
            meta.atime = atime;
        }
        match set.mtime {
            Some(mtime) => meta.mtime = mtime,
            None if set.size.is_some() => meta.mtime = SystemTime::now(),
            None => {}
        }
        meta.ctime = SystemTime::now();
        self.attr(ino)
    }

    // ---- names ----------------------------------------------------------

    /// Rejects names no directory entry may have.
    fn check_name(name: &OsStr) -> Result<()> {
        let bytes = name.as_encoded_bytes();
        if bytes.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    /// Adds a new inode under `parent/name` (entries only, not durable).
    fn insert_new(&mut self, parent: u64, name: &OsStr, meta: Meta, body: Body) -> Result<Attr> {
        Self::check_name(name)?;
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        if self.faults.disk_full {
            return Err(Errno::ENOSPC);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, Inode { meta, body });
        self.dir_mut(parent)?.entries.insert(name.to_owned(), ino);
        self.inode_mut(parent)?.meta.touch();
        self.attr(ino)
    }

    /// Creates an empty regular file (create and mknod of S_IFREG).
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        let body = Body::File(FileNode {
            nlink: 1,
            ..FileNode::default()
        });
        self.insert_new(
            parent,
            name,
            Meta::new((perm & 0o7777) as u16, uid, gid),
            body,
        )
    }

    /// Creates an empty directory.
    pub fn mkdir(
        &mut self,
        parent: u64,
        name: &OsStr,
        perm: u32,
        uid: u32,
        gid: u32,
    ) -> Result<Attr> {
        let body = Body::Dir(DirNode {
            parent,
            ..DirNode::default()
        });
        self.insert_new(
            parent,
            name,
            Meta::new((perm & 0o7777) as u16, uid, gid),
            body,
        )
    }

    /// Adds another name for a regular file.
    pub fn link(&mut self, ino: u64, newparent: u64, newname: &OsStr) -> Result<Attr> {
        Self::check_name(newname)?;
        if self.kind(ino)? == Kind::Dir {
            return Err(Errno::EPERM);
        }
        if self.dir(newparent)?.entries.contains_key(newname) {
            return Err(Errno::EEXIST);
        }
        if self.faults.disk_full {
            return Err(Errno::ENOSPC);
        }
        self.dir_mut(newparent)?
            .entries
            .insert(newname.to_owned(), ino);
        self.inode_mut(newparent)?.meta.touch();
        self.file_mut(ino)?.nlink += 1;
        self.inode_mut(ino)?.meta.ctime = SystemTime::now();
        self.attr(ino)
    }

    /// Removes a name of a regular file.
    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<()> {
        let ino = self.child(parent, name)?;
        if self.kind(ino)? == Kind::Dir {
            return Err(Errno::EISDIR);
        }
        self.remove_entry(parent, name)?;
        self.collect_garbage();
        Ok(())
    }

    /// Removes an empty directory.
    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<()> {
        if name.as_encoded_bytes() == b"." {
            return Err(Errno::EINVAL);
        }
        let ino = self.child(parent, name)?;
        if !self.dir(ino)?.entries.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        self.remove_entry(parent, name)?;
        self.collect_garbage();
        Ok(())
    }

    /// Drops `parent/name` from the entries and the link count of its file.
    fn remove_entry(&mut self, parent: u64, name: &OsStr) -> Result<u64> {
        let ino = self
            .dir_mut(parent)?
            .entries
            .remove(name)
            .ok_or(Errno::ENOENT)?;
        self.inode_mut(parent)?.meta.touch();
        if let Ok(file) = self.file_mut(ino) {
            file.nlink = file.nlink.saturating_sub(1);
        }
        if let Ok(inode) = self.inode_mut(ino) {
            inode.meta.ctime = SystemTime::now();
        }
        Ok(ino)
    }

    /// True if directory `ancestor` is `ino` or holds it, at any depth.
    fn is_ancestor(&self, ancestor: u64, mut ino: u64) -> bool {
        for _ in 0..=self.inodes.len() {
            if ino == ancestor {
                return true;
            }
            if ino == ROOT {
                return false;
            }
            match self.dir(ino) {
                Ok(d) => ino = d.parent,
                Err(_) => return false,
            }
        }
        false
    }

    /// Renames `parent/name` to `newparent/newname`. `flags` are renameat2
    /// flags: 0 and RENAME_NOREPLACE are supported, others answer EINVAL.
    /// Taking a new name needs space (ENOSPC while full); replacing one does not.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<()> {
        let noreplace = match flags {
            0 => false,
            libc::RENAME_NOREPLACE => true,
            _ => return Err(Errno::EINVAL),
        };
        Self::check_name(newname)?;
        let src = self.child(parent, name)?;
        let src_kind = self.kind(src)?;
        let target = self.dir(newparent)?.entries.get(newname).copied();
        match target {
            Some(_) if noreplace => return Err(Errno::EEXIST),
            Some(t) if t == src => return Ok(()),
            Some(t) => self.check_replace(src_kind, t)?,
            None if self.faults.disk_full => return Err(Errno::ENOSPC),
            None => {}
        }
        if src_kind == Kind::Dir && self.is_ancestor(src, newparent) {
            return Err(Errno::EINVAL);
        }
        if target.is_some() {
            self.remove_entry(newparent, newname)?;
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.inode_mut(parent)?.meta.touch();
        self.dir_mut(newparent)?
            .entries
            .insert(newname.to_owned(), src);
        self.inode_mut(newparent)?.meta.touch();
        if let Ok(d) = self.dir_mut(src) {
            d.parent = newparent;
        }
        self.inode_mut(src)?.meta.ctime = SystemTime::now();
        if target.is_some() {
            self.collect_garbage();
        }
        Ok(())
    }

    /// Checks that an inode of kind `src_kind` may replace `target`.
    fn check_replace(&self, src_kind: Kind, target: u64) -> Result<()> {
        match (src_kind, self.kind(target)?) {
            (Kind::File, Kind::File) => Ok(()),
            (Kind::File, Kind::Dir) => Err(Errno::EISDIR),
            (Kind::Dir, Kind::File) => Err(Errno::ENOTDIR),
            (Kind::Dir, Kind::Dir) if self.dir(target)?.entries.is_empty() => Ok(()),
            (Kind::Dir, Kind::Dir) => Err(Errno::ENOTEMPTY),
        }
    }

    /// Lists a directory now: ".", "..", then the names in byte order.
    pub fn readdir(&self, fh: u64) -> Result<Vec<DirEntry>> {
        let ino = self.handle(fh)?;
        let dir = self.dir(ino)?;
        let mut out = vec![
            DirEntry {
                ino,
                kind: Kind::Dir,
                name: ".".into(),
            },
            DirEntry {
                ino: dir.parent,
                kind: Kind::Dir,
                name: "..".into(),
            },
        ];
        for (name, &child) in &dir.entries {
            out.push(DirEntry {
                ino: child,
                kind: self.kind(child)?,
                name: name.clone(),
            });
        }
        Ok(out)
    }

    // ---- handles and content --------------------------------------------

    /// Opens an inode; `dir` says whether a directory is expected.
    pub fn open(&mut self, ino: u64, dir: bool) -> Result<u64> {
        match (self.kind(ino)?, dir) {
            (Kind::File, true) => return Err(Errno::ENOTDIR),
            (Kind::Dir, false) => return Err(Errno::EISDIR),
            _ => {}
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        let generation = self.generation;
        self.handles.insert(fh, Handle { ino, generation });
        Ok(fh)
    }

    /// Closes a handle (always works, even for a stale one).
    pub fn release(&mut self, fh: u64) {
        if self.handles.remove(&fh).is_some() {
            self.collect_garbage();
        }
    }

    /// A close of a file descriptor: EIO for a handle from before a power loss.
    pub fn flush(&self, fh: u64) -> Result<()> {
        self.handle(fh).map(|_| ())
    }

    /// Reads up to `size` bytes at `offset`.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let ino = self.handle(fh)?;
        match &self.inode(ino)?.body {
            Body::File(f) => {
                let len = f.data.len() as u64;
                let start = offset.min(len) as usize;
                let end = offset.saturating_add(u64::from(size)).min(len) as usize;
                Ok(f.data[start..end].to_vec())
            }
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    /// Writes `bytes` at `offset` (an unsynced change); ENOSPC while full.
    pub fn write(&mut self, fh: u64, offset: u64, bytes: &[u8]) -> Result<u32> {
        let ino = self.handle(fh)?;
        let end = offset.checked_add(bytes.len() as u64).ok_or(Errno::EFBIG)?;
        if end > CAPACITY {
            return Err(Errno::EFBIG);
        }
        let written = u32::try_from(bytes.len()).map_err(|_| Errno::EINVAL)?;
        if self.faults.disk_full {
            return Err(Errno::ENOSPC);
        }
        self.file_mut(ino)?.change(Change::Write {
            offset,
            bytes: bytes.to_vec(),
        });
        self.inode_mut(ino)?.meta.touch();
        Ok(written)
    }

    /// fallocate: mode 0 extends the file with zeros (an unsynced size
    /// change), FALLOC_FL_KEEP_SIZE is accepted as a no-op, others are
    /// EOPNOTSUPP.
    pub fn fallocate(&mut self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<()> {
        let ino = self.handle(fh)?;
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        if end > CAPACITY {
            return Err(Errno::EFBIG);
        }
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return Err(Errno::EOPNOTSUPP);
        }
        if self.faults.disk_full {
            return Err(Errno::ENOSPC);
        }
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let file = self.file_mut(ino)?;
        if !keep_size && end > file.data.len() as u64 {
            file.change(Change::SetLen(end));
            self.inode_mut(ino)?.meta.touch();
        }
        Ok(())
    }

    // ---- durability -----------------------------------------------------

    /// The error the fault switches impose on this fsync, if any. Consumes a
    /// one-shot EIO.
    fn fsync_fault(&mut self) -> Option<Errno> {
        if self.faults.disk_full {
            return Some(Errno::ENOSPC);
        }
        match self.faults.fsync {
            FsyncError::Off => None,
            FsyncError::Once => {
                self.faults.fsync = FsyncError::Off;
                Some(Errno::EIO)
            }
            FsyncError::UntilHealed => Some(Errno::EIO),
        }
    }

    /// fsync (or fdatasync) through a handle; on a directory handle it is a
    /// directory fsync.
    pub fn fsync(&mut self, fh: u64) -> Result<()> {
        let ino = self.handle(fh)?;
        self.sync_inode(ino)
    }

    /// fsyncdir through a directory handle.
    pub fn fsyncdir(&mut self, fh: u64) -> Result<()> {
        let ino = self.handle(fh)?;
        self.dir(ino)?;
        self.sync_inode(ino)
    }

    /// Makes one inode durable, or fails as the faults say. A failing file
    /// fsync drops its unsynced changes (see the module docs).
    pub fn sync_inode(&mut self, ino: u64) -> Result<()> {
        self.inode(ino)?;
        let fault = self.fsync_fault();
        match &mut self.inode_mut(ino)?.body {
            Body::File(f) => match fault {
                Some(e) => {
                    f.drop_unsynced();
                    Err(e)
                }
                None => {
                    f.sync();
                    Ok(())
                }
            },
            Body::Dir(d) => match fault {
                Some(e) => Err(e),
                None => {
                    d.durable_entries.clone_from(&d.entries);
                    self.collect_garbage();
                    Ok(())
                }
            },
        }
    }

    /// Space figures: 1 GiB in total, free shrinking with the data held
    /// (current and durable copies), nothing free while the disk is full.
    pub fn statfs(&self) -> StatFs {
        let blocks = CAPACITY / BLOCK_SIZE;
        let used: u64 = self
            .inodes
            .values()
            .map(|i| match &i.body {
                Body::File(f) => (f.data.len().max(f.durable.len()) as u64).div_ceil(BLOCK_SIZE),
                Body::Dir(_) => 1,
            })
            .sum();
        let bfree = if self.faults.disk_full {
            0
        } else {
            blocks.saturating_sub(used)
        };
        StatFs {
            blocks,
            bfree,
            files: MAX_INODES,
            ffree: MAX_INODES.saturating_sub(self.inodes.len() as u64),
            bsize: BLOCK_SIZE as u32,
            namelen: NAME_MAX as u32,
        }
    }

    /// Drops inodes nothing can reach any more: neither a name now, nor a
    /// durable name (which a power loss would bring back), nor a live handle.
    fn collect_garbage(&mut self) {
        let mut live = HashSet::new();
        let mut stack = vec![ROOT];
        stack.extend(
            self.handles
                .values()
                .filter(|h| h.generation == self.generation)
                .map(|h| h.ino),
        );
        while let Some(ino) = stack.pop() {
            if !live.insert(ino) {
                continue;
            }
            if let Ok(d) = self.dir(ino) {
                stack.extend(d.entries.values().chain(d.durable_entries.values()));
            }
        }
        self.inodes.retain(|ino, _| live.contains(ino));
    }

    /// Simulates a power loss: every directory's names become its durable
    /// names, every file's content its durable content (with `torn =
    /// Some(seed)`, plus a seeded prefix of its unsynced changes, the last one
    /// possibly cut short), unreachable inodes are dropped, and every open
    /// handle answers EIO from now on. The result is durable.
    pub fn power_loss(&mut self, torn: Option<u64>) -> PowerLoss {
        let mut report = PowerLoss::default();
        for (&ino, inode) in &mut self.inodes {
            match &mut inode.body {
                Body::File(f) => Self::lose_file_changes(ino, f, torn, &mut report),
                Body::Dir(d) => {
                    report.names_reverted += count_differences(&d.entries, &d.durable_entries);
                    d.entries.clone_from(&d.durable_entries);
                }
            }
        }
        report.inodes_dropped = self.rebuild_tree();
        // Handles stay (release must find them) but answer EIO from now on.
        self.generation += 1;
        report
    }

    /// The content part of a power loss for one file.
    fn lose_file_changes(ino: u64, f: &mut FileNode, torn: Option<u64>, report: &mut PowerLoss) {
        if f.pending.is_empty() {
            return;
        }
        report.files_reverted += 1;
        match torn {
            None => report.bytes_lost += f.drop_unsynced(),
            Some(seed) => {
                let mut rng = SplitMix64(seed ^ ino.wrapping_mul(0x2545_F491_4F6C_DD1D));
                let (lost, partial) = f.tear(&mut rng);
                report.bytes_lost += lost;
                report.torn_writes += u64::from(partial);
            }
        }
    }

    /// After a power loss: walks the (now durable) tree from the root,
    /// recomputes parents and link counts, removes second names of a
    /// directory (possible when a rename was durable in both directories),
    /// and drops every inode not reached. Returns the number dropped.
    fn rebuild_tree(&mut self) -> u64 {
        let mut reached = HashSet::from([ROOT]);
        let mut links: HashMap<u64, u32> = HashMap::new();
        let mut queue = VecDeque::from([ROOT]);
        while let Some(dir) = queue.pop_front() {
            let entries: Vec<(OsString, u64)> = match self.dir(dir) {
                Ok(d) => d.entries.iter().map(|(n, i)| (n.clone(), *i)).collect(),
                Err(_) => continue,
            };
            let mut extra_names = Vec::new();
            for (name, child) in entries {
                match self.kind(child) {
                    Ok(Kind::File) => {
                        reached.insert(child);
                        *links.entry(child).or_default() += 1;
                    }
                    Ok(Kind::Dir) if reached.insert(child) => {
                        if let Ok(d) = self.dir_mut(child) {
                            d.parent = dir;
                        }
                        queue.push_back(child);
                    }
                    _ => extra_names.push(name),
                }
            }
            if let Ok(d) = self.dir_mut(dir) {
                for name in extra_names {
                    d.entries.remove(&name);
                    d.durable_entries.remove(&name);
                }
            }
        }
        let before = self.inodes.len();
        self.inodes.retain(|ino, _| reached.contains(ino));
        for (ino, inode) in &mut self.inodes {
            if let Body::File(f) = &mut inode.body {
                f.nlink = links.get(ino).copied().unwrap_or(0);
            }
        }
        (before - self.inodes.len()) as u64
    }
}

/// Number of (name, inode) pairs in one map but not the other.
fn count_differences(a: &BTreeMap<OsString, u64>, b: &BTreeMap<OsString, u64>) -> u64 {
    let only_a = a.iter().filter(|(n, i)| b.get(*n) != Some(i)).count();
    let only_b = b.iter().filter(|(n, i)| a.get(*n) != Some(i)).count();
    (only_a + only_b) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One step of a table row, on paths relative to the root.
    #[derive(Clone, Debug)]
    enum Op {
        Create(&'static str),
        Mkdir(&'static str),
        /// Appends bytes at the file's current end.
        Write(&'static str, &'static str),
        Truncate(&'static str, u64),
        Fsync(&'static str),
        /// fsyncdir of a directory ("" is the root).
        FsyncDir(&'static str),
        Rename(&'static str, &'static str),
        RenameNoReplace(&'static str, &'static str),
        Unlink(&'static str),
        Rmdir(&'static str),
        FsyncFault(FsyncError),
        DiskFull(bool),
        /// The inner step must fail with this errno.
        Fails(i32, Box<Op>),
        /// The tree as reads see it now must be exactly this.
        Check(Vec<(&'static str, Option<&'static str>)>),
    }

    fn fails(errno: i32, op: Op) -> Op {
        Op::Fails(errno, Box::new(op))
    }

    /// Splits "a/b/c" into the inode of "a/b" and the name "c".
    fn parent_of(m: &Model, path: &str) -> (u64, OsString) {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        (resolve(m, dir), name.into())
    }

    /// The inode a path names now ("" is the root).
    fn resolve(m: &Model, path: &str) -> u64 {
        path.split('/')
            .filter(|c| !c.is_empty())
            .fold(ROOT, |ino, c| {
                m.lookup(ino, OsStr::new(c)).expect("path exists").ino
            })
    }

    /// Runs `f` on a fresh handle of `path`, releasing it afterwards.
    fn with_handle<T>(
        m: &mut Model,
        path: &str,
        dir: bool,
        f: impl FnOnce(&mut Model, u64) -> Result<T>,
    ) -> Result<T> {
        let fh = m.open(resolve(m, path), dir)?;
        let out = f(m, fh);
        m.release(fh);
        out
    }

    fn apply(m: &mut Model, op: &Op) -> Result<()> {
        match op {
            Op::Create(p) => {
                let (dir, name) = parent_of(m, p);
                m.create(dir, &name, 0o644, 0, 0).map(|_| ())
            }
            Op::Mkdir(p) => {
                let (dir, name) = parent_of(m, p);
                m.mkdir(dir, &name, 0o755, 0, 0).map(|_| ())
            }
            Op::Write(p, s) => with_handle(m, p, false, |m, fh| {
                let end = m.getattr(m.handle(fh)?)?.size;
                m.write(fh, end, s.as_bytes()).map(|_| ())
            }),
            Op::Truncate(p, len) => {
                let ino = resolve(m, p);
                let set = SetAttr {
                    size: Some(*len),
                    ..SetAttr::default()
                };
                m.setattr(ino, None, &set).map(|_| ())
            }
            Op::Fsync(p) => with_handle(m, p, false, |m, fh| m.fsync(fh)),
            Op::FsyncDir(p) => with_handle(m, p, true, |m, fh| m.fsyncdir(fh)),
            Op::Rename(a, b) | Op::RenameNoReplace(a, b) => {
                let flags = if matches!(op, Op::Rename(..)) {
                    0
                } else {
                    libc::RENAME_NOREPLACE
                };
                let (da, na) = parent_of(m, a);
                let (db, nb) = parent_of(m, b);
                m.rename(da, &na, db, &nb, flags)
            }
            Op::Unlink(p) => {
                let (dir, name) = parent_of(m, p);
                m.unlink(dir, &name)
            }
            Op::Rmdir(p) => {
                let (dir, name) = parent_of(m, p);
                m.rmdir(dir, &name)
            }
            Op::FsyncFault(mode) => {
                m.set_fsync_error(*mode);
                Ok(())
            }
            Op::DiskFull(full) => {
                m.set_disk_full(*full);
                Ok(())
            }
            Op::Fails(errno, inner) => {
                assert_eq!(apply(m, inner), Err(Errno(*errno)), "{inner:?} must fail");
                Ok(())
            }
            Op::Check(want) => {
                assert_eq!(tree(m), expected(want), "tree before power loss");
                Ok(())
            }
        }
    }

    /// The tree reads see now: path → file content, or `None` for a directory.
    fn tree(m: &Model) -> BTreeMap<String, Option<Vec<u8>>> {
        let mut out = BTreeMap::new();
        let mut stack = vec![(ROOT, String::new())];
        while let Some((dir, prefix)) = stack.pop() {
            for (name, &ino) in &m.dir(dir).expect("dir").entries {
                let path = format!("{prefix}{}", name.to_string_lossy());
                match &m.inodes[&ino].body {
                    Body::File(f) => {
                        out.insert(path, Some(f.data.clone()));
                    }
                    Body::Dir(_) => {
                        out.insert(path.clone(), None);
                        stack.push((ino, format!("{path}/")));
                    }
                }
            }
        }
        out
    }

    fn expected(want: &[(&str, Option<&str>)]) -> BTreeMap<String, Option<Vec<u8>>> {
        want.iter()
            .map(|(p, c)| (p.to_string(), c.map(|c| c.as_bytes().to_vec())))
            .collect()
    }

    struct Row {
        name: &'static str,
        ops: Vec<Op>,
        survives: Vec<(&'static str, Option<&'static str>)>,
    }

    fn rows() -> Vec<Row> {
        use Op::*;
        vec![
            Row {
                name: "write without fsync is lost",
                ops: vec![
                    Create("a"),
                    Write("a", "x"),
                    Fsync("a"),
                    FsyncDir(""),
                    Write("a", "yz"),
                ],
                survives: vec![("a", Some("x"))],
            },
            Row {
                name: "fsynced file whose name was never dir-fsynced is gone",
                ops: vec![Create("a"), Write("a", "x"), Fsync("a")],
                survives: vec![],
            },
            Row {
                name: "created and dir-fsynced, written without fsync: exists, empty",
                ops: vec![Create("a"), FsyncDir(""), Write("a", "hello")],
                survives: vec![("a", Some(""))],
            },
            Row {
                name: "temp + fsync + rename without final dir fsync keeps the old content",
                ops: vec![
                    Create("cur"),
                    Write("cur", "old"),
                    Fsync("cur"),
                    FsyncDir(""),
                    Create("tmp"),
                    Write("tmp", "new"),
                    Fsync("tmp"),
                    Rename("tmp", "cur"),
                    Check(vec![("cur", Some("new"))]),
                ],
                survives: vec![("cur", Some("old"))],
            },
            Row {
                name: "temp + fsync + rename + dir fsync gives the new content",
                ops: vec![
                    Create("cur"),
                    Write("cur", "old"),
                    Fsync("cur"),
                    FsyncDir(""),
                    Create("tmp"),
                    Write("tmp", "new"),
                    Fsync("tmp"),
                    Rename("tmp", "cur"),
                    FsyncDir(""),
                ],
                survives: vec![("cur", Some("new"))],
            },
            Row {
                name: "unlink without dir fsync: the file comes back with its durable content",
                ops: vec![
                    Create("a"),
                    Write("a", "x"),
                    Fsync("a"),
                    FsyncDir(""),
                    Write("a", "y"),
                    Unlink("a"),
                    Check(vec![]),
                ],
                survives: vec![("a", Some("x"))],
            },
            Row {
                name: "unlink with dir fsync stays unlinked",
                ops: vec![
                    Create("a"),
                    Write("a", "x"),
                    Fsync("a"),
                    FsyncDir(""),
                    Unlink("a"),
                    FsyncDir(""),
                ],
                survives: vec![],
            },
            Row {
                name: "rename into a subdirectory, both directories fsynced",
                ops: vec![
                    Mkdir("d"),
                    Create("a"),
                    Write("a", "x"),
                    Fsync("a"),
                    FsyncDir(""),
                    Rename("a", "d/a"),
                    FsyncDir("d"),
                    FsyncDir(""),
                ],
                survives: vec![("d", None), ("d/a", Some("x"))],
            },
            Row {
                name: "rename into a subdirectory, only the source fsynced: the file is lost",
                ops: vec![
                    Mkdir("d"),
                    Create("a"),
                    Write("a", "x"),
                    Fsync("a"),
                    FsyncDir(""),
                    Rename("a", "d/a"),
                    FsyncDir(""),
                ],
                survives: vec![("d", None)],
            },
            Row {
                name: "rename into a subdirectory, only the target fsynced: both names (documented)",
                ops: vec![
                    Mkdir("d"),
                    Create("a"),
                    Write("a", "x"),
                    Fsync("a"),
                    FsyncDir(""),
                    Rename("a", "d/a"),
                    FsyncDir("d"),
                ],
                survives: vec![("a", Some("x")), ("d", None), ("d/a", Some("x"))],
            },
            Row {
                name: "mkdir whose parent was not fsynced: the whole subtree is gone",
                ops: vec![
                    Mkdir("d"),
                    Mkdir("d/e"),
                    Create("d/e/f"),
                    Write("d/e/f", "x"),
                    Fsync("d/e/f"),
                    FsyncDir("d/e"),
                    FsyncDir("d"),
                ],
                survives: vec![],
            },
            Row {
                name: "mkdir with every level fsynced survives",
                ops: vec![
                    Mkdir("d"),
                    Mkdir("d/e"),
                    Create("d/e/f"),
                    Write("d/e/f", "x"),
                    Fsync("d/e/f"),
                    FsyncDir("d/e"),
                    FsyncDir("d"),
                    FsyncDir(""),
                ],
                survives: vec![("d", None), ("d/e", None), ("d/e/f", Some("x"))],
            },
            Row {
                name: "rmdir without dir fsync comes back",
                ops: vec![Mkdir("d"), FsyncDir(""), Rmdir("d"), Check(vec![])],
                survives: vec![("d", None)],
            },
            Row {
                name: "fsync EIO makes nothing durable and reverts the data",
                ops: vec![
                    Create("a"),
                    FsyncDir(""),
                    Write("a", "old"),
                    Fsync("a"),
                    Write("a", "new"),
                    FsyncFault(FsyncError::Once),
                    fails(libc::EIO, Fsync("a")),
                    Check(vec![("a", Some("old"))]),
                    // One-shot: the next fsync works again.
                    Write("a", "2"),
                    Fsync("a"),
                ],
                survives: vec![("a", Some("old2"))],
            },
            Row {
                name: "fsyncdir EIO until healed makes no name durable",
                ops: vec![
                    Create("a"),
                    FsyncFault(FsyncError::UntilHealed),
                    fails(libc::EIO, FsyncDir("")),
                    fails(libc::EIO, FsyncDir("")),
                    Check(vec![("a", Some(""))]),
                ],
                survives: vec![],
            },
            Row {
                name: "disk full: ENOSPC and nothing changes",
                ops: vec![
                    Create("a"),
                    Write("a", "x"),
                    Fsync("a"),
                    FsyncDir(""),
                    DiskFull(true),
                    fails(libc::ENOSPC, Write("a", "yy")),
                    fails(libc::ENOSPC, Create("b")),
                    fails(libc::ENOSPC, Mkdir("d")),
                    fails(libc::ENOSPC, Rename("a", "c")),
                    fails(libc::ENOSPC, Truncate("a", 10)),
                    fails(libc::ENOSPC, FsyncDir("")),
                    Check(vec![("a", Some("x"))]),
                    // Shrinking needs no space; a failing fsync then drops it.
                    Truncate("a", 0),
                    fails(libc::ENOSPC, Fsync("a")),
                    Check(vec![("a", Some("x"))]),
                    DiskFull(false),
                ],
                survives: vec![("a", Some("x"))],
            },
            Row {
                name: "truncate without fsync is lost, with fsync kept",
                ops: vec![
                    Create("a"),
                    Create("b"),
                    Write("a", "hello"),
                    Write("b", "hello"),
                    Fsync("a"),
                    Fsync("b"),
                    FsyncDir(""),
                    Truncate("a", 2),
                    Truncate("b", 2),
                    Fsync("b"),
                    Check(vec![("a", Some("he")), ("b", Some("he"))]),
                ],
                survives: vec![("a", Some("hello")), ("b", Some("he"))],
            },
            Row {
                name: "rename with NOREPLACE refuses an existing name",
                ops: vec![
                    Create("a"),
                    Create("b"),
                    fails(libc::EEXIST, RenameNoReplace("a", "b")),
                    RenameNoReplace("a", "c"),
                    FsyncDir(""),
                ],
                survives: vec![("b", Some("")), ("c", Some(""))],
            },
        ]
    }

    #[test]
    fn power_loss_table() {
        for row in rows() {
            let mut m = Model::new(0, 0);
            for op in &row.ops {
                if let Err(e) = apply(&mut m, op) {
                    panic!("row {:?}: {op:?} failed with {e:?}", row.name);
                }
            }
            m.power_loss(None);
            assert_eq!(tree(&m), expected(&row.survives), "row {:?}", row.name);
            // The state after a power loss is durable: a second one changes nothing.
            let again = m.power_loss(None);
            assert_eq!(again, PowerLoss::default(), "row {:?}", row.name);
            assert_eq!(tree(&m), expected(&row.survives), "row {:?}", row.name);
        }
    }

    #[test]
    fn torn_power_loss_keeps_a_prefix_of_the_unsynced_writes() {
        let unsynced = b"BBBBCCCCDDDD";
        let mut outcomes = HashSet::new();
        for seed in 0..32u64 {
            let mut m = Model::new(0, 0);
            for op in [
                Op::Create("a"),
                Op::Write("a", "AAAA"),
                Op::Fsync("a"),
                Op::FsyncDir(""),
            ] {
                apply(&mut m, &op).expect("setup");
            }
            for chunk in ["BBBB", "CCCC", "DDDD"] {
                apply(&mut m, &Op::Write("a", chunk)).expect("write");
            }
            let report = m.power_loss(Some(seed));
            let content = tree(&m)["a"].clone().expect("a is a file");
            assert!(content.starts_with(b"AAAA"), "seed {seed}: {content:?}");
            let tail = &content[4..];
            assert!(
                unsynced.starts_with(tail),
                "seed {seed}: {content:?} is not durable + prefix"
            );
            assert_eq!(
                report.bytes_lost,
                (unsynced.len() - tail.len()) as u64,
                "seed {seed}"
            );
            outcomes.insert(tail.len());
        }
        assert!(outcomes.len() >= 3, "seeds give varied tears: {outcomes:?}");
    }

    #[test]
    fn torn_power_loss_is_deterministic_per_seed() {
        let run = |seed| {
            let mut m = Model::new(0, 0);
            for op in [
                Op::Create("a"),
                Op::FsyncDir(""),
                Op::Write("a", "0123"),
                Op::Write("a", "4567"),
            ] {
                apply(&mut m, &op).expect("op");
            }
            m.power_loss(Some(seed));
            tree(&m)
        };
        for seed in [1, 7, 42] {
            assert_eq!(run(seed), run(seed));
        }
    }

    #[test]
    fn handles_from_before_a_power_loss_answer_eio() {
        let mut m = Model::new(0, 0);
        apply(&mut m, &Op::Create("a")).expect("create");
        apply(&mut m, &Op::FsyncDir("")).expect("fsyncdir");
        let fh = m.open(resolve(&m, "a"), false).expect("open");
        m.power_loss(None);
        assert_eq!(m.read(fh, 0, 10), Err(Errno::EIO));
        assert_eq!(m.write(fh, 0, b"x"), Err(Errno::EIO));
        assert_eq!(m.fsync(fh), Err(Errno::EIO));
        assert_eq!(m.flush(fh), Err(Errno::EIO));
        m.release(fh);
        let fresh = m.open(resolve(&m, "a"), false).expect("open again");
        assert_eq!(m.write(fresh, 0, b"x"), Ok(1));
    }

    #[test]
    fn unlinked_inodes_are_collected_once_nothing_reaches_them() {
        let mut m = Model::new(0, 0);
        for op in [Op::Create("a"), Op::FsyncDir("")] {
            apply(&mut m, &op).expect("op");
        }
        let ino = resolve(&m, "a");
        let fh = m.open(ino, false).expect("open");
        apply(&mut m, &Op::Unlink("a")).expect("unlink");
        apply(&mut m, &Op::FsyncDir("")).expect("fsyncdir");
        // Still open: readable and writable.
        assert_eq!(m.write(fh, 0, b"x"), Ok(1));
        assert!(m.getattr(ino).is_ok());
        m.release(fh);
        assert_eq!(m.getattr(ino), Err(Errno::ENOENT));
    }

    #[test]
    fn rename_edge_cases() {
        let mut m = Model::new(0, 0);
        for op in [
            Op::Mkdir("d"),
            Op::Mkdir("d/e"),
            Op::Create("f"),
            Op::Create("g"),
        ] {
            apply(&mut m, &op).expect("op");
        }
        let d = resolve(&m, "d");
        let e = resolve(&m, "d/e");
        assert_eq!(
            m.rename(ROOT, OsStr::new("d"), e, OsStr::new("x"), 0),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            m.rename(
                ROOT,
                OsStr::new("f"),
                ROOT,
                OsStr::new("g"),
                libc::RENAME_EXCHANGE
            ),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            m.rename(ROOT, OsStr::new("f"), ROOT, OsStr::new("d"), 0),
            Err(Errno::EISDIR)
        );
        assert_eq!(
            m.rename(ROOT, OsStr::new("d"), ROOT, OsStr::new("f"), 0),
            Err(Errno::ENOTDIR)
        );
        assert_eq!(m.rmdir(ROOT, OsStr::new("d")), Err(Errno::ENOTEMPTY));
        assert_eq!(
            m.rename(d, OsStr::new("e"), ROOT, OsStr::new("e"), 0),
            Ok(())
        );
        assert_eq!(m.lookup(e, OsStr::new("..")).map(|a| a.ino), Ok(ROOT));
        assert_eq!(
            m.rename(ROOT, OsStr::new("f"), ROOT, OsStr::new("g"), 0),
            Ok(())
        );
        assert_eq!(
            tree(&m),
            expected(&[("d", None), ("e", None), ("g", Some(""))])
        );
    }

    #[test]
    fn statfs_shrinks_with_data_and_is_empty_when_full() {
        let mut m = Model::new(0, 0);
        let before = m.statfs();
        apply(&mut m, &Op::Create("a")).expect("create");
        let fh = m.open(resolve(&m, "a"), false).expect("open");
        m.write(fh, 0, &[7u8; 3 * 4096]).expect("write");
        assert_eq!(m.statfs().bfree, before.bfree - 3);
        m.set_disk_full(true);
        assert_eq!(m.statfs().bfree, 0);
        m.heal();
        assert_eq!(m.statfs().bfree, before.bfree - 3);
    }

    #[test]
    fn fallocate_extends_and_set_len_works() {
        let mut m = Model::new(0, 0);
        apply(&mut m, &Op::Create("a")).expect("create");
        let fh = m.open(resolve(&m, "a"), false).expect("open");
        m.fallocate(fh, 0, 100, 0).expect("fallocate");
        assert_eq!(m.getattr(resolve(&m, "a")).map(|a| a.size), Ok(100));
        m.fallocate(fh, 0, 1000, libc::FALLOC_FL_KEEP_SIZE)
            .expect("keep size");
        assert_eq!(m.getattr(resolve(&m, "a")).map(|a| a.size), Ok(100));
        assert_eq!(
            m.fallocate(
                fh,
                0,
                10,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            ),
            Err(Errno::EOPNOTSUPP)
        );
    }
}
