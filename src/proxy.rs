//! The `ProxyHttp` glue: thin, each phase calls one module, in this order per request:
//!
//! 1. `request_filter`: load the snapshot (one atomic load, kept for the whole request), set the
//!    request id, route (`router`), then answer fixed responses, redirects and errors (no route,
//!    body too large) directly, or pick the backend subset for a proxy route (`Split::choose`).
//! 2. `upstream_peer`: pick a backend (`Upstream::select`), skipping ones already tried.
//! 3. `fail_to_connect`: passive health, and a retry on another backend for idempotent requests.
//! 4. `upstream_request_filter`: path rewrite, header hygiene and edits (`forwarding`).
//! 5. `request_body_filter`: the route's body cap for bodies without `Content-Length`.
//! 6. `upstream_response_filter` / `response_filter`: passive health, response header edits.
//! 7. `fail_to_proxy`: every gateway error as the same short JSON body (`respond`).
//! 8. `logging`: metrics and the access log.
//!
//! WebSocket upgrades never get here unless their upstream uses TLS (see `tunnel`).

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::protocols::http::HttpTask;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::ResponseHeader;
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::forwarding::{self, Client, X_REQUEST_ID};
use crate::gateway::Gateway;
use crate::observe::{access_log::now_rfc3339, AccessRecord};
use crate::policy::auth::{self, Identity, RoutePolicy};
use crate::policy::quota::{self, limiter::now_ns, Admission};
use crate::respond::{request_id, Reject};
use crate::router::{Action, RequestHead};
use crate::snapshot::Snapshot;
use crate::upstream::{Pick, SubsetId};

pub struct Proxy {
    pub gateway: Arc<Gateway>,
}

/// Per-request state.
pub struct Ctx {
    started: Instant,
    snap: Option<Arc<Snapshot>>,
    route: Option<usize>,
    request_id: String,
    client: Client,
    subset: Option<SubsetId>,
    hash: Option<u64>,
    /// Holds the backend's in-flight slot until the request ends.
    pick: Option<Pick>,
    backend: Option<usize>,
    tried: Vec<usize>,
    reject: Option<Reject>,
    max_body: u64,
    body_seen: u64,
    upstream_started: Option<Instant>,
    upstream_done: Option<Instant>,
    identity: Option<Identity>,
    /// The quota admission (slot held until the request ends) and whether to send headers.
    quota: Option<(Admission, bool)>,
    quota_tenant: Option<String>,
    /// The client's address: the peer, or from trusted proxies' `X-Forwarded-For`.
    real_ip: Option<std::net::IpAddr>,
    /// Index into `snap.listeners` of the listener the request came in on.
    listener: Option<usize>,
    /// What screening found (`bot:sqlmap`, `rule:x`, `waf:942100`), blocked or only detected.
    screened: Option<String>,
    /// The request body when the WAF or the auth policy read it (replayed to the upstream).
    body: Option<Vec<u8>>,
}

impl Ctx {
    /// `Strict-Transport-Security` of the listener, if it sets one.
    fn hsts(&self) -> Option<&http::HeaderValue> {
        let snap = self.snap.as_ref()?;
        snap.listeners.get(self.listener?)?.hsts.as_ref()
    }
}

fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn declared_length(session: &Session) -> Option<u64> {
    session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
}

/// Reads the whole request body (at most `max` bytes) into Pingora's retry buffer, which
/// replays it to the upstream: the WAF and body-signing auth inspect it before any of it leaves.
async fn read_body(session: &mut Session, max: u64) -> std::result::Result<Vec<u8>, Reject> {
    session.enable_retry_buffering();
    let mut buf = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if (buf.len() + chunk.len()) as u64 > max {
                    return Err(Reject::BodyTooLarge);
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf),
            Err(e) => return Err(classify(&e)),
        }
    }
}

impl Proxy {
    /// The WAF on route `index`: reads the body first when there is one (up to
    /// `waf.body_limit`; a larger declared body is refused, or streamed uninspected with
    /// `body_limit_action: skip`).
    async fn inspect_waf(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        snap: &Snapshot,
        index: usize,
    ) -> std::result::Result<(), Reject> {
        let Some(waf) = snap.waf.as_deref() else {
            return Ok(());
        };
        let Some(route_waf) = waf.route(snap.router.routes()[index].index) else {
            return Ok(());
        };
        let declared = declared_length(session);
        // HTTP/2 bodies often come without Content-Length: ask the session, not the headers.
        let has_body = !session.is_body_empty();
        // gRPC bodies are framed protobuf and often open-ended streams: reading one whole
        // before proxying would stall a streaming call, so gRPC gets its head inspected only.
        let streaming = crate::respond::is_grpc(&session.req_header().headers);
        if has_body && ctx.body.is_none() && !session.is_upgrade_req() && !streaming {
            let max = waf.body_limit().min(ctx.max_body);
            match declared {
                Some(n) if n > max && n <= ctx.max_body && waf.skips_large_bodies() => {}
                Some(n) if n > max => return Err(Reject::BodyTooLarge),
                _ => ctx.body = Some(read_body(session, max).await?),
            }
        }
        let verdict = self.gateway.inspect_waf(
            snap,
            index,
            route_waf,
            session.req_header(),
            ctx.real_ip,
            &ctx.request_id,
            ctx.body.as_deref(),
        );
        crate::gateway::add_found(&mut ctx.screened, verdict.found);
        match verdict.refusal {
            Some(r) => Err(r),
            None => Ok(()),
        }
    }

    /// Custom rules with a `body` condition: the body is read (up to 64 KiB, or the route's
    /// `max_body` if smaller; a larger declared body is not read, and those rules do not match).
    async fn body_rules(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        snap: &Snapshot,
        index: usize,
    ) -> std::result::Result<(), Reject> {
        if !snap.bindings[index].rules
            || !snap.rules.needs_body()
            || session.is_upgrade_req()
            || crate::respond::is_grpc(&session.req_header().headers)
        {
            return Ok(());
        }
        let max = crate::waf::MAX_BODY_LIMIT.min(ctx.max_body);
        let too_large = declared_length(session).is_some_and(|n| n > max);
        if ctx.body.is_none() && !session.is_body_empty() && !too_large {
            ctx.body = Some(read_body(session, max).await?);
        }
        let Some(body) = ctx.body.as_deref() else {
            return Ok(());
        };
        let s = self
            .gateway
            .screen_body(snap, index, ctx.real_ip, session.req_header(), body);
        crate::gateway::add_found(&mut ctx.screened, s.found);
        if let Some(r) = s.refusal {
            return Err(r);
        }
        if let Some(tags) = s.tags {
            let req = session.req_header_mut();
            let all = match req.headers.get(crate::policy::rules::TAGS_HEADER) {
                Some(prev) => format!("{}, {tags}", String::from_utf8_lossy(prev.as_bytes())),
                None => tags,
            };
            let _ = req.insert_header(crate::policy::rules::TAGS_HEADER, all);
        }
        Ok(())
    }

    /// Runs the route's auth policy; the identity goes into `ctx`. Reads the request body
    /// first when the policy needs it (HMAC-signed forms, Content-MD5): it is kept in Pingora's
    /// retry buffer, which replays it to the upstream, hence the 64 KiB cap.
    async fn authenticate(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        snap: &Snapshot,
        policy: &RoutePolicy,
    ) -> std::result::Result<(), Reject> {
        if ctx.body.is_none() && policy.needs_body(session.req_header()) {
            if let Err(f) = policy.precheck(session.req_header()) {
                policy.record(&self.gateway.metrics.auth, &Err(f));
                return Err(Reject::Auth(f));
            }
            let max = policy.max_body().min(ctx.max_body);
            if declared_length(session).is_some_and(|n| n > max) {
                return Err(Reject::BodyTooLarge);
            }
            ctx.body = Some(read_body(session, max).await?);
        }
        let body = ctx.body.as_deref();
        let tls = session.digest().and_then(|d| d.ssl_digest.clone());
        let outcome = policy.authenticate(
            session.req_header(),
            body,
            crate::tls::ClientCert::of(tls.as_deref()),
            &snap.consumers,
            &self.gateway.nonces,
        );
        let outcome = match outcome {
            Ok(identity) => self
                .gateway
                .fleet_nonce_check(policy, &identity, session.req_header())
                .await
                .map(|()| identity),
            Err(f) => Err(f),
        };
        policy.record(&self.gateway.metrics.auth, &outcome);
        match outcome {
            Ok(identity) => {
                ctx.identity = Some(identity);
                Ok(())
            }
            Err(f) => Err(Reject::Auth(f)),
        }
    }

    /// Writes a gateway error as JSON. Used before proxying starts.
    async fn reject(&self, session: &mut Session, ctx: &mut Ctx, r: Reject) -> Result<bool> {
        ctx.reject = Some(r);
        let grpc = crate::respond::is_grpc(&session.req_header().headers);
        if let (Reject::Forbidden(crate::snapshot::CHALLENGE_REQUIRED), Some(snap), false) =
            (r, &ctx.snap, grpc)
        {
            let page = snap.challenge_page(
                ctx.real_ip,
                &session.req_header().headers,
                ctx.client.proto == "https",
            );
            write_page(session, r.status(), page.into_bytes(), &ctx.request_id).await;
            return Ok(true);
        }
        let html = matches!(r, Reject::Forbidden(_))
            && matches!((&ctx.snap, ctx.route), (Some(s), Some(i)) if s.bindings[i].block_page_html);
        if html && !grpc {
            write_html_error(session, r, &ctx.request_id).await;
        } else {
            write_json_error(session, r, &ctx.request_id).await;
        }
        Ok(true)
    }
}

async fn write_json_error(session: &mut Session, r: Reject, request_id: &str) {
    if crate::respond::is_grpc(&session.req_header().headers) {
        return write_grpc_error(session, r, request_id).await;
    }
    let body = Bytes::from(r.body(request_id));
    let Ok(mut resp) = ResponseHeader::build(r.status(), Some(4)) else {
        return;
    };
    let _ = resp.insert_header("content-type", "application/json");
    let _ = resp.insert_header("content-length", body.len());
    let _ = resp.insert_header(X_REQUEST_ID, request_id);
    if let Some(c) = r.challenge() {
        let _ = resp.insert_header(http::header::WWW_AUTHENTICATE, c);
    }
    if let Reject::Quota(q) = r {
        for (k, v) in q.headers() {
            let _ = resp.insert_header(k, v);
        }
    }
    if matches!(
        r,
        Reject::BodyTooLarge | Reject::BadRequest | Reject::BodyTimeout
    ) {
        // The rest of the body was not read: the connection cannot be reused.
        session.set_keepalive(None);
    }
    if session
        .write_response_header(Box::new(resp), false)
        .await
        .is_ok()
    {
        let _ = session.write_response_body(Some(body), true).await;
    }
}

/// A screening refusal as a small HTML page (`routes[].block_page: html`).
async fn write_html_error(session: &mut Session, r: Reject, request_id: &str) {
    write_page(session, r.status(), r.html_body(request_id), request_id).await;
}

/// An HTML page of the gateway's own (never cached).
async fn write_page(session: &mut Session, status: u16, page: Vec<u8>, request_id: &str) {
    let body = Bytes::from(page);
    let Ok(mut resp) = ResponseHeader::build(status, Some(4)) else {
        return;
    };
    let _ = resp.insert_header("content-type", "text/html; charset=utf-8");
    let _ = resp.insert_header("content-length", body.len());
    let _ = resp.insert_header("cache-control", "no-store");
    let _ = resp.insert_header(X_REQUEST_ID, request_id);
    if session
        .write_response_header(Box::new(resp), false)
        .await
        .is_ok()
    {
        let _ = session.write_response_body(Some(body), true).await;
    }
}

/// A gateway refusal as a gRPC "trailers-only" response: HTTP 200 whose only header block
/// carries `grpc-status` and `grpc-message`, as gRPC servers send errors.
async fn write_grpc_error(session: &mut Session, r: Reject, request_id: &str) {
    let Ok(mut resp) = ResponseHeader::build(200, Some(5)) else {
        return;
    };
    let _ = resp.insert_header("content-type", "application/grpc");
    let _ = resp.insert_header(
        "grpc-status",
        crate::respond::grpc_status(r.status()).to_string(),
    );
    // A message of our own words: printable ASCII, nothing to percent-encode.
    let _ = resp.insert_header("grpc-message", r.message());
    let _ = resp.insert_header(X_REQUEST_ID, request_id);
    if let Reject::Quota(q) = r {
        for (k, v) in q.headers() {
            let _ = resp.insert_header(k, v);
        }
    }
    // As one task with end-of-stream: Pingora 0.9's `write_response_header(.., true)` leaves
    // the h2 stream open and ends it with an empty DATA frame, which gRPC clients do not read
    // as trailers-only (they report UNKNOWN instead of our status).
    let _ = session
        .write_response_tasks(vec![HttpTask::Header(Box::new(resp), true)])
        .await;
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Instant::now(),
            snap: None,
            route: None,
            request_id: String::new(),
            client: Client {
                ip: None,
                proto: "http",
            },
            subset: None,
            hash: None,
            pick: None,
            backend: None,
            tried: Vec::new(),
            reject: None,
            max_body: u64::MAX,
            body_seen: 0,
            upstream_started: None,
            upstream_done: None,
            identity: None,
            quota: None,
            quota_tenant: None,
            real_ip: None,
            listener: None,
            screened: None,
            body: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let snap = self.gateway.current();
        ctx.request_id = request_id(
            session
                .req_header()
                .headers
                .get(X_REQUEST_ID)
                .map(|v| v.as_bytes()),
        );
        ctx.client = Client {
            ip: session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip()),
            proto: if session
                .digest()
                .and_then(|d| d.ssl_digest.as_ref())
                .is_some()
            {
                "https"
            } else {
                "http"
            },
        };
        session.set_read_timeout(Some(snap.http.client_body_timeout.get()));
        ctx.snap = Some(snap.clone());
        ctx.listener = crate::tls::listener_for(&snap.listeners, || {
            session.server_addr().and_then(|a| a.as_inet()).copied()
        });
        if let Some(redirect) = ctx
            .listener
            .and_then(|i| snap.listeners[i].redirect_https.as_ref())
        {
            let req = session.req_header();
            let head = RequestHead::from_parts(req);
            let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
            if let Some(location) = redirect.location(head.host.unwrap_or(""), target) {
                let mut resp = ResponseHeader::build(redirect.status, Some(3))?;
                resp.insert_header("location", location)?;
                resp.insert_header("content-length", 0)?;
                resp.insert_header(X_REQUEST_ID, ctx.request_id.as_str())?;
                session.write_response_header(Box::new(resp), true).await?;
                return Ok(true);
            }
        }

        // A client can never claim an identity: the headers the gateway sets go first.
        auth::strip_identity_headers(session.req_header_mut(), &snap.identity_headers);
        let found = snap
            .router
            .find(&RequestHead::from_parts(session.req_header()))
            .map(|r| r.index);
        let Some(index) = found else {
            return self.reject(session, ctx, Reject::NoRoute).await;
        };
        let route = &snap.router.routes()[index];
        ctx.route = Some(index);
        ctx.max_body = route.max_body;
        ctx.real_ip = ctx.client.ip.map(|peer| {
            snap.client_ip
                .client_ip(peer, &session.req_header().headers)
        });
        let screening = self
            .gateway
            .screen_verified(&snap, index, ctx.real_ip, session.req_header())
            .await;
        ctx.screened = screening.found;
        if let Some(r) = screening.refusal {
            return self.reject(session, ctx, r).await;
        }
        if let Some(tags) = screening.tags {
            session
                .req_header_mut()
                .insert_header(crate::policy::rules::TAGS_HEADER, tags)?;
        }
        let flood_id = snap.bindings[index].flood_id;
        if let Some(r) = self.gateway.flood_check(&snap, ctx.real_ip, flood_id) {
            return self.reject(session, ctx, Reject::Quota(r)).await;
        }
        if let Err(r) = self.inspect_waf(session, ctx, &snap, index).await {
            return self.reject(session, ctx, r).await;
        }
        if let Err(r) = self.body_rules(session, ctx, &snap, index).await {
            return self.reject(session, ctx, r).await;
        }
        if let Some(policy) = &snap.bindings[index].auth {
            if let Err(r) = self.authenticate(session, ctx, &snap, policy).await {
                return self.reject(session, ctx, r).await;
            }
        }
        if let Some(policy) = &snap.bindings[index].quota {
            let (tenant, admitted) = self
                .gateway
                .admit_quota(
                    &snap,
                    policy,
                    session.req_header(),
                    ctx.identity.as_ref(),
                    ctx.real_ip,
                    session.is_upgrade_req(),
                )
                .await;
            ctx.quota_tenant = tenant;
            match admitted {
                // The slot is held by `ctx` until the request ends, however it ends.
                Ok(admission) => ctx.quota = Some((admission, policy.headers)),
                Err(r) => return self.reject(session, ctx, Reject::Quota(r)).await,
            }
        }

        let req = session.req_header();
        let head = RequestHead::from_parts(req);

        let response = match &route.action {
            Action::Proxy { .. } => {
                if session.is_upgrade_req() && !route.websocket.enabled {
                    return self.reject(session, ctx, Reject::WebSocketDisabled).await;
                }
                if declared_length(session).is_some_and(|n| n > route.max_body) {
                    return self.reject(session, ctx, Reject::BodyTooLarge).await;
                }
                let target = route.split.choose(&head, ctx.client.ip);
                ctx.subset = Some(snap.bindings[route.index].subsets[target]);
                ctx.hash = snap
                    .upstream_of(route.index)
                    .and_then(|u| u.hash_key(req, ctx.client.ip));
                if let (Some(policy), Some(identity)) = (&snap.bindings[index].auth, &ctx.identity)
                {
                    policy.apply(
                        identity,
                        &snap.consumers,
                        &snap.identity_headers,
                        session.req_header_mut(),
                    );
                }
                return Ok(false);
            }
            Action::Respond {
                status,
                body,
                headers,
            } => {
                let mut resp = ResponseHeader::build(*status, Some(headers.len() + 2))?;
                for (k, v) in headers {
                    resp.append_header(k.clone(), v.clone())?;
                }
                resp.insert_header("content-length", body.len())?;
                (resp, body.clone())
            }
            Action::Redirect { status, location } => {
                let mut resp = ResponseHeader::build(*status, Some(3))?;
                resp.insert_header("location", location.render(head.path, head.query))?;
                resp.insert_header("content-length", 0)?;
                (resp, Bytes::new())
            }
        };
        let (mut resp, body) = response;
        forwarding::downstream_response(
            &mut resp,
            &snap.http,
            &ctx.request_id,
            &route.response_headers,
        );
        if let Some(hsts) = ctx.hsts() {
            resp.insert_header(http::header::STRICT_TRANSPORT_SECURITY, hsts.clone())?;
        }
        let head_only = body.is_empty();
        session
            .write_response_header(Box::new(resp), head_only)
            .await?;
        if !head_only {
            session.write_response_body(Some(body), true).await?;
        }
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let (Some(snap), Some(route), Some(subset)) = (&ctx.snap, ctx.route, ctx.subset) else {
            ctx.reject = Some(Reject::Internal);
            return Err(Error::explain(ErrorType::InternalError, "no route bound"));
        };
        let upstream = snap
            .upstream_of(route)
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "route has no upstream"))?;
        match upstream.select(subset, ctx.hash, &ctx.tried) {
            Some(pick) => {
                ctx.backend = Some(pick.index);
                let peer = upstream.peer(pick.index);
                ctx.pick = Some(pick);
                ctx.upstream_started = Some(Instant::now());
                Ok(peer)
            }
            None => {
                let r = if ctx.tried.is_empty() {
                    Reject::NoHealthyBackend
                } else {
                    Reject::UpstreamUnavailable
                };
                ctx.reject = Some(r);
                Err(Error::explain(
                    ErrorType::HTTPStatus(r.status()),
                    r.message(),
                ))
            }
        }
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let (Some(snap), Some(route), Some(i)) = (&ctx.snap, ctx.route, ctx.backend) {
            if let Some(upstream) = snap.upstream_of(route) {
                upstream.report_connect_failure(i);
                ctx.tried.push(i);
                ctx.pick = None;
                if ctx.tried.len() <= upstream.retries() && idempotent(&session.req_header().method)
                {
                    e.set_retry(true);
                }
            }
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut pingora_http::RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let (Some(snap), Some(route)) = (&ctx.snap, ctx.route) else {
            return Ok(());
        };
        let route = &snap.router.routes()[route];
        if let Some(rw) = &route.rewrite {
            let new_path = rw.apply(upstream_request.uri.path());
            if new_path != upstream_request.uri.path() {
                let uri = match upstream_request.uri.query() {
                    Some(q) => format!("{new_path}?{q}"),
                    None => new_path.into_owned(),
                };
                let uri = uri.parse::<http::Uri>().map_err(|e| {
                    Error::because(
                        ErrorType::InternalError,
                        "rewritten path is not a valid URI",
                        e,
                    )
                })?;
                upstream_request.set_uri(uri);
            }
        }
        forwarding::upstream_request(
            upstream_request,
            ctx.client,
            &snap.http,
            &ctx.request_id,
            &route.request_headers,
            forwarding::is_websocket(session.req_header()),
        );
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let (
            Some(b),
            Some((
                Admission {
                    body: Some(g),
                    counters,
                    ..
                },
                _,
            )),
        ) = (&body, &ctx.quota)
        {
            // Bandwidth quota: hold the body back rather than refuse it.
            let wait = counters.body_delay(*g, b.len() as u64, now_ns());
            if !wait.is_zero() {
                tokio::time::sleep(wait.min(std::time::Duration::from_secs(30))).await;
            }
        }
        if let Some(b) = body {
            ctx.body_seen += b.len() as u64;
            if ctx.body_seen > ctx.max_body {
                ctx.reject = Some(Reject::BodyTooLarge);
                return Err(Error::explain(
                    ErrorType::HTTPStatus(413),
                    "request body too large",
                ));
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream_done = Some(Instant::now());
        if let (Some(snap), Some(route), Some(i)) = (&ctx.snap, ctx.route, ctx.backend) {
            if let Some(u) = snap.upstream_of(route) {
                u.report_status(i, upstream_response.status.as_u16());
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let (Some(snap), Some(route)) = (&ctx.snap, ctx.route) {
            let edits = &snap.router.routes()[route].response_headers;
            forwarding::downstream_response(upstream_response, &snap.http, &ctx.request_id, edits);
        }
        if let Some(hsts) = ctx.hsts() {
            upstream_response
                .insert_header(http::header::STRICT_TRANSPORT_SECURITY, hsts.clone())?;
        }
        if let Some((
            Admission {
                remaining: Some(r), ..
            },
            true,
        )) = &ctx.quota
        {
            for (k, v) in quota::headers(r) {
                upstream_response.insert_header(k, v)?;
            }
        }
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let r = ctx.reject.unwrap_or_else(|| classify(e));
        ctx.reject = Some(r);
        let dead_downstream = e.esource() == &ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
            );
        let code = if dead_downstream || session.response_written().is_some() {
            0
        } else {
            write_json_error(session, r, &ctx.request_id).await;
            r.status()
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, _error: &Error) -> bool {
        // Rejections we chose (no backend, body too large) are logged in the access log.
        ctx.reject.is_some()
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        ctx.pick = None;
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let duration = ctx.started.elapsed().as_secs_f64();
        let Some(snap) = &ctx.snap else {
            return;
        };
        let route = ctx.route.map(|i| &snap.router.routes()[i]);
        match ctx.route {
            Some(i) => snap.bindings[i].metrics.observe(status, duration),
            None => snap.unrouted.observe(status, duration),
        }
        if !self.gateway.access_log.enabled() {
            return;
        }
        let req = session.req_header();
        let upstream = ctx.route.and_then(|i| snap.upstream_of(i));
        let error = ctx
            .reject
            .map(|r| r.code())
            .or_else(|| e.map(|_| "proxy_error"));
        self.gateway.access_log.log(&AccessRecord {
            time: now_rfc3339(),
            request_id: &ctx.request_id,
            client_ip: ctx.client.ip.map(|ip| ip.to_string()),
            host: RequestHead::from_parts(req).host.unwrap_or(""),
            method: req.method.as_str(),
            path: req.uri.path(),
            route: route.map_or("", |r| r.name.as_str()),
            upstream: upstream.map_or("", |u| u.name.as_str()),
            backend: match (upstream, ctx.backend) {
                (Some(u), Some(i)) => Some(u.backend_addr(i).to_string()),
                _ => None,
            },
            status,
            bytes_sent: session.body_bytes_sent() as u64,
            bytes_received: session.body_bytes_read() as u64,
            duration_ms: duration * 1e3,
            upstream_ms: match (ctx.upstream_started, ctx.upstream_done) {
                (Some(a), Some(b)) => Some(b.duration_since(a).as_secs_f64() * 1e3),
                _ => None,
            },
            websocket: session.is_upgrade_req(),
            error,
            screened: ctx.screened.as_deref(),
            consumer: ctx
                .identity
                .as_ref()
                .and_then(|i| i.consumer)
                .map(|c| snap.consumers.consumers[c].name.as_str()),
            tenant: ctx
                .quota_tenant
                .as_deref()
                .or_else(|| ctx.identity.as_ref().and_then(|i| i.tenant.as_deref())),
        });
    }
}

/// Maps a Pingora error to the gateway's error vocabulary.
fn classify(e: &Error) -> Reject {
    use ErrorType::*;
    match e.etype() {
        HTTPStatus(413) => Reject::BodyTooLarge,
        HTTPStatus(503) => Reject::NoHealthyBackend,
        HTTPStatus(s) if *s >= 500 => Reject::UpstreamUnavailable,
        HTTPStatus(_) => Reject::BadRequest,
        ConnectTimedout | ConnectRefused | ConnectNoRoute | ConnectError | TLSHandshakeFailure
        | TLSHandshakeTimedout | ConnectProxyFailure | SocketError | BindError => {
            Reject::UpstreamUnavailable
        }
        ReadTimedout | WriteTimedout if e.esource() == &ErrorSource::Upstream => {
            Reject::UpstreamTimeout
        }
        ReadTimedout if e.esource() == &ErrorSource::Downstream => Reject::BodyTimeout,
        InvalidHTTPHeader | H1Error | H2Error | InvalidH2 => {
            if e.esource() == &ErrorSource::Downstream {
                Reject::BadRequest
            } else {
                Reject::UpstreamUnavailable
            }
        }
        _ => match e.esource() {
            ErrorSource::Upstream => Reject::UpstreamUnavailable,
            ErrorSource::Downstream => Reject::BadRequest,
            _ => Reject::Internal,
        },
    }
}
