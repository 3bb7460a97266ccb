//! The firmware image format, version 1.1: what `flowshard image build` writes and the
//! NIC's flash verifies before it will boot it.
//!
//! ```text
//! header (64) | payload (payload_len) | signature block (80, optional)
//! ```
//!
//! Header, little-endian:
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 8 | magic `FSNICIMG` |
//! | 8 | 2 | format major = 1 (a device refuses other majors) |
//! | 10 | 2 | format minor (newer minors only add fields in reserved space) |
//! | 12 | 2 | header length = 64 |
//! | 14 | 2 | reserved, 0 |
//! | 16 | 4 | payload length |
//! | 20 | 4 | CRC32C of the payload |
//! | 24 | 4 | image version (the user's, shown by status) |
//! | 28 | 32 | reserved, 0 |
//! | 60 | 4 | CRC32C of header bytes 0..60 |
//!
//! The payload is one [`ConfigSection`] (104 bytes), then `node_count` [`NodeEntry`]s,
//! `policy_count` [`PolicyEntry`]s, `rule_count` [`RuleEntry`]s and `classifier_len`
//! bytes of classifier tables (`nic_firmware::profile::ClassifierTables::to_bytes`;
//! none when 0); its length must be exactly that. Version 1.1 added the classifier
//! section in what 1.0 reserved, so a 1.0 image reads the same; a 1.0 device refuses an
//! image that carries tables (its payload is longer than it expects) rather than run
//! without them. The signature block is magic `FSSIGED1`, the first 8 bytes of the
//! signer's ed25519 public key (to name it in errors), and the 64-byte ed25519
//! signature of header and payload.
//!
//! [`ImageView::parse`] checks the structure; CRCs, the signature and the meaning of
//! the configuration are checked by the device (hw-sim) with the same error type, so
//! the host and the device name a problem the same way.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const MAGIC: [u8; 8] = *b"FSNICIMG";
pub const SIGNATURE_MAGIC: [u8; 8] = *b"FSSIGED1";
pub const FORMAT_MAJOR: u16 = 1;
pub const FORMAT_MINOR: u16 = 1;
pub const HEADER_LEN: usize = 64;
pub const SIGNATURE_BLOCK_LEN: usize = 80;
/// Largest image a flash slot holds.
pub const MAX_IMAGE_LEN: usize = 1 << 20;

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Header {
    pub magic: [u8; 8],
    pub format_major: U16,
    pub format_minor: U16,
    pub header_len: U16,
    pub reserved0: U16,
    pub payload_len: U32,
    pub payload_crc: U32,
    pub image_version: U32,
    pub reserved: [u8; 32],
    pub header_crc: U32,
}

/// The data-plane configuration the image fixes (see `nic_firmware::PipelineConfig`).
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ConfigSection {
    pub flow_capacity: U32,
    pub buckets: U32,
    pub shards: U16,
    pub feature_packets: u8,
    pub symmetric_rss: u8,
    pub flowlet_gap_us: U32,
    pub feature_slots: U32,
    pub record_queue: U32,
    pub table_seed: U64,
    pub rss_key: [u8; 40],
    pub tcp_ms: U32,
    pub tcp_close_ms: U32,
    pub udp_ms: U32,
    pub icmp_ms: U32,
    pub other_ms: U32,
    pub node_count: U16,
    pub policy_count: U16,
    pub rule_count: U16,
    /// Bytes of classifier tables at the end of the payload (format 1.1).
    pub classifier_len: U32,
    pub reserved: [u8; 2],
}

/// A node: id, state (0 active, 1 draining, 2 down), weight.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct NodeEntry {
    pub id: U16,
    pub state: u8,
    pub reserved: u8,
    pub weight: U32,
}

/// A class policy: class index, shard-group size.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PolicyEntry {
    pub class: u8,
    pub group: u8,
    pub reserved: U16,
}

/// A classifier rule: IP protocol, class index, inclusive port range.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RuleEntry {
    pub proto: u8,
    pub class: u8,
    pub reserved: U16,
    pub port_lo: U16,
    pub port_hi: U16,
}

#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SignatureBlock {
    pub magic: [u8; 8],
    pub key_id: [u8; 8],
    pub signature: [u8; 64],
}

const _: () = assert!(core::mem::size_of::<Header>() == HEADER_LEN);
const _: () = assert!(core::mem::size_of::<ConfigSection>() == CONFIG_SECTION_LEN);
const _: () = assert!(core::mem::size_of::<NodeEntry>() == 8);
const _: () = assert!(core::mem::size_of::<PolicyEntry>() == 4);
const _: () = assert!(core::mem::size_of::<RuleEntry>() == 8);
const _: () = assert!(core::mem::size_of::<SignatureBlock>() == SIGNATURE_BLOCK_LEN);

pub const CONFIG_SECTION_LEN: usize = 104;

/// Configuration keys, numbered for the flash error register (`flash.DETAIL`).
pub const CONFIG_KEYS: [&str; 18] = [
    "config",
    "flow_capacity",
    "buckets",
    "shards",
    "feature_packets",
    "feature_slots",
    "record_queue",
    "flowlet_gap_us",
    "timeouts.tcp_ms",
    "timeouts.tcp_close_ms",
    "timeouts.udp_ms",
    "timeouts.icmp_ms",
    "timeouts.other_ms",
    "nodes",
    "class_policies",
    "class_policies.group",
    "port_rules",
    "classifier.packets",
];

/// Number of a configuration key in [`CONFIG_KEYS`]; 0 ("config") when not listed.
pub fn config_key_id(key: &str) -> u32 {
    let key = key.strip_suffix(".ports").unwrap_or(key);
    CONFIG_KEYS.iter().position(|k| *k == key).unwrap_or(0) as u32
}

/// Why an image was refused. Each kind has a code and a detail word, the values of the
/// flash block's ERROR field and DETAIL register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageError {
    /// Shorter than its header and payload say (`len` bytes present).
    Truncated {
        len: u32,
    },
    BadMagic,
    /// A format major version the device does not know.
    UnsupportedVersion {
        major: u16,
    },
    BadHeaderCrc {
        computed: u32,
    },
    BadPayloadCrc {
        computed: u32,
    },
    /// Sizes or counts inside the image disagree (byte offset of the first bad field).
    BadLayout {
        offset: u32,
    },
    /// The device requires a signature and the image has none.
    MissingSignature,
    /// Signed, but not by a key the device trusts (first 4 bytes of the signer's key).
    UntrustedKey {
        key_id: u32,
    },
    /// Signed by the trusted key, but the signature does not match the image.
    BadSignature,
    /// A configuration value outside what the NIC supports (key number, [`CONFIG_KEYS`]).
    OutOfRange {
        key: u32,
    },
    /// Larger than a flash slot.
    TooLarge {
        len: u32,
    },
    /// Flash commands out of order, or a chunk outside the image (offset).
    Sequence {
        offset: u32,
    },
    /// A chunk's host memory is not DMA-mapped (low word of its address).
    DmaFault {
        addr: u32,
    },
    /// The classifier section is not valid tables (byte offset in the image).
    BadClassifier {
        offset: u32,
    },
    /// The device could not store the image in its flash (the OS error number, for
    /// the emulator's flash files).
    Storage {
        errno: u32,
    },
}

impl ImageError {
    /// (ERROR code, DETAIL) as the flash block reports them.
    pub fn to_code(self) -> (u8, u32) {
        match self {
            ImageError::Truncated { len } => (1, len),
            ImageError::BadMagic => (2, 0),
            ImageError::UnsupportedVersion { major } => (3, u32::from(major)),
            ImageError::BadHeaderCrc { computed } => (4, computed),
            ImageError::BadPayloadCrc { computed } => (5, computed),
            ImageError::BadLayout { offset } => (6, offset),
            ImageError::MissingSignature => (7, 0),
            ImageError::UntrustedKey { key_id } => (8, key_id),
            ImageError::BadSignature => (9, 0),
            ImageError::OutOfRange { key } => (10, key),
            ImageError::TooLarge { len } => (11, len),
            ImageError::Sequence { offset } => (12, offset),
            ImageError::DmaFault { addr } => (13, addr),
            ImageError::BadClassifier { offset } => (14, offset),
            ImageError::Storage { errno } => (15, errno),
        }
    }

    /// The error a flash block reports; `None` for code 0 (no error) or an unknown code.
    pub fn from_code(code: u8, detail: u32) -> Option<ImageError> {
        Some(match code {
            1 => ImageError::Truncated { len: detail },
            2 => ImageError::BadMagic,
            3 => ImageError::UnsupportedVersion {
                major: detail as u16,
            },
            4 => ImageError::BadHeaderCrc { computed: detail },
            5 => ImageError::BadPayloadCrc { computed: detail },
            6 => ImageError::BadLayout { offset: detail },
            7 => ImageError::MissingSignature,
            8 => ImageError::UntrustedKey { key_id: detail },
            9 => ImageError::BadSignature,
            10 => ImageError::OutOfRange { key: detail },
            11 => ImageError::TooLarge { len: detail },
            12 => ImageError::Sequence { offset: detail },
            13 => ImageError::DmaFault { addr: detail },
            14 => ImageError::BadClassifier { offset: detail },
            15 => ImageError::Storage { errno: detail },
            _ => return None,
        })
    }
}

impl core::fmt::Display for ImageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            ImageError::Truncated { len } => {
                write!(
                    f,
                    "truncated image: {len} bytes, shorter than its header says"
                )
            }
            ImageError::BadMagic => write!(f, "not a flowshard NIC image (wrong magic)"),
            ImageError::UnsupportedVersion { major } => write!(
                f,
                "unsupported image format version {major} (this NIC reads version {FORMAT_MAJOR})"
            ),
            ImageError::BadHeaderCrc { computed } => {
                write!(
                    f,
                    "bad CRC32C of the image header (computed {computed:#010x})"
                )
            }
            ImageError::BadPayloadCrc { computed } => {
                write!(
                    f,
                    "bad CRC32C of the image payload (computed {computed:#010x})"
                )
            }
            ImageError::BadLayout { offset } => {
                write!(f, "malformed image: inconsistent sizes at byte {offset}")
            }
            ImageError::MissingSignature => {
                write!(f, "image is not signed and the NIC requires a signature")
            }
            ImageError::UntrustedKey { key_id } => write!(
                f,
                "image is signed by key {key_id:08x}…, which the NIC does not trust"
            ),
            ImageError::BadSignature => write!(f, "bad image signature"),
            ImageError::OutOfRange { key } => {
                let name = CONFIG_KEYS.get(key as usize).copied().unwrap_or("config");
                write!(f, "image configuration out of range: `{name}`")
            }
            ImageError::TooLarge { len } => write!(
                f,
                "image of {len} bytes is larger than a flash slot ({MAX_IMAGE_LEN} bytes)"
            ),
            ImageError::Sequence { offset } => {
                write!(f, "flash sequence error (chunk at byte {offset})")
            }
            ImageError::DmaFault { addr } => {
                write!(
                    f,
                    "flash chunk at host address {addr:#x}… is not DMA-mapped"
                )
            }
            ImageError::BadClassifier { offset } => write!(
                f,
                "corrupt classifier tables in the image (at byte {offset})"
            ),
            ImageError::Storage { errno } => {
                write!(f, "the NIC could not write its flash (os error {errno})")
            }
        }
    }
}

/// A structurally valid image: checked views of its parts.
#[derive(Clone, Copy, Debug)]
pub struct ImageView<'a> {
    pub header: &'a Header,
    pub config: &'a ConfigSection,
    pub nodes: &'a [NodeEntry],
    pub policies: &'a [PolicyEntry],
    pub rules: &'a [RuleEntry],
    /// Serialized classifier tables (empty: none).
    pub classifier: &'a [u8],
    /// Header and payload: what the CRCs and the signature cover.
    pub signed: &'a [u8],
    pub payload: &'a [u8],
    pub signature: Option<&'a SignatureBlock>,
}

impl<'a> ImageView<'a> {
    /// Check magic, version, lengths and counts. Never panics on any input.
    pub fn parse(bytes: &'a [u8]) -> Result<ImageView<'a>, ImageError> {
        let len = bytes.len() as u32;
        if bytes.len() > MAX_IMAGE_LEN {
            return Err(ImageError::TooLarge { len });
        }
        let (header, _) = Header::ref_from_prefix(bytes).map_err(|_| {
            if bytes.len() >= 8 && bytes[..8] != MAGIC {
                ImageError::BadMagic
            } else {
                ImageError::Truncated { len }
            }
        })?;
        if header.magic != MAGIC {
            return Err(ImageError::BadMagic);
        }
        if header.format_major.get() != FORMAT_MAJOR {
            return Err(ImageError::UnsupportedVersion {
                major: header.format_major.get(),
            });
        }
        if usize::from(header.header_len.get()) != HEADER_LEN {
            return Err(ImageError::BadLayout { offset: 12 });
        }
        let payload_len = header.payload_len.get() as usize;
        let end = HEADER_LEN
            .checked_add(payload_len)
            .filter(|e| *e <= bytes.len())
            .ok_or(ImageError::Truncated { len })?;
        let payload = &bytes[HEADER_LEN..end];
        let signature = match bytes.len() - end {
            0 => None,
            SIGNATURE_BLOCK_LEN => {
                let block = SignatureBlock::ref_from_bytes(&bytes[end..])
                    .map_err(|_| ImageError::BadLayout { offset: end as u32 })?;
                if block.magic != SIGNATURE_MAGIC {
                    return Err(ImageError::BadLayout { offset: end as u32 });
                }
                Some(block)
            }
            n if n < SIGNATURE_BLOCK_LEN => return Err(ImageError::Truncated { len }),
            _ => return Err(ImageError::BadLayout { offset: end as u32 }),
        };
        let bad = |at: usize| ImageError::BadLayout {
            offset: (HEADER_LEN + at) as u32,
        };
        let (config, rest) = ConfigSection::ref_from_prefix(payload).map_err(|_| bad(0))?;
        let (nodes, rest) =
            <[NodeEntry]>::ref_from_prefix_with_elems(rest, config.node_count.get().into())
                .map_err(|_| bad(88))?;
        let (policies, rest) =
            <[PolicyEntry]>::ref_from_prefix_with_elems(rest, config.policy_count.get().into())
                .map_err(|_| bad(90))?;
        let (rules, rest) =
            <[RuleEntry]>::ref_from_prefix_with_elems(rest, config.rule_count.get().into())
                .map_err(|_| bad(92))?;
        let classifier = rest
            .get(..config.classifier_len.get() as usize)
            .ok_or(bad(98))?;
        let rest = &rest[classifier.len()..];
        if !rest.is_empty() {
            return Err(bad(payload_len - rest.len()));
        }
        Ok(ImageView {
            header,
            config,
            nodes,
            policies,
            rules,
            classifier,
            signed: &bytes[..end],
            payload,
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        let all = [
            ImageError::Truncated { len: 5 },
            ImageError::BadMagic,
            ImageError::UnsupportedVersion { major: 2 },
            ImageError::BadHeaderCrc { computed: 1 },
            ImageError::BadPayloadCrc { computed: 2 },
            ImageError::BadLayout { offset: 70 },
            ImageError::MissingSignature,
            ImageError::UntrustedKey { key_id: 0xabcd },
            ImageError::BadSignature,
            ImageError::OutOfRange { key: 2 },
            ImageError::TooLarge { len: 9 },
            ImageError::Sequence { offset: 4 },
            ImageError::DmaFault { addr: 8 },
            ImageError::BadClassifier { offset: 300 },
            ImageError::Storage { errno: 28 },
        ];
        for e in all {
            let (c, d) = e.to_code();
            assert_eq!(ImageError::from_code(c, d), Some(e));
        }
        assert_eq!(ImageError::from_code(0, 0), None);
        assert_eq!(config_key_id("buckets"), 2);
        assert_eq!(config_key_id("port_rules.ports"), 16);
        assert_eq!(config_key_id("whatever"), 0);
        assert_eq!(config_key_id("classifier.packets"), 17);
    }

    #[test]
    fn short_and_foreign_bytes_are_refused_without_panic() {
        assert_eq!(
            ImageView::parse(b"FSNIC").unwrap_err(),
            ImageError::Truncated { len: 5 }
        );
        assert_eq!(
            ImageView::parse(b"\x7fELF\x02\x01\x01\x00").unwrap_err(),
            ImageError::BadMagic
        );
        for n in 0..200 {
            let junk: [u8; 200] = core::array::from_fn(|i| (i * 31 + n) as u8);
            assert!(ImageView::parse(&junk[..n]).is_err());
        }
    }
}
