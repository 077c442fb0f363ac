//! Consensus backends: implementations of [`crate::consensus::Consensus`].

pub mod file;
#[cfg(feature = "raft")]
pub mod raft;
