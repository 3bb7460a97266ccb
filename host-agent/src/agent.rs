//! The agent daemon: opens the NIC, adopts the tables it finds, and runs the control
//! loop until told to stop.
//!
//! Every tick the loop runs these stages, each over explicit inputs:
//!
//! 1. **ingest** — drain the telemetry ring: counter snapshots update the node, shard
//!    and class view; feature records go to the profiler.
//! 2. **profile** — track flows from their records (early, interim, end). For now the
//!    class is the NIC's port-rule class: the ONNX profiler replaces this stage.
//! 3. **forecast** — load per node ahead. For now persistence (the forecast is the last
//!    measured load): the forecaster replaces this stage.
//! 4. **plan** — node states (operator intents, down detection) and shard placement by
//!    weight over the active nodes with the fewest moves; it runs only when one of its
//!    inputs changed, so a placement the operator made stays.
//! 5. **rebalance** — the difference between the plan and the committed tables, as
//!    command descriptors.
//! 6. **apply** — one command batch: the NIC applies it in one epoch or not at all.
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

use crate::agent_config::{AgentConfig, DeviceSpec};
use crate::device::{Device, DeviceError, InProcess, Vfio, VfioUser};
use crate::driver::{Nic, NicError, Tables};
use crate::metrics::LoopMetrics;
use crate::node_metrics::{NodeSample, Report};

/// Longest the agent waits for a vfio-user server to answer its connection.
const VFIO_USER_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Migrations kept for `/migrations`.
const MIGRATION_LOG: usize = 1_000;

/// Why a shard moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// An operator asked for this move (`POST /migrations`).
    Operator,
    /// The planner moved it: weights or node states changed.
    Rebalance,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Operator => "operator",
            Reason::Rebalance => "rebalance",
        }
    }
}

/// A shard placed on another node. Only new flows of the shard follow it; established
/// flows stay pinned to their node by the NIC's connection table until they end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Migration {
    pub id: u64,
    pub shard: u16,
    pub from: u16,
    pub to: u16,
    pub reason: Reason,
    pub nic_time_ns: u64,
    pub unix_ms: u64,
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
    pub rings: RingView,
    #[serde(rename = "loop")]
    pub loop_: LoopView,
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

/// Per-node state of the core.
#[derive(Clone, Debug)]
struct Node {
    state: NodeState,
    weight: u32,
    capacity_gbps: f64,
    traffic: Traffic,
    active_flows: u64,
    load_gbps: f64,
    forecast_gbps: f64,
    /// NIC time of the snapshot that first showed the node's current packet count.
    progress_ns: Option<u64>,
    down_reason: Option<String>,
    /// The node's Prometheus endpoint, if its load comes from one.
    metrics_url: Option<String>,
    /// Agent clock (ms) of the endpoint's last answer, and the sample it gave.
    answered: Option<(u64, NodeSample)>,
    scrape_error: Option<String>,
    cpu_busy: Option<f64>,
    memory_used: Option<f64>,
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
    replan: bool,
    down_after_ns: u64,
}

/// What the plan stage wants the tables to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub node_states: BTreeMap<u16, NodeState>,
    pub shard_node: Vec<u16>,
}

impl Core {
    /// Adopt the tables read back from the device.
    pub fn new(tables: Tables, cfg: &AgentConfig) -> Core {
        let nodes = tables
            .nodes
            .iter()
            .map(|n| {
                let node = Node {
                    state: n.state,
                    weight: n.weight,
                    capacity_gbps: cfg.capacity_gbps(n.id),
                    traffic: Traffic::default(),
                    active_flows: 0,
                    load_gbps: 0.0,
                    forecast_gbps: 0.0,
                    progress_ns: None,
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
        Core {
            shards: vec![Traffic::default(); tables.shard_node.len()],
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
            replan: false,
            down_after_ns: cfg.down_after_ms * 1_000_000,
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

    /// Stage 3: persistence forecast — each node's next load is its last measured one.
    pub fn forecast(&mut self) {
        for n in self.nodes.values_mut() {
            n.forecast_gbps = n.load_gbps;
        }
    }

    /// Down detection, part of planning: an active node with shards that has not
    /// received a packet for `down_after_ms` of NIC time, while the NIC forwarded
    /// traffic in that time, is marked down.
    fn detect_down(&mut self, now_ms: u64) {
        let down_after_ms = self.down_after_ns / 1_000_000;
        for n in self.nodes.values_mut() {
            let Some(url) = &n.metrics_url else { continue };
            let since = n.answered.map_or(0, |a| a.0);
            let silent = now_ms.saturating_sub(since);
            if n.state == NodeState::Active && silent >= down_after_ms {
                n.state = NodeState::Down;
                n.down_reason = Some(format!(
                    "{url} has not answered for {silent} ms (last error: {})",
                    n.scrape_error.as_deref().unwrap_or("none")
                ));
                self.replan = true;
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
                && idle >= self.down_after_ns
                && self.tables.shard_node.contains(id)
            {
                n.state = NodeState::Down;
                n.down_reason = Some(format!(
                    "no packet for {} ms of NIC time while the NIC forwarded traffic",
                    idle / 1_000_000
                ));
                self.replan = true;
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
        }
        if s.mem_total_bytes > 0.0 {
            n.memory_used = Some(1.0 - s.mem_available_bytes / s.mem_total_bytes);
        }
        n.scrape_error = None;
        n.answered = Some((now_ms, s));
    }

    /// Stage 4: node states and, if an input changed, shard placement. `now_ms` is the
    /// agent's clock, against which endpoints' silence is judged.
    pub fn plan(&mut self, now_ms: u64) -> Plan {
        self.detect_down(now_ms);
        let node_states = self.nodes.iter().map(|(id, n)| (*id, n.state)).collect();
        let mut shard_node = self.tables.shard_node.clone();
        if std::mem::take(&mut self.replan) {
            let targets: Vec<(u16, u32)> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.state == NodeState::Active && n.weight > 0)
                .map(|(id, n)| (*id, n.weight))
                .collect();
            place(&mut shard_node, &targets);
        }
        Plan {
            node_states,
            shard_node,
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
        out
    }

    /// After a batch committed: the tables now hold the plan; log the moves.
    pub fn committed(&mut self, plan: Plan, reason: Reason) -> Vec<Migration> {
        let unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut moved = Vec::new();
        for (shard, (from, to)) in self
            .tables
            .shard_node
            .iter()
            .zip(&plan.shard_node)
            .enumerate()
        {
            if from != to {
                moved.push(Migration {
                    id: self.next_migration,
                    shard: shard as u16,
                    from: *from,
                    to: *to,
                    reason,
                    nic_time_ns: self.snapshot_ns,
                    unix_ms,
                });
                self.next_migration += 1;
            }
        }
        for t in &mut self.tables.nodes {
            if let Some(s) = plan.node_states.get(&t.id) {
                t.state = *s;
            }
        }
        self.tables.shard_node = plan.shard_node;
        *self.migrations_total.entry(reason.as_str()).or_default() += moved.len() as u64;
        for m in &moved {
            if self.migrations.len() == MIGRATION_LOG {
                self.migrations.pop_front();
            }
            self.migrations.push_back(m.clone());
        }
        moved
    }

    /// A batch failed: the NIC kept its tables, so the agent's intents that were not
    /// committed are rolled back to what the NIC holds.
    pub fn rolled_back(&mut self) {
        for t in &self.tables.nodes {
            if let Some(n) = self.nodes.get_mut(&t.id) {
                n.state = t.state;
            }
        }
    }

    fn node_mut(&mut self, id: u16) -> Result<&mut Node, Refusal> {
        self.nodes
            .get_mut(&id)
            .ok_or_else(|| Refusal::NotFound(format!("no node {id}")))
    }

    /// An operator sets a node's state; shards are placed anew over the active nodes.
    pub fn set_state(&mut self, id: u16, state: NodeState) -> Result<(), Refusal> {
        let n = self.node_mut(id)?;
        n.state = state;
        n.down_reason = None;
        if state == NodeState::Active {
            n.progress_ns = None;
        }
        self.replan = true;
        Ok(())
    }

    pub fn set_weight(&mut self, id: u16, weight: u32) -> Result<(), Refusal> {
        if weight > 1_000_000 {
            return Err(Refusal::Invalid(format!(
                "weight {weight} is outside 0..=1000000"
            )));
        }
        self.node_mut(id)?.weight = weight;
        self.replan = true;
        Ok(())
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
        let mut shard_node = self.tables.shard_node.clone();
        shard_node[usize::from(shard)] = node;
        Ok(Plan {
            node_states: self.nodes.iter().map(|(id, n)| (*id, n.state)).collect(),
            shard_node,
        })
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
                client: addr(&id.0, f.ipv6, id.2),
                server: addr(&id.1, f.ipv6, id.3),
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
                self.core.set_state(id, s)?;
                self.plan_and_apply(Reason::Rebalance).map(Reply::Done)
            }
            Request::SetWeight(id, w) => {
                self.core.set_weight(id, w)?;
                self.plan_and_apply(Reason::Rebalance).map(Reply::Done)
            }
            Request::Migrate { shard, node } => {
                let plan = self.core.migrate(shard, node)?;
                self.apply(plan, Reason::Operator).map(Reply::Done)
            }
            Request::TopFlows(n) => Ok(Reply::Flows(self.core.top_flows(n))),
            Request::NodeReport(id, r) => {
                self.core.node_report(id, r, self.clock_ms());
                Ok(Reply::Done(Vec::new()))
            }
            Request::Stop => Ok(Reply::Done(Vec::new())),
        }
    }

    fn plan_and_apply(&mut self, reason: Reason) -> Result<Vec<Migration>, Refusal> {
        let plan = self.core.plan(self.clock_ms());
        self.apply(plan, reason)
    }

    /// Stage 6: the plan as one command batch.
    fn apply(&mut self, plan: Plan, reason: Reason) -> Result<Vec<Migration>, Refusal> {
        let batch = self.core.rebalance(&plan);
        if batch.is_empty() {
            return Ok(self.core.committed(plan, reason));
        }
        let statuses = self.nic.submit(&batch).map_err(|e| {
            self.core.rolled_back();
            Refusal::Device(e.to_string())
        })?;
        if let Some((d, s)) = batch
            .iter()
            .zip(&statuses)
            .find(|(_, s)| **s != Status::Ok && **s != Status::Aborted)
        {
            self.core.rolled_back();
            return Err(Refusal::Device(format!(
                "the NIC refused the batch (opcode {}, args {} {}): {}",
                d.opcode.get(),
                d.arg0.get(),
                d.arg1.get(),
                s.as_str()
            )));
        }
        let moved = self.core.committed(plan, reason);
        self.metrics.batches.inc();
        for m in &moved {
            tracing::info!(
                shard = m.shard,
                from = m.from,
                to = m.to,
                reason = m.reason.as_str(),
                "shard migrated"
            );
        }
        Ok(moved)
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
        self.core.forecast();
        let t4 = Instant::now();
        let plan = self.core.plan(self.clock_ms());
        let t5 = Instant::now();
        if let Err(e) = self.apply(plan, Reason::Rebalance) {
            tracing::error!(error = ?e, "applying the plan failed; the NIC keeps its tables");
        }
        let t6 = Instant::now();
        let s = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64();
        self.last = LoopView {
            ticks: self.last.ticks + 1,
            ingest_s: s(t1, t2),
            profile_s: s(t2, t3),
            forecast_s: s(t3, t4),
            plan_s: s(t4, t5),
            apply_s: s(t5, t6),
            total_s: s(t1, t6),
        };
        self.metrics.loop_seconds.observe(self.last.total_s);
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

    fn core() -> Core {
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
            ..AgentConfig::default()
        };
        Core::new(tables, &cfg)
    }

    #[test]
    fn a_node_that_stops_receiving_traffic_is_marked_down_and_loses_its_shards() {
        let mut c = core();
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
            let plan = c.plan(0);
            let cmds = c.rebalance(&plan);
            let down = plan.node_states[&1] == NodeState::Down;
            // Node 1 last moved at 600 ms: down once 1,000 ms pass without a packet.
            assert_eq!(down, i * 200 >= 1_600, "tick {i}");
            if down && !cmds.is_empty() {
                assert_eq!(plan.shard_node, vec![0, 0, 0, 0]);
                assert_eq!(cmds.len(), 3, "node state and two shards");
            }
            c.committed(plan, Reason::Rebalance);
        }
        let v = c.view();
        assert!(
            v.nodes[1]
                .down_reason
                .as_deref()
                .unwrap()
                .contains("no packet for")
        );
        assert_eq!(v.migrations_total["rebalance"], 2);
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
    }

    #[test]
    fn operator_requests_are_checked() {
        let mut c = core();
        assert_eq!(
            c.set_weight(9, 1),
            Err(Refusal::NotFound("no node 9".into()))
        );
        assert!(matches!(c.migrate(7, 0), Err(Refusal::NotFound(_))));
        assert!(matches!(c.migrate(0, 0), Err(Refusal::Conflict(_))));
        c.set_state(1, NodeState::Draining).unwrap();
        assert!(matches!(c.migrate(0, 1), Err(Refusal::Conflict(_))));
        let plan = c.plan(0);
        assert_eq!(plan.shard_node, vec![0, 0, 0, 0]);
        assert_eq!(plan.node_states[&1], NodeState::Draining);
    }
}
