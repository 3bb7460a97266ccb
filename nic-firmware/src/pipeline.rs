//! The data-plane pipeline: steering, flowlet sharding, ageing, counters and records.
//!
//! [`Pipeline::process_burst`] is the fast path. It works on bursts of [`BURST`]
//! packets in four passes — parse and hash every packet and prefetch its first
//! bucket's tags; prefetch the entries whose tags match there, or else the second
//! bucket's tags; for those, prefetch the second bucket's matching entries; then look
//! up, insert and steer each packet in order — so the DRAM misses of a burst overlap
//! instead of queueing. Consecutive bursts overlap too: the next burst's first pass
//! runs between this burst's entry prefetches and its lookups, which gives each miss
//! a whole pass to resolve. Established flows that nothing moves are updated in place
//! in the table on a short path; every other case takes the general one.
//!
//! Steering rules (DESIGN.md, principle 6):
//! - a new flow takes `bucket = rss_hash & (buckets - 1)` → shard → node, and the
//!   connection table pins that node for the flow's life; changing the bucket or shard
//!   table afterwards moves only new flows;
//! - a node that is not `active` takes no new flows: its buckets' new flows go to a
//!   weighted fallback over the active nodes;
//! - a `draining` node keeps its established flows; a `down` node's established flows
//!   are remapped on their next packet — only they;
//! - a flow of a class whose policy has a shard group of k > 1 moves to the next
//!   member of its group only when an idle gap longer than the flowlet gap δ ends a
//!   flowlet, so no flowlet is ever split across nodes and reordered;
//! - the host moves an established flow only after handing its state to the new node:
//!   [`Pipeline::hand_off`] moves it at its next flowlet boundary (so packets in flight
//!   to the old node are not overtaken), [`Pipeline::pin_flow`] at once.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec;
use alloc::vec::Vec;

use hdl_bindings::telemetry::{EndReason, FeatureRecord, MAX_FEATURE_PACKETS, RecordKind};

use crate::config::{
    ConfigError, MAX_GROUP, MAX_TIMEOUT_MS, NodeConfig, NodeState, PipelineConfig,
};
use crate::conntable::{
    Candidates, ConnTable, FlowEntry, FlowKey, Probe, UNCLASSIFIED, flag, prefetch,
};
use crate::parse::{LinkType, ethernet_ipv4_fast, parse_general};
use crate::placement::{Target, maglev_table};
use crate::profile::{ClassifierTables, features};
use crate::rss::Toeplitz;
use crate::{Class, FlowTuple, Verdict, ipproto};

/// Packets processed together by [`Pipeline::process_burst`]. Measured, not guessed:
/// larger bursts issue more prefetches at once than the core has miss buffers for, and
/// the excess stall; smaller ones leave too little time for a miss to resolve. On the
/// 1M-flow uniform benchmark 16–20 was best (8: 82 ns/packet, 20: 63, 32: 74, 64: 81);
/// with overlapping bursts, measured again in CPU time per packet, 12–20 are within
/// noise of each other (8: 63 ns, 12: 61, 16: 57, 20: 59) and 32 is worse (72). With
/// the second bucket's own pass, by `bench dataplane --repeat`, 16 and 20 were within
/// noise (uniform 35.1 and 35.3 ns best), 12 and 14 a little slower, 24 and 32 slower
/// (uniform 42.3 and 53.6).
pub const BURST: usize = 20;
/// Ageing visits every bucket of the connection table once per sweep period of NIC
/// time: half the shortest timeout, so a flow ends at most 1.5 timeouts after its last
/// packet, held between this and [`MAX_SWEEP_PERIOD_NS`] (a sweep is the table's whole
/// memory; once a second is cheap at line rate, but not when days of NIC time pass in
/// a simulation).
const MIN_SWEEP_PERIOD_NS: u64 = 1_000_000_000;
/// Longest sweep period: see [`MIN_SWEEP_PERIOD_NS`].
const MAX_SWEEP_PERIOD_NS: u64 = 60_000_000_000;
/// Entries of the fallback table used when a bucket's node takes no new flows.
const FALLBACK_ENTRIES: usize = 256;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;

/// Why [`Pipeline::pin_flow`] refused a pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinRefused {
    /// The connection table does not hold the flow.
    NoSuchFlow,
    /// The node is undefined or not `active`: it takes no flows.
    NodeNotActive,
}

/// One packet offered to the NIC.
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    /// NIC time of arrival, ns.
    pub ts_ns: u64,
    /// The captured bytes, starting at the link header.
    pub data: &'a [u8],
    /// Length on the wire (≥ `data.len()` when a capture cut the packet short).
    pub wire_len: u32,
}

/// What the NIC decided for one packet: 20 bytes, so writing one per packet costs
/// little. The packet's tuple is not repeated here; whoever keeps the packet can
/// parse it again (the decision log does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// RSS hash of the packet as seen on the wire (0 if it did not parse).
    pub rss_hash: u32,
    pub bucket: u32,
    /// Shard and node the packet was steered through (meaningful for `Forward`).
    pub shard: u16,
    pub node: u16,
    /// The flow's flowlet number (0 for its first flowlet, wrapping).
    pub flowlet: u16,
    /// The flow's class index ([`UNCLASSIFIED`] if none).
    pub class: u8,
    /// This packet created the flow's entry.
    pub new_flow: bool,
}

impl Decision {
    fn dropped(verdict: Verdict, rss_hash: u32, bucket: u32) -> Self {
        Decision {
            verdict,
            rss_hash,
            bucket,
            shard: 0,
            node: 0,
            flowlet: 0,
            class: UNCLASSIFIED,
            new_flow: false,
        }
    }
}

/// Packets, bytes and new flows of one node, shard or class.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
}

/// Per-node counters: traffic plus the flows currently pinned to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCounters {
    pub packets: u64,
    pub bytes: u64,
    /// Flows placed on the node (new, remapped or moved at a flowlet boundary).
    pub flows: u64,
    /// Tracked flows pinned to the node now.
    pub active_flows: u64,
}

/// Everything the data plane counts. Nothing is dropped or lost without a counter here.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets per verdict, indexed by `Verdict as usize`.
    pub verdicts: [u64; Verdict::COUNT],
    /// IP bytes forwarded.
    pub bytes: u64,
    /// Per node id (`nodes[id]`).
    pub nodes: Vec<NodeCounters>,
    /// Per shard.
    pub shards: Vec<FlowCounters>,
    /// Per class index; the last entry counts unclassified flows.
    pub classes: [FlowCounters; Class::COUNT + 1],
    pub flows_created: u64,
    pub flows_ended_fin: u64,
    pub flows_ended_rst: u64,
    pub flows_ended_idle: u64,
    pub flows_evicted: u64,
    pub flows_flushed: u64,
    /// Established flows moved off a down node.
    pub flows_remapped: u64,
    /// Flowlet boundaries at which a sharded flow changed shard.
    pub flowlet_moves: u64,
    pub records_emitted: u64,
    /// Records lost because the host did not drain the record queue in time.
    pub records_overflow: u64,
    /// New flows that got no feature record because every staging slot was busy.
    pub feature_slots_exhausted: u64,
    /// Packets whose timestamp went backwards; NIC time stays monotonic.
    pub ts_backwards: u64,
    /// Flows the NIC's own classifier tables classified at their N-th packet.
    pub flows_classified_on_nic: u64,
    /// Class assignments pushed down by the host.
    pub class_pushes: u64,
    /// Pushed class assignments whose flow had already ended.
    pub class_pushes_missed: u64,
    /// Flows moved to their handoff target at a flowlet boundary (or at once, when
    /// their node failed while the handoff was pending).
    pub flows_handed_off: u64,
    /// Handoffs refused: no such flow, or no such node.
    pub handoffs_refused: u64,
    /// Pending handoffs dropped because their target was not active at the boundary.
    pub handoffs_dropped: u64,
    /// Pending handoffs dropped because their flow ended first.
    pub handoffs_ended: u64,
    /// Flows the host pinned (moved at once when pinned to another node).
    pub flows_pinned: u64,
    /// Pins refused: no such flow, or a node that is not active.
    pub pins_refused: u64,
}

impl Counters {
    pub fn packets(&self) -> u64 {
        self.verdicts.iter().sum()
    }

    pub fn verdict(&self, v: Verdict) -> u64 {
        self.verdicts[v as usize]
    }
}

/// First-N-packet state of a young flow (the feature staging area).
#[derive(Clone, Copy, Debug, Default)]
struct Stage {
    first_ns: u64,
    last_ns: u64,
    sizes: [u16; MAX_FEATURE_PACKETS],
    iat_us: [u32; MAX_FEATURE_PACKETS],
    directions: u32,
    n: u8,
    flags_client: u8,
    flags_server: u8,
}

/// The NIC data plane.
pub struct Pipeline {
    rss: Toeplitz,
    table: ConnTable,
    bucket_mask: u32,
    bucket_shard: Vec<u16>,
    shard_node: Vec<u16>,
    node_state: Vec<Option<NodeState>>,
    node_weight: Vec<u32>,
    fallback: Vec<u16>,
    class_group: [u8; Class::COUNT],
    /// By class index (every `u8`, so reading it needs no bounds check): how long a
    /// flow of the class must have been idle for its next packet to possibly move it.
    /// The flowlet gap for sharded classes, never (`u32::MAX`) for the others.
    move_gap_us: [u32; 256],
    /// Whether any class is sharded.
    any_sharded: bool,
    /// Flows the host handed off, with their target node, until their next flowlet
    /// boundary. Every key is a live flow (a flow's end removes it), so this never
    /// holds more than the connection table does; usually it is empty, and the fast
    /// path only looks at it when it is not.
    handoffs: BTreeMap<FlowKey, u16>,
    classifier: Option<ClassifierTables>,
    /// The classifier's leaf-set registers.
    classifier_scratch: Vec<u64>,
    config: PipelineConfig,
    stages: Vec<Stage>,
    free_stages: Vec<u16>,
    records: VecDeque<FeatureRecord>,
    counters: Counters,
    now_ns: u64,
    /// `now_ns` in µs, truncated to the 32 bits flow entries keep.
    now_us: u32,
    started: bool,
    /// The passes' working state of two overlapping bursts, kept between calls so it
    /// is not re-initialised.
    work: Vec<Work>,
    sweep_cursor: u32,
    /// NIC time at which the next bucket is due to be swept: packets before it only
    /// move the clock.
    sweep_due_ns: u64,
    /// NIC time per bucket of sweep, so the table is swept once per sweep period.
    ns_per_bucket: u64,
}

impl core::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Pipeline")
            .field("table", &self.table)
            .field("now_ns", &self.now_ns)
            .finish_non_exhaustive()
    }
}

/// Working state of one packet between the passes of a burst: only what the later
/// passes read, so filling it costs little more than the parse itself.
#[derive(Clone, Copy)]
struct Work {
    key: FlowKey,
    probe: Probe,
    candidates: Candidates,
    rss: u32,
    ip_len: u32,
    tcp_flags: u8,
    a_to_b: bool,
    /// `Forward` while the packet is in the pipeline, else why it left it.
    verdict: Verdict,
}

impl Default for Work {
    fn default() -> Self {
        Work {
            key: FlowKey::default(),
            probe: Probe::default(),
            candidates: Candidates::default(),
            rss: 0,
            ip_len: 0,
            tcp_flags: 0,
            a_to_b: false,
            verdict: Verdict::NonIp,
        }
    }
}

/// The packets of a burst, by index, whose first bucket had no candidate.
struct SecondBuckets {
    at: [u8; BURST],
    len: usize,
}

/// Smooth weighted round robin: `len` slots shared among `(id, weight)` exactly in
/// proportion (largest remainder) and interleaved, so any prefix is balanced too.
fn weighted_spread(targets: &[(u16, u32)], len: usize) -> Vec<u16> {
    let total: u64 = targets.iter().map(|t| u64::from(t.1)).sum();
    let mut current: Vec<i64> = vec![0; targets.len()];
    let mut out = Vec::with_capacity(len);
    if total == 0 {
        return out;
    }
    for _ in 0..len {
        let mut best = 0;
        for (i, t) in targets.iter().enumerate() {
            current[i] += i64::from(t.1);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        out.push(targets[best].0);
    }
    out
}

impl Pipeline {
    /// Build the data plane: validate the config, then allocate every table at its
    /// fixed capacity.
    pub fn new(config: &PipelineConfig) -> Result<Pipeline, ConfigError> {
        config.validate()?;
        let shard_targets: Vec<Target> = (0..config.shards)
            .map(|id| Target { id, weight: 1 })
            .collect();
        let bucket_shard = maglev_table(&shard_targets, config.buckets as usize).map_err(|_| {
            ConfigError::Invalid {
                key: "buckets",
                why: "cannot place the shards on this many buckets",
            }
        })?;
        let max_id = config.nodes.iter().map(|n| n.id).max().unwrap_or(0) as usize;
        let mut node_state = vec![None; max_id + 1];
        let mut node_weight = vec![0; max_id + 1];
        for n in &config.nodes {
            node_state[n.id as usize] = Some(n.state);
            node_weight[n.id as usize] = n.weight;
        }
        let weighted: Vec<(u16, u32)> = config
            .nodes
            .iter()
            .filter(|n| n.weight > 0)
            .map(|n| (n.id, n.weight))
            .collect();
        let shard_node = weighted_spread(&weighted, config.shards as usize);
        let mut class_group = [1u8; Class::COUNT];
        for p in &config.class_policies {
            class_group[p.class as usize] = p.group;
        }
        let slots = config.feature_slots as usize;
        let table = ConnTable::new(config.flow_capacity, config.table_seed);
        let t = &config.timeouts;
        let shortest_ms = [t.tcp_ms, t.tcp_close_ms, t.udp_ms, t.icmp_ms, t.other_ms]
            .into_iter()
            .min()
            .unwrap_or(0);
        let period =
            (u64::from(shortest_ms) * 500_000).clamp(MIN_SWEEP_PERIOD_NS, MAX_SWEEP_PERIOD_NS);
        let ns_per_bucket = (period / u64::from(table.buckets())).max(1);
        let mut p = Pipeline {
            rss: Toeplitz::new(&config.rss_key, config.symmetric_rss),
            table,
            bucket_mask: config.buckets - 1,
            bucket_shard,
            shard_node,
            node_state,
            node_weight,
            fallback: Vec::new(),
            class_group,
            move_gap_us: [u32::MAX; 256],
            any_sharded: false,
            handoffs: BTreeMap::new(),
            classifier: None,
            classifier_scratch: Vec::new(),
            config: config.clone(),
            stages: vec![Stage::default(); slots],
            free_stages: (0..slots as u16).rev().collect(),
            records: VecDeque::with_capacity(config.record_queue.min(1 << 16) as usize),
            counters: Counters {
                nodes: vec![NodeCounters::default(); max_id + 1],
                shards: vec![FlowCounters::default(); config.shards as usize],
                ..Counters::default()
            },
            now_ns: 0,
            now_us: 0,
            started: false,
            work: vec![Work::default(); 2 * BURST],
            sweep_cursor: 0,
            sweep_due_ns: 0,
            ns_per_bucket,
        };
        p.rebuild_fallback();
        p.rebuild_move_gaps();
        Ok(p)
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The connection table (occupancy, capacity, its own statistics).
    pub fn table(&self) -> &ConnTable {
        &self.table
    }

    /// NIC time: the latest packet timestamp seen.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    pub fn bucket_table(&self) -> &[u16] {
        &self.bucket_shard
    }

    pub fn shard_table(&self) -> &[u16] {
        &self.shard_node
    }

    /// Node ids known to the pipeline, with their state.
    pub fn nodes(&self) -> impl Iterator<Item = NodeConfig> + '_ {
        self.node_state.iter().enumerate().filter_map(|(id, s)| {
            s.map(|state| NodeConfig {
                id: id as u16,
                weight: self.node_weight[id],
                state,
            })
        })
    }

    /// Replace the bucket → shard table; established flows keep their node.
    pub fn set_bucket_table(&mut self, table: &[u16]) -> Result<(), ConfigError> {
        if table.len() != self.bucket_shard.len() {
            return Err(ConfigError::Invalid {
                key: "buckets",
                why: "new bucket table has a different size",
            });
        }
        if table.iter().any(|s| *s as usize >= self.shard_node.len()) {
            return Err(ConfigError::Invalid {
                key: "buckets",
                why: "bucket table names a shard that does not exist",
            });
        }
        self.bucket_shard.copy_from_slice(table);
        Ok(())
    }

    /// Point one bucket at another shard; established flows keep their node.
    pub fn set_bucket(&mut self, bucket: u32, shard: u16) -> Result<(), ConfigError> {
        if shard as usize >= self.shard_node.len() {
            return Err(ConfigError::Invalid {
                key: "bucket.shard",
                why: "no such shard",
            });
        }
        let slot = self
            .bucket_shard
            .get_mut(bucket as usize)
            .ok_or(ConfigError::Invalid {
                key: "bucket",
                why: "no such bucket",
            })?;
        *slot = shard;
        Ok(())
    }

    /// Set the shard-group size of a class for flows created from now on.
    pub fn set_class_group(&mut self, class: Class, group: u8) -> Result<(), ConfigError> {
        if group == 0 || group > MAX_GROUP || u16::from(group) > self.config.shards {
            return Err(ConfigError::Invalid {
                key: "class_policies.group",
                why: "must be between 1 and 8 and not exceed the number of shards",
            });
        }
        self.class_group[class as usize] = group;
        self.rebuild_move_gaps();
        Ok(())
    }

    fn rebuild_move_gaps(&mut self) {
        self.any_sharded = self.class_group.iter().any(|&k| k > 1);
        for (gap, &group) in self.move_gap_us.iter_mut().zip(&self.class_group) {
            *gap = if group > 1 {
                self.config.flowlet_gap_us
            } else {
                u32::MAX
            };
        }
    }

    /// Point a shard at another node; established flows keep their node.
    pub fn set_shard_node(&mut self, shard: u16, node: u16) -> Result<(), ConfigError> {
        if self.node_state(node).is_none() {
            return Err(ConfigError::Invalid {
                key: "shard.node",
                why: "no such node",
            });
        }
        let slot = self
            .shard_node
            .get_mut(shard as usize)
            .ok_or(ConfigError::Invalid {
                key: "shard",
                why: "no such shard",
            })?;
        *slot = node;
        Ok(())
    }

    /// Change a node's state (active, draining, down).
    pub fn set_node_state(&mut self, node: u16, state: NodeState) -> Result<(), ConfigError> {
        let s = self
            .node_state
            .get_mut(node as usize)
            .and_then(|s| s.as_mut())
            .ok_or(ConfigError::Invalid {
                key: "node",
                why: "no such node",
            })?;
        *s = state;
        self.rebuild_fallback();
        Ok(())
    }

    /// Load (or with `None` remove) the profiler's tree tables: from then on the NIC
    /// classifies each new flow itself at its N-th packet, without the host. The
    /// tables' N must be the image's `feature_packets`, as that is the packet whose
    /// feature record they read. Flows classified already keep their class.
    pub fn load_classifier(&mut self, tables: Option<ClassifierTables>) -> Result<(), ConfigError> {
        if let Some(t) = &tables
            && t.packets() != self.config.feature_packets
        {
            return Err(ConfigError::Invalid {
                key: "classifier.packets",
                why: "the classifier's N differs from the image's feature_packets",
            });
        }
        self.classifier = tables;
        Ok(())
    }

    pub fn classifier(&self) -> Option<&ClassifierTables> {
        self.classifier.as_ref()
    }

    /// The host's class for a live flow (either direction's tuple): its class policy
    /// applies from its next flowlet on, and the per-class counters move it to the new
    /// class. Returns false, counted, when the flow has already ended.
    pub fn set_flow_class(&mut self, tuple: &FlowTuple, class: Class) -> bool {
        let (key, _) = FlowKey::from_tuple(tuple);
        let found = self
            .flow_slot(&key)
            .and_then(|slot| self.table.entry_mut(slot));
        let Some(e) = found else {
            self.counters.class_pushes_missed += 1;
            return false;
        };
        let old = core::mem::replace(&mut e.class, class as u8);
        self.counters.class_pushes += 1;
        Self::recount_class(&mut self.counters, old, class as u8);
        true
    }

    /// The slot of a live flow.
    fn flow_slot(&self, key: &FlowKey) -> Option<u32> {
        self.table.find(key, &self.table.probe(key))
    }

    /// A node's state, or `None` for a node the image does not define.
    pub fn node_state(&self, node: u16) -> Option<NodeState> {
        self.node_state.get(node as usize).copied().flatten()
    }

    /// Schedule a live flow (either direction's tuple) to move to `node` at its next
    /// flowlet boundary — the first packet after an idle gap longer than
    /// `flowlet_gap_us` — keeping its shard. The host calls this after handing the
    /// flow's state from its old node to `node`; waiting for the boundary means no
    /// packet reaches `node` while earlier ones may still be in flight to the old node.
    ///
    /// If `node` is not active when the boundary comes, the move is dropped (counted)
    /// and the flow stays. If the flow's own node fails first, the flow moves to
    /// `node` on its next packet instead of being remapped elsewhere, as `node` holds
    /// its state. A later call replaces an earlier one; naming the flow's current node
    /// cancels it. Returns false, counted, if the flow is not tracked or `node` is not
    /// a node of the image.
    pub fn hand_off(&mut self, tuple: &FlowTuple, node: u16) -> bool {
        let (key, _) = FlowKey::from_tuple(tuple);
        let current = self
            .flow_slot(&key)
            .and_then(|slot| self.table.entry(slot))
            .map(|e| e.node);
        match current {
            Some(on) if self.node_state(node).is_some() => {
                if on == node {
                    self.handoffs.remove(&key);
                } else {
                    self.handoffs.insert(key, node);
                }
                true
            }
            _ => {
                self.counters.handoffs_refused += 1;
                false
            }
        }
    }

    /// Drop a flow's pending handoff; true if it had one.
    pub fn cancel_hand_off(&mut self, tuple: &FlowTuple) -> bool {
        self.handoffs
            .remove(&FlowKey::from_tuple(tuple).0)
            .is_some()
    }

    /// Handoffs waiting for their flow's next flowlet boundary.
    pub fn pending_hand_offs(&self) -> usize {
        self.handoffs.len()
    }

    /// Move a live flow to `node` now and keep it there: flowlet sharding no longer
    /// moves it, only `node` failing does. Any pending handoff is cancelled. For a flow
    /// whose state the host has already moved and whose in-flight packets it does not
    /// need to protect (otherwise [`Pipeline::hand_off`]). A refusal says why and is
    /// counted; a node that is not active is named before a flow that is not tracked.
    pub fn pin_flow(&mut self, tuple: &FlowTuple, node: u16) -> Result<(), PinRefused> {
        if !self.node_active(node) {
            self.counters.pins_refused += 1;
            return Err(PinRefused::NodeNotActive);
        }
        let (key, _) = FlowKey::from_tuple(tuple);
        let slot = self.flow_slot(&key);
        let entry = slot.and_then(|s| self.table.entry(s)).copied();
        let (Some(slot), Some(mut e)) = (slot, entry) else {
            self.counters.pins_refused += 1;
            return Err(PinRefused::NoSuchFlow);
        };
        if e.node != node {
            let shard = e.shard;
            self.move_flow(&mut e, shard, node);
        }
        e.flags |= flag::PINNED;
        if let Some(live) = self.table.entry_mut(slot) {
            *live = e;
        }
        self.handoffs.remove(&key);
        self.counters.flows_pinned += 1;
        Ok(())
    }

    /// Release a pinned flow: it stays on its node, and flowlet sharding applies to it
    /// again. Returns false if the flow is not tracked.
    pub fn unpin_flow(&mut self, tuple: &FlowTuple) -> bool {
        let (key, _) = FlowKey::from_tuple(tuple);
        let found = self
            .flow_slot(&key)
            .and_then(|slot| self.table.entry_mut(slot));
        match found {
            Some(e) => {
                e.flags &= !flag::PINNED;
                true
            }
            None => false,
        }
    }

    /// Carry out `key`'s pending handoff, if any, on `e`; true if the flow moved.
    fn take_hand_off(&mut self, key: &FlowKey, e: &mut FlowEntry) -> bool {
        let Some(node) = self.handoffs.remove(key) else {
            return false;
        };
        if !self.node_active(node) {
            self.counters.handoffs_dropped += 1;
            return false;
        }
        let shard = e.shard;
        self.move_flow(e, shard, node);
        self.counters.flows_handed_off += 1;
        true
    }

    /// Move one flow from `old`'s flow count to `new`'s.
    fn recount_class(c: &mut Counters, old: u8, new: u8) {
        if old != new {
            let from = &mut c.classes[Self::class_slot(old)].flows;
            *from = from.saturating_sub(1);
            c.classes[Self::class_slot(new)].flows += 1;
        }
    }

    fn rebuild_fallback(&mut self) {
        let active: Vec<(u16, u32)> = self
            .nodes()
            .filter(|n| n.state == NodeState::Active && n.weight > 0)
            .map(|n| (n.id, n.weight))
            .collect();
        self.fallback = weighted_spread(&active, FALLBACK_ENTRIES);
    }

    #[inline]
    fn node_active(&self, node: u16) -> bool {
        matches!(
            self.node_state.get(node as usize),
            Some(Some(NodeState::Active))
        )
    }

    /// The node still carries its established flows (active or draining).
    #[inline]
    fn node_up(&self, node: u16) -> bool {
        matches!(
            self.node_state.get(node as usize),
            Some(Some(NodeState::Active | NodeState::Draining))
        )
    }

    /// The node for new traffic of `shard`: the shard's own node if it takes new
    /// flows, else the fallback spread over active nodes by `hash`.
    #[inline]
    fn node_for_new(&self, shard: u16, hash: u32) -> Option<u16> {
        let node = self.shard_node.get(shard as usize).copied()?;
        if self.node_active(node) {
            return Some(node);
        }
        if self.fallback.is_empty() {
            return None;
        }
        Some(self.fallback[(hash >> 24) as usize % self.fallback.len()])
    }

    /// Process one packet (a burst of one).
    pub fn process(&mut self, link: LinkType, pkt: Packet<'_>) -> Decision {
        let mut out = Vec::with_capacity(1);
        self.process_burst(link, &[pkt], &mut out);
        out[0]
    }

    /// Process packets in arrival order, appending one decision per packet to `out`.
    ///
    /// Bursts overlap: the next burst is parsed and hashed, and its tag lines
    /// prefetched, after this burst's entries are prefetched and before they are
    /// used, so each miss has a whole pass over a burst to resolve instead of the
    /// few packets between the entry prefetch and the first lookup. Parsing and
    /// hashing read no state that steering changes, so the order of decisions, and
    /// every decision, is the same as one burst after another.
    ///
    /// That includes the entries of flows in their second bucket (about one in ten
    /// in a full table): their tags are read, and their entries prefetched, in a
    /// short pass of its own before the next burst's first pass, where the tag misses
    /// overlap each other, rather than just before steering, where each entry miss
    /// stalled a long per-packet loop. Measured with `bench dataplane --repeat`: 1M
    /// flows uniform, best run 37.1–37.5 against 40.3–40.5 ns; Zipf 1.1 and 1,000
    /// flows unchanged.
    pub fn process_burst(&mut self, link: LinkType, pkts: &[Packet<'_>], out: &mut Vec<Decision>) {
        out.reserve(pkts.len());
        let mut work = core::mem::take(&mut self.work);
        let (mut cur, mut next) = work.split_at_mut(BURST);
        let mut chunks = pkts.chunks(BURST).peekable();
        if let Some(mut chunk) = chunks.next() {
            self.prepare(link, chunk, cur, chunks.peek().copied().unwrap_or_default());
            let mut seconds = self.candidates(&mut cur[..chunk.len()]);
            loop {
                self.second_candidates(cur, &seconds);
                let following = chunks.next();
                if let Some(f) = following {
                    self.prepare(link, f, next, chunks.peek().copied().unwrap_or_default());
                }
                self.finish(chunk, cur, out);
                let Some(f) = following else {
                    break;
                };
                seconds = self.candidates(&mut next[..f.len()]);
                core::mem::swap(&mut cur, &mut next);
                chunk = f;
            }
        }
        self.work = work;
    }

    /// First pass over a burst: parse and hash every packet and prefetch its first
    /// bucket's tags. Reads only the packets and the hash keys, never flow state.
    ///
    /// The common packet (see [`FastIpv4`](crate::parse::FastIpv4)) goes from header
    /// bytes to key, hash and probe in registers; everything else through the general
    /// parser.
    ///
    /// Each packet parsed also prefetches the header of one packet `ahead` (the next
    /// burst), as a DPDK receive loop prefetches its next mbufs: without it, every
    /// packet's first read missed. All of them at once, before the loop, was slower:
    /// they took the miss buffers the table's prefetches need.
    fn prepare(
        &self,
        link: LinkType,
        pkts: &[Packet<'_>],
        work: &mut [Work],
        ahead: &[Packet<'_>],
    ) {
        let mut ahead = ahead.iter();
        for (w, pkt) in work.iter_mut().zip(pkts) {
            if let Some(a) = ahead.next() {
                prefetch(a.data.as_ptr());
            }
            if link == LinkType::Ethernet
                && let Some(f) = ethernet_ipv4_fast(pkt.data, pkt.wire_len)
            {
                let (key, a_to_b) = FlowKey::from_ipv4(f.src, f.dst, f.sport, f.dport, f.proto);
                let rss = self.rss.hash_ipv4_ports(f.src, f.dst, f.sport, f.dport);
                self.admit(w, key, a_to_b, rss, u32::from(f.ip_len), f.tcp_flags);
                continue;
            }
            match &parse_general(link, pkt.data, pkt.wire_len) {
                Ok(p) => {
                    let (key, a_to_b) = FlowKey::from_tuple(&p.tuple);
                    let rss = self.rss.hash_tuple(&p.tuple);
                    self.admit(w, key, a_to_b, rss, p.ip_len, p.tcp_flags);
                }
                Err(v) => w.verdict = *v,
            }
        }
    }

    /// Fill a parsed packet's working state and prefetch its first bucket's tags. The
    /// state is written once, whole: reading back fields just stored piecewise stalls
    /// on store-to-load forwarding.
    #[inline(always)]
    fn admit(
        &self,
        w: &mut Work,
        key: FlowKey,
        a_to_b: bool,
        rss: u32,
        ip_len: u32,
        tcp_flags: u8,
    ) {
        let probe = self.table.probe(&key);
        self.table.prefetch_first(&probe);
        *w = Work {
            key,
            probe,
            candidates: Candidates::default(),
            rss,
            ip_len,
            tcp_flags,
            a_to_b,
            verdict: Verdict::Forward,
        };
    }

    /// Second pass: read the first bucket's tags and prefetch the matching entries, or
    /// the second bucket's tags. Returns the packets whose first bucket had no
    /// candidate, for the third pass.
    fn candidates(&self, work: &mut [Work]) -> SecondBuckets {
        let mut seconds = SecondBuckets {
            at: [0; BURST],
            len: 0,
        };
        for (i, w) in work.iter_mut().enumerate() {
            if w.verdict == Verdict::Forward {
                w.candidates = self.table.prefetch_second(&w.probe);
                // Listed without a branch on the answer (see `Candidates`).
                if let Some(at) = seconds.at.get_mut(seconds.len) {
                    *at = i as u8;
                }
                seconds.len += usize::from(w.candidates.need_second());
            }
        }
        seconds
    }

    /// Third pass, over the packets whose first bucket had no candidate: read the
    /// second bucket's tags and prefetch its matching entries.
    fn second_candidates(&self, work: &mut [Work], seconds: &SecondBuckets) {
        for &i in seconds.at.get(..seconds.len).unwrap_or_default() {
            if let Some(w) = work.get_mut(usize::from(i)) {
                self.table.prefetch_third(&w.probe, &mut w.candidates);
            }
        }
    }

    /// Last pass: look up, insert and steer each packet in order.
    fn finish(&mut self, pkts: &[Packet<'_>], work: &[Work], out: &mut Vec<Decision>) {
        for (w, pkt) in work.iter().zip(pkts) {
            if w.verdict == Verdict::Forward {
                self.advance_clock(pkt.ts_ns);
                self.steer(w, out);
            } else {
                self.counters.verdicts[w.verdict as usize] += 1;
                out.push(Decision::dropped(w.verdict, 0, 0));
            }
        }
    }

    /// Move NIC time forward (never back) and age the connection table accordingly.
    /// The common packet, no earlier than the last and before the next sweep step is
    /// due, only moves the clock.
    #[inline(always)]
    fn advance_clock(&mut self, ts_ns: u64) {
        if ts_ns >= self.now_ns && ts_ns < self.sweep_due_ns {
            self.set_now(ts_ns);
        } else {
            self.advance_clock_and_sweep(ts_ns);
        }
    }

    /// The rest of [`advance_clock`](Self::advance_clock): the first packet, time
    /// going backwards, and sweeps.
    #[inline(never)]
    fn advance_clock_and_sweep(&mut self, ts_ns: u64) {
        if !self.started {
            self.started = true;
            self.set_now(ts_ns);
            self.sweep_due_ns = ts_ns.saturating_add(self.ns_per_bucket);
            return;
        }
        if ts_ns < self.now_ns {
            self.counters.ts_backwards += 1;
            return;
        }
        let elapsed = ts_ns - self.now_ns;
        self.set_now(ts_ns);
        if elapsed > u64::from(MAX_TIMEOUT_MS) * 1_000_000 {
            // Longer than any timeout: every tracked flow is idle past its limit, and
            // the entries' 32-bit µs clocks cannot be trusted across such a gap. The
            // sweep schedule keeps its phase.
            self.sweep(self.table.buckets(), true);
            self.sweep_due_ns = self.sweep_due_ns.saturating_add(elapsed);
            return;
        }
        // Sweep whole buckets as NIC time pays for them.
        if ts_ns >= self.sweep_due_ns {
            let npb = self.ns_per_bucket;
            let due = (ts_ns - self.sweep_due_ns) / npb + 1;
            self.sweep_due_ns += due * npb;
            self.sweep(due.min(u64::from(self.table.buckets())) as u32, false);
        }
    }

    fn set_now(&mut self, ts_ns: u64) {
        self.now_ns = ts_ns;
        self.now_us = (ts_ns / 1_000) as u32;
    }

    fn idle_limit_us(&self, e: &FlowEntry) -> u32 {
        let t = &self.config.timeouts;
        let ms = if e.is_closing() {
            t.tcp_close_ms
        } else {
            match e.proto {
                ipproto::TCP => t.tcp_ms,
                ipproto::UDP => t.udp_ms,
                ipproto::ICMP | ipproto::ICMPV6 => t.icmp_ms,
                _ => t.other_ms,
            }
        };
        ms.saturating_mul(1_000)
    }

    /// Visit `count` buckets from the sweep cursor and end the flows idle past their
    /// timeout (all visited flows if `all`).
    fn sweep(&mut self, count: u32, all: bool) {
        let now_us = self.now_us;
        let n = self.table.buckets();
        for _ in 0..count {
            let b = self.sweep_cursor;
            self.sweep_cursor = if b + 1 >= n { 0 } else { b + 1 };
            let mut m = self.table.occupied_in(b);
            while m != 0 {
                let slot = b * crate::conntable::SLOTS as u32 + m.trailing_zeros();
                m &= m - 1;
                let Some(e) = self.table.entry(slot) else {
                    continue;
                };
                if all || now_us.wrapping_sub(e.last_us) > self.idle_limit_us(e) {
                    let reason = if all {
                        EndReason::Idle
                    } else if e.flags & flag::RST != 0 {
                        EndReason::Rst
                    } else if e.is_closing() {
                        EndReason::Fin
                    } else {
                        EndReason::Idle
                    };
                    if let Some(e) = self.table.remove(slot) {
                        self.end_flow(&e, reason);
                    }
                }
            }
        }
    }

    /// End every tracked flow now (end of a replay, reset), exporting their records.
    pub fn flush(&mut self) {
        let n = self.table.buckets();
        for b in 0..n {
            let mut m = self.table.occupied_in(b);
            while m != 0 {
                let slot = b * crate::conntable::SLOTS as u32 + m.trailing_zeros();
                m &= m - 1;
                if let Some(e) = self.table.remove(slot) {
                    self.end_flow(&e, EndReason::Flushed);
                }
            }
        }
    }

    /// Take the telemetry records produced so far.
    pub fn drain_records(&mut self) -> impl Iterator<Item = FeatureRecord> + '_ {
        self.records.drain(..)
    }

    fn push_record(&mut self, r: FeatureRecord) {
        if self.records.len() >= self.config.record_queue as usize {
            self.counters.records_overflow += 1;
        } else {
            self.records.push_back(r);
            self.counters.records_emitted += 1;
        }
    }

    fn class_slot(class: u8) -> usize {
        (class as usize).min(Class::COUNT)
    }

    fn classify_by_ports(&self, key: &FlowKey) -> u8 {
        for r in &self.config.port_rules {
            if r.proto == key.proto
                && ((r.ports[0]..=r.ports[1]).contains(&key.port_a)
                    || (r.ports[0]..=r.ports[1]).contains(&key.port_b))
            {
                return r.class as u8;
            }
        }
        UNCLASSIFIED
    }

    fn group_of(&self, class: u8) -> u8 {
        self.class_group.get(class as usize).copied().unwrap_or(1)
    }

    /// Steer and count one parsed packet, appending its decision to `out`.
    #[inline(always)]
    fn steer(&mut self, w: &Work, out: &mut Vec<Decision>) {
        let bucket = w.rss & self.bucket_mask;
        let found = self.table.find_among(&w.key, &w.probe, w.candidates);
        if let Some(slot) = found
            && self.steer_established(slot, w, bucket, out)
        {
            return;
        }
        let d = self.steer_general(w, found, bucket);
        self.counters.verdicts[d.verdict as usize] += 1;
        out.push(d);
    }

    /// Everything [`steer_established`](Self::steer_established) leaves: new flows,
    /// moves, staging, records. Kept out of line so that the short path's registers
    /// are not spent on it.
    #[inline(never)]
    fn steer_general(&mut self, w: &Work, found: Option<u32>, bucket: u32) -> Decision {
        let rss = w.rss;
        let mut new_flow = false;
        let slot = match found {
            Some(slot) => slot,
            None => match self.create_flow(&w.key, w.a_to_b, &w.probe, bucket, rss) {
                Some(slot) => {
                    new_flow = true;
                    slot
                }
                None => return Decision::dropped(Verdict::NoNode, rss, bucket),
            },
        };
        let Some(&e) = self.table.entry(slot) else {
            return Decision::dropped(Verdict::NoNode, rss, bucket);
        };
        let mut e = e;
        if !new_flow {
            let new_flowlet = self.now_us.wrapping_sub(e.last_us) > self.config.flowlet_gap_us;
            if new_flowlet {
                e.flowlet = e.flowlet.wrapping_add(1);
            }
            if !self.node_up(e.node) {
                // Only a failed node's flows are remapped, and only on their own packets;
                // one being handed off goes where its state already is.
                if self.handoffs.is_empty() || !self.take_hand_off(&w.key, &mut e) {
                    let shard = self.bucket_shard[bucket as usize];
                    let Some(node) = self.node_for_new(shard, rss) else {
                        return Decision::dropped(Verdict::NoNode, rss, bucket);
                    };
                    self.move_flow(&mut e, shard, node);
                    e.flags &= !flag::PINNED;
                    self.counters.flows_remapped += 1;
                }
            } else if new_flowlet
                && (self.handoffs.is_empty() || !self.take_hand_off(&w.key, &mut e))
                && e.flags & flag::PINNED == 0
            {
                let k = self.group_of(e.class);
                if k > 1 {
                    self.next_group_member(&mut e, k, rss);
                }
            }
        }
        self.account(&mut e, w);
        if let Some(slot_ref) = self.table.entry_mut(slot) {
            *slot_ref = e;
        }
        Decision {
            verdict: Verdict::Forward,
            rss_hash: rss,
            bucket,
            shard: e.shard,
            node: e.node,
            flowlet: e.flowlet,
            class: e.class,
            new_flow,
        }
    }

    /// The common case of [`steer`](Self::steer), updated in place in the table: an
    /// established flow on a node that is up, past its feature staging, whose packet
    /// either continues its flowlet or starts one that moves nothing (no pending
    /// handoff, and pinned or not sharded): counts it, appends its decision to `out`
    /// and returns true. Anything else returns false, untouched, and takes the
    /// general path, which alone handles moves, staging, records and counter
    /// wrap-around; so the two agree by construction.
    #[inline(always)]
    fn steer_established(
        &mut self,
        slot: u32,
        w: &Work,
        bucket: u32,
        out: &mut Vec<Decision>,
    ) -> bool {
        let now_us = self.now_us;
        let Some(e) = self.table.entry_mut(slot) else {
            return false;
        };
        let len = w.ip_len;
        let up = matches!(
            self.node_state.get(e.node as usize),
            Some(Some(NodeState::Active | NodeState::Draining))
        );
        if !up || e.feature_slot != 0 || e.packets == u32::MAX {
            return false;
        }
        let Some(bytes) = e.bytes.checked_add(len) else {
            return false;
        };
        // A new flowlet of a sharded, unpinned flow may move, and any new flowlet may
        // complete a handoff: those take the general path. Whether a packet starts a
        // flowlet flips from packet to packet wherever flows' gaps straddle the flowlet
        // gap (a Zipf mix of hot and cold flows, or ~16k uniform flows at 25 Mpps), so
        // it is not branched on. Only when some class is sharded or a handoff pending
        // (one predictable branch) is the idle time compared with a limit, the flowlet
        // gap when this flow may move and never otherwise; the flowlet count adds the
        // comparison.
        let idle = now_us.wrapping_sub(e.last_us);
        let gap = self.config.flowlet_gap_us;
        let handoff_pending = !self.handoffs.is_empty();
        if self.any_sharded | handoff_pending {
            let pinned = u32::from(e.flags & flag::PINNED != 0).wrapping_neg();
            let handoff_gap = if handoff_pending { gap } else { u32::MAX };
            let move_gap = (self.move_gap_us[usize::from(e.class)] | pinned).min(handoff_gap);
            if idle > opaque(move_gap) {
                return false;
            }
        }
        e.flowlet = e.flowlet.wrapping_add(u16::from(idle > gap));
        e.packets += 1;
        e.bytes = bytes;
        e.last_us = now_us;
        Self::note_tcp_flags(e, w);
        Self::count_packet(&mut self.counters, e, len);
        self.counters.verdicts[Verdict::Forward as usize] += 1;
        out.push(Decision {
            verdict: Verdict::Forward,
            rss_hash: w.rss,
            bucket,
            shard: e.shard,
            node: e.node,
            flowlet: e.flowlet,
            class: e.class,
            new_flow: false,
        });
        true
    }

    /// Move a sharded flow to the next member of its group at a flowlet boundary.
    /// Members are spread `shards / k` apart, starting from the flow's first shard.
    fn next_group_member(&mut self, e: &mut FlowEntry, k: u8, rss: u32) {
        let shards = self.shard_node.len() as u32;
        let stride = (shards / u32::from(k)).max(1);
        let k16 = u16::from(k);
        let prev = u32::from(e.flowlet.wrapping_sub(1) % k16);
        let member = u32::from(e.flowlet % k16);
        let base = (u32::from(e.shard) + shards - (prev * stride) % shards) % shards;
        let shard = ((base + member * stride) % shards) as u16;
        e.shards_used |= 1 << member;
        if shard != e.shard
            && let Some(node) = self.node_for_new(shard, rss)
        {
            self.move_flow(e, shard, node);
            self.counters.flowlet_moves += 1;
        }
    }

    fn move_flow(&mut self, e: &mut FlowEntry, shard: u16, node: u16) {
        if let Some(c) = self.counters.nodes.get_mut(e.node as usize) {
            c.active_flows = c.active_flows.saturating_sub(1);
        }
        if let Some(c) = self.counters.nodes.get_mut(node as usize) {
            c.active_flows += 1;
            c.flows += 1;
        }
        e.shard = shard;
        e.node = node;
    }

    fn create_flow(
        &mut self,
        key: &FlowKey,
        a_to_b: bool,
        probe: &Probe,
        bucket: u32,
        rss: u32,
    ) -> Option<u32> {
        let shard = self.bucket_shard[bucket as usize];
        let node = self.node_for_new(shard, rss)?;
        let class = self.classify_by_ports(key);
        let feature_slot = match self.free_stages.pop() {
            Some(s) => {
                self.stages[s as usize] = Stage {
                    first_ns: self.now_ns,
                    last_ns: self.now_ns,
                    ..Stage::default()
                };
                s + 1
            }
            None => {
                self.counters.feature_slots_exhausted += 1;
                0
            }
        };
        let mut flags = if key.ipv6 { flag::IPV6 } else { 0 };
        if a_to_b {
            flags |= flag::A_IS_CLIENT;
        }
        let entry = FlowEntry {
            addr_a: key.addr_a,
            addr_b: key.addr_b,
            port_a: key.port_a,
            port_b: key.port_b,
            proto: key.proto,
            flags,
            class,
            shards_used: 1,
            node,
            shard,
            flowlet: 0,
            feature_slot,
            last_us: self.now_us,
            start_ms: (self.now_ns / 1_000_000) as u32,
            packets: 0,
            bytes: 0,
        };
        let inserted = self.table.insert(entry, probe, self.now_us);
        if let Some(ev) = inserted.evicted {
            self.end_flow(&ev, EndReason::Evicted);
        }
        self.counters.flows_created += 1;
        if let Some(c) = self.counters.nodes.get_mut(node as usize) {
            c.flows += 1;
            c.active_flows += 1;
        }
        if let Some(c) = self.counters.shards.get_mut(shard as usize) {
            c.flows += 1;
        }
        self.counters.classes[Self::class_slot(class)].flows += 1;
        Some(inserted.slot)
    }

    /// Count one packet on its flow, node, shard and class, and feed the flow's
    /// feature staging while it is young.
    fn account(&mut self, e: &mut FlowEntry, w: &Work) {
        let len = w.ip_len;
        if e.packets == u32::MAX || e.bytes.checked_add(len).is_none() {
            self.export(e, RecordKind::Interim, EndReason::None);
            e.packets = 0;
            e.bytes = 0;
            e.start_ms = (self.now_ns / 1_000_000) as u32;
        }
        e.packets += 1;
        e.bytes += len;
        e.last_us = self.now_us;
        Self::note_tcp_flags(e, w);
        let (from_a, f) = (w.a_to_b, w.tcp_flags);
        let from_client = from_a == (e.flags & flag::A_IS_CLIENT != 0);
        if e.feature_slot != 0 {
            let n_max = self.config.feature_packets;
            let now = self.now_ns;
            if let Some(st) = self.stages.get_mut(e.feature_slot as usize - 1) {
                let i = st.n as usize;
                if i < MAX_FEATURE_PACKETS {
                    st.sizes[i] = len.min(u32::from(u16::MAX)) as u16;
                    st.iat_us[i] = if i == 0 {
                        0
                    } else {
                        ((now - st.last_ns) / 1_000).min(u64::from(u32::MAX)) as u32
                    };
                    if !from_client {
                        st.directions |= 1 << i;
                    }
                    st.n += 1;
                }
                st.last_ns = now;
                if from_client {
                    st.flags_client |= f;
                } else {
                    st.flags_server |= f;
                }
                if st.n >= n_max {
                    let mut r = self.record(e, RecordKind::Early, EndReason::None);
                    if let Some(t) = &self.classifier
                        && e.class == UNCLASSIFIED
                    {
                        let (class, _) =
                            t.classify_with(&features(&r), &mut self.classifier_scratch);
                        Self::recount_class(&mut self.counters, e.class, class as u8);
                        e.class = class as u8;
                        r.class = e.class;
                        self.counters.flows_classified_on_nic += 1;
                    }
                    self.push_record(r);
                    self.free_stages.push(e.feature_slot - 1);
                    e.feature_slot = 0;
                }
            }
        }
        Self::count_packet(&mut self.counters, e, len);
    }

    /// Keep the TCP flags a flow entry records (FIN per direction, RST, SYN).
    #[inline(always)]
    fn note_tcp_flags(e: &mut FlowEntry, w: &Work) {
        // Most TCP packets carry none of the flags the entry keeps: test once for any.
        if e.proto == ipproto::TCP && w.tcp_flags & (TCP_FIN | TCP_RST | TCP_SYN) != 0 {
            let f = w.tcp_flags;
            let fin = if w.a_to_b { flag::FIN_A } else { flag::FIN_B };
            e.flags |= (if f & TCP_FIN != 0 { fin } else { 0 })
                | (if f & TCP_RST != 0 { flag::RST } else { 0 })
                | (if f & TCP_SYN != 0 { flag::SYN } else { 0 });
        }
    }

    /// Count one forwarded packet of `len` bytes of flow `e`: in all, for its class, its
    /// node and its shard.
    #[inline(always)]
    fn count_packet(c: &mut Counters, e: &FlowEntry, len: u32) {
        let len = u64::from(len);
        c.bytes += len;
        let cl = &mut c.classes[Self::class_slot(e.class)];
        cl.packets += 1;
        cl.bytes += len;
        if let Some(n) = c.nodes.get_mut(e.node as usize) {
            n.packets += 1;
            n.bytes += len;
        }
        if let Some(s) = c.shards.get_mut(e.shard as usize) {
            s.bytes += len;
            s.packets += 1;
        }
    }

    fn end_flow(&mut self, e: &FlowEntry, reason: EndReason) {
        if !self.handoffs.is_empty() && self.handoffs.remove(&e.key()).is_some() {
            self.counters.handoffs_ended += 1;
        }
        self.export(e, RecordKind::End, reason);
        if e.feature_slot != 0 {
            self.free_stages.push(e.feature_slot - 1);
        }
        if let Some(c) = self.counters.nodes.get_mut(e.node as usize) {
            c.active_flows = c.active_flows.saturating_sub(1);
        }
        let c = &mut self.counters;
        match reason {
            EndReason::Fin => c.flows_ended_fin += 1,
            EndReason::Rst => c.flows_ended_rst += 1,
            EndReason::Idle => c.flows_ended_idle += 1,
            EndReason::Evicted => c.flows_evicted += 1,
            EndReason::Flushed | EndReason::None => c.flows_flushed += 1,
        }
    }

    /// Write a feature record of `e` (and of its staging, while it has one).
    fn export(&mut self, e: &FlowEntry, kind: RecordKind, end_reason: EndReason) {
        let r = self.record(e, kind, end_reason);
        self.push_record(r);
    }

    /// The feature record of `e` (and of its staging, while it has one).
    fn record(&self, e: &FlowEntry, kind: RecordKind, end_reason: EndReason) -> FeatureRecord {
        let a_client = e.flags & flag::A_IS_CLIENT != 0;
        let (client_addr, client_port, server_addr, server_port) = if a_client {
            (e.addr_a, e.port_a, e.addr_b, e.port_b)
        } else {
            (e.addr_b, e.port_b, e.addr_a, e.port_a)
        };
        // Rebuild full NIC times from the entry's wrapping clocks.
        let now_ms = self.now_ns / 1_000_000;
        let start_ns = (now_ms - u64::from((now_ms as u32).wrapping_sub(e.start_ms))) * 1_000_000;
        let now_us = self.now_ns / 1_000;
        let last_ns = (now_us - u64::from((now_us as u32).wrapping_sub(e.last_us))) * 1_000;
        let mut r = FeatureRecord {
            kind,
            end_reason,
            proto: e.proto,
            ipv6: e.flags & flag::IPV6 != 0,
            n: 0,
            class: e.class,
            tcp_flags_client: 0,
            tcp_flags_server: 0,
            shards_used: e.shards_used,
            node: e.node,
            shard: e.shard,
            flowlets: e.flowlet.wrapping_add(1),
            client_addr,
            server_addr,
            client_port,
            server_port,
            directions: 0,
            first_ts_ns: start_ns,
            last_ts_ns: last_ns,
            packets: e.packets,
            bytes: u64::from(e.bytes),
            sizes: [0; MAX_FEATURE_PACKETS],
            iat_us: [0; MAX_FEATURE_PACKETS],
        };
        if e.feature_slot != 0
            && let Some(st) = self.stages.get(e.feature_slot as usize - 1)
        {
            r.n = st.n;
            r.sizes = st.sizes;
            r.iat_us = st.iat_us;
            r.directions = st.directions;
            r.tcp_flags_client = st.flags_client;
            r.tcp_flags_server = st.flags_server;
            r.first_ts_ns = st.first_ns;
        } else if e.proto == ipproto::TCP {
            // Past the staging: the entry's close flags are what is left of the flags.
            let fin_client = if a_client { flag::FIN_A } else { flag::FIN_B };
            let fin_server = if a_client { flag::FIN_B } else { flag::FIN_A };
            let syn = if e.flags & flag::SYN != 0 { TCP_SYN } else { 0 };
            let rst = if e.flags & flag::RST != 0 { TCP_RST } else { 0 };
            r.tcp_flags_client = syn
                | rst
                | if e.flags & fin_client != 0 {
                    TCP_FIN
                } else {
                    0
                };
            r.tcp_flags_server = rst
                | if e.flags & fin_server != 0 {
                    TCP_FIN
                } else {
                    0
                };
        }
        r
    }
}

/// `x`, unknown to the optimiser. A limit chosen without a branch stays a value:
/// otherwise LLVM turns "idle > (movable ? gap : never)" back into a branch on
/// "idle > gap", the unpredictable one the limit exists to avoid.
#[allow(unsafe_code)]
#[inline(always)]
fn opaque(x: u32) -> u32 {
    #[cfg(target_arch = "x86_64")]
    {
        let mut r = u64::from(x);
        // SAFETY: an empty instruction sequence that claims to rewrite one register: it
        // reads and writes no memory, touches no flags and leaves the value as it was.
        unsafe {
            core::arch::asm!("/* {0} */", inout(reg) r, options(pure, nomem, nostack, preserves_flags));
        }
        r as u32
    }
    #[cfg(not(target_arch = "x86_64"))]
    x
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClassPolicy, PortRule};
    use crate::parse::parse;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;
    use std::vec::Vec as StdVec;

    /// An Ethernet/IPv4 TCP packet of client `c` (10.0.x.y:port) to 192.0.2.1:80,
    /// or its reply.
    fn tcp(c: u32, reply: bool, flags: u8, payload: usize) -> StdVec<u8> {
        let client = (0x0a00_0000 | (c & 0xffff)).to_be_bytes();
        let port = 1024 + (c >> 16) as u16;
        let server = [192, 0, 2, 1];
        let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let b = if reply {
            b.ipv4(server, client, 64).tcp(80, port, 1, 1000)
        } else {
            b.ipv4(client, server, 64).tcp(port, 80, 1, 1000)
        };
        let b = if flags & TCP_SYN != 0 {
            b.syn()
        } else {
            b.ack(1)
        };
        let b = if flags & TCP_FIN != 0 { b.fin() } else { b };
        let b = if flags & TCP_RST != 0 { b.rst() } else { b };
        let mut v = StdVec::new();
        b.write(&mut v, &std::vec![0u8; payload]).unwrap();
        v
    }

    fn small() -> PipelineConfig {
        PipelineConfig {
            flow_capacity: 4096,
            buckets: 256,
            shards: 16,
            feature_slots: 64,
            ..PipelineConfig::default()
        }
    }

    fn send(p: &mut Pipeline, ts_ns: u64, data: &[u8]) -> Decision {
        p.process(
            LinkType::Ethernet,
            Packet {
                ts_ns,
                data,
                wire_len: data.len() as u32,
            },
        )
    }

    #[test]
    fn both_directions_of_a_flow_go_to_one_node() {
        let mut p = Pipeline::new(&small()).unwrap();
        let a = send(&mut p, 0, &tcp(1, false, TCP_SYN, 0));
        let b = send(&mut p, 1_000, &tcp(1, true, TCP_SYN, 0));
        assert!(a.new_flow && !b.new_flow);
        assert_eq!((a.verdict, b.verdict), (Verdict::Forward, Verdict::Forward));
        assert_eq!((a.node, a.shard), (b.node, b.shard));
        assert_ne!(a.rss_hash, b.rss_hash, "the wire hash differs by direction");
        assert_eq!(a.bucket, a.rss_hash & 255);
        assert_eq!(p.table().len(), 1);
        assert_eq!(p.counters().flows_created, 1);
    }

    #[test]
    fn bucket_table_changes_move_only_new_flows() {
        let mut p = Pipeline::new(&small()).unwrap();
        let before: StdVec<Decision> = (0..200)
            .map(|c| send(&mut p, c as u64, &tcp(c, false, TCP_SYN, 0)))
            .collect();
        // Point every bucket at shard 0, whose node is node 0.
        p.set_bucket_table(&[0u16; 256]).unwrap();
        let node0 = p.shard_table()[0];
        for (c, d) in before.iter().enumerate() {
            let again = send(&mut p, 1_000 + c as u64, &tcp(c as u32, true, 0, 10));
            assert_eq!(again.node, d.node, "established flow {c} changed node");
        }
        for c in 1000..1100 {
            let d = send(&mut p, 5_000 + u64::from(c), &tcp(c, false, TCP_SYN, 0));
            assert_eq!((d.shard, d.node), (0, node0));
        }
        assert!(p.set_bucket_table(&[0u16; 8]).is_err());
        assert!(p.set_bucket_table(&[99u16; 256]).is_err());
    }

    #[test]
    fn draining_keeps_flows_down_remaps_only_its_own() {
        let mut p = Pipeline::new(&small()).unwrap();
        let first: StdVec<Decision> = (0..400)
            .map(|c| send(&mut p, u64::from(c), &tcp(c, false, TCP_SYN, 0)))
            .collect();
        let victim = first[0].node;
        p.set_node_state(victim, NodeState::Draining).unwrap();
        for (c, d) in first.iter().enumerate() {
            assert_eq!(
                send(&mut p, 1_000 + c as u64, &tcp(c as u32, false, 0, 1)).node,
                d.node
            );
        }
        for c in 1000..1400 {
            assert_ne!(
                send(&mut p, 2_000 + u64::from(c), &tcp(c, false, TCP_SYN, 0)).node,
                victim
            );
        }
        p.set_node_state(victim, NodeState::Down).unwrap();
        let mut remapped = 0;
        for (c, d) in first.iter().enumerate() {
            let now = send(&mut p, 10_000 + c as u64, &tcp(c as u32, true, 0, 1));
            if d.node == victim {
                assert_ne!(now.node, victim);
                remapped += 1;
            } else {
                assert_eq!(
                    now.node, d.node,
                    "flow {c} not on the failed node was moved"
                );
            }
        }
        assert!(remapped > 0);
        assert_eq!(p.counters().flows_remapped, remapped);
        for n in p.nodes().map(|n| n.id).collect::<StdVec<_>>() {
            p.set_node_state(n, NodeState::Down).unwrap();
        }
        assert_eq!(
            send(&mut p, 20_000, &tcp(5000, false, TCP_SYN, 0)).verdict,
            Verdict::NoNode
        );
        assert_eq!(p.counters().verdict(Verdict::NoNode), 1);
    }

    /// [`small`], with TCP port 80 classed bulk and bulk sharded over a group of 4.
    fn small_bulk_sharded() -> PipelineConfig {
        let mut cfg = small();
        cfg.class_policies.push(ClassPolicy {
            class: Class::Bulk,
            group: 4,
        });
        cfg.port_rules.push(PortRule {
            proto: 6,
            ports: [80, 80],
            class: Class::Bulk,
        });
        cfg
    }

    #[test]
    fn sharded_flows_move_only_at_flowlet_boundaries() {
        let cfg = small_bulk_sharded();
        let mut p = Pipeline::new(&cfg).unwrap();
        let gap = u64::from(cfg.flowlet_gap_us) * 1_000;
        let mut t = 0u64;
        let mut shards = StdVec::new();
        for flowlet in 0..8u16 {
            let mut in_flowlet = StdVec::new();
            for _ in 0..5 {
                let d = send(&mut p, t, &tcp(7, false, 0, 100));
                assert_eq!(d.flowlet, flowlet);
                assert_eq!(d.class, Class::Bulk as u8);
                in_flowlet.push(d.shard);
                t += 10_000; // 10 µs apart: well inside δ
            }
            assert!(
                in_flowlet.windows(2).all(|w| w[0] == w[1]),
                "flowlet split: {in_flowlet:?}"
            );
            shards.push(in_flowlet[0]);
            t += gap + 1_000;
        }
        let distinct: std::collections::BTreeSet<_> = shards.iter().collect();
        assert_eq!(distinct.len(), 4, "a group of 4 uses 4 shards: {shards:?}");
        assert_eq!(shards[0], shards[4], "members rotate");
        assert!(p.counters().flowlet_moves >= 7);
        p.flush();
        let end = p.drain_records().last().unwrap();
        assert_eq!(end.shards_used, 0b1111);
        assert_eq!(end.flowlets, 8);
    }

    /// The short path's move limit follows the class policy the host sets at run time:
    /// a group of 1 keeps counting flowlets but never moves the flow; a larger group
    /// moves it at its next flowlet boundary; back to 1, it stays where it is.
    #[test]
    fn class_group_changes_reach_established_flows_at_their_next_flowlet() {
        let mut cfg = small_bulk_sharded();
        cfg.class_policies.clear();
        let mut p = Pipeline::new(&cfg).unwrap();
        let gap = u64::from(cfg.flowlet_gap_us) * 1_000;
        let mut t = 0u64;
        let flowlet = |p: &mut Pipeline, t: &mut u64| {
            let mut shards = StdVec::new();
            for _ in 0..3 {
                shards.push(send(p, *t, &tcp(7, false, 0, 100)));
                *t += 10_000;
            }
            *t += gap + 1_000;
            assert!(shards.windows(2).all(|w| w[0].shard == w[1].shard));
            (shards[0].shard, shards[0].flowlet)
        };
        let (first, _) = flowlet(&mut p, &mut t);
        for n in 1..4 {
            assert_eq!(flowlet(&mut p, &mut t), (first, n), "group 1: never moves");
        }
        assert_eq!(p.counters().flowlet_moves, 0);
        p.set_class_group(Class::Bulk, 4).unwrap();
        let (moved, n) = flowlet(&mut p, &mut t);
        assert_eq!(n, 4);
        assert_ne!(moved, first, "group 4: moves at the next boundary");
        assert_eq!(p.counters().flowlet_moves, 1);
        p.set_class_group(Class::Bulk, 1).unwrap();
        for n in 5..8 {
            assert_eq!(flowlet(&mut p, &mut t), (moved, n), "group 1 again: stays");
        }
        assert_eq!(p.counters().flowlet_moves, 1);
    }

    #[test]
    fn feature_record_after_n_packets_and_end_record_after_fin() {
        let mut p = Pipeline::new(&small()).unwrap();
        let mut t = 0;
        for i in 0..8u32 {
            let reply = i % 2 == 1;
            send(
                &mut p,
                t,
                &tcp(3, reply, if i == 0 { TCP_SYN } else { 0 }, i as usize * 10),
            );
            t += 1_000_000 * u64::from(i + 1);
        }
        let recs: StdVec<_> = p.drain_records().collect();
        assert_eq!(recs.len(), 1);
        let r = recs[0];
        assert_eq!(r.kind, RecordKind::Early);
        assert_eq!(r.n, 8);
        assert_eq!(r.client_port, 1024);
        assert_eq!(r.server_port, 80);
        assert_eq!(&r.sizes[..3], &[40, 50, 60]);
        assert_eq!(&r.iat_us[..3], &[0, 1_000, 2_000]);
        assert_eq!(r.directions, 0b1010_1010);
        assert_eq!(r.tcp_flags_client & TCP_SYN, TCP_SYN);
        send(&mut p, t, &tcp(3, false, TCP_FIN, 0));
        send(&mut p, t + 1_000, &tcp(3, true, TCP_FIN, 0));
        // Past the close linger (2 s) plus a full sweep period.
        send(&mut p, t + 4_000_000_000, &tcp(99, false, TCP_SYN, 0));
        let end: StdVec<_> = p.drain_records().collect();
        assert_eq!(end.len(), 1);
        assert_eq!(
            (end[0].kind, end[0].end_reason),
            (RecordKind::End, EndReason::Fin)
        );
        assert_eq!(end[0].packets, 10);
        assert_eq!(p.counters().flows_ended_fin, 1);
        assert_eq!(p.table().len(), 1);
    }

    #[test]
    fn idle_flows_age_out_by_protocol_timeout() {
        let mut p = Pipeline::new(&small()).unwrap();
        send(&mut p, 0, &tcp(1, false, TCP_SYN, 0));
        send(&mut p, 299_000_000_000, &tcp(2, false, TCP_SYN, 0));
        assert_eq!(
            p.table().len(),
            2,
            "299 s idle is within the 300 s TCP timeout"
        );
        send(&mut p, 302_000_000_000, &tcp(2, false, 0, 0));
        assert_eq!(p.table().len(), 1);
        assert_eq!(p.counters().flows_ended_idle, 1);
        // A jump longer than any timeout ends everything.
        send(&mut p, 10_000_000_000_000, &tcp(3, false, TCP_SYN, 0));
        assert_eq!(p.counters().flows_ended_idle, 2);
        assert_eq!(p.table().len(), 1);
        send(&mut p, 5, &tcp(3, false, 0, 0));
        assert_eq!(p.counters().ts_backwards, 1);
    }

    #[test]
    fn a_full_table_evicts_and_counts() {
        let cfg = PipelineConfig {
            flow_capacity: 100,
            ..small()
        };
        let mut p = Pipeline::new(&cfg).unwrap();
        for c in 0..150 {
            send(&mut p, u64::from(c) * 1_000, &tcp(c, false, TCP_SYN, 0));
        }
        assert_eq!(p.table().len(), 100);
        assert_eq!(p.counters().flows_evicted, 50);
        let evicted = p
            .drain_records()
            .filter(|r| r.end_reason == EndReason::Evicted)
            .count();
        assert_eq!(evicted, 50);
        let active: u64 = p.counters().nodes.iter().map(|n| n.active_flows).sum();
        assert_eq!(active, 100);
    }

    #[test]
    fn malformed_and_non_ip_are_counted_not_steered() {
        let mut p = Pipeline::new(&small()).unwrap();
        let good = tcp(1, false, TCP_SYN, 0);
        let mut arp = good.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let pkts = [
            Packet {
                ts_ns: 0,
                data: &good[..20],
                wire_len: 20,
            },
            Packet {
                ts_ns: 1,
                data: &arp,
                wire_len: arp.len() as u32,
            },
            Packet {
                ts_ns: 2,
                data: &good,
                wire_len: good.len() as u32,
            },
        ];
        let mut out = StdVec::new();
        p.process_burst(LinkType::Ethernet, &pkts, &mut out);
        let v: StdVec<_> = out.iter().map(|d| d.verdict).collect();
        assert_eq!(v, [Verdict::TruncatedL3, Verdict::NonIp, Verdict::Forward]);
        assert_eq!(p.counters().packets(), 3);
        assert_eq!(p.counters().verdict(Verdict::TruncatedL3), 1);
    }

    /// One tree: server port 80 → bulk, anything else → web.
    fn port_tree(packets: u8) -> crate::profile::ClassifierTables {
        use crate::profile::{ClassifierTables, Forest, Node, SCORE_ONE};
        let leaf = |c: Class| {
            let mut scores = [0; Class::COUNT];
            scores[c as usize] = SCORE_ONE;
            Node::Leaf { scores }
        };
        ClassifierTables::compile(&Forest {
            packets,
            trees: std::vec![std::vec![
                Node::Split {
                    feature: 2,
                    threshold: 80,
                    left: 1,
                    right: 2
                },
                Node::Split {
                    feature: 2,
                    threshold: 79,
                    left: 3,
                    right: 4
                },
                leaf(Class::Web),
                leaf(Class::Web),
                leaf(Class::Bulk),
            ]],
        })
        .unwrap()
    }

    #[test]
    fn nic_tables_classify_at_the_nth_packet_and_the_policy_follows() {
        let mut cfg = small();
        cfg.feature_packets = 4;
        cfg.class_policies.push(ClassPolicy {
            class: Class::Bulk,
            group: 4,
        });
        let mut p = Pipeline::new(&cfg).unwrap();
        assert!(
            p.load_classifier(Some(port_tree(8))).is_err(),
            "N must match"
        );
        p.load_classifier(Some(port_tree(4))).unwrap();
        let gap = u64::from(cfg.flowlet_gap_us) * 1_000 + 1_000;
        let mut classes = StdVec::new();
        for i in 0..4u64 {
            classes.push(send(&mut p, i * 10_000, &tcp(9, i % 2 == 1, 0, 100)).class);
        }
        assert_eq!(
            &classes[..3],
            &[UNCLASSIFIED; 3],
            "unclassified before packet N"
        );
        assert_eq!(classes[3], Class::Bulk as u8, "classified at packet N");
        let rec: StdVec<_> = p.drain_records().collect();
        assert_eq!((rec.len(), rec[0].class), (1, Class::Bulk as u8));
        assert_eq!(p.counters().flows_classified_on_nic, 1);
        assert_eq!(p.counters().classes[Class::Bulk as usize].flows, 1);
        assert_eq!(p.counters().classes[Class::COUNT].flows, 0);
        // The bulk policy shards the flow from its next flowlet on.
        let first = send(&mut p, 1_000_000, &tcp(9, false, 0, 100)).shard;
        let next = send(&mut p, 1_000_000 + gap, &tcp(9, false, 0, 100)).shard;
        assert_ne!(first, next);
    }

    #[test]
    fn host_class_push_down_reaches_the_flow_and_the_counters() {
        let mut p = Pipeline::new(&small()).unwrap();
        let syn = tcp(5, false, TCP_SYN, 0);
        let d = send(&mut p, 0, &syn);
        assert_eq!(d.class, UNCLASSIFIED);
        let tuple_of = |frame: &[u8]| {
            parse(LinkType::Ethernet, frame, frame.len() as u32)
                .unwrap()
                .tuple
        };
        let reply = tuple_of(&syn).reversed();
        assert!(
            p.set_flow_class(&reply, Class::Video),
            "either direction names the flow"
        );
        assert_eq!(
            send(&mut p, 1_000, &tcp(5, true, 0, 10)).class,
            Class::Video as u8
        );
        assert!(p.set_flow_class(&reply, Class::Realtime));
        let c = p.counters();
        assert_eq!(c.classes[Class::Realtime as usize].flows, 1);
        assert_eq!(c.classes[Class::Video as usize].flows, 0);
        assert_eq!(c.classes[Class::COUNT].flows, 0);
        assert_eq!(c.class_pushes, 2);
        let gone_syn = tcp(6, false, TCP_SYN, 0);
        send(&mut p, 2_000, &gone_syn);
        let gone = tuple_of(&gone_syn);
        p.flush();
        assert!(!p.set_flow_class(&gone, Class::Web));
        assert_eq!(p.counters().class_pushes_missed, 1);
        let end: StdVec<_> = p.drain_records().collect();
        assert!(end.iter().any(|r| r.class == Class::Realtime as u8));
    }

    /// The wire tuple of client `c`'s packets (or of the replies).
    fn tuple(c: u32, reply: bool) -> FlowTuple {
        let frame = tcp(c, reply, 0, 0);
        parse(LinkType::Ethernet, &frame, frame.len() as u32)
            .unwrap()
            .tuple
    }

    fn other_node(node: u16) -> u16 {
        (node + 1) % 4
    }

    #[test]
    fn a_handed_off_flow_moves_at_its_next_flowlet_boundary_and_never_before() {
        let cfg = small();
        let gap_ns = u64::from(cfg.flowlet_gap_us) * 1_000;
        let mut p = Pipeline::new(&cfg).unwrap();
        let bystanders: StdVec<u16> = (100..140)
            .map(|c| send(&mut p, 0, &tcp(c, false, TCP_SYN, 0)).node)
            .collect();
        let first = send(&mut p, 0, &tcp(1, false, TCP_SYN, 0));
        let (old, target) = (first.node, other_node(first.node));
        let before = p.counters().nodes.clone();
        assert!(
            p.hand_off(&tuple(1, true), target),
            "either direction names the flow"
        );
        assert_eq!(p.pending_hand_offs(), 1);
        // Inside the flowlet, up to a gap of exactly δ: still the old node.
        let mut t = 0;
        for step in [10_000, 100_000, gap_ns] {
            t += step;
            let d = send(&mut p, t, &tcp(1, step == gap_ns, 0, 10));
            assert_eq!(
                (d.node, d.flowlet),
                (old, 0),
                "moved {step} ns into the flowlet"
            );
        }
        assert_eq!(p.counters().flows_handed_off, 0);
        t += gap_ns + 1_000;
        let d = send(&mut p, t, &tcp(1, false, 0, 10));
        assert_eq!((d.node, d.shard, d.flowlet), (target, first.shard, 1));
        let c = p.counters();
        assert_eq!(c.flows_handed_off, 1);
        assert_eq!(p.pending_hand_offs(), 0);
        assert_eq!(
            c.nodes[old as usize].active_flows,
            before[old as usize].active_flows - 1
        );
        assert_eq!(
            c.nodes[target as usize].active_flows,
            before[target as usize].active_flows + 1
        );
        assert_eq!(
            c.nodes[target as usize].flows,
            before[target as usize].flows + 1
        );
        // It stays there, flowlet after flowlet.
        for _ in 0..3 {
            t += gap_ns + 1_000;
            assert_eq!(send(&mut p, t, &tcp(1, true, 0, 10)).node, target);
        }
        for (i, c) in (100..140).enumerate() {
            assert_eq!(send(&mut p, t, &tcp(c, true, 0, 1)).node, bystanders[i]);
        }
        // An absent flow and an undefined node are refused and counted.
        assert!(!p.hand_off(&tuple(77, false), 0));
        assert!(!p.hand_off(&tuple(1, false), 9));
        assert_eq!(p.counters().handoffs_refused, 2);
        assert_eq!(p.pending_hand_offs(), 0);
        // Naming the current node, or cancelling, leaves nothing pending.
        assert!(p.hand_off(&tuple(1, false), old));
        assert!(p.hand_off(&tuple(1, false), target));
        assert_eq!(p.pending_hand_offs(), 0);
        assert!(p.hand_off(&tuple(1, false), old));
        assert!(p.cancel_hand_off(&tuple(1, true)));
        assert!(!p.cancel_hand_off(&tuple(1, true)));
        t += gap_ns + 1_000;
        assert_eq!(send(&mut p, t, &tcp(1, false, 0, 10)).node, target);
        assert_eq!(p.counters().flows_handed_off, 1);
    }

    #[test]
    fn handoffs_to_inactive_nodes_or_of_ended_flows_are_dropped_and_a_failed_node_hands_off_at_once()
     {
        let cfg = small();
        let gap_ns = u64::from(cfg.flowlet_gap_us) * 1_000;
        let mut p = Pipeline::new(&cfg).unwrap();
        let a = send(&mut p, 0, &tcp(1, false, TCP_SYN, 0));
        let target = other_node(a.node);
        assert!(p.hand_off(&tuple(1, false), target));
        p.set_node_state(target, NodeState::Draining).unwrap();
        let d = send(&mut p, gap_ns + 1_000, &tcp(1, false, 0, 10));
        assert_eq!(d.node, a.node, "a draining target takes no flow");
        assert_eq!(p.counters().handoffs_dropped, 1);
        assert_eq!(p.pending_hand_offs(), 0);
        p.set_node_state(target, NodeState::Active).unwrap();

        // The flow's own node fails with a handoff pending: it goes to the target on
        // its next packet, not to wherever a remap would send it.
        assert!(p.hand_off(&tuple(1, false), target));
        p.set_node_state(a.node, NodeState::Down).unwrap();
        let d = send(&mut p, gap_ns + 2_000, &tcp(1, true, 0, 10));
        assert_eq!((d.node, d.flowlet), (target, 1));
        assert_eq!(p.counters().flows_handed_off, 1);
        assert_eq!(p.counters().flows_remapped, 0);
        p.set_node_state(a.node, NodeState::Active).unwrap();

        let b = send(&mut p, gap_ns + 3_000, &tcp(2, false, TCP_SYN, 0));
        assert!(p.hand_off(&tuple(2, false), other_node(b.node)));
        p.flush();
        assert_eq!(p.counters().handoffs_ended, 1);
        assert_eq!(p.pending_hand_offs(), 0);
        assert!(!p.hand_off(&tuple(2, false), other_node(b.node)));
    }

    #[test]
    fn pinned_flows_move_at_once_and_stay_through_flowlets_until_unpinned() {
        let cfg = small_bulk_sharded();
        let gap_ns = u64::from(cfg.flowlet_gap_us) * 1_000 + 1_000;
        let mut p = Pipeline::new(&cfg).unwrap();
        let a = send(&mut p, 0, &tcp(7, false, TCP_SYN, 0));
        let node = other_node(a.node);
        assert!(p.hand_off(&tuple(7, false), a.node ^ 2));
        assert_eq!(p.pin_flow(&tuple(7, true), node), Ok(()));
        assert_eq!(p.pending_hand_offs(), 0, "a pin cancels a pending handoff");
        let d = send(&mut p, 10_000, &tcp(7, false, 0, 10));
        assert_eq!(
            (d.node, d.shard),
            (node, a.shard),
            "moved at once, shard kept"
        );
        let moves = p.counters().flowlet_moves;
        let mut t = 10_000;
        for flowlet in 1..6 {
            t += gap_ns;
            let d = send(&mut p, t, &tcp(7, false, 0, 10));
            assert_eq!((d.node, d.shard, d.flowlet), (node, a.shard, flowlet));
        }
        assert_eq!(
            p.counters().flowlet_moves,
            moves,
            "sharding leaves a pinned flow"
        );
        assert_eq!(p.counters().flows_pinned, 1);
        assert!(p.unpin_flow(&tuple(7, false)));
        t += gap_ns;
        assert_ne!(send(&mut p, t, &tcp(7, false, 0, 10)).shard, a.shard);
        assert_eq!(p.counters().flowlet_moves, moves + 1);
        // Refused: an absent flow, an undefined node, a node that is not active.
        let refused = |p: &mut Pipeline, flow, node| p.pin_flow(&tuple(flow, false), node);
        assert_eq!(refused(&mut p, 8, node), Err(PinRefused::NoSuchFlow));
        assert_eq!(refused(&mut p, 7, 9), Err(PinRefused::NodeNotActive));
        p.set_node_state(node, NodeState::Draining).unwrap();
        assert_eq!(refused(&mut p, 7, node), Err(PinRefused::NodeNotActive));
        assert!(!p.unpin_flow(&tuple(8, false)));
        assert_eq!(p.counters().pins_refused, 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Packet by packet against a model: a flow moves only to its handoff target,
        /// only on the first packet after a gap longer than δ, only if the target is
        /// active then; no other flow ever changes node; refusals are exactly those of
        /// absent flows and undefined nodes.
        #[test]
        fn handoffs_move_only_their_flow_and_only_at_a_boundary(
            events in proptest::collection::vec(
                // Mostly short steps, so flows see both gaps inside δ and gaps past it.
                (0u8..10, 0u32..24, any::<bool>(), prop_oneof![4 => 0u64..20_000, 1 => 0u64..1_200_000], 0u16..6),
                1..500,
            ),
        ) {
            let cfg = small();
            let gap_us = u64::from(cfg.flowlet_gap_us);
            let mut p = Pipeline::new(&cfg).unwrap();
            let mut t = 0u64;
            // flow → (node, last packet µs, pending target)
            let mut model: std::collections::BTreeMap<u32, (u16, u64, Option<u16>)> =
                std::collections::BTreeMap::new();
            let mut active = [true; 4];
            let (mut moved, mut refused) = (0u64, 0u64);
            for (kind, c, reply, dt, node) in events {
                t += dt;
                match kind {
                    0..=1 => {
                        let ok = p.hand_off(&tuple(c, reply), node);
                        let want = match model.get_mut(&c) {
                            Some(f) if node < 4 => {
                                f.2 = (node != f.0).then_some(node);
                                true
                            }
                            _ => false,
                        };
                        refused += u64::from(!want);
                        prop_assert_eq!(ok, want);
                    }
                    // Node 0 stays active, so new flows always find a node.
                    2 if (1..4).contains(&node) => {
                        active[node as usize] = !active[node as usize];
                        let state = if active[node as usize] { NodeState::Active } else { NodeState::Draining };
                        p.set_node_state(node, state).unwrap();
                    }
                    _ => {
                        let d = send(&mut p, t, &tcp(c, reply, 0, 0));
                        prop_assert_eq!(d.verdict, Verdict::Forward);
                        let now_us = t / 1_000;
                        let f = model.entry(c).or_insert((d.node, now_us, None));
                        if now_us - f.1 > gap_us && let Some(target) = f.2.take() && active[target as usize] {
                            f.0 = target;
                            moved += 1;
                        }
                        f.1 = now_us;
                        prop_assert_eq!(d.node, f.0, "flow {}", c);
                    }
                }
            }
            let pending = model.values().filter(|f| f.2.is_some()).count();
            prop_assert_eq!(p.pending_hand_offs(), pending);
            prop_assert_eq!(p.counters().flows_handed_off, moved);
            prop_assert_eq!(p.counters().handoffs_refused, refused);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Whatever the arrival order, timing and bucket-table changes, every packet of
        /// a non-sharded flow goes to one node, and bursts equal single packets.
        #[test]
        fn a_flow_never_changes_node(
            events in proptest::collection::vec((0u32..60, any::<bool>(), 0u64..50_000_000, 0u16..16), 1..400),
            rewrite_at in proptest::collection::vec(0usize..400, 0..4),
        ) {
            let mut burst = Pipeline::new(&small()).unwrap();
            let mut single = Pipeline::new(&small()).unwrap();
            let mut t = 0;
            let mut pinned = std::collections::BTreeMap::new();
            let frames: StdVec<(u64, StdVec<u8>)> = events.iter().map(|(c, reply, dt, _)| {
                t += dt;
                (t, tcp(*c, *reply, 0, 0))
            }).collect();
            let mut decisions = StdVec::new();
            for (i, chunk) in frames.chunks(37).enumerate() {
                if rewrite_at.contains(&i) {
                    let shard = events[i].3;
                    burst.set_bucket_table(&[shard; 256]).unwrap();
                    single.set_bucket_table(&[shard; 256]).unwrap();
                }
                let pkts: StdVec<Packet> = chunk.iter().map(|(ts, f)| Packet { ts_ns: *ts, data: f, wire_len: f.len() as u32 }).collect();
                burst.process_burst(LinkType::Ethernet, &pkts, &mut decisions);
                for pk in &pkts {
                    let one = single.process(LinkType::Ethernet, *pk);
                    prop_assert_eq!(Some(one), decisions.get(decisions.len() - pkts.len() + (pk as *const _ as usize - pkts.as_ptr() as usize) / core::mem::size_of::<Packet>()).copied());
                }
            }
            for (d, (c, _, _, _)) in decisions.iter().zip(&events) {
                prop_assert_eq!(d.verdict, Verdict::Forward);
                // Flows end only by idling out (≥ 300 s), which these events never reach.
                let node = *pinned.entry(*c).or_insert(d.node);
                prop_assert_eq!(node, d.node);
            }
        }
    }
}
