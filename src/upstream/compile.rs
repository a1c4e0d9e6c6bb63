//! Compiling an `upstreams.<name>` entry: validation with field paths, name resolution, the
//! precomputed peers, and attaching each backend to its long-lived state in the [`Registry`].
//!
//! Runs when a configuration is loaded, never on the request path. Host names are resolved here
//! (blocking, std `ToSocketAddrs`); a backend keeps the first address its name resolves to until
//! the next reload.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::sync::Arc;

use pingora_core::protocols::tls::CaType;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::utils::tls::{parse_x509, CertKey, WrappedX509};

use super::balance::Subset;
use super::health::{HealthSpec, Probe};
use super::key::{fnv1a, HashOn};
use super::passive::PassivePolicy;
use super::registry::Registry;
use super::{BackendEntry, Upstream};
use crate::config::{self, Balance, FieldError};

/// A backend that passed validation, before it is attached to the registry.
struct Parsed<'c> {
    cfg: &'c config::Backend,
    host: &'c str,
    addr: SocketAddr,
}

pub(super) fn compile(
    name: &str,
    cfg: &config::Upstream,
    registry: &Registry,
) -> Result<Upstream, Vec<FieldError>> {
    let base = format!("upstreams.{name}");
    let mut errors = Vec::new();

    let backends = backends(&base, cfg, &mut errors);
    let hash_on = hash_on(&base, cfg, &mut errors);
    let health = cfg
        .health_check
        .as_ref()
        .and_then(|hc| health_check(&format!("{base}.health_check"), hc, &mut errors));
    timeouts(&base, cfg, &mut errors);
    let mut material = TlsMaterial::default();
    if let Some(tls) = &cfg.tls {
        if tls.sni.as_deref().is_some_and(|s| s.trim().is_empty()) {
            errors.push(FieldError::new(
                format!("{base}.tls.sni"),
                "must not be empty (leave it out to use the backend host)",
            ));
        }
        material = tls_material(&base, tls, &mut errors);
    } else if cfg.protocol == config::UpstreamProtocol::Auto {
        errors.push(FieldError::new(
            format!("{base}.protocol"),
            "`auto` picks the version by ALPN, which needs `tls:`; use `h2` for cleartext HTTP/2 (h2c)",
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let backends: Box<[BackendEntry]> = backends
        .into_iter()
        .map(|p| BackendEntry {
            address: p.cfg.address.clone(),
            addr: p.addr,
            weight: p.cfg.weight,
            labels: p.cfg.labels.clone(),
            seed: fnv1a(p.cfg.address.as_bytes()),
            peer: peer(p.addr, p.host, cfg, &material),
            state: registry.state(name, p.addr),
        })
        .collect();

    Ok(Upstream {
        name: name.to_string(),
        backends,
        balance: cfg.balance,
        hash_on,
        subsets: Vec::<Subset>::new(),
        passive: PassivePolicy::new(&cfg.passive),
        health: health.map(Arc::new),
        retries: cfg.retries,
    })
}

fn backends<'c>(
    base: &str,
    cfg: &'c config::Upstream,
    errors: &mut Vec<FieldError>,
) -> Vec<Parsed<'c>> {
    if cfg.backends.is_empty() {
        errors.push(FieldError::new(
            format!("{base}.backends"),
            "at least one backend is required",
        ));
    }
    let mut out = Vec::with_capacity(cfg.backends.len());
    let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
    for (i, b) in cfg.backends.iter().enumerate() {
        let path = format!("{base}.backends[{i}]");
        if b.weight == 0 {
            errors.push(FieldError::new(
                format!("{path}.weight"),
                "must be at least 1",
            ));
        }
        match resolve(&b.address) {
            Ok((host, addr)) => {
                if let Some(first) = seen.get(&addr) {
                    errors.push(FieldError::new(
                        format!("{path}.address"),
                        format!("duplicate backend: backends[{first}] is also {addr}"),
                    ));
                } else {
                    seen.insert(addr, i);
                    out.push(Parsed { cfg: b, host, addr });
                }
            }
            Err(message) => errors.push(FieldError::new(format!("{path}.address"), message)),
        }
    }
    out
}

/// Splits `host:port` (`[v6]:port` for IPv6 literals) and resolves it to its first address.
/// Returns the host part as written (the default SNI) with the address.
pub(super) fn resolve(address: &str) -> Result<(&str, SocketAddr), String> {
    let (host, port) = split_host_port(address)
        .ok_or_else(|| format!("`{address}` is not `host:port` (e.g. `10.0.0.7:8080`)"))?;
    let mut addrs = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host}`: {e}"))?;
    let addr = addrs
        .next()
        .ok_or_else(|| format!("`{host}` resolves to no address"))?;
    Ok((host, addr))
}

fn split_host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => rest.split_once("]:")?,
        None => {
            let (host, port) = s.rsplit_once(':')?;
            if host.contains(':') {
                return None; // an IPv6 literal needs brackets
            }
            (host, port)
        }
    };
    if host.is_empty() || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    (port != 0).then_some((host, port))
}

fn hash_on(base: &str, cfg: &config::Upstream, errors: &mut Vec<FieldError>) -> Option<HashOn> {
    let path = format!("{base}.hash_on");
    match (cfg.balance, &cfg.hash_on) {
        (Balance::Hash, None) => {
            errors.push(FieldError::new(
                path,
                "required with `balance: hash` (`header:NAME`, `cookie:NAME`, `client_ip` or `path`)",
            ));
            None
        }
        (Balance::Hash, Some(s)) => match HashOn::parse(s) {
            Ok(h) => Some(h),
            Err(message) => {
                errors.push(FieldError::new(path, message));
                None
            }
        },
        (_, Some(_)) => {
            errors.push(FieldError::new(
                path,
                "only used with `balance: hash`; remove it or set `balance: hash`",
            ));
            None
        }
        (_, None) => None,
    }
}

fn health_check(
    path: &str,
    hc: &config::HealthCheck,
    errors: &mut Vec<FieldError>,
) -> Option<HealthSpec> {
    let before = errors.len();
    let probe = match (&hc.http, &hc.tcp) {
        (Some(http), None) => Some(http_check(&format!("{path}.http"), http, errors)),
        (None, Some(_)) => Some(Probe::Tcp),
        _ => {
            errors.push(FieldError::new(path, "set exactly one of `http` or `tcp`"));
            None
        }
    };
    for (field, value) in [("healthy", hc.healthy), ("unhealthy", hc.unhealthy)] {
        if value == 0 {
            errors.push(FieldError::new(
                format!("{path}.{field}"),
                "must be at least 1",
            ));
        }
    }
    for (field, value) in [("interval", hc.interval), ("timeout", hc.timeout)] {
        if value.get().is_zero() {
            errors.push(FieldError::new(
                format!("{path}.{field}"),
                "must be greater than 0",
            ));
        }
    }
    let probe = probe?;
    (errors.len() == before).then(|| HealthSpec {
        probe,
        interval: hc.interval.get(),
        timeout: hc.timeout.get(),
        healthy: hc.healthy,
        unhealthy: hc.unhealthy,
    })
}

fn http_check(path: &str, http: &config::HttpCheck, errors: &mut Vec<FieldError>) -> Probe {
    if !http.path.starts_with('/') {
        errors.push(FieldError::new(
            format!("{path}.path"),
            "must start with `/`",
        ));
    } else if http::uri::PathAndQuery::from_str(&http.path).is_err() {
        errors.push(FieldError::new(
            format!("{path}.path"),
            format!("`{}` is not a valid request path", http.path),
        ));
    }
    if let Some(host) = &http.host {
        if host.is_empty() || http::HeaderValue::from_str(host).is_err() {
            errors.push(FieldError::new(
                format!("{path}.host"),
                format!("`{host}` is not a valid Host header value"),
            ));
        }
    }
    for (i, &status) in http.expected_status.iter().enumerate() {
        if !(100..=599).contains(&status) {
            errors.push(FieldError::new(
                format!("{path}.expected_status[{i}]"),
                format!("{status} is not an HTTP status (100–599)"),
            ));
        }
    }
    Probe::Http {
        path: http.path.clone(),
        host: http.host.clone(),
        expected: http.expected_status.clone(),
    }
}

fn timeouts(base: &str, cfg: &config::Upstream, errors: &mut Vec<FieldError>) {
    let t = &cfg.timeouts;
    for (field, value) in [("connect", t.connect), ("read", t.read), ("write", t.write)] {
        if value.get().is_zero() {
            errors.push(FieldError::new(
                format!("{base}.timeouts.{field}"),
                "must be greater than 0",
            ));
        }
    }
}

/// The peer every request to this backend uses. Only address, scheme, SNI and verification
/// enter Pingora's connection-pool key, all of them config-derived, so an unchanged backend
/// keeps its pooled connections across reloads.
/// Concurrent streams tollgate opens on one HTTP/2 upstream connection.
const H2_STREAMS_PER_CONNECTION: usize = 100;

/// Upstream TLS files, read once per upstream and shared by its backends' peers.
#[derive(Default)]
struct TlsMaterial {
    ca: Option<Arc<CaType>>,
    /// Keeps connections verified against another CA bundle out of this one's pool.
    ca_group: u64,
    client: Option<Arc<CertKey>>,
}

fn tls_material(
    base: &str,
    tls: &config::UpstreamTls,
    errors: &mut Vec<FieldError>,
) -> TlsMaterial {
    use crate::tls::certs;
    let mut out = TlsMaterial::default();
    if let Some(ca) = &tls.ca {
        match certs::read_chain(ca) {
            Ok(chain) => {
                out.ca_group = chain.iter().fold(0, |h, c| h ^ fnv1a(c.as_ref()));
                let wrapped: Vec<WrappedX509> = chain
                    .into_iter()
                    .map(|c| WrappedX509::new(c.to_vec(), parse_x509))
                    .collect();
                out.ca = Some(wrapped.into());
            }
            Err(msg) => errors.push(FieldError::new(format!("{base}.tls.ca"), msg)),
        }
    }
    match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => match certs::read_client_pair(cert, key) {
            Ok((chain, key)) => {
                let chain = chain.into_iter().map(|c| c.to_vec()).collect();
                out.client = Some(Arc::new(CertKey::new(chain, key.secret_der().to_vec())));
            }
            Err(msg) => errors.push(FieldError::new(format!("{base}.tls.client_cert"), msg)),
        },
        (None, None) => {}
        (Some(_), None) => errors.push(FieldError::new(
            format!("{base}.tls.client_key"),
            "`client_cert` needs its `client_key`",
        )),
        (None, Some(_)) => errors.push(FieldError::new(
            format!("{base}.tls.client_cert"),
            "`client_key` needs its `client_cert`",
        )),
    }
    out
}

fn peer(
    addr: SocketAddr,
    host: &str,
    cfg: &config::Upstream,
    tls_material: &TlsMaterial,
) -> HttpPeer {
    let sni = match &cfg.tls {
        Some(tls) => tls.sni.clone().unwrap_or_else(|| host.to_string()),
        None => String::new(),
    };
    let mut peer = HttpPeer::new(addr, cfg.tls.is_some(), sni);
    let o = &mut peer.options;
    o.connection_timeout = Some(cfg.timeouts.connect.get());
    o.read_timeout = Some(cfg.timeouts.read.get());
    o.write_timeout = Some(cfg.timeouts.write.get());
    o.idle_timeout = Some(cfg.timeouts.idle.get());
    if let Some(tls) = &cfg.tls {
        // `connect` bounds the whole connection setup, TLS handshake included.
        o.total_connection_timeout = Some(cfg.timeouts.connect.get());
        o.verify_cert = tls.verify;
        o.verify_hostname = tls.verify;
        o.ca = tls_material.ca.clone();
        peer.client_cert_key = tls_material.client.clone();
        peer.group_key = tls_material.ca_group;
    }
    let o = &mut peer.options;
    match cfg.protocol {
        config::UpstreamProtocol::Http1 => {}
        config::UpstreamProtocol::H2 => {
            o.set_http_version(2, 2);
            // gRPC and other h2 clients multiplex: share a connection between streams.
            o.max_h2_streams = H2_STREAMS_PER_CONNECTION;
        }
        config::UpstreamProtocol::Auto => {
            o.set_http_version(2, 1);
            o.max_h2_streams = H2_STREAMS_PER_CONNECTION;
        }
    }
    peer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("10.0.0.1:80"), Some(("10.0.0.1", 80)));
        assert_eq!(split_host_port("localhost:8080"), Some(("localhost", 8080)));
        assert_eq!(split_host_port("[::1]:443"), Some(("::1", 443)));
        assert_eq!(split_host_port("::1:443"), None);
        assert_eq!(split_host_port("10.0.0.1"), None);
        assert_eq!(split_host_port("10.0.0.1:"), None);
        assert_eq!(split_host_port(":80"), None);
        assert_eq!(split_host_port("10.0.0.1:0"), None);
        assert_eq!(split_host_port("10.0.0.1:+80"), None);
        assert_eq!(split_host_port("10.0.0.1:70000"), None);
    }

    #[test]
    fn resolves_names_and_literals() {
        let (host, addr) = resolve("localhost:8080").unwrap();
        assert_eq!(host, "localhost");
        assert!(addr.ip().is_loopback());
        assert_eq!(addr.port(), 8080);
        let (host, addr) = resolve("[::1]:9").unwrap();
        assert_eq!(host, "::1");
        assert_eq!(addr, "[::1]:9".parse().unwrap());
        let err = resolve("no-such-host.invalid:80").unwrap_err();
        assert!(
            err.contains("cannot resolve `no-such-host.invalid`"),
            "{err}"
        );
    }
}
