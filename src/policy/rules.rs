//! Custom rules (`rules:`): the operator's own conditions on a request, without SecLang, each
//! with an action. Checked with the IP rules and bots, after routing and before flood
//! protection and authentication, in declared order:
//!
//! - `block`: `403 blocked_by_rule`; nothing reaches the upstream. The first block ends it.
//! - `log`: passes; counted and named in the access log.
//! - `tag`: passes with `X-Tollgate-Tags: TAG[, TAG...]` for the upstream (removed from client
//!   requests first, so a client cannot set it).
//!
//! A rule's `match` is a route's `match` (hosts, path, methods, headers, query, cookies, with
//! `exact`/`prefix`/`contains`/`regex`/`present`), plus `client_ip: { in, not_in }` (CIDRs).
//! `routes[].rules: false` exempts a route. `body: { contains | regex }` looks at the request
//! body (up to 64 KiB, read before anything reaches the upstream): such rules run in a second
//! pass, after the head-only rules and the WAF, once the body is there.

use std::net::IpAddr;

use serde::Deserialize;

use super::client_ip::CidrList;
use crate::config::{error, FieldError, RouteMatch};
use crate::router::{RequestHead, RequestMatcher};

/// The header that carries `tag` rules' tags to the upstream.
pub const TAGS_HEADER: &str = "x-tollgate-tags";

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique; the metric and access-log label.
    pub id: String,
    #[serde(default, rename = "match")]
    pub matcher: RouteMatch,
    #[serde(default)]
    pub client_ip: Option<IpCondition>,
    /// A condition on the request body (raw bytes as sent).
    #[serde(default)]
    pub body: Option<BodyCondition>,
    pub action: RuleAction,
    /// For `action: tag`.
    #[serde(default)]
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IpCondition {
    /// The client address is in one of these.
    #[serde(default, rename = "in")]
    pub within: Vec<String>,
    /// The client address is in none of these.
    #[serde(default)]
    pub not_in: Vec<String>,
}

/// `body: { contains: "..." }` or `body: { regex: "..." }` (one of them).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BodyCondition {
    pub contains: Option<String>,
    pub regex: Option<String>,
}

#[derive(Debug)]
enum BodyMatch {
    Contains(Box<memchr::memmem::Finder<'static>>),
    Regex(regex::bytes::Regex),
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    Block,
    Log,
    Tag,
}

#[derive(Debug)]
struct Rule {
    id: String,
    matcher: RequestMatcher,
    within: CidrList,
    not_in: CidrList,
    action: RuleAction,
    tag: Option<String>,
    body: Option<BodyMatch>,
}

/// What the rules say of one request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict<'a> {
    /// The `block` rule that refused it.
    pub blocked_by: Option<&'a str>,
    /// `log` and `tag` rules that matched (before a block, if any), in order.
    pub matched: Vec<&'a str>,
    /// Tags of the `tag` rules that matched.
    pub tags: Vec<&'a str>,
}

/// The compiled `rules:` section.
#[derive(Debug, Default)]
pub struct CustomRules {
    rules: Vec<Rule>,
}

impl CustomRules {
    pub fn compile(specs: &[RuleSpec]) -> Result<CustomRules, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut rules = Vec::with_capacity(specs.len());
        let mut ids = std::collections::HashSet::new();
        for (i, spec) in specs.iter().enumerate() {
            let at = error::index("rules", i);
            if spec.id.is_empty()
                || !spec
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            {
                errors.push(FieldError::new(
                    error::join(&at, "id"),
                    "a rule id is letters, digits and `-_.:`",
                ));
            } else if !ids.insert(spec.id.as_str()) {
                errors.push(FieldError::new(
                    error::join(&at, "id"),
                    format!("duplicate rule id `{}`", spec.id),
                ));
            }
            let tag = match (spec.action, &spec.tag) {
                (RuleAction::Tag, Some(t)) if is_tag(t) => Some(t.clone()),
                (RuleAction::Tag, _) => {
                    errors.push(FieldError::new(
                        error::join(&at, "tag"),
                        "`action: tag` needs a `tag` of letters, digits and `-_.:`",
                    ));
                    None
                }
                (_, Some(_)) => {
                    errors.push(FieldError::new(
                        error::join(&at, "tag"),
                        "`tag` is only for `action: tag`",
                    ));
                    None
                }
                (_, None) => None,
            };
            let ip = spec.client_ip.clone().unwrap_or_default();
            let ip_at = error::join(&at, "client_ip");
            let within = CidrList::parse(&error::join(&ip_at, "in"), &ip.within)
                .map_err(|e| errors.extend(e))
                .unwrap_or_default();
            let not_in = CidrList::parse(&error::join(&ip_at, "not_in"), &ip.not_in)
                .map_err(|e| errors.extend(e))
                .unwrap_or_default();
            let matcher =
                RequestMatcher::compile(&spec.matcher, &error::join(&at, "match"), &mut errors);
            let body_at = error::join(&at, "body");
            let body = match &spec.body {
                None => None,
                Some(BodyCondition {
                    contains: Some(c),
                    regex: None,
                }) if !c.is_empty() => Some(BodyMatch::Contains(Box::new(
                    memchr::memmem::Finder::new(c.as_bytes()).into_owned(),
                ))),
                Some(BodyCondition {
                    contains: None,
                    regex: Some(r),
                }) => match regex::bytes::Regex::new(r) {
                    Ok(r) => Some(BodyMatch::Regex(r)),
                    Err(e) => {
                        errors.push(FieldError::new(
                            error::join(&body_at, "regex"),
                            error::regex_message(&e),
                        ));
                        None
                    }
                },
                Some(_) => {
                    errors.push(FieldError::new(
                        body_at,
                        "`body` takes one of `contains` (not empty) or `regex`",
                    ));
                    None
                }
            };
            if let Some(matcher) = matcher {
                rules.push(Rule {
                    id: spec.id.clone(),
                    matcher,
                    within,
                    not_in,
                    action: spec.action,
                    tag,
                    body,
                });
            }
        }
        if errors.is_empty() {
            Ok(CustomRules { rules })
        } else {
            Err(errors)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Some rule looks at the body: the gateway reads it for [`Self::evaluate_body`].
    pub fn needs_body(&self) -> bool {
        self.rules.iter().any(|r| r.body.is_some())
    }

    /// The head-only rules in order, until a `block` matches. Allocates only when a rule
    /// matches.
    pub fn evaluate(&self, req: &RequestHead<'_>, client: Option<IpAddr>) -> Verdict<'_> {
        self.run(req, client, None)
    }

    /// The rules with a `body` condition, in order, on the body read so far.
    pub fn evaluate_body(
        &self,
        req: &RequestHead<'_>,
        client: Option<IpAddr>,
        body: &[u8],
    ) -> Verdict<'_> {
        self.run(req, client, Some(body))
    }

    fn run(
        &self,
        req: &RequestHead<'_>,
        client: Option<IpAddr>,
        body: Option<&[u8]>,
    ) -> Verdict<'_> {
        let mut v = Verdict::default();
        for r in &self.rules {
            let body_ok = match (&r.body, body) {
                (None, None) => true,
                (Some(BodyMatch::Contains(f)), Some(b)) => f.find(b).is_some(),
                (Some(BodyMatch::Regex(re)), Some(b)) => re.is_match(b),
                _ => false,
            };
            if !body_ok || !r.applies(req, client) {
                continue;
            }
            match r.action {
                RuleAction::Block => {
                    v.blocked_by = Some(&r.id);
                    break;
                }
                RuleAction::Log => v.matched.push(&r.id),
                RuleAction::Tag => {
                    v.matched.push(&r.id);
                    v.tags.extend(r.tag.as_deref());
                }
            }
        }
        v
    }
}

impl Rule {
    fn applies(&self, req: &RequestHead<'_>, client: Option<IpAddr>) -> bool {
        let ip_ok = match client {
            Some(ip) => {
                (self.within.is_empty() || self.within.contains(ip)) && !self.not_in.contains(ip)
            }
            // No address (a Unix socket peer): an address condition cannot hold.
            None => self.within.is_empty() && self.not_in.is_empty(),
        };
        ip_ok && self.matcher.matches(req)
    }
}

fn is_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_http::RequestHeader;

    fn rules(yaml: &str) -> Result<CustomRules, Vec<FieldError>> {
        CustomRules::compile(&serde_yaml::from_str::<Vec<RuleSpec>>(yaml).unwrap())
    }

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, uri.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn block_log_and_tag_in_order() {
        let r = rules(
            r#"
- { id: tag-api, match: { path_prefix: /api/ }, action: tag, tag: api }
- { id: log-debug, match: { query: { debug: { present: true } } }, action: log }
- { id: admin-outside, match: { path_prefix: /admin }, client_ip: { not_in: [10.0.0.0/8] }, action: block }
- { id: no-shell, match: { headers: { user-agent: { contains: "() {" } } }, action: block }
- { id: never, match: { methods: [DELETE], hosts: ["*.internal.test"] }, action: block }
"#,
        )
        .unwrap();
        let eval = |h: &RequestHeader, ip: &str| {
            let v = r.evaluate(&RequestHead::from_parts(h), Some(ip.parse().unwrap()));
            (
                v.blocked_by.map(str::to_string),
                v.matched.join(","),
                v.tags.join(","),
            )
        };
        let api = req("GET", "/api/x?debug=1", &[("host", "a.test")]);
        assert_eq!(
            eval(&api, "192.0.2.1"),
            (None, "tag-api,log-debug".into(), "api".into())
        );
        let admin = req("GET", "/admin", &[("host", "a.test")]);
        assert_eq!(
            eval(&admin, "192.0.2.1").0.as_deref(),
            Some("admin-outside")
        );
        assert_eq!(eval(&admin, "10.1.1.1").0, None);
        let shellshock = req(
            "GET",
            "/",
            &[("host", "a.test"), ("user-agent", "() { :; }; /bin/id")],
        );
        assert_eq!(
            eval(&shellshock, "192.0.2.1").0.as_deref(),
            Some("no-shell")
        );
        let del = req("DELETE", "/x", &[("host", "db.internal.test")]);
        assert_eq!(eval(&del, "192.0.2.1").0.as_deref(), Some("never"));
        let del_other = req("DELETE", "/x", &[("host", "internal.test")]);
        assert_eq!(
            eval(&del_other, "192.0.2.1").0,
            None,
            "a wildcard does not cover its suffix"
        );
    }

    #[test]
    fn body_rules_run_only_in_the_body_pass() {
        let r = rules(
            r#"
- { id: no-drop, body: { regex: "(?i)drop\\s+table" }, action: block }
- { id: promo, match: { methods: [POST] }, body: { contains: "\"coupon\"" }, action: tag, tag: promo }
"#,
        )
        .unwrap();
        assert!(r.needs_body());
        let post = req("POST", "/api", &[("host", "a.test")]);
        let head = RequestHead::from_parts(&post);
        let ip = Some("192.0.2.1".parse().unwrap());
        assert_eq!(r.evaluate(&head, ip), Verdict::default());
        let v = r.evaluate_body(&head, ip, br#"{"q":"x; DROP  TABLE users"}"#);
        assert_eq!(v.blocked_by, Some("no-drop"));
        let v = r.evaluate_body(&head, ip, br#"{"coupon":"SUMMER"}"#);
        assert_eq!((v.blocked_by, v.tags), (None, vec!["promo"]));
        assert_eq!(r.evaluate_body(&head, ip, b"{}"), Verdict::default());
    }

    #[test]
    fn mistakes_are_reported_with_their_paths() {
        let errs = rules(
            r#"
- { id: "bad id", action: log }
- { id: a, action: tag }
- { id: a, action: block, tag: x, client_ip: { in: [300.0.0.0/8] } }
- { id: b, match: { path: nope, headers: { x: { regex: "(" } } }, action: block }
- { id: c, body: { contains: "", regex: "x" }, action: log }
- { id: d, body: { regex: "[" }, action: log }
"#,
        )
        .unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "rules[0].id",
                "rules[1].tag",
                "rules[2].id",
                "rules[2].tag",
                "rules[2].client_ip.in[0]",
                "rules[3].match.path",
                "rules[3].match.headers.x.regex",
                "rules[4].body",
                "rules[5].body.regex",
            ],
            "{errs:?}"
        );
    }
}
