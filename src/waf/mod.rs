//! The WAF: a native interpreter of the SecLang subset the OWASP Core Rule Set uses, run on
//! Debian's `modsecurity-crs` by default, with anomaly scoring, paranoia levels, detection-only
//! mode and per-route exclusions. Checked after bots and flood protection, before
//! authentication; it sees the body (urlencoded, JSON, multipart) up to `waf.body_limit`.
//!
//! - `seclang`: files → directives; `compile`: directives → [`Ruleset`] (operators, regexes,
//!   transformation chains, TX slots, `skipAfter` jumps), reporting what it cannot run;
//! - `request`: the request as collections; `eval`: one request through phases 1 and 2;
//! - `prefilter`: regex sets per kind of value that rule out, per request, the rules whose
//!   pattern no value matches (most of them, on benign traffic).
//!
//! The ruleset depends only on the rule files, so a reload that does not touch them reuses
//! the compiled one (compiling CRS takes a noticeable fraction of a second). Each route gets a
//! [`RouteWaf`]: its TX presets (paranoia, threshold), excluded rules and targets, and mode.

pub mod compile;
pub mod eval;
pub mod macros;
pub mod memo;
pub mod operator;
pub mod prefilter;
pub mod request;
pub mod seclang;
pub mod transform;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Deserialize;

pub use compile::{Ruleset, Unsupported};
pub use eval::{Finding, Outcome, RouteWaf};
pub use request::Head;

use crate::config::units::ByteSize;
use crate::config::{error, FieldError};

/// Pingora replays at most this much of a body it has read to the upstream.
pub const MAX_BODY_LIMIT: u64 = 64 << 10;

/// `waf:`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WafSettings {
    #[serde(default)]
    pub mode: WafMode,
    /// CRS paranoia level, 1 (fewest false positives) to 4.
    #[serde(default = "default_paranoia")]
    pub paranoia: u8,
    /// The anomaly score at which CRS refuses a request.
    #[serde(default = "default_threshold")]
    pub inbound_threshold: u32,
    /// SecLang files or globs, in order, relative to the config file.
    #[serde(default = "default_rules")]
    pub rules: Vec<String>,
    /// Request bodies are read and inspected up to this size (at most 64k).
    #[serde(default = "default_body_limit")]
    pub body_limit: ByteSize,
    /// A larger body: `reject` (413) or `skip` (inspect the head only, stream the body).
    #[serde(default)]
    pub body_limit_action: BodyLimitAction,
    #[serde(default)]
    pub exclusions: Vec<Exclusion>,
}

impl Default for WafSettings {
    fn default() -> Self {
        Self {
            mode: WafMode::Off,
            paranoia: default_paranoia(),
            inbound_threshold: default_threshold(),
            rules: default_rules(),
            body_limit: default_body_limit(),
            body_limit_action: BodyLimitAction::default(),
            exclusions: Vec::new(),
        }
    }
}

fn default_paranoia() -> u8 {
    1
}
fn default_threshold() -> u32 {
    5
}
fn default_body_limit() -> ByteSize {
    ByteSize(MAX_BODY_LIMIT)
}
/// Debian's `modsecurity-crs` package.
pub fn default_rules() -> Vec<String> {
    vec![
        "/etc/modsecurity/crs/crs-setup.conf".into(),
        "/usr/share/modsecurity-crs/rules/REQUEST-*.conf".into(),
    ]
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WafMode {
    /// Refuse with `403 waf_blocked`.
    Block,
    /// Pass; log and count what would have been refused.
    Detect,
    #[default]
    Off,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BodyLimitAction {
    #[default]
    Reject,
    Skip,
}

/// `routes[].waf`: any field overrides the global one; exclusions add to the global ones.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteWafSettings {
    pub mode: Option<WafMode>,
    pub paranoia: Option<u8>,
    pub inbound_threshold: Option<u32>,
    #[serde(default)]
    pub exclusions: Vec<Exclusion>,
}

/// A false-positive fix: a rule (by id or id range, or by tag) never runs, or ignores one
/// target (`ARGS:comment`, `REQUEST_COOKIES:/^_ga/`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Exclusion {
    pub id: Option<IdSpec>,
    pub tag: Option<String>,
    pub target: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum IdSpec {
    One(u32),
    Range(String),
}

/// The compiled WAF of a snapshot: the shared ruleset and each route's view (by config index).
#[derive(Debug)]
pub struct Waf {
    pub ruleset: Arc<Ruleset>,
    routes: Vec<Option<RouteWaf>>,
    body_limit: u64,
    body_limit_action: BodyLimitAction,
}

impl Waf {
    /// The route's WAF (`None`: off there).
    pub fn route(&self, config_index: usize) -> Option<&RouteWaf> {
        self.routes.get(config_index).and_then(Option::as_ref)
    }

    /// Bodies are read and inspected up to this many bytes (`waf.body_limit`).
    pub fn body_limit(&self) -> u64 {
        self.body_limit
    }

    pub fn skips_large_bodies(&self) -> bool {
        self.body_limit_action == BodyLimitAction::Skip
    }

    pub fn inspect(&self, route: &RouteWaf, head: &Head<'_>, body: Option<&[u8]>) -> Outcome {
        eval::inspect(&self.ruleset, route, head, body)
    }
}

/// Errors of the WAF settings: in the YAML (by field path) or in a rule file (by file:line).
#[derive(Debug, Default)]
pub struct WafErrors {
    pub fields: Vec<FieldError>,
    pub rules: Vec<seclang::SyntaxError>,
}

/// The last compiled ruleset, reused while its settings and files are unchanged.
/// Files of a ruleset with their modification time and length.
type Stamps = Vec<(PathBuf, Option<SystemTime>, u64)>;

/// The rules setting, the files' stamps, and what they compiled to.
type Compiled = (Vec<String>, Stamps, Arc<Ruleset>);

static LAST: Mutex<Option<Compiled>> = Mutex::new(None);

fn stamps(files: &[PathBuf]) -> Stamps {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok();
            (
                f.clone(),
                m.as_ref().and_then(|m| m.modified().ok()),
                m.map_or(0, |m| m.len()),
            )
        })
        .collect()
}

/// Loads the rule files (or reuses the last compile) when any route runs the WAF.
fn ruleset(rules: &[String], base: &Path) -> Result<Arc<Ruleset>, Vec<seclang::SyntaxError>> {
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((r, st, rs)) = last.as_ref() {
        if r == rules && *st == stamps(&rs.files) {
            return Ok(rs.clone());
        }
    }
    let rs = Arc::new(compile::load(rules, base)?);
    for u in &rs.unsupported {
        tracing::warn!(target: "waf", "waf: {u}");
    }
    for n in &rs.notes {
        tracing::info!(target: "waf", "waf: {n}");
    }
    tracing::info!(
        target: "waf",
        rules = rs.rules.len(),
        not_run = rs.unsupported.len(),
        files = rs.files.len(),
        "waf ruleset compiled"
    );
    *last = Some((rules.to_vec(), stamps(&rs.files), rs.clone()));
    Ok(rs)
}

/// Compiles `waf:` and every route's `waf:` (routes in config order). `Ok(None)`: no route
/// runs the WAF, nothing is loaded.
pub fn compile(
    global: &WafSettings,
    routes: &[Option<RouteWafSettings>],
    base: &Path,
) -> Result<Option<Waf>, WafErrors> {
    let mut errors = WafErrors::default();
    if global.body_limit.get() > MAX_BODY_LIMIT {
        errors.fields.push(FieldError::new(
            "waf.body_limit",
            "at most 64k: larger bodies cannot be replayed to the upstream after inspection",
        ));
    }
    let mode_of =
        |r: &Option<RouteWafSettings>| r.as_ref().and_then(|r| r.mode).unwrap_or(global.mode);
    let check_paranoia = |path: String, p: u8, errors: &mut WafErrors| {
        if !(1..=4).contains(&p) {
            errors
                .fields
                .push(FieldError::new(path, "paranoia is 1 to 4"));
        }
    };
    check_paranoia("waf.paranoia".into(), global.paranoia, &mut errors);
    for (i, r) in routes.iter().enumerate() {
        if let Some(p) = r.as_ref().and_then(|r| r.paranoia) {
            check_paranoia(
                error::join(&error::index("routes", i), "waf.paranoia"),
                p,
                &mut errors,
            );
        }
    }
    if routes.iter().all(|r| mode_of(r) == WafMode::Off) {
        return if errors.fields.is_empty() {
            Ok(None)
        } else {
            Err(errors)
        };
    }
    let rs = match ruleset(&global.rules, base) {
        Ok(rs) => rs,
        Err(e) => {
            errors.rules = e;
            return Err(errors);
        }
    };
    let global_excl = exclusions(&rs, &global.exclusions, "waf.exclusions", &mut errors);
    let mut out = Vec::with_capacity(routes.len());
    for (i, r) in routes.iter().enumerate() {
        if mode_of(r) == WafMode::Off {
            out.push(None);
            continue;
        }
        let own = r.as_ref().map(|r| r.exclusions.as_slice()).unwrap_or(&[]);
        let path = error::join(&error::index("routes", i), "waf.exclusions");
        let (mut removed, mut targets) = global_excl.clone();
        let (r2, t2) = exclusions(&rs, own, &path, &mut errors);
        for (a, b) in removed.iter_mut().zip(r2) {
            *a |= b;
        }
        for (a, b) in targets.iter_mut().zip(t2) {
            a.extend(b);
        }
        let paranoia = r
            .as_ref()
            .and_then(|r| r.paranoia)
            .unwrap_or(global.paranoia);
        let threshold = r
            .as_ref()
            .and_then(|r| r.inbound_threshold)
            .unwrap_or(global.inbound_threshold);
        let mut presets = Vec::new();
        for (name, v) in [
            ("paranoia_level", paranoia.to_string()),
            ("executing_paranoia_level", paranoia.to_string()),
            ("inbound_anomaly_score_threshold", threshold.to_string()),
        ] {
            if let Some(s) = rs.slot(name.as_bytes()) {
                presets.push((s as u16, v.into_bytes()));
            }
        }
        let mut route = RouteWaf {
            detect_only: mode_of(r) == WafMode::Detect,
            start: eval::Start::default(),
            removed,
            target_excludes: targets,
        };
        route.start = eval::start(&rs, &route, &presets);
        out.push(Some(route));
    }
    if !errors.fields.is_empty() {
        return Err(errors);
    }
    Ok(Some(Waf {
        ruleset: rs,
        routes: out,
        body_limit: global.body_limit.get(),
        body_limit_action: global.body_limit_action,
    }))
}

type ExclusionSets = (Vec<bool>, Vec<Vec<compile::Target>>);

/// Exclusions → (removed rules, ignored targets), both by rule index.
fn exclusions(
    rs: &Ruleset,
    list: &[Exclusion],
    path: &str,
    errors: &mut WafErrors,
) -> ExclusionSets {
    let mut removed = vec![false; rs.rules.len()];
    let mut targets: Vec<Vec<compile::Target>> = vec![Vec::new(); rs.rules.len()];
    for (i, e) in list.iter().enumerate() {
        let at = error::index(path, i);
        let ids = match &e.id {
            None => None,
            Some(IdSpec::One(n)) => Some((*n, *n)),
            Some(IdSpec::Range(s)) => match compile::id_range(s) {
                Ok(r) => Some(r),
                Err(m) => {
                    errors
                        .fields
                        .push(FieldError::new(error::join(&at, "id"), m));
                    continue;
                }
            },
        };
        if ids.is_none() && e.tag.is_none() {
            errors
                .fields
                .push(FieldError::new(at, "an exclusion needs `id` or `tag`"));
            continue;
        }
        let target = match &e.target {
            None => None,
            Some(t) => match target(t) {
                Ok(t) => Some(t),
                Err(m) => {
                    errors
                        .fields
                        .push(FieldError::new(error::join(&at, "target"), m));
                    continue;
                }
            },
        };
        let mut any = false;
        for (ri, rule) in rs.rules.iter().enumerate() {
            let by_id = ids.is_some_and(|(a, b)| (a..=b).contains(&rule.id));
            let by_tag = e.tag.as_ref().is_some_and(|t| rule.tags.contains(t));
            if !(by_id || by_tag) {
                continue;
            }
            any = true;
            match &target {
                None => removed[ri] = true,
                Some(t) => targets[ri].push(t.clone()),
            }
        }
        if !any {
            errors.fields.push(FieldError::new(
                at,
                "matches no loaded rule (check the id, range or tag)",
            ));
        }
    }
    (removed, targets)
}

/// `ARGS:comment`, `REQUEST_COOKIES:/^_ga/`, `REQUEST_HEADERS:User-Agent`.
fn target(s: &str) -> Result<compile::Target, String> {
    let mut v = seclang::split_variables(s)?;
    if v.len() != 1 || v[0].exclude || v[0].count {
        return Err(format!("`{s}`: expected one target like ARGS:name"));
    }
    let raw = v.remove(0);
    let var = request::Var::parse(&raw.collection)
        .ok_or_else(|| format!("`{}` is not a variable the WAF knows", raw.collection))?;
    Ok(compile::Target {
        var,
        sel: compile::selector(&raw.selector)?,
        count: false,
    })
}

#[cfg(test)]
mod tests;
