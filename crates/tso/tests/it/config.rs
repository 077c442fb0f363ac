//! `tso serve --config FILE` and `--print-config` as a user runs them: the example file, the
//! order of precedence (file < `TSO_*` variables < flags), errors naming the key and the file,
//! the printed configuration read back, and a server started from a file.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use crate::common;

/// The example shipped with the repository.
fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tso.toml")
}

/// `tso` with `args`, with no `TSO_*` variable but those of `env`; (status, stdout, stderr).
fn tso(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut command = Command::new(common::tso_bin());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TSO_") {
            command.env_remove(name);
        }
    }
    let out = command
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running tso");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `tso serve ARGS --print-config`, which must succeed; its output.
fn print_config(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    all.push("--print-config");
    let (status, out, err) = tso(&all, env);
    assert!(status.success(), "tso {all:?} failed: {err}");
    out
}

/// `tso serve ARGS`, which must fail with a usage error; its stderr.
fn refused(args: &[&str]) -> String {
    let mut all = vec!["serve"];
    all.extend_from_slice(args);
    let (status, out, err) = tso(&all, &[]);
    assert_eq!(status.code(), Some(2), "tso {all:?}: {out}{err}");
    err
}

/// Writes `text` as `name` under `dir`; the path as a string.
fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// The public long flags of `tso serve`, from its `--help` (clap's `Command`, not a list kept
/// here), without `--help`, `--config` and `--print-config`.
fn public_flags() -> Vec<String> {
    let (status, help, err) = tso(&["serve", "--help"], &[]);
    assert!(status.success(), "{err}");
    let flags: Vec<String> = help
        .lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = match line.strip_prefix('-') {
                Some(rest) if !rest.starts_with('-') => rest.split_once(", ")?.1,
                _ => line,
            };
            let name = line.strip_prefix("--")?;
            let end = name
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .unwrap_or(name.len());
            Some(name[..end].to_string())
        })
        .filter(|name| !["help", "config", "print-config"].contains(&name.as_str()))
        .collect();
    assert!(flags.len() > 30, "too few flags in --help: {flags:?}");
    flags
}

/// The value line of `key` in a printed configuration.
fn line_of<'a>(printed: &'a str, key: &str) -> &'a str {
    let prefix = format!("{key} = ");
    printed
        .lines()
        .find(|line| line.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no `{key}` in\n{printed}"))
}

#[test]
fn the_example_has_every_public_flag_and_loads() {
    let _turn = crate::common::topic(module_path!());
    let example_path = example();
    let example_text = std::fs::read_to_string(&example_path).unwrap();
    let printed = print_config(&["--config", example_path.to_str().unwrap()], &[]);
    assert_eq!(line_of(&printed, "data-dir"), "data-dir = \"/var/lib/tso\"");
    assert_eq!(line_of(&printed, "backend"), "backend = \"file\"");
    for flag in public_flags() {
        let set = format!("{flag} = ");
        let unset = format!("# {flag} =");
        assert!(
            example_text
                .lines()
                .any(|line| line.starts_with(&set) || line.starts_with(&format!("# {set}"))),
            "examples/tso.toml lacks a key for --{flag}"
        );
        assert!(
            printed
                .lines()
                .any(|line| line.starts_with(&set) || line.starts_with(&unset)),
            "--print-config lacks a key for --{flag}:\n{printed}"
        );
    }
    // The keys commented out hold valid values too: uncommented, the file still loads.
    let dir = tempfile::tempdir().unwrap();
    let flags = public_flags();
    let uncommented: String = example_text
        .lines()
        .map(|line| {
            let bare = line.strip_prefix("# ").unwrap_or(line);
            let is_key = flags
                .iter()
                .any(|flag| bare.starts_with(&format!("{flag} = ")));
            format!("{}\n", if is_key { bare } else { line })
        })
        .collect();
    let all = write(dir.path(), "all.toml", &uncommented);
    let printed = print_config(&["--config", &all], &[]);
    assert!(
        printed.lines().all(|line| !line.ends_with(" =")),
        "a key stayed unset:\n{printed}"
    );
    assert_eq!(line_of(&printed, "threads"), "threads = 4");
}

#[test]
fn flags_beat_variables_beat_the_file_beats_defaults() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "tso.toml",
        "listen = \"127.0.0.1:7001\"\nlog = \"warn\"\nwindow-ahead = \"4s\"\n\
         etcd-endpoints = [\"http://a:2379\", \"http://b:2379\"]\n",
    );
    let printed = print_config(&["--config", &file], &[]);
    assert_eq!(line_of(&printed, "listen"), "listen = \"127.0.0.1:7001\"");
    assert_eq!(line_of(&printed, "log"), "log = \"warn\"");
    assert_eq!(line_of(&printed, "window-ahead"), "window-ahead = \"4s\"");
    assert_eq!(
        line_of(&printed, "etcd-endpoints"),
        "etcd-endpoints = [\"http://a:2379\", \"http://b:2379\"]"
    );
    assert_eq!(
        line_of(&printed, "shutdown-grace"),
        "shutdown-grace = \"10s\""
    );

    let env = [
        ("TSO_LISTEN", "127.0.0.1:7002"),
        ("TSO_LOG", "debug"),
        ("TSO_ETCD_ENDPOINTS", "http://c:2379"),
    ];
    let printed = print_config(&["--config", &file], &env);
    assert_eq!(line_of(&printed, "listen"), "listen = \"127.0.0.1:7002\"");
    assert_eq!(line_of(&printed, "log"), "log = \"debug\"");
    assert_eq!(line_of(&printed, "window-ahead"), "window-ahead = \"4s\"");
    assert_eq!(
        line_of(&printed, "etcd-endpoints"),
        "etcd-endpoints = [\"http://c:2379\"]"
    );

    let flags = [
        "--config",
        &file,
        "--listen",
        "127.0.0.1:7003",
        "--window-ahead",
        "6s",
    ];
    let printed = print_config(&flags, &env);
    assert_eq!(line_of(&printed, "listen"), "listen = \"127.0.0.1:7003\"");
    assert_eq!(line_of(&printed, "log"), "log = \"debug\"");
    assert_eq!(line_of(&printed, "window-ahead"), "window-ahead = \"6s\"");

    // TSO_CONFIG names the file as --config does.
    let printed = print_config(&[], &[("TSO_CONFIG", &file)]);
    assert_eq!(line_of(&printed, "listen"), "listen = \"127.0.0.1:7001\"");
}

#[test]
fn unknown_and_hidden_keys_are_refused() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "typo.toml", "data_dir = \"/var/lib/tso\"\n");
    let err = refused(&["--config", &file]);
    assert!(
        err.contains(&format!(
            "unknown key `data_dir` in {file}; did you mean `data-dir`?"
        )),
        "{err}"
    );
    for hidden in [
        "unsafe-seq-forget = true",
        "no-handoff = true",
        "config = \"x\"",
    ] {
        let file = write(dir.path(), "hidden.toml", &format!("{hidden}\n"));
        let key = hidden.split(' ').next().unwrap();
        let err = refused(&["--config", &file, "--print-config"]);
        assert!(
            err.contains(&format!("unknown key `{key}` in {file}")),
            "{err}"
        );
    }
}

#[test]
fn bad_files_and_values_name_the_key_and_the_file() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    for (text, expected) in [
        (
            "threads = \"four\"\n",
            "key `threads` in FILE must be an integer, not a string",
        ),
        (
            "join = \"yes\"\n",
            "key `join` in FILE must be true or false, not a string",
        ),
        (
            "members = \"1=a:1/2\"\n",
            "key `members` in FILE must be an array of strings, not a string",
        ),
        (
            "threads = 0\n",
            "bad value for key `threads` in FILE: invalid value '0'",
        ),
        (
            "window-ahead = \"soon\"\n",
            "bad value for key `window-ahead` in FILE: invalid value 'soon' for '--window-ahead",
        ),
        (
            "listen = \"nowhere\"\n",
            "bad value for key `listen` in FILE: invalid value 'nowhere'",
        ),
        (
            "backend = \"zookeeper\"\n",
            "bad value for key `backend` in FILE",
        ),
        (
            "listen = \"127.0.0.1:1\"\nlog = [\n",
            "FILE is not valid TOML: TOML parse error at line",
        ),
        ("tls-cert = \"/etc/tso/server.pem\"\n", "--tls-key"),
    ] {
        let file = write(dir.path(), "bad.toml", text);
        let err = refused(&["--config", &file, "--print-config"]);
        let expected = expected.replace("FILE", &file);
        assert!(
            err.contains(&expected),
            "{text:?}: expected {expected:?} in {err}"
        );
    }
    // A requirement met by a flag, or by the file, is met.
    let file = write(
        dir.path(),
        "cert.toml",
        "tls-cert = \"/etc/tso/server.pem\"\n",
    );
    let printed = print_config(
        &["--config", &file, "--tls-key", "/etc/tso/server.key"],
        &[],
    );
    assert_eq!(
        line_of(&printed, "tls-key"),
        "tls-key = \"/etc/tso/server.key\""
    );
    let file = write(
        dir.path(),
        "key.toml",
        "tls-key = \"/etc/tso/server.key\"\n",
    );
    print_config(
        &["--config", &file, "--tls-cert", "/etc/tso/server.pem"],
        &[],
    );

    let missing = dir.path().join("missing.toml");
    let err = refused(&["--config", missing.to_str().unwrap()]);
    assert!(
        err.contains(&format!(
            "cannot read the configuration file {}",
            missing.display()
        )),
        "{err}"
    );
}

#[test]
fn printed_configuration_reads_back_the_same() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "tso.toml",
        "backend = \"raft\"\nnode-id = 2\njoin = true\nwindow-ahead = \"2500ms\"\n",
    );
    let first = print_config(
        &[
            "--config",
            &file,
            "--members",
            "1=127.0.0.1:1/2,2=127.0.0.1:3/4",
            "--threads",
            "3",
            "--insecure",
        ],
        &[
            ("TSO_LOG", "info,tso_server=debug"),
            ("TSO_DATA_DIR", "/srv/tso \"a\""),
        ],
    );
    let printed = write(dir.path(), "printed.toml", &first);
    let second = print_config(&["--config", &printed], &[]);
    let body = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|line| !line.starts_with("# --config "))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(body(&first), body(&second));
    for line in [
        "backend = \"raft\"",
        "node-id = 2",
        "join = true",
        "insecure = true",
        "threads = 3",
        "members = [\"1=127.0.0.1:1/2\", \"2=127.0.0.1:3/4\"]",
        "log = \"info,tso_server=debug\"",
    ] {
        assert_eq!(line_of(&second, line.split(' ').next().unwrap()), line);
    }
    // Quoting is the TOML writer's choice; the value must survive it.
    let table: toml::Table = second.parse().unwrap();
    assert_eq!(table["data-dir"].as_str(), Some("/srv/tso \"a\""));
}

#[test]
fn a_server_runs_from_a_config_file() {
    let _turn = crate::common::topic(module_path!());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = write(
        dir.path(),
        "tso.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\ndata-dir = {}\nwindow-ahead = \"2s\"\nlog = \"warn\"\n",
            toml::Value::String(data.to_str().unwrap().to_string())
        ),
    );
    let mut command = Command::new(common::tso_bin());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TSO_") {
            command.env_remove(name);
        }
    }
    command.args(["serve", "--config", &file]);
    let server = common::Server::spawn(command)
        .unwrap_or_else(|(status, log)| panic!("tso serve exited with {status}: {log}"));
    let (status, out, err) = tso(&["get", "--endpoints", &server.addr, "-n", "2"], &[]);
    assert!(status.success(), "tso get: {err}");
    let stamps: Vec<u64> = out
        .lines()
        .map(|line| line.trim().parse().unwrap())
        .collect();
    assert_eq!(stamps.len(), 2, "{out}");
    assert!(stamps[0] < stamps[1]);
    assert!(data.is_dir(), "the data directory of the file was not used");
}
