//! JSON Web Key Sets: parsing them into [`KeySet`]s, and keeping the sets of `jwks_url`s fresh.
//!
//! A [`JwksRegistry`] lives for the whole process. Each compiled issuer with a `jwks_url` holds
//! an `Arc<JwksSource>` from it; the registry holds only `Weak`s, so a source lives exactly as
//! long as some config snapshot uses its URL, and the keys of a URL survive every reload that
//! keeps it. [`JwksFetcher`] (a Pingora background service) calls [`JwksRegistry::run_due`]
//! every second; requests never wait for the network, they read the current set lock-free.
//!
//! Must never: drop working keys because a fetch failed (down, non-200, too large, garbage,
//! or no usable key: the previous set stays), follow redirects, or log key material.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use jsonwebtoken::Algorithm;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use serde::Deserialize;
use serde_json::Value;
use tokio::task::JoinSet;

use super::jwt::{alg_name, config_alg, valid_kid, VerifyKey};

/// A JWKS document larger than this is refused (from a file or a URL).
pub const MAX_JWKS_BYTES: u64 = 1024 * 1024;

/// Keys kept from one JWKS; identity providers publish a handful.
pub const MAX_JWKS_KEYS: usize = 100;

/// Whole-request timeout of a JWKS fetch, connect included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// How often [`JwksFetcher`] looks for due sources.
const TICK: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Key sets

/// Verification keys, in the order their source listed them. Immutable: a refresh builds a
/// new set and swaps it in whole.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<VerifyKey>,
}

/// A parsed JWKS: the usable keys, and why each other key was skipped (for a warning).
#[derive(Debug)]
pub struct ParsedJwks {
    pub keys: KeySet,
    pub skipped: Vec<String>,
}

impl KeySet {
    pub fn new(keys: Vec<VerifyKey>) -> Self {
        Self { keys }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, VerifyKey> {
        self.keys.iter()
    }

    /// Keys with this kid (one per algorithm at most, usually one).
    pub fn with_kid<'a, 'k>(
        &'a self,
        kid: &'k str,
    ) -> impl Iterator<Item = &'a VerifyKey> + use<'a, 'k> {
        self.keys.iter().filter(move |k| k.kid() == Some(kid))
    }

    pub fn into_keys(self) -> Vec<VerifyKey> {
        self.keys
    }

    /// Parses a JWKS document (`{"keys": [...]}`). Only a document that is not a JWKS at all
    /// is an error; a key we cannot use is skipped, with its reason in `skipped` (except
    /// `use: enc` keys, which are simply not for us).
    pub fn from_jwks(json: &[u8]) -> Result<ParsedJwks, String> {
        #[derive(Deserialize)]
        struct Document {
            keys: Vec<Value>,
        }
        let doc: Document =
            serde_json::from_slice(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut keys: Vec<VerifyKey> = Vec::new();
        let mut skipped = Vec::new();
        for (i, value) in doc.keys.into_iter().enumerate() {
            if keys.len() == MAX_JWKS_KEYS {
                skipped.push(format!(
                    "keys[{i}] and later: more than {MAX_JWKS_KEYS} keys"
                ));
                break;
            }
            match jwk_key(value) {
                Ok(key)
                    if keys
                        .iter()
                        .any(|k| k.kid() == key.kid() && k.algorithm() == key.algorithm()) =>
                {
                    skipped.push(format!(
                        "keys[{i}]: same kid and algorithm as an earlier key"
                    ));
                }
                Ok(key) => keys.push(key),
                Err(Skip::Silently) => {}
                Err(Skip::Because(why)) => skipped.push(format!("keys[{i}]: {why}")),
            }
        }
        Ok(ParsedJwks {
            keys: KeySet::new(keys),
            skipped,
        })
    }
}

/// Why a JWK is not used.
enum Skip {
    /// An encryption key: present in many JWKS, never for us, not worth a warning.
    Silently,
    Because(String),
}

impl From<String> for Skip {
    fn from(why: String) -> Self {
        Skip::Because(why)
    }
}

/// The JWK members we read (RFC 7517, RFC 7518 §6); others (`x5c`, private members...) are
/// ignored.
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    key_ops: Option<Vec<String>>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    k: Option<String>,
}

/// One JWK into a key pinned to one algorithm:
/// - `alg` when given (it must fit the key type);
/// - otherwise the only one the type allows: `EC` P-256 → ES256, P-384 → ES384, `OKP`
///   Ed25519 → EdDSA; and for `RSA` → RS256, `oct` → HS256 (the JWS defaults, RFC 7518 §3.1);
///   an IdP using PS* or HS384/512 must say so in `alg`.
fn jwk_key(value: Value) -> Result<VerifyKey, Skip> {
    let jwk: RawJwk = serde_json::from_value(value).map_err(|_| {
        // Not serde's message: it can quote a member's value, and that could be key material.
        "not a JWK object with string members".to_string()
    })?;
    if let Some(usage) = &jwk.use_ {
        if usage == "enc" {
            return Err(Skip::Silently);
        }
        if usage != "sig" {
            return Err(format!("`use` {} is not `sig`", shown(usage)).into());
        }
    }
    if let Some(ops) = &jwk.key_ops {
        if !ops.iter().any(|op| op == "verify") {
            return Err("`key_ops` does not include `verify`".to_string().into());
        }
    }
    if let Some(kid) = &jwk.kid {
        if !valid_kid(kid) {
            return Err("its kid breaks the key id rule".to_string().into());
        }
    }
    let named = match jwk.alg.as_deref() {
        Some(name) => Some(
            config_alg(name)
                .filter(|a| alg_name(*a) == name)
                .ok_or_else(|| format!("unsupported algorithm {}", shown(name)))?,
        ),
        None => None,
    };
    let kid = jwk.kid.clone();
    let key = match jwk.kty.as_str() {
        "RSA" => rsa_key(&jwk, named.unwrap_or(Algorithm::RS256), kid),
        "EC" => ec_key(&jwk, named, kid),
        "OKP" => okp_key(&jwk, named, kid),
        "oct" => {
            let k = member(&jwk.k, "k")?;
            VerifyKey::from_secret(named.unwrap_or(Algorithm::HS256), &k, kid)
        }
        other => Err(format!("unsupported key type {}", shown(other))),
    };
    key.map_err(Skip::Because)
}

fn rsa_key(jwk: &RawJwk, alg: Algorithm, kid: Option<String>) -> Result<VerifyKey, String> {
    let n = member(&jwk.n, "n")?;
    let e = member(&jwk.e, "e")?;
    VerifyKey::from_rsa(alg, &n, &e, kid)
}

fn ec_key(
    jwk: &RawJwk,
    named: Option<Algorithm>,
    kid: Option<String>,
) -> Result<VerifyKey, String> {
    let (alg, size) = match jwk.crv.as_deref() {
        Some("P-256") => (Algorithm::ES256, 32),
        Some("P-384") => (Algorithm::ES384, 48),
        Some(other) => return Err(format!("unsupported curve {}", shown(other))),
        None => return Err("an EC key without `crv`".into()),
    };
    if named.is_some_and(|n| n != alg) {
        return Err("`alg` does not fit the curve".into());
    }
    let x = member(&jwk.x, "x")?;
    let y = member(&jwk.y, "y")?;
    if x.len() != size || y.len() != size {
        return Err(format!("coordinates must be {size} bytes each"));
    }
    let mut point = Vec::with_capacity(1 + 2 * size);
    point.push(0x04);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    VerifyKey::from_ec_point(alg, &point, kid)
}

fn okp_key(
    jwk: &RawJwk,
    named: Option<Algorithm>,
    kid: Option<String>,
) -> Result<VerifyKey, String> {
    match jwk.crv.as_deref() {
        Some("Ed25519") => {}
        Some(other) => return Err(format!("unsupported curve {}", shown(other))),
        None => return Err("an OKP key without `crv`".into()),
    }
    if named.is_some_and(|n| n != Algorithm::EdDSA) {
        return Err("`alg` does not fit an Ed25519 key".into());
    }
    let x = member(&jwk.x, "x")?;
    VerifyKey::from_ed25519(Algorithm::EdDSA, &x, kid)
}

/// A value from the JWKS, fit for a log line: quoted, escaped, at most 40 characters.
fn shown(value: &str) -> String {
    let mut short: String = value.chars().take(40).collect();
    if short.len() < value.len() {
        short.push_str("...");
    }
    format!("{short:?}")
}

/// A base64url member (padding tolerated: some publishers add it).
fn member(value: &Option<String>, name: &str) -> Result<Vec<u8>, String> {
    let engine = GeneralPurpose::new(
        &alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let text = value
        .as_deref()
        .ok_or_else(|| format!("`{name}` is missing"))?;
    engine
        .decode(text)
        .map_err(|_| format!("`{name}` is not base64url"))
}

// ---------------------------------------------------------------------------------------------
// Sources

/// The keys of one JWKS URL, and how fetching it goes.
pub struct JwksSource {
    url: String,
    /// Milliseconds; set by the config compiled last that names this URL.
    refresh_ms: AtomicU64,
    keys: ArcSwap<KeySet>,
    /// A fetch has succeeded once: an empty set then means "no such key", not "not yet".
    loaded: AtomicBool,
    /// A token named an unknown kid: fetch again once `min_refetch` allows.
    refresh_requested: AtomicBool,
    state: Mutex<FetchState>,
}

#[derive(Default)]
struct FetchState {
    last_attempt: Option<Instant>,
    last_success_unix: Option<u64>,
    consecutive_failures: u32,
    last_error: Option<String>,
    /// The last document that parsed, to skip re-parsing (and re-warning) an unchanged one.
    last_body: Vec<u8>,
}

/// A source as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JwksStatus {
    pub url: String,
    /// Keys in the current set.
    pub keys: usize,
    /// Last successful fetch, seconds since the epoch.
    pub last_success_unix: Option<u64>,
    pub consecutive_failures: u32,
    /// Why the last fetch failed, while it keeps failing.
    pub last_error: Option<String>,
}

impl JwksSource {
    fn new(url: &str, refresh: Duration) -> Self {
        Self {
            url: url.to_string(),
            refresh_ms: AtomicU64::new(millis(refresh)),
            keys: ArcSwap::from_pointee(KeySet::default()),
            loaded: AtomicBool::new(false),
            refresh_requested: AtomicBool::new(false),
            state: Mutex::new(FetchState::default()),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The current set: one lock-free load, never waits for a fetch.
    pub fn keys(&self) -> Arc<KeySet> {
        self.keys.load_full()
    }

    /// The current set for the duration of one request, without touching the refcount.
    pub(crate) fn current(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.keys.load()
    }

    /// Whether a fetch has ever succeeded.
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Asks for a fetch soon (a token named an unknown kid). Cheap enough for the request
    /// path; [`JwksRegistry::run_due`] honours it at most once per `min_refetch`.
    pub fn request_refresh(&self) {
        self.refresh_requested.store(true, Ordering::Release);
    }

    pub fn status(&self) -> JwksStatus {
        let state = self.state();
        JwksStatus {
            url: self.url.clone(),
            keys: self.keys.load().len(),
            last_success_unix: state.last_success_unix,
            consecutive_failures: state.consecutive_failures,
            last_error: state.last_error.clone(),
        }
    }

    fn refresh(&self) -> Duration {
        Duration::from_millis(self.refresh_ms.load(Ordering::Relaxed))
    }

    /// A poisoned lock only means a panic elsewhere mid-update of plain fields: keep going.
    fn state(&self) -> MutexGuard<'_, FetchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether to fetch now; if so, the attempt is recorded at once so no other caller
    /// starts the same fetch. Due when never tried; when the refresh interval (or, while
    /// failing, a backoff from `min_refetch` doubling up to the interval) has passed; or when
    /// a refresh was requested and the last attempt is `min_refetch` old.
    fn claim_if_due(&self, now: Instant, min_refetch: Duration) -> bool {
        let mut state = self.state();
        let due = match state.last_attempt {
            None => true,
            Some(last) => {
                let since = now.saturating_duration_since(last);
                let interval = match state.consecutive_failures {
                    0 => self.refresh(),
                    n => backoff(n, min_refetch).min(self.refresh()),
                };
                since >= interval
                    || (since >= min_refetch && self.refresh_requested.load(Ordering::Acquire))
            }
        };
        if due {
            state.last_attempt = Some(now);
            self.refresh_requested.store(false, Ordering::Release);
        }
        due
    }

    /// Takes a fetch result: a new usable set replaces the old one; anything else keeps it.
    fn apply(&self, fetched: Result<Vec<u8>, String>) {
        let body = match fetched {
            Ok(body) => body,
            Err(e) => return self.failed(e),
        };
        if self.loaded() && self.state().last_body == body {
            self.succeeded(None);
            return;
        }
        let parsed = match KeySet::from_jwks(&body) {
            Ok(parsed) => parsed,
            Err(e) => return self.failed(e),
        };
        for reason in &parsed.skipped {
            tracing::warn!(url = %self.url, "JWKS key skipped: {reason}");
        }
        if parsed.keys.is_empty() {
            return self.failed("no usable key in the JWKS".into());
        }
        self.keys.store(Arc::new(parsed.keys));
        self.loaded.store(true, Ordering::Release);
        self.succeeded(Some(body));
    }

    fn succeeded(&self, new_body: Option<Vec<u8>>) {
        let keys = self.keys.load().len();
        let changed = new_body.is_some();
        let mut state = self.state();
        if let Some(body) = new_body {
            state.last_body = body;
        }
        state.last_success_unix = Some(unix_now());
        state.consecutive_failures = 0;
        state.last_error = None;
        drop(state);
        tracing::info!(url = %self.url, keys, changed, "JWKS fetched");
    }

    fn failed(&self, error: String) {
        let mut state = self.state();
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        let failures = state.consecutive_failures;
        state.last_error = Some(error.clone());
        drop(state);
        let kept = self.keys.load().len();
        tracing::warn!(url = %self.url, failures, kept_keys = kept, "JWKS fetch failed, keeping the previous keys: {error}");
    }
}

/// `min_refetch`, doubled per failure after the first, up to 16 times it.
fn backoff(failures: u32, min_refetch: Duration) -> Duration {
    min_refetch.saturating_mul(1 << failures.saturating_sub(1).min(4))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------------------------
// The registry

/// Every JWKS URL some live config uses. Process-wide; outlives reloads.
pub struct JwksRegistry {
    sources: Mutex<HashMap<String, Weak<JwksSource>>>,
    /// Built on first use: building it loads the system's CA roots.
    client: Mutex<Option<reqwest::Client>>,
    min_refetch: Duration,
}

impl Default for JwksRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl JwksRegistry {
    /// The shortest time between two fetches of one URL asked for by unknown kids: bounds
    /// what tokens with made-up kids can make us send to the identity provider.
    pub const MIN_REFETCH: Duration = Duration::from_secs(10);

    pub fn new() -> Self {
        Self::with_min_refetch(Self::MIN_REFETCH)
    }

    /// A registry with another refetch floor (tests).
    pub fn with_min_refetch(min_refetch: Duration) -> Self {
        Self {
            sources: Mutex::new(HashMap::new()),
            client: Mutex::new(None),
            min_refetch,
        }
    }

    /// The source for `url`, shared with earlier snapshots so its keys survive a reload. The
    /// refresh interval becomes `refresh` (the config compiled last wins).
    pub fn source(&self, url: &str, refresh: Duration) -> Arc<JwksSource> {
        let mut sources = self.sources();
        if let Some(live) = sources.get(url).and_then(Weak::upgrade) {
            live.refresh_ms.store(millis(refresh), Ordering::Relaxed);
            return live;
        }
        let source = Arc::new(JwksSource::new(url, refresh));
        sources.insert(url.to_string(), Arc::downgrade(&source));
        source
    }

    /// Status of every live source, by URL.
    pub fn statuses(&self) -> Vec<JwksStatus> {
        let mut all: Vec<JwksStatus> = self.live().iter().map(|s| s.status()).collect();
        all.sort_by(|a, b| a.url.cmp(&b.url));
        all
    }

    /// Fetches every live source that is due (see [`JwksSource`]'s rules: interval elapsed,
    /// failure backoff elapsed, or a requested refresh at least `min_refetch` after the last
    /// attempt), concurrently, and returns when all are done. Drops URLs no config uses.
    pub async fn run_due(&self) {
        let now = Instant::now();
        let due: Vec<Arc<JwksSource>> = self
            .live()
            .into_iter()
            .filter(|s| s.claim_if_due(now, self.min_refetch))
            .collect();
        if due.is_empty() {
            return;
        }
        let client = match self.client() {
            Ok(client) => client,
            Err(e) => {
                due.iter().for_each(|s| s.failed(e.clone()));
                return;
            }
        };
        let mut fetches = JoinSet::new();
        for source in due {
            let client = client.clone();
            fetches.spawn(async move {
                let fetched = fetch(&client, &source.url).await;
                source.apply(fetched);
            });
        }
        while fetches.join_next().await.is_some() {}
    }

    /// Live sources; forgets the dead ones on the way.
    fn live(&self) -> Vec<Arc<JwksSource>> {
        let mut sources = self.sources();
        sources.retain(|_, weak| weak.strong_count() > 0);
        sources.values().filter_map(Weak::upgrade).collect()
    }

    fn sources(&self) -> MutexGuard<'_, HashMap<String, Weak<JwksSource>>> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn client(&self) -> Result<reqwest::Client, String> {
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            // Only a 200 from the configured URL counts: a redirect could lead anywhere,
            // https to http included.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))?;
        *slot = Some(client.clone());
        Ok(client)
    }
}

/// GETs `url`: only a 200 whose body fits [`MAX_JWKS_BYTES`], within [`FETCH_TIMEOUT`].
async fn fetch(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let too_large = || format!("response larger than {MAX_JWKS_BYTES} bytes");
    let mut response = client
        .get(url)
        .header("accept", "application/jwk-set+json, application/json")
        .send()
        .await
        .map_err(|e| error_chain(&e.without_url()))?;
    let status = response.status();
    if status != reqwest::StatusCode::OK {
        return Err(format!("HTTP status {status}"));
    }
    if response
        .content_length()
        .is_some_and(|n| n > MAX_JWKS_BYTES)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| error_chain(&e.without_url()))?
    {
        if (body.len() + chunk.len()) as u64 > MAX_JWKS_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// An error and its causes on one line: reqwest's own message alone ("error sending
/// request") does not say what went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

// ---------------------------------------------------------------------------------------------
// The background service

/// Keeps every JWKS URL fresh: a Pingora background service that calls
/// [`JwksRegistry::run_due`] every second until shutdown.
pub struct JwksFetcher {
    pub registry: Arc<JwksRegistry>,
}

#[async_trait]
impl BackgroundService for JwksFetcher {
    /// Runs from server start to shutdown; a fetch in progress at shutdown is abandoned.
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                _ = self.registry.run_due() => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::policy::auth::jwt::tests::{
        claims, compile_yaml, fixture, key_file, sign_all, spec, NOW,
    };
    use crate::policy::auth::jwt::{Issuer, JwtError};

    /// A JWKS endpoint on loopback: answers every request with the current status and body,
    /// and counts requests.
    struct Endpoint {
        addr: SocketAddr,
        reply: Arc<Mutex<(u16, Vec<u8>)>>,
        hits: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl Endpoint {
        async fn start(body: &str) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let reply = Arc::new(Mutex::new((200, body.as_bytes().to_vec())));
            let hits = Arc::new(AtomicUsize::new(0));
            let (r, h) = (reply.clone(), hits.clone());
            let task = tokio::spawn(async move {
                while let Ok((mut stream, _)) = listener.accept().await {
                    h.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = r.lock().unwrap().clone();
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = stream.write_all(head.as_bytes()).await;
                        let _ = stream.write_all(&body).await;
                        let _ = stream.shutdown().await;
                    });
                }
            });
            Endpoint {
                addr,
                reply,
                hits,
                task,
            }
        }

        fn url(&self) -> String {
            format!("http://{}/jwks.json", self.addr)
        }

        fn set(&self, status: u16, body: &str) {
            *self.reply.lock().unwrap() = (status, body.as_bytes().to_vec());
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        /// Closes the listening socket: connections are refused from now on.
        async fn stop(self) {
            self.task.abort();
            let _ = self.task.await;
        }
    }

    /// JWKS documents: `rsa` as `rot-1`, `rsa2` as `rot-2`.
    fn jwks_docs() -> (String, String) {
        let one = json!([{ "key": key_file("rsa.key"), "kid": "rot-1", "alg": "RS256" }]);
        let two = json!([{ "key": key_file("rsa2.key"), "kid": "rot-2", "alg": "RS256" }]);
        (
            fixture(&["jwks", &one.to_string()]),
            fixture(&["jwks", &two.to_string()]),
        )
    }

    /// Tokens signed by `rsa` (kid rot-1), `rsa2` (kid rot-2), and `rsa` naming kid `rot-9`.
    fn rotation_tokens() -> Vec<String> {
        sign_all(&[
            spec("RS256", "rsa.key", Some("rot-1"), claims()),
            spec("RS256", "rsa2.key", Some("rot-2"), claims()),
            spec("RS256", "rsa.key", Some("rot-9"), claims()),
        ])
    }

    fn url_issuer(url: &str, registry: &JwksRegistry) -> Issuer {
        compile_yaml(&format!("jwks_url: {url}"), registry).unwrap()
    }

    const FLOOR: Duration = Duration::from_millis(500);

    async fn after_floor() {
        tokio::time::sleep(FLOOR + Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn fresh_sources_are_unavailable_until_fetched() {
        let (one, _) = jwks_docs();
        let tokens = rotation_tokens();
        let endpoint = Endpoint::start(&one).await;
        let registry = JwksRegistry::with_min_refetch(FLOOR);
        let issuer = url_issuer(&endpoint.url(), &registry);
        assert_eq!(endpoint.hits(), 0, "compiling fetches nothing");
        assert_eq!(
            issuer.verify_at(&tokens[0], NOW).unwrap_err(),
            JwtError::JwksUnavailable
        );
        let kidless = sign_all(&[spec("RS256", "rsa.key", None, claims())]).remove(0);
        assert_eq!(
            issuer.verify_at(&kidless, NOW).unwrap_err(),
            JwtError::JwksUnavailable
        );

        registry.run_due().await;
        assert_eq!(endpoint.hits(), 1);
        issuer.verify_at(&tokens[0], NOW).unwrap();
        issuer.verify_at(&kidless, NOW).unwrap();
        let status = issuer.jwks_source().unwrap().status();
        assert_eq!(status.keys, 1);
        assert_eq!(status.consecutive_failures, 0);
        assert!(status.last_success_unix.is_some());
        assert_eq!(registry.statuses(), vec![status]);
        endpoint.stop().await;
    }

    #[tokio::test]
    async fn rotation_is_picked_up_and_outages_keep_the_old_keys() {
        let (one, two) = jwks_docs();
        let tokens = rotation_tokens();
        let endpoint = Endpoint::start(&one).await;
        let registry = JwksRegistry::with_min_refetch(FLOOR);
        let issuer = url_issuer(&endpoint.url(), &registry);
        registry.run_due().await;
        issuer.verify_at(&tokens[0], NOW).unwrap();

        // The IdP rotates to rot-2. The first rot-2 token is unknown and asks for a refetch.
        endpoint.set(200, &two);
        assert_eq!(
            issuer.verify_at(&tokens[1], NOW).unwrap_err(),
            JwtError::UnknownKid
        );
        after_floor().await;
        registry.run_due().await;
        assert_eq!(endpoint.hits(), 2);
        issuer.verify_at(&tokens[1], NOW).unwrap();
        assert_eq!(
            issuer.verify_at(&tokens[0], NOW).unwrap_err(),
            JwtError::UnknownKid
        );

        // The refresh interval alone also picks up a rotation (a shorter one, as a reload
        // naming the same URL would set it).
        endpoint.set(200, &one);
        let _same = registry.source(&endpoint.url(), Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(150)).await;
        registry.run_due().await;
        assert_eq!(endpoint.hits(), 3);
        issuer.verify_at(&tokens[0], NOW).unwrap();

        // Bad answers and then no server at all: the keys stay, failures are counted.
        let mut failures = 0;
        for (status, body) in [
            (500, one.as_str()),
            (200, "{\"keys\": []}"),
            (200, "<html>"),
        ] {
            endpoint.set(status, body);
            tokio::time::sleep(Duration::from_millis(150)).await;
            registry.run_due().await;
            failures += 1;
            let status = issuer.jwks_source().unwrap().status();
            assert_eq!(status.consecutive_failures, failures, "{status:?}");
            issuer.verify_at(&tokens[0], NOW).unwrap();
        }
        let url = endpoint.url();
        endpoint.stop().await;
        issuer.jwks_source().unwrap().request_refresh();
        tokio::time::sleep(Duration::from_millis(500)).await;
        registry.run_due().await;
        let status = issuer.jwks_source().unwrap().status();
        assert_eq!(status.consecutive_failures, 4, "{status:?}");
        assert!(status.last_error.is_some());
        assert_eq!(status.keys, 1);
        assert_eq!(status.url, url);
        issuer.verify_at(&tokens[0], NOW).unwrap();
    }

    #[tokio::test]
    async fn unknown_kids_refetch_at_most_once_per_floor() {
        let (one, _) = jwks_docs();
        let tokens = rotation_tokens();
        let endpoint = Endpoint::start(&one).await;
        let registry = JwksRegistry::with_min_refetch(FLOOR);
        let issuer = url_issuer(&endpoint.url(), &registry);
        registry.run_due().await;
        assert_eq!(endpoint.hits(), 1);

        for _ in 0..50 {
            assert_eq!(
                issuer.verify_at(&tokens[2], NOW).unwrap_err(),
                JwtError::UnknownKid
            );
        }
        registry.run_due().await;
        assert_eq!(endpoint.hits(), 1, "too soon after the last fetch");
        after_floor().await;
        registry.run_due().await;
        assert_eq!(endpoint.hits(), 2, "one refetch for fifty unknown kids");
        registry.run_due().await;
        after_floor().await;
        registry.run_due().await;
        assert_eq!(endpoint.hits(), 2, "no request, no refetch");

        // Invalid kids never cause a fetch.
        let bad = sign_all(&[spec("RS256", "rsa.key", Some("../x"), claims())]).remove(0);
        assert_eq!(
            issuer.verify_at(&bad, NOW).unwrap_err(),
            JwtError::InvalidKid
        );
        after_floor().await;
        registry.run_due().await;
        assert_eq!(endpoint.hits(), 2);
        endpoint.stop().await;
    }

    #[tokio::test]
    async fn sources_are_shared_across_reloads_and_dropped_when_unused() {
        let (one, _) = jwks_docs();
        let tokens = rotation_tokens();
        let endpoint = Endpoint::start(&one).await;
        let registry = JwksRegistry::with_min_refetch(FLOOR);
        let first = url_issuer(&endpoint.url(), &registry);
        registry.run_due().await;

        // A reload compiles the issuer again: same source, keys already there.
        let second = url_issuer(&endpoint.url(), &registry);
        assert!(Arc::ptr_eq(
            first.jwks_source().unwrap(),
            second.jwks_source().unwrap()
        ));
        drop(first);
        second.verify_at(&tokens[0], NOW).unwrap();
        registry.run_due().await;
        assert_eq!(endpoint.hits(), 1, "a reload does not refetch");

        // A rejected config does not touch the registry.
        let broken = compile_yaml(
            &format!("jwks_url: {}/other\nleeway: 1h", endpoint.url()),
            &registry,
        );
        assert!(broken.is_err());
        assert_eq!(registry.statuses().len(), 1);

        drop(second);
        assert!(
            registry.statuses().is_empty(),
            "no config uses the URL any more"
        );
        after_floor().await;
        registry.run_due().await;
        assert_eq!(endpoint.hits(), 1);
        endpoint.stop().await;
    }

    #[tokio::test]
    async fn oversized_and_redirected_responses_are_refused() {
        let (one, _) = jwks_docs();
        let tokens = rotation_tokens();
        let endpoint = Endpoint::start(&one).await;
        let registry = JwksRegistry::with_min_refetch(FLOOR);
        let issuer = url_issuer(&endpoint.url(), &registry);
        registry.run_due().await;
        let source = issuer.jwks_source().unwrap();

        let huge = format!(
            "{{\"keys\": [], \"pad\": \"{}\"}}",
            "x".repeat(MAX_JWKS_BYTES as usize)
        );
        endpoint.set(200, &huge);
        source.request_refresh();
        after_floor().await;
        registry.run_due().await;
        let error = source.status().last_error.unwrap();
        assert!(error.contains("larger than"), "{error}");

        endpoint.set(302, "");
        source.request_refresh();
        tokio::time::sleep(FLOOR * 3).await;
        registry.run_due().await;
        assert_eq!(source.status().consecutive_failures, 2);
        assert!(source.status().last_error.unwrap().contains("302"));
        issuer.verify_at(&tokens[0], NOW).unwrap();
        endpoint.stop().await;
    }

    #[tokio::test]
    async fn the_fetcher_service_fetches_and_stops_at_shutdown() {
        let (one, _) = jwks_docs();
        let endpoint = Endpoint::start(&one).await;
        let registry = Arc::new(JwksRegistry::with_min_refetch(FLOOR));
        let issuer = url_issuer(&endpoint.url(), &registry);
        let (stop, watch) = tokio::sync::watch::channel(false);
        let fetcher = JwksFetcher {
            registry: registry.clone(),
        };
        let service = tokio::spawn(async move { fetcher.start(watch).await });
        for _ in 0..40 {
            if issuer.jwks_source().unwrap().loaded() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(issuer.jwks_source().unwrap().loaded());
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), service)
            .await
            .expect("the service returns at shutdown")
            .unwrap();
        endpoint.stop().await;
    }

    #[test]
    fn failure_backoff_doubles_up_to_sixteen_times_the_floor() {
        let floor = Duration::from_secs(10);
        let got: Vec<u64> = (1..=7).map(|n| backoff(n, floor).as_secs()).collect();
        assert_eq!(got, [10, 20, 40, 80, 160, 160, 160]);
    }

    #[test]
    fn jwk_rules() {
        let parse = |keys: Value| {
            KeySet::from_jwks(json!({ "keys": keys }).to_string().as_bytes()).unwrap()
        };
        let rsa: Value = serde_json::from_str(&fixture(&[
            "jwks",
            &json!([{ "key": key_file("rsa.key") }]).to_string(),
        ]))
        .unwrap();
        let rsa = rsa["keys"][0].clone();
        let with = |extra: Value| {
            let mut k = rsa.clone();
            k.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            k
        };
        let parsed = parse(json!([
            with(json!({ "kid": "a" })),
            with(json!({ "kid": "a" })),
            with(json!({ "kid": "a", "alg": "PS256" })),
            with(json!({ "kid": "b", "key_ops": ["verify"] })),
            with(json!({ "kid": "c", "key_ops": ["encrypt"] })),
            with(json!({ "kid": "d", "use": "enc" })),
            with(json!({ "kid": "e", "use": "other" })),
            with(json!({ "kid": "f", "alg": "rs256" })),
            with(json!({ "kid": "g", "alg": "ES256" })),
            with(json!({ "kid": "h", "e": "AQ" })),
            with(json!({ "kid": 7 })),
            json!("not an object"),
            json!({ "kty": "forged\nlog line" }),
        ]));
        let kept: Vec<(Option<&str>, Algorithm)> = parsed
            .keys
            .iter()
            .map(|k| (k.kid(), k.algorithm()))
            .collect();
        assert_eq!(
            kept,
            [
                (Some("a"), Algorithm::RS256),
                (Some("a"), Algorithm::PS256),
                (Some("b"), Algorithm::RS256)
            ]
        );
        assert_eq!(parsed.skipped.len(), 9, "{:?}", parsed.skipped);
        assert!(
            parsed.skipped.iter().all(|s| !s.contains('\n')),
            "log lines stay single"
        );
        let many: Vec<Value> = (0..MAX_JWKS_KEYS + 5)
            .map(|i| with(json!({ "kid": format!("k{i}") })))
            .collect();
        let parsed = parse(Value::from(many));
        assert_eq!(parsed.keys.len(), MAX_JWKS_KEYS);
        assert_eq!(parsed.skipped.len(), 1);
        // No key material in the reasons.
        let n = rsa["n"].as_str().unwrap();
        assert!(parsed.skipped.iter().all(|s| !s.contains(&n[..16])));
    }
}
