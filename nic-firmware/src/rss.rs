//! The Toeplitz hash of the Microsoft RSS specification.
//!
//! Receive-side scaling spreads flows over receive queues by hashing each packet's
//! addresses (and ports) with a keyed Toeplitz hash. The emulated NIC must agree bit
//! for bit with real NICs and with the RTL, so the hash follows the specification
//! exactly, including the published verification suite.
//!
//! There are two implementations:
//! - [`toeplitz_reference`] transcribes the specification's bit-serial pseudo-code.
//!   It is slow (one branch per input bit) but obviously right, and it is the oracle
//!   the fast path is tested against.
//! - [`Toeplitz`] is the per-packet hasher. The hash is linear over GF(2): every input
//!   byte XORs in a value that depends only on the byte, its position and the key. So
//!   a key is expanded once into one 256-entry table per input position, and a hash
//!   is one table lookup and XOR per input byte (12 for IPv4 with ports) instead of
//!   32-bit work per input bit.

use alloc::boxed::Box;
use core::fmt;
use core::ops::BitXor;

use crate::FlowTuple;

/// The 40-byte key of the Microsoft RSS verification suite.
pub const MS_RSS_KEY: [u8; 40] = [
    0x6d, 0x5a, 0x56, 0xda, 0x25, 0x5b, 0x0e, 0xc2, 0x41, 0x67, 0x25, 0x3d, 0x43, 0xa3, 0x8f, 0xb0,
    0xd0, 0xca, 0x2b, 0xcb, 0xae, 0x7b, 0x30, 0xb4, 0x77, 0xcb, 0x2d, 0xa3, 0x80, 0x30, 0xf2, 0x0c,
    0x6a, 0x42, 0xb7, 0x3b, 0xbe, 0xac, 0x01, 0xfa,
];

/// Length of an RSS key: 320 bits, the size the specification (and NDIS) uses.
pub const RSS_KEY_LEN: usize = 40;

/// Input positions that get a table: the longest input the specification defines,
/// IPv6 with ports (16 + 16 + 2 + 2 bytes). A 40-byte key covers exactly this many
/// byte positions with a full 32-bit window.
const TABLE_POSITIONS: usize = RSS_KEY_LEN - 4;

/// Where the ports start in the hash input: right after the two addresses.
const IPV4_PORTS_AT: usize = 8;
const IPV6_PORTS_AT: usize = 32;

/// The hash contribution of every value of one input byte at one position.
type ByteTable = [u32; 256];

/// Bit-serial reference implementation, exactly the specification's pseudo-code:
///
/// ```text
/// result = 0
/// for each bit b in input[] from left to right:
///     if b == 1: result ^= (left-most 32 bits of K)
///     shift K left 1 bit position
/// ```
///
/// `K` is a register exactly as long as `key` and zeros shift in at its right end,
/// which defines every input length without a special case: bits that meet key bits
/// past the end of `key` (inputs longer than `key.len() - 4` bytes, or keys shorter
/// than 4 bytes) use zero key bits. An empty key or input hashes to 0.
pub fn toeplitz_reference(key: &[u8], input: &[u8]) -> u32 {
    let mut window = (0..4).fold(0u32, |w, i| {
        (w << 8) | u32::from(key.get(i).copied().unwrap_or(0))
    });
    // The key byte whose bits shift into the window while one input byte is consumed.
    let incoming = key.iter().skip(4).copied().chain(core::iter::repeat(0));
    let mut result = 0;
    for (&byte, next_key_byte) in input.iter().zip(incoming) {
        for bit in (0..8).rev() {
            if (byte >> bit) & 1 == 1 {
                result ^= window;
            }
            window = (window << 1) | u32::from((next_key_byte >> bit) & 1);
        }
    }
    result
}

/// Fast hasher precomputed for one key.
///
/// `symmetric` selects ethtool's `symmetric-xor` input transform for
/// [`hash_tuple`](Self::hash_tuple): each source/destination pair of fields is replaced
/// by `src ^ dst` in both positions, so both directions of a flow hash alike and land
/// on the same queue (at the price of input entropy: every tuple with the same XOR
/// collides).
///
/// Holds 36 tables of 256 `u32`s (36 KiB) on the heap; IPv4 with ports touches only
/// the first 12 of them (12 KiB), which stay cache-resident under packet load.
#[derive(Clone)]
pub struct Toeplitz {
    tables: Box<[ByteTable; TABLE_POSITIONS]>,
    key: [u8; RSS_KEY_LEN],
    symmetric: bool,
}

impl Toeplitz {
    /// Expands `key` into the per-position tables.
    pub fn new(key: &[u8; RSS_KEY_LEN], symmetric: bool) -> Toeplitz {
        let mut tables = Box::new([[0u32; 256]; TABLE_POSITIONS]);
        for (pos, table) in tables.iter_mut().enumerate() {
            // The 64 key bits from byte `pos` on hold all eight 32-bit windows that the
            // bits of input byte `pos` select; bytes past the key are zero, as in the
            // reference.
            let wide = (pos..pos + 8).fold(0u64, |w, i| {
                (w << 8) | u64::from(key.get(i).copied().unwrap_or(0))
            });
            // basis[k]: the window XORed in by the input bit k places from the byte's
            // most significant bit. The shift keeps the top 32 of the 64 bits.
            let basis: [u32; 8] = core::array::from_fn(|k| ((wide << k) >> 32) as u32);
            for (value, entry) in table.iter_mut().enumerate() {
                *entry = basis
                    .iter()
                    .enumerate()
                    .filter(|&(k, _)| value & (0x80 >> k) != 0)
                    .fold(0, |h, (_, w)| h ^ w);
            }
        }
        Toeplitz {
            tables,
            key: *key,
            symmetric,
        }
    }

    /// The key the tables were built from.
    pub fn key(&self) -> &[u8; RSS_KEY_LEN] {
        &self.key
    }

    /// Whether [`hash_tuple`](Self::hash_tuple) applies the `symmetric-xor` transform.
    pub fn symmetric(&self) -> bool {
        self.symmetric
    }

    /// RSS hash of one packet's tuple: input = src addr, dst addr (4 or 16 bytes each,
    /// per [`FlowTuple::addr_len`]), then sport, dport (big-endian, network order) when
    /// `t.has_ports`; otherwise the addresses only. These are the specification's
    /// IPv4/IPv6 hash types with and without TCP/UDP.
    ///
    /// With `symmetric`, the input fields are transformed first (see [`Toeplitz`]).
    #[inline]
    pub fn hash_tuple(&self, t: &FlowTuple) -> u32 {
        // One test per packet instead of one per field pair: with the mode a constant,
        // each path is straight-line loads and XORs.
        if self.symmetric {
            self.hash_symmetric(t)
        } else {
            self.hash_fields::<false>(t)
        }
    }

    /// The symmetric mode, out of line: the default is not symmetric, and the other
    /// path inlined beside it would take registers from the caller's.
    #[inline(never)]
    fn hash_symmetric(&self, t: &FlowTuple) -> u32 {
        self.hash_fields::<true>(t)
    }

    #[inline(always)]
    fn hash_fields<const SYMMETRIC: bool>(&self, t: &FlowTuple) -> u32 {
        // Each family gets its own straight-line path over only the bytes it hashes:
        // transforming all 32 address bytes before looking at the family made the
        // compiler spill every byte to the stack, and IPv4 three times slower.
        let ports = t.has_ports.then_some((t.sport, t.dport));
        if t.ipv6 {
            let (src, dst) =
                paired::<SYMMETRIC, _>(u128::from_ne_bytes(t.src), u128::from_ne_bytes(t.dst));
            self.fold(0, &src.to_ne_bytes())
                ^ self.fold(16, &dst.to_ne_bytes())
                ^ self.ports::<SYMMETRIC>(IPV6_PORTS_AT, ports)
        } else {
            let [s0, s1, s2, s3, ..] = t.src;
            let [d0, d1, d2, d3, ..] = t.dst;
            self.ipv4::<SYMMETRIC>([s0, s1, s2, s3], [d0, d1, d2, d3], ports)
        }
    }

    /// [`hash_tuple`](Self::hash_tuple) of an IPv4 TCP or UDP packet given as its
    /// fields (addresses in network byte order), for the parser's fast path.
    #[inline(always)]
    pub fn hash_ipv4_ports(&self, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> u32 {
        if self.symmetric {
            self.hash_ipv4_symmetric(src, dst, sport, dport)
        } else {
            self.ipv4::<false>(src, dst, Some((sport, dport)))
        }
    }

    /// Out of line for the reason [`hash_symmetric`](Self::hash_symmetric) is.
    #[inline(never)]
    fn hash_ipv4_symmetric(&self, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> u32 {
        self.ipv4::<true>(src, dst, Some((sport, dport)))
    }

    #[inline(always)]
    fn ipv4<const SYMMETRIC: bool>(
        &self,
        src: [u8; 4],
        dst: [u8; 4],
        ports: Option<(u16, u16)>,
    ) -> u32 {
        let (src, dst) = paired::<SYMMETRIC, _>(u32::from_ne_bytes(src), u32::from_ne_bytes(dst));
        self.fold(0, &src.to_ne_bytes())
            ^ self.fold(4, &dst.to_ne_bytes())
            ^ self.ports::<SYMMETRIC>(IPV4_PORTS_AT, ports)
    }

    /// The ports' contribution, placed right after the addresses; none without ports.
    #[inline(always)]
    fn ports<const SYMMETRIC: bool>(&self, at: usize, ports: Option<(u16, u16)>) -> u32 {
        ports.map_or(0, |(sport, dport)| {
            let (sport, dport) = paired::<SYMMETRIC, _>(sport, dport);
            self.fold(at, &sport.to_be_bytes()) ^ self.fold(at + 2, &dport.to_be_bytes())
        })
    }

    /// Hash arbitrary input bytes, equal to [`toeplitz_reference`] with this key.
    ///
    /// Inputs of up to 36 bytes (every input the specification defines) take the
    /// table path; longer ones fall back to the reference. The fallback looks at the
    /// first [`RSS_KEY_LEN`] bytes only: later bytes meet only zero key bits and cannot
    /// change the hash, and skipping them bounds the cost of an arbitrarily long input.
    ///
    /// The `symmetric` transform does not apply: raw bytes have no fields to pair.
    pub fn hash_bytes(&self, input: &[u8]) -> u32 {
        if input.len() <= TABLE_POSITIONS {
            self.fold(0, input)
        } else {
            toeplitz_reference(&self.key, input.get(..RSS_KEY_LEN).unwrap_or(input))
        }
    }

    /// The hash contribution of `bytes` placed at input position `first`; bytes past
    /// the last table are ignored (callers stay within [`TABLE_POSITIONS`]).
    ///
    /// Always inlined so that, with the fixed-size inputs of [`Self::hash_tuple`], the
    /// loop unrolls into straight-line loads with constant table offsets.
    #[inline(always)]
    fn fold(&self, first: usize, bytes: &[u8]) -> u32 {
        self.tables
            .iter()
            .skip(first)
            .zip(bytes)
            .fold(0, |h, (table, &b)| h ^ table[usize::from(b)])
    }
}

/// One source/destination pair of fields as it enters the hash: unchanged, or with
/// `SYMMETRIC` both replaced by `src ^ dst`.
#[inline(always)]
fn paired<const SYMMETRIC: bool, T: BitXor<Output = T> + Copy>(src: T, dst: T) -> (T, T) {
    if SYMMETRIC {
        let both = src ^ dst;
        (both, both)
    } else {
        (src, dst)
    }
}

/// Shows the key and mode; the tables are derived from the key and would only drown
/// them out.
impl fmt::Debug for Toeplitz {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Toeplitz")
            .field("key", &KeyHex(&self.key))
            .field("symmetric", &self.symmetric)
            .finish_non_exhaustive()
    }
}

/// Formats a key the way `ethtool -x` prints it (`6d:5a:...`), so logs can be compared
/// with a real NIC's configuration.
struct KeyHex<'a>(&'a [u8; RSS_KEY_LEN]);

impl fmt::Debug for KeyHex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, byte) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipproto;
    use crate::ipv4_addr as v4;
    use alloc::format;
    use alloc::vec::Vec;
    use proptest::prelude::*;

    /// One row of the "Verifying the RSS Hash Calculation" tables. The published table
    /// lists the destination before the source; the hash input puts the source first.
    struct Vector {
        dst: [u8; 16],
        dport: u16,
        src: [u8; 16],
        sport: u16,
        /// The "IPv4 only" / "IPv6 only" column.
        addrs_only: u32,
        /// The "with TCP" column.
        with_ports: u32,
    }

    fn v6(groups: [u16; 8]) -> [u8; 16] {
        let mut out = [0; 16];
        for (pair, group) in out.chunks_exact_mut(2).zip(groups) {
            pair.copy_from_slice(&group.to_be_bytes());
        }
        out
    }

    fn ipv4_vectors() -> [Vector; 5] {
        [
            Vector {
                dst: v4([161, 142, 100, 80]),
                dport: 1766,
                src: v4([66, 9, 149, 187]),
                sport: 2794,
                addrs_only: 0x323e_8fc2,
                with_ports: 0x51cc_c178,
            },
            Vector {
                dst: v4([65, 69, 140, 83]),
                dport: 4739,
                src: v4([199, 92, 111, 2]),
                sport: 14230,
                addrs_only: 0xd718_262a,
                with_ports: 0xc626_b0ea,
            },
            Vector {
                dst: v4([12, 22, 207, 184]),
                dport: 38024,
                src: v4([24, 19, 198, 95]),
                sport: 12898,
                addrs_only: 0xd2d0_a5de,
                with_ports: 0x5c2b_394a,
            },
            Vector {
                dst: v4([209, 142, 163, 6]),
                dport: 2217,
                src: v4([38, 27, 205, 30]),
                sport: 48228,
                addrs_only: 0x8298_9176,
                with_ports: 0xafc7_327f,
            },
            Vector {
                dst: v4([202, 188, 127, 2]),
                dport: 1303,
                src: v4([153, 39, 163, 191]),
                sport: 44251,
                addrs_only: 0x5d18_09c5,
                with_ports: 0x10e8_28a2,
            },
        ]
    }

    fn ipv6_vectors() -> [Vector; 3] {
        [
            Vector {
                // 3ffe:2501:200:3::1
                dst: v6([0x3ffe, 0x2501, 0x0200, 0x0003, 0, 0, 0, 0x0001]),
                dport: 1766,
                // 3ffe:2501:200:1fff::7
                src: v6([0x3ffe, 0x2501, 0x0200, 0x1fff, 0, 0, 0, 0x0007]),
                sport: 2794,
                addrs_only: 0x2cc1_8cd5,
                with_ports: 0x4020_7d3d,
            },
            Vector {
                // ff02::1
                dst: v6([0xff02, 0, 0, 0, 0, 0, 0, 0x0001]),
                dport: 4739,
                // 3ffe:501:8::260:97ff:fe40:efab
                src: v6([0x3ffe, 0x0501, 0x0008, 0, 0x0260, 0x97ff, 0xfe40, 0xefab]),
                sport: 14230,
                addrs_only: 0x0f0c_461c,
                with_ports: 0xdde5_1bbf,
            },
            Vector {
                // fe80::200:f8ff:fe21:67cf
                dst: v6([0xfe80, 0, 0, 0, 0x0200, 0xf8ff, 0xfe21, 0x67cf]),
                dport: 38024,
                // 3ffe:1900:4545:3:200:f8ff:fe21:67cf
                src: v6([
                    0x3ffe, 0x1900, 0x4545, 0x0003, 0x0200, 0xf8ff, 0xfe21, 0x67cf,
                ]),
                sport: 44251,
                addrs_only: 0x4b61_e985,
                with_ports: 0x02d1_feef,
            },
        ]
    }

    fn tuple_of(v: &Vector, ipv6: bool, has_ports: bool) -> FlowTuple {
        FlowTuple {
            src: v.src,
            dst: v.dst,
            sport: v.sport,
            dport: v.dport,
            proto: if has_ports {
                ipproto::TCP
            } else {
                ipproto::ICMP
            },
            ipv6,
            has_ports,
        }
    }

    /// The hash input as the specification lays it out, built independently of
    /// `hash_tuple`, with the `symmetric-xor` transform applied when asked.
    fn spec_input(t: &FlowTuple, symmetric: bool) -> Vec<u8> {
        let (mut src, mut dst, mut sport, mut dport) = (t.src, t.dst, t.sport, t.dport);
        if symmetric {
            for (s, d) in src.iter_mut().zip(t.dst) {
                *s ^= d;
            }
            dst = src;
            sport ^= dport;
            dport = sport;
        }
        let n = t.addr_len();
        let mut input = Vec::new();
        input.extend_from_slice(&src[..n]);
        input.extend_from_slice(&dst[..n]);
        if t.has_ports {
            input.extend_from_slice(&sport.to_be_bytes());
            input.extend_from_slice(&dport.to_be_bytes());
        }
        input
    }

    fn check_vectors(vectors: &[Vector], ipv6: bool) {
        let rss = Toeplitz::new(&MS_RSS_KEY, false);
        for v in vectors {
            for (has_ports, expected) in [(false, v.addrs_only), (true, v.with_ports)] {
                let t = tuple_of(v, ipv6, has_ports);
                let input = spec_input(&t, false);
                assert_eq!(
                    input.len(),
                    2 * t.addr_len() + if has_ports { 4 } else { 0 }
                );
                assert_eq!(toeplitz_reference(&MS_RSS_KEY, &input), expected, "{t:?}");
                assert_eq!(rss.hash_bytes(&input), expected, "{t:?}");
                assert_eq!(rss.hash_tuple(&t), expected, "{t:?}");
            }
        }
    }

    #[test]
    fn microsoft_ipv4_vectors() {
        check_vectors(&ipv4_vectors(), false);
    }

    #[test]
    fn microsoft_ipv6_vectors() {
        check_vectors(&ipv6_vectors(), true);
    }

    #[test]
    fn symmetric_on_microsoft_vectors() {
        let rss = Toeplitz::new(&MS_RSS_KEY, true);
        let all = ipv4_vectors()
            .into_iter()
            .map(|v| (v, false))
            .chain(ipv6_vectors().into_iter().map(|v| (v, true)));
        for (v, ipv6) in all {
            for has_ports in [false, true] {
                let t = tuple_of(&v, ipv6, has_ports);
                let expected = toeplitz_reference(&MS_RSS_KEY, &spec_input(&t, true));
                assert_eq!(rss.hash_tuple(&t), expected, "{t:?}");
                assert_eq!(rss.hash_tuple(&t.reversed()), expected, "{t:?}");
            }
        }
    }

    /// Every table entry: each byte value alone at each position, against the reference.
    #[test]
    fn tables_match_reference_exhaustively() {
        let rss = Toeplitz::new(&MS_RSS_KEY, false);
        let mut input = [0u8; TABLE_POSITIONS];
        for pos in 0..TABLE_POSITIONS {
            for value in 0..=u8::MAX {
                input[pos] = value;
                assert_eq!(
                    rss.hash_bytes(&input),
                    toeplitz_reference(&MS_RSS_KEY, &input),
                    "position {pos}, byte {value:#04x}"
                );
            }
            input[pos] = 0;
        }
    }

    #[test]
    fn reference_edge_cases() {
        assert_eq!(toeplitz_reference(&MS_RSS_KEY, &[]), 0);
        assert_eq!(toeplitz_reference(&[], &[0xff; 8]), 0);
        // A single set bit selects the window at its bit offset.
        assert_eq!(toeplitz_reference(&MS_RSS_KEY, &[0x80]), 0x6d5a_56da);
        assert_eq!(toeplitz_reference(&MS_RSS_KEY, &[0x00, 0x80]), 0x5a56_da25);
        // Keys shorter than the window are zero-padded on the right.
        assert_eq!(toeplitz_reference(&[0xab], &[0x80]), 0xab00_0000);
        assert_eq!(toeplitz_reference(&[0xab], &[0x40]), 0x5600_0000);
        // Byte 39 is the last input byte that meets key bits: its MSB sees the key's
        // last byte followed by zeros, its bit 1 only the key's last two bits (1, 0).
        let mut input = [0u8; RSS_KEY_LEN];
        input[RSS_KEY_LEN - 1] = 0x80;
        assert_eq!(toeplitz_reference(&MS_RSS_KEY, &input), 0xfa00_0000);
        input[RSS_KEY_LEN - 1] = 0x02;
        assert_eq!(toeplitz_reference(&MS_RSS_KEY, &input), 0x8000_0000);
    }

    #[test]
    fn bytes_past_the_key_do_not_change_the_hash() {
        let rss = Toeplitz::new(&MS_RSS_KEY, false);
        let input: Vec<u8> = (1..=64).collect();
        let within_key = toeplitz_reference(&MS_RSS_KEY, &input[..RSS_KEY_LEN]);
        assert_eq!(toeplitz_reference(&MS_RSS_KEY, &input), within_key);
        assert_eq!(rss.hash_bytes(&input), within_key);
    }

    #[test]
    fn debug_shows_key_not_tables() {
        let shown = format!("{:?}", Toeplitz::new(&MS_RSS_KEY, true));
        assert!(shown.starts_with("Toeplitz { key: 6d:5a:56:da:"), "{shown}");
        assert!(
            shown.ends_with(":be:ac:01:fa, symmetric: true, .. }"),
            "{shown}"
        );
        let rss = Toeplitz::new(&MS_RSS_KEY, false);
        assert_eq!(rss.key(), &MS_RSS_KEY);
        assert!(!rss.symmetric());
        assert!(Toeplitz::new(&MS_RSS_KEY, true).symmetric());
    }

    /// A well-formed tuple (IPv4 addresses keep bytes 4.. zero), except that the ports
    /// stay random without `has_ports`, to show they are then left out of the hash.
    fn flow_tuple() -> impl Strategy<Value = FlowTuple> {
        (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<u16>(),
            any::<bool>(),
            prop::sample::select(&[ipproto::TCP, ipproto::UDP, ipproto::ICMP][..]),
            any::<bool>(),
        )
            .prop_map(|(mut src, mut dst, sport, dport, ipv6, proto, fragment)| {
                if !ipv6 {
                    src[4..].fill(0);
                    dst[4..].fill(0);
                }
                let has_ports = proto != ipproto::ICMP && !fragment;
                FlowTuple {
                    src,
                    dst,
                    sport,
                    dport,
                    proto,
                    ipv6,
                    has_ports,
                }
            })
    }

    proptest! {
        #[test]
        fn fast_matches_reference_up_to_36_bytes(
            key in any::<[u8; RSS_KEY_LEN]>(),
            input in prop::collection::vec(any::<u8>(), 0..=TABLE_POSITIONS),
        ) {
            let rss = Toeplitz::new(&key, false);
            prop_assert_eq!(rss.hash_bytes(&input), toeplitz_reference(&key, &input));
        }

        #[test]
        fn fallback_matches_reference_past_36_bytes(
            key in any::<[u8; RSS_KEY_LEN]>(),
            input in prop::collection::vec(any::<u8>(), TABLE_POSITIONS + 1..=80),
        ) {
            let rss = Toeplitz::new(&key, true);
            prop_assert_eq!(rss.hash_bytes(&input), toeplitz_reference(&key, &input));
        }

        #[test]
        fn tuple_hash_is_the_spec_layout(
            key in any::<[u8; RSS_KEY_LEN]>(),
            t in flow_tuple(),
            symmetric in any::<bool>(),
        ) {
            let rss = Toeplitz::new(&key, symmetric);
            let expected = toeplitz_reference(&key, &spec_input(&t, symmetric));
            prop_assert_eq!(rss.hash_tuple(&t), expected);
        }

        #[test]
        fn ipv4_fields_hash_as_their_tuple_does(
            key in any::<[u8; RSS_KEY_LEN]>(),
            src in any::<[u8; 4]>(),
            dst in any::<[u8; 4]>(),
            sport: u16,
            dport: u16,
            symmetric in any::<bool>(),
        ) {
            let rss = Toeplitz::new(&key, symmetric);
            let mut t = FlowTuple { sport, dport, proto: 6, has_ports: true, ..FlowTuple::default() };
            t.src[..4].copy_from_slice(&src);
            t.dst[..4].copy_from_slice(&dst);
            prop_assert_eq!(rss.hash_ipv4_ports(src, dst, sport, dport), rss.hash_tuple(&t));
        }

        #[test]
        fn symmetric_hashes_both_directions_alike(
            key in any::<[u8; RSS_KEY_LEN]>(),
            t in flow_tuple(),
        ) {
            let rss = Toeplitz::new(&key, true);
            prop_assert_eq!(rss.hash_tuple(&t), rss.hash_tuple(&t.reversed()));
        }

        /// Not every tuple: the difference of the two directions is a linear function
        /// of `src ^ dst` and `sport ^ dport` with a non-trivial kernel, so about one
        /// random tuple in 2^32 hashes alike both ways. A batch makes that negligible.
        #[test]
        fn plain_mode_generally_tells_directions_apart(
            key in any::<[u8; RSS_KEY_LEN]>(),
            tuples in prop::collection::vec(flow_tuple(), 64),
        ) {
            let rss = Toeplitz::new(&key, false);
            let distinct: Vec<&FlowTuple> = tuples.iter().filter(|t| **t != t.reversed()).collect();
            let differing = distinct
                .iter()
                .filter(|t| rss.hash_tuple(t) != rss.hash_tuple(&t.reversed()))
                .count();
            prop_assert!(differing + 4 >= distinct.len(), "{differing} of {}", distinct.len());
        }
    }
}
