//! `flowshard classify`: a capture through the NIC and the profiler, one row per flow.
//!
//! The NIC runs with the model's trees loaded as its tables, so it classifies each flow
//! itself at its N-th packet; the host model classifies the same flow from the same
//! feature record and pushes its class down to the NIC (class policy, counters). The
//! summary on stderr says how often the two agreed. Without ONNX Runtime or the model,
//! the flows are still steered and listed, unclassified, and the command says what is
//! missing and how to get it.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use nic_firmware::PipelineConfig;
use nic_firmware::profile::{FEATURES, features};
use serde::Serialize;

use crate::Error;
use crate::flows::{self, Flow, proto_name};
use crate::profiler::{self, Profiler, Verdict};

/// One output row.
#[derive(Debug, Serialize)]
struct Row<'a> {
    proto: String,
    src: String,
    sport: u16,
    dst: String,
    dport: u16,
    packets: u64,
    class: &'a str,
    confidence: Option<f32>,
}

/// What a classification run measured besides the rows.
#[derive(Debug, Default, PartialEq)]
pub struct ClassifySummary {
    pub flows: usize,
    /// Flows the NIC's tables classified at their N-th packet.
    pub nic_classified: usize,
    /// Of those, flows where the NIC's class is the model's (none without the model).
    pub nic_agreed: usize,
    /// Host classes pushed down to live flows.
    pub pushed: u64,
    /// N.
    pub packets: u8,
}

/// Every flow of a capture with the model's verdict (none without a profiler).
#[derive(Debug)]
pub struct Classified {
    pub flows: Vec<Flow>,
    pub verdicts: Vec<Option<Verdict>>,
    pub summary: ClassifySummary,
}

/// The trees file beside a model file (`x.onnx` → `x.trees.json`).
fn trees_beside(model: &Path) -> PathBuf {
    model.with_extension("trees.json")
}

/// Classify every flow of a capture.
pub fn classify(
    pcap: &Path,
    mut profiler: Option<&mut Profiler>,
    tables: Option<nic_firmware::profile::ClassifierTables>,
) -> Result<Classified, Error> {
    let packets = profiler
        .as_ref()
        .map(|p| p.packets())
        .or(tables.as_ref().map(|t| t.packets()))
        .unwrap_or(PipelineConfig::default().feature_packets);
    let config = PipelineConfig {
        feature_packets: packets,
        ..PipelineConfig::default()
    };
    let mut verdicts: Vec<Option<Verdict>> = Vec::new();
    let mut batch: Vec<[u32; FEATURES]> = Vec::new();
    let mut out = Vec::new();
    let mut pushed = 0;
    let (flows, capture_error) =
        flows::collect(pcap, &config, tables, |pipeline, flows, opened| {
            let Some(p) = profiler.as_deref_mut() else {
                return Ok(());
            };
            batch.clear();
            batch.extend(opened.iter().map(|&i| features(&flows[i].first)));
            out.clear();
            p.classify(&batch, &mut out)?;
            for (&i, v) in opened.iter().zip(&out) {
                if verdicts.len() <= i {
                    verdicts.resize(i + 1, None);
                }
                verdicts[i] = Some(*v);
                if pipeline.set_flow_class(&flows[i].tuple(), v.class) {
                    pushed += 1;
                }
            }
            Ok(())
        })?;
    verdicts.resize(flows.len(), None);
    // Flows that ended before their N-th packet are classified from their end record.
    if let Some(p) = profiler {
        let late: Vec<usize> = (0..flows.len())
            .filter(|i| verdicts[*i].is_none())
            .collect();
        batch.clear();
        batch.extend(late.iter().map(|&i| features(&flows[i].first)));
        out.clear();
        p.classify(&batch, &mut out)?;
        for (&i, v) in late.iter().zip(&out) {
            verdicts[i] = Some(*v);
        }
    }
    let mut s = ClassifySummary {
        flows: flows.len(),
        pushed,
        packets,
        ..ClassifySummary::default()
    };
    for (f, v) in flows.iter().zip(&verdicts) {
        if let Some(nic) = f.nic_class {
            s.nic_classified += 1;
            s.nic_agreed += usize::from(v.is_some_and(|v| v.class == nic));
        }
    }
    match capture_error {
        Some(e) => Err(e.into()),
        None => Ok(Classified {
            flows,
            verdicts,
            summary: s,
        }),
    }
}

/// Run `flowshard classify`.
pub fn run(pcap: &Path, model: Option<&Path>, json: bool) -> Result<(), Error> {
    let (mut profiler, missing) = match Profiler::load(model, &profiler::library_path()) {
        Ok(p) => (Some(p), None),
        Err(e) => (None, Some(e)),
    };
    let trees = model.map(trees_beside);
    let tables = match trees.as_deref() {
        Some(t) if !t.exists() => None,
        t => match profiler::nic_tables(t) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("flowshard: NIC tables not loaded: {e}");
                None
            }
        },
    };
    let sizes = tables.as_ref().map(|t| t.sizes());
    let Classified {
        flows,
        verdicts,
        summary: s,
    } = classify(pcap, profiler.as_mut(), tables)?;
    let mut text = String::new();
    if !json {
        let _ = writeln!(
            text,
            "{:<6} {:<45} {:<45} {:>8}  {:<10} confidence",
            "proto", "src", "dst", "packets", "class"
        );
    }
    for (f, v) in flows.iter().zip(&verdicts) {
        let row = Row {
            proto: proto_name(f.first.proto).into_owned(),
            src: f.client().to_string(),
            sport: f.first.client_port,
            dst: f.server().to_string(),
            dport: f.first.server_port,
            packets: f.packets,
            class: v.map_or("unclassified", |v| v.class.as_str()),
            confidence: v.map(|v| v.confidence),
        };
        if json {
            text.push_str(&serde_json::to_string(&row).map_err(|e| Error::Usage(e.to_string()))?);
            text.push('\n');
        } else {
            let _ = writeln!(
                text,
                "{:<6} {:<45} {:<45} {:>8}  {:<10} {}",
                row.proto,
                SocketAddr::new(f.client(), row.sport),
                SocketAddr::new(f.server(), row.dport),
                row.packets,
                row.class,
                row.confidence.map_or("-".into(), |c| format!("{c:.2}"))
            );
        }
    }
    print!("{text}");
    eprintln!(
        "{} flows, N = {}; {} classes pushed down to the NIC",
        s.flows, s.packets, s.pushed
    );
    if let Some(z) = sizes {
        let agreed = if missing.is_none() {
            format!("{} agree with the model", s.nic_agreed)
        } else {
            "no model to compare with".into()
        };
        eprintln!(
            "NIC tables: {} flows classified on the NIC at packet N, {agreed}; {} trees, {} range entries over {} features, {} leaves, {} KiB",
            s.nic_classified,
            z.trees,
            z.range_entries,
            z.features_used,
            z.leaves,
            z.bytes.div_ceil(1024)
        );
    }
    match missing {
        Some(e) => {
            eprintln!("flowshard: the flows above were steered and listed without classes");
            Err(e.into())
        }
        None => Ok(()),
    }
}
