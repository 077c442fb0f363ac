//! TLS for the server's ports: the client port (server identity, optionally client
//! certificates required from a CA) and the raft peer port (mutual TLS both ways, one CA).
//!
//! The material arrives checked ([`TlsIdentity`], [`CaCertificates`]); this module only turns
//! it into tonic's configurations, so that every port builds its TLS the same way.

use std::time::Duration;

use tonic::transport::{ClientTlsConfig, ServerTlsConfig};
pub use tso_proto::tls::{CaCertificates, PemError, TlsIdentity, install_crypto_provider};

/// How long a TLS handshake may take before the connection is dropped. A handshake is two
/// round trips and a signature (well under 10 ms on a LAN); 10 s bounds how long a client
/// that connects and sends nothing holds a socket and a task.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS of a server port: it presents `identity`; with `client_ca`, every client must
/// present a certificate signed by it (mutual TLS), and one without is refused in the
/// handshake.
pub fn server_tls_config(
    identity: &TlsIdentity,
    client_ca: Option<&CaCertificates>,
) -> ServerTlsConfig {
    install_crypto_provider();
    let config = ServerTlsConfig::new()
        .identity(identity.to_tonic())
        .timeout(HANDSHAKE_TIMEOUT);
    match client_ca {
        Some(ca) => config.client_ca_root(ca.to_tonic()),
        None => config,
    }
}

/// Mutual TLS between the nodes of a raft cluster: every node presents `identity` (as server
/// and as client) and accepts only peers whose certificate `ca` signed. A node's certificate
/// must name the host of its advertised peer address (a DNS or IP subject alternative name),
/// since peers check it when they dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTls {
    pub ca: CaCertificates,
    pub identity: TlsIdentity,
}

impl PeerTls {
    /// The peer server's side: client certificates required from the cluster's CA.
    pub fn server_config(&self) -> ServerTlsConfig {
        server_tls_config(&self.identity, Some(&self.ca))
    }

    /// The dialing side: trusts only the cluster's CA and presents this node's certificate.
    pub fn client_config(&self) -> ClientTlsConfig {
        install_crypto_provider();
        ClientTlsConfig::new()
            .ca_certificate(self.ca.to_tonic())
            .identity(self.identity.to_tonic())
            .timeout(HANDSHAKE_TIMEOUT)
    }
}
