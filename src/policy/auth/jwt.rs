//! JWT verification for `consumers.yaml`'s `jwt_issuers`. An [`IssuerSpec`] compiles into an
//! [`Issuer`] at load, with every key parsed and checked once; [`Issuer::verify`] then checks
//! one compact JWS per request, and only reads what the token carries.
//!
//! Rules this module owns and must never relax:
//! - **The key pins the algorithm.** Each key has exactly one algorithm (from the config, or
//!   the JWK's `alg`); a token whose header names another is refused. That alone shuts out
//!   `alg: none` and HS/RS confusion (an RSA public key used as an HMAC secret).
//! - **Keys never come from the token.** `jwk`, `jku`, `x5u`, `x5c` headers are ignored; `kid`
//!   only selects among configured keys, and must look like a key id (see [`valid_kid`]).
//! - **`crit` is refused in any form**: we understand no JWS extension (RFC 7515 §4.1.11).
//! - **Cheap checks first**: the size before any decoding, the header before any key work, the
//!   signature before the claims are parsed.
//! - **Errors carry static codes and messages**: never token content, never key material.
//!
//! Signatures are checked by `jsonwebtoken` (RustCrypto backend); the parsing, the algorithm
//! pinning and the claim checks are done here, so each failure has its own code.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::jwks::{JwksRegistry, JwksSource, KeySet, MAX_JWKS_BYTES};
use crate::config::error::{index, join};
use crate::config::units::{ByteSize, Dur};
use crate::config::FieldError;

/// Verified claims, as the token carried them.
pub type Claims = serde_json::Map<String, Value>;

/// Longest `kid` accepted, in a token or on a key.
pub const MAX_KID_LEN: usize = 128;

/// A token without `kid` is tried against at most this many keys of its algorithm: every try
/// is a signature check, and the sender decides how many tries a token costs.
pub const MAX_KIDLESS_TRIES: usize = 4;

/// The largest `max_token_size` allowed, and what [`peek_issuer`] looks at: larger tokens do
/// not fit the request-head limits anyway.
pub const MAX_TOKEN_SIZE_LIMIT: u64 = 64 * 1024;

/// The smallest `max_token_size` allowed: a signed token with an `exp` is never shorter.
const MIN_TOKEN_SIZE: u64 = 128;

/// More leeway than this makes `exp` meaningless.
const MAX_LEEWAY: Duration = Duration::from_secs(10 * 60);

/// Key files are small: a cap keeps a wrong path (a log, a device) from being read whole.
const MAX_PEM_BYTES: u64 = 64 * 1024;

/// Every algorithm a key may be pinned to, as configs and tokens spell them.
const ALGORITHMS: &[(&str, Algorithm)] = &[
    ("HS256", Algorithm::HS256),
    ("HS384", Algorithm::HS384),
    ("HS512", Algorithm::HS512),
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("EdDSA", Algorithm::EdDSA),
];

// ---------------------------------------------------------------------------------------------
// Configuration

/// One `jwt_issuers.<name>` entry of `consumers.yaml`:
///
/// ```yaml
/// jwt_issuers:
///   corp:
///     issuer: https://login.corp.example/
///     audiences: [api]
///     jwks_url: https://login.corp.example/.well-known/jwks.json
///     keys:
///       - { algorithm: RS256, pem: keys/corp-2024.pub.pem, kid: corp-2024 }
/// ```
///
/// An issuer needs at least one key source: `keys`, `jwks_file` or `jwks_url` (any mix).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerSpec {
    /// Expected `iss` claim. When set, a token must carry exactly this `iss`; unset, `iss` is
    /// not checked and the issuer is known by its keys alone.
    #[serde(default)]
    pub issuer: Option<String>,
    /// When non-empty, the token's `aud` (a string or a list) must contain one of these.
    /// Empty: `aud` is not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Static keys, each pinned to one algorithm.
    #[serde(default)]
    pub keys: Vec<KeySpec>,
    /// A JWKS document on disk (relative to the directory of `consumers.yaml`), read at load:
    /// a broken file is a config error, a reload re-reads it.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (`http` or `https`; `http` only on a network you trust: whoever can change
    /// the response can mint tokens). Fetched in the background every `jwks_refresh`, and
    /// sooner when a token names an unknown `kid` (at most every 10 s). The keys survive
    /// reloads, and a failed fetch keeps the previous keys. Until the first fetch succeeds,
    /// tokens that need its keys fail with `jwks_unavailable`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// How often `jwks_url` is fetched (default `5m`, at least `10s`).
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh: Dur,
    /// Clock skew allowed on `exp`, `nbf` and `iat` (default `30s`, at most `10m`).
    #[serde(default = "default_leeway")]
    pub leeway: Dur,
    /// Claims a token must carry (default `[exp]`: a token without expiry is valid forever).
    /// `[]` accepts tokens without `exp`.
    #[serde(default = "default_required_claims")]
    pub required_claims: Vec<String>,
    /// Longer tokens are refused before any decoding (default `8k`, from `128` to `64k`).
    #[serde(default = "default_max_token_size")]
    pub max_token_size: ByteSize,
}

fn default_jwks_refresh() -> Dur {
    Dur(Duration::from_secs(5 * 60))
}
fn default_leeway() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_required_claims() -> Vec<String> {
    vec!["exp".to_string()]
}
fn default_max_token_size() -> ByteSize {
    ByteSize(8 * 1024)
}

/// A static key, pinned to one algorithm:
///
/// ```yaml
/// - { algorithm: RS256, pem: keys/rsa.pub.pem, kid: k1 }   # RS*, PS*, ES256/384, EdDSA
/// - { algorithm: HS256, secret: "${env:JWT_SECRET}" }        # HS*: the secret's bytes
/// - { algorithm: HS512, secret_base64: "${file:/run/secrets/jwt}" }
/// ```
///
/// Exactly one of `pem`, `secret`, `secret_base64`.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// The one algorithm tokens verified by this key must name: `HS256`, `HS384`, `HS512`,
    /// `RS256`, `RS384`, `RS512`, `PS256`, `PS384`, `PS512`, `ES256` (P-256), `ES384`
    /// (P-384) or `EdDSA` (Ed25519).
    pub algorithm: String,
    /// Key id. A token with a `kid` header is only verified by keys with that kid; a key
    /// without one only serves tokens without `kid`. 1-128 characters of `A-Z a-z 0-9 . _ ~
    /// + = -`, no `..`.
    #[serde(default)]
    pub kid: Option<String>,
    /// A public key file, relative to the directory of `consumers.yaml`: SPKI (`PUBLIC KEY`:
    /// RSA, EC or Ed25519), PKCS#1 (`RSA PUBLIC KEY`) or an X.509 `CERTIFICATE` (only its key
    /// is used; its dates and chain are not checked). Private keys are refused. RSA keys are
    /// 2048 to 4096 bits.
    #[serde(default)]
    pub pem: Option<PathBuf>,
    /// An HMAC secret, its bytes as written: at least as long as the hash (32 bytes for
    /// HS256, 48 for HS384, 64 for HS512; RFC 7518 §3.2). Use `${env:..}` or `${file:..}`.
    #[serde(default)]
    pub secret: Option<String>,
    /// An HMAC secret in base64 (standard or URL-safe alphabet, padding optional).
    #[serde(default)]
    pub secret_base64: Option<String>,
}

/// Secrets never reach logs, `/status` or panic messages through `{:?}`.
impl fmt::Debug for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "[redacted]");
        f.debug_struct("KeySpec")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .field("pem", &self.pem)
            .field("secret", &redact(&self.secret))
            .field("secret_base64", &redact(&self.secret_base64))
            .finish()
    }
}

/// Files an issuer reads at load (PEM keys and the JWKS file), so a reload can watch them.
pub fn files_of(spec: &IssuerSpec, base_dir: &Path) -> Vec<PathBuf> {
    let pems = spec.keys.iter().filter_map(|k| k.pem.as_deref());
    pems.chain(spec.jwks_file.as_deref())
        .map(|p| resolve(base_dir, p))
        .collect()
}

fn resolve(base_dir: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Why a token was refused. [`JwtError::code`] is for logs and metrics, [`JwtError::message`]
/// for the 401 body; neither ever holds token content or key material.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtError {
    /// Longer than the issuer's `max_token_size`; nothing was decoded.
    TooLarge,
    /// Not three base64url segments, or a header or payload that is not a JSON object.
    Malformed,
    /// `alg: none` in any spelling: unsigned tokens are never accepted.
    AlgNone,
    /// An `alg` we do not implement.
    UnsupportedAlgorithm,
    /// A `crit` header: we understand no JWS extension, so none may be required.
    CritHeader,
    /// A `kid` that cannot be a key id (see [`valid_kid`]).
    InvalidKid,
    /// No key has the token's `kid` (a JWKS refetch was requested, if the issuer has a URL).
    UnknownKid,
    /// The key named by `kid` is pinned to another algorithm, or, without `kid`, no key has
    /// the token's algorithm.
    AlgorithmMismatch,
    /// The issuer's keys come from a JWKS URL that has not been fetched successfully yet.
    JwksUnavailable,
    InvalidSignature,
    /// `exp` has passed (beyond the leeway).
    Expired,
    /// `nbf` is still ahead (beyond the leeway).
    NotYetValid,
    /// `iat` is ahead (beyond the leeway): a clock or a forger from the future.
    IssuedInFuture,
    /// A claim in `required_claims`, or `iss`/`aud` when they are checked, is absent.
    MissingClaim,
    /// `exp`, `nbf` or `iat` is not a number.
    InvalidClaim,
    WrongIssuer,
    WrongAudience,
}

impl JwtError {
    /// A snake_case reason for logs and JSON bodies.
    pub fn code(&self) -> &'static str {
        match self {
            JwtError::TooLarge => "token_too_large",
            JwtError::Malformed => "malformed_token",
            JwtError::AlgNone => "alg_none",
            JwtError::UnsupportedAlgorithm => "unsupported_algorithm",
            JwtError::CritHeader => "unsupported_crit_header",
            JwtError::InvalidKid => "invalid_kid",
            JwtError::UnknownKid => "unknown_kid",
            JwtError::AlgorithmMismatch => "algorithm_mismatch",
            JwtError::JwksUnavailable => "jwks_unavailable",
            JwtError::InvalidSignature => "invalid_signature",
            JwtError::Expired => "token_expired",
            JwtError::NotYetValid => "token_not_yet_valid",
            JwtError::IssuedInFuture => "token_issued_in_future",
            JwtError::MissingClaim => "missing_claim",
            JwtError::InvalidClaim => "invalid_claim",
            JwtError::WrongIssuer => "wrong_issuer",
            JwtError::WrongAudience => "wrong_audience",
        }
    }

    /// A short sentence for the 401 body.
    pub fn message(&self) -> &'static str {
        match self {
            JwtError::TooLarge => "token too large",
            JwtError::Malformed => "malformed token",
            JwtError::AlgNone => "unsigned tokens are not accepted",
            JwtError::UnsupportedAlgorithm => "unsupported token algorithm",
            JwtError::CritHeader => "unsupported critical header",
            JwtError::InvalidKid => "invalid key id",
            JwtError::UnknownKid => "unknown key id",
            JwtError::AlgorithmMismatch => "token algorithm does not match the key",
            JwtError::JwksUnavailable => "signing keys are not available yet",
            JwtError::InvalidSignature => "invalid signature",
            JwtError::Expired => "token expired",
            JwtError::NotYetValid => "token not yet valid",
            JwtError::IssuedInFuture => "token issued in the future",
            JwtError::MissingClaim => "required claim missing",
            JwtError::InvalidClaim => "invalid claim",
            JwtError::WrongIssuer => "wrong token issuer",
            JwtError::WrongAudience => "wrong token audience",
        }
    }
}

impl fmt::Display for JwtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for JwtError {}

// ---------------------------------------------------------------------------------------------
// Keys

/// A key ready to verify: parsed and checked once (at load, or when a JWKS arrives), pinned to
/// one algorithm.
#[derive(Debug)]
pub struct VerifyKey {
    kid: Option<String>,
    alg: Algorithm,
    /// Built once; `jsonwebtoken`'s `Debug` for it redacts the key.
    key: DecodingKey,
}

impl VerifyKey {
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The only algorithm a token verified by this key may name.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// An HMAC key. RFC 7518 §3.2: the secret is at least as long as the hash output.
    pub(crate) fn from_secret(
        alg: Algorithm,
        secret: &[u8],
        kid: Option<String>,
    ) -> Result<Self, String> {
        let min = match alg {
            Algorithm::HS256 => 32,
            Algorithm::HS384 => 48,
            Algorithm::HS512 => 64,
            _ => return Err(format!("{} is not an HMAC algorithm", alg_name(alg))),
        };
        if secret.len() < min {
            return Err(format!(
                "the secret is {} bytes; {} needs at least {min} (RFC 7518 §3.2)",
                secret.len(),
                alg_name(alg)
            ));
        }
        Ok(Self::new(alg, DecodingKey::from_secret(secret), kid))
    }

    /// An RSA public key from its modulus and exponent (big-endian bytes).
    pub(crate) fn from_rsa(
        alg: Algorithm,
        n: &[u8],
        e: &[u8],
        kid: Option<String>,
    ) -> Result<Self, String> {
        if alg.family() != AlgorithmFamily::Rsa {
            return Err(format!("an RSA key cannot be used for {}", alg_name(alg)));
        }
        check_rsa(n, e)?;
        let key = DecodingKey::from_rsa_raw_components(n, e);
        Ok(Self::new(alg, key, kid))
    }

    /// An EC public key from its SEC1 point; the curve must be the algorithm's.
    pub(crate) fn from_ec_point(
        alg: Algorithm,
        point: &[u8],
        kid: Option<String>,
    ) -> Result<Self, String> {
        let curve = match alg {
            Algorithm::ES256 => "P-256",
            Algorithm::ES384 => "P-384",
            _ => return Err(format!("an EC key cannot be used for {}", alg_name(alg))),
        };
        let key = DecodingKey::from_ec_der(point);
        probe(point, alg).map_err(|_| {
            format!(
                "not a valid {curve} public key ({} needs {curve})",
                alg_name(alg)
            )
        })?;
        Ok(Self::new(alg, key, kid))
    }

    /// An Ed25519 public key (32 bytes).
    pub(crate) fn from_ed25519(
        alg: Algorithm,
        public: &[u8],
        kid: Option<String>,
    ) -> Result<Self, String> {
        if alg != Algorithm::EdDSA {
            return Err(format!(
                "an Ed25519 key cannot be used for {}",
                alg_name(alg)
            ));
        }
        // Checked here because `jsonwebtoken` slices the first 32 bytes without looking.
        if public.len() != 32 {
            return Err(format!(
                "an Ed25519 public key is 32 bytes, not {}",
                public.len()
            ));
        }
        let key = DecodingKey::from_ed_der(public);
        probe(public, alg).map_err(|_| "not a valid Ed25519 public key".to_string())?;
        Ok(Self::new(alg, key, kid))
    }

    /// A public key from PEM text: SPKI, PKCS#1 (RSA) or an X.509 certificate.
    pub(crate) fn from_pem(
        alg: Algorithm,
        pem: &[u8],
        kid: Option<String>,
    ) -> Result<Self, String> {
        let labels = pem_labels(pem);
        if labels.is_empty() {
            return Err("no PEM block (expected `-----BEGIN PUBLIC KEY-----`)".into());
        }
        if labels.iter().any(|l| l.contains("PRIVATE")) {
            return Err("this file holds a private key; give the public key".into());
        }
        let wrong = |what: &str| format!("not {what} public key, which {} needs", alg_name(alg));
        match alg.family() {
            AlgorithmFamily::Rsa => {
                let key = DecodingKey::from_rsa_pem(pem).map_err(|_| wrong("an RSA"))?;
                let (n, e) = rsa_components(&key)?;
                Self::from_rsa(alg, &n, &e, kid)
            }
            AlgorithmFamily::Ec => {
                let key = DecodingKey::from_ec_pem(pem).map_err(|_| wrong("an EC"))?;
                let point = key.try_get_as_bytes().map_err(|_| wrong("an EC"))?;
                Self::from_ec_point(alg, point, kid)
            }
            AlgorithmFamily::Ed => {
                let key = DecodingKey::from_ed_pem(pem).map_err(|_| wrong("an Ed25519"))?;
                let public = key.try_get_as_bytes().map_err(|_| wrong("an Ed25519"))?;
                Self::from_ed25519(alg, public, kid)
            }
            AlgorithmFamily::Hmac => {
                Err(format!("{} takes a secret, not a PEM key", alg_name(alg)))
            }
        }
    }

    fn new(alg: Algorithm, key: DecodingKey, kid: Option<String>) -> Self {
        Self { kid, alg, key }
    }

    /// Whether `signature` (base64url) signs `signed` (`header.payload`) under this key.
    fn verifies(&self, signed: &str, signature: &str) -> bool {
        jsonwebtoken::crypto::verify(signature, signed.as_bytes(), &self.key, self.alg)
            .unwrap_or(false)
    }
}

/// Builds the verifier `jsonwebtoken` would build per request, once, so a key it cannot use
/// (a point off the curve, a wrong curve) is a load error instead of a failure per token.
/// Checks that `public` (a SEC1 point or an Ed25519 key) is a valid key of `alg`'s curve. The
/// backend parses keys only when verifying, so a bad key would otherwise surface as every
/// token failing; parsing it here makes it a config error instead.
fn probe(public: &[u8], alg: Algorithm) -> Result<(), ()> {
    use aws_lc_rs::signature as sig;
    let curve: &'static dyn sig::VerificationAlgorithm = match alg {
        Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &sig::ED25519,
        _ => return Ok(()),
    };
    sig::ParsedPublicKey::new(curve, public)
        .map(|_| ())
        .map_err(|_| ())
}

/// The modulus and exponent of a PKCS#1 key, parsed (and so validated) by the RSA backend.
fn rsa_components(key: &DecodingKey) -> Result<(Vec<u8>, Vec<u8>), String> {
    let jwk = Jwk::from_decoding_key(key, None).map_err(|e| format!("invalid RSA key: {e}"))?;
    let AlgorithmParameters::RSA(rsa) = jwk.algorithm else {
        return Err("not an RSA public key".into());
    };
    let n = URL_SAFE_NO_PAD
        .decode(&rsa.n)
        .map_err(|_| "invalid RSA modulus".to_string())?;
    let e = URL_SAFE_NO_PAD
        .decode(&rsa.e)
        .map_err(|_| "invalid RSA exponent".to_string())?;
    Ok((n, e))
}

/// RSA keys from 2048 bits (shorter ones are factorable in reach) to 4096 (the backend's
/// limit), with an odd exponent from 3 to 2^33-1 (the backend's range).
fn check_rsa(n: &[u8], e: &[u8]) -> Result<(), String> {
    let n = strip_leading_zeros(n);
    let bits = match n.first() {
        Some(top) => n.len() * 8 - top.leading_zeros() as usize,
        None => 0,
    };
    if bits < 2048 {
        return Err(format!(
            "the RSA key is {bits} bits; at least 2048 are required"
        ));
    }
    if bits > 4096 {
        return Err(format!(
            "the RSA key is {bits} bits; at most 4096 are supported"
        ));
    }
    let e = strip_leading_zeros(e);
    let exponent = if e.len() <= 8 {
        e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    } else {
        u64::MAX
    };
    if !(3..=(1 << 33) - 1).contains(&exponent) || exponent % 2 == 0 {
        return Err("the RSA public exponent is not an odd number from 3 to 2^33-1".into());
    }
    Ok(())
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// The labels of the PEM blocks in `text` (`PUBLIC KEY`, `CERTIFICATE`, ...).
fn pem_labels(text: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(text)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .filter_map(|l| l.strip_suffix("-----"))
        .map(str::to_string)
        .collect()
}

/// The name configs and tokens use for `alg`.
pub fn alg_name(alg: Algorithm) -> &'static str {
    ALGORITHMS
        .iter()
        .find(|(_, a)| *a == alg)
        .map_or("?", |(name, _)| name)
}

/// The algorithm a token's `alg` names: exact spelling, as RFC 7515 compares it.
fn token_alg(alg: &str) -> Result<Algorithm, JwtError> {
    if alg.eq_ignore_ascii_case("none") {
        return Err(JwtError::AlgNone);
    }
    ALGORITHMS
        .iter()
        .find(|(name, _)| *name == alg)
        .map(|(_, a)| *a)
        .ok_or(JwtError::UnsupportedAlgorithm)
}

/// The algorithm a config or a JWK names. Case does not matter in config files.
pub(crate) fn config_alg(alg: &str) -> Option<Algorithm> {
    ALGORITHMS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(alg))
        .map(|(_, a)| *a)
}

/// The key id rule, for tokens, configs and JWKS alike: 1-128 bytes of `A-Z a-z 0-9 . _ ~ +
/// = -`, never `..`. Key ids end up in logs and in lookups (some deployments map them to file
/// names), so anything that could be a path (`/`, `\`, `..`), a control character, a quote or
/// a space is refused outright rather than looked up.
pub fn valid_kid(kid: &str) -> bool {
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || b"._~+=-".contains(b);
    !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && kid.bytes().all(|b| allowed(&b))
        && !kid.contains("..")
}

/// Decodes an HMAC secret written in base64, standard or URL-safe, padded or not.
fn decode_base64_secret(text: &str) -> Option<Vec<u8>> {
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let url_safe = text.contains(['-', '_']);
    let engine = if url_safe {
        GeneralPurpose::new(&alphabet::URL_SAFE, config)
    } else {
        GeneralPurpose::new(&alphabet::STANDARD, config)
    };
    // Line breaks from a wrapped `${file:..}` are not part of the secret.
    let compact: String = text.split_ascii_whitespace().collect();
    engine.decode(compact).ok()
}

/// Reads at most `limit` bytes of `path`; a longer file is an error, not a truncation.
fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let file = File::open(path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    if bytes.len() as u64 > limit {
        return Err(format!(
            "`{}` is larger than {limit} bytes; is this the right file?",
            path.display()
        ));
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// Compiling an issuer

/// A compiled `jwt_issuers.<name>`: immutable, shared by every request of a config snapshot.
pub struct Issuer {
    issuer: Option<String>,
    audiences: Vec<String>,
    /// In seconds, fractional: claim times are compared as JSON numbers.
    leeway: f64,
    required_claims: Vec<String>,
    max_token_size: usize,
    /// Static keys, then the JWKS file's, in that order (kid-less tokens try them so).
    keys: KeySet,
    /// Keys fetched from `jwks_url`, shared with other snapshots through the registry.
    remote: Option<Arc<JwksSource>>,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("static_keys", &self.keys.len())
            .field("jwks_url", &self.remote.as_ref().map(|s| s.url()))
            .finish()
    }
}

impl Issuer {
    /// Checks and compiles `spec`. `path` is the field path for errors (`jwt_issuers.corp`);
    /// each error names its sub-field (`jwt_issuers.corp.keys[1].pem`) and never holds
    /// secret material. Relative files are read from `base_dir`. The JWKS URL source is
    /// taken from `jwks` (shared with earlier snapshots) only when everything else is valid,
    /// so a rejected config leaves the running sources alone.
    pub fn compile(
        path: &str,
        spec: &IssuerSpec,
        base_dir: &Path,
        jwks: &JwksRegistry,
    ) -> Result<Issuer, Vec<FieldError>> {
        let mut errors = Vec::new();
        check_settings(path, spec, &mut errors);
        let mut keys = compile_static_keys(path, spec, base_dir, &mut errors);
        if let Some(file) = &spec.jwks_file {
            match load_jwks_file(&resolve(base_dir, file)) {
                Ok(set) => keys.extend(set.into_keys()),
                Err(e) => errors.push(FieldError::new(join(path, "jwks_file"), e)),
            }
        }
        if let Some(url) = &spec.jwks_url {
            if let Err(e) = check_url(url) {
                errors.push(FieldError::new(join(path, "jwks_url"), e));
            }
        }
        if spec.keys.is_empty() && spec.jwks_file.is_none() && spec.jwks_url.is_none() {
            errors.push(FieldError::new(
                path,
                "an issuer needs keys: set `keys`, `jwks_file` or `jwks_url`",
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let remote = spec
            .jwks_url
            .as_ref()
            .map(|url| jwks.source(url, spec.jwks_refresh.get()));
        Ok(Issuer {
            issuer: spec.issuer.clone(),
            audiences: spec.audiences.clone(),
            leeway: spec.leeway.get().as_secs_f64(),
            required_claims: spec.required_claims.clone(),
            max_token_size: usize::try_from(spec.max_token_size.get()).unwrap_or(usize::MAX),
            keys: KeySet::new(keys),
            remote,
        })
    }

    /// The `iss` this issuer's tokens carry, when configured: what [`peek_issuer`] is matched
    /// against to pick the issuer for a token.
    pub fn expected_issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
    }

    /// The JWKS URL source, for `/status`.
    pub fn jwks_source(&self) -> Option<&Arc<JwksSource>> {
        self.remote.as_ref()
    }

    /// Static and JWKS-file keys.
    pub fn static_key_count(&self) -> usize {
        self.keys.len()
    }

    /// Verifies `token` (compact JWS, without `Bearer `) against the wall clock.
    pub fn verify(&self, token: &str) -> Result<Claims, JwtError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.verify_at(token, now)
    }

    /// Verifies `token` as of `now_unix` (seconds since the epoch): size, shape, header,
    /// signature, then claims.
    pub fn verify_at(&self, token: &str, now_unix: u64) -> Result<Claims, JwtError> {
        if token.len() > self.max_token_size {
            return Err(JwtError::TooLarge);
        }
        let parts = Parts::split(token)?;
        let header = Header::decode(parts.header)?;
        if header.crit {
            return Err(JwtError::CritHeader);
        }
        let alg = token_alg(&header.alg)?;
        self.check_signature(&parts, alg, header.kid.as_deref())?;
        let claims = decode_claims(parts.payload)?;
        self.check_claims(&claims, now_unix)?;
        Ok(claims)
    }

    fn check_signature(
        &self,
        parts: &Parts,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<(), JwtError> {
        // One lock-free load: a JWKS swap during this request does not change its keys.
        let guard = self.remote.as_ref().map(|s| s.current());
        let remote = guard.as_ref().map(|g| &***g);
        let key = match kid {
            Some(kid) => self.key_for_kid(kid, alg, remote)?,
            None => return self.verify_without_kid(parts, alg, remote),
        };
        if key.verifies(parts.signed, parts.signature) {
            Ok(())
        } else {
            Err(JwtError::InvalidSignature)
        }
    }

    /// The key named by `kid` whose algorithm is the token's. Several keys may share a kid
    /// (one per algorithm); static keys come first.
    fn key_for_kid<'a>(
        &'a self,
        kid: &str,
        alg: Algorithm,
        remote: Option<&'a KeySet>,
    ) -> Result<&'a VerifyKey, JwtError> {
        if !valid_kid(kid) {
            return Err(JwtError::InvalidKid);
        }
        let mut named = self
            .keys
            .with_kid(kid)
            .chain(remote.into_iter().flat_map(move |set| set.with_kid(kid)))
            .peekable();
        if named.peek().is_none() {
            return Err(self.kid_not_found());
        }
        named
            .find(|k| k.alg == alg)
            .ok_or(JwtError::AlgorithmMismatch)
    }

    /// An unknown kid may be a key the issuer just rotated in: ask for a JWKS refetch (the
    /// registry rate-limits them), and refuse this token.
    fn kid_not_found(&self) -> JwtError {
        match &self.remote {
            Some(source) => {
                source.request_refresh();
                if source.loaded() {
                    JwtError::UnknownKid
                } else {
                    JwtError::JwksUnavailable
                }
            }
            None => JwtError::UnknownKid,
        }
    }

    /// Tries the first [`MAX_KIDLESS_TRIES`] keys of the token's algorithm.
    fn verify_without_kid(
        &self,
        parts: &Parts,
        alg: Algorithm,
        remote: Option<&KeySet>,
    ) -> Result<(), JwtError> {
        let candidates = self
            .keys
            .iter()
            .chain(remote.into_iter().flat_map(KeySet::iter))
            .filter(|k| k.alg == alg)
            .take(MAX_KIDLESS_TRIES);
        let mut tried = 0;
        for key in candidates {
            if key.verifies(parts.signed, parts.signature) {
                return Ok(());
            }
            tried += 1;
        }
        if tried > 0 {
            return Err(JwtError::InvalidSignature);
        }
        match &self.remote {
            Some(source) if !source.loaded() => Err(JwtError::JwksUnavailable),
            _ => Err(JwtError::AlgorithmMismatch),
        }
    }

    /// Required claims, then times (with leeway), then `iss` and `aud`.
    fn check_claims(&self, claims: &Claims, now: u64) -> Result<(), JwtError> {
        let present = |name: &str| claims.get(name).is_some_and(|v| !v.is_null());
        if !self.required_claims.iter().all(|c| present(c)) {
            return Err(JwtError::MissingClaim);
        }
        let now = now as f64;
        if let Some(exp) = numeric_date(claims, "exp")? {
            // RFC 7519 §4.1.4: valid only *before* exp.
            if now >= exp + self.leeway {
                return Err(JwtError::Expired);
            }
        }
        if let Some(nbf) = numeric_date(claims, "nbf")? {
            if now + self.leeway < nbf {
                return Err(JwtError::NotYetValid);
            }
        }
        if let Some(iat) = numeric_date(claims, "iat")? {
            if iat > now + self.leeway {
                return Err(JwtError::IssuedInFuture);
            }
        }
        self.check_issuer(claims)?;
        self.check_audience(claims)
    }

    fn check_issuer(&self, claims: &Claims) -> Result<(), JwtError> {
        let Some(expected) = &self.issuer else {
            return Ok(());
        };
        match claims.get("iss") {
            None | Some(Value::Null) => Err(JwtError::MissingClaim),
            Some(Value::String(iss)) if iss == expected => Ok(()),
            Some(_) => Err(JwtError::WrongIssuer),
        }
    }

    /// `aud` is a string or a list of strings (RFC 7519 §4.1.3); one match is enough.
    fn check_audience(&self, claims: &Claims) -> Result<(), JwtError> {
        if self.audiences.is_empty() {
            return Ok(());
        }
        let accepted = |aud: &str| self.audiences.iter().any(|a| a == aud);
        let ok = match claims.get("aud") {
            None | Some(Value::Null) => return Err(JwtError::MissingClaim),
            Some(Value::String(aud)) => accepted(aud),
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).any(accepted),
            Some(_) => false,
        };
        if ok {
            Ok(())
        } else {
            Err(JwtError::WrongAudience)
        }
    }
}

/// A NumericDate claim (RFC 7519 §2: seconds, possibly fractional). Absent or null: `None`.
fn numeric_date(claims: &Claims, name: &str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(t) if t.is_finite() => Ok(Some(t)),
            _ => Err(JwtError::InvalidClaim),
        },
        Some(_) => Err(JwtError::InvalidClaim),
    }
}

/// Settings that need no file: limits, non-empty names.
fn check_settings(path: &str, spec: &IssuerSpec, errors: &mut Vec<FieldError>) {
    let mut err = |field: &str, msg: &str| errors.push(FieldError::new(join(path, field), msg));
    if spec.issuer.as_deref() == Some("") {
        err(
            "issuer",
            "an empty issuer matches no token; remove it to skip the check",
        );
    }
    if spec.audiences.iter().any(String::is_empty) {
        err("audiences", "an audience cannot be empty");
    }
    if spec.required_claims.iter().any(String::is_empty) {
        err("required_claims", "a claim name cannot be empty");
    }
    if spec.leeway.get() > MAX_LEEWAY {
        err("leeway", "at most 10m: more leeway makes `exp` meaningless");
    }
    if spec.jwks_refresh.get() < JwksRegistry::MIN_REFETCH {
        err(
            "jwks_refresh",
            "at least 10s: the identity provider is not ours to hammer",
        );
    }
    let size = spec.max_token_size.get();
    if !(MIN_TOKEN_SIZE..=MAX_TOKEN_SIZE_LIMIT).contains(&size) {
        err("max_token_size", "between 128 and 64k");
    }
}

/// Compiles `keys:`, reporting each bad key at its own path.
fn compile_static_keys(
    path: &str,
    spec: &IssuerSpec,
    base_dir: &Path,
    errors: &mut Vec<FieldError>,
) -> Vec<VerifyKey> {
    let list = join(path, "keys");
    let mut keys: Vec<VerifyKey> = Vec::new();
    for (i, k) in spec.keys.iter().enumerate() {
        let kpath = index(&list, i);
        let key = match compile_key(&kpath, k, base_dir) {
            Ok(key) => key,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        if let Some(kid) = key.kid() {
            if keys
                .iter()
                .any(|o| o.kid() == Some(kid) && o.alg == key.alg)
            {
                errors.push(FieldError::new(
                    join(&kpath, "kid"),
                    format!("another key has kid `{kid}` and the same algorithm"),
                ));
                continue;
            }
        }
        keys.push(key);
    }
    keys
}

/// One `keys[i]`. Errors name the field and the reason; never the secret.
fn compile_key(kpath: &str, spec: &KeySpec, base_dir: &Path) -> Result<VerifyKey, FieldError> {
    let at = |field: &str, msg: String| FieldError::new(join(kpath, field), msg);
    let alg = config_alg(&spec.algorithm)
        .ok_or_else(|| at("algorithm", unknown_algorithm_message(&spec.algorithm)))?;
    if let Some(kid) = &spec.kid {
        if !valid_kid(kid) {
            return Err(at(
                "kid",
                "a kid is 1-128 characters of `A-Z a-z 0-9 . _ ~ + = -`, without `..`".into(),
            ));
        }
    }
    let sources = [
        spec.pem.is_some(),
        spec.secret.is_some(),
        spec.secret_base64.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        return Err(FieldError::new(
            kpath,
            "set exactly one of `pem`, `secret`, `secret_base64`",
        ));
    }
    let kid = spec.kid.clone();
    let name = alg_name(alg);
    if alg.family() == AlgorithmFamily::Hmac {
        if let Some(secret) = &spec.secret {
            if secret.trim_start().starts_with("-----BEGIN") {
                return Err(at("secret", "this is a PEM key, not an HMAC secret".into()));
            }
            return VerifyKey::from_secret(alg, secret.as_bytes(), kid)
                .map_err(|e| at("secret", e));
        }
        if let Some(encoded) = &spec.secret_base64 {
            let secret = decode_base64_secret(encoded)
                .ok_or_else(|| at("secret_base64", "not valid base64".into()))?;
            return VerifyKey::from_secret(alg, &secret, kid).map_err(|e| at("secret_base64", e));
        }
        return Err(at(
            "pem",
            format!("{name} takes `secret` or `secret_base64`, not a PEM key"),
        ));
    }
    let Some(pem) = &spec.pem else {
        let field = if spec.secret.is_some() {
            "secret"
        } else {
            "secret_base64"
        };
        return Err(at(field, format!("{name} needs `pem`: a public key file")));
    };
    let file = resolve(base_dir, pem);
    let text = read_limited(&file, MAX_PEM_BYTES).map_err(|e| at("pem", e))?;
    VerifyKey::from_pem(alg, &text, kid)
        .map_err(|e| at("pem", format!("`{}`: {e}", file.display())))
}

fn unknown_algorithm_message(given: &str) -> String {
    if given.eq_ignore_ascii_case("none") {
        return "`none` is not an algorithm: unsigned tokens are never accepted".into();
    }
    let names: Vec<&str> = ALGORITHMS.iter().map(|(n, _)| *n).collect();
    format!(
        "unknown algorithm `{given}`; expected one of {}",
        names.join(", ")
    )
}

/// A JWKS file: read, parsed, every usable key kept. Unusable keys are skipped with a warning;
/// a file with none left is an error (the issuer would silently refuse everything).
fn load_jwks_file(file: &Path) -> Result<KeySet, String> {
    let bytes = read_limited(file, MAX_JWKS_BYTES)?;
    let parsed = KeySet::from_jwks(&bytes).map_err(|e| format!("`{}`: {e}", file.display()))?;
    for reason in &parsed.skipped {
        tracing::warn!(file = %file.display(), "JWKS key skipped: {reason}");
    }
    if parsed.keys.is_empty() {
        return Err(format!("`{}`: no usable key in the JWKS", file.display()));
    }
    Ok(parsed.keys)
}

/// `http(s)://host/...`, without credentials: the URL is logged and shown on `/status`.
fn check_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("a JWKS URL is http:// or https://".into());
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("a JWKS URL needs a host".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("credentials in a JWKS URL would end up in logs; not supported".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Token parsing

/// The three segments of a compact JWS, still encoded. Each is checked to be base64url text
/// here, so later decoding only fails on lengths.
struct Parts<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
    /// `header.payload`: what the signature covers.
    signed: &'a str,
}

impl<'a> Parts<'a> {
    fn split(token: &'a str) -> Result<Self, JwtError> {
        let (signed, signature) = token.rsplit_once('.').ok_or(JwtError::Malformed)?;
        let (header, payload) = signed.split_once('.').ok_or(JwtError::Malformed)?;
        let base64url = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if header.is_empty()
            || payload.is_empty()
            || ![header, payload, signature].iter().all(|s| base64url(s))
        {
            return Err(JwtError::Malformed);
        }
        Ok(Parts {
            header,
            payload,
            signature,
            signed,
        })
    }
}

/// The header members we act on. Any other member is ignored, including the ones that would
/// bring their own key (`jwk`, `jku`, `x5u`, `x5c`): keys only ever come from the config.
#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    /// Present at all (even `null` or `[]`): refused.
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

impl Header {
    /// Decodes the header segment. Duplicate `alg`, `kid` or `crit` members are refused (serde
    /// reports duplicate fields), so no parser can read another `alg` than ours.
    fn decode(segment: &str) -> Result<Self, JwtError> {
        let json = URL_SAFE_NO_PAD
            .decode(segment)
            .map_err(|_| JwtError::Malformed)?;
        if !is_json_object(&json) {
            return Err(JwtError::Malformed);
        }
        serde_json::from_slice(&json).map_err(|_| JwtError::Malformed)
    }
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

/// serde would also read a struct from a JSON array; a JOSE header is an object.
fn is_json_object(json: &[u8]) -> bool {
    json.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

fn decode_claims(segment: &str) -> Result<Claims, JwtError> {
    let json = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| JwtError::Malformed)
}

/// The unverified `iss` of a token, only to choose which configured issuer verifies it: the
/// chosen issuer then checks everything, `iss` included. `None` for anything that is not a
/// JWT with a string `iss`, or larger than [`MAX_TOKEN_SIZE_LIMIT`].
pub fn peek_issuer(token: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(default)]
        iss: Option<String>,
    }
    if token.len() as u64 > MAX_TOKEN_SIZE_LIMIT {
        return None;
    }
    let parts = Parts::split(token).ok()?;
    let json = URL_SAFE_NO_PAD.decode(parts.payload).ok()?;
    if !is_json_object(&json) {
        return None;
    }
    serde_json::from_slice::<Peek>(&json).ok()?.iss
}

#[cfg(test)]
pub(crate) mod tests {
    //! Every token and key here comes from `tests/fixtures/jwt_sign.py` (PyJWT and
    //! `cryptography`), never from the code under test.

    use std::process::Command;
    use std::sync::OnceLock;

    use base64::engine::general_purpose::STANDARD;
    use serde_json::json;

    use super::*;

    /// Claims times are relative to this instant; tests pass it to `verify_at`.
    pub(crate) const NOW: u64 = 1_700_000_000;

    const NEEDS: &str = "the JWT tests need /usr/bin/python3 with PyJWT and cryptography \
                         (apt-get install python3-jwt python3-cryptography); \
                         TOLLGATE_TEST_PYTHON overrides the interpreter";

    fn python() -> String {
        std::env::var("TOLLGATE_TEST_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into())
    }

    /// Runs the fixture script and returns its stdout.
    pub(crate) fn fixture(args: &[&str]) -> String {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jwt_sign.py");
        let out = Command::new(python())
            .arg(&script)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{NEEDS}: {e}"));
        assert!(
            out.status.success(),
            "jwt_sign.py {} failed ({NEEDS}): {}",
            args[0],
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("the fixture prints ASCII")
    }

    /// The directory of generated keys, made once per test run (see `keygen` in the script).
    pub(crate) fn key_dir() -> &'static Path {
        static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
        DIR.get_or_init(|| {
            let dir = tempfile::tempdir().expect("a temp dir");
            fixture(&["keygen", dir.path().to_str().expect("a UTF-8 temp path")]);
            dir
        })
        .path()
    }

    pub(crate) fn key_file(name: &str) -> String {
        key_dir().join(name).display().to_string()
    }

    /// Signs each spec (see the script's `sign`); one token per spec.
    pub(crate) fn sign_all(specs: &[Value]) -> Vec<String> {
        let tokens: Vec<String> = fixture(&["sign", &Value::from(specs.to_vec()).to_string()])
            .lines()
            .map(str::to_string)
            .collect();
        assert_eq!(tokens.len(), specs.len());
        tokens
    }

    pub(crate) fn sign(spec: Value) -> String {
        sign_all(&[spec]).remove(0)
    }

    /// A spec: `alg` signed with the private key (or secret file) `key`, optional `kid`.
    pub(crate) fn spec(alg: &str, key: &str, kid: Option<&str>, claims: Value) -> Value {
        let mut header = json!({});
        if let Some(kid) = kid {
            header["kid"] = json!(kid);
        }
        json!({ "alg": alg, "key": key_file(key), "header": header, "claims": claims })
    }

    /// Claims valid at [`NOW`].
    pub(crate) fn claims() -> Value {
        json!({ "sub": "alice", "iat": NOW - 10, "exp": NOW + 3600 })
    }

    fn secret(name: &str) -> String {
        std::fs::read_to_string(key_dir().join(name)).expect("a generated secret")
    }

    pub(crate) fn compile_yaml(
        yaml: &str,
        registry: &JwksRegistry,
    ) -> Result<Issuer, Vec<FieldError>> {
        let spec: IssuerSpec = serde_yaml::from_str(yaml).expect("test YAML parses");
        Issuer::compile("jwt_issuers.t", &spec, key_dir(), registry)
    }

    fn issuer(yaml: &str) -> Issuer {
        compile_yaml(yaml, &JwksRegistry::new()).unwrap_or_else(|e| panic!("{e:?}"))
    }

    /// An issuer with one key per algorithm, each kid named after its algorithm, from every
    /// PEM form: SPKI, PKCS#1, X.509 certificates.
    fn every_algorithm() -> Issuer {
        issuer(&format!(
            r#"
keys:
  - {{ algorithm: HS256, secret: "{hs256}", kid: hs256 }}
  - {{ algorithm: HS384, secret_base64: "{hs384}", kid: hs384 }}
  - {{ algorithm: hs512, secret: "{hs512}", kid: hs512 }}
  - {{ algorithm: RS256, pem: rsa.pub.pem, kid: rs256 }}
  - {{ algorithm: RS384, pem: rsa.pkcs1.pub.pem, kid: rs384 }}
  - {{ algorithm: RS512, pem: rsa.crt, kid: rs512 }}
  - {{ algorithm: PS256, pem: rsa.pub.pem, kid: ps256 }}
  - {{ algorithm: PS384, pem: rsa.pub.pem, kid: ps384 }}
  - {{ algorithm: PS512, pem: rsa.pub.pem, kid: ps512 }}
  - {{ algorithm: ES256, pem: ec256.pub.pem, kid: es256 }}
  - {{ algorithm: ES384, pem: ec384.pub.pem, kid: es384 }}
  - {{ algorithm: EdDSA, pem: ed25519.pub.pem, kid: eddsa }}
  - {{ algorithm: ES256, pem: ec256.crt, kid: es256-cert }}
"#,
            hs256 = secret("hs256.secret"),
            hs384 = STANDARD.encode(secret("hs384.secret")),
            hs512 = secret("hs512.secret"),
        ))
    }

    /// (algorithm, signing key, kid in `every_algorithm`)
    const SIGNERS: &[(&str, &str, &str)] = &[
        ("HS256", "hs256.secret", "hs256"),
        ("HS384", "hs384.secret", "hs384"),
        ("HS512", "hs512.secret", "hs512"),
        ("RS256", "rsa.key", "rs256"),
        ("RS384", "rsa.key", "rs384"),
        ("RS512", "rsa.key", "rs512"),
        ("PS256", "rsa.key", "ps256"),
        ("PS384", "rsa.key", "ps384"),
        ("PS512", "rsa.key", "ps512"),
        ("ES256", "ec256.key", "es256"),
        ("ES384", "ec384.key", "es384"),
        ("EdDSA", "ed25519.key", "eddsa"),
        ("ES256", "ec256.key", "es256-cert"),
    ];

    #[test]
    fn every_algorithm_verifies_with_and_without_kid() {
        let issuer = every_algorithm();
        let mut specs = Vec::new();
        for (alg, key, kid) in SIGNERS {
            specs.push(spec(alg, key, Some(kid), claims()));
            specs.push(spec(alg, key, None, claims()));
        }
        let tokens = sign_all(&specs);
        for (i, (alg, _, kid)) in SIGNERS.iter().enumerate() {
            for token in &tokens[2 * i..2 * i + 2] {
                let verified = issuer.verify_at(token, NOW);
                let claims = verified.unwrap_or_else(|e| panic!("{alg} ({kid}): {e:?}"));
                assert_eq!(claims["sub"], "alice");
            }
        }
    }

    #[test]
    fn a_key_verifies_only_its_own_tokens() {
        let issuer = every_algorithm();
        // Signed by the right algorithm but another key of the same type.
        let tokens = sign_all(&[
            spec("RS256", "rsa2.key", Some("rs256"), claims()),
            spec("RS256", "rsa2.key", None, claims()),
            spec("HS256", "hs512.secret", Some("hs256"), claims()),
        ]);
        for token in &tokens {
            assert_eq!(
                issuer.verify_at(token, NOW).unwrap_err(),
                JwtError::InvalidSignature
            );
        }
    }

    #[test]
    fn wall_clock_verification() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let token = sign(spec(
            "ES256",
            "ec256.key",
            Some("es256"),
            json!({ "exp": now + 60 }),
        ));
        assert!(every_algorithm().verify(&token).is_ok());
        let old = sign(spec(
            "ES256",
            "ec256.key",
            Some("es256"),
            json!({ "exp": now - 60 }),
        ));
        assert_eq!(
            every_algorithm().verify(&old).unwrap_err(),
            JwtError::Expired
        );
    }

    /// RFC 7515 Appendix A.1: HS256 with the JWK `k` given there.
    #[test]
    fn rfc7515_appendix_a1_verifies() {
        let joe = issuer(
            r#"
issuer: joe
keys:
  - algorithm: HS256
    secret_base64: AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow
"#,
        );
        let token = concat!(
            "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9",
            ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ",
            ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
        );
        let claims = joe
            .verify_at(token, 1_300_819_000)
            .expect("the RFC example verifies");
        assert_eq!(claims["iss"], "joe");
        assert_eq!(claims["http://example.com/is_root"], true);
        assert_eq!(joe.verify_at(token, NOW).unwrap_err(), JwtError::Expired);
        assert_eq!(peek_issuer(token).as_deref(), Some("joe"));
    }

    #[test]
    fn alg_none_is_refused_in_every_spelling() {
        let issuer = every_algorithm();
        for alg in ["none", "None", "NONE"] {
            let unsigned = json!({ "alg": alg, "claims": claims() });
            let with_kid = json!({ "alg": alg, "claims": claims(), "header": { "kid": "hs256" } });
            for token in sign_all(&[unsigned, with_kid]) {
                assert!(token.ends_with('.'), "an unsigned token: {token}");
                assert_eq!(
                    issuer.verify_at(&token, NOW).unwrap_err(),
                    JwtError::AlgNone
                );
            }
        }
        // A real signature does not make `none` acceptable either.
        let token = sign(json!({
            "alg": "HS256", "key": key_file("hs256.secret"), "claims": claims(),
            "header": { "alg": "none", "kid": "hs256" },
        }));
        assert_eq!(
            issuer.verify_at(&token, NOW).unwrap_err(),
            JwtError::AlgNone
        );
    }

    /// The classic: HS256 with the RSA public key's PEM bytes as the HMAC secret.
    #[test]
    fn hs256_signed_with_the_rsa_public_key_is_refused() {
        let all = every_algorithm();
        for kid in [Some("rs256"), None] {
            let token = sign(spec("HS256", "rsa.pub.pem", kid, claims()));
            let err = all.verify_at(&token, NOW).unwrap_err();
            // With kid: the RS256 key refuses HS256. Without: the HS256 key's check fails.
            let expected = if kid.is_some() {
                JwtError::AlgorithmMismatch
            } else {
                JwtError::InvalidSignature
            };
            assert_eq!(err, expected, "kid {kid:?}");
        }
        let rsa_only = issuer("keys: [{ algorithm: RS256, pem: rsa.pub.pem }]");
        let token = sign(spec("HS256", "rsa.pub.pem", None, claims()));
        assert_eq!(
            rsa_only.verify_at(&token, NOW).unwrap_err(),
            JwtError::AlgorithmMismatch
        );
        // Nor can the config make a PEM key an HMAC secret.
        let pem = std::fs::read_to_string(key_dir().join("rsa.pub.pem")).unwrap();
        let spec = IssuerSpec {
            keys: vec![KeySpec {
                algorithm: "HS256".into(),
                kid: None,
                pem: None,
                secret: Some(pem),
                secret_base64: None,
            }],
            ..serde_yaml::from_str("{}").unwrap()
        };
        let errors = Issuer::compile("t", &spec, key_dir(), &JwksRegistry::new()).unwrap_err();
        assert_eq!(errors[0].path, "t.keys[0].secret");
        let err = compile_yaml(
            "keys: [{ algorithm: HS256, pem: rsa.pub.pem }]",
            &JwksRegistry::new(),
        );
        assert_eq!(err.unwrap_err()[0].path, "jwt_issuers.t.keys[0].pem");
    }

    #[test]
    fn es256_signature_of_zeros_is_refused() {
        let issuer = every_algorithm();
        for kid in [Some("es256"), None] {
            let token = sign(json!({
                "alg": "ES256", "signature": "zeros", "claims": claims(),
                "header": kid.map_or(json!({}), |k| json!({ "kid": k })),
            }));
            assert!(token.ends_with(&"A".repeat(86)), "r = s = 0: {token}");
            assert_eq!(
                issuer.verify_at(&token, NOW).unwrap_err(),
                JwtError::InvalidSignature
            );
        }
    }

    #[test]
    fn time_claims_are_checked_with_leeway() {
        let issuer = issuer("keys: [{ algorithm: ES256, pem: ec256.pub.pem }]\nleeway: 30s");
        let cases = [
            (json!({ "exp": NOW - 31 }), Err(JwtError::Expired)),
            (json!({ "exp": NOW - 30 }), Err(JwtError::Expired)),
            (json!({ "exp": NOW - 29 }), Ok(())),
            (json!({ "exp": NOW as f64 - 29.5 }), Ok(())),
            (
                json!({ "exp": NOW + 60, "nbf": NOW + 31 }),
                Err(JwtError::NotYetValid),
            ),
            (json!({ "exp": NOW + 60, "nbf": NOW + 30 }), Ok(())),
            (
                json!({ "exp": NOW + 60, "iat": NOW + 31 }),
                Err(JwtError::IssuedInFuture),
            ),
            (json!({ "exp": NOW + 60, "iat": NOW + 30 }), Ok(())),
            (
                json!({ "exp": (NOW + 60).to_string() }),
                Err(JwtError::InvalidClaim),
            ),
            (
                json!({ "exp": NOW + 60, "nbf": "soon" }),
                Err(JwtError::InvalidClaim),
            ),
            (
                json!({ "exp": NOW + 60, "iat": [] }),
                Err(JwtError::InvalidClaim),
            ),
        ];
        let specs: Vec<Value> = cases
            .iter()
            .map(|(c, _)| spec("ES256", "ec256.key", None, c.clone()))
            .collect();
        for ((claims, expected), token) in cases.iter().zip(sign_all(&specs)) {
            let got = issuer.verify_at(&token, NOW).map(|_| ());
            assert_eq!(&got, expected, "{claims}");
        }
    }

    #[test]
    fn required_claims_default_to_exp() {
        let default = issuer("keys: [{ algorithm: EdDSA, pem: ed25519.pub.pem }]");
        let none_required =
            issuer("keys: [{ algorithm: EdDSA, pem: ed25519.pub.pem }]\nrequired_claims: []");
        let sub_required = issuer(
            "keys: [{ algorithm: EdDSA, pem: ed25519.pub.pem }]\nrequired_claims: [exp, sub]",
        );
        let tokens = sign_all(&[
            spec("EdDSA", "ed25519.key", None, json!({ "sub": "alice" })),
            spec(
                "EdDSA",
                "ed25519.key",
                None,
                json!({ "sub": null, "exp": NOW + 9 }),
            ),
        ]);
        assert_eq!(
            default.verify_at(&tokens[0], NOW).unwrap_err(),
            JwtError::MissingClaim
        );
        assert!(none_required.verify_at(&tokens[0], NOW).is_ok());
        assert!(default.verify_at(&tokens[1], NOW).is_ok());
        assert_eq!(
            sub_required.verify_at(&tokens[1], NOW).unwrap_err(),
            JwtError::MissingClaim
        );
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let issuer = issuer(
            r#"
issuer: https://idp.example/
audiences: [api, admin]
keys: [{ algorithm: RS256, pem: rsa.pub.pem, kid: k1 }]
"#,
        );
        assert_eq!(issuer.expected_issuer(), Some("https://idp.example/"));
        let with = |extra: Value| {
            let mut c = claims();
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            spec("RS256", "rsa.key", Some("k1"), c)
        };
        let cases = [
            (
                json!({ "iss": "https://idp.example/", "aud": "api" }),
                Ok(()),
            ),
            (
                json!({ "iss": "https://idp.example/", "aud": ["x", "admin"] }),
                Ok(()),
            ),
            (
                json!({ "iss": "https://evil.example/", "aud": "api" }),
                Err(JwtError::WrongIssuer),
            ),
            (
                json!({ "iss": "https://IDP.example/", "aud": "api" }),
                Err(JwtError::WrongIssuer),
            ),
            (
                json!({ "iss": ["https://idp.example/"], "aud": "api" }),
                Err(JwtError::WrongIssuer),
            ),
            (json!({ "aud": "api" }), Err(JwtError::MissingClaim)),
            (
                json!({ "iss": "https://idp.example/", "aud": "web" }),
                Err(JwtError::WrongAudience),
            ),
            (
                json!({ "iss": "https://idp.example/", "aud": ["web", 1] }),
                Err(JwtError::WrongAudience),
            ),
            (
                json!({ "iss": "https://idp.example/", "aud": { "api": true } }),
                Err(JwtError::WrongAudience),
            ),
            (
                json!({ "iss": "https://idp.example/" }),
                Err(JwtError::MissingClaim),
            ),
        ];
        let specs: Vec<Value> = cases.iter().map(|(c, _)| with(c.clone())).collect();
        for ((claims, expected), token) in cases.iter().zip(sign_all(&specs)) {
            assert_eq!(
                &issuer.verify_at(&token, NOW).map(|_| ()),
                expected,
                "{claims}"
            );
        }
    }

    /// Re-encodes one segment of `token` (0 header, 1 payload) with `edit` applied.
    fn edit_segment(token: &str, i: usize, edit: impl FnOnce(&mut Value)) -> String {
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        let mut json: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[i]).unwrap()).unwrap();
        edit(&mut json);
        parts[i] = URL_SAFE_NO_PAD.encode(json.to_string());
        parts.join(".")
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let issuer = every_algorithm();
        let tokens = sign_all(&[
            spec("RS256", "rsa.key", Some("rs256"), claims()),
            spec("HS256", "hs256.secret", Some("hs256"), claims()),
            spec("EdDSA", "ed25519.key", Some("eddsa"), claims()),
        ]);
        for token in &tokens {
            assert!(issuer.verify_at(token, NOW).is_ok());
            let payload = edit_segment(token, 1, |c| c["sub"] = json!("mallory"));
            assert_eq!(
                issuer.verify_at(&payload, NOW).unwrap_err(),
                JwtError::InvalidSignature
            );
            let later = edit_segment(token, 1, |c| c["exp"] = json!(NOW + 99_999));
            assert_eq!(
                issuer.verify_at(&later, NOW).unwrap_err(),
                JwtError::InvalidSignature
            );
            // A header member that changes nothing we read still breaks the signature.
            let header = edit_segment(token, 0, |h| h["typ"] = json!("at+jwt"));
            assert_eq!(
                issuer.verify_at(&header, NOW).unwrap_err(),
                JwtError::InvalidSignature
            );
            let dropped = format!("{}.", token.rsplit_once('.').unwrap().0);
            assert_eq!(
                issuer.verify_at(&dropped, NOW).unwrap_err(),
                JwtError::InvalidSignature
            );
        }
        // A kid switched to another key of the same algorithm.
        let switched = edit_segment(&tokens[0], 0, |h| h["kid"] = json!("rs512"));
        assert_eq!(
            issuer.verify_at(&switched, NOW).unwrap_err(),
            JwtError::AlgorithmMismatch
        );
    }

    #[test]
    fn kids_select_keys_and_are_checked() {
        let issuer = every_algorithm();
        let unknown = sign(spec("RS256", "rsa.key", Some("rs999"), claims()));
        assert_eq!(
            issuer.verify_at(&unknown, NOW).unwrap_err(),
            JwtError::UnknownKid
        );
        let too_long = "k".repeat(MAX_KID_LEN + 1);
        let bad_kids = [
            "../../etc/passwd",
            "../rs256",
            "keys/rs256",
            "/rs256",
            "rs\\256",
            "rs..256",
            "rs\u{0}256",
            "rs\n256",
            "rs 256",
            "rs\"256",
            "rś256",
            "",
            too_long.as_str(),
        ];
        let specs: Vec<Value> = bad_kids
            .iter()
            .map(|kid| spec("RS256", "rsa.key", Some(kid), claims()))
            .collect();
        for (kid, token) in bad_kids.iter().zip(sign_all(&specs)) {
            assert_eq!(
                issuer.verify_at(&token, NOW).unwrap_err(),
                JwtError::InvalidKid,
                "{kid:?}"
            );
        }
        for good in ["rs256", "A-z_0.9~+=", &"k".repeat(MAX_KID_LEN)] {
            assert!(valid_kid(good), "{good}");
        }
        // A non-string kid is not a kid.
        let token = sign(spec("RS256", "rsa.key", None, claims()));
        let numeric = edit_segment(&token, 0, |h| h["kid"] = json!(7));
        assert_eq!(
            issuer.verify_at(&numeric, NOW).unwrap_err(),
            JwtError::Malformed
        );
    }

    #[test]
    fn kidless_tokens_try_a_bounded_number_of_keys() {
        // Five RS256 keys; the signing key is the fifth, beyond MAX_KIDLESS_TRIES.
        let yaml = format!(
            "keys:\n{}  - {{ algorithm: RS256, pem: rsa2.pub.pem }}\n",
            "  - { algorithm: RS256, pem: rsa.pub.pem }\n".repeat(MAX_KIDLESS_TRIES)
        );
        let issuer = issuer(&yaml);
        let tokens = sign_all(&[
            spec("RS256", "rsa.key", None, claims()),
            spec("RS256", "rsa2.key", None, claims()),
        ]);
        assert!(issuer.verify_at(&tokens[0], NOW).is_ok());
        assert_eq!(
            issuer.verify_at(&tokens[1], NOW).unwrap_err(),
            JwtError::InvalidSignature
        );
    }

    #[test]
    fn crit_headers_are_refused() {
        let issuer = every_algorithm();
        let crits = [json!(["exp"]), json!([]), json!(null), json!(["b64"])];
        let specs: Vec<Value> = crits
            .iter()
            .map(|crit| {
                let mut s = spec("ES256", "ec256.key", Some("es256"), claims());
                s["header"]["crit"] = crit.clone();
                s["header"]["exp"] = json!(NOW);
                s
            })
            .collect();
        // `null` in a spec removes the member: build that one by hand.
        let mut tokens = sign_all(&specs);
        tokens[2] = edit_segment(&tokens[0], 0, |h| h["crit"] = Value::Null);
        for token in &tokens {
            assert_eq!(
                issuer.verify_at(token, NOW).unwrap_err(),
                JwtError::CritHeader
            );
        }
    }

    #[test]
    fn oversized_tokens_are_refused_before_decoding() {
        let issuer = issuer("keys: [{ algorithm: ES256, pem: ec256.pub.pem }]\nmax_token_size: 1k");
        let big = sign(spec(
            "ES256",
            "ec256.key",
            None,
            json!({ "exp": NOW + 9, "pad": "x".repeat(1000) }),
        ));
        assert!(big.len() > 1024);
        assert_eq!(issuer.verify_at(&big, NOW).unwrap_err(), JwtError::TooLarge);
        // Garbage of that size is not even split.
        assert_eq!(
            issuer.verify_at(&"!".repeat(1025), NOW).unwrap_err(),
            JwtError::TooLarge
        );
        let small = sign(spec("ES256", "ec256.key", None, json!({ "exp": NOW + 9 })));
        assert!(issuer.verify_at(&small, NOW).is_ok());
    }

    #[test]
    fn malformed_tokens_get_their_own_code() {
        let issuer = every_algorithm();
        let good = sign(spec("HS256", "hs256.secret", Some("hs256"), claims()));
        let (h, rest) = good.split_once('.').unwrap();
        let (p, s) = rest.split_once('.').unwrap();
        let b64 = |json: &str| URL_SAFE_NO_PAD.encode(json);
        let cases = [
            String::new(),
            "abc".into(),
            format!("{h}.{p}"),
            format!("{h}.{p}.{s}.{s}"),
            format!("{h}..{s}"),
            format!(".{p}.{s}"),
            format!("{h}=.{p}.{s}"),
            format!("{h}.{p}.{s}="),
            format!("{h}.{p}+/.{s}"),
            format!("{}.{p}.{s}", &h[..h.len() - 1]),
            format!("{}.{p}.{s}", b64("not json")),
            format!("{}.{p}.{s}", b64(r#"["HS256"]"#)),
            format!("{}.{p}.{s}", b64(r#"{"kid":"hs256"}"#)),
            format!("{}.{p}.{s}", b64(r#"{"alg":"HS256","alg":"none"}"#)),
            format!(
                "{}.{p}.{s}",
                b64(r#"{"alg":"HS256","kid":"hs256","kid":"rs256"}"#)
            ),
            format!("{}.{p}.{s}", b64(r#"{"alg":7}"#)),
            format!("{h}.{p}.{s}\u{e9}"),
        ];
        for token in &cases {
            assert_eq!(
                issuer.verify_at(token, NOW).unwrap_err(),
                JwtError::Malformed,
                "{token}"
            );
        }
        // Signed garbage claims: refused once the signature checks out.
        let array = sign(spec("HS256", "hs256.secret", Some("hs256"), json!([1, 2])));
        assert_eq!(
            issuer.verify_at(&array, NOW).unwrap_err(),
            JwtError::Malformed
        );
        let unknown = edit_segment(&good, 0, |h| h["alg"] = json!("HS257"));
        assert_eq!(
            issuer.verify_at(&unknown, NOW).unwrap_err(),
            JwtError::UnsupportedAlgorithm
        );
        let lower = edit_segment(&good, 0, |h| h["alg"] = json!("hs256"));
        assert_eq!(
            issuer.verify_at(&lower, NOW).unwrap_err(),
            JwtError::UnsupportedAlgorithm
        );
    }

    /// Nothing a client sends may panic the verifier.
    #[test]
    fn hostile_input_never_panics() {
        let issuer = every_algorithm();
        let good = sign(spec("EdDSA", "ed25519.key", Some("eddsa"), claims()));
        let mut inputs: Vec<String> = vec![
            ".".into(),
            "..".into(),
            "...".into(),
            "\u{0}.\u{0}.\u{0}".into(),
            "é.é.é".into(),
            format!("{good}{good}"),
        ];
        // Every truncation and every single-character substitution of a good token.
        for cut in 0..good.len() {
            inputs.push(good[..cut].to_string());
            for c in ["A", "-", "_", ".", "=", "%"] {
                let mut t = good.clone();
                t.replace_range(cut..cut + 1, c);
                inputs.push(t);
            }
        }
        for token in &inputs {
            if token != &good {
                let _ = issuer.verify_at(token, NOW);
                let _ = peek_issuer(token);
            }
        }
        // Signatures of every wrong length, for every algorithm family.
        for (alg, _, kid) in SIGNERS {
            let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","kid":"{kid}"}}"#));
            let payload = URL_SAFE_NO_PAD.encode(claims().to_string());
            for len in [0, 1, 31, 32, 33, 63, 64, 65, 255, 256, 257, 600] {
                let sig = URL_SAFE_NO_PAD.encode(vec![0xA5; len]);
                let token = format!("{header}.{payload}.{sig}");
                assert_eq!(
                    issuer.verify_at(&token, NOW).unwrap_err(),
                    JwtError::InvalidSignature
                );
            }
        }
    }

    #[test]
    fn peek_issuer_reads_only_a_string_iss() {
        let tokens = sign_all(&[
            spec("HS256", "hs256.secret", None, json!({ "iss": "corp" })),
            spec("HS256", "hs256.secret", None, json!({ "iss": 7 })),
            spec("HS256", "hs256.secret", None, json!({ "sub": "x" })),
            spec("HS256", "hs256.secret", None, json!(["corp"])),
        ]);
        assert_eq!(peek_issuer(&tokens[0]).as_deref(), Some("corp"));
        assert_eq!(peek_issuer(&tokens[1]), None);
        assert_eq!(peek_issuer(&tokens[2]), None);
        assert_eq!(peek_issuer(&tokens[3]), None);
        assert_eq!(peek_issuer("not a token"), None);
        let huge = format!("a.{}.c", "a".repeat(MAX_TOKEN_SIZE_LIMIT as usize));
        assert_eq!(peek_issuer(&huge), None);
    }

    fn errors_of(yaml: &str) -> Vec<FieldError> {
        compile_yaml(yaml, &JwksRegistry::new()).expect_err("a config error")
    }

    fn assert_error(yaml: &str, path: &str, fragment: &str) {
        let errors = errors_of(yaml);
        assert!(
            errors
                .iter()
                .any(|e| e.path == path && e.message.contains(fragment)),
            "expected `{path}: ..{fragment}..` in {errors:?}"
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let p = "jwt_issuers.t";
        assert_error("{}", p, "needs keys");
        assert_error(
            "keys: [{ algorithm: RS257, pem: rsa.pub.pem }]",
            &format!("{p}.keys[0].algorithm"),
            "expected one of HS256",
        );
        assert_error(
            "keys: [{ algorithm: none, secret: x }]",
            &format!("{p}.keys[0].algorithm"),
            "never accepted",
        );
        assert_error(
            "keys: [{ algorithm: RS256 }]",
            &format!("{p}.keys[0]"),
            "exactly one of",
        );
        assert_error(
            "keys: [{ algorithm: RS256, pem: a, secret: b }]",
            &format!("{p}.keys[0]"),
            "exactly one of",
        );
        assert_error(
            "keys: [{ algorithm: RS256, secret: aaaa }]",
            &format!("{p}.keys[0].secret"),
            "needs `pem`",
        );
        assert_error(
            "keys: [{ algorithm: RS256, pem: missing.pem }]",
            &format!("{p}.keys[0].pem"),
            "cannot read",
        );
        assert_error(
            "keys: [{ algorithm: RS256, pem: rsa.key }]",
            &format!("{p}.keys[0].pem"),
            "private key",
        );
        assert_error(
            "keys: [{ algorithm: ES256, pem: rsa.pub.pem }]",
            &format!("{p}.keys[0].pem"),
            "not an EC public key",
        );
        assert_error(
            "keys: [{ algorithm: ES256, pem: ec384.pub.pem }]",
            &format!("{p}.keys[0].pem"),
            "P-256",
        );
        assert_error(
            "keys: [{ algorithm: RS256, pem: ec256.pub.pem }]",
            &format!("{p}.keys[0].pem"),
            "not an RSA public key",
        );
        assert_error(
            "keys: [{ algorithm: EdDSA, pem: ec256.pub.pem }]",
            &format!("{p}.keys[0].pem"),
            "Ed25519",
        );
        assert_error(
            "keys: [{ algorithm: RS256, pem: rsa1024.pub.pem }]",
            &format!("{p}.keys[0].pem"),
            "1024 bits",
        );
        assert_error(
            "keys: [{ algorithm: RS256, pem: hs256.secret }]",
            &format!("{p}.keys[0].pem"),
            "no PEM block",
        );
        assert_error(
            "keys: [{ algorithm: ES256, pem: ec256.pub.pem, kid: ../x }]",
            &format!("{p}.keys[0].kid"),
            "1-128",
        );
        assert_error(
            "keys: [{ algorithm: ES256, pem: ec256.pub.pem, kid: a }, { algorithm: ES256, pem: ec256.crt, kid: a }]",
            &format!("{p}.keys[1].kid"),
            "same algorithm",
        );
        assert_error(
            "keys: [{ algorithm: HS256, secret_base64: \"@@@\" }]",
            &format!("{p}.keys[0].secret_base64"),
            "not valid base64",
        );
        assert_error(
            "jwks_url: ftp://idp/jwks\n",
            &format!("{p}.jwks_url"),
            "http",
        );
        assert_error(
            "jwks_url: https://user:pw@idp/jwks\n",
            &format!("{p}.jwks_url"),
            "credentials",
        );
        assert_error(
            "jwks_url: not a url\n",
            &format!("{p}.jwks_url"),
            "not a URL",
        );
        assert_error(
            "jwks_url: https://idp/\njwks_refresh: 1s",
            &format!("{p}.jwks_refresh"),
            "at least 10s",
        );
        assert_error(
            "jwks_url: https://idp/\nleeway: 1h",
            &format!("{p}.leeway"),
            "at most 10m",
        );
        assert_error(
            "jwks_url: https://idp/\nmax_token_size: 1m",
            &format!("{p}.max_token_size"),
            "64k",
        );
        assert_error(
            "jwks_url: https://idp/\nissuer: ''",
            &format!("{p}.issuer"),
            "empty",
        );
        assert_error(
            "jwks_url: https://idp/\naudiences: ['']",
            &format!("{p}.audiences"),
            "empty",
        );
        assert_error(
            "jwks_file: nope.json",
            &format!("{p}.jwks_file"),
            "cannot read",
        );
        // All errors at once.
        let errors = errors_of(
            "keys: [{ algorithm: X, pem: a }, { algorithm: HS256, secret: short }]\nleeway: 1h",
        );
        assert_eq!(errors.len(), 3, "{errors:?}");
        // Unknown fields are refused by serde.
        assert!(serde_yaml::from_str::<IssuerSpec>("jwks_urls: x").is_err());
        assert!(serde_yaml::from_str::<KeySpec>("{ algorithm: HS256, secrt: x }").is_err());
    }

    #[test]
    fn secrets_never_appear_in_errors_or_debug() {
        let short = "hunter2-is-my-secret";
        let yaml = format!(
            "keys: [{{ algorithm: HS256, secret: {short} }}, {{ algorithm: HS512, secret_base64: \"{short}$\" }}]"
        );
        let errors = errors_of(&yaml);
        assert_eq!(errors.len(), 2);
        assert!(
            errors[0]
                .message
                .contains("20 bytes; HS256 needs at least 32"),
            "{errors:?}"
        );
        for e in &errors {
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        let spec: IssuerSpec = serde_yaml::from_str(&yaml).unwrap();
        assert!(!format!("{spec:?}").contains("hunter2"));
        let issuer = every_algorithm();
        let debug = format!("{issuer:?} {:?}", issuer.keys);
        assert!(!debug.contains(&secret("hs256.secret")), "{debug}");
    }

    #[test]
    fn jwks_files_supply_keys() {
        let dir = tempfile::tempdir().unwrap();
        let jwks = fixture(&["jwks", &json!([
            { "key": key_file("rsa.key"), "kid": "rsa-noalg" },
            { "key": key_file("rsa2.key"), "kid": "rsa-ps", "alg": "PS384", "use": "sig" },
            { "key": key_file("ec256.key"), "kid": "ec" },
            { "key": key_file("ec384.key"), "kid": "ec384", "alg": "ES384" },
            { "key": key_file("ed25519.key"), "kid": "ed" },
            { "key": key_file("hs512.secret"), "kid": "oct", "alg": "HS512" },
            { "key": key_file("rsa2.key"), "kid": "encryption", "use": "enc" },
            { "key": key_file("rsa2.key"), "kid": "weird/kid" },
            { "key": key_file("rsa1024.key"), "kid": "weak" },
            { "key": key_file("ec256.key"), "kid": "ec-wrong-alg", "alg": "ES384" },
            { "key": key_file("rsa.key"), "kid": "wrapping", "alg": "RSA-OAEP" },
            { "key": key_file("ed25519.key"), "kid": "short", "extra": { "x": "AAAA" } },
            { "key": key_file("ec256.key"), "kid": "x448", "extra": { "kty": "OKP", "crv": "X448" } },
            { "key": key_file("ec256.key"), "kid": "mystery", "extra": { "kty": "PQC" } },
        ]).to_string()]);
        let file = dir.path().join("jwks.json");
        std::fs::write(&file, &jwks).unwrap();
        let issuer = issuer(&format!("jwks_file: {}", file.display()));
        assert_eq!(issuer.static_key_count(), 6);
        let parsed = KeySet::from_jwks(jwks.as_bytes()).unwrap();
        assert_eq!(
            parsed.skipped.len(),
            7,
            "enc keys are skipped silently: {:?}",
            parsed.skipped
        );

        let ok = [
            spec("RS256", "rsa.key", Some("rsa-noalg"), claims()),
            spec("PS384", "rsa2.key", Some("rsa-ps"), claims()),
            spec("ES256", "ec256.key", Some("ec"), claims()),
            spec("ES384", "ec384.key", Some("ec384"), claims()),
            spec("EdDSA", "ed25519.key", Some("ed"), claims()),
            spec("HS512", "hs512.secret", Some("oct"), claims()),
            spec("ES256", "ec256.key", None, claims()),
        ];
        for token in sign_all(&ok) {
            issuer.verify_at(&token, NOW).unwrap();
        }
        let refused = sign_all(&[
            // An RSA JWK without alg is RS256 only.
            spec("PS256", "rsa.key", Some("rsa-noalg"), claims()),
            spec("RS256", "rsa2.key", Some("encryption"), claims()),
            spec("RS256", "rsa1024.key", Some("weak"), claims()),
        ]);
        assert_eq!(
            issuer.verify_at(&refused[0], NOW).unwrap_err(),
            JwtError::AlgorithmMismatch
        );
        assert_eq!(
            issuer.verify_at(&refused[1], NOW).unwrap_err(),
            JwtError::UnknownKid
        );
        assert_eq!(
            issuer.verify_at(&refused[2], NOW).unwrap_err(),
            JwtError::UnknownKid
        );
    }

    #[test]
    fn broken_jwks_files_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("not json", "not a JWKS document"),
            (r#"{"keys": {}}"#, "not a JWKS document"),
            (r#"{"keys": []}"#, "no usable key"),
            (
                r#"{"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB"}]}"#,
                "no usable key",
            ),
        ];
        for (i, (text, fragment)) in cases.iter().enumerate() {
            let file = dir.path().join(format!("{i}.json"));
            std::fs::write(&file, text).unwrap();
            assert_error(
                &format!("jwks_file: {}", file.display()),
                "jwt_issuers.t.jwks_file",
                fragment,
            );
        }
    }

    #[test]
    fn files_of_lists_what_a_reload_must_watch() {
        let spec: IssuerSpec = serde_yaml::from_str(
            "keys: [{ algorithm: RS256, pem: a.pem }, { algorithm: HS256, secret: x }, { algorithm: ES256, pem: /abs/b.pem }]\njwks_file: j.json",
        )
        .unwrap();
        let files = files_of(&spec, Path::new("/etc/tollgate"));
        let expected = ["/etc/tollgate/a.pem", "/abs/b.pem", "/etc/tollgate/j.json"];
        assert_eq!(
            files,
            expected.iter().map(PathBuf::from).collect::<Vec<_>>()
        );
    }

    #[test]
    fn base64_secrets_accept_both_alphabets_and_line_breaks() {
        let bytes: Vec<u8> = (0..=255).collect();
        let standard = STANDARD.encode(&bytes);
        let url = URL_SAFE_NO_PAD.encode(&bytes);
        let wrapped = format!("{}\n{}\n", &standard[..64], &standard[64..]);
        for text in [
            &standard,
            &url,
            &wrapped,
            &standard.trim_end_matches('=').to_string(),
        ] {
            assert_eq!(
                decode_base64_secret(text).as_deref(),
                Some(&bytes[..]),
                "{text}"
            );
        }
        assert_eq!(decode_base64_secret("a+b_"), None, "mixed alphabets");
    }

    #[test]
    fn issuers_are_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Issuer>();
        send_sync::<JwksRegistry>();
        send_sync::<JwtError>();
    }

    #[test]
    fn codes_and_messages_are_distinct() {
        use JwtError::*;
        let all = [
            TooLarge,
            Malformed,
            AlgNone,
            UnsupportedAlgorithm,
            CritHeader,
            InvalidKid,
            UnknownKid,
            AlgorithmMismatch,
            JwksUnavailable,
            InvalidSignature,
            Expired,
            NotYetValid,
            IssuedInFuture,
            MissingClaim,
            InvalidClaim,
            WrongIssuer,
            WrongAudience,
        ];
        let codes: std::collections::HashSet<_> = all.iter().map(JwtError::code).collect();
        let messages: std::collections::HashSet<_> = all.iter().map(JwtError::message).collect();
        assert_eq!(codes.len(), all.len());
        assert_eq!(messages.len(), all.len());
        assert!(codes
            .iter()
            .all(|c| c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        assert_eq!(Expired.to_string(), "token expired");
    }
}
