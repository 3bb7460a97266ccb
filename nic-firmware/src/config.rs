//! What a NIC image fixes at load: capacities, hashing, timeouts, nodes and class policies.
//!
//! Every field has a named default, and [`PipelineConfig::validate`] checks the whole
//! configuration before anything is allocated, so a bad config changes nothing.

use alloc::vec::Vec;

use crate::Class;
use crate::rss::MS_RSS_KEY;

/// Largest connection table an image may ask for.
pub const MAX_FLOW_CAPACITY: u32 = 1 << 24;
/// Largest bucket (indirection) table.
pub const MAX_BUCKETS: u32 = 1 << 24;
/// Largest number of nodes (node ids are `0..MAX_NODES`).
pub const MAX_NODES: usize = 4096;
/// Largest shard-group size of a sharded flow: the per-flow "shards used" bitmap is 8 bits.
pub const MAX_GROUP: u8 = 8;
/// Largest idle timeout. Flow entries keep their last-seen time as 32-bit microseconds
/// (wrapping after 71 minutes) to fit in 64 bytes; ageing sweeps the whole table every
/// second of NIC time, so any timeout up to an hour is judged exactly.
pub const MAX_TIMEOUT_MS: u32 = 3_600_000;
/// Largest pool of flows being profiled at once: the entry refers to its slot in 16 bits.
pub const MAX_FEATURE_SLOTS: u32 = 65_535;

/// Administrative and health state of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum NodeState {
    /// Takes new flows and keeps its established ones.
    #[default]
    Active,
    /// Takes no new flows; established flows stay until they end.
    Draining,
    /// Failed: its established flows are remapped on their next packet, and only they.
    Down,
}

/// A load-balancer node behind the NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct NodeConfig {
    pub id: u16,
    /// Relative share of shards; 0 places no shard on the node.
    #[cfg_attr(feature = "serde", serde(default = "default_weight"))]
    pub weight: u32,
    #[cfg_attr(feature = "serde", serde(default))]
    pub state: NodeState,
}

#[cfg(feature = "serde")]
fn default_weight() -> u32 {
    1
}

/// Per-class steering policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct ClassPolicy {
    pub class: Class,
    /// Shard-group size: 1 pins the flow to one shard; k > 1 spreads its flowlets over k.
    pub group: u8,
}

/// A static classifier rule applied when a flow is created: a port range of one
/// protocol maps to a class (checked against both ports; first match wins).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields))]
pub struct PortRule {
    pub proto: u8,
    pub ports: [u16; 2],
    pub class: Class,
}

/// Idle timeouts per protocol, and the linger after a TCP close, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields, default))]
pub struct Timeouts {
    pub tcp_ms: u32,
    /// After FIN from both sides or an RST: late retransmissions still reach the node.
    pub tcp_close_ms: u32,
    pub udp_ms: u32,
    pub icmp_ms: u32,
    pub other_ms: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_ms: 300_000,
            tcp_close_ms: 2_000,
            udp_ms: 30_000,
            icmp_ms: 10_000,
            other_ms: 30_000,
        }
    }
}

/// Everything the data plane needs to start.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(deny_unknown_fields, default))]
pub struct PipelineConfig {
    /// Flows the connection table holds; inserting beyond it evicts (see `conntable`).
    pub flow_capacity: u32,
    /// Bucket (indirection) table entries, a power of two.
    pub buckets: u32,
    /// Shards the buckets are spread over.
    pub shards: u16,
    #[cfg_attr(feature = "serde", serde(with = "hex_key"))]
    pub rss_key: [u8; 40],
    /// ethtool's `symmetric-xor`: both directions of a flow get the same RSS hash.
    pub symmetric_rss: bool,
    /// Seed of the connection table's hash, so its layout cannot be attacked blindly.
    pub table_seed: u64,
    /// Idle gap that ends a flowlet.
    pub flowlet_gap_us: u32,
    /// N: packets described one by one in a flow's feature record.
    pub feature_packets: u8,
    /// Flows that can be in their first N packets at once.
    pub feature_slots: u32,
    /// Telemetry records buffered until the host drains them; more are counted as overflow.
    pub record_queue: u32,
    pub timeouts: Timeouts,
    pub nodes: Vec<NodeConfig>,
    pub class_policies: Vec<ClassPolicy>,
    pub port_rules: Vec<PortRule>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            flow_capacity: 1 << 20,
            buckets: 1 << 16,
            shards: 64,
            rss_key: MS_RSS_KEY,
            symmetric_rss: false,
            table_seed: 0x5eed_f10f_5a4d_0001,
            flowlet_gap_us: 500,
            feature_packets: 8,
            feature_slots: 65_535,
            record_queue: 65_536,
            timeouts: Timeouts::default(),
            nodes: (0..4)
                .map(|id| NodeConfig {
                    id,
                    weight: 1,
                    state: NodeState::Active,
                })
                .collect(),
            class_policies: Vec::new(),
            port_rules: Vec::new(),
        }
    }
}

/// A configuration the data plane refuses, with the key at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `key` has a value outside what the NIC supports; `why` says what is allowed.
    Invalid {
        key: &'static str,
        why: &'static str,
    },
    /// A node id appears twice.
    DuplicateNode(u16),
    /// A node id is too large.
    NodeIdTooLarge(u16),
    /// A class has two policies.
    DuplicatePolicy(Class),
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ConfigError::Invalid { key, why } => write!(f, "`{key}`: {why}"),
            ConfigError::DuplicateNode(id) => write!(f, "`nodes`: node id {id} appears twice"),
            ConfigError::NodeIdTooLarge(id) => {
                write!(f, "`nodes`: node id {id} is not below {MAX_NODES}")
            }
            ConfigError::DuplicatePolicy(c) => {
                write!(f, "`class_policies`: class {} has two policies", c.as_str())
            }
        }
    }
}

impl PipelineConfig {
    /// Check every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, why| Err(ConfigError::Invalid { key, why });
        if self.flow_capacity == 0 || self.flow_capacity > MAX_FLOW_CAPACITY {
            return bad("flow_capacity", "must be between 1 and 16777216");
        }
        if !self.buckets.is_power_of_two() || self.buckets > MAX_BUCKETS {
            return bad("buckets", "must be a power of two no larger than 16777216");
        }
        if self.shards == 0 || u32::from(self.shards) > self.buckets {
            return bad("shards", "must be between 1 and the number of buckets");
        }
        if self.feature_packets == 0
            || usize::from(self.feature_packets) > hdl_bindings::telemetry::MAX_FEATURE_PACKETS
        {
            return bad("feature_packets", "must be between 1 and 16");
        }
        if self.feature_slots > MAX_FEATURE_SLOTS {
            return bad("feature_slots", "must be at most 65535");
        }
        if self.record_queue == 0 {
            return bad("record_queue", "must be at least 1");
        }
        if self.flowlet_gap_us == 0 {
            return bad("flowlet_gap_us", "must be at least 1");
        }
        let t = &self.timeouts;
        for (key, v) in [
            ("timeouts.tcp_ms", t.tcp_ms),
            ("timeouts.tcp_close_ms", t.tcp_close_ms),
            ("timeouts.udp_ms", t.udp_ms),
            ("timeouts.icmp_ms", t.icmp_ms),
            ("timeouts.other_ms", t.other_ms),
        ] {
            if v == 0 || v > MAX_TIMEOUT_MS {
                return bad(key, "must be between 1 and 3600000 ms");
            }
        }
        if self.nodes.is_empty() {
            return bad("nodes", "at least one node is needed");
        }
        let mut seen = alloc::collections::BTreeSet::new();
        for n in &self.nodes {
            if usize::from(n.id) >= MAX_NODES {
                return Err(ConfigError::NodeIdTooLarge(n.id));
            }
            if !seen.insert(n.id) {
                return Err(ConfigError::DuplicateNode(n.id));
            }
        }
        if self.nodes.iter().all(|n| n.weight == 0) {
            return bad("nodes", "at least one node needs a weight above 0");
        }
        let mut classes = alloc::collections::BTreeSet::new();
        for p in &self.class_policies {
            if p.group == 0 || p.group > MAX_GROUP {
                return bad("class_policies.group", "must be between 1 and 8");
            }
            if u16::from(p.group) > self.shards {
                return bad(
                    "class_policies.group",
                    "must not exceed the number of shards",
                );
            }
            if !classes.insert(p.class) {
                return Err(ConfigError::DuplicatePolicy(p.class));
            }
        }
        for r in &self.port_rules {
            if r.ports[0] > r.ports[1] {
                return bad(
                    "port_rules.ports",
                    "range must be [low, high] with low <= high",
                );
            }
        }
        Ok(())
    }
}

#[cfg(feature = "serde")]
mod hex_key {
    //! The RSS key as 80 hex digits, the way `ethtool -x` prints it (colons allowed).
    use alloc::string::String;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(key: &[u8; 40], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(80);
        for b in key {
            for nib in [b >> 4, b & 0xf] {
                out.push(char::from_digit(u32::from(nib), 16).unwrap_or('0'));
            }
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 40], D::Error> {
        let text = String::deserialize(d)?;
        let digits: alloc::vec::Vec<u32> = text
            .chars()
            .filter(|c| *c != ':')
            .map(|c| c.to_digit(16).ok_or(c))
            .collect::<Result<_, char>>()
            .map_err(|c| D::Error::custom(alloc::format!("invalid hex digit {c:?} in RSS key")))?;
        if digits.len() != 80 {
            return Err(D::Error::custom(alloc::format!(
                "RSS key must be 40 bytes (80 hex digits), got {} digits",
                digits.len()
            )));
        }
        let mut key = [0u8; 40];
        for (i, pair) in digits.chunks(2).enumerate() {
            key[i] = (pair[0] * 16 + pair[1]) as u8;
        }
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        assert_eq!(PipelineConfig::default().validate(), Ok(()));
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutation = fn(&mut PipelineConfig);
        let cases: [(Mutation, &str); 6] = [
            (|c| c.buckets = 1000, "`buckets`"),
            (|c| c.flow_capacity = 0, "`flow_capacity`"),
            (|c| c.feature_packets = 17, "`feature_packets`"),
            (|c| c.timeouts.udp_ms = 0, "`timeouts.udp_ms`"),
            (|c| c.nodes.clear(), "`nodes`"),
            (
                |c| {
                    c.class_policies.push(ClassPolicy {
                        class: Class::Bulk,
                        group: 9,
                    })
                },
                "`class_policies.group`",
            ),
        ];
        for (mutate, key) in cases {
            let mut c = PipelineConfig::default();
            mutate(&mut c);
            let err = c.validate().expect_err(key);
            assert!(alloc::format!("{err}").starts_with(key), "{err} vs {key}");
        }
        let mut dup = PipelineConfig::default();
        dup.nodes.push(dup.nodes[0]);
        assert_eq!(dup.validate(), Err(ConfigError::DuplicateNode(0)));
    }
}
