//! Telemetry records the NIC writes for the host.
//!
//! # Flow feature record, layout version 1
//!
//! One fixed-size, little-endian record of [`FEATURE_RECORD_LEN`] bytes. The NIC emits
//! one when a flow has seen its first N packets (`kind` = early, N set at image load,
//! at most [`MAX_FEATURE_PACKETS`]), one when the flow ends (`kind` = end, with the end
//! reason), and an interim one when a flow's 32-bit totals would overflow (IPFIX-style
//! active export; totals restart from zero after it). The per-packet arrays hold the
//! first `n` packets of the flow and are only present in the first record of a flow
//! (early, or end for flows shorter than N packets); later records have `n` = 0.
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 1 | `version` = 1 |
//! | 1 | 1 | `kind`: 1 early, 2 end, 3 interim |
//! | 2 | 1 | `end_reason`: 0 none, 1 fin, 2 rst, 3 idle, 4 evicted, 5 flushed |
//! | 3 | 1 | `proto`: IP protocol number |
//! | 4 | 1 | `flags`: bit 0 IPv6 |
//! | 5 | 1 | `n`: valid entries in the per-packet arrays |
//! | 6 | 1 | `class`: flow class index, 255 = unclassified |
//! | 7 | 1 | `tcp_flags_client`: OR of TCP flags sent by the client |
//! | 8 | 1 | `tcp_flags_server`: OR of TCP flags sent by the server |
//! | 9 | 1 | `shards_used`: bitmap of the flow's shard-group members used |
//! | 10 | 2 | `node`: node the flow is steered to |
//! | 12 | 2 | `shard`: shard the flow is steered through |
//! | 14 | 2 | `flowlets`: flowlets seen (wrapping) |
//! | 16 | 16 | `client_addr`: the initiator (IPv4 in bytes 0..4) |
//! | 32 | 16 | `server_addr` |
//! | 48 | 2 | `client_port` |
//! | 50 | 2 | `server_port` |
//! | 52 | 4 | `directions`: bit i set = packet i travelled server → client |
//! | 56 | 8 | `first_ts_ns`: NIC time of the first packet this record covers |
//! | 64 | 8 | `last_ts_ns`: NIC time of the last packet this record covers |
//! | 72 | 4 | `packets`: packets this record covers |
//! | 76 | 4 | reserved, 0 |
//! | 80 | 8 | `bytes`: IP bytes this record covers |
//! | 88 | 32 | `sizes[16]`: u16 IP length of packet i |
//! | 120 | 64 | `iat_us[16]`: u32 µs since the previous packet of the flow (0 for the first) |
//!
//! The client is the sender of the first packet the NIC saw; for a flow picked up in
//! the middle that may be the server of the application protocol.

/// Size of one flow feature record.
pub const FEATURE_RECORD_LEN: usize = 184;
/// The layout version this crate reads and writes.
pub const FEATURE_RECORD_VERSION: u8 = 1;
/// Upper bound of N, the packets a record describes one by one.
pub const MAX_FEATURE_PACKETS: usize = 16;

/// Why a record was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// The flow has seen its first N packets.
    Early = 1,
    /// The flow ended.
    End = 2,
    /// The flow's totals were exported before they overflow; the flow goes on.
    Interim = 3,
}

/// Why a flow ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum EndReason {
    None = 0,
    /// Both sides sent FIN and the linger time passed.
    Fin = 1,
    /// A side sent RST and the linger time passed.
    Rst = 2,
    /// Idle longer than its protocol's timeout.
    Idle = 3,
    /// Evicted from a full connection table to make room for a new flow.
    Evicted = 4,
    /// The pipeline was flushed (end of a replay, reset).
    Flushed = 5,
}

/// An address as the NIC keeps it: 16 bytes, an IPv4 address in the first 4.
pub fn ip_addr(bytes: &[u8; 16], ipv6: bool) -> core::net::IpAddr {
    if ipv6 {
        core::net::Ipv6Addr::from(*bytes).into()
    } else {
        core::net::Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into()
    }
}

/// A flow's identity across its records: address family, client and server address
/// and port, protocol. The family is part of it: an IPv4 address fills only the first
/// four bytes, so without it an IPv6 flow could take an IPv4 flow's identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowId {
    pub ipv6: bool,
    pub client: [u8; 16],
    pub server: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub proto: u8,
}

/// Decoded flow feature record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureRecord {
    pub kind: RecordKind,
    pub end_reason: EndReason,
    pub proto: u8,
    pub ipv6: bool,
    pub n: u8,
    pub class: u8,
    pub tcp_flags_client: u8,
    pub tcp_flags_server: u8,
    pub shards_used: u8,
    pub node: u16,
    pub shard: u16,
    pub flowlets: u16,
    pub client_addr: [u8; 16],
    pub server_addr: [u8; 16],
    pub client_port: u16,
    pub server_port: u16,
    pub directions: u32,
    pub first_ts_ns: u64,
    pub last_ts_ns: u64,
    pub packets: u32,
    pub bytes: u64,
    pub sizes: [u16; MAX_FEATURE_PACKETS],
    pub iat_us: [u32; MAX_FEATURE_PACKETS],
}

/// Why bytes could not be read as a feature record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// Fewer bytes than a record.
    Truncated { len: usize },
    /// A layout version this build does not know.
    Version(u8),
    /// A field holds a value the layout does not define.
    BadField { offset: usize, value: u8 },
}

impl core::fmt::Display for RecordError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RecordError::Truncated { len } => write!(
                f,
                "feature record truncated: {len} bytes, need {FEATURE_RECORD_LEN}"
            ),
            RecordError::Version(v) => write!(
                f,
                "feature record version {v} unknown (this build reads {FEATURE_RECORD_VERSION})"
            ),
            RecordError::BadField { offset, value } => {
                write!(
                    f,
                    "feature record: invalid value {value} at offset {offset}"
                )
            }
        }
    }
}

impl FeatureRecord {
    pub fn flow_id(&self) -> FlowId {
        FlowId {
            ipv6: self.ipv6,
            client: self.client_addr,
            server: self.server_addr,
            client_port: self.client_port,
            server_port: self.server_port,
            proto: self.proto,
        }
    }

    pub fn client_ip(&self) -> core::net::IpAddr {
        ip_addr(&self.client_addr, self.ipv6)
    }

    pub fn server_ip(&self) -> core::net::IpAddr {
        ip_addr(&self.server_addr, self.ipv6)
    }

    /// Encode in layout version 1.
    pub fn to_bytes(&self) -> [u8; FEATURE_RECORD_LEN] {
        let mut b = [0u8; FEATURE_RECORD_LEN];
        b[0] = FEATURE_RECORD_VERSION;
        b[1] = self.kind as u8;
        b[2] = self.end_reason as u8;
        b[3] = self.proto;
        b[4] = self.ipv6 as u8;
        b[5] = self.n;
        b[6] = self.class;
        b[7] = self.tcp_flags_client;
        b[8] = self.tcp_flags_server;
        b[9] = self.shards_used;
        b[10..12].copy_from_slice(&self.node.to_le_bytes());
        b[12..14].copy_from_slice(&self.shard.to_le_bytes());
        b[14..16].copy_from_slice(&self.flowlets.to_le_bytes());
        b[16..32].copy_from_slice(&self.client_addr);
        b[32..48].copy_from_slice(&self.server_addr);
        b[48..50].copy_from_slice(&self.client_port.to_le_bytes());
        b[50..52].copy_from_slice(&self.server_port.to_le_bytes());
        b[52..56].copy_from_slice(&self.directions.to_le_bytes());
        b[56..64].copy_from_slice(&self.first_ts_ns.to_le_bytes());
        b[64..72].copy_from_slice(&self.last_ts_ns.to_le_bytes());
        b[72..76].copy_from_slice(&self.packets.to_le_bytes());
        b[80..88].copy_from_slice(&self.bytes.to_le_bytes());
        for (i, s) in self.sizes.iter().enumerate() {
            b[88 + 2 * i..90 + 2 * i].copy_from_slice(&s.to_le_bytes());
        }
        for (i, t) in self.iat_us.iter().enumerate() {
            b[120 + 4 * i..124 + 4 * i].copy_from_slice(&t.to_le_bytes());
        }
        b
    }

    /// Decode, checking length, version and enumerated fields. Never panics.
    pub fn from_bytes(b: &[u8]) -> Result<FeatureRecord, RecordError> {
        let b: &[u8; FEATURE_RECORD_LEN] = b
            .get(..FEATURE_RECORD_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or(RecordError::Truncated { len: b.len() })?;
        if b[0] != FEATURE_RECORD_VERSION {
            return Err(RecordError::Version(b[0]));
        }
        let kind = match b[1] {
            1 => RecordKind::Early,
            2 => RecordKind::End,
            3 => RecordKind::Interim,
            v => {
                return Err(RecordError::BadField {
                    offset: 1,
                    value: v,
                });
            }
        };
        let end_reason = match b[2] {
            0 => EndReason::None,
            1 => EndReason::Fin,
            2 => EndReason::Rst,
            3 => EndReason::Idle,
            4 => EndReason::Evicted,
            5 => EndReason::Flushed,
            v => {
                return Err(RecordError::BadField {
                    offset: 2,
                    value: v,
                });
            }
        };
        if b[5] as usize > MAX_FEATURE_PACKETS {
            return Err(RecordError::BadField {
                offset: 5,
                value: b[5],
            });
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        let mut client_addr = [0u8; 16];
        client_addr.copy_from_slice(&b[16..32]);
        let mut server_addr = [0u8; 16];
        server_addr.copy_from_slice(&b[32..48]);
        Ok(FeatureRecord {
            kind,
            end_reason,
            proto: b[3],
            ipv6: b[4] & 1 != 0,
            n: b[5],
            class: b[6],
            tcp_flags_client: b[7],
            tcp_flags_server: b[8],
            shards_used: b[9],
            node: u16_at(10),
            shard: u16_at(12),
            flowlets: u16_at(14),
            client_addr,
            server_addr,
            client_port: u16_at(48),
            server_port: u16_at(50),
            directions: u32_at(52),
            first_ts_ns: u64_at(56),
            last_ts_ns: u64_at(64),
            packets: u32_at(72),
            bytes: u64_at(80),
            sizes: core::array::from_fn(|i| u16_at(88 + 2 * i)),
            iat_us: core::array::from_fn(|i| u32_at(120 + 4 * i)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> FeatureRecord {
        FeatureRecord {
            kind: RecordKind::Early,
            end_reason: EndReason::None,
            proto: 6,
            ipv6: false,
            n: 3,
            class: 255,
            tcp_flags_client: 0x12,
            tcp_flags_server: 0x10,
            shards_used: 1,
            node: 2,
            shard: 17,
            flowlets: 1,
            client_addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            server_addr: [10, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            client_port: 40000,
            server_port: 443,
            directions: 0b010,
            first_ts_ns: 1_000,
            last_ts_ns: 9_000,
            packets: 3,
            bytes: 180,
            sizes: [60, 60, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            iat_us: [0, 3, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    #[test]
    fn layout_offsets_are_the_documented_ones() {
        let b = sample().to_bytes();
        assert_eq!(b[0], 1);
        assert_eq!(b[3], 6);
        assert_eq!(&b[12..14], &17u16.to_le_bytes());
        assert_eq!(&b[48..50], &40000u16.to_le_bytes());
        assert_eq!(&b[88..90], &60u16.to_le_bytes());
        assert_eq!(&b[124..128], &3u32.to_le_bytes());
        assert_eq!(FeatureRecord::from_bytes(&b), Ok(sample()));
    }

    #[test]
    fn rejects_short_unknown_version_and_bad_enums() {
        let b = sample().to_bytes();
        assert_eq!(
            FeatureRecord::from_bytes(&b[..100]),
            Err(RecordError::Truncated { len: 100 })
        );
        let mut v = b;
        v[0] = 2;
        assert_eq!(FeatureRecord::from_bytes(&v), Err(RecordError::Version(2)));
        let mut k = b;
        k[1] = 9;
        assert_eq!(
            FeatureRecord::from_bytes(&k),
            Err(RecordError::BadField {
                offset: 1,
                value: 9
            })
        );
        let mut n = b;
        n[5] = 17;
        assert!(FeatureRecord::from_bytes(&n).is_err());
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(r) = FeatureRecord::from_bytes(&bytes) {
                // What decodes re-encodes to the same bytes, reserved fields aside.
                let again = r.to_bytes();
                prop_assert_eq!(&again[..4], &bytes[..4]);
                prop_assert_eq!(&again[80..FEATURE_RECORD_LEN], &bytes[80..FEATURE_RECORD_LEN]);
            }
        }
    }
}
