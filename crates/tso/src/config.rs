//! `tso serve --config FILE` (a TOML file) and `tso serve --print-config`.
//!
//! # The file's shape: flat keys, one per flag
//!
//! Every public `tso serve` flag has one top-level key, named as the flag's long name:
//! `data-dir = "/var/lib/tso"`, `etcd-endpoints = ["http://a:2379"]`, `window-ahead = "3s"`,
//! `join = true`, `threads = 8`. There are no tables. Flat keys that match the flags 1:1 are the
//! easiest to explain and to check: `tso serve --help` documents the file too, a key can be moved
//! to the command line (or back) without renaming it, and the list of keys is derived from clap's
//! own `Command`, so a new flag gets its key with no code here. Tables (`[tls]`, `[raft]`) would
//! need a second naming scheme beside the flags' for no gain at this size. Hidden flags (the
//! `--unsafe-*` controls, `--no-handoff`) have no key: naming one is an unknown-key error, so a
//! file can never break a server on purpose. `--config` and `--print-config` have none either.
//!
//! # Precedence: flags > `TSO_*` variables > the file > built-in defaults
//!
//! The file's values are installed as the defaults of their flags in clap's `Command`, then the
//! command line is parsed: clap's own order (flag, then `env`, then default) does the rest, and
//! every value goes through the same value parser as the flag. Each file value is checked first on
//! its own, with that parser, so a bad one is reported with its key and the file.
//!
//! clap checks `requires` only for values given explicitly (flag or variable), never for
//! defaults, so that parse runs with the `requires` rules switched off, and a second parse checks
//! them on the explicit equivalent of the result: every value from a flag, a variable or the file
//! passed as a flag. A file giving `tls-cert` without `tls-key` thus fails just as the flags would.
//!
//! A boolean key set to `true` cannot be turned off from the command line (clap's boolean flags
//! only switch on): remove it from the file instead.

use std::any::TypeId;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use clap::builder::Resettable;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, CommandFactory, FromArgMatches};

use crate::cli::Cli;

/// The subcommand the file configures.
const SERVE: &str = "serve";

/// Ids of public `tso serve` arguments that are not settings, hence not keys.
const NOT_KEYS: &[&str] = &["help", "version", "config", "print_config"];

/// The TOML type a key takes, from its flag's clap action and value parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A switch (`--join`): `true` or `false`.
    Bool,
    /// A number (`--threads 8`): a TOML integer.
    Integer,
    /// A flag taking a list (`--members a,b`): an array of strings.
    List,
    /// Anything else (addresses, paths, durations, names): a string.
    Text,
}

impl Kind {
    fn of(arg: &Arg) -> Kind {
        match arg.get_action() {
            ArgAction::SetTrue | ArgAction::SetFalse => Kind::Bool,
            ArgAction::Append => Kind::List,
            _ => {
                let ty = arg.get_value_parser().type_id();
                let integers = [
                    TypeId::of::<u8>(),
                    TypeId::of::<u16>(),
                    TypeId::of::<u32>(),
                    TypeId::of::<u64>(),
                    TypeId::of::<usize>(),
                    TypeId::of::<i8>(),
                    TypeId::of::<i16>(),
                    TypeId::of::<i32>(),
                    TypeId::of::<i64>(),
                ];
                if integers.iter().any(|int| ty == *int) {
                    Kind::Integer
                } else {
                    Kind::Text
                }
            }
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Kind::Bool => "true or false",
            Kind::Integer => "an integer",
            Kind::List => "an array of strings",
            Kind::Text => "a string",
        }
    }
}

/// One key of the file: a public `tso serve` flag.
#[derive(Debug, Clone)]
pub struct Key {
    /// clap's id of the argument (`data_dir`).
    pub id: String,
    /// The key, which is the flag's long name (`data-dir`).
    pub name: String,
    pub kind: Kind,
    /// The flag's visible aliases (`client-addr`), only to suggest the key.
    aliases: Vec<String>,
}

/// The `tso serve` command as clap builds it from the derive.
fn serve_command() -> clap::Command {
    Cli::command()
        .find_subcommand(SERVE)
        .expect("tso has a serve subcommand")
        .clone()
}

/// Every key of the file, in `--help` order: the public long flags of `tso serve`.
pub fn keys() -> Vec<Key> {
    keys_of(&serve_command())
}

fn keys_of(serve: &clap::Command) -> Vec<Key> {
    serve
        .get_arguments()
        .filter(|arg| !arg.is_hide_set() && !NOT_KEYS.contains(&arg.get_id().as_str()))
        .filter_map(|arg| {
            Some(Key {
                id: arg.get_id().to_string(),
                name: arg.get_long()?.to_string(),
                kind: Kind::of(arg),
                aliases: arg
                    .get_visible_aliases()
                    .unwrap_or_default()
                    .into_iter()
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// The number of single-character insertions, deletions and substitutions that turn `a` into
/// `b` (Levenshtein), over chars.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The key nearest to an unknown `name` (case, and `_` for `-`, ignored; an alias counts as its
/// key), if it is near enough to be a likely typo: at most a third of the name's length apart,
/// and at least one edit always allowed.
pub fn nearest_key<'k>(name: &str, keys: &'k [Key]) -> Option<&'k str> {
    let normal = |s: &str| s.to_lowercase().replace('_', "-");
    let wanted = &normal(name);
    let limit = (wanted.chars().count() / 3).max(1);
    keys.iter()
        .flat_map(|key| {
            std::iter::once(&key.name)
                .chain(&key.aliases)
                .map(move |spelling| (edit_distance(wanted, &normal(spelling)), key))
        })
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, key)| key.name.as_str())
}

/// The values of a configuration file, checked against the flags' value parsers.
#[derive(Debug)]
struct FileValues {
    path: PathBuf,
    /// (clap id, the values as they would be written after the flag).
    values: Vec<(String, Vec<String>)>,
}

impl FileValues {
    fn read(path: &Path, serve: &clap::Command) -> anyhow::Result<FileValues> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
        Self::parse(path, &text, serve)
    }

    fn parse(path: &Path, text: &str, serve: &clap::Command) -> anyhow::Result<FileValues> {
        let shown = path.display();
        let table: toml::Table = text
            .parse()
            .map_err(|err: toml::de::Error| anyhow!("{shown} is not valid TOML: {err}"))?;
        let keys = keys_of(serve);
        let mut values = Vec::new();
        for (name, value) in &table {
            let Some(key) = keys.iter().find(|key| key.name == *name) else {
                let mut message = format!("unknown key `{name}` in {shown}");
                if let Some(near) = nearest_key(name, &keys) {
                    message.push_str(&format!("; did you mean `{near}`?"));
                } else if value.is_table() {
                    message.push_str(" (the file has no tables: one top-level key per flag)");
                }
                bail!(message);
            };
            let strings = to_strings(key.kind, value).ok_or_else(|| {
                anyhow!(
                    "key `{name}` in {shown} must be {}, not {}",
                    key.kind.expected(),
                    describe(value)
                )
            })?;
            let arg = serve
                .get_arguments()
                .find(|arg| arg.get_id() == key.id.as_str())
                .expect("keys come from these arguments");
            check_values(arg, key.kind, &strings)
                .map_err(|message| anyhow!("bad value for key `{name}` in {shown}: {message}"))?;
            values.push((key.id.clone(), strings));
        }
        Ok(FileValues {
            path: path.to_path_buf(),
            values,
        })
    }

    fn has(&self, id: &str) -> bool {
        self.values.iter().any(|(known, _)| known == id)
    }
}

/// A TOML value as the strings its flag would take, `None` if its type is wrong for `kind`.
fn to_strings(kind: Kind, value: &toml::Value) -> Option<Vec<String>> {
    match (kind, value) {
        (Kind::Bool, toml::Value::Boolean(b)) => Some(vec![b.to_string()]),
        (Kind::Integer, toml::Value::Integer(i)) => Some(vec![i.to_string()]),
        (Kind::Text, toml::Value::String(s)) => Some(vec![s.clone()]),
        (Kind::List, toml::Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string))
            .collect(),
        _ => None,
    }
}

/// The TOML type of `value`, for errors.
fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(_) => "a string".into(),
        toml::Value::Integer(_) => "an integer".into(),
        toml::Value::Float(_) => "a float".into(),
        toml::Value::Boolean(_) => "a boolean".into(),
        toml::Value::Datetime(_) => "a date-time".into(),
        toml::Value::Array(items) => match items.iter().find(|item| !item.is_str()) {
            Some(item) => format!("an array holding {}", describe(item)),
            None => "an array".into(),
        },
        toml::Value::Table(_) => "a table".into(),
    }
}

/// Runs `values` through the flag's own value parser, as `--flag=value` would, in a command of
/// that one argument; clap's message if one is refused.
fn check_values(arg: &Arg, kind: Kind, values: &[String]) -> Result<(), String> {
    if kind == Kind::Bool {
        return Ok(());
    }
    let long = arg.get_long().expect("keys are long flags");
    let probe = arg
        .clone()
        .env(Resettable::Reset)
        .requires(Resettable::Reset)
        .required(false);
    let argv = std::iter::once(OsString::from("tso serve")).chain(
        values
            .iter()
            .map(|v| OsString::from(format!("--{long}={v}"))),
    );
    clap::Command::new("tso serve")
        .arg(probe)
        .try_get_matches_from(argv)
        .map(drop)
        .map_err(|err| clap_message(&err))
}

/// clap's error message without its `error: ` prefix, usage and help hint.
fn clap_message(err: &clap::Error) -> String {
    let rendered = err.to_string();
    let body = rendered.strip_prefix("error: ").unwrap_or(&rendered);
    body.split("\n\n")
        .next()
        .unwrap_or(body)
        .trim_end()
        .to_string()
}

/// The parsed command line, and the text `tso serve --print-config` prints, if asked.
pub struct Parsed {
    pub cli: Cli,
    pub print_config: Option<String>,
}

/// Parses the process's command line, with `tso serve --config FILE` (or `TSO_CONFIG`) read
/// first. A usage error in the flags exits as clap does (status 2); an error in the file is
/// returned.
pub fn parse() -> anyhow::Result<Parsed> {
    parse_from(std::env::args_os().collect())
}

/// [`parse`] over the given arguments (the program name first).
pub fn parse_from(argv: Vec<OsString>) -> anyhow::Result<Parsed> {
    // A first parse without `requires`, only to find the subcommand and the file: a
    // requirement may be met by the file.
    let first = without_requires(Cli::command())
        .try_get_matches_from(&argv)
        .unwrap_or_else(|err| err.exit());
    let Some((SERVE, serve_matches)) = first.subcommand() else {
        return finish(first, None);
    };
    let Some(path) = serve_matches.get_one::<PathBuf>("config").cloned() else {
        let matches = Cli::command()
            .try_get_matches_from(&argv)
            .unwrap_or_else(|err| err.exit());
        return finish(matches, None);
    };
    let file = FileValues::read(&path, &serve_command())?;
    let matches = with_file_defaults(without_requires(Cli::command()), &file)
        .try_get_matches_from(&argv)
        .unwrap_or_else(|err| err.exit());
    let (_, serve_matches) = matches.subcommand().expect("serve, as in the first parse");
    check_requirements(serve_matches, &file)?;
    finish(matches, Some(&file))
}

fn finish(matches: ArgMatches, file: Option<&FileValues>) -> anyhow::Result<Parsed> {
    let print_config = match matches.subcommand() {
        Some((SERVE, serve)) if serve.get_flag("print_config") => Some(render(serve, file)),
        _ => None,
    };
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
    Ok(Parsed { cli, print_config })
}

fn without_requires(cli: clap::Command) -> clap::Command {
    cli.mut_subcommand(SERVE, |serve| {
        serve.mut_args(|arg| arg.requires(Resettable::Reset))
    })
}

fn with_file_defaults(cli: clap::Command, file: &FileValues) -> clap::Command {
    cli.mut_subcommand(SERVE, |mut serve| {
        for (id, values) in &file.values {
            // clap keeps defaults as `&'static str` (without its `string` feature): a few
            // short strings, once per process.
            let values: Vec<&'static str> = values
                .iter()
                .map(|v| &*Box::leak(v.clone().into_boxed_str()))
                .collect();
            serve = serve.mut_arg(id.as_str(), |arg| arg.default_values(values));
        }
        serve
    })
}

/// Checks clap's `requires` rules on the explicit equivalent of the parsed values: each value
/// that came from a flag, a `TSO_*` variable or the file, passed as a flag.
fn check_requirements(serve: &ArgMatches, file: &FileValues) -> anyhow::Result<()> {
    let mut argv = vec![OsString::from("tso"), OsString::from(SERVE)];
    for arg in serve_command().get_arguments() {
        let id = arg.get_id().as_str();
        let (Some(long), Some(source)) = (arg.get_long(), serve.value_source(id)) else {
            continue;
        };
        let explicit = match source {
            ValueSource::CommandLine | ValueSource::EnvVariable => true,
            ValueSource::DefaultValue => file.has(id),
            _ => false,
        };
        if !explicit {
            continue;
        }
        if Kind::of(arg) == Kind::Bool {
            if serve.get_flag(id) {
                argv.push(format!("--{long}").into());
            }
            continue;
        }
        for value in serve.get_raw(id).into_iter().flatten() {
            let mut flag = OsString::from(format!("--{long}="));
            flag.push(value);
            argv.push(flag);
        }
    }
    Cli::command()
        .try_get_matches_from(argv)
        .map(drop)
        .map_err(|err| {
            anyhow!(
                "the keys of {} (counted as flags), TSO_* variables and flags: {}",
                file.path.display(),
                clap_message(&err)
            )
        })
}

/// The effective configuration as a file `--config` accepts: every key, unset ones commented
/// out.
fn render(serve: &ArgMatches, file: Option<&FileValues>) -> String {
    let mut out = String::from(
        "# The effective configuration of `tso serve` (built-in defaults, then the --config file,\n\
         # TSO_* variables and flags). `tso serve --config FILE` reads it back.\n",
    );
    if let Some(file) = file {
        out.push_str(&format!("# --config {}\n", file.path.display()));
    }
    for key in keys() {
        let raw: Vec<String> = serve
            .get_raw(&key.id)
            .into_iter()
            .flatten()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let value = match key.kind {
            Kind::Bool => Some(toml::Value::Boolean(serve.get_flag(&key.id))),
            Kind::List if !raw.is_empty() => Some(toml::Value::Array(
                raw.into_iter().map(toml::Value::String).collect(),
            )),
            Kind::Integer => raw.first().map(|v| match v.parse::<i64>() {
                Ok(i) => toml::Value::Integer(i),
                Err(_) => toml::Value::String(v.clone()),
            }),
            Kind::Text => raw.first().cloned().map(toml::Value::String),
            Kind::List => None,
        };
        match value {
            Some(value) => out.push_str(&format!("{} = {value}\n", key.name)),
            None => out.push_str(&format!("# {} =\n", key.name)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("tso")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("data-dir", "data-dir"), 0);
        assert_eq!(edit_distance("data_dir", "data-dir"), 1);
        assert_eq!(edit_distance("listn", "listen"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("flaw", "lawn"), 2);
        assert_eq!(edit_distance("thraeds", "threads"), 2);
    }

    #[test]
    fn nearest_key_suggests_typos_only() {
        let keys = keys();
        assert_eq!(nearest_key("data_dir", &keys), Some("data-dir"));
        assert_eq!(nearest_key("DATA-DIR", &keys), Some("data-dir"));
        assert_eq!(nearest_key("listn", &keys), Some("listen"));
        assert_eq!(nearest_key("client-addr", &keys), Some("listen"));
        assert_eq!(nearest_key("etcd-endpoint", &keys), Some("etcd-endpoints"));
        assert_eq!(nearest_key("unsafe-seq-forget", &keys), None);
        assert_eq!(nearest_key("zzz", &keys), None);
    }

    #[test]
    fn keys_map_public_flags_only() {
        let keys = keys();
        let kind = |name: &str| keys.iter().find(|key| key.name == name).map(|key| key.kind);
        assert_eq!(kind("data-dir"), Some(Kind::Text));
        assert_eq!(kind("window-ahead"), Some(Kind::Text));
        assert_eq!(kind("backend"), Some(Kind::Text));
        assert_eq!(kind("etcd-endpoints"), Some(Kind::List));
        assert_eq!(kind("members"), Some(Kind::List));
        assert_eq!(kind("threads"), Some(Kind::Integer));
        assert_eq!(kind("node-id"), Some(Kind::Integer));
        assert_eq!(kind("seq-keys-max"), Some(Kind::Integer));
        assert_eq!(kind("join"), Some(Kind::Bool));
        assert_eq!(kind("insecure"), Some(Kind::Bool));
        assert_eq!(kind("tls-cert"), Some(Kind::Text));
        for absent in [
            "help",
            "config",
            "print-config",
            "no-handoff",
            "client-addr",
        ] {
            assert_eq!(kind(absent), None, "{absent}");
        }
        assert!(keys.iter().all(|key| !key.name.starts_with("unsafe")));
        let serve = serve_command();
        for key in &keys {
            assert_eq!(key.id.replace('_', "-"), key.name);
            let arg = serve
                .get_arguments()
                .find(|a| a.get_id() == key.id.as_str());
            assert!(!arg.unwrap().is_hide_set());
        }
    }

    #[test]
    fn example_config_has_every_key_once() {
        let example = include_str!("../../../examples/tso.toml");
        for key in keys() {
            let set = format!("{} = ", key.name);
            let commented = format!("# {} = ", key.name);
            let lines = example
                .lines()
                .filter(|line| line.starts_with(&set) || line.starts_with(&commented))
                .count();
            assert_eq!(
                lines, 1,
                "examples/tso.toml sets `{}` {lines} times",
                key.name
            );
        }
        let serve = serve_command();
        FileValues::parse(Path::new("examples/tso.toml"), example, &serve).unwrap();
    }

    #[test]
    fn file_values_become_defaults_under_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tso.toml");
        std::fs::write(
            &path,
            "data-dir = \"/srv/tso\"\nwindow-ahead = \"5s\"\njoin = true\n\
             members = [\"1=a:1/2\", \"2=b:1/2\"]\nseq-keys-max = 7\n",
        )
        .unwrap();
        let config = path.to_str().unwrap();
        let parsed =
            parse_from(argv(&["serve", "--config", config, "--window-ahead", "9s"])).unwrap();
        let crate::cli::Command::Serve(args) = parsed.cli.command else {
            panic!("not serve");
        };
        assert_eq!(args.data_dir, PathBuf::from("/srv/tso"));
        assert_eq!(args.window_ahead, std::time::Duration::from_secs(9));
        assert!(args.cluster.join);
        assert_eq!(args.cluster.members, ["1=a:1/2", "2=b:1/2"]);
        assert_eq!(args.seq_keys_max, 7);
        assert!(parsed.print_config.is_none());
    }

    #[test]
    fn config_file_errors_name_key_and_file() {
        let serve = serve_command();
        let path = Path::new("/etc/tso.toml");
        let err = |text: &str| {
            FileValues::parse(path, text, &serve)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("data_dir = \"x\""),
            "unknown key `data_dir` in /etc/tso.toml; did you mean `data-dir`?"
        );
        assert_eq!(
            err("unsafe-seq-forget = true"),
            "unknown key `unsafe-seq-forget` in /etc/tso.toml"
        );
        assert_eq!(
            err("threads = \"4\""),
            "key `threads` in /etc/tso.toml must be an integer, not a string"
        );
        assert_eq!(
            err("members = \"1=a:1/2\""),
            "key `members` in /etc/tso.toml must be an array of strings, not a string"
        );
        assert_eq!(
            err("etcd-endpoints = [\"http://a:2379\", 2379]"),
            "key `etcd-endpoints` in /etc/tso.toml must be an array of strings, not an array \
             holding an integer"
        );
        assert_eq!(
            err("[tls]\ncert = \"x\""),
            "unknown key `tls` in /etc/tso.toml (the file has no tables: one top-level key per flag)"
        );
        let message = err("threads = 0");
        assert!(
            message.starts_with("bad value for key `threads` in /etc/tso.toml: invalid value '0'"),
            "{message}"
        );
        let message = err("listen = 1\n[x");
        assert!(message.contains("line 2"), "{message}");
    }
}
