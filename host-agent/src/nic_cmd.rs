//! The NIC image and device commands: `flowshard image build|inspect|sign`, `flash`,
//! `status`, `bench ring`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hdl_bindings::ring::{CmdDesc, Opcode, Status};
use hw_sim::device::{DeviceOptions, NicDevice};

use hw_sim::image::{
    ImageInfo, dev_verifying_key, key_id, signing_key_from_pem, verifying_key_from_pem,
};
use serde::Serialize;

use crate::device::{self, Device, InProcess};
use crate::driver::{Nic, NicError, SlotStatus};
use crate::{Error, nic_config};

/// The embedded default configuration as an image signed with the development key.
pub fn default_image() -> Result<Vec<u8>, Error> {
    signed_image(&nic_firmware::PipelineConfig::default(), "embedded default")
}

/// An image of `config` signed with the development key: what an emulated NIC boots
/// when nobody flashed it. `source` names the configuration in errors.
pub fn signed_image(config: &nic_firmware::PipelineConfig, source: &str) -> Result<Vec<u8>, Error> {
    let img =
        hw_sim::image::build(config, 1).map_err(|e| Error::Usage(format!("{source}: {e}")))?;
    hw_sim::image::sign(&img, &hw_sim::image::dev_signing_key()).map_err(|error| Error::Image {
        path: source.into(),
        error,
    })
}

pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, Error> {
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
    classifier: Option<Option<&Path>>,
    out: &Path,
) -> Result<(), Error> {
    let cfg = nic_config::load(config)?;
    let tables = classifier.map(crate::profiler::nic_tables).transpose()?;
    let img = hw_sim::image::build_with(&cfg, version, tables.as_ref()).map_err(|e| {
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
        "{}: image version {version}, {} bytes{}, {}",
        out.display(),
        img.len(),
        tables.as_ref().map_or(String::new(), |t| format!(
            " with classifier tables of {} trees, {} leaves for N = {}",
            t.sizes().trees,
            t.sizes().leaves,
            t.packets()
        )),
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
    let bytes = read_file(image)?;
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
    /// The classifier tables' sizes, if the image carries them.
    classifier_tables: Option<ClassifierSizes>,
}

/// `TableSizes` as `image inspect --json` shows them.
#[derive(Debug, Serialize)]
struct ClassifierSizes {
    trees: usize,
    features_used: usize,
    range_entries: usize,
    leaves: usize,
    bytes: usize,
}

/// `flowshard image inspect`: check integrity and show what the image holds. With
/// `trusted`, the signature is checked against that key too.
pub fn inspect(image: &Path, trusted: Option<&Path>, json: bool) -> Result<(), Error> {
    let bytes = read_file(image)?;
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
        classifier_tables: info.classifier.map(|z| ClassifierSizes {
            trees: z.trees,
            features_used: z.features_used,
            range_entries: z.range_entries,
            leaves: z.leaves,
            bytes: z.bytes,
        }),
    };
    if json {
        return json_line(&report);
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
    match &report.classifier_tables {
        None => println!("  NIC tables     none (flows are classified by the host only)"),
        Some(z) => println!(
            "  NIC tables     {} trees, {} range entries over {} features, {} leaves, {} KiB",
            z.trees,
            z.range_entries,
            z.features_used,
            z.leaves,
            z.bytes.div_ceil(1024)
        ),
    }
    Ok(())
}

fn open(spec: &str) -> Result<Nic<Box<dyn Device>>, Error> {
    let dev = device::open(spec).map_err(NicError::Open)?;
    Ok(Nic::open(dev)?)
}

pub(crate) fn json_line(v: &impl Serialize) -> Result<(), Error> {
    println!(
        "{}",
        serde_json::to_string(v).map_err(|e| Error::Usage(e.to_string()))?
    );
    Ok(())
}

#[derive(Serialize)]
struct Progress {
    written: usize,
    total: usize,
}

/// `flowshard flash`: write an image into the device's inactive slot and boot it. A
/// progress bar on a terminal; with `--json`, one progress line per chunk and the report.
pub fn flash(spec: &str, image: &Path, chunk: usize, json: bool) -> Result<(), Error> {
    let bytes = read_file(image)?;
    let mut nic = open(spec)?;
    let bar = (!json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(bytes.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "flashing {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut printed = Ok(());
    let result = nic.flash(&bytes, chunk, &mut |written, total| {
        if let Some(bar) = &bar {
            bar.set_position(written as u64);
        }
        if json {
            printed = json_line(&Progress { written, total });
        }
        printed.is_ok()
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    printed?;
    let report = result?;
    if json {
        return json_line(&report);
    }
    println!(
        "{}: flashed {} bytes into slot {}; running image version {} (was {})",
        nic.name(),
        report.bytes,
        report.slot,
        report.image_version,
        report.previous_version
    );
    Ok(())
}

/// `flowshard status`.
pub fn status(spec: &str, json: bool) -> Result<(), Error> {
    let mut nic = open(spec)?;
    let s = nic.status()?;
    if json {
        return json_line(&s);
    }
    println!("{} (PCI {})", s.device, s.pci_id);
    if s.running {
        println!(
            "  image          version {} in slot {}{}",
            s.image_version,
            s.slot,
            if s.fell_back {
                " (fell back: the last image flashed did not boot)"
            } else {
                ""
            }
        );
    } else {
        println!("  image          none running (flash one)");
    }
    let slot = |x: SlotStatus| {
        if x.valid {
            format!("version {}", x.version)
        } else {
            "empty".into()
        }
    };
    println!(
        "  flash slots    A: {}, B: {}{}; signatures required: {}",
        slot(s.slot_a),
        slot(s.slot_b),
        s.pending
            .map_or(String::new(), |p| format!("; slot {p} boots at next reset")),
        if s.signature_required { "yes" } else { "no" }
    );
    println!(
        "  tables         {} / {} flows, {} buckets, {} shards, {} nodes",
        s.flows_active, s.flow_capacity, s.buckets, s.shards, s.nodes
    );
    println!(
        "  traffic        {} packets, {} forwarded, {} flows created",
        s.packets, s.forwarded, s.flows_created
    );
    println!("  NIC time       {} ns; resets {}", s.nic_time_ns, s.resets);
    let c = s.command_ring;
    println!(
        "  command ring   {} entries, head {} tail {}, {} batches committed, {} descriptors failed",
        c.entries, c.head, c.tail, c.epoch_or_overflow, c.errors
    );
    let t = s.telemetry_ring;
    println!(
        "  telemetry ring {} entries, head {} tail {}, {} entries lost to overflow",
        t.entries, t.head, t.tail, t.epoch_or_overflow
    );
    Ok(())
}

/// What `flowshard bench ring` measured.
#[derive(Debug, Serialize)]
pub struct RingBench {
    pub device: String,
    pub updates: u64,
    pub batch: u32,
    pub updates_per_s: f64,
    pub register_round_trips: u32,
    pub round_trip_us_median: f64,
    pub round_trip_us_p99: f64,
}

/// `flowshard bench ring`: bucket updates through the command ring in batches, and
/// register round trips (scratch write + read), on `spec` or an in-process device.
/// The device is reset to its own image first; its bucket table ends up rewritten.
pub fn bench_ring(spec: Option<&str>, updates: u64, batch: u32) -> Result<RingBench, Error> {
    let mut nic = match spec {
        Some(spec) => open(spec)?,
        None => {
            let dev = Arc::new(Mutex::new(NicDevice::new(DeviceOptions::default())));
            let mut nic = Nic::open(Box::new(InProcess::new(dev)) as Box<dyn Device>)?;
            nic.flash(&default_image()?, 64 << 10, &mut |_, _| true)?;
            nic
        }
    };
    let status = nic.status()?;
    if !status.running {
        return Err(Error::Usage(format!(
            "{}: no image running; flash one first",
            nic.name()
        )));
    }
    let log2 = batch.max(2).next_power_of_two().trailing_zeros();
    nic.setup_commands(log2)?;
    let (buckets, shards) = (status.buckets, status.shards);
    let descs: Vec<CmdDesc> = (0..batch)
        .map(|i| CmdDesc::new(Opcode::SetBucket, (i * 7919) % buckets, i % shards))
        .collect();
    let rounds = updates.div_ceil(u64::from(batch)).max(1);
    let start = Instant::now();
    for _ in 0..rounds {
        let st = nic.submit(&descs)?;
        if let Some(bad) = st.iter().find(|s| **s != Status::Ok) {
            return Err(Error::Usage(format!("update refused: {}", bad.as_str())));
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let trips = 10_000u32;
    let mut lat = Vec::with_capacity(trips as usize);
    for i in 0..trips {
        let t = Instant::now();
        nic.round_trip(i)?;
        // A round trip is a write and a read of the scratch register: two messages.
        lat.push(t.elapsed().as_secs_f64() * 1e6 / 2.0);
    }
    lat.sort_by(f64::total_cmp);
    Ok(RingBench {
        device: nic.name().to_owned(),
        updates: rounds * u64::from(batch),
        batch,
        updates_per_s: (rounds * u64::from(batch)) as f64 / secs,
        register_round_trips: trips,
        round_trip_us_median: lat[lat.len() / 2],
        round_trip_us_p99: lat[lat.len() * 99 / 100],
    })
}
