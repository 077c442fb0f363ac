//! The `tso` binary's integration tests, one topic per module: real `tso serve` processes
//! (single node and raft clusters), `tso check` and `tso bench` runs, TLS, probes, shutdown.
//!
//! One binary, so a cold build links it once. Every test first takes its topic's turn
//! (`common::topic`): tests of one module run side by side, tests of two modules never do.

mod common;

mod bench;
mod check;
mod check_disk;
mod check_etcd;
mod check_handoff;
mod check_lease;
mod check_member;
mod check_raise;
mod check_restore;
mod check_seq;
mod check_wipe;
mod config;
mod deploy;
mod etcd;
mod handoff_statuses;
mod lease;
mod lease_crash;
mod membership;
mod observability;
mod parse;
mod probes;
mod process;
mod raft_handoff;
mod raft_process;
mod recover;
mod reflection;
mod seq;
mod seq_crash;
mod shutdown;
mod status;
mod tls;
