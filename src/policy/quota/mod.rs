//! Per-tenant quotas from `quotas.yaml`: who a request counts against, and whether it may pass.
//!
//! A route's `quota:` names where the tenant comes from (the authenticated consumer, a JWT claim,
//! a trusted header, the query, the host, the client IP) and which route group's budget it
//! spends. The tenant's limits on that group are compiled at load ([`QuotaTable`]); the counters
//! live in [`QuotaState`], outside the snapshot, keyed by tenant and group, so a reload never
//! resets them. Listed tenants' counters are resolved at compile time (no lookup per request);
//! unlisted tenants (the default plan) are looked up in a sharded map and swept when idle.
//!
//! Limits are checked in a fixed order, each one exact: per-second GCRA with burst, the minute,
//! hour and day windows (or the fleet-wide windows in Redis for `cluster: true`), then the
//! concurrency cap. A later refusal gives back what earlier checks took.

pub mod cluster;
pub mod limiter;

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::{
    error, FieldError, Limits, QuotaEntry, QuotasFile, RouteQuota, TenantSource, UnknownTenants,
};
use crate::respond::QuotaRefusal;
use cluster::{ClusterStore, Decision};
use limiter::{now_ns, unix_secs, Counters, Gcra, Remaining, Slot, WINDOWS};

/// Tenant label of metrics for tenants `quotas.yaml` does not list (unbounded in number).
pub const OTHER_TENANTS: &str = "_other";

/// The limits of one tenant (or plan) on one route group, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    rate: Option<Gcra>,
    /// `requests_per_second` (the fleet-wide 1 s window in cluster mode).
    per_second: Option<u64>,
    windows: [Option<u64>; 3],
    concurrent: Option<u32>,
    websockets: Option<u32>,
    body: Option<Gcra>,
    cluster: bool,
}

impl Compiled {
    fn from_limits(l: &Limits) -> Compiled {
        Compiled {
            rate: l
                .requests_per_second
                .map(|r| Gcra::new(r, l.burst.unwrap_or(r))),
            per_second: l.requests_per_second,
            windows: [
                l.requests_per_minute,
                l.requests_per_hour,
                l.requests_per_day,
            ],
            concurrent: l.concurrent_requests,
            websockets: l.websocket_connections,
            body: l
                .request_body_bytes_per_second
                .map(|b| Gcra::new(b.get(), b.get())),
            cluster: l.cluster.unwrap_or(false),
        }
    }
}

/// Outcome counters of one tenant on one group, resolved once per snapshot.
#[derive(Clone)]
pub struct TenantMetrics {
    /// admitted, rate_limited, concurrency_limited, websocket_limited.
    results: [prometheus::IntCounter; 4],
}

struct Listed {
    /// Indexed by group id.
    limits: Vec<Compiled>,
    counters: Vec<Arc<Counters>>,
    metrics: Vec<Option<TenantMetrics>>,
}

/// `quotas.yaml`, compiled against the route groups of the same config.
#[derive(Default)]
pub struct QuotaTable {
    groups: Vec<String>,
    group_ids: HashMap<String, usize>,
    tenants: HashMap<String, Listed>,
    /// The default plan per group; None: unknown tenants are refused.
    default: Option<Vec<Compiled>>,
    other_metrics: Vec<Option<TenantMetrics>>,
    pub cluster: Option<cluster::ClusterSettings>,
    max_tenants: usize,
}

/// A route's `quota:`, compiled.
#[derive(Debug, Clone)]
pub struct QuotaPolicy {
    pub source: TenantSource,
    pub group: usize,
    pub headers: bool,
}

/// One request's place in the quota: its tenant's limits and counters.
pub struct Resolved<'a> {
    pub tenant: &'a str,
    limits: &'a Compiled,
    counters: Arc<Counters>,
    metrics: Option<&'a TenantMetrics>,
    group: &'a str,
}

/// An admitted request: its concurrency slot (held until it ends) and what is left.
pub struct Admission {
    pub slot: Option<Slot>,
    pub remaining: Option<Remaining>,
    pub counters: Arc<Counters>,
    pub body: Option<Gcra>,
}

impl QuotaTable {
    /// Compiles the file for the route groups `groups` (names used by routes).
    pub fn compile(
        file: &QuotasFile,
        broken: &BTreeSet<String>,
        groups: &BTreeSet<String>,
        state: &QuotaState,
    ) -> (QuotaTable, Vec<FieldError>) {
        let mut errors = Vec::new();
        let groups: Vec<String> = groups.iter().cloned().collect();
        let group_ids = groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.clone(), i))
            .collect();
        for (section, entries) in [("plans", &file.plans), ("tenants", &file.tenants)] {
            for (name, e) in entries {
                let path = error::join(section, name);
                check_limits(&path, &e.limits, &mut errors);
                for (g, l) in &e.groups {
                    check_limits(
                        &error::join(&error::join(&path, "groups"), g),
                        l,
                        &mut errors,
                    );
                }
                if section == "plans" && e.plan.is_some() {
                    errors.push(FieldError::new(
                        error::join(&path, "plan"),
                        "a plan cannot name another plan",
                    ));
                }
            }
        }
        let plan_of = |path: String, name: &str, errors: &mut Vec<FieldError>| {
            let found = file.plans.get(name);
            if found.is_none() && !broken.contains(&error::join("plans", name)) {
                let known: Vec<&str> = file.plans.keys().map(String::as_str).collect();
                errors.push(FieldError::new(
                    path,
                    format!(
                        "unknown plan `{name}`; plans: {}",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
            found
        };
        let per_group = |plan: Option<&QuotaEntry>, tenant: Option<&QuotaEntry>| -> Vec<Compiled> {
            groups
                .iter()
                .map(|g| {
                    let mut l = Limits::default();
                    if let Some(p) = plan {
                        l = l.merged(&p.limits);
                        if let Some(o) = p.groups.get(g) {
                            l = l.merged(o);
                        }
                    }
                    if let Some(t) = tenant {
                        l = l.merged(&t.limits);
                        if let Some(o) = t.groups.get(g) {
                            l = l.merged(o);
                        }
                    }
                    Compiled::from_limits(&l)
                })
                .collect()
        };

        let default = match (&file.default_plan, file.unknown_tenants) {
            (_, UnknownTenants::Reject) => None,
            (Some(name), UnknownTenants::DefaultPlan) => {
                let plan = plan_of("default_plan".into(), name, &mut errors);
                Some(per_group(plan, None))
            }
            (None, UnknownTenants::DefaultPlan) => {
                if !file.tenants.is_empty() || !file.plans.is_empty() {
                    errors.push(FieldError::new(
                        "default_plan",
                        "name the plan of tenants not listed here, or say `unknown_tenants: reject`",
                    ));
                }
                Some(per_group(None, None))
            }
        };

        let mut tenants = HashMap::new();
        for (name, t) in &file.tenants {
            let path = error::join("tenants", name);
            if name.is_empty() || name.len() > 128 || !name.bytes().all(tenant_byte) {
                errors.push(FieldError::new(
                    path.clone(),
                    "a tenant name is 1-128 characters of letters, digits and `-_.:`",
                ));
            }
            let plan = match &t.plan {
                Some(p) => plan_of(error::join(&path, "plan"), p, &mut errors),
                None => file.default_plan.as_ref().and_then(|p| file.plans.get(p)),
            };
            tenants.insert(
                name.clone(),
                Listed {
                    limits: per_group(plan, Some(t)),
                    counters: groups.iter().map(|g| state.counters(name, g)).collect(),
                    metrics: vec![None; groups.len()],
                },
            );
        }
        if let Some(c) = &file.cluster {
            errors.extend(c.validate("cluster"));
        }
        let table = QuotaTable {
            other_metrics: vec![None; groups.len()],
            groups,
            group_ids,
            tenants,
            default,
            cluster: file.cluster.clone(),
            max_tenants: file.max_tenants,
        };
        (table, errors)
    }

    /// The group id of a route group name (every name a route uses has one).
    pub fn group_id(&self, name: &str) -> Option<usize> {
        self.group_ids.get(name).copied()
    }

    pub fn uses_cluster(&self) -> bool {
        self.tenants
            .values()
            .flat_map(|t| t.limits.iter())
            .chain(self.default.iter().flatten())
            .any(|c| c.cluster)
    }

    /// Resolves metric handles (once the config is accepted).
    pub fn attach_metrics(&mut self, vec: &prometheus::IntCounterVec) {
        let handles = |tenant: &str, group: &str| TenantMetrics {
            results: [
                "admitted",
                "rate_limited",
                "concurrency_limited",
                "websocket_limited",
            ]
            .map(|r| vec.with_label_values(&[tenant, group, r])),
        };
        for (name, t) in self.tenants.iter_mut() {
            for (g, m) in self.groups.iter().zip(t.metrics.iter_mut()) {
                *m = Some(handles(name, g));
            }
        }
        for (g, m) in self.groups.iter().zip(self.other_metrics.iter_mut()) {
            *m = Some(handles(OTHER_TENANTS, g));
        }
    }

    /// The limits and counters of `tenant` on `group`; None when unknown tenants are refused.
    pub fn resolve<'a>(
        &'a self,
        state: &QuotaState,
        tenant: &'a str,
        group: usize,
    ) -> Option<Resolved<'a>> {
        let group_name = self.groups[group].as_str();
        if let Some(t) = self.tenants.get(tenant) {
            return Some(Resolved {
                tenant,
                limits: &t.limits[group],
                counters: t.counters[group].clone(),
                metrics: t.metrics[group].as_ref(),
                group: group_name,
            });
        }
        let limits = &self.default.as_ref()?[group];
        Some(Resolved {
            tenant,
            limits,
            counters: state.unlisted(tenant, group_name, self.max_tenants),
            metrics: self.other_metrics[group].as_ref(),
            group: group_name,
        })
    }

    /// Gauges of listed tenants' requests and WebSockets in flight (at scrape time).
    pub fn in_flight(&self) -> impl Iterator<Item = (&str, &str, u32, u32)> {
        self.tenants.iter().flat_map(move |(name, t)| {
            t.counters
                .iter()
                .zip(self.groups.iter())
                .map(move |(c, g)| {
                    (
                        name.as_str(),
                        g.as_str(),
                        c.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                        c.websockets.load(std::sync::atomic::Ordering::Relaxed),
                    )
                })
        })
    }
}

fn tenant_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')
}

/// The tenant a request counts against, from where the route says. Client-sent values are
/// only read from the header or parameter the route names.
pub fn tenant_of<'a>(
    source: &TenantSource,
    req: &'a pingora_http::RequestHeader,
    identity: Option<&'a crate::policy::auth::Identity>,
    client_ip: Option<std::net::IpAddr>,
) -> Option<std::borrow::Cow<'a, str>> {
    use std::borrow::Cow;
    let value: Cow<'a, str> = match source {
        TenantSource::Consumer => Cow::Borrowed(identity?.tenant.as_deref()?),
        TenantSource::Claim(_) => Cow::Borrowed(identity?.claim.as_deref()?),
        TenantSource::Header(name) => Cow::Borrowed(req.headers.get(name.as_str())?.to_str().ok()?),
        TenantSource::Query(name) => crate::policy::auth::credential::query(req, name)?,
        TenantSource::Host { prefix, suffix } => {
            let host = crate::router::RequestHead::from_parts(req).host?;
            let host = host.split(':').next().unwrap_or(host);
            if host.len() <= prefix.len() + suffix.len()
                || !host.is_char_boundary(prefix.len())
                || !host.is_char_boundary(host.len() - suffix.len())
                || !host[..prefix.len()].eq_ignore_ascii_case(prefix)
                || !host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            {
                return None;
            }
            Cow::Owned(host[prefix.len()..host.len() - suffix.len()].to_ascii_lowercase())
        }
        TenantSource::ClientIp => Cow::Owned(client_ip?.to_string()),
    };
    sane_tenant(&value)?;
    Some(value)
}

/// A tenant value taken from a request: sane or nothing (it becomes a metric label, a Redis
/// key, a log field).
pub fn sane_tenant(v: &str) -> Option<&str> {
    (!v.is_empty() && v.len() <= 128 && v.bytes().all(tenant_byte)).then_some(v)
}

fn check_limits(path: &str, l: &Limits, errors: &mut Vec<FieldError>) {
    let zero = |field: &str, v: Option<u64>, errors: &mut Vec<FieldError>| {
        if v == Some(0) {
            errors.push(FieldError::new(
                error::join(path, field),
                "must be at least 1 (to refuse everything, use unknown_tenants: reject or remove the route)",
            ));
        }
    };
    zero("requests_per_second", l.requests_per_second, errors);
    zero("burst", l.burst, errors);
    zero("requests_per_minute", l.requests_per_minute, errors);
    zero("requests_per_hour", l.requests_per_hour, errors);
    zero("requests_per_day", l.requests_per_day, errors);
    zero(
        "request_body_bytes_per_second",
        l.request_body_bytes_per_second.map(|b| b.get()),
        errors,
    );
    if l.requests_per_second.is_some_and(|r| r > 1_000_000_000) {
        errors.push(FieldError::new(
            error::join(path, "requests_per_second"),
            "at most 1000000000",
        ));
    }
}

impl QuotaPolicy {
    pub fn compile(
        index: usize,
        q: &RouteQuota,
        has_auth: bool,
        table: &QuotaTable,
    ) -> Result<QuotaPolicy, Vec<FieldError>> {
        let path = error::join(&error::index("routes", index), "quota");
        let mut errors = Vec::new();
        if matches!(q.tenant, TenantSource::Consumer | TenantSource::Claim(_)) && !has_auth {
            errors.push(FieldError::new(
                error::join(&path, "tenant"),
                "the tenant comes from authentication: add `auth:` to this route",
            ));
        }
        let group = table.group_id(&q.group);
        if group.is_none() {
            errors.push(FieldError::new(
                path,
                "quotas need `include: { quotas: quotas.yaml }`",
            ));
        }
        match group {
            Some(group) if errors.is_empty() => Ok(QuotaPolicy {
                source: q.tenant.clone(),
                group,
                headers: q.headers,
            }),
            _ => Err(errors),
        }
    }
}

/// Counters that outlive reloads, by tenant and group: a sharded map, read-locked per lookup
/// of an unlisted tenant only (listed tenants' counters are resolved at compile time).
/// Tenant → group → counters.
type Shard = RwLock<HashMap<String, HashMap<String, Arc<Counters>>>>;

pub struct QuotaState {
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    tracked: std::sync::atomic::AtomicUsize,
    /// Shared by unlisted tenants that arrive while `max_tenants` are tracked.
    overflow: Arc<Counters>,
}

const SHARDS: usize = 64;

impl Default for QuotaState {
    fn default() -> Self {
        Self::new()
    }
}

impl QuotaState {
    pub fn new() -> Self {
        QuotaState {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: Default::default(),
            tracked: Default::default(),
            overflow: Default::default(),
        }
    }

    fn shard(&self, tenant: &str) -> &Shard {
        &self.shards[self.hasher.hash_one(tenant) as usize % SHARDS]
    }

    /// The counters of `tenant` on `group`, created on first use.
    pub fn counters(&self, tenant: &str, group: &str) -> Arc<Counters> {
        if let Some(c) = self
            .shard(tenant)
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .and_then(|g| g.get(group))
        {
            return c.clone();
        }
        let mut shard = self
            .shard(tenant)
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let groups = shard.entry(tenant.to_string()).or_insert_with(|| {
            self.tracked
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            HashMap::new()
        });
        groups
            .entry(group.to_string())
            .or_insert_with(|| Arc::new(Counters::default()))
            .clone()
    }

    fn unlisted(&self, tenant: &str, group: &str, max: usize) -> Arc<Counters> {
        let c = {
            let shard = self.shard(tenant).read().unwrap_or_else(|p| p.into_inner());
            shard.get(tenant).and_then(|g| g.get(group)).cloned()
        };
        let c = match c {
            Some(c) => c,
            None if self.tracked.load(std::sync::atomic::Ordering::Relaxed) >= max => {
                return self.overflow.clone();
            }
            None => self.counters(tenant, group),
        };
        c.last_used
            .store(now_ns(), std::sync::atomic::Ordering::Relaxed);
        c
    }

    /// Tenants tracked.
    pub fn len(&self) -> usize {
        self.tracked.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops counters that no longer matter (idle, and not held by the serving table).
    pub fn sweep(&self) {
        let (now, unix) = (now_ns(), unix_secs());
        for shard in self.shards.iter() {
            let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
            shard.retain(|_, groups| {
                // Held elsewhere (the serving table, a request in flight): keep.
                groups.retain(|_, c| Arc::strong_count(c) > 1 || !c.idle(now, unix));
                let keep = !groups.is_empty();
                if !keep {
                    self.tracked
                        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
                keep
            });
        }
    }
}

impl Resolved<'_> {
    /// Counts one request (or, with `websocket`, one new tunnel). On refusal nothing is kept.
    pub async fn admit(
        &self,
        cluster: &ClusterStore,
        websocket: bool,
    ) -> Result<Admission, QuotaRefusal> {
        let result = self.check(cluster, websocket).await;
        if let Some(m) = self.metrics {
            let i = match &result {
                Ok(_) => 0,
                Err(r) if r.code == "rate_limited" => 1,
                Err(r) if r.code == "concurrency_limited" => 2,
                Err(_) => 3,
            };
            m.results[i].inc();
        }
        result
    }

    async fn check(
        &self,
        cluster: &ClusterStore,
        websocket: bool,
    ) -> Result<Admission, QuotaRefusal> {
        let l = self.limits;
        let (now, unix) = (now_ns(), unix_secs());
        let mut tightest: Option<Remaining> = None;
        let mut keep = |r: Remaining| {
            if tightest.is_none_or(|t| r.remaining < t.remaining) {
                tightest = Some(r);
            }
        };
        let refuse = |retry_after: Duration, limit: u64, window: u64| QuotaRefusal {
            status: 429,
            code: "rate_limited",
            retry_after: retry_after.as_secs_f64().ceil().max(1.0) as u64,
            limit,
            window,
        };

        if l.cluster {
            // Fleet-wide fixed windows: 1 s for the per-second rate, then minute, hour, day;
            // a refusal by a later window gives back what the earlier ones took.
            let key = format!("{}:{}", self.tenant, self.group);
            let mut limits = [(Duration::ZERO, 0u64); 4];
            let mut n = 0;
            let windows = std::iter::once((1u64, l.per_second))
                .chain(WINDOWS.iter().copied().zip(l.windows.iter().copied()));
            for (secs, limit) in windows {
                if let Some(limit) = limit {
                    limits[n] = (Duration::from_secs(secs), limit);
                    n += 1;
                }
            }
            if n > 0 {
                if let Decision::Reject { retry_after } =
                    cluster.acquire_all(&key, &limits[..n]).await
                {
                    // Which window refused is not reported: name the tightest per-window
                    // budget for the headers.
                    let (window, limit) = limits[..n]
                        .iter()
                        .find(|(w, _)| *w >= retry_after)
                        .copied()
                        .unwrap_or(limits[n - 1]);
                    return Err(refuse(retry_after, limit, window.as_secs()));
                }
            }
        } else {
            if let Some(g) = l.rate {
                match self.counters.take_rate(g, now) {
                    Ok(r) => keep(r),
                    Err(r) => return Err(refuse(r.retry_after, g.tau / g.t + 1, 1)),
                }
            }
            for (w, limit) in l.windows.iter().enumerate() {
                let Some(limit) = *limit else { continue };
                match self.counters.take_window(w, limit, unix) {
                    Ok(r) => keep(r),
                    Err(r) => {
                        // Give back what the earlier limits took.
                        if let Some(g) = l.rate {
                            self.counters.untake_rate(g);
                        }
                        for earlier in 0..w {
                            if l.windows[earlier].is_some() {
                                self.counters.untake_window(earlier, unix);
                            }
                        }
                        return Err(refuse(r.retry_after, limit, WINDOWS[w]));
                    }
                }
            }
        }

        let cap = if websocket {
            l.websockets
        } else {
            l.concurrent
        };
        let slot = match cap {
            Some(cap) => match Slot::acquire(&self.counters, cap, websocket) {
                Some(s) => Some(s),
                None => {
                    return Err(QuotaRefusal {
                        status: 429,
                        code: if websocket {
                            "websocket_limited"
                        } else {
                            "concurrency_limited"
                        },
                        retry_after: 1,
                        limit: u64::from(cap),
                        window: 0,
                    })
                }
            },
            None => None,
        };
        Ok(Admission {
            slot,
            remaining: tightest,
            counters: self.counters.clone(),
            body: l.body,
        })
    }
}

/// The rate-limit answer headers for what is left (`RateLimit`/`RateLimit-Policy` of the IETF
/// httpapi draft, and the common `X-RateLimit-*`).
pub fn headers(r: &Remaining) -> [(&'static str, String); 5] {
    let name = window_name(r.window);
    [
        (
            "ratelimit-policy",
            format!("\"{name}\";q={};w={}", r.limit, r.window),
        ),
        (
            "ratelimit",
            format!("\"{name}\";r={};t={}", r.remaining, r.reset),
        ),
        ("x-ratelimit-limit", r.limit.to_string()),
        ("x-ratelimit-remaining", r.remaining.to_string()),
        ("x-ratelimit-reset", r.reset.to_string()),
    ]
}

pub fn window_name(secs: u64) -> &'static str {
    match secs {
        1 => "per-second",
        60 => "per-minute",
        3600 => "per-hour",
        86_400 => "per-day",
        _ => "concurrency",
    }
}

/// Sweeps idle counters of unlisted tenants now and then.
pub struct QuotaSweeper {
    pub state: Arc<QuotaState>,
}

#[async_trait::async_trait]
impl pingora_core::services::background::BackgroundService for QuotaSweeper {
    async fn start(&self, mut shutdown: pingora_core::server::ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => self.state.sweep(),
            }
        }
    }
}
