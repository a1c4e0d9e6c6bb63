//! Rewriting what the request says: the upstream path (`rewrite`) and a redirect's `Location`.
//! Both are parsed and checked at load so that applying them cannot fail.

use std::borrow::Cow;

use http::HeaderValue;
use regex::Regex;

use crate::config::{FieldError, Redirect, Rewrite};

/// A compiled `rewrite`: `strip_prefix`, then one regex replacement.
#[derive(Debug, Clone)]
pub struct PathRewrite {
    strip_prefix: Option<Box<str>>,
    regex: Option<(Regex, Box<str>)>,
}

impl PathRewrite {
    /// Compiles route `at`'s (`routes[i].rewrite`) rewrite; `None` when it does nothing.
    pub(crate) fn compile(
        r: &Rewrite,
        at: &str,
        errors: &mut Vec<FieldError>,
    ) -> Option<Option<Self>> {
        let before = errors.len();
        if let Some(p) = &r.strip_prefix {
            if !p.starts_with('/') {
                errors.push(FieldError::new(
                    format!("{at}.strip_prefix"),
                    format!("`{p}` must start with `/`"),
                ));
            }
        }
        let regex = r
            .regex
            .as_ref()
            .and_then(|rr| match Regex::new(&rr.pattern) {
                Ok(re) => {
                    if let Err(msg) = check_replacement(&re, &rr.replacement) {
                        errors.push(FieldError::new(format!("{at}.regex.replacement"), msg));
                    }
                    Some((re, rr.replacement.as_str().into()))
                }
                Err(e) => {
                    errors.push(FieldError::new(
                        format!("{at}.regex.pattern"),
                        crate::config::error::regex_message(&e),
                    ));
                    None
                }
            });
        if errors.len() > before {
            return None;
        }
        let strip_prefix = r.strip_prefix.as_deref().map(Into::into);
        Some(
            (strip_prefix.is_some() || regex.is_some()).then_some(PathRewrite {
                strip_prefix,
                regex,
            }),
        )
    }

    /// The upstream path. `strip_prefix` is removed when the path starts with it, keeping the
    /// result a path: `""` becomes `/`, and `/` is put back in front of a remainder without one
    /// (strip `/api/` from `/api/users` gives `/users`). Then the regex replaces its first match
    /// in that result (`$1`, `${name}`). Borrows when nothing changes.
    pub fn apply<'p>(&self, path: &'p str) -> Cow<'p, str> {
        let mut out = Cow::Borrowed(path);
        if let Some(prefix) = &self.strip_prefix {
            if let Some(rest) = path.strip_prefix(&**prefix) {
                out = if rest.starts_with('/') {
                    Cow::Borrowed(rest)
                } else if rest.is_empty() {
                    Cow::Borrowed("/")
                } else {
                    Cow::Owned(format!("/{rest}"))
                };
            }
        }
        if let Some((re, replacement)) = &self.regex {
            out = match out {
                Cow::Borrowed(s) => re.replace(s, &**replacement),
                Cow::Owned(s) => Cow::Owned(re.replace(&s, &**replacement).into_owned()),
            };
            if out.is_empty() {
                out = Cow::Borrowed("/");
            }
        }
        out
    }
}

/// Checks that every `$n` / `$name` / `${…}` in a replacement names a group of `re`; the regex
/// crate would silently put an empty string there. `$$` is a literal `$`.
fn check_replacement(re: &Regex, replacement: &str) -> Result<(), String> {
    let mut rest = replacement;
    while let Some(i) = rest.find('$') {
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            rest = r;
            continue;
        }
        let name = if let Some(r) = rest.strip_prefix('{') {
            match r.find('}') {
                Some(end) => {
                    rest = &r[end + 1..];
                    &r[..end]
                }
                None => continue,
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            rest = &rest[end..];
            name
        };
        if name.is_empty() {
            continue;
        }
        let known = match name.parse::<usize>() {
            Ok(n) => n < re.captures_len(),
            Err(_) => re.capture_names().flatten().any(|n| n == name),
        };
        if !known {
            let digits = name
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(name.len());
            let hint = if digits > 0 && digits < name.len() {
                format!(
                    " (write `${{{}}}` to follow a group number with text)",
                    &name[..digits]
                )
            } else {
                String::new()
            };
            return Err(format!("`${name}` names no group of the pattern{hint}"));
        }
    }
    Ok(())
}

/// A redirect `location` with `{path}` and `{query}` placeholders, split at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocationTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(Box<str>),
    Path,
    Query,
}

impl LocationTemplate {
    /// Parses `redirect.location` (`at` = `routes[i].redirect.location`). Other `{…}` text is
    /// kept as written.
    pub(crate) fn compile(r: &Redirect, at: &str, errors: &mut Vec<FieldError>) -> Option<Self> {
        let loc = r.location.as_str();
        if loc.trim().is_empty() {
            errors.push(FieldError::new(at, "location must not be empty"));
            return None;
        }
        if !loc.is_ascii() || HeaderValue::from_str(loc).is_err() {
            errors.push(FieldError::new(
                at,
                "location may hold only visible ASCII; percent-encode other characters",
            ));
            return None;
        }
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = loc;
        while !rest.is_empty() {
            let (part, len) = if rest.starts_with("{path}") {
                (Some(Part::Path), 6)
            } else if rest.starts_with("{query}") {
                (Some(Part::Query), 7)
            } else {
                let len = rest.chars().next().map_or(1, char::len_utf8);
                text.push_str(&rest[..len]);
                (None, len)
            };
            if let Some(p) = part {
                if !text.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut text).into()));
                }
                parts.push(p);
            }
            rest = &rest[len..];
        }
        if !text.is_empty() {
            parts.push(Part::Text(text.into()));
        }
        Some(LocationTemplate { parts })
    }

    /// The `Location` value for a request: `{path}` is the request path, `{query}` is `?` and
    /// the query when there is a non-empty one, else nothing.
    pub fn render(&self, path: &str, query: Option<&str>) -> String {
        let query = query.filter(|q| !q.is_empty());
        let mut out = String::with_capacity(64 + path.len() + query.map_or(0, str::len));
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Path => out.push_str(path),
                Part::Query => {
                    if let Some(q) = query {
                        out.push('?');
                        out.push_str(q);
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(yaml: &str) -> PathRewrite {
        let r: Rewrite = serde_yaml::from_str(yaml).unwrap();
        let mut errs = Vec::new();
        let rw = PathRewrite::compile(&r, "routes[0].rewrite", &mut errs);
        assert_eq!(errs, vec![]);
        rw.unwrap().unwrap()
    }

    fn rewrite_errors(yaml: &str) -> Vec<FieldError> {
        let r: Rewrite = serde_yaml::from_str(yaml).unwrap();
        let mut errs = Vec::new();
        assert!(PathRewrite::compile(&r, "routes[0].rewrite", &mut errs).is_none());
        errs
    }

    #[test]
    fn strip_prefix() {
        let rw = rewrite("strip_prefix: /api");
        assert_eq!(rw.apply("/api/users"), "/users");
        assert!(matches!(rw.apply("/api/users"), Cow::Borrowed(_)));
        assert_eq!(rw.apply("/api"), "/");
        assert_eq!(rw.apply("/apix"), "/x");
        assert_eq!(rw.apply("/other"), "/other");
        let rw = rewrite("strip_prefix: /api/");
        assert_eq!(rw.apply("/api/users"), "/users");
        assert_eq!(rw.apply("/api/"), "/");
        assert_eq!(rw.apply("/api"), "/api");
    }

    #[test]
    fn regex_replaces_first_match() {
        let rw = rewrite(
            "regex: {pattern: '^/v(\\d+)/(?P<rest>.*)$', replacement: '/api/${rest}?v=$1'}",
        );
        assert_eq!(rw.apply("/v2/users/7"), "/api/users/7?v=2");
        assert_eq!(rw.apply("/nope"), "/nope");
        let rw = rewrite("regex: {pattern: 'a', replacement: 'b'}");
        assert_eq!(rw.apply("/aaa"), "/baa");
        let rw = rewrite("regex: {pattern: '.*', replacement: ''}");
        assert_eq!(rw.apply("/x"), "/");
    }

    #[test]
    fn strip_then_regex() {
        let rw = rewrite("{strip_prefix: /svc, regex: {pattern: '^/old/', replacement: '/new/'}}");
        assert_eq!(rw.apply("/svc/old/thing"), "/new/thing");
        assert_eq!(rw.apply("/svcold/thing"), "/new/thing");
        assert_eq!(rw.apply("/old/thing"), "/new/thing");
        assert_eq!(rw.apply("/svc"), "/");
    }

    #[test]
    fn empty_rewrite_is_none() {
        let mut errs = Vec::new();
        assert!(PathRewrite::compile(&Rewrite::default(), "r", &mut errs)
            .unwrap()
            .is_none());
    }

    #[test]
    fn rewrite_errors_have_paths() {
        let e = rewrite_errors("{strip_prefix: api, regex: {pattern: '(', replacement: x}}");
        let paths: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes[0].rewrite.strip_prefix",
                "routes[0].rewrite.regex.pattern"
            ]
        );
        assert!(
            e[1].message.starts_with("invalid regex:"),
            "{}",
            e[1].message
        );
        for bad in ["$2", "${name}", "$1a", "$x"] {
            let e = rewrite_errors(&format!("regex: {{pattern: '/(a)', replacement: '{bad}'}}"));
            assert_eq!(e[0].path, "routes[0].rewrite.regex.replacement", "{bad}");
        }
        assert!(
            rewrite_errors("regex: {pattern: '/(a)', replacement: '$1a'}")[0]
                .message
                .contains("${1}")
        );
        rewrite("regex: {pattern: '/(?P<n>a)', replacement: '$$ ${1}a $n ${n} $0 $'}");
    }

    fn location(loc: &str) -> LocationTemplate {
        let mut errs = Vec::new();
        let r = Redirect {
            status: 301,
            location: loc.into(),
        };
        let t = LocationTemplate::compile(&r, "routes[0].redirect.location", &mut errs);
        assert_eq!(errs, vec![]);
        t.unwrap()
    }

    #[test]
    fn location_template() {
        let t = location("https://example.com{path}{query}");
        assert_eq!(t.render("/a/b", Some("x=1")), "https://example.com/a/b?x=1");
        assert_eq!(t.render("/a/b", Some("")), "https://example.com/a/b");
        assert_eq!(t.render("/a/b", None), "https://example.com/a/b");
        let t = location("/new{path}/{x}?from=old&{query}");
        assert_eq!(t.render("/p", Some("q=2")), "/new/p/{x}?from=old&?q=2");
        assert_eq!(location("{path}{path}").render("/p", None), "/p/p");
        let mut errs = Vec::new();
        for bad in ["", "/a\nb", "/fixé"] {
            let r = Redirect {
                status: 301,
                location: bad.into(),
            };
            assert!(
                LocationTemplate::compile(&r, "routes[3].redirect.location", &mut errs).is_none()
            );
        }
        assert_eq!(errs.len(), 3);
        assert!(errs.iter().all(|e| e.path == "routes[3].redirect.location"));
    }
}
