//! `tso parse` as a user runs it: no server, timestamps from arguments and from stdin, `--at`,
//! and clear errors.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::common;

use common::run_tso;

#[test]
fn timestamps_are_decoded_from_arguments_and_stdin() {
    let _turn = crate::common::topic(module_path!());
    let (status, out, err) = run_tso(&["parse", "--at", "2026-12-01T00:00:00Z"]);
    assert!(status.success(), "{err}");
    let smallest: u64 = out.trim().parse().unwrap();
    assert_eq!(smallest, 1_796_083_200_000 << 18);
    let next = (smallest + 5).to_string();
    let (status, out, err) = run_tso(&["parse", &smallest.to_string(), &next]);
    assert!(status.success(), "{err}");
    assert_eq!(
        out,
        format!(
            "{smallest}  physical_ms=1796083200000 (2026-12-01T00:00:00.000Z)  logical=0\n\
             {next}  physical_ms=1796083200000 (2026-12-01T00:00:00.000Z)  logical=5\n"
        )
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_tso"))
        .args(["parse", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    write!(child.stdin.take().unwrap(), "{smallest}\n  {next} \n").unwrap();
    let piped = child.wait_with_output().unwrap();
    assert!(piped.status.success());
    assert_eq!(String::from_utf8(piped.stdout).unwrap(), out);
}

#[test]
fn bad_input_is_a_clear_error() {
    let _turn = crate::common::topic(module_path!());
    for (args, expected) in [
        (&["parse", "12x"][..], "is not a timestamp"),
        (
            &["parse", "--at", "yesterday"][..],
            "is not an RFC 3339 time",
        ),
        (
            &["parse", "--at", "1960-01-01T00:00:00Z"][..],
            "out of range",
        ),
        (&["parse"][..], "give one or more timestamps"),
        (
            &["parse", "1", "--at", "2026-12-01T00:00:00Z"][..],
            "not both",
        ),
    ] {
        let (status, _, err) = run_tso(args);
        assert_eq!(status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}
