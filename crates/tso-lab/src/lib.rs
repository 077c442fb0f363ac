#![recursion_limit = "256"]
//! `tso-lab`: the load generator and the Jepsen-style checker behind `tso bench` and
//! `tso check`, as a library. The `tso` binary keeps their flags and hands each run typed
//! options ([`bench::BenchOptions`], [`check::CheckOptions`]) with TLS already loaded; local
//! servers are processes of the `tso` binary the options name, so the lab never links the server.
//!
//! - [`bench`](mod@bench): closed-loop load, latency percentiles, and checks of every reply.
//! - [`check`]: recording clients, a seeded nemesis over a local cluster, and the history
//!   checks.
//! - [`targets`]: connections to the endpoints, following leader hints (both use it).
//! - [`node`]: one local `tso serve` process (both use it).

pub mod bench;
pub mod check;
pub mod node;
pub mod targets;
