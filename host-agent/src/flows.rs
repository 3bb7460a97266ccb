//! Flows of a capture as the NIC reports them: every packet through the data plane,
//! each flow's first feature record (the one the profiler reads) and its packet total.
//!
//! `flowshard features` writes these flows with the profiler's input vector, for
//! training; `flowshard classify` feeds the same vectors to the model. Both read the
//! NIC's own records, so what the model is trained on is what it is served.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use hdl_bindings::telemetry::{FeatureRecord, FlowId, RecordKind};
use hw_sim::capture::{Burst, CaptureError, CaptureReader};
use nic_firmware::profile::{ClassifierTables, FEATURE_NAMES, features};
use nic_firmware::{FlowTuple, Pipeline, PipelineConfig, ipproto};

use crate::Error;

/// One flow of a capture.
#[derive(Clone, Debug)]
pub struct Flow {
    /// The flow's first record: its first N packets (fewer if it ended sooner).
    pub first: FeatureRecord,
    /// Packets of the flow, both directions, over all its records.
    pub packets: u64,
    /// IP bytes of the flow, both directions, over all its records.
    pub bytes: u64,
    /// Capture time of the flow's last packet.
    pub last_ts_ns: u64,
    /// Class the NIC had given the flow by its first record (its own tables), if any.
    pub nic_class: Option<nic_firmware::Class>,
}

impl Flow {
    /// The flow's tuple as the client sent it.
    pub fn tuple(&self) -> FlowTuple {
        tuple(&self.first.flow_id())
    }

    pub fn client(&self) -> IpAddr {
        self.first.client_ip()
    }

    pub fn server(&self) -> IpAddr {
        self.first.server_ip()
    }
}

/// A flow's tuple as the client sent it, from the identity its records carry: what
/// the NIC's flow commands take.
pub fn tuple(id: &FlowId) -> FlowTuple {
    FlowTuple {
        src: id.client,
        dst: id.server,
        sport: id.client_port,
        dport: id.server_port,
        proto: id.proto,
        ipv6: id.ipv6,
        has_ports: matches!(id.proto, ipproto::TCP | ipproto::UDP),
    }
}

/// A protocol's name as flow listings show it.
pub fn proto_name(proto: u8) -> Cow<'static, str> {
    match proto {
        ipproto::TCP => "tcp".into(),
        ipproto::UDP => "udp".into(),
        ipproto::ICMP => "icmp".into(),
        ipproto::ICMPV6 => "icmpv6".into(),
        n => n.to_string().into(),
    }
}

/// Collects records into flows.
#[derive(Debug, Default)]
struct Collector {
    flows: Vec<Flow>,
    live: HashMap<FlowId, usize>,
}

impl Collector {
    /// Take one record; returns the index of a flow it opened.
    fn take(&mut self, r: FeatureRecord) -> Option<usize> {
        let id = r.flow_id();
        let mut opened = None;
        let i = match self.live.get(&id) {
            Some(&i) if r.n == 0 => i,
            _ => {
                // A flow's first record is the only one with packets described one by one.
                if r.n == 0 {
                    return None;
                }
                self.flows.push(Flow {
                    first: r,
                    packets: 0,
                    bytes: 0,
                    last_ts_ns: r.last_ts_ns,
                    nic_class: nic_firmware::Class::from_index(r.class),
                });
                let i = self.flows.len() - 1;
                self.live.insert(id, i);
                opened = Some(i);
                i
            }
        };
        let f = &mut self.flows[i];
        f.packets += u64::from(r.packets);
        f.bytes += r.bytes;
        f.last_ts_ns = f.last_ts_ns.max(r.last_ts_ns);
        if r.kind == RecordKind::End {
            self.live.remove(&id);
        }
        opened
    }

    /// Whether flow `i` has not ended yet. Its tuple names it on the NIC only while it
    /// has not: after its end, the same tuple can already name a newer flow.
    fn is_live(&self, i: usize) -> bool {
        self.flows
            .get(i)
            .is_some_and(|f| self.live.get(&f.first.flow_id()) == Some(&i))
    }
}

/// Run a capture through a pipeline built from `config` (with the profiler's `tables`
/// loaded, if given) and return its flows in the order the NIC first reported them.
/// `on_early` sees the pipeline and the flows after
/// every burst that opened flows, with the indices of those flows, while the flows are
/// still live on the NIC (the profiler classifies them there and pushes the class down).
/// A capture that ends in an error yields the flows before it and the error.
pub fn collect(
    pcap: &Path,
    config: &PipelineConfig,
    tables: Option<ClassifierTables>,
    mut on_early: impl FnMut(&mut Pipeline, &mut [Flow], &[usize]) -> Result<(), Error>,
) -> Result<(Vec<Flow>, Option<CaptureError>), Error> {
    let mut reader = CaptureReader::open(pcap)?;
    let mut pipeline = Pipeline::new(config).map_err(|e| Error::Usage(e.to_string()))?;
    pipeline
        .load_classifier(tables)
        .map_err(|e| Error::Usage(e.to_string()))?;
    let mut flows = Collector::default();
    let mut burst = Burst::default();
    let mut decisions = Vec::with_capacity(Burst::LEN);
    let mut opened = Vec::new();
    let mut run =
        |pipeline: &mut Pipeline, burst: &mut Burst, flows: &mut Collector| -> Result<(), Error> {
            decisions.clear();
            pipeline.process_burst(burst.link(), &burst.packets(), &mut decisions);
            opened.clear();
            let records: Vec<FeatureRecord> = pipeline.drain_records().collect();
            for r in records {
                if let Some(i) = flows.take(r)
                    && r.kind == RecordKind::Early
                {
                    opened.push(i);
                }
            }
            // A flow whose end came in the same drain is no longer on the NIC: a class
            // pushed by its tuple would land on whichever flow reopened it.
            opened.retain(|&i| flows.is_live(i));
            if !opened.is_empty() {
                on_early(pipeline, &mut flows.flows, &opened)?;
            }
            burst.clear();
            Ok(())
        };
    let capture_error = loop {
        let pkt = match reader.next_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break None,
            Err(e) => break Some(e),
        };
        if burst.is_full_for(pkt.link) {
            run(&mut pipeline, &mut burst, &mut flows)?;
        }
        burst.push(&pkt, pkt.ts_ns);
    };
    run(&mut pipeline, &mut burst, &mut flows)?;
    pipeline.flush();
    for r in pipeline.drain_records().collect::<Vec<_>>() {
        flows.take(r);
    }
    Ok((flows.flows, capture_error))
}

/// Header of `flowshard features`: the flow's addresses and packets, then the input
/// vector (which holds the protocol and both ports).
pub fn features_header() -> Vec<&'static str> {
    let mut h = vec!["client", "server", "packets"];
    h.extend(FEATURE_NAMES);
    h
}

/// `flowshard features`: one CSV row per flow of a capture with the profiler's input
/// vector of its first `packets` packets.
pub fn write_features(pcap: &Path, out: &Path, packets: u8) -> Result<usize, Error> {
    let config = PipelineConfig {
        feature_packets: packets,
        ..PipelineConfig::default()
    };
    let (flows, capture_error) = collect(pcap, &config, None, |_, _, _| Ok(()))?;
    let io = |source: std::io::Error| Error::Io {
        what: format!("writing {}", out.display()),
        source,
    };
    let mut w = csv::Writer::from_path(out).map_err(|e| io(e.into()))?;
    w.write_record(features_header())
        .map_err(|e| io(e.into()))?;
    for f in &flows {
        let mut row = vec![
            f.client().to_string(),
            f.server().to_string(),
            f.packets.to_string(),
        ];
        row.extend(features(&f.first).iter().map(u32::to_string));
        w.write_record(&row).map_err(|e| io(e.into()))?;
    }
    w.flush().map_err(io)?;
    match capture_error {
        Some(e) => Err(e.into()),
        None => Ok(flows.len()),
    }
}
