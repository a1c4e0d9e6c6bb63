//! Auth configuration errors: each names its file (tollgate.yaml or consumers.yaml), line and
//! field, all of them in one run, and never a secret. Runs the same `build` that start, reload
//! and `tollgate check` run.

use std::fs;
use std::path::Path;

use tollgate::config::ConfigError;
use tollgate::gateway::{build, Registries};
use tollgate::observe::Metrics;

const HEAD: &str = "listeners: [ { name: web, address: \"127.0.0.1:18080\" } ]\n\
                    admin: { address: \"127.0.0.1:19090\" }\n\
                    upstreams: { app: { backends: [ { address: \"127.0.0.1:9\" } ] } }\n";

fn check(dir: &Path, main: &str, consumers: Option<&str>) -> Result<(), Vec<ConfigError>> {
    let path = dir.join("tollgate.yaml");
    fs::write(&path, main).unwrap();
    if let Some(c) = consumers {
        fs::write(dir.join("consumers.yaml"), c).unwrap();
    }
    build(&path, &Registries::default(), &Metrics::new(), 1).map(|_| ())
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("`{needle}` not in the text"))
        + 1
}

fn find<'a>(errors: &'a [ConfigError], path: &str) -> &'a ConfigError {
    errors
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("no error at {path}; errors: {errors:#?}"))
}

#[test]
fn shorthand_and_full_forms_load() {
    let dir = tempfile::tempdir().unwrap();
    let main = format!(
        "{HEAD}include: {{ consumers: consumers.yaml }}\n\
         routes:\n\
         \x20 - {{ name: a, match: {{ path: /a }}, upstream: app, auth: [key, hmac] }}\n\
         \x20 - name: b\n\
         \x20   upstream: app\n\
         \x20   auth:\n\
         \x20     methods: [key]\n\
         \x20     anonymous: true\n\
         \x20     allow: {{ consumers: [c1], tenants: [t1] }}\n\
         \x20     key: {{ from: [ {{ query: apikey }}, {{ cookie: k }}, {{ header: X-Key }} ] }}\n\
         \x20     hmac: {{ clock_skew: 5m, algorithms: [HmacSHA256] }}\n"
    );
    let consumers =
        "consumers:\n  c1: { tenant: t1, api_keys: [ { key: \"k-0123456789abcdef\" } ] }\n";
    check(dir.path(), &main, Some(consumers)).unwrap();
}

#[test]
fn route_errors_name_the_main_file_and_consumer_errors_their_own() {
    let dir = tempfile::tempdir().unwrap();
    let main = format!(
        "{HEAD}include: {{ consumers: consumers.yaml }}\n\
         auth: {{ consumer_header: \"bad header\" }}\n\
         routes:\n\
         \x20 - name: empty\n\
         \x20   upstream: app\n\
         \x20   auth: {{ methods: [] }}\n\
         \x20 - name: refs\n\
         \x20   upstream: app\n\
         \x20   auth:\n\
         \x20     methods: [jwt]\n\
         \x20     allow: {{ consumers: [nobody] }}\n\
         \x20     jwt: {{ issuers: [nowhere] }}\n\
         \x20 - name: sources\n\
         \x20   upstream: app\n\
         \x20   auth: {{ methods: [key], key: {{ from: [ {{ header: x-a, query: b }} ] }} }}\n\
         \x20 - name: skew\n\
         \x20   upstream: app\n\
         \x20   auth: {{ methods: [hmac], hmac: {{ clock_skew: 1h }} }}\n"
    );
    let consumers = "jwt_issuers:\n\
                     \x20 corp: { keys: [ { algorithm: HS256, secret: \"s3cret-s3cret-s3cret-s3cret-s3cret!!\" } ] }\n\
                     consumers:\n\
                     \x20 a: { api_keys: [ { key: \"same-key-0123456789\" } ] }\n\
                     \x20 b:\n\
                     \x20   api_keys: [ { key: \"same-key-0123456789\" } ]\n\
                     \x20   jwt: [ { issuer: missing } ]\n\
                     \x20   tenant: \"has space\"\n";
    let errors = check(dir.path(), &main, Some(consumers)).unwrap_err();
    let main_file = dir.path().join("tollgate.yaml").display().to_string();
    let consumers_file = dir.path().join("consumers.yaml").display().to_string();

    for (path, needle) in [
        ("auth.consumer_header", "consumer_header"),
        ("routes[0].auth.methods", "methods: []"),
        ("routes[1].auth.jwt.issuers[0]", "nowhere"),
        ("routes[3].auth.hmac.clock_skew", "clock_skew: 1h"),
    ] {
        let e = find(&errors, path);
        assert_eq!(e.file, main_file, "{e}");
        assert_eq!(e.line, line_of(&main, needle), "{e}");
    }
    assert!(
        errors.iter().all(|e| !e.path.contains("allow")),
        "naming a consumer that is gone must not refuse the config (that would keep it working)"
    );
    let e = find(&errors, "routes[2].auth");
    assert!(e.message.contains("exactly one of"), "{e}");

    let e = find(&errors, "consumers.b.api_keys[0].key");
    assert_eq!(e.file, consumers_file);
    assert!(e.message.contains("consumer `a`"), "{e}");
    let e = find(&errors, "consumers.b.jwt[0].issuer");
    assert_eq!(e.line, line_of(consumers, "missing"), "{e}");
    assert!(e.message.contains("corp"), "{e}");
    find(&errors, "consumers.b.tenant");

    let all = format!("{errors:?}");
    assert!(
        !all.contains("same-key-0123456789") && !all.contains("s3cret"),
        "{all}"
    );
    // Main-file errors come first, then the consumers file's, each in line order.
    let first_consumer = errors
        .iter()
        .position(|e| e.file == consumers_file)
        .unwrap();
    assert!(errors[..first_consumer].iter().all(|e| e.file == main_file));
}

#[test]
fn auth_needs_a_consumers_file_that_exists() {
    let dir = tempfile::tempdir().unwrap();
    let main = format!("{HEAD}routes:\n  - {{ name: r, upstream: app, auth: [key] }}\n");
    let errors = check(dir.path(), &main, None).unwrap_err();
    assert!(find(&errors, "routes[0].auth").message.contains("include"));

    let main = format!(
        "{HEAD}include: {{ consumers: absent.yaml }}\nroutes:\n  - {{ name: r, upstream: app, auth: [key] }}\n"
    );
    let errors = check(dir.path(), &main, None).unwrap_err();
    let e = find(&errors, "include.consumers");
    assert_eq!(e.line, line_of(&main, "absent.yaml"), "{e}");
    assert!(e.message.contains("absent.yaml"), "{e}");
}

#[test]
fn the_shipped_configs_and_the_consumers_example_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let load = |path: &Path| {
        build(path, &Registries::default(), &Metrics::new(), 1)
            .map(|_| ())
            .unwrap_or_else(|e| panic!("{}: {e:#?}", path.display()))
    };
    load(&root.join("conf/tollgate.yaml"));
    load(&root.join("packaging/tollgate.yaml"));
    // The commented examples, switched on.
    let dir = tempfile::tempdir().unwrap();
    for example in ["consumers.example.yaml", "quotas.example.yaml"] {
        fs::copy(root.join("conf").join(example), dir.path().join(example)).unwrap();
    }
    let text = fs::read_to_string(root.join("conf/tollgate.yaml"))
        .unwrap()
        .replace("# include:", "include:")
        .replace(
            "  - name: hello\n",
            "  - { name: guarded, match: { path: /guarded }, respond: { body: ok }, auth: [key, hmac], quota: tenant }\n  - name: hello\n",
        );
    assert!(text.contains("\ninclude:") && text.contains("guarded"));
    fs::write(dir.path().join("tollgate.yaml"), text).unwrap();
    load(&dir.path().join("tollgate.yaml"));
}

#[test]
fn quota_errors_name_quotas_yaml_or_the_route() {
    let dir = tempfile::tempdir().unwrap();
    let main = format!(
        "{HEAD}include: {{ quotas: quotas.yaml }}\n\
         routes:\n\
         \x20 - {{ name: ok, match: {{ path: /a }}, upstream: app, quota: {{ tenant: {{ header: x-org }}, group: api }} }}\n\
         \x20 - {{ name: needs-auth, match: {{ path: /b }}, upstream: app, quota: tenant }}\n\
         \x20 - {{ name: bad-host, match: {{ path: /c }}, upstream: app, quota: {{ tenant: {{ host: \"x.example.com\" }} }} }}\n"
    );
    let quotas = "plans:\n\
                  \x20 free: { requests_per_second: 0 }\n\
                  \x20 pro: { requests_per_minute: 10, colour: red }\n\
                  default_plan: gold\n\
                  tenants:\n\
                  \x20 acme: { plan: platinum }\n\
                  \x20 \"bad tenant\": { requests_per_second: 5 }\n";
    fs::write(dir.path().join("quotas.yaml"), quotas).unwrap();
    let errors = check(dir.path(), &main, None).unwrap_err();
    let quotas_file = dir.path().join("quotas.yaml").display().to_string();
    for (path, needle) in [
        ("plans.free.requests_per_second", "free:"),
        ("plans.pro", "colour"),
        ("default_plan", "gold"),
        ("tenants.acme.plan", "platinum"),
    ] {
        let e = find(&errors, path);
        assert_eq!(e.file, quotas_file, "{e}");
        assert_eq!(e.line, line_of(quotas, needle), "{e}");
    }
    find(&errors, "tenants.bad tenant");
    let e = find(&errors, "routes[1].quota.tenant");
    assert!(e.message.contains("auth"), "{e}");
    assert_eq!(e.line, line_of(&main, "needs-auth"));
    let e = find(&errors, "routes[2].quota");
    assert!(e.message.contains("{tenant}"), "{e}");
}
