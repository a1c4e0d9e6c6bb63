//! WebSocket tunnels through the gateway: survival across many reloads, idle timeouts.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use common::{config, ws_connect, ws_next_data, ws_roundtrip, Gateway, HttpBackend, WsEchoServer};

const CONNS: usize = 200;
const RELOADS: usize = 50;
const PACE: Duration = Duration::from_millis(100);

fn msg_for(conn: usize, seq: u64) -> Message {
    if seq.is_multiple_of(2) {
        Message::text(format!("conn-{conn} msg-{seq}"))
    } else {
        let mut v = format!("bin-{conn}-{seq}-").into_bytes();
        v.extend((0..64u8).map(|i| i.wrapping_mul(seq as u8)));
        Message::binary(v)
    }
}

/// Config number `i` of the reload sequence. The WebSocket route `ws` is present, edited,
/// renamed or removed depending on `i`; other routes come and go.
fn reload_config(i: usize, ws: &str, http: &str) -> String {
    let mut routes = String::new();
    match i % 4 {
        // Removed: /ws has no route at all; every other time its upstream is gone too.
        0 if i.is_multiple_of(8) => {}
        0 => routes.push_str(
            "  - name: other-ws\n    match: { path_prefix: /other }\n    upstream: ws\n",
        ),
        // Present, edited: header op and idle timeout change.
        1 => routes.push_str(&format!(
            "  - name: ws\n    match: {{ path_prefix: /ws }}\n    upstream: ws\n    request_headers: {{ set: {{ x-gen: \"{i}\" }} }}\n    websocket: {{ idle_timeout: {}m }}\n",
            30 + i
        )),
        // Renamed and matched by regex instead.
        2 => routes.push_str(&format!(
            "  - name: ws-renamed-{i}\n    match: {{ path_regex: '^/ws(/.*)?$' }}\n    upstream: ws\n    websocket: {{ idle_timeout: 2h }}\n"
        )),
        // Present, host-restricted (the open tunnels' Host still matches).
        _ => routes.push_str(
            "  - name: ws\n    match: { hosts: [ws.test], path_prefix: /ws }\n    upstream: ws\n",
        ),
    }
    for k in 0..(i % 5) {
        routes.push_str(&format!(
            "  - name: extra-{i}-{k}\n    match: {{ path: /extra/{k} }}\n    respond: {{ body: \"extra {i} {k}\" }}\n"
        ));
    }
    routes.push_str(&format!(
        "  - name: http\n    match: {{ path_prefix: /http }}\n    upstream: app\n    response_headers: {{ set: {{ x-gen: \"{i}\" }} }}\n"
    ));
    let ws_upstream = if i.is_multiple_of(8) {
        String::new()
    } else {
        format!("  ws: {{ backends: [ {{ address: \"{ws}\" }} ] }}\n")
    };
    config(&format!(
        "upstreams:\n{ws_upstream}  app: {{ backends: [ {{ address: \"{http}\" }} ] }}\nroutes:\n{routes}"
    ))
}

struct ConnResult {
    echoed: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_survive_50_reloads_including_route_removal() {
    let echo = WsEchoServer::start();
    let app = HttpBackend::start("app");
    let gw = Arc::new(Gateway::start(&reload_config(1, &echo.addr(), &app.addr())));
    let port = gw.port;

    // Open 200 tunnels (25 handshakes at a time).
    let sem = Arc::new(Semaphore::new(25));
    let mut opens = Vec::new();
    for c in 0..CONNS {
        let sem = sem.clone();
        opens.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            ws_connect(port, "ws.test", &format!("/ws/{c}"))
                .await
                .map(|(ws, _)| ws)
        }));
    }
    let mut clients = Vec::new();
    for (c, h) in opens.into_iter().enumerate() {
        clients.push(
            h.await
                .unwrap()
                .unwrap_or_else(|e| panic!("ws connect {c}: {e}")),
        );
    }
    let g = gw.clone();
    let active_ok = tokio::task::spawn_blocking(move || {
        g.wait_metric(
            "tollgate_websocket_tunnels_active",
            CONNS as f64,
            Duration::from_secs(10),
        )
    })
    .await
    .unwrap();
    let g = gw.clone();
    let seen = tokio::task::spawn_blocking(move || g.metric("tollgate_websocket_tunnels_active"))
        .await
        .unwrap();
    assert!(
        active_ok,
        "tollgate_websocket_tunnels_active should be {CONNS}, is {seen:?}"
    );

    // Each connection: numbered messages, each echo checked in order, until told to stop.
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counters: Arc<Vec<AtomicU64>> = Arc::new((0..CONNS).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::new();
    for (c, mut ws) in clients.into_iter().enumerate() {
        let counters = counters.clone();
        let stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            // Spread the connections over the pace interval.
            tokio::time::sleep(PACE * (c as u32) / (CONNS as u32)).await;
            let deadline = Instant::now() + Duration::from_secs(150);
            let mut seq = 0u64;
            while !stopped.load(Ordering::SeqCst) && Instant::now() < deadline && seq < 100_000 {
                let m = msg_for(c, seq);
                match ws_roundtrip(&mut ws, m.clone(), Duration::from_secs(10)).await {
                    Ok(got) if got == m => {}
                    Ok(got) => {
                        return Err(format!(
                            "conn {c} msg {seq}: echo out of order or altered: {got:?}"
                        ))
                    }
                    Err(e) => return Err(format!("conn {c} msg {seq}: {e}")),
                }
                seq += 1;
                counters[c].store(seq, Ordering::SeqCst);
                tokio::time::sleep(PACE).await;
            }
            // Clean close: our close frame is answered by the echo server, through the tunnel.
            ws.close(None)
                .await
                .map_err(|e| format!("conn {c}: close: {e}"))?;
            let mut got_close = false;
            for _ in 0..10 {
                match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                    Ok(Some(Ok(Message::Close(_)))) => got_close = true,
                    Ok(Some(Ok(_))) => continue,
                    Ok(None) | Ok(Some(Err(_))) => break,
                    Err(_) => return Err(format!("conn {c}: no close reply")),
                }
            }
            if !got_close {
                return Err(format!("conn {c}: close not answered"));
            }
            Ok(ConnResult { echoed: seq })
        }));
    }

    // Wait until every connection has had a few echoes, then reload 50 times.
    let ok = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if counters.iter().all(|c| c.load(Ordering::SeqCst) >= 2) {
                break true;
            }
            if Instant::now() > deadline || tasks.iter().any(|t| t.is_finished()) {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(
        ok || tasks.iter().any(|t| t.is_finished()),
        "connections did not get going"
    );
    let before: Vec<u64> = counters.iter().map(|c| c.load(Ordering::SeqCst)).collect();

    let g = gw.clone();
    let (ws_addr, app_addr) = (echo.addr(), app.addr());
    let rt = tokio::runtime::Handle::current();
    let reload_result = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut gen = g.generation();
        for i in 0..RELOADS {
            let n = i + 2; // config 1 is the starting one
            g.write_config(&reload_config(n, &ws_addr, &app_addr));
            let seen = g.wait_generation(gen + 1, Duration::from_secs(10));
            gen = seen;
            // The new config is in effect: the HTTP route carries this config's number.
            let r = g.get("ws.test", "/http/x");
            if r.status != 200 || r.header("x-gen") != Some(&n.to_string()) {
                return Err(format!(
                    "reload {i}: /http answered {} x-gen {:?}",
                    r.status,
                    r.header("x-gen")
                ));
            }
            // While /ws has no route, a new upgrade to it is refused: the removal is real.
            if n.is_multiple_of(4) && i < 12 {
                match rt.block_on(ws_connect(port, "ws.test", "/ws/new")) {
                    Err(tokio_tungstenite::tungstenite::Error::Http(resp))
                        if resp.status() == 404 => {}
                    Err(e) => {
                        return Err(format!("reload {i}: upgrade on /ws without a route: {e}"))
                    }
                    Ok(_) => {
                        return Err(format!(
                            "reload {i}: upgrade on /ws succeeded without a route"
                        ))
                    }
                }
            }
        }
        Ok(())
    })
    .await
    .unwrap();
    let during: Vec<u64> = counters.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    let g = gw.clone();
    let active_after =
        tokio::task::spawn_blocking(move || g.metric("tollgate_websocket_tunnels_active"))
            .await
            .unwrap();

    // Back to a config with the route, let traffic go on a little, then stop.
    let g = gw.clone();
    let (ws_addr, app_addr) = (echo.addr(), app.addr());
    tokio::task::spawn_blocking(move || {
        let gen = g.generation();
        g.write_config(&reload_config(1, &ws_addr, &app_addr));
        g.wait_generation(gen + 1, Duration::from_secs(10));
    })
    .await
    .unwrap();
    // A new tunnel works after all that.
    let (mut fresh, _) = ws_connect(port, "ws.test", "/ws/fresh")
        .await
        .expect("new tunnel after reloads");
    let m = Message::text("fresh");
    assert_eq!(
        ws_roundtrip(&mut fresh, m.clone(), Duration::from_secs(5)).await,
        Ok(m)
    );
    drop(fresh);
    tokio::time::sleep(PACE * 5).await;
    stopped.store(true, Ordering::SeqCst);

    let mut failures = Vec::new();
    let mut results = Vec::new();
    for (c, t) in tasks.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(30), t).await {
            Ok(Ok(Ok(r))) => results.push((c, r)),
            Ok(Ok(Err(e))) => failures.push(e),
            Ok(Err(e)) => failures.push(format!("conn {c}: task panicked: {e}")),
            Err(_) => failures.push(format!("conn {c}: did not finish")),
        }
    }
    reload_result.expect("reload sequence");
    assert!(
        failures.is_empty(),
        "{} of {CONNS} connections failed; first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        active_after,
        Some(CONNS as f64),
        "tunnels_active after the reloads"
    );
    for (c, r) in &results {
        assert!(
            during[*c] > before[*c],
            "conn {c} sent nothing during the reloads"
        );
        assert!(
            r.echoed > during[*c],
            "conn {c} sent nothing after the reloads"
        );
    }
    let total: u64 = results.iter().map(|(_, r)| r.echoed).sum();
    eprintln!("{CONNS} tunnels, {total} messages echoed in order across {RELOADS} reloads");

    let g = gw.clone();
    let drained = tokio::task::spawn_blocking(move || {
        g.wait_metric(
            "tollgate_websocket_tunnels_active",
            0.0,
            Duration::from_secs(10),
        )
    })
    .await
    .unwrap();
    assert!(
        drained,
        "tollgate_websocket_tunnels_active did not return to 0"
    );
    assert!(gw.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_idle_tunnel_and_long_timeout_keeps_it() {
    let echo = WsEchoServer::start();
    let gw = Gateway::start(&config(
        &r#"
upstreams:
  ws: { backends: [ { address: "$WS" } ] }
routes:
  - name: short
    match: { path_prefix: /short }
    upstream: ws
    websocket: { idle_timeout: 1s }
  - name: long
    match: { path_prefix: /long }
    upstream: ws
    websocket: { idle_timeout: 1h }
"#
        .replace("$WS", &echo.addr()),
    ));
    let (mut short, _) = ws_connect(gw.port, "a.test", "/short")
        .await
        .expect("connect /short");
    let (mut long, _) = ws_connect(gw.port, "a.test", "/long")
        .await
        .expect("connect /long");

    let short_task = async {
        let m = Message::text("hi");
        assert_eq!(
            ws_roundtrip(&mut short, m.clone(), Duration::from_secs(5)).await,
            Ok(m)
        );
        let idle_from = Instant::now();
        // Nothing is sent now; the tunnel must be closed by the gateway after ~1 s.
        let r = ws_next_data(&mut short, Duration::from_secs(5)).await;
        let after = idle_from.elapsed();
        assert!(r.is_err(), "idle tunnel delivered a message: {r:?}");
        let err = r.unwrap_err();
        assert!(
            !err.starts_with("no message within"),
            "idle tunnel still open after 5 s (1 s idle_timeout)"
        );
        assert!(
            after >= Duration::from_millis(800) && after <= Duration::from_millis(3000),
            "closed after {after:?}, expected ~1 s ({err})"
        );
    };
    let long_task = async {
        let m = Message::text("before");
        assert_eq!(
            ws_roundtrip(&mut long, m.clone(), Duration::from_secs(5)).await,
            Ok(m)
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let m = Message::binary(vec![1u8, 2, 3]);
        assert_eq!(
            ws_roundtrip(&mut long, m.clone(), Duration::from_secs(5)).await,
            Ok(m),
            "tunnel with 1h idle_timeout did not survive a 3 s pause"
        );
    };
    tokio::join!(short_task, long_task);
    long.close(None).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_of_every_size_pass_untouched_and_pipelined() {
    let echo = WsEchoServer::start();
    let gw = Gateway::start(&config(
        &r#"
upstreams:
  ws: { backends: [ { address: "$WS" } ] }
routes:
  - name: ws
    upstream: ws
"#
        .replace("$WS", &echo.addr()),
    ));
    let (mut ws, resp) = ws_connect(gw.port, "a.test", "/frames")
        .await
        .expect("connect");
    assert_eq!(resp.status(), 101);
    // Payload lengths around the 7-bit / 16-bit / 64-bit length encodings and the relay buffers.
    for len in [
        0usize,
        1,
        125,
        126,
        127,
        2047,
        2048,
        2049,
        65535,
        65536,
        70_000,
        1 << 20,
    ] {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let m = Message::binary(data);
        assert_eq!(
            ws_roundtrip(&mut ws, m.clone(), Duration::from_secs(10)).await,
            Ok(m),
            "binary of {len} bytes"
        );
    }
    let text = Message::text("héllo wörld ✓ ".repeat(5000));
    assert_eq!(
        ws_roundtrip(&mut ws, text.clone(), Duration::from_secs(10)).await,
        Ok(text)
    );
    // Ping through the tunnel is answered by the upstream with the same payload.
    ws.send(Message::Ping(b"are-you-there".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Pong(p))) => return Some(p),
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("pong within 5 s");
    assert_eq!(pong.as_deref(), Some(&b"are-you-there"[..]));
    // 300 messages sent back to back, echoed in order.
    for i in 0..300u32 {
        ws.feed(Message::text(format!("p{i}"))).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..300u32 {
        let got = ws_next_data(&mut ws, Duration::from_secs(10)).await;
        assert_eq!(
            got,
            Ok(Message::text(format!("p{i}"))),
            "pipelined message {i}"
        );
    }
    ws.close(None).await.unwrap();
    // The close handshake completes through the tunnel.
    let mut closed = false;
    for _ in 0..10 {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Close(_)))) => closed = true,
            Ok(Some(Ok(_))) => continue,
            _ => break,
        }
    }
    assert!(closed, "close frame not answered through the tunnel");
    drop(ws); // both sides closed: the tunnel is over and gets its access log record
    let gw = Arc::new(gw);
    let g = gw.clone();
    let rec = tokio::task::spawn_blocking(move || {
        let mut rec = None;
        common::wait_until(Duration::from_secs(5), || {
            rec = g
                .access_log_lines()
                .into_iter()
                .find(|r| r["websocket"] == true);
            rec.is_some()
        });
        rec
    })
    .await
    .unwrap()
    .unwrap_or_else(|| {
        panic!(
            "no access log record with websocket: true; log:\n{}",
            std::fs::read_to_string(gw.dir.path().join("access.log")).unwrap_or_default()
        )
    });
    assert_eq!(rec["route"], "ws", "{rec}");
    assert_eq!(rec["backend"].as_str(), Some(echo.addr().as_str()), "{rec}");
    assert_eq!(rec["path"].as_str(), Some("/frames"), "{rec}");
}
