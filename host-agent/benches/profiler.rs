//! Profiler throughput on one core: the ONNX model on ONNX Runtime over batches of real
//! flows' input vectors (flows/s), a single flow (per-flow latency), and the same
//! ensemble as NIC tables. The vectors come from real captures of the training set.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flowshard::flows;
use flowshard::profiler::{self, Profiler};
use nic_firmware::PipelineConfig;
use nic_firmware::profile::{FEATURES, features};

const CAPTURES: [&str; 4] = [
    "netflix.pcap",
    "skype.pcap",
    "bittorrent.pcap",
    "facebook.pcap",
];

/// Input vectors of the flows of a few real captures, at the model's N.
fn real_vectors(packets: u8) -> Vec<[u32; FEATURES]> {
    let dir = profiler::data_dir().join("ndpi/pcap");
    let config = PipelineConfig {
        feature_packets: packets,
        ..PipelineConfig::default()
    };
    let mut out = Vec::new();
    for name in CAPTURES {
        let path: PathBuf = dir.join(name);
        match flows::collect(&path, &config, None, |_, _, _| Ok(())) {
            Ok((fl, _)) => out.extend(fl.iter().map(|f| features(&f.first))),
            Err(e) => eprintln!("skipping {}: {e}", path.display()),
        }
    }
    out
}

fn bench(c: &mut Criterion) {
    let mut p = match Profiler::load(None, &profiler::library_path()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("profiler bench skipped: {e}");
            return;
        }
    };
    let vectors = real_vectors(p.packets());
    assert!(!vectors.is_empty(), "no captures: run scripts/setup.sh");
    let mut g = c.benchmark_group("profiler");
    let mut out = Vec::new();
    for batch in [1usize, 256, 4096] {
        let inputs: Vec<[u32; FEATURES]> = vectors.iter().cycle().take(batch).copied().collect();
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::new("onnx", batch), &inputs, |b, inputs| {
            b.iter(|| {
                out.clear();
                p.classify(black_box(inputs), &mut out).expect("inference");
                black_box(&out);
            })
        });
    }
    let tables = profiler::nic_tables(None).expect("built-in NIC tables");
    g.throughput(Throughput::Elements(vectors.len() as u64));
    let mut scratch = Vec::new();
    g.bench_function("nic_tables", |b| {
        b.iter(|| {
            for x in &vectors {
                black_box(tables.classify_with(black_box(x), &mut scratch));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
