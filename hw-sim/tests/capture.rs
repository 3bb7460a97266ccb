//! Tests for `hw_sim::capture`: byte-exact fixtures built here (written to a temp
//! dir), and the real captures fetched by the setup script when they are present.

use std::path::{Path, PathBuf};

use hw_sim::capture::{CaptureError, CaptureFormat, CaptureReader};
use nic_firmware::LinkType;

// ---------------------------------------------------------------------------
// Fixture builders
// ---------------------------------------------------------------------------

const MAGIC_US: u32 = 0xa1b2_c3d4;
const MAGIC_NS: u32 = 0xa1b2_3c4d;

/// Appends integers in a chosen byte order, like a capture writer on a host of
/// that endianness would.
struct Writer {
    bytes: Vec<u8>,
    big_endian: bool,
}

impl Writer {
    fn new(big_endian: bool) -> Self {
        Writer {
            bytes: Vec::new(),
            big_endian,
        }
    }

    fn u16(&mut self, v: u16) -> &mut Self {
        let b = if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.bytes.extend_from_slice(&b);
        self
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        let b = if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.bytes.extend_from_slice(&b);
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        let b = if self.big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.bytes.extend_from_slice(&b);
        self
    }

    fn raw(&mut self, data: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(data);
        self
    }

    fn pad4(&mut self) -> &mut Self {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
        self
    }
}

fn pcap_header(big_endian: bool, magic: u32, snaplen: u32, linktype: u32) -> Vec<u8> {
    let mut w = Writer::new(big_endian);
    w.u32(magic)
        .u16(2)
        .u16(4)
        .u32(0)
        .u32(0)
        .u32(snaplen)
        .u32(linktype);
    w.bytes
}

fn pcap_record(big_endian: bool, sec: u32, frac: u32, data: &[u8], orig_len: u32) -> Vec<u8> {
    let mut w = Writer::new(big_endian);
    w.u32(sec)
        .u32(frac)
        .u32(data.len() as u32)
        .u32(orig_len)
        .raw(data);
    w.bytes
}

/// pcapng option list: (code, value) pairs followed by opt_endofopt.
fn options(big_endian: bool, opts: &[(u16, Vec<u8>)]) -> Vec<u8> {
    if opts.is_empty() {
        return Vec::new();
    }
    let mut w = Writer::new(big_endian);
    for (code, value) in opts {
        w.u16(*code).u16(value.len() as u16).raw(value).pad4();
    }
    w.u16(0).u16(0);
    w.bytes
}

fn block(big_endian: bool, block_type: u32, body: &[u8]) -> Vec<u8> {
    let padded = body.len().div_ceil(4) * 4;
    let total = (12 + padded) as u32;
    let mut w = Writer::new(big_endian);
    w.u32(block_type).u32(total).raw(body).pad4().u32(total);
    w.bytes
}

fn shb(big_endian: bool) -> Vec<u8> {
    let mut w = Writer::new(big_endian);
    w.u32(0x1a2b_3c4d).u16(1).u16(0).u64(u64::MAX);
    w.raw(&options(big_endian, &[(4, b"flowshard tests".to_vec())]));
    block(big_endian, 0x0a0d_0d0a, &w.bytes)
}

fn idb(big_endian: bool, linktype: u16, snaplen: u32, opts: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut w = Writer::new(big_endian);
    w.u16(linktype).u16(0).u32(snaplen);
    w.raw(&options(big_endian, opts));
    block(big_endian, 1, &w.bytes)
}

fn epb(big_endian: bool, if_id: u32, ts: u64, data: &[u8], orig_len: u32) -> Vec<u8> {
    epb_with_options(big_endian, if_id, ts, data, orig_len, &[])
}

fn epb_with_options(
    big_endian: bool,
    if_id: u32,
    ts: u64,
    data: &[u8],
    orig_len: u32,
    opts: &[(u16, Vec<u8>)],
) -> Vec<u8> {
    let mut w = Writer::new(big_endian);
    w.u32(if_id)
        .u32((ts >> 32) as u32)
        .u32(ts as u32)
        .u32(data.len() as u32)
        .u32(orig_len)
        .raw(data)
        .pad4()
        .raw(&options(big_endian, opts));
    block(big_endian, 6, &w.bytes)
}

fn spb(big_endian: bool, orig_len: u32, data: &[u8]) -> Vec<u8> {
    let mut w = Writer::new(big_endian);
    w.u32(orig_len).raw(data);
    block(big_endian, 3, &w.bytes)
}

/// Interface Statistics Block: must be skipped silently.
fn isb(big_endian: bool) -> Vec<u8> {
    let mut w = Writer::new(big_endian);
    w.u32(0).u32(0).u32(0);
    block(big_endian, 5, &w.bytes)
}

/// Custom block (copiable), also skipped.
fn custom(big_endian: bool) -> Vec<u8> {
    let mut w = Writer::new(big_endian);
    w.u32(32473).raw(b"opaque");
    block(big_endian, 0x0000_0bad, &w.bytes)
}

fn if_tsresol(v: u8) -> (u16, Vec<u8>) {
    (9, vec![v])
}

fn if_tsoffset(big_endian: bool, secs: i64) -> (u16, Vec<u8>) {
    let v = if big_endian {
        secs.to_be_bytes()
    } else {
        secs.to_le_bytes()
    };
    (14, v.to_vec())
}

fn concat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// A packet-ish payload whose bytes identify it.
fn payload(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| tag.wrapping_add(i as u8)).collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn write(name: &str, bytes: &[u8]) -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write fixture");
    Fixture { _dir: dir, path }
}

#[derive(Debug, PartialEq)]
struct Owned {
    ts_ns: u64,
    link: LinkType,
    data: Vec<u8>,
    wire_len: u32,
    offset: u64,
}

/// Read the whole file: packets until the first error, and that error.
fn read_all(path: &Path) -> (Vec<Owned>, Option<CaptureError>) {
    let mut reader = CaptureReader::open(path).expect("open");
    let mut packets = Vec::new();
    loop {
        match reader.next_packet() {
            Ok(Some(p)) => packets.push(Owned {
                ts_ns: p.ts_ns,
                link: p.link,
                data: p.data.to_vec(),
                wire_len: p.wire_len,
                offset: p.offset,
            }),
            Ok(None) => return (packets, None),
            Err(e) => {
                assert!(
                    matches!(reader.next_packet(), Ok(None)),
                    "reader must be finished after an error"
                );
                return (packets, Some(e));
            }
        }
    }
}

fn read_ok(path: &Path) -> Vec<Owned> {
    let (packets, err) = read_all(path);
    assert!(err.is_none(), "unexpected error: {}", err.unwrap());
    packets
}

fn open_err(bytes: &[u8]) -> CaptureError {
    let f = write("bad.cap", bytes);
    CaptureReader::open(&f.path).expect_err("open must fail")
}

// ---------------------------------------------------------------------------
// Legacy pcap
// ---------------------------------------------------------------------------

fn three_packet_pcap(big_endian: bool, magic: u32) -> (Vec<u8>, [Vec<u8>; 3]) {
    let p = [payload(1, 60), payload(2, 1514), payload(3, 42)];
    let file = concat(&[
        pcap_header(big_endian, magic, 65535, 1),
        pcap_record(big_endian, 1_700_000_000, 123_456, &p[0], 60),
        pcap_record(big_endian, 1_700_000_001, 999_999, &p[1], 1514),
        pcap_record(big_endian, 1_700_000_002, 7, &p[2], 1000),
    ]);
    (file, p)
}

fn check_three(packets: &[Owned], p: &[Vec<u8>; 3], frac_ns: u64) {
    assert_eq!(packets.len(), 3);
    let offsets = [24, 24 + 16 + 60, 24 + 16 + 60 + 16 + 1514];
    let ts = [
        1_700_000_000 * 1_000_000_000 + 123_456 * frac_ns,
        1_700_000_001 * 1_000_000_000 + 999_999 * frac_ns,
        1_700_000_002 * 1_000_000_000 + 7 * frac_ns,
    ];
    let wire = [60, 1514, 1000];
    for i in 0..3 {
        assert_eq!(
            packets[i],
            Owned {
                ts_ns: ts[i],
                link: LinkType::Ethernet,
                data: p[i].clone(),
                wire_len: wire[i],
                offset: offsets[i],
            },
            "packet {i}"
        );
    }
}

#[test]
fn pcap_microseconds() {
    let (file, p) = three_packet_pcap(false, MAGIC_US);
    let f = write("us.pcap", &file);
    let reader = CaptureReader::open(&f.path).unwrap();
    assert_eq!(reader.format(), CaptureFormat::Pcap);
    assert_eq!(reader.path(), f.path);
    check_three(&read_ok(&f.path), &p, 1_000);
}

#[test]
fn pcap_nanoseconds() {
    let (file, p) = three_packet_pcap(false, MAGIC_NS);
    let f = write("ns.pcap", &file);
    check_three(&read_ok(&f.path), &p, 1);
}

#[test]
fn pcap_big_endian_microseconds() {
    let (file, p) = three_packet_pcap(true, MAGIC_US);
    assert_eq!(&file[..4], &[0xa1, 0xb2, 0xc3, 0xd4]);
    let f = write("be.pcap", &file);
    check_three(&read_ok(&f.path), &p, 1_000);
}

#[test]
fn pcap_big_endian_nanoseconds() {
    let (file, p) = three_packet_pcap(true, MAGIC_NS);
    let f = write("be-ns.pcap", &file);
    check_three(&read_ok(&f.path), &p, 1);
}

#[test]
fn pcap_link_types_and_fcs_bits() {
    for (raw, expected) in [
        (0, LinkType::Null),
        (101, LinkType::RawIp),
        (108, LinkType::Loop),
        (113, LinkType::LinuxSll),
        (276, LinkType::LinuxSll2),
        (147, LinkType::Unsupported(147)),
        // FCS-length bits in the upper half do not change the link type.
        (0x1400_0001, LinkType::Ethernet),
    ] {
        let file = concat(&[
            pcap_header(false, MAGIC_US, 0, raw),
            pcap_record(false, 1, 2, &[0x45, 0, 0, 20], 4),
        ]);
        let f = write("lt.pcap", &file);
        let packets = read_ok(&f.path);
        assert_eq!(packets.len(), 1);
        assert_eq!(packets[0].link, expected, "linktype {raw:#x}");
    }
}

#[test]
fn pcap_header_only_is_empty_capture() {
    let f = write("empty.pcap", &pcap_header(false, MAGIC_US, 65535, 1));
    let mut reader = CaptureReader::open(&f.path).unwrap();
    assert!(reader.next_packet().unwrap().is_none());
    assert!(reader.next_packet().unwrap().is_none());
}

#[test]
fn pcap_truncated_mid_record() {
    let (file, p) = three_packet_pcap(false, MAGIC_US);
    let third = 24 + 16 + 60 + 16 + 1514;
    // Cut inside the third record's data, then inside its header.
    for cut in [third + 16 + 10, third + 5] {
        let f = write("trunc.pcap", &file[..cut]);
        let (packets, err) = read_all(&f.path);
        assert_eq!(packets.len(), 2);
        assert_eq!(packets[0].data, p[0]);
        assert_eq!(packets[1].data, p[1]);
        match err {
            Some(CaptureError::Truncated { offset, .. }) => assert_eq!(offset, third as u64),
            other => panic!("expected Truncated, got {other:?}"),
        }
    }
}

#[test]
fn pcap_huge_caplen_is_corrupt() {
    let mut w = Writer::new(false);
    w.u32(1).u32(2).u32(1 << 30).u32(1 << 30).raw(&[0; 64]);
    let file = concat(&[
        pcap_header(false, MAGIC_US, 65535, 1),
        pcap_record(false, 1, 0, &payload(9, 100), 100),
        w.bytes,
    ]);
    let f = write("huge.pcap", &file);
    let (packets, err) = read_all(&f.path);
    assert_eq!(packets.len(), 1);
    match err {
        Some(CaptureError::Corrupt { offset, detail, .. }) => {
            assert_eq!(offset, 24 + 16 + 100);
            assert!(detail.contains("1073741824"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn pcap_caplen_above_snaplen_is_corrupt() {
    let file = concat(&[
        pcap_header(false, MAGIC_US, 96, 1),
        pcap_record(false, 1, 0, &payload(1, 96), 1500),
        pcap_record(false, 1, 0, &payload(2, 97), 1500),
    ]);
    let f = write("snap.pcap", &file);
    let (packets, err) = read_all(&f.path);
    assert_eq!(packets.len(), 1);
    match err {
        Some(CaptureError::Corrupt { offset, detail, .. }) => {
            assert_eq!(offset, 24 + 16 + 96);
            assert!(detail.contains("snapshot length 96"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn pcap_caplen_above_absurd_limit_with_zero_snaplen() {
    let big = vec![0u8; 256 * 1024 + 1];
    let file = concat(&[
        pcap_header(false, MAGIC_US, 0, 1),
        pcap_record(false, 1, 0, &big, big.len() as u32),
    ]);
    let f = write("big.pcap", &file);
    let (packets, err) = read_all(&f.path);
    assert!(packets.is_empty());
    assert!(
        matches!(err, Some(CaptureError::Corrupt { offset: 24, .. })),
        "{err:?}"
    );
}

#[test]
fn pcap_larger_than_buffer_streams_with_exact_offsets() {
    // ~6 MB: many buffer refills and shifts.
    let mut file = pcap_header(false, MAGIC_NS, 262_144, 1);
    let mut expected = Vec::new();
    for i in 0..4000u32 {
        let len = 60 + (i as usize * 37) % 3000;
        expected.push((file.len() as u64, len, i));
        file.extend(pcap_record(
            false,
            i,
            i * 3,
            &payload(i as u8, len),
            len as u32,
        ));
    }
    let f = write("long.pcap", &file);
    let packets = read_ok(&f.path);
    assert_eq!(packets.len(), expected.len());
    for (p, (offset, len, i)) in packets.iter().zip(expected) {
        assert_eq!(p.offset, offset);
        assert_eq!(p.data, payload(i as u8, len));
        assert_eq!(p.ts_ns, u64::from(i) * 1_000_000_000 + u64::from(i) * 3);
    }
}

// ---------------------------------------------------------------------------
// Not a capture / too short
// ---------------------------------------------------------------------------

#[test]
fn garbage_is_not_a_capture() {
    let err = open_err(b"this is certainly not a packet capture file\n");
    assert!(
        matches!(&err, CaptureError::NotACapture { detail, .. } if detail.contains("magic")),
        "{err:?}"
    );
    assert!(err.to_string().contains("not a pcap or pcapng file"));
}

#[test]
fn empty_and_tiny_files() {
    let err = open_err(&[]);
    assert!(
        matches!(&err, CaptureError::NotACapture { detail, .. } if detail.contains("empty")),
        "{err:?}"
    );
    assert!(matches!(
        open_err(&[0xd4, 0xc3]),
        CaptureError::NotACapture { .. }
    ));
    let header = pcap_header(false, MAGIC_US, 65535, 1);
    assert!(matches!(
        open_err(&header[..10]),
        CaptureError::Truncated { offset: 0, .. }
    ));
    let section = shb(false);
    assert!(matches!(
        open_err(&section[..20]),
        CaptureError::Truncated { offset: 0, .. }
    ));
}

#[test]
fn missing_file_is_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = CaptureReader::open(&dir.path().join("nope.pcap")).unwrap_err();
    assert!(matches!(err, CaptureError::Open { .. }), "{err:?}");
}

#[test]
fn directory_is_read_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = CaptureReader::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            CaptureError::Io { offset: 0, .. } | CaptureError::Open { .. }
        ),
        "{err:?}"
    );
}

#[test]
fn corrupt_section_header() {
    let mut section = shb(false);
    section[8..12].copy_from_slice(&[1, 2, 3, 4]); // byte-order magic
    assert!(matches!(
        open_err(&section),
        CaptureError::Corrupt { offset: 0, .. }
    ));
}

// ---------------------------------------------------------------------------
// pcapng
// ---------------------------------------------------------------------------

/// Two interfaces: 0 is Ethernet with the default µs resolution, 1 is raw IP with
/// if_tsresol = 9 (ns). Statistics and custom blocks are interleaved.
fn two_interface_pcapng(big_endian: bool) -> (Vec<u8>, Vec<Owned>) {
    let e = big_endian;
    let p0 = payload(10, 74);
    let p1 = payload(20, 41); // needs padding
    let p2 = payload(30, 128);
    let blocks = [
        shb(e),
        idb(e, 1, 65535, &[(2, b"eth0".to_vec())]),
        idb(e, 101, 0, &[if_tsresol(9)]),
        epb(e, 0, 1_700_000_000_123_456, &p0, 74),
        isb(e),
        epb(e, 1, 1_700_000_000_123_456_789, &p1, 41),
        custom(e),
        epb_with_options(
            e,
            0,
            1_700_000_001_000_001,
            &p2,
            1500,
            &[(1, b"hi".to_vec())],
        ),
    ];
    let mut offsets = Vec::new();
    let mut at = 0u64;
    for b in &blocks {
        offsets.push(at);
        at += b.len() as u64;
    }
    let expected = vec![
        Owned {
            ts_ns: 1_700_000_000_123_456_000,
            link: LinkType::Ethernet,
            data: p0,
            wire_len: 74,
            offset: offsets[3],
        },
        Owned {
            ts_ns: 1_700_000_000_123_456_789,
            link: LinkType::RawIp,
            data: p1,
            wire_len: 41,
            offset: offsets[5],
        },
        Owned {
            ts_ns: 1_700_000_001_000_001_000,
            link: LinkType::Ethernet,
            data: p2,
            wire_len: 1500,
            offset: offsets[7],
        },
    ];
    (concat(&blocks), expected)
}

#[test]
fn pcapng_two_interfaces_little_endian() {
    let (file, expected) = two_interface_pcapng(false);
    let f = write("two.pcapng", &file);
    assert_eq!(
        CaptureReader::open(&f.path).unwrap().format(),
        CaptureFormat::PcapNg
    );
    assert_eq!(read_ok(&f.path), expected);
}

#[test]
fn pcapng_two_interfaces_big_endian() {
    let (file, expected) = two_interface_pcapng(true);
    let f = write("two-be.pcapng", &file);
    assert_eq!(read_ok(&f.path), expected);
}

#[test]
fn pcapng_binary_resolution_and_offset() {
    for e in [false, true] {
        let file = concat(&[
            shb(e),
            // 2^-10 s units, 1_000_000_000 s offset.
            idb(
                e,
                113,
                0,
                &[if_tsresol(0x80 | 10), if_tsoffset(e, 1_000_000_000)],
            ),
            idb(e, 276, 0, &[if_tsresol(3), if_tsoffset(e, -5)]),
            epb(e, 0, (7 << 10) | 512, &[1, 2, 3], 3),
            epb(e, 1, 10_000, &[4], 1),
        ]);
        let f = write("res.pcapng", &file);
        let packets = read_ok(&f.path);
        assert_eq!(packets.len(), 2);
        assert_eq!(packets[0].ts_ns, 1_000_000_007_500_000_000);
        assert_eq!(packets[0].link, LinkType::LinuxSll);
        assert_eq!(packets[1].ts_ns, 5_000_000_000);
        assert_eq!(packets[1].link, LinkType::LinuxSll2);
    }
}

#[test]
fn pcapng_simple_packet_block() {
    let e = false;
    let data = payload(5, 100);
    let blocks = [
        shb(e),
        idb(e, 1, 64, &[]),
        epb(e, 0, 2_000_000, &data[..60], 60),
        spb(e, 100, &data), // snaplen 64 wins
        spb(e, 30, &data[..30]),
    ];
    let f = write("spb.pcapng", &concat(&blocks));
    let packets = read_ok(&f.path);
    assert_eq!(packets.len(), 3);
    assert_eq!(packets[1].data, &data[..64]);
    assert_eq!(packets[1].wire_len, 100);
    // No timestamp of its own: the previous packet's.
    assert_eq!(packets[1].ts_ns, 2_000_000_000);
    assert_eq!(packets[2].data, &data[..30]);
    assert_eq!(packets[2].wire_len, 30);
    let spb_offset = (blocks[0].len() + blocks[1].len() + blocks[2].len()) as u64;
    assert_eq!(packets[1].offset, spb_offset);
}

#[test]
fn pcapng_simple_packet_block_without_interface_is_corrupt() {
    let file = concat(&[shb(false), spb(false, 4, &[1, 2, 3, 4])]);
    let f = write("spb-noif.pcapng", &file);
    let (packets, err) = read_all(&f.path);
    assert!(packets.is_empty());
    let offset = shb(false).len() as u64;
    assert!(
        matches!(err, Some(CaptureError::Corrupt { offset: o, .. }) if o == offset),
        "{err:?}"
    );
}

#[test]
fn pcapng_unknown_interface_is_corrupt() {
    let e = false;
    let head = concat(&[shb(e), idb(e, 1, 0, &[]), epb(e, 0, 1, &[1, 2], 2)]);
    let file = concat(&[head.clone(), epb(e, 3, 1, &[1, 2], 2)]);
    let f = write("badif.pcapng", &file);
    let (packets, err) = read_all(&f.path);
    assert_eq!(packets.len(), 1);
    match err {
        Some(CaptureError::Corrupt { offset, detail, .. }) => {
            assert_eq!(offset, head.len() as u64);
            assert!(detail.contains("interface 3"), "{detail}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn pcapng_new_section_resets_interfaces_and_byte_order() {
    let first = concat(&[
        shb(false),
        idb(false, 1, 0, &[]),
        idb(false, 101, 0, &[]),
        epb(false, 1, 5, &[0x45], 1),
    ]);
    let second = concat(&[
        shb(true),
        idb(true, 113, 0, &[if_tsresol(9)]),
        epb(true, 0, 42, &[9, 9], 2),
    ]);
    let f = write("sections.pcapng", &concat(&[first.clone(), second.clone()]));
    let packets = read_ok(&f.path);
    assert_eq!(packets.len(), 2);
    assert_eq!(packets[0].link, LinkType::RawIp);
    assert_eq!(packets[0].ts_ns, 5_000);
    assert_eq!(packets[1].link, LinkType::LinuxSll);
    assert_eq!(packets[1].ts_ns, 42);
    assert_eq!(packets[1].data, [9, 9]);

    // Interface 1 of the first section does not exist in the second.
    let stale = epb(true, 1, 42, &[9, 9], 2);
    let f = write(
        "stale.pcapng",
        &concat(&[first.clone(), second.clone(), stale]),
    );
    let (packets, err) = read_all(&f.path);
    assert_eq!(packets.len(), 2);
    let at = (first.len() + second.len()) as u64;
    assert!(
        matches!(err, Some(CaptureError::Corrupt { offset, .. }) if offset == at),
        "{err:?}"
    );
}

#[test]
fn pcapng_truncated_mid_block() {
    let (file, expected) = two_interface_pcapng(false);
    let last = expected[2].offset as usize;
    for cut in [last + 3, last + 30, file.len() - 1] {
        let f = write("trunc.pcapng", &file[..cut]);
        let (packets, err) = read_all(&f.path);
        assert_eq!(packets[..], expected[..2], "cut {cut}");
        assert!(
            matches!(err, Some(CaptureError::Truncated { offset, .. }) if offset == last as u64),
            "cut {cut}: {err:?}"
        );
    }
}

#[test]
fn pcapng_block_inconsistent_inside_is_corrupt() {
    // An EPB whose caplen overruns its (complete) block.
    let e = false;
    let mut bad = epb(e, 0, 1, &[1, 2, 3, 4], 4);
    bad[20..24].copy_from_slice(&200u32.to_le_bytes());
    let head = concat(&[shb(e), idb(e, 1, 0, &[])]);
    let tail = epb(e, 0, 2, &[5], 1);
    let f = write("inner.pcapng", &concat(&[head.clone(), bad, tail]));
    let (packets, err) = read_all(&f.path);
    assert!(packets.is_empty());
    assert!(
        matches!(err, Some(CaptureError::Corrupt { offset, .. }) if offset == head.len() as u64),
        "{err:?}"
    );
}

#[test]
fn pcapng_huge_block_length_is_corrupt() {
    let e = false;
    let head = concat(&[shb(e), idb(e, 1, 0, &[])]);
    let mut w = Writer::new(e);
    w.u32(6).u32(1 << 30).raw(&[0; 40]);
    let f = write("hugeblock.pcapng", &concat(&[head.clone(), w.bytes]));
    let (packets, err) = read_all(&f.path);
    assert!(packets.is_empty());
    assert!(
        matches!(err, Some(CaptureError::Corrupt { offset, .. }) if offset == head.len() as u64),
        "{err:?}"
    );
}

#[test]
fn pcapng_block_larger_than_initial_buffer() {
    // A 2 MiB comment makes one EPB larger than the streaming buffer.
    let e = false;
    let comment = vec![b'x'; 60_000];
    let opts: Vec<(u16, Vec<u8>)> = (0..35).map(|_| (1, comment.clone())).collect();
    let big = epb_with_options(e, 0, 1, &payload(1, 1500), 1500, &opts);
    assert!(big.len() > 2_000_000);
    let head = concat(&[shb(e), idb(e, 1, 0, &[])]);
    let small = epb(e, 0, 2, &payload(2, 60), 60);
    let f = write(
        "bigblock.pcapng",
        &concat(&[head.clone(), small.clone(), big.clone(), small.clone()]),
    );
    let packets = read_ok(&f.path);
    assert_eq!(packets.len(), 3);
    assert_eq!(packets[1].data, payload(1, 1500));
    assert_eq!(packets[1].offset, (head.len() + small.len()) as u64);
    assert_eq!(
        packets[2].offset,
        (head.len() + small.len() + big.len()) as u64
    );
}

#[test]
fn pcapng_caplen_above_interface_snaplen_is_corrupt() {
    let e = true;
    let head = concat(&[shb(e), idb(e, 1, 32, &[])]);
    let f = write(
        "snap.pcapng",
        &concat(&[head.clone(), epb(e, 0, 1, &payload(0, 33), 33)]),
    );
    let (_, err) = read_all(&f.path);
    assert!(
        matches!(&err, Some(CaptureError::Corrupt { offset, detail, .. })
            if *offset == head.len() as u64 && detail.contains("snapshot length 32")),
        "{err:?}"
    );
}

#[test]
fn pcapng_bad_tsresol_is_corrupt() {
    let e = false;
    let file = concat(&[shb(e), idb(e, 1, 0, &[if_tsresol(20)])]);
    let f = write("res.pcapng", &file);
    let (_, err) = read_all(&f.path);
    assert!(matches!(err, Some(CaptureError::Corrupt { .. })), "{err:?}");
}

/// Every prefix and many single-byte corruptions of valid files must produce
/// packets and/or an error, never a panic or a hang.
#[test]
fn damaged_files_never_panic() {
    let (ng, _) = two_interface_pcapng(false);
    let (ng_be, _) = two_interface_pcapng(true);
    let (pcap, _) = three_packet_pcap(false, MAGIC_US);
    let pcap = pcap[..300].to_vec();
    for original in [ng, ng_be, pcap] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("damaged");
        let mut variants = Vec::new();
        for cut in 0..original.len() {
            variants.push(original[..cut].to_vec());
        }
        for i in 0..original.len() {
            for flip in [0xff, 0x80, 0x01] {
                let mut v = original.clone();
                v[i] ^= flip;
                variants.push(v);
            }
        }
        for v in variants {
            std::fs::write(&path, &v).unwrap();
            let Ok(mut reader) = CaptureReader::open(&path) else {
                continue;
            };
            let mut n = 0;
            while let Ok(Some(p)) = reader.next_packet() {
                assert!(p.data.len() <= v.len());
                n += 1;
                assert!(n <= v.len(), "reader does not terminate");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Real captures (fetched by the setup script, not committed)
// ---------------------------------------------------------------------------

fn real_dir() -> Option<PathBuf> {
    let base = std::env::var_os("FLOWSHARD_DATA")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/flowshard-data"))
        })?;
    let dir = base.join("ndpi/pcap");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "skipping real-capture test: {} not found (run the data setup script)",
            dir.display()
        );
        None
    }
}

struct Summary {
    format: CaptureFormat,
    count: usize,
    links: Vec<LinkType>,
    first_ts_ns: Option<u64>,
}

fn summarize(path: &Path) -> Result<Summary, CaptureError> {
    let mut reader = CaptureReader::open(path)?;
    let format = reader.format();
    let mut count = 0;
    let mut links = Vec::new();
    let mut first_ts_ns = None;
    let mut last_offset = None;
    while let Some(p) = reader.next_packet()? {
        count += 1;
        if !links.contains(&p.link) {
            links.push(p.link);
        }
        first_ts_ns.get_or_insert(p.ts_ns);
        assert!(last_offset < Some(p.offset), "offsets must increase");
        last_offset = Some(p.offset);
    }
    Ok(Summary {
        format,
        count,
        links,
        first_ts_ns,
    })
}

#[test]
fn real_captures_known_files() {
    let Some(dir) = real_dir() else { return };
    // (file, format, packets, link types, first timestamp in ns), cross-checked
    // with an independent Python reader.
    let cases: &[(&str, CaptureFormat, usize, &[LinkType], u64)] = &[
        (
            "1kxun.pcap",
            CaptureFormat::PcapNg,
            1439,
            &[LinkType::Ethernet],
            1_470_104_373_025_824_000,
        ),
        (
            "443-curl.pcap",
            CaptureFormat::Pcap,
            109,
            &[LinkType::Ethernet],
            1_581_113_120_474_299_000,
        ),
        (
            "BGP_redist.pcap",
            CaptureFormat::Pcap,
            2,
            &[LinkType::Unsupported(104)],
            1_256_636_836_167_156_000,
        ),
        (
            "KakaoTalk_chat.pcap",
            CaptureFormat::Pcap,
            347,
            &[LinkType::LinuxSll],
            1_430_069_021_959_113_000,
        ),
        (
            "ocs.pcap",
            CaptureFormat::Pcap,
            946,
            &[LinkType::RawIp],
            1_449_652_784_341_686_000,
        ),
        (
            "nats.pcap",
            CaptureFormat::Pcap,
            27,
            &[LinkType::Null],
            1_586_288_040_558_498_000,
        ),
        (
            "rdp.pcap",
            CaptureFormat::Pcap,
            2010,
            &[LinkType::Null],
            1_559_207_465_138_576_000,
        ),
        (
            "git.pcap",
            CaptureFormat::PcapNg,
            90,
            &[LinkType::Ethernet],
            1_460_821_630_164_056_846,
        ),
        (
            "kerberos_fuzz.pcapng",
            CaptureFormat::PcapNg,
            1,
            &[LinkType::RawIp],
            1_633_884_084_000_000_000,
        ),
        (
            "reasm_crash_anon.pcapng",
            CaptureFormat::PcapNg,
            209,
            &[LinkType::LinuxSll],
            1_410_865_705_717_955_000,
        ),
        (
            "dlt_ppp.pcap",
            CaptureFormat::Pcap,
            1,
            &[LinkType::Unsupported(9)],
            1_031_048_000,
        ),
        (
            "fuzz-2006-06-26-2594.pcap",
            CaptureFormat::Pcap,
            691,
            &[LinkType::Ethernet],
            1_120_469_540_839_312_000,
        ),
        (
            "mpeg.pcap",
            CaptureFormat::PcapNg,
            19,
            &[LinkType::Ethernet],
            1_434_379_491_040_018_000,
        ),
        (
            "doq.pcapng",
            CaptureFormat::PcapNg,
            20,
            &[LinkType::Ethernet],
            1_606_056_093_199_591_961,
        ),
        (
            "tor.pcap",
            CaptureFormat::PcapNg,
            3859,
            &[LinkType::Ethernet],
            1_383_821_660_212_806_000,
        ),
    ];
    for &(name, format, count, links, first_ts_ns) in cases {
        let path = dir.join(name);
        if !path.exists() {
            eprintln!("skipping {name}: not in {}", dir.display());
            continue;
        }
        let s = summarize(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (s.format, s.count, &s.links[..], s.first_ts_ns),
            (format, count, links, Some(first_ts_ns)),
            "{name}"
        );
    }
}

#[test]
fn real_captures_all_read_cleanly() {
    let Some(dir) = real_dir() else { return };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    entries.sort();
    let mut total = 0;
    let mut failures = Vec::new();
    for path in &entries {
        match summarize(path) {
            Ok(s) => total += s.count,
            Err(e) => failures.push(e.to_string()),
        }
    }
    eprintln!("{} capture files, {total} packets", entries.len());
    assert!(failures.is_empty(), "failures:\n{}", failures.join("\n"));
}
