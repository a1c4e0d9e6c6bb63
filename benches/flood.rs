//! What flood protection costs per request: `FloodGuard::check` with a million distinct
//! client addresses cycling (nothing blocked, then 100 000 other addresses blocked), with one
//! hot address (under its limit, and blocked), with a per-route limit, on the request that
//! turns a counting window over, and disabled; and `ClientIpPolicy::client_ip` for an
//! untrusted peer and a three-proxy chain.
//!
//! Time: `check` takes the request's arrival time. Here it is a simulated clock that advances
//! 10 µs per request (100 000 requests per second), so counting windows turn over at a realistic
//! pace: the window change (clearing 2 MiB of counters) is paid once per 100 000 requests, as in
//! production at that rate, and the sketch holds the over-count of that rate. Feeding it the
//! benchmark's own rate (tens of millions per second) would make every address look like a
//! flood. `Instant::now()` itself (~20 ns) is not included.
//!
//! Run: `cargo bench --bench flood` (~1 min after the build; `-- check/` for one group). Read
//! medians from `target/criterion/<group>_<case>/new/estimates.json` (`median.point_estimate`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use tollgate::config::units::Dur;
use tollgate::policy::client_ip::{ClientIpPolicy, ClientIpSettings};
use tollgate::policy::flood::{FloodGuard, FloodPolicy, FloodSettings, Verdict};

const DISTINCT: u32 = 1_000_000;
/// Simulated time between two requests: 100 000 requests per second.
const TICK_NS: u64 = 10_000;

fn settings() -> FloodSettings {
    FloodSettings {
        enabled: true,
        ..FloodSettings::default()
    }
}

fn policy(s: &FloodSettings) -> FloodPolicy {
    FloodPolicy::compile("flood", s).expect("bench settings are valid")
}

/// A million distinct IPv4 addresses in scattered order (an odd multiplier is a bijection).
fn addresses() -> Vec<IpAddr> {
    (0..DISTINCT)
        .map(|i| IpAddr::V4(Ipv4Addr::from(i.wrapping_mul(2_654_435_761))))
        .collect()
}

/// Benchmarks `check` over `ips` (cycled) on `route`, with the simulated clock; `expect` is the
/// verdict every measured call must give (checked once per batch, outside the timing).
fn bench_check(
    c: &mut Criterion,
    name: &str,
    guard: &FloodGuard,
    policy: &FloodPolicy,
    ips: &[IpAddr],
    route: Option<u64>,
    expect_blocked: bool,
) {
    let start = Instant::now();
    let (mut n, mut i) = (0u64, 0usize);
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            let mut blocked = 0u64;
            for _ in 0..iters {
                let ip = ips[i];
                i = if i + 1 == ips.len() { 0 } else { i + 1 };
                let now = start + Duration::from_nanos(n * TICK_NS);
                let v = guard.check(policy, black_box(ip), route, now);
                blocked += u64::from(matches!(v, Verdict::Blocked { .. }));
                n += 1;
            }
            let elapsed = t.elapsed();
            let want = if expect_blocked { iters } else { 0 };
            assert_eq!(blocked, want, "{name}: unexpected verdicts");
            elapsed
        })
    });
}

fn check(c: &mut Criterion) {
    let ips = addresses();

    // A million distinct addresses, one request each per cycle; nothing blocked.
    let guard = FloodGuard::new();
    let p = policy(&settings());
    bench_check(c, "check/1m_ips", &guard, &p, &ips, None, false);

    // The same with a per-route limit too (two sketches per request).
    let guard = FloodGuard::new();
    let p = policy(&FloodSettings {
        per_route_requests_per_second: Some(50),
        ..settings()
    });
    bench_check(
        c,
        "check/1m_ips_per_route",
        &guard,
        &p,
        &ips,
        Some(7),
        false,
    );

    // A million distinct addresses while 100 000 others are blocked: every check now reads a
    // shard of the block table.
    let guard = FloodGuard::new();
    let blocking = FloodSettings {
        block_for: Dur(Duration::from_secs(3600)),
        max_blocked: 200_000,
        ..settings()
    };
    let p = policy(&FloodSettings {
        requests_per_second: 1,
        ..blocking.clone()
    });
    let t0 = Instant::now();
    for i in 0..100_000u128 {
        // IPv6, so none of them is among the million measured IPv4 addresses.
        let a = IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | i));
        for _ in 0..2 {
            guard.check(&p, a, None, t0);
        }
    }
    assert_eq!(guard.blocked_len(), 100_000);
    let p = policy(&blocking);
    bench_check(
        c,
        "check/1m_ips_100k_blocked",
        &guard,
        &p,
        &ips,
        None,
        false,
    );

    // One hot address under its limit (the limit is out of reach).
    let guard = FloodGuard::new();
    let p = policy(&FloodSettings {
        requests_per_second: u64::MAX / 2,
        ..settings()
    });
    let hot = [IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9))];
    bench_check(c, "check/hot_ip_allowed", &guard, &p, &hot, None, false);

    // One hot address that is blocked (the shape of a flood: every request refused).
    let guard = FloodGuard::new();
    let p = policy(&FloodSettings {
        block_for: Dur(Duration::from_secs(24 * 3600)),
        ..settings()
    });
    for _ in 0..101 {
        guard.check(&p, hot[0], None, Instant::now());
    }
    bench_check(c, "check/hot_ip_blocked", &guard, &p, &hot, None, true);

    // The request that turns a window over and clears the old sketch (2 MiB): paid once per
    // `interval`, by whichever request comes first.
    let guard = FloodGuard::new();
    let p = policy(&settings());
    let start = Instant::now();
    let mut n = 0u64;
    c.bench_function("check/window_turnover", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                n += 1;
                let now = start + Duration::from_secs(n);
                black_box(guard.check(&p, black_box(hot[0]), None, now));
            }
            t.elapsed()
        })
    });

    // Disabled: the cost of having the guard in the chain at all.
    let guard = FloodGuard::new();
    let p = policy(&FloodSettings::default());
    bench_check(c, "check/disabled", &guard, &p, &ips, None, false);
}

fn client_ip(c: &mut Criterion) {
    let s = ClientIpSettings {
        trusted_proxies: vec![
            "10.0.0.0/8".into(),
            "192.0.2.0/24".into(),
            "2001:db8::/32".into(),
        ],
        ..ClientIpSettings::default()
    };
    let p = ClientIpPolicy::compile("client_ip", &s).expect("valid");
    let mut h = HeaderMap::new();
    h.insert(
        "x-forwarded-for",
        HeaderValue::from_static("1.1.1.1, 203.0.113.9, 192.0.2.10, 10.0.0.5"),
    );
    let untrusted: IpAddr = "198.51.100.7".parse().expect("literal");
    let lb: IpAddr = "10.0.0.6".parse().expect("literal");
    c.bench_function("client_ip/untrusted_peer", |b| {
        b.iter(|| p.client_ip(black_box(untrusted), black_box(&h)))
    });
    c.bench_function("client_ip/three_hops", |b| {
        b.iter(|| p.client_ip(black_box(lb), black_box(&h)))
    });
}

criterion_group!(benches, check, client_ip);
criterion_main!(benches);
