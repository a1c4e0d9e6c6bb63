//! Active health checks: a background service probing the backends of every upstream that has a
//! `health_check:`.
//!
//! Each tick re-reads the current upstreams from its source, so a reload that adds or removes
//! backends or changes a check takes effect without restarting anything. Every backend is probed
//! every `interval` with at most one probe in flight (a slow backend skips a beat rather than
//! piling probes up); probes of different backends run concurrently. Verdicts go to the backend's
//! long-lived state, which the request path reads; this module never runs on the request path.
//!
//! Probe I/O goes through Pingora's own connectors (one shared HTTP connector, one transport
//! connector), so a probe connects exactly as traffic does: same address, TLS, SNI and
//! certificate verification. An HTTP probe is `GET path` with `Host` (default: the backend
//! address as written) and passes on an expected status (default: any 2xx); a TCP probe passes
//! when the connection (and the TLS handshake, for a `tls:` upstream) is established.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::connectors::http::Connector as HttpConnector;
use pingora_core::connectors::TransportConnector;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::registry::BackendState;
use super::{BackendEntry, Upstream};

/// Longest sleep between two looks at the source: bounds how long a reload waits for its new
/// backends' first probe.
const MAX_IDLE: Duration = Duration::from_millis(250);

/// A compiled `health_check:` block.
#[derive(Debug)]
pub(super) struct HealthSpec {
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring an unhealthy backend back.
    pub healthy: u32,
    /// Consecutive failures that take a healthy backend down.
    pub unhealthy: u32,
}

#[derive(Debug)]
pub(super) enum Probe {
    Http {
        path: String,
        /// `Host` of the probe; `None`: the backend address as written.
        host: Option<String>,
        /// Passing statuses; empty: any 2xx.
        expected: Vec<u16>,
    },
    Tcp,
}

type Source = Arc<dyn Fn() -> Vec<Arc<Upstream>> + Send + Sync>;

/// Active health checks for whatever upstreams `source` returns (the current snapshot's). A
/// Pingora [`BackgroundService`]; `start` returns when the server shuts down.
pub struct HealthChecker {
    source: Source,
}

impl HealthChecker {
    pub fn new(source: Arc<dyn Fn() -> Vec<Arc<Upstream>> + Send + Sync>) -> Self {
        Self { source }
    }

    /// The probe loop, until `shutdown` turns true (or its sender goes away).
    async fn run(&self, mut shutdown: ShutdownWatch) {
        let connectors = Arc::new(Connectors {
            http: HttpConnector::new(None),
            tcp: TransportConnector::new(None),
        });
        // Keyed by the state's address: one entry per (upstream, backend), kept alive by `state`.
        let mut slots: HashMap<usize, Slot> = HashMap::new();
        let mut probes = JoinSet::new();
        let mut round: u64 = 0;
        loop {
            if *shutdown.borrow() {
                break;
            }
            round += 1;
            while probes.try_join_next().is_some() {}
            let now = Instant::now();
            let mut wake = now + MAX_IDLE;
            for upstream in (self.source)() {
                let Some(spec) = &upstream.health else {
                    forget_verdicts(&upstream);
                    continue;
                };
                for backend in upstream.backends.iter() {
                    let slot = slots
                        .entry(Arc::as_ptr(&backend.state) as usize)
                        .or_insert_with(|| Slot {
                            _state: backend.state.clone(),
                            last: None,
                            busy: Arc::new(AtomicBool::new(false)),
                            round,
                        });
                    slot.round = round;
                    let due = slot.last.map_or(now, |last| last + spec.interval);
                    if due <= now {
                        slot.last = Some(now);
                        // Still busy with the previous probe: skip this beat.
                        if !slot.busy.swap(true, Ordering::AcqRel) {
                            let job = ProbeJob::new(&upstream, backend, spec.clone());
                            let busy = slot.busy.clone();
                            let connectors = connectors.clone();
                            probes.spawn(async move {
                                job.run(&connectors).await;
                                busy.store(false, Ordering::Release);
                            });
                        }
                        wake = wake.min(now + spec.interval);
                    } else {
                        wake = wake.min(due);
                    }
                }
            }
            slots.retain(|_, slot| slot.round == round);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
            }
        }
        probes.abort_all();
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    /// Probes for the life of the process, including while it drains after an upgrade or
    /// SIGTERM: requests and tunnels still served then need current health too. The drainer
    /// ends the process.
    async fn start(&self, _shutdown: ShutdownWatch) {
        let (_never_sent, never) = tokio::sync::watch::channel(false);
        self.run(never).await;
    }
}

/// An upstream without `health_check:` must not keep verdicts from an earlier config: should
/// checks come back later, its backends start healthy like new ones.
fn forget_verdicts(upstream: &Upstream) {
    for backend in upstream.backends.iter() {
        if backend.state.reset_active() {
            tracing::info!(
                upstream = %upstream.name,
                backend = %backend.address,
                "health check removed, backend considered healthy"
            );
        }
    }
}

struct Connectors {
    http: HttpConnector,
    tcp: TransportConnector,
}

struct Slot {
    /// Keeps the key (the state's address) from being reused while the slot exists.
    _state: Arc<BackendState>,
    last: Option<Instant>,
    busy: Arc<AtomicBool>,
    /// Last loop round that saw this backend configured; older slots are dropped.
    round: u64,
}

/// One probe of one backend, with everything it needs owned.
struct ProbeJob {
    upstream: String,
    address: String,
    state: Arc<BackendState>,
    spec: Arc<HealthSpec>,
    peer: HttpPeer,
}

impl ProbeJob {
    fn new(upstream: &Upstream, backend: &BackendEntry, spec: Arc<HealthSpec>) -> Self {
        let mut peer = backend.peer.clone();
        let o = &mut peer.options;
        o.connection_timeout = Some(spec.timeout);
        o.total_connection_timeout = Some(spec.timeout);
        o.read_timeout = Some(spec.timeout);
        o.write_timeout = Some(spec.timeout);
        Self {
            upstream: upstream.name.clone(),
            address: backend.address.clone(),
            state: backend.state.clone(),
            spec,
            peer,
        }
    }

    async fn run(&self, connectors: &Connectors) {
        let result = match tokio::time::timeout(self.spec.timeout, self.probe(connectors)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {:?}", self.spec.timeout)),
        };
        if let Err(error) = &result {
            tracing::debug!(upstream = %self.upstream, backend = %self.address, %error, "health probe failed");
        }
        if result.is_ok() {
            self.state.active_probe_passed();
        }
        let flipped =
            self.state
                .observe_probe(result.is_ok(), self.spec.healthy, self.spec.unhealthy);
        match (flipped, result) {
            (Some(true), _) => tracing::info!(
                upstream = %self.upstream,
                backend = %self.address,
                successes = self.spec.healthy,
                "backend healthy"
            ),
            (Some(false), Err(error)) => tracing::warn!(
                upstream = %self.upstream,
                backend = %self.address,
                failures = self.spec.unhealthy,
                %error,
                "backend unhealthy"
            ),
            _ => {}
        }
    }

    async fn probe(&self, connectors: &Connectors) -> Result<(), String> {
        match &self.spec.probe {
            Probe::Tcp => connectors
                .tcp
                .new_stream(&self.peer)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Probe::Http {
                path,
                host,
                expected,
            } => {
                let host = host.as_deref().unwrap_or(&self.address);
                let status = http_get(&connectors.http, &self.peer, path, host).await?;
                let pass = if expected.is_empty() {
                    (200..300).contains(&status)
                } else {
                    expected.contains(&status)
                };
                if pass {
                    Ok(())
                } else {
                    Err(format!("unexpected status {status}"))
                }
            }
        }
    }
}

/// `GET path` on a fresh connection; the response status. The connection is dropped after the
/// response head: the body is not needed, and a fresh connection per probe also exercises
/// connection setup (a pooled one can hide a broken listener or firewall).
async fn http_get(
    http: &HttpConnector,
    peer: &HttpPeer,
    path: &str,
    host: &str,
) -> Result<u16, String> {
    let err = |e: Box<pingora_error::Error>| e.to_string();
    let (mut session, _reused) = http.get_http_session(peer).await.map_err(err)?;
    let mut req = RequestHeader::build("GET", path.as_bytes(), None).map_err(err)?;
    req.insert_header(http::header::HOST, host).map_err(err)?;
    req.insert_header(http::header::USER_AGENT, "tollgate-health-check")
        .map_err(err)?;
    req.insert_header(http::header::CONNECTION, "close")
        .map_err(err)?;
    session
        .write_request_header(Box::new(req))
        .await
        .map_err(err)?;
    session.finish_request_body().await.map_err(err)?;
    session.read_response_header().await.map_err(err)?;
    session
        .response_header()
        .map(|resp| resp.status.as_u16())
        .ok_or_else(|| "no response header".to_string())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket, TcpStream};
    use tokio::sync::watch;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::upstream::tests::build;
    use crate::upstream::Registry;

    /// One request as the test backend saw it: answered status, request line, Host.
    type Seen = Arc<Mutex<Vec<(u16, String, String)>>>;

    /// A tiny HTTP backend on a fixed port that can be stopped and started again.
    struct TestBackend {
        addr: SocketAddr,
        status: Arc<AtomicU16>,
        seen: Seen,
        connections: Arc<AtomicUsize>,
        task: Option<JoinHandle<()>>,
    }

    async fn bind(addr: SocketAddr) -> TcpListener {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(addr).unwrap();
        socket.listen(64).unwrap()
    }

    impl TestBackend {
        async fn start() -> Self {
            let listener = bind("127.0.0.1:0".parse().unwrap()).await;
            let mut b = TestBackend {
                addr: listener.local_addr().unwrap(),
                status: Arc::new(AtomicU16::new(200)),
                seen: Arc::default(),
                connections: Arc::default(),
                task: None,
            };
            b.serve(listener);
            b
        }

        fn serve(&mut self, listener: TcpListener) {
            let (status, seen) = (self.status.clone(), self.seen.clone());
            let connections = self.connections.clone();
            self.task = Some(tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(answer(stream, status.clone(), seen.clone()));
                }
            }));
        }

        async fn stop(&mut self) {
            if let Some(task) = self.task.take() {
                task.abort();
                let _ = task.await; // the listener is closed once the task is gone
            }
        }

        async fn restart(&mut self) {
            let listener = bind(self.addr).await;
            self.serve(listener);
        }

        fn set_status(&self, status: u16) {
            self.status.store(status, Ordering::SeqCst);
        }

        fn answered(&self, status: u16, since: usize) -> usize {
            let seen = self.seen.lock().unwrap();
            seen[since.min(seen.len())..]
                .iter()
                .filter(|s| s.0 == status)
                .count()
        }

        fn count(&self) -> usize {
            self.seen.lock().unwrap().len()
        }
    }

    async fn answer(mut stream: TcpStream, status: Arc<AtomicU16>, seen: Seen) {
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return, // a TCP probe connects and leaves
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let line = text.lines().next().unwrap_or_default().to_string();
        let host = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("Host: ")
                    .or_else(|| l.strip_prefix("host: "))
            })
            .unwrap_or_default()
            .to_string();
        let code = status.load(Ordering::SeqCst);
        seen.lock().unwrap().push((code, line, host));
        let resp = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let _ = stream.write_all(resp.as_bytes()).await;
    }

    struct Running {
        upstreams: Arc<Mutex<Vec<Arc<Upstream>>>>,
        shutdown: watch::Sender<bool>,
        task: JoinHandle<()>,
    }

    fn run_checker(upstreams: Vec<Arc<Upstream>>) -> Running {
        let upstreams = Arc::new(Mutex::new(upstreams));
        let source = upstreams.clone();
        let checker = HealthChecker::new(Arc::new(move || source.lock().unwrap().clone()));
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(async move { checker.run(rx).await });
        Running {
            upstreams,
            shutdown,
            task,
        }
    }

    impl Running {
        async fn stop(self) {
            self.shutdown.send(true).unwrap();
            tokio::time::timeout(Duration::from_secs(2), self.task)
                .await
                .expect("the checker stops on shutdown")
                .unwrap();
        }
    }

    fn healthy(up: &Upstream, i: usize) -> bool {
        up.backend_states().nth(i).unwrap().healthy
    }

    /// Polls `cond` every 5 ms; panics after `secs` seconds.
    async fn wait_for(what: &str, secs: u64, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_check_follows_thresholds() {
        let mut backend = TestBackend::start().await;
        let up = Arc::new(build(
            "api",
            &format!(
                r#"
backends: [{{address: '{}'}}]
health_check:
  http: {{path: /healthz}}
  interval: 50ms
  timeout: 500ms
  healthy: 2
  unhealthy: 3
"#,
                backend.addr
            ),
            &Registry::new(),
        ));
        let checker = run_checker(vec![up.clone()]);

        wait_for("first probes", 3, || backend.count() >= 2).await;
        {
            let seen = backend.seen.lock().unwrap();
            assert_eq!(seen[0].1, "GET /healthz HTTP/1.1");
            assert_eq!(
                seen[0].2,
                backend.addr.to_string(),
                "Host defaults to the address"
            );
        }
        assert!(healthy(&up, 0));

        // 500s: down only after `unhealthy` consecutive failures.
        let mark = backend.count();
        backend.set_status(500);
        wait_for("unhealthy", 3, || !healthy(&up, 0)).await;
        let failures = backend.answered(500, mark);
        assert!(failures >= 3, "went down after {failures} failed probes");

        // 200s: up only after `healthy` consecutive successes.
        let mark = backend.count();
        backend.set_status(200);
        wait_for("healthy again", 3, || healthy(&up, 0)).await;
        let successes = backend.answered(200, mark);
        assert!(successes >= 2, "came back after {successes} probes");

        // Backend gone (connection refused), then back.
        backend.stop().await;
        wait_for("unhealthy when stopped", 3, || !healthy(&up, 0)).await;
        backend.restart().await;
        wait_for("healthy when restarted", 3, || healthy(&up, 0)).await;
        checker.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expected_status_and_host() {
        let backend = TestBackend::start().await;
        let up = Arc::new(build(
            "api",
            &format!(
                r#"
backends: [{{address: '{}'}}]
health_check:
  http: {{path: '/ready?deep=1', host: api.internal, expected_status: [503]}}
  interval: 50ms
  healthy: 1
  unhealthy: 1
"#,
                backend.addr
            ),
            &Registry::new(),
        ));
        let checker = run_checker(vec![up.clone()]);
        // 200 is not in expected_status.
        wait_for("unhealthy on 200", 3, || !healthy(&up, 0)).await;
        {
            let seen = backend.seen.lock().unwrap();
            assert_eq!(seen[0].1, "GET /ready?deep=1 HTTP/1.1");
            assert_eq!(seen[0].2, "api.internal");
        }
        backend.set_status(503);
        wait_for("healthy on 503", 3, || healthy(&up, 0)).await;
        checker.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_check_follows_the_listener() {
        let mut backend = TestBackend::start().await;
        let up = Arc::new(build(
            "db",
            &format!(
                "backends: [{{address: '{}'}}]\nhealth_check: {{tcp: {{}}, interval: 50ms, timeout: 300ms, healthy: 2, unhealthy: 2}}",
                backend.addr
            ),
            &Registry::new(),
        ));
        let checker = run_checker(vec![up.clone()]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(healthy(&up, 0), "a listening backend stays healthy");
        backend.stop().await;
        wait_for("unhealthy when stopped", 3, || !healthy(&up, 0)).await;
        backend.restart().await;
        wait_for("healthy when restarted", 3, || healthy(&up, 0)).await;
        checker.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reloads_take_effect() {
        let registry = Registry::new();
        let live = TestBackend::start().await;
        let dead: SocketAddr = {
            let l = bind("127.0.0.1:0".parse().unwrap()).await;
            l.local_addr().unwrap()
        };
        let unchecked = format!("backends: [{{address: '{}'}}]", live.addr);
        let checked = format!(
            "backends: [{{address: '{}'}}, {{address: '{dead}'}}]\nhealth_check: {{tcp: {{}}, interval: 50ms, healthy: 1, unhealthy: 1}}",
            live.addr
        );
        let first = Arc::new(build("u", &unchecked, &registry));
        let checker = run_checker(vec![first.clone()]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            live.connections.load(Ordering::SeqCst),
            0,
            "no health_check: no probes"
        );

        // Reload: a dead backend and a check appear.
        let second = Arc::new(build("u", &checked, &registry));
        *checker.upstreams.lock().unwrap() = vec![second.clone()];
        wait_for("dead backend marked down", 3, || !healthy(&second, 1)).await;
        assert!(healthy(&second, 0));
        assert!(
            live.connections.load(Ordering::SeqCst) > 0,
            "TCP probes connect"
        );
        let mut routed = build("u", &checked, &registry);
        let all = routed.subset(&Default::default()).unwrap();
        for _ in 0..4 {
            assert_eq!(routed.select(all, None, &[]).unwrap().index, 0);
        }

        // Reload: the check goes away; the dead backend's verdict is forgotten.
        let third = Arc::new(build(
            "u",
            &format!(
                "backends: [{{address: '{}'}}, {{address: '{dead}'}}]",
                live.addr
            ),
            &registry,
        ));
        *checker.upstreams.lock().unwrap() = vec![third.clone()];
        assert!(
            healthy(&third, 1),
            "without a check, active health does not count"
        );
        wait_for("verdict reset", 3, || second.backends[1].state.is_healthy()).await;
        let again = build("u", &checked, &registry);
        assert!(healthy(&again, 1), "a check added back starts healthy");
        checker.stop().await;
    }
}
