//! The downstream connection loop. Pingora's `HttpProxy` serves ordinary HTTP; this thin
//! `ServerApp` in front of it reads each HTTP/1 request head first, so that:
//!
//! - WebSocket upgrades are tunnelled by tollgate itself (`tunnel`), with small buffers and a
//!   registry that can close a tunnel cleanly. Pingora's own tunnel costs ~70 KB per idle
//!   connection and cannot be closed from outside (pingora issue #571);
//! - header size/count limits and the header timeout are enforced before any parsing work;
//! - idle keep-alive connections are closed promptly on shutdown.
//!
//! Everything else is handed back to Pingora unchanged: the bytes read are replayed with
//! `Stream::rewind`, then `HttpProxy::process_new_http` runs the normal `ProxyHttp` phases. In
//! Pingora 0.9.1 the keep-alive loop lives inside `HttpServerApp`'s blanket `ServerApp` impl,
//! so this module runs that loop itself to see every request head, not just the first.
//! HTTP/2 connections (ALPN `h2`, or the h2c preface on a listener with `h2c: true`) go to
//! Pingora whole (WebSocket over h2 is not supported by Pingora).
//!
//! TLS listeners are plain TCP to Pingora: the handshake runs here, with the acceptor of the
//! snapshot current at accept time (`tls`), so certificate changes reload without a restart.

use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{Stream, ALPN};
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use crate::gateway::Gateway;
use crate::lifecycle::drain::wait_for_shutdown;
use crate::proxy::Proxy;
use crate::respond::{request_id, Reject};
use crate::tunnel;

/// Upper bound for `http.max_headers` (the parser's header table lives on the stack).
pub const MAX_HEADERS_CAP: usize = 256;
/// First allocation for a request head; grows up to `http.max_header_bytes`.
const HEAD_BUF: usize = 2048;

pub struct Edge {
    pub proxy: Arc<HttpProxy<Proxy>>,
    pub gateway: Arc<Gateway>,
}

/// Outcome of reading one request head.
enum Head {
    /// The peer closed or went quiet; nothing to answer.
    Closed,
    /// Answer with this error and close.
    Reject(Reject),
    /// `buf[..len]` is a complete head (`buf` may hold more bytes after it).
    Ready { len: usize, websocket: bool },
    /// `buf` starts with the HTTP/2 connection preface (h2c listeners only).
    H2c,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Whether what arrived so far is (the start of) the HTTP/2 preface.
fn is_h2_preface(buf: &[u8]) -> bool {
    let n = buf.len().min(H2_PREFACE.len());
    buf[..n] == H2_PREFACE[..n]
}

#[async_trait]
impl ServerApp for Edge {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _open = ConnectionGauge::new(&self.gateway.metrics.connections_active);
        let mut h2c = false;
        let mut redirects = false;
        if stream.get_ssl_digest().is_none() {
            let snap = self.gateway.current();
            let local = || {
                stream
                    .get_socket_digest()
                    .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied())
            };
            let listener =
                crate::tls::listener_for(&snap.listeners, local).map(|i| &snap.listeners[i]);
            if let Some(tls) = listener.and_then(|l| l.tls.as_ref()) {
                stream = self.handshake(tls, stream).await?;
            } else {
                h2c = listener.is_some_and(|l| l.h2c);
                redirects = listener.is_some_and(|l| l.redirect_https.is_some());
            }
        }
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut persistent: Option<HttpPersistentSettings> = None;
        let mut first = true;
        loop {
            let (http, idle_grace) = self.gateway.connection_settings();
            let h2c_here = h2c && first;
            match read_head(
                &mut stream,
                &mut buf,
                &http,
                h2c_here,
                first,
                shutdown,
                idle_grace,
            )
            .await
            {
                Head::Closed => return None,
                Head::H2c => {
                    // Prior-knowledge HTTP/2: Pingora reads the preface again and serves h2.
                    let replayed = rewind(stream, &buf);
                    return ServerApp::process_new(&self.proxy, replayed, shutdown).await;
                }
                Head::Reject(r) => {
                    let _ = stream.write_all(&r.raw_response(&request_id(None))).await;
                    let _ = stream.flush().await;
                    let _ = stream.shutdown().await;
                    return None;
                }
                // On a redirecting listener the proxy answers upgrades with the redirect too.
                Head::Ready {
                    len,
                    websocket: true,
                } if !redirects => {
                    match tunnel::plan(&self.gateway, &buf[..len], &stream).await {
                        tunnel::Plan::Tunnel(plan) => {
                            tunnel::run(&self.gateway, plan, stream, buf, len).await;
                            return None;
                        }
                        tunnel::Plan::Reject(r, id) => {
                            let _ = stream.write_all(&r.raw_response(&id)).await;
                            let _ = stream.flush().await;
                            let _ = stream.shutdown().await;
                            return None;
                        }
                        // Not a tunnel route (fixed response, redirect, no route...): Pingora answers.
                        tunnel::Plan::Http => {}
                    }
                }
                Head::Ready { .. } => {}
            }
            let replayed = rewind(stream, &buf);
            let mut session = ServerSession::new_http1(replayed);
            match persistent.take() {
                Some(p) => p.apply_to_session(&mut session),
                None => session.set_keepalive(Some(http.keepalive_timeout.get().as_secs().max(1))),
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            let reused = self.proxy.process_new_http(session, shutdown).await?;
            let (s, p) = reused.consume();
            stream = s;
            persistent = p;
            first = false;
        }
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

impl Edge {
    /// Runs the TLS handshake of a new connection within the listener's handshake timeout.
    /// None when it fails (the client gets the TLS alert rustls sends, and nothing else).
    async fn handshake(&self, tls: &crate::tls::TlsTerminator, stream: Stream) -> Option<Stream> {
        let metrics = &self.gateway.metrics;
        let l4 = downcast_l4(stream)?;
        match tokio::time::timeout(tls.handshake_timeout, tls.acceptor.tls_handshake(*l4)).await {
            Ok(Ok(s)) => {
                metrics.tls_handshakes.ok.inc();
                Some(Box::new(s))
            }
            Ok(Err(e)) => {
                metrics.tls_handshakes.failed.inc();
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                metrics.tls_handshakes.timeout.inc();
                None
            }
        }
    }
}

fn downcast_l4(stream: Stream) -> Option<Box<L4Stream>> {
    if !stream.as_any().is::<L4Stream>() {
        tracing::error!("a TLS listener got a stream that is not plain TCP");
        return None;
    }
    stream.into_any().downcast::<L4Stream>().ok()
}

/// Replays `head` in front of the stream's next reads: plaintext TCP streams take it back
/// themselves, TLS streams get a replaying wrapper.
fn rewind(stream: Stream, head: &[u8]) -> Stream {
    if stream.as_any().is::<L4Stream>() {
        let mut l4 = stream
            .into_any()
            .downcast::<L4Stream>()
            .expect("checked by `is` above");
        l4.rewind(head);
        return l4;
    }
    crate::tls::replay::Replay::rewind(stream, head)
}

/// Reads one request head into `buf` within the configured limits and timeouts.
async fn read_head(
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    http: &crate::config::HttpSettings,
    h2c: bool,
    first: bool,
    shutdown: &ShutdownWatch,
    idle_grace: std::time::Duration,
) -> Head {
    buf.clear();
    let max = http.max_header_bytes.get() as usize;
    // Waiting for the first byte: a new connection gets the header timeout, a kept-alive one
    // the keep-alive timeout. Once the server drains, a connection that has sent nothing gets
    // only `idle_grace` more: a request that arrives in time is still served (Pingora answers
    // it with `Connection: close`), so a busy client never sees its connection cut mid-send.
    let idle = if first {
        http.client_header_timeout.get()
    } else {
        http.keepalive_timeout.get()
    };
    let mut deadline = Instant::now() + idle;
    let mut shutdown = shutdown.clone();
    let mut draining = *shutdown.borrow();
    if draining {
        deadline = deadline.min(Instant::now() + idle_grace);
    }
    loop {
        if buf.capacity() - buf.len() < 512 {
            let want = (buf.capacity().max(HEAD_BUF / 2) * 2).min(max + 1);
            if want <= buf.len() {
                return Head::Reject(Reject::HeadersTooLarge);
            }
            buf.reserve_exact(want - buf.len());
        }
        let read = async {
            if buf.is_empty() && !draining {
                tokio::select! {
                    r = stream.read_buf(buf) => Some(r),
                    _ = async {
                        if !wait_for_shutdown(&mut shutdown).await {
                            std::future::pending::<()>().await; // no broadcaster: no shutdown
                        }
                    } => None,
                }
            } else {
                Some(stream.read_buf(buf).await)
            }
        };
        let n = match timeout_at(deadline, read).await {
            Ok(Some(Ok(n))) => n,
            Ok(None) => {
                // The drain began while this connection idled: last call.
                draining = true;
                deadline = deadline.min(Instant::now() + idle_grace);
                continue;
            }
            // Timed out or a read error: close quietly.
            _ => return Head::Closed,
        };
        if n == 0 {
            return Head::Closed;
        }
        if n == buf.len() {
            // The head started: from now on the client has the header timeout to finish it.
            deadline = Instant::now() + http.client_header_timeout.get();
        }
        if h2c && is_h2_preface(buf) {
            if buf.len() >= H2_PREFACE.len() {
                return Head::H2c;
            }
            continue;
        }
        match parse_head(buf, http.max_headers) {
            Parsed::Complete { len, websocket } => return Head::Ready { len, websocket },
            Parsed::Partial if buf.len() > max => return Head::Reject(Reject::HeadersTooLarge),
            Parsed::Partial => {}
            Parsed::TooManyHeaders => return Head::Reject(Reject::HeadersTooLarge),
            Parsed::Invalid => return Head::Reject(Reject::BadRequest),
        }
    }
}

enum Parsed {
    Complete { len: usize, websocket: bool },
    Partial,
    TooManyHeaders,
    Invalid,
}

/// Parses a request head without allocating (the header table is on this call's stack, not in
/// the connection's future).
fn parse_head(buf: &[u8], max_headers: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
    let mut req = httparse::Request::new(&mut headers[..max_headers.min(MAX_HEADERS_CAP)]);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) if !well_framed(&req) => Parsed::Invalid,
        Ok(httparse::Status::Complete(len)) => Parsed::Complete {
            len,
            websocket: is_websocket_upgrade(&req),
        },
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => Parsed::TooManyHeaders,
        Err(_) => Parsed::Invalid,
    }
}

/// Rejects heads that proxies disagree on (request smuggling) or that RFC 9112 forbids:
/// HTTP/1.1 without exactly one `Host` (§3.2); a `Content-Length` that is not a number or is
/// repeated with different values (§6.3); `Content-Length` together with `Transfer-Encoding`.
fn well_framed(req: &httparse::Request<'_, '_>) -> bool {
    let mut hosts = 0;
    let mut host_value: &[u8] = b"";
    let mut length: Option<&[u8]> = None;
    let mut chunked = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host_value = h.value;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            for v in h.value.split(|b| *b == b',') {
                let v = v.trim_ascii();
                if v.is_empty()
                    || !v.iter().all(u8::is_ascii_digit)
                    || length.is_some_and(|l| l != v)
                {
                    return false;
                }
                length = Some(v);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        }
    }
    let host_ok = if req.version == Some(1) {
        hosts == 1
    } else {
        hosts <= 1
    };
    host_ok && !(chunked && length.is_some()) && target_agrees_with_host(req.path, host_value)
}

/// An absolute-form target (`http://a.example/x`) must name the same authority as `Host`
/// (RFC 9112 §3.2.2); Pingora rejects a mismatch too, but without our JSON body.
fn target_agrees_with_host(path: Option<&str>, host: &[u8]) -> bool {
    let Some(rest) = path.and_then(|p| {
        p.strip_prefix("http://")
            .or_else(|| p.strip_prefix("https://"))
    }) else {
        return true;
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority.as_bytes().eq_ignore_ascii_case(host.trim_ascii())
}

/// `GET` over HTTP/1.1 with `Upgrade: websocket` (RFC 6455 §4.1).
pub fn is_websocket_upgrade(req: &httparse::Request<'_, '_>) -> bool {
    req.method == Some("GET")
        && req.version == Some(1)
        && req.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("upgrade") && crate::forwarding::names_websocket(h.value)
        })
}

/// Keeps `tollgate_connections_active` right however the connection ends.
struct ConnectionGauge<'a>(&'a prometheus::IntGauge);

impl<'a> ConnectionGauge<'a> {
    fn new(g: &'a prometheus::IntGauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for ConnectionGauge<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_classified() {
        let ws = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: WebSocket\r\n\r\nextra";
        match parse_head(ws, 100) {
            Parsed::Complete { len, websocket } => {
                assert!(websocket);
                assert_eq!(&ws[len..], b"extra");
            }
            _ => panic!("complete head expected"),
        }
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 100),
            Parsed::Complete {
                websocket: false,
                ..
            }
        ));
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n", 100),
            Parsed::Partial
        ));
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n", 2),
            Parsed::TooManyHeaders
        ));
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nbad header\r\n\r\n", 100),
            Parsed::Invalid
        ));
        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET http://a.test/x HTTP/1.1\r\nHost: b.test\r\n\r\n",
        ] {
            assert!(matches!(parse_head(bad, 100), Parsed::Invalid), "{}", String::from_utf8_lossy(bad));
        }
        assert!(matches!(
            parse_head(
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n",
                100
            ),
            Parsed::Complete { .. }
        ));
        assert!(matches!(
            parse_head(b"GET / HTTP/1.0\r\n\r\n", 100),
            Parsed::Complete { .. }
        ));
        // POST with Upgrade is not a WebSocket handshake.
        assert!(matches!(
            parse_head(
                b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
                100
            ),
            Parsed::Complete {
                websocket: false,
                ..
            }
        ));
    }
}
