//! Verified crawlers (`bots.verify`): a request whose User-Agent claims a search-engine crawler
//! (Googlebot, Bingbot...) is checked by reverse-and-forward DNS, the way the search engines
//! document it: the client IP's PTR name must lie under one of the crawler's domains (on a label
//! boundary), and the A/AAAA records of that name must contain the IP. A verified crawler passes
//! bot blocking and the challenge; one whose DNS disagrees is a fake (`403 bot_fake`).
//!
//! Two halves, like the rest of `policy/`: [`Verifier`] is compiled from the config into the
//! snapshot (the claim automaton, the crawlers' domains, TTLs, the resolver address); the
//! [`VerifyState`] outlives reloads in `Gateway` (the per-IP cache, the DNS resolver). Lookups
//! are async and bounded by `bots.verify_timeout`; concurrent requests from one IP share one
//! lookup. Only requests that claim a crawler ever reach this module: everyone else pays one
//! Aho-Corasick pass over a handful of patterns.
//!
//! Failure policy, fail closed for the exemption: a lookup that times out or errs (SERVFAIL, no
//! answer, no resolver) gives [`Verdict::Error`]: the request is *not* exempt and is screened as
//! any other request with that User-Agent (blocked if `crawler` is in `bots.block`, challenged on
//! challenge routes), but not refused as a fake, since nothing proved it fake.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use serde::Deserialize;

use crate::config::units::Dur;
use crate::config::{error, FieldError};

/// One `bots.verify` entry: a crawler, the User-Agent token that claims it, its DNS domains.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VerifyRule {
    /// The crawler's name in logs and metrics (`bot:googlebot:verified`).
    pub name: String,
    /// A User-Agent containing this (case-insensitive) claims to be the crawler.
    pub user_agent: String,
    /// The crawler's PTR names end in one of these (`googlebot.com` takes
    /// `crawl-66-249-66-1.googlebot.com`, never `evilgooglebot.com`).
    pub domains: Vec<String>,
}

/// The crawlers verified when `bots.verify` is not set: the ones whose operators document
/// reverse-DNS verification, with the domains they document.
pub fn default_verify() -> Vec<VerifyRule> {
    let rule = |name: &str, ua: &str, domains: &[&str]| VerifyRule {
        name: name.into(),
        user_agent: ua.into(),
        domains: domains.iter().map(|d| d.to_string()).collect(),
    };
    vec![
        rule(
            "googlebot",
            "Googlebot",
            &["googlebot.com", "google.com", "googleusercontent.com"],
        ),
        rule("bingbot", "bingbot", &["search.msn.com"]),
        rule("applebot", "Applebot", &["applebot.apple.com"]),
        rule(
            "yandexbot",
            "YandexBot",
            &["yandex.ru", "yandex.net", "yandex.com"],
        ),
        rule("baiduspider", "Baiduspider", &["baidu.com", "baidu.jp"]),
    ]
}

/// `bots.verify_cache`: how long lookups are remembered, per client IP.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VerifyCacheSettings {
    /// An IP whose PTR name forward-confirmed under a crawler's domain.
    #[serde(default = "default_ttl")]
    pub ttl: Dur,
    /// An IP whose DNS gave no such name (a fake, whatever crawler it claims).
    #[serde(default = "default_negative_ttl")]
    pub negative_ttl: Dur,
    /// An IP whose lookup timed out or failed: short, so a real crawler is not left
    /// unverified for long after a DNS hiccup.
    #[serde(default = "default_error_ttl")]
    pub error_ttl: Dur,
    /// IPs remembered at most; past that, older entries make room.
    #[serde(default = "default_max_entries")]
    pub max_entries: usize,
}

impl Default for VerifyCacheSettings {
    fn default() -> Self {
        Self {
            ttl: default_ttl(),
            negative_ttl: default_negative_ttl(),
            error_ttl: default_error_ttl(),
            max_entries: default_max_entries(),
        }
    }
}

fn default_ttl() -> Dur {
    Dur(Duration::from_secs(3600))
}
fn default_negative_ttl() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_error_ttl() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_max_entries() -> usize {
    100_000
}
pub fn default_verify_timeout() -> Dur {
    Dur(Duration::from_secs(2))
}

/// What DNS says about a request that claims crawler N.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The client IP's PTR name is under the crawler's domains and resolves back to the IP.
    Verified,
    /// DNS answered, and disagrees: no PTR, a name elsewhere, or a name that does not resolve
    /// back to the IP.
    Fake,
    /// No answer in time, or a DNS error: not exempt, not proven fake.
    Error,
}

impl Verdict {
    /// The metric label and the access log's tag suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Verified => "verified",
            Verdict::Fake => "fake",
            Verdict::Error => "error",
        }
    }
}

/// One compiled `bots.verify` entry.
#[derive(Debug)]
pub struct Crawler {
    pub name: String,
    /// `NAME:fake`, the screening rule of a fake.
    pub fake_rule: String,
    /// Lowercase, no leading or trailing dot.
    domains: Vec<String>,
}

/// The compiled `bots.verify*` and `bots.resolver` settings (in the snapshot).
#[derive(Debug)]
pub struct Verifier {
    /// The crawlers' User-Agent tokens; None when `bots.verify` is empty.
    claims: Option<AhoCorasick>,
    pub crawlers: Vec<Crawler>,
    /// Every crawler's domains: only PTR names under one of them are looked up forward.
    domains: Vec<String>,
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub error_ttl: Duration,
    pub max_entries: usize,
    pub timeout: Duration,
    /// `bots.resolver`; None: the system's (/etc/resolv.conf).
    pub resolver: Option<SocketAddr>,
}

/// Whether DNS name `name` is `domain` or lies under it, on a label boundary. Both are compared
/// without case and without a trailing dot.
pub fn under_domain(name: &str, domain: &str) -> bool {
    let name = name.trim_end_matches('.');
    let domain = domain.trim_end_matches('.');
    if domain.is_empty() || name.len() < domain.len() {
        return false;
    }
    let (head, tail) = name.split_at(name.len() - domain.len());
    tail.eq_ignore_ascii_case(domain) && (head.is_empty() || head.ends_with('.'))
}

fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl Verifier {
    /// `path` is `bots`.
    pub fn compile(
        path: &str,
        rules: &[VerifyRule],
        cache: &VerifyCacheSettings,
        timeout: Dur,
        resolver: Option<&str>,
    ) -> Result<Verifier, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut crawlers = Vec::new();
        let mut patterns = Vec::new();
        let mut domains: Vec<String> = Vec::new();
        let verify = error::join(path, "verify");
        for (i, r) in rules.iter().enumerate() {
            let at = |field: &str| error::join(&error::index(&verify, i), field);
            let name_ok = !r.name.is_empty()
                && r.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !name_ok {
                errors.push(FieldError::new(
                    at("name"),
                    "a crawler name is letters, digits and `-_.`",
                ));
            } else if rules[..i].iter().any(|o| o.name == r.name) {
                errors.push(FieldError::new(
                    at("name"),
                    format!("`{}` is listed twice", r.name),
                ));
            }
            if r.user_agent.trim().is_empty() {
                errors.push(FieldError::new(
                    at("user_agent"),
                    "the User-Agent token that claims this crawler, e.g. Googlebot",
                ));
            }
            if r.domains.is_empty() {
                errors.push(FieldError::new(
                    at("domains"),
                    "at least one domain the crawler's PTR names end in",
                ));
            }
            let mut own = Vec::new();
            for (j, d) in r.domains.iter().enumerate() {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                if !valid_domain(&d) {
                    errors.push(FieldError::new(
                        error::index(&at("domains"), j),
                        "a domain name such as googlebot.com (no leading dot, no wildcard)",
                    ));
                    continue;
                }
                if !domains.contains(&d) {
                    domains.push(d.clone());
                }
                own.push(d);
            }
            patterns.push(r.user_agent.trim().to_string());
            crawlers.push(Crawler {
                name: r.name.clone(),
                fake_rule: format!("{}:fake", r.name),
                domains: own,
            });
        }
        let secs = |field: &str, d: Dur, errors: &mut Vec<FieldError>| {
            if d.get() < Duration::from_secs(1) {
                errors.push(FieldError::new(
                    error::join(&error::join(path, "verify_cache"), field),
                    "must be at least 1s",
                ));
            }
        };
        secs("ttl", cache.ttl, &mut errors);
        secs("negative_ttl", cache.negative_ttl, &mut errors);
        secs("error_ttl", cache.error_ttl, &mut errors);
        if cache.max_entries == 0 {
            errors.push(FieldError::new(
                error::join(&error::join(path, "verify_cache"), "max_entries"),
                "must be at least 1",
            ));
        }
        let t = timeout.get();
        if t < Duration::from_millis(50) || t > Duration::from_secs(30) {
            errors.push(FieldError::new(
                error::join(path, "verify_timeout"),
                "between 50ms and 30s (the claiming request waits this long at most)",
            ));
        }
        let resolver = match resolver {
            None => None,
            Some(r) => match parse_resolver(r) {
                Some(a) => Some(a),
                None => {
                    errors.push(FieldError::new(
                        error::join(path, "resolver"),
                        format!("`{r}` is not IP:PORT or IP (e.g. \"127.0.0.1:53\", \"[::1]:53\")"),
                    ));
                    None
                }
            },
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let claims = (!patterns.is_empty()).then(|| {
            AhoCorasickBuilder::new()
                .ascii_case_insensitive(true)
                .match_kind(MatchKind::LeftmostFirst)
                .build(&patterns)
                .expect("literal patterns compile")
        });
        Ok(Verifier {
            claims,
            crawlers,
            domains,
            ttl: cache.ttl.get(),
            negative_ttl: cache.negative_ttl.get(),
            error_ttl: cache.error_ttl.get(),
            max_entries: cache.max_entries,
            timeout: t,
            resolver,
        })
    }

    /// The crawler this User-Agent claims to be, if it names a verifiable one.
    #[inline]
    pub fn claim(&self, user_agent: &[u8]) -> Option<usize> {
        self.claims
            .as_ref()?
            .find(user_agent)
            .map(|m| m.pattern().as_usize())
    }

    /// What a cached lookup says about a request claiming crawler `crawler`.
    pub fn verdict(&self, crawler: usize, lookup: &Lookup) -> Verdict {
        match lookup {
            Lookup::Failed => Verdict::Error,
            Lookup::Confirmed(names) => {
                let domains = &self.crawlers[crawler].domains;
                if names
                    .iter()
                    .any(|n| domains.iter().any(|d| under_domain(n, d)))
                {
                    Verdict::Verified
                } else {
                    Verdict::Fake
                }
            }
        }
    }
}

fn parse_resolver(s: &str) -> Option<SocketAddr> {
    let s = s.trim();
    s.parse::<SocketAddr>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
}

/// What DNS said about one client IP (cached).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The IP's PTR names that lie under a verified crawler's domain and resolve back to the IP
    /// (lowercase, no trailing dot). Empty: none does, the IP is no crawler's.
    Confirmed(Vec<String>),
    /// Timed out or failed.
    Failed,
}

/// A cache slot: filled once by the first request that needs it, which the others await.
type Slot = tokio::sync::OnceCell<(Lookup, Instant)>;

const SHARDS: usize = 16;

/// The resolver in use and what it was built from.
struct Resolver {
    key: (Option<SocketAddr>, Duration),
    resolver: Option<TokioResolver>,
}

/// The long-lived half: the per-IP cache and the resolver (kept across reloads; a reload that
/// changes `bots.resolver` or `bots.verify_timeout` gets a new resolver at its next lookup).
pub struct VerifyState {
    shards: Vec<Mutex<HashMap<IpAddr, Arc<Slot>>>>,
    resolver: Mutex<Option<Resolver>>,
    /// `tollgate_bot_verifications_total{bot,result}`: lookups done (cache hits are not).
    lookups: prometheus::IntCounterVec,
}

impl VerifyState {
    pub fn new(lookups: prometheus::IntCounterVec) -> VerifyState {
        VerifyState {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            resolver: Mutex::new(None),
            lookups,
        }
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, Arc<Slot>>> {
        let h = match ip {
            IpAddr::V4(v4) => u32::from(*v4) as u64,
            IpAddr::V6(v6) => {
                let b = u128::from(*v6);
                (b ^ (b >> 64)) as u64
            }
        };
        // Fibonacci hashing: the top bits of the product pick the shard.
        let mixed = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        &self.shards[(mixed >> 60) as usize % SHARDS]
    }

    /// IPs in the cache (lookups in flight included).
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a request from `ip` claiming crawler `crawler` is that crawler. Answers from the
    /// cache when it can; otherwise looks up (at most `v.timeout`), sharing the lookup with
    /// every concurrent request from the same IP.
    pub async fn verify(&self, v: &Verifier, crawler: usize, ip: IpAddr) -> Verdict {
        let ip = ip.to_canonical();
        let slot = self.slot(v, ip, Instant::now());
        let (lookup, _) = slot
            .get_or_init(|| async {
                let lookup = self.lookup(v, ip).await;
                let ttl = match &lookup {
                    Lookup::Confirmed(n) if !n.is_empty() => v.ttl,
                    Lookup::Confirmed(_) => v.negative_ttl,
                    Lookup::Failed => v.error_ttl,
                };
                let verdict = v.verdict(crawler, &lookup);
                self.lookups
                    .with_label_values(&[&v.crawlers[crawler].name, verdict.as_str()])
                    .inc();
                if verdict == Verdict::Error {
                    tracing::warn!(%ip, crawler = %v.crawlers[crawler].name, "crawler verification: DNS lookup failed or timed out; treated as unverified");
                }
                (lookup, Instant::now() + ttl)
            })
            .await;
        v.verdict(crawler, lookup)
    }

    /// The cache slot for `ip`: a fresh or pending one, or a new empty one in its place.
    fn slot(&self, v: &Verifier, ip: IpAddr, now: Instant) -> Arc<Slot> {
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = shard.get(&ip) {
            if s.get().is_none_or(|(_, expires)| *expires > now) {
                return s.clone();
            }
        }
        let cap = v.max_entries.div_ceil(SHARDS).max(1);
        if shard.len() >= cap && !shard.contains_key(&ip) {
            shard.retain(|_, s| s.get().is_none_or(|(_, expires)| *expires > now));
            if shard.len() >= cap {
                // Still full of live entries: drop one (the map's order is arbitrary) rather
                // than grow without bound under a flood of distinct IPs.
                if let Some(k) = shard.keys().next().copied() {
                    shard.remove(&k);
                }
            }
        }
        let s = Arc::new(Slot::new());
        shard.insert(ip, s.clone());
        s
    }

    /// The resolver for the serving settings (built, or rebuilt, on first need).
    fn resolver(&self, v: &Verifier) -> Option<TokioResolver> {
        let key = (v.resolver, v.timeout);
        let mut r = self.resolver.lock().unwrap_or_else(|p| p.into_inner());
        if r.as_ref().is_none_or(|r| r.key != key) {
            let built = build_resolver(v.resolver, v.timeout)
                .inspect_err(|e| {
                    tracing::error!("crawler verification: cannot set up a DNS resolver: {e}")
                })
                .ok();
            *r = Some(Resolver {
                key,
                resolver: built,
            });
        }
        r.as_ref().and_then(|r| r.resolver.clone())
    }

    async fn lookup(&self, v: &Verifier, ip: IpAddr) -> Lookup {
        let Some(resolver) = self.resolver(v) else {
            return Lookup::Failed;
        };
        tokio::time::timeout(v.timeout, fcrdns(&resolver, &v.domains, ip))
            .await
            .unwrap_or(Lookup::Failed)
    }
}

/// Forward-confirmed reverse DNS of `ip`, limited to PTR names under `domains`.
async fn fcrdns(resolver: &TokioResolver, domains: &[String], ip: IpAddr) -> Lookup {
    let ptr = match resolver.reverse_lookup(ip).await {
        Ok(l) => l,
        Err(e) if no_records(&e) => return Lookup::Confirmed(Vec::new()),
        Err(e) => {
            tracing::debug!(%ip, "PTR lookup failed: {e}");
            return Lookup::Failed;
        }
    };
    let names = ptr.answers().iter().filter_map(|r| match &r.data {
        RData::PTR(p) => Some(p.0.clone()),
        _ => None,
    });
    let mut confirmed = Vec::new();
    let mut failed = false;
    // A handful at most: an address has one PTR name, rarely a few.
    for name in names.take(4) {
        let text = name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
        if !domains.iter().any(|d| under_domain(&text, d)) {
            continue;
        }
        let forward = match ip {
            IpAddr::V4(_) => resolver.ipv4_lookup(name).await,
            IpAddr::V6(_) => resolver.ipv6_lookup(name).await,
        };
        match forward {
            Ok(l) => {
                let back = l.answers().iter().any(|r| match &r.data {
                    RData::A(a) => IpAddr::V4(a.0) == ip,
                    RData::AAAA(a) => IpAddr::V6(a.0) == ip,
                    _ => false,
                });
                if back {
                    confirmed.push(text);
                }
            }
            Err(e) if no_records(&e) => {}
            Err(e) => {
                tracing::debug!(%ip, name = %text, "forward lookup failed: {e}");
                failed = true;
            }
        }
    }
    if confirmed.is_empty() && failed {
        Lookup::Failed
    } else {
        Lookup::Confirmed(confirmed)
    }
}

/// NXDOMAIN or an empty answer: DNS answered, there is nothing.
fn no_records(e: &NetError) -> bool {
    e.is_no_records_found()
}

fn build_resolver(addr: Option<SocketAddr>, timeout: Duration) -> Result<TokioResolver, NetError> {
    let mut builder = match addr {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let server = NameServerConfig::new(addr.ip(), true, vec![udp]);
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![server]),
                TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()?,
    };
    let o = builder.options_mut();
    // One attempt within the whole budget; our own cache only (it knows what we asked for),
    // and DNS only: /etc/hosts has no say in who Googlebot is.
    o.timeout = timeout;
    o.attempts = 1;
    o.cache_size = 0;
    o.use_hosts_file = ResolveHosts::Never;
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_match_on_label_boundaries_only() {
        assert!(under_domain(
            "crawl-66-249-66-1.googlebot.com",
            "googlebot.com"
        ));
        assert!(under_domain(
            "crawl-66-249-66-1.googlebot.com.",
            "googlebot.com"
        ));
        assert!(under_domain("CRAWL-1.GoogleBot.COM", "googlebot.com"));
        assert!(under_domain("googlebot.com", "googlebot.com"));
        assert!(under_domain("msnbot-1.search.msn.com", "search.msn.com."));
        assert!(!under_domain("evilgooglebot.com", "googlebot.com"));
        assert!(!under_domain("crawl.evilgooglebot.com", "googlebot.com"));
        assert!(!under_domain("googlebot.com.evil.example", "googlebot.com"));
        assert!(!under_domain("msn.com", "search.msn.com"));
        assert!(!under_domain("x.googlebot.co", "googlebot.com"));
        assert!(!under_domain("anything.com", ""));
    }

    fn verifier(rules: Vec<VerifyRule>) -> Verifier {
        Verifier::compile(
            "bots",
            &rules,
            &VerifyCacheSettings::default(),
            default_verify_timeout(),
            None,
        )
        .unwrap()
    }

    #[test]
    fn claims_and_verdicts() {
        let v = verifier(default_verify());
        let google = v
            .claim(b"Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)")
            .unwrap();
        assert_eq!(v.crawlers[google].name, "googlebot");
        let bing = v
            .claim(b"Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)")
            .unwrap();
        assert_eq!(v.crawlers[bing].name, "bingbot");
        assert_eq!(
            v.claim(b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0"),
            None
        );
        let confirmed = Lookup::Confirmed(vec!["crawl-66-249-66-1.googlebot.com".into()]);
        assert_eq!(v.verdict(google, &confirmed), Verdict::Verified);
        assert_eq!(
            v.verdict(bing, &confirmed),
            Verdict::Fake,
            "another crawler's IP"
        );
        assert_eq!(v.verdict(google, &Lookup::Confirmed(vec![])), Verdict::Fake);
        assert_eq!(v.verdict(google, &Lookup::Failed), Verdict::Error);
        assert!(verifier(vec![]).claim(b"Googlebot").is_none());
    }

    #[test]
    fn bad_settings_are_reported() {
        let rules = vec![
            VerifyRule {
                name: "g".into(),
                user_agent: "".into(),
                domains: vec![".googlebot.com".into(), "ok.com".into()],
            },
            VerifyRule {
                name: "g".into(),
                user_agent: "x".into(),
                domains: vec![],
            },
        ];
        let cache = VerifyCacheSettings {
            negative_ttl: Dur(Duration::ZERO),
            max_entries: 0,
            ..VerifyCacheSettings::default()
        };
        let errs = Verifier::compile(
            "bots",
            &rules,
            &cache,
            Dur(Duration::from_secs(60)),
            Some("dns.example:53"),
        )
        .unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bots.verify[0].user_agent",
                "bots.verify[0].domains[0]",
                "bots.verify[1].name",
                "bots.verify[1].domains",
                "bots.verify_cache.negative_ttl",
                "bots.verify_cache.max_entries",
                "bots.verify_timeout",
                "bots.resolver",
            ]
        );
        assert_eq!(
            parse_resolver("127.0.0.1"),
            Some("127.0.0.1:53".parse().unwrap())
        );
        assert_eq!(
            parse_resolver("[::1]:5353"),
            Some("[::1]:5353".parse().unwrap())
        );
    }
}
