//! WebSocket tunnels owned by tollgate.
//!
//! After `edge` has read an upgrade request head, this module routes it with the same router,
//! split and header rules as the proxied path, connects to a backend (retrying connect failures
//! on another one), relays the handshake, then pumps bytes both ways with two small buffers.
//!
//! Owning the tunnel buys three things Pingora's tunnel lacks: an idle tunnel costs a few KB
//! instead of ~70 KB; the per-route idle timeout is ours (Pingora applies its 60 s read
//! timeout); and every tunnel is in a [`TunnelRegistry`] from which it can be closed cleanly:
//! at a frame boundary, with a close frame (1001 going away) to the client and to the upstream.
//!
//! A tunnel holds only what it needs after the handshake (its upstream's handle for the
//! in-flight count, its route's metric handles), never the config snapshot: reloads that edit
//! or remove its route do not touch it, and old snapshots are freed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::BufMut;
use pingora_core::protocols::Stream;
use pingora_http::{RequestHeader, ResponseHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{timeout, Instant};

use crate::config::HttpSettings;
use crate::forwarding::{self, Client};
use crate::gateway::Gateway;
use crate::observe::{access_log::now_rfc3339, AccessRecord, RouteMetrics};
use crate::policy::{auth, quota};
use crate::respond::{request_id, Reject};
use crate::router::{Action, HeaderEdits, RequestHead};
use crate::upstream::{Pick, SubsetId, Upstream};

/// Bytes buffered per direction. WebSocket chat frames are small; a large frame just takes
/// more reads. This is most of an idle tunnel's memory.
const TUNNEL_BUF: usize = 1024;
/// Largest upstream handshake response head.
const MAX_RESPONSE_HEAD: usize = 32 * 1024;
/// How long a closing tunnel waits for a frame boundary, then for the peers' close replies.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// How long one direction keeps flowing after the other side closed its half.
const HALF_CLOSE_LINGER: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Registry

/// One live tunnel, as the registry sees it.
pub struct TunnelHandle {
    pub id: u64,
    pub route: String,
    pub backend: SocketAddr,
    pub opened: SystemTime,
    close: Notify,
}

impl TunnelHandle {
    /// Asks the tunnel to close at the next frame boundary in each direction.
    pub fn close(&self) {
        self.close.notify_one();
    }
}

/// Every open tunnel of this process. Locked only when a tunnel opens or closes.
pub struct TunnelRegistry {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<TunnelHandle>>>,
    gauge: prometheus::IntGauge,
}

impl TunnelRegistry {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        Self {
            next_id: AtomicU64::new(1),
            open: Mutex::new(HashMap::new()),
            gauge,
        }
    }

    fn register(&self, route: &str, backend: SocketAddr) -> Registration<'_> {
        let handle = Arc::new(TunnelHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            route: route.to_string(),
            backend,
            opened: SystemTime::now(),
            close: Notify::new(),
        });
        self.lock().insert(handle.id, handle.clone());
        self.gauge.inc();
        Registration {
            registry: self,
            handle,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<TunnelHandle>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The open tunnels, oldest first.
    pub fn list(&self) -> Vec<Arc<TunnelHandle>> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by_key(|h| h.id);
        v
    }
}

/// Removes the tunnel from the registry however the tunnel ends.
struct Registration<'a> {
    registry: &'a TunnelRegistry,
    handle: Arc<TunnelHandle>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.handle.id);
        self.registry.gauge.dec();
    }
}

// ---------------------------------------------------------------------------------------------
// Planning: the routing and policy decisions, made on the request head alone.

pub enum Plan {
    Tunnel(Box<TunnelPlan>),
    /// Answer with this error (and request id) and close.
    Reject(Reject, String),
    /// Not a tunnel for us: let the HTTP path answer it (fixed response, redirect, 404 ...).
    Http,
}

pub struct TunnelPlan {
    /// The handshake as it goes to the upstream, serialized once.
    request_head: Vec<u8>,
    request_id: String,
    route: String,
    upstream: Arc<Upstream>,
    subset: SubsetId,
    hash: Option<u64>,
    idle_timeout: Duration,
    response_edits: HeaderEdits,
    http: HttpSettings,
    metrics: RouteMetrics,
    client: Client,
    host: String,
    path: String,
    started: Instant,
    /// Who opened the tunnel (routes with `auth`), for the access log.
    consumer: Option<String>,
    tenant: Option<String>,
    /// What screening found but let pass (detect mode, `log` rules, WAF matches).
    screened: Option<String>,
    /// The tenant's WebSocket slot: released when the tunnel ends, however it ends.
    _quota: Option<quota::Admission>,
}

/// What a refused handshake's access-log line says, filled in as `decide` learns it.
#[derive(Default)]
struct Seen {
    client_ip: Option<std::net::IpAddr>,
    host: String,
    path: String,
    route: String,
    screened: Option<String>,
}

/// Decides what to do with a WebSocket handshake. A refusal is logged like any request.
pub async fn plan(gateway: &Gateway, head: &[u8], client_stream: &Stream) -> Plan {
    let started = Instant::now();
    let mut seen = Seen::default();
    let plan = decide(gateway, head, client_stream, &mut seen).await;
    if let Plan::Reject(r, id) = &plan {
        gateway.access_log.log(&AccessRecord {
            time: now_rfc3339(),
            request_id: id,
            client_ip: seen.client_ip.map(|ip| ip.to_string()),
            host: &seen.host,
            method: "GET",
            path: &seen.path,
            route: &seen.route,
            upstream: "",
            backend: None,
            status: r.status(),
            bytes_sent: 0,
            bytes_received: 0,
            duration_ms: started.elapsed().as_secs_f64() * 1e3,
            upstream_ms: None,
            websocket: true,
            error: Some(r.code()),
            screened: seen.screened.as_deref(),
            consumer: None,
            tenant: None,
        });
    }
    plan
}

async fn decide(gateway: &Gateway, head: &[u8], client_stream: &Stream, seen: &mut Seen) -> Plan {
    let started = Instant::now();
    let Some(mut request) = build_request(head) else {
        return Plan::Reject(Reject::BadRequest, request_id(None));
    };
    let snap = gateway.current();
    auth::strip_identity_headers(&mut request, &snap.identity_headers);
    let client = Client {
        ip: client_stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip())),
        proto: if client_stream.get_ssl_digest().is_some() {
            "https"
        } else {
            "http"
        },
    };
    let rid = request_id(
        request
            .headers
            .get(forwarding::X_REQUEST_ID)
            .map(|v| v.as_bytes()),
    );
    let head_view = RequestHead::from_parts(&request);
    seen.client_ip = client.ip;
    seen.host = head_view.host.unwrap_or("").to_string();
    seen.path = request.uri.path().to_string();
    let Some(route) = snap.router.find(&head_view) else {
        return Plan::Http;
    };
    seen.route = route.name.clone();
    if !matches!(route.action, Action::Proxy { .. }) {
        return Plan::Http;
    }
    if !route.websocket.enabled {
        return Plan::Reject(Reject::WebSocketDisabled, rid);
    }
    let binding = &snap.bindings[route.index];
    let Some(upstream) = snap.upstream_of(route.index).cloned() else {
        return Plan::Http;
    };
    if upstream.is_tls() {
        // TLS to the backend: Pingora's own tunnel handles it (at its memory cost).
        return Plan::Http;
    }
    let real_ip = client
        .ip
        .map(|peer| snap.client_ip.client_ip(peer, &request.headers));
    seen.client_ip = real_ip;
    // Inspected before the upgrade: a refused handshake never reaches the upstream.
    let screening = gateway
        .screen_verified(&snap, route.index, real_ip, &request)
        .await;
    seen.screened = screening.found.clone();
    if let Some(r) = screening.refusal {
        return Plan::Reject(r, rid);
    }

    if let Some(r) = gateway.flood_check(&snap, real_ip, binding.flood_id) {
        return Plan::Reject(Reject::Quota(r), rid);
    }
    if let Some(route_waf) = snap.waf.as_deref().and_then(|w| w.route(route.index)) {
        let verdict =
            gateway.inspect_waf(&snap, route.index, route_waf, &request, real_ip, &rid, None);
        crate::gateway::add_found(&mut seen.screened, verdict.found);
        if let Some(r) = verdict.refusal {
            return Plan::Reject(r, rid);
        }
    }
    // The upgrade is authenticated like any request, before anything reaches the upstream.
    // A handshake has no body, so HMAC signatures here cover headers and query only.
    let identity = match &binding.auth {
        Some(policy) => {
            let tls = client_stream.get_ssl_digest();
            let cert = crate::tls::ClientCert::of(tls.as_deref());
            let outcome =
                match policy.authenticate(&request, None, cert, &snap.consumers, &gateway.nonces) {
                    Ok(identity) => gateway
                        .fleet_nonce_check(policy, &identity, &request)
                        .await
                        .map(|()| identity),
                    Err(f) => Err(f),
                };
            policy.record(&gateway.metrics.auth, &outcome);
            match outcome {
                Ok(identity) => Some(identity),
                Err(f) => return Plan::Reject(Reject::Auth(f), rid),
            }
        }
        None => None,
    };
    // The tenant's WebSocket cap (and request rate): the slot is held for the tunnel's life.
    let mut quota_tenant = None;
    let admission = match &binding.quota {
        Some(q) => {
            let (tenant, admitted) = gateway
                .admit_quota(&snap, q, &request, identity.as_ref(), real_ip, true)
                .await;
            quota_tenant = tenant;
            match admitted {
                Ok(a) => Some(a),
                Err(r) => return Plan::Reject(Reject::Quota(r), rid),
            }
        }
        None => None,
    };
    let target = route.split.choose(&head_view, client.ip);
    let subset = binding.subsets[target];
    let hash = upstream.hash_key(&request, client.ip);
    let (host, path) = (seen.host.clone(), seen.path.clone());
    if let Some(tags) = screening.tags {
        let _ = request.insert_header(crate::policy::rules::TAGS_HEADER, tags);
    }
    let (mut consumer, mut tenant) = (None, None);
    if let (Some(policy), Some(identity)) = (&binding.auth, &identity) {
        policy.apply(
            identity,
            &snap.consumers,
            &snap.identity_headers,
            &mut request,
        );
        consumer = identity
            .consumer
            .map(|c| snap.consumers.consumers[c].name.clone());
        tenant = identity.tenant.clone();
    }
    if quota_tenant.is_some() {
        tenant = quota_tenant;
    }

    if let Some(rw) = &route.rewrite {
        let new_path = rw.apply(request.uri.path()).into_owned();
        let uri = match request.uri.query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        match uri.parse::<http::Uri>() {
            Ok(u) => request.set_uri(u),
            Err(_) => return Plan::Reject(Reject::BadRequest, rid),
        }
    }
    forwarding::upstream_request(
        &mut request,
        client,
        &snap.http,
        &rid,
        &route.request_headers,
        true,
    );

    let mut request_head = Vec::with_capacity(512);
    write_request_head(&request, &mut request_head);
    Plan::Tunnel(Box::new(TunnelPlan {
        request_head,
        request_id: rid,
        route: route.name.clone(),
        upstream,
        subset,
        hash,
        idle_timeout: route.websocket.idle_timeout.get(),
        response_edits: route.response_headers.clone(),
        http: snap.http.clone(),
        metrics: binding.metrics.clone(),
        client,
        host,
        path,
        started,
        consumer,
        tenant,
        screened: seen.screened.take(),
        _quota: admission,
    }))
}

/// Parses a complete request head into Pingora's request type.
fn build_request(head: &[u8]) -> Option<RequestHeader> {
    let mut headers = [httparse::EMPTY_HEADER; crate::edge::MAX_HEADERS_CAP];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(head), Ok(httparse::Status::Complete(_))) {
        return None;
    }
    let mut out =
        RequestHeader::build(req.method?, req.path?.as_bytes(), Some(req.headers.len())).ok()?;
    for h in req.headers.iter() {
        out.append_header(h.name.to_string(), h.value).ok()?;
    }
    Some(out)
}

// ---------------------------------------------------------------------------------------------
// Running a tunnel

struct Outcome {
    status: u16,
    backend: Option<SocketAddr>,
    sent: u64,
    received: u64,
    upstream_ms: Option<f64>,
    error: Option<&'static str>,
}

/// Connects, relays the handshake and pumps the tunnel until it ends, then logs it.
/// `buf[head_len..]` holds bytes the client sent after its head.
pub async fn run(
    gateway: &Gateway,
    plan: Box<TunnelPlan>,
    mut client: Stream,
    buf: Vec<u8>,
    head_len: usize,
) {
    let mut plan = *plan;
    let early = buf[head_len..].to_vec();
    drop(buf);
    let mut outcome = Outcome {
        status: 0,
        backend: None,
        sent: 0,
        received: 0,
        upstream_ms: None,
        error: None,
    };
    // The handshake runs in its own future so that none of its buffers stay alive (and part of
    // this future's size) while the tunnel idles.
    if let Some(open) = handshake(&mut plan, &mut client, early, &mut outcome).await {
        let OpenTunnel {
            pick,
            mut upstream,
            mut c2s,
            mut s2c,
        } = open;
        let registration = gateway
            .tunnels
            .register(&plan.route, plan.upstream.backend_addr(pick.index));
        gateway
            .metrics
            .tunnels_total
            .with_label_values(&[&plan.route])
            .inc();
        let (up, down, end) = pump(
            &mut client,
            &mut upstream,
            plan.idle_timeout,
            &registration.handle,
            &mut c2s,
            &mut s2c,
        )
        .await;
        drop(registration);
        drop(pick);
        outcome.received += up;
        outcome.sent += down;
        outcome.error = end.as_error();
        tracing::debug!(route = %plan.route, ?end, "websocket tunnel ended");
    }
    let duration = plan.started.elapsed().as_secs_f64();
    plan.metrics.observe(outcome.status, duration);
    gateway.access_log.log(&AccessRecord {
        time: now_rfc3339(),
        request_id: &plan.request_id,
        client_ip: plan.client.ip.map(|ip| ip.to_string()),
        host: &plan.host,
        method: "GET",
        path: &plan.path,
        route: &plan.route,
        upstream: &plan.upstream.name,
        backend: outcome.backend.map(|b| b.to_string()),
        status: outcome.status,
        bytes_sent: outcome.sent,
        bytes_received: outcome.received,
        duration_ms: duration * 1e3,
        upstream_ms: outcome.upstream_ms,
        websocket: true,
        error: outcome.error,
        screened: plan.screened.as_deref(),
        consumer: plan.consumer.as_deref(),
        tenant: plan.tenant.as_deref(),
    });
}

/// What a successful handshake leaves for the pump.
struct OpenTunnel {
    pick: Pick,
    upstream: TcpStream,
    c2s: FrameCursor,
    s2c: FrameCursor,
}

/// Connects to a backend, relays the handshake, and answers the client. Returns the open
/// tunnel on a 101; otherwise the client has its answer and `outcome` says what happened.
async fn handshake(
    plan: &mut TunnelPlan,
    client: &mut Stream,
    early: Vec<u8>,
    outcome: &mut Outcome,
) -> Option<OpenTunnel> {
    let (pick, mut upstream) = match connect(plan).await {
        Ok(ok) => ok,
        Err(r) => return refuse(client, r, &plan.request_id, outcome).await,
    };
    outcome.backend = Some(plan.upstream.backend_addr(pick.index));
    let read_timeout = plan
        .upstream
        .timeouts(pick.index)
        .1
        .unwrap_or(Duration::from_secs(60));
    let t_upstream = Instant::now();

    // Request out (with any frames the client sent early), response head back.
    let mut head = std::mem::take(&mut plan.request_head);
    head.extend_from_slice(&early);
    if upstream.write_all(&head).await.is_err() {
        plan.upstream.report_connect_failure(pick.index);
        return refuse(
            client,
            Reject::UpstreamUnavailable,
            &plan.request_id,
            outcome,
        )
        .await;
    }
    drop(head);
    let (mut response, response_len, ubuf) =
        match timeout(read_timeout, read_response_head(&mut upstream)).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                plan.upstream.report_status(pick.index, 502);
                return refuse(
                    client,
                    Reject::UpstreamUnavailable,
                    &plan.request_id,
                    outcome,
                )
                .await;
            }
            Err(_) => {
                plan.upstream.report_status(pick.index, 504);
                return refuse(client, Reject::UpstreamTimeout, &plan.request_id, outcome).await;
            }
        };
    outcome.upstream_ms = Some(t_upstream.elapsed().as_secs_f64() * 1e3);
    let status = response.status.as_u16();
    outcome.status = status;
    plan.upstream.report_status(pick.index, status);
    forwarding::downstream_response(
        &mut response,
        &plan.http,
        &plan.request_id,
        &plan.response_edits,
    );

    let mut out = Vec::with_capacity(512);
    if status != 101 {
        // The backend refused the upgrade: relay its answer as a plain response and close.
        let _ = response.insert_header("connection", "close");
        write_response_head(&response, &mut out);
        out.extend_from_slice(&ubuf[response_len..]);
        if write_flush(client, &out).await.is_ok() {
            outcome.sent = out.len() as u64;
            let mut rest = [0u8; 1024];
            while let Ok(Ok(n)) = timeout(read_timeout, upstream.read(&mut rest)).await {
                if n == 0 || write_flush(client, &rest[..n]).await.is_err() {
                    break;
                }
                outcome.sent += n as u64;
            }
        }
        let _ = client.shutdown().await;
        return None;
    }

    // 101: the tunnel is open. Bytes the backend sent right after its 101 (pingora #946) go
    // out right behind the head.
    write_response_head(&response, &mut out);
    let early_frames = &ubuf[response_len..];
    out.extend_from_slice(early_frames);
    if write_flush(client, &out).await.is_err() {
        return None;
    }
    outcome.sent = out.len() as u64;
    outcome.received = early.len() as u64;
    let mut s2c = FrameCursor::default();
    s2c.feed(early_frames);
    let mut c2s = FrameCursor::default();
    c2s.feed(&early);
    Some(OpenTunnel {
        pick,
        upstream,
        c2s,
        s2c,
    })
}

/// Writes to the client and flushes: Pingora's stream buffers writes.
async fn write_flush(client: &mut Stream, data: &[u8]) -> std::io::Result<()> {
    client.write_all(data).await?;
    client.flush().await
}

/// Answers the handshake with a gateway error and closes.
async fn refuse<T>(
    client: &mut Stream,
    r: Reject,
    request_id: &str,
    outcome: &mut Outcome,
) -> Option<T> {
    let _ = write_flush(client, &r.raw_response(request_id)).await;
    let _ = client.shutdown().await;
    outcome.status = r.status();
    outcome.error = Some(r.code());
    None
}

/// Picks a backend and connects, trying another one after a connect failure.
async fn connect(plan: &TunnelPlan) -> Result<(Pick, TcpStream), Reject> {
    let mut tried: Vec<usize> = Vec::new();
    let attempts = plan.upstream.retries() + 1;
    for _ in 0..attempts {
        let Some(pick) = plan.upstream.select(plan.subset, plan.hash, &tried) else {
            return Err(if tried.is_empty() {
                Reject::NoHealthyBackend
            } else {
                Reject::UpstreamUnavailable
            });
        };
        let addr = plan.upstream.backend_addr(pick.index);
        let connect_timeout = plan
            .upstream
            .timeouts(pick.index)
            .0
            .unwrap_or(Duration::from_secs(5));
        match timeout(connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok((pick, s));
            }
            _ => {
                plan.upstream.report_connect_failure(pick.index);
                tried.push(pick.index);
            }
        }
    }
    Err(Reject::UpstreamUnavailable)
}

/// Reads the upstream's response head. Returns it, its length and the buffer (which may hold
/// tunnel bytes after the head).
async fn read_response_head(upstream: &mut TcpStream) -> Option<(ResponseHeader, usize, Vec<u8>)> {
    let mut buf = Vec::with_capacity(TUNNEL_BUF);
    loop {
        if buf.len() >= MAX_RESPONSE_HEAD {
            return None;
        }
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(buf.capacity());
        }
        let n = upstream.read_buf(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        match parse_response(&buf) {
            Some(Some((resp, len))) => return Some((resp, len, buf)),
            Some(None) => continue,
            None => return None,
        }
    }
}

/// `None`: invalid; `Some(None)`: incomplete.
fn parse_response(buf: &[u8]) -> Option<Option<(ResponseHeader, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let mut out = ResponseHeader::build(resp.code?, Some(resp.headers.len())).ok()?;
            for h in resp.headers.iter() {
                out.append_header(h.name.to_string(), h.value).ok()?;
            }
            Some(Some((out, len)))
        }
        Ok(httparse::Status::Partial) => Some(None),
        Err(_) => None,
    }
}

fn write_request_head(req: &RequestHeader, out: &mut Vec<u8>) {
    out.put_slice(req.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(
        req.uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .as_bytes(),
    );
    out.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in req.headers.iter() {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
}

fn write_response_head(resp: &ResponseHeader, out: &mut Vec<u8>) {
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(resp.status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(resp.status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    for (name, value) in resp.headers.iter() {
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
}

// ---------------------------------------------------------------------------------------------
// The pump

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Both sides closed (normally after a WebSocket close handshake).
    Done,
    Idle,
    /// Closed on request (registry), with close frames sent.
    ClosedByGateway,
    Error,
}

impl End {
    fn as_error(self) -> Option<&'static str> {
        match self {
            End::Done => None,
            End::Idle => Some("idle_timeout"),
            End::ClosedByGateway => Some("closed_by_gateway"),
            End::Error => Some("io_error"),
        }
    }
}

/// Close frame "1001 going away", server → client (unmasked).
const CLOSE_TO_CLIENT: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];

/// Close frame "1001 going away", client → server (masked, as RFC 6455 requires).
fn close_to_upstream() -> [u8; 8] {
    let mask = fastrand::u32(..).to_be_bytes();
    [
        0x88,
        0x82,
        mask[0],
        mask[1],
        mask[2],
        mask[3],
        0x03 ^ mask[0],
        0xE9 ^ mask[1],
    ]
}

async fn pump(
    client: &mut Stream,
    upstream: &mut TcpStream,
    idle: Duration,
    handle: &TunnelHandle,
    c2s: &mut FrameCursor,
    s2c: &mut FrameCursor,
) -> (u64, u64, End) {
    let mut cbuf = vec![0u8; TUNNEL_BUF];
    let mut ubuf = vec![0u8; TUNNEL_BUF];
    let (mut up, mut down) = (0u64, 0u64);
    let mut client_eof = false;
    let mut upstream_eof = false;
    let mut closing: Option<Instant> = None;
    let mut sent_client_close = false;
    let mut sent_upstream_close = false;
    let idle_sleep = tokio::time::sleep(idle);
    tokio::pin!(idle_sleep);

    let end = loop {
        if client_eof && upstream_eof {
            break End::Done;
        }
        if let Some(since) = closing {
            // Close each direction at its next frame boundary.
            if !sent_client_close && s2c.at_boundary() {
                sent_client_close = true;
                let _ = write_flush(client, &CLOSE_TO_CLIENT).await;
            }
            if !sent_upstream_close && c2s.at_boundary() {
                sent_upstream_close = true;
                let _ = upstream.write_all(&close_to_upstream()).await;
            }
            if sent_client_close && sent_upstream_close {
                // Give the peers a moment to answer, then let go.
                let _ = timeout(CLOSE_GRACE, await_close_replies(client, upstream)).await;
                let _ = client.shutdown().await;
                break End::ClosedByGateway;
            }
            if since.elapsed() > CLOSE_GRACE {
                break End::ClosedByGateway;
            }
        }
        let linger = if client_eof || upstream_eof {
            HALF_CLOSE_LINGER.min(idle)
        } else {
            idle
        };
        tokio::select! {
            _ = handle.close.notified(), if closing.is_none() => {
                closing = Some(Instant::now());
            }
            r = client.read(&mut cbuf), if !client_eof => match r {
                Ok(0) => {
                    client_eof = true;
                    let _ = upstream.shutdown().await;
                }
                Ok(n) => {
                    idle_sleep.as_mut().reset(Instant::now() + linger);
                    up += n as u64;
                    if sent_upstream_close {
                        continue; // after our close frame nothing else may follow
                    }
                    c2s.feed(&cbuf[..n]);
                    if upstream.write_all(&cbuf[..n]).await.is_err() {
                        break End::Error;
                    }
                }
                Err(_) => break End::Error,
            },
            r = upstream.read(&mut ubuf), if !upstream_eof => match r {
                Ok(0) => {
                    upstream_eof = true;
                    let _ = client.shutdown().await;
                }
                Ok(n) => {
                    idle_sleep.as_mut().reset(Instant::now() + linger);
                    down += n as u64;
                    if sent_client_close {
                        continue;
                    }
                    s2c.feed(&ubuf[..n]);
                    if write_flush(client, &ubuf[..n]).await.is_err() {
                        break End::Error;
                    }
                }
                Err(_) => break End::Error,
            },
            _ = &mut idle_sleep => break End::Idle,
        }
    };
    (up, down, end)
}

/// After our close frames: waits for each side's answer (its close frame, or its close of the
/// connection), discarding it. As the server side towards the client, we then close the TCP
/// connection ourselves (RFC 6455 §7.1.1) rather than wait for the client to.
async fn await_close_replies(client: &mut Stream, upstream: &mut TcpStream) {
    let (mut cbuf, mut ubuf) = ([0u8; 256], [0u8; 256]);
    let (mut c_done, mut u_done) = (false, false);
    while !(c_done && u_done) {
        tokio::select! {
            _ = client.read(&mut cbuf), if !c_done => c_done = true,
            _ = upstream.read(&mut ubuf), if !u_done => u_done = true,
        }
    }
}

/// Follows WebSocket frame boundaries in a byte stream without buffering it: only the frame
/// header (at most 14 bytes) is kept while it is incomplete.
#[derive(Debug, Default)]
pub struct FrameCursor {
    header: [u8; 14],
    have: usize,
    /// Payload bytes left in the current frame.
    payload_left: u64,
}

impl FrameCursor {
    /// True between frames (a close frame may be inserted here).
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let take = (self.payload_left.min(data.len() as u64)) as usize;
                self.payload_left -= take as u64;
                data = &data[take..];
                continue;
            }
            self.header[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            if let Some((header_len, payload)) = self.header_complete() {
                debug_assert_eq!(header_len, self.have);
                self.have = 0;
                self.payload_left = payload;
            }
        }
    }

    /// When the buffered header is complete: its length and the payload length.
    fn header_complete(&self) -> Option<(usize, u64)> {
        if self.have < 2 {
            return None;
        }
        let masked = self.header[1] & 0x80 != 0;
        let len7 = self.header[1] & 0x7f;
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let total = 2 + ext + if masked { 4 } else { 0 };
        if self.have < total {
            return None;
        }
        let payload = match len7 {
            126 => u16::from_be_bytes([self.header[2], self.header[3]]) as u64,
            127 => u64::from_be_bytes(self.header[2..10].try_into().expect("8 bytes")),
            n => n as u64,
        };
        Some((total, payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(masked: bool, payload_len: usize) -> Vec<u8> {
        let mut f = vec![0x82];
        let m = if masked { 0x80 } else { 0 };
        if payload_len < 126 {
            f.push(m | payload_len as u8);
        } else if payload_len <= 0xffff {
            f.push(m | 126);
            f.extend_from_slice(&(payload_len as u16).to_be_bytes());
        } else {
            f.push(m | 127);
            f.extend_from_slice(&(payload_len as u64).to_be_bytes());
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(7u8, payload_len));
        f
    }

    #[test]
    fn frame_cursor_tracks_boundaries_across_reads() {
        for (masked, len) in [
            (false, 0),
            (true, 5),
            (false, 125),
            (true, 126),
            (false, 70_000),
        ] {
            let f = frame(masked, len);
            // Every split point of two frames back to back.
            let mut two = f.clone();
            two.extend_from_slice(&f);
            for cut in [1, 2, 3, f.len() - 1, f.len(), f.len() + 1] {
                let mut c = FrameCursor::default();
                c.feed(&two[..cut.min(two.len())]);
                assert_eq!(
                    c.at_boundary(),
                    cut == f.len(),
                    "masked={masked} len={len} cut={cut}"
                );
                c.feed(&two[cut.min(two.len())..]);
                assert!(c.at_boundary());
            }
        }
    }

    #[test]
    fn close_frames_say_going_away() {
        assert_eq!(&CLOSE_TO_CLIENT[2..], &1001u16.to_be_bytes());
        let m = close_to_upstream();
        assert_eq!(m[1], 0x82);
        assert_eq!([m[6] ^ m[2], m[7] ^ m[3]], 1001u16.to_be_bytes());
    }

    #[test]
    fn handshake_heads_round_trip() {
        let req = build_request(b"GET /ws?a=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        write_request_head(&req, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("GET /ws?a=1 HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("upgrade: websocket\r\n"), "{text}");
        let (resp, len) = parse_response(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x00",
        )
        .unwrap()
        .unwrap();
        assert_eq!(resp.status.as_u16(), 101);
        assert_eq!(len, 56);
    }
}
