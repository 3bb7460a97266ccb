//! `/metrics`: the agent's view in Prometheus/OpenMetrics text, every name prefixed
//! `flowshard_`.
//!
//! The per-node, shard and class series are read from the view the loop published at
//! the end of its last tick, when a scrape comes (a [`Collector`]), so a scrape shows
//! one consistent tick and costs the loop nothing. The loop's own timings are
//! histograms it observes as it runs.

use std::sync::{Arc, RwLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::agent::View;

/// What the loop itself records.
#[derive(Debug)]
pub struct LoopMetrics {
    /// One tick of the stages, telemetry to apply.
    pub loop_seconds: Histogram,
    /// The in-process NIC's synthetic traffic of one tick (not part of the loop).
    pub traffic_seconds: Histogram,
    /// The forecast stage of one tick (samples in, this tick's share of refits).
    pub forecast_seconds: Histogram,
    /// A shard migration: submit to the NIC's commit acknowledgement, plus handoffs.
    pub migration_seconds: Histogram,
    /// Command batches the NIC committed.
    pub batches: Counter,
}

impl LoopMetrics {
    /// Create the loop's metrics and register them, with the view's collector.
    pub fn register(registry: &mut Registry, view: Arc<RwLock<View>>) -> Arc<LoopMetrics> {
        let m = Arc::new(LoopMetrics {
            loop_seconds: Histogram::new(exponential_buckets(1e-5, 4.0, 12)),
            traffic_seconds: Histogram::new(exponential_buckets(1e-5, 4.0, 12)),
            forecast_seconds: Histogram::new(exponential_buckets(1e-5, 4.0, 12)),
            migration_seconds: Histogram::new(exponential_buckets(1e-5, 4.0, 12)),
            batches: Counter::default(),
        });
        let r = registry.sub_registry_with_prefix("flowshard");
        r.register(
            "loop_duration_seconds",
            "One control-loop tick: ingest, profile, forecast, plan, apply",
            m.loop_seconds.clone(),
        );
        r.register(
            "forecast_duration_seconds",
            "The forecast stage of one tick: samples in, its share of refits",
            m.forecast_seconds.clone(),
        );
        r.register(
            "migration_duration_seconds",
            "A shard migration, from submitting its batch to the NIC's commit acknowledgement, plus its flows' handoffs",
            m.migration_seconds.clone(),
        );
        r.register(
            "synthetic_traffic_duration_seconds",
            "Offering one tick of synthetic traffic to the in-process NIC",
            m.traffic_seconds.clone(),
        );
        r.register(
            "command_batches",
            "Command batches the NIC committed",
            m.batches.clone(),
        );
        r.register_collector(Box::new(ViewCollector { view }));
        m
    }
}

#[derive(Debug)]
struct ViewCollector {
    view: Arc<RwLock<View>>,
}

/// Write one metric family: `series` of (labels, value).
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> Result<(), std::fmt::Error> {
    let mut series = series.into_iter().peekable();
    let Some(first) = series.peek() else {
        return Ok(());
    };
    let ty = first.1.metric_type();
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in series {
        v.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge(v: f64) -> ConstGauge<f64> {
    ConstGauge::new(v)
}

impl Collector for ViewCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let v = self.view.read().unwrap_or_else(|e| e.into_inner()).clone();
        let e = &mut enc;
        let node = |id: u16| vec![("node", id.to_string())];
        let shard = |id: u16| vec![("shard", id.to_string())];
        let class = |c: &str| vec![("class", c.to_string())];
        let ns = &v.nodes;
        family(
            e,
            "node_packets",
            "Packets steered to the node",
            ns.iter().map(|n| (node(n.id), counter(n.traffic.packets))),
        )?;
        family(
            e,
            "node_bytes",
            "IP bytes steered to the node",
            ns.iter().map(|n| (node(n.id), counter(n.traffic.bytes))),
        )?;
        family(
            e,
            "node_flows",
            "Flows placed on the node",
            ns.iter().map(|n| (node(n.id), counter(n.traffic.flows))),
        )?;
        family(
            e,
            "node_active_flows",
            "Flows pinned to the node now",
            ns.iter()
                .map(|n| (node(n.id), gauge(n.active_flows as f64))),
        )?;
        family(
            e,
            "node_load_gbps",
            "Measured load of the node, Gbit/s",
            ns.iter().map(|n| (node(n.id), gauge(n.load_gbps))),
        )?;
        family(
            e,
            "node_forecast_gbps",
            "Forecast load of the node, Gbit/s",
            ns.iter().map(|n| (node(n.id), gauge(n.forecast_gbps))),
        )?;
        family(
            e,
            "node_capacity_gbps",
            "Configured capacity of the node, Gbit/s",
            ns.iter().map(|n| (node(n.id), gauge(n.capacity_gbps))),
        )?;
        family(
            e,
            "node_cpu_busy_ratio",
            "Busy share of the node's CPUs, from its endpoint",
            ns.iter()
                .filter_map(|n| Some((node(n.id), gauge(n.cpu_busy?)))),
        )?;
        family(
            e,
            "node_memory_used_ratio",
            "Used share of the node's memory, from its endpoint",
            ns.iter()
                .filter_map(|n| Some((node(n.id), gauge(n.memory_used?)))),
        )?;
        family(
            e,
            "node_weight",
            "Placement weight of the node",
            ns.iter().map(|n| (node(n.id), gauge(f64::from(n.weight)))),
        )?;
        family(
            e,
            "node_shards",
            "Shards placed on the node",
            ns.iter().map(|n| (node(n.id), gauge(f64::from(n.shards)))),
        )?;
        let state = |n: &crate::agent::NodeView, s: nic_firmware::config::NodeState| {
            let mut l = node(n.id);
            l.push(("state", format!("{s:?}").to_lowercase()));
            (l, gauge(if n.state == s { 1.0 } else { 0.0 }))
        };
        use nic_firmware::config::NodeState::{Active, Down, Draining};
        family(
            e,
            "node_state",
            "1 for the node's current state",
            ns.iter()
                .flat_map(|n| [state(n, Active), state(n, Draining), state(n, Down)]),
        )?;
        let ss = &v.shards;
        family(
            e,
            "shard_packets",
            "Packets steered through the shard",
            ss.iter().map(|s| (shard(s.id), counter(s.traffic.packets))),
        )?;
        family(
            e,
            "shard_bytes",
            "IP bytes steered through the shard",
            ss.iter().map(|s| (shard(s.id), counter(s.traffic.bytes))),
        )?;
        family(
            e,
            "shard_flows",
            "Flows created in the shard",
            ss.iter().map(|s| (shard(s.id), counter(s.traffic.flows))),
        )?;
        family(
            e,
            "shard_node",
            "Node the shard is placed on",
            ss.iter().map(|s| (shard(s.id), gauge(f64::from(s.node)))),
        )?;
        let cs = &v.classes;
        family(
            e,
            "class_packets",
            "Packets of flows of the class",
            cs.iter()
                .map(|c| (class(c.class), counter(c.traffic.packets))),
        )?;
        family(
            e,
            "class_bytes",
            "IP bytes of flows of the class",
            cs.iter()
                .map(|c| (class(c.class), counter(c.traffic.bytes))),
        )?;
        family(
            e,
            "class_flows",
            "Flows of the class created",
            cs.iter()
                .map(|c| (class(c.class), counter(c.traffic.flows))),
        )?;
        family(
            e,
            "class_tracked_flows",
            "Flows of the class the agent tracks",
            cs.iter()
                .map(|c| (class(c.class), gauge(c.tracked_flows as f64))),
        )?;
        let r = &v.rings;
        let ring = |name: &'static str, x: f64| (vec![("ring", name.to_string())], gauge(x));
        family(
            e,
            "ring_entries",
            "Size of the ring, entries",
            [
                ring("command", r.command_entries.into()),
                ring("telemetry", r.telemetry_entries.into()),
            ],
        )?;
        family(
            e,
            "ring_occupancy",
            "Entries waiting in the ring",
            [ring("telemetry", r.telemetry_occupancy.into())],
        )?;
        family(
            e,
            "telemetry_overflow",
            "Telemetry entries lost to a full ring",
            [(vec![], counter(r.telemetry_overflow.into()))],
        )?;
        family(
            e,
            "telemetry_unreadable",
            "Telemetry entries this agent cannot read",
            [(vec![], counter(r.telemetry_unreadable))],
        )?;
        family(
            e,
            "command_errors",
            "Command descriptors the NIC refused",
            [(vec![], counter(r.command_errors.into()))],
        )?;
        family(
            e,
            "tracked_flows",
            "Flows the agent tracks",
            [(vec![], gauge(v.tracked_flows as f64))],
        )?;
        family(
            e,
            "untracked_flows",
            "Flows not tracked: max_tracked_flows reached",
            [(vec![], counter(v.untracked_flows))],
        )?;
        family(
            e,
            "nic_active_flows",
            "Flows in the NIC's connection table",
            [(vec![], gauge(v.flows_active_on_nic.into()))],
        )?;
        family(
            e,
            "migrations",
            "Shards moved to another node, by why",
            crate::agent::Reason::ALL.iter().map(|r| {
                (
                    vec![("reason", r.as_str().to_string())],
                    counter(v.migrations_total.get(r.as_str()).copied().unwrap_or(0)),
                )
            }),
        )?;
        family(
            e,
            "migration_flows_handed_off",
            "Established flows handed off to their shard's new node",
            [(vec![], counter(v.flows_handed_off_total))],
        )?;
        family(
            e,
            "migration_state_bytes",
            "Connection state handed off with those flows, bytes",
            [(vec![], counter(v.state_bytes_handed_off_total))],
        )?;
        family(
            e,
            "planner_decisions",
            "Planner decisions that changed something (applied, or observe-only recorded)",
            [(vec![], counter(v.decisions_total))],
        )?;
        family(
            e,
            "planner_policy",
            "1 for the planner's policy",
            crate::planner::Policy::ALL.iter().map(|p| {
                (
                    vec![("policy", p.as_str().to_string())],
                    gauge(if p.as_str() == v.policy { 1.0 } else { 0.0 }),
                )
            }),
        )?;
        family(
            e,
            "forecast_refits",
            "Series refitted by the forecast stage",
            [(vec![], counter(v.forecast.refits_total))],
        )?;
        let l = &v.loop_;
        let stage = |s: &'static str, x: f64| (vec![("stage", s.to_string())], gauge(x));
        family(
            e,
            "stage_last_duration_seconds",
            "Duration of each stage in the last tick",
            [
                stage("ingest", l.ingest_s),
                stage("profile", l.profile_s),
                stage("forecast", l.forecast_s),
                stage("plan", l.plan_s),
                stage("apply", l.apply_s),
            ],
        )?;
        Ok(())
    }
}

/// The registry in OpenMetrics text (which Prometheus' text parser also reads).
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}
