//! The WAF engine on one benign small GET (three query arguments, five browser headers), run
//! a given number of times: a fixed workload to count instructions on, because this VM's
//! speed drifts too much for small engine changes to show in timings.
//!
//! ```sh
//! cargo bench --bench waf_instructions --no-run     # prints the binary's path
//! for n in 100 600; do
//!   valgrind --tool=callgrind --callgrind-out-file=/dev/null \
//!     --toggle-collect='tollgate::waf::eval::inspect' target/release/deps/waf_instructions-* $n 1
//! done   # instructions per request = (Collected at 600 − at 100) / 500
//! ```
//! Arguments: requests (default 10 000), paranoia level (default 1), and `fresh` for a new
//! User-Agent on every request (its verdicts never remembered; the other headers' are). Prints µs
//! per request.

#[path = "support/waf.rs"]
mod support;

use tollgate::waf::Head;

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with('-'));
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let paranoia: u8 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    // `fresh`: a User-Agent never seen before on every request, so none of its verdicts is remembered.
    let fresh = args.next().as_deref() == Some("fresh");
    let (w, route) = support::crs(paranoia);
    let mut headers = support::headers(&[]);
    let start = std::time::Instant::now();
    for i in 0..n {
        if fresh {
            let ua =
                format!("Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/{i}");
            headers.insert("user-agent", ua.parse().unwrap());
        }
        let head = Head {
            method: "GET",
            target: "/search?q=shoes&page=2&sort=price",
            protocol: "HTTP/1.1",
            headers: &headers,
            authority: None,
            remote_addr: "203.0.113.7",
            unique_id: "bench",
        };
        let out = w.inspect(&route, std::hint::black_box(&head), None);
        assert_eq!(out.blocked_by, None, "{:?}", out.findings);
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64;
    println!("{n} requests at PL{paranoia}: {us:.2} µs/request");
}
