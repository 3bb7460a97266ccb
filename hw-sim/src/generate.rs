//! Synthetic traffic: minimum-size Ethernet/IPv4/TCP frames of many flows, in a uniform
//! or Zipf-distributed order, for benchmarks and load tests.
//!
//! Frames are 60 bytes captured (64 on the wire with the FCS): Ethernet, a 20-byte IPv4
//! header and a 20-byte TCP header, padded. Flow `f` (f < 2^24) is the connection
//! `10.f>>16.f>>8.f : 1024 + f % 60000 → 192.0.2.(1 + f % 250) : 443`, so every flow is
//! distinct and hashes spread over the whole RSS space.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Zipf};

/// Captured length of a synthetic frame.
pub const FRAME_LEN: usize = 60;
/// Length on the wire, FCS included.
pub const WIRE_LEN: u32 = 64;
/// Frames are stored 64-byte aligned, one cache line each, as a NIC's RX ring holds them.
pub const SLOT: usize = 64;
/// Largest flow count the addressing scheme keeps distinct.
pub const MAX_FLOWS: u32 = 1 << 24;

/// Write flow `flow`'s frame into `buf` (at least [`FRAME_LEN`] bytes).
pub fn write_frame(flow: u32, buf: &mut [u8]) {
    let mut src = [0u8; 4];
    src[0] = 10;
    src[1..4].copy_from_slice(&flow.to_be_bytes()[1..4]);
    write_ipv4_frame(
        src,
        [192, 0, 2, 1 + (flow % 250) as u8],
        1024 + (flow % 60_000) as u16,
        443,
        IPPROTO_TCP,
        0x10, // ACK
        buf,
    );
}

const IPPROTO_TCP: u8 = 6;

/// Write a minimum-size Ethernet/IPv4 frame of a TCP (with `tcp_flags`) or UDP packet
/// from `src:sport` to `dst:dport` into `buf` (at least [`FRAME_LEN`] bytes, padded).
pub fn write_ipv4_frame(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
    buf: &mut [u8],
) {
    let buf = &mut buf[..FRAME_LEN];
    buf.fill(0);
    buf[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    buf[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let l4_len: u16 = if proto == IPPROTO_TCP { 20 } else { 8 };
    let ip = &mut buf[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(20 + l4_len).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let l4 = &mut buf[34..34 + usize::from(l4_len)];
    l4[0..2].copy_from_slice(&sport.to_be_bytes());
    l4[2..4].copy_from_slice(&dport.to_be_bytes());
    if proto == IPPROTO_TCP {
        l4[12] = 0x50;
        l4[13] = tcp_flags;
        l4[14..16].copy_from_slice(&1024u16.to_be_bytes());
    } else {
        l4[4..6].copy_from_slice(&l4_len.to_be_bytes());
    }
}

/// Which flow each packet belongs to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Popularity {
    /// Every flow equally likely.
    Uniform,
    /// Flow rank r (1-based) has weight r^-s.
    Zipf(f64),
}

/// A window of frames in arrival order, replayed round and round.
#[derive(Debug)]
pub struct FrameWindow {
    frames: Vec<u8>,
    len: usize,
}

impl FrameWindow {
    /// `len` frames of `flows` flows drawn by `popularity` from `seed`. Zipf ranks are
    /// scattered over the flow ids, so popular flows do not sit in one region of the
    /// connection table.
    pub fn new(
        flows: u32,
        len: usize,
        popularity: Popularity,
        seed: u64,
    ) -> Result<FrameWindow, String> {
        if flows == 0 || flows > MAX_FLOWS {
            return Err(format!(
                "flows must be between 1 and {MAX_FLOWS}, got {flows}"
            ));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let zipf = match popularity {
            Popularity::Uniform => None,
            Popularity::Zipf(s) => Some(
                Zipf::new(f64::from(flows), s).map_err(|e| format!("zipf exponent {s}: {e}"))?,
            ),
        };
        let mut frames = vec![0u8; len * SLOT];
        for slot in frames.chunks_exact_mut(SLOT) {
            let flow = match &zipf {
                None => rng.random_range(0..flows),
                // A fixed odd multiplier permutes ranks over 0..2^24; folding into
                // 0..flows keeps it a spread, near-bijective map.
                Some(z) => {
                    let rank = (z.sample(&mut rng) as u32).saturating_sub(1);
                    (rank.wrapping_mul(0x9e_3779) & (MAX_FLOWS - 1)) % flows
                }
            };
            write_frame(flow, slot);
        }
        Ok(FrameWindow { frames, len })
    }

    /// The same window with about half its frames, drawn from `seed`, turned into
    /// their flow's replies (server to client), as a real link carries a flow's two
    /// directions interleaved. A reply swaps the addresses and the ports, which
    /// leaves the IPv4 header checksum as it was.
    pub fn with_replies(mut self, seed: u64) -> FrameWindow {
        let mut rng = StdRng::seed_from_u64(seed.rotate_left(32) ^ 0x7265_706c_6965_7321);
        for f in self.frames.chunks_exact_mut(SLOT) {
            if rng.random_bool(0.5) {
                let (src, dst) = f[26..34].split_at_mut(4);
                src.swap_with_slice(dst);
                let (sport, dport) = f[34..38].split_at_mut(2);
                sport.swap_with_slice(dport);
            }
        }
        self
    }

    /// One frame per flow, each flow once, in id order: fills a table before measuring.
    pub fn every_flow(flows: u32) -> Result<FrameWindow, String> {
        if flows == 0 || flows > MAX_FLOWS {
            return Err(format!(
                "flows must be between 1 and {MAX_FLOWS}, got {flows}"
            ));
        }
        let mut frames = vec![0u8; flows as usize * SLOT];
        for (f, slot) in frames.chunks_exact_mut(SLOT).enumerate() {
            write_frame(f as u32, slot);
        }
        Ok(FrameWindow {
            frames,
            len: flows as usize,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Frame `i` of the window.
    pub fn frame(&self, i: usize) -> &[u8] {
        &self.frames[i * SLOT..i * SLOT + FRAME_LEN]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nic_firmware::parse::{LinkType, parse};

    #[test]
    fn frames_parse_and_flows_are_distinct() {
        let w = FrameWindow::every_flow(70_000).unwrap();
        let mut seen = std::collections::HashSet::new();
        for i in 0..w.len() {
            let p = parse(LinkType::Ethernet, w.frame(i), WIRE_LEN).unwrap();
            assert_eq!((p.tuple.proto, p.tuple.dport, p.ip_len), (6, 443, 40));
            assert!(seen.insert(p.tuple));
        }
        let ip = &w.frame(5)[14..34];
        let sum: u32 = ip
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        assert_eq!(
            (sum & 0xffff) + (sum >> 16),
            0xffff,
            "IPv4 checksum verifies"
        );
    }

    #[test]
    fn zipf_concentrates_and_seeds_repeat() {
        let count_top = |w: &FrameWindow| {
            let mut c = std::collections::HashMap::new();
            for i in 0..w.len() {
                *c.entry(w.frame(i).to_vec()).or_insert(0u32) += 1;
            }
            let mut v: Vec<u32> = c.into_values().collect();
            v.sort_unstable_by(|a, b| b.cmp(a));
            v[..10].iter().sum::<u32>()
        };
        let z = FrameWindow::new(100_000, 100_000, Popularity::Zipf(1.1), 7).unwrap();
        let u = FrameWindow::new(100_000, 100_000, Popularity::Uniform, 7).unwrap();
        assert!(count_top(&z) > 10 * count_top(&u));
        let z2 = FrameWindow::new(100_000, 100_000, Popularity::Zipf(1.1), 7).unwrap();
        assert_eq!(z.frames, z2.frames);
        assert!(FrameWindow::new(0, 1, Popularity::Uniform, 1).is_err());
        assert!(FrameWindow::new(10, 1, Popularity::Zipf(-1.0), 1).is_err());
    }

    #[test]
    fn replies_are_the_same_flows_the_other_way() {
        let one = FrameWindow::new(1_000, 10_000, Popularity::Uniform, 5).unwrap();
        let two = FrameWindow::new(1_000, 10_000, Popularity::Uniform, 5)
            .unwrap()
            .with_replies(5);
        let mut replies = 0;
        for i in 0..one.len() {
            let a = parse(LinkType::Ethernet, one.frame(i), WIRE_LEN).unwrap();
            let b = parse(LinkType::Ethernet, two.frame(i), WIRE_LEN).unwrap();
            assert_eq!(a.ip_len, b.ip_len);
            if a.tuple != b.tuple {
                replies += 1;
                assert_eq!((a.tuple.src, a.tuple.sport), (b.tuple.dst, b.tuple.dport));
                assert_eq!((a.tuple.dst, a.tuple.dport), (b.tuple.src, b.tuple.sport));
            }
        }
        assert!((4_500..5_500).contains(&replies), "{replies} replies");
    }
}
