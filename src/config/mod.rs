//! Loading `tollgate.yaml`: read → index positions → expand secrets → parse each section and
//! each route/upstream on its own → check what one section can check alone.
//!
//! Loading is a pure function of the file (and the environment for `${env:..}`): it never touches
//! running state. Errors are collected, located (`file:line:col: path: message`) and returned
//! together. Cross-references between sections (a route naming an unknown upstream) and anything
//! that needs compiling (regexes) are checked by `snapshot::compile`, which reports through the
//! same [`SourceMap`].

pub mod auth;
pub mod error;
pub mod quota;
pub mod schema;
mod secrets;
pub mod source;
pub mod units;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

pub use auth::*;
pub use error::{ConfigError, FieldError};
pub use quota::*;
pub use schema::*;
pub use source::SourceMap;

/// Top-level sections, in the order the reference documents them.
const SECTIONS: &[&str] = &[
    "listeners",
    "admin",
    "server",
    "http",
    "access_log",
    "reload",
    "drain",
    "include",
    "auth",
    "client_ip",
    "flood",
    "ip_rules",
    "bots",
    "rules",
    "waf",
    "upstreams",
    "routes",
];

/// A parsed config and the position index of the file it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub source: SourceMap,
}

impl Loaded {
    /// Locates compile-stage errors in this file.
    pub fn locate(&self, errors: &[FieldError]) -> Vec<ConfigError> {
        errors.iter().map(|e| self.source.locate(e)).collect()
    }
}

/// Reads and parses the config file at `path`.
pub fn load(path: &Path) -> Result<Loaded, Vec<ConfigError>> {
    match load_lenient(path)? {
        (loaded, errors) if errors.is_empty() => Ok(loaded),
        (_, errors) => Err(errors),
    }
}

/// Parses config text; `file` is only used to name the file in errors.
pub fn load_str(file: &str, text: &str) -> Result<Loaded, Vec<ConfigError>> {
    match load_str_lenient(file, text)? {
        (loaded, errors) if errors.is_empty() => Ok(loaded),
        (_, errors) => Err(errors),
    }
}

/// Reads the config file at `path` like [`load`], but returns what could be parsed along with
/// the errors, so later stages (compiling) can still report theirs: a route that failed to
/// parse is replaced by a placeholder (other routes keep their index), an upstream that failed
/// is named in `Config::broken_upstreams`. Fails outright only when the file cannot be read or
/// is not YAML.
pub fn load_lenient(path: &Path) -> Result<(Loaded, Vec<ConfigError>), Vec<ConfigError>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: file.clone(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        }]
    })?;
    let (mut loaded, errors) = load_str_lenient(&file, &text)?;
    if let Some(dir) = path.parent() {
        resolve_paths(&mut loaded.config, dir);
    }
    Ok((loaded, errors))
}

/// Makes the file paths the config names (certificates, keys, CAs) relative to the config
/// file's directory, as `include` paths are, once, so compiling reads the right files whatever
/// the working directory.
fn resolve_paths(config: &mut Config, dir: &Path) {
    let fix = |p: &mut String| {
        if Path::new(p.as_str()).is_relative() {
            *p = dir.join(p.as_str()).to_string_lossy().into_owned();
        }
    };
    for tls in config.listeners.iter_mut().filter_map(|l| l.tls.as_mut()) {
        for c in &mut tls.certificates {
            fix(&mut c.cert);
            fix(&mut c.key);
            if let Some(ocsp) = &mut c.ocsp {
                fix(ocsp);
            }
        }
        if let Some(auth) = &mut tls.client_auth {
            fix(&mut auth.ca);
        }
    }
    for tls in config.upstreams.values_mut().filter_map(|u| u.tls.as_mut()) {
        for p in [&mut tls.ca, &mut tls.client_cert, &mut tls.client_key]
            .into_iter()
            .flatten()
        {
            fix(p);
        }
    }
}

fn load_str_lenient(
    file: &str,
    text: &str,
) -> Result<(Loaded, Vec<ConfigError>), Vec<ConfigError>> {
    let source = SourceMap::build(file, text).map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    let config = parse(text, &mut errors);
    let located = locate_all(&source, &errors);
    Ok((Loaded { config, source }, located))
}

fn locate_all(source: &SourceMap, errors: &[Located]) -> Vec<ConfigError> {
    errors
        .iter()
        .map(|e: &Located| match e {
            Located::Value(fe) => source.locate(fe),
            Located::Key(fe) => {
                let mut ce = source.locate(fe);
                if let Some(pos) = source.find_key(&fe.path) {
                    ce.line = pos.line;
                    ce.column = pos.column;
                }
                ce
            }
        })
        .collect()
}

/// An error and whether it should point at the key (unknown field) or at the value.
enum Located {
    Value(FieldError),
    Key(FieldError),
}

fn parse(text: &str, errors: &mut Vec<Located>) -> Config {
    let mut config = Config::default();
    let mut root: Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            // The event parser accepted the syntax, so this is about structure (e.g. duplicate keys).
            errors.push(Located::Value(FieldError::new("", e.to_string())));
            return config;
        }
    };
    if root.is_null() {
        errors.push(Located::Value(FieldError::new(
            "",
            "the file is empty; expected at least `listeners` and `routes`",
        )));
        return config;
    }
    let mut secret_errors = Vec::new();
    secrets::expand(&mut root, "", &mut secret_errors);
    errors.extend(secret_errors.into_iter().map(Located::Value));

    let Value::Mapping(map) = root else {
        errors.push(Located::Value(FieldError::new(
            "",
            "expected a mapping of sections (listeners, upstreams, routes, ...)",
        )));
        return config;
    };

    for (key, value) in map {
        let Some(name) = key.as_str() else {
            errors.push(Located::Value(FieldError::new(
                "",
                "section names must be strings",
            )));
            continue;
        };
        match name {
            "listeners" => section(name, value, &mut config.listeners, errors),
            "admin" => section(name, value, &mut config.admin, errors),
            "server" => section(name, value, &mut config.server, errors),
            "http" => section(name, value, &mut config.http, errors),
            "access_log" => section(name, value, &mut config.access_log, errors),
            "reload" => section(name, value, &mut config.reload, errors),
            "drain" => section(name, value, &mut config.drain, errors),
            "include" => section(name, value, &mut config.include, errors),
            "auth" => section(name, value, &mut config.auth, errors),
            "client_ip" => section(name, value, &mut config.client_ip, errors),
            "flood" => section(name, value, &mut config.flood, errors),
            "ip_rules" => section(name, value, &mut config.ip_rules, errors),
            "bots" => section(name, value, &mut config.bots, errors),
            "rules" => section(name, value, &mut config.rules, errors),
            "waf" => section(name, value, &mut config.waf, errors),
            "upstreams" => (config.upstreams, config.broken_upstreams) = upstreams(value, errors),
            "routes" => config.routes = routes(value, errors),
            other => errors.push(Located::Key(FieldError::new(
                other,
                format!(
                    "unknown section `{other}`; expected one of {}",
                    SECTIONS.join(", ")
                ),
            ))),
        }
    }
    check_process_settings(&config, errors);
    config
}

/// Deserializes one value, turning a serde error into a located error under `path`.
fn item<T: DeserializeOwned>(path: &str, value: Value) -> Result<T, Located> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let inner = e.path().to_string();
        let message = e.inner().to_string();
        // serde_yaml appends " at line N column M" relative to the sub-document; drop it.
        let message = match message.find(" at line ") {
            Some(i) => message[..i].to_string(),
            None => message,
        };
        let full = if inner == "." || inner.is_empty() {
            path.to_string()
        } else if inner.starts_with('[') {
            format!("{path}{inner}")
        } else {
            error::join(path, &inner)
        };
        if message.starts_with("unknown field") {
            Located::Key(FieldError::new(full, message))
        } else {
            Located::Value(FieldError::new(full, message))
        }
    })
}

fn section<T: DeserializeOwned>(path: &str, value: Value, out: &mut T, errors: &mut Vec<Located>) {
    match item(path, value) {
        Ok(v) => *out = v,
        Err(e) => errors.push(e),
    }
}

fn upstreams(
    value: Value,
    errors: &mut Vec<Located>,
) -> (BTreeMap<String, Upstream>, BTreeSet<String>) {
    let mut out = BTreeMap::new();
    let mut broken = BTreeSet::new();
    let Value::Mapping(map) = value else {
        if !value.is_null() {
            errors.push(Located::Value(FieldError::new(
                "upstreams",
                "expected a mapping of upstream names to upstreams",
            )));
        }
        return (out, broken);
    };
    for (key, v) in map {
        let Some(name) = key.as_str().map(str::to_string) else {
            errors.push(Located::Value(FieldError::new(
                "upstreams",
                "upstream names must be strings",
            )));
            continue;
        };
        match item::<Upstream>(&error::join("upstreams", &name), v) {
            Ok(u) => {
                out.insert(name, u);
            }
            Err(e) => {
                errors.push(e);
                broken.insert(name);
            }
        }
    }
    (out, broken)
}

fn routes(value: Value, errors: &mut Vec<Located>) -> Vec<Route> {
    let Value::Sequence(list) = value else {
        if !value.is_null() {
            errors.push(Located::Value(FieldError::new(
                "routes",
                "expected a list of routes",
            )));
        }
        return Vec::new();
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, v) in list.into_iter().enumerate() {
        match item::<Route>(&error::index("routes", i), v) {
            Ok(r) => out.push(r),
            Err(e) => {
                errors.push(e);
                out.push(placeholder_route(i));
            }
        }
    }
    out
}

/// Stands in for a route that failed to parse, so the others keep their index (and their
/// error paths) while compiling reports its own errors. Only ever part of a refused config.
fn placeholder_route(i: usize) -> Route {
    Route {
        name: format!("\u{0}unparsed-route-{i}"),
        matcher: RouteMatch::default(),
        upstream: None,
        split: Vec::new(),
        labels: BTreeMap::new(),
        sticky: None,
        redirect: None,
        respond: Some(Respond {
            status: 500,
            body: String::new(),
            headers: BTreeMap::new(),
        }),
        rewrite: None,
        request_headers: HeaderOps::default(),
        response_headers: HeaderOps::default(),
        websocket: WebSocket::default(),
        max_body: None,
        auth: None,
        quota: None,
        ip_rules: None,
        bots: None,
        rules: true,
        waf: None,
        block_page: BlockPage::Json,
    }
}

/// A parsed included file (consumers.yaml, quotas.yaml) and the position index of its file.
#[derive(Debug, Clone)]
pub struct Included<T> {
    pub file: T,
    pub source: SourceMap,
}

impl<T> Included<T> {
    /// Locates compile-stage errors in this file.
    pub fn locate(&self, errors: &[FieldError]) -> Vec<ConfigError> {
        errors.iter().map(|e| self.source.locate(e)).collect()
    }
}

pub type LoadedConsumers = Included<ConsumersFile>;
pub type LoadedQuotas = Included<QuotasFile>;

/// Reads and parses `consumers.yaml` like [`load_lenient`]: what could be parsed, and every
/// error located in this file. A consumer or issuer that fails to parse is left out (the config
/// is refused anyway) and named in `broken`, so references to it are not reported again.
pub fn load_consumers(
    path: &Path,
) -> Result<(LoadedConsumers, BTreeSet<String>, Vec<ConfigError>), Vec<ConfigError>> {
    let mut parsed = ConsumersFile::default();
    let mut broken = BTreeSet::new();
    let (source, errors) = load_included(path, "jwt_issuers, consumers", |key, value, errors| {
        match key {
            "jwt_issuers" => parsed.jwt_issuers = named_items(key, value, &mut broken, errors),
            "consumers" => parsed.consumers = named_items(key, value, &mut broken, errors),
            _ => return false,
        }
        true
    })?;
    Ok((
        Included {
            file: parsed,
            source,
        },
        broken,
        errors,
    ))
}

/// Reads and parses `quotas.yaml` like [`load_consumers`].
pub fn load_quotas(
    path: &Path,
) -> Result<(LoadedQuotas, BTreeSet<String>, Vec<ConfigError>), Vec<ConfigError>> {
    let mut parsed = QuotasFile {
        max_tenants: quota::DEFAULT_MAX_TENANTS,
        ..QuotasFile::default()
    };
    let mut broken = BTreeSet::new();
    let (source, errors) = load_included(
        path,
        "plans, default_plan, unknown_tenants, tenants, cluster, max_tenants",
        |key, value, errors| {
            match key {
                "plans" => parsed.plans = named_items(key, value, &mut broken, errors),
                "tenants" => parsed.tenants = named_items(key, value, &mut broken, errors),
                "default_plan" => section(key, value, &mut parsed.default_plan, errors),
                "unknown_tenants" => section(key, value, &mut parsed.unknown_tenants, errors),
                "cluster" => section(key, value, &mut parsed.cluster, errors),
                "max_tenants" => section(key, value, &mut parsed.max_tenants, errors),
                _ => return false,
            }
            true
        },
    )?;
    Ok((
        Included {
            file: parsed,
            source,
        },
        broken,
        errors,
    ))
}

/// Reads an included file: index positions, expand secrets, hand each top-level key to
/// `section` (which returns false for keys it does not know), locate every error.
fn load_included(
    path: &Path,
    expected: &str,
    mut section: impl FnMut(&str, Value, &mut Vec<Located>) -> bool,
) -> Result<(SourceMap, Vec<ConfigError>), Vec<ConfigError>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: file.clone(),
            line: 0,
            column: 0,
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        }]
    })?;
    let source = SourceMap::build(&file, &text).map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    let mut root: Value = match serde_yaml::from_str(&text) {
        Ok(v) => v,
        Err(e) => return Err(vec![source.locate(&FieldError::new("", e.to_string()))]),
    };
    let mut secret_errors = Vec::new();
    secrets::expand(&mut root, "", &mut secret_errors);
    errors.extend(secret_errors.into_iter().map(Located::Value));
    match root {
        Value::Null => {}
        Value::Mapping(map) => {
            for (key, value) in map {
                let name = key.as_str().unwrap_or("?").to_string();
                if !section(&name, value, &mut errors) {
                    errors.push(Located::Key(FieldError::new(
                        name.as_str(),
                        format!("unknown section `{name}`; expected one of {expected}"),
                    )));
                }
            }
        }
        _ => errors.push(Located::Value(FieldError::new(
            "",
            format!("expected a mapping with sections ({expected})"),
        ))),
    }
    let located = locate_all(&source, &errors);
    Ok((source, located))
}

/// A mapping of names to items, each parsed on its own so one bad item does not hide the
/// errors of the others. Failed names go to `broken` (as `section.name`).
fn named_items<T: DeserializeOwned>(
    section: &str,
    value: Value,
    broken: &mut BTreeSet<String>,
    errors: &mut Vec<Located>,
) -> BTreeMap<String, T> {
    let mut out = BTreeMap::new();
    let Value::Mapping(map) = value else {
        if !value.is_null() {
            errors.push(Located::Value(FieldError::new(
                section,
                format!("expected a mapping of names to {section} entries"),
            )));
        }
        return out;
    };
    for (key, v) in map {
        let Some(name) = key.as_str().map(str::to_string) else {
            errors.push(Located::Value(FieldError::new(
                section,
                "names must be strings",
            )));
            continue;
        };
        match item::<T>(&error::join(section, &name), v) {
            Ok(x) => {
                out.insert(name, x);
            }
            Err(e) => {
                errors.push(e);
                broken.insert(error::join(section, &name));
            }
        }
    }
    out
}

/// Options of one listener that only make sense together (files are read when compiling).
fn check_listener_options(path: &str, l: &Listener, err: &mut impl FnMut(String, String)) {
    match &l.tls {
        Some(tls) => {
            if tls.certificates.is_empty() {
                err(
                    error::join(path, "tls.certificates"),
                    "at least one `{ cert: FILE, key: FILE }` is needed".into(),
                );
            }
            if tls.certificates.iter().filter(|c| c.default).count() > 1 {
                err(
                    error::join(path, "tls.certificates"),
                    "only one certificate can be `default: true`".into(),
                );
            }
            if l.h2c {
                err(
                    error::join(path, "h2c"),
                    "h2c is cleartext HTTP/2; a TLS listener negotiates h2 by ALPN (`tls.http2`)"
                        .into(),
                );
            }
            if l.redirect_https.is_some() {
                err(
                    error::join(path, "redirect_https"),
                    "this listener already speaks TLS; set `redirect_https` on the plaintext one"
                        .into(),
                );
            }
        }
        None => {
            if l.hsts.is_some() {
                err(
                    error::join(path, "hsts"),
                    "HSTS is only honoured over https: set it on a TLS listener".into(),
                );
            }
        }
    }
    if let Some(r) = &l.redirect_https {
        if ![301, 302, 307, 308].contains(&r.status) {
            err(
                error::join(path, "redirect_https.status"),
                format!(
                    "{} is not a redirect status; use 301, 302, 307 or 308",
                    r.status
                ),
            );
        }
        if r.port == 0 {
            err(
                error::join(path, "redirect_https.port"),
                "must be a port number (1-65535)".into(),
            );
        }
    }
}

/// Checks of the settings Pingora takes at start (listeners, admin, server).
fn check_process_settings(config: &Config, errors: &mut Vec<Located>) {
    let mut err =
        |path: String, msg: String| errors.push(Located::Value(FieldError::new(path, msg)));
    if config.listeners.is_empty() {
        err(
            "listeners".into(),
            "at least one listener is needed, e.g. `- { name: web, address: \"0.0.0.0:8080\" }`"
                .into(),
        );
    }
    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let path = error::index("listeners", i);
        if !names.insert(l.name.as_str()) {
            err(
                error::join(&path, "name"),
                format!("duplicate listener name `{}`", l.name),
            );
        }
        match l.address.parse::<SocketAddr>() {
            Ok(a) => {
                if !addresses.insert(a) {
                    err(
                        error::join(&path, "address"),
                        format!("address {a} is used twice"),
                    );
                }
            }
            Err(_) => err(
                error::join(&path, "address"),
                format!(
                    "`{}` is not an IP:port address, e.g. 0.0.0.0:8080 or [::]:8080",
                    l.address
                ),
            ),
        }
    }
    for (i, l) in config.listeners.iter().enumerate() {
        check_listener_options(&error::index("listeners", i), l, &mut err);
    }
    match config.admin.address.parse::<SocketAddr>() {
        Ok(a) if addresses.contains(&a) => err(
            "admin.address".into(),
            format!("{a} is also a listener; the admin listener needs its own address"),
        ),
        Ok(_) => {}
        Err(_) => err(
            "admin.address".into(),
            format!(
                "`{}` is not an IP:port address, e.g. 127.0.0.1:9090",
                config.admin.address
            ),
        ),
    }
    if config.server.threads == 0 {
        err("server.threads".into(), "must be at least 1".into());
    }
    if config.http.max_headers == 0 || config.http.max_headers > crate::edge::MAX_HEADERS_CAP {
        err(
            "http.max_headers".into(),
            format!("must be between 1 and {}", crate::edge::MAX_HEADERS_CAP),
        );
    }
    if config.http.max_header_bytes.get() < 1024 {
        err("http.max_header_bytes".into(), "must be at least 1k".into());
    }
    if config.reload.watch_interval.get().is_zero() {
        err("reload.watch_interval".into(), "must be more than 0".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(text: &str) -> Vec<String> {
        load_str("t.yaml", text)
            .err()
            .unwrap_or_default()
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn a_good_file_loads() {
        let l = load_str(
            "t.yaml",
            "listeners: [{ name: web, address: \"127.0.0.1:8080\" }]\n\
             upstreams:\n  app: { backends: [{ address: \"127.0.0.1:9000\" }], timeouts: { connect: 250ms } }\n\
             routes:\n  - { name: r, match: { path_prefix: /api }, upstream: app }\n",
        )
        .unwrap();
        assert_eq!(l.config.routes[0].name, "r");
        assert_eq!(
            l.config.upstreams["app"].timeouts.connect.get(),
            std::time::Duration::from_millis(250)
        );
    }

    #[test]
    fn all_errors_are_reported_with_line_and_path() {
        let errs = errors_of(
            "listeners: [{ name: web, address: \"127.0.0.1:8080\" }]\n\
             upstreams:\n  app:\n    backends: [{ address: \"127.0.0.1:9000\" }]\n    timeouts: { connect: soon }\n\
             routes:\n  - name: a\n    match: { path_prefx: /x }\n  - name: b\n    bogus: 1\n\
             colour: blue\n",
        );
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert!(errs.iter().any(|e| e.starts_with("t.yaml:5:") && e.contains("upstreams.app.timeouts.connect")), "{errs:#?}");
        assert!(
            errs.iter().any(|e| e.starts_with("t.yaml:8:")
                && e.contains("routes[0].match")
                && e.contains("path_prefx")),
            "{errs:#?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("t.yaml:10:")
                && e.contains("routes[1]")
                && e.contains("bogus")),
            "{errs:#?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("t.yaml:11:1") && e.contains("unknown section `colour`")),
            "{errs:#?}"
        );
    }

    #[test]
    fn bound_settings_report_what_needs_an_upgrade() {
        let a = load_str(
            "t.yaml",
            "listeners: [{ name: web, address: \"127.0.0.1:8080\" }]\n",
        )
        .unwrap();
        let b = load_str(
            "t.yaml",
            "listeners: [{ name: web, address: \"127.0.0.1:8081\" }]\nserver: { threads: 7 }\nhttp: { via: true }\n",
        )
        .unwrap();
        let (a, b) = (Bound::of(&a.config), Bound::of(&b.config));
        let changes = a.changes(&b);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert!(changes[0].starts_with("`listeners` changed"));
        assert!(changes[1].starts_with("`server` changed"));
        assert!(a.changes(&a).is_empty());
        // What /status publishes reads back the same.
        let json = serde_json::to_value(&b).unwrap();
        assert_eq!(serde_json::from_value::<Bound>(json).unwrap(), b);
    }

    #[test]
    fn listener_addresses_are_checked() {
        let errs = errors_of("listeners: [{ name: web, address: \"localhost\" }, { name: web, address: \"1.2.3.4:1\" }]\n");
        assert!(
            errs.iter()
                .any(|e| e.contains("listeners[0].address") && e.contains("not an IP:port")),
            "{errs:#?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("listeners[1].name") && e.contains("duplicate")),
            "{errs:#?}"
        );
    }

    #[test]
    fn wrong_types_name_the_field() {
        let errs = errors_of(
            "listeners: [{ name: web, address: \"127.0.0.1:8080\" }]\n\
             upstreams:\n  app: { backends: [{ address: \"127.0.0.1:9000\", weight: heavy }] }\n",
        );
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(
            errs[0].starts_with("t.yaml:3:")
                && errs[0].contains("upstreams.app.backends[0].weight"),
            "{errs:#?}"
        );
    }
}
