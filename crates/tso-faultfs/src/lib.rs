//! A filesystem for power-loss and disk-fault tests.
//!
//! [`Mount::new`] serves an in-memory filesystem over FUSE at a directory
//! (typically a server's data directory). The filesystem remembers, like
//! Jepsen's LazyFS, what the last fsync of each file and directory made
//! durable; [`Control::power_loss`] throws away everything else, and the other
//! [`Control`] switches make fsync fail, the disk full, or fsync slow. The
//! semantics are in [`model`] and documented there.
//!
//! Mounting: fuser (without libfuse) calls mount(2) itself when the process
//! may (root / CAP_SYS_ADMIN), and falls back to the setuid `fusermount3`
//! helper otherwise. Tests run it inside a private mount namespace (see
//! [`enter_private_mount_namespace`]) so a crashed test never leaves a mount
//! behind on the host.

pub mod model;

mod fuse;

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use model::{FsyncError, PowerLoss};

use fuse::FaultFs;
use model::Model;

/// A mounted fault filesystem. The FUSE session runs on a background thread;
/// dropping the `Mount` unmounts it (errors are then only logged by fuser —
/// call [`Mount::unmount`] to see them).
pub struct Mount {
    session: Option<fuser::BackgroundSession>,
    control: Control,
    mountpoint: PathBuf,
}

impl Mount {
    /// Mounts an empty fault filesystem at `mountpoint`, an existing directory.
    /// Whatever the directory held is hidden while mounted.
    pub fn new(mountpoint: &Path) -> io::Result<Mount> {
        if !mountpoint.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("mount point {} is not a directory", mountpoint.display()),
            ));
        }
        // SAFETY: geteuid and getegid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let model = Arc::new(Mutex::new(Model::new(uid, gid)));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("tso-faultfs".into()),
            fuser::MountOption::Subtype("tso-faultfs".into()),
            // The kernel checks permissions from our attributes.
            fuser::MountOption::DefaultPermissions,
        ];
        let session = fuser::spawn_mount(FaultFs::new(Arc::clone(&model)), mountpoint, &config)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("mounting tso-faultfs at {}: {e}", mountpoint.display()),
                )
            })?;
        Ok(Mount {
            session: Some(session),
            control: Control { model },
            mountpoint: mountpoint.to_path_buf(),
        })
    }

    /// A handle for injecting faults; it stays usable after unmounting.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Where the filesystem is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts and waits for the FUSE session thread to finish. Fails with
    /// EBUSY if something still has a file open on the mount.
    pub fn unmount(mut self) -> io::Result<()> {
        match self.session.take() {
            Some(session) => session.umount_and_join(),
            None => Ok(()),
        }
    }
}

/// Fault injection for a mounted filesystem; cheap to clone, usable from any
/// thread.
#[derive(Clone)]
pub struct Control {
    model: Arc<Mutex<Model>>,
}

impl Control {
    /// Simulates a power loss: only what fsync/fsyncdir made durable remains
    /// (with `torn = Some(seed)`, plus a seeded prefix of each file's unsynced
    /// writes, the last one cut short). Open handles answer EIO afterwards, so
    /// kill the server before calling this. Returns what was lost, for logs.
    pub fn power_loss(&self, torn: Option<u64>) -> PowerLoss {
        fuse::lock(&self.model).power_loss(torn)
    }

    /// Makes fsync and fsyncdir answer EIO once, always, or not at all. A
    /// failed file fsync drops that file's unsynced writes.
    pub fn fsync_error(&self, mode: FsyncError) {
        fuse::lock(&self.model).set_fsync_error(mode);
    }

    /// While set, everything needing space (writes, new names, growing a
    /// file, fsync) answers ENOSPC.
    pub fn disk_full(&self, full: bool) {
        fuse::lock(&self.model).set_disk_full(full);
    }

    /// Makes every fsync and fsyncdir take `delay` before answering.
    pub fn slow_fsync(&self, delay: Duration) {
        fuse::lock(&self.model).set_slow_fsync(delay);
    }

    /// Clears all faults.
    pub fn heal(&self) {
        fuse::lock(&self.model).heal();
    }
}

/// Moves this process into a private mount namespace (`unshare(CLONE_NEWNS)`,
/// then makes "/" recursively private), so mounts made afterwards vanish with
/// the namespace's last process and are never seen outside.
///
/// Must be called while the process has one thread (the kernel refuses
/// `CLONE_NEWNS`, which implies `CLONE_FS`, in a multi-threaded process).
/// Requires root (CAP_SYS_ADMIN); returns a clear error otherwise.
pub fn enter_private_mount_namespace() -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a private mount namespace needs root (CAP_SYS_ADMIN); run the test as root",
        ));
    }
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "unshare(CLONE_NEWNS) needs a single-threaded process, this one has {threads} threads"
            ),
        ));
    }
    // SAFETY: unshare only changes this (single-threaded) process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(os_error("unshare(CLONE_NEWNS)"));
    }
    let root = CString::new("/").map_err(io::Error::other)?;
    // SAFETY: valid NUL-terminated path; null source/type/data are allowed
    // for a propagation change.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(os_error("mount(\"/\", MS_REC | MS_PRIVATE)"));
    }
    Ok(())
}

/// The last OS error, with what was being done.
fn os_error(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Number of threads of this process, from /proc/self/status.
fn thread_count() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}
