//! HTTP traffic while the config is reloaded 100 times (SIGHUP and file edits alternating), with a
//! broken file in the middle: zero failed requests, zero 5xx, the broken file refused and located.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{base, line_of, Gateway, HttpBackend, RawConn, Req};

const RELOADS: u64 = 100;

/// Good config number `n`: the marker route answers `gen-N`; the upstream alternates between
/// one and two backends; extra routes come and go.
fn good_config(n: u64, b1: &str, b2: &str) -> String {
    let backends = if n.is_multiple_of(2) {
        format!("[ {{ address: \"{b1}\" }}, {{ address: \"{b2}\" }} ]")
    } else {
        format!("[ {{ address: \"{b1}\" }} ]")
    };
    let mut s = format!(
        "{}reload: {{ watch: true, watch_interval: 100ms }}\nupstreams:\n  app:\n    backends: {backends}\nroutes:\n  - name: marker\n    match: {{ path: /marker }}\n    respond: {{ body: \"gen-{n}\" }}\n  - name: api\n    match: {{ path_prefix: /api }}\n    upstream: app\n    request_headers: {{ set: {{ x-gen: \"{n}\" }} }}\n",
        base()
    );
    for k in 0..(n % 4) {
        s.push_str(&format!("  - name: extra-{k}\n    match: {{ path: /extra/{n}/{k} }}\n    respond: {{ body: x }}\n"));
    }
    s
}

fn marker(gw: &Gateway) -> Option<String> {
    let mut c = RawConn::connect(gw.addr()).ok()?;
    let r = c.request(&Req::get("/marker").host("load.test")).ok()?;
    (r.status == 200).then(|| r.text())
}

fn wait_marker(gw: &Gateway, n: u64) {
    let want = format!("gen-{n}");
    let mut last = None;
    let ok = common::wait_until(Duration::from_secs(10), || {
        last = marker(gw);
        last.as_deref() == Some(want.as_str())
    });
    assert!(
        ok,
        "config {n} not in effect within 10 s (marker says {last:?}); stderr tail:\n{}",
        common::tail(&gw.stderr_text(), 2000)
    );
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    five_xx: AtomicU64,
    first_failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let mut f = self.first_failures.lock().unwrap();
        if f.len() < 10 {
            f.push(what);
        }
    }
}

/// One load thread: keep-alive (one connection reused) or a new connection per request.
fn load(gw: Arc<Gateway>, id: usize, keepalive: bool, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut conn: Option<RawConn> = None;
    for i in 0..200_000u64 {
        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
            break;
        }
        if conn.is_none() {
            match RawConn::connect(gw.addr()) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    tally.fail(format!("thread {id} req {i}: connect: {e}"));
                    thread::sleep(Duration::from_millis(5));
                    continue;
                }
            }
        }
        let c = conn.as_mut().unwrap();
        let reused = c.requests > 0;
        let path = format!("/api/t{id}/r{i}?k={}", if keepalive { "ka" } else { "new" });
        match c.request(&Req::get(&path).host("load.test")) {
            Ok(r) if r.status >= 500 => {
                tally.five_xx.fetch_add(1, Ordering::SeqCst);
                tally.fail(format!("thread {id} req {i}: {} {}", r.status, r.text()));
            }
            Ok(r) if r.status != 200 => {
                tally.fail(format!("thread {id} req {i}: {} {}", r.status, r.text()))
            }
            Ok(r) => {
                let e = r.echo();
                let b = e.backend();
                if (b != "b1" && b != "b2") || e.path() != path {
                    tally.fail(format!("thread {id} req {i}: wrong echo {}", e.0));
                } else {
                    tally.ok.fetch_add(1, Ordering::SeqCst);
                }
                if r.closes() {
                    conn = None;
                }
            }
            Err(e) => {
                tally.fail(format!(
                    "thread {id} req {i} ({}): {e}",
                    if reused {
                        "reused connection"
                    } else {
                        "fresh connection"
                    }
                ));
                conn = None;
            }
        }
        if !keepalive || conn.as_ref().is_some_and(|c| c.requests >= 500) {
            conn = None;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn hundred_reloads_under_load_lose_no_request() {
    let b1 = HttpBackend::start("b1");
    let b2 = HttpBackend::start("b2");
    let (a1, a2) = (b1.addr(), b2.addr());
    let gw = Arc::new(Gateway::start(&good_config(1, &a1, &a2)));
    wait_marker(&gw, 1);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let threads: Vec<_> = (0..4)
        .map(|id| {
            let (gw, stop, tally) = (gw.clone(), stop.clone(), tally.clone());
            thread::spawn(move || load(gw, id, id.is_multiple_of(2), stop, tally))
        })
        .collect();
    thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    let mut broken_checked = false;
    for n in 2..=RELOADS + 1 {
        if n == RELOADS / 2 + 1 && !broken_checked {
            broken_checked = true;
            // A broken file (unknown upstream) picked up by the watcher: refused whole.
            let errors_before = gw
                .metric(r#"tollgate_config_reloads_total{result="error"}"#)
                .unwrap_or(0.0);
            let text = format!(
                "{}  - name: broken\n    match: {{ path: /broken }}\n    upstream: does_not_exist\n",
                good_config(n, &a1, &a2)
            );
            let text = gw.write_config(&text);
            let bad_line = line_of(&text, "upstream: does_not_exist");
            let ok = common::wait_until(Duration::from_secs(10), || {
                gw.metric(r#"tollgate_config_reloads_total{result="error"}"#)
                    .unwrap_or(0.0)
                    > errors_before
            });
            assert!(
                ok,
                "broken file did not count as a failed reload; stderr:\n{}",
                common::tail(&gw.stderr_text(), 2000)
            );
            thread::sleep(Duration::from_millis(500)); // several watch intervals: counted once only
            assert_eq!(
                gw.metric(r#"tollgate_config_reloads_total{result="error"}"#),
                Some(errors_before + 1.0),
                "one broken edit should be one failed reload"
            );
            assert_eq!(
                marker(&gw).as_deref(),
                Some(format!("gen-{}", n - 1).as_str()),
                "old config must keep serving"
            );
            assert_eq!(
                gw.get("load.test", "/broken").status,
                404,
                "broken config partly applied"
            );
            let loc = format!("{}:{bad_line}:", gw.config_path.display());
            let err = gw.stderr_text();
            assert!(
                err.contains(&loc),
                "stderr should locate the error as `{loc}COL`; stderr tail:\n{}",
                common::tail(&err, 2000)
            );
            let st = gw.status_json();
            assert!(
                st["last_error"].as_array().is_some_and(|a| !a.is_empty()),
                "/status last_error after a failed reload: {st}"
            );
        }
        let text = good_config(n, &a1, &a2);
        if n.is_multiple_of(2) {
            gw.write_config(&text);
        } else {
            gw.write_config(&text);
            gw.sighup();
        }
        wait_marker(&gw, n);
    }
    let reload_time = started.elapsed();
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("load thread panicked");
    }

    let ok = tally.ok.load(Ordering::SeqCst);
    let failed = tally.failed.load(Ordering::SeqCst);
    let five = tally.five_xx.load(Ordering::SeqCst);
    eprintln!(
        "{ok} requests ok, {failed} failed, {five} 5xx during {RELOADS} reloads in {reload_time:?}"
    );
    assert_eq!(
        failed,
        0,
        "failed requests; first: {:#?}",
        tally.first_failures.lock().unwrap()
    );
    assert_eq!(five, 0);
    assert!(ok >= 500, "too little traffic to mean anything: {ok}");
    assert!(
        b1.hits() > 0 && b2.hits() > 0,
        "both backends served: b1 {} b2 {}",
        b1.hits(),
        b2.hits()
    );

    assert!(gw.alive(), "gateway died");
    let gen = gw.generation();
    let ok_reloads = gw
        .metric(r#"tollgate_config_reloads_total{result="ok"}"#)
        .unwrap_or(-1.0);
    assert!(
        gen > RELOADS,
        "generation {gen} after {RELOADS} successful reloads"
    );
    assert_eq!(
        ok_reloads,
        (gen - 1) as f64,
        "generation = 1 + successful reloads"
    );
    assert_eq!(
        gw.metric(r#"tollgate_config_reloads_total{result="error"}"#),
        Some(1.0)
    );
    assert_eq!(gw.status_json()["generation"].as_u64(), Some(gen));
}

#[test]
fn sighup_with_broken_file_keeps_old_config_then_recovers() {
    let b1 = HttpBackend::start("b1");
    let cfg = |marker: &str, extra: &str| {
        format!(
            "{}reload: {{ watch: false }}\nupstreams:\n  app: {{ backends: [ {{ address: \"{}\" }} ] }}\nroutes:\n  - name: marker\n    match: {{ path: /marker }}\n    respond: {{ body: \"{marker}\" }}\n{extra}  - name: api\n    upstream: app\n",
            base(),
            b1.addr()
        )
    };
    let gw = Gateway::start(&cfg("gen-1", ""));
    assert_eq!(marker(&gw).as_deref(), Some("gen-1"));
    assert_eq!(
        gw.status_json()["last_error"],
        serde_json::Value::Null,
        "no error after a clean start"
    );

    // Two independent mistakes; SIGHUP; both reported, nothing applied.
    let text = gw.write_config(&cfg(
        "gen-2",
        "  - name: bad-dur\n    match: { path: /x }\n    upstream: app\n    websocket: { idle_timeout: forever }\n  - name: bad-size\n    match: { path: /y }\n    upstream: app\n    max_body: lots\n",
    ));
    let (l1, l2) = (
        line_of(&text, "idle_timeout: forever"),
        line_of(&text, "max_body: lots"),
    );
    gw.sighup();
    assert!(
        common::wait_until(Duration::from_secs(5), || {
            gw.metric(r#"tollgate_config_reloads_total{result="error"}"#) == Some(1.0)
        }),
        "failed reload not counted; stderr:\n{}",
        common::tail(&gw.stderr_text(), 2000)
    );
    assert!(gw.alive(), "gateway died on a broken file");
    assert_eq!(gw.generation(), 1);
    assert_eq!(
        marker(&gw).as_deref(),
        Some("gen-1"),
        "old config keeps serving"
    );
    assert_eq!(gw.get("a.test", "/any").echo().backend(), "b1");
    let err = gw.stderr_text();
    let file = gw.config_path.display().to_string();
    for l in [l1, l2] {
        assert!(
            err.contains(&format!("{file}:{l}:")),
            "stderr lacks `{file}:{l}:`:\n{}",
            common::tail(&err, 2000)
        );
    }
    let st = gw.status_json();
    assert_eq!(st["generation"].as_u64(), Some(1), "{st}");
    assert!(
        st["last_error"].as_array().is_some_and(|a| !a.is_empty()),
        "/status last_error: {st}"
    );

    // Fixed file: next SIGHUP applies it.
    gw.write_config(&cfg("gen-2", ""));
    gw.sighup();
    assert_eq!(gw.wait_generation(2, Duration::from_secs(5)), 2);
    assert_eq!(marker(&gw).as_deref(), Some("gen-2"));
    assert_eq!(
        gw.metric(r#"tollgate_config_reloads_total{result="ok"}"#),
        Some(1.0)
    );
    assert_eq!(
        gw.metric(r#"tollgate_config_reloads_total{result="error"}"#),
        Some(1.0)
    );
}
