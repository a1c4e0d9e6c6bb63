//! A `Snapshot` is the whole request-time view of one config generation: the router, the
//! upstream table, per-route bindings (which upstream, which backend subset per canary rule) and
//! the request-hygiene settings. It is immutable; a reload builds a new one and swaps it whole.
//!
//! Compiling is a pure function of the config plus the long-lived registries it re-attaches to
//! (backend health by upstream+address, metric handles by route name). It never mutates what
//! the running snapshot uses, so a refused config changes nothing.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{error, Config, FieldError, HttpSettings};
use crate::observe::{metrics::NO_ROUTE, Metrics, RouteMetrics};
use crate::policy::auth::{ConsumerTable, IdentityHeaders, RoutePolicy};
use crate::policy::bot::{BotDetector, BotMode};
use crate::policy::client_ip::ClientIpPolicy;
use crate::policy::flood::FloodPolicy;
use crate::policy::ip_rules::{IpRules, IpVerdict};
use crate::policy::quota::{QuotaPolicy, QuotaTable};
use crate::policy::rules::CustomRules;
use crate::policy::verify::Verdict;
use crate::router::{Action, Router};
use crate::upstream::{Registry, SubsetId, Upstream};

pub struct Snapshot {
    /// Counts successful loads since the process started (1 = the config it started with).
    pub generation: u64,
    pub router: Router,
    /// Indexed like `router.routes()`.
    pub bindings: Vec<Binding>,
    pub upstreams: Vec<Arc<Upstream>>,
    pub http: HttpSettings,
    /// How long an idle kept-alive connection may still send a request once draining.
    pub drain_idle_grace: std::time::Duration,
    /// Metrics of requests that matched no route.
    pub unrouted: RouteMetrics,
    /// Consumers and credentials from consumers.yaml (empty without one).
    pub consumers: Arc<ConsumerTable>,
    /// Identity headers set for upstreams, removed from every client request.
    pub identity_headers: IdentityHeaders,
    /// Who the client is (trusted proxies) and the flood thresholds.
    pub client_ip: ClientIpPolicy,
    pub flood: FloodPolicy,
    /// Bot detection (`bots:`); each route's mode is in its binding.
    pub bots: BotDetector,
    /// Custom rules (`rules:`).
    pub rules: CustomRules,
    /// The WAF, when a route runs it (compiled by `gateway::build`, after the rest).
    pub waf: Option<Arc<crate::waf::Waf>>,
    /// Tenant quotas from quotas.yaml (empty without one).
    pub quotas: Arc<QuotaTable>,
    /// Files besides the main config this snapshot was read from (watched for changes).
    pub files: Vec<std::path::PathBuf>,
    /// How each listener serves (TLS certificates, h2c, https redirect, HSTS), config order.
    pub listeners: Vec<crate::tls::ListenerPolicy>,
}

/// What a route is wired to in this generation.
pub struct Binding {
    /// Index into `Snapshot::upstreams` for proxy routes.
    pub upstream: Option<usize>,
    /// One backend subset per split target (`route.split.targets()`), same order.
    pub subsets: Vec<SubsetId>,
    pub metrics: RouteMetrics,
    /// The route's authentication policy, if it has one.
    pub auth: Option<RoutePolicy>,
    /// The route's tenant quota, if it has one.
    pub quota: Option<QuotaPolicy>,
    /// A stable id of the route (a hash of its name) for per-route flood counting: blocks
    /// survive reloads that reorder routes.
    pub flood_id: u64,
    /// The global IP lists merged with the route's.
    pub ip_rules: IpRules,
    /// `bots.mode`, or the route's own.
    pub bot_mode: BotMode,
    /// The custom rules apply (`routes[].rules`).
    pub rules: bool,
    /// Screening refusals answer with an HTML page (`routes[].block_page: html`).
    pub block_page_html: bool,
}

/// The refusal code of a request that must pass the browser challenge first.
pub const CHALLENGE_REQUIRED: &str = "challenge_required";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A request the IP rules or bot detection refuse (or, in `detect` mode, would refuse).
#[derive(Debug, Clone, Copy)]
pub struct Screened<'a> {
    /// `ip_denied`, `ip_not_allowed`, `bot_blocked` or `bot_fake`.
    pub code: &'static str,
    /// `ip` or `bot`.
    pub category: &'static str,
    /// The bot rule (`sqlmap`, `deny[0]`, `empty`, `googlebot:fake`) or the IP list (`deny`,
    /// `allow`).
    pub rule: &'a str,
    /// `bots.mode: detect`: log and count, let it pass.
    pub detect_only: bool,
}

/// What [`Snapshot::screen`] found.
#[derive(Debug, Clone, Copy)]
pub enum Screen<'a> {
    /// Nothing objects.
    Pass,
    /// Refused (or, in detect mode, found).
    Hit(Screened<'a>),
    /// The User-Agent claims verifiable crawler N (`bots.verify`): verify by DNS, then screen
    /// again with the verdict. Nothing else was decided yet.
    Verify(usize),
}

/// The refusal code of a request whose User-Agent claims a crawler its DNS disowns.
pub const BOT_FAKE: &str = "bot_fake";

impl Snapshot {
    /// IP rules, then bots, for a request on route `index` (checked before flood protection
    /// and authentication). `verdict`: what DNS said about the crawler the User-Agent claims
    /// (from a previous [`Screen::Verify`]).
    pub fn screen(
        &self,
        index: usize,
        client: Option<std::net::IpAddr>,
        headers: &http::HeaderMap,
        verdict: Option<(usize, Verdict)>,
    ) -> Screen<'_> {
        let b = &self.bindings[index];
        if let Some(v) = client.and_then(|ip| b.ip_rules.check(ip)) {
            return Screen::Hit(Screened {
                code: v.code(),
                category: "ip",
                rule: match v {
                    IpVerdict::Denied => "deny",
                    IpVerdict::NotAllowed => "allow",
                },
                detect_only: false,
            });
        }
        if b.bot_mode == BotMode::Off {
            return Screen::Pass;
        }
        let ua = headers.get(http::header::USER_AGENT).map(|v| v.as_bytes());
        let detect_only = b.bot_mode == BotMode::Detect;
        match verdict {
            // Without the client's address there is nothing to verify: an ordinary request.
            None if client.is_some() => {
                if let Some(crawler) = self.bots.claim(ua) {
                    return Screen::Verify(crawler);
                }
            }
            Some((_, Verdict::Verified)) => {
                // Exempt from the built-in categories and the challenge; not from `deny`.
                return match ua.and_then(|ua| self.bots.denied(ua)) {
                    Some(hit) => Screen::Hit(Screened {
                        code: "bot_blocked",
                        category: "bot",
                        rule: hit.rule,
                        detect_only,
                    }),
                    None => Screen::Pass,
                };
            }
            Some((crawler, Verdict::Fake)) => {
                return Screen::Hit(Screened {
                    code: BOT_FAKE,
                    category: "bot",
                    rule: &self.bots.verify.crawlers[crawler].fake_rule,
                    detect_only,
                });
            }
            // Unverified: screened like any other request with this User-Agent.
            Some((_, Verdict::Error)) | None => {}
        }
        if let Some(hit) = self.bots.check(ua) {
            return Screen::Hit(Screened {
                code: "bot_blocked",
                category: "bot",
                rule: hit.rule,
                detect_only,
            });
        }
        if b.bot_mode == BotMode::Challenge && !self.bots.allowed(ua) {
            let c = &self.bots.challenge;
            let passed = crate::policy::challenge::cookie(headers, &c.cookie)
                .is_some_and(|v| c.verify(v, unix_now(), client, ua.unwrap_or_default()));
            if !passed {
                return Screen::Hit(Screened {
                    code: CHALLENGE_REQUIRED,
                    category: "bot",
                    rule: "challenge",
                    detect_only: false,
                });
            }
        }
        Screen::Pass
    }

    /// The challenge page for a client that has no valid cookie yet.
    pub fn challenge_page(
        &self,
        client: Option<std::net::IpAddr>,
        headers: &http::HeaderMap,
        https: bool,
    ) -> String {
        let c = &self.bots.challenge;
        let ua = headers
            .get(http::header::USER_AGENT)
            .map_or(&b""[..], |v| v.as_bytes());
        c.page(&c.token(unix_now(), client, ua), https)
    }

    /// The custom rules' verdict for a request on route `index`: the head-only rules (after
    /// [`Self::screen`]), or with `body` the rules with a body condition.
    pub fn evaluate_rules(
        &self,
        index: usize,
        req: &crate::router::RequestHead<'_>,
        client: Option<std::net::IpAddr>,
        body: Option<&[u8]>,
    ) -> crate::policy::rules::Verdict<'_> {
        if !self.bindings[index].rules || self.rules.is_empty() {
            return crate::policy::rules::Verdict::default();
        }
        match body {
            None => self.rules.evaluate(req, client),
            Some(b) => self.rules.evaluate_body(req, client, b),
        }
    }

    pub fn upstream_of(&self, route_index: usize) -> Option<&Arc<Upstream>> {
        self.bindings[route_index]
            .upstream
            .map(|i| &self.upstreams[i])
    }
}

/// Builds a snapshot from a loaded config. All errors, located by field path. `consumers` is
/// the compiled consumers.yaml (an empty table without one), None when that file could not be
/// read. `refused`: earlier stages found errors, so only report (no snapshot, no metric series).
pub fn compile(
    cfg: &Config,
    consumers: Option<Arc<ConsumerTable>>,
    quotas: Option<QuotaTable>,
    refused: bool,
    registry: &Registry,
    metrics: &Metrics,
    generation: u64,
) -> Result<Snapshot, Vec<FieldError>> {
    let mut errors = Vec::new();

    let mut upstreams: Vec<Upstream> = Vec::with_capacity(cfg.upstreams.len());
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    for (name, u) in &cfg.upstreams {
        match Upstream::compile(name, u, registry) {
            Ok(u) => {
                by_name.insert(name.as_str(), upstreams.len());
                upstreams.push(u);
            }
            Err(e) => errors.extend(e),
        }
    }

    let router = match Router::compile(&cfg.routes, cfg.http.max_body.get()) {
        Ok(r) => Some(r),
        Err(e) => {
            errors.extend(e);
            None
        }
    };

    // Cross-references first, from the config itself, so they are reported even when some
    // route fails to compile.
    for (i, route) in cfg.routes.iter().enumerate() {
        let Some(name) = &route.upstream else {
            continue;
        };
        if !cfg.upstreams.contains_key(name) && !cfg.broken_upstreams.contains(name) {
            let known: Vec<&str> = cfg.upstreams.keys().map(String::as_str).collect();
            errors.push(FieldError::new(
                error::join(&error::index("routes", i), "upstream"),
                format!(
                    "unknown upstream `{name}`; defined upstreams: {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
    }

    // (upstream index, subset per split target) of each route.
    let mut bindings: Vec<(Option<usize>, Vec<SubsetId>)> = Vec::new();
    if let Some(router) = &router {
        for route in router.routes() {
            let path = error::index("routes", route.index);
            let mut binding = (None, Vec::new());
            if let Action::Proxy { upstream } = &route.action {
                // Unknown or broken upstreams were reported above.
                if let Some(&ui) = by_name.get(upstream.as_str()) {
                    binding.0 = Some(ui);
                    let n_rules = route.split.targets().len().saturating_sub(1);
                    for (t, labels) in route.split.targets().iter().enumerate() {
                        match upstreams[ui].subset(labels) {
                            Ok(s) => binding.1.push(s),
                            Err(msg) => {
                                let field = if t < n_rules {
                                    error::join(
                                        &error::index(&error::join(&path, "split"), t),
                                        "labels",
                                    )
                                } else {
                                    error::join(&path, "labels")
                                };
                                errors.push(FieldError::new(field, msg));
                            }
                        }
                    }
                }
            }
            bindings.push(binding);
        }
    }

    let identity_headers = IdentityHeaders::compile(&cfg.auth, &cfg.routes)
        .map_err(|e| errors.extend(e))
        .ok();
    // Indexed by route declaration order, like `route.index`.
    let mut policies: Vec<Option<RoutePolicy>> = Vec::with_capacity(cfg.routes.len());
    for (i, route) in cfg.routes.iter().enumerate() {
        policies.push(route.auth.as_ref().and_then(|a| {
            RoutePolicy::compile(i, a, consumers.as_deref(), cfg.include.consumers.is_some())
                .map_err(|e| errors.extend(e))
                .ok()
        }));
    }

    let mut quota_policies: Vec<Option<QuotaPolicy>> = Vec::with_capacity(cfg.routes.len());
    for (i, route) in cfg.routes.iter().enumerate() {
        quota_policies.push(match (&route.quota, &quotas) {
            (Some(q), Some(table)) => QuotaPolicy::compile(i, q, route.auth.is_some(), table)
                .map_err(|e| errors.extend(e))
                .ok(),
            (Some(_), None) => None, // quotas.yaml failed: reported there
            (None, _) => None,
        });
        if let (Some(q), Some(policy)) = (&route.quota, policies[i].as_mut()) {
            if let crate::config::TenantSource::Claim(c) = &q.tenant {
                policy.capture_claim(c);
            }
        }
    }

    let client_ip = ClientIpPolicy::compile("client_ip", &cfg.client_ip)
        .map_err(|e| errors.extend(e))
        .ok();
    let flood = FloodPolicy::compile("flood", &cfg.flood)
        .map_err(|e| errors.extend(e))
        .ok();
    let bots = BotDetector::compile("bots", &cfg.bots)
        .map_err(|e| errors.extend(e))
        .ok();
    let rules = CustomRules::compile(&cfg.rules)
        .map_err(|e| errors.extend(e))
        .ok();
    // The global lists' errors once; each route's merge then only adds its own.
    if let Err(e) = IpRules::compile(&cfg.ip_rules, None) {
        errors.extend(e);
    }
    let mut ip_rules: Vec<Option<IpRules>> = Vec::with_capacity(cfg.routes.len());
    for (i, route) in cfg.routes.iter().enumerate() {
        let path = error::index("routes", i);
        let own = route.ip_rules.as_ref().map(|r| (path.as_str(), r));
        ip_rules.push(
            IpRules::compile(&cfg.ip_rules, own)
                .map_err(|e| errors.extend(e.into_iter().filter(|e| e.path.starts_with("routes"))))
                .ok(),
        );
    }

    match (router, consumers, identity_headers, quotas) {
        (Some(router), Some(consumers), Some(identity_headers), Some(mut quotas))
            if errors.is_empty()
                && !refused
                && client_ip.is_some()
                && flood.is_some()
                && bots.is_some()
                && rules.is_some() =>
        {
            quotas.attach_metrics(&metrics.quota);
            Ok(Snapshot {
                generation,
                // Metric handles only now: a refused config must not register label sets.
                bindings: router
                    .routes()
                    .iter()
                    .zip(bindings)
                    .map(|(route, (upstream, subsets))| Binding {
                        upstream,
                        subsets,
                        metrics: metrics.route(
                            &route.name,
                            upstream.map_or("", |i: usize| upstreams[i].name.as_str()),
                        ),
                        auth: policies[route.index].take().map(|mut p| {
                            p.attach_metrics(&metrics.auth, &route.name);
                            p
                        }),
                        quota: quota_policies[route.index].take(),
                        flood_id: route_id(&route.name),
                        ip_rules: ip_rules[route.index].take().unwrap_or_default(),
                        bot_mode: cfg.routes[route.index].bots.unwrap_or(cfg.bots.mode),
                        rules: cfg.routes[route.index].rules,
                        block_page_html: cfg.routes[route.index].block_page
                            == crate::config::BlockPage::Html,
                    })
                    .collect(),
                router,
                upstreams: upstreams.into_iter().map(Arc::new).collect(),
                http: cfg.http.clone(),
                drain_idle_grace: cfg.drain.idle_grace.get(),
                unrouted: metrics.route(NO_ROUTE, ""),
                consumers,
                identity_headers,
                quotas: Arc::new(quotas),
                client_ip: client_ip.unwrap_or_default(),
                flood: flood.unwrap_or_default(),
                bots: bots.expect("checked above"),
                rules: rules.expect("checked above"),
                waf: None,
                files: Vec::new(),
                listeners: Vec::new(),
            })
        }
        _ => Err(errors),
    }
}

/// A stable 64-bit id of a route name (FNV-1a: the same in every process and generation).
fn route_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile_text(text: &str, metrics: &Metrics) -> Result<Snapshot, Vec<FieldError>> {
        let loaded = crate::config::load_str("t.yaml", text).expect("the file parses");
        compile(
            &loaded.config,
            Some(Arc::new(ConsumerTable::default())),
            Some(QuotaTable::default()),
            false,
            &Registry::new(),
            metrics,
            1,
        )
    }

    #[test]
    fn metric_series_exist_only_for_live_routes_with_their_upstream() {
        let metrics = Metrics::new();
        let head = "listeners: [{ name: web, address: \"127.0.0.1:8080\" }]\n\
                    upstreams: { app: { backends: [{ address: \"127.0.0.1:9000\" }] } }\n";
        compile_text(
            &format!("{head}routes: [{{ name: live, upstream: app }}]\n"),
            &metrics,
        )
        .unwrap();
        let refused = format!(
            "{head}routes: [{{ name: refused, upstream: app, match: {{ path_regex: \"(\" }} }}]\n"
        );
        assert!(compile_text(&refused, &metrics).is_err());
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(
            text.contains(r#"route="live",status="2xx",upstream="app""#),
            "{text}"
        );
        assert!(
            !text.contains(r#"route="live",status="2xx",upstream="""#),
            "{text}"
        );
        assert!(!text.contains(r#"route="refused""#), "{text}");
    }

    #[test]
    fn routes_bind_their_upstream_and_split_subsets() {
        let metrics = Metrics::new();
        let snap = compile_text(
            "listeners: [{ name: web, address: \"127.0.0.1:8080\" }]\n\
             upstreams: { app: { backends: [{ address: \"127.0.0.1:9000\", labels: { v: new } }, { address: \"127.0.0.1:9001\" }] } }\n\
             routes:\n  - { name: a, upstream: app, split: [{ weight: 10, labels: { v: new } }] }\n  - { name: b, respond: { status: 204 } }\n",
            &metrics,
        )
        .unwrap();
        assert_eq!(snap.bindings[0].upstream, Some(0));
        assert_eq!(
            snap.bindings[0].subsets.len(),
            2,
            "one per split rule plus the default"
        );
        assert_eq!(snap.bindings[1].upstream, None);
        assert!(snap.bindings[1].subsets.is_empty());
    }
}
