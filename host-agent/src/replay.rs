//! `flowshard replay`: every packet of a capture through the NIC data plane, in
//! capture-timestamp time, with a summary and an optional per-packet decision log.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use hdl_bindings::telemetry::ip_addr;
use hw_sim::capture::{Burst, CaptureError, CaptureFormat, CaptureReader};
use nic_firmware::parse::parse;
use nic_firmware::pipeline::{Decision, Packet};
use nic_firmware::{LinkType, Pipeline, PipelineConfig, Verdict};
use serde::Serialize;

use crate::Error;
use crate::flows::proto_name;

/// Header of the decision log, one row per packet.
pub const DECISIONS_HEADER: &str =
    "index,ts_ns,proto,src,sport,dst,dport,rss_hash,bucket,shard,node,flowlet,verdict";

/// One node's share of the replay.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct NodeSummary {
    pub node: u16,
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
}

/// What a replay reports.
#[derive(Debug, Serialize)]
pub struct ReplaySummary {
    pub capture: String,
    pub format: &'static str,
    /// Packets read from the capture.
    pub packets: u64,
    /// Bytes on the wire of the packets read.
    pub wire_bytes: u64,
    /// IP bytes forwarded to nodes.
    pub forwarded_bytes: u64,
    /// Flows the NIC created.
    pub flows: u64,
    /// Capture time from the first to the last packet, ns.
    pub duration_ns: u64,
    pub nodes: Vec<NodeSummary>,
    /// Packets per verdict: `forward` and every drop/malformed reason.
    pub verdicts: BTreeMap<&'static str, u64>,
    /// Packets per link type of the capture.
    pub link_types: BTreeMap<String, u64>,
    pub table_occupancy: u32,
    pub table_capacity: u32,
    pub evictions: u64,
    pub flows_ended: u64,
    pub feature_records: u64,
    pub ts_backwards: u64,
    /// Set when the capture ended in an error after the packets counted here.
    pub error: Option<String>,
}

/// Replay options.
#[derive(Debug)]
pub struct ReplayOptions {
    pub pcap: PathBuf,
    pub config: PipelineConfig,
    pub decisions: Option<PathBuf>,
}

pub(crate) fn link_name(l: LinkType) -> String {
    match l {
        LinkType::Ethernet => "ethernet".into(),
        LinkType::RawIp => "raw_ip".into(),
        LinkType::LinuxSll => "linux_sll".into(),
        LinkType::LinuxSll2 => "linux_sll2".into(),
        LinkType::Null => "bsd_loopback".into(),
        LinkType::Loop => "openbsd_loopback".into(),
        LinkType::Unsupported(n) => format!("unsupported_{n}"),
    }
}

/// Append the decision-log row of packet `p`, received on `link`.
///
/// The data plane's decision leaves the tuple out; it is parsed again here, off the
/// fast path, only when a log is asked for.
pub(crate) fn write_row(
    row: &mut String,
    index: u64,
    link: LinkType,
    p: &Packet<'_>,
    d: &Decision,
) {
    let ts_ns = p.ts_ns;
    let _ = write!(row, "{index},{ts_ns},");
    match &parse(link, p.data, p.wire_len)
        .ok()
        .map(|parsed| parsed.tuple)
    {
        Some(t) => {
            let _ = write!(
                row,
                "{},{},{},{},{},{:08x},{},",
                proto_name(t.proto),
                ip_addr(&t.src, t.ipv6),
                t.sport,
                ip_addr(&t.dst, t.ipv6),
                t.dport,
                d.rss_hash,
                d.bucket
            );
        }
        None => row.push_str(",,0,,0,,,"),
    }
    if d.verdict == Verdict::Forward {
        let _ = write!(row, "{},{},{},", d.shard, d.node, d.flowlet);
    } else {
        row.push_str(",,,");
    }
    row.push_str(d.verdict.as_str());
    row.push('\n');
}

struct Replayer {
    pipeline: Pipeline,
    log: Option<(BufWriter<std::fs::File>, PathBuf)>,
    row: String,
    index: u64,
    wire_bytes: u64,
    first_ts: Option<u64>,
    last_ts: u64,
    link_types: std::collections::HashMap<LinkType, u64>,
    burst: Burst,
    decisions: Vec<Decision>,
}

impl Replayer {
    fn flush(&mut self) -> Result<(), Error> {
        if self.burst.is_empty() {
            return Ok(());
        }
        let link = self.burst.link();
        let pkts = self.burst.packets();
        self.decisions.clear();
        self.pipeline
            .process_burst(link, &pkts, &mut self.decisions);
        if let Some((w, path)) = &mut self.log {
            self.row.clear();
            for (d, p) in self.decisions.iter().zip(&pkts) {
                write_row(&mut self.row, self.index, link, p, d);
                self.index += 1;
            }
            w.write_all(self.row.as_bytes())
                .map_err(|source| Error::Io {
                    what: format!("writing {}", path.display()),
                    source,
                })?;
        }
        self.pipeline.drain_records().for_each(drop);
        self.burst.clear();
        Ok(())
    }
}

/// Replay a capture. A capture that ends in an error still yields the summary of the
/// packets before it (with `error` set); the error is returned beside it.
pub fn replay(opts: &ReplayOptions) -> Result<(ReplaySummary, Option<CaptureError>), Error> {
    let mut reader = CaptureReader::open(&opts.pcap)?;
    let pipeline = Pipeline::new(&opts.config).map_err(|e| {
        Error::Config(crate::nic_config::ConfigFileError::Invalid {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })
    })?;
    let log = match &opts.decisions {
        Some(path) => {
            let f = std::fs::File::create(path).map_err(|source| Error::Io {
                what: format!("creating {}", path.display()),
                source,
            })?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            writeln!(w, "{DECISIONS_HEADER}").map_err(|source| Error::Io {
                what: format!("writing {}", path.display()),
                source,
            })?;
            Some((w, path.clone()))
        }
        None => None,
    };
    let mut r = Replayer {
        pipeline,
        log,
        row: String::new(),
        index: 0,
        wire_bytes: 0,
        first_ts: None,
        last_ts: 0,
        link_types: std::collections::HashMap::new(),
        burst: Burst::default(),
        decisions: Vec::with_capacity(Burst::LEN),
    };
    let mut packets = 0u64;
    let capture_error = loop {
        let pkt = match reader.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break None,
            Err(e) => break Some(e),
        };
        packets += 1;
        r.wire_bytes += u64::from(pkt.wire_len);
        r.first_ts.get_or_insert(pkt.ts_ns);
        r.last_ts = r.last_ts.max(pkt.ts_ns);
        *r.link_types.entry(pkt.link).or_default() += 1;
        if r.burst.is_full_for(pkt.link) {
            r.flush()?;
        }
        r.burst.push(&pkt, pkt.ts_ns);
    };
    r.flush()?;
    if let Some((w, path)) = &mut r.log {
        w.flush().map_err(|source| Error::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
    }
    let c = r.pipeline.counters();
    let nodes = r
        .pipeline
        .nodes()
        .map(|n| {
            let nc = c.nodes.get(n.id as usize).copied().unwrap_or_default();
            NodeSummary {
                node: n.id,
                packets: nc.packets,
                bytes: nc.bytes,
                flows: nc.flows,
            }
        })
        .collect();
    let summary = ReplaySummary {
        capture: opts.pcap.display().to_string(),
        format: match reader.format() {
            CaptureFormat::Pcap => "pcap",
            CaptureFormat::PcapNg => "pcapng",
        },
        packets,
        wire_bytes: r.wire_bytes,
        forwarded_bytes: c.bytes,
        flows: c.flows_created,
        duration_ns: r.last_ts - r.first_ts.unwrap_or(r.last_ts),
        nodes,
        verdicts: Verdict::ALL
            .iter()
            .map(|v| (v.as_str(), c.verdict(*v)))
            .collect(),
        link_types: r
            .link_types
            .iter()
            .map(|(l, n)| (link_name(*l), *n))
            .collect(),
        table_occupancy: r.pipeline.table().len(),
        table_capacity: r.pipeline.table().capacity(),
        evictions: c.flows_evicted,
        flows_ended: c.flows_ended_fin + c.flows_ended_rst + c.flows_ended_idle + c.flows_evicted,
        feature_records: c.records_emitted,
        ts_backwards: c.ts_backwards,
        error: capture_error.as_ref().map(|e| e.to_string()),
    };
    Ok((summary, capture_error))
}

impl ReplaySummary {
    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "capture      {} ({})", self.capture, self.format);
        let links: Vec<String> = self
            .link_types
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(s, "link types   {}", links.join(", "));
        let _ = writeln!(
            s,
            "packets      {}  ({} bytes on the wire, {:.3} s of capture time)",
            self.packets,
            self.wire_bytes,
            self.duration_ns as f64 / 1e9
        );
        let _ = writeln!(
            s,
            "flows        {} created, {} ended, {} tracked at the end (capacity {}), {} evicted",
            self.flows, self.flows_ended, self.table_occupancy, self.table_capacity, self.evictions
        );
        let _ = writeln!(
            s,
            "records      {} flow feature records",
            self.feature_records
        );
        let _ = writeln!(s, "nodes        packets      bytes        flows");
        for n in &self.nodes {
            let _ = writeln!(
                s,
                "  node {:<5}  {:<12} {:<12} {}",
                n.node, n.packets, n.bytes, n.flows
            );
        }
        let _ = writeln!(s, "verdicts");
        for (k, v) in self.verdicts.iter().filter(|(_, v)| **v > 0) {
            let _ = writeln!(s, "  {k:<18} {v}");
        }
        if self.ts_backwards > 0 {
            let _ = writeln!(
                s,
                "note         {} packets had timestamps earlier than the one before",
                self.ts_backwards
            );
        }
        if let Some(e) = &self.error {
            let _ = writeln!(s, "error        {e}");
        }
        s
    }
}

/// Print a summary the way the CLI does.
pub fn print(summary: &ReplaySummary, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(summary).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        );
    } else {
        print!("{}", summary.to_text());
    }
}

/// Run `flowshard replay`.
pub fn run(
    pcap: &Path,
    config: PipelineConfig,
    decisions: Option<&Path>,
    json: bool,
) -> Result<(), Error> {
    let (summary, err) = replay(&ReplayOptions {
        pcap: pcap.to_owned(),
        config,
        decisions: decisions.map(Path::to_owned),
    })?;
    print(&summary, json);
    match err {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
