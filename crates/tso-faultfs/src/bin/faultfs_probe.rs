//! End-to-end probe of tso-faultfs through the real kernel, run by
//! `tests/mount.rs` in a child process.
//!
//! Usage: `faultfs_probe <empty directory>`. The probe enters a private mount
//! namespace (so nothing it mounts is visible outside or outlives it), mounts
//! the fault filesystem on the directory, drives it with std::fs and checks
//! what survives power losses and what errors the faults produce. It prints
//! one line per check and exits non-zero on the first failure.

use std::error::Error;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tso_faultfs::{Control, FsyncError, Mount, enter_private_mount_namespace};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn main() {
    if let Err(e) = run() {
        eprintln!("faultfs_probe: FAILED: {e}");
        std::process::exit(1);
    }
    println!("faultfs_probe: all checks passed");
}

fn run() -> Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .ok_or("usage: faultfs_probe <empty directory>")?;
    enter_private_mount_namespace()?;
    ok("entered a private mount namespace");
    let mount = Mount::new(&dir)?;
    ok(&format!("mounted at {}", dir.display()));
    let control = mount.control();
    check_mounted(&dir)?;
    power_loss_keeps_only_durable_state(&dir, &control)?;
    locks_work(&dir)?;
    set_len_and_fallocate(&dir)?;
    fsync_error_once(&dir, &control)?;
    disk_full(&dir, &control)?;
    slow_fsync(&dir, &control)?;
    torn_power_loss(&dir, &control)?;
    control.heal();
    mount.unmount()?;
    ok("unmounted");
    Ok(())
}

fn ok(what: &str) {
    println!("ok: {what}");
}

fn ensure(cond: bool, what: String) -> Result<()> {
    if cond { Ok(()) } else { Err(what.into()) }
}

/// Checks that an error carries the expected errno.
fn expect_errno<T: std::fmt::Debug>(result: io::Result<T>, errno: i32, what: &str) -> Result<()> {
    match result {
        Err(e) if e.raw_os_error() == Some(errno) => {
            ok(&format!("{what}: {e}"));
            Ok(())
        }
        other => Err(format!("{what}: expected errno {errno}, got {other:?}").into()),
    }
}

/// fsync of a directory (std opens it read-only; fsync goes out as FUSE fsyncdir).
fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// The mount shows up in this namespace's mount table as our fuse type.
fn check_mounted(dir: &Path) -> Result<()> {
    let canonical = dir.canonicalize()?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&*canonical.to_string_lossy()))
        .ok_or("mount not in /proc/self/mountinfo")?;
    ensure(
        line.contains(" - fuse tso-faultfs ") || line.contains(" - fuse.tso-faultfs "),
        format!("unexpected mount line: {line}"),
    )?;
    ok(&format!("mountinfo: {line}"));
    Ok(())
}

fn power_loss_keeps_only_durable_state(dir: &Path, control: &Control) -> Result<()> {
    let data = dir.join("data");
    fs::create_dir(&data)?;
    sync_dir(dir)?;
    // The durable-replace pattern: temp file, fsync, rename, fsync the directory.
    let tmp = data.join("state.tmp");
    let state = data.join("state");
    let mut f = File::create(&tmp)?;
    f.write_all(b"v1")?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, &state)?;
    sync_dir(&data)?;
    // Unsynced: more bytes in the state file, and a fsynced file whose name
    // was never made durable.
    let mut open_before = OpenOptions::new().append(true).read(true).open(&state)?;
    open_before.write_all(b" and more")?;
    let mut orphan = File::create(data.join("orphan"))?;
    orphan.write_all(b"never named durably")?;
    orphan.sync_all()?;
    drop(orphan);
    ensure(
        fs::read(&state)? == b"v1 and more",
        "state before power loss".into(),
    )?;
    ok("wrote durable and unsynced state");

    let report = control.power_loss(None);
    ok(&format!("power loss: {report:?}"));
    let after = fs::read(&state)?;
    ensure(
        after == b"v1",
        format!(
            "state after power loss: {:?}",
            String::from_utf8_lossy(&after)
        ),
    )?;
    ok("fsynced+renamed+dir-fsynced content survived, unsynced append lost");
    ensure(!data.join("orphan").exists(), "orphan survived".into())?;
    ensure(!tmp.exists(), "temp name survived".into())?;
    ok("file whose name was never dir-fsynced is gone");
    let mut buf = Vec::new();
    expect_errno(
        open_before.read_to_end(&mut buf),
        libc::EIO,
        "read on a handle from before the power loss",
    )?;
    drop(open_before);
    let names: Vec<_> = fs::read_dir(&data)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    ensure(names == ["state"], format!("data dir lists {names:?}"))?;
    ok("readdir after power loss lists only the durable name");
    Ok(())
}

/// flock and fcntl locks on the mount: taken, and exclusive.
fn locks_work(dir: &Path) -> Result<()> {
    let lock_path = dir.join("data").join("LOCK");
    let first = File::create(&lock_path)?;
    // SAFETY: flock on an open descriptor.
    let rc = unsafe { libc::flock(first.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    ensure(rc == 0, format!("flock: {}", io::Error::last_os_error()))?;
    let second = File::open(&lock_path)?;
    // SAFETY: as above.
    let rc = unsafe { libc::flock(second.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    let err = io::Error::last_os_error();
    ensure(
        rc == -1 && err.raw_os_error() == Some(libc::EWOULDBLOCK),
        format!("second flock: rc {rc}, {err}"),
    )?;
    ok("flock on the mount: taken, and a second exclusive flock is refused");
    // A POSIX record lock (what fcntl-based lock files use).
    // SAFETY: a zeroed flock struct is a valid argument once filled in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl(F_SETLK) with a valid flock struct.
    let rc = unsafe { libc::fcntl(first.as_raw_fd(), libc::F_SETLK, &fl) };
    ensure(
        rc == 0,
        format!("fcntl(F_SETLK): {}", io::Error::last_os_error()),
    )?;
    ok("fcntl(F_SETLK) write lock on the mount");
    Ok(())
}

fn set_len_and_fallocate(dir: &Path) -> Result<()> {
    let path = dir.join("data").join("sized");
    let f = File::create(&path)?;
    f.set_len(10_000)?;
    ensure(f.metadata()?.len() == 10_000, "set_len grow".into())?;
    f.set_len(3)?;
    ensure(fs::metadata(&path)?.len() == 3, "set_len shrink".into())?;
    // SAFETY: fallocate on an open descriptor.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 8192) };
    ensure(
        rc == 0,
        format!("fallocate: {}", io::Error::last_os_error()),
    )?;
    ensure(
        fs::metadata(&path)?.len() == 8192,
        "fallocate extends".into(),
    )?;
    ok("File::set_len (grow, shrink) and fallocate");
    Ok(())
}

fn fsync_error_once(dir: &Path, control: &Control) -> Result<()> {
    let path = dir.join("data").join("state");
    let mut f = OpenOptions::new().append(true).open(&path)?;
    f.write_all(b"+lost")?;
    control.fsync_error(FsyncError::Once);
    expect_errno(f.sync_all(), libc::EIO, "fsync with fsync_error(Once)")?;
    ensure(
        fs::read(&path)? == b"v1",
        "a failed fsync drops the unsynced write".into(),
    )?;
    ok("failed fsync reverted the file to its durable content");
    f.sync_all()?;
    ok("the next fsync succeeds");
    control.fsync_error(FsyncError::UntilHealed);
    expect_errno(
        sync_dir(dir),
        libc::EIO,
        "fsyncdir with fsync_error(UntilHealed)",
    )?;
    expect_errno(
        f.sync_all(),
        libc::EIO,
        "fsync with fsync_error(UntilHealed)",
    )?;
    control.heal();
    f.sync_all()?;
    ok("fsync works again after heal");
    Ok(())
}

fn disk_full(dir: &Path, control: &Control) -> Result<()> {
    let path = dir.join("data").join("state");
    let mut f = OpenOptions::new().append(true).open(&path)?;
    control.disk_full(true);
    expect_errno(
        f.write_all(b"more"),
        libc::ENOSPC,
        "write while the disk is full",
    )?;
    expect_errno(
        File::create(dir.join("data").join("new")),
        libc::ENOSPC,
        "create while the disk is full",
    )?;
    expect_errno(
        fs::create_dir(dir.join("newdir")),
        libc::ENOSPC,
        "mkdir while the disk is full",
    )?;
    expect_errno(f.sync_all(), libc::ENOSPC, "fsync while the disk is full")?;
    let statfs = nix_statfs(dir)?;
    ensure(
        statfs == 0,
        format!("statfs free blocks while full: {statfs}"),
    )?;
    control.disk_full(false);
    f.write_all(b"!")?;
    f.sync_all()?;
    ensure(fs::read(&path)? == b"v1!", "content after disk full".into())?;
    ensure(nix_statfs(dir)? > 0, "statfs free after disk full".into())?;
    ok("writes work again when the disk is no longer full");
    Ok(())
}

/// Free blocks reported by statfs(2).
fn nix_statfs(dir: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: a zeroed statfs is a valid out-parameter.
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-parameter.
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(s.f_bfree as u64)
}

fn slow_fsync(dir: &Path, control: &Control) -> Result<()> {
    let delay = Duration::from_millis(200);
    control.slow_fsync(delay);
    let mut f = OpenOptions::new()
        .append(true)
        .open(dir.join("data").join("state"))?;
    f.write_all(b"?")?;
    let start = Instant::now();
    f.sync_all()?;
    let took = start.elapsed();
    ensure(took >= delay, format!("slow fsync took only {took:?}"))?;
    ok(&format!("fsync with slow_fsync(200ms) took {took:?}"));
    let start = Instant::now();
    sync_dir(dir)?;
    let took = start.elapsed();
    ensure(took >= delay, format!("slow fsyncdir took only {took:?}"))?;
    ok(&format!("fsyncdir with slow_fsync(200ms) took {took:?}"));
    control.heal();
    Ok(())
}

fn torn_power_loss(dir: &Path, control: &Control) -> Result<()> {
    let path = dir.join("data").join("state");
    let unsynced = b"0123456789abcdef".repeat(64);
    let mut lost_some = false;
    for seed in 0..8 {
        let durable = fs::read(&path)?;
        {
            let mut f = OpenOptions::new().append(true).open(&path)?;
            for chunk in unsynced.chunks(256) {
                f.write_all(chunk)?;
            }
        }
        let report = control.power_loss(Some(seed));
        let after = fs::read(&path)?;
        ensure(
            after.starts_with(&durable),
            format!("seed {seed}: torn power loss kept the durable content"),
        )?;
        let kept = &after[durable.len()..];
        ensure(
            unsynced.starts_with(kept),
            format!("seed {seed}: torn tail is a prefix of the unsynced bytes"),
        )?;
        lost_some |= kept.len() < unsynced.len();
        ok(&format!(
            "torn power loss (seed {seed}): durable {} bytes + {} of {} unsynced bytes; {report:?}",
            durable.len(),
            kept.len(),
            unsynced.len()
        ));
    }
    ensure(lost_some, "no seed tore anything".into())?;
    Ok(())
}
