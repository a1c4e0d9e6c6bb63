//! Authentication at the edge: who is calling, checked before anything reaches an upstream.
//!
//! A route's policy (compiled from its `auth:`) lists the methods it accepts, in order. The
//! first method whose credential is *present* decides: a wrong JWT is refused even if the
//! request also carries an API key, so a client learns exactly what failed. A request with no
//! credential at all is refused with `401` (or passes as anonymous, when the route says so). A
//! valid credential of a consumer the route does not allow gets `403`.
//!
//! On success the upstream gets the consumer and tenant in headers (`auth.consumer_header`,
//! `auth.tenant_header`) and the route's `claims_to_headers`. All of those header names are
//! removed from every client request on every route first ([`strip_identity_headers`]), so a
//! client can never claim an identity.
//!
//! Secrets never leave this module: errors carry static codes and messages only.

pub mod consumers;
pub mod credential;
pub mod hmac;
pub mod jwks;
pub mod jwt;
pub mod key;
pub mod nonce;

use crate::tls::ClientCert;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue};
use pingora_http::RequestHeader;

use crate::config::{error, AuthMethod, AuthSettings, CredentialSource, FieldError, RouteAuth};
use crate::respond::AuthFailure;
pub use consumers::ConsumerTable;
use jwt::Issuer;
use nonce::NonceStore;

/// A route's `auth:`, compiled against the consumer table of the same snapshot.
pub struct RoutePolicy {
    methods: Vec<AuthMethod>,
    anonymous: bool,
    allow_consumers: Option<HashSet<usize>>,
    allow_tenants: Option<HashSet<String>>,
    strip: bool,
    claims_to_headers: Vec<(String, HeaderName)>,
    /// Accepted issuers: (name in consumers.yaml, issuer).
    issuers: Vec<(String, Arc<Issuer>)>,
    jwt_from: Vec<CredentialSource>,
    key_from: Vec<CredentialSource>,
    hmac: hmac::HmacSettings,
    /// `WWW-Authenticate` for a 401.
    challenge: &'static str,
    /// A JWT claim the route's quota counts by (`quota: { tenant: { claim: .. } }`).
    capture: Option<String>,
    /// Successes by method (jwt, hmac, key, anonymous), resolved once per snapshot.
    ok: Option<[prometheus::IntCounter; 5]>,
    route: String,
}

/// Who a request is, once its policy passed.
#[derive(Debug, Default)]
pub struct Identity {
    /// Index into the snapshot's `ConsumerTable::consumers`; None for an anonymous request.
    pub consumer: Option<usize>,
    pub tenant: Option<String>,
    pub method: Option<AuthMethod>,
    claim_headers: Vec<(HeaderName, HeaderValue)>,
    /// Which of the method's sources held the credential, to remove it (when the route strips
    /// credentials): an index into the route's `key_from` or `jwt_from`.
    found_in: Option<usize>,
    /// The claim the route's quota counts by, from a verified JWT (strings and numbers).
    pub claim: Option<String>,
}

/// The metric / log name of a method.
pub fn method_name(method: Option<AuthMethod>) -> &'static str {
    match method {
        Some(AuthMethod::Jwt) => "jwt",
        Some(AuthMethod::Hmac) => "hmac",
        Some(AuthMethod::Key) => "key",
        Some(AuthMethod::Cert) => "cert",
        None => "anonymous",
    }
}

/// Settings every snapshot needs from the top-level `auth:` section.
pub struct IdentityHeaders {
    pub consumer: HeaderName,
    pub tenant: HeaderName,
    /// Every identity header any route sets: removed from all client requests.
    pub all: Vec<HeaderName>,
}

impl IdentityHeaders {
    pub fn compile(
        settings: &AuthSettings,
        routes: &[crate::config::Route],
    ) -> Result<IdentityHeaders, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut name = |path: String, v: &str| match HeaderName::from_bytes(v.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                errors.push(FieldError::new(path, format!("`{v}` is not a header name")));
                None
            }
        };
        let consumer = name("auth.consumer_header".into(), &settings.consumer_header);
        let tenant = name("auth.tenant_header".into(), &settings.tenant_header);
        let mut all: Vec<HeaderName> = consumer.iter().chain(tenant.iter()).cloned().collect();
        // Custom rules' tags are the gateway's word too.
        all.push(HeaderName::from_static(crate::policy::rules::TAGS_HEADER));
        for (i, r) in routes.iter().enumerate() {
            let Some(a) = &r.auth else { continue };
            for (claim, header) in &a.claims_to_headers {
                let path = error::join(
                    &error::join(
                        &error::join(&error::index("routes", i), "auth"),
                        "claims_to_headers",
                    ),
                    claim,
                );
                if let Some(h) = name(path, header) {
                    if !all.contains(&h) {
                        all.push(h);
                    }
                }
            }
        }
        match (consumer, tenant) {
            (Some(consumer), Some(tenant)) if errors.is_empty() => Ok(IdentityHeaders {
                consumer,
                tenant,
                all,
            }),
            _ => Err(errors),
        }
    }
}

/// Removes every identity header the gateway sets from a client request.
pub fn strip_identity_headers(req: &mut RequestHeader, headers: &IdentityHeaders) {
    for h in &headers.all {
        if req.headers.contains_key(h) {
            req.remove_header(h);
        }
    }
}

impl RoutePolicy {
    /// Compiles `routes[index].auth`. `table` is None when consumers.yaml itself failed: then
    /// references into it are not checked (the config is refused anyway).
    pub fn compile(
        index: usize,
        auth: &RouteAuth,
        table: Option<&ConsumerTable>,
        have_consumers_file: bool,
    ) -> Result<RoutePolicy, Vec<FieldError>> {
        let path = error::join(&error::index("routes", index), "auth");
        let mut errors = Vec::new();
        let err =
            |errors: &mut Vec<FieldError>, p: String, m: String| errors.push(FieldError::new(p, m));
        if auth.methods.is_empty() {
            err(
                &mut errors,
                error::join(&path, "methods"),
                "list at least one of jwt, hmac, key".into(),
            );
        }
        if !have_consumers_file {
            err(
                &mut errors,
                path.clone(),
                "authentication needs consumers: add `include: { consumers: consumers.yaml }`"
                    .into(),
            );
        }
        errors.extend(auth.hmac.validate(&error::join(&path, "hmac")));
        if auth.hmac.clock_skew.get() > crate::config::MAX_HMAC_CLOCK_SKEW.get() {
            err(
                &mut errors,
                error::join(&error::join(&path, "hmac"), "clock_skew"),
                "at most 15m (nonces are remembered for twice the skew)".into(),
            );
        }
        let mut issuers = Vec::new();
        let mut allow_consumers = None;
        if let Some(table) = table {
            if auth.methods.contains(&AuthMethod::Jwt) {
                if auth.jwt.issuers.is_empty() {
                    let mut all: Vec<_> = table
                        .issuers
                        .iter()
                        .map(|(n, i)| (n.clone(), i.clone()))
                        .collect();
                    all.sort_by(|a, b| a.0.cmp(&b.0));
                    if table.declared_known && table.declared_issuers.is_empty() {
                        err(
                            &mut errors,
                            error::join(&path, "methods"),
                            "jwt needs at least one issuer in consumers.yaml `jwt_issuers`".into(),
                        );
                    }
                    issuers = all;
                }
                for (i, name) in auth.jwt.issuers.iter().enumerate() {
                    match table.issuers.get(name) {
                        Some(iss) => issuers.push((name.clone(), iss.clone())),
                        // Declared but broken: reported in consumers.yaml already.
                        None if table.declared_issuers.contains(name) => {}
                        None if !table.declared_known => {}
                        None => err(
                            &mut errors,
                            error::index(&error::join(&error::join(&path, "jwt"), "issuers"), i),
                            format!("unknown issuer `{name}` (see consumers.yaml jwt_issuers)"),
                        ),
                    }
                }
            }
            if !auth.allow.consumers.is_empty() {
                let mut set = HashSet::new();
                for (i, name) in auth.allow.consumers.iter().enumerate() {
                    match table.find(name) {
                        Some(c) => {
                            set.insert(c);
                        }
                        // Unknown, disabled or broken: simply never allowed. Not an error:
                        // deleting a consumer must revoke it at once, without an edit of
                        // every route that names it (a refused reload would keep it working).
                        None => tracing::warn!(
                            "{}: no enabled consumer `{name}` in consumers.yaml; it is never allowed",
                            error::index(&error::join(&error::join(&path, "allow"), "consumers"), i)
                        ),
                    }
                }
                allow_consumers = Some(set);
            }
        }
        let mut claims_to_headers = Vec::new();
        for (claim, header) in &auth.claims_to_headers {
            // Names were checked by IdentityHeaders::compile.
            if let Ok(h) = HeaderName::from_bytes(header.as_bytes()) {
                claims_to_headers.push((claim.clone(), h));
            }
        }
        let challenge = match auth.methods.first() {
            Some(AuthMethod::Jwt) | None => r#"Bearer realm="tollgate""#,
            Some(AuthMethod::Hmac) => r#"HMAC realm="tollgate", headers="X-Ca-Key X-Ca-Signature""#,
            Some(AuthMethod::Key) => r#"ApiKey realm="tollgate""#,
            Some(AuthMethod::Cert) => r#"ClientCertificate realm="tollgate""#,
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(RoutePolicy {
            methods: auth.methods.clone(),
            anonymous: auth.anonymous,
            allow_consumers,
            allow_tenants: (!auth.allow.tenants.is_empty())
                .then(|| auth.allow.tenants.iter().cloned().collect()),
            strip: auth.strip_credentials,
            claims_to_headers,
            issuers,
            jwt_from: auth.jwt.from.clone(),
            key_from: auth.key.from.clone(),
            hmac: auth.hmac.clone(),
            challenge,
            ok: None,
            route: String::new(),
            capture: None,
        })
    }

    /// Keeps the value of `claim` from verified tokens in [`Identity::claim`].
    pub fn capture_claim(&mut self, claim: &str) {
        self.capture = Some(claim.to_string());
    }

    /// Resolves this route's metric handles (at compile time, once the config is accepted).
    pub fn attach_metrics(&mut self, auth: &prometheus::IntCounterVec, route: &str) {
        let ok = |m: &str| auth.with_label_values(&[route, m, "ok"]);
        self.ok = Some([
            ok("jwt"),
            ok("hmac"),
            ok("key"),
            ok("anonymous"),
            ok("cert"),
        ]);
        self.route = route.to_string();
    }

    /// Counts one outcome. Failures look their series up (a rare path); successes use handles.
    pub fn record(
        &self,
        auth: &prometheus::IntCounterVec,
        outcome: &Result<Identity, AuthFailure>,
    ) {
        match outcome {
            Ok(identity) => {
                let i = match identity.method {
                    Some(AuthMethod::Jwt) => 0,
                    Some(AuthMethod::Hmac) => 1,
                    Some(AuthMethod::Key) => 2,
                    None => 3,
                    Some(AuthMethod::Cert) => 4,
                };
                if let Some(ok) = &self.ok {
                    ok[i].inc();
                }
            }
            Err(f) => auth
                .with_label_values(&[&self.route, f.method, f.code])
                .inc(),
        }
    }

    /// True when `authenticate` needs the request body (an HMAC-signed form or Content-MD5).
    pub fn needs_body(&self, req: &RequestHeader) -> bool {
        self.methods.contains(&AuthMethod::Hmac)
            && hmac::present(&req.headers)
            && hmac::needs_body(&req.headers)
    }

    /// The HMAC checks that need neither body nor secret, run before a body is buffered (a
    /// stale or malformed request is refused without reading it).
    pub fn precheck(&self, req: &RequestHeader) -> Result<(), AuthFailure> {
        hmac::precheck(&req.headers, &self.hmac, SystemTime::now()).map_err(|e| AuthFailure {
            status: e.status(),
            code: e.code(),
            message: e.message(),
            challenge: (e.status() == 401).then_some(self.challenge),
            method: "hmac",
        })
    }

    /// For a request that passed by HMAC with a nonce: the fleet-wide key of that nonce and how
    /// long it must be remembered, to check it once more across gateways.
    pub fn fleet_nonce(
        &self,
        identity: &Identity,
        req: &RequestHeader,
    ) -> Option<(String, Duration)> {
        if identity.method != Some(AuthMethod::Hmac) {
            return None;
        }
        let key = req.headers.get("x-ca-key")?.to_str().ok()?;
        let nonce = req.headers.get("x-ca-nonce")?.to_str().ok()?;
        Some((format!("{key}:{nonce}"), 2 * self.hmac.clock_skew.get()))
    }

    /// The refusal of a nonce another gateway (or an earlier process) has already seen.
    pub fn nonce_replayed(&self) -> AuthFailure {
        let e = hmac::HmacError::NonceReplayed;
        self.unauthorized("hmac", e.code(), e.message())
    }

    /// The largest body `authenticate` reads.
    pub fn max_body(&self) -> u64 {
        self.hmac.max_body.get()
    }

    /// Checks the request's credentials. `body` is the whole request body when
    /// [`Self::needs_body`] said so.
    pub fn authenticate(
        &self,
        req: &RequestHeader,
        body: Option<&[u8]>,
        client_cert: Option<&ClientCert>,
        table: &ConsumerTable,
        nonces: &NonceStore,
    ) -> Result<Identity, AuthFailure> {
        let mut identity = None;
        for method in &self.methods {
            let attempt = match method {
                AuthMethod::Key => self.by_key(req, table),
                AuthMethod::Jwt => self.by_jwt(req, table),
                AuthMethod::Hmac => self.by_hmac(req, body, table, nonces),
                AuthMethod::Cert => self.by_cert(client_cert, table),
            };
            if let Some(result) = attempt {
                identity = Some(result?);
                break;
            }
        }
        let Some(identity) = identity else {
            return if self.anonymous {
                Ok(Identity::default())
            } else {
                Err(self.unauthorized(
                    "none",
                    "credentials_missing",
                    "this route needs credentials",
                ))
            };
        };
        let consumer_ok = self
            .allow_consumers
            .as_ref()
            .map(|set| identity.consumer.is_some_and(|c| set.contains(&c)));
        let tenant_ok = self
            .allow_tenants
            .as_ref()
            .map(|set| identity.tenant.as_ref().is_some_and(|t| set.contains(t)));
        match (consumer_ok, tenant_ok) {
            (None, None) | (Some(true), _) | (_, Some(true)) => Ok(identity),
            _ => Err(AuthFailure {
                status: 403,
                code: "consumer_not_allowed",
                message: "this consumer is not allowed on this route",
                challenge: None,
                method: method_name(identity.method),
            }),
        }
    }

    fn unauthorized(
        &self,
        method: &'static str,
        code: &'static str,
        message: &'static str,
    ) -> AuthFailure {
        AuthFailure {
            status: 401,
            code,
            message,
            challenge: Some(self.challenge),
            method,
        }
    }

    fn by_key(
        &self,
        req: &RequestHeader,
        table: &ConsumerTable,
    ) -> Option<Result<Identity, AuthFailure>> {
        let (value, source) = credential::find(req, &self.key_from, false)?;
        Some(match key::lookup(&table.api_keys, value.as_bytes()) {
            Some(c) => Ok(Identity {
                consumer: Some(c),
                tenant: table.consumers[c].tenant.clone(),
                method: Some(AuthMethod::Key),
                claim_headers: Vec::new(),
                found_in: Some(source),
                claim: None,
            }),
            None => Err(self.unauthorized("key", "invalid_api_key", "the API key is not valid")),
        })
    }

    /// The consumer of a verified client certificate: by fingerprint, then by common name.
    fn by_cert(
        &self,
        cert: Option<&ClientCert>,
        table: &ConsumerTable,
    ) -> Option<Result<Identity, AuthFailure>> {
        let cert = cert?;
        let found = table
            .client_certs
            .get(cert.fingerprint_key())
            .or_else(|| table.client_certs.get(cert.common_name_key()?));
        Some(match found {
            Some(&c) => Ok(Identity {
                consumer: Some(c),
                tenant: table.consumers[c].tenant.clone(),
                method: Some(AuthMethod::Cert),
                claim_headers: Vec::new(),
                found_in: None,
                claim: None,
            }),
            None => Err(self.unauthorized(
                "cert",
                "unknown_client_certificate",
                "the client certificate belongs to no consumer",
            )),
        })
    }

    fn by_jwt(
        &self,
        req: &RequestHeader,
        table: &ConsumerTable,
    ) -> Option<Result<Identity, AuthFailure>> {
        let (token, source) = credential::find(req, &self.jwt_from, true)?;
        Some(self.verify_jwt(&token, table).map(|mut identity| {
            identity.found_in = Some(source);
            identity
        }))
    }

    fn verify_jwt(&self, token: &str, table: &ConsumerTable) -> Result<Identity, AuthFailure> {
        let invalid = |code, message| AuthFailure {
            status: 401,
            code,
            message,
            challenge: Some(r#"Bearer realm="tollgate", error="invalid_token""#),
            method: "jwt",
        };
        // Several issuers: the token's (unverified) `iss` only chooses which one verifies it.
        // Issuers that pin no `iss` may verify any token: when no pinned one matches, they are
        // tried in name order (their keys decide; at most one per such issuer).
        let pinned = if self.issuers.len() == 1 {
            self.issuers.first()
        } else {
            let iss = jwt::peek_issuer(token);
            self.issuers.iter().find(|(_, i)| {
                i.expected_issuer().is_some() && i.expected_issuer() == iss.as_deref()
            })
        };
        let mut verified = None;
        let mut failure = invalid("unknown_issuer", "the token's issuer is not accepted here");
        let candidates = pinned.into_iter().chain(
            self.issuers
                .iter()
                .filter(|(_, i)| pinned.is_none() && i.expected_issuer().is_none()),
        );
        for (name, issuer) in candidates {
            match issuer.verify(token) {
                Ok(claims) => {
                    verified = Some((name, claims));
                    break;
                }
                Err(e) => failure = invalid(e.code(), e.message()),
            }
        }
        let Some((name, claims)) = verified else {
            return Err(failure);
        };
        let Some((consumer, claimed_tenant)) = table.token_owner(name, &claims) else {
            return Err(invalid(
                "unknown_consumer",
                "the token is valid but belongs to no consumer",
            ));
        };
        let mut claim_headers = Vec::new();
        for (claim, header) in &self.claims_to_headers {
            let value = match claims.get(claim) {
                Some(serde_json::Value::String(s)) => HeaderValue::from_str(s).ok(),
                Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    HeaderValue::from_str(&v.to_string()).ok()
                }
                _ => None,
            };
            if let Some(v) = value {
                claim_headers.push((header.clone(), v));
            }
        }
        let claim = self.capture.as_ref().and_then(|c| match claims.get(c) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v @ serde_json::Value::Number(_)) => Some(v.to_string()),
            _ => None,
        });
        Ok(Identity {
            consumer: Some(consumer),
            tenant: claimed_tenant.or_else(|| table.consumers[consumer].tenant.clone()),
            method: Some(AuthMethod::Jwt),
            claim_headers,
            found_in: None,
            claim,
        })
    }

    fn by_hmac(
        &self,
        req: &RequestHeader,
        body: Option<&[u8]>,
        table: &ConsumerTable,
        nonces: &NonceStore,
    ) -> Option<Result<Identity, AuthFailure>> {
        if !hmac::present(&req.headers) {
            return None;
        }
        let path = std::str::from_utf8(req.raw_path()).unwrap_or("");
        let request = hmac::HmacRequest {
            method: req.method.as_str(),
            path_and_query: path,
            headers: &req.headers,
            body,
        };
        Some(
            match hmac::verify(&request, &table.hmac, &self.hmac, nonces, SystemTime::now()) {
                Ok(c) => Ok(Identity {
                    consumer: Some(c),
                    tenant: table.consumers[c].tenant.clone(),
                    method: Some(AuthMethod::Hmac),
                    claim_headers: Vec::new(),
                    found_in: None,
                    claim: None,
                }),
                Err(e) => Err(AuthFailure {
                    status: e.status(),
                    code: e.code(),
                    message: e.message(),
                    challenge: (e.status() == 401).then_some(self.challenge),
                    method: "hmac",
                }),
            },
        )
    }

    /// Writes the identity into the request for the upstream, and removes the credential when
    /// the route strips credentials.
    pub fn apply(
        &self,
        identity: &Identity,
        table: &ConsumerTable,
        headers: &IdentityHeaders,
        req: &mut RequestHeader,
    ) {
        if self.strip {
            match (identity.method, identity.found_in) {
                (Some(AuthMethod::Key), Some(i)) => credential::strip(req, &self.key_from[i]),
                (Some(AuthMethod::Jwt), Some(i)) => credential::strip(req, &self.jwt_from[i]),
                (Some(AuthMethod::Hmac), _) => {
                    req.remove_header("x-ca-signature");
                }
                _ => {}
            }
        }
        if let Some(c) = identity.consumer {
            let _ = req.insert_header(headers.consumer.clone(), table.consumers[c].name.as_str());
        }
        if let Some(t) = &identity.tenant {
            let _ = req.insert_header(headers.tenant.clone(), t.as_str());
        }
        for (h, v) in &identity.claim_headers {
            let _ = req.insert_header(h.clone(), v.clone());
        }
    }
}
