//! Flood (CC) protection through the real binary. Clients are told apart by `X-Forwarded-For`
//! from a trusted proxy (the test itself, on loopback), as behind the customer's load balancer.

mod common;

use std::time::{Duration, Instant};

use common::{config, Gateway, HttpBackend, RawConn, Req};

fn from(ip: &str, path: &str) -> Req {
    Req::get(path)
        .host("f.test")
        .header("x-forwarded-for", &format!("{ip}, 127.0.0.1"))
}

/// Sends `n` requests from `ip` as fast as one connection goes; returns (ok, refused).
fn burst(gw: &Gateway, ip: &str, n: usize) -> (usize, usize) {
    let mut conn = RawConn::connect(gw.addr()).unwrap();
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..n {
        let r = match conn.request(&from(ip, "/x")) {
            Ok(r) => r,
            Err(_) => {
                conn = RawConn::connect(gw.addr()).unwrap();
                conn.request(&from(ip, "/x")).unwrap()
            }
        };
        match r.status {
            200 => ok += 1,
            429 => {
                assert_eq!(r.json()["error"], "flood_blocked");
                assert!(r.header("retry-after").is_some());
                refused += 1;
            }
            s => panic!("unexpected status {s}"),
        }
    }
    (ok, refused)
}

#[test]
fn a_flooding_ip_is_blocked_then_released_and_allow_listed_ones_never_are() {
    let app = HttpBackend::start("app");
    let gw = Gateway::start(&config(&format!(
        r#"client_ip: {{ trusted_proxies: [ 127.0.0.0/8 ] }}
flood:
  enabled: true
  requests_per_second: 10
  block_for: 5s
  allow: [ 10.9.0.0/16, "2001:db8::/32" ]
upstreams:
  app: {{ backends: [ {{ address: "{}" }} ] }}
routes:
  - {{ name: all, upstream: app }}
"#,
        app.addr()
    )));

    // 500 requests in about a second: 50× the threshold.
    let started = Instant::now();
    let (ok, refused) = burst(&gw, "203.0.113.5", 500);
    let took = started.elapsed();
    assert!(
        ok <= 30 && refused >= 470,
        "the flooding IP got {ok} through, {refused} refused, in {took:?}"
    );
    let hits_after_flood = app.hits();
    // Others are not affected: a quiet client, and allow-listed ones at the same rate.
    assert_eq!(
        burst(&gw, "198.51.100.7", 5),
        (5, 0),
        "a quiet IP was refused"
    );
    assert_eq!(
        burst(&gw, "10.9.1.1", 500),
        (500, 0),
        "an allow-listed IP was limited"
    );
    assert_eq!(
        burst(&gw, "2001:db8::42", 100),
        (100, 0),
        "an allow-listed IPv6 was limited"
    );
    assert_eq!(app.hits(), hits_after_flood + 605);
    // Still blocked, then released after block_for.
    assert_eq!(burst(&gw, "203.0.113.5", 1), (0, 1));
    let released = common::wait_until(Duration::from_secs(10), || {
        burst(&gw, "203.0.113.5", 1) == (1, 0)
    });
    assert!(released, "the block did not expire");
    let since = started.elapsed();
    assert!(
        since >= Duration::from_secs(5),
        "released after only {since:?}"
    );

    let m = gw.metrics_text();
    assert!(
        common::metric_in(&m, "tollgate_flood_blocks_total").unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    assert!(common::metric_in(&m, "tollgate_flood_refused_total").unwrap_or(0.0) >= 470.0);
    assert!(gw
        .stderr_text()
        .contains("flood protection: client blocked"));
}
