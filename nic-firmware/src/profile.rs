//! The flow profiler's inputs and its tree ensemble compiled into match-action tables.
//!
//! [`features`] turns a flow feature record into the model's input vector. It is the
//! only definition of that vector: `flowshard features` writes it for training, the
//! host profiler feeds it to the ONNX model, and the NIC feeds it to its own tables, so
//! training and serving cannot drift. Every feature is an integer below 2^23, which an
//! `f32` holds exactly, so a split `x <= 442.5` of the trained model and the table
//! entry `x <= 442` decide alike.
//!
//! [`ClassifierTables`] is the tree ensemble laid out the way a switch or NIC pipeline
//! runs one (Planter, pForest): one range table per feature maps the feature's value to
//! a code per tree (the interval between that tree's split points); each tree's codes
//! select leaf bit vectors that are ANDed to the one leaf they share (the bit-vector
//! form of a multi-field range match); the code table holds each leaf's class scores,
//! summed over the trees. The cost is fixed per flow — one lookup per feature, a few
//! word ANDs per tree — and nothing walks a tree.

use alloc::vec;
use alloc::vec::Vec;

use hdl_bindings::telemetry::{FeatureRecord, MAX_FEATURE_PACKETS};

use crate::Class;

/// Features before the per-packet ones.
const SCALAR_FEATURES: usize = 15;
/// Features derived from the record's fields (after the per-packet ones).
const DERIVED_FEATURES: usize = 26;
/// Where the derived features start.
const DERIVED: usize = SCALAR_FEATURES + 2 * MAX_FEATURE_PACKETS;
/// Length of the model's input vector.
pub const FEATURES: usize = DERIVED + DERIVED_FEATURES;
/// A TCP packet of at least this IP length carries data (not a bare SYN or ACK).
const TCP_DATA_SIZE: u32 = 80;
/// A packet of at least this IP length is a full-sized one.
const BIG_SIZE: u32 = 1200;

/// Well-known (IANA) service ports by the kind of service, for the `port_group`
/// feature: it lets the model treat a port it never saw in training like the others of
/// its kind (8080 like 80). 0 is any other port.
const PORT_GROUPS: &[(u32, &[u16])] = &[
    // HTTP
    (1, &[80, 8080, 8000, 8008, 8081, 8888, 3128]),
    // HTTPS / QUIC
    (2, &[443, 8443]),
    // DNS, DoT, mDNS, LLMNR
    (3, &[53, 853, 5353, 5355]),
    // system and network services
    (
        4,
        &[
            123, 67, 68, 137, 138, 139, 445, 161, 162, 514, 1900, 111, 135, 88, 389, 636, 546, 547,
            3702,
        ],
    ),
    // mail, chat, IoT/ICS
    (
        5,
        &[
            25, 465, 587, 110, 995, 143, 993, 5222, 5223, 5228, 1883, 8883, 5683, 5684, 502, 20000,
            102, 2404, 47808, 6667,
        ],
    ),
    // VoIP / RTC signalling and STUN
    (
        6,
        &[
            3478, 3479, 3480, 3481, 5060, 5061, 5004, 5005, 19302, 19303, 19304, 19305, 19306,
            19307, 19308, 19309,
        ],
    ),
    // remote access, VPN
    (
        7,
        &[22, 23, 3389, 5900, 1194, 500, 4500, 1701, 1723, 51820, 992],
    ),
    // file transfer, databases, peer-to-peer
    (
        8,
        &[
            20, 21, 69, 873, 3306, 5432, 1433, 1521, 27017, 6379, 11211, 9092, 6881, 6882, 6883,
            6884, 6885, 6886, 6887, 6888, 6889,
        ],
    ),
    // streaming
    (9, &[554, 1935, 8554, 1755]),
];

/// The service group of a port (see [`PORT_GROUPS`]), 0 when it has none.
pub fn port_group(port: u16) -> u32 {
    PORT_GROUPS
        .iter()
        .find(|(_, ports)| ports.contains(&port))
        .map_or(0, |(g, _)| *g)
}

/// 0 for a well-known port (below 1024), 1 for a registered one, 2 for a dynamic one.
fn port_range(port: u16) -> u32 {
    match port {
        0..1024 => 0,
        1024..49152 => 1,
        _ => 2,
    }
}
/// Every feature is clamped below this, so `f32` holds it and any split point between
/// two of its values exactly.
pub const FEATURE_LIMIT: u32 = (1 << 23) - 1;

/// Names of the input vector's entries, in order (the CSV header of `flowshard features`).
pub const FEATURE_NAMES: [&str; FEATURES] = [
    "proto",
    "client_port",
    "server_port",
    "n",
    "tcp_flags_client",
    "tcp_flags_server",
    "directions",
    "packets_up",
    "packets_down",
    "bytes_up",
    "bytes_down",
    "max_size_up",
    "max_size_down",
    "min_size",
    "duration_us",
    "size_0",
    "size_1",
    "size_2",
    "size_3",
    "size_4",
    "size_5",
    "size_6",
    "size_7",
    "size_8",
    "size_9",
    "size_10",
    "size_11",
    "size_12",
    "size_13",
    "size_14",
    "size_15",
    "iat_us_0",
    "iat_us_1",
    "iat_us_2",
    "iat_us_3",
    "iat_us_4",
    "iat_us_5",
    "iat_us_6",
    "iat_us_7",
    "iat_us_8",
    "iat_us_9",
    "iat_us_10",
    "iat_us_11",
    "iat_us_12",
    "iat_us_13",
    "iat_us_14",
    "iat_us_15",
    "port_group",
    "low_port",
    "server_port_range",
    "client_port_range",
    "data_up",
    "data_down",
    "big_up",
    "big_down",
    "up_0",
    "down_0",
    "up_1",
    "down_1",
    "up_2",
    "down_2",
    "data_up_0",
    "data_down_0",
    "data_up_1",
    "data_down_1",
    "data_up_2",
    "data_down_2",
    "dir_changes",
    "down_share",
    "max_iat_us",
    "min_iat_us",
    "mean_iat_us",
    "mean_size",
];

/// The model's input vector of a flow's first record: what the NIC knows of its first
/// `n` packets. "Up" is client → server.
pub fn features(r: &FeatureRecord) -> [u32; FEATURES] {
    let clamp = |v: u64| v.min(u64::from(FEATURE_LIMIT)) as u32;
    let n = usize::from(r.n).min(MAX_FEATURE_PACKETS);
    let mut x = [0u32; FEATURES];
    let (mut pk_up, mut pk_down, mut by_up, mut by_down) = (0u64, 0u64, 0u64, 0u64);
    let (mut max_up, mut max_down, mut min_size, mut duration) = (0u32, 0u32, u32::MAX, 0u64);
    for i in 0..n {
        let size = u32::from(r.sizes[i]);
        if r.directions & (1 << i) == 0 {
            pk_up += 1;
            by_up += u64::from(size);
            max_up = max_up.max(size);
        } else {
            pk_down += 1;
            by_down += u64::from(size);
            max_down = max_down.max(size);
        }
        min_size = min_size.min(size);
        duration += u64::from(r.iat_us[i]);
        x[SCALAR_FEATURES + i] = size;
        x[SCALAR_FEATURES + MAX_FEATURE_PACKETS + i] = clamp(u64::from(r.iat_us[i]));
    }
    x[0] = u32::from(r.proto);
    x[1] = u32::from(r.client_port);
    x[2] = u32::from(r.server_port);
    x[3] = n as u32;
    x[4] = u32::from(r.tcp_flags_client);
    x[5] = u32::from(r.tcp_flags_server);
    x[6] = r.directions & ((1 << MAX_FEATURE_PACKETS) - 1);
    x[7] = pk_up as u32;
    x[8] = pk_down as u32;
    x[9] = clamp(by_up);
    x[10] = clamp(by_down);
    x[11] = max_up;
    x[12] = max_down;
    x[13] = if n == 0 { 0 } else { min_size };
    x[14] = clamp(duration);
    derive(&mut x, n);
    x
}

/// The derived features, from the vector's own fields so that training can check them
/// from the CSV columns: port groups and ranges, data and full-sized packets per
/// direction, the first three packet sizes of each direction (all, and data only), how
/// often the direction changes, the downstream byte share (in 64ths), inter-arrival
/// statistics (of packets 1..n) and the mean size.
fn derive(x: &mut [u32; FEATURES], n: usize) {
    let (server_port, client_port) = (x[2] as u16, x[1] as u16);
    let sg = port_group(server_port);
    let d = DERIVED;
    x[d] = if sg != 0 { sg } else { port_group(client_port) };
    x[d + 1] = u32::from(server_port.min(client_port));
    x[d + 2] = port_range(server_port);
    x[d + 3] = port_range(client_port);
    let data_size = if x[0] == 6 { TCP_DATA_SIZE } else { 0 };
    let directions = x[6];
    // Per direction (0 up, 1 down): data and big counts, the first three sizes of all
    // packets and of data packets.
    let mut data = [0u32; 2];
    let mut big = [0u32; 2];
    let mut seen = [0usize; 2];
    let mut first = [[0u32; 3]; 2];
    let mut first_data = [[0u32; 3]; 2];
    let (mut changes, mut max_iat, mut min_iat) = (0u32, 0u32, u32::MAX);
    for i in 0..n {
        let size = x[SCALAR_FEATURES + i];
        let dir = ((directions >> i) & 1) as usize;
        if seen[dir] < 3 {
            first[dir][seen[dir]] = size;
        }
        seen[dir] += 1;
        if size >= data_size {
            if (data[dir] as usize) < 3 {
                first_data[dir][data[dir] as usize] = size;
            }
            data[dir] += 1;
        }
        if size >= BIG_SIZE {
            big[dir] += 1;
        }
        if i > 0 {
            let iat = x[SCALAR_FEATURES + MAX_FEATURE_PACKETS + i];
            max_iat = max_iat.max(iat);
            min_iat = min_iat.min(iat);
            if (directions >> i) & 1 != (directions >> (i - 1)) & 1 {
                changes += 1;
            }
        }
    }
    x[d + 4] = data[0];
    x[d + 5] = data[1];
    x[d + 6] = big[0];
    x[d + 7] = big[1];
    for k in 0..3 {
        x[d + 8 + 2 * k] = first[0][k];
        x[d + 9 + 2 * k] = first[1][k];
        x[d + 14 + 2 * k] = first_data[0][k];
        x[d + 15 + 2 * k] = first_data[1][k];
    }
    x[d + 20] = changes;
    let (up, down) = (u64::from(x[9]), u64::from(x[10]));
    x[d + 21] = (down * 64).checked_div(up + down).unwrap_or(0) as u32;
    x[d + 22] = max_iat;
    x[d + 23] = if n > 1 { min_iat } else { 0 };
    x[d + 24] = if n > 1 { x[14] / (n as u32 - 1) } else { 0 };
    x[d + 25] = (up + down).checked_div(n as u64).unwrap_or(0) as u32;
}

/// One node of a decision tree as the host hands it to the NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// Go to `left` if `x[feature] <= threshold`, else to `right`. Children come after
    /// their parent, which makes every tree acyclic by construction.
    Split {
        feature: u16,
        threshold: u32,
        left: u32,
        right: u32,
    },
    /// Class scores of the leaf (probabilities scaled to [`SCORE_ONE`]).
    Leaf { scores: [u16; Class::COUNT] },
}

/// A leaf score of 1.0.
pub const SCORE_ONE: u16 = 1 << 15;
/// Most trees an ensemble may have.
pub const MAX_TREES: usize = 256;
/// Most nodes one tree may have.
pub const MAX_NODES_PER_TREE: usize = 1 << 16;

/// A tree ensemble: the NIC's class is the argmax of its leaves' summed scores.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Forest {
    /// N: the model classifies a flow from its first N packets.
    pub packets: u8,
    pub trees: Vec<Vec<Node>>,
}

/// Why a forest cannot be compiled into tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForestError {
    /// No tree, or more than [`MAX_TREES`].
    TreeCount(usize),
    /// `packets` is 0 or above 16.
    Packets(u8),
    /// Tree `tree` is empty or has more than [`MAX_NODES_PER_TREE`] nodes.
    TreeSize { tree: usize, nodes: usize },
    /// Node `node` of tree `tree` names a feature beyond [`FEATURES`].
    Feature { tree: usize, node: usize },
    /// Node `node` of tree `tree` has a child that is not after it or not in the tree.
    Child { tree: usize, node: usize },
    /// Node `node` of tree `tree` is reached twice or never.
    Shape { tree: usize, node: usize },
}

impl core::fmt::Display for ForestError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ForestError::TreeCount(n) => write!(f, "{n} trees (need 1 to {MAX_TREES})"),
            ForestError::Packets(n) => write!(f, "N = {n} packets (need 1 to 16)"),
            ForestError::TreeSize { tree, nodes } => write!(
                f,
                "tree {tree} has {nodes} nodes (need 1 to {MAX_NODES_PER_TREE})"
            ),
            ForestError::Feature { tree, node } => write!(
                f,
                "tree {tree} node {node} splits on a feature beyond the {FEATURES} inputs"
            ),
            ForestError::Child { tree, node } => write!(
                f,
                "tree {tree} node {node} has a child outside the tree or before it"
            ),
            ForestError::Shape { tree, node } => write!(
                f,
                "tree {tree} node {node} is not reached exactly once from the root"
            ),
        }
    }
}

/// How big the compiled tables are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableSizes {
    pub trees: usize,
    /// Features some split uses (the rest need no range table).
    pub features_used: usize,
    /// Range-table entries over all features (distinct split points + 1 each).
    pub range_entries: usize,
    /// Per-tree codes stored in the range tables' action data.
    pub range_codes: usize,
    /// Leaf bit vectors, one per (tree, feature it uses, interval).
    pub leaf_vectors: usize,
    /// Code-table entries: one per leaf.
    pub leaves: usize,
    /// Bytes of all tables: range keys (4 B) and codes (2 B), bit vectors, leaf scores.
    pub bytes: usize,
}

/// The range table of one feature.
#[derive(Clone, Debug)]
struct RangeTable {
    feature: usize,
    /// Sorted distinct split points; interval `k` is `(points[k-1], points[k]]`.
    points: Vec<u32>,
    /// Trees that split on the feature, with their bit-vector base in `vectors`.
    users: Vec<RangeUser>,
    /// `codes[k * users.len() + u]`: user `u`'s local interval for global interval `k`.
    codes: Vec<u16>,
}

#[derive(Clone, Copy, Debug)]
struct RangeUser {
    tree: u16,
    /// Index of the tree's first leaf vector for this feature, in words of `vectors`.
    base: u32,
}

/// A tree ensemble compiled into range tables, leaf bit vectors and a code table.
#[derive(Clone, Debug)]
pub struct ClassifierTables {
    packets: u8,
    ranges: Vec<RangeTable>,
    /// Per tree: first leaf (global leaf index) and words of its bit vectors.
    tree_leaf_base: Vec<u32>,
    tree_words: Vec<u16>,
    /// Per tree, where its leaf-set words start among all trees' (and the total last).
    tree_offsets: Vec<usize>,
    vectors: Vec<u64>,
    /// Code table: class scores per global leaf.
    scores: Vec<[u16; Class::COUNT]>,
    sizes: TableSizes,
}

/// Where each tree's leaf-set words start among all trees' (and the total last).
fn tree_offsets(tree_words: &[u16]) -> Vec<usize> {
    let mut offsets = Vec::with_capacity(tree_words.len() + 1);
    let mut at = 0;
    for w in tree_words {
        offsets.push(at);
        at += usize::from(*w);
    }
    offsets.push(at);
    offsets
}

/// One leaf's box: per feature the interval of the tree's own split points it covers,
/// as `(lo, hi]` bounds given by point indices (`None` = unbounded).
type Bounds = Vec<(Option<u32>, Option<u32>)>;

impl ClassifierTables {
    /// Check and compile a forest. Nothing of a bad forest is kept.
    pub fn compile(forest: &Forest) -> Result<ClassifierTables, ForestError> {
        if forest.trees.is_empty() || forest.trees.len() > MAX_TREES {
            return Err(ForestError::TreeCount(forest.trees.len()));
        }
        if forest.packets == 0 || usize::from(forest.packets) > MAX_FEATURE_PACKETS {
            return Err(ForestError::Packets(forest.packets));
        }
        // Per tree: its leaves' boxes (in threshold values), its leaf scores.
        let mut tree_boxes: Vec<Vec<Bounds>> = Vec::with_capacity(forest.trees.len());
        let mut scores = Vec::new();
        let mut tree_leaf_base = Vec::with_capacity(forest.trees.len());
        for (t, nodes) in forest.trees.iter().enumerate() {
            tree_leaf_base.push(scores.len() as u32);
            tree_boxes.push(Self::leaves_of(t, nodes, &mut scores)?);
        }
        // Per feature: the distinct split points of the whole forest, and per tree its own.
        let mut global: Vec<Vec<u32>> = vec![Vec::new(); FEATURES];
        let mut local: Vec<Vec<Vec<u32>>> = vec![vec![Vec::new(); FEATURES]; forest.trees.len()];
        for (t, nodes) in forest.trees.iter().enumerate() {
            for n in nodes {
                if let Node::Split {
                    feature, threshold, ..
                } = *n
                {
                    global[usize::from(feature)].push(threshold);
                    local[t][usize::from(feature)].push(threshold);
                }
            }
        }
        for v in global.iter_mut().chain(local.iter_mut().flatten()) {
            v.sort_unstable();
            v.dedup();
        }
        let tree_words: Vec<u16> = tree_boxes
            .iter()
            .map(|b| b.len().div_ceil(64) as u16)
            .collect();
        let mut vectors = Vec::new();
        let mut ranges = Vec::new();
        let mut sizes = TableSizes {
            trees: forest.trees.len(),
            leaves: scores.len(),
            ..TableSizes::default()
        };
        for (f, points) in global.into_iter().enumerate() {
            if points.is_empty() {
                continue;
            }
            let mut users = Vec::new();
            for (t, boxes) in tree_boxes.iter().enumerate() {
                let own = &local[t][f];
                if own.is_empty() {
                    continue;
                }
                users.push(RangeUser {
                    tree: t as u16,
                    base: vectors.len() as u32,
                });
                let words = usize::from(tree_words[t]);
                // Local interval k is (own[k-1], own[k]]; a leaf covers it when its
                // bounds enclose it.
                for k in 0..=own.len() {
                    let lo = k.checked_sub(1).map(|i| own[i]);
                    let hi = own.get(k).copied();
                    let mut v = vec![0u64; words];
                    for (leaf, b) in boxes.iter().enumerate() {
                        let (blo, bhi) = b[f];
                        let lo_ok = blo.is_none_or(|x| lo.is_some_and(|l| l >= x));
                        let hi_ok = bhi.is_none_or(|x| hi.is_some_and(|h| h <= x));
                        if lo_ok && hi_ok {
                            v[leaf / 64] |= 1 << (leaf % 64);
                        }
                    }
                    vectors.extend_from_slice(&v);
                    sizes.leaf_vectors += 1;
                }
            }
            let mut codes = Vec::with_capacity((points.len() + 1) * users.len());
            for k in 0..=points.len() {
                // Any value of global interval k; its local interval per user tree.
                let probe = if k == 0 {
                    points[0]
                } else {
                    points[k - 1].saturating_add(1)
                };
                for u in &users {
                    let own = &local[usize::from(u.tree)][f];
                    codes.push(own.partition_point(|p| *p < probe) as u16);
                }
            }
            sizes.features_used += 1;
            sizes.range_entries += points.len() + 1;
            sizes.range_codes += codes.len();
            sizes.bytes += points.len() * 4 + codes.len() * 2;
            ranges.push(RangeTable {
                feature: f,
                points,
                users,
                codes,
            });
        }
        sizes.bytes += vectors.len() * 8 + scores.len() * Class::COUNT * 2;
        Ok(ClassifierTables {
            packets: forest.packets,
            tree_offsets: tree_offsets(&tree_words),
            ranges,
            tree_leaf_base,
            tree_words,
            vectors,
            scores,
            sizes,
        })
    }

    /// Check one tree and collect its leaves' boxes (as threshold values) and scores.
    fn leaves_of(
        t: usize,
        nodes: &[Node],
        scores: &mut Vec<[u16; Class::COUNT]>,
    ) -> Result<Vec<Bounds>, ForestError> {
        if nodes.is_empty() || nodes.len() > MAX_NODES_PER_TREE {
            return Err(ForestError::TreeSize {
                tree: t,
                nodes: nodes.len(),
            });
        }
        let mut reached = vec![false; nodes.len()];
        let mut boxes = Vec::new();
        let mut stack: Vec<(usize, Bounds)> = vec![(0, vec![(None, None); FEATURES])];
        reached[0] = true;
        while let Some((i, b)) = stack.pop() {
            match nodes[i] {
                Node::Leaf { scores: s } => {
                    scores.push(s);
                    boxes.push(b);
                }
                Node::Split {
                    feature,
                    threshold,
                    left,
                    right,
                } => {
                    let f = usize::from(feature);
                    if f >= FEATURES {
                        return Err(ForestError::Feature { tree: t, node: i });
                    }
                    let (l, r) = (left as usize, right as usize);
                    if l <= i || r <= i || l >= nodes.len() || r >= nodes.len() {
                        return Err(ForestError::Child { tree: t, node: i });
                    }
                    for c in [l, r] {
                        if core::mem::replace(&mut reached[c], true) {
                            return Err(ForestError::Shape { tree: t, node: c });
                        }
                    }
                    let mut lb = b.clone();
                    lb[f].1 = Some(lb[f].1.map_or(threshold, |h| h.min(threshold)));
                    let mut rb = b;
                    rb[f].0 = Some(rb[f].0.map_or(threshold, |lo| lo.max(threshold)));
                    // Right pushed first so leaves are numbered in depth-first left-to-right order.
                    stack.push((r, rb));
                    stack.push((l, lb));
                }
            }
        }
        if let Some(node) = reached.iter().position(|r| !r) {
            return Err(ForestError::Shape { tree: t, node });
        }
        Ok(boxes)
    }

    /// N: the packet at which the NIC classifies a flow.
    pub fn packets(&self) -> u8 {
        self.packets
    }

    pub fn sizes(&self) -> TableSizes {
        self.sizes
    }

    /// Classify one input vector: the class with the highest summed score (the lowest
    /// class index on a tie, as ONNX Runtime's argmax) and that score's share of the total.
    pub fn classify(&self, x: &[u32; FEATURES]) -> (Class, f32) {
        self.classify_with(x, &mut Vec::new())
    }

    /// [`ClassifierTables::classify`] with the leaf-set registers in `scratch`, so a
    /// caller that classifies many flows allocates them once.
    pub fn classify_with(&self, x: &[u32; FEATURES], scratch: &mut Vec<u64>) -> (Class, f32) {
        let trees = self.tree_words.len();
        let offsets = &self.tree_offsets;
        scratch.clear();
        scratch.resize(offsets[trees], u64::MAX);
        let leaf_sets = scratch;
        for r in &self.ranges {
            let k = r.points.partition_point(|p| *p < x[r.feature]);
            let codes = &r.codes[k * r.users.len()..(k + 1) * r.users.len()];
            for (u, code) in r.users.iter().zip(codes) {
                let t = usize::from(u.tree);
                let words = usize::from(self.tree_words[t]);
                let v = u.base as usize + usize::from(*code) * words;
                for (acc, bits) in leaf_sets[offsets[t]..offsets[t + 1]]
                    .iter_mut()
                    .zip(&self.vectors[v..v + words])
                {
                    *acc &= bits;
                }
            }
        }
        let mut sum = [0u32; Class::COUNT];
        for t in 0..trees {
            let set = &leaf_sets[offsets[t]..offsets[t + 1]];
            // Exactly one leaf of a tree contains any point; the first set bit is it.
            if let Some((w, bits)) = set.iter().enumerate().find(|(_, b)| **b != 0) {
                let leaf =
                    self.tree_leaf_base[t] as usize + w * 64 + bits.trailing_zeros() as usize;
                if let Some(s) = self.scores.get(leaf) {
                    for (acc, v) in sum.iter_mut().zip(s) {
                        *acc += u32::from(*v);
                    }
                }
            }
        }
        let mut best = 0;
        for (i, v) in sum.iter().enumerate() {
            if *v > sum[best] {
                best = i;
            }
        }
        let total: u32 = sum.iter().sum();
        let share = if total == 0 {
            0.0
        } else {
            sum[best] as f32 / total as f32
        };
        (Class::ALL[best], share)
    }
}

/// Magic of serialized [`ClassifierTables`].
pub const TABLES_MAGIC: [u8; 4] = *b"FSCT";
/// Layout version of serialized [`ClassifierTables`].
pub const TABLES_VERSION: u16 = 1;

/// Why bytes are not serialized [`ClassifierTables`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TablesFormatError {
    /// Byte offset of the problem.
    pub offset: usize,
    pub why: &'static str,
}

impl core::fmt::Display for TablesFormatError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "classifier tables: {} at byte {}", self.why, self.offset)
    }
}

/// Little-endian reader over serialized tables that fails instead of reading past
/// the end, so no count or length in the bytes can make the NIC read out of bounds.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn fail<T>(&self, why: &'static str) -> Result<T, TablesFormatError> {
        Err(TablesFormatError {
            offset: self.at,
            why,
        })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], TablesFormatError> {
        match self
            .at
            .checked_add(n)
            .and_then(|end| self.b.get(self.at..end))
        {
            Some(s) => {
                self.at += n;
                Ok(s)
            }
            None => self.fail("truncated"),
        }
    }

    fn u16(&mut self) -> Result<u16, TablesFormatError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }

    fn u32(&mut self) -> Result<u32, TablesFormatError> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    /// A count of items of `item_len` bytes each that must still fit in the input, so
    /// a corrupt count cannot make the reader allocate more than the input's size.
    fn count(&mut self, item_len: usize) -> Result<usize, TablesFormatError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(item_len) > self.b.len() - self.at {
            return self.fail("count larger than the bytes that follow");
        }
        Ok(n)
    }
}

/// The wire form of [`ClassifierTables`]: how the host hands compiled tables to the NIC
/// (in an image's classifier section or by the command ring's `LoadClassifier`), so the
/// NIC loads tables rather than running a compiler. Little-endian:
///
/// ```text
/// header:  magic "FSCT" | version u16 = 1 | N u8 | 0 u8 | trees u32 | ranges u32
///          | vector words u32 | leaves u32 | leaf vectors u32 (statistic) | 0 u32
/// trees:   per tree: first leaf u32 | leaf-set words u16 | 0 u16
/// ranges:  per feature table: feature u16 | users u16 | points u32 | points × u32
///          | users × (tree u16 | 0 u16 | vector base u32) | (points+1) × users × u16
///          | 0-padding to 4 bytes
/// vectors: words × u64
/// scores:  leaves × 7 × u16
/// ```
impl ClassifierTables {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.sizes.bytes + 64);
        let put32 = |o: &mut Vec<u8>, v: u32| o.extend_from_slice(&v.to_le_bytes());
        out.extend_from_slice(&TABLES_MAGIC);
        out.extend_from_slice(&TABLES_VERSION.to_le_bytes());
        out.extend_from_slice(&[self.packets, 0]);
        for v in [
            self.tree_words.len(),
            self.ranges.len(),
            self.vectors.len(),
            self.scores.len(),
            self.sizes.leaf_vectors,
            0,
        ] {
            put32(&mut out, v as u32);
        }
        for (base, words) in self.tree_leaf_base.iter().zip(&self.tree_words) {
            put32(&mut out, *base);
            out.extend_from_slice(&words.to_le_bytes());
            out.extend_from_slice(&[0, 0]);
        }
        for r in &self.ranges {
            out.extend_from_slice(&(r.feature as u16).to_le_bytes());
            out.extend_from_slice(&(r.users.len() as u16).to_le_bytes());
            put32(&mut out, r.points.len() as u32);
            r.points.iter().for_each(|p| put32(&mut out, *p));
            for u in &r.users {
                out.extend_from_slice(&u.tree.to_le_bytes());
                out.extend_from_slice(&[0, 0]);
                put32(&mut out, u.base);
            }
            r.codes
                .iter()
                .for_each(|c| out.extend_from_slice(&c.to_le_bytes()));
            out.resize(out.len().next_multiple_of(4), 0);
        }
        self.vectors
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        for s in &self.scores {
            s.iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        out
    }

    /// Read tables written by [`ClassifierTables::to_bytes`], checking every count and
    /// index against the tables themselves: whatever the bytes, the result classifies
    /// without reading outside its tables.
    pub fn from_bytes(b: &[u8]) -> Result<ClassifierTables, TablesFormatError> {
        let mut r = Reader { b, at: 0 };
        if r.take(4)? != TABLES_MAGIC {
            return Err(TablesFormatError {
                offset: 0,
                why: "wrong magic (not classifier tables)",
            });
        }
        if r.u16()? != TABLES_VERSION {
            return r.fail("unsupported layout version");
        }
        let head = r.take(2)?;
        let packets = head[0];
        if packets == 0 || usize::from(packets) > MAX_FEATURE_PACKETS {
            return r.fail("N outside 1..16");
        }
        if head[1] != 0 {
            return r.fail("reserved byte not 0");
        }
        let trees = r.count(8)?;
        let n_ranges = r.count(8)?;
        let words = r.count(8)?;
        let leaves = r.count(2 * Class::COUNT)?;
        let leaf_vectors = r.u32()? as usize;
        if r.u32()? != 0 {
            return r.fail("reserved word not 0");
        }
        if trees == 0 || trees > MAX_TREES {
            return r.fail("tree count outside 1..256");
        }
        if n_ranges > FEATURES {
            return r.fail("more range tables than features");
        }
        let mut tree_leaf_base = Vec::with_capacity(trees);
        let mut tree_words = Vec::with_capacity(trees);
        for _ in 0..trees {
            tree_leaf_base.push(r.u32()?);
            tree_words.push(r.u16()?);
            if r.u16()? != 0 {
                return r.fail("reserved field not 0");
            }
        }
        let mut sizes = TableSizes {
            trees,
            features_used: n_ranges,
            leaf_vectors,
            leaves,
            ..TableSizes::default()
        };
        let mut ranges = Vec::with_capacity(n_ranges);
        for _ in 0..n_ranges {
            let feature = usize::from(r.u16()?);
            let n_users = usize::from(r.u16()?);
            if feature >= FEATURES || ranges.iter().any(|t: &RangeTable| t.feature == feature) {
                return r.fail("range table of no feature, or of one feature twice");
            }
            let n_points = r.count(4)?;
            if n_points == 0 || n_users == 0 {
                return r.fail("empty range table");
            }
            let mut points = Vec::with_capacity(n_points);
            for _ in 0..n_points {
                let p = r.u32()?;
                if points.last().is_some_and(|last| *last >= p) {
                    return r.fail("range points not strictly ascending");
                }
                points.push(p);
            }
            let mut users = Vec::with_capacity(n_users);
            for _ in 0..n_users {
                let tree = r.u16()?;
                if usize::from(tree) >= trees || r.u16()? != 0 {
                    return r.fail("range user names no tree");
                }
                users.push(RangeUser {
                    tree,
                    base: r.u32()?,
                });
            }
            let n_codes = (n_points + 1).saturating_mul(n_users);
            if n_codes.saturating_mul(2) > b.len() - r.at {
                return r.fail("truncated");
            }
            let mut codes = Vec::with_capacity(n_codes);
            for i in 0..n_codes {
                let code = r.u16()?;
                let u = users[i % n_users];
                let w = u64::from(tree_words[usize::from(u.tree)]);
                if u64::from(u.base) + (u64::from(code) + 1) * w > words as u64 {
                    return r.fail("range code points past the leaf vectors");
                }
                codes.push(code);
            }
            let pad = r.at.next_multiple_of(4) - r.at;
            if r.take(pad)?.iter().any(|x| *x != 0) {
                return r.fail("padding not 0");
            }
            sizes.range_entries += n_points + 1;
            sizes.range_codes += n_codes;
            sizes.bytes += n_points * 4 + n_codes * 2;
            ranges.push(RangeTable {
                feature,
                points,
                users,
                codes,
            });
        }
        let vectors: Vec<u64> = r
            .take(words * 8)?
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        let mut scores = Vec::with_capacity(leaves);
        for _ in 0..leaves {
            let mut s = [0u16; Class::COUNT];
            for v in &mut s {
                *v = r.u16()?;
            }
            scores.push(s);
        }
        if r.at != b.len() {
            return r.fail("bytes after the tables");
        }
        sizes.bytes += vectors.len() * 8 + scores.len() * Class::COUNT * 2;
        Ok(ClassifierTables {
            packets,
            tree_offsets: tree_offsets(&tree_words),
            ranges,
            tree_leaf_base,
            tree_words,
            vectors,
            scores,
            sizes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdl_bindings::telemetry::{EndReason, RecordKind};
    use proptest::prelude::*;

    fn leaf(class: Class) -> Node {
        let mut scores = [0; Class::COUNT];
        scores[class as usize] = SCORE_ONE;
        Node::Leaf { scores }
    }

    fn split(feature: u16, threshold: u32, left: u32, right: u32) -> Node {
        Node::Split {
            feature,
            threshold,
            left,
            right,
        }
    }

    /// A reference walk of the forest: the semantics the tables must reproduce.
    fn walk(forest: &Forest, x: &[u32; FEATURES]) -> Class {
        let mut sum = [0u32; Class::COUNT];
        for nodes in &forest.trees {
            let mut i = 0;
            loop {
                match nodes[i] {
                    Node::Leaf { scores } => {
                        for (a, s) in sum.iter_mut().zip(scores) {
                            *a += u32::from(s);
                        }
                        break;
                    }
                    Node::Split {
                        feature,
                        threshold,
                        left,
                        right,
                    } => {
                        i = if x[usize::from(feature)] <= threshold {
                            left as usize
                        } else {
                            right as usize
                        };
                    }
                }
            }
        }
        let mut best = 0;
        for i in 0..Class::COUNT {
            if sum[i] > sum[best] {
                best = i;
            }
        }
        Class::ALL[best]
    }

    fn record(sizes: &[u16], directions: u32) -> FeatureRecord {
        let mut r = FeatureRecord {
            kind: RecordKind::Early,
            end_reason: EndReason::None,
            proto: 6,
            ipv6: false,
            n: sizes.len() as u8,
            class: 255,
            tcp_flags_client: 0x1a,
            tcp_flags_server: 0x12,
            shards_used: 1,
            node: 0,
            shard: 0,
            flowlets: 1,
            client_addr: [0; 16],
            server_addr: [0; 16],
            client_port: 50_000,
            server_port: 443,
            directions,
            first_ts_ns: 0,
            last_ts_ns: 0,
            packets: sizes.len() as u32,
            bytes: 0,
            sizes: [0; MAX_FEATURE_PACKETS],
            iat_us: [0; MAX_FEATURE_PACKETS],
        };
        r.sizes[..sizes.len()].copy_from_slice(sizes);
        for i in 1..sizes.len() {
            r.iat_us[i] = 100 * i as u32;
        }
        r.iat_us[1] = u32::MAX;
        r
    }

    #[test]
    fn features_summarise_both_directions_and_clamp() {
        let x = features(&record(&[60, 60, 1500, 40], 0b0110));
        let named = |name: &str| x[FEATURE_NAMES.iter().position(|n| *n == name).unwrap()];
        assert_eq!(named("n"), 4);
        assert_eq!(named("server_port"), 443);
        assert_eq!((named("packets_up"), named("packets_down")), (2, 2));
        assert_eq!((named("bytes_up"), named("bytes_down")), (100, 1560));
        assert_eq!((named("max_size_up"), named("max_size_down")), (60, 1500));
        assert_eq!(named("min_size"), 40);
        assert_eq!(named("size_2"), 1500);
        assert_eq!(named("size_4"), 0);
        assert_eq!(named("iat_us_1"), FEATURE_LIMIT, "clamped so f32 holds it");
        assert_eq!(named("duration_us"), FEATURE_LIMIT);
        assert!(x.iter().all(|v| *v <= FEATURE_LIMIT));
        // Derived: 443 is HTTPS, the client port is dynamic; 60 and 40 are no data.
        assert_eq!(named("port_group"), 2);
        assert_eq!(named("low_port"), 443);
        assert_eq!(
            (named("server_port_range"), named("client_port_range")),
            (0, 2)
        );
        assert_eq!((named("data_up"), named("data_down")), (0, 1));
        assert_eq!((named("big_up"), named("big_down")), (0, 1));
        assert_eq!((named("up_0"), named("up_1"), named("up_2")), (60, 40, 0));
        assert_eq!((named("down_0"), named("down_1")), (60, 1500));
        assert_eq!((named("data_down_0"), named("data_down_1")), (1500, 0));
        assert_eq!(named("dir_changes"), 2);
        assert_eq!(named("down_share"), 1560 * 64 / 1660);
        assert_eq!(named("max_iat_us"), FEATURE_LIMIT);
        assert_eq!(named("min_iat_us"), 200);
        assert_eq!(named("mean_iat_us"), FEATURE_LIMIT / 3);
        assert_eq!(named("mean_size"), 1660 / 4);
        assert_eq!(port_group(8080), 1);
        assert_eq!(port_group(50_000), 0);
    }

    #[test]
    fn tables_match_a_tree_walk_on_a_small_forest() {
        // Tree 0: port <= 1023 ? (size_0 <= 100 ? infra : web) : video.
        // Tree 1: size_0 <= 500 ? infra : bulk.
        let forest = Forest {
            packets: 4,
            trees: vec![
                vec![
                    split(2, 1023, 1, 4),
                    split(15, 100, 2, 3),
                    leaf(Class::Infra),
                    leaf(Class::Web),
                    leaf(Class::Video),
                ],
                vec![split(15, 500, 1, 2), leaf(Class::Infra), leaf(Class::Bulk)],
            ],
        };
        let t = ClassifierTables::compile(&forest).unwrap();
        let s = t.sizes();
        assert_eq!((s.trees, s.leaves, s.features_used), (2, 5, 2));
        // server_port: 1 point → 2 entries; size_0: points {100, 500} → 3 entries.
        assert_eq!(s.range_entries, 5);
        for port in [53, 1023, 1024, 8080] {
            for size in [40, 100, 101, 500, 501, 1500] {
                let mut x = [0u32; FEATURES];
                x[2] = port;
                x[15] = size;
                assert_eq!(
                    t.classify(&x).0,
                    walk(&forest, &x),
                    "port {port} size {size}"
                );
            }
        }
        let mut x = [0u32; FEATURES];
        x[2] = 443;
        x[15] = 60;
        assert_eq!(t.classify(&x), (Class::Infra, 1.0));
    }

    #[test]
    fn bad_forests_are_refused_with_the_node_at_fault() {
        let ok = vec![split(0, 6, 1, 2), leaf(Class::Web), leaf(Class::Bulk)];
        let cases = [
            (
                Forest {
                    packets: 8,
                    trees: vec![],
                },
                ForestError::TreeCount(0),
            ),
            (
                Forest {
                    packets: 17,
                    trees: vec![ok.clone()],
                },
                ForestError::Packets(17),
            ),
            (
                Forest {
                    packets: 8,
                    trees: vec![
                        ok.clone(),
                        vec![split(99, 6, 1, 2), leaf(Class::Web), leaf(Class::Web)],
                    ],
                },
                ForestError::Feature { tree: 1, node: 0 },
            ),
            (
                Forest {
                    packets: 8,
                    trees: vec![vec![split(0, 6, 0, 2), leaf(Class::Web), leaf(Class::Web)]],
                },
                ForestError::Child { tree: 0, node: 0 },
            ),
            (
                Forest {
                    packets: 8,
                    trees: vec![vec![split(0, 6, 1, 1), leaf(Class::Web)]],
                },
                ForestError::Shape { tree: 0, node: 1 },
            ),
            (
                Forest {
                    packets: 8,
                    trees: vec![vec![split(0, 6, 2, 2), leaf(Class::Web), leaf(Class::Web)]],
                },
                ForestError::Shape { tree: 0, node: 2 },
            ),
            (
                Forest {
                    packets: 8,
                    trees: vec![vec![leaf(Class::Web), leaf(Class::Web)]],
                },
                ForestError::Shape { tree: 0, node: 1 },
            ),
        ];
        for (forest, want) in cases {
            assert_eq!(ClassifierTables::compile(&forest).unwrap_err(), want);
        }
    }

    /// A random forest over a few features, built from a seed of split choices.
    fn random_tree(choices: &[(u16, u32, bool, u8)]) -> Vec<Node> {
        let mut nodes = vec![leaf(Class::Other)];
        let mut open = vec![0usize];
        for (i, &(feature, threshold, grow, class)) in choices.iter().enumerate() {
            let Some(at) = open.pop() else { break };
            if grow && nodes.len() < 60 {
                let l = nodes.len() as u32;
                nodes.push(leaf(Class::ALL[usize::from(class) % Class::COUNT]));
                nodes.push(leaf(Class::ALL[(usize::from(class) + i) % Class::COUNT]));
                nodes[at] = split(feature % 5 * 7, threshold % 1000, l, l + 1);
                open.push(l as usize + 1);
                open.push(l as usize);
            }
        }
        nodes
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn tables_agree_with_a_tree_walk(
            trees in proptest::collection::vec(
                proptest::collection::vec((0u16..40, 0u32..2000, any::<bool>(), 0u8..7), 1..40), 1..6),
            points in proptest::collection::vec(proptest::collection::vec(0u32..1100, 5), 1..20),
        ) {
            let forest = Forest { packets: 8, trees: trees.iter().map(|c| random_tree(c)).collect() };
            let t = ClassifierTables::compile(&forest).unwrap();
            for p in points {
                let mut x = [0u32; FEATURES];
                for (j, v) in p.iter().enumerate() {
                    x[j * 7] = *v;
                }
                prop_assert_eq!(t.classify(&x).0, walk(&forest, &x));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// Serialized tables read back byte-identical and classify alike; damaged ones
        /// are refused or, if they still parse, classify without panicking.
        #[test]
        fn tables_round_trip_and_damage_never_panics(
            trees in proptest::collection::vec(
                proptest::collection::vec((0u16..40, 0u32..2000, any::<bool>(), 0u8..7), 1..40), 1..6),
            points in proptest::collection::vec(proptest::collection::vec(0u32..1100, 5), 1..10),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let forest = Forest { packets: 8, trees: trees.iter().map(|c| random_tree(c)).collect() };
            let t = ClassifierTables::compile(&forest).unwrap();
            let bytes = t.to_bytes();
            let back = ClassifierTables::from_bytes(&bytes).unwrap();
            prop_assert_eq!(back.to_bytes(), bytes.clone());
            prop_assert_eq!(back.sizes(), t.sizes());
            prop_assert_eq!(back.packets(), 8);
            let mut damaged = bytes.clone();
            for (at, x) in &flips {
                damaged[at.index(bytes.len())] ^= x;
            }
            let damaged = ClassifierTables::from_bytes(&damaged).ok();
            prop_assert!(ClassifierTables::from_bytes(&bytes[..cut.index(bytes.len())]).is_err());
            for p in points {
                let mut x = [0u32; FEATURES];
                for (j, v) in p.iter().enumerate() {
                    x[j * 7] = *v;
                }
                prop_assert_eq!(back.classify(&x), t.classify(&x));
                if let Some(d) = &damaged {
                    d.classify(&x);
                }
            }
        }
    }

    #[test]
    fn serialized_tables_name_what_is_wrong() {
        let forest = Forest {
            packets: 4,
            trees: vec![vec![
                split(2, 1023, 1, 2),
                leaf(Class::Web),
                leaf(Class::Bulk),
            ]],
        };
        let bytes = ClassifierTables::compile(&forest).unwrap().to_bytes();
        let err = |b: &[u8]| ClassifierTables::from_bytes(b).unwrap_err().to_string();
        assert_eq!(
            err(b"JUNKJUNK"),
            "classifier tables: wrong magic (not classifier tables) at byte 0"
        );
        let mut b = bytes.clone();
        b[4] = 2;
        assert!(err(&b).contains("unsupported layout version"));
        let mut b = bytes.clone();
        b[6] = 0;
        assert!(err(&b).contains("N outside 1..16"));
        assert!(err(&bytes[..bytes.len() - 1]).contains("truncated"));
        assert!(err(&[bytes.as_slice(), &[0]].concat()).contains("bytes after the tables"));
        let mut b = bytes.clone();
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(err(&b).contains("count larger than the bytes that follow"));
    }
}
