//! The plan stage at the size of the NIC's largest table: 65,536 entries over 64 nodes.
//! `place` measures `place_by_load` when a 64th node joins 63 loaded ones (about 1/64
//! of the entries move) and when one of 64 leaves (its entries move); `decide` is a
//! whole predictive planner tick over the same table.

use criterion::{Criterion, criterion_group, criterion_main};
use flowshard::planner::{Inputs, NodeInput, Planner, PlannerConfig, Policy, Power, place_by_load};
use std::hint::black_box;

const ENTRIES: usize = 65_536;
const NODES: u16 = 64;

/// Heavy-tailed per-entry loads from a fixed generator.
fn loads() -> Vec<f64> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..ENTRIES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            1.0 / (1.0 - u).sqrt()
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let load = loads();
    // Capacities in the loads' unit, the whole load at 70 % of 64 nodes, so the 0.9
    // ceiling is the one the planner passes.
    let cap = load.iter().sum::<f64>() / (f64::from(NODES) * 0.7);
    let all: Vec<(u16, f64)> = (0..NODES).map(|n| (n, cap)).collect();
    let spread_63: Vec<u16> = (0..ENTRIES).map(|e| (e % 63) as u16).collect();
    let spread_64: Vec<u16> = (0..ENTRIES).map(|e| (e % 64) as u16).collect();
    let mut g = c.benchmark_group("planner");
    g.sample_size(20);
    g.bench_function("place/65536x64/node_joins", |b| {
        b.iter(|| {
            let mut t = spread_63.clone();
            black_box(place_by_load(&mut t, &load, &all, 0.1, 0.9, usize::MAX))
        })
    });
    g.bench_function("place/65536x64/node_leaves", |b| {
        b.iter(|| {
            let mut t = spread_64.clone();
            black_box(place_by_load(
                &mut t,
                &load,
                &all[..63],
                0.1,
                0.9,
                usize::MAX,
            ))
        })
    });
    let nodes: Vec<NodeInput> = (0..NODES)
        .map(|_| NodeInput {
            load: 1.0e6 * 0.8,
            capacity: 1.0e6,
            flows: 1000,
            ..NodeInput::default()
        })
        .collect();
    let upper = vec![1.0e6 * 64.0 * 0.9; 16];
    g.bench_function("decide/65536x64/predictive", |b| {
        b.iter(|| {
            let mut p = Planner::new(
                Policy::Predictive,
                PlannerConfig {
                    max_active: 64,
                    ..PlannerConfig::default()
                },
                2,
                vec![Power::Active; 64],
                spread_64.clone(),
            );
            black_box(p.decide(&Inputs {
                tick: 1,
                nodes: &nodes,
                shard_load: &load,
                class_load: &[],
                total_upper: &upper,
                class_upper: &[],
            }))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
