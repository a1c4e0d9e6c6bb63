//! The browser challenge (`bots.challenge`, routes with `bots: challenge`): a request without a
//! valid challenge cookie gets a tiny HTML page whose script finds a small proof of work, sets
//! the cookie and reloads. A browser passes in milliseconds without the user noticing; a script
//! that does not run JavaScript never gets past it.
//!
//! The cookie is `EXPIRY.MAC.NONCE`:
//! - `MAC` = HMAC-SHA256(secret, `v1|EXPIRY|CLIENT_IP|USER_AGENT`), base64url, first 16 bytes:
//!   the cookie only works for the client address (and browser) it was issued to, until it
//!   expires, and cannot be forged without the secret (compared in constant time);
//! - `NONCE` makes FNV-1a-32 of `EXPIRY.MAC.NONCE` start with `difficulty` zero bits, which the
//!   page's script searches for (2^difficulty tries on average; 12 bits: a few ms).
//!
//! The secret is `bots.challenge.secret` (set it, e.g. `${env:..}`, so cookies survive restarts
//! and work across a fleet); without one, a random secret is made once per process (reloads
//! keep it).

use std::net::IpAddr;
use std::sync::OnceLock;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::super::config::units::Dur;
use crate::config::FieldError;

/// `bots.challenge`.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChallengeSettings {
    /// HMAC key for the cookies (at least 16 bytes). Default: random per process.
    #[serde(default)]
    pub secret: Option<String>,
    /// How long a passed challenge lasts.
    #[serde(default = "default_ttl")]
    pub ttl: Dur,
    #[serde(default = "default_cookie")]
    pub cookie: String,
    /// Leading zero bits of the proof of work (0–20).
    #[serde(default = "default_difficulty")]
    pub difficulty: u8,
}

/// Never prints the secret.
impl std::fmt::Debug for ChallengeSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChallengeSettings")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("ttl", &self.ttl)
            .field("cookie", &self.cookie)
            .field("difficulty", &self.difficulty)
            .finish()
    }
}

impl Default for ChallengeSettings {
    fn default() -> Self {
        Self {
            secret: None,
            ttl: default_ttl(),
            cookie: default_cookie(),
            difficulty: default_difficulty(),
        }
    }
}

fn default_ttl() -> Dur {
    Dur(std::time::Duration::from_secs(3600))
}
fn default_cookie() -> String {
    "__tollgate_challenge".into()
}
fn default_difficulty() -> u8 {
    12
}

/// The compiled challenge: key, cookie name, lifetime and difficulty.
pub struct Challenge {
    key: Vec<u8>,
    pub cookie: String,
    ttl_secs: u64,
    difficulty: u8,
}

impl std::fmt::Debug for Challenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Challenge")
            .field("cookie", &self.cookie)
            .field("ttl_secs", &self.ttl_secs)
            .field("difficulty", &self.difficulty)
            .finish_non_exhaustive()
    }
}

/// The per-process secret used when none is configured.
fn process_secret() -> Vec<u8> {
    static SECRET: OnceLock<Vec<u8>> = OnceLock::new();
    SECRET
        .get_or_init(|| {
            let mut k = vec![0u8; 32];
            for chunk in k.chunks_mut(8) {
                chunk.copy_from_slice(&fastrand::u64(..).to_le_bytes());
            }
            // Mixed with the OS's randomness where it can be read.
            if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
                use std::io::Read;
                let mut os = [0u8; 32];
                if f.read_exact(&mut os).is_ok() {
                    k.iter_mut().zip(os).for_each(|(a, b)| *a ^= b);
                }
            }
            k
        })
        .clone()
}

impl Challenge {
    pub fn compile(path: &str, s: &ChallengeSettings) -> Result<Challenge, Vec<FieldError>> {
        let mut errors = Vec::new();
        if s.secret.as_deref().is_some_and(|k| k.len() < 16) {
            errors.push(FieldError::new(
                format!("{path}.secret"),
                "a challenge secret must be at least 16 bytes",
            ));
        }
        if s.difficulty > 20 {
            errors.push(FieldError::new(
                format!("{path}.difficulty"),
                "at most 20 bits (2^20 tries already take a slow phone seconds)",
            ));
        }
        if s.ttl.get().as_secs() == 0 {
            errors.push(FieldError::new(
                format!("{path}.ttl"),
                "must be at least 1s",
            ));
        }
        let cookie_ok = !s.cookie.is_empty()
            && s.cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !cookie_ok {
            errors.push(FieldError::new(
                format!("{path}.cookie"),
                "a cookie name is letters, digits and `-_.`",
            ));
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Challenge {
            key: s
                .secret
                .as_ref()
                .map_or_else(process_secret, |k| k.as_bytes().to_vec()),
            cookie: s.cookie.clone(),
            ttl_secs: s.ttl.get().as_secs(),
            difficulty: s.difficulty,
        })
    }

    fn mac(&self, expiry: u64, ip: Option<IpAddr>, ua: &[u8]) -> String {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        m.update(b"v1|");
        m.update(expiry.to_string().as_bytes());
        m.update(b"|");
        m.update(
            ip.map(|i| i.to_canonical().to_string())
                .unwrap_or_default()
                .as_bytes(),
        );
        m.update(b"|");
        m.update(ua);
        let tag = m.finalize().into_bytes();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag[..16])
    }

    /// The token (`EXPIRY.MAC`) a challenge page hands out now to this client.
    pub fn token(&self, now: u64, ip: Option<IpAddr>, ua: &[u8]) -> String {
        let expiry = now + self.ttl_secs;
        format!("{expiry}.{}", self.mac(expiry, ip, ua))
    }

    /// Whether `cookie` (the cookie's value) was issued to this client, is not expired, and
    /// carries the proof of work.
    pub fn verify(&self, cookie: &[u8], now: u64, ip: Option<IpAddr>, ua: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(cookie) else {
            return false;
        };
        let mut parts = text.splitn(3, '.');
        let (Some(expiry), Some(mac), Some(_nonce)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let Ok(expiry) = expiry.parse::<u64>() else {
            return false;
        };
        if expiry <= now || expiry > now + self.ttl_secs {
            return false;
        }
        let want = self.mac(expiry, ip, ua);
        let mac_ok: bool = want.as_bytes().ct_eq(mac.as_bytes()).into();
        mac_ok && leading_zero_bits(fnv1a32(text.as_bytes())) >= u32::from(self.difficulty)
    }

    /// The page for a client without a valid cookie. `secure`: the connection is https (the
    /// cookie is then `Secure`).
    pub fn page(&self, token: &str, secure: bool) -> String {
        let attrs = format!(
            "; path=/; max-age={}; SameSite=Lax{}",
            self.ttl_secs,
            if secure { "; Secure" } else { "" }
        );
        // FNV-1a over the UTF-16 code units of an ASCII string: the bytes, as in `fnv1a32`.
        format!(
            r#"<!doctype html>
<html><head><meta charset="utf-8"><title>Checking your browser</title></head>
<body><p>Checking your browser&hellip;</p><noscript>Please enable JavaScript to continue.</noscript>
<script>
(function () {{
  var t = "{token}", d = {difficulty};
  function fnv(s) {{ var h = 0x811c9dc5; for (var i = 0; i < s.length; i++) {{ h ^= s.charCodeAt(i); h = Math.imul(h, 0x01000193) >>> 0; }} return h >>> 0; }}
  function zeros(h) {{ return h === 0 ? 32 : Math.clz32(h); }}
  for (var n = 0; n < 50000000; n++) {{
    var v = t + "." + n;
    if (zeros(fnv(v)) >= d) {{ document.cookie = "{cookie}=" + v + "{attrs}"; location.reload(); return; }}
  }}
}})();
</script></body></html>
"#,
            difficulty = self.difficulty,
            cookie = self.cookie,
        )
    }
}

/// The value of cookie `name` in the request's `Cookie` headers, if any.
pub fn cookie<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            (&pair[..eq] == name.as_bytes()).then(|| &pair[eq + 1..])
        })
}

/// FNV-1a, 32 bits.
pub fn fnv1a32(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

fn leading_zero_bits(h: u32) -> u32 {
    h.leading_zeros()
}

/// Solves a token's proof of work the way the page's script does (tests and tools).
pub fn solve(token: &str, difficulty: u8) -> String {
    (0u64..)
        .map(|n| format!("{token}.{n}"))
        .find(|v| leading_zero_bits(fnv1a32(v.as_bytes())) >= u32::from(difficulty))
        .expect("a nonce exists")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge(ttl: u64) -> Challenge {
        Challenge::compile(
            "bots.challenge",
            &ChallengeSettings {
                secret: Some("0123456789abcdef0123".into()),
                ttl: Dur(std::time::Duration::from_secs(ttl)),
                ..ChallengeSettings::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn a_solved_token_passes_for_its_client_only_until_it_expires() {
        let c = challenge(60);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let ua = b"Mozilla/5.0 Test";
        let token = c.token(1000, Some(ip), ua);
        let cookie = solve(&token, 12);
        assert!(c.verify(cookie.as_bytes(), 1001, Some(ip), ua));
        assert!(c.verify(
            cookie.as_bytes(),
            1001,
            Some("::ffff:192.0.2.7".parse().unwrap()),
            ua
        ));
        assert!(
            !c.verify(
                cookie.as_bytes(),
                1001,
                Some("192.0.2.8".parse().unwrap()),
                ua
            ),
            "another IP"
        );
        assert!(
            !c.verify(cookie.as_bytes(), 1001, Some(ip), b"curl/8"),
            "another browser"
        );
        assert!(!c.verify(cookie.as_bytes(), 1060, Some(ip), ua), "expired");
        let lazy = (0u64..)
            .map(|n| format!("{token}.{n}"))
            .find(|v| leading_zero_bits(fnv1a32(v.as_bytes())) < 12)
            .unwrap();
        assert!(
            !c.verify(lazy.as_bytes(), 1001, Some(ip), ua),
            "no work done"
        );
        let forged = format!("{}.AAAAAAAAAAAAAAAAAAAAAA.1", 1000 + 60);
        assert!(!c.verify(forged.as_bytes(), 1001, Some(ip), ua));
        // Another secret does not accept it.
        let other = Challenge::compile(
            "c",
            &ChallengeSettings {
                secret: Some("another-secret-0123456".into()),
                ..ChallengeSettings::default()
            },
        )
        .unwrap();
        assert!(!other.verify(cookie.as_bytes(), 1001, Some(ip), ua));
    }

    #[test]
    fn the_page_carries_the_token_and_settings() {
        let c = challenge(60);
        let page = c.page("123.abc", true);
        assert!(page.contains(r#"var t = "123.abc", d = 12;"#));
        assert!(page.contains("__tollgate_challenge=") && page.contains("; Secure"));
        assert!(!c.page("1.a", false).contains("Secure"));
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
        let s = ChallengeSettings {
            secret: Some("0123456789abcdef0123".into()),
            ..ChallengeSettings::default()
        };
        assert!(!format!("{s:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn bad_settings_are_reported() {
        let s = ChallengeSettings {
            secret: Some("short".into()),
            difficulty: 30,
            cookie: "a b".into(),
            ttl: Dur(std::time::Duration::ZERO),
        };
        let errs = Challenge::compile("bots.challenge", &s).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "bots.challenge.secret",
                "bots.challenge.difficulty",
                "bots.challenge.ttl",
                "bots.challenge.cookie"
            ]
        );
    }
}
