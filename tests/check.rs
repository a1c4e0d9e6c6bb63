//! `tollgate check -c FILE`: exit 0 on a valid file; otherwise exit 1 with every error on stderr,
//! one per line, as `FILE:LINE:COL: field.path: message`.

mod common;

use std::process::Command;

use common::{line_of, BIN};

struct CheckRun {
    code: Option<i32>,
    stderr: String,
    stdout: String,
}

fn check(text: &str) -> (tempfile::TempDir, String, CheckRun) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.yaml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("run tollgate check");
    let run = CheckRun {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    };
    (dir, path.to_str().unwrap().to_string(), run)
}

/// One parsed `FILE:LINE:COL: path: message` line.
#[derive(Debug)]
struct Located {
    line: usize,
    col: usize,
    rest: String,
}

/// Every stderr line of the form `FILE:LINE:COL: ...` for this file.
fn located_errors(stderr: &str, file: &str) -> Vec<Located> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(file)?.strip_prefix(':')?;
            let mut it = rest.splitn(3, ':');
            let line = it.next()?.parse().ok()?;
            let col = it.next()?.parse().ok()?;
            let rest = it.next()?.strip_prefix(' ')?.to_string();
            Some(Located { line, col, rest })
        })
        .collect()
}

const GOOD: &str = r#"listeners: [ { name: web, address: "127.0.0.1:18080" } ]
admin: { address: "127.0.0.1:19090" }
server: { threads: 2, pid_file: /tmp/tollgate-check.pid, upgrade_sock: /tmp/tollgate-check.sock }
reload: { watch: true, watch_interval: 100ms }
http: { max_body: 1m, max_header_bytes: 16k, forwarded: false }
access_log: { path: stdout }
upstreams:
  app:
    backends: [ { address: "127.0.0.1:18081", labels: { stage: stable } }, { address: "127.0.0.1:18082", weight: 2, labels: { stage: canary } } ]
    health_check: { http: { path: /healthz }, interval: 200ms, healthy: 2, unhealthy: 2 }
    passive: { consecutive_failures: 3, ejection_time: 10s }
    timeouts: { connect: 1s, read: 30s }
routes:
  - name: api
    match: { hosts: [api.test, "*.api.test"], path_prefix: /api, methods: [GET, POST], headers: { x-env: { prefix: prod } } }
    upstream: app
    split: [ { when: { headers: { x-stage: canary } }, labels: { stage: canary } }, { weight: 10, labels: { stage: canary } } ]
    labels: { stage: stable }
    sticky: { cookie: uid }
    rewrite: { strip_prefix: /api, regex: { pattern: '^/v1/(.*)$', replacement: '/v2/$1' } }
    request_headers: { set: { x-gw: tollgate }, remove: [x-internal] }
    response_headers: { add: { x-served-by: tollgate } }
    websocket: { idle_timeout: 1h }
    max_body: 64k
  - name: old
    match: { path_prefix: /old }
    redirect: { status: 301, location: "https://new.test{path}{query}" }
  - name: hello
    respond: { status: 200, body: "hello\n" }
"#;

#[test]
fn valid_file_passes() {
    let (_d, file, run) = check(GOOD);
    assert_eq!(
        run.code,
        Some(0),
        "check of a valid file should exit 0\nstdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        located_errors(&run.stderr, &file).is_empty(),
        "valid file reported errors:\n{}",
        run.stderr
    );
}

const BAD: &str = r#"listeners: [ { name: web, address: "127.0.0.1:18080" } ]
admin: { address: "127.0.0.1:19090" }
upstreams:
  good:
    backends:
      - { address: "127.0.0.1:18081", labels: { stage: stable } }
      - { address: "127.0.0.1:18082", labels: { stage: canary } }
  bad_duration:
    backends: [ { address: "127.0.0.1:18083" } ]
    health_check:
      http: { path: /healthz }
      interval: 5 parsecs
  bad_type:
    backends:
      - address: "127.0.0.1:18084"
        weight: heavy
routes:
  - name: typo
    match:
      hots: [a.test]
    upstream: good
  - name: ghost
    upstream: nowhere
  - name: dup
    respond: { body: one }
  - name: dup   # second
    respond: { body: two }
  - name: badregex
    match:
      path_regex: "^/(unclosed"
    upstream: good
  - name: overweight
    upstream: good
    split:
      - { weight: 60, labels: { stage: canary } }
      - { weight: 50, labels: { stage: canary } }
    labels: { stage: stable }
"#;

type Expect = (&'static str, Vec<usize>, Vec<String>, &'static str);

/// Runs check on `text` and asserts exit 1 and exactly the `expected` located errors:
/// (what, accepted lines, accepted path prefixes, word the lower-cased message must contain).
fn assert_reports(text: &str, expected: &[Expect]) {
    let (_d, file, run) = check(text);
    assert_eq!(run.code, Some(1), "exit code; stderr:\n{}", run.stderr);
    let errs = located_errors(&run.stderr, &file);
    let mut missing = Vec::new();
    for (what, lines, paths, word) in expected {
        let hit = errs.iter().find(|e| {
            lines.contains(&e.line)
                && paths.iter().any(|p| e.rest.starts_with(p))
                && e.rest.to_lowercase().contains(word)
        });
        match hit {
            Some(h) => assert!(h.col >= 1, "{what}: column must be 1-based"),
            None => missing.push(format!(
                "{what}: `{file}:{lines:?}:COL: {paths:?}...` mentioning {word:?}"
            )),
        }
    }
    // One error per line: every other stderr line may only be the closing count.
    let stray: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with(&format!("{file}:")))
        .filter(|l| !(l.ends_with(" errors found") || l.ends_with(" error found")))
        .collect();
    assert!(
        missing.is_empty(),
        "not reported:\n  {}\nstderr was:\n{}",
        missing.join("\n  "),
        run.stderr
    );
    assert_eq!(
        errs.len(),
        expected.len(),
        "each mistake exactly once, no extra errors; stderr:\n{}",
        run.stderr
    );
    assert!(
        stray.is_empty(),
        "errors must be one per line; stray lines {stray:?}; stderr:\n{}",
        run.stderr
    );
}

fn schema_mistakes(text: &str) -> Vec<Expect> {
    vec![
        (
            "bad duration",
            vec![line_of(text, "5 parsecs")],
            vec!["upstreams.bad_duration.health_check.interval".into()],
            "parsecs",
        ),
        (
            "bad YAML type",
            vec![line_of(text, "weight: heavy")],
            vec!["upstreams.bad_type.backends[0].weight".into()],
            "",
        ),
        (
            "unknown field",
            vec![line_of(text, "hots:")],
            vec!["routes[0].match".into()],
            "hots",
        ),
    ]
}

fn reference_mistakes(text: &str, first: usize) -> Vec<Expect> {
    let r = |i: usize, rest: &str| format!("routes[{}]{rest}", first + i);
    vec![
        (
            "unknown upstream",
            vec![line_of(text, "upstream: nowhere")],
            vec![r(0, ".upstream")],
            "nowhere",
        ),
        (
            "duplicate route name",
            vec![line_of(text, "name: dup   # second")],
            vec![r(2, ".name")],
            "dup",
        ),
        (
            "bad regex",
            vec![line_of(text, "path_regex:")],
            vec![r(3, ".match.path_regex")],
            "",
        ),
        (
            "split weights over 100",
            vec![
                line_of(text, "    split:"),
                line_of(text, "weight: 60"),
                line_of(text, "weight: 50"),
            ],
            vec![r(4, ".split")],
            "",
        ),
    ]
}

#[test]
fn every_independent_mistake_is_reported_with_line_and_path() {
    // Schema mistakes (in three different entries) and cross-reference mistakes together.
    let mut expected = schema_mistakes(BAD);
    expected.extend(reference_mistakes(BAD, 1));
    assert_reports(BAD, &expected);
}

#[test]
fn schema_mistakes_are_all_reported() {
    let text = BAD.split("  - name: ghost").next().unwrap().to_string();
    assert_reports(&text, &schema_mistakes(&text));
}

#[test]
fn reference_mistakes_are_all_reported() {
    // Only the mistakes found when compiling: unknown upstream, duplicate name, regex, weights.
    let text = BAD
        .replace("      interval: 5 parsecs\n", "")
        .replace("        weight: heavy\n", "")
        .replace(
            "  - name: typo\n    match:\n      hots: [a.test]\n    upstream: good\n",
            "",
        );
    assert!(
        !text.contains("parsecs") && !text.contains("heavy") && !text.contains("hots"),
        "{text}"
    );
    assert_reports(&text, &reference_mistakes(&text, 0));
}

#[test]
fn top_level_type_error_is_located() {
    let text = "listeners: [ { name: web, address: \"127.0.0.1:18080\" } ]\nserver:\n  threads: many\nroutes:\n  - name: hello\n    respond: { body: hi }\n";
    let (_d, file, run) = check(text);
    assert_eq!(run.code, Some(1), "stderr:\n{}", run.stderr);
    let errs = located_errors(&run.stderr, &file);
    assert!(
        errs.iter()
            .any(|e| e.line == 3 && e.rest.starts_with("server.threads")),
        "expected {file}:3:COL: server.threads: ...; stderr:\n{}",
        run.stderr
    );
}

#[test]
fn yaml_syntax_error_reports_its_line() {
    let text = "listeners: [ { name: web, address: \"127.0.0.1:18080\" } ]\nroutes:\n  - name: hello\n    respond: { status: 200, body: hi }\n  - name: broken\n    respond: body: oops\n";
    let (_d, file, run) = check(text);
    assert_eq!(run.code, Some(1), "stderr:\n{}", run.stderr);
    let errs = located_errors(&run.stderr, &file);
    assert!(
        errs.iter().any(|e| e.line == 6),
        "expected an error at {file}:6:COL; stderr:\n{}",
        run.stderr
    );
}

#[test]
fn missing_file_fails() {
    let out = Command::new(BIN)
        .args(["check", "-c", "/nonexistent/tollgate-it/none.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/tollgate-it/none.yaml"),
        "stderr should name the file: {err}"
    );
}
