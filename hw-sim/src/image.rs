//! Firmware images: build one from a data-plane configuration, sign it, and verify it
//! the way the NIC's flash does (layout in `hdl_bindings::image`).
//!
//! Images are signed with ed25519. The development key below is public on purpose: it
//! lets `flowshard image build` (which signs with it unless told otherwise) flash onto
//! `flowshard nic-sim` (which trusts it unless given `--trusted-key`). Production
//! devices trust the user's own key and refuse the development key's images.

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use hdl_bindings::image::{
    CONFIG_SECTION_LEN, ConfigSection, FORMAT_MAJOR, FORMAT_MINOR, HEADER_LEN, Header, ImageError,
    ImageView, MAGIC, NodeEntry, PolicyEntry, RuleEntry, SIGNATURE_MAGIC, SignatureBlock,
    config_key_id,
};
use nic_firmware::config::PortRule;
use nic_firmware::profile::{ClassifierTables, TableSizes};
use nic_firmware::{
    Class, ClassPolicy, ConfigError, NodeConfig, NodeState, PipelineConfig, Timeouts,
};
use zerocopy::IntoBytes;
use zerocopy::little_endian::{U16, U32, U64};

/// Seed of the development signing key (public; never trust it in production).
pub const DEV_KEY_SEED: [u8; 32] = *b"flowshard development key: open!";

pub fn dev_signing_key() -> SigningKey {
    SigningKey::from_bytes(&DEV_KEY_SEED)
}

pub fn dev_verifying_key() -> VerifyingKey {
    dev_signing_key().verifying_key()
}

/// Read an ed25519 private key in PKCS#8 PEM (`openssl genpkey -algorithm ed25519`).
pub fn signing_key_from_pem(pem: &str) -> Result<SigningKey, String> {
    SigningKey::from_pkcs8_pem(pem)
        .map_err(|e| format!("not an ed25519 PKCS#8 PEM private key: {e}"))
}

/// Read an ed25519 public key in SPKI PEM (`openssl pkey -pubout`).
pub fn verifying_key_from_pem(pem: &str) -> Result<VerifyingKey, String> {
    VerifyingKey::from_public_key_pem(pem)
        .map_err(|e| format!("not an ed25519 SPKI PEM public key: {e}"))
}

/// The first 8 bytes of a public key: how images and errors name a key.
pub fn key_id(key: &VerifyingKey) -> [u8; 8] {
    let mut id = [0; 8];
    id.copy_from_slice(&key.as_bytes()[..8]);
    id
}

/// What a verified image holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub image_version: u32,
    pub format_major: u16,
    pub format_minor: u16,
    pub len: usize,
    pub payload_crc: u32,
    /// Key id of the signer, if signed.
    pub signer: Option<[u8; 8]>,
    pub config: PipelineConfig,
    /// Sizes of the classifier tables the image carries, if any.
    pub classifier: Option<TableSizes>,
}

pub fn node_state_code(s: NodeState) -> u8 {
    match s {
        NodeState::Active => 0,
        NodeState::Draining => 1,
        NodeState::Down => 2,
    }
}

pub fn node_state_from_code(v: u32) -> Option<NodeState> {
    match v {
        0 => Some(NodeState::Active),
        1 => Some(NodeState::Draining),
        2 => Some(NodeState::Down),
        _ => None,
    }
}

/// Build an unsigned image of a validated configuration.
pub fn build(config: &PipelineConfig, image_version: u32) -> Result<Vec<u8>, ConfigError> {
    build_with(config, image_version, None)
}

/// [`build`], with classifier tables the NIC loads when it boots the image, so it
/// classifies flows from its first packet on without waiting for the host.
pub fn build_with(
    config: &PipelineConfig,
    image_version: u32,
    classifier: Option<&ClassifierTables>,
) -> Result<Vec<u8>, ConfigError> {
    config.validate()?;
    if classifier.is_some_and(|t| t.packets() != config.feature_packets) {
        return Err(ConfigError::Invalid {
            key: "classifier.packets",
            why: "the classifier's N differs from feature_packets",
        });
    }
    let tables = classifier
        .map(ClassifierTables::to_bytes)
        .unwrap_or_default();
    let classifier_len = u32::try_from(tables.len())
        .ok()
        .filter(|l| (*l as usize) < hdl_bindings::image::MAX_IMAGE_LEN)
        .ok_or(ConfigError::Invalid {
            key: "classifier",
            why: "tables larger than a flash slot",
        })?;
    let count = |n: usize, key| {
        u16::try_from(n).map_err(|_| ConfigError::Invalid {
            key,
            why: "more than 65535 entries",
        })
    };
    let t = &config.timeouts;
    let section = ConfigSection {
        flow_capacity: U32::new(config.flow_capacity),
        buckets: U32::new(config.buckets),
        shards: U16::new(config.shards),
        feature_packets: config.feature_packets,
        symmetric_rss: u8::from(config.symmetric_rss),
        flowlet_gap_us: U32::new(config.flowlet_gap_us),
        feature_slots: U32::new(config.feature_slots),
        record_queue: U32::new(config.record_queue),
        table_seed: U64::new(config.table_seed),
        rss_key: config.rss_key,
        tcp_ms: U32::new(t.tcp_ms),
        tcp_close_ms: U32::new(t.tcp_close_ms),
        udp_ms: U32::new(t.udp_ms),
        icmp_ms: U32::new(t.icmp_ms),
        other_ms: U32::new(t.other_ms),
        node_count: U16::new(count(config.nodes.len(), "nodes")?),
        policy_count: U16::new(count(config.class_policies.len(), "class_policies")?),
        rule_count: U16::new(count(config.port_rules.len(), "port_rules")?),
        classifier_len: U32::new(classifier_len),
        reserved: [0; 2],
    };
    let mut payload = section.as_bytes().to_vec();
    for n in &config.nodes {
        let e = NodeEntry {
            id: U16::new(n.id),
            state: node_state_code(n.state),
            reserved: 0,
            weight: U32::new(n.weight),
        };
        payload.extend_from_slice(e.as_bytes());
    }
    for p in &config.class_policies {
        let e = PolicyEntry {
            class: p.class as u8,
            group: p.group,
            reserved: U16::new(0),
        };
        payload.extend_from_slice(e.as_bytes());
    }
    for r in &config.port_rules {
        let e = RuleEntry {
            proto: r.proto,
            class: r.class as u8,
            reserved: U16::new(0),
            port_lo: U16::new(r.ports[0]),
            port_hi: U16::new(r.ports[1]),
        };
        payload.extend_from_slice(e.as_bytes());
    }
    payload.extend_from_slice(&tables);
    let mut header = Header {
        magic: MAGIC,
        format_major: U16::new(FORMAT_MAJOR),
        format_minor: U16::new(FORMAT_MINOR),
        header_len: U16::new(HEADER_LEN as u16),
        reserved0: U16::new(0),
        payload_len: U32::new(payload.len() as u32),
        payload_crc: U32::new(crc32c::crc32c(&payload)),
        image_version: U32::new(image_version),
        reserved: [0; 32],
        header_crc: U32::new(0),
    };
    header.header_crc = U32::new(crc32c::crc32c(&header.as_bytes()[..HEADER_LEN - 4]));
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Sign an image (replacing any signature it has). The image must be intact.
pub fn sign(image: &[u8], key: &SigningKey) -> Result<Vec<u8>, ImageError> {
    let view = check_integrity(image)?;
    let sig: Signature = key.sign(view.signed);
    let block = SignatureBlock {
        magic: SIGNATURE_MAGIC,
        key_id: key_id(&key.verifying_key()),
        signature: sig.to_bytes(),
    };
    let mut out = view.signed.to_vec();
    out.extend_from_slice(block.as_bytes());
    Ok(out)
}

/// Structure and both CRCs.
fn check_integrity(image: &[u8]) -> Result<ImageView<'_>, ImageError> {
    let view = ImageView::parse(image)?;
    let hcrc = crc32c::crc32c(&view.signed[..HEADER_LEN - 4]);
    if hcrc != view.header.header_crc.get() {
        return Err(ImageError::BadHeaderCrc { computed: hcrc });
    }
    let pcrc = crc32c::crc32c(view.payload);
    if pcrc != view.header.payload_crc.get() {
        return Err(ImageError::BadPayloadCrc { computed: pcrc });
    }
    Ok(view)
}

/// Everything the flash checks before it accepts an image: structure, CRCs, the
/// signature against `trusted` (`None`: not checked, as `image inspect` does) and every
/// configuration value.
pub fn verify(image: &[u8], trusted: Option<&VerifyingKey>) -> Result<ImageInfo, ImageError> {
    verify_with_tables(image, trusted).map(|(info, _)| info)
}

/// [`verify`], handing back the classifier tables the image carries (`None` if it has
/// none) as well, so a device booting the image reads them once.
pub fn verify_with_tables(
    image: &[u8],
    trusted: Option<&VerifyingKey>,
) -> Result<(ImageInfo, Option<ClassifierTables>), ImageError> {
    let view = check_integrity(image)?;
    if let Some(key) = trusted {
        let block = view.signature.ok_or(ImageError::MissingSignature)?;
        if block.key_id != key_id(key) {
            return Err(ImageError::UntrustedKey {
                key_id: u32::from_be_bytes([
                    block.key_id[0],
                    block.key_id[1],
                    block.key_id[2],
                    block.key_id[3],
                ]),
            });
        }
        key.verify(view.signed, &Signature::from_bytes(&block.signature))
            .map_err(|_| ImageError::BadSignature)?;
    }
    let config = decode(&view)?;
    let tables = tables_of(&view, &config)?;
    let info = ImageInfo {
        image_version: view.header.image_version.get(),
        format_major: view.header.format_major.get(),
        format_minor: view.header.format_minor.get(),
        len: image.len(),
        payload_crc: view.header.payload_crc.get(),
        signer: view.signature.map(|s| s.key_id),
        config,
        classifier: tables.as_ref().map(ClassifierTables::sizes),
    };
    Ok((info, tables))
}

/// Read an image's classifier section: tables that are not well formed, or whose N is
/// not the image's `feature_packets`, refuse the image.
fn tables_of(
    view: &ImageView<'_>,
    config: &PipelineConfig,
) -> Result<Option<ClassifierTables>, ImageError> {
    if view.classifier.is_empty() {
        return Ok(None);
    }
    let start = HEADER_LEN + view.payload.len() - view.classifier.len();
    let t =
        ClassifierTables::from_bytes(view.classifier).map_err(|e| ImageError::BadClassifier {
            offset: (start + e.offset) as u32,
        })?;
    if t.packets() != config.feature_packets {
        return Err(ImageError::OutOfRange {
            key: config_key_id("classifier.packets"),
        });
    }
    Ok(Some(t))
}

fn decode(view: &ImageView<'_>) -> Result<PipelineConfig, ImageError> {
    let c = view.config;
    let at = |section_off: usize, i: usize, size: usize, field: usize| ImageError::BadLayout {
        offset: (HEADER_LEN + section_off + i * size + field) as u32,
    };
    let nodes_at = CONFIG_SECTION_LEN;
    let policies_at = nodes_at + view.nodes.len() * 8;
    let rules_at = policies_at + view.policies.len() * 4;
    let nodes = view
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            Ok(NodeConfig {
                id: n.id.get(),
                weight: n.weight.get(),
                state: node_state_from_code(n.state.into()).ok_or(at(nodes_at, i, 8, 2))?,
            })
        })
        .collect::<Result<_, ImageError>>()?;
    let class_policies = view
        .policies
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Ok(ClassPolicy {
                class: Class::from_index(p.class).ok_or(at(policies_at, i, 4, 0))?,
                group: p.group,
            })
        })
        .collect::<Result<_, ImageError>>()?;
    let port_rules = view
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            Ok(PortRule {
                proto: r.proto,
                ports: [r.port_lo.get(), r.port_hi.get()],
                class: Class::from_index(r.class).ok_or(at(rules_at, i, 8, 1))?,
            })
        })
        .collect::<Result<_, ImageError>>()?;
    let config = PipelineConfig {
        flow_capacity: c.flow_capacity.get(),
        buckets: c.buckets.get(),
        shards: c.shards.get(),
        rss_key: c.rss_key,
        symmetric_rss: c.symmetric_rss != 0,
        table_seed: c.table_seed.get(),
        flowlet_gap_us: c.flowlet_gap_us.get(),
        feature_packets: c.feature_packets,
        feature_slots: c.feature_slots.get(),
        record_queue: c.record_queue.get(),
        timeouts: Timeouts {
            tcp_ms: c.tcp_ms.get(),
            tcp_close_ms: c.tcp_close_ms.get(),
            udp_ms: c.udp_ms.get(),
            icmp_ms: c.icmp_ms.get(),
            other_ms: c.other_ms.get(),
        },
        nodes,
        class_policies,
        port_rules,
    };
    config.validate().map_err(|e| ImageError::OutOfRange {
        key: match e {
            ConfigError::Invalid { key, .. } => config_key_id(key),
            ConfigError::DuplicateNode(_) | ConfigError::NodeIdTooLarge(_) => {
                config_key_id("nodes")
            }
            ConfigError::DuplicatePolicy(_) => config_key_id("class_policies"),
        },
    })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Vec<u8> {
        sign(
            &build(&PipelineConfig::default(), 7).unwrap(),
            &dev_signing_key(),
        )
        .unwrap()
    }

    fn reseal(img: &mut [u8]) {
        let crc = crc32c::crc32c(&img[..60]);
        img[60..64].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn a_built_and_signed_image_verifies_and_round_trips_the_config() {
        let mut config = PipelineConfig::default();
        config.class_policies.push(ClassPolicy {
            class: Class::Video,
            group: 4,
        });
        config.port_rules.push(PortRule {
            proto: 17,
            ports: [3478, 3481],
            class: Class::Realtime,
        });
        config.nodes[2].state = NodeState::Draining;
        let img = sign(&build(&config, 42).unwrap(), &dev_signing_key()).unwrap();
        let info = verify(&img, Some(&dev_verifying_key())).unwrap();
        assert_eq!(info.config, config);
        assert_eq!(info.image_version, 42);
        assert_eq!(info.signer, Some(key_id(&dev_verifying_key())));
        // Signing again replaces the signature rather than stacking one.
        let other = SigningKey::from_bytes(&[9; 32]);
        let resigned = sign(&img, &other).unwrap();
        assert_eq!(resigned.len(), img.len());
        verify(&resigned, Some(&other.verifying_key())).unwrap();
    }

    fn port_tables(packets: u8) -> ClassifierTables {
        use nic_firmware::profile::{Forest, Node, SCORE_ONE};
        let leaf = |c: Class| {
            let mut scores = [0; Class::COUNT];
            scores[c as usize] = SCORE_ONE;
            Node::Leaf { scores }
        };
        ClassifierTables::compile(&Forest {
            packets,
            trees: vec![vec![
                Node::Split {
                    feature: 2,
                    threshold: 80,
                    left: 1,
                    right: 2,
                },
                leaf(Class::Web),
                leaf(Class::Bulk),
            ]],
        })
        .unwrap()
    }

    /// Make the payload CRC, the header CRC and the signature right again.
    fn reseal_all(img: &[u8]) -> Vec<u8> {
        sign(&reseal_all_raw(img), &dev_signing_key()).unwrap()
    }

    /// [`reseal_all`] without the signature, for an image whose structure no longer
    /// parses: the signed image's CRCs made right, its signature block dropped.
    fn reseal_all_raw(img: &[u8]) -> Vec<u8> {
        let mut b = img[..img.len() - 80].to_vec();
        let crc = crc32c::crc32c(&b[HEADER_LEN..]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        reseal(&mut b);
        b
    }

    #[test]
    fn classifier_tables_ride_in_the_image_and_corrupt_ones_are_named() {
        let config = PipelineConfig::default();
        let tables = port_tables(config.feature_packets);
        let img = sign(
            &build_with(&config, 5, Some(&tables)).unwrap(),
            &dev_signing_key(),
        )
        .unwrap();
        let key = dev_verifying_key();
        let info = verify(&img, Some(&key)).unwrap();
        assert_eq!(info.classifier, Some(tables.sizes()));
        assert_eq!((info.format_major, info.format_minor), (1, 1));
        let back = verify_with_tables(&img, Some(&key)).unwrap().1.unwrap();
        assert_eq!(back.to_bytes(), tables.to_bytes());
        assert_eq!(verify(&image(), Some(&key)).unwrap().classifier, None);
        assert!(
            verify_with_tables(&image(), Some(&key))
                .unwrap()
                .1
                .is_none()
        );
        // Tables for another N are refused when building and when flashing.
        let e = build_with(&config, 5, Some(&port_tables(4))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`classifier.packets`: the classifier's N differs from feature_packets"
        );
        let tables_at = img.len() - 80 - tables.to_bytes().len();
        let mut b = img.clone();
        b[tables_at + 6] = 4;
        let e = verify(&reseal_all(&b), Some(&key)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "image configuration out of range: `classifier.packets`"
        );
        // Damaged tables with every CRC and the signature made right: named, with where.
        let mut b = img.clone();
        b[tables_at] = b'X';
        assert_eq!(
            verify(&reseal_all(&b), Some(&key)).unwrap_err(),
            ImageError::BadClassifier {
                offset: tables_at as u32
            }
        );
        let mut b = img.clone();
        b[tables_at + 12..tables_at + 16].copy_from_slice(&999u32.to_le_bytes());
        let e = verify(&reseal_all(&b), Some(&key)).unwrap_err();
        assert!(matches!(e, ImageError::BadClassifier { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with("corrupt classifier tables in the image")
        );
        // A classifier length past the payload is a layout error.
        let mut b = img.clone();
        b[HEADER_LEN + 98..HEADER_LEN + 102].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            verify(&reseal_all_raw(&b), Some(&key)).unwrap_err(),
            ImageError::BadLayout {
                offset: (HEADER_LEN + 98) as u32
            }
        );
    }

    #[test]
    fn every_kind_of_bad_image_is_named() {
        let good = image();
        let key = dev_verifying_key();
        let check = |img: &[u8]| verify(img, Some(&key)).unwrap_err();
        assert!(matches!(
            check(&good[..100]),
            ImageError::Truncated { len: 100 }
        ));
        assert!(matches!(
            check(&good[..good.len() - 10]),
            ImageError::Truncated { .. }
        ));
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(check(&b), ImageError::BadMagic);
        let mut b = good.clone();
        b[8] = 2;
        assert_eq!(check(&b), ImageError::UnsupportedVersion { major: 2 });
        let mut b = good.clone();
        b[24] ^= 1;
        assert!(matches!(check(&b), ImageError::BadHeaderCrc { .. }));
        let mut b = good.clone();
        b[HEADER_LEN + 3] ^= 1;
        assert!(matches!(check(&b), ImageError::BadPayloadCrc { .. }));
        let unsigned = build(&PipelineConfig::default(), 1).unwrap();
        assert_eq!(check(&unsigned), ImageError::MissingSignature);
        let foreign = sign(&unsigned, &SigningKey::from_bytes(&[1; 32])).unwrap();
        assert!(matches!(check(&foreign), ImageError::UntrustedKey { .. }));
        let mut b = good.clone();
        let n = b.len();
        b[n - 1] ^= 1;
        assert_eq!(check(&b), ImageError::BadSignature);
        // Out-of-range table size, CRCs and signature made right: the value is named.
        let mut b = build(&PipelineConfig::default(), 1).unwrap();
        b[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&1000u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[HEADER_LEN..]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        reseal(&mut b);
        let b = sign(&b, &dev_signing_key()).unwrap();
        let e = check(&b);
        assert_eq!(
            e,
            ImageError::OutOfRange {
                key: config_key_id("buckets")
            }
        );
        assert_eq!(e.to_string(), "image configuration out of range: `buckets`");
    }
}
