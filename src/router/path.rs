//! Path matching inside one host group: which routes' path conditions hold for a path, offered
//! in precedence order (exact, longest prefix, regex, none). Knows nothing of other conditions.

use regex::{Regex, RegexSet, RegexSetBuilder};

use crate::config::{FieldError, RouteMatch};

use super::hash::FastMap;

/// A route's path condition (at most one of `path`, `path_prefix`, `path_regex`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PathCond {
    Any,
    Exact(String),
    /// Plain string prefix, like nginx and Envoy: `/api` matches `/api`, `/api/x` and `/apix`.
    Prefix(String),
    /// Unanchored, as written; anchor with `^` and `$` to match the whole path.
    Regex(String),
}

/// Reads and checks a route's path condition; errors are reported under `at` (`routes[i].match`).
pub(crate) fn compile_path(
    m: &RouteMatch,
    at: &str,
    errors: &mut Vec<FieldError>,
) -> Option<PathCond> {
    let given: Vec<&str> = [
        m.path.as_ref().map(|_| "path"),
        m.path_prefix.as_ref().map(|_| "path_prefix"),
        m.path_regex.as_ref().map(|_| "path_regex"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if given.len() > 1 {
        errors.push(FieldError::new(
            at,
            format!(
                "at most one of path, path_prefix, path_regex may be given (found {})",
                given.join(", ")
            ),
        ));
        return None;
    }
    let slash = |field: &str, p: &String, errors: &mut Vec<FieldError>| {
        let ok = p.starts_with('/');
        if !ok {
            errors.push(FieldError::new(
                format!("{at}.{field}"),
                format!("`{p}` must start with `/`"),
            ));
        }
        ok
    };
    if let Some(p) = &m.path {
        return slash("path", p, errors).then(|| PathCond::Exact(p.clone()));
    }
    if let Some(p) = &m.path_prefix {
        return slash("path_prefix", p, errors).then(|| PathCond::Prefix(p.clone()));
    }
    if let Some(re) = &m.path_regex {
        return match Regex::new(re) {
            Ok(_) => Some(PathCond::Regex(re.clone())),
            Err(e) => {
                errors.push(FieldError::new(
                    format!("{at}.path_regex"),
                    crate::config::error::regex_message(&e),
                ));
                None
            }
        };
    }
    Some(PathCond::Any)
}

/// Route ids sharing one key, in declared order.
type Ids = Vec<u32>;

/// The path conditions of one host group's routes, indexed for lookup.
#[derive(Debug, Default)]
pub(crate) struct PathTable {
    exact: FastMap<Box<str>, Ids>,
    /// One map per distinct prefix length, longest first.
    prefixes: Vec<(usize, FastMap<Box<str>, Ids>)>,
    /// Patterns in declared order; `regex_ids[k]` is the route of pattern `k`.
    regex: Option<RegexSet>,
    regex_ids: Ids,
    any: Ids,
}

/// Collects a group's routes (in declared order) before [`PathTableBuilder::build`].
#[derive(Debug, Default)]
pub(crate) struct PathTableBuilder {
    exact: FastMap<Box<str>, Ids>,
    prefixes: FastMap<usize, FastMap<Box<str>, Ids>>,
    regexes: Vec<String>,
    regex_ids: Ids,
    any: Ids,
}

impl PathTableBuilder {
    /// Adds a route. Routes must be added in declared order, each at most once.
    pub(crate) fn add(&mut self, id: u32, cond: &PathCond) {
        match cond {
            PathCond::Any => self.any.push(id),
            PathCond::Exact(p) => self.exact.entry(p.as_str().into()).or_default().push(id),
            PathCond::Prefix(p) => self
                .prefixes
                .entry(p.len())
                .or_default()
                .entry(p.as_str().into())
                .or_default()
                .push(id),
            PathCond::Regex(re) => {
                self.regexes.push(re.clone());
                self.regex_ids.push(id);
            }
        }
    }

    /// Compiles the group's regexes into one set. Each was checked alone already, so the only
    /// failure left is the combined set growing past the size limit.
    pub(crate) fn build(self) -> Result<PathTable, regex::Error> {
        let regex = if self.regexes.is_empty() {
            None
        } else {
            Some(
                RegexSetBuilder::new(&self.regexes)
                    .size_limit(256 << 20)
                    .dfa_size_limit(64 << 20)
                    .build()?,
            )
        };
        let mut prefixes: Vec<_> = self.prefixes.into_iter().collect();
        prefixes.sort_unstable_by_key(|(len, _)| std::cmp::Reverse(*len));
        Ok(PathTable {
            exact: self.exact,
            prefixes,
            regex,
            regex_ids: self.regex_ids,
            any: self.any,
        })
    }
}

impl PathTable {
    /// Offers the routes whose path condition holds to `accept`, in precedence order, and
    /// returns the first accepted. Only a regex hit allocates; the regex set is run only when
    /// the exact and prefix stages found nothing acceptable.
    #[inline]
    pub(crate) fn find(&self, path: &str, mut accept: impl FnMut(u32) -> bool) -> Option<u32> {
        if !self.exact.is_empty() {
            if let Some(ids) = self.exact.get(path) {
                if let Some(&id) = ids.iter().find(|&&id| accept(id)) {
                    return Some(id);
                }
            }
        }
        for (len, map) in &self.prefixes {
            // `get` is None past the end and inside a multi-byte character; neither can match.
            let Some(head) = path.get(..*len) else {
                continue;
            };
            if let Some(ids) = map.get(head) {
                if let Some(&id) = ids.iter().find(|&&id| accept(id)) {
                    return Some(id);
                }
            }
        }
        // `matches` allocates its result; `is_match` does not, so a path no regex matches (most
        // misses) stays allocation-free.
        if let Some(set) = self.regex.as_ref().filter(|set| set.is_match(path)) {
            if let Some(id) = set
                .matches(path)
                .iter()
                .map(|k| self.regex_ids[k])
                .find(|&id| accept(id))
            {
                return Some(id);
            }
        }
        self.any.iter().copied().find(|&id| accept(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(conds: &[PathCond]) -> PathTable {
        let mut b = PathTableBuilder::default();
        for (i, c) in conds.iter().enumerate() {
            b.add(i as u32, c);
        }
        b.build().unwrap()
    }

    fn all(t: &PathTable, path: &str) -> Vec<u32> {
        let mut seen = Vec::new();
        assert_eq!(
            t.find(path, |id| {
                seen.push(id);
                false
            }),
            None
        );
        seen
    }

    #[test]
    fn candidates_come_in_precedence_order() {
        use PathCond::*;
        let t = table(&[
            Any,                           // 0
            Prefix("/".into()),            // 1
            Regex("^/api/v[0-9]+".into()), // 2
            Prefix("/api".into()),         // 3
            Exact("/api/v1".into()),       // 4
            Prefix("/api/".into()),        // 5
            Regex("v1$".into()),           // 6
            Prefix("/api".into()),         // 7
            Exact("/api/v1".into()),       // 8
            Any,                           // 9
        ]);
        assert_eq!(all(&t, "/api/v1"), vec![4, 8, 5, 3, 7, 1, 2, 6, 0, 9]);
        assert_eq!(all(&t, "/apix"), vec![3, 7, 1, 0, 9]);
        assert_eq!(all(&t, "/api"), vec![3, 7, 1, 0, 9]);
        assert_eq!(all(&t, "/other/v1"), vec![1, 6, 0, 9]);
        assert_eq!(all(&t, ""), vec![0, 9]);
        // A prefix length that falls inside a multi-byte character is skipped, not a panic.
        assert_eq!(all(&t, "/éé"), vec![1, 0, 9]);
        assert_eq!(t.find("/api/v1", |id| id == 5), Some(5));
        assert_eq!(t.find("/api/v2", |id| id != 5 && id != 3), Some(7));
    }

    #[test]
    fn path_conditions_are_checked() {
        let m = |yaml: &str| serde_yaml::from_str::<RouteMatch>(yaml).unwrap();
        let mut errs = Vec::new();
        let at = "routes[1].match";
        assert_eq!(compile_path(&m("{}"), at, &mut errs), Some(PathCond::Any));
        assert_eq!(
            compile_path(&m("path_prefix: /a"), at, &mut errs),
            Some(PathCond::Prefix("/a".into()))
        );
        assert!(errs.is_empty());

        assert_eq!(
            compile_path(&m("{path: /a, path_regex: x}"), at, &mut errs),
            None
        );
        assert_eq!(compile_path(&m("path: a"), at, &mut errs), None);
        assert_eq!(compile_path(&m("path_prefix: api"), at, &mut errs), None);
        assert_eq!(compile_path(&m("path_regex: '(['"), at, &mut errs), None);
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "routes[1].match",
                "routes[1].match.path",
                "routes[1].match.path_prefix",
                "routes[1].match.path_regex"
            ]
        );
        assert!(
            errs[0].message.contains("path, path_regex"),
            "{}",
            errs[0].message
        );
        assert!(
            errs[3].message.starts_with("invalid regex: "),
            "{}",
            errs[3].message
        );
    }
}
