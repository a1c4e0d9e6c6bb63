//! What the WAF costs per request with Debian's Core Rule Set: a small GET with three query
//! arguments, a 4 KB JSON POST and a ~60 KB multipart upload, at paranoia levels 1 and 2, all
//! benign (the common case: every rule runs, none fires beyond the setup rules). Also an
//! attack GET, which CRS refuses at 949110.
//!
//! Run: `cargo bench --bench waf` (needs `modsecurity-crs`). Medians in
//! `target/criterion/waf_<case>/new/estimates.json`. The in-process figure is the engine
//! alone; benches/waf.sh measures the whole gateway against nginx + ModSecurity.

#[path = "support/waf.rs"]
mod support;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use support::{crs, headers};
use tollgate::waf::Head;

fn json_4k() -> String {
    let mut items = Vec::new();
    let mut i = 0;
    while items.iter().map(|s: &String| s.len()).sum::<usize>() < 3900 {
        items.push(format!(
            r#"{{"id":{i},"sku":"SKU-{i:05}","name":"Blue cotton shirt size {i}","qty":{},"price":19.99,"tags":["summer","sale"]}}"#,
            i % 5 + 1
        ));
        i += 1;
    }
    format!(
        r#"{{"customer":"c-1029","note":"Leave at the door, thanks!","items":[{}]}}"#,
        items.join(",")
    )
}

fn multipart_60k(boundary: &str) -> String {
    let line = "The quick brown fox jumps over the lazy dog. 0123456789\n";
    let file: String = line.repeat(60_000 / line.len());
    format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nQuarterly report\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"comment\"\r\n\r\nSee the attached notes.\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"notes.txt\"\r\n\
         Content-Type: text/plain\r\n\r\n{file}\r\n--{b}--\r\n",
        b = boundary
    )
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("waf");
    for paranoia in [1u8, 2] {
        let (w, route) = crs(paranoia);

        let get = headers(&[]);
        let head = |method, target, headers| Head {
            method,
            target,
            protocol: "HTTP/1.1",
            headers,
            authority: None,
            remote_addr: "203.0.113.7",
            unique_id: "bench",
        };
        let small = head("GET", "/search?q=shoes&page=2&sort=price", &get);
        assert_eq!(w.inspect(&route, &small, None).blocked_by, None);
        g.bench_function(format!("small_get_pl{paranoia}"), |b| {
            b.iter(|| w.inspect(&route, black_box(&small), None))
        });

        let json = json_4k();
        let jlen = json.len().to_string();
        let jh = headers(&[
            ("content-type", "application/json"),
            ("content-length", &jlen),
        ]);
        let post = head("POST", "/api/orders", &jh);
        let out = w.inspect(&route, &post, Some(json.as_bytes()));
        assert_eq!(out.blocked_by, None, "{:?}", out.findings);
        g.bench_function(format!("json_4k_pl{paranoia}"), |b| {
            b.iter(|| w.inspect(&route, black_box(&post), Some(json.as_bytes())))
        });

        let mp = multipart_60k("----bench7MA4YWxk");
        let mlen = mp.len().to_string();
        let mh = headers(&[
            (
                "content-type",
                "multipart/form-data; boundary=----bench7MA4YWxk",
            ),
            ("content-length", &mlen),
        ]);
        let up = head("POST", "/upload", &mh);
        let out = w.inspect(&route, &up, Some(mp.as_bytes()));
        assert_eq!(out.blocked_by, None, "{:?}", out.findings);
        g.bench_function(format!("multipart_60k_pl{paranoia}"), |b| {
            b.iter(|| w.inspect(&route, black_box(&up), Some(mp.as_bytes())))
        });

        let attack = head(
            "GET",
            "/search?q=1%27%20OR%20%271%27%3D%271&page=2&sort=price",
            &get,
        );
        assert_eq!(w.inspect(&route, &attack, None).blocked_by, Some(949110));
        g.bench_function(format!("sqli_get_pl{paranoia}"), |b| {
            b.iter(|| w.inspect(&route, black_box(&attack), None))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
