//! Vigil's TLS set-up: rustls configurations (the ring provider, TLS 1.3 only)
//! from PEM files, for the migration stream (`vigil-migration`) and the host
//! daemon's TCP API and its clients (`vigil-daemon`). Errors name the file at
//! fault and why; callers add the flag that named it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rustls;
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A PEM file that cannot be used: which one, its path and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    /// A certificate chain (the first is the holder's own).
    #[error("{}: {why}", path.display())]
    Cert { path: PathBuf, why: String },
    /// The private key of a certificate.
    #[error("{}: {why}", path.display())]
    Key { path: PathBuf, why: String },
    /// The CA (or self-signed certificate) the peer's certificate must come from.
    #[error("{}: {why}", path.display())]
    Ca { path: PathBuf, why: String },
}

/// The crypto provider every Vigil TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read a PEM certificate from it: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE in it".into());
    }
    Ok(certs)
}

/// A certificate chain and its private key (PKCS#8, PKCS#1 or SEC1).
fn identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PemError> {
    let chain = certificates(cert).map_err(|why| PemError::Cert {
        path: cert.into(),
        why,
    })?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| PemError::Key {
        path: key.into(),
        why: format!("cannot read a PEM private key from it: {e}"),
    })?;
    Ok((chain, private))
}

/// The certificates in the PEM file `ca`, as trust anchors.
fn roots(ca: &Path) -> Result<RootCertStore, PemError> {
    let bad_ca = |why: String| PemError::Ca {
        path: ca.into(),
        why,
    };
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca).map_err(bad_ca)? {
        roots
            .add(cert)
            .map_err(|e| bad_ca(format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// A server presenting `cert` (PEM chain, its own first) with `key`; with
/// `client_ca`, every client must present a certificate that CA issued.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerConfig, PemError> {
    let (chain, private) = identity(cert, key)?;
    let bad_key = |why: String| PemError::Key {
        path: key.into(),
        why,
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| bad_key(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| PemError::Ca {
                        path: ca.into(),
                        why: format!("cannot check client certificates with it: {e}"),
                    })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(chain, private)
        .map_err(|e| bad_key(format!("does not go with {}: {e}", cert.display())))
}

/// A client trusting the certificates in `ca` (a CA, or the server's own
/// self-signed certificate); with `identity` (certificate and key, PEM), it
/// presents that certificate to a server that asks for one.
pub fn client_config(
    ca: &Path,
    identity_files: Option<(&Path, &Path)>,
) -> Result<ClientConfig, PemError> {
    let roots = roots(ca)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| PemError::Ca {
            path: ca.into(),
            why: e.to_string(),
        })?
        .with_root_certificates(roots);
    match identity_files {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let (chain, private) = identity(cert, key)?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|e| PemError::Key {
                    path: key.into(),
                    why: format!("does not go with {}: {e}", cert.display()),
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vigil-tls-pem-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A self-signed certificate for `name` and its key, as PEM files in `dir`.
    fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let made = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn good_files_make_configurations() {
        let dir = scratch("good");
        let (cert, key) = certificate(&dir, "localhost");
        let (client, client_key) = certificate(&dir, "client");
        assert!(server_config(&cert, &key, None).is_ok());
        assert!(server_config(&cert, &key, Some(&client)).is_ok());
        assert!(client_config(&cert, None).is_ok());
        assert!(client_config(&cert, Some((&client, &client_key))).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn bad_files_say_which_and_why() {
        let dir = scratch("bad");
        let (cert, key) = certificate(&dir, "localhost");
        let (_, other_key) = certificate(&dir, "other");
        let missing = dir.join("missing.pem");
        let e = server_config(&missing, &key, None).unwrap_err();
        assert!(matches!(e, PemError::Cert { .. }), "{e}");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        // A key is no certificate, and a certificate no key.
        let e = server_config(&key, &key, None).unwrap_err();
        assert!(
            matches!(e, PemError::Cert { .. }) && e.to_string().contains("no CERTIFICATE"),
            "{e}"
        );
        let e = server_config(&cert, &cert, None).unwrap_err();
        assert!(
            matches!(e, PemError::Key { .. }) && e.to_string().contains("localhost.pem"),
            "{e}"
        );
        let e = server_config(&cert, &other_key, None).unwrap_err();
        assert!(e.to_string().contains("does not go with"), "{e}");
        let e = server_config(&cert, &key, Some(&key)).unwrap_err();
        assert!(
            matches!(e, PemError::Ca { .. }) && e.to_string().contains("localhost.key"),
            "{e}"
        );
        let e = client_config(&key, None).unwrap_err();
        assert!(matches!(e, PemError::Ca { .. }), "{e}");
        let e = client_config(&cert, Some((&cert, &other_key))).unwrap_err();
        assert!(
            matches!(e, PemError::Key { .. }) && e.to_string().contains("does not go with"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
