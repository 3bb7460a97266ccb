//! Packet parsing: link layer, VLAN/QinQ, IPv4/IPv6, TCP/UDP/ICMP.

/// The link layer a frame starts with. A NIC port sees only Ethernet; the others let
/// the emulated NIC replay captures taken on other link types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LinkType {
    /// Ethernet II (with 802.1Q / 802.1ad tags).
    Ethernet,
    /// Raw IP: the version nibble says IPv4 or IPv6.
    RawIp,
    /// Linux cooked capture v1 (16-byte header, protocol at offset 14).
    LinuxSll,
    /// Linux cooked capture v2 (20-byte header, protocol at offset 0).
    LinuxSll2,
    /// BSD loopback (`DLT_NULL`): 4-byte address family in the capturing host's byte order.
    Null,
    /// OpenBSD loopback (`DLT_LOOP`): 4-byte address family in network byte order.
    Loop,
    /// Anything else; every packet gets [`crate::Verdict::UnsupportedLink`].
    Unsupported(u32),
}

use crate::{FlowTuple, Verdict, ipproto, ipv4_addr};

/// What the parser extracts from a packet for the rest of the pipeline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The tuple as seen on the wire, source first.
    pub tuple: FlowTuple,
    /// TCP flags (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10, ...); 0 otherwise.
    pub tcp_flags: u8,
    /// IP packet length (IPv4 total length, IPv6 40 + payload length): the size the
    /// feature records and byte counters use, the same whatever the link layer.
    pub ip_len: u32,
    /// An IPv4 or IPv6 fragment: hashed and tracked on addresses only, as RSS does,
    /// so the first and later fragments of one datagram stay together.
    pub fragment: bool,
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const ETHERTYPE_QINQ_OLD: u16 = 0x9100;
/// More stacked tags than this is not traffic a NIC port sees; treated as malformed.
const MAX_VLAN_TAGS: usize = 3;
/// IPv6 extension headers walked before giving up (RFC 8200 allows each at most once or twice).
const MAX_IPV6_EXT_HEADERS: usize = 8;

/// BSD address families for IPv6 differ by OS (NetBSD/OpenBSD 24, FreeBSD 28, macOS 30).
const AF_INET: u32 = 2;
const AF_INET6: [u32; 3] = [24, 28, 30];

#[inline(always)]
fn be16(d: &[u8], at: usize) -> Option<u16> {
    d.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// Parse one frame. `wire_len` is the frame's length on the wire; `data` may be
/// shorter (a capture's snap length), which is not an error as long as the headers
/// the NIC needs are present.
#[inline(always)]
pub fn parse(link: LinkType, data: &[u8], wire_len: u32) -> Result<Parsed, Verdict> {
    if link == LinkType::Ethernet
        && let Some(p) = ethernet_ipv4_fast(data, wire_len)
    {
        return Ok(p.parsed());
    }
    parse_general(link, data, wire_len)
}

/// The common packet — untagged Ethernet, IPv4 without options, not a fragment, TCP or
/// UDP — as 16 bytes of scalars, which a caller gets in registers.
///
/// Why not [`Parsed`]: its tuple keeps addresses as 16-byte arrays, which the
/// compiler builds on the stack with narrow stores and the connection-table key then
/// reads back as whole words; a load spanning several stores cannot be forwarded from
/// them and waits for them to retire. That stall cost more than all of the parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastIpv4 {
    /// Source and destination address, in network byte order (as on the wire).
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    /// IPv4 total length.
    pub ip_len: u16,
    pub proto: u8,
    pub tcp_flags: u8,
}

impl FastIpv4 {
    /// The same packet as the general parser reports it.
    #[inline(always)]
    pub fn parsed(&self) -> Parsed {
        Parsed {
            tuple: FlowTuple {
                src: ipv4_addr(self.src),
                dst: ipv4_addr(self.dst),
                sport: self.sport,
                dport: self.dport,
                proto: self.proto,
                ipv6: false,
                has_ports: true,
            },
            tcp_flags: self.tcp_flags,
            ip_len: u32::from(self.ip_len),
            fragment: false,
        }
    }
}

/// Every link type, tag stack, IP version, option and extension header, and every
/// verdict. Kept out of line: it is the rare path, and inlined it would crowd the
/// fast path's caller.
#[inline(never)]
pub(crate) fn parse_general(link: LinkType, data: &[u8], wire_len: u32) -> Result<Parsed, Verdict> {
    let (ethertype, l3) = match link {
        LinkType::Ethernet => ethernet(data)?,
        LinkType::RawIp => match data.first() {
            Some(b) if b >> 4 == 4 => (ETHERTYPE_IPV4, 0),
            Some(b) if b >> 4 == 6 => (ETHERTYPE_IPV6, 0),
            Some(_) => return Err(Verdict::BadIpVersion),
            None => return Err(Verdict::TruncatedL3),
        },
        LinkType::LinuxSll => (be16(data, 14).ok_or(Verdict::TruncatedL2)?, 16),
        LinkType::LinuxSll2 => {
            if data.len() < 20 {
                return Err(Verdict::TruncatedL2);
            }
            (be16(data, 0).ok_or(Verdict::TruncatedL2)?, 20)
        }
        LinkType::Null | LinkType::Loop => {
            let b: [u8; 4] = match data.get(..4) {
                Some(b) => [b[0], b[1], b[2], b[3]],
                None => return Err(Verdict::TruncatedL2),
            };
            let af = if link == LinkType::Loop {
                u32::from_be_bytes(b)
            } else {
                // Host byte order of the capturing machine: the family is small, so
                // whichever order gives a small number is the right one.
                let le = u32::from_le_bytes(b);
                if le <= 0xffff {
                    le
                } else {
                    u32::from_be_bytes(b)
                }
            };
            let ethertype = if af == AF_INET {
                ETHERTYPE_IPV4
            } else if AF_INET6.contains(&af) {
                ETHERTYPE_IPV6
            } else {
                return Err(Verdict::NonIp);
            };
            (ethertype, 4)
        }
        LinkType::Unsupported(_) => return Err(Verdict::UnsupportedLink),
    };
    let l3_data = data.get(l3..).ok_or(Verdict::TruncatedL2)?;
    let l3_wire = (wire_len as usize).saturating_sub(l3);
    match ethertype {
        ETHERTYPE_IPV4 => ipv4(l3_data, l3_wire),
        ETHERTYPE_IPV6 => ipv6(l3_data, l3_wire),
        _ => Err(Verdict::NonIp),
    }
}

/// Bytes of an untagged Ethernet frame up to the end of an option-less IPv4 header
/// and a TCP header without options (the largest fixed header the fast path reads).
const FAST_HEADERS: usize = 14 + 20 + 20;

/// The common case in one step: untagged Ethernet, IPv4 without options, not a
/// fragment, TCP or UDP. One bounds check on a fixed-size header view replaces the
/// general path's per-field checks. Anything else — including every malformed packet
/// — returns `None` and takes the general path, which alone decides verdicts, so the
/// two can never disagree on what is valid.
#[inline(always)]
pub fn ethernet_ipv4_fast(data: &[u8], wire_len: u32) -> Option<FastIpv4> {
    let h: &[u8; FAST_HEADERS] = data.get(..FAST_HEADERS)?.try_into().ok()?;
    if h[12..14] != ETHERTYPE_IPV4.to_be_bytes() || h[14] != 0x45 {
        return None;
    }
    let total = u32::from(u16::from_be_bytes([h[16], h[17]]));
    // Not a fragment (MF clear, offset 0), and a total length within the frame.
    if h[20] & 0x3f != 0 || h[21] != 0 || total < 20 || total + 14 > wire_len {
        return None;
    }
    let proto = h[23];
    let l4 = &h[34..];
    let payload = total - 20;
    let tcp_flags = match proto {
        ipproto::TCP => {
            let doff = u32::from(l4[12] >> 4) * 4;
            if doff < 20 || doff > payload {
                return None;
            }
            l4[13]
        }
        ipproto::UDP => {
            let len = u32::from(u16::from_be_bytes([l4[4], l4[5]]));
            if len < 8 || len > payload {
                return None;
            }
            0
        }
        _ => return None,
    };
    Some(FastIpv4 {
        src: [h[26], h[27], h[28], h[29]],
        dst: [h[30], h[31], h[32], h[33]],
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        ip_len: total as u16,
        proto,
        tcp_flags,
    })
}

/// Ethernet II with up to [`MAX_VLAN_TAGS`] 802.1Q/802.1ad tags; returns the inner
/// ethertype and the offset of the L3 header.
#[inline(always)]
fn ethernet(d: &[u8]) -> Result<(u16, usize), Verdict> {
    let mut ethertype = be16(d, 12).ok_or(Verdict::TruncatedL2)?;
    let mut off = 14;
    let mut tags = 0;
    while matches!(
        ethertype,
        ETHERTYPE_VLAN | ETHERTYPE_QINQ | ETHERTYPE_QINQ_OLD
    ) {
        if tags == MAX_VLAN_TAGS {
            return Err(Verdict::TruncatedL2);
        }
        ethertype = be16(d, off + 2).ok_or(Verdict::TruncatedL2)?;
        off += 4;
        tags += 1;
    }
    Ok((ethertype, off))
}

#[inline(always)]
fn ipv4(d: &[u8], wire: usize) -> Result<Parsed, Verdict> {
    if d.len() < 20 {
        return Err(Verdict::TruncatedL3);
    }
    if d[0] >> 4 != 4 {
        return Err(Verdict::BadIpVersion);
    }
    let ihl = ((d[0] & 0x0f) as usize) * 4;
    if ihl < 20 || ihl > d.len() {
        return Err(Verdict::BadIhl);
    }
    let mut total = u16::from_be_bytes([d[2], d[3]]) as usize;
    if total == 0 {
        // A capture taken on a host before TCP segmentation offload holds super-frames
        // whose total length is 0 (Wireshark reads them the same way): the frame's
        // length is the packet's. On a NIC port this never occurs.
        total = wire.min(usize::from(u16::MAX));
    }
    if total < ihl || total > wire {
        return Err(Verdict::BadIpLen);
    }
    let frag = u16::from_be_bytes([d[6], d[7]]);
    let fragment = frag & 0x3fff != 0; // MF set or a non-zero offset
    let mut p = Parsed {
        tuple: FlowTuple {
            src: ipv4_addr([d[12], d[13], d[14], d[15]]),
            dst: ipv4_addr([d[16], d[17], d[18], d[19]]),
            proto: d[9],
            ..FlowTuple::default()
        },
        tcp_flags: 0,
        ip_len: total as u32,
        fragment,
    };
    if !fragment {
        // The L4 payload is bounded by the IP total length, not by Ethernet padding.
        let l4 = &d[ihl..total.min(d.len())];
        l4_header(&mut p, l4, total - ihl)?;
    }
    Ok(p)
}

#[inline(always)]
fn ipv6(d: &[u8], wire: usize) -> Result<Parsed, Verdict> {
    if d.len() < 40 {
        return Err(Verdict::TruncatedL3);
    }
    if d[0] >> 4 != 6 {
        return Err(Verdict::BadIpVersion);
    }
    let payload = u16::from_be_bytes([d[4], d[5]]) as usize;
    // Payload length 0 is a jumbogram (RFC 2675) only with a hop-by-hop option; a NIC
    // port never sees one, so it is a length error like any other mismatch.
    if 40 + payload > wire {
        return Err(Verdict::BadIpLen);
    }
    let mut t = FlowTuple {
        ipv6: true,
        ..FlowTuple::default()
    };
    t.src.copy_from_slice(&d[8..24]);
    t.dst.copy_from_slice(&d[24..40]);
    let end = (40 + payload).min(d.len());
    let mut next = d[6];
    let mut off = 40;
    let mut fragment = false;
    let mut walked = 0;
    loop {
        match next {
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6:
            // length in 8-octet units, not counting the first 8.
            0 | 43 | 60 | 135 | 139 | 140 => {
                let h = d.get(off..off + 2).ok_or(Verdict::BadIpv6Ext)?;
                next = h[0];
                off += 8 + (h[1] as usize) * 8;
            }
            // Fragment header: fixed 8 bytes.
            44 => {
                let h = d.get(off..off + 4).ok_or(Verdict::BadIpv6Ext)?;
                next = h[0];
                let fo = u16::from_be_bytes([h[2], h[3]]);
                fragment |= fo & 0xfff9 != 0; // offset or M flag
                off += 8;
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let h = d.get(off..off + 2).ok_or(Verdict::BadIpv6Ext)?;
                next = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            _ => break,
        }
        walked += 1;
        if walked > MAX_IPV6_EXT_HEADERS || off > 40 + payload {
            return Err(Verdict::BadIpv6Ext);
        }
    }
    t.proto = next;
    let mut p = Parsed {
        tuple: t,
        tcp_flags: 0,
        ip_len: 40 + payload as u32,
        fragment,
    };
    if !fragment {
        let l4 = d.get(off..end).unwrap_or(&[]);
        l4_header(&mut p, l4, 40 + payload - off)?;
    }
    Ok(p)
}

/// Read the L4 header of a non-fragment: `l4` is what was captured of the IP payload,
/// `ip_payload` its length according to the IP header.
#[inline(always)]
fn l4_header(p: &mut Parsed, l4: &[u8], ip_payload: usize) -> Result<(), Verdict> {
    match p.tuple.proto {
        ipproto::TCP => {
            if ip_payload < 20 {
                return Err(Verdict::BadL4Len);
            }
            if l4.len() < 20 {
                return Err(Verdict::TruncatedL4);
            }
            let doff = ((l4[12] >> 4) as usize) * 4;
            if doff < 20 || doff > ip_payload {
                return Err(Verdict::BadL4Len);
            }
            p.tuple.sport = u16::from_be_bytes([l4[0], l4[1]]);
            p.tuple.dport = u16::from_be_bytes([l4[2], l4[3]]);
            p.tuple.has_ports = true;
            p.tcp_flags = l4[13];
        }
        ipproto::UDP => {
            if ip_payload < 8 {
                return Err(Verdict::BadL4Len);
            }
            if l4.len() < 8 {
                return Err(Verdict::TruncatedL4);
            }
            let len = u16::from_be_bytes([l4[4], l4[5]]) as usize;
            if len < 8 || len > ip_payload {
                return Err(Verdict::BadL4Len);
            }
            p.tuple.sport = u16::from_be_bytes([l4[0], l4[1]]);
            p.tuple.dport = u16::from_be_bytes([l4[2], l4[3]]);
            p.tuple.has_ports = true;
        }
        ipproto::ICMP | ipproto::ICMPV6 => {
            if ip_payload < 4 {
                return Err(Verdict::BadL4Len);
            }
            if l4.len() < 4 {
                return Err(Verdict::TruncatedL4);
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipv4_addr as v4;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn tcp4(payload: &[u8]) -> std::vec::Vec<u8> {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([10, 0, 0, 1], [192, 0, 2, 9], 64)
            .tcp(40000, 443, 1, 1024)
            .syn();
        let mut v = std::vec::Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    fn whole(link: LinkType, d: &[u8]) -> Result<Parsed, Verdict> {
        parse(link, d, d.len() as u32)
    }

    #[test]
    fn ethernet_ipv4_tcp() {
        let pkt = tcp4(b"hello");
        let p = whole(LinkType::Ethernet, &pkt).unwrap();
        assert_eq!(p.tuple.src, v4([10, 0, 0, 1]));
        assert_eq!(p.tuple.dst, v4([192, 0, 2, 9]));
        assert_eq!(
            (p.tuple.sport, p.tuple.dport, p.tuple.proto),
            (40000, 443, 6)
        );
        assert!(p.tuple.has_ports && !p.tuple.ipv6 && !p.fragment);
        assert_eq!(p.tcp_flags, 0x02);
        assert_eq!(p.ip_len, 20 + 20 + 5);
    }

    #[test]
    fn vlan_and_qinq_tags_are_skipped() {
        let mut v = std::vec::Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .double_vlan(
                etherparse::VlanId::try_new(100).unwrap(),
                etherparse::VlanId::try_new(200).unwrap(),
            )
            .ipv4([1, 2, 3, 4], [5, 6, 7, 8], 64)
            .udp(53, 5353)
            .write(&mut v, &[0; 12])
            .unwrap();
        let p = whole(LinkType::Ethernet, &v).unwrap();
        assert_eq!(
            (p.tuple.sport, p.tuple.dport, p.tuple.proto),
            (53, 5353, 17)
        );
        let mut single = tcp4(&[]);
        single.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
        assert_eq!(whole(LinkType::Ethernet, &single).unwrap().tuple.dport, 443);
        // Four stacked tags is not traffic a port sees.
        let mut deep = tcp4(&[]);
        for _ in 0..4 {
            deep.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
        }
        assert_eq!(whole(LinkType::Ethernet, &deep), Err(Verdict::TruncatedL2));
    }

    #[test]
    fn ipv4_options_are_skipped() {
        let mut pkt = tcp4(&[]);
        // Grow the header by one word of NOP options and fix IHL and total length.
        pkt.splice(34..34, [1, 1, 1, 1]);
        pkt[14] = 0x46;
        let total = u16::from_be_bytes([pkt[16], pkt[17]]) + 4;
        pkt[16..18].copy_from_slice(&total.to_be_bytes());
        let p = whole(LinkType::Ethernet, &pkt).unwrap();
        assert_eq!((p.tuple.sport, p.tuple.dport), (40000, 443));
    }

    #[test]
    fn ipv6_with_extension_headers_and_fragments() {
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let mut v = std::vec::Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv6(src, dst, 64)
            .udp(1000, 2000)
            .write(&mut v, &[1, 2, 3])
            .unwrap();
        // Insert a hop-by-hop header (8 bytes) in front of UDP.
        let mut hbh = v.clone();
        hbh.splice(54..54, [17, 0, 1, 4, 0, 0, 0, 0]);
        hbh[20] = 0; // next header: hop-by-hop
        let plen = u16::from_be_bytes([hbh[18], hbh[19]]) + 8;
        hbh[18..20].copy_from_slice(&plen.to_be_bytes());
        let p = whole(LinkType::Ethernet, &hbh).unwrap();
        assert!(p.tuple.ipv6);
        assert_eq!((p.tuple.src, p.tuple.dst), (src, dst));
        assert_eq!(
            (p.tuple.sport, p.tuple.dport, p.tuple.proto),
            (1000, 2000, 17)
        );
        // A fragment header with offset 0 and M set: a fragment, addresses only.
        let mut frag = v.clone();
        frag.splice(54..54, [17, 0, 0, 1, 0, 0, 0, 7]);
        frag[20] = 44;
        frag[18..20].copy_from_slice(&plen.to_be_bytes());
        let p = whole(LinkType::Ethernet, &frag).unwrap();
        assert!(p.fragment && !p.tuple.has_ports);
        assert_eq!((p.tuple.sport, p.tuple.dport, p.tuple.proto), (0, 0, 17));
        // An extension header running past the payload.
        let mut bad = hbh.clone();
        bad[55] = 200;
        assert_eq!(whole(LinkType::Ethernet, &bad), Err(Verdict::BadIpv6Ext));
    }

    #[test]
    fn ipv4_fragments_hash_on_addresses() {
        let mut pkt = tcp4(b"x");
        pkt[20] = 0x20; // MF
        let p = whole(LinkType::Ethernet, &pkt).unwrap();
        assert!(p.fragment && !p.tuple.has_ports);
        assert_eq!(p.tuple.sport, 0);
    }

    #[test]
    fn icmp_and_other_protocols() {
        let mut v = std::vec::Vec::new();
        PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4([1, 1, 1, 1], [2, 2, 2, 2], 64)
            .icmpv4_echo_request(7, 1)
            .write(&mut v, &[0; 8])
            .unwrap();
        let p = whole(LinkType::Ethernet, &v).unwrap();
        assert_eq!((p.tuple.proto, p.tuple.has_ports), (1, false));
        // GRE (47): no ports, no L4 checks.
        let mut gre = tcp4(&[]);
        gre[23] = 47;
        let p = whole(LinkType::Ethernet, &gre).unwrap();
        assert_eq!((p.tuple.proto, p.tuple.sport), (47, 0));
    }

    #[test]
    fn every_malformation_has_its_reason() {
        let pkt = tcp4(b"abc");
        let eth = LinkType::Ethernet;
        assert_eq!(whole(eth, &pkt[..10]), Err(Verdict::TruncatedL2));
        assert_eq!(whole(eth, &pkt[..30]), Err(Verdict::TruncatedL3));
        // Cut inside TCP by the snap length: the headers the NIC needs are missing.
        let snap = parse(eth, &pkt[..40], pkt.len() as u32);
        assert_eq!(snap, Err(Verdict::TruncatedL4));
        // Cut on the wire: the IP length claims more than arrived.
        assert_eq!(whole(eth, &pkt[..40]), Err(Verdict::BadIpLen));
        let mut v = pkt.clone();
        v[14] = 0x65;
        assert_eq!(whole(eth, &v), Err(Verdict::BadIpVersion));
        let mut v = pkt.clone();
        v[14] = 0x44;
        assert_eq!(whole(eth, &v), Err(Verdict::BadIhl));
        let mut v = pkt.clone();
        v[16..18].copy_from_slice(&1000u16.to_be_bytes());
        assert_eq!(whole(eth, &v), Err(Verdict::BadIpLen));
        let mut v = pkt.clone();
        v[46] = 0x40; // TCP data offset 4 words
        assert_eq!(whole(eth, &v), Err(Verdict::BadL4Len));
        let mut arp = pkt.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(whole(eth, &arp), Err(Verdict::NonIp));
        assert_eq!(
            whole(LinkType::Unsupported(147), &pkt),
            Err(Verdict::UnsupportedLink)
        );
    }

    #[test]
    fn tso_super_frames_take_the_frame_length() {
        let mut pkt = tcp4(&[0u8; 3000]);
        pkt[16..18].copy_from_slice(&[0, 0]);
        let p = whole(LinkType::Ethernet, &pkt).unwrap();
        assert_eq!(p.ip_len as usize, pkt.len() - 14);
    }

    #[test]
    fn snap_length_cuts_are_not_errors() {
        let pkt = tcp4(&[0u8; 1000]);
        // Captured 54 bytes of a 1054-byte frame: all headers present.
        let p = parse(LinkType::Ethernet, &pkt[..54], pkt.len() as u32).unwrap();
        assert_eq!(p.ip_len, 1040);
    }

    #[test]
    fn cooked_raw_and_loopback_links() {
        let pkt = tcp4(&[]);
        let ip = &pkt[14..];
        let want = whole(LinkType::Ethernet, &pkt).unwrap();
        assert_eq!(whole(LinkType::RawIp, ip).unwrap(), want);
        let mut sll = std::vec![0u8; 14];
        sll.extend_from_slice(&[0x08, 0x00]);
        sll.extend_from_slice(ip);
        assert_eq!(whole(LinkType::LinuxSll, &sll).unwrap(), want);
        let mut sll2 = std::vec![0x08, 0x00];
        sll2.extend_from_slice(&[0u8; 18]);
        sll2.extend_from_slice(ip);
        assert_eq!(whole(LinkType::LinuxSll2, &sll2).unwrap(), want);
        for af in [2u32.to_le_bytes(), 2u32.to_be_bytes()] {
            let mut null = af.to_vec();
            null.extend_from_slice(ip);
            assert_eq!(whole(LinkType::Null, &null).unwrap(), want);
        }
        let mut lo = 2u32.to_be_bytes().to_vec();
        lo.extend_from_slice(ip);
        assert_eq!(whole(LinkType::Loop, &lo).unwrap(), want);
        assert_eq!(
            whole(LinkType::LinuxSll2, &sll2[..10]),
            Err(Verdict::TruncatedL2)
        );
    }

    fn any_link() -> impl Strategy<Value = LinkType> {
        prop_oneof![
            Just(LinkType::Ethernet),
            Just(LinkType::RawIp),
            Just(LinkType::LinuxSll),
            Just(LinkType::LinuxSll2),
            Just(LinkType::Null),
            Just(LinkType::Loop),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(link in any_link(), data in proptest::collection::vec(any::<u8>(), 0..200), extra in 0u32..3000) {
            let _ = parse(link, &data, data.len() as u32 + extra);
            let _ = parse(link, &data, 0);
        }

        /// Damaging a valid packet anywhere never panics either (reaches deeper paths
        /// than random bytes do).
        #[test]
        fn mutated_packets_never_panic(at in 0usize..80, val in any::<u8>(), cut in 0usize..80) {
            let mut pkt = tcp4(b"payload");
            let at = at % pkt.len();
            pkt[at] = val;
            pkt.truncate(cut.max(1).min(pkt.len()));
            let _ = parse(LinkType::Ethernet, &pkt, 1500);
        }

        /// The fast path accepts only what the general path accepts, with the same
        /// result, on valid and damaged TCP and UDP frames alike.
        #[test]
        fn fast_path_agrees_with_the_general_path(udp in any::<bool>(), len in 0usize..40, at in 0usize..60, val in any::<u8>(), damage in any::<bool>(), cut in 40usize..120, wire_extra in 0u32..4) {
            let mut pkt = if udp {
                let mut v = std::vec::Vec::new();
                PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64).udp(53, 4000).write(&mut v, &std::vec![0u8; len]).unwrap();
                v
            } else {
                tcp4(&std::vec![0u8; len])
            };
            if damage {
                let at = at % pkt.len();
                pkt[at] = val;
            }
            let wire = pkt.len() as u32 + wire_extra;
            pkt.truncate(cut.min(pkt.len()));
            if let Some(fast) = ethernet_ipv4_fast(&pkt, wire) {
                prop_assert_eq!(Ok(fast.parsed()), parse_general(LinkType::Ethernet, &pkt, wire));
            } else if !damage && cut >= 54 {
                // An undamaged option-less frame with its headers captured always
                // takes the fast path.
                prop_assert!(pkt.len() < FAST_HEADERS, "fast path refused a valid frame");
            }
        }

        /// Differential check against etherparse on packets it builds.
        #[test]
        fn agrees_with_etherparse(src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), sport in any::<u16>(), dport in any::<u16>(), udp in any::<bool>(), len in 0usize..64) {
            let mut v = std::vec::Vec::new();
            let b = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src, dst, 64);
            if udp {
                b.udp(sport, dport).write(&mut v, &std::vec![0u8; len]).unwrap();
            } else {
                b.tcp(sport, dport, 1, 100).write(&mut v, &std::vec![0u8; len]).unwrap();
            }
            let ours = whole(LinkType::Ethernet, &v).unwrap();
            let theirs = etherparse::SlicedPacket::from_ethernet(&v).unwrap();
            let (ts, td) = match theirs.transport {
                Some(etherparse::TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port()),
                Some(etherparse::TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()),
                _ => unreachable!(),
            };
            prop_assert_eq!((ours.tuple.sport, ours.tuple.dport), (ts, td));
            prop_assert_eq!(ours.tuple.src, v4(src));
            prop_assert_eq!(ours.tuple.dst, v4(dst));
        }
    }
}
