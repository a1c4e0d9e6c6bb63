//! Certificates of a TLS listener: loading and checking cert/key pairs, the names each one
//! serves, and the SNI resolver the handshake asks.
//!
//! Everything here runs when a config is compiled. The resolver a handshake calls does one or
//! two hash lookups and never touches a file; a reload builds a new resolver and the snapshot
//! swap puts it in force for new connections only.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::UnknownSni;

/// One loaded certificate: the chain and key rustls serves, and what operators see of it.
#[derive(Debug, Clone)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// DNS names from the leaf (lowercase; wildcards keep their `*.`).
    pub names: Vec<String>,
    /// The leaf's notAfter, seconds since the Unix epoch.
    pub not_after: i64,
    pub cert_path: String,
}

/// Reads a PEM chain and its key, checks that they belong together, and reads the names the
/// leaf serves. The error says which file and why, never any key material.
pub fn load(
    cert_path: &str,
    key_path: &str,
    ocsp_path: Option<&str>,
    provider: &CryptoProvider,
) -> Result<LoadedCert, String> {
    let chain = read_chain(cert_path)?;
    let key = read_key(key_path)?;
    let (names, not_after) = leaf_facts(cert_path, &chain[0])?;
    let mut certified = certified(chain, key, cert_path, key_path, provider)?;
    if let Some(ocsp) = ocsp_path {
        let der = std::fs::read(ocsp).map_err(|e| format!("cannot read `{ocsp}`: {e}"))?;
        if der.is_empty() {
            return Err(format!("`{ocsp}` is empty; expected a DER OCSP response"));
        }
        certified.ocsp = Some(der);
    }
    Ok(LoadedCert {
        key: Arc::new(certified),
        names,
        not_after,
        cert_path: cert_path.to_string(),
    })
}

pub(crate) fn read_chain(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read `{path}`: {e}"))?;
    let chain = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{path}`: not a PEM certificate file: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "`{path}`: no `BEGIN CERTIFICATE` block found; expected a PEM certificate chain"
        ));
    }
    Ok(chain)
}

pub(crate) fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read `{path}`: {e}"))?;
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => Err(format!(
            "`{path}`: no private key found; expected a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block"
        )),
        Err(e) => Err(format!("`{path}`: not a PEM key file: {e}")),
    }
}

/// The DNS names (subjectAltName, else the subject CN) and notAfter of a leaf certificate.
fn leaf_facts(path: &str, leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| format!("`{path}`: the first certificate does not parse: {e}"))?;
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        if let Some(cn) = cert.subject().iter_common_name().next() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        return Err(format!(
            "`{path}`: the certificate names no DNS host (no subjectAltName DNS entry or CN)"
        ));
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// Picks the certificate for a handshake by SNI: an exact name first, then a wildcard one
/// label up (`*.example.com` serves `a.example.com`, not `a.b.example.com`, as RFC 6125 says),
/// then the default (or nothing: the handshake fails). Several certificates for one name
/// (RSA and ECDSA) are tried in config order; the first whose key can sign with a scheme the
/// client offers wins.
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Vec<Arc<CertifiedKey>>>,
    /// Keyed by the suffix after `*.`.
    wildcard: HashMap<String, Vec<Arc<CertifiedKey>>>,
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    /// `certs` in config order; `default` indexes it.
    pub fn new(certs: &[LoadedCert], default: usize, unknown: UnknownSni) -> SniResolver {
        let mut exact: HashMap<String, Vec<Arc<CertifiedKey>>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<Arc<CertifiedKey>>> = HashMap::new();
        for c in certs {
            for name in &c.names {
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_string()).or_default(),
                    None => exact.entry(name.clone()).or_default(),
                }
                .push(c.key.clone());
            }
        }
        SniResolver {
            exact,
            wildcard,
            default: match unknown {
                UnknownSni::Default => certs.get(default).map(|c| c.key.clone()),
                UnknownSni::Refuse => None,
            },
        }
    }

    /// The candidates for a server name (already lowercase, as rustls hands it over).
    fn candidates(&self, name: &str) -> Option<&[Arc<CertifiedKey>]> {
        if let Some(c) = self.exact.get(name) {
            return Some(c);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent).map(Vec::as_slice)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let schemes = hello.signature_schemes();
        if let Some(found) = hello.server_name().and_then(|n| self.candidates(n)) {
            return found
                .iter()
                .find(|k| k.key.choose_scheme(schemes).is_some())
                .or(found.first())
                .cloned();
        }
        self.default.clone()
    }
}

/// Reads a client certificate chain and its key (for upstream mTLS), checking they match.
pub fn read_client_pair(
    cert_path: &str,
    key_path: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = read_chain(cert_path)?;
    let key = read_key(key_path)?;
    let provider = rustls::crypto::ring::default_provider();
    certified(
        chain.clone(),
        key.clone_key(),
        cert_path,
        key_path,
        &provider,
    )?;
    Ok((chain, key))
}

/// A chain and key rustls can sign with, or why not (a key of another certificate, say).
fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: &str,
    key_path: &str,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            format!("the key in `{key_path}` does not belong to the certificate in `{cert_path}`")
        }
        e => format!("`{key_path}`: unusable private key: {e}"),
    })
}

/// Reads a PEM bundle of CA certificates into a root store.
pub fn read_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let shown = path.display();
    let chain = read_chain(&path.to_string_lossy())?;
    let mut roots = rustls::RootCertStore::empty();
    for (i, c) in chain.into_iter().enumerate() {
        roots
            .add(c)
            .map_err(|e| format!("`{shown}`: certificate {} is not a usable CA: {e}", i + 1))?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `names` (CN `cn`) written to `dir`; returns (cert, key).
    fn write_cert(dir: &Path, cn: &str, names: &[&str]) -> (String, String) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (dir.join(format!("{cn}.pem")), dir.join(format!("{cn}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    }

    fn provider() -> CryptoProvider {
        rustls::crypto::ring::default_provider()
    }

    #[test]
    fn names_come_from_the_certificate_and_ocsp_is_stapled() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_cert(dir.path(), "site", &["Shop.Example.COM", "*.example.com."]);
        let ocsp = dir.path().join("site.ocsp");
        std::fs::write(&ocsp, b"\x30\x03\x0a\x01\x00").unwrap();
        let loaded = load(&cert, &key, Some(&ocsp.display().to_string()), &provider()).unwrap();
        assert_eq!(loaded.names, ["shop.example.com", "*.example.com"]);
        assert_eq!(
            loaded.key.ocsp.as_deref(),
            Some(&b"\x30\x03\x0a\x01\x00"[..])
        );

        // No subjectAltName: the CN names it.
        let (cert, key) = write_cert(dir.path(), "legacy.example.org", &[]);
        let loaded = load(&cert, &key, None, &provider()).unwrap();
        assert_eq!(loaded.names, ["legacy.example.org"]);
    }

    #[test]
    fn broken_files_say_which_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_cert(dir.path(), "a", &["a.test"]);
        let (_, other_key) = write_cert(dir.path(), "b", &["b.test"]);
        let err = |c: &str, k: &str, o: Option<&str>| load(c, k, o, &provider()).unwrap_err();
        let e = err(&cert, &other_key, None);
        assert!(
            e.contains("does not belong") && e.contains(&other_key),
            "{e}"
        );
        let e = err(&key, &key, None);
        assert!(
            e.contains("no `BEGIN CERTIFICATE`") && e.contains(&key),
            "{e}"
        );
        let e = err(&cert, &cert, None);
        assert!(e.contains("no private key found"), "{e}");
        let missing = dir.path().join("missing.pem").display().to_string();
        let e = err(&missing, &key, None);
        assert!(e.contains("cannot read") && e.contains(&missing), "{e}");
        let empty = dir.path().join("empty.ocsp");
        std::fs::write(&empty, b"").unwrap();
        let e = err(&cert, &key, Some(&empty.display().to_string()));
        assert!(e.contains("is empty"), "{e}");
        // Key material never appears in an error.
        let pem = std::fs::read_to_string(&other_key).unwrap();
        let body = pem.lines().nth(1).unwrap();
        assert!(!err(&cert, &other_key, None).contains(body));
    }

    #[test]
    fn sni_exact_then_one_label_wildcard_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let p = provider();
        let mk = |cn: &str, names: &[&str]| {
            let (c, k) = write_cert(dir.path(), cn, names);
            load(&c, &k, None, &p).unwrap()
        };
        let certs = [
            mk("wild", &["*.example.com"]),
            mk("exact", &["api.example.com"]),
        ];
        let r = SniResolver::new(&certs, 0, UnknownSni::Default);
        let first = |n: &str| r.candidates(n).map(|c| Arc::as_ptr(&c[0]));
        assert_eq!(first("api.example.com"), Some(Arc::as_ptr(&certs[1].key)));
        assert_eq!(first("www.example.com"), Some(Arc::as_ptr(&certs[0].key)));
        assert_eq!(first("a.b.example.com"), None);
        assert_eq!(first("example.com"), None);
        assert!(r.default.is_some());
        let refusing = SniResolver::new(&certs, 0, UnknownSni::Refuse);
        assert!(refusing.default.is_none());
    }
}
