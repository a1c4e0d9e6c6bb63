//! IP allow/deny lists and bot detection through the real binary: refusals are `403` with the
//! short JSON body and request id, never reach the upstream (WebSocket handshakes included),
//! detect mode passes and records, and the lists change by reload. Clients are told apart by
//! `X-Forwarded-For` from a trusted proxy (the test, on loopback).

mod common;

use std::time::Duration;

use common::{config, Gateway, HttpBackend, Req, WsEchoServer};

fn from(ip: &str, path: &str, ua: &str) -> Req {
    Req::get(path)
        .host("s.test")
        .header("x-forwarded-for", &format!("{ip}, 127.0.0.1"))
        .header("user-agent", ua)
}

const BROWSER: &str =
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36";

fn body(app: &HttpBackend, ws: &WsEchoServer, deny: &str) -> String {
    format!(
        r#"client_ip: {{ trusted_proxies: [ 127.0.0.0/8 ] }}
ip_rules: {{ deny: [ {deny} ] }}
bots: {{ deny: [ "^evil-crawler" ], allow: [ "^sqlmap-but-ours" ] }}
rules:
  - {{ id: admin-delete, match: {{ path_prefix: /admin, methods: [DELETE] }}, action: block }}
  - {{ id: shellshock, match: {{ headers: {{ user-agent: {{ contains: "() {{" }} }} }}, action: block }}
  - {{ id: partner-tag, match: {{ path_prefix: /tagged }}, action: tag, tag: partner }}
  - {{ id: debug-log, match: {{ query: {{ debug: {{ present: true }} }} }}, action: log }}
  - {{ id: inside-only, match: {{ path_prefix: /internal }}, client_ip: {{ not_in: [ 10.0.0.0/8 ] }}, action: block }}
upstreams:
  app: {{ backends: [ {{ address: "{}" }} ] }}
  ws: {{ backends: [ {{ address: "{}" }} ] }}
routes:
  - {{ name: admin, match: {{ path_prefix: /admin }}, upstream: app, ip_rules: {{ allow: [ 10.9.0.0/16, "2001:db8::/32" ] }} }}
  - {{ name: watch, match: {{ path_prefix: /watch }}, upstream: app, bots: detect }}
  - {{ name: open, match: {{ path_prefix: /open }}, upstream: app, bots: off, rules: false }}
  - {{ name: page, match: {{ path_prefix: /page }}, upstream: app, block_page: html }}
  - {{ name: chat, match: {{ path_prefix: /ws }}, upstream: ws, websocket: {{ enabled: true }} }}
  - {{ name: all, upstream: app }}
"#,
        app.addr(),
        ws.addr()
    )
}

#[test]
fn ip_lists_and_bots_are_refused_before_the_upstream_and_change_by_reload() {
    let app = HttpBackend::start("app");
    let ws = WsEchoServer::start();
    let gw = Gateway::start(&config(&body(
        &app,
        &ws,
        "203.0.113.0/24, \"2001:db8:bad::/48\"",
    )));

    let ok = |ip: &str, path: &str, ua: &str| {
        let r = gw.send(&from(ip, path, ua));
        assert_eq!(r.status, 200, "{ip} {path} {ua}: {}", r.text());
    };
    let refused = |ip: &str, path: &str, ua: &str, code: &str| {
        let before = app.hits();
        let r = gw.send(&from(ip, path, ua));
        assert_eq!(r.status, 403, "{ip} {path} {ua}: {}", r.text());
        let j = r.json();
        assert_eq!(j["error"], code, "{j}");
        assert_eq!(
            j["request_id"].as_str(),
            r.header("x-request-id"),
            "the body names the request id"
        );
        assert_eq!(app.hits(), before, "a refused request reached the upstream");
        r.header("x-request-id").unwrap().to_string()
    };

    ok("198.51.100.7", "/x", BROWSER);
    ok("198.51.100.7", "/x", "curl/8.5.0");
    refused("203.0.113.9", "/x", BROWSER, "ip_denied");
    refused("::ffff:203.0.113.9", "/x", BROWSER, "ip_denied");
    refused("2001:db8:bad::1", "/x", BROWSER, "ip_denied");
    // A route's allow list; the global deny list still applies inside it.
    ok("10.9.1.1", "/admin/users", BROWSER);
    ok("2001:db8::7", "/admin/users", BROWSER);
    refused("198.51.100.7", "/admin/users", BROWSER, "ip_not_allowed");

    // Bots: built-in scanners, the operator's deny pattern; allow wins; `off` routes pass.
    let id = refused(
        "198.51.100.7",
        "/x",
        "sqlmap/1.7.2#stable (https://sqlmap.org)",
        "bot_blocked",
    );
    refused(
        "198.51.100.7",
        "/x",
        "Mozilla/5.00 (Nikto/2.1.6) (Evasions:None) (Test:000001)",
        "bot_blocked",
    );
    refused("198.51.100.7", "/x", "evil-crawler/3", "bot_blocked");
    ok("198.51.100.7", "/x", "sqlmap-but-ours/1 (monitoring)");
    ok("198.51.100.7", "/open/x", "sqlmap/1.7.2");
    let line = gw
        .wait_access_log(&id, Duration::from_secs(5))
        .expect("logged");
    assert_eq!(line["status"], 403);
    assert_eq!(line["error"], "bot_blocked");
    assert_eq!(line["screened"], "bot:sqlmap");

    // Detect mode: passes, logged and counted as what would have been blocked.
    let r = gw.send(&from("198.51.100.7", "/watch/x", "masscan/1.3"));
    assert_eq!(r.status, 200);
    let line = gw
        .wait_access_log(r.header("x-request-id").unwrap(), Duration::from_secs(5))
        .expect("logged");
    assert_eq!(line["screened"], "bot:masscan");
    assert!(line.get("error").is_none(), "{line}");

    // WebSocket handshakes are screened before the upgrade: the backend never sees them.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let raw = |ua: &str| {
        let req = Req::get("/ws")
            .host("s.test")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("user-agent", ua);
        gw.send(&req)
    };
    assert_eq!(raw("sqlmap/1.7").status, 403);
    assert_eq!(ws.accepted(), 0);
    rt.block_on(async {
        let (mut c, resp) = common::ws_connect(gw.port, "s.test", "/ws").await.unwrap();
        assert_eq!(resp.status(), 101);
        let m = common::ws_roundtrip(
            &mut c,
            tokio_tungstenite::tungstenite::Message::text("hi"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(m.into_text().unwrap().as_str(), "hi");
    });

    // A route browsers open gets the refusal as a small HTML page, with the same request id.
    let r = gw.send(&from("203.0.113.9", "/page/home", BROWSER));
    assert_eq!(r.status, 403);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    let id = r.header("x-request-id").unwrap();
    let text = r.text();
    assert!(
        text.contains("403 Forbidden") && text.contains(id),
        "{text}"
    );

    // Custom rules: block, log and tag; a route can opt out.
    let mut delete = from("10.9.1.1", "/admin/users/7", BROWSER);
    delete.method = "DELETE".into();
    let before = app.hits();
    let r = gw.send(&delete);
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["error"], "blocked_by_rule");
    assert_eq!(app.hits(), before);
    let line = gw
        .wait_access_log(r.header("x-request-id").unwrap(), Duration::from_secs(5))
        .expect("logged");
    assert_eq!(line["screened"], "rule:admin-delete");
    refused(
        "198.51.100.7",
        "/x",
        "() { :; }; /bin/cat /etc/passwd",
        "blocked_by_rule",
    );
    ok("198.51.100.7", "/open/x", "() { :; }; /bin/cat /etc/passwd");
    refused("198.51.100.7", "/internal/x", BROWSER, "blocked_by_rule");
    ok("10.1.1.1", "/internal/x", BROWSER);
    let r = gw.send(&from("198.51.100.7", "/tagged/x", BROWSER).header("x-tollgate-tags", "vip"));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.echo().header_values("x-tollgate-tags"),
        ["partner"],
        "the client's own tags are dropped"
    );
    let r = gw.send(&from("198.51.100.7", "/x?debug=1", BROWSER));
    assert_eq!(r.status, 200);
    let line = gw
        .wait_access_log(r.header("x-request-id").unwrap(), Duration::from_secs(5))
        .expect("logged");
    assert_eq!(line["screened"], "rule:debug-log");

    let m = gw.metrics_text();
    for (selector, at_least) in [
        (
            r#"tollgate_screened_total{action="blocked",category="bot",route="all",rule="sqlmap"}"#,
            1.0,
        ),
        (
            r#"tollgate_screened_total{action="blocked",category="ip",route="all",rule="deny"}"#,
            3.0,
        ),
        (
            r#"tollgate_screened_total{action="blocked",category="ip",route="admin",rule="allow"}"#,
            1.0,
        ),
        (
            r#"tollgate_screened_total{action="detected",category="bot",route="watch",rule="masscan"}"#,
            1.0,
        ),
        (
            r#"tollgate_screened_total{action="blocked",category="bot",route="chat",rule="sqlmap"}"#,
            1.0,
        ),
        (
            r#"tollgate_screened_total{action="blocked",category="rule",route="admin",rule="admin-delete"}"#,
            1.0,
        ),
        (
            r#"tollgate_screened_total{action="matched",category="rule",route="all",rule="debug-log"}"#,
            1.0,
        ),
    ] {
        let v = common::metric_in(&m, selector).unwrap_or(0.0);
        assert!(v >= at_least, "{selector} = {v}\n{m}");
    }

    // The lists are hot: a new deny takes effect without a restart; a broken one is refused
    // with its place and the old lists keep serving.
    let gen = gw.generation();
    gw.write_config(&config(&body(&app, &ws, "198.51.100.0/24")));
    gw.wait_generation(gen + 1, Duration::from_secs(10));
    refused("198.51.100.7", "/x", BROWSER, "ip_denied");
    ok("203.0.113.9", "/x", BROWSER);
    let text = gw.write_config(&config(&body(&app, &ws, "198.51.100.0/33")));
    let line = common::line_of(&text, "ip_rules: { deny");
    assert!(common::wait_until(Duration::from_secs(10), || {
        gw.status_json()["last_error"]
            .to_string()
            .contains("ip_rules.deny[0]")
    }));
    let err = gw.status_json()["last_error"][0].clone();
    assert_eq!(err["line"], line, "{err}");
    refused("198.51.100.7", "/x", BROWSER, "ip_denied");
}

/// Custom rules on the body: read before anything reaches the upstream, which still gets the
/// whole body; `block` refuses, `tag` tags, and chunked bodies are seen too.
#[test]
fn body_rules_refuse_or_tag_and_the_upstream_gets_the_body_whole() {
    let app = HttpBackend::start("app");
    let gw = Gateway::start(&config(&format!(
        r#"client_ip: {{ trusted_proxies: [ 127.0.0.0/8 ] }}
rules:
  - {{ id: no-drop, body: {{ regex: "(?i)drop\\s+table" }}, action: block }}
  - {{ id: coupon, match: {{ methods: [POST] }}, body: {{ contains: "\"coupon\"" }}, action: tag, tag: promo }}
upstreams:
  app: {{ backends: [ {{ address: "{}" }} ] }}
routes:
  - {{ name: open, match: {{ path_prefix: /open }}, upstream: app, rules: false }}
  - {{ name: all, upstream: app }}
"#,
        app.addr()
    )));
    let post = |path: &str, body: &str| {
        Req::post(path, body.as_bytes().to_vec())
            .host("s.test")
            .header("content-type", "application/json")
            .header("user-agent", BROWSER)
    };
    let before = app.hits();
    let r = gw.send(&post("/api", r#"{"q":"1; DROP   TABLE users"}"#));
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).contains("blocked_by_rule"));
    let line = gw
        .wait_access_log(r.header("x-request-id").unwrap(), Duration::from_secs(5))
        .expect("the refusal is logged");
    assert_eq!(line["screened"], "rule:no-drop");
    assert_eq!(
        app.hits(),
        before,
        "a refused body never reaches the upstream"
    );

    let body = format!(r#"{{"coupon":"SUMMER","pad":"{}"}}"#, "x".repeat(20_000));
    let r = gw.send(&post("/api", &body));
    assert_eq!(r.status, 200);
    let echo = r.echo();
    assert_eq!(echo.header_values("x-tollgate-tags"), ["promo"]);
    assert_eq!(
        echo.body_len(),
        body.len() as u64,
        "the read body is replayed whole"
    );

    // Chunked: no Content-Length, the rule still sees it.
    let json = r#"{"q":"x drop table accounts"}"#;
    let chunked = format!("{:x}\r\n{json}\r\n0\r\n\r\n", json.len());
    let r = gw.send(
        &Req::post("/api", chunked.into_bytes())
            .host("s.test")
            .header("user-agent", BROWSER)
            .header("transfer-encoding", "chunked"),
    );
    assert_eq!(r.status, 403);

    // `rules: false` routes are not read for rules and not refused.
    let r = gw.send(&post("/open/x", r#"{"q":"drop table t"}"#));
    assert_eq!(r.status, 200);
    assert_eq!(r.echo().body(), r#"{"q":"drop table t"}"#);
}
