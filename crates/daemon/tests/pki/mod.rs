//! A throw-away PKI for the TLS tests (rcgen): a CA, a server certificate it
//! issued for 127.0.0.1 and localhost, client certificates it issued, and a
//! second CA whose certificates the first does not vouch for. Shared by
//! `crates/daemon/tests` and `crates/vigil/tests` through `#[path]`.
#![allow(dead_code)] // each test uses a different subset

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Pem {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA that issues certificates into a folder.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: PathBuf,
    /// The CA's certificate, PEM: what a peer trusts.
    pub pem: PathBuf,
}

fn write(dir: &Path, name: &str, cert: &rcgen::Certificate, key: &KeyPair) -> Pem {
    let pem = Pem {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&pem.cert, cert.pem()).expect("write a certificate");
    std::fs::write(&pem.key, key.serialize_pem()).expect("write a key");
    std::fs::set_permissions(&pem.key, std::fs::Permissions::from_mode(0o600))
        .expect("chmod a key");
    pem
}

impl Ca {
    /// A new CA named `name`, its files in `dir`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        std::fs::create_dir_all(dir).expect("PKI folder");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let pem = write(dir, name, &cert, &key).cert;
        Ca {
            cert,
            key,
            dir: dir.to_owned(),
            pem,
        }
    }

    fn issue(&self, name: &str, sans: Vec<String>, purpose: ExtendedKeyUsagePurpose) -> Pem {
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("certificate");
        write(&self.dir, name, &cert, &key)
    }

    /// A server certificate for 127.0.0.1 and localhost.
    pub fn server(&self, name: &str) -> Pem {
        self.issue(
            name,
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate.
    pub fn client(&self, name: &str) -> Pem {
        self.issue(name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }
}
