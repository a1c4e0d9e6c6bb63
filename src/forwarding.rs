//! Header hygiene between client and upstream, shared by the proxied path and the WebSocket
//! path: hop-by-hop headers removed, `X-Forwarded-*` / `Forwarded` / `Via` set, the request id
//! propagated. Pure functions over Pingora's header types.

use std::net::IpAddr;

use http::header::{HeaderName, CONNECTION, UPGRADE};
use pingora_http::{RequestHeader, ResponseHeader};

use crate::config::HttpSettings;
use crate::router::HeaderEdits;

/// Headers that describe one hop and must not be forwarded (RFC 9110 §7.6.1), besides the ones
/// `Connection` names. `Upgrade` is handled separately: kept only on WebSocket handshakes.
/// `TE: trailers` is kept (see [`strip_hop_by_hop_request`]).
const HOP_BY_HOP: &[&str] = &["keep-alive", "proxy-connection", "te", "trailer"];

pub const X_REQUEST_ID: &str = "x-request-id";

/// True for a WebSocket handshake (`Upgrade: websocket`); other upgrades (`h2c`) are not
/// passed on.
pub fn is_websocket(req: &RequestHeader) -> bool {
    req.headers
        .get_all(UPGRADE)
        .iter()
        .any(|v| names_websocket(v.as_bytes()))
}

/// Whether an `Upgrade` header value lists the `websocket` token.
pub fn names_websocket(upgrade: &[u8]) -> bool {
    upgrade
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"))
}

/// What the gateway knows about the client connection.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub ip: Option<IpAddr>,
    /// `http` or `https`.
    pub proto: &'static str,
}

/// Removes hop-by-hop headers, including those listed in `Connection`. A `TE` that accepts
/// `trailers` goes on as exactly `te: trailers`, the one value HTTP/2 allows: gRPC servers
/// refuse requests without it (nginx's grpc_pass and Envoy pass it on the same way).
fn strip_hop_by_hop_request(req: &mut RequestHeader, keep_upgrade: bool) {
    let trailers = req.headers.get_all("te").iter().any(|v| {
        v.as_bytes().split(|b| *b == b',').any(|t| {
            t.split(|b| *b == b';')
                .next()
                .unwrap_or(t)
                .trim_ascii()
                .eq_ignore_ascii_case(b"trailers")
        })
    });
    let listed: Vec<HeaderName> = req
        .headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        if !(keep_upgrade && name == UPGRADE) {
            req.remove_header(&name);
        }
    }
    for name in HOP_BY_HOP {
        req.remove_header(*name);
    }
    req.remove_header(&CONNECTION);
    if !keep_upgrade {
        req.remove_header(&UPGRADE);
    }
    if trailers {
        let _ = req.insert_header("te", "trailers");
    }
}

/// Prepares a request for the upstream: hygiene, forwarding headers, the route's edits.
/// `host` is the request's host as the client sent it (for `X-Forwarded-Host`).
pub fn upstream_request(
    req: &mut RequestHeader,
    client: Client,
    settings: &HttpSettings,
    request_id: &str,
    edits: &HeaderEdits,
    websocket: bool,
) {
    let has_hop = req.headers.contains_key(CONNECTION)
        || req.headers.contains_key(UPGRADE)
        || HOP_BY_HOP.iter().any(|h| req.headers.contains_key(*h));
    if has_hop {
        strip_hop_by_hop_request(req, websocket);
    }
    if websocket {
        let _ = req.insert_header(CONNECTION, "Upgrade");
    }
    // The same host the router matched on.
    let host = crate::router::RequestHead::from_parts(req)
        .host
        .map(str::to_owned);

    if let Some(ip) = client.ip {
        let ip_text = ip.to_string();
        let xff = match req
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip_text}"),
            _ => ip_text.clone(),
        };
        let _ = req.insert_header("x-forwarded-for", xff);
        if settings.forwarded {
            let node = match ip {
                IpAddr::V6(_) => format!("\"[{ip_text}]\""),
                IpAddr::V4(_) => ip_text,
            };
            let mut element = format!("for={node};proto={}", client.proto);
            if let Some(h) = &host {
                if h.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'"' && b != b';' && b != b',')
                {
                    element.push_str(";host=");
                    element.push_str(h);
                }
            }
            let fwd = match req.headers.get("forwarded").and_then(|v| v.to_str().ok()) {
                Some(prev) if !prev.trim().is_empty() => format!("{prev}, {element}"),
                _ => element,
            };
            let _ = req.insert_header("forwarded", fwd);
        }
    }
    let _ = req.insert_header("x-forwarded-proto", client.proto);
    if let Some(h) = host {
        let _ = req.insert_header("x-forwarded-host", h);
    }
    if settings.via {
        let _ = req.append_header("via", "1.1 tollgate");
    }
    let _ = req.insert_header(X_REQUEST_ID, request_id);
    apply_request_edits(req, edits);
}

pub fn apply_request_edits(req: &mut RequestHeader, edits: &HeaderEdits) {
    if edits.is_empty() {
        return;
    }
    for name in &edits.remove {
        req.remove_header(name);
    }
    for (name, value) in &edits.set {
        let _ = req.insert_header(name.clone(), value.clone());
    }
    for (name, value) in &edits.add {
        let _ = req.append_header(name.clone(), value.clone());
    }
}

/// Prepares an upstream response for the client: the route's edits, `Via`, the request id.
pub fn downstream_response(
    resp: &mut ResponseHeader,
    settings: &HttpSettings,
    request_id: &str,
    edits: &HeaderEdits,
) {
    for name in &["keep-alive", "proxy-connection"] {
        resp.remove_header(*name);
    }
    if !edits.is_empty() {
        for name in &edits.remove {
            resp.remove_header(name);
        }
        for (name, value) in &edits.set {
            let _ = resp.insert_header(name.clone(), value.clone());
        }
        for (name, value) in &edits.add {
            let _ = resp.append_header(name.clone(), value.clone());
        }
    }
    if settings.via {
        let _ = resp.append_header("via", "1.1 tollgate");
    }
    let _ = resp.insert_header(X_REQUEST_ID, request_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/x", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn hop_by_hop_headers_are_removed_and_forwarding_set() {
        let mut r = request(&[
            ("host", "api.test"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip"),
            ("x-forwarded-for", "10.1.1.1"),
        ]);
        let client = Client {
            ip: Some("192.0.2.7".parse().unwrap()),
            proto: "http",
        };
        upstream_request(
            &mut r,
            client,
            &HttpSettings::default(),
            "rid",
            &HeaderEdits::default(),
            false,
        );
        for h in ["connection", "x-secret-hop", "keep-alive", "te"] {
            assert!(!r.headers.contains_key(h), "{h} should be gone");
        }
        assert_eq!(r.headers["x-forwarded-for"], "10.1.1.1, 192.0.2.7");
        assert_eq!(r.headers["x-forwarded-proto"], "http");
        assert_eq!(r.headers["x-forwarded-host"], "api.test");
        assert_eq!(
            r.headers["forwarded"],
            "for=192.0.2.7;proto=http;host=api.test"
        );
        assert_eq!(r.headers["x-request-id"], "rid");
    }

    #[test]
    fn te_trailers_is_the_one_te_that_goes_on() {
        let client = Client {
            ip: None,
            proto: "https",
        };
        for (sent, kept) in [
            ("trailers", Some("trailers")),
            ("gzip, Trailers;q=1", Some("trailers")),
            ("deflate", None),
        ] {
            let mut r = request(&[("host", "h"), ("te", sent), ("connection", "te")]);
            let edits = HeaderEdits::default();
            upstream_request(
                &mut r,
                client,
                &HttpSettings::default(),
                "id",
                &edits,
                false,
            );
            let te = r.headers.get("te").map(|v| v.to_str().unwrap());
            assert_eq!(te, kept, "TE: {sent}");
            assert!(!r.headers.contains_key("connection"));
        }
    }

    #[test]
    fn websocket_handshakes_keep_upgrade() {
        let mut r = request(&[
            ("host", "h"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        let client = Client {
            ip: Some("::1".parse().unwrap()),
            proto: "http",
        };
        upstream_request(
            &mut r,
            client,
            &HttpSettings::default(),
            "rid",
            &HeaderEdits::default(),
            true,
        );
        assert_eq!(r.headers["upgrade"], "websocket");
        assert_eq!(r.headers["connection"], "Upgrade");
        assert_eq!(r.headers["forwarded"], "for=\"[::1]\";proto=http;host=h");
    }
}
