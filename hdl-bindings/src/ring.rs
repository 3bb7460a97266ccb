//! DMA descriptors of the command, completion and telemetry rings (layout version 1).
//!
//! # Command ring
//! The host writes [`CmdDesc`]s (16 bytes) into a ring of 2^k entries in its memory and
//! moves the doorbell (`cmd.TAIL`). A batch is the run of descriptors up to and
//! including one with [`CMD_COMMIT`]; the device checks the whole batch first and
//! applies all of it between two packet bursts (one epoch), or none of it. It writes one
//! [`Completion`] (8 bytes) per descriptor at the same ring index.
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 2 | `opcode` ([`Opcode`]) |
//! | 2 | 2 | `flags`: bit 0 [`CMD_COMMIT`] |
//! | 4 | 4 | `arg0` |
//! | 8 | 4 | `arg1` |
//! | 12 | 4 | `arg2` |
//!
//! Completion: `index` u32 (free-running ring index of the descriptor), `status` u16
//! ([`Status`]), `opcode` u16 (echoed).
//!
//! # Lists in host memory
//! Per-flow commands ([`Opcode::HandOffFlows`], [`Opcode::PinFlows`],
//! [`Opcode::SetFlowClasses`]) carry a list rather than one update: `arg0` is the entry
//! count (1 to [`MAX_LIST_ENTRIES`]) and `arg1 | arg2 << 32` the IOVA of
//! [`FlowListEntry`]s (48 bytes each), as [`Opcode::ReadTable`] names its buffer. One
//! descriptor can carry a million updates, and all of them apply in the batch's epoch.
//! The device reads and checks every entry when it checks the batch: a list it cannot
//! read, a malformed tuple, an undefined node or an unknown class fails the batch with a
//! status naming the problem, and nothing of it applies. A flow that ended before the
//! batch applied is not an error — the host cannot know — but each entry's `result`
//! byte, written back by the device, says what happened to it ([`FlowResult`]).
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 16 | `src` address (IPv4 in bytes 0..4, the rest 0) |
//! | 16 | 16 | `dst` address |
//! | 32 | 2 | `sport` |
//! | 34 | 2 | `dport` |
//! | 36 | 1 | `proto` |
//! | 37 | 1 | `flags`: bit 0 [`FLOW_IPV6`]; other bits 0 |
//! | 38 | 2 | `value`: node ([`Opcode::HandOffFlows`], [`Opcode::PinFlows`]; [`NO_FLOW_NODE`] cancels or unpins) or class index ([`Opcode::SetFlowClasses`]) |
//! | 40 | 1 | `result`: 0 from the host; the device writes a [`FlowResult`] |
//! | 41 | 7 | reserved, 0 |
//!
//! Either direction's tuple names a flow.
//!
//! # Telemetry ring
//! Entries of [`TELEMETRY_ENTRY_LEN`] bytes: an 8-byte [`TelemetryHeader`], then the
//! payload — a [`crate::telemetry::FeatureRecord`] (early, interim or flow-end) or a
//! [`CounterSnapshot`].

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::telemetry::FEATURE_RECORD_LEN;

/// Flag of the last descriptor of a batch.
pub const CMD_COMMIT: u16 = 1;
/// Bytes of a command descriptor.
pub const CMD_DESC_LEN: usize = 16;
/// Bytes of a completion.
pub const COMPLETION_LEN: usize = 8;
/// Largest command ring: 2^16 entries.
pub const MAX_CMD_RING_LOG2: u32 = 16;
/// Bytes of a telemetry ring entry.
pub const TELEMETRY_ENTRY_LEN: usize = 192;
/// Largest telemetry ring: 2^20 entries.
pub const MAX_TELEMETRY_RING_LOG2: u32 = 20;

/// What a command descriptor asks for. Arguments not listed must be 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Opcode {
    /// Nothing; with [`CMD_COMMIT`] it closes an epoch with no change.
    Nop = 0,
    /// Bucket `arg0` → shard `arg1`.
    SetBucket = 1,
    /// Shard `arg0` → node `arg1`.
    SetShardNode = 2,
    /// Node `arg0` gets state `arg1` (0 active, 1 draining, 2 down).
    SetNodeState = 3,
    /// Class `arg0` (index) spreads its flows over `arg1` shards (1..8).
    SetClassGroup = 4,
    /// Copy table `arg0` ([`Table`]) into host memory at IOVA `arg1 | arg2 << 32`, as
    /// it stands before the batch applies: a batch of reads is one consistent snapshot,
    /// which is how a restarted host learns the steering it must not disturb.
    ReadTable = 5,
    /// A list of flows (see the module docs), each to move to node `value` at its next
    /// flowlet boundary, after the host has handed its state to that node;
    /// [`NO_FLOW_NODE`] cancels a pending handoff. The node must be one the image
    /// defines; it must be active when the boundary comes, or the move is dropped.
    HandOffFlows = 6,
    /// A list of flows, each to move to node `value` now and stay there (flowlet
    /// sharding no longer moves it); [`NO_FLOW_NODE`] unpins. A node that is not active
    /// when the batch applies leaves the entry's flow where it is
    /// ([`FlowResult::NodeNotActive`]).
    PinFlows = 7,
    /// A list of flows, each getting class index `value` from the host's profiler (the
    /// class policy applies from the flow's next flowlet).
    SetFlowClasses = 8,
    /// Load the NIC's classifier tables: `arg0` bytes of serialized tables
    /// (`nic_firmware::profile::ClassifierTables::to_bytes`, at most
    /// [`MAX_CLASSIFIER_LEN`]) at IOVA `arg1 | arg2 << 32`; `arg0` = 0 removes them.
    /// Their N must be the image's `feature_packets`.
    LoadClassifier = 9,
}

/// Bytes of a [`FlowListEntry`].
pub const FLOW_LIST_ENTRY_LEN: usize = 48;
/// Most entries one list descriptor carries.
pub const MAX_LIST_ENTRIES: u32 = 1 << 20;
/// Most bytes of classifier tables [`Opcode::LoadClassifier`] takes.
pub const MAX_CLASSIFIER_LEN: u32 = 16 << 20;
/// [`FlowListEntry::flags`]: the addresses are IPv6.
pub const FLOW_IPV6: u8 = 1;
/// [`FlowListEntry::value`] of a handoff or pin that cancels (unpins) instead.
pub const NO_FLOW_NODE: u16 = u16::MAX;

/// One flow of a list (see the module docs for the layout).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct FlowListEntry {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: U16,
    pub dport: U16,
    pub proto: u8,
    pub flags: u8,
    pub value: U16,
    pub result: u8,
    pub reserved: [u8; 7],
}

/// What the device did with one [`FlowListEntry`], written to its `result` byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FlowResult {
    /// Not written: the batch failed, or the device never got to it.
    NotApplied = 0,
    Applied = 1,
    /// The flow is not tracked (it ended, or never was); for a cancel or unpin, it
    /// also means there was nothing to cancel.
    NoSuchFlow = 2,
    /// A pin named a node that is not active when the batch applied.
    NodeNotActive = 3,
}

impl FlowResult {
    pub fn from_u8(v: u8) -> Option<FlowResult> {
        Some(match v {
            0 => FlowResult::NotApplied,
            1 => FlowResult::Applied,
            2 => FlowResult::NoSuchFlow,
            3 => FlowResult::NodeNotActive,
            _ => return None,
        })
    }
}

/// Tables [`Opcode::ReadTable`] copies out, and their layout in host memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Table {
    /// One little-endian u16 shard per bucket (`ident.BUCKETS` entries).
    BucketShard = 0,
    /// One little-endian u16 node per shard (`ident.SHARDS` entries).
    ShardNode = 1,
    /// [`NODE_ENTRY_LEN`] bytes per node id below `ident.NODES`: state u32 (0 active,
    /// 1 draining, 2 down, [`NO_NODE`] for an id the image does not define), weight u32.
    Nodes = 2,
}

/// Bytes per node of [`Table::Nodes`].
pub const NODE_ENTRY_LEN: usize = 8;
/// State word of a node id the image does not define.
pub const NO_NODE: u32 = u32::MAX;

impl Table {
    pub fn from_u32(v: u32) -> Option<Table> {
        Some(match v {
            0 => Table::BucketShard,
            1 => Table::ShardNode,
            2 => Table::Nodes,
            _ => return None,
        })
    }
}

impl Opcode {
    pub fn from_u16(v: u16) -> Option<Opcode> {
        Some(match v {
            0 => Opcode::Nop,
            1 => Opcode::SetBucket,
            2 => Opcode::SetShardNode,
            3 => Opcode::SetNodeState,
            4 => Opcode::SetClassGroup,
            5 => Opcode::ReadTable,
            6 => Opcode::HandOffFlows,
            7 => Opcode::PinFlows,
            8 => Opcode::SetFlowClasses,
            9 => Opcode::LoadClassifier,
            _ => return None,
        })
    }
}

/// Outcome of one descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    Ok = 0,
    /// The opcode is not one of [`Opcode`].
    BadOpcode = 1,
    /// An argument is out of range (no such bucket, shard, node, class or state).
    BadArgument = 2,
    /// Another descriptor of the batch failed, so none of the batch was applied.
    Aborted = 3,
    /// No image runs on the device, so there are no tables to update.
    NotRunning = 4,
    /// The list or tables named by the descriptor are not in memory mapped for the
    /// device.
    DmaFault = 5,
    /// A list count of 0 or above [`MAX_LIST_ENTRIES`], or a classifier length above
    /// [`MAX_CLASSIFIER_LEN`].
    BadCount = 6,
    /// A list entry's tuple is malformed: unknown flag bits, IPv4 addresses with bytes
    /// past the fourth set, or a result or reserved byte not 0.
    BadFlow = 7,
    /// A list entry names a node the image does not define.
    BadNode = 8,
    /// A list entry names no class.
    BadClass = 9,
    /// The classifier tables are corrupt, or their N is not the image's
    /// `feature_packets`.
    BadClassifier = 10,
}

impl Status {
    pub fn from_u16(v: u16) -> Option<Status> {
        Some(match v {
            0 => Status::Ok,
            1 => Status::BadOpcode,
            2 => Status::BadArgument,
            3 => Status::Aborted,
            4 => Status::NotRunning,
            5 => Status::DmaFault,
            6 => Status::BadCount,
            7 => Status::BadFlow,
            8 => Status::BadNode,
            9 => Status::BadClass,
            10 => Status::BadClassifier,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::BadOpcode => "unknown opcode",
            Status::BadArgument => "argument out of range",
            Status::Aborted => "aborted: another descriptor of the batch failed",
            Status::NotRunning => "no image running",
            Status::DmaFault => "list or tables outside the memory mapped for the device",
            Status::BadCount => "list count or tables length out of range",
            Status::BadFlow => "a list entry's flow tuple is malformed",
            Status::BadNode => "a list entry names a node the image does not define",
            Status::BadClass => "a list entry names no class",
            Status::BadClassifier => {
                "classifier tables corrupt, or their N differs from the image's feature_packets"
            }
        }
    }
}

/// A command descriptor.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct CmdDesc {
    pub opcode: U16,
    pub flags: U16,
    pub arg0: U32,
    pub arg1: U32,
    pub arg2: U32,
}

impl CmdDesc {
    /// [`Opcode::ReadTable`] of `table` into host memory at `iova`.
    pub fn read_table(table: Table, iova: u64) -> CmdDesc {
        CmdDesc::list(Opcode::ReadTable, table as u32, iova)
    }

    /// A list or tables descriptor: `op` over `count` entries (or bytes, for
    /// [`Opcode::LoadClassifier`]) at `iova`.
    pub fn list(op: Opcode, count: u32, iova: u64) -> CmdDesc {
        let mut d = CmdDesc::new(op, count, iova as u32);
        d.arg2 = U32::new((iova >> 32) as u32);
        d
    }

    /// The IOVA in `arg1 | arg2 << 32`.
    pub fn iova(&self) -> u64 {
        u64::from(self.arg1.get()) | (u64::from(self.arg2.get()) << 32)
    }

    pub fn new(op: Opcode, arg0: u32, arg1: u32) -> CmdDesc {
        CmdDesc {
            opcode: U16::new(op as u16),
            flags: U16::new(0),
            arg0: U32::new(arg0),
            arg1: U32::new(arg1),
            arg2: U32::new(0),
        }
    }

    /// The same descriptor, closing its batch.
    pub fn commit(mut self) -> CmdDesc {
        self.flags = U16::new(self.flags.get() | CMD_COMMIT);
        self
    }

    pub fn is_commit(&self) -> bool {
        self.flags.get() & CMD_COMMIT != 0
    }
}

/// A completion entry.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct Completion {
    pub index: U32,
    pub status: U16,
    pub opcode: U16,
}

/// What a telemetry entry carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EntryKind {
    /// A flow feature record (early, interim or flow-end).
    FeatureRecord = 1,
    /// A [`CounterSnapshot`].
    Counters = 2,
}

/// Layout version of telemetry entries.
pub const TELEMETRY_VERSION: u8 = 1;

/// Header of a telemetry entry.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct TelemetryHeader {
    pub kind: u8,
    pub version: u8,
    /// Payload bytes that follow.
    pub len: U16,
    /// Free-running entry number, so the host sees gaps.
    pub seq: U32,
}

/// What a counter snapshot counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Scope {
    Device = 0,
    Node = 1,
    Shard = 2,
    Class = 3,
}

impl Scope {
    pub fn from_u8(v: u8) -> Option<Scope> {
        Some(match v {
            0 => Scope::Device,
            1 => Scope::Node,
            2 => Scope::Shard,
            3 => Scope::Class,
            _ => return None,
        })
    }
}

/// Counters of one node, shard or class (or the whole device) at a NIC time.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct CounterSnapshot {
    pub scope: u8,
    pub reserved: u8,
    pub id: U16,
    pub reserved2: U32,
    pub nic_time_ns: U64,
    pub packets: U64,
    pub bytes: U64,
    /// Flows placed (node), created (shard, class) or created (device).
    pub flows: U64,
    /// Flows pinned to the node now (node scope); tracked flows (device scope).
    pub active_flows: U64,
}

/// Bytes of a counter snapshot.
pub const COUNTER_SNAPSHOT_LEN: usize = core::mem::size_of::<CounterSnapshot>();

/// A whole telemetry entry.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct TelemetryEntry {
    pub header: TelemetryHeader,
    pub payload: [u8; TELEMETRY_ENTRY_LEN - 8],
}

const _: () = assert!(core::mem::size_of::<CmdDesc>() == CMD_DESC_LEN);
const _: () = assert!(core::mem::size_of::<Completion>() == COMPLETION_LEN);
const _: () = assert!(core::mem::size_of::<FlowListEntry>() == FLOW_LIST_ENTRY_LEN);
const _: () = assert!(core::mem::size_of::<TelemetryEntry>() == TELEMETRY_ENTRY_LEN);
const _: () = assert!(FEATURE_RECORD_LEN <= TELEMETRY_ENTRY_LEN - 8);
const _: () = assert!(COUNTER_SNAPSHOT_LEN == 48);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_little_endian_at_their_documented_offsets() {
        let d = CmdDesc::new(Opcode::SetShardNode, 0x0102_0304, 7).commit();
        let b = d.as_bytes();
        assert_eq!(b, &[2, 0, 1, 0, 4, 3, 2, 1, 7, 0, 0, 0, 0, 0, 0, 0]);
        let back = CmdDesc::read_from_bytes(b).unwrap();
        assert!(back.is_commit());
        assert_eq!(
            Opcode::from_u16(back.opcode.get()),
            Some(Opcode::SetShardNode)
        );
        assert!(CmdDesc::ref_from_bytes(&b[..15]).is_err());
    }

    #[test]
    fn flow_list_entries_sit_at_their_documented_offsets() {
        let e = FlowListEntry {
            src: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport: U16::new(0x0102),
            dport: U16::new(80),
            proto: 6,
            flags: FLOW_IPV6,
            value: U16::new(0x0304),
            result: FlowResult::Applied as u8,
            ..FlowListEntry::default()
        };
        let b = e.as_bytes();
        assert_eq!(b.len(), 48);
        assert_eq!(&b[0..4], &[10, 0, 0, 1]);
        assert_eq!(&b[32..41], &[2, 1, 80, 0, 6, 1, 4, 3, 1]);
    }

    #[test]
    fn codes_round_trip_and_unknown_ones_are_refused() {
        for v in 0..=4 {
            assert_eq!(Opcode::from_u16(v).map(|o| o as u16), Some(v));
            assert_eq!(Status::from_u16(v).map(|s| s as u16), Some(v));
        }
        for v in 5..=9 {
            assert_eq!(Opcode::from_u16(v).map(|o| o as u16), Some(v));
        }
        assert_eq!(Opcode::from_u16(10), None);
        for v in 0..=10 {
            let s = Status::from_u16(v).unwrap();
            assert_eq!(s as u16, v);
            assert!(!s.as_str().is_empty());
        }
        assert_eq!(Status::from_u16(11), None);
        for v in 0..=3 {
            assert_eq!(FlowResult::from_u8(v).map(|r| r as u8), Some(v));
        }
        assert_eq!(FlowResult::from_u8(4), None);
        let l = CmdDesc::list(Opcode::PinFlows, 3, 0x5_0000_0040);
        assert_eq!((l.arg0.get(), l.iova()), (3, 0x5_0000_0040));
        for v in 0..=2 {
            assert_eq!(Table::from_u32(v).map(|t| t as u32), Some(v));
        }
        assert_eq!(Table::from_u32(3), None);
        let d = CmdDesc::read_table(Table::Nodes, 0x4_0000_1000);
        assert_eq!((d.arg0.get(), d.arg1.get(), d.arg2.get()), (2, 0x1000, 4));
        assert_eq!(Status::from_u16(99), None);
        assert_eq!(Scope::from_u8(4), None);
    }
}
