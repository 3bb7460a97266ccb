//! Weighted consistent placement of a power-of-two indirection table.
//!
//! The NIC steers `bucket = rss_hash & (buckets - 1)` to a shard and a shard to a node
//! through two tables of `u16` target ids; this module builds both. A table must
//! (a) give each target a share of entries proportional to its weight, so load follows
//! capacity, and (b) change as little as possible when targets come, go or are
//! reweighted, because every moved entry sends new flows of that bucket elsewhere and
//! cools the caches of both the old and the new owner.
//!
//! Two builders share one fill procedure, after Maglev (Eisenbud et al., NSDI '16):
//! every target owns a pseudo-random permutation of the slots, derived from a hash of
//! its id alone, and targets take turns claiming their most preferred open slot.
//!
//! - [`maglev_table`] fills an empty table. Because preferences depend only on ids,
//!   two tables built for similar target sets mostly agree, with no knowledge of the
//!   previous table: when one of eight equal targets goes, 12.7% of 65,536 entries
//!   move against the 12.5% minimum.
//! - [`rebalance_table`] starts from the table in service and moves the minimum number
//!   of entries the new quotas allow; only the freed entries go through the fill.
//!
//! Unlike the original (equal weights) and Katran's weighted variant (approximate
//! shares), each target's entry count is an exact quota by the largest-remainder
//! method. Exact quotas keep every count independent of the fill's turn order and make
//! a fresh [`maglev_table`] a fixed point of [`rebalance_table`], so switching from one
//! builder to the other moves nothing.

use alloc::collections::binary_heap::PeekMut;
use alloc::collections::{BTreeMap, BinaryHeap};
use alloc::vec;
use alloc::vec::Vec;
use core::cmp::Reverse;
use core::fmt;

/// The largest table accepted, in entries: 32 MiB of `u16`, far above the 65,536
/// buckets the NIC uses, and small enough that every rank and slot index fits the
/// 24-bit fields this module packs into sort keys.
pub const MAX_TABLE_SIZE: usize = 1 << 24;

/// One placement target (a shard or a node) and its weight; weight 0 = takes no entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub id: u16,
    pub weight: u32,
}

/// Why a table could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlacementError {
    /// No target has a weight above zero, so no entry could be assigned.
    NoTargets,
    /// The same target id appears more than once in the target list.
    DuplicateTarget(u16),
    /// The table size is not a power of two (zero included).
    TableSizeNotPowerOfTwo(usize),
    /// The table size exceeds [`MAX_TABLE_SIZE`].
    TableTooLarge(usize),
    /// Two tables that should describe the same buckets have different lengths.
    PreviousSizeMismatch { expected: usize, got: usize },
}

impl fmt::Display for PlacementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoTargets => f.write_str("no placement target has a weight above zero"),
            Self::DuplicateTarget(id) => {
                write!(f, "placement target {id} is listed more than once")
            }
            Self::TableSizeNotPowerOfTwo(size) => {
                write!(f, "table size {size} is not a power of two")
            }
            Self::TableTooLarge(size) => {
                write!(
                    f,
                    "table size {size} exceeds the maximum of {MAX_TABLE_SIZE} entries"
                )
            }
            Self::PreviousSizeMismatch { expected, got } => {
                write!(f, "table has {got} entries where {expected} were expected")
            }
        }
    }
}

impl core::error::Error for PlacementError {}

/// A fresh Maglev table of `size` entries over `targets`.
///
/// Each target with a weight above zero receives exactly its largest-remainder quota
/// of `size * weight / total_weight` entries; zero-weight targets receive none. The
/// result depends only on the set of targets, not on their order in the slice.
///
/// # Errors
/// [`PlacementError::TableTooLarge`] or [`PlacementError::TableSizeNotPowerOfTwo`] for
/// a bad `size`, then [`PlacementError::DuplicateTarget`] for a repeated id, then
/// [`PlacementError::NoTargets`] when no weight is above zero.
pub fn maglev_table(targets: &[Target], size: usize) -> Result<Vec<u16>, PlacementError> {
    check_size(size)?;
    let live = live_targets(targets, size)?;
    let want: Vec<usize> = live.iter().map(|t| t.quota).collect();
    let mut table = vec![0; size];
    fill(&mut table, OpenSlots::all(size), &live, &want);
    Ok(table)
}

/// Minimal-disruption update of `previous` to the quotas of `targets`.
///
/// Every entry whose target is still live is kept while that target stays within its
/// new quota; of an over-quota target's entries, those earliest in its own Maglev
/// preference are kept, so the survivors are the ones a fresh table would most likely
/// give it. The freed entries (of removed, unknown or zero-weight ids, and the excess
/// of shrunk targets) are then handed to under-quota targets by the Maglev fill, so
/// they spread over the table instead of forming runs. Exactly
/// `sum(max(0, old_count - new_quota))` entries move, counting removed ids' entries in
/// full: the least any table with the new quotas can differ from `previous`.
///
/// # Errors
/// As [`maglev_table`], with the size taken from `previous.len()`.
pub fn rebalance_table(previous: &[u16], targets: &[Target]) -> Result<Vec<u16>, PlacementError> {
    let size = previous.len();
    check_size(size)?;
    let live = live_targets(targets, size)?;

    // A direct map from id to position in `live`: one lookup per entry keeps the
    // passes over the table linear, whatever the number of targets.
    let mut index_of = vec![NOT_LIVE; 1 << u16::BITS];
    for (i, t) in live.iter().enumerate() {
        if let Some(slot) = index_of.get_mut(usize::from(t.id)) {
            *slot = i;
        }
    }
    let live_index = |id: u16| {
        index_of
            .get(usize::from(id))
            .copied()
            .filter(|&i| i != NOT_LIVE)
    };

    let mut held = vec![0usize; live.len()];
    for &id in previous {
        if let Some(count) = live_index(id).and_then(|i| held.get_mut(i)) {
            *count += 1;
        }
    }

    let mut open = OpenSlots::none(size);
    let mut excess = Vec::new();
    for (slot, &id) in previous.iter().enumerate() {
        match live_index(id) {
            None => open.insert(slot),
            Some(i) => {
                if let (Some(t), Some(&count)) = (live.get(i), held.get(i))
                    && count > t.quota
                {
                    excess.push(excess_key(i, t.rank(slot), slot));
                }
            }
        }
    }
    // Sorted by target, then by preference rank: each over-quota target keeps the
    // first `quota` of its entries and frees the rest.
    excess.sort_unstable();
    let mut kept = vec![0usize; live.len()];
    for key in excess {
        let (i, slot) = split_excess_key(key);
        if let (Some(t), Some(k)) = (live.get(i), kept.get_mut(i)) {
            if *k < t.quota {
                *k += 1;
            } else {
                open.insert(slot);
            }
        }
    }

    let want: Vec<usize> = live
        .iter()
        .zip(&held)
        .map(|(t, &count)| t.quota.saturating_sub(count))
        .collect();
    let mut table = previous.to_vec();
    fill(&mut table, open, &live, &want);
    Ok(table)
}

/// Fraction of entries whose target differs between `a` and `b` (0.0..=1.0).
///
/// Tables of different lengths index different bucket spaces, so no entry can be said
/// to have stayed: the fraction is then 1.0. Two empty tables have moved nothing.
pub fn moved_fraction(a: &[u16], b: &[u16]) -> f64 {
    try_moved_fraction(a, b).unwrap_or(1.0)
}

/// [`moved_fraction`] for callers that treat a length mismatch as a fault.
///
/// # Errors
/// [`PlacementError::PreviousSizeMismatch`] with `expected = previous.len()` and
/// `got = next.len()` when the lengths differ.
pub fn try_moved_fraction(previous: &[u16], next: &[u16]) -> Result<f64, PlacementError> {
    if previous.len() != next.len() {
        return Err(PlacementError::PreviousSizeMismatch {
            expected: previous.len(),
            got: next.len(),
        });
    }
    if previous.is_empty() {
        return Ok(0.0);
    }
    let moved = previous.iter().zip(next).filter(|(a, b)| a != b).count();
    Ok(moved as f64 / previous.len() as f64)
}

/// Per-target entry counts of a table, for checks and reports.
pub fn target_counts(table: &[u16]) -> BTreeMap<u16, usize> {
    let mut counts = BTreeMap::new();
    for &id in table {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// Marks an id without a live target in `rebalance_table`'s id map.
const NOT_LIVE: usize = usize::MAX;

/// Seeds of the two hashes of a target id; they fix every table's layout, so changing
/// them reshuffles every deployed table at the next rebuild.
const OFFSET_SEED: u64 = 0x6a09_e667_f3bc_c908;
const SKIP_SEED: u64 = 0xbb67_ae85_84ca_a73b;

/// The splitmix64 output function applied to `seed + (id + 1) * golden ratio`: a
/// fixed, well-mixed hash, so small consecutive ids (the usual shard and node numbers)
/// still get unrelated permutations, and the layout never depends on a library's
/// hasher that could change between releases.
fn hash_id(id: u16, seed: u64) -> u64 {
    let mut z = seed.wrapping_add((u64::from(id) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn check_size(size: usize) -> Result<(), PlacementError> {
    if size > MAX_TABLE_SIZE {
        Err(PlacementError::TableTooLarge(size))
    } else if !size.is_power_of_two() {
        Err(PlacementError::TableSizeNotPowerOfTwo(size))
    } else {
        Ok(())
    }
}

/// A target with weight above zero: its quota and its slot permutation
/// `slot(j) = (offset + j * skip) mod size`.
struct LiveTarget {
    id: u16,
    quota: usize,
    offset: usize,
    /// Odd, hence coprime with the power-of-two size: the permutation visits every
    /// slot exactly once per cycle.
    skip: usize,
    /// `skip`'s inverse modulo the size, to find a slot's position in the permutation
    /// without walking it.
    skip_inverse: usize,
    mask: usize,
}

impl LiveTarget {
    fn new(id: u16, quota: usize, size: usize) -> Self {
        let mask = size.wrapping_sub(1);
        // Bits above `mask` are dropped, so truncating the hash to usize is harmless.
        let offset = hash_id(id, OFFSET_SEED) as usize & mask;
        let skip = (hash_id(id, SKIP_SEED) as usize & mask) | 1;
        Self {
            id,
            quota,
            offset,
            skip,
            skip_inverse: odd_inverse(skip) & mask,
            mask,
        }
    }

    /// Position of `slot` in this target's preference order (0 = most preferred).
    fn rank(&self, slot: usize) -> usize {
        slot.wrapping_sub(self.offset)
            .wrapping_mul(self.skip_inverse)
            & self.mask
    }
}

/// The inverse of an odd number modulo `2^usize::BITS`, by Newton's iteration: each
/// step doubles the number of correct low bits, starting from 3 (`x * x = 1 mod 8`),
/// so five steps reach 96 bits, enough for any usize.
fn odd_inverse(x: usize) -> usize {
    let mut inv = x;
    for _ in 0..5 {
        inv = inv.wrapping_mul(2usize.wrapping_sub(x.wrapping_mul(inv)));
    }
    inv
}

/// The live targets in id order, each with its largest-remainder quota of `size`.
///
/// Sorting by id first is what makes every table independent of the order of the
/// caller's slice: hashes, quota tie-breaks and fill turns all follow the id.
fn live_targets(targets: &[Target], size: usize) -> Result<Vec<LiveTarget>, PlacementError> {
    let mut sorted = targets.to_vec();
    sorted.sort_unstable_by_key(|t| t.id);
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0].id == pair[1].id) {
        return Err(PlacementError::DuplicateTarget(pair[0].id));
    }
    sorted.retain(|t| t.weight > 0);
    // At most 65,536 weights below 2^32: the total fits in 48 bits.
    let total: u128 = sorted.iter().map(|t| u128::from(t.weight)).sum();
    if total == 0 {
        return Err(PlacementError::NoTargets);
    }

    let size_wide = size as u128;
    let mut quotas = Vec::with_capacity(sorted.len());
    let mut remainders = Vec::with_capacity(sorted.len());
    for (i, t) in sorted.iter().enumerate() {
        let share = size_wide * u128::from(t.weight);
        // share / total <= size, so the quotient fits in usize.
        quotas.push((share / total) as usize);
        remainders.push((share % total, i));
    }
    // The floors leave fewer than `sorted.len()` entries over; they go one each to
    // the largest remainders, ties to the lower id, so counts are exact and each
    // within one of the ideal share.
    let leftover = size.saturating_sub(quotas.iter().sum());
    remainders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take(leftover) {
        if let Some(q) = quotas.get_mut(i) {
            *q += 1;
        }
    }

    Ok(sorted
        .iter()
        .zip(quotas)
        .map(|(t, quota)| LiveTarget::new(t.id, quota, size))
        .collect())
}

/// Sort key of an over-quota entry: target index, then preference rank. Ranks and
/// slots are below 2^24 and there are at most 2^16 targets, so the fields never overlap.
fn excess_key(target: usize, rank: usize, slot: usize) -> u64 {
    ((target as u64) << 48) | ((rank as u64) << 24) | slot as u64
}

fn split_excess_key(key: u64) -> (usize, usize) {
    ((key >> 48) as usize, (key & 0xff_ffff) as usize)
}

/// The slots still to be assigned, one bit each: 2 MiB for the largest table.
struct OpenSlots {
    words: Vec<u64>,
}

impl OpenSlots {
    fn none(len: usize) -> Self {
        Self {
            words: vec![0; len.div_ceil(64)],
        }
    }

    fn all(len: usize) -> Self {
        let mut words = vec![u64::MAX; len / 64];
        if !len.is_multiple_of(64) {
            words.push((1 << (len % 64)) - 1);
        }
        Self { words }
    }

    fn insert(&mut self, slot: usize) {
        if let Some(word) = self.words.get_mut(slot / 64) {
            *word |= 1 << (slot % 64);
        }
    }

    /// Clears `slot` and tells whether it was open.
    fn take(&mut self, slot: usize) -> bool {
        let bit = 1 << (slot % 64);
        match self.words.get_mut(slot / 64) {
            Some(word) if *word & bit != 0 => {
                *word &= !bit;
                true
            }
            _ => false,
        }
    }
}

/// Fixed-point bits of the fill's virtual clock, which runs from 0 to 1. Wants are at
/// most 2^24, so every step is at least 2^16 and the clock strictly advances; a clock
/// value shifted left by [`INDEX_BITS`] still fits a u64.
const CLOCK_BITS: u32 = 40;

/// Bits of a turn key that hold the target index: at most 2^16 distinct ids.
const INDEX_BITS: u32 = 16;

/// Assigns every open slot: target `i` claims `want[i]` of them, each time taking the
/// next open slot of its permutation.
///
/// Turns follow a virtual clock: target `i`'s k-th claim (counting from 1) is due at
/// `k / want[i]`, ties to the lower index (lower id). With equal wants this is Maglev's round robin; with
/// unequal wants every target's claims spread evenly over the whole fill, so no target
/// is left to claim the last, most contested slots in a burst far from its
/// preferences. Each turn is one u64 key (due time above the index) in a heap, so a
/// turn costs a few branch-free comparisons, and a claim re-sifts the top in place
/// instead of a pop and a push: the heap is the fill's main cost after the probes.
///
/// The open slots must number exactly `sum(want)`. Then a target due a turn always
/// finds one within a single cycle of its permutation: some slot is still open, and
/// it cannot have been passed over, since slots only ever close. Each target's cursor
/// only moves forward, so the whole fill costs one heap step per slot plus the probes,
/// about `size * ln(size)` in all as in Maglev, never a scan of all targets per slot.
fn fill(table: &mut [u16], mut open: OpenSlots, live: &[LiveTarget], want: &[usize]) {
    let size = table.len();
    let mut cursor: Vec<usize> = live.iter().map(|t| t.offset).collect();
    let mut remaining = want.to_vec();
    let steps: Vec<u64> = want
        .iter()
        .map(|&w| (1 << CLOCK_BITS) / (w as u64).max(1))
        .collect();
    let mut turns: BinaryHeap<Reverse<u64>> = steps
        .iter()
        .zip(want)
        .enumerate()
        .filter(|&(_, (_, &w))| w > 0)
        .map(|(index, (&step, _))| Reverse((step << INDEX_BITS) | index as u64))
        .collect();
    while let Some(mut turn) = turns.peek_mut() {
        let index = (turn.0 & ((1 << INDEX_BITS) - 1)) as usize;
        let claimed = live
            .get(index)
            .zip(cursor.get_mut(index))
            .and_then(|(target, pos)| Some((claim(&mut open, target, pos, size)?, target.id)));
        // `claimed` is never `None` while the open slots number sum(want), as above;
        // should that ever break, the target just stops claiming rather than loop or
        // panic.
        let (Some((slot, id)), Some(left), Some(&step)) =
            (claimed, remaining.get_mut(index), steps.get(index))
        else {
            PeekMut::pop(turn);
            continue;
        };
        if let Some(entry) = table.get_mut(slot) {
            *entry = id;
        }
        *left = left.saturating_sub(1);
        if *left == 0 {
            PeekMut::pop(turn);
        } else {
            turn.0 += step << INDEX_BITS;
        }
    }
}

/// Advances `target`'s cursor `pos` past its next open slot, closes that slot and
/// returns it; gives up after one full cycle of the permutation.
fn claim(open: &mut OpenSlots, target: &LiveTarget, pos: &mut usize, size: usize) -> Option<usize> {
    for _ in 0..size {
        let slot = *pos;
        *pos = (*pos + target.skip) & target.mask;
        if open.take(slot) {
            return Some(slot);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use proptest::prelude::*;

    fn targets(list: &[(u16, u32)]) -> Vec<Target> {
        list.iter()
            .map(|&(id, weight)| Target { id, weight })
            .collect()
    }

    fn equal(n: u16) -> Vec<Target> {
        (0..n).map(|id| Target { id, weight: 1 }).collect()
    }

    /// Largest-remainder quotas worked out one entry at a time, independently of
    /// `live_targets`: floors first, then each leftover entry to the largest remainder
    /// not yet rounded up, ties to the lower id.
    fn expected_quotas(targets: &[Target], size: usize) -> BTreeMap<u16, usize> {
        let live: Vec<&Target> = targets.iter().filter(|t| t.weight > 0).collect();
        let total: u128 = live.iter().map(|t| u128::from(t.weight)).sum();
        let mut quotas = BTreeMap::new();
        let mut remainders = BTreeMap::new();
        for t in &live {
            let share = size as u128 * u128::from(t.weight);
            quotas.insert(t.id, (share / total) as usize);
            remainders.insert(t.id, share % total);
        }
        while quotas.values().sum::<usize>() < size {
            let mut best: Option<(u16, u128)> = None;
            for (&id, &rem) in &remainders {
                if best.is_none_or(|(_, r)| rem > r) {
                    best = Some((id, rem));
                }
            }
            let (id, _) = best.expect("fewer leftovers than targets");
            remainders.remove(&id);
            *quotas.get_mut(&id).expect("live id") += 1;
        }
        quotas.retain(|_, &mut q| q > 0);
        quotas
    }

    /// The least number of entries any table with the new quotas must differ from
    /// `previous` in.
    fn minimum_moves(previous: &[u16], targets: &[Target]) -> usize {
        let quotas = expected_quotas(targets, previous.len());
        target_counts(previous)
            .iter()
            .map(|(id, &count)| count.saturating_sub(quotas.get(id).copied().unwrap_or(0)))
            .sum()
    }

    fn moved(a: &[u16], b: &[u16]) -> usize {
        a.iter().zip(b).filter(|(x, y)| x != y).count()
    }

    const SIZE: usize = 65_536;

    #[test]
    fn fresh_counts_are_exact_quotas() {
        let cases = [
            targets(&[(0, 1)]),
            targets(&[(3, 1), (1, 2), (2, 3)]),
            targets(&[(10, 7), (20, 0), (30, 13), (40, 1)]),
            targets(&[(0, u32::MAX), (1, u32::MAX), (2, u32::MAX - 1), (3, 1)]),
            equal(64),
            equal(3),
        ];
        for case in &cases {
            for size in [1, 2, 8, 64, 1024, SIZE] {
                let table = maglev_table(case, size).unwrap();
                assert_eq!(table.len(), size);
                assert_eq!(
                    target_counts(&table),
                    expected_quotas(case, size),
                    "{case:?} {size}"
                );
            }
        }
    }

    #[test]
    fn quotas_are_within_one_of_the_ideal_share() {
        let case = targets(&[(1, 5), (2, 3), (3, 3), (4, 1), (5, 100)]);
        let table = maglev_table(&case, SIZE).unwrap();
        let counts = target_counts(&table);
        for t in &case {
            let ideal = SIZE as f64 * f64::from(t.weight) / 112.0;
            let got = counts[&t.id] as f64;
            assert!((got - ideal).abs() < 1.0, "{t:?}: {got} vs {ideal}");
        }
    }

    #[test]
    fn zero_weight_targets_get_nothing() {
        let case = targets(&[(1, 0), (2, 1), (3, 0), (4, 2)]);
        let table = maglev_table(&case, 4096).unwrap();
        assert!(table.iter().all(|&id| id == 2 || id == 4));
        let previous = maglev_table(&equal(5), 4096).unwrap();
        let table = rebalance_table(&previous, &case).unwrap();
        assert!(table.iter().all(|&id| id == 2 || id == 4));
        assert_eq!(target_counts(&table), expected_quotas(&case, 4096));
    }

    #[test]
    fn tables_do_not_depend_on_target_order() {
        let case = targets(&[(9, 3), (2, 1), (40, 5), (7, 0), (11, 2)]);
        let mut reversed = case.clone();
        reversed.reverse();
        let mut rotated = case.clone();
        rotated.rotate_left(2);
        let fresh = maglev_table(&case, SIZE).unwrap();
        assert_eq!(fresh, maglev_table(&case, SIZE).unwrap());
        assert_eq!(fresh, maglev_table(&reversed, SIZE).unwrap());
        assert_eq!(fresh, maglev_table(&rotated, SIZE).unwrap());

        let previous = maglev_table(&equal(6), SIZE).unwrap();
        let rebalanced = rebalance_table(&previous, &case).unwrap();
        assert_eq!(rebalanced, rebalance_table(&previous, &reversed).unwrap());
        assert_eq!(rebalanced, rebalance_table(&previous, &rotated).unwrap());
    }

    #[test]
    fn fresh_table_is_a_fixed_point_of_rebalance() {
        let case = targets(&[(1, 5), (2, 3), (3, 3), (4, 1)]);
        let fresh = maglev_table(&case, SIZE).unwrap();
        assert_eq!(rebalance_table(&fresh, &case).unwrap(), fresh);
    }

    #[test]
    fn removing_a_target_moves_only_its_entries() {
        let all = equal(8);
        let previous = maglev_table(&all, SIZE).unwrap();
        let remaining: Vec<Target> = all.iter().copied().filter(|t| t.id != 5).collect();
        let next = rebalance_table(&previous, &remaining).unwrap();
        let removed = target_counts(&previous)[&5];
        assert_eq!(moved(&previous, &next), removed);
        for (old, new) in previous.iter().zip(&next) {
            assert_eq!(*old == 5, old != new);
        }
        assert_eq!(target_counts(&next), expected_quotas(&remaining, SIZE));
        assert_eq!(
            moved_fraction(&previous, &next),
            removed as f64 / SIZE as f64
        );

        // A fresh table moves more, but Maglev keeps it close to the minimum.
        let fresh = maglev_table(&remaining, SIZE).unwrap();
        let fresh_moved = moved_fraction(&previous, &fresh);
        assert!(fresh_moved >= moved_fraction(&previous, &next));
        assert!(fresh_moved < 1.0 / 8.0 + 0.05, "maglev moved {fresh_moved}");
    }

    #[test]
    fn adding_a_target_moves_exactly_its_quota() {
        let previous = maglev_table(&equal(8), SIZE).unwrap();
        let all = equal(9);
        let next = rebalance_table(&previous, &all).unwrap();
        let quota = expected_quotas(&all, SIZE)[&8];
        assert_eq!(moved(&previous, &next), quota);
        for (old, new) in previous.iter().zip(&next) {
            assert_eq!(*new == 8, old != new);
        }
        assert_eq!(target_counts(&next), expected_quotas(&all, SIZE));

        let fresh = maglev_table(&all, SIZE).unwrap();
        let fresh_moved = moved_fraction(&previous, &fresh);
        assert!(fresh_moved >= quota as f64 / SIZE as f64);
        assert!(fresh_moved < 1.0 / 9.0 + 0.05, "maglev moved {fresh_moved}");
    }

    #[test]
    fn reweighting_moves_the_minimum() {
        let before = targets(&[(1, 1), (2, 1), (3, 1), (4, 1)]);
        let after = targets(&[(1, 3), (2, 1), (3, 2), (4, 0), (5, 2)]);
        let previous = maglev_table(&before, SIZE).unwrap();
        let next = rebalance_table(&previous, &after).unwrap();
        assert_eq!(moved(&previous, &next), minimum_moves(&previous, &after));
        assert_eq!(target_counts(&next), expected_quotas(&after, SIZE));
    }

    #[test]
    fn reassigned_entries_spread_over_the_table() {
        let previous = maglev_table(&equal(8), SIZE).unwrap();
        let next = rebalance_table(&previous, &equal(9)).unwrap();
        let quota = expected_quotas(&equal(9), SIZE)[&8];
        // Each sixteenth of the table holds close to a sixteenth of the new target.
        for chunk in next.chunks(SIZE / 16) {
            let here = chunk.iter().filter(|&&id| id == 8).count();
            assert!(here.abs_diff(quota / 16) < quota / 64, "{here} of {quota}");
        }
        let longest_run = next
            .split(|&id| id != 8)
            .map(<[u16]>::len)
            .max()
            .unwrap_or(0);
        assert!(longest_run < 8, "run of {longest_run}");
    }

    #[test]
    fn shrinking_target_keeps_its_preferred_entries() {
        let before = targets(&[(1, 1), (2, 1)]);
        let after = targets(&[(1, 1), (2, 3)]);
        let previous = maglev_table(&before, 1024).unwrap();
        let next = rebalance_table(&previous, &after).unwrap();
        // Target 1 keeps its 256 most preferred slots out of the 512 it held.
        let live = live_targets(&after, 1024).unwrap();
        let one = live.iter().find(|t| t.id == 1).unwrap();
        let mut held: Vec<usize> = (0..1024)
            .filter(|&s| previous[s] == 1)
            .map(|s| one.rank(s))
            .collect();
        held.sort_unstable();
        let kept: Vec<usize> = held.iter().copied().take(256).collect();
        let mut now: Vec<usize> = (0..1024)
            .filter(|&s| next[s] == 1)
            .map(|s| one.rank(s))
            .collect();
        now.sort_unstable();
        assert_eq!(now, kept);
    }

    #[test]
    fn rank_inverts_the_permutation() {
        for size in [1, 2, 64, 4096] {
            let t = LiveTarget::new(77, 0, size);
            let mut slot = t.offset;
            for j in 0..size {
                assert_eq!(t.rank(slot), j);
                slot = (slot + t.skip) & t.mask;
            }
        }
    }

    #[test]
    fn largest_table_builds() {
        let table = maglev_table(&targets(&[(3, 1)]), MAX_TABLE_SIZE).unwrap();
        assert_eq!(table.len(), MAX_TABLE_SIZE);
        assert!(table.iter().all(|&id| id == 3));
    }

    #[test]
    fn bad_inputs_are_errors() {
        use PlacementError::*;
        let two = equal(2);
        assert_eq!(maglev_table(&two, 0), Err(TableSizeNotPowerOfTwo(0)));
        assert_eq!(maglev_table(&two, 3), Err(TableSizeNotPowerOfTwo(3)));
        assert_eq!(maglev_table(&two, 1 << 25), Err(TableTooLarge(1 << 25)));
        assert_eq!(
            maglev_table(&two, usize::MAX),
            Err(TableTooLarge(usize::MAX))
        );
        assert_eq!(maglev_table(&[], 64), Err(NoTargets));
        assert_eq!(
            maglev_table(&targets(&[(1, 0), (2, 0)]), 64),
            Err(NoTargets)
        );
        let dup = targets(&[(4, 1), (9, 2), (4, 0)]);
        assert_eq!(maglev_table(&dup, 64), Err(DuplicateTarget(4)));

        let previous = maglev_table(&two, 64).unwrap();
        assert_eq!(rebalance_table(&[], &two), Err(TableSizeNotPowerOfTwo(0)));
        assert_eq!(
            rebalance_table(&previous[..48], &two),
            Err(TableSizeNotPowerOfTwo(48))
        );
        assert_eq!(rebalance_table(&previous, &[]), Err(NoTargets));
        assert_eq!(rebalance_table(&previous, &dup), Err(DuplicateTarget(4)));

        assert_eq!(
            try_moved_fraction(&previous, &previous[..32]),
            Err(PreviousSizeMismatch {
                expected: 64,
                got: 32
            })
        );
        assert_eq!(moved_fraction(&previous, &previous[..32]), 1.0);
        assert_eq!(moved_fraction(&[], &[]), 0.0);
        assert_eq!(moved_fraction(&[1, 2, 3, 4], &[1, 2, 0, 0]), 0.5);
    }

    #[test]
    fn errors_read_clearly() {
        let text = PlacementError::PreviousSizeMismatch {
            expected: 64,
            got: 32,
        }
        .to_string();
        assert_eq!(text, "table has 32 entries where 64 were expected");
        assert_eq!(
            PlacementError::TableTooLarge(1 << 25).to_string(),
            "table size 33554432 exceeds the maximum of 16777216 entries"
        );
        assert_eq!(
            PlacementError::DuplicateTarget(7).to_string(),
            "placement target 7 is listed more than once"
        );
    }

    fn target_set() -> impl Strategy<Value = Vec<Target>> {
        let weight = prop_oneof![0u32..6, Just(u32::MAX), any::<u32>()];
        proptest::collection::btree_map(0u16..40, weight, 0..12)
            .prop_map(|map| {
                map.into_iter()
                    .map(|(id, weight)| Target { id, weight })
                    .collect::<Vec<_>>()
            })
            .prop_shuffle()
    }

    fn table_of(size_log2: core::ops::Range<u32>) -> impl Strategy<Value = Vec<u16>> {
        size_log2.prop_flat_map(|log2| proptest::collection::vec(0u16..48, 1usize << log2))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn fresh_tables_hold_exact_quotas(set in target_set(), log2 in 0u32..12) {
            let size = 1usize << log2;
            match maglev_table(&set, size) {
                Ok(table) => {
                    prop_assert_eq!(table.len(), size);
                    prop_assert_eq!(target_counts(&table), expected_quotas(&set, size));
                    let mut sorted = set.clone();
                    sorted.sort_unstable_by_key(|t| t.id);
                    prop_assert_eq!(maglev_table(&sorted, size), Ok(table));
                }
                Err(e) => {
                    prop_assert_eq!(e, PlacementError::NoTargets);
                    prop_assert!(set.iter().all(|t| t.weight == 0));
                }
            }
        }

        #[test]
        fn rebalance_moves_the_minimum(set in target_set(), previous in table_of(0..12)) {
            match rebalance_table(&previous, &set) {
                Ok(next) => {
                    let quotas = expected_quotas(&set, previous.len());
                    prop_assert_eq!(target_counts(&next), quotas);
                    prop_assert_eq!(moved(&previous, &next), minimum_moves(&previous, &set));
                    // Nothing moves from a target that is live and within quota.
                    let old = target_counts(&previous);
                    let new = target_counts(&next);
                    for (old_id, new_id) in previous.iter().zip(&next) {
                        if old_id != new_id {
                            prop_assert!(new.get(old_id).copied().unwrap_or(0) < old[old_id]);
                        }
                    }
                    prop_assert_eq!(rebalance_table(&next, &set), Ok(next.clone()));
                    let mut sorted = set.clone();
                    sorted.sort_unstable_by_key(|t| t.id);
                    prop_assert_eq!(rebalance_table(&previous, &sorted), Ok(next));
                }
                Err(e) => {
                    prop_assert_eq!(e, PlacementError::NoTargets);
                    prop_assert!(set.iter().all(|t| t.weight == 0));
                }
            }
        }

        #[test]
        fn arbitrary_inputs_never_panic(
            list in proptest::collection::vec((0u16..8, any::<u32>()), 0..10),
            size in prop_oneof![0usize..5000, Just(MAX_TABLE_SIZE + 1), any::<usize>()],
            previous in proptest::collection::vec(any::<u16>(), 0..300),
        ) {
            let set: Vec<Target> = list.iter().map(|&(id, weight)| Target { id, weight }).collect();
            let mut ids: Vec<u16> = list.iter().map(|&(id, _)| id).collect();
            ids.sort_unstable();
            let duplicated = ids.windows(2).any(|w| w[0] == w[1]);
            for result in [
                maglev_table(&set, size.min(1 << 16)).map(|t| t.len()),
                rebalance_table(&previous, &set).map(|t| t.len()),
            ] {
                if duplicated {
                    prop_assert!(matches!(result, Err(PlacementError::DuplicateTarget(_))
                        | Err(PlacementError::TableSizeNotPowerOfTwo(_))));
                }
            }
            let fresh = maglev_table(&set, size);
            if size > MAX_TABLE_SIZE {
                prop_assert_eq!(fresh, Err(PlacementError::TableTooLarge(size)));
            } else if !size.is_power_of_two() {
                prop_assert_eq!(fresh, Err(PlacementError::TableSizeNotPowerOfTwo(size)));
            }
            let fraction = moved_fraction(&previous, &previous[previous.len() / 2..]);
            prop_assert!((0.0..=1.0).contains(&fraction));
        }
    }
}
