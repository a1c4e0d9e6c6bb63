//! JWT authentication end to end, through the real binary. Every key, JWKS document and token
//! is made by `tests/fixtures/jwt_sign.py` (PyJWT and `cryptography`), never by the gateway's
//! own code, so a bug shared by signer and verifier cannot hide.
//!
//! Covered: RS256, ES256 (without `kid`), EdDSA and HS256 issuers; consumer mapping (issuer-wide
//! and subject members, `tenant_claim`); token locations (Bearer, query, cookie) and their
//! removal before the upstream; forged and broken tokens refused before the upstream; a JWKS URL
//! served by a local server (late start, rotation on an unknown kid, outage); and revoking a
//! consumer's JWT membership live while a tunnel opened with its token keeps going.

mod common;

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{
    config, free_port, wait_until, ws_connect, ws_roundtrip, Gateway, HttpBackend, RawResponse,
    Req, WsEchoServer,
};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const PYTHON: &str = "/usr/bin/python3";
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt_sign.py");

// ---------------------------------------------------------------------------------------------
// The independent signer

/// Runs `jwt_sign.py ARGS` and returns its stdout.
fn fixture(args: &[&str]) -> String {
    let out = Command::new(PYTHON)
        .arg(FIXTURE)
        .args(args)
        .output()
        .expect("run /usr/bin/python3 tests/fixtures/jwt_sign.py");
    assert!(
        out.status.success(),
        "jwt_sign.py {} failed: {}",
        args[0],
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("jwt_sign.py prints UTF-8")
}

/// A directory of fresh keys (`jwt_sign.py keygen`).
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn generate() -> Keys {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-jwt-keys")
            .tempdir()
            .unwrap();
        fixture(&["keygen", dir.path().to_str().unwrap()]);
        Keys { dir }
    }

    /// The path of one key file (`rsa.key`, `rsa.pub.pem`, `hs256.secret`...).
    fn path(&self, name: &str) -> String {
        let p = self.dir.path().join(name);
        assert!(p.exists(), "keygen made no {name}");
        p.to_str().unwrap().to_string()
    }
}

/// A sign spec for `jwt_sign.py sign`: `alg` with the key file `key`, `kid` in the header.
fn spec(alg: &str, key: &str, kid: Option<&str>, claims: Value) -> Value {
    let header = match kid {
        Some(kid) => json!({ "kid": kid }),
        None => json!({}),
    };
    json!({ "alg": alg, "key": key, "claims": claims, "header": header })
}

/// Signs every spec in one run of the signer; one token per spec, in order.
fn sign_all(specs: &[Value]) -> Vec<String> {
    let out = fixture(&["sign", &Value::from(specs.to_vec()).to_string()]);
    let tokens: Vec<String> = out.lines().map(str::to_string).collect();
    assert_eq!(tokens.len(), specs.len(), "one token per spec: {out}");
    tokens
}

/// A JWKS document for `[{key, kid, alg}]`.
fn jwks(entries: Value) -> String {
    fixture(&["jwks", &entries.to_string()])
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims valid for an hour.
fn claims(iss: &str, sub: &str) -> Value {
    json!({ "iss": iss, "sub": sub, "iat": now(), "exp": now() + 3600 })
}

// ---------------------------------------------------------------------------------------------
// Requests and answers

/// Replaces a file atomically, as editors and config management do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

fn bearer(path: &str, token: &str) -> Req {
    Req::get(path).header("Authorization", &format!("Bearer {token}"))
}

fn code(r: &RawResponse) -> String {
    r.json()["error"].as_str().unwrap_or_default().to_string()
}

/// Sends `req` and expects a 401 with `code` and a Bearer challenge, the upstream untouched.
fn expect_401(gw: &Gateway, app: &HttpBackend, req: &Req, expected: &str, what: &str) {
    let before = app.hits();
    let r = gw.send(req);
    assert_eq!(
        (r.status, code(&r).as_str()),
        (401, expected),
        "{what}: wrong refusal: {}",
        r.text()
    );
    let challenge = r.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer "),
        "{what}: the 401 has no Bearer challenge (got {challenge:?})"
    );
    assert_eq!(
        app.hits(),
        before,
        "{what}: a refused request reached the upstream"
    );
}

/// Sends `req`, expects it proxied, and returns what the upstream saw.
fn expect_200(gw: &Gateway, req: &Req, what: &str) -> common::Echo {
    let r = gw.send(req);
    assert_eq!(r.status, 200, "{what}: refused: {}", r.text());
    r.echo()
}

/// The `/status` entry of one JWKS URL.
fn jwks_status(gw: &Gateway, url: &str) -> Value {
    let status = gw.status_json();
    status["jwks"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["url"] == url).cloned())
        .unwrap_or_else(|| panic!("/status lists no JWKS source {url}: {status}"))
}

// ---------------------------------------------------------------------------------------------
// A JWKS endpoint

/// A loopback HTTP server answering every request with `200` and the current JWKS body. Its
/// body can be swapped, its requests are counted, and `stop` closes the listener (connections
/// are refused from then on).
struct JwksServer {
    port: u16,
    body: Arc<Mutex<String>>,
    hits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl JwksServer {
    /// Serves `body` on `port` (0: any free port).
    fn start(port: u16, body: &str) -> JwksServer {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("JWKS server: bind 127.0.0.1:{port}: {e}"),
            }
        };
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = Arc::new(Mutex::new(body.to_string()));
        let hits = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, h, s) = (body.clone(), hits.clone(), stop.clone());
        let thread = thread::spawn(move || {
            // At most ten minutes, whatever happens to the test.
            let until = Instant::now() + Duration::from_secs(600);
            while !s.load(Ordering::SeqCst) && Instant::now() < until {
                match listener.accept() {
                    Ok((stream, _)) => {
                        h.fetch_add(1, Ordering::SeqCst);
                        let text = b.lock().unwrap().clone();
                        serve_one(stream, &text);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(10))
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        JwksServer {
            port,
            body,
            hits,
            stop,
            thread: Mutex::new(Some(thread)),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/.well-known/jwks.json", self.port)
    }

    fn set(&self, body: &str) {
        *self.body.lock().unwrap() = body.to_string();
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().unwrap().take() {
            t.join().expect("JWKS server thread");
        }
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let refused = wait_until(Duration::from_secs(3), || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err()
        });
        assert!(refused, "the stopped JWKS server still accepts");
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

/// Reads one request head (bounded in time and size) and answers it, then closes.
fn serve_one(mut stream: std::net::TcpStream, body: &str) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes());
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

// ---------------------------------------------------------------------------------------------
// Static keys: algorithms, identity, mapping, locations, refusals

const CORP: &str = "https://login.corp.test/";

fn static_consumers(k: &Keys) -> String {
    format!(
        r#"jwt_issuers:
  corp:
    issuer: "{CORP}"
    audiences: [api]
    keys: [ {{ algorithm: RS256, pem: "{rsa}", kid: corp-1 }} ]
  ec:
    # No `issuer:`: on a route with several issuers it is tried when no pinned one matches.
    keys: [ {{ algorithm: ES256, pem: "{ec}" }} ]
  ed:
    issuer: https://ed.test/
    keys: [ {{ algorithm: EdDSA, pem: "{ed}", kid: ed-1 }} ]
  hs:
    issuer: https://hs.test/
    keys: [ {{ algorithm: HS256, secret: "${{file:{hs}}}", kid: hs-1 }} ]
  orphan:
    issuer: https://orphan.test/
    keys: [ {{ algorithm: RS256, pem: "{rsa2}" }} ]
consumers:
  corp-staff:
    tenant: corp
    jwt: [ {{ issuer: corp, tenant_claim: org }} ]
  svc-42:
    tenant: ops
    jwt: [ {{ issuer: corp, subject: svc-42 }} ]
  ec-app: {{ tenant: globex, jwt: [ {{ issuer: ec }} ] }}
  ed-app: {{ tenant: initech, jwt: [ {{ issuer: ed }} ] }}
  hs-app: {{ tenant: hooli, jwt: [ {{ issuer: hs }} ] }}
"#,
        rsa = k.path("rsa.pub.pem"),
        rsa2 = k.path("rsa2.pub.pem"),
        ec = k.path("ec256.pub.pem"),
        ed = k.path("ed25519.pub.pem"),
        hs = k.path("hs256.secret"),
    )
}

#[test]
fn tokens_of_every_algorithm_map_to_consumers_and_forgeries_never_reach_the_upstream() {
    let keys = Keys::generate();
    let app = HttpBackend::start("app");
    let dir = tempfile::tempdir().unwrap();
    let consumers = dir.path().join("consumers.yaml");
    fs::write(&consumers, static_consumers(&keys)).unwrap();
    let gw = Gateway::start(&config(&format!(
        r#"include: {{ consumers: "{}" }}
upstreams:
  app: {{ backends: [ {{ address: "{}" }} ] }}
routes:
  - name: api
    match: {{ path_prefix: /api }}
    upstream: app
    auth: [jwt]
  - name: claims
    match: {{ path_prefix: /claims }}
    upstream: app
    auth: {{ methods: [jwt], claims_to_headers: {{ sub: x-user-id }} }}
  - name: keep
    match: {{ path_prefix: /keep }}
    upstream: app
    auth: {{ methods: [jwt], strip_credentials: false }}
  - name: ops
    match: {{ path_prefix: /ops }}
    upstream: app
    auth: {{ methods: [jwt], allow: {{ consumers: [svc-42] }} }}
  - name: corp
    match: {{ path_prefix: /corp }}
    upstream: app
    auth: {{ methods: [jwt], jwt: {{ issuers: [corp] }} }}
  - name: loc
    match: {{ path_prefix: /loc }}
    upstream: app
    auth:
      methods: [jwt]
      claims_to_headers: {{ sub: x-user-id }}
      jwt: {{ from: [ {{ query: access_token }}, {{ cookie: session }} ] }}
"#,
        consumers.display(),
        app.addr()
    )));

    let corp = |sub: Value, extra: Value| {
        let mut c = claims(CORP, "");
        c["sub"] = sub;
        c["aud"] = json!("api");
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let (rsa, rsa2) = (keys.path("rsa.key"), keys.path("rsa2.key"));
    let rs = |key: &str, kid: &str, claims: Value| spec("RS256", key, Some(kid), claims);
    let named = [
        // One good token per algorithm.
        rs(
            &rsa,
            "corp-1",
            corp(json!("alice"), json!({ "org": "acme-eu" })),
        ),
        spec(
            "ES256",
            &keys.path("ec256.key"),
            None,
            claims("https://ec.test/", "e-1"),
        ),
        spec(
            "EdDSA",
            &keys.path("ed25519.key"),
            Some("ed-1"),
            claims("https://ed.test/", "d-1"),
        ),
        spec(
            "HS256",
            &keys.path("hs256.secret"),
            Some("hs-1"),
            claims("https://hs.test/", "h-1"),
        ),
        // Consumer mapping.
        rs(
            &rsa,
            "corp-1",
            corp(json!("svc-42"), json!({ "org": "acme-eu" })),
        ),
        rs(&rsa, "corp-1", corp(json!("bob"), json!({}))),
        rs(
            &rsa,
            "corp-1",
            corp(json!("eve"), json!({ "org": "evil tenant" })),
        ),
        spec("RS256", &rsa2, None, claims("https://orphan.test/", "o-1")),
        rs(&rsa, "corp-1", claims("https://nobody.test/", "n-1")),
        // Claims that cannot be header values as they are.
        rs(
            &rsa,
            "corp-1",
            corp(json!("a\r\nx-consumer: admin"), json!({})),
        ),
        rs(&rsa, "corp-1", corp(json!(42), json!({}))),
    ];
    // Forgeries and broken tokens, all claiming corp: (spec, code, what).
    let alice_claims = || corp(json!("alice"), json!({}));
    let attacker_jwk: Value =
        serde_json::from_str::<Value>(&jwks(json!([{ "key": rsa2 }]))).unwrap()["keys"][0].clone();
    let mut embedded = rs(&rsa2, "corp-1", alice_claims());
    embedded["header"]["jwk"] = attacker_jwk;
    let mut crit = rs(&rsa, "corp-1", alice_claims());
    crit["header"]["crit"] = json!(["exp"]);
    let forged: Vec<(Value, &str, &str)> = vec![
        (
            spec("none", &rsa, Some("corp-1"), alice_claims()),
            "alg_none",
            "alg none",
        ),
        (
            spec(
                "HS256",
                &keys.path("rsa.pub.pem"),
                Some("corp-1"),
                alice_claims(),
            ),
            "algorithm_mismatch",
            "HS256 with the RSA public key PEM as secret (kid)",
        ),
        (
            spec("HS256", &keys.path("rsa.pub.pem"), None, alice_claims()),
            "algorithm_mismatch",
            "HS256 with the RSA public key PEM as secret (no kid)",
        ),
        (
            rs(
                &rsa,
                "corp-1",
                corp(json!("alice"), json!({ "exp": now() - 3600 })),
            ),
            "token_expired",
            "expired an hour ago",
        ),
        (
            rs(
                &rsa,
                "corp-1",
                corp(json!("alice"), json!({ "nbf": now() + 3600 })),
            ),
            "token_not_yet_valid",
            "nbf in an hour",
        ),
        (
            rs(
                &rsa,
                "corp-1",
                corp(json!("alice"), json!({ "aud": "billing" })),
            ),
            "wrong_audience",
            "aud billing",
        ),
        (
            rs(&rsa, "corp-9", alice_claims()),
            "unknown_kid",
            "kid corp-9",
        ),
        (
            rs(&rsa, "../../etc/passwd", alice_claims()),
            "invalid_kid",
            "a path as kid",
        ),
        (
            rs(
                &rsa,
                "corp-1",
                corp(json!("alice"), json!({ "pad": "x".repeat(10_000) })),
            ),
            "token_too_large",
            "10 kB claim",
        ),
        (
            rs(&rsa2, "corp-1", alice_claims()),
            "invalid_signature",
            "signed by another RSA key",
        ),
        (
            embedded,
            "invalid_signature",
            "the signing key embedded as `jwk`",
        ),
        (crit, "unsupported_crit_header", "crit header"),
    ];
    let mut all = named.to_vec();
    all.extend(forged.iter().map(|f| f.0.clone()));
    let tokens = sign_all(&all);
    let [alice, ec, ed, hs, svc, bob, eve, orphan, stranger, crlf, numeric] =
        &tokens[..named.len()]
    else {
        unreachable!("sign_all returns one token per spec")
    };

    // 1. Every algorithm passes; the upstream gets the identity from us, never from the client,
    //    and never the token.
    let accepted = [
        (alice, "RS256", "corp-staff", "acme-eu", "alice"),
        (ec, "ES256 (no kid)", "ec-app", "globex", "e-1"),
        (ed, "EdDSA", "ed-app", "initech", "d-1"),
        (hs, "HS256 (${file:} secret)", "hs-app", "hooli", "h-1"),
    ];
    for (token, alg, consumer, tenant, sub) in accepted {
        let what = format!("{alg} token on /api");
        let e = expect_200(
            &gw,
            &bearer("/api/x", token)
                .header("X-Consumer", "admin")
                .header("x-tenant", "evil")
                .header("x-user-id", "root"),
            &what,
        );
        assert_eq!(
            e.header("x-consumer").as_deref(),
            Some(consumer),
            "{what}: x-consumer"
        );
        assert_eq!(
            e.header("x-tenant").as_deref(),
            Some(tenant),
            "{what}: x-tenant"
        );
        assert_eq!(
            e.header("x-user-id"),
            None,
            "{what}: a client's x-user-id reached the upstream on a route without claims_to_headers"
        );
        assert_eq!(
            e.header("authorization"),
            None,
            "{what}: the token was not stripped"
        );

        let e = expect_200(
            &gw,
            &bearer("/claims", token).header("x-user-id", "root"),
            &what,
        );
        assert_eq!(
            e.header_values("x-user-id"),
            vec![sub.to_string()],
            "{what}: claims_to_headers sub -> x-user-id (the client's value must be gone)"
        );
    }
    let e = expect_200(&gw, &bearer("/keep", alice), "strip_credentials: false");
    assert_eq!(
        e.header("authorization"),
        Some(format!("Bearer {alice}")),
        "strip_credentials: false should pass the Authorization header on"
    );
    expect_200(
        &gw,
        &bearer("/api/logged", alice).header("x-request-id", "auth-jwt-alice-1"),
        "alice, logged",
    );
    let line = gw
        .wait_access_log("auth-jwt-alice-1", Duration::from_secs(5))
        .expect("no access log line for a JWT request");
    assert_eq!(
        line["consumer"], "corp-staff",
        "access log consumer: {line}"
    );
    assert_eq!(line["tenant"], "acme-eu", "access log tenant: {line}");

    // 2. Consumer mapping: the subject member wins over the issuer-wide one (and its tenant is
    //    the consumer's: only the issuer-wide membership reads `org`).
    let e = expect_200(&gw, &bearer("/api", svc), "svc-42 token");
    assert_eq!(
        e.header("x-consumer").as_deref(),
        Some("svc-42"),
        "subject member lost"
    );
    assert_eq!(
        e.header("x-tenant").as_deref(),
        Some("ops"),
        "svc-42 tenant"
    );
    for (token, who) in [(bob, "no org claim"), (eve, "an org with a space")] {
        let e = expect_200(&gw, &bearer("/api", token), who);
        assert_eq!(
            e.header("x-consumer").as_deref(),
            Some("corp-staff"),
            "{who}"
        );
        assert_eq!(
            e.header("x-tenant").as_deref(),
            Some("corp"),
            "{who}: tenant should fall back to the consumer's"
        );
    }
    expect_401(
        &gw,
        &app,
        &bearer("/api", orphan),
        "unknown_consumer",
        "orphan issuer",
    );
    let r = gw.send(&bearer("/ops", alice));
    assert_eq!(
        (r.status, code(&r).as_str()),
        (403, "consumer_not_allowed"),
        "a valid token of a consumer outside `allow`: {}",
        r.text()
    );
    assert!(
        r.header("www-authenticate").is_none(),
        "a 403 carries a challenge: {:?}",
        r.header("www-authenticate")
    );
    expect_200(&gw, &bearer("/ops", svc), "the allowed consumer on /ops");
    // A claim that cannot be a header value is left out, never spliced into the request; a
    // number is written out; a non-string `sub` matches no subject member.
    let e = expect_200(&gw, &bearer("/claims", crlf), "a sub with CR LF");
    assert_eq!(e.header("x-user-id"), None, "a CR LF claim became a header");
    assert_eq!(
        e.header("x-consumer").as_deref(),
        Some("corp-staff"),
        "CR LF sub: x-consumer"
    );
    let e = expect_200(&gw, &bearer("/claims", numeric), "a numeric sub");
    assert_eq!(
        e.header("x-user-id").as_deref(),
        Some("42"),
        "a numeric sub"
    );
    assert_eq!(e.header("x-consumer").as_deref(), Some("corp-staff"));

    // 3. Token locations: query and cookie, removed before the upstream; Bearer is not a source
    //    on a route whose `from` lists only those.
    let e = expect_200(
        &gw,
        &Req::get(&format!("/loc/q?a=1&access_token={ed}&b=2")),
        "token in the query",
    );
    assert_eq!(
        e.path(),
        "/loc/q?a=1&b=2",
        "the query token was not removed"
    );
    assert_eq!(e.header("x-consumer").as_deref(), Some("ed-app"));
    assert_eq!(e.header("x-user-id").as_deref(), Some("d-1"));
    let e = expect_200(
        &gw,
        &Req::get("/loc/c?keep=1").header("Cookie", &format!("theme=dark; session={hs}; lang=en")),
        "token in a cookie",
    );
    assert_eq!(e.path(), "/loc/c?keep=1");
    assert_eq!(
        e.header("cookie").as_deref(),
        Some("theme=dark; lang=en"),
        "the session cookie was not removed (or the others were)"
    );
    assert_eq!(e.header("x-consumer").as_deref(), Some("hs-app"));
    let e = expect_200(
        &gw,
        &Req::get(&format!("/loc/only?access_token={ec}"))
            .header("Cookie", &format!("session={hs}")),
        "query before cookie",
    );
    assert_eq!(
        e.header("x-consumer").as_deref(),
        Some("ec-app"),
        "`from` order"
    );
    assert_eq!(e.path(), "/loc/only");
    let e = expect_200(
        &gw,
        &Req::get("/loc/only").header("Cookie", &format!("session={alice}")),
        "the only cookie",
    );
    assert_eq!(e.header("cookie"), None, "an empty Cookie header was left");
    let r = gw.send(&bearer("/loc", alice));
    assert_eq!(
        (r.status, code(&r).as_str()),
        (401, "credentials_missing"),
        "a Bearer token on a route reading query/cookie only: {}",
        r.text()
    );
    expect_401(
        &gw,
        &app,
        &Req::get("/api"),
        "credentials_missing",
        "no token at all",
    );

    // 4. Refusals, on the corp-only route (exact codes) and on the all-issuers route.
    let tampered = {
        // alice's header and signature around svc-42's payload: an escalation attempt.
        let a: Vec<&str> = alice.split('.').collect();
        let s: Vec<&str> = svc.split('.').collect();
        format!("{}.{}.{}", a[0], s[1], a[2])
    };
    let mut refusals: Vec<(String, &str, &str)> = forged
        .iter()
        .zip(&tokens[named.len()..])
        .map(|((_, code, what), token)| (token.clone(), *code, *what))
        .collect();
    refusals.push((tampered, "invalid_signature", "payload swapped"));
    refusals.push(("garbage".into(), "malformed_token", "garbage"));
    refusals.push(("a.b.c".into(), "malformed_token", "three garbage segments"));
    for (token, expected, what) in &refusals {
        expect_401(&gw, &app, &bearer("/corp", token), expected, what);
        // The all-issuers route picks the issuer by the unverified `iss`; it refuses too.
        let before = app.hits();
        let r = gw.send(&bearer("/api", token));
        assert_eq!(r.status, 401, "{what} on /api: {}", r.text());
        assert!(
            r.header("www-authenticate")
                .is_some_and(|c| c.starts_with("Bearer ")),
            "{what} on /api: no Bearer challenge"
        );
        assert_eq!(app.hits(), before, "{what} on /api reached the upstream");
    }
    // No pinned issuer matches these, so the unpinned `ec` tries them: its key refuses.
    let before = app.hits();
    let r = gw.send(&bearer("/api", stranger));
    assert_eq!(r.status, 401, "an iss nobody configured: {}", r.text());
    assert_eq!(
        app.hits(),
        before,
        "an iss nobody configured reached the upstream"
    );
    expect_401(
        &gw,
        &app,
        &bearer("/api", "garbage"),
        "malformed_token",
        "garbage on /api",
    );

    // Counted by outcome, and no token in the process log.
    for (result, n) in [
        ("token_expired", 1.0),
        ("alg_none", 1.0),
        ("unknown_kid", 1.0),
    ] {
        let sel = format!(r#"tollgate_auth_total{{route="corp",method="jwt",result="{result}"}}"#);
        assert_eq!(gw.metric(&sel), Some(n), "{sel}");
    }
    let stderr = gw.stderr_text();
    assert!(
        !stderr.contains(&alice[alice.len() - 20..]),
        "a token's signature is in the process log"
    );
}

// ---------------------------------------------------------------------------------------------
// JWKS URLs

#[test]
fn jwks_url_keys_arrive_late_rotate_on_an_unknown_kid_and_survive_an_outage() {
    let keys = Keys::generate();
    let (rsa, rsa2, ec) = (
        keys.path("rsa.key"),
        keys.path("rsa2.key"),
        keys.path("ec256.key"),
    );
    let first = jwks(json!([{ "key": rsa, "kid": "rot-1", "alg": "RS256" }]));
    let rotated = jwks(json!([{ "key": rsa2, "kid": "rot-2", "alg": "RS256" }]));
    let late_doc = jwks(json!([{ "key": ec, "kid": "late-1" }]));

    // `idp` is up before the gateway starts; `late` only after the gateway tried it.
    let idp = JwksServer::start(0, &first);
    let late_port = free_port();
    let late_url = format!("http://127.0.0.1:{late_port}/.well-known/jwks.json");
    let app = HttpBackend::start("app");
    let dir = tempfile::tempdir().unwrap();
    let consumers = dir.path().join("consumers.yaml");
    let consumers_text = |extra: &str| {
        format!(
            r#"jwt_issuers:
  idp: {{ issuer: https://idp.test/, jwks_url: "{}" }}
  late: {{ issuer: https://late.test/, jwks_url: "{late_url}" }}
consumers:
  idp-app: {{ tenant: acme, jwt: [ {{ issuer: idp }} ] }}
  late-app: {{ tenant: globex, jwt: [ {{ issuer: late }} ] }}
{extra}"#,
            idp.url()
        )
    };
    fs::write(&consumers, consumers_text("")).unwrap();
    let t = sign_all(&[
        spec(
            "RS256",
            &rsa,
            Some("rot-1"),
            claims("https://idp.test/", "u-1"),
        ),
        spec(
            "RS256",
            &rsa2,
            Some("rot-2"),
            claims("https://idp.test/", "u-2"),
        ),
        spec(
            "ES256",
            &ec,
            Some("late-1"),
            claims("https://late.test/", "l-1"),
        ),
    ]);
    let (rot1, rot2, late_token) = (&t[0], &t[1], &t[2]);
    let gw = Gateway::start(&config(&format!(
        r#"include: {{ consumers: "{}" }}
upstreams:
  app: {{ backends: [ {{ address: "{}" }} ] }}
routes:
  - name: api
    match: {{ path_prefix: /api }}
    upstream: app
    auth: [jwt]
"#,
        consumers.display(),
        app.addr()
    )));

    // The first fetch happens in the background, soon after start.
    let mut last = None;
    let fetched = wait_until(Duration::from_secs(5), || {
        let r = gw.send(&bearer("/api", rot1));
        let ok = r.status == 200;
        last = Some((r.status, r.text()));
        ok
    });
    assert!(
        fetched,
        "the first JWKS key never worked: last answer {last:?}"
    );
    let e = expect_200(&gw, &bearer("/api", rot1), "rot-1 token");
    assert_eq!(e.header("x-consumer").as_deref(), Some("idp-app"));
    assert_eq!(idp.hits(), 1, "JWKS fetched more than once at start");

    // `late` was tried and failed; its tokens wait for keys.
    let tried = wait_until(Duration::from_secs(5), || {
        jwks_status(&gw, &late_url)["consecutive_failures"].as_u64() >= Some(1)
    });
    assert!(
        tried,
        "no failed fetch of the down JWKS URL within 5 s: {}",
        gw.status_json()
    );
    expect_401(
        &gw,
        &app,
        &bearer("/api", late_token),
        "jwks_unavailable",
        "JWKS server not up",
    );
    let late = JwksServer::start(late_port, &late_doc);

    // The IdP rotates: rot-2 is unknown until the gateway refetches (asked by the unknown kid,
    // at most once per 10 s), meanwhile `late` comes up (retried after its 10 s backoff).
    idp.set(&rotated);
    let swapped = Instant::now();
    let (mut rot2_after, mut late_after) = (None, None);
    let mut refusals = 0;
    while swapped.elapsed() < Duration::from_secs(15)
        && (rot2_after.is_none() || late_after.is_none())
    {
        if rot2_after.is_none() {
            let r = gw.send(&bearer("/api", rot2));
            if r.status == 200 {
                rot2_after = Some(swapped.elapsed());
            } else {
                assert_eq!(
                    (r.status, code(&r).as_str()),
                    (401, "unknown_kid"),
                    "rot-2 before the refetch: {}",
                    r.text()
                );
                refusals += 1;
            }
        }
        if late_after.is_none() {
            let r = gw.send(&bearer("/api", late_token));
            if r.status == 200 {
                late_after = Some(swapped.elapsed());
            } else {
                assert_eq!(code(&r), "jwks_unavailable", "late token: {}", r.text());
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    let took = rot2_after.unwrap_or_else(|| {
        panic!(
            "a token of the rotated-in key still fails 15 s after the rotation: {}",
            jwks_status(&gw, &idp.url())
        )
    });
    assert!(
        late_after.is_some(),
        "the JWKS URL that came up late still has no keys after 15 s: {}",
        jwks_status(&gw, &late_url)
    );
    assert!(
        refusals >= 1,
        "rot-2 passed before any refetch could happen"
    );
    assert_eq!(
        idp.hits(),
        2,
        "{refusals} unknown-kid tokens over {took:?} should cause exactly one refetch"
    );
    let e = expect_200(&gw, &bearer("/api", rot2), "rot-2 token");
    assert_eq!(e.header("x-consumer").as_deref(), Some("idp-app"));
    let e = expect_200(&gw, &bearer("/api", late_token), "late token");
    assert_eq!(e.header("x-consumer").as_deref(), Some("late-app"));
    assert_eq!(e.header("x-tenant").as_deref(), Some("globex"));
    // The new set replaced the old one whole: rot-1 is no longer published.
    expect_401(
        &gw,
        &app,
        &bearer("/api", rot1),
        "unknown_kid",
        "rot-1 after it was rotated out",
    );

    // Outage: both servers go away. A reload keeps the fetched keys (no refetch needed)...
    idp.stop();
    late.stop();
    let gen = gw.generation();
    replace(&consumers, &consumers_text("  spare: { tenant: spare }\n"));
    gw.wait_generation(gen + 1, Duration::from_secs(5));
    expect_200(
        &gw,
        &bearer("/api", rot2),
        "rot-2 right after a reload during the outage",
    );
    expect_200(
        &gw,
        &bearer("/api", late_token),
        "late token right after a reload during the outage",
    );
    // ...and a failed refetch (asked for by the unknown rot-1 kid) keeps them too.
    expect_401(
        &gw,
        &app,
        &bearer("/api", rot1),
        "unknown_kid",
        "rot-1 during the outage",
    );
    let failed = wait_until(Duration::from_secs(15), || {
        jwks_status(&gw, &idp.url())["consecutive_failures"].as_u64() >= Some(1)
    });
    let status = jwks_status(&gw, &idp.url());
    assert!(
        failed,
        "no refetch attempt during the outage within 15 s: {status}"
    );
    assert_eq!(
        status["keys"], 1,
        "the keys were dropped after a failed fetch: {status}"
    );
    assert!(
        !status["last_error"].is_null(),
        "the failure is not reported: {status}"
    );
    let e = expect_200(&gw, &bearer("/api", rot2), "rot-2 after a failed refetch");
    assert_eq!(e.header("x-consumer").as_deref(), Some("idp-app"));
    expect_200(
        &gw,
        &bearer("/api", late_token),
        "late token during the outage",
    );
}

// ---------------------------------------------------------------------------------------------
// Live revocation

fn revocable_consumers(k: &Keys, ws_app_member: bool) -> String {
    let membership = if ws_app_member {
        "jwt: [ { issuer: ed } ]"
    } else {
        "api_keys: []"
    };
    format!(
        r#"jwt_issuers:
  ed:
    issuer: https://ed.test/
    keys: [ {{ algorithm: EdDSA, pem: "{ed}", kid: ed-1 }} ]
  hs:
    issuer: https://hs.test/
    keys: [ {{ algorithm: HS256, secret: "${{file:{hs}}}" }} ]
consumers:
  ws-app: {{ tenant: acme, {membership} }}
  other: {{ tenant: globex, jwt: [ {{ issuer: hs }} ] }}
"#,
        ed = k.path("ed25519.pub.pem"),
        hs = k.path("hs256.secret"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_jwt_membership_refuses_its_tokens_within_a_second_and_tunnels_stay() {
    let keys = Keys::generate();
    let app = HttpBackend::start("app");
    let echo = WsEchoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let consumers = dir.path().join("consumers.yaml");
    fs::write(&consumers, revocable_consumers(&keys, true)).unwrap();
    let gw = Gateway::start(&config(&format!(
        r#"include: {{ consumers: "{}" }}
upstreams:
  app: {{ backends: [ {{ address: "{}" }} ] }}
  chat: {{ backends: [ {{ address: "{}" }} ] }}
routes:
  - name: ws
    match: {{ path_prefix: /ws }}
    upstream: chat
    auth: {{ methods: [jwt], jwt: {{ from: [ {{ query: access_token }} ] }} }}
  - name: upgrade-echo
    match: {{ path_prefix: /upgrade-echo }}
    upstream: app
    auth: {{ methods: [jwt], jwt: {{ from: [ {{ query: access_token }} ] }} }}
  - name: api
    match: {{ path_prefix: /api }}
    upstream: app
    auth: [jwt]
"#,
        consumers.display(),
        app.addr(),
        echo.addr()
    )));
    let t = sign_all(&[
        spec(
            "EdDSA",
            &keys.path("ed25519.key"),
            Some("ed-1"),
            claims("https://ed.test/", "w-1"),
        ),
        spec(
            "HS256",
            &keys.path("hs256.secret"),
            None,
            claims("https://hs.test/", "o-1"),
        ),
    ]);
    let (ws_token, other) = (&t[0], &t[1]);

    let (mut ws, _) = ws_connect(
        gw.port,
        "a.test",
        &format!("/ws/room?access_token={ws_token}"),
    )
    .await
    .expect("a tunnel with a valid token in the query");
    let reply = ws_roundtrip(&mut ws, Message::text("before"), Duration::from_secs(5))
        .await
        .expect("the tunnel does not echo");
    assert_eq!(reply.into_text().unwrap().as_str(), "before");
    match ws_connect(gw.port, "a.test", "/ws/room?access_token=not.a.token").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401, "a bad token's upgrade")
        }
        other => panic!("an upgrade with a bad token: {:?}", other.map(|_| ())),
    }
    // The upgrade path strips the query token and sets the identity too: an upstream that
    // refuses the upgrade (the HTTP echo) has its answer relayed, showing what it received.
    let upgrade = Req::get(&format!("/upgrade-echo/x?a=1&access_token={ws_token}&b=2"))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("x-consumer", "admin");
    let e = expect_200(&gw, &upgrade, "an upgrade relayed from the HTTP echo");
    assert_eq!(
        e.path(),
        "/upgrade-echo/x?a=1&b=2",
        "the upgrade kept the query token"
    );
    assert_eq!(
        e.header("x-consumer").as_deref(),
        Some("ws-app"),
        "upgrade: x-consumer"
    );
    assert_eq!(
        e.header("x-tenant").as_deref(),
        Some("acme"),
        "upgrade: x-tenant"
    );
    let e = expect_200(&gw, &bearer("/api", ws_token), "ws-app before the edit");
    assert_eq!(e.header("x-consumer").as_deref(), Some("ws-app"));

    // Remove ws-app's JWT membership (consumers.yaml is watched).
    let gen = gw.generation();
    let edited = Instant::now();
    replace(&consumers, &revocable_consumers(&keys, false));
    let mut refused_after = None;
    let mut last = String::new();
    while edited.elapsed() < Duration::from_secs(3) {
        let r = gw.send(&bearer("/api", ws_token));
        if r.status == 401 {
            refused_after = Some(edited.elapsed());
            last = code(&r);
            break;
        }
        assert_eq!(r.status, 200, "while the edit lands: {}", r.text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = refused_after.expect("the removed membership's token still works after 3 s");
    assert!(
        took < Duration::from_secs(1),
        "revocation took {took:?} (limit 1 s)"
    );
    assert_eq!(last, "unknown_consumer", "the revoked token's refusal code");
    assert!(gw.generation() > gen, "no reload was counted");
    expect_401(
        &gw,
        &app,
        &bearer("/api", ws_token),
        "unknown_consumer",
        "after the revocation",
    );
    let e = expect_200(
        &gw,
        &bearer("/api", other),
        "another consumer after the edit",
    );
    assert_eq!(e.header("x-consumer").as_deref(), Some("other"));

    // The established tunnel keeps going; a new one with the same token is refused.
    let reply = ws_roundtrip(&mut ws, Message::text("after"), Duration::from_secs(5))
        .await
        .expect("the tunnel was dropped by the reload");
    assert_eq!(reply.into_text().unwrap().as_str(), "after");
    match ws_connect(
        gw.port,
        "a.test",
        &format!("/ws/room?access_token={ws_token}"),
    )
    .await
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401, "a revoked token's upgrade")
        }
        other => panic!("a revoked token opened a tunnel: {:?}", other.map(|_| ())),
    }
    assert_eq!(
        echo.active(),
        1,
        "the upstream should hold exactly the old tunnel"
    );
}
