//! What authentication costs per request: `Issuer::verify` for HS256, RS256 (2048 bits), ES256
//! and EdDSA tokens; `hmac::verify` of a signed GET (HmacSHA256, 3 query parameters, the
//! signers' default signed headers); `NonceStore::check_and_insert`; `key::lookup` in a table
//! of 100 000 keys; and the whole `RoutePolicy::authenticate` (credential extraction, lookup or
//! verification, identity) for an API-key route and a JWT route.
//!
//! Keys, tokens and the HMAC signature come from the independent signers in `tests/fixtures`
//! (`/usr/bin/python3`, with PyJWT and cryptography), run once at start; the config goes
//! through the public loaders (`load_consumers`, `ConsumerTable::compile`,
//! `RoutePolicy::compile`). The allocator is jemalloc, as in the `tollgate` binary, wrapped to
//! count allocations: each case prints its allocations per call before it is measured.
//!
//! Nonces: a nonce is accepted once, so a request cannot be replayed across iterations. The
//! steady-state HMAC figures are for routes with `require_nonce: false` and a request without
//! `X-Ca-Nonce`; `nonce_store/check_and_insert` is the part a nonce adds; and
//! `hmac_verify/sha256_with_nonce` is the whole thing, each request signed (outside the timing)
//! with a fresh nonce.
//!
//! Run: `cargo bench --bench auth` (~2 min after the build; `-- jwt_verify` for one group).

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::hmac::{Hmac, Mac};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use criterion::measurement::WallTime;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion};
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora_http::RequestHeader;
use serde_json::json;
use sha2::Sha256;
use tikv_jemallocator::Jemalloc;
use tollgate::config::{load_consumers, RouteAuth};
use tollgate::policy::auth::hmac::{
    self as ca, Dialect, HmacKeys, HmacRequest, HmacSecret, HmacSettings,
};
use tollgate::policy::auth::jwks::JwksRegistry;
use tollgate::policy::auth::jwt::{Issuer, IssuerSpec};
use tollgate::policy::auth::key::{self, ApiKeys};
use tollgate::policy::auth::nonce::NonceStore;
use tollgate::policy::auth::{ConsumerTable, RoutePolicy};

/// jemalloc, counting allocations (`alloc`, `alloc_zeroed` and `realloc`).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to jemalloc; the counter has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        Jemalloc.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        Jemalloc.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Jemalloc.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        Jemalloc.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations per call of `op`, averaged over 1 000 calls after one to warm up.
fn allocations_per_call<R>(mut op: impl FnMut() -> R) -> f64 {
    const CALLS: u64 = 1_000;
    drop(op());
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..CALLS {
        drop(black_box(op()));
    }
    (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / CALLS as f64
}

/// Prints the allocations of `op`, then measures it.
fn case<R>(
    group: &mut BenchmarkGroup<WallTime>,
    group_name: &str,
    name: &str,
    mut op: impl FnMut() -> R,
) {
    let allocations = allocations_per_call(&mut op);
    eprintln!("{group_name}/{name}: {allocations:.1} allocations per call");
    group.bench_function(name, |b| b.iter(&mut op));
}

fn python(script: &str, args: &[&str]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(script);
    let out = Command::new("/usr/bin/python3")
        .arg(&path)
        .args(args)
        .output()
        .expect("/usr/bin/python3 runs");
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("the signers print UTF-8")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

const ISSUER: &str = "https://idp.example.com/";
/// Three query parameters, as the HMAC and authenticate requests carry.
const TARGET: &str = "/api/orders?status=open&page=2&limit=50";
const ACCESS_KEY: &str = "bench-ak-0001";
const HMAC_SECRET: &str = "bench-hmac-secret-0123456789abcdef";

/// Keys and tokens, written once into a temp dir by `jwt_sign.py`.
struct Jwt {
    dir: tempfile::TempDir,
    /// (case, algorithm, kid, private key file, public key file or None for a secret)
    algorithms: Vec<(
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        Option<&'static str>,
    )>,
    /// One token per algorithm, same order.
    tokens: Vec<String>,
}

impl Jwt {
    fn new() -> Jwt {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = |f: &str| dir.path().join(f).display().to_string();
        python("jwt_sign.py", &["keygen", &path("")]);
        let algorithms = vec![
            ("hs256", "HS256", "hs", "hs256.secret", None),
            ("rs256", "RS256", "rsa", "rsa.key", Some("rsa.pub.pem")),
            ("es256", "ES256", "ec", "ec256.key", Some("ec256.pub.pem")),
            (
                "eddsa",
                "EdDSA",
                "ed",
                "ed25519.key",
                Some("ed25519.pub.pem"),
            ),
        ];
        let now = unix_now();
        let claims = json!({
            "iss": ISSUER,
            "sub": "user-4242",
            "aud": "orders-api",
            "iat": now,
            "exp": now + 86_400,
            "scope": "orders:read orders:write",
        });
        let specs: Vec<_> = algorithms
            .iter()
            .map(|(_, alg, kid, key, _)| {
                json!({ "alg": alg, "key": path(key), "claims": claims, "header": { "kid": kid } })
            })
            .collect();
        let tokens: Vec<String> = python("jwt_sign.py", &["sign", &json!(specs).to_string()])
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(tokens.len(), algorithms.len());
        Jwt {
            dir,
            algorithms,
            tokens,
        }
    }

    fn secret(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hs256.secret")).expect("keygen wrote it")
    }

    /// `jwt_issuers.<case>` with the one key of algorithm `i`, checking `iss` and `aud`.
    fn issuer_spec(&self, i: usize) -> serde_json::Value {
        let (_, alg, kid, _, public) = self.algorithms[i];
        let key = match public {
            Some(pem) => json!({ "algorithm": alg, "kid": kid, "pem": self.dir.path().join(pem) }),
            None => json!({ "algorithm": alg, "kid": kid, "secret": self.secret() }),
        };
        json!({ "issuer": ISSUER, "audiences": ["orders-api"], "keys": [key] })
    }
}

fn bench_jwt(c: &mut Criterion, jwt: &Jwt) {
    let registry = JwksRegistry::new();
    let mut group = c.benchmark_group("jwt_verify");
    for (i, (name, ..)) in jwt.algorithms.iter().enumerate() {
        let spec: IssuerSpec =
            serde_json::from_value(jwt.issuer_spec(i)).expect("issuer spec parses");
        let issuer = Issuer::compile(
            &format!("jwt_issuers.{name}"),
            &spec,
            jwt.dir.path(),
            &registry,
        )
        .unwrap_or_else(|e| panic!("{name} issuer compiles: {e:?}"));
        let token = &jwt.tokens[i];
        let claims = issuer
            .verify(token)
            .unwrap_or_else(|e| panic!("{name} token verifies: {e:?}"));
        assert_eq!(claims["sub"], "user-4242");
        case(&mut group, "jwt_verify", name, || {
            issuer.verify(black_box(token))
        });
    }
    group.finish();
}

/// A header map from (name, value) pairs.
fn header_map<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> HeaderMap {
    pairs
        .into_iter()
        .map(|(k, v)| {
            let name = HeaderName::from_bytes(k.as_bytes()).expect("a header name");
            (name, HeaderValue::from_str(v).expect("a header value"))
        })
        .collect()
}

/// The headers of a GET to [`TARGET`] that a client sends besides the signature ones.
const PLAIN_HEADERS: [(&str, &str); 3] = [
    ("host", "api.example.com"),
    ("user-agent", "bench/1.0"),
    ("accept", "application/json"),
];

/// Signs [`TARGET`] with `ca_sign.py` (every `X-Ca-*` header signed, its default): the
/// headers to add, by name.
fn ca_sign(extra: &[&str]) -> BTreeMap<String, String> {
    let headers = json!({ "Accept": "application/json" }).to_string();
    let mut args = vec![
        "--method",
        "GET",
        "--target",
        TARGET,
        "--headers",
        &headers,
        "--key",
        ACCESS_KEY,
        "--secret",
        HMAC_SECRET,
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&python("ca_sign.py", &args)).expect("ca_sign.py prints a JSON object")
}

/// Signs `headers` (which lists `X-Ca-Nonce` in `X-Ca-Signature-Headers`) for [`TARGET`] with
/// a fresh timestamp and `nonce`, as `ca_sign.py` would; checked against it once at start.
fn sign_in_rust(headers: &HeaderMap, nonce: &str, timestamp_ms: u128) -> HeaderMap {
    let mut h = headers.clone();
    h.insert(
        "x-ca-nonce",
        HeaderValue::from_str(nonce).expect("a nonce is ASCII"),
    );
    h.insert("x-ca-timestamp", HeaderValue::from(timestamp_ms as u64));
    let req = HmacRequest {
        method: "GET",
        path_and_query: TARGET,
        headers: &h,
        body: None,
    };
    let text = ca::string_to_sign(&req).expect("the request has a string to sign");
    let mut mac = Hmac::<Sha256>::new_from_slice(HMAC_SECRET.as_bytes()).expect("any key length");
    mac.update(text.as_bytes());
    let signature = BASE64.encode(mac.finalize().into_bytes());
    h.insert(
        "x-ca-signature",
        HeaderValue::from_str(&signature).expect("Base64 is ASCII"),
    );
    h
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis()
}

fn bench_hmac(c: &mut Criterion) {
    let mut keys = HmacKeys::new();
    keys.insert(
        ACCESS_KEY.to_string(),
        HmacSecret {
            consumer: 0,
            secret: HMAC_SECRET.as_bytes().to_vec(),
        },
    );
    let no_nonce = HmacSettings {
        require_nonce: false,
        ..HmacSettings::default()
    };
    let alibaba_only = HmacSettings {
        dialects: vec![Dialect::Alibaba],
        ..no_nonce.clone()
    };
    let with_nonce = HmacSettings::default();
    // Unused without a nonce.
    let unused = NonceStore::new(1_000_000, no_nonce.nonce_window());
    // Sized so a run never fills it (`Full` would be another code path): it grows by every
    // request measured, about 1 M for the default 3 s.
    let nonces = NonceStore::new(100_000_000, with_nonce.nonce_window());

    let signed = ca_sign(&["--no-nonce"]);
    let headers = header_map(
        PLAIN_HEADERS
            .into_iter()
            .chain(signed.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
    );
    let request = HmacRequest {
        method: "GET",
        path_and_query: TARGET,
        headers: &headers,
        body: None,
    };
    let verify = |settings: &HmacSettings| {
        ca::verify(
            black_box(&request),
            &keys,
            settings,
            &unused,
            SystemTime::now(),
        )
    };
    assert_eq!(verify(&no_nonce), Ok(0), "signed by ca_sign.py: {signed:?}");
    assert_eq!(verify(&alibaba_only), Ok(0));

    // The same request with a nonce: ca_sign.py's signature for one fixed nonce must be what
    // `sign_in_rust` computes, which then signs a fresh nonce per iteration.
    let ts = now_ms();
    let fixed = ca_sign(&["--nonce", "nonce-0", "--timestamp", &ts.to_string()]);
    let with_fixed = header_map(
        PLAIN_HEADERS
            .into_iter()
            .chain(fixed.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
    );
    let mut template = with_fixed.clone();
    template.remove("x-ca-signature");
    assert_eq!(
        sign_in_rust(&template, "nonce-0", ts).get("x-ca-signature"),
        with_fixed.get("x-ca-signature"),
        "the Rust signer agrees with ca_sign.py"
    );
    let counter = Cell::new(0u64);
    let fresh = || {
        let n = counter.get();
        counter.set(n + 1);
        let nonce = format!("6f1c2e0a-4b7d-4c1e-9a3f-{n:012x}");
        sign_in_rust(&template, &nonce, now_ms())
    };
    let verify_signed = |h: &HeaderMap| {
        let req = HmacRequest {
            method: "GET",
            path_and_query: TARGET,
            headers: h,
            body: None,
        };
        ca::verify(
            black_box(&req),
            &keys,
            &with_nonce,
            &nonces,
            SystemTime::now(),
        )
    };
    let first = fresh();
    assert_eq!(verify_signed(&first), Ok(0));
    assert_eq!(verify_signed(&first), Err(ca::HmacError::NonceReplayed));

    let mut group = c.benchmark_group("hmac_verify");
    case(&mut group, "hmac_verify", "sha256_no_nonce", || {
        verify(&no_nonce)
    });
    case(
        &mut group,
        "hmac_verify",
        "sha256_no_nonce_alibaba_only",
        || verify(&alibaba_only),
    );
    let presigned: Vec<HeaderMap> = (0..1_001).map(|_| fresh()).collect();
    let mut next = presigned.iter();
    let allocations = allocations_per_call(|| verify_signed(next.next().expect("1 001 signed")));
    eprintln!("hmac_verify/sha256_with_nonce: {allocations:.1} allocations per call");
    group.bench_function("sha256_with_nonce", |b| {
        b.iter_batched(
            fresh,
            |h| {
                let result = verify_signed(&h);
                (result, h) // the headers are dropped outside the timing
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
    // The timestamps of the requests signed by ca_sign.py are 15 min old at most.
    assert_eq!(
        verify(&no_nonce),
        Ok(0),
        "the run took longer than the clock skew"
    );
    assert_eq!(verify_signed(&fresh()), Ok(0));
}

/// `check_and_insert` on a store of capacity 1 M in its steady state, with distinct nonces. The
/// clock the store is given advances with each request so that a window holds 600 000 to
/// 800 000 nonces: old generations are rotated out (and their cost counted) as in production,
/// and the store never fills.
fn bench_nonce_store(c: &mut Criterion) {
    const PER_TICK: u64 = 200_000;
    let window = HmacSettings::default().nonce_window();
    let store = NonceStore::new(1_000_000, window);
    // The store ticks every window / 3.
    let step = Duration::from_nanos((window.as_nanos() / 3 / u128::from(PER_TICK)) as u64);
    let t0 = Instant::now();
    let mut n = 0u64;
    let requests = |count: u64, n: &mut u64| -> Vec<(String, Instant)> {
        let out = (*n..*n + count)
            .map(|i| {
                let mut nonce = String::with_capacity(36);
                write!(nonce, "0b7e5c1d-8f2a-4e6b-a1c3-{i:012x}").expect("a String takes it");
                let at = t0 + step * u32::try_from(i).expect("fewer than 4 G requests");
                (nonce, at)
            })
            .collect();
        *n += count;
        out
    };
    for (nonce, at) in requests(4 * PER_TICK, &mut n) {
        store
            .check_and_insert(ACCESS_KEY, &nonce, at)
            .expect("room for it");
    }
    assert!(store.len() > 3 * PER_TICK as usize, "{}", store.len());

    let batch = requests(1_001, &mut n);
    let mut it = batch.iter();
    let allocations = allocations_per_call(|| {
        let (nonce, at) = it.next().expect("1 001 nonces");
        store.check_and_insert(ACCESS_KEY, nonce, *at)
    });
    eprintln!("nonce_store/check_and_insert: {allocations:.1} allocations per call");

    let mut group = c.benchmark_group("nonce_store");
    group.bench_function("check_and_insert", |b| {
        b.iter_custom(|iters| {
            let batch = requests(iters, &mut n);
            let start = Instant::now();
            let mut refused = 0u64;
            for (nonce, at) in &batch {
                refused += u64::from(
                    store
                        .check_and_insert(ACCESS_KEY, black_box(nonce), *at)
                        .is_err(),
                );
            }
            let elapsed = start.elapsed();
            assert_eq!(refused, 0, "store of {} refused nonces", store.len());
            elapsed
        })
    });
    group.finish();
    eprintln!("nonce_store: {} nonces held at the end", store.len());
}

/// API key `i` of the table: 32 characters, the shape of a generated key.
fn api_key(i: usize) -> String {
    let mixed = (i as u64 ^ 0x5DEE_CE66_D1CE_4E5B).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("tg_{i:06}_{mixed:016x}_live")
}

const KEYS: usize = 100_000;

fn bench_api_key(c: &mut Criterion) {
    let table: ApiKeys = (0..KEYS)
        .map(|i| (key::digest(api_key(i).as_bytes()), i))
        .collect();
    let hit = api_key(KEYS - 1);
    let miss = "tg_999999_0123456789abcdef_live".to_string();
    assert_eq!(key::lookup(&table, hit.as_bytes()), Some(KEYS - 1));
    assert_eq!(key::lookup(&table, miss.as_bytes()), None);
    let mut group = c.benchmark_group("api_key");
    case(&mut group, "api_key", "lookup_hit_100k", || {
        key::lookup(&table, black_box(hit.as_bytes()))
    });
    case(&mut group, "api_key", "lookup_miss_100k", || {
        key::lookup(&table, black_box(miss.as_bytes()))
    });
    group.finish();
}

/// `consumers.yaml` with 100 000 consumers, one API key and a tenant each, plus one consumer
/// for every token of an HS256 issuer.
fn consumers_yaml(jwt: &Jwt) -> String {
    let mut yaml = String::with_capacity(KEYS * 80);
    let secret = jwt.secret();
    writeln!(
        yaml,
        "jwt_issuers:\n  corp:\n    issuer: '{ISSUER}'\n    audiences: [orders-api]\n    keys: [{{ algorithm: HS256, kid: hs, secret: '{secret}' }}]"
    )
    .expect("a String takes it");
    yaml.push_str("consumers:\n  svc-orders: { tenant: acme, jwt: [{ issuer: corp }] }\n");
    for i in 0..KEYS {
        writeln!(
            yaml,
            "  c{i:06}: {{ tenant: t{:03}, api_keys: [{{ key: {} }}] }}",
            i % 500,
            api_key(i)
        )
        .expect("a String takes it");
    }
    yaml
}

fn bench_authenticate(c: &mut Criterion, jwt: &Jwt) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("consumers.yaml");
    std::fs::write(&file, consumers_yaml(jwt)).expect("the temp dir is writable");
    let started = Instant::now();
    let (loaded, broken, errors) = load_consumers(&file).expect("consumers.yaml loads");
    assert!(
        errors.is_empty() && broken.is_empty(),
        "{errors:?} {broken:?}"
    );
    let (table, errors) =
        ConsumerTable::compile(&loaded.file, &broken, dir.path(), &JwksRegistry::new());
    assert!(errors.is_empty(), "{errors:?}");
    eprintln!(
        "authenticate: consumers.yaml of {} consumers loaded and compiled in {:.2?}",
        table.consumers.len(),
        started.elapsed()
    );
    let nonces = NonceStore::new(1_000_000, HmacSettings::default().nonce_window());
    let policy = |yaml: &str| {
        let auth: RouteAuth = serde_yaml::from_str(yaml).expect("route auth parses");
        RoutePolicy::compile(0, &auth, Some(&table), true)
            .unwrap_or_else(|e| panic!("route auth compiles: {e:?}"))
    };
    let key_route = policy("[key]");
    let jwt_route = policy("[jwt]");

    let request = |header: (&str, String)| {
        let mut req = RequestHeader::build("GET", TARGET.as_bytes(), None).expect("a request");
        for (k, v) in PLAIN_HEADERS {
            req.append_header(k, v).expect("a header");
        }
        req.append_header(header.0.to_string(), header.1)
            .expect("a header");
        req
    };
    let key_req = request(("x-api-key", api_key(KEYS / 2)));
    let hs256 = jwt
        .algorithms
        .iter()
        .position(|a| a.0 == "hs256")
        .expect("an HS256 token");
    let jwt_req = request(("authorization", format!("Bearer {}", jwt.tokens[hs256])));

    let by_key = key_route
        .authenticate(&key_req, None, None, &table, &nonces)
        .expect("the key is valid");
    assert_eq!(
        table.consumers[by_key.consumer.expect("a consumer")].name,
        format!("c{:06}", KEYS / 2)
    );
    let by_jwt = jwt_route
        .authenticate(&jwt_req, None, None, &table, &nonces)
        .expect("the token is valid");
    assert_eq!(
        table.consumers[by_jwt.consumer.expect("a consumer")].name,
        "svc-orders"
    );

    let mut group = c.benchmark_group("authenticate");
    case(&mut group, "authenticate", "key_route_100k", || {
        key_route.authenticate(black_box(&key_req), None, None, &table, &nonces)
    });
    case(&mut group, "authenticate", "jwt_hs256_route", || {
        jwt_route.authenticate(black_box(&jwt_req), None, None, &table, &nonces)
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    let jwt = Jwt::new();
    bench_jwt(c, &jwt);
    bench_hmac(c);
    bench_nonce_store(c);
    bench_api_key(c);
    bench_authenticate(c, &jwt);
}

criterion_group! {
    name = auth;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(auth);
