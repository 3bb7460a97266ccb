//! The connection table: one 64-byte entry per bidirectional flow.
//!
//! # Design
//!
//! A bucketized cuckoo hash, the layout hardware flow tables use: every flow has two
//! candidate buckets of [`SLOTS`] slots. A bucket's 16-bit tags sit together in one
//! 16-byte word (four buckets per cache line), the entries in a separate array, so a
//! lookup reads one tag word per candidate bucket and then only the entries whose tag
//! matches — in practice one entry. Both reads can be prefetched for a burst before any
//! entry is touched, which is what lets a burst of lookups overlap its DRAM misses.
//!
//! The two directions of a flow share one entry: the key stores the endpoints in a
//! canonical order ([`FlowKey::from_tuple`]) and remembers which one opened the flow.
//!
//! # Capacity and eviction
//!
//! The capacity is fixed when the table is built; slots are provisioned for a 95 %
//! load, which two-choice buckets of eight reach without failing. Inserting into a full
//! table, or when neither bucket has room and no cuckoo path of depth two frees one,
//! **evicts** one of the sixteen flows of the new flow's two buckets: a flow already
//! closed by FIN/RST if there is one, otherwise the one idle longest. The evicted flow is
//! returned so the caller can export its record and count it; it is never silent.

use alloc::vec;
use alloc::vec::Vec;

use core::hint::select_unpredictable;

use crate::{FlowTuple, ipv4_addr};

/// Slots per bucket.
pub const SLOTS: usize = 8;

/// Flow-state flags kept in [`FlowEntry::flags`].
pub mod flag {
    /// The key holds IPv6 addresses.
    pub const IPV6: u8 = 1 << 0;
    /// Endpoint A sent the flow's first packet (A is the client).
    pub const A_IS_CLIENT: u8 = 1 << 1;
    pub const FIN_A: u8 = 1 << 2;
    pub const FIN_B: u8 = 1 << 3;
    pub const RST: u8 = 1 << 4;
    pub const SYN: u8 = 1 << 5;
    /// The host pinned the flow to its node: flowlet boundaries do not move it; only
    /// its node failing does (which also ends the pin).
    pub const PINNED: u8 = 1 << 6;
}

/// One tracked flow: key, steering state, flowlet state and counters in 64 bytes.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    pub addr_a: [u8; 16],
    pub addr_b: [u8; 16],
    pub port_a: u16,
    pub port_b: u16,
    pub proto: u8,
    /// [`flag`] bits.
    pub flags: u8,
    /// Class index, [`UNCLASSIFIED`] until the profiler or a rule says.
    pub class: u8,
    /// Bitmap of the shard-group members this flow has used.
    pub shards_used: u8,
    pub node: u16,
    pub shard: u16,
    /// Flowlets seen so far minus one (wrapping).
    pub flowlet: u16,
    /// Feature staging slot + 1 while the flow is in its first N packets, else 0.
    pub feature_slot: u16,
    /// NIC time of the last packet, in µs, wrapping (see `config::MAX_TIMEOUT_MS`).
    pub last_us: u32,
    /// NIC time, in ms (wrapping), of the first packet the current totals cover.
    pub start_ms: u32,
    /// Packets since the flow's last exported record.
    pub packets: u32,
    /// IP bytes since the flow's last exported record.
    pub bytes: u32,
}

/// A key's ports, protocol and family in one word.
#[inline(always)]
fn tail_word(port_a: u16, port_b: u16, proto: u8, ipv6: bool) -> u64 {
    u64::from(port_a) | u64::from(port_b) << 16 | u64::from(proto) << 32 | u64::from(ipv6) << 40
}

/// Class value of a flow nobody has classified yet.
pub const UNCLASSIFIED: u8 = 0xff;

/// Size of one entry; the layout is fixed and checked at compile time.
pub const ENTRY_BYTES: usize = core::mem::size_of::<FlowEntry>();
const _: () = assert!(ENTRY_BYTES == 64);

impl FlowEntry {
    /// The entry's key, as [`FlowKey::from_tuple`] would build it.
    #[inline]
    pub fn key(&self) -> FlowKey {
        FlowKey {
            addr_a: self.addr_a,
            addr_b: self.addr_b,
            port_a: self.port_a,
            port_b: self.port_b,
            proto: self.proto,
            ipv6: self.flags & flag::IPV6 != 0,
        }
    }

    /// Whether the entry holds `k`, whose [`FlowKey::tail`] is `k_tail` (taken once, with
    /// the key's hash). Compared as three values with non-short-circuit `&`: one
    /// branch instead of six.
    #[inline]
    fn matches(&self, k: &FlowKey, k_tail: u64) -> bool {
        (self.addr_a == k.addr_a)
            & (self.addr_b == k.addr_b)
            & (tail_word(
                self.port_a,
                self.port_b,
                self.proto,
                self.flags & flag::IPV6 != 0,
            ) == k_tail)
    }

    /// Both sides sent FIN, or one sent RST: the flow is only lingering.
    #[inline]
    pub fn is_closing(&self) -> bool {
        self.flags & flag::RST != 0
            || self.flags & (flag::FIN_A | flag::FIN_B) == flag::FIN_A | flag::FIN_B
    }
}

/// A flow's endpoints in canonical order: both directions of a flow give one key.
/// Ordered so the pipeline's small side maps (pending handoffs) can be `BTreeMap`s,
/// which `no_std` + `alloc` has and a hash map does not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub addr_a: [u8; 16],
    pub addr_b: [u8; 16],
    pub port_a: u16,
    pub port_b: u16,
    pub proto: u8,
    pub ipv6: bool,
}

impl FlowKey {
    /// The key of a packet's flow, and whether the packet travels from A to B.
    #[inline]
    pub fn from_tuple(t: &FlowTuple) -> (FlowKey, bool) {
        // Byte-wise lexicographic order is big-endian integer order: one 128-bit
        // compare instead of a byte loop.
        let (src, dst) = (u128::from_be_bytes(t.src), u128::from_be_bytes(t.dst));
        let a_to_b = (src < dst) | ((src == dst) & (t.sport <= t.dport));
        // A flow's two directions interleave, so which one a packet travels is close
        // to a coin toss: the endpoints are ordered by selects, not a branch (over
        // `pinterest`'s 17,657 packets, 0.33 fewer mispredictions per packet).
        let (a, b) = (u128::from_ne_bytes(t.src), u128::from_ne_bytes(t.dst));
        (
            FlowKey {
                addr_a: select_unpredictable(a_to_b, a, b).to_ne_bytes(),
                addr_b: select_unpredictable(a_to_b, b, a).to_ne_bytes(),
                port_a: select_unpredictable(a_to_b, t.sport, t.dport),
                port_b: select_unpredictable(a_to_b, t.dport, t.sport),
                proto: t.proto,
                ipv6: t.ipv6,
            },
            a_to_b,
        )
    }

    /// [`from_tuple`](Self::from_tuple) of an IPv4 tuple given as its fields (addresses
    /// in network byte order), built in registers for the parser's fast path.
    #[inline(always)]
    pub fn from_ipv4(
        src: [u8; 4],
        dst: [u8; 4],
        sport: u16,
        dport: u16,
        proto: u8,
    ) -> (FlowKey, bool) {
        // An endpoint as one integer, address above port, orders endpoints as
        // `from_tuple` does (an IPv4 address sits in the first 4 of the key's 16
        // bytes). Min and max put them in order without a branch, for the reason
        // `from_tuple` gives: over a real capture (`netflix`, 6,999 IPv4 packets) the
        // branch mispredicted one packet in two, and `bench dataplane --two-way` runs
        // 2-3.5 ns per packet faster without it. A one-way stream predicts the branch,
        // and pays the 9 instructions per packet this costs.
        let end = |a: [u8; 4], p: u16| u64::from(u32::from_be_bytes(a)) << 16 | u64::from(p);
        let (s, d) = (end(src, sport), end(dst, dport));
        let a_to_b = s <= d;
        let (a, b) = (s.min(d), s.max(d));
        let addr = |e: u64| ipv4_addr(((e >> 16) as u32).to_be_bytes());
        (
            FlowKey {
                addr_a: addr(a),
                addr_b: addr(b),
                port_a: a as u16,
                port_b: b as u16,
                proto,
                ipv6: false,
            },
            a_to_b,
        )
    }

    /// Ports, protocol and family in one word, as [`FlowEntry`] compares them.
    #[inline(always)]
    fn tail(&self) -> u64 {
        tail_word(self.port_a, self.port_b, self.proto, self.ipv6)
    }

    /// A 64-bit hash of the key under `seed`: folded 64×64→128 multiplies over the key's
    /// five words, which spread every input bit over the result in a few cycles.
    #[inline]
    pub fn hash(&self, seed: u64) -> u64 {
        #[inline(always)]
        fn fold(a: u64, b: u64) -> u64 {
            let p = u128::from(a) * u128::from(b);
            (p as u64) ^ ((p >> 64) as u64)
        }
        let w = |a: &[u8; 16], i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&a[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let tail = self.tail();
        let s1 = seed ^ 0x243f_6a88_85a3_08d3;
        let s2 = seed.rotate_left(17) ^ 0x1319_8a2e_0370_7344;
        let s3 = seed.rotate_left(31) ^ 0xa409_3822_299f_31d0;
        let s4 = seed.rotate_left(47) ^ 0x082e_fa98_ec4e_6c89;
        let h1 = fold(w(&self.addr_a, 0) ^ s1, w(&self.addr_a, 1) ^ s2);
        let h2 = fold(w(&self.addr_b, 0) ^ s3, w(&self.addr_b, 1) ^ s4);
        fold(h1 ^ tail ^ s2, h2 ^ s1 ^ 0x4528_21e6_38d0_1377)
    }
}

/// The slots whose tags match a key's, in the bucket a lookup will search, as read at
/// one generation of the table (any change to a tag moves the generation on).
///
/// That bucket is the key's first unless the first had no candidate, and then its
/// second: so steering searches one bucket without asking which, a question whose
/// answer is a coin weighted one in ten in a full table (a mispredicted branch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Candidates {
    bucket: u32,
    mask: u8,
    /// `bucket` is the second (the first had no candidate).
    second: bool,
    generation: u32,
}

impl Candidates {
    /// The first bucket had no candidate and the second's tags are still to be read
    /// ([`ConnTable::prefetch_third`]).
    #[inline(always)]
    pub fn need_second(&self) -> bool {
        self.mask == 0 && !self.second
    }
}

/// The slots of `tags` equal to `tag`, as a bitmask: one SSE2 compare (x86-64's
/// baseline) of all eight 16-bit tags.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline(always)]
fn tag_mask(tags: &[u16; SLOTS], tag: u16) -> u8 {
    use core::arch::x86_64::{
        _mm_cmpeq_epi16, _mm_loadu_si128, _mm_movemask_epi8, _mm_packs_epi16, _mm_set1_epi16,
        _mm_setzero_si128,
    };
    // SAFETY: SSE2 is part of every x86-64 CPU, so these instructions exist wherever
    // this code runs; the one load reads exactly the 16 bytes of `tags`, unaligned
    // loads being what `_mm_loadu_si128` is for.
    unsafe {
        let v = _mm_loadu_si128(tags.as_ptr().cast());
        let eq = _mm_cmpeq_epi16(v, _mm_set1_epi16(tag as i16));
        // The saturating pack turns each 0xffff/0 lane into one 0xff/0 byte.
        _mm_movemask_epi8(_mm_packs_epi16(eq, _mm_setzero_si128())) as u8
    }
}

/// The slots of `tags` equal to `tag`, as a bitmask, for cores without SSE2.
///
/// SWAR over two 64-bit words of four 16-bit lanes: a lane of `tags ^ tag` is zero
/// exactly where the tag matches, and `((x & 0x7fff) + 0x7fff) | x` sets a lane's top
/// bit exactly where the lane is non-zero, with no carry between lanes.
#[cfg(any(not(target_arch = "x86_64"), test))]
#[inline(always)]
fn tag_mask_swar(tags: &[u16; SLOTS], tag: u16) -> u8 {
    const LOW: u64 = 0x7fff_7fff_7fff_7fff;
    let lanes = |w: &[u16]| -> u8 {
        let word = w
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, v)| acc | u64::from(*v) << (16 * i));
        let x = word ^ (u64::from(tag) * 0x0001_0001_0001_0001);
        let zero = !((((x & LOW) + LOW) | x) | LOW);
        // Gather the lanes' top bits (15, 31, 47, 63) into bits 0..4.
        ((((zero >> 15) & 0x0001_0001_0001_0001) * 0x0001_0002_0004_0008) >> 48) as u8
    };
    lanes(&tags[..4]) | lanes(&tags[4..]) << 4
}

#[cfg(not(target_arch = "x86_64"))]
use tag_mask_swar as tag_mask;

/// Where a key lives: its hash's two candidate buckets and its tag; and the key's
/// ports, protocol and family as one word, which the hash has just computed and each
/// entry compare needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    pub b1: u32,
    pub b2: u32,
    pub tag: u16,
    pub key_tail: u64,
}

/// Counters the table keeps about itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub inserts: u64,
    pub removals: u64,
    pub evictions: u64,
    /// Entries moved to their other bucket to make room (cuckoo displacement).
    pub cuckoo_moves: u64,
}

/// What an insert did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inserted {
    pub slot: u32,
    /// The flow evicted to make room, if any.
    pub evicted: Option<FlowEntry>,
}

/// The connection table.
pub struct ConnTable {
    tags: Vec<[u16; SLOTS]>,
    entries: Vec<FlowEntry>,
    nbuckets: u32,
    capacity: u32,
    len: u32,
    seed: u64,
    stats: TableStats,
    /// Moves on whenever a tag changes, so lookups can tell stale candidates.
    generation: u32,
}

impl core::fmt::Debug for ConnTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ConnTable")
            .field("capacity", &self.capacity)
            .field("len", &self.len)
            .field("buckets", &self.nbuckets)
            .field("stats", &self.stats)
            .finish()
    }
}

/// Map a 32-bit hash onto `0..n` without a division (Lemire's multiply-shift).
#[inline(always)]
fn reduce(x: u32, n: u32) -> u32 {
    ((u64::from(x) * u64::from(n)) >> 32) as u32
}

/// The slot of bucket `b` that is the lowest in `m` (for an empty `m`, the next
/// bucket's first slot).
#[inline(always)]
fn first_slot(b: u32, m: u8) -> usize {
    b as usize * SLOTS + m.trailing_zeros() as usize
}

/// Hint the CPU to bring the cache line at `r` in; a burst issues these for all its
/// packets before touching any, so their memory latencies overlap.
#[allow(unsafe_code)]
#[inline(always)]
pub(crate) fn prefetch<T>(r: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is only a hint: it never faults and never changes memory,
    // whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(r.cast())
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}

impl ConnTable {
    /// A table for `capacity` flows (≥ 1); `seed` keys the bucket hash.
    pub fn new(capacity: u32, seed: u64) -> ConnTable {
        let capacity = capacity.max(1);
        let slots = (u64::from(capacity) * 20).div_ceil(19);
        let nbuckets = slots.div_ceil(SLOTS as u64).max(2) as u32;
        ConnTable {
            tags: vec![[0u16; SLOTS]; nbuckets as usize],
            entries: vec![FlowEntry::default(); nbuckets as usize * SLOTS],
            nbuckets,
            capacity,
            len: 0,
            seed,
            stats: TableStats::default(),
            generation: 0,
        }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn buckets(&self) -> u32 {
        self.nbuckets
    }

    pub fn stats(&self) -> TableStats {
        self.stats
    }

    /// Memory the table holds: entries plus tags.
    pub fn memory_bytes(&self) -> usize {
        self.entries.len() * ENTRY_BYTES + self.tags.len() * core::mem::size_of::<[u16; SLOTS]>()
    }

    /// Candidate buckets and tag of a key.
    #[inline]
    pub fn probe(&self, key: &FlowKey) -> Probe {
        self.probe_hash(key.hash(self.seed), key.tail())
    }

    #[inline(always)]
    fn probe_hash(&self, h: u64, key_tail: u64) -> Probe {
        // The second bucket is drawn from the other n - 1 and stepped over the first:
        // always distinct, uniform, and without a branch.
        let b1 = reduce(h as u32, self.nbuckets);
        let b2 = reduce((h >> 32) as u32, self.nbuckets - 1);
        let b2 = b2 + u32::from(b2 >= b1);
        let tag = ((h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48) as u16) | 1;
        Probe {
            b1,
            b2,
            tag,
            key_tail,
        }
    }

    /// Prefetch the tags of the key's first bucket (first stage of a burst lookup).
    ///
    /// Flows are placed in their first bucket whenever it has room, so most lookups
    /// end there: the second bucket's tags are fetched only when the first holds no
    /// candidate ([`prefetch_second`](Self::prefetch_second)), which saves a cache
    /// miss on most packets of a table too large for the caches.
    #[inline(always)]
    pub fn prefetch_first(&self, p: &Probe) {
        if let Some(t) = self.tags.get(p.b1 as usize) {
            prefetch(t);
        }
    }

    /// Second stage: read the first bucket's tags; prefetch its matching entries, or,
    /// if none match, the second bucket's tags.
    #[inline(always)]
    pub fn prefetch_second(&self, p: &Probe) -> Candidates {
        let m1 = self.mask(p.b1, p.tag);
        let entry = self
            .entries
            .as_ptr()
            .wrapping_add(first_slot(p.b1, m1))
            .cast::<u8>();
        let tags = self.tags.as_ptr().wrapping_add(p.b2 as usize).cast::<u8>();
        prefetch(select_unpredictable(m1 == 0, tags, entry));
        self.prefetch_slots(p.b1, m1 & m1.wrapping_sub(1));
        Candidates {
            bucket: p.b1,
            mask: m1,
            second: false,
            generation: self.generation,
        }
    }

    /// Third stage, for keys whose first bucket had no candidate
    /// ([`Candidates::need_second`]): read the second bucket's tags and prefetch its
    /// matching entries.
    #[inline(always)]
    pub fn prefetch_third(&self, p: &Probe, c: &mut Candidates) {
        let m2 = self.mask(p.b2, p.tag);
        self.prefetch_slots(p.b2, m2);
        *c = Candidates {
            bucket: p.b2,
            mask: m2,
            second: true,
            generation: c.generation,
        };
    }

    #[inline(always)]
    fn prefetch_slots(&self, b: u32, mut m: u8) {
        while m != 0 {
            if let Some(e) = self.entries.get(first_slot(b, m)) {
                prefetch(e);
            }
            m &= m - 1;
        }
    }

    #[inline(always)]
    fn mask(&self, b: u32, tag: u16) -> u8 {
        self.tags.get(b as usize).map_or(0, |t| tag_mask(t, tag))
    }

    /// The candidates of a key, its second bucket's if the first has none.
    #[inline(always)]
    pub fn candidates(&self, p: &Probe) -> Candidates {
        let m1 = self.mask(p.b1, p.tag);
        let (bucket, mask, second) = if m1 != 0 {
            (p.b1, m1, false)
        } else {
            (p.b2, self.mask(p.b2, p.tag), true)
        };
        Candidates {
            bucket,
            mask,
            second,
            generation: self.generation,
        }
    }

    /// The slot holding `key`, if the flow is tracked.
    #[inline]
    pub fn find(&self, key: &FlowKey, p: &Probe) -> Option<u32> {
        self.find_among(key, p, self.candidates(p))
    }

    /// [`find`](Self::find) among candidates taken earlier; they are taken again if
    /// the table's slots have changed since. The second bucket is searched after the
    /// first only if the first had candidates and none matched (a 16-bit tag makes
    /// that rare), or if its tags were never read.
    #[inline(always)]
    pub fn find_among(&self, key: &FlowKey, p: &Probe, c: Candidates) -> Option<u32> {
        let c = if c.generation == self.generation {
            c
        } else {
            self.candidates(p)
        };
        let found = self.find_in(key, p.key_tail, c.bucket, c.mask);
        if found.is_none() && !c.second {
            return self.find_in(key, p.key_tail, p.b2, self.mask(p.b2, p.tag));
        }
        found
    }

    #[inline(always)]
    fn find_in(&self, key: &FlowKey, key_tail: u64, b: u32, mut m: u8) -> Option<u32> {
        while m != 0 {
            let i = first_slot(b, m);
            if self
                .entries
                .get(i)
                .is_some_and(|e| e.matches(key, key_tail))
            {
                return Some(i as u32);
            }
            m &= m - 1;
        }
        None
    }

    #[inline]
    pub fn entry(&self, slot: u32) -> Option<&FlowEntry> {
        self.entries.get(slot as usize)
    }

    #[inline]
    pub fn entry_mut(&mut self, slot: u32) -> Option<&mut FlowEntry> {
        self.entries.get_mut(slot as usize)
    }

    /// True if `slot` holds a flow.
    #[inline]
    pub fn occupied(&self, slot: u32) -> bool {
        let (b, i) = (slot as usize / SLOTS, slot as usize % SLOTS);
        self.tags.get(b).is_some_and(|t| t[i] != 0)
    }

    /// Insert a flow that [`find`](Self::find) did not find. `now_us` ranks eviction
    /// candidates by idle time.
    pub fn insert(&mut self, entry: FlowEntry, p: &Probe, now_us: u32) -> Inserted {
        if self.len < self.capacity {
            if let Some(slot) = self.free_slot(p.b1).or_else(|| self.free_slot(p.b2)) {
                self.place(slot, p.tag, entry);
                self.len += 1;
                self.stats.inserts += 1;
                return Inserted {
                    slot,
                    evicted: None,
                };
            }
            if let Some(slot) = self.cuckoo_path(p) {
                self.place(slot, p.tag, entry);
                self.len += 1;
                self.stats.inserts += 1;
                return Inserted {
                    slot,
                    evicted: None,
                };
            }
        }
        let slot = self.victim(p, now_us);
        let evicted = self.entries[slot as usize];
        self.place(slot, p.tag, entry);
        self.stats.inserts += 1;
        self.stats.evictions += 1;
        Inserted {
            slot,
            evicted: Some(evicted),
        }
    }

    /// Remove the flow in `slot`, returning it.
    pub fn remove(&mut self, slot: u32) -> Option<FlowEntry> {
        if !self.occupied(slot) {
            return None;
        }
        let (b, i) = (slot as usize / SLOTS, slot as usize % SLOTS);
        self.tags[b][i] = 0;
        self.generation = self.generation.wrapping_add(1);
        self.len -= 1;
        self.stats.removals += 1;
        Some(self.entries[slot as usize])
    }

    /// Occupied slots of bucket `b` (for ageing sweeps), as a bitmap.
    #[inline]
    pub fn occupied_in(&self, b: u32) -> u32 {
        let Some(t) = self.tags.get(b as usize) else {
            return 0;
        };
        let mut m = 0u32;
        for (i, v) in t.iter().enumerate() {
            m |= u32::from(*v != 0) << i;
        }
        m
    }

    fn place(&mut self, slot: u32, tag: u16, entry: FlowEntry) {
        let (b, i) = (slot as usize / SLOTS, slot as usize % SLOTS);
        self.tags[b][i] = tag;
        self.entries[slot as usize] = entry;
        self.generation = self.generation.wrapping_add(1);
    }

    fn free_slot(&self, b: u32) -> Option<u32> {
        let t = self.tags.get(b as usize)?;
        t.iter()
            .position(|v| *v == 0)
            .map(|i| b * SLOTS as u32 + i as u32)
    }

    /// The bucket other than `b` where the flow in `slot` may live.
    fn alternate(&self, slot: u32) -> (u32, u16) {
        let p = self.probe(&self.entries[slot as usize].key());
        let b = slot / SLOTS as u32;
        (if p.b1 == b { p.b2 } else { p.b1 }, p.tag)
    }

    /// Free a slot in `p.b1` or `p.b2` by moving up to two flows to their other
    /// buckets; returns the freed slot.
    fn cuckoo_path(&mut self, p: &Probe) -> Option<u32> {
        for b in [p.b1, p.b2] {
            for i in 0..SLOTS as u32 {
                let s = b * SLOTS as u32 + i;
                let (alt, tag) = self.alternate(s);
                if let Some(free) = self.free_slot(alt) {
                    self.relocate(s, free, tag);
                    return Some(s);
                }
            }
        }
        for b in [p.b1, p.b2] {
            for i in 0..SLOTS as u32 {
                let s = b * SLOTS as u32 + i;
                let (alt, tag) = self.alternate(s);
                for j in 0..SLOTS as u32 {
                    let t = alt * SLOTS as u32 + j;
                    let (alt2, tag2) = self.alternate(t);
                    if alt2 == b {
                        continue;
                    }
                    if let Some(free) = self.free_slot(alt2) {
                        self.relocate(t, free, tag2);
                        self.relocate(s, t, tag);
                        return Some(s);
                    }
                }
            }
        }
        None
    }

    fn relocate(&mut self, from: u32, to: u32, tag: u16) {
        let e = self.entries[from as usize];
        self.place(to, tag, e);
        let (b, i) = (from as usize / SLOTS, from as usize % SLOTS);
        self.tags[b][i] = 0;
        self.stats.cuckoo_moves += 1;
    }

    /// The slot to evict among the new flow's candidate buckets: a closing flow if
    /// any, else the longest idle.
    fn victim(&self, p: &Probe, now_us: u32) -> u32 {
        let mut best = (p.b1 * SLOTS as u32, (false, 0u32));
        let mut first = true;
        for b in [p.b1, p.b2] {
            let mut m = self.occupied_in(b);
            while m != 0 {
                let s = b * SLOTS as u32 + m.trailing_zeros();
                let e = &self.entries[s as usize];
                let rank = (e.is_closing(), now_us.wrapping_sub(e.last_us));
                if first || rank > best.1 {
                    best = (s, rank);
                    first = false;
                }
                m &= m - 1;
            }
        }
        best.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tuple(i: u32) -> FlowTuple {
        let mut t = FlowTuple {
            proto: 6,
            sport: (i % 60000) as u16 + 1024,
            dport: 443,
            has_ports: true,
            ..FlowTuple::default()
        };
        t.src[..4].copy_from_slice(&(0x0a00_0000 | i).to_be_bytes());
        t.dst[..4].copy_from_slice(&[192, 0, 2, 1]);
        t
    }

    fn entry_for(key: &FlowKey, last_us: u32) -> FlowEntry {
        FlowEntry {
            addr_a: key.addr_a,
            addr_b: key.addr_b,
            port_a: key.port_a,
            port_b: key.port_b,
            proto: key.proto,
            flags: if key.ipv6 { flag::IPV6 } else { 0 },
            last_us,
            ..FlowEntry::default()
        }
    }

    #[test]
    fn both_directions_share_a_key() {
        let t = tuple(7);
        let (k1, fwd1) = FlowKey::from_tuple(&t);
        let (k2, fwd2) = FlowKey::from_tuple(&t.reversed());
        assert_eq!(k1, k2);
        assert_ne!(fwd1, fwd2);
        assert_eq!(k1.hash(1), k2.hash(1));
        assert_ne!(k1.hash(1), k1.hash(2));
    }

    #[test]
    fn fills_to_capacity_without_eviction_then_evicts_the_idlest() {
        let cap = 10_000;
        let mut t = ConnTable::new(cap, 42);
        for i in 0..cap {
            let (k, _) = FlowKey::from_tuple(&tuple(i));
            let p = t.probe(&k);
            assert_eq!(t.find(&k, &p), None);
            let r = t.insert(entry_for(&k, i), &p, i);
            assert_eq!(r.evicted, None, "flow {i} evicted something below capacity");
        }
        assert_eq!(t.len(), cap);
        for i in 0..cap {
            let (k, _) = FlowKey::from_tuple(&tuple(i));
            let p = t.probe(&k);
            let s = t.find(&k, &p).expect("every inserted flow is found");
            assert_eq!(t.entry(s).unwrap().last_us, i);
        }
        // Full: the next insert evicts the idlest flow of its two buckets.
        let (k, _) = FlowKey::from_tuple(&tuple(cap + 1));
        let p = t.probe(&k);
        let r = t.insert(entry_for(&k, cap + 1), &p, cap + 1);
        let ev = r.evicted.expect("full table evicts");
        let mut candidates = Vec::new();
        for b in [p.b1, p.b2] {
            for i in 0..SLOTS as u32 {
                let s = b * SLOTS as u32 + i;
                if s != r.slot && t.occupied(s) {
                    candidates.push(t.entry(s).unwrap().last_us);
                }
            }
        }
        assert!(candidates.iter().all(|l| *l >= ev.last_us));
        assert_eq!(t.len(), cap);
        assert_eq!(t.stats().evictions, 1);
        assert!(t.stats().cuckoo_moves > 0, "95% load needs displacement");
    }

    #[test]
    fn closing_flows_are_evicted_first() {
        let mut t = ConnTable::new(1, 9);
        let (k1, _) = FlowKey::from_tuple(&tuple(1));
        let p1 = t.probe(&k1);
        let mut e = entry_for(&k1, 100);
        e.flags |= flag::RST;
        t.insert(e, &p1, 100);
        let (k2, _) = FlowKey::from_tuple(&tuple(2));
        let p2 = t.probe(&k2);
        let r = t.insert(entry_for(&k2, 50), &p2, 100);
        assert_eq!(r.evicted.map(|e| e.key()), Some(k1));
    }

    #[test]
    fn remove_frees_the_slot() {
        let mut t = ConnTable::new(100, 3);
        let (k, _) = FlowKey::from_tuple(&tuple(5));
        let p = t.probe(&k);
        let s = t.insert(entry_for(&k, 0), &p, 0).slot;
        assert_eq!(t.remove(s).map(|e| e.key()), Some(k));
        assert_eq!(t.remove(s), None);
        assert_eq!(t.find(&k, &p), None);
        assert!(t.is_empty());
    }

    /// A burst takes candidates for all its packets before steering any; a flow
    /// inserted or removed in between must not be missed or found stale.
    #[test]
    fn candidates_taken_before_a_change_are_taken_again() {
        let mut t = ConnTable::new(100, 3);
        let (k, _) = FlowKey::from_tuple(&tuple(5));
        let p = t.probe(&k);
        let mut early = t.prefetch_second(&p);
        if early.need_second() {
            t.prefetch_third(&p, &mut early);
        }
        let s = t.insert(entry_for(&k, 0), &p, 0).slot;
        assert_eq!(t.find_among(&k, &p, early), Some(s));
        let before_removal = t.prefetch_second(&p);
        t.remove(s);
        assert_eq!(t.find_among(&k, &p, before_removal), None);
    }

    proptest! {
        #[test]
        fn tag_matches_agrees_with_a_compare_per_slot(
            tags in proptest::array::uniform8(prop_oneof![Just(0u16), Just(7u16), Just(0x8007u16), any::<u16>()]),
            tag in prop_oneof![Just(7u16), Just(0x8007u16), any::<u16>()],
        ) {
            let want = tags.iter().enumerate().fold(0u8, |m, (i, v)| m | u8::from(*v == tag) << i);
            prop_assert_eq!(tag_mask(&tags, tag), want);
            prop_assert_eq!(tag_mask_swar(&tags, tag), want);
        }

        #[test]
        fn key_order_is_the_byte_order_of_the_tuple(src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), sport: u16, dport: u16, same in any::<bool>()) {
            let dst = if same { src } else { dst };
            let t = FlowTuple { src, dst, sport, dport, proto: 17, has_ports: true, ipv6: true };
            prop_assert_eq!(FlowKey::from_tuple(&t).1, (src, sport) <= (dst, dport));
        }

        #[test]
        fn ipv4_fields_key_as_their_tuple_does(
            src in prop_oneof![Just([10, 0, 0, 1]), any::<[u8; 4]>()],
            dst in prop_oneof![Just([10, 0, 0, 1]), any::<[u8; 4]>()],
            sport in prop_oneof![Just(80u16), any::<u16>()],
            dport in prop_oneof![Just(80u16), any::<u16>()],
            proto in any::<u8>(),
        ) {
            let mut t = FlowTuple { sport, dport, proto, has_ports: true, ..FlowTuple::default() };
            t.src[..4].copy_from_slice(&src);
            t.dst[..4].copy_from_slice(&dst);
            prop_assert_eq!(FlowKey::from_ipv4(src, dst, sport, dport, proto), FlowKey::from_tuple(&t));
        }

        #[test]
        fn table_agrees_with_a_set(ops in proptest::collection::vec((0u32..300, any::<bool>()), 1..600)) {
            let mut t = ConnTable::new(64, 11);
            let mut model = std::collections::BTreeMap::new();
            for (now, (i, add)) in ops.into_iter().enumerate() {
                let now = now as u32;
                let (k, _) = FlowKey::from_tuple(&tuple(i));
                let p = t.probe(&k);
                match (t.find(&k, &p), add) {
                    (Some(s), false) => { t.remove(s); model.remove(&i); }
                    (None, true) => {
                        let r = t.insert(entry_for(&k, now), &p, now);
                        if let Some(ev) = r.evicted {
                            let gone = model.iter().find(|(_, key)| **key == ev.key()).map(|(j, _)| *j);
                            prop_assert!(gone.is_some());
                            model.remove(&gone.unwrap());
                        }
                        model.insert(i, k);
                    }
                    (found, _) => prop_assert_eq!(found.is_some(), model.contains_key(&i)),
                }
                prop_assert_eq!(t.len() as usize, model.len());
                prop_assert!(t.len() <= t.capacity());
            }
            for k in model.values() {
                let p = t.probe(k);
                prop_assert!(t.find(k, &p).is_some());
            }
        }
    }
}
