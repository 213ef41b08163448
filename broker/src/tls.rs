//! TLS listeners: the rustls server configuration of a `[[listener]]`
//! with `protocol = "tls"` (the `ring` provider, as the bridge's client),
//! built at start from its PEM files, each problem named by its key: an
//! unreadable file, a key that does not fit the certificate, or a
//! certificate that has expired or is not valid yet.

use std::path::Path;
use std::sync::Arc;

use ferrymq_config::{IdentityFrom, ListenerTls, MinTls};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// A problem with a TLS listener's files: the TOML key and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {why}")]
pub struct TlsError {
    /// `listener[i].cert` and the like.
    pub key: String,
    /// What is wrong.
    pub why: String,
}

fn certificates(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |why: String| TlsError {
        key: key.to_owned(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("bad PEM in {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(err(format!(
            "no certificate in {} (expected PEM 'CERTIFICATE' blocks)",
            path.display()
        )));
    }
    Ok(certs)
}

/// Refuses a certificate outside its validity period.
fn check_validity(cert: &CertificateDer<'_>, path: &Path, key: &str) -> Result<(), TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| TlsError {
        key: key.to_owned(),
        why: format!("cannot parse the certificate in {}: {e}", path.display()),
    })?;
    let validity = parsed.validity();
    if !validity.is_valid() {
        return Err(TlsError {
            key: key.to_owned(),
            why: format!(
                "the certificate in {} is valid from {} to {}, not now",
                path.display(),
                validity.not_before,
                validity.not_after
            ),
        });
    }
    Ok(())
}

/// The server configuration of listener `index`.
pub fn server_config(index: usize, tls: &ListenerTls) -> Result<Arc<ServerConfig>, TlsError> {
    let key_of = |k: &str| format!("listener[{index}].{k}");
    let certs = certificates(&tls.cert, &key_of("cert"))?;
    if let Some(leaf) = certs.first() {
        check_validity(leaf, &tls.cert, &key_of("cert"))?;
    }
    let private_key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| TlsError {
        key: key_of("key"),
        why: format!("cannot read a private key from {}: {e}", tls.key.display()),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_tls {
        MinTls::V1_3 => &[&rustls::version::TLS13],
        MinTls::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError {
            key: key_of("min_tls"),
            why: e.to_string(),
        })?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, &key_of("client_ca"))? {
                roots.add(cert).map_err(|e| TlsError {
                    key: key_of("client_ca"),
                    why: format!("bad CA certificate in {}: {e}", ca.display()),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if tls.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier.build().map_err(|e| TlsError {
                key: key_of("client_ca"),
                why: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(certs, private_key)
        .map_err(|e| TlsError {
            key: key_of("key"),
            why: format!("does not fit the certificate: {e}"),
        })?;
    Ok(Arc::new(config))
}

/// The identity of a client certificate, if it has the name `from` asks
/// for: its common name, or its first subject alternative name that is a
/// DNS name, an email address or a URI.
pub fn identity(cert: &CertificateDer<'_>, from: IdentityFrom) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    match from {
        IdentityFrom::CommonName => parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned),
        IdentityFrom::San => parsed
            .subject_alternative_name()
            .ok()
            .flatten()?
            .value
            .general_names
            .iter()
            .find_map(|name| match name {
                GeneralName::DNSName(n) | GeneralName::RFC822Name(n) | GeneralName::URI(n) => {
                    Some((*n).to_owned())
                }
                _ => None,
            }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    /// A self-signed certificate with common name `cn` and `sans`.
    fn cert(cn: Option<&str>, sans: &[&str]) -> CertificateDer<'static> {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .clone()
    }

    #[test]
    fn the_identity_is_the_common_name_or_the_first_usable_alternative_name() {
        // (common name, alternative names, identity_from, identity)
        type Case<'a> = (
            Option<&'a str>,
            &'a [&'a str],
            IdentityFrom,
            Option<&'a str>,
        );
        let cases: &[Case] = &[
            (
                Some("edge-01"),
                &[],
                IdentityFrom::CommonName,
                Some("edge-01"),
            ),
            (Some("edge-01"), &[], IdentityFrom::San, None),
            (None, &["gw.plant.example"], IdentityFrom::CommonName, None),
            (
                Some("edge-01"),
                &["gw.plant.example", "other.example"],
                IdentityFrom::San,
                Some("gw.plant.example"),
            ),
            // An IP address is not an identity; the DNS name after it is.
            (
                None,
                &["10.0.0.7", "gw.plant.example"],
                IdentityFrom::San,
                Some("gw.plant.example"),
            ),
            (None, &["10.0.0.7"], IdentityFrom::San, None),
        ];
        for (cn, sans, from, expected) in cases {
            assert_eq!(
                identity(&cert(*cn, sans), *from).as_deref(),
                *expected,
                "{cn:?} {sans:?} {from:?}"
            );
        }
    }
}
