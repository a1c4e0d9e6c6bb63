//! The user-facing shape of `tollgate.yaml`. The words here are the words of the config file:
//! a `routes:` entry is a [`Route`], an `upstreams:` entry an [`Upstream`].
//!
//! These types only describe and parse. Validation that needs more than one field lives in
//! `config::validate`; compilation into the fast request-time form lives in `router/` and
//! `upstream/`. Every struct denies unknown fields: a typo is an error, never silently ignored.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::units::{ByteSize, Dur};

/// The settings a process binds at start: changing them needs a binary upgrade. `/status`
/// publishes the running process's, so `tollgate check` can say what a file would change.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
pub struct Bound {
    pub listeners: Vec<BoundListener>,
    pub admin: Admin,
    pub server: ServerSettings,
    /// `auth.nonce_capacity`: the replay store is sized once.
    #[serde(default = "super::auth::default_nonce_capacity")]
    pub nonce_capacity: usize,
}

impl Bound {
    pub fn of(config: &Config) -> Bound {
        Bound {
            listeners: config.listeners.iter().map(BoundListener::of).collect(),
            admin: config.admin.clone(),
            server: config.server.clone(),
            nonce_capacity: config.auth.nonce_capacity,
        }
    }

    /// What differs in `new`, one sentence per section, for operators.
    pub fn changes(&self, new: &Bound) -> Vec<String> {
        let mut out = Vec::new();
        let note = "it is bound at start: apply it with a binary upgrade (tollgate upgrade); the rest of the change is live";
        if self.listeners != new.listeners {
            out.push(format!("`listeners` changed; {note}"));
        }
        if self.admin != new.admin {
            out.push(format!("`admin` changed; {note}"));
        }
        if self.server != new.server {
            out.push(format!(
                "`server` changed (threads, pool size, read buffer, file paths); {note}"
            ));
        }
        if self.nonce_capacity != new.nonce_capacity {
            out.push(format!("`auth.nonce_capacity` changed; {note}"));
        }
        out
    }
}

/// A parsed, validated configuration. Built by `config::load`.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub admin: Admin,
    pub server: ServerSettings,
    pub http: HttpSettings,
    pub access_log: AccessLog,
    pub reload: ReloadSettings,
    pub drain: Drain,
    pub include: super::auth::Include,
    pub auth: super::auth::AuthSettings,
    /// Which address is the client: the peer, or from trusted proxies' `X-Forwarded-For`.
    pub client_ip: crate::policy::client_ip::ClientIpSettings,
    /// Flood (CC) protection per client IP.
    pub flood: crate::policy::flood::FloodSettings,
    /// IP allow and deny lists for every route.
    pub ip_rules: crate::policy::ip_rules::IpRulesSettings,
    /// Bot detection by User-Agent.
    pub bots: crate::policy::bot::BotSettings,
    /// Custom rules: conditions on requests with block / log / tag actions.
    pub rules: Vec<crate::policy::rules::RuleSpec>,
    /// The WAF (SecLang rules, the OWASP Core Rule Set by default).
    pub waf: crate::waf::WafSettings,
    /// Upstreams in name order (the map is ordered so output and errors are stable).
    pub upstreams: BTreeMap<String, Upstream>,
    /// Routes in declared order; declared order is the last tie-breaker of routing precedence.
    pub routes: Vec<Route>,
    /// Upstreams that failed to parse (only in a config that is being refused): references to
    /// them are not reported again as unknown.
    pub broken_upstreams: std::collections::BTreeSet<String>,
}

/// A listening socket. The socket and whether it speaks TLS are fixed for the life of a
/// process (Pingora binds them at start; changing them needs the binary-upgrade path). What is
/// served on it (certificates, client authentication, h2c, redirects, HSTS) reloads live.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    /// `host:port`, e.g. `0.0.0.0:8080` or `[::]:8080`.
    pub address: String,
    /// Terminate TLS here (certificates chosen by SNI).
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// Also accept cleartext HTTP/2 with prior knowledge (h2c), e.g. for gRPC clients inside a
    /// trusted network. Plaintext listeners only (TLS listeners negotiate h2 by ALPN).
    #[serde(default)]
    pub h2c: bool,
    /// Answer every request with a redirect to `https://` (plaintext listeners).
    #[serde(default)]
    pub redirect_https: Option<RedirectHttps>,
    /// `Strict-Transport-Security` on every response of this (TLS) listener.
    #[serde(default)]
    pub hsts: Option<Hsts>,
}

/// What of a listener is bound at start.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct BoundListener {
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub tls: bool,
}

impl BoundListener {
    pub fn of(l: &Listener) -> BoundListener {
        BoundListener {
            name: l.name.clone(),
            address: l.address.clone(),
            tls: l.tls.is_some(),
        }
    }
}

/// `listeners[].tls`: certificates and handshake policy of a TLS listener (hot).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Certificate chains and keys. The names each one serves are read from the certificate
    /// (subjectAltName DNS names, else the subject CN), exact or `*.wildcard`.
    pub certificates: Vec<Certificate>,
    /// A client whose SNI names no certificate (or that sends no SNI): `default` serves the
    /// default certificate, `refuse` fails the handshake.
    #[serde(default)]
    pub unknown_sni: UnknownSni,
    /// Lowest TLS version accepted: `"1.2"` or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Offer HTTP/2 by ALPN (`h2`, then `http/1.1`).
    #[serde(default = "default_true")]
    pub http2: bool,
    /// Ask clients for a certificate signed by these CAs (mTLS).
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// Time a client has to complete the TLS handshake.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: Dur,
}

fn default_handshake_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// PEM file: the leaf certificate first, then its intermediates.
    pub cert: String,
    /// PEM file: the private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key: String,
    /// DER OCSP response to staple (refreshed by whatever writes the file; reloaded with it).
    #[serde(default)]
    pub ocsp: Option<String>,
    /// Serve this certificate for unknown SNI (default: the first certificate).
    #[serde(default)]
    pub default: bool,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnknownSni {
    #[default]
    Default,
    Refuse,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    /// PEM file of the CA certificates client certificates must chain to.
    pub ca: String,
    /// Refuse clients without a certificate (else they pass without an identity).
    #[serde(default = "default_true")]
    pub required: bool,
}

/// `listeners[].redirect_https`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedirectHttps {
    /// Port of the https URL (443 is left out of it).
    #[serde(default = "default_https_port")]
    pub port: u16,
    /// 301, 302, 307 or 308 (308 keeps the method and body).
    #[serde(default = "default_https_redirect_status")]
    pub status: u16,
    /// Path prefixes still served over plain HTTP (ACME HTTP-01 challenges by default).
    #[serde(default = "default_redirect_except")]
    pub except: Vec<String>,
}

fn default_https_port() -> u16 {
    443
}
fn default_https_redirect_status() -> u16 {
    308
}
fn default_redirect_except() -> Vec<String> {
    vec!["/.well-known/acme-challenge/".into()]
}

/// `listeners[].hsts`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Hsts {
    #[serde(default = "default_hsts_max_age")]
    pub max_age: Dur,
    #[serde(default)]
    pub include_subdomains: bool,
    #[serde(default)]
    pub preload: bool,
}

fn default_hsts_max_age() -> Dur {
    Dur(Duration::from_secs(365 * 24 * 3600))
}

/// The operator listener: Prometheus `/metrics` (and later the admin API). Loopback by default.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(default = "default_admin_address")]
    pub address: String,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            address: default_admin_address(),
        }
    }
}

fn default_admin_address() -> String {
    "127.0.0.1:9090".into()
}

/// Process-level settings handed to Pingora at start (not hot: they need the upgrade path).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Worker threads for the proxy service.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Pingora's work stealing across threads. Off by default: measured ~20% less CPU per request.
    #[serde(default)]
    pub work_stealing: bool,
    /// Idle upstream connections kept in Pingora's pool (shared by all upstreams, survives reloads).
    #[serde(default = "default_pool_size")]
    pub upstream_keepalive_pool_size: usize,
    /// Read buffer in front of each downstream socket (Pingora's default is 64k). None (`0`)
    /// by default: measured, it saves 4 KB per idle WebSocket tunnel (23.4 → 19.3 KB) and costs
    /// no CPU per HTTP request (Pingora reads heads and bodies into buffers of its own).
    #[serde(default = "default_read_buffer")]
    pub read_buffer: ByteSize,
    #[serde(default = "default_pid_file")]
    pub pid_file: String,
    #[serde(default = "default_upgrade_sock")]
    pub upgrade_sock: String,
    /// Downstream HTTP/2 limits.
    #[serde(default)]
    pub h2: H2Limits,
}

/// Limits of downstream HTTP/2 connections (`server.h2`).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct H2Limits {
    /// Streams one client may have open at once (nginx: 128).
    #[serde(default = "default_h2_streams")]
    pub max_concurrent_streams: u32,
    /// Largest decoded header list of one request.
    #[serde(default = "default_h2_header_list")]
    pub max_header_list: ByteSize,
    /// Flow-control window of each stream and of the whole connection.
    #[serde(default = "default_h2_stream_window")]
    pub stream_window: ByteSize,
    #[serde(default = "default_h2_connection_window")]
    pub connection_window: ByteSize,
    /// Close a connection that has had no open stream this long.
    #[serde(default = "default_h2_idle")]
    pub idle_timeout: Dur,
}

impl Default for H2Limits {
    fn default() -> Self {
        Self {
            max_concurrent_streams: default_h2_streams(),
            max_header_list: default_h2_header_list(),
            stream_window: default_h2_stream_window(),
            connection_window: default_h2_connection_window(),
            idle_timeout: default_h2_idle(),
        }
    }
}

fn default_h2_streams() -> u32 {
    128
}
fn default_h2_header_list() -> ByteSize {
    ByteSize(32 * 1024)
}
fn default_h2_stream_window() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_h2_connection_window() -> ByteSize {
    ByteSize(4 << 20)
}
fn default_h2_idle() -> Dur {
    Dur(Duration::from_secs(180))
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            threads: default_threads(),
            work_stealing: false,
            upstream_keepalive_pool_size: default_pool_size(),
            read_buffer: default_read_buffer(),
            pid_file: default_pid_file(),
            upgrade_sock: default_upgrade_sock(),
            h2: H2Limits::default(),
        }
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
fn default_pool_size() -> usize {
    128
}
fn default_read_buffer() -> ByteSize {
    ByteSize(0)
}
fn default_pid_file() -> String {
    "/tmp/tollgate.pid".into()
}
fn default_upgrade_sock() -> String {
    "/tmp/tollgate_upgrade.sock".into()
}

/// Request hygiene applied to every downstream HTTP/1 request before routing.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Largest request head (request line + headers). Larger heads get `431`.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: ByteSize,
    /// Most header fields in one request. More get `431`.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Time a client has to send a complete request head once it started one.
    #[serde(default = "default_header_timeout")]
    pub client_header_timeout: Dur,
    /// Longest pause allowed between two reads of a request body.
    #[serde(default = "default_body_timeout")]
    pub client_body_timeout: Dur,
    /// How long an idle keep-alive connection waits for its next request.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout: Dur,
    /// Default request body cap for routes that set none (`413` past it).
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// Add a `Via` header to proxied requests and responses.
    #[serde(default)]
    pub via: bool,
    /// Set the RFC 7239 `Forwarded` header (X-Forwarded-* are always set).
    #[serde(default = "default_true")]
    pub forwarded: bool,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            client_header_timeout: default_header_timeout(),
            client_body_timeout: default_body_timeout(),
            keepalive_timeout: default_keepalive_timeout(),
            max_body: default_max_body(),
            via: false,
            forwarded: true,
        }
    }
}

fn default_max_header_bytes() -> ByteSize {
    ByteSize(32 * 1024)
}
fn default_max_headers() -> usize {
    100
}
fn default_header_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_body_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_keepalive_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_max_body() -> ByteSize {
    ByteSize(10 * 1024 * 1024)
}
fn default_true() -> bool {
    true
}

/// One JSON line per request.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// `stdout`, or a file path (appended to).
    #[serde(default = "default_access_log_path")]
    pub path: String,
}

impl Default for AccessLog {
    fn default() -> Self {
        Self {
            enabled: true,
            path: default_access_log_path(),
        }
    }
}

fn default_access_log_path() -> String {
    "stdout".into()
}

/// How an old process winds down after a binary upgrade (`SIGQUIT`) or `SIGTERM`. Read when
/// the drain starts, so a reload changes it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Drain {
    /// WebSocket tunnels still open this long after the drain began are closed...
    #[serde(default = "default_drain_timeout")]
    pub timeout: Dur,
    /// ...one by one, evenly spread over this window (never all at once: no reconnect storm).
    #[serde(default = "default_drain_spread")]
    pub spread: Dur,
    /// An idle keep-alive connection gets this long to send one more request (answered with
    /// `Connection: close`) before it is closed.
    #[serde(default = "default_drain_idle")]
    pub idle_grace: Dur,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            timeout: default_drain_timeout(),
            spread: default_drain_spread(),
            idle_grace: default_drain_idle(),
        }
    }
}

fn default_drain_timeout() -> Dur {
    Dur(Duration::from_secs(3600))
}
fn default_drain_spread() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_drain_idle() -> Dur {
    Dur(Duration::from_secs(1))
}

/// When the config file is re-read. `SIGHUP` always reloads.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReloadSettings {
    /// Watch the file and reload when it changes.
    #[serde(default = "default_true")]
    pub watch: bool,
    /// How often the watched file is checked.
    #[serde(default = "default_watch_interval")]
    pub watch_interval: Dur,
}

impl Default for ReloadSettings {
    fn default() -> Self {
        Self {
            watch: true,
            watch_interval: default_watch_interval(),
        }
    }
}

fn default_watch_interval() -> Dur {
    Dur(Duration::from_millis(500))
}

// ---------------------------------------------------------------------------------------------
// Upstreams

/// A named pool of backends (`upstreams.<name>`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub backends: Vec<Backend>,
    #[serde(default)]
    pub balance: Balance,
    /// Key for `balance: hash`: `header:NAME`, `cookie:NAME`, `client_ip` or `path`.
    #[serde(default)]
    pub hash_on: Option<String>,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    #[serde(default)]
    pub passive: PassiveHealth,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Extra attempts on another backend after a connect failure (idempotent methods only).
    #[serde(default = "default_retries")]
    pub retries: usize,
    /// Connect to the backends over TLS.
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
    /// HTTP version spoken to the backends: `http1`, `h2` (HTTP/2 only: prior knowledge on
    /// cleartext, ALPN `h2` over TLS; what gRPC backends need) or `auto` (ALPN picks h2 or
    /// HTTP/1.1 over TLS; HTTP/1.1 on cleartext).
    #[serde(default)]
    pub protocol: UpstreamProtocol,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    H2,
    Auto,
}

fn default_retries() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// `host:port`; a host name is resolved when the config is loaded.
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Free-form labels that canary rules and `labels:` on routes select by.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Fewest requests in flight (weights divide the count).
    LeastConn,
    /// Consistent hash on `hash_on`.
    Hash,
}

/// Active health check: exactly one of `http` or `tcp`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(default)]
    pub http: Option<HttpCheck>,
    #[serde(default)]
    pub tcp: Option<TcpCheck>,
    #[serde(default = "default_hc_interval")]
    pub interval: Dur,
    #[serde(default = "default_hc_timeout")]
    pub timeout: Dur,
    /// Consecutive successes that mark an unhealthy backend healthy.
    #[serde(default = "default_healthy")]
    pub healthy: u32,
    /// Consecutive failures that mark a healthy backend unhealthy.
    #[serde(default = "default_unhealthy")]
    pub unhealthy: u32,
}

fn default_hc_interval() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_hc_timeout() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_healthy() -> u32 {
    2
}
fn default_unhealthy() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    pub path: String,
    /// Host header of the probe (default: the backend address).
    #[serde(default)]
    pub host: Option<String>,
    /// Statuses that count as healthy (default: any 2xx).
    #[serde(default)]
    pub expected_status: Vec<u16>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {}

/// Passive ejection: a backend that fails `consecutive_failures` times in a row (connect
/// failures or 5xx answers) is taken out for `ejection_time`, then given traffic again.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealth {
    /// 0 turns passive ejection off.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    #[serde(default = "default_ejection_time")]
    pub ejection_time: Dur,
    /// Count 5xx answers as failures (connect failures always count).
    #[serde(default = "default_true")]
    pub count_5xx: bool,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive_failures(),
            ejection_time: default_ejection_time(),
            count_5xx: true,
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_ejection_time() -> Dur {
    Dur(Duration::from_secs(10))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default = "default_connect_timeout")]
    pub connect: Dur,
    #[serde(default = "default_rw_timeout")]
    pub read: Dur,
    #[serde(default = "default_rw_timeout")]
    pub write: Dur,
    /// How long an idle pooled upstream connection is kept.
    #[serde(default = "default_idle_timeout")]
    pub idle: Dur,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: default_connect_timeout(),
            read: default_rw_timeout(),
            write: default_rw_timeout(),
            idle: default_idle_timeout(),
        }
    }
}

fn default_connect_timeout() -> Dur {
    Dur(Duration::from_secs(2))
}
fn default_rw_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_idle_timeout() -> Dur {
    Dur(Duration::from_secs(90))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Server name sent in SNI and verified (default: the backend host).
    #[serde(default)]
    pub sni: Option<String>,
    /// Verify the backend certificate (on by default).
    #[serde(default = "default_true")]
    pub verify: bool,
    /// PEM file of the CAs the backend certificate must chain to (default: the system's).
    #[serde(default)]
    pub ca: Option<String>,
    /// Client certificate (PEM chain) and key presented to the backends.
    #[serde(default)]
    pub client_cert: Option<String>,
    #[serde(default)]
    pub client_key: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Routes

/// One `routes:` entry: what to match and what to do with a match.
///
/// Exactly one action: `upstream` (proxy), `redirect` or `respond`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matcher: RouteMatch,

    /// Proxy to this upstream.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Canary / label rules, first match wins; requests matching none use `labels`.
    #[serde(default)]
    pub split: Vec<SplitRule>,
    /// Backend subset for requests no split rule took (default: every backend).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Keeps a client on the same side of a weighted split (and of `balance: hash`).
    #[serde(default)]
    pub sticky: Option<Sticky>,

    #[serde(default)]
    pub redirect: Option<Redirect>,
    #[serde(default)]
    pub respond: Option<Respond>,

    #[serde(default)]
    pub rewrite: Option<Rewrite>,
    #[serde(default)]
    pub request_headers: HeaderOps,
    #[serde(default)]
    pub response_headers: HeaderOps,

    #[serde(default)]
    pub websocket: WebSocket,
    /// Request body cap for this route (default `http.max_body`).
    #[serde(default)]
    pub max_body: Option<ByteSize>,
    /// Credentials this route requires (see `config::auth`). None: no authentication.
    #[serde(default)]
    pub auth: Option<super::auth::RouteAuth>,
    /// The tenant quota this route spends (see `config::quota`). None: no quota.
    #[serde(default)]
    pub quota: Option<super::quota::RouteQuota>,
    /// IP lists of this route, on top of the global `ip_rules` (its `allow` replaces the
    /// global one).
    #[serde(default)]
    pub ip_rules: Option<crate::policy::ip_rules::IpRulesSettings>,
    /// The `bots.mode` of this route (`block`, `detect`, `off`).
    #[serde(default)]
    pub bots: Option<crate::policy::bot::BotMode>,
    /// `false`: the custom `rules:` do not apply to this route.
    #[serde(default = "default_true")]
    pub rules: bool,
    /// This route's WAF mode, paranoia, threshold and exclusions (over the global `waf`).
    #[serde(default)]
    pub waf: Option<crate::waf::RouteWafSettings>,
    /// Body of the `403` that IP rules, bots and custom rules answer: `json` (default) or
    /// `html` (for routes browsers open).
    #[serde(default)]
    pub block_page: BlockPage,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BlockPage {
    #[default]
    Json,
    Html,
}

/// All conditions must hold. An empty match matches every request.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Exact names (`api.example.com`) or wildcards (`*.example.com`, any depth). Empty: any host.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// At most one of `path`, `path_prefix`, `path_regex`.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub path_regex: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, ValueMatch>,
    #[serde(default)]
    pub query: BTreeMap<String, ValueMatch>,
    #[serde(default)]
    pub cookies: BTreeMap<String, ValueMatch>,
}

/// How one header, query parameter or cookie is matched: a plain string is an exact match,
/// otherwise exactly one of `exact`, `prefix`, `contains`, `regex`, `present`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ValueMatch {
    Exact(String),
    Spec(ValueMatchSpec),
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValueMatchSpec {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
    /// The value contains this text (case-sensitive).
    #[serde(default)]
    pub contains: Option<String>,
    /// `true`: must be present (any value); `false`: must be absent.
    #[serde(default)]
    pub present: Option<bool>,
}

/// One canary rule. `when` conditions, or a `weight` percentage, or both (a weighted slice of the
/// requests that match `when`). Selects the backends carrying all of `labels`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitRule {
    #[serde(default)]
    pub when: Option<SplitWhen>,
    /// Percent of requests (0–100, fractions allowed) this rule takes.
    #[serde(default)]
    pub weight: Option<f64>,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitWhen {
    #[serde(default)]
    pub headers: BTreeMap<String, ValueMatch>,
    #[serde(default)]
    pub cookies: BTreeMap<String, ValueMatch>,
    #[serde(default)]
    pub query: BTreeMap<String, ValueMatch>,
}

/// What identifies a client for sticky splits and hashing: exactly one field.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sticky {
    #[serde(default)]
    pub cookie: Option<String>,
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub client_ip: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// 301, 302, 307 or 308.
    #[serde(default = "default_redirect_status")]
    pub status: u16,
    /// Absolute URL or path. `{path}` and `{query}` are replaced by the request's
    /// (e.g. `https://example.com{path}{query}`); `{query}` includes its `?` when not empty.
    pub location: String,
}

fn default_redirect_status() -> u16 {
    302
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Respond {
    #[serde(default = "default_respond_status")]
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_respond_status() -> u16 {
    200
}

/// Path rewrite before proxying: `strip_prefix` first, then `regex` on the result.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rewrite {
    #[serde(default)]
    pub strip_prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<RegexRewrite>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegexRewrite {
    pub pattern: String,
    /// `$1`, `${name}` refer to capture groups.
    pub replacement: String,
}

/// Header edits, applied in the order remove → set → add.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderOps {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// WebSocket tunnels opened through this route.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WebSocket {
    /// Accept `Upgrade: websocket` on this route.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// A tunnel with no frame in either direction for this long is closed.
    #[serde(default = "default_ws_idle")]
    pub idle_timeout: Dur,
}

impl Default for WebSocket {
    fn default() -> Self {
        Self {
            enabled: true,
            idle_timeout: default_ws_idle(),
        }
    }
}

fn default_ws_idle() -> Dur {
    Dur(Duration::from_secs(3600))
}
