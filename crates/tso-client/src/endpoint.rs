//! Endpoint addresses and leader hints.
//!
//! Every address the client dials is a [`Target`]: `scheme://host:port` with nothing after the
//! port. Configured endpoints and hints go through the same checks. Invariant: a hint never
//! takes the client from `https` to plaintext `http`; a scheme-less hint (what servers send)
//! takes the scheme of the server that sent it.

use std::fmt;
use std::sync::Arc;

use prost::Message;
use tonic::transport::Uri;
use tso_core::Epoch;
use tso_proto::v1::LeaderHint;

/// The transport of a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A normalized `scheme://host:port` address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Target {
    uri: Arc<str>,
    scheme: Scheme,
}

impl Target {
    pub(crate) fn uri(&self) -> &str {
        &self.uri
    }

    pub(crate) fn scheme(&self) -> Scheme {
        self.scheme
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// Parses `host:port`, `http://host:port` or `https://host:port`; a missing scheme becomes
/// `default_scheme`. Anything after the port (path, query) is refused.
pub(crate) fn parse_address(raw: &str, default_scheme: Scheme) -> Result<Target, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Err("the address is empty".into());
    }
    let (scheme, rest) = if let Some(rest) = raw.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else if let Some(rest) = raw.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else if raw.contains("://") {
        return Err("the scheme must be http or https".into());
    } else {
        (default_scheme, raw)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let uri: Uri = format!("{}://{rest}", scheme.as_str())
        .parse()
        .map_err(|e| format!("not a host:port address: {e}"))?;
    let authority = uri.authority().ok_or("the address has no host")?;
    if authority.port_u16().is_none() {
        return Err("the address has no port".into());
    }
    if authority.as_str().contains('@') || uri.path() != "/" || uri.query().is_some() {
        return Err("the address must be host:port with nothing else".into());
    }
    Ok(Target {
        uri: format!("{}://{}", scheme.as_str(), authority).into(),
        scheme,
    })
}

/// What a "not leader" reply says about the leader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Hint {
    /// No leader is known (election in progress, fencing), or the hint is unusable but
    /// harmless (a plaintext hint under TLS).
    None,
    /// The leader's address, and its epoch when the server knows it.
    Leader {
        target: Target,
        epoch: Option<Epoch>,
    },
}

/// Decodes the binary `LeaderHint` trailer sent by `from`. `None` bytes (no trailer) and an
/// absent or empty endpoint mean "no leader known". A scheme-less endpoint takes `from`'s scheme.
pub(crate) fn decode_hint(bytes: Option<&[u8]>, from: &Target) -> Result<Hint, String> {
    let Some(bytes) = bytes else {
        return Ok(Hint::None);
    };
    let hint = LeaderHint::decode(bytes).map_err(|e| format!("not a LeaderHint: {e}"))?;
    let epoch = hint.leader_epoch.map(|e| Epoch::from_parts(e.hi, e.lo));
    let endpoint = match hint.leader_endpoint.as_deref().map(str::trim) {
        None | Some("") => return Ok(Hint::None),
        Some(endpoint) => endpoint,
    };
    let target = parse_address(endpoint, from.scheme())
        .map_err(|e| format!("leader endpoint {endpoint:?}: {e}"))?;
    if from.scheme() == Scheme::Https && target.scheme() == Scheme::Http {
        tracing::warn!(%from, hint = %target, "ignoring a plaintext leader hint received over TLS");
        return Ok(Hint::None);
    }
    Ok(Hint::Leader { target, epoch })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tso_proto::v1::EpochWire;

    fn http(raw: &str) -> Target {
        parse_address(raw, Scheme::Http).unwrap()
    }

    fn encode(endpoint: Option<&str>, epoch: Option<u64>) -> Vec<u8> {
        LeaderHint {
            leader_endpoint: endpoint.map(String::from),
            leader_epoch: epoch.map(|lo| EpochWire { hi: 0, lo }),
        }
        .encode_to_vec()
    }

    #[test]
    fn addresses_are_normalized() {
        assert_eq!(http("127.0.0.1:50551").uri(), "http://127.0.0.1:50551");
        assert_eq!(http("http://h:1/").uri(), "http://h:1");
        assert_eq!(http("[::1]:7").uri(), "http://[::1]:7");
        let tls = parse_address("h:443", Scheme::Https).unwrap();
        assert_eq!((tls.uri(), tls.scheme()), ("https://h:443", Scheme::Https));
        for bad in [
            "",
            "h",
            "h:x",
            "ftp://h:1",
            "h:1/path",
            "u@h:1",
            "h:1?q",
            "::garbage::",
        ] {
            assert!(
                parse_address(bad, Scheme::Http).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn a_scheme_less_hint_takes_the_scheme_in_use() {
        let from = parse_address("https://a:1", Scheme::Http).unwrap();
        let hint = decode_hint(Some(&encode(Some("b:2"), Some(4))), &from).unwrap();
        let Hint::Leader { target, epoch } = hint else {
            panic!("no leader in {hint:?}")
        };
        assert_eq!(target.uri(), "https://b:2");
        assert_eq!(epoch, Some(Epoch::new(4)));
    }

    #[test]
    fn a_plaintext_hint_is_never_followed_under_tls() {
        let from = parse_address("https://a:1", Scheme::Http).unwrap();
        let bytes = encode(Some("http://b:2"), None);
        assert_eq!(decode_hint(Some(&bytes), &from), Ok(Hint::None));
        let plain = http("a:1");
        assert!(matches!(
            decode_hint(Some(&bytes), &plain),
            Ok(Hint::Leader { .. })
        ));
    }

    #[test]
    fn absent_hints_mean_no_leader_and_garbage_is_an_error() {
        let from = http("a:1");
        assert_eq!(decode_hint(None, &from), Ok(Hint::None));
        assert_eq!(
            decode_hint(Some(&encode(None, None)), &from),
            Ok(Hint::None)
        );
        assert_eq!(
            decode_hint(Some(&encode(Some(""), None)), &from),
            Ok(Hint::None)
        );
        assert!(decode_hint(Some(&[0x0a, 0x05, b'a']), &from).is_err());
        assert!(decode_hint(Some(&encode(Some("no port"), None)), &from).is_err());
    }
}
