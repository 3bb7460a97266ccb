//! `flowshard bench dataplane`: the whole fast path — parse, Toeplitz hash,
//! connection-table lookup/insert, steering, counters — on synthetic 64-byte TCP frames
//! held in memory, with a connection table already holding every flow.
//!
//! `--repeat` times the same packet count several times over the one warmed table and
//! reports the median and the best run: on a shared machine one run can be a third
//! slower than the next, and repeating costs none of the set-up (filling a million
//! flows, generating the frames) again.

use std::time::Instant;

use hw_sim::generate::{FrameWindow, Popularity, WIRE_LEN};
use nic_firmware::pipeline::{Decision, Packet};
use nic_firmware::{LinkType, Pipeline, PipelineConfig, Verdict};
use serde::Serialize;

use crate::Error;

/// Packets handed to the data plane per call, as a NIC's RX ring hands them over.
const CHUNK: usize = 256;
/// Largest window of distinct frames; longer runs go round it again.
const MAX_WINDOW: usize = 1 << 22;
/// Synthetic arrival spacing: 40 ns, i.e. 25 Mpps of NIC time.
const SPACING_NS: u64 = 40;

/// What the benchmark measured.
#[derive(Debug, Serialize)]
pub struct DataplaneReport {
    pub flows: u32,
    /// Packets per timed run.
    pub packets: u64,
    pub popularity: String,
    /// Whether about half the packets were replies (`--two-way`).
    pub two_way: bool,
    /// Median over the runs (the upper one of an even count).
    pub ns_per_packet: f64,
    pub mpps: f64,
    /// The fastest run.
    pub best_ns_per_packet: f64,
    pub best_mpps: f64,
    /// Every run's ns/packet, in order.
    pub runs_ns_per_packet: Vec<f64>,
    /// Connection-table memory (entries and tags) per flow of capacity.
    pub bytes_per_flow: f64,
    /// Size of one flow entry.
    pub entry_bytes: usize,
    pub table_bytes: usize,
    pub table_capacity: u32,
    pub active_flows: u32,
    pub evictions: u64,
    /// Packets forwarded over all runs.
    pub forwarded: u64,
}

/// Run the benchmark.
pub fn dataplane(
    flows: u32,
    packets: u64,
    zipf: Option<f64>,
    seed: u64,
    repeat: u32,
    two_way: bool,
) -> Result<DataplaneReport, Error> {
    if packets == 0 {
        return Err(Error::Usage("--packets must be at least 1".into()));
    }
    if repeat == 0 {
        return Err(Error::Usage("--repeat must be at least 1".into()));
    }
    let popularity = match zipf {
        Some(s) => Popularity::Zipf(s),
        None => Popularity::Uniform,
    };
    let config = PipelineConfig {
        flow_capacity: PipelineConfig::default().flow_capacity.max(flows),
        ..PipelineConfig::default()
    };
    let mut pipeline = Pipeline::new(&config).map_err(|e| Error::Usage(e.to_string()))?;
    let warm = FrameWindow::every_flow(flows).map_err(Error::Usage)?;
    let window_len = usize::try_from(packets)
        .unwrap_or(usize::MAX)
        .min(MAX_WINDOW);
    let window = FrameWindow::new(flows, window_len, popularity, seed).map_err(Error::Usage)?;
    let window = if two_way {
        window.with_replies(seed)
    } else {
        window
    };
    let mut out: Vec<Decision> = Vec::with_capacity(CHUNK);
    let mut pkts: Vec<Packet> = Vec::with_capacity(CHUNK);
    let mut ts = 0u64;
    for start in (0..warm.len()).step_by(CHUNK) {
        pkts.clear();
        for i in start..(start + CHUNK).min(warm.len()) {
            ts += SPACING_NS;
            pkts.push(Packet {
                ts_ns: ts,
                data: warm.frame(i),
                wire_len: WIRE_LEN,
            });
        }
        out.clear();
        pipeline.process_burst(LinkType::Ethernet, &pkts, &mut out);
        pipeline.drain_records().for_each(drop);
    }
    let forwarded_before = pipeline.counters().verdict(Verdict::Forward);
    let mut at = 0usize;
    let mut runs = Vec::with_capacity(repeat as usize);
    for _ in 0..repeat {
        let began = Instant::now();
        let mut done = 0u64;
        while done < packets {
            let n = (packets - done).min(CHUNK as u64) as usize;
            pkts.clear();
            for _ in 0..n {
                ts += SPACING_NS;
                pkts.push(Packet {
                    ts_ns: ts,
                    data: window.frame(at),
                    wire_len: WIRE_LEN,
                });
                at += 1;
                if at == window.len() {
                    at = 0;
                }
            }
            out.clear();
            pipeline.process_burst(LinkType::Ethernet, &pkts, &mut out);
            pipeline.drain_records().for_each(drop);
            done += n as u64;
        }
        runs.push(began.elapsed().as_secs_f64() * 1e9 / packets as f64);
    }
    let mut sorted = runs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let best = sorted[0];
    let table = pipeline.table();
    Ok(DataplaneReport {
        flows,
        packets,
        popularity: match popularity {
            Popularity::Uniform => "uniform".into(),
            Popularity::Zipf(s) => format!("zipf {s}"),
        },
        two_way,
        ns_per_packet: median,
        mpps: 1e3 / median,
        best_ns_per_packet: best,
        best_mpps: 1e3 / best,
        runs_ns_per_packet: runs,
        bytes_per_flow: table.memory_bytes() as f64 / f64::from(table.capacity()),
        entry_bytes: nic_firmware::conntable::ENTRY_BYTES,
        table_bytes: table.memory_bytes(),
        table_capacity: table.capacity(),
        active_flows: table.len(),
        evictions: pipeline.counters().flows_evicted,
        forwarded: pipeline.counters().verdict(Verdict::Forward) - forwarded_before,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_packet_is_forwarded_and_flows_stay_tracked() {
        let r = dataplane(10_000, 50_000, Some(1.1), 3, 1, false).unwrap();
        assert_eq!(r.forwarded, 50_000);
        assert_eq!(r.active_flows, 10_000);
        assert_eq!(r.evictions, 0);
        assert_eq!(r.entry_bytes, 64);
        assert!(r.ns_per_packet > 0.0 && r.mpps > 0.0);
        assert_eq!(r.runs_ns_per_packet, [r.ns_per_packet]);
        assert!(dataplane(10, 0, None, 1, 1, false).is_err());
        assert!(dataplane(0, 10, None, 1, 1, false).is_err());
        assert!(dataplane(10, 10, None, 1, 0, false).is_err());
    }

    #[test]
    fn repeated_runs_report_their_median_and_best() {
        let r = dataplane(1_000, 20_000, None, 5, 4, true).unwrap();
        assert_eq!(r.forwarded, 80_000);
        // Replies find their flows: none is created or lost.
        assert!(r.two_way);
        assert_eq!(r.active_flows, 1_000);
        assert_eq!(r.runs_ns_per_packet.len(), 4);
        let mut sorted = r.runs_ns_per_packet.clone();
        sorted.sort_by(f64::total_cmp);
        assert_eq!(r.best_ns_per_packet, sorted[0]);
        assert_eq!(r.ns_per_packet, sorted[2]);
        assert!((r.best_mpps * r.best_ns_per_packet - 1e3).abs() < 1e-6);
    }
}
