//! The byte stream under an uplink: plain TCP or TLS over TCP (rustls with
//! the `ring` provider), and the TLS client configuration built from PEM
//! files.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{TlsOptions, UplinkError};

/// A connected stream, TLS or not.
#[derive(Debug)]
pub(crate) enum Transport {
    Tcp(TcpStream),
    // Boxed: a TLS stream holds rustls' buffers and state (about 1 KiB).
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What a TLS handshake needs: the client configuration and the name the
/// server's certificate must carry (also sent as SNI when it is a DNS name).
#[derive(Debug, Clone)]
pub(crate) struct TlsSetup {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

fn config_error(what: &str, path: &Path, cause: impl std::fmt::Display) -> UplinkError {
    UplinkError::TlsConfig(format!("{what} {}: {cause}", path.display()))
}

/// Reads the PEM files and builds the rustls configuration: the CA file's
/// certificates are the only trust roots; a client certificate and key
/// make it mutual TLS.
pub(crate) fn setup(tls: &TlsOptions, host: &str) -> Result<TlsSetup, UplinkError> {
    let mut roots = RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(&tls.ca_file)
        .map_err(|e| config_error("cannot read CA file", &tls.ca_file, e))?;
    for ca in cas {
        let ca = ca.map_err(|e| config_error("bad PEM in CA file", &tls.ca_file, e))?;
        roots
            .add(ca)
            .map_err(|e| config_error("bad CA certificate in", &tls.ca_file, e))?;
    }
    if roots.is_empty() {
        return Err(config_error(
            "no certificate in CA file",
            &tls.ca_file,
            "expected PEM 'CERTIFICATE' blocks",
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UplinkError::TlsConfig(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&tls.cert_file, &tls.key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert_file), Some(key_file)) => {
            let certs = CertificateDer::pem_file_iter(cert_file)
                .map_err(|e| config_error("cannot read certificate file", cert_file, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| config_error("bad PEM in certificate file", cert_file, e))?;
            if certs.is_empty() {
                return Err(config_error(
                    "no certificate in",
                    cert_file,
                    "expected PEM 'CERTIFICATE' blocks",
                ));
            }
            let key = PrivateKeyDer::from_pem_file(key_file)
                .map_err(|e| config_error("cannot read private key from", key_file, e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| config_error("client certificate and key of", cert_file, e))?
        }
        _ => {
            return Err(UplinkError::TlsConfig(
                "cert_file and key_file go together: give both or neither".into(),
            ));
        }
    };
    let name = tls.server_name.as_deref().unwrap_or(host).to_owned();
    let server_name = ServerName::try_from(name.clone())
        .map_err(|e| UplinkError::TlsConfig(format!("invalid server name {name:?}: {e}")))?;
    Ok(TlsSetup {
        config: Arc::new(config),
        server_name,
    })
}

/// The rustls error inside an I/O error from a TLS stream, if there is one.
pub(crate) fn tls_cause(error: &io::Error) -> Option<&rustls::Error> {
    error.get_ref()?.downcast_ref::<rustls::Error>()
}
