//! The engine on Debian's Core Rule Set: it loads, reports what it cannot run, and gives the
//! verdicts CRS is written to give.

use super::*;

fn crs() -> Arc<Ruleset> {
    ruleset(&default_rules(), Path::new("/")).expect("Debian's CRS loads")
}

/// Debian's CRS and a blocking route's view of it at `paranoia`, from one compile.
fn route(paranoia: u8) -> (Arc<Ruleset>, RouteWaf) {
    let settings = WafSettings {
        mode: WafMode::Block,
        paranoia,
        ..Default::default()
    };
    let waf = compile(&settings, &[None], Path::new("/"))
        .expect("Debian's CRS loads")
        .expect("the WAF is on");
    (waf.ruleset.clone(), waf.route(0).unwrap().clone())
}

fn check(target: &str, headers: &[(&str, &str)], body: Option<&str>) -> Outcome {
    let (rs, r) = route(1);
    let mut h = http::HeaderMap::new();
    h.insert("host", "shop.example.com".parse().unwrap());
    h.insert(
        "user-agent",
        "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0"
            .parse()
            .unwrap(),
    );
    h.insert("accept", "text/html".parse().unwrap());
    for (k, v) in headers {
        h.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let head = Head {
        method: if body.is_some() { "POST" } else { "GET" },
        target,
        protocol: "HTTP/1.1",
        headers: &h,
        authority: None,
        remote_addr: "203.0.113.9",
        unique_id: "t",
    };
    eval::inspect(&rs, &r, &head, body.map(str::as_bytes))
}

#[test]
fn debian_crs_loads_and_reports_what_it_cannot_run() {
    let rs = crs();
    for u in &rs.unsupported {
        eprintln!("{u}");
    }
    for n in &rs.notes {
        eprintln!("note: {n}");
    }
    eprintln!("{} rules, {} not run", rs.rules.len(), rs.unsupported.len());
    assert!(rs.rules.len() > 400, "{}", rs.rules.len());
    assert!(rs.unsupported.len() <= 10, "{:?}", rs.unsupported);
}

#[test]
fn benign_requests_pass_and_attacks_are_refused() {
    let ok = check("/search?q=shoes&page=2&sort=price", &[], None);
    assert_eq!(ok.blocked_by, None, "{:?}", ok.findings);
    let sqli = check("/search?q=1%27%20OR%20%271%27%3D%271&page=2", &[], None);
    assert_eq!(sqli.blocked_by, Some(949110), "{:?}", sqli.findings);
    let xss = check("/c?comment=%3Cscript%3Ealert(1)%3C%2Fscript%3E", &[], None);
    assert_eq!(xss.blocked_by, Some(949110), "{:?}", xss.findings);
    let lfi = check("/f?file=../../../../etc/passwd", &[], None);
    assert_eq!(lfi.blocked_by, Some(949110), "{:?}", lfi.findings);
    let json = check(
        "/api",
        &[("content-type", "application/json")],
        Some(r#"{"name":"x","q":"1 union select password from users--"}"#),
    );
    assert_eq!(json.blocked_by, Some(949110), "{:?}", json.findings);
    let fine = check(
        "/api",
        &[("content-type", "application/json")],
        Some(r#"{"name":"O'Reilly","city":"Zürich","n":3}"#),
    );
    assert_eq!(fine.blocked_by, None, "{:?}", fine.findings);
}

#[test]
fn the_setup_rules_run_once_per_route_not_per_request() {
    let (rs, r) = route(1);
    // crs-setup's 900990 and 901's defaults read and write only TX.
    let skipped = rs.phases[0][..r.start.step]
        .iter()
        .filter(|s| matches!(s, compile::Step::Rule(_)))
        .count();
    assert!(skipped >= 20, "{skipped}");
    let slot = rs.slot(b"critical_anomaly_score").unwrap();
    assert_eq!(r.start.tx[slot].as_deref(), Some(&b"5"[..]));
    let pl = rs.slot(b"executing_paranoia_level").unwrap();
    assert_eq!(r.start.tx[pl].as_deref(), Some(&b"1"[..]));
    assert_eq!(route(3).1.start.tx[pl].as_deref(), Some(&b"3"[..]));
}

#[test]
fn captures_come_from_the_value_that_matched_not_the_last_one_tried() {
    // 931130 keeps the host of a URL argument (`.%{tx.1}`) and compares it with the Host.
    let rs = compile::load_text(
        "t.conf",
        "SecRule ARGS \"@rx ^https?://([^/]+)\" \"id:1,phase:2,pass,capture,nolog,setvar:'tx.host=%{tx.1}'\"\n\
         SecRule TX:host \"@streq cdn.example.com\" \"id:2,phase:2,deny,log\"\n",
    )
    .unwrap();
    let r = blocking(&rs);
    let h = http::HeaderMap::new();
    let head = Head {
        method: "GET",
        target: "/?a=https://cdn.example.com/x.png&b=plain",
        protocol: "HTTP/1.1",
        headers: &h,
        authority: None,
        remote_addr: "192.0.2.1",
        unique_id: "t",
    };
    assert_eq!(eval::inspect(&rs, &r, &head, None).blocked_by, Some(2));
}

/// A blocking route on `rs` with nothing removed, for rules loaded from text.
fn blocking(rs: &Ruleset) -> RouteWaf {
    RouteWaf {
        detect_only: false,
        start: eval::Start {
            tx: vec![None; rs.tx_names.len()],
            step: 0,
            fixed: Vec::new(),
        },
        removed: vec![false; rs.rules.len()],
        target_excludes: vec![Vec::new(); rs.rules.len()],
    }
}

/// A header value the prefilter found clean is remembered for the set that found it clean
/// only: after a reload, the new rules judge the same value again.
#[test]
fn a_header_remembered_as_clean_is_judged_again_by_new_rules() {
    let ua = "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0";
    let load = |rx: &str| {
        let text = format!("SecRule REQUEST_HEADERS \"@rx {rx}\" \"id:1,phase:1,deny,log\"\n");
        let rs = compile::load_text("t.conf", &text).unwrap();
        assert!(rs.prefilter.of_rule[0].is_some(), "{rx} is prefiltered");
        rs
    };
    let (old, new) = (load("sqlmap"), load("Firefox/[0-9]+"));
    let mut h = http::HeaderMap::new();
    h.insert("user-agent", ua.parse().unwrap());
    let head = Head {
        method: "GET",
        target: "/",
        protocol: "HTTP/1.1",
        headers: &h,
        authority: None,
        remote_addr: "192.0.2.1",
        unique_id: "t",
    };
    let set = old.prefilter.groups[0].matcher.memo;
    assert!(!memo::known(set, ua.as_bytes()));
    for _ in 0..2 {
        assert_eq!(
            eval::inspect(&old, &blocking(&old), &head, None).blocked_by,
            None
        );
    }
    assert!(memo::known(set, ua.as_bytes()), "the clean verdict is kept");
    let r = blocking(&new);
    assert_eq!(eval::inspect(&new, &r, &head, None).blocked_by, Some(1));
}

/// The prefilter (with its memo) and the per-route fixed outcomes are shortcuts: with them or
/// without them, every request of the corpus (attacks, benign, CRS's own false positives) must give the
/// same findings, score and verdict, at paranoia 1 and 2.
#[test]
fn shortcuts_change_no_verdict_on_the_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/waf");
    let mut cases = Vec::new();
    for file in ["attacks", "benign", "crs-false-positives"] {
        let text = std::fs::read_to_string(dir.join(format!("{file}.jsonl"))).unwrap();
        for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
            cases.push(serde_json::from_str::<serde_json::Value>(line).unwrap());
        }
    }
    assert!(cases.len() > 300, "{}", cases.len());
    let mut plain = compile::load(&default_rules(), Path::new("/")).unwrap();
    plain.prefilter = prefilter::Prefilter::default();
    for paranoia in [1, 2] {
        let (rs, fast) = route(paranoia);
        let mut slow = fast.clone();
        slow.start.fixed.clear();
        let (mut skipped, mut fixed) = (0, 0);
        for ri in 0..rs.rules.len() {
            skipped += rs.prefilter.of_rule[ri].is_some() as usize;
            fixed += fast.start.fixed[ri].is_some() as usize;
        }
        assert!(
            skipped > 150 && fixed > 50,
            "{skipped} prefiltered, {fixed} fixed"
        );
        for c in &cases {
            let mut h = http::HeaderMap::new();
            h.insert("host", "gateway.test".parse().unwrap());
            for p in c["headers"].as_array().into_iter().flatten() {
                let (Some(k), Some(v)) = (p[0].as_str(), p[1].as_str()) else {
                    continue;
                };
                let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    http::HeaderValue::from_bytes(v.as_bytes()),
                ) else {
                    continue;
                };
                h.append(k, v);
            }
            let body = match (c["body"].as_str(), c["body_b64"].as_str()) {
                (Some(b), _) => Some(b.as_bytes().to_vec()),
                (_, Some(b)) => {
                    use base64::Engine;
                    Some(base64::engine::general_purpose::STANDARD.decode(b).unwrap())
                }
                _ => None,
            };
            let head = Head {
                method: c["method"].as_str().unwrap(),
                target: c["path"].as_str().unwrap(),
                protocol: "HTTP/1.1",
                headers: &h,
                authority: None,
                remote_addr: "203.0.113.9",
                unique_id: "t",
            };
            let a = eval::inspect(&rs, &fast, &head, body.as_deref());
            let b = eval::inspect(&plain, &slow, &head, body.as_deref());
            let id = c["id"].as_str().unwrap();
            // Again: now the header values found clean come from the memo.
            let again = eval::inspect(&rs, &fast, &head, body.as_deref());
            assert_eq!(
                again.findings, a.findings,
                "{id} at PL{paranoia}, remembered"
            );
            assert_eq!(a.blocked_by, b.blocked_by, "{id} at PL{paranoia}");
            assert_eq!(a.score, b.score, "{id} at PL{paranoia}");
            assert_eq!(a.findings, b.findings, "{id} at PL{paranoia}");
        }
    }
}

/// A xorshift generator: the generated-string tests see the same strings every run.
pub(crate) fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}
