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
}

/// What a route is wired to in this generation.
pub struct Binding {
    /// Index into `Snapshot::upstreams` for proxy routes.
    pub upstream: Option<usize>,
    /// One backend subset per split target (`route.split.targets()`), same order.
    pub subsets: Vec<SubsetId>,
    pub metrics: RouteMetrics,
}

impl Snapshot {
    pub fn upstream_of(&self, route_index: usize) -> Option<&Arc<Upstream>> {
        self.bindings[route_index]
            .upstream
            .map(|i| &self.upstreams[i])
    }
}

/// Builds a snapshot from a loaded config. All errors, located by field path.
pub fn compile(
    cfg: &Config,
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

    let mut bindings = Vec::new();
    if let Some(router) = &router {
        for route in router.routes() {
            let path = error::index("routes", route.index);
            let mut binding = Binding {
                upstream: None,
                subsets: Vec::new(),
                metrics: metrics.route(&route.name, ""),
            };
            if let Action::Proxy { upstream } = &route.action {
                // Unknown or broken upstreams were reported above.
                if let Some(&ui) = by_name.get(upstream.as_str()) {
                    binding.upstream = Some(ui);
                    binding.metrics = metrics.route(&route.name, upstream);
                    let n_rules = route.split.targets().len().saturating_sub(1);
                    for (t, labels) in route.split.targets().iter().enumerate() {
                        match upstreams[ui].subset(labels) {
                            Ok(s) => binding.subsets.push(s),
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

    match router {
        Some(router) if errors.is_empty() => Ok(Snapshot {
            generation,
            router,
            bindings,
            upstreams: upstreams.into_iter().map(Arc::new).collect(),
            http: cfg.http.clone(),
            drain_idle_grace: cfg.drain.idle_grace.get(),
            unrouted: metrics.route(NO_ROUTE, ""),
        }),
        _ => Err(errors),
    }
}
