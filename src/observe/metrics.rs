//! Prometheus metrics. Label lookups (a hash and a lock inside the `prometheus` crate) happen
//! when a snapshot is compiled: each route gets its own counter handles, so a request only
//! increments atomics.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Route label for requests that matched no route.
pub const NO_ROUTE: &str = "_none";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    pub connections_active: IntGauge,
    pub tunnels_active: IntGauge,
    pub tunnels_total: IntCounterVec,
    pub backend_healthy: IntGaugeVec,
    pub backend_inflight: IntGaugeVec,
    pub reloads: IntCounterVec,
    pub generation: IntGauge,
    pub access_log_dropped: IntCounter,
    pub draining: IntGauge,
    /// Authentication outcomes by route, method and result (`ok` or the failure code).
    pub auth: IntCounterVec,
    /// Quota decisions by tenant (listed tenants; `_other` for the rest), group and result.
    pub quota: IntCounterVec,
    /// Requests and WebSockets in flight per listed tenant and group (refreshed at scrape).
    pub quota_in_flight: IntGaugeVec,
    /// 1 while the cluster quota store (Redis) answers; absent without one.
    pub quota_store_up: IntGauge,
    /// Requests refused by flood protection, and IPs blocked at first refusal.
    pub flood_refused: IntCounter,
    pub flood_blocks: IntCounter,
    /// Blocks in force (refreshed at scrape).
    pub flood_blocked_ips: IntGauge,
    /// Requests the IP rules or bot detection refused (or would have, in detect mode).
    pub screened: IntCounterVec,
    /// Crawler verifications by DNS (cache misses), by crawler and result.
    pub bot_verifications: IntCounterVec,
    /// Client IPs in the crawler verification cache (refreshed at scrape).
    pub bot_verify_cached: IntGauge,
    /// TLS handshakes by result, resolved once (a handshake only increments).
    pub tls_handshakes: TlsHandshakes,
    /// notAfter of each served certificate (Unix seconds), by listener, file and first name.
    pub tls_cert_not_after: IntGaugeVec,
}

pub struct TlsHandshakes {
    pub ok: IntCounter,
    pub failed: IntCounter,
    pub timeout: IntCounter,
}

/// Counter handles of one route (and its upstream), resolved once per snapshot.
#[derive(Clone)]
pub struct RouteMetrics {
    /// Indexed by status class: 0 = other, 1 = 1xx ... 5 = 5xx.
    by_class: [IntCounter; 6],
    duration: Histogram,
}

impl RouteMetrics {
    /// Records one finished request.
    pub fn observe(&self, status: u16, seconds: f64) {
        let class = (status / 100) as usize;
        self.by_class[if (1..=5).contains(&class) { class } else { 0 }].inc();
        self.duration.observe(seconds);
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "tollgate_requests_total",
                "Requests answered, by route, upstream and status class",
            ),
            &["route", "upstream", "status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_request_duration_seconds",
                "Time from request head to end of response, by route",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let connections_active =
            IntGauge::new("tollgate_connections_active", "Open downstream connections")
                .expect("valid metric");
        let tunnels_active = IntGauge::new(
            "tollgate_websocket_tunnels_active",
            "Open WebSocket tunnels",
        )
        .expect("valid metric");
        let tunnels_total = IntCounterVec::new(
            Opts::new(
                "tollgate_websocket_tunnels_total",
                "WebSocket tunnels opened, by route",
            ),
            &["route"],
        )
        .expect("valid metric");
        let backend_healthy = IntGaugeVec::new(
            Opts::new(
                "tollgate_backend_healthy",
                "1 when the backend takes traffic (healthy and not ejected)",
            ),
            &["upstream", "backend"],
        )
        .expect("valid metric");
        let backend_inflight = IntGaugeVec::new(
            Opts::new(
                "tollgate_backend_inflight",
                "Requests and tunnels in flight per backend",
            ),
            &["upstream", "backend"],
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new(
                "tollgate_config_reloads_total",
                "Config reloads by result (ok, error)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let generation = IntGauge::new(
            "tollgate_config_generation",
            "Generation of the config being served",
        )
        .expect("valid metric");
        let access_log_dropped = IntCounter::new(
            "tollgate_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind",
        )
        .expect("valid metric");
        let draining = IntGauge::new(
            "tollgate_draining",
            "1 while this process drains after an upgrade or SIGTERM",
        )
        .expect("valid metric");
        let auth = IntCounterVec::new(
            Opts::new(
                "tollgate_auth_total",
                "Authentication outcomes by route, method (jwt, hmac, key, anonymous, none) and result (ok or the failure code)",
            ),
            &["route", "method", "result"],
        )
        .expect("valid metric");
        let quota = IntCounterVec::new(
            Opts::new(
                "tollgate_quota_requests_total",
                "Quota decisions by tenant, route group and result (admitted, rate_limited, concurrency_limited, websocket_limited)",
            ),
            &["tenant", "group", "result"],
        )
        .expect("valid metric");
        let quota_in_flight = IntGaugeVec::new(
            Opts::new(
                "tollgate_quota_in_flight",
                "Requests (kind=request) and WebSockets (kind=websocket) in flight per listed tenant and group",
            ),
            &["tenant", "group", "kind"],
        )
        .expect("valid metric");
        let quota_store_up = IntGauge::new(
            "tollgate_quota_store_up",
            "1 while the cluster quota store (Redis) answers, 0 while quotas fall back",
        )
        .expect("valid metric");
        let flood_refused = IntCounter::new(
            "tollgate_flood_refused_total",
            "Requests refused because their client IP is blocked by flood protection",
        )
        .expect("valid metric");
        let flood_blocks = IntCounter::new(
            "tollgate_flood_blocks_total",
            "Client IP blocks started by flood protection (per IP, or per IP and route)",
        )
        .expect("valid metric");
        let flood_blocked_ips =
            IntGauge::new("tollgate_flood_blocked", "Flood protection blocks in force")
                .expect("valid metric");
        let tls_handshakes_vec = IntCounterVec::new(
            Opts::new(
                "tollgate_tls_handshakes_total",
                "Downstream TLS handshakes by result (ok, failed, timeout)",
            ),
            &["result"],
        )
        .expect("valid metric");
        let tls_handshakes = TlsHandshakes {
            ok: tls_handshakes_vec.with_label_values(&["ok"]),
            failed: tls_handshakes_vec.with_label_values(&["failed"]),
            timeout: tls_handshakes_vec.with_label_values(&["timeout"]),
        };
        let tls_cert_not_after = IntGaugeVec::new(
            Opts::new(
                "tollgate_tls_certificate_not_after_seconds",
                "Expiry (notAfter, Unix seconds) of each certificate served, by listener, file and first name",
            ),
            &["listener", "file", "name"],
        )
        .expect("valid metric");
        let screened = IntCounterVec::new(
            Opts::new(
                "tollgate_screened_total",
                "Requests refused by IP rules or bot detection, by route, category (ip, bot), rule and action (blocked, detected)",
            ),
            &["route", "category", "rule", "action"],
        )
        .expect("valid metric");
        let bot_verifications = IntCounterVec::new(
            Opts::new(
                "tollgate_bot_verifications_total",
                "Reverse-and-forward DNS verifications of claimed crawlers (cache misses), by bot and result (verified, fake, error)",
            ),
            &["bot", "result"],
        )
        .expect("valid metric");
        let bot_verify_cached = IntGauge::new(
            "tollgate_bot_verify_cache_entries",
            "Client IPs whose crawler verification is cached",
        )
        .expect("valid metric");
        for c in [
            Box::new(draining.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(screened.clone()),
            Box::new(bot_verifications.clone()),
            Box::new(bot_verify_cached.clone()),
            Box::new(tls_handshakes_vec.clone()),
            Box::new(tls_cert_not_after.clone()),
            Box::new(flood_refused.clone()),
            Box::new(flood_blocks.clone()),
            Box::new(flood_blocked_ips.clone()),
            Box::new(quota.clone()),
            Box::new(quota_in_flight.clone()),
            Box::new(quota_store_up.clone()),
            Box::new(auth.clone()),
            Box::new(requests.clone()),
            Box::new(duration.clone()),
            Box::new(connections_active.clone()),
            Box::new(tunnels_active.clone()),
            Box::new(tunnels_total.clone()),
            Box::new(backend_healthy.clone()),
            Box::new(backend_inflight.clone()),
            Box::new(reloads.clone()),
            Box::new(generation.clone()),
            Box::new(access_log_dropped.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        for r in ["ok", "error"] {
            reloads.with_label_values(&[r]);
        }
        Self {
            registry,
            requests,
            duration,
            connections_active,
            tunnels_active,
            tunnels_total,
            backend_healthy,
            backend_inflight,
            reloads,
            generation,
            access_log_dropped,
            draining,
            auth,
            quota,
            quota_in_flight,
            quota_store_up,
            flood_refused,
            flood_blocks,
            flood_blocked_ips,
            screened,
            bot_verifications,
            bot_verify_cached,
            tls_handshakes,
            tls_cert_not_after,
        }
    }

    /// Handles for one route. Called at compile time, never per request.
    pub fn route(&self, route: &str, upstream: &str) -> RouteMetrics {
        let class = |c: &str| self.requests.with_label_values(&[route, upstream, c]);
        RouteMetrics {
            by_class: [
                class("other"),
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: self.duration.with_label_values(&[route]),
        }
    }

    /// Prometheus text exposition of everything registered.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into a Vec cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_handles_count_by_class() {
        let m = Metrics::new();
        let r = m.route("api", "app");
        r.observe(200, 0.01);
        r.observe(503, 0.02);
        r.observe(204, 0.01);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(r#"tollgate_requests_total{route="api",status="2xx",upstream="app"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tollgate_requests_total{route="api",status="5xx",upstream="app"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tollgate_request_duration_seconds_count{route="api"} 3"#),
            "{text}"
        );
    }
}
