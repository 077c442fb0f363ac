//! The files of `deploy/` as an operator uses them.
//!
//! The image: `deploy/build-image.sh` builds it from this test's `tso` binary with `buildah`
//! (Debian's package; `scripts/test` installs it), in a storage of its own under a temporary
//! directory. Containers cannot be run on every machine (an unprivileged `crun` fails on
//! `setrlimit`), so the test unpacks the image's root filesystem and runs the server from it
//! with `chroot`, as the image's user, the way a runtime would: nothing from the host is used
//! but the kernel. A name a runtime writes into the container's `/etc/hosts` must resolve
//! through the image's own glibc, NSS modules and `/etc/nsswitch.conf`.
//!
//! The systemd unit: `systemd-analyze verify` must report nothing about it.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::{self, Server, tso_bin};

/// The image's `PATH` (buildah's default for an image with none), given to processes in it.
const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The image's user and group (`USER` in deploy/Containerfile).
const IMAGE_USER: u32 = 65532;
const TAG: &str = "localhost/tso-deploy-test:latest";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace root")
}

fn explain(output: &Output) -> String {
    format!(
        "{}\n--- stdout:\n{}\n--- stderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A container storage of its own (vfs driver, no mounts) in a temporary directory, so the test
/// neither reads nor leaves anything in the machine's.
struct Storage {
    dir: tempfile::TempDir,
}

impl Storage {
    fn new() -> Storage {
        let found = Command::new("buildah").arg("--version").output();
        assert!(
            found.as_ref().is_ok_and(|out| out.status.success()),
            "buildah is missing or broken ({found:?}): run scripts/test, which installs Debian's \
             buildah package, to run the image test"
        );
        Storage {
            dir: tempfile::tempdir().expect("a temporary directory for the image storage"),
        }
    }

    /// The global options that point buildah at this storage.
    fn options(&self) -> Vec<String> {
        let dir = self.dir.path().display();
        vec![
            format!("--root={dir}/root"),
            format!("--runroot={dir}/run"),
            "--storage-driver=vfs".to_string(),
        ]
    }

    /// Runs `buildah OPTIONS args...` and returns its stdout, failing the test on an error.
    fn buildah(&self, args: &[&str]) -> String {
        let output = Command::new("buildah")
            .args(self.options())
            .args(args)
            .output()
            .expect("running buildah");
        assert!(
            output.status.success(),
            "buildah {args:?}: {}",
            explain(&output)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        // vfs mounts nothing; unmounting anyway keeps the directory removable whatever buildah
        // did. The directory itself goes with `dir`.
        let _ = Command::new("buildah")
            .args(self.options())
            .args(["umount", "--all"])
            .output();
    }
}

/// `chroot --userspec=USER:USER ROOTFS /usr/local/bin/tso ARGS...`, with the image's
/// environment only.
fn in_image(rootfs: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("chroot");
    command
        .env_clear()
        .env("PATH", IMAGE_PATH)
        .arg(format!("--userspec={IMAGE_USER}:{IMAGE_USER}"))
        .arg(rootfs)
        .arg("/usr/local/bin/tso")
        .args(args);
    command
}

#[test]
fn the_image_serves_as_its_user_and_resolves_names_through_its_own_files() {
    let _turn = crate::common::topic(module_path!());
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "the image test runs the unpacked image with chroot, which needs root: run scripts/test \
         as root"
    );
    let storage = Storage::new();

    // Build, as an operator would, with the storage passed through BUILDAH_OPTS.
    let build = Command::new(workspace_root().join("deploy/build-image.sh"))
        .arg(tso_bin())
        .arg(TAG)
        .env("BUILDAH_OPTS", storage.options().join(" "))
        .output()
        .expect("running deploy/build-image.sh");
    assert!(
        build.status.success(),
        "deploy/build-image.sh: {}",
        explain(&build)
    );

    let inspect: serde_json::Value =
        serde_json::from_str(&storage.buildah(&["inspect", "--type", "image", TAG]))
            .expect("buildah inspect's JSON");
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["User"], "65532:65532", "{config}");
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/tso"]),
        "{config}"
    );
    assert_eq!(
        config["Cmd"],
        serde_json::json!([
            "serve",
            "--data-dir",
            "/var/lib/tso",
            "--listen",
            "0.0.0.0:50551"
        ]),
        "{config}"
    );
    assert!(
        config["ExposedPorts"].get("50551/tcp").is_some(),
        "{config}"
    );

    // Unpack: a working container's root filesystem, a plain directory under vfs.
    let container = storage.buildah(&["from", TAG]);
    let rootfs = PathBuf::from(storage.buildah(&["mount", &container]));
    let data = std::fs::metadata(rootfs.join("var/lib/tso")).expect("/var/lib/tso in the image");
    assert_eq!(
        (data.uid(), data.gid(), data.permissions().mode() & 0o7777),
        (IMAGE_USER, IMAGE_USER, 0o700),
        "/var/lib/tso: owner, group, mode"
    );
    let tmp = std::fs::metadata(rootfs.join("tmp")).expect("/tmp in the image");
    assert_eq!(tmp.permissions().mode() & 0o7777, 0o1777, "/tmp's mode");
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains("tso:x:65532:65532:"), "{passwd}");

    // The server, from the image, as the image's user, its data in the image's data directory.
    let mut command = in_image(
        &rootfs,
        &[
            "serve",
            "--data-dir",
            "/var/lib/tso",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    command.env("TSO_LOG", "info,openraft=warn");
    let server = Server::spawn(command)
        .unwrap_or_else(|(status, log)| panic!("tso serve in the image exited {status}: {log}"));
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    let endpoint = format!("http://tso-node-1:{port}");

    // Control: the name is unknown before the runtime's line is in the image's /etc/hosts.
    let unknown = in_image(
        &rootfs,
        &["get", "--endpoints", &endpoint, "--timeout", "2s"],
    )
    .output()
    .unwrap();
    assert!(
        !unknown.status.success() && String::from_utf8_lossy(&unknown.stderr).contains("dns"),
        "tso-node-1 resolved before /etc/hosts named it: {}",
        explain(&unknown)
    );

    let mut hosts = std::fs::read_to_string(rootfs.join("etc/hosts")).unwrap();
    hosts.push_str("127.0.0.1\ttso-node-1\n");
    std::fs::write(rootfs.join("etc/hosts"), hosts).unwrap();

    let get = in_image(&rootfs, &["get", "--endpoints", &endpoint])
        .output()
        .unwrap();
    assert!(
        get.status.success(),
        "tso get through tso-node-1: {}",
        explain(&get)
    );
    let stdout = String::from_utf8(get.stdout).unwrap();
    let ts: u64 = stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not one timestamp: {stdout:?}"));
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let physical_ms = ts >> 18;
    assert!(
        physical_ms.abs_diff(now_ms) < 60_000,
        "timestamp {ts} has physical ms {physical_ms}, the clock says {now_ms}"
    );
    println!("tso get --endpoints {endpoint} (in the image): {ts}");

    // What the server wrote belongs to the image's user.
    for entry in std::fs::read_dir(rootfs.join("var/lib/tso")).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        assert_eq!(meta.uid(), IMAGE_USER, "{:?}", entry.path());
    }

    // SIGTERM, as `podman stop` sends it, drains and exits 0.
    let mut server = server;
    server.signal(libc::SIGTERM);
    let status = server.wait_exit();
    assert!(
        status.success(),
        "tso serve in the image after SIGTERM: {status}: {}",
        common::drain(&server.stderr)
    );
}

/// Runs `systemd-analyze verify` on `unit`, written as `tso.service` in a fresh directory;
/// returns whether it exited 0, and the lines about our unit (others are noise from the
/// machine's own units).
fn verify(unit: &str) -> (bool, Vec<String>, String) {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    assert!(
        analyze.exists(),
        "{} is missing: run scripts/test, which installs Debian's systemd package",
        analyze.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tso.service");
    std::fs::write(&path, unit).unwrap();
    let output = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .expect("running systemd-analyze");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let ours = all
        .lines()
        .filter(|line| {
            line.contains("tso.service") || line.contains(&*dir.path().to_string_lossy())
        })
        .map(str::to_string)
        .collect();
    (output.status.success(), ours, all)
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let _turn = crate::common::topic(module_path!());
    let unit = std::fs::read_to_string(workspace_root().join("deploy/tso.service"))
        .expect("deploy/tso.service");
    // verify checks that ExecStart's binary exists: point it at the one under test.
    let exec = "ExecStart=/usr/local/bin/tso serve";
    assert!(unit.contains(exec), "deploy/tso.service has no `{exec}`");
    let local = unit.replace(exec, &format!("ExecStart={} serve", tso_bin().display()));

    let (ok, ours, all) = verify(&local);
    assert!(
        ok && ours.is_empty(),
        "systemd-analyze verify deploy/tso.service reported:\n{}\n(full output:\n{all})",
        ours.join("\n")
    );
    if !all.trim().is_empty() {
        println!("systemd-analyze verify, about other units (ignored):\n{all}");
    }

    // Control: a misspelt setting is reported (verify exits 0 for it), so the check above
    // would catch one in our unit.
    let misspelt = local.replace("ProtectHome=yes", "ProtecHome=yes");
    let (_, ours, all) = verify(&misspelt);
    assert!(
        ours.iter().any(|line| line.contains("ProtecHome")),
        "systemd-analyze verify did not report a misspelt key:\n{all}"
    );

    // Stopping leaves the server's SIGTERM handoff (--shutdown-grace, 10 s by default) room
    // before systemd's SIGKILL.
    let stop_secs: u64 = unit
        .lines()
        .find_map(|line| line.strip_prefix("TimeoutStopSec="))
        .and_then(|value| value.trim().trim_end_matches('s').parse().ok())
        .expect("TimeoutStopSec=Ns in deploy/tso.service");
    assert!(stop_secs > 10, "TimeoutStopSec={stop_secs}s");
    for setting in [
        "StateDirectory=tso",
        "KillSignal=SIGTERM",
        "Restart=on-failure",
    ] {
        assert!(
            unit.lines().any(|line| line == setting),
            "no `{setting}` in deploy/tso.service"
        );
    }
}
