//! Responses the gateway writes itself. Every one has the same shape, a status and a short JSON
//! body `{"error","message","request_id"}`, and never carries internals (no upstream addresses,
//! no config paths, no secrets).

use std::fmt::Write as _;

/// Why the gateway answered instead of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    BadRequest,
    NoRoute,
    WebSocketDisabled,
    BodyTooLarge,
    HeadersTooLarge,
    BodyTimeout,
    NoHealthyBackend,
    UpstreamUnavailable,
    UpstreamTimeout,
    Internal,
    /// Authentication or authorization failed (see `policy::auth`).
    Auth(AuthFailure),
    /// A tenant quota refused the request (see `policy::quota`).
    Quota(QuotaRefusal),
    /// The IP rules or bot detection refused the request: `ip_denied`, `ip_not_allowed`,
    /// `bot_blocked`, `bot_fake`.
    Forbidden(&'static str),
}

/// A quota refusal: enough to write `Retry-After` and the rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaRefusal {
    /// 429, or 403 for a tenant that is unknown or missing.
    pub status: u16,
    /// `rate_limited`, `concurrency_limited`, `websocket_limited`, `unknown_tenant`,
    /// `tenant_missing`, `flood_blocked`.
    pub code: &'static str,
    /// Seconds.
    pub retry_after: u64,
    /// The limit that refused, and its window in seconds (0: a concurrency cap).
    pub limit: u64,
    pub window: u64,
}

impl QuotaRefusal {
    /// The headers a refusal carries: `Retry-After` and, for rate limits, the rate-limit fields.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        if self.status != 429 {
            return Vec::new();
        }
        let mut out = vec![("retry-after", self.retry_after.to_string())];
        if self.window > 0 {
            out.extend(crate::policy::quota::headers(
                &crate::policy::quota::limiter::Remaining {
                    limit: self.limit,
                    remaining: 0,
                    reset: self.retry_after,
                    window: self.window,
                },
            ));
        }
        out
    }
}

/// An authentication failure: static texts only, so no secret or token can end up in a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailure {
    pub status: u16,
    /// Snake-case reason, e.g. `token_expired`.
    pub code: &'static str,
    pub message: &'static str,
    /// `WWW-Authenticate` value for a 401.
    pub challenge: Option<&'static str>,
    /// The method that failed (`jwt`, `hmac`, `key`), or `none` without credentials.
    pub method: &'static str,
}

impl Reject {
    pub fn status(self) -> u16 {
        match self {
            Reject::BadRequest | Reject::WebSocketDisabled => 400,
            Reject::NoRoute => 404,
            Reject::BodyTimeout => 408,
            Reject::BodyTooLarge => 413,
            Reject::HeadersTooLarge => 431,
            Reject::Internal => 500,
            Reject::UpstreamUnavailable => 502,
            Reject::NoHealthyBackend => 503,
            Reject::UpstreamTimeout => 504,
            Reject::Auth(a) => a.status,
            Reject::Quota(q) => q.status,
            Reject::Forbidden(_) => 403,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Reject::BadRequest => "bad_request",
            Reject::NoRoute => "no_route",
            Reject::WebSocketDisabled => "websocket_disabled",
            Reject::BodyTooLarge => "body_too_large",
            Reject::HeadersTooLarge => "headers_too_large",
            Reject::BodyTimeout => "body_timeout",
            Reject::NoHealthyBackend => "no_healthy_backend",
            Reject::UpstreamUnavailable => "upstream_unavailable",
            Reject::UpstreamTimeout => "upstream_timeout",
            Reject::Internal => "internal_error",
            Reject::Auth(a) => a.code,
            Reject::Quota(q) => q.code,
            Reject::Forbidden(code) => code,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Reject::BadRequest => "the request could not be parsed",
            Reject::NoRoute => "no route matches this request",
            Reject::WebSocketDisabled => "WebSocket upgrades are not enabled on this route",
            Reject::BodyTooLarge => "the request body is larger than this route allows",
            Reject::HeadersTooLarge => "the request headers are too large or too many",
            Reject::BodyTimeout => "the request body was not received in time",
            Reject::NoHealthyBackend => "no healthy backend is available for this route",
            Reject::UpstreamUnavailable => "the upstream could not be reached",
            Reject::UpstreamTimeout => "the upstream did not answer in time",
            Reject::Internal => "internal gateway error",
            Reject::Auth(a) => a.message,
            Reject::Forbidden(code) => match code {
                "ip_denied" => "requests from this address are refused",
                "ip_not_allowed" => "this address may not use this route",
                "blocked_by_rule" => "the request was refused by a gateway rule",
                "challenge_required" => "this page needs a browser with JavaScript",
                "waf_blocked" => "the request was refused by the web application firewall",
                "bot_fake" => "this client claims to be a crawler it is not",
                _ => "automated clients of this kind are refused",
            },
            Reject::Quota(q) => match q.code {
                "rate_limited" => "the tenant's request rate quota is used up; retry later",
                "concurrency_limited" => "the tenant has too many requests in flight",
                "websocket_limited" => "the tenant has too many WebSocket connections open",
                "unknown_tenant" => "the tenant has no quota here",
                "flood_blocked" => "too many requests from this address; retry later",
                _ => "the request names no tenant",
            },
        }
    }

    /// The `WWW-Authenticate` challenge this answer carries, if any.
    pub fn challenge(self) -> Option<&'static str> {
        match self {
            Reject::Auth(a) => a.challenge,
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(self, request_id: &str) -> Vec<u8> {
        let mut s = String::with_capacity(128);
        let _ = write!(
            s,
            r#"{{"error":"{}","message":"{}","request_id":"{}"}}"#,
            self.code(),
            self.message(),
            request_id // request ids are validated or generated: only [A-Za-z0-9._:-]
        );
        s.push('\n');
        s.into_bytes()
    }

    /// A small HTML page with the same facts as [`Self::body`], for routes browsers open.
    pub fn html_body(self, request_id: &str) -> Vec<u8> {
        let status = self.status();
        let reason = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        // Static texts and a validated request id: nothing here needs escaping.
        format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{status} {reason}</title></head>\n<body><h1>{status} {reason}</h1>\n<p>{}.</p>\n<p>Request id: <code>{request_id}</code></p></body></html>\n",
            self.message(),
        )
        .into_bytes()
    }

    /// A complete HTTP/1.1 response that closes the connection, for the paths that answer
    /// before (or instead of) Pingora's session.
    pub fn raw_response(self, request_id: &str) -> Vec<u8> {
        let body = self.body(request_id);
        let mut out = String::with_capacity(256);
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {}\r\n",
            self.status(),
            http::StatusCode::from_u16(self.status())
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or(""),
            body.len(),
            request_id
        );
        if let Some(c) = self.challenge() {
            let _ = write!(out, "www-authenticate: {c}\r\n");
        }
        if let Reject::Quota(q) = self {
            for (k, v) in q.headers() {
                let _ = write!(out, "{k}: {v}\r\n");
            }
        }
        out.push_str("connection: close\r\n\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&body);
        bytes
    }
}

/// The request id: the client's `X-Request-Id` when it is sane (1–128 chars of
/// `[A-Za-z0-9._:-]`), otherwise a fresh 32-hex-digit id.
pub fn request_id(incoming: Option<&[u8]>) -> String {
    if let Some(v) = incoming {
        if !v.is_empty()
            && v.len() <= 128
            && v.iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        {
            // Checked ASCII above.
            return String::from_utf8_lossy(v).into_owned();
        }
    }
    format!("{:032x}", fastrand::u128(..))
}

/// A gRPC request (`content-type: application/grpc[+proto|+json...]`): its errors are
/// answered the way gRPC clients read them, not as JSON.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The gRPC status for a gateway refusal, after gRPC's HTTP-to-gRPC mapping
/// (doc/http-grpc-status-mapping.md), except that quota refusals (429) and oversized bodies
/// (413) say `RESOURCE_EXHAUSTED` and a gateway timeout (504) `DEADLINE_EXCEEDED`, which tell
/// a client more than `UNAVAILABLE` does.
pub fn grpc_status(http_status: u16) -> u8 {
    match http_status {
        400 => 13,       // INTERNAL
        401 => 16,       // UNAUTHENTICATED
        403 => 7,        // PERMISSION_DENIED
        404 => 12,       // UNIMPLEMENTED
        413 | 429 => 8,  // RESOURCE_EXHAUSTED
        504 => 4,        // DEADLINE_EXCEEDED
        502 | 503 => 14, // UNAVAILABLE
        _ => 2,          // UNKNOWN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_json_with_the_request_id() {
        let body = Reject::NoRoute.body("abc");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "no_route");
        assert_eq!(v["request_id"], "abc");
        let raw = String::from_utf8(Reject::HeadersTooLarge.raw_response("id1")).unwrap();
        assert!(
            raw.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{raw}"
        );
        assert!(raw.contains(&format!(
            "content-length: {}\r\n",
            Reject::HeadersTooLarge.body("id1").len()
        )));
    }

    #[test]
    fn request_ids_pass_through_only_when_sane() {
        assert_eq!(request_id(Some(b"req-42.a:b_c")), "req-42.a:b_c");
        let fresh = request_id(Some(b"bad\"id"));
        assert_eq!(fresh.len(), 32);
        assert_ne!(request_id(None), request_id(None));
        assert_eq!(request_id(Some(&[b'a'; 129])).len(), 32);
    }
}
