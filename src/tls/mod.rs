//! TLS termination and the per-listener serving policy.
//!
//! Pingora binds every listener as plain TCP; the edge (`edge.rs`) runs the TLS handshake
//! itself with the acceptor of the *current snapshot*. That is what makes certificates,
//! client-certificate CAs, ALPN and versions reload live: a reload compiles new acceptors
//! from the files, the snapshot swap puts them in force for the next handshake, and
//! established connections (WebSocket tunnels included) keep the session they negotiated.
//! A certificate that does not load refuses the whole reload and the old one keeps serving.
//!
//! Never here: per-request work. Handshakes only read the compiled resolver.

pub mod certs;
pub mod replay;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pingora_core::listeners::tls::Acceptor;
use rustls::crypto::CryptoProvider;
use rustls::server::{ServerSessionMemoryCache, StoresServerSessions, WebPkiClientVerifier};
use rustls::ServerConfig;

use crate::config::{self, error, FieldError, TlsVersion};
use certs::{LoadedCert, SniResolver};

/// How one listener serves, in this config generation.
pub struct ListenerPolicy {
    pub name: String,
    pub address: SocketAddr,
    pub tls: Option<TlsTerminator>,
    pub h2c: bool,
    pub redirect_https: Option<HttpsRedirect>,
    /// The `Strict-Transport-Security` value, when set.
    pub hsts: Option<http::HeaderValue>,
}

/// The handshake side of a TLS listener.
pub struct TlsTerminator {
    pub acceptor: Acceptor,
    pub handshake_timeout: Duration,
    /// Client certificates are asked for (`client_auth`).
    pub client_auth: bool,
    pub certificates: Vec<CertStatus>,
}

/// What `/metrics` and the logs say of a served certificate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CertStatus {
    pub listener: String,
    pub file: String,
    pub names: Vec<String>,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
}

/// `listeners[].redirect_https`, compiled.
#[derive(Debug, Clone)]
pub struct HttpsRedirect {
    pub status: u16,
    /// `:8443`, or empty for 443.
    port_suffix: String,
    except: Vec<String>,
}

impl HttpsRedirect {
    /// The redirect target for a request, or None when its path is exempt.
    pub fn location(&self, host: &str, path_and_query: &str) -> Option<String> {
        if self.except.iter().any(|p| path_and_query.starts_with(p)) {
            return None;
        }
        let host = strip_port(host);
        Some(format!(
            "https://{host}{}{path_and_query}",
            self.port_suffix
        ))
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

impl ListenerPolicy {
    /// A listener's policy when the config says nothing about it (plain HTTP/1).
    fn plain(name: &str, address: SocketAddr) -> ListenerPolicy {
        ListenerPolicy {
            name: name.to_string(),
            address,
            tls: None,
            h2c: false,
            redirect_https: None,
            hsts: None,
        }
    }
}

/// The index of the listener a connection arrived on, by the connection's local address:
/// the exact address, else a wildcard address (`0.0.0.0`, `[::]`) with the same port. The
/// address is only asked for when there are several listeners (it may cost a syscall).
pub fn listener_for(
    listeners: &[ListenerPolicy],
    local: impl FnOnce() -> Option<SocketAddr>,
) -> Option<usize> {
    if listeners.len() == 1 {
        return Some(0);
    }
    let local = local()?;
    let wildcard =
        |l: &ListenerPolicy| l.address.port() == local.port() && l.address.ip().is_unspecified();
    listeners
        .iter()
        .position(|l| l.address == local)
        .or_else(|| {
            listeners
                .iter()
                .position(|l| wildcard(l) && l.address.is_ipv4() == local.is_ipv4())
        })
        .or_else(|| listeners.iter().position(wildcard))
}

/// The crypto provider of every TLS config (the one Pingora's rustls backend uses).
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Session resumption state shared by every generation, so a reload does not turn every
/// returning client's resumption into a full handshake.
fn session_cache() -> Arc<dyn StoresServerSessions> {
    static CACHE: OnceLock<Arc<dyn StoresServerSessions>> = OnceLock::new();
    CACHE
        .get_or_init(|| ServerSessionMemoryCache::new(16 * 1024))
        .clone()
}

fn ticketer() -> Option<Arc<dyn rustls::server::ProducesTickets>> {
    static TICKETER: OnceLock<Option<Arc<dyn rustls::server::ProducesTickets>>> = OnceLock::new();
    TICKETER
        .get_or_init(|| rustls::crypto::ring::Ticketer::new().ok())
        .clone()
}

/// Compiles every listener's policy; file problems come back as errors at the field that
/// names the file. Paths are already resolved against the config file's directory.
pub fn compile(listeners: &[config::Listener]) -> (Vec<ListenerPolicy>, Vec<FieldError>) {
    let mut out = Vec::with_capacity(listeners.len());
    let mut errors = Vec::new();
    for (i, l) in listeners.iter().enumerate() {
        let Ok(address) = l.address.parse::<SocketAddr>() else {
            continue; // reported by the config check
        };
        let path = error::index("listeners", i);
        let mut policy = ListenerPolicy::plain(&l.name, address);
        policy.h2c = l.h2c;
        policy.redirect_https = l.redirect_https.as_ref().map(|r| HttpsRedirect {
            status: r.status,
            port_suffix: if r.port == 443 {
                String::new()
            } else {
                format!(":{}", r.port)
            },
            except: r.except.clone(),
        });
        policy.hsts = l.hsts.as_ref().and_then(|h| {
            let mut v = format!("max-age={}", h.max_age.get().as_secs());
            if h.include_subdomains {
                v.push_str("; includeSubDomains");
            }
            if h.preload {
                v.push_str("; preload");
            }
            http::HeaderValue::from_str(&v).ok()
        });
        if let Some(tls) = &l.tls {
            match terminator(&l.name, tls, &path) {
                Ok(t) => policy.tls = Some(t),
                Err(e) => errors.extend(e),
            }
        }
        out.push(policy);
    }
    (out, errors)
}

/// Every file a listener's TLS reads (watched for changes).
pub fn files(listeners: &[config::Listener]) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for tls in listeners.iter().filter_map(|l| l.tls.as_ref()) {
        for c in &tls.certificates {
            out.push(c.cert.clone().into());
            out.push(c.key.clone().into());
            out.extend(c.ocsp.clone().map(Into::into));
        }
        out.extend(tls.client_auth.as_ref().map(|a| a.ca.clone().into()));
    }
    out
}

fn terminator(
    listener: &str,
    tls: &config::ListenerTls,
    path: &str,
) -> Result<TlsTerminator, Vec<FieldError>> {
    let provider = provider();
    let mut errors = Vec::new();
    let mut loaded: Vec<LoadedCert> = Vec::new();
    for (j, c) in tls.certificates.iter().enumerate() {
        match certs::load(&c.cert, &c.key, c.ocsp.as_deref(), &provider) {
            Ok(cert) => loaded.push(cert),
            Err(msg) => errors.push(FieldError::new(
                error::join(path, &format!("tls.certificates[{j}]")),
                msg,
            )),
        }
    }
    let verifier = match &tls.client_auth {
        None => None,
        Some(auth) => match client_verifier(auth, &provider) {
            Ok(v) => Some(v),
            Err(msg) => {
                errors.push(FieldError::new(
                    error::join(path, "tls.client_auth.ca"),
                    msg,
                ));
                None
            }
        },
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let default = tls.certificates.iter().position(|c| c.default).unwrap_or(0);
    let resolver = Arc::new(SniResolver::new(&loaded, default, tls.unknown_sni));
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| vec![FieldError::new(error::join(path, "tls"), e.to_string())])?;
    let mut server = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    }
    .with_cert_resolver(resolver);
    server.alpn_protocols = if tls.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    server.session_storage = session_cache();
    if let Some(t) = ticketer() {
        server.ticketer = t;
    }
    Ok(TlsTerminator {
        acceptor: acceptor(server, tls.client_auth.is_some()),
        handshake_timeout: tls.handshake_timeout.get(),
        client_auth: tls.client_auth.is_some(),
        certificates: loaded
            .into_iter()
            .map(|c| CertStatus {
                listener: listener.to_string(),
                file: c.cert_path,
                names: c.names,
                not_after: c.not_after,
            })
            .collect(),
    })
}

/// The acceptor for a server config. With client authentication it also runs
/// [`ClientCertReader`] after each handshake, so the HTTP layer finds the verified certificate
/// in the connection's TLS digest (HTTP/1 and HTTP/2 alike).
fn acceptor(server: ServerConfig, client_auth: bool) -> Acceptor {
    let server = Arc::new(server);
    if !client_auth {
        return Acceptor::from_server_config(server);
    }
    // Pingora builds an acceptor with callbacks only from its own settings; the config it
    // builds there is replaced by ours (the `acceptor` field is the rustls acceptor itself).
    let mut settings =
        pingora_core::listeners::tls::TlsSettings::with_callbacks(Box::new(ClientCertReader))
            .expect("settings without files cannot fail");
    settings.set_cert_resolver(server.cert_resolver.clone());
    let mut built = settings.build();
    built.acceptor = pingora_rustls::TlsAcceptor::from(server);
    built
}

/// A verified client certificate, as the HTTP layer sees it (from the TLS digest).
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// The subject, RFC 4514 style (`CN=device-1,O=Acme`).
    pub subject: String,
    pub common_name: Option<String>,
    /// SHA-256 of the certificate (DER), lowercase hex.
    pub fingerprint: String,
    /// consumers.yaml lookup keys, made once per connection rather than per request.
    fingerprint_key: String,
    common_name_key: Option<String>,
}

impl ClientCert {
    fn from_der(der: &[u8]) -> Option<ClientCert> {
        use sha2::Digest;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        let fingerprint: String = sha2::Sha256::digest(der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Some(ClientCert {
            subject: cert.subject().to_string(),
            fingerprint_key: format!("sha256:{fingerprint}"),
            common_name_key: common_name.as_deref().map(Self::key_for_common_name),
            common_name,
            fingerprint,
        })
    }

    /// The certificate of a connection, when the client sent one that verified.
    pub fn of(digest: Option<&pingora_core::protocols::tls::SslDigest>) -> Option<&ClientCert> {
        digest?.extension.get::<ClientCert>()
    }

    pub fn fingerprint_key(&self) -> &str {
        &self.fingerprint_key
    }

    pub fn common_name_key(&self) -> Option<&str> {
        self.common_name_key.as_deref()
    }

    /// Lookup keys of consumers.yaml's `client_certs` entries.
    pub fn key_for_common_name(cn: &str) -> String {
        format!("cn:{cn}")
    }

    pub fn key_for_fingerprint(text: &str) -> Option<String> {
        let hex: String = text
            .trim()
            .trim_start_matches("sha256:")
            .chars()
            .filter(|c| *c != ':')
            .collect::<String>()
            .to_ascii_lowercase();
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| format!("sha256:{hex}"))
    }
}

/// Reads the verified client certificate once per connection, right after the handshake.
struct ClientCertReader;

#[async_trait::async_trait]
impl pingora_core::listeners::TlsAccept for ClientCertReader {
    async fn handshake_complete_callback(
        &self,
        tls: &pingora_core::protocols::tls::TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let cert = ClientCert::from_der(tls.peer_certificate_der()?)?;
        Some(Arc::new(cert))
    }
}

fn client_verifier(
    auth: &config::ClientAuth,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let roots = certs::read_roots(Path::new(&auth.ca))?;
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = if auth.required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    builder
        .build()
        .map_err(|e| format!("`{}`: cannot verify clients with it: {e}", auth.ca))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_locations() {
        let r = HttpsRedirect {
            status: 308,
            port_suffix: ":8443".into(),
            except: vec!["/.well-known/acme-challenge/".into()],
        };
        assert_eq!(
            r.location("a.example:8080", "/x?y=1").as_deref(),
            Some("https://a.example:8443/x?y=1")
        );
        assert_eq!(
            r.location("[::1]:80", "/").as_deref(),
            Some("https://[::1]:8443/")
        );
        assert_eq!(
            r.location("a.example", "/.well-known/acme-challenge/t"),
            None
        );
    }

    #[test]
    fn listeners_are_found_by_local_address() {
        let a = ListenerPolicy::plain("web", "0.0.0.0:8080".parse().unwrap());
        let b = ListenerPolicy::plain("tls", "127.0.0.1:8443".parse().unwrap());
        let c = ListenerPolicy::plain("v6", "[::]:8443".parse().unwrap());
        let all = [a, b, c];
        let find = |s: &str| listener_for(&all, || s.parse().ok()).map(|i| all[i].name.as_str());
        assert_eq!(find("127.0.0.1:8080"), Some("web"));
        assert_eq!(find("127.0.0.1:8443"), Some("tls"));
        assert_eq!(find("[::1]:8443"), Some("v6"));
        assert_eq!(find("127.0.0.1:9999"), None);
    }
}
