//! Consensus backends: implementations of [`crate::consensus::Consensus`].

pub(crate) mod dir;
pub mod file;
#[cfg(feature = "raft")]
pub mod raft;
