//! Mounts tso-faultfs for real, through the kernel.
//!
//! Mount namespaces are entered per process and need a single-threaded
//! process, which the test harness is not, so the real work runs in the
//! `faultfs_probe` binary as a child process. This test needs root and
//! /dev/fuse and fails (never skips) without them.

use std::path::Path;
use std::process::Command;

fn require_root_and_fuse() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "tso-faultfs mount test needs root (CAP_SYS_ADMIN) to enter a mount namespace and mount; running as uid {euid}"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "tso-faultfs mount test needs /dev/fuse (load the fuse module / pass the device to the container)"
    );
}

#[test]
fn probe_mounts_injects_faults_and_leaks_no_mount() {
    require_root_and_fuse();
    let dir = tempfile::tempdir().expect("tempdir");
    let output = Command::new(env!("CARGO_BIN_EXE_faultfs_probe"))
        .arg(dir.path())
        .output()
        .expect("run faultfs_probe");
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "faultfs_probe failed: {}",
        output.status
    );

    let canonical = dir.path().canonicalize().expect("canonical tempdir");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    assert!(
        !mountinfo.contains(&*canonical.to_string_lossy()),
        "the probe's mount leaked into the host namespace:\n{mountinfo}"
    );
    // The directory is back to its (empty) self.
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("read tempdir").count(),
        0
    );
}
