//! Black-box test harness for the `tollgate` binary.
//!
//! Everything here is real: the gateway is the built binary, upstreams are hyper 1 servers and
//! tokio-tungstenite echo servers running in the test process, on 127.0.0.1 ports picked by
//! binding port 0. Every wait is bounded.
//!
//! Config templates use three tokens filled in by [`Gateway`]: `$PORT` (proxy listener),
//! `$APORT` (admin listener) and `$DIR` (the test's own temp dir). Backend addresses are put in
//! by the tests themselves (`.replace("$B1", &b1.addr())`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as WsRequest, Response as WsResponse,
};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

// ---------------------------------------------------------------------------------------------
// Small utilities

/// A port that was free a moment ago (bind 127.0.0.1:0, read, drop).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// A 127.0.0.1 address on which nothing listens (connections are refused).
pub fn dead_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes. Returns whether it held.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// 1-based number of the only line of `text` containing `needle` (panics if not exactly one).
pub fn line_of(text: &str, needle: &str) -> usize {
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "`{needle}` should be on exactly one line of:\n{text}"
    );
    hits[0]
}

/// The common head of a gateway config: listener, admin, server, access log. No `reload:` and
/// no `http:` section, so a test can add its own.
pub fn base() -> String {
    r#"listeners: [ { name: web, address: "127.0.0.1:$PORT" } ]
admin: { address: "127.0.0.1:$APORT" }
server: { threads: 2, pid_file: "$DIR/tollgate.pid", upgrade_sock: "$DIR/upgrade.sock" }
access_log: { path: "$DIR/access.log" }
"#
    .to_string()
}

/// [`base`] plus a fast file watcher (`reload: { watch: true, watch_interval: 100ms }`) plus `body`.
pub fn config(body: &str) -> String {
    format!(
        "{}reload: {{ watch: true, watch_interval: 100ms }}\n{}",
        base(),
        body
    )
}

// ---------------------------------------------------------------------------------------------
// The gateway process

pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub admin_port: u16,
    pub config_path: PathBuf,
    pid: u32,
    child: Mutex<Child>,
    writes: AtomicU64,
}

impl Gateway {
    /// Fills in `$PORT`, `$APORT`, `$DIR`, writes `DIR/tollgate.yaml`, runs `tollgate -c` on it
    /// (stdout/stderr to `DIR/stdout.log` / `DIR/stderr.log`) and waits (bounded) until the
    /// listener accepts and the admin `/metrics` answers. Retries with new ports if a port was
    /// taken in the meantime.
    pub fn start(template: &str) -> Gateway {
        let mut last_err = String::new();
        for _attempt in 0..3 {
            match Self::try_start(template) {
                Ok(gw) => return gw,
                Err((retry, msg)) => {
                    if !retry {
                        panic!("gateway did not start: {msg}");
                    }
                    last_err = msg;
                }
            }
        }
        panic!("gateway did not start after 3 attempts (ports in use?): {last_err}");
    }

    fn try_start(template: &str) -> Result<Gateway, (bool, String)> {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-it")
            .tempdir()
            .unwrap();
        let port = free_port();
        let mut admin_port = free_port();
        while admin_port == port {
            admin_port = free_port();
        }
        let config_path = dir.path().join("tollgate.yaml");
        let text = fill(template, port, admin_port, dir.path());
        fs::write(&config_path, text).unwrap();
        let stdout = fs::File::create(dir.path().join("stdout.log")).unwrap();
        let stderr = fs::File::create(dir.path().join("stderr.log")).unwrap();
        let child = Command::new(BIN)
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn tollgate");
        let gw = Gateway {
            pid: child.id(),
            child: Mutex::new(child),
            dir,
            port,
            admin_port,
            config_path,
            writes: AtomicU64::new(0),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = gw.child.lock().unwrap().try_wait().unwrap() {
                let err = gw.stderr_text();
                let in_use = err.contains("os error 98")
                    || err.to_lowercase().contains("address already in use");
                return Err((
                    in_use,
                    format!("tollgate exited with {status} during start; stderr:\n{err}"),
                ));
            }
            if TcpStream::connect_timeout(&gw.addr(), Duration::from_millis(200)).is_ok() {
                if let Ok(r) = http_get(gw.admin_addr(), "127.0.0.1", "/metrics") {
                    if r.status == 200 && r.text().contains("tollgate_config_generation") {
                        return Ok(gw);
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err((
                    false,
                    format!("not ready within 30 s; stderr:\n{}", gw.stderr_text()),
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin_port))
    }
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://127.0.0.1:{}{}", self.port, path)
    }

    /// The template with this gateway's ports and dir filled in.
    pub fn fill(&self, template: &str) -> String {
        fill(template, self.port, self.admin_port, self.dir.path())
    }

    /// Replaces the config file atomically (write a temp file, rename over). Returns the text.
    pub fn write_config(&self, template: &str) -> String {
        let text = self.fill(template);
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        let tmp = self.dir.path().join(format!(".tollgate.yaml.{n}.tmp"));
        fs::write(&tmp, &text).unwrap();
        fs::rename(&tmp, &self.config_path).unwrap();
        text
    }

    pub fn sighup(&self) {
        let st = Command::new("kill")
            .args(["-HUP", &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -HUP {} failed", self.pid);
    }

    /// Whether the process is still running.
    pub fn alive(&self) -> bool {
        self.child.lock().unwrap().try_wait().unwrap().is_none()
    }

    pub fn metrics_text(&self) -> String {
        let r = http_get(self.admin_addr(), "127.0.0.1", "/metrics").expect("GET /metrics");
        assert_eq!(r.status, 200, "/metrics status");
        r.text()
    }

    /// One metric: `name` or `name{label="v",...}`. Samples whose name matches and whose labels
    /// include all the given ones are summed; `None` when no sample matches.
    pub fn metric(&self, selector: &str) -> Option<f64> {
        metric_in(&self.metrics_text(), selector)
    }

    pub fn generation(&self) -> u64 {
        self.metric("tollgate_config_generation")
            .expect("tollgate_config_generation") as u64
    }

    /// Waits until `tollgate_config_generation >= n`; returns the generation seen.
    pub fn wait_generation(&self, n: u64, timeout: Duration) -> u64 {
        let mut seen = 0;
        let ok = wait_until(timeout, || {
            seen = self.metric("tollgate_config_generation").unwrap_or(0.0) as u64;
            seen >= n
        });
        assert!(
            ok,
            "config generation {n} not reached within {timeout:?} (at {seen}); stderr tail:\n{}",
            tail(&self.stderr_text(), 3000)
        );
        seen
    }

    /// Waits until `metric(selector) == Some(value)`.
    pub fn wait_metric(&self, selector: &str, value: f64, timeout: Duration) -> bool {
        wait_until(timeout, || self.metric(selector) == Some(value))
    }

    pub fn status_json(&self) -> Value {
        let r = http_get(self.admin_addr(), "127.0.0.1", "/status").expect("GET /status");
        assert_eq!(r.status, 200, "/status status; body {}", r.text());
        r.json()
    }

    pub fn stderr_text(&self) -> String {
        fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
    pub fn stdout_text(&self) -> String {
        fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    /// Complete lines of the access log, each parsed as JSON (panics on a line that is not).
    pub fn access_log_lines(&self) -> Vec<Value> {
        let text = fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        let complete = match text.rfind('\n') {
            Some(i) => &text[..i],
            None => "",
        };
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("access log line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Waits (bounded) for an access log record with this request id.
    pub fn wait_access_log(&self, request_id: &str, timeout: Duration) -> Option<Value> {
        let mut found = None;
        wait_until(timeout, || {
            found = self
                .access_log_lines()
                .into_iter()
                .find(|v| v["request_id"].as_str() == Some(request_id));
            found.is_some()
        });
        found
    }

    /// A request on a new connection to the proxy listener.
    pub fn get(&self, host: &str, path: &str) -> RawResponse {
        self.send(&Req::get(path).host(host))
    }

    /// Sends `req` on a new connection; panics on an I/O error.
    pub fn send(&self, req: &Req) -> RawResponse {
        let mut c = RawConn::connect(self.addr()).expect("connect to gateway");
        c.request(req)
            .unwrap_or_else(|e| panic!("{} {} failed: {e}", req.method, req.path))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if thread::panicking() {
            eprintln!(
                "---- tollgate stderr (tail) ----\n{}\n---- end ----",
                tail(&self.stderr_text(), 4000)
            );
        }
    }
}

fn fill(template: &str, port: u16, admin_port: u16, dir: &Path) -> String {
    template
        .replace("$APORT", &admin_port.to_string())
        .replace("$PORT", &port.to_string())
        .replace("$DIR", dir.to_str().unwrap())
}

pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Sum of the samples of `selector` in a Prometheus text exposition (see [`Gateway::metric`]).
pub fn metric_in(text: &str, selector: &str) -> Option<f64> {
    let (want_name, want_labels) = parse_series(selector).expect("bad metric selector");
    let mut sum = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, labels, rest)) = parse_series_prefix(line) else {
            continue;
        };
        if name != want_name || !want_labels.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            continue;
        }
        let Some(v) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        *sum.get_or_insert(0.0) += v;
    }
    sum
}

fn parse_series(s: &str) -> Option<(String, BTreeMap<String, String>)> {
    let (n, l, rest) = parse_series_prefix(s.trim())?;
    rest.trim().is_empty().then_some((n, l))
}

/// `name{a="b"} rest` → (name, labels, rest).
fn parse_series_prefix(s: &str) -> Option<(String, BTreeMap<String, String>, &str)> {
    let end = s
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(s.len());
    let name = s[..end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &s[end..];
    if let Some(r) = rest.strip_prefix('{') {
        let chars: Vec<(usize, char)> = r.char_indices().collect();
        let mut i = 0;
        loop {
            while i < chars.len() && (chars[i].1 == ',' || chars[i].1 == ' ') {
                i += 1;
            }
            if i >= chars.len() {
                return None;
            }
            if chars[i].1 == '}' {
                rest = &r[chars[i].0 + 1..];
                break;
            }
            let ks = i;
            while i < chars.len() && chars[i].1 != '=' {
                i += 1;
            }
            if i + 1 >= chars.len() || chars[i + 1].1 != '"' {
                return None;
            }
            let key: String = chars[ks..i].iter().map(|c| c.1).collect();
            i += 2;
            let mut val = String::new();
            while i < chars.len() && chars[i].1 != '"' {
                if chars[i].1 == '\\' && i + 1 < chars.len() {
                    i += 1;
                    val.push(match chars[i].1 {
                        'n' => '\n',
                        c => c,
                    });
                } else {
                    val.push(chars[i].1);
                }
                i += 1;
            }
            i += 1;
            labels.insert(key.trim().to_string(), val);
        }
    }
    Some((name, labels, rest))
}

// ---------------------------------------------------------------------------------------------
// A raw HTTP/1.1 client (exact bytes, keep-alive, Content-Length and chunked bodies)

#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Req {
    pub fn new(method: &str, path: &str) -> Req {
        Req {
            method: method.into(),
            path: path.into(),
            host: Some("gateway.test".into()),
            headers: vec![],
            body: vec![],
        }
    }
    pub fn get(path: &str) -> Req {
        Req::new("GET", path)
    }
    pub fn post(path: &str, body: impl Into<Vec<u8>>) -> Req {
        let mut r = Req::new("POST", path);
        r.body = body.into();
        r
    }
    pub fn host(mut self, h: &str) -> Req {
        self.host = Some(h.into());
        self
    }
    pub fn no_host(mut self) -> Req {
        self.host = None;
        self
    }
    pub fn header(mut self, k: &str, v: &str) -> Req {
        self.headers.push((k.into(), v.into()));
        self
    }
    /// The request's bytes. Adds `Content-Length` for a body unless the headers already frame it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut s = format!("{} {} HTTP/1.1\r\n", self.method, self.path);
        if let Some(h) = &self.host {
            s.push_str(&format!("Host: {h}\r\n"));
        }
        let framed = self.headers.iter().any(|(k, _)| {
            k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding")
        });
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}\r\n"));
        }
        if !framed && (!self.body.is_empty() || self.method == "POST" || self.method == "PUT") {
            s.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        s.push_str("\r\n");
        let mut b = s.into_bytes();
        b.extend_from_slice(&self.body);
        b
    }
}

#[derive(Clone, Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response (status {}) is not JSON ({e}): {}",
                self.status,
                self.text()
            )
        })
    }
    /// The upstream's echo of the request (see [`HttpBackend`]).
    pub fn echo(&self) -> Echo {
        assert_eq!(
            self.status,
            200,
            "expected a proxied 200, got {}: {}",
            self.status,
            self.text()
        );
        Echo(self.json())
    }
    pub fn closes(&self) -> bool {
        self.header("connection")
            .map(|v| v.to_ascii_lowercase().contains("close"))
            == Some(true)
    }
}

pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
    pub requests: u64,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> io::Result<RawConn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.set_write_timeout(Some(Duration::from_secs(20)))?;
        stream.set_nodelay(true)?;
        Ok(RawConn {
            stream,
            buf: Vec::new(),
            requests: 0,
        })
    }
    pub fn set_read_timeout(&self, d: Duration) {
        self.stream.set_read_timeout(Some(d)).unwrap();
    }
    pub fn send_raw(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data)?;
        self.stream.flush()
    }
    pub fn request(&mut self, req: &Req) -> io::Result<RawResponse> {
        self.requests += 1;
        self.send_raw(&req.to_bytes())?;
        self.read_response(&req.method)
    }

    fn fill_more(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    fn take_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.buf.len() > 1 << 20 {
                return Err(io::Error::other("line too long"));
            }
            if self.fill_more()? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in line"));
            }
        }
    }

    fn take_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.fill_more()? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "eof in body"));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads one response (skipping 100-continue and other 1xx except 101).
    pub fn read_response(&mut self, method: &str) -> io::Result<RawResponse> {
        loop {
            let head_end = loop {
                if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                if self.buf.len() > 1 << 20 {
                    return Err(io::Error::other("response head too large"));
                }
                let n = self.fill_more()?;
                if n == 0 {
                    let what = if self.buf.is_empty() {
                        "connection closed before any response byte"
                    } else {
                        "eof in response head"
                    };
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, what));
                }
            };
            let head: Vec<u8> = self.buf.drain(..head_end).collect();
            let mut hs = [httparse::EMPTY_HEADER; 256];
            let mut resp = httparse::Response::new(&mut hs);
            match resp.parse(&head) {
                Ok(httparse::Status::Complete(_)) => {}
                other => {
                    return Err(io::Error::other(format!(
                        "bad response head {other:?}: {}",
                        String::from_utf8_lossy(&head)
                    )))
                }
            }
            let status = resp.code.unwrap_or(0);
            let headers: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
            let body = if method == "HEAD" || status == 204 || status == 304 || status == 101 {
                vec![]
            } else if get("transfer-encoding").map(|v| v.to_ascii_lowercase().contains("chunked"))
                == Some(true)
            {
                let mut body = vec![];
                loop {
                    let line = self.take_line()?;
                    let size_s = line.split(';').next().unwrap_or("").trim().to_string();
                    let size = usize::from_str_radix(&size_s, 16)
                        .map_err(|_| io::Error::other(format!("bad chunk size line {line:?}")))?;
                    if size == 0 {
                        loop {
                            if self.take_line()?.is_empty() {
                                break;
                            }
                        }
                        break;
                    }
                    body.extend(self.take_exact(size)?);
                    let crlf = self.take_line()?;
                    if !crlf.is_empty() {
                        return Err(io::Error::other("chunk not followed by CRLF"));
                    }
                }
                body
            } else if let Some(cl) = get("content-length") {
                let n: usize = cl
                    .trim()
                    .parse()
                    .map_err(|_| io::Error::other("bad content-length"))?;
                self.take_exact(n)?
            } else {
                // Delimited by close.
                let mut n = 0;
                while self.fill_more()? > 0 {
                    n += 1;
                    if n > 100_000 {
                        return Err(io::Error::other("endless body"));
                    }
                }
                std::mem::take(&mut self.buf)
            };
            return Ok(RawResponse {
                status,
                headers,
                body,
            });
        }
    }
}

/// GET on a new connection (used for the admin listener too).
pub fn http_get(addr: SocketAddr, host: &str, path: &str) -> io::Result<RawResponse> {
    let mut c = RawConn::connect(addr)?;
    c.set_read_timeout(Duration::from_secs(10));
    c.request(&Req::get(path).host(host).header("Connection", "close"))
}

/// A real HTTP client with a keep-alive pool (reqwest, blocking, no proxy from the environment).
pub fn http_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// What a [`HttpBackend`] saw, as it echoed it back.
#[derive(Clone, Debug)]
pub struct Echo(pub Value);

impl Echo {
    pub fn backend(&self) -> String {
        self.0["backend"].as_str().unwrap_or_default().to_string()
    }
    pub fn method(&self) -> String {
        self.0["method"].as_str().unwrap_or_default().to_string()
    }
    /// Path with query, as the upstream received it.
    pub fn path(&self) -> String {
        self.0["path"].as_str().unwrap_or_default().to_string()
    }
    pub fn body(&self) -> String {
        self.0["body"].as_str().unwrap_or_default().to_string()
    }
    pub fn body_len(&self) -> u64 {
        self.0["body_len"].as_u64().unwrap_or(u64::MAX)
    }
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.0["headers"][name.to_ascii_lowercase()]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| v.as_str().unwrap_or_default().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }
    /// All values of a header joined with ", "; `None` if absent.
    pub fn header(&self, name: &str) -> Option<String> {
        let v = self.header_values(name);
        (!v.is_empty()).then(|| v.join(", "))
    }
    pub fn header_names(&self) -> Vec<String> {
        self.0["headers"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// What `tollgate upgrade` did (see [`run_upgrade`]).
pub struct Upgrade {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
    pub new_pid: Option<u32>,
    pub old_pid: Option<u32>,
    pub log: PathBuf,
}

/// Runs `tollgate upgrade -c CONF --log DIR/new-TAG.log` (bounded: killed after 45 s).
pub fn run_upgrade(gw: &Gateway, tag: &str) -> Upgrade {
    let dir = gw.dir.path();
    let (out, err) = (
        dir.join(format!("upgrade-{tag}.out")),
        dir.join(format!("upgrade-{tag}.err")),
    );
    let log = dir.join(format!("new-{tag}.log"));
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .arg("upgrade")
        .arg("-c")
        .arg(&gw.config_path)
        .arg("--log")
        .arg(&log)
        .args(["--ready-timeout", "20s"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn tollgate upgrade");
    let mut code = None;
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            code = st.code();
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let took = started.elapsed();
    let stdout = fs::read_to_string(&out).unwrap_or_default();
    let stderr = fs::read_to_string(&err).unwrap_or_default();
    // "upgraded: pid NEW serves; pid OLD drains ..."
    let mut pids = stdout
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "pid")
        .filter_map(|w| w[1].trim_end_matches(';').parse::<u32>().ok())
        .collect::<Vec<_>>()
        .into_iter();
    let (new_pid, old_pid) = (pids.next(), pids.next());
    Upgrade {
        code,
        stdout,
        stderr,
        took,
        new_pid,
        old_pid,
        log,
    }
}

// ---------------------------------------------------------------------------------------------
// Upstream servers

fn bind_std(port: u16) -> std::net::TcpListener {
    // std sets SO_REUSEADDR on Unix, so a restart can bind despite TIME_WAIT sockets.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => {
                l.set_nonblocking(true).unwrap();
                return l;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("bind 127.0.0.1:{port}: {e}"),
        }
    }
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// Shuts a server runtime down, dropping (closing) its listener and every connection.
fn shutdown(rt: tokio::runtime::Runtime) {
    // From a plain thread, so this is allowed inside async tests too.
    let _ = thread::spawn(move || rt.shutdown_timeout(Duration::from_secs(2))).join();
}

fn wait_refused(port: u16) {
    let ok = wait_until(Duration::from_secs(3), || {
        TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_millis(100),
        )
        .is_err()
    });
    assert!(ok, "port {port} still accepts after stop");
}

struct BackendState {
    name: String,
    hits: AtomicU64,
    health_hits: AtomicU64,
    health_status: AtomicU16,
}

/// A hyper 1 upstream. Every request gets 200 JSON
/// `{"backend":NAME,"method":..,"path":..(with query),"headers":{name:[values]},"body_len":N,"body":..}`
/// with response headers `x-backend: NAME`, `x-remove-me: 1`, `x-upstream-header: keep`.
/// `/healthz` answers the switchable health status (200 by default) and is counted apart.
/// `/status/NNN` answers NNN; `/sleep/MS` answers after MS milliseconds.
pub struct HttpBackend {
    pub name: String,
    pub port: u16,
    state: Arc<BackendState>,
    rt: Mutex<Option<tokio::runtime::Runtime>>,
}

impl HttpBackend {
    pub fn start(name: &str) -> HttpBackend {
        let listener = bind_std(0);
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(BackendState {
            name: name.to_string(),
            hits: AtomicU64::new(0),
            health_hits: AtomicU64::new(0),
            health_status: AtomicU16::new(200),
        });
        let b = HttpBackend {
            name: name.to_string(),
            port,
            state,
            rt: Mutex::new(None),
        };
        b.serve(listener);
        b
    }

    fn serve(&self, listener: std::net::TcpListener) {
        let rt = runtime(1);
        let state = self.state.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| backend_handle(req, state.clone()));
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        *self.rt.lock().unwrap() = Some(rt);
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    /// Requests other than `/healthz`.
    pub fn hits(&self) -> u64 {
        self.state.hits.load(Ordering::SeqCst)
    }
    pub fn health_hits(&self) -> u64 {
        self.state.health_hits.load(Ordering::SeqCst)
    }
    pub fn set_health_status(&self, status: u16) {
        self.state.health_status.store(status, Ordering::SeqCst);
    }
    /// Closes the listener and every open connection; the port then refuses connections.
    pub fn stop(&self) {
        if let Some(rt) = self.rt.lock().unwrap().take() {
            shutdown(rt);
        }
        wait_refused(self.port);
    }
    /// Serves again on the same port.
    pub fn restart(&self) {
        assert!(
            self.rt.lock().unwrap().is_none(),
            "restart of a running backend"
        );
        let l = bind_std(self.port);
        self.serve(l);
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.lock().unwrap().take() {
            shutdown(rt);
        }
    }
}

async fn backend_handle(
    req: hyper::Request<Incoming>,
    st: Arc<BackendState>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let uri_path = req.uri().path().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| req.uri().to_string());
    let mut headers = serde_json::Map::new();
    for (k, v) in req.headers() {
        let e = headers
            .entry(k.as_str().to_string())
            .or_insert_with(|| Value::Array(vec![]));
        e.as_array_mut().unwrap().push(Value::String(
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
        ));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if uri_path == "/healthz" {
        st.health_hits.fetch_add(1, Ordering::SeqCst);
        let code = st.health_status.load(Ordering::SeqCst);
        let mut r = hyper::Response::new(Full::new(Bytes::from(if code < 300 {
            "ok\n"
        } else {
            "fail\n"
        })));
        *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap();
        return Ok(r);
    }
    st.hits.fetch_add(1, Ordering::SeqCst);
    let mut status = 200u16;
    if let Some(ms) = uri_path
        .strip_prefix("/sleep/")
        .and_then(|s| s.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms.min(30_000))).await;
    }
    if let Some(code) = uri_path
        .strip_prefix("/status/")
        .and_then(|s| s.parse::<u16>().ok())
    {
        status = code;
    }
    let json = serde_json::json!({
        "backend": st.name,
        "method": method,
        "path": path,
        "headers": headers,
        "body_len": body.len(),
        // Small bodies in full, so tests can check what the upstream received.
        "body": (body.len() <= 4096).then(|| String::from_utf8_lossy(&body).into_owned()),
    });
    let mut r = hyper::Response::new(Full::new(Bytes::from(json.to_string())));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    let h = r.headers_mut();
    h.insert("content-type", "application/json".parse().unwrap());
    h.insert("x-backend", st.name.parse().unwrap());
    h.insert("x-remove-me", "1".parse().unwrap());
    h.insert("x-upstream-header", "keep".parse().unwrap());
    Ok(r)
}

/// A tokio-tungstenite echo server: echoes text and binary messages, answers close (and ping,
/// via tungstenite). The text message `whoami` is answered with the server's name instead, and
/// the handshake response carries `x-backend: NAME`.
pub struct WsEchoServer {
    pub name: String,
    pub port: u16,
    accepted: Arc<AtomicU64>,
    active: Arc<AtomicI64>,
    rt: Mutex<Option<tokio::runtime::Runtime>>,
}

impl WsEchoServer {
    pub fn start() -> WsEchoServer {
        Self::start_named("echo")
    }

    pub fn start_named(name: &str) -> WsEchoServer {
        let listener = bind_std(0);
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU64::new(0));
        let active = Arc::new(AtomicI64::new(0));
        let rt = runtime(2);
        let (n, acc, act) = (name.to_string(), accepted.clone(), active.clone());
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let (n, acc, act) = (n.clone(), acc.clone(), act.clone());
                tokio::spawn(async move {
                    let hn = n.clone();
                    #[allow(clippy::result_large_err)] // the signature is tungstenite's
                    let cb = move |_req: &WsRequest,
                                   mut resp: WsResponse|
                          -> Result<WsResponse, ErrorResponse> {
                        resp.headers_mut()
                            .insert("x-backend", HeaderValue::from_str(&hn).unwrap());
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, cb).await else {
                        return;
                    };
                    acc.fetch_add(1, Ordering::SeqCst);
                    act.fetch_add(1, Ordering::SeqCst);
                    while let Some(msg) = ws.next().await {
                        let res = match msg {
                            Ok(Message::Text(t)) if t.as_str() == "whoami" => {
                                ws.send(Message::text(n.clone())).await
                            }
                            Ok(m @ (Message::Text(_) | Message::Binary(_))) => ws.send(m).await,
                            Ok(_) => Ok(()), // ping/pong/close: tungstenite answers them itself
                            Err(_) => break,
                        };
                        if res.is_err() {
                            break;
                        }
                    }
                    act.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        WsEchoServer {
            name: name.to_string(),
            port,
            accepted,
            active,
            rt: Mutex::new(Some(rt)),
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    /// WebSocket handshakes completed so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
    /// Connections open right now.
    pub fn active(&self) -> i64 {
        self.active.load(Ordering::SeqCst)
    }
}

impl Drop for WsEchoServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.lock().unwrap().take() {
            shutdown(rt);
        }
    }
}

pub type WsClient =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a WebSocket through the gateway with the given Host header.
pub async fn ws_connect(
    port: u16,
    host: &str,
    path: &str,
) -> Result<
    (
        WsClient,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    let mut req = format!("ws://127.0.0.1:{port}{path}").into_client_request()?;
    req.headers_mut()
        .insert("host", HeaderValue::from_str(host).unwrap());
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .map_err(|_| {
        tokio_tungstenite::tungstenite::Error::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            "ws connect timed out",
        ))
    })?
}

/// Sends `msg` and waits (bounded) for the next data message.
pub async fn ws_roundtrip(
    ws: &mut WsClient,
    msg: Message,
    timeout: Duration,
) -> Result<Message, String> {
    ws.send(msg).await.map_err(|e| format!("send: {e}"))?;
    ws_next_data(ws, timeout).await
}

/// The next text/binary message (pings and pongs skipped), bounded in time.
pub async fn ws_next_data(ws: &mut WsClient, timeout: Duration) -> Result<Message, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    for _ in 0..1000 {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err(format!("no message within {timeout:?}")),
            Ok(None) => return Err("stream ended".into()),
            Ok(Some(Err(e))) => return Err(format!("read: {e}")),
            Ok(Some(Ok(m @ (Message::Text(_) | Message::Binary(_))))) => return Ok(m),
            Ok(Some(Ok(Message::Close(f)))) => return Err(format!("closed by peer: {f:?}")),
            Ok(Some(Ok(_))) => continue,
        }
    }
    Err("too many control frames".into())
}

/// Flag for loops that run until told to stop (always also bounded by count and time).
pub fn flag() -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(false))
}
