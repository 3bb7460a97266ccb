//! `flowshard bench agent`: the agent's memory and loop time with many tracked flows.
//!
//! The agent runs as the daemon runs it (in-process NIC, default image, real rings),
//! without the HTTP server. Each flow sends its first 8 packets back to back, so the
//! NIC emits its early feature record and the agent tracks it; then every tick offers
//! packets of established flows and times the whole tick (telemetry to apply, and
//! publishing the view). RSS is the process's, NIC model included; the tracked flows'
//! share is the growth from before the flows to after.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use hw_sim::generate::{FRAME_LEN, MAX_FLOWS, WIRE_LEN, write_frame};
use nic_firmware::LinkType;
use nic_firmware::pipeline::Packet;
use prometheus_client::registry::Registry;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use crate::Error;
use crate::agent::{Agent, Backend, View};
use crate::agent_config::AgentConfig;
use crate::metrics::LoopMetrics;

#[derive(Debug, Serialize)]
pub struct AgentBench {
    pub flows: u32,
    pub tracked_flows: usize,
    pub nic_active_flows: u32,
    /// The agent's flow table, computed from its capacity and entry size.
    pub flow_table_mib: f64,
    pub rss_start_mib: f64,
    pub rss_tracking_mib: f64,
    /// RSS growth per tracked flow (agent and NIC model together).
    pub bytes_per_flow: f64,
    pub ticks: u32,
    pub packets_per_tick: u32,
    pub tick_p50_ms: f64,
    pub tick_p99_ms: f64,
    pub tick_max_ms: f64,
    /// Ingest to apply, without publishing the view.
    pub stages_p50_ms: f64,
    /// Early records ingested per tick while the flows arrive.
    pub records_per_fill_tick: u32,
    /// A tick that ingests and tracks `records_per_fill_tick` new flows.
    pub fill_tick_p50_ms: f64,
    pub fill_tick_max_ms: f64,
    /// `/flows?top=100` over every tracked flow (answered on the loop's thread).
    pub top100_ms: f64,
}

/// Resident set size of this process, bytes.
fn rss() -> Result<u64, Error> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|source| Error::Io {
        what: "read /proc/self/status".into(),
        source,
    })?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| Error::Agent("/proc/self/status has no VmRSS".into()))
}

fn frame(flow: u32) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    write_frame(flow, &mut f);
    f
}

fn offer(
    model: &std::sync::Mutex<hw_sim::device::NicDevice>,
    frames: &[[u8; FRAME_LEN]],
    now: &mut u64,
) {
    let pkts: Vec<Packet<'_>> = frames
        .iter()
        .map(|d| {
            *now += 100;
            Packet {
                ts_ns: *now,
                data: d,
                wire_len: WIRE_LEN,
            }
        })
        .collect();
    let mut out = Vec::with_capacity(nic_firmware::pipeline::BURST);
    let mut dev = model.lock().unwrap_or_else(|e| e.into_inner());
    for burst in pkts.chunks(nic_firmware::pipeline::BURST) {
        dev.receive(LinkType::Ethernet, burst, &mut out);
        out.clear();
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// Track `flows` flows, then time `ticks` ticks of `packets_per_tick` packets each.
pub fn run(flows: u32, ticks: u32, packets_per_tick: u32) -> Result<AgentBench, Error> {
    if flows == 0 || flows > MAX_FLOWS {
        return Err(Error::Usage(format!("--flows must be 1..={MAX_FLOWS}")));
    }
    let mut cfg = AgentConfig::default();
    cfg.emulated.flows = 1;
    cfg.emulated.new_flows_per_tick = 0;
    cfg.emulated.packets_per_tick = 0;
    cfg.max_tracked_flows = cfg.max_tracked_flows.max(flows as usize);
    let model = Backend::emulated_nic(&cfg)?;
    let backend = Backend::InProcess(model.clone());
    let view = Arc::new(RwLock::new(View::default()));
    let metrics = LoopMetrics::register(&mut Registry::default(), view.clone());
    let mut agent = Agent::start(&cfg, backend, view.clone(), metrics)?;
    let rss_start = rss()?;
    let mut now = 0u64;
    // Fill: every flow's first 8 packets, in chunks the telemetry ring holds.
    let chunk = 16_384u32;
    let mut start = 0;
    let mut fill = Vec::new();
    while start < flows {
        let end = (start + chunk).min(flows);
        let frames: Vec<[u8; FRAME_LEN]> = (start..end)
            .flat_map(|f| std::iter::repeat_n(frame(f), 8))
            .collect();
        offer(&model, &frames, &mut now);
        let t = Instant::now();
        agent.tick()?;
        fill.push(t.elapsed().as_secs_f64() * 1e3);
        start = end;
    }
    fill.sort_by(f64::total_cmp);
    agent.tick()?;
    let tracked = agent.core().tracked_flows();
    let rss_tracking = rss()?;
    let t = Instant::now();
    let top = agent.core().top_flows(100);
    let top100_ms = t.elapsed().as_secs_f64() * 1e3;
    if top.len() != tracked.min(100) {
        return Err(Error::Agent(format!(
            "top 100 of {tracked} flows gave {}",
            top.len()
        )));
    }
    let mut rng = StdRng::seed_from_u64(1);
    let mut whole = Vec::with_capacity(ticks as usize);
    let mut stages = Vec::with_capacity(ticks as usize);
    for _ in 0..ticks {
        let frames: Vec<[u8; FRAME_LEN]> = (0..packets_per_tick)
            .map(|_| frame(rng.random_range(0..flows)))
            .collect();
        offer(&model, &frames, &mut now);
        let t = Instant::now();
        agent.tick()?;
        whole.push(t.elapsed().as_secs_f64() * 1e3);
        stages.push(agent.last_tick().total_s * 1e3);
    }
    whole.sort_by(f64::total_cmp);
    stages.sort_by(f64::total_cmp);
    let nic_active = view
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .flows_active_on_nic;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    Ok(AgentBench {
        flows,
        tracked_flows: tracked,
        nic_active_flows: nic_active,
        flow_table_mib: mib(agent.core().flow_table_bytes() as u64),
        rss_start_mib: mib(rss_start),
        rss_tracking_mib: mib(rss_tracking),
        bytes_per_flow: rss_tracking.saturating_sub(rss_start) as f64 / tracked.max(1) as f64,
        ticks,
        packets_per_tick,
        tick_p50_ms: quantile(&whole, 0.5),
        tick_p99_ms: quantile(&whole, 0.99),
        tick_max_ms: whole.last().copied().unwrap_or(0.0),
        stages_p50_ms: quantile(&stages, 0.5),
        records_per_fill_tick: chunk,
        fill_tick_p50_ms: quantile(&fill, 0.5),
        fill_tick_max_ms: fill.last().copied().unwrap_or(0.0),
        top100_ms,
    })
}

/// `flowshard bench agent`: run and print, as text or one JSON object.
pub fn report(flows: u32, ticks: u32, packets_per_tick: u32, json: bool) -> Result<(), Error> {
    let r = run(flows, ticks, packets_per_tick)?;
    crate::print_report(&r, json, |r| {
        format!(
            "agent: {} flows tracked ({} on the NIC)\n  flow table {:.1} MiB; process RSS {:.1} MiB before the flows, {:.1} MiB with them ({:.0} B per flow, NIC model included)\n  tick with {} packets offered: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms over {} ticks (stages alone p50 {:.3} ms)\n  tick ingesting {} new flows' records: p50 {:.3} ms, max {:.3} ms\n  top 100 of all tracked flows: {:.1} ms",
            r.tracked_flows,
            r.nic_active_flows,
            r.flow_table_mib,
            r.rss_start_mib,
            r.rss_tracking_mib,
            r.bytes_per_flow,
            r.packets_per_tick,
            r.tick_p50_ms,
            r.tick_p99_ms,
            r.tick_max_ms,
            r.ticks,
            r.stages_p50_ms,
            r.records_per_fill_tick,
            r.fill_tick_p50_ms,
            r.fill_tick_max_ms,
            r.top100_ms
        )
    })
}
