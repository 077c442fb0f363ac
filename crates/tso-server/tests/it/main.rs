//! The server library's integration tests, one topic per module: gRPC over loopback against
//! scripted backends, the file backend on real files, raft clusters in one process, piggyback,
//! and the compatibility fixtures (`tests/fixtures`).
//!
//! One binary, so a cold build links it once. Every test first takes its topic's turn
//! (`common::topic`): tests of one module run side by side, tests of two modules never do.

mod common;

#[cfg(feature = "raft")]
mod etcd_conformance;
mod example;
mod fence;
mod file_backend;
mod grpc;
mod leases;
#[cfg(feature = "raft")]
mod piggyback;
mod raft_campaign;
#[cfg(feature = "raft")]
mod raft_cluster;
#[cfg(feature = "raft")]
mod raft_conformance;
mod raft_identity;
mod raft_leader_removal;
#[cfg(feature = "raft")]
mod raft_lease;
mod raft_leases;
mod raft_membership;
mod raft_partition;
mod raft_prevote;
mod raft_sequences;
#[cfg(feature = "raft")]
mod raft_timings;
mod raft_upgrade;
mod robustness;
mod sequences;
mod stream;
