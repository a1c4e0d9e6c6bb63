//! HMAC request signatures (Alibaba Cloud API Gateway / Higress `X-Ca-*` scheme) through the real
//! binary. Every request is signed by `tests/fixtures/ca_sign.py`, an independent Python
//! implementation of the scheme, never by the gateway's own code.

mod common;

use std::fs;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{config, Gateway, HttpBackend, RawResponse, Req, WsEchoServer};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

const ACME_AK: &str = "acme-ak";
const ACME_SECRET: &str = "acme-secret-0123456789";
const PARTNER_AK: &str = "partner-ak";
const PARTNER_SECRET: &str = "partner-secret-0123456789";

/// The headers the independent signer adds for this request.
fn sign(
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
    key: &str,
    secret: &str,
    extra: &[&str],
) -> Vec<(String, String)> {
    let headers: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    let out = Command::new("/usr/bin/python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/ca_sign.py"
        ))
        .args([
            "--method", method, "--target", target, "--key", key, "--secret", secret,
        ])
        .args(["--headers", &serde_json::Value::Object(headers).to_string()])
        .args(["--body", body])
        .args(extra)
        .output()
        .expect("run /usr/bin/python3 tests/fixtures/ca_sign.py");
    assert!(
        out.status.success(),
        "signer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

fn request(
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
    signed: &[(String, String)],
) -> Req {
    let mut r = Req::new(method, target).host("api.test");
    r.body = body.as_bytes().to_vec();
    for (k, v) in headers {
        r = r.header(k, v);
    }
    for (k, v) in signed {
        r = r.header(k, v);
    }
    r
}

struct Setup {
    gw: Gateway,
    app: HttpBackend,
    _echo: WsEchoServer,
    _dir: tempfile::TempDir,
}

fn start() -> Setup {
    let app = HttpBackend::start("app");
    let echo = WsEchoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let consumers = dir.path().join("consumers.yaml");
    fs::write(
        &consumers,
        format!(
            r#"consumers:
  acme-app:
    tenant: acme
    hmac:
      - {{ access_key: {ACME_AK}, secret: "{ACME_SECRET}" }}
      - {{ access_key: acme-retired, secret: "retired-secret-0123456789", enabled: false }}
  partner:
    tenant: globex
    hmac: [ {{ access_key: {PARTNER_AK}, secret: "{PARTNER_SECRET}" }} ]
"#
        ),
    )
    .unwrap();
    let gw = Gateway::start(&config(&format!(
        r#"include: {{ consumers: "{}" }}
upstreams:
  app: {{ backends: [ {{ address: "{}" }} ] }}
  chat: {{ backends: [ {{ address: "{}" }} ] }}
routes:
  - name: ws
    match: {{ path_prefix: /ws }}
    upstream: chat
    auth: [hmac]
  - name: api
    match: {{ path_prefix: /api }}
    upstream: app
    auth: [hmac]
"#,
        consumers.display(),
        app.addr(),
        echo.addr()
    )));
    Setup {
        gw,
        app,
        _echo: echo,
        _dir: dir,
    }
}

fn code(r: &RawResponse) -> String {
    r.json()["error"].as_str().unwrap_or_default().to_string()
}

#[test]
fn independently_signed_requests_pass_and_tampering_fails() {
    let s = start();
    let gw = &s.gw;
    let accept = [("Accept", "application/json")];

    // GET with an unsorted query, a repeated and an empty parameter.
    let target = "/api/items?b=2&a=1&a=9&empty=&flag";
    let signed = sign("GET", target, &accept, "", ACME_AK, ACME_SECRET, &[]);
    let r = gw.send(&request("GET", target, &accept, "", &signed));
    assert_eq!(r.status, 200, "{}", r.text());
    let e = r.echo();
    assert_eq!(e.header("x-consumer").as_deref(), Some("acme-app"));
    assert_eq!(e.header("x-tenant").as_deref(), Some("acme"));
    assert_eq!(
        e.header("x-ca-signature"),
        None,
        "the signature was not stripped"
    );

    // The same request again: the nonce was spent.
    let r = gw.send(&request("GET", target, &accept, "", &signed));
    assert_eq!((r.status, code(&r).as_str()), (401, "nonce_replayed"));

    // Tampering with a signed part: the query, the method, a signed header value.
    let before = s.app.hits();
    let signed = sign("GET", target, &accept, "", ACME_AK, ACME_SECRET, &[]);
    let r = gw.send(&request(
        "GET",
        "/api/items?b=3&a=1&a=9&empty=&flag",
        &accept,
        "",
        &signed,
    ));
    assert_eq!((r.status, code(&r).as_str()), (401, "signature_mismatch"));
    assert!(r.header("www-authenticate").is_some());
    let signed = sign("GET", target, &accept, "", ACME_AK, ACME_SECRET, &[]);
    let r = gw.send(&request("DELETE", target, &accept, "", &signed));
    assert_eq!(code(&r), "signature_mismatch");
    let signed = sign("GET", target, &accept, "", ACME_AK, ACME_SECRET, &[]);
    let r = gw.send(&request(
        "GET",
        target,
        &[("Accept", "text/html")],
        "",
        &signed,
    ));
    assert_eq!(code(&r), "signature_mismatch");
    // A key from another consumer, a retired key, a wrong secret.
    let signed = sign("GET", target, &accept, "", PARTNER_AK, ACME_SECRET, &[]);
    let r = gw.send(&request("GET", target, &accept, "", &signed));
    assert_eq!(code(&r), "signature_mismatch");
    let signed = sign(
        "GET",
        target,
        &accept,
        "",
        "acme-retired",
        "retired-secret-0123456789",
        &[],
    );
    let r = gw.send(&request("GET", target, &accept, "", &signed));
    assert_eq!(code(&r), "unknown_key");
    assert_eq!(
        s.app.hits(),
        before,
        "a refused request reached the upstream"
    );

    // Clock skew: 20 minutes old or ahead.
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for skew in [-20 * 60_000i64, 20 * 60_000] {
        let ts = (now_ms + skew).to_string();
        let signed = sign(
            "GET",
            target,
            &accept,
            "",
            ACME_AK,
            ACME_SECRET,
            &["--timestamp", &ts],
        );
        let r = gw.send(&request("GET", target, &accept, "", &signed));
        assert_eq!(
            (r.status, code(&r).as_str()),
            (401, "timestamp_skewed"),
            "skew {skew}"
        );
    }

    // HMAC-SHA1, and Higress's dialect of the string to sign.
    let signed = sign(
        "GET",
        target,
        &accept,
        "",
        PARTNER_AK,
        PARTNER_SECRET,
        &["--algorithm", "HmacSHA1"],
    );
    let r = gw.send(&request("GET", target, &accept, "", &signed));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().header("x-consumer").as_deref(), Some("partner"));
    let signed = sign(
        "GET",
        target,
        &accept,
        "",
        ACME_AK,
        ACME_SECRET,
        &["--dialect", "higress"],
    );
    let r = gw.send(&request("GET", target, &accept, "", &signed));
    assert_eq!(r.status, 200, "{}", r.text());

    // A unicode path and query, percent-encoded on the wire.
    let target = "/api/%E6%97%A5%E6%9C%AC/caf%C3%A9?q=%E2%9C%93&name=J%C3%BCrgen";
    let signed = sign("GET", target, &[], "", ACME_AK, ACME_SECRET, &[]);
    let r = gw.send(&request("GET", target, &[], "", &signed));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn signed_bodies_are_checked_and_still_reach_the_upstream_whole() {
    let s = start();
    let gw = &s.gw;

    // A form: its parameters are signed, and the upstream gets the body as sent.
    let form = [(
        "Content-Type",
        "application/x-www-form-urlencoded; charset=UTF-8",
    )];
    let body = "z=last&a=first&note=hello+world&empty=&u=%C3%BC";
    let signed = sign(
        "POST",
        "/api/form?q=1",
        &form,
        body,
        ACME_AK,
        ACME_SECRET,
        &[],
    );
    let r = gw.send(&request("POST", "/api/form?q=1", &form, body, &signed));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().body(), body);
    // A changed form value fails (same length, so only the signature can tell).
    let signed = sign(
        "POST",
        "/api/form?q=1",
        &form,
        body,
        ACME_AK,
        ACME_SECRET,
        &[],
    );
    let tampered = body.replace("first", "fIrst");
    let r = gw.send(&request("POST", "/api/form?q=1", &form, &tampered, &signed));
    assert_eq!((r.status, code(&r).as_str()), (401, "signature_mismatch"));

    // JSON with Content-MD5: the digest is checked against the body actually received.
    let json = [("Content-Type", "application/json")];
    let body = r#"{"order":42,"items":["a","b"],"note":"grüße"}"#;
    let signed = sign(
        "POST",
        "/api/json",
        &json,
        body,
        ACME_AK,
        ACME_SECRET,
        &["--content-md5"],
    );
    let r = gw.send(&request("POST", "/api/json", &json, body, &signed));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().body(), body);
    let signed = sign(
        "POST",
        "/api/json",
        &json,
        body,
        ACME_AK,
        ACME_SECRET,
        &["--content-md5"],
    );
    let swapped = body.replace("42", "43");
    let r = gw.send(&request("POST", "/api/json", &json, &swapped, &signed));
    assert_eq!((r.status, code(&r).as_str()), (400, "content_md5_mismatch"));

    // A signed form larger than the body the gateway can check and replay: 413, unread.
    let big = format!("a={}", "x".repeat(70_000));
    let signed = sign("POST", "/api/form", &form, &big, ACME_AK, ACME_SECRET, &[]);
    let r = gw.send(&request("POST", "/api/form", &form, &big, &signed));
    assert_eq!(r.status, 413, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_websocket_upgrade_opens_and_an_unsigned_one_does_not() {
    let s = start();
    let port = s.gw.port;
    let connect = |headers: Vec<(String, String)>| async move {
        let mut req = format!("ws://127.0.0.1:{port}/ws/room?user=7")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("host", HeaderValue::from_static("api.test"));
        for (k, v) in headers {
            let name: tokio_tungstenite::tungstenite::http::HeaderName = k.parse().unwrap();
            req.headers_mut()
                .insert(name, HeaderValue::from_str(&v).unwrap());
        }
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(req),
        )
        .await
        .expect("handshake timed out")
    };
    let signed = sign("GET", "/ws/room?user=7", &[], "", ACME_AK, ACME_SECRET, &[]);
    let (mut ws, _) = connect(signed).await.expect("signed upgrade refused");
    let reply = common::ws_roundtrip(&mut ws, Message::text("hi"), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(reply.into_text().unwrap().as_str(), "hi");

    match connect(Vec::new()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401);
        }
        other => panic!("unsigned upgrade: {:?}", other.map(|_| ())),
    }
    let mut signed = sign("GET", "/ws/room?user=8", &[], "", ACME_AK, ACME_SECRET, &[]);
    signed.push(("x-unsigned-extra".into(), "fine".into()));
    assert!(
        connect(signed).await.is_err(),
        "a signature for another query opened a tunnel"
    );
}
