//! The flowshard NIC data plane.
//!
//! This crate is both the firmware of a NIC's embedded cores and the reference model
//! for the RTL, so it is `no_std` + `alloc`, sans-I/O and deterministic: time enters
//! only as packet timestamps, capacities are fixed when a [`Pipeline`] is built, and
//! no input — however malformed — makes it panic.
//!
//! The path of a packet:
//!
//! ```text
//! parse ─► flow tuple ─► Toeplitz RSS hash ─► connection table ─┬─ hit:  pinned node
//!                                                               └─ miss: bucket ─► shard ─► node
//!        ─► flowlet sharding (large flows of sharded classes) ─► counters, feature records
//! ```
//!
//! Modules:
//! - [`parse`]: link layers, VLAN/QinQ, IPv4/IPv6 (options, extension headers), TCP/UDP/ICMP.
//! - [`rss`]: the Toeplitz hash of the Microsoft RSS specification, table driven.
//! - [`conntable`]: the bidirectional connection table (bucketized cuckoo, 64-byte entries).
//! - [`placement`]: weighted consistent (Maglev-style) placement of buckets with minimal disruption.
//! - [`pipeline`]: steering, flowlet sharding, ageing, counters and feature records.
//! - [`profile`]: the profiler's input vector and its tree ensemble as NIC tables.
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![deny(unsafe_code)]

extern crate alloc;

pub mod config;
pub mod conntable;
pub mod parse;
pub mod pipeline;
pub mod placement;
pub mod profile;
pub mod rss;

pub use config::{ClassPolicy, ConfigError, NodeConfig, NodeState, PipelineConfig, Timeouts};
pub use parse::{LinkType, Parsed};
pub use pipeline::{Counters, Decision, Pipeline};

/// IP protocol numbers the data plane treats specially.
pub mod ipproto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// The flow tuple of one packet, as it appears on the wire (source first).
///
/// Addresses are 16 bytes; an IPv4 address occupies bytes `0..4` and the rest are
/// zero. `has_ports` is set only for TCP and UDP packets that carry an L4 header
/// (not IP fragments): exactly the packets whose RSS input includes the ports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ipv6: bool,
    pub has_ports: bool,
}

/// An IPv4 address as tuples and flow keys hold it: in bytes `0..4` of 16, the rest zero.
///
/// Built as one 16-byte value, not written into a zeroed array: the connection-table
/// key reads addresses back as whole words right away, and a load spanning several
/// smaller stores waits for them to retire instead of being forwarded from them.
#[inline(always)]
pub fn ipv4_addr(a: [u8; 4]) -> [u8; 16] {
    u128::from(u32::from_le_bytes(a)).to_le_bytes()
}

impl FlowTuple {
    /// The address bytes that take part in hashing: 4 for IPv4, 16 for IPv6.
    #[inline]
    pub fn addr_len(&self) -> usize {
        if self.ipv6 { 16 } else { 4 }
    }

    /// The same conversation seen from the other direction.
    #[inline]
    pub fn reversed(&self) -> FlowTuple {
        FlowTuple {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }
}

/// What the NIC did with a packet. `Forward` is the only verdict that reaches a node;
/// every other verdict is a counted drop, and its reason is its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Verdict {
    /// Steered to a node.
    Forward = 0,
    /// Well-formed but not IP (ARP, LLDP, 802.3/LLC, MPLS, ...).
    NonIp,
    /// The capture's link type is not one the NIC parses.
    UnsupportedLink,
    /// Shorter than its link header or VLAN tags.
    TruncatedL2,
    /// Shorter than its IPv4/IPv6 fixed header.
    TruncatedL3,
    /// The IP version nibble does not match the link's protocol field.
    BadIpVersion,
    /// IPv4 header length below 5 words or beyond the captured bytes.
    BadIhl,
    /// IP total/payload length smaller than the header or larger than the frame.
    BadIpLen,
    /// An IPv6 extension header chain that is truncated, too long or malformed.
    BadIpv6Ext,
    /// Shorter than its TCP/UDP/ICMP header.
    TruncatedL4,
    /// TCP data offset or UDP length inconsistent with the IP payload.
    BadL4Len,
    /// No node in a state that can take the flow (all down).
    NoNode,
}

impl Verdict {
    /// Number of verdicts, for counter arrays indexed by `verdict as usize`.
    pub const COUNT: usize = 12;

    /// All verdicts in discriminant order.
    pub const ALL: [Verdict; Verdict::COUNT] = [
        Verdict::Forward,
        Verdict::NonIp,
        Verdict::UnsupportedLink,
        Verdict::TruncatedL2,
        Verdict::TruncatedL3,
        Verdict::BadIpVersion,
        Verdict::BadIhl,
        Verdict::BadIpLen,
        Verdict::BadIpv6Ext,
        Verdict::TruncatedL4,
        Verdict::BadL4Len,
        Verdict::NoNode,
    ];

    /// The verdict's name in logs, counters and the decision CSV.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Forward => "forward",
            Verdict::NonIp => "non_ip",
            Verdict::UnsupportedLink => "unsupported_link",
            Verdict::TruncatedL2 => "truncated_l2",
            Verdict::TruncatedL3 => "truncated_l3",
            Verdict::BadIpVersion => "bad_ip_version",
            Verdict::BadIhl => "bad_ihl",
            Verdict::BadIpLen => "bad_ip_len",
            Verdict::BadIpv6Ext => "bad_ipv6_ext",
            Verdict::TruncatedL4 => "truncated_l4",
            Verdict::BadL4Len => "bad_l4_len",
            Verdict::NoNode => "no_node",
        }
    }

    /// True for verdicts that mean the packet itself is malformed (not a policy drop).
    pub fn is_malformed(self) -> bool {
        !matches!(
            self,
            Verdict::Forward | Verdict::NonIp | Verdict::UnsupportedLink | Verdict::NoNode
        )
    }
}

/// A flow's profile, as the profiler (and later the NIC's own classifier) assigns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
#[repr(u8)]
pub enum Class {
    Video = 0,
    Realtime,
    Bulk,
    Web,
    Messaging,
    Infra,
    Other,
}

impl Class {
    pub const COUNT: usize = 7;
    pub const ALL: [Class; Class::COUNT] = [
        Class::Video,
        Class::Realtime,
        Class::Bulk,
        Class::Web,
        Class::Messaging,
        Class::Infra,
        Class::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Video => "video",
            Class::Realtime => "realtime",
            Class::Bulk => "bulk",
            Class::Web => "web",
            Class::Messaging => "messaging",
            Class::Infra => "infra",
            Class::Other => "other",
        }
    }

    pub fn from_index(i: u8) -> Option<Class> {
        Class::ALL.get(i as usize).copied()
    }

    pub fn parse(s: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.as_str() == s)
    }
}
