//! Cluster-wide quotas through the real binary: two tollgate processes and one real
//! `redis-server` started by the test. Together the gateways admit the quota (not twice it);
//! when Redis is killed under load they fall back to `limit / fleet_size` each without one
//! error to a client, and after Redis comes back on the same port they share again.
//!
//! Windows are clock seconds. Admissions are counted where they land: the upstream stamps
//! every request it receives (unix ms, and which gateway it came through), so a window's
//! count is the gateways' own decision, not the client's view of it. Only windows the load
//! covered entirely are judged.

mod common;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use common::{config, free_port, tail, wait_until, Gateway, RawConn, Req};

const REDIS: &str = "/usr/bin/redis-server";
/// The plan's `requests_per_second`, counted across the fleet.
const QUOTA: u64 = 100;
const FLEET: u64 = 2;
/// Offered per gateway: together 3× the quota.
const RATE_EACH: u64 = 150;
const CONNS_EACH: usize = 3;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// ---------------------------------------------------------------------------------------------
// A real Redis, killed with the test

/// `redis-server` on 127.0.0.1, no persistence; SIGKILLed on [`Redis::kill`] and on drop.
struct Redis {
    port: u16,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

impl Redis {
    /// Starts on a free port (retrying with another if it was taken meanwhile).
    fn start() -> Redis {
        let mut last = String::new();
        for _attempt in 0..3 {
            let r = Redis {
                port: free_port(),
                dir: tempfile::Builder::new()
                    .prefix("tollgate-redis")
                    .tempdir()
                    .unwrap(),
                child: Mutex::new(None),
            };
            match r.spawn() {
                Ok(()) => return r,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    /// Runs `redis-server` on `self.port` and waits (bounded) until it answers PING.
    fn spawn(&self) -> Result<(), String> {
        let log = fs::File::create(self.dir.path().join("redis.log")).unwrap();
        let child = Command::new(REDIS)
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {REDIS}: {e}"))?;
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(reply) = self.cmd(&["PING"]) {
                if reply == "PONG" {
                    return Ok(());
                }
            }
            let exited = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .map(|c| c.try_wait().ok().flatten().is_some())
                .unwrap_or(true);
            if exited || Instant::now() >= deadline {
                let log = fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
                if let Some(mut c) = self.child.lock().unwrap().take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(format!(
                    "no PONG on port {} (exited: {exited}); log:\n{}",
                    self.port,
                    tail(&log, 2000)
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// SIGKILL (no goodbye to its clients) and wait until the port refuses connections.
    fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            c.kill().expect("kill redis-server");
            c.wait().expect("reap redis-server");
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let gone = wait_until(Duration::from_secs(3), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err()
        });
        assert!(gone, "redis port {} still accepts after kill", self.port);
    }

    /// A fresh (empty) Redis on the same port.
    fn restart(&self) {
        assert!(
            self.child.lock().unwrap().is_none(),
            "restart of a live redis"
        );
        self.spawn()
            .unwrap_or_else(|e| panic!("redis restart: {e}"));
    }

    /// One command in RESP; the reply as text (`(nil)` for a null bulk string).
    fn cmd(&self, args: &[&str]) -> io::Result<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes())?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 512];
        for _ in 0..100 {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            let Some(line_end) = text.find("\r\n") else {
                continue;
            };
            let (kind, first) = text.split_at(1);
            let first = &first[..line_end - 1];
            match kind {
                "+" | ":" => return Ok(first.to_string()),
                "-" => return Err(io::Error::other(first.to_string())),
                "$" if first == "-1" => return Ok("(nil)".into()),
                "$" => {
                    let len: usize = first.parse().map_err(io::Error::other)?;
                    let body = &text[line_end + 2..];
                    if body.len() >= len + 2 {
                        return Ok(body[..len].to_string());
                    }
                }
                _ => return Err(io::Error::other(format!("unexpected reply {text:?}"))),
            }
        }
        Err(io::Error::other("reply too long"))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// An upstream that stamps every request

/// Answers every request 200 and records (unix ms, first byte of `x-via`) on arrival.
struct Stamps {
    port: u16,
    hits: Arc<Mutex<Vec<(u64, u8)>>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Stamps {
    fn start() -> Stamps {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let h = hits.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let h = h.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<Incoming>| {
                        let via = req
                            .headers()
                            .get("x-via")
                            .and_then(|v| v.as_bytes().first().copied())
                            .unwrap_or(b'?');
                        h.lock().unwrap().push((unix_ms(), via));
                        async {
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"ok\n"),
                            )))
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Stamps {
            port,
            hits,
            rt: Some(rt),
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The stamps so far, cleared.
    fn take(&self) -> Vec<(u64, u8)> {
        std::mem::take(&mut *self.hits.lock().unwrap())
    }
}

impl Drop for Stamps {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Upstream hits per clock second, of one gateway (`via`) or of all (`None`).
fn per_window(stamps: &[(u64, u8)], via: Option<u8>) -> BTreeMap<u64, u64> {
    let mut m = BTreeMap::new();
    for &(t, v) in stamps {
        if via.is_none_or(|want| want == v) {
            *m.entry(t / 1000).or_insert(0) += 1;
        }
    }
    m
}

/// Whole clock seconds inside `[from_ms, to_ms]`.
fn full_windows(from_ms: u64, to_ms: u64) -> Vec<u64> {
    (from_ms.div_ceil(1000)..)
        .take_while(|s| (s + 1) * 1000 <= to_ms)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Load

#[derive(Default, Debug)]
struct Load {
    admitted: u64,
    refused: u64,
    /// Answers other than 200 and a `rate_limited` 429: status and body.
    unexpected: Vec<String>,
    /// Transport errors (connect, write, read).
    errors: Vec<String>,
    slowest: Duration,
}

/// Sends `rate` requests per second as tenant `acme` with `x-via: via` over `conns`
/// keep-alive connections, from `start` for at most `secs` seconds or until `stop`.
fn offer(
    gw: &Gateway,
    via: &str,
    rate: u64,
    start: Instant,
    secs: f64,
    conns: usize,
    stop: &AtomicBool,
) -> Load {
    let out = Mutex::new(Load::default());
    let per_conn = (rate as f64 * secs) as u64 / conns as u64;
    let interval = Duration::from_secs_f64(conns as f64 / rate as f64);
    let req = Req::get("/api/x")
        .host("q.test")
        .header("x-tenant-id", "acme")
        .header("x-via", via);
    thread::scope(|s| {
        for c in 0..conns {
            let (out, req) = (&out, &req);
            s.spawn(move || {
                let offset = interval.mul_f64(c as f64 / conns as f64);
                let mut conn: Option<RawConn> = None;
                for i in 0..per_conn {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let due = start + offset + interval * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    let t0 = Instant::now();
                    let r = match conn.as_mut() {
                        Some(c) => c.request(req),
                        None => RawConn::connect(gw.addr()).and_then(|c| {
                            let c = conn.insert(c);
                            c.request(req)
                        }),
                    };
                    let took = t0.elapsed();
                    let mut o = out.lock().unwrap();
                    o.slowest = o.slowest.max(took);
                    match r {
                        Ok(r) if r.status == 200 => o.admitted += 1,
                        Ok(r) if r.status == 429 && r.text().contains("\"rate_limited\"") => {
                            o.refused += 1
                        }
                        Ok(r) => {
                            o.unexpected.push(format!("{} {}", r.status, r.text()));
                            if r.closes() {
                                conn = None;
                            }
                        }
                        Err(e) => {
                            o.errors.push(format!("request {i} on conn {c}: {e}"));
                            conn = None;
                        }
                    }
                }
            });
        }
    });
    out.into_inner().unwrap()
}

/// `offer` on both gateways at once (A then B in the result).
fn offer_both(gws: [&Gateway; 2], start: Instant, secs: f64, stop: &AtomicBool) -> [Load; 2] {
    thread::scope(|s| {
        let a = s.spawn(|| offer(gws[0], "a", RATE_EACH, start, secs, CONNS_EACH, stop));
        let b = s.spawn(|| offer(gws[1], "b", RATE_EACH, start, secs, CONNS_EACH, stop));
        [a.join().unwrap(), b.join().unwrap()]
    })
}

/// An `Instant` `lead` before the start of a whole unix second at least ~0.5 s away, and
/// that second.
fn next_second(lead: Duration) -> (Instant, u64) {
    let now = unix_ms();
    let sec = (now + 500 + lead.as_millis() as u64).div_ceil(1000);
    let at = Instant::now() + Duration::from_millis(sec * 1000 - lead.as_millis() as u64 - now);
    (at, sec)
}

/// Sleeps until unix ms `t`.
fn sleep_until_ms(t: u64) {
    let now = unix_ms();
    if t > now {
        thread::sleep(Duration::from_millis(t - now));
    }
}

fn assert_clean(phase: &str, loads: &[&Load]) {
    for (name, l) in ["A", "B"].iter().zip(loads) {
        assert!(
            l.errors.is_empty() && l.unexpected.is_empty(),
            "{phase}: gateway {name}: {} transport errors (first: {:?}), {} unexpected answers \
             (first: {:?})",
            l.errors.len(),
            l.errors.first(),
            l.unexpected.len(),
            l.unexpected.first()
        );
    }
}

fn store_up(gw: &Gateway) -> Option<f64> {
    gw.metric("tollgate_quota_store_up")
}

// ---------------------------------------------------------------------------------------------

#[test]
fn two_gateways_share_one_quota_through_redis_and_survive_its_death() {
    let started = Instant::now();
    let redis = Redis::start();
    let app = Stamps::start();
    let dir = tempfile::tempdir().unwrap();
    let quotas = dir.path().join("quotas.yaml");
    fs::write(
        &quotas,
        format!(
            r#"plans:
  fleet: {{ requests_per_second: {QUOTA}, requests_per_minute: 60000, cluster: true }}
default_plan: fleet
tenants:
  acme: {{ plan: fleet }}
cluster:
  redis: "{}"
  fleet_size: {FLEET}
  on_unavailable: local
  command_timeout: 50ms
  reconnect_interval: 1s
"#,
            redis.url()
        ),
    )
    .unwrap();
    let template = config(&format!(
        r#"include: {{ quotas: "{}" }}
upstreams:
  app: {{ backends: [ {{ address: "{}" }} ] }}
routes:
  - name: api
    upstream: app
    quota: {{ tenant: {{ header: x-tenant-id }}, group: api }}
"#,
        quotas.display(),
        app.addr()
    ));
    let a = Gateway::start(&template);
    let b = Gateway::start(&template);
    for (name, gw) in [("A", &a), ("B", &b)] {
        assert!(
            gw.wait_metric("tollgate_quota_store_up", 1.0, Duration::from_secs(5)),
            "gateway {name} never reached Redis: store_up {:?}",
            store_up(gw)
        );
    }
    let never = AtomicBool::new(false);

    // 1. One gateway alone takes the whole fleet budget: what sharing is measured against.
    let (at, first) = next_second(Duration::from_millis(300));
    let alone = offer(&a, "a", RATE_EACH, at, 3.5, CONNS_EACH, &never);
    let stamps = app.take();
    assert_clean("alone", &[&alone]);
    let windows = per_window(&stamps, None);
    let full: Vec<u64> = full_windows(first * 1000, first * 1000 + 3000);
    let alone_counts: Vec<u64> = full
        .iter()
        .map(|s| windows.get(s).copied().unwrap_or(0))
        .collect();
    eprintln!("alone (A only, {RATE_EACH}/s offered): per window {alone_counts:?}");
    for (s, n) in full.iter().zip(&alone_counts) {
        assert!(
            (QUOTA * 95 / 100..=QUOTA).contains(n),
            "A alone admitted {n} in second {s}; expected the whole quota {QUOTA} (-5 %)"
        );
    }
    assert_eq!(
        alone.admitted,
        stamps.len() as u64,
        "admitted vs upstream hits"
    );

    // 2. Both at once, 3× the quota together, for 6 s: the sum is the quota, not twice it.
    let (at, first) = next_second(Duration::from_millis(300));
    let loads = offer_both([&a, &b], at, 6.3, &never);
    let stamps = app.take();
    assert_clean("shared", &[&loads[0], &loads[1]]);
    let (all, by_a, by_b) = (
        per_window(&stamps, None),
        per_window(&stamps, Some(b'a')),
        per_window(&stamps, Some(b'b')),
    );
    let full = full_windows(first * 1000, first * 1000 + 6000);
    let row = |s: &u64| {
        (
            all.get(s).copied().unwrap_or(0),
            by_a.get(s).copied().unwrap_or(0),
            by_b.get(s).copied().unwrap_or(0),
        )
    };
    let shared: Vec<(u64, u64, u64)> = full.iter().map(row).collect();
    eprintln!("shared (sum, A, B) per window: {shared:?}");
    assert!(full.len() >= 5, "only {} full windows", full.len());
    for (s, &(sum, on_a, on_b)) in full.iter().zip(&shared) {
        assert!(
            (QUOTA * 95 / 100..=QUOTA * 105 / 100).contains(&sum),
            "second {s}: the fleet admitted {sum} (A {on_a}, B {on_b}); quota {QUOTA} ±5 %"
        );
        // Each did share: neither took (nearly) the whole budget that it took alone.
        assert!(
            on_a > 0 && on_b > 0 && on_a.max(on_b) < QUOTA * 80 / 100,
            "second {s}: A {on_a}, B {on_b}: the budget was not shared"
        );
    }
    assert_eq!(
        loads[0].admitted + loads[1].admitted,
        stamps.len() as u64,
        "admitted vs upstream hits"
    );
    // Redis's own count of what it handed out: never above the quota, at least what was admitted.
    for &s in full.iter().rev().take(3) {
        if (s + 1) * 1000 + 4000 < unix_ms() {
            break; // expired (5 s after the window)
        }
        let key = format!("tollgate:quota:acme:api:1:{s}");
        if let Ok(v) = redis.cmd(&["GET", &key]) {
            if v == "(nil)" {
                continue;
            }
            let handed: u64 = v.parse().unwrap();
            eprintln!("redis {key} = {handed} (admitted {})", row(&s).0);
            assert!(
                handed <= QUOTA && handed >= row(&s).0,
                "second {s}: Redis handed out {handed}, the fleet admitted {}",
                row(&s).0
            );
        }
    }

    // 3. Redis dies under the same load, and comes back on the same port.
    let stop = AtomicBool::new(false);
    let (at, first) = next_second(Duration::from_millis(300));
    let mut marks = BTreeMap::new();
    let loads = thread::scope(|s| {
        let load = s.spawn(|| offer_both([&a, &b], at, 25.0, &stop));
        // Two normal seconds, then kill early in a window, while the gateways are still
        // leasing its budget (refills in flight), not after it ran out.
        sleep_until_ms(first * 1000 + 2150);
        let mut run = || -> Result<(), String> {
            let killed = unix_ms();
            redis.kill();
            marks.insert("killed", killed);
            for (name, gw) in [("A", &a), ("B", &b)] {
                if !gw.wait_metric("tollgate_quota_store_up", 0.0, Duration::from_secs(3)) {
                    return Err(format!(
                        "gateway {name}: store_up {:?} 3 s after Redis died",
                        store_up(gw)
                    ));
                }
            }
            marks.insert("down", unix_ms());
            // Three whole seconds of outage at least.
            sleep_until_ms((unix_ms() / 1000 + 4) * 1000 + 300);
            marks.insert("restart", unix_ms());
            redis.restart();
            for (name, gw) in [("A", &a), ("B", &b)] {
                if !gw.wait_metric("tollgate_quota_store_up", 1.0, Duration::from_secs(5)) {
                    return Err(format!(
                        "gateway {name}: store_up {:?} 5 s after Redis came back",
                        store_up(gw)
                    ));
                }
            }
            let up = unix_ms();
            marks.insert("up", up);
            // Three whole seconds after recovery.
            sleep_until_ms((up / 1000 + 4) * 1000 + 100);
            Ok(())
        };
        let res = run();
        stop.store(true, Ordering::Relaxed);
        marks.insert("end", unix_ms());
        (load.join().unwrap(), res)
    });
    let (loads, res) = loads;
    let stamps = app.take();
    eprintln!(
        "outage timeline (ms after second {first}): {:?}",
        marks
            .iter()
            .map(|(k, v)| (*k, v.saturating_sub(first * 1000)))
            .collect::<Vec<_>>()
    );
    res.unwrap_or_else(|e| {
        panic!(
            "{e}\nA stderr:\n{}\nB stderr:\n{}",
            tail(&a.stderr_text(), 2000),
            tail(&b.stderr_text(), 2000)
        )
    });
    eprintln!(
        "outage phase: A {} admitted / {} refused (slowest {:?}), B {} / {} (slowest {:?})",
        loads[0].admitted,
        loads[0].refused,
        loads[0].slowest,
        loads[1].admitted,
        loads[1].refused,
        loads[1].slowest
    );
    // No 5xx, no transport error, no other answer than 200 and 429 rate_limited: throughout.
    assert_clean("outage", &[&loads[0], &loads[1]]);
    assert_eq!(
        loads[0].admitted + loads[1].admitted,
        stamps.len() as u64,
        "admitted vs upstream hits"
    );
    let (all, by_a, by_b) = (
        per_window(&stamps, None),
        per_window(&stamps, Some(b'a')),
        per_window(&stamps, Some(b'b')),
    );
    let row = |s: &u64| {
        (
            all.get(s).copied().unwrap_or(0),
            by_a.get(s).copied().unwrap_or(0),
            by_b.get(s).copied().unwrap_or(0),
        )
    };
    let phase = |from: u64, to: u64| -> Vec<(u64, (u64, u64, u64))> {
        full_windows(from, to)
            .iter()
            .map(|s| (*s, row(s)))
            .collect()
    };
    let before = phase(first * 1000, marks["killed"]);
    let during = phase(marks["down"], marks["restart"]);
    let after = phase(marks["up"], marks["end"]);
    let everything = phase(first * 1000, marks["end"]);
    eprintln!("every window (second, (sum, A, B)): {everything:?}");
    eprintln!("before kill: {before:?}\nredis down: {during:?}\nrecovered: {after:?}");
    // The window Redis died in and the one it came back in are only held to the ceiling: in the
    // latter each gateway reports what its fallback admitted with its first lease, so Redis
    // does not hand out the whole budget again (before that fix: 154-155 of 100 here).
    let judged: Vec<u64> = before
        .iter()
        .chain(&during)
        .chain(&after)
        .map(|w| w.0)
        .collect();
    let transitional: Vec<_> = everything
        .iter()
        .filter(|w| !judged.contains(&w.0))
        .collect();
    eprintln!("transitional (kill, detection, recovery): {transitional:?}");
    for (s, (sum, on_a, on_b)) in &transitional {
        assert!(
            *sum <= QUOTA * 105 / 100,
            "second {s} (Redis going or coming back): the fleet admitted {sum} \
             (A {on_a}, B {on_b}); quota {QUOTA}"
        );
    }
    assert!(
        before.len() >= 2 && during.len() >= 3 && after.len() >= 3,
        "too few full windows: {} before, {} down, {} after",
        before.len(),
        during.len(),
        after.len()
    );
    for (s, (sum, on_a, on_b)) in before.iter().chain(&after) {
        assert!(
            (QUOTA * 95 / 100..=QUOTA * 105 / 100).contains(sum),
            "second {s} (Redis up): the fleet admitted {sum} (A {on_a}, B {on_b}); \
             quota {QUOTA} ±5 %"
        );
    }
    let share = QUOTA.div_ceil(FLEET);
    for (s, (sum, on_a, on_b)) in &during {
        assert!(
            (QUOTA * 85 / 100..=QUOTA * 115 / 100).contains(sum),
            "second {s} (Redis down): the fleet admitted {sum} (A {on_a}, B {on_b}); \
             fallback `local` gives {share} each, {QUOTA} ±15 % together"
        );
        for (name, n) in [("A", on_a), ("B", on_b)] {
            assert!(
                (share * 80 / 100..=share * 110 / 100).contains(n),
                "second {s} (Redis down): gateway {name} admitted {n}; expected about \
                 {share} (limit / fleet_size)"
            );
        }
    }
    // One warning per outage and one recovery line, per gateway.
    for (name, gw) in [("A", &a), ("B", &b)] {
        let err = gw.stderr_text();
        let down = err.matches("cluster quota store unreachable").count();
        let back = err.matches("cluster quota store reachable again").count();
        assert!(
            down == 1 && back == 1,
            "gateway {name}: {down} outage warnings, {back} recovery lines; stderr:\n{}",
            tail(&err, 3000)
        );
    }
    eprintln!("total runtime {:?}", started.elapsed());
    drop(redis);
}

/// Signs a GET with the independent X-Ca-* signer (tests/fixtures/ca_sign.py).
fn ca_sign(target: &str, key: &str, secret: &str) -> Vec<(String, String)> {
    let out = std::process::Command::new("/usr/bin/python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/ca_sign.py"
        ))
        .args([
            "--method", "GET", "--target", target, "--key", key, "--secret", secret,
        ])
        .output()
        .expect("run tests/fixtures/ca_sign.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn an_hmac_nonce_used_on_one_gateway_is_refused_on_the_other() {
    let redis = Redis::start();
    let app = common::HttpBackend::start("app");
    let dir = tempfile::tempdir().unwrap();
    let quotas = dir.path().join("quotas.yaml");
    fs::write(
        &quotas,
        format!("cluster: {{ redis: \"{}\", fleet_size: 2 }}\n", redis.url()),
    )
    .unwrap();
    let consumers = dir.path().join("consumers.yaml");
    fs::write(
        &consumers,
        "consumers:\n  acme-app: { tenant: acme, hmac: [ { access_key: ak1, secret: \"s3cret-0123456789abcdef\" } ] }\n",
    )
    .unwrap();
    let template = config(&format!(
        r#"include: {{ quotas: "{}", consumers: "{}" }}
upstreams:
  app: {{ backends: [ {{ address: "{}" }} ] }}
routes:
  - {{ name: api, upstream: app, auth: [hmac] }}
"#,
        quotas.display(),
        consumers.display(),
        app.addr()
    ));
    let a = Gateway::start(&template);
    let b = Gateway::start(&template);
    for gw in [&a, &b] {
        assert!(gw.wait_metric("tollgate_quota_store_up", 1.0, Duration::from_secs(5)));
    }
    let send = |gw: &Gateway, signed: &[(String, String)]| {
        let mut req = Req::get("/orders?page=1").host("api.test");
        for (k, v) in signed {
            req = req.header(k, v);
        }
        gw.send(&req)
    };
    let signed = ca_sign("/orders?page=1", "ak1", "s3cret-0123456789abcdef");
    assert_eq!(send(&a, &signed).status, 200, "first use on A");
    let hits = app.hits();
    let r = send(&b, &signed);
    assert_eq!(r.status, 401, "replayed to B: {}", r.text());
    assert_eq!(r.json()["error"], "nonce_replayed");
    assert!(r.header("www-authenticate").is_some());
    assert_eq!(app.hits(), hits, "the replay reached the upstream");
    let fresh = ca_sign("/orders?page=1", "ak1", "s3cret-0123456789abcdef");
    assert_eq!(send(&b, &fresh).status, 200, "a fresh nonce on B");
}
