//! Replay real captures (nDPI's test set, training list) through the emulated NIC and
//! check every packet's decision against an independent parse and hash.
//!
//! The captures are fetched by `scripts/setup.sh` into `$FLOWSHARD_DATA`; `make test`
//! always fetches them, so these tests only skip (with a notice) when run by hand
//! without the data.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use flowshard::replay::{ReplayOptions, replay};
use hw_sim::capture::CaptureReader;
use nic_firmware::rss::{MS_RSS_KEY, toeplitz_reference};
use nic_firmware::{LinkType, PipelineConfig};

fn data_dir() -> Option<PathBuf> {
    let d = flowshard::profiler::data_dir().join("ndpi/pcap");
    if d.is_dir() {
        Some(d)
    } else {
        eprintln!(
            "SKIP: no captures at {} (run scripts/setup.sh)",
            d.display()
        );
        None
    }
}

/// etherparse's view of a packet: source, destination, ports (none for fragments and
/// port-less protocols) and IP protocol.
struct Reference {
    src: String,
    dst: String,
    ports: Option<(u16, u16)>,
    proto: u8,
}

/// Canonical 5-tuple of a logged row: protocol and both endpoints, lower first.
type FlowId = (String, String, String, String, String);

/// Independent view of a packet: etherparse's parse, as (src, dst, ports or none).
fn reference_tuple(link: LinkType, data: &[u8]) -> Option<Reference> {
    let sliced = match link {
        LinkType::Ethernet => SlicedPacket::from_ethernet(data).ok()?,
        LinkType::LinuxSll => SlicedPacket::from_linux_sll(data).ok()?,
        LinkType::RawIp => SlicedPacket::from_ip(data).ok()?,
        LinkType::Null | LinkType::Loop => SlicedPacket::from_ip(data.get(4..)?).ok()?,
        LinkType::LinuxSll2 => SlicedPacket::from_ip(data.get(20..)?).ok()?,
        LinkType::Unsupported(_) => return None,
    };
    let (src, dst, proto, fragmented) = match sliced.net? {
        NetSlice::Ipv4(ip) => {
            let h = ip.header();
            (
                h.source_addr().to_string(),
                h.destination_addr().to_string(),
                h.protocol().0,
                h.is_fragmenting_payload(),
            )
        }
        NetSlice::Ipv6(ip) => {
            let h = ip.header();
            (
                h.source_addr().to_string(),
                h.destination_addr().to_string(),
                ip.payload().ip_number.0,
                ip.is_payload_fragmented(),
            )
        }
        _ => return None,
    };
    let ports = match (&sliced.transport, fragmented) {
        (Some(TransportSlice::Tcp(t)), false) => Some((t.source_port(), t.destination_port())),
        (Some(TransportSlice::Udp(u)), false) => Some((u.source_port(), u.destination_port())),
        _ => None,
    };
    Some(Reference {
        src,
        dst,
        ports,
        proto,
    })
}

fn addr_bytes(s: &str) -> Vec<u8> {
    match s.parse::<std::net::IpAddr>().expect("address in the log") {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    }
}

#[test]
fn every_decision_matches_an_independent_parse_and_hash() {
    let Some(dir) = data_dir() else { return };
    let mut captures: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("data dir")
        .map(|e| e.expect("entry").path())
        .collect();
    captures.sort();
    assert!(captures.len() > 100, "expected the nDPI training captures");
    let tmp = tempfile::tempdir().expect("tmp");
    let (mut compared, mut forwarded, mut total) = (0u64, 0u64, 0u64);
    for cap in &captures {
        let log = tmp.path().join("d.csv");
        let (summary, err) = replay(&ReplayOptions {
            pcap: cap.clone(),
            config: PipelineConfig::default(),
            decisions: Some(log.clone()),
        })
        .unwrap_or_else(|e| panic!("{}: {e}", cap.display()));
        assert!(err.is_none(), "{}: {err:?}", cap.display());
        let text = std::fs::read_to_string(&log).expect("log");
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect())
            .collect();
        assert_eq!(rows.len() as u64, summary.packets, "{}", cap.display());
        let mut node_of_flow: HashMap<FlowId, (String, u64)> = HashMap::new();
        let mut reader = CaptureReader::open(cap).expect("open");
        let mut i = 0;
        while let Some(pkt) = reader.next_packet().expect("readable") {
            let row = &rows[i];
            assert_eq!(row.len(), 13);
            assert_eq!(row[0], i.to_string());
            assert_eq!(row[1], pkt.ts_ns.to_string());
            total += 1;
            if row[12] == "forward" {
                forwarded += 1;
                // Recompute the wire hash from the logged tuple with the bit-serial reference.
                let (src, dst) = (addr_bytes(row[3]), addr_bytes(row[5]));
                let has_ports = matches!(row[2], "tcp" | "udp")
                    && reference_tuple(pkt.link, pkt.data).is_none_or(|r| r.ports.is_some());
                let mut input = [src.clone(), dst.clone()].concat();
                if has_ports {
                    input.extend_from_slice(&row[4].parse::<u16>().unwrap().to_be_bytes());
                    input.extend_from_slice(&row[6].parse::<u16>().unwrap().to_be_bytes());
                }
                let want = format!("{:08x}", toeplitz_reference(&MS_RSS_KEY, &input));
                assert_eq!(row[7], want, "{} packet {i}: rss_hash", cap.display());
                let hash = u32::from_str_radix(row[7], 16).unwrap();
                assert_eq!(row[8], (hash & 0xffff).to_string(), "bucket");
                // Both directions of a 5-tuple land on one node (default config: no
                // table changes, no sharded classes).
                let (a, b) = if (row[3], row[4]) <= (row[5], row[6]) {
                    ((row[3], row[4]), (row[5], row[6]))
                } else {
                    ((row[5], row[6]), (row[3], row[4]))
                };
                let key = (
                    row[2].to_string(),
                    a.0.to_string(),
                    a.1.to_string(),
                    b.0.to_string(),
                    b.1.to_string(),
                );
                // A flow idle past a timeout ends and may return as a new flow (from the
                // other side, so another bucket); within 2 s — the shortest default
                // timeout — it cannot have ended.
                let (node, last) = node_of_flow
                    .entry(key)
                    .or_insert_with(|| (row[10].to_string(), pkt.ts_ns));
                if pkt.ts_ns.saturating_sub(*last) > 2_000_000_000 {
                    *node = row[10].to_string();
                }
                *last = pkt.ts_ns;
                assert_eq!(
                    node,
                    row[10],
                    "{} packet {i}: flow changed node",
                    cap.display()
                );
                if let Some(r) = reference_tuple(pkt.link, pkt.data) {
                    compared += 1;
                    assert_eq!(
                        (row[3], row[5]),
                        (r.src.as_str(), r.dst.as_str()),
                        "{} packet {i}",
                        cap.display()
                    );
                    if let Some((sp, dp)) = r.ports {
                        assert_eq!(
                            (row[4], row[6]),
                            (sp.to_string().as_str(), dp.to_string().as_str()),
                            "{} packet {i}",
                            cap.display()
                        );
                    }
                    let proto = match row[2] {
                        "tcp" => 6,
                        "udp" => 17,
                        "icmp" => 1,
                        "icmpv6" => 58,
                        n => n.parse().unwrap(),
                    };
                    assert_eq!(proto, r.proto, "{} packet {i}", cap.display());
                }
            } else {
                assert_eq!((row[9], row[10]), ("", ""), "dropped packets name no node");
            }
            i += 1;
        }
        assert_eq!(i, rows.len());
    }
    eprintln!("{total} packets, {forwarded} forwarded, {compared} checked against etherparse");
    assert!(
        compared as f64 > 0.9 * forwarded as f64,
        "most forwarded packets were cross-checked"
    );
}

#[test]
fn a_truncated_capture_reports_what_it_read_then_names_the_offset() {
    let Some(dir) = data_dir() else { return };
    let src = dir.join("netflix.pcap");
    let bytes = std::fs::read(&src).expect("netflix.pcap");
    let tmp = tempfile::tempdir().expect("tmp");
    let cut = tmp.path().join("cut.pcap");
    // Cut in the middle of some record past the first megabyte.
    std::fs::write(&cut, &bytes[..1_000_003]).expect("write");
    let whole = replay(&ReplayOptions {
        pcap: src,
        config: PipelineConfig::default(),
        decisions: None,
    })
    .expect("whole");
    let (summary, err) = replay(&ReplayOptions {
        pcap: cut.clone(),
        config: PipelineConfig::default(),
        decisions: None,
    })
    .expect("replay runs");
    let err = err.expect("truncation is an error").to_string();
    assert!(err.contains("cut.pcap") && err.contains("offset"), "{err}");
    assert!(summary.packets > 0 && summary.packets < whole.0.packets);
    assert_eq!(summary.error.as_deref(), Some(err.as_str()));
}

#[test]
fn replay_is_deterministic() {
    let Some(dir) = data_dir() else { return };
    let run = |p: &Path| {
        let (s, _) = replay(&ReplayOptions {
            pcap: p.to_owned(),
            config: PipelineConfig::default(),
            decisions: None,
        })
        .expect("replay");
        serde_json::to_string(&s).expect("json")
    };
    let cap = dir.join("skype.pcap");
    assert_eq!(run(&cap), run(&cap));
}
