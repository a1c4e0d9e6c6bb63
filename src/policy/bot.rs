//! Bot detection by `User-Agent`: a built-in list of known tools (`bots.txt`: scanners,
//! scripting clients, crawlers, monitors), the operator's own allow and deny patterns, and a
//! per-route mode. Checked after the IP rules and flood protection, before authentication.
//!
//! The built-in list is one Aho-Corasick automaton (case-insensitive), the operator's patterns one
//! alternation regex each (a `RegexSet` only names the rule once one matched), all built at
//! load: a request costs one pass of each over its User-Agent (benches/screen.rs).
//! What this cannot see: a tool that sends a browser's User-Agent. That is what the browser
//! challenge and the WAF are for.

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex::bytes::{Regex, RegexSet};
use serde::Deserialize;

use crate::config::units::Dur;
use crate::config::{error, FieldError};

const BUILTIN: &str = include_str!("bots.txt");

/// `bots:` (global) and `routes[].bots` (the mode only).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BotSettings {
    #[serde(default)]
    pub mode: BotMode,
    /// Built-in categories that are refused: `scanner`, `script`, `crawler`, `monitor`.
    #[serde(default = "default_block")]
    pub block: Vec<BotCategory>,
    /// More User-Agent patterns to refuse (regexes, case-insensitive).
    #[serde(default)]
    pub deny: Vec<String>,
    /// User-Agent patterns never refused (checked first), e.g. your own monitoring.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Refuse requests without a User-Agent (browsers and most clients send one).
    #[serde(default)]
    pub block_empty: bool,
    /// The browser challenge of `bots: challenge` routes.
    #[serde(default)]
    pub challenge: super::challenge::ChallengeSettings,
    /// Crawlers verified by reverse-and-forward DNS (`verify.rs`). Not set: Google, Bing,
    /// Apple, Yandex, Baidu; `[]`: no verification.
    #[serde(default = "super::verify::default_verify")]
    pub verify: Vec<super::verify::VerifyRule>,
    #[serde(default)]
    pub verify_cache: super::verify::VerifyCacheSettings,
    /// How long a claiming request waits for DNS at most; then it is unverified.
    #[serde(default = "super::verify::default_verify_timeout")]
    pub verify_timeout: Dur,
    /// The DNS server for verification (`IP:PORT`, UDP). Default: /etc/resolv.conf's.
    #[serde(default)]
    pub resolver: Option<String>,
}

impl Default for BotSettings {
    fn default() -> Self {
        Self {
            mode: BotMode::default(),
            block: default_block(),
            deny: Vec::new(),
            allow: Vec::new(),
            block_empty: false,
            challenge: Default::default(),
            verify: super::verify::default_verify(),
            verify_cache: Default::default(),
            verify_timeout: super::verify::default_verify_timeout(),
            resolver: None,
        }
    }
}

fn default_block() -> Vec<BotCategory> {
    vec![BotCategory::Scanner]
}

/// What happens to a request the rules refuse.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BotMode {
    /// `403`.
    #[default]
    Block,
    /// Passes; counted and logged as what would have been blocked.
    Detect,
    /// Like `block`, and every other client must pass the browser challenge (`bots.challenge`)
    /// unless its User-Agent is in `allow`.
    Challenge,
    Off,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum BotCategory {
    Scanner,
    Script,
    Crawler,
    Monitor,
}

impl BotCategory {
    fn parse(s: &str) -> Option<BotCategory> {
        Some(match s {
            "scanner" => BotCategory::Scanner,
            "script" => BotCategory::Script,
            "crawler" => BotCategory::Crawler,
            "monitor" => BotCategory::Monitor,
            _ => return None,
        })
    }
}

/// A User-Agent the rules refuse: which rule (the built-in tool's name, `deny[N]`, `empty`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BotHit<'a> {
    pub rule: &'a str,
}

/// The compiled `bots:` section.
#[derive(Debug)]
pub struct BotDetector {
    builtin: AhoCorasick,
    /// Per built-in pattern: its name and whether its category is refused.
    names: Vec<(&'static str, bool)>,
    /// Any of `deny`, then which one.
    deny_any: Option<Regex>,
    deny: RegexSet,
    deny_names: Vec<String>,
    allow_any: Option<Regex>,
    block_empty: bool,
    pub mode: BotMode,
    pub challenge: super::challenge::Challenge,
    /// Verified crawlers (`bots.verify`).
    pub verify: super::verify::Verifier,
}

impl Default for BotDetector {
    fn default() -> Self {
        BotDetector::compile("bots", &BotSettings::default()).expect("the default compiles")
    }
}

impl BotDetector {
    pub fn compile(path: &str, s: &BotSettings) -> Result<BotDetector, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut patterns = Vec::new();
        let mut names = Vec::new();
        for line in BUILTIN.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.splitn(3, ' ');
            let (Some(cat), Some(name), Some(pattern)) = (parts.next(), parts.next(), parts.next())
            else {
                continue; // bots.txt is checked by a unit test
            };
            let Some(category) = BotCategory::parse(cat) else {
                continue;
            };
            patterns.push(pattern);
            names.push((name, s.block.contains(&category)));
        }
        let builtin = AhoCorasickBuilder::new()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::LeftmostFirst)
            .build(&patterns)
            .expect("the built-in list compiles");
        let mut set = |field: &str, items: &[String]| {
            let anchored: Vec<String> = items.iter().map(|p| format!("(?i){p}")).collect();
            for (i, p) in anchored.iter().enumerate() {
                if let Err(e) = regex::bytes::Regex::new(p) {
                    errors.push(FieldError::new(
                        error::index(&error::join(path, field), i),
                        format!("invalid regex: {e}"),
                    ));
                }
            }
            RegexSet::new(&anchored).unwrap_or_else(|_| RegexSet::empty())
        };
        let deny = set("deny", &s.deny);
        set("allow", &s.allow);
        let challenge =
            super::challenge::Challenge::compile(&error::join(path, "challenge"), &s.challenge)
                .map_err(|e| errors.extend(e))
                .ok();
        let verify = super::verify::Verifier::compile(
            path,
            &s.verify,
            &s.verify_cache,
            s.verify_timeout,
            s.resolver.as_deref(),
        )
        .map_err(|e| errors.extend(e))
        .ok();
        let (Some(challenge), Some(verify)) = (challenge, verify) else {
            return Err(errors);
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(BotDetector {
            builtin,
            names,
            deny_any: any_of(&s.deny),
            deny,
            deny_names: (0..s.deny.len()).map(|i| format!("deny[{i}]")).collect(),
            allow_any: any_of(&s.allow),
            block_empty: s.block_empty,
            mode: s.mode,
            challenge,
            verify,
        })
    }

    /// Whether the operator's `allow` patterns let this User-Agent through (also past the
    /// browser challenge).
    pub fn allowed(&self, user_agent: Option<&[u8]>) -> bool {
        user_agent.is_some_and(|ua| self.allow_any.as_ref().is_some_and(|r| r.is_match(ua)))
    }

    /// The verifiable crawler this User-Agent claims to be (`bots.verify`), unless `allow`
    /// lets it through anyway.
    pub fn claim(&self, user_agent: Option<&[u8]>) -> Option<usize> {
        let ua = user_agent?;
        let crawler = self.verify.claim(ua)?;
        (!self.allowed(Some(ua))).then_some(crawler)
    }

    /// The `deny` pattern that refuses this User-Agent, if any: what a verified crawler still
    /// answers to (the operator's own word beats the exemption).
    pub fn denied(&self, user_agent: &[u8]) -> Option<BotHit<'_>> {
        if self
            .deny_any
            .as_ref()
            .is_some_and(|r| r.is_match(user_agent))
        {
            if let Some(i) = self.deny.matches(user_agent).iter().next() {
                return Some(BotHit {
                    rule: &self.deny_names[i],
                });
            }
        }
        None
    }

    /// The rule that refuses this User-Agent, if any.
    pub fn check(&self, user_agent: Option<&[u8]>) -> Option<BotHit<'_>> {
        let ua = match user_agent {
            Some(ua) if !ua.trim_ascii().is_empty() => ua,
            _ => return self.block_empty.then_some(BotHit { rule: "empty" }),
        };
        if self.allow_any.as_ref().is_some_and(|r| r.is_match(ua)) {
            return None;
        }
        if let Some(m) = self.builtin.find(ua) {
            let (name, refused) = self.names[m.pattern().as_usize()];
            if refused {
                return Some(BotHit { rule: name });
            }
        }
        if self.deny_any.as_ref().is_some_and(|r| r.is_match(ua)) {
            if let Some(i) = self.deny.matches(ua).iter().next() {
                return Some(BotHit {
                    rule: &self.deny_names[i],
                });
            }
        }
        None
    }
}

/// One case-insensitive regex matching any of `patterns` (each already checked alone).
fn any_of(patterns: &[String]) -> Option<Regex> {
    if patterns.is_empty() {
        return None;
    }
    let joined: Vec<String> = patterns.iter().map(|p| format!("(?:{p})")).collect();
    Regex::new(&format!("(?i){}", joined.join("|"))).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detector(yaml: &str) -> BotDetector {
        BotDetector::compile("bots", &serde_yaml::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn the_builtin_list_is_well_formed() {
        let mut seen = std::collections::HashSet::new();
        for line in BUILTIN.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let parts: Vec<&str> = line.splitn(3, ' ').collect();
            assert_eq!(parts.len(), 3, "{line}");
            assert!(BotCategory::parse(parts[0]).is_some(), "{line}");
            assert!(seen.insert(parts[1]), "duplicate name: {line}");
            assert_eq!(
                parts[2],
                parts[2].to_lowercase(),
                "patterns are lowercase: {line}"
            );
        }
        assert!(seen.len() > 50);
    }

    #[test]
    fn scanners_are_refused_by_default_and_scripts_are_not() {
        let d = BotDetector::default();
        let hit = |ua: &str| d.check(Some(ua.as_bytes())).map(|h| h.rule.to_string());
        assert_eq!(
            hit("sqlmap/1.7.2#stable (https://sqlmap.org)").as_deref(),
            Some("sqlmap")
        );
        assert_eq!(
            hit("Mozilla/5.00 (Nikto/2.1.6) (Evasions:None)").as_deref(),
            Some("nikto")
        );
        assert_eq!(
            hit("masscan/1.3 (https://github.com/robertdavidgraham/masscan)").as_deref(),
            Some("masscan")
        );
        assert_eq!(
            hit("Mozilla/5.0 (compatible; Nmap Scripting Engine; https://nmap.org/book/nse.html)")
                .as_deref(),
            Some("nmap")
        );
        assert_eq!(hit("curl/8.5.0"), None);
        assert_eq!(hit("python-requests/2.31"), None);
        assert_eq!(
            hit("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36"),
            None
        );
        assert_eq!(
            d.check(None),
            None,
            "no User-Agent passes unless block_empty"
        );
    }

    #[test]
    fn categories_allow_and_deny_patterns() {
        let d = detector(
            "block: [scanner, script]\nallow: ['^curl/8\\.5', 'internal-probe']\ndeny: ['evilbot', '^$x']\nblock_empty: true\n",
        );
        let hit = |ua: &str| d.check(Some(ua.as_bytes())).map(|h| h.rule.to_string());
        assert_eq!(hit("Wget/1.21").as_deref(), Some("wget"));
        assert_eq!(hit("curl/7.88").as_deref(), Some("curl"));
        assert_eq!(hit("curl/8.5.0"), None, "allow wins");
        assert_eq!(
            hit("sqlmap/1.0 internal-probe"),
            None,
            "allow wins over built-ins too"
        );
        assert_eq!(hit("Mozilla/5.0 EvilBot/2"), Some("deny[0]".into()));
        assert_eq!(hit("Googlebot/2.1"), None, "crawlers pass unless listed");
        assert_eq!(d.check(Some(b"  ")).map(|h| h.rule), Some("empty"));
        assert_eq!(d.check(None).map(|h| h.rule), Some("empty"));
    }

    #[test]
    fn bad_patterns_are_reported() {
        let s: BotSettings =
            serde_yaml::from_str("deny: ['(unclosed']\nallow: [ok, '[z-a]']").unwrap();
        let errs = BotDetector::compile("bots", &s).unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["bots.deny[0]", "bots.allow[1]"]);
    }
}
