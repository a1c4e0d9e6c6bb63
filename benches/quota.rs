//! Cost of one quota decision (resolve the tenant's limits and counters, then admit), with
//! 100 000 tenants listed in quotas.yaml, and for unlisted tenants (the default plan) with
//! 100 000 of them tracked.
//!
//! Run: `cargo bench --bench quota`.

use std::collections::BTreeSet;
use std::hint::black_box;
use std::io::Write;

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt;
use tollgate::config::load_quotas;
use tollgate::policy::quota::cluster::ClusterStore;
use tollgate::policy::quota::{QuotaState, QuotaTable};

const TENANTS: usize = 100_000;

fn table(state: &QuotaState) -> QuotaTable {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let mut text = String::from(
        "plans:\n  std: { requests_per_second: 1000000, requests_per_minute: 100000000, concurrent_requests: 1000 }\n\
         default_plan: std\ntenants:\n",
    );
    for i in 0..TENANTS {
        text.push_str(&format!("  t{i}: {{ plan: std }}\n"));
    }
    file.write_all(text.as_bytes()).unwrap();
    let (loaded, broken, errors) = load_quotas(file.path()).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
    let groups: BTreeSet<String> = ["default".to_string()].into();
    let (table, errors) = QuotaTable::compile(&loaded.file, &broken, &groups, state);
    assert!(errors.is_empty(), "{errors:?}");
    table
}

fn bench(c: &mut Criterion) {
    let state = QuotaState::new();
    let table = table(&state);
    let cluster = ClusterStore::new();
    let group = table.group_id("default").unwrap();
    let names: Vec<String> = (0..TENANTS).map(|i| format!("t{i}")).collect();
    let others: Vec<String> = (0..TENANTS).map(|i| format!("u{i}")).collect();
    // Track the unlisted ones first, as a busy gateway would.
    for n in &others {
        table.resolve(&state, n, group).unwrap();
    }

    let mut g = c.benchmark_group("quota_decision");
    let mut i = 0usize;
    g.bench_function("listed_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % TENANTS;
            let r = table.resolve(&state, &names[i], group).unwrap();
            let a = r.admit(&cluster, false).now_or_never().unwrap();
            black_box(a.is_ok())
        })
    });
    g.bench_function("unlisted_100k_tracked", |b| {
        b.iter(|| {
            i = (i + 7919) % TENANTS;
            let r = table.resolve(&state, &others[i], group).unwrap();
            let a = r.admit(&cluster, false).now_or_never().unwrap();
            black_box(a.is_ok())
        })
    });
    g.bench_function("one_hot_tenant", |b| {
        b.iter(|| {
            let r = table.resolve(&state, "t42", group).unwrap();
            let a = r.admit(&cluster, false).now_or_never().unwrap();
            black_box(a.is_ok())
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
