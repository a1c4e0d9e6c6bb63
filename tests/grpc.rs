//! gRPC through the real binary: a real grpcio server (`tests/fixtures/grpc_server.py`) behind
//! an `h2` upstream, a real grpcio client (`tests/fixtures/grpc_client.py`) on an h2c listener.
//! Proves that unary calls and bidirectional streams are proxied (the stream in lockstep, so a
//! gateway that buffered either direction would time out), that initial metadata, trailers
//! (`grpc-status`, `grpc-message`, custom and `-bin` trailing metadata) arrive unchanged, and
//! that the gateway's own refusals reach the client as gRPC statuses, not JSON.
//!
//! Needs Debian's `python3-grpcio` for `/usr/bin/python3`.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{dead_addr, tail, wait_until, Gateway};
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";
const SERVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/grpc_server.py");
const CLIENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/grpc_client.py");
/// What the fixture's `Fail` method aborts with; non-ASCII and `%`, so it is percent-encoded
/// in `grpc-message` and only survives if the gateway passes the trailer through as is.
const FAIL_MESSAGE: &str = "custom failure: 100% used \u{2713}";

/// The fixture gRPC server; killed on drop, and it exits by itself after 120 s anyway.
struct GrpcServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl GrpcServer {
    fn start() -> GrpcServer {
        let dir = tempfile::tempdir().unwrap();
        let stderr = fs::File::create(dir.path().join("server.stderr")).unwrap();
        let mut child = Command::new(PYTHON)
            .arg(SERVER)
            .args(["--lifetime", "120"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("run /usr/bin/python3 tests/fixtures/grpc_server.py");
        // The first stdout line, read on a thread so the wait is bounded.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(15)).unwrap_or_default();
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok());
        let mut s = GrpcServer {
            child,
            port: 0,
            dir,
        };
        match port {
            Some(p) => s.port = p,
            None => panic!(
                "grpc_server.py printed no port (got {line:?}); is python3-grpcio installed? \
                 stderr:\n{}",
                s.stderr_text()
            ),
        }
        s
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn stderr_text(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.stderr")).unwrap_or_default()
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "---- grpc_server.py stderr (tail) ----\n{}\n---- end ----",
                tail(&self.stderr_text(), 3000)
            );
        }
    }
}

/// Runs the fixture client against `addr` and returns its JSON report. The client bounds each
/// call to 10 s; the process as a whole is killed after 30 s.
fn client(addr: &str, args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(PYTHON)
        .arg(CLIENT)
        .arg(addr)
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run /usr/bin/python3 tests/fixtures/grpc_client.py");
    let mut status = None;
    let exited = wait_until(Duration::from_secs(30), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    let out = fs::read_to_string(&out_path).unwrap_or_default();
    let err = fs::read_to_string(&err_path).unwrap_or_default();
    assert!(exited, "grpc_client.py {args:?} hung; stderr:\n{err}");
    assert!(
        status.unwrap().success(),
        "grpc_client.py {args:?} failed; stderr:\n{err}"
    );
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("grpc_client.py {args:?} printed no JSON ({e}): {out}"))
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("<absent>")
}

fn md<'a>(v: &'a Value, which: &str, key: &str) -> &'a str {
    v[which][key].as_str().unwrap_or("<absent>")
}

/// A gateway whose listener also takes h2c (gRPC clients speak HTTP/2 with prior knowledge)
/// and whose `grpc` upstream is `backend` over h2c, plus `extra` config.
fn gateway(backend: &str, extra: &str) -> Gateway {
    let head = r#"listeners: [ { name: web, address: "127.0.0.1:$PORT", h2c: true } ]
admin: { address: "127.0.0.1:$APORT" }
server: { threads: 2, pid_file: "$DIR/tollgate.pid", upgrade_sock: "$DIR/upgrade.sock" }
access_log: { path: "$DIR/access.log" }
reload: { watch: true, watch_interval: 100ms }
"#;
    Gateway::start(&format!(
        "{head}upstreams:\n  grpc: {{ backends: [ {{ address: \"{backend}\" }} ], protocol: h2 }}\n{extra}"
    ))
}

const ROUTES: &str = r#"routes: [ { name: grpc, match: { path_prefix: /echo.Echo/ }, upstream: grpc } ]
"#;

/// Checks a successful Unary report for the payload `hello-grpc` sent with `x-client-tag: acme`.
fn assert_unary_ok(r: &Value, via: &str) {
    assert_eq!(s(r, "code"), "OK", "{via}: {r}");
    assert_eq!(s(r, "response"), "hello-grpc", "{via}: {r}");
    assert_eq!(
        md(r, "initial_metadata", "x-client-tag-echo"),
        "acme",
        "{via}: {r}"
    );
    assert_eq!(
        md(r, "trailing_metadata", "x-trailer"),
        "kept",
        "{via}: {r}"
    );
    assert_eq!(
        md(r, "trailing_metadata", "x-trace-bin"),
        "0001ff",
        "{via}: {r}"
    );
}

#[test]
fn unary_and_trailers_cross_the_gateway() {
    let backend = GrpcServer::start();
    // The fixture on its own first, so a failure below is the gateway's.
    let direct = client(&backend.addr(), &["unary", "-m", "x-client-tag=acme"]);
    assert_unary_ok(&direct, "direct");
    assert_eq!(
        md(&direct, "initial_metadata", "x-request-id-echo"),
        "<none>"
    );

    let gw = gateway(&backend.addr(), ROUTES);
    let addr = gw.addr().to_string();
    let r = client(
        &addr,
        &[
            "unary",
            "-m",
            "x-client-tag=acme",
            "-m",
            "x-request-id=grpc-unary-1",
        ],
    );
    assert_unary_ok(&r, "via gateway");
    // The request id reached the backend and came back on the response headers.
    assert_eq!(
        md(&r, "initial_metadata", "x-request-id-echo"),
        "grpc-unary-1"
    );
    assert_eq!(md(&r, "initial_metadata", "x-request-id"), "grpc-unary-1");

    // 1 MB each way: far past HTTP/2's 64 KiB initial windows, so flow control must work.
    let big = client(&addr, &["unary", "--size", "1000000"]);
    assert_eq!(s(&big, "code"), "OK", "{big}");
    assert_eq!(big["response_len"], 1_000_000, "{big}");
    assert_eq!(big["response_matches"], true, "{big}");
    assert_eq!(md(&big, "trailing_metadata", "x-trailer"), "kept", "{big}");

    let rec = gw
        .wait_access_log("grpc-unary-1", Duration::from_secs(5))
        .expect("access log record for grpc-unary-1");
    assert_eq!(rec["route"], "grpc", "{rec}");
    assert_eq!(rec["upstream"], "grpc", "{rec}");
    assert_eq!(rec["status"], 200, "{rec}");
    assert_eq!(rec["path"], "/echo.Echo/Unary", "{rec}");
}

#[test]
fn bidirectional_stream_is_interleaved_through_the_gateway() {
    let backend = GrpcServer::start();
    assert_chat_interleaves(&gateway(&backend.addr(), ROUTES));
}

/// With the WAF and a body rule on the route, a gRPC stream is still not read whole before it
/// is proxied (that would stall it): gRPC gets its head inspected only. CRS refuses content
/// types it does not list (920420), `application/grpc` among them: gRPC routes exclude it.
#[test]
fn bidirectional_stream_passes_a_waf_route_unbuffered() {
    let backend = GrpcServer::start();
    let extra = format!(
        "waf: {{ mode: block, exclusions: [ {{ id: 920420 }} ] }}\nrules: [ {{ id: body-probe, body: {{ contains: probe }}, action: block }} ]\n{ROUTES}"
    );
    assert_chat_interleaves(&gateway(&backend.addr(), &extra));
}

fn assert_chat_interleaves(gw: &Gateway) {
    let started = Instant::now();
    let r = client(&gw.addr().to_string(), &["chat", "--count", "20"]);
    assert_eq!(s(&r, "code"), "OK", "{r}");
    let replies: Vec<&str> = r["replies"]
        .as_array()
        .expect("replies")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..20).map(|i| format!("echo:m{i}")).collect();
    assert_eq!(replies, want, "{r}");
    // The client sends m(i+1) only after echo:m(i) arrived: strict alternation shows each
    // message crossed the gateway both ways while the request stream was still open.
    let events: Vec<&str> = r["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let want: Vec<String> = (0..20)
        .flat_map(|i| [format!("send:m{i}"), format!("recv:echo:m{i}")])
        .collect();
    assert_eq!(events, want, "{r}");
    assert_eq!(md(&r, "trailing_metadata", "x-chat-count"), "20", "{r}");
    // Far below the client's 10 s deadline: no message waited on a buffer or a timer.
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn backend_error_statuses_pass_through() {
    let backend = GrpcServer::start();
    let gw = gateway(&backend.addr(), ROUTES);
    let addr = gw.addr().to_string();
    for (via, target) in [("direct", backend.addr()), ("via gateway", addr.clone())] {
        let r = client(&target, &["unary", "--method", "/echo.Echo/Fail"]);
        assert_eq!(s(&r, "code"), "RESOURCE_EXHAUSTED", "{via}: {r}");
        assert_eq!(s(&r, "details"), FAIL_MESSAGE, "{via}: {r}");
        assert_eq!(
            md(&r, "trailing_metadata", "x-fail-detail"),
            "quota-xyz",
            "{via}: {r}"
        );
    }
    // A method the backend does not have: its own UNIMPLEMENTED (routed by prefix), told
    // apart from the gateway's no-route answer by the message.
    let r = client(&addr, &["unary", "--method", "/echo.Echo/Nope"]);
    assert_eq!(s(&r, "code"), "UNIMPLEMENTED", "{r}");
    assert_eq!(s(&r, "details"), "Method not found!", "{r}");
}

#[test]
fn gateway_errors_are_grpc_statuses() {
    let backend = GrpcServer::start();
    let dead = dead_addr();
    let gw = gateway(
        &backend.addr(),
        &format!(
            r#"  gone: {{ backends: [ {{ address: "{dead}" }} ], protocol: h2 }}
routes:
  - {{ name: grpc, match: {{ path_prefix: /echo.Echo/ }}, upstream: grpc }}
  - {{ name: gone, match: {{ path_prefix: /gone.Svc/ }}, upstream: gone }}
"#
        ),
    );
    let addr = gw.addr().to_string();

    let r = client(
        &addr,
        &[
            "unary",
            "--method",
            "/other.Svc/Call",
            "-m",
            "x-request-id=grpc-noroute",
        ],
    );
    assert_eq!(s(&r, "code"), "UNIMPLEMENTED", "{r}");
    assert_eq!(s(&r, "details"), "no route matches this request", "{r}");
    // Trailers-only: the one header block is the trailers, request id included.
    assert_eq!(
        md(&r, "trailing_metadata", "x-request-id"),
        "grpc-noroute",
        "{r}"
    );

    let r = client(
        &addr,
        &[
            "unary",
            "--method",
            "/gone.Svc/Call",
            "-m",
            "x-request-id=grpc-dead",
        ],
    );
    assert_eq!(s(&r, "code"), "UNAVAILABLE", "{r}");
    // The gateway's words, not grpcio's own connect failure.
    assert_eq!(s(&r, "details"), "the upstream could not be reached", "{r}");
    assert_eq!(
        md(&r, "trailing_metadata", "x-request-id"),
        "grpc-dead",
        "{r}"
    );

    // The same gateway still proxies the live route.
    let r = client(&addr, &["unary", "-m", "x-client-tag=acme"]);
    assert_unary_ok(&r, "live route");

    for (id, error) in [
        ("grpc-noroute", "no_route"),
        ("grpc-dead", "upstream_unavailable"),
    ] {
        let rec = gw
            .wait_access_log(id, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("access log record for {id}"));
        assert_eq!(rec["status"], 200, "{rec}");
        assert_eq!(rec["error"], error, "{rec}");
    }
}
