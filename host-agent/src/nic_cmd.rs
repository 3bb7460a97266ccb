//! The NIC image and device commands: `flowshard image build|inspect|sign`.

use std::path::{Path, PathBuf};

use hw_sim::image::{
    ImageInfo, dev_verifying_key, key_id, signing_key_from_pem, verifying_key_from_pem,
};
use serde::Serialize;

use crate::{Error, nic_config};

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Io {
        what: format!("read {}", path.display()),
        source,
    })
}

fn read_text(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        what: format!("read {}", path.display()),
        source,
    })
}

/// Write `bytes` to `path` whole or not at all: a temporary file beside it, renamed.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io = |what: &str, source| Error::Io {
        what: format!("{what} {}", path.display()),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(|e| io("write", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("replace", e))
}

/// The signing key of `--key` (PKCS#8 PEM), or the development key.
fn signing_key(key: Option<&Path>) -> Result<ed25519_dalek::SigningKey, Error> {
    match key {
        None => Ok(hw_sim::image::dev_signing_key()),
        Some(path) => signing_key_from_pem(&read_text(path)?)
            .map_err(|e| Error::Usage(format!("{}: {e}", path.display()))),
    }
}

/// A public key of `--trusted-key` (SPKI PEM), or the development key.
pub fn trusted_key(key: Option<&Path>) -> Result<ed25519_dalek::VerifyingKey, Error> {
    match key {
        None => Ok(dev_verifying_key()),
        Some(path) => verifying_key_from_pem(&read_text(path)?)
            .map_err(|e| Error::Usage(format!("{}: {e}", path.display()))),
    }
}

/// `flowshard image build`: configuration (or the embedded default) → signed image.
pub fn build(
    config: Option<&Path>,
    version: u32,
    key: Option<&Path>,
    unsigned: bool,
    out: &Path,
) -> Result<(), Error> {
    let cfg = nic_config::load(config)?;
    let img = hw_sim::image::build(&cfg, version).map_err(|e| {
        Error::Usage(format!(
            "{}: {e}",
            config.map_or("embedded default".into(), |p| p.display().to_string())
        ))
    })?;
    let img = if unsigned {
        img
    } else {
        let key = signing_key(key)?;
        hw_sim::image::sign(&img, &key).map_err(|error| Error::Image {
            path: out.to_owned(),
            error,
        })?
    };
    write_atomic(out, &img)?;
    eprintln!(
        "{}: image version {version}, {} bytes, {}",
        out.display(),
        img.len(),
        if unsigned {
            "unsigned".to_string()
        } else if key.is_none() {
            "signed with the development key".to_string()
        } else {
            "signed".to_string()
        }
    );
    Ok(())
}

/// `flowshard image sign`: replace the image's signature, in place or into `out`.
pub fn sign(image: &Path, key: &Path, out: Option<&Path>) -> Result<(), Error> {
    let bytes = read(image)?;
    let key = signing_key(Some(key))?;
    let signed = hw_sim::image::sign(&bytes, &key).map_err(|error| Error::Image {
        path: image.to_owned(),
        error,
    })?;
    write_atomic(out.unwrap_or(image), &signed)
}

#[derive(Debug, Serialize)]
struct Inspect<'a> {
    path: &'a Path,
    format: String,
    bytes: usize,
    image_version: u32,
    payload_crc32c: String,
    signer: Option<String>,
    development_key: bool,
    signature_valid: Option<bool>,
    config: &'a nic_firmware::PipelineConfig,
}

/// `flowshard image inspect`: check integrity and show what the image holds. With
/// `trusted`, the signature is checked against that key too.
pub fn inspect(image: &Path, trusted: Option<&Path>, json: bool) -> Result<(), Error> {
    let bytes = read(image)?;
    let bad = |error| Error::Image {
        path: image.to_owned(),
        error,
    };
    let info: ImageInfo = hw_sim::image::verify(&bytes, None).map_err(bad)?;
    let signature_valid = match trusted {
        None => None,
        Some(path) => {
            let key = trusted_key(Some(path))?;
            hw_sim::image::verify(&bytes, Some(&key)).map_err(bad)?;
            Some(true)
        }
    };
    let signer = info
        .signer
        .map(|k| k.iter().map(|b| format!("{b:02x}")).collect());
    let development_key = info.signer == Some(key_id(&dev_verifying_key()));
    let report = Inspect {
        path: image,
        format: format!("{}.{}", info.format_major, info.format_minor),
        bytes: info.len,
        image_version: info.image_version,
        payload_crc32c: format!("{:#010x}", info.payload_crc),
        signer,
        development_key,
        signature_valid,
        config: &info.config,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| Error::Usage(e.to_string()))?
        );
        return Ok(());
    }
    let c = &info.config;
    println!(
        "{}: flowshard NIC image, format {}, {} bytes, CRC32C ok",
        image.display(),
        report.format,
        report.bytes
    );
    println!("  image version  {}", report.image_version);
    match (&report.signer, development_key, signature_valid) {
        (None, _, _) => println!("  signature      none"),
        (Some(k), true, _) => println!("  signature      key {k} (the development key)"),
        (Some(k), false, Some(_)) => {
            println!("  signature      key {k}, valid for the trusted key")
        }
        (Some(k), false, None) => {
            println!("  signature      key {k} (not checked: no --trusted-key)")
        }
    }
    println!(
        "  tables         {} flows, {} buckets, {} shards, {} nodes",
        c.flow_capacity,
        c.buckets,
        c.shards,
        c.nodes.len()
    );
    println!(
        "  flowlet gap    {} µs; feature records of N = {} packets, {} staging slots",
        c.flowlet_gap_us, c.feature_packets, c.feature_slots
    );
    println!(
        "  classifier     {} class policies, {} port rules; RSS {}",
        c.class_policies.len(),
        c.port_rules.len(),
        if c.symmetric_rss {
            "symmetric"
        } else {
            "asymmetric"
        }
    );
    Ok(())
}
