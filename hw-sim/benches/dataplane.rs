//! Criterion benches of the data plane's fast path on synthetic 64-byte TCP frames.
//!
//! `flowshard bench dataplane` runs the same path at full scale with a report; these
//! benches track each stage and the whole path over releases.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hw_sim::generate::{FrameWindow, Popularity, WIRE_LEN};
use nic_firmware::parse::{LinkType, parse};
use nic_firmware::pipeline::{Decision, Packet};
use nic_firmware::rss::{MS_RSS_KEY, Toeplitz, toeplitz_reference};
use nic_firmware::{Pipeline, PipelineConfig};

#[global_allocator]
static ALLOC: hw_sim::memory::HugePageAlloc = hw_sim::memory::HugePageAlloc;

fn stages(c: &mut Criterion) {
    let w = FrameWindow::new(4096, 4096, Popularity::Uniform, 1).expect("window");
    let mut g = c.benchmark_group("stage");
    g.throughput(Throughput::Elements(w.len() as u64));
    g.bench_function("parse", |b| {
        b.iter(|| {
            for i in 0..w.len() {
                // Consume every field through a digest: black-boxing the whole result
                // would measure its spill to the stack more than the parse.
                black_box(
                    parse(LinkType::Ethernet, black_box(w.frame(i)), WIRE_LEN).map_or(0, |p| {
                        let t = p.tuple;
                        u128::from_ne_bytes(t.src)
                            ^ u128::from_ne_bytes(t.dst).rotate_left(7)
                            ^ u128::from(t.sport) << 16
                            ^ u128::from(t.dport) << 32
                            ^ u128::from(t.proto) << 48
                            ^ u128::from(p.ip_len) << 64
                            ^ u128::from(p.tcp_flags) << 96
                    }),
                );
            }
        })
    });
    let tuples: Vec<_> = (0..w.len())
        .map(|i| {
            parse(LinkType::Ethernet, w.frame(i), WIRE_LEN)
                .expect("frame")
                .tuple
        })
        .collect();
    let rss = Toeplitz::new(&MS_RSS_KEY, false);
    g.bench_function("toeplitz_table", |b| {
        b.iter(|| {
            for t in &tuples {
                black_box(rss.hash_tuple(black_box(t)));
            }
        })
    });
    g.bench_function("toeplitz_bit_serial", |b| {
        b.iter(|| {
            for t in &tuples {
                let mut input = [0u8; 12];
                input[..4].copy_from_slice(&t.src[..4]);
                input[4..8].copy_from_slice(&t.dst[..4]);
                input[8..10].copy_from_slice(&t.sport.to_be_bytes());
                input[10..12].copy_from_slice(&t.dport.to_be_bytes());
                black_box(toeplitz_reference(&MS_RSS_KEY, black_box(&input)));
            }
        })
    });
    g.finish();
}

fn pipeline(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline");
    g.sample_size(20);
    const CHUNK: usize = 4096;
    for (flows, pop, name) in [
        (1_000_000u32, Popularity::Uniform, "uniform"),
        (1_000_000, Popularity::Zipf(1.1), "zipf1.1"),
    ] {
        let mut p = Pipeline::new(&PipelineConfig::default()).expect("default config");
        let all = FrameWindow::every_flow(flows).expect("flows");
        let mut out: Vec<Decision> = Vec::with_capacity(CHUNK);
        let mut ts = 0u64;
        let mut feed = |p: &mut Pipeline, w: &FrameWindow, from: usize, out: &mut Vec<Decision>| {
            let pkts: Vec<Packet> = (from..from + CHUNK)
                .map(|i| {
                    ts += 40;
                    Packet {
                        ts_ns: ts,
                        data: w.frame(i % w.len()),
                        wire_len: WIRE_LEN,
                    }
                })
                .collect();
            out.clear();
            p.process_burst(LinkType::Ethernet, &pkts, out);
        };
        for from in (0..all.len()).step_by(CHUNK) {
            feed(&mut p, &all, from, &mut out);
        }
        let w = FrameWindow::new(flows, 1 << 20, pop, 2).expect("window");
        let mut at = 0;
        g.throughput(Throughput::Elements(CHUNK as u64));
        g.bench_with_input(BenchmarkId::new(name, flows), &flows, |b, _| {
            b.iter(|| {
                feed(&mut p, &w, at, &mut out);
                at = (at + CHUNK) % w.len();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, stages, pipeline);
criterion_main!(benches);
