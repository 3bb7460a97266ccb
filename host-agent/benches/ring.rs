//! Table updates through the command ring, and register round trips, on the in-process
//! device: the driver writes batches of bucket → shard descriptors, rings the doorbell
//! and waits for the completions, as the rebalancer does.

use std::sync::{Arc, Mutex};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flowshard::device::InProcess;
use flowshard::driver::Nic;
use hdl_bindings::ring::{CmdDesc, Opcode};
use hw_sim::device::{DeviceOptions, NicDevice};
use hw_sim::image::{build, dev_signing_key, sign};
use nic_firmware::PipelineConfig;

fn nic() -> Nic<InProcess> {
    let dev = Arc::new(Mutex::new(NicDevice::new(DeviceOptions::default())));
    let mut nic = Nic::open(InProcess::new(dev)).expect("open");
    let img = sign(
        &build(&PipelineConfig::default(), 1).expect("build"),
        &dev_signing_key(),
    )
    .expect("sign");
    nic.flash(&img, 64 << 10, &mut |_, _| true).expect("flash");
    nic.setup_commands(12).expect("command ring");
    nic
}

fn updates(c: &mut Criterion) {
    let mut nic = nic();
    let mut g = c.benchmark_group("command_ring");
    for batch in [64u32, 1024, 4096] {
        let descs: Vec<CmdDesc> = (0..batch)
            .map(|i| CmdDesc::new(Opcode::SetBucket, (i * 7919) % 65_536, i % 64))
            .collect();
        g.throughput(Throughput::Elements(batch.into()));
        g.bench_function(format!("set_bucket/batch_{batch}"), |b| {
            b.iter(|| nic.submit(&descs).expect("submit"))
        });
    }
    g.finish();
    c.bench_function("register_round_trip/in_process", |b| {
        let mut v = 0u32;
        b.iter(|| {
            v = v.wrapping_add(1);
            nic.round_trip(v).expect("round trip")
        })
    });
}

criterion_group!(benches, updates);
criterion_main!(benches);
