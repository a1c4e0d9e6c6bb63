//! HMAC request signatures in the Alibaba Cloud API Gateway scheme (`X-Ca-*` headers), as
//! Higress's `hmac-auth` plugin verifies them, so clients signing for either keep working.
//!
//! Owns: the string to sign, the signature and Content-MD5 checks, the freshness window, and
//! the call into the [`NonceStore`]. Must never: put the secret or the expected signature in an
//! error, a log line or a `Debug` string; record a nonce before the signature verified (anyone
//! could burn a client's nonces); panic on anything a request carries.
//!
//! Runs on the request path after routing, for routes whose `auth` accepts `hmac`. The glue
//! calls [`present`] to pick the method, may call [`precheck`] at header time (cheap, no
//! secrets: refuses stale, malformed and over-sized requests before a body is buffered), reads
//! the body only when [`needs_body`] says so, then calls [`verify`].
//!
//! # The scheme, as pinned down from its sources
//!
//! Sources, cited below by letter:
//! - **[A]** Alibaba Cloud API Gateway, "请求签名说明" / "Request signature description",
//!   <https://help.aliyun.com/document_detail/29475.html>.
//! - **[H]** `alibaba/higress`, `plugins/wasm-cpp/extensions/hmac_auth/plugin.cc`
//!   (`getStringToSign`, `getStringToSignWithParam`, `checkPlugin`, `onRequestBody`) and
//!   `plugins/wasm-cpp/common/http_util.{h,cc}` (`parseParameters`, `PercentEncoding::decode`,
//!   `QueryParams = std::map`, `httpTime`). Its `README_EN.md` restates [A] with an example;
//!   `plugin_test.cc` has two full vectors (secret `appSecret`), pinned in the tests below.
//!   (Higress's *wasm-go* `hmac-auth` is another scheme, `Authorization: Signature keyId=..`
//!   as in APISIX, and is not this one.)
//! - **[J]** `aliyun/api-gateway-demo-sign-java` `SignUtil.java`, `HttpUtil.java`;
//!   **[N]** `aliyun/api-gateway-nodejs-sdk` `lib/client.js`; **[P]**
//!   `aliyun/api-gateway-demo-sign-python` `aliyun-api-gateway-demo-sign3/.../signature_composer.py`:
//!   the official client signers, i.e. what existing clients actually send.
//!
//! Request headers: `X-Ca-Key` (access key), `X-Ca-Signature` (Base64), `X-Ca-Signature-Method`
//! (`HmacSHA256` when absent or empty, or `HmacSHA1` [A], [H]; matched without regard to case,
//! since Higress takes anything but `HmacSHA1` for SHA-256), `X-Ca-Signature-Headers`,
//! `X-Ca-Timestamp`, `X-Ca-Nonce`, and `Date`, `Accept`, `Content-Type`, `Content-MD5`.
//!
//! ```text
//! signature = Base64(HMAC-SHA256 or HMAC-SHA1(secret, string_to_sign))       [A], [H]
//! string_to_sign = METHOD "\n" Accept "\n" Content-MD5 "\n" Content-Type "\n" Date "\n"
//!                  Headers PathAndParameters
//! ```
//!
//! - The five first lines are the raw values (the method as received, upper case by HTTP
//!   convention); an absent header is an empty line [A], [H]. Every header that goes into the
//!   string to sign, and every `X-Ca-*` header, must appear at most once (`malformed_header`):
//!   Envoy hands a Wasm plugin only the first field line (`getHeaderMapValue` returns
//!   `entry[0]`), which would leave a second one unsigned for the upstream to read.
//! - **Headers**: the names listed in `X-Ca-Signature-Headers`, split on `,`, trimmed, empties
//!   skipped, minus `X-Ca-Signature`, `X-Ca-Signature-Headers`, `Accept`, `Content-MD5`,
//!   `Content-Type`, `Date` (compared without case) [A], [H]; sorted by name (bytes, as
//!   `std::sort`/`TreeMap` do); each `name:value\n`, with `name:\n` for a listed header that is
//!   absent or empty [A], [H]. No headers, no extra line [A]. Duplicate names stay duplicated [H].
//!   At most 64 names (`malformed_header`).
//! - **PathAndParameters**: the raw path of the request-target, not decoded [A], [H], [J]; then,
//!   when there are parameters, `?` and the `key=value` pairs sorted by key (bytes) and joined
//!   with `&` [A], [H]. Parameters are the query's, then, when `Content-Type` contains
//!   `application/x-www-form-urlencoded` (any method, any case [H]), the body's. For a key that
//!   occurs more than once the first value wins [A], [H], so a query value beats a form value
//!   [H] (the official SDKs [J], [N], [P] let the form win instead: a key in both query and form
//!   does not verify for them; it did not on Higress either). Empty `&&` segments are skipped
//!   (Higress would sign an empty key). Keys and values are percent-decoded before sorting
//!   (clients sign the raw values [A], [P]); an invalid escape stays literal. Nothing is
//!   re-encoded, so `=` and `&` inside decoded values are ambiguous: the scheme's, not ours.
//!
//! Two **dialects** differ where Higress's code departs from [A]; [`verify`] accepts either
//! (`dialects`, default both; both are computed only when they differ):
//!
//! | | `alibaba` ([A], [J], [N], [P]) | `higress` ([H] as implemented) |
//! |---|---|---|
//! | header names | as listed in `X-Ca-Signature-Headers` ([P] signs `X-Ca-Key`) | lower-cased |
//! | empty value | `key` alone [A], [J], [N], [P] | `key=` (`"%s=%s"` in [H]) |
//! | `+` in query/form | a space (form encoding; [J] sends spaces as `+`) | a literal `+` |
//!
//! **Content-MD5** (optional; SDKs send it for non-form bodies [A], [N], [P]): when present it must
//! be Base64(MD5(body)) of the body received [A], [H]. Higress refuses it outright on an empty
//! body; here the MD5 of the empty body is expected. It is checked after the signature.
//!
//! **Freshness**: `X-Ca-Timestamp` is milliseconds since the epoch, valid for 15 minutes [A];
//! fewer than 13 digits are read as seconds [H] (`MILLISEC_MIN_LENGTH`). Without it, `Date`
//! (IMF-fixdate, also with Alibaba's `GMT+00:00`, RFC 850 or asctime [H] (`httpTime`)) may stand
//! in when `require_timestamp: false`; one of them is always required. Either direction of skew
//! counts. Higress checks time only with `date_offset` set and prefers `Date`; here
//! `X-Ca-Timestamp` wins, being the header [A] documents for replay protection.
//!
//! **Nonce**: `X-Ca-Nonce`, a UUID per request, unique within the window per access key [A].
//! Higress does not check nonces; [A] does. At most 128 bytes.
//!
//! Stricter than both, to make replay protection real: a `X-Ca-Timestamp` must be listed in
//! `X-Ca-Signature-Headers`, and so must `X-Ca-Nonce` when `require_nonce` (without it, an
//! unsigned nonce is ignored): anyone could refresh an unsigned one. Every official SDK signs
//! all `X-Ca-*` headers [J], [N], [P], so real clients are unaffected.
//!
//! Checks run in this order, so nothing secret-dependent happens before the request is
//! well-formed and fresh, and a nonce is spent only by a verified request: headers and
//! freshness ([`precheck`]) → body size → signature (an unknown key still costs one HMAC) →
//! Content-MD5 → nonce.
//!
//! [A]: https://help.aliyun.com/document_detail/29475.html
//! [H]: https://github.com/alibaba/higress/blob/main/plugins/wasm-cpp/extensions/hmac_auth/plugin.cc
//! [J]: https://github.com/aliyun/api-gateway-demo-sign-java/blob/master/src/main/java/com/aliyun/api/gateway/demo/util/SignUtil.java
//! [N]: https://github.com/aliyun/api-gateway-nodejs-sdk/blob/master/lib/client.js
//! [P]: https://github.com/aliyun/api-gateway-demo-sign-python/blob/master/aliyun-api-gateway-demo-sign3/com/aliyun/api/gateway/sdk/auth/signature_composer.py

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::header::AsHeaderName;
use http::{HeaderMap, HeaderName};
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use sha2::Sha256;

use super::nonce::{NonceError, NonceStore};
use crate::config::units::{ByteSize, Dur};
use crate::config::FieldError;

/// The most body the proxy keeps to replay upstream after reading it for verification.
pub const MAX_BODY_LIMIT: u64 = 64 * 1024;
/// Longer `X-Ca-Nonce` values are malformed (a UUID is 36).
pub const MAX_NONCE_LEN: usize = 128;
const MAX_SIGNED_HEADERS: usize = 64;

const X_CA_KEY: &str = "x-ca-key";
const X_CA_SIGNATURE: &str = "x-ca-signature";
const X_CA_SIGNATURE_METHOD: &str = "x-ca-signature-method";
const X_CA_SIGNATURE_HEADERS: &str = "x-ca-signature-headers";
const X_CA_TIMESTAMP: &str = "x-ca-timestamp";
const X_CA_NONCE: &str = "x-ca-nonce";
const CONTENT_MD5: &str = "content-md5";
const FORM: &[u8] = b"application/x-www-form-urlencoded";
/// Never signed as `Headers` even when listed: the first two are the signature itself, the
/// others already have their own line [A], [H].
const NOT_SIGNED_AS_HEADERS: [&str; 6] = [
    X_CA_SIGNATURE,
    X_CA_SIGNATURE_HEADERS,
    "accept",
    CONTENT_MD5,
    "content-type",
    "date",
];

/// Clients pad their Base64 (Java's encoder, Python's, Node's); padding is not required here.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A route's `auth.hmac`: how its HMAC-signed requests are checked. Every field is optional.
///
/// ```yaml
/// auth:
///   methods: [hmac]
///   hmac:
///     clock_skew: 15m
///     require_timestamp: true
///     require_nonce: true
///     max_body: 64k
///     algorithms: [HmacSHA256, HmacSHA1]
///     dialects: [alibaba, higress]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HmacSettings {
    /// How far the request's time (`X-Ca-Timestamp`, or `Date` where allowed) may be from the
    /// gateway's clock, either way. Default `15m` (Alibaba's window); at most `15m`.
    pub clock_skew: Dur,
    /// `true` (default): `X-Ca-Timestamp` is required. `false`: `Date` may stand in for it
    /// (one of the two is still required).
    pub require_timestamp: bool,
    /// `true` (default): `X-Ca-Nonce` is required, signed, and refused when seen again within
    /// the window. `false`: a signed nonce is still checked when the client sends one.
    pub require_nonce: bool,
    /// The largest body read to verify a signed form or a `Content-MD5`; larger gets `413`.
    /// Default and maximum `64k` (the proxy can replay only that much upstream).
    pub max_body: ByteSize,
    /// Accepted `X-Ca-Signature-Method` values. Default `[HmacSHA256, HmacSHA1]`.
    pub algorithms: Vec<String>,
    /// Accepted canonical forms (see the module docs). Default `[alibaba, higress]`.
    pub dialects: Vec<Dialect>,
}

impl Default for HmacSettings {
    fn default() -> Self {
        Self {
            clock_skew: Dur(Duration::from_secs(15 * 60)),
            require_timestamp: true,
            require_nonce: true,
            max_body: ByteSize(MAX_BODY_LIMIT),
            algorithms: Algorithm::ALL
                .iter()
                .map(|a| a.name().to_string())
                .collect(),
            dialects: vec![Dialect::Alibaba, Dialect::Higress],
        }
    }
}

impl HmacSettings {
    /// Checks what the settings can check alone; `path` is the field path of `auth.hmac`.
    /// Runs at load time, never on the request path.
    pub fn validate(&self, path: &str) -> Vec<FieldError> {
        let field = |name: &str| {
            if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}.{name}")
            }
        };
        let mut errors = Vec::new();
        if self.clock_skew.get().is_zero() {
            errors.push(FieldError::new(
                field("clock_skew"),
                "must be more than 0, e.g. 15m",
            ));
        }
        if self.max_body.get() > MAX_BODY_LIMIT {
            errors.push(FieldError::new(
                field("max_body"),
                "at most 64k: the proxy can replay only that much of a body it read to verify",
            ));
        }
        if self.algorithms.is_empty() {
            errors.push(FieldError::new(
                field("algorithms"),
                "list at least one of HmacSHA256, HmacSHA1",
            ));
        }
        for (i, a) in self.algorithms.iter().enumerate() {
            if !Algorithm::ALL.iter().any(|known| known.name() == a) {
                errors.push(FieldError::new(
                    format!("{}[{i}]", field("algorithms")),
                    format!("unknown algorithm `{a}`; expected HmacSHA256 or HmacSHA1"),
                ));
            }
        }
        if self.dialects.is_empty() {
            errors.push(FieldError::new(
                field("dialects"),
                "list at least one of alibaba, higress",
            ));
        }
        errors
    }

    /// How long a nonce must be remembered for these settings: a request is fresh from
    /// `clock_skew` before its timestamp until `clock_skew` after it.
    pub fn nonce_window(&self) -> Duration {
        self.clock_skew.get().saturating_mul(2)
    }

    fn body_limit(&self) -> u64 {
        self.max_body.get().min(MAX_BODY_LIMIT)
    }

    fn allows(&self, algorithm: Algorithm) -> bool {
        self.algorithms
            .iter()
            .any(|a| Algorithm::parse(a.as_bytes()) == Some(algorithm))
    }
}

/// A canonical form of the string to sign; see the table in the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dialect {
    /// Alibaba's documentation and official SDKs.
    Alibaba,
    /// What Higress's C++ `hmac-auth` computes.
    Higress,
}

/// An `X-Ca-Signature-Method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    HmacSha256,
    HmacSha1,
}

impl Algorithm {
    pub const ALL: [Algorithm; 2] = [Algorithm::HmacSha256, Algorithm::HmacSha1];

    /// The name clients send (and the config uses).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::HmacSha256 => "HmacSHA256",
            Algorithm::HmacSha1 => "HmacSHA1",
        }
    }

    /// Reads a header value, without regard to case.
    pub fn parse(value: &[u8]) -> Option<Algorithm> {
        Self::ALL
            .into_iter()
            .find(|a| value.eq_ignore_ascii_case(a.name().as_bytes()))
    }
}

/// One access key's secret and the consumer it authenticates.
#[derive(Clone)]
pub struct HmacSecret {
    /// Index into the snapshot's consumer table.
    pub consumer: usize,
    /// The secret's bytes (the UTF-8 of the configured string, as the SDKs use it).
    pub secret: Vec<u8>,
}

impl fmt::Debug for HmacSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HmacSecret")
            .field("consumer", &self.consumer)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Access key → secret, for the enabled consumers only (a disabled key is simply absent).
pub type HmacKeys = HashMap<String, HmacSecret>;

/// What verification reads of a request.
#[derive(Debug, Clone, Copy)]
pub struct HmacRequest<'a> {
    pub method: &'a str,
    /// The raw request-target as received (`/path?query`, percent-encoded). An absolute-form
    /// target (`http://host/path?query`) is reduced to its path and query.
    pub path_and_query: &'a str,
    pub headers: &'a HeaderMap,
    /// The whole body when [`needs_body`] is true (`Some(&[])` for an empty one); `None` when
    /// it was not read.
    pub body: Option<&'a [u8]>,
}

/// Why a request was refused. `code` is for metrics and logs, `message` (also its `Display`)
/// for the client; neither ever carries the secret or the expected signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HmacError {
    KeyMissing,
    UnknownKey,
    SignatureMissing,
    SignatureMalformed,
    SignatureMismatch,
    UnsupportedAlgorithm,
    MalformedHeader,
    TimestampMissing,
    TimestampMalformed,
    TimestampUnsigned,
    TimestampSkewed,
    NonceMissing,
    NonceMalformed,
    NonceUnsigned,
    NonceReplayed,
    NonceStoreFull,
    ContentMd5Mismatch,
    BodyTooLarge,
    /// The glue did not pass a body although [`needs_body`] said so: a bug, not the client's.
    BodyNotRead,
    /// Only from [`string_to_sign`]: [`verify`] signs bytes and needs no UTF-8.
    NotUtf8,
}

impl HmacError {
    /// Stable snake_case name for metrics and logs.
    pub fn code(&self) -> &'static str {
        match self {
            HmacError::KeyMissing => "key_missing",
            HmacError::UnknownKey => "unknown_key",
            HmacError::SignatureMissing => "signature_missing",
            HmacError::SignatureMalformed => "signature_malformed",
            HmacError::SignatureMismatch => "signature_mismatch",
            HmacError::UnsupportedAlgorithm => "unsupported_algorithm",
            HmacError::MalformedHeader => "malformed_header",
            HmacError::TimestampMissing => "timestamp_missing",
            HmacError::TimestampMalformed => "timestamp_malformed",
            HmacError::TimestampUnsigned => "timestamp_unsigned",
            HmacError::TimestampSkewed => "timestamp_skewed",
            HmacError::NonceMissing => "nonce_missing",
            HmacError::NonceMalformed => "nonce_malformed",
            HmacError::NonceUnsigned => "nonce_unsigned",
            HmacError::NonceReplayed => "nonce_replayed",
            HmacError::NonceStoreFull => "nonce_store_full",
            HmacError::ContentMd5Mismatch => "content_md5_mismatch",
            HmacError::BodyTooLarge => "body_too_large",
            HmacError::BodyNotRead => "body_not_read",
            HmacError::NotUtf8 => "not_utf8",
        }
    }

    /// 401 when the credentials are wrong, unknown or stale; 400 when the request is not a
    /// well-formed signed request; 413 for a body too large to verify; 503 when the replay
    /// store is full (fail closed); 500 for a glue bug.
    pub fn status(&self) -> u16 {
        match self {
            HmacError::KeyMissing
            | HmacError::UnknownKey
            | HmacError::SignatureMissing
            | HmacError::SignatureMismatch
            | HmacError::UnsupportedAlgorithm
            | HmacError::TimestampSkewed
            | HmacError::NonceReplayed => 401,
            HmacError::SignatureMalformed
            | HmacError::MalformedHeader
            | HmacError::TimestampMissing
            | HmacError::TimestampMalformed
            | HmacError::TimestampUnsigned
            | HmacError::NonceMissing
            | HmacError::NonceMalformed
            | HmacError::NonceUnsigned
            | HmacError::ContentMd5Mismatch
            | HmacError::NotUtf8 => 400,
            HmacError::BodyTooLarge => 413,
            HmacError::NonceStoreFull => 503,
            HmacError::BodyNotRead => 500,
        }
    }

    /// Short text for the client.
    pub fn message(&self) -> &'static str {
        match self {
            HmacError::KeyMissing => "X-Ca-Key is missing",
            HmacError::UnknownKey => "unknown access key",
            HmacError::SignatureMissing => "X-Ca-Signature is missing",
            HmacError::SignatureMalformed => "X-Ca-Signature is not Base64",
            HmacError::SignatureMismatch => "the signature does not match the request",
            HmacError::UnsupportedAlgorithm => "X-Ca-Signature-Method is not accepted here",
            HmacError::MalformedHeader => {
                "a signature header is repeated, or X-Ca-Signature-Headers lists too many names"
            }
            HmacError::TimestampMissing => "X-Ca-Timestamp is missing",
            HmacError::TimestampMalformed => "X-Ca-Timestamp or Date is not a valid time",
            HmacError::TimestampUnsigned => {
                "X-Ca-Timestamp must be listed in X-Ca-Signature-Headers"
            }
            HmacError::TimestampSkewed => "the request time is too far from the gateway's clock",
            HmacError::NonceMissing => "X-Ca-Nonce is missing",
            HmacError::NonceMalformed => "X-Ca-Nonce is longer than 128 bytes or not UTF-8",
            HmacError::NonceUnsigned => "X-Ca-Nonce must be listed in X-Ca-Signature-Headers",
            HmacError::NonceReplayed => "this nonce was already used",
            HmacError::NonceStoreFull => {
                "too many recent requests to check for replay; retry later"
            }
            HmacError::ContentMd5Mismatch => "Content-MD5 does not match the body",
            HmacError::BodyTooLarge => "the body is too large to verify its signature",
            HmacError::BodyNotRead => "the request body was not read for verification",
            HmacError::NotUtf8 => "the string to sign is not UTF-8",
        }
    }
}

impl fmt::Display for HmacError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for HmacError {}

/// True when the request carries HMAC credentials at all (an `X-Ca-Key` header), so the glue
/// can try the route's other methods first when it does not.
pub fn present(headers: &HeaderMap) -> bool {
    headers.contains_key(X_CA_KEY)
}

/// True when verification needs the request body: a form content type (its parameters are
/// signed) or a `Content-MD5` header. The glue then reads up to `max_body` (plus one byte, to
/// tell "too large" apart) and passes it to [`verify`].
pub fn needs_body(headers: &HeaderMap) -> bool {
    headers.contains_key(CONTENT_MD5) || is_form(headers)
}

/// The checks that need neither the body nor a secret: credential headers present and
/// well-formed, algorithm accepted, timestamp fresh and signed, nonce well-formed and signed,
/// `Content-Length` within `max_body` when the body is needed. Call it at header time to
/// refuse before buffering a body; [`verify`] runs it again.
pub fn precheck(
    headers: &HeaderMap,
    settings: &HmacSettings,
    now: SystemTime,
) -> Result<(), HmacError> {
    parse_head(headers, settings, now).map(|_| ())
}

/// Verifies a signed request and returns the consumer of its access key. `now` is the
/// gateway's wall clock (the timestamp check); the nonce store runs on the monotonic clock.
pub fn verify(
    req: &HmacRequest,
    keys: &HmacKeys,
    settings: &HmacSettings,
    nonces: &NonceStore,
    now: SystemTime,
) -> Result<usize, HmacError> {
    let head = parse_head(req.headers, settings, now)?;

    let body = if needs_body(req.headers) {
        let body = req.body.ok_or(HmacError::BodyNotRead)?;
        if body.len() as u64 > settings.body_limit() {
            return Err(HmacError::BodyTooLarge);
        }
        Some(body)
    } else {
        None
    };
    let form = body.filter(|_| is_form(req.headers));

    let alibaba = if settings.dialects.contains(&Dialect::Alibaba) {
        Some(canonical(req, &head.names, form, Dialect::Alibaba)?)
    } else {
        None
    };
    let higress = if settings.dialects.contains(&Dialect::Higress) {
        Some(canonical(req, &head.names, form, Dialect::Higress)?)
            .filter(|h| alibaba.as_ref() != Some(h))
    } else {
        None
    };

    // An unknown key still costs the same HMAC work (with an empty key), so timing tells an
    // unknown key from a wrong signature no more than the error code does.
    let entry = std::str::from_utf8(head.key)
        .ok()
        .and_then(|k| keys.get_key_value(k));
    let secret = entry.map_or(&[][..], |(_, s)| s.secret.as_slice());
    let mut matched = false;
    for candidate in [&alibaba, &higress].into_iter().flatten() {
        matched |= mac_matches(head.algorithm, secret, candidate, &head.signature);
    }
    let Some((access_key, secret)) = entry else {
        return Err(HmacError::UnknownKey);
    };
    if !matched {
        return Err(HmacError::SignatureMismatch);
    }

    if let Some(claimed) = single(req.headers, CONTENT_MD5)? {
        let actual = Md5::digest(body.unwrap_or_default());
        let claimed = BASE64.decode(claimed.trim_ascii()).unwrap_or_default();
        if claimed != actual.as_slice() {
            return Err(HmacError::ContentMd5Mismatch);
        }
    }

    if let Some(nonce) = head.nonce {
        nonces
            .check_and_insert(access_key, nonce, Instant::now())
            .map_err(|e| match e {
                NonceError::Replayed => HmacError::NonceReplayed,
                NonceError::Full => HmacError::NonceStoreFull,
            })?;
    }
    Ok(secret.consumer)
}

/// The string to sign in the `alibaba` dialect (the documented one), for tests and for
/// debugging a client's mismatch. Needs the body for a form content type.
pub fn string_to_sign(req: &HmacRequest) -> Result<String, HmacError> {
    string_to_sign_in(req, Dialect::Alibaba)
}

/// The string to sign in `dialect`.
pub fn string_to_sign_in(req: &HmacRequest, dialect: Dialect) -> Result<String, HmacError> {
    let names = signed_header_names(req.headers)?;
    let form = if is_form(req.headers) {
        Some(req.body.ok_or(HmacError::BodyNotRead)?)
    } else {
        None
    };
    String::from_utf8(canonical(req, &names, form, dialect)?).map_err(|_| HmacError::NotUtf8)
}

/// The credential headers of a request, checked and parsed.
struct Head<'h> {
    key: &'h [u8],
    signature: Vec<u8>,
    algorithm: Algorithm,
    /// `X-Ca-Signature-Headers`, trimmed, without the names that have their own line.
    names: Vec<&'h [u8]>,
    /// The nonce to record, when there is a signed one.
    nonce: Option<&'h str>,
}

fn parse_head<'h>(
    headers: &'h HeaderMap,
    settings: &HmacSettings,
    now: SystemTime,
) -> Result<Head<'h>, HmacError> {
    let key = single(headers, X_CA_KEY)?
        .filter(|k| !k.is_empty())
        .ok_or(HmacError::KeyMissing)?;
    let signature = single(headers, X_CA_SIGNATURE)?
        .map(<[u8]>::trim_ascii)
        .filter(|s| !s.is_empty())
        .ok_or(HmacError::SignatureMissing)?;
    let signature = BASE64
        .decode(signature)
        .map_err(|_| HmacError::SignatureMalformed)?;
    let algorithm = match single(headers, X_CA_SIGNATURE_METHOD)? {
        None | Some(b"") => Algorithm::HmacSha256,
        Some(m) => Algorithm::parse(m).ok_or(HmacError::UnsupportedAlgorithm)?,
    };
    if !settings.allows(algorithm) {
        return Err(HmacError::UnsupportedAlgorithm);
    }
    let names = signed_header_names(headers)?;
    let signed = |name: &str| {
        names
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
    };

    let request_ms = match single(headers, X_CA_TIMESTAMP)? {
        Some(ts) => {
            if !signed(X_CA_TIMESTAMP) {
                return Err(HmacError::TimestampUnsigned);
            }
            timestamp_ms(ts).ok_or(HmacError::TimestampMalformed)?
        }
        None if settings.require_timestamp => return Err(HmacError::TimestampMissing),
        // Date is always signed: it has its own line.
        None => match single(headers, "date")? {
            Some(date) => i128::from(http_date(date).ok_or(HmacError::TimestampMalformed)?) * 1000,
            None => return Err(HmacError::TimestampMissing),
        },
    };
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i128::try_from(d.as_millis()).unwrap_or(i128::MAX));
    let skew_ms = i128::try_from(settings.clock_skew.get().as_millis()).unwrap_or(i128::MAX);
    if (now_ms - request_ms).abs() > skew_ms {
        return Err(HmacError::TimestampSkewed);
    }

    let nonce = match single(headers, X_CA_NONCE)?.filter(|n| !n.is_empty()) {
        Some(n) => {
            if n.len() > MAX_NONCE_LEN {
                return Err(HmacError::NonceMalformed);
            }
            let n = std::str::from_utf8(n).map_err(|_| HmacError::NonceMalformed)?;
            if signed(X_CA_NONCE) {
                Some(n)
            } else if settings.require_nonce {
                return Err(HmacError::NonceUnsigned);
            } else {
                // An unsigned nonce protects nothing: anyone could change it.
                None
            }
        }
        None if settings.require_nonce => return Err(HmacError::NonceMissing),
        None => None,
    };

    if needs_body(headers) {
        let declared = single(headers, "content-length")
            .ok()
            .flatten()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|len| len > settings.body_limit()) {
            return Err(HmacError::BodyTooLarge);
        }
    }

    Ok(Head {
        key,
        signature,
        algorithm,
        names,
        nonce,
    })
}

/// `X-Ca-Signature-Headers` as a list of names to sign.
fn signed_header_names(headers: &HeaderMap) -> Result<Vec<&[u8]>, HmacError> {
    let Some(list) = single(headers, X_CA_SIGNATURE_HEADERS)? else {
        return Ok(Vec::new());
    };
    let mut names = Vec::new();
    for name in list.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
        if name.is_empty()
            || NOT_SIGNED_AS_HEADERS
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
        {
            continue;
        }
        if names.len() == MAX_SIGNED_HEADERS {
            return Err(HmacError::MalformedHeader);
        }
        names.push(name);
    }
    Ok(names)
}

/// Builds the string to sign (as bytes: header values and decoded parameters need not be
/// UTF-8, and the HMAC does not care).
fn canonical(
    req: &HmacRequest,
    names: &[&[u8]],
    form: Option<&[u8]>,
    dialect: Dialect,
) -> Result<Vec<u8>, HmacError> {
    let h = req.headers;
    let mut out = Vec::with_capacity(256 + req.path_and_query.len() + form.map_or(0, <[u8]>::len));
    out.extend_from_slice(req.method.as_bytes());
    out.push(b'\n');
    for name in ["accept", CONTENT_MD5, "content-type", "date"] {
        out.extend_from_slice(single(h, name)?.unwrap_or_default());
        out.push(b'\n');
    }

    let mut listed: Vec<Cow<[u8]>> = names
        .iter()
        .map(|&n| match dialect {
            Dialect::Alibaba => Cow::Borrowed(n),
            Dialect::Higress => Cow::Owned(n.to_ascii_lowercase()),
        })
        .collect();
    listed.sort();
    for name in &listed {
        out.extend_from_slice(name);
        out.push(b':');
        // A name that is not a valid header name cannot be present: an empty value.
        if let Ok(header) = HeaderName::from_bytes(name) {
            out.extend_from_slice(single(h, &header)?.unwrap_or_default());
        }
        out.push(b'\n');
    }

    let (path, query) = split_target(req.path_and_query);
    out.extend_from_slice(path.as_bytes());
    let plus_is_space = dialect == Dialect::Alibaba;
    let mut params = Vec::new();
    parse_params(query.as_bytes(), plus_is_space, &mut params);
    if let Some(form) = form {
        parse_params(form, plus_is_space, &mut params);
    }
    // Stable: equal keys keep their order (query first), so dedup keeps the first value.
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params.dedup_by(|later, first| later.0 == first.0);
    for (i, (key, value)) in params.iter().enumerate() {
        out.push(if i == 0 { b'?' } else { b'&' });
        out.extend_from_slice(key);
        if !(value.is_empty() && dialect == Dialect::Alibaba) {
            out.push(b'=');
            out.extend_from_slice(value);
        }
    }
    Ok(out)
}

/// The path and the query of a request-target.
fn split_target(target: &str) -> (&str, &str) {
    let mut target = target;
    if !target.starts_with('/') {
        if let Some(i) = target.find("://") {
            let rest = &target[i + 3..];
            target = rest.find(['/', '?']).map_or("", |j| &rest[j..]);
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    (if path.is_empty() { "/" } else { path }, query)
}

type Param<'a> = (Cow<'a, [u8]>, Cow<'a, [u8]>);

fn parse_params<'a>(data: &'a [u8], plus_is_space: bool, out: &mut Vec<Param<'a>>) {
    for pair in data.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        out.push((
            percent_decode(key, plus_is_space),
            percent_decode(value, plus_is_space),
        ));
    }
}

/// `%XX` → byte; `+` → space when `plus_is_space`; anything else, including a `%` that does not
/// start a valid escape, stays as it is.
fn percent_decode(s: &[u8], plus_is_space: bool) -> Cow<'_, [u8]> {
    if !s.iter().any(|&b| b == b'%' || (plus_is_space && b == b'+')) {
        return Cow::Borrowed(s);
    }
    let hex = |b: Option<&u8>| b.and_then(|&b| (b as char).to_digit(16));
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' => {
                if let (Some(hi), Some(lo)) = (hex(s.get(i + 1)), hex(s.get(i + 2))) {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

fn is_form(headers: &HeaderMap) -> bool {
    headers.get_all("content-type").iter().any(|v| {
        v.as_bytes()
            .windows(FORM.len())
            .any(|w| w.eq_ignore_ascii_case(FORM))
    })
}

/// A header that may appear at most once (`malformed_header` otherwise).
fn single<K: AsHeaderName>(headers: &HeaderMap, name: K) -> Result<Option<&[u8]>, HmacError> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(HmacError::MalformedHeader);
    }
    Ok(first.map(|v| v.as_bytes()))
}

/// Constant-time comparison of the client's (decoded) signature with the HMAC of `message`.
fn mac_matches(algorithm: Algorithm, secret: &[u8], message: &[u8], signature: &[u8]) -> bool {
    match algorithm {
        Algorithm::HmacSha256 => match Hmac::<Sha256>::new_from_slice(secret) {
            Ok(mut mac) => {
                mac.update(message);
                mac.verify_slice(signature).is_ok()
            }
            Err(_) => false,
        },
        Algorithm::HmacSha1 => match Hmac::<Sha1>::new_from_slice(secret) {
            Ok(mut mac) => {
                mac.update(message);
                mac.verify_slice(signature).is_ok()
            }
            Err(_) => false,
        },
    }
}

/// `X-Ca-Timestamp` in milliseconds; fewer than 13 digits are seconds [H].
fn timestamp_ms(value: &[u8]) -> Option<i128> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = i128::from(std::str::from_utf8(digits).ok()?.parse::<u64>().ok()?);
    Some(if digits.len() < 13 { n * 1000 } else { n })
}

/// Seconds since the epoch of an HTTP date: IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`, also
/// with Alibaba's `GMT+00:00`), RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) or asctime
/// (`Sun Nov  6 08:49:37 1994`), the forms Higress's `httpTime` reads.
fn http_date(value: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(value).ok()?;
    let parts: Vec<&str> = text.split_ascii_whitespace().collect();
    let (day, month, year, time) = match parts.as_slice() {
        [weekday, day, month, year, time, "GMT" | "GMT+00:00"] if weekday.ends_with(',') => {
            (*day, *month, number(year)?, *time)
        }
        [weekday, date, time, "GMT"] if weekday.ends_with(',') => {
            let mut dmy = date.split('-');
            let (day, month, yy) = (dmy.next()?, dmy.next()?, dmy.next()?);
            if dmy.next().is_some() || yy.len() != 2 {
                return None;
            }
            let yy = number(yy)?;
            (
                day,
                month,
                if yy < 70 { 2000 + yy } else { 1900 + yy },
                *time,
            )
        }
        [_, month, day, time, year] => (*day, *month, number(year)?, *time),
        _ => return None,
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? as i64 + 1;
    let day = number(day)?;
    let mut hms = time.split(':');
    let (h, m, s) = (
        number(hms.next()?)?,
        number(hms.next()?)?,
        number(hms.next()?)?,
    );
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if hms.next().is_some()
        || !(1970..=9999).contains(&year)
        || !(1..=month_days).contains(&day)
        || h > 23
        || m > 59
        || s > 60
    {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Up to 4 ASCII digits (no sign, no spaces).
fn number(s: &str) -> Option<i64> {
    if s.is_empty() || s.len() > 4 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    //! Requests are signed by `tests/fixtures/ca_sign.py`, a signer written separately from the
    //! documentation and Higress's source, so a shared misreading would have to be made twice.

    use super::*;
    use http::HeaderValue;
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::atomic::{AtomicU64, Ordering};

    const T0_MS: u64 = 1_700_000_000_000;
    const T0_DATE: &str = "Tue, 14 Nov 2023 22:13:20 GMT";
    const AK: &str = "ak-live-1";
    const SK: &str = "sk-live-1-secret";
    const FORM_CT: &str = "application/x-www-form-urlencoded; charset=utf-8";

    fn at_ms(offset: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(T0_MS.saturating_add_signed(offset))
    }

    fn t0() -> SystemTime {
        at_ms(0)
    }

    fn keys() -> HmacKeys {
        let secret = |consumer, s: &str| HmacSecret {
            consumer,
            secret: s.as_bytes().to_vec(),
        };
        HashMap::from([
            (AK.to_string(), secret(7, SK)),
            // Same secret, other consumer: X-Ca-Key must be signed for this to be safe.
            ("ak-live-2".to_string(), secret(8, SK)),
            ("appKey".to_string(), secret(3, "appSecret")),
            ("203753385".to_string(), secret(4, "unknown")),
        ])
    }

    fn store() -> NonceStore {
        NonceStore::new(1000, HmacSettings::default().nonce_window())
    }

    fn defaults() -> HmacSettings {
        HmacSettings::default()
    }

    fn fixture() -> PathBuf {
        // `file!()` is relative to the crate root in the main crate, and absolute when this file
        // is mounted elsewhere with `#[path]`; either way the crate root is four levels up.
        let here = Path::new(file!());
        let here = if here.is_absolute() {
            here.to_path_buf()
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(here)
        };
        here.ancestors()
            .nth(4)
            .expect("src/policy/auth/hmac.rs is four levels below the crate root")
            .join("tests/fixtures/ca_sign.py")
    }

    fn fresh_nonce() -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        format!("nonce-{}", N.fetch_add(1, Ordering::Relaxed))
    }

    /// A request for the independent signer.
    #[derive(Clone)]
    struct Req {
        method: String,
        target: String,
        headers: Vec<(String, String)>,
        body: Option<String>,
    }

    fn req(method: &str, target: &str) -> Req {
        Req {
            method: method.into(),
            target: target.into(),
            headers: Vec::new(),
            body: None,
        }
    }

    impl Req {
        fn header(mut self, name: &str, value: &str) -> Req {
            self.headers.push((name.into(), value.into()));
            self
        }

        fn body(mut self, body: &str) -> Req {
            self.body = Some(body.into());
            self
        }

        /// Signs with ca_sign.py as `AK` at `T0_MS` with a fresh nonce; `args` come last, so
        /// they override those.
        fn sign(&self, args: &[&str]) -> Signed {
            let given: BTreeMap<&str, &str> = self
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let mut cmd = Command::new("/usr/bin/python3");
            cmd.arg(fixture())
                .args(["--method", &self.method, "--target", &self.target])
                .args(["--headers", &serde_json::to_string(&given).unwrap()])
                .args([
                    "--key",
                    AK,
                    "--secret",
                    SK,
                    "--timestamp",
                    &T0_MS.to_string(),
                ])
                .args(["--nonce", &fresh_nonce()]);
            if let Some(body) = &self.body {
                cmd.args(["--body", body]);
            }
            let out = cmd.args(args).output().expect("run /usr/bin/python3");
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            assert!(out.status.success(), "ca_sign.py failed: {stderr}");
            let added: BTreeMap<String, String> =
                serde_json::from_slice(&out.stdout).expect("ca_sign.py prints a JSON object");
            let mut headers = HeaderMap::new();
            for (n, v) in self.headers.iter().map(|(n, v)| (n, v)).chain(&added) {
                headers.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            Signed {
                method: self.method.clone(),
                target: self.target.clone(),
                headers,
                body: self.body.clone().map(String::into_bytes),
                client_string: stderr,
            }
        }
    }

    /// A change to a signed request.
    type Tamper = Box<dyn Fn(&mut Signed)>;

    #[derive(Clone)]
    struct Signed {
        method: String,
        target: String,
        headers: HeaderMap,
        body: Option<Vec<u8>>,
        /// What the signer signed (its stderr), to show on a mismatch.
        client_string: String,
    }

    impl Signed {
        fn request(&self) -> HmacRequest<'_> {
            HmacRequest {
                method: &self.method,
                path_and_query: &self.target,
                headers: &self.headers,
                body: self.body.as_deref(),
            }
        }

        fn verify_with(
            &self,
            settings: &HmacSettings,
            nonces: &NonceStore,
            now: SystemTime,
        ) -> Result<usize, HmacError> {
            verify(&self.request(), &keys(), settings, nonces, now)
        }

        fn verify(&self) -> Result<usize, HmacError> {
            self.verify_with(&defaults(), &store(), t0())
        }

        fn assert_accepted(&self, what: &str) {
            let result = self.verify();
            if result != Ok(7) {
                panic!(
                    "{what}: {result:?}\nclient signed:\n{}\nalibaba:\n{:?}\nhigress:\n{:?}",
                    self.client_string,
                    string_to_sign_in(&self.request(), Dialect::Alibaba),
                    string_to_sign_in(&self.request(), Dialect::Higress),
                );
            }
        }

        fn set(&mut self, name: &str, value: &str) {
            self.headers.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
    }

    fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn golden_vectors_from_higress() {
        // plugins/wasm-cpp/extensions/hmac_auth/plugin_test.cc (Sign, ParamInBody).
        let signed = "x-ca-key,x-ca-nonce,x-ca-timestamp";
        let get = header_map(&[
            ("accept", "application/json"),
            ("content-type", "application/json"),
            ("x-ca-timestamp", "1646365291734"),
            ("x-ca-nonce", "787dd0c2-7bd8-41cd-9c19-62c05ea524a2"),
            ("x-ca-key", "appKey"),
            ("x-ca-signature-headers", signed),
            (
                "x-ca-signature",
                "EdJSFAMOWyXZOpXhevZnjuS0ZafnwnCqaSk5hz+tXo8=",
            ),
        ]);
        let r = HmacRequest {
            method: "GET",
            path_and_query: "/Third/Tools/checkSign",
            headers: &get,
            body: None,
        };
        let at = UNIX_EPOCH + Duration::from_millis(1_646_365_291_734);
        assert_eq!(verify(&r, &keys(), &defaults(), &store(), at), Ok(3));

        let post = header_map(&[
            ("accept", "application/json"),
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-ca-timestamp", "1646646682418"),
            ("x-ca-nonce", "ca5a6753-b76c-4fff-a9d9-e5bb643e8cdf"),
            ("x-ca-key", "appKey"),
            ("x-ca-signature-headers", signed),
            (
                "x-ca-signature",
                "gmf9xq0hc95Hmt+7G+OocS009ka3v1v0rvfshKzYc3w=",
            ),
        ]);
        let body = b"nickname=nickname&room_id=6893&uuid=uuid&photo=photo";
        let r = HmacRequest {
            method: "POST",
            path_and_query: "/Third/User/getNyAccessToken",
            headers: &post,
            body: Some(body),
        };
        let at = UNIX_EPOCH + Duration::from_millis(1_646_646_682_418);
        assert_eq!(verify(&r, &keys(), &defaults(), &store(), at), Ok(3));
        assert_eq!(
            string_to_sign(&r).unwrap(),
            "POST\napplication/json\n\napplication/x-www-form-urlencoded\n\n\
             x-ca-key:appKey\nx-ca-nonce:ca5a6753-b76c-4fff-a9d9-e5bb643e8cdf\n\
             x-ca-timestamp:1646646682418\n\
             /Third/User/getNyAccessToken?nickname=nickname&photo=photo&room_id=6893&uuid=uuid"
        );
    }

    #[test]
    fn documented_example_string_to_sign() {
        // Alibaba's example, as restated in Higress's hmac_auth README ("Example of Extracting
        // Signing String"); the README's rendering drops the empty Content-MD5 line that
        // plugin_test.cc keeps. The secret is not published, so only the string is pinned.
        let h = header_map(&[
            ("accept", "application/json; charset=utf-8"),
            ("ca_version", "1"),
            (
                "content-type",
                "application/x-www-form-urlencoded; charset=utf-8",
            ),
            ("x-ca-timestamp", "1525872629832"),
            ("date", "Wed, 09 May 2018 13:30:29 GMT+00:00"),
            ("user-agent", "ALIYUN-ANDROID-DEMO"),
            ("x-ca-nonce", "c9f15cbf-f4ac-4a6c-b54d-f51abf4b5b44"),
            ("x-ca-key", "203753385"),
            ("x-ca-signature-method", "HmacSHA256"),
            (
                "x-ca-signature-headers",
                "x-ca-timestamp,x-ca-key,x-ca-nonce,x-ca-signature-method",
            ),
            (
                "x-ca-signature",
                "xfX+bZxY2yl7EB/qdoDy9v/uscw3Nnj1pgoU+Bm6xdM=",
            ),
        ]);
        let r = HmacRequest {
            method: "POST",
            path_and_query: "/http2test/test?param1=test",
            headers: &h,
            body: Some(b"username=xiaoming&password=123456789"),
        };
        let expected = "POST\napplication/json; charset=utf-8\n\n\
            application/x-www-form-urlencoded; charset=utf-8\n\
            Wed, 09 May 2018 13:30:29 GMT+00:00\n\
            x-ca-key:203753385\nx-ca-nonce:c9f15cbf-f4ac-4a6c-b54d-f51abf4b5b44\n\
            x-ca-signature-method:HmacSHA256\nx-ca-timestamp:1525872629832\n\
            /http2test/test?param1=test&password=123456789&username=xiaoming";
        assert_eq!(string_to_sign(&r).as_deref(), Ok(expected));
        assert_eq!(
            string_to_sign_in(&r, Dialect::Higress).as_deref(),
            Ok(expected)
        );
        // Its Date, in Alibaba's `GMT+00:00` form, is within a second of its X-Ca-Timestamp.
        assert_eq!(
            http_date(b"Wed, 09 May 2018 13:30:29 GMT+00:00"),
            Some(1_525_872_629)
        );
        let at = UNIX_EPOCH + Duration::from_millis(1_525_872_629_832);
        assert_eq!(
            verify(&r, &keys(), &defaults(), &store(), at),
            Err(HmacError::SignatureMismatch)
        );
    }

    #[test]
    fn accepts_what_an_independent_signer_signs() {
        let all_headers = "X-Custom-B,x-custom-a,X-Ca-Key,X-Ca-Nonce,X-Ca-Timestamp,\
                           X-Ca-Stage,X-Ca-Signature-Method,X-Absent, Accept,date,,X-Ca-Signature";
        let cases: Vec<(&str, Req, Vec<&str>)> = vec![
            (
                "GET with a query",
                req("GET", "/api/v1/items?b=2&a=1&c=x%2By&d=%7E&A=upper")
                    .header("Accept", "application/json"),
                vec![],
            ),
            (
                "no query, no X-Ca-Signature-Method",
                req("GET", "/health"),
                vec!["--algorithm", ""],
            ),
            (
                "HmacSHA1",
                req("GET", "/sha1?x=1"),
                vec!["--algorithm", "HmacSHA1"],
            ),
            (
                "POST form",
                req("POST", "/form?q=1")
                    .header("Content-Type", FORM_CT)
                    .body("name=alice&age=30&note=hello+world%21"),
                vec![],
            ),
            (
                "empty values",
                req("POST", "/e?flag&empty=&x=1&&")
                    .header("Content-Type", FORM_CT)
                    .body("z=&y"),
                vec![],
            ),
            (
                "repeated parameters",
                req("POST", "/r?a=2&a=1&b=1&b=")
                    .header("Content-Type", FORM_CT)
                    .body("a=3&c=1&c=2"),
                vec![],
            ),
            (
                "unicode path and query",
                req(
                    "GET",
                    "/%E6%95%B0%E6%8D%AE/%E9%A1%B9?%E5%90%8D=%E5%80%BC&q=%E4%B8%AD+%E6%96%87",
                ),
                vec![],
            ),
            (
                "unicode form, content type in capitals",
                req("PUT", "/u")
                    .header("Content-Type", "APPLICATION/X-WWW-FORM-URLENCODED")
                    .body("%E5%90%8D=%E5%80%BC+x&k=%F0%9F%94%91"),
                vec![],
            ),
            (
                "several signed headers, one absent",
                req("GET", "/h")
                    .header("X-Ca-Stage", "RELEASE")
                    .header("X-Custom-B", "two")
                    .header("x-custom-a", "one")
                    .header("User-Agent", "ALIYUN-DEMO")
                    .header("Accept", "application/json")
                    .header("Date", T0_DATE),
                vec!["--signed-headers", all_headers],
            ),
            (
                "JSON body with Content-MD5",
                req("POST", "/json")
                    .header("Content-Type", "application/json")
                    .header("Accept", "application/json")
                    .body("{\"a\":1}"),
                vec!["--content-md5"],
            ),
            (
                "bad percent-encoding",
                req("GET", "/p?a=%zz&b=%E4%B8&c=%&d=100%"),
                vec![],
            ),
            (
                "Date and Accept",
                req("DELETE", "/d")
                    .header("Date", T0_DATE)
                    .header("Accept", "*/*"),
                vec![],
            ),
        ];
        for (dialect, flag) in [(Dialect::Alibaba, "alibaba"), (Dialect::Higress, "higress")] {
            // Only the signer's dialect, so one dialect cannot hide a bug in the other.
            let only = HmacSettings {
                dialects: vec![dialect],
                ..defaults()
            };
            for (name, r, args) in &cases {
                let mut args = args.clone();
                args.extend(["--dialect", flag]);
                let s = r.sign(&args);
                let result = s.verify_with(&only, &store(), t0());
                assert_eq!(
                    result,
                    Ok(7),
                    "{name} ({flag})\nclient signed:\n{}\nwe signed:\n{:?}",
                    s.client_string,
                    string_to_sign_in(&s.request(), dialect)
                );
                s.assert_accepted(name);
            }
        }
    }

    #[test]
    fn tampering_with_any_signed_part_fails() {
        let signed = req("POST", "/orders/1?a=1&b=2")
            .header("Accept", "application/json")
            .header("Content-Type", "application/json")
            .header("Date", T0_DATE)
            .header("X-Custom", "v")
            .header("User-Agent", "demo/1.0")
            .body("{\"qty\":1}")
            .sign(&[
                "--content-md5",
                "--signed-headers",
                "X-Ca-Key,X-Ca-Nonce,X-Ca-Timestamp,X-Ca-Signature-Method,X-Custom",
            ]);
        signed.assert_accepted("untouched");
        let mut s = signed.clone();
        s.set("User-Agent", "other/2.0");
        s.assert_accepted("an unsigned header changed");

        let other_body = b"{\"qty\":9}".to_vec();
        let other_md5 = BASE64.encode(Md5::digest(&other_body));
        let tampers: Vec<(&str, Tamper)> = vec![
            ("method", Box::new(|s| s.method = "PUT".into())),
            ("path", Box::new(|s| s.target = "/orders/2?a=1&b=2".into())),
            (
                "query value",
                Box::new(|s| s.target = "/orders/1?a=1&b=3".into()),
            ),
            (
                "query added",
                Box::new(|s| s.target = "/orders/1?a=1&b=2&c".into()),
            ),
            (
                "query dropped",
                Box::new(|s| s.target = "/orders/1?a=1".into()),
            ),
            ("signed header", Box::new(|s| s.set("X-Custom", "w"))),
            (
                "Content-MD5",
                Box::new(|s| s.set("Content-MD5", "1B2M2Y8AsgTpgAmY7PhCfg==")),
            ),
            (
                "Content-MD5 and body together",
                Box::new(move |s| {
                    s.set("Content-MD5", &other_md5);
                    s.body = Some(other_body.clone());
                }),
            ),
            ("Accept", Box::new(|s| s.set("Accept", "text/html"))),
            (
                "Content-Type",
                Box::new(|s| s.set("Content-Type", "text/plain")),
            ),
            (
                "Date",
                Box::new(|s| s.set("Date", "Tue, 14 Nov 2023 22:13:21 GMT")),
            ),
            (
                "X-Ca-Timestamp",
                Box::new(|s| s.set("X-Ca-Timestamp", "1700000000001")),
            ),
            ("X-Ca-Nonce", Box::new(|s| s.set("X-Ca-Nonce", "another"))),
            (
                "X-Ca-Signature-Method",
                Box::new(|s| s.set("X-Ca-Signature-Method", "HmacSHA1")),
            ),
            (
                "X-Ca-Key (same secret)",
                Box::new(|s| s.set("X-Ca-Key", "ak-live-2")),
            ),
            (
                "X-Ca-Signature",
                Box::new(|s| s.set("X-Ca-Signature", &BASE64.encode([0u8; 32]))),
            ),
        ];
        for (what, tamper) in &tampers {
            let mut s = signed.clone();
            tamper(&mut s);
            assert_eq!(s.verify(), Err(HmacError::SignatureMismatch), "{what}");
        }

        let form = req("POST", "/f?q=1")
            .header("Content-Type", FORM_CT)
            .body("a=1&b=2")
            .sign(&[]);
        form.assert_accepted("form");
        for body in ["a=1&b=3", "a=1&b=2&c=3", "a=1"] {
            let mut s = form.clone();
            s.body = Some(body.as_bytes().to_vec());
            assert_eq!(s.verify(), Err(HmacError::SignatureMismatch), "form {body}");
        }
    }

    #[test]
    fn a_nonce_is_accepted_once_and_only_after_the_signature() {
        let nonces = store();
        let s = req("GET", "/r").sign(&[]);
        assert_eq!(s.verify_with(&defaults(), &nonces, t0()), Ok(7));
        assert_eq!(
            s.verify_with(&defaults(), &nonces, t0()),
            Err(HmacError::NonceReplayed)
        );
        assert_eq!(HmacError::NonceReplayed.status(), 401);

        // A forged request carrying someone's nonce does not spend it.
        let genuine = req("GET", "/x").sign(&["--nonce", "shared-nonce"]);
        let mut forged = genuine.clone();
        forged.target = "/y".into();
        assert_eq!(
            forged.verify_with(&defaults(), &nonces, t0()),
            Err(HmacError::SignatureMismatch)
        );
        assert_eq!(genuine.verify_with(&defaults(), &nonces, t0()), Ok(7));

        // Without require_nonce, no nonce is fine, and a signed one is still checked.
        let relaxed = HmacSettings {
            require_nonce: false,
            ..defaults()
        };
        let none = req("GET", "/n").sign(&["--no-nonce"]);
        assert_eq!(none.verify(), Err(HmacError::NonceMissing));
        assert_eq!(none.verify_with(&relaxed, &nonces, t0()), Ok(7));
        let once = req("GET", "/o").sign(&[]);
        assert_eq!(once.verify_with(&relaxed, &nonces, t0()), Ok(7));
        assert_eq!(
            once.verify_with(&relaxed, &nonces, t0()),
            Err(HmacError::NonceReplayed)
        );

        // A full store fails closed.
        let tiny = NonceStore::new(1, Duration::from_secs(60));
        assert_eq!(
            req("GET", "/1")
                .sign(&[])
                .verify_with(&defaults(), &tiny, t0()),
            Ok(7)
        );
        let refused = req("GET", "/2")
            .sign(&[])
            .verify_with(&defaults(), &tiny, t0());
        assert_eq!(refused, Err(HmacError::NonceStoreFull));
        assert_eq!(HmacError::NonceStoreFull.status(), 503);
    }

    #[test]
    fn stale_and_future_requests_are_refused() {
        let s = req("GET", "/t").sign(&[]);
        for (minutes, fresh) in [
            (-16, false),
            (-14, true),
            (0, true),
            (14, true),
            (16, false),
        ] {
            let result = s.verify_with(&defaults(), &store(), at_ms(minutes * 60_000));
            let expected = if fresh {
                Ok(7)
            } else {
                Err(HmacError::TimestampSkewed)
            };
            assert_eq!(result, expected, "{minutes} minutes");
        }
        for edge in [-15 * 60_000, 15 * 60_000] {
            assert_eq!(s.verify_with(&defaults(), &store(), at_ms(edge)), Ok(7));
        }
        let tight = HmacSettings {
            clock_skew: Dur(Duration::from_secs(30)),
            ..defaults()
        };
        assert_eq!(
            s.verify_with(&tight, &store(), at_ms(-31_000)),
            Err(HmacError::TimestampSkewed)
        );

        // Fewer than 13 digits are seconds (Higress).
        let seconds = req("GET", "/t").sign(&["--timestamp", &(T0_MS / 1000).to_string()]);
        assert_eq!(seconds.verify(), Ok(7));
        for bad in [
            "17e11",
            "-1700000000000",
            "",
            "99999999999999999999",
            "１７",
        ] {
            let s = req("GET", "/t").sign(&["--timestamp", bad]);
            // `--timestamp ''` makes the signer take its own clock: not malformed, just stale.
            let expected = if bad.is_empty() {
                Err(HmacError::TimestampSkewed)
            } else {
                Err(HmacError::TimestampMalformed)
            };
            assert_eq!(s.verify(), expected, "timestamp {bad:?}");
        }
    }

    #[test]
    fn date_stands_in_for_the_timestamp_when_allowed() {
        let relaxed = HmacSettings {
            require_timestamp: false,
            ..defaults()
        };
        let s = req("GET", "/d")
            .header("Date", T0_DATE)
            .sign(&["--no-timestamp"]);
        assert_eq!(s.verify_with(&relaxed, &store(), t0()), Ok(7));
        for minutes in [-16, 16] {
            assert_eq!(
                s.verify_with(&relaxed, &store(), at_ms(minutes * 60_000)),
                Err(HmacError::TimestampSkewed)
            );
        }
        assert_eq!(s.verify(), Err(HmacError::TimestampMissing));

        for date in [
            "Tuesday, 14-Nov-23 22:13:20 GMT",
            "Tue Nov 14 22:13:20 2023",
            "Tue, 14 Nov 2023 22:13:20 GMT+00:00",
        ] {
            let s = req("GET", "/d").header("Date", date).sign(&[
                "--no-timestamp",
                "--dialect",
                "higress",
            ]);
            assert_eq!(s.verify_with(&relaxed, &store(), t0()), Ok(7), "{date}");
        }
        let neither = req("GET", "/d").sign(&["--no-timestamp"]);
        assert_eq!(
            neither.verify_with(&relaxed, &store(), t0()),
            Err(HmacError::TimestampMissing)
        );
        let garbage = req("GET", "/d")
            .header("Date", "yesterday")
            .sign(&["--no-timestamp"]);
        assert_eq!(
            garbage.verify_with(&relaxed, &store(), t0()),
            Err(HmacError::TimestampMalformed)
        );
    }

    #[test]
    fn content_md5_must_match_the_body() {
        let s = req("POST", "/m")
            .header("Content-Type", "application/octet-stream")
            .body("payload")
            .sign(&["--content-md5"]);
        s.assert_accepted("Content-MD5");
        let mut changed = s.clone();
        changed.body = Some(b"payloaD".to_vec());
        assert_eq!(changed.verify(), Err(HmacError::ContentMd5Mismatch));
        assert_eq!(HmacError::ContentMd5Mismatch.status(), 400);

        // The client signed a Content-MD5 that is not its body's.
        let empty_md5 = "1B2M2Y8AsgTpgAmY7PhCfg==";
        let wrong = req("POST", "/m")
            .header("Content-MD5", empty_md5)
            .body("payload")
            .sign(&[]);
        assert_eq!(wrong.verify(), Err(HmacError::ContentMd5Mismatch));
        let garbage = req("POST", "/m")
            .header("Content-MD5", "not base64!")
            .body("payload")
            .sign(&[]);
        assert_eq!(garbage.verify(), Err(HmacError::ContentMd5Mismatch));
        // The MD5 of an empty body is accepted for an empty body (Higress refuses it).
        let empty = req("POST", "/m")
            .header("Content-MD5", empty_md5)
            .body("")
            .sign(&[]);
        empty.assert_accepted("empty body");
        // Unpadded Base64 is fine too.
        let unpadded = req("POST", "/m")
            .header("Content-MD5", empty_md5.trim_end_matches('='))
            .body("")
            .sign(&[]);
        unpadded.assert_accepted("unpadded Content-MD5");
    }

    #[test]
    fn unknown_keys_secrets_and_algorithms_are_refused() {
        let unknown = req("GET", "/k").sign(&["--key", "ak-unknown"]);
        assert_eq!(unknown.verify(), Err(HmacError::UnknownKey));
        assert_eq!(HmacError::UnknownKey.status(), 401);
        let wrong_secret = req("GET", "/k").sign(&["--secret", "not-the-secret"]);
        assert_eq!(wrong_secret.verify(), Err(HmacError::SignatureMismatch));

        let sha1 = req("GET", "/k").sign(&["--algorithm", "HmacSHA1"]);
        let only_sha256 = HmacSettings {
            algorithms: vec!["HmacSHA256".into()],
            ..defaults()
        };
        assert_eq!(sha1.verify(), Ok(7));
        assert_eq!(
            sha1.verify_with(&only_sha256, &store(), t0()),
            Err(HmacError::UnsupportedAlgorithm)
        );
        let sha512 = req("GET", "/k").sign(&["--algorithm", "HmacSHA512"]);
        assert_eq!(sha512.verify(), Err(HmacError::UnsupportedAlgorithm));
        // Higress takes any spelling but `HmacSHA1` for SHA-256; the case is not checked here.
        let lower = req("GET", "/k").sign(&["--algorithm", "hmacsha256"]);
        assert_eq!(lower.verify(), Ok(7));
    }

    #[test]
    fn each_dialect_can_be_turned_off() {
        let target = "/e?flag&x=a+b";
        let alibaba = req("GET", target)
            .header("X-Ca-Stage", "TEST")
            .sign(&["--dialect", "alibaba"]);
        let higress = req("GET", target)
            .header("X-Ca-Stage", "TEST")
            .sign(&["--dialect", "higress"]);
        let only = |d| HmacSettings {
            dialects: vec![d],
            ..defaults()
        };
        let check = |s: &Signed, d| s.verify_with(&only(d), &store(), t0());
        assert_eq!(check(&alibaba, Dialect::Alibaba), Ok(7));
        assert_eq!(
            check(&alibaba, Dialect::Higress),
            Err(HmacError::SignatureMismatch)
        );
        assert_eq!(check(&higress, Dialect::Higress), Ok(7));
        assert_eq!(
            check(&higress, Dialect::Alibaba),
            Err(HmacError::SignatureMismatch)
        );

        let a = string_to_sign_in(&alibaba.request(), Dialect::Alibaba).unwrap();
        assert!(a.contains("\nX-Ca-Key:ak-live-1\n"), "{a}");
        assert!(a.ends_with("\n/e?flag&x=a b"), "{a}");
        let h = string_to_sign_in(&higress.request(), Dialect::Higress).unwrap();
        assert!(h.contains("\nx-ca-key:ak-live-1\n"), "{h}");
        assert!(h.ends_with("\n/e?flag=&x=a+b"), "{h}");
    }

    #[test]
    fn malformed_requests_are_refused_without_panicking() {
        let ok = req("GET", "/m").sign(&["--nonce", &"n".repeat(MAX_NONCE_LEN)]);
        assert_eq!(ok.verify(), Ok(7));
        let long = req("GET", "/m").sign(&["--nonce", &"n".repeat(MAX_NONCE_LEN + 1)]);
        assert_eq!(long.verify(), Err(HmacError::NonceMalformed));
        let unsigned_nonce =
            req("GET", "/m").sign(&["--signed-headers", "X-Ca-Key,X-Ca-Timestamp"]);
        assert_eq!(unsigned_nonce.verify(), Err(HmacError::NonceUnsigned));
        let unsigned_ts = req("GET", "/m").sign(&["--signed-headers", "X-Ca-Key,X-Ca-Nonce"]);
        assert_eq!(unsigned_ts.verify(), Err(HmacError::TimestampUnsigned));
        assert_eq!(
            req("GET", "/m").sign(&["--no-timestamp"]).verify(),
            Err(HmacError::TimestampMissing)
        );

        let base = req("GET", "/m").header("X-Bin", "x").sign(&[
            "--signed-headers",
            "X-Ca-Key,X-Ca-Nonce,X-Ca-Timestamp,X-Bin",
        ]);
        base.assert_accepted("base");
        let cases: Vec<(&str, Tamper, HmacError)> = vec![
            (
                "no X-Ca-Key",
                Box::new(|s| {
                    s.headers.remove("x-ca-key");
                }),
                HmacError::KeyMissing,
            ),
            (
                "X-Ca-Key twice",
                Box::new(|s| {
                    s.headers
                        .append("x-ca-key", HeaderValue::from_static("ak-live-2"));
                }),
                HmacError::MalformedHeader,
            ),
            (
                "Date twice",
                Box::new(|s| {
                    s.headers.append("date", HeaderValue::from_static(T0_DATE));
                    s.headers.append("date", HeaderValue::from_static(T0_DATE));
                }),
                HmacError::MalformedHeader,
            ),
            (
                "a signed header twice",
                Box::new(|s| {
                    s.headers.append("x-bin", HeaderValue::from_static("y"));
                }),
                HmacError::MalformedHeader,
            ),
            (
                "Accept twice",
                Box::new(|s| {
                    s.headers.append("accept", HeaderValue::from_static("a/b"));
                    s.headers.append("accept", HeaderValue::from_static("c/d"));
                }),
                HmacError::MalformedHeader,
            ),
            (
                "no signature",
                Box::new(|s| {
                    s.headers.remove("x-ca-signature");
                }),
                HmacError::SignatureMissing,
            ),
            (
                "empty signature",
                Box::new(|s| s.set("X-Ca-Signature", "")),
                HmacError::SignatureMissing,
            ),
            (
                "signature not Base64",
                Box::new(|s| s.set("X-Ca-Signature", "not base64!")),
                HmacError::SignatureMalformed,
            ),
            (
                "binary signed header",
                Box::new(|s| {
                    s.headers
                        .insert("x-bin", HeaderValue::from_bytes(&[0xff, 0xfe]).unwrap());
                }),
                HmacError::SignatureMismatch,
            ),
            (
                "binary X-Ca-Key",
                Box::new(|s| {
                    s.headers
                        .insert("x-ca-key", HeaderValue::from_bytes(&[0xff]).unwrap());
                }),
                HmacError::UnknownKey,
            ),
            (
                "binary X-Ca-Nonce",
                Box::new(|s| {
                    s.headers
                        .insert("x-ca-nonce", HeaderValue::from_bytes(&[0xc3]).unwrap());
                }),
                HmacError::NonceMalformed,
            ),
            (
                "binary X-Ca-Signature-Headers",
                Box::new(|s| {
                    let v = HeaderValue::from_bytes(b"x-ca-key,x-ca-nonce,x-ca-timestamp,\xff\xfe")
                        .unwrap();
                    s.headers.insert("x-ca-signature-headers", v);
                }),
                HmacError::SignatureMismatch,
            ),
            (
                "huge query",
                Box::new(|s| s.target = format!("/m?{}", "a=%ff&b&=&%%&".repeat(20_000))),
                HmacError::SignatureMismatch,
            ),
            (
                "path only a question mark",
                Box::new(|s| s.target = "?".into()),
                HmacError::SignatureMismatch,
            ),
        ];
        for (what, tamper, expected) in &cases {
            let mut s = base.clone();
            tamper(&mut s);
            assert_eq!(s.verify(), Err(*expected), "{what}");
        }

        let many: Vec<String> = (0..=MAX_SIGNED_HEADERS)
            .map(|i| format!("x-h{i}"))
            .collect();
        let many = format!("X-Ca-Key,X-Ca-Nonce,X-Ca-Timestamp,{}", many.join(","));
        let s = req("GET", "/m").sign(&["--signed-headers", &many]);
        assert_eq!(s.verify(), Err(HmacError::MalformedHeader));

        // An absolute-form target is reduced to its path and query.
        let mut absolute = req("GET", "/abs?x=1").sign(&[]);
        absolute.target = "http://api.example.com/abs?x=1".into();
        absolute.assert_accepted("absolute-form");
        assert_eq!(split_target("http://h"), ("/", ""));
        assert_eq!(split_target("https://h?q"), ("/", "q"));
        assert_eq!(split_target("*"), ("*", ""));

        // The debugging view says when the string to sign is not text.
        let mut binary = base.clone();
        binary.target = "/m?a=%ff".into();
        assert_eq!(string_to_sign(&binary.request()), Err(HmacError::NotUtf8));
    }

    #[test]
    fn bodies_are_bounded() {
        let big = format!("a={}", "x".repeat(70_000));
        let s = req("POST", "/big")
            .header("Content-Type", FORM_CT)
            .body(&big)
            .sign(&[]);
        assert_eq!(s.verify(), Err(HmacError::BodyTooLarge));
        assert_eq!(HmacError::BodyTooLarge.status(), 413);
        // A declared length over the limit is refused at header time, before any body is read.
        let mut declared = s.headers.clone();
        declared.insert("content-length", HeaderValue::from_static("70002"));
        assert_eq!(
            precheck(&declared, &defaults(), t0()),
            Err(HmacError::BodyTooLarge)
        );
        assert_eq!(precheck(&s.headers, &defaults(), t0()), Ok(()));

        let small = HmacSettings {
            max_body: ByteSize(16),
            ..defaults()
        };
        let s = req("POST", "/s")
            .header("Content-Type", FORM_CT)
            .body("a=0123456789abcdef")
            .sign(&[]);
        assert_eq!(
            s.verify_with(&small, &store(), t0()),
            Err(HmacError::BodyTooLarge)
        );
        s.assert_accepted("within the default limit");
        let mut unread = s.clone();
        unread.body = None;
        assert_eq!(unread.verify(), Err(HmacError::BodyNotRead));

        // Other bodies are neither needed nor looked at.
        let mut json = req("POST", "/j")
            .header("Content-Type", "application/json")
            .body(&big)
            .sign(&[]);
        assert!(!needs_body(&json.headers));
        json.body = None;
        json.assert_accepted("unsigned JSON body");
        assert!(needs_body(&header_map(&[("content-md5", "x")])));
        assert!(needs_body(&header_map(&[("content-type", FORM_CT)])));
        assert!(present(&json.headers));
        assert!(!present(&header_map(&[("authorization", "Bearer x")])));
    }

    #[test]
    fn settings_read_from_yaml_with_defaults() {
        let s: HmacSettings = serde_yaml::from_str("{}").unwrap();
        assert_eq!(s, HmacSettings::default());
        assert_eq!(s.clock_skew.get(), Duration::from_secs(15 * 60));
        assert!(s.require_timestamp && s.require_nonce);
        assert_eq!(s.max_body.get(), 64 * 1024);
        assert_eq!(s.algorithms, ["HmacSHA256", "HmacSHA1"]);
        assert_eq!(s.dialects, [Dialect::Alibaba, Dialect::Higress]);
        assert_eq!(s.nonce_window(), Duration::from_secs(30 * 60));
        assert!(s.validate("routes[0].auth.hmac").is_empty());

        let s: HmacSettings = serde_yaml::from_str(
            "clock_skew: 5m\nrequire_timestamp: false\nrequire_nonce: false\n\
             max_body: 16k\nalgorithms: [HmacSHA256]\ndialects: [alibaba]",
        )
        .unwrap();
        assert_eq!(s.clock_skew.get(), Duration::from_secs(300));
        assert_eq!(s.max_body.get(), 16 * 1024);
        assert_eq!(s.dialects, [Dialect::Alibaba]);
        assert!(s.validate("x").is_empty());

        let err = serde_yaml::from_str::<HmacSettings>("clock_skw: 5m")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field"), "{err}");

        let s: HmacSettings = serde_yaml::from_str(
            "clock_skew: 0s\nmax_body: 65k\nalgorithms: [HmacSHA256, HmacMD5]\ndialects: []",
        )
        .unwrap();
        let paths: Vec<String> = s
            .validate("routes[2].auth.hmac")
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(
            paths,
            [
                "routes[2].auth.hmac.clock_skew",
                "routes[2].auth.hmac.max_body",
                "routes[2].auth.hmac.algorithms[1]",
                "routes[2].auth.hmac.dialects",
            ]
        );
        let none: HmacSettings = serde_yaml::from_str("algorithms: []").unwrap();
        assert_eq!(none.validate("h")[0].path, "h.algorithms");
    }

    #[test]
    fn secrets_never_show_and_errors_are_stable() {
        let debug = format!("{:?}", keys());
        assert!(
            !debug.contains(SK) && !debug.contains("appSecret"),
            "{debug}"
        );
        assert!(debug.contains("<redacted>"));

        use HmacError::*;
        let all = [
            KeyMissing,
            UnknownKey,
            SignatureMissing,
            SignatureMalformed,
            SignatureMismatch,
            UnsupportedAlgorithm,
            MalformedHeader,
            TimestampMissing,
            TimestampMalformed,
            TimestampUnsigned,
            TimestampSkewed,
            NonceMissing,
            NonceMalformed,
            NonceUnsigned,
            NonceReplayed,
            NonceStoreFull,
            ContentMd5Mismatch,
            BodyTooLarge,
            BodyNotRead,
            NotUtf8,
        ];
        let mut codes = std::collections::HashSet::new();
        for e in all {
            let code = e.code();
            let snake = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
            assert!(code.bytes().all(snake), "{code}");
            assert!(codes.insert(code), "duplicate code {code}");
            assert!([400, 401, 413, 500, 503].contains(&e.status()), "{code}");
            assert_eq!(e.to_string(), e.message());
        }
        assert_eq!(SignatureMismatch.code(), "signature_mismatch");
        assert_eq!(TimestampSkewed.code(), "timestamp_skewed");
    }

    #[test]
    fn http_dates() {
        let expected = Some(784_111_777);
        assert_eq!(http_date(b"Sun, 06 Nov 1994 08:49:37 GMT"), expected);
        assert_eq!(http_date(b"Sunday, 06-Nov-94 08:49:37 GMT"), expected);
        assert_eq!(http_date(b"Sun Nov  6 08:49:37 1994"), expected);
        assert_eq!(http_date(b"Sun, 06 Nov 1994 08:49:37 GMT+00:00"), expected);
        assert_eq!(
            http_date(b"Thu, 29 Feb 2024 00:00:00 GMT"),
            Some(1_709_164_800)
        );
        assert_eq!(http_date(T0_DATE.as_bytes()), Some((T0_MS / 1000) as i64));
        for bad in [
            &b"Fri, 30 Feb 2024 00:00:00 GMT"[..],
            b"Sun, 06 Nov 1994 24:00:00 GMT",
            b"Sun, 06 Nov 1994 08:49:37 PST",
            b"Sun, 06 Nov 1994 08:49:37 GMT+08:00",
            b"Sun, 06 Nov 1994 08:49:37",
            b"Sun, +6 Nov 1994 08:49:37 GMT",
            b"Sun, 06 Nov 1969 08:49:37 GMT",
            b"Sun, 06 Nov 1994 08:49 GMT",
            b"Sun, 06 Nov 1994 08:49:37:01 GMT",
            b"",
            b"\xff\xfe",
        ] {
            assert_eq!(http_date(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn percent_decoding_keeps_what_is_not_an_escape() {
        assert_eq!(&*percent_decode(b"a%20b+c", true), b"a b c");
        assert_eq!(&*percent_decode(b"a%20b+c", false), b"a b+c");
        assert_eq!(&*percent_decode(b"%zz%4%%41%", true), b"%zz%4%A%");
        assert_eq!(&*percent_decode(b"%E4%b8%AD", false), "中".as_bytes());
        assert!(matches!(percent_decode(b"plain", true), Cow::Borrowed(_)));
    }
}
