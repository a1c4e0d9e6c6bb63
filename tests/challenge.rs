//! The browser challenge through the real binary: headless Chromium (Debian's `chromium`) runs
//! the page's script, gets the cookie and reaches the upstream; a client that does not run
//! JavaScript never does; a solved cookie works only for the client address and browser it
//! was issued to, and only until it expires.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{config, Gateway, HttpBackend, Req};

const CHROMIUM: &str = "/usr/bin/chromium";
const UA: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36";

fn from(ip: &str, ua: &str, cookie: Option<&str>) -> Req {
    let r = Req::get("/app/page")
        .host("c.test")
        .header("x-forwarded-for", &format!("{ip}, 127.0.0.1"))
        .header("user-agent", ua);
    match cookie {
        Some(c) => r.header("cookie", &format!("theme=dark; __tollgate_challenge={c}")),
        None => r,
    }
}

fn start(app: &HttpBackend) -> Gateway {
    Gateway::start(&config(&format!(
        r#"client_ip: {{ trusted_proxies: [ 127.0.0.0/8 ] }}
bots:
  allow: [ "^internal-probe/" ]
  challenge: {{ secret: "challenge-secret-0123456789", ttl: 3s }}
upstreams:
  app: {{ backends: [ {{ address: "{}" }} ] }}
routes:
  - {{ name: app, match: {{ path_prefix: /app }}, upstream: app, bots: challenge }}
  - {{ name: api, upstream: app }}
"#,
        app.addr()
    )))
}

/// The token a challenge page hands out (`var t = "..."`).
fn token(page: &str) -> String {
    let start = page.find("var t = \"").expect("a challenge page") + 9;
    page[start..][..page[start..].find('"').unwrap()].to_string()
}

#[test]
fn solved_cookies_pass_for_their_client_only_until_they_expire() {
    let app = HttpBackend::start("app");
    let gw = start(&app);

    let r = gw.send(&from("198.51.100.7", UA, None));
    assert_eq!(r.status, 403);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let page = r.text();
    assert!(page.contains("Checking your browser"), "{page}");
    assert_eq!(app.hits(), 0, "a challenged request reached the upstream");

    // Solve it as the page's script would (FNV-1a proof of work, 12 bits by default).
    let cookie = tollgate::policy::challenge::solve(&token(&page), 12);
    let r = gw.send(&from("198.51.100.7", UA, Some(&cookie)));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(app.hits(), 1);
    // The same cookie from another address, or another browser, is challenged again.
    assert_eq!(
        gw.send(&from("198.51.100.8", UA, Some(&cookie))).status,
        403
    );
    assert_eq!(
        gw.send(&from("198.51.100.7", "curl/8.5.0", Some(&cookie)))
            .status,
        403
    );
    // Forged or unsolved cookies do not pass.
    let unsolved = format!("{}.0", token(&page));
    if tollgate::policy::challenge::fnv1a32(unsolved.as_bytes()).leading_zeros() < 12 {
        assert_eq!(
            gw.send(&from("198.51.100.7", UA, Some(&unsolved))).status,
            403
        );
    }
    assert_eq!(
        gw.send(&from(
            "198.51.100.7",
            UA,
            Some("9999999999.AAAAAAAAAAAAAAAAAAAAAA.1")
        ))
        .status,
        403
    );
    // Routes without `bots: challenge`, and allow-listed User-Agents, are not challenged.
    let api = Req::get("/x")
        .host("c.test")
        .header("user-agent", "curl/8.5.0");
    assert_eq!(gw.send(&api).status, 200);
    assert_eq!(
        gw.send(&from("198.51.100.9", "internal-probe/1", None))
            .status,
        200
    );

    // After `ttl` the cookie no longer works.
    let issued = Instant::now();
    let expired = common::wait_until(Duration::from_secs(8), || {
        gw.send(&from("198.51.100.7", UA, Some(&cookie))).status == 403
    });
    assert!(expired, "the cookie outlived its ttl");
    assert!(issued.elapsed() >= Duration::from_secs(1));

    let m = gw.metrics_text();
    let challenged = common::metric_in(
        &m,
        r#"tollgate_screened_total{action="blocked",category="bot",route="app",rule="challenge"}"#,
    )
    .unwrap_or(0.0);
    assert!(challenged >= 5.0, "{m}");
}

#[test]
fn headless_chromium_passes_the_challenge_and_curl_does_not() {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: apt-get install chromium (see README)"
    );
    let app = HttpBackend::start("app");
    let gw = start(&app);
    let url = format!("{}/app/page", gw.url());

    // A client that does not run JavaScript stays on the page.
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-c", "-", "-b", "", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Checking your browser"), "{text}");
    assert_eq!(app.hits(), 0);

    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .arg("60")
        .arg(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            // Runs the page's script, its cookie and its reload, then dumps the final page.
            "--virtual-time-budget=15000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(&url)
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains(r#""backend":"app""#),
        "chromium did not reach the upstream; dom:\n{dom}\nstderr:\n{}",
        common::tail(&String::from_utf8_lossy(&out.stderr), 20)
    );
    assert!(app.hits() >= 1);
}
