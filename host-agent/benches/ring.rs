//! Table updates through the command ring, and register round trips, on the in-process
//! device and over a real vfio-user socket (the emulator served from a thread): the
//! driver writes batches of bucket → shard descriptors, rings the doorbell and waits
//! for the completions, as the rebalancer does; and per-flow lists (handoffs, class
//! pushes) of established flows, one list descriptor per batch.

use std::sync::{Arc, Mutex};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flowshard::device::{Device, InProcess, VfioUser};
use flowshard::driver::Nic;
use hdl_bindings::ring::{CmdDesc, Opcode};
use hw_sim::device::{DeviceOptions, NicDevice};
use hw_sim::generate::{FRAME_LEN, WIRE_LEN, write_frame};
use hw_sim::image::{build, dev_signing_key, sign};
use nic_firmware::pipeline::Packet;
use nic_firmware::{Class, FlowTuple, LinkType, PipelineConfig};

/// Established flows the list benchmarks name.
const FLOWS: u32 = 65_536;

/// Offer one packet of each of `FLOWS` flows to the device; their tuples.
fn establish(model: &Mutex<NicDevice>) -> Vec<FlowTuple> {
    let mut frame = [0u8; FRAME_LEN];
    let mut out = Vec::new();
    let mut dev = model.lock().expect("device");
    (0..FLOWS)
        .map(|f| {
            write_frame(f, &mut frame);
            let pkt = Packet {
                ts_ns: 1_000,
                data: &frame,
                wire_len: WIRE_LEN,
            };
            dev.receive(LinkType::Ethernet, &[pkt], &mut out);
            nic_firmware::parse::parse(LinkType::Ethernet, &frame, WIRE_LEN)
                .expect("generated frames parse")
                .tuple
        })
        .collect()
}

fn ready(mut nic: Nic<Box<dyn Device>>) -> Nic<Box<dyn Device>> {
    let img = sign(
        &build(&PipelineConfig::default(), 1).expect("build"),
        &dev_signing_key(),
    )
    .expect("sign");
    nic.flash(&img, 64 << 10, &mut |_, _| true).expect("flash");
    nic.setup_commands(12).expect("command ring");
    nic
}

fn bench(
    c: &mut Criterion,
    transport: &str,
    mut nic: Nic<Box<dyn Device>>,
    model: &Mutex<NicDevice>,
) {
    let tuples = establish(model);
    let mut g = c.benchmark_group(format!("command_ring/{transport}"));
    for batch in [64u32, 1024, 4096] {
        let descs: Vec<CmdDesc> = (0..batch)
            .map(|i| CmdDesc::new(Opcode::SetBucket, (i * 7919) % 65_536, i % 64))
            .collect();
        g.throughput(Throughput::Elements(batch.into()));
        g.bench_function(format!("set_bucket/batch_{batch}"), |b| {
            b.iter(|| nic.submit(&descs).expect("submit"))
        });
    }
    for batch in [1024usize, FLOWS as usize] {
        let handoffs: Vec<(FlowTuple, u16)> = tuples[..batch]
            .iter()
            .enumerate()
            .map(|(i, t)| (*t, (i % 4) as u16))
            .collect();
        let classes: Vec<(FlowTuple, Class)> = tuples[..batch]
            .iter()
            .enumerate()
            .map(|(i, t)| (*t, Class::ALL[i % Class::COUNT]))
            .collect();
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("hand_off_flows/list_{batch}"), |b| {
            b.iter(|| nic.hand_off_flows(&handoffs).expect("handoff"))
        });
        g.bench_function(format!("push_flow_classes/list_{batch}"), |b| {
            b.iter(|| nic.push_flow_classes(&classes).expect("classes"))
        });
    }
    g.finish();
    c.bench_function(&format!("register_write_read/{transport}"), |b| {
        let mut v = 0u32;
        b.iter(|| {
            v = v.wrapping_add(1);
            nic.round_trip(v).expect("round trip")
        })
    });
}

fn updates(c: &mut Criterion) {
    let dev = Arc::new(Mutex::new(NicDevice::new(DeviceOptions::default())));
    let nic = Nic::open(Box::new(InProcess::new(dev.clone())) as Box<dyn Device>).expect("open");
    bench(c, "in_process", ready(nic), &dev);

    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nic.sock");
    let dev = Arc::new(Mutex::new(NicDevice::new(DeviceOptions::default())));
    let (s, served) = (socket.clone(), dev.clone());
    std::thread::spawn(move || hw_sim::vfio_user_server::serve(&s, served));
    while !socket.exists() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let client = VfioUser::connect(&socket).expect("connect");
    let nic = Nic::open(Box::new(client) as Box<dyn Device>).expect("open");
    bench(c, "vfio_user", ready(nic), &dev);
}

criterion_group!(benches, updates);
criterion_main!(benches);
