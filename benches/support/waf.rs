//! What the WAF benchmarks share: Debian's CRS compiled for one blocking route, and a
//! browser's request headers.

use std::path::Path;

use tollgate::waf::{self, RouteWaf, Waf, WafMode, WafSettings};

/// Debian's CRS and a blocking route's view of it at `paranoia`.
pub fn crs(paranoia: u8) -> (Waf, RouteWaf) {
    let settings = WafSettings {
        mode: WafMode::Block,
        paranoia,
        ..Default::default()
    };
    let w = waf::compile(&settings, &[None], Path::new("/"))
        .expect("Debian's CRS loads")
        .expect("the WAF is on");
    let route = w.route(0).unwrap().clone();
    (w, route)
}

/// A browser's headers, then `pairs`.
pub fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in [
        ("host", "shop.example.com"),
        ("user-agent", "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"),
        ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
        ("accept-language", "en-US,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br"),
    ]
    .iter()
    .chain(pairs)
    {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    h
}
