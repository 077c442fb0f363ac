//! The lease commands end to end against a scripted server (`common/lease_server.rs`): `tso
//! lease acquire|renew|release` and `tso frontier` print one line per result, refusals are one
//! line and exit 1, bad flags exit 2 before anything is sent.

use crate::common;

use common::lease_server::{FRONTIER_MS, LEASE_BOUND_MS, LeaseServer};
use common::run_tso;

#[test]
fn tso_lease_acquires_renews_and_releases() {
    let _turn = crate::common::topic(module_path!());
    let server = LeaseServer::start(true);
    let endpoint = server.endpoint();
    let b = LEASE_BOUND_MS;
    let acquire = [
        "lease",
        "acquire",
        "--holder",
        "writer-a",
        "--endpoints",
        &endpoint,
    ];
    let (status, out, err) = run_tso(&acquire);
    assert!(status.success(), "{err}");
    assert_eq!(
        out,
        format!("1\tts_upper_bound={b}\texpires_at_ms={b}\tepoch=1\n")
    );
    let (status, out, err) = run_tso(&["lease", "renew", "1", "--endpoints", &endpoint]);
    assert!(status.success(), "{err}");
    assert_eq!(
        out,
        format!("1\tts_upper_bound={b}\texpires_at_ms={b}\tepoch=1\n")
    );
    let (status, out, err) = run_tso(&["lease", "release", "1", "--endpoints", &endpoint]);
    assert!(status.success(), "{err}");
    assert_eq!(out, "1\treleased\n");
}

#[test]
fn tso_lease_refusals_are_one_line_and_exit_1() {
    let _turn = crate::common::topic(module_path!());
    let server = LeaseServer::start(true);
    let endpoint = server.endpoint();
    let (status, out, err) = run_tso(&["lease", "renew", "42", "--endpoints", &endpoint]);
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("tso: error: lease not renewed: refused: lease 42 is unknown"),
        "{err}"
    );
    let short = [
        "lease",
        "acquire",
        "--holder",
        "w",
        "--ttl",
        "1s",
        "--endpoints",
        &endpoint,
    ];
    let (status, _, err) = run_tso(&short);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.starts_with("tso: error: bad request: "), "{err}");
    assert!(err.contains("below the floor"), "{err}");
}

#[test]
fn tso_frontier_asks_past_a_follower_that_answers_zero() {
    let _turn = crate::common::topic(module_path!());
    let follower = LeaseServer::start(false);
    let leader = LeaseServer::start(true);
    let endpoints = format!("{},{}", follower.endpoint(), leader.endpoint());
    let (status, out, err) = run_tso(&["frontier", "--endpoints", &endpoints]);
    assert!(status.success(), "{err}");
    assert_eq!(out, format!("{FRONTIER_MS}\n"));
    let (status, out, err) = run_tso(&["frontier", "-v", "--endpoints", &endpoints]);
    assert!(status.success(), "{err}");
    assert_eq!(out, format!("{FRONTIER_MS}\tepoch=1\n"));
    let alone = follower.endpoint();
    let (status, out, err) = run_tso(&["frontier", "--endpoints", &alone, "--timeout", "300ms"]);
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn bad_lease_flags_exit_2_before_anything_is_sent() {
    let _turn = crate::common::topic(module_path!());
    let too_long = "h".repeat(129);
    for args in [
        vec!["lease", "acquire"],
        vec!["lease", "acquire", "--holder", ""],
        vec!["lease", "acquire", "--holder", &too_long],
        vec!["lease", "acquire", "--holder", "w", "--ttl", "0s"],
        vec!["lease", "acquire", "--holder", "w", "--ttl", "1500us"],
        vec!["lease", "acquire", "--holder", "w", "--holder-epoch", "-1"],
        vec!["lease", "renew"],
        vec!["lease", "renew", "x"],
        vec!["lease", "release", "-3"],
        vec!["lease"],
    ] {
        let mut args = args.clone();
        args.extend(["--endpoints", "127.0.0.1:1"]);
        let (status, _, err) = run_tso(&args);
        assert_eq!(status.code(), Some(2), "{args:?}: {err}");
    }
}
