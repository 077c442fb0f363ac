//! The client library's integration tests, one topic per module: a small loopback server that
//! misbehaves on demand, and real tso servers (`common::real`).
//!
//! One binary, so a cold build links it once. Every test first takes its topic's turn
//! (`common::topic`): tests of one module run side by side, tests of two modules never do.

mod common;

mod lease;
mod loopback;
mod real_lease;
mod real_seq;
mod real_server;
mod seq;
mod stream;
