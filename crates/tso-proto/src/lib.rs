//! Generated protobuf and gRPC code. `tsoracle.v1` is the public, wire-compatible service;
//! packages under `tso.*` are this project's own extensions.

/// The public `tsoracle.v1` protocol (see `docs/protocol.md`).
pub mod tsoracle {
    pub mod v1 {
        tonic::include_proto!("tsoracle.v1");
    }
}

pub use tsoracle::v1;

/// The subset of etcd's v3 gRPC API (package `etcdserverpb`, numbers of etcd v3.4) that the
/// server's etcd backend speaks: KV, Lease and Maintenance (see `proto/etcd_rpc.proto`). A
/// client only: tso never serves these services.
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

pub mod limits;

/// The encoded `FileDescriptorSet` of the services a client port serves (`tsoracle.v1` and
/// `tso.stream.v1`), for the server's gRPC reflection.
pub const CLIENT_PORT_DESCRIPTORS: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/client_port_descriptors.bin"));
pub mod tls;

/// This project's own packages.
pub mod tso {
    /// Raft messages between the nodes of one cluster (postcard payloads in a protobuf envelope).
    pub mod raft_v1 {
        tonic::include_proto!("tso.raft.v1");
    }

    /// The streaming timestamp RPC, an extension beside `tsoracle.v1` (its replies reuse
    /// `tsoracle.v1` messages, hence the module path that mirrors the package).
    pub mod stream {
        pub mod v1 {
            tonic::include_proto!("tso.stream.v1");
        }
    }

    /// Operator calls on the client port of every backend: status, raising the high-water.
    pub mod ops_v1 {
        tonic::include_proto!("tso.ops.v1");
    }

    /// Run-time membership of a raft cluster (the admin port).
    pub mod admin_v1 {
        tonic::include_proto!("tso.admin.v1");
    }

    /// The own API of the piggyback example's key-value store (not a public protocol).
    pub mod example_kv_v1 {
        tonic::include_proto!("tso.example.kv.v1");
    }
}

/// Metadata key of the leader hint carried in the trailers of a "not leader" status.
pub const LEADER_HINT_KEY: &str = "tsoracle-leader-hint-bin";

/// Metadata key of the leader hint carried in the trailers of a "not leader" answer of the
/// admin service (`tso.admin.v1`).
pub const ADMIN_LEADER_HINT_KEY: &str = "tso-admin-leader-bin";
