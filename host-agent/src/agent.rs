//! The agent daemon: opens the NIC, adopts the tables it finds, and runs the control
//! loop until told to stop.
//!
//! Every tick the loop runs these stages, each over explicit inputs:
//!
//! 1. **ingest** — drain the telemetry ring: counter snapshots update the node, shard
//!    and class view; feature records go to the profiler.
//! 2. **profile** — track flows from their records (early, interim, end). For now the
//!    class is the NIC's port-rule class: the ONNX profiler replaces this stage.
//! 3. **forecast** — packets/s, bytes/s and new flows/s per class, node and shard into
//!    the forecaster's bounded histories; a share of the series refitted each tick
//!    ([`crate::agent_forecast`]).
//! 4. **plan** — silence detection, then [`Planner::decide`] under the configured
//!    policy over measured load, node capacities and (predictive) the forecasts' upper
//!    bounds: node power states, shard moves, class groups, flows to hand off. Nodes
//!    an operator holds (drained, down) are out of the planner's hands; operators'
//!    requests are applied at once, outside the tick, and the planner goes on from
//!    the tables they leave. Observe-only, decisions are recorded and nothing changes.
//! 5. **rebalance** — the difference between the plan and the committed tables, as
//!    command descriptors.
//! 6. **apply** — one command batch: the NIC applies it in one epoch or not at all;
//!    then, with `migration.hand_off`, the long-lived flows the planner wants off
//!    their nodes are handed to their shards' new nodes (`HandOffFlows`).
//!
//! [`Core`] holds the stages and their shared state and does no I/O; [`Agent`] drives
//! it against a device. On start the agent reads the device's tables back and adopts
//! them, so restarting it changes no steering. When it stops the NIC keeps steering
//! with its last committed tables (fail-static).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use hdl_bindings::ring::{CmdDesc, Opcode, Scope, Status};
use hdl_bindings::telemetry::{FeatureRecord, FlowId, RecordKind, ip_addr};
use hw_sim::device::{NicDevice, TelemetryItem};
use hw_sim::dma::EventFd;
use hw_sim::generate::{FRAME_LEN, MAX_FLOWS, WIRE_LEN, write_frame};
use nic_firmware::config::NodeState;
use nic_firmware::pipeline::Packet;
use nic_firmware::{Class, LinkType};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use crate::agent_config::{AgentConfig, DeviceSpec, MigrationSettings};
use crate::agent_forecast::{Done, ForecastStage, Job, SeriesView};
use crate::device::{Device, DeviceError, InProcess, Vfio, VfioUser};
use crate::driver::{Nic, NicError, Tables};
use crate::forecast::{Metric, Scope as FcScope};
use crate::metrics::LoopMetrics;
use crate::node_metrics::{NodeSample, Report};
use crate::planner::{
    Actions, Inputs, NodeInput, Planner, PlannerConfig, Policy, Power, ShardMove,
};

/// Longest the agent waits for a vfio-user server to answer its connection.
const VFIO_USER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Migrations kept for `/migrations`.
const MIGRATION_LOG: usize = 1_000;

/// Why a shard moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// An operator asked for it: `POST /migrations`, or a node's state or weight set
    /// through the API.
    Operator,
    /// Its node stopped answering (or receiving traffic): the planner marked it failed.
    Failure,
    /// Its node's measured load was above `planner.high_utilisation`.
    Overload,
    /// Its node queued or dropped packets its load does not explain.
    Degradation,
    /// The planner changed how many nodes serve: its node is draining, or it went to a
    /// node that just became active.
    Scale,
    /// The predictive policy moved it ahead of the load its forecast expects.
    Forecast,
    /// The planner spread load with no single trigger to name.
    Rebalance,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::Operator,
        Reason::Failure,
        Reason::Overload,
        Reason::Degradation,
        Reason::Scale,
        Reason::Forecast,
        Reason::Rebalance,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Operator => "operator",
            Reason::Failure => "failure",
            Reason::Overload => "overload",
            Reason::Degradation => "degradation",
            Reason::Scale => "scale",
            Reason::Forecast => "forecast",
            Reason::Rebalance => "rebalance",
        }
    }
}

/// A shard placed on another node. New flows of the shard follow it at once;
/// established flows stay pinned to their node by the NIC's connection table until
/// they end, unless they are handed off (`migration.hand_off`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Migration {
    pub id: u64,
    pub shard: u16,
    pub from: u16,
    pub to: u16,
    pub reason: Reason,
    pub nic_time_ns: u64,
    pub unix_ms: u64,
    /// Established flows of the shard handed off to `to` (`HandOffFlows`), so far.
    pub flows_handed_off: u64,
    /// Connection state those flows carried over: `migration.state_bytes_per_flow`
    /// per flow, since the nodes' own transfer is outside the agent's sight.
    pub state_bytes: u64,
    /// From submitting the batch to the NIC's commit acknowledgement, plus the
    /// handoffs' own batches.
    pub duration_ms: f64,
}

/// Traffic counters of a node, shard or class, as the NIC last reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub flows: u64,
}

/// One node as the agent sees it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeView {
    pub id: u16,
    pub state: NodeState,
    pub weight: u32,
    pub capacity_gbps: f64,
    /// Measured load, Gbit/s, over the last two counter snapshots.
    pub load_gbps: f64,
    /// Forecast load, Gbit/s.
    pub forecast_gbps: f64,
    pub shards: u32,
    pub active_flows: u64,
    #[serde(flatten)]
    pub traffic: Traffic,
    /// Why the agent marked the node down, if it did.
    pub down_reason: Option<String>,
    /// The planner's state of the node. `warming` and `off` are decisions to start or
    /// stop the machine, which the agent only logs: powering nodes is outside it.
    pub power: Power,
    /// The state an operator holds the node in (`drain`, `down`) until `up`: the
    /// planner leaves such a node alone.
    pub held: Option<NodeState>,
    /// Share of received packets the node dropped over its last two scrapes
    /// (node_exporter's `node_network_receive_drop_total`); only for nodes with a
    /// `metrics_url`. The NIC counts no per-node drops, and no source gives the
    /// node's queueing delay, so the planner's delay trigger gets 0.
    pub drop_rate: Option<f64>,
    /// `nic` (counter snapshots) or `prometheus` (the node's endpoint).
    pub load_source: &'static str,
    /// From the node's endpoint: busy share of its CPUs, used share of its memory.
    pub cpu_busy: Option<f64>,
    pub memory_used: Option<f64>,
    pub scrape_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShardView {
    pub id: u16,
    pub node: u16,
    pub buckets: u32,
    #[serde(flatten)]
    pub traffic: Traffic,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassView {
    pub class: &'static str,
    /// Flows of the class the agent tracks now.
    pub tracked_flows: u64,
    #[serde(flatten)]
    pub traffic: Traffic,
}

/// Occupancy and losses of the rings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RingView {
    pub command_entries: u32,
    pub command_epoch: u32,
    pub command_errors: u32,
    pub telemetry_entries: u32,
    /// Entries waiting in the telemetry ring when the loop last looked.
    pub telemetry_occupancy: u32,
    pub telemetry_overflow: u32,
    /// Entries of a kind or layout this agent cannot read.
    pub telemetry_unreadable: u64,
    /// Records lost by the NIC's own queue before reaching the ring.
    pub records_overflow: u64,
}

/// Duration of each stage in the last tick, seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LoopView {
    pub ticks: u64,
    /// Refits the forecast stage took back in this tick.
    pub refits: u64,
    pub ingest_s: f64,
    pub profile_s: f64,
    pub forecast_s: f64,
    pub plan_s: f64,
    pub apply_s: f64,
    pub total_s: f64,
}

/// What the API and `/metrics` show: a copy made at the end of every tick.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct View {
    pub device: String,
    pub image_version: u32,
    pub nic_time_ns: u64,
    pub flows_active_on_nic: u32,
    pub tracked_flows: u64,
    /// Records of flows not tracked because `max_tracked_flows` was reached.
    pub untracked_flows: u64,
    pub nodes: Vec<NodeView>,
    pub shards: Vec<ShardView>,
    pub classes: Vec<ClassView>,
    pub migrations: Vec<Migration>,
    pub migrations_total: BTreeMap<&'static str, u64>,
    pub flows_handed_off_total: u64,
    pub state_bytes_handed_off_total: u64,
    pub policy: &'static str,
    pub observe_only: bool,
    pub forecast: ForecastView,
    /// The planner's latest decisions that changed something, newest last.
    pub decisions: Vec<Decision>,
    pub decisions_total: u64,
    pub rings: RingView,
    #[serde(rename = "loop")]
    pub loop_: LoopView,
}

/// The forecast stage as the API shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ForecastView {
    /// The loop's tick the forecasts are read at: a series' next step is
    /// `tick - made_at_tick` into its forecast.
    pub tick: u64,
    pub level: f64,
    pub horizon: usize,
    pub refit_ticks: u64,
    pub refits_total: u64,
    pub series: Vec<SeriesView>,
}

/// A shard move the planner decided, with why.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PlannedMove {
    pub shard: u16,
    pub from: u16,
    pub to: u16,
    pub reason: Reason,
}

/// One planner decision that changed something, applied or (observe-only) not.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    pub tick: u64,
    pub nic_time_ns: u64,
    pub policy: &'static str,
    pub applied: bool,
    pub power: Vec<(u16, Power)>,
    pub moves: Vec<PlannedMove>,
    pub groups: Vec<(&'static str, u8)>,
    pub hand_off_from: Vec<u16>,
    pub reasons: Vec<String>,
    /// Later ticks that decided the same again (observe-only, nothing changes, so the
    /// planner repeats itself): counted here rather than logged again.
    pub repeats: u64,
}

/// A flow tracked from its feature records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct TrackedFlow {
    pub node: u16,
    pub shard: u16,
    /// Class index; shown by name in [`FlowView`].
    #[serde(skip)]
    pub class: u8,
    pub proto: u8,
    /// The record's address family: an IPv6 address may have any bytes zero, so the
    /// family cannot be told from the addresses.
    pub ipv6: bool,
    pub first_ts_ns: u64,
    pub last_ts_ns: u64,
    pub packets: u32,
    pub bytes: u64,
}

/// A tracked flow as `/flows` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowView {
    pub client: String,
    pub server: String,
    pub class: &'static str,
    #[serde(flatten)]
    pub flow: TrackedFlow,
}

fn addr(a: &[u8; 16], v6: bool, port: u16) -> String {
    std::net::SocketAddr::new(ip_addr(a, v6), port).to_string()
}

fn class_name(i: u8) -> &'static str {
    Class::from_index(i).map_or("unclassified", Class::as_str)
}

/// An operator's request, answered by the loop.
#[derive(Debug)]
pub enum Request {
    SetState(u16, NodeState),
    SetWeight(u16, u32),
    Migrate {
        shard: u16,
        node: u16,
    },
    TopFlows(usize),
    /// What a scrape of a node's endpoint gave: node id, result.
    NodeReport(u16, Report),
    /// Finish the loop: the NIC keeps its committed tables.
    Stop,
}

/// The loop's answer to a [`Request`].
#[derive(Debug)]
pub enum Reply {
    Done(Vec<Migration>),
    Flows(Vec<FlowView>),
}

/// A request the loop refuses, and whether the fault is the caller's.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    NotFound(String),
    Invalid(String),
    Conflict(String),
    Device(String),
}

pub type Answer = tokio::sync::oneshot::Sender<Result<Reply, Refusal>>;

/// Planner decisions kept for `/decisions`.
const DECISION_LOG: usize = 200;

/// Per-node state of the core.
#[derive(Clone, Debug)]
struct Node {
    /// The state committed on the NIC.
    state: NodeState,
    /// The state an operator holds the node in, until `up`.
    held: Option<NodeState>,
    weight: u32,
    capacity_gbps: f64,
    traffic: Traffic,
    active_flows: u64,
    load_gbps: f64,
    forecast_gbps: f64,
    /// NIC time of the snapshot that first showed the node's current packet count.
    progress_ns: Option<u64>,
    /// The agent found the node silent: the planner marks it failed.
    silent: bool,
    down_reason: Option<String>,
    /// The node's Prometheus endpoint, if its load comes from one.
    metrics_url: Option<String>,
    /// Agent clock (ms) of the endpoint's last answer, and the sample it gave.
    answered: Option<(u64, NodeSample)>,
    scrape_error: Option<String>,
    cpu_busy: Option<f64>,
    memory_used: Option<f64>,
    drop_rate: Option<f64>,
}

/// Counters as the forecast stage last sampled them, to turn the next ones into rates.
#[derive(Debug, Default)]
struct Sampled {
    ns: u64,
    nodes: BTreeMap<u16, Traffic>,
    shards: Vec<Traffic>,
    classes: [Traffic; Class::COUNT + 1],
    /// The rates of the last two snapshots, fed again on ticks that brought none.
    rates: Vec<(FcScope, Metric, f64)>,
}

/// The control loop's state and stages, without I/O.
#[derive(Debug)]
pub struct Core {
    tables: Tables,
    nodes: BTreeMap<u16, Node>,
    shards: Vec<Traffic>,
    /// Buckets per shard: the agent never changes the bucket table, so this is
    /// counted once, when the tables are adopted.
    buckets: Vec<u32>,
    classes: [Traffic; Class::COUNT + 1],
    device: Traffic,
    device_progress_ns: Option<u64>,
    snapshot_ns: u64,
    previous_snapshot_ns: u64,
    flows: HashMap<FlowId, TrackedFlow>,
    /// Tracked flows per class index, kept as flows come and go so a tick need not
    /// walk the flow table.
    tracked_by_class: [u64; Class::COUNT + 1],
    max_flows: usize,
    untracked: u64,
    unreadable: u64,
    migrations: VecDeque<Migration>,
    migrations_total: BTreeMap<&'static str, u64>,
    next_migration: u64,
    down_after_ns: u64,
    planner: Planner,
    observe_only: bool,
    /// `planner.high_utilisation`: above it a node's moves are for overload.
    high_utilisation: f64,
    /// Loop ticks so far: the planner's and the forecasts' clock.
    tick: u64,
    forecasts: ForecastStage,
    refit_ticks: u64,
    sampled: Sampled,
    /// Measured load per shard and per class (by index), Gbit/s: the planner's units
    /// are those of the nodes' capacities.
    shard_gbps: Vec<f64>,
    class_gbps: Vec<f64>,
    decisions: VecDeque<Decision>,
    decisions_total: u64,
    state_bytes_per_flow: u64,
    handed_off_total: u64,
    state_bytes_total: u64,
}

/// What the plan stage wants the tables to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub node_states: BTreeMap<u16, NodeState>,
    pub shard_node: Vec<u16>,
    /// Class groups to set (flowlet sharding over that many shards).
    pub groups: Vec<(Class, u8)>,
    /// Why each shard that moves does; a move not listed is an operator's.
    pub reasons: BTreeMap<u16, Reason>,
    /// Nodes whose long-lived flows should follow their shards.
    pub hand_off_from: Vec<u16>,
}

/// What a decision's power state means for the NIC: only an active node takes new
/// flows; a warming or draining one keeps what it has (none, for a warming node); an
/// off or failed one is down, so the NIC remaps the flows it still had.
pub fn nic_state(p: Power) -> NodeState {
    match p {
        Power::Active => NodeState::Active,
        Power::Warming { .. } | Power::Draining => NodeState::Draining,
        Power::Off | Power::Failed => NodeState::Down,
    }
}

const GBPS: f64 = 8.0 / 1e9;

impl Core {
    /// Adopt the tables read back from the device. A node the NIC does not have
    /// active is held in its state, as an operator's hold: the agent cannot tell an
    /// operator's drain from anything else after a restart, and a restart changes no
    /// steering.
    pub fn new(tables: Tables, cfg: &AgentConfig) -> Core {
        let nodes: BTreeMap<u16, Node> = tables
            .nodes
            .iter()
            .map(|n| {
                let node = Node {
                    state: n.state,
                    held: (n.state != NodeState::Active).then_some(n.state),
                    weight: n.weight,
                    capacity_gbps: cfg.capacity_gbps(n.id),
                    traffic: Traffic::default(),
                    active_flows: 0,
                    load_gbps: 0.0,
                    forecast_gbps: 0.0,
                    progress_ns: None,
                    silent: false,
                    down_reason: None,
                    metrics_url: cfg
                        .nodes
                        .iter()
                        .find(|s| s.id == n.id)
                        .and_then(|s| s.metrics_url.clone()),
                    answered: None,
                    scrape_error: None,
                    cpu_busy: None,
                    memory_used: None,
                    drop_rate: None,
                };
                (n.id, node)
            })
            .collect();
        let mut buckets = vec![0u32; tables.shard_node.len()];
        for s in &tables.bucket_shard {
            if let Some(b) = buckets.get_mut(usize::from(*s)) {
                *b += 1;
            }
        }
        let ids = nodes.keys().next_back().map_or(0, |m| usize::from(*m) + 1);
        let power = (0..ids)
            .map(|id| match nodes.get(&(id as u16)) {
                Some(n) if n.held.is_none() => Power::Active,
                _ => Power::Failed,
            })
            .collect();
        let warmup_ticks = cfg.node_warmup_ms.div_ceil(cfg.tick_ms);
        let planner = Planner::new(
            cfg.policy,
            PlannerConfig {
                max_active: cfg.planner.max_active.min(nodes.len()),
                ..cfg.planner.clone()
            },
            warmup_ticks,
            power,
            tables.shard_node.clone(),
        );
        let f = &cfg.forecast;
        // The predictive policy reads the forecast a warm-up and two ticks ahead, from
        // a forecast up to a refit interval (plus the scale-down window) old.
        let horizon =
            (warmup_ticks as usize + f.refit_ticks as usize + cfg.planner.scale_down_window + 2)
                .min(f.history);
        Core {
            shards: vec![Traffic::default(); tables.shard_node.len()],
            shard_gbps: vec![0.0; tables.shard_node.len()],
            class_gbps: vec![0.0; Class::COUNT],
            buckets,
            tables,
            nodes,
            classes: Default::default(),
            device: Traffic::default(),
            device_progress_ns: None,
            snapshot_ns: 0,
            previous_snapshot_ns: 0,
            flows: HashMap::new(),
            tracked_by_class: [0; Class::COUNT + 1],
            max_flows: cfg.max_tracked_flows,
            untracked: 0,
            unreadable: 0,
            migrations: VecDeque::new(),
            migrations_total: BTreeMap::new(),
            next_migration: 1,
            down_after_ns: cfg.down_after_ms * 1_000_000,
            planner,
            observe_only: cfg.planner.observe_only,
            high_utilisation: cfg.planner.high_utilisation,
            tick: 0,
            forecasts: ForecastStage::new(f.history, &f.periods, f.level, horizon, f.refit_ticks),
            refit_ticks: f.refit_ticks,
            sampled: Sampled::default(),
            decisions: VecDeque::new(),
            decisions_total: 0,
            state_bytes_per_flow: cfg.migration.state_bytes_per_flow,
            handed_off_total: 0,
            state_bytes_total: 0,
        }
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    pub fn tracked_flows(&self) -> usize {
        self.flows.len()
    }

    /// Heap bytes of the flow table: the standard map keeps 1/8 of its slots free,
    /// rounds slots up to a power of two and adds a control byte per slot.
    pub fn flow_table_bytes(&self) -> usize {
        let slots = (self.flows.capacity() * 8 / 7).next_power_of_two();
        slots * (std::mem::size_of::<(FlowId, TrackedFlow)>() + 1)
    }

    /// Stage 1: counter snapshots update the view; records are returned for profiling.
    pub fn ingest(&mut self, items: Vec<TelemetryItem>, unreadable: u32) -> Vec<FeatureRecord> {
        self.unreadable += u64::from(unreadable);
        let mut records = Vec::new();
        for item in items {
            let s = match item {
                TelemetryItem::Record(r) => {
                    records.push(r);
                    continue;
                }
                TelemetryItem::Counters(s) => s,
            };
            let t = Traffic {
                packets: s.packets.get(),
                bytes: s.bytes.get(),
                flows: s.flows.get(),
            };
            let now = s.nic_time_ns.get();
            let id = s.id.get();
            match Scope::from_u8(s.scope) {
                Some(Scope::Device) => {
                    if now > self.snapshot_ns {
                        self.previous_snapshot_ns = self.snapshot_ns;
                        self.snapshot_ns = now;
                    }
                    if self.device_progress_ns.is_none() || t.packets != self.device.packets {
                        self.device_progress_ns = Some(now);
                    }
                    self.device = t;
                }
                Some(Scope::Node) => {
                    if let Some(n) = self.nodes.get_mut(&id) {
                        let dt = now.saturating_sub(self.previous_snapshot_ns);
                        if dt > 0 && n.progress_ns.is_some() && n.metrics_url.is_none() {
                            let bits = t.bytes.saturating_sub(n.traffic.bytes) as f64 * 8.0;
                            n.load_gbps = bits / dt as f64;
                        }
                        if n.progress_ns.is_none() || t.packets != n.traffic.packets {
                            n.progress_ns = Some(now);
                        }
                        n.traffic = t;
                        n.active_flows = s.active_flows.get();
                    }
                }
                Some(Scope::Shard) => {
                    if let Some(sh) = self.shards.get_mut(usize::from(id)) {
                        *sh = t;
                    }
                }
                Some(Scope::Class) => {
                    if let Some(c) = self.classes.get_mut(usize::from(id)) {
                        *c = t;
                    }
                }
                None => self.unreadable += 1,
            }
        }
        records
    }

    /// Stage 2: track flows from their records. Pass-through classification: the class
    /// the NIC's port rules gave.
    pub fn profile(&mut self, records: &[FeatureRecord]) {
        for r in records {
            let id = r.flow_id();
            if r.kind == RecordKind::End {
                if let Some(old) = self.flows.remove(&id) {
                    self.count_class(old.class, false);
                }
                continue;
            }
            let flow = TrackedFlow {
                node: r.node,
                shard: r.shard,
                class: r.class,
                proto: r.proto,
                ipv6: r.ipv6,
                first_ts_ns: r.first_ts_ns,
                last_ts_ns: r.last_ts_ns,
                packets: r.packets,
                bytes: r.bytes,
            };
            if self.flows.len() >= self.max_flows && !self.flows.contains_key(&id) {
                self.untracked += 1;
                continue;
            }
            self.count_class(r.class, true);
            if let Some(old) = self.flows.insert(id, flow) {
                self.count_class(old.class, false);
            }
        }
    }

    fn count_class(&mut self, class: u8, add: bool) {
        let c = &mut self.tracked_by_class[usize::from(class).min(Class::COUNT)];
        *c = if add { *c + 1 } else { c.saturating_sub(1) };
    }

    /// Stage 3: one sample per series (packets/s, bytes/s, new flows/s of every class,
    /// node and shard, from the NIC's counter snapshots) into the forecaster. A tick
    /// that brought no new snapshot repeats the last rates, so the series keep the
    /// loop's interval. Returns the refits due, to run off the loop
    /// ([`Core::forecast_done`] takes them back).
    pub fn forecast(&mut self) -> Vec<Job> {
        self.tick += 1;
        if self.snapshot_ns > self.sampled.ns {
            self.sample_rates();
        }
        let jobs = self.forecasts.observe(self.tick, &self.sampled.rates);
        for (id, n) in &mut self.nodes {
            n.forecast_gbps = self
                .forecasts
                .next_point(FcScope::Node(*id), Metric::Bytes, self.tick)
                .map_or(n.load_gbps, |b| b * GBPS);
        }
        jobs
    }

    /// A refit finished.
    pub fn forecast_done(&mut self, d: Done) {
        self.forecasts.done(d);
    }

    fn sample_rates(&mut self) {
        let s = &mut self.sampled;
        let first = s.ns == 0;
        let dt_s = self.snapshot_ns.saturating_sub(s.ns) as f64 / 1e9;
        s.ns = self.snapshot_ns;
        let mut rates = Vec::with_capacity(s.rates.len());
        let mut push = |scope: FcScope, now: Traffic, then: Traffic| -> f64 {
            let per_s = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt_s;
            let bytes = per_s(now.bytes, then.bytes);
            rates.push((scope, Metric::Packets, per_s(now.packets, then.packets)));
            rates.push((scope, Metric::Bytes, bytes));
            rates.push((scope, Metric::NewFlows, per_s(now.flows, then.flows)));
            bytes * GBPS
        };
        for c in Class::ALL {
            let i = c as usize;
            self.class_gbps[i] = push(FcScope::Class(c), self.classes[i], s.classes[i]);
        }
        for (id, n) in &self.nodes {
            let then = s.nodes.get(id).copied().unwrap_or_default();
            push(FcScope::Node(*id), n.traffic, then);
        }
        s.shards.resize(self.shards.len(), Traffic::default());
        for (i, t) in self.shards.iter().enumerate() {
            self.shard_gbps[i] = push(FcScope::Shard(i as u16), *t, s.shards[i]);
        }
        s.classes = self.classes;
        s.shards.copy_from_slice(&self.shards);
        s.nodes = self.nodes.iter().map(|(id, n)| (*id, n.traffic)).collect();
        // The first snapshot's counters run from the NIC's start: no rate yet.
        if !first {
            s.rates = rates;
        } else {
            self.shard_gbps.iter_mut().for_each(|v| *v = 0.0);
            self.class_gbps.iter_mut().for_each(|v| *v = 0.0);
        }
    }

    /// Silence detection, part of planning. A node with a `metrics_url` is silent
    /// while its endpoint has not answered for `down_after_ms`, and answers again when
    /// it does. Any other node active with shards that has not received a packet for
    /// `down_after_ms` of NIC time, while the NIC forwarded traffic, is silent until an
    /// operator sets it up: once down it receives nothing that could show it is back.
    fn detect_silence(&mut self, now_ms: u64) {
        let down_after_ms = self.down_after_ns / 1_000_000;
        for n in self.nodes.values_mut() {
            let Some(url) = &n.metrics_url else { continue };
            let since = n.answered.map_or(0, |a| a.0);
            let silent_ms = now_ms.saturating_sub(since);
            if silent_ms >= down_after_ms && !n.silent && n.held.is_none() {
                n.silent = true;
                n.down_reason = Some(format!(
                    "{url} has not answered for {silent_ms} ms (last error: {})",
                    n.scrape_error.as_deref().unwrap_or("none")
                ));
            } else if silent_ms < down_after_ms && n.silent {
                n.silent = false;
                n.down_reason = None;
            }
        }
        let now = self.snapshot_ns;
        let device_busy = self
            .device_progress_ns
            .is_some_and(|p| now.saturating_sub(p) < self.down_after_ns);
        if !device_busy {
            return;
        }
        for (id, n) in &mut self.nodes {
            let Some(p) = n.progress_ns else { continue };
            let idle = now.saturating_sub(p);
            // The shard table is scanned last: only for an active node gone quiet.
            if n.state == NodeState::Active
                && !n.silent
                && n.metrics_url.is_none()
                && idle >= self.down_after_ns
                && self.tables.shard_node.contains(id)
            {
                n.silent = true;
                n.down_reason = Some(format!(
                    "no packet for {} ms of NIC time while the NIC forwarded traffic",
                    idle / 1_000_000
                ));
            }
        }
    }

    /// A node's endpoint answered (or failed) at `now_ms` of the agent's clock.
    pub fn node_report(&mut self, id: u16, report: Report, now_ms: u64) {
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        let s = match report {
            Report::Failed(e) => {
                n.scrape_error = Some(e);
                return;
            }
            Report::Sample(s) => s,
        };
        if let Some((at, prev)) = n.answered {
            let dt_s = now_ms.saturating_sub(at) as f64 / 1e3;
            let cpu = s.cpu_total_s - prev.cpu_total_s;
            if cpu > 0.0 {
                n.cpu_busy = Some(((s.cpu_busy_s - prev.cpu_busy_s) / cpu).clamp(0.0, 1.0));
            }
            if dt_s > 0.0 && s.net_bytes >= prev.net_bytes {
                n.load_gbps = (s.net_bytes - prev.net_bytes) * 8.0 / dt_s / 1e9;
            }
            let received = s.rx_packets - prev.rx_packets;
            let dropped = s.rx_drops - prev.rx_drops;
            if received + dropped > 0.0 && dropped >= 0.0 {
                n.drop_rate = Some((dropped / (received + dropped)).clamp(0.0, 1.0));
            }
        }
        if s.mem_total_bytes > 0.0 {
            n.memory_used = Some(1.0 - s.mem_available_bytes / s.mem_total_bytes);
        }
        n.scrape_error = None;
        n.answered = Some((now_ms, s));
    }

    /// What the planner is told about each node, indexed by node id. Capacity is the
    /// configured one scaled by the node's weight (an operator's weight 2 doubles the
    /// share the planner gives it; 0 keeps shards off it). A node an operator holds,
    /// or that the image does not define, is shown silent: the planner then counts it
    /// failed, and neither starts it nor places shards on it. Measured: load (NIC
    /// counters, or the node's endpoint), pinned flows (NIC), silence, and the drop
    /// rate of nodes with a `metrics_url` (node_exporter). Not measured: queueing
    /// delay — no source gives it — so the planner's delay trigger never fires here.
    fn node_inputs(&self) -> Vec<NodeInput> {
        (0..self.planner.power().len())
            .map(|id| match self.nodes.get(&(id as u16)) {
                Some(n) => NodeInput {
                    load: n.load_gbps,
                    capacity: n.capacity_gbps * f64::from(n.weight),
                    flows: n.active_flows,
                    silent: n.silent || n.held.is_some(),
                    delay_ms: 0.0,
                    drop_rate: n.drop_rate.unwrap_or(0.0),
                },
                None => NodeInput {
                    silent: true,
                    ..NodeInput::default()
                },
            })
            .collect()
    }

    /// Stage 4: the planner's decision over this tick's measured load (and, predictive,
    /// the forecasts' upper bounds), as tables. `now_ms` is the agent's clock, against
    /// which endpoints' silence is judged. Observe-only, the decision is recorded and
    /// the plan is the committed tables.
    pub fn plan(&mut self, now_ms: u64) -> Plan {
        self.detect_silence(now_ms);
        let inputs = self.node_inputs();
        let predictive = self.planner.policy() == Policy::Predictive;
        let (total_upper, class_upper) = if predictive {
            let scopes: Vec<FcScope> = self.nodes.keys().map(|id| FcScope::Node(*id)).collect();
            let total = self
                .forecasts
                .sum_upper_after(&scopes, Metric::Bytes, self.tick);
            let classes = Class::ALL
                .iter()
                .map(|c| {
                    let u =
                        self.forecasts
                            .upper_after(FcScope::Class(*c), Metric::Bytes, self.tick);
                    u.iter().map(|b| b * GBPS).collect()
                })
                .collect();
            (total.iter().map(|b| b * GBPS).collect(), classes)
        } else {
            (Vec::new(), Vec::new())
        };
        let before = self.planner.power().to_vec();
        let actions = self.planner.decide(&Inputs {
            tick: self.tick,
            nodes: &inputs,
            shard_load: &self.shard_gbps,
            class_load: &self.class_gbps,
            total_upper: &total_upper,
            class_upper: &class_upper,
        });
        let mut after = before.clone();
        for (id, p) in &actions.power {
            if let Some(slot) = after.get_mut(usize::from(*id)) {
                *slot = *p;
            }
        }
        let moves: Vec<PlannedMove> = actions
            .moves
            .iter()
            .map(|m| PlannedMove {
                shard: m.shard,
                from: m.from,
                to: m.to,
                reason: self.move_reason(m, &before, &after, &actions, &inputs),
            })
            .collect();
        if !actions.is_empty() {
            self.record(&actions, &moves);
        }
        if self.observe_only {
            return self.unchanged();
        }
        let power = self.planner.power();
        Plan {
            node_states: self
                .nodes
                .iter()
                .map(|(id, n)| {
                    let p = power
                        .get(usize::from(*id))
                        .copied()
                        .unwrap_or(Power::Failed);
                    (*id, n.held.unwrap_or(nic_state(p)))
                })
                .collect(),
            shard_node: self.planner.shard_node().to_vec(),
            groups: actions.groups,
            reasons: moves.iter().map(|m| (m.shard, m.reason)).collect(),
            hand_off_from: actions.hand_off_from,
        }
    }

    /// Why the planner moved a shard, from what changed around it.
    fn move_reason(
        &self,
        m: &ShardMove,
        before: &[Power],
        after: &[Power],
        actions: &Actions,
        inputs: &[NodeInput],
    ) -> Reason {
        let (from, to) = (usize::from(m.from), usize::from(m.to));
        let degraded = format!("node {from} degraded");
        let hot = inputs
            .get(from)
            .is_some_and(|n| n.load > self.high_utilisation * n.capacity);
        match after.get(from) {
            Some(Power::Failed) => Reason::Failure,
            Some(Power::Draining | Power::Off) => Reason::Scale,
            _ if actions.reasons.iter().any(|r| r.starts_with(&degraded)) => Reason::Degradation,
            _ if before.get(to) != Some(&Power::Active) => Reason::Scale,
            _ if hot => Reason::Overload,
            _ if self.planner.policy() == Policy::Predictive => Reason::Forecast,
            _ => Reason::Rebalance,
        }
    }

    /// Log and keep a decision that changed something. Starting and stopping
    /// machines is outside the agent: the log line is what an operator (or an
    /// orchestrator watching `/decisions`) acts on.
    fn record(&mut self, actions: &Actions, moves: &[PlannedMove]) {
        let applied = !self.observe_only;
        let decision = Decision {
            tick: self.tick,
            nic_time_ns: self.snapshot_ns,
            policy: self.planner.policy().as_str(),
            applied,
            power: actions.power.clone(),
            moves: moves.to_vec(),
            groups: actions
                .groups
                .iter()
                .map(|(c, g)| (c.as_str(), *g))
                .collect(),
            hand_off_from: actions.hand_off_from.clone(),
            reasons: actions.reasons.clone(),
            repeats: 0,
        };
        if let Some(last) = self.decisions.back_mut()
            && (&last.power, &last.moves, &last.groups, &last.reasons)
                == (
                    &decision.power,
                    &decision.moves,
                    &decision.groups,
                    &decision.reasons,
                )
        {
            last.repeats += 1;
            return;
        }
        for (id, p) in &actions.power {
            tracing::info!(node = id, power = ?p, applied, "planner: node power state");
        }
        for r in &actions.reasons {
            tracing::info!(applied, "planner: {r}");
        }
        if self.decisions.len() == DECISION_LOG {
            self.decisions.pop_front();
        }
        self.decisions_total += 1;
        self.decisions.push_back(decision);
    }

    /// The committed tables as a plan: nothing to change.
    fn unchanged(&self) -> Plan {
        Plan {
            node_states: self.nodes.iter().map(|(id, n)| (*id, n.state)).collect(),
            shard_node: self.tables.shard_node.clone(),
            groups: Vec::new(),
            reasons: BTreeMap::new(),
            hand_off_from: Vec::new(),
        }
    }

    /// Stage 5: the commands that turn the committed tables into the plan.
    pub fn rebalance(&self, plan: &Plan) -> Vec<CmdDesc> {
        let mut out = Vec::new();
        for t in &self.tables.nodes {
            if let Some(s) = plan.node_states.get(&t.id).filter(|s| **s != t.state) {
                let code = hw_sim::image::node_state_code(*s);
                out.push(CmdDesc::new(Opcode::SetNodeState, t.id.into(), code.into()));
            }
        }
        for (shard, (now, want)) in self
            .tables
            .shard_node
            .iter()
            .zip(&plan.shard_node)
            .enumerate()
        {
            if now != want {
                out.push(CmdDesc::new(
                    Opcode::SetShardNode,
                    shard as u32,
                    (*want).into(),
                ));
            }
        }
        for (c, g) in &plan.groups {
            out.push(CmdDesc::new(Opcode::SetClassGroup, *c as u32, (*g).into()));
        }
        out
    }

    /// After a batch committed (in `duration_ms`, submit to acknowledgement): the
    /// tables now hold the plan; log the moves. Returns the first migration id given.
    pub fn committed(&mut self, plan: Plan, duration_ms: f64) -> u64 {
        let first = self.next_migration;
        let unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for (shard, (from, to)) in self
            .tables
            .shard_node
            .iter()
            .zip(&plan.shard_node)
            .enumerate()
        {
            if from == to {
                continue;
            }
            let reason = plan
                .reasons
                .get(&(shard as u16))
                .copied()
                .unwrap_or(Reason::Operator);
            if self.migrations.len() == MIGRATION_LOG {
                self.migrations.pop_front();
            }
            self.migrations.push_back(Migration {
                id: self.next_migration,
                shard: shard as u16,
                from: *from,
                to: *to,
                reason,
                nic_time_ns: self.snapshot_ns,
                unix_ms,
                flows_handed_off: 0,
                state_bytes: 0,
                duration_ms,
            });
            *self.migrations_total.entry(reason.as_str()).or_default() += 1;
            self.next_migration += 1;
        }
        for t in &mut self.tables.nodes {
            let Some(s) = plan.node_states.get(&t.id) else {
                continue;
            };
            if let Some(n) = self.nodes.get_mut(&t.id) {
                // A node back in service is judged by its packets from now on.
                if *s == NodeState::Active && n.state != NodeState::Active {
                    n.progress_ns = None;
                }
                n.state = *s;
            }
            t.state = *s;
        }
        self.tables.shard_node = plan.shard_node;
        first
    }

    /// Migrations from id `first` on, as logged.
    pub fn migrations_since(&self, first: u64) -> Vec<Migration> {
        self.migrations
            .iter()
            .filter(|m| m.id >= first)
            .cloned()
            .collect()
    }

    /// Hand the planner the committed tables: after an operator's change, or a batch
    /// the NIC refused (which leaves the planner's view ahead of the NIC). Powers the
    /// NIC cannot show (warming, off) stay as the planner had them.
    pub fn sync_planner(&mut self) {
        let mut power = self.planner.power().to_vec();
        for (id, n) in &self.nodes {
            let Some(p) = power.get_mut(usize::from(*id)) else {
                continue;
            };
            *p = match (n.held, n.state, *p) {
                (Some(_), _, _) => Power::Failed,
                (None, NodeState::Active, _) => Power::Active,
                (None, NodeState::Draining, p @ (Power::Warming { .. } | Power::Draining)) => p,
                (None, NodeState::Draining, _) => Power::Draining,
                (None, NodeState::Down, p @ (Power::Off | Power::Failed)) => p,
                (None, NodeState::Down, _) => Power::Off,
            };
        }
        self.planner.adopt(power, self.tables.shard_node.clone());
    }

    fn node_mut(&mut self, id: u16) -> Result<&mut Node, Refusal> {
        self.nodes
            .get_mut(&id)
            .ok_or_else(|| Refusal::NotFound(format!("no node {id}")))
    }

    /// The plan of an operator's change of states or weights: shards placed anew by
    /// weight over the nodes active after it, moving the fewest.
    fn operator_plan(&self, node_states: BTreeMap<u16, NodeState>) -> Plan {
        let mut shard_node = self.tables.shard_node.clone();
        let targets: Vec<(u16, u32)> = self
            .nodes
            .iter()
            .filter(|(id, n)| node_states.get(id) == Some(&NodeState::Active) && n.weight > 0)
            .map(|(id, n)| (*id, n.weight))
            .collect();
        place(&mut shard_node, &targets);
        Plan {
            node_states,
            shard_node,
            ..self.unchanged()
        }
    }

    /// An operator sets a node's state: `drain` and `down` hold it there, out of the
    /// planner's hands, until `up` returns it to service (and to the planner). Shards
    /// are placed anew over the active nodes.
    pub fn set_state(&mut self, id: u16, state: NodeState) -> Result<Plan, Refusal> {
        let n = self.node_mut(id)?;
        n.held = (state != NodeState::Active).then_some(state);
        n.silent = false;
        n.down_reason = None;
        if state == NodeState::Active {
            n.progress_ns = None;
            n.answered = None;
        }
        let mut states: BTreeMap<u16, NodeState> =
            self.nodes.iter().map(|(i, n)| (*i, n.state)).collect();
        states.insert(id, state);
        Ok(self.operator_plan(states))
    }

    /// An operator sets a node's weight: its share of shards, and of the capacity the
    /// planner counts on.
    pub fn set_weight(&mut self, id: u16, weight: u32) -> Result<Plan, Refusal> {
        if weight > 1_000_000 {
            return Err(Refusal::Invalid(format!(
                "weight {weight} is outside 0..=1000000"
            )));
        }
        self.node_mut(id)?.weight = weight;
        Ok(self.operator_plan(self.unchanged().node_states))
    }

    /// The plan of an operator's move of one shard.
    pub fn migrate(&self, shard: u16, node: u16) -> Result<Plan, Refusal> {
        let n = self
            .nodes
            .get(&node)
            .ok_or_else(|| Refusal::NotFound(format!("no node {node}")))?;
        let Some(from) = self.tables.shard_node.get(usize::from(shard)) else {
            return Err(Refusal::NotFound(format!(
                "no shard {shard} (the NIC has {})",
                self.tables.shard_node.len()
            )));
        };
        if n.state != NodeState::Active {
            return Err(Refusal::Conflict(format!(
                "node {node} is {:?}: only an active node takes shards",
                n.state
            )));
        }
        if *from == node {
            return Err(Refusal::Conflict(format!(
                "shard {shard} is already on node {node}"
            )));
        }
        let mut plan = self.unchanged();
        plan.shard_node[usize::from(shard)] = node;
        Ok(plan)
    }

    /// Tracked flows worth handing off: on a node in `from`, at least `min_age_ns` old
    /// (NIC time), whose shard now sits on another node; at most `max`. Walks the flow
    /// table, which only ticks that hand flows off do.
    pub fn hand_off_candidates(
        &self,
        from: &[u16],
        min_age_ns: u64,
        max: usize,
    ) -> Vec<(FlowId, u16, u16)> {
        let mut out = Vec::new();
        for (id, f) in &self.flows {
            if out.len() == max {
                break;
            }
            let Some(&to) = self.tables.shard_node.get(usize::from(f.shard)) else {
                continue;
            };
            if from.contains(&f.node)
                && to != f.node
                && self.snapshot_ns.saturating_sub(f.first_ts_ns) >= min_age_ns
            {
                out.push((*id, f.shard, to));
            }
        }
        out
    }

    /// The NIC took these handoffs (flow, shard, new node) in `duration_ms`: the flows
    /// follow their shards, and the shard's latest migration to that node counts them.
    pub fn handed_off(&mut self, done: &[(FlowId, u16, u16)], duration_ms: f64) {
        let mut per_shard: BTreeMap<(u16, u16), u64> = BTreeMap::new();
        for (id, shard, to) in done {
            if let Some(f) = self.flows.get_mut(id) {
                f.node = *to;
            }
            *per_shard.entry((*shard, *to)).or_default() += 1;
        }
        for ((shard, to), flows) in per_shard {
            let bytes = flows * self.state_bytes_per_flow;
            self.handed_off_total += flows;
            self.state_bytes_total += bytes;
            if let Some(m) = self
                .migrations
                .iter_mut()
                .rev()
                .find(|m| m.shard == shard && m.to == to)
            {
                m.flows_handed_off += flows;
                m.state_bytes += bytes;
                m.duration_ms += duration_ms;
            }
        }
    }

    /// The `n` tracked flows with the most bytes.
    pub fn top_flows(&self, n: usize) -> Vec<FlowView> {
        let mut all: Vec<(&FlowId, &TrackedFlow)> = self.flows.iter().collect();
        let n = n.min(all.len());
        if n < all.len() {
            all.select_nth_unstable_by(n, |a, b| b.1.bytes.cmp(&a.1.bytes));
            all.truncate(n);
        }
        all.sort_by(|a, b| b.1.bytes.cmp(&a.1.bytes).then(a.0.cmp(b.0)));
        all.into_iter()
            .map(|(id, f)| FlowView {
                client: addr(&id.client, id.ipv6, id.client_port),
                server: addr(&id.server, id.ipv6, id.server_port),
                class: class_name(f.class),
                flow: *f,
            })
            .collect()
    }

    /// The view the API serves.
    pub fn view(&self) -> View {
        let mut shards_per_node: BTreeMap<u16, u32> = BTreeMap::new();
        for n in &self.tables.shard_node {
            *shards_per_node.entry(*n).or_default() += 1;
        }
        let power = self.planner.power();
        View {
            nic_time_ns: self.snapshot_ns,
            tracked_flows: self.flows.len() as u64,
            untracked_flows: self.untracked,
            nodes: self
                .nodes
                .iter()
                .map(|(id, n)| NodeView {
                    id: *id,
                    state: n.state,
                    weight: n.weight,
                    capacity_gbps: n.capacity_gbps,
                    load_gbps: n.load_gbps,
                    forecast_gbps: n.forecast_gbps,
                    shards: shards_per_node.get(id).copied().unwrap_or(0),
                    active_flows: n.active_flows,
                    traffic: n.traffic,
                    down_reason: n.down_reason.clone(),
                    power: power
                        .get(usize::from(*id))
                        .copied()
                        .unwrap_or(Power::Failed),
                    held: n.held,
                    drop_rate: n.drop_rate,
                    load_source: if n.metrics_url.is_some() {
                        "prometheus"
                    } else {
                        "nic"
                    },
                    cpu_busy: n.cpu_busy,
                    memory_used: n.memory_used,
                    scrape_error: n.scrape_error.clone(),
                })
                .collect(),
            shards: self
                .tables
                .shard_node
                .iter()
                .enumerate()
                .map(|(i, node)| ShardView {
                    id: i as u16,
                    node: *node,
                    buckets: self.buckets[i],
                    traffic: self.shards.get(i).copied().unwrap_or_default(),
                })
                .collect(),
            classes: (0..=Class::COUNT)
                .map(|i| ClassView {
                    class: class_name(i as u8),
                    tracked_flows: self.tracked_by_class[i],
                    traffic: self.classes[i],
                })
                .collect(),
            migrations: self.migrations.iter().cloned().collect(),
            migrations_total: self.migrations_total.clone(),
            flows_handed_off_total: self.handed_off_total,
            state_bytes_handed_off_total: self.state_bytes_total,
            policy: self.planner.policy().as_str(),
            observe_only: self.observe_only,
            forecast: ForecastView {
                tick: self.tick,
                level: self.forecasts.level(),
                horizon: self.forecasts.horizon(),
                refit_ticks: self.refit_ticks,
                refits_total: self.forecasts.refits_total(),
                series: self.forecasts.view(),
            },
            decisions: self.decisions.iter().cloned().collect(),
            decisions_total: self.decisions_total,
            rings: RingView {
                telemetry_unreadable: self.unreadable,
                ..RingView::default()
            },
            ..View::default()
        }
    }
}

/// Place shards over `targets` (node, weight) in proportion to weight, moving as few
/// shards as possible: a node keeps its shards while its count is within one of its
/// share; shards on nodes that are not targets always move.
pub fn place(shard_node: &mut [u16], targets: &[(u16, u32)]) {
    let total: u64 = targets.iter().map(|t| u64::from(t.1)).sum();
    if total == 0 || shard_node.is_empty() {
        return;
    }
    let shards = shard_node.len() as f64;
    let quota: BTreeMap<u16, f64> = targets
        .iter()
        .map(|(id, w)| (*id, shards * f64::from(*w) / total as f64))
        .collect();
    let mut count: BTreeMap<u16, usize> = targets.iter().map(|t| (t.0, 0)).collect();
    let mut pool = Vec::new();
    for (s, n) in shard_node.iter().enumerate() {
        match count.get_mut(n) {
            Some(c) => *c += 1,
            None => pool.push(s),
        }
    }
    let n = |count: &BTreeMap<u16, usize>, id: &u16| count.get(id).copied().unwrap_or(0);
    // Shed shards above a node's ceiling, highest shard ids first.
    for (id, q) in &quota {
        let hi = q.ceil() as usize;
        let mut excess = n(&count, id).saturating_sub(hi);
        for s in (0..shard_node.len()).rev() {
            if excess == 0 {
                break;
            }
            if shard_node[s] == *id {
                pool.push(s);
                excess -= 1;
            }
        }
        count.insert(*id, n(&count, id).min(hi));
    }
    // Nodes below their floor take from the pool, or from the node furthest above
    // its share.
    let deficit = |count: &BTreeMap<u16, usize>, (id, q): (&u16, &f64)| q - n(count, id) as f64;
    while let Some(needy) = quota
        .iter()
        .filter(|(id, q)| (n(&count, id) as f64) < q.floor())
        .max_by(|a, b| deficit(&count, *a).total_cmp(&deficit(&count, *b)))
        .map(|(id, _)| *id)
    {
        let s = match pool.pop() {
            Some(s) => s,
            None => {
                let Some(donor) = quota
                    .iter()
                    .filter(|(id, q)| n(&count, id) as f64 > q.floor())
                    .min_by(|a, b| deficit(&count, *a).total_cmp(&deficit(&count, *b)))
                    .map(|(id, _)| *id)
                else {
                    break;
                };
                let Some(s) = (0..shard_node.len())
                    .rev()
                    .find(|s| shard_node[*s] == donor)
                else {
                    break;
                };
                count.insert(donor, n(&count, &donor).saturating_sub(1));
                s
            }
        };
        shard_node[s] = needy;
        *count.entry(needy).or_default() += 1;
    }
    // What is left goes to the nodes furthest below their share.
    while let Some(s) = pool.pop() {
        let Some(id) = quota
            .iter()
            .max_by(|a, b| deficit(&count, *a).total_cmp(&deficit(&count, *b)))
            .map(|(id, _)| *id)
        else {
            break;
        };
        shard_node[s] = id;
        *count.entry(id).or_default() += 1;
    }
}

/// The synthetic traffic of the in-process NIC: a sliding window of TCP flows; every
/// tick some start and as many of the oldest end with an RST.
#[derive(Debug)]
struct SyntheticTraffic {
    model: Arc<Mutex<NicDevice>>,
    /// Flow counters; flow ids are these modulo the generator's id space, distinct
    /// within the window since `flows` is at most half of it.
    oldest: u64,
    next: u64,
    flows: u32,
    new_per_tick: u32,
    packets_per_tick: u32,
    rng: StdRng,
    now_ns: u64,
}

impl SyntheticTraffic {
    fn frame(flow: u64, rst: bool) -> [u8; FRAME_LEN] {
        let mut f = [0u8; FRAME_LEN];
        write_frame((flow % u64::from(MAX_FLOWS)) as u32, &mut f);
        if rst {
            f[14 + 20 + 13] = 0x14;
        }
        f
    }

    /// Offer one tick of traffic, NIC time moving on by `dt_ns`.
    fn tick(&mut self, dt_ns: u64) {
        let start = self.now_ns.max(self.model_time());
        let mut frames: Vec<[u8; FRAME_LEN]> = Vec::new();
        let (new, window) = (u64::from(self.new_per_tick), u64::from(self.flows));
        let ending = (self.next - self.oldest + new).saturating_sub(window);
        for f in self.oldest..self.oldest + ending {
            frames.push(Self::frame(f, true));
        }
        self.oldest += ending;
        self.next += new;
        if self.next > self.oldest {
            for _ in 0..self.packets_per_tick {
                let f = self.rng.random_range(self.oldest..self.next);
                frames.push(Self::frame(f, false));
            }
        }
        let step = dt_ns / (frames.len() as u64 + 1);
        let pkts: Vec<Packet<'_>> = frames
            .iter()
            .enumerate()
            .map(|(i, d)| Packet {
                ts_ns: start + step * i as u64,
                data: d,
                wire_len: WIRE_LEN,
            })
            .collect();
        let mut out = Vec::with_capacity(pkts.len());
        let mut dev = self.model.lock().unwrap_or_else(|e| e.into_inner());
        for burst in pkts.chunks(nic_firmware::pipeline::BURST) {
            dev.receive(LinkType::Ethernet, burst, &mut out);
            out.clear();
        }
        self.now_ns = start + dt_ns;
    }

    fn model_time(&self) -> u64 {
        let dev = self.model.lock().unwrap_or_else(|e| e.into_inner());
        dev.pipeline().map_or(0, |p| p.now_ns())
    }
}

/// What the agent drives: for the in-process NIC the model itself (the agent offers it
/// its synthetic traffic); for a separate NIC only the transport, since that NIC has a
/// traffic source of its own (`flowshard nic-sim --pcap`, or real links).
pub enum Backend {
    InProcess(Arc<Mutex<NicDevice>>),
    /// The emulated NIC in another process over vfio-user, or a PCI function through
    /// kernel VFIO: the same driver, a different transport.
    External(Box<dyn Device>),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::InProcess(_) => f.write_str("Backend::InProcess"),
            Backend::External(d) => write!(f, "Backend::External({})", d.describe()),
        }
    }
}

impl Backend {
    /// The backend `cfg.device` names, connected. The in-process NIC boots the embedded
    /// default image, or `emulated.nic_config`; a separate NIC must already run an image
    /// (`flowshard flash`), which [`Agent::start`] checks.
    pub fn from_config(cfg: &AgentConfig) -> Result<Backend, crate::Error> {
        // The transports' errors already name the device and say what to check.
        let failed = |e: DeviceError| crate::Error::Agent(format!("open the NIC: {e}"));
        match &cfg.device {
            DeviceSpec::InProcess => Ok(Backend::InProcess(Backend::emulated_nic(cfg)?)),
            DeviceSpec::VfioUser(p) => {
                // A server busy with another client accepts the connection but does
                // not answer the handshake: wait a bounded time, on a thread, and say so.
                let (tx, rx) = std::sync::mpsc::channel();
                let path = p.clone();
                std::thread::spawn(move || {
                    let _ = tx.send(VfioUser::connect(&path));
                });
                match rx.recv_timeout(VFIO_USER_CONNECT_TIMEOUT) {
                    Ok(r) => r.map(|d| Backend::External(Box::new(d))).map_err(failed),
                    Err(_) => Err(crate::Error::Agent(format!(
                        "open the NIC: vfio-user:{}: no answer within {} s; nic-sim serves one client at a time: is another agent, or `flowshard status`, connected?",
                        p.display(),
                        VFIO_USER_CONNECT_TIMEOUT.as_secs()
                    ))),
                }
            }
            DeviceSpec::Pci(bdf) => Vfio::open(bdf)
                .map(|d| Backend::External(Box::new(d)))
                .map_err(failed),
        }
    }

    /// The in-process emulated NIC, running the image of `emulated.nic_config` (the
    /// embedded default without it).
    pub fn emulated_nic(cfg: &AgentConfig) -> Result<Arc<Mutex<NicDevice>>, crate::Error> {
        let nic = crate::nic_config::load(cfg.emulated.nic_config.as_deref())?;
        let img = crate::nic_cmd::signed_image(&nic, "emulated.nic_config")?;
        let mut dev = NicDevice::new(hw_sim::device::DeviceOptions::default());
        dev.preload(img)
            .map_err(|e| crate::Error::Usage(format!("embedded image: {e}")))?;
        Ok(Arc::new(Mutex::new(dev)))
    }
}

/// The agent: the NIC, the core, and the synthetic traffic of an in-process NIC (a
/// separate NIC brings its own).
pub struct Agent {
    nic: Nic<Box<dyn Device>>,
    core: Core,
    traffic: Option<SyntheticTraffic>,
    _telemetry_irq: EventFd,
    tick: Duration,
    view: Arc<RwLock<View>>,
    metrics: Arc<LoopMetrics>,
    last: LoopView,
    image_version: u32,
    started: Instant,
    migration: MigrationSettings,
    fitter: Fitter,
}

/// The thread the forecast stage's refits run on, so a tick never waits for a fit.
/// It ends when the agent (the jobs' sender) goes.
struct Fitter {
    jobs: std::sync::mpsc::Sender<Job>,
    done: Receiver<Done>,
}

impl Fitter {
    fn start() -> Result<Fitter, crate::Error> {
        let (jobs, todo) = std::sync::mpsc::channel::<Job>();
        let (finished, done) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("forecast-fits".into())
            .spawn(move || {
                // Below the loop: a job handed over must not wake this thread onto
                // the loop's core and keep the tick waiting for a fit (measured: a
                // third of the ticks took 2–40 ms on a busy 2-core machine without it).
                // Failing to lower it only loses that.
                // SAFETY: setpriority(2) on this thread's own id; no memory is passed.
                let _ = unsafe {
                    libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10)
                };
                for job in todo {
                    if finished.send(job.run()).is_err() {
                        break;
                    }
                }
            })
            .map_err(|source| crate::Error::Io {
                what: "start the forecast thread".into(),
                source,
            })?;
        Ok(Fitter { jobs, done })
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("device", &self.nic.name())
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

fn nic_err(e: NicError) -> crate::Error {
    crate::Error::Nic(e)
}

impl Agent {
    /// Open the device, check it runs an image, set up the rings and adopt the tables
    /// it holds. Nothing on the device's steering changes.
    pub fn start(
        cfg: &AgentConfig,
        backend: Backend,
        view: Arc<RwLock<View>>,
        metrics: Arc<LoopMetrics>,
    ) -> Result<Agent, crate::Error> {
        let (dev, model): (Box<dyn Device>, _) = match backend {
            Backend::InProcess(m) => (Box::new(InProcess::new(m.clone())), Some(m)),
            Backend::External(d) => (d, None),
        };
        let mut nic = Nic::open(dev).map_err(nic_err)?;
        let status = nic.status().map_err(nic_err)?;
        if !status.running {
            return Err(crate::Error::Nic(NicError::Protocol {
                device: nic.name().into(),
                what: "no image is running; flash one with `flowshard flash` first".into(),
            }));
        }
        nic.setup_commands(cfg.command_ring_log2).map_err(nic_err)?;
        let tables = nic.read_tables().map_err(nic_err)?;
        tracing::info!(
            device = nic.name(),
            image_version = status.image_version,
            buckets = tables.bucket_shard.len(),
            shards = tables.shard_node.len(),
            nodes = tables.nodes.len(),
            "adopted the NIC's tables"
        );
        let irq = EventFd::new().map_err(|source| crate::Error::Io {
            what: "telemetry eventfd".into(),
            source,
        })?;
        nic.setup_telemetry(
            cfg.telemetry.ring_log2,
            cfg.telemetry.snapshot_ms * 1_000,
            &irq,
        )
        .map_err(nic_err)?;
        let e = &cfg.emulated;
        let traffic = model.map(|model| SyntheticTraffic {
            model,
            oldest: 0,
            next: 0,
            flows: e.flows,
            new_per_tick: e.new_flows_per_tick,
            packets_per_tick: e.packets_per_tick,
            rng: StdRng::seed_from_u64(e.seed),
            now_ns: 0,
        });
        let mut agent = Agent {
            core: Core::new(tables, cfg),
            nic,
            traffic,
            _telemetry_irq: irq,
            tick: Duration::from_millis(cfg.tick_ms),
            view,
            metrics,
            last: LoopView::default(),
            image_version: status.image_version,
            started: Instant::now(),
            migration: cfg.migration.clone(),
            fitter: Fitter::start()?,
        };
        agent.publish()?;
        Ok(agent)
    }

    pub fn core(&self) -> &Core {
        &self.core
    }

    /// The agent's clock: ms since it started.
    fn clock_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Stage timings of the last tick.
    pub fn last_tick(&self) -> &LoopView {
        &self.last
    }

    /// The loop: a tick every `tick_ms`, requests answered as they come, until
    /// [`Request::Stop`] or every sender is gone.
    pub fn run(
        mut self,
        requests: Receiver<(Request, Option<Answer>)>,
    ) -> Result<(), crate::Error> {
        let mut next = Instant::now();
        loop {
            let wait = next.saturating_duration_since(Instant::now());
            match requests.recv_timeout(wait) {
                Ok((Request::Stop, _)) | Err(RecvTimeoutError::Disconnected) => break,
                Ok((req, answer)) => {
                    let result = self.handle(req);
                    // Publish first, so a caller that reads after the answer sees it.
                    self.publish()?;
                    if let Some(a) = answer {
                        // The caller may have gone (its connection closed); the change
                        // is made either way.
                        let _ = a.send(result);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Err(e) = self.tick() {
                        tracing::error!(error = %e, "control loop tick failed");
                    }
                    next += self.tick;
                    if next < Instant::now() {
                        next = Instant::now() + self.tick;
                    }
                }
            }
        }
        tracing::info!("control loop stopped; the NIC keeps its committed tables");
        Ok(())
    }

    fn handle(&mut self, req: Request) -> Result<Reply, Refusal> {
        match req {
            Request::SetState(id, s) => {
                let plan = self.core.set_state(id, s)?;
                self.apply(plan).map(Reply::Done)
            }
            Request::SetWeight(id, w) => {
                let plan = self.core.set_weight(id, w)?;
                self.apply(plan).map(Reply::Done)
            }
            Request::Migrate { shard, node } => {
                let plan = self.core.migrate(shard, node)?;
                self.apply(plan).map(Reply::Done)
            }
            Request::TopFlows(n) => Ok(Reply::Flows(self.core.top_flows(n))),
            Request::NodeReport(id, r) => {
                self.core.node_report(id, r, self.clock_ms());
                Ok(Reply::Done(Vec::new()))
            }
            Request::Stop => Ok(Reply::Done(Vec::new())),
        }
    }

    /// Stage 6: the plan as one command batch, then the handoffs of flows that follow
    /// their shards. The planner is handed the committed tables either way.
    fn apply(&mut self, plan: Plan) -> Result<Vec<Migration>, Refusal> {
        let batch = self.core.rebalance(&plan);
        let hand_off_from = plan.hand_off_from.clone();
        let first = if batch.is_empty() {
            self.core.committed(plan, 0.0)
        } else {
            let submitted = Instant::now();
            let statuses = self.nic.submit(&batch).map_err(|e| {
                self.core.sync_planner();
                Refusal::Device(e.to_string())
            })?;
            let duration_ms = submitted.elapsed().as_secs_f64() * 1e3;
            if let Some((d, s)) = batch
                .iter()
                .zip(&statuses)
                .find(|(_, s)| **s != Status::Ok && **s != Status::Aborted)
            {
                self.core.sync_planner();
                return Err(Refusal::Device(format!(
                    "the NIC refused the batch (opcode {}, args {} {}): {}",
                    d.opcode.get(),
                    d.arg0.get(),
                    d.arg1.get(),
                    s.as_str()
                )));
            }
            self.metrics.batches.inc();
            self.core.committed(plan, duration_ms)
        };
        self.core.sync_planner();
        if self.migration.hand_off && !hand_off_from.is_empty() {
            self.hand_off(&hand_off_from)?;
        }
        let moved = self.core.migrations_since(first);
        for m in &moved {
            self.metrics.migration_seconds.observe(m.duration_ms / 1e3);
            tracing::info!(
                shard = m.shard,
                from = m.from,
                to = m.to,
                reason = m.reason.as_str(),
                flows_handed_off = m.flows_handed_off,
                duration_ms = m.duration_ms,
                "shard migrated"
            );
        }
        Ok(moved)
    }

    /// Hand the long-lived tracked flows of `from` nodes off to their shards' nodes
    /// (one `HandOffFlows` batch): the NIC moves each at its next flowlet boundary.
    fn hand_off(&mut self, from: &[u16]) -> Result<(), Refusal> {
        let m = &self.migration;
        let picked =
            self.core
                .hand_off_candidates(from, m.min_age_ms * 1_000_000, m.max_flows_per_tick);
        if picked.is_empty() {
            return Ok(());
        }
        let list: Vec<(nic_firmware::FlowTuple, u16)> = picked
            .iter()
            .map(|(id, _, to)| (crate::flows::tuple(id), *to))
            .collect();
        let submitted = Instant::now();
        let results = self
            .nic
            .hand_off_flows(&list)
            .map_err(|e| Refusal::Device(e.to_string()))?;
        let duration_ms = submitted.elapsed().as_secs_f64() * 1e3;
        let done: Vec<(FlowId, u16, u16)> = picked
            .into_iter()
            .zip(results)
            .filter(|(_, r)| *r == hdl_bindings::ring::FlowResult::Applied)
            .map(|(p, _)| p)
            .collect();
        self.core.handed_off(&done, duration_ms);
        Ok(())
    }

    /// One pass of every stage.
    pub fn tick(&mut self) -> Result<(), crate::Error> {
        let t0 = Instant::now();
        if let Some(t) = self.traffic.as_mut() {
            t.tick(self.tick.as_nanos() as u64);
        }
        let t1 = Instant::now();
        let telemetry = self.nic.poll_telemetry().map_err(nic_err)?;
        let records = self.core.ingest(telemetry.items, telemetry.unreadable);
        let t2 = Instant::now();
        self.core.profile(&records);
        let t3 = Instant::now();
        let mut refits = 0;
        while let Ok(d) = self.fitter.done.try_recv() {
            self.core.forecast_done(d);
            refits += 1;
        }
        for job in self.core.forecast() {
            self.fitter
                .jobs
                .send(job)
                .map_err(|_| crate::Error::Agent("the forecast thread stopped".into()))?;
        }
        let t4 = Instant::now();
        let plan = self.core.plan(self.clock_ms());
        let t5 = Instant::now();
        if let Err(e) = self.apply(plan) {
            tracing::error!(error = ?e, "applying the plan failed; the NIC keeps its tables");
        }
        let t6 = Instant::now();
        let s = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64();
        self.last = LoopView {
            ticks: self.last.ticks + 1,
            refits,
            ingest_s: s(t1, t2),
            profile_s: s(t2, t3),
            forecast_s: s(t3, t4),
            plan_s: s(t4, t5),
            apply_s: s(t5, t6),
            total_s: s(t1, t6),
        };
        self.metrics.loop_seconds.observe(self.last.total_s);
        self.metrics.forecast_seconds.observe(self.last.forecast_s);
        self.metrics.traffic_seconds.observe(s(t0, t1));
        self.publish()
    }

    /// Copy the core's state, with the device's ring registers, for the API.
    fn publish(&mut self) -> Result<(), crate::Error> {
        let st = self.nic.status().map_err(nic_err)?;
        let mut v = self.core.view();
        v.device = st.device;
        v.image_version = self.image_version;
        v.nic_time_ns = v.nic_time_ns.max(st.nic_time_ns);
        v.flows_active_on_nic = st.flows_active;
        v.rings.command_entries = st.command_ring.entries;
        v.rings.command_epoch = st.command_ring.epoch_or_overflow;
        v.rings.command_errors = st.command_ring.errors;
        v.rings.telemetry_entries = st.telemetry_ring.entries;
        v.rings.telemetry_occupancy = st.telemetry_ring.head.wrapping_sub(st.telemetry_ring.tail);
        v.rings.telemetry_overflow = st.telemetry_ring.epoch_or_overflow;
        v.loop_ = self.last.clone();
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = v;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(t: &[u16]) -> BTreeMap<u16, usize> {
        let mut c = BTreeMap::new();
        for n in t {
            *c.entry(*n).or_default() += 1;
        }
        c
    }

    #[test]
    fn placement_is_proportional_and_moves_only_what_it_must() {
        let mut t: Vec<u16> = (0..64).map(|s| s % 4).collect();
        let before = t.clone();
        place(&mut t, &[(0, 1), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(t, before, "a balanced table stays as it is");
        place(&mut t, &[(0, 1), (1, 1), (3, 1)]);
        let c = counts(&t);
        assert_eq!(c.get(&2), None);
        assert!(c.values().all(|n| (21..=22).contains(n)), "{c:?}");
        let moved = t.iter().zip(&before).filter(|(a, b)| a != b).count();
        assert_eq!(moved, 16, "only node 2's shards move");
        place(&mut t, &[(0, 1), (1, 1), (2, 2), (3, 1)]);
        let c = counts(&t);
        assert!((25..=26).contains(&c[&2]), "{c:?}");
        assert!(c.values().sum::<usize>() == 64);
    }

    fn snapshot(scope: Scope, id: u16, now: u64, packets: u64) -> TelemetryItem {
        TelemetryItem::Counters(hdl_bindings::ring::CounterSnapshot {
            scope: scope as u8,
            id: id.into(),
            nic_time_ns: now.into(),
            packets: packets.into(),
            bytes: (packets * 64).into(),
            ..Default::default()
        })
    }

    fn core_with(policy: Policy, observe_only: bool) -> Core {
        let tables = Tables {
            bucket_shard: (0..16).map(|b| b % 4).collect(),
            shard_node: vec![0, 1, 0, 1],
            nodes: (0..2)
                .map(|id| nic_firmware::config::NodeConfig {
                    id,
                    weight: 1,
                    state: NodeState::Active,
                })
                .collect(),
        };
        let cfg = AgentConfig {
            down_after_ms: 1_000,
            policy,
            planner: PlannerConfig {
                min_active: 2,
                observe_only,
                ..PlannerConfig::default()
            },
            ..AgentConfig::default()
        };
        Core::new(tables, &cfg)
    }

    fn core() -> Core {
        core_with(Policy::Static, false)
    }

    /// Ten ticks of 200 ms in which node 1 stops receiving packets after 600 ms.
    fn node_1_goes_quiet(c: &mut Core, mut each: impl FnMut(&mut Core, u64, Plan)) {
        let ms = 1_000_000;
        for i in 0..=10u64 {
            let node1 = if i < 3 { i * 10 } else { 30 };
            c.ingest(
                vec![
                    snapshot(Scope::Device, 0, i * 200 * ms, i * 100),
                    snapshot(Scope::Node, 0, i * 200 * ms, i * 90),
                    snapshot(Scope::Node, 1, i * 200 * ms, node1),
                ],
                0,
            );
            c.forecast();
            let plan = c.plan(0);
            each(c, i, plan);
        }
    }

    #[test]
    fn a_node_that_stops_receiving_traffic_fails_and_loses_its_shards() {
        let mut c = core_with(Policy::Reactive, false);
        node_1_goes_quiet(&mut c, |c, i, plan| {
            let cmds = c.rebalance(&plan);
            let down = plan.node_states[&1] == NodeState::Down;
            // Node 1 last moved at 600 ms: down once 1,000 ms pass without a packet.
            assert_eq!(down, i * 200 >= 1_600, "tick {i}");
            if down && !cmds.is_empty() {
                assert_eq!(plan.shard_node, vec![0, 0, 0, 0]);
                assert_eq!(cmds.len(), 3, "node state and two shards");
            }
            c.committed(plan, 0.0);
        });
        let v = c.view();
        assert!(
            v.nodes[1]
                .down_reason
                .as_deref()
                .unwrap()
                .contains("no packet for")
        );
        assert_eq!(v.nodes[1].power, Power::Failed);
        assert_eq!(v.migrations_total["failure"], 2);
        assert!(v.migrations.iter().all(|m| m.reason == Reason::Failure));
        assert_eq!(v.decisions.len(), 1);
        assert!(v.decisions[0].reasons[0].contains("node 1 stopped answering"));
    }

    #[test]
    fn static_marks_a_silent_node_down_and_moves_nothing() {
        let mut c = core();
        node_1_goes_quiet(&mut c, |c, i, plan| {
            assert_eq!(plan.shard_node, vec![0, 1, 0, 1], "tick {i}");
            c.committed(plan, 0.0);
        });
        assert_eq!(c.view().nodes[1].state, NodeState::Down);
        assert!(c.view().migrations.is_empty());
    }

    #[test]
    fn observe_only_records_the_decision_and_plans_the_committed_tables() {
        let mut c = core_with(Policy::Reactive, true);
        node_1_goes_quiet(&mut c, |c, _, plan| {
            assert!(c.rebalance(&plan).is_empty());
            c.committed(plan, 0.0);
        });
        let v = c.view();
        assert!(v.observe_only);
        assert!(v.nodes.iter().all(|n| n.state == NodeState::Active));
        // The planner keeps deciding the failure it was not allowed to act on.
        let d = v.decisions.last().unwrap();
        assert!(!d.applied);
        assert_eq!(v.decisions.len(), 1);
        assert!(d.repeats > 0, "{d:?}");
        assert_eq!(d.power, vec![(1, Power::Failed)]);
        assert_eq!(d.moves.len(), 2);
        assert!(d.moves.iter().all(|m| m.reason == Reason::Failure));
    }

    #[test]
    fn drops_its_load_does_not_explain_move_a_nodes_shards_for_degradation() {
        let mut c = core_with(Policy::Reactive, false);
        let sample = |net_bytes, rx_packets, rx_drops| {
            Report::Sample(NodeSample {
                cpu_total_s: 1.0,
                mem_total_bytes: 1.0,
                net_bytes,
                rx_packets,
                rx_drops,
                ..NodeSample::default()
            })
        };
        c.node_report(1, sample(0.0, 0.0, 0.0), 0);
        // 4 Gbit/s of its 10, and a tenth of what it received dropped.
        c.node_report(1, sample(5e8, 9e5, 1e5), 1_000);
        assert_eq!(c.view().nodes[1].drop_rate, Some(0.1));
        for _ in 0..3 {
            let plan = c.plan(1_000);
            c.committed(plan, 0.0);
        }
        let v = c.view();
        assert!(!v.migrations.is_empty(), "{:?}", v.decisions);
        for m in &v.migrations {
            assert_eq!((m.from, m.to, m.reason), (1, 0, Reason::Degradation));
        }
        assert!(v.decisions[0].reasons[0].starts_with("node 1 degraded"));
        assert!(v.decisions.iter().any(|d| d.hand_off_from == vec![1]));
    }

    #[test]
    fn an_idle_nic_marks_no_node_down() {
        let mut c = core();
        for i in 0..20u64 {
            c.ingest(
                vec![
                    snapshot(Scope::Device, 0, i * 500_000_000, 7),
                    snapshot(Scope::Node, 1, i * 500_000_000, 3),
                ],
                0,
            );
            assert!(
                c.plan(0)
                    .node_states
                    .values()
                    .all(|s| *s == NodeState::Active)
            );
        }
    }

    #[test]
    fn the_forecast_stage_samples_rates_and_refits_in_shares() {
        let mut c = core();
        let ms = 1_000_000;
        let mut refits = 0;
        for i in 1..=60u64 {
            c.ingest(
                vec![
                    snapshot(Scope::Device, 0, i * 100 * ms, i * 100),
                    snapshot(Scope::Node, 0, i * 100 * ms, i * 100),
                    snapshot(Scope::Shard, 2, i * 100 * ms, i * 50),
                ],
                0,
            );
            let jobs = c.forecast();
            // 7 classes', 2 nodes' and 4 shards' series, × 3 metrics, over
            // refit_ticks 600: one each tick, once ten samples are in.
            assert!(jobs.len() <= 1, "tick {i}: {}", jobs.len());
            for j in jobs {
                c.forecast_done(j.run());
                refits += 1;
            }
        }
        assert!(refits >= 40, "{refits}");
        let v = c.view();
        assert_eq!(v.forecast.refits_total, refits);
        let s = v
            .forecast
            .series
            .iter()
            .find(|s| s.scope == "node" && s.id == "0" && s.metric == "packets_per_s")
            .unwrap();
        assert_eq!(s.samples, 59, "the first snapshot gives no rate");
        let f = s.forecast.as_ref().unwrap();
        // 100 packets every 100 ms: 1,000 packets/s, steady.
        assert!((f.point[0] - 1_000.0).abs() < 1.0, "{:?}", f.point);
        assert!(s.model.is_some());
        assert!((v.nodes[0].forecast_gbps - 1_000.0 * 64.0 * 8.0 / 1e9).abs() < 1e-6);
    }

    fn record(client: [u8; 16], server: [u8; 16], ipv6: bool, bytes: u64) -> FeatureRecord {
        FeatureRecord {
            kind: RecordKind::Early,
            end_reason: hdl_bindings::telemetry::EndReason::None,
            proto: 6,
            ipv6,
            n: 1,
            class: 0,
            tcp_flags_client: 0,
            tcp_flags_server: 0,
            shards_used: 1,
            node: 1,
            shard: 1,
            flowlets: 1,
            client_addr: client,
            server_addr: server,
            client_port: 40_000,
            server_port: 443,
            directions: 0,
            first_ts_ns: 0,
            last_ts_ns: 0,
            packets: 1,
            bytes,
            sizes: [0; hdl_bindings::telemetry::MAX_FEATURE_PACKETS],
            iat_us: [0; hdl_bindings::telemetry::MAX_FEATURE_PACKETS],
        }
    }

    #[test]
    fn flows_show_the_address_family_of_their_records() {
        let mut c = core();
        let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[10, 0, 0, 1]);
        // Both IPv6 addresses have every byte past the fourth zero.
        c.profile(&[
            record(v6("2001:db8::"), v6("fd00::"), true, 300),
            record(v4, v4, false, 200),
        ]);
        let top = c.top_flows(2);
        assert_eq!(
            (top[0].client.as_str(), top[0].server.as_str()),
            ("[2001:db8::]:40000", "[fd00::]:443")
        );
        assert!(top[0].flow.ipv6 && !top[1].flow.ipv6);
        assert_eq!(top[1].client, "10.0.0.1:40000");
        // The same 16 bytes, ports and protocol in the other family: another flow.
        c.profile(&[record(v4, v4, true, 100)]);
        assert_eq!(c.tracked_flows(), 3);
        assert_eq!(c.top_flows(3)[2].client, "[a00:1::]:40000");
    }

    #[test]
    fn operator_requests_are_checked_and_win_over_the_planner() {
        let mut c = core_with(Policy::Reactive, false);
        assert_eq!(
            c.set_weight(9, 1),
            Err(Refusal::NotFound("no node 9".into()))
        );
        assert!(matches!(c.migrate(7, 0), Err(Refusal::NotFound(_))));
        assert!(matches!(c.migrate(0, 0), Err(Refusal::Conflict(_))));
        let plan = c.set_state(1, NodeState::Draining).unwrap();
        assert_eq!(plan.shard_node, vec![0, 0, 0, 0]);
        c.committed(plan, 0.0);
        c.sync_planner();
        assert!(matches!(c.migrate(0, 1), Err(Refusal::Conflict(_))));
        // The planner leaves a held node alone: no restart, no shard back.
        for _ in 0..5 {
            let plan = c.plan(0);
            assert_eq!(plan.shard_node, vec![0, 0, 0, 0]);
            assert_eq!(plan.node_states[&1], NodeState::Draining);
            c.committed(plan, 0.0);
        }
        let v = c.view();
        assert_eq!(v.migrations_total["operator"], 2);
        assert_eq!(v.nodes[1].held, Some(NodeState::Draining));
        let plan = c.set_state(1, NodeState::Active).unwrap();
        assert_eq!(plan.shard_node.iter().filter(|n| **n == 1).count(), 2);
        c.committed(plan, 0.0);
        c.sync_planner();
        assert_eq!(c.view().nodes[1].power, Power::Active);
    }
}
