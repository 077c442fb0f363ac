//! Consensus backends: implementations of [`crate::consensus::Consensus`].

#[cfg(feature = "raft")]
pub mod raft;
