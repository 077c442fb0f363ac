//! Consensus backends: implementations of [`crate::consensus::Consensus`].

pub mod file;
