//! The user-facing shape of quotas: `quotas.yaml` (named by `include.quotas`) and a route's
//! `quota:` in `tollgate.yaml`.
//!
//! ```yaml
//! # quotas.yaml
//! plans:
//!   free:     { requests_per_second: 10, requests_per_minute: 300, websocket_connections: 20 }
//!   business:
//!     requests_per_second: 200
//!     burst: 400
//!     requests_per_day: 5000000
//!     groups: { ws: { websocket_connections: 500 } }   # the `ws` route group's budget differs
//! default_plan: free          # unknown tenants get it; `unknown_tenants: reject` refuses them
//! tenants:
//!   acme:   { plan: business }
//!   globex: { plan: free, requests_per_second: 50 }   # override one field
//! ```
//!
//! The limits of a tenant on a route group are merged field by field, later wins:
//! plan → plan's `groups.<g>` → tenant → tenant's `groups.<g>`.

use std::collections::BTreeMap;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::units::ByteSize;
use crate::policy::quota::cluster::ClusterSettings;

/// Limits; every field optional so plans, groups and tenants can override field by field.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub requests_per_second: Option<u64>,
    /// Requests admitted at once above the per-second rate (the bucket's size). Default: one
    /// second's worth (`requests_per_second`).
    pub burst: Option<u64>,
    pub requests_per_minute: Option<u64>,
    pub requests_per_hour: Option<u64>,
    pub requests_per_day: Option<u64>,
    /// Requests in flight at once (this gateway).
    pub concurrent_requests: Option<u32>,
    /// Open WebSocket connections at once (this gateway).
    pub websocket_connections: Option<u32>,
    /// Request body bandwidth; faster uploads are slowed down, not refused.
    pub request_body_bytes_per_second: Option<ByteSize>,
    /// Count the request rates across the fleet in Redis (see `cluster:`).
    pub cluster: Option<bool>,
}

impl Limits {
    /// `self` with every field `over` sets replaced.
    pub fn merged(&self, over: &Limits) -> Limits {
        Limits {
            requests_per_second: over.requests_per_second.or(self.requests_per_second),
            burst: over.burst.or(self.burst),
            requests_per_minute: over.requests_per_minute.or(self.requests_per_minute),
            requests_per_hour: over.requests_per_hour.or(self.requests_per_hour),
            requests_per_day: over.requests_per_day.or(self.requests_per_day),
            concurrent_requests: over.concurrent_requests.or(self.concurrent_requests),
            websocket_connections: over.websocket_connections.or(self.websocket_connections),
            request_body_bytes_per_second: over
                .request_body_bytes_per_second
                .or(self.request_body_bytes_per_second),
            cluster: over.cluster.or(self.cluster),
        }
    }
}

/// A plan (tier) or a tenant: limits at the top level, `groups:` for per-group overrides, and
/// for a tenant, `plan:`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuotaEntry {
    pub plan: Option<String>,
    pub limits: Limits,
    pub groups: BTreeMap<String, Limits>,
}

impl<'de> Deserialize<'de> for QuotaEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_yaml::Value::deserialize(d)?;
        let serde_yaml::Value::Mapping(mut map) = value else {
            return Err(de::Error::custom(
                "expected a mapping of limits, e.g. { requests_per_second: 10 }",
            ));
        };
        let plan = match map.remove("plan") {
            Some(v) => Some(serde_yaml::from_value(v).map_err(de::Error::custom)?),
            None => None,
        };
        let groups = match map.remove("groups") {
            Some(v) => {
                serde_yaml::from_value(v).map_err(|e| de::Error::custom(format!("groups: {e}")))?
            }
            None => BTreeMap::new(),
        };
        let limits =
            serde_yaml::from_value(serde_yaml::Value::Mapping(map)).map_err(de::Error::custom)?;
        Ok(QuotaEntry {
            plan,
            limits,
            groups,
        })
    }
}

/// What happens to requests of tenants that `tenants:` does not list.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnknownTenants {
    /// They get `default_plan`.
    #[default]
    DefaultPlan,
    /// They are refused (`403 unknown_tenant`).
    Reject,
}

/// The parsed `quotas.yaml`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuotasFile {
    pub plans: BTreeMap<String, QuotaEntry>,
    pub default_plan: Option<String>,
    pub unknown_tenants: UnknownTenants,
    pub tenants: BTreeMap<String, QuotaEntry>,
    /// Fleet-wide counting in Redis, for plans with `cluster: true`.
    pub cluster: Option<ClusterSettings>,
    /// Tenants tracked at once (about 200 bytes each). Unlisted tenants beyond it share one
    /// default-plan budget until idle ones are swept.
    pub max_tenants: usize,
}

pub const DEFAULT_MAX_TENANTS: usize = 1_000_000;

/// Where a route finds the tenant a request counts against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantSource {
    /// The authenticated consumer's tenant (the route needs `auth`).
    Consumer,
    /// A claim of the request's verified JWT (the route needs `auth` with `jwt`).
    Claim(String),
    /// A request header the route trusts (e.g. set by an upstream proxy).
    Header(String),
    Query(String),
    /// The host, by a pattern such as `{tenant}.example.com`.
    Host {
        prefix: String,
        suffix: String,
    },
    /// The client's IP address.
    ClientIp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantSourceSpec {
    header: Option<String>,
    query: Option<String>,
    claim: Option<String>,
    host: Option<String>,
}

impl<'de> Deserialize<'de> for TenantSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_yaml::Value::deserialize(d)?;
        if let Some(s) = value.as_str() {
            return match s {
                "consumer" => Ok(TenantSource::Consumer),
                "client_ip" => Ok(TenantSource::ClientIp),
                other => Err(de::Error::custom(format!(
                    "unknown tenant source `{other}`; expected consumer, client_ip, \
                     {{ header: NAME }}, {{ query: NAME }}, {{ claim: NAME }} or {{ host: \"{{tenant}}.example.com\" }}"
                ))),
            };
        }
        let spec: TenantSourceSpec = serde_yaml::from_value(value).map_err(de::Error::custom)?;
        match (spec.header, spec.query, spec.claim, spec.host) {
            (Some(h), None, None, None) => http::HeaderName::from_bytes(h.as_bytes())
                .map(|_| TenantSource::Header(h.to_ascii_lowercase()))
                .map_err(|_| de::Error::custom(format!("`{h}` is not a header name"))),
            (None, Some(q), None, None) if !q.is_empty() => Ok(TenantSource::Query(q)),
            (None, None, Some(c), None) if !c.is_empty() => Ok(TenantSource::Claim(c)),
            (None, None, None, Some(h)) => match h.split_once("{tenant}") {
                Some((prefix, suffix)) if !suffix.contains("{tenant}") => Ok(TenantSource::Host {
                    prefix: prefix.to_ascii_lowercase(),
                    suffix: suffix.to_ascii_lowercase(),
                }),
                _ => Err(de::Error::custom(
                    "a host pattern holds `{tenant}` once, e.g. \"{tenant}.example.com\"",
                )),
            },
            _ => Err(de::Error::custom(
                "expected exactly one of header, query, claim, host",
            )),
        }
    }
}

/// A route's `quota:`. The shorthand `quota: tenant` counts against the consumer's tenant in
/// the `default` group.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteQuota {
    pub tenant: TenantSource,
    /// The route group whose budget the route spends (default `default`).
    pub group: String,
    /// Add `RateLimit`/`RateLimit-Policy` and `X-RateLimit-*` to answers (default true).
    pub headers: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteQuotaFull {
    tenant: TenantSource,
    #[serde(default = "default_group")]
    group: String,
    #[serde(default = "yes")]
    headers: bool,
}

pub fn default_group() -> String {
    "default".into()
}
fn yes() -> bool {
    true
}

impl<'de> Deserialize<'de> for RouteQuota {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_yaml::Value::deserialize(d)?;
        if value.as_str() == Some("tenant") {
            return Ok(RouteQuota {
                tenant: TenantSource::Consumer,
                group: default_group(),
                headers: true,
            });
        }
        let full: RouteQuotaFull = serde_yaml::from_value(value).map_err(de::Error::custom)?;
        Ok(RouteQuota {
            tenant: full.tenant,
            group: full.group,
            headers: full.headers,
        })
    }
}
