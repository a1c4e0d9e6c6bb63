//! TLS termination through the real binary, with real TLS clients (rustls and `curl`):
//! certificates chosen by SNI (exact, wildcard, default, refusal), RSA and ECDSA, ALPN h2 and
//! http/1.1, certificate rotation under load (no failed handshake, open connections and
//! WebSockets untouched), broken certificates refused with path and reason, HTTPS redirects,
//! HSTS, h2c, client certificates (mTLS) and upstream TLS with a private CA.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{free_port, Gateway, HttpBackend, WsEchoServer};
use futures_util::{SinkExt, StreamExt};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

// ---------------------------------------------------------------------------------------------
// A private CA and its certificates, written as PEM files.

struct Pki {
    dir: tempfile::TempDir,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

#[derive(Clone, Copy)]
enum Alg {
    Rsa,
    Ecdsa,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        let pki = Pki {
            dir: tempfile::tempdir().unwrap(),
            ca,
            ca_key,
        };
        std::fs::write(pki.ca_path(), pki.ca.pem()).unwrap();
        pki
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    fn ca_path(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// A leaf for `names` with subject CN `cn`, written to `FILE.pem` and `FILE.key`.
    fn leaf(&self, file: &str, cn: &str, names: &[&str], alg: Alg) -> (String, String) {
        let (cert, key) = self.issue(cn, names, alg);
        let (c, k) = (
            self.path(&format!("{file}.pem")),
            self.path(&format!("{file}.key")),
        );
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        (show(&c), show(&k))
    }

    /// PEM certificate and key, not written anywhere.
    fn issue(&self, cn: &str, names: &[&str], alg: Alg) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let key = match alg {
            Alg::Rsa => KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap(),
            Alg::Ecdsa => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        };
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn show(p: &Path) -> String {
    p.display().to_string()
}

/// Replaces a file the way deploy tools do: write aside, rename over.
fn replace(path: &str, text: &str) {
    let tmp = format!("{path}.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// A blocking rustls client.

/// Accepts any server certificate: for tests that look at *which* certificate was served.
/// With `ecdsa_only` it offers only ECDSA signature schemes, so a server with RSA and ECDSA
/// certificates for one name must pick the ECDSA one.
#[derive(Debug)]
struct AcceptAny {
    ecdsa_only: bool,
}

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        if self.ecdsa_only {
            return vec![
                rustls::SignatureScheme::ECDSA_NISTP256_SHA256,
                rustls::SignatureScheme::ECDSA_NISTP384_SHA384,
            ];
        }
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

struct ClientOpts<'a> {
    /// Verify against this CA (else accept anything).
    ca: Option<&'a Path>,
    alpn: &'a [&'a [u8]],
    tls12_only: bool,
    /// Offer only ECDSA signature schemes (to see the ECDSA certificate of a name chosen).
    ecdsa_only: bool,
}

impl Default for ClientOpts<'_> {
    fn default() -> Self {
        ClientOpts {
            ca: None,
            alpn: &[b"http/1.1"],
            tls12_only: false,
            ecdsa_only: false,
        }
    }
}

type TlsConn = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects and completes the handshake with SNI `sni`.
fn tls_connect(addr: SocketAddr, sni: &str, o: &ClientOpts) -> Result<TlsConn, String> {
    let mut p = provider();
    if o.ecdsa_only {
        p.cipher_suites.retain(|s| {
            !matches!(
                s.suite(),
                rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
                    | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
                    | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
            )
        });
    }
    let versions: &[&rustls::SupportedProtocolVersion] = if o.tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(p))
        .with_protocol_versions(versions)
        .unwrap();
    let mut cfg = match o.ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut std::fs::read(ca).unwrap().as_slice()) {
                roots.add(c.unwrap()).unwrap();
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            let verifier = Arc::new(AcceptAny {
                ecdsa_only: o.ecdsa_only,
            });
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth()
        }
    };
    cfg.alpn_protocols = o.alpn.iter().map(|a| a.to_vec()).collect();
    cfg.resumption = rustls::client::Resumption::disabled();
    let name = ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| e.to_string())?;
    let sock =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    Ok(tls)
}

/// The subject CN of the certificate the server sent.
fn served_cn(tls: &TlsConn) -> String {
    let der = tls.conn.peer_certificates().expect("a server certificate")[0].clone();
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
    let cn = cert.subject().iter_common_name().next().unwrap();
    cn.as_str().unwrap().to_string()
}

fn alpn(tls: &TlsConn) -> String {
    String::from_utf8_lossy(tls.conn.alpn_protocol().unwrap_or(b"-")).into_owned()
}

/// One HTTP/1.1 request on an established TLS connection; returns (status, body).
fn tls_get(tls: &mut TlsConn, host: &str, path: &str) -> Result<(u16, String), String> {
    write!(tls, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").map_err(|e| e.to_string())?;
    tls.flush().map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tls.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before a full response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let head = &text[..end];
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head[9..12].parse().map_err(|_| head.to_string())?;
                return Ok((status, text[end + 4..end + 4 + len].to_string()));
            }
        }
    }
}

/// `curl` over TLS with the CA and `--resolve`: (exit ok, HTTP version, status, body).
fn curl(args: &[&str], url: &str) -> (bool, String, u16, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_version} %{http_code}",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, last) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (version, code) = last.split_once(' ').unwrap_or(("", "0"));
    (
        out.status.success(),
        version.to_string(),
        code.parse().unwrap_or(0),
        body.to_string(),
    )
}

fn resolve(host: &str, port: u16) -> String {
    format!("{host}:{port}:127.0.0.1")
}

/// The head of a gateway config whose `$PORT` listener is TLS with `tls` (YAML flow mapping).
fn tls_config(tls: &str, rest: &str) -> String {
    format!(
        r#"listeners:
  - {{ name: secure, address: "127.0.0.1:$PORT", tls: {tls} }}
admin: {{ address: "127.0.0.1:$APORT" }}
server: {{ threads: 2, pid_file: "$DIR/tollgate.pid", upgrade_sock: "$DIR/upgrade.sock" }}
access_log: {{ path: "$DIR/access.log" }}
reload: {{ watch: true, watch_interval: 100ms }}
{rest}"#
    )
}

/// `/ws` to a WebSocket echo server, everything else to `app`.
fn proxy_app_and_ws(app: &HttpBackend, ws: &WsEchoServer) -> String {
    format!(
        "upstreams:\n  app: {{ backends: [ {{ address: \"{}\" }} ] }}\n  ws: {{ backends: [ {{ address: \"{}\" }} ] }}\nroutes:\n  - {{ name: ws, match: {{ path_prefix: /ws }}, upstream: ws, websocket: {{ enabled: true }} }}\n  - {{ name: all, upstream: app }}\n",
        app.addr(),
        ws.addr()
    )
}

fn proxy_all(app: &HttpBackend) -> String {
    format!(
        "upstreams:\n  app: {{ backends: [ {{ address: \"{}\" }} ] }}\nroutes:\n  - {{ name: all, upstream: app }}\n",
        app.addr()
    )
}

// ---------------------------------------------------------------------------------------------

#[test]
fn sni_chooses_exact_wildcard_and_default_certificates_over_h2_and_http1() {
    let pki = Pki::new("Test CA");
    let (a_cert, a_key) = pki.leaf("a", "a-rsa", &["a.test", "*.w.test"], Alg::Rsa);
    let (a2_cert, a2_key) = pki.leaf("a-ec", "a-ecdsa", &["a.test"], Alg::Ecdsa);
    let (b_cert, b_key) = pki.leaf("b", "b", &["b.test"], Alg::Ecdsa);
    let app = HttpBackend::start("app");
    let gw = Gateway::start(&tls_config(
        &format!(
            "{{ certificates: [ {{ cert: {a_cert}, key: {a_key} }}, {{ cert: {a2_cert}, key: {a2_key} }}, {{ cert: {b_cert}, key: {b_key}, default: true }} ] }}"
        ),
        &proxy_all(&app),
    ));
    let any = ClientOpts::default();
    let cn = |sni: &str, o: &ClientOpts| served_cn(&tls_connect(gw.addr(), sni, o).unwrap());
    assert_eq!(cn("a.test", &any), "a-rsa", "exact name, first certificate");
    assert_eq!(cn("A.Test", &any), "a-rsa", "names compare without case");
    let ecdsa = ClientOpts {
        ecdsa_only: true,
        ..ClientOpts::default()
    };
    assert_eq!(
        cn("a.test", &ecdsa),
        "a-ecdsa",
        "a client that only verifies ECDSA gets the ECDSA certificate of the name"
    );
    assert_eq!(cn("x.w.test", &any), "a-rsa", "one-label wildcard");
    assert_eq!(
        cn("y.x.w.test", &any),
        "b",
        "a wildcard covers one label only"
    );
    assert_eq!(
        cn("w.test", &any),
        "b",
        "a wildcard does not cover its suffix"
    );
    assert_eq!(
        cn("unknown.test", &any),
        "b",
        "unknown SNI gets the default"
    );
    assert_eq!(cn("b.test", &any), "b");
    let tls12 = ClientOpts {
        tls12_only: true,
        ..ClientOpts::default()
    };
    let c = tls_connect(gw.addr(), "a.test", &tls12).unwrap();
    assert_eq!(
        c.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );

    // ALPN: h2 preferred, http/1.1 for clients that offer only that.
    let both = ClientOpts {
        alpn: &[b"h2", b"http/1.1"],
        ..ClientOpts::default()
    };
    assert_eq!(
        alpn(&tls_connect(gw.addr(), "a.test", &both).unwrap()),
        "h2"
    );
    let mut h1 = tls_connect(gw.addr(), "a.test", &any).unwrap();
    assert_eq!(alpn(&h1), "http/1.1");
    let (status, body) = tls_get(&mut h1, "a.test", "/first").unwrap();
    assert_eq!(status, 200);
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https", "{echo}");
    // Keep-alive over TLS: a second request on the same connection (the edge replays heads).
    assert_eq!(tls_get(&mut h1, "a.test", "/second").unwrap().0, 200);

    // curl verifies the chain and the name against our CA, over both protocols.
    let ca = show(&pki.ca_path());
    for (host, flag, version) in [
        ("a.test", "--http2", "2"),
        ("x.w.test", "--http2", "2"),
        ("b.test", "--http1.1", "1.1"),
    ] {
        let r = resolve(host, gw.port);
        let url = format!("https://{host}:{}/p?q=1", gw.port);
        let (ok, v, status, body) = curl(&["--cacert", &ca, "--resolve", &r, flag], &url);
        assert!(ok && status == 200, "{host} {flag}: {status} {body}");
        assert_eq!(v, version, "{host}");
        let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echo["path"], "/p?q=1");
        assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https");
        assert!(
            echo["headers"]["forwarded"][0]
                .as_str()
                .unwrap()
                .contains("proto=https"),
            "{echo}"
        );
    }
    // A name the default certificate does not cover fails verification in a real client.
    let r = resolve("unknown.test", gw.port);
    let (ok, ..) = curl(
        &["--cacert", &ca, "--resolve", &r],
        &format!("https://unknown.test:{}/", gw.port),
    );
    assert!(!ok, "curl accepted a certificate for another name");

    // Expiry of each certificate is published (2031-01-02T00:00:00Z).
    let m = gw.metrics_text();
    let expiry = common::metric_in(
        &m,
        &format!("tollgate_tls_certificate_not_after_seconds{{listener=\"secure\",file=\"{b_cert}\",name=\"b.test\"}}"),
    );
    assert_eq!(expiry, Some(1_925_078_400.0), "{m}");
    assert!(common::metric_in(&m, "tollgate_tls_handshakes_total{result=\"ok\"}").unwrap() >= 10.0);
}

#[test]
fn unknown_sni_can_be_refused_and_tls_1_2_turned_off() {
    let pki = Pki::new("Test CA");
    let (cert, key) = pki.leaf("a", "a", &["a.test"], Alg::Ecdsa);
    let app = HttpBackend::start("app");
    let gw = Gateway::start(&tls_config(
        &format!("{{ certificates: [ {{ cert: {cert}, key: {key} }} ], unknown_sni: refuse, min_version: \"1.3\" }}"),
        &proxy_all(&app),
    ));
    let any = ClientOpts::default();
    assert_eq!(
        served_cn(&tls_connect(gw.addr(), "a.test", &any).unwrap()),
        "a"
    );
    let err = tls_connect(gw.addr(), "other.test", &any).unwrap_err();
    assert!(err.contains("handshake"), "{err}");
    let tls12 = ClientOpts {
        tls12_only: true,
        ..ClientOpts::default()
    };
    assert!(tls_connect(gw.addr(), "a.test", &tls12).is_err());
    let m = gw.metrics_text();
    assert!(
        common::metric_in(&m, "tollgate_tls_handshakes_total{result=\"failed\"}").unwrap() >= 2.0,
        "{m}"
    );
    // Plain HTTP on a TLS port is not answered as HTTP.
    let plain = common::http_get(gw.addr(), "a.test", "/");
    assert!(plain.is_err() || plain.unwrap().status != 200);
}

#[test]
fn certificate_rotation_under_load_fails_no_handshake_and_keeps_open_connections() {
    let pki = Pki::new("Test CA");
    let (cert, key) = pki.leaf("site", "v1", &["a.test"], Alg::Ecdsa);
    let app = HttpBackend::start("app");
    let ws = WsEchoServer::start();
    let gw = Gateway::start(&tls_config(
        &format!("{{ certificates: [ {{ cert: {cert}, key: {key} }} ] }}"),
        &proxy_app_and_ws(&app, &ws),
    ));
    let ca = pki.ca_path();
    let verified = ClientOpts {
        ca: Some(&ca),
        ..ClientOpts::default()
    };

    // Open before the rotation: a WebSocket over TLS and a kept-alive HTTPS connection.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut socket = rt.block_on(ws_over_tls(gw.addr(), &ca));
    let mut kept = tls_connect(gw.addr(), "a.test", &verified).unwrap();
    assert_eq!(tls_get(&mut kept, "a.test", "/").unwrap().0, 200);

    // Load: new verified handshakes, one request each, until told to stop (bounded).
    let stop = common::flag();
    let ok = Arc::new(AtomicU64::new(0));
    let seen_v2 = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, seen_v2, addr, ca) = (
                stop.clone(),
                ok.clone(),
                seen_v2.clone(),
                gw.addr(),
                ca.clone(),
            );
            thread::spawn(move || {
                let opts = ClientOpts {
                    ca: Some(&ca),
                    ..ClientOpts::default()
                };
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut errors = Vec::new();
                for _ in 0..20_000 {
                    if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                        break;
                    }
                    match tls_connect(addr, "a.test", &opts)
                        .and_then(|mut c| Ok((served_cn(&c), tls_get(&mut c, "a.test", "/")?)))
                    {
                        Ok((cn, (200, _))) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            if cn == "v2" {
                                seen_v2.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Ok((_, (status, body))) => errors.push(format!("{status} {body}")),
                        Err(e) => errors.push(e),
                    }
                }
                errors
            })
        })
        .collect();
    assert!(common::wait_until(Duration::from_secs(15), || ok
        .load(Ordering::SeqCst)
        >= 100));

    // Rotate: the key first, then the certificate, as a deploy tool might. The watcher may
    // see the pair half-written: that reload is refused and the old pair keeps serving.
    let (new_cert, new_key) = pki.issue("v2", &["a.test"], Alg::Ecdsa);
    replace(&key, &new_key);
    replace(&cert, &new_cert);
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen_v2.load(Ordering::SeqCst) < 100 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    let errors: Vec<String> = load.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!(errors.is_empty(), "failed during rotation: {errors:?}");
    assert!(
        seen_v2.load(Ordering::SeqCst) >= 100,
        "new connections never saw the new certificate; stderr:\n{}",
        gw.stderr_text()
    );
    assert!(
        ok.load(Ordering::SeqCst) > seen_v2.load(Ordering::SeqCst),
        "no handshake before the rotation"
    );
    println!(
        "rotation under load: {} handshakes, all verified and answered; {} saw the new certificate",
        ok.load(Ordering::SeqCst),
        seen_v2.load(Ordering::SeqCst)
    );

    // What was open stays open, on the session it negotiated.
    assert_eq!(served_cn(&kept), "v1");
    assert_eq!(tls_get(&mut kept, "a.test", "/after").unwrap().0, 200);
    rt.block_on(echo(&mut socket, "still here"));
    assert_eq!(
        served_cn(&tls_connect(gw.addr(), "a.test", &verified).unwrap()),
        "v2"
    );
}

/// A WebSocket through the gateway's TLS listener (real rustls client, real tungstenite).
async fn ws_over_tls(
    addr: SocketAddr,
    ca: &Path,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::fs::read(ca).unwrap().as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("a.test").unwrap(), tcp)
        .await
        .unwrap();
    let req = format!("wss://a.test:{}/ws", addr.port())
        .into_client_request()
        .unwrap();
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(req, tls),
    )
    .await
    .expect("handshake in time")
    .expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    echo(&mut ws, "hello").await;
    ws
}

/// Sends `msg` on a WebSocket over TLS and expects it back within 5 s.
async fn echo(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    >,
    msg: &str,
) {
    ws.send(Message::text(msg)).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("open")
        .expect("a message");
    assert_eq!(reply, Message::text(msg));
}

#[test]
fn a_broken_certificate_is_refused_with_its_path_and_the_old_one_keeps_serving() {
    let pki = Pki::new("Test CA");
    let (cert, key) = pki.leaf("site", "good", &["a.test"], Alg::Ecdsa);
    let (_, other_key) = pki.leaf("other", "other", &["other.test"], Alg::Ecdsa);
    let app = HttpBackend::start("app");
    let gw = Gateway::start(&tls_config(
        &format!("{{ certificates: [ {{ cert: {cert}, key: {key} }} ] }}"),
        &proxy_all(&app),
    ));
    let any = ClientOpts::default();
    let original = std::fs::read_to_string(&cert).unwrap();

    // Not a certificate at all.
    replace(&cert, "this is not PEM\n");
    let err = wait_for_refusal(&gw, 1);
    assert!(
        err.contains(&cert) && err.contains("no `BEGIN CERTIFICATE` block"),
        "{err}"
    );
    assert!(err.contains("listeners[0].tls.certificates[0]"), "{err}");
    assert_eq!(
        served_cn(&tls_connect(gw.addr(), "a.test", &any).unwrap()),
        "good"
    );

    // A key that belongs to another certificate.
    replace(&cert, &original);
    assert!(common::wait_until(Duration::from_secs(10), || gw
        .status_json()["last_error"]
        .is_null()));
    replace(&key, &std::fs::read_to_string(&other_key).unwrap());
    let err = wait_for_refusal(&gw, 2);
    assert!(
        err.contains("does not belong to the certificate") && err.contains(&key),
        "{err}"
    );
    assert_eq!(
        served_cn(&tls_connect(gw.addr(), "a.test", &any).unwrap()),
        "good"
    );
    let mut c = tls_connect(gw.addr(), "a.test", &any).unwrap();
    assert_eq!(tls_get(&mut c, "a.test", "/").unwrap().0, 200);

    // `tollgate check` says the same, with file and line, and fails.
    let out = Command::new(common::BIN)
        .args(["check", "-c"])
        .arg(&gw.config_path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let file = gw.config_path.display().to_string();
    assert!(text.contains(&format!("{file}:2:")), "{text}");
    assert!(text.contains("does not belong"), "{text}");
}

/// Waits until a reload has been refused `n` times; returns the errors `/status` shows.
fn wait_for_refusal(gw: &Gateway, n: u64) -> String {
    let refused = common::wait_until(Duration::from_secs(10), || {
        gw.metric("tollgate_config_reloads_total{result=\"error\"}")
            .unwrap_or(0.0) as u64
            >= n
    });
    assert!(refused, "no refused reload; stderr:\n{}", gw.stderr_text());
    gw.status_json()["last_error"].to_string()
}

#[test]
fn http_redirects_to_https_hsts_is_sent_and_h2c_is_served() {
    let pki = Pki::new("Test CA");
    let (cert, key) = pki.leaf("a", "a", &["a.test"], Alg::Ecdsa);
    let app = HttpBackend::start("app");
    let (web, h2c) = (free_port(), free_port());
    let gw = Gateway::start(&format!(
        r#"listeners:
  - {{ name: secure, address: "127.0.0.1:$PORT", hsts: {{ max_age: 1h, include_subdomains: true }}, tls: {{ certificates: [ {{ cert: {cert}, key: {key} }} ] }} }}
  - {{ name: web, address: "127.0.0.1:{web}", redirect_https: {{ port: $PORT }} }}
  - {{ name: inner, address: "127.0.0.1:{h2c}", h2c: true }}
admin: {{ address: "127.0.0.1:$APORT" }}
server: {{ threads: 2, pid_file: "$DIR/tollgate.pid", upgrade_sock: "$DIR/upgrade.sock" }}
access_log: {{ path: "$DIR/access.log" }}
{}"#,
        proxy_all(&app)
    ));
    let web_addr = SocketAddr::from(([127, 0, 0, 1], web));
    let r = common::http_get(web_addr, "a.test:80", "/shop?item=1").unwrap();
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some(format!("https://a.test:{}/shop?item=1", gw.port).as_str())
    );
    let before = app.hits();
    let r = common::http_get(web_addr, "a.test", "/.well-known/acme-challenge/token").unwrap();
    assert_eq!(r.status, 200, "ACME challenges stay on plain HTTP");
    assert_eq!(app.hits(), before + 1);

    let ca = show(&pki.ca_path());
    let rs = resolve("a.test", gw.port);
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--cacert",
            &ca,
            "--resolve",
            &rs,
        ])
        .arg(format!("https://a.test:{}/", gw.port))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        head.contains("strict-transport-security: max-age=3600; includesubdomains"),
        "{head}"
    );
    // Plain listeners never send HSTS.
    assert!(
        common::http_get(SocketAddr::from(([127, 0, 0, 1], h2c)), "a.test", "/")
            .unwrap()
            .header("strict-transport-security")
            .is_none()
    );

    // h2c: prior-knowledge HTTP/2 and HTTP/1.1 on the same cleartext listener.
    let url = format!("http://127.0.0.1:{h2c}/h2c");
    let (ok, v, status, body) = curl(&["--http2-prior-knowledge"], &url);
    assert!(ok && status == 200, "{status} {body}");
    assert_eq!(v, "2");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["headers"]["x-forwarded-proto"][0], "http");
    let (ok, v, status, _) = curl(&[], &url);
    assert!(ok && status == 200 && v == "1.1", "{v} {status}");
    // A listener without h2c does not take the preface for a request.
    let (_, _, status, _) = curl(
        &["--http2-prior-knowledge"],
        &format!("http://127.0.0.1:{web}/"),
    );
    assert_ne!(status, 200);
}

#[test]
fn client_certificates_are_required_or_optional_per_listener() {
    let pki = Pki::new("Test CA");
    let (cert, key) = pki.leaf("a", "a", &["a.test"], Alg::Ecdsa);
    let (client_cert, client_key) = pki.leaf("client", "tenant-acme", &["client.test"], Alg::Ecdsa);
    let stranger = Pki::new("Other CA");
    let (bad_cert, bad_key) = stranger.leaf("client", "mallory", &["client.test"], Alg::Ecdsa);
    let (device_cert, device_key) = pki.leaf("device", "device-7", &["device.test"], Alg::Ecdsa);
    let app = HttpBackend::start("app");
    let optional = free_port();
    let ca = show(&pki.ca_path());
    // Consumers by certificate: one by common name, one by the fingerprint of one certificate.
    let der = rustls_pemfile::certs(&mut std::fs::read(&device_cert).unwrap().as_slice())
        .next()
        .unwrap()
        .unwrap();
    let fingerprint: String = {
        use sha2::Digest;
        sha2::Sha256::digest(der.as_ref())
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let consumers = pki.path("consumers.yaml");
    std::fs::write(
        &consumers,
        format!(
            "consumers:\n  acme:\n    tenant: acme\n    client_certs: [ {{ common_name: tenant-acme }} ]\n  device:\n    tenant: things\n    client_certs: [ {{ fingerprint: \"{fingerprint}\" }} ]\n"
        ),
    )
    .unwrap();
    let consumers = show(&consumers);
    let gw = Gateway::start(&format!(
        r#"listeners:
  - {{ name: mtls, address: "127.0.0.1:$PORT", tls: {{ certificates: [ {{ cert: {cert}, key: {key} }} ], client_auth: {{ ca: {ca} }} }} }}
  - {{ name: open, address: "127.0.0.1:{optional}", tls: {{ certificates: [ {{ cert: {cert}, key: {key} }} ], client_auth: {{ ca: {ca}, required: false }} }} }}
admin: {{ address: "127.0.0.1:$APORT" }}
server: {{ threads: 2, pid_file: "$DIR/tollgate.pid", upgrade_sock: "$DIR/upgrade.sock" }}
include: {{ consumers: {consumers} }}
upstreams:
  app: {{ backends: [ {{ address: "{app}" }} ] }}
routes:
  - {{ name: who, match: {{ path: /who }}, upstream: app, auth: [cert] }}
  - {{ name: all, upstream: app }}
"#,
        app = app.addr()
    ));
    let get_path = |port: u16, path: &str, extra: &[&str]| {
        let rs = resolve("a.test", port);
        let mut args = vec!["--cacert", ca.as_str(), "--resolve", rs.as_str()];
        args.extend_from_slice(extra);
        curl(&args, &format!("https://a.test:{port}{path}"))
    };
    let get = |port: u16, extra: &[&str]| {
        let rs = resolve("a.test", port);
        let mut args = vec!["--cacert", ca.as_str(), "--resolve", rs.as_str()];
        args.extend_from_slice(extra);
        curl(&args, &format!("https://a.test:{port}/"))
    };
    let with_cert = ["--cert", client_cert.as_str(), "--key", client_key.as_str()];
    let foreign = ["--cert", bad_cert.as_str(), "--key", bad_key.as_str()];
    assert_eq!(get(gw.port, &with_cert).2, 200);
    let (ok, _, status, _) = get(gw.port, &[]);
    assert!(!ok && status == 0, "no client certificate got {status}");
    let (ok, _, status, _) = get(gw.port, &foreign);
    assert!(
        !ok && status == 0,
        "a certificate of another CA got {status}"
    );
    assert_eq!(
        get(optional, &[]).2,
        200,
        "optional: anonymous clients pass"
    );
    assert_eq!(get(optional, &with_cert).2, 200);
    let (ok, _, status, _) = get(optional, &foreign);
    assert!(
        !ok && status == 0,
        "optional still verifies a certificate that is sent: {status}"
    );

    // The verified certificate is the consumer's identity, over HTTP/1.1 and h2 alike.
    for proto in ["--http1.1", "--http2"] {
        let (_, _, status, body) = get_path(gw.port, "/who", &[&with_cert[..], &[proto]].concat());
        assert_eq!(status, 200, "{body}");
        let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echo["headers"]["x-consumer"][0], "acme", "{proto}: {echo}");
        assert_eq!(echo["headers"]["x-tenant"][0], "acme");
        let device = [
            "--cert",
            device_cert.as_str(),
            "--key",
            device_key.as_str(),
            proto,
        ];
        let (_, _, status, body) = get_path(optional, "/who", &device);
        assert_eq!(status, 200, "{body}");
        let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            echo["headers"]["x-consumer"][0], "device",
            "{proto}: {echo}"
        );
    }
    // Without a certificate (optional listener) the route refuses; a client cannot claim one.
    let (_, _, status, body) = get_path(optional, "/who", &["-H", "x-consumer: acme"]);
    assert_eq!(status, 401, "{body}");
    // A certificate the CA issued but no consumer names is not an identity.
    let (client2_cert, client2_key) = pki.leaf("nobody", "nobody", &["n.test"], Alg::Ecdsa);
    let (_, _, status, body) = get_path(
        gw.port,
        "/who",
        &[
            "--cert",
            client2_cert.as_str(),
            "--key",
            client2_key.as_str(),
        ],
    );
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unknown_client_certificate"), "{body}");
}

#[test]
fn upstream_tls_verifies_against_a_private_ca() {
    let pki = Pki::new("Test CA");
    let (cert, key) = pki.leaf("inner", "inner", &["inner.test"], Alg::Rsa);
    let stranger = Pki::new("Other CA");
    let app = HttpBackend::start("app");
    let front = free_port();
    let ca = show(&pki.ca_path());
    let other_ca = show(&stranger.ca_path());
    // The gateway's own TLS listener is the TLS backend of its plain front listener.
    let _gw = Gateway::start(&format!(
        r#"listeners:
  - {{ name: inner, address: "127.0.0.1:$PORT", tls: {{ certificates: [ {{ cert: {cert}, key: {key} }} ] }} }}
  - {{ name: front, address: "127.0.0.1:{front}" }}
admin: {{ address: "127.0.0.1:$APORT" }}
server: {{ threads: 2, pid_file: "$DIR/tollgate.pid", upgrade_sock: "$DIR/upgrade.sock" }}
upstreams:
  app: {{ backends: [ {{ address: "{app}" }} ] }}
  inner: {{ backends: [ {{ address: "127.0.0.1:$PORT" }} ], tls: {{ sni: inner.test, ca: {ca} }}, retries: 0 }}
  inner_h2: {{ backends: [ {{ address: "127.0.0.1:$PORT" }} ], tls: {{ sni: inner.test, ca: {ca} }}, protocol: h2, retries: 0 }}
  wrong_ca: {{ backends: [ {{ address: "127.0.0.1:$PORT" }} ], tls: {{ sni: inner.test, ca: {other_ca} }}, retries: 0 }}
routes:
  - {{ name: via-tls, match: {{ hosts: [ front.test ], path_prefix: /tls/ }}, upstream: inner, rewrite: {{ strip_prefix: /tls }} }}
  - {{ name: via-h2, match: {{ hosts: [ front.test ], path_prefix: /h2/ }}, upstream: inner_h2, rewrite: {{ strip_prefix: /h2 }} }}
  - {{ name: via-wrong, match: {{ hosts: [ front.test ], path_prefix: /wrong/ }}, upstream: wrong_ca }}
  - {{ name: app, upstream: app }}
"#,
        app = app.addr()
    ));
    let front_addr = SocketAddr::from(([127, 0, 0, 1], front));
    let r = common::http_get(front_addr, "front.test", "/tls/x").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().path(), "/x");
    let r = common::http_get(front_addr, "front.test", "/h2/y").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echo().path(), "/y");
    let r = common::http_get(front_addr, "front.test", "/wrong/z").unwrap();
    assert_eq!(
        r.status, 502,
        "a backend certificate of an unknown CA was accepted"
    );
}

/// Kills a process on drop (the new process of an upgrade is not the harness's child).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.to_string()])
            .status();
    }
}

#[test]
fn a_binary_upgrade_hands_over_the_tls_listener_and_keeps_websockets_over_tls() {
    let pki = Pki::new("Test CA");
    let (cert, key) = pki.leaf("site", "site", &["a.test"], Alg::Ecdsa);
    let app = HttpBackend::start("app");
    let ws = WsEchoServer::start();
    let gw = Gateway::start(&tls_config(
        &format!("{{ certificates: [ {{ cert: {cert}, key: {key} }} ] }}"),
        &proxy_app_and_ws(&app, &ws),
    ));
    let ca = pki.ca_path();
    let verified = ClientOpts {
        ca: Some(&ca),
        ..ClientOpts::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut socket = rt.block_on(ws_over_tls(gw.addr(), &ca));
    let old = gw.status_json()["pid"].as_u64().unwrap();
    // `tollgate upgrade` finds the running process through its pid file, written just after
    // the listeners answer.
    let pid_file = gw.dir.path().join("tollgate.pid");
    assert!(common::wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&pid_file).is_ok_and(|t| t.trim() == old.to_string())
    }));

    let u = common::run_upgrade(&gw, "tls");
    let Some(new) = u.new_pid else {
        panic!(
            "upgrade failed ({:?}): {}\n{}\nnew process:\n{}",
            u.code,
            u.stdout,
            u.stderr,
            std::fs::read_to_string(&u.log).unwrap_or_default()
        );
    };
    let _new = KillOnDrop(new);
    assert_eq!(u.code, Some(0), "{}", u.stdout);
    assert_ne!(u64::from(new), old);

    // New handshakes are the new process's, on the socket it was handed.
    assert!(common::wait_until(Duration::from_secs(10), || {
        gw.status_json()["pid"].as_u64() == Some(u64::from(new))
    }));
    for _ in 0..20 {
        let mut c = tls_connect(gw.addr(), "a.test", &verified).unwrap();
        assert_eq!(tls_get(&mut c, "a.test", "/").unwrap().0, 200);
    }
    // The WebSocket over TLS opened before stays on the old process and keeps echoing.
    for i in 0..3 {
        rt.block_on(echo(&mut socket, &format!("after upgrade {i}")));
    }
}
