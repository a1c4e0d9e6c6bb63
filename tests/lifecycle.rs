//! Process lifecycle, black-box: `tollgate upgrade` (socket handoff) under HTTP and WebSocket
//! load, the old process's drain (Connection: close, paced 1001 tunnel close at the deadline,
//! exit as soon as the last connection ends), SIGTERM / SIGINT, a refused config, two upgrades
//! in a row, and SIGUSR2.
//!
//! Which process holds an accepted connection is read from Linux procfs: the gateway-side
//! socket of a client connection is found in `/proc/net/tcp` (local port = listener port,
//! remote port = the client's port), and its inode in `/proc/PID/fd`. The old and new process
//! share the admin listener for ~5 s after a handoff (Pingora keeps accepting), so `/status`
//! is only trusted to name one process once the old one has logged that it drains.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::task::block_in_place;
use tokio_tungstenite::tungstenite::Message;

use common::{
    dead_addr, line_of, run_upgrade, tail, wait_until, ws_connect, ws_roundtrip, Gateway,
    HttpBackend, RawConn, Req, Upgrade, WsClient, WsEchoServer,
};

// ---------------------------------------------------------------------------------------------
// Config

/// The config head for these tests (own ports, dir, pid file and upgrade socket per test).
fn head() -> String {
    r#"listeners: [ { name: web, address: "127.0.0.1:$PORT" } ]
admin: { address: "127.0.0.1:$APORT" }
server: { threads: 2, pid_file: "$DIR/tollgate.pid", upgrade_sock: "$DIR/upgrade.sock" }
access_log: { path: "$DIR/access.log" }
"#
    .to_string()
}

/// A proxied HTTP route `/app` to `app` and a WebSocket route `/ws` to `ws`, with `drain`.
fn conf(app: &str, ws: &str, drain: &str) -> String {
    format!(
        r#"{}drain: {drain}
upstreams:
  app: {{ backends: [ {{ address: "{app}" }} ] }}
  ws: {{ backends: [ {{ address: "{ws}" }} ] }}
routes:
  - name: ws
    match: {{ path_prefix: /ws }}
    upstream: ws
  - name: app
    match: {{ path_prefix: /app }}
    upstream: app
  - name: sleep
    match: {{ path_prefix: /sleep/ }}
    upstream: app
"#,
        head()
    )
}

const DRAIN_LOG: &str = "draining: no new connections";

// ---------------------------------------------------------------------------------------------
// Processes

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// Running (not a zombie): `/proc/PID/stat` exists and its state is not Z/X.
fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

fn is_tollgate(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("tollgate"))
        .unwrap_or(false)
}

/// Waits (bounded) for `pid` to be gone; returns when it was first seen gone.
fn wait_exit(pid: u32, timeout: Duration) -> Option<Instant> {
    let ok = wait_until(timeout, || !pid_alive(pid));
    ok.then(Instant::now)
}

/// Kills (SIGKILL) the tollgate processes this test started indirectly (the upgraded ones are
/// not our children), however the test ends.
#[derive(Default)]
struct Reaper(Mutex<Vec<u32>>);

impl Reaper {
    fn add(&self, pid: u32) {
        self.0.lock().unwrap().push(pid);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in self.0.lock().unwrap().iter().copied() {
            if pid_alive(pid) && is_tollgate(pid) {
                // SAFETY: as in `signal`.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

fn pid_file(gw: &Gateway) -> Option<u32> {
    fs::read_to_string(gw.dir.path().join("tollgate.pid"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
}

fn status_pid(gw: &Gateway) -> Option<u32> {
    let r = common::http_get(gw.admin_addr(), "127.0.0.1", "/status").ok()?;
    (r.status == 200).then(|| r.json()["pid"].as_u64().map(|p| p as u32))?
}

fn wait_log(path: &Path, needle: &str, timeout: Duration) -> Option<Instant> {
    wait_until(timeout, || {
        fs::read_to_string(path)
            .map(|t| t.contains(needle))
            .unwrap_or(false)
    })
    .then(Instant::now)
}

/// Waits (bounded) for the drain log line in `path` and returns when the process logged it
/// (its own timestamp, mapped onto this process's `Instant` clock), so that a late look at the
/// log does not shift the measured drain start.
fn wait_drain_start(path: &Path, timeout: Duration) -> Option<Instant> {
    wait_log(path, DRAIN_LOG, timeout)?;
    let text = fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.contains(DRAIN_LOG))?;
    let logged = humantime::parse_rfc3339_weak(line.split_whitespace().next()?).ok()?;
    let ago = SystemTime::now().duration_since(logged).unwrap_or_default();
    Instant::now().checked_sub(ago)
}

fn stderr_path(gw: &Gateway) -> PathBuf {
    gw.dir.path().join("stderr.log")
}

/// Runs an upgrade that must succeed; registers the new process with `reaper`.
fn upgrade_ok(gw: &Gateway, tag: &str, old: u32, reaper: &Reaper) -> (u32, Upgrade) {
    let u = run_upgrade(gw, tag);
    if let Some(p) = u.new_pid {
        reaper.add(p);
    }
    assert_eq!(
        u.code,
        Some(0),
        "upgrade {tag} failed (took {:?}); stdout:\n{}\nstderr:\n{}\nnew process log:\n{}",
        u.took,
        u.stdout,
        u.stderr,
        tail(&fs::read_to_string(&u.log).unwrap_or_default(), 3000)
    );
    assert!(
        u.stdout.contains("upgraded: pid"),
        "upgrade {tag} stdout: {}",
        u.stdout
    );
    assert_eq!(u.old_pid, Some(old), "upgrade {tag} names the old pid");
    let new = u.new_pid.expect("new pid in the upgrade output");
    assert_ne!(new, old);
    (new, u)
}

// ---------------------------------------------------------------------------------------------
// Which process holds a connection (procfs)

fn port_of(hex_addr: &str) -> Option<u16> {
    u16::from_str_radix(hex_addr.rsplit_once(':')?.1, 16).ok()
}

/// For each client port, the pid among `pids` that holds the gateway side of its established
/// connection to `server_port` (None: not found).
fn conn_owners(server_port: u16, client_ports: &[u16], pids: &[u32]) -> Vec<Option<u32>> {
    let tcp = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let mut inode_of: HashMap<u16, u64> = HashMap::new();
    for line in tcp.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "01" {
            continue;
        }
        if port_of(f[1]) == Some(server_port) {
            if let (Some(rp), Ok(ino)) = (port_of(f[2]), f[9].parse::<u64>()) {
                inode_of.insert(rp, ino);
            }
        }
    }
    let mut owner_of: HashMap<u64, u32> = HashMap::new();
    for &pid in pids {
        let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in rd.flatten().take(100_000) {
            if let Ok(link) = fs::read_link(e.path()) {
                let l = link.to_string_lossy();
                if let Some(ino) = l
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    owner_of.insert(ino, pid);
                }
            }
        }
    }
    client_ports
        .iter()
        .map(|p| inode_of.get(p).and_then(|i| owner_of.get(i)).copied())
        .collect()
}

fn local_port(ws: &WsClient) -> u16 {
    match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(s) => s.local_addr().unwrap().port(),
        _ => panic!("plain TCP expected"),
    }
}

fn owner_summary(owners: &[Option<u32>]) -> String {
    let mut m: HashMap<Option<u32>, usize> = HashMap::new();
    for o in owners {
        *m.entry(*o).or_default() += 1;
    }
    format!("{m:?}")
}

// ---------------------------------------------------------------------------------------------
// HTTP load

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// Raw HTTP/1.1 keep-alive connection; reconnects after `Connection: close`.
    KeepAlive,
    /// A new connection per request (`Connection: close`).
    NewConn,
    /// reqwest with its keep-alive pool.
    Pooled,
}

#[derive(Debug, Default)]
struct ThreadReport {
    ok: u64,
    errors: u64,
    bad_status: u64,
    first_errors: Vec<String>,
    /// Responses that carried `Connection: close` (keep-alive clients).
    conn_close: u64,
    done_at: Vec<Instant>,
}

struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<(Kind, thread::JoinHandle<ThreadReport>)>,
}

impl Load {
    fn start(port: u16, kinds: &[Kind]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = kinds
            .iter()
            .enumerate()
            .map(|(i, &k)| {
                let stop = stop.clone();
                (k, thread::spawn(move || load_thread(port, k, i, stop)))
            })
            .collect();
        Load { stop, threads }
    }
    fn finish(self) -> Vec<(Kind, ThreadReport)> {
        self.stop.store(true, Ordering::SeqCst);
        self.threads
            .into_iter()
            .map(|(k, h)| (k, h.join().expect("load thread panicked")))
            .collect()
    }
}

fn load_thread(port: u16, kind: Kind, id: usize, stop: Arc<AtomicBool>) -> ThreadReport {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut rep = ThreadReport::default();
    let mut conn: Option<RawConn> = None;
    let client = common::http_client();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && n < 50_000 {
        n += 1;
        let path = format!("/app/{kind:?}/{id}/{n}");
        let result: Result<(u16, String, bool), String> = match kind {
            Kind::KeepAlive => {
                if conn.is_none() {
                    conn = RawConn::connect(addr).map(Some).unwrap_or_else(|e| {
                        rep.first_errors.push(format!("connect: {e}"));
                        None
                    });
                }
                match conn.as_mut() {
                    None => Err("connect failed".into()),
                    Some(c) => {
                        let nth = c.requests + 1;
                        match c.request(&Req::get(&path).host("app.test")) {
                            Ok(r) => Ok((r.status, r.text(), r.closes())),
                            Err(e) => {
                                conn = None;
                                Err(format!("request #{nth} on a kept-alive connection: {e}"))
                            }
                        }
                    }
                }
            }
            Kind::NewConn => RawConn::connect(addr)
                .and_then(|mut c| {
                    c.request(
                        &Req::get(&path)
                            .host("app.test")
                            .header("Connection", "close"),
                    )
                })
                .map(|r| (r.status, r.text(), r.closes()))
                .map_err(|e| format!("new connection: {e}")),
            Kind::Pooled => client
                .get(format!("http://127.0.0.1:{port}{path}"))
                .send()
                .and_then(|r| {
                    let s = r.status().as_u16();
                    r.text().map(|t| (s, t, false))
                })
                .map_err(|e| format!("reqwest: {e:?}")),
        };
        match result {
            Ok((status, body, closes)) => {
                if status == 200 && body.contains("\"backend\":\"app\"") {
                    rep.ok += 1;
                    rep.done_at.push(Instant::now());
                } else {
                    rep.bad_status += 1;
                    if rep.first_errors.len() < 10 {
                        rep.first_errors
                            .push(format!("{path}: status {status}: {}", tail(&body, 200)));
                    }
                }
                if closes {
                    rep.conn_close += 1;
                    conn = None;
                }
            }
            Err(e) => {
                rep.errors += 1;
                if rep.first_errors.len() < 10 {
                    rep.first_errors.push(format!("{path}: {e}"));
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
    rep
}

// ---------------------------------------------------------------------------------------------
// WebSocket clients

#[derive(Debug, Default)]
struct Session {
    echoed: u64,
    error: Option<String>,
    /// When the peer's close frame arrived, and its code.
    close: Option<(Instant, u16)>,
}

/// One client: a text message every `period`, each echo checked in order, until `stop` (then a
/// clean client-side close) or the peer's close frame (recorded). Bounded by `limit`.
async fn session(
    mut ws: WsClient,
    id: usize,
    period: Duration,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
    limit: Duration,
) -> Session {
    let mut out = Session::default();
    let deadline = Instant::now() + limit;
    let mut pending: VecDeque<String> = VecDeque::new();
    let mut seq = 0u64;
    tokio::time::sleep(period * (id as u32 % 16) / 16).await;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if Instant::now() > deadline {
            out.error = Some(format!("conn {id}: still open after {limit:?}"));
            return out;
        }
        if stop.load(Ordering::SeqCst) {
            if let Err(e) = ws.close(None).await {
                out.error = Some(format!("conn {id}: close: {e}"));
                return out;
            }
            let mut answered = false;
            for _ in 0..1000 {
                match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                    Ok(Some(Ok(Message::Close(_)))) => answered = true,
                    Ok(Some(Ok(_))) => {}
                    Ok(None) | Ok(Some(Err(_))) => break,
                    Err(_) => break,
                }
            }
            if !answered {
                out.error = Some(format!("conn {id}: our close was not answered"));
            }
            return out;
        }
        tokio::select! {
            _ = tick.tick() => {
                if pending.len() > 10 {
                    out.error = Some(format!("conn {id}: {} messages unanswered", pending.len()));
                    return out;
                }
                let m = format!("c{id}-m{seq}");
                seq += 1;
                if let Err(e) = ws.send(Message::text(m.clone())).await {
                    out.error = Some(format!("conn {id}: send: {e}"));
                    return out;
                }
                pending.push_back(m);
            }
            msg = tokio::time::timeout(Duration::from_millis(250), ws.next()) => match msg {
                Err(_) => {}
                Ok(Some(Ok(Message::Text(t)))) => match pending.pop_front() {
                    Some(want) if want == t.as_str() => {
                        out.echoed += 1;
                        progress.store(out.echoed, Ordering::SeqCst);
                    }
                    other => {
                        out.error = Some(format!("conn {id}: got {t:?}, expected {other:?}"));
                        return out;
                    }
                },
                Ok(Some(Ok(Message::Close(f)))) => {
                    let code = f.map(|f| u16::from(f.code)).unwrap_or(0);
                    out.close = Some((Instant::now(), code));
                    // Finish the close handshake (tungstenite replies while we read).
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Some(Ok(_)) = ws.next().await {}
                    })
                    .await;
                    return out;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => {
                    out.error = Some(format!("conn {id}: read: {e}"));
                    return out;
                }
                Ok(None) => {
                    out.error = Some(format!("conn {id}: stream ended without a close frame"));
                    return out;
                }
            },
        }
    }
}

/// Opens `n` tunnels to `/ws/...` (25 handshakes at a time).
async fn open_many(port: u16, n: usize, tag: &str) -> Vec<WsClient> {
    let sem = Arc::new(Semaphore::new(25));
    let mut opens = Vec::new();
    for c in 0..n {
        let sem = sem.clone();
        let path = format!("/ws/{tag}/{c}");
        opens.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            ws_connect(port, "ws.test", &path).await.map(|(ws, _)| ws)
        }));
    }
    let mut out = Vec::new();
    for (c, h) in opens.into_iter().enumerate() {
        out.push(
            h.await
                .unwrap()
                .unwrap_or_else(|e| panic!("ws connect {tag} {c}: {e}")),
        );
    }
    out
}

struct Sessions {
    stop: Arc<AtomicBool>,
    progress: Arc<Vec<Arc<AtomicU64>>>,
    tasks: Vec<tokio::task::JoinHandle<Session>>,
}

impl Sessions {
    fn start(clients: Vec<WsClient>, period: Duration, limit: Duration) -> Sessions {
        let stop = Arc::new(AtomicBool::new(false));
        let progress: Vec<Arc<AtomicU64>> = (0..clients.len())
            .map(|_| Arc::new(AtomicU64::new(0)))
            .collect();
        let tasks = clients
            .into_iter()
            .enumerate()
            .map(|(i, ws)| {
                tokio::spawn(session(
                    ws,
                    i,
                    period,
                    stop.clone(),
                    progress[i].clone(),
                    limit,
                ))
            })
            .collect();
        Sessions {
            stop,
            progress: Arc::new(progress),
            tasks,
        }
    }
    fn counts(&self) -> Vec<u64> {
        self.progress
            .iter()
            .map(|p| p.load(Ordering::SeqCst))
            .collect()
    }
    /// Waits until every session echoed at least `n` messages (or one ended).
    async fn wait_all(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.counts().iter().all(|c| *c >= n) {
                return true;
            }
            if self.tasks.iter().any(|t| t.is_finished()) {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
    async fn join(self, stop: bool, timeout: Duration) -> Vec<Session> {
        if stop {
            self.stop.store(true, Ordering::SeqCst);
        }
        let mut out = Vec::new();
        for (i, t) in self.tasks.into_iter().enumerate() {
            match tokio::time::timeout(timeout, t).await {
                Ok(Ok(s)) => out.push(s),
                Ok(Err(e)) => out.push(Session {
                    error: Some(format!("conn {i}: task panicked: {e}")),
                    ..Session::default()
                }),
                Err(_) => out.push(Session {
                    error: Some(format!("conn {i}: did not finish within {timeout:?}")),
                    ..Session::default()
                }),
            }
        }
        out
    }
}

fn errors_of(s: &[Session]) -> Vec<&str> {
    s.iter().filter_map(|s| s.error.as_deref()).collect()
}

/// A WebSocket echo upstream that records the close codes it receives.
struct CloseRecordingEcho {
    port: u16,
    codes: Arc<Mutex<Vec<u16>>>,
    active: Arc<AtomicI64>,
    rt: Option<tokio::runtime::Runtime>,
}

impl CloseRecordingEcho {
    fn start() -> CloseRecordingEcho {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let codes = Arc::new(Mutex::new(Vec::new()));
        let active = Arc::new(AtomicI64::new(0));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (c, a) = (codes.clone(), active.clone());
        rt.spawn(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let (c, a) = (c.clone(), a.clone());
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                        return;
                    };
                    a.fetch_add(1, Ordering::SeqCst);
                    while let Some(m) = ws.next().await {
                        match m {
                            Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                                if ws.send(m).await.is_err() {
                                    break;
                                }
                            }
                            Ok(Message::Close(f)) => c
                                .lock()
                                .unwrap()
                                .push(f.map(|f| u16::from(f.code)).unwrap_or(0)),
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                    a.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        CloseRecordingEcho {
            port,
            codes,
            active,
            rt: Some(rt),
        }
    }
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for CloseRecordingEcho {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            let _ = thread::spawn(move || rt.shutdown_timeout(Duration::from_secs(2))).join();
        }
    }
}

/// Close times relative to `t0` (seconds, sorted) and the largest count in any 1 s bucket
/// counted from the first close.
fn close_profile(closes: &[Instant], t0: Instant) -> (Vec<f64>, usize) {
    let mut rel: Vec<f64> = closes
        .iter()
        .map(|t| t.saturating_duration_since(t0).as_secs_f64())
        .collect();
    rel.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut buckets: HashMap<u64, usize> = HashMap::new();
    if let Some(first) = rel.first().copied() {
        for r in &rel {
            *buckets.entry(((r - first) / 1.0) as u64).or_default() += 1;
        }
    }
    let max = buckets.values().copied().max().unwrap_or(0);
    (rel, max)
}

// =============================================================================================
// 1. Upgrade under steady HTTP load

#[test]
fn upgrade_under_http_load_loses_nothing() {
    let app = HttpBackend::start("app");
    let gw = Gateway::start(&conf(&app.addr(), &dead_addr(), "{ idle_grace: 1s }"));
    let reaper = Reaper::default();
    let old = gw.pid();
    assert!(wait_until(Duration::from_secs(5), || pid_file(&gw) == Some(old)));
    assert_eq!(status_pid(&gw), Some(old));

    let load = Load::start(
        gw.port,
        &[
            Kind::KeepAlive,
            Kind::KeepAlive,
            Kind::NewConn,
            Kind::NewConn,
            Kind::Pooled,
        ],
    );
    thread::sleep(Duration::from_millis(1500));
    let t_start = Instant::now();
    let (new, u) = upgrade_ok(&gw, "1", old, &reaper);
    let t_done = Instant::now();
    let drain_at = wait_drain_start(&stderr_path(&gw), Duration::from_secs(10));
    let old_exit = wait_exit(old, Duration::from_secs(15));
    thread::sleep(Duration::from_millis(1500));
    let after_status = status_pid(&gw);
    let reports = load.finish();

    let total: u64 = reports.iter().map(|(_, r)| r.ok).sum();
    let errors: u64 = reports.iter().map(|(_, r)| r.errors).sum();
    let bad: u64 = reports.iter().map(|(_, r)| r.bad_status).sum();
    let all_done: Vec<Instant> = reports
        .iter()
        .flat_map(|(_, r)| r.done_at.iter().copied())
        .collect();
    let before = all_done.iter().filter(|t| **t < t_start).count();
    let during = all_done
        .iter()
        .filter(|t| **t >= t_start && **t <= t_done)
        .count();
    let after_exit = old_exit
        .map(|e| all_done.iter().filter(|t| **t > e).count())
        .unwrap_or(0);
    let closes: Vec<(Kind, u64)> = reports.iter().map(|(k, r)| (*k, r.conn_close)).collect();
    eprintln!(
        "upgrade under load: {total} ok, {errors} errors, {bad} bad status; {before} before the \
         upgrade, {during} during it ({:?}), {after_exit} after the old pid exited; old exited \
         {:?} after the upgrade returned (drain began {:?} after); Connection: close seen {closes:?}",
        u.took,
        old_exit.map(|e| e - t_done),
        drain_at.map(|d| d.saturating_duration_since(t_done)),
    );
    let firsts: Vec<&String> = reports
        .iter()
        .flat_map(|(_, r)| r.first_errors.iter())
        .collect();
    assert_eq!(errors + bad, 0, "failed requests; first: {firsts:?}");
    assert!(drain_at.is_some(), "old process never logged its drain");
    assert!(old_exit.is_some(), "old pid {old} still running 15 s on");
    assert_eq!(after_status, Some(new), "/status after the old pid exited");
    assert_eq!(pid_file(&gw), Some(new), "pid file after the upgrade");
    assert!(
        before > 0 && during > 0 && after_exit > 0,
        "traffic in every phase"
    );
    for (k, r) in &reports {
        assert!(r.ok > 20, "{k:?} thread made only {} requests", r.ok);
        if *k == Kind::KeepAlive {
            assert!(
                r.conn_close >= 1,
                "kept-alive client never got Connection: close from the draining process"
            );
        }
    }
}

// =============================================================================================
// 2. 300 WebSocket tunnels across an upgrade

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_keep_echoing_on_the_old_process_across_an_upgrade() {
    const N: usize = 300;
    let echo = WsEchoServer::start();
    let gw = Gateway::start(&conf(
        &dead_addr(),
        &echo.addr(),
        "{ timeout: 30s, spread: 2s }",
    ));
    let reaper = Reaper::default();
    let old = gw.pid();
    assert!(wait_until(Duration::from_secs(5), || pid_file(&gw) == Some(old)));

    let clients = open_many(gw.port, N, "old").await;
    let ports: Vec<u16> = clients.iter().map(local_port).collect();
    let on_old = block_in_place(|| {
        gw.wait_metric(
            "tollgate_websocket_tunnels_active",
            N as f64,
            Duration::from_secs(10),
        )
    });
    assert!(on_old, "tunnels_active != {N} before the upgrade");
    let owners = conn_owners(gw.port, &ports, &[old]);
    assert!(
        owners.iter().all(|o| *o == Some(old)),
        "procfs owner check before the upgrade: {}",
        owner_summary(&owners)
    );

    let sessions = Sessions::start(clients, Duration::from_millis(300), Duration::from_secs(60));
    assert!(
        sessions.wait_all(2, Duration::from_secs(20)).await,
        "sessions did not get going"
    );

    let (new, u) = block_in_place(|| upgrade_ok(&gw, "1", old, &reaper));
    let drained =
        block_in_place(|| wait_log(&stderr_path(&gw), DRAIN_LOG, Duration::from_secs(10)));
    assert!(drained.is_some(), "old process never logged its drain");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at_drain = sessions.counts();

    // Only the new process answers the admin listener now; it has no tunnels.
    let pids: Vec<Option<u32>> = block_in_place(|| (0..5).map(|_| status_pid(&gw)).collect());
    assert!(
        pids.iter().all(|p| *p == Some(new)),
        "/status pids after the drain began: {pids:?}"
    );
    let new_active = block_in_place(|| gw.metric("tollgate_websocket_tunnels_active"));
    assert_eq!(
        new_active,
        Some(0.0),
        "new process's tunnels before new clients"
    );

    // New tunnels land on the new process.
    let mut fresh = open_many(gw.port, 20, "new").await;
    for (i, ws) in fresh.iter_mut().enumerate() {
        let m = Message::text(format!("fresh {i}"));
        assert_eq!(
            ws_roundtrip(ws, m.clone(), Duration::from_secs(5)).await,
            Ok(m)
        );
    }
    let fresh_ports: Vec<u16> = fresh.iter().map(local_port).collect();
    let fresh_owners = conn_owners(gw.port, &fresh_ports, &[old, new]);
    assert!(
        fresh_owners.iter().all(|o| *o == Some(new)),
        "tunnels opened after the handoff: {}",
        owner_summary(&fresh_owners)
    );
    let new_active = block_in_place(|| gw.metric("tollgate_websocket_tunnels_active"));
    assert_eq!(new_active, Some(20.0), "new process's tunnels");

    // The old tunnels keep echoing on the old process.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = sessions.counts();
    let stalled: Vec<usize> = (0..N).filter(|&i| later[i] <= at_drain[i]).collect();
    let owners = conn_owners(gw.port, &ports, &[old, new]);
    assert!(pid_alive(old), "old process exited with {N} tunnels open");
    assert!(
        owners.iter().all(|o| *o == Some(old)),
        "old tunnels during the drain: {}",
        owner_summary(&owners)
    );

    let t_stop = Instant::now();
    let results = sessions.join(true, Duration::from_secs(20)).await;
    let old_exit = block_in_place(|| wait_exit(old, Duration::from_secs(10)));
    let echoed: u64 = results.iter().map(|s| s.echoed).sum();
    let during: u64 = (0..N).map(|i| later[i] - at_drain[i]).sum();
    eprintln!(
        "{N} tunnels: {echoed} echoes in order, {during} while the old process drained; upgrade \
         took {:?}; old exited {:?} after the clients closed",
        u.took,
        old_exit.map(|e| e - t_stop)
    );
    let errs = errors_of(&results);
    assert!(
        errs.is_empty(),
        "{} sessions failed: {:?}",
        errs.len(),
        &errs[..errs.len().min(5)]
    );
    assert!(
        stalled.is_empty(),
        "{} tunnels stalled during the drain",
        stalled.len()
    );
    assert!(
        old_exit.is_some(),
        "old process still running 10 s after its last tunnel closed"
    );
    for mut ws in fresh {
        let _ = ws.close(None).await;
    }
    assert_eq!(status_pid(&gw), Some(new));
}

// =============================================================================================
// 3. Paced close at the drain deadline

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_tunnels_paced_after_the_deadline_then_exits() {
    const N: usize = 60;
    const TIMEOUT: f64 = 2.0;
    const SPREAD: f64 = 6.0;
    let echo = CloseRecordingEcho::start();
    let gw = Gateway::start(&conf(
        &dead_addr(),
        &echo.addr(),
        "{ timeout: 2s, spread: 6s }",
    ));
    let clients = open_many(gw.port, N, "p").await;
    let sessions = Sessions::start(clients, Duration::from_millis(250), Duration::from_secs(40));
    assert!(sessions.wait_all(1, Duration::from_secs(15)).await);
    let at_term = sessions.counts();

    let t0 = Instant::now();
    signal(gw.pid(), libc::SIGTERM);
    let results = sessions.join(false, Duration::from_secs(25)).await;
    let pid = gw.pid();
    let exit = block_in_place(|| wait_exit(pid, Duration::from_secs(10)));

    let errs = errors_of(&results);
    assert!(
        errs.is_empty(),
        "{} sessions failed: {:?}",
        errs.len(),
        &errs[..errs.len().min(5)]
    );
    let codes: HashSet<u16> = results
        .iter()
        .filter_map(|s| s.close.map(|c| c.1))
        .collect();
    let closes: Vec<Instant> = results
        .iter()
        .filter_map(|s| s.close.map(|c| c.0))
        .collect();
    assert_eq!(closes.len(), N, "every client gets a close frame");
    assert_eq!(codes, HashSet::from([1001]), "client close codes");
    let (rel, max_per_s) = close_profile(&closes, t0);
    let (first, last) = (rel[0], rel[N - 1]);
    let even = N as f64 / SPREAD;
    let exit_after_last = exit.map(|e| e.saturating_duration_since(t0).as_secs_f64() - last);
    eprintln!(
        "paced close of {N}: first {first:.2}s, last {last:.2}s after SIGTERM (deadline {TIMEOUT}s, \
         spread {SPREAD}s), max {max_per_s}/s (even {even:.0}/s); exit {exit_after_last:?}s after the last"
    );
    // Echoes continued between SIGTERM and the deadline.
    let quiet = (0..N)
        .filter(|&i| results[i].echoed < at_term[i] + 3)
        .count();
    assert_eq!(quiet, 0, "tunnels that stopped echoing before the deadline");
    assert!(
        first >= TIMEOUT,
        "first close {first:.3}s before the {TIMEOUT}s deadline"
    );
    assert!(first < TIMEOUT + 1.0, "first close late: {first:.3}s");
    assert!(
        last - first >= SPREAD * 0.75 && last <= TIMEOUT + SPREAD + 1.5,
        "closes not spread over the window: {first:.2}..{last:.2}s"
    );
    assert!(
        max_per_s as f64 <= 2.0 * even,
        "{max_per_s} closes in one second (even rate {even:.0}/s)"
    );
    let e = exit_after_last.expect("process still running 10 s after its last tunnel");
    assert!(e < 3.0, "exited {e:.2}s after the last close");
    let upstream = block_in_place(|| {
        wait_until(Duration::from_secs(5), || {
            echo.codes.lock().unwrap().len() >= N
        })
    });
    let up_codes = echo.codes.lock().unwrap().clone();
    assert!(
        upstream,
        "upstream got {} close frames of {N}",
        up_codes.len()
    );
    assert!(
        up_codes.iter().all(|c| *c == 1001),
        "upstream close codes: {up_codes:?}"
    );
    assert_eq!(echo.active.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_closes_old_tunnels_paced_and_reconnects_land_on_the_new_process() {
    const N: usize = 30;
    const TIMEOUT: f64 = 1.0;
    const SPREAD: f64 = 3.0;
    let echo = WsEchoServer::start();
    let gw = Gateway::start(&conf(
        &dead_addr(),
        &echo.addr(),
        "{ timeout: 1s, spread: 3s }",
    ));
    let reaper = Reaper::default();
    let old = gw.pid();
    assert!(wait_until(Duration::from_secs(5), || pid_file(&gw) == Some(old)));
    let clients = open_many(gw.port, N, "u").await;
    let port = gw.port;

    // Each client: echo until closed, then reconnect at once and echo once.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, ws) in clients.into_iter().enumerate() {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let s = session(
                ws,
                i,
                Duration::from_millis(250),
                stop,
                Arc::new(AtomicU64::new(0)),
                Duration::from_secs(40),
            )
            .await;
            if s.error.is_some() || s.close.is_none() {
                return (s, None);
            }
            let again = match ws_connect(port, "ws.test", &format!("/ws/again/{i}")).await {
                Ok((mut ws, _)) => {
                    let m = Message::text(format!("again {i}"));
                    match ws_roundtrip(&mut ws, m.clone(), Duration::from_secs(5)).await {
                        Ok(got) if got == m => Ok(ws),
                        other => Err(format!("conn {i}: echo after reconnect: {other:?}")),
                    }
                }
                Err(e) => Err(format!("conn {i}: reconnect: {e}")),
            };
            (s, Some(again))
        }));
    }

    let (new, _u) = block_in_place(|| upgrade_ok(&gw, "1", old, &reaper));
    let drain_at = block_in_place(|| wait_drain_start(&stderr_path(&gw), Duration::from_secs(10)))
        .expect("old process never logged its drain");
    let mut results = Vec::new();
    for t in tasks {
        results.push(
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("client task bounded")
                .expect("client task"),
        );
    }
    let exit = block_in_place(|| wait_exit(old, Duration::from_secs(10)));

    let mut errs: Vec<String> = results
        .iter()
        .filter_map(|(s, _)| s.error.clone())
        .collect();
    let mut again = Vec::new();
    for (_, a) in results.iter_mut() {
        match a.take() {
            Some(Ok(ws)) => again.push(ws),
            Some(Err(e)) => errs.push(e),
            None => errs.push("a client got no close frame".into()),
        }
    }
    assert!(
        errs.is_empty(),
        "{} clients failed: {:?}",
        errs.len(),
        &errs[..errs.len().min(5)]
    );
    let closes: Vec<Instant> = results
        .iter()
        .filter_map(|(s, _)| s.close.map(|c| c.0))
        .collect();
    let codes: HashSet<u16> = results
        .iter()
        .filter_map(|(s, _)| s.close.map(|c| c.1))
        .collect();
    assert_eq!(codes, HashSet::from([1001]));
    let (rel, max_per_s) = close_profile(&closes, drain_at);
    let (first, last) = (rel[0], rel[N - 1]);
    let even = N as f64 / SPREAD;
    let again_ports: Vec<u16> = again.iter().map(local_port).collect();
    let owners = conn_owners(gw.port, &again_ports, &[old, new]);
    eprintln!(
        "upgrade paced close of {N}: first {first:.2}s, last {last:.2}s after the drain was \
         logged (deadline {TIMEOUT}s, spread {SPREAD}s), max {max_per_s}/s; old exit {:?}s after \
         the last close; reconnected: {}",
        exit.map(|e| e.saturating_duration_since(drain_at).as_secs_f64() - last),
        owner_summary(&owners)
    );
    // drain_at is the log line's own timestamp (microseconds, same clock).
    assert!(
        first >= TIMEOUT - 0.01,
        "first close {first:.3}s, deadline {TIMEOUT}s"
    );
    assert!(
        last - first >= SPREAD * 0.7 && last <= TIMEOUT + SPREAD + 1.5,
        "closes not spread: {first:.2}..{last:.2}s"
    );
    assert!(
        max_per_s as f64 <= 2.0 * even,
        "{max_per_s} closes in one second"
    );
    assert!(
        owners.iter().all(|o| *o == Some(new)),
        "reconnected clients: {}",
        owner_summary(&owners)
    );
    let e = exit.expect("old process still running after its last tunnel closed");
    let e = e.saturating_duration_since(drain_at).as_secs_f64() - last;
    assert!(e < 3.0, "old process exited {e:.2}s after its last close");
    stop.store(true, Ordering::SeqCst);
    for mut ws in again {
        let _ = ws.close(None).await;
    }
}

// =============================================================================================
// 4. Exit promptly

#[test]
fn sigterm_with_no_connections_exits_at_once() {
    let gw = Gateway::start(&conf(&dead_addr(), &dead_addr(), "{ timeout: 1h }"));
    let t0 = Instant::now();
    signal(gw.pid(), libc::SIGTERM);
    let exit = wait_exit(gw.pid(), Duration::from_secs(10)).map(|e| e - t0);
    eprintln!("idle SIGTERM: exited after {exit:?}");
    let took = exit.expect("still running 10 s after SIGTERM");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(!gw.alive());
}

#[test]
fn sigterm_waits_for_an_in_flight_request_then_exits() {
    let app = HttpBackend::start("app");
    let gw = Gateway::start(&conf(&app.addr(), &dead_addr(), "{ timeout: 1h }"));
    let addr = gw.addr();
    let t0 = Instant::now();
    let req = thread::spawn(move || {
        let mut c = RawConn::connect(addr).expect("connect");
        let r = c.request(&Req::get("/sleep/3000").host("app.test"));
        (r, Instant::now())
    });
    thread::sleep(Duration::from_millis(700));
    signal(gw.pid(), libc::SIGTERM);
    let exit = wait_exit(gw.pid(), Duration::from_secs(15));
    let (resp, done) = req.join().unwrap();
    let resp = resp.expect("the in-flight request is answered");
    let exit = exit.expect("still running 15 s after SIGTERM");
    eprintln!(
        "in-flight request answered at {:?}, process gone at {:?} (status {}, {} body bytes, \
         connection: {:?})",
        done - t0,
        exit - t0,
        resp.status,
        resp.body.len(),
        resp.header("connection")
    );
    assert_eq!(resp.status, 200);
    let echo = resp.echo();
    assert_eq!(echo.path(), "/sleep/3000");
    assert!(done - t0 >= Duration::from_millis(2900));
    assert!(
        exit >= done - Duration::from_millis(50),
        "exited before answering"
    );
    assert!(
        exit - done < Duration::from_millis(1500),
        "exited {:?} after the last response",
        exit - done
    );
}

#[test]
fn sigint_exits_fast_even_with_a_request_in_flight() {
    let app = HttpBackend::start("app");
    let gw = Gateway::start(&conf(&app.addr(), &dead_addr(), "{ timeout: 1h }"));
    let addr = gw.addr();
    let req = thread::spawn(move || {
        let mut c = RawConn::connect(addr).expect("connect");
        c.request(&Req::get("/sleep/8000").host("app.test"))
            .map(|r| r.status)
    });
    thread::sleep(Duration::from_millis(700));
    let t0 = Instant::now();
    signal(gw.pid(), libc::SIGINT);
    let exit = wait_exit(gw.pid(), Duration::from_secs(10)).map(|e| e - t0);
    let r = req.join().unwrap();
    eprintln!("SIGINT: exited after {exit:?}; in-flight request: {r:?}");
    let took = exit.expect("still running 10 s after SIGINT");
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

// =============================================================================================
// 5. A config this binary rejects

#[test]
fn upgrade_with_a_broken_config_fails_and_leaves_the_old_process_serving() {
    let app = HttpBackend::start("app");
    let good = conf(&app.addr(), &dead_addr(), "{ timeout: 1h }");
    let gw = Gateway::start(&good);
    let reaper = Reaper::default();
    let old = gw.pid();
    assert!(wait_until(Duration::from_secs(5), || pid_file(&gw) == Some(old)));
    let bad = good.replace(
        "access_log:",
        "http:\n  max_header_bytes: 32k\n  bogus_field: 1\naccess_log:",
    );
    let text = gw.write_config(&bad);
    let line = line_of(&text, "bogus_field");

    let u = run_upgrade(&gw, "bad");
    if let Some(p) = u.new_pid {
        reaper.add(p);
    }
    eprintln!(
        "broken config: exit {:?} after {:?}; stderr: {}",
        u.code,
        u.took,
        u.stderr.trim()
    );
    assert_eq!(
        u.code,
        Some(1),
        "stdout: {}\nstderr: {}",
        u.stdout,
        u.stderr
    );
    assert!(u.stderr.contains("upgrade failed"), "stderr: {}", u.stderr);
    let want = format!("{}:{line}:", gw.config_path.display());
    assert!(
        u.stderr.contains(&want),
        "stderr should name {want}: {}",
        u.stderr
    );
    assert!(u.stderr.contains("bogus_field"), "stderr: {}", u.stderr);
    assert!(u.stdout.is_empty(), "stdout: {}", u.stdout);

    // The old process is untouched: same pid everywhere, still proxying, not draining.
    thread::sleep(Duration::from_millis(500));
    for _ in 0..5 {
        let st = gw.status_json();
        assert_eq!(st["pid"].as_u64(), Some(old as u64));
        assert_eq!(st["draining"].as_bool(), Some(false));
    }
    assert!(gw.alive());
    assert_eq!(pid_file(&gw), Some(old));
    assert!(!gw.dir.path().join("upgrade.sock").exists());
    assert!(!u.log.exists(), "a new process was started");
    let r = gw.get("app.test", "/app/after-failed-upgrade");
    assert_eq!(r.echo().path(), "/app/after-failed-upgrade");
    assert!(!gw.stderr_text().contains(DRAIN_LOG));

    // And a fixed file then upgrades normally.
    gw.write_config(&good);
    let (new, _) = upgrade_ok(&gw, "good", old, &reaper);
    assert!(wait_until(Duration::from_secs(10), || status_pid(&gw)
        == Some(new)
        && gw.stderr_text().contains(DRAIN_LOG)));
}

// =============================================================================================
// 6. Two upgrades in a row while the first old process still drains

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_upgrades_in_a_row_while_the_first_still_drains() {
    let echo = WsEchoServer::start();
    let app = HttpBackend::start("app");
    let gw = Gateway::start(&conf(
        &app.addr(),
        &echo.addr(),
        "{ timeout: 8s, spread: 1s }",
    ));
    let reaper = Reaper::default();
    let p1 = gw.pid();
    assert!(wait_until(Duration::from_secs(5), || pid_file(&gw) == Some(p1)));
    let clients = open_many(gw.port, 1, "held").await;
    let held_port = local_port(&clients[0]);
    let sessions = Sessions::start(clients, Duration::from_millis(200), Duration::from_secs(40));
    assert!(sessions.wait_all(2, Duration::from_secs(10)).await);

    let (p2, u1) = block_in_place(|| upgrade_ok(&gw, "1", p1, &reaper));
    let pid_file_after_1 = pid_file(&gw);
    let pid_file_ok =
        block_in_place(|| wait_until(Duration::from_secs(5), || pid_file(&gw) == Some(p2)));
    assert!(
        pid_file_ok,
        "pid file still names {pid_file_after_1:?} after upgrade 1"
    );
    let (p3, u2) = block_in_place(|| upgrade_ok(&gw, "2", p2, &reaper));
    let t2 = Instant::now();
    assert!(pid_alive(p1), "the first process should still drain");
    let p1_drain = block_in_place(|| wait_drain_start(&stderr_path(&gw), Duration::from_secs(10)))
        .expect("first process never logged its drain");
    let p2_drain = block_in_place(|| wait_log(&u1.log, DRAIN_LOG, Duration::from_secs(10)));
    assert!(p2_drain.is_some(), "second process never logged its drain");
    // The second process had no connections: it exits right after its drain begins.
    let p2_exit = block_in_place(|| wait_exit(p2, Duration::from_secs(10)));
    assert!(p2_exit.is_some(), "second process still running");

    // The held tunnel is still on the first process and still echoes.
    let owners = conn_owners(gw.port, &[held_port], &[p1, p2, p3]);
    assert_eq!(owners, vec![Some(p1)], "held tunnel owner");
    let mid = sessions.counts()[0];
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        sessions.counts()[0] > mid + 2,
        "held tunnel stopped echoing"
    );
    let pids: Vec<Option<u32>> = block_in_place(|| (0..5).map(|_| status_pid(&gw)).collect());
    assert!(pids.iter().all(|p| *p == Some(p3)), "/status pids {pids:?}");
    let r = block_in_place(|| gw.get("app.test", "/app/after-two-upgrades"));
    assert_eq!(r.status, 200);

    // At the first process's deadline the tunnel is closed (1001) and the process exits.
    let results = sessions.join(false, Duration::from_secs(20)).await;
    let s = &results[0];
    assert!(s.error.is_none(), "held tunnel: {:?}", s.error);
    let (closed_at, code) = s.close.expect("held tunnel got no close frame");
    assert_eq!(code, 1001);
    let p1_exit = block_in_place(|| wait_exit(p1, Duration::from_secs(10)));
    let since_drain = closed_at.saturating_duration_since(p1_drain).as_secs_f64();
    eprintln!(
        "two upgrades: pids {p1} -> {p2} -> {p3} (took {:?}, {:?}); held tunnel echoed {} \
         messages, closed {since_drain:.2}s after its process began draining (timeout 8s); first \
         process gone {:?} after the close; second gone {:?} after upgrade 2; pid file right after \
         upgrade 1: {pid_file_after_1:?}",
        u1.took,
        u2.took,
        s.echoed,
        p1_exit.map(|e| e.saturating_duration_since(closed_at)),
        p2_exit.map(|e| e.saturating_duration_since(t2)),
    );
    assert!(
        (7.99..9.5).contains(&since_drain),
        "held tunnel closed {since_drain:.2}s into the drain"
    );
    assert!(
        p1_exit.is_some(),
        "first process still running after its tunnel closed"
    );
    assert!(pid_alive(p3));
    assert_eq!(pid_file(&gw), Some(p3));
}

// =============================================================================================
// 7. SIGUSR2

#[test]
fn sigusr2_runs_the_upgrade_itself() {
    let app = HttpBackend::start("app");
    let gw = Gateway::start(&conf(&app.addr(), &dead_addr(), "{ idle_grace: 1s }"));
    let reaper = Reaper::default();
    let old = gw.pid();
    assert!(wait_until(Duration::from_secs(5), || pid_file(&gw) == Some(old)));
    let load = Load::start(gw.port, &[Kind::KeepAlive, Kind::NewConn]);
    thread::sleep(Duration::from_millis(1000));

    let t0 = Instant::now();
    signal(old, libc::SIGUSR2);
    let mut new = None;
    let switched = wait_until(Duration::from_secs(30), || {
        new = status_pid(&gw).filter(|p| *p != old);
        new.is_some()
    });
    if let Some(p) = new {
        reaper.add(p);
    }
    let took = t0.elapsed();
    assert!(
        switched,
        "/status still names pid {old} 30 s after SIGUSR2; stderr:\n{}",
        tail(&gw.stderr_text(), 3000)
    );
    let new = new.unwrap();
    assert!(is_tollgate(new));
    let old_exit = wait_exit(old, Duration::from_secs(15));
    let exit_at = old_exit.map(|e| e - t0);
    thread::sleep(Duration::from_millis(1000));
    let reports = load.finish();
    let total: u64 = reports.iter().map(|(_, r)| r.ok).sum();
    let failed: u64 = reports.iter().map(|(_, r)| r.errors + r.bad_status).sum();
    let after = old_exit
        .map(|e| {
            reports
                .iter()
                .flat_map(|(_, r)| r.done_at.iter())
                .filter(|t| **t > e)
                .count()
        })
        .unwrap_or(0);
    eprintln!(
        "SIGUSR2: pid {old} -> {new} in {took:?}; old gone {exit_at:?} after the signal; \
         {total} requests ok, {failed} failed, {after} after the old pid exited"
    );
    let firsts: Vec<&String> = reports
        .iter()
        .flat_map(|(_, r)| r.first_errors.iter())
        .collect();
    assert_eq!(failed, 0, "failed requests: {firsts:?}");
    assert!(old_exit.is_some(), "old process still running");
    assert!(after > 0, "no traffic after the old process exited");
    assert_eq!(status_pid(&gw), Some(new));
    assert_eq!(pid_file(&gw), Some(new));
    assert!(gw.stderr_text().contains("binary upgrade finished"));
}

// =============================================================================================
// 4b. Keep-alive requests in flight when the drain begins

/// A response that says `keep-alive` promises the connection for one more request; once the
/// drain has begun the gateway must either say `Connection: close` or honour the promise.
#[test]
fn requests_in_flight_at_the_drain_start_say_close_or_keep_their_connection() {
    let app = HttpBackend::start("app");
    let gw = Gateway::start(&conf(
        &app.addr(),
        &dead_addr(),
        "{ timeout: 1h, idle_grace: 1s }",
    ));
    let addr = gw.addr();
    // A: the slow request is the connection's first. B: its second (kept alive).
    let conns: Vec<thread::JoinHandle<(String, Result<String, String>)>> = (0..2)
        .map(|k| {
            thread::spawn(move || {
                let mut c = RawConn::connect(addr).expect("connect");
                if k == 1 {
                    let r = c
                        .request(&Req::get("/app/warm").host("app.test"))
                        .expect("warm-up");
                    assert!(!r.closes());
                }
                let r = c
                    .request(&Req::get("/sleep/1500").host("app.test"))
                    .expect("in-flight request");
                assert_eq!(r.status, 200);
                let said = r.header("connection").unwrap_or("(none)").to_string();
                if r.closes() {
                    return (said, Ok("not reused (Connection: close)".into()));
                }
                // The response promised keep-alive: use it at once, as a busy client would.
                let next = c
                    .request(&Req::get("/app/next").host("app.test"))
                    .map(|r| format!("{} connection: {:?}", r.status, r.header("connection")))
                    .map_err(|e| e.to_string());
                (said, next)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(600));
    signal(gw.pid(), libc::SIGTERM);
    let out: Vec<(String, Result<String, String>)> =
        conns.into_iter().map(|h| h.join().unwrap()).collect();
    let _ = wait_exit(gw.pid(), Duration::from_secs(10));
    eprintln!(
        "in flight at SIGTERM: first-request conn {:?}; kept-alive conn {:?}",
        out[0], out[1]
    );
    for (which, (said, next)) in ["first request", "kept-alive"].iter().zip(&out) {
        assert!(
            next.is_ok(),
            "{which} connection: in-flight response said `Connection: {said}`, then the next \
             request failed: {next:?}"
        );
    }
}
