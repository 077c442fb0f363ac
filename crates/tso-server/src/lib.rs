//! The tso server: the `tsoracle.v1` gRPC service, the leadership watch and failover fence, the
//! serving state, and the consensus backends behind one narrow seam ([`consensus::Consensus`]).

pub mod backend;
pub mod consensus;
