//! The user-facing shape of authentication: the `auth:` section and a route's `auth:` in
//! `tollgate.yaml`, and the whole of `consumers.yaml` (named by `include.consumers`).
//!
//! ```yaml
//! # tollgate.yaml
//! include: { consumers: consumers.yaml }
//! routes:
//!   - name: api
//!     upstream: app
//!     auth: [jwt, hmac, key]            # shorthand: methods only, everything else default
//!   - name: admin-api
//!     upstream: app
//!     auth:
//!       methods: [jwt]
//!       allow: { tenants: [acme] }
//!       claims_to_headers: { sub: x-user-id }
//!       jwt: { issuers: [corp], from: [{ header: authorization }, { cookie: session }] }
//! ```

use std::collections::BTreeMap;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::units::Dur;
use crate::policy::auth::hmac::HmacSettings;
use crate::policy::auth::jwt::IssuerSpec;

/// Files that hold other parts of the configuration. Relative paths are relative to the
/// directory of `tollgate.yaml`; every included file is watched and reloaded with it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Include {
    /// Consumers, their credentials and JWT issuers.
    #[serde(default)]
    pub consumers: Option<String>,
    /// Per-tenant quotas: plans, tenants, cluster-wide counting.
    #[serde(default)]
    pub quotas: Option<String>,
}

/// Process-wide authentication settings (`auth:` at the top level).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Header the upstream gets with the authenticated consumer's name. Always removed from
    /// client requests first, on every route, so a client can never claim an identity.
    #[serde(default = "default_consumer_header")]
    pub consumer_header: String,
    /// Header with the consumer's tenant (also removed from client requests).
    #[serde(default = "default_tenant_header")]
    pub tenant_header: String,
    /// Nonces remembered for HMAC replay protection (about 40 bytes each). Bound at start.
    #[serde(default = "default_nonce_capacity")]
    pub nonce_capacity: usize,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            consumer_header: default_consumer_header(),
            tenant_header: default_tenant_header(),
            nonce_capacity: default_nonce_capacity(),
        }
    }
}

fn default_consumer_header() -> String {
    "x-consumer".into()
}
fn default_tenant_header() -> String {
    "x-tenant".into()
}
pub(crate) fn default_nonce_capacity() -> usize {
    1_000_000
}

/// A credential method a route accepts.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    Jwt,
    Hmac,
    Key,
    /// A client certificate verified by the listener's `tls.client_auth` CA.
    Cert,
}

/// Where a credential is read from: `{ header: x-api-key }`, `{ query: apikey }` or
/// `{ cookie: session }`. From `authorization`, a JWT is taken after `Bearer `.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(try_from = "SourceSpec")]
pub enum CredentialSource {
    Header(String),
    Query(String),
    Cookie(String),
}

/// The YAML form of a [`CredentialSource`]: a map with exactly one key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceSpec {
    header: Option<String>,
    query: Option<String>,
    cookie: Option<String>,
}

impl TryFrom<SourceSpec> for CredentialSource {
    type Error = String;
    fn try_from(s: SourceSpec) -> Result<Self, String> {
        match (s.header, s.query, s.cookie) {
            (Some(h), None, None) => http::HeaderName::from_bytes(h.as_bytes())
                .map(|_| CredentialSource::Header(h.to_ascii_lowercase()))
                .map_err(|_| format!("`{h}` is not a header name")),
            (None, Some(q), None) if !q.is_empty() => Ok(CredentialSource::Query(q)),
            (None, None, Some(c)) if !c.is_empty() => Ok(CredentialSource::Cookie(c)),
            _ => {
                Err("expected exactly one of `header: NAME`, `query: NAME`, `cookie: NAME`".into())
            }
        }
    }
}

/// A route's `auth:`. The shorthand `auth: [jwt, key]` sets only `methods`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteAuth {
    pub methods: Vec<AuthMethod>,
    /// Requests that carry no credential of any accepted method pass, without identity.
    /// A credential that is present but wrong is still refused.
    pub anonymous: bool,
    pub allow: AuthAllow,
    /// Remove the credential (header, query parameter or cookie) before the upstream.
    pub strip_credentials: bool,
    /// JWT claim → request header for the upstream (removed from client requests first).
    pub claims_to_headers: BTreeMap<String, String>,
    pub jwt: RouteJwt,
    pub key: RouteKey,
    pub hmac: HmacSettings,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct RouteAuthFull {
    methods: Vec<AuthMethod>,
    #[serde(default)]
    anonymous: bool,
    #[serde(default)]
    allow: AuthAllow,
    #[serde(default = "yes")]
    strip_credentials: bool,
    #[serde(default)]
    claims_to_headers: BTreeMap<String, String>,
    #[serde(default)]
    jwt: RouteJwt,
    #[serde(default)]
    key: RouteKey,
    #[serde(default)]
    hmac: HmacSettings,
}

fn yes() -> bool {
    true
}

impl From<RouteAuthFull> for RouteAuth {
    fn from(f: RouteAuthFull) -> Self {
        RouteAuth {
            methods: f.methods,
            anonymous: f.anonymous,
            allow: f.allow,
            strip_credentials: f.strip_credentials,
            claims_to_headers: f.claims_to_headers,
            jwt: f.jwt,
            key: f.key,
            hmac: f.hmac,
        }
    }
}

impl<'de> Deserialize<'de> for RouteAuth {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_yaml::Value::deserialize(d)?;
        let full = if value.is_sequence() {
            let methods = serde_yaml::from_value(value).map_err(de::Error::custom)?;
            RouteAuthFull {
                methods,
                anonymous: false,
                allow: AuthAllow::default(),
                strip_credentials: true,
                claims_to_headers: BTreeMap::new(),
                jwt: RouteJwt::default(),
                key: RouteKey::default(),
                hmac: HmacSettings::default(),
            }
        } else {
            serde_yaml::from_value(value).map_err(de::Error::custom)?
        };
        Ok(full.into())
    }
}

/// Who may pass once authenticated. Empty lists allow every consumer; both set: either matches.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthAllow {
    #[serde(default)]
    pub consumers: Vec<String>,
    #[serde(default)]
    pub tenants: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteJwt {
    /// Issuers (names in `consumers.yaml`) whose tokens this route accepts; empty: all.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Where the token is read from, first found wins. Default: `Authorization: Bearer`.
    #[serde(default = "default_jwt_from")]
    pub from: Vec<CredentialSource>,
}

impl Default for RouteJwt {
    fn default() -> Self {
        Self {
            issuers: Vec::new(),
            from: default_jwt_from(),
        }
    }
}

fn default_jwt_from() -> Vec<CredentialSource> {
    vec![CredentialSource::Header("authorization".into())]
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteKey {
    /// Where the API key is read from, first found wins. Default: the `X-Api-Key` header.
    #[serde(default = "default_key_from")]
    pub from: Vec<CredentialSource>,
}

impl Default for RouteKey {
    fn default() -> Self {
        Self {
            from: default_key_from(),
        }
    }
}

fn default_key_from() -> Vec<CredentialSource> {
    vec![CredentialSource::Header("x-api-key".into())]
}

// ---------------------------------------------------------------------------------------------
// consumers.yaml

/// The parsed `consumers.yaml`.
#[derive(Debug, Clone, Default)]
pub struct ConsumersFile {
    /// Issuers in name order.
    pub jwt_issuers: BTreeMap<String, IssuerSpec>,
    /// Consumers in name order.
    pub consumers: BTreeMap<String, ConsumerSpec>,
}

/// One consumer: a client of the API (an app, a partner, a customer's integration).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConsumerSpec {
    /// The customer this consumer belongs to (what quotas are counted against).
    #[serde(default)]
    pub tenant: Option<String>,
    /// A disabled consumer's credentials all stop working at once.
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub api_keys: Vec<ApiKeySpec>,
    /// HMAC access key / secret pairs (several, for rotation).
    #[serde(default)]
    pub hmac: Vec<HmacCredentialSpec>,
    /// Tokens of these issuers authenticate as this consumer.
    #[serde(default)]
    pub jwt: Vec<JwtMembership>,
    /// Client certificates (verified by a listener's `tls.client_auth`) that are this consumer.
    #[serde(default)]
    pub client_certs: Vec<ClientCertSpec>,
}

/// One client certificate of a consumer: by the subject's common name (any certificate the
/// listener's CA issued with it) or by the SHA-256 fingerprint of one certificate.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientCertSpec {
    #[serde(default)]
    pub common_name: Option<String>,
    /// Hex, with or without `:` separators, optionally prefixed `sha256:`.
    #[serde(default)]
    pub fingerprint: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySpec {
    /// The key itself; use `${env:..}` or `${file:..}` to keep it out of this file.
    pub key: String,
    #[serde(default = "yes")]
    pub enabled: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HmacCredentialSpec {
    /// Sent by clients as `X-Ca-Key`.
    pub access_key: String,
    pub secret: String,
    #[serde(default = "yes")]
    pub enabled: bool,
}

/// `{ issuer: corp }`: every valid token of `corp`; `{ issuer: corp, subject: svc-42 }`: only
/// tokens whose `sub` is `svc-42` (a subject match wins over an issuer-wide member).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtMembership {
    pub issuer: String,
    #[serde(default)]
    pub subject: Option<String>,
    /// Take the tenant from this claim of the token (e.g. `org`) instead of `tenant`.
    #[serde(default)]
    pub tenant_claim: Option<String>,
}

/// Clock skew allowed for HMAC timestamps is capped so the replay store, which remembers
/// nonces for twice this, stays bounded in time.
pub const MAX_HMAC_CLOCK_SKEW: Dur = Dur(std::time::Duration::from_secs(15 * 60));
