//! Authentication policy end to end, through the real binary with API keys: 401/403 bodies and
//! challenges, identity headers set for the upstream and never taken from clients, credentials
//! stripped, anonymous routes, live revocation from consumers.yaml (tunnels untouched), and a
//! broken consumers.yaml refused with its file and line.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{config, line_of, ws_connect, ws_roundtrip, Gateway, HttpBackend, Req, WsEchoServer};
use tokio_tungstenite::tungstenite::Message;

const ACME_KEY: &str = "acme-key-0123456789abcdef";
const PARTNER_KEY: &str = "partner-key-0123456789abcdef";
const OLD_KEY: &str = "old-key-0123456789abcdefgh";

fn consumers(acme_enabled: bool) -> String {
    format!(
        r#"consumers:
  acme-app:
    tenant: acme
    api_keys:
      - {{ key: "{ACME_KEY}", enabled: {acme_enabled} }}
      - {{ key: "{OLD_KEY}", enabled: false }}
  partner:
    tenant: globex
    api_keys: [ {{ key: "{PARTNER_KEY}" }} ]
"#
    )
}

/// Replaces a file atomically, as editors and config management do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

struct Setup {
    gw: Gateway,
    app: HttpBackend,
    consumers_path: PathBuf,
    _dir: tempfile::TempDir,
}

fn start(extra_upstreams: &str, extra_routes: &str) -> Setup {
    let app = HttpBackend::start("app");
    let dir = tempfile::tempdir().unwrap();
    let consumers_path = dir.path().join("consumers.yaml");
    fs::write(&consumers_path, consumers(true)).unwrap();
    let gw = Gateway::start(&config(&format!(
        r#"include: {{ consumers: "{}" }}
upstreams:
  app: {{ backends: [ {{ address: "{}" }} ] }}
{extra_upstreams}routes:
  - name: api
    match: {{ path_prefix: /api }}
    upstream: app
    auth:
      methods: [key]
      key: {{ from: [ {{ header: x-api-key }}, {{ query: apikey }} ] }}
  - name: acme-only
    match: {{ path_prefix: /acme }}
    upstream: app
    auth: {{ methods: [key], allow: {{ tenants: [acme] }} }}
  - name: public
    match: {{ path_prefix: /public }}
    upstream: app
    auth: {{ methods: [key], anonymous: true }}
  - name: keep
    match: {{ path_prefix: /keep }}
    upstream: app
    auth: {{ methods: [key], strip_credentials: false }}
  - name: open
    match: {{ path_prefix: /open }}
    upstream: app
{extra_routes}"#,
        consumers_path.display(),
        app.addr()
    )));
    Setup {
        gw,
        app,
        consumers_path,
        _dir: dir,
    }
}

#[test]
fn keys_identity_headers_and_refusals() {
    let s = start("", "");
    let gw = &s.gw;

    // No credential: 401 with a challenge and our JSON body; the upstream never sees it.
    let before = s.app.hits();
    let r = gw.send(&Req::get("/api/x").host("a.test"));
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["error"], "credentials_missing");
    assert!(r.json()["request_id"].as_str().is_some());
    assert!(r.header("www-authenticate").is_some());
    let r = gw.send(
        &Req::get("/api/x")
            .host("a.test")
            .header("x-api-key", "nope-0123456789abcdef"),
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "invalid_api_key");
    assert!(
        !r.text().contains("nope-0123456789abcdef"),
        "the key is echoed: {}",
        r.text()
    );
    let r = gw.send(
        &Req::get("/api/x")
            .host("a.test")
            .header("x-api-key", OLD_KEY),
    );
    assert_eq!(r.status, 401, "a disabled key works");
    assert_eq!(
        s.app.hits(),
        before,
        "a refused request reached the upstream"
    );

    // A good key: the upstream learns who it is, from us only, and never sees the key.
    let r = gw.send(
        &Req::get("/api/x")
            .host("a.test")
            .header("x-api-key", ACME_KEY)
            .header("x-consumer", "admin")
            .header("X-Tenant", "evil")
            .header("x-request-id", "auth-keys-1"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.echo();
    assert_eq!(e.header("x-consumer").as_deref(), Some("acme-app"));
    assert_eq!(e.header("x-tenant").as_deref(), Some("acme"));
    assert_eq!(
        e.header("x-api-key"),
        None,
        "the credential was not stripped"
    );

    // From the query: stripped from the URI, other parameters kept.
    let r = gw.send(&Req::get(&format!("/api/q?a=1&apikey={PARTNER_KEY}&b=2")).host("a.test"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().path(), "/api/q?a=1&b=2");
    assert_eq!(r.echo().header("x-consumer").as_deref(), Some("partner"));

    // Routes without auth still never pass client identity headers on.
    let r = gw.send(
        &Req::get("/open")
            .host("a.test")
            .header("x-consumer", "admin")
            .header("x-tenant", "acme"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().header("x-consumer"), None);
    assert_eq!(r.echo().header("x-tenant"), None);

    // Allow-list by tenant: a valid consumer of another tenant is forbidden, not unauthorized.
    let r = gw.send(
        &Req::get("/acme")
            .host("a.test")
            .header("x-api-key", PARTNER_KEY),
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "consumer_not_allowed");
    assert!(r.header("www-authenticate").is_none());
    let r = gw.send(
        &Req::get("/acme")
            .host("a.test")
            .header("x-api-key", ACME_KEY),
    );
    assert_eq!(r.status, 200);

    // Anonymous routes: no credential passes without identity; a wrong one is still refused.
    let r = gw.send(
        &Req::get("/public")
            .host("a.test")
            .header("x-consumer", "admin"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().header("x-consumer"), None);
    let r = gw.send(
        &Req::get("/public")
            .host("a.test")
            .header("x-api-key", "wrong-0123456789abcdef"),
    );
    assert_eq!(r.status, 401);

    // strip_credentials: false passes the key on.
    let r = gw.send(
        &Req::get("/keep")
            .host("a.test")
            .header("x-api-key", ACME_KEY),
    );
    assert_eq!(r.echo().header("x-api-key").as_deref(), Some(ACME_KEY));

    let line = gw
        .wait_access_log("auth-keys-1", Duration::from_secs(5))
        .expect("access log line");
    assert_eq!(line["consumer"], "acme-app");
    assert_eq!(line["tenant"], "acme");
    let metrics = gw.metrics_text();
    assert!(
        metrics.contains(r#"tollgate_auth_total{method="key",result="ok",route="api"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"tollgate_auth_total{method="key",result="invalid_api_key",route="api"} 2"#
        ),
        "{metrics}"
    );
    assert!(!metrics.contains(ACME_KEY) && !gw.stderr_text().contains(ACME_KEY));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_takes_effect_within_a_second_and_tunnels_stay() {
    let echo = WsEchoServer::start();
    let s = start(
        &format!(
            "  chat: {{ backends: [ {{ address: \"{}\" }} ] }}\n",
            echo.addr()
        ),
        r#"  - name: ws
    match: { path_prefix: /ws }
    upstream: chat
    auth: { methods: [key], key: { from: [ { query: apikey } ] } }
"#,
    );

    let (mut ws, _) = ws_connect(s.gw.port, "a.test", &format!("/ws/1?apikey={ACME_KEY}"))
        .await
        .expect("tunnel with a good key");
    let reply = ws_roundtrip(&mut ws, Message::text("before"), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reply.into_text().unwrap().as_str(), "before");
    assert!(
        ws_connect(s.gw.port, "a.test", "/ws/2?apikey=wrong-0123456789abcdef")
            .await
            .is_err(),
        "a bad key opened a tunnel"
    );

    // Revoke: disable the key in consumers.yaml (the file is watched).
    let gw = &s.gw;
    let gen = gw.generation();
    let edited = Instant::now();
    replace(&s.consumers_path, &consumers(false));
    let mut refused_after = None;
    while edited.elapsed() < Duration::from_secs(3) {
        let r = gw.send(
            &Req::get("/api")
                .host("a.test")
                .header("x-api-key", ACME_KEY),
        );
        if r.status == 401 {
            refused_after = Some(edited.elapsed());
            break;
        }
        assert_eq!(r.status, 200);
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = refused_after.expect("the revoked key still works after 3 s");
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");
    assert!(gw.generation() > gen);
    // The partner's key is untouched; the established tunnel keeps going.
    let r = gw.send(
        &Req::get("/api")
            .host("a.test")
            .header("x-api-key", PARTNER_KEY),
    );
    assert_eq!(r.status, 200);
    let reply = ws_roundtrip(&mut ws, Message::text("after"), Duration::from_secs(5))
        .await
        .expect("the tunnel was dropped by the reload");
    assert_eq!(reply.into_text().unwrap().as_str(), "after");
    assert!(
        ws_connect(s.gw.port, "a.test", &format!("/ws/3?apikey={ACME_KEY}"))
            .await
            .is_err()
    );
}

#[test]
fn a_broken_consumers_file_is_refused_with_its_line_and_the_old_one_serves() {
    let s = start("", "");
    let gw = &s.gw;
    let gen = gw.generation();
    let broken = format!(
        "{}  intruder:\n    tenant: x\n    api_keys: [ {{ key: short }} ]\n    colour: red\n",
        consumers(true)
    );
    replace(&s.consumers_path, &broken);
    assert!(common::wait_until(Duration::from_secs(5), || {
        !gw.status_json()["last_error"].is_null()
    }));
    assert_eq!(gw.generation(), gen, "a broken consumers.yaml was applied");
    let errors = gw.status_json()["last_error"].clone();
    let text = errors.to_string();
    let file = s.consumers_path.display().to_string();
    let e = errors
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "consumers.intruder.colour")
        .unwrap_or_else(|| panic!("no error for the unknown field: {text}"));
    assert_eq!(e["file"], file.as_str());
    assert_eq!(e["line"], line_of(&broken, "colour") as u64, "{text}");
    assert!(!text.contains(ACME_KEY), "a secret in an error: {text}");
    let r = gw.send(
        &Req::get("/api")
            .host("a.test")
            .header("x-api-key", ACME_KEY),
    );
    assert_eq!(r.status, 200, "the running config stopped serving");

    // The key-length check is a compile error, also located.
    let short = format!(
        "{}  intruder:\n    api_keys: [ {{ key: short }} ]\n",
        consumers(true)
    );
    replace(&s.consumers_path, &short);
    assert!(common::wait_until(Duration::from_secs(5), || {
        gw.status_json()["last_error"]
            .to_string()
            .contains("consumers.intruder.api_keys[0].key")
    }));
    let errors = gw.status_json()["last_error"].clone();
    let e = &errors[0];
    assert_eq!(e["line"], line_of(&short, "key: short") as u64, "{errors}");
    assert_eq!(gw.generation(), gen);
}
