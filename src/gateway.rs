//! The process-wide state every request path shares, and the reload manager.
//!
//! `Gateway` owns the one `ArcSwap<Snapshot>` and the state that must outlive snapshots
//! (backend health registry, metrics, access log, WebSocket tunnel registry). A reload is
//! `load → compile → swap`; it is triggered by file changes, `SIGHUP`, or a direct call to
//! [`Gateway::reload`] (the admin API's entry point). An invalid config is refused whole and
//! the running snapshot keeps serving. A reload never touches a connection: requests finish on
//! the snapshot they started with and tunnels keep only their own upstream handle.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use crate::config::{self, Config, ConfigError};
use crate::observe::{AccessLog, Metrics};
use crate::policy::auth::jwks::JwksRegistry;
use crate::policy::auth::nonce::NonceStore;
use crate::policy::auth::ConsumerTable;
use crate::policy::flood::{self, FloodGuard};
use crate::policy::quota::cluster::ClusterStore;
use crate::policy::quota::{QuotaState, QuotaTable};
use crate::policy::verify::{Verdict, VerifyState};
use crate::snapshot::{self, Screen, Snapshot};
use crate::tunnel::TunnelRegistry;
use crate::upstream::Registry;

/// State that outlives snapshots, which compiling re-attaches to by stable keys.
#[derive(Default)]
pub struct Registries {
    /// Backend health and in-flight counts, by upstream and address.
    pub upstreams: Registry,
    /// JWKS fetched from URLs, by URL.
    pub jwks: Arc<JwksRegistry>,
    /// Quota counters, by tenant and route group.
    pub quotas: Arc<QuotaState>,
}

pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    pub registries: Registries,
    pub metrics: Metrics,
    pub access_log: AccessLog,
    pub tunnels: TunnelRegistry,
    /// HMAC nonces seen: replay protection survives reloads.
    pub nonces: NonceStore,
    /// Fleet-wide quota counting in Redis (configured by quotas.yaml `cluster:`).
    pub cluster: Arc<ClusterStore>,
    /// Flood protection's counting windows and blocks: they outlive reloads.
    pub flood: FloodGuard,
    /// Crawler verification's per-IP DNS cache and resolver: they outlive reloads.
    pub bot_verify: VerifyState,
    config_path: PathBuf,
    /// The config this process started with: listeners, admin and server settings are bound at
    /// start and only change through a binary upgrade.
    boot: Config,
    state: Mutex<ReloadState>,
}

struct ReloadState {
    /// The last config that compiled (for change detection of non-hot settings).
    applied: Config,
    pending_upgrade: Vec<String>,
    last_error: Option<Vec<ConfigError>>,
    last_reload: Option<SystemTime>,
}

/// What [`Gateway::screen`] decided about a request.
#[derive(Debug, Default)]
pub struct Screening {
    pub refusal: Option<crate::respond::Reject>,
    /// For the access log: `bot:sqlmap`, `ip:deny`, `rule:a,rule:b`.
    pub found: Option<String>,
    /// `X-Tollgate-Tags` for the upstream.
    pub tags: Option<String>,
    /// The User-Agent claims verifiable crawler N and nothing was decided yet: verify it by
    /// DNS and screen again with the verdict ([`Gateway::screen_verified`] does both).
    pub verify: Option<usize>,
}

/// Adds what a later screening step found (the WAF after bots, say) to the access log's
/// `screened` list.
pub fn add_found(screened: &mut Option<String>, found: Option<String>) {
    if let Some(found) = found {
        *screened = Some(match screened.take() {
            Some(s) => format!("{s},{found}"),
            None => found,
        });
    }
}

/// What `/status` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub generation: u64,
    pub config_path: String,
    pub last_error: Option<Vec<ConfigError>>,
    pub last_reload: Option<String>,
    pub websocket_tunnels: usize,
    /// Settings that changed in the file but wait for a binary upgrade.
    pub pending_upgrade: Vec<String>,
    pub pid: u32,
    pub draining: bool,
    /// What this process bound at start (listeners, admin, server).
    pub bound: config::Bound,
    /// JWKS URLs in use: keys loaded, last success, failures.
    pub jwks: Vec<crate::policy::auth::jwks::JwksStatus>,
    /// HMAC nonces remembered (replay protection).
    pub hmac_nonces: usize,
}

/// Loads and compiles the config file and the files it includes: what start, reload and
/// `tollgate check` all do. Reports every error of every stage at once, in file order: a
/// section that fails to parse does not hide the cross-reference and compile errors of the rest.
pub fn build(
    path: &Path,
    registries: &Registries,
    metrics: &Metrics,
    generation: u64,
) -> Result<(config::Loaded, Snapshot), Vec<ConfigError>> {
    let (loaded, mut errors) = config::load_lenient(path)?;
    let mut files = Vec::new();
    let consumers = match &loaded.config.include.consumers {
        None => Some(Arc::new(ConsumerTable::default())),
        Some(rel) => included_file(
            path,
            rel,
            "include.consumers",
            &loaded,
            &mut files,
            &mut errors,
        )
        .and_then(|p| consumer_table(&p, &registries.jwks, &mut files, &mut errors)),
    };
    let quotas = match &loaded.config.include.quotas {
        None => Some(QuotaTable::default()),
        Some(rel) => included_file(
            path,
            rel,
            "include.quotas",
            &loaded,
            &mut files,
            &mut errors,
        )
        .and_then(|p| quota_table(&p, &loaded.config, &registries.quotas, &mut errors)),
    };
    let waf = compile_waf(path, &loaded, &mut files, &mut errors);
    let (listeners, tls_errors) = crate::tls::compile(&loaded.config.listeners);
    errors.extend(loaded.locate(&tls_errors));
    files.extend(crate::tls::files(&loaded.config.listeners));
    // Errors so far (parse errors, included files, certificates) refuse the config; compiling
    // still runs to report its own, but must not register metric series for a refused config.
    let refused = !errors.is_empty();
    match snapshot::compile(
        &loaded.config,
        consumers,
        quotas,
        refused,
        &registries.upstreams,
        metrics,
        generation,
    ) {
        Ok(mut snap) if errors.is_empty() => {
            snap.files = files;
            snap.listeners = listeners;
            snap.waf = waf;
            return Ok((loaded, snap));
        }
        Ok(_) => {}
        Err(compile_errors) => errors.extend(loaded.locate(&compile_errors)),
    }
    let main = loaded.source.file.clone();
    errors.sort_by(|a, b| {
        (a.file != main, &a.file, a.line, a.column).cmp(&(
            b.file != main,
            &b.file,
            b.line,
            b.column,
        ))
    });
    errors.dedup();
    Err(errors)
}

/// The WAF of a config: its rule files join the watched files; errors in them are located in
/// the rule file (`file:line`), errors of the settings at their YAML field.
fn compile_waf(
    path: &Path,
    loaded: &config::Loaded,
    files: &mut Vec<PathBuf>,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<crate::waf::Waf>> {
    let cfg = &loaded.config;
    let routes: Vec<_> = cfg.routes.iter().map(|r| r.waf.clone()).collect();
    let base = path.parent().unwrap_or(Path::new("."));
    match crate::waf::compile(&cfg.waf, &routes, base) {
        Ok(waf) => {
            let waf = waf.map(Arc::new);
            if let Some(w) = &waf {
                files.extend(w.ruleset.files.iter().cloned());
            }
            waf
        }
        Err(e) => {
            errors.extend(loaded.locate(&e.fields));
            errors.extend(e.rules.into_iter().map(|r| ConfigError {
                file: r.file.display().to_string(),
                line: r.line,
                column: usize::from(r.line > 0),
                path: "waf.rules".into(),
                message: r.message,
            }));
            None
        }
    }
}

/// Refusals for a reload that would turn TLS on or off on a socket this process bound: the
/// socket keeps speaking what it spoke at start until a binary upgrade, so such a file cannot
/// be served by reload (address changes and new listeners only wait for the upgrade).
fn tls_switches(boot: &[config::Listener], new: &[config::Listener]) -> Vec<config::FieldError> {
    let note = "that needs a binary upgrade (tollgate upgrade); nothing was reloaded";
    let mut out = Vec::new();
    for b in boot {
        match new.iter().position(|n| n.address == b.address) {
            Some(j) if new[j].tls.is_some() != b.tls.is_some() => {
                out.push(config::FieldError::new(
                    config::error::index("listeners", j),
                    format!(
                        "listener `{}` on {} was started {}; turning TLS {} {note}",
                        b.name,
                        b.address,
                        if b.tls.is_some() { "with TLS" } else { "without TLS" },
                        if b.tls.is_some() { "off" } else { "on" },
                    ),
                ));
            }
            None if b.tls.is_some() => out.push(config::FieldError::new(
                "listeners",
                format!(
                    "the TLS listener `{}` on {} is gone from the file, but its socket stays open until an upgrade and needs its certificates; {note}",
                    b.name, b.address
                ),
            )),
            _ => {}
        }
    }
    out
}

/// Publishes the expiry of every served certificate, and says in the log which expire soon.
fn publish_certificates(metrics: &Metrics, snap: &Snapshot) {
    const SOON: i64 = 30 * 24 * 3600;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    metrics.tls_cert_not_after.reset();
    for tls in snap.listeners.iter().filter_map(|l| l.tls.as_ref()) {
        for c in &tls.certificates {
            let name = c.names.first().map_or("", String::as_str);
            metrics
                .tls_cert_not_after
                .with_label_values(&[&c.listener, &c.file, name])
                .set(c.not_after);
            let left = c.not_after - now;
            if left <= 0 {
                tracing::error!(listener = %c.listener, file = %c.file, names = ?c.names, "certificate has expired; clients will refuse it");
            } else if left < SOON {
                tracing::warn!(listener = %c.listener, file = %c.file, names = ?c.names, days_left = left / 86400, "certificate expires soon");
            }
        }
    }
}

/// The path of an included file, which is watched from now on; None (and an error at the
/// line that names it) when it cannot be read.
fn included_file(
    config_path: &Path,
    rel: &str,
    field: &str,
    loaded: &config::Loaded,
    files: &mut Vec<PathBuf>,
    errors: &mut Vec<ConfigError>,
) -> Option<PathBuf> {
    let path = included(config_path, rel);
    files.push(path.clone());
    match std::fs::metadata(&path) {
        Ok(_) => Some(path),
        Err(e) => {
            errors.extend(loaded.locate(&[config::FieldError::new(
                field,
                format!("cannot read `{}`: {e}", path.display()),
            )]));
            None
        }
    }
}

/// Loads and compiles quotas.yaml for the route groups the config's routes use.
fn quota_table(
    path: &Path,
    cfg: &Config,
    state: &QuotaState,
    errors: &mut Vec<ConfigError>,
) -> Option<QuotaTable> {
    let (loaded, broken, parse_errors) = match config::load_quotas(path) {
        Ok(x) => x,
        Err(e) => {
            errors.extend(e);
            return None;
        }
    };
    errors.extend(parse_errors);
    let groups = cfg
        .routes
        .iter()
        .filter_map(|r| r.quota.as_ref().map(|q| q.group.clone()))
        .chain(std::iter::once(config::default_group()))
        .collect();
    let (table, compile_errors) = QuotaTable::compile(&loaded.file, &broken, &groups, state);
    errors.extend(loaded.locate(&compile_errors));
    Some(table)
}

/// A path named in the config, relative to the config file's directory.
fn included(config_path: &Path, rel: &str) -> PathBuf {
    let rel = Path::new(rel);
    match config_path.parent() {
        Some(dir) if rel.is_relative() => dir.join(rel),
        _ => rel.to_path_buf(),
    }
}

/// Loads and compiles consumers.yaml. The table comes back even when the file has errors
/// (they go to `errors`), so that routes' references to it can still be checked.
fn consumer_table(
    path: &Path,
    jwks: &JwksRegistry,
    files: &mut Vec<PathBuf>,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<ConsumerTable>> {
    let (loaded, broken, parse_errors) = match config::load_consumers(path) {
        Ok(x) => x,
        Err(e) => {
            errors.extend(e);
            return None;
        }
    };
    errors.extend(parse_errors);
    let base = path.parent().unwrap_or(Path::new("."));
    let (table, compile_errors) = ConsumerTable::compile(&loaded.file, &broken, base, jwks);
    files.extend(table.files.iter().cloned());
    errors.extend(loaded.locate(&compile_errors));
    Some(Arc::new(table))
}

impl Gateway {
    /// Loads and compiles the config file into the first snapshot.
    pub fn start(config_path: &Path) -> Result<Arc<Gateway>, Vec<ConfigError>> {
        let metrics = Metrics::new();
        let registries = Registries::default();
        let (loaded, snap) = build(config_path, &registries, &metrics, 1)?;
        let cluster = ClusterStore::new();
        cluster.configure(snap.quotas.cluster.as_ref());
        let access_log = AccessLog::start(
            &loaded.config.access_log,
            metrics.access_log_dropped.clone(),
        )
        .map_err(|e| {
            vec![ConfigError {
                file: loaded.source.file.clone(),
                line: 0,
                column: 0,
                path: "access_log.path".into(),
                message: format!("cannot open `{}`: {e}", loaded.config.access_log.path),
            }]
        })?;
        metrics.generation.set(1);
        publish_certificates(&metrics, &snap);
        let tunnels = TunnelRegistry::new(metrics.tunnels_active.clone());
        Ok(Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(snap),
            registries,
            cluster,
            flood: FloodGuard::new(),
            bot_verify: VerifyState::new(metrics.bot_verifications.clone()),
            metrics,
            access_log,
            tunnels,
            nonces: NonceStore::new(
                loaded.config.auth.nonce_capacity,
                2 * config::MAX_HMAC_CLOCK_SKEW.get(),
            ),
            config_path: config_path.to_path_buf(),
            boot: loaded.config.clone(),
            state: Mutex::new(ReloadState {
                applied: loaded.config,
                pending_upgrade: Vec::new(),
                last_error: None,
                last_reload: None,
            }),
        }))
    }

    /// The snapshot to serve one request with: one atomic load. Keep it for the whole request.
    #[inline]
    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// What the connection loop needs before a request has a snapshot of its own: the
    /// request-hygiene limits and `drain.idle_grace`, from one guard load (no reference count
    /// taken; the request itself then takes the snapshot in `proxy`).
    #[inline]
    pub fn connection_settings(&self) -> (config::HttpSettings, std::time::Duration) {
        let snap = self.snapshot.load();
        (snap.http.clone(), snap.drain_idle_grace)
    }

    /// The `drain` settings of the config now in force (read when a drain starts).
    pub fn drain_settings(&self) -> config::Drain {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .applied
            .drain
            .clone()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The config the process started with (listeners, admin, server settings).
    pub fn boot_config(&self) -> &Config {
        &self.boot
    }

    /// Re-reads the config file and swaps in the new snapshot. On error the running snapshot
    /// stays and the errors are kept for `/status`. Returns the new generation.
    pub fn reload(&self) -> Result<u64, Vec<ConfigError>> {
        let started = Instant::now();
        // One reload at a time; requests never take this lock.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let generation = self.snapshot.load().generation + 1;
        let result = build(
            &self.config_path,
            &self.registries,
            &self.metrics,
            generation,
        )
        .and_then(|(loaded, snap)| {
            let errors = loaded.locate(&tls_switches(
                &self.boot.listeners,
                &loaded.config.listeners,
            ));
            if errors.is_empty() {
                Ok((loaded, snap))
            } else {
                Err(errors)
            }
        });
        state.last_reload = Some(SystemTime::now());
        match result {
            Ok((loaded, snap)) => {
                let pending =
                    config::Bound::of(&self.boot).changes(&config::Bound::of(&loaded.config));
                for warning in &pending {
                    tracing::warn!("{}: {warning}", self.config_path.display());
                }
                state.pending_upgrade = pending;
                if loaded.config.access_log != state.applied.access_log {
                    self.access_log.reconfigure(&loaded.config.access_log);
                }
                let snap = Arc::new(snap);
                self.snapshot.store(snap.clone());
                self.registries.upstreams.retain(&snap.upstreams);
                self.cluster.configure(snap.quotas.cluster.as_ref());
                publish_certificates(&self.metrics, &snap);
                state.applied = loaded.config;
                state.last_error = None;
                self.metrics.generation.set(generation as i64);
                self.metrics.reloads.with_label_values(&["ok"]).inc();
                tracing::info!(
                    generation,
                    routes = snap.router.routes().len(),
                    upstreams = snap.upstreams.len(),
                    took_ms = started.elapsed().as_secs_f64() * 1e3,
                    "config reloaded"
                );
                Ok(generation)
            }
            Err(errors) => {
                self.metrics.reloads.with_label_values(&["error"]).inc();
                for e in &errors {
                    tracing::error!(
                        "config reload refused, still serving generation {}: {e}",
                        generation - 1
                    );
                }
                state.last_error = Some(errors.clone());
                Err(errors)
            }
        }
    }

    pub fn status(&self) -> Status {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Status {
            generation: self.snapshot.load().generation,
            config_path: self.config_path.display().to_string(),
            last_error: state.last_error.clone(),
            last_reload: state
                .last_reload
                .map(|t| humantime::format_rfc3339_millis(t).to_string()),
            websocket_tunnels: self.tunnels.len(),
            pending_upgrade: state.pending_upgrade.clone(),
            pid: std::process::id(),
            draining: self.metrics.draining.get() > 0,
            bound: config::Bound::of(&self.boot),
            jwks: self.registries.jwks.statuses(),
            hmac_nonces: self.nonces.len(),
        }
    }

    /// Counts a request (or, with `websocket`, a new tunnel) against the quota of the tenant
    /// the route's policy finds in it. The admission holds the concurrency slot. The tenant
    /// comes back with a refusal too (for the access log), when there was one.
    pub async fn admit_quota(
        &self,
        snap: &Snapshot,
        policy: &crate::policy::quota::QuotaPolicy,
        req: &pingora_http::RequestHeader,
        identity: Option<&crate::policy::auth::Identity>,
        client_ip: Option<std::net::IpAddr>,
        websocket: bool,
    ) -> (
        Option<String>,
        Result<crate::policy::quota::Admission, crate::respond::QuotaRefusal>,
    ) {
        use crate::policy::quota;
        let refuse = |code| crate::respond::QuotaRefusal {
            status: 403,
            code,
            retry_after: 0,
            limit: 0,
            window: 0,
        };
        let Some(tenant) = quota::tenant_of(&policy.source, req, identity, client_ip) else {
            return (None, Err(refuse("tenant_missing")));
        };
        let admission = match snap
            .quotas
            .resolve(&self.registries.quotas, &tenant, policy.group)
        {
            Some(resolved) => resolved.admit(&self.cluster, websocket).await,
            None => Err(refuse("unknown_tenant")),
        };
        (Some(tenant.into_owned()), admission)
    }

    /// With a cluster store configured (quotas.yaml `cluster:`), an HMAC nonce the local store
    /// accepted is checked once more fleet-wide, so a request replayed to another gateway (or
    /// to this one after a binary upgrade) is refused too. Without an answer from Redis the
    /// local check stands.
    pub async fn fleet_nonce_check(
        &self,
        policy: &crate::policy::auth::RoutePolicy,
        identity: &crate::policy::auth::Identity,
        req: &pingora_http::RequestHeader,
    ) -> Result<(), crate::respond::AuthFailure> {
        let Some((key, ttl)) = policy.fleet_nonce(identity, req) else {
            return Ok(());
        };
        match self.cluster.first_seen(&key, ttl).await {
            Some(false) => Err(policy.nonce_replayed()),
            _ => Ok(()),
        }
    }

    /// [`Self::screen`], with the DNS verification of a claimed crawler in between: the async
    /// step of screening, which only requests whose User-Agent claims a verifiable crawler
    /// take (at most `bots.verify_timeout`, usually a cache hit). Runs right after routing.
    pub async fn screen_verified(
        &self,
        snap: &Snapshot,
        index: usize,
        client: Option<std::net::IpAddr>,
        req: &pingora_http::RequestHeader,
    ) -> Screening {
        let first = self.screen(snap, index, client, req, None);
        let (Some(crawler), Some(ip)) = (first.verify, client) else {
            return first;
        };
        let verdict = self.bot_verify.verify(&snap.bots.verify, crawler, ip).await;
        self.screen(snap, index, client, req, Some((crawler, verdict)))
    }

    /// IP rules, bot detection and custom rules for a request on route `index`: the refusal
    /// to answer, if any, what was found for the access log (`bot:sqlmap`, `ip:deny`,
    /// `rule:ID`, `bot:googlebot:verified`), and the tags for the upstream. Detect mode and
    /// `log` rules find without refusing. Counted per route, category, rule and action.
    /// Allocates only on a finding. `verdict`: what DNS said about the crawler a previous call
    /// asked to verify (`Screening::verify`); with None such a call stops there.
    pub fn screen(
        &self,
        snap: &Snapshot,
        index: usize,
        client: Option<std::net::IpAddr>,
        req: &pingora_http::RequestHeader,
        verdict: Option<(usize, Verdict)>,
    ) -> Screening {
        let route = snap.router.routes()[index].name.as_str();
        let count = |category: &str, rule: &str, action: &str| {
            self.metrics
                .screened
                .with_label_values(&[route, category, rule, action])
                .inc()
        };
        let mut out = Screening::default();
        let mut found: Vec<String> = Vec::new();
        if let Some((crawler, v @ (Verdict::Verified | Verdict::Error))) = verdict {
            let name = &snap.bots.verify.crawlers[crawler].name;
            let what = if v == Verdict::Verified {
                "verified"
            } else {
                "unverified"
            };
            found.push(format!("bot:{name}:{what}"));
        }
        match snap.screen(index, client, &req.headers, verdict) {
            Screen::Verify(crawler) => {
                out.verify = Some(crawler);
                return out;
            }
            Screen::Hit(s) => {
                count(
                    s.category,
                    s.rule,
                    if s.detect_only { "detected" } else { "blocked" },
                );
                found.push(format!("{}:{}", s.category, s.rule));
                if !s.detect_only {
                    out.refusal = Some(crate::respond::Reject::Forbidden(s.code));
                    out.found = Some(found.join(","));
                    return out;
                }
            }
            Screen::Pass => {}
        }
        let head = crate::router::RequestHead::from_parts(req);
        let verdict = snap.evaluate_rules(index, &head, client, None);
        self.rules_outcome(route, &verdict, out, found)
    }

    /// The custom rules with a `body` condition, on the body read for route `index` (after
    /// the WAF; see `policy::rules`).
    pub fn screen_body(
        &self,
        snap: &Snapshot,
        index: usize,
        client: Option<std::net::IpAddr>,
        req: &pingora_http::RequestHeader,
        body: &[u8],
    ) -> Screening {
        let route = snap.router.routes()[index].name.as_str();
        let head = crate::router::RequestHead::from_parts(req);
        let verdict = snap.evaluate_rules(index, &head, client, Some(body));
        self.rules_outcome(route, &verdict, Screening::default(), Vec::new())
    }

    /// Counts what custom rules found and turns it into the refusal, findings and tags.
    fn rules_outcome(
        &self,
        route: &str,
        verdict: &crate::policy::rules::Verdict<'_>,
        mut out: Screening,
        mut found: Vec<String>,
    ) -> Screening {
        let count = |rule: &str, action: &str| {
            self.metrics
                .screened
                .with_label_values(&[route, "rule", rule, action])
                .inc()
        };
        for id in &verdict.matched {
            count(id, "matched");
            found.push(format!("rule:{id}"));
        }
        if let Some(id) = verdict.blocked_by {
            count(id, "blocked");
            found.push(format!("rule:{id}"));
            out.refusal = Some(crate::respond::Reject::Forbidden("blocked_by_rule"));
        }
        if !found.is_empty() {
            out.found = Some(found.join(","));
        }
        if !verdict.tags.is_empty() {
            out.tags = Some(verdict.tags.join(", "));
        }
        out
    }

    /// The WAF's verdict on a request on route `index` (after bots and flood protection).
    /// Every matched rule is counted (`category="waf"`, action `blocked`, `detected` or
    /// `matched` below the threshold) and the request is logged with the rule ids and the
    /// matched data (truncated, secret-looking names masked).
    #[allow(clippy::too_many_arguments)]
    pub fn inspect_waf(
        &self,
        snap: &Snapshot,
        index: usize,
        route_waf: &crate::waf::RouteWaf,
        req: &pingora_http::RequestHeader,
        client: Option<std::net::IpAddr>,
        request_id: &str,
        body: Option<&[u8]>,
    ) -> Screening {
        let Some(waf) = snap.waf.as_deref() else {
            return Screening::default();
        };
        let remote = client.map(|ip| ip.to_string()).unwrap_or_default();
        let head = crate::waf::Head {
            method: req.method.as_str(),
            target: req.uri.path_and_query().map_or("/", |p| p.as_str()),
            protocol: match req.version {
                http::Version::HTTP_2 => "HTTP/2.0",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            headers: &req.headers,
            authority: req.uri.authority().map(|a| a.as_str()),
            remote_addr: &remote,
            unique_id: request_id,
        };
        let outcome = waf.inspect(route_waf, &head, body);
        if outcome.findings.is_empty() {
            return Screening::default();
        }
        let route = snap.router.routes()[index].name.as_str();
        let action = if outcome.blocked_by.is_some() {
            "blocked"
        } else if outcome.would_block.is_some() {
            "detected"
        } else {
            "matched"
        };
        let mut ids: Vec<String> = Vec::new();
        let mut details = String::new();
        for f in &outcome.findings {
            let id = f.id.to_string();
            if !ids.contains(&id) {
                self.metrics
                    .screened
                    .with_label_values(&[route, "waf", &id, action])
                    .inc();
                ids.push(id);
            }
            if !details.is_empty() {
                details.push_str("; ");
            }
            let _ = std::fmt::Write::write_fmt(
                &mut details,
                format_args!("{} {}={:?} ({})", f.id, f.var, f.data, f.msg),
            );
        }
        // Matches under the threshold are routine (CRS scores a numeric Host, for one).
        if action == "matched" {
            tracing::info!(target: "waf", request_id, route, action, score = outcome.score, "waf {action}: {details}");
        } else {
            tracing::warn!(target: "waf", request_id, route, action, score = outcome.score, "waf {action}: {details}");
        }
        Screening {
            refusal: outcome
                .blocked_by
                .map(|_| crate::respond::Reject::Forbidden("waf_blocked")),
            found: Some(format!("waf:{}", ids.join(","))),
            ..Screening::default()
        }
    }

    /// Flood protection for one request from `ip` on the route with `flood_id`: Some(refusal)
    /// when the IP is blocked. A new block is logged once and counted.
    pub fn flood_check(
        &self,
        snap: &Snapshot,
        ip: Option<std::net::IpAddr>,
        flood_id: u64,
    ) -> Option<crate::respond::QuotaRefusal> {
        let ip = ip?;
        match self
            .flood
            .check(&snap.flood, ip, Some(flood_id), Instant::now())
        {
            flood::Verdict::Allow => None,
            flood::Verdict::Blocked { retry_after, newly } => {
                if newly {
                    self.metrics.flood_blocks.inc();
                    tracing::warn!(
                        %ip,
                        block_secs = retry_after.as_secs(),
                        "flood protection: client blocked"
                    );
                }
                self.metrics.flood_refused.inc();
                Some(crate::respond::QuotaRefusal {
                    status: 429,
                    code: "flood_blocked",
                    retry_after: retry_after.as_secs_f64().ceil().max(1.0) as u64,
                    limit: 0,
                    window: 0,
                })
            }
        }
    }

    /// Refreshes the gauges that mirror backend and quota state (called when metrics are scraped).
    pub fn refresh_backend_metrics(&self) {
        let snap = self.current();
        self.metrics.quota_in_flight.reset();
        for (tenant, group, requests, websockets) in snap.quotas.in_flight() {
            for (kind, n) in [("request", requests), ("websocket", websockets)] {
                self.metrics
                    .quota_in_flight
                    .with_label_values(&[tenant, group, kind])
                    .set(i64::from(n));
            }
        }
        self.flood.sweep(Instant::now());
        self.metrics
            .bot_verify_cached
            .set(self.bot_verify.len() as i64);
        self.metrics
            .flood_blocked_ips
            .set(self.flood.blocked_len() as i64);
        self.metrics.quota_store_up.set(i64::from(
            snap.quotas.cluster.is_none() || self.cluster.up(),
        ));
        self.metrics.backend_healthy.reset();
        self.metrics.backend_inflight.reset();
        for u in &snap.upstreams {
            for b in u.backend_states() {
                self.metrics
                    .backend_healthy
                    .with_label_values(&[&u.name, b.address])
                    .set((b.healthy && !b.ejected) as i64);
                self.metrics
                    .backend_inflight
                    .with_label_values(&[&u.name, b.address])
                    .set(b.in_flight as i64);
            }
        }
    }
}

/// Reloads on `SIGHUP` and, when `reload.watch` is on, when the config file changes. On
/// `SIGUSR2` starts a binary upgrade from inside the process (so that under systemd the new
/// process is part of the service): runs `BINARY upgrade -c CONFIG`, where BINARY is the path
/// this process was started from, which after a package upgrade holds the new binary.
pub struct ConfigWatcher {
    pub gateway: Arc<Gateway>,
    pub binary: PathBuf,
}

/// The next delivery of a signal; never, if listening for it could not be set up.
async fn next_signal(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal.as_mut() {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

#[derive(PartialEq, Eq, Clone, Copy)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    // Follow symlinks: a swapped symlink (e.g. a mounted ConfigMap) is a change.
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

impl ConfigWatcher {
    fn start_upgrade(&self) {
        tracing::info!(binary = %self.binary.display(), "SIGUSR2: starting a binary upgrade");
        let spawned = std::process::Command::new(&self.binary)
            .arg("upgrade")
            .arg("-c")
            .arg(self.gateway.config_path())
            .stdin(std::process::Stdio::null())
            .spawn();
        match spawned {
            // Reap it when it ends so it does not linger as a zombie; its output goes to our
            // stdout/stderr (the journal under systemd).
            Ok(mut child) => {
                std::thread::spawn(move || match child.wait() {
                    Ok(s) if s.success() => tracing::info!("binary upgrade finished"),
                    Ok(s) => {
                        tracing::error!("binary upgrade failed ({s}); this process keeps serving")
                    }
                    Err(e) => tracing::error!("binary upgrade: {e}"),
                });
            }
            Err(e) => tracing::error!("cannot start {} upgrade: {e}", self.binary.display()),
        }
    }

    /// Stamps of the config file and of every file the serving snapshot was read from.
    fn stamps(&self) -> Vec<(PathBuf, Option<FileStamp>)> {
        let snap = self.gateway.current();
        std::iter::once(self.gateway.config_path())
            .chain(snap.files.iter().map(PathBuf::as_path))
            .map(|p| (p.to_path_buf(), stamp(p)))
            .collect()
    }

    async fn reload(&self, why: &str) {
        tracing::info!("reloading config ({why})");
        let gw = self.gateway.clone();
        // Compiling can take a while for big configs and resolves host names: keep it off the
        // async workers.
        let _ = tokio::task::spawn_blocking(move || gw.reload()).await;
    }
}

#[async_trait]
impl BackgroundService for ConfigWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP: {e}");
                None
            }
        };
        let mut usr2 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2()).ok();
        let mut last = self.stamps();
        loop {
            let (watch, interval) = {
                let s = self.gateway.state.lock().unwrap_or_else(|p| p.into_inner());
                (
                    s.applied.reload.watch,
                    s.applied.reload.watch_interval.get(),
                )
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = next_signal(&mut hangup) => {
                    last = self.stamps();
                    self.reload("SIGHUP").await;
                }
                _ = next_signal(&mut usr2) => {
                    self.start_upgrade();
                }
                _ = tokio::time::sleep(interval) => {
                    if !watch {
                        continue;
                    }
                    let now = self.stamps();
                    if now[0].1.is_some() && now != last {
                        // Let a writer finish: reload once the files have been still for a moment.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if self.stamps() != now {
                            continue;
                        }
                        self.reload("file changed").await;
                        // Compare the next round with what this reload read, so a file written
                        // while it ran is seen; unless the reload changed which files are
                        // included, then with the new set.
                        let after = self.stamps();
                        let same_files = after.iter().map(|(p, _)| p).eq(now.iter().map(|(p, _)| p));
                        last = if same_files { now } else { after };
                    }
                }
            }
        }
    }
}
