//! TLS flags: the server's (client port, raft peer port, `--insecure`) and the client
//! commands' (`--tls-ca`, and a client certificate for mutual TLS); loading their files with
//! errors that name the flag and the path; and the rule that a routable listener needs TLS
//! unless `--insecure` says otherwise.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use tso_client::{ClientBuilder, ClientTls};
use tso_server::tls::{CaCertificates, PeerTls, PemError, TlsIdentity, server_tls_config};

/// TLS flags of `tso serve`.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeTlsArgs {
    /// Serve clients over TLS with this certificate (PEM, leaf first, then any intermediates).
    /// It must name the host clients dial (DNS or IP subject alternative name).
    #[arg(long, requires = "tls_key", env = "TSO_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, requires = "tls_cert", env = "TSO_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require every client to present a certificate signed by this CA (PEM): mutual TLS.
    #[arg(long, requires = "tls_cert", env = "TSO_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Mutual TLS between raft peers: this node's certificate (PEM), presented to peers both
    /// when they dial it and when it dials them. It must name the host of this node's
    /// advertised peer address.
    #[arg(long, requires_all = ["peer_tls_key", "peer_tls_ca"], env = "TSO_PEER_TLS_CERT")]
    pub peer_tls_cert: Option<PathBuf>,
    /// The private key of --peer-tls-cert (PEM).
    #[arg(long, requires = "peer_tls_cert", env = "TSO_PEER_TLS_KEY")]
    pub peer_tls_key: Option<PathBuf>,
    /// The CA (PEM) that signed every peer's certificate; peers signed by anyone else are
    /// refused in the handshake, both ways.
    #[arg(long, requires = "peer_tls_cert", env = "TSO_PEER_TLS_CA")]
    pub peer_tls_ca: Option<PathBuf>,
    /// Mutual TLS on the admin port (`--admin-listen`): this node's certificate (PEM). It must
    /// name the host operators dial (and that `tso admin` follows to the leader).
    #[arg(long, requires_all = ["admin_tls_key", "admin_tls_ca"], env = "TSO_ADMIN_TLS_CERT")]
    pub admin_tls_cert: Option<PathBuf>,
    /// The private key of --admin-tls-cert (PEM).
    #[arg(long, requires = "admin_tls_cert", env = "TSO_ADMIN_TLS_KEY")]
    pub admin_tls_key: Option<PathBuf>,
    /// The CA (PEM) that signed the certificates of the operators allowed to change the
    /// membership; `tso admin` presents one with --tls-cert/--tls-key.
    #[arg(long, requires = "admin_tls_cert", env = "TSO_ADMIN_TLS_CA")]
    pub admin_tls_ca: Option<PathBuf>,
    /// Allow a routable (non-loopback) raft peer or admin listener without TLS: its traffic then
    /// crosses the network in plaintext and anyone who reaches the port can talk to the node.
    #[arg(long)]
    pub insecure: bool,
}

impl ServeTlsArgs {
    /// The TLS of the client port (`--tls-*`), `None` without `--tls-cert`.
    pub fn client_port(&self) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let identity = load_identity(("--tls-cert", cert), ("--tls-key", key))?;
        let client_ca = self
            .tls_client_ca
            .as_deref()
            .map(|path| load_ca("--tls-client-ca", path))
            .transpose()?;
        Ok(Some(server_tls_config(&identity, client_ca.as_ref())))
    }

    /// Mutual TLS between peers (`--peer-tls-*`), `None` without `--peer-tls-cert`.
    pub fn peer(&self) -> anyhow::Result<Option<PeerTls>> {
        let (Some(cert), Some(key), Some(ca)) =
            (&self.peer_tls_cert, &self.peer_tls_key, &self.peer_tls_ca)
        else {
            return Ok(None);
        };
        let identity = load_identity(("--peer-tls-cert", cert), ("--peer-tls-key", key))?;
        let ca = load_ca("--peer-tls-ca", ca)?;
        Ok(Some(PeerTls { ca, identity }))
    }

    /// Mutual TLS on the admin port (`--admin-tls-*`), `None` without `--admin-tls-cert`.
    pub fn admin_port(&self) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
        let (Some(cert), Some(key), Some(ca)) = (
            &self.admin_tls_cert,
            &self.admin_tls_key,
            &self.admin_tls_ca,
        ) else {
            return Ok(None);
        };
        let identity = load_identity(("--admin-tls-cert", cert), ("--admin-tls-key", key))?;
        let ca = load_ca("--admin-tls-ca", ca)?;
        Ok(Some(server_tls_config(&identity, Some(&ca))))
    }

    /// True if any peer TLS flag is given.
    pub fn has_peer_flags(&self) -> bool {
        self.peer_tls_cert.is_some() || self.peer_tls_key.is_some() || self.peer_tls_ca.is_some()
    }

    /// True if any admin TLS flag is given.
    pub fn has_admin_flags(&self) -> bool {
        self.admin_tls_cert.is_some() || self.admin_tls_key.is_some() || self.admin_tls_ca.is_some()
    }
}

/// TLS flags of the client commands.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientTlsArgs {
    /// Connect over TLS, trusting servers whose certificate this CA (PEM) signed; no system
    /// roots are used. Scheme-less endpoints then mean `https://`.
    #[arg(long, env = "TSO_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) for servers that require one (mutual TLS); needs --tls-key
    /// and --tls-ca.
    #[arg(long = "tls-cert", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long = "tls-key", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The client TLS of the flags, `None` without `--tls-ca`.
    pub fn load(&self) -> anyhow::Result<Option<ClientTls>> {
        let Some(ca) = &self.tls_ca else {
            return Ok(None);
        };
        let mut tls = ClientTls::new(load_ca("--tls-ca", ca)?);
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            tls = tls.identity(load_identity(("--tls-cert", cert), ("--tls-key", key))?);
        }
        Ok(Some(tls))
    }

    /// A client builder with the flags' TLS set, if any.
    pub fn client_builder(&self) -> anyhow::Result<ClientBuilder> {
        let builder = tso_client::Client::builder();
        Ok(match self.load()? {
            Some(tls) => builder.tls(tls),
            None => builder,
        })
    }
}

/// What a client command says when no server answered: a TLS cause when the error shows one
/// (rustls's reasons are terse, and a refused client certificate only shows as a closed
/// connection under TLS 1.3), else the usual question.
pub fn unreachable_hint(tls: &ClientTlsArgs, error: &tso_client::Error) -> &'static str {
    let text = error.to_string();
    let tls_on = tls.tls_ca.is_some();
    if text.contains("invalid peer certificate") {
        "TLS: the server's certificate was refused: it must be signed by the CA of --tls-ca and \
         name the host dialed (a DNS or IP subject alternative name)"
    } else if tls_on && text.contains("InvalidContentType") {
        "TLS: the server does not speak TLS: drop --tls-ca, or give an http:// endpoint"
    } else if tls_on && closed_after_handshake(&text) {
        if tls.tls_cert.is_some() {
            "TLS: the server closed the connection after the handshake: it refused this client's \
             certificate (it must be signed by the server's --tls-client-ca)"
        } else {
            "TLS: the server closed the connection after the handshake: if it requires client \
             certificates (--tls-client-ca), give --tls-cert and --tls-key"
        }
    } else if tls_on {
        "is a server running there? (start one with `tso serve`)"
    } else {
        // A plaintext client to a TLS port fails in several ways (a frame size error, a broken
        // pipe, a reset), none of which says TLS.
        "is a server running there? (start one with `tso serve`; a server with TLS needs \
         --tls-ca FILE)"
    }
}

/// A server that refuses a client certificate sends an alert and closes; the client sees the
/// alert, or (when it was writing) a closed stream, a broken pipe or a reset.
fn closed_after_handshake(text: &str) -> bool {
    [
        "fatal alert",
        "connection closed",
        "broken pipe",
        "connection reset",
    ]
    .iter()
    .any(|sign| text.contains(sign))
}

/// Refuses to start a listener on `addr` that other machines can reach (any address but
/// loopback; `0.0.0.0` and `::` count as reachable) without TLS, unless `--insecure` is
/// given. `what` names the listener and its address flag, `tls_flags` the flags that would
/// give it TLS.
pub fn require_tls_or_insecure(
    what: &str,
    addr: SocketAddr,
    tls: bool,
    insecure: bool,
    tls_flags: &str,
) -> anyhow::Result<()> {
    if tls || addr.ip().is_loopback() {
        return Ok(());
    }
    if insecure {
        tracing::warn!(%addr, "INSECURE: the {what} is reachable from the network without TLS");
        return Ok(());
    }
    bail!(
        "the {what} {addr} is reachable from other machines but has no TLS: give it {tls_flags}, \
         listen on a loopback address, or pass --insecure to run it in plaintext on purpose"
    )
}

/// Reads a certificate and its key, each error naming the flag and the file.
pub fn load_identity(cert: (&str, &Path), key: (&str, &Path)) -> anyhow::Result<TlsIdentity> {
    let cert_pem = read(cert.0, cert.1)?;
    let key_pem = read(key.0, key.1)?;
    TlsIdentity::from_pem(cert_pem, key_pem).map_err(|e| match e {
        PemError::Certificate(_) => anyhow::anyhow!("{} {}: {e}", cert.0, cert.1.display()),
        PemError::Key(_) => anyhow::anyhow!("{} {}: {e}", key.0, key.1.display()),
        PemError::Mismatch => anyhow::anyhow!(
            "{} {}: the private key does not belong to the certificate in {} {}; give the key \
             that was made with that certificate",
            key.0,
            key.1.display(),
            cert.0,
            cert.1.display()
        ),
    })
}

/// Reads CA certificates, an error naming the flag and the file.
pub fn load_ca(flag: &str, path: &Path) -> anyhow::Result<CaCertificates> {
    CaCertificates::from_pem(read(flag, path)?)
        .with_context(|| format!("{flag} {}", path.display()))
}

fn read(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag} {}: cannot read the file", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_routable_listener_without_tls_needs_insecure() {
        let check = |addr: &str, tls, insecure| {
            require_tls_or_insecure("listener", addr.parse().unwrap(), tls, insecure, "TLS")
        };
        assert!(check("127.0.0.1:1", false, false).is_ok());
        assert!(check("[::1]:1", false, false).is_ok());
        assert!(check("0.0.0.0:1", true, false).is_ok());
        assert!(check("0.0.0.0:1", false, true).is_ok());
        for routable in ["0.0.0.0:1", "[::]:1", "10.1.2.3:1"] {
            let err = check(routable, false, false).unwrap_err().to_string();
            assert!(
                err.contains("--insecure") && err.contains(routable),
                "{err}"
            );
        }
    }

    #[test]
    fn tls_failures_get_a_tls_hint() {
        let unavailable = |last: &str| tso_client::Error::Unavailable {
            attempts: 8,
            last: last.into(),
        };
        let plain = ClientTlsArgs::default();
        let with_ca = ClientTlsArgs {
            tls_ca: Some("ca.pem".into()),
            ..ClientTlsArgs::default()
        };
        let with_cert = ClientTlsArgs {
            tls_cert: Some("c.pem".into()),
            tls_key: Some("c.key".into()),
            ..with_ca.clone()
        };
        let hint = unreachable_hint(
            &with_ca,
            &unavailable("invalid peer certificate: UnknownIssuer"),
        );
        assert!(hint.contains("--tls-ca"), "{hint}");
        for closed in [
            "received fatal alert: CertificateRequired",
            "hyper::Error(Canceled, \"connection closed\")",
            "stream closed because of a broken pipe",
        ] {
            let hint = unreachable_hint(&with_ca, &unavailable(closed));
            assert!(
                hint.contains("give --tls-cert and --tls-key"),
                "{closed}: {hint}"
            );
            let hint = unreachable_hint(&with_cert, &unavailable(closed));
            assert!(
                hint.contains("refused this client's certificate"),
                "{closed}: {hint}"
            );
        }
        let hint = unreachable_hint(&with_ca, &unavailable("tcp connect error: refused"));
        assert!(hint.starts_with("is a server running there?"), "{hint}");
        let hint = unreachable_hint(&plain, &unavailable("broken pipe"));
        assert!(hint.contains("a server with TLS needs --tls-ca"), "{hint}");
    }

    #[test]
    fn unreadable_files_name_the_flag_and_the_path() {
        let missing = Path::new("/nonexistent/ca.pem");
        let err = format!("{:#}", load_ca("--tls-ca", missing).unwrap_err());
        assert!(
            err.contains("--tls-ca /nonexistent/ca.pem: cannot read"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let err = format!("{:#}", load_ca("--peer-tls-ca", &garbage).unwrap_err());
        assert!(
            err.contains("--peer-tls-ca") && err.contains("garbage.pem") && err.contains("PEM"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            load_identity(("--tls-cert", &garbage), ("--tls-key", &garbage)).unwrap_err()
        );
        assert!(err.starts_with("--tls-cert"), "{err}");
    }
}
