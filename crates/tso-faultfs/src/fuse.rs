//! The `fuser::Filesystem` adapter: translates FUSE requests into calls on the
//! shared [`Model`] and its answers into replies. No semantics live here.
//!
//! Caching is disabled wherever the kernel would otherwise answer from memory
//! and so hide a power loss: entries and attributes have a zero TTL, and every
//! open file uses `FOPEN_DIRECT_IO` so reads and writes bypass the page cache.
//!
//! Locks: fuser does not ask the kernel for `FUSE_POSIX_LOCKS` or
//! `FUSE_FLOCK_LOCKS`, so the kernel handles `flock` and `fcntl` locks locally
//! (per mount) and never sends lock requests here; locking works as on a
//! local filesystem within this machine.

use std::ffi::OsStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::model::{self, Attr, Kind, Model, SetAttr};

/// Entries and attributes are never cached by the kernel.
const TTL: Duration = Duration::ZERO;

/// Inode numbers are never reused, so the FUSE generation can stay 0.
const GENERATION: Generation = Generation(0);

/// The filesystem served over FUSE: a shared handle on the model, which the
/// harness's `Control` also holds.
pub(crate) struct FaultFs {
    model: Arc<Mutex<Model>>,
}

impl FaultFs {
    pub(crate) fn new(model: Arc<Mutex<Model>>) -> FaultFs {
        FaultFs { model }
    }

    /// Locks the model. A panic while holding the lock cannot leave the model
    /// half-changed in a way that matters to a test, so poisoning is ignored.
    fn model(&self) -> MutexGuard<'_, Model> {
        lock(&self.model)
    }
}

/// Locks a shared model, ignoring poisoning (see [`FaultFs::model`]).
pub(crate) fn lock(model: &Mutex<Model>) -> MutexGuard<'_, Model> {
    model
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn errno(e: model::Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e.0)
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: model::BLOCK_SIZE as u32,
        flags: 0,
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
    }
}

fn system_time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

fn reply_entry(result: model::Result<Attr>, reply: ReplyEntry) {
    match result {
        Ok(a) => reply.entry(&TTL, &file_attr(&a), GENERATION),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_attr(result: model::Result<Attr>, reply: ReplyAttr) {
    match result {
        Ok(a) => reply.attr(&TTL, &file_attr(&a)),
        Err(e) => reply.error(errno(e)),
    }
}

fn reply_empty(result: model::Result<()>, reply: ReplyEmpty) {
    match result {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

/// Answers an fsync after the configured delay without blocking the request
/// loop: the durable snapshot was already taken when the request arrived (an
/// fsync covers what was written before it was called); only the reply waits,
/// on its own thread.
fn reply_fsync(result: model::Result<()>, delay: Duration, reply: ReplyEmpty) {
    if delay.is_zero() {
        reply_empty(result, reply);
        return;
    }
    let spawned = thread::Builder::new()
        .name("faultfs-slow-fsync".into())
        .spawn(move || {
            thread::sleep(delay);
            reply_empty(result, reply);
        });
    // If no thread can be made, the closure (and with it the reply) is
    // dropped, and fuser answers EIO for an unsent reply.
    drop(spawned);
}

impl Filesystem for FaultFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(self.model().lookup(parent.0, name), reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply_attr(self.model().getattr(ino.0), reply);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(system_time),
            mtime: mtime.map(system_time),
        };
        reply_attr(self.model().setattr(ino.0, fh.map(|f| f.0), &set), reply);
    }

    /// Only regular files can be made with mknod; other node types are EPERM.
    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            reply.error(fuser::Errno::EPERM);
            return;
        }
        let perm = mode & !umask;
        reply_entry(
            self.model()
                .create(parent.0, name, perm, req.uid(), req.gid()),
            reply,
        );
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let perm = mode & !umask;
        reply_entry(
            self.model()
                .mkdir(parent.0, name, perm, req.uid(), req.gid()),
            reply,
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.model().unlink(parent.0, name), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(self.model().rmdir(parent.0, name), reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self
            .model()
            .rename(parent.0, name, newparent.0, newname, flags.bits());
        reply_empty(result, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply_entry(self.model().link(ino.0, newparent.0, newname), reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.model().open(ino.0, false) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.model().read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.model().write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.model().flush(fh.0), reply);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.model().release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let (result, delay) = {
            let mut model = self.model();
            (model.fsync(fh.0), model.slow_fsync_delay())
        };
        reply_fsync(result, delay, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.model().open(ino.0, true) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Lists the directory as it is now; `offset` is the number of entries
    /// already returned.
    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.model().readdir(fh.0) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(e)),
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, entry) in entries.iter().enumerate().skip(start) {
            let next = i as u64 + 1;
            if reply.add(INodeNo(entry.ino), next, file_type(entry.kind), &entry.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.model().release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let (result, delay) = {
            let mut model = self.model();
            (model.fsyncdir(fh.0), model.slow_fsync_delay())
        };
        reply_fsync(result, delay, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.model().statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
        );
    }

    /// Only called without `default_permissions`; the caller is the mount's
    /// owner (fuser refuses others), so existence is all that is checked.
    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply_empty(self.model().getattr(ino.0).map(|_| ()), reply);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let perm = mode & !umask;
        let mut model = self.model();
        let created = model
            .create(parent.0, name, perm, req.uid(), req.gid())
            .and_then(|attr| Ok((attr, model.open(attr.ino, false)?)));
        match created {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &file_attr(&attr),
                GENERATION,
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(self.model().fallocate(fh.0, offset, length, mode), reply);
    }
}
