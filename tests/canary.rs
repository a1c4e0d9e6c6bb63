//! Canary splits: header and cookie rules, weights, stickiness, and switching by reload.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use tokio_tungstenite::tungstenite::Message;

use common::{
    base, config, ws_connect, ws_roundtrip, Gateway, HttpBackend, RawConn, Req, WsEchoServer,
};

fn upstreams(stable: &str, canary: &str) -> String {
    format!(
        "upstreams:\n  app:\n    backends: [ {{ address: \"{stable}\", labels: {{ stage: stable }} }}, {{ address: \"{canary}\", labels: {{ stage: canary }} }} ]\n"
    )
}

fn side(gw: &Gateway, req: Req) -> String {
    gw.send(&req).echo().backend()
}

#[test]
fn header_and_cookie_rules() {
    let (s, c) = (HttpBackend::start("stable"), HttpBackend::start("canary"));
    let gw = Gateway::start(&config(&format!(
        "{}{}",
        upstreams(&s.addr(), &c.addr()),
        r#"routes:
  - name: api
    upstream: app
    split:
      - { when: { headers: { x-stage: canary } }, labels: { stage: canary } }
      - { when: { cookies: { beta: "yes" } }, labels: { stage: canary } }
    labels: { stage: stable }
"#
    )));
    for i in 0..10 {
        let p = format!("/r{i}");
        assert_eq!(side(&gw, Req::get(&p)), "stable", "no rule matches");
        assert_eq!(
            side(&gw, Req::get(&p).header("x-stage", "canary")),
            "canary",
            "header rule"
        );
        assert_eq!(
            side(&gw, Req::get(&p).header("X-Stage", "canary")),
            "canary",
            "header name case"
        );
        assert_eq!(
            side(&gw, Req::get(&p).header("x-stage", "stable")),
            "stable",
            "other header value"
        );
        assert_eq!(
            side(&gw, Req::get(&p).header("Cookie", "a=1; beta=yes")),
            "canary",
            "cookie rule"
        );
        assert_eq!(
            side(&gw, Req::get(&p).header("Cookie", "beta=no; x=yes")),
            "stable",
            "other cookie value"
        );
    }
}

#[test]
fn weighted_split_is_ten_percent_over_10000_requests() {
    let (s, c) = (HttpBackend::start("stable"), HttpBackend::start("canary"));
    let gw = Arc::new(Gateway::start(&config(&format!(
        "{}{}",
        upstreams(&s.addr(), &c.addr()),
        r#"routes:
  - name: api
    upstream: app
    split: [ { weight: 10, labels: { stage: canary } } ]
    labels: { stage: stable }
"#
    ))));
    const THREADS: usize = 4;
    const PER: usize = 2500;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let gw = gw.clone();
            thread::spawn(move || {
                let mut counts: BTreeMap<String, usize> = BTreeMap::new();
                let mut conn = RawConn::connect(gw.addr()).unwrap();
                for i in 0..PER {
                    let r = match conn.request(&Req::get(&format!("/w/{t}/{i}"))) {
                        Ok(r) => r,
                        Err(e) => panic!("thread {t} request {i}: {e}"),
                    };
                    if r.closes() {
                        conn = RawConn::connect(gw.addr()).unwrap();
                    }
                    *counts.entry(r.echo().backend()).or_insert(0) += 1;
                }
                counts
            })
        })
        .collect();
    let mut total: BTreeMap<String, usize> = BTreeMap::new();
    for h in handles {
        for (k, v) in h.join().expect("load thread") {
            *total.entry(k).or_insert(0) += v;
        }
    }
    let n = (THREADS * PER) as f64;
    let canary = *total.get("canary").unwrap_or(&0) as f64 / n * 100.0;
    eprintln!("weighted split: {total:?} → {canary:.2}% canary");
    assert_eq!(total.values().sum::<usize>(), THREADS * PER);
    assert!(
        (7.0..=13.0).contains(&canary),
        "canary share {canary:.2}% not within 10 ± 3: {total:?}"
    );
    assert_eq!(s.hits() + c.hits(), (THREADS * PER) as u64);
}

#[test]
fn sticky_split_keeps_a_client_on_its_side() {
    let (s, c) = (HttpBackend::start("stable"), HttpBackend::start("canary"));
    let gw = Gateway::start(&config(&format!(
        "{}{}",
        upstreams(&s.addr(), &c.addr()),
        r#"routes:
  - name: api
    upstream: app
    split: [ { weight: 50, labels: { stage: canary } } ]
    labels: { stage: stable }
    sticky: { cookie: uid }
"#
    )));
    let mut conn = RawConn::connect(gw.addr()).unwrap();
    let mut per_side: BTreeMap<String, usize> = BTreeMap::new();
    for u in 0..60 {
        let cookie = format!("theme=dark; uid=user-{u}");
        let mut sides = Vec::new();
        for i in 0..5 {
            let r = conn
                .request(&Req::get(&format!("/s/{i}")).header("Cookie", &cookie))
                .unwrap();
            if r.closes() {
                conn = RawConn::connect(gw.addr()).unwrap();
            }
            sides.push(r.echo().backend());
        }
        assert!(
            sides.iter().all(|x| *x == sides[0]),
            "uid user-{u} moved between sides: {sides:?}"
        );
        *per_side.entry(sides[0].clone()).or_insert(0) += 1;
    }
    // 60 clients on a 50% split: both sides get a fair share (P(fail) < 1e-6).
    assert!(
        per_side.get("stable").copied().unwrap_or(0) >= 12,
        "{per_side:?}"
    );
    assert!(
        per_side.get("canary").copied().unwrap_or(0) >= 12,
        "{per_side:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_switch_by_reload_keeps_open_websocket_on_old_backend() {
    let stable = WsEchoServer::start_named("stable");
    let canary = WsEchoServer::start_named("canary");
    // watch off: the switch happens exactly at the SIGHUP.
    let cfg = |labels: &str| {
        format!(
            "{}reload: {{ watch: false }}\n{}routes:\n  - name: ws\n    upstream: app\n    labels: {{ stage: {labels} }}\n",
            base(),
            upstreams(&stable.addr(), &canary.addr())
        )
    };
    let gw = Arc::new(Gateway::start(&cfg("stable")));
    let whoami = || Message::text("whoami");

    let (mut old, _) = ws_connect(gw.port, "ws.test", "/chat")
        .await
        .expect("ws before switch");
    assert_eq!(
        ws_roundtrip(&mut old, whoami(), Duration::from_secs(5)).await,
        Ok(Message::text("stable"))
    );

    let g = gw.clone();
    let text = cfg("canary");
    let gen = tokio::task::spawn_blocking(move || {
        g.write_config(&text);
        g.sighup();
        g.wait_generation(2, Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert_eq!(gen, 2, "one SIGHUP, one reload");

    // New connections follow the new rule...
    for i in 0..3 {
        let (mut new, _) = ws_connect(gw.port, "ws.test", "/chat")
            .await
            .expect("ws after switch");
        assert_eq!(
            ws_roundtrip(&mut new, whoami(), Duration::from_secs(5)).await,
            Ok(Message::text("canary")),
            "new connection {i} after the switch"
        );
        new.close(None).await.ok();
    }
    // ...while the open one is still tunnelled to the stable backend and works.
    for i in 0..5 {
        let m = Message::text(format!("still here {i}"));
        assert_eq!(
            ws_roundtrip(&mut old, m.clone(), Duration::from_secs(5)).await,
            Ok(m)
        );
    }
    assert_eq!(
        ws_roundtrip(&mut old, whoami(), Duration::from_secs(5)).await,
        Ok(Message::text("stable"))
    );
    assert_eq!(
        stable.active(),
        1,
        "the old tunnel is the stable backend's only connection"
    );
    old.close(None).await.ok();
}
