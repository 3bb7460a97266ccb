//! The driver against the emulated NIC, end to end: flash, bad images, interrupted
//! flashes, boot fallback, command batches, telemetry. Every test runs over each
//! transport with the same driver code; the device model is shared with the test so it
//! can offer packets and look inside.

use std::sync::{Arc, Mutex};

use flowshard::device::{Device, InProcess, VfioUser};
use flowshard::driver::{Nic, NicError};
use hdl_bindings::image::{HEADER_LEN, ImageError, config_key_id};
use hdl_bindings::ring::{CmdDesc, FlowResult, Opcode, Scope, Status};
use hdl_bindings::telemetry::{EndReason, RecordKind};
use hw_sim::device::{DeviceOptions, NicDevice, TelemetryItem};
use hw_sim::dma::EventFd;
use hw_sim::generate::{FRAME_LEN, WIRE_LEN, write_frame};
use hw_sim::image::{build, build_with, dev_signing_key, sign};
use nic_firmware::pipeline::{Decision, Packet};
use nic_firmware::{Class, FlowTuple, LinkType, Pipeline, PipelineConfig};

/// A device model and a way to reach it.
struct Rig {
    model: Arc<Mutex<NicDevice>>,
    connect: Box<dyn Fn() -> Box<dyn Device>>,
    _socket_dir: Option<tempfile::TempDir>,
}

impl Rig {
    fn open(&self) -> Nic<Box<dyn Device>> {
        Nic::open((self.connect)()).unwrap()
    }

    /// Look at the running data plane, with the model locked.
    fn pipeline<T>(&self, f: impl FnOnce(&Pipeline) -> T) -> T {
        f(self.model.lock().unwrap().pipeline().unwrap())
    }

    /// Offer one packet of each of `flows` flows at time `ts_ns`.
    fn traffic(&self, flows: std::ops::Range<u32>, ts_ns: u64) -> Vec<Decision> {
        let mut frames = vec![[0u8; FRAME_LEN]; flows.len()];
        for (f, buf) in flows.zip(frames.iter_mut()) {
            write_frame(f, buf);
        }
        let pkts: Vec<Packet<'_>> = frames
            .iter()
            .map(|d| Packet {
                ts_ns,
                data: d,
                wire_len: WIRE_LEN,
            })
            .collect();
        let mut out = Vec::new();
        let mut dev = self.model.lock().unwrap();
        for burst in pkts.chunks(32) {
            dev.receive(LinkType::Ethernet, burst, &mut out);
        }
        out
    }
}

fn in_process(opts: DeviceOptions) -> Rig {
    let model = Arc::new(Mutex::new(NicDevice::new(opts)));
    let m = model.clone();
    Rig {
        model,
        connect: Box::new(move || Box::new(InProcess::new(m.clone())) as Box<dyn Device>),
        _socket_dir: None,
    }
}

/// The model served over a real vfio-user socket by a server thread, as
/// `flowshard nic-sim` serves it; every `connect` is a new client connection.
fn vfio_user(opts: DeviceOptions) -> Rig {
    let model = Arc::new(Mutex::new(NicDevice::new(opts)));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nic.sock");
    let (m, s) = (model.clone(), socket.clone());
    std::thread::spawn(move || hw_sim::vfio_user_server::serve(&s, m));
    for _ in 0..500 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Rig {
        model,
        connect: Box::new(move || Box::new(VfioUser::connect(&socket).unwrap()) as Box<dyn Device>),
        _socket_dir: Some(dir),
    }
}

/// Run `test` on a fresh device over every transport.
fn each_transport(opts: DeviceOptions, test: impl Fn(&Rig)) {
    test(&in_process(opts.clone()));
    test(&vfio_user(opts));
}

fn image(version: u32, config: &PipelineConfig) -> Vec<u8> {
    sign(&build(config, version).unwrap(), &dev_signing_key()).unwrap()
}

fn flash(
    nic: &mut Nic<Box<dyn Device>>,
    img: &[u8],
) -> Result<flowshard::driver::FlashReport, NicError> {
    nic.flash(img, 256, &mut |_, _| true)
}

fn rejected(r: Result<flowshard::driver::FlashReport, NicError>) -> ImageError {
    match r {
        Err(NicError::Rejected { error, .. }) => error,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn flash_an_image_and_status_shows_it() {
    each_transport(DeviceOptions::default(), |rig| {
        let mut nic = rig.open();
        let before = nic.status().unwrap();
        assert!(!before.running);
        assert_eq!(before.image_version, 0);
        assert!(before.signature_required);
        let report = flash(&mut nic, &image(3, &PipelineConfig::default())).unwrap();
        assert_eq!(
            (report.slot, report.image_version, report.previous_version),
            ('B', 3, 0)
        );
        let s = nic.status().unwrap();
        assert!(s.running && !s.fell_back);
        assert_eq!((s.slot, s.image_version), ('B', 3));
        assert_eq!(s.buckets, 65_536);
        assert_eq!(s.shards, 64);
        assert_eq!(s.nodes, 4);
        assert!(s.flow_capacity >= 1 << 20);
        assert!(s.slot_b.valid && s.slot_b.version == 3 && !s.slot_a.valid);
        assert_eq!(s.pending, None);
        // A second image goes to the other slot; the first stays as the fallback.
        let small = PipelineConfig {
            buckets: 1024,
            ..PipelineConfig::default()
        };
        flash(&mut nic, &image(4, &small)).unwrap();
        let s = nic.status().unwrap();
        assert_eq!((s.slot, s.image_version, s.buckets), ('A', 4, 1024));
        assert!(s.slot_a.valid && s.slot_b.valid && s.slot_b.version == 3);
        nic.round_trip(0xdead_beef).unwrap();
        rig.traffic(0..10, 1_000);
        let s = nic.status().unwrap();
        assert_eq!(
            (s.packets, s.forwarded, s.flows_created, s.flows_active),
            (10, 10, 10, 10)
        );
        assert_eq!(s.nic_time_ns, 1_000);
    });
}

#[test]
fn every_kind_of_bad_image_is_rejected_and_the_device_is_untouched() {
    each_transport(DeviceOptions::default(), |rig| {
        let mut nic = rig.open();
        let good = image(1, &PipelineConfig::default());
        flash(&mut nic, &good).unwrap();
        rig.traffic(0..100, 1_000);
        let before = nic.status().unwrap();
        let mut cases: Vec<(&str, Vec<u8>, ImageError)> = Vec::new();
        cases.push((
            "truncated",
            good[..good.len() / 2].to_vec(),
            ImageError::Truncated {
                len: good.len() as u32 / 2,
            },
        ));
        let mut b = good.clone();
        b[..8].copy_from_slice(b"NOTANIMG");
        cases.push(("wrong magic", b, ImageError::BadMagic));
        let mut b = good.clone();
        b[8] = 9;
        cases.push((
            "unsupported version",
            b,
            ImageError::UnsupportedVersion { major: 9 },
        ));
        let mut b = good.clone();
        b[HEADER_LEN + 8] ^= 0x40;
        let computed = crc32c(&b[HEADER_LEN..good.len() - 80]);
        cases.push(("bad payload CRC", b, ImageError::BadPayloadCrc { computed }));
        let mut b = good.clone();
        b[24] ^= 1;
        let computed = crc32c(&b[..60]);
        cases.push(("bad header CRC", b, ImageError::BadHeaderCrc { computed }));
        let unsigned = build(&PipelineConfig::default(), 1).unwrap();
        cases.push((
            "missing signature",
            unsigned.clone(),
            ImageError::MissingSignature,
        ));
        let mut b = good.clone();
        let n = b.len();
        b[n - 5] ^= 1;
        cases.push(("bad signature", b, ImageError::BadSignature));
        let foreign = sign(&unsigned, &ed25519_dalek::SigningKey::from_bytes(&[7; 32])).unwrap();
        let id = ed25519_dalek::SigningKey::from_bytes(&[7; 32])
            .verifying_key()
            .to_bytes();
        cases.push((
            "untrusted key",
            foreign,
            ImageError::UntrustedKey {
                key_id: u32::from_be_bytes([id[0], id[1], id[2], id[3]]),
            },
        ));
        for (offset, key, value) in [
            (HEADER_LEN, "flow_capacity", 0u32),
            (HEADER_LEN + 4, "buckets", 1000),
            (HEADER_LEN + 4, "buckets", 1 << 30),
        ] {
            let mut b = unsigned.clone();
            b[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
            cases.push((
                "out-of-range table size",
                resealed_and_signed(b),
                ImageError::OutOfRange {
                    key: config_key_id(key),
                },
            ));
        }
        cases.push((
            "too large",
            vec![0; (1 << 20) + 1],
            ImageError::TooLarge { len: (1 << 20) + 1 },
        ));
        for (what, img, want) in cases {
            let err = rejected(flash(&mut nic, &img));
            assert_eq!(err, want, "{what}");
            let after = nic.status().unwrap();
            assert_eq!(
                (
                    after.running,
                    after.image_version,
                    after.slot,
                    after.slot_b,
                    after.pending,
                    after.flows_active,
                    after.resets
                ),
                (
                    before.running,
                    before.image_version,
                    before.slot,
                    before.slot_b,
                    before.pending,
                    before.flows_active,
                    before.resets
                ),
                "{what}: the device changed"
            );
        }
        let msg = rejected(flash(&mut nic, &good[..10])).to_string();
        assert!(msg.contains("truncated image: 10 bytes"), "{msg}");
        // Still flashable afterwards.
        flash(&mut nic, &image(2, &PipelineConfig::default())).unwrap();
    });
}

/// An unsigned image changed after it was built, with its payload and header CRCs made
/// right again and signed: only the device's checks of the contents can refuse it.
fn resealed_and_signed(mut b: Vec<u8>) -> Vec<u8> {
    let crc = crc32c(&b[HEADER_LEN..]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    let crc = crc32c(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    sign(&b, &dev_signing_key()).unwrap()
}

fn crc32c(b: &[u8]) -> u32 {
    // The CRC32C (Castagnoli) reference: bitwise, reflected, as RFC 3720 defines it.
    let mut crc = !0u32;
    for &byte in b {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn a_flash_stopped_midway_leaves_a_bootable_device() {
    each_transport(DeviceOptions::default(), |rig| {
        let mut nic = rig.open();
        flash(&mut nic, &image(1, &PipelineConfig::default())).unwrap();
        let big = PipelineConfig {
            port_rules: (0..2000)
                .map(|i| nic_firmware::config::PortRule {
                    proto: 6,
                    ports: [i, i],
                    class: nic_firmware::Class::Web,
                })
                .collect(),
            ..PipelineConfig::default()
        };
        let img = image(2, &big);
        // A vfio-user device serves one client at a time, as a PCI function has one driver.
        drop(nic);
        for stop_after in [256, img.len() / 2, img.len() - 1] {
            let mut nic = rig.open();
            let err = nic
                .flash(&img, 256, &mut |done, _| done < stop_after)
                .unwrap_err();
            assert!(matches!(err, NicError::Interrupted { .. }), "{err}");
            drop(nic);
            // A new driver finds the old image running, and it survives a reset.
            let mut nic = rig.open();
            let s = nic.status().unwrap();
            assert_eq!(
                (s.running, s.image_version, s.slot, s.pending),
                (true, 1, 'B', None)
            );
            nic.reset().unwrap();
            let s = nic.status().unwrap();
            assert_eq!((s.running, s.image_version, s.fell_back), (true, 1, false));
        }
        // The connection closing mid-flash (the process killed) is the same as stopping.
        let mut nic = rig.open();
        assert_eq!(flash(&mut nic, &img).unwrap().image_version, 2);
    });
}

#[test]
fn an_image_that_does_not_boot_falls_back_to_the_last_good_one() {
    let opts = DeviceOptions {
        memory_bytes: 256 << 20,
        ..DeviceOptions::default()
    };
    each_transport(opts, |rig| {
        let mut nic = rig.open();
        flash(&mut nic, &image(1, &PipelineConfig::default())).unwrap();
        let huge = PipelineConfig {
            flow_capacity: 1 << 24,
            ..PipelineConfig::default()
        };
        match flash(&mut nic, &image(2, &huge)) {
            Err(NicError::BootFailed {
                version: 2,
                slot: 'B',
                running: 1,
                ..
            }) => {}
            other => panic!("expected a boot failure, got {other:?}"),
        }
        let s = nic.status().unwrap();
        assert!(s.running && s.fell_back);
        assert_eq!((s.image_version, s.slot), (1, 'B'));
        assert_eq!(
            rig.traffic(0..10, 5).len(),
            10,
            "the fallback image forwards traffic"
        );
    });
}

#[test]
fn command_batches_apply_whole_or_not_at_all() {
    each_transport(DeviceOptions::default(), |rig| {
        let mut nic = rig.open();
        nic.setup_commands(4).unwrap();
        let nop = [CmdDesc::new(Opcode::Nop, 0, 0)];
        assert_eq!(nic.submit(&nop).unwrap(), vec![Status::NotRunning]);
        nic.setup_commands(0).unwrap_err();
        flash(&mut nic, &image(1, &PipelineConfig::default())).unwrap();
        nic.submit(&nop).unwrap_err(); // a reset tears the ring down
        nic.setup_commands(7).unwrap();
        let shards_before = rig.pipeline(|p| p.shard_table().to_vec());
        // Move every shard to node 0, but the last descriptor names a missing node.
        let mut batch: Vec<CmdDesc> = (0..64)
            .map(|s| CmdDesc::new(Opcode::SetShardNode, s, 0))
            .collect();
        batch.push(CmdDesc::new(Opcode::SetShardNode, 0, 99));
        let statuses = nic.submit(&batch).unwrap();
        assert_eq!(statuses[64], Status::BadArgument);
        assert!(statuses[..64].iter().all(|s| *s == Status::Aborted));
        let shards_after = rig.pipeline(|p| p.shard_table().to_vec());
        assert_eq!(
            shards_before, shards_after,
            "nothing of a failed batch applies"
        );
        for d in rig.traffic(0..500, 1_000) {
            assert_eq!(d.node, shards_before[d.shard as usize]);
        }
        // The same batch without the bad descriptor applies in one epoch.
        batch.pop();
        assert!(nic.submit(&batch).unwrap().iter().all(|s| *s == Status::Ok));
        assert!(rig.pipeline(|p| p.shard_table().iter().all(|n| *n == 0)));
        for d in rig.traffic(1_000..1_500, 2_000) {
            assert_eq!(d.node, 0, "new flows follow the committed batch");
        }
        // Bucket, node-state, class and unknown opcodes.
        let st = nic
            .submit(&[
                CmdDesc::new(Opcode::SetBucket, 5, 63),
                CmdDesc::new(Opcode::SetNodeState, 2, 1),
                CmdDesc::new(Opcode::SetClassGroup, 0, 4),
            ])
            .unwrap();
        assert!(st.iter().all(|s| *s == Status::Ok), "{st:?}");
        assert_eq!(rig.pipeline(|p| p.bucket_table()[5]), 63);
        let bad = CmdDesc {
            opcode: 77.into(),
            ..CmdDesc::default()
        };
        assert_eq!(nic.submit(&[bad]).unwrap(), vec![Status::BadOpcode]);
        for args in [
            (Opcode::SetBucket, 65_536, 0),
            (Opcode::SetBucket, 0, 64),
            (Opcode::SetNodeState, 1, 3),
            (Opcode::SetClassGroup, 7, 1),
            (Opcode::SetClassGroup, 0, 9),
        ] {
            assert_eq!(
                nic.submit(&[CmdDesc::new(args.0, args.1, args.2)]).unwrap(),
                vec![Status::BadArgument],
                "{args:?}"
            );
        }
        let s = nic.status().unwrap();
        assert_eq!(s.command_ring.epoch_or_overflow, 2);
        assert_eq!(s.command_ring.errors, 65 + 1 + 5);
        // Many batches wrap the ring.
        for round in 0..10u32 {
            let batch: Vec<CmdDesc> = (0..100)
                .map(|b| CmdDesc::new(Opcode::SetBucket, b + round, round % 64))
                .collect();
            assert!(nic.submit(&batch).unwrap().iter().all(|s| *s == Status::Ok));
        }
        assert_eq!(nic.status().unwrap().command_ring.epoch_or_overflow, 12);
    });
}

#[test]
fn telemetry_carries_feature_records_snapshots_and_counts_overflow() {
    each_transport(DeviceOptions::default(), |rig| {
        let mut nic = rig.open();
        flash(&mut nic, &image(1, &PipelineConfig::default())).unwrap();
        let irq = EventFd::new().unwrap();
        nic.setup_telemetry(10, 1_000, &irq).unwrap();
        for i in 0..8 {
            rig.traffic(0..20, 10_000 + i * 100);
        }
        assert!(irq.wait(1000).unwrap() > 0, "the telemetry interrupt fired");
        let t = nic.poll_telemetry().unwrap();
        assert_eq!(t.unreadable, 0);
        let early = t
            .items
            .iter()
            .filter(|i| matches!(i, TelemetryItem::Record(r) if r.kind == RecordKind::Early))
            .count();
        assert_eq!(early, 20, "one early record per flow after N = 8 packets");
        let device: Vec<_> = t
            .items
            .iter()
            .filter_map(|i| match i {
                TelemetryItem::Counters(c) if c.scope == Scope::Device as u8 => Some(*c),
                _ => None,
            })
            .collect();
        assert_eq!(
            device.len(),
            1,
            "one snapshot: NIC time moved less than the period after it"
        );
        assert_eq!(device[0].packets.get(), 20);
        rig.model.lock().unwrap().flush();
        let t = nic.poll_telemetry().unwrap();
        let ends = t.items.iter().filter(|i| matches!(i, TelemetryItem::Record(r) if r.kind == RecordKind::End && r.end_reason == EndReason::Flushed)).count();
        assert_eq!(ends, 20);
        // A ring of 4 entries overflows; the loss is counted, not silent.
        nic.setup_telemetry(2, 0, &irq).unwrap();
        for i in 0..8 {
            rig.traffic(100..120, 1_000_000 + i * 100);
        }
        let s = nic.status().unwrap();
        assert_eq!(s.telemetry_ring.head, 4);
        assert_eq!(s.telemetry_ring.epoch_or_overflow, 16);
        assert_eq!(nic.poll_telemetry().unwrap().items.len(), 4);
    });
}

/// The wire tuple of generated flow `f` (as `Rig::traffic` sends it).
fn tuple_of(f: u32) -> FlowTuple {
    let mut frame = [0u8; FRAME_LEN];
    write_frame(f, &mut frame);
    nic_firmware::parse::parse(LinkType::Ethernet, &frame, WIRE_LEN)
        .unwrap()
        .tuple
}

#[test]
fn flow_handoffs_pins_and_classes_travel_the_ring_as_lists() {
    each_transport(DeviceOptions::default(), |rig| {
        let mut nic = rig.open();
        flash(&mut nic, &image(1, &PipelineConfig::default())).unwrap();
        nic.setup_commands(4).unwrap();
        let first = rig.traffic(0..200, 1_000);
        // Hand off the even flows to the next node; flow 9999 is not tracked.
        let mut list: Vec<(FlowTuple, u16)> = (0..200)
            .step_by(2)
            .map(|f| (tuple_of(f), (first[f as usize].node + 1) % 4))
            .collect();
        list.push((tuple_of(9_999), 0));
        let results = nic.hand_off_flows(&list).unwrap();
        assert!(results[..100].iter().all(|r| *r == FlowResult::Applied));
        assert_eq!(results[100], FlowResult::NoSuchFlow);
        let pending = |rig: &Rig| rig.pipeline(Pipeline::pending_hand_offs);
        assert_eq!(pending(rig), 100);
        // Inside the flowlet (100 µs later) nothing moves; after the gap, exactly the
        // handed-off flows do.
        for (d, before) in rig.traffic(0..200, 101_000).iter().zip(&first) {
            assert_eq!(d.node, before.node);
        }
        for (f, (d, before)) in rig
            .traffic(0..200, 1_000_000)
            .iter()
            .zip(&first)
            .enumerate()
        {
            let want = if f % 2 == 0 {
                (before.node + 1) % 4
            } else {
                before.node
            };
            assert_eq!(d.node, want, "flow {f}");
        }
        assert_eq!(pending(rig), 0);
        // An undefined node refuses the whole list: nothing of it is scheduled.
        let bad = [(tuple_of(1), 2), (tuple_of(3), 99)];
        let e = nic.hand_off_flows(&bad).unwrap_err();
        assert!(
            matches!(
                e,
                NicError::Refused {
                    status: Status::BadNode,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("flow handoff refused, nothing applied: a list entry names a node the image does not define"),
            "{e}"
        );
        assert_eq!(pending(rig), 0);
        // Pins move at once; classes reach flows and counters.
        let node = (first[1].node + 2) % 4;
        assert_eq!(
            nic.pin_flows(&[(tuple_of(1).reversed(), node)]).unwrap(),
            [FlowResult::Applied]
        );
        assert_eq!(rig.traffic(1..2, 1_000_100)[0].node, node);
        let classes: Vec<(FlowTuple, Class)> =
            (0..50).map(|f| (tuple_of(f), Class::Video)).collect();
        let r = nic.push_flow_classes(&classes).unwrap();
        assert!(r.iter().all(|r| *r == FlowResult::Applied));
        rig.pipeline(|p| {
            let c = p.counters();
            assert_eq!(c.classes[Class::Video as usize].flows, 50);
            assert_eq!(
                (c.flows_handed_off, c.flows_pinned, c.class_pushes),
                (100, 1, 50)
            );
        });
        assert_eq!(nic.hand_off_flows(&[]).unwrap(), []);
        let s = nic.status().unwrap();
        assert_eq!(s.command_ring.errors, 1);
    });
}

#[test]
fn classifier_tables_load_and_clear_through_the_ring() {
    each_transport(DeviceOptions::default(), |rig| {
        let mut nic = rig.open();
        flash(&mut nic, &image(1, &PipelineConfig::default())).unwrap();
        nic.setup_commands(4).unwrap();
        let tables = flowshard::profiler::nic_tables(None).unwrap();
        assert_eq!(tables.packets(), PipelineConfig::default().feature_packets);
        nic.load_classifier(Some(&tables)).unwrap();
        let loaded = rig.pipeline(|p| p.classifier().unwrap().to_bytes());
        assert_eq!(loaded, tables.to_bytes());
        for i in 0..8 {
            rig.traffic(0..10, 1_000 + i * 1_000);
        }
        let on_nic = rig.pipeline(|p| p.counters().flows_classified_on_nic);
        assert_eq!(on_nic, 10, "every flow classified on the NIC at packet N");
        // Tables for another N are refused; the loaded ones stay.
        let other = nic_firmware::profile::ClassifierTables::from_bytes(&{
            let mut b = tables.to_bytes();
            b[6] = 4;
            b
        })
        .unwrap();
        let e = nic.load_classifier(Some(&other)).unwrap_err();
        assert!(
            matches!(
                e,
                NicError::Refused {
                    status: Status::BadClassifier,
                    ..
                }
            ),
            "{e}"
        );
        assert!(rig.pipeline(|p| p.classifier().is_some()));
        nic.load_classifier(None).unwrap();
        assert!(rig.pipeline(|p| p.classifier().is_none()));
    });
}

#[test]
fn an_image_carries_classifier_tables_and_a_corrupt_section_changes_nothing() {
    each_transport(DeviceOptions::default(), |rig| {
        let mut nic = rig.open();
        let config = PipelineConfig::default();
        let tables = flowshard::profiler::nic_tables(None).unwrap();
        let with = sign(
            &build_with(&config, 2, Some(&tables)).unwrap(),
            &dev_signing_key(),
        )
        .unwrap();
        let report = nic.flash(&with, 64 << 10, &mut |_, _| true).unwrap();
        assert_eq!(report.image_version, 2);
        let loaded = rig.pipeline(|p| p.classifier().unwrap().to_bytes());
        assert_eq!(loaded, tables.to_bytes(), "booted with the image's tables");
        for i in 0..8 {
            rig.traffic(0..5, 1_000 + i * 1_000);
        }
        let on_nic = |rig: &Rig| rig.pipeline(|p| p.counters().flows_classified_on_nic);
        assert_eq!(on_nic(rig), 5);
        let before = nic.status().unwrap();
        // Damage the tables' header, then make both CRCs and the signature right: only
        // the device's check of the tables can refuse it.
        let unsigned = build_with(&config, 3, Some(&tables)).unwrap();
        let tables_at = unsigned.len() - tables.to_bytes().len();
        for (at, value, what) in [(tables_at, b'Z', "magic"), (tables_at + 6, 4, "N")] {
            let mut b = unsigned.clone();
            b[at] = value;
            let bad = resealed_and_signed(b);
            let err = rejected(nic.flash(&bad, 64 << 10, &mut |_, _| true));
            match what {
                "magic" => assert_eq!(
                    err,
                    ImageError::BadClassifier {
                        offset: tables_at as u32
                    }
                ),
                _ => assert_eq!(
                    err.to_string(),
                    "image configuration out of range: `classifier.packets`"
                ),
            }
            let after = nic.status().unwrap();
            assert_eq!(
                (after.image_version, after.slot, after.pending, after.resets),
                (
                    before.image_version,
                    before.slot,
                    before.pending,
                    before.resets
                ),
                "{what}: the device changed"
            );
            assert!(rig.pipeline(|p| p.classifier().is_some()));
        }
        // The message a user sees names the problem and says nothing changed.
        let e = NicError::Rejected {
            device: "x".into(),
            error: ImageError::BadClassifier {
                offset: tables_at as u32,
            },
        }
        .to_string();
        assert!(
            e.contains("corrupt classifier tables in the image")
                && e.contains("active image untouched"),
            "{e}"
        );
    });
}
